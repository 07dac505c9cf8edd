//! Upstream MCP servers: tollgate connects to them as an MCP client (rmcp)
//! and serves their tools, priced in `pricing.toml`, through the same gate.
//! A priced call's arguments are checked against the tool's `inputSchema`
//! before any money moves; whatever the upstream answers with `isError`,
//! and any transport failure or timeout, is a tool error, so the gate
//! releases the hold (or refunds) and nothing is charged.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex, RwLock, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use rmcp::{
    ClientHandler, ErrorData as McpError, Peer, RoleClient, RoleServer, ServiceError, ServiceExt,
    model::{
        CallToolRequestParams, CallToolResult, CancelledNotificationParam, ClientCapabilities,
        ClientConfig, ClientRequest, ContentBlock, ElicitRequestParams, ElicitResult,
        ElicitationAction, ElicitationCapability, FormElicitationCapability, Implementation,
        JsonObject, ProgressNotificationParam, ProgressToken, Request, RequestId, ServerResult,
        Tool, UrlElicitationCapability,
    },
    service::{
        InboundStreamOrigin, NotificationContext, PeerRequestOptions, RequestContext,
        RunningService,
    },
    transport::{
        ConfigureCommandExt, StreamableHttpClientTransport, TokioChildProcess,
        streamable_http_client::StreamableHttpClientTransportConfig,
    },
};

use super::{ArgumentError, CallContext, ToolBackend, schema::ToolSchema};
use crate::{
    config::{Unpriced, UpstreamConfig, UpstreamTransport},
    sync::lock,
};

#[derive(Debug, thiserror::Error)]
#[error("upstream `{name}`: {message}")]
pub struct UpstreamError {
    pub name: String,
    pub message: String,
}

/// Where an upstream call's progress goes: the client's peer and token.
type Route = (Peer<RoleServer>, ProgressToken);

/// An open route, and the progress the client has heard on its token: the
/// gate's own notifications (a call that waited for its payment in
/// progress mode) and what was relayed. MCP requires progress to increase,
/// so the upstream's values go on from the gate's, and one that arrives
/// after a higher one (rmcp hands each notification to a task of its own)
/// is dropped. A route relays one notification at a time, so the client
/// hears them in the order decided.
#[derive(Clone)]
struct OpenRoute {
    route: Route,
    /// Added to the upstream's values (and totals).
    base: f64,
    /// The highest value the client has heard.
    heard: Arc<tokio::sync::Mutex<f64>>,
}

impl OpenRoute {
    async fn relay(&self, params: ProgressNotificationParam) {
        let mut heard = self.heard.lock().await;
        self.relay_after(&mut heard, params).await;
    }

    /// Relays `params` if it goes on from `heard` (this route's, locked).
    async fn relay_after(&self, heard: &mut f64, mut params: ProgressNotificationParam) {
        params.progress += self.base;
        params.total = params.total.map(|total| total + self.base);
        if params.progress <= *heard {
            return;
        }
        *heard = params.progress;
        params.progress_token = self.route.1.clone();
        if let Err(e) = self.route.0.notify_progress(params).await {
            tracing::debug!("progress not relayed: {e}");
        }
    }
}

/// How long a progress notification that arrived before its call's route
/// was known is kept for it: the upstream may report progress before rmcp
/// hands back the request it sent (the token is only known then).
const EARLY_PROGRESS_KEPT: Duration = Duration::from_secs(5);

/// How long a finished call's route stays open for progress notifications
/// the upstream sent before its answer but rmcp handed over after it.
const LATE_PROGRESS_RELAYED: Duration = Duration::from_secs(1);

/// The routes of calls in flight, and notifications that beat their route.
#[derive(Default)]
struct Routes {
    routes: HashMap<ProgressToken, OpenRoute>,
    early: HashMap<ProgressToken, Vec<(std::time::Instant, ProgressNotificationParam)>>,
}

/// tollgate's side of an upstream connection: relays the upstream's
/// progress notifications to the client whose call they belong to.
#[derive(Clone, Default)]
struct Relay {
    /// Upstream progress token → the client's route.
    routes: Arc<Mutex<Routes>>,
    /// Woken by the upstream's `notifications/tools/list_changed`.
    list_changed: Arc<tokio::sync::Notify>,
    /// Calls in flight to the upstream, and calls that ended without its
    /// answer (it may still be running them).
    in_flight: Arc<Mutex<InFlightCalls>>,
}

