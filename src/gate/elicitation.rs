//! Elicitation: the person answers inside the call. On sessions up to
//! 2025-11-25 the gate sends `elicitation/create` and waits (never longer
//! than the configured timeout: rmcp sets none). On 2026-07-28 sessions,
//! where the server may not send requests, the call returns an
//! `InputRequiredResult` and the client calls again with the answer; its
//! `request_state` is only a key to the intent, checked on the server.
//!
//! An "accept" is never taken as paid: the gate then asks the provider,
//! polling briefly. The same prompts carry approvals of charges above the
//! threshold, which an accept turns into a payment from the caller's wallet.

use rmcp::{
    ServiceError,
    model::{
        CallToolResponse, CallToolResult, CustomNotification, ElicitRequest, ElicitRequestParams,
        ElicitResult, ElicitationAction, ElicitationSchema, InputRequest, InputRequests,
        InputRequiredResult, InputResponses, ServerNotification,
    },
};
use serde_json::{Value, json};
use tokio::time::Instant;

use super::{
    CallScope, Elicits, Gate, PricedCall,
    redeem::{Settled, Wait, ended},
    reply::{self, code},
    slow_path::{Opened, Purpose, how_to_pay, required_body},
};
use crate::{
    money::format_in,
    provider::ProviderError,
    store::{APPROVAL_BY_FORM_MODE, ApprovalStatus, Intent, IntentStatus, StoreError, rfc3339},
};

/// The key of our request in an `InputRequiredResult`.
const INPUT_KEY: &str = "payment";

/// What became of a prompt.
pub(super) enum Answer {
    Accepted(Option<Value>),
    Declined,
    Cancelled,
    /// No answer within the timeout, the client cancelled the call, or the
    /// request failed: the intent stays payable.
    Unanswered(String),
}

impl From<ElicitResult> for Answer {
    fn from(r: ElicitResult) -> Self {
        match r.action {
            ElicitationAction::Accept => Answer::Accepted(r.content),
            ElicitationAction::Decline => Answer::Declined,
            // Cancel, and any action a newer client may add: not a yes.
            _ => Answer::Cancelled,
        }
    }
}

impl Gate {
    /// Elicitation mode, and approvals where the client can answer.
    pub(super) async fn elicit_payment(
        &self,
        scope: &CallScope<'_>,
        opened: &Opened,
        purpose: Purpose,
    ) -> CallToolResponse {
        let Some(prompt) = prompt(scope.elicits(), opened, purpose) else {
            return self.payment_required(opened, purpose, None).into();
        };
        if scope.is_modern() {
            let mut requests = InputRequests::new();
            requests.insert(
                INPUT_KEY.into(),
                InputRequest::Elicitation(ElicitRequest::new(prompt)),
            );
            return InputRequiredResult::new(Some(requests), Some(opened.intent.id.clone())).into();
        }
        let is_url = matches!(prompt, ElicitRequestParams::UrlElicitationParams { .. });
        let asked = if is_url { Asked::ByUrl } else { Asked::ByForm };
        let answer = tokio::select! {
            r = scope.request.peer.create_elicitation_with_timeout(prompt, Some(self.settings.timeouts.elicitation)) => match r {
                Ok(r) => Answer::from(r),
                Err(ServiceError::Timeout { timeout }) => Answer::Unanswered(format!("no answer within {}s", timeout.as_secs())),
                Err(e) => Answer::Unanswered(format!("elicitation failed: {e}")),
            },
            why = self.wait_ended(scope) => Answer::Unanswered(why.into()),
        };
        let result = self.after_answer(scope, opened, answer, asked).await;
        if is_url && result.is_error != Some(true) {
            // Tell a URL-mode client the out-of-band step is over. rmcp 3.9
            // has no typed method for it.
            let done = ServerNotification::CustomNotification(CustomNotification::new(
                "notifications/elicitation/complete",
                Some(json!({ "elicitationId": opened.intent.id })),
            ));
            if let Err(e) = scope.request.peer.send_notification(done).await {
                tracing::debug!("elicitation/complete not sent: {e}");
            }
        }
        result.into()
    }

