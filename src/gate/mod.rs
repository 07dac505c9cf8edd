//! The payment gate: stands in front of every priced call and decides
//! between the fast path (charge a funded wallet) and a payment mode.

mod allowance;
mod approval;
pub mod catalog;
mod closing;
mod dynamic;
mod elicitation;
mod fast_path;
mod lost_holds;
mod progress;
mod recording;
mod recovery;
mod redeem;
pub mod reply;
mod runs;
mod scope;
mod slow_path;
mod withheld;

pub use closing::{SESSION_END_GRACE, SHUTDOWN_GRACE};
use lost_holds::LostHolds;
pub use withheld::WithheldNotes;

use std::{sync::Arc, time::Duration};

use rmcp::{
    ErrorData as McpError,
    model::{CallToolRequestParams, CallToolResponse, JsonObject, Tool},
};
use serde_json::{Value, json};

use crate::{
    approvals::{ApprovalRules, Threshold},
    canonical::args_hash,
    config::{Config, Mode, Timeouts},
    money::Units,
    provider::{Provider, ProviderError, SessionState, local::LocalProvider},
    receipt::ReceiptSigner,
    store::{Charge, Intent, OpenLimit, Origin, Store},
    sync::{Counted, lock},
    tools::ToolBackend,
};
pub use catalog::{Catalog, PAYMENT_ID_ARG, Price, confirm_tool_name};
pub use dynamic::{DynamicTools, dynamic_confirm_payment_id};
pub use recovery::Recovered;
pub use scope::{
    ANONYMOUS_STATELESS, CallScope, ClientGone, Elicits, abandonment, stateless_session,
};

/// Who is calling: the principal pays. `None` is anonymous, which has no
/// wallet and can only pay through payment sessions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    pub principal: Option<String>,
}

/// Settings the gate needs from `pricing.toml`.
#[derive(Debug, Clone)]
pub struct GateSettings {
    pub server_name: String,
    /// Whose revenue account earns what no tool's terms name
    /// (`[server] beneficiary`, else the server's name).
    pub beneficiary: String,
    pub payment_ttl: Duration,
    /// Charges above their threshold need a person's yes, even from a
    /// funded wallet.
    pub approvals: ApprovalRules,
    /// The most payments one principal (or anonymous MCP session) may have
    /// waiting at once.
    pub max_open_intents: u32,
    /// The most payments anonymous callers may have waiting, together.
    pub max_open_anonymous_intents: u32,
    /// How long a concurrent confirm waits for the run already under way.
    pub run_wait: Duration,
    pub timeouts: Timeouts,
    /// How long a paid intent stays redeemable after its time (then
    /// recovery refunds it).
    pub keep_results: Duration,
    /// How long a fast-path hold whose answer was lost may still land: a
    /// statement whose connection broke ends by its statement timeout.
    pub lost_hold_may_land: Duration,
}

impl GateSettings {
    /// How many payments may be waiting when a caller opens another.
    pub fn open_limit(&self) -> OpenLimit {
        OpenLimit {
            per_caller: self.max_open_intents.into(),
            anonymous: self.max_open_anonymous_intents.into(),
        }
    }

    pub fn from_config(config: &Config) -> Self {
        Self {
            server_name: config.server_name.clone(),
            beneficiary: config.terms.beneficiary.clone(),
            payment_ttl: config.payment_ttl,
            approvals: config.approvals.clone(),
            max_open_intents: config.max_open_intents,
            max_open_anonymous_intents: config.max_open_anonymous_intents,
            run_wait: Duration::from_secs(60),
            timeouts: config.timeouts.clone(),
            keep_results: config.keep_results,
            lost_hold_may_land: config.pool.statement_timeout + Duration::from_secs(30),
        }
    }
}

/// What the catalog is built from, kept to rebuild it when a backend's tool
/// list changes.
pub struct CatalogSources {
    pub config: Config,
    pub backends: Vec<Arc<dyn ToolBackend>>,
}

