//! The HTTP service (`tollgate serve --http ADDR`), on axum:
//!
//! - `/mcp`: streamable HTTP (SSE), in session mode so elicitation and
//!   progress work; the caller is the API key's principal; every message
//!   is checked before rmcp reads it (`mcp_guard`);
//! - `/checkout/<id>`: where a person pays, approves or declines;
//! - `/v1/sessions`: the sessions API, rate limited per key;
//! - `/metrics` (admin key) and `/healthz`.

mod auth;
mod checkout;
mod host_guard;
mod limits;
mod mcp_guard;
pub mod metrics;
mod session_owners;

use futures::StreamExt;
use session_owners::Access;
mod sessions;

use std::{sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{ConnectInfo, Request, State},
    http::{Method, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
};
use rmcp::transport::streamable_http_server::{
    StreamableHttpServerConfig, StreamableHttpService,
    session::local::{LocalSessionManager, SessionConfig},
};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tower_http::{limit::RequestBodyLimitLayer, timeout::TimeoutLayer};

use crate::{
    config::{Config, HttpConfig},
    gate::{Caller, ClientGone, Gate},
    keys::Scope,
    receipt::ReceiptSigner,
    server::{SESSION_ID_HEADER, TollgateServer},
    store::Store,
    sync::UnderWay,
};
pub use auth::presented_key;

/// Everything the routes share.
pub struct HttpState {
    pub(crate) gate: Arc<Gate>,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) signer: ReceiptSigner,
    pub(crate) checkout_base_url: String,
    pub(crate) dev_settle: bool,
    pub(crate) session_ttl: Duration,
    /// How long a checkout's write may take: three quarters of the request
    /// timeout, so that the page, not the timeout, tells the person.
    pub(crate) write_timeout: Duration,
    pub(crate) allowed_origins: Vec<String>,
    pub(crate) anonymous_mcp: bool,
    pub(crate) limits: limits::RateLimits,
    session_owners: session_owners::SessionOwners,
    /// Answers to `/mcp` POSTs still being written: a stopping service
    /// waits for them before it ends its MCP sessions.
    answers: Arc<UnderWay>,
}

impl HttpState {
    pub fn new(config: &Config, gate: Arc<Gate>) -> Self {
        let http = &config.http;
        Self {
            store: gate.store().clone(),
            signer: gate.signer().clone(),
            gate,
            checkout_base_url: config.checkout_base_url(),
            dev_settle: config.dev_settle,
            session_ttl: config.payment_ttl,
            write_timeout: http.request_timeout * 3 / 4,
            allowed_origins: http.allowed_origins.clone(),
            anonymous_mcp: http.anonymous_mcp,
            limits: limits::RateLimits::new(
                http.sessions_create_per_minute,
                http.sessions_read_per_minute,
            ),
            session_owners: Default::default(),
            answers: Default::default(),
        }
    }

    /// Waits up to `grace` for the answers to `/mcp` POSTs being written to
    /// go out; how many had not.
    pub async fn answers_sent(&self, grace: Duration) -> usize {
        self.answers.drained(grace).await
    }

    /// How long an MCP session may sit idle before it is closed. It
    /// outlives its payments: a client waiting quietly while a person pays
    /// must still have it to confirm (its dynamic tools are the session's).
    /// rmcp's default closes it after 5 idle minutes.
    fn session_keep_alive(&self) -> Duration {
        SessionConfig::DEFAULT_KEEP_ALIVE.max(self.session_ttl + Duration::from_secs(60))
    }
}

