//! The fast path's writes on PostgreSQL, in batches.
//!
//! Under load, most of what a hold or a capture costs PostgreSQL is not the
//! statement but what comes with it: a round trip, a connection check, a
//! transaction and its commit. Writes that arrive while a batch is under
//! way wait for the next one, which runs them all through
//! `fast_path_batch` (migration 0006): one round trip and one commit for the
//! lot, each write still its own conditional statement, in arrival order.
//! A lone write is a batch of one and goes at once.
//!
//! Batches run on tasks of their own: a caller that gives up (its client
//! went away) never cuts short a batch that carries other callers' writes.

use std::sync::{
    Arc, Mutex, MutexGuard,
    atomic::{AtomicUsize, Ordering},
};

use futures::StreamExt;
use sqlx::PgPool;
use tokio::sync::oneshot;

use super::{retrying, sql_state};
use crate::{
    allowance::{day_start, month_start},
    store::{
        StoreError,
        fast_path::{Capture, Hold},
    },
};

/// Writes in one batch at most.
const MAX_BATCH: usize = 64;
/// Batches under way at once, each on a connection of its own: while one
/// waits for its commit, the next is already sent.
const MAX_RUNNING: usize = 2;
/// Writes of a failed batch applied alone at once (each on a connection):
/// few, since a batch that timed out may mean the database is overloaded.
const ALONE_AT_ONCE: usize = 2;

const BATCH: &str = "SELECT fast_path_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,
                                           $13, $14, $15, $16, $17)";

/// One of the fast path's writes: each reports whether it took effect.
#[derive(Debug)]
pub(super) enum Write {
    Hold(Hold),
    Capture(Capture),
    /// End an open hold without charging.
    Release {
        hold_id: String,
        at: i64,
    },
}

struct Pending {
    write: Write,
    applied: oneshot::Sender<Result<bool, StoreError>>,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<Pending>,
    running: usize,
}

pub(super) struct Batches {
    pool: PgPool,
    queue: Mutex<Queue>,
    /// The most writes one batch has carried (for tests and debugging).
    largest: AtomicUsize,
}

impl Batches {
    pub fn new(pool: PgPool) -> Arc<Self> {
        Arc::new(Self {
            pool,
            queue: Mutex::default(),
            largest: AtomicUsize::new(0),
        })
    }

    /// Applies `write` in the next batch; true if it changed its row.
    pub async fn apply(self: &Arc<Self>, write: Write) -> Result<bool, StoreError> {
        let (applied, outcome) = oneshot::channel();
        let start = {
            let mut queue = self.queue();
            queue.waiting.push(Pending { write, applied });
            let start = queue.running < MAX_RUNNING;
            queue.running += usize::from(start);
            start
        };
        if start {
            tokio::spawn(self.clone().run());
        }
        outcome.await.map_err(|_| {
            StoreError::Unavailable(sqlx::Error::Protocol(
                "the fast-path batch carrying this write stopped".into(),
            ))
        })?
    }

