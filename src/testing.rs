//! Test support (not part of the API): the store a test runs on. Every test
//! wrapped in [`on_both_backends!`](crate::on_both_backends) runs twice: on
//! a SQLite file, and on a fresh PostgreSQL database of its own (created on
//! the server named by `TOLLGATE_TEST_POSTGRES`, dropped when the test
//! ends). Without that variable the PostgreSQL runs show as ignored, with
//! the reason (the build script sets `cfg(tollgate_pg)` when it is set).

use std::{cell::Cell, path::Path, sync::Arc};

use sqlx::Connection;

use crate::{
    config::{PoolSettings, Synchronous},
    store::{PgStore, SqliteStore, Store, StoreError},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

thread_local! {
    /// The backend of the test running on this thread (tests that are not
    /// wrapped run on SQLite).
    static BACKEND: Cell<Backend> = const { Cell::new(Backend::Sqlite) };
}

pub fn select(backend: Backend) {
    BACKEND.with(|b| b.set(backend));
}

pub fn current() -> Backend {
    BACKEND.with(Cell::get)
}

/// Generates, for each test function, a module of the same name holding a
/// `sqlite` and a `postgres` test with the same body.
#[macro_export]
macro_rules! on_both_backends {
    ($( $(#[$attr:meta])* async fn $name:ident() $body:block )*) => {$(
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            $(#[$attr])*
            async fn sqlite() {
                $crate::testing::select($crate::testing::Backend::Sqlite);
                $body
            }

            $crate::on_postgres! {
                $(#[$attr])*
                async fn postgres() $body
            }
        }
    )*};
}

/// Tests that only make sense on PostgreSQL: each runs on a fresh database
/// of its own from [`TestDb::fresh`], and shows as ignored, with the reason,
/// without `TOLLGATE_TEST_POSTGRES`.
#[macro_export]
macro_rules! on_postgres {
    ($( $(#[$attr:meta])* async fn $name:ident() $body:block )*) => {$(
        $(#[$attr])*
        #[cfg_attr(
            not(tollgate_pg),
            ignore = "PostgreSQL: set TOLLGATE_TEST_POSTGRES to a server URL to run it"
        )]
        async fn $name() {
            $crate::testing::select($crate::testing::Backend::Postgres);
            $body
        }
    )*};
}

/// A test's database. A PostgreSQL one is dropped when this is.
pub struct TestDb {
    /// What `--db` / `TOLLGATE_DB` / `[store] url` take.
    pub url: String,
    postgres: Option<String>,
}

impl TestDb {
    /// A new, empty database on the current backend; SQLite files go in `dir`.
    pub fn fresh(dir: &Path) -> Self {
        match current() {
            Backend::Sqlite => Self {
                url: dir.join("tollgate.db").display().to_string(),
                postgres: None,
            },
            Backend::Postgres => {
                let name = format!("tollgate_test_{}", uuid::Uuid::new_v4().simple());
                admin(format!("CREATE DATABASE {name}"));
                Self {
                    url: database_url(&server_url(), &name),
                    postgres: Some(name),
                }
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(name) = self.postgres.take() {
            admin(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
        }
    }
}

/// A store on the database at `url` (a [`TestDb`]'s), on the current
/// backend; another call gives another instance's store on the same one.
pub async fn open_store(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match current() {
        Backend::Sqlite => {
            Arc::new(SqliteStore::connect(&format!("sqlite://{url}"), Synchronous::Normal).await?)
        }
        Backend::Postgres => Arc::new(PgStore::connect(url, &PoolSettings::default()).await?),
    })
}

/// The PostgreSQL server the tests use (`TOLLGATE_TEST_POSTGRES`).
pub fn server_url() -> String {
    std::env::var("TOLLGATE_TEST_POSTGRES")
        .expect("TOLLGATE_TEST_POSTGRES must name a PostgreSQL server for the postgres tests")
}

/// The database name at the end of a PostgreSQL URL.
pub fn database_name(url: &str) -> &str {
    let base = url.split('?').next().unwrap_or(url);
    base.rsplit('/').next().unwrap_or(base)
}

/// `url` with its database name replaced by `name`.
pub fn database_url(url: &str, name: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let authority_end = base
        .find("://")
        .map(|i| i + 3)
        .and_then(|start| base[start..].find('/').map(|i| start + i))
        .unwrap_or(base.len());
    let mut out = format!("{}/{name}", &base[..authority_end]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

/// Runs one statement on the server's admin database, from any context
/// (its own thread and runtime: `Drop` and sync set-up code call it).
fn admin(sql: String) {
    let url = server_url();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let mut conn = sqlx::PgConnection::connect(&url)
                .await
                .unwrap_or_else(|e| panic!("connect to TOLLGATE_TEST_POSTGRES ({url}): {e}"));
            sqlx::query(&sql)
                .execute(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            conn.close().await.ok();
        });
    })
    .join()
    .expect("admin statement");
}

/// Runs SQL straight on a test's database, behind tollgate's back (to
/// corrupt it on purpose, or to look at it). Returns the rows it changed.
pub async fn execute(url: &str, sql: &str) -> Result<u64, sqlx::Error> {
    if url.starts_with("postgres") {
        let mut conn = sqlx::PgConnection::connect(url).await?;
        let done = sqlx::query(sql).execute(&mut conn).await;
        conn.close().await.ok();
        Ok(done?.rows_affected())
    } else {
        let url = if url.starts_with("sqlite:") {
            url.to_owned()
        } else {
            format!("sqlite://{url}")
        };
        let mut conn = sqlx::SqliteConnection::connect(&url).await?;
        let done = sqlx::query(sql).execute(&mut conn).await;
        conn.close().await.ok();
        Ok(done?.rows_affected())
    }
}

/// Starts `tollgate serve --http 127.0.0.1:0` from `command` (a `tollgate`
/// command with its environment set) and waits for its `listening on URL`
/// line; returns the process (killed when dropped) and that URL. Its log is
/// drained from then on, so it never blocks on a full pipe.
pub async fn serve_http(
    mut command: tokio::process::Command,
) -> std::io::Result<(tokio::process::Child, String)> {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = command
        .args(["serve", "--http", "127.0.0.1:0"])
        .env("TOLLGATE_LOG", "tollgate=info")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let Some(stderr) = child.stderr.take() else {
        return Err(std::io::Error::other("no stderr"));
    };
    let mut lines = BufReader::new(stderr).lines();
    let base = loop {
        let Some(line) = lines.next_line().await? else {
            return Err(std::io::Error::other("server exited before listening"));
        };
        if let Some(url) = line.strip_prefix("listening on ") {
            break url.to_owned();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, base))
}

/// A dispatcher that lives as long as the process, interested in every
/// callsite "sometimes" and enabling nothing. `tracing` caches a callsite's
/// interest for the whole process when a thread first reaches it; while one
/// dispatcher is registered, it asks only that thread's default, and a
/// thread of another test, with none, caches "never": a capture on this
/// thread then never sees that log. With this one registered too, every
/// live dispatcher is asked, "sometimes" wins, and each event is checked
/// against the subscriber of the thread that logs it.
struct Anchor;

static ANCHOR: std::sync::OnceLock<tracing::Dispatch> = std::sync::OnceLock::new();

impl tracing::Subscriber for Anchor {
    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::sometimes()
    }
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        false
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {}
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// What this thread logs while the guard lives, kept for a test to read
/// (`tracing`'s default subscriber is per thread: a current-thread runtime
/// sees all of its tasks' logs).
#[derive(Clone, Default)]
pub struct LogCapture(Arc<std::sync::Mutex<Vec<u8>>>);

impl LogCapture {
    pub fn start() -> (Self, tracing::subscriber::DefaultGuard) {
        // Before the capture's own dispatcher: with it there are two, so a
        // callsite is never cached as of no interest (see `Anchor`).
        ANCHOR.get_or_init(|| tracing::Dispatch::new(Anchor));
        let capture = Self::default();
        let writer = capture.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || writer.clone())
            .finish();
        (capture, tracing::subscriber::set_default(subscriber))
    }

    /// The lines logged so far.
    pub fn text(&self) -> String {
        let bytes = self.0.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The lines logged since the last `take` (or the start), which are
    /// no longer kept: for a long test that looks at what each step logged.
    pub fn take(&self) -> String {
        let bytes = self
            .0
            .lock()
            .map(|mut b| std::mem::take(&mut *b))
            .unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The lines that name payment `id`.
    pub fn lines_of(&self, id: &str) -> Vec<String> {
        let field = format!("payment_id=\"{id}\"");
        self.text()
            .lines()
            .filter(|l| l.contains(&field))
            .map(str::to_owned)
            .collect()
    }
}

impl std::io::Write for LogCapture {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut kept) = self.0.lock() {
            kept.extend_from_slice(bytes);
        }
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A callsite another thread (with no subscriber) reaches first, while
    /// a capture is live here, is still captured here: `tracing` caches a
    /// callsite's interest for the whole process, and with one dispatcher
    /// it asked that other thread's (none: "never"), so the log a test
    /// looked for went missing when a test beside it ran the same code.
    #[test]
    fn a_capture_sees_what_another_thread_reached_first() {
        fn log_it() {
            tracing::info!("reached first on another thread");
        }
        let (log, _logging) = LogCapture::start();
        std::thread::spawn(log_it).join().unwrap();
        log_it();
        assert!(
            log.text().contains("reached first on another thread"),
            "{}",
            log.text()
        );
    }
}