/// A client that can answer elicitations, and the time it is given.
type Asker = (Peer<RoleServer>, Duration);

/// How long a call that ended without the upstream's answer (timed out,
/// cancelled, its connection lost) still counts as in flight: the upstream
/// may go on running it and ask a question meant for its caller, which must
/// not reach another call's client meanwhile.
const UNANSWERED_CALL_LINGERS: Duration = Duration::from_secs(60);

/// One call to the upstream: counted from before it is sent, since the
/// upstream may ask its question before the request's id is handed back.
struct InFlight<A> {
    key: u64,
    /// The upstream request's id, once sent.
    request: Option<RequestId>,
    /// Its client, if it can answer; none once the call has ended.
    asker: Option<A>,
    /// Set when the call ended without the upstream's answer.
    lingers_until: Option<std::time::Instant>,
}

/// The calls in flight to one upstream; `A` is whoever can answer a
/// question for a call (its client's peer).
struct InFlightCalls<A = Asker> {
    next_key: u64,
    calls: Vec<InFlight<A>>,
}

impl<A> Default for InFlightCalls<A> {
    fn default() -> Self {
        Self {
            next_key: 0,
            calls: Vec::new(),
        }
    }
}

impl<A: Clone> InFlightCalls<A> {
    fn enter(&mut self, asker: Option<A>) -> u64 {
        self.forget_lingering(std::time::Instant::now());
        self.next_key += 1;
        self.calls.push(InFlight {
            key: self.next_key,
            request: None,
            asker,
            lingers_until: None,
        });
        self.next_key
    }

    fn sent(&mut self, key: u64, request: RequestId) {
        if let Some(call) = self.calls.iter_mut().find(|c| c.key == key) {
            call.request = Some(request);
        }
    }

    /// The call ended: forgotten if the upstream answered it, else kept a
    /// while with no one to answer for it.
    fn leave(&mut self, key: u64, answered: bool) {
        if answered {
            self.calls.retain(|c| c.key != key);
        } else if let Some(call) = self.calls.iter_mut().find(|c| c.key == key) {
            call.asker = None;
            call.lingers_until = Some(std::time::Instant::now() + UNANSWERED_CALL_LINGERS);
        }
    }

    /// Whose question this is. On a stream tied to a request (streamable
    /// HTTP), that request's caller. Otherwise (stdio, or a stream of no
    /// request) the caller of the only call in flight, if it is the only
    /// one: the upstream does not say which call asks.
    fn asker(&mut self, origin: Option<&InboundStreamOrigin>) -> Option<A> {
        self.forget_lingering(std::time::Instant::now());
        match origin {
            Some(InboundStreamOrigin::OutboundRequest(id)) => self
                .calls
                .iter()
                .find(|c| c.request.as_ref() == Some(id))
                .and_then(|c| c.asker.clone()),
            _ => match self.calls.as_slice() {
                [only] => only.asker.clone(),
                _ => None,
            },
        }
    }

    /// Forgets the ended calls that linger past `until`.
    fn forget_lingering(&mut self, until: std::time::Instant) {
        self.calls
            .retain(|c| c.lingers_until.is_none_or(|lingers| lingers > until));
    }
}

/// A call's place among the calls in flight, left when dropped: as
/// unanswered unless `answered` was set. A call whose future is dropped
/// midway (its task aborted) would otherwise count as in flight for good,
/// and on stdio leave every later question with no one to answer it.
struct Place<'a, A: Clone = Asker> {
    calls: &'a Mutex<InFlightCalls<A>>,
    key: u64,
    answered: bool,
}

impl<'a, A: Clone> Place<'a, A> {
    fn enter(calls: &'a Mutex<InFlightCalls<A>>, asker: Option<A>) -> Self {
        let key = lock(calls).enter(asker);
        Self {
            calls,
            key,
            answered: false,
        }
    }
}

impl<A: Clone> Drop for Place<'_, A> {
    fn drop(&mut self) {
        lock(self.calls).leave(self.key, self.answered);
    }
}