/// The whole service. `shutdown` ends the MCP sessions when cancelled.
pub fn router(state: Arc<HttpState>, http: &HttpConfig, shutdown: CancellationToken) -> Router {
    let _ = metrics::recorder();
    let gate = state.gate.clone();
    let mut sessions = LocalSessionManager::default();
    sessions.session_config.keep_alive = Some(state.session_keep_alive());
    let mcp = StreamableHttpService::new(
        move || Ok(TollgateServer::for_http(gate.clone())),
        sessions.into(),
        StreamableHttpServerConfig::default()
            .with_legacy_session_mode(true)
            .with_allowed_hosts(http.allowed_hosts.clone())
            .with_allowed_origins(http.allowed_origins.clone())
            // With none listed, a browser Origin is refused (rmcp would
            // otherwise not look); a client that sends none is served.
            .enforce_origin_validation()
            .with_max_request_body_bytes(http.max_body_bytes)
            .with_cancellation_token(shutdown.child_token()),
    );
    // Plain request/response routes get a body limit and a timeout; /mcp
    // streams (SSE) and limits its own bodies.
    let api = Router::new()
        .route("/v1/sessions", post(sessions::create))
        .route("/v1/sessions/{id}", get(sessions::read))
        .route("/v1/sessions/{id}/cancel", post(sessions::cancel))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            limits::rate_limit,
        ))
        // A limit of its own, inside the layer that words its 413 in JSON.
        .layer(RequestBodyLimitLayer::new(http.max_body_bytes))
        .layer(middleware::map_response_with_state(
            http.max_body_bytes,
            sessions::json_too_large,
        ));
    let plain = Router::new()
        .merge(
            // The page a person's browser opens: the one a site of an
            // attacker's could read through DNS rebinding. (The others need
            // an API key, or, as /healthz, say nothing; probes and proxies
            // name them by addresses of their own.)
            Router::new()
                .route("/checkout/{id}", get(checkout::show).post(checkout::act))
                .route_layer(middleware::from_fn_with_state(
                    host_guard::AllowedHosts::new(&http.allowed_hosts, &state.checkout_base_url),
                    host_guard::guard,
                )),
        )
        .route("/metrics", get(metrics::scrape))
        .route("/healthz", get(healthz))
        .layer(RequestBodyLimitLayer::new(http.max_body_bytes))
        .merge(api)
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            http.request_timeout,
        ));
    Router::new()
        .nest_service(
            "/mcp",
            Router::new()
                .fallback_service(mcp)
                .layer(middleware::from_fn_with_state(
                    mcp_guard::BodyLimit {
                        bytes: http.max_body_bytes,
                        within: http.request_timeout,
                    },
                    mcp_guard::guard,
                ))
                .layer(middleware::from_fn_with_state(state.clone(), mcp_caller)),
        )
        .merge(plain)
        .with_state(state)
}

/// Serves until `shutdown` resolves, then lets calls in flight finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<HttpState>,
    http: &HttpConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let limits = state.clone();
    let idle = shutdown.clone();
    tokio::spawn(async move {
        let mut ticks = 0u32;
        loop {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
                () = idle.cancelled() => break,
            }
            metrics::upkeep();
            ticks += 1;
            if ticks.is_multiple_of(12) {
                limits.limits.forget_idle();
                limits
                    .session_owners
                    .forget_idle(limits.session_keep_alive());
            }
        }
    });
    let app = router(state, http, shutdown.clone());
    // Every request's head must arrive within `request_timeout`, and an
    // idle kept-alive connection is closed after as long: without a timer
    // hyper waits for a head forever, and a client that opens connections
    // and sends nothing (or a byte a minute) holds them open.
    let mut connection = hyper::server::conn::http1::Builder::new();
    connection
        .timer(TokioTimer::new())
        .header_read_timeout(http.request_timeout);
    let connections = GracefulShutdown::new();
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    refused_connection(e).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        // A reply goes out as several small writes (an SSE stream's events,
        // its last chunk); without TCP_NODELAY the last waits for the
        // client's delayed ACK, about 40 ms, before the connection can carry
        // the next request.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY: {e}");
        }
        let app = app.clone();
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let mut request = request.map(axum::body::Body::new);
            request.extensions_mut().insert(ConnectInfo(remote));
            app.clone().oneshot(request)
        });
        let served = connections.watch(connection.serve_connection(TokioIo::new(tcp), service));
        tokio::spawn(async move {
            if let Err(e) = served.await {
                tracing::debug!("connection from {remote} ended: {e}");
            }
        });
    }
    // Stop taking connections; let those open finish the calls they carry.
    drop(listener);
    connections.shutdown().await;
    Ok(())
}

