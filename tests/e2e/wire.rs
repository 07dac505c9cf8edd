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
        Self::start_as(env, None).await
    }

    async fn start_as(env: &Env, payer: Option<&str>) -> Self {
        let mut command = tokio::process::Command::new(EXE);
        command.arg("serve");
        if let Some(payer) = payer {
            command.args(["--payer", payer]);
        }
        let mut child = command
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

impl Wire {
    async fn send_raw(&mut self, line: &[u8]) {
        self.stdin.write_all(line).await.expect("write");
        self.stdin.write_all(b"\n").await.expect("write");
    }

    async fn next(&mut self) -> Value {
        let line = tokio::time::timeout(std::time::Duration::from_secs(10), self.lines.next_line())
            .await
            .expect("an answer within 10s")
            .expect("read")
            .expect("server closed stdout");
        serde_json::from_str(&line).expect("stdout carries only JSON-RPC")
    }

    /// Sends a bad line and returns the error it got: (code, id).
    async fn refused(&mut self, line: &[u8]) -> (i64, Value) {
        self.send_raw(line).await;
        let answer = self.next().await;
        let code = answer["error"]["code"].as_i64();
        (
            code.unwrap_or_else(|| panic!("expected an error, got {answer}")),
            answer["id"].clone(),
        )
    }

    async fn call(&mut self, id: u64, name: &str, arguments: Value) -> Value {
        let answer = self
            .request(
                id,
                "tools/call",
                json!({"name": name, "arguments": arguments}),
            )
            .await;
        answer["result"].clone()
    }
}

on_both_backends! {
    #[tokio::test]
    async fn hostile_lines_get_a_clear_error_and_change_nothing() {
        let env = Env::with_pricing(&crate::harness::pricing("resubmit", "max_message_bytes = 4096"));
        env.topup("alice", "1.00").await;
        let mut wire = Wire::start_as(&env, Some("alice")).await;

        assert_eq!(wire.refused(b"this is not json").await, (-32700, Value::Null));
        assert_eq!(wire.refused(b"\xff\xfe{\"id\":1}").await, (-32700, Value::Null));
        assert_eq!(wire.refused(b"42").await, (-32600, Value::Null));
        // A request cut short still gets its answer, by its id.
        assert_eq!(wire.refused(br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","#).await, (-32700, json!(7)));
        let deep = format!(
            r#"{{"jsonrpc":"2.0","id":8,"method":"tools/call","params":{{"name":"echo","arguments":{{"text":{}1{}}}}}}}"#,
            "[".repeat(500),
            "]".repeat(500)
        );
        assert_eq!(wire.refused(deep.as_bytes()).await, (-32600, json!(8)));
        let oversized = format!(
            r#"{{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{{"name":"echo","arguments":{{"text":"{}"}}}}}}"#,
            "x".repeat(100_000)
        );
        assert_eq!(wire.refused(oversized.as_bytes()).await, (-32600, json!(9)));

        // Well-formed but wrong: tool errors, nothing charged.
        let r = wire.call(10, "echo", json!({"text": 5})).await;
        assert_eq!(r["structuredContent"]["error"], "invalid_arguments", "{r}");
        let r = wire.call(11, "echo", json!({"text": {"nested": [1, 2]}})).await;
        assert_eq!(r["structuredContent"]["error"], "invalid_arguments", "{r}");
        for id in ["x' OR '1'='1", "../../../etc/passwd", "pay_%00%2e%2e", &"p".repeat(3000)] {
            let r = wire.call(12, "echo", json!({"text": "hi", "payment_id": id})).await;
            assert_eq!(r["structuredContent"]["error"], "payment_not_found", "{id}: {r}");
        }
        let forged = wire
            .request(13, "tools/call", json!({"name": "echo", "arguments": {"text": "hi"}, "requestState": "pay_forged"}))
            .await;
        assert_eq!(forged["result"]["isError"], true, "{forged}");

        // The server still answers, and nothing moved.
        assert_eq!(wire.request(14, "ping", json!({})).await["result"], json!({}));
        assert_eq!(env.balance("alice").await, ("1.00".into(), "0.00".into(), "1.00".into()));
        env.assert_ledger_ok().await;
        drop(wire);
    }
}
