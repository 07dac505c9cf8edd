//! The checkout page, `/checkout/<id>`: a plain HTML page (no scripts) where
//! a person sees what a payment is for and pays it, approves it, or declines
//! it. Paying from a wallet takes that wallet's API key, so a page URL alone
//! can never spend anyone's money; settling without a wallet is for
//! development and only offered when `[provider] dev_settle = true`.
//!
//! Every form carries a token bound to the session (an HMAC), and a POST
//! whose `Origin` is another site's is refused: no cross-site request can
//! act here. A POST answers with a redirect to the page (so a reload does not
//! resubmit), and a second submit finds the session no longer pending and
//! takes nothing.

use std::sync::Arc;

use axum::{
    Form,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{Html, IntoResponse, Redirect, Response},
};
use serde::Deserialize;
use tokio::time::Instant;

use super::{
    HttpState,
    auth::{AuthError, authenticate_key},
    host_guard::site,
};
use crate::{
    keys::Scope,
    money::format_in,
    store::{
        ApprovalStatus, LocalSession, SessionStatus, StoreError, current_session, now_ms, rfc3339,
    },
};

const CSRF: &str = "checkout";

#[derive(Deserialize)]
pub struct Action {
    action: String,
    csrf: String,
    #[serde(default)]
    api_key: String,
}

