//! Spending limits, approval rules, and who called, end to end: a call a
//! daily cap blocks, an approval a person declines, and the agent and
//! metadata of a call in its receipt, statements and export.

use rmcp::model::{CallToolRequestParams, CallToolResult, MetaObject, RequestMetaObject};
use serde_json::{Value, json};

use crate::harness::*;

async fn call_with_meta(
    client: &Client,
    tool: &str,
    arguments: Value,
    meta: Value,
) -> CallToolResult {
    let mut params = CallToolRequestParams::new(tool.to_owned()).with_arguments(args(arguments));
    let Value::Object(meta) = meta else {
        panic!("meta must be an object")
    };
    params.meta = Some(RequestMetaObject(MetaObject(meta)));
    client
        .call_tool(params)
        .await
        .unwrap_or_else(|e| panic!("call {tool} failed at the protocol level: {e}"))
}

on_both_backends! {
    #[tokio::test]
    async fn a_daily_cap_blocks_a_call_and_says_when_it_resets() {
        let env = Env::new("resubmit");
        env.topup("alice", "1.00").await;
        let set = env.ok(&["wallet", "limits", "alice", "--daily", "0.02"]).await;
        assert!(set.contains("daily:    0.02 (0.00 spent today"), "{set}");
        let client = env.client(Some("alice")).await;

        assert_eq!(payment_meta(&call(&client, "echo", echo_args("one")).await)["status"], "paid");
        assert_eq!(payment_meta(&call(&client, "echo", echo_args("two")).await)["status"], "paid");
        let r = call(&client, "echo", echo_args("three")).await;
        assert_eq!(error_code(&r), "limit_exceeded");
        let refusal = structured(&r);
        assert_eq!(refusal["limit"], "daily");
        assert_eq!(refusal["cap"], "0.02");
        assert_eq!(refusal["spent"], "0.02");
        let tomorrow = (chrono::Utc::now() + chrono::Duration::days(1))
            .format("%Y-%m-%dT00:00:00Z")
            .to_string();
        assert_eq!(refusal["resets_at"], tomorrow.as_str());
        assert!(text(&r).contains(&format!("resets at {tomorrow}")), "{}", text(&r));
        assert!(text(&r).contains("nothing was charged"), "{}", text(&r));
        assert_eq!(env.balance("alice").await, ("0.98".into(), "0.00".into(), "0.98".into()));
        let shown = env.ok(&["wallet", "limits", "alice"]).await;
        assert!(shown.contains("0.02 spent today"), "{shown}");

        // An allow-list of no tools would block every call: refused.
        let refused = env.cli(&["wallet", "limits", "alice", "--tools", " , "]).await;
        assert!(!refused.status.success());
        let said = String::from_utf8_lossy(&refused.stderr);
        assert!(said.contains("--tools needs tool names"), "{said}");

        // The per-call maximum, and the allow-list.
        env.ok(&["wallet", "limits", "alice", "--daily", "none", "--per-call", "0.04"]).await;
        let r = call(&client, "divide", json!({"a": 1, "b": 2})).await;
        assert_eq!(error_code(&r), "limit_exceeded");
        assert_eq!(structured(&r)["limit"], "per_call");
        env.ok(&["wallet", "limits", "alice", "--per-call", "none", "--tools", "divide"]).await;
        let r = call(&client, "echo", echo_args("four")).await;
        assert_eq!(error_code(&r), "limit_exceeded");
        assert_eq!(structured(&r)["limit"], "allow_list");
        assert_eq!(payment_meta(&call(&client, "divide", json!({"a": 1, "b": 2})).await)["status"], "paid");
        assert_eq!(env.available("alice").await, "0.93");
        // Paying someone else's call from her wallet keeps to it too.
        let carol = env.client(Some("carol")).await;
        let r = call(&carol, "echo", echo_args("for carol")).await;
        let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
        let refused = env.cli(&["sessions", "pay", &id, "--from", "alice"]).await;
        assert!(!refused.status.success());
        let said = String::from_utf8_lossy(&refused.stderr);
        assert!(said.contains("allow-list"), "{said}");
        assert_eq!(env.available("alice").await, "0.93");
        carol.cancel().await.ok();

        // A wallet that cannot pay at once is checked before it is asked to
        // pay another way.
        env.ok(&["wallet", "limits", "bob", "--per-call", "0.001"]).await;
        let bob = env.client(Some("bob")).await;
        let r = call(&bob, "echo", echo_args("five")).await;
        assert_eq!(error_code(&r), "limit_exceeded");
        assert_eq!(structured(&r)["limit"], "per_call");
        env.ok(&["wallet", "limits", "bob", "--per-call", "none", "--daily", "0.05"]).await;
        assert_eq!(error_code(&call(&bob, "echo", echo_args("six")).await), "payment_required");
        client.cancel().await.ok();
        bob.cancel().await.ok();
        env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    /// A wallet paying another's call gives back its allowance when the call
    /// fails and the payment is refunded, as a released hold does on the
    /// fast path: a failed call costs nothing, allowance included.
    #[tokio::test]
    async fn a_refunded_slow_path_payment_gives_back_the_allowance() {
        let env = Env::new("resubmit");
        env.topup("carol", "1.00").await;
        env.ok(&["wallet", "limits", "carol", "--daily", "0.05"]).await;
        let client = env.client(None).await;
        for days_ago in [0, 2] {
            let args = json!({"a": 1, "b": 0});
            let id = payment_id_of(&call(&client, "divide", args.clone()).await);
            // The second was asked for two days ago (a payment waiting on a
            // person), and is paid, so counted, today.
            let asked = format!(
                "UPDATE intents SET created_at = created_at - {} WHERE id = '{id}'",
                days_ago * 86_400_000
            );
            tollgate::testing::execute(&env.db, &asked).await.unwrap();
            env.ok(&["sessions", "pay", &id, "--from", "carol"]).await;
            let shown = env.ok(&["wallet", "limits", "carol"]).await;
            assert!(shown.contains("0.05 spent today"), "{shown}");
            let r = call(&client, "divide", json!({"a": 1, "b": 0, "payment_id": id})).await;
            assert_eq!(payment_meta(&r)["status"], "refunded", "{r:?}");
            let shown = env.ok(&["wallet", "limits", "carol"]).await;
            assert!(shown.contains("0.00 spent today"), "{shown}");
        }
        assert_eq!(env.available("carol").await, "1.00");
        client.cancel().await.ok();
        env.assert_ledger_ok().await;
    }
}

/// Approval rules, through an in-process client that answers prompts.
mod approval_rules {
    use crate::harness::{echo_args, error_code, payment_meta};
    use crate::inproc::*;

    /// `echo` needs alice's yes whatever it costs; everyone else's under 5.00
    /// goes through at once.
    fn rule_pricing() -> String {
        format!(
            "{}\n[[approvals]]\nprincipal = \"alice\"\ntool = \"echo\"\nthreshold = \"0\"\n",
            crate::inproc::pricing("resubmit", "")
        )
    }

    on_both_backends! {
        #[tokio::test]
        async fn an_approval_rule_asks_and_a_declined_approval_is_on_the_statement() {
            let t = InProcess::new(&rule_pricing()).await;
            t.env.topup("alice", "1.00").await;
            t.env.topup("bob", "1.00").await;

            // No rule for bob: the fast path, no prompt.
            let bobs = t.client(Person::Declines, Elicitation::Form);
            let bob = t.connect(Some("bob"), bobs.clone(), false).await;
            assert_eq!(payment_meta(&call(&bob, "echo", echo_args("hi")).await)["status"], "paid");
            assert_eq!(bobs.prompt_count(), 0);

            // alice's rule asks; she says no: nothing charged.
            let declines = t.client(Person::Declines, Elicitation::Form);
            let alice = t.connect(Some("alice"), declines.clone(), false).await;
            let r = call(&alice, "echo", echo_args("no thanks")).await;
            assert_eq!(error_code(&r), "payment_declined");
            assert_eq!(declines.prompt_count(), 1);
            assert_eq!(t.env.available("alice").await, "1.00");
            alice.cancel().await.ok();

            // Then yes: charged to her wallet, approved by her.
            let approves = t.client(Person::Approves, Elicitation::Form);
            let alice = t.connect(Some("alice"), approves, false).await;
            let r = call(&alice, "echo", echo_args("yes please")).await;
            assert_eq!(payment_meta(&r)["status"], "paid", "{r:?}");
            assert_eq!(t.env.available("alice").await, "0.99");

            let statement = t.env.ok(&["ledger", "statement", "--wallet", "alice"]).await;
            let approvals: Vec<&str> = statement
                .lines()
                .skip_while(|l| !l.starts_with("approvals for alice"))
                .collect();
            assert_eq!(approvals[0], "approvals for alice: 2", "{statement}");
            let declined = approvals.iter().find(|l| l.contains(" declined ")).expect(&statement);
            assert!(declined.contains("declined by alice via elicitation at 20"), "{declined}");
            assert!(declined.contains("rule approvals[0] (principal alice, tool echo): above 0.00"), "{declined}");
            let approved = approvals.iter().find(|l| l.contains("approved by")).expect(&statement);
            assert!(approved.contains("succeeded"), "{approved}");
            // The charge itself says who approved it: alice's wallet paid the
            // approved session, and the tool's statement shows the capture.
            let by_tool = t.env.ok(&["ledger", "statement", "--tool", "echo"]).await;
            let capture = by_tool
                .lines()
                .find(|l| l.contains(" capture ") && l.contains("approved by"))
                .expect(&by_tool);
            assert!(capture.contains("approved by alice via elicitation at "), "{capture}");
            let bobs_statement = t.env.ok(&["ledger", "statement", "--wallet", "bob"]).await;
            assert!(bobs_statement.contains("auto-approved under its threshold"), "{bobs_statement}");
            assert!(bobs_statement.contains("approvals for bob: 0"), "{bobs_statement}");
            alice.cancel().await.ok();
            bob.cancel().await.ok();
            t.env.assert_ledger_ok().await;
        }
    }
}

on_both_backends! {
    #[tokio::test]
    async fn the_agent_and_metadata_of_a_call_reach_its_receipt_statements_and_export() {
        let env = Env::new("resubmit");
        env.topup("alice", "1.00").await;
        let client = env.client(Some("alice")).await;
        let meta = json!({ "tollgate/agent": "research-bot/2", "tollgate/metadata": { "order": "42" } });
        let r = call_with_meta(&client, "echo", echo_args("tagged"), meta).await;
        let payment = payment_meta(&r);
        assert_eq!(payment["status"], "paid");
        let verified = env.ok(&["receipt", "verify", payment["receipt"].as_str().unwrap()]).await;
        assert!(verified.contains("\"agent\": \"research-bot/2\""), "{verified}");
        assert!(verified.contains("\"order\": \"42\""), "{verified}");
        // Without an explicit id, the agent is the client's clientInfo.
        call(&client, "echo", echo_args("plain")).await;

        let statement = env.ok(&["ledger", "statement", "--wallet", "alice"]).await;
        assert!(statement.contains(r#"agent research-bot/2; auto-approved under its threshold; metadata {"order":"42"}"#), "{statement}");
        assert!(statement.contains("agent rmcp/"), "{statement}");
        let by_tool = env.ok(&["ledger", "statement", "--tool", "echo"]).await;
        assert!(by_tool.contains("total: 0.02 USD over 2 line(s)"), "{by_tool}");

        let csv = env.ok(&["ledger", "export", "--format", "csv", "--beneficiary", "test-server"]).await;
        let rows: Vec<&str> = csv.lines().collect();
        assert_eq!(rows.len(), 3, "{csv}");
        assert!(rows[1].contains("research-bot/2"), "{csv}");
        assert!(rows[1].contains(r#","{""order"":""42""}","#), "{csv}");
        let jsonl = env.ok(&["ledger", "export", "--format", "jsonl", "--wallet", "alice", "--tool", "echo"]).await;
        let rows: Vec<Value> = jsonl.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(rows.len(), 2, "{jsonl}");
        assert_eq!(rows[0]["metadata"]["order"], "42");
        assert_eq!(rows[0]["amount"], "-0.01");
        assert_eq!(rows[0]["approval"], "auto_approved");

        // Metadata too large, or not an object: refused, nothing charged.
        let big = json!({ "tollgate/metadata": { "blob": "x".repeat(4096) } });
        let r = call_with_meta(&client, "echo", echo_args("big"), big).await;
        assert_eq!(error_code(&r), "invalid_arguments");
        assert!(text(&r).contains("the limit is 2048"), "{}", text(&r));
        let r = call_with_meta(&client, "echo", echo_args("odd"), json!({ "tollgate/metadata": "order 42" })).await;
        assert_eq!(error_code(&r), "invalid_arguments");
        assert_eq!(env.available("alice").await, "0.98");
        // Control characters in an agent id (a terminal escape, a line
        // break) are dropped: a statement shows it as text, on its line.
        let sneaky = json!({ "tollgate/agent": "bot\u{1b}[2J\nfake\u{202e} line\u{2028}" });
        assert_eq!(payment_meta(&call_with_meta(&client, "echo", echo_args("s"), sneaky).await)["status"], "paid");
        let statement = env.ok(&["ledger", "statement", "--wallet", "alice"]).await;
        assert!(statement.contains("agent bot[2Jfake line; auto-approved"), "{statement}");
        assert!(!statement.contains('\u{1b}'), "{statement}");
        client.cancel().await.ok();

        // A slow-path call paid from a wallet: the wallet's line names the
        // call's agent too. (It named only the session.)
        let anonymous = env.client(None).await;
        let meta = json!({ "tollgate/agent": "errand-bot/7" });
        let r = call_with_meta(&anonymous, "echo", echo_args("for later"), meta).await;
        let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
        env.ok(&["sessions", "pay", &id, "--from", "alice"]).await;
        let statement = env.ok(&["ledger", "statement", "--wallet", "alice"]).await;
        let line = statement.lines().find(|l| l.contains("errand-bot/7"));
        assert!(
            line.is_some_and(|l| l.contains("-0.01") && l.contains("auto-approved")),
            "{statement}"
        );
        anonymous.cancel().await.ok();
        env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    /// A payment made for a call waiting for approval approves it: the
    /// payer's statement line says so, as the settlement's does.
    #[tokio::test]
    async fn paying_a_call_that_waits_for_approval_shows_the_approval_on_the_payment_line() {
        let rule = "[[approvals]]\ntool = \"echo\"\nthreshold = \"0\"\n";
        let env = Env::with_pricing(&format!("{}\n{rule}", crate::harness::pricing("resubmit", "")));
        env.topup("alice", "1.00").await;
        let anonymous = env.client(None).await;
        let r = call(&anonymous, "echo", echo_args("needs a yes")).await;
        let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
        let before = env.ok(&["sessions", "list"]).await;
        assert!(before.contains(&id), "{before}");
        env.ok(&["sessions", "pay", &id, "--from", "alice"]).await;
        let statement = env.ok(&["ledger", "statement", "--wallet", "alice"]).await;
        let line = statement.lines().find(|l| l.contains("session_payment")).expect(&statement);
        assert!(line.contains("approved by wallet:alice at 20"), "{line}");
        let r = call(&anonymous, "echo", json!({"text": "needs a yes", "payment_id": id})).await;
        assert_eq!(payment_meta(&r)["status"], "paid", "{r:?}");
        let by_tool = env.ok(&["ledger", "statement", "--tool", "echo"]).await;
        let capture = by_tool.lines().find(|l| l.contains(" capture ")).expect(&by_tool);
        assert!(capture.contains("approved by wallet:alice at 20"), "{capture}");
        anonymous.cancel().await.ok();
        env.assert_ledger_ok().await;
    }
}
