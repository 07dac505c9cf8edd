//! Several tollgate instances on one store: real `tollgate serve --http`
//! processes sharing a database (a SQLite file, or PostgreSQL as a load
//! balancer's instances would), and PostgreSQL going away under load.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;
use tollgate::{
    Tollgate,
    money::{Currency, Units},
    store::{AccountRef, now_ms},
    testing::{self, Backend},
};

use crate::{
    harness::{Env, call, echo_args, embedded_client, error_code, payment_meta, structured, text},
    http_service::{checkout_post, serve_gate},
};

fn shared_pricing() -> String {
    crate::harness::pricing("two_step", "")
        .replace("[store]", "[provider]\ndev_settle = true\n\n[store]")
        .replace("price = \"0.05\"", "price = \"0.05\"\nmode = \"resubmit\"")
}

on_both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_instances_charge_exactly_what_the_wallets_cover() {
        const WALLETS: usize = 8;
        const CLIENTS: usize = 64;
        const CALLS: usize = 4;
        let env = Env::with_pricing(&shared_pricing());
        let mut keys = Vec::new();
        for w in 0..WALLETS {
            // 0.20 covers 20 echo calls; each wallet's clients make 32.
            env.topup(&format!("w{w}"), "0.20").await;
            keys.push(env.mcp_key(&format!("w{w}")).await);
        }
        let instances = [env.serve_http().await, env.serve_http().await];

        let mut clients = Vec::new();
        for i in 0..CLIENTS {
            // A wallet's clients alternate between the two instances.
            let instance = &instances[(i / WALLETS) % 2];
            clients.push(instance.mcp(&keys[i % WALLETS]).await);
        }
        let calls = clients.iter().enumerate().map(|(i, client)| async move {
            let mut charged = 0;
            for n in 0..CALLS {
                let r = call(client, "echo", echo_args(&format!("{i}/{n}"))).await;
                if payment_meta(&r)["status"] == "paid" {
                    assert_eq!(text(&r), format!("{i}/{n}"));
                    charged += 1;
                } else {
                    // Not covered: the slow path, with nothing charged.
                    assert_eq!(structured(&r)["status"], "payment_required", "{r:?}");
                }
            }
            charged
        });
        let charged: usize = futures::future::join_all(calls).await.into_iter().sum();

        assert_eq!(charged, WALLETS * 20, "exactly what the balances cover");
        for w in 0..WALLETS {
            assert_eq!(env.balance(&format!("w{w}")).await, ("0.00".into(), "0.00".into(), "0.00".into()));
        }
        for client in clients {
            client.cancel().await.ok();
        }
        env.assert_ledger_ok().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_payment_started_on_one_instance_is_finished_on_the_other() {
        let env = Env::with_pricing(&shared_pricing());
        let key = env.mcp_key("bob").await;
        let (a, b) = (env.serve_http().await, env.serve_http().await);
        let on_a = a.mcp(&key).await;
        let on_b = b.mcp(&key).await;

        // two_step: asked on A, paid at B's checkout page, confirmed on A.
        let r = call(&on_a, "echo", echo_args("started on A")).await;
        assert_eq!(structured(&r)["status"], "payment_required");
        let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
        let response = checkout_post(&b.base, &id, &[("action", "settle")]).await;
        assert_eq!(response.status(), 303);
        let r = call(&on_a, "confirm_echo_payment", json!({"payment_id": id})).await;
        assert_eq!(text(&r), "started on A");
        assert_eq!(payment_meta(&r)["status"], "paid");
        // A retry on B returns the stored result; nothing runs or is charged twice.
        let r = call(&on_b, "confirm_echo_payment", json!({"payment_id": id})).await;
        assert_eq!(text(&r), "started on A");
        assert_eq!(payment_meta(&r)["replayed"], true);

        // resubmit: asked on B, paid with the CLI, resubmitted on A.
        let r = call(&on_b, "divide", json!({"a": 6, "b": 3})).await;
        let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
        env.ok(&["sessions", "pay", &id]).await;
        let r = call(&on_a, "divide", json!({"a": 6, "b": 3, "payment_id": id})).await;
        assert_eq!(payment_meta(&r)["status"], "paid", "{r:?}");
        assert_eq!(text(&r), "2");

        on_a.cancel().await.ok();
        on_b.cancel().await.ok();
        env.assert_ledger_ok().await;
    }
}

