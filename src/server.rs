//! The rmcp `ServerHandler`: lists the catalog and hands every call to the gate.

use std::{
    borrow::Cow,
    panic::AssertUnwindSafe,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use futures::FutureExt;
use rmcp::{
    ErrorData as McpError, RoleServer, ServerHandler,
    model::{
        CallToolRequestParams, CallToolResponse, Implementation, InitializeRequestParams,
        InitializeResult, ListToolsResult, PaginatedRequestParams, ServerCapabilities,
        ServerConfig, SubscriptionFilter, Tool,
    },
    service::{RequestContext, SubscriptionContext},
};

use crate::{
    gate::{CallScope, Caller, Gate, abandonment, stateless_session},
    store::new_id,
};

/// The header that names a legacy HTTP session (rmcp's).
pub(crate) const SESSION_ID_HEADER: &str = "mcp-session-id";

/// One MCP session's handler. The gate (store, catalog, provider) is shared;
/// the session id is this session's, and so is the caller on stdio. Over
/// HTTP the caller comes with each request, from its API key.
#[derive(Clone)]
pub struct TollgateServer {
    gate: Arc<Gate>,
    /// `None`: read it from each HTTP request.
    caller: Option<Caller>,
    session_id: String,
    /// Whether an `initialize` handshake set this server up: over HTTP, a
    /// session's. rmcp serves a request statelessly, on a server of its
    /// own, when the request says so (2026-07-28 metadata), even one that
    /// carries an `Mcp-Session-Id`.
    handshaken: Arc<AtomicBool>,
    /// Shared by the session's clones; the last one to go forgets the
    /// session's registry entry, so ended sessions take no memory.
    _session: Arc<SessionGuard>,
}

struct SessionGuard {
    id: String,
    gate: Arc<Gate>,
    /// Dropped after `drop` has started ending the session's payments: a
    /// shutdown waiting for sessions to close then waits for that too.
    _open: crate::sync::Counted,
}

impl Drop for SessionGuard {
    /// The payments its confirm tools were for are ended, counted as a
    /// call under way, so that a shutdown waits for them.
    fn drop(&mut self) {
        let offered = self.gate.dynamic_tools().forget(&self.id);
        if offered.is_empty() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(
                session = self.id,
                "a session closed outside the runtime: its unused payments are left to upkeep"
            );
            return;
        };
        let (gate, session) = (self.gate.clone(), self.id.clone());
        let counted = gate.enter_even_closing();
        runtime.spawn(async move {
            let _counted = counted;
            gate.end_closed_sessions_payments(&session, offered).await;
        });
    }
}

impl TollgateServer {
    pub fn new(gate: Arc<Gate>, caller: Caller) -> Self {
        Self::session(gate, Some(caller))
    }

    /// A session of the HTTP service, whose requests carry their caller.
    pub fn for_http(gate: Arc<Gate>) -> Self {
        Self::session(gate, None)
    }

    fn session(gate: Arc<Gate>, caller: Option<Caller>) -> Self {
        let session_id = new_id("sess");
        Self {
            _session: Arc::new(SessionGuard {
                id: session_id.clone(),
                gate: gate.clone(),
                _open: gate.session_opened(),
            }),
            gate,
            caller,
            session_id,
            handshaken: Arc::default(),
        }
    }

    fn caller_of(&self, context: &RequestContext<RoleServer>) -> Caller {
        match &self.caller {
            Some(caller) => caller.clone(),
            // Put there by the HTTP service's authentication; rmcp hands the
            // request's parts (and so their extensions) to the handler.
            None => context
                .extensions
                .get::<http::request::Parts>()
                .and_then(|parts| parts.extensions.get::<Caller>())
                .cloned()
                .unwrap_or_default(),
        }
    }

    /// The session a request belongs to. A request rmcp serves statelessly
    /// over HTTP (2026-07-28 clients) gets a server of its own, never
    /// handshaken, whose session id is new each time: such requests share
    /// one session per principal, so that a dynamic confirm tool opened by
    /// one is listed to and callable by the next, and anonymous callers'
    /// open payments are capped between them. (Over stdio a 2026-07-28
    /// client has no handshake either, but its server is its session.)
    fn session_of(&self, context: &RequestContext<RoleServer>, caller: &Caller) -> Cow<'_, str> {
        let over_http = context.extensions.get::<http::request::Parts>().is_some();
        let stateless = over_http && !self.handshaken.load(Ordering::Acquire);
        if stateless {
            Cow::Owned(stateless_session(caller.principal.as_deref()))
        } else {
            Cow::Borrowed(&self.session_id)
        }
    }

    pub fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }

    pub fn session_id(&self) -> &str {
        &self.session_id
    }
}