impl Relay {
    fn routes(&self) -> std::sync::MutexGuard<'_, Routes> {
        lock(&self.routes)
    }

    /// Routes an upstream token's progress to a client from now on (after
    /// the `heard` values the client has had on its token), and relays
    /// what arrived for it before, ahead of anything that comes meanwhile.
    /// Returns the route, to close it by.
    async fn open_route(&self, upstream: ProgressToken, route: Route, heard: f64) -> OpenRoute {
        let open = OpenRoute {
            route,
            base: heard,
            heard: Arc::new(tokio::sync::Mutex::new(heard)),
        };
        let mut heard = open.heard.clone().lock_owned().await;
        let early = {
            let mut routes = self.routes();
            routes.routes.insert(upstream.clone(), open.clone());
            routes.early.remove(&upstream).unwrap_or_default()
        };
        for (_, params) in early {
            open.relay_after(&mut heard, params).await;
        }
        open
    }

    /// Closes a finished call's route. rmcp hands each notification to a
    /// task of its own, so progress the upstream sent before its answer may
    /// be handled after the answer is: give those tasks a turn, and keep the
    /// route open a while for any that are later still.
    async fn close_route_soon(&self, upstream: ProgressToken, opened: Option<OpenRoute>) {
        tokio::task::yield_now().await;
        let relay = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(LATE_PROGRESS_RELAYED).await;
            relay.close_route(&upstream, opened.as_ref());
        });
    }

    /// Closes the route `opened` (if it is still the token's: after a
    /// reconnect, another call's may have taken the token), and forgets
    /// what arrived early for the token.
    fn close_route(&self, upstream: &ProgressToken, opened: Option<&OpenRoute>) {
        let mut routes = self.routes();
        if let Some(opened) = opened
            && routes
                .routes
                .get(upstream)
                .is_some_and(|open| Arc::ptr_eq(&open.heard, &opened.heard))
        {
            routes.routes.remove(upstream);
        }
        routes.early.remove(upstream);
    }

    fn in_flight(&self) -> std::sync::MutexGuard<'_, InFlightCalls> {
        lock(&self.in_flight)
    }

    /// Forgets what belonged to a connection that is gone: its routes (the
    /// next one numbers its progress tokens from the start again) and its
    /// calls, ended or not (their request ids are reused too, and nothing
    /// more can come from it; a call that ends later leaves nothing).
    fn forget_connection(&self) {
        let mut routes = self.routes();
        routes.routes.clear();
        routes.early.clear();
        drop(routes);
        self.in_flight().calls.clear();
    }
}

impl ClientHandler for Relay {
    async fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        let open = {
            let mut routes = self.routes();
            let open = routes.routes.get(&params.progress_token).cloned();
            if open.is_none() {
                // Possibly a call whose route is about to open: keep it a while.
                let now = std::time::Instant::now();
                routes.early.retain(|_, notes| {
                    notes.retain(|(at, _)| now.duration_since(*at) < EARLY_PROGRESS_KEPT);
                    !notes.is_empty()
                });
                let notes = routes
                    .early
                    .entry(params.progress_token.clone())
                    .or_default();
                if notes.len() < 16 {
                    notes.push((now, params.clone()));
                }
            }
            open
        };
        if let Some(open) = open {
            open.relay(params).await;
        }
    }

    async fn on_tool_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.list_changed.notify_one();
    }

    fn get_info(&self) -> ClientConfig {
        // Upstreams may ask; whether a person can answer is decided per call.
        let elicitation = ElicitationCapability::new()
            .with_form(FormElicitationCapability::new())
            .with_url(UrlElicitationCapability::new());
        ClientConfig::new(
            ClientCapabilities::builder()
                .enable_elicitation_with(elicitation)
                .build(),
            Implementation::new("tollgate", env!("CARGO_PKG_VERSION")),
        )
    }

    /// An upstream asks the person something during a call: relayed to the
    /// client of the call it is known to belong to ([`InFlightCalls::asker`])
    /// if that client can answer, declined otherwise. Counting only the
    /// calls that can answer, or forgetting calls that ended unanswered,
    /// would hand one principal's question to another's client.
    async fn create_elicitation(
        &self,
        request: ElicitRequestParams,
        context: RequestContext<RoleClient>,
    ) -> Result<ElicitResult, McpError> {
        let origin = context.extensions.get::<InboundStreamOrigin>();
        let asker = self.in_flight().asker(origin);
        let Some((client, timeout)) = asker else {
            tracing::debug!("upstream elicitation declined: no single client can answer it");
            return Ok(ElicitResult::new(ElicitationAction::Decline));
        };
        match client
            .create_elicitation_with_timeout(request, Some(timeout))
            .await
        {
            Ok(answer) => Ok(answer),
            Err(e) => {
                tracing::debug!("upstream elicitation not answered: {e}");
                Ok(ElicitResult::new(ElicitationAction::Cancel))
            }
        }
    }
}

