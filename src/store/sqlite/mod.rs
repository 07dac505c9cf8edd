//! SQLite backend. WAL mode; every multi-statement write transaction starts
//! with `BEGIN IMMEDIATE` so that two writers never both read and then fail
//! to upgrade (SQLITE_BUSY). A write that is one statement runs on its own:
//! it is atomic, and takes the write lock when it starts, so it cannot fail
//! to upgrade either. Several processes may open the same file.
//!
//! The calls' own reads and writes (the fast path's holds and captures; the
//! slow path's intents, sessions and settlements) skip sqlx: they run on
//! rusqlite connections in the calling thread (`in_thread`), the writes in
//! the writer's group commits (`fast_writes`). What is left on the pool is
//! the rest: top-ups, refunds, statements, sweeps, the CLI.

use std::{str::FromStr, time::Duration};

use async_trait::async_trait;
use sqlx::{
    Sqlite, Transaction,
    migrate::MigrateError,
    sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
    },
};

mod fast_writes;
mod in_thread;

use fast_writes::{BUSY_TIMEOUT, FastWrite, FastWriter};
use in_thread::{Readers, ready};

use super::{
    fast_path::{Capture, Hold},
    portable::{PaymentLocks, Portable, Tx, entries_upto, refused_hold},
    posting::{TxnHeader, clearing, dev_settlement, topup_audit, topups},
    sql::*,
    *,
};
use crate::{config::Synchronous, keys::ApiKey};

pub struct SqliteStore {
    db: Portable<Sqlite>,
    /// The fast path's writes (hold, capture, release) go through one
    /// connection of their own, with group commit
    /// (see `fast_writes`). SQLite serialises writers anyway. So do the
    /// slow path's, as operations of their own.
    fast_writes: FastWriter,
    /// The slow path's reads, in the calling thread (see `in_thread`).
    readers: Readers,
}

impl SqliteStore {
    /// Opens (creating if needed) the database and applies migrations.
    pub async fn connect(url: &str, synchronous: Synchronous) -> Result<Self, StoreError> {
        // The writer's and readers' rusqlite connections cannot share the
        // pool's in-memory database: they would open one of their own (or
        // a file named after it) and find no tables.
        if Self::in_memory(url) {
            return Err(StoreError::InMemory(url.to_owned()));
        }
        let options = Self::options(url, synchronous)?;
        retrying_contention(|| Self::open(&options, synchronous)).await
    }

    fn options(url: &str, synchronous: Synchronous) -> Result<SqliteConnectOptions, StoreError> {
        Ok(SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match synchronous {
                Synchronous::Full => SqliteSynchronous::Full,
                Synchronous::Normal => SqliteSynchronous::Normal,
            })
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true))
    }

    /// Whether a SQLite URL names an in-memory database, read as sqlx reads
    /// it: `sqlite::memory:`, `sqlite://:memory:`, or `mode=memory`.
    pub fn in_memory(url: &str) -> bool {
        let rest = url
            .trim_start_matches("sqlite://")
            .trim_start_matches("sqlite:");
        let (database, params) = rest.split_once('?').unwrap_or((rest, ""));
        // `file::memory:` is SQLite's own URI for one.
        database == ":memory:"
            || database.starts_with("file::memory:")
            || params.split('&').any(|param| param == "mode=memory")
    }

    async fn open(
        options: &SqliteConnectOptions,
        synchronous: Synchronous,
    ) -> Result<Self, StoreError> {
        refuse_another_programs(options.get_filename()).await?;
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .min_connections(1)
            // A local file needs no ping before every use.
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await?;
        let fast_writes = FastWriter::open(options.get_filename(), synchronous)?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        let readers = Readers::open(options.get_filename())?;
        Ok(Self {
            db: Portable::new(pool),
            fast_writes,
            readers,
        })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.db.pool
    }

    async fn write_tx(&self) -> Result<Transaction<'_, Sqlite>, StoreError> {
        Ok(self.db.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// An intent paid to a remote provider (`account`): the money enters
    /// the ledger as the intent is claimed for `runner`, or only marked
    /// paid (no runner), in one transaction.
    async fn claim_externally(
        &self,
        id: &str,
        account: &str,
        runner: Option<&str>,
    ) -> Result<bool, StoreError> {
        let claim = self.db.external_claim(id, account).await?;
        Portable::<Sqlite>::claim_paid_externally(self.write_tx().await?, &claim, runner).await
    }

    /// One shared statement as an operation of the writer (see
    /// `FastWriter::transaction`), built from `data`, which the operation
    /// owns; how many rows it changed.
    async fn write_statement<D: Send + 'static>(
        &self,
        data: D,
        statement: impl for<'d> Fn(&'d D) -> Statement<'d> + Send + 'static,
    ) -> Result<u64, StoreError> {
        self.fast_writes
            .transaction(move |mut tx| ready(tx.execute(statement(&data))))
            .await
    }
}