    #[cfg(test)]
    fn largest_batch(&self) -> usize {
        self.largest.load(Ordering::Relaxed)
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        // Nothing panics while holding the lock; a poisoned queue is intact.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies batches until no write is waiting.
    async fn run(self: Arc<Self>) {
        let mut running = Running {
            batches: &self,
            stopped: false,
        };
        loop {
            let batch: Vec<Pending> = {
                let mut queue = self.queue();
                if queue.waiting.is_empty() {
                    // Under the lock that `apply` queues under: a write
                    // queued after this sees a free runner slot.
                    queue.running -= 1;
                    running.stopped = true;
                    return;
                }
                let n = queue.waiting.len().min(MAX_BATCH);
                queue.waiting.drain(..n).filter(still_wanted).collect()
            };
            if batch.is_empty() {
                continue;
            }
            self.largest.fetch_max(batch.len(), Ordering::Relaxed);
            self.settle(batch).await;
        }
    }

    async fn settle(&self, batch: Vec<Pending>) {
        let writes: Vec<&Write> = batch.iter().map(|p| &p.write).collect();
        match self.execute(&writes).await {
            Ok(applied) => {
                for (pending, applied) in batch.into_iter().zip(applied) {
                    let _ = pending.applied.send(Ok(applied));
                }
            }
            // A write's own fault (a violated constraint, say) rolls back the
            // whole batch, as does a wait for one row that another transaction
            // keeps locked (a busy wallet): apply each write alone, so that the
            // error reaches only the caller whose write caused it. A few at a
            // time, so that a write stuck behind a lock holds back only itself.
            Err(e) if batch.len() > 1 && (one_writes_fault(&e) || gave_up_waiting(&e)) => {
                tracing::debug!("a fast-path batch failed ({e}); applying its writes one by one");
                futures::stream::iter(batch.into_iter().filter(still_wanted))
                    .for_each_concurrent(ALONE_AT_ONCE, |pending| async move {
                        let alone = self.execute(&[&pending.write]).await;
                        let _ = pending.applied.send(alone.map(|applied| applied[0]));
                    })
                    .await;
            }
            // The database cannot be reached: every caller gets why.
            Err(e) => {
                let why = e.to_string();
                let mut batch = batch.into_iter();
                if let Some(first) = batch.next() {
                    let _ = first.applied.send(Err(e));
                }
                for pending in batch {
                    let _ = pending
                        .applied
                        .send(Err(StoreError::Unavailable(sqlx::Error::Io(
                            std::io::Error::other(why.clone()),
                        ))));
                }
            }
        }
    }

    /// One round trip and one transaction for all of `writes`, retried when
    /// PostgreSQL rolls it back for a conflict with another transaction.
    /// The result has one flag per write, in order.
    async fn execute(&self, writes: &[&Write]) -> Result<Vec<bool>, StoreError> {
        let columns = Columns::of(writes);
        let applied: Vec<bool> = retrying(|| async {
            Ok(sqlx::query_scalar(BATCH)
                .bind(&columns.kinds)
                .bind(&columns.hold_ids)
                .bind(&columns.amounts)
                .bind(&columns.ats)
                .bind(&columns.principals)
                .bind(&columns.currencies)
                .bind(&columns.tools)
                .bind(&columns.args_hashes)
                .bind(&columns.expiries)
                .bind(&columns.day_starts)
                .bind(&columns.month_starts)
                .bind(&columns.agents)
                .bind(&columns.metadatas)
                .bind(&columns.owners)
                .bind(&columns.txn_ids)
                .bind(&columns.beneficiaries)
                .bind(&columns.legs)
                .fetch_one(&self.pool)
                .await?)
        })
        .await?;
        if applied.len() != writes.len() {
            return Err(StoreError::Corrupt(format!(
                "fast_path_batch answered {} of {} writes",
                applied.len(),
                writes.len()
            )));
        }
        Ok(applied)
    }
}

/// Counts a runner in [`Queue::running`] until it stops: if it stops
/// without saying so (its task panicked, or was dropped), the slot is freed
/// all the same, and the next write starts a runner.
struct Running<'a> {
    batches: &'a Batches,
    stopped: bool,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if !self.stopped {
            tracing::error!("a fast-path batch runner stopped mid-batch");
            self.batches.queue().running -= 1;
        }
    }
}

/// A hold whose caller has given up (its client went away) is not made:
/// nobody would run the tool, and the money would stay reserved until the
/// hold expired. A capture or release always runs: it ends a hold.
fn still_wanted(pending: &Pending) -> bool {
    let gone = matches!(pending.write, Write::Hold(_)) && pending.applied.is_closed();
    if gone {
        tracing::debug!("a hold's caller left before its batch; not made");
    }
    !gone
}

/// Whether PostgreSQL refused `e` for what one write holds (bad data, a
/// broken constraint, the function's own refusal), not for the batch as a
/// whole (the connection, a timeout, a conflict with another transaction).
fn one_writes_fault(e: &StoreError) -> bool {
    sql_state(e).is_some_and(|code| ["22", "23", "P0"].iter().any(|c| code.starts_with(c)))
}