type Client = RunningService<RoleClient, Relay>;

/// An upstream's tools as served, and each one's input schema compiled
/// once per list: a call is checked against it before money moves.
#[derive(Default)]
struct Listing {
    tools: Vec<Tool>,
    /// Served name → its schema; a tool whose schema could not be
    /// compiled is not here, and its calls go unchecked (as before).
    inputs: HashMap<String, Arc<ToolSchema>>,
}

impl Listing {
    fn of(upstream: &str, tools: Vec<Tool>) -> Self {
        let inputs = tools
            .iter()
            .filter_map(|tool| match ToolSchema::compile(&tool.input_schema) {
                Ok(schema) => Some((tool.name.to_string(), Arc::new(schema))),
                Err(e) => {
                    // One odd schema must not stop the gateway; the upstream
                    // still checks what it is sent.
                    tracing::warn!(
                        upstream,
                        tool = %tool.name,
                        "input: {e}; its arguments go to the upstream unchecked"
                    );
                    None
                }
            })
            .collect();
        Self { tools, inputs }
    }
}

const FIRST_RECONNECT: Duration = Duration::from_millis(100);
const MAX_RECONNECT: Duration = Duration::from_secs(10);

pub struct Upstream {
    config: UpstreamConfig,
    me: Weak<Upstream>,
    relay: Relay,
    client: tokio::sync::RwLock<Option<Client>>,
    /// The upstream's tools as served here (names prefixed), with their
    /// input schemas compiled.
    listing: RwLock<Listing>,
    reconnecting: AtomicBool,
    /// Counts connections made: which one a failure came from.
    generation: AtomicU64,
    /// Ticks when `listing` changes.
    changes: tokio::sync::watch::Sender<u64>,
}