    /// A 2026-07-28 client calling again with its answer. The state is
    /// client-controlled, so it must name an intent of this very call.
    pub(super) async fn resume_input_required(
        &self,
        scope: &CallScope<'_>,
        call: &PricedCall<'_>,
        state: &str,
        responses: Option<&InputResponses>,
    ) -> CallToolResult {
        let intent = match self
            .bound_intent(scope.caller, state, call.tool, Some(&call.args_hash))
            .await
        {
            Ok(intent) => intent,
            Err(answer)
                if answer
                    .structured_content
                    .as_ref()
                    .is_some_and(|s| s["error"] == code::PAYMENT_NOT_FOUND) =>
            {
                return super::redeem::mismatch_reply(
                    state,
                    call.tool,
                    "request_state names no payment of ours",
                );
            }
            Err(answer) => return answer,
        };
        // Only this session was asked: another one (even of the same
        // principal) answering, or an answer naming a payment offered some
        // other way (a dynamic confirm tool is its own session's, an
        // approval sent to the checkout page is redeemed in its tool's
        // mode), would get round the binding those payments have.
        let asked_here =
            intent.was_elicited() && intent.session_id.as_deref() == Some(scope.session_id);
        if !asked_here {
            return super::redeem::mismatch_reply(
                state,
                call.tool,
                "request_state names a question this session was not asked",
            );
        }
        let answer = match responses
            .and_then(|r| r.get(INPUT_KEY))
            .and_then(|v| serde_json::from_value::<ElicitResult>(v.clone()).ok())
        {
            Some(r) => Answer::from(r),
            None => Answer::Unanswered("the call carried no answer".into()),
        };
        let opened = Opened {
            url: intent.payment_url.clone().unwrap_or_default(),
            intent,
        };
        // The answer is the client's word, to the question recorded as
        // asked: an approval's yes only where the client was asked by a
        // form (not one that now says it answers forms, having been sent
        // to the checkout page).
        let asked = if opened.intent.mode == APPROVAL_BY_FORM_MODE {
            Asked::ByForm
        } else {
            Asked::ByUrl
        };
        self.after_answer(scope, &opened, answer, asked).await
    }

    async fn after_answer(
        &self,
        scope: &CallScope<'_>,
        opened: &Opened,
        answer: Answer,
        asked: Asked,
    ) -> CallToolResult {
        let intent = &opened.intent;
        let purpose = purpose_of(intent);
        // An approval form is answered yes or no. An accepted URL prompt
        // says only that the person will open the page, where the approval
        // is given with a person's key: no yes, so nothing is charged here,
        // whatever the answer carries.
        let approve = match &answer {
            Answer::Accepted(Some(content))
                if purpose == Purpose::Approval && asked == Asked::ByForm =>
            {
                content.get("approve").and_then(Value::as_bool)
            }
            _ => None,
        };
        let said_no = approve == Some(false) || matches!(answer, Answer::Declined);
        // The person's decision goes on the intent, for statements: an
        // approval's yes, and any no.
        let decision = match approve {
            _ if said_no => Some(ApprovalStatus::Declined),
            Some(true) => Some(ApprovalStatus::Approved),
            _ => None,
        };
        if let Some(decision) = decision {
            let by = format!(
                "{} via elicitation",
                intent.principal.as_deref().unwrap_or("anonymous caller")
            );
            self.record_decision(intent, decision, &by).await;
        }
        match answer {
            Answer::Accepted(_) => {
                if purpose == Purpose::Approval {
                    if said_no {
                        return self.refuse(scope, intent, IntentStatus::Declined).await;
                    }
                    if approve == Some(true)
                        && let Some(refused) = self.charge_approved(scope, opened).await
                    {
                        return refused;
                    }
                }
                let wait = Wait {
                    until: Instant::now() + self.settings.timeouts.payment_check,
                    progress: None,
                };
                match self
                    .redeem_until(scope, &intent.id, &intent.tool, None, Some(wait))
                    .await
                {
                    Settled::Final(result) => result,
                    Settled::Pending(pending, _) => {
                        tracing::info!(
                            payment_id = intent.id,
                            "accepted, but the provider has no payment"
                        );
                        pending
                    }
                }
            }
            Answer::Declined => self.refuse(scope, intent, IntentStatus::Declined).await,
            Answer::Cancelled => self.refuse(scope, intent, IntentStatus::Cancelled).await,
            Answer::Unanswered(why) => {
                tracing::info!(
                    payment_id = intent.id,
                    "no answer to the payment prompt: {why}"
                );
                self.stopped_waiting(opened, purpose, &why)
            }
        }
    }

