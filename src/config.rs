//! `pricing.toml`: what a tool author writes. Every problem is reported with
//! the field and, where the TOML parser knows it, the line.

use std::{
    collections::HashMap,
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use serde::Deserialize;
use toml::Spanned;

use crate::{
    approvals::{ApprovalRule, ApprovalRules},
    money::{Currency, Units, format_in, from_minor_units, to_minor_units},
    tariff::{Measure, Metered, Tariff},
    terms::{Fee, FeeAccounts, Role, Terms},
};

/// The longest duration a setting may take (ten years).
pub(crate) const LONGEST_DURATION: Duration = Duration::from_secs(3650 * 24 * 3600);

/// `approval_threshold` when none is set, in the currency's minor units.
const DEFAULT_APPROVAL_MINOR_UNITS: i64 = 500;

#[derive(Debug, thiserror::Error)]
#[error("{file}{location}: {message}")]
pub struct ConfigError {
    pub file: String,
    /// `:LINE` when known, else empty.
    pub location: String,
    pub message: String,
}

/// How the gate takes a payment when the fast path does not apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    Auto,
    TwoStep,
    Resubmit,
    Elicitation,
    Progress,
    DynamicTools,
}

impl Mode {
    pub const ALL: [Mode; 6] = [
        Mode::Auto,
        Mode::TwoStep,
        Mode::Resubmit,
        Mode::Elicitation,
        Mode::Progress,
        Mode::DynamicTools,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Auto => "auto",
            Mode::TwoStep => "two_step",
            Mode::Resubmit => "resubmit",
            Mode::Elicitation => "elicitation",
            Mode::Progress => "progress",
            Mode::DynamicTools => "dynamic_tools",
        }
    }

    /// Modes that fall back to resubmit for clients that cannot do them,
    /// so their tools accept an optional `payment_id`.
    pub fn resubmits(self) -> bool {
        matches!(
            self,
            Mode::Auto | Mode::Resubmit | Mode::Elicitation | Mode::Progress
        )
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Mode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Mode::ALL.iter().map(|m| m.as_str()).collect();
                format!("unknown mode `{s}` (expected one of: {})", names.join(", "))
            })
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// SQLite `synchronous` setting: the durability trade-off (see README).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    #[default]
    Full,
    Normal,
}

/// How a PostgreSQL store uses its database (`[store]` in pricing.toml).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    /// Connections this instance keeps at most.
    pub max_connections: u32,
    /// How long a call waits for a connection (or for the database to
    /// answer a connect) before it gets "payment system unavailable".
    pub connect_timeout: Duration,
    /// The longest one statement may run; a stuck statement is cancelled.
    pub statement_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_connections: 16,
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderKind {
    /// Sessions in our own store, paid at our own checkout page or CLI.
    Local,
    /// The local provider, with every session settled (from the
    /// `dev-settlement` account) the moment it opens: the analogue of
    /// PayMCP's mock provider, for benchmarks and demos. Never in production.
    Mock,
    /// Another payment authority speaking the sessions API (for example a
    /// remote tollgate): `POST /v1/sessions`, `GET /v1/sessions/{id}`.
    SessionsApi {
        url: String,
        /// The environment variable that holds the API key: secrets stay
        /// out of pricing.toml.
        api_key_env: String,
    },
}

/// What happens to an upstream's tools that `[[tools]]` does not price.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unpriced {
    /// Served free, untouched.
    Free,
    /// Not served at all.
    Hidden,
    /// Served at this price, in the server's mode.
    Price(Units),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamTransport {
    /// A child process speaking MCP on stdio.
    Stdio {
        command: Vec<String>,
        env: std::collections::BTreeMap<String, String>,
        cwd: Option<PathBuf>,
    },
    /// Streamable HTTP. Header values may name environment variables as
    /// `${NAME}`, so that tokens stay out of this file.
    Http {
        url: String,
        headers: std::collections::BTreeMap<String, String>,
    },
}

/// An MCP server whose tools tollgate serves, priced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    pub name: String,
    pub transport: UpstreamTransport,
    /// Put before each of its tools' names, to keep upstreams apart.
    pub prefix: Option<String>,
    pub unpriced: Unpriced,
    /// A call that takes longer is abandoned (and cancelled upstream), and
    /// charges nothing.
    pub timeout: Duration,
}

/// The HTTP service (`tollgate serve --http`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    pub listen: String,
    /// `Host` values `/mcp` accepts (DNS-rebinding protection). Loopback only
    /// by default.
    pub allowed_hosts: Vec<String>,
    /// Browser origins allowed on `/mcp` and the checkout page, besides the
    /// server's own.
    pub allowed_origins: Vec<String>,
    /// Let `/mcp` be called without an API key (as an anonymous caller).
    /// `/v1` always needs a key.
    pub anonymous_mcp: bool,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    /// Per API key, per minute.
    pub sessions_create_per_minute: u32,
    pub sessions_read_per_minute: u32,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            allowed_hosts: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            allowed_origins: Vec::new(),
            anonymous_mcp: false,
            max_body_bytes: 64 * 1024,
            request_timeout: Duration::from_secs(30),
            sessions_create_per_minute: 100,
            sessions_read_per_minute: 1000,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ToolPrice {
    pub name: String,
    pub price: Tariff,
    /// Who earns the tool's charges, and the fees on them: `[fees]`, with
    /// the tool's own overrides.
    pub terms: Terms,
    pub mode: Option<Mode>,
    pub tags: Vec<String>,
    /// 1-based line of the entry's `name`, for later errors.
    pub line: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from (for error messages), or `<builtin>`.
    pub source: String,
    pub server_name: String,
    pub mode: Mode,
    pub currency: Currency,
    pub payment_ttl: Duration,
    /// `[server] approval_threshold` and the `[[approvals]]` rules.
    pub approvals: ApprovalRules,
    /// The longest message a stdio client may send (`[server]
    /// max_message_bytes`); longer ones are refused unread.
    pub max_message_bytes: usize,
    /// The most payments a principal (or an anonymous MCP session) may have
    /// waiting at once (`[server] max_open_intents`).
    pub max_open_intents: u32,
    /// The most payments anonymous callers may have waiting at once, all
    /// together (`[server] max_open_anonymous_intents`): each MCP session
    /// has its own `max_open_intents`, and sessions cost nothing to open.
    pub max_open_anonymous_intents: u32,
    /// How long an instance counts as alive after its last heartbeat
    /// (`[server] instance_lease`). Once it lapses, other instances release
    /// its holds and refund its interrupted runs (src/gate/recovery.rs).
    pub instance_lease: Duration,
    /// How long stored results, and unpaid intents that ended, are kept
    /// (`[server] keep_results`) before pruning.
    pub keep_results: Duration,
    pub store_url: String,
    pub synchronous: Synchronous,
    /// Connection pool of a PostgreSQL store.
    pub pool: PoolSettings,
    pub provider: ProviderKind,
    /// Where payment URLs point; unset, the HTTP service's own address.
    pub checkout_base_url: Option<String>,
    /// The checkout page may settle a session without any wallet (for
    /// development with the local provider).
    pub dev_settle: bool,
    pub http: HttpConfig,
    pub receipt_key_file: Option<PathBuf>,
    pub timeouts: Timeouts,
    pub upstreams: Vec<UpstreamConfig>,
    /// Whether the `tollgate` binary serves its demo tools (`[server]
    /// demo_tools`): by default only when there are no upstreams, so that a
    /// gateway serves its upstreams' tools and nothing else.
    pub demo_tools: bool,
    pub tools: Vec<ToolPrice>,
    /// The terms of tools `[[tools]]` does not list (an upstream's
    /// `unpriced` price): the server's beneficiary and `[fees]`.
    pub terms: Terms,
}

