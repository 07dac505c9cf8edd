//! Plain JSON-RPC over stdio, as a minimal client would write it: no
//! progress token, no capabilities. (rmcp's own client always sends a
//! progress token, so the fallbacks for clients without one are checked
//! here, on the wire.)

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::harness::{EXE, Env};

pub(crate) struct Wire {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Wire {
    async fn start(env: &Env) -> Self {
        Self::start_as(env, None).await
    }

    pub(crate) async fn start_as(env: &Env, payer: Option<&str>) -> Self {
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
    /// Closes the server's stdin, then reads the answer to request `id`
    /// (skipping notifications), which must come before stdout closes.
    async fn close_input_then_answer(self, id: u64) -> (Value, tokio::process::Child) {
        let Wire {
            child,
            stdin,
            mut lines,
        } = self;
        drop(stdin);
        loop {
            let line = tokio::time::timeout(std::time::Duration::from_secs(10), lines.next_line())
                .await
                .expect("answered within 10s")
                .expect("read")
                .expect("the call's answer before stdout closed");
            let message: Value = serde_json::from_str(&line).expect("JSON-RPC");
            if message["id"] == json!(id) {
                return (message, child);
            }
        }
    }

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

    /// Sends a line as written and returns the answer to request `id`,
    /// skipping notifications.
    pub(crate) async fn request_raw(&mut self, id: u64, line: &str) -> Value {
        self.send_raw(line.as_bytes()).await;
        loop {
            let message = self.next().await;
            if message["id"] == json!(id) {
                return message;
            }
        }
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

/// A client that closes stdin while a call waits for its payment still
/// gets that call's answer, with the payment id to redeem it by, and the
/// payment stays payable. (The call was cancelled unanswered.)
#[tokio::test]
async fn a_call_waiting_for_payment_when_stdin_closes_answers_with_its_payment_id() {
    let env = Env::with_pricing(&crate::harness::pricing("progress", ""));
    let mut wire = Wire::start(&env).await;
    wire.send(
        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": "echo", "arguments": {"text": "later"}, "_meta": {"progressToken": "t1"}}}),
    )
    .await;
    let first = wire.next().await;
    assert_eq!(first["method"], "notifications/progress", "{first}");
    let (answer, mut child) = wire.close_input_then_answer(1).await;
    let result = &answer["result"];
    assert_eq!(
        result["structuredContent"]["error"], "payment_timeout",
        "{answer}"
    );
    let id = result["structuredContent"]["payment_id"]
        .as_str()
        .expect("a payment id");
    let text = result["content"][0]["text"].as_str().unwrap_or_default();
    assert!(text.contains("the client closed its input"), "{text}");
    let exit = tokio::time::timeout(std::time::Duration::from_secs(15), child.wait())
        .await
        .expect("exits once stdin is closed")
        .expect("wait");
    assert!(exit.success(), "{exit:?}");
    let listed = env.ok(&["sessions", "list"]).await;
    let line = listed
        .lines()
        .find(|l| l.contains(id))
        .unwrap_or_else(|| panic!("{listed}"));
    assert!(line.contains("pending"), "still payable: {line}");

    // Paid since, it is redeemed by a call sent with the input's end right
    // behind it: the end of input ends waits, not the check of a payment
    // already made.
    env.ok(&["sessions", "pay", id]).await;
    let mut wire = Wire::start(&env).await;
    wire.send(
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
        "name": "echo", "arguments": {"text": "later", "payment_id": id}}}),
    )
    .await;
    let (answer, mut child) = wire.close_input_then_answer(2).await;
    let text = answer["result"]["content"][0]["text"].as_str();
    assert_eq!(text, Some("later"), "{answer}");
    child.wait().await.expect("wait");
    env.assert_ledger_ok().await;
}

/// A limit set above rmcp's own (16 MiB) holds: a line under it is
/// answered, not dropped by rmcp without a word.
#[tokio::test]
async fn a_message_under_a_large_configured_limit_is_answered() {
    let env = Env::with_pricing(&crate::harness::pricing(
        "resubmit",
        "max_message_bytes = 33554432",
    ));
    let mut wire = Wire::start(&env).await;
    let words = "w ".repeat(9 * 1024 * 1024);
    let r = wire.call(1, "word_count", json!({"text": words})).await;
    assert_eq!(
        r["isError"],
        false,
        "{}",
        &r.to_string()[..200.min(r.to_string().len())]
    );
    assert_eq!(r["structuredContent"]["words"], 9 * 1024 * 1024);
    drop(wire);
}

on_both_backends! {
    /// A client that cannot answer a form was never asked for a yes: an
    /// approval's "yes" it makes up and sends back with the payment id as
    /// `requestState` is not taken. (It charged the wallet: an agent could
    /// approve its own charges above the threshold.)
    #[tokio::test]
    async fn a_made_up_approval_from_a_client_never_asked_charges_nothing() {
        let pricing = crate::harness::pricing("resubmit", "")
            .replace("approval_threshold = \"5.00\"", "approval_threshold = \"0.005\"")
            + "\n[timeouts]\npayment_check = \"1s\"\n";
        let env = Env::with_pricing(&pricing);
        env.topup("alice", "1.00").await;
        let mut wire = Wire::start_as(&env, Some("alice")).await;
        let asked = wire.call(1, "echo", json!({"text": "hi"})).await;
        let id = asked["structuredContent"]["payment_id"].as_str().expect("a payment id").to_owned();
        let yes = json!({"payment": {"action": "accept", "content": {"approve": true}}});
        let answer = wire
            .request(2, "tools/call", json!({"name": "echo", "arguments": {"text": "hi"},
                                              "requestState": id, "inputResponses": yes}))
            .await;
        assert_eq!(answer["result"]["isError"], true, "{answer}");
        assert_eq!(env.balance("alice").await, ("1.00".into(), "0.00".into(), "1.00".into()));
        let state = env.ok(&["sessions", "list"]).await;
        assert!(state.lines().any(|l| l.starts_with(&id) && l.contains("pending")), "{state}");
        env.assert_ledger_ok().await;
        drop(wire);
    }
}

on_both_backends! {
    /// A dynamic confirm tool can be called only from the session it was
    /// offered to. When that session closes (here, the client closes the
    /// server's stdin), its payments are ended before the process exits:
    /// one unpaid is cancelled, so nobody pays it for nothing; one paid and
    /// never used is refunded at once. (Both were left: the paid one held
    /// until recovery refunded it, `keep_results` later, a week by default.)
    #[tokio::test]
    async fn a_closed_sessions_dynamic_payments_are_cancelled_or_refunded_at_once() {
        let env = Env::new("dynamic_tools");
        env.topup("pat", "1.00").await;
        let mut wire = Wire::start_as(&env, Some("kit")).await;
        let mut offer = async |id: u64, text: &str| {
            let r = wire.call(id, "echo", json!({"text": text})).await;
            let next = r["structuredContent"]["next_step"].as_str().expect("a confirm tool");
            assert!(next.starts_with("confirm_pay_"), "{r}");
            r["structuredContent"]["payment_id"].as_str().expect("a payment id").to_owned()
        };
        let unpaid = offer(1, "never paid").await;
        let paid = offer(2, "paid, never used").await;
        env.ok(&["sessions", "pay", &paid, "--from", "pat"]).await;
        assert_eq!(env.available("pat").await, "0.99");

        let Wire { mut child, stdin, .. } = wire;
        drop(stdin);
        let exit = tokio::time::timeout(std::time::Duration::from_secs(30), child.wait())
            .await
            .expect("the server exits once its client goes")
            .expect("wait");
        assert!(exit.success(), "{exit:?}");

        let store = tollgate::testing::open_store(&env.db).await.unwrap();
        let intent = |id: String| {
            let store = &store;
            async move { store.intent(&id).await.unwrap().unwrap().status }
        };
        assert_eq!(intent(unpaid.clone()).await.as_str(), "cancelled");
        let sessions = env.ok(&["sessions", "list"]).await;
        assert!(
            sessions.lines().any(|l| l.starts_with(&unpaid) && l.contains("cancelled")),
            "its payment session can no longer be paid: {sessions}"
        );
        assert_eq!(intent(paid.clone()).await.as_str(), "failed");
        assert_eq!(env.available("pat").await, "1.00", "refunded");
        // The payer's statement says why, not that the tool failed.
        let statement = env.ok(&["wallet", "statement", "pat"]).await;
        let refund = statement
            .lines()
            .find(|l| l.contains("refund"))
            .unwrap_or_else(|| panic!("{statement}"));
        assert!(
            refund.contains("not run, the MCP session it was offered to closed before it was used"),
            "{refund}"
        );
        env.assert_ledger_ok().await;
    }
}

/// The server's stdin and stdout are pipes when an MCP client starts it,
/// and are then read and written on the runtime's event loop. Anything
/// else (here, files) is served too, through tokio's blocking stdio.
#[tokio::test]
async fn a_server_whose_stdin_or_stdout_is_a_file_still_answers() {
    let env = Env::new("two_step");
    let dir = tempfile::tempdir().expect("tempdir");
    let initialize = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                   "clientInfo": {"name": "wire", "version": "1"}}});
    let command = || {
        let mut command = tokio::process::Command::new(EXE);
        command
            .arg("serve")
            .env("TOLLGATE_CONFIG", &env.config)
            .env("TOLLGATE_DB", &env.db)
            .env("TOLLGATE_RECEIPT_KEY", &env.key)
            .env("TOLLGATE_LOG", "tollgate=warn")
            .kill_on_drop(true);
        command
    };

    // Stdout a file: every answer lands in it.
    let out = dir.path().join("out.jsonl");
    let mut child = command()
        .stdin(std::process::Stdio::piped())
        .stdout(std::fs::File::create(&out).expect("out file"))
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    let answer = |id: u64| {
        let out = out.clone();
        async move {
            for _ in 0..200 {
                let text = std::fs::read_to_string(&out).unwrap_or_default();
                if let Some(found) = text
                    .lines()
                    .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                    .find(|m| m["id"] == json!(id))
                {
                    return found;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            panic!("no answer {id} in {}", out.display());
        }
    };
    for message in [
        initialize.clone(),
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    ] {
        stdin
            .write_all(format!("{message}\n").as_bytes())
            .await
            .expect("write");
        if message["id"] == 0 {
            assert_eq!(answer(0).await["result"]["serverInfo"]["name"], "tollgate");
        }
    }
    stdin
        .write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/list\"}\n")
        .await
        .expect("write");
    let tools = answer(1).await;
    assert!(
        tools["result"]["tools"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["name"] == "echo")),
        "{tools}"
    );
    child.kill().await.ok();

    // Stdin a file: its requests are answered, a tool call included (the
    // input has ended long before rmcp reads it), and its end ends the
    // server.
    let input = dir.path().join("in.jsonl");
    let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    let count = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "word_count", "arguments": {"text": "one two three"}}});
    std::fs::write(&input, format!("{initialize}\n{initialized}\n{count}\n")).expect("in file");
    let mut child = command()
        .stdin(std::fs::File::open(&input).expect("in file"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let line = lines.next_line().await.expect("read").expect("an answer");
    let message: Value = serde_json::from_str(&line).expect("JSON-RPC");
    assert_eq!(message["result"]["serverInfo"]["name"], "tollgate");
    let line = lines
        .next_line()
        .await
        .expect("read")
        .expect("the call's answer");
    let message: Value = serde_json::from_str(&line).expect("JSON-RPC");
    assert_eq!(
        message["result"]["structuredContent"]["words"], 3,
        "{message}"
    );
    let status = tokio::time::timeout(std::time::Duration::from_secs(10), child.wait())
        .await
        .expect("the server ends with its input")
        .expect("wait");
    assert!(status.success(), "{status}");
}
