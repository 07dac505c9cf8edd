//! Round-trip benchmark over stdio against the real `tollgate` binary.
//!
//! `cargo bench --bench roundtrip` prints, for `synchronous = normal` and
//! `full`: the mean round trip of a free call, of a fast-path paid call, of a
//! full two_step flow (call, pay, confirm), and free and fast-path calls per
//! second from one client keeping 16 calls in flight. Compare figures as ratios within one
//! run; absolute numbers depend on the machine's load.
//!
//! `BENCH_CALLS` sets the number of calls per figure (default 3000).

use std::{
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{StreamExt, stream};
use rmcp::{
    RoleClient, ServiceExt,
    model::{CallToolRequestParams, JsonObject},
    service::RunningService,
    transport::{ConfigureCommandExt, TokioChildProcess},
};
use serde_json::json;
use tollgate::{
    config::Synchronous,
    money::{Currency, Units},
    store::{AccountRef, SqliteStore, Store, now_ms},
};

type Client = RunningService<RoleClient, ()>;

struct Figures {
    free: Duration,
    paid: Duration,
    two_step: Duration,
    free_throughput: f64,
    throughput: f64,
}

fn args(v: serde_json::Value) -> JsonObject {
    v.as_object().cloned().unwrap_or_default()
}

async fn client(dir: &std::path::Path, payer: Option<&str>) -> anyhow::Result<Client> {
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
    Ok(().serve(transport).await?)
}

async fn mean_round_trip(client: &Client, tool: &str, n: usize) -> anyhow::Result<Duration> {
    let params = CallToolRequestParams::new(tool.to_owned())
        .with_arguments(args(json!({"text": "hello world"})));
    for _ in 0..n / 10 {
        client.call_tool(params.clone()).await?;
    }
    let start = Instant::now();
    for _ in 0..n {
        let r = client.call_tool(params.clone()).await?;
        anyhow::ensure!(r.is_error != Some(true), "{tool} failed: {r:?}");
    }
    Ok(start.elapsed() / n as u32)
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

    let payer = client(dir.path(), Some("bench")).await?;
    let free = mean_round_trip(&payer, "word_count", n).await?;
    let paid = mean_round_trip(&payer, "echo", n).await?;

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
        "{:<8} {:>10} {:>14} {:>10} {:>14} {:>13} {:>13}",
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
        println!(
            "{:<8} {:>8.1}µs {:>12.1}µs {:>9.2}x {:>12.1}µs {:>13.0} {:>13.0}",
            format!("{sync:?}").to_lowercase(),
            f.free.as_secs_f64() * 1e6,
            f.paid.as_secs_f64() * 1e6,
            f.paid.as_secs_f64() / f.free.as_secs_f64(),
            f.two_step.as_secs_f64() * 1e6,
            f.free_throughput,
            f.throughput
        );
    }
    Ok(())
}
