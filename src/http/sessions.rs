//! The sessions API, in the seed payment API's shape, so that a remote
//! tollgate (or anything else) can use this one as its payment authority:
//! `POST /v1/sessions {amount (minor units), currency, description}` →
//! `{sessionId, url}`; `GET /v1/sessions/{id}` → `{status, …}`; `POST
//! /v1/sessions/{id}/cancel` → the same, after. Nothing here can mark a
//! session paid: only a person at the checkout page (or the CLI).

use std::sync::Arc;

use axum::{
    Extension, Json,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use super::{
    HttpState,
    auth::{Verified, authenticate_once},
};
use crate::{
    keys::{ApiKey, Scope},
    money::{Currency, Units, format_in, from_minor_units, to_minor_units},
    statement,
    store::{LocalSession, SessionStatus, current_session, new_id, now_ms, rfc3339},
};

const MAX_DESCRIPTION: usize = 500;

fn bad_request(field: &str, message: impl Into<String>) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({ "error": "invalid_request", "field": field, "message": message.into() })),
    )
        .into_response()
}

/// A body over `[http] max_body_bytes`, which tower-http's limit (or
/// axum's, for a body sent without a length) refuses in plain text: the API
/// says so in JSON, as it does its other errors.
pub(super) async fn json_too_large(State(limit): State<usize>, response: Response) -> Response {
    if response.status() != StatusCode::PAYLOAD_TOO_LARGE {
        return response;
    }
    let mut reply = bad_request(
        "body",
        format!("larger than {limit} bytes; it was not read"),
    );
    *reply.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
    reply
}

/// The store failed: the cause goes to the log, not to the caller (it can
/// name hosts, files or the database).
fn unavailable(e: impl std::fmt::Display) -> Response {
    tracing::error!("sessions API: payment system unavailable: {e}");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({ "error": "unavailable", "message": "payment system unavailable; try again later" })),
    )
        .into_response()
}

pub async fn create(
    State(state): State<Arc<HttpState>>,
    verified: Option<Extension<Verified>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let key = match caller(&state, verified, &headers, Scope::SessionsCreate).await {
        Ok(key) => key,
        Err(refused) => return refused,
    };
    let body: Value = match serde_json::from_slice(&body) {
        Ok(Value::Object(body)) => Value::Object(body),
        Ok(_) => return bad_request("body", "expected a JSON object"),
        Err(e) => return bad_request("body", format!("not valid JSON: {e}")),
    };
    let currency = match body
        .get("currency")
        .and_then(Value::as_str)
        .map(Currency::parse)
    {
        Some(Ok(currency)) => currency,
        Some(Err(e)) => return bad_request("currency", e.to_string()),
        None => return bad_request("currency", "required: an ISO 4217 code such as \"usd\""),
    };
    let amount = match amount(body.get("amount"), &currency) {
        Ok(units) => units,
        Err(message) => return bad_request("amount", message),
    };
    let description = match body.get("description") {
        None | Some(Value::Null) => String::new(),
        // The description is the payer's statement line's memo: a line
        // break, an escape or a direction override would forge what they
        // read there.
        Some(Value::String(d)) if d.chars().any(statement::forges) => {
            return bad_request(
                "description",
                "must not contain control characters (line breaks, tabs, escapes), \
                 line or paragraph separators, or direction marks",
            );
        }
        Some(Value::String(d)) if d.chars().count() <= MAX_DESCRIPTION => d.clone(),
        Some(Value::String(_)) => {
            return bad_request(
                "description",
                format!("at most {MAX_DESCRIPTION} characters"),
            );
        }
        Some(_) => return bad_request("description", "must be a string"),
    };
    let now = now_ms();
    let session = LocalSession {
        id: new_id("cs"),
        amount,
        currency,
        description,
        status: SessionStatus::Pending,
        created_at: now,
        expires_at: now + state.session_ttl.as_millis() as i64,
        paid_from: None,
        owner: Some(key.principal.clone()),
    };
    if let Err(e) = state.store.create_session(&session).await {
        return unavailable(e);
    }
    tracing::info!(
        session = session.id,
        principal = key.principal,
        "session created through the API"
    );
    let url = format!("{}/checkout/{}", state.checkout_base_url, session.id);
    (
        StatusCode::CREATED,
        Json(json!({ "sessionId": session.id, "url": url })),
    )
        .into_response()
}