#[derive(Deserialize, Default)]
pub struct Shown {
    done: Option<String>,
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn page(status: StatusCode, title: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title}</title><style>\
         body{{font-family:system-ui,sans-serif;max-width:34rem;margin:3rem auto;padding:0 1rem;color:#222}}\
         table{{border-collapse:collapse;margin:1rem 0}}td,th{{text-align:left;padding:.3rem .8rem .3rem 0}}\
         form{{margin:1rem 0;padding:1rem;border:1px solid #ccc;border-radius:.4rem}}\
         button{{padding:.4rem 1rem}}.msg{{padding:.6rem;border-radius:.3rem;background:#eef}}\
         .err{{background:#fee}}</style></head><body><h1>{title}</h1>{body}</body></html>",
        title = escape(title)
    );
    // Never framed: a page that takes a wallet's key must not sit under
    // another site's overlay (clickjacking).
    (
        status,
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::CONTENT_SECURITY_POLICY, "frame-ancestors 'none'"),
        ],
        Html(html),
    )
        .into_response()
}

/// What the session is for, from its intent when the gate opened it.
struct CheckoutView {
    session: LocalSession,
    tool: Option<String>,
    approval_wallet: Option<String>,
    /// The call is above its approval threshold and nobody has said yes
    /// (or a person said no, as the payment was still open): paying it is
    /// that yes, so it takes a person's key.
    needs_approval: bool,
}

async fn load(state: &HttpState, id: &str) -> Result<Option<CheckoutView>, StoreError> {
    let Some(session) = current_session(state.store.as_ref(), id).await? else {
        return Ok(None);
    };
    let intent = state.store.intent(id).await?;
    let approval_wallet = intent
        .as_ref()
        .filter(|i| i.is_approval())
        .and_then(|i| i.principal.clone());
    let needs_approval = intent
        .as_ref()
        .and_then(|i| i.approval.as_ref())
        .is_some_and(|a| matches!(a.status, ApprovalStatus::Waiting | ApprovalStatus::Declined));
    Ok(Some(CheckoutView {
        tool: intent.map(|i| i.tool),
        approval_wallet,
        needs_approval,
        session,
    }))
}

fn not_found(id: &str) -> Response {
    page(
        StatusCode::NOT_FOUND,
        "No such payment",
        &format!("<p>There is no payment <code>{}</code>.</p>", escape(id)),
    )
}

fn render(
    state: &HttpState,
    shown: &CheckoutView,
    message: Option<(&str, bool)>,
    status: StatusCode,
) -> Response {
    let s = &shown.session;
    let figure = format_in(s.amount, &s.currency);
    let amount = format!("{figure} {}", s.currency);
    let what = shown.tool.as_deref().map_or_else(
        || escape(&s.description),
        |t| format!("tool <code>{}</code>", escape(t)),
    );
    let title = match (&shown.approval_wallet, s.status) {
        (Some(_), SessionStatus::Pending) => format!("Approve {amount}"),
        (_, SessionStatus::Pending) => format!("Pay {amount}"),
        (_, SessionStatus::Paid) => format!("Paid: {amount}"),
        (_, other) => format!("Payment {}", other.as_str()),
    };
    let mut body = String::new();
    if let Some((text, is_error)) = message {
        body.push_str(&format!(
            "<p class=\"msg{}\" id=\"message\">{}</p>",
            if is_error { " err" } else { "" },
            escape(text)
        ));
    }
    body.push_str(&format!(
        "<table><tr><th>For</th><td>{what}</td></tr><tr><th>Amount</th><td id=\"amount\">{}</td></tr>\
         <tr><th>Currency</th><td>{}</td></tr><tr><th>Expires</th><td>{}</td></tr>\
         <tr><th>Status</th><td id=\"status\">{}</td></tr></table>",
        figure,
        s.currency,
        rfc3339(s.expires_at),
        s.status.as_str()
    ));
    match s.status {
        SessionStatus::Pending => {
            let csrf = state.signer.tag(CSRF, &s.id);
            let hidden = format!("<input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">");
            let (legend, button) = match &shown.approval_wallet {
                Some(wallet) => (
                    format!("Approve charging {amount} to wallet <b>{}</b>: enter that wallet's API key.", escape(wallet)),
                    "Approve",
                ),
                None if shown.needs_approval => (
                    format!("Pay {amount} from your wallet: it is above the approval threshold, so enter a person's key for it (approve scope)."),
                    "Pay",
                ),
                None => (format!("Pay {amount} from your wallet: enter its API key."), "Pay"),
            };
            body.push_str(&format!(
                "<form method=\"post\" id=\"pay\">{hidden}<input type=\"hidden\" name=\"action\" value=\"pay\">\
                 <p>{legend}</p><p><input type=\"password\" name=\"api_key\" id=\"api_key\" autocomplete=\"off\" \
                 size=\"40\" required></p><button type=\"submit\" id=\"pay_button\">{button}</button></form>"
            ));
            if state.dev_settle && shown.approval_wallet.is_none() {
                body.push_str(&format!(
                    "<form method=\"post\" id=\"settle\">{hidden}<input type=\"hidden\" name=\"action\" value=\"settle\">\
                     <p>Development mode: settle without a wallet.</p>\
                     <button type=\"submit\" id=\"settle_button\">Settle (dev mode)</button></form>"
                ));
            }
            body.push_str(&format!(
                "<form method=\"post\" id=\"decline\">{hidden}<input type=\"hidden\" name=\"action\" value=\"decline\">\
                 <button type=\"submit\" id=\"decline_button\">Decline</button></form>"
            ));
        }
        SessionStatus::Paid => body.push_str(
            "<p id=\"final\">This payment is complete. Go back to your assistant: the call can go ahead.</p>",
        ),
        SessionStatus::Expired => body.push_str("<p id=\"final\">This payment request has expired. Nothing was taken.</p>"),
        SessionStatus::Failed => {
            body.push_str("<p id=\"final\">This payment was declined. Nothing was taken.</p>")
        }
        SessionStatus::Cancelled => body.push_str(
            "<p id=\"final\">This payment request was cancelled. Nothing was taken.</p>",
        ),
    }
    page(status, &title, &body)
}

pub async fn show(
    State(state): State<Arc<HttpState>>,
    Path(id): Path<String>,
    axum::extract::Query(shown): axum::extract::Query<Shown>,
) -> Response {
    match load(&state, &id).await {
        Ok(Some(loaded)) => {
            // The banner after a form says what happened only if the
            // session agrees: `?done=` is part of a URL anyone can write.
            let status = loaded.session.status;
            let message = match shown.done.as_deref() {
                Some("paid") if status == SessionStatus::Paid => Some(("Paid. Thank you.", false)),
                Some("approved") if status == SessionStatus::Paid => {
                    Some(("Approved and paid from the wallet.", false))
                }
                Some("declined") if status == SessionStatus::Failed => {
                    Some(("Declined. Nothing was taken.", false))
                }
                _ => None,
            };
            render(&state, &loaded, message, StatusCode::OK)
        }
        Ok(None) => not_found(&id),
        Err(e) => unavailable(&id, &e),
    }
}

/// The store failed: the details go to the log, not to the page (they can
/// name hosts and databases).
fn unavailable(id: &str, e: &StoreError) -> Response {
    tracing::warn!(session = id, "checkout: payment system unavailable: {e}");
    page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Unavailable",
        "<p>The payment system is unavailable. Nothing was changed; try again shortly.</p>",
    )
}

/// Whether a POST comes from this site (or one allowed), judged by its
/// `Origin` (or, lacking that, `Referer`). A request with neither is not a
/// browser's cross-site form, which always sends `Origin` on POST. This site
/// is the address asked for (`Host`) and the public one the checkout URLs
/// name (`checkout_base_url`), which a reverse proxy in front may not pass
/// on as `Host`.
fn same_site(state: &HttpState, headers: &HeaderMap) -> bool {
    let claimed = headers
        .get(header::ORIGIN)
        .or_else(|| headers.get(header::REFERER))
        .and_then(|v| v.to_str().ok());
    let Some(claimed) = claimed else {
        return true;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let Some(claimed) = site(claimed) else {
        return false;
    };
    [host, state.checkout_base_url.as_str()]
        .into_iter()
        .chain(state.allowed_origins.iter().map(String::as_str))
        .any(|allowed| site(allowed).as_ref() == Some(&claimed))
}

/// Why a checkout action did not go through.
enum Failed {
    Store(StoreError),
    /// No answer in time: the write may still land (or may not).
    Unconfirmed,
}

/// A checkout's write, given until `deadline`, shortly before the route's
/// own timeout, which would answer a bare 408 while the write may land.
async fn in_time<T>(
    deadline: Instant,
    write: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, Failed> {
    match tokio::time::timeout_at(deadline, write).await {
        Ok(done) => done.map_err(Failed::Store),
        Err(_) => Err(Failed::Unconfirmed),
    }
}

/// A read before the write, given until `deadline`: `None` if it did not
/// answer in time (then nothing was written).
async fn read_in_time<T>(deadline: Instant, read: impl Future<Output = T>) -> Option<T> {
    tokio::time::timeout_at(deadline, read).await.ok()
}

/// The answer when the store was too slow to start a payment: nothing
/// was changed.
fn too_slow(id: &str) -> Response {
    tracing::warn!(
        session = id,
        "checkout: the payment system is too slow to answer"
    );
    page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Unavailable",
        "<p>The payment system is slow to answer. Nothing was changed; try again shortly.</p>",
    )
}

pub async fn act(
    State(state): State<Arc<HttpState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Form(form): Form<Action>,
) -> Response {
    // Every store call below ends by then: the page, not the route's
    // timeout, answers.
    let deadline = Instant::now() + state.write_timeout;
    if !same_site(&state, &headers) {
        return page(
            StatusCode::FORBIDDEN,
            "Refused",
            "<p>This form was sent from another site.</p>",
        );
    }
    if !state.signer.check_tag(CSRF, &id, &form.csrf) {
        return page(
            StatusCode::FORBIDDEN,
            "Refused",
            "<p>This form is stale or forged. Reload the page.</p>",
        );
    }
    let loaded = match read_in_time(deadline, load(&state, &id)).await {
        Some(Ok(Some(loaded))) => loaded,
        Some(Ok(None)) => return not_found(&id),
        Some(Err(e)) => return unavailable(&id, &e),
        None => return too_slow(&id),
    };
    if loaded.session.status != SessionStatus::Pending {
        let message = format!(
            "This payment is already {}; nothing more was done.",
            loaded.session.status.as_str()
        );
        return render(
            &state,
            &loaded,
            Some((&message, true)),
            StatusCode::CONFLICT,
        );
    }
    // Who paid or approved, for the log.
    let mut payer = None;
    let outcome = match form.action.as_str() {
        "pay" => {
            // Only a key that may spend its wallet (scope `mcp` or
            // `approve`, or admin) pays: a `sessions:create` or
            // `sessions:read` key never moves money. An approval needs a
            // person's key (`approve`): the `mcp` key is the agent's own.
            let checked = authenticate_key(state.store.as_ref(), form.api_key.trim());
            let Some(checked) = read_in_time(deadline, checked).await else {
                return too_slow(&id);
            };
            let approving = loaded.approval_wallet.is_some() || loaded.needs_approval;
            let key = match checked {
                Ok(key) if key.allows(Scope::Approve) => key,
                Ok(key) if key.allows(Scope::Mcp) && !approving => key,
                Ok(key) => {
                    tracing::info!(
                        session = id,
                        principal = key.principal,
                        "checkout refused a key without the scope to pay or approve"
                    );
                    let message = if approving && key.allows(Scope::Mcp) {
                        "That API key may pay, but not approve a charge above the threshold: \
                         that needs a person's key, with the approve scope, not the one a client \
                         calls tools with."
                    } else {
                        "That API key may not spend its wallet (it needs the mcp or approve scope)."
                    };
                    return render(
                        &state,
                        &loaded,
                        Some((message, true)),
                        StatusCode::FORBIDDEN,
                    );
                }
                Err(AuthError::Store(e)) => return unavailable(&id, &e),
                Err(_) => {
                    tracing::warn!(
                        session = id,
                        "checkout refused an API key that is not valid"
                    );
                    return render(
                        &state,
                        &loaded,
                        Some(("That API key is not valid.", true)),
                        StatusCode::UNAUTHORIZED,
                    );
                }
            };
            if let Some(wallet) = &loaded.approval_wallet
                && wallet != &key.principal
            {
                let message = format!("Only the key of wallet {wallet} can approve this charge.");
                return render(
                    &state,
                    &loaded,
                    Some((&message, true)),
                    StatusCode::FORBIDDEN,
                );
            }
            let done = if loaded.approval_wallet.is_some() {
                "approved"
            } else {
                "paid"
            };
            payer = Some(key.principal.clone());
            let paying = state.store.pay_session(&id, Some(&key.principal), now_ms());
            in_time(deadline, paying).await.map(|_| done)
        }
        "settle" if state.dev_settle && loaded.approval_wallet.is_none() => {
            payer = Some("dev settlement".to_owned());
            let settling = state.store.pay_session(&id, None, now_ms());
            in_time(deadline, settling).await.map(|_| "paid")
        }
        // A person's no ends the session failed, as a declined card would
        // (and `tollgate sessions decline`): `cancelled` is the requester
        // withdrawing it.
        "decline" => {
            let declining = state.store.end_session(&id, SessionStatus::Failed);
            match in_time(deadline, declining).await {
                Ok(true) => Ok("declined"),
                // Paid (or ended) since the page was loaded: say so below.
                Ok(false) => Err(Failed::Store(StoreError::WrongState {
                    what: "this payment".into(),
                    status: "no longer pending".into(),
                    expected: "pending",
                })),
                Err(e) => Err(e),
            }
        }
        _ => {
            return render(
                &state,
                &loaded,
                Some(("That action is not available here.", true)),
                StatusCode::BAD_REQUEST,
            );
        }
    };
    match outcome {
        Ok(done) => {
            tracing::info!(session = id, done, payer, "checkout");
            Redirect::to(&format!("/checkout/{id}?done={done}")).into_response()
        }
        Err(Failed::Unconfirmed) => {
            tracing::warn!(
                session = id,
                "checkout: the payment system did not answer in time; the outcome is not known"
            );
            page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Not confirmed",
                "<p>The payment system did not answer in time, so this page cannot say whether \
                 it went through. Reload this page to see the payment's status before trying \
                 again.</p>",
            )
        }
        Err(Failed::Store(e)) => {
            // What the person can act on is shown; a failing store is not
            // described (see `unavailable`).
            let status = match e {
                StoreError::InsufficientFunds { .. } => StatusCode::PAYMENT_REQUIRED,
                StoreError::OverLimit(_) => StatusCode::FORBIDDEN,
                StoreError::WrongState { .. } => StatusCode::CONFLICT,
                StoreError::NotFound(_) => StatusCode::NOT_FOUND,
                StoreError::Invalid(_) => StatusCode::BAD_REQUEST,
                _ => return unavailable(&id, &e),
            };
            tracing::info!(session = id, payer, "checkout refused: {e}");
            let reloaded = read_in_time(deadline, load(&state, &id)).await;
            let loaded = reloaded.and_then(|r| r.ok().flatten()).unwrap_or(loaded);
            render(&state, &loaded, Some((&e.to_string(), true)), status)
        }
    }
}
