//! Concurrent calls through several server processes sharing one SQLite file.

use futures::future::join_all;
use serde_json::json;

use crate::harness::*;

on_both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn thirty_two_concurrent_confirms_of_one_paid_intent_run_the_tool_once() {
        let env = Env::new("two_step");
        env.topup("carol", "1.00").await;
        let clients = join_all((0..4).map(|_| env.client(Some("alice")))).await;
        let id = {
            let r = call(&clients[0], "echo", echo_args("once")).await;
            payment_id_of(&r)
        };
        env.ok(&["sessions", "pay", &id, "--from", "carol"]).await;

        let confirms = (0..32).map(|i| {
            let client = &clients[i % clients.len()];
            let id = id.clone();
            async move { call(client, "confirm_echo_payment", json!({ "payment_id": id })).await }
        });
        let results = join_all(confirms).await;
        let mut first_runs = 0;
        let mut receipts = std::collections::HashSet::new();
        for r in &results {
            assert_eq!(text(r), "once", "{r:?}");
            let payment = payment_meta(r);
            assert_eq!(payment["status"], "paid");
            receipts.insert(payment["receipt"].as_str().unwrap().to_owned());
            if payment.get("replayed").is_none() {
                first_runs += 1;
            }
        }
        assert_eq!(
            first_runs, 1,
            "exactly one confirm ran the tool; the rest got the stored result"
        );
        assert_eq!(receipts.len(), 1, "one run, one receipt");
        assert_eq!(env.available("carol").await, "0.99");
        for c in clients {
            c.cancel().await.ok();
        }
        env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sixty_four_concurrent_fast_path_calls_never_overdraw() {
        let env = Env::new("resubmit");
        // Covers exactly 20 calls of echo at 0.01.
        env.topup("alice", "0.20").await;
        let clients = join_all((0..2).map(|_| env.client(Some("alice")))).await;

        let calls = (0..64).map(|i| {
            let client = &clients[i % clients.len()];
            async move { call(client, "echo", echo_args(&format!("call {i}"))).await }
        });
        let results = join_all(calls).await;
        let charged = results
            .iter()
            .filter(|r| payment_meta(r)["status"] == "paid")
            .count();
        let asked_to_pay = results
            .iter()
            .filter(|r| r.is_error == Some(true) && structured(r)["error"] == "payment_required")
            .count();
        assert_eq!(charged, 20, "exactly what the balance covers was charged");
        assert_eq!(asked_to_pay, 44, "the rest went to the slow path");
        assert_eq!(
            env.balance("alice").await,
            ("0.00".into(), "0.00".into(), "0.00".into())
        );
        let statement = env.ok(&["wallet", "statement", "alice"]).await;
        assert_eq!(
            statement.lines().filter(|l| l.contains("capture")).count(),
            20
        );
        for c in clients {
            c.cancel().await.ok();
        }
        env.assert_ledger_ok().await;
    }
}
