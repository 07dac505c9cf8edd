//! Round-trip benchmark over stdio against the real `tollgate` binary.
//!
//! `cargo bench --bench roundtrip` prints, for `synchronous = normal` and
//! `full`: the mean round trip of a free call, of a fast-path paid call, of a
//! full two_step flow (call, pay, confirm), and free and fast-path calls per
//! second from one client keeping 16 calls in flight. Compare figures as ratios within one
//! run; absolute numbers depend on the machine's load.
//!
//! It then times the interactive flows of an anonymous caller whose client
//! pays the session as soon as it is asked: a full elicitation flow (call,
//! `elicitation/create`, pay, accept, result) and a full progress flow (call,
//! progress notification, pay, result). It reports the gate's own overhead:
//! the flow's time less its unavoidable parts, the MCP round trips (timed as
//! free calls in the same run) and the payment itself (timed in the client).
//!
//! Free and fast-path round trips are timed from calls made in turn (free,
//! paid, free, …), so that load from elsewhere on the machine, which comes
//! and goes, weighs on both alike and their ratio holds from run to run.
//! The server's own CPU time per free and per fast-path call (all its
//! threads, from Linux' schedstat) is measured over as many calls again.
//!
//! `BENCH_CALLS` sets the number of calls per figure (default 3000).

use std::{
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::{StreamExt, stream};
use rmcp::{
    ClientHandler, ErrorData as McpError, RoleClient, ServiceExt,
    model::{
        CallToolRequestParams, ClientCapabilities, ClientConfig, ElicitRequestParams, ElicitResult,
        ElicitationAction, ElicitationCapability, FormElicitationCapability, Implementation,
        JsonObject, ProgressNotificationParam, UrlElicitationCapability,
    },
    service::{NotificationContext, RequestContext, RunningService},
    transport::{ConfigureCommandExt, TokioChildProcess},
};
use serde_json::json;

#[path = "support/cpu.rs"]
mod cpu;
use cpu::cpu_time;
use tollgate::{
    config::Synchronous,
    money::{Currency, Units},
    store::{AccountRef, SqliteStore, Store, now_ms},
};

type Client = RunningService<RoleClient, ()>;

/// A client whose person pays the session at once, through the store, when
/// an elicitation or the first progress message asks; it times the paying.
#[derive(Clone)]
struct PayingClient {
    store: Arc<SqliteStore>,
    paying: Arc<Mutex<(Duration, u32)>>,
    last_paid: Arc<Mutex<String>>,
}

impl PayingClient {
    async fn pay(&self, id: &str) {
        if *self.last_paid.lock().unwrap_or_else(|p| p.into_inner()) == id {
            return;
        }
        let started = Instant::now();
        if self.store.pay_session(id, None, now_ms()).await.is_ok() {
            let mut paying = self.paying.lock().unwrap_or_else(|p| p.into_inner());
            paying.0 += started.elapsed();
            paying.1 += 1;
        }
        *self.last_paid.lock().unwrap_or_else(|p| p.into_inner()) = id.to_owned();
    }

    /// Mean time one payment took, then start counting afresh.
    fn take_mean_payment(&self) -> Duration {
        let mut paying = self.paying.lock().unwrap_or_else(|p| p.into_inner());
        let mean = paying.0 / paying.1.max(1);
        *paying = (Duration::ZERO, 0);
        mean
    }
}

impl ClientHandler for PayingClient {
    fn get_info(&self) -> ClientConfig {
        let elicitation = ElicitationCapability::new()
            .with_form(FormElicitationCapability::new())
            .with_url(UrlElicitationCapability::new());
        ClientConfig::new(
            ClientCapabilities::builder()
                .enable_elicitation_with(elicitation)
                .build(),
            Implementation::new("tollgate-bench", "0"),
        )
    }

    async fn create_elicitation(
        &self,
        request: ElicitRequestParams,
        _context: RequestContext<RoleClient>,
    ) -> Result<ElicitResult, McpError> {
        if let ElicitRequestParams::UrlElicitationParams { elicitation_id, .. } = &request {
            self.pay(elicitation_id).await;
        }
        Ok(ElicitResult::new(ElicitationAction::Accept))
    }

    async fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        let message = params.message.unwrap_or_default();
        if let Some(start) = message.find("sessions pay pay_") {
            let id: String = message[start + "sessions pay ".len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            self.pay(&id).await;
        }
    }
}

struct FlowFigures {
    free: Duration,
    elicitation: Duration,
    elicitation_payment: Duration,
    progress: Duration,
    progress_payment: Duration,
}

struct Figures {
    free: Duration,
    paid: Duration,
    /// The server's CPU time per free and per fast-path call.
    cpu: Option<(Duration, Duration)>,
    two_step: Duration,
    free_throughput: f64,
    throughput: f64,
}

fn args(v: serde_json::Value) -> JsonObject {
    v.as_object().cloned().unwrap_or_default()
}

async fn client(dir: &std::path::Path, payer: Option<&str>) -> anyhow::Result<Client> {
    Ok(connect(dir, payer, ()).await?.0)
}

/// A client of a new `tollgate serve` process, and the process's id.
async fn connect<H: ClientHandler>(
    dir: &std::path::Path,
    payer: Option<&str>,
    handler: H,
) -> anyhow::Result<(RunningService<RoleClient, H>, Option<u32>)> {
    let cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate")).configure(|cmd| {
        cmd.arg("serve")
            .env("TOLLGATE_CONFIG", dir.join("pricing.toml"))
            .env("TOLLGATE_RECEIPT_KEY", dir.join("receipt.key"))
            .env("TOLLGATE_LOG", "tollgate=warn");
        if let Some(payer) = payer {
            cmd.args(["--payer", payer]);
        }
    });
    let (transport, _) = TokioChildProcess::builder(cmd)
        .stderr(Stdio::inherit())
        .spawn()?;
    let pid = transport.id();
    Ok((handler.serve(transport).await?, pid))
}

