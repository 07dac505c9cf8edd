//! Payment providers: the side of an intent where a person (or a wallet)
//! actually pays. The gate only asks a provider to open a session, to say
//! its status, and to cancel it; it never takes the provider's or the
//! client's word for more than that.

pub mod local;
pub mod sessions_api;

use async_trait::async_trait;

use crate::{
    money::{Currency, Units},
    store::{Funding, SessionStatus, StoreError},
};

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("payment provider unavailable: {0}")]
    Unavailable(String),
    #[error("payment session {0} not found")]
    NotFound(String),
    /// The provider answered, but not in a way that can be used (not its
    /// API's JSON, another session, an unknown status or currency): about
    /// one session, not a sign that the provider is down.
    #[error("the payment provider's answer cannot be used: {0}")]
    Unreadable(String),
    /// The provider will not take this request (say, an amount finer than
    /// the currency's minor unit).
    #[error("payment provider refused: {0}")]
    Refused(String),
    #[error("the payment provider cannot {0}")]
    Unsupported(&'static str),
    /// A session that cannot be cancelled at its provider and is still
    /// open there: a payment made there now still counts.
    #[error("{0}")]
    StillPayable(String),
    /// The payment was opened with a remote provider that `[provider]` no
    /// longer names: nobody here can ask it, so it is left as it is.
    #[error(
        "the payment was opened with provider `{0}`, which this tollgate no longer uses; \
         set [provider] back to it to settle the payment"
    )]
    NotConfigured(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the gate asks a provider to collect.
#[derive(Debug, Clone)]
pub struct SessionRequest {
    /// The intent's payment id; providers may use it as an idempotency key.
    pub payment_id: String,
    pub amount: Units,
    pub currency: Currency,
    pub description: String,
    pub expires_at: i64,
}

#[derive(Debug, Clone)]
pub struct ProviderSession {
    pub id: String,
    /// Where a person pays or approves.
    pub url: String,
}

#[derive(Debug, Clone)]
pub struct SessionState {
    pub status: SessionStatus,
    /// For a paid session: where its money is in (or enters) the ledger.
    pub funding: Funding,
    /// What a remote provider says the session is for. A payment is taken
    /// for an intent only if this matches it (a local session is made for
    /// its intent, in this ledger: `None`).
    pub charged: Option<(Units, Currency)>,
}

#[async_trait]
pub trait Provider: Send + Sync {
    /// Its kind (`local`, `mock`, `sessions_api`).
    fn name(&self) -> &'static str;
    /// Which provider this is, recorded on each intent it opens a session
    /// for, so that the intent is later asked of this very provider: a
    /// remote is named by where it is as well as by its kind.
    fn identity(&self) -> &str {
        self.name()
    }
    /// Whether its sessions are in this store: asking about one is a read,
    /// not a call to another system.
    fn is_local(&self) -> bool {
        false
    }
    async fn create_session(&self, req: &SessionRequest) -> Result<ProviderSession, ProviderError>;
    async fn session_state(&self, id: &str) -> Result<SessionState, ProviderError>;
    /// Cancels a pending session, so that it can no longer be paid; a
    /// session already ended is left as it is. Returns the session's status
    /// after: `Cancelled`, or what it had become first (`Paid`, if a payment
    /// reached it before the cancel did).
    async fn cancel_session(&self, id: &str) -> Result<SessionStatus, ProviderError>;
    /// Pays a pending session from a principal's prepaid wallet, after that
    /// person approved the charge.
    async fn pay_from_wallet(&self, id: &str, wallet: &str) -> Result<(), ProviderError>;
}
