//! Plain JSON-RPC over stdio, as a minimal client would write it: no
//! progress token, no capabilities. (rmcp's own client always sends a
//! progress token, so the fallbacks for clients without one are checked
//! here, on the wire.)

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::harness::{EXE, Env};

struct Wire {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Wire {
    async fn start(env: &Env) -> Self {
        let mut child = tokio::process::Command::new(EXE)
            .arg("serve")
            .env("TOLLGATE_CONFIG", &env.config)
            .env("TOLLGATE_DB", &env.db)
            .env("TOLLGATE_RECEIPT_KEY", &env.key)
            .env("TOLLGATE_LOG", "tollgate=warn")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn");
        let stdin = child.stdin.take().expect("stdin");
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut wire = Self {
            child,
            stdin,
            lines,
        };
        let init = wire
            .request(
                0,
                "initialize",
                json!({"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "wire", "version": "1"}}),
            )
            .await;
        assert_eq!(init["result"]["serverInfo"]["name"], "tollgate");
        wire.send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .await;
        wire
    }

    async fn send(&mut self, message: Value) {
        let mut line = message.to_string();
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).await.expect("write");
    }

    /// Sends a request and returns its response, skipping notifications.
    async fn request(&mut self, id: u64, method: &str, params: Value) -> Value {
        self.send(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
            .await;
        loop {
            let line = self
                .lines
                .next_line()
                .await
                .expect("read")
                .expect("server closed stdout");
            let message: Value = serde_json::from_str(&line).expect("stdout carries only JSON-RPC");
            if message["id"] == json!(id) {
                return message;
            }
        }
    }
}

on_both_backends! {
    #[tokio::test]
    async fn without_a_progress_token_or_elicitation_the_interactive_modes_resubmit() {
        for mode in ["progress", "elicitation", "auto"] {
            let env = Env::new(mode);
            let mut wire = Wire::start(&env).await;
            let response = wire
                .request(
                    1,
                    "tools/call",
                    json!({"name": "echo", "arguments": {"text": "plain"}}),
                )
                .await;
            let result = &response["result"];
            assert_eq!(result["isError"], true, "{mode}: {response}");
            assert_eq!(
                result["structuredContent"]["error"], "payment_required",
                "{mode}"
            );
            let id = result["structuredContent"]["payment_id"]
                .as_str()
                .unwrap()
                .to_owned();

            env.ok(&["sessions", "pay", &id]).await;
            let response = wire
                .request(
                    2,
                    "tools/call",
                    json!({"name": "echo", "arguments": {"text": "plain", "payment_id": id}}),
                )
                .await;
            assert_eq!(
                response["result"]["content"][0]["text"], "plain",
                "{mode}: {response}"
            );
            assert_eq!(
                response["result"]["_meta"]["tollgate/payment"]["status"],
                "paid"
            );
            wire.child.kill().await.ok();
            env.assert_ledger_ok().await;
        }
    }
}
