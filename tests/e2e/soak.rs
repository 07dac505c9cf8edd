//! Soak: mixed traffic against one `tollgate serve --http` for a set time
//! (`TOLLGATE_SOAK_SECS`, 120 by default; `scripts/soak` runs 30 minutes):
//! the fast path (with tool failures), every payment mode (two_step,
//! resubmit, progress, auto, elicitation, dynamic_tools; with tool failures
//! and abandoned payments that expire), and free calls. One of bob's two
//! clients answers elicitation (so `auto` and `elicitation` prompt it), the
//! other does not (so they fall back to resubmit); both call the confirm
//! tools of two_step and dynamic_tools (a dynamic one is registered for
//! each call, and withdrawn after). The elicitation and dynamic_tools tools
//! are an upstream's (another `tollgate serve`, over stdio): the demo tools
//! are five. It prints the server's memory (RSS), open holds, intents and
//! stored results over time, and checks that
//! - every answer is the expected one for its caller, tool and mode:
//!   `paid`, or, for the call meant to fail (divide by 0), released (fast
//!   path) or refunded; a free call's result; and that every mode, and the
//!   fast path, had paid calls;
//! - the server kept up: at least `MIN_CALLS_PER_SEC` calls a second;
//! - memory stays flat once warm: growth per call (least squares over the
//!   readings after the first third) under `MAX_BYTES_PER_CALL`, and RSS
//!   never over `MAX_RSS_MIB`;
//! - expired intents and stored results are pruned on schedule: nothing
//!   older than `keep_results` (plus one upkeep round) is left, and the
//!   counts stay under what the calls of that window could have left;
//! - once traffic stops nothing is left open, and `ledger verify` passes.
//!
//! Run by `.ci/run` (it is `#[ignore]`d in a plain `cargo test`).

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use rmcp::{
    ClientHandler, ErrorData as McpError, RoleClient, ServiceExt,
    model::{
        CallToolResult, ClientCapabilities, ClientConfig, ElicitRequestParams, ElicitResult,
        ElicitationCapability, FormElicitationCapability, Implementation,
    },
    service::{RequestContext, RunningService},
    transport::{
        StreamableHttpClientTransport, streamable_http_client::StreamableHttpClientTransportConfig,
    },
};
use serde_json::{Value, json};
use tollgate::{
    app,
    store::{Cursor, IntentStatus, Pruned, now_ms},
};

use crate::{harness::*, http_service::call, inproc::config_for};

/// How long results and ended unpaid intents are kept here.
const KEEP_RESULTS_SECS: u64 = 15;
/// How long a payment can be paid (and an abandoned one waits).
const PAYMENT_TTL_SECS: u64 = 2;
/// An upkeep round: a third of the 3 s instance lease.
const UPKEEP_SECS: u64 = 1;

/// Memory growth once warm, per call, that fails the soak. A leak of a
/// fraction of a KiB a call passes any bound in MiB over two minutes; in
/// the slope it shows. Measured (debug build, SQLite): 94-239 bytes a
/// call over the later readings of a 2-minute run, while SQLite's page
/// caches still fill as the store grows (up to 2 MiB a connection); about
/// 20 over the last 20 minutes of a 30-minute one. A leak of 1.5 KiB a
/// tool run, put in on purpose, read 2113 bytes a call and failed.
const MAX_BYTES_PER_CALL: f64 = 1024.0;
/// The server's RSS at any reading (measured: 35-55 MiB). Over a
/// 30-minute soak this fails a leak of a few hundred bytes a call.
const MAX_RSS_MIB: u64 = 160;
/// A server that answers fewer calls than this a second is crawling
/// (measured: 220-700 a second in a debug build, on two cores shared with
/// other tests).
const MIN_CALLS_PER_SEC: u64 = 50;

/// The upstream's tools priced here: the demo tools are five, one mode
/// each (and `word_count` free).
const DYNAMIC: &str = "up_echo";
const ELICITED: &str = "up_word_count";

