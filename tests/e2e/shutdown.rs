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