/// How long the interactive modes wait. rmcp puts no time limit on a
/// server-to-client request, so every one of ours has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    /// How long an `elicitation/create` may wait for the person's answer.
    pub elicitation: Duration,
    /// After an "accept", how long the gate polls the provider for the payment.
    pub payment_check: Duration,
    /// How long a progress-mode call waits for the payment.
    pub progress: Duration,
    /// How often a waiting progress-mode call reports.
    pub progress_heartbeat: Duration,
    /// How long a write after a tool has run (the charge, a paid run's
    /// result) keeps trying while the store is unreachable, before the call
    /// is answered without its result.
    pub record: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            elicitation: Duration::from_secs(120),
            payment_check: Duration::from_secs(10),
            progress: Duration::from_secs(600),
            progress_heartbeat: Duration::from_secs(5),
            record: Duration::from_secs(20),
        }
    }
}

// ---- raw TOML shape ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: RawServer,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    provider: RawProvider,
    #[serde(default)]
    receipts: RawReceipts,
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    http: RawHttp,
    #[serde(default)]
    fees: RawFees,
    #[serde(default)]
    upstreams: Vec<RawUpstream>,
    #[serde(default)]
    tools: Vec<RawTool>,
    #[serde(default)]
    approvals: Vec<RawApproval>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApproval {
    #[serde(default)]
    principal: Option<Spanned<String>>,
    #[serde(default)]
    tool: Option<Spanned<String>>,
    #[serde(default)]
    tag: Option<Spanned<String>>,
    threshold: Spanned<String>,
}

/// Fees on every tool's charges, unless the tool states its own.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFees {
    platform_share: Option<Spanned<String>>,
    commission_in: Option<Spanned<String>>,
    commission_out: Option<Spanned<String>>,
    platform_account: Option<Spanned<String>>,
    commission_account: Option<Spanned<String>>,
    rounding_account: Option<Spanned<String>>,
}