/// Whether PostgreSQL gave up on the batch while it waited for a lock: the
/// statement timeout (57014), a lock not to be had (55P03), or a conflict
/// that [`retrying`] retried to the end (40001, 40P01). One write's row is
/// the likelier culprit than all of them.
fn gave_up_waiting(e: &StoreError) -> bool {
    matches!(
        sql_state(e).as_deref(),
        Some("57014" | "55P03" | "40001" | "40P01")
    )
}

/// A batch as `fast_path_batch` takes it: one array per field, one element
/// per write (NULL where a field is not the write's).
#[derive(Default)]
struct Columns<'a> {
    kinds: Vec<&'static str>,
    hold_ids: Vec<&'a str>,
    amounts: Vec<Option<i64>>,
    ats: Vec<i64>,
    principals: Vec<Option<&'a str>>,
    currencies: Vec<Option<&'a str>>,
    tools: Vec<Option<&'a str>>,
    args_hashes: Vec<Option<&'a str>>,
    expiries: Vec<Option<i64>>,
    day_starts: Vec<Option<i64>>,
    month_starts: Vec<Option<i64>>,
    agents: Vec<Option<&'a str>>,
    metadatas: Vec<Option<&'a str>>,
    owners: Vec<Option<&'a str>>,
    txn_ids: Vec<Option<&'a str>>,
    beneficiaries: Vec<Option<i64>>,
    legs: Vec<Option<&'a str>>,
}

