//! Group commit for the fast path's writes (hold, capture, release).
//!
//! Each is one conditional statement, atomic on its own. One task owns a
//! dedicated connection and runs them: a lone write goes straight through
//! (one round trip, one commit), while writes that queued up meanwhile from
//! concurrent calls share one `BEGIN IMMEDIATE … COMMIT` script, so many
//! calls pay for one commit and one round trip to SQLite's worker thread.
//! Statements in a batch run in order inside one transaction, so each sees
//! the balances the ones before it left: the same result as running them
//! one by one. If a batch fails, it is rolled back and every write is retried
//! on its own, so one bad write cannot fail its neighbours.

use sqlx::{Row, Sqlite, SqliteConnection, query::Query, sqlite::SqliteArguments};
use tokio::sync::{mpsc, oneshot};

use crate::store::StoreError;

/// The most writes one commit carries.
const MAX_BATCH: usize = 64;

#[derive(Debug)]
pub(super) enum FastWrite {
    /// Reserve `amount` if the wallet's available balance covers it.
    Hold {
        id: String,
        principal: String,
        currency: String,
        amount: i64,
        tool: String,
        args_hash: String,
        created_at: i64,
        expires_at: i64,
    },
    /// End an open hold by charging at most its amount (the
    /// `holds_capture` trigger posts the ledger transaction).
    Capture {
        hold_id: String,
        amount: i64,
        at: i64,
        txn_id: String,
        beneficiary_id: i64,
    },
    /// End an open hold without charging.
    Release { hold_id: String, at: i64 },
}

impl FastWrite {
    /// The statement. Its parameters are plain `?`, bound in order of
    /// appearance by [`FastWrite::bind`]: sqlx numbers plain parameters
    /// across the statements of a script, but not `?NNN` ones.
    fn sql(&self) -> &'static str {
        match self {
            FastWrite::Hold { .. } => {
                "INSERT INTO holds (id, account_id, amount, status, principal, tool, args_hash, created_at, expires_at)
                 SELECT ?, id, ?, 'open', ?, ?, ?, ?, ? FROM accounts
                 WHERE kind = 'wallet' AND name = ? AND currency = ? AND balance - held >= ?"
            }
            FastWrite::Capture { .. } => {
                "UPDATE holds SET status = 'captured', captured = ?, settled_at = ?, txn_id = ?,
                                  beneficiary_account_id = ?
                 WHERE id = ? AND status = 'open' AND amount >= ?"
            }
            FastWrite::Release { .. } => {
                "UPDATE holds SET status = 'released', settled_at = ? WHERE id = ? AND status = 'open'"
            }
        }
    }

    fn bind<'q>(
        &'q self,
        q: Query<'q, Sqlite, SqliteArguments<'q>>,
    ) -> Query<'q, Sqlite, SqliteArguments<'q>> {
        match self {
            FastWrite::Hold {
                id,
                principal,
                currency,
                amount,
                tool,
                args_hash,
                created_at,
                expires_at,
            } => q
                .bind(id)
                .bind(amount)
                .bind(principal)
                .bind(tool)
                .bind(args_hash)
                .bind(created_at)
                .bind(expires_at)
                .bind(principal)
                .bind(currency)
                .bind(amount),
            FastWrite::Capture {
                hold_id,
                amount,
                at,
                txn_id,
                beneficiary_id,
            } => q
                .bind(amount)
                .bind(at)
                .bind(txn_id)
                .bind(beneficiary_id)
                .bind(hold_id)
                .bind(amount),
            FastWrite::Release { hold_id, at } => q.bind(at).bind(hold_id),
        }
    }
}

/// `Ok(true)` when the write took effect, `Ok(false)` when its condition
/// did not hold (not enough funds, hold not open, capture above the hold).
type Outcome = Result<bool, StoreError>;

pub(super) struct FastWriter {
    queue: mpsc::UnboundedSender<(FastWrite, oneshot::Sender<Outcome>)>,
}

