//! In-process harness for the interactive modes: tollgate's server and an
//! rmcp test client joined by a pipe, sharing the SQLite file with the CLI.
//! The test client answers elicitations and watches progress the way a
//! person and a client would: it can pay the session it is shown.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use rmcp::{
    ClientHandler, ClientLifecycleMode, ClientServiceExt, ErrorData as McpError, RoleClient,
    ServiceExt,
    model::*,
    service::{NotificationContext, RequestContext, RunningService},
};
use tollgate::{
    app,
    config::Config,
    gate::{Caller, Gate},
    server::TollgateServer,
    store::{Store, now_ms},
};

use crate::harness::Env;

/// What the person behind the test client does when asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Person {
    /// Pays the session (dev settlement), then accepts.
    PaysAndAccepts,
    /// Accepts an approval (the gate charges the wallet).
    Approves,
    /// Accepts without paying.
    AcceptsUnpaid,
    Declines,
    /// Pays the session (dev settlement), then declines all the same.
    PaysAndDeclines,
    Cancels,
    /// Answers only after the server has stopped waiting.
    Dawdles,
    /// Says nothing to prompts; pays after this many progress messages.
    PaysAfterProgress(usize),
    /// Says nothing and never pays.
    Ignores,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elicitation {
    None,
    Form,
    /// URL mode, and forms.
    Url,
    /// URL mode alone.
    UrlOnly,
}

#[derive(Clone)]
pub struct TestClient {
    pub person: Person,
    pub elicitation: Elicitation,
    store: Arc<dyn Store>,
    pub prompts: Arc<Mutex<Vec<ElicitRequestParams>>>,
    pub progress: Arc<Mutex<Vec<ProgressNotificationParam>>>,
    pub list_changed: Arc<AtomicUsize>,
    pub custom: Arc<Mutex<Vec<String>>>,
}

/// The first field a form elicitation asks for (its yes/no question).
pub fn first_form_field(request: &ElicitRequestParams) -> Option<String> {
    let ElicitRequestParams::FormElicitationParams {
        requested_schema, ..
    } = request
    else {
        return None;
    };
    serde_json::to_value(requested_schema).unwrap_or_default()["properties"]
        .as_object()
        .and_then(|p| p.keys().next().cloned())
}

/// An accept, answering `field` (a form's question) yes.
pub fn accepting(field: Option<String>) -> ElicitResult {
    let accept = ElicitResult::new(ElicitationAction::Accept);
    match field {
        Some(field) => accept.with_content(serde_json::json!({ field: true })),
        None => accept,
    }
}

