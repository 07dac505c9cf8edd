//! The durable store: ledger, holds, intents, local payment sessions and
//! stored results. The gate talks to [`Store`] only, so another backend
//! (PostgreSQL) slots in behind the same trait. Every method is one
//! transaction; several server processes may share one store.

mod fast_path;
mod portable;
mod postgres;
mod posting;
mod rows;
mod sql;
mod sqlite;
mod verify;

use std::fmt;

use async_trait::async_trait;

use crate::{
    allowance::{Breach, Limits, Spent},
    keys::{ApiKey, Scope},
    money::{Currency, Units, format_in},
    terms::{Role, Split},
};
pub use postgres::PgStore;
pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or failed: nothing was changed.
    #[error("payment system unavailable: {0}")]
    Unavailable(#[from] sqlx::Error),
    #[error("migrations failed: {0}")]
    Migrate(sqlx::migrate::MigrateError),
    /// The database has a migration this build does not know: a newer
    /// tollgate has written it, in a shape this one may misread.
    #[error(
        "this database was written by a newer tollgate: its migration {0} is unknown to this \
         one, which cannot use it safely. Run that tollgate (or a newer one), or restore a \
         backup from before the upgrade"
    )]
    WrittenByNewer(i64),
    #[error("{0} not found")]
    NotFound(String),
    #[error(
        "insufficient funds in wallet `{wallet}`: available {available} {currency}, needed {needed} {currency}"
    )]
    InsufficientFunds {
        wallet: String,
        currency: Currency,
        available: String,
        needed: String,
    },
    #[error("{what} is {status}, not {expected}")]
    WrongState {
        what: String,
        status: String,
        expected: &'static str,
    },
    #[error("invalid input: {0}")]
    Invalid(String),
    /// A wallet's spending limit refused the payment.
    #[error("limit exceeded: {0}")]
    OverLimit(Box<Breach>),
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// A SQLite file with tables, none of them tollgate's.
    #[error(
        "`{0}` is another program's SQLite database (it has tables, and none of them is \
         tollgate's): give tollgate a database file of its own, new or made by tollgate"
    )]
    AnotherPrograms(String),
    /// Each of the store's connections would open a database of its own.
    #[error(
        "`{0}` is an in-memory SQLite database, which tollgate cannot use: give the path of a \
         database file instead (for instance sqlite://tollgate.db)"
    )]
    InMemory(String),
}

impl StoreError {
    /// A hold that is not open (`status`), or that does not exist.
    fn hold_not_open(hold_id: &str, status: Option<String>) -> Self {
        match status {
            None => Self::NotFound(format!("hold {hold_id}")),
            Some(status) => Self::WrongState {
                what: format!("hold {hold_id}"),
                status,
                expected: "open",
            },
        }
    }

    fn capture_above_hold(amount: Units, held: i64, currency: &Currency) -> Self {
        Self::Invalid(format!(
            "capture of {} is above the hold of {}",
            format_in(amount, currency),
            format_in(Units(held), currency)
        ))
    }

    fn intent_not_running(intent_id: &str) -> Self {
        Self::WrongState {
            what: format!("intent {intent_id}"),
            status: "not running".into(),
            expected: "running",
        }
    }

    fn session_not_pending(session_id: &str, status: String) -> Self {
        Self::WrongState {
            what: format!("payment session {session_id}"),
            status,
            expected: "pending",
        }
    }

    fn insufficient(wallet: &str, session: &LocalSession, available: i64) -> Self {
        Self::InsufficientFunds {
            wallet: wallet.to_owned(),
            currency: session.currency.clone(),
            available: format_in(Units(available), &session.currency),
            needed: format_in(session.amount, &session.currency),
        }
    }
}

/// A database a newer tollgate migrated is told apart from a failed migration.
impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        match e {
            sqlx::migrate::MigrateError::VersionMissing(version) => {
                StoreError::WrittenByNewer(version)
            }
            other => StoreError::Migrate(other),
        }
    }
}

/// A session ends (without payment) only as failed, expired or cancelled.
fn check_session_ending(to: SessionStatus) -> Result<(), StoreError> {
    if matches!(to, SessionStatus::Pending | SessionStatus::Paid) {
        return Err(StoreError::Invalid(format!(
            "a session cannot be ended as {}",
            to.as_str()
        )));
    }
    Ok(())
}