pub struct Gate {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) provider: Arc<dyn Provider>,
    /// The sessions this store holds (the local provider's), for intents
    /// opened before `[provider]` was changed to a remote one.
    local: Arc<dyn Provider>,
    catalog: std::sync::RwLock<Arc<Catalog>>,
    sources: Option<CatalogSources>,
    rebuilding: std::sync::Mutex<()>,
    pub(crate) signer: ReceiptSigner,
    pub(crate) settings: GateSettings,
    pub(crate) dynamic: DynamicTools,
    runs: runs::RunsUnderWay,
    /// Where withheld fast-path calls are noted; none: not noted.
    withheld: Option<WithheldNotes>,
    /// Holds whose answer was lost, released as they land.
    lost_holds: LostHolds,
    /// The calls under way, and whether the gate still takes new ones.
    closing: closing::Closing,
}

/// A priced call that passed validation.
pub(crate) struct PricedCall<'a> {
    pub tool: &'a str,
    pub price: &'a Price,
    pub args: JsonObject,
    pub args_hash: String,
    /// What the payer is asked for before the run (see [`Price::upfront`]).
    pub amount: Units,
    /// Above this, a person approves the charge.
    pub threshold: Threshold,
    pub origin: Origin,
}

impl Gate {
    pub fn new(
        store: Arc<dyn Store>,
        provider: Arc<dyn Provider>,
        catalog: Catalog,
        signer: ReceiptSigner,
        settings: GateSettings,
    ) -> Self {
        let lost_holds = LostHolds::new(settings.lost_hold_may_land, Duration::from_secs(1));
        // Only read and cancelled through: it opens no session, so it
        // needs no checkout address.
        let local = Arc::new(LocalProvider::new(store.clone(), ""));
        Self {
            store,
            provider,
            local,
            catalog: std::sync::RwLock::new(Arc::new(catalog)),
            sources: None,
            rebuilding: Default::default(),
            signer,
            settings,
            dynamic: DynamicTools::default(),
            runs: Default::default(),
            withheld: None,
            lost_holds,
            closing: Default::default(),
        }
    }

    /// The provider an intent's payment session is with: the configured
    /// one; or, for a session this store holds (opened by the local or
    /// mock provider before `[provider]` changed), the local one, so that
    /// its payment is still redeemed or refunded; or, for a remote that is
    /// no longer configured (another kind, or a sessions API elsewhere),
    /// none: its payment is left as it is, never asked of a remote that
    /// would not know it and so be taken for unpaid.
    pub(crate) fn provider_of(&self, intent: &Intent) -> Result<&dyn Provider, ProviderError> {
        if intent.provider == self.provider.identity() {
            return Ok(self.provider.as_ref());
        }
        match intent.provider.as_str() {
            "local" | "mock" => Ok(self.local.as_ref()),
            // Recorded before intents named their remote by where it is:
            // taken, as then, for the configured one of its kind.
            kind if kind == self.provider.name() => Ok(self.provider.as_ref()),
            other => Err(ProviderError::NotConfigured(other.to_owned())),
        }
    }

    /// What an intent's own provider (see [`Gate::provider_of`]) says of
    /// its payment session.
    pub(crate) async fn session_state_of(
        &self,
        intent: &Intent,
        session: &str,
    ) -> Result<SessionState, ProviderError> {
        self.provider_of(intent)?.session_state(session).await
    }

    /// Counts a call as under way until the guard is dropped; `None` once
    /// the gate is closed.
    pub fn enter(&self) -> Option<Counted> {
        self.closing.enter()
    }

    /// Counts work as under way, closed or not: a shutdown waits for it.
    pub fn enter_even_closing(&self) -> Counted {
        self.closing.enter_even_closing()
    }

    /// Counts an MCP session as open until the guard is dropped.
    pub fn session_opened(&self) -> Counted {
        self.closing.session_opened()
    }

