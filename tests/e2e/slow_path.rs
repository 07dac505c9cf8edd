//! two_step and resubmit: every branch, run in both modes where it applies.

use rmcp::model::CallToolResult;
use serde_json::{Value, json};

use crate::harness::*;

#[derive(Clone, Copy, Debug)]
enum Flow {
    TwoStep,
    Resubmit,
}

const FLOWS: [Flow; 2] = [Flow::TwoStep, Flow::Resubmit];

impl Flow {
    fn mode(self) -> &'static str {
        match self {
            Flow::TwoStep => "two_step",
            Flow::Resubmit => "resubmit",
        }
    }

    /// First call of a priced tool: checks the mode's answer, returns the payment id.
    async fn start(self, client: &Client, tool: &str, arguments: Value) -> String {
        let r = call(client, tool, arguments).await;
        let body = structured(&r);
        match self {
            Flow::TwoStep => {
                assert_eq!(
                    r.is_error,
                    Some(false),
                    "two_step's first answer is a normal result: {r:?}"
                );
                assert_eq!(body["status"], "payment_required");
                assert_eq!(body["next_step"], format!("confirm_{tool}_payment"));
            }
            Flow::Resubmit => assert_eq!(error_code(&r), "payment_required"),
        }
        let id = payment_id_of(&r);
        assert!(
            body["payment_url"]
                .as_str()
                .unwrap()
                .ends_with(&format!("/checkout/{id}"))
        );
        assert!(body["expires_at"].as_str().unwrap().ends_with('Z'));
        assert_eq!(body["currency"], "USD");
        assert!(
            text(&r).contains(&id) && text(&r).contains("Pay at"),
            "{}",
            text(&r)
        );
        assert!(payment_meta(&r).is_null(), "nothing charged yet");
        id
    }

    /// Finishes a call: confirm tool (two_step) or the same call plus payment_id (resubmit).
    async fn redeem(
        self,
        client: &Client,
        tool: &str,
        arguments: Value,
        payment_id: &str,
    ) -> CallToolResult {
        match self {
            Flow::TwoStep => {
                call(
                    client,
                    &format!("confirm_{tool}_payment"),
                    json!({ "payment_id": payment_id }),
                )
                .await
            }
            Flow::Resubmit => {
                let mut arguments = arguments;
                arguments["payment_id"] = json!(payment_id);
                call(client, tool, arguments).await
            }
        }
    }
}

/// Number of ledger transactions of `kind` for a payment, from a wallet's statement.
async fn statement_count(env: &Env, wallet: &str, kind: &str, payment_id: &str) -> usize {
    let statement = env.ok(&["wallet", "statement", wallet]).await;
    statement
        .lines()
        .filter(|l| l.contains(kind) && l.contains(payment_id))
        .count()
}

on_both_backends! {
    #[tokio::test]
    async fn pending_then_paid_then_replayed_without_a_second_charge() {
        for flow in FLOWS {
            let env = Env::new(flow.mode());
            env.topup("carol", "1.00").await;
            // alice has no wallet: she pays through the session, here from carol's wallet.
            let client = env.client(Some("alice")).await;
            let id = flow.start(&client, "echo", echo_args("hello")).await;

            let r = flow.redeem(&client, "echo", echo_args("hello"), &id).await;
            assert_eq!(error_code(&r), "payment_pending", "{flow:?}");
            assert!(
                structured(&r)["payment_url"]
                    .as_str()
                    .unwrap()
                    .contains(&id)
            );

            env.ok(&["sessions", "pay", &id, "--from", "carol"]).await;
            assert_eq!(env.available("carol").await, "0.99");

            let r = flow.redeem(&client, "echo", echo_args("hello"), &id).await;
            assert_eq!(r.is_error, Some(false), "{flow:?}: {r:?}");
            assert_eq!(text(&r), "hello");
            let payment = payment_meta(&r);
            assert_eq!(payment["status"], "paid");
            assert_eq!(payment["payment_id"], id.as_str());
            let receipt = payment["receipt"].as_str().unwrap().to_owned();
            assert!(env.ok(&["receipt", "verify", &receipt]).await.contains(&id));

            // A consumed payment id returns the stored result and charges nothing more.
            for _ in 0..2 {
                let again = flow.redeem(&client, "echo", echo_args("hello"), &id).await;
                assert_eq!(text(&again), "hello");
                assert_eq!(payment_meta(&again)["replayed"], true);
                assert_eq!(payment_meta(&again)["receipt"], receipt.as_str());
            }
            assert_eq!(env.available("carol").await, "0.99");
            assert_eq!(
                statement_count(&env, "carol", "session_payment", &id).await,
                1
            );

            // The session cannot be paid twice either.
            let out = env.cli(&["sessions", "pay", &id, "--from", "carol"]).await;
            assert!(!out.status.success());
            assert!(String::from_utf8_lossy(&out.stderr).contains("is paid, not pending"));

            client.cancel().await.ok();
            env.assert_ledger_ok().await;
        }
    }
}