/// The server's CPU time per call of `tool`, over `n` calls one at a time.
async fn server_cpu_per_call(
    client: &Client,
    pid: u32,
    tool: &str,
    n: usize,
) -> anyhow::Result<Option<Duration>> {
    let params = hello(tool);
    let Some(before) = cpu_time(pid) else {
        return Ok(None);
    };
    for _ in 0..n {
        let r = client.call_tool(params.clone()).await?;
        anyhow::ensure!(r.is_error != Some(true), "{tool} failed: {r:?}");
    }
    Ok(cpu_time(pid).map(|after| after.saturating_sub(before) / n as u32))
}

/// The proxy: a tollgate whose upstream is another tollgate serving its demo
/// tools free. Returns (free call straight to the upstream, the same call
/// through the proxy, a fast-path paid call through the proxy).
async fn proxy(n: usize) -> anyhow::Result<(Duration, Duration, Duration)> {
    let dir = tempfile::tempdir()?;
    let back = dir.path().join("back");
    let front = dir.path().join("front");
    std::fs::create_dir_all(&back)?;
    std::fs::create_dir_all(&front)?;
    std::fs::write(
        back.join("pricing.toml"),
        "[server]\nname = \"back\"\ncurrency = \"USD\"\n[store]\nurl = \"sqlite://back.db\"\nsynchronous = \"normal\"\n",
    )?;
    std::fs::write(
        front.join("pricing.toml"),
        format!(
            "[server]\nname = \"front\"\ncurrency = \"USD\"\n[store]\nurl = \"sqlite://front.db\"\nsynchronous = \"normal\"\n\
             [[upstreams]]\nname = \"back\"\ncommand = [\"{exe}\", \"serve\"]\nprefix = \"up_\"\n\
             env = {{ TOLLGATE_CONFIG = \"{config}\", TOLLGATE_RECEIPT_KEY = \"{key}\", TOLLGATE_LOG = \"tollgate=warn\" }}\n\
             [[tools]]\nname = \"up_echo\"\nprice = \"0.01\"\n",
            exe = env!("CARGO_BIN_EXE_tollgate"),
            config = back.join("pricing.toml").display(),
            key = back.join("receipt.key").display(),
        ),
    )?;
    let db = format!("sqlite://{}", front.join("front.db").display());
    let store = SqliteStore::connect(&db, Synchronous::Normal).await?;
    store
        .topup(
            &AccountRef::wallet("bench", &Currency::parse("USD")?),
            Units::parse("1000000")?,
            None,
        )
        .await?;
    let direct = client(&back, None).await?;
    let [straight] = mean_round_trips(&direct, ["word_count"], n).await?;
    direct.cancel().await?;
    let proxied = client(&front, Some("bench")).await?;
    let [through] = mean_round_trips(&proxied, ["up_word_count"], n).await?;
    let [paid] = mean_round_trips(&proxied, ["up_echo"], n).await?;
    proxied.cancel().await?;
    Ok((straight, through, paid))
}