/// Unix time in milliseconds.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

/// A new random id with a readable prefix (`pay_…`). Payment ids are
/// fully random: they should not be guessable.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// A payment id: time-ordered (UUIDv7), so holds and intents grow at their
/// table's right edge, and with 74 random bits, so it cannot be guessed.
pub fn new_payment_id() -> String {
    format!("pay_{}", uuid::Uuid::now_v7().simple())
}

/// A ledger transaction id. Time-ordered (UUIDv7), so the ledger's tables
/// grow at their right edge instead of touching a random page per insert.
pub fn new_txn_id() -> String {
    format!("txn_{}", uuid::Uuid::now_v7().simple())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccountKind {
    /// A principal's prepaid credit.
    Wallet,
    /// What a tool author earns.
    Revenue,
    /// Money paid through a payment session, not yet earned by a tool run.
    Clearing,
    /// The outside world: top-ups and dev settlements come from here.
    External,
}

impl AccountKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AccountKind::Wallet => "wallet",
            AccountKind::Revenue => "revenue",
            AccountKind::Clearing => "clearing",
            AccountKind::External => "external",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Wallet, Self::Revenue, Self::Clearing, Self::External]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// Names a ledger account.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AccountRef {
    pub kind: AccountKind,
    pub name: String,
    pub currency: Currency,
}

impl AccountRef {
    pub fn new(kind: AccountKind, name: impl Into<String>, currency: &Currency) -> Self {
        Self {
            kind,
            name: name.into(),
            currency: currency.clone(),
        }
    }
    pub fn wallet(name: impl Into<String>, currency: &Currency) -> Self {
        Self::new(AccountKind::Wallet, name, currency)
    }
}

impl fmt::Display for AccountRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{} ({})",
            self.kind.as_str(),
            self.name,
            self.currency
        )
    }
}

/// Where a charge goes: what the payer pays, split into revenue accounts
/// (see [`crate::terms`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    /// The tool author's account; it names the capture's beneficiary even
    /// when fixed fees leave the author nothing.
    pub beneficiary: AccountRef,
    /// Non-zero legs; they sum to what the payer pays.
    pub legs: Vec<(Role, AccountRef, Units)>,
}

impl Charge {
    /// All of `amount` to `beneficiary`: a charge with no fees.
    pub fn whole(beneficiary: AccountRef, amount: Units) -> Self {
        let legs = if amount.is_zero() {
            Vec::new()
        } else {
            vec![(Role::Author, beneficiary.clone(), amount)]
        };
        Self { beneficiary, legs }
    }

    /// A split's legs as revenue accounts in `currency`.
    pub fn of(split: &Split, beneficiary: &str, currency: &Currency) -> Self {
        let revenue = |name: &str| AccountRef::new(AccountKind::Revenue, name, currency);
        Self {
            beneficiary: revenue(beneficiary),
            legs: split
                .legs
                .iter()
                .map(|(role, account, amount)| (*role, revenue(account), *amount))
                .collect(),
        }
    }

    /// What the payer pays.
    pub fn total(&self) -> Units {
        Units(self.legs.iter().map(|(_, _, amount)| amount.0).sum())
    }
}

/// Who made a call, besides the principal who pays: the agent (an explicit
/// agent id, or the MCP client's `clientInfo`) and the caller's metadata
/// (`_meta["tollgate/metadata"]`, a JSON object). Both travel from the call
/// to its ledger transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origin {
    pub agent: Option<String>,
    /// Compact JSON text.
    pub metadata: Option<String>,
}

impl Origin {
    /// The metadata as JSON, for receipts and replies.
    pub fn metadata_value(&self) -> Option<serde_json::Value> {
        self.metadata
            .as_deref()
            .and_then(|m| serde_json::from_str(m).ok())
    }
}

/// Where a charge stands with the person who approves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApprovalStatus {
    /// At or under its approval threshold: nobody was asked.
    AutoApproved,
    Waiting,
    Approved,
    Declined,
}