/// The payment id a prompt or progress message names.
pub fn payment_id_in(text: &str) -> Option<String> {
    let start = text.find("pay_")?;
    let id: String = text[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    (id.len() == 36).then_some(id)
}

impl TestClient {
    pub fn new(person: Person, elicitation: Elicitation, store: Arc<dyn Store>) -> Self {
        Self {
            person,
            elicitation,
            store,
            prompts: Default::default(),
            progress: Default::default(),
            list_changed: Default::default(),
            custom: Default::default(),
        }
    }

    fn pay(&self, id: &str) {
        let store = self.store.clone();
        let id = id.to_owned();
        // Called from a sync context too; the store is async.
        tokio::spawn(async move {
            if let Err(e) = store.pay_session(&id, None, now_ms()).await {
                eprintln!("test client could not pay {id}: {e}");
            }
        });
    }

    async fn pay_now(&self, id: &str) {
        self.store
            .pay_session(id, None, now_ms())
            .await
            .expect("pay session");
    }

    /// The payment id the first progress message names, once it arrives.
    pub async fn first_progress_payment_id(&self) -> String {
        loop {
            let first = self
                .progress
                .lock()
                .unwrap()
                .first()
                .and_then(|p| p.message.clone());
            if let Some(id) = first.as_deref().and_then(payment_id_in) {
                return id;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn prompt_count(&self) -> usize {
        self.prompts.lock().unwrap().len()
    }
}

impl ClientHandler for TestClient {
    fn get_info(&self) -> ClientConfig {
        let capabilities = ClientCapabilities::builder();
        let capabilities = match self.elicitation {
            Elicitation::None => capabilities.build(),
            Elicitation::Form => capabilities
                .enable_elicitation_with(
                    ElicitationCapability::new().with_form(FormElicitationCapability::new()),
                )
                .build(),
            Elicitation::Url => capabilities
                .enable_elicitation_with(
                    ElicitationCapability::new()
                        .with_form(FormElicitationCapability::new())
                        .with_url(UrlElicitationCapability::new()),
                )
                .build(),
            Elicitation::UrlOnly => capabilities
                .enable_elicitation_with(
                    ElicitationCapability::new().with_url(UrlElicitationCapability::new()),
                )
                .build(),
        };
        ClientConfig::new(
            capabilities,
            Implementation::new("tollgate-test-client", "0.0.1"),
        )
    }

    async fn create_elicitation(
        &self,
        request: ElicitRequestParams,
        _context: RequestContext<RoleClient>,
    ) -> Result<ElicitResult, McpError> {
        let (id, field) = match &request {
            ElicitRequestParams::UrlElicitationParams { elicitation_id, .. } => {
                (Some(elicitation_id.clone()), None)
            }
            ElicitRequestParams::FormElicitationParams { message, .. } => {
                (payment_id_in(message), first_form_field(&request))
            }
            _ => (None, None),
        };
        self.prompts.lock().unwrap().push(request);
        let accept = |field: Option<String>| Ok(accepting(field));
        match self.person {
            Person::PaysAndAccepts => {
                if let Some(id) = &id {
                    self.pay_now(id).await;
                }
                accept(field)
            }
            Person::Approves | Person::AcceptsUnpaid => accept(field),
            Person::Declines => Ok(ElicitResult::new(ElicitationAction::Decline)),
            Person::PaysAndDeclines => {
                if let Some(id) = &id {
                    self.pay_now(id).await;
                }
                Ok(ElicitResult::new(ElicitationAction::Decline))
            }
            Person::Cancels => Ok(ElicitResult::new(ElicitationAction::Cancel)),
            Person::Dawdles => {
                tokio::time::sleep(Duration::from_millis(800)).await;
                accept(field)
            }
            Person::PaysAfterProgress(_) | Person::Ignores => {
                std::future::pending::<()>().await;
                accept(field)
            }
        }
    }

    async fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        let message = params.message.clone().unwrap_or_default();
        let count = {
            let mut progress = self.progress.lock().unwrap();
            progress.push(params);
            progress.len()
        };
        if let (Person::PaysAfterProgress(n), Some(id)) = (self.person, payment_id_in(&message))
            && count == n
        {
            self.pay(&id);
        }
    }

    async fn on_tool_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.list_changed.fetch_add(1, Ordering::SeqCst);
    }

    async fn on_custom_notification(
        &self,
        n: CustomNotification,
        _context: NotificationContext<RoleClient>,
    ) {
        self.custom.lock().unwrap().push(n.method);
    }
}

pub type Client = RunningService<RoleClient, TestClient>;

/// A tollgate installation with its gate running in this process.
pub struct InProcess {
    pub env: Env,
    pub gate: Arc<Gate>,
}

/// Short timeouts, so the tests see every ending quickly.
pub fn pricing(mode: &str, extra_server: &str) -> String {
    let base = crate::harness::pricing(mode, extra_server);
    format!(
        "{base}\n[timeouts]\nelicitation = \"300ms\"\npayment_check = \"300ms\"\nprogress = \"1s\"\nprogress_heartbeat = \"50ms\"\n"
    )
}

/// The config an in-process server runs: the env's pricing, database and key.
pub fn config_for(env: &Env, pricing_text: &str) -> Config {
    let text = format!(
        "{pricing_text}\n[receipts]\nkey_file = \"{}\"\n",
        env.key.display()
    );
    let mut config = Config::parse(&text, "pricing.toml").expect("pricing");
    config.store_url = env.db.clone();
    config
}

impl InProcess {
    pub async fn new(pricing_text: &str) -> Self {
        let env = Env::with_pricing(pricing_text);
        let config = config_for(&env, pricing_text);
        let store = app::open_store(&config.store_url, &config)
            .await
            .expect("store");
        let gate = app::build_gate(&config, store).await.expect("gate");
        Self { env, gate }
    }

    pub fn client(&self, person: Person, elicitation: Elicitation) -> TestClient {
        TestClient::new(person, elicitation, self.gate.store().clone())
    }

    /// Connects a client through a new MCP session; `modern` negotiates
    /// 2026-07-28 through the `Discover` lifecycle.
    pub async fn connect(&self, payer: Option<&str>, handler: TestClient, modern: bool) -> Client {
        let (server_io, client_io) = tokio::io::duplex(256 * 1024);
        let server = TollgateServer::new(
            self.gate.clone(),
            Caller {
                principal: payer.map(str::to_owned),
            },
        );
        tokio::spawn(async move {
            if let Ok(running) = server.serve(server_io).await {
                let _ = running.waiting().await;
            }
        });
        let client = if modern {
            handler
                .serve_with_lifecycle(
                    client_io,
                    ClientLifecycleMode::Discover {
                        preferred_versions: vec![ProtocolVersion::V_2026_07_28],
                    },
                )
                .await
        } else {
            handler.serve(client_io).await
        };
        client.expect("connect")
    }
}

pub async fn call(client: &Client, tool: &str, arguments: serde_json::Value) -> CallToolResult {
    client
        .call_tool(
            CallToolRequestParams::new(tool.to_owned())
                .with_arguments(crate::harness::args(arguments)),
        )
        .await
        .unwrap_or_else(|e| panic!("call {tool} failed at the protocol level: {e}"))
}

// ---------- a payment system whose timing a test sets ----------

/// What a test's person does just before a cancel reaches the provider.
pub type BeforeCancel =
    Box<dyn Fn(String) -> futures::future::BoxFuture<'static, ()> + Send + Sync>;

/// A provider over another: its first `failing_checks` questions about a
/// session fail as unreachable, and `before_cancel` (a person paying just as
/// the call ends) runs before each cancel reaches it.
pub struct Wrapped {
    pub inner: Arc<dyn tollgate::provider::Provider>,
    pub failing_checks: std::sync::atomic::AtomicU32,
    /// How many checks hang, as a provider that takes the connection and
    /// never answers (for two minutes).
    pub hanging_checks: std::sync::atomic::AtomicU32,
    /// How many cancels fail as if the provider could not be reached.
    pub failing_cancels: std::sync::atomic::AtomicU32,
    /// How many cancels the provider refuses (a key without the right).
    pub refused_cancels: std::sync::atomic::AtomicU32,
    /// A session the provider answers about with something unusable.
    pub unreadable: Arc<std::sync::Mutex<Option<String>>>,
    pub before_cancel: Option<BeforeCancel>,
    /// How many checks of a session's state have begun.
    pub checks_begun: Arc<std::sync::atomic::AtomicU32>,
}

impl Wrapped {
    pub fn new(inner: Arc<dyn tollgate::provider::Provider>) -> Self {
        Self {
            inner,
            failing_checks: 0.into(),
            hanging_checks: 0.into(),
            failing_cancels: 0.into(),
            refused_cancels: 0.into(),
            unreadable: Default::default(),
            before_cancel: None,
            checks_begun: Default::default(),
        }
    }
}

/// Counts one down from `left`; false once it is at zero.
fn take_one(left: &std::sync::atomic::AtomicU32) -> bool {
    left.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
        .is_ok()
}

#[async_trait::async_trait]
impl tollgate::provider::Provider for Wrapped {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    async fn create_session(
        &self,
        req: &tollgate::provider::SessionRequest,
    ) -> Result<tollgate::provider::ProviderSession, tollgate::provider::ProviderError> {
        self.inner.create_session(req).await
    }
    async fn session_state(
        &self,
        id: &str,
    ) -> Result<tollgate::provider::SessionState, tollgate::provider::ProviderError> {
        self.checks_begun
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if take_one(&self.failing_checks) {
            return Err(tollgate::provider::ProviderError::Unavailable(
                "connection refused".into(),
            ));
        }
        if take_one(&self.hanging_checks) {
            tokio::time::sleep(std::time::Duration::from_secs(120)).await;
        }
        if self.unreadable.lock().unwrap().as_deref() == Some(id) {
            return Err(tollgate::provider::ProviderError::Unreadable(
                "an unknown session status `REVIEW`".into(),
            ));
        }
        self.inner.session_state(id).await
    }
    async fn cancel_session(
        &self,
        id: &str,
    ) -> Result<tollgate::store::SessionStatus, tollgate::provider::ProviderError> {
        if let Some(before) = &self.before_cancel {
            before(id.to_owned()).await;
        }
        if take_one(&self.failing_cancels) {
            return Err(tollgate::provider::ProviderError::Unavailable(
                "connection refused".into(),
            ));
        }
        if take_one(&self.refused_cancels) {
            return Err(tollgate::provider::ProviderError::Refused(
                "403 Forbidden: this key may not cancel".into(),
            ));
        }
        self.inner.cancel_session(id).await
    }
    async fn pay_from_wallet(
        &self,
        id: &str,
        wallet: &str,
    ) -> Result<(), tollgate::provider::ProviderError> {
        self.inner.pay_from_wallet(id, wallet).await
    }
}

/// An in-process server over `pricing_text`, whose provider `provider`
/// makes from the config and the store.
pub async fn with_provider(
    pricing_text: &str,
    provider: impl FnOnce(&Config, Arc<dyn Store>) -> Arc<dyn tollgate::provider::Provider>,
) -> InProcess {
    with_settings(pricing_text, provider, |_| {}).await
}

/// The same, with gate settings no config sets (how long a call waits on
/// a run under way) changed by `change`.
pub async fn with_settings(
    pricing_text: &str,
    provider: impl FnOnce(&Config, Arc<dyn Store>) -> Arc<dyn tollgate::provider::Provider>,
    change: impl FnOnce(&mut tollgate::gate::GateSettings),
) -> InProcess {
    use tollgate::{
        gate::{Catalog, GateSettings},
        receipt::ReceiptSigner,
        tools::demo::demo_tools,
    };
    let env = Env::with_pricing(pricing_text);
    let config = config_for(&env, pricing_text);
    let mut settings = GateSettings::from_config(&config);
    change(&mut settings);
    let store = app::open_store(&config.store_url, &config)
        .await
        .expect("store");
    let gate = Gate::new(
        store.clone(),
        provider(&config, store),
        Catalog::build(&config, &[Arc::new(demo_tools())]).expect("catalog"),
        ReceiptSigner::load_or_create(&app::receipt_key_path(&config).expect("key path"))
            .expect("key"),
        settings,
    );
    InProcess {
        env,
        gate: Arc::new(gate),
    }
}