/// A metered price: `price = { base, per_unit, unit_size, argument | usage, max }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetered {
    #[serde(default)]
    base: Option<String>,
    per_unit: String,
    #[serde(default)]
    unit_size: Option<u64>,
    #[serde(default)]
    argument: Option<String>,
    #[serde(default)]
    usage: Option<String>,
    max: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    elicitation: Option<Spanned<String>>,
    payment_check: Option<Spanned<String>>,
    progress: Option<Spanned<String>>,
    progress_heartbeat: Option<Spanned<String>>,
    record: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    name: Spanned<String>,
    #[serde(default)]
    mode: Option<Spanned<String>>,
    currency: Spanned<String>,
    #[serde(default)]
    payment_ttl: Option<Spanned<String>>,
    #[serde(default)]
    approval_threshold: Option<Spanned<String>>,
    /// Whose revenue account tool charges go to (default: the server name).
    #[serde(default)]
    beneficiary: Option<Spanned<String>>,
    /// The longest message a stdio client may send, in bytes.
    #[serde(default)]
    max_message_bytes: Option<Spanned<usize>>,
    /// The most payments a principal may have waiting at once.
    #[serde(default)]
    max_open_intents: Option<Spanned<u32>>,
    /// The most payments anonymous callers may have waiting, together.
    #[serde(default)]
    max_open_anonymous_intents: Option<Spanned<u32>>,
    #[serde(default)]
    instance_lease: Option<Spanned<String>>,
    #[serde(default)]
    keep_results: Option<Spanned<String>>,
    /// Serve the built-in demo tools (default: only without `[[upstreams]]`).
    #[serde(default)]
    demo_tools: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStore {
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    synchronous: Synchronous,
    #[serde(default)]
    max_connections: Option<Spanned<u32>>,
    #[serde(default)]
    connect_timeout: Option<Spanned<String>>,
    #[serde(default)]
    statement_timeout: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    #[serde(default)]
    kind: Option<Spanned<String>>,
    #[serde(default)]
    checkout_base_url: Option<String>,
    #[serde(default)]
    dev_settle: bool,
    #[serde(default)]
    url: Option<Spanned<String>>,
    #[serde(default)]
    api_key_env: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    name: Spanned<String>,
    #[serde(default)]
    command: Option<Vec<String>>,
    #[serde(default)]
    env: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    cwd: Option<PathBuf>,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    /// `true` for `<name>_`, or the prefix itself.
    #[serde(default)]
    prefix: Option<toml::Value>,
    #[serde(default)]
    unpriced: Option<Spanned<String>>,
    #[serde(default)]
    timeout: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    listen: Option<String>,
    allowed_hosts: Option<Spanned<Vec<String>>>,
    allowed_origins: Option<Vec<String>>,
    #[serde(default)]
    anonymous_mcp: bool,
    max_body_bytes: Option<Spanned<usize>>,
    request_timeout: Option<Spanned<String>>,
    sessions_create_per_minute: Option<Spanned<u32>>,
    sessions_read_per_minute: Option<Spanned<u32>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawReceipts {
    #[serde(default)]
    key_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTool {
    name: Spanned<String>,
    price: Spanned<toml::Value>,
    #[serde(default)]
    mode: Option<Spanned<String>>,
    #[serde(default)]
    beneficiary: Option<Spanned<String>>,
    #[serde(default)]
    platform_share: Option<Spanned<String>>,
    #[serde(default)]
    commission_in: Option<Spanned<String>>,
    #[serde(default)]
    commission_out: Option<Spanned<String>>,
    /// Labels approval rules can match (`[[approvals]] tag = ...`).
    #[serde(default)]
    tags: Vec<String>,
}

pub const DEFAULT_STORE_URL: &str = "sqlite://tollgate.db";

impl Config {
    /// Reads and validates a file. Relative SQLite paths are resolved against
    /// the file's directory so the server finds its database whatever the
    /// working directory (Claude Desktop starts servers in `/`).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            location: String::new(),
            message: format!("cannot read: {e}"),
        })?;
        let mut config = Self::parse(&text, &file)?;
        if let Some(dir) = path.parent() {
            config.store_url = resolve_sqlite_path(&config.store_url, dir);
            // The receipt key too: one key whatever the working directory
            // (receipts verify, withheld calls' notes are found again).
            if let Some(key) = &config.receipt_key_file
                && key.is_relative()
            {
                config.receipt_key_file = Some(dir.join(key));
            }
        }
        Ok(config)
    }

    pub fn parse(text: &str, file: &str) -> Result<Self, ConfigError> {
        let err = |span: Option<std::ops::Range<usize>>, message: String| ConfigError {
            file: file.to_owned(),
            location: span
                .map(|s| format!(":{}", line_of(text, s.start)))
                .unwrap_or_default(),
            message,
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            err(
                e.span(),
                e.message().trim_end().replace('\n', " ").to_string(),
            )
        })?;

        let mode = match &raw.server.mode {
            None => Mode::Auto,
            Some(m) => {
                parse_mode(m).map_err(|msg| err(Some(m.span()), format!("server.mode: {msg}")))?
            }
        };
        let currency = Currency::parse(raw.server.currency.get_ref()).map_err(|e| {
            err(
                Some(raw.server.currency.span()),
                format!("server.currency: {e}"),
            )
        })?;
        let duration = |field: &str, value: &Option<Spanned<String>>, default: Duration| match value
        {
            None => Ok(default),
            Some(s) => match humantime::parse_duration(s.get_ref()) {
                Ok(d) if d.is_zero() => {
                    Err(err(Some(s.span()), format!("{field}: must be above zero")))
                }
                // Times are kept as milliseconds in an i64: far beyond
                // this, a deadline would wrap into the past.
                Ok(d) if d > LONGEST_DURATION => Err(err(
                    Some(s.span()),
                    format!("{field}: must be at most 3650 days"),
                )),
                Ok(d) => Ok(d),
                Err(e) => Err(err(
                    Some(s.span()),
                    format!(
                        "{field}: `{}` is not a duration like \"15m\" ({e})",
                        s.get_ref()
                    ),
                )),
            },
        };
        let payment_ttl = duration(
            "server.payment_ttl",
            &raw.server.payment_ttl,
            Duration::from_secs(15 * 60),
        )?;
        let instance_lease = duration(
            "server.instance_lease",
            &raw.server.instance_lease,
            Duration::from_secs(30),
        )?;
        if instance_lease < Duration::from_secs(1) {
            // Renewed every third of it: much shorter and one slow write
            // lets it lapse, and other instances release its live holds.
            return Err(err(
                raw.server.instance_lease.as_ref().map(|s| s.span()),
                "server.instance_lease: must be at least 1s".into(),
            ));
        }
        let keep_results = duration(
            "server.keep_results",
            &raw.server.keep_results,
            Duration::from_secs(7 * 24 * 3600),
        )?;
        let defaults = Timeouts::default();
        let t = &raw.timeouts;
        let timeouts = Timeouts {
            elicitation: duration("timeouts.elicitation", &t.elicitation, defaults.elicitation)?,
            payment_check: duration(
                "timeouts.payment_check",
                &t.payment_check,
                defaults.payment_check,
            )?,
            progress: duration("timeouts.progress", &t.progress, defaults.progress)?,
            progress_heartbeat: duration(
                "timeouts.progress_heartbeat",
                &t.progress_heartbeat,
                defaults.progress_heartbeat,
            )?,
            record: duration("timeouts.record", &t.record, defaults.record)?,
        };
        let pool_defaults = PoolSettings::default();
        let s = &raw.store;
        let pool = PoolSettings {
            max_connections: match &s.max_connections {
                None => pool_defaults.max_connections,
                Some(n) if *n.get_ref() == 0 => {
                    return Err(err(
                        Some(n.span()),
                        "store.max_connections: must be at least 1".into(),
                    ));
                }
                Some(n) => *n.get_ref(),
            },
            connect_timeout: duration(
                "store.connect_timeout",
                &s.connect_timeout,
                pool_defaults.connect_timeout,
            )?,
            statement_timeout: duration(
                "store.statement_timeout",
                &s.statement_timeout,
                pool_defaults.statement_timeout,
            )?,
        };
        // PostgreSQL takes it in milliseconds, as a 32-bit integer: past
        // that, every connection would fail, with the database's word for it.
        if let Some(s) = &s.statement_timeout
            && pool.statement_timeout.as_millis() > i32::MAX as u128
        {
            return Err(err(
                Some(s.span()),
                "store.statement_timeout: must be at most 24 days (PostgreSQL's limit)".into(),
            ));
        }
        let approval_threshold = match &raw.server.approval_threshold {
            // 500 of the currency's minor units: 5.00 USD, 500 JPY, 0.500
            // KWD. (It was 5 in any currency: 5 yen would send almost
            // every call to a person, 5 dinars pass about $16 unasked.)
            None => from_minor_units(DEFAULT_APPROVAL_MINOR_UNITS, &currency)
                .map_err(|e| err(None, format!("server.approval_threshold: {e}")))?,
            Some(s) => Units::parse(s.get_ref())
                .map_err(|e| err(Some(s.span()), format!("server.approval_threshold: {e}")))?,
        };
        let provider = match &raw.provider.kind {
            None => ProviderKind::Local,
            Some(k) if k.get_ref() == "local" => ProviderKind::Local,
            Some(k) if k.get_ref() == "mock" => ProviderKind::Mock,
            Some(k) if k.get_ref() == "sessions_api" => ProviderKind::SessionsApi {
                url: raw
                    .provider
                    .url
                    .as_ref()
                    .map(|u| u.get_ref().clone())
                    .ok_or_else(|| {
                        err(
                            Some(k.span()),
                            "provider.url: the sessions_api provider needs a url".into(),
                        )
                    })?,
                api_key_env: raw
                    .provider
                    .api_key_env
                    .as_ref()
                    .map_or_else(|| "TOLLGATE_PROVIDER_KEY".into(), |k| k.get_ref().clone()),
            },
            Some(k) => {
                return Err(err(
                    Some(k.span()),
                    format!(
                        "provider.kind: unknown provider `{}` (expected: local, mock, sessions_api)",
                        k.get_ref()
                    ),
                ));
            }
        };
        // Its payments go out in whole minor units.
        let through_sessions_api = matches!(provider, ProviderKind::SessionsApi { .. });
        // Settings of another kind of provider are a mistake to point out:
        // a `url` without `kind = "sessions_api"` would take payments here.
        if !through_sessions_api {
            for (field, set) in [
                ("url", &raw.provider.url),
                ("api_key_env", &raw.provider.api_key_env),
            ] {
                if let Some(set) = set {
                    return Err(err(
                        Some(set.span()),
                        format!(
                            "provider.{field}: only the sessions_api provider takes it; set \
                             provider.kind = \"sessions_api\" to take payments through another \
                             tollgate, or remove it"
                        ),
                    ));
                }
            }
        }
        // A message size limit: at least 1 KiB.
        let byte_limit = |field: &str, value: &Option<Spanned<usize>>, default: usize| match value {
            None => Ok(default),
            Some(n) if *n.get_ref() >= 1024 => Ok(*n.get_ref()),
            Some(n) => Err(err(
                Some(n.span()),
                format!("{field}: {} is below the least, 1024", n.get_ref()),
            )),
        };
        let defaults = HttpConfig::default();
        let h = &raw.http;
        let per_minute = |field: &str, value: &Option<Spanned<u32>>, default: u32| match value {
            None => Ok(default),
            Some(v) if *v.get_ref() > 0 => Ok(*v.get_ref()),
            Some(v) => Err(err(Some(v.span()), format!("{field}: must be above zero"))),
        };
        // An empty list would let rmcp accept every Host: the DNS-rebinding
        // check gone without anyone asking for it.
        if let Some(hosts) = h.allowed_hosts.as_ref().filter(|h| h.get_ref().is_empty()) {
            return Err(err(
                Some(hosts.span()),
                "http.allowed_hosts: cannot be empty (list the names clients use to reach the server)"
                    .into(),
            ));
        }
        let http = HttpConfig {
            listen: h.listen.clone().unwrap_or(defaults.listen),
            allowed_hosts: h
                .allowed_hosts
                .as_ref()
                .map_or(defaults.allowed_hosts, |hosts| hosts.get_ref().clone()),
            allowed_origins: h.allowed_origins.clone().unwrap_or_default(),
            anonymous_mcp: h.anonymous_mcp,
            max_body_bytes: byte_limit(
                "http.max_body_bytes",
                &h.max_body_bytes,
                defaults.max_body_bytes,
            )?,
            request_timeout: duration(
                "http.request_timeout",
                &h.request_timeout,
                defaults.request_timeout,
            )?,
            sessions_create_per_minute: per_minute(
                "http.sessions_create_per_minute",
                &h.sessions_create_per_minute,
                defaults.sessions_create_per_minute,
            )?,
            sessions_read_per_minute: per_minute(
                "http.sessions_read_per_minute",
                &h.sessions_read_per_minute,
                defaults.sessions_read_per_minute,
            )?,
        };

        let mut upstreams = Vec::with_capacity(raw.upstreams.len());
        for (i, u) in raw.upstreams.iter().enumerate() {
            let name = u.name.get_ref().trim().to_owned();
            let here = Some(u.name.span());
            let field = |f: &str| format!("upstreams[{i}].{f} of `{name}`");
            if name.is_empty() || upstreams.iter().any(|x: &UpstreamConfig| x.name == name) {
                return Err(err(
                    here,
                    format!("upstreams[{i}].name: empty or duplicate upstream `{name}`"),
                ));
            }
            let transport = match (&u.command, &u.url) {
                (Some(command), None) if !command.is_empty() => UpstreamTransport::Stdio {
                    command: command.clone(),
                    env: u.env.clone(),
                    cwd: u.cwd.clone(),
                },
                (None, Some(url)) => UpstreamTransport::Http {
                    url: url.clone(),
                    headers: u.headers.clone(),
                },
                _ => {
                    return Err(err(
                        here,
                        format!(
                            "{}: give either `command` (argv) or `url`",
                            field("command")
                        ),
                    ));
                }
            };
            let prefix = match &u.prefix {
                None | Some(toml::Value::Boolean(false)) => None,
                Some(toml::Value::Boolean(true)) => Some(format!("{name}_")),
                Some(toml::Value::String(p)) => Some(p.clone()),
                Some(_) => {
                    return Err(err(
                        here,
                        format!("{}: true, false or a string", field("prefix")),
                    ));
                }
            };
            let unpriced = match &u.unpriced {
                None => Unpriced::Free,
                Some(s) if s.get_ref() == "free" => Unpriced::Free,
                Some(s) if s.get_ref() == "hidden" => Unpriced::Hidden,
                Some(s) => Unpriced::Price(
                    Units::parse(s.get_ref())
                        .map_err(|e| format!("free, hidden, or a price ({e})"))
                        .and_then(|amount| whole_flat_price(amount, &currency))
                        .map_err(|message| {
                            err(Some(s.span()), format!("{}: {message}", field("unpriced")))
                        })?,
                ),
            };
            upstreams.push(UpstreamConfig {
                transport,
                prefix,
                unpriced,
                timeout: duration(&field("timeout"), &u.timeout, Duration::from_secs(60))?,
                name,
            });
        }

        let server_terms =
            server_terms(&raw, &currency).map_err(|(span, message)| err(span, message))?;
        // An upstream's unpriced tools are charged on the server's terms.
        for (i, upstream) in upstreams.iter().enumerate() {
            if let Unpriced::Price(amount) = upstream.unpriced {
                fees_fit_price(&server_terms, &Tariff::Flat(amount), &currency).map_err(
                    |message| {
                        let span = raw.upstreams[i].unpriced.as_ref().map(Spanned::span);
                        err(span, format!("upstreams[{i}].unpriced: {message}"))
                    },
                )?;
            }
        }
        let mut tools = Vec::with_capacity(raw.tools.len());
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (i, t) in raw.tools.iter().enumerate() {
            let field = |f: &str| format!("tools[{i}].{f}");
            let name = t.name.get_ref().trim().to_owned();
            let line = line_of(text, t.name.span().start);
            if name.is_empty() {
                return Err(err(
                    Some(t.name.span()),
                    format!("{}: must not be empty", field("name")),
                ));
            }
            if let Some(first) = seen.insert(name.clone(), line) {
                return Err(err(
                    Some(t.name.span()),
                    format!(
                        "{}: duplicate tool `{name}` (first priced on line {first})",
                        field("name")
                    ),
                ));
            }
            let price = parse_tariff(t.price.get_ref())
                .and_then(|price| match price {
                    Tariff::Flat(amount) => whole_flat_price(amount, &currency).map(Tariff::Flat),
                    Tariff::Metered(metered) if through_sessions_api => {
                        whole_metered_price(&metered, &currency).map(|()| Tariff::Metered(metered))
                    }
                    metered => Ok(metered),
                })
                .map_err(|message| {
                    err(
                        Some(t.price.span()),
                        format!("{} of `{name}`: {message}", field("price")),
                    )
                })?;
            let fee = |f: &str, own: &Option<Spanned<String>>, default: Option<Fee>| match own {
                None => Ok(default),
                Some(text) => Fee::parse(text.get_ref(), &currency)
                    .map(Some)
                    .map_err(|e| err(Some(text.span()), format!("{} of `{name}`: {e}", field(f)))),
            };
            let terms = Terms {
                beneficiary: match &t.beneficiary {
                    None => server_terms.beneficiary.clone(),
                    Some(b) => account_name(b.get_ref()).map_err(|message| {
                        err(
                            Some(b.span()),
                            format!("{} of `{name}`: {message}", field("beneficiary")),
                        )
                    })?,
                },
                platform_share: fee(
                    "platform_share",
                    &t.platform_share,
                    server_terms.platform_share,
                )?,
                commission_in: fee(
                    "commission_in",
                    &t.commission_in,
                    server_terms.commission_in,
                )?,
                commission_out: fee(
                    "commission_out",
                    &t.commission_out,
                    server_terms.commission_out,
                )?,
                accounts: server_terms.accounts.clone(),
            };
            check_terms(&terms)
                .and_then(|()| fees_fit_price(&terms, &price, &currency))
                .map_err(|message| {
                    err(
                        Some(t.name.span()),
                        format!("{} `{name}`: {message}", field("name")),
                    )
                })?;
            let mode = match &t.mode {
                None => None,
                Some(m) => Some(parse_mode(m).map_err(|msg| {
                    err(
                        Some(m.span()),
                        format!("{} of `{name}`: {msg}", field("mode")),
                    )
                })?),
            };
            tools.push(ToolPrice {
                name,
                price,
                terms,
                mode,
                tags: t.tags.clone(),
                line: Some(line),
            });
        }
        let mut rules = Vec::new();
        for (i, a) in raw.approvals.iter().enumerate() {
            let name = format!("approvals[{i}]");
            let threshold = Units::parse(a.threshold.get_ref())
                .map_err(|e| err(Some(a.threshold.span()), format!("{name}.threshold: {e}")))?;
            if let Some(tag) = &a.tag
                && !tools.iter().any(|t| t.tags.contains(tag.get_ref()))
            {
                return Err(err(
                    Some(tag.span()),
                    format!(
                        "{name}.tag: no tool in [[tools]] has the tag `{}`",
                        tag.get_ref()
                    ),
                ));
            }
            // An upstream that prices the tools [[tools]] leaves out may
            // serve the tool named: only the catalog would know.
            let priced_by_default = upstreams
                .iter()
                .any(|u: &UpstreamConfig| matches!(u.unpriced, Unpriced::Price(_)));
            if let Some(tool) = &a.tool
                && !priced_by_default
                && !tools.iter().any(|t| &t.name == tool.get_ref())
            {
                return Err(err(
                    Some(tool.span()),
                    format!(
                        "{name}.tool: `{}` is not a priced tool in [[tools]]",
                        tool.get_ref()
                    ),
                ));
            }
            // Principals are trimmed as they are taken: `" alice"` would
            // match nobody.
            let principal = match &a.principal {
                Some(p) if p.get_ref().trim().is_empty() => {
                    return Err(err(
                        Some(p.span()),
                        format!("{name}.principal: cannot be empty"),
                    ));
                }
                principal => principal.as_ref().map(|p| p.get_ref().trim().to_owned()),
            };
            rules.push(ApprovalRule {
                principal,
                tool: a.tool.as_ref().map(|t| t.get_ref().clone()),
                tag: a.tag.as_ref().map(|t| t.get_ref().clone()),
                threshold,
                name,
                line: Some(line_of(
                    text,
                    a.tool.as_ref().unwrap_or(&a.threshold).span().start,
                )),
            });
        }
        let approvals = ApprovalRules {
            default: approval_threshold,
            rules,
        };
        let max_message_bytes = byte_limit(
            "server.max_message_bytes",
            &raw.server.max_message_bytes,
            1024 * 1024,
        )?;
        // A cap of payments waiting: at least one.
        let cap = |value: &Option<Spanned<u32>>, default: u32, field: &str| match value {
            None => Ok(default),
            Some(n) if *n.get_ref() == 0 => Err(err(
                Some(n.span()),
                format!("server.{field}: must be at least 1"),
            )),
            Some(n) => Ok(*n.get_ref()),
        };
        let max_open_intents = cap(&raw.server.max_open_intents, 100, "max_open_intents")?;
        let max_open_anonymous_intents = cap(
            &raw.server.max_open_anonymous_intents,
            1_000,
            "max_open_anonymous_intents",
        )?;

        Ok(Config {
            source: file.to_owned(),
            server_name: raw.server.name.get_ref().trim().to_owned(),
            mode,
            currency,
            payment_ttl,
            approvals,
            max_message_bytes,
            max_open_intents,
            max_open_anonymous_intents,
            instance_lease,
            keep_results,
            store_url: raw
                .store
                .url
                .unwrap_or_else(|| DEFAULT_STORE_URL.to_owned()),
            synchronous: raw.store.synchronous,
            pool,
            provider,
            checkout_base_url: raw
                .provider
                .checkout_base_url
                .map(|url| url.trim_end_matches('/').to_owned()),
            dev_settle: raw.provider.dev_settle,
            http,
            receipt_key_file: raw.receipts.key_file,
            timeouts,
            demo_tools: raw.server.demo_tools.unwrap_or(upstreams.is_empty()),
            upstreams,
            tools,
            terms: server_terms,
        })
    }

    /// The base of payment URLs (`<base>/checkout/<id>`).
    pub fn checkout_base_url(&self) -> String {
        self.checkout_base_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.http.listen))
    }

    /// An error about the whole configuration (the tools it serves).
    pub fn error(&self, message: String) -> ConfigError {
        self.error_at(None, message)
    }

    /// An error about one priced tool, pointing at its entry.
    pub fn tool_error(&self, tool: &ToolPrice, message: String) -> ConfigError {
        self.error_at(tool.line, message)
    }

    /// An error found after parsing (when the catalog is built), pointing
    /// at `line` of the file when it is known.
    pub fn error_at(&self, line: Option<usize>, message: String) -> ConfigError {
        ConfigError {
            file: self.source.clone(),
            location: line.map(|l| format!(":{l}")).unwrap_or_default(),
            message,
        }
    }
}