/// Each priced tool in a different mode; bob, who has no wallet, meets them
/// all, paid at once by the mock provider. Alice's wallet pays on the fast
/// path. `upstream` is the upstream's `[[upstreams]]` entry.
fn soak_pricing(upstream: &str) -> String {
    format!(
        r#"[server]
name = "soak"
mode = "resubmit"
currency = "USD"
payment_ttl = "{PAYMENT_TTL_SECS}s"
approval_threshold = "5.00"
keep_results = "{KEEP_RESULTS_SECS}s"
instance_lease = "{}s"
demo_tools = true

[store]
synchronous = "normal"

[provider]
kind = "mock"

{upstream}

[[tools]]
name = "echo"
price = "0.01"
mode = "two_step"

[[tools]]
name = "divide"
price = "0.05"
mode = "resubmit"

[[tools]]
name = "sleep"
price = "0.02"
mode = "progress"

[[tools]]
name = "search"
price = "0.01"
mode = "auto"

[[tools]]
name = "{DYNAMIC}"
price = "0.01"
mode = "dynamic_tools"

[[tools]]
name = "{ELICITED}"
price = "0.01"
mode = "elicitation"
"#,
        UPKEEP_SECS * 3
    )
}

/// Another `tollgate serve` over stdio, serving the demo tools free from a
/// store of its own in `dir`: their names with `up_`.
fn upstream(dir: &std::path::Path) -> String {
    let config = dir.join("upstream.toml");
    std::fs::write(
        &config,
        "[server]\nname = \"soak-upstream\"\ncurrency = \"USD\"\n\n[store]\nsynchronous = \"normal\"\n",
    )
    .expect("write the upstream's config");
    let path = |p: std::path::PathBuf| format!("{:?}", p.display().to_string());
    format!(
        r#"[[upstreams]]
name = "up"
command = [{exe:?}, "serve"]
prefix = "up_"
unpriced = "hidden"
env = {{ TOLLGATE_CONFIG = {config}, TOLLGATE_DB = {db}, TOLLGATE_RECEIPT_KEY = {key}, TOLLGATE_LOG = "tollgate=warn" }}"#,
        exe = EXE,
        config = path(config.clone()),
        db = path(dir.join("upstream.db")),
        key = path(dir.join("keys/upstream.key")),
    )
}

fn soak_secs() -> u64 {
    std::env::var("TOLLGATE_SOAK_SECS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(120)
}

fn some_call(rng: &mut fastrand::Rng, n: u64) -> (&'static str, Value) {
    match rng.u8(0..7) {
        0 => ("echo", json!({ "text": format!("call {n}") })),
        1 => ("divide", json!({ "a": n, "b": rng.u8(0..4) })),
        2 => ("sleep", json!({ "ms": rng.u64(0..5) })),
        3 => ("search", json!({ "query": "an", "limit": 3 })),
        4 => ("word_count", json!({ "text": "one two three" })),
        5 => (DYNAMIC, json!({ "text": format!("call {n}") })),
        _ => (ELICITED, json!({ "text": "one two three" })),
    }
}

/// Who calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Caller {
    /// Her wallet pays on the fast path.
    Alice,
    /// No wallet, a client that cannot answer elicitation.
    Bob,
    /// No wallet, a client that answers elicitation (accepts).
    BobEliciting,
}

/// How a call must go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    /// A free tool: its result, no payment.
    Free,
    /// Answered inside the first call (`prompted`: after an elicitation).
    AtOnce { prompted: bool },
    /// A payment id and a confirm tool whose name starts so.
    Confirm(&'static str),
    /// A payment id, to call again with.
    Resubmit,
}

/// The route of `tool` for `caller`, and what its paid calls count as.
fn route(caller: Caller, tool: &str) -> (Route, &'static str) {
    use Route::*;
    match (caller, tool) {
        (_, "word_count") => (Free, "free"),
        (Caller::Alice, _) => (AtOnce { prompted: false }, "fast path"),
        (_, "echo") => (Confirm("confirm_echo_payment"), "two_step"),
        (_, "divide") => (Resubmit, "resubmit"),
        (_, "sleep") => (AtOnce { prompted: false }, "progress"),
        (Caller::Bob, "search") => (Resubmit, "auto, as resubmit"),
        (_, "search") => (AtOnce { prompted: true }, "auto, as elicitation"),
        (_, DYNAMIC) => (Confirm("confirm_pay_"), "dynamic_tools"),
        (Caller::Bob, ELICITED) => (Resubmit, "elicitation, as resubmit"),
        (_, ELICITED) => (AtOnce { prompted: true }, "elicitation"),
        (_, other) => panic!("no route for {other}"),
    }
}