impl ApprovalStatus {
    pub const ALL: [ApprovalStatus; 4] = [
        Self::AutoApproved,
        Self::Waiting,
        Self::Approved,
        Self::Declined,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AutoApproved => "auto_approved",
            Self::Waiting => "waiting",
            Self::Approved => "approved",
            Self::Declined => "declined",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// An intent's approval: its status, who decided and when, and the rule
/// that set its threshold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approval {
    pub status: ApprovalStatus,
    pub by: Option<String>,
    pub at: Option<i64>,
    pub rule: Option<String>,
}

impl Approval {
    pub fn new(status: ApprovalStatus, rule: Option<String>) -> Self {
        Self {
            status,
            by: None,
            at: None,
            rule,
        }
    }
}

/// The audit data every money movement carries.
#[derive(Debug, Clone, Default)]
pub struct Audit {
    pub payer: Option<String>,
    pub beneficiary: Option<String>,
    pub tool: Option<String>,
    pub intent_id: Option<String>,
    pub payment_id: Option<String>,
    pub memo: Option<String>,
    pub origin: Origin,
    pub approval: Option<Approval>,
}

/// A posted ledger transaction.
#[derive(Debug, Clone)]
pub struct Posted {
    pub txn_id: String,
    pub at: i64,
}

/// A top-up's transaction, and whether an earlier one with its key made it.
#[derive(Debug, Clone)]
pub struct ToppedUp {
    pub posted: Posted,
    pub replayed: bool,
}

/// The transaction id of the top-up made with an idempotency key: the key
/// itself (hashed) is what makes it once, through the id's uniqueness.
pub fn topup_txn_id(idempotency_key: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(idempotency_key.as_bytes());
    format!("txn_topup_{}", hex::encode(&digest[..16]))
}

#[derive(Debug, Clone)]
pub struct WalletBalance {
    pub currency: Currency,
    pub balance: Units,
    pub held: Units,
    pub available: Units,
}

#[derive(Debug, Clone)]
pub struct StatementLine {
    pub txn_id: String,
    pub kind: String,
    pub at: i64,
    /// Signed micro-units: positive is money in.
    pub amount: i64,
    /// The entry's part in a split capture (`author`, `platform_share`, …).
    pub role: Option<String>,
    /// The capture's legs by role, when it was split: what the call was
    /// charged, and who got what.
    pub legs: Vec<(String, Units)>,
    /// When the legs were posted: the line's own time, except on a
    /// wallet's payment of a session, whose split its later settlement
    /// posted. A statement shows a split in the period it happened in.
    pub legs_at: Option<i64>,
    pub currency: Currency,
    pub tool: Option<String>,
    pub payment_id: Option<String>,
    pub beneficiary: Option<String>,
    pub memo: Option<String>,
    /// The account the line is on (export spans accounts).
    pub account: Option<(AccountKind, String)>,
    pub payer: Option<String>,
    pub intent_id: Option<String>,
    pub origin: Origin,
    pub approval: Option<Approval>,
}

/// A fast-path reservation request.
#[derive(Debug, Clone)]
pub struct HoldRequest {
    pub hold_id: String,
    pub principal: String,
    pub amount: Units,
    pub currency: Currency,
    pub tool: String,
    pub args_hash: String,
    pub expires_at: i64,
    pub origin: Origin,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldOutcome {
    Held,
    /// The wallet exists but cannot cover the amount, or does not exist.
    Insufficient,
    /// A spending limit of the wallet refuses it.
    OverLimit(Breach),
}

/// A wallet's limits in one currency, and what it has spent against them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalletLimits {
    pub currency: Currency,
    pub limits: Limits,
    pub spent: Spent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntentStatus {
    AwaitingPayment,
    /// Paid, not yet running. An intent passes through it inside the one
    /// write that claims its run ([`Store::claim_paid_intent`]); only an
    /// older tollgate, which marked and claimed in two writes, leaves
    /// intents here.
    Paid,
    Running,
    Succeeded,
    Failed,
    Expired,
    Cancelled,
    Declined,
}

impl IntentStatus {
    pub const ALL: [IntentStatus; 8] = [
        Self::AwaitingPayment,
        Self::Paid,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::Expired,
        Self::Cancelled,
        Self::Declined,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AwaitingPayment => "awaiting_payment",
            Self::Paid => "paid",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Expired => "expired",
            Self::Cancelled => "cancelled",
            Self::Declined => "declined",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// Payments waiting (intents awaiting payment, unexpired).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenIntents {
    /// The caller's: a principal's, or an anonymous MCP session's.
    pub caller: i64,
    /// All anonymous callers' (0 when the caller is a principal).
    pub anonymous: i64,
}

impl OpenIntents {
    /// Whether one more would pass `limit` (the caller's, or, for an
    /// anonymous caller, anonymous callers' together).
    pub fn at(&self, limit: &OpenLimit) -> bool {
        self.caller >= limit.per_caller || self.anonymous >= limit.anonymous
    }
}

/// How many payments may be waiting at once when an intent opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenLimit {
    /// Per principal, or per MCP session of anonymous callers.
    pub per_caller: i64,
    /// Anonymous callers' intents, all together.
    pub anonymous: i64,
}

impl OpenLimit {
    /// No limit (tests, and tools that open intents for a person).
    pub const NONE: OpenLimit = OpenLimit {
        per_caller: i64::MAX,
        anonymous: i64::MAX,
    };
}

#[derive(Debug, Clone)]
pub struct Intent {
    pub id: String,
    pub tool: String,
    pub args_hash: String,
    pub args_json: String,
    pub amount: Units,
    pub currency: Currency,
    pub principal: Option<String>,
    /// The MCP session that opened the intent (dynamic confirm tools are
    /// visible to it alone).
    pub session_id: Option<String>,
    /// The payment mode it was opened in, or, for a charge above its
    /// threshold, [`APPROVAL_MODE`], [`APPROVAL_BY_URL_MODE`] or
    /// [`APPROVAL_BY_FORM_MODE`].
    pub mode: String,
    pub status: IntentStatus,
    pub provider: String,
    pub provider_session_id: Option<String>,
    pub payment_url: Option<String>,
    pub created_at: i64,
    pub expires_at: i64,
    pub origin: Origin,
    /// `None` for intents made before approvals were recorded.
    pub approval: Option<Approval>,
}

/// The mode of an intent asking a person to approve a charge at the
/// checkout page, its caller told so in its tool's own mode (and, before
/// [`APPROVAL_BY_URL_MODE`], through a URL prompt too).
pub const APPROVAL_MODE: &str = "approval";
/// The mode of an approval whose client was asked by a URL prompt: it may
/// send its answer back (as a 2026-07-28 answer), but never a yes.
pub const APPROVAL_BY_URL_MODE: &str = "approval_by_url";
/// The mode of an approval whose client was asked by a form: the only
/// approval whose yes a client may send back (as a 2026-07-28 answer).
pub const APPROVAL_BY_FORM_MODE: &str = "approval_by_form";

impl Intent {
    /// Whether it asks for an approval rather than a payment.
    pub fn is_approval(&self) -> bool {
        matches!(
            self.mode.as_str(),
            APPROVAL_MODE | APPROVAL_BY_URL_MODE | APPROVAL_BY_FORM_MODE
        )
    }

