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
//!
//! The load comes from [`LightClient`]s: each an MCP session of its own on
//! a connection of its own, posting JSON-RPC and reading the SSE reply,
//! and nothing else. An rmcp client (a service loop, channels and typed
//! messages per call) spent about as much CPU per call as the server did,
//! on the same 2 cores; a second free-call row shows the rmcp clients'
//! ceiling for comparison.

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
use serde_json::{Value, json};
use tollgate::testing::{self, Backend, TestDb};

const EXE: &str = env!("CARGO_BIN_EXE_tollgate");
const CLIENTS: usize = 64;
/// Principals the clients pay as (each wallet is shared by 8 clients).
const WALLETS: usize = 8;

type Client = RunningService<RoleClient, ()>;

/// Who makes the calls: one of the clients below, 64 times over.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Load {
    Light,
    Rmcp,
}

/// A minimal MCP client over streamable HTTP: it opens a session
/// (`initialize`, then `notifications/initialized`), then posts each
/// `tools/call` and reads its reply, an SSE stream, whole.
struct LightClient {
    http: reqwest::Client,
    url: String,
    key: String,
    session: String,
    version: String,
    next_id: u64,
}

impl LightClient {
    async fn connect(url: String, key: String) -> anyhow::Result<Self> {
        let mut client = Self {
            http: reqwest::Client::builder().build()?,
            url,
            key,
            session: String::new(),
            version: String::new(),
            next_id: 0,
        };
        let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "scale-out-bench", "version": "0"}}});
        let reply = client.post(&init).send().await?.error_for_status()?;
        client.session = reply
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| anyhow::anyhow!("no session id"))?
            .to_owned();
        let result = reply_to(&reply.text().await?, 0)?;
        client.version = result["protocolVersion"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("no protocol version: {result}"))?
            .to_owned();
        let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        client.post(&initialized).send().await?.error_for_status()?;
        Ok(client)
    }

    fn post(&self, message: &Value) -> reqwest::RequestBuilder {
        let mut request = self
            .http
            .post(&self.url)
            .header("accept", "application/json, text/event-stream")
            .bearer_auth(&self.key)
            .json(message);
        if !self.session.is_empty() {
            request = request
                .header("mcp-session-id", &self.session)
                .header("mcp-protocol-version", &self.version);
        }
        request
    }

    /// The result of one `tools/call`.
    async fn call(&mut self, tool: &str, arguments: &Value) -> anyhow::Result<Value> {
        self.next_id += 1;
        let call = json!({"jsonrpc": "2.0", "id": self.next_id, "method": "tools/call",
                          "params": {"name": tool, "arguments": arguments}});
        let reply = self.post(&call).send().await?.error_for_status()?;
        reply_to(&reply.text().await?, self.next_id)
    }
}

/// The result of request `id` in an SSE (or plain JSON) reply body.
fn reply_to(body: &str, id: u64) -> anyhow::Result<Value> {
    let messages = body
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .chain(body.starts_with('{').then_some(body));
    for message in messages {
        let Ok(mut message) = serde_json::from_str::<Value>(message.trim()) else {
            continue;
        };
        if message["id"] == id {
            anyhow::ensure!(message["error"].is_null(), "error reply: {message}");
            return Ok(message["result"].take());
        }
    }
    anyhow::bail!("no reply to request {id} in {body:?}")
}

/// One of the 64 callers.
enum Caller {
    Light(LightClient),
    Rmcp(Client),
}

impl Caller {
    async fn connect(load: Load, url: String, key: String) -> anyhow::Result<Self> {
        Ok(match load {
            Load::Light => Caller::Light(LightClient::connect(url, key).await?),
            Load::Rmcp => {
                let transport = StreamableHttpClientTransport::from_config(
                    StreamableHttpClientTransportConfig::with_uri(url).auth_header(key),
                );
                Caller::Rmcp(().serve(transport).await?)
            }
        })
    }

