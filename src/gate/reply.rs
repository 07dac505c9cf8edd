//! How the gate answers: payment errors as tool results (SDKs drop JSON-RPC
//! error data), and the `tollgate/payment` block on paid results.

use rmcp::model::{CallToolResult, ContentBlock};
use serde_json::{Map, Value, json};

pub const PAYMENT_META: &str = "tollgate/payment";

/// Where a gate's own reply (not the tool's result) keeps its body, beside
/// `structuredContent`: it marks the reply as the gate's until the call is
/// answered, and is all a tool with an `outputSchema` gets (see
/// [`for_tool`]).
pub const REPLY_META: &str = "tollgate/reply";

/// Stable error codes clients can branch on.
pub mod code {
    pub const PAYMENT_REQUIRED: &str = "payment_required";
    pub const PAYMENT_PENDING: &str = "payment_pending";
    pub const PAYMENT_FAILED: &str = "payment_failed";
    pub const PAYMENT_EXPIRED: &str = "payment_expired";
    pub const PAYMENT_CANCELLED: &str = "payment_cancelled";
    pub const PAYMENT_DECLINED: &str = "payment_declined";
    pub const PAYMENT_TIMEOUT: &str = "payment_timeout";
    pub const PAYMENT_MISMATCH: &str = "payment_mismatch";
    pub const PAYMENT_NOT_FOUND: &str = "payment_not_found";
    pub const PAYMENT_IN_PROGRESS: &str = "payment_in_progress";
    pub const INVALID_ARGUMENTS: &str = "invalid_arguments";
    pub const UNAVAILABLE: &str = "payment_system_unavailable";
    pub const LIMIT_EXCEEDED: &str = "limit_exceeded";
    pub const TOO_MANY_OPEN_PAYMENTS: &str = "too_many_open_payments";
    /// A paid run the server died in the middle of: refunded, never rerun.
    pub const RUN_INTERRUPTED: &str = "run_interrupted";
    /// A consumed payment whose stored result has been pruned.
    pub const RESULT_NOT_KEPT: &str = "result_not_kept";
    /// A payment paid but not redeemed in time: refunded, never run.
    pub const PAYMENT_UNREDEEMED: &str = "payment_unredeemed";
    /// A paid call whose tool is no longer served: refunded, never run.
    pub const TOOL_GONE: &str = "tool_gone";

    pub const ALL: [&str; 18] = [
        PAYMENT_REQUIRED,
        PAYMENT_PENDING,
        PAYMENT_FAILED,
        PAYMENT_EXPIRED,
        PAYMENT_CANCELLED,
        PAYMENT_DECLINED,
        PAYMENT_TIMEOUT,
        PAYMENT_MISMATCH,
        PAYMENT_NOT_FOUND,
        PAYMENT_IN_PROGRESS,
        INVALID_ARGUMENTS,
        UNAVAILABLE,
        LIMIT_EXCEEDED,
        TOO_MANY_OPEN_PAYMENTS,
        RUN_INTERRUPTED,
        RESULT_NOT_KEPT,
        PAYMENT_UNREDEEMED,
        TOOL_GONE,
    ];
}

/// An `isError` result whose `structuredContent` is
/// `{error: code, message, ...details}` and whose text is the message.
pub fn error(
    code: &str,
    message: impl Into<String>,
    details: Map<String, Value>,
) -> CallToolResult {
    let message = message.into();
    let mut body = Map::new();
    body.insert("error".into(), json!(code));
    body.insert("message".into(), json!(message));
    body.extend(details);
    with_body(
        CallToolResult::error(vec![ContentBlock::text(message)]),
        Value::Object(body),
    )
}

/// The error code of one of the gate's own replies, if it is one.
pub fn code_of(result: &CallToolResult) -> Option<&str> {
    let body = result
        .structured_content
        .as_ref()
        .or_else(|| result.meta.as_ref().and_then(|m| m.0.get(REPLY_META)))?;
    body.get("error").and_then(Value::as_str)
}