    /// For a server whose transports are down: waits up to `grace` for its
    /// sessions to close, and as long again for the payments they leave to
    /// be ended; how many sessions or tasks were left.
    pub async fn sessions_ended(&self, grace: Duration) -> usize {
        self.closing.sessions_ended(grace).await
    }

    /// Stops taking calls, and ends the waits for payments (see `closing`).
    pub fn close(&self) {
        self.closing.close();
    }

    /// Its one client can answer no more (a stdio client closed stdin):
    /// calls waiting for a payment or a person stop waiting and answer
    /// with their payment id, which stays payable. Calls still come in:
    /// those the client sent before closing are answered.
    pub fn end_inputs(&self) {
        self.closing.end_inputs();
    }

    /// Whether the gate has stopped taking calls.
    pub fn is_closed(&self) -> bool {
        self.closing.is_closed()
    }

    /// Waits up to `grace` for the calls under way to end; how many had not.
    pub async fn calls_finished(&self, grace: Duration) -> usize {
        self.closing.drained(grace).await
    }

    /// Notes fast-path calls answered without their result in `notes`
    /// until their holds are given back (see `withheld`).
    pub fn noting_withheld_in(mut self, notes: WithheldNotes) -> Self {
        self.withheld = Some(notes);
        self
    }

    /// Keeps what the catalog was built from, so that it can be rebuilt.
    pub fn with_sources(mut self, sources: CatalogSources) -> Self {
        self.sources = Some(sources);
        self
    }