/// A price: a decimal string, or a metered price's table.
fn parse_tariff(value: &toml::Value) -> Result<Tariff, String> {
    let table = match value {
        toml::Value::String(s) => {
            return Units::parse(s).map(Tariff::Flat).map_err(|e| e.to_string());
        }
        toml::Value::Table(table) => table,
        other => {
            return Err(format!(
                "write the price as a quoted decimal string such as \"0.05\", or a metered price's table, not {other}"
            ));
        }
    };
    let raw: RawMetered = toml::Value::Table(table.clone())
        .try_into()
        .map_err(|e: toml::de::Error| e.message().trim_end().replace('\n', " "))?;
    let amount = |field: &str, text: &str| Units::parse(text).map_err(|e| format!("{field}: {e}"));
    let measure = match (raw.argument, raw.usage.as_deref()) {
        (Some(argument), None) if !argument.trim().is_empty() => Measure::Argument(argument),
        (None, Some("reported")) => Measure::Reported,
        (None, Some(other)) => {
            return Err(format!(
                "usage: `{other}` is not known (expected \"reported\")"
            ));
        }
        _ => {
            return Err(
                "a metered price counts units of one `argument`, or `usage = \"reported\"` by the tool: give exactly one".into(),
            );
        }
    };
    let metered = Metered {
        base: amount("base", raw.base.as_deref().unwrap_or("0"))?,
        per_unit: amount("per_unit", &raw.per_unit)?,
        unit_size: match raw.unit_size {
            Some(0) => return Err("unit_size: must be at least 1".into()),
            size => size.unwrap_or(1),
        },
        measure,
        max: amount("max", &raw.max)?,
    };
    if metered.max.is_zero() || metered.max < metered.base {
        return Err("max: must be above zero and at least the base".into());
    }
    Ok(Tariff::Metered(metered))
}

