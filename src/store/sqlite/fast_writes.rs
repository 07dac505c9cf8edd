//! Group commit for the store's hot writes: the fast path's (hold, capture,
//! release), each one conditional statement, atomic on its own, and the slow
//! path's ([`FastWriter::transaction`]: intents, sessions, settlements),
//! each in a savepoint of its own. They all go through
//! one dedicated connection (rusqlite, not sqlx: sqlx runs every statement on
//! a worker thread of its own, and those hand-offs, not SQLite, were most of
//! a write's time). Writes are queued, and whoever runs the queue runs all
//! that is in it in one `BEGIN IMMEDIATE … COMMIT`, so writes from
//! concurrent calls share a commit:
//!
//! - under `synchronous = normal` a write that comes while no other is under
//!   way is run by its caller, after letting the runtime's other ready calls
//!   queue theirs (flat combining): a lone call costs no hand-off at all.
//!   It never waits for SQLite's write lock on a runtime thread (the holder
//!   may be a transaction that needs that thread to finish): if another
//!   connection holds it, the writer thread takes over. Writes that come
//!   while others are under way go to the writer thread, which commits on
//!   the other core while the runtime serves the rest of the calls (on
//!   stdio's one runtime thread, 16 calls in flight ran about twice as
//!   fast so);
//! - under `synchronous = full` the writer thread always runs it, so that no
//!   runtime thread waits on an fsync, and writes that arrive during one
//!   fsync share the next.
//!
//! Statements in a batch run in order inside one transaction, so each sees
//! the balances the ones before it left: the same result as running them one
//! by one. A statement that fails is undone on its own (SQLite rolls back
//! just that statement), so one bad write cannot fail its neighbours. A
//! batch of one statement is its own transaction, with no `BEGIN` or
//! `COMMIT` and no statement journal (6 to 9% of a hold and capture).
//!
//! A thread of its own copies the WAL back into the database (checkpoints),
//! so that no call waits for that copy and its fsyncs.

use std::{
    collections::VecDeque,
    panic::AssertUnwindSafe,
    path::Path,
    sync::{
        Arc, Mutex, TryLockError,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    time::Duration,
};

use rusqlite::{Connection, ErrorCode, OpenFlags, params};
use tokio::sync::oneshot;

use super::in_thread::{InlineTx, TxState};
use crate::{
    config::Synchronous,
    store::{
        StoreError,
        fast_path::{Capture, Hold},
    },
    sync::lock,
};

/// The most writes one commit carries.
const MAX_BATCH: usize = 64;

/// Every this many writes (a fast-path call makes two, about ten WAL pages)
/// the checkpointer is woken to copy the WAL back into the database.
const CHECKPOINT_EVERY: usize = 256;

/// The writer's own automatic checkpoint, in WAL pages: a backstop. The
/// checkpointer does the copying off the calls' path; this one, run right
/// after a commit, is what lets SQLite start the WAL over (a checkpoint
/// that finishes while no commit has landed since), and by then little is
/// left to copy.
const WRITER_AUTOCHECKPOINT: u32 = 4000;

/// How long a connection waits for another's write lock: the pool's, and
/// the writer thread's (a caller running the queue does not wait).
pub(super) const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) enum FastWrite {
    Hold(Hold),
    Capture(Capture),
    /// End an open hold without charging.
    Release {
        hold_id: String,
        at: i64,
    },
    /// Any other write (see [`FastWriter::transaction`]). It may run more
    /// than once: a caller's batch that met SQLite busy is handed whole,
    /// with nothing of it kept, to the writer thread, which runs it again.
    Op(Operation),
}

/// A write of [`FastWriter::transaction`]: `Ok(true)` once it ran (its own
/// answer is in its slot), `Err` when it ended the batch's transaction.
type Operation = Box<dyn Fn(&Connection) -> rusqlite::Result<bool> + Send>;

