//! Scale-out benchmark: fast-path paid calls from 64 concurrent MCP clients
//! over streamable HTTP, against real `tollgate serve --http` processes.
//!
//! `cargo bench --bench scale_out` prints calls per second and p50/p99
//! latency for: SQLite with `synchronous = normal` and `full` (one
//! instance), PostgreSQL with one instance and with two instances sharing
//! the database (clients split between them). It measures the machine's
//! fsync rate (8 KiB write + fdatasync, one at a time) and compares SQLite
//! `full`'s durable writes (two per paid call: hold and capture) with it:
//! above 1 means commits are grouped. PostgreSQL is the server named by `TOLLGATE_TEST_POSTGRES`
//! (default the local one); its rows are skipped, saying so, if it is not
//! reachable. `BENCH_SECONDS` sets how long each figure is measured
//! (default 5); `BENCH_POOL` each instance's `max_connections` (default 8:
//! on a 2-core machine more backends only contend). A first row times free
//! calls the same way: the ceiling of the transport and client themselves.
//! Compare figures as ratios within one run.

use std::{
    io::Write,
    path::Path,
    time::{Duration, Instant},
};

use rmcp::{
    RoleClient, ServiceExt,
    model::CallToolRequestParams,
    service::RunningService,
    transport::{
        StreamableHttpClientTransport, streamable_http_client::StreamableHttpClientTransportConfig,
    },
};
use tollgate::testing::{self, Backend, TestDb};

const EXE: &str = env!("CARGO_BIN_EXE_tollgate");
const CLIENTS: usize = 64;
/// Principals the clients pay as (each wallet is shared by 8 clients).
const WALLETS: usize = 8;

type Client = RunningService<RoleClient, ()>;

struct Setup {
    dir: tempfile::TempDir,
    db: String,
}

impl Setup {
    fn command(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(EXE);
        cmd.env("TOLLGATE_CONFIG", self.dir.path().join("pricing.toml"))
            .env("TOLLGATE_DB", &self.db)
            .env("TOLLGATE_RECEIPT_KEY", self.dir.path().join("receipt.key"))
            .env("TOLLGATE_LOG", "tollgate=warn")
            .env_remove("TOLLGATE_PAYER");
        cmd
    }

