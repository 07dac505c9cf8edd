//! `tollgate serve --http` as a real process: it stops cleanly on SIGTERM,
//! ending calls in flight without leaving anything half-charged.

use std::time::Duration;

use rmcp::{
    model::{CallToolRequestParams, ClientRequest, Request},
    service::PeerRequestOptions,
};

use crate::harness::{Env, args, echo_args};

on_both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sigterm_stops_the_service_and_leaves_nothing_half_charged() {
        let pricing = crate::harness::pricing("progress", "")
            .replace("price = \"0.01\"", "price = \"0.01\"\nmode = \"resubmit\"");
        let env = Env::with_pricing(&pricing);
        env.topup("hal", "1.00").await;
        let key = env.mcp_key("hal").await;
        let anon_key = env.mcp_key("ivy").await;

        let mut served = env.serve_http().await;
        let paying = served.mcp(&key).await;
        let r = paying
            .call_tool(CallToolRequestParams::new("echo").with_arguments(args(echo_args("before"))))
            .await
            .expect("call");
        assert_eq!(crate::harness::payment_meta(&r)["status"], "paid");

        // A progress-mode call waiting for a payment when the signal comes.
        let waiting = served.mcp(&anon_key).await;
        let _in_flight = waiting
            .send_cancellable_request(
                ClientRequest::CallToolRequest(Request::new(
                    CallToolRequestParams::new("divide")
                        .with_arguments(args(serde_json::json!({"a": 1, "b": 1}))),
                )),
                PeerRequestOptions::no_options(),
            )
            .await
            .expect("send");
        tokio::time::sleep(Duration::from_millis(300)).await;

        let pid = served.child.id().expect("pid").to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(status.success());
        let exited = tokio::time::timeout(Duration::from_secs(15), served.child.wait()).await;
        let exit = exited
            .expect("stopped within the grace period")
            .expect("wait");
        assert!(exit.success(), "clean exit, got {exit:?}");

        // Nothing half-charged: the paid call is in the ledger, no hold is open,
        // the waiting intent is still payable.
        env.assert_ledger_ok().await;
        assert_eq!(env.available("hal").await, "0.99");
        let (_, held, _) = env.balance("hal").await;
        assert_eq!(held, "0.00");
        let sessions = env.ok(&["sessions", "list"]).await;
        assert!(
            sessions.lines().any(|l| l.contains("pending")),
            "{sessions}"
        );
    }
}

/// Prices the demo `sleep` tool at 0.01, on top of `echo` and `divide`.
fn pricing_with_sleep() -> String {
    crate::harness::pricing("two_step", "") + "\n[[tools]]\nname = \"sleep\"\nprice = \"0.01\"\n"
}

on_both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_running_when_sigterm_comes_finishes_answers_and_is_charged_once() {
        let env = Env::with_pricing(&pricing_with_sleep());
        env.topup("hal", "1.00").await;
        let key = env.mcp_key("hal").await;
        let mut served = env.serve_http().await;
        let client = served.mcp(&key).await;
        let running = tokio::spawn(async move {
            let r = client
                .call_tool(
                    CallToolRequestParams::new("sleep")
                        .with_arguments(args(serde_json::json!({"ms": 1500}))),
                )
                .await;
            (r, client)
        });
        tokio::time::sleep(Duration::from_millis(400)).await;
        let pid = served.child.id().expect("pid").to_string();
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(killed.success());
        // While it finishes the call, it tells load balancers it is stopping.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let health = reqwest::get(format!("{}/healthz", served.base))
            .await
            .expect("healthz");
        assert_eq!(health.status().as_u16(), 503);
        assert!(health.text().await.unwrap_or_default().contains("stopping"));

        let (answer, _client) = running.await.expect("join");
        let answer = answer.expect("the running call answers before the service stops");
        assert_eq!(crate::harness::payment_meta(&answer)["status"], "paid");
        let exit = tokio::time::timeout(Duration::from_secs(15), served.child.wait())
            .await
            .expect("stopped once the call was done")
            .expect("wait");
        assert!(exit.success(), "clean exit, got {exit:?}");
        assert_eq!(env.available("hal").await, "0.99", "charged once");
        let (_, held, _) = env.balance("hal").await;
        assert_eq!(held, "0.00", "no hold left open");
        env.assert_ledger_ok().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_path_call_its_client_cancels_is_not_charged() {
    use crate::inproc::{Elicitation, InProcess, Person};

    let t = InProcess::new(&pricing_with_sleep()).await;
    t.env.topup("kim", "1.00").await;
    let handler = t.client(Person::Ignores, Elicitation::None);
    let client = t.connect(Some("kim"), handler, false).await;
    let handle = client
        .send_cancellable_request(
            ClientRequest::CallToolRequest(Request::new(
                CallToolRequestParams::new("sleep")
                    .with_arguments(args(serde_json::json!({"ms": 600}))),
            )),
            PeerRequestOptions::no_options(),
        )
        .await
        .expect("send");
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (_, held, _) = t.env.balance("kim").await;
    assert_eq!(held, "0.01", "the call is under way on its hold");
    handle
        .cancel(Some("the user gave up".into()))
        .await
        .expect("cancel");
    // The tool runs on to its end; then the hold is released, not captured.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(t.env.available("kim").await, "1.00", "nothing charged");
    let (_, held, _) = t.env.balance("kim").await;
    assert_eq!(held, "0.00");
    let statement = t.env.ok(&["wallet", "statement", "kim"]).await;
    assert!(!statement.contains("capture"), "{statement}");
    client.cancel().await.ok();
    t.env.assert_ledger_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_stdio_sigterm_lets_the_running_call_answer_and_turns_new_ones_away() {
    let env = Env::with_pricing(&pricing_with_sleep());
    env.topup("max", "1.00").await;
    let (client, pid) = env.client_and_pid(Some("max"), &[]).await;
    let client = std::sync::Arc::new(client);
    let running = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .call_tool(
                    CallToolRequestParams::new("sleep")
                        .with_arguments(args(serde_json::json!({"ms": 1200}))),
                )
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let late = client
        .call_tool(CallToolRequestParams::new("echo").with_arguments(args(echo_args("late"))))
        .await
        .expect_err("a new call while stopping is turned away");
    assert!(late.to_string().contains("shutting down"), "{late}");

    let answer = running
        .await
        .expect("join")
        .expect("the running call answers");
    assert_eq!(crate::harness::payment_meta(&answer)["status"], "paid");
    assert_eq!(env.available("max").await, "0.99", "charged once");
    let (_, held, _) = env.balance("max").await;
    assert_eq!(held, "0.00", "no hold left open");
    env.assert_ledger_ok().await;
}
