//! PostgreSQL backend, for several tollgate instances sharing one ledger.
//!
//! Everything runs at Read Committed and stays correct there:
//! - a balance check is the `WHERE` of the `UPDATE` that reserves or debits,
//!   which PostgreSQL re-checks against the row's newest version after
//!   waiting for a concurrent writer, or a `SELECT … FOR UPDATE` of the
//!   wallet inside the transaction that debits it;
//! - every state change (hold ends, intent moves, session paid) is a
//!   conditional `UPDATE … WHERE status = …`, so exactly one instance wins;
//! - the expiry sweep takes its rows with `FOR UPDATE SKIP LOCKED`, so two
//!   instances sweeping at once never wait on, or expire, the same row;
//! - a serialization failure or deadlock (which PostgreSQL rolls back whole)
//!   is retried a bounded number of times, so it never reaches a caller.
//!
//! A wallet that does not exist yet is created by `INSERT … ON CONFLICT DO
//! NOTHING` before anything locks it, so the first charge on a brand-new
//! wallet has a row to lock like any other.

mod batch;
mod clock;

use std::{future::Future, str::FromStr, sync::Arc, time::Duration};

use async_trait::async_trait;
use sqlx::{
    Connection, Postgres, Transaction,
    postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions},
};

use super::{
    fast_path::{Capture, Hold},
    portable::{PaymentLocks, Portable, entries_upto, refused_hold},
    posting::{TxnHeader, clearing, dev_settlement, topup_audit, topups},
    sql::*,
    *,
};
use crate::{allowance::Limits, config::PoolSettings, keys::ApiKey};

/// Attempts at a write that PostgreSQL rolled back as a serialization
/// failure or deadlock.
const ATTEMPTS: u32 = 8;

pub struct PgStore {
    db: Portable<Postgres>,
    /// Holds, captures and releases, batched under load.
    fast_path: Arc<batch::Batches>,
    /// Whether this host's clock agrees with the database's.
    clock_check: clock::ClockCheck,
}

/// PostgreSQL rolled the whole transaction back and says trying again may
/// work: serialization failure (40001) or deadlock (40P01).
fn retryable(e: &StoreError) -> bool {
    matches!(sql_state(e).as_deref(), Some("40001" | "40P01"))
}

/// How many times an export tries to wait for the ledger's writes in flight.
const EXPORT_LOCK_ATTEMPTS: u32 = 5;

