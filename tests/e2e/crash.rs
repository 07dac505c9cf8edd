//! Crash safety: `tollgate serve` killed with SIGKILL at random points in
//! fast-path and slow-path calls, then restarted, round after round. After
//! each restart:
//! - every payment a client was told is paid is in the ledger, captured
//!   exactly once (no captured payment is lost, none is taken twice);
//! - once the dead processes' leases lapse, the restarted instance's
//!   recovery has released every hold they left open and refunded every
//!   paid run they left running (no hold stays open);
//! - redeeming any payment id again never runs its tool a second time;
//! - `tollgate ledger verify` passes.
//!
//! `TOLLGATE_CRASH_ROUNDS` sets the rounds (20 by default; `scripts/crash-test`
//! runs 200), `TOLLGATE_CRASH_SEED` replays a run's random choices.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use rmcp::model::CallToolRequestParams;
use serde_json::{Value, json};
use tollgate::{
    app,
    store::{IntentStatus, Store},
};

use crate::{harness::*, inproc::config_for};

/// Alice's wallet pays on the fast path; bob has none, so his calls take
/// resubmit, paid at once by the mock provider. `sleep` is slow enough for
/// kills to land in the middle of runs.
fn crash_pricing() -> String {
    r#"[server]
name = "crash"
mode = "resubmit"
currency = "USD"
payment_ttl = "15m"
approval_threshold = "5.00"
instance_lease = "1s"

[store]
synchronous = "normal"

[provider]
kind = "mock"

[[tools]]
name = "echo"
price = "0.01"

[[tools]]
name = "sleep"
price = "0.02"

[[tools]]
name = "divide"
price = "0.05"
"#
    .into()
}

/// What clients were told, across rounds.
#[derive(Default)]
struct Told {
    /// Payment ids answered `paid`, fast path or slow.
    paid: BTreeSet<String>,
    /// Slow-path payment ids handed out, redeemed or not.
    issued: BTreeSet<String>,
}

fn rounds() -> usize {
    std::env::var("TOLLGATE_CRASH_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20)
}

fn seed() -> u64 {
    std::env::var("TOLLGATE_CRASH_SEED")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..))
}

/// One call of a mixed load: a paid echo, a slow paid sleep, or a divide
/// that may fail (and so be released or refunded).
fn some_call(rng: &mut fastrand::Rng, n: usize) -> (&'static str, Value) {
    match rng.u8(0..4) {
        0 => ("echo", json!({ "text": format!("call {n}") })),
        1 | 2 => ("sleep", json!({ "ms": rng.u64(0..40) })),
        _ => ("divide", json!({ "a": n, "b": rng.u8(0..3) })),
    }
}