impl Upstream {
    /// Connects and lists the upstream's tools; an upstream that cannot be
    /// reached at start is an error, because its prices cannot be checked.
    pub async fn connect(config: &UpstreamConfig) -> Result<Arc<Self>, UpstreamError> {
        let upstream = Arc::new_cyclic(|me| Self {
            config: config.clone(),
            me: me.clone(),
            relay: Relay::default(),
            client: tokio::sync::RwLock::new(None),
            listing: RwLock::new(Listing::default()),
            reconnecting: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            changes: tokio::sync::watch::Sender::new(0),
        });
        upstream.open().await.map_err(|message| UpstreamError {
            name: config.name.clone(),
            message,
        })?;
        upstream.follow_list_changes();
        Ok(upstream)
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    fn served_name(&self, tool: &str) -> String {
        format!("{}{tool}", self.config.prefix.as_deref().unwrap_or(""))
    }

    /// (Re)connects and refreshes the tool list.
    async fn open(&self) -> Result<(), String> {
        let client = match &self.config.transport {
            UpstreamTransport::Stdio { command, env, cwd } => {
                let (program, args) = command.split_first().ok_or("empty command")?;
                let cmd = tokio::process::Command::new(program).configure(|cmd| {
                    cmd.args(args).envs(env);
                    if let Some(cwd) = cwd {
                        cmd.current_dir(cwd);
                    }
                });
                let (transport, _stderr) = TokioChildProcess::builder(cmd)
                    .stderr(std::process::Stdio::inherit())
                    .spawn()
                    .map_err(|e| format!("cannot start {program}: {e}"))?;
                self.within_timeout("the handshake", self.relay.clone().serve(transport))
                    .await?
                    .map_err(|e| format!("handshake failed: {e}"))?
            }
            UpstreamTransport::Http { url, headers } => {
                let mut config = StreamableHttpClientTransportConfig::with_uri(url.as_str());
                let mut custom = HashMap::new();
                for (name, value) in expand_headers(headers)? {
                    if let Some(token) = value
                        .strip_prefix("Bearer ")
                        .filter(|_| name.eq_ignore_ascii_case("authorization"))
                    {
                        config = config.auth_header(token.to_owned());
                        continue;
                    }
                    let name = http::HeaderName::try_from(name.as_str())
                        .map_err(|e| format!("header {name}: {e}"))?;
                    let value = http::HeaderValue::try_from(value.as_str())
                        .map_err(|e| format!("header {name}: {e}"))?;
                    custom.insert(name, value);
                }
                config = config.custom_headers(custom);
                let transport = StreamableHttpClientTransport::from_config(config);
                self.within_timeout("the handshake", self.relay.clone().serve(transport))
                    .await?
                    .map_err(|e| format!("cannot connect to {url}: {e}"))?
            }
        };
        self.refresh_tools(client.peer()).await?;
        tracing::info!(upstream = self.config.name, "connected to upstream");
        // Counted under the lock that publishes it: a call that sees the
        // new peer also sees its generation.
        let mut current = self.client.write().await;
        self.generation.fetch_add(1, Ordering::SeqCst);
        *current = Some(client);
        Ok(())
    }

    /// `step`, unless it takes longer than a call may: an upstream that
    /// accepts a connection and then never answers must not hold up its
    /// (re)connection, or the calls waiting on it, for good.
    async fn within_timeout<T>(
        &self,
        step: &str,
        future: impl Future<Output = T>,
    ) -> Result<T, String> {
        tokio::time::timeout(self.config.timeout, future)
            .await
            .map_err(|_| format!("{step} took longer than {:?}", self.config.timeout))
    }

    /// The current connection's peer, and which connection it is.
    async fn current(&self) -> Option<(Peer<RoleClient>, u64)> {
        let client = self.client.read().await;
        let peer = client.as_ref()?.peer().clone();
        Some((peer, self.generation.load(Ordering::SeqCst)))
    }

    /// Re-reads the upstream's tools and tells the gate if they changed.
    async fn refresh_tools(&self, peer: &Peer<RoleClient>) -> Result<(), String> {
        let listed = self
            .within_timeout("tools/list", peer.list_all_tools())
            .await?
            .map_err(|e| format!("tools/list failed: {e}"))?;
        let tools: Vec<Tool> = listed
            .into_iter()
            .map(|mut tool| {
                tool.name = self.served_name(&tool.name).into();
                tool
            })
            .collect();
        let changed = self.listing.write().map(|mut cached| {
            let changed = cached.tools != tools;
            if changed {
                // Compiled only when the list changed: a reconnect that
                // finds the same tools keeps the same schemas.
                *cached = Listing::of(&self.config.name, tools);
            }
            changed
        });
        if changed.unwrap_or(false) {
            self.changes.send_modify(|n| *n += 1);
        }
        Ok(())
    }

    /// Follows the upstream's `tools/list_changed` for as long as it lives.
    fn follow_list_changes(&self) {
        let me = self.me.clone();
        let announced = self.relay.list_changed.clone();
        tokio::spawn(async move {
            loop {
                announced.notified().await;
                let Some(me) = me.upgrade() else {
                    break;
                };
                // The peer is copied out: a reconnection must not wait for
                // this list to come back.
                if let Some((peer, _)) = me.current().await
                    && let Err(e) = me.refresh_tools(&peer).await
                {
                    tracing::warn!(upstream = me.config.name, "tool list refresh failed: {e}");
                }
            }
        });
    }

    /// The connection `generation` is gone (the process crashed, the server
    /// went away): answer "unavailable" meanwhile and reconnect with
    /// backoff, once. A late failure of an older connection is not a reason
    /// to drop the current one.
    fn reconnect(&self, generation: u64) {
        if generation != self.generation.load(Ordering::SeqCst)
            || self.reconnecting.swap(true, Ordering::SeqCst)
        {
            return;
        }
        let Some(me) = self.me.upgrade() else {
            return;
        };
        tokio::spawn(async move {
            let old = me.client.write().await.take();
            if let Some(old) = old {
                let _ = old.cancel().await;
            }
            me.relay.forget_connection();
            let mut backoff = FIRST_RECONNECT;
            loop {
                match me.open().await {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!(
                            upstream = me.config.name,
                            "reconnect failed: {e}; next try in {backoff:?}"
                        );
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_RECONNECT);
                    }
                }
            }
            me.reconnecting.store(false, Ordering::SeqCst);
        });
    }

    /// Reconnects if `error` came from a connection that is closed. One
    /// request's failure on a live connection (an HTTP error for that POST)
    /// is that call's alone: reconnecting would end every caller's call in
    /// flight, and anyone could set it off.
    fn reconnect_if_gone(&self, peer: &Peer<RoleClient>, error: &ServiceError, generation: u64) {
        if peer.is_transport_closed() || matches!(error, ServiceError::TransportClosed) {
            self.reconnect(generation);
        }
    }

    fn failure(&self, message: String) -> CallToolResult {
        tracing::warn!(upstream = self.config.name, "{message}");
        self.failed(&message)
    }

    /// A failure whose `cause` (addresses, the upstream's own words) goes
    /// to the log only; the caller gets `message`.
    fn failure_from(&self, message: &str, cause: impl std::fmt::Display) -> CallToolResult {
        tracing::warn!(upstream = self.config.name, "{message}: {cause}");
        self.failed(message)
    }

    fn failed(&self, message: &str) -> CallToolResult {
        CallToolResult::error(vec![ContentBlock::text(format!(
            "upstream `{}` unavailable: {message}; nothing was charged",
            self.config.name
        ))])
    }
}