/// Every label a paid call (or a free one) must have been counted under.
const LABELS: [&str; 10] = [
    "fast path",
    "two_step",
    "resubmit",
    "progress",
    "auto, as resubmit",
    "auto, as elicitation",
    "dynamic_tools",
    "elicitation, as resubmit",
    "elicitation",
    "free",
];

/// What the workers saw.
#[derive(Default)]
struct Tally {
    calls: AtomicU64,
    /// Paid (or free) calls per route label.
    answered: Mutex<BTreeMap<&'static str, u64>>,
    /// Divides by 0, released or refunded.
    failed_as_meant: AtomicU64,
    /// Slow-path calls that ran (each leaves a stored result).
    slow_runs: AtomicU64,
    /// Payments left unredeemed, to expire.
    abandoned: AtomicU64,
}

/// A client that answers every elicitation with accept (the mock provider
/// has paid already), counting the prompts.
#[derive(Clone, Default)]
struct Eliciting {
    prompts: Arc<AtomicUsize>,
}

impl ClientHandler for Eliciting {
    fn get_info(&self) -> ClientConfig {
        ClientConfig::new(
            ClientCapabilities::builder()
                .enable_elicitation_with(
                    ElicitationCapability::new().with_form(FormElicitationCapability::new()),
                )
                .build(),
            Implementation::new("tollgate-soak-client", "0.0.1"),
        )
    }

    async fn create_elicitation(
        &self,
        request: ElicitRequestParams,
        _context: RequestContext<RoleClient>,
    ) -> Result<ElicitResult, McpError> {
        self.prompts.fetch_add(1, Ordering::SeqCst);
        Ok(crate::inproc::accepting(crate::inproc::first_form_field(
            &request,
        )))
    }
}

/// A client of the soak's server over HTTP, calling with `key`.
async fn connect<H: ClientHandler>(
    base: &str,
    key: &str,
    handler: H,
) -> RunningService<RoleClient, H> {
    let transport = StreamableHttpClientTransport::from_config(
        StreamableHttpClientTransportConfig::with_uri(format!("{base}/mcp"))
            .auth_header(key.to_owned()),
    );
    handler.serve(transport).await.expect("MCP over HTTP")
}

