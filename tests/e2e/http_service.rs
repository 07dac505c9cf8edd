//! The HTTP service over real loopback HTTP: rmcp's streamable HTTP client
//! on /mcp, the sessions API, the checkout page's forms, /metrics, /healthz.

use std::{sync::Arc, time::Duration};

use rmcp::{
    ClientHandler, RoleClient, ServiceExt,
    model::{CallToolRequestParams, CallToolResult, ProtocolVersion},
    service::{ClientLifecycleMode, ClientServiceExt, RunningService},
    transport::{
        StreamableHttpClientTransport, streamable_http_client::StreamableHttpClientTransportConfig,
    },
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tollgate::{app, config::Config, gate::Gate, http::HttpState};

use crate::{
    harness::{Env, args, echo_args, error_code, payment_meta, structured, text},
    inproc::{Elicitation, Person, TestClient, config_for},
};

pub struct HttpServer {
    pub env: Env,
    pub base: String,
    pub gate: Arc<Gate>,
    shutdown: CancellationToken,
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl HttpServer {
    pub async fn start(pricing_text: &str) -> Self {
        let env = Env::with_pricing(pricing_text);
        let mut config = config_for(&env, pricing_text);
        // The gate's payment URLs point at the address it will listen on.
        let listener = loopback_listener(&mut config).await;
        let store = app::open_store(&config.store_url, &config)
            .await
            .expect("store");
        let gate = app::build_gate(&config, store).await.expect("gate");
        let (base, shutdown) = serve_on(listener, config, gate.clone());
        Self {
            env,
            base,
            gate,
            shutdown,
        }
    }

    /// A new API key, made with the CLI as an operator would.
    pub async fn key(&self, principal: &str, scopes: &[&str]) -> String {
        let mut cmd = vec!["keys", "create", "--principal", principal];
        for scope in scopes {
            cmd.extend(["--scope", scope]);
        }
        self.env.ok(&cmd).await.trim().to_owned()
    }

    pub async fn mcp<H: ClientHandler>(
        &self,
        key: Option<&str>,
        handler: H,
    ) -> RunningService<RoleClient, H> {
        let mut config =
            StreamableHttpClientTransportConfig::with_uri(format!("{}/mcp", self.base));
        if let Some(key) = key {
            config = config.auth_header(key);
        }
        handler
            .serve(StreamableHttpClientTransport::from_config(config))
            .await
            .expect("MCP over HTTP")
    }

    /// A 2026-07-28 client: rmcp serves each of its requests statelessly.
    pub async fn mcp_modern(&self, key: Option<&str>) -> RunningService<RoleClient, ()> {
        let mut config =
            StreamableHttpClientTransportConfig::with_uri(format!("{}/mcp", self.base));
        if let Some(key) = key {
            config = config.auth_header(key);
        }
        ().serve_with_lifecycle(
            StreamableHttpClientTransport::from_config(config),
            ClientLifecycleMode::Discover {
                preferred_versions: vec![ProtocolVersion::V_2026_07_28],
            },
        )
        .await
        .expect("MCP over HTTP, 2026-07-28")
    }

    pub fn client(&self, person: Person, elicitation: Elicitation) -> TestClient {
        TestClient::new(person, elicitation, self.gate.store().clone())
    }
}

/// A free loopback port, noted in the config as where the service listens.
async fn loopback_listener(config: &mut Config) -> tokio::net::TcpListener {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    config.http.listen = listener.local_addr().expect("addr").to_string();
    listener
}

/// Serves `gate` on `listener` until the token is cancelled; returns its
/// base URL.
fn serve_on(
    listener: tokio::net::TcpListener,
    config: Config,
    gate: Arc<Gate>,
) -> (String, CancellationToken) {
    let base = format!("http://{}", config.http.listen);
    let state = Arc::new(HttpState::new(&config, gate));
    let shutdown = CancellationToken::new();
    let ct = shutdown.clone();
    tokio::spawn(async move { tollgate::http::serve(listener, state, &config.http, ct).await });
    (base, shutdown)
}

/// Serves an already built `gate` over loopback HTTP, on a free port.
pub async fn serve_gate(mut config: Config, gate: Arc<Gate>) -> (String, CancellationToken) {
    let listener = loopback_listener(&mut config).await;
    serve_on(listener, config, gate)
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

pub async fn call<H: ClientHandler>(
    client: &RunningService<RoleClient, H>,
    tool: &str,
    arguments: Value,
) -> CallToolResult {
    client
        .call_tool(CallToolRequestParams::new(tool.to_owned()).with_arguments(args(arguments)))
        .await
        .unwrap_or_else(|e| panic!("{tool}: {e}"))
}

/// The checkout page's CSRF token.
fn csrf_of(html: &str) -> String {
    let start =
        html.find("name=\"csrf\" value=\"").expect("csrf field") + "name=\"csrf\" value=\"".len();
    html[start..]
        .split('"')
        .next()
        .unwrap_or_default()
        .to_owned()
}

pub async fn checkout_post(base: &str, id: &str, fields: &[(&str, &str)]) -> reqwest::Response {
    let page = http()
        .get(format!("{base}/checkout/{id}"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = csrf_of(&page);
    let mut form: Vec<(&str, &str)> = vec![("csrf", &csrf)];
    form.extend_from_slice(fields);
    http()
        .post(format!("{base}/checkout/{id}"))
        .form(&form)
        .send()
        .await
        .unwrap()
}

fn two_step_pricing() -> String {
    crate::harness::pricing("two_step", "")
        .replace("[store]", "[provider]\ndev_settle = true\n\n[store]")
}

on_both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mcp_over_http_with_keys_fast_path_two_step_and_checkout() {
        let server = HttpServer::start(&two_step_pricing()).await;
        server.env.topup("alice", "1.00").await;
        let alice_key = server.key("alice", &["mcp"]).await;
        let bob_key = server.key("bob", &["mcp"]).await;

        // No key, a bad key, a key without the mcp scope: 401/403 with a JSON body.
        let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}});
        for (key, status) in [(None, 401), (Some("tg_key_0000000000000000_nope"), 401)] {
            let mut request = http()
                .post(format!("{}/mcp", server.base))
                .header("accept", "application/json, text/event-stream")
                .json(&init);
            if let Some(key) = key {
                request = request.bearer_auth(key);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), status);
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"], "unauthorized");
        }
        let sessions_only = server.key("carol", &["sessions:create"]).await;
        let response = http()
            .post(format!("{}/mcp", server.base))
            .header("x-api-key", &sessions_only)
            .header("accept", "application/json, text/event-stream")
            .json(&init)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 403);

        // Fast path: alice's key names her wallet.
        let alice = server.mcp(Some(&alice_key), ()).await;
        let r = call(&alice, "echo", echo_args("over http")).await;
        assert_eq!(text(&r), "over http");
        assert_eq!(payment_meta(&r)["status"], "paid");
        assert_eq!(server.env.available("alice").await, "0.99");

        // two_step: bob has no wallet; he pays at the checkout page.
        let bob = server.mcp(Some(&bob_key), ()).await;
        let r = call(&bob, "echo", echo_args("bob's")).await;
        let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
        let url = structured(&r)["payment_url"].as_str().unwrap().to_owned();
        assert_eq!(url, format!("{}/checkout/{id}", server.base));
        let page = http().get(&url).send().await.unwrap().text().await.unwrap();
        assert!(
            page.contains("0.01")
                && page.contains("USD")
                && page.contains("<code>echo</code>")
                && page.contains("pending")
        );

        // Alice cannot use bob's payment id, even after it is paid.
        let response = checkout_post(&server.base, &id, &[("action", "settle")]).await;
        assert_eq!(response.status(), 303);
        let r = call(&alice, "confirm_echo_payment", json!({"payment_id": id})).await;
        assert_eq!(error_code(&r), "payment_mismatch");
        let r = call(&bob, "confirm_echo_payment", json!({"payment_id": id})).await;
        assert_eq!(text(&r), "bob's");
        assert_eq!(payment_meta(&r)["status"], "paid");

        alice.cancel().await.ok();
        bob.cancel().await.ok();
        server.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn elicitation_and_progress_over_http() {
        let pricing = crate::inproc::pricing("elicitation", "").replacen(
            "price = \"0.05\"",
            "price = \"0.05\"\nmode = \"progress\"",
            1,
        );
        let server = HttpServer::start(&pricing).await;
        let key = server.key("dave", &["mcp"]).await;

        let handler = server.client(Person::PaysAndAccepts, Elicitation::Url);
        let client = server.mcp(Some(&key), handler.clone()).await;
        let r = call(&client, "echo", echo_args("elicited")).await;
        assert_eq!(text(&r), "elicited", "{r:?}");
        assert_eq!(handler.prompt_count(), 1);
        client.cancel().await.ok();

        let handler = server.client(Person::PaysAfterProgress(2), Elicitation::None);
        let client = server.mcp(Some(&key), handler.clone()).await;
        let r = call(&client, "divide", json!({"a": 6, "b": 3})).await;
        assert_eq!(structured(&r), json!({"quotient": 2.0}), "{r:?}");
        assert!(handler.progress.lock().unwrap().len() >= 2);
        client.cancel().await.ok();
        server.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    /// A session's description is the memo on its payer's statement. One
    /// that would forge lines there (a line break, an ANSI escape, a
    /// direction override) is a 400 naming the field, and no session is
    /// made; one stored before the API refused them (put in by hand here)
    /// prints escaped, on its one line, in the statement and the list.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_description_that_would_forge_statement_lines_is_refused_and_printed_escaped() {
        let server = HttpServer::start(&crate::harness::pricing("resubmit", "")).await;
        let creator = server.key("shop", &["sessions:create"]).await;
        let sessions = format!("{}/v1/sessions", server.base);
        let create = |description: &str| {
            http()
                .post(&sessions)
                .bearer_auth(&creator)
                .json(&json!({"amount": 250, "currency": "usd", "description": description}))
                .send()
        };
        let forged = "Pro feature\n2026-11-21T12:00:00Z  topup  1000.00  USD\u{1b}[2K";
        for description in [forged, "\u{1b}[2Jpaid", "tab\there", "refund \u{202e}00.001"] {
            let response = create(description).await.unwrap();
            assert_eq!(response.status(), 400, "{description:?}");
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["field"], "description", "{body}");
            let message = body["message"].as_str().unwrap_or_default();
            assert!(message.contains("must not contain control characters"), "{body}");
        }
        let listed = server.env.ok(&["sessions", "list"]).await;
        assert_eq!(listed.lines().count(), 1, "only the header: {listed}");

        // A row stored with such a description before the check.
        let response = create("Pro feature").await.unwrap();
        assert_eq!(response.status(), 201);
        let created: Value = response.json().await.unwrap();
        let id = created["sessionId"].as_str().unwrap().to_owned();
        let stored = format!("UPDATE payment_sessions SET description = '{forged}' WHERE id = '{id}'");
        tollgate::testing::execute(&server.env.db, &stored).await.unwrap();
        server.env.topup("ben", "5.00").await;
        server.env.ok(&["sessions", "pay", &id, "--from", "ben"]).await;
        let statement = server.env.ok(&["wallet", "statement", "ben"]).await;
        assert!(!statement.contains('\u{1b}'), "{statement:?}");
        assert!(
            !statement.lines().any(|l| l.starts_with("2026-11-21T12:00:00Z")),
            "a forged line: {statement}"
        );
        let line = statement.lines().find(|l| l.contains(&id)).expect(&statement);
        assert!(
            line.ends_with("memo: Pro feature\\n2026-11-21T12:00:00Z  topup  1000.00  USD\\u{1b}[2K"),
            "{line}"
        );
        let listed = server.env.ok(&["sessions", "list"]).await;
        assert_eq!(listed.lines().count(), 2, "{listed:?}");
        assert!(listed.contains("Pro feature\\n2026-11-21T12:00:00Z"), "{listed}");
        server.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_sessions_api_validates_authenticates_and_rate_limits() {
        let pricing = crate::harness::pricing("resubmit", "").replace(
            "[store]",
            "[http]\nsessions_create_per_minute = 3\n\n[store]",
        );
        let server = HttpServer::start(&pricing).await;
        let creator = server
            .key("shop", &["sessions:create", "sessions:read"])
            .await;
        let reader = server.key("shop", &["sessions:read"]).await;
        let stranger = server.key("other", &["sessions:read"]).await;
        let revoked = server.key("shop", &["sessions:create"]).await;
        let revoked_id = tollgate::keys::key_id(&revoked).unwrap().to_owned();
        server.env.ok(&["keys", "revoke", &revoked_id]).await;
        let sessions = format!("{}/v1/sessions", server.base);

        let post = |key: Option<String>, body: Value| {
            let mut request = http().post(&sessions).json(&body);
            if let Some(key) = key {
                request = request.bearer_auth(key);
            }
            request.send()
        };
        // Auth cases.
        let good = json!({"amount": 250, "currency": "usd", "description": "Pro feature"});
        assert_eq!(post(None, good.clone()).await.unwrap().status(), 401);
        assert_eq!(
            post(Some("tg_key_1234567890abcdef_x".into()), good.clone())
                .await
                .unwrap()
                .status(),
            401
        );
        assert_eq!(
            post(Some(revoked.clone()), good.clone())
                .await
                .unwrap()
                .status(),
            401
        );
        assert_eq!(
            post(Some(reader.clone()), good.clone())
                .await
                .unwrap()
                .status(),
            403
        );

        // Forged keys naming the creator's id count against the address, not
        // against the creator's key. The three POSTs above with no key or
        // one that does not verify used up the address's 3 a minute, so
        // each forged key is refused 429 (a 401 would mean it was counted
        // elsewhere), and the creator's own key still creates below.
        let creator_id = tollgate::keys::key_id(&creator).unwrap().to_owned();
        for _ in 0..3 {
            let forged = format!("tg_{creator_id}_notthesecret");
            let response = post(Some(forged), good.clone()).await.unwrap();
            assert_eq!(response.status(), 429);
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"], "rate_limited", "{body}");
        }

        // Good input.
        let response = post(Some(creator.clone()), good.clone()).await.unwrap();
        assert_eq!(response.status(), 201);
        for header in [
            "x-ratelimit-limit",
            "x-ratelimit-remaining",
            "x-ratelimit-reset",
        ] {
            assert!(response.headers().contains_key(header), "{header} missing");
        }
        assert_eq!(response.headers()["x-ratelimit-limit"], "3");
        let created: Value = response.json().await.unwrap();
        let id = created["sessionId"].as_str().unwrap().to_owned();
        assert_eq!(created["url"], format!("{}/checkout/{id}", server.base));

        let get = |key: &str, id: &str| {
            http()
                .get(format!("{sessions}/{id}"))
                .header("x-api-key", key)
                .send()
        };
        let response = get(&reader, &id).await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(response.headers().contains_key("x-ratelimit-remaining"));
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["status"], "pending");
        assert_eq!(body["amount"], 250);
        assert_eq!(body["currency"], "usd");
        assert!(body["createdAt"].as_str().unwrap().ends_with('Z'));
        assert_eq!(
            get(&stranger, &id).await.unwrap().status(),
            404,
            "another principal's session is not visible"
        );
        assert_eq!(get(&reader, "cs_unknown").await.unwrap().status(), 404);
        // A wallet that may pay only for some tools does not pay a session
        // that is for no tool; one without an allow-list does.
        server.env.topup("ann", "5.00").await;
        server.env.topup("ben", "5.00").await;
        server.env.ok(&["wallet", "limits", "ann", "--tools", "echo"]).await;
        let refused = server.env.cli(&["sessions", "pay", &id, "--from", "ann"]).await;
        assert!(!refused.status.success());
        let said = String::from_utf8_lossy(&refused.stderr);
        assert!(said.contains("this payment is for no tool"), "{said}");
        assert_eq!(server.env.available("ann").await, "5.00");
        server.env.ok(&["sessions", "pay", &id, "--from", "ben"]).await;
        assert_eq!(server.env.available("ben").await, "2.50");

        // Bad input: 400 naming the field; the two good ones above used 1 of 3.
        let response = post(
            Some(creator.clone()),
            json!({"amount": 2.5, "currency": "usd"}),
        )
        .await
        .unwrap();
        assert_eq!(response.status(), 400);
        assert_eq!(response.json::<Value>().await.unwrap()["field"], "amount");
        let response = post(
            Some(creator.clone()),
            json!({"amount": 100, "currency": "uds"}),
        )
        .await
        .unwrap();
        assert_eq!(response.json::<Value>().await.unwrap()["field"], "currency");

        // The limit: 3 a minute for creating, so the next is a 429.
        let response = post(Some(creator.clone()), good.clone()).await.unwrap();
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()["x-ratelimit-remaining"], "0");
        assert!(response.headers().contains_key("retry-after"));
        // Reading has its own limit and still works.
        assert_eq!(get(&reader, &id).await.unwrap().status(), 200);
        // Malformed JSON is a 400 too (with the limit counted per key, use another key).
        let other = server.key("shop", &["sessions:create"]).await;
        let response = http()
            .post(&sessions)
            .bearer_auth(&other)
            .body("{not json")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400);
        // An amount past what any number here holds is too large, not
        // missing: i64's maximum, u64's, and beyond both.
        let big = server.key("shop", &["sessions:create"]).await;
        for amount in ["9223372036854775807", "18446744073709551615", "99999999999999999999"] {
            let response = http()
                .post(&sessions)
                .bearer_auth(&big)
                .header("content-type", "application/json")
                .body(format!(r#"{{"amount": {amount}, "currency": "usd"}}"#))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 400, "{amount}");
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["field"], "amount", "{amount}: {body}");
            assert!(body["message"].as_str().unwrap().contains("too large"), "{amount}: {body}");
        }
        server.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    /// The principal that created a session can cancel it, so that it can
    /// no longer be paid; one paid first stays paid. Nobody else can.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_sessions_api_cancels_a_pending_session_for_its_creator() {
        let server = HttpServer::start(&two_step_pricing()).await;
        let creator = server.key("shop", &["sessions:create", "sessions:read"]).await;
        let reader = server.key("shop", &["sessions:read"]).await;
        let stranger = server.key("other", &["sessions:create"]).await;
        server.env.topup("ben", "5.00").await;
        let create = async || session_created(&server.base, &creator, 250).await;
        let cancel = async |key: &str, id: &str| cancel_session(&server.base, key, id).await;

        let id = create().await;
        assert_eq!(cancel(&reader, &id).await.status(), 403, "reading is not cancelling");
        assert_eq!(cancel(&stranger, &id).await.status(), 404, "another principal's session");
        assert_eq!(cancel(&creator, "cs_unknown").await.status(), 404);
        let response = cancel(&creator, &id).await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!((body["sessionId"].as_str(), body["status"].as_str()), (Some(id.as_str()), Some("cancelled")));
        // Cancelling again changes nothing; the session cannot be paid.
        assert_eq!(cancel(&creator, &id).await.json::<Value>().await.unwrap()["status"], "cancelled");
        let refused = server.env.cli(&["sessions", "pay", &id, "--from", "ben"]).await;
        assert!(!refused.status.success());
        assert_eq!(server.env.available("ben").await, "5.00");

        // Paid before the cancel came: it stays paid.
        let id = create().await;
        server.env.ok(&["sessions", "pay", &id, "--from", "ben"]).await;
        let body: Value = cancel(&creator, &id).await.json().await.unwrap();
        assert_eq!(body["status"], "paid");
        assert_eq!(server.env.available("ben").await, "2.50");
        server.env.assert_ledger_ok().await;

        // Past its time, a session is expired, as a read says, and a cancel
        // leaves it so.
        let short = HttpServer::start(
            &two_step_pricing().replace("payment_ttl = \"15m\"", "payment_ttl = \"1s\""),
        )
        .await;
        let key = short.key("shop", &["sessions:create"]).await;
        let id = session_created(&short.base, &key, 100).await;
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let body: Value = cancel_session(&short.base, &key, &id).await.json().await.unwrap();
        assert_eq!(body["status"], "expired");
    }
}