/// The server's beneficiary and `[fees]`: every tool's defaults.
fn server_terms(
    raw: &RawConfig,
    currency: &Currency,
) -> Result<Terms, (Option<std::ops::Range<usize>>, String)> {
    let fees = &raw.fees;
    let fee = |f: &str, text: &Option<Spanned<String>>| match text {
        None => Ok(None),
        Some(text) => Fee::parse(text.get_ref(), currency)
            .map(Some)
            .map_err(|e| (Some(text.span()), format!("fees.{f}: {e}"))),
    };
    let defaults = FeeAccounts::default();
    // `field` is the full name, `server.beneficiary` or `fees.…`.
    let account = |field: &str, given: &Spanned<String>| {
        account_name(given.get_ref()).map_err(|e| (Some(given.span()), format!("{field}: {e}")))
    };
    let name = |field: &str, given: &Option<Spanned<String>>, default: String| match given {
        None => Ok(default),
        Some(given) => account(field, given),
    };
    let terms = Terms {
        // The server's name earns by default: then it must make an account name.
        beneficiary: match &raw.server.beneficiary {
            Some(given) => account("server.beneficiary", given)?,
            None => account("server.name", &raw.server.name)?,
        },
        platform_share: fee("platform_share", &fees.platform_share)?,
        commission_in: fee("commission_in", &fees.commission_in)?,
        commission_out: fee("commission_out", &fees.commission_out)?,
        accounts: FeeAccounts {
            platform: name(
                "fees.platform_account",
                &fees.platform_account,
                defaults.platform,
            )?,
            commissions: name(
                "fees.commission_account",
                &fees.commission_account,
                defaults.commissions,
            )?,
            rounding: name(
                "fees.rounding_account",
                &fees.rounding_account,
                defaults.rounding,
            )?,
        },
    };
    check_terms(&terms).map_err(|e| (None, format!("fees: {e}")))?;
    Ok(terms)
}

/// A flat price in whole minor units of `currency` (cents for USD): the
/// legs of a split are whole minor units, so a finer one would go, in part
/// or whole, to the rounding account rather than to its author, and a
/// provider that takes minor units could never be paid it. (A metered price
/// may charge finer amounts; its rounding is the formula's.)
fn whole_flat_price(amount: Units, currency: &Currency) -> Result<Units, String> {
    to_minor_units(amount, currency)
        .map(|_| amount)
        .map_err(|e| format!("{e}: a flat price is whole minor units"))
}