#[derive(Deserialize, JsonSchema)]
struct Nothing {}

/// Kills every connection tollgate has to its database, as a PostgreSQL
/// restart would; returns how many it killed.
async fn kill_connections(db_url: &str) -> u64 {
    let name = testing::database_name(db_url);
    testing::execute(
        &testing::server_url(),
        &format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = '{name}' AND pid <> pg_backend_pid()"
        ),
    )
    .await
    .expect("terminate")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(tollgate_pg),
    ignore = "PostgreSQL: set TOLLGATE_TEST_POSTGRES to a server URL to run it"
)]
async fn postgres_going_away_under_load_loses_no_charge_and_runs_nothing_unpaid() {
    testing::select(Backend::Postgres);
    let pricing = "[server]\nname = \"t\"\ncurrency = \"USD\"\n\n[store]\nconnect_timeout = \"1s\"\n\n[[tools]]\nname = \"count\"\nprice = \"0.01\"\n";
    let env = Env::with_pricing(pricing);
    let runs = Arc::new(AtomicU64::new(0));
    let counted = runs.clone();
    let tollgate = Tollgate::from_pricing(&format!(
        "{pricing}\n[receipts]\nkey_file = \"{}\"\n",
        env.key.display()
    ))
    .expect("pricing")
    .tool("count", "Counts its runs.", move |_: Nothing| {
        let runs = counted.clone();
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            "counted"
        }
    })
    .store_url(env.db.clone())
    .build()
    .await
    .expect("build");
    let store = tollgate.gate().store().clone();
    let usd = Currency::parse("USD").unwrap();
    store
        .topup(
            &AccountRef::wallet("pat", &usd),
            Units::parse("100.00").unwrap(),
            None,
        )
        .await
        .unwrap();

    let mut clients = Vec::new();
    for _ in 0..16 {
        clients.push(embedded_client(&tollgate, "pat").await);
    }

    // Load for a few seconds while every connection is killed again and again.
    let until = tokio::time::Instant::now() + Duration::from_secs(4);
    let killer = {
        let url = env.db.clone();
        tokio::spawn(async move {
            let mut killed = 0;
            while tokio::time::Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(150)).await;
                killed += kill_connections(&url).await;
            }
            killed
        })
    };
    let load = clients.iter().map(|client| async move {
        let (mut paid, mut unavailable) = (0u64, 0u64);
        while tokio::time::Instant::now() < until {
            let r = crate::harness::call(client, "count", json!({})).await;
            if payment_meta(&r)["status"] == "paid" {
                assert!(payment_meta(&r)["receipt"].is_string());
                paid += 1;
            } else {
                assert_eq!(error_code(&r), "payment_system_unavailable", "{r:?}");
                unavailable += 1;
            }
        }
        (paid, unavailable)
    });
    let outcomes = futures::future::join_all(load).await;
    let killed = killer.await.unwrap();
    let paid: u64 = outcomes.iter().map(|o| o.0).sum();
    let unavailable: u64 = outcomes.iter().map(|o| o.1).sum();
    eprintln!("killed {killed} connections; {paid} calls charged, {unavailable} refused");
    assert!(killed > 0, "the test killed no connection");
    assert!(paid > 0);

    // Every run was charged, every charge is in the ledger.
    assert_eq!(runs.load(Ordering::SeqCst), paid, "a tool ran unpaid");
    let balance = &store.balances("pat").await.unwrap()[0];
    assert_eq!(balance.balance.0, 100_000_000 - paid as i64 * 10_000);
    let report = store.verify(now_ms()).await.unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);

    // Down: nothing can connect. Calls are refused unrun, /healthz says so.
    let name = testing::database_name(&env.db).to_owned();
    let admin = testing::server_url();
    testing::execute(
        &admin,
        &format!("ALTER DATABASE {name} WITH ALLOW_CONNECTIONS false"),
    )
    .await
    .unwrap();
    kill_connections(&env.db).await;
    let config = tollgate::config::Config::parse(pricing, "pricing.toml").unwrap();
    let (health, _stop) = serve_gate(config, tollgate.gate().clone()).await;
    let response = reqwest::get(format!("{health}/healthz")).await.unwrap();
    assert_eq!(response.status(), 503);
    let said = response.text().await.unwrap();
    assert!(
        !said.contains(&name),
        "the store's details stay in the log: {said}"
    );
    let before = runs.load(Ordering::SeqCst);
    let r = crate::harness::call(&clients[0], "count", json!({})).await;
    assert_eq!(error_code(&r), "payment_system_unavailable");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        before,
        "ran without a payment system"
    );

    // Back: the service recovers by itself.
    testing::execute(
        &admin,
        &format!("ALTER DATABASE {name} WITH ALLOW_CONNECTIONS true"),
    )
    .await
    .unwrap();
    let response = reqwest::get(format!("{health}/healthz")).await.unwrap();
    assert_eq!(response.status(), 200);
    let r = crate::harness::call(&clients[0], "count", json!({})).await;
    assert_eq!(payment_meta(&r)["status"], "paid");
    assert_eq!(runs.load(Ordering::SeqCst), before + 1);
    for client in clients {
        client.cancel().await.ok();
    }
    let report = store.verify(now_ms()).await.unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

