use serde_json::json;

use crate::harness::*;

on_both_backends! {
    #[tokio::test]
    async fn a_funded_wallet_is_charged_once_with_a_verifiable_receipt() {
        let env = Env::new("resubmit");
        env.topup("alice", "1.00").await;
        let client = env.client(Some("alice")).await;

        let r = call(&client, "echo", echo_args("hello")).await;
        assert_eq!(r.is_error, Some(false));
        assert_eq!(text(&r), "hello");
        let payment = payment_meta(&r);
        assert_eq!(payment["status"], "paid");
        assert_eq!(payment["amount"], "0.01");
        assert_eq!(payment["currency"], "USD");
        let payment_id = payment["payment_id"].as_str().unwrap().to_owned();
        let receipt = payment["receipt"].as_str().unwrap().to_owned();
        assert_eq!(
            env.balance("alice").await,
            ("0.99".into(), "0.00".into(), "0.99".into())
        );

        let statement = env.ok(&["wallet", "statement", "alice"]).await;
        let captures: Vec<_> = statement
            .lines()
            .filter(|l| l.contains("capture"))
            .collect();
        assert_eq!(captures.len(), 1, "{statement}");
        assert!(
            captures[0].contains("-0.01") && captures[0].contains(&payment_id),
            "{statement}"
        );

        let verified = env.ok(&["receipt", "verify", &receipt]).await;
        assert!(
            verified.contains("valid receipt") && verified.contains(&payment_id),
            "{verified}"
        );
        assert!(verified.contains("\"payer\": \"alice\"") && verified.contains("\"tool\": \"echo\""));
        // A receipt with one character changed does not verify.
        let mut tampered = receipt.clone().into_bytes();
        let i = tampered.len() / 3;
        tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
        let out = env
            .cli(&["receipt", "verify", &String::from_utf8(tampered).unwrap()])
            .await;
        assert!(!out.status.success());

        client.cancel().await.ok();
        env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    #[tokio::test]
    async fn a_tool_error_releases_the_hold_and_costs_nothing() {
        let env = Env::new("resubmit");
        env.topup("alice", "1.00").await;
        let client = env.client(Some("alice")).await;

        let r = call(&client, "divide", json!({"a": 1, "b": 0})).await;
        assert_eq!(r.is_error, Some(true));
        assert!(text(&r).contains("divide by zero"));
        assert_eq!(payment_meta(&r)["status"], "released");
        assert_eq!(payment_meta(&r)["charged"], "0.00");
        assert_eq!(
            env.balance("alice").await,
            ("1.00".into(), "0.00".into(), "1.00".into())
        );

        // So is a quotient too large for a number: JSON has no infinity.
        let r = call(&client, "divide", json!({"a": 1e308, "b": 1e-308})).await;
        assert_eq!(r.is_error, Some(true), "{r:?}");
        assert_eq!(payment_meta(&r)["status"], "released");

        let r = call(&client, "divide", json!({"a": 1, "b": 4})).await;
        assert_eq!(structured(&r), json!({"quotient": 0.25}));
        assert_eq!(payment_meta(&r)["status"], "paid");
        assert_eq!(env.available("alice").await, "0.95");

        client.cancel().await.ok();
        env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    #[tokio::test]
    async fn insufficient_balance_anonymous_callers_and_prices_above_the_threshold_take_the_slow_path()
    {
        let env = Env::with_pricing(&pricing("resubmit", "").replace(
            "approval_threshold = \"5.00\"",
            "approval_threshold = \"0.02\"",
        ));
        env.topup("bob", "0.03").await;
        let bob = env.client(Some("bob")).await;

        // divide costs 0.05: above both bob's balance and the threshold.
        let r = call(&bob, "divide", json!({"a": 1, "b": 2})).await;
        assert_eq!(error_code(&r), "payment_required");
        payment_id_of(&r);

        // echo fits; three calls drain the wallet, the fourth needs a payment.
        for _ in 0..3 {
            let r = call(&bob, "echo", echo_args("x")).await;
            assert_eq!(payment_meta(&r)["status"], "paid");
        }
        let r = call(&bob, "echo", echo_args("x")).await;
        assert_eq!(error_code(&r), "payment_required");
        assert_eq!(env.available("bob").await, "0.00");

        // Now a wallet with plenty, but divide is above the approval threshold.
        env.topup("bob", "10").await;
        let r = call(&bob, "divide", json!({"a": 1, "b": 2})).await;
        assert_eq!(error_code(&r), "payment_required");
        assert_eq!(env.available("bob").await, "10.00");
        bob.cancel().await.ok();

        let anonymous = env.client(None).await;
        let r = call(&anonymous, "echo", echo_args("x")).await;
        assert_eq!(error_code(&r), "payment_required");
        anonymous.cancel().await.ok();
        env.assert_ledger_ok().await;
    }
}

/// A release the store refuses for a moment (here a trigger that fails it)
/// is tried again, so the wallet gets its funds back in seconds rather than
/// when the hold expires. (It was only logged.)
#[tokio::test]
async fn a_release_that_fails_is_tried_again() {
    let env = Env::new("resubmit");
    env.topup("alice", "1.00").await;
    let client = env.client(Some("alice")).await;
    let refuse = "CREATE TRIGGER refuse_release BEFORE UPDATE OF status ON holds
                  WHEN NEW.status = 'released' BEGIN SELECT RAISE(ABORT, 'injected'); END";
    tollgate::testing::execute(&env.db, refuse).await.unwrap();
    let r = call(&client, "divide", json!({"a": 1, "b": 0})).await;
    assert_eq!(r.is_error, Some(true));
    assert_eq!(payment_meta(&r)["charged"], "0.00");
    assert_eq!(
        env.available("alice").await,
        "0.95",
        "the hold is still open"
    );
    tollgate::testing::execute(&env.db, "DROP TRIGGER refuse_release")
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while env.available("alice").await != "1.00" {
        assert!(
            std::time::Instant::now() < deadline,
            "the hold was left open"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    client.cancel().await.ok();
    env.assert_ledger_ok().await;
}

on_both_backends! {
    /// `tollgate payment show ID` tells what became of a call's payment,
    /// even when no money moved and no statement shows it: a fast-path
    /// call charged, one whose tool failed (released), a slow-path call
    /// paid and run, one never paid, and an id never recorded.
    #[tokio::test]
    async fn payment_show_tells_what_became_of_each_payment() {
        let env = Env::new("resubmit");
        env.topup("alice", "1.00").await;
        let alice = env.client(Some("alice")).await;
        let show = async |id: &str| env.ok(&["payment", "show", id]).await;

        let r = call(&alice, "divide", json!({"a": 1, "b": 4})).await;
        let charged = payment_meta(&r)["payment_id"].as_str().unwrap().to_owned();
        let out = show(&charged).await;
        assert!(out.contains("tool `divide` for principal alice, fast path"), "{out}");
        assert!(out.contains("status: charged 0.05 USD"), "{out}");
        assert!(out.contains("capture") && out.contains("wallet:alice"), "{out}");
        assert!(out.contains("-0.05"), "{out}");
        // Its receipt points at it for refunds made since.
        let receipt = payment_meta(&r)["receipt"].as_str().unwrap().to_owned();
        let verified = env.cli(&["receipt", "verify", &receipt]).await;
        assert!(verified.status.success());
        let note = String::from_utf8_lossy(&verified.stderr);
        assert!(note.contains(&format!("tollgate payment show {charged}")), "{note}");

        let r = call(&alice, "divide", json!({"a": 1, "b": 0})).await;
        let released = payment_meta(&r)["payment_id"].as_str().unwrap().to_owned();
        let out = show(&released).await;
        assert!(out.contains("status: released at"), "{out}");
        assert!(out.contains("nothing charged"), "{out}");
        assert!(out.contains("ledger: no line: no money moved"), "{out}");
        alice.cancel().await.ok();

        let anonymous = env.client(None).await;
        let r = call(&anonymous, "echo", echo_args("paid")).await;
        let paid = structured(&r)["payment_id"].as_str().unwrap().to_owned();
        env.ok(&["sessions", "pay", &paid]).await;
        let r = call(&anonymous, "echo", json!({"text": "paid", "payment_id": paid})).await;
        assert_eq!(text(&r), "paid");
        let out = show(&paid).await;
        assert!(out.contains("tool `echo` for an anonymous caller, slow path (resubmit)"), "{out}");
        assert!(out.contains("status: succeeded (paid, and its tool ran: charged)"), "{out}");
        assert!(out.contains("session: paid"), "{out}");
        assert!(out.contains("result: kept, a success"), "{out}");
        assert!(out.contains("session_payment") && out.contains("capture"), "{out}");

        let r = call(&anonymous, "echo", echo_args("unpaid")).await;
        let unpaid = structured(&r)["payment_id"].as_str().unwrap().to_owned();
        let out = show(&unpaid).await;
        assert!(out.contains("status: awaiting_payment (waiting for its payment)"), "{out}");
        assert!(out.contains("result: none kept"), "{out}");
        assert!(out.contains("ledger: no line: no money moved"), "{out}");
        anonymous.cancel().await.ok();

        let out = env.cli(&["payment", "show", "pay_never"]).await;
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("no payment `pay_never` was ever recorded here"), "{err}");
    }
}
