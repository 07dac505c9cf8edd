//! Crash safety: `tollgate serve` killed with SIGKILL at random points in
//! fast-path and slow-path calls, then restarted, round after round. Until
//! the kill every answer must be the expected one: `paid`, or, for a call
//! meant to fail (divide by 0), released (fast path) or refunded (slow
//! path); a transport error is allowed only once the kill is sent. After
//! each restart:
//! - every payment a client was told is paid is in the ledger, captured
//!   exactly once (no captured payment is lost, none is taken twice);
//! - once the dead processes' leases lapse, the restarted instance's
//!   recovery has released every hold they left open and refunded every
//!   paid run they left running (no hold stays open);
//! - redeeming any payment id again never runs its tool a second time: a
//!   consumed payment's redeem is a replay that adds no ledger entry and
//!   moves no balance (revenue, alice's wallet);
//! - `tollgate ledger verify` passes (after the last round's redeems too).
//!
//! At the end, both paths must have answered `paid` in most rounds, and
//! (over 10 rounds or more) the kills must have left a hold open (fast
//! path) in some round and a paid run running (slow path) in some round:
//! in practice they do in nearly every round.
//!
//! `TOLLGATE_CRASH_ROUNDS` sets the rounds (20 by default; `scripts/crash-test`
//! runs 200), `TOLLGATE_CRASH_SEED` replays a run's random choices.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use rmcp::model::{CallToolRequestParams, CallToolResult};
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

/// What clients were told in a round.
#[derive(Default)]
struct Told {
    /// Payment ids answered `paid` on the fast path (alice's wallet).
    fast_paid: BTreeSet<String>,
    /// Payment ids answered `paid` on the slow path (bob's resubmit).
    slow_paid: BTreeSet<String>,
    /// Slow-path payment ids handed out, redeemed or not.
    issued: BTreeSet<String>,
    /// Calls meant to fail (divide by 0) answered with their hold
    /// released or their payment refunded.
    failed_as_meant: usize,
    /// Calls the store under load answered `payment_system_unavailable`
    /// (nothing charged, no payment to follow, or one left to redeem).
    unavailable: usize,
}

