//! The part of the store both backends do alike: reads, and writes that are
//! one plain statement, written once over sqlx's generic pool. Each backend
//! keeps what differs (transactions, locking, retries, the fast path).

use std::{collections::HashMap, sync::Mutex};

use sqlx::{Database, Encode, Executor, IntoArguments, Pool, Transaction, Type};

use crate::{
    allowance::{Limits, day_start, month_start},
    money::{Units, format_in},
    terms::{Role, pro_rata},
};

use super::{
    APPROVALS_LISTED, AccountKind, AccountRef, ApiKey, ApprovalStatus, Audit, Charge, Cursor,
    Funding, HoldOutcome, HoldRecord, HoldRequest, Intent, IntentOutcome, IntentStatus,
    LocalSession, OpenIntents, Posted, Pruned, REMOTE_DUE_PAGE, RefundRequest, Refunded,
    SessionStatus, StatementLine, StoreError, StoreStats, StoredResult, ToppedUp, UNREDEEMED_PAGE,
    VerifyReport, WalletBalance, WalletLimits, new_txn_id, now_ms,
    posting::{
        CapturePlan, Entry, Settlement, TxnHeader, check_balanced, clearing,
        external_payment_audit, session_payment_audit, settled_capture,
    },
    rows,
    rows::{Changed, Columns},
    sql::{self, Param, Statement, query, statement},
    verify,
};

/// An instance whose lease lapsed this long ago is forgotten: whatever it
/// left behind was recovered long before.
const FORGET_AFTER_MS: i64 = 24 * 3600 * 1000;

/// `inst_<pid>_<random>`: unique, and says which process it was.
fn instance_id() -> String {
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("inst_{}_{}", std::process::id(), &random[..12])
}

/// How a backend reads what a session payment must keep unchanged until it
/// commits: the session (`$1`: its id; columns `status`, `expires_at`) and
/// the paying wallet (`$1`: its account id; `sql::wallet_with_limits!`'s
/// columns).
pub(super) struct PaymentLocks {
    pub session: &'static str,
    /// The intent a session pays for (`$1`: the session's id, which the
    /// local provider takes from its intent), if there is one.
    pub intent: &'static str,
    pub wallet: &'static str,
}

/// A write transaction the shared multi-statement writes (postings, session
/// payments, settlements, refunds) run in: a sqlx transaction on either
/// backend, or the SQLite store's in-thread connection
/// (`sqlite::in_thread`), whose futures are ready at once.
pub(super) trait Tx {
    type Row: Columns;
    /// Runs a statement; how many rows it changed.
    fn execute(
        &mut self,
        statement: Statement<'_>,
    ) -> impl Future<Output = Result<u64, StoreError>>;
    fn fetch_optional(
        &mut self,
        statement: Statement<'_>,
    ) -> impl Future<Output = Result<Option<Self::Row>, StoreError>>;
    fn fetch_all(
        &mut self,
        statement: Statement<'_>,
    ) -> impl Future<Output = Result<Vec<Self::Row>, StoreError>>;
    fn commit(self) -> impl Future<Output = Result<(), StoreError>>;

    /// The one row a statement must return.
    fn fetch_one(
        &mut self,
        statement: Statement<'_>,
    ) -> impl Future<Output = Result<Self::Row, StoreError>> {
        async {
            self.fetch_optional(statement)
                .await?
                .ok_or(StoreError::Unavailable(sqlx::Error::RowNotFound))
        }
    }
}

/// The most a top-up takes a wallet to: a trillion (10^18 micro-units, a
/// ninth of what a balance can count). On PostgreSQL the balance is read
/// unlocked, so top-ups made at the same moment may together pass it, by
/// far less than the room left; refunds are not checked against it.
pub const MAX_WALLET_BALANCE: Units = Units(1_000_000_000_000_000_000);

