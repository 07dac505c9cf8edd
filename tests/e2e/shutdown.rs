//! `tollgate serve --http` as a real process: it stops cleanly on SIGTERM,
//! ending calls in flight without leaving anything half-charged.

use std::time::Duration;

use rmcp::{
    ServiceExt,
    model::{CallToolRequestParams, ClientRequest, Request},
    service::PeerRequestOptions,
    transport::{
        StreamableHttpClientTransport, streamable_http_client::StreamableHttpClientTransportConfig,
    },
};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::harness::{EXE, Env, args, echo_args};

on_both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sigterm_stops_the_service_and_leaves_nothing_half_charged() {
        let pricing = crate::harness::pricing("progress", "")
            .replace("price = \"0.01\"", "price = \"0.01\"\nmode = \"resubmit\"");
        let env = Env::with_pricing(&pricing);
        env.topup("hal", "1.00").await;
        let key = env
            .ok(&["keys", "create", "--principal", "hal", "--scope", "mcp"])
            .await
            .trim()
            .to_owned();
        let anon_key = env
            .ok(&["keys", "create", "--principal", "ivy", "--scope", "mcp"])
            .await
            .trim()
            .to_owned();

        let mut child = tokio::process::Command::new(EXE)
            .args(["serve", "--http", "127.0.0.1:0"])
            .env("TOLLGATE_CONFIG", &env.config)
            .env("TOLLGATE_DB", &env.db)
            .env("TOLLGATE_RECEIPT_KEY", &env.key)
            .env("TOLLGATE_LOG", "tollgate=info")
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn");
        let mut stderr = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let base = loop {
            let line = stderr
                .next_line()
                .await
                .expect("read")
                .expect("server exited early");
            if let Some(url) = line.strip_prefix("listening on ") {
                break url.to_owned();
            }
        };
        tokio::spawn(async move { while let Ok(Some(_)) = stderr.next_line().await {} });

        let connect = |key: String| {
            let transport = StreamableHttpClientTransport::from_config(
                StreamableHttpClientTransportConfig::with_uri(format!("{base}/mcp")).auth_header(key),
            );
            ().serve(transport)
        };
        let paying = connect(key).await.expect("connect");
        let r = paying
            .call_tool(CallToolRequestParams::new("echo").with_arguments(args(echo_args("before"))))
            .await
            .expect("call");
        assert_eq!(crate::harness::payment_meta(&r)["status"], "paid");

        // A progress-mode call waiting for a payment when the signal comes.
        let waiting = connect(anon_key).await.expect("connect");
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

        let pid = child.id().expect("pid").to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(status.success());
        let exited = tokio::time::timeout(Duration::from_secs(15), child.wait()).await;
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