impl FastWrite {
    /// Runs the write's statement; `Ok(true)` when it changed its row.
    fn run(&self, conn: &Connection) -> rusqlite::Result<bool> {
        let changed = match self {
            FastWrite::Hold(hold) => conn.prepare_cached(HOLD)?.execute(params![
                hold.id,
                hold.amount,
                hold.principal,
                hold.tool,
                hold.args_hash,
                hold.created_at,
                hold.expires_at,
                hold.currency,
                hold.agent,
                hold.metadata,
                hold.owner
            ])?,
            FastWrite::Capture(capture) => conn
                .prepare_cached(
                    "UPDATE holds SET status = 'captured', captured = ?1, settled_at = ?2, txn_id = ?3,
                                      beneficiary_account_id = ?4, legs = ?6
                     WHERE id = ?5 AND status = 'open' AND amount >= ?1",
                )?
                .execute(params![
                    capture.amount,
                    capture.at,
                    capture.txn_id,
                    capture.beneficiary_id,
                    capture.hold_id,
                    capture.legs
                ])?,
            FastWrite::Release { hold_id, at } => conn
                .prepare_cached(
                    "UPDATE holds SET status = 'released', settled_at = ?1 WHERE id = ?2 AND status = 'open'",
                )?
                .execute(params![at, hold_id])?,
            FastWrite::Op(op) => return op(conn),
        };
        Ok(changed == 1)
    }
}

/// `Ok(true)` when the write took effect, `Ok(false)` when its condition
/// did not hold (not enough funds, hold not open, capture above the hold).
type Outcome = Result<bool, StoreError>;

/// The hold: the balance check, the wallet's limits (in the periods of
/// the hold's `created_at`, as the `holds_reserve` trigger counts them) and
/// the reservation, in one statement.
///
/// A hold that lands after the wallet's counters have moved into a later
/// day or month (made just before midnight, queued behind a later one) is
/// counted in that period, and made at its start: a release then gives the
/// amount back to the counters it went into (see `holds_end`).
const HOLD: &str = "INSERT INTO holds (id, account_id, amount, status, principal, tool, args_hash, created_at, expires_at,
                                       agent, metadata, owner)
     SELECT ?1, id, ?2, 'open', ?3, ?4, ?5, max(?6, spent_day_start, spent_month_start), ?7, ?9, ?10, ?11
     FROM accounts
     WHERE kind = 'wallet' AND name = ?3 AND currency = ?8 AND balance - held >= ?2
       AND (per_call_max IS NULL OR ?2 <= per_call_max)
       AND (allowed_tools IS NULL OR EXISTS (SELECT 1 FROM json_each(allowed_tools) WHERE value = ?4))
       AND (daily_cap IS NULL OR daily_cap >= ?2 +
            CASE WHEN spent_day_start >= ?6 - ?6 % 86400000 THEN spent_day ELSE 0 END)
       AND (monthly_cap IS NULL OR monthly_cap >= ?2 +
            CASE WHEN spent_month_start >= CAST(strftime('%s', ?6 / 1000, 'unixepoch', 'start of month') AS INTEGER) * 1000
                 THEN spent_month ELSE 0 END)";

type Queued = (FastWrite, oneshot::Sender<Outcome>);

pub(super) struct FastWriter {
    queue: Arc<Queue>,
    /// Wakes the writer thread, which runs the queue.
    writer_thread: mpsc::Sender<()>,
    /// Whether a lone write runs on its caller (`synchronous = normal`).
    combine: bool,
    /// Writes under way (queued, running or being answered).
    in_flight: AtomicUsize,
}

/// Counts a write in [`FastWriter::in_flight`] until it is answered (or its
/// call is dropped).
struct InFlight<'a> {
    count: &'a AtomicUsize,
    /// No other write was under way when this one came.
    alone: bool,
}

impl<'a> InFlight<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        let before = count.fetch_add(1, Ordering::AcqRel);
        Self {
            count,
            alone: before == 0,
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Queue {
    conn: Mutex<Connection>,
    writes: Mutex<VecDeque<Queued>>,
    /// Writes committed since the checkpointer was last woken.
    written: AtomicUsize,
    /// Wakes the checkpointer thread.
    checkpointer: mpsc::SyncSender<()>,
}

/// A queued write's answer, until its caller attends to it (see
/// [`FastWriter::write`]). Dropped before that, it lets go of the answer
/// (so the writer sees that nobody waits for it), then wakes the writer
/// thread: in that order, or a hold could be made for nobody.
struct Unattended<'a> {
    outcome: Option<oneshot::Receiver<Outcome>>,
    writer_thread: &'a mpsc::Sender<()>,
}

impl Unattended<'_> {
    /// The answer, no longer left to the writer thread alone.
    fn attended(mut self) -> Option<oneshot::Receiver<Outcome>> {
        self.outcome.take()
    }
}

impl Drop for Unattended<'_> {
    fn drop(&mut self) {
        if let Some(outcome) = self.outcome.take() {
            drop(outcome);
            // Stopped: the queue is run by no one either way.
            let _ = self.writer_thread.send(());
        }
    }
}

/// Who is running the queue.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Runner {
    /// A call, on a runtime thread: it must not wait for the write lock.
    Caller,
    WriterThread,
}