on_both_backends! {
    #[tokio::test]
    async fn failed_cancelled_and_unknown_payments_say_so_and_charge_nothing() {
        for flow in FLOWS {
            let env = Env::new(flow.mode());
            let client = env.client(Some("alice")).await;

            let declined = flow.start(&client, "echo", echo_args("a")).await;
            env.ok(&["sessions", "decline", &declined]).await;
            let r = flow
                .redeem(&client, "echo", echo_args("a"), &declined)
                .await;
            assert_eq!(error_code(&r), "payment_failed", "{flow:?}");
            assert_eq!(structured(&r)["status"], "failed");

            let cancelled = flow.start(&client, "echo", echo_args("b")).await;
            env.ok(&["sessions", "cancel", &cancelled]).await;
            let r = flow
                .redeem(&client, "echo", echo_args("b"), &cancelled)
                .await;
            assert_eq!(error_code(&r), "payment_cancelled", "{flow:?}");
            assert_eq!(structured(&r)["status"], "cancelled");
            // Ended stays ended, even if someone tries to pay afterwards.
            assert!(
                !env.cli(&["sessions", "pay", &cancelled])
                    .await
                    .status
                    .success()
            );
            let r = flow
                .redeem(&client, "echo", echo_args("b"), &cancelled)
                .await;
            assert_eq!(error_code(&r), "payment_cancelled");

            for bogus in ["pay_doesnotexist", "' OR 1=1 --", "../../etc/passwd"] {
                let r = flow.redeem(&client, "echo", echo_args("a"), bogus).await;
                assert_eq!(error_code(&r), "payment_not_found", "{flow:?} {bogus}");
            }
            client.cancel().await.ok();
            env.assert_ledger_ok().await;
        }
    }
}

on_both_backends! {
    #[tokio::test]
    async fn an_unpaid_intent_expires() {
        for flow in FLOWS {
            let env = Env::with_pricing(
                &pricing(flow.mode(), "").replace("payment_ttl = \"15m\"", "payment_ttl = \"1s\""),
            );
            let client = env.client(Some("alice")).await;
            let id = flow.start(&client, "echo", echo_args("late")).await;
            tokio::time::sleep(std::time::Duration::from_millis(1300)).await;
            let r = flow.redeem(&client, "echo", echo_args("late"), &id).await;
            assert_eq!(error_code(&r), "payment_expired", "{flow:?}");
            assert_eq!(structured(&r)["status"], "expired");
            // Too late to pay now.
            let out = env.cli(&["sessions", "pay", &id]).await;
            assert!(!out.status.success());
            assert!(String::from_utf8_lossy(&out.stderr).contains("expired"));
            client.cancel().await.ok();
            env.assert_ledger_ok().await;
        }
    }
}

