//! Upstream MCP servers behind tollgate: a test upstream over streamable HTTP
//! written here, and (ignored unless installed) the reference
//! `@modelcontextprotocol/server-everything` from npm over stdio.

use std::{sync::Arc, time::Duration};

use rmcp::{
    ErrorData as McpError, RoleServer, ServerHandler,
    model::{
        CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, ListToolsResult,
        PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
    },
    service::RequestContext,
    transport::streamable_http_server::{
        StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
    },
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::{
    harness::{error_code, payment_meta, structured, text},
    inproc::{Elicitation, InProcess, Person, call},
};

/// An upstream that fails when asked, hangs when asked (noting when a
/// hanging call is cancelled), and reports progress.
#[derive(Clone, Default)]
struct TestUpstream {
    cancelled: Arc<std::sync::atomic::AtomicUsize>,
    /// How many `more_N` tools `grow` has added (once it has, `count`'s
    /// schema takes no `n` above 3).
    grown: Arc<std::sync::atomic::AtomicUsize>,
    /// How many calls of `book` reached it, good or bad.
    booked: Arc<std::sync::atomic::AtomicUsize>,
}

/// What `forecast` answers: its outputSchema.
fn forecast_schema() -> Arc<rmcp::model::JsonObject> {
    let schema = json!({
        "type": "object",
        "properties": {"city": {"type": "string"}, "high": {"type": "number"}},
        "required": ["city", "high"],
        "additionalProperties": false
    });
    Arc::new(schema.as_object().cloned().unwrap_or_default())
}

/// `book`'s arguments: strict, as a typed server's are.
fn booking_schema() -> Arc<rmcp::model::JsonObject> {
    let schema = json!({
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "nights": {"type": "integer", "minimum": 1}
        },
        "required": ["city", "nights"],
        "additionalProperties": false
    });
    Arc::new(schema.as_object().cloned().unwrap_or_default())
}

fn schema(props: serde_json::Value) -> Arc<rmcp::model::JsonObject> {
    Arc::new(
        json!({"type": "object", "properties": props})
            .as_object()
            .cloned()
            .unwrap_or_default(),
    )
}

impl ServerHandler for TestUpstream {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_tool_list_changed()
                .build(),
        )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        let grown = self.grown.load(std::sync::atomic::Ordering::SeqCst);
        let more = (1..=grown)
            .map(|n| Tool::new(format!("more_{n}"), "Added by grow.", schema(json!({}))));
        Ok(ListToolsResult::with_all_items(
            more.chain([
                Tool::new(
                    "work",
                    "Does some work; fails when asked.",
                    schema(json!({"fail": {"type": "boolean"}})),
                ),
                Tool::new("hang", "Never answers.", schema(json!({}))),
                Tool::new("steps", "Reports progress three times.", schema(json!({}))),
                Tool::new("extra", "Not priced in pricing.toml.", schema(json!({}))),
                Tool::new("grow", "Adds a tool and says so.", schema(json!({}))),
                Tool::new("ask", "Asks the person a question.", schema(json!({}))),
                Tool::new(
                    "late_ask",
                    "Works 1.5s whatever happens, then asks.",
                    schema(json!({})),
                ),
                Tool::new(
                    "count",
                    "Counts to n (n defaults to 50, and a numeric string will do).",
                    // Once grown, at most 3: a schema tightened upstream.
                    schema(if grown > 0 {
                        json!({"n": {"type": "integer", "maximum": 3}})
                    } else {
                        json!({"n": {"type": "integer"}})
                    }),
                ),
                Tool::new(
                    "count_either",
                    "Counts to n, given as a number or a numeric string.",
                    schema(json!({"n": {"type": ["integer", "string"]}})),
                ),
                Tool::new("book", "Books a stay.", booking_schema()),
                Tool::new(
                    "forecast",
                    "Forecasts a city's high.",
                    schema(json!({"city": {"type": "string"}})),
                )
                .with_raw_output_schema(forecast_schema()),
                // A pattern no regex engine takes: not checkable here.
                Tool::new(
                    "odd",
                    "Takes a code.",
                    schema(json!({"code": {"type": "string", "pattern": "(unclosed"}})),
                ),
            ])
            .collect(),
        ))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let args = request.arguments.unwrap_or_default();
        let result = match request.name.as_ref() {
            "work" if args.get("fail") == Some(&json!(true)) => {
                CallToolResult::error(vec![ContentBlock::text("the work failed, as asked")])
            }
            "work" => {
                let mut r = CallToolResult::success(vec![ContentBlock::text("worked")]);
                r.structured_content = Some(json!({"done": true}));
                r
            }
            "hang" => {
                context.ct.cancelled().await;
                self.cancelled
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                CallToolResult::error(vec![ContentBlock::text("cancelled")])
            }
            "steps" => {
                if let Some(token) = context.meta.get_progress_token() {
                    for step in 1..=3 {
                        let note = rmcp::model::ProgressNotificationParam::new(
                            token.clone(),
                            f64::from(step),
                        )
                        .with_total(3.0)
                        .with_message(format!("step {step}"));
                        let _ = context.peer.notify_progress(note).await;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                CallToolResult::success(vec![ContentBlock::text("three steps")])
            }
            "late_ask" => {
                // From a task of its own, as a server that goes on working
                // after a cancel would: the question comes on the session's
                // own stream, tied to no request.
                let peer = context.peer.clone();
                let asked = tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    peer.create_elicitation(proceed_question()).await
                });
                match asked.await {
                    Ok(Ok(answer)) => CallToolResult::success(vec![ContentBlock::text(format!(
                        "{:?}",
                        answer.action
                    ))]),
                    _ => CallToolResult::error(vec![ContentBlock::text("no answer")]),
                }
            }
            "ask" => match context.peer.create_elicitation(proceed_question()).await {
                Ok(answer) => CallToolResult::success(vec![ContentBlock::text(format!(
                    "{:?}",
                    answer.action
                ))]),
                Err(e) => {
                    CallToolResult::error(vec![ContentBlock::text(format!("no answer: {e}"))])
                }
            },
            "grow" => {
                self.grown.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = context.peer.notify_tool_list_changed().await;
                CallToolResult::success(vec![ContentBlock::text("grown")])
            }
            "book" => {
                self.booked
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                // Refused the way a typed server refuses: a JSON-RPC error.
                let (Some(city), Some(nights)) = (
                    args.get("city").and_then(Value::as_str),
                    args.get("nights").and_then(Value::as_u64),
                ) else {
                    return Err(McpError::invalid_params("bad booking", None));
                };
                CallToolResult::success(vec![ContentBlock::text(format!(
                    "booked {nights} nights in {city}"
                ))])
            }
            "forecast" => {
                let city = args.get("city").and_then(Value::as_str).unwrap_or("Oslo");
                let mut r = CallToolResult::success(vec![ContentBlock::text(format!(
                    "{city}: high of 21.5"
                ))]);
                r.structured_content = match city {
                    // Results its own outputSchema does not take.
                    "Nowhere" => Some(json!({"city": city, "high": "warm"})),
                    "Bare" => None,
                    _ => Some(json!({"city": city, "high": 21.5})),
                };
                if city == "Forged" {
                    // Keys of the gate's own: not the gate's reply, nor its payment.
                    let mut meta = rmcp::model::MetaObject::new();
                    meta.0.insert(
                        "tollgate/reply".into(),
                        json!({"error": "payment_required"}),
                    );
                    meta.0
                        .insert("tollgate/payment".into(), json!({"status": "refunded"}));
                    meta.0.insert("source".into(), json!("upstream"));
                    r.meta = Some(meta);
                }
                r
            }
            "count" | "count_either" => {
                // Lax, as many servers are: what a metered price must not trust.
                let n = match args.get("n") {
                    None => 50,
                    Some(Value::String(s)) => s.parse().unwrap_or(0),
                    Some(v) => v.as_i64().unwrap_or(0),
                };
                CallToolResult::success(vec![ContentBlock::text(format!("counted to {n}"))])
            }
            _ => CallToolResult::success(vec![ContentBlock::text("extra")]),
        };
        Ok(result.into())
    }
}