impl FastWriter {
    /// Opens the writer's connection to the database file and starts the
    /// writer thread, which ends when the store is dropped.
    pub(super) fn open(path: &Path, synchronous: Synchronous) -> Result<Self, StoreError> {
        let conn = open(path, synchronous).map_err(unavailable)?;
        conn.pragma_update(None, "wal_autocheckpoint", WRITER_AUTOCHECKPOINT)
            .map_err(unavailable)?;
        let queue = Arc::new(Queue {
            conn: Mutex::new(conn),
            writes: Mutex::new(VecDeque::new()),
            written: AtomicUsize::new(0),
            checkpointer: spawn_checkpointer(path, synchronous)?,
        });
        let (writer_thread, woken) = mpsc::channel::<()>();
        let thread_queue = queue.clone();
        std::thread::Builder::new()
            .name("tollgate-writer".into())
            .spawn(move || {
                while woken.recv().is_ok() {
                    while woken.try_recv().is_ok() {}
                    // A write that panics fails its batch (its callers hear
                    // that it went unanswered), not the writer: what it
                    // left open is rolled back, and the queue run on.
                    loop {
                        let run = AssertUnwindSafe(|| thread_queue.run(Runner::WriterThread));
                        if std::panic::catch_unwind(run).is_ok() {
                            break;
                        }
                        tracing::error!("a write panicked on the writer thread: its batch failed");
                        thread_queue.roll_back_open_transaction();
                    }
                }
            })
            .map_err(|e| StoreError::Unavailable(sqlx::Error::Io(e)))?;
        Ok(Self {
            queue,
            writer_thread,
            combine: synchronous == Synchronous::Normal,
            in_flight: AtomicUsize::new(0),
        })
    }

    pub(super) async fn write(&self, write: FastWrite) -> Outcome {
        let (reply, outcome) = oneshot::channel();
        lock(&self.queue.writes).push_back((write, reply));
        // Dropped before the write is run or handed over (its call's client
        // went away), this wakes the writer thread, so that the write is run
        // now, not whenever another comes.
        let unattended = Unattended {
            outcome: Some(outcome),
            writer_thread: &self.writer_thread,
        };
        let in_flight = InFlight::enter(&self.in_flight);
        // A lone write runs here, with no hand-off. Under concurrency the
        // writer thread runs them, on the other core, while this runtime
        // thread goes on serving the other calls.
        let run_here = self.combine && in_flight.alone;
        // Calls the runtime has ready get to queue their writes first, so
        // that they share this commit. (A call dropped here has its write
        // run by the writer thread, through `unattended`.)
        let handed_over = if run_here {
            tokio::task::yield_now().await;
            self.queue.run(Runner::Caller) == Ran::Busy
        } else {
            true
        };
        let stopped = || StoreError::Corrupt("the store's writer has stopped".into());
        let outcome = unattended.attended().ok_or_else(stopped)?;
        if handed_over {
            self.writer_thread.send(()).map_err(|_| stopped())?;
        }
        outcome.await.map_err(|_| stopped())?
    }

    /// Runs `op` in the next batch, in a savepoint of its own, and answers
    /// with its result once the batch has committed. An `op` that fails
    /// without committing (see [`InlineTx`]) has its writes undone, alone.
    pub(super) async fn transaction<T: Send + 'static>(
        &self,
        op: impl Fn(InlineTx<'_>) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let answer = Arc::new(Mutex::new(None));
        let slot = answer.clone();
        let write = FastWrite::Op(Box::new(move |conn| {
            control(conn, "SAVEPOINT op")?;
            let state = TxState::default();
            let result = op(InlineTx {
                conn,
                state: &state,
            });
            if conn.is_autocommit() {
                // The failure ended the batch's transaction: nothing is kept.
                return Err(state
                    .take_failure()
                    .unwrap_or(rusqlite::Error::SqliteFailure(
                        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ABORT),
                        Some("the batch's transaction ended".into()),
                    )));
            }
            if result.is_err() && !state.committed() {
                control(conn, "ROLLBACK TO op")?;
            }
            control(conn, "RELEASE op")?;
            *lock(&slot) = Some(result);
            Ok(true)
        }));
        self.write(write).await?;
        let result = lock(&answer).take();
        result.unwrap_or_else(|| Err(StoreError::Corrupt("a write went unanswered".into())))
    }
}

#[derive(PartialEq, Eq)]
enum Ran {
    /// Nothing left in the queue, or another runner will see to it.
    Done,
    /// Another connection holds the write lock; what is queued is left.
    Busy,
}

