//! The SQLite store's hot statements, run on rusqlite connections in the
//! calling thread rather than through sqlx, whose SQLite driver hands every
//! statement to a worker thread of its own and back: those hand-offs, not
//! SQLite, were most of what a statement cost (see `fast_writes`).
//!
//! - Reads run on a small set of reader connections. A read never waits: if
//!   every reader is in use, or SQLite is busy, the caller reads through the
//!   pool instead.
//! - Writes run as [`InlineTx`] operations in the writer's batches
//!   (`fast_writes`), each in a savepoint of its own. The shared
//!   multi-statement writes (`Portable::finish`, `Portable::pay_session`)
//!   run on it unchanged: every statement is ready at once, so their futures
//!   finish on their first poll.

use std::{
    cell::{Cell, RefCell},
    path::Path,
    pin::pin,
    sync::{Arc, Mutex, TryLockError},
    task::{Context, Poll, Waker},
};

use rusqlite::{Connection, ErrorCode, OpenFlags, types::Value};

use super::fast_writes::unavailable;
use crate::store::{
    StoreError,
    portable::Tx,
    rows::Columns,
    sql::{Param, Statement},
};

/// How many reads may run in-thread at once: one per runtime thread.
const READERS: usize = 2;

/// A row read in-thread, owned, with its column names.
pub(crate) struct OwnedRow {
    names: Arc<[String]>,
    values: Vec<Value>,
}

impl OwnedRow {
    fn value(&self, column: &str) -> Result<&Value, StoreError> {
        self.names
            .iter()
            .position(|name| name == column)
            .map(|i| &self.values[i])
            .ok_or_else(|| StoreError::Corrupt(format!("no column `{column}` in the row")))
    }
}

fn wrong_type(column: &str, value: &Value) -> StoreError {
    StoreError::Corrupt(format!(
        "column `{column}` holds {:?}, not the type expected",
        value.data_type()
    ))
}

fn not_null<T>(column: &str, value: Option<T>) -> Result<T, StoreError> {
    value.ok_or_else(|| StoreError::Corrupt(format!("column `{column}` is null")))
}

impl Columns for OwnedRow {
    fn text(&self, column: &str) -> Result<String, StoreError> {
        not_null(column, self.opt_text(column)?)
    }
    fn opt_text(&self, column: &str) -> Result<Option<String>, StoreError> {
        match self.value(column)? {
            Value::Null => Ok(None),
            Value::Text(text) => Ok(Some(text.clone())),
            other => Err(wrong_type(column, other)),
        }
    }
    fn int(&self, column: &str) -> Result<i64, StoreError> {
        not_null(column, self.opt_int(column)?)
    }
    fn opt_int(&self, column: &str) -> Result<Option<i64>, StoreError> {
        match self.value(column)? {
            Value::Null => Ok(None),
            Value::Integer(n) => Ok(Some(*n)),
            other => Err(wrong_type(column, other)),
        }
    }
    fn flag(&self, column: &str) -> Result<bool, StoreError> {
        Ok(self.int(column)? != 0)
    }
}

/// Prepares (cached) a shared statement and binds its parameters. They are
/// `$N`, which SQLite numbers in the order they first appear, so each is
/// bound by its name.
fn prepare<'c>(
    conn: &'c Connection,
    statement: &Statement<'_>,
) -> rusqlite::Result<rusqlite::CachedStatement<'c>> {
    let mut prepared = conn.prepare_cached(statement.sql)?;
    for (i, param) in statement.params.iter().enumerate() {
        let Some(index) = prepared.parameter_index(&format!("${}", i + 1))? else {
            continue;
        };
        match param {
            Param::Text(text) => prepared.raw_bind_parameter(index, text)?,
            Param::Int(n) => prepared.raw_bind_parameter(index, n)?,
            Param::Flag(flag) => prepared.raw_bind_parameter(index, flag)?,
        }
    }
    Ok(prepared)
}

fn execute(conn: &Connection, statement: &Statement<'_>) -> rusqlite::Result<u64> {
    Ok(prepare(conn, statement)?.raw_execute()? as u64)
}