/// A metered price paid through a sessions API, whose payments go out in
/// minor units: its base, per-unit price and maximum must be whole ones, so
/// that what a call is asked for up front is. (A remote would refuse every
/// slow-path payment of a finer one.)
fn whole_metered_price(metered: &Metered, currency: &Currency) -> Result<(), String> {
    for (part, amount) in [
        ("base", metered.base),
        ("per_unit", metered.per_unit),
        ("max", metered.max),
    ] {
        to_minor_units(amount, currency).map_err(|e| {
            format!("{part}: {e}: payments through the sessions_api provider are whole minor units")
        })?;
    }
    Ok(())
}

/// A price with its outgoing commission must be an amount the ledger can
/// hold. And fixed fees taken from a flat price's author share must fit in
/// it: they are cut to what is there (`terms.rs`), silently. The author's
/// share is what the percentage shares leave of the price.
fn fees_fit_price(terms: &Terms, price: &Tariff, currency: &Currency) -> Result<(), String> {
    // What the payer pays at most must be a number the ledger can hold:
    // past it, the hold would wrap round to a negative amount.
    let most = match price {
        Tariff::Flat(amount) => *amount,
        Tariff::Metered(m) => m.max,
    };
    if (most.0)
        .checked_add(terms.commission_out(most, currency).0)
        .is_none()
    {
        return Err(format!(
            "its price {} with its commission_out is more than an amount can be",
            format_in(most, currency)
        ));
    }
    // A free tool is not charged, so nothing is taken from it.
    let &Tariff::Flat(amount) = price else {
        return Ok(());
    };
    if amount.0 == 0 {
        return Ok(());
    }
    let fixed = |fee: &Option<Fee>| match fee {
        Some(Fee::Fixed(units)) => units.0,
        _ => 0,
    };
    // Saturating: two huge fees must not wrap round to a small sum and pass.
    let taken = fixed(&terms.platform_share).saturating_add(fixed(&terms.commission_in));
    let mut shares_only = terms.clone();
    for fee in [
        &mut shares_only.platform_share,
        &mut shares_only.commission_in,
    ] {
        if matches!(fee, Some(Fee::Fixed(_))) {
            *fee = None;
        }
    }
    let author: i64 = (shares_only.split(amount, currency).legs.iter())
        .filter(|(role, ..)| *role == Role::Author)
        .map(|(.., units)| units.0)
        .sum();
    if taken > author {
        let left = if author == amount.0 {
            String::new()
        } else {
            format!(
                " (its percentage shares leave {} of it to the author)",
                format_in(Units(author), currency)
            )
        };
        return Err(format!(
            "its fixed platform_share and commission_in come to {}, more than its price {}{left}",
            format_in(Units(taken), currency),
            format_in(amount, currency)
        ));
    }
    Ok(())
}

/// Fees that leave the author something, and a beneficiary that is not one
/// of the fee accounts (its statement would mix in the fees).
fn check_terms(terms: &Terms) -> Result<(), String> {
    terms.check().map_err(|e| e.to_string())?;
    let accounts = &terms.accounts;
    if [
        &accounts.platform,
        &accounts.commissions,
        &accounts.rounding,
    ]
    .contains(&&terms.beneficiary)
    {
        return Err(format!(
            "beneficiary `{}` is also a fee account; name it apart",
            terms.beneficiary
        ));
    }
    Ok(())
}

fn account_name(name: &str) -> Result<String, String> {
    let name = name.trim();
    if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
        return Err(format!("`{name}` is not an account name"));
    }
    Ok(name.to_owned())
}