/// The question the test upstream asks.
fn proceed_question() -> rmcp::model::ElicitRequestParams {
    rmcp::model::ElicitRequestParams::FormElicitationParams {
        meta: None,
        message: "Proceed?".into(),
        requested_schema: rmcp::model::ElicitationSchema::builder()
            .required_bool("proceed")
            .build()
            .expect("schema"),
    }
}

async fn spawn_upstream() -> (String, CancellationToken) {
    let (url, ct, _) = spawn_upstream_at("127.0.0.1:0", TestUpstream::default()).await;
    (url, ct)
}

async fn spawn_upstream_at(
    addr: &str,
    upstream: TestUpstream,
) -> (String, CancellationToken, TestUpstream) {
    let ct = CancellationToken::new();
    let handler = upstream.clone();
    let service = StreamableHttpService::new(
        move || Ok(handler.clone()),
        LocalSessionManager::default().into(),
        StreamableHttpServerConfig::default()
            .with_legacy_session_mode(true)
            .with_cancellation_token(ct.child_token()),
    );
    let app = axum::Router::new().nest_service("/mcp", service);
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = ct.clone();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
    });
    (format!("http://{addr}/mcp"), ct, upstream)
}

/// The harness's pricing prices demo tools, which a gateway serves only
/// when asked to.
const DEMO_TOO: &str = "demo_tools = true\n";

fn upstream_pricing(url: &str, unpriced: &str) -> String {
    crate::harness::pricing("resubmit", DEMO_TOO)
        + &format!(
            "\n[[upstreams]]\nname = \"test\"\nurl = \"{url}\"\nprefix = true\nunpriced = \"{unpriced}\"\ntimeout = \"300ms\"\n\n\
             [[tools]]\nname = \"test_work\"\nprice = \"0.10\"\n\n[[tools]]\nname = \"test_hang\"\nprice = \"0.10\"\n\n\
             [[tools]]\nname = \"test_steps\"\nprice = \"0.10\"\n"
        )
}