/// Gives one of the gate's own replies its body: `structuredContent`, and
/// the same in `_meta["tollgate/reply"]`.
pub fn with_body(mut result: CallToolResult, body: Value) -> CallToolResult {
    let mut meta = result.meta.take().unwrap_or_default();
    meta.0.insert(REPLY_META.into(), body.clone());
    result.meta = Some(meta);
    result.structured_content = Some(body);
    result
}

/// A tool's result without the `_meta` keys the gate sets itself: one a
/// tool (an upstream) sent would be taken for the gate's reply, which the
/// gate makes `isError` after charging for the result, or for its payment
/// (logged and counted as one).
pub fn tools_own(mut result: CallToolResult) -> CallToolResult {
    if let Some(meta) = result.meta.as_mut() {
        for key in [REPLY_META, PAYMENT_META] {
            if meta.0.remove(key).is_some() {
                tracing::warn!(
                    "a tool's result carried `_meta[\"{key}\"]`, which is the gate's; dropped"
                );
            }
        }
        if meta.0.is_empty() {
            result.meta = None;
        }
    }
    result
}

/// An answer as it goes out for the tool called. Clients check a result of
/// a tool with an `outputSchema` against it and throw, so that the person
/// never sees the payment URL: the TypeScript SDK a result that is not an
/// error and has no `structuredContent`, or any `structuredContent` that
/// does not fit. So the gate's own replies to such a tool are `isError`
/// with no `structuredContent`, their body left in `_meta["tollgate/reply"]`
/// (and their text as it is). For any other tool that copy is dropped.
/// The tool's own results pass unchanged.
pub fn for_tool(mut result: CallToolResult, has_output_schema: bool) -> CallToolResult {
    let Some(meta) = result.meta.as_mut() else {
        return result;
    };
    if !meta.0.contains_key(REPLY_META) {
        return result;
    }
    if has_output_schema {
        result.structured_content = None;
        result.is_error = Some(true);
    } else {
        meta.0.remove(REPLY_META);
        if meta.0.is_empty() {
            result.meta = None;
        }
    }
    result
}

pub fn unavailable(cause: impl std::fmt::Display) -> CallToolResult {
    tracing::error!("payment system unavailable: {cause}");
    error(
        code::UNAVAILABLE,
        "payment system unavailable: the tool did not run and nothing was charged; try again later",
        Map::new(),
    )
}

/// A tool ran but its charge could not be recorded: its result is withheld
/// and nothing is charged.
pub fn unrecorded(payment_id: &str, cause: impl std::fmt::Display) -> CallToolResult {
    tracing::error!(
        payment_id,
        "payment system unavailable after the run: {cause}"
    );
    error(
        code::UNAVAILABLE,
        "payment system unavailable: the charge could not be recorded, so the result is withheld and nothing was charged; try again later",
        details(json!({ "payment_id": payment_id })),
    )
}

/// A paid run whose result could not be stored in time: withheld until it
/// is (in the background), then a retry of the payment id gets it.
pub fn run_unrecorded(payment_id: &str) -> CallToolResult {
    error(
        code::UNAVAILABLE,
        format!(
            "payment system unavailable: the tool ran, but its result and charge could not be \
             recorded yet, so the result is withheld. It is kept as soon as the payment system is \
             back: redeem payment `{payment_id}` again, as you did now, to get it. Nothing more is \
             charged, and it does not run again."
        ),
        details(json!({ "payment_id": payment_id })),
    )
}

/// No intent has this payment id.
pub fn payment_not_found(payment_id: &str) -> CallToolResult {
    error(
        code::PAYMENT_NOT_FOUND,
        format!("no payment with id `{payment_id}`"),
        details(json!({ "payment_id": payment_id })),
    )
}

/// Builds a details map from `json!({...})`.
pub fn details(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

pub fn with_payment(mut result: CallToolResult, payment: Value) -> CallToolResult {
    let mut meta = result.meta.take().unwrap_or_default();
    meta.0.insert(PAYMENT_META.into(), payment);
    result.meta = Some(meta);
    result
}

/// A call a wallet's spending limit refuses: which limit, and when it resets.
pub fn limit_exceeded(breach: &crate::allowance::Breach) -> CallToolResult {
    error(
        code::LIMIT_EXCEEDED,
        format!("{breach}; nothing was charged"),
        details(breach.details()),
    )
}