impl Told {
    fn paid(&self) -> impl Iterator<Item = &String> {
        self.fast_paid.iter().chain(&self.slow_paid)
    }
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
/// that fails when `b` is 0 (and so is released or refunded). Also says
/// whether the call is meant to fail.
fn some_call(rng: &mut fastrand::Rng, n: usize) -> (&'static str, Value, bool) {
    match rng.u8(0..4) {
        0 => ("echo", json!({ "text": format!("call {n}") }), false),
        1 | 2 => ("sleep", json!({ "ms": rng.u64(0..40) }), false),
        _ => {
            let b = rng.u8(0..3);
            ("divide", json!({ "a": n, "b": b }), b == 0)
        }
    }
}

/// A call's answer, or, once the kill was sent, `None` for the transport
/// error it caused. A transport error before the kill fails the test.
fn answered(
    r: Result<CallToolResult, rmcp::ServiceError>,
    killed: &AtomicBool,
    what: &str,
) -> Option<CallToolResult> {
    match r {
        Ok(r) => Some(r),
        Err(e) => {
            assert!(
                killed.load(Ordering::SeqCst),
                "{what}: a transport error before the kill: {e}"
            );
            None
        }
    }
}

/// The payment id of an answer that ran: `paid`, or, for a call meant to
/// fail, `failed` (released on the fast path, refunded on the slow one).
/// Anything else fails the test.
fn ran_as_meant(r: &CallToolResult, meant_to_fail: bool, failed: &str, what: &str) -> String {
    let payment = payment_meta(r);
    let expected = if meant_to_fail { failed } else { "paid" };
    assert_eq!(
        payment["status"].as_str(),
        Some(expected),
        "{what}: expected `{expected}`, got {r:?}"
    );
    assert_eq!(r.is_error, Some(meant_to_fail), "{what}: {r:?}");
    let id = payment["payment_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(id.starts_with("pay_"), "{what}: no payment id in {r:?}");
    id
}

/// Under a loaded machine the store may answer "unavailable" (nothing
/// charged, nothing run): counted, and bounded at the end.
fn store_was_unavailable(r: &CallToolResult, told: &Mutex<Told>) -> bool {
    let unavailable =
        r.is_error == Some(true) && structured(r)["error"] == "payment_system_unavailable";
    if unavailable {
        told.lock().unwrap().unavailable += 1;
    }
    unavailable
}

/// Calls until the server dies under it: fast path (alice).
async fn fast_load(
    client: Arc<Client>,
    told: Arc<Mutex<Told>>,
    killed: Arc<AtomicBool>,
    seed: u64,
) {
    let mut rng = fastrand::Rng::with_seed(seed);
    for n in 0.. {
        let (tool, arguments, meant_to_fail) = some_call(&mut rng, n);
        let what = format!("fast path {tool} {arguments}");
        let sent = client
            .call_tool(CallToolRequestParams::new(tool).with_arguments(args(arguments)))
            .await;
        let Some(r) = answered(sent, &killed, &what) else {
            return;
        };
        if store_was_unavailable(&r, &told) {
            continue;
        }
        let id = ran_as_meant(&r, meant_to_fail, "released", &what);
        let mut told = told.lock().unwrap();
        if meant_to_fail {
            told.failed_as_meant += 1;
        } else {
            told.fast_paid.insert(id);
        }
    }
}

/// Calls until the server dies under it: resubmit (bob), each payment id
/// redeemed right after it is issued.
async fn slow_load(
    client: Arc<Client>,
    told: Arc<Mutex<Told>>,
    killed: Arc<AtomicBool>,
    seed: u64,
) {
    let mut rng = fastrand::Rng::with_seed(seed);
    for n in 0.. {
        let (tool, arguments, meant_to_fail) = some_call(&mut rng, n);
        let what = format!("slow path {tool} {arguments}");
        let call = |arguments: Value| {
            client.call_tool(CallToolRequestParams::new(tool).with_arguments(args(arguments)))
        };
        let Some(first) = answered(call(arguments.clone()).await, &killed, &what) else {
            return;
        };
        if store_was_unavailable(&first, &told) {
            continue;
        }
        assert_eq!(
            structured(&first)["error"],
            "payment_required",
            "{what}: {first:?}"
        );
        let id = payment_id_of(&first);
        told.lock().unwrap().issued.insert(id.clone());
        let mut paid_call = arguments;
        paid_call["payment_id"] = json!(id);
        let Some(r) = answered(call(paid_call).await, &killed, &what) else {
            return;
        };
        if store_was_unavailable(&r, &told) {
            continue;
        }
        let answered_id = ran_as_meant(&r, meant_to_fail, "refunded", &what);
        assert_eq!(answered_id, id, "{what}: {r:?}");
        let mut told = told.lock().unwrap();
        if meant_to_fail {
            told.failed_as_meant += 1;
        } else {
            told.slow_paid.insert(id);
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
    for id in told.paid() {
        assert!(
            captures.contains_key(id),
            "payment {id} was answered paid, but its capture is lost"
        );
    }
}

/// Revenue per tool and currency, and alice's balances: what a run of a
/// tool moves.
async fn balances(store: &dyn Store) -> String {
    let revenue = store.stats().await.expect("stats").revenue;
    let alice = store.balances("alice").await.expect("balances");
    format!("revenue {revenue:?}, alice {alice:?}")
}

/// Payment `id`'s intent status and stored result.
async fn as_it_stands(store: &dyn Store, id: &str) -> (Option<IntentStatus>, Option<String>) {
    let status = store.intent(id).await.expect("intent").map(|i| i.status);
    let result = store.stored_result(id).await.expect("stored result");
    (status, result.map(|r| r.result_json))
}

/// Redeems `id` again with `arguments`; when the intent was consumed
/// before (`consumed`), checks that the redeem ran nothing: the answer is
/// the stored result, marked a replay; the intent and its stored result are
/// as they were; and the redeem added no ledger entry, for this payment id
/// or any other (a run, and any money it moves, adds entries).
async fn redeem_again(
    bob: &Client,
    store: &dyn Store,
    id: &str,
    tool: &str,
    arguments: Value,
    consumed: bool,
) {
    let last = store.entries_settled_upto().await.expect("entries upto");
    let before = as_it_stands(store, id).await;
    let again = call(bob, tool, arguments).await;
    if !consumed {
        return;
    }
    let added = store
        .entries_page(None, last, i64::MAX, 100)
        .await
        .expect("entries");
    assert!(
        added.is_empty(),
        "{id} was consumed, yet its redeem added ledger entries (a second run?): \
         {added:?}\n{again:?}"
    );
    let after = as_it_stands(store, id).await;
    assert_eq!(
        before, after,
        "{id}: a redeem of a consumed payment changed it"
    );
    let Some(stored) = before.1 else {
        panic!("{id} was consumed, but has no stored result");
    };
    let stored: CallToolResult = serde_json::from_str(&stored).expect("a stored result");
    let mut stored_payment = payment_meta(&stored);
    stored_payment["replayed"] = json!(true);
    // (The wire's `result_type` and the gate's `tollgate/reply` copy are
    // not compared: they are added or dropped on the way out.)
    assert_eq!(
        (
            &again.content,
            &again.structured_content,
            again.is_error,
            payment_meta(&again)
        ),
        (
            &stored.content,
            &stored.structured_content,
            stored.is_error,
            stored_payment
        ),
        "{id} was consumed, yet its redeem did not answer the stored result"
    );
}

/// Redeems every slow-path payment id again: a consumed one answers its
/// stored result and moves nothing in the ledger (never a second run); one
/// paid but never started may run now, once, and is consumed from then on.
/// Returns how many were consumed before.
async fn no_second_runs(bob: &Client, store: &dyn Store, told: &Told) -> usize {
    let mut intents = Vec::new();
    for id in &told.issued {
        let intent = store.intent(id).await.expect("intent").expect("kept");
        let mut arguments: Value = serde_json::from_str(&intent.args_json).expect("args");
        arguments["payment_id"] = json!(id);
        let consumed = matches!(
            intent.status,
            IntentStatus::Succeeded | IntentStatus::Failed
        );
        intents.push((id, intent, arguments, consumed));
    }
    // The consumed ones first: together they move no balance.
    intents.sort_by_key(|(_, _, _, consumed)| !consumed);
    let consumed_before = intents.iter().filter(|i| i.3).count();
    let (consumed, not_yet) = intents.split_at(consumed_before);
    let before = balances(store).await;
    for (id, intent, arguments, _) in consumed {
        redeem_again(bob, store, id, &intent.tool, arguments.clone(), true).await;
    }
    assert_eq!(
        balances(store).await,
        before,
        "redeems of consumed payments moved money"
    );
    for (id, intent, arguments, _) in not_yet {
        redeem_again(bob, store, id, &intent.tool, arguments.clone(), false).await;
    }
    // Whatever each was, it is consumed now, and a redeem moves nothing.
    let before = balances(store).await;
    for (id, intent, arguments, _) in &intents {
        let now = store.intent(id).await.expect("intent").expect("kept");
        assert!(
            matches!(now.status, IntentStatus::Succeeded | IntentStatus::Failed),
            "{id} ({:?} before) is {:?} after a redeem",
            intent.status,
            now.status
        );
        redeem_again(bob, store, id, &intent.tool, arguments.clone(), true).await;
    }
    assert_eq!(
        balances(store).await,
        before,
        "redeems of consumed payments moved money"
    );
    consumed_before
}

/// What the kills caught in one round.
#[derive(Debug)]
struct Round {
    fast_paid: usize,
    slow_paid: usize,
    failed_as_meant: usize,
    unavailable: usize,
    holds_left: i64,
    runs_left: i64,
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
        let mut seen: Vec<Round> = Vec::new();
        let mut replayed = 0;

        for round in 0..=rounds() {
            // (Re)start both servers: their upkeep recovers what the killed
            // ones left a lease after start; those leases lapse in a second.
            let (alice, alice_pid) = env.client_and_pid(Some("alice"), &[]).await;
            let (bob, bob_pid) = env.client_and_pid(Some("bob"), &[]).await;
            recovered(store.as_ref()).await;
            env.assert_ledger_ok().await;
            let snapshot = std::mem::take(&mut *told.lock().unwrap());
            captures_match(store.as_ref(), &snapshot).await;
            replayed += no_second_runs(&bob, store.as_ref(), &snapshot).await;
            if let Some(last) = seen.last_mut() {
                (last.fast_paid, last.slow_paid) =
                    (snapshot.fast_paid.len(), snapshot.slow_paid.len());
                (last.failed_as_meant, last.unavailable) =
                    (snapshot.failed_as_meant, snapshot.unavailable);
            }
            if round == rounds() {
                // The last re-redeems may have run payments paid but never
                // started: check them as after every round.
                captures_match(store.as_ref(), &snapshot).await;
                env.assert_ledger_ok().await;
                alice.cancel().await.ok();
                bob.cancel().await.ok();
                break;
            }

            // Load on both, then SIGKILL both at a random moment.
            let (alice, bob) = (Arc::new(alice), Arc::new(bob));
            let killed = Arc::new(AtomicBool::new(false));
            let mut load = Vec::new();
            for _ in 0..3 {
                load.push(tokio::spawn(fast_load(
                    alice.clone(),
                    told.clone(),
                    killed.clone(),
                    rng.u64(..),
                )));
                load.push(tokio::spawn(slow_load(
                    bob.clone(),
                    told.clone(),
                    killed.clone(),
                    rng.u64(..),
                )));
            }
            tokio::time::sleep(Duration::from_millis(rng.u64(50..500))).await;
            killed.store(true, Ordering::SeqCst);
            for pid in [alice_pid, bob_pid] {
                let killed = std::process::Command::new("kill")
                    .args(["-9", &pid.to_string()])
                    .status()
                    .expect("kill");
                assert!(killed.success());
            }
            for task in load {
                tokio::time::timeout(Duration::from_secs(30), task)
                    .await
                    .expect("a load task still calling 30 s after the kill")
                    .expect("load task");
            }
            let (holds_left, runs_left) = in_flight(store.as_ref()).await;
            seen.push(Round {
                fast_paid: 0,
                slow_paid: 0,
                failed_as_meant: 0,
                unavailable: 0,
                holds_left,
                runs_left,
            });
        }
        let total = |f: fn(&Round) -> i64| seen.iter().map(f).sum::<i64>();
        let rounds_with = |f: fn(&Round) -> bool| seen.iter().filter(|r| f(r)).count();
        let (fast_paid, slow_paid) = (
            total(|r| r.fast_paid as i64),
            total(|r| r.slow_paid as i64),
        );
        let (failed, unavailable) = (
            total(|r| r.failed_as_meant as i64),
            total(|r| r.unavailable as i64),
        );
        let (holds_left, runs_left) = (total(|r| r.holds_left), total(|r| r.runs_left));
        let (rounds_holds, rounds_runs) = (
            rounds_with(|r| r.holds_left > 0),
            rounds_with(|r| r.runs_left > 0),
        );
        let (rounds_fast, rounds_slow) = (
            rounds_with(|r| r.fast_paid > 0),
            rounds_with(|r| r.slow_paid > 0),
        );
        eprintln!(
            "crash test: {fast_paid} fast-path payments answered paid (in {rounds_fast} of {} \
             rounds) and {slow_paid} slow-path ones (in {rounds_slow}), {failed} failing calls \
             released or refunded, {unavailable} calls answered unavailable; the \
             kills left {holds_left} holds open (in {rounds_holds} rounds) and {runs_left} paid \
             runs running (in {rounds_runs}), all recovered; {replayed} consumed payments \
             redeemed again, none ran twice",
            seen.len()
        );
        // Both paths answered paid, in most rounds.
        assert!(
            rounds_fast * 2 > seen.len() && rounds_slow * 2 > seen.len(),
            "too few rounds answered paid: fast path in {rounds_fast}, slow path in \
             {rounds_slow}, of {}: {seen:?}",
            seen.len()
        );
        // The store's "unavailable" is the exception under load, not the rule.
        assert!(
            unavailable * 10 <= fast_paid + slow_paid,
            "{unavailable} calls answered unavailable, {fast_paid} and {slow_paid} paid: {seen:?}"
        );
        // The kills did land in the middle of calls: on the fast path (a
        // hold left open) and on the slow path (a paid run left running).
        if seen.len() >= 10 {
            assert!(
                rounds_holds > 0 && rounds_runs > 0,
                "in {} rounds no kill left a hold open ({rounds_holds}) or a run running \
                 ({rounds_runs}): {seen:?}",
                seen.len()
            );
        }
    }
}