    /// Whether its client was asked by an elicitation prompt, and so may
    /// answer it.
    pub fn was_elicited(&self) -> bool {
        self.mode == crate::config::Mode::Elicitation.as_str()
            || matches!(
                self.mode.as_str(),
                APPROVAL_BY_URL_MODE | APPROVAL_BY_FORM_MODE
            )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionStatus {
    Pending,
    Paid,
    Failed,
    Expired,
    Cancelled,
}

impl SessionStatus {
    pub const ALL: [SessionStatus; 5] = [
        Self::Pending,
        Self::Paid,
        Self::Failed,
        Self::Expired,
        Self::Cancelled,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Paid => "paid",
            Self::Failed => "failed",
            Self::Expired => "expired",
            Self::Cancelled => "cancelled",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// A payment session of the local provider.
#[derive(Debug, Clone)]
pub struct LocalSession {
    pub id: String,
    pub amount: Units,
    pub currency: Currency,
    pub description: String,
    pub status: SessionStatus,
    pub created_at: i64,
    pub expires_at: i64,
    pub paid_from: Option<AccountRef>,
    /// The principal whose API key created it through the sessions API.
    pub owner: Option<String>,
}

/// A hold or an intent the expiry sweep ended: its id, tool and principal.
pub(crate) type Swept = (String, String, Option<String>);

/// Logs what a sweep ended, one line each, so that a call's payment id
/// leads to its end in the log: a hold whose call never finished (given
/// back), an intent never paid.
pub(crate) fn log_swept(holds: &[Swept], intents: &[Swept]) {
    for (payment_id, tool, principal) in holds {
        tracing::warn!(
            payment_id,
            tool,
            principal,
            "a fast-path hold expired, its call never finished: given back, nothing charged"
        );
    }
    for (payment_id, tool, principal) in intents {
        tracing::info!(
            payment_id,
            tool,
            principal,
            "a payment expired unpaid: nothing charged"
        );
    }
}

/// A fast-path call's hold, as `tollgate payment show` reads it.
#[derive(Debug, Clone)]
pub struct HoldRecord {
    pub id: String,
    pub wallet: String,
    pub currency: Currency,
    pub amount: Units,
    /// `open`, `captured`, `released` or `expired`.
    pub status: String,
    pub captured: Option<Units>,
    pub principal: String,
    pub tool: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub settled_at: Option<i64>,
}

/// Where the money of a paid session is, as the gate marks its intent paid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Funding {
    /// Already in clearing: the local provider posted it when the session
    /// was paid. A refund goes back to `refund_to`.
    InClearing { refund_to: Option<AccountRef> },
    /// Paid outside this ledger (a remote provider). Marking the intent paid
    /// posts it from this external account into clearing, and a refund goes
    /// back there.
    External { account: String },
}

impl Funding {
    /// Who approved a charge by paying it.
    pub fn approver(&self) -> String {
        match self {
            Funding::InClearing {
                refund_to: Some(account),
            } => format!("{}:{}", account.kind.as_str(), account.name),
            Funding::InClearing { refund_to: None } => "dev-settlement".into(),
            Funding::External { account } => account.clone(),
        }
    }
}

/// How an intent's one run ended.
#[derive(Debug, Clone)]
pub struct IntentOutcome {
    pub intent_id: String,
    pub succeeded: bool,
    pub result_json: String,
    /// What a successful run is charged, and where it goes: at most what
    /// the intent was paid. The rest goes back to the payer.
    pub charge: Charge,
    /// Id and time of the ledger transaction to post, chosen by the caller so
    /// that the stored result can already carry its receipt.
    pub txn_id: String,
    pub at: i64,
    /// Why its tool did not run (or may not have finished), when that is
    /// so: the refund's ledger line says it, rather than "tool failed".
    pub not_run: Option<String>,
}

impl IntentOutcome {
    /// Whether the run earns its charge. A failed run, or one its metered
    /// price charges nothing, is refunded whole.
    pub fn earns(&self) -> bool {
        self.succeeded && !self.charge.total().is_zero()
    }
}

#[derive(Debug, Clone)]
pub struct StoredResult {
    pub is_error: bool,
    pub result_json: String,
}

/// `tollgate refund`: give back some or all of a captured payment.
#[derive(Debug, Clone)]
pub struct RefundRequest {
    pub payment_id: String,
    /// `None`: all that is left to refund.
    pub amount: Option<Units>,
    pub reason: String,
    /// A refund is made at most once per key; asking again answers with it.
    pub idempotency_key: String,
    /// The charge is taken back as if it was never made (a fast-path call
    /// answered without its result): the wallet's spending allowance comes
    /// back with the money, as a released hold's does. An operator's refund
    /// of a call that was delivered leaves the allowance used.
    pub restores_allowance: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refunded {
    pub txn_id: String,
    pub amount: Units,
    pub currency: Currency,
    /// What was captured, and what has been refunded of it, this included.
    pub captured: Units,
    pub refunded: Units,
    /// An earlier refund with the same idempotency key.
    pub replayed: bool,
}

/// How many unredeemed intents [`Store::unredeemed`] returns at a time.
pub const UNREDEEMED_PAGE: usize = 500;

/// Intents in a page of [`Store::remote_due`].
pub const REMOTE_DUE_PAGE: usize = 100;

/// The most approval decisions [`Store::approvals`] returns (the newest).
pub const APPROVALS_LISTED: usize = 500;

/// Where a page of intents, in (expires_at, id) order, ended: the next
/// page starts after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub expires_at: i64,
    pub id: String,
}

impl Cursor {
    /// Before every intent.
    pub fn start() -> Self {
        Self {
            expires_at: i64::MIN,
            id: String::new(),
        }
    }

    /// Just after `intent`.
    pub fn after(intent: &Intent) -> Self {
        Self {
            expires_at: intent.expires_at,
            id: intent.id.clone(),
        }
    }
}

/// What one pruning pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub results: u64,
    pub intents: u64,
    pub sessions: u64,
    pub holds: u64,
}

/// What `/metrics` reports from the store.
#[derive(Debug, Clone, Default)]
pub struct StoreStats {
    pub open_holds: i64,
    /// Results kept for replay (pruned after `[server] keep_results`).
    pub stored_results: i64,
    /// Intents per status.
    pub intents: Vec<(String, i64)>,
    /// Captured revenue per tool and currency, in micro-units.
    pub revenue: Vec<(String, String, i64)>,
}

/// What `ledger verify` found. Empty `problems` means the ledger is sound.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    pub transactions: i64,
    pub accounts: i64,
    pub open_holds: i64,
    pub problems: Vec<String>,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    // ---- ledger ----
    /// Credits a wallet from the outside world.
    async fn topup(
        &self,
        wallet: &AccountRef,
        amount: Units,
        memo: Option<String>,
    ) -> Result<Posted, StoreError> {
        Ok(self
            .topup_with_key(wallet, amount, memo, None)
            .await?
            .posted)
    }
    /// Credits a wallet, at most once per idempotency key when one is
    /// given: the same key again (a retry after a lost answer) for the same
    /// wallet and amount posts nothing and answers with the first top-up,
    /// `replayed`; for another wallet or amount it is refused.
    async fn topup_with_key(
        &self,
        wallet: &AccountRef,
        amount: Units,
        memo: Option<String>,
        idempotency_key: Option<&str>,
    ) -> Result<ToppedUp, StoreError>;
    async fn balances(&self, wallet: &str) -> Result<Vec<WalletBalance>, StoreError>;
    /// One account's entries, oldest first, in every currency.
    async fn statement(
        &self,
        kind: AccountKind,
        name: &str,
    ) -> Result<Vec<StatementLine>, StoreError>;
    /// One line per transaction of a tool that moved revenue: what the tool
    /// earned (all revenue legs together), refunds negative.
    async fn tool_statement(&self, tool: &str) -> Result<Vec<StatementLine>, StoreError>;
    /// Up to `limit` ledger entries after entry `after` (0: from the
    /// start), oldest first, each with its id (the next page's `after`), its
    /// transaction's audit data and its account; only `account`'s when
    /// given. Export reads the ledger page by page, so that its memory does
    /// not grow with the ledger.
    async fn entries_page(
        &self,
        account: Option<(AccountKind, &str)>,
        after: i64,
        upto: i64,
        limit: i64,
    ) -> Result<Vec<(i64, StatementLine)>, StoreError>;
    /// The highest entry id with every entry up to it committed: the end of
    /// what an export can read without missing one still being written. On
    /// PostgreSQL ids are drawn as rows are inserted, and a transaction may
    /// commit after one that drew a later id.
    async fn entries_settled_upto(&self) -> Result<i64, StoreError>;
    /// Intents of a principal that needed a person's approval (or were
    /// auto-approved on the slow path), newest first.
    async fn approvals(&self, principal: &str) -> Result<Vec<Intent>, StoreError>;
    /// How many intents are awaiting payment, unexpired, for a principal
    /// (or, for anonymous callers, `principal` `None`, from one MCP session,
    /// and from all anonymous callers).
    async fn open_intents(
        &self,
        principal: Option<&str>,
        session_id: &str,
        now: i64,
    ) -> Result<OpenIntents, StoreError>;
    /// Replaces a wallet's limits in the wallet's currency (creating the
    /// wallet if new). Its spending counters are kept.
    async fn set_limits(&self, wallet: &AccountRef, limits: &Limits) -> Result<(), StoreError>;
    async fn limits(&self, wallet: &str) -> Result<Vec<WalletLimits>, StoreError>;
    /// Reserves funds if, and only if, the wallet's available balance covers
    /// them; the check and the reservation are one step.
    async fn hold(&self, req: &HoldRequest) -> Result<HoldOutcome, StoreError>;
    /// Ends an open hold by charging at most its amount to `beneficiary`.
    /// The transaction's audit data (payer, tool, payment id) is the hold's.
    /// A hold already captured for the same amount and beneficiary answers
    /// with that capture, so a capture whose answer was lost may be retried.
    /// The charge's legs are posted in the capture's one transaction.
    async fn capture(&self, hold_id: &str, charge: &Charge) -> Result<Posted, StoreError>;
    async fn release(&self, hold_id: &str) -> Result<(), StoreError>;
    /// Refunds a captured payment (fast path or paid intent) to whoever
    /// paid, taking back from each leg of the capture its share, in one
    /// transaction. Never more in all than was captured.
    async fn refund(&self, request: &RefundRequest) -> Result<Refunded, StoreError>;
    /// Expires open holds and awaiting intents past their time. Returns how
    /// many holds were expired.
    async fn sweep_expired(&self, now: i64) -> Result<u64, StoreError>;
    async fn verify(&self, now: i64) -> Result<VerifyReport, StoreError>;

    // ---- intents ----
    /// Opens `intent` unless its caller is at `limit`; false if refused.
    async fn create_intent(&self, intent: &Intent, limit: &OpenLimit) -> Result<bool, StoreError>;
    async fn intent(&self, id: &str) -> Result<Option<Intent>, StoreError>;
    /// Moves an intent from `from` to `to`; false if it was elsewhere.
    async fn transition_intent(
        &self,
        id: &str,
        from: IntentStatus,
        to: IntentStatus,
    ) -> Result<bool, StoreError>;
    /// awaiting_payment → `to` (expired, declined, cancelled); false if the
    /// intent had moved on, or if its local payment session was paid (the
    /// caller looks again, and finds it paid).
    async fn end_unpaid_intent(&self, id: &str, to: IntentStatus) -> Result<bool, StoreError>;
    /// awaiting_payment → running, claimed by this instance: the intent is
    /// paid and its one run is this caller's, in one transaction, with the
    /// money's arrival in clearing when it was paid outside the ledger, and
    /// where a refund would go. A waiting approval becomes approved by
    /// whoever paid, unless already decided. False if it was not awaiting.
    async fn claim_paid_intent(&self, id: &str, funding: &Funding) -> Result<bool, StoreError>;
    /// Records a person's decision on an intent whose approval is waiting;
    /// false if it was not waiting.
    async fn decide_approval(
        &self,
        id: &str,
        decision: ApprovalStatus,
        by: &str,
    ) -> Result<bool, StoreError>;
    /// Stores the one run's result and settles its money in one transaction:
    /// clearing → beneficiary on success, clearing → payer on failure.
    async fn finish_intent(&self, outcome: &IntentOutcome) -> Result<Option<Posted>, StoreError>;
    async fn stored_result(&self, intent_id: &str) -> Result<Option<StoredResult>, StoreError>;
    /// How much of payment `payment_id` was refunded by `tollgate refund`.
    async fn refunded(&self, payment_id: &str) -> Result<Units, StoreError>;
    /// A fast-path call's hold, by its id (the call's payment id).
    async fn hold_record(&self, id: &str) -> Result<Option<HoldRecord>, StoreError>;
    /// Every ledger entry of a payment: the transactions that name it as
    /// their payment or intent (charges, settlements, refunds).
    async fn payment_lines(&self, payment_id: &str) -> Result<Vec<StatementLine>, StoreError>;

    // ---- local provider's sessions ----
    async fn create_session(&self, session: &LocalSession) -> Result<(), StoreError>;
    async fn session(&self, id: &str) -> Result<Option<LocalSession>, StoreError>;
    async fn list_sessions(&self, limit: i64) -> Result<Vec<LocalSession>, StoreError>;
    /// Pays a pending session from a wallet, or from outside (`None`: dev
    /// settlement), moving the money into clearing.
    async fn pay_session(
        &self,
        id: &str,
        from_wallet: Option<&str>,
        now: i64,
    ) -> Result<Posted, StoreError>;
    /// pending → `to` (failed, expired or cancelled).
    async fn end_session(&self, id: &str, to: SessionStatus) -> Result<bool, StoreError>;

    // ---- crash recovery and upkeep ----
    /// Registers this process's instance (whose id the holds it opens and
    /// the paid intents it runs carry) as alive until `alive_until`, or renews it.
    /// Once its lease lapses (the process died), any instance recovers what
    /// it left: see the next two. PostgreSQL, shared by instances on several
    /// hosts, stamps and judges leases by its own clock (a lease of
    /// `alive_until - now` from its `now`), so host clocks need not agree for
    /// leases. (Expiry times, of holds and payments, are each host's.)
    async fn heartbeat(&self, now: i64, alive_until: i64) -> Result<(), StoreError>;
    /// Releases the open holds of instances not alive at `now` (their
    /// calls never finished, so nothing is charged). How many.
    async fn release_orphaned_holds(&self, now: i64) -> Result<u64, StoreError>;
    /// Paid intents left `running` by instances not alive at `now`. The
    /// gate settles each as failed (refunded); it never runs again.
    async fn interrupted_runs(&self, now: i64) -> Result<Vec<Intent>, StoreError>;
    /// This instance's paid intents left `running` since before `before`:
    /// the gate settles those it has no run under way for (see
    /// `gate::runs`).
    async fn own_stale_runs(&self, before: i64) -> Result<Vec<Intent>, StoreError>;
    /// Intents awaiting a remote provider's payment (one this ledger does
    /// not see) whose time ended before `now`, oldest first, a page of at
    /// most [`REMOTE_DUE_PAGE`] after `after`: the expiry sweep leaves them
    /// to the gate, which asks the provider.
    async fn remote_due(&self, now: i64, after: &Cursor) -> Result<Vec<Intent>, StoreError>;
    /// awaiting_payment → paid, for a payment made to a remote provider
    /// (`account`) in time but found after the intent's time ran out: the
    /// money enters clearing, and the intent is run when redeemed, or
    /// refunded if never used. False if it was not awaiting payment.
    async fn mark_paid_externally(&self, id: &str, account: &str) -> Result<bool, StoreError>;
    /// Intents paid but never redeemed whose time ended before `before`,
    /// oldest first, a page at a time: those after `after` (at most
    /// [`UNREDEEMED_PAGE`]; a shorter page is the last). The gate refunds them.
    async fn unredeemed(&self, before: i64, after: &Cursor) -> Result<Vec<Intent>, StoreError>;
    /// Deletes what is kept only for a while, older than `before`: stored
    /// results, unpaid intents that ended and their sessions, and holds
    /// that ended without moving money. Never the ledger.
    async fn prune(&self, before: i64) -> Result<Pruned, StoreError>;

    // ---- API keys and health ----
    async fn create_api_key(&self, key: &ApiKey) -> Result<(), StoreError>;
    async fn api_key(&self, id: &str) -> Result<Option<ApiKey>, StoreError>;
    async fn api_keys(&self) -> Result<Vec<ApiKey>, StoreError>;
    /// Revokes a key; false if there is no such live key.
    async fn revoke_api_key(&self, id: &str, now: i64) -> Result<bool, StoreError>;
    /// A cheap round trip, for `/healthz`.
    async fn ping(&self) -> Result<(), StoreError>;
    async fn stats(&self) -> Result<StoreStats, StoreError>;
}

/// A local session as it stands now. A pending session past its time is
/// expired first (whoever asks: the gate, the API, the checkout page), then
/// read back, since it may have been paid in the meantime.
pub async fn current_session(
    store: &dyn Store,
    id: &str,
) -> Result<Option<LocalSession>, StoreError> {
    let Some(session) = store.session(id).await? else {
        return Ok(None);
    };
    if session.status != SessionStatus::Pending || now_ms() <= session.expires_at {
        return Ok(Some(session));
    }
    store.end_session(id, SessionStatus::Expired).await?;
    store.session(id).await
}

/// Scopes as stored: space-separated names.
pub(crate) fn parse_scopes(text: &str) -> Result<Vec<Scope>, StoreError> {
    text.split_whitespace()
        .map(|s| s.parse().map_err(StoreError::Corrupt))
        .collect()
}

#[cfg(test)]
mod allowance_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod upgrade_tests;