/// The SQLSTATE of a database error.
fn sql_state(e: &StoreError) -> Option<String> {
    match e {
        StoreError::Unavailable(sqlx::Error::Database(db)) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// Whether PostgreSQL refused a row whose key is already there.
fn duplicate(e: &StoreError) -> bool {
    sql_state(e).as_deref() == Some("23505")
}

/// Runs `op` again while PostgreSQL reports it rolled it back for a
/// conflict with a concurrent transaction, at most [`ATTEMPTS`] times.
async fn retrying<T, F, Fut>(mut op: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let mut attempt = 1;
    loop {
        match op().await {
            Err(e) if retryable(&e) && attempt < ATTEMPTS => {
                tracing::debug!("attempt {attempt} rolled back ({e}); retrying");
                tokio::time::sleep(Duration::from_millis(2u64 << attempt)).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// The database's clock, in ms since the epoch.
const CLOCK: &str = "SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)";

impl PgStore {
    /// Leases are stamped and judged by the database's clock, which every
    /// instance shares: instances on hosts whose clocks disagree by more than
    /// a lease would otherwise take each other for dead and release each
    /// other's live holds.
    async fn clock(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(CLOCK).fetch_one(&self.db.pool).await?)
    }

    /// Connects, and applies the migrations under `migrations/postgres`
    /// (sqlx holds an advisory lock meanwhile, so instances starting at once
    /// take turns).
    pub async fn connect(url: &str, settings: &PoolSettings) -> Result<Self, StoreError> {
        let base = PgConnectOptions::from_str(url)?;
        let options = base.clone().options([(
            "statement_timeout",
            settings.statement_timeout.as_millis().to_string(),
        )]);
        // On a connection of its own, without the statement timeout: a
        // migration of a large table, or waiting for another instance's
        // (the advisory lock), may rightly take longer than any call. Made
        // first: a server that refuses it says why (refused, no such
        // database, bad password) at once, where the pool retries until its
        // timeout and then says only that it timed out.
        let mut migrating =
            tokio::time::timeout(settings.connect_timeout, PgConnection::connect_with(&base))
                .await
                .map_err(|_| {
                    StoreError::Unavailable(sqlx::Error::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "connecting to apply the migrations timed out",
                    )))
                })??;
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .acquire_timeout(settings.connect_timeout)
            // A connection the server dropped (restart, pg_terminate_backend)
            // is found and replaced before a call uses it. The ping costs
            // under 5% of fast-path throughput in the scale_out bench.
            .test_before_acquire(true)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/postgres")
            .run_direct(&mut migrating)
            .await?;
        migrating.close().await?;
        let db = Portable::new(pool);
        let fast_path = batch::Batches::new(db.pool.clone());
        Ok(Self {
            db,
            fast_path,
            clock_check: clock::ClockCheck::default(),
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.db.pool
    }

    async fn tx(&self) -> Result<Transaction<'_, Postgres>, StoreError> {
        Ok(self.db.pool.begin().await?)
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
        let claim = retrying(|| self.db.external_claim(id, account)).await?;
        retrying(|| async {
            Portable::<Postgres>::claim_paid_externally(self.tx().await?, &claim, runner).await
        })
        .await
    }

    /// The id of an account, creating the (empty) account if needed.
    async fn account_id(&self, account: &AccountRef) -> Result<i64, StoreError> {
        retrying(|| self.db.account_id(account)).await
    }

    async fn sweep_once(&self, now: i64) -> Result<u64, StoreError> {
        let mut tx = self.tx().await?;
        sqlx::query(LOCK_WALLETS_OF_EXPIRED_HOLDS)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        // Rows another instance is sweeping (or capturing) right now are
        // skipped: it ends them, exactly once.
        let holds: Vec<Swept> = sqlx::query_as(
            "UPDATE holds SET status = 'expired', settled_at = $1
             WHERE id IN (SELECT id FROM holds WHERE status = 'open' AND expires_at < $1
                          ORDER BY id FOR UPDATE SKIP LOCKED)
               AND status = 'open'
             RETURNING id, tool, principal",
        )
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        // Intents in two statements. The first locks those past their time
        // (skipping any a payment of their session has locked). The
        // second, with a snapshot taken after those locks, sees every
        // payment that committed before it and ends only the unpaid: in
        // one statement, a payment committing between the statement's
        // snapshot and its lock on the intent was not seen (a lock does
        // not make PostgreSQL look again), and its money was left in
        // clearing under an expired intent. A payment that comes later
        // waits for this transaction and finds its intent ended.
        // (Intents whose payment a remote provider holds are the gate's to
        // settle, see `Store::remote_due`: not locked here.)
        let due: Vec<String> = sqlx::query_scalar(concat!(
            "SELECT id FROM intents i WHERE i.status = 'awaiting_payment' AND i.expires_at < $1
             AND ",
            paid_here!("i"),
            " ORDER BY i.id FOR UPDATE SKIP LOCKED"
        ))
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        let mut intents: Vec<Swept> = Vec::new();
        if !due.is_empty() {
            intents = sqlx::query_as(concat!(
                "UPDATE intents i SET status = 'expired', updated_at = $1
                 WHERE i.id = ANY($2) AND i.status = 'awaiting_payment' AND NOT ",
                session_paid!("i"),
                " RETURNING i.id, i.tool, i.principal"
            ))
            .bind(now)
            .bind(&due)
            .fetch_all(&mut *tx)
            .await?;
        }
        sqlx::query(
            "UPDATE payment_sessions SET status = 'expired', updated_at = $1
             WHERE id IN (SELECT id FROM payment_sessions WHERE status = 'pending' AND expires_at < $1
                          FOR UPDATE SKIP LOCKED)
               AND status = 'pending'",
        )
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        log_swept(&holds, &intents);
        Ok(holds.len() as u64)
    }
}

/// Ending holds in bulk (the expiry sweep, releasing a dead instance's
/// holds) locks their wallets first, in id order, as a fast-path batch does
/// (see `batch`): ending a hold updates its wallet, and taking the hold rows
/// first would wait on a batch that holds a wallet and wants one of them.
macro_rules! lock_wallets_of_open_holds {
    ($condition:expr) => {
        concat!(
            "SELECT 1 FROM accounts WHERE id IN (SELECT account_id FROM holds
                                                  WHERE status = 'open' AND ",
            $condition,
            ") ORDER BY id FOR NO KEY UPDATE"
        )
    };
}
const LOCK_WALLETS_OF_EXPIRED_HOLDS: &str = lock_wallets_of_open_holds!("expires_at < $1");
const LOCK_WALLETS_OF_ORPHANED_HOLDS: &str =
    lock_wallets_of_open_holds!(owner_gone!("holds.owner"));

/// A dead instance's open holds, skipping any a write has locked: a lone
/// capture or release locks its hold before its wallet, while this has
/// locked the wallets first, so waiting here could close a cycle. A hold
/// skipped is ended by that write, or released by the next pass.
const RELEASE_ORPHANED_HOLDS_NOT_LOCKED: &str = concat!(
    "UPDATE holds SET status = 'released', settled_at = $1
     WHERE status = 'open' AND id IN (SELECT id FROM holds WHERE status = 'open' AND ",
    owner_gone!("holds.owner"),
    " FOR UPDATE SKIP LOCKED)"
);

/// A session payment locks the session first (a concurrent payment of it
/// waits, then sees it paid), then the paying wallet, until it commits.
const PAYMENT_LOCKS: PaymentLocks = PaymentLocks {
    session: "SELECT status, expires_at FROM payment_sessions WHERE id = $1 FOR UPDATE",
    intent:
        "SELECT status, tool, agent, metadata, approval, approved_by, approved_at, approval_rule
             FROM intents WHERE id = $1 FOR UPDATE",
    wallet: wallet_with_limits!("WHERE id = $1 FOR UPDATE"),
};

#[async_trait]
impl Store for PgStore {
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
        let wallet_id = self.account_id(wallet).await?;
        let source_id = self.account_id(&topups(&wallet.currency)).await?;
        let audit = topup_audit(wallet, memo);
        let txn_id = idempotency_key.map_or_else(new_txn_id, topup_txn_id);
        let (once, at) = (idempotency_key.is_some(), now_ms());
        let attempt = || {
            retrying(|| {
                let header = TxnHeader {
                    id: txn_id.clone(),
                    kind: "topup",
                    currency: &wallet.currency,
                    amount,
                    audit: &audit,
                    at,
                    legs: None,
                };
                async move {
                    let tx = self.tx().await?;
                    Portable::<Postgres>::topup(tx, wallet_id, source_id, header, once).await
                }
            })
        };
        match attempt().await {
            // The same key's top-up committed while this one was under way:
            // looked at again, it is replayed.
            Err(e) if once && duplicate(&e) => attempt().await,
            done => done,
        }
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
        // A SHARE lock waits for every transaction inserting entries (they
        // hold ROW EXCLUSIVE until they commit). Writers that come while it
        // waits queue behind it, so it waits half a second at most, then
        // lets them through and tries again.
        for attempt in 1..=EXPORT_LOCK_ATTEMPTS {
            let mut tx = self.tx().await?;
            sqlx::query("SET LOCAL lock_timeout = '500ms'")
                .execute(&mut *tx)
                .await?;
            let locked = sqlx::query("LOCK TABLE ledger_entries IN SHARE MODE")
                .execute(&mut *tx)
                .await;
            match locked.map_err(StoreError::from) {
                Ok(_) => {
                    let upto = entries_upto(&mut tx).await?;
                    tx.commit().await?;
                    return Ok(upto);
                }
                Err(e) if sql_state(&e).as_deref() == Some("55P03") => {
                    drop(tx);
                    tokio::time::sleep(Duration::from_millis(200) * attempt).await;
                }
                // A role that may only read, or a standby, cannot take the
                // lock: the highest id it sees will do, with the risk told.
                Err(e) if matches!(sql_state(&e).as_deref(), Some("42501" | "25006")) => {
                    drop(tx);
                    tracing::warn!(
                        "cannot wait for ledger writes in flight ({e}): an entry still being \
                         written may be left out of this export, and skipped by --after"
                    );
                    return entries_upto(&mut self.tx().await?).await;
                }
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Invalid(
            "the ledger is too busy with writes to export now; try again".into(),
        ))
    }

    async fn open_intents(
        &self,
        principal: Option<&str>,
        session_id: &str,
        now: i64,
    ) -> Result<OpenIntents, StoreError> {
        self.db.open_intents(principal, session_id, now).await
    }

    async fn approvals(&self, principal: &str) -> Result<Vec<Intent>, StoreError> {
        self.db.approvals(principal).await
    }

    async fn set_limits(&self, wallet: &AccountRef, limits: &Limits) -> Result<(), StoreError> {
        self.db.set_limits(wallet, limits).await
    }

    async fn limits(&self, wallet: &str) -> Result<Vec<WalletLimits>, StoreError> {
        self.db.limits(wallet).await
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
        // The reservation is an UPDATE whose WHERE is the balance and limit
        // check (re-checked on the newest row after any wait: the caps'
        // counters are on that same row, and counted by it), and the hold
        // row is written only if it reserved (see `batch`).
        let hold = Hold::new(req, &self.db.instance);
        let created_at = hold.created_at;
        if self.fast_path.apply(batch::Write::Hold(hold)).await? {
            return Ok(HoldOutcome::Held);
        }
        let limits = self.limits(&req.principal).await?;
        Ok(refused_hold(req, limits, created_at))
    }

    async fn capture(&self, hold_id: &str, charge: &Charge) -> Result<Posted, StoreError> {
        let plan = retrying(|| self.db.capture_plan(charge)).await?;
        // The `holds_capture` trigger gives the reservation back and posts
        // the ledger transaction, all in this one write.
        let capture = Capture::new(hold_id, &plan);
        let posted = capture.posted();
        if self.fast_path.apply(batch::Write::Capture(capture)).await? {
            return Ok(posted);
        }
        self.db.refused_capture(hold_id, &plan).await
    }

    async fn release(&self, hold_id: &str) -> Result<(), StoreError> {
        let release = batch::Write::Release {
            hold_id: hold_id.to_owned(),
            at: now_ms(),
        };
        if self.fast_path.apply(release).await? {
            Ok(())
        } else {
            Err(self.db.hold_not_open(hold_id).await?)
        }
    }

    async fn refund(&self, request: &RefundRequest) -> Result<Refunded, StoreError> {
        // Refunds of one payment queue on its capture's row.
        let once = || {
            retrying(|| async {
                Portable::<Postgres>::refund(
                    self.tx().await?,
                    "SELECT amount, currency, payer, tool FROM ledger_transactions WHERE id = $1 FOR UPDATE",
                    request,
                )
                .await
            })
        };
        match once().await {
            // Refunds of two payments under one key lock different rows, so
            // the second learns of the first only from the key's index. Run
            // again, it sees the first and says the key was used.
            Err(e) if duplicate(&e) => once().await,
            other => other,
        }
    }

    async fn sweep_expired(&self, now: i64) -> Result<u64, StoreError> {
        retrying(|| self.sweep_once(now)).await
    }

    async fn verify(&self, now: i64) -> Result<VerifyReport, StoreError> {
        // One repeatable-read transaction: every check sees one snapshot.
        let mut tx = self
            .db
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
        let report = Portable::<Postgres>::verify(&mut tx, now).await?;
        tx.rollback().await?;
        Ok(report)
    }

    async fn create_intent(&self, intent: &Intent, limit: &OpenLimit) -> Result<bool, StoreError> {
        // Under READ COMMITTED two inserts could each count without the
        // other: a lock per caller (one for all anonymous callers, who share
        // a limit) makes them take turns. It ends with the transaction.
        let caller = match &intent.principal {
            Some(principal) => format!("tollgate:open_intents:{principal}"),
            None => "tollgate:open_intents:anonymous".to_owned(),
        };
        let mut tx = self.tx().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(&caller)
            .execute(&mut *tx)
            .await?;
        let opened = query(Statement::create_intent(intent, limit))
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(opened == 1)
    }

    async fn intent(&self, id: &str) -> Result<Option<Intent>, StoreError> {
        self.db.intent(id).await
    }

    async fn transition_intent(
        &self,
        id: &str,
        from: IntentStatus,
        to: IntentStatus,
    ) -> Result<bool, StoreError> {
        let done = retrying(|| async {
            Ok(query(Statement::transition_intent(
                id,
                from,
                to,
                now_ms(),
                &self.db.instance,
            ))
            .execute(&self.db.pool)
            .await?)
        })
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn end_unpaid_intent(&self, id: &str, to: IntentStatus) -> Result<bool, StoreError> {
        // As in the sweep: the intent is locked first, and its session
        // looked at by a second statement, which sees a payment that
        // committed while this waited for the lock (one statement would
        // judge it by its snapshot from before the wait).
        let done = retrying(|| async {
            let mut tx = self.tx().await?;
            sqlx::query("SELECT 1 FROM intents WHERE id = $1 FOR UPDATE")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            let done = sqlx::query(END_UNPAID_INTENT)
                .bind(id)
                .bind(to.as_str())
                .bind(now_ms())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(done)
        })
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn claim_paid_intent(&self, id: &str, funding: &Funding) -> Result<bool, StoreError> {
        let account = match funding {
            Funding::InClearing { refund_to } => {
                let refund_id = match refund_to {
                    Some(account) => Some(self.account_id(account).await?),
                    None => None,
                };
                let done = retrying(|| async {
                    Ok(sqlx::query(CLAIM_PAID)
                        .bind(id)
                        .bind(refund_id)
                        .bind(now_ms())
                        .bind(funding.approver())
                        .bind(&self.db.instance)
                        .execute(&self.db.pool)
                        .await?)
                })
                .await?;
                return Ok(done.rows_affected() > 0);
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
            .account_id(&clearing(&outcome.charge.beneficiary.currency))
            .await?;
        let plan = retrying(|| self.db.settlement_plan(outcome)).await?;
        retrying(|| async {
            Portable::<Postgres>::finish(self.tx().await?, outcome, clearing_id, plan.as_ref())
                .await
        })
        .await
    }

    async fn stored_result(&self, intent_id: &str) -> Result<Option<StoredResult>, StoreError> {
        self.db.stored_result(intent_id).await
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
        self.db.create_session(session).await
    }

    async fn session(&self, id: &str) -> Result<Option<LocalSession>, StoreError> {
        self.db.session(id).await
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
            None => Some(self.account_id(&dev_settlement(&session.currency)).await?),
        };
        let clearing_id = self.account_id(&clearing(&session.currency)).await?;
        retrying(|| async {
            Portable::<Postgres>::pay_session(
                self.tx().await?,
                &PAYMENT_LOCKS,
                &session,
                from_wallet,
                source_id,
                clearing_id,
                now,
            )
            .await
        })
        .await
    }

    async fn end_session(&self, id: &str, to: SessionStatus) -> Result<bool, StoreError> {
        check_session_ending(to)?;
        let done = retrying(|| async {
            Ok(query(Statement::end_session(id, to, now_ms()))
                .execute(&self.db.pool)
                .await?)
        })
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn create_api_key(&self, key: &ApiKey) -> Result<(), StoreError> {
        self.db.create_api_key(key).await
    }

    async fn api_key(&self, id: &str) -> Result<Option<ApiKey>, StoreError> {
        self.db.api_key(id).await
    }

    async fn api_keys(&self) -> Result<Vec<ApiKey>, StoreError> {
        self.db.api_keys().await
    }

    async fn revoke_api_key(&self, id: &str, now: i64) -> Result<bool, StoreError> {
        self.db.revoke_api_key(id, now).await
    }

    /// The lease runs as long as asked, from the database's clock.
    async fn heartbeat(&self, now: i64, alive_until: i64) -> Result<(), StoreError> {
        retrying(|| async {
            let asked = now_ms();
            let db_now = self.clock().await?;
            self.clock_check.observe(db_now, asked, now_ms());
            self.db
                .heartbeat(db_now, db_now.saturating_add(alive_until - now))
                .await
        })
        .await
    }

    async fn release_orphaned_holds(&self, _now: i64) -> Result<u64, StoreError> {
        retrying(|| async {
            let now = self.clock().await?;
            let mut tx = self.tx().await?;
            let instance = self.db.instance.as_str();
            sqlx::query(LOCK_WALLETS_OF_ORPHANED_HOLDS)
                .bind(now)
                .bind(instance)
                .execute(&mut *tx)
                .await?;
            let released = sqlx::query(RELEASE_ORPHANED_HOLDS_NOT_LOCKED)
                .bind(now)
                .bind(instance)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            tx.commit().await?;
            Ok(released)
        })
        .await
    }

    async fn interrupted_runs(&self, _now: i64) -> Result<Vec<Intent>, StoreError> {
        self.db.interrupted_runs(self.clock().await?).await
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
        retrying(|| self.db.prune(before)).await
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
    use std::{borrow::Cow, error::Error as StdError, fmt, sync::atomic::AtomicU32};

    use sqlx::error::{DatabaseError, ErrorKind};

    use super::*;

    /// A database error with a given SQLSTATE.
    #[derive(Debug)]
    struct Sqlstate(&'static str);

    impl fmt::Display for Sqlstate {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "sqlstate {}", self.0)
        }
    }
    impl StdError for Sqlstate {}
    impl DatabaseError for Sqlstate {
        fn message(&self) -> &str {
            self.0
        }
        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }
        fn as_error(&self) -> &(dyn StdError + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn StdError + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn StdError + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> ErrorKind {
            ErrorKind::Other
        }
    }

    fn failing(code: &'static str) -> StoreError {
        StoreError::Unavailable(sqlx::Error::Database(Box::new(Sqlstate(code))))
    }

    /// Runs `retrying` over an operation that fails with `code` its first
    /// `failures` times; returns the outcome and how many times it ran.
    async fn run(code: &'static str, failures: u32) -> (Result<(), StoreError>, u32) {
        let calls = AtomicU32::new(0);
        let outcome = retrying(|| async {
            let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if n < failures {
                Err(failing(code))
            } else {
                Ok(())
            }
        })
        .await;
        (outcome, calls.into_inner())
    }

    #[tokio::test]
    async fn deadlocks_and_serialization_failures_are_retried_a_bounded_number_of_times() {
        let (outcome, calls) = run("40P01", 2).await;
        assert!(outcome.is_ok());
        assert_eq!(calls, 3, "two deadlocks, then success");

        let (outcome, calls) = run("40001", 3).await;
        assert!(outcome.is_ok());
        assert_eq!(calls, 4);

        let (outcome, calls) = run("40P01", u32::MAX).await;
        assert!(retryable(&outcome.unwrap_err()));
        assert_eq!(calls, ATTEMPTS, "gives up after {ATTEMPTS} attempts");

        // Anything else (here a unique violation) is not retried.
        let (outcome, calls) = run("23505", u32::MAX).await;
        assert!(outcome.is_err());
        assert_eq!(calls, 1);
    }
}