fn parse_mode(m: &Spanned<String>) -> Result<Mode, String> {
    m.get_ref().parse()
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

fn resolve_sqlite_path(url: &str, base: &Path) -> String {
    let Some(path) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    else {
        return url.to_owned();
    };
    let (path, query) = path
        .split_once('?')
        .map_or((path, None), |(p, q)| (p, Some(q)));
    if path.is_empty() || path == ":memory:" || Path::new(path).is_absolute() {
        return url.to_owned();
    }
    let joined = base.join(path);
    match query {
        Some(q) => format!("sqlite://{}?{q}", joined.display()),
        None => format!("sqlite://{}", joined.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[server]
name = "t"
mode = "two_step"
currency = "usd"
payment_ttl = "10m"
approval_threshold = "5.00"

[[tools]]
name = "echo"
price = "0.01"

[[tools]]
name = "divide"
price = "0.05"
mode = "resubmit"
"#;

    #[test]
    fn parses_a_good_file() {
        let c = Config::parse(GOOD, "p.toml").unwrap();
        assert_eq!(c.mode, Mode::TwoStep);
        assert_eq!(c.currency.as_str(), "USD");
        assert_eq!(c.payment_ttl, Duration::from_secs(600));
        assert_eq!(c.tools[1].price, Tariff::Flat(Units(50_000)));
        assert_eq!(c.tools[1].terms, Terms::plain("t"));
        assert_eq!(c.tools[1].mode, Some(Mode::Resubmit));
        assert_eq!(c.store_url, DEFAULT_STORE_URL);
    }

    fn error_for(tool_line: &str) -> String {
        let text = format!(
            "[server]\nname = \"t\"\ncurrency = \"USD\"\n\n[[tools]]\nname = \"echo\"\n{tool_line}\n"
        );
        Config::parse(&text, "p.toml").unwrap_err().to_string()
    }

    #[test]
    fn bad_prices_name_field_and_line() {
        let e = error_for("price = \"-0.01\"");
        assert!(e.starts_with("p.toml:7: tools[0].price of `echo`"), "{e}");
        assert!(e.contains("negative"), "{e}");
        assert!(error_for("price = \"NaN\"").contains("not a decimal"));
        assert!(error_for("price = \"ten\"").contains("not a decimal"));
        assert!(error_for("price = 0.1").contains("quoted decimal string"));
        assert!(error_for("price = { per_unit = \"0.01\", max = \"1\" }").contains("exactly one"));
        assert!(
            error_for("price = { per_unit = \"0.01\", usage = \"reported\", max = \"0\" }")
                .contains("max: must be above zero")
        );
        assert!(
            error_for("price = { per_unit = \"x\", usage = \"reported\", max = \"1\" }")
                .starts_with("p.toml:7: tools[0].price of `echo`: per_unit: `x` is not a decimal")
        );
        assert!(error_for("price = \"0.0000001\"").contains("decimal places"));
    }

    /// Without `approval_threshold`, the threshold is 500 of the currency's
    /// minor units. (It was 5 in any currency: 5 yen, or 5 dinars.)
    #[test]
    fn the_default_approval_threshold_follows_the_currency() {
        for (currency, threshold) in [("USD", "5.00"), ("JPY", "500"), ("KWD", "0.500")] {
            let text = format!(
                "[server]\nname = \"t\"\ncurrency = \"{currency}\"\n\n[[tools]]\nname = \"echo\"\nprice = \"1\"\n"
            );
            let config = Config::parse(&text, "p.toml").unwrap();
            assert_eq!(
                config.approvals.default,
                Units::parse(threshold).unwrap(),
                "{currency}"
            );
        }
    }

    /// A flat price finer than the currency's minor unit would go, in part
    /// or whole, to the rounding account, and fixed fees above a flat price
    /// would leave its author nothing: both refused, naming the field. (Both
    /// were taken.)
    #[test]
    fn a_flat_price_is_whole_minor_units_and_holds_its_fixed_fees() {
        let e = error_for("price = \"0.015\"");
        assert!(e.starts_with("p.toml:7: tools[0].price of `echo`"), "{e}");
        assert!(e.contains("a flat price is whole minor units"), "{e}");
        assert!(error_for("price = \"0.009\"").contains("minor unit"));
        let yen = "[server]\nname = \"t\"\ncurrency = \"JPY\"\n\n[[tools]]\nname = \"echo\"\nprice = \"0.5\"\n";
        assert!(
            Config::parse(yen, "p.toml")
                .unwrap_err()
                .to_string()
                .contains("minor unit")
        );
        assert!(Config::parse(&yen.replace("0.5", "5"), "p.toml").is_ok());
        // A metered price may charge finer amounts.
        let metered = "price = { per_unit = \"0.0001\", usage = \"reported\", max = \"0.015\" }";
        let text = format!(
            "[server]\nname = \"t\"\ncurrency = \"USD\"\n\n[[tools]]\nname = \"echo\"\n{metered}\n"
        );
        assert!(Config::parse(&text, "p.toml").is_ok());
        // Unless it is paid through a sessions API, which takes minor
        // units: every slow-path payment of it would be refused there.
        let remote = text.replace(
            "[[tools]]",
            "[provider]\nkind = \"sessions_api\"\nurl = \"http://127.0.0.1:1\"\n\n[[tools]]",
        );
        let e = Config::parse(&remote, "p.toml").unwrap_err().to_string();
        assert!(
            e.contains("tools[0].price of `echo`: per_unit: 0.0001 USD")
                && e.contains("payments through the sessions_api provider are whole minor units"),
            "{e}"
        );
        assert!(
            Config::parse(
                &remote.replace("0.015", "0.02").replace("0.0001", "0.01"),
                "p.toml"
            )
            .is_ok()
        );

        // Two fees too large to add up are refused, not wrapped round.
        let e = error_for(
            "price = \"1.00\"\nplatform_share = \"5000000000000\"\ncommission_in = \"5000000000000\"",
        );
        assert!(e.contains("more than its price 1.00"), "{e}");
        let e = error_for("price = \"0.01\"\nplatform_share = \"0.02\"");
        assert!(
            e.contains(
                "fixed platform_share and commission_in come to 0.02, more than its price 0.01"
            ),
            "{e}"
        );
        assert!(
            error_for("price = \"0.01\"\nplatform_share = \"0.01\"\ncommission_in = \"0.01\"")
                .contains("come to 0.02")
        );
        let fits = "[server]\nname = \"t\"\ncurrency = \"USD\"\n\n[[tools]]\nname = \"echo\"\nprice = \"0.05\"\nplatform_share = \"0.02\"\n";
        assert!(Config::parse(fits, "p.toml").is_ok());
        // A price the payer could not pay with its commission: its hold
        // would have wrapped round to a negative amount.
        let e = error_for("price = \"9000000000000\"\ncommission_out = \"300000000000\"");
        assert!(
            e.contains("with its commission_out is more than an amount can be"),
            "{e}"
        );
        // A fixed fee comes out of what the percentage shares leave: 80% of
        // 0.10 leaves 0.02, too little for a 0.05 commission, which would be
        // cut to 0.02 on every call. (It was accepted.)
        let e = error_for("price = \"0.10\"\nplatform_share = \"80%\"\ncommission_in = \"0.05\"");
        assert!(
            e.contains("come to 0.05, more than its price 0.10 (its percentage shares leave 0.02 of it to the author)"),
            "{e}"
        );
        assert!(
            Config::parse(
                &fits.replace(
                    "platform_share = \"0.02\"",
                    "platform_share = \"60%\"\ncommission_in = \"0.02\""
                ),
                "p.toml"
            )
            .is_ok()
        );

        let upstream = "[server]\nname = \"t\"\ncurrency = \"USD\"\n\n[[upstreams]]\nname = \"u\"\nurl = \"http://127.0.0.1:1/mcp\"\nunpriced = \"0.005\"\n";
        let e = Config::parse(upstream, "p.toml").unwrap_err().to_string();
        assert!(
            e.contains("upstreams[0].unpriced") && e.contains("minor unit"),
            "{e}"
        );
        // An upstream's unpriced tools are charged on the server's fees.
        let fees = "\n[fees]\nplatform_share = \"0.02\"\n";
        let e = Config::parse(
            &format!("{}{fees}", upstream.replace("0.005", "0.01")),
            "p.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("p.toml:8: upstreams[0].unpriced: its fixed platform_share"),
            "{e}"
        );
        // A free tool is charged nothing, so the server's fees take nothing.
        let free = format!(
            "[server]\nname = \"t\"\ncurrency = \"USD\"\n\n[[tools]]\nname = \"echo\"\nprice = \"0\"\n{fees}"
        );
        assert!(Config::parse(&free, "p.toml").is_ok());
    }

    /// Settings that would misbehave at run time are refused at start: a
    /// duration whose deadline would wrap past i64 milliseconds, a lease
    /// too short to be renewed in time, an approval rule for a tool that
    /// is not priced (it would never apply).
    #[test]
    fn durations_leases_and_approval_tools_are_bounded() {
        let with = |server: &str, rest: &str| {
            let text = format!(
                "[server]\nname = \"t\"\ncurrency = \"USD\"\n{server}\n\n\
                 [[tools]]\nname = \"echo\"\nprice = \"0.01\"\n{rest}"
            );
            Config::parse(&text, "p.toml")
                .map(drop)
                .map_err(|e| e.to_string())
        };
        let e = with("payment_ttl = \"300000000000h\"", "").unwrap_err();
        assert!(
            e.starts_with("p.toml:4: server.payment_ttl: must be at most 3650 days"),
            "{e}"
        );
        assert!(with("payment_ttl = \"3650days\"", "").is_ok());
        let e = with("instance_lease = \"200ms\"", "").unwrap_err();
        assert!(
            e.starts_with("p.toml:4: server.instance_lease: must be at least 1s"),
            "{e}"
        );
        assert!(with("instance_lease = \"1s\"", "").is_ok());
        let e = with("max_message_bytes = 100", "").unwrap_err();
        assert!(
            e.starts_with("p.toml:4: server.max_message_bytes: 100 is below the least, 1024"),
            "{e}"
        );
        for cap in ["max_open_intents", "max_open_anonymous_intents"] {
            let e = with(&format!("{cap} = 0"), "").unwrap_err();
            assert!(
                e.starts_with(&format!("p.toml:4: server.{cap}: must be at least 1")),
                "{e}"
            );
            assert!(with(&format!("{cap} = 1"), "").is_ok());
        }
        let rule = |tool: &str| format!("\n[[approvals]]\ntool = \"{tool}\"\nthreshold = \"1\"\n");
        let e = with("", &rule("eccho")).unwrap_err();
        assert!(
            e.contains("approvals[0].tool: `eccho` is not a priced tool in [[tools]]"),
            "{e}"
        );
        assert!(with("", &rule("echo")).is_ok());
        // An upstream that prices its unlisted tools may serve the one named.
        let upstream = "\n[[upstreams]]\nname = \"u\"\nurl = \"http://127.0.0.1:1/mcp\"\nunpriced = \"0.02\"\n";
        assert!(with("", &format!("{}{upstream}", rule("u_search"))).is_ok());
        let e = with("", "\n[http]\nmax_body_bytes = 0\n").unwrap_err();
        assert!(
            e.starts_with("p.toml:11: http.max_body_bytes: 0 is below the least, 1024"),
            "{e}"
        );
        // PostgreSQL's limit on a statement timeout (about 24.8 days).
        let e = with("", "\n[store]\nstatement_timeout = \"30days\"\n").unwrap_err();
        assert!(
            e.contains("store.statement_timeout: must be at most 24 days"),
            "{e}"
        );
        assert!(with("", "\n[store]\nstatement_timeout = \"24days\"\n").is_ok());
        // A sessions_api setting without its kind would take payments here.
        let e = with("", "\n[provider]\nurl = \"https://pay.example.com\"\n").unwrap_err();
        assert!(
            e.starts_with("p.toml:11: provider.url: only the sessions_api provider takes it"),
            "{e}"
        );
        let e = with("", "\n[provider]\nkind = \"local\"\napi_key_env = \"K\"\n").unwrap_err();
        assert!(
            e.contains("provider.api_key_env: only the sessions_api"),
            "{e}"
        );
        let remote = "\n[provider]\nkind = \"sessions_api\"\nurl = \"https://pay.example.com\"\n";
        assert!(with("", remote).is_ok());
    }

    #[test]
    fn names_that_would_match_nothing_are_trimmed_or_refused() {
        let parse = |text: &str| Config::parse(text, "p.toml").map_err(|e| e.to_string());
        let base = "[server]\nname = \"t\"\ncurrency = \"USD\"\n\n[[tools]]\nname = \"echo\"\nprice = \"0.01\"\n";
        let rule = |principal: &str| {
            format!("{base}\n[[approvals]]\nprincipal = \"{principal}\"\nthreshold = \"0\"\n")
        };
        let config = parse(&rule(" alice ")).unwrap();
        assert_eq!(
            config.approvals.rules[0].principal.as_deref(),
            Some("alice")
        );
        let e = parse(&rule("  ")).unwrap_err();
        assert!(
            e.starts_with("p.toml:10: approvals[0].principal: cannot be empty"),
            "{e}"
        );
        // The server's name is the default beneficiary's account.
        let e = parse(&base.replace("name = \"t\"", "name = \" \"")).unwrap_err();
        assert!(e.starts_with("p.toml:2: server.name: "), "{e}");
        let e = parse(&format!("{base}\n[fees]\nplatform_account = \" \"\n")).unwrap_err();
        assert!(e.starts_with("p.toml:10: fees.platform_account: "), "{e}");
        // Trimmed once, for both: one revenue account, whatever path earns.
        let config = parse(&base.replace("name = \"t\"", "name = \" demo \"")).unwrap();
        assert_eq!(
            (
                config.server_name.as_str(),
                config.terms.beneficiary.as_str()
            ),
            ("demo", "demo")
        );
        let e = parse(&format!("{base}\n[http]\nallowed_hosts = []\n")).unwrap_err();
        assert!(
            e.starts_with("p.toml:10: http.allowed_hosts: cannot be empty"),
            "{e}"
        );
    }

    #[test]
    fn unknown_mode_and_duplicates() {
        let e = error_for("price = \"1\"\nmode = \"barter\"");
        assert!(
            e.starts_with("p.toml:8: tools[0].mode of `echo`: unknown mode `barter`"),
            "{e}"
        );
        let text = "[server]\nname = \"t\"\ncurrency = \"USD\"\n[[tools]]\nname = \"echo\"\nprice = \"1\"\n[[tools]]\nname = \"echo\"\nprice = \"2\"\n";
        let e = Config::parse(text, "p.toml").unwrap_err().to_string();
        assert!(
            e.contains("p.toml:8: tools[1].name: duplicate tool `echo` (first priced on line 5)"),
            "{e}"
        );
    }

    #[test]
    fn syntax_and_unknown_fields() {
        let e = Config::parse(
            "[server]\nname = \"t\"\ncurrency = \"USD\"\nfoo = 1\n",
            "p.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("p.toml:4") && e.contains("foo"), "{e}");
        let e = Config::parse("[server]\nname = \"t\"\n", "p.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("currency"), "{e}");
        let e = Config::parse(
            "[server]\nname=\"t\"\ncurrency=\"USD\"\npayment_ttl=\"soon\"\n",
            "p.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("p.toml:4: server.payment_ttl"), "{e}");
    }

    #[test]
    fn fees_and_metered_prices() {
        let text = r#"
[server]
name = "t"
currency = "USD"
beneficiary = "acme"

[fees]
platform_share = "10%"
commission_out = "0.01"

[[tools]]
name = "echo"
price = { base = "0.01", per_unit = "0.002", unit_size = 1000, argument = "text", max = "0.10" }
beneficiary = "alice"
commission_in = "2.5%"

[[tools]]
name = "divide"
price = "0.05"
platform_share = "0.02"
"#;
        let c = Config::parse(text, "p.toml").unwrap();
        let usd = Currency::parse("USD").unwrap();
        let echo = &c.tools[0];
        assert_eq!(echo.terms.beneficiary, "alice");
        assert_eq!(
            echo.terms.platform_share,
            Some(Fee::parse("10%", &usd).unwrap())
        );
        assert_eq!(
            echo.terms.commission_in,
            Some(Fee::parse("2.5%", &usd).unwrap())
        );
        assert_eq!(
            echo.terms.commission_out,
            Some(Fee::parse("0.01", &usd).unwrap())
        );
        assert!(matches!(&echo.price, Tariff::Metered(m) if m.unit_size == 1000));
        let divide = &c.tools[1];
        assert_eq!(divide.terms.beneficiary, "acme");
        assert_eq!(divide.terms.platform_share, Some(Fee::Fixed(Units(20_000))));

        let e = error_for("price = \"1\"\nplatform_share = \"60%\"\ncommission_in = \"50%\"");
        assert!(e.contains("p.toml:6: tools[0].name `echo`: the platform share and incoming commission add up to 110%"), "{e}");
        let e = error_for("price = \"1\"\ncommission_out = \"0.001\"");
        assert!(
            e.starts_with("p.toml:8: tools[0].commission_out of `echo`"),
            "{e}"
        );
        assert!(e.contains("minor unit"), "{e}");
        let e = error_for("price = \"1\"\nbeneficiary = \"platform\"");
        assert!(e.contains("also a fee account"), "{e}");
    }

    #[test]
    fn a_relative_receipt_key_follows_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pricing.toml");
        let text =
            "[server]\nname = \"t\"\ncurrency = \"USD\"\n\n[receipts]\nkey_file = \"keys/r.key\"\n";
        std::fs::write(&path, text).unwrap();
        let config = Config::load(&path).unwrap();
        assert_eq!(config.receipt_key_file, Some(dir.path().join("keys/r.key")));
    }

    #[test]
    fn relative_sqlite_paths_follow_the_file() {
        assert_eq!(
            resolve_sqlite_path("sqlite://t.db", Path::new("/etc/x")),
            "sqlite:///etc/x/t.db"
        );
        assert_eq!(
            resolve_sqlite_path("sqlite:///abs.db", Path::new("/etc/x")),
            "sqlite:///abs.db"
        );
        assert_eq!(
            resolve_sqlite_path("postgres://h/db", Path::new("/etc/x")),
            "postgres://h/db"
        );
    }
}