/// A read's answer: in-thread if it ran there, else through the pool.
async fn read<T>(
    in_thread: Option<Result<T, StoreError>>,
    pool: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    match in_thread {
        Some(answer) => answer,
        None => pool.await,
    }
}

/// Runs `open` until it succeeds, fails for another reason than contention,
/// or has been retried five times.
///
/// Processes opening one new file at once get in each other's way: one finds
/// it locked while another turns on WAL (SQLite answers that at once, without
/// waiting), or finds the tables another is creating (SQLite migrations take
/// no cross-process lock). The loser waits a little and tries again, and then
/// sees the winner's work.
async fn retrying_contention<T, F>(mut open: impl FnMut() -> F) -> Result<T, StoreError>
where
    F: Future<Output = Result<T, StoreError>>,
{
    let mut attempt = 0;
    loop {
        match open().await {
            Err(e) if attempt < 5 && start_up_contention(&e) => {
                attempt += 1;
                tracing::debug!("opening the store failed ({e}); attempt {attempt}, retrying");
                tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
            }
            opened => return opened,
        }
    }
}

/// Whether opening the store failed because another process was opening it
/// too: the file locked, or a migration meeting the other's work. Any other
/// migration error (one edited after it was applied, say) will not go away.
fn start_up_contention(e: &StoreError) -> bool {
    match e {
        StoreError::Unavailable(e) => busy(e),
        StoreError::Migrate(MigrateError::Execute(e) | MigrateError::ExecuteMigration(e, _)) => {
            busy(e) || applied_by_another(e)
        }
        _ => false,
    }
}

/// SQLITE_BUSY or SQLITE_LOCKED, whatever the extended code.
fn busy(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db
            .code()
            .and_then(|code| code.parse::<i32>().ok())
            .is_some_and(|code| matches!(code & 0xff, 5 | 6)),
        _ => false,
    }
}

/// What a migration meets when another process applied it in the meantime:
/// its tables, indexes, triggers or columns already there (the migrations
/// create them without `IF NOT EXISTS`), or its version already recorded
/// (one that only changes rows runs twice without complaint).
fn applied_by_another(e: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = e else {
        return false;
    };
    let message = db.message();
    message.contains("already exists")
        || message.starts_with("duplicate column name")
        || message.contains("UNIQUE constraint failed: _sqlx_migrations.version")
}

/// The IMMEDIATE transaction a session payment runs in holds the write
/// lock: plain reads see what nothing can change before it commits.
const PAYMENT_LOCKS: PaymentLocks = PaymentLocks {
    session: "SELECT status, expires_at FROM payment_sessions WHERE id = $1",
    intent:
        "SELECT status, tool, agent, metadata, approval, approved_by, approved_at, approval_rule
             FROM intents WHERE id = $1",
    wallet: wallet_with_limits!("WHERE id = $1"),
};

