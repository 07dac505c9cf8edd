//! SQLite backend. WAL mode; every multi-statement write transaction starts
//! with `BEGIN IMMEDIATE` so that two writers never both read and then fail
//! to upgrade (SQLITE_BUSY). A write that is one statement runs on its own:
//! it is atomic, and takes the write lock when it starts, so it cannot fail
//! to upgrade either, and it costs one round trip instead of three. Several
//! processes may open the same file.

use std::{collections::HashMap, str::FromStr, sync::Mutex, time::Duration};

use async_trait::async_trait;
use sqlx::{
    Row, Sqlite, SqliteConnection, Transaction,
    sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
    },
};

mod fast_writes;

use fast_writes::{FastWrite, FastWriter};

use super::{
    posting::{
        Settlement, TxnHeader, check_balanced, clearing, dev_settlement, external_payment_audit,
        session_payment_audit, settled_capture, topup_audit, topups,
    },
    rows,
    sql::*,
    verify, *,
};
use crate::{config::Synchronous, keys::ApiKey};

pub struct SqliteStore {
    pool: SqlitePool,
    /// The fast path's writes (hold, capture, release) go through one
    /// connection of their own, with group commit. A pooled connection would
    /// cost extra round trips to SQLite's worker thread per use (sqlx pings
    /// it on release), and SQLite serialises writers anyway.
    fast_writes: FastWriter,
    /// Account ids never change once created, so they are cached.
    account_ids: Mutex<HashMap<AccountRef, i64>>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database and applies migrations.
    pub async fn connect(url: &str, synchronous: Synchronous) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match synchronous {
                Synchronous::Full => SqliteSynchronous::Full,
                Synchronous::Normal => SqliteSynchronous::Normal,
            })
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .min_connections(1)
            // A local file needs no ping before every use.
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await?;
        let fast_writes = FastWriter::spawn(sqlx::ConnectOptions::connect(&options).await?);
        let store = Self {
            pool,
            fast_writes,
            account_ids: Mutex::new(HashMap::new()),
        };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        // SQLite migrations take no cross-process lock; when two processes
        // start at once the loser sees the winner's tables and tries again.
        let mut attempt = 0;
        loop {
            match sqlx::migrate!("./migrations/sqlite").run(&self.pool).await {
                Ok(()) => return Ok(()),
                Err(e) if attempt < 5 => {
                    attempt += 1;
                    tracing::debug!("migration attempt {attempt} failed ({e}); retrying");
                    tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    async fn write_tx(&self) -> Result<Transaction<'_, Sqlite>, StoreError> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// The id of an account, creating the (empty) account if needed.
    async fn account_id(&self, account: &AccountRef) -> Result<i64, StoreError> {
        if let Some(id) = self.cached_account(account) {
            return Ok(id);
        }
        query(Statement::create_account(account, now_ms()))
            .execute(&self.pool)
            .await?;
        let id: i64 = query(Statement::account_id(account))
            .fetch_one(&self.pool)
            .await?
            .try_get("id")?;
        if let Ok(mut cache) = self.account_ids.lock() {
            cache.insert(account.clone(), id);
        }
        Ok(id)
    }

    fn cached_account(&self, account: &AccountRef) -> Option<i64> {
        self.account_ids.lock().ok()?.get(account).copied()
    }

    /// Writes one balanced transaction: header and entries (balances follow
    /// by trigger).
    async fn post(
        conn: &mut SqliteConnection,
        header: TxnHeader<'_>,
        entries: &[(i64, i64)],
    ) -> Result<Posted, StoreError> {
        check_balanced(header.kind, entries)?;
        query(Statement::insert_transaction(&header))
            .execute(&mut *conn)
            .await?;
        for &(account_id, amount) in entries {
            // The `ledger_entries_post` trigger moves the account's balance.
            query(Statement::insert_entry(
                &header.id, account_id, amount, header.at,
            ))
            .execute(&mut *conn)
            .await?;
        }
        Ok(Posted {
            txn_id: header.id,
            at: header.at,
        })
    }

    async fn hold_state(&self, hold_id: &str) -> Result<StoreError, StoreError> {
        let status: Option<String> = sqlx::query_scalar(HOLD_STATUS)
            .bind(hold_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(StoreError::hold_not_open(hold_id, status))
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn topup(
        &self,
        wallet: &AccountRef,
        amount: Units,
        memo: Option<String>,
    ) -> Result<Posted, StoreError> {
        if amount.is_zero() {
            return Err(StoreError::Invalid(
                "top-up amount must be above zero".into(),
            ));
        }
        let wallet_id = self.account_id(wallet).await?;
        let source_id = self.account_id(&topups(&wallet.currency)).await?;
        let audit = topup_audit(wallet, memo);
        let mut tx = self.write_tx().await?;
        let posted = Self::post(
            &mut tx,
            TxnHeader {
                id: new_txn_id(),
                kind: "topup",
                currency: &wallet.currency,
                amount,
                audit: &audit,
                at: now_ms(),
            },
            &[(source_id, -amount.0), (wallet_id, amount.0)],
        )
        .await?;
        tx.commit().await?;
        Ok(posted)
    }

    async fn balances(&self, wallet: &str) -> Result<Vec<WalletBalance>, StoreError> {
        let rows = sqlx::query(BALANCES)
            .bind(wallet)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(rows::wallet_balance).collect()
    }

    async fn statement(&self, wallet: &str) -> Result<Vec<StatementLine>, StoreError> {
        let rows = sqlx::query(STATEMENT)
            .bind(wallet)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(rows::statement_line).collect()
    }

    async fn hold(&self, req: &HoldRequest) -> Result<HoldOutcome, StoreError> {
        if req.amount.is_zero() {
            return Err(StoreError::Invalid("hold amount must be above zero".into()));
        }
        // One conditional INSERT: the balance check and the reservation (by
        // the `holds_reserve` trigger) happen atomically under the write lock.
        let held = self
            .fast_writes
            .write(FastWrite::Hold {
                id: req.hold_id.clone(),
                principal: req.principal.clone(),
                currency: req.currency.as_str().to_owned(),
                amount: req.amount.0,
                tool: req.tool.clone(),
                args_hash: req.args_hash.clone(),
                created_at: now_ms(),
                expires_at: req.expires_at,
            })
            .await?;
        Ok(if held {
            HoldOutcome::Held
        } else {
            HoldOutcome::Insufficient
        })
    }

    async fn capture(
        &self,
        hold_id: &str,
        amount: Units,
        beneficiary: &AccountRef,
    ) -> Result<Posted, StoreError> {
        if amount.is_zero() {
            return Err(StoreError::Invalid(
                "capture amount must be above zero; release instead".into(),
            ));
        }
        let beneficiary_id = self.account_id(beneficiary).await?;
        let at = now_ms();
        let txn_id = new_txn_id();
        // One conditional UPDATE; the `holds_capture` trigger gives the
        // reservation back and posts the ledger transaction, all or nothing.
        let captured = self
            .fast_writes
            .write(FastWrite::Capture {
                hold_id: hold_id.to_owned(),
                amount: amount.0,
                at,
                txn_id: txn_id.clone(),
                beneficiary_id,
            })
            .await?;
        if captured {
            return Ok(Posted { txn_id, at });
        }
        let hold = sqlx::query(HOLD)
            .bind(hold_id)
            .fetch_optional(&self.pool)
            .await?;
        settled_capture(hold_id, hold.as_ref(), amount, beneficiary_id)
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
            Err(self.hold_state(hold_id).await?)
        }
    }

    async fn sweep_expired(&self, now: i64) -> Result<u64, StoreError> {
        // The write lock is taken up front: one sweeper at a time.
        let mut tx = self.write_tx().await?;
        // `holds_end` gives each expired reservation back.
        let expired = sqlx::query(
            "UPDATE holds SET status = 'expired', settled_at = $1 WHERE status = 'open' AND expires_at < $1",
        )
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query(
            "UPDATE intents SET status = 'expired', updated_at = $1
             WHERE status = 'awaiting_payment' AND expires_at < $1
               AND NOT EXISTS (SELECT 1 FROM payment_sessions s
                               WHERE s.id = intents.provider_session_id AND s.status = 'paid')",
        )
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE payment_sessions SET status = 'expired', updated_at = $1 WHERE status = 'pending' AND expires_at < $1",
        )
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(expired)
    }

    async fn verify(&self, now: i64) -> Result<VerifyReport, StoreError> {
        // One read transaction, so every check sees the same snapshot.
        let mut tx = self.pool.begin().await?;
        let found = verify::Found {
            counts: sqlx::query(verify::COUNTS).fetch_one(&mut *tx).await?,
            unbalanced: sqlx::query(verify::UNBALANCED).fetch_all(&mut *tx).await?,
            orphan_entries: sqlx::query(verify::ORPHAN_ENTRIES)
                .fetch_all(&mut *tx)
                .await?,
            accounts: sqlx::query(verify::ACCOUNTS).fetch_all(&mut *tx).await?,
            stale_holds: sqlx::query(verify::STALE_HOLDS)
                .bind(now)
                .fetch_all(&mut *tx)
                .await?,
            over_captured: sqlx::query(verify::OVER_CAPTURED)
                .fetch_all(&mut *tx)
                .await?,
        };
        tx.rollback().await?;
        found.report()
    }

    async fn create_intent(&self, intent: &Intent) -> Result<(), StoreError> {
        query(Statement::create_intent(intent))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn intent(&self, id: &str) -> Result<Option<Intent>, StoreError> {
        let row = sqlx::query(INTENT)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(rows::intent).transpose()
    }

    async fn transition_intent(
        &self,
        id: &str,
        from: IntentStatus,
        to: IntentStatus,
    ) -> Result<bool, StoreError> {
        let done = query(Statement::transition_intent(id, from, to, now_ms()))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn mark_intent_paid(&self, id: &str, funding: &Funding) -> Result<bool, StoreError> {
        let now = now_ms();
        let account = match funding {
            Funding::InClearing { refund_to } => {
                let refund_id = match refund_to {
                    Some(account) => Some(self.account_id(account).await?),
                    None => None,
                };
                let done = sqlx::query(MARK_PAID)
                    .bind(id)
                    .bind(refund_id)
                    .bind(now)
                    .execute(&self.pool)
                    .await?;
                return Ok(done.rows_affected() > 0);
            }
            Funding::External { account } => account,
        };
        // Paid elsewhere: the money enters the ledger as the intent is
        // marked paid, in one transaction.
        let Some(intent) = self.intent(id).await? else {
            return Err(StoreError::NotFound(format!("intent {id}")));
        };
        let source = AccountRef::new(AccountKind::External, account.as_str(), &intent.currency);
        let source_id = self.account_id(&source).await?;
        let clearing_id = self.account_id(&clearing(&intent.currency)).await?;
        let audit = external_payment_audit(&intent, account);
        let mut tx = self.write_tx().await?;
        let done = sqlx::query(MARK_PAID)
            .bind(id)
            .bind(source_id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        let header = TxnHeader {
            id: new_txn_id(),
            kind: "session_payment",
            currency: &intent.currency,
            amount: intent.amount,
            audit: &audit,
            at: now,
        };
        Self::post(
            &mut tx,
            header,
            &[
                (source_id, -intent.amount.0),
                (clearing_id, intent.amount.0),
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn finish_intent(&self, outcome: &IntentOutcome) -> Result<Option<Posted>, StoreError> {
        let currency = &outcome.beneficiary.currency;
        let clearing_id = self.account_id(&clearing(currency)).await?;
        let beneficiary_id = self.account_id(&outcome.beneficiary).await?;
        let mut tx = self.write_tx().await?;
        let row = query(Statement::finish_intent(outcome))
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            return Err(StoreError::intent_not_running(&outcome.intent_id));
        };
        query(Statement::store_result(outcome))
            .execute(&mut *tx)
            .await?;
        let settlement = Settlement::of(outcome, &row, beneficiary_id)?;
        let posted = match settlement.destination {
            Some((kind, to)) => Some(
                Self::post(
                    &mut tx,
                    TxnHeader {
                        id: outcome.txn_id.clone(),
                        kind,
                        currency,
                        amount: settlement.amount,
                        audit: &settlement.audit,
                        at: outcome.at,
                    },
                    &[
                        (clearing_id, -settlement.amount.0),
                        (to, settlement.amount.0),
                    ],
                )
                .await?,
            ),
            None => None,
        };
        tx.commit().await?;
        Ok(posted)
    }

    async fn stored_result(&self, intent_id: &str) -> Result<Option<StoredResult>, StoreError> {
        let row = sqlx::query(STORED_RESULT)
            .bind(intent_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| {
            Ok(StoredResult {
                is_error: row.try_get("is_error")?,
                result_json: row.try_get("result_json")?,
            })
        })
        .transpose()
    }

    async fn create_session(&self, session: &LocalSession) -> Result<(), StoreError> {
        query(Statement::create_session(session))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn session(&self, id: &str) -> Result<Option<LocalSession>, StoreError> {
        let row = sqlx::query(&sessions_where("WHERE s.id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(rows::session).transpose()
    }

    async fn list_sessions(&self, limit: i64) -> Result<Vec<LocalSession>, StoreError> {
        let rows = sqlx::query(&sessions_where("ORDER BY s.created_at DESC, s.id LIMIT $1"))
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(rows::session).collect()
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
        let source = match from_wallet {
            Some(wallet) => AccountRef::wallet(wallet, &session.currency),
            None => dev_settlement(&session.currency),
        };
        let source_id = self.account_id(&source).await?;
        let clearing_id = self.account_id(&clearing(&session.currency)).await?;

        let mut tx = self.write_tx().await?;
        // Re-read inside the write transaction: the status may have moved.
        let row = sqlx::query("SELECT status, expires_at FROM payment_sessions WHERE id = $1")
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        let status: String = row.try_get("status")?;
        let expires_at: i64 = row.try_get("expires_at")?;
        if status == "pending" && now > expires_at {
            sqlx::query(EXPIRE_SESSION)
                .bind(id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            return Err(StoreError::session_not_pending(id, "expired".into()));
        }
        if status != "pending" {
            return Err(StoreError::session_not_pending(id, status));
        }
        if let Some(wallet) = from_wallet {
            // Checked inside the IMMEDIATE transaction: no writer can slip in.
            let available: i64 =
                sqlx::query_scalar("SELECT balance - held FROM accounts WHERE id = $1")
                    .bind(source_id)
                    .fetch_one(&mut *tx)
                    .await?;
            if available < session.amount.0 {
                return Err(StoreError::insufficient(wallet, &session, available));
            }
        }
        let audit = session_payment_audit(&session, from_wallet);
        let posted = Self::post(
            &mut tx,
            TxnHeader {
                id: new_txn_id(),
                kind: "session_payment",
                currency: &session.currency,
                amount: session.amount,
                audit: &audit,
                at: now,
            },
            &[
                (source_id, -session.amount.0),
                (clearing_id, session.amount.0),
            ],
        )
        .await?;
        sqlx::query(MARK_SESSION_PAID)
            .bind(id)
            .bind(source_id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(posted)
    }

    async fn end_session(&self, id: &str, to: SessionStatus) -> Result<bool, StoreError> {
        check_session_ending(to)?;
        let done = query(Statement::end_session(id, to, now_ms()))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn create_api_key(&self, key: &ApiKey) -> Result<(), StoreError> {
        query(Statement::create_api_key(key, &key.scopes_text()))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn api_key(&self, id: &str) -> Result<Option<ApiKey>, StoreError> {
        let row = sqlx::query(API_KEY)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(rows::api_key).transpose()
    }

    async fn api_keys(&self) -> Result<Vec<ApiKey>, StoreError> {
        let rows = sqlx::query(API_KEYS).fetch_all(&self.pool).await?;
        rows.iter().map(rows::api_key).collect()
    }

    async fn revoke_api_key(&self, id: &str, now: i64) -> Result<bool, StoreError> {
        let done = sqlx::query(REVOKE_API_KEY)
            .bind(id)
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        let open_holds = sqlx::query(STATS_OPEN_HOLDS).fetch_one(&self.pool).await?;
        let intents = sqlx::query(STATS_INTENTS).fetch_all(&self.pool).await?;
        let revenue = sqlx::query(STATS_REVENUE).fetch_all(&self.pool).await?;
        rows::stats(&open_holds, &intents, &revenue)
    }
}