    /// An approved charge: pay the session from the caller's wallet. `Some`
    /// is the answer when that cannot be done.
    async fn charge_approved(
        &self,
        scope: &CallScope<'_>,
        opened: &Opened,
    ) -> Option<CallToolResult> {
        let intent = &opened.intent;
        let (Some(wallet), Some(session)) = (
            intent.principal.as_deref(),
            intent.provider_session_id.as_deref(),
        ) else {
            return Some(reply::unavailable(format!(
                "approval {} has no wallet or session",
                intent.id
            )));
        };
        let paid = async {
            self.provider_of(intent)?
                .pay_from_wallet(session, wallet)
                .await
        };
        match paid.await {
            Ok(()) => {
                tracing::info!(
                    payment_id = intent.id,
                    wallet,
                    "charge above the threshold approved"
                );
                None
            }
            // Already paid (a retry of the same answer): redeem replays it.
            Err(ProviderError::Store(StoreError::WrongState { .. })) => None,
            // A limit lowered, or spent by another call, since the approval
            // was asked: the caller is told nothing was charged, so the
            // payment ends too, rather than stay payable at checkout (and
            // hold one of the caller's open-payment places) until it expires.
            Err(ProviderError::Store(StoreError::OverLimit(breach))) => {
                match self.end_unpaid(intent, IntentStatus::Cancelled).await {
                    Ok(true) => {}
                    // Paid at checkout meanwhile: that payment stands, and
                    // the caller is told how to use it.
                    Ok(false) => return Some(self.redeem_state(scope, intent, "refused").await),
                    Err(e) => tracing::warn!(
                        payment_id = intent.id,
                        "an approval refused by a limit is left to expire: {e}"
                    ),
                }
                Some(Gate::refused_by_limit(&intent.tool, &breach))
            }
            // A provider that takes payments elsewhere (another tollgate's
            // sessions API) cannot charge a wallet here: the approved
            // payment is made at its checkout page instead.
            Err(ProviderError::Unsupported(_)) => {
                let mut body = required_body(opened);
                body["status"] = json!("pending");
                Some(reply::error(
                    code::PAYMENT_REQUIRED,
                    format!(
                        "approved; payments here are taken by {}, not from wallets: pay at {}, then {}.",
                        intent.provider,
                        opened.url,
                        self.redeem_hint(intent)
                    ),
                    reply::details(body),
                ))
            }
            Err(ProviderError::Store(e @ StoreError::InsufficientFunds { .. })) => {
                let mut body = required_body(opened);
                body["status"] = json!("pending");
                Some(reply::error(
                    code::PAYMENT_REQUIRED,
                    format!(
                        "approved, but {e}. Top up wallet {wallet}, then approve it at {}; then {}.",
                        opened.url,
                        self.redeem_hint(intent)
                    ),
                    reply::details(body),
                ))
            }
            Err(e) => Some(reply::unavailable(e)),
        }
    }

    /// The person said no (`to`: declined or cancelled): cancel the
    /// session, end the intent, charge nothing.
    async fn refuse(
        &self,
        scope: &CallScope<'_>,
        intent: &Intent,
        to: IntentStatus,
    ) -> CallToolResult {
        let (code, status) = if to == IntentStatus::Declined {
            (code::PAYMENT_DECLINED, "declined")
        } else {
            (code::PAYMENT_CANCELLED, "cancelled")
        };
        match self.end_unpaid(intent, to).await {
            Ok(true) => {
                tracing::info!(payment_id = intent.id, status, "payment prompt refused");
                ended(intent, code, status)
            }
            // Already paid or ended: say what it is now.
            Ok(false) => self.redeem_state(scope, intent, status).await,
            Err(ProviderError::Store(e)) => reply::unavailable(e),
            // The provider could not be made to cancel, so the intent stays
            // open (upkeep ends it in time): a payment made there meanwhile
            // stands, and the caller has its id.
            Err(e) => {
                tracing::warn!(
                    payment_id = intent.id,
                    status,
                    "payment prompt refused, but its provider session could not be cancelled: {e}"
                );
                reply::error(
                    code,
                    format!(
                        "payment `{}` was {status}: nothing was charged and the tool did not run. \
                         Its payment page could not be closed yet ({e}), so a payment made there \
                         still counts: then {}. Unused by {}, it is refunded.",
                        intent.id,
                        self.redeem_hint(intent),
                        rfc3339(self.refunded_unused_at(intent))
                    ),
                    reply::details(json!({ "payment_id": intent.id, "status": status })),
                )
            }
        }
    }

