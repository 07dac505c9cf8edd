//! The embedded provider: sessions live in the same store as the ledger.
//! A person settles one with `tollgate sessions pay ID [--from WALLET]`, or,
//! once the HTTP listener exists, on the checkout page at `payment_url`.

use std::sync::Arc;

use async_trait::async_trait;

use super::{Provider, ProviderError, ProviderSession, SessionRequest, SessionState};
use crate::store::{Funding, LocalSession, SessionStatus, Store, current_session, now_ms};

pub struct LocalProvider {
    store: Arc<dyn Store>,
    checkout_base_url: String,
    /// `[provider] kind = "mock"`: settle each session as it opens.
    settle_at_once: bool,
}

impl LocalProvider {
    pub fn new(store: Arc<dyn Store>, checkout_base_url: impl Into<String>) -> Self {
        Self {
            store,
            checkout_base_url: checkout_base_url.into(),
            settle_at_once: false,
        }
    }

    /// The mock provider: every session is paid (a dev settlement, posted to
    /// the ledger like any other) the moment it opens.
    pub fn settling_at_once(mut self) -> Self {
        self.settle_at_once = true;
        self
    }

    pub fn checkout_url(&self, id: &str) -> String {
        format!("{}/checkout/{id}", self.checkout_base_url)
    }
}

#[async_trait]
impl Provider for LocalProvider {
    fn name(&self) -> &'static str {
        if self.settle_at_once { "mock" } else { "local" }
    }

    fn is_local(&self) -> bool {
        true
    }

    async fn create_session(&self, req: &SessionRequest) -> Result<ProviderSession, ProviderError> {
        let session = LocalSession {
            id: req.payment_id.clone(),
            amount: req.amount,
            currency: req.currency.clone(),
            description: req.description.clone(),
            status: SessionStatus::Pending,
            created_at: now_ms(),
            expires_at: req.expires_at,
            paid_from: None,
            owner: None,
        };
        self.store.create_session(&session).await?;
        if self.settle_at_once {
            self.store.pay_session(&session.id, None, now_ms()).await?;
        }
        Ok(ProviderSession {
            url: self.checkout_url(&session.id),
            id: session.id,
        })
    }

    async fn session_state(&self, id: &str) -> Result<SessionState, ProviderError> {
        let session = current_session(self.store.as_ref(), id)
            .await?
            .ok_or_else(|| ProviderError::NotFound(id.to_owned()))?;
        Ok(SessionState {
            status: session.status,
            funding: Funding::InClearing {
                refund_to: session.paid_from,
            },
            charged: None,
        })
    }

    async fn cancel_session(&self, id: &str) -> Result<SessionStatus, ProviderError> {
        if self.store.end_session(id, SessionStatus::Cancelled).await? {
            return Ok(SessionStatus::Cancelled);
        }
        Ok(self.session_state(id).await?.status)
    }

    async fn pay_from_wallet(&self, id: &str, wallet: &str) -> Result<(), ProviderError> {
        self.store.pay_session(id, Some(wallet), now_ms()).await?;
        Ok(())
    }
}
