//! Slow path: open an intent and a payment session, then tell the caller
//! how to pay in the words of the tool's mode.

use rmcp::model::{CallToolResult, ContentBlock};
use serde_json::{Value, json};

use super::{Caller, Gate, PricedCall, confirm_tool_name, reply};
use crate::{
    config::Mode,
    money::format_amount,
    provider::SessionRequest,
    store::{Intent, IntentStatus, new_id, now_ms, rfc3339},
};

impl Gate {
    pub(super) async fn open_intent(
        &self,
        caller: &Caller,
        call: &PricedCall<'_>,
        mode: Mode,
    ) -> CallToolResult {
        let now = now_ms();
        let payment_id = new_id("pay");
        let expires_at = now + self.settings.payment_ttl.as_millis() as i64;
        let amount = format_amount(call.price.amount);
        let currency = call.price.currency.as_str();
        let request = SessionRequest {
            payment_id: payment_id.clone(),
            amount: call.price.amount,
            currency: call.price.currency.clone(),
            description: format!(
                "{} call to `{}` on {}",
                mode, call.tool, self.settings.server_name
            ),
            expires_at,
        };
        let session = match self.provider.create_session(&request).await {
            Ok(session) => session,
            Err(e) => return reply::unavailable(e),
        };
        let intent = Intent {
            id: payment_id.clone(),
            tool: call.tool.to_owned(),
            args_hash: call.args_hash.clone(),
            args_json: Value::Object(call.args.clone()).to_string(),
            amount: call.price.amount,
            currency: call.price.currency.clone(),
            principal: caller.principal.clone(),
            mode: mode.as_str().to_owned(),
            status: IntentStatus::AwaitingPayment,
            provider: self.provider.name().to_owned(),
            provider_session_id: Some(session.id.clone()),
            payment_url: Some(session.url.clone()),
            created_at: now,
            expires_at,
        };
        if let Err(e) = self.store.create_intent(&intent).await {
            return reply::unavailable(e);
        }
        tracing::info!(
            tool = call.tool,
            principal = caller.principal.as_deref().unwrap_or("anonymous"),
            payment_id,
            amount,
            currency,
            %mode,
            "payment required"
        );

        let mut body = json!({
            "payment_id": payment_id,
            "payment_url": session.url,
            "amount": amount,
            "currency": currency,
            "expires_at": rfc3339(expires_at),
        });
        let how_to_pay = format!(
            "Payment required: {amount} {currency} for `{}`. Pay at {} (or run `tollgate sessions pay {payment_id}`)",
            call.tool, session.url
        );
        if mode == Mode::TwoStep {
            let next = confirm_tool_name(call.tool);
            body["status"] = json!(reply::code::PAYMENT_REQUIRED);
            body["next_step"] = json!(next);
            let text =
                format!("{how_to_pay}, then call `{next}` with payment_id \"{payment_id}\".");
            let mut result = CallToolResult::success(vec![ContentBlock::text(text)]);
            result.structured_content = Some(body);
            result
        } else {
            let text = format!(
                "{how_to_pay}, then call `{}` again with the same arguments plus \"payment_id\": \"{payment_id}\".",
                call.tool
            );
            reply::error(reply::code::PAYMENT_REQUIRED, text, reply::details(body))
        }
    }
}