/// An `accept` that failed. A connection reset before it was taken is
/// nothing; anything else (out of file descriptors, say) is logged and
/// waited out, rather than retried in a hot loop.
async fn refused_connection(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    tracing::error!("cannot accept a connection: {e}; trying again in a second");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// Authenticates an `/mcp` request and hands its caller to the MCP handler
/// (through the request's extensions, which rmcp passes on).
async fn mcp_caller(
    State(state): State<Arc<HttpState>>,
    mut request: Request,
    next: Next,
) -> Response {
    let caller = if presented_key(request.headers()).is_none() && state.anonymous_mcp {
        Caller::default()
    } else {
        match auth::authenticate(state.store.as_ref(), request.headers(), Scope::Mcp).await {
            Ok(key) => Caller {
                principal: Some(key.principal),
            },
            Err(e) => return e.into_response(),
        }
    };
    // An MCP session is the principal's that opened it (session_owners).
    let session = session_id(request.headers()).map(str::to_owned);
    let mut in_flight = None;
    if let Some(session) = &session {
        let refused = match state.session_owners.allows(session, &caller.principal) {
            Access::Owner => {
                in_flight = Some(ResponseGoing {
                    state: state.clone(),
                    session: session.clone(),
                });
                None
            }
            Access::Another => {
                tracing::warn!("refused a request for an MCP session another principal opened");
                Some((
                    StatusCode::FORBIDDEN,
                    "this MCP session was opened by another principal: open a session of your own",
                ))
            }
            Access::Unknown => Some((
                StatusCode::NOT_FOUND,
                "no such MCP session (unknown, or closed after being idle): open a new one",
            )),
        };
        if let Some((status, message)) = refused {
            let reply = json!({"jsonrpc": "2.0", "id": null,
                               "error": {"code": -32600, "message": message}});
            return (status, Json(reply)).into_response();
        }
    }
    let (principal, ending) = (caller.principal.clone(), request.method() == Method::DELETE);
    request.extensions_mut().insert(caller);
    // A POST's answer: counted while it is written (`answers`), and
    // `ClientGone` is cancelled as it is dropped, before its end if the
    // client went away (or while this waits for it): a call then is not
    // charged.
    let answering = (request.method() == Method::POST).then(|| {
        let gone = ClientGone::default();
        request.extensions_mut().insert(gone.clone());
        (state.answers.enter(), gone.0.drop_guard())
    });
    let response = next.run(request).await;
    match session {
        None => {
            if let Some(opened) = session_id(response.headers()) {
                state.session_owners.opened(opened, principal);
            }
        }
        Some(session) if ending && response.status().is_success() => {
            state.session_owners.closed(&session);
        }
        Some(_) => {}
    }
    // `in_flight` is counted until the body ends: a response that streams
    // for long (a call waiting on a payment, the event stream) keeps its
    // session from being taken for idle.
    if in_flight.is_none() && answering.is_none() {
        return response;
    }
    response.map(|body| {
        let stream = body.into_data_stream().map(move |chunk| {
            let _kept_until_the_end = (&in_flight, &answering);
            chunk
        });
        axum::body::Body::from_stream(stream)
    })
}

/// A response of an MCP session's owner, still going until dropped.
struct ResponseGoing {
    state: Arc<HttpState>,
    session: String,
}

impl Drop for ResponseGoing {
    fn drop(&mut self) {
        self.state.session_owners.finished(&self.session);
    }
}

/// The MCP session (rmcp's `Mcp-Session-Id`) a request or response names.
fn session_id(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers.get(SESSION_ID_HEADER).and_then(|v| v.to_str().ok())
}

async fn healthz(State(state): State<Arc<HttpState>>) -> Response {
    // Stopping: a load balancer should send new calls elsewhere.
    if state.gate.is_closed() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "stopping" })),
        )
            .into_response();
    }
    match state.store.ping().await {
        Ok(()) => Json(json!({ "status": "ok" })).into_response(),
        Err(e) => {
            // Unauthenticated: the details go to the log only.
            tracing::warn!("health check: store unavailable: {e}");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "status": "unavailable" })),
            )
                .into_response()
        }
    }
}