/// The interactive flows, on `synchronous = normal`.
async fn interactive_flows(n: usize) -> anyhow::Result<FlowFigures> {
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("pricing.toml"),
        "[server]\nname = \"bench\"\nmode = \"elicitation\"\ncurrency = \"USD\"\n\
         [store]\nurl = \"sqlite://bench.db\"\nsynchronous = \"normal\"\n\
         [[tools]]\nname = \"echo\"\nprice = \"0.01\"\n\
         [[tools]]\nname = \"divide\"\nprice = \"0.05\"\nmode = \"progress\"\n",
    )?;
    let db = format!("sqlite://{}", dir.path().join("bench.db").display());
    let store = Arc::new(SqliteStore::connect(&db, Synchronous::Normal).await?);
    let handler = PayingClient {
        store,
        paying: Default::default(),
        last_paid: Default::default(),
    };
    let (client, _) = connect(dir.path(), None, handler.clone()).await?;
    let flows = (n / 10).max(50);
    let free_params =
        CallToolRequestParams::new("word_count").with_arguments(args(json!({"text": "a b"})));
    for _ in 0..flows / 10 {
        client.call_tool(free_params.clone()).await?;
    }
    let start = Instant::now();
    for _ in 0..flows {
        client.call_tool(free_params.clone()).await?;
    }
    let free = start.elapsed() / flows as u32;

    let timed = |tool: &'static str, arguments: serde_json::Value| {
        let client = &client;
        async move {
            let params = CallToolRequestParams::new(tool).with_arguments(args(arguments));
            let start = Instant::now();
            for _ in 0..flows {
                let r = client.call_tool(params.clone()).await?;
                anyhow::ensure!(r.is_error != Some(true), "{tool} flow failed: {r:?}");
            }
            Ok::<_, anyhow::Error>(start.elapsed() / flows as u32)
        }
    };
    let elicitation = timed("echo", json!({"text": "hi"})).await?;
    let elicitation_payment = handler.take_mean_payment();
    let progress = timed("divide", json!({"a": 1, "b": 2})).await?;
    let progress_payment = handler.take_mean_payment();
    client.cancel().await?;
    Ok(FlowFigures {
        free,
        elicitation,
        elicitation_payment,
        progress,
        progress_payment,
    })
}

/// The call the round trips and CPU figures time: `tool` on a short text.
fn hello(tool: &str) -> CallToolRequestParams {
    CallToolRequestParams::new(tool.to_owned()).with_arguments(args(json!({"text": "hello world"})))
}

/// Mean round trip of each of `tools`, called in turn (with two: free,
/// paid, free, …) so that the machine's changing load weighs on all alike.
async fn mean_round_trips<const N: usize>(
    client: &Client,
    tools: [&str; N],
    n: usize,
) -> anyhow::Result<[Duration; N]> {
    let params = tools.map(hello);
    for _ in 0..n / 10 {
        for params in &params {
            client.call_tool(params.clone()).await?;
        }
    }
    let mut took = [Duration::ZERO; N];
    for _ in 0..n {
        for (params, took) in params.iter().zip(&mut took) {
            let start = Instant::now();
            let r = client.call_tool(params.clone()).await?;
            *took += start.elapsed();
            anyhow::ensure!(r.is_error != Some(true), "{} failed: {r:?}", params.name);
        }
    }
    Ok(took.map(|took| took / n as u32))
}