/// Header values may name environment variables, `${NAME}`, so that secrets
/// stay out of pricing.toml.
fn expand_headers(headers: &BTreeMap<String, String>) -> Result<Vec<(String, String)>, String> {
    headers
        .iter()
        .map(|(name, value)| {
            let mut out = String::new();
            let mut rest = value.as_str();
            while let Some(start) = rest.find("${") {
                out.push_str(&rest[..start]);
                let after = &rest[start + 2..];
                let end = after
                    .find('}')
                    .ok_or_else(|| format!("header {name}: unclosed ${{"))?;
                let var = &after[..end];
                out.push_str(
                    &std::env::var(var).map_err(|_| format!("header {name}: ${var} is not set"))?,
                );
                rest = &after[end + 1..];
            }
            out.push_str(rest);
            Ok((name.clone(), out))
        })
        .collect()
}

#[async_trait]
impl ToolBackend for Upstream {
    fn tools(&self) -> Vec<Tool> {
        self.listing
            .read()
            .map(|l| l.tools.clone())
            .unwrap_or_default()
    }

    /// Checks against the tool's `inputSchema`, so that a call the upstream
    /// would refuse is refused before anyone pays. (A refusal after a
    /// payment is refunded, but a remote provider's refund goes back to an
    /// account, not to the person who just paid.)
    fn validate(&self, tool: &str, args: &JsonObject) -> Result<(), ArgumentError> {
        let schema = self
            .listing
            .read()
            .ok()
            .and_then(|l| l.inputs.get(tool).cloned());
        match schema {
            Some(schema) => schema.check(args),
            None => Ok(()),
        }
    }

    fn unpriced(&self) -> Unpriced {
        self.config.unpriced
    }