on_both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_upstream_is_priced_and_its_failures_and_timeouts_charge_nothing() {
        let (url, upstream) = spawn_upstream().await;
        let t = InProcess::new(&upstream_pricing(&url, "free")).await;
        t.env.topup("alice", "1.00").await;
        let client = t
            .connect(
                Some("alice"),
                t.client(Person::Ignores, Elicitation::None),
                false,
            )
            .await;

        let tools = client.list_all_tools().await.unwrap();
        let work = tools
            .iter()
            .find(|t| t.name == "test_work")
            .expect("prefixed upstream tool");
        assert_eq!(
            work.description.as_deref(),
            Some("Does some work; fails when asked. (price: 0.10 USD per call)")
        );
        assert_eq!(
            work.meta.as_ref().unwrap().0["tollgate/price"]["amount"],
            "0.10"
        );
        let extra = tools
            .iter()
            .find(|t| t.name == "test_extra")
            .expect("unpriced: free");
        assert!(extra.meta.is_none());
        assert!(
            tools.iter().any(|t| t.name == "echo"),
            "the demo tools are still served"
        );

        // Success: arguments, content and structuredContent pass through; charged.
        let r = call(&client, "test_work", json!({})).await;
        assert_eq!(text(&r), "worked");
        assert_eq!(structured(&r), json!({"done": true}));
        assert_eq!(payment_meta(&r)["status"], "paid");
        assert_eq!(t.env.available("alice").await, "0.90");

        // The upstream's isError releases the hold.
        let r = call(&client, "test_work", json!({"fail": true})).await;
        assert_eq!(r.is_error, Some(true));
        assert!(text(&r).contains("failed, as asked"));
        assert_eq!(payment_meta(&r)["status"], "released");
        // A call past the upstream's timeout is released, not charged
        // ("no answer within" is the timeout's own message).
        let r = call(&client, "test_hang", json!({})).await;
        assert_eq!(r.is_error, Some(true));
        assert!(text(&r).contains("no answer within"), "{}", text(&r));
        assert_eq!(payment_meta(&r)["status"], "released");
        assert_eq!(t.env.available("alice").await, "0.90");

        // An upstream that is gone: its tools answer isError, nothing is
        // charged, and the rest of the server keeps serving.
        upstream.cancel();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let r = call(&client, "test_work", json!({})).await;
        assert_eq!(r.is_error, Some(true), "{r:?}");
        assert!(
            text(&r).contains("upstream `test` unavailable"),
            "{}",
            text(&r)
        );
        assert_eq!(t.env.available("alice").await, "0.90");
        let r = call(&client, "echo", json!({"text": "still here"})).await;
        assert_eq!(text(&r), "still here");
        client.cancel().await.ok();
        t.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unpriced_upstream_tools_can_be_hidden_or_priced_by_default() {
        let (url, _upstream) = spawn_upstream().await;
        let t = InProcess::new(&upstream_pricing(&url, "hidden")).await;
        let client = t
            .connect(None, t.client(Person::Ignores, Elicitation::None), false)
            .await;
        let tools = client.list_all_tools().await.unwrap();
        assert!(!tools.iter().any(|t| t.name == "test_extra"), "hidden");
        let err = client
            .call_tool(CallToolRequestParams::new("test_extra"))
            .await
            .expect_err("a hidden tool cannot be called");
        assert!(err.to_string().contains("unknown tool"));
        client.cancel().await.ok();

        let t = InProcess::new(&upstream_pricing(&url, "0.07")).await;
        let client = t
            .connect(None, t.client(Person::Ignores, Elicitation::None), false)
            .await;
        let tools = client.list_all_tools().await.unwrap();
        let extra = tools.iter().find(|t| t.name == "test_extra").unwrap();
        assert_eq!(
            extra.meta.as_ref().unwrap().0["tollgate/price"]["amount"],
            "0.07"
        );
        let r = call(&client, "test_extra", json!({})).await;
        assert_eq!(error_code(&r), "payment_required");
        client.cancel().await.ok();
    }
}

on_both_backends! {
    #[tokio::test]
    async fn a_priced_tool_no_upstream_provides_is_a_start_up_error() {
        let (url, _upstream) = spawn_upstream().await;
        let text =
            upstream_pricing(&url, "free") + "\n[[tools]]\nname = \"test_missing\"\nprice = \"1\"\n";
        let env = crate::harness::Env::with_pricing(&text);
        let out = env.cli(&["serve"]).await;
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("no backend provides a tool named `test_missing`"),
            "{err}"
        );

        let text = crate::harness::pricing("resubmit", DEMO_TOO)
            + "\n[[upstreams]]\nname = \"gone\"\nurl = \"http://127.0.0.1:9/mcp\"\n";
        let env = crate::harness::Env::with_pricing(&text);
        let out = env.cli(&["serve"]).await;
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("upstream `gone`"));

        // One that takes the connection and never answers: an error within
        // its timeout, not a start that hangs.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((socket, _)) = silent.accept().await {
                open.push(socket);
            }
        });
        let text = crate::harness::pricing("resubmit", DEMO_TOO)
            + &format!(
                "\n[[upstreams]]\nname = \"mute\"\nurl = \"http://{addr}/mcp\"\ntimeout = \"500ms\"\n"
            );
        let env = crate::harness::Env::with_pricing(&text);
        let out = tokio::time::timeout(Duration::from_secs(20), env.cli(&["serve"]))
            .await
            .expect("the start hung on a silent upstream");
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("upstream `mute`") && err.contains("took longer than"), "{err}");
        held.abort();
    }
}