/// A database file another program keeps (it has tables, none of them
/// tollgate's) is refused before anything is written to it: WAL mode and
/// the migrations would both change it, even for a command that only
/// reads. A new or empty file, or one of tollgate's (its ledger is made by
/// the first migration), goes on. sqlx's own table does not make a file
/// tollgate's: another program may keep its migrations there too.
async fn refuse_another_programs(path: &std::path::Path) -> Result<(), StoreError> {
    if !path.exists() {
        return Ok(());
    }
    use sqlx::{ConnectOptions, Connection};
    // A plain connection: it sets no journal mode, and only reads.
    let mut conn = SqliteConnectOptions::new()
        .filename(path)
        .busy_timeout(BUSY_TIMEOUT)
        .connect()
        .await?;
    let (tables, ledgers): (i64, i64) = sqlx::query_as(
        "SELECT coalesce(sum(name <> '_sqlx_migrations'), 0), coalesce(sum(name = 'ledger_entries'), 0)
         FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
    )
    .fetch_one(&mut conn)
    .await?;
    conn.close().await?;
    if tables > 0 && ledgers == 0 {
        return Err(StoreError::AnotherPrograms(path.display().to_string()));
    }
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    async fn topup_with_key(
        &self,
        wallet: &AccountRef,
        amount: Units,
        memo: Option<String>,
        idempotency_key: Option<&str>,
    ) -> Result<ToppedUp, StoreError> {
        if amount.is_zero() {
            return Err(StoreError::Invalid(
                "top-up amount must be above zero".into(),
            ));
        }
        let wallet_id = self.db.account_id(wallet).await?;
        let source_id = self.db.account_id(&topups(&wallet.currency)).await?;
        let audit = topup_audit(wallet, memo);
        let header = TxnHeader {
            id: idempotency_key.map_or_else(new_txn_id, topup_txn_id),
            kind: "topup",
            currency: &wallet.currency,
            amount,
            audit: &audit,
            at: now_ms(),
            legs: None,
        };
        let once = idempotency_key.is_some();
        Portable::<Sqlite>::topup(self.write_tx().await?, wallet_id, source_id, header, once).await
    }

    async fn balances(&self, wallet: &str) -> Result<Vec<WalletBalance>, StoreError> {
        self.db.balances(wallet).await
    }

    async fn statement(
        &self,
        kind: AccountKind,
        name: &str,
    ) -> Result<Vec<StatementLine>, StoreError> {
        self.db.statement(kind, name).await
    }

    async fn tool_statement(&self, tool: &str) -> Result<Vec<StatementLine>, StoreError> {
        self.db.tool_statement(tool).await
    }

    async fn entries_page(
        &self,
        account: Option<(AccountKind, &str)>,
        after: i64,
        upto: i64,
        limit: i64,
    ) -> Result<Vec<(i64, StatementLine)>, StoreError> {
        self.db.entries_page(account, after, upto, limit).await
    }

    async fn entries_settled_upto(&self) -> Result<i64, StoreError> {
        // One writer at a time, and ids drawn in commit order: the highest
        // committed id will do.
        entries_upto(&mut self.db.pool.begin().await?).await
    }

    async fn open_intents(
        &self,
        principal: Option<&str>,
        session_id: &str,
        now: i64,
    ) -> Result<OpenIntents, StoreError> {
        let in_thread = self.readers.optional(
            statement!(sql::OPEN_INTENTS, Param::Text(principal), session_id, now),
            rows::open_intents,
        );
        read(
            in_thread.map(|n| n.map(Option::unwrap_or_default)),
            self.db.open_intents(principal, session_id, now),
        )
        .await
    }

    async fn approvals(&self, principal: &str) -> Result<Vec<Intent>, StoreError> {
        self.db.approvals(principal).await
    }

    async fn set_limits(&self, wallet: &AccountRef, limits: &Limits) -> Result<(), StoreError> {
        self.db.set_limits(wallet, limits).await
    }

    async fn limits(&self, wallet: &str) -> Result<Vec<WalletLimits>, StoreError> {
        let in_thread = self
            .readers
            .all(statement!(sql::LIMITS, wallet), rows::limits);
        read(in_thread, self.db.limits(wallet)).await
    }

    async fn decide_approval(
        &self,
        id: &str,
        decision: ApprovalStatus,
        by: &str,
    ) -> Result<bool, StoreError> {
        self.db.decide_approval(id, decision, by).await
    }

    async fn hold(&self, req: &HoldRequest) -> Result<HoldOutcome, StoreError> {
        if req.amount.is_zero() {
            return Err(StoreError::Invalid("hold amount must be above zero".into()));
        }
        // One conditional INSERT: the balance and limit checks and the
        // reservation (by the `holds_reserve` trigger, which also counts it
        // against the caps) happen atomically under the write lock.
        let hold = Hold::new(req, &self.db.instance);
        let created_at = hold.created_at;
        let held = self.fast_writes.write(FastWrite::Hold(hold)).await?;
        if held {
            return Ok(HoldOutcome::Held);
        }
        let limits = self.limits(&req.principal).await?;
        Ok(refused_hold(req, limits, created_at))
    }

    async fn capture(&self, hold_id: &str, charge: &Charge) -> Result<Posted, StoreError> {
        let plan = self.db.capture_plan(charge).await?;
        // One conditional UPDATE; the `holds_capture` trigger gives the
        // reservation back and posts the ledger transaction, all or nothing.
        let capture = Capture::new(hold_id, &plan);
        let posted = capture.posted();
        if self.fast_writes.write(FastWrite::Capture(capture)).await? {
            return Ok(posted);
        }
        self.db.refused_capture(hold_id, &plan).await
    }

    async fn release(&self, hold_id: &str) -> Result<(), StoreError> {
        // `holds_end` gives the reservation back.
        let released = self
            .fast_writes
            .write(FastWrite::Release {
                hold_id: hold_id.to_owned(),
                at: now_ms(),
            })
            .await?;
        if released {
            Ok(())
        } else {
            Err(self.db.hold_not_open(hold_id).await?)
        }
    }

    async fn refund(&self, request: &RefundRequest) -> Result<Refunded, StoreError> {
        // The IMMEDIATE transaction holds the write lock: no other refund
        // of the payment commits meanwhile.
        Portable::<Sqlite>::refund(
            self.write_tx().await?,
            "SELECT amount, currency, payer, tool FROM ledger_transactions WHERE id = $1",
            request,
        )
        .await
    }

    async fn sweep_expired(&self, now: i64) -> Result<u64, StoreError> {
        // The write lock is taken up front: one sweeper at a time.
        let mut tx = self.write_tx().await?;
        // `holds_end` gives each expired reservation back.
        let holds: Vec<Swept> = sqlx::query_as(
            "UPDATE holds SET status = 'expired', settled_at = $1 WHERE status = 'open' AND expires_at < $1
             RETURNING id, tool, principal",
        )
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        let intents: Vec<Swept> = sqlx::query_as(concat!(
            "UPDATE intents SET status = 'expired', updated_at = $1
             WHERE status = 'awaiting_payment' AND expires_at < $1 AND NOT ",
            session_paid!("intents"),
            " AND ",
            paid_here!("intents"),
            " RETURNING id, tool, principal"
        ))
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE payment_sessions SET status = 'expired', updated_at = $1 WHERE status = 'pending' AND expires_at < $1",
        )
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        log_swept(&holds, &intents);
        Ok(holds.len() as u64)
    }

    async fn verify(&self, now: i64) -> Result<VerifyReport, StoreError> {
        // One read transaction, so every check sees the same snapshot.
        let mut tx = self.db.pool.begin().await?;
        let report = Portable::<Sqlite>::verify(&mut tx, now).await?;
        tx.rollback().await?;
        Ok(report)
    }

    async fn create_intent(&self, intent: &Intent, limit: &OpenLimit) -> Result<bool, StoreError> {
        // The writer runs one write at a time: the counts and the insert,
        // one statement, cannot interleave with another intent's.
        let limit = *limit;
        let opened = self
            .write_statement(intent.clone(), move |intent| {
                Statement::create_intent(intent, &limit)
            })
            .await?;
        Ok(opened == 1)
    }

    async fn intent(&self, id: &str) -> Result<Option<Intent>, StoreError> {
        let in_thread = self
            .readers
            .optional(statement!(sql::INTENT, id), rows::intent);
        read(in_thread, self.db.intent(id)).await
    }

    async fn transition_intent(
        &self,
        id: &str,
        from: IntentStatus,
        to: IntentStatus,
    ) -> Result<bool, StoreError> {
        let data = (id.to_owned(), self.db.instance.clone(), now_ms());
        let changed = self
            .write_statement(data, move |(id, instance, now)| {
                Statement::transition_intent(id, from, to, *now, instance)
            })
            .await?;
        Ok(changed > 0)
    }

    async fn end_unpaid_intent(&self, id: &str, to: IntentStatus) -> Result<bool, StoreError> {
        let data = (id.to_owned(), now_ms());
        let changed = self
            .write_statement(data, move |(id, now)| {
                statement!(END_UNPAID_INTENT, id, to.as_str(), *now)
            })
            .await?;
        Ok(changed > 0)
    }

    async fn claim_paid_intent(&self, id: &str, funding: &Funding) -> Result<bool, StoreError> {
        let account = match funding {
            Funding::InClearing { refund_to } => {
                let refund_id = match refund_to {
                    Some(account) => Some(self.db.account_id(account).await?),
                    None => None,
                };
                let data = (
                    id.to_owned(),
                    now_ms(),
                    funding.approver().to_owned(),
                    self.db.instance.clone(),
                );
                let changed = self
                    .write_statement(data, move |(id, now, approver, instance)| {
                        statement!(CLAIM_PAID, id, refund_id, *now, approver, instance)
                    })
                    .await?;
                return Ok(changed > 0);
            }
            Funding::External { account } => account,
        };
        self.claim_externally(id, account, Some(&self.db.instance))
            .await
    }

    async fn mark_paid_externally(&self, id: &str, account: &str) -> Result<bool, StoreError> {
        self.claim_externally(id, account, None).await
    }

    async fn finish_intent(&self, outcome: &IntentOutcome) -> Result<Option<Posted>, StoreError> {
        let clearing_id = self
            .db
            .account_id(&clearing(&outcome.charge.beneficiary.currency))
            .await?;
        let plan = self.db.settlement_plan(outcome).await?;
        let outcome = outcome.clone();
        self.fast_writes
            .transaction(move |tx| {
                ready(Portable::<Sqlite>::finish(
                    tx,
                    &outcome,
                    clearing_id,
                    plan.as_ref(),
                ))
            })
            .await
    }

    async fn stored_result(&self, intent_id: &str) -> Result<Option<StoredResult>, StoreError> {
        let in_thread = self.readers.optional(
            statement!(sql::STORED_RESULT, intent_id),
            rows::stored_result,
        );
        read(in_thread, self.db.stored_result(intent_id)).await
    }

    async fn refunded(&self, payment_id: &str) -> Result<Units, StoreError> {
        self.db.refunded(payment_id).await
    }

    async fn hold_record(&self, id: &str) -> Result<Option<HoldRecord>, StoreError> {
        self.db.hold_record(id).await
    }

    async fn payment_lines(&self, payment_id: &str) -> Result<Vec<StatementLine>, StoreError> {
        self.db.payment_lines(payment_id).await
    }

    async fn create_session(&self, session: &LocalSession) -> Result<(), StoreError> {
        self.write_statement(session.clone(), |session| {
            Statement::create_session(session)
        })
        .await?;
        Ok(())
    }

    async fn session(&self, id: &str) -> Result<Option<LocalSession>, StoreError> {
        let in_thread = self
            .readers
            .optional(statement!(sql::SESSION, id), rows::session);
        read(in_thread, self.db.session(id)).await
    }

    async fn list_sessions(&self, limit: i64) -> Result<Vec<LocalSession>, StoreError> {
        self.db.list_sessions(limit).await
    }

    async fn pay_session(
        &self,
        id: &str,
        from_wallet: Option<&str>,
        now: i64,
    ) -> Result<Posted, StoreError> {
        let Some(session) = self.session(id).await? else {
            return Err(StoreError::NotFound(format!("payment session {id}")));
        };
        let source_id = match from_wallet {
            Some(wallet) => {
                (self.db)
                    .existing_account_id(&AccountRef::wallet(wallet, &session.currency))
                    .await?
            }
            None => Some(
                self.db
                    .account_id(&dev_settlement(&session.currency))
                    .await?,
            ),
        };
        let clearing_id = self.db.account_id(&clearing(&session.currency)).await?;
        let from_wallet = from_wallet.map(str::to_owned);
        self.fast_writes
            .transaction(move |tx| {
                ready(Portable::<Sqlite>::pay_session(
                    tx,
                    &PAYMENT_LOCKS,
                    &session,
                    from_wallet.as_deref(),
                    source_id,
                    clearing_id,
                    now,
                ))
            })
            .await
    }

    async fn end_session(&self, id: &str, to: SessionStatus) -> Result<bool, StoreError> {
        check_session_ending(to)?;
        let changed = self
            .write_statement((id.to_owned(), now_ms()), move |(id, now)| {
                Statement::end_session(id, to, *now)
            })
            .await?;
        Ok(changed > 0)
    }

    async fn create_api_key(&self, key: &ApiKey) -> Result<(), StoreError> {
        self.db.create_api_key(key).await
    }

    async fn api_key(&self, id: &str) -> Result<Option<ApiKey>, StoreError> {
        // Every HTTP request reads its key: in-thread, it costs no hand-off
        // to sqlx's worker thread.
        let in_thread = self
            .readers
            .optional(statement!(sql::API_KEY, id), rows::api_key);
        read(in_thread, self.db.api_key(id)).await
    }

    async fn api_keys(&self) -> Result<Vec<ApiKey>, StoreError> {
        self.db.api_keys().await
    }

    async fn revoke_api_key(&self, id: &str, now: i64) -> Result<bool, StoreError> {
        self.db.revoke_api_key(id, now).await
    }

    async fn heartbeat(&self, now: i64, alive_until: i64) -> Result<(), StoreError> {
        self.db.heartbeat(now, alive_until).await
    }

    async fn release_orphaned_holds(&self, now: i64) -> Result<u64, StoreError> {
        self.db.release_orphaned_holds(now).await
    }

    async fn interrupted_runs(&self, now: i64) -> Result<Vec<Intent>, StoreError> {
        self.db.interrupted_runs(now).await
    }

    async fn own_stale_runs(&self, before: i64) -> Result<Vec<Intent>, StoreError> {
        self.db.own_stale_runs(before).await
    }

    async fn remote_due(&self, now: i64, after: &Cursor) -> Result<Vec<Intent>, StoreError> {
        self.db.remote_due(now, after).await
    }

    async fn unredeemed(&self, before: i64, after: &Cursor) -> Result<Vec<Intent>, StoreError> {
        self.db.unredeemed(before, after).await
    }

    async fn prune(&self, before: i64) -> Result<Pruned, StoreError> {
        self.db.prune(before).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.db.ping().await
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        self.db.stats().await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn url(dir: &tempfile::TempDir) -> String {
        format!("sqlite://{}", dir.path().join("t.db").display())
    }

    /// A migration edited after it was applied fails the start at once,
    /// saying so: it is no other process's doing, and will not go away.
    #[tokio::test]
    async fn a_migration_changed_since_it_was_applied_fails_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let url = url(&dir);
        let store = SqliteStore::connect(&url, Synchronous::Normal)
            .await
            .unwrap();
        sqlx::query("UPDATE _sqlx_migrations SET checksum = x'00' WHERE version = 1")
            .execute(store.pool())
            .await
            .unwrap();
        drop(store);

        let options = SqliteStore::options(&url, Synchronous::Normal).unwrap();
        let attempts = AtomicUsize::new(0);
        let opened = retrying_contention(|| {
            attempts.fetch_add(1, Ordering::SeqCst);
            SqliteStore::open(&options, Synchronous::Normal)
        })
        .await;
        let error = opened.err().unwrap();
        assert!(
            matches!(error, StoreError::Migrate(MigrateError::VersionMismatch(1))),
            "{error}"
        );
        assert!(
            error
                .to_string()
                .contains("migration 1 was previously applied but has been modified"),
            "{error}"
        );
        assert_eq!(attempts.load(Ordering::SeqCst), 1, "retried");
    }

    /// What another process's migrations leave in the way is retried; a
    /// migration that is wrong in itself is not.
    #[tokio::test]
    async fn only_another_process_s_migrations_are_retried() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::connect(&url(&dir), Synchronous::Normal)
            .await
            .unwrap();
        let failed = |sql: &'static str| async {
            let e = sqlx::query(sql).execute(store.pool()).await.unwrap_err();
            StoreError::Migrate(MigrateError::ExecuteMigration(e, 1))
        };
        for raced in [
            "CREATE TABLE accounts (id INTEGER)",
            "CREATE INDEX ledger_transactions_settlement ON ledger_transactions (intent_id)",
            "ALTER TABLE holds ADD COLUMN legs TEXT",
        ] {
            assert!(start_up_contention(&failed(raced).await), "{raced}");
        }
        let version = sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
             VALUES (1, 'again', TRUE, x'00', -1)",
        )
        .execute(store.pool())
        .await
        .unwrap_err();
        assert!(start_up_contention(&StoreError::Migrate(
            MigrateError::Execute(version)
        )));
        for wrong in ["CREATE TABLE (", "ALTER TABLE nowhere ADD COLUMN x TEXT"] {
            assert!(!start_up_contention(&failed(wrong).await), "{wrong}");
        }
        assert!(!start_up_contention(&StoreError::Migrate(
            MigrateError::VersionMissing(99)
        )));
    }
}
