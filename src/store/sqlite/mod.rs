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

use super::*;
use crate::{config::Synchronous, keys::ApiKey, money::format_amount};

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

/// The account that holds money paid through sessions until a run earns it.
fn clearing(currency: &Currency) -> AccountRef {
    AccountRef::new(AccountKind::Clearing, "payments", currency)
}

/// Where dev-mode settlements come from.
fn dev_settlement(currency: &Currency) -> AccountRef {
    AccountRef::new(AccountKind::External, "dev-settlement", currency)
}

fn topups(currency: &Currency) -> AccountRef {
    AccountRef::new(AccountKind::External, "topups", currency)
}

struct TxnHeader<'a> {
    id: String,
    kind: &'a str,
    currency: &'a Currency,
    amount: Units,
    audit: &'a Audit,
    at: i64,
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
        sqlx::query(
            "INSERT INTO accounts (kind, name, currency, created_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (kind, name, currency) DO NOTHING",
        )
        .bind(account.kind.as_str())
        .bind(&account.name)
        .bind(account.currency.as_str())
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        let id: i64 = sqlx::query_scalar(
            "SELECT id FROM accounts WHERE kind = ?1 AND name = ?2 AND currency = ?3",
        )
        .bind(account.kind.as_str())
        .bind(&account.name)
        .bind(account.currency.as_str())
        .fetch_one(&self.pool)
        .await?;
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
        let sum: i64 = entries.iter().map(|(_, amount)| amount).sum();
        if sum != 0 {
            return Err(StoreError::Invalid(format!(
                "unbalanced {} transaction (sums to {sum})",
                header.kind
            )));
        }
        let txn_id = header.id;
        let a = header.audit;
        sqlx::query(
            "INSERT INTO ledger_transactions
               (id, kind, currency, amount, payer, beneficiary, tool, intent_id, payment_id, memo, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )
        .bind(&txn_id)
        .bind(header.kind)
        .bind(header.currency.as_str())
        .bind(header.amount.0)
        .bind(&a.payer)
        .bind(&a.beneficiary)
        .bind(&a.tool)
        .bind(&a.intent_id)
        .bind(&a.payment_id)
        .bind(&a.memo)
        .bind(header.at)
        .execute(&mut *conn)
        .await?;
        for (account_id, amount) in entries {
            // The `ledger_entries_post` trigger moves the account's balance.
            sqlx::query("INSERT INTO ledger_entries (txn_id, account_id, amount, created_at) VALUES (?1, ?2, ?3, ?4)")
                .bind(&txn_id)
                .bind(account_id)
                .bind(amount)
                .bind(header.at)
                .execute(&mut *conn)
                .await?;
        }
        Ok(Posted {
            txn_id,
            at: header.at,
        })
    }

    async fn hold_state(&self, hold_id: &str) -> Result<StoreError, StoreError> {
        let status: Option<String> = sqlx::query_scalar("SELECT status FROM holds WHERE id = ?1")
            .bind(hold_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match status {
            None => StoreError::NotFound(format!("hold {hold_id}")),
            Some(status) => StoreError::WrongState {
                what: format!("hold {hold_id}"),
                status,
                expected: "open",
            },
        })
    }
}

/// awaiting_payment → paid, noting the account a refund goes back to.
const MARK_PAID: &str =
    "UPDATE intents SET status = 'paid', refund_account_id = ?2, updated_at = ?3
     WHERE id = ?1 AND status = 'awaiting_payment'";

fn api_key_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<ApiKey, StoreError> {
    Ok(ApiKey {
        id: row.try_get("id")?,
        secret_hash: row.try_get("secret_hash")?,
        principal: row.try_get("principal")?,
        scopes: parse_scopes(&row.try_get::<String, _>("scopes")?)?,
        label: row.try_get("label")?,
        created_at: row.try_get("created_at")?,
        revoked_at: row.try_get("revoked_at")?,
    })
}

fn currency_of(text: String) -> Result<Currency, StoreError> {
    Currency::parse(&text).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn intent_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<Intent, StoreError> {
    let status: String = row.try_get("status")?;
    Ok(Intent {
        id: row.try_get("id")?,
        tool: row.try_get("tool")?,
        args_hash: row.try_get("args_hash")?,
        args_json: row.try_get("args_json")?,
        amount: Units(row.try_get("amount")?),
        currency: currency_of(row.try_get("currency")?)?,
        principal: row.try_get("principal")?,
        session_id: row.try_get("session_id")?,
        mode: row.try_get("mode")?,
        status: IntentStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("intent status {status}")))?,
        provider: row.try_get("provider")?,
        provider_session_id: row.try_get("provider_session_id")?,
        payment_url: row.try_get("payment_url")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
    })
}