/// Where `.ci/run` installs the reference server.
fn everything() -> std::path::PathBuf {
    std::env::var_os("TOLLGATE_TEST_EVERYTHING").map_or_else(
        || {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(
                "target/npm/node_modules/@modelcontextprotocol/server-everything/dist/index.js",
            )
        },
        Into::into,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs @modelcontextprotocol/server-everything from npm; .ci/run installs it and runs this"]
async fn the_reference_server_everything_behind_tollgate() {
    let path = everything();
    assert!(
        path.exists(),
        "install it: npm install --prefix target/npm @modelcontextprotocol/server-everything"
    );
    let pricing = crate::harness::pricing("two_step", DEMO_TOO)
        + &format!(
            "\n[[upstreams]]\nname = \"everything\"\ncommand = [\"node\", \"{}\", \"stdio\"]\nprefix = \"everything_\"\n\n\
             [[tools]]\nname = \"everything_echo\"\nprice = \"0.02\"\n\n[[tools]]\nname = \"everything_get-sum\"\nprice = \"0.03\"\n",
            path.display()
        );
    let t = InProcess::new(&pricing).await;
    t.env.topup("alice", "1.00").await;
    let watcher = t.client(Person::Ignores, Elicitation::None);
    let alice = t.connect(Some("alice"), watcher.clone(), false).await;
    let tools = alice.list_all_tools().await.unwrap();
    let priced: Vec<_> = tools
        .iter()
        .filter(|t| {
            t.meta
                .as_ref()
                .is_some_and(|m| m.0.contains_key("tollgate/price"))
        })
        .map(|t| t.name.to_string())
        .collect();
    assert!(
        priced.contains(&"everything_echo".to_owned())
            && priced.contains(&"everything_get-sum".to_owned())
    );
    assert!(
        tools
            .iter()
            .any(|t| t.name == "everything_get-tiny-image" && t.meta.is_none()),
        "the rest free"
    );

    // Fast path.
    let r = call(&alice, "everything_echo", json!({"message": "hi"})).await;
    assert!(text(&r).contains("hi"), "{r:?}");
    assert_eq!(payment_meta(&r)["status"], "paid");
    let r = call(&alice, "everything_get-sum", json!({"a": 2, "b": 3})).await;
    assert!(text(&r).contains('5'), "{r:?}");
    assert_eq!(t.env.available("alice").await, "0.95");

    // two_step, for a caller without a wallet.
    let bob = t
        .connect(
            Some("bob"),
            t.client(Person::Ignores, Elicitation::None),
            false,
        )
        .await;
    let r = call(&bob, "everything_echo", json!({"message": "paid later"})).await;
    let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
    t.env.ok(&["sessions", "pay", &id]).await;
    let r = call(
        &bob,
        "confirm_everything_echo_payment",
        json!({"payment_id": id}),
    )
    .await;
    assert!(text(&r).contains("paid later"), "{r:?}");
    assert_eq!(payment_meta(&r)["status"], "paid");

    // Its long-running tool's progress notifications reach the client.
    let r = call(
        &alice,
        "everything_trigger-long-running-operation",
        json!({"duration": 1, "steps": 3}),
    )
    .await;
    assert_ne!(r.is_error, Some(true), "{r:?}");
    // Notifications are handled concurrently with the response: allow them
    // a moment to land.
    for _ in 0..50 {
        if watcher.progress.lock().unwrap().len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        watcher.progress.lock().unwrap().len() >= 3,
        "progress relayed"
    );

    // A free tool passes through untouched.
    let r = call(&alice, "everything_get-tiny-image", json!({})).await;
    assert_ne!(r.is_error, Some(true), "{r:?}");
    assert!(!r.content.is_empty());
    assert!(payment_meta(&r).is_null());
    alice.cancel().await.ok();
    bob.cancel().await.ok();
    t.env.assert_ledger_ok().await;
}

on_both_backends! {
    /// In progress mode the client first hears the gate (where to pay);
    /// once paid, the upstream's own progress is relayed going on from
    /// there: the values only grow, as MCP requires. (They went 1, then
    /// the upstream's 1, 2, 3.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_upstreams_progress_goes_on_from_the_gates_own() {
        let (url, _upstream) = spawn_upstream().await;
        let steps = "name = \"test_steps\"\nprice = \"0.10\"\n";
        let pricing = upstream_pricing(&url, "free")
            .replace(steps, &format!("{steps}mode = \"progress\"\n"));
        let t = InProcess::new(&pricing).await;
        let handler = t.client(Person::PaysAfterProgress(1), Elicitation::None);
        let client = t.connect(None, handler.clone(), false).await;
        let r = call(&client, "test_steps", json!({})).await;
        assert_eq!(text(&r), "three steps");
        let heard = || handler.progress.lock().unwrap().clone();
        for _ in 0..50 {
            if heard().last().and_then(|p| p.message.clone()).as_deref() == Some("step 3") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let heard = heard();
        assert!(heard[0].message.as_deref().is_some_and(|m| m.contains("/checkout/")), "{heard:?}");
        assert_eq!(heard.last().and_then(|p| p.message.clone()).as_deref(), Some("step 3"), "{heard:?}");
        assert!(heard.windows(2).all(|w| w[1].progress > w[0].progress), "{heard:?}");
        let last = heard.last().unwrap();
        assert_eq!((last.progress, last.total), (4.0, Some(4.0)), "3 of 3, after the gate's 1");
        client.cancel().await.ok();
        t.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn progress_and_cancellation_pass_through_and_a_lost_upstream_comes_back() {
        let upstream = TestUpstream::default();
        let (url, stop, upstream) = spawn_upstream_at("127.0.0.1:0", upstream).await;
        let t = InProcess::new(
            &upstream_pricing(&url, "free").replace("timeout = \"300ms\"", "timeout = \"30m\""),
        )
        .await;
        t.env.topup("alice", "1.00").await;
        let handler = t.client(Person::Ignores, Elicitation::None);
        let client = t.connect(Some("alice"), handler.clone(), false).await;

        // The upstream's progress notifications reach the client.
        let r = call(&client, "test_steps", json!({})).await;
        assert_eq!(text(&r), "three steps");
        let messages = || -> Vec<String> {
            handler
                .progress
                .lock()
                .unwrap()
                .iter()
                .filter_map(|p| p.message.clone())
                .collect()
        };
        for _ in 0..50 {
            if messages().len() >= 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut heard = messages();
        heard.sort();
        assert_eq!(heard, ["step 1", "step 2", "step 3"]);

        // The client's cancellation reaches the upstream; nothing is charged.
        let request = rmcp::model::ClientRequest::CallToolRequest(rmcp::model::Request::new(
            CallToolRequestParams::new("test_hang"),
        ));
        let handle = client
            .send_cancellable_request(request, rmcp::service::PeerRequestOptions::no_options())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Its hold outlives the upstream's timeout (30 minutes here), not
        // only the usual 15: the sweep does not end it under the run.
        let later = tollgate::store::now_ms() + 20 * 60_000;
        assert_eq!(t.gate.store().sweep_expired(later).await.unwrap(), 0);
        handle.cancel(Some("gave up".into())).await.unwrap();
        for _ in 0..50 {
            if upstream.cancelled.load(std::sync::atomic::Ordering::SeqCst) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            upstream.cancelled.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "the upstream saw the cancellation"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            t.env.available("alice").await,
            "0.90",
            "only the progress call was charged"
        );

        // The upstream goes away: its tools answer isError without charging…
        stop.cancel();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let r = call(&client, "test_work", json!({})).await;
        assert_eq!(r.is_error, Some(true));
        assert_eq!(t.env.available("alice").await, "0.90");
        // …and once it is back, tollgate reconnects by itself.
        let addr = url
            .trim_start_matches("http://")
            .trim_end_matches("/mcp")
            .to_owned();
        let (_url, _stop, _) = spawn_upstream_at(&addr, TestUpstream::default()).await;
        let mut worked = false;
        for _ in 0..100 {
            let r = call(&client, "test_work", json!({})).await;
            if r.is_error != Some(true) {
                assert_eq!(text(&r), "worked");
                worked = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(worked, "tollgate reconnected to the upstream");
        assert_eq!(t.env.available("alice").await, "0.80");
        client.cancel().await.ok();
        t.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    /// A call paid for is not refused by a schema tightened upstream after
    /// the payment: its arguments were checked when the payment was asked
    /// for, and are bound to it. (It was refused as "nothing was charged",
    /// its payment left until recovery refunded it a week later.) A new
    /// call is checked against the new schema.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_paid_call_is_not_refused_by_a_schema_tightened_after_its_payment() {
        let (url, _upstream) = spawn_upstream().await;
        let pricing = upstream_pricing(&url, "free")
            + "\n[[tools]]\nname = \"test_count\"\nprice = { per_unit = \"0.01\", argument = \"n\", max = \"1.00\" }\n";
        let t = InProcess::new(&pricing).await;
        let handler = t.client(Person::Ignores, Elicitation::None);
        let client = t.connect(None, handler.clone(), false).await;
        let r = call(&client, "test_count", json!({"n": 5})).await;
        assert_eq!(error_code(&r), "payment_required", "{r:?}");
        let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
        t.env.ok(&["sessions", "pay", &id]).await;

        assert_eq!(text(&call(&client, "test_grow", json!({})).await), "grown");
        let tightened = async || {
            let tools = client.list_all_tools().await.unwrap();
            let count = tools.iter().find(|t| t.name == "test_count").unwrap();
            count.input_schema["properties"]["n"].get("maximum").is_some()
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !tightened().await {
            assert!(tokio::time::Instant::now() < deadline, "the new schema was never served");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let r = call(&client, "test_count", json!({"n": 5})).await;
        assert_eq!(error_code(&r), "invalid_arguments", "a new call: {r:?}");

        let r = call(&client, "test_count", json!({"n": 5, "payment_id": id})).await;
        assert_eq!(text(&r), "counted to 5", "{r:?}");
        assert_eq!(payment_meta(&r)["status"], "paid");
        client.cancel().await.ok();
        t.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_upstreams_tool_list_change_reaches_the_client() {
        let (url, _upstream) = spawn_upstream().await;
        let t = InProcess::new(&upstream_pricing(&url, "free")).await;
        let handler = t.client(Person::Ignores, Elicitation::None);
        let client = t.connect(None, handler.clone(), false).await;
        let before = client.list_all_tools().await.unwrap().len();
        let r = call(&client, "test_grow", json!({})).await;
        assert_eq!(text(&r), "grown");
        let mut heard = false;
        for _ in 0..100 {
            if handler
                .list_changed
                .load(std::sync::atomic::Ordering::SeqCst)
                > 0
            {
                heard = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(heard, "the client heard tools/list_changed");
        let tools = client.list_all_tools().await.unwrap();
        assert_eq!(tools.len(), before + 1);
        assert!(tools.iter().any(|t| t.name == "test_more_1"));
        let r = call(&client, "test_more_1", json!({})).await;
        assert_ne!(r.is_error, Some(true), "{r:?}");
        client.cancel().await.ok();
        t.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_upstreams_elicitation_is_relayed_or_declined_cleanly() {
        let (url, _upstream) = spawn_upstream().await;
        let pricing = upstream_pricing(&url, "free").replace("timeout = \"300ms\"", "timeout = \"3s\"");
        let t = InProcess::new(&pricing).await;
        t.env.topup("bob", "1.00").await;

        // A client that can answer: the question reaches it, and its answer
        // goes back to the upstream.
        let asked = t.client(Person::Approves, Elicitation::Form);
        let client = t.connect(None, asked.clone(), false).await;
        let r = call(&client, "test_ask", json!({})).await;
        assert_eq!(text(&r), "Accept", "{r:?}");
        assert_eq!(asked.prompt_count(), 1);
        client.cancel().await.ok();

        // A client that cannot: declined, cleanly.
        let plain = t.client(Person::Approves, Elicitation::None);
        let client = t.connect(None, plain.clone(), false).await;
        let r = call(&client, "test_ask", json!({})).await;
        assert_eq!(text(&r), "Decline", "{r:?}");
        assert_eq!(plain.prompt_count(), 0);
        client.cancel().await.ok();

        // While another call is in flight, a question goes to the client of
        // the call it comes from (over HTTP it comes on that call's stream),
        // never to the other call's client (here bob's, which could answer
        // it, for carol's call). Bob's call hangs until the upstream's timeout.
        let bystander = t.client(Person::Approves, Elicitation::Form);
        let bob = t.connect(Some("bob"), bystander.clone(), false).await;
        let peer = bob.peer().clone();
        let hanging = tokio::spawn(async move {
            peer.call_tool(rmcp::model::CallToolRequestParams::new("test_hang")).await
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let carols = t.client(Person::Approves, Elicitation::Form);
        let carol = t.connect(Some("carol"), carols.clone(), false).await;
        let r = call(&carol, "test_ask", json!({})).await;
        assert_eq!(text(&r), "Accept", "{r:?}");
        assert_eq!(carols.prompt_count(), 1);
        assert_eq!(bystander.prompt_count(), 0, "carol's question reached bob's client");
        assert!(!hanging.is_finished(), "bob's call was still in flight");
        bob.cancel().await.ok();
        carol.cancel().await.ok();
        t.env.assert_ledger_ok().await;
    }
}

/// A call that ended without the upstream's answer (here it timed out) may
/// still be running there and ask its question later: that question is
/// declined, never handed to whichever other call is in flight by then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_question_from_a_call_that_timed_out_reaches_no_other_client() {
    let (url, _upstream) = spawn_upstream().await;
    let pricing = upstream_pricing(&url, "free").replace("timeout = \"300ms\"", "timeout = \"1s\"");
    let t = InProcess::new(&pricing).await;
    t.env.topup("carol", "1.00").await;
    let bobs = t.client(Person::Approves, Elicitation::Form);
    let bob = t.connect(Some("bob"), bobs.clone(), false).await;
    // Bob's call times out at 1s; the upstream asks at 1.5s, while carol's
    // call (from about 1s to 2s) is in flight.
    let r = call(&bob, "test_late_ask", json!({})).await;
    assert_eq!(r.is_error, Some(true), "{r:?}");
    assert!(text(&r).contains("no answer within"), "{}", text(&r));
    // Carol's call is the only one in flight when bob's question comes,
    // and her client could answer it.
    let carols = t.client(Person::Approves, Elicitation::Form);
    let carol = t.connect(Some("carol"), carols.clone(), false).await;
    let r = call(&carol, "test_hang", json!({})).await;
    assert_eq!(r.is_error, Some(true), "{r:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        carols.prompt_count(),
        0,
        "bob's question reached carol's client"
    );
    assert_eq!(bobs.prompt_count(), 0, "bob's call had ended");
    bob.cancel().await.ok();
    carol.cancel().await.ok();
}

on_both_backends! {
    /// A price metered by an argument is counted from the JSON as sent, so
    /// the argument must be there, of the declared type, and not negative:
    /// an upstream that fills in a default or reads "1000" as a number would
    /// otherwise do more than was paid for.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_metered_argument_must_be_given_typed_and_not_negative() {
        let (url, _upstream) = spawn_upstream().await;
        let pricing = upstream_pricing(&url, "free")
            + "\n[[tools]]\nname = \"test_count\"\nprice = { per_unit = \"0.01\", argument = \"n\", max = \"1.00\" }\n";
        let t = InProcess::new(&pricing).await;
        t.env.topup("alice", "1.00").await;
        let client = t.connect(Some("alice"), t.client(Person::Approves, Elicitation::None), false).await;
        for (args, why) in [
            (json!({}), "must be given"),
            (json!({"n": null}), "must be given"),
            (json!({"n": "1000"}), "expected integer"),
            (json!({"n": 2.5}), "expected integer"),
            (json!({"n": -3}), "may not be negative"),
        ] {
            let r = call(&client, "test_count", args.clone()).await;
            assert_eq!(error_code(&r), "invalid_arguments", "{args}: {r:?}");
            assert!(text(&r).contains(why) && text(&r).contains("nothing was charged"), "{args}: {}", text(&r));
            assert_eq!(structured(&r)["field"], "n");
        }
        assert_eq!(t.env.available("alice").await, "1.00");
        let r = call(&client, "test_count", json!({"n": 5})).await;
        assert_eq!(text(&r), "counted to 5");
        assert_eq!(payment_meta(&r)["amount"], "0.05");
        assert_eq!(t.env.available("alice").await, "0.95");
        client.cancel().await.ok();
        t.env.assert_ledger_ok().await;

        // An argument the schema lets be a number or a string cannot be
        // metered: "1000000" would be priced as seven characters, and
        // counted to a million. (It was served, and priced so.)
        let either = upstream_pricing(&url, "free")
            + "\n[[tools]]\nname = \"test_count_either\"\nprice = { per_unit = \"0.01\", argument = \"n\", max = \"1.00\" }\n";
        let out = crate::harness::Env::with_pricing(&either).cli(&["serve"]).await;
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("meters argument `n`, whose input schema gives it the types [\"integer\",\"string\"]: it must give it one type"),
            "{err}"
        );
    }
}

on_both_backends! {
    /// A gateway serves its upstreams' tools and nothing else: the demo
    /// tools come only without upstreams, or with `demo_tools = true`.
    /// (They were always served: free `sleep` and `search` beside the
    /// upstreams, and an upstream's own `echo` clashed with the demo one.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_gateway_serves_only_its_upstreams_tools_unless_asked() {
        let (url, upstream) = spawn_upstream().await;
        let gateway = format!(
            "[server]\nname = \"gw\"\ncurrency = \"USD\"\n\n[[upstreams]]\nname = \"test\"\nurl = \"{url}\"\n\n\
             [[tools]]\nname = \"work\"\nprice = \"0.10\"\n"
        );
        for (text, demo) in [
            (gateway.clone(), false),
            (gateway.replace("currency = \"USD\"", "currency = \"USD\"\ndemo_tools = true"), true),
        ] {
            let t = InProcess::new(&text).await;
            let client = t.connect(Some("alice"), t.client(Person::Ignores, Elicitation::None), false).await;
            let tools = client.list_all_tools().await.unwrap();
            let names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
            assert!(names.contains(&"work"), "{names:?}");
            for built_in in ["echo", "word_count", "divide", "search", "sleep"] {
                assert_eq!(names.contains(&built_in), demo, "{built_in}: {names:?}");
            }
            client.cancel().await.ok();
        }
        // Priced demo tools beside upstreams, without asking for them: the
        // start-up error says how.
        let text = crate::harness::pricing("resubmit", "")
            + &format!("\n[[upstreams]]\nname = \"test\"\nurl = \"{url}\"\nprefix = true\n");
        let out = crate::harness::Env::with_pricing(&text).cli(&["serve"]).await;
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("no backend provides a tool named `echo`")
                && err.contains("served beside [[upstreams]] only with [server] demo_tools = true"),
            "{err}"
        );
        upstream.cancel();
    }
}

/// Arguments `book` (strict schema) refuses, the field each names, and why.
const BAD_BOOKINGS: [(&str, &str, &str); 3] = [
    (
        r#"{"city": "Oslo", "nights": "two"}"#,
        "nights",
        "expected integer",
    ),
    (r#"{"nights": 2}"#, "city", "missing field `city`"),
    (
        r#"{"city": "Oslo", "nights": 2, "pets": true}"#,
        "pets",
        "unknown field `pets`",
    ),
];

on_both_backends! {
    /// A priced upstream tool's arguments are checked against its
    /// `inputSchema` before any money moves: a wrong-typed, missing or
    /// unknown field is `invalid_arguments` naming it, for a funded caller
    /// (no hold) and for anonymous ones (nobody asked to pay, no intent or
    /// payment session opened), and the upstream never sees the call.
    /// (They were passed on unchecked: the wallet held, or a person asked
    /// to pay, before the upstream refused.) A schema that cannot be
    /// compiled is served all the same, its calls unchecked.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_upstream_tools_arguments_are_checked_before_money_moves() {
        let (url, _stop, upstream) = spawn_upstream_at("127.0.0.1:0", TestUpstream::default()).await;
        let pricing = upstream_pricing(&url, "free")
            + "\n[[tools]]\nname = \"test_book\"\nprice = \"0.10\"\nmode = \"auto\"\n\n\
               [[tools]]\nname = \"test_odd\"\nprice = \"0.10\"\n";
        let t = InProcess::new(&pricing).await;
        t.env.topup("alice", "1.00").await;
        let refused = async |client: &crate::inproc::Client| {
            for (args, field, why) in BAD_BOOKINGS {
                let args: Value = serde_json::from_str(args).unwrap();
                let r = call(client, "test_book", args.clone()).await;
                assert_eq!(error_code(&r), "invalid_arguments", "{args}: {r:?}");
                assert_eq!(structured(&r)["field"], field, "{args}: {r:?}");
                let said = text(&r);
                assert!(said.contains(why) && said.contains("nothing was charged"), "{args}: {said}");
            }
        };

        // A funded caller (the fast path): nothing held or charged.
        let alice = t.connect(Some("alice"), t.client(Person::Approves, Elicitation::None), false).await;
        refused(&alice).await;
        assert_eq!(t.env.balance("alice").await, ("1.00".into(), "0.00".into(), "1.00".into()));

        // Anonymous callers (the slow path: elicitation for a client that
        // can answer, resubmit otherwise): nobody is asked to pay, and no
        // intent or payment session is opened.
        let person = t.client(Person::PaysAndAccepts, Elicitation::Form);
        let asked = t.connect(None, person.clone(), false).await;
        refused(&asked).await;
        let plain = t.connect(None, t.client(Person::Ignores, Elicitation::None), false).await;
        refused(&plain).await;
        assert_eq!(person.prompt_count(), 0, "a person was asked to pay for a call its tool refuses");
        let store = t.gate.store();
        assert!(store.list_sessions(100).await.unwrap().is_empty(), "a payment session was opened");
        let open = store.open_intents(None, "-", tollgate::store::now_ms()).await.unwrap();
        assert_eq!(open.anonymous, 0, "an intent was opened");
        assert_eq!(upstream.booked.load(std::sync::atomic::Ordering::SeqCst), 0, "the upstream saw a bad call");

        // Good arguments go through as before.
        let r = call(&alice, "test_book", json!({"city": "Oslo", "nights": 2})).await;
        assert_eq!(text(&r), "booked 2 nights in Oslo", "{r:?}");
        assert_eq!(payment_meta(&r)["status"], "paid");
        assert_eq!(t.env.available("alice").await, "0.90");

        // A schema that cannot be compiled does not stop the gateway: the
        // tool is served, and its arguments reach the upstream as sent.
        let r = call(&alice, "test_odd", json!({"code": 5})).await;
        assert_eq!(text(&r), "extra", "{r:?}");
        assert_eq!(payment_meta(&r)["status"], "paid");
        for client in [alice, asked, plain] {
            client.cancel().await.ok();
        }
        t.env.assert_ledger_ok().await;
    }
}

/// What the TypeScript SDK's `callTool` does with a tool that has an
/// outputSchema (the Python SDK checks non-errors the same way): a result
/// that is not an error must have `structuredContent`, and any it has must
/// fit the schema. Otherwise it throws, and the person never sees the
/// result, or the payment URL in it.
fn sdk_takes(r: &rmcp::model::CallToolResult) -> Result<(), String> {
    let schema = Value::Object((*forecast_schema()).clone());
    match &r.structured_content {
        None if r.is_error != Some(true) => {
            Err("an output schema but no structured content".into())
        }
        None => Ok(()),
        Some(body) => jsonschema::validate(&schema, body)
            .map_err(|e| format!("structured content does not fit the output schema: {e}")),
    }
}

/// The body of one of the gate's own replies to a tool with an outputSchema.
fn gates_reply(r: &rmcp::model::CallToolResult) -> Value {
    r.meta
        .as_ref()
        .and_then(|m| m.0.get("tollgate/reply").cloned())
        .unwrap_or(Value::Null)
}

on_both_backends! {
    /// A priced tool with an outputSchema keeps it in tools/list, so a
    /// client checks its results against it: the gate's own replies
    /// (payment required and pending, invalid arguments) leave
    /// `structuredContent` out and are `isError`, their body in
    /// `_meta["tollgate/reply"]` and their text as for any tool; the
    /// tool's own result passes unchanged. (They carried the payment
    /// object in `structuredContent`, which the TypeScript SDK refuses.)
    /// A tool without one answers as before.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_gates_replies_to_a_tool_with_an_output_schema_fit_it() {
        let (url, _upstream) = spawn_upstream().await;
        let priced = "\n[[tools]]\nname = \"test_forecast\"\nprice = \"0.10\"\n";
        let t = InProcess::new(&(upstream_pricing(&url, "free") + priced)).await;
        t.env.topup("alice", "1.00").await;
        let alice = t.connect(Some("alice"), t.client(Person::Ignores, Elicitation::None), false).await;
        let tools = alice.list_all_tools().await.unwrap();
        let listed = tools.iter().find(|t| t.name == "test_forecast").unwrap();
        assert_eq!(listed.output_schema, Some(forecast_schema()), "kept in tools/list");

        // The fast path: the tool's own result, unchanged; a refusal of
        // the gate's, in `_meta`.
        let r = call(&alice, "test_forecast", json!({"city": "Oslo"})).await;
        sdk_takes(&r).unwrap_or_else(|e| panic!("{e}: {r:?}"));
        assert_eq!(structured(&r), json!({"city": "Oslo", "high": 21.5}));
        assert_eq!(payment_meta(&r)["status"], "paid");
        assert!(gates_reply(&r).is_null(), "{r:?}");
        // A result whose `_meta` has the gate's keys is still the tool's
        // own: it was made `isError` after its charge, its
        // `structuredContent` dropped.
        let r = call(&alice, "test_forecast", json!({"city": "Forged"})).await;
        sdk_takes(&r).unwrap_or_else(|e| panic!("{e}: {r:?}"));
        assert_eq!(r.is_error, Some(false), "{r:?}");
        assert_eq!(structured(&r), json!({"city": "Forged", "high": 21.5}));
        assert_eq!(payment_meta(&r)["status"], "paid");
        assert!(gates_reply(&r).is_null(), "{r:?}");
        assert_eq!(r.meta.as_ref().unwrap().0["source"], "upstream", "the rest passes through");
        // A result that does not fit the tool's own outputSchema, which its
        // client would throw away, is a failed run: not charged. (It was.)
        let before = t.env.available("alice").await;
        for (city, why) in [
            ("Nowhere", "`high`: expected number"),
            ("Bare", "it carries no structuredContent"),
        ] {
            let r = call(&alice, "test_forecast", json!({"city": city})).await;
            sdk_takes(&r).unwrap_or_else(|e| panic!("{e}: {r:?}"));
            assert_eq!(r.is_error, Some(true), "{r:?}");
            assert!(
                text(&r).contains("does not fit its outputSchema") && text(&r).contains(why),
                "{}",
                text(&r)
            );
            assert_eq!(payment_meta(&r)["status"], "released", "{r:?}");
        }
        assert_eq!(t.env.available("alice").await, before);
        let r = call(&alice, "test_forecast", json!({"city": 5})).await;
        sdk_takes(&r).unwrap_or_else(|e| panic!("{e}: {r:?}"));
        assert_eq!(r.is_error, Some(true));
        assert_eq!(gates_reply(&r)["error"], "invalid_arguments", "{r:?}");
        assert_eq!(gates_reply(&r)["field"], "city");
        assert!(text(&r).contains("invalid argument `city`"), "{}", text(&r));

        // resubmit: payment required, then pending, then the tool's result.
        let bob = t.connect(None, t.client(Person::Ignores, Elicitation::None), false).await;
        let r = call(&bob, "test_forecast", json!({"city": "Oslo"})).await;
        sdk_takes(&r).unwrap_or_else(|e| panic!("{e}: {r:?}"));
        let body = gates_reply(&r);
        assert_eq!(body["error"], "payment_required", "{r:?}");
        let id = body["payment_id"].as_str().unwrap().to_owned();
        let pay_at = body["payment_url"].as_str().unwrap();
        assert!(text(&r).contains(pay_at) && text(&r).contains(&id), "{}", text(&r));
        let again = json!({"city": "Oslo", "payment_id": id});
        let r = call(&bob, "test_forecast", again.clone()).await;
        sdk_takes(&r).unwrap_or_else(|e| panic!("{e}: {r:?}"));
        assert_eq!(gates_reply(&r)["error"], "payment_pending", "{r:?}");
        t.env.ok(&["sessions", "pay", &id]).await;
        for replayed in [false, true] {
            let r = call(&bob, "test_forecast", again.clone()).await;
            sdk_takes(&r).unwrap_or_else(|e| panic!("{e}: {r:?}"));
            assert_eq!(structured(&r), json!({"city": "Oslo", "high": 21.5}), "{r:?}");
            assert_eq!(payment_meta(&r)["status"], "paid");
            assert_eq!(payment_meta(&r)["replayed"].as_bool().unwrap_or(false), replayed);
            assert!(gates_reply(&r).is_null(), "{r:?}");
        }

        // A tool without an outputSchema: as before, the body in
        // `structuredContent` and nothing added to `_meta`.
        let r = call(&bob, "test_work", json!({})).await;
        assert_eq!(error_code(&r), "payment_required");
        assert!(gates_reply(&r).is_null() && r.meta.is_none(), "{r:?}");
        alice.cancel().await.ok();
        bob.cancel().await.ok();

        // two_step: the first answer is an `isError` for such a tool (a
        // normal result would need structured content that fits); the
        // confirm tool has no outputSchema, and answers as ever.
        let two_step = upstream_pricing(&url, "free") + priced + "mode = \"two_step\"\n";
        let t = InProcess::new(&two_step).await;
        let carol = t.connect(None, t.client(Person::Ignores, Elicitation::None), false).await;
        let r = call(&carol, "test_forecast", json!({"city": "Bergen"})).await;
        sdk_takes(&r).unwrap_or_else(|e| panic!("{e}: {r:?}"));
        let body = gates_reply(&r);
        assert_eq!(body["status"], "payment_required", "{r:?}");
        assert_eq!(body["next_step"], "confirm_test_forecast_payment");
        let id = body["payment_id"].as_str().unwrap().to_owned();
        assert!(text(&r).contains("confirm_test_forecast_payment") && text(&r).contains(&id), "{}", text(&r));
        let confirm = carol.list_all_tools().await.unwrap();
        let confirm = confirm.iter().find(|t| t.name == "confirm_test_forecast_payment").unwrap();
        assert!(confirm.output_schema.is_none());
        let r = call(&carol, "confirm_test_forecast_payment", json!({"payment_id": id})).await;
        assert_eq!(error_code(&r), "payment_pending");
        t.env.ok(&["sessions", "pay", &id]).await;
        let r = call(&carol, "confirm_test_forecast_payment", json!({"payment_id": id})).await;
        assert_eq!(structured(&r), json!({"city": "Bergen", "high": 21.5}), "{r:?}");
        assert_eq!(payment_meta(&r)["status"], "paid");
        carol.cancel().await.ok();
        t.env.assert_ledger_ok().await;
    }
}