    /// The tools and prices now.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog
            .read()
            .map_or_else(|p| p.into_inner().clone(), |c| c.clone())
    }

    /// Follows the backends whose tool lists can change (upstreams): on a
    /// change, rebuilds the catalog and tells every session.
    /// Rebuilds the catalog whenever one of `changes` (the backends' tool
    /// lists, subscribed to before the catalog was first built, so that a
    /// change meanwhile is not missed) ticks.
    pub fn watch_backends(self: &Arc<Self>, changes: Vec<tokio::sync::watch::Receiver<u64>>) {
        for mut changes in changes {
            let gate = Arc::downgrade(self);
            tokio::spawn(async move {
                while changes.changed().await.is_ok() {
                    let Some(gate) = gate.upgrade() else {
                        break;
                    };
                    gate.rebuild_catalog();
                    gate.dynamic.announce_all().await;
                }
            });
        }
    }

    fn rebuild_catalog(&self) {
        let Some(sources) = &self.sources else {
            return;
        };
        // One rebuild at a time, each from the backends' lists as they are
        // then: two upstreams changing at once could otherwise swap in the
        // older build last.
        let _one_at_a_time = lock(&self.rebuilding);
        let previous = self.catalog();
        match Catalog::build_lenient(&sources.config, &sources.backends, &previous) {
            Ok(catalog) => {
                if let Ok(mut current) = self.catalog.write() {
                    *current = Arc::new(catalog);
                }
                tracing::info!("tool list changed upstream; catalog rebuilt");
            }
            Err(e) => {
                tracing::warn!("tool list changed upstream but the catalog cannot be rebuilt: {e}")
            }
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn dynamic_tools(&self) -> &DynamicTools {
        &self.dynamic
    }

    /// The tools one MCP session sees: the catalog plus its own dynamic
    /// confirm tools.
    pub async fn tools_for(&self, session_id: &str) -> Vec<Tool> {
        self.end_due_confirm_tools(Some(session_id)).await;
        let mut tools = self.catalog().listed().to_vec();
        tools.extend(self.dynamic.listed(session_id));
        tools
    }

    pub fn tool_for(&self, session_id: &str, name: &str) -> Option<Tool> {
        self.catalog().listed_tool(name).or_else(|| {
            self.dynamic
                .listed(session_id)
                .into_iter()
                .find(|t| t.name == name)
        })
    }

    /// The configured payment mode of a tool, for metrics: `free` for
    /// unpriced tools, the mode of the tool a confirm tool confirms.
    /// The name a call's metrics carry: a tool the catalog serves, else one
    /// label for every dynamic confirm tool and one for every unknown name,
    /// so that what a client sends cannot add series without end.
    pub fn tool_label(&self, tool: &str) -> String {
        if dynamic_confirm_payment_id(tool).is_some() {
            return "confirm_pay".into();
        }
        let catalog = self.catalog();
        let known = catalog.get(tool).is_some() || catalog.confirmed_tool(tool).is_some();
        if known {
            tool.to_owned()
        } else {
            "unknown".into()
        }
    }

    pub fn mode_label(&self, tool: &str) -> &'static str {
        if dynamic_confirm_payment_id(tool).is_some() {
            return Mode::DynamicTools.as_str();
        }
        let catalog = self.catalog();
        let priced = catalog.confirmed_tool(tool).unwrap_or(tool);
        match catalog.get(priced) {
            Some(entry) => entry.price.as_ref().map_or("free", |p| p.mode.as_str()),
            None => "unknown",
        }
    }

    /// The server's signing key, for receipts and other tags.
    pub fn signer(&self) -> &ReceiptSigner {
        &self.signer
    }

    /// Runs a tool on its backend, for this call's client.
    pub(crate) async fn run_tool(
        &self,
        scope: &CallScope<'_>,
        entry: &catalog::Entry,
        name: &str,
        args: JsonObject,
    ) -> rmcp::model::CallToolResult {
        use futures::FutureExt;
        let context = scope.backend_context(self.settings.timeouts.elicitation);
        let run = entry.backend.call(name, args, &context);
        // A tool that panics (an embedded handler's `unwrap` on its input)
        // is a failed run: answered, its hold released or its payment
        // refunded, rather than a call left hanging with its money held.
        match std::panic::AssertUnwindSafe(run).catch_unwind().await {
            Ok(result) => unfit_output_fails(name, entry, reply::tools_own(result)),
            Err(_) => {
                tracing::error!(tool = name, "the tool panicked; its run counts as failed");
                rmcp::model::CallToolResult::error(vec![rmcp::model::ContentBlock::text(format!(
                    "`{name}` failed unexpectedly; nothing was charged"
                ))])
            }
        }
    }

    /// What a successful run is charged, split by the tool's terms: the
    /// tariff's charge for these arguments and the usage the result reports.
    pub(crate) fn charge_for(
        price: &Price,
        args: &JsonObject,
        result: &rmcp::model::CallToolResult,
    ) -> Charge {
        let split = price
            .terms
            .split(price.tariff.charge(args, result), &price.currency);
        Charge::of(&split, &price.terms.beneficiary, &price.currency)
    }

    /// Handles one `tools/call`. Only an unknown tool is a JSON-RPC error;
    /// everything else, payment problems included, is a tool result.
    pub async fn call(
        &self,
        scope: &CallScope<'_>,
        params: CallToolRequestParams,
    ) -> Result<CallToolResponse, McpError> {
        let tool = params.name.clone();
        Ok(match self.answer(scope, params).await? {
            CallToolResponse::Complete(result) => {
                let has_output_schema = self
                    .catalog()
                    .get(&tool)
                    .is_some_and(|entry| entry.has_output_schema);
                reply::for_tool(result, has_output_schema).into()
            }
            other => other,
        })
    }

    async fn answer(
        &self,
        scope: &CallScope<'_>,
        params: CallToolRequestParams,
    ) -> Result<CallToolResponse, McpError> {
        let name = params.name.as_ref();
        let params_meta = params.meta.as_ref().map(|m| &m.0.0);
        let mut args = params.arguments.unwrap_or_default();
        let catalog = self.catalog();
        if let Some(tool) = catalog.confirmed_tool(name) {
            return Ok(self.confirm(scope, tool, &args).await.into());
        }
        if let Some(payment_id) = dynamic_confirm_payment_id(name) {
            return Ok(self.dynamic_confirm(scope, name, payment_id).await.into());
        }
        let Some(entry) = catalog.get(name) else {
            // A tool no longer served (an upstream dropped it) may have been
            // paid for: its payment id, redeemed, is refunded (`tool_gone`).
            if let Some((tool, payment_id, args_hash)) = gone_tool_payment(name, &args)
                && catalog.get(&tool).is_none()
                && let Ok(Some(intent)) = self.store.intent(&payment_id).await
                && intent.tool == tool
            {
                return Ok(self
                    .redeem(scope, &payment_id, &tool, args_hash.as_deref())
                    .await
                    .into());
            }
            return Err(McpError::invalid_params(
                format!("unknown tool `{name}`"),
                None,
            ));
        };
        let Some(price) = &entry.price else {
            return Ok(self.run_tool(scope, entry, name, args).await.into());
        };
        // The payment id rides along with the arguments in the modes that
        // resubmit; it is not part of what the tool is priced for.
        let payment_id = if price.mode.resubmits() {
            match args.remove(PAYMENT_ID_ARG) {
                None | Some(Value::Null) => None,
                Some(Value::String(id)) => Some(id),
                Some(_) => {
                    return Ok(reply::error(
                        reply::code::INVALID_ARGUMENTS,
                        "invalid argument `payment_id`: expected a string",
                        reply::details(json!({ "field": PAYMENT_ID_ARG })),
                    )
                    .into());
                }
            }
        } else {
            None
        };
        // Arguments that come with their payment were checked when it was
        // asked for, and are bound to it by their hash: checked again, a
        // schema tightened since would refuse a paid call as "nothing was
        // charged". The tool itself refuses what it cannot take (refunded).
        let paid_for = payment_id.is_some() || params.request_state.is_some();
        // The metered argument first: its refusal says why the price needs it.
        if !paid_for && let Err((field, message)) = price.check_metered_argument(&args) {
            return Ok(reply::error(
                reply::code::INVALID_ARGUMENTS,
                format!("{message}; nothing was charged"),
                reply::details(json!({ "field": field })),
            )
            .into());
        }
        if !paid_for && let Err(e) = entry.backend.validate(name, &args) {
            return Ok(reply::error(
                reply::code::INVALID_ARGUMENTS,
                format!("{e}; nothing was charged"),
                reply::details(json!({ "field": e.field })),
            )
            .into());
        }
        let origin = match scope.origin(params_meta) {
            Ok(origin) => origin,
            Err(message) => {
                return Ok(reply::error(
                    reply::code::INVALID_ARGUMENTS,
                    format!("{message}; nothing was charged"),
                    reply::details(json!({ "field": "_meta" })),
                )
                .into());
            }
        };
        let call = PricedCall {
            tool: name,
            price,
            args_hash: args_hash(&Value::Object(args.clone())),
            amount: price.upfront(&args),
            threshold: self.settings.approvals.threshold(
                scope.caller.principal.as_deref(),
                name,
                &price.tags,
                &price.currency,
            ),
            origin,
            args,
        };
        if let Some(state) = params.request_state.as_deref() {
            // A 2026-07-28 client answering our InputRequiredResult.
            return Ok(self
                .resume_input_required(scope, &call, state, params.input_responses.as_ref())
                .await
                .into());
        }
        if let Some(payment_id) = payment_id {
            return Ok(self
                .redeem(scope, &payment_id, call.tool, Some(&call.args_hash))
                .await
                .into());
        }
        if call.amount.is_zero() {
            // A metered price these arguments bring to nothing: a free call.
            return Ok(self.run_tool(scope, entry, name, call.args).await.into());
        }
        let mode = self.resolve_mode(price.mode, scope);
        let needs_approval = call.amount > call.threshold.amount;
        if !needs_approval && let Some(result) = self.try_fast_path(scope, &call, entry).await {
            return Ok(result.into());
        }
        // The fast path's hold checks the wallet's limits itself; a payment
        // any other way is checked here before it is asked for.
        if let Some(refused) = self.over_limit(scope, &call).await {
            return Ok(refused.into());
        }
        if needs_approval && let Some(response) = self.ask_approval(scope, &call, mode).await {
            return Ok(response);
        }
        Ok(self
            .slow_path(scope, &call, mode, slow_path::Purpose::Payment)
            .await)
    }

    /// The mode this call is served in, given what the client can do:
    /// `auto` is elicitation where the client declares it and resubmit
    /// otherwise; elicitation and progress fall back to resubmit for clients
    /// that cannot do them.
    fn resolve_mode(&self, mode: Mode, scope: &CallScope<'_>) -> Mode {
        let resolved = match mode {
            Mode::Auto | Mode::Elicitation if scope.elicits().any() => Mode::Elicitation,
            Mode::Auto | Mode::Elicitation => Mode::Resubmit,
            Mode::Progress if scope.progress_token().is_none() => Mode::Resubmit,
            other => other,
        };
        if resolved != mode {
            tracing::debug!(configured = %mode, serving = %resolved, elicits = ?scope.elicits(), "payment mode chosen for this client");
        }
        resolved
    }

    /// `confirm_<tool>_payment {payment_id}`.
    async fn confirm(
        &self,
        scope: &CallScope<'_>,
        tool: &str,
        args: &JsonObject,
    ) -> rmcp::model::CallToolResult {
        match args.get(PAYMENT_ID_ARG) {
            Some(Value::String(id)) if args.len() == 1 => self.redeem(scope, id, tool, None).await,
            _ => reply::error(
                reply::code::INVALID_ARGUMENTS,
                "invalid argument `payment_id`: pass exactly {\"payment_id\": \"...\"}",
                reply::details(json!({ "field": PAYMENT_ID_ARG })),
            ),
        }
    }
}

