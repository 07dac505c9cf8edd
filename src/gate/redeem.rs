//! Redeeming a payment id: the confirm tool (two_step) and the second call
//! (resubmit). A paid intent runs its tool at most once; every retry gets
//! the stored result back and is never charged again.

use rmcp::model::{CallToolResult, JsonObject};
use serde_json::{Map, Value, json};

use super::{Caller, Gate, reply, reply::code};
use crate::{
    money::format_amount,
    receipt::ReceiptClaims,
    store::{Intent, IntentOutcome, IntentStatus, SessionStatus, new_txn_id, now_ms, rfc3339},
};

/// How often a concurrent redeem looks for the result of a run under way.
const RUN_POLL: std::time::Duration = std::time::Duration::from_millis(20);

impl Gate {
    /// `args_hash` is checked when the caller re-sent arguments (resubmit).
    pub(super) async fn redeem(
        &self,
        caller: &Caller,
        payment_id: &str,
        tool: &str,
        args_hash: Option<&str>,
    ) -> CallToolResult {
        let intent = match self.store.intent(payment_id).await {
            Ok(Some(intent)) => intent,
            Ok(None) => {
                return reply::error(
                    code::PAYMENT_NOT_FOUND,
                    format!("no payment with id `{payment_id}`"),
                    reply::details(json!({ "payment_id": payment_id })),
                );
            }
            Err(e) => return reply::unavailable(e),
        };
        if let Some(why) = mismatch(&intent, caller, tool, args_hash) {
            tracing::warn!(payment_id, tool, "payment_mismatch: {why}");
            return reply::error(
                code::PAYMENT_MISMATCH,
                format!("payment `{payment_id}` does not belong to this call: {why}"),
                reply::details(json!({ "payment_id": payment_id })),
            );
        }
        let deadline = tokio::time::Instant::now() + self.settings.run_wait;
        let mut intent = intent;
        loop {
            let step = match intent.status {
                IntentStatus::Succeeded | IntentStatus::Failed => {
                    return self.replay(&intent).await;
                }
                IntentStatus::AwaitingPayment => self.check_payment(&intent).await,
                IntentStatus::Paid => match self
                    .store
                    .transition_intent(&intent.id, &[IntentStatus::Paid], IntentStatus::Running)
                    .await
                {
                    Ok(true) => return self.run_paid(intent).await,
                    Ok(false) => Step::Reload,
                    Err(e) => return reply::unavailable(e),
                },
                IntentStatus::Running => {
                    if tokio::time::Instant::now() >= deadline {
                        return reply::error(
                            code::PAYMENT_IN_PROGRESS,
                            format!(
                                "payment `{}` is paid and its call is still running; try again shortly",
                                intent.id
                            ),
                            reply::details(json!({ "payment_id": intent.id, "status": "running" })),
                        );
                    }
                    tokio::time::sleep(RUN_POLL).await;
                    Step::Reload
                }
                IntentStatus::Expired => {
                    Step::Answer(ended(&intent, code::PAYMENT_EXPIRED, "expired"))
                }
                IntentStatus::Cancelled => {
                    Step::Answer(ended(&intent, code::PAYMENT_CANCELLED, "cancelled"))
                }
                IntentStatus::Declined => {
                    Step::Answer(ended(&intent, code::PAYMENT_FAILED, "failed"))
                }
            };
            match step {
                Step::Answer(result) => return result,
                Step::Reload => match self.store.intent(&intent.id).await {
                    Ok(Some(fresh)) => intent = fresh,
                    Ok(None) => {
                        return reply::unavailable(format!("intent {} vanished", intent.id));
                    }
                    Err(e) => return reply::unavailable(e),
                },
            }
        }
    }

    /// Asks the provider about an intent still awaiting payment, and moves
    /// the intent along with what it says. Accepting the client's word is
    /// never enough: only the provider's `paid` counts.
    async fn check_payment(&self, intent: &Intent) -> Step {
        let Some(session_id) = intent.provider_session_id.as_deref() else {
            return Step::Answer(reply::unavailable(format!(
                "intent {} has no payment session",
                intent.id
            )));
        };
        let state = match self.provider.session_state(session_id).await {
            Ok(state) => state,
            Err(e) => return Step::Answer(reply::unavailable(e)),
        };
        let (to, code, status) = match state.status {
            SessionStatus::Paid => {
                return match self
                    .store
                    .mark_intent_paid(&intent.id, state.refund_to.as_ref())
                    .await
                {
                    Ok(_) => Step::Reload,
                    Err(e) => Step::Answer(reply::unavailable(e)),
                };
            }
            SessionStatus::Pending if now_ms() <= intent.expires_at => {
                return Step::Answer(reply::error(
                    code::PAYMENT_PENDING,
                    format!(
                        "payment `{}` is not paid yet: pay {} {} at {} and try again",
                        intent.id,
                        format_amount(intent.amount),
                        intent.currency,
                        intent.payment_url.as_deref().unwrap_or("(no url)")
                    ),
                    reply::details(json!({
                        "payment_id": intent.id,
                        "status": "pending",
                        "payment_url": intent.payment_url,
                        "expires_at": rfc3339(intent.expires_at),
                    })),
                ));
            }
            SessionStatus::Pending | SessionStatus::Expired => {
                (IntentStatus::Expired, code::PAYMENT_EXPIRED, "expired")
            }
            SessionStatus::Failed => (IntentStatus::Declined, code::PAYMENT_FAILED, "failed"),
            SessionStatus::Cancelled => (
                IntentStatus::Cancelled,
                code::PAYMENT_CANCELLED,
                "cancelled",
            ),
        };
        if let Err(e) = self.provider.cancel_session(session_id).await {
            tracing::warn!(
                payment_id = intent.id,
                "could not cancel the provider session: {e}"
            );
        }
        match self
            .store
            .transition_intent(&intent.id, &[IntentStatus::AwaitingPayment], to)
            .await
        {
            Ok(true) => Step::Answer(ended(intent, code, status)),
            // Someone else moved it first (perhaps to paid): look again.
            Ok(false) => Step::Reload,
            Err(e) => Step::Answer(reply::unavailable(e)),
        }
    }

