use serde_json::json;

use crate::harness::*;

on_both_backends! {
    #[tokio::test]
    async fn prices_show_in_descriptions_and_meta_and_free_tools_pass_untouched() {
        let env = Env::new("two_step");
        let client = env.client(Some("alice")).await;
        let tools = client.list_all_tools().await.expect("tools/list");
        let names: Vec<_> = tools.iter().map(|t| t.name.to_string()).collect();
        assert_eq!(
            names,
            [
                "confirm_divide_payment",
                "confirm_echo_payment",
                "divide",
                "echo",
                "search",
                "sleep",
                "word_count"
            ]
        );
        let echo = tools.iter().find(|t| t.name == "echo").unwrap();
        assert_eq!(
            echo.description.as_deref(),
            Some("Returns the text it is given. (price: 0.01 USD per call)")
        );
        assert_eq!(
            echo.meta.as_ref().unwrap().0["tollgate/price"],
            json!({"amount": "0.01", "currency": "USD"})
        );
        assert_eq!(echo.input_schema["required"], json!(["text"]));
        // two_step does not touch the schema.
        assert!(echo.input_schema["properties"].get("payment_id").is_none());

        let free = tools.iter().find(|t| t.name == "word_count").unwrap();
        assert_eq!(
            free.description.as_deref(),
            Some("Counts the words in a text.")
        );
        assert!(free.meta.is_none());

        let confirm = tools
            .iter()
            .find(|t| t.name == "confirm_echo_payment")
            .unwrap();
        assert_eq!(confirm.input_schema["required"], json!(["payment_id"]));

        // A free call costs nothing and needs no wallet.
        let r = call(&client, "word_count", json!({"text": "one two three"})).await;
        assert_eq!(structured(&r), json!({"words": 3}));
        assert!(payment_meta(&r).is_null());
        client.cancel().await.ok();
        env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    #[tokio::test]
    async fn resubmit_mode_adds_an_optional_payment_id_to_the_schema() {
        let env = Env::new("resubmit");
        let client = env.client(None).await;
        let tools = client.list_all_tools().await.expect("tools/list");
        let names: Vec<_> = tools.iter().map(|t| t.name.to_string()).collect();
        assert_eq!(names, ["divide", "echo", "search", "sleep", "word_count"]);
        let echo = tools.iter().find(|t| t.name == "echo").unwrap();
        assert_eq!(
            echo.input_schema["properties"]["payment_id"]["type"],
            "string"
        );
        assert_eq!(
            echo.input_schema["required"],
            json!(["text"]),
            "payment_id stays optional"
        );
        client.cancel().await.ok();
    }
}

on_both_backends! {
    #[tokio::test]
    async fn bad_arguments_name_the_field_and_charge_nothing() {
        let env = Env::with_pricing(
            &(crate::harness::pricing("resubmit", "")
                + "[[tools]]\nname = \"search\"\nprice = \"0.10\"\n\n\
                   [[tools]]\nname = \"sleep\"\nprice = \"0.01\"\n"),
        );
        env.topup("alice", "1.00").await;
        let client = env.client(Some("alice")).await;

        for (tool, arguments, field) in [
            ("echo", json!({}), "text"),
            ("echo", json!({"text": 5}), "text"),
            ("echo", json!({"text": "x", "colour": "red"}), "colour"),
            ("divide", json!({"a": 1, "b": "two"}), "b"),
            ("echo", json!({"text": "x", "payment_id": 7}), "payment_id"),
            // Out of the schema's range: known before any money moves.
            ("search", json!({"query": "a", "limit": 0}), "limit"),
            ("search", json!({"query": "a", "limit": 50}), "limit"),
            ("sleep", json!({"ms": 20000}), "ms"),
        ] {
            let r = call(&client, tool, arguments.clone()).await;
            assert_eq!(error_code(&r), "invalid_arguments", "{arguments}");
            assert_eq!(structured(&r)["field"], field, "{arguments}");
            assert!(text(&r).contains(field), "{}", text(&r));
            assert!(payment_meta(&r).is_null());
        }
        assert_eq!(
            env.balance("alice").await,
            ("1.00".into(), "0.00".into(), "1.00".into())
        );
        // No payment sessions were opened either.
        let sessions = env.ok(&["sessions", "list"]).await;
        assert_eq!(sessions.lines().count(), 1, "{sessions}");

        // An unknown tool is a JSON-RPC error, not a result.
        let err = client
            .call_tool(rmcp::model::CallToolRequestParams::new("nope"))
            .await
            .expect_err("unknown tool must fail");
        let rmcp::ServiceError::McpError(error) = &err else {
            panic!("not a JSON-RPC error: {err}");
        };
        assert_eq!(error.code, rmcp::model::ErrorCode::INVALID_PARAMS, "{err}");
        assert_eq!(error.code.0, -32602);
        assert!(error.message.contains("unknown tool `nope`"), "{err}");
        client.cancel().await.ok();
        env.assert_ledger_ok().await;
    }
}