    fn run_limit(&self) -> Option<Duration> {
        Some(self.config.timeout)
    }

    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.changes.subscribe())
    }

    async fn call(&self, tool: &str, args: JsonObject, context: &CallContext) -> CallToolResult {
        let name = tool
            .strip_prefix(self.config.prefix.as_deref().unwrap_or(""))
            .unwrap_or(tool)
            .to_owned();
        let Some((peer, generation)) = self.current().await else {
            self.reconnect(self.generation.load(Ordering::SeqCst));
            return self.failure("not connected; reconnecting".into());
        };
        let request = ClientRequest::CallToolRequest(Request::new(
            CallToolRequestParams::new(name).with_arguments(args),
        ));
        let mut place = Place::enter(&self.relay.in_flight, context.elicitation.clone());
        // rmcp cancels the upstream request itself when the timeout passes.
        let handle = match peer
            .send_request_with_option(
                request,
                PeerRequestOptions::with_timeout(self.config.timeout),
            )
            .await
        {
            Ok(handle) => handle,
            Err(e) => {
                drop(place);
                self.reconnect_if_gone(&peer, &e, generation);
                return self.failure_from("the call could not be sent", e);
            }
        };
        let (id, upstream_token) = (handle.id.clone(), handle.progress_token.clone());
        self.relay.in_flight().sent(place.key, id.clone());
        let opened = match &context.progress {
            Some((client, token)) => {
                let route = (client.clone(), token.clone());
                let heard = context.progress_heard;
                Some(
                    self.relay
                        .open_route(upstream_token.clone(), route, heard)
                        .await,
                )
            }
            None => None,
        };
        let outcome = tokio::select! {
            outcome = handle.await_response() => Some(outcome),
            () = context.cancelled.cancelled() => None,
        };
        self.relay.close_route_soon(upstream_token, opened).await;
        place.answered = matches!(outcome, Some(Ok(_) | Err(ServiceError::McpError(_))));
        drop(place);
        match outcome {
            None => {
                // The client cancelled: tell the upstream too.
                let cancel = CancelledNotificationParam::new(
                    Some(id),
                    Some("cancelled by the client".into()),
                );
                // Bounded: a stuck transport must not keep the caller's
                // answer (and its hold) waiting.
                let relayed = self
                    .within_timeout("relaying the cancellation", peer.notify_cancelled(cancel))
                    .await
                    .and_then(|sent| sent.map_err(|e| e.to_string()));
                if let Err(e) = relayed {
                    tracing::debug!("cancellation not relayed: {e}");
                }
                self.failure("the client cancelled the call".into())
            }
            Some(Ok(ServerResult::CallToolResult(result))) => result,
            Some(Ok(_)) => self.failure("it answered tools/call with something else".into()),
            Some(Err(ServiceError::Timeout { timeout })) => {
                self.failure(format!("no answer within {}s", timeout.as_secs_f64()))
            }
            // The upstream refused the call (bad arguments, unknown tool): a
            // tool error for the caller, the connection is fine.
            Some(Err(ServiceError::McpError(e))) => {
                CallToolResult::error(vec![ContentBlock::text(format!(
                    "upstream `{}` refused the call: {}; nothing was charged",
                    self.config.name, e.message
                ))])
            }
            Some(Err(e)) => {
                self.reconnect_if_gone(&peer, &e, generation);
                self.failure_from("the call failed", e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whose question it is: on a request's stream, that request's caller
    /// while its call is under way; otherwise the only call's, with calls
    /// that ended unanswered still counted (so nobody's) until they have
    /// lingered, or their connection is gone.
    #[test]
    fn a_question_goes_to_its_own_call_or_to_no_one() {
        let mut calls = InFlightCalls::<&str>::default();
        let on = |id: i64| InboundStreamOrigin::OutboundRequest(RequestId::Number(id));
        let bob = calls.enter(Some("bob"));
        assert_eq!(calls.asker(None), Some("bob"), "counted before it is sent");
        calls.sent(bob, RequestId::Number(1));
        let carol = calls.enter(Some("carol"));
        calls.sent(carol, RequestId::Number(2));
        assert_eq!(calls.asker(Some(&on(2))), Some("carol"));
        assert_eq!(calls.asker(Some(&on(1))), Some("bob"));
        assert_eq!(calls.asker(None), None, "two in flight, not said whose");
        assert_eq!(calls.asker(Some(&on(9))), None);

        calls.leave(bob, false);
        assert_eq!(calls.asker(Some(&on(1))), None, "bob's call ended");
        assert_eq!(
            calls.asker(None),
            None,
            "bob's may still be running upstream"
        );
        calls.leave(carol, true);
        assert_eq!(calls.asker(None), None, "bob's lingers");
        calls.forget_lingering(std::time::Instant::now() + UNANSWERED_CALL_LINGERS);
        assert!(calls.calls.is_empty());
        let dave = calls.enter(Some("dave"));
        assert_eq!(calls.asker(None), Some("dave"));
        calls.leave(dave, true);
        assert!(calls.calls.is_empty(), "an answered call is forgotten");
    }

    /// A call whose future is dropped midway (its task aborted) leaves its
    /// place as one that ended unanswered: it lingers, then is forgotten.
    /// (It stayed in flight for good, so on stdio no later question had
    /// anyone to answer it.)
    #[test]
    fn a_call_dropped_midway_leaves_the_calls_in_flight() {
        let calls = Mutex::new(InFlightCalls::<&str>::default());
        let erin = Place::enter(&calls, Some("erin"));
        assert_eq!(lock(&calls).asker(None), Some("erin"));
        drop(erin);
        assert_eq!(
            lock(&calls).asker(None),
            None,
            "it may still be running upstream"
        );
        lock(&calls).forget_lingering(std::time::Instant::now() + UNANSWERED_CALL_LINGERS);
        let mut frank = Place::enter(&calls, Some("frank"));
        assert_eq!(lock(&calls).asker(None), Some("frank"));
        frank.answered = true;
        drop(frank);
        assert!(
            lock(&calls).calls.is_empty(),
            "an answered call is forgotten"
        );
    }
}