impl Queue {
    /// Rolls back a transaction a panicking write left open, so that the
    /// writer does not keep SQLite's write lock from the other connections
    /// until the next write comes.
    fn roll_back_open_transaction(&self) {
        if let Err(e) = roll_back_left_open(&lock(&self.conn)) {
            tracing::error!("cannot roll back the writer's transaction: {e}");
        }
    }

    /// Runs what is queued if the connection is free. A caller that finds it
    /// busy leaves its write to the holder, which looks at the queue again
    /// after letting go of the connection: a write queued before a failed
    /// `try_lock` is always seen.
    fn run(&self, runner: Runner) -> Ran {
        loop {
            let conn = match self.conn.try_lock() {
                Ok(conn) => conn,
                Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
                Err(TryLockError::WouldBlock) if runner == Runner::WriterThread => lock(&self.conn),
                Err(TryLockError::WouldBlock) => return Ran::Done,
            };
            let timeout = match runner {
                Runner::Caller => Duration::ZERO,
                Runner::WriterThread => BUSY_TIMEOUT,
            };
            if let Err(e) = conn.busy_timeout(timeout) {
                tracing::warn!("cannot set the writer's busy timeout: {e}");
            }
            loop {
                let mut writes = lock(&self.writes);
                let cut = writes.len().min(MAX_BATCH);
                let mut batch: Vec<Queued> = writes.drain(..cut).collect();
                drop(writes);
                if batch.is_empty() {
                    break;
                }
                // A hold whose call has gone (its client went away) is not
                // made: nobody would use or release it, and its money would
                // stay held until it expired.
                batch.retain(|(write, reply)| {
                    !(matches!(write, FastWrite::Hold(_)) && reply.is_closed())
                });
                if batch.is_empty() {
                    continue;
                }
                if let Err(batch) = run(&conn, batch, runner) {
                    // Put back in front, in order, for the writer thread.
                    let mut writes = lock(&self.writes);
                    for queued in batch.into_iter().rev() {
                        writes.push_front(queued);
                    }
                    return Ran::Busy;
                }
                let written = self.written.fetch_add(cut, Ordering::Relaxed) + cut;
                if written >= CHECKPOINT_EVERY {
                    self.written.store(0, Ordering::Relaxed);
                    // A wake already pending covers these writes too.
                    let _ = self.checkpointer.try_send(());
                }
            }
            drop(conn);
            if lock(&self.writes).is_empty() {
                return Ran::Done;
            }
        }
    }
}

/// Starts the thread that copies the WAL back into the database (a passive
/// checkpoint, on a connection of its own) whenever the writer wakes it.
/// SQLite would otherwise do that inside a commit every 1000 pages, fsyncs
/// included, on whichever call's thread committed. It ends when the queue,
/// which holds the other end, is dropped.
fn spawn_checkpointer(
    path: &Path,
    synchronous: Synchronous,
) -> Result<mpsc::SyncSender<()>, StoreError> {
    let conn = open(path, synchronous).map_err(unavailable)?;
    let (wake, woken) = mpsc::sync_channel::<()>(1);
    std::thread::Builder::new()
        .name("tollgate-checkpointer".into())
        .spawn(move || {
            while woken.recv().is_ok() {
                // (busy, WAL pages, pages copied); busy only means a
                // reader still needs older pages: the next one copies them.
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    tracing::debug!("a background checkpoint failed: {e}");
                }
            }
        })
        .map_err(|e| StoreError::Unavailable(sqlx::Error::Io(e)))?;
    Ok(wake)
}