/// Takes the test database away (no one may connect, every connection is
/// killed) and brings it back `after` that long.
async fn take_the_database_away(db_url: &str, after: Duration) {
    let name = testing::database_name(db_url).to_owned();
    let admin = testing::server_url();
    let allow = move |yes: bool| format!("ALTER DATABASE {name} WITH ALLOW_CONNECTIONS {yes}");
    testing::execute(&admin, &allow(false)).await.unwrap();
    kill_connections(db_url).await;
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        testing::execute(&admin, &allow(true)).await.unwrap();
    });
}

/// A tool whose run takes the database away for two seconds, so that what
/// the gate writes after the run cannot land in `[timeouts] record`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(tollgate_pg),
    ignore = "PostgreSQL: set TOLLGATE_TEST_POSTGRES to a server URL to run it"
)]
async fn a_charge_that_cannot_be_recorded_withholds_the_result_until_it_is() {
    testing::select(Backend::Postgres);
    let pricing = "[server]\nname = \"t\"\ncurrency = \"USD\"\nmode = \"resubmit\"\n\n\
                   [store]\nconnect_timeout = \"1s\"\n\n[timeouts]\nrecord = \"300ms\"\n\n\
                   [[tools]]\nname = \"jam\"\nprice = \"0.01\"\n";
    let env = Env::with_pricing(pricing);
    let runs = Arc::new(AtomicU64::new(0));
    let (counted, db) = (runs.clone(), env.db.clone());
    let tollgate = Tollgate::from_pricing(&format!(
        "{pricing}\n[receipts]\nkey_file = \"{}\"\n",
        env.key.display()
    ))
    .expect("pricing")
    .tool("jam", "Takes the database away.", move |_: Nothing| {
        let (runs, db) = (counted.clone(), db.clone());
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            take_the_database_away(&db, Duration::from_secs(2)).await;
            "jammed"
        }
    })
    .store_url(env.db.clone())
    .build()
    .await
    .expect("build");
    let store = tollgate.gate().store().clone();
    let usd = Currency::parse("USD").unwrap();
    let wallet = AccountRef::wallet("pat", &usd);
    store
        .topup(&wallet, Units::parse("1.00").unwrap(), None)
        .await
        .unwrap();
    let connect = async |principal: &str| embedded_client(&tollgate, principal).await;
    // The database comes back 2 s after it went; what is left to the
    // background lands within a few more.
    let until = || tokio::time::Instant::now() + Duration::from_secs(20);
    // Fast path: the capture cannot land, so the result is withheld and the
    // hold is given back once the database is back.
    let pat = connect("pat").await;
    let r = call(&pat, "jam", json!({})).await;
    assert_eq!(error_code(&r), "payment_system_unavailable", "{r:?}");
    assert!(
        text(&r).contains("the result is withheld and nothing was charged"),
        "{}",
        text(&r)
    );
    assert!(
        !format!("{r:?}").contains("jammed"),
        "the result was handed over"
    );
    // Noted beside the receipt key until given back, in case the server
    // stops first (a restart gives it back then).
    let notes = tollgate::gate::WithheldNotes::beside(&env.key);
    assert_eq!(notes.pending().len(), 1, "the withheld call was not noted");
    let deadline = until();
    loop {
        if let Ok([b]) = store.balances("pat").await.as_deref()
            && (b.available.0, b.held.0) == (1_000_000, 0)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the withheld call's hold was not given back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    while !notes.pending().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the note outlived the give-back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Slow path: the paid run's result cannot be stored, so it is withheld;
    // once the database is back it is stored, and a retry gets it, charged
    // once, the tool run once.
    while store.ping().await.is_err() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let quinn = connect("quinn").await;
    let r = call(&quinn, "jam", json!({})).await;
    let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
    store.pay_session(&id, None, now_ms()).await.unwrap();
    let redeem = json!({ "payment_id": id });
    let r = call(&quinn, "jam", redeem.clone()).await;
    assert_eq!(error_code(&r), "payment_system_unavailable", "{r:?}");
    assert!(text(&r).contains("redeem payment"), "{}", text(&r));
    assert!(
        !format!("{r:?}").contains("jammed"),
        "the result was handed over"
    );
    let mut answer = None;
    let deadline = until();
    while answer.is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the withheld result was never stored"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let r = call(&quinn, "jam", redeem.clone()).await;
        if payment_meta(&r)["status"] == "paid" {
            answer = Some(r);
        }
    }
    let r = answer.unwrap();
    assert_eq!(text(&r), "jammed");
    assert_eq!(payment_meta(&r)["replayed"], true);
    assert_eq!(runs.load(Ordering::SeqCst), 2, "each call's tool ran once");
    for client in [pat, quinn] {
        client.cancel().await.ok();
    }
    let report = store.verify(now_ms()).await.unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