/// A call naming a tool the catalog no longer has, with a payment id: the
/// tool, the id and (for a resubmit) the hash of the other arguments. Both
/// ways of redeeming count: `confirm_<tool>_payment {payment_id}`, and the
/// tool again with `payment_id`.
fn gone_tool_payment(name: &str, args: &JsonObject) -> Option<(String, String, Option<String>)> {
    let Some(Value::String(payment_id)) = args.get(PAYMENT_ID_ARG) else {
        return None;
    };
    let confirmed = name
        .strip_prefix("confirm_")
        .and_then(|rest| rest.strip_suffix("_payment"))
        .filter(|tool| !tool.is_empty() && args.len() == 1);
    match confirmed {
        Some(tool) => Some((tool.to_owned(), payment_id.clone(), None)),
        None => {
            let mut rest = args.clone();
            rest.remove(PAYMENT_ID_ARG);
            let hash = args_hash(&Value::Object(rest));
            Some((name.to_owned(), payment_id.clone(), Some(hash)))
        }
    }
}

/// A priced tool's success whose `structuredContent` does not fit its
/// `outputSchema` (or is missing) counts as a failed run, so it is not
/// charged: its client would throw it away (the MCP SDKs check results
/// against the schema), and the person would have paid for nothing.
fn unfit_output_fails(
    name: &str,
    entry: &catalog::Entry,
    result: rmcp::model::CallToolResult,
) -> rmcp::model::CallToolResult {
    let Some(output) = entry
        .output
        .as_ref()
        .filter(|_| result.is_error != Some(true))
    else {
        return result;
    };
    let why = match &result.structured_content {
        None => "it carries no structuredContent".to_owned(),
        Some(content) => match output.check_value(content) {
            Ok(()) => return result,
            Err(e) if e.field == "arguments" => e.message,
            Err(e) => format!("`{}`: {}", e.field, e.message),
        },
    };
    tracing::warn!(
        tool = name,
        "a result that does not fit its outputSchema ({why}): not charged"
    );
    rmcp::model::CallToolResult::error(vec![rmcp::model::ContentBlock::text(format!(
        "`{name}` answered with a result that does not fit its outputSchema ({why}); the call \
         counts as failed, and nothing was charged"
    ))])
}