/// Takes a call through the route its caller and tool must take: a
/// confirm tool (`next_step`), or the same call again with the payment
/// id, or a prompt answered inside the call. One in ten payments that
/// need a second call is abandoned, to expire.
async fn drive<H: ClientHandler>(
    client: &RunningService<RoleClient, H>,
    prompts: Option<&AtomicUsize>,
    caller: Caller,
    rng: &mut fastrand::Rng,
    (tool, arguments): (&str, Value),
    tally: &Tally,
) {
    let meant_to_fail = tool == "divide" && arguments["b"] == 0;
    let (route, label) = route(caller, tool);
    let asked = || prompts.map_or(0, |p| p.load(Ordering::SeqCst));
    let asked_before = asked();
    let first = call(client, tool, arguments.clone()).await;
    let what = format!("{caller:?} {tool} {arguments} ({label})");
    let prompted = asked() - asked_before;
    assert_eq!(
        prompted,
        usize::from(route == Route::AtOnce { prompted: true }),
        "{what}: prompts: {first:?}"
    );
    let prefix = match route {
        Route::Free => {
            assert!(payment_meta(&first).is_null(), "{what}: {first:?}");
            assert_eq!(first.is_error, Some(false), "{what}: {first:?}");
            return count(tally, label);
        }
        Route::AtOnce { .. } => return settled(&first, caller, meant_to_fail, label, tally, &what),
        Route::Confirm(prefix) => Some(prefix),
        Route::Resubmit => None,
    };
    assert!(
        payment_meta(&first).is_null(),
        "{what}: charged at once: {first:?}"
    );
    let body = structured(&first);
    let id = payment_id_of(&first);
    let next = body["next_step"].as_str();
    match (prefix, next) {
        (Some(prefix), Some(next)) => assert!(next.starts_with(prefix), "{what}: {first:?}"),
        (None, None) => {}
        _ => panic!("{what}: expected next_step {prefix:?}: {first:?}"),
    }
    if rng.u8(0..10) == 0 {
        tally.abandoned.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let paid = match next {
        // A dynamic confirm tool names its payment; two_step's takes it.
        Some(next) if next.starts_with("confirm_pay_") => call(client, next, json!({})).await,
        Some(next) => call(client, next, json!({ "payment_id": id })).await,
        None => {
            let mut again = arguments;
            again["payment_id"] = json!(id);
            call(client, tool, again).await
        }
    };
    assert_eq!(
        payment_meta(&paid)["payment_id"],
        id.as_str(),
        "{what}: {paid:?}"
    );
    settled(&paid, caller, meant_to_fail, label, tally, &what);
}

fn count(tally: &Tally, label: &'static str) {
    *tally
        .answered
        .lock()
        .expect("tally")
        .entry(label)
        .or_default() += 1;
}

/// A priced call that ran: paid, or, only for a call meant to fail,
/// released (fast path) or refunded.
fn settled(
    r: &CallToolResult,
    caller: Caller,
    meant_to_fail: bool,
    label: &'static str,
    tally: &Tally,
    what: &str,
) {
    let failed = if caller == Caller::Alice {
        "released"
    } else {
        "refunded"
    };
    let expected = if meant_to_fail { failed } else { "paid" };
    assert_eq!(
        payment_meta(r)["status"].as_str(),
        Some(expected),
        "{what}: expected `{expected}`, got {r:?}"
    );
    assert_eq!(r.is_error, Some(meant_to_fail), "{what}: {r:?}");
    if caller != Caller::Alice {
        tally.slow_runs.fetch_add(1, Ordering::Relaxed);
    }
    if meant_to_fail {
        tally.failed_as_meant.fetch_add(1, Ordering::Relaxed);
    } else {
        count(tally, label);
    }
}

/// The server's resident memory. Panics rather than read 0: a series of
/// zeros would pass "memory flat" with nothing measured.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/status: {e}"));
    let kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status:\n{status}"));
    assert!(kib > 0, "the server's RSS read as 0 KiB");
    kib
}

/// One look at the server while it runs.
#[derive(Clone, Copy, Debug, Default)]
struct Reading {
    secs: f64,
    calls: u64,
    slow_runs: u64,
    abandoned: u64,
    rss_kib: u64,
}

impl Reading {
    /// The latest reading at least `window` seconds before `now`'s (the
    /// first, all zeros, when there is none): what came since is at least
    /// what the window holds.
    fn before(readings: &[Reading], now: &Reading, window: u64) -> Reading {
        readings
            .iter()
            .rev()
            .find(|r| r.secs <= now.secs - window as f64)
            .copied()
            .unwrap_or_default()
    }
}