fn fetch_all(conn: &Connection, statement: &Statement<'_>) -> rusqlite::Result<Vec<OwnedRow>> {
    let mut prepared = prepare(conn, statement)?;
    let names: Arc<[String]> = prepared
        .column_names()
        .into_iter()
        .map(String::from)
        .collect();
    let mut rows = prepared.raw_query();
    let mut owned = Vec::new();
    while let Some(row) = rows.next()? {
        let values = (0..names.len())
            .map(|i| row.get::<_, Value>(i))
            .collect::<rusqlite::Result<_>>()?;
        owned.push(OwnedRow {
            names: names.clone(),
            values,
        });
    }
    Ok(owned)
}

/// Whether SQLite answered "busy" (another connection's lock).
fn busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

/// Connections that read in the calling thread.
pub(super) struct Readers {
    conns: Vec<Mutex<Connection>>,
}

impl Readers {
    pub(super) fn open(path: &Path) -> Result<Self, StoreError> {
        let open = || -> rusqlite::Result<Mutex<Connection>> {
            let conn = Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            // Never wait on a runtime thread: a busy read goes to the pool.
            conn.busy_timeout(std::time::Duration::ZERO)?;
            conn.pragma_update(None, "query_only", "ON")?;
            conn.set_prepared_statement_cache_capacity(64);
            Ok(Mutex::new(conn))
        };
        let conns = (0..READERS)
            .map(|_| open())
            .collect::<rusqlite::Result<_>>()
            .map_err(unavailable)?;
        Ok(Self { conns })
    }

    /// The rows of a read, mapped by `read`; `None` when it could not run
    /// in-thread without waiting (then read through the pool).
    pub(super) fn all<T>(
        &self,
        statement: Statement<'_>,
        read: fn(&OwnedRow) -> Result<T, StoreError>,
    ) -> Option<Result<Vec<T>, StoreError>> {
        let conn = self.conns.iter().find_map(|conn| match conn.try_lock() {
            Ok(conn) => Some(conn),
            Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        })?;
        match fetch_all(&conn, &statement) {
            Ok(rows) => Some(rows.iter().map(read).collect()),
            Err(e) if busy(&e) => None,
            Err(e) => Some(Err(unavailable(e))),
        }
    }

    /// At most one row of a read, mapped by `read` (see [`Self::all`]).
    pub(super) fn optional<T>(
        &self,
        statement: Statement<'_>,
        read: fn(&OwnedRow) -> Result<T, StoreError>,
    ) -> Option<Result<Option<T>, StoreError>> {
        self.all(statement, read)
            .map(|rows| rows.map(|rows| rows.into_iter().next()))
    }
}

/// What an operation in the writer's batch left behind.
#[derive(Default)]
pub(super) struct TxState {
    /// The operation committed (its writes stand even if it then fails).
    committed: Cell<bool>,
    /// The SQLite error of a statement that failed, kept to tell the batch
    /// when it ended the whole transaction.
    failure: RefCell<Option<rusqlite::Error>>,
}

impl TxState {
    pub(super) fn committed(&self) -> bool {
        self.committed.get()
    }

    pub(super) fn take_failure(&self) -> Option<rusqlite::Error> {
        self.failure.borrow_mut().take()
    }
}

/// An operation's view of the writer's connection, inside the batch's
/// transaction. Its `commit` only marks the operation's writes as kept: the
/// batch commits them all, and answers the caller after.
pub(super) struct InlineTx<'c> {
    pub conn: &'c Connection,
    pub state: &'c TxState,
}

impl InlineTx<'_> {
    fn run<T>(
        &self,
        statement: &Statement<'_>,
        op: fn(&Connection, &Statement<'_>) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        op(self.conn, statement).map_err(|e| {
            let error = unavailable(e.to_string());
            *self.state.failure.borrow_mut() = Some(e);
            error
        })
    }
}

