//! Slow path: open an intent and a payment session, then take the caller
//! through the payment mode.

use rmcp::model::{CallToolResponse, CallToolResult, ContentBlock};
use serde_json::{Value, json};

use super::{CallScope, Gate, PricedCall, confirm_tool_name, reply};
use crate::{
    config::Mode,
    money::format_in,
    provider::SessionRequest,
    store::{
        APPROVAL_BY_FORM_MODE, APPROVAL_BY_URL_MODE, APPROVAL_MODE, Approval, ApprovalStatus,
        Intent, IntentStatus, OpenIntents, new_payment_id, now_ms, rfc3339,
    },
};

/// Why a session is opened: to take a payment, or for a person to approve
/// charging the caller's wallet above the approval threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Purpose {
    Payment,
    Approval,
}

/// An intent just opened, with its payment session.
pub(super) struct Opened {
    pub intent: Intent,
    pub url: String,
}

impl Gate {
    /// Opens an intent, answers in the mode's words, and, in the waiting
    /// modes, waits for the payment.
    pub(super) async fn slow_path(
        &self,
        scope: &CallScope<'_>,
        call: &PricedCall<'_>,
        mode: Mode,
        purpose: Purpose,
    ) -> CallToolResponse {
        let opened = match self.open_intent(scope, call, mode, purpose).await {
            Ok(opened) => opened,
            Err(unavailable) => return unavailable.into(),
        };
        match mode {
            Mode::TwoStep => self
                .payment_required(&opened, purpose, Some(confirm_tool_name(call.tool)))
                .into(),
            Mode::DynamicTools => self
                .offer_dynamic_confirm(scope, call, &opened, purpose)
                .await
                .into(),
            Mode::Elicitation => self.elicit_payment(scope, &opened, purpose).await,
            Mode::Progress => self
                .wait_with_progress(scope, &opened, purpose)
                .await
                .into(),
            Mode::Resubmit | Mode::Auto => self.payment_required(&opened, purpose, None).into(),
        }
    }

    pub(super) async fn open_intent(
        &self,
        scope: &CallScope<'_>,
        call: &PricedCall<'_>,
        mode: Mode,
        purpose: Purpose,
    ) -> Result<Opened, CallToolResult> {
        let now = now_ms();
        // A flood of unpaid calls cannot fill the store: each caller has at
        // most so many payments waiting, and anonymous callers (who can open
        // sessions at will) as many between them. Counted here to refuse
        // before a provider session is made; the intent's insert counts
        // again, in one step with it, for calls racing each other.
        let principal = scope.caller.principal.as_deref();
        let limit = self.settings.open_limit();
        let open = self
            .store
            .open_intents(principal, scope.session_id, now)
            .await
            .map_err(reply::unavailable)?;
        if open.at(&limit) {
            return Err(self.too_many_waiting(principal, open));
        }
        let payment_id = new_payment_id();
        let expires_at = now + self.settings.payment_ttl.as_millis() as i64;
        let amount = format_in(call.amount, &call.price.currency);
        let currency = call.price.currency.as_str();
        let description = match (purpose, principal) {
            (Purpose::Approval, Some(wallet)) => format!(
                "Approve charging {amount} {currency} to wallet {wallet} for `{}` on {}",
                call.tool, self.settings.server_name
            ),
            _ => format!(
                "{amount} {currency} for `{}` on {}",
                call.tool, self.settings.server_name
            ),
        };
        // Names from elsewhere (an upstream's tool) written so that a
        // sessions API, which refuses what would forge a statement line,
        // takes it.
        let description = crate::statement::printable(&description).into_owned();
        let request = SessionRequest {
            payment_id: payment_id.clone(),
            amount: call.amount,
            currency: call.price.currency.clone(),
            description,
            expires_at,
        };
        let session = self
            .provider
            .create_session(&request)
            .await
            .map_err(reply::unavailable)?;
        let intent = Intent {
            id: payment_id.clone(),
            tool: call.tool.to_owned(),
            args_hash: call.args_hash.clone(),
            args_json: Value::Object(call.args.clone()).to_string(),
            amount: call.amount,
            currency: call.price.currency.clone(),
            principal: scope.caller.principal.clone(),
            session_id: Some(scope.session_id.to_owned()),
            mode: match purpose {
                // A client that answers forms is asked by one (see
                // `ask_approval`), and only then may send a yes back.
                Purpose::Approval if scope.elicits().form() => APPROVAL_BY_FORM_MODE.to_owned(),
                Purpose::Approval if scope.elicits().any() => APPROVAL_BY_URL_MODE.to_owned(),
                Purpose::Approval => APPROVAL_MODE.to_owned(),
                Purpose::Payment => mode.as_str().to_owned(),
            },
            status: IntentStatus::AwaitingPayment,
            provider: self.provider.identity().to_owned(),
            provider_session_id: Some(session.id.clone()),
            payment_url: Some(session.url.clone()),
            created_at: now,
            expires_at,
            origin: call.origin.clone(),
            // Paying is approving: an intent above its threshold waits for
            // whoever pays it (or the person asked) to say yes.
            approval: Some(Approval::new(
                if purpose == Purpose::Payment && call.amount <= call.threshold.amount {
                    ApprovalStatus::AutoApproved
                } else {
                    ApprovalStatus::Waiting
                },
                call.threshold.rule.clone(),
            )),
        };
        let created = self
            .store
            .create_intent(&intent, &limit)
            .await
            .map_err(reply::unavailable)?;
        if !created {
            // Calls racing this one filled the room the count saw.
            if let Err(e) = self.provider.cancel_session(&session.id).await {
                tracing::warn!(payment_id, "cannot cancel an unused payment session: {e}");
            }
            let open = self
                .store
                .open_intents(principal, scope.session_id, now)
                .await
                .map_err(reply::unavailable)?;
            return Err(self.too_many_waiting(principal, open));
        }
        tracing::info!(
            tool = call.tool,
            principal = principal.unwrap_or("anonymous"),
            payment_id,
            amount,
            currency,
            %mode,
            ?purpose,
            "payment required"
        );
        Ok(Opened {
            intent,
            url: session.url,
        })
    }