    /// What became of an intent whose refusal (`refused`: declined or
    /// cancelled) did not end it.
    async fn redeem_state(
        &self,
        scope: &CallScope<'_>,
        intent: &Intent,
        refused: &str,
    ) -> CallToolResult {
        match self.store.intent(&intent.id).await {
            // Its session was paid before the refusal reached it: the
            // payment stands, unused, and is refunded if it stays so.
            Ok(Some(now)) if now.status == IntentStatus::AwaitingPayment => reply::error(
                code::PAYMENT_IN_PROGRESS,
                format!(
                    "payment `{}` was paid before the prompt was {refused}, so nothing ran and the payment stands: \
                     {} to use it. Unused by {}, it is refunded.",
                    now.id,
                    self.redeem_hint(&now),
                    rfc3339(self.refunded_unused_at(&now))
                ),
                reply::details(json!({ "payment_id": now.id, "status": "paid" })),
            ),
            Ok(Some(now)) if now.status == IntentStatus::Cancelled => {
                ended(&now, code::PAYMENT_CANCELLED, "cancelled")
            }
            Ok(Some(now)) if now.status == IntentStatus::Declined => {
                ended(&now, code::PAYMENT_DECLINED, "declined")
            }
            // Its call ran (or runs) already, paid before this answer (a
            // repeated one) came: the same answer an accept gets, its
            // stored result.
            Ok(Some(now))
                if matches!(
                    now.status,
                    IntentStatus::Running | IntentStatus::Succeeded | IntentStatus::Failed
                ) =>
            {
                self.redeem(scope, &now.id, &now.tool, None).await
            }
            Ok(Some(now)) => reply::error(
                code::PAYMENT_IN_PROGRESS,
                format!("payment `{}` is {}", now.id, now.status.as_str()),
                reply::details(json!({ "payment_id": now.id, "status": now.status.as_str() })),
            ),
            Ok(None) => reply::unavailable(format!("intent {} vanished", intent.id)),
            Err(e) => reply::unavailable(e),
        }
    }
}

/// How the person was asked: only a form can carry an approval's yes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Asked {
    ByForm,
    ByUrl,
}

fn purpose_of(intent: &Intent) -> Purpose {
    if intent.is_approval() {
        Purpose::Approval
    } else {
        Purpose::Payment
    }
}

/// The prompt for a payment (URL mode where the client has it, else a form
/// stating tool, amount, currency and URL) or for an approval (a yes/no
/// form where possible).
fn prompt(elicits: Elicits, opened: &Opened, purpose: Purpose) -> Option<ElicitRequestParams> {
    let intent = &opened.intent;
    let amount = format_in(intent.amount, &intent.currency);
    let url_prompt = |message: String| ElicitRequestParams::UrlElicitationParams {
        meta: None,
        message,
        url: opened.url.clone(),
        elicitation_id: intent.id.clone(),
    };
    let form = |message: String, field: &str| {
        ElicitationSchema::builder()
            .required_bool(field)
            .build()
            .ok()
            .map(
                |requested_schema| ElicitRequestParams::FormElicitationParams {
                    meta: None,
                    message,
                    requested_schema,
                },
            )
    };
    match (purpose, elicits) {
        (_, Elicits::No) => None,
        (Purpose::Approval, e) if e.form() => form(
            format!(
                "Approve charging {amount} {} to wallet {} for tool `{}`? (payment {})",
                intent.currency,
                intent.principal.as_deref().unwrap_or("-"),
                intent.tool,
                intent.id
            ),
            "approve",
        ),
        (Purpose::Approval, _) => Some(url_prompt(how_to_pay(opened, purpose))),
        (Purpose::Payment, Elicits::Url { .. }) => Some(url_prompt(format!(
            "Pay {amount} {} to run `{}` (payment {}).",
            intent.currency, intent.tool, intent.id
        ))),
        (Purpose::Payment, Elicits::Form) => form(
            format!(
                "Payment required: {amount} {} for tool `{}`. Pay at {} and then accept. (payment {})",
                intent.currency, intent.tool, opened.url, intent.id
            ),
            "paid",
        ),
    }
}
