//! The `/mcp` body guard: every message a client POSTs is checked the way
//! stdio lines are (`stdio_guard::check`: at most `[http] max_body_bytes`,
//! UTF-8, nested at most 64 deep, JSON) before rmcp reads it. A bad one
//! gets a JSON-RPC error, with its id where it can be read, and a 400 (413
//! when too large), instead of rmcp's 415, and never reaches the gate.

use axum::{
    Json,
    body::{Body, to_bytes},
    extract::{Request, State},
    http::{Method, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
};
use serde_json::Value;
use std::time::Duration;

use crate::stdio_guard;

/// The most a body may hold, from `[http] max_body_bytes`, and how long
/// it may take to arrive, from `[http] request_timeout`.
#[derive(Clone, Copy)]
pub(super) struct BodyLimit {
    pub bytes: usize,
    pub within: Duration,
}

pub(super) async fn guard(
    State(limit): State<BodyLimit>,
    request: Request,
    next: Next,
) -> Response {
    if request.method() != Method::POST {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    // Bounded in time as the other routes are (their timeout cannot cover
    // /mcp, whose answers may stream for long): a client sending its body
    // a byte at a time must not hold a connection for ever.
    let unread = match tokio::time::timeout(limit.within, to_bytes(body, limit.bytes)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) if is_too_large(&e) => Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            stdio_guard::too_large(Value::Null, limit.bytes),
        )),
        Ok(Err(e)) => Err((
            StatusCode::BAD_REQUEST,
            invalid(format!("the body could not be read: {e}")),
        )),
        Err(_) => Err((
            StatusCode::REQUEST_TIMEOUT,
            invalid(format!(
                "the body did not arrive within {}s",
                limit.within.as_secs_f64()
            )),
        )),
    };
    let bytes = match unread {
        Ok(bytes) => bytes,
        Err((status, reply)) => return (status, Json(reply)).into_response(),
    };
    // A byte-order mark is skipped (as on stdio), not handed to rmcp, which
    // would refuse the body in plain text.
    let bytes = match bytes.strip_prefix(b"\xEF\xBB\xBF") {
        Some(_) => bytes.slice(3..),
        None => bytes,
    };
    // Unlike a stdio line, which may be blank, a POST is one message.
    let checked = match bytes.iter().all(u8::is_ascii_whitespace) {
        true => Err(invalid(
            "the body is empty: POST one JSON-RPC message".into(),
        )),
        false => stdio_guard::check(&bytes, limit.bytes),
    };
    if let Err(reply) = checked {
        tracing::warn!("refused a bad /mcp message: {}", reply["error"]["message"]);
        return (StatusCode::BAD_REQUEST, Json(reply)).into_response();
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// A JSON-RPC invalid-request error, with no id (none could be read).
fn invalid(message: String) -> Value {
    stdio_guard::error_reply(Value::Null, stdio_guard::INVALID_REQUEST, message)
}

/// Whether a body failed to be read for being over the limit (not for
/// breaking off, or bad chunked framing).
fn is_too_large(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = e.source();
    }
    false
}