    /// The refusal of a caller with too many payments waiting (`open`).
    fn too_many_waiting(&self, principal: Option<&str>, open: OpenIntents) -> CallToolResult {
        let limit = self.settings.open_limit();
        let (who, open, max) = match principal {
            Some(p) => (format!("principal {p} has"), open.caller, limit.per_caller),
            None if open.caller >= limit.per_caller => {
                ("this session has".to_owned(), open.caller, limit.per_caller)
            }
            None => (
                "anonymous callers have".to_owned(),
                open.anonymous,
                limit.anonymous,
            ),
        };
        tracing::warn!(open, max, "{who} too many payments waiting; call refused");
        reply::error(
            reply::code::TOO_MANY_OPEN_PAYMENTS,
            format!(
                "{who} {open} payments waiting, the most allowed: pay one or let it expire, then call again; nothing was charged"
            ),
            reply::details(json!({ "open": open, "max": max })),
        )
    }

    /// The answer that asks for payment. With a `next_step` tool (two_step,
    /// dynamic tools) it is a normal result (but see [`reply::for_tool`]);
    /// otherwise (resubmit) an `isError` result, because that call did not
    /// do what was asked.
    pub(super) fn payment_required(
        &self,
        opened: &Opened,
        purpose: Purpose,
        next_step: Option<String>,
    ) -> CallToolResult {
        let intent = &opened.intent;
        let body = required_body(opened);
        let how = how_to_pay(opened, purpose);
        match next_step {
            Some(next) => {
                let mut body = body;
                body["status"] = json!(reply::code::PAYMENT_REQUIRED);
                body["next_step"] = json!(next);
                // A dynamic confirm tool is the payment's own: no arguments.
                let text = if super::dynamic_confirm_payment_id(&next).is_some() {
                    format!("{how}, then call `{next}` (it takes no arguments).")
                } else {
                    format!(
                        "{how}, then call `{next}` with payment_id \"{}\".",
                        intent.id
                    )
                };
                reply::with_body(
                    CallToolResult::success(vec![ContentBlock::text(text)]),
                    body,
                )
            }
            None => {
                let text = format!(
                    "{how}, then call `{}` again with the same arguments plus \"payment_id\": \"{}\".",
                    intent.tool, intent.id
                );
                reply::error(reply::code::PAYMENT_REQUIRED, text, reply::details(body))
            }
        }
    }
}

/// `{payment_id, payment_url, amount, currency, expires_at}`.
pub(super) fn required_body(opened: &Opened) -> Value {
    let intent = &opened.intent;
    json!({
        "payment_id": intent.id,
        "payment_url": opened.url,
        "amount": format_in(intent.amount, &intent.currency),
        "currency": intent.currency.as_str(),
        "expires_at": rfc3339(intent.expires_at),
    })
}

impl Gate {
    /// The answer when the gate stops waiting for a payment (no answer to a
    /// prompt, a progress timeout, a cancelled call): `payment_timeout`,
    /// with the payment id, which stays payable.
    pub(super) fn stopped_waiting(
        &self,
        opened: &Opened,
        purpose: Purpose,
        why: &str,
    ) -> CallToolResult {
        let mut body = required_body(opened);
        body["status"] = json!("pending");
        reply::error(
            reply::code::PAYMENT_TIMEOUT,
            format!(
                "{why}. {}, then {}.",
                how_to_pay(opened, purpose),
                self.redeem_hint(&opened.intent)
            ),
            reply::details(body),
        )
    }

    /// How a caller uses a payment once it is made, in its tool's mode:
    /// two_step's confirm tool, the payment's own dynamic confirm tool (it
    /// works for the session that opened it, listed or not), or the tool
    /// again with `payment_id` (the modes that resubmit).
    pub(super) fn redeem_hint(&self, intent: &Intent) -> String {
        let catalog = self.catalog();
        let mode = catalog
            .get(&intent.tool)
            .and_then(|entry| entry.price.as_ref())
            .map(|price| price.mode);
        match mode {
            Some(Mode::TwoStep) => format!(
                "call `{}` with payment_id \"{}\"",
                confirm_tool_name(&intent.tool),
                intent.id
            ),
            Some(Mode::DynamicTools) => {
                format!("call `confirm_{}` (it takes no arguments)", intent.id)
            }
            _ => format!(
                "call `{}` again with the same arguments plus \"payment_id\": \"{}\"",
                intent.tool, intent.id
            ),
        }
    }
}

/// One sentence a person can follow to pay (or approve).
pub(super) fn how_to_pay(opened: &Opened, purpose: Purpose) -> String {
    let intent = &opened.intent;
    let amount = format_in(intent.amount, &intent.currency);
    match (purpose, intent.principal.as_deref()) {
        (Purpose::Approval, Some(wallet)) => format!(
            "Approval required: charging {amount} {} to wallet {wallet} for `{}` is above the approval threshold. \
             Approve at {} (or run `tollgate sessions pay {} --from {wallet}`)",
            intent.currency, intent.tool, opened.url, intent.id
        ),
        _ => format!(
            "Payment required: {amount} {} for `{}`. Pay at {} (or run `tollgate sessions pay {}`)",
            intent.currency, intent.tool, opened.url, intent.id
        ),
    }
}