/// A new session of `cents` through the sessions API at `base`: its id.
async fn session_created(base: &str, key: &str, cents: i64) -> String {
    let created: Value = http()
        .post(format!("{base}/v1/sessions"))
        .bearer_auth(key)
        .json(&json!({"amount": cents, "currency": "usd"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    created["sessionId"].as_str().unwrap().to_owned()
}

/// `POST /v1/sessions/{id}/cancel` at `base`.
async fn cancel_session(base: &str, key: &str, id: &str) -> reqwest::Response {
    http()
        .post(format!("{base}/v1/sessions/{id}/cancel"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
}

/// A server with `pricing` (two_step), an MCP client of frank's, and the
/// payment its call of `divide` waits for: its id and URL.
async fn waiting_for_payment(
    pricing: &str,
) -> (HttpServer, RunningService<RoleClient, ()>, String, String) {
    let server = HttpServer::start(pricing).await;
    let key = server.key("frank", &["mcp"]).await;
    let client = server.mcp(Some(&key), ()).await;
    let r = call(&client, "divide", json!({"a": 1, "b": 1})).await;
    let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
    let url = structured(&r)["payment_url"].as_str().unwrap().to_owned();
    (server, client, id, url)
}

/// Behind a reverse proxy the page is at `checkout_base_url`, and the
/// proxy may pass on its own upstream address as `Host`: a form sent from
/// the public address is this site's. (It was refused as another site's.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkout_page_takes_forms_from_its_public_address_behind_a_proxy() {
    let pricing = two_step_pricing().replace(
        "[provider]",
        "[provider]\ncheckout_base_url = \"https://pay.example.com\"",
    );
    let (server, client, id, url) = waiting_for_payment(&pricing).await;
    assert_eq!(url, format!("https://pay.example.com/checkout/{id}"));
    let local = format!("{}/checkout/{id}", server.base);
    let page = http()
        .get(&local)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let post = async |origin: &str| {
        http()
            .post(&local)
            .header("origin", origin)
            .form(&[("csrf", csrf_of(&page).as_str()), ("action", "decline")])
            .send()
            .await
            .unwrap()
            .status()
    };
    assert_eq!(post("https://evil.example").await, 403);
    assert_eq!(post("https://pay.example.com").await, 303);
    let session = server.gate.store().session(&id).await.unwrap().unwrap();
    // A person's no: failed, as a declined card would (`cancelled` is the
    // requester withdrawing it).
    assert_eq!(session.status.as_str(), "failed", "declined at the page");
    client.cancel().await.ok();
}

on_both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_checkout_page_refuses_forgery_double_submits_and_late_payment() {
        let pricing = two_step_pricing().replace("payment_ttl = \"15m\"", "payment_ttl = \"2s\"");
        let server = HttpServer::start(&pricing).await;
        server.env.topup("erin", "1.00").await;
        server.env.topup("poor", "0.01").await;
        let erin_key = server.key("erin", &["mcp"]).await;
        let poor_key = server.key("poor", &["mcp"]).await;
        let anon = server.key("frank", &["mcp"]).await;
        let client = server.mcp(Some(&anon), ()).await;
        let open = || async {
            let r = call(&client, "divide", json!({"a": 1, "b": 1})).await;
            structured(&r)["payment_id"].as_str().unwrap().to_owned()
        };

        // A forged token, or a form posted from another site, is refused.
        let id = open().await;
        let url = format!("{}/checkout/{id}", server.base);
        let forged = http()
            .post(&url)
            .form(&[("csrf", "00"), ("action", "settle")])
            .send()
            .await
            .unwrap();
        assert_eq!(forged.status(), 403);
        let shown = http().get(&url).send().await.unwrap();
        assert_eq!(shown.headers()["x-frame-options"], "DENY", "never framed");
        let page = shown.text().await.unwrap();
        let cross_site = http()
            .post(&url)
            .header("origin", "https://evil.example")
            .form(&[("csrf", csrf_of(&page).as_str()), ("action", "settle")])
            .send()
            .await
            .unwrap();
        assert_eq!(cross_site.status(), 403);

        let pending_csrf = csrf_of(&page);
        // A written link cannot put "Paid" over a pending payment.
        for done in ["paid", "approved", "declined"] {
            let link = format!("{url}?done={done}");
            let page = http().get(&link).send().await.unwrap().text().await.unwrap();
            assert!(page.contains("<td id=\"status\">pending</td>"), "{page}");
            assert!(!page.contains("Thank you") && !page.contains("Nothing was taken"), "{page}");
        }
        // Paying from a wallet needs that wallet's key; too little money is said so.
        let response = checkout_post(
            &server.base,
            &id,
            &[("action", "pay"), ("api_key", "nonsense")],
        )
        .await;
        assert_eq!(response.status(), 401);
        let response = checkout_post(
            &server.base,
            &id,
            &[("action", "pay"), ("api_key", &poor_key)],
        )
        .await;
        assert_eq!(response.status(), 402);
        assert_eq!(server.env.available("poor").await, "0.01");
        // A key of erin's that may only read or create sessions spends nothing.
        let reader = server.key("erin", &["sessions:read", "sessions:create"]).await;
        let response = checkout_post(&server.base, &id, &[("action", "pay"), ("api_key", &reader)]).await;
        assert_eq!(response.status(), 403);
        assert_eq!(server.env.available("erin").await, "1.00");
        let response = checkout_post(
            &server.base,
            &id,
            &[("action", "pay"), ("api_key", &erin_key)],
        )
        .await;
        assert_eq!(response.status(), 303);
        let page = http().get(&url).send().await.unwrap().text().await.unwrap();
        assert!(page.contains("<td id=\"status\">paid</td>"), "{page}");
        // A second submit (the same form again) takes nothing.
        let again = http()
            .post(&url)
            .form(&[
                ("csrf", pending_csrf.as_str()),
                ("action", "pay"),
                ("api_key", erin_key.as_str()),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), 409);
        assert!(again.text().await.unwrap().contains("already paid"));
        assert_eq!(server.env.available("erin").await, "0.95");
        let thanked = http().get(format!("{url}?done=paid")).send().await.unwrap();
        assert!(thanked.text().await.unwrap().contains("Paid. Thank you."));

        // Decline.
        let declined = open().await;
        let response = checkout_post(&server.base, &declined, &[("action", "decline")]).await;
        assert_eq!(response.status(), 303);
        let r = call(
            &client,
            "confirm_divide_payment",
            json!({"payment_id": declined}),
        )
        .await;
        assert_eq!(error_code(&r), "payment_failed");
        let page = http()
            .get(format!("{}/checkout/{declined}?done=declined", server.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(page.contains("Declined. Nothing was taken."), "{page}");
        assert!(page.contains("This payment was declined."), "{page}");

        // Expired: the page says so and takes nothing.
        let late = open().await;
        let page = http()
            .get(format!("{}/checkout/{late}", server.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let csrf = csrf_of(&page);
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let page = http()
            .get(format!("{}/checkout/{late}", server.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(page.contains("has expired"), "{page}");
        let response = http()
            .post(format!("{}/checkout/{late}", server.base))
            .form(&[("csrf", csrf.as_str()), ("action", "settle")])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 409);
        client.cancel().await.ok();
        server.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn metrics_and_health() {
        let server = HttpServer::start(&two_step_pricing()).await;
        server.env.topup("gina", "1.00").await;
        let key = server.key("gina", &["mcp"]).await;
        let admin = server.key("ops", &["admin"]).await;
        let scrape = || async {
            http()
                .get(format!("{}/metrics", server.base))
                .bearer_auth(&admin)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        };
        let count = |text: &str, needle: &str| -> f64 {
            text.lines()
                .find(|l| l.starts_with("tollgate_calls_total") && l.contains(needle))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0)
        };
        assert_eq!(
            http()
                .get(format!("{}/metrics", server.base))
                .send()
                .await
                .unwrap()
                .status(),
            401
        );
        let before = scrape().await;
        let client = server.mcp(Some(&key), ()).await;
        let mut payments = Vec::new();
        for _ in 0..3 {
            let r = call(&client, "echo", echo_args("m")).await;
            payments.push(payment_meta(&r)["payment_id"].as_str().unwrap_or_default().to_owned());
        }
        call(&client, "divide", json!({"a": 1, "b": 0})).await;
        // A name the server does not serve is counted, but not by that name:
        // clients cannot add series without end.
        let made_up = format!("no_such_tool_{}", uuid::Uuid::new_v4().simple());
        let _ = client
            .call_tool(rmcp::model::CallToolRequestParams::new(made_up.clone()))
            .await;
        let after = scrape().await;
        assert!(!after.contains(&made_up), "{after}");
        assert!(after.contains("tool=\"unknown\""), "{after}");
        // The recorder is process-wide: other tests' calls count too, so look
        // at this test's own line and at how much it grew.
        let paid = "tool=\"echo\",mode=\"two_step\",outcome=\"paid\"";
        assert!(
            count(&after, paid) - count(&before, paid) >= 3.0,
            "calls counted: {after}"
        );
        assert!(after.contains("outcome=\"released\""), "{after}");
        assert!(
            after.contains("tollgate_gate_seconds_bucket"),
            "latency histogram: {after}"
        );
        assert!(after.contains("tollgate_open_holds 0"), "{after}");
        assert!(after.contains("tollgate_stored_results "), "{after}");
        // Revenue is read from this server's store at the scrape: exact.
        let revenue = |text: &str| -> String {
            let series = "tollgate_revenue{tool=\"echo\",currency=\"USD\"} ";
            let line = text.lines().find(|l| l.starts_with(series));
            line.map(|l| l[series.len()..].to_owned()).unwrap_or_default()
        };
        assert_eq!(revenue(&after), "0.03", "{after}");
        // Net of refunds: one of the three given back.
        server.env.ok(&["refund", &payments[0], "--reason", "test"]).await;
        assert_eq!(revenue(&scrape().await), "0.02");
        let health: Value = http()
            .get(format!("{}/healthz", server.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(health["status"], "ok");
        client.cancel().await.ok();
    }
}

/// Tollgate A (the real binary, over stdio) with `pricing`, taking its
/// payments through B's sessions API, with a key of B's in its own
/// environment only; and an anonymous client of A's.
async fn paying_through(b: &HttpServer, pricing: &str) -> (Env, crate::harness::Client) {
    let key_for_a = b
        .key("tollgate-a", &["sessions:create", "sessions:read"])
        .await;
    let provider = format!(
        "[provider]\nkind = \"sessions_api\"\nurl = \"{}\"\napi_key_env = \"TOLLGATE_PROVIDER_KEY\"\n\n[store]",
        b.base
    );
    let a = Env::with_pricing(&pricing.replace("[store]", &provider));
    let client = a
        .client_with_env(None, &[("TOLLGATE_PROVIDER_KEY", key_for_a.as_str())])
        .await;
    (a, client)
}

/// B, whose sessions last 5 s, and A in `mode` paying through B, whose
/// payments last 2 s and whose lease 1 s (so that its upkeep runs often).
async fn paying_through_for_seconds(mode: &str) -> (HttpServer, Env, crate::harness::Client) {
    let b = HttpServer::start(
        &two_step_pricing().replace("payment_ttl = \"15m\"", "payment_ttl = \"5s\""),
    )
    .await;
    let a_pricing = crate::harness::pricing(mode, "instance_lease = \"1s\"\n")
        .replace("payment_ttl = \"15m\"", "payment_ttl = \"2s\"");
    let (a, client) = paying_through(&b, &a_pricing).await;
    (b, a, client)
}

on_both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tollgate_takes_payments_through_another_tollgates_sessions_api() {
        // B is the payment authority; A is a tollgate whose provider is B.
        let b = HttpServer::start(&two_step_pricing()).await;
        let (a, client) = paying_through(&b, &crate::harness::pricing("resubmit", "")).await;

        let r = crate::harness::call(&client, "echo", echo_args("remote")).await;
        assert_eq!(error_code(&r), "payment_required");
        let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
        let url = structured(&r)["payment_url"].as_str().unwrap().to_owned();
        assert!(
            url.starts_with(&format!("{}/checkout/cs_", b.base)),
            "the person pays at B: {url}"
        );
        let r =
            crate::harness::call(&client, "echo", json!({"text": "remote", "payment_id": id})).await;
        assert_eq!(error_code(&r), "payment_pending");

        // The person pays at B's checkout page.
        let session = url.rsplit('/').next().unwrap();
        let response = checkout_post(&b.base, session, &[("action", "settle")]).await;
        assert_eq!(response.status(), 303);
        let r =
            crate::harness::call(&client, "echo", json!({"text": "remote", "payment_id": id})).await;
        assert_eq!(text(&r), "remote", "{r:?}");
        assert_eq!(payment_meta(&r)["status"], "paid");

        // B says a session is paid, but for another amount than A's intent
        // (here B's record was changed by hand): A does not take it.
        let r = crate::harness::call(&client, "echo", echo_args("other")).await;
        let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
        let url = structured(&r)["payment_url"].as_str().unwrap().to_owned();
        let session = url.rsplit('/').next().unwrap();
        let changed = format!("UPDATE payment_sessions SET amount = amount * 100 WHERE id = '{session}'");
        assert_eq!(tollgate::testing::execute(&b.env.db, &changed).await.unwrap(), 1);
        let response = checkout_post(&b.base, session, &[("action", "settle")]).await;
        assert_eq!(response.status(), 303);
        let again = json!({"text": "other", "payment_id": id});
        let r = crate::harness::call(&client, "echo", again).await;
        assert_eq!(error_code(&r), "payment_failed", "{r:?}");
        assert!(text(&r).contains("paid as 1.00 USD, not the 0.01 USD"), "{}", text(&r));
        client.cancel().await.ok();
        // A's ledger took the money in from outside and earned it; B's took it at checkout.
        a.assert_ledger_ok().await;
        b.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    /// A payment opened before `[provider]` changed: one paid in this store
    /// is still redeemed once a remote provider is configured (it was asked
    /// of the remote, which never heard of it, so it sat in clearing); one
    /// opened at a remote no longer configured is left as it is, and its
    /// caller is told why (it was asked of the local provider, which took
    /// it for unpaid, and expired it with its payment at the remote). That
    /// holds for a sessions API at another URL too (it was asked of that
    /// one, which did not know it either), and once its own remote is back,
    /// a payment made there is redeemed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_payment_opened_before_the_provider_changed_is_settled_by_its_own_provider() {
        let b = HttpServer::start(&two_step_pricing()).await;
        let local = crate::harness::pricing("resubmit", "");
        let (a, remote_client) = paying_through(&b, &local).await;
        let remote_config = std::fs::read_to_string(&a.config).unwrap();
        let r = crate::harness::call(&remote_client, "echo", echo_args("remote")).await;
        let at_b = structured(&r)["payment_id"].as_str().unwrap().to_owned();
        let url = structured(&r)["payment_url"].as_str().unwrap().to_owned();
        let session_at_b = url.rsplit('/').next().unwrap().to_owned();
        remote_client.cancel().await.ok();
        let opened_at_b = format!("opened with provider `sessions_api at {}`", b.base);

        // Back to the local provider: a call paid here, not yet redeemed.
        std::fs::write(&a.config, &local).unwrap();
        let client = a.client(None).await;
        let r = crate::harness::call(&client, "echo", echo_args("here")).await;
        let here = structured(&r)["payment_id"].as_str().unwrap().to_owned();
        a.ok(&["sessions", "pay", &here]).await;
        let r = crate::harness::call(&client, "echo", json!({"text": "remote", "payment_id": at_b})).await;
        assert_eq!(error_code(&r), "payment_system_unavailable", "{r:?}");
        assert!(text(&r).contains(&opened_at_b), "{}", text(&r));
        client.cancel().await.ok();

        // To a sessions API elsewhere, which never heard of B's session.
        let c = HttpServer::start(&two_step_pricing()).await;
        std::fs::write(&a.config, remote_config.replace(&b.base, &c.base)).unwrap();
        let key = c.key("tollgate-a", &["sessions:create", "sessions:read"]).await;
        let client = a.client_with_env(None, &[("TOLLGATE_PROVIDER_KEY", key.as_str())]).await;
        let r = crate::harness::call(&client, "echo", json!({"text": "remote", "payment_id": at_b})).await;
        assert_eq!(error_code(&r), "payment_system_unavailable", "{r:?}");
        assert!(text(&r).contains(&opened_at_b), "{}", text(&r));
        client.cancel().await.ok();
        let store = tollgate::testing::open_store(&a.db).await.unwrap();
        let status = store.intent(&at_b).await.unwrap().unwrap().status;
        assert_eq!(status.as_str(), "awaiting_payment", "left as it is");

        // And to B again: the payment made here, and the one made at B
        // meanwhile, are redeemed.
        let response = checkout_post(&b.base, &session_at_b, &[("action", "settle")]).await;
        assert_eq!(response.status(), 303);
        std::fs::write(&a.config, &remote_config).unwrap();
        let key = b.key("tollgate-a", &["sessions:create", "sessions:read"]).await;
        let client = a.client_with_env(None, &[("TOLLGATE_PROVIDER_KEY", key.as_str())]).await;
        let r = crate::harness::call(&client, "echo", json!({"text": "here", "payment_id": here})).await;
        assert_eq!(text(&r), "here", "{r:?}");
        assert_eq!(payment_meta(&r)["status"], "paid");
        let r = crate::harness::call(&client, "echo", json!({"text": "remote", "payment_id": at_b})).await;
        assert_eq!(text(&r), "remote", "{r:?}");
        assert_eq!(payment_meta(&r)["status"], "paid");
        client.cancel().await.ok();
        a.assert_ledger_ok().await;
    }
}

on_both_backends! {
    /// A payment made at the remote tollgate, whose caller comes back only
    /// after the intent's time ran out, is not lost: A's upkeep asks B,
    /// keeps the intent paid, and the call runs when redeemed. That holds
    /// for a payment made after A's time too, while B's session was still
    /// open (B's time is its own) and nobody had asked A about it. A caller
    /// who asks after A's time is told it expired, and that holds: A
    /// cancels B's session first, so it can no longer be paid there. (A
    /// left it payable, and a payment made after that answer was kept for
    /// a call its caller had been told was over: paid twice, once a new
    /// payment was made.) One never paid expires once B says its session did.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_remote_payment_made_while_its_session_is_open_is_kept_past_the_intents_time() {
        let (b, a, client) = paying_through_for_seconds("resubmit").await;
        let open = async |text: &str| {
            let r = crate::harness::call(&client, "echo", echo_args(text)).await;
            let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
            let url = structured(&r)["payment_url"].as_str().unwrap().to_owned();
            (id, url.rsplit('/').next().unwrap().to_owned())
        };
        let (in_time, session) = open("in time").await;
        let (late, late_session) = open("late").await;
        let (told, told_session) = open("told").await;
        let (never, _) = open("never").await;
        let response = checkout_post(&b.base, &session, &[("action", "settle")]).await;
        assert_eq!(response.status(), 303);

        // Past A's time, B's sessions are still open. One is paid there
        // now; one's caller asks A first, and is told it expired.
        tokio::time::sleep(Duration::from_millis(2300)).await;
        let response = checkout_post(&b.base, &late_session, &[("action", "settle")]).await;
        assert_eq!(response.status(), 303, "B's session was still open");
        let r = crate::harness::call(&client, "echo", json!({"text": "told", "payment_id": told})).await;
        assert_eq!(error_code(&r), "payment_expired", "{r:?}");
        let at_b = tollgate::testing::open_store(&b.env.db).await.unwrap();
        let told_at_b = at_b.session(&told_session).await.unwrap().unwrap().status;
        assert_eq!(told_at_b.as_str(), "cancelled", "B's session can no longer be paid");
        let page = http()
            .get(format!("{}/checkout/{told_session}", b.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(page.contains("This payment request was cancelled."), "{page}");
        assert!(!page.contains("name=\"csrf\""), "no form to pay with: {page}");

        // Then past B's time too, and a few of A's upkeep passes.
        let store = tollgate::testing::open_store(&a.db).await.unwrap();
        let status = async |id: &str| store.intent(id).await.unwrap().unwrap().status;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        for id in [&in_time, &late, &never] {
            while status(id).await.as_str() == "awaiting_payment" {
                assert!(tokio::time::Instant::now() < deadline, "A's upkeep never settled {id}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        assert_eq!(status(&in_time).await.as_str(), "paid");
        assert_eq!(status(&late).await.as_str(), "paid");
        assert_eq!(status(&told).await.as_str(), "expired");
        assert_eq!(status(&never).await.as_str(), "expired");

        for (text, id) in [("in time", &in_time), ("late", &late)] {
            let r = crate::harness::call(&client, "echo", json!({"text": text, "payment_id": id})).await;
            assert_eq!(crate::harness::text(&r), text, "{r:?}");
            assert_eq!(payment_meta(&r)["status"], "paid");
        }
        for (text, id) in [("told", &told), ("never", &never)] {
            let r = crate::harness::call(&client, "echo", json!({"text": text, "payment_id": id})).await;
            assert_eq!(error_code(&r), "payment_expired");
        }
        client.cancel().await.ok();
        a.assert_ledger_ok().await;
        b.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    /// A dynamic confirm tool answered "expired" after its time, while its
    /// session is still open at the remote provider, goes away, and the
    /// remote session is cancelled so nobody pays it there for nothing.
    /// One nobody calls stays listed while its session may be paid: a
    /// payment made there meanwhile is kept by upkeep, and the tool then
    /// runs the call.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dynamic_confirm_tool_stays_while_its_remote_session_is_open() {
        let (b, a, client) = paying_through_for_seconds("dynamic_tools").await;
        let offer = async |text: &str| {
            let r = crate::harness::call(&client, "echo", echo_args(text)).await;
            let confirm = structured(&r)["next_step"].as_str().unwrap().to_owned();
            let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
            let url = structured(&r)["payment_url"].as_str().unwrap().to_owned();
            (confirm, id, url.rsplit('/').next().unwrap().to_owned())
        };
        let (told, _, told_session) = offer("told").await;
        let (confirm, id, session) = offer("late").await;
        let listed = async |name: &str| {
            client.list_all_tools().await.unwrap().iter().any(|t| t.name == name)
        };

        tokio::time::sleep(Duration::from_millis(2300)).await;
        let r = crate::harness::call(&client, &told, json!({})).await;
        assert_eq!(error_code(&r), "payment_expired", "{r:?}");
        assert!(!listed(&told).await, "an expired confirm tool goes away");
        let at_b = tollgate::testing::open_store(&b.env.db).await.unwrap();
        let status = at_b.session(&told_session).await.unwrap().unwrap().status;
        assert_eq!(status.as_str(), "cancelled", "B's session can no longer be paid");

        assert!(listed(&confirm).await, "withdrawn while B's session is open");
        let response = checkout_post(&b.base, &session, &[("action", "settle")]).await;
        assert_eq!(response.status(), 303, "B's session was still open");

        let store = tollgate::testing::open_store(&a.db).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while store.intent(&id).await.unwrap().unwrap().status.as_str() != "paid" {
            assert!(tokio::time::Instant::now() < deadline, "A's upkeep never kept the payment");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(listed(&confirm).await, "kept for the paid intent");
        let r = crate::harness::call(&client, &confirm, json!({})).await;
        assert_eq!(crate::harness::text(&r), "late", "{r:?}");
        assert_eq!(payment_meta(&r)["status"], "paid");
        client.cancel().await.ok();
        a.assert_ledger_ok().await;
        b.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hosts_bodies_and_anonymous_access_are_guarded() {
        let server = HttpServer::start(&two_step_pricing()).await;
        let key = server.key("judy", &["mcp", "sessions:create"]).await;
        let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}});
        // DNS rebinding: a foreign Host is refused on /mcp.
        let response = http()
            .post(format!("{}/mcp", server.base))
            .bearer_auth(&key)
            .header("host", "evil.example")
            .header("accept", "application/json, text/event-stream")
            .json(&init)
            .send()
            .await
            .unwrap();
        assert!(response.status().is_client_error(), "{}", response.status());
        // And on the checkout page (it took any Host), while probes of
        // /healthz, which name addresses of their own, are answered.
        let page = format!("{}/checkout/pay_x", server.base);
        let foreign = http().get(&page).header("host", "evil.example").send().await.unwrap();
        assert_eq!(foreign.status(), 403);
        // A Host that is not text is refused too, not passed over for the
        // request line's own (allowed) authority.
        let status_line = async |host: &[u8]| {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let authority = server.base.trim_start_matches("http://");
            let mut stream = tokio::net::TcpStream::connect(authority).await.unwrap();
            let mut request = format!("GET {page} HTTP/1.1\r\nHost: ").into_bytes();
            request.extend_from_slice(host);
            request.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
            stream.write_all(&request).await.unwrap();
            let mut answer = Vec::new();
            stream.read_to_end(&mut answer).await.unwrap();
            String::from_utf8_lossy(&answer).lines().next().unwrap_or_default().to_owned()
        };
        assert!(status_line(b"evil\x80").await.starts_with("HTTP/1.1 400"));
        let authority = server.base.trim_start_matches("http://").as_bytes().to_vec();
        assert!(status_line(&authority).await.starts_with("HTTP/1.1 404"), "its own host");
        assert_eq!(http().get(&page).send().await.unwrap().status(), 404, "its own host");
        let probe = http()
            .get(format!("{}/healthz", server.base))
            .header("host", "10.0.0.7:8080")
            .send()
            .await
            .unwrap();
        assert_eq!(probe.status(), 200);
        // So is a browser page of another site (an Origin not allowed; none
        // is by default), while a client that sends no Origin is served.
        let from = |origin: Option<&str>| {
            let mut request = http()
                .post(format!("{}/mcp", server.base))
                .bearer_auth(&key)
                .header("accept", "application/json, text/event-stream")
                .json(&init);
            if let Some(origin) = origin {
                request = request.header("origin", origin);
            }
            request.send()
        };
        let response = from(Some("https://evil.example")).await.unwrap();
        assert_eq!(response.status(), 403);
        let response = from(None).await.unwrap();
        assert!(response.status().is_success(), "{}", response.status());
        // Oversized bodies are refused before any work.
        let huge = json!({"amount": 100, "currency": "usd", "description": "x".repeat(200_000)});
        let response = http()
            .post(format!("{}/v1/sessions", server.base))
            .bearer_auth(&key)
            .json(&huge)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 413);
        // In JSON, as the API's other errors.
        let body: Value = response.json().await.unwrap();
        assert_eq!((&body["error"], &body["field"]), (&json!("invalid_request"), &json!("body")), "{body}");
        assert!(body["message"].as_str().unwrap().contains("bytes; it was not read"), "{body}");

        // Anonymous /mcp only when the config says so.
        let open = HttpServer::start(
            &two_step_pricing().replace("[store]", "[http]\nanonymous_mcp = true\n\n[store]"),
        )
        .await;
        let client = open.mcp(None, ()).await;
        let r = call(&client, "echo", echo_args("anon")).await;
        assert_eq!(
            structured(&r)["status"],
            "payment_required",
            "anonymous: no wallet, so a payment session"
        );
        client.cancel().await.ok();
        let response = http()
            .post(format!("{}/v1/sessions", open.base))
            .json(&json!({"amount": 100, "currency": "usd"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "/v1 always needs a key");
    }
}

on_both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_charge_above_the_threshold_is_approved_at_the_checkout_page_with_a_persons_key_not_the_agents() {
        let pricing = two_step_pricing().replace(
            "approval_threshold = \"5.00\"",
            "approval_threshold = \"0.02\"",
        );
        let server = HttpServer::start(&pricing).await;
        server.env.topup("kim", "1.00").await;
        let kim = server.key("kim", &["mcp"]).await;
        let lee = server.key("lee", &["mcp"]).await;
        let client = server.mcp(Some(&kim), ()).await;
        let r = call(&client, "divide", json!({"a": 8, "b": 2})).await;
        assert!(text(&r).contains("Approval required"), "{}", text(&r));
        let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
        let page = http()
            .get(format!("{}/checkout/{id}", server.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            page.contains("Approve charging 0.05 USD to wallet <b>kim</b>"),
            "{page}"
        );
        assert!(
            !page.contains("settle_button"),
            "an approval cannot be settled without the wallet"
        );

        // Someone else's key cannot approve a charge to kim's wallet; nor
        // can the key kim's client calls tools with, which an agent holds
        // (it could approve its own charges): a person's key can.
        let response = checkout_post(&server.base, &id, &[("action", "pay"), ("api_key", &lee)]).await;
        assert_eq!(response.status(), 403);
        let response = checkout_post(&server.base, &id, &[("action", "pay"), ("api_key", &kim)]).await;
        assert_eq!(response.status(), 403);
        let said = response.text().await.unwrap();
        assert!(said.contains("with the approve scope"), "{said}");
        assert_eq!(server.env.available("kim").await, "1.00");
        let kims_own = server.key("kim", &["approve"]).await;
        let response =
            checkout_post(&server.base, &id, &[("action", "pay"), ("api_key", &kims_own)]).await;
        assert_eq!(response.status(), 303);
        let r = call(&client, "confirm_divide_payment", json!({"payment_id": id})).await;
        assert_eq!(structured(&r), json!({"quotient": 4.0}));
        assert_eq!(server.env.available("kim").await, "0.95");

        // A wallet too short to be asked for approval gets an ordinary
        // payment, still above the threshold: paying it from the wallet
        // is the yes, so it too takes a person's key.
        server.env.topup("max", "0.01").await;
        let max = server.key("max", &["mcp"]).await;
        let maxs = server.mcp(Some(&max), ()).await;
        let r = call(&maxs, "divide", json!({"a": 8, "b": 2})).await;
        let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
        server.env.topup("max", "1.00").await;
        let response = checkout_post(&server.base, &id, &[("action", "pay"), ("api_key", &max)]).await;
        assert_eq!(response.status(), 403);
        assert_eq!(server.env.available("max").await, "1.01");
        let maxs_own = server.key("max", &["approve"]).await;
        let response =
            checkout_post(&server.base, &id, &[("action", "pay"), ("api_key", &maxs_own)]).await;
        assert_eq!(response.status(), 303);
        assert_eq!(server.env.available("max").await, "0.96");
        maxs.cancel().await.ok();
        client.cancel().await.ok();
        server.env.assert_ledger_ok().await;
    }
}

/// A raw MCP session over HTTP: initialized, then fed whatever bytes a
/// test likes.
struct RawSession {
    url: String,
    key: String,
    session: String,
}

impl RawSession {
    async fn open(server: &HttpServer, key: &str) -> Self {
        let url = format!("{}/mcp", server.base);
        let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}});
        let response = http()
            .post(&url)
            .bearer_auth(key)
            .header("accept", "application/json, text/event-stream")
            .json(&init)
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "{}", response.status());
        let session = response
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .expect("a session id")
            .to_owned();
        let raw = Self {
            url,
            key: key.to_owned(),
            session,
        };
        raw.send(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#.to_vec())
            .await;
        raw
    }

    /// Posts a body; the status and the body as text.
    async fn send(&self, body: Vec<u8>) -> (u16, String) {
        let response = http()
            .post(&self.url)
            .bearer_auth(&self.key)
            .header("accept", "application/json, text/event-stream")
            .header("content-type", "application/json")
            .header("mcp-session-id", &self.session)
            .header("mcp-protocol-version", "2025-11-25")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    }
}

on_both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fast_path_call_whose_client_went_away_is_not_charged() {
        let pricing = crate::harness::pricing("two_step", "")
            + "\n[[tools]]\nname = \"sleep\"\nprice = \"0.01\"\n";
        let server = HttpServer::start(&pricing).await;
        server.env.topup("lou", "1.00").await;
        let key = server.key("lou", &["mcp"]).await;
        let raw = RawSession::open(&server, &key).await;
        let sleep = |id: u32, ms: u32| {
            json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                   "params": {"name": "sleep", "arguments": {"ms": ms}}})
            .to_string()
        };
        // The client gives up a quarter of a second into an 800ms run,
        // having read the stream's first event.
        let mut response = http()
            .post(&raw.url)
            .bearer_auth(&key)
            .header("accept", "application/json, text/event-stream")
            .header("content-type", "application/json")
            .header("mcp-session-id", &raw.session)
            .header("mcp-protocol-version", "2025-11-25")
            .body(sleep(7, 800))
            .send()
            .await
            .expect("sent");
        let first = response.chunk().await.expect("read").unwrap_or_default();
        assert!(String::from_utf8_lossy(&first).starts_with("data:"), "an event stream");
        tokio::time::sleep(Duration::from_millis(250)).await;
        drop(response);
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(server.env.available("lou").await, "1.00", "nothing charged");
        let (_, held, _) = server.env.balance("lou").await;
        assert_eq!(held, "0.00", "its hold released");

        // One that stays for its answer is charged.
        let (status, answer) = raw.send(sleep(8, 10).into_bytes()).await;
        assert_eq!(status, 200);
        assert!(answer.contains(r#""status":"paid""#), "{answer}");
        assert_eq!(server.env.available("lou").await, "0.99");
        server.env.assert_ledger_ok().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hostile_requests_over_http_get_clear_errors_and_change_nothing() {
        let server = HttpServer::start(&crate::harness::pricing("resubmit", "")).await;
        server.env.topup("judy", "1.00").await;
        let judy = server.key("judy", &["mcp"]).await;
        let raw = RawSession::open(&server, &judy).await;

        let deep = format!(
            r#"{{"jsonrpc":"2.0","id":8,"method":"tools/call","params":{{"name":"echo","arguments":{{"text":{}1{}}}}}}}"#,
            "[".repeat(500),
            "]".repeat(500)
        );
        let oversized = format!(
            r#"{{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{{"name":"echo","arguments":{{"text":"{}"}}}}}}"#,
            "x".repeat(100_000)
        );
        // (body, HTTP status, JSON-RPC code, id)
        let hostile: [(Vec<u8>, u16, i64, Value); 12] = [
            (b"this is not json".to_vec(), 400, -32700, Value::Null),
            (b"".to_vec(), 400, -32600, Value::Null),
            (br#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#.to_vec(), 400, -32600, Value::Null),
            (br#"{"id":3,"method":"ping"}"#.to_vec(), 400, -32600, json!(3)),
            (br#"{"jsonrpc":"2.0","id":4,"method":"tools/call"}"#.to_vec(), 400, -32602, json!(4)),
            (br#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":5}}"#.to_vec(), 400, -32602, json!(5)),
            (br#"{"jsonrpc":"2.0","id":6,"method":"tools/call","params":{"name":"echo","arguments":"x"}}"#.to_vec(), 400, -32602, json!(6)),
            (b"\xff\xfe{\"id\":1}".to_vec(), 400, -32700, Value::Null),
            (b"42".to_vec(), 400, -32600, Value::Null),
            (br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","#.to_vec(), 400, -32700, json!(7)),
            (deep.into_bytes(), 400, -32600, json!(8)),
            (oversized.into_bytes(), 413, -32600, Value::Null),
        ];
        for (body, status, code, id) in hostile {
            let shown = String::from_utf8_lossy(&body[..body.len().min(60)]).into_owned();
            let (got, text) = raw.send(body).await;
            assert_eq!(got, status, "{shown}: {text}");
            let reply: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{shown}: {e}: {text}"));
            assert_eq!(reply["error"]["code"], code, "{shown}: {reply}");
            assert_eq!(reply["id"], id, "{shown}: {reply}");
            assert!(!reply["error"]["message"].as_str().unwrap_or_default().is_empty());
        }

        // A byte-order mark before a good message is skipped.
        let mut marked = b"\xEF\xBB\xBF".to_vec();
        marked.extend_from_slice(br#"{"jsonrpc":"2.0","id":30,"method":"ping"}"#);
        let (status, answer) = raw.send(marked).await;
        assert_eq!(status, 200, "{answer}");
        assert!(answer.contains(r#""id":30"#) && answer.contains("result"), "{answer}");

        // Well-formed but wrong, through a real client: clear tool errors.
        let client = server.mcp(Some(&judy), ()).await;
        let r = call(&client, "echo", json!({"text": 5})).await;
        assert_eq!(error_code(&r), "invalid_arguments");
        let r = call(&client, "echo", json!({"text": "x".repeat(60_000)})).await;
        assert_eq!(text(&r).len(), 60_000, "a long string within the limit is just a string");
        for id in ["x' OR '1'='1", "../../../etc/passwd", "pay_%00%2e%2e", &"p".repeat(3000)] {
            let r = call(&client, "echo", json!({"text": "hi", "payment_id": id})).await;
            assert_eq!(error_code(&r), "payment_not_found", "{id}");
        }
        // Another principal's payment id is not judy's to use.
        let kate = server.key("kate", &["mcp"]).await;
        let kates = server.mcp(Some(&kate), ()).await;
        let kates_id = crate::harness::payment_id_of(&call(&kates, "echo", echo_args("mine")).await);
        let r = call(&client, "echo", json!({"text": "mine", "payment_id": kates_id})).await;
        assert_eq!(error_code(&r), "payment_mismatch");
        // A forged request state pays for nothing.
        let forged = raw
            .send(serde_json::to_vec(&json!({"jsonrpc": "2.0", "id": 20, "method": "tools/call",
                "params": {"name": "echo", "arguments": {"text": "hi"}, "requestState": kates_id}})).unwrap())
            .await;
        assert!(forged.1.contains("\"isError\":true"), "{forged:?}");
        // judy's session is judy's: kate's key with its id is refused,
        // whatever it asks (a call, an answer to a prompt, ending it).
        let hijack = RawSession { key: kate.clone(), ..raw };
        for request in [
            json!({"jsonrpc": "2.0", "id": 21, "method": "tools/list"}),
            json!({"jsonrpc": "2.0", "id": 22, "method": "tools/call",
                   "params": {"name": "echo", "arguments": {"text": "hi"}}}),
            json!({"jsonrpc": "2.0", "id": 0, "result": {"action": "accept", "content": {"approve": true}}}),
        ] {
            let (status, text) = hijack.send(serde_json::to_vec(&request).unwrap()).await;
            assert_eq!(status, 403, "{text}");
            assert!(text.contains("opened by another principal"), "{text}");
        }
        let ended = http()
            .delete(&hijack.url)
            .bearer_auth(&kate)
            .header("mcp-session-id", &hijack.session)
            .send()
            .await
            .unwrap();
        assert_eq!(ended.status(), 403);
        let judys = RawSession { key: judy.clone(), ..hijack };
        let (status, text) = judys
            .send(br#"{"jsonrpc":"2.0","id":23,"method":"tools/list"}"#.to_vec())
            .await;
        assert_eq!(status, 200, "{text}");
        assert!(text.contains("\"echo\""), "still judy's, and open: {text}");

        // Still answering, and nothing moved but what was asked: the one
        // echo of the long string, paid from judy's wallet.
        assert_eq!(call(&client, "word_count", json!({"text": "a b"})).await.is_error, Some(false));
        assert_eq!(server.env.available("judy").await, "0.99");
        client.cancel().await.ok();
        kates.cancel().await.ok();
        server.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    /// A 2026-07-28 client has no session over HTTP (each request is served
    /// by a server of its own): its requests share one per principal, so a
    /// dynamic confirm tool opened by one call is listed to, and runs for,
    /// the next; anonymous callers' open payments are capped between them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_2026_client_over_http_confirms_its_dynamic_tool_and_anonymous_ones_are_capped() {
        let pricing = crate::harness::pricing("dynamic_tools", "max_open_intents = 2")
            .replace("[store]", "[http]\nanonymous_mcp = true\n\n[store]");
        let server = HttpServer::start(&pricing).await;
        let key = server.key("hana", &["mcp"]).await;
        let client = server.mcp_modern(Some(&key)).await;
        let r = call(&client, "echo", echo_args("stateless")).await;
        assert_eq!(structured(&r)["status"], "payment_required", "{r:?}");
        let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
        let confirm = format!("confirm_{id}");
        assert_eq!(structured(&r)["next_step"], confirm.as_str());
        assert!(text(&r).ends_with("(it takes no arguments)."), "{}", text(&r));
        let listed = |tools: Vec<rmcp::model::Tool>| tools.iter().any(|t| t.name == confirm);
        assert!(listed(client.list_all_tools().await.unwrap()), "listed to her next request");
        let other_key = server.key("ivan", &["mcp"]).await;
        let ivan = server.mcp_modern(Some(&other_key)).await;
        assert!(!listed(ivan.list_all_tools().await.unwrap()), "not to another principal");

        server.env.ok(&["sessions", "pay", &id]).await;
        let r = call(&ivan, &confirm, json!({})).await;
        assert_eq!(error_code(&r), "payment_mismatch", "{r:?}");
        let r = call(&client, &confirm, json!({})).await;
        assert_eq!(text(&r), "stateless", "{r:?}");
        assert_eq!(payment_meta(&r)["status"], "paid");
        assert!(!listed(client.list_all_tools().await.unwrap()), "used, so withdrawn");

        // Anonymous: two open payments between them all, then refused.
        let anonymous = server.mcp_modern(None).await;
        let mut codes = Vec::new();
        for n in 0..3 {
            let r = call(&anonymous, "echo", echo_args(&format!("anon {n}"))).await;
            let s = structured(&r);
            codes.push(s["status"].as_str().or(s["error"].as_str()).unwrap_or_default().to_owned());
        }
        assert_eq!(codes, ["payment_required", "payment_required", "too_many_open_payments"]);
        for c in [client, ivan, anonymous] {
            c.cancel().await.ok();
        }
        // Its one offer used, hana's stateless session keeps no entry.
        assert_eq!(server.gate.dynamic_tools().sessions_kept(), 0);
        server.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    /// A request that names its MCP session but carries 2026-07-28
    /// metadata is served statelessly by rmcp, on a server of its own: it
    /// belongs with the principal's other stateless requests, not with a
    /// session made up for it and thrown away (which left the confirm tool
    /// it opened unlisted, and gave anonymous callers a new cap each call).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_with_a_session_id_and_2026_metadata_joins_the_stateless_session() {
        let pricing = crate::harness::pricing("dynamic_tools", "");
        let server = HttpServer::start(&pricing).await;
        let key = server.key("hana", &["mcp"]).await;
        let raw = RawSession::open(&server, &key).await;
        let call = json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {
            "name": "echo", "arguments": {"text": "mixed"},
            "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                      "io.modelcontextprotocol/clientCapabilities": {}}}});
        let response = http()
            .post(&raw.url)
            .bearer_auth(&key)
            .header("accept", "application/json, text/event-stream")
            .header("mcp-session-id", &raw.session)
            .header("mcp-protocol-version", "2026-07-28")
            .header("mcp-method", "tools/call")
            .header("mcp-name", "echo")
            .json(&call)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body = response.text().await.unwrap();
        assert!(status.is_success(), "{status}: {body}");
        let confirm = body
            .split('"')
            .find(|word| word.starts_with("confirm_pay_"))
            .unwrap_or_else(|| panic!("no confirm tool offered: {body}"))
            .to_owned();
        let modern = server.mcp_modern(Some(&key)).await;
        let tools = modern.list_all_tools().await.unwrap();
        assert!(tools.iter().any(|t| t.name == confirm), "{confirm} not listed to hana's next request");
        modern.cancel().await.ok();
        server.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    /// An HTTP MCP session its client ends (DELETE) ends its dynamic
    /// payments: only it could confirm them. One paid and never used is
    /// refunded at once, one unpaid cancelled. Another session's, and a
    /// stateless request's, are left alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_http_session_that_ends_ends_its_dynamic_payments() {
        let server = HttpServer::start(&crate::harness::pricing("dynamic_tools", "")).await;
        server.env.topup("pat", "1.00").await;
        let key = server.key("mo", &["mcp"]).await;
        let offer = async |client: &crate::harness::Client, text: &str| {
            let r = call(client, "echo", echo_args(text)).await;
            structured(&r)["payment_id"].as_str().expect("a payment id").to_owned()
        };
        let ending = server.mcp(Some(&key), ()).await;
        let staying = server.mcp(Some(&key), ()).await;
        let (unpaid, paid) = (offer(&ending, "unpaid").await, offer(&ending, "paid").await);
        let kept = offer(&staying, "kept").await;
        let stateless = server.mcp_modern(Some(&key)).await;
        let stateless_kept = offer(&stateless, "stateless").await;
        stateless.cancel().await.ok();
        for id in [&paid, &kept] {
            server.env.ok(&["sessions", "pay", id, "--from", "pat"]).await;
        }
        assert_eq!(server.env.available("pat").await, "0.98");

        ending.cancel().await.ok();
        let store = tollgate::testing::open_store(&server.env.db).await.unwrap();
        let status = async |id: &str| store.intent(id).await.unwrap().unwrap().status;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while status(&paid).await.as_str() != "failed" || status(&unpaid).await.as_str() != "cancelled" {
            assert!(tokio::time::Instant::now() < deadline, "the ended session's payments were left");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(server.env.available("pat").await, "0.99", "the paid one refunded");
        for id in [&kept, &stateless_kept] {
            assert_eq!(status(id).await.as_str(), "awaiting_payment", "{id} left alone");
        }
        let confirmed = call(&staying, &format!("confirm_{kept}"), json!({})).await;
        assert_eq!(text(&confirmed), "kept", "{confirmed:?}");
        staying.cancel().await.ok();
        server.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    /// An approval offered at the checkout page, to a 2026-07-28 request
    /// that declared no elicitation, cannot be approved by the agent: a
    /// later request that now declares forms and sends a yes back with the
    /// payment id as `requestState` charges nothing. (What the client would
    /// be asked was judged from what it declared now, so the yes was taken
    /// and the wallet charged.) A person approves at the checkout page.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_approval_sent_to_checkout_is_not_approved_by_a_made_up_form_answer() {
        let pricing = crate::harness::pricing("resubmit", "")
            .replace("approval_threshold = \"5.00\"", "approval_threshold = \"0.005\"")
            + "\n[timeouts]\npayment_check = \"1s\"\n";
        let server = HttpServer::start(&pricing).await;
        server.env.topup("lea", "1.00").await;
        let key = server.key("lea", &["mcp"]).await;
        let stateless = async |id: u64, params: Value| {
            let response = http()
                .post(format!("{}/mcp", server.base))
                .bearer_auth(&key)
                .header("accept", "application/json, text/event-stream")
                .header("mcp-protocol-version", "2026-07-28")
                .header("mcp-method", "tools/call")
                .header("mcp-name", "echo")
                .json(&json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": params}))
                .send()
                .await
                .unwrap();
            let status = response.status();
            let body = response.text().await.unwrap();
            assert!(status.is_success(), "{status}: {body}");
            let event = body.lines().find_map(|l| l.strip_prefix("data:")).unwrap_or(&body);
            let reply: Value = serde_json::from_str(event.trim()).unwrap_or_else(|e| panic!("{e}: {body}"));
            reply["result"].clone()
        };
        let meta = |capabilities: Value| json!({
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": capabilities});
        let asked = stateless(1, json!({"name": "echo", "arguments": {"text": "hi"}, "_meta": meta(json!({}))})).await;
        assert_eq!(asked["structuredContent"]["error"], "payment_required", "{asked}");
        let id = asked["structuredContent"]["payment_id"].as_str().expect("a payment id").to_owned();

        let yes = json!({"payment": {"action": "accept", "content": {"approve": true}}});
        let answer = stateless(2, json!({"name": "echo", "arguments": {"text": "hi"},
            "requestState": id, "inputResponses": yes,
            "_meta": meta(json!({"elicitation": {"form": {}}}))})).await;
        assert_eq!(answer["isError"], true, "{answer}");
        assert_eq!(server.env.available("lea").await, "1.00", "nothing charged: {answer}");
        server.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    /// A yes to an approval cannot charge a wallet here when payments are
    /// taken by another tollgate: the approved payment is made at that
    /// one's checkout page, and the call then runs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_approval_with_a_remote_provider_is_paid_at_its_checkout() {
        let b = HttpServer::start(&two_step_pricing()).await;
        let pricing = crate::inproc::pricing("resubmit", "")
            .replace("approval_threshold = \"5.00\"", "approval_threshold = \"0.02\"");
        let a = in_process_paying_through(&b, &pricing, |remote| remote).await;
        a.env.topup("alice", "1.00").await;
        let client = a.connect(Some("alice"), a.client(Person::Approves, Elicitation::Form), false).await;

        let r = call(&client, "divide", json!({"a": 1, "b": 2})).await;
        assert_eq!(error_code(&r), "payment_required", "{r:?}");
        assert!(text(&r).contains("approved; payments here are taken by sessions_api"), "{}", text(&r));
        assert_eq!(a.env.available("alice").await, "1.00");
        let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
        let url = structured(&r)["payment_url"].as_str().unwrap().to_owned();
        assert!(url.starts_with(&format!("{}/checkout/cs_", b.base)), "{url}");
        let session = url.rsplit('/').next().unwrap();
        assert_eq!(checkout_post(&b.base, session, &[("action", "settle")]).await.status(), 303);
        let r = call(&client, "divide", json!({"a": 1, "b": 2, "payment_id": id})).await;
        assert_eq!(structured(&r), json!({"quotient": 0.5}), "{r:?}");
        assert_eq!(payment_meta(&r)["status"], "paid");
        client.cancel().await.ok();
        a.env.assert_ledger_ok().await;
        b.env.assert_ledger_ok().await;
    }
}

/// Tollgate A in this process with `pricing`, taking its payments through
/// B's sessions API (a provider `wrap` may wrap), with a key of B's.
async fn in_process_paying_through(
    b: &HttpServer,
    pricing: &str,
    wrap: impl FnOnce(Arc<dyn tollgate::provider::Provider>) -> Arc<dyn tollgate::provider::Provider>,
) -> crate::inproc::InProcess {
    use tollgate::provider::sessions_api::SessionsApiProvider;
    let key_for_a = b
        .key("tollgate-a", &["sessions:create", "sessions:read"])
        .await;
    let remote = Arc::new(SessionsApiProvider::new(&b.base, key_for_a).expect("provider"));
    crate::inproc::with_provider(pricing, |_, _| wrap(remote)).await
}

/// Moves intent `id`'s time `ago_ms` into the past, as if it had run out
/// then (its remote session keeps its own time).
async fn intent_past_its_time(a: &crate::inproc::InProcess, id: &str, ago_ms: i64) {
    let sql = format!(
        "UPDATE intents SET expires_at = {} WHERE id = '{id}'",
        tollgate::store::now_ms() - ago_ms
    );
    assert_eq!(
        tollgate::testing::execute(&a.env.db, &sql).await.unwrap(),
        1
    );
}

/// An anonymous `echo` call through `a` whose person declines the prompt:
/// its client, the answer (`payment_declined`) and the intent as the
/// decline left it.
async fn declined_echo(
    a: &crate::inproc::InProcess,
    text: &str,
) -> (
    crate::inproc::Client,
    rmcp::model::CallToolResult,
    tollgate::store::Intent,
) {
    let client = a
        .connect(None, a.client(Person::Declines, Elicitation::Form), false)
        .await;
    let r = call(&client, "echo", echo_args(text)).await;
    assert_eq!(error_code(&r), "payment_declined", "{r:?}");
    let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
    let intent = a.gate.store().intent(&id).await.unwrap().unwrap();
    (client, r, intent)
}

on_both_backends! {
    /// A call declined at its prompt cancels its session at the remote
    /// tollgate, so nobody can pay it there afterwards. A payment that
    /// reached the remote before the cancel did stands: the call runs when
    /// redeemed. (The sessions API had no cancel: the first session stayed
    /// payable, and the second intent was declined with its payment taken
    /// at the remote.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_declined_call_cancels_its_remote_session_unless_it_was_paid_first() {
        let b = HttpServer::start(&two_step_pricing()).await;
        let pricing = crate::inproc::pricing("elicitation", "");
        let a = in_process_paying_through(&b, &pricing, |remote| remote).await;
        let (client, _, intent) = declined_echo(&a, "no").await;
        assert_eq!(intent.status.as_str(), "declined");
        let session = intent.provider_session_id.unwrap();
        let at_b = tollgate::testing::open_store(&b.env.db).await.unwrap();
        let status = at_b.session(&session).await.unwrap().unwrap().status;
        assert_eq!(status.as_str(), "cancelled", "B's session can no longer be paid");
        client.cancel().await.ok();

        // A person pays at B's checkout page just before each cancel reaches B.
        let b_base = b.base.clone();
        let a = in_process_paying_through(&b, &pricing, |inner| {
            let mut paying = crate::inproc::Wrapped::new(inner);
            paying.before_cancel = Some(Box::new(move |session| {
                let b_base = b_base.clone();
                Box::pin(async move {
                    let paid = checkout_post(&b_base, &session, &[("action", "settle")]).await;
                    assert_eq!(paid.status(), 303);
                })
            }));
            Arc::new(paying)
        })
        .await;
        let client = a.connect(None, a.client(Person::Declines, Elicitation::Form), false).await;
        let r = call(&client, "echo", echo_args("paid")).await;
        assert_eq!(error_code(&r), "payment_in_progress", "{r:?}");
        assert!(text(&r).contains("was paid before the prompt was declined"), "{}", text(&r));
        let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
        let r = call(&client, "echo", json!({"text": "paid", "payment_id": id})).await;
        assert_eq!(text(&r), "paid", "{r:?}");
        assert_eq!(payment_meta(&r)["status"], "paid");
        client.cancel().await.ok();
        a.env.assert_ledger_ok().await;
        b.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    /// A decline whose cancel cannot reach the remote tollgate leaves the
    /// call's payment open, not ended: a payment made there afterwards is
    /// kept, and the call runs when redeemed. (The intent was ended here
    /// all the same, and a payment made there was taken and never seen.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_decline_whose_remote_cancel_fails_leaves_the_payment_open() {
        let b = HttpServer::start(&two_step_pricing()).await;
        let pricing = crate::inproc::pricing("elicitation", "");
        let a = in_process_paying_through(&b, &pricing, |inner| {
            let failing = crate::inproc::Wrapped::new(inner);
            failing.failing_cancels.store(1, std::sync::atomic::Ordering::Release);
            Arc::new(failing)
        })
        .await;
        let (client, r, intent) = declined_echo(&a, "later").await;
        assert!(text(&r).contains("a payment made there still counts"), "{}", text(&r));
        assert_eq!(intent.status.as_str(), "awaiting_payment");
        let (id, session) = (intent.id, intent.provider_session_id.unwrap());
        let at_b = tollgate::testing::open_store(&b.env.db).await.unwrap();
        assert_eq!(at_b.session(&session).await.unwrap().unwrap().status.as_str(), "pending");

        let paid = checkout_post(&b.base, &session, &[("action", "settle")]).await;
        assert_eq!(paid.status(), 303);
        let r = call(&client, "echo", json!({"text": "later", "payment_id": id})).await;
        assert_eq!(text(&r), "later", "{r:?}");
        assert_eq!(payment_meta(&r)["status"], "paid");
        client.cancel().await.ok();
        a.env.assert_ledger_ok().await;

        // A cancel the remote refuses for good (a key without the right)
        // never will go through. The session is still payable there, so
        // the call stays open until the remote's time is surely over (ten
        // minutes past its own), then upkeep ends it. (It was ended at
        // once, and a payment made there afterwards was never seen.)
        let a = in_process_paying_through(&b, &pricing, |inner| {
            let refusing = crate::inproc::Wrapped::new(inner);
            refusing.refused_cancels.store(2, std::sync::atomic::Ordering::Release);
            Arc::new(refusing)
        })
        .await;
        let (client, r, intent) = declined_echo(&a, "no").await;
        assert!(text(&r).contains("a payment made there still counts"), "{}", text(&r));
        assert_eq!(intent.status.as_str(), "awaiting_payment");
        intent_past_its_time(&a, &intent.id, 11 * 60_000).await;
        a.gate.recover_interrupted(tollgate::store::now_ms() - 60_000).await.unwrap();
        let intent = a.gate.store().intent(&intent.id).await.unwrap().unwrap();
        assert_eq!(intent.status.as_str(), "expired");
        client.cancel().await.ok();
        a.env.assert_ledger_ok().await;
        b.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    /// A session B's operator refunds whole before A's call ran reads
    /// `refunded` at B, and A does not run the call for it: it ends as
    /// cancelled. Refunded in part, it still reads `paid`.
    /// (B kept reading `paid`, and A ran the call for money the payer had
    /// back.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_payment_refunded_at_the_remote_runs_no_call() {
        let b = HttpServer::start(&two_step_pricing()).await;
        let a = in_process_paying_through(&b, &crate::inproc::pricing("resubmit", ""), |remote| {
            remote
        })
        .await;
        let client = a.connect(None, a.client(Person::Ignores, Elicitation::None), false).await;
        let r = call(&client, "echo", echo_args("refunded")).await;
        let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
        let session = a.gate.store().intent(&id).await.unwrap().unwrap().provider_session_id.unwrap();
        let paid = checkout_post(&b.base, &session, &[("action", "settle")]).await;
        assert_eq!(paid.status(), 303);
        let admin = b.key("admin", &["admin"]).await;
        let view = async || -> Value {
            http()
                .get(format!("{}/v1/sessions/{session}", b.base))
                .bearer_auth(&admin)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap()
        };
        // Refunded in part, it still pays: ending the call would leave the
        // rest at B with nothing to give it back.
        b.env.ok(&["refund", &session, "0.004", "--reason", "asked for some back"]).await;
        let partly = view().await;
        assert_eq!(partly["status"], "paid", "{partly}");
        assert_eq!(partly["refundedValue"], "0.004", "{partly}");
        b.env.ok(&["refund", &session, "--reason", "asked for it all back"]).await;
        let whole = view().await;
        assert_eq!(whole["status"], "refunded", "{whole}");
        assert_eq!(whole["refundedValue"], "0.01", "{whole}");

        let r = call(&client, "echo", json!({"text": "refunded", "payment_id": id})).await;
        assert_eq!(error_code(&r), "payment_cancelled", "{r:?}");
        let intent = a.gate.store().intent(&id).await.unwrap().unwrap();
        assert_eq!(intent.status.as_str(), "cancelled");
        client.cancel().await.ok();
        a.env.assert_ledger_ok().await;
        b.env.assert_ledger_ok().await;
    }
}

/// A payment API shaped as the seed's: `POST /v1/sessions` gives
/// `{sessionId, url}`, `GET /v1/sessions/{id}` gives `{"status": …}`
/// alone, and there is no cancel. Its sessions' statuses are set by hand.
struct SeedApi {
    base: String,
    statuses: Arc<std::sync::Mutex<std::collections::HashMap<String, &'static str>>>,
    /// Answers 404 about every session (as to a key changed for another's).
    forgetful: Arc<std::sync::atomic::AtomicBool>,
}

impl SeedApi {
    async fn start() -> Self {
        use axum::{Json, extract::Path, http::StatusCode, routing::get};
        let statuses: Arc<std::sync::Mutex<std::collections::HashMap<String, &'static str>>> =
            Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (made, read) = (statuses.clone(), statuses.clone());
        let forgetful = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let forgets = forgetful.clone();
        let checkout = base.clone();
        let app = axum::Router::new()
            .route(
                "/v1/sessions",
                axum::routing::post(move || async move {
                    let mut statuses = made.lock().unwrap();
                    let id = format!("sess_{}", statuses.len() + 1);
                    statuses.insert(id.clone(), "pending");
                    Json(json!({"sessionId": id, "url": format!("{checkout}/checkout/{id}")}))
                }),
            )
            .route(
                "/v1/sessions/{id}",
                get(move |Path(id): Path<String>| async move {
                    if forgets.load(std::sync::atomic::Ordering::Acquire) {
                        return Err(StatusCode::NOT_FOUND);
                    }
                    match read.lock().unwrap().get(&id) {
                        Some(status) => Ok(Json(json!({ "status": status }))),
                        None => Err(StatusCode::NOT_FOUND),
                    }
                }),
            );
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            base,
            statuses,
            forgetful,
        }
    }

    fn set(&self, session: &str, status: &'static str) {
        self.statuses
            .lock()
            .unwrap()
            .insert(session.to_owned(), status);
    }
}

on_both_backends! {
    /// Against the seed's payment API: a session it reports `{"status":
    /// "paid"}` runs its call (every such answer was unreadable, and the
    /// call never ran). A call past its time while its session is still
    /// open there, which has no cancel, stays payable (it was ended at
    /// once, and the payment made next was lost). A session it does not
    /// know is asked about again until a day past its time (it was taken
    /// at once as never paid).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_seed_shaped_payment_api_settles_calls_and_loses_no_payment() {
        use tollgate::provider::sessions_api::SessionsApiProvider;
        let seed = SeedApi::start().await;
        let remote = Arc::new(SessionsApiProvider::new(&seed.base, "key".into()).unwrap());
        let a = crate::inproc::with_provider(&crate::inproc::pricing("resubmit", ""), |_, _| {
            remote
        })
        .await;
        let client = a.connect(None, a.client(Person::Ignores, Elicitation::None), false).await;
        let open = async |text: &str| {
            let r = call(&client, "echo", echo_args(text)).await;
            let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
            let intent = a.gate.store().intent(&id).await.unwrap().unwrap();
            (id, intent.provider_session_id.unwrap())
        };
        let redeem = async |text: &str, id: &str| {
            call(&client, "echo", json!({"text": text, "payment_id": id})).await
        };
        let expire = async |id: &str, ago_ms: i64| intent_past_its_time(&a, id, ago_ms).await;
        let status = async |id: &str| {
            a.gate.store().intent(id).await.unwrap().unwrap().status.as_str().to_owned()
        };

        let (id, session) = open("paid").await;
        let r = redeem("paid", &id).await;
        assert_eq!(error_code(&r), "payment_pending", "{r:?}");
        seed.set(&session, "paid");
        let r = redeem("paid", &id).await;
        assert_eq!(text(&r), "paid", "{r:?}");
        assert_eq!(payment_meta(&r)["status"], "paid");

        let (id, session) = open("late").await;
        expire(&id, 1_000).await;
        let r = redeem("late", &id).await;
        assert_eq!(error_code(&r), "payment_pending", "{r:?}");
        assert!(text(&r).contains("cannot be cancelled at the provider"), "{}", text(&r));
        assert_eq!(status(&id).await, "awaiting_payment", "still payable there");
        seed.set(&session, "paid");
        let r = redeem("late", &id).await;
        assert_eq!(text(&r), "late", "{r:?}");

        let (id, session) = open("unknown").await;
        seed.statuses.lock().unwrap().remove(&session);
        expire(&id, 60_000).await;
        a.gate.recover_interrupted(tollgate::store::now_ms() - 60_000).await.unwrap();
        assert_eq!(status(&id).await, "awaiting_payment", "asked again later");
        expire(&id, 2 * 24 * 3_600_000).await;
        a.gate.recover_interrupted(tollgate::store::now_ms() - 60_000).await.unwrap();
        assert_eq!(status(&id).await, "expired", "given up a day past its time");
        client.cancel().await.ok();
        a.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    /// A call declined while its session, which has no cancel there, is
    /// unknown there too (the remote answers 404 about it, as to a key
    /// changed for another principal's) stays payable: it may be paid there
    /// all the same. (It was ended at once.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_decline_whose_session_the_remote_does_not_know_leaves_it_open() {
        use tollgate::provider::sessions_api::SessionsApiProvider;
        let seed = SeedApi::start().await;
        seed.forgetful.store(true, std::sync::atomic::Ordering::Release);
        let remote = Arc::new(SessionsApiProvider::new(&seed.base, "key".into()).unwrap());
        let pricing = crate::inproc::pricing("elicitation", "");
        let a = crate::inproc::with_provider(&pricing, |_, _| remote).await;
        let (client, r, intent) = declined_echo(&a, "unknown").await;
        assert!(text(&r).contains("a payment made there still counts"), "{}", text(&r));
        assert_eq!(intent.status.as_str(), "awaiting_payment");
        client.cancel().await.ok();
        a.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    /// Upkeep asks the remote about each payment past its time. One it
    /// answers nonsense about is skipped, and the others are still settled.
    /// (Every pass stopped at it, oldest first, as if the remote were down,
    /// and a payment made behind it was never kept.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_unusable_remote_answer_does_not_hold_up_the_others() {
        let b = HttpServer::start(&two_step_pricing()).await;
        let pricing = crate::inproc::pricing("resubmit", "")
            .replace("payment_ttl = \"15m\"", "payment_ttl = \"1s\"");
        let unreadable = Arc::new(std::sync::Mutex::new(None));
        let a = in_process_paying_through(&b, &pricing, |inner| {
            let mut wrapped = crate::inproc::Wrapped::new(inner);
            wrapped.unreadable = unreadable.clone();
            Arc::new(wrapped)
        })
        .await;
        let client = a.connect(None, a.client(Person::Declines, Elicitation::Form), false).await;
        let mut sessions = Vec::new();
        for text in ["first", "second"] {
            let r = call(&client, "echo", echo_args(text)).await;
            let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
            let url = structured(&r)["payment_url"].as_str().unwrap().to_owned();
            sessions.push((id, url.rsplit('/').next().unwrap().to_owned()));
        }
        *unreadable.lock().unwrap() = Some(sessions[0].1.clone());
        let paid = checkout_post(&b.base, &sessions[1].1, &[("action", "settle")]).await;
        assert_eq!(paid.status(), 303);
        tokio::time::sleep(Duration::from_millis(1200)).await;

        let recovered = a.gate.recover_interrupted(tollgate::store::now_ms() - 60_000).await.unwrap();
        assert_eq!(recovered.remote_paid_kept, 1, "{recovered:?}");
        let status = async |id: &str| a.gate.store().intent(id).await.unwrap().unwrap().status;
        assert_eq!(status(&sessions[0].0).await.as_str(), "awaiting_payment", "asked again later");
        assert_eq!(status(&sessions[1].0).await.as_str(), "paid");
        let r = call(&client, "echo", json!({"text": "second", "payment_id": sessions[1].0})).await;
        assert_eq!(text(&r), "second", "{r:?}");
        // A day past its time, it is given up as never paid (a status this
        // tollgate cannot read held it open for ever).
        intent_past_its_time(&a, &sessions[0].0, 2 * 24 * 3_600_000).await;
        a.gate.recover_interrupted(tollgate::store::now_ms() - 60_000).await.unwrap();
        assert_eq!(status(&sessions[0].0).await.as_str(), "expired");
        client.cancel().await.ok();
        a.env.assert_ledger_ok().await;
        b.env.assert_ledger_ok().await;
    }
}

/// A `/mcp` body that is sent too slowly is answered 408 once
/// `request_timeout` has passed, and one that breaks off is a 400, not
/// taken for one too large.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_body_that_is_slow_or_broken_is_refused_for_what_it_is() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pricing =
        two_step_pricing().replace("[store]", "[http]\nrequest_timeout = \"1s\"\n\n[store]");
    let server = HttpServer::start(&pricing).await;
    let key = server.key("kim", &["mcp"]).await;
    let authority = server.base.trim_start_matches("http://").to_owned();
    let answer_to = async |head: &str, body: &[u8]| {
        let mut stream = tokio::net::TcpStream::connect(&authority).await.unwrap();
        let request = format!(
            "POST /mcp HTTP/1.1\r\nHost: {authority}\r\nAuthorization: Bearer {key}\r\n\
             Accept: application/json, text/event-stream\r\nContent-Type: application/json\r\n\
             {head}Connection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        stream.write_all(body).await.unwrap();
        let mut answer = Vec::new();
        // Never sends the rest: the server must end the exchange itself.
        tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut answer))
            .await
            .expect("answered in time")
            .ok();
        String::from_utf8_lossy(&answer).into_owned()
    };
    let slow = answer_to("Content-Length: 100\r\n", br#"{"jsonrpc":"#).await;
    assert!(slow.starts_with("HTTP/1.1 408"), "{slow}");
    assert!(slow.contains("did not arrive within 1s"), "{slow}");
    let broken = answer_to("Transfer-Encoding: chunked\r\n", b"zz\r\nnot a chunk\r\n").await;
    assert!(broken.starts_with("HTTP/1.1 400"), "{broken}");
    assert!(broken.contains("could not be read"), "{broken}");
}

/// A connection that sends its request head slowly, or nothing at all, is
/// closed after `request_timeout`, so a client cannot hold connections open
/// by trickling bytes; one that sends a whole request in time is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_that_does_not_arrive_in_time_closes_its_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pricing =
        two_step_pricing().replace("[store]", "[http]\nrequest_timeout = \"1s\"\n\n[store]");
    let server = HttpServer::start(&pricing).await;
    let authority = server.base.trim_start_matches("http://").to_owned();
    // Reads until the server closes, or gives up after 20 s.
    let closed_after = async |stream: &mut tokio::net::TcpStream| {
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut answer))
            .await
            .expect("the server closed the connection")
            .ok();
        String::from_utf8_lossy(&answer).into_owned()
    };

    let mut trickling = tokio::net::TcpStream::connect(&authority).await.unwrap();
    trickling
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: ")
        .await
        .unwrap();
    let answer = closed_after(&mut trickling).await;
    assert!(!answer.contains("200 OK"), "{answer}");

    let mut silent = tokio::net::TcpStream::connect(&authority).await.unwrap();
    closed_after(&mut silent).await;

    // A kept-alive connection is answered, then closed once idle as long.
    let mut kept = tokio::net::TcpStream::connect(&authority).await.unwrap();
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    kept.write_all(request.as_bytes()).await.unwrap();
    let answer = closed_after(&mut kept).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

tollgate::on_postgres! {
    /// A checkout whose write does not finish in time (here the session's
    /// row is locked elsewhere) says the outcome is not known and to reload,
    /// rather than a bare timeout that reads as "it failed" while the
    /// payment may still land.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_checkout_that_cannot_finish_in_time_says_to_reload() {
        use sqlx::Connection;
        let pricing = two_step_pricing().replace(
            "[store]",
            "[http]\nrequest_timeout = \"2s\"\n\n[store]",
        );
        let (server, client, id, _) = waiting_for_payment(&pricing).await;
        let mut other = sqlx::PgConnection::connect(&server.env.db).await.unwrap();
        sqlx::query("BEGIN").execute(&mut other).await.unwrap();
        let lock = format!("SELECT 1 FROM payment_sessions WHERE id = '{id}' FOR UPDATE");
        sqlx::query(&lock).execute(&mut other).await.unwrap();

        let response = checkout_post(&server.base, &id, &[("action", "settle")]).await;
        assert_eq!(response.status(), 503);
        let page = response.text().await.unwrap();
        assert!(page.contains("Reload this page"), "{page}");

        sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
        other.close().await.ok();
        client.cancel().await.ok();
        server.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    /// The checkout page logs who paid, and why it refused: a key that is
    /// not valid, one without the scope, too little money. (A
    /// current-thread runtime: the server's logs are this thread's.)
    #[tokio::test]
    async fn the_checkout_page_logs_who_paid_and_its_refusals() {
        let (log, _logging) = tollgate::testing::LogCapture::start();
        let server = HttpServer::start(&two_step_pricing()).await;
        server.env.topup("erin", "1.00").await;
        server.env.topup("poor", "0.01").await;
        let erin_key = server.key("erin", &["mcp"]).await;
        let poor_key = server.key("poor", &["mcp"]).await;
        let reader = server.key("erin", &["sessions:read"]).await;
        let anon = server.key("frank", &["mcp"]).await;
        let client = server.mcp(Some(&anon), ()).await;
        let r = call(&client, "divide", json!({"a": 1, "b": 1})).await;
        let id = structured(&r)["payment_id"].as_str().expect("a payment id").to_owned();
        for (key, status) in [("nonsense", 401), (reader.as_str(), 403), (poor_key.as_str(), 402), (erin_key.as_str(), 303)] {
            let response = checkout_post(&server.base, &id, &[("action", "pay"), ("api_key", key)]).await;
            assert_eq!(response.status(), status);
        }
        let text = log.text();
        let of_this: Vec<&str> = text.lines().filter(|l| l.contains(&id)).collect();
        let said = |words: &str| of_this.iter().any(|l| l.contains(words));
        assert!(said("checkout refused an API key that is not valid"), "{text}");
        assert!(said("checkout refused a key without the scope to pay or approve"), "{text}");
        assert!(said("checkout refused: ") && said("payer=\"poor\""), "{text}");
        assert!(
            of_this.iter().any(|l| l.contains("done=\"paid\"") && l.contains("payer=\"erin\"")),
            "{text}"
        );
        assert!(!text.contains(&erin_key) && !text.contains(&poor_key), "no key is logged");
        assert_eq!(server.env.available("erin").await, "0.95");
        client.cancel().await.ok();
        server.env.assert_ledger_ok().await;
    }
}

on_both_backends! {
    /// Upkeep that waits on a remote provider (here one that takes the
    /// connection and never answers) does not hold up the expiry of holds:
    /// a hold past its time gives its money back all the same. (Both were
    /// one pass: the sweep waited until the remote's answer timed out.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_remote_provider_that_hangs_does_not_hold_up_the_expiry_of_holds() {
        use tollgate::store::{HoldOutcome, HoldRequest, now_ms};
        use std::sync::atomic::Ordering::SeqCst;
        let b = HttpServer::start(&two_step_pricing()).await;
        let checks_begun = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let a = in_process_paying_through(&b, &crate::inproc::pricing("resubmit", ""), |inner| {
            let mut wrapped = crate::inproc::Wrapped::new(inner);
            wrapped.hanging_checks.store(u32::MAX, SeqCst);
            wrapped.checks_begun = checks_begun.clone();
            Arc::new(wrapped)
        })
        .await;
        let client = a.connect(None, a.client(Person::Ignores, Elicitation::None), false).await;
        let r = call(&client, "echo", echo_args("never paid")).await;
        let id = structured(&r)["payment_id"].as_str().expect("a payment id").to_owned();
        // Past its time: upkeep asks the remote about it, and waits.
        intent_past_its_time(&a, &id, 60_000).await;
        let upkeep = tollgate::app::Upkeep {
            lease: Duration::from_secs(1),
            keep_results: Duration::from_secs(3600),
        };
        tollgate::app::spawn_upkeep(&a.gate, upkeep).await.expect("upkeep");
        // Recovery starts once this instance has held its lease for a
        // whole lease; then it hangs on the remote. The hold is made after.
        let mut hanging = false;
        for _ in 0..100 {
            if checks_begun.load(SeqCst) > 0 {
                hanging = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(hanging, "upkeep asked the remote about the payment past its time");
        a.env.topup("walt", "1.00").await;
        let hold = HoldRequest {
            hold_id: "pay_0123456789abcdef".into(),
            principal: "walt".into(),
            amount: tollgate::money::Units::parse("0.10").unwrap(),
            currency: tollgate::money::Currency::parse("USD").unwrap(),
            tool: "echo".into(),
            args_hash: "h".into(),
            expires_at: now_ms() - 1,
            origin: Default::default(),
        };
        assert_eq!(a.gate.store().hold(&hold).await.unwrap(), HoldOutcome::Held);
        assert_eq!(a.env.available("walt").await, "0.90");
        let mut given_back = false;
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if a.env.available("walt").await == "1.00" {
                given_back = true;
                break;
            }
        }
        assert!(given_back, "the hold past its time was expired");
        let intent = a.gate.store().intent(&id).await.unwrap().expect("intent");
        assert_eq!(intent.status.as_str(), "awaiting_payment", "still waiting on the remote");
        client.cancel().await.ok();
        a.env.assert_ledger_ok().await;
    }
}