/// The least-squares slope of RSS (bytes) over calls.
fn bytes_per_call(readings: &[Reading]) -> f64 {
    let n = readings.len() as f64;
    let mean_x = readings.iter().map(|r| r.calls as f64).sum::<f64>() / n;
    let mean_y = readings
        .iter()
        .map(|r| r.rss_kib as f64 * 1024.0)
        .sum::<f64>()
        / n;
    let (mut cov, mut var) = (0.0, 0.0);
    for r in readings {
        let dx = r.calls as f64 - mean_x;
        cov += dx * (r.rss_kib as f64 * 1024.0 - mean_y);
        var += dx * dx;
    }
    cov / var
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a soak of minutes: run by .ci/run and scripts/soak"]
async fn mixed_traffic_for_minutes_keeps_memory_flat_and_prunes_on_schedule() {
    tollgate::testing::select(tollgate::testing::Backend::Sqlite);
    let env = Env::with_pricing(&soak_pricing(""));
    let dir = env.config.parent().expect("the config's directory");
    let pricing = soak_pricing(&upstream(dir));
    std::fs::write(&env.config, &pricing).expect("write pricing");
    env.topup("alice", "100000.00").await;
    let store = app::open_store(&env.db, &config_for(&env, &pricing))
        .await
        .expect("store");
    let server = env.serve_http().await;
    let pid = server.child.id().expect("server pid");
    let (alice, bob) = (env.mcp_key("alice").await, env.mcp_key("bob").await);

    let secs = soak_secs();
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut workers = Vec::new();
    let callers = [
        Caller::Alice,
        Caller::Bob,
        Caller::BobEliciting,
        Caller::Alice,
    ];
    for (w, caller) in callers.into_iter().enumerate() {
        let key = if caller == Caller::Alice {
            &alice
        } else {
            &bob
        };
        let (stop, tally) = (stop.clone(), tally.clone());
        let mut rng = fastrand::Rng::with_seed(w as u64);
        if caller == Caller::BobEliciting {
            let handler = Eliciting::default();
            let prompts = handler.prompts.clone();
            let client = connect(&server.base, key, handler).await;
            workers.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let n = tally.calls.fetch_add(1, Ordering::Relaxed);
                    let call = some_call(&mut rng, n);
                    drive(&client, Some(&prompts), caller, &mut rng, call, &tally).await;
                }
                client.cancel().await.ok();
            }));
        } else {
            let client = connect(&server.base, key, ()).await;
            workers.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let n = tally.calls.fetch_add(1, Ordering::Relaxed);
                    let call = some_call(&mut rng, n);
                    drive(&client, None, caller, &mut rng, call, &tally).await;
                }
                client.cancel().await.ok();
            }));
        }
    }

    eprintln!("soak: {secs} s of mixed traffic over HTTP (keep_results {KEEP_RESULTS_SECS} s)");
    eprintln!(
        "  time    calls   RSS MiB  open holds  stored results (bound)  unconsumed intents (bound)  intents"
    );
    let started = Instant::now();
    // About 24 readings, at least 5 s apart: the slope needs several.
    let every = Duration::from_secs((secs / 24).max(5));
    let mut readings = vec![Reading::default()];
    // What is kept for a while, and for how long at most after its call.
    let results_window = KEEP_RESULTS_SECS + 3 * UPKEEP_SECS + 3;
    let unredeemed_window = PAYMENT_TTL_SECS + results_window;
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(every.min(Duration::from_secs(secs).saturating_sub(started.elapsed())))
            .await;
        let stats = store.stats().await.expect("stats");
        let now = Reading {
            secs: started.elapsed().as_secs_f64(),
            calls: tally.calls.load(Ordering::Relaxed),
            slow_runs: tally.slow_runs.load(Ordering::Relaxed),
            abandoned: tally.abandoned.load(Ordering::Relaxed),
            rss_kib: rss_kib(pid),
        };
        // Each stored result is a call's in flight (one per worker), a
        // slow-path run's (kept `keep_results`), or an abandoned payment's
        // refund (made `keep_results` after its time ran out, and kept as
        // long); each unconsumed intent is a call's in flight or an
        // abandoned payment's not yet refunded.
        let results_bound = now.slow_runs
            - Reading::before(&readings, &now, results_window).slow_runs
            + now.abandoned
            - Reading::before(&readings, &now, unredeemed_window + KEEP_RESULTS_SECS).abandoned
            + callers.len() as u64;
        let unconsumed_bound = now.abandoned
            - Reading::before(&readings, &now, unredeemed_window).abandoned
            + callers.len() as u64;
        let unconsumed: i64 = stats
            .intents
            .iter()
            .filter(|(status, _)| {
                status != IntentStatus::Succeeded.as_str()
                    && status != IntentStatus::Failed.as_str()
            })
            .map(|(_, n)| n)
            .sum();
        eprintln!(
            "  {:>4} s {:>8} {:>9.1} {:>11} {:>15} ({:>5}) {:>19} ({:>5})  {:?}",
            started.elapsed().as_secs(),
            now.calls,
            now.rss_kib as f64 / 1024.0,
            stats.open_holds,
            stats.stored_results,
            results_bound,
            unconsumed,
            unconsumed_bound,
            stats.intents
        );
        readings.push(now);
        // A worker that stopped before its time failed: say why now.
        if let Some(w) = workers.iter().position(|w| w.is_finished()) {
            workers.swap_remove(w).await.expect("worker");
            panic!("worker {w} stopped before the soak's end");
        }
        assert!(
            now.rss_kib <= MAX_RSS_MIB * 1024,
            "the server's RSS is {} KiB, over {MAX_RSS_MIB} MiB",
            now.rss_kib
        );
        assert!(
            stats.stored_results as u64 <= results_bound,
            "{} stored results, more than the last {results_window} s of calls could leave \
             ({results_bound}): pruning is behind",
            stats.stored_results
        );
        assert!(
            unconsumed as u64 <= unconsumed_bound,
            "{unconsumed} unconsumed intents, more than the calls in flight and the payments \
             abandoned in the last {unredeemed_window} s ({unconsumed_bound}): {:?}",
            stats.intents
        );
        // Pruning keeps up: nothing is left past its time by more than
        // two upkeep rounds.
        let overdue = now_ms() - (KEEP_RESULTS_SECS + 3 * UPKEEP_SECS) as i64 * 1000;
        if started.elapsed() > Duration::from_secs(KEEP_RESULTS_SECS + 5) {
            assert_eq!(
                store.prune(overdue).await.expect("prune"),
                Pruned::default(),
                "the server left things past their time unpruned"
            );
            let unredeemed = store
                .unredeemed(overdue, &Cursor::start())
                .await
                .expect("unredeemed");
            assert!(
                unredeemed.is_empty(),
                "paid payments left unrefunded: {}",
                unredeemed.len()
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.expect("worker");
    }
    let calls = tally.calls.load(Ordering::Relaxed);
    let answered = tally.answered.lock().expect("tally").clone();
    eprintln!(
        "soak: {calls} calls: {answered:?}, {} divides by 0 released or refunded, {} payments \
         abandoned",
        tally.failed_as_meant.load(Ordering::Relaxed),
        tally.abandoned.load(Ordering::Relaxed)
    );

    // Every mode, the fast path and free calls answered; the server kept up.
    for label in LABELS {
        assert!(
            answered.get(label).copied().unwrap_or(0) > 0,
            "no call went through as {label}: {answered:?}"
        );
    }
    assert!(
        tally.failed_as_meant.load(Ordering::Relaxed) > 0,
        "no call failed as meant"
    );
    assert!(
        calls >= MIN_CALLS_PER_SEC * secs,
        "only {calls} calls in {secs} s: under {MIN_CALLS_PER_SEC} a second"
    );

    // Flat: after the first third (the page caches filling, the allocator
    // finding its size), memory grows by less than MAX_BYTES_PER_CALL a
    // call (least squares over those readings, so that one reading just
    // after pruning freed memory, or at a peak, does not decide).
    let warm = &readings[1 + readings.len() / 3..];
    assert!(warm.len() >= 3, "too short a soak to judge: {readings:?}");
    let slope = bytes_per_call(warm);
    let peak = readings.iter().map(|r| r.rss_kib).max().unwrap_or(0);
    eprintln!(
        "soak: RSS {:.1} MiB at {:.0} s, {:.1} MiB at the end, at most {:.1} MiB; once warm it \
         grew {slope:.1} bytes a call (bound {MAX_BYTES_PER_CALL}) over {} calls",
        warm[0].rss_kib as f64 / 1024.0,
        warm[0].secs,
        readings.last().map_or(0, |r| r.rss_kib) as f64 / 1024.0,
        peak as f64 / 1024.0,
        warm.last().map_or(0, |r| r.calls) - warm[0].calls,
    );
    assert!(
        slope < MAX_BYTES_PER_CALL,
        "memory grew {slope:.1} bytes a call once warm (bound {MAX_BYTES_PER_CALL}): {warm:?}"
    );
    // Nothing left open once traffic stops; the ledger is sound.
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.stats().await.expect("stats").open_holds > 0 {
        assert!(Instant::now() < deadline, "holds left open after the soak");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    env.assert_ledger_ok().await;
}
