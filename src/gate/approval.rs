//! Charges above `approval_threshold` need a person's yes even when the
//! caller's wallet can pay, as the seed payment systems do: under the
//! threshold a charge is auto-approved (the fast path), above it the person
//! confirms. The gate asks by elicitation where the client can answer;
//! otherwise the call takes the slow path with a session that a person
//! approves at checkout (or with `tollgate sessions pay ID --from WALLET`).

use rmcp::model::CallToolResponse;

use super::{CallScope, Gate, PricedCall, slow_path::Purpose};
use crate::{
    config::Mode,
    store::{ApprovalStatus, Intent},
};

impl Gate {
    /// Records who approved or declined an intent waiting for approval. A
    /// failure to record is logged: the payment itself goes on as decided.
    pub(super) async fn record_decision(
        &self,
        intent: &Intent,
        decision: ApprovalStatus,
        by: &str,
    ) {
        if let Err(e) = self.store.decide_approval(&intent.id, decision, by).await {
            tracing::warn!(
                payment_id = intent.id,
                by,
                "approval decision not recorded: {e}"
            );
        }
    }

    /// `None` when there is nothing to approve (anonymous caller, or a
    /// wallet that cannot cover the price): the call is then an ordinary
    /// slow-path payment.
    pub(super) async fn ask_approval(
        &self,
        scope: &CallScope<'_>,
        call: &PricedCall<'_>,
        mode: Mode,
    ) -> Option<CallToolResponse> {
        let wallet = scope.caller.principal.as_deref()?;
        let covered = match self.store.balances(wallet).await {
            Ok(balances) => balances
                .iter()
                .any(|b| b.currency == call.price.currency && b.available >= call.amount),
            Err(e) => return Some(super::reply::unavailable(e).into()),
        };
        if !covered {
            return None;
        }
        if !scope.elicits().any() {
            return Some(self.slow_path(scope, call, mode, Purpose::Approval).await);
        }
        Some(
            match self.open_intent(scope, call, mode, Purpose::Approval).await {
                Ok(opened) => self.elicit_payment(scope, &opened, Purpose::Approval).await,
                Err(unavailable) => unavailable.into(),
            },
        )
    }
}