/// `amount`: a whole number of minor units above zero.
fn amount(value: Option<&Value>, currency: &Currency) -> Result<Units, String> {
    let number = value.and_then(Value::as_number);
    match number.map(|n| (n, n.as_i64())) {
        Some((_, Some(minor))) if minor > 0 => {
            from_minor_units(minor, currency).map_err(|e| e.to_string())
        }
        // Past i64, serde_json holds a u64 or a float (1e20 for
        // 99999999999999999999, so not echoed): too large, not malformed.
        Some((n, None)) if n.as_f64().is_some_and(|f| f >= i64::MAX as f64) => {
            Err("amount is too large".into())
        }
        _ => Err("required: a whole number of minor units (cents) above zero".into()),
    }
}

pub async fn read(
    State(state): State<Arc<HttpState>>,
    verified: Option<Extension<Verified>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let key = match caller(&state, verified, &headers, Scope::SessionsRead).await {
        Ok(key) => key,
        Err(refused) => return refused,
    };
    match visible_session(&state, &key, &id).await {
        Ok(session) => view(&state, &session).await,
        Err(response) => response,
    }
}

/// Cancels a pending session, so that it can no longer be paid, for the
/// principal that created it (a tollgate whose call was declined, or whose
/// intent ended). Answers as a read does, with the status after: a session
/// paid or ended first keeps what it was, and cancelling again changes
/// nothing, so the caller may retry.
pub async fn cancel(
    State(state): State<Arc<HttpState>>,
    verified: Option<Extension<Verified>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let key = match caller(&state, verified, &headers, Scope::SessionsCreate).await {
        Ok(key) => key,
        Err(refused) => return refused,
    };
    match visible_session(&state, &key, &id).await {
        // Pending past its time is expired, as a read says: left so.
        Ok(session) if session.status != SessionStatus::Pending => {
            return view(&state, &session).await;
        }
        Ok(_) => {}
        Err(response) => return response,
    }
    match state.store.end_session(&id, SessionStatus::Cancelled).await {
        Ok(true) => tracing::info!(
            session = id,
            principal = key.principal,
            "session cancelled through the API"
        ),
        Ok(false) => {}
        Err(e) => return unavailable(e),
    }
    match visible_session(&state, &key, &id).await {
        Ok(session) => view(&state, &session).await,
        Err(response) => response,
    }
}

/// The caller's key, if it has `scope`: the one the rate limit verified,
/// else read from the store; or the answer that refuses it.
async fn caller(
    state: &HttpState,
    verified: Option<Extension<Verified>>,
    headers: &HeaderMap,
    scope: Scope,
) -> Result<ApiKey, Response> {
    let verified = verified.map(|Extension(key)| key);
    authenticate_once(state.store.as_ref(), headers, verified, scope)
        .await
        .map_err(IntoResponse::into_response)
}

/// Session `id` as it is now (a pending one past its time is expired,
/// whoever asks), if `key` may see it; else the answer to give.
async fn visible_session(
    state: &HttpState,
    key: &ApiKey,
    id: &str,
) -> Result<LocalSession, Response> {
    match current_session(state.store.as_ref(), id).await {
        Ok(Some(session)) if visible_to(&session, key) => Ok(session),
        Ok(_) => Err((
            StatusCode::NOT_FOUND,
            Json(json!({ "error": "not_found", "message": format!("no session `{id}`") })),
        )
            .into_response()),
        Err(e) => Err(unavailable(e)),
    }
}