impl Tx for InlineTx<'_> {
    type Row = OwnedRow;

    async fn execute(&mut self, statement: Statement<'_>) -> Result<u64, StoreError> {
        self.run(&statement, execute)
    }

    async fn fetch_optional(
        &mut self,
        statement: Statement<'_>,
    ) -> Result<Option<OwnedRow>, StoreError> {
        Ok(self.run(&statement, fetch_all)?.into_iter().next())
    }

    async fn fetch_all(&mut self, statement: Statement<'_>) -> Result<Vec<OwnedRow>, StoreError> {
        self.run(&statement, fetch_all)
    }

    async fn commit(self) -> Result<(), StoreError> {
        self.state.committed.set(true);
        Ok(())
    }
}

/// The answer of a future over an [`InlineTx`], which never waits.
pub(super) fn ready<T>(
    future: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    match pin!(future).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(answer) => answer,
        Poll::Pending => Err(StoreError::Corrupt("an in-thread write waited".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::Synchronous,
        store::{
            SqliteStore, Store,
            sql::{self, statement},
        },
    };

    async fn store(dir: &tempfile::TempDir) -> SqliteStore {
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        SqliteStore::connect(&url, Synchronous::Normal)
            .await
            .unwrap()
    }

    /// `$N` is bound by its number, wherever it first appears.
    #[test]
    fn parameters_are_bound_by_their_number() {
        let conn = Connection::open_in_memory().unwrap();
        let rows = fetch_all(
            &conn,
            &statement!("SELECT $2 AS two, $1 AS one, $2 + 1 AS three", "first", 2),
        )
        .unwrap();
        assert_eq!(rows[0].int("two").unwrap(), 2);
        assert_eq!(rows[0].text("one").unwrap(), "first");
        assert_eq!(rows[0].int("three").unwrap(), 3);
        assert!(matches!(rows[0].text("two"), Err(StoreError::Corrupt(_))));
        assert!(matches!(rows[0].int("none"), Err(StoreError::Corrupt(_))));
    }

    /// An operation that fails is undone; one that committed before it
    /// failed keeps its writes (a session found expired is marked so); the
    /// next operation is not affected by either.
    #[tokio::test]
    async fn a_failed_operation_is_undone_unless_it_committed() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let heartbeat = |id: &'static str| statement!(sql::HEARTBEAT, id, 1, 2);
        let failed = store
            .fast_writes
            .transaction(move |mut tx| {
                ready(tx.execute(heartbeat("undone")))?;
                Err::<(), _>(StoreError::Invalid("no".into()))
            })
            .await;
        assert!(matches!(failed, Err(StoreError::Invalid(_))));
        let kept = store
            .fast_writes
            .transaction(move |mut tx| {
                ready(tx.execute(heartbeat("kept")))?;
                ready(tx.commit())?;
                Err::<(), _>(StoreError::Invalid("after commit".into()))
            })
            .await;
        assert!(matches!(kept, Err(StoreError::Invalid(_))));
        let changed = store
            .fast_writes
            .transaction(move |mut tx| ready(tx.execute(heartbeat("next"))))
            .await
            .unwrap();
        assert_eq!(changed, 1);
        let mut ids: Vec<String> = sqlx::query_scalar("SELECT id FROM instances ORDER BY id")
            .fetch_all(store.pool())
            .await
            .unwrap();
        ids.retain(|id| !id.starts_with("inst_"));
        assert_eq!(ids, ["kept", "next"]);
    }

    /// A read that finds every reader in use is left to the pool, and the
    /// store still answers it.
    #[tokio::test]
    async fn a_read_that_would_wait_goes_to_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let intent = statement!(sql::INTENT, "pay_missing");
        assert!(matches!(
            store.readers.optional(intent, crate::store::rows::intent),
            Some(Ok(None))
        ));
        let held: Vec<_> = store
            .readers
            .conns
            .iter()
            .map(|c| c.lock().unwrap())
            .collect();
        let intent = statement!(sql::INTENT, "pay_missing");
        assert!(
            store
                .readers
                .optional(intent, crate::store::rows::intent)
                .is_none()
        );
        assert!(store.intent("pay_missing").await.unwrap().is_none());
        drop(held);
    }
}