const SESSION_COLUMNS: &str =
    "s.id, s.amount, s.currency, s.description, s.status, s.created_at, s.expires_at,
     s.owner, a.kind AS paid_kind, a.name AS paid_name";

fn session_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<LocalSession, StoreError> {
    let status: String = row.try_get("status")?;
    let currency = currency_of(row.try_get("currency")?)?;
    let paid_kind: Option<String> = row.try_get("paid_kind")?;
    let paid_name: Option<String> = row.try_get("paid_name")?;
    let paid_from = match (paid_kind.as_deref().and_then(AccountKind::parse), paid_name) {
        (Some(kind), Some(name)) => Some(AccountRef::new(kind, name, &currency)),
        _ => None,
    };
    Ok(LocalSession {
        id: row.try_get("id")?,
        amount: Units(row.try_get("amount")?),
        currency,
        description: row.try_get("description")?,
        status: SessionStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("session status {status}")))?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        paid_from,
        owner: row.try_get("owner")?,
    })
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
        let audit = Audit {
            beneficiary: Some(wallet.name.clone()),
            memo,
            ..Audit::default()
        };
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
        let rows = sqlx::query(
            "SELECT currency, balance, held FROM accounts WHERE kind = 'wallet' AND name = ?1 ORDER BY currency",
        )
        .bind(wallet)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let balance: i64 = row.try_get("balance")?;
                let held: i64 = row.try_get("held")?;
                Ok(WalletBalance {
                    currency: currency_of(row.try_get("currency")?)?,
                    balance: Units(balance),
                    held: Units(held),
                    available: Units(balance - held),
                })
            })
            .collect()
    }

    async fn statement(&self, wallet: &str) -> Result<Vec<StatementLine>, StoreError> {
        let rows = sqlx::query(
            "SELECT t.id, t.kind, t.created_at, e.amount, a.currency, t.tool, t.payment_id, t.beneficiary, t.memo
             FROM ledger_entries e
             JOIN accounts a ON a.id = e.account_id
             JOIN ledger_transactions t ON t.id = e.txn_id
             WHERE a.kind = 'wallet' AND a.name = ?1
             ORDER BY e.id",
        )
        .bind(wallet)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(StatementLine {
                    txn_id: row.try_get("id")?,
                    kind: row.try_get("kind")?,
                    at: row.try_get("created_at")?,
                    amount: row.try_get("amount")?,
                    currency: currency_of(row.try_get("currency")?)?,
                    tool: row.try_get("tool")?,
                    payment_id: row.try_get("payment_id")?,
                    beneficiary: row.try_get("beneficiary")?,
                    memo: row.try_get("memo")?,
                })
            })
            .collect()
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
        let held: Option<i64> =
            sqlx::query_scalar("SELECT amount FROM holds WHERE id = ?1 AND status = 'open'")
                .bind(hold_id)
                .fetch_optional(&self.pool)
                .await?;
        Err(match held {
            Some(held) => StoreError::Invalid(format!(
                "capture of {} is above the hold of {}",
                format_amount(amount),
                format_amount(Units(held))
            )),
            None => self.hold_state(hold_id).await?,
        })
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
        let mut tx = self.write_tx().await?;
        // `holds_end` gives each expired reservation back.
        let expired = sqlx::query(
            "UPDATE holds SET status = 'expired', settled_at = ?1 WHERE status = 'open' AND expires_at < ?1",
        )
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query(
            "UPDATE intents SET status = 'expired', updated_at = ?1
             WHERE status = 'awaiting_payment' AND expires_at < ?1
               AND NOT EXISTS (SELECT 1 FROM payment_sessions s
                               WHERE s.id = intents.provider_session_id AND s.status = 'paid')",
        )
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE payment_sessions SET status = 'expired', updated_at = ?1 WHERE status = 'pending' AND expires_at < ?1",
        )
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(expired)
    }

    async fn verify(&self, now: i64) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport::default();
        // One read transaction, so every check sees the same snapshot.
        let mut tx = self.pool.begin().await?;
        report.transactions = sqlx::query_scalar("SELECT COUNT(*) FROM ledger_transactions")
            .fetch_one(&mut *tx)
            .await?;
        report.accounts = sqlx::query_scalar("SELECT COUNT(*) FROM accounts")
            .fetch_one(&mut *tx)
            .await?;
        report.open_holds = sqlx::query_scalar("SELECT COUNT(*) FROM holds WHERE status = 'open'")
            .fetch_one(&mut *tx)
            .await?;

        for row in sqlx::query(
            "SELECT t.id, COALESCE(e.total, 0) AS total, COALESCE(e.n, 0) AS n
             FROM ledger_transactions t
             LEFT JOIN (SELECT txn_id, SUM(amount) AS total, COUNT(*) AS n FROM ledger_entries GROUP BY txn_id) e
               ON e.txn_id = t.id
             WHERE COALESCE(e.total, 0) <> 0 OR COALESCE(e.n, 0) < 2",
        )
        .fetch_all(&mut *tx)
        .await?
        {
            let id: String = row.try_get("id")?;
            let total: i64 = row.try_get("total")?;
            let n: i64 = row.try_get("n")?;
            report.problems.push(if n < 2 {
                format!("transaction {id} has {n} entries")
            } else {
                format!(
                    "transaction {id} sums to {}, not zero",
                    format_signed(total)
                )
            });
        }
        for row in sqlx::query(
            "SELECT e.id, e.txn_id FROM ledger_entries e
             LEFT JOIN ledger_transactions t ON t.id = e.txn_id
             LEFT JOIN accounts a ON a.id = e.account_id
             WHERE t.id IS NULL OR a.id IS NULL OR a.currency <> t.currency",
        )
        .fetch_all(&mut *tx)
        .await?
        {
            report.problems.push(format!(
                "entry {} of {} has no transaction, no account, or another currency",
                row.try_get::<i64, _>("id")?,
                row.try_get::<String, _>("txn_id")?
            ));
        }
        for row in sqlx::query(
            "SELECT a.kind, a.name, a.currency, a.balance, a.held,
                    (SELECT COALESCE(SUM(e.amount), 0) FROM ledger_entries e WHERE e.account_id = a.id) AS posted,
                    (SELECT COALESCE(SUM(h.amount), 0) FROM holds h WHERE h.account_id = a.id AND h.status = 'open') AS open_held
             FROM accounts a ORDER BY a.id",
        )
        .fetch_all(&mut *tx)
        .await?
        {
            let name = format!(
                "{}:{} ({})",
                row.try_get::<String, _>("kind")?,
                row.try_get::<String, _>("name")?,
                row.try_get::<String, _>("currency")?
            );
            let kind: String = row.try_get("kind")?;
            let balance: i64 = row.try_get("balance")?;
            let held: i64 = row.try_get("held")?;
            let posted: i64 = row.try_get("posted")?;
            let open_held: i64 = row.try_get("open_held")?;
            if balance != posted {
                report.problems.push(format!(
                    "account {name}: balance {} but its entries sum to {}",
                    format_signed(balance),
                    format_signed(posted)
                ));
            }
            if held != open_held {
                report.problems.push(format!(
                    "account {name}: held {} but its open holds sum to {}",
                    format_signed(held),
                    format_signed(open_held)
                ));
            }
            if kind == "wallet" && (balance < 0 || balance - held < 0) {
                report.problems.push(format!(
                    "wallet {name}: available balance {} is below zero",
                    format_signed(balance - held)
                ));
            }
        }
        let stale: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM holds WHERE status = 'open' AND expires_at < ?1 ORDER BY id",
        )
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        for id in stale {
            report
                .problems
                .push(format!("hold {id} is open past its expiry"));
        }
        let over: Vec<String> = sqlx::query_scalar("SELECT id FROM holds WHERE captured > amount")
            .fetch_all(&mut *tx)
            .await?;
        for id in over {
            report
                .problems
                .push(format!("hold {id} captured more than it held"));
        }
        tx.rollback().await?;
        Ok(report)
    }

    async fn create_intent(&self, intent: &Intent) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO intents (id, tool, args_hash, args_json, amount, currency, principal, session_id, mode,
                                  status, provider, provider_session_id, payment_url, created_at, expires_at,
                                  updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?14)",
        )
        .bind(&intent.id)
        .bind(&intent.tool)
        .bind(&intent.args_hash)
        .bind(&intent.args_json)
        .bind(intent.amount.0)
        .bind(intent.currency.as_str())
        .bind(&intent.principal)
        .bind(&intent.session_id)
        .bind(&intent.mode)
        .bind(intent.status.as_str())
        .bind(&intent.provider)
        .bind(&intent.provider_session_id)
        .bind(&intent.payment_url)
        .bind(intent.created_at)
        .bind(intent.expires_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn intent(&self, id: &str) -> Result<Option<Intent>, StoreError> {
        let row = sqlx::query("SELECT * FROM intents WHERE id = ?1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(intent_from_row).transpose()
    }

    async fn transition_intent(
        &self,
        id: &str,
        from: IntentStatus,
        to: IntentStatus,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE intents SET status = ?3, updated_at = ?4 WHERE id = ?1 AND status = ?2",
        )
        .bind(id)
        .bind(from.as_str())
        .bind(to.as_str())
        .bind(now_ms())
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
        let audit = Audit {
            payer: intent.principal.clone(),
            beneficiary: Some("clearing:payments".into()),
            tool: Some(intent.tool.clone()),
            intent_id: Some(id.to_owned()),
            payment_id: Some(id.to_owned()),
            memo: Some(format!("paid through {account}")),
        };
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
        let now = outcome.at;
        let mut tx = self.write_tx().await?;
        let row = sqlx::query(
            "UPDATE intents SET status = ?2, updated_at = ?3 WHERE id = ?1 AND status = 'running'
             RETURNING amount, currency, principal, tool, refund_account_id",
        )
        .bind(&outcome.intent_id)
        .bind(if outcome.succeeded {
            "succeeded"
        } else {
            "failed"
        })
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Err(StoreError::WrongState {
                what: format!("intent {}", outcome.intent_id),
                status: "not running".into(),
                expected: "running",
            });
        };
        sqlx::query("INSERT INTO stored_results (intent_id, is_error, result_json, created_at) VALUES (?1, ?2, ?3, ?4)")
            .bind(&outcome.intent_id)
            .bind(!outcome.succeeded)
            .bind(&outcome.result_json)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let amount = Units(row.try_get("amount")?);
        let intent_currency = currency_of(row.try_get("currency")?)?;
        if &intent_currency != currency {
            return Err(StoreError::Invalid(format!(
                "intent {} is in {intent_currency}, beneficiary account in {currency}",
                outcome.intent_id
            )));
        }
        let refund_account: Option<i64> = row.try_get("refund_account_id")?;
        let mut audit = Audit {
            payer: row.try_get("principal")?,
            tool: row.try_get("tool")?,
            intent_id: Some(outcome.intent_id.clone()),
            payment_id: Some(outcome.intent_id.clone()),
            ..Audit::default()
        };
        // Charge on success: a successful run earns the payment, a failed
        // one gives it back to whoever paid.
        let destination = if outcome.succeeded {
            audit.beneficiary = Some(outcome.beneficiary.name.clone());
            Some(("capture", beneficiary_id))
        } else {
            audit.memo = Some("tool failed: payment refunded".into());
            refund_account.map(|account| ("refund", account))
        };
        let posted = match destination {
            Some((kind, to)) => {
                let header = TxnHeader {
                    id: outcome.txn_id.clone(),
                    kind,
                    currency,
                    amount,
                    audit: &audit,
                    at: now,
                };
                Some(
                    Self::post(&mut tx, header, &[(clearing_id, -amount.0), (to, amount.0)])
                        .await?,
                )
            }
            None => None,
        };
        tx.commit().await?;
        Ok(posted)
    }

    async fn stored_result(&self, intent_id: &str) -> Result<Option<StoredResult>, StoreError> {
        let row =
            sqlx::query("SELECT is_error, result_json FROM stored_results WHERE intent_id = ?1")
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
        sqlx::query(
            "INSERT INTO payment_sessions (id, amount, currency, description, status, created_at, expires_at, updated_at, owner)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?6, ?8)",
        )
        .bind(&session.id)
        .bind(session.amount.0)
        .bind(session.currency.as_str())
        .bind(&session.description)
        .bind(session.status.as_str())
        .bind(session.created_at)
        .bind(session.expires_at)
        .bind(&session.owner)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn session(&self, id: &str) -> Result<Option<LocalSession>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {SESSION_COLUMNS} FROM payment_sessions s
             LEFT JOIN accounts a ON a.id = s.paid_from_account WHERE s.id = ?1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(session_from_row).transpose()
    }

    async fn list_sessions(&self, limit: i64) -> Result<Vec<LocalSession>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {SESSION_COLUMNS} FROM payment_sessions s
             LEFT JOIN accounts a ON a.id = s.paid_from_account ORDER BY s.created_at DESC, s.id LIMIT ?1"
        ))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(session_from_row).collect()
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
        let row = sqlx::query("SELECT status, expires_at FROM payment_sessions WHERE id = ?1")
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        let status: String = row.try_get("status")?;
        let expires_at: i64 = row.try_get("expires_at")?;
        if status == "pending" && now > expires_at {
            sqlx::query(
                "UPDATE payment_sessions SET status = 'expired', updated_at = ?2 WHERE id = ?1",
            )
            .bind(id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            return Err(StoreError::WrongState {
                what: format!("payment session {id}"),
                status: "expired".into(),
                expected: "pending",
            });
        }
        if status != "pending" {
            return Err(StoreError::WrongState {
                what: format!("payment session {id}"),
                status,
                expected: "pending",
            });
        }
        if let Some(wallet) = from_wallet {
            // Checked inside the IMMEDIATE transaction: no writer can slip in.
            let available: i64 =
                sqlx::query_scalar("SELECT balance - held FROM accounts WHERE id = ?1")
                    .bind(source_id)
                    .fetch_one(&mut *tx)
                    .await?;
            if available < session.amount.0 {
                return Err(StoreError::InsufficientFunds {
                    wallet: wallet.to_owned(),
                    currency: session.currency.clone(),
                    available: format_amount(Units(available)),
                    needed: format_amount(session.amount),
                });
            }
        }
        let audit = Audit {
            payer: Some(from_wallet.unwrap_or("dev-settlement").to_owned()),
            beneficiary: Some("clearing:payments".into()),
            intent_id: Some(id.to_owned()),
            payment_id: Some(id.to_owned()),
            memo: Some(session.description.clone()),
            ..Audit::default()
        };
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
        sqlx::query(
            "UPDATE payment_sessions SET status = 'paid', paid_from_account = ?2, updated_at = ?3
             WHERE id = ?1 AND status = 'pending'",
        )
        .bind(id)
        .bind(source_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(posted)
    }

    async fn end_session(&self, id: &str, to: SessionStatus) -> Result<bool, StoreError> {
        if matches!(to, SessionStatus::Pending | SessionStatus::Paid) {
            return Err(StoreError::Invalid(format!(
                "a session cannot be ended as {}",
                to.as_str()
            )));
        }

        let done = sqlx::query(
            "UPDATE payment_sessions SET status = ?2, updated_at = ?3 WHERE id = ?1 AND status = 'pending'",
        )
        .bind(id)
        .bind(to.as_str())
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn create_api_key(&self, key: &ApiKey) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO api_keys (id, secret_hash, principal, scopes, label, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .bind(&key.id)
        .bind(&key.secret_hash)
        .bind(&key.principal)
        .bind(key.scopes_text())
        .bind(&key.label)
        .bind(key.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn api_key(&self, id: &str) -> Result<Option<ApiKey>, StoreError> {
        let row = sqlx::query("SELECT * FROM api_keys WHERE id = ?1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(api_key_from_row).transpose()
    }

    async fn api_keys(&self) -> Result<Vec<ApiKey>, StoreError> {
        let rows = sqlx::query("SELECT * FROM api_keys ORDER BY created_at, id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(api_key_from_row).collect()
    }

    async fn revoke_api_key(&self, id: &str, now: i64) -> Result<bool, StoreError> {
        let done =
            sqlx::query("UPDATE api_keys SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL")
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
        let open_holds = sqlx::query_scalar("SELECT COUNT(*) FROM holds WHERE status = 'open'")
            .fetch_one(&self.pool)
            .await?;
        let rows = sqlx::query(
            "SELECT status, COUNT(*) AS n FROM intents GROUP BY status ORDER BY status",
        )
        .fetch_all(&self.pool)
        .await?;
        let intents = rows
            .iter()
            .map(|row| Ok((row.try_get("status")?, row.try_get("n")?)))
            .collect::<Result<_, sqlx::Error>>()?;
        let rows = sqlx::query(
            "SELECT COALESCE(tool, '-') AS tool, currency, SUM(amount) AS total FROM ledger_transactions
             WHERE kind = 'capture' GROUP BY tool, currency ORDER BY tool, currency",
        )
        .fetch_all(&self.pool)
        .await?;
        let revenue = rows
            .iter()
            .map(|row| {
                Ok((
                    row.try_get("tool")?,
                    row.try_get("currency")?,
                    row.try_get("total")?,
                ))
            })
            .collect::<Result<_, sqlx::Error>>()?;
        Ok(StoreStats {
            open_holds,
            intents,
            revenue,
        })
    }
}

use crate::money::format_signed;