    /// Calls `tool`; the reply's `_meta` (a fast-path charge's payment is
    /// in it).
    async fn call(&mut self, tool: &'static str, arguments: &Value) -> anyhow::Result<Value> {
        Ok(match self {
            Caller::Light(client) => client.call(tool, arguments).await?["_meta"].take(),
            Caller::Rmcp(client) => {
                let params = CallToolRequestParams::new(tool)
                    .with_arguments(arguments.as_object().cloned().unwrap_or_default());
                json!(client.call_tool(params).await?.meta)
            }
        })
    }

    async fn close(self) {
        if let Caller::Rmcp(client) = self {
            client.cancel().await.ok();
        }
    }
}

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
    load: Load,
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
    let mut callers = Vec::new();
    for i in 0..CLIENTS {
        let url = format!("{}/mcp", servers[i % instances].1);
        callers.push(Caller::connect(load, url, keys[i % WALLETS].clone()).await?);
    }
    let warm_up = Duration::from_secs(1);
    let started = Instant::now();
    let until = started + warm_up + Duration::from_secs(secs);
    let runs = callers.into_iter().map(|mut caller| async move {
        let mut latencies = Vec::new();
        let arguments = json!({"text": "bench"});
        while Instant::now() < until {
            let call = Instant::now();
            let meta = caller.call(tool, &arguments).await?;
            anyhow::ensure!(
                meta["tollgate/payment"]["status"] == "paid" || tool == "word_count",
                "not a fast-path charge: {tool} {meta}"
            );
            if call >= started + warm_up {
                latencies.push(call.elapsed());
            }
        }
        caller.close().await;
        Ok::<_, anyhow::Error>(latencies)
    });
    let mut latencies = Vec::new();
    for result in futures::future::join_all(runs).await {
        latencies.extend(result?);
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
    if wanted("free") {
        free_rows(secs).await?;
    }
    if wanted("sqlite") {
        sqlite_rows(secs).await?;
    }
    if wanted("postgres") {
        postgres_rows(secs).await?;
    }
    Ok(())
}

/// Whether `BENCH_ONLY` (rows to run: `free`, `sqlite`, `postgres`, comma
/// separated; default all) names `rows`.
fn wanted(rows: &str) -> bool {
    std::env::var("BENCH_ONLY").map_or(true, |only| only.split(',').any(|r| r.trim() == rows))
}

async fn free_rows(secs: u64) -> anyhow::Result<()> {
    let (free, _db) = setup(Backend::Sqlite, "normal").await?;
    row(
        "free calls (no payment), 1 instance",
        &measure(&free, 1, Load::Light, "word_count", secs).await?,
    );
    row(
        "free calls, rmcp clients",
        &measure(&free, 1, Load::Rmcp, "word_count", secs).await?,
    );
    Ok(())
}

async fn sqlite_rows(secs: u64) -> anyhow::Result<()> {
    let (normal, _db) = setup(Backend::Sqlite, "normal").await?;
    row(
        "SQLite normal, 1 instance",
        &measure(&normal, 1, Load::Light, "echo", secs).await?,
    );
    let (full, _db) = setup(Backend::Sqlite, "full").await?;
    let full_figures = measure(&full, 1, Load::Light, "echo", secs).await?;
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
    Ok(())
}

async fn postgres_rows(secs: u64) -> anyhow::Result<()> {
    if postgres_reachable().await {
        let (one, _db) = setup(Backend::Postgres, "full").await?;
        row(
            "PostgreSQL, 1 instance",
            &measure(&one, 1, Load::Light, "echo", secs).await?,
        );
        let (two, _db) = setup(Backend::Postgres, "full").await?;
        row(
            "PostgreSQL, 2 instances",
            &measure(&two, 2, Load::Light, "echo", secs).await?,
        );
    } else {
        println!("PostgreSQL rows skipped: no server at TOLLGATE_TEST_POSTGRES");
    }
    Ok(())
}