impl<'a> Columns<'a> {
    fn of(writes: &[&'a Write]) -> Self {
        let mut columns = Self::default();
        for write in writes {
            columns.push(write);
        }
        columns
    }

    fn push(&mut self, write: &'a Write) {
        let (kind, hold_id, amount, at) = match write {
            Write::Hold(hold) => ("hold", &hold.id, Some(hold.amount), hold.created_at),
            Write::Capture(capture) => (
                "capture",
                &capture.hold_id,
                Some(capture.amount),
                capture.at,
            ),
            Write::Release { hold_id, at } => ("release", hold_id, None, *at),
        };
        self.kinds.push(kind);
        self.hold_ids.push(hold_id);
        self.amounts.push(amount);
        self.ats.push(at);
        let hold = match write {
            Write::Hold(hold) => Some(hold),
            _ => None,
        };
        self.principals.push(hold.map(|h| h.principal.as_str()));
        self.currencies.push(hold.map(|h| h.currency.as_str()));
        self.tools.push(hold.map(|h| h.tool.as_str()));
        self.args_hashes.push(hold.map(|h| h.args_hash.as_str()));
        self.expiries.push(hold.map(|h| h.expires_at));
        // The caps' windows: the day and the month the hold is made in.
        self.day_starts.push(hold.map(|h| day_start(h.created_at)));
        self.month_starts
            .push(hold.map(|h| month_start(h.created_at)));
        self.agents.push(hold.and_then(|h| h.agent.as_deref()));
        self.metadatas
            .push(hold.and_then(|h| h.metadata.as_deref()));
        self.owners.push(hold.map(|h| h.owner.as_str()));
        let capture = match write {
            Write::Capture(capture) => Some(capture),
            _ => None,
        };
        self.txn_ids.push(capture.map(|c| c.txn_id.as_str()));
        self.beneficiaries.push(capture.map(|c| c.beneficiary_id));
        self.legs.push(capture.map(|c| c.legs.as_str()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::PoolSettings,
        money::Units,
        store::{
            AccountKind, AccountRef, Charge, HoldOutcome, Store, now_ms,
            postgres::PgStore,
            tests::{assert_sound, available, hold_request, revenue, units, usd},
        },
        testing::TestDb,
    };

    /// A fresh PostgreSQL database whose wallet `w` holds `funds`.
    async fn funded(funds: &str) -> (TestDb, tempfile::TempDir, PgStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = TestDb::fresh(dir.path());
        let store = PgStore::connect(&db.url, &PoolSettings::default())
            .await
            .expect("connect");
        store
            .topup(&AccountRef::wallet("w", &usd()), units(funds), None)
            .await
            .expect("topup");
        (db, dir, store)
    }

    fn hold(id: &str, amount: &str) -> Write {
        Write::Hold(Hold::new(&hold_request(id, "w", amount), "test"))
    }

    async fn capture(store: &PgStore, id: &str, amount: &str) -> Capture {
        let plan = store
            .db
            .capture_plan(&Charge::whole(revenue(), units(amount)))
            .await
            .expect("plan");
        Capture::new(id, &plan)
    }

    fn release(id: &str) -> Write {
        Write::Release {
            hold_id: id.into(),
            at: now_ms(),
        }
    }

    /// Runs `writes` as one batch, as `run` would; each one's outcome.
    async fn as_one_batch(store: &PgStore, writes: Vec<Write>) -> Vec<Result<bool, StoreError>> {
        let (batch, outcomes): (Vec<_>, Vec<_>) = writes
            .into_iter()
            .map(|write| {
                let (applied, outcome) = oneshot::channel();
                (Pending { write, applied }, outcome)
            })
            .unzip();
        store.fast_path.settle(batch).await;
        let mut results = Vec::new();
        for outcome in outcomes {
            results.push(outcome.await.expect("every write is answered"));
        }
        results
    }

    fn flags(results: Vec<Result<bool, StoreError>>) -> Vec<bool> {
        results
            .into_iter()
            .map(|r| r.expect("applied or refused, not failed"))
            .collect()
    }

    #[test]
    fn a_hold_whose_caller_left_is_not_made_but_a_capture_or_release_still_is() {
        let pending = |write: Write| {
            let (applied, outcome) = oneshot::channel();
            drop(outcome);
            Pending { write, applied }
        };
        assert!(!still_wanted(&pending(hold("h1", "0.01"))));
        assert!(still_wanted(&pending(release("h1"))));
        let capture = Capture {
            hold_id: "h1".into(),
            amount: 1,
            at: now_ms(),
            txn_id: "t1".into(),
            beneficiary_id: 1,
            legs: "[]".into(),
        };
        assert!(still_wanted(&pending(Write::Capture(capture))));
        let (applied, _waiting) = oneshot::channel();
        assert!(still_wanted(&Pending {
            write: hold("h2", "0.01"),
            applied
        }));
    }

    crate::on_postgres! {
        #[tokio::test]
        async fn a_batch_applies_its_writes_in_order() {
            let (_db, _dir, store) = funded("0.03").await;
            // Five holds of 0.01 on 0.03: the first three reserve it all. Then
            // h1 is captured, h2 released, and h1 cannot be released after its
            // capture; the money h2 gave back lets h6 reserve.
            let writes = vec![
                hold("h1", "0.01"),
                hold("h2", "0.01"),
                hold("h3", "0.01"),
                hold("h4", "0.01"),
                hold("h5", "0.01"),
                Write::Capture(capture(&store, "h1", "0.01").await),
                release("h2"),
                release("h1"),
                hold("h6", "0.01"),
            ];
            let applied = flags(as_one_batch(&store, writes).await);
            assert_eq!(
                applied,
                [true, true, true, false, false, true, true, false, true]
            );
            assert_eq!(available(&store, "w").await, units("0.00"));
            assert_eq!(
                store
                    .statement(AccountKind::Wallet, "w")
                    .await
                    .expect("statement")
                    .len(),
                2,
                "the top-up and h1's capture"
            );
            assert_sound(&store).await;
        }

        #[tokio::test]
        async fn a_failing_write_fails_alone_and_the_rest_of_its_batch_lands() {
            let (_db, _dir, store) = funded("1.00").await;
            assert!(flags(as_one_batch(&store, vec![hold("h1", "0.10")]).await)[0]);
            // A capture naming a beneficiary account that does not exist breaks
            // a foreign key, which rolls back the whole batch statement.
            let mut broken = capture(&store, "h1", "0.10").await;
            broken.beneficiary_id = 987_654;
            let results = as_one_batch(
                &store,
                vec![
                    hold("h2", "0.10"),
                    Write::Capture(broken),
                    hold("h3", "0.10"),
                ],
            )
            .await;
            assert!(matches!(results[0], Ok(true)), "{:?}", results[0]);
            assert!(
                matches!(
                    &results[1],
                    Err(StoreError::Unavailable(sqlx::Error::Database(_)))
                ),
                "{:?}",
                results[1]
            );
            assert!(matches!(results[2], Ok(true)), "{:?}", results[2]);
            // h1 is still open, and h2 and h3 reserved: 0.30 held of 1.00.
            assert_eq!(available(&store, "w").await, units("0.70"));
            // h1 is still open: releasing it now gives its 0.10 back.
            assert_eq!(flags(as_one_batch(&store, vec![release("h1")]).await), [true]);
            assert_eq!(available(&store, "w").await, units("0.80"));
            assert_sound(&store).await;
        }

        #[tokio::test]
        async fn a_failed_batch_applied_one_by_one_skips_holds_whose_callers_left() {
            let (_db, _dir, store) = funded("1.00").await;
            assert!(flags(as_one_batch(&store, vec![hold("h1", "0.10")]).await)[0]);
            let mut broken = capture(&store, "h1", "0.10").await;
            broken.beneficiary_id = 987_654;
            let (applied, gone) = oneshot::channel();
            drop(gone);
            let left = Pending {
                write: hold("h2", "0.10"),
                applied,
            };
            let (applied, broken_outcome) = oneshot::channel();
            let broken = Pending {
                write: Write::Capture(broken),
                applied,
            };
            let (applied, kept) = oneshot::channel();
            let wanted = Pending {
                write: hold("h3", "0.10"),
                applied,
            };
            store.fast_path.settle(vec![left, broken, wanted]).await;
            assert!(broken_outcome.await.expect("answered").is_err());
            assert!(matches!(kept.await.expect("answered"), Ok(true)));
            // h1 and h3 reserved; h2, whose caller left, was not made.
            assert_eq!(available(&store, "w").await, units("0.80"));
            assert_sound(&store).await;
        }

        #[tokio::test]
        async fn a_wallet_locked_elsewhere_fails_only_its_own_write() {
            let dir = tempfile::tempdir().expect("tempdir");
            let db = TestDb::fresh(dir.path());
            let settings = PoolSettings {
                statement_timeout: std::time::Duration::from_millis(500),
                ..PoolSettings::default()
            };
            let store = PgStore::connect(&db.url, &settings).await.expect("connect");
            for wallet in ["w", "x"] {
                store
                    .topup(&AccountRef::wallet(wallet, &usd()), units("1.00"), None)
                    .await
                    .expect("topup");
            }
            // Another transaction keeps wallet x locked past the statement
            // timeout: the batch, which locks every wallet it touches, gives up.
            let mut blocker = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url).await.expect("connect");
            sqlx::query("BEGIN").execute(&mut blocker).await.expect("begin");
            sqlx::query("SELECT 1 FROM accounts WHERE kind = 'wallet' AND name = 'x' FOR UPDATE")
                .execute(&mut blocker)
                .await
                .expect("lock x");
            let on_x = Write::Hold(Hold::new(&hold_request("hx", "x", "0.10"), "test"));
            let results =
                as_one_batch(&store, vec![hold("h1", "0.10"), on_x, hold("h2", "0.10")]).await;
            assert!(matches!(results[0], Ok(true)), "{:?}", results[0]);
            assert!(results[1].is_err(), "x is locked: {:?}", results[1]);
            assert!(matches!(results[2], Ok(true)), "{:?}", results[2]);
            sqlx::query("ROLLBACK").execute(&mut blocker).await.expect("rollback");
            assert_eq!(available(&store, "w").await, units("0.80"));
            assert_eq!(available(&store, "x").await, units("1.00"), "nothing reserved on x");
            assert_sound(&store).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn batches_on_many_wallets_and_the_sweeps_end_every_hold_once() {
            let (_db, _dir, store) = funded("0.10").await;
            let wallets = ["w", "x", "y", "z"];
            for wallet in &wallets[1..] {
                store
                    .topup(&AccountRef::wallet(*wallet, &usd()), units("0.10"), None)
                    .await
                    .expect("topup");
            }
            // This instance is alive: the orphan sweep must leave its holds.
            store
                .heartbeat(now_ms(), now_ms() + 60_000)
                .await
                .expect("heartbeat");
            let store = Arc::new(store);
            // Holds already past their expiry, for the sweeps to end while
            // the batches run.
            for (i, wallet) in wallets.iter().enumerate() {
                let mut request = hold_request(&format!("old{i}"), wallet, "0.02");
                request.expires_at = now_ms() - 1;
                assert_eq!(store.hold(&request).await.expect("hold"), HoldOutcome::Held);
            }
            // 64 calls on each wallet: a hold of 0.01, then a capture (even
            // calls) or a release (odd ones). Each wallet covers 8 at a time.
            let calls: Vec<_> = (0..256)
                .map(|i| {
                    let store = store.clone();
                    tokio::spawn(async move {
                        let id = format!("h{i}");
                        let request = hold_request(&id, wallets[i % 4], "0.01");
                        if store.hold(&request).await? != HoldOutcome::Held {
                            return Ok::<_, StoreError>(0);
                        }
                        if i % 8 < 4 {
                            store
                                .capture(&id, &Charge::whole(revenue(), units("0.01")))
                                .await?;
                            Ok(1)
                        } else {
                            store.release(&id).await?;
                            Ok(0)
                        }
                    })
                })
                .collect();
            let sweeps = {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut expired = 0;
                    for _ in 0..20 {
                        expired += store.sweep_expired(now_ms()).await?;
                        store.release_orphaned_holds(now_ms()).await?;
                    }
                    Ok::<_, StoreError>(expired)
                })
            };
            let mut captured = [0; 4];
            for (i, call) in calls.into_iter().enumerate() {
                captured[i % 4] += call.await.expect("task").expect("call");
            }
            let expired = sweeps.await.expect("task").expect("sweeps")
                + store.sweep_expired(now_ms()).await.expect("sweep");
            assert_eq!(expired, 4, "each old hold expired once");
            for (wallet, captured) in wallets.iter().zip(captured) {
                assert!(captured > 0, "{wallet}: no call was charged");
                let left = units("0.10").0 - captured * units("0.01").0;
                assert_eq!(available(&*store, wallet).await, Units(left), "{wallet}");
            }
            assert!(store.fast_path.largest_batch() > 1);
            assert_sound(&*store).await;
        }

        #[tokio::test]
        async fn concurrent_holds_share_batches_and_reserve_exactly_what_the_wallet_covers() {
            let (_db, _dir, store) = funded("0.20").await;
            let store = Arc::new(store);
            let holds: Vec<_> = (0..64)
                .map(|i| {
                    let store = store.clone();
                    tokio::spawn(
                        async move { store.fast_path.apply(hold(&format!("h{i}"), "0.01")).await },
                    )
                })
                .collect();
            let mut reserved = 0;
            for hold in holds {
                reserved += usize::from(hold.await.expect("task").expect("applied or refused"));
            }
            assert_eq!(reserved, 20);
            assert_eq!(available(&*store, "w").await, units("0.00"));
            assert!(
                store.fast_path.largest_batch() > 1,
                "64 writes at once went one at a time"
            );
            assert_sound(&*store).await;
        }

        #[tokio::test]
        async fn a_database_that_cannot_be_reached_fails_every_write_of_the_batch() {
            let (_db, _dir, store) = funded("1.00").await;
            store.db.pool.close().await;
            let results = as_one_batch(&store, vec![hold("h1", "0.10"), hold("h2", "0.10")]).await;
            for result in results {
                assert!(
                    matches!(result, Err(StoreError::Unavailable(_))),
                    "{result:?}"
                );
            }
        }
    }
}
