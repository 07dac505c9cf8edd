//! The library example (`examples/weather.rs`), built and driven as a
//! test: its tools, priced through the gate, over an in-process MCP session.

#[allow(dead_code)]
#[path = "../../examples/weather.rs"]
mod weather;

use serde_json::json;
use tollgate::{
    money::{Currency, Units},
    store::AccountRef,
};

use crate::harness::{Env, error_code, payment_meta, text};

on_both_backends! {
    #[tokio::test]
    async fn the_library_example_serves_priced_tools_through_the_gate() {
        let env = Env::with_pricing(weather::PRICING);
        let pricing = format!(
            "{}\n[receipts]\nkey_file = \"{}\"\n",
            weather::PRICING,
            env.key.display()
        );
        let tollgate = weather::weather(&pricing)
            .expect("pricing")
            .store_url(env.db.clone())
            .build()
            .await
            .expect("build");
        let usd = Currency::parse("USD").unwrap();
        tollgate
            .gate()
            .store()
            .topup(
                &AccountRef::wallet("alice", &usd),
                Units::parse("1.00").unwrap(),
                None,
            )
            .await
            .unwrap();

        let client = crate::harness::embedded_client(&tollgate, "alice").await;

        let tools = client.list_all_tools().await.unwrap();
        let forecast = tools.iter().find(|t| t.name == "forecast").unwrap();
        assert!(
            forecast
                .description
                .as_deref()
                .unwrap()
                .ends_with("(price: 0.05 USD per call)")
        );
        assert_eq!(forecast.input_schema["required"], json!(["city"]));

        let r = crate::harness::call(&client, "forecast", json!({"city": "Oslo", "days": 2})).await;
        assert_eq!(text(&r), "Oslo: sunny for the next 2 day(s).");
        assert_eq!(payment_meta(&r)["status"], "paid");
        // The function's Err is a tool error: released, not charged.
        let r = crate::harness::call(&client, "forecast", json!({"city": "Oslo", "days": 30})).await;
        assert_eq!(r.is_error, Some(true));
        assert_eq!(payment_meta(&r)["status"], "released");
        // Schema violations name the field and charge nothing.
        let r = crate::harness::call(&client, "forecast", json!({"town": "Oslo"})).await;
        assert_eq!(error_code(&r), "invalid_arguments");
        // Unpriced: free.
        let r = crate::harness::call(&client, "cities", json!({})).await;
        assert_eq!(text(&r), "Oslo, Lima, Pune");
        assert!(payment_meta(&r).is_null());
        assert_eq!(env.available("alice").await, "0.95");
        client.cancel().await.ok();
        env.assert_ledger_ok().await;
    }
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct WithPaymentId {
    #[allow(dead_code)]
    payment_id: String,
}

/// A tool the gate could never route to (named like a dynamic confirm
/// tool), or whose own `payment_id` argument a resubmitting mode would take
/// for the payment, is refused at start, naming it.
#[tokio::test]
async fn tools_that_clash_with_the_gates_names_are_refused_at_start() {
    let build = async |pricing: &str, name: &'static str| {
        let env = Env::with_pricing(pricing);
        let text = format!(
            "{pricing}\n[receipts]\nkey_file = \"{}\"\n",
            env.key.display()
        );
        tollgate::Tollgate::from_pricing(&text)
            .expect("pricing")
            .tool(name, "A tool.", |_: WithPaymentId| async { "ok" })
            .store_url(env.db.clone())
            .build()
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let error = build(
        "[server]\nname = \"t\"\ncurrency = \"USD\"\n",
        "confirm_pay_0123456789",
    )
    .await;
    assert!(
        error.contains("`confirm_pay_0123456789` is named like the confirm tools"),
        "{error}"
    );
    let priced = "[server]\nname = \"t\"\ncurrency = \"USD\"\nmode = \"resubmit\"\n\n[[tools]]\nname = \"lookup\"\nprice = \"0.01\"\n";
    let error = build(priced, "lookup").await;
    assert!(
        error.contains("`lookup` has its own `payment_id` argument"),
        "{error}"
    );
    let error = build(&priced.replace("resubmit", "two_step"), "lookup").await;
    assert!(
        error.is_empty(),
        "two_step takes no payment_id from the tool's arguments: {error}"
    );
}

/// Two tools given one name are refused at start. (The second silently
/// replaced the first, which then answered nothing.)
#[tokio::test]
async fn two_tools_of_one_name_are_refused_at_start() {
    let env = Env::new("resubmit");
    let text = format!(
        "[server]\nname = \"t\"\ncurrency = \"USD\"\n\n[receipts]\nkey_file = \"{}\"\n",
        env.key.display()
    );
    let twice = || {
        tollgate::tools::functions::FnTools::new()
            .tool("lookup", "The first.", |_: NoArguments| async { "first" })
            .tool("lookup", "The second.", |_: NoArguments| async { "second" })
    };
    // Added to the builder, or handed to it as a backend of their own.
    let added = tollgate::Tollgate::from_pricing(&text)
        .expect("pricing")
        .tool("lookup", "The first.", |_: NoArguments| async { "first" })
        .tool("lookup", "The second.", |_: NoArguments| async { "second" });
    let handed = tollgate::Tollgate::from_pricing(&text)
        .expect("pricing")
        .backend(std::sync::Arc::new(twice()));
    for builder in [added, handed] {
        let built = builder.store_url(env.db.clone()).build().await;
        let error = built.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(error.contains("two tools are named `lookup`"), "{error}");
    }
}

/// An in-memory SQLite store is refused when building, naming it (the
/// store's own connections would each open another database).
#[tokio::test]
async fn an_in_memory_store_is_refused_when_building() {
    let env = Env::new("resubmit");
    let text = format!(
        "[server]\nname = \"t\"\ncurrency = \"USD\"\n\n[receipts]\nkey_file = \"{}\"\n",
        env.key.display()
    );
    for url in [
        "sqlite::memory:",
        "sqlite://:memory:",
        "sqlite://x.db?mode=memory",
    ] {
        let built = tollgate::Tollgate::from_pricing(&text)
            .expect("pricing")
            .store_url(url)
            .build()
            .await;
        let error = built.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            error.contains(&format!("`{url}` is an in-memory SQLite database")),
            "{url}: {error}"
        );
    }
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct NoArguments {}

/// Pricing in resubmit mode, with `env`'s receipt key, of `tools` at 0.10
/// USD each.
fn resubmit_pricing(env: &Env, tools: &[&str]) -> String {
    let mut text = format!(
        "[server]\nname = \"t\"\ncurrency = \"USD\"\nmode = \"resubmit\"\n\n\
         [receipts]\nkey_file = \"{}\"\n",
        env.key.display()
    );
    for tool in tools {
        text += &format!("\n[[tools]]\nname = \"{tool}\"\nprice = \"0.10\"\n");
    }
    text
}

/// A tool whose arguments are not an object could never be called (MCP
/// sends an object), so building refuses it.
#[tokio::test]
async fn a_tool_whose_arguments_are_not_an_object_is_refused_at_start() {
    let env = Env::new("resubmit");
    let text = format!(
        "[server]\nname = \"t\"\ncurrency = \"USD\"\n\n[receipts]\nkey_file = \"{}\"\n",
        env.key.display()
    );
    let built = tollgate::Tollgate::from_pricing(&text)
        .expect("pricing")
        .tool("shout", "Shouts.", |text: String| async move {
            text.to_uppercase()
        })
        .store_url(env.db.clone())
        .build()
        .await;
    let error = built.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        error.contains("tool `shout`: its arguments must be a struct (a JSON object)"),
        "{error}"
    );
    // A tagged enum is read from an object too (its schema is a `oneOf`).
    let built = tollgate::Tollgate::from_pricing(&text)
        .expect("pricing")
        .tool("turn", "Turns.", |way: Turn| async move {
            match way {
                Turn::Left { degrees } => format!("left {degrees}"),
                Turn::Right { degrees } => format!("right {degrees}"),
            }
        })
        .store_url(env.db.clone())
        .build()
        .await;
    assert!(built.is_ok(), "{:?}", built.err().map(|e| e.to_string()));
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(tag = "way")]
enum Turn {
    Left { degrees: u32 },
    Right { degrees: u32 },
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct Basket {
    #[schemars(length(max = 3))]
    items: Vec<Item>,
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct Item {
    #[schemars(regex(pattern = r"^[a-z]+$"))]
    name: String,
}

on_both_backends! {
    /// What an embedded tool's schema says of its arguments holds before
    /// any money moves, at any depth: more items than it takes, or an
    /// item's name that misses its pattern, is `invalid_arguments` and
    /// nothing is held. (Only top-level lengths and ranges were checked;
    /// the rest ran, and was charged.)
    #[tokio::test]
    async fn an_embedded_tools_whole_schema_is_checked_before_any_charge() {
        let env = Env::new("resubmit");
        env.topup("alice", "1.00").await;
        let pricing = resubmit_pricing(&env, &["pack"]);
        let tollgate = tollgate::Tollgate::from_pricing(&pricing)
            .expect("pricing")
            .tool("pack", "Packs a basket.", |b: Basket| async move {
                let names: Vec<String> = b.items.into_iter().map(|i| i.name).collect();
                format!("packed {}", names.join(", "))
            })
            .store_url(env.db.clone())
            .build()
            .await
            .expect("build");
        let alice = crate::harness::embedded_client(&tollgate, "alice").await;
        let item = |name: &str| json!({"name": name});
        let r = crate::harness::call(&alice, "pack", json!({"items": [item("a"), item("b")]})).await;
        assert_eq!(text(&r), "packed a, b");
        for refused in [
            json!({"items": [item("a"), item("b"), item("c"), item("d")]}),
            json!({"items": [item("a"), item("B4D")]}),
        ] {
            let r = crate::harness::call(&alice, "pack", refused.clone()).await;
            assert_eq!(error_code(&r), "invalid_arguments", "{refused}: {r:?}");
        }
        assert_eq!(env.available("alice").await, "0.90", "only the good call was charged");
        alice.cancel().await.ok();
        env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    /// An embedder's shutdown turns new calls away and waits for the one
    /// under way, which is charged and answered. (The library had no way to
    /// stop the gate: a process that ended under a running call left its
    /// hold open until recovery.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_embedders_shutdown_waits_for_the_call_under_way() {
        use std::{sync::Arc, time::Duration};
        let env = Env::new("resubmit");
        env.topup("alice", "1.00").await;
        let pricing = resubmit_pricing(&env, &["slow"]);
        let started = Arc::new(tokio::sync::Notify::new());
        let starting = started.clone();
        let tollgate = Arc::new(
            tollgate::Tollgate::from_pricing(&pricing)
                .expect("pricing")
                .tool("slow", "Takes a moment.", move |_: NoArguments| {
                    let started = starting.clone();
                    async move {
                        started.notify_one();
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        "done"
                    }
                })
                .store_url(env.db.clone())
                .build()
                .await
                .expect("build"),
        );
        let client = crate::harness::embedded_client(&tollgate, "alice").await;
        let peer = client.peer().clone();
        let run = tokio::spawn(async move {
            peer.call_tool(rmcp::model::CallToolRequestParams::new("slow")).await
        });
        started.notified().await;
        let stopping = tokio::spawn({
            let tollgate = tollgate.clone();
            async move { tollgate.shutdown(Duration::from_secs(10)).await }
        });
        // New calls are turned away meanwhile.
        while !tollgate.gate().is_closed() {
            tokio::task::yield_now().await;
        }
        let refused = client
            .peer()
            .call_tool(rmcp::model::CallToolRequestParams::new("slow"))
            .await;
        assert!(
            refused.as_ref().is_err_and(|e| e.to_string().contains("shutting down")),
            "{refused:?}"
        );
        assert_eq!(stopping.await.unwrap(), 0, "the call under way finished");
        let r = run.await.unwrap().unwrap();
        assert_eq!(text(&r), "done");
        assert_eq!(payment_meta(&r)["status"], "paid");
        assert_eq!(env.available("alice").await, "0.90");
        client.cancel().await.ok();
        env.assert_ledger_ok().await;
    }

    /// A paid run under way for longer than recovery's margin for dropped
    /// claims is still its runner's: recovery leaves it alone, and it ends
    /// charged as usual.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn recovery_leaves_a_long_paid_run_under_way_alone() {
        use std::{sync::Arc, time::Duration};
        let env = Env::new("resubmit");
        env.topup("carol", "1.00").await;
        let pricing = resubmit_pricing(&env, &["slow"]);
        let go = Arc::new(tokio::sync::Notify::new());
        let waiting = go.clone();
        let tollgate = tollgate::Tollgate::from_pricing(&pricing)
            .expect("pricing")
            .tool("slow", "Runs until let go.", move |_: NoArguments| {
                let go = waiting.clone();
                async move {
                    go.notified().await;
                    "done"
                }
            })
            .store_url(env.db.clone())
            .build()
            .await
            .expect("build");
        let client = crate::harness::embedded_client(&tollgate, "alice").await;
        let r = crate::harness::call(&client, "slow", json!({})).await;
        let id = crate::harness::payment_id_of(&r);
        env.ok(&["sessions", "pay", &id, "--from", "carol"]).await;
        let peer = client.peer().clone();
        let params = rmcp::model::CallToolRequestParams::new("slow")
            .with_arguments(json!({"payment_id": id}).as_object().unwrap().clone());
        let run = tokio::spawn(async move { peer.call_tool(params).await });

        let store = tollgate.gate().store().clone();
        // Unless the run is seen under way, "nothing refunded" would prove
        // nothing: recovery has no running intent to leave alone.
        let mut running = false;
        for _ in 0..500 {
            if store.intent(&id).await.unwrap().unwrap().status.as_str() == "running" {
                running = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(running, "the paid run never reached running");
        // Running, as if for two minutes.
        let aged = format!("UPDATE intents SET updated_at = updated_at - 120000 WHERE id = '{id}'");
        tollgate::testing::execute(&env.db, &aged).await.unwrap();
        let now = tollgate::store::now_ms();
        let recovered = tollgate.gate().recover_interrupted(now).await.unwrap();
        assert_eq!(recovered.runs_refunded, 0, "a run under way is its runner's");
        go.notify_one();
        let r = run.await.unwrap().unwrap();
        assert_eq!(text(&r), "done");
        assert_eq!(payment_meta(&r)["status"], "paid");
        assert_eq!(env.available("carol").await, "0.90");
        client.cancel().await.ok();
        env.assert_ledger_ok().await;
    }
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct Index {
    at: usize,
}

/// A tollgate over `pricing` with the embedded tool `nap`, which sleeps
/// for `at` milliseconds and says "rested".
fn napping(pricing: &str) -> tollgate::TollgateBuilder {
    tollgate::Tollgate::from_pricing(pricing)
        .expect("pricing")
        .tool("nap", "Sleeps for a while.", |i: Index| async move {
            tokio::time::sleep(std::time::Duration::from_millis(i.at as u64)).await;
            "rested".to_owned()
        })
}

on_both_backends! {
    /// A handler that panics on its input is a failed run: the caller is
    /// answered, and nothing is charged, on the fast path (the hold is
    /// released) and on a paid slow-path call (refunded). Before, the call
    /// was never answered and the hold stayed open until it expired.
    #[tokio::test]
    async fn a_panicking_tool_is_a_failed_run_and_costs_nothing() {
        let env = Env::new("resubmit");
        env.topup("alice", "1.00").await;
        env.topup("carol", "1.00").await;
        let pricing = resubmit_pricing(&env, &["pick"]);
        let tollgate = tollgate::Tollgate::from_pricing(&pricing)
            .expect("pricing")
            .tool("pick", "Picks a letter.", |i: Index| async move {
                ["a", "b"][i.at].to_owned()
            })
            .store_url(env.db.clone())
            .build()
            .await
            .expect("build");
        let alice = crate::harness::embedded_client(&tollgate, "alice").await;
        let r = crate::harness::call(&alice, "pick", json!({"at": 1})).await;
        assert_eq!(text(&r), "b");
        let r = crate::harness::call(&alice, "pick", json!({"at": 7})).await;
        assert_eq!(r.is_error, Some(true), "{r:?}");
        assert!(text(&r).contains("failed unexpectedly"), "{}", text(&r));
        assert_eq!(payment_meta(&r)["status"], "released");
        assert_eq!(env.available("alice").await, "0.90");

        let bob = crate::harness::embedded_client(&tollgate, "bob").await;
        let r = crate::harness::call(&bob, "pick", json!({"at": 7})).await;
        let id = crate::harness::payment_id_of(&r);
        env.ok(&["sessions", "pay", &id, "--from", "carol"]).await;
        let r = crate::harness::call(&bob, "pick", json!({"at": 7, "payment_id": id})).await;
        assert_eq!(r.is_error, Some(true), "{r:?}");
        assert_eq!(payment_meta(&r)["status"], "refunded", "{r:?}");
        assert_eq!(env.available("carol").await, "1.00");
        for client in [alice, bob] {
            client.cancel().await.ok();
        }
        env.assert_ledger_ok().await;
    }

    /// Embedded tools can be given a run limit: a run past it is stopped
    /// and fails, and its hold is given back. (They had none.)
    #[tokio::test]
    async fn an_embedded_tool_past_its_run_limit_is_stopped_and_costs_nothing() {
        let env = Env::new("resubmit");
        env.topup("alice", "1.00").await;
        let pricing = resubmit_pricing(&env, &["nap", "doze"]);
        let tollgate = napping(&pricing)
            .tool("doze", "Blocks its thread for a while.", |i: Index| async move {
                std::thread::sleep(std::time::Duration::from_millis(i.at as u64));
                "rested".to_owned()
            })
            .run_limit(std::time::Duration::from_millis(300))
            .store_url(env.db.clone())
            .build()
            .await
            .expect("build");
        let alice = crate::harness::embedded_client(&tollgate, "alice").await;
        let r = crate::harness::call(&alice, "nap", json!({"at": 10})).await;
        assert_eq!(text(&r), "rested");
        let r = crate::harness::call(&alice, "nap", json!({"at": 5000})).await;
        assert_eq!(r.is_error, Some(true), "{r:?}");
        assert!(text(&r).contains("did not finish within 0.3s"), "{}", text(&r));
        assert_eq!(payment_meta(&r)["status"], "released");
        // One that blocks its thread cannot be stopped, but is found late
        // when it returns, and fails all the same.
        let r = crate::harness::call(&alice, "doze", json!({"at": 600})).await;
        assert_eq!(r.is_error, Some(true), "{r:?}");
        assert!(text(&r).contains("ran past its limit of 0.3s"), "{}", text(&r));
        assert_eq!(payment_meta(&r)["status"], "released");
        assert_eq!(env.available("alice").await, "0.90");
        let (_, held, _) = env.balance("alice").await;
        assert_eq!(held, "0.00");
        alice.cancel().await.ok();
        env.assert_ledger_ok().await;
    }
}

/// A backend whose argument check panics: a defect in code the gate runs
/// before the tool, outside the tool's own run.
struct PanicsWhenChecked;

#[async_trait::async_trait]
impl tollgate::tools::ToolBackend for PanicsWhenChecked {
    fn tools(&self) -> Vec<rmcp::model::Tool> {
        let schema = json!({"type": "object"})
            .as_object()
            .cloned()
            .unwrap_or_default();
        vec![rmcp::model::Tool::new(
            "brittle",
            "Breaks when checked.",
            std::sync::Arc::new(schema),
        )]
    }
    fn validate(
        &self,
        _tool: &str,
        _args: &rmcp::model::JsonObject,
    ) -> Result<(), tollgate::tools::ArgumentError> {
        panic!("a defect in the argument check")
    }
    async fn call(
        &self,
        _tool: &str,
        _args: rmcp::model::JsonObject,
        _context: &tollgate::tools::CallContext,
    ) -> rmcp::model::CallToolResult {
        rmcp::model::CallToolResult::success(vec![rmcp::model::ContentBlock::text("ran")])
    }
}

on_both_backends! {
    /// A call whose handling panics in the gate (not in the tool) gets an
    /// internal error, and the session goes on serving. It used to be left
    /// unanswered: the client waited for ever.
    #[tokio::test]
    async fn a_call_the_gate_fails_on_unexpectedly_is_answered() {
        let env = Env::new("resubmit");
        env.topup("alice", "1.00").await;
        let pricing = resubmit_pricing(&env, &["brittle", "nap"]);
        let tollgate = napping(&pricing)
            .backend(std::sync::Arc::new(PanicsWhenChecked))
            .store_url(env.db.clone())
            .build()
            .await
            .expect("build");
        let alice = crate::harness::embedded_client(&tollgate, "alice").await;
        let brittle = rmcp::model::CallToolRequestParams::new("brittle")
            .with_arguments(json!({}).as_object().cloned().unwrap_or_default());
        let answer = tokio::time::timeout(std::time::Duration::from_secs(10), alice.call_tool(brittle))
            .await
            .expect("answered");
        match answer {
            Err(rmcp::ServiceError::McpError(e)) => {
                assert_eq!(e.code, rmcp::model::ErrorCode::INTERNAL_ERROR, "{e:?}");
                assert!(e.message.contains("failed unexpectedly"), "{e:?}");
            }
            other => panic!("expected an internal error, got {other:?}"),
        }
        let r = crate::harness::call(&alice, "nap", json!({"at": 1})).await;
        assert_eq!(text(&r), "rested", "still serving");
        assert_eq!(env.available("alice").await, "0.90");
        alice.cancel().await.ok();
        env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    /// A run limit too long to be a deadline (`Duration::MAX`: "no limit")
    /// is taken as the longest one a configuration may give: the call runs
    /// and is charged. (It used to panic, adding the hold's margin.)
    #[tokio::test]
    async fn an_embedded_run_limit_of_forever_runs_and_charges() {
        let env = Env::new("resubmit");
        env.topup("alice", "1.00").await;
        let pricing = resubmit_pricing(&env, &["nap"]);
        let tollgate = napping(&pricing)
            .run_limit(std::time::Duration::MAX)
            .store_url(env.db.clone())
            .build()
            .await
            .expect("build");
        let alice = crate::harness::embedded_client(&tollgate, "alice").await;
        let r = crate::harness::call(&alice, "nap", json!({"at": 10})).await;
        assert_eq!(text(&r), "rested", "{r:?}");
        assert_eq!(payment_meta(&r)["status"], "paid");
        assert_eq!(env.available("alice").await, "0.90");
        alice.cancel().await.ok();
        env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    /// A fast-path call answered without its result ("nothing was
    /// charged") whose hold was not given back before the server stopped
    /// is given back when it starts again, from the note left beside the
    /// receipt key: here its capture had landed unseen, and is refunded.
    #[tokio::test]
    async fn a_call_withheld_before_a_restart_is_given_back_at_start() {
        use std::time::Duration;
        use tollgate::{
            gate::WithheldNotes,
            store::{AccountKind, Charge, HoldOutcome, HoldRequest, now_ms},
        };
        let env = Env::new("resubmit");
        env.topup("alice", "1.00").await;
        let store = tollgate::testing::open_store(&env.db).await.unwrap();
        let usd = Currency::parse("USD").unwrap();
        let id = "pay_0123456789abcdef";
        let hold = HoldRequest {
            hold_id: id.into(),
            principal: "alice".into(),
            amount: Units::parse("0.10").unwrap(),
            currency: usd.clone(),
            tool: "echo".into(),
            args_hash: "h".into(),
            expires_at: now_ms() + 60_000,
            origin: Default::default(),
        };
        assert_eq!(store.hold(&hold).await.unwrap(), HoldOutcome::Held);
        let author = AccountRef::new(AccountKind::Revenue, "author", &usd);
        store.capture(id, &Charge::whole(author, Units::parse("0.10").unwrap())).await.unwrap();
        let notes = WithheldNotes::beside(&env.key);
        notes.note(id).unwrap();
        assert_eq!(env.available("alice").await, "0.90");

        let pricing = format!(
            "[server]\nname = \"t\"\ncurrency = \"USD\"\n\n[receipts]\nkey_file = \"{}\"\n",
            env.key.display()
        );
        let _tollgate = tollgate::Tollgate::from_pricing(&pricing)
            .expect("pricing")
            .store_url(env.db.clone())
            .build()
            .await
            .expect("build");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while env.available("alice").await != "1.00" {
            assert!(tokio::time::Instant::now() < deadline, "not given back at start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        while !notes.pending().is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "the note was kept");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        env.assert_ledger_ok().await;
    }
}