/// A session as the API shows it, with what `tollgate refund` gave back of
/// its payment: the tollgate that made it must not run its call for money
/// the payer has back.
async fn view(state: &HttpState, session: &LocalSession) -> Response {
    let refunded = match session.status {
        SessionStatus::Paid => match state.store.refunded(&session.id).await {
            Ok(refunded) => refunded,
            Err(e) => return unavailable(e),
        },
        _ => Units(0),
    };
    Json(view_json(session, refunded)).into_response()
}

/// A session as the API shows it. `amount` is in minor units, as the API
/// speaks; a session the gate opened for a price finer than that (an
/// admin's key sees those too) has none, and shows `null` there, never a
/// rounded figure. `value` is the exact amount in major units. A paid
/// session refunded says how much (`refunded` in minor units,
/// `refundedValue` exact); refunded whole, it reads `refunded`: its payment
/// no longer pays for the call it was made for. (Refunded in part, it still
/// reads `paid`: ending its call would leave the rest here with nothing
/// to give it back.)
fn view_json(session: &LocalSession, refunded: Units) -> Value {
    let status = if refunded.0 > 0 && refunded >= session.amount {
        "refunded"
    } else {
        session.status.as_str()
    };
    let mut view = json!({
        "sessionId": session.id,
        "status": status,
        "amount": to_minor_units(session.amount, &session.currency).ok(),
        "value": format_in(session.amount, &session.currency),
        "currency": session.currency.as_str().to_ascii_lowercase(),
        "description": session.description,
        "createdAt": rfc3339(session.created_at),
        "expiresAt": rfc3339(session.expires_at),
    });
    if refunded.0 > 0 {
        view["refunded"] = json!(to_minor_units(refunded, &session.currency).ok());
        view["refundedValue"] = json!(format_in(refunded, &session.currency));
    }
    view
}

/// A session is visible to the principal that created it, and to admins.
fn visible_to(session: &LocalSession, key: &ApiKey) -> bool {
    key.allows(Scope::Admin) || session.owner.as_deref() == Some(key.principal.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_amount_past_any_number_is_too_large_not_missing() {
        let usd = Currency::parse("USD").unwrap();
        let said = |text: &str| {
            let value: Value = serde_json::from_str(text).unwrap();
            amount(Some(&value), &usd)
        };
        assert_eq!(said("250"), Ok(Units::parse("2.50").unwrap()));
        for text in [
            "9223372036854775807",
            "18446744073709551615",
            "99999999999999999999",
        ] {
            let e = said(text).unwrap_err();
            assert!(
                e.starts_with("amount ") && e.ends_with("is too large"),
                "{text}: {e}"
            );
        }
        for text in ["0", "-99999999999999999999", "2.5", "\"250\"", "null"] {
            assert!(said(text).unwrap_err().starts_with("required"), "{text}");
        }
    }

    #[test]
    fn an_amount_finer_than_a_cent_is_shown_exactly_never_rounded() {
        let session_in = |amount: &str, currency: &str| LocalSession {
            id: "pay_1".into(),
            amount: Units::parse(amount).unwrap(),
            currency: Currency::parse(currency).unwrap(),
            description: String::new(),
            status: SessionStatus::Pending,
            created_at: 0,
            expires_at: 0,
            paid_from: None,
            owner: None,
        };
        let session = |amount: &str| session_in(amount, "USD");
        let whole = view_json(&session("2.50"), Units(0));
        assert_eq!(
            (whole["amount"].clone(), whole["value"].clone()),
            (json!(250), json!("2.50"))
        );
        let finer = view_json(&session("0.0025"), Units(0));
        assert_eq!(finer["amount"], Value::Null, "not 0");
        assert_eq!(finer["value"], "0.0025");
        // In the currency's own digits: whole yen show none.
        let yen = view_json(&session_in("500", "JPY"), Units(0));
        assert_eq!(
            (yen["amount"].clone(), yen["value"].clone()),
            (json!(500), json!("500"))
        );
    }
}