/// The lease is renewed on a timer of its own: an upkeep pass held up (here
/// the expiry sweep waits for a wallet another transaction has locked, to
/// end that wallet's expired hold) does not let it lapse, so other
/// instances do not take this instance's live holds for a dead one's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(tollgate_pg),
    ignore = "PostgreSQL: set TOLLGATE_TEST_POSTGRES to a server URL to run it"
)]
async fn a_held_up_upkeep_pass_does_not_let_the_lease_lapse() {
    use sqlx::Connection;
    testing::select(Backend::Postgres);
    let env = Env::new("resubmit");
    env.topup("alice", "1.00").await;
    let store = testing::open_store(&env.db).await.unwrap();
    let expired = tollgate::store::HoldRequest {
        hold_id: "old".into(),
        principal: "alice".into(),
        amount: Units::parse("0.10").unwrap(),
        currency: Currency::parse("USD").unwrap(),
        tool: "echo".into(),
        args_hash: "h".into(),
        expires_at: now_ms() - 1,
        origin: Default::default(),
    };
    store.hold(&expired).await.unwrap();

    let mut other = sqlx::PgConnection::connect(&env.db).await.unwrap();
    sqlx::query("BEGIN").execute(&mut other).await.unwrap();
    sqlx::query("SELECT 1 FROM accounts WHERE kind = 'wallet' AND name = 'alice' FOR UPDATE")
        .execute(&mut other)
        .await
        .unwrap();
    // Its first upkeep pass starts at once, and waits.
    let tollgate = Tollgate::from_pricing(&format!(
        "[server]\nname = \"t\"\ncurrency = \"USD\"\ninstance_lease = \"1s\"\n\n\
         [receipts]\nkey_file = \"{}\"\n\n[[tools]]\nname = \"ping\"\nprice = \"0.01\"\n",
        env.key.display()
    ))
    .expect("pricing")
    .tool("ping", "Answers pong.", |_: Nothing| async { "pong" })
    .store_url(env.db.clone())
    .build()
    .await
    .expect("build");
    // Three leases' time, with the sweep stuck all along.
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    let hold_status = "SELECT status FROM holds WHERE id = 'old'";
    let (status,): (String,) = sqlx::query_as(hold_status)
        .fetch_one(&mut other)
        .await
        .unwrap();
    assert_eq!(status, "open", "the sweep was held up");
    let (leases, lapsed): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(*) FILTER (WHERE alive_until < $1) FROM instances")
            .bind(now_ms())
            .fetch_one(&mut other)
            .await
            .unwrap();
    assert_eq!(
        (leases, lapsed),
        (1, 0),
        "the running instance's lease lapsed"
    );
    sqlx::query("COMMIT").execute(&mut other).await.unwrap();
    // Let go, the sweep ends the hold.
    for _ in 0..50 {
        let (status,): (String,) = sqlx::query_as(hold_status)
            .fetch_one(&mut other)
            .await
            .unwrap();
        if status == "expired" {
            drop(tollgate);
            env.assert_ledger_ok().await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the held-up sweep never ended the expired hold");
}
