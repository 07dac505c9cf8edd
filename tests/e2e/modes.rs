//! The interactive modes: elicitation (both protocol generations), progress,
//! dynamic tools, auto, and approval above the threshold.

use std::time::Duration;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, ElicitRequestParams, ServerNotification,
    SubscriptionFilter,
};
use serde_json::json;

use crate::{
    harness::{echo_args, error_code, payment_meta, structured, text},
    inproc::*,
};

fn assert_ran(r: &rmcp::model::CallToolResult, expected: &str) {
    assert_eq!(r.is_error, Some(false), "{r:?}");
    assert_eq!(text(r), expected);
    assert_eq!(payment_meta(r)["status"], "paid", "{r:?}");
}

/// The names of the tools `client` is offered now.
async fn tool_names(client: &Client) -> Vec<String> {
    let tools = client.list_all_tools().await.expect("tools/list");
    tools.into_iter().map(|t| t.name.to_string()).collect()
}

async fn session_status(t: &InProcess, id: &str) -> String {
    let session = t.gate.store().session(id).await.unwrap().expect("session");
    session.status.as_str().to_owned()
}

// ---------- elicitation, sessions up to 2025-11-25 ----------

on_both_backends! {
    #[tokio::test]
    async fn elicitation_in_url_mode_takes_the_payment_inside_the_call() {
        let t = InProcess::new(&pricing("elicitation", "")).await;
        let handler = t.client(Person::PaysAndAccepts, Elicitation::Url);
        let client = t.connect(None, handler.clone(), false).await;
        let r = call(&client, "echo", echo_args("hello")).await;
        assert_ran(&r, "hello");
        let payment_id = payment_meta(&r)["payment_id"].as_str().unwrap().to_owned();
        match &handler.prompts.lock().unwrap()[0] {
            ElicitRequestParams::UrlElicitationParams {
                url,
                elicitation_id,
                ..
            } => {
                assert_eq!(elicitation_id, &payment_id);
                assert!(url.ends_with(&format!("/checkout/{payment_id}")), "{url}");
            }
            other => panic!("expected a URL prompt, got {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            handler.custom.lock().unwrap().as_slice(),
            ["notifications/elicitation/complete"]
        );
        client.cancel().await.ok();
        t.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    #[tokio::test]
    async fn elicitation_falls_back_to_a_form_stating_tool_amount_currency_and_url() {
        let t = InProcess::new(&pricing("elicitation", "")).await;
        let handler = t.client(Person::PaysAndAccepts, Elicitation::Form);
        let client = t.connect(Some("alice"), handler.clone(), false).await;
        let r = call(&client, "divide", json!({"a": 9, "b": 3})).await;
        assert_eq!(structured(&r), json!({"quotient": 3.0}));
        assert_eq!(payment_meta(&r)["status"], "paid");
        match &handler.prompts.lock().unwrap()[0] {
            ElicitRequestParams::FormElicitationParams { message, .. } => {
                for needle in ["`divide`", "0.05", "USD", "/checkout/pay_"] {
                    assert!(message.contains(needle), "{needle} missing from {message}");
                }
            }
            other => panic!("expected a form, got {other:?}"),
        }
        client.cancel().await.ok();
        t.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    #[tokio::test]
    async fn accept_alone_is_not_payment_and_the_intent_stays_payable() {
        let t = InProcess::new(&pricing("elicitation", "")).await;
        let client = t
            .connect(
                None,
                t.client(Person::AcceptsUnpaid, Elicitation::Url),
                false,
            )
            .await;
        let r = call(&client, "echo", echo_args("later")).await;
        assert_eq!(error_code(&r), "payment_pending", "{r:?}");
        let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
        assert_eq!(session_status(&t, &id).await, "pending");

        t.env.ok(&["sessions", "pay", &id]).await;
        let r = call(&client, "echo", json!({"text": "later", "payment_id": id})).await;
        assert_ran(&r, "later");
        client.cancel().await.ok();
        t.env.assert_ledger_ok().await;
    }
}

/// A stdio client that closes its input can no longer pay in a wait or
/// answer a prompt, so its waits end; a call it sent before that redeems a
/// payment already made still runs and answers (`printf … | tollgate
/// serve`). Its check of the payment used to be cut short as a wait.
#[tokio::test]
async fn a_paid_call_redeemed_as_the_clients_input_ends_runs() {
    let t = InProcess::new(&pricing("resubmit", "")).await;
    let client = t
        .connect(None, t.client(Person::Ignores, Elicitation::None), false)
        .await;
    let r = call(&client, "echo", echo_args("piped")).await;
    let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
    t.env.ok(&["sessions", "pay", &id]).await;
    t.gate.end_inputs();
    let r = call(&client, "echo", json!({"text": "piped", "payment_id": id})).await;
    assert_ran(&r, "piped");
    client.cancel().await.ok();
    t.env.assert_ledger_ok().await;
}

on_both_backends! {
    #[tokio::test]
    async fn a_payment_made_before_a_decline_stands_and_is_used_or_refunded() {
        let t = InProcess::new(&pricing("elicitation", "")).await;
        let client = t
            .connect(None, t.client(Person::PaysAndDeclines, Elicitation::Url), false)
            .await;
        let r = call(&client, "echo", echo_args("mine")).await;
        assert_eq!(error_code(&r), "payment_in_progress", "{r:?}");
        assert_eq!(structured(&r)["status"], "paid");
        assert!(text(&r).contains("the payment stands"), "{}", text(&r));
        let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
        assert_eq!(session_status(&t, &id).await, "paid", "the cancel came too late");
        let intent = t.gate.store().intent(&id).await.unwrap().expect("intent");
        assert_eq!(intent.status.as_str(), "awaiting_payment", "not ended unpaid");
        // Refunded if unused once kept past its time (`keep_results`, 7 days).
        let refund_at = tollgate::store::rfc3339(intent.expires_at + 7 * 24 * 3_600_000);
        assert!(text(&r).contains(&format!("Unused by {refund_at}, it is refunded")), "{}", text(&r));

        let r = call(&client, "echo", json!({"text": "mine", "payment_id": id})).await;
        assert_ran(&r, "mine");

        // One never used is refunded once its time is up (recovery runs on
        // a schedule; here it is asked to, as if 20 minutes had passed).
        let r = call(&client, "echo", echo_args("unused")).await;
        let unused = structured(&r)["payment_id"].as_str().unwrap().to_owned();
        let later = tollgate::store::now_ms() + 20 * 60 * 1000;
        let recovered = t.gate.recover_interrupted(later).await.unwrap();
        assert_eq!(recovered.unredeemed_refunded, 1);
        let intent = t.gate.store().intent(&unused).await.unwrap().expect("intent");
        assert_eq!(intent.status.as_str(), "failed", "refunded, never run");
        let r = call(&client, "echo", json!({"text": "unused", "payment_id": unused})).await;
        assert_eq!(error_code(&r), "payment_unredeemed", "{r:?}");
        assert_eq!(payment_meta(&r)["status"], "refunded");
        client.cancel().await.ok();
        t.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    /// Recovery reads unredeemed payments a page at a time: one pass refunds
    /// them all, not only the first page.
    #[tokio::test]
    async fn one_recovery_pass_refunds_more_unredeemed_payments_than_a_page() {
        use tollgate::{
            money::{Currency, Units},
            store::{
                Intent, IntentStatus, LocalSession, OpenLimit, Origin, SessionStatus, UNREDEEMED_PAGE,
                now_ms,
            },
        };
        let t = InProcess::new(&pricing("two_step", "")).await;
        let store = t.gate.store();
        let usd = Currency::parse("USD").unwrap();
        let ended = now_ms() - 1_000;
        let count = UNREDEEMED_PAGE + 3;
        for n in 0..count {
            let id = format!("pay_unredeemed_{n:04}");
            store
                .create_session(&LocalSession {
                    id: id.clone(),
                    amount: Units(1),
                    currency: usd.clone(),
                    description: "echo".into(),
                    status: SessionStatus::Pending,
                    created_at: ended - 60_000,
                    expires_at: now_ms() + 60_000,
                    paid_from: None,
                    owner: None,
                })
                .await
                .unwrap();
            // Paid before its intent, already past its time, exists: the
            // upkeep's expiry sweep, running meanwhile, would end it unpaid.
            store.pay_session(&id, None, now_ms()).await.unwrap();
            store
                .create_intent(&Intent {
                    id: id.clone(),
                    tool: "echo".into(),
                    args_hash: "h".into(),
                    args_json: r#"{"text":"x"}"#.into(),
                    amount: Units(1),
                    currency: usd.clone(),
                    principal: Some("alice".into()),
                    session_id: None,
                    mode: "two_step".into(),
                    status: IntentStatus::AwaitingPayment,
                    provider: "local".into(),
                    provider_session_id: Some(id.clone()),
                    payment_url: None,
                    created_at: ended - 60_000,
                    // Ten at a time share an end: the pages cut between twins.
                    expires_at: ended - (n - n % 10) as i64,
                    origin: Origin::default(),
                    approval: None,
                }, &OpenLimit::NONE)
                .await
                .unwrap();
        }
        let recovered = t.gate.recover_interrupted(now_ms()).await.unwrap();
        assert_eq!(recovered.unredeemed_refunded, count as u64);
        let again = t.gate.recover_interrupted(now_ms()).await.unwrap();
        assert_eq!(again.unredeemed_refunded, 0, "each refunded once");
        t.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    #[tokio::test]
    async fn decline_and_cancel_end_the_payment_and_charge_nothing() {
        for (person, code, status) in [
            (Person::Declines, "payment_declined", "declined"),
            (Person::Cancels, "payment_cancelled", "cancelled"),
        ] {
            let t = InProcess::new(&pricing("elicitation", "")).await;
            t.env.topup("carol", "1.00").await;
            let client = t
                .connect(None, t.client(person, Elicitation::Url), false)
                .await;
            let r = call(&client, "echo", echo_args("no")).await;
            assert_eq!(error_code(&r), code);
            assert_eq!(structured(&r)["status"], status);
            let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
            assert_eq!(
                session_status(&t, &id).await,
                "cancelled",
                "the session is cancelled in the store"
            );
            // The id cannot be paid or redeemed afterwards.
            assert!(
                !t.env
                    .cli(&["sessions", "pay", &id, "--from", "carol"])
                    .await
                    .status
                    .success()
            );
            let r = call(&client, "echo", json!({"text": "no", "payment_id": id})).await;
            assert_eq!(error_code(&r), code);
            assert_eq!(t.env.available("carol").await, "1.00");
            client.cancel().await.ok();
            t.env.assert_ledger_ok().await;
        }
    }
}

on_both_backends! {
    #[tokio::test]
    async fn an_unanswered_prompt_times_out_and_the_intent_stays_payable() {
        let t = InProcess::new(&pricing("elicitation", "")).await;
        let client = t
            .connect(None, t.client(Person::Dawdles, Elicitation::Url), false)
            .await;
        // The person answers after 800ms, past the 300ms elicitation
        // timeout: "no answer within" is only said when the server's
        // timeout ends the prompt, so it was not the late answer.
        let r = call(&client, "echo", echo_args("slow")).await;
        assert_eq!(error_code(&r), "payment_timeout", "{r:?}");
        assert!(text(&r).contains("no answer within"), "{}", text(&r));
        let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
        t.env.ok(&["sessions", "pay", &id]).await;
        let r = call(&client, "echo", json!({"text": "slow", "payment_id": id})).await;
        assert_ran(&r, "slow");
        client.cancel().await.ok();
        t.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    #[tokio::test]
    async fn a_client_without_elicitation_gets_resubmit() {
        let t = InProcess::new(&pricing("elicitation", "")).await;
        let handler = t.client(Person::PaysAndAccepts, Elicitation::None);
        let client = t.connect(None, handler.clone(), false).await;
        let r = call(&client, "echo", echo_args("x")).await;
        assert_eq!(error_code(&r), "payment_required");
        assert_eq!(handler.prompt_count(), 0);
        client.cancel().await.ok();
        t.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    #[tokio::test]
    async fn auto_elicits_where_the_client_can_and_resubmits_otherwise() {
        let t = InProcess::new(&pricing("auto", "")).await;
        let eliciting = t.client(Person::PaysAndAccepts, Elicitation::Form);
        let client = t.connect(None, eliciting.clone(), false).await;
        assert_ran(&call(&client, "echo", echo_args("a")).await, "a");
        assert_eq!(eliciting.prompt_count(), 1);
        client.cancel().await.ok();

        let plain = t.client(Person::PaysAndAccepts, Elicitation::None);
        let client = t.connect(None, plain.clone(), false).await;
        let r = call(&client, "echo", echo_args("a")).await;
        assert_eq!(error_code(&r), "payment_required");
        assert_eq!(plain.prompt_count(), 0);
        client.cancel().await.ok();
        t.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    #[tokio::test]
    async fn a_per_tool_mode_overrides_the_server_mode() {
        let text = pricing("resubmit", "").replacen(
            "price = \"0.01\"",
            "price = \"0.01\"\nmode = \"elicitation\"",
            1,
        );
        let t = InProcess::new(&text).await;
        let handler = t.client(Person::PaysAndAccepts, Elicitation::Url);
        let client = t.connect(None, handler.clone(), false).await;
        assert_ran(&call(&client, "echo", echo_args("e")).await, "e");
        let r = call(&client, "divide", json!({"a": 1, "b": 1})).await;
        assert_eq!(error_code(&r), "payment_required", "divide stays resubmit");
        assert_eq!(handler.prompt_count(), 1);
        client.cancel().await.ok();
        t.env.assert_ledger_ok().await;
    }
}

// ---------- elicitation, 2026-07-28 sessions ----------

on_both_backends! {
    #[tokio::test]
    async fn a_2026_session_gets_input_required_and_pays_through_it() {
        let t = InProcess::new(&pricing("elicitation", "")).await;
        let handler = t.client(Person::PaysAndAccepts, Elicitation::Url);
        let client = t.connect(Some("alice"), handler.clone(), true).await;

        let first = client
            .call_tool_once(
                CallToolRequestParams::new("echo")
                    .with_arguments(crate::harness::args(echo_args("new"))),
            )
            .await
            .unwrap();
        let CallToolResponse::InputRequired(ir) = first else {
            panic!("expected input_required, got {first:?}")
        };
        let state = ir.request_state.clone().unwrap();
        assert!(state.starts_with("pay_"));
        assert_eq!(session_status(&t, &state).await, "pending");

        // The high-level call drives the round through create_elicitation.
        let r = call(&client, "echo", echo_args("new")).await;
        assert_ran(&r, "new");
        assert_eq!(handler.prompt_count(), 1);
        client.cancel().await.ok();
        t.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    #[tokio::test]
    async fn a_2026_request_state_is_checked_on_the_server() {
        let t = InProcess::new(&pricing("elicitation", "")).await;
        let alice = t
            .connect(
                Some("alice"),
                t.client(Person::AcceptsUnpaid, Elicitation::Url),
                true,
            )
            .await;
        let bob = t
            .connect(
                Some("bob"),
                t.client(Person::AcceptsUnpaid, Elicitation::Url),
                true,
            )
            .await;
        let accepted = {
            let mut responses = rmcp::model::InputResponses::new();
            responses.insert("payment".into(), json!({"action": "accept"}));
            responses
        };
        let retry = |state: &str, text_arg: &str| {
            let mut params = CallToolRequestParams::new("echo")
                .with_arguments(crate::harness::args(echo_args(text_arg)));
            params.request_state = Some(state.to_owned());
            params.input_responses = Some(accepted.clone());
            params
        };
        let complete = |r: CallToolResponse| match r {
            CallToolResponse::Complete(r) => r,
            other => panic!("expected a result, got {other:?}"),
        };

        // Forged: names no intent.
        let r = complete(
            alice
                .call_tool_once(retry("pay_0000000000000000000000000000dead", "x"))
                .await
                .unwrap(),
        );
        assert_eq!(error_code(&r), "payment_mismatch");

        let CallToolResponse::InputRequired(ir) = alice
            .call_tool_once(
                CallToolRequestParams::new("echo").with_arguments(crate::harness::args(echo_args("x"))),
            )
            .await
            .unwrap()
        else {
            panic!("expected input_required")
        };
        let state = ir.request_state.unwrap();
        t.gate
            .store()
            .pay_session(&state, None, tollgate::store::now_ms())
            .await
            .unwrap();
        // Foreign: another principal, other arguments, or another session
        // of the same principal, which was never asked.
        let r = complete(bob.call_tool_once(retry(&state, "x")).await.unwrap());
        assert_eq!(error_code(&r), "payment_mismatch");
        let r = complete(alice.call_tool_once(retry(&state, "y")).await.unwrap());
        assert_eq!(error_code(&r), "payment_mismatch");
        let elsewhere = t
            .connect(
                Some("alice"),
                t.client(Person::AcceptsUnpaid, Elicitation::Url),
                true,
            )
            .await;
        let r = complete(elsewhere.call_tool_once(retry(&state, "x")).await.unwrap());
        assert_eq!(error_code(&r), "payment_mismatch", "{r:?}");
        elsewhere.cancel().await.ok();
        // The real answer runs the call once.
        let r = complete(alice.call_tool_once(retry(&state, "x")).await.unwrap());
        assert_ran(&r, "x");
        alice.cancel().await.ok();
        bob.cancel().await.ok();
        t.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    #[tokio::test]
    async fn a_2026_decline_cancel_or_unpaid_accept_charges_nothing() {
        for (person, code) in [
            (Person::Declines, "payment_declined"),
            (Person::Cancels, "payment_cancelled"),
            (Person::AcceptsUnpaid, "payment_pending"),
        ] {
            let t = InProcess::new(&pricing("elicitation", "")).await;
            let client = t
                .connect(None, t.client(person, Elicitation::Form), true)
                .await;
            let r = call(&client, "echo", echo_args("z")).await;
            assert_eq!(error_code(&r), code, "{person:?}");
            client.cancel().await.ok();
            t.env.assert_ledger_ok().await;
        }
    }
}

// ---------- progress ----------

on_both_backends! {
    #[tokio::test]
    async fn progress_waits_reports_the_url_and_answers_once_paid() {
        let t = InProcess::new(&pricing("progress", "")).await;
        let handler = t.client(Person::PaysAfterProgress(3), Elicitation::None);
        let client = t.connect(None, handler.clone(), false).await;
        let r = call(&client, "echo", echo_args("waited")).await;
        assert_ran(&r, "waited");
        let progress = handler.progress.lock().unwrap().clone();
        assert!(progress.len() >= 3, "{progress:?}");
        let message = progress[0].message.clone().unwrap();
        assert!(
            message.contains("/checkout/pay_") && message.contains("0.01 USD"),
            "{message}"
        );
        assert!(
            progress.windows(2).all(|w| w[1].progress > w[0].progress),
            "progress increases"
        );
        client.cancel().await.ok();
        t.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    #[tokio::test]
    async fn progress_times_out_with_the_payment_id_and_resumes_by_resubmit() {
        let t = InProcess::new(&pricing("progress", "")).await;
        let client = t
            .connect(None, t.client(Person::Ignores, Elicitation::None), false)
            .await;
        let r = call(&client, "echo", echo_args("resume")).await;
        assert_eq!(error_code(&r), "payment_timeout", "{r:?}");
        let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
        t.env.ok(&["sessions", "pay", &id]).await;
        let r = call(&client, "echo", json!({"text": "resume", "payment_id": id})).await;
        assert_ran(&r, "resume");
        client.cancel().await.ok();
        t.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    #[tokio::test]
    async fn progress_ends_at_once_when_the_session_fails_is_cancelled_or_expires() {
        for (end, code) in [
            (tollgate::store::SessionStatus::Failed, "payment_failed"),
            (
                tollgate::store::SessionStatus::Cancelled,
                "payment_cancelled",
            ),
            (tollgate::store::SessionStatus::Expired, "payment_expired"),
        ] {
            let t = InProcess::new(
                &pricing("progress", "").replace("progress = \"1s\"", "progress = \"30s\""),
            )
            .await;
            let handler = t.client(Person::Ignores, Elicitation::None);
            let client = t.connect(None, handler.clone(), false).await;
            let store = t.gate.store().clone();
            let watcher = handler.clone();
            tokio::spawn(async move {
                let id = watcher.first_progress_payment_id().await;
                store.end_session(&id, end).await.unwrap();
            });
            // Running out the 30s wait would answer payment_timeout: the
            // session's own ending is what ended it.
            let r = call(&client, "echo", echo_args("doomed")).await;
            assert_eq!(error_code(&r), code, "{r:?}");
            client.cancel().await.ok();
            t.env.assert_ledger_ok().await;
        }
    }
}

/// Ends a payment's time now (its intent's and its local session's), as
/// if its payment_ttl had run out.
async fn expire(t: &InProcess, id: &str) {
    let past = tollgate::store::now_ms() - 1;
    for table in ["intents", "payment_sessions"] {
        let changed = tollgate::testing::execute(
            &t.env.db,
            &format!("UPDATE {table} SET expires_at = {past} WHERE id = '{id}'"),
        )
        .await
        .unwrap();
        assert_eq!(changed, 1, "{table}");
    }
}

on_both_backends! {
    /// A payment whose time ran out unpaid, redeemed by its id in the modes
    /// that wait for it, answers `payment_expired` and can no longer be
    /// paid.
    #[tokio::test]
    async fn an_expired_payment_redeemed_in_progress_or_elicitation_mode_says_so() {
        for (mode, person, elicitation) in [
            ("progress", Person::Ignores, Elicitation::None),
            ("elicitation", Person::Dawdles, Elicitation::Url),
        ] {
            let t = InProcess::new(&pricing(mode, "")).await;
            let client = t.connect(None, t.client(person, elicitation), false).await;
            let r = call(&client, "echo", echo_args("late")).await;
            assert_eq!(error_code(&r), "payment_timeout", "{mode}: {r:?}");
            let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
            expire(&t, &id).await;
            let r = call(&client, "echo", json!({"text": "late", "payment_id": id})).await;
            assert_eq!(error_code(&r), "payment_expired", "{mode}: {r:?}");
            assert_eq!(structured(&r)["status"], "expired", "{mode}");
            let out = t.env.cli(&["sessions", "pay", &id]).await;
            assert!(!out.status.success(), "{mode}: paid after its time");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains("expired"), "{mode}: {stderr}");
            let r = call(&client, "echo", json!({"text": "late", "payment_id": id})).await;
            assert_eq!(error_code(&r), "payment_expired", "{mode}: asked again");
            client.cancel().await.ok();
            t.env.assert_ledger_ok().await;
        }
    }
}

on_both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_resubmit_during_a_progress_wait_runs_the_tool_once() {
        let t =
            InProcess::new(&pricing("progress", "").replace("progress = \"1s\"", "progress = \"30s\""))
                .await;
        let waiting = t.client(Person::Ignores, Elicitation::None);
        let first = t.connect(Some("alice"), waiting.clone(), false).await;
        let second = t
            .connect(
                Some("alice"),
                t.client(Person::Ignores, Elicitation::None),
                false,
            )
            .await;
        let long_call = tokio::spawn(async move {
            let r = call(&first, "echo", echo_args("once")).await;
            first.cancel().await.ok();
            r
        });
        let id = waiting.first_progress_payment_id().await;
        t.gate
            .store()
            .pay_session(&id, None, tollgate::store::now_ms())
            .await
            .unwrap();
        let resubmits = futures::future::join_all(
            (0..4).map(|_| call(&second, "echo", json!({"text": "once", "payment_id": id}))),
        )
        .await;
        let waited = long_call.await.unwrap();
        let all: Vec<_> = resubmits.iter().chain(std::iter::once(&waited)).collect();
        let first_runs = all
            .iter()
            .filter(|r| payment_meta(r).get("replayed").is_none())
            .count();
        for r in &all {
            assert_ran(r, "once");
        }
        assert_eq!(
            first_runs, 1,
            "the tool ran once; every other answer is the stored result"
        );
        second.cancel().await.ok();
        t.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    /// A progress call that has waited for its payment longer than a call
    /// waits on a run under way, and then finds another call (a resubmit)
    /// running it, still waits that run out and answers with its result.
    /// (Its time to wait on the run was counted from the start of its wait
    /// for the payment, so it answered `payment_in_progress` at once.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_progress_call_waits_out_a_run_it_finds_under_way_after_a_long_wait() {
        let pricing = pricing("progress", "").replace("progress = \"1s\"", "progress = \"30s\"")
            + "\n[[tools]]\nname = \"sleep\"\nprice = \"0.01\"\n";
        let t = crate::inproc::with_settings(
            &pricing,
            |config, store| tollgate::app::provider_for(config, store).expect("provider"),
            |settings| settings.run_wait = Duration::from_secs(2),
        )
        .await;
        // Longer than between two looks at the payment (a second, by
        // then): the progress call sees the run under way.
        let sleep = |id: Option<&str>| match id {
            Some(id) => json!({"ms": 1500, "payment_id": id}),
            None => json!({"ms": 1500}),
        };
        // The resubmit must claim the run before the progress call's next
        // look at the payment (a second apart by then): tried again in the
        // rare case the progress call claimed it first.
        let mut resubmit_ran_it = false;
        for _ in 0..3 {
            let waiting = t.client(Person::Ignores, Elicitation::None);
            let first = t.connect(Some("alice"), waiting.clone(), false).await;
            let second = t.connect(Some("alice"), t.client(Person::Ignores, Elicitation::None), false).await;
            let progress_call = tokio::spawn(async move {
                let r = call(&first, "sleep", sleep(None)).await;
                first.cancel().await.ok();
                r
            });
            let id = waiting.first_progress_payment_id().await;
            tokio::time::sleep(Duration::from_millis(2500)).await;
            t.gate.store().pay_session(&id, None, tollgate::store::now_ms()).await.unwrap();
            let resubmitted = call(&second, "sleep", sleep(Some(&id))).await;
            let waited = progress_call.await.unwrap();
            second.cancel().await.ok();
            assert_eq!(resubmitted.is_error, Some(false), "{resubmitted:?}");
            assert_eq!(waited.is_error, Some(false), "{waited:?}");
            if payment_meta(&resubmitted).get("replayed").is_none() {
                assert!(payment_meta(&waited).get("replayed").is_some(), "ran once: {waited:?}");
                resubmit_ran_it = true;
                break;
            }
        }
        assert!(resubmit_ran_it, "the resubmit never claimed the run first");
        t.env.assert_ledger_ok().await;
    }
}

// ---------- dynamic tools ----------

/// `echo {text}` sent as a 2026-07-28 answer that accepts, with `state`
/// as its `requestState`.
async fn accepting_as_answer(
    client: &Client,
    state: &str,
    text: &str,
) -> rmcp::model::CallToolResult {
    let mut answer =
        CallToolRequestParams::new("echo").with_arguments(crate::harness::args(echo_args(text)));
    answer.request_state = Some(state.to_owned());
    answer.input_responses = Some(rmcp::model::InputResponses::from_iter([(
        "payment".to_owned(),
        json!({"action": "accept"}),
    )]));
    match client.call_tool_once(answer).await.unwrap() {
        CallToolResponse::Complete(r) => r,
        other => panic!("expected a result, got {other:?}"),
    }
}

on_both_backends! {
    #[tokio::test]
    async fn dynamic_confirm_tools_are_per_session_and_go_away_after_use() {
        let t = InProcess::new(&pricing("dynamic_tools", "")).await;
        let a_handler = t.client(Person::Ignores, Elicitation::None);
        let a = t.connect(Some("alice"), a_handler.clone(), false).await;
        let b = t
            .connect(
                Some("alice"),
                t.client(Person::Ignores, Elicitation::None),
                false,
            )
            .await;
        let before = a.list_all_tools().await.unwrap().len();

        let r = call(&a, "echo", echo_args("dyn")).await;
        assert_eq!(r.is_error, Some(false));
        let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
        let confirm = format!("confirm_{id}");
        assert_eq!(structured(&r)["next_step"], confirm.as_str());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            a_handler
                .list_changed
                .load(std::sync::atomic::Ordering::SeqCst),
            1
        );
        let names = |tools: Vec<rmcp::model::Tool>| {
            tools
                .into_iter()
                .map(|t| t.name.to_string())
                .collect::<Vec<_>>()
        };
        assert!(names(a.list_all_tools().await.unwrap()).contains(&confirm));
        assert!(
            !names(b.list_all_tools().await.unwrap()).contains(&confirm),
            "visible only to its session"
        );

        // Another session, same principal: mismatch.
        let r = call(&b, &confirm, json!({})).await;
        assert_eq!(error_code(&r), "payment_mismatch");
        // Unpaid: pending, and the tool stays.
        let r = call(&a, &confirm, json!({})).await;
        assert_eq!(error_code(&r), "payment_pending");
        assert!(names(a.list_all_tools().await.unwrap()).contains(&confirm));

        t.env.ok(&["sessions", "pay", &id]).await;
        // Nor by answering, as a 2026-07-28 client, a question it was never
        // asked: the payment id as `requestState` from another session.
        let modern = t
            .connect(
                Some("alice"),
                t.client(Person::Ignores, Elicitation::Form),
                true,
            )
            .await;
        let r = accepting_as_answer(&modern, &id, "dyn").await;
        assert_eq!(error_code(&r), "payment_mismatch", "{r:?}");
        modern.cancel().await.ok();
        assert_ran(&call(&a, &confirm, json!({})).await, "dyn");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            a_handler
                .list_changed
                .load(std::sync::atomic::Ordering::SeqCst),
            2
        );
        assert_eq!(
            a.list_all_tools().await.unwrap().len(),
            before,
            "removed after use"
        );

        // A payment cancelled at checkout takes its confirm tool off the
        // next list, long before its time is over: calling it could only
        // fail.
        let r = call(&a, "echo", echo_args("never")).await;
        let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
        let confirm = format!("confirm_{id}");
        assert!(names(a.list_all_tools().await.unwrap()).contains(&confirm));
        t.env.ok(&["sessions", "cancel", &id]).await;
        assert!(
            !names(a.list_all_tools().await.unwrap()).contains(&confirm),
            "a cancelled payment's confirm tool is not listed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            a_handler
                .list_changed
                .load(std::sync::atomic::Ordering::SeqCst),
            4,
            "offered, then removed"
        );
        a.cancel().await.ok();
        b.cancel().await.ok();
        t.env.assert_ledger_ok().await;
    }
}

/// How a dynamic confirm tool's payment ends outside its session.
enum Ended {
    DeclinedAtCheckout,
    Expired,
}

/// A confirm tool whose payment ends so is taken off its session's list
/// by upkeep, which tells the client, without the client listing first;
/// the intent then reads `status`, when given.
async fn upkeep_withdraws_the_confirm_tool_of_a_payment(ended: Ended, status: Option<&str>) {
    use std::sync::atomic::Ordering;
    let t = InProcess::new(&pricing("dynamic_tools", "instance_lease = \"1s\"\n")).await;
    let handler = t.client(Person::Ignores, Elicitation::None);
    let client = t.connect(Some("alice"), handler.clone(), false).await;
    let r = call(&client, "echo", echo_args("ended")).await;
    let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(handler.list_changed.load(Ordering::SeqCst), 1, "offered");
    match ended {
        Ended::DeclinedAtCheckout => {
            t.env.ok(&["sessions", "decline", &id]).await;
        }
        Ended::Expired => expire(&t, &id).await,
    }
    let mut told = false;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if handler.list_changed.load(Ordering::SeqCst) == 2 {
            told = true;
            break;
        }
    }
    assert!(told, "upkeep announced the withdrawal");
    let listed = tool_names(&client).await;
    assert!(!listed.contains(&format!("confirm_{id}")), "{listed:?}");
    if let Some(status) = status {
        let intent = t.gate.store().intent(&id).await.unwrap().expect("intent");
        assert_eq!(intent.status.as_str(), status);
    }
    client.cancel().await.ok();
    t.env.assert_ledger_ok().await;
}

on_both_backends! {
    #[tokio::test]
    async fn upkeep_withdraws_a_declined_payments_confirm_tool_and_says_so() {
        upkeep_withdraws_the_confirm_tool_of_a_payment(Ended::DeclinedAtCheckout, Some("declined")).await;
    }
}

on_both_backends! {
    #[tokio::test]
    async fn upkeep_withdraws_an_expired_payments_confirm_tool_and_says_so() {
        upkeep_withdraws_the_confirm_tool_of_a_payment(Ended::Expired, Some("expired")).await;
    }
}

on_both_backends! {
    /// A payment offered as a dynamic confirm tool is used through that
    /// tool, even by its own session: sent back as a 2026-07-28 answer's
    /// `requestState`, it answers `payment_mismatch` and does not run.
    #[tokio::test]
    async fn a_dynamic_payment_is_not_redeemed_as_an_answer_to_a_question_never_asked() {
        let t = InProcess::new(&pricing("dynamic_tools", "")).await;
        let client = t.connect(Some("alice"), t.client(Person::Ignores, Elicitation::Form), true).await;
        let r = call(&client, "echo", echo_args("dyn")).await;
        let id = structured(&r)["payment_id"].as_str().expect("a payment id").to_owned();
        assert_eq!(structured(&r)["next_step"], format!("confirm_{id}"));
        t.env.ok(&["sessions", "pay", &id]).await;
        let r = accepting_as_answer(&client, &id, "dyn").await;
        assert_eq!(error_code(&r), "payment_mismatch", "{r:?}");
        assert_ran(&call(&client, &format!("confirm_{id}"), json!({})).await, "dyn");
        client.cancel().await.ok();
        t.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    #[tokio::test]
    async fn a_paid_call_whose_tool_is_gone_is_refunded_not_left_running() {
        // Each mode's way of redeeming, with the tool gone from the catalog.
        for mode in ["dynamic_tools", "two_step", "resubmit"] {
            let t = InProcess::new(&pricing(mode, "")).await;
            t.env.topup("carol", "1.00").await;
            let a = t
                .connect(Some("alice"), t.client(Person::Ignores, Elicitation::None), false)
                .await;
            let r = call(&a, "echo", echo_args("gone")).await;
            let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
            t.env.ok(&["sessions", "pay", &id, "--from", "carol"]).await;
            assert_eq!(t.env.available("carol").await, "0.99");
            if mode != "two_step" {
                // While echo is served, there is no `confirm_echo_payment`
                // in this mode: it redeems nothing (and so bypasses no
                // session binding of a dynamic confirm tool).
                let other = t
                    .connect(Some("alice"), t.client(Person::Ignores, Elicitation::None), false)
                    .await;
                let confirm = rmcp::model::CallToolRequestParams::new("confirm_echo_payment")
                    .with_arguments(json!({"payment_id": id}).as_object().unwrap().clone());
                let r = other.call_tool(confirm).await;
                assert!(r.is_err(), "{mode}: {r:?}");
                let intent = t.gate.store().intent(&id).await.unwrap().expect("intent");
                assert_eq!(intent.status.as_str(), "awaiting_payment", "{mode}: not run");
                other.cancel().await.ok();
            }
            // As if an upstream had dropped the tool since the payment.
            let renamed = tollgate::testing::execute(
                &t.env.db,
                &format!("UPDATE intents SET tool = 'vanished' WHERE id = '{id}'"),
            )
            .await
            .unwrap();
            assert_eq!(renamed, 1);

            let r = match mode {
                "dynamic_tools" => call(&a, &format!("confirm_{id}"), json!({})).await,
                "two_step" => call(&a, "confirm_vanished_payment", json!({"payment_id": id})).await,
                _ => call(&a, "vanished", json!({"text": "gone", "payment_id": id})).await,
            };
            assert_eq!(error_code(&r), "tool_gone", "{mode}: {r:?}");
            assert_eq!(payment_meta(&r)["status"], "refunded");
            let intent = t.gate.store().intent(&id).await.unwrap().expect("intent");
            assert_eq!(intent.status.as_str(), "failed", "refunded, not left running");
            assert_eq!(t.env.available("carol").await, "1.00");
            // A name nobody serves, without a payment of it, is still unknown.
            let unknown = a
                .call_tool(rmcp::model::CallToolRequestParams::new("vanished"))
                .await;
            assert!(unknown.is_err(), "{unknown:?}");
            a.cancel().await.ok();
            t.env.assert_ledger_ok().await;
        }
    }
}

on_both_backends! {
    /// A paid intent this instance claimed and then dropped (the claim's
    /// answer lost, a settlement that failed, a background write that gave
    /// up) is refunded by recovery once it has sat a minute with no run
    /// under way here. It stayed `running`, its money in clearing and every
    /// retry told "in progress", until the process ended.
    #[tokio::test]
    async fn a_claimed_run_nobody_finishes_is_refunded_by_recovery() {
        use tollgate::store::{AccountRef, Funding, now_ms};
        let t = InProcess::new(&pricing("resubmit", "")).await;
        t.env.topup("carol", "1.00").await;
        let a = t
            .connect(Some("alice"), t.client(Person::Ignores, Elicitation::None), false)
            .await;
        let r = call(&a, "echo", echo_args("dropped")).await;
        let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
        t.env.ok(&["sessions", "pay", &id, "--from", "carol"]).await;
        // Claimed in this instance's name, as a redeem does, then dropped.
        let usd = tollgate::money::Currency::parse("USD").unwrap();
        let funding = Funding::InClearing { refund_to: Some(AccountRef::wallet("carol", &usd)) };
        assert!(t.gate.store().claim_paid_intent(&id, &funding).await.unwrap());
        let recovered = t.gate.recover_interrupted(now_ms()).await.unwrap();
        assert_eq!(recovered.runs_refunded, 0, "just claimed: perhaps still starting");
        tollgate::testing::execute(
            &t.env.db,
            &format!("UPDATE intents SET updated_at = updated_at - 120000 WHERE id = '{id}'"),
        )
        .await
        .unwrap();
        // A retry waiting on the run (told "in progress" for as long as it
        // keeps retrying) does not keep the dropped run from recovery.
        let retry = call(&a, "echo", json!({"text": "dropped", "payment_id": id}));
        let recover = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            t.gate.recover_interrupted(now_ms()).await.unwrap()
        };
        let (r, recovered) = tokio::join!(retry, recover);
        assert_eq!(recovered.runs_refunded, 1);
        let intent = t.gate.store().intent(&id).await.unwrap().expect("intent");
        assert_eq!(intent.status.as_str(), "failed", "refunded, never run");
        assert_eq!(t.env.available("carol").await, "1.00");
        assert_eq!(error_code(&r), "run_interrupted", "{r:?}");
        assert_eq!(payment_meta(&r)["status"], "refunded");
        a.cancel().await.ok();
        t.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    #[tokio::test]
    async fn dynamic_confirm_tools_expire_with_their_intent() {
        let t = InProcess::new(
            &pricing("dynamic_tools", "").replace("payment_ttl = \"15m\"", "payment_ttl = \"1s\""),
        )
        .await;
        let a = t
            .connect(None, t.client(Person::Ignores, Elicitation::None), false)
            .await;
        let before = a.list_all_tools().await.unwrap().len();
        let mut ids = Vec::new();
        for _ in 0..3 {
            let r = call(&a, "echo", echo_args("x")).await;
            ids.push(structured(&r)["payment_id"].as_str().unwrap().to_owned());
        }
        assert_eq!(a.list_all_tools().await.unwrap().len(), before + 3);
        // One is paid in time, and its caller comes back after the time.
        t.env.ok(&["sessions", "pay", &ids[0]]).await;
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let listed = tool_names(&a).await;
        let paid = format!("confirm_{}", ids[0]);
        assert_eq!(
            listed.len(),
            before + 1,
            "the unpaid expired tools are gone: {listed:?}"
        );
        assert!(listed.contains(&paid), "the paid one stays: {listed:?}");
        assert_ran(&call(&a, &paid, json!({})).await, "x");
        assert_eq!(a.list_all_tools().await.unwrap().len(), before, "used");
        a.cancel().await.ok();
        t.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    #[tokio::test]
    async fn a_2026_session_hears_about_dynamic_tools_on_its_listen_stream() {
        let t = InProcess::new(&pricing("dynamic_tools", "")).await;
        let client = t
            .connect(None, t.client(Person::Ignores, Elicitation::None), true)
            .await;
        let mut sub = client
            .peer()
            .listen(SubscriptionFilter::builder().tools_list_changed().build())
            .await
            .unwrap();
        assert_eq!(sub.acknowledged().tools_list_changed, Some(true));
        let r = call(&client, "echo", echo_args("listen")).await;
        let confirm = structured(&r)["next_step"].as_str().unwrap().to_owned();
        let n = tokio::time::timeout(Duration::from_secs(2), sub.next())
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(n, Some(ServerNotification::ToolListChangedNotification(_))),
            "{n:?}"
        );
        let tools = client.list_all_tools().await.unwrap();
        assert!(tools.iter().any(|t| t.name == confirm));
        sub.cancel().await.ok();
        client.cancel().await.ok();
        t.env.assert_ledger_ok().await;
    }
}

// ---------- approval above the threshold ----------

fn approval_pricing() -> String {
    pricing("resubmit", "").replace(
        "approval_threshold = \"5.00\"",
        "approval_threshold = \"0.02\"",
    )
}

on_both_backends! {
    #[tokio::test]
    async fn a_charge_above_the_threshold_needs_a_yes() {
        for modern in [false, true] {
            let t = InProcess::new(&approval_pricing()).await;
            t.env.topup("alice", "1.00").await;
            let handler = t.client(Person::Approves, Elicitation::Form);
            let client = t.connect(Some("alice"), handler.clone(), modern).await;
            // Under the threshold: auto-approved, no prompt.
            assert_ran(&call(&client, "echo", echo_args("small")).await, "small");
            assert_eq!(handler.prompt_count(), 0);
            // Above it: asked, approved, charged to the wallet.
            let r = call(&client, "divide", json!({"a": 1, "b": 2})).await;
            assert_eq!(structured(&r), json!({"quotient": 0.5}), "{r:?}");
            assert_eq!(payment_meta(&r)["status"], "paid");
            match &handler.prompts.lock().unwrap()[0] {
                ElicitRequestParams::FormElicitationParams { message, .. } => assert!(
                    message.contains("Approve charging 0.05 USD to wallet alice for tool `divide`"),
                    "{message}"
                ),
                other => panic!("expected an approval form, got {other:?}"),
            }
            assert_eq!(t.env.available("alice").await, "0.94");
            client.cancel().await.ok();
            t.env.assert_ledger_ok().await;
        }
    }
}

on_both_backends! {
    #[tokio::test]
    async fn a_declined_approval_charges_nothing() {
        for modern in [false, true] {
            let t = InProcess::new(&approval_pricing()).await;
            t.env.topup("alice", "1.00").await;
            let client = t
                .connect(
                    Some("alice"),
                    t.client(Person::Declines, Elicitation::Form),
                    modern,
                )
                .await;
            let r = call(&client, "divide", json!({"a": 1, "b": 2})).await;
            assert_eq!(error_code(&r), "payment_declined");
            assert_eq!(t.env.available("alice").await, "1.00");
            client.cancel().await.ok();
            t.env.assert_ledger_ok().await;
        }
    }
}

/// `divide {a: 1, b: 2}` from a 2026-07-28 client: asked (`None`), or
/// sent back with `state` as its `requestState` and `answer` as its
/// answer.
async fn divide_answering(
    client: &Client,
    answer: Option<(&str, serde_json::Value)>,
) -> CallToolResponse {
    let mut params = CallToolRequestParams::new("divide")
        .with_arguments(crate::harness::args(json!({"a": 1, "b": 2})));
    if let Some((state, answer)) = answer {
        params.request_state = Some(state.to_owned());
        params.input_responses = Some(rmcp::model::InputResponses::from_iter([(
            "payment".to_owned(),
            answer,
        )]));
    }
    client.call_tool_once(params).await.unwrap()
}

fn complete(r: CallToolResponse) -> rmcp::model::CallToolResult {
    match r {
        CallToolResponse::Complete(r) => r,
        other => panic!("expected a result, got {other:?}"),
    }
}

on_both_backends! {
    /// A yes that its wallet's limit refuses (lowered since the approval was
    /// asked) ends the payment: nothing charged, and nothing left payable.
    /// A no repeated after a yes ran the call gets its stored result.
    #[tokio::test]
    async fn an_approvals_answer_is_final_whatever_comes_after_it() {
        let t = InProcess::new(&approval_pricing()).await;
        t.env.topup("alice", "1.00").await;
        let client = t
            .connect(Some("alice"), t.client(Person::Ignores, Elicitation::Form), true)
            .await;
        let yes = json!({"action": "accept", "content": {"approve": true}});
        let asked = async || match divide_answering(&client, None).await {
            CallToolResponse::InputRequired(ir) => ir.request_state.expect("a request state"),
            other => panic!("expected input_required, got {other:?}"),
        };

        let id = asked().await;
        t.env.ok(&["wallet", "limits", "alice", "--per-call", "0.01"]).await;
        let r = complete(divide_answering(&client, Some((&id, yes.clone()))).await);
        assert_eq!(error_code(&r), "limit_exceeded", "{r:?}");
        assert_eq!(t.env.available("alice").await, "1.00");
        let intent = t.gate.store().intent(&id).await.unwrap().expect("intent");
        assert_eq!(intent.status.as_str(), "cancelled");
        assert_eq!(session_status(&t, &id).await, "cancelled");
        let paid = t.env.cli(&["sessions", "pay", &id, "--from", "alice"]).await;
        assert!(!paid.status.success(), "no longer payable");

        t.env.ok(&["wallet", "limits", "alice", "--per-call", "none"]).await;
        let id = asked().await;
        let r = complete(divide_answering(&client, Some((&id, yes))).await);
        assert_eq!(structured(&r), json!({"quotient": 0.5}), "{r:?}");
        for no in [json!({"action": "decline"}), json!({"action": "cancel"})] {
            let r = complete(divide_answering(&client, Some((&id, no))).await);
            assert_eq!(structured(&r), json!({"quotient": 0.5}), "{r:?}");
            assert_eq!(payment_meta(&r)["replayed"], true, "{r:?}");
        }
        assert_eq!(t.env.available("alice").await, "0.95", "charged once");
        client.cancel().await.ok();
        t.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    /// An approval sent to the checkout page (its client answers no
    /// prompts) is redeemed in its tool's mode: its id sent back as a
    /// 2026-07-28 answer, even by its own session, is not an answer.
    #[tokio::test]
    async fn an_approval_never_asked_by_a_prompt_is_not_answered_by_one() {
        let t = InProcess::new(&approval_pricing()).await;
        t.env.topup("alice", "1.00").await;
        let client = t
            .connect(Some("alice"), t.client(Person::Ignores, Elicitation::None), true)
            .await;
        let r = complete(divide_answering(&client, None).await);
        assert_eq!(error_code(&r), "payment_required", "{r:?}");
        let id = structured(&r)["payment_id"].as_str().expect("a payment id").to_owned();
        t.env.ok(&["sessions", "pay", &id, "--from", "alice"]).await;
        let r = complete(divide_answering(&client, Some((&id, json!({"action": "accept"})))).await);
        assert_eq!(error_code(&r), "payment_mismatch", "{r:?}");
        let r = call(&client, "divide", json!({"a": 1, "b": 2, "payment_id": id})).await;
        assert_eq!(structured(&r), json!({"quotient": 0.5}), "{r:?}");
        client.cancel().await.ok();
        t.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    /// Accepting a URL prompt means "I will open the page", not "yes": the
    /// approval is given at the checkout page, with the wallet's key.
    #[tokio::test]
    async fn accepting_an_approvals_url_prompt_is_not_a_yes() {
        for modern in [false, true] {
            let t = InProcess::new(&approval_pricing()).await;
            t.env.topup("alice", "1.00").await;
            let handler = t.client(Person::Approves, Elicitation::UrlOnly);
            let client = t.connect(Some("alice"), handler.clone(), modern).await;
            let r = call(&client, "divide", json!({"a": 1, "b": 2})).await;
            assert_eq!(error_code(&r), "payment_pending", "{modern}: {r:?}");
            assert!(matches!(handler.prompts.lock().unwrap()[0],
                             ElicitRequestParams::UrlElicitationParams { .. }), "a URL prompt");
            assert_eq!(handler.prompt_count(), 1);
            assert_eq!(t.env.available("alice").await, "1.00", "nothing charged on an accept");
            let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
            t.env.ok(&["sessions", "pay", &id, "--from", "alice"]).await;
            let r = call(&client, "divide", json!({"a": 1, "b": 2, "payment_id": id})).await;
            assert_eq!(payment_meta(&r)["status"], "paid", "{modern}: {r:?}");
            assert_eq!(t.env.available("alice").await, "0.95");
            client.cancel().await.ok();
            t.env.assert_ledger_ok().await;
        }
    }
}

on_both_backends! {
    /// An approval prompt left unanswered tells the caller how to use the
    /// payment in its tool's own mode, and that way works.
    #[tokio::test]
    async fn an_unanswered_approval_says_how_to_confirm_in_the_tools_mode() {
        for mode in ["two_step", "dynamic_tools"] {
            let t = InProcess::new(&pricing(mode, "").replace(
                "approval_threshold = \"5.00\"",
                "approval_threshold = \"0.02\"",
            ))
            .await;
            t.env.topup("alice", "1.00").await;
            let client = t
                .connect(Some("alice"), t.client(Person::Ignores, Elicitation::Form), false)
                .await;
            let r = call(&client, "divide", json!({"a": 1, "b": 2})).await;
            assert_eq!(error_code(&r), "payment_timeout", "{mode}: {r:?}");
            let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
            t.env.ok(&["sessions", "pay", &id, "--from", "alice"]).await;
            let r = if mode == "two_step" {
                assert!(text(&r).contains(&format!("call `confirm_divide_payment` with payment_id \"{id}\"")), "{}", text(&r));
                call(&client, "confirm_divide_payment", json!({"payment_id": id})).await
            } else {
                assert!(text(&r).contains(&format!("call `confirm_{id}` (it takes no arguments)")), "{}", text(&r));
                call(&client, &format!("confirm_{id}"), json!({})).await
            };
            assert_eq!(structured(&r), json!({"quotient": 0.5}), "{mode}: {r:?}");
            assert_eq!(payment_meta(&r)["status"], "paid");
            assert_eq!(t.env.available("alice").await, "0.95");
            client.cancel().await.ok();
            t.env.assert_ledger_ok().await;
        }
    }
}

on_both_backends! {
    #[tokio::test]
    async fn without_elicitation_an_approval_goes_through_the_checkout_session() {
        let t = InProcess::new(&approval_pricing()).await;
        t.env.topup("alice", "1.00").await;
        let client = t
            .connect(
                Some("alice"),
                t.client(Person::Ignores, Elicitation::None),
                false,
            )
            .await;
        let r = call(&client, "divide", json!({"a": 1, "b": 2})).await;
        assert_eq!(error_code(&r), "payment_required");
        assert!(text(&r).contains("Approval required"), "{}", text(&r));
        assert_eq!(
            t.env.available("alice").await,
            "1.00",
            "nothing charged without a yes"
        );
        let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
        t.env.ok(&["sessions", "pay", &id, "--from", "alice"]).await;
        let r = call(&client, "divide", json!({"a": 1, "b": 2, "payment_id": id})).await;
        assert_eq!(payment_meta(&r)["status"], "paid");
        assert_eq!(t.env.available("alice").await, "0.95");
        client.cancel().await.ok();
        t.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    #[tokio::test]
    async fn a_cancelled_call_stops_waiting_and_leaves_the_intent_payable() {
        use rmcp::{
            model::{ClientRequest, Request},
            service::PeerRequestOptions,
        };
        let t =
            InProcess::new(&pricing("progress", "").replace("progress = \"1s\"", "progress = \"30s\""))
                .await;
        let handler = t.client(Person::Ignores, Elicitation::None);
        let client = t.connect(None, handler.clone(), false).await;
        let request = ClientRequest::CallToolRequest(Request::new(
            CallToolRequestParams::new("echo")
                .with_arguments(crate::harness::args(echo_args("cancelled"))),
        ));
        let handle = client
            .send_cancellable_request(request, PeerRequestOptions::no_options())
            .await
            .unwrap();
        let id = handler.first_progress_payment_id().await;
        handle
            .cancel(Some("the user gave up".into()))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let heard = handler.progress.lock().unwrap().len();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            handler.progress.lock().unwrap().len(),
            heard,
            "no more heartbeats: the wait ended"
        );
        let intent = t.gate.store().intent(&id).await.unwrap().unwrap();
        assert_eq!(intent.status.as_str(), "awaiting_payment", "still payable");

        t.env.ok(&["sessions", "pay", &id]).await;
        let r = call(
            &client,
            "echo",
            json!({"text": "cancelled", "payment_id": id}),
        )
        .await;
        assert_ran(&r, "cancelled");
        client.cancel().await.ok();
        t.env.assert_ledger_ok().await;
    }
}

// ---------- a payment system that fails for a moment ----------

on_both_backends! {
    /// A confirm waiting on a provider that never answers is cut short when
    /// tollgate stops: answered at once, its payment left payable. (It
    /// waited out the provider's own timeouts, past the stop's grace.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_check_on_a_hung_provider_ends_when_tollgate_stops() {
        let t = crate::inproc::with_provider(&pricing("two_step", ""), |config, store| {
            let hangs = crate::inproc::Wrapped::new(
                tollgate::app::provider_for(config, store).expect("provider"),
            );
            hangs.hanging_checks.store(1, std::sync::atomic::Ordering::SeqCst);
            std::sync::Arc::new(hangs)
        })
        .await;
        let client = t.connect(None, t.client(Person::Ignores, Elicitation::None), false).await;
        let r = call(&client, "echo", echo_args("later")).await;
        let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
        let peer = client.peer().clone();
        let confirm = tokio::spawn(async move {
            let params = rmcp::model::CallToolRequestParams::new("confirm_echo_payment")
                .with_arguments(json!({"payment_id": id}).as_object().unwrap().clone());
            peer.call_tool(params).await
        });
        // The confirm is asking the hung provider; then tollgate stops.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        t.gate.close();
        let r = tokio::time::timeout(std::time::Duration::from_secs(20), confirm)
            .await
            .expect("the confirm waited on the hung provider")
            .unwrap()
            .unwrap();
        assert_eq!(error_code(&r), "payment_pending", "{r:?}");
        assert!(text(&r).contains("was not checked (tollgate is shutting down)"), "{}", text(&r));
        client.cancel().await.ok();
        t.env.assert_ledger_ok().await;
    }
}

/// An in-process server whose provider fails its first `failures` checks.
async fn with_flaky_provider(pricing_text: &str, failures: u32) -> InProcess {
    crate::inproc::with_provider(pricing_text, |config, store| {
        let flaky = crate::inproc::Wrapped::new(
            tollgate::app::provider_for(config, store).expect("provider"),
        );
        flaky
            .failing_checks
            .store(failures, std::sync::atomic::Ordering::SeqCst);
        std::sync::Arc::new(flaky)
    })
    .await
}

on_both_backends! {
    /// A call waiting for its payment (progress, an accepted prompt) waits
    /// on through a moment when the provider cannot be reached, and runs
    /// once paid. It used to end at the first failed check with "nothing
    /// was charged", while the person went on to pay.
    #[tokio::test]
    async fn a_waiting_call_waits_through_a_provider_that_fails_for_a_moment() {
        let t = with_flaky_provider(&pricing("progress", ""), 3).await;
        let handler = t.client(Person::PaysAfterProgress(3), Elicitation::None);
        let client = t.connect(None, handler, false).await;
        assert_ran(&call(&client, "echo", echo_args("through")).await, "through");
        client.cancel().await.ok();
        t.env.assert_ledger_ok().await;

        let t = with_flaky_provider(&pricing("elicitation", ""), 2).await;
        let client = t.connect(None, t.client(Person::PaysAndAccepts, Elicitation::Form), false).await;
        assert_ran(&call(&client, "echo", echo_args("accepted")).await, "accepted");
        client.cancel().await.ok();
        t.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    /// When the provider stays unreachable, the answer names the payment and
    /// how to redeem it: a payment made stands. Unpaid at the end of a wait,
    /// the answer says how to redeem too.
    #[tokio::test]
    async fn an_unreachable_provider_or_an_unpaid_accept_says_how_to_redeem() {
        let t = with_flaky_provider(&pricing("elicitation", ""), u32::MAX).await;
        let client = t.connect(None, t.client(Person::PaysAndAccepts, Elicitation::Form), false).await;
        let r = call(&client, "echo", echo_args("unreachable")).await;
        assert_eq!(error_code(&r), "payment_system_unavailable", "{r:?}");
        let id = structured(&r)["payment_id"].as_str().expect("the payment id").to_owned();
        let hint = format!("call `echo` again with the same arguments plus \"payment_id\": \"{id}\"");
        assert!(text(&r).contains("A payment made stands") && text(&r).contains(&hint), "{}", text(&r));
        client.cancel().await.ok();
        // The same in progress mode. (It said "Stopped waiting after 1s",
        // as if nobody had paid.)
        let t = with_flaky_provider(&pricing("progress", ""), u32::MAX).await;
        let client = t.connect(None, t.client(Person::Ignores, Elicitation::None), false).await;
        let r = call(&client, "echo", echo_args("unreachable")).await;
        assert_eq!(error_code(&r), "payment_system_unavailable", "{r:?}");
        assert!(text(&r).contains("A payment made stands"), "{}", text(&r));
        client.cancel().await.ok();

        let t = InProcess::new(&pricing("elicitation", "")).await;
        let client = t.connect(None, t.client(Person::AcceptsUnpaid, Elicitation::Url), false).await;
        let r = call(&client, "echo", echo_args("later")).await;
        assert_eq!(error_code(&r), "payment_pending", "{r:?}");
        let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
        let hint = format!("call `echo` again with the same arguments plus \"payment_id\": \"{id}\"");
        assert!(text(&r).contains(&hint), "{}", text(&r));
        client.cancel().await.ok();
        t.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    /// A paid slow-path run is logged by its payment id, worded as the
    /// fast path's so that one grep finds every charge: charged, or
    /// refunded and why.
    #[tokio::test]
    async fn a_slow_path_run_logs_its_charge_or_refund_by_payment_id() {
        let (log, _logging) = tollgate::testing::LogCapture::start();
        let t = InProcess::new(&pricing("two_step", "")).await;
        t.env.topup("carol", "1.00").await;
        let client = t.connect(Some("alice"), t.client(Person::Ignores, Elicitation::None), false).await;
        let mut ids = Vec::new();
        for (tool, args) in [("echo", echo_args("logged")), ("divide", json!({"a": 1, "b": 0}))] {
            let r = call(&client, tool, args).await;
            let id = structured(&r)["payment_id"].as_str().expect("a payment id").to_owned();
            t.env.ok(&["sessions", "pay", &id, "--from", "carol"]).await;
            let confirm = format!("confirm_{tool}_payment");
            call(&client, &confirm, json!({"payment_id": id})).await;
            ids.push(id);
        }
        let charged = log.lines_of(&ids[0]).join("\n");
        assert!(charged.contains("charged (slow path, two_step)"), "{}", log.text());
        assert!(charged.contains("amount=\"0.01\"") && charged.contains("principal=\"alice\""), "{charged}");
        let refunded = log.lines_of(&ids[1]).join("\n");
        assert!(refunded.contains("refunded: its tool failed (slow path, two_step)"), "{}", log.text());
        assert!(!refunded.contains("charged"), "{refunded}");
        assert_eq!(t.env.available("carol").await, "0.99");
        client.cancel().await.ok();
        t.env.assert_ledger_ok().await;
    }
}
