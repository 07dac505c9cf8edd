//! Spending limits at the gate: a payment that does not go through the
//! fast path's hold (which checks them in its own statement) is checked
//! before it is asked for, so that nobody approves or pays for a call the
//! wallet's limits refuse. A wallet paying a session is checked again, and
//! counted, by the store.

use rmcp::model::CallToolResult;

use super::{CallScope, Gate, PricedCall, reply};
use crate::{allowance::Breach, store::now_ms};

impl Gate {
    /// `Some`: the refusal, when the caller's wallet limits refuse this call.
    pub(super) async fn over_limit(
        &self,
        scope: &CallScope<'_>,
        call: &PricedCall<'_>,
    ) -> Option<CallToolResult> {
        let principal = scope.caller.principal.as_deref()?;
        let wallets = match self.store.limits(principal).await {
            Ok(wallets) => wallets,
            Err(e) => return Some(reply::unavailable(e)),
        };
        let wallet = wallets.iter().find(|w| w.currency == call.price.currency)?;
        let breach = wallet.limits.breach(
            principal,
            &wallet.currency,
            &wallet.spent,
            Some(call.tool),
            call.amount,
            now_ms(),
        )?;
        Some(Self::refused_by_limit(call.tool, &breach))
    }

    /// The answer to a call a spending limit refused, wherever it was
    /// checked (the fast path's hold, here, or a wallet paying a session).
    pub(super) fn refused_by_limit(tool: &str, breach: &Breach) -> CallToolResult {
        tracing::info!(
            tool,
            wallet = breach.wallet,
            limit = breach.limit.as_str(),
            "call refused by a spending limit"
        );
        reply::limit_exceeded(breach)
    }
}