on_both_backends! {
    #[tokio::test]
    async fn a_payment_id_is_bound_to_its_tool_principal_and_arguments() {
        for flow in FLOWS {
            let env = Env::new(flow.mode());
            let alice = env.client(Some("alice")).await;
            let bob = env.client(Some("bob")).await;
            let id = flow.start(&alice, "echo", echo_args("mine")).await;
            env.ok(&["sessions", "pay", &id]).await;

            // Another tool.
            let r = flow
                .redeem(&alice, "divide", json!({"a": 1, "b": 2}), &id)
                .await;
            assert_eq!(error_code(&r), "payment_mismatch", "{flow:?}");
            // Another principal, on another server process sharing the store.
            let r = flow.redeem(&bob, "echo", echo_args("mine"), &id).await;
            assert_eq!(error_code(&r), "payment_mismatch", "{flow:?}");
            // Another caller with no principal at all.
            let anonymous = env.client(None).await;
            let r = flow
                .redeem(&anonymous, "echo", echo_args("mine"), &id)
                .await;
            assert_eq!(error_code(&r), "payment_mismatch", "{flow:?}");
            anonymous.cancel().await.ok();
            if let Flow::Resubmit = flow {
                // Other arguments.
                let r = flow.redeem(&alice, "echo", echo_args("yours"), &id).await;
                assert_eq!(error_code(&r), "payment_mismatch");
                assert!(text(&r).contains("arguments differ"));
                // Key order and spacing do not make arguments different:
                // rmcp's client always writes keys sorted and compact, so
                // the resends go out as raw lines, keys reversed and spaced.
                let mut wire = crate::wire::Wire::start_as(&env, Some("alice")).await;
                let line = format!(
                    r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"arguments":{{ "text" :  "mine",   "payment_id" : "{id}" }},"name":"echo"}}}}"#
                );
                let answer = wire.request_raw(1, &line).await;
                assert_eq!(answer["result"]["content"][0]["text"], "mine", "{answer}");
                assert_eq!(answer["result"]["_meta"]["tollgate/payment"]["status"], "paid");
                let id = flow.start(&alice, "divide", json!({"a": 1, "b": 2})).await;
                env.ok(&["sessions", "pay", &id]).await;
                let line = format!(
                    r#"{{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{{"name":"divide","arguments":{{"payment_id":"{id}" , "b" : 2 ,"a":1}}}}}}"#
                );
                let answer = wire.request_raw(2, &line).await;
                assert_eq!(answer["result"]["structuredContent"], json!({"quotient": 0.5}), "{answer}");
                drop(wire);
                // Nor does a whole number written as a float (a model may
                // write `2` one time and `2.0` the next).
                let id = flow.start(&alice, "divide", json!({"a": 1, "b": 2})).await;
                env.ok(&["sessions", "pay", &id]).await;
                let r = flow
                    .redeem(&alice, "divide", json!({"a": 1.0, "b": 2.0}), &id)
                    .await;
                assert_eq!(structured(&r), json!({"quotient": 0.5}), "{r:?}");
                // An intent opened before that (its hash of `2.0` as
                // written, as an older tollgate stored it) is redeemed too.
                let sent = json!({"a": 1, "b": 2.0});
                let id = flow.start(&alice, "divide", sent.clone()).await;
                env.ok(&["sessions", "pay", &id]).await;
                use sha2::Digest;
                let legacy = hex::encode(sha2::Sha256::digest(
                    tollgate::canonical::canonical_json(&sent).as_bytes(),
                ));
                let older = format!("UPDATE intents SET args_hash = '{legacy}' WHERE id = '{id}'");
                assert_eq!(tollgate::testing::execute(&env.db, &older).await.unwrap(), 1);
                let r = flow
                    .redeem(&alice, "divide", json!({"a": 1, "b": 2}), &id)
                    .await;
                assert_eq!(structured(&r), json!({"quotient": 0.5}), "{r:?}");
            } else {
                let r = flow.redeem(&alice, "echo", Value::Null, &id).await;
                assert_eq!(text(&r), "mine", "two_step runs the stored arguments");
            }
            alice.cancel().await.ok();
            bob.cancel().await.ok();
            env.assert_ledger_ok().await;
        }
    }
}

on_both_backends! {
    #[tokio::test]
    async fn a_paid_call_whose_tool_fails_is_refunded() {
        for flow in FLOWS {
            let env = Env::new(flow.mode());
            env.topup("carol", "1.00").await;
            let client = env.client(None).await;
            let arguments = json!({"a": 1, "b": 0});
            let id = flow.start(&client, "divide", arguments.clone()).await;
            env.ok(&["sessions", "pay", &id, "--from", "carol"]).await;
            assert_eq!(env.available("carol").await, "0.95");

            let r = flow.redeem(&client, "divide", arguments.clone(), &id).await;
            assert_eq!(r.is_error, Some(true));
            assert!(text(&r).contains("divide by zero"), "{flow:?}: {r:?}");
            assert_eq!(payment_meta(&r)["status"], "refunded");
            assert_eq!(env.available("carol").await, "1.00");
            assert_eq!(statement_count(&env, "carol", "refund", &id).await, 1);

            // Replaying the consumed id neither runs nor refunds again.
            let r = flow.redeem(&client, "divide", arguments, &id).await;
            assert_eq!(payment_meta(&r)["replayed"], true);
            assert_eq!(env.available("carol").await, "1.00");
            client.cancel().await.ok();
            env.assert_ledger_ok().await;
        }
    }
}