/// Calls until the server dies under it: fast path (alice).
async fn fast_load(client: Arc<Client>, told: Arc<Mutex<Told>>, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    for n in 0.. {
        let (tool, arguments) = some_call(&mut rng, n);
        let Ok(r) = client
            .call_tool(CallToolRequestParams::new(tool).with_arguments(args(arguments)))
            .await
        else {
            return;
        };
        let payment = payment_meta(&r);
        if payment["status"] == "paid" {
            let id = payment["payment_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            told.lock().unwrap().paid.insert(id);
        }
    }
}

/// Calls until the server dies under it: resubmit (bob), each payment id
/// redeemed right after it is issued.
async fn slow_load(client: Arc<Client>, told: Arc<Mutex<Told>>, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    for n in 0.. {
        let (tool, arguments) = some_call(&mut rng, n);
        let call = |arguments: Value| {
            client.call_tool(CallToolRequestParams::new(tool).with_arguments(args(arguments)))
        };
        let Ok(first) = call(arguments.clone()).await else {
            return;
        };
        // (Under a loaded machine the store may answer "unavailable": then
        // there is no payment to follow.)
        if structured(&first)["error"] != "payment_required" {
            assert_eq!(
                error_code(&first),
                "payment_system_unavailable",
                "{first:?}"
            );
            continue;
        }
        let id = payment_id_of(&first);
        told.lock().unwrap().issued.insert(id.clone());
        let mut paid_call = arguments;
        paid_call["payment_id"] = json!(id);
        let Ok(r) = call(paid_call).await else {
            return;
        };
        if payment_meta(&r)["status"] == "paid" {
            told.lock().unwrap().paid.insert(id);
        }
    }
}

/// Open holds and running intents.
async fn in_flight(store: &dyn Store) -> (i64, i64) {
    let stats = store.stats().await.expect("stats");
    let running = stats
        .intents
        .iter()
        .find(|(status, _)| status == IntentStatus::Running.as_str())
        .map_or(0, |(_, n)| *n);
    (stats.open_holds, running)
}

/// Waits for the restarted instance's recovery: no open hold and no
/// running intent left by the dead ones.
async fn recovered(store: &dyn Store) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (open_holds, running) = in_flight(store).await;
        if open_holds == 0 && running == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "a restart did not recover: {open_holds} holds open, {running} intents running"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every payment a client was told is paid is captured exactly once; no
/// payment is captured twice.
async fn captures_match(store: &dyn Store, told: &Told) {
    let mut captures: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut lines = Vec::new();
    loop {
        let after = lines.last().map_or(0, |(id, _)| *id);
        let page = store
            .entries_page(None, after, i64::MAX, 1000)
            .await
            .expect("entries");
        let done = page.len() < 1000;
        lines.extend(page);
        if done {
            break;
        }
    }
    for (_, line) in lines {
        if line.kind == "capture"
            && let Some(id) = line.payment_id
        {
            captures.entry(id).or_default().insert(line.txn_id);
        }
    }
    for (id, txns) in &captures {
        assert_eq!(txns.len(), 1, "payment {id} captured {} times", txns.len());
    }
    for id in &told.paid {
        assert!(
            captures.contains_key(id),
            "payment {id} was answered paid, but its capture is lost"
        );
    }
}

/// Redeems every slow-path payment id again: a consumed one answers its
/// stored result (never a second run); one paid but never started may run
/// now, once, and answers replayed from then on.
async fn no_second_runs(bob: &Client, store: &dyn Store, told: &Told) {
    for id in &told.issued {
        let intent = store.intent(id).await.expect("intent").expect("kept");
        let mut arguments: Value = serde_json::from_str(&intent.args_json).expect("args");
        arguments["payment_id"] = json!(id);
        let again = call(bob, &intent.tool, arguments.clone()).await;
        let consumed = matches!(
            intent.status,
            IntentStatus::Succeeded | IntentStatus::Failed
        );
        if consumed {
            assert_eq!(
                payment_meta(&again)["replayed"],
                true,
                "{id} ({:?}) ran again: {again:?}",
                intent.status
            );
        }
        let once_more = call(bob, &intent.tool, arguments).await;
        if !payment_meta(&once_more).is_null() {
            assert_eq!(
                payment_meta(&once_more)["replayed"],
                true,
                "{id}: {once_more:?}"
            );
        }
    }
}

on_both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kill_9_at_random_points_loses_nothing_and_runs_nothing_twice() {
        let pricing = crash_pricing();
        let env = Env::with_pricing(&pricing);
        env.topup("alice", "1000.00").await;
        let config = config_for(&env, &pricing);
        let store = app::open_store(&env.db, &config).await.expect("store");
        let seed = seed();
        eprintln!("crash test: {} rounds, TOLLGATE_CRASH_SEED={seed}", rounds());
        let mut rng = fastrand::Rng::with_seed(seed);
        let told = Arc::new(Mutex::new(Told::default()));
        let (mut paid, mut left_holds, mut left_runs) = (0, 0, 0);

        for round in 0..=rounds() {
            // (Re)start both servers: their upkeep recovers what the killed
            // ones left a lease after start; those leases lapse in a second.
            let (alice, alice_pid) = env.client_and_pid(Some("alice"), &[]).await;
            let (bob, bob_pid) = env.client_and_pid(Some("bob"), &[]).await;
            recovered(store.as_ref()).await;
            env.assert_ledger_ok().await;
            let snapshot = std::mem::take(&mut *told.lock().unwrap());
            paid += snapshot.paid.len();
            captures_match(store.as_ref(), &snapshot).await;
            no_second_runs(&bob, store.as_ref(), &snapshot).await;
            if round == rounds() {
                alice.cancel().await.ok();
                bob.cancel().await.ok();
                break;
            }

            // Load on both, then SIGKILL both at a random moment.
            let (alice, bob) = (Arc::new(alice), Arc::new(bob));
            let mut load = Vec::new();
            for _ in 0..3 {
                load.push(tokio::spawn(fast_load(alice.clone(), told.clone(), rng.u64(..))));
                load.push(tokio::spawn(slow_load(bob.clone(), told.clone(), rng.u64(..))));
            }
            tokio::time::sleep(Duration::from_millis(rng.u64(50..500))).await;
            for pid in [alice_pid, bob_pid] {
                let killed = std::process::Command::new("kill")
                    .args(["-9", &pid.to_string()])
                    .status()
                    .expect("kill");
                assert!(killed.success());
            }
            for task in load {
                task.await.expect("load task");
            }
            let (holds, runs) = in_flight(store.as_ref()).await;
            left_holds += holds;
            left_runs += runs;
        }
        eprintln!(
            "crash test: {paid} payments answered paid; the kills left {left_holds} holds open \
             and {left_runs} paid runs running, all recovered"
        );
        // The kills did land in the middle of calls.
        assert!(paid > 0 && left_holds + left_runs > 0);
    }
}