impl ServerHandler for TollgateServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().enable_tool_list_changed().build())
            .with_server_info(Implementation::new("tollgate", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "Some tools cost money; their price is in the description and in _meta[\"tollgate/price\"]. \
                 A call that needs payment answers with a payment_id and a payment_url: pay there, then follow \
                 the answer's instructions to finish the call.",
            )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        let caller = self.caller_of(&context);
        let session = self.session_of(&context, &caller);
        Ok(ListToolsResult::with_all_items(
            self.gate.tools_for(&session).await,
        ))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        self.gate.tool_for(&self.session_id, name)
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let started = std::time::Instant::now();
        let caller = self.caller_of(&context);
        let session_id = self.session_of(&context, &caller);
        let Some(_under_way) = self.gate.enter() else {
            return Err(McpError::internal_error(
                "tollgate is shutting down: call again in a moment",
                None,
            ));
        };
        let scope = CallScope {
            caller: &caller,
            session_id: &session_id,
            request: &context,
            cancelled: abandonment(&context),
            progress_sent: Default::default(),
        };
        let tool = request.name.to_string();
        // A defect in the gate that panics is answered, not left as a call
        // the client waits on for ever. What it had done stands: a hold it
        // made is swept when it expires, a run it claimed is recovered.
        let response = match AssertUnwindSafe(self.gate.call(&scope, request))
            .catch_unwind()
            .await
        {
            Ok(response) => response,
            Err(panic) => {
                let why = crate::sync::panic_message(&*panic);
                tracing::error!(tool, "handling a call failed unexpectedly: {why}");
                Err(McpError::internal_error(
                    format!("tollgate failed unexpectedly handling this call to `{tool}`"),
                    None,
                ))
            }
        };
        crate::http::metrics::record_call(
            &self.gate.tool_label(&tool),
            self.gate.mode_label(&tool),
            outcome(&response),
            started.elapsed().as_secs_f64(),
        );
        response
    }

    async fn initialize(
        &self,
        request: InitializeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<InitializeResult, McpError> {
        self.handshaken.store(true, Ordering::Release);
        context.peer.set_peer_info(request.clone());
        self.negotiate_initialize(&request)
    }

    /// Sessions up to 2025-11-25 hear `tools/list_changed` through their
    /// peer.
    async fn on_initialized(&self, context: rmcp::service::NotificationContext<RoleServer>) {
        self.gate
            .dynamic_tools()
            .attach_peer(&self.session_id, context.peer);
    }

    fn accepted_subscription_filter(
        &self,
        requested: &SubscriptionFilter,
    ) -> Option<SubscriptionFilter> {
        Some(requested.intersection(&SubscriptionFilter::builder().tools_list_changed().build()))
    }

    /// 2026-07-28 clients hear `tools/list_changed` (dynamic confirm tools)
    /// on a `subscriptions/listen` stream.
    async fn listen(&self, context: SubscriptionContext) -> Result<(), McpError> {
        let dynamic = self.gate.dynamic_tools();
        let sink = context.sink().clone();
        let id = sink.id().clone();
        let caller = self.caller_of(context.request_context());
        let session_id = self
            .session_of(context.request_context(), &caller)
            .into_owned();
        dynamic.attach_listener(&session_id, sink);
        context.cancelled().await;
        dynamic.detach_listener(&session_id, &id);
        Ok(())
    }
}

/// How a call ended, for metrics: the payment's status when there is one,
/// the payment error's code, or plain success or tool error.
fn outcome(response: &Result<CallToolResponse, McpError>) -> &'static str {
    let result = match response {
        Err(_) => return "rejected",
        Ok(CallToolResponse::Complete(result)) => result,
        Ok(_) => return "input_required",
    };
    let payment = result
        .meta
        .as_ref()
        .and_then(|m| m.0.get(crate::gate::reply::PAYMENT_META));
    if let Some(status) = payment
        .and_then(|p| p.get("status"))
        .and_then(|s| s.as_str())
    {
        let replayed = payment.and_then(|p| p.get("replayed")).is_some();
        return match (status, replayed) {
            (_, true) => "replayed",
            ("paid", _) => "paid",
            ("released", _) => "released",
            ("refunded", _) => "refunded",
            _ => "not_charged",
        };
    }
    // A tool with an outputSchema gets the gate's reply in `_meta` alone.
    let gates_reply = result
        .meta
        .as_ref()
        .and_then(|m| m.0.get(crate::gate::reply::REPLY_META));
    let code = crate::gate::reply::code_of(result);
    match (result.is_error, code) {
        (Some(true), Some(code)) => crate::gate::reply::code::ALL
            .iter()
            .copied()
            .find(|c| *c == code)
            .unwrap_or("tool_error"),
        // Payment asked for in two_step or dynamic_tools: `isError` only
        // for such a tool, and counted as for any other.
        (Some(true), None) if gates_reply.is_some() => "ok",
        (Some(true), None) => "tool_error",
        _ => "ok",
    }
}