/// An account a capture paid, as a refund of it sees it: what it still
/// holds of the payment in each role it earned in.
struct RefundLeg {
    account: i64,
    roles: Vec<(Option<&'static str>, i64)>,
}

impl RefundLeg {
    /// What it still holds of the payment in all.
    fn left(&self) -> i64 {
        self.roles.iter().map(|(_, held)| held).sum()
    }
}

/// A claim of an intent paid to a remote provider, as
/// [`Portable::external_claim`] prepares it.
pub struct ExternalClaim {
    intent: Intent,
    source_id: i64,
    clearing_id: i64,
    audit: Audit,
    /// The provider's account, which approved the payment.
    account: String,
}

/// Rows a pruning statement (`sql::PRUNE_*`) deletes at most.
const PRUNE_BATCH: u64 = 1000;

impl<DB> Tx for Transaction<'_, DB>
where
    DB: Database,
    DB::Row: Columns,
    DB::QueryResult: Changed,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> <DB as Database>::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> Option<&'q str>: Encode<'q, DB> + Type<DB>,
    for<'q> Option<i64>: Encode<'q, DB> + Type<DB>,
    for<'q> bool: Encode<'q, DB> + Type<DB>,
{
    type Row = DB::Row;

    async fn execute(&mut self, statement: Statement<'_>) -> Result<u64, StoreError> {
        Ok(query(statement).execute(&mut **self).await?.changed())
    }

    async fn fetch_optional(
        &mut self,
        statement: Statement<'_>,
    ) -> Result<Option<DB::Row>, StoreError> {
        Ok(query(statement).fetch_optional(&mut **self).await?)
    }

    async fn fetch_all(&mut self, statement: Statement<'_>) -> Result<Vec<DB::Row>, StoreError> {
        Ok(query(statement).fetch_all(&mut **self).await?)
    }

    async fn commit(self) -> Result<(), StoreError> {
        Ok(Transaction::commit(self).await?)
    }
}

/// A backend's pool, with the statements every backend runs the same way.
pub(super) struct Portable<DB: Database> {
    pub pool: Pool<DB>,
    /// This process's instance id: the owner stamped on the holds it opens
    /// and the runs it starts (see `Store::heartbeat`).
    pub instance: String,
    /// Account ids never change once created, so they are cached.
    account_ids: Mutex<HashMap<AccountRef, i64>>,
}

impl<DB: Database> Portable<DB> {
    pub fn new(pool: Pool<DB>) -> Self {
        Self {
            pool,
            instance: instance_id(),
            account_ids: Mutex::new(HashMap::new()),
        }
    }
}

impl<DB> Portable<DB>
where
    DB: Database,
    DB::Row: Columns,
    DB::QueryResult: Changed,
    for<'p> &'p Pool<DB>: Executor<'p, Database = DB>,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> <DB as Database>::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> Option<&'q str>: Encode<'q, DB> + Type<DB>,
    for<'q> Option<i64>: Encode<'q, DB> + Type<DB>,
    for<'q> bool: Encode<'q, DB> + Type<DB>,
{
    /// Runs a statement; how many rows it changed.
    pub async fn execute(&self, statement: Statement<'_>) -> Result<u64, StoreError> {
        Ok(query(statement).execute(&self.pool).await?.changed())
    }

    /// The id of an account, creating the (empty) account if needed.
    pub async fn account_id(&self, account: &AccountRef) -> Result<i64, StoreError> {
        let cached = self
            .account_ids
            .lock()
            .ok()
            .and_then(|c| c.get(account).copied());
        if let Some(id) = cached {
            return Ok(id);
        }
        self.execute(Statement::create_account(account, now_ms()))
            .await?;
        let id = query(Statement::account_id(account))
            .fetch_one(&self.pool)
            .await?
            .int("id")?;
        if let Ok(mut cache) = self.account_ids.lock() {
            cache.insert(account.clone(), id);
        }
        Ok(id)
    }

    /// An account's id if it was ever made: nothing is created, so a
    /// mistyped wallet that pays nothing leaves no account behind.
    pub async fn existing_account_id(
        &self,
        account: &AccountRef,
    ) -> Result<Option<i64>, StoreError> {
        query(Statement::account_id(account))
            .fetch_optional(&self.pool)
            .await?
            .map(|row| row.int("id"))
            .transpose()
    }

    /// A charge with its accounts resolved (and created if new).
    pub async fn capture_plan(&self, charge: &Charge) -> Result<CapturePlan, StoreError> {
        let beneficiary_id = self.account_id(&charge.beneficiary).await?;
        let mut ids = Vec::with_capacity(charge.legs.len());
        for (_, account, _) in &charge.legs {
            ids.push(self.account_id(account).await?);
        }
        CapturePlan::new(charge, beneficiary_id, &ids)
    }

    /// What settling a finished run captures: its charge's plan when the
    /// run earns it, else nothing (it is refunded).
    pub async fn settlement_plan(
        &self,
        outcome: &IntentOutcome,
    ) -> Result<Option<CapturePlan>, StoreError> {
        if !outcome.earns() {
            return Ok(None);
        }
        Ok(Some(self.capture_plan(&outcome.charge).await?))
    }

    /// Why a hold could not be ended: it is not open, or does not exist.
    pub async fn hold_not_open(&self, hold_id: &str) -> Result<StoreError, StoreError> {
        let hold = query(statement!(sql::HOLD, hold_id))
            .fetch_optional(&self.pool)
            .await?;
        let status = hold.map(|hold| hold.text("status")).transpose()?;
        Ok(StoreError::hold_not_open(hold_id, status))
    }

    /// After a capture that changed nothing: that same capture, if it had
    /// already landed, else why it was refused (see [`settled_capture`]).
    pub async fn refused_capture(
        &self,
        hold_id: &str,
        plan: &CapturePlan,
    ) -> Result<Posted, StoreError> {
        let hold = query(statement!(sql::HOLD, hold_id))
            .fetch_optional(&self.pool)
            .await?;
        settled_capture(hold_id, hold.as_ref(), plan)
    }

    async fn optional<T>(
        &self,
        statement: Statement<'_>,
        read: fn(&DB::Row) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        let row = query(statement).fetch_optional(&self.pool).await?;
        row.as_ref().map(read).transpose()
    }

    async fn all<T>(
        &self,
        statement: Statement<'_>,
        read: fn(&DB::Row) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        let rows = query(statement).fetch_all(&self.pool).await?;
        rows.iter().map(read).collect()
    }

    pub async fn balances(&self, wallet: &str) -> Result<Vec<WalletBalance>, StoreError> {
        self.all(statement!(sql::BALANCES, wallet), rows::wallet_balance)
            .await
    }

    pub async fn statement(
        &self,
        kind: AccountKind,
        name: &str,
    ) -> Result<Vec<StatementLine>, StoreError> {
        self.all(
            statement!(sql::STATEMENT, name, kind.as_str()),
            rows::statement_line,
        )
        .await
    }

    pub async fn tool_statement(&self, tool: &str) -> Result<Vec<StatementLine>, StoreError> {
        self.all(statement!(sql::TOOL_STATEMENT, tool), rows::statement_line)
            .await
    }

    pub async fn entries_page(
        &self,
        account: Option<(AccountKind, &str)>,
        after: i64,
        upto: i64,
        limit: i64,
    ) -> Result<Vec<(i64, StatementLine)>, StoreError> {
        let statement = match account {
            Some((kind, name)) => statement!(
                sql::ACCOUNT_ENTRIES_PAGE,
                after,
                limit,
                upto,
                kind.as_str(),
                name
            ),
            None => statement!(sql::ENTRIES_PAGE, after, limit, upto),
        };
        self.all(statement, rows::entry_line).await
    }

    pub async fn open_intents(
        &self,
        principal: Option<&str>,
        session_id: &str,
        now: i64,
    ) -> Result<OpenIntents, StoreError> {
        rows::open_intents(
            &query(statement!(
                sql::OPEN_INTENTS,
                Param::Text(principal),
                session_id,
                now
            ))
            .fetch_one(&self.pool)
            .await?,
        )
    }

    pub async fn approvals(&self, principal: &str) -> Result<Vec<Intent>, StoreError> {
        let listed = APPROVALS_LISTED as i64;
        self.all(statement!(sql::APPROVALS, principal, listed), rows::intent)
            .await
    }

    pub async fn limits(&self, wallet: &str) -> Result<Vec<WalletLimits>, StoreError> {
        self.all(statement!(sql::LIMITS, wallet), rows::limits)
            .await
    }

    pub async fn set_limits(&self, wallet: &AccountRef, limits: &Limits) -> Result<(), StoreError> {
        if wallet.kind != AccountKind::Wallet {
            return Err(StoreError::Invalid(format!("{wallet} is not a wallet")));
        }
        let id = self.account_id(wallet).await?;
        let tools = limits.tools_json();
        self.execute(statement!(
            sql::SET_LIMITS,
            id,
            limits.per_call.map(|u| u.0),
            limits.daily.map(|u| u.0),
            limits.monthly.map(|u| u.0),
            &tools
        ))
        .await?;
        Ok(())
    }

    pub async fn decide_approval(
        &self,
        id: &str,
        decision: ApprovalStatus,
        by: &str,
    ) -> Result<bool, StoreError> {
        if !matches!(
            decision,
            ApprovalStatus::Approved | ApprovalStatus::Declined
        ) {
            return Err(StoreError::Invalid(format!(
                "an approval is decided as approved or declined, not {}",
                decision.as_str()
            )));
        }
        Ok(self
            .execute(statement!(
                sql::DECIDE_APPROVAL,
                id,
                decision.as_str(),
                by,
                now_ms()
            ))
            .await?
            > 0)
    }

    pub async fn intent(&self, id: &str) -> Result<Option<Intent>, StoreError> {
        self.optional(statement!(sql::INTENT, id), rows::intent)
            .await
    }

    pub async fn heartbeat(&self, now: i64, alive_until: i64) -> Result<(), StoreError> {
        self.execute(statement!(sql::HEARTBEAT, &self.instance, now, alive_until))
            .await?;
        self.execute(statement!(sql::FORGET_INSTANCES, now - FORGET_AFTER_MS))
            .await?;
        Ok(())
    }

    pub async fn release_orphaned_holds(&self, now: i64) -> Result<u64, StoreError> {
        self.execute(statement!(sql::RELEASE_ORPHANED_HOLDS, now, &self.instance))
            .await
    }

    pub async fn interrupted_runs(&self, now: i64) -> Result<Vec<Intent>, StoreError> {
        self.all(
            statement!(sql::INTERRUPTED_RUNS, now, &self.instance),
            rows::intent,
        )
        .await
    }

    pub async fn own_stale_runs(&self, before: i64) -> Result<Vec<Intent>, StoreError> {
        self.all(
            statement!(sql::OWN_STALE_RUNS, before, &self.instance),
            rows::intent,
        )
        .await
    }

    pub async fn remote_due(&self, now: i64, after: &Cursor) -> Result<Vec<Intent>, StoreError> {
        self.intents_page(sql::REMOTE_DUE, now, after, REMOTE_DUE_PAGE)
            .await
    }

    pub async fn unredeemed(&self, before: i64, after: &Cursor) -> Result<Vec<Intent>, StoreError> {
        self.intents_page(sql::UNREDEEMED, before, after, UNREDEEMED_PAGE)
            .await
    }

    /// One page of intents, past `after` in (expiry, id) order, of a paged
    /// statement whose `$1` is `bound`.
    async fn intents_page(
        &self,
        sql: &'static str,
        bound: i64,
        after: &Cursor,
        page: usize,
    ) -> Result<Vec<Intent>, StoreError> {
        let statement = statement!(sql, bound, after.expires_at, after.id.as_str(), page as i64);
        self.all(statement, rows::intent).await
    }

    pub async fn prune(&self, before: i64) -> Result<Pruned, StoreError> {
        Ok(Pruned {
            results: self.prune_batches(sql::PRUNE_RESULTS, before).await?,
            intents: self.prune_batches(sql::PRUNE_INTENTS, before).await?,
            sessions: self.prune_batches(sql::PRUNE_SESSIONS, before).await?,
            holds: self.prune_batches(sql::PRUNE_HOLDS, before).await?,
        })
    }

    /// Runs a pruning statement until a batch comes back short.
    async fn prune_batches(&self, delete: &'static str, before: i64) -> Result<u64, StoreError> {
        let mut deleted = 0;
        loop {
            let batch = self
                .execute(statement!(delete, before, PRUNE_BATCH as i64))
                .await?;
            deleted += batch;
            if batch < PRUNE_BATCH {
                return Ok(deleted);
            }
        }
    }

    pub async fn stored_result(&self, intent_id: &str) -> Result<Option<StoredResult>, StoreError> {
        self.optional(
            statement!(sql::STORED_RESULT, intent_id),
            rows::stored_result,
        )
        .await
    }

    pub async fn refunded(&self, payment_id: &str) -> Result<Units, StoreError> {
        let total = self
            .optional(statement!(sql::REFUNDED_SO_FAR, payment_id), |row| {
                row.int("total")
            })
            .await?;
        Ok(Units(total.unwrap_or(0)))
    }

    pub async fn hold_record(&self, id: &str) -> Result<Option<HoldRecord>, StoreError> {
        self.optional(statement!(sql::HOLD_RECORD, id), rows::hold_record)
            .await
    }

    pub async fn payment_lines(&self, payment_id: &str) -> Result<Vec<StatementLine>, StoreError> {
        self.all(
            statement!(sql::PAYMENT_LINES, payment_id),
            rows::statement_line,
        )
        .await
    }

    pub async fn create_session(&self, session: &LocalSession) -> Result<(), StoreError> {
        self.execute(Statement::create_session(session)).await?;
        Ok(())
    }

    pub async fn session(&self, id: &str) -> Result<Option<LocalSession>, StoreError> {
        self.optional(statement!(sql::SESSION, id), rows::session)
            .await
    }

    pub async fn list_sessions(&self, limit: i64) -> Result<Vec<LocalSession>, StoreError> {
        self.all(statement!(sql::RECENT_SESSIONS, limit), rows::session)
            .await
    }

    pub async fn create_api_key(&self, key: &ApiKey) -> Result<(), StoreError> {
        self.execute(Statement::create_api_key(key, &key.scopes_text()))
            .await?;
        Ok(())
    }

    pub async fn api_key(&self, id: &str) -> Result<Option<ApiKey>, StoreError> {
        self.optional(statement!(sql::API_KEY, id), rows::api_key)
            .await
    }

    pub async fn api_keys(&self) -> Result<Vec<ApiKey>, StoreError> {
        self.all(statement!(sql::API_KEYS), rows::api_key).await
    }

    pub async fn revoke_api_key(&self, id: &str, now: i64) -> Result<bool, StoreError> {
        Ok(self
            .execute(statement!(sql::REVOKE_API_KEY, id, now))
            .await?
            > 0)
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        self.execute(statement!("SELECT 1")).await?;
        Ok(())
    }

    pub async fn stats(&self) -> Result<StoreStats, StoreError> {
        let open_holds = query(statement!(sql::STATS_OPEN_HOLDS))
            .fetch_one(&self.pool)
            .await?;
        let intents = query(statement!(sql::STATS_INTENTS))
            .fetch_all(&self.pool)
            .await?;
        let revenue = query(statement!(sql::STATS_REVENUE))
            .fetch_all(&self.pool)
            .await?;
        rows::stats(&open_holds, &intents, &revenue)
    }

    /// Writes one balanced transaction: header and entries (a trigger moves
    /// each wallet's balance). Entries are written in account order, so two
    /// transactions touching the same accounts lock them in the same order.
    async fn post(
        tx: &mut impl Tx,
        header: TxnHeader<'_>,
        entries: &[Entry],
    ) -> Result<Posted, StoreError> {
        check_balanced(header.kind, entries)?;
        let mut entries = entries.to_vec();
        entries.sort_unstable();
        tx.execute(Statement::insert_transaction(&header)).await?;
        for entry in entries {
            tx.execute(Statement::insert_entry(&header.id, entry, header.at))
                .await?;
        }
        Ok(Posted {
            txn_id: header.id,
            at: header.at,
        })
    }

    /// A top-up from `source_id` into `wallet_id`, in `tx`, committed.
    /// `once`: its id was made from an idempotency key, and a transaction
    /// with that id already there is the same top-up again.
    pub async fn topup(
        mut tx: impl Tx,
        wallet_id: i64,
        source_id: i64,
        header: TxnHeader<'_>,
        once: bool,
    ) -> Result<ToppedUp, StoreError> {
        let amount = header.amount.0;
        if once {
            let id = header.id.as_str();
            if let Some(earlier) = tx
                .fetch_optional(statement!(sql::TOPUP, id, wallet_id))
                .await?
            {
                if earlier.opt_int("credited")? != Some(amount) {
                    return Err(StoreError::Invalid(
                        "this idempotency key was used for another top-up (another wallet or \
                         amount)"
                            .into(),
                    ));
                }
                let posted = Posted {
                    txn_id: header.id,
                    at: earlier.int("created_at")?,
                };
                return Ok(ToppedUp {
                    posted,
                    replayed: true,
                });
            }
        }
        // Balances are 64-bit micro-units: far more than any wallet needs,
        // but SQLite would turn an overflowing sum into an inexact REAL.
        let balance = tx
            .fetch_one(statement!(sql::WALLET_BALANCE, wallet_id))
            .await?
            .int("balance")?;
        if balance
            .checked_add(amount)
            .is_none_or(|after| after > MAX_WALLET_BALANCE.0)
        {
            return Err(StoreError::Invalid(format!(
                "a wallet holds at most {}: this top-up would take it past that",
                format_in(MAX_WALLET_BALANCE, header.currency)
            )));
        }
        let posted = Self::post(
            &mut tx,
            header,
            &[(source_id, -amount, None), (wallet_id, amount, None)],
        )
        .await?;
        tx.commit().await?;
        Ok(ToppedUp {
            posted,
            replayed: false,
        })
    }

    /// What claiming intent `id`, paid to a remote provider through
    /// `account`, posts: read before its transaction (on PostgreSQL, with
    /// retries of its own).
    pub async fn external_claim(
        &self,
        id: &str,
        account: &str,
    ) -> Result<ExternalClaim, StoreError> {
        let Some(intent) = self.intent(id).await? else {
            return Err(StoreError::NotFound(format!("intent {id}")));
        };
        let source = AccountRef::new(AccountKind::External, account, &intent.currency);
        Ok(ExternalClaim {
            source_id: self.account_id(&source).await?,
            clearing_id: self.account_id(&clearing(&intent.currency)).await?,
            audit: external_payment_audit(&intent, account),
            account: account.to_owned(),
            intent,
        })
    }

    /// awaiting_payment → running, claimed by `runner` (or only → paid,
    /// with no runner), for an intent paid outside the ledger, with the
    /// money's arrival in clearing, in `tx`; false if it was not awaiting.
    pub async fn claim_paid_externally(
        mut tx: impl Tx,
        claim: &ExternalClaim,
        runner: Option<&str>,
    ) -> Result<bool, StoreError> {
        let ExternalClaim {
            intent,
            source_id,
            clearing_id,
            audit,
            account: approver,
        } = claim;
        let (source_id, clearing_id) = (*source_id, *clearing_id);
        let now = now_ms();
        let marked = tx
            .execute(statement!(
                sql::CLAIM_PAID,
                &intent.id,
                source_id,
                now,
                approver,
                runner
            ))
            .await?;
        if marked == 0 {
            return Ok(false);
        }
        let header = TxnHeader {
            id: new_txn_id(),
            kind: "session_payment",
            currency: &intent.currency,
            amount: intent.amount,
            audit,
            at: now,
            legs: None,
        };
        Self::post(
            &mut tx,
            header,
            &[
                (source_id, -intent.amount.0, None),
                (clearing_id, intent.amount.0, None),
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Stores a run's result and settles its money, in `tx`, committed:
    /// `plan` is what [`Self::settlement_plan`] found.
    pub async fn finish(
        mut tx: impl Tx,
        outcome: &IntentOutcome,
        clearing_id: i64,
        plan: Option<&CapturePlan>,
    ) -> Result<Option<Posted>, StoreError> {
        let row = tx.fetch_optional(Statement::finish_intent(outcome)).await?;
        let Some(row) = row else {
            return Err(StoreError::intent_not_running(&outcome.intent_id));
        };
        tx.execute(Statement::store_result(outcome)).await?;
        let posted = match Settlement::of(outcome, &row, clearing_id, plan)? {
            Some(settlement) => Some({
                if let Some((account, amount)) = settlement.given_back
                    && let Some(session) = row.opt_text("provider_session_id")?
                    && let Some(paid) = tx
                        .fetch_optional(statement!(sql::SESSION_PAID_AT, session.as_str()))
                        .await?
                {
                    let paid_at = paid.int("updated_at")?;
                    tx.execute(statement!(sql::GIVE_BACK_SPEND, account, amount, paid_at))
                        .await?;
                }
                Self::post(
                    &mut tx,
                    TxnHeader {
                        id: outcome.txn_id.clone(),
                        kind: settlement.kind,
                        currency: &outcome.charge.beneficiary.currency,
                        amount: settlement.amount,
                        audit: &settlement.audit,
                        at: outcome.at,
                        legs: settlement.legs,
                    },
                    &settlement.entries,
                )
                .await?
            }),
            None => None,
        };
        tx.commit().await?;
        Ok(posted)
    }

    /// Pays a pending session from `source_id` into clearing, in `tx`. The
    /// session and the paying wallet are read with the backend's `locks`,
    /// so that nothing changes them before the transaction commits. A
    /// wallet with no account (`None`) has nothing to pay with.
    #[allow(clippy::too_many_arguments)]
    pub async fn pay_session(
        mut tx: impl Tx,
        locks: &PaymentLocks,
        session: &LocalSession,
        from_wallet: Option<&str>,
        source_id: Option<i64>,
        clearing_id: i64,
        now: i64,
    ) -> Result<Posted, StoreError> {
        let id = session.id.as_str();
        let row = tx.fetch_one(statement!(locks.session, id)).await?;
        let status = row.text("status")?;
        if status == "pending" && now > row.int("expires_at")? {
            tx.execute(statement!(sql::EXPIRE_SESSION, id, now)).await?;
            tx.commit().await?;
            return Err(StoreError::session_not_pending(id, "expired".into()));
        }
        if status != "pending" {
            return Err(StoreError::session_not_pending(id, status));
        }
        // A session whose intent has ended (expired, cancelled, declined)
        // takes no money: nothing could redeem or refund it. On PostgreSQL
        // the intent stays locked until this payment commits, so the expiry
        // sweep, which skips locked intents, cannot end it meanwhile.
        let intent = tx.fetch_optional(statement!(locks.intent, id)).await?;
        let tool = intent.as_ref().map(|i| i.text("tool")).transpose()?;
        // Who was behind the call, for the payer's statement line. An
        // approval still waiting, or declined as this payment was made, is
        // decided by it (the claim records it on the intent as approved by
        // the payer): the line says so now.
        let origin = intent.as_ref().map(rows::origin).transpose()?;
        let approval = match &intent {
            Some(i) => rows::approval(i)?.map(|mut approval| {
                if matches!(
                    approval.status,
                    ApprovalStatus::Waiting | ApprovalStatus::Declined
                ) {
                    let refund_to = from_wallet.map(|w| AccountRef::wallet(w, &session.currency));
                    let payer = Funding::InClearing { refund_to }.approver();
                    approval.by = Some(sql::approved_by_payment(
                        approval.status,
                        payer,
                        approval.by.as_deref(),
                    ));
                    approval.status = ApprovalStatus::Approved;
                    approval.at = Some(now);
                }
                approval
            }),
            None => None,
        };
        if let Some(intent) = intent {
            let ended = intent.text("status")?;
            if ended != IntentStatus::AwaitingPayment.as_str() {
                let to = if ended == IntentStatus::Expired.as_str() {
                    SessionStatus::Expired
                } else {
                    SessionStatus::Cancelled
                };
                tx.execute(Statement::end_session(id, to, now)).await?;
                tx.commit().await?;
                return Err(StoreError::session_not_pending(id, to.as_str().into()));
            }
        }
        let source_id = match (source_id, from_wallet) {
            (Some(source_id), _) => source_id,
            (None, Some(wallet)) => return Err(StoreError::insufficient(wallet, session, 0)),
            (None, None) => {
                return Err(StoreError::Invalid(format!(
                    "session {id} has no account to be paid from"
                )));
            }
        };
        let mut paid_at = now;
        if let Some(wallet) = from_wallet {
            let row = tx.fetch_one(statement!(locks.wallet, source_id)).await?;
            // The wallet's limits, checked and counted on its locked row.
            let limits = rows::limits(&row)?;
            // A session opened for a call checks the tool against the
            // wallet's allow-list too; one made through the sessions API
            // is for no tool of this server, and a wallet with an
            // allow-list does not pay it.
            if let Some(breach) = limits.limits.breach(
                wallet,
                &session.currency,
                &limits.spent,
                tool.as_deref(),
                session.amount,
                now,
            ) {
                return Err(StoreError::OverLimit(Box::new(breach)));
            }
            let available = row.int("available")?;
            if available < session.amount.0 {
                return Err(StoreError::insufficient(wallet, session, available));
            }
            // Counters already in a later day or month (a payment made just
            // before midnight, landing after one made after it) count this
            // one in theirs: it is paid at that period's start, so that a
            // refund gives back to the period it was counted in.
            paid_at = now
                .max(limits.spent.day_start)
                .max(limits.spent.month_start);
            tx.execute(statement!(
                sql::COUNT_SPEND,
                source_id,
                session.amount.0,
                day_start(paid_at),
                month_start(paid_at)
            ))
            .await?;
        }
        let mut audit = session_payment_audit(session, from_wallet, tool);
        audit.origin = origin.unwrap_or_default();
        audit.approval = approval;
        let posted = Self::post(
            &mut tx,
            TxnHeader {
                id: new_txn_id(),
                kind: "session_payment",
                currency: &session.currency,
                amount: session.amount,
                audit: &audit,
                at: now,
                legs: None,
            },
            &[
                (source_id, -session.amount.0, None),
                (clearing_id, session.amount.0, None),
            ],
        )
        .await?;
        tx.execute(statement!(sql::MARK_SESSION_PAID, id, source_id, paid_at))
            .await?;
        tx.commit().await?;
        Ok(posted)
    }

    /// Refunds a captured payment, in `tx`, committed. `capture_lock` reads
    /// the capture's transaction (`$1`: its id; `amount`, `currency`,
    /// `payer`, `tool`) so that no other refund of it commits meanwhile.
    pub async fn refund(
        mut tx: impl Tx,
        capture_lock: &'static str,
        request: &RefundRequest,
    ) -> Result<Refunded, StoreError> {
        let payment_id = request.payment_id.as_str();
        let not_found = || StoreError::NotFound(format!("captured payment {payment_id}"));
        let Some(txn_id) = tx
            .fetch_optional(statement!(sql::CAPTURE_TXN_ID, payment_id))
            .await?
        else {
            return Err(not_found());
        };
        let capture_id = txn_id.text("id")?;
        let capture = tx
            .fetch_one(statement!(capture_lock, capture_id.as_str()))
            .await?;
        let currency = rows::currency_of(capture.text("currency")?)?;
        let captured = capture.int("amount")?;
        let refunded = tx
            .fetch_one(statement!(sql::REFUNDED_SO_FAR, payment_id))
            .await?
            .int("total")?;
        if let Some(earlier) = tx
            .fetch_optional(statement!(sql::REFUND_BY_KEY, &request.idempotency_key))
            .await?
        {
            let amount = earlier.int("amount")?;
            if earlier.text("payment_id")? != payment_id
                || request.amount.is_some_and(|a| a.0 != amount)
            {
                return Err(StoreError::Invalid(format!(
                    "idempotency key `{}` was used for another refund",
                    request.idempotency_key
                )));
            }
            return Ok(Refunded {
                txn_id: earlier.text("txn_id")?,
                amount: Units(amount),
                currency,
                captured: Units(captured),
                refunded: Units(refunded),
                replayed: true,
            });
        }
        let left = captured - refunded;
        let amount = request.amount.map_or(left, |a| a.0);
        if amount <= 0 || amount > left {
            return Err(StoreError::Invalid(format!(
                "a refund of {} {currency} is not possible: {} of the {} captured is left to refund",
                format_in(Units(amount), &currency),
                format_in(Units(left), &currency),
                format_in(Units(captured), &currency),
            )));
        }
        let Some(destination) = tx
            .fetch_optional(statement!(sql::REFUND_DESTINATION, payment_id))
            .await?
        else {
            return Err(StoreError::Invalid(format!(
                "payment {payment_id} has nobody to refund"
            )));
        };
        // Every account the capture paid gives back its share of the refund,
        // in proportion to what it still holds of it: the refund that
        // empties a payment takes back exactly what each account got. An
        // account paid in two roles (both commissions to one account) gives
        // its share back under each role, in proportion to what each still
        // holds.
        let mut legs: Vec<RefundLeg> = Vec::new();
        for row in tx
            .fetch_all(statement!(sql::CAPTURE_LEGS, capture_id.as_str()))
            .await?
        {
            let account = row.int("account_id")?;
            let amount = row.int("amount")?;
            let role = row.opt_text("role")?.and_then(|r| Role::parse(&r));
            let role = role.map(Role::as_str);
            let at = match legs.iter().position(|leg| leg.account == account) {
                Some(at) => at,
                None => {
                    legs.push(RefundLeg {
                        account,
                        roles: Vec::new(),
                    });
                    legs.len() - 1
                }
            };
            let leg = &mut legs[at];
            match leg.roles.iter_mut().find(|(r, _)| *r == role) {
                Some(earned) => earned.1 += amount,
                None => leg.roles.push((role, amount)),
            }
        }
        for row in tx
            .fetch_all(statement!(sql::REFUNDED_BY_ACCOUNT, payment_id))
            .await?
        {
            let account = row.int("account_id")?;
            let taken = row.int("taken")?;
            let role = row.opt_text("role")?.and_then(|r| Role::parse(&r));
            if let Some(leg) = legs.iter_mut().find(|leg| leg.account == account)
                && let Some(held) = leg
                    .roles
                    .iter_mut()
                    .find(|(r, _)| *r == role.map(Role::as_str))
            {
                held.1 -= taken;
            }
        }
        let weights: Vec<i64> = legs.iter().map(RefundLeg::left).collect();
        let mut entries: Vec<Entry> =
            vec![(destination.int("account_id")?, amount, Some("refund"))];
        for (leg, part) in legs.iter().zip(pro_rata(amount, &weights)) {
            let mut held: Vec<i64> = leg.roles.iter().map(|(_, held)| (*held).max(0)).collect();
            if held.iter().all(|h| *h == 0) {
                // Cannot happen while the account still holds something (its
                // roles hold it); kept so that a part is never dropped.
                held = vec![1; held.len()];
            }
            for ((role, _), share) in leg.roles.iter().zip(pro_rata(part, &held)) {
                if share > 0 {
                    entries.push((leg.account, -share, *role));
                }
            }
        }
        let audit = Audit {
            payer: capture.opt_text("payer")?,
            tool: capture.opt_text("tool")?,
            payment_id: Some(payment_id.to_owned()),
            memo: Some(request.reason.clone()),
            ..Audit::default()
        };
        let at = now_ms();
        let posted = Self::post(
            &mut tx,
            TxnHeader {
                id: new_txn_id(),
                kind: "refund",
                currency: &currency,
                amount: Units(amount),
                audit: &audit,
                at,
                legs: None,
            },
            &entries,
        )
        .await?;
        // A charge taken back as if never made (a withheld fast-path call)
        // gives back the allowance its hold counted.
        if request.restores_allowance
            && let Some(hold) = tx
                .fetch_optional(statement!(sql::HOLD_MADE_AT, payment_id))
                .await?
        {
            let made_at = hold.int("created_at")?;
            let wallet = destination.int("account_id")?;
            tx.execute(statement!(sql::GIVE_BACK_SPEND, wallet, amount, made_at))
                .await?;
        }
        tx.execute(statement!(
            sql::INSERT_REFUND,
            &request.idempotency_key,
            payment_id,
            &posted.txn_id,
            amount,
            &request.reason,
            at
        ))
        .await?;
        tx.commit().await?;
        Ok(Refunded {
            txn_id: posted.txn_id,
            amount: Units(amount),
            currency,
            captured: Units(captured),
            refunded: Units(refunded + amount),
            replayed: false,
        })
    }

    /// `ledger verify`'s checks, on a connection the backend holds in one
    /// read snapshot.
    pub async fn verify(conn: &mut DB::Connection, now: i64) -> Result<VerifyReport, StoreError> {
        let found = verify::Found {
            counts: query(statement!(verify::COUNTS))
                .fetch_one(&mut *conn)
                .await?,
            unbalanced: query(statement!(verify::UNBALANCED))
                .fetch_all(&mut *conn)
                .await?,
            orphan_entries: query(statement!(verify::ORPHAN_ENTRIES))
                .fetch_all(&mut *conn)
                .await?,
            accounts: query(statement!(verify::ACCOUNTS))
                .fetch_all(&mut *conn)
                .await?,
            stale_holds: query(statement!(
                verify::STALE_HOLDS,
                now - verify::SWEEP_GRACE_MS
            ))
            .fetch_all(&mut *conn)
            .await?,
            over_captured: query(statement!(verify::OVER_CAPTURED))
                .fetch_all(&mut *conn)
                .await?,
            unposted_captures: query(statement!(verify::UNPOSTED_CAPTURES))
                .fetch_all(&mut *conn)
                .await?,
            over_refunded: query(statement!(verify::OVER_REFUNDED))
                .fetch_all(&mut *conn)
                .await?,
        };
        found.report()
    }
}

/// Why a hold was refused (`at`: when it was asked for): a limit of the
/// wallet's (`limits`: the principal's wallets), else not enough funds.
/// The highest ledger entry id (0 for none), read in `tx`.
pub(super) async fn entries_upto(tx: &mut impl Tx) -> Result<i64, StoreError> {
    tx.fetch_one(statement!(sql::ENTRIES_UPTO))
        .await?
        .int("upto")
}

pub(super) fn refused_hold(req: &HoldRequest, limits: Vec<WalletLimits>, at: i64) -> HoldOutcome {
    let breach = limits.into_iter().find_map(|w| {
        (w.currency == req.currency)
            .then(|| {
                w.limits.breach(
                    &req.principal,
                    &w.currency,
                    &w.spent,
                    Some(&req.tool),
                    req.amount,
                    at,
                )
            })
            .flatten()
    });
    breach.map_or(HoldOutcome::Insufficient, HoldOutcome::OverLimit)
}