/// Calls per second from one client keeping 16 calls in flight.
async fn throughput(client: &Client, tool: &str, n: usize) -> anyhow::Result<f64> {
    let start = Instant::now();
    let done = stream::iter(0..n)
        .map(|i| {
            let params = CallToolRequestParams::new(tool.to_owned())
                .with_arguments(args(json!({"text": format!("{i}")})));
            client.call_tool(params)
        })
        .buffer_unordered(16)
        .filter(|r| std::future::ready(r.as_ref().is_ok_and(|r| r.is_error != Some(true))))
        .count()
        .await;
    anyhow::ensure!(
        done == n,
        "only {done} of {n} concurrent {tool} calls succeeded"
    );
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

async fn run(sync: Synchronous, n: usize) -> anyhow::Result<Figures> {
    let dir = tempfile::tempdir()?;
    let sync_name = match sync {
        Synchronous::Full => "full",
        Synchronous::Normal => "normal",
    };
    std::fs::write(
        dir.path().join("pricing.toml"),
        format!(
            "[server]\nname = \"bench\"\nmode = \"two_step\"\ncurrency = \"USD\"\n\
             [store]\nurl = \"sqlite://bench.db\"\nsynchronous = \"{sync_name}\"\n\
             [[tools]]\nname = \"echo\"\nprice = \"0.01\"\n"
        ),
    )?;
    let db = format!("sqlite://{}", dir.path().join("bench.db").display());
    let store = Arc::new(SqliteStore::connect(&db, sync).await?);
    let usd = Currency::parse("USD")?;
    store
        .topup(
            &AccountRef::wallet("bench", &usd),
            Units::parse("1000000")?,
            None,
        )
        .await?;

    let (payer, pid) = connect(dir.path(), Some("bench"), ()).await?;
    let [free, paid] = mean_round_trips(&payer, ["word_count", "echo"], n).await?;
    let mut cpu = None;
    if let Some(pid) = pid {
        let free = server_cpu_per_call(&payer, pid, "word_count", n).await?;
        let paid = server_cpu_per_call(&payer, pid, "echo", n).await?;
        cpu = free.zip(paid);
    }

    let free_throughput = throughput(&payer, "word_count", n).await?;
    let throughput = throughput(&payer, "echo", n).await?;
    payer.cancel().await?;

    // two_step: an anonymous caller, paid in dev mode between call and confirm.
    let anonymous = client(dir.path(), None).await?;
    let flows = (n / 10).max(50);
    let start = Instant::now();
    for _ in 0..flows {
        let first = anonymous
            .call_tool(
                CallToolRequestParams::new("echo").with_arguments(args(json!({"text": "hi"}))),
            )
            .await?;
        let id = first
            .structured_content
            .as_ref()
            .and_then(|s| s["payment_id"].as_str())
            .ok_or_else(|| anyhow::anyhow!("no payment id: {first:?}"))?
            .to_owned();
        store.pay_session(&id, None, now_ms()).await?;
        let done = anonymous
            .call_tool(
                CallToolRequestParams::new("confirm_echo_payment")
                    .with_arguments(args(json!({"payment_id": id}))),
            )
            .await?;
        anyhow::ensure!(done.is_error != Some(true), "confirm failed: {done:?}");
    }
    let two_step = start.elapsed() / flows as u32;
    anonymous.cancel().await?;
    Ok(Figures {
        free,
        paid,
        cpu,
        two_step,
        free_throughput,
        throughput,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `cargo test --benches` runs this with --bench absent; do nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        return Ok(());
    }
    let n: usize = std::env::var("BENCH_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    println!("tollgate round trips over stdio, {n} calls per figure, one client");
    println!(
        "{:<8} {:>10} {:>14} {:>10} {:>14} {:>13} {:>13}   server CPU per call: free, paid (ratio)",
        "sync",
        "free call",
        "fast-path call",
        "paid/free",
        "two_step flow",
        "free/s (x16)",
        "paid/s (x16)"
    );
    for sync in [Synchronous::Normal, Synchronous::Full] {
        let f = run(sync, n).await?;
        let cpu = f.cpu.map_or("-".into(), |(free, paid)| {
            format!(
                "{:.1}µs, {:.1}µs ({:.2}x)",
                free.as_secs_f64() * 1e6,
                paid.as_secs_f64() * 1e6,
                paid.as_secs_f64() / free.as_secs_f64()
            )
        });
        println!(
            "{:<8} {:>8.1}µs {:>12.1}µs {:>9.2}x {:>12.1}µs {:>13.0} {:>13.0}   {cpu}",
            format!("{sync:?}").to_lowercase(),
            f.free.as_secs_f64() * 1e6,
            f.paid.as_secs_f64() * 1e6,
            f.paid.as_secs_f64() / f.free.as_secs_f64(),
            f.two_step.as_secs_f64() * 1e6,
            f.free_throughput,
            f.throughput
        );
    }
    let (straight, through, paid) = proxy(n).await?;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!();
    println!(
        "proxy (normal): a tollgate in front of an upstream MCP server (another tollgate, over stdio)"
    );
    println!(
        "{:<28} {:>10}\n{:<28} {:>10}\n{:<28} {:>10}\n{:<28} {:>10}",
        "free call, straight",
        format!("{:.1}µs", us(straight)),
        "free call, through tollgate",
        format!("{:.1}µs", us(through)),
        "added by the proxy",
        format!("{:.1}µs", us(through.saturating_sub(straight))),
        "fast-path paid, through",
        format!("{:.1}µs", us(paid)),
    );

    let f = interactive_flows(n).await?;
    println!();
    println!(
        "interactive flows (normal): an anonymous caller whose client pays at once when asked"
    );
    println!(
        "{:<12} {:>10} {:>30} {:>14} {:>16}",
        "flow", "total", "round trips (as free calls)", "payment", "gate overhead"
    );
    for (name, total, trips, payment) in [
        ("elicitation", f.elicitation, 2, f.elicitation_payment),
        ("progress", f.progress, 1, f.progress_payment),
    ] {
        let unavoidable = f.free * trips + payment;
        let overhead = total.saturating_sub(unavoidable);
        println!(
            "{:<12} {:>8.1}µs {:>21} x {:>6.1}µs {:>12.1}µs {:>10.1}µs ({:.0}%)",
            name,
            us(total),
            trips,
            us(f.free),
            us(payment),
            us(overhead),
            100.0 * overhead.as_secs_f64() / total.as_secs_f64()
        );
    }
    Ok(())
}