on_both_backends! {
    #[tokio::test]
    async fn an_intent_created_before_a_restart_is_paid_and_confirmed_after_it() {
        for flow in FLOWS {
            let env = Env::new(flow.mode());
            let first = env.client(Some("alice")).await;
            let id = flow.start(&first, "echo", echo_args("durable")).await;
            first.cancel().await.ok(); // the server process exits

            env.ok(&["sessions", "pay", &id]).await;
            let second = env.client(Some("alice")).await;
            let r = flow
                .redeem(&second, "echo", echo_args("durable"), &id)
                .await;
            assert_eq!(text(&r), "durable", "{flow:?}: {r:?}");
            assert_eq!(payment_meta(&r)["status"], "paid");
            second.cancel().await.ok();
            env.assert_ledger_ok().await;
        }
    }
}

on_both_backends! {
    #[tokio::test]
    async fn an_intent_an_earlier_version_left_paid_runs_once() {
        // Before a claim was one write, an intent was marked `paid` and then
        // moved to `running`; a server stopped in between left it `paid`.
        for flow in FLOWS {
            let env = Env::new(flow.mode());
            env.topup("carol", "1.00").await;
            let client = env.client(Some("alice")).await;
            let id = flow.start(&client, "echo", echo_args("legacy")).await;
            env.ok(&["sessions", "pay", &id, "--from", "carol"]).await;
            let left_paid = tollgate::testing::execute(
                &env.db,
                &format!("UPDATE intents SET status = 'paid' WHERE id = '{id}' AND status = 'awaiting_payment'"),
            )
            .await
            .expect("leave the intent paid");
            assert_eq!(left_paid, 1, "{flow:?}");

            let r = flow.redeem(&client, "echo", echo_args("legacy"), &id).await;
            assert_eq!(text(&r), "legacy", "{flow:?}: {r:?}");
            assert_eq!(payment_meta(&r)["status"], "paid");
            let again = flow.redeem(&client, "echo", echo_args("legacy"), &id).await;
            assert_eq!(payment_meta(&again)["replayed"], true, "{flow:?}: {again:?}");
            assert_eq!(env.available("carol").await, "0.99");
            client.cancel().await.ok();
            env.assert_ledger_ok().await;
        }
    }
}

