//! The money model end to end: metered prices charged their actual usage,
//! and revenue split between the author, the platform and commissions.

use serde_json::json;

use crate::harness::*;

/// Demo tools with a metered `search` (0.01 + 0.005 per result it returns,
/// at most 0.10) and an `echo` metered by its argument (0.01 per started
/// 10 characters, at most 0.05).
fn metered_pricing(mode: &str) -> String {
    format!(
        r#"[server]
name = "test-server"
mode = "{mode}"
currency = "USD"

[store]
synchronous = "normal"

[[tools]]
name = "search"
price = {{ base = "0.01", per_unit = "0.005", usage = "reported", max = "0.10" }}

[[tools]]
name = "echo"
price = {{ per_unit = "0.01", unit_size = 10, argument = "text", max = "0.05" }}
"#
    )
}

on_both_backends! {
    #[tokio::test]
    async fn a_metered_tool_is_charged_its_actual_usage() {
        let env = Env::with_pricing(&metered_pricing("resubmit"));
        env.topup("alice", "1.00").await;
        let client = env.client(Some("alice")).await;

        let tools = client.list_all_tools().await.expect("tools/list");
        let search = tools.iter().find(|t| t.name == "search").unwrap();
        let price = &search.meta.as_ref().unwrap().0["tollgate/price"];
        assert_eq!(price["amount"], "0.10");
        assert_eq!(price["metered"]["per_unit"], "0.005");
        assert_eq!(price["metered"]["units"], "reported");
        assert!(search.description.as_deref().unwrap().contains("at most 0.10 USD"));

        // The hold is the maximum; the charge is 3 results' worth.
        let r = call(&client, "search", json!({"query": "berry", "limit": 10})).await;
        assert_eq!(structured(&r)["results"].as_array().unwrap().len(), 3);
        let payment = payment_meta(&r);
        assert_eq!(payment["status"], "paid");
        assert_eq!(payment["amount"], "0.025");
        assert_eq!(payment["held"], "0.10");
        assert_eq!(
            env.balance("alice").await,
            ("0.975".into(), "0.00".into(), "0.975".into())
        );
        let receipt = payment["receipt"].as_str().unwrap();
        let verified = env.ok(&["receipt", "verify", receipt]).await;
        assert!(verified.contains("\"amount\": \"0.025\""), "{verified}");

        // Metered by an argument: 12 characters are two blocks of 10.
        let r = call(&client, "echo", echo_args("hello world!")).await;
        assert_eq!(payment_meta(&r)["amount"], "0.02");
        assert_eq!(env.available("alice").await, "0.955");

        // Paid through a session instead: the session is for the maximum,
        // and what the run did not use is refunded to the wallet that paid.
        let anonymous = env.client(None).await;
        let r = call(&anonymous, "search", json!({"query": "grape", "limit": 1})).await;
        assert_eq!(error_code(&r), "payment_required");
        assert_eq!(structured(&r)["amount"], "0.10");
        let id = payment_id_of(&r);
        env.ok(&["sessions", "pay", &id, "--from", "alice"]).await;
        assert_eq!(env.available("alice").await, "0.855");
        let r = call(
            &anonymous,
            "search",
            json!({"query": "grape", "limit": 1, "payment_id": id}),
        )
        .await;
        assert_eq!(structured(&r)["results"], json!(["grape"]));
        let payment = payment_meta(&r);
        assert_eq!(payment["amount"], "0.015");
        assert_eq!(payment["paid"], "0.10");
        assert_eq!(payment["refunded"], "0.085");
        assert_eq!(env.available("alice").await, "0.94");

        let earned = env.ok(&["ledger", "statement", "--beneficiary", "test-server"]).await;
        // 0.025 + 0.02 + 0.015 charged: the author gets the whole cents,
        // the rounding account the half cents.
        assert!(earned.contains("charge 0.025 = author 0.02 + rounding 0.005"), "{earned}");
        assert!(earned.contains("total: 0.05 USD over 3 line(s)"), "{earned}");
        let rounding = env.ok(&["ledger", "statement", "--beneficiary", "rounding"]).await;
        assert!(rounding.contains("total: 0.01 USD over 2 line(s)"), "{rounding}");
        // The payer's statement counts each of the three charges once,
        // though the session's shows on its payment and on its refund.
        let alices = env.ok(&["wallet", "statement", "alice"]).await;
        assert!(
            alices.contains("the split charges came to 0.06 USD"),
            "{alices}"
        );
        client.cancel().await.ok();
        anonymous.cancel().await.ok();
        env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    #[tokio::test]
    async fn an_authors_statement_shows_the_net_after_commission_and_platform_share() {
        let env = Env::with_pricing(&pricing(
            "resubmit",
            r#"
[fees]
platform_share = "10%"
commission_out = "0.01"
"#,
        ).replace(
            "name = \"echo\"\nprice = \"0.01\"",
            "name = \"echo\"\nprice = \"1.00\"\nbeneficiary = \"alice-author\"\ncommission_in = \"2.5%\"",
        ));
        env.topup("bob", "5.00").await;
        let client = env.client(Some("bob")).await;

        let tools = client.list_all_tools().await.expect("tools/list");
        let echo = tools.iter().find(|t| t.name == "echo").unwrap();
        let terms = &echo.meta.as_ref().unwrap().0["tollgate/price"]["terms"];
        assert_eq!(terms["beneficiary"], "alice-author");
        assert_eq!(terms["commission_out"], "0.01");
        assert!(echo.description.as_deref().unwrap().contains("+ a 0.01 fee"));

        // The payer pays the price plus the outgoing commission.
        for _ in 0..2 {
            let r = call(&client, "echo", echo_args("hi")).await;
            assert_eq!(payment_meta(&r)["amount"], "1.01");
        }
        assert_eq!(env.available("bob").await, "2.98");

        let statement = env
            .ok(&["ledger", "statement", "--beneficiary", "alice-author", "--tool", "echo"])
            .await;
        let captures: Vec<_> = statement.lines().filter(|l| l.contains(" capture ")).collect();
        assert_eq!(captures.len(), 2, "{statement}");
        assert!(captures[0].contains("0.88"), "{statement}");
        assert!(
            captures[0].contains(
                "charge 1.00 = author 0.88 + platform_share 0.10 + commission_in 0.02; payer fee 0.01"
            ),
            "{statement}"
        );
        assert!(statement.contains("total: 1.76 USD over 2 line(s)"), "{statement}");
        let platform = env.ok(&["ledger", "statement", "--beneficiary", "platform"]).await;
        assert!(platform.contains("total: 0.20 USD"), "{platform}");
        let fees = env.ok(&["ledger", "statement", "--beneficiary", "commissions"]).await;
        assert!(fees.contains("total: 0.06 USD"), "{fees}");

        // bob also pays carol's call by its payment id (the slow path): his
        // statement shows that charge's split too, posted when it ran.
        let carol = env.client(Some("carol")).await;
        let id = payment_id_of(&call(&carol, "echo", echo_args("for carol")).await);
        env.ok(&["sessions", "pay", &id, "--from", "bob"]).await;
        let r = call(&carol, "echo", json!({"text": "for carol", "payment_id": id})).await;
        assert_eq!(payment_meta(&r)["status"], "paid", "{r:?}");
        let bobs = env.ok(&["wallet", "statement", "bob"]).await;
        let paid_for_carol = bobs
            .lines()
            .find(|l| l.contains("session_payment"))
            .unwrap_or_else(|| panic!("{bobs}"));
        assert!(
            paid_for_carol.contains(
                "charge 1.00 = author 0.88 + platform_share 0.10 + commission_in 0.02; payer fee 0.01"
            ),
            "{bobs}"
        );
        assert!(
            bobs.contains("the split charges came to 3.00 USD"),
            "all three charges: {bobs}"
        );
        carol.cancel().await.ok();
        // Nothing before today.
        let none = env
            .ok(&["ledger", "statement", "--beneficiary", "alice-author", "--until", "2000-01-01"])
            .await;
        assert!(!none.contains(" capture "), "{none}");
        client.cancel().await.ok();
        env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    #[tokio::test]
    async fn a_metered_call_that_uses_nothing_costs_nothing() {
        let env = Env::with_pricing(
            &metered_pricing("resubmit")
                .replace("base = \"0.01\", ", "")
                .replace("per_unit = \"0.01\"", "base = \"0\", per_unit = \"0.01\""),
        );
        env.topup("alice", "1.00").await;
        let client = env.client(Some("alice")).await;

        // Held, run, used nothing: the hold is released.
        let r = call(&client, "search", json!({"query": "zzz", "limit": 5})).await;
        assert_eq!(r.is_error, Some(false));
        assert_eq!(payment_meta(&r)["status"], "released");
        assert_eq!(payment_meta(&r)["charged"], "0.00");
        // Arguments that make the price nothing: a free call, nothing held.
        let r = call(&client, "echo", echo_args("")).await;
        assert_eq!(r.is_error, Some(false));
        assert!(payment_meta(&r).is_null());
        assert_eq!(
            env.balance("alice").await,
            ("1.00".into(), "0.00".into(), "1.00".into())
        );

        // Paid through a session, used nothing: all of it refunded.
        let anonymous = env.client(None).await;
        let r = call(&anonymous, "search", json!({"query": "zzz", "limit": 5})).await;
        let id = payment_id_of(&r);
        env.ok(&["sessions", "pay", &id, "--from", "alice"]).await;
        assert_eq!(env.available("alice").await, "0.90");
        let r = call(
            &anonymous,
            "search",
            json!({"query": "zzz", "limit": 5, "payment_id": id}),
        )
        .await;
        assert_eq!(r.is_error, Some(false));
        assert_eq!(payment_meta(&r)["status"], "refunded");
        assert_eq!(env.available("alice").await, "1.00");
        client.cancel().await.ok();
        anonymous.cancel().await.ok();
        env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    #[tokio::test]
    async fn tollgate_refund_gives_a_payment_back_once() {
        let env = Env::new("resubmit");
        env.topup("alice", "1.00").await;
        env.topup("carol", "1.00").await;
        let client = env.client(Some("alice")).await;
        let r = call(&client, "divide", json!({"a": 1, "b": 2})).await;
        let fast = payment_meta(&r)["payment_id"].as_str().unwrap().to_owned();
        assert_eq!(env.available("alice").await, "0.95");

        let out = env.ok(&["refund", &fast, "0.02", "--reason", "slow answer"]).await;
        assert!(out.contains("refunded 0.02 USD"), "{out}");
        // The same command again refunds nothing more, however the amount
        // is written.
        for again in ["0.02", "0.020", " 0.02"] {
            let out = env.ok(&["refund", &fast, again, "--reason", "slow answer"]).await;
            assert!(out.contains("already refunded 0.02 USD"), "{again}: {out}");
        }
        assert_eq!(env.available("alice").await, "0.97");
        let too_much = env.cli(&["refund", &fast, "0.04", "--reason", "x"]).await;
        assert!(!too_much.status.success());
        assert!(
            String::from_utf8_lossy(&too_much.stderr).contains("0.03 of the 0.05 captured is left"),
            "{too_much:?}"
        );
        let out = env.ok(&["refund", &fast, "--reason", "all of it"]).await;
        assert!(out.contains("refunded 0.03 USD") && out.contains("0.05 of 0.05"), "{out}");
        assert_eq!(env.available("alice").await, "1.00");
        let statement = env.ok(&["wallet", "statement", "alice"]).await;
        assert_eq!(statement.lines().filter(|l| l.contains(" refund ")).count(), 2, "{statement}");

        // A payment made through a session goes back to the wallet that paid it.
        let anonymous = env.client(None).await;
        let r = call(&anonymous, "echo", echo_args("hi")).await;
        let id = payment_id_of(&r);
        env.ok(&["sessions", "pay", &id, "--from", "carol"]).await;
        let mut paid_call = echo_args("hi");
        paid_call["payment_id"] = json!(id);
        assert_eq!(text(&call(&anonymous, "echo", paid_call).await), "hi");
        assert_eq!(env.available("carol").await, "0.99");
        env.ok(&["refund", &id, "--reason", "duplicate"]).await;
        assert_eq!(env.available("carol").await, "1.00");
        let unknown = env.cli(&["refund", "pay_nope", "--reason", "x"]).await;
        assert!(!unknown.status.success());
        client.cancel().await.ok();
        anonymous.cancel().await.ok();
        env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    /// A wallet's statement filtered by tool shows a slow-path payment for
    /// that tool beside what came back: a failed run's refund nets to
    /// nothing. Before, the payment carried no tool and was left out, so the
    /// refund alone made the tool look like it paid the wallet.
    #[tokio::test]
    async fn a_statement_by_tool_shows_a_slow_path_payment_beside_its_refund() {
        let env = Env::new("resubmit");
        env.topup("carol", "1.00").await;
        let client = env.client(None).await;
        let args = json!({"a": 1, "b": 0});
        let id = payment_id_of(&call(&client, "divide", args.clone()).await);
        env.ok(&["sessions", "pay", &id, "--from", "carol"]).await;
        let mut redeem = args.clone();
        redeem["payment_id"] = json!(id);
        let r = call(&client, "divide", redeem).await;
        assert_eq!(payment_meta(&r)["status"], "refunded", "{r:?}");
        let by_tool = env
            .ok(&["ledger", "statement", "--wallet", "carol", "--tool", "divide"])
            .await;
        assert!(by_tool.contains("total: 0.00 USD over 2 line(s)"), "{by_tool}");
        let jsonl = env
            .ok(&["ledger", "export", "--format", "jsonl", "--wallet", "carol", "--tool", "divide"])
            .await;
        let amounts: Vec<String> = jsonl
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["amount"].to_string())
            .collect();
        assert_eq!(amounts, ["\"-0.05\"", "\"0.05\""], "{jsonl}");
        client.cancel().await.ok();
        env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    #[tokio::test]
    async fn a_yen_server_shows_whole_yen_and_takes_no_fraction_of_one() {
        // JPY has no minor unit: amounts show no decimals.
        let env = Env::with_pricing(
            &pricing("resubmit", "")
                .replace("\"USD\"", "\"JPY\"")
                .replace("price = \"0.01\"", "price = \"1\"")
                .replace("price = \"0.05\"", "price = \"5\""),
        );
        let out = env.ok(&["wallet", "topup", "erin", "100"]).await;
        assert!(out.starts_with("topped up erin with 100 JPY"), "{out}");
        assert!(out.contains("erin: balance 100 JPY, held 0 JPY, available 100 JPY"), "{out}");

        // Half a yen is money nobody can pay in: refused, and nothing written.
        let out = env.cli(&["wallet", "topup", "erin", "100.5", "--currency", "jpy"]).await;
        assert!(!out.status.success(), "a top-up of half a yen must fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("100.5 JPY has more decimal places than JPY's minor unit (0)"),
            "{stderr}"
        );
        assert_eq!(env.available("erin").await, "100");

        let client = env.client(Some("erin")).await;
        let tools = client.list_all_tools().await.expect("tools/list");
        let echo = tools.iter().find(|t| t.name == "echo").unwrap();
        assert!(
            echo.description.as_deref().unwrap().contains("(price: 1 JPY per call)"),
            "{:?}",
            echo.description
        );
        assert_eq!(echo.meta.as_ref().unwrap().0["tollgate/price"]["amount"], "1");

        let r = call(&client, "echo", echo_args("hello")).await;
        let payment = payment_meta(&r);
        assert_eq!((payment["status"].as_str(), payment["amount"].as_str()), (Some("paid"), Some("1")));
        let r = call(&client, "divide", json!({"a": 1, "b": 0})).await;
        let payment = payment_meta(&r);
        assert_eq!(
            (payment["status"].as_str(), payment["amount"].as_str(), payment["charged"].as_str()),
            (Some("released"), Some("5"), Some("0"))
        );
        client.cancel().await.ok();

        let out = env.ok(&["wallet", "balance", "erin"]).await;
        assert!(out.contains("erin: balance 99 JPY, held 0 JPY, available 99 JPY"), "{out}");
        let statement = env.ok(&["wallet", "statement", "erin"]).await;
        let line = |kind: &str| {
            statement
                .lines()
                .find(|l| l.contains(kind))
                .unwrap_or_else(|| panic!("no {kind} line in {statement}"))
                .split_whitespace()
                .skip(2)
                .take(2)
                .collect::<Vec<_>>()
        };
        assert_eq!(line("topup"), ["100", "JPY"], "{statement}");
        assert_eq!(line("capture"), ["-1", "JPY"], "{statement}");
        assert!(statement.contains("total: 99 JPY over 2 line(s)"), "{statement}");
        let export = env.ok(&["ledger", "export", "--format", "jsonl", "--wallet", "erin"]).await;
        let amounts: Vec<String> = export
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["amount"].to_string())
            .collect();
        assert_eq!(amounts, ["\"100\"", "\"-1\""], "{export}");
        env.assert_ledger_ok().await;
    }
}