    async fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.command().args(args).output().await?;
        anyhow::ensure!(
            out.status.success(),
            "tollgate {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// A `serve --http` process; returns it and its base URL.
    async fn serve(&self) -> anyhow::Result<(tokio::process::Child, String)> {
        Ok(testing::serve_http(self.command()).await?)
    }
}

async fn setup(backend: Backend, synchronous: &str) -> anyhow::Result<(Setup, TestDb)> {
    testing::select(backend);
    let dir = tempfile::tempdir()?;
    let pool = std::env::var("BENCH_POOL").unwrap_or_else(|_| "8".into());
    std::fs::write(
        dir.path().join("pricing.toml"),
        format!(
            "[server]\nname = \"bench\"\ncurrency = \"USD\"\nmode = \"two_step\"\n\n\
             [store]\nsynchronous = \"{synchronous}\"\nmax_connections = {pool}\n\n\
             [[tools]]\nname = \"echo\"\nprice = \"0.01\"\n"
        ),
    )?;
    let db = TestDb::fresh(dir.path());
    let setup = Setup {
        db: db.url.clone(),
        dir,
    };
    Ok((setup, db))
}

struct Figures {
    per_second: f64,
    p50: Duration,
    p99: Duration,
}

/// 64 clients, split across `instances`, calling `tool` for `secs`: the
/// priced `echo` (each call must be a fast-path charge) or the free
/// `word_count` (the transport's own ceiling, for comparison).
async fn measure(
    setup: &Setup,
    instances: usize,
    tool: &'static str,
    secs: u64,
) -> anyhow::Result<Figures> {
    let mut keys = Vec::new();
    for w in 0..WALLETS {
        let principal = format!("w{w}");
        setup
            .cli(&["wallet", "topup", &principal, "1000000"])
            .await?;
        keys.push(
            setup
                .cli(&[
                    "keys",
                    "create",
                    "--principal",
                    &principal,
                    "--scope",
                    "mcp",
                ])
                .await?,
        );
    }
    let mut servers = Vec::new();
    for _ in 0..instances {
        servers.push(setup.serve().await?);
    }
    let mut clients: Vec<Client> = Vec::new();
    for i in 0..CLIENTS {
        let base = &servers[i % instances].1;
        let transport = StreamableHttpClientTransport::from_config(
            StreamableHttpClientTransportConfig::with_uri(format!("{base}/mcp"))
                .auth_header(keys[i % WALLETS].clone()),
        );
        clients.push(().serve(transport).await?);
    }
    let warm_up = Duration::from_secs(1);
    let started = Instant::now();
    let until = started + warm_up + Duration::from_secs(secs);
    let runs = clients.iter().map(|client| async move {
        let mut latencies = Vec::new();
        let mut args = serde_json::Map::new();
        args.insert("text".into(), "bench".into());
        while Instant::now() < until {
            let call = Instant::now();
            let r = client
                .call_tool(CallToolRequestParams::new(tool).with_arguments(args.clone()))
                .await?;
            let paid = r
                .meta
                .as_ref()
                .and_then(|m| m.0.get("tollgate/payment"))
                .is_some_and(|p| p["status"] == "paid");
            anyhow::ensure!(
                paid || tool == "word_count",
                "not a fast-path charge: {r:?}"
            );
            if call >= started + warm_up {
                latencies.push(call.elapsed());
            }
        }
        Ok::<_, anyhow::Error>(latencies)
    });
    let mut latencies = Vec::new();
    for result in futures::future::join_all(runs).await {
        latencies.extend(result?);
    }
    for client in clients {
        client.cancel().await.ok();
    }
    let verify = setup.cli(&["ledger", "verify"]).await?;
    anyhow::ensure!(verify.contains("ledger ok"), "{verify}");
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    Ok(Figures {
        per_second: latencies.len() as f64 / secs as f64,
        p50: at(0.50),
        p99: at(0.99),
    })
}

/// fsyncs per second: 8 KiB written and fdatasync'd, one at a time, for a second.
fn fsync_rate(dir: &Path) -> anyhow::Result<f64> {
    let mut file = std::fs::File::create(dir.join("fsync.bench"))?;
    let block = [0u8; 8192];
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < Duration::from_secs(1) {
        file.write_all(&block)?;
        file.sync_data()?;
        n += 1;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

fn row(label: &str, f: &Figures) {
    println!(
        "{label:<34} {:>8.0} calls/s   p50 {:>7.2} ms   p99 {:>7.2} ms",
        f.per_second,
        f.p50.as_secs_f64() * 1000.0,
        f.p99.as_secs_f64() * 1000.0
    );
}

async fn postgres_reachable() -> bool {
    let url = std::env::var("TOLLGATE_TEST_POSTGRES").unwrap_or_default();
    !url.is_empty() && testing::execute(&url, "SELECT 1").await.is_ok()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::var_os("TOLLGATE_TEST_POSTGRES").is_none() {
        // SAFETY: set before any other thread reads the environment.
        unsafe {
            std::env::set_var(
                "TOLLGATE_TEST_POSTGRES",
                "postgres://postgres@127.0.0.1:5432/postgres",
            )
        };
    }
    let secs = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    println!(
        "fast-path paid calls, {CLIENTS} concurrent MCP clients over streamable HTTP, {secs} s each"
    );

    let (free, _db) = setup(Backend::Sqlite, "normal").await?;
    row(
        "free calls (no payment), 1 instance",
        &measure(&free, 1, "word_count", secs).await?,
    );
    let (normal, _db) = setup(Backend::Sqlite, "normal").await?;
    row(
        "SQLite normal, 1 instance",
        &measure(&normal, 1, "echo", secs).await?,
    );
    let (full, _db) = setup(Backend::Sqlite, "full").await?;
    let full_figures = measure(&full, 1, "echo", secs).await?;
    row("SQLite full, 1 instance", &full_figures);
    let fsyncs = fsync_rate(full.dir.path())?;
    // A paid call commits twice (the hold, then the capture): one fsync
    // per commit would cap calls/s at half the fsync rate.
    println!(
        "machine fsync rate: {fsyncs:.0}/s; SQLite full commits {:.0} durable writes/s \
         (hold and capture: 2 per call) = {:.2}x the fsync rate",
        2.0 * full_figures.per_second,
        2.0 * full_figures.per_second / fsyncs
    );

    if postgres_reachable().await {
        let (one, _db) = setup(Backend::Postgres, "full").await?;
        row(
            "PostgreSQL, 1 instance",
            &measure(&one, 1, "echo", secs).await?,
        );
        let (two, _db) = setup(Backend::Postgres, "full").await?;
        row(
            "PostgreSQL, 2 instances",
            &measure(&two, 2, "echo", secs).await?,
        );
    } else {
        println!("PostgreSQL rows skipped: no server at TOLLGATE_TEST_POSTGRES");
    }
    Ok(())
}