impl FastWriter {
    pub(super) fn spawn(conn: SqliteConnection) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(conn, rx));
        Self { queue }
    }

    pub(super) async fn write(&self, write: FastWrite) -> Outcome {
        let (reply, outcome) = oneshot::channel();
        let stopped = || StoreError::Corrupt("the store's writer has stopped".into());
        self.queue.send((write, reply)).map_err(|_| stopped())?;
        outcome.await.map_err(|_| stopped())?
    }
}

async fn run(
    mut conn: SqliteConnection,
    mut rx: mpsc::UnboundedReceiver<(FastWrite, oneshot::Sender<Outcome>)>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        if batch.len() > 1 {
            match run_batch(&mut conn, &batch).await {
                Ok(outcomes) => {
                    for ((_, reply), outcome) in batch.into_iter().zip(outcomes) {
                        let _ = reply.send(Ok(outcome));
                    }
                    continue;
                }
                Err(e) => {
                    tracing::debug!(
                        "batch of {} fast writes failed ({e}); retrying one by one",
                        batch.len()
                    );
                    if sqlx::query("ROLLBACK").execute(&mut conn).await.is_err() {
                        tracing::debug!("nothing to roll back");
                    }
                }
            }
        }
        for (write, reply) in batch {
            let outcome = run_one(&mut conn, &write).await;
            let _ = reply.send(outcome);
        }
    }
}

/// A lone write: one autocommit statement, which takes the write lock at
/// its start (so it cannot fail to upgrade like a deferred transaction).
async fn run_one(conn: &mut SqliteConnection, write: &FastWrite) -> Outcome {
    let done = write
        .bind(sqlx::query(write.sql()))
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

async fn run_batch(
    conn: &mut SqliteConnection,
    batch: &[(FastWrite, oneshot::Sender<Outcome>)],
) -> Result<Vec<bool>, StoreError> {
    let mut sql = String::from("BEGIN IMMEDIATE;\n");
    for (write, _) in batch {
        sql.push_str(write.sql());
        // changes() counts the rows the statement just before changed itself.
        sql.push_str(";\nSELECT changes();\n");
    }
    sql.push_str("COMMIT;");
    // Batches differ in shape, so their scripts are not worth caching.
    let mut query = sqlx::query(&sql).persistent(false);
    for (write, _) in batch {
        query = write.bind(query);
    }
    // fetch_all, not fetch_optional: every statement, COMMIT included, must run.
    let rows = query.fetch_all(&mut *conn).await?;
    if rows.len() != batch.len() {
        return Err(StoreError::Corrupt(format!(
            "batch of {} writes returned {} outcomes",
            batch.len(),
            rows.len()
        )));
    }
    rows.iter()
        .map(|row| Ok(row.try_get::<i64, _>(0)? == 1))
        .collect()
}

#[cfg(test)]
mod tests {
    use sqlx::Connection;

    use super::*;
    use crate::{
        config::Synchronous,
        money::{Currency, Units},
        store::{AccountRef, SqliteStore, Store, now_ms},
    };

    fn hold(id: &str, amount: i64) -> FastWrite {
        FastWrite::Hold {
            id: id.into(),
            principal: "w".into(),
            currency: "USD".into(),
            amount,
            tool: "echo".into(),
            args_hash: "h".into(),
            created_at: now_ms(),
            expires_at: now_ms() + 60_000,
        }
    }

    /// A long mixed batch behaves exactly like the same writes one by one,
    /// and is committed.
    #[tokio::test]
    async fn a_mixed_batch_is_applied_in_order_and_committed() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store = SqliteStore::connect(&url, Synchronous::Normal)
            .await
            .unwrap();
        let usd = Currency::parse("USD").unwrap();
        store
            .topup(&AccountRef::wallet("w", &usd), Units(100), None)
            .await
            .unwrap();

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
        let batch: Vec<_> = writes
            .into_iter()
            .map(|w| (w, oneshot::channel().0))
            .collect();

        let mut conn = SqliteConnection::connect(&url).await.unwrap();
        assert_eq!(run_batch(&mut conn, &batch).await.unwrap(), expected);
        let balances = store.balances("w").await.unwrap();
        assert_eq!(
            balances[0].held,
            Units(100),
            "committed and visible to other connections"
        );
        assert_eq!(balances[0].available, Units(0));
    }
}