    /// Runs a paid intent's tool, the one time it runs, and settles: the
    /// result and the ledger posting are stored in one transaction.
    async fn run_paid(&self, intent: Intent) -> CallToolResult {
        let Some(entry) = self.catalog.get(&intent.tool) else {
            return reply::unavailable(format!("tool {} is no longer served", intent.tool));
        };
        let args: JsonObject = serde_json::from_str(&intent.args_json).unwrap_or_default();
        let result = entry.backend.call(&intent.tool, args).await;
        let succeeded = result.is_error != Some(true);
        let txn_id = new_txn_id();
        let at = now_ms();
        let amount = format_amount(intent.amount);
        let payment = if succeeded {
            let receipt = self.signer.sign(&ReceiptClaims {
                payment_id: intent.id.clone(),
                tool: intent.tool.clone(),
                args_hash: intent.args_hash.clone(),
                amount: amount.clone(),
                currency: intent.currency.to_string(),
                payer: intent.principal.clone(),
                ledger_txn: txn_id.clone(),
                paid_at: rfc3339(at),
            });
            json!({ "payment_id": intent.id, "status": "paid", "amount": amount,
                    "currency": intent.currency.as_str(), "receipt": receipt })
        } else {
            json!({ "payment_id": intent.id, "status": "refunded", "amount": amount,
                    "currency": intent.currency.as_str(), "charged": "0.00" })
        };
        let result = reply::with_payment(result, payment);
        let outcome = IntentOutcome {
            intent_id: intent.id.clone(),
            succeeded,
            result_json: serde_json::to_string(&result).unwrap_or_default(),
            beneficiary: self.revenue_account(&intent.currency),
            txn_id,
            at,
        };
        if let Err(e) = self.store.finish_intent(&outcome).await {
            // The intent stays `running`, so it can never run again; the
            // money stays in clearing for an operator to settle.
            tracing::error!(
                payment_id = intent.id,
                "could not store the result of a paid run: {e}"
            );
        } else {
            tracing::info!(
                tool = intent.tool,
                payment_id = intent.id,
                amount,
                succeeded,
                "paid intent ran"
            );
        }
        result
    }

    /// A consumed payment id: the stored result, never a second run.
    async fn replay(&self, intent: &Intent) -> CallToolResult {
        match self.store.stored_result(&intent.id).await {
            Ok(Some(stored)) => match serde_json::from_str::<CallToolResult>(&stored.result_json) {
                Ok(mut result) => {
                    if let Some(Value::Object(payment)) = result
                        .meta
                        .as_mut()
                        .and_then(|m| m.0.get_mut(reply::PAYMENT_META))
                    {
                        payment.insert("replayed".into(), json!(true));
                    }
                    result
                }
                Err(e) => {
                    reply::unavailable(format!("stored result of {} is unreadable: {e}", intent.id))
                }
            },
            Ok(None) => reply::unavailable(format!(
                "intent {} finished without a stored result",
                intent.id
            )),
            Err(e) => reply::unavailable(e),
        }
    }
}

enum Step {
    Answer(CallToolResult),
    Reload,
}

fn mismatch(
    intent: &Intent,
    caller: &Caller,
    tool: &str,
    args_hash: Option<&str>,
) -> Option<&'static str> {
    if intent.tool != tool {
        return Some("it was issued for another tool");
    }
    if intent.principal != caller.principal {
        return Some("it was issued to another principal");
    }
    if args_hash.is_some_and(|h| h != intent.args_hash) {
        return Some("the arguments differ from the ones it was issued for");
    }
    None
}

/// The answer for an intent that ended without running.
fn ended(intent: &Intent, code: &str, status: &str) -> CallToolResult {
    let mut details = Map::new();
    details.insert("payment_id".into(), json!(intent.id));
    details.insert("status".into(), json!(status));
    reply::error(
        code,
        format!(
            "payment `{}` is {status}; nothing was charged. Call `{}` again for a new payment.",
            intent.id, intent.tool
        ),
        details,
    )
}