/// The same settings as the store's pool: WAL (set when the pool opened the
/// file) and the configured durability.
fn open(path: &Path, synchronous: Synchronous) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(
        None,
        "synchronous",
        match synchronous {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        },
    )?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // The fast path's and the slow path's statements, all kept prepared.
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// A failure of the database under the writer: the same answer the pool's
/// failures give, so callers retry or refuse the call the same way.
pub(super) fn unavailable(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> StoreError {
    StoreError::Unavailable(sqlx::Error::Io(std::io::Error::other(e)))
}

/// Runs one batch and answers each write. A caller, which may not wait for
/// the write lock, gets the batch back untouched when the lock is taken; the
/// writer thread, which waited its busy timeout, answers it as a failure.
fn run(conn: &Connection, batch: Vec<Queued>, runner: Runner) -> Result<(), Vec<Queued>> {
    let outcomes = match run_batch(conn, batch.iter().map(|(write, _)| write)) {
        Err(e)
            if runner == Runner::Caller
                && e.sqlite_error_code() == Some(ErrorCode::DatabaseBusy) =>
        {
            return Err(batch);
        }
        Err(e) => {
            tracing::error!("a batch of {} fast writes failed: {e}", batch.len());
            let e = e.to_string();
            batch.iter().map(|_| Err(unavailable(e.clone()))).collect()
        }
        Ok(outcomes) => outcomes,
    };
    for ((_, reply), outcome) in batch.into_iter().zip(outcomes) {
        let _ = reply.send(outcome);
    }
    Ok(())
}

/// Rolls back a transaction left open on the writer's connection (a write
/// that panicked, a COMMIT and a ROLLBACK that both failed). It would
/// swallow every later write (a lone write would be answered as done inside
/// it and never committed), and keep SQLite's write lock meanwhile.
fn roll_back_left_open(conn: &Connection) -> rusqlite::Result<()> {
    if !conn.is_autocommit() {
        tracing::warn!("the writer's connection had a transaction left open: rolled back");
        control(conn, "ROLLBACK")?;
    }
    Ok(())
}

/// Runs a transaction-control statement (`BEGIN`, `COMMIT`, savepoints),
/// kept prepared: parsing it anew each time was a measurable share of a
/// lone write.
fn control(conn: &Connection, statement: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(statement)?.execute([]).map(drop)
}

/// One transaction for the batch. A write that fails is undone alone and
/// answered with its error; the others commit. `Err` only when the
/// transaction itself failed: nothing of it was kept.
fn run_batch<'a>(
    conn: &Connection,
    batch: impl ExactSizeIterator<Item = &'a FastWrite>,
) -> rusqlite::Result<Vec<Outcome>> {
    roll_back_left_open(conn)?;
    let mut batch = batch.peekable();
    if batch.len() == 1
        && let Some(write) = batch.next_if(|write| !matches!(write, FastWrite::Op(_)))
    {
        // One statement is a transaction of its own: it takes the write lock
        // as it starts, as `BEGIN IMMEDIATE` would, and SQLite keeps no
        // statement journal for it (the transaction is the statement).
        return match write.run(conn) {
            Err(e) if e.sqlite_error_code() == Some(ErrorCode::DatabaseBusy) => Err(e),
            outcome => Ok(vec![outcome.map_err(unavailable)]),
        };
    }
    control(conn, "BEGIN IMMEDIATE")?;
    let mut outcomes = Vec::new();
    for write in batch {
        match write.run(conn) {
            // The error ended the whole transaction (SQLite does so for I/O
            // errors, a full disk and the like): the writes before it were
            // rolled back too.
            Err(e) if conn.is_autocommit() => return Err(e),
            outcome => outcomes.push(outcome.map_err(unavailable)),
        }
    }
    if let Err(e) = control(conn, "COMMIT") {
        if !conn.is_autocommit() && control(conn, "ROLLBACK").is_err() {
            tracing::debug!("nothing to roll back");
        }
        return Err(e);
    }
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::Synchronous,
        money::{Currency, Units},
        store::{AccountKind, AccountRef, HoldOutcome, HoldRequest, SqliteStore, Store, now_ms},
    };

    fn hold(id: &str, amount: i64) -> FastWrite {
        FastWrite::Hold(Hold {
            id: id.into(),
            principal: "w".into(),
            currency: "USD".into(),
            amount,
            tool: "echo".into(),
            args_hash: "h".into(),
            created_at: now_ms(),
            expires_at: now_ms() + 60_000,
            agent: None,
            metadata: None,
            owner: "test".into(),
        })
    }

    /// A store whose wallet `w` holds 100 units.
    async fn funded_store(dir: &tempfile::TempDir) -> SqliteStore {
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store = SqliteStore::connect(&url, Synchronous::Normal)
            .await
            .unwrap();
        let usd = Currency::parse("USD").unwrap();
        store
            .topup(&AccountRef::wallet("w", &usd), Units(100), None)
            .await
            .unwrap();
        store
    }

    /// A long mixed batch behaves exactly like the same writes one by one,
    /// and is committed.
    #[tokio::test]
    async fn a_mixed_batch_is_applied_in_order_and_committed() {
        let dir = tempfile::tempdir().unwrap();
        let store = funded_store(&dir).await;

        let mut writes = Vec::new();
        let mut expected = Vec::new();
        // 12 holds of 10 against a balance of 100: the first 10 fit.
        for i in 0..12 {
            writes.push(hold(&format!("h{i}"), 10));
            expected.push(i < 10);
        }
        // Releasing two makes room for two more.
        for i in 0..2 {
            writes.push(FastWrite::Release {
                hold_id: format!("h{i}"),
                at: now_ms(),
            });
            expected.push(true);
        }
        writes.push(FastWrite::Release {
            hold_id: "h0".into(),
            at: now_ms(),
        });
        expected.push(false); // a hold ends once
        for i in 12..15 {
            writes.push(hold(&format!("h{i}"), 10));
            expected.push(i < 14);
        }
        let conn = open(&dir.path().join("t.db"), Synchronous::Normal).unwrap();
        let outcomes: Vec<bool> = run_batch(&conn, writes.iter())
            .unwrap()
            .into_iter()
            .map(|outcome| outcome.unwrap())
            .collect();
        assert_eq!(outcomes, expected);
        let balances = store.balances("w").await.unwrap();
        assert_eq!(
            balances[0].held,
            Units(100),
            "committed and visible to other connections"
        );
        assert_eq!(balances[0].available, Units(0));
    }

    /// A write that fails (here a hold id used twice) is undone alone; the
    /// writes around it commit.
    #[tokio::test]
    async fn a_failing_write_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = funded_store(&dir).await;
        let conn = open(&dir.path().join("t.db"), Synchronous::Normal).unwrap();
        let writes = [hold("h1", 10), hold("h1", 10), hold("h2", 10)];
        let outcomes = run_batch(&conn, writes.iter()).unwrap();
        assert!(matches!(outcomes[0], Ok(true)));
        assert!(
            matches!(outcomes[1], Err(StoreError::Unavailable(_))),
            "{:?}",
            outcomes[1]
        );
        assert!(matches!(outcomes[2], Ok(true)));
        assert_eq!(store.balances("w").await.unwrap()[0].held, Units(20));
    }

    /// A call dropped after queueing its hold (its client went away) does
    /// not leave the hold made, its money held until it expired; a write of
    /// another kind dropped so is run at once, not when the next comes.
    /// (Both were left in the queue for whichever write came next.)
    #[tokio::test]
    async fn a_write_whose_caller_went_away_is_dropped_or_run_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = funded_store(&dir).await;
        let writer = FastWriter::open(&dir.path().join("t.db"), Synchronous::Normal).unwrap();
        assert!(writer.write(hold("h1", 10)).await.unwrap());
        let queued_then_dropped = async |write| {
            let mut writing = Box::pin(writer.write(write));
            assert!(
                futures::poll!(&mut writing).is_pending(),
                "queued, not yet run"
            );
        };
        queued_then_dropped(hold("gone", 10)).await;
        let release = FastWrite::Release {
            hold_id: "h1".into(),
            at: now_ms(),
        };
        queued_then_dropped(release).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while store.balances("w").await.unwrap()[0].held != Units(0) {
            assert!(
                std::time::Instant::now() < deadline,
                "h1 still held, or `gone` made: {:?}",
                store.balances("w").await.unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(writer.write(hold("h2", 100)).await.unwrap(), "all 100 free");
    }

    /// A write that panics on the writer thread fails alone: the writer
    /// goes on, and the next write is made. (The thread ended, and every
    /// write after it failed with "the store's writer has stopped".)
    #[tokio::test]
    async fn a_write_that_panics_does_not_stop_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let store = funded_store(&dir).await;
        // `full`: every write goes to the writer thread.
        let writer = FastWriter::open(&dir.path().join("t.db"), Synchronous::Full).unwrap();
        let panicked = writer
            .transaction(|_| -> Result<(), StoreError> { panic!("a write that panics") })
            .await;
        assert!(panicked.is_err());
        // Nothing is left holding the write lock: another connection writes.
        let usd = Currency::parse("USD").unwrap();
        store
            .topup(&AccountRef::wallet("w", &usd), Units(10), None)
            .await
            .unwrap();
        assert!(writer.write(hold("h1", 10)).await.unwrap());
        assert_eq!(store.balances("w").await.unwrap()[0].held, Units(10));
    }

    /// A batch of one write runs as its own transaction: its outcome is the
    /// same as in a batch (covered, not covered, failed), it is committed,
    /// and nothing is left open on the connection.
    #[tokio::test]
    async fn a_lone_write_is_a_transaction_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let store = funded_store(&dir).await;
        let conn = open(&dir.path().join("t.db"), Synchronous::Normal).unwrap();
        let lone = |write: FastWrite| {
            let outcomes = run_batch(&conn, std::iter::once(&write)).unwrap();
            assert!(conn.is_autocommit(), "no transaction left open");
            outcomes.into_iter().next().unwrap()
        };
        assert!(lone(hold("h1", 60)).unwrap());
        assert!(!lone(hold("h2", 60)).unwrap(), "40 left: not covered");
        assert!(
            matches!(lone(hold("h1", 10)), Err(StoreError::Unavailable(_))),
            "a hold id used twice fails"
        );
        let wallet = &store.balances("w").await.unwrap()[0];
        assert_eq!((wallet.held, wallet.available), (Units(60), Units(40)));
    }

    /// A transaction left open on the writer's connection (here by hand, as
    /// a write that panicked would leave it) is rolled back before the next
    /// batch: the lone write after it is committed, not answered as done
    /// inside a transaction nobody ends, and later batches can begin.
    #[tokio::test]
    async fn a_transaction_left_open_is_rolled_back_before_the_next_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = funded_store(&dir).await;
        let conn = open(&dir.path().join("t.db"), Synchronous::Normal).unwrap();
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        assert!(
            run_batch(&conn, std::iter::once(&hold("h1", 10))).unwrap()[0]
                .as_ref()
                .is_ok_and(|held| *held)
        );
        assert!(conn.is_autocommit(), "no transaction left open");
        assert_eq!(
            store.balances("w").await.unwrap()[0].held,
            Units(10),
            "committed and visible to other connections"
        );
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        let writes = [hold("h2", 10), hold("h3", 10)];
        let outcomes = run_batch(&conn, writes.iter()).unwrap();
        assert!(
            outcomes.iter().all(|o| matches!(o, Ok(true))),
            "{outcomes:?}"
        );
        assert_eq!(store.balances("w").await.unwrap()[0].held, Units(30));
    }

    /// A call dropped while its write waits is no longer counted as under
    /// way: the next lone write runs on its caller again. (Its hold, whose
    /// call has gone, is not made.)
    #[tokio::test(flavor = "current_thread")]
    async fn a_dropped_call_leaves_its_write_queued_and_uncounted() {
        let dir = tempfile::tempdir().unwrap();
        let store = funded_store(&dir).await;
        let writer = FastWriter::open(&dir.path().join("t.db"), Synchronous::Normal).unwrap();
        {
            let mut dropped = std::pin::pin!(writer.write(hold("h1", 10)));
            // The first poll queues the write and yields to the runtime.
            assert!(futures::poll!(dropped.as_mut()).is_pending());
            assert_eq!(writer.in_flight.load(Ordering::Acquire), 1);
        }
        assert_eq!(writer.in_flight.load(Ordering::Acquire), 0);
        assert!(writer.write(hold("h2", 10)).await.unwrap());
        assert_eq!(
            store.balances("w").await.unwrap()[0].held,
            Units(10),
            "h2 alone"
        );
    }

    /// While another connection holds SQLite's write lock, a fast write does
    /// not wait for it on the runtime's thread: that thread may be the one
    /// the holder needs to finish. Here the runtime has one thread, and the
    /// lock is given up by a task on it, which could not run before the
    /// busy timeout ran out had the write blocked the thread.
    #[tokio::test(flavor = "current_thread")]
    async fn a_write_waits_for_another_writer_off_the_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let _store = funded_store(&dir).await;
        let path = dir.path().join("t.db");
        let writer = Arc::new(FastWriter::open(&path, Synchronous::Normal).unwrap());
        let other = open(&path, Synchronous::Normal).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let started = std::time::Instant::now();

        let write = tokio::spawn({
            let writer = writer.clone();
            async move { writer.write(hold("h1", 10)).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!write.is_finished(), "the lock is still held");
        other.execute_batch("COMMIT").unwrap();
        assert!(
            started.elapsed() < BUSY_TIMEOUT,
            "the runtime's thread was held waiting for the lock"
        );
        assert!(write.await.unwrap().unwrap(), "held once the lock was free");
    }

    /// 64 concurrent calls against a wallet that covers 20 of them, under
    /// both ways of running the queue: exactly 20 are charged.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_calls_are_charged_exactly_what_the_wallet_covers() {
        for synchronous in [Synchronous::Normal, Synchronous::Full] {
            let dir = tempfile::tempdir().unwrap();
            let url = format!("sqlite://{}", dir.path().join("t.db").display());
            let store = Arc::new(SqliteStore::connect(&url, synchronous).await.unwrap());
            let usd = Currency::parse("USD").unwrap();
            let revenue = AccountRef::new(AccountKind::Revenue, "author", &usd);
            store
                .topup(&AccountRef::wallet("w", &usd), Units(20), None)
                .await
                .unwrap();
            let calls: Vec<_> = (0..64)
                .map(|i| {
                    let (store, usd, revenue) = (store.clone(), usd.clone(), revenue.clone());
                    tokio::spawn(async move {
                        let request = HoldRequest {
                            hold_id: format!("h{i}"),
                            principal: "w".into(),
                            amount: Units(1),
                            currency: usd,
                            tool: "echo".into(),
                            args_hash: "h".into(),
                            expires_at: now_ms() + 60_000,
                            origin: Default::default(),
                        };
                        if store.hold(&request).await.unwrap() != HoldOutcome::Held {
                            return 0;
                        }
                        store
                            .capture(
                                &request.hold_id,
                                &crate::store::Charge::whole(revenue, Units(1)),
                            )
                            .await
                            .unwrap();
                        1
                    })
                })
                .collect();
            let mut charged = 0;
            for call in calls {
                charged += call.await.unwrap();
            }
            assert_eq!(charged, 20, "{synchronous:?}");
            let wallet = &store.balances("w").await.unwrap()[0];
            assert_eq!((wallet.available, wallet.held), (Units(0), Units(0)));
            let report = store.verify(now_ms()).await.unwrap();
            assert!(
                report.problems.is_empty(),
                "{synchronous:?}: {:?}",
                report.problems
            );
        }
    }

    /// The WAL is copied back into the database file by the writer's own
    /// checkpointer, off the calls' path: here no other connection commits
    /// (nor checkpoints), and the writer's own automatic checkpoint is off.
    #[tokio::test]
    async fn the_checkpointer_copies_the_wal_into_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let store = funded_store(&dir).await;
        let usd = Currency::parse("USD").unwrap();
        store
            .topup(&AccountRef::wallet("w", &usd), Units(10_000), None)
            .await
            .unwrap();
        let path = dir.path().join("t.db");
        let writer = FastWriter::open(&path, Synchronous::Normal).unwrap();
        lock(&writer.queue.conn)
            .pragma_update(None, "wal_autocheckpoint", 0)
            .unwrap();
        let mut writes = 0;
        let mut write_more = async |n: usize| {
            for _ in 0..n {
                assert!(writer.write(hold(&format!("h{writes}"), 1)).await.unwrap());
                writes += 1;
            }
            writes
        };
        let mut written = write_more(2 * CHECKPOINT_EVERY + 10).await;
        // The database file alone, WAL ignored: what checkpoints copied
        // (until the first, not even the tables).
        let in_file = || {
            let file = Connection::open_with_flags(
                format!("file:{}?immutable=1", path.display()),
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI,
            )
            .unwrap();
            file.query_row("SELECT count(*) FROM holds", [], |row| {
                row.get::<_, usize>(0)
            })
            .unwrap_or(0)
        };
        // A passive checkpoint copies only frames that no other connection's
        // read still needs, so a wake may copy nothing (seen once, in a
        // loaded test run): the next wake, due as many writes later, copies
        // it. So each second until a checkpoint has copied, for at most ten,
        // this writes that many more (the wallet covers them all).
        let started = std::time::Instant::now();
        let mut more_at = Duration::from_secs(1);
        while in_file() < CHECKPOINT_EVERY && started.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if started.elapsed() > more_at {
                written = write_more(CHECKPOINT_EVERY).await;
                more_at += Duration::from_secs(1);
            }
        }
        assert!(
            in_file() >= CHECKPOINT_EVERY,
            "{} of {written} holds in the database file",
            in_file()
        );
    }

    /// A write that waited the writer thread's whole busy timeout for
    /// another connection's lock is answered as a failure (the store is
    /// unavailable), not left queued unanswered.
    #[tokio::test]
    async fn a_write_the_lock_never_frees_up_for_fails() {
        let dir = tempfile::tempdir().unwrap();
        let _store = funded_store(&dir).await;
        let path = dir.path().join("t.db");
        let writer = FastWriter::open(&path, Synchronous::Full).unwrap();
        let other = open(&path, Synchronous::Normal).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();

        let outcome = tokio::time::timeout(BUSY_TIMEOUT * 3, writer.write(hold("h1", 10)))
            .await
            .expect("answered, not left in the queue");
        assert!(
            matches!(outcome, Err(StoreError::Unavailable(_))),
            "{outcome:?}"
        );
        other.execute_batch("ROLLBACK").unwrap();
    }
}