on_both_backends! {
    #[tokio::test]
    async fn a_run_after_the_currency_changed_is_charged_what_was_paid() {
        let env = Env::new("resubmit");
        env.topup("carol", "1.00").await;
        let first = env.client(Some("alice")).await;
        let id = Flow::Resubmit.start(&first, "echo", echo_args("usd")).await;
        first.cancel().await.ok();
        env.ok(&["sessions", "pay", &id, "--from", "carol"]).await;

        // The operator moves the server to euros before the call is redeemed.
        let pricing = std::fs::read_to_string(&env.config).unwrap();
        std::fs::write(&env.config, pricing.replace("currency = \"USD\"", "currency = \"EUR\"")).unwrap();
        let second = env.client(Some("alice")).await;
        let r = Flow::Resubmit.redeem(&second, "echo", echo_args("usd"), &id).await;
        assert_eq!(text(&r), "usd", "{r:?}");
        assert_eq!(payment_meta(&r)["status"], "paid");
        assert_eq!(payment_meta(&r)["currency"], "USD");
        assert_eq!(payment_meta(&r)["amount"], "0.01");
        // Settled and stored, not left running: a retry gets the stored result.
        let again = Flow::Resubmit.redeem(&second, "echo", echo_args("usd"), &id).await;
        assert_eq!(payment_meta(&again)["replayed"], true, "{again:?}");
        second.cancel().await.ok();
        assert_eq!(env.available("carol").await, "0.99");
        // Settled in dollars, from the dollars in clearing: nothing in euros.
        let ledger = env.ok(&["ledger", "export", "--format", "csv"]).await;
        assert!(!ledger.contains(",EUR,"), "{ledger}");
        env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    #[tokio::test]
    async fn a_flood_of_unpaid_calls_is_capped_per_principal() {
        let env = Env::with_pricing(&pricing("resubmit", "max_open_intents = 3"));
        let alice = env.client(Some("alice")).await;
        let mut ids = Vec::new();
        for i in 0..3 {
            let r = call(&alice, "echo", echo_args(&format!("call {i}"))).await;
            assert_eq!(error_code(&r), "payment_required");
            ids.push(payment_id_of(&r));
        }
        let r = call(&alice, "echo", echo_args("one more")).await;
        assert_eq!(error_code(&r), "too_many_open_payments");
        assert_eq!(structured(&r)["open"], 3);
        assert!(text(&r).contains("principal alice has 3 payments waiting"), "{}", text(&r));

        // Someone else is not held back by alice's flood.
        let bob = env.client(Some("bob")).await;
        assert_eq!(error_code(&call(&bob, "echo", echo_args("hi")).await), "payment_required");

        // A payment redeemed makes room for one more.
        env.ok(&["sessions", "pay", &ids[0]]).await;
        let r = call(&alice, "echo", json!({"text": "call 0", "payment_id": ids[0]})).await;
        assert_eq!(payment_meta(&r)["status"], "paid");
        assert_eq!(error_code(&call(&alice, "echo", echo_args("again")).await), "payment_required");
        assert_eq!(error_code(&call(&alice, "echo", echo_args("and again")).await), "too_many_open_payments");
        alice.cancel().await.ok();
        bob.cancel().await.ok();
        env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    /// Unpaid calls sent at once cannot slip past the cap together, and
    /// anonymous callers, who can open sessions at will, share a cap too.
    #[tokio::test]
    async fn unpaid_calls_sent_at_once_and_from_new_sessions_stay_capped() {
        let env = Env::with_pricing(&pricing(
            "resubmit",
            "max_open_intents = 3\nmax_open_anonymous_intents = 4",
        ));
        let alice = env.client(Some("alice")).await;
        let calls = (0..16).map(|i| call(&alice, "echo", echo_args(&format!("at once {i}"))));
        let codes: Vec<String> = futures::future::join_all(calls).await.iter().map(error_code).collect();
        let asked = codes.iter().filter(|c| *c == "payment_required").count();
        assert_eq!(asked, 3, "{codes:?}");
        assert_eq!(codes.iter().filter(|c| *c == "too_many_open_payments").count(), 13, "{codes:?}");

        // Anonymous: three in one session, then the fourth and last in a
        // new one; a third session is refused.
        let mut sessions = Vec::new();
        for expected in [3, 1, 0] {
            let anonymous = env.client(None).await;
            let mut asked = 0;
            for i in 0..4 {
                let r = call(&anonymous, "echo", echo_args(&format!("anon {i}"))).await;
                match error_code(&r).as_str() {
                    "payment_required" => asked += 1,
                    "too_many_open_payments" => {}
                    other => panic!("{other}: {r:?}"),
                }
            }
            assert_eq!(asked, expected);
            sessions.push(anonymous);
        }
        let r = call(&sessions[2], "echo", echo_args("anon")).await;
        assert!(text(&r).contains("anonymous callers have 4 payments waiting"), "{}", text(&r));
        assert_eq!(structured(&r)["max"], 4);
        // No payment session was left without its intent.
        let listed = env.ok(&["sessions", "list"]).await;
        assert_eq!(listed.matches("pending").count(), 3 + 4, "{listed}");
        for c in sessions.into_iter().chain([alice]) {
            c.cancel().await.ok();
        }
        env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    #[tokio::test]
    async fn the_mock_provider_settles_each_payment_as_it_is_asked_for() {
        for flow in FLOWS {
            let env = Env::with_pricing(&format!(
                "{}\n[provider]\nkind = \"mock\"\n",
                pricing(flow.mode(), "")
            ));
            let client = env.client(Some("alice")).await;
            let id = flow.start(&client, "echo", echo_args("mocked")).await;
            let r = flow.redeem(&client, "echo", echo_args("mocked"), &id).await;
            assert_eq!(text(&r), "mocked", "{flow:?}: {r:?}");
            assert_eq!(payment_meta(&r)["status"], "paid");
            // Still bound to its call: other arguments are refused.
            if let Flow::Resubmit = flow {
                let id = flow.start(&client, "echo", echo_args("once")).await;
                let r = flow.redeem(&client, "echo", echo_args("twice"), &id).await;
                assert_eq!(error_code(&r), "payment_mismatch");
            }
            // The settlement went through the ledger like any other: this
            // payment's own session is paid (the refused one is too, so
            // "paid" anywhere in the list proves nothing), and its charge
            // is captured on echo's statement.
            let listed = env.ok(&["sessions", "list"]).await;
            let line = listed
                .lines()
                .find(|l| l.starts_with(&id))
                .unwrap_or_else(|| panic!("{id} not listed: {listed}"));
            assert_eq!(line.split_whitespace().nth(1), Some("paid"), "{line}");
            let statement = env.ok(&["ledger", "statement", "--tool", "echo"]).await;
            let captured: Vec<&str> = statement.lines().filter(|l| l.contains(&id)).collect();
            assert_eq!(captured.len(), 1, "{statement}");
            let fields: Vec<&str> = captured[0].split_whitespace().collect();
            assert_eq!(fields[1..4], ["capture", "0.01", "USD"], "{statement}");
            client.cancel().await.ok();
            env.assert_ledger_ok().await;
        }
    }
}
