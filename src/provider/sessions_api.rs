//! A client for the sessions API (`POST /v1/sessions`, `GET
//! /v1/sessions/{id}`, `POST /v1/sessions/{id}/cancel`, Bearer key), so that a tollgate can take payments
//! through another payment authority, such as a remote tollgate, without
//! holding any secret that can mark a payment paid. Amounts go out in minor
//! units; an amount finer than that is refused, never rounded.

use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::json;

use super::{Provider, ProviderError, ProviderSession, SessionRequest, SessionState};
use crate::{
    money::{Currency, Units, from_minor_units, to_minor_units},
    store::{Funding, SessionStatus},
};

const ATTEMPTS: u32 = 3;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest `Retry-After` waited out before a retry.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(2);

pub struct SessionsApiProvider {
    http: reqwest::Client,
    base: String,
    identity: String,
    api_key: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Created {
    session_id: String,
    url: String,
}

/// A session's status. The seed API answers `{"status": …}` alone; a
/// tollgate also says which session, and for how much, which are checked
/// when given.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Status {
    session_id: Option<String>,
    status: String,
    /// Minor units.
    amount: Option<i64>,
    currency: Option<String>,
}

impl SessionsApiProvider {
    pub fn new(base: &str, api_key: String) -> Result<Self, ProviderError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| ProviderError::Unavailable(e.to_string()))?;
        let base = base.trim_end_matches('/').to_owned();
        Ok(Self {
            http,
            identity: identity(&base),
            base,
            api_key,
        })
    }

    /// Sends with retries and backoff. A POST is retried only when it never
    /// reached the server (so a session is never created twice); a GET on
    /// any transient failure.
    async fn send(
        &self,
        request: impl Fn() -> reqwest::RequestBuilder,
        idempotent: bool,
    ) -> Result<reqwest::Response, ProviderError> {
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 1;
        loop {
            let outcome = request().bearer_auth(&self.api_key).send().await;
            let retry = match &outcome {
                Ok(r) => idempotent && transient(r.status()),
                Err(e) => e.is_connect() || (idempotent && e.is_timeout()),
            };
            // A rate limit says when to come back: sooner is refused again,
            // and later than a call can wait is given up at once.
            let wait = match outcome.as_ref().map(retry_after) {
                Ok(Some(after)) if after > MAX_RETRY_AFTER => None,
                Ok(Some(after)) => Some(after),
                _ => Some(backoff),
            };
            let Some(wait) = wait.filter(|_| retry && attempt < ATTEMPTS) else {
                return outcome.map_err(|e| ProviderError::Unavailable(e.to_string()));
            };
            tracing::debug!(attempt, "sessions API call failed; retrying in {wait:?}");
            tokio::time::sleep(wait).await;
            backoff *= 2;
            attempt += 1;
        }
    }
}

/// `sessions_api at` the base URL's origin (scheme, host, port). The
/// identity is recorded on intents and shown to callers, so nothing else
/// of the URL goes in it: credentials, a path or a query may carry a token.
fn identity(base: &str) -> String {
    match reqwest::Url::parse(base) {
        Ok(url) => format!("sessions_api at {}", url.origin().ascii_serialization()),
        Err(_) => "sessions_api at an unreadable URL".to_owned(),
    }
}

/// How long a `429` or `503` asks to be left alone (`Retry-After` in
/// seconds, or the seed's `X-RateLimit-Reset` as seconds from now when
/// small, else as a Unix time).
fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    let header = |name| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    if let Some(seconds) = header("retry-after") {
        return Some(Duration::from_secs(seconds));
    }
    if response.status() != reqwest::StatusCode::TOO_MANY_REQUESTS {
        return None;
    }
    let reset = header("x-ratelimit-reset")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // A reset under a day's seconds is a delay; anything else a time.
    Some(Duration::from_secs(if reset < 86_400 {
        reset
    } else {
        reset.saturating_sub(now)
    }))
}

/// A refusal that may not hold next time: the remote failed, was busy, or
/// took too long (a tollgate answers 408 when its own time limit runs out).
/// Anything else of the 4xx is for good: a cancel refused so is given up.
fn transient(status: reqwest::StatusCode) -> bool {
    use reqwest::StatusCode;
    status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
}

async fn check(
    response: reqwest::Response,
    id: Option<&str>,
) -> Result<reqwest::Response, ProviderError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    if status == reqwest::StatusCode::NOT_FOUND
        && let Some(id) = id
    {
        return Err(ProviderError::NotFound(id.to_owned()));
    }
    let body = response.text().await.unwrap_or_default();
    let body: String = body.chars().take(300).collect();
    if status.is_client_error() && !transient(status) {
        Err(ProviderError::Refused(format!("{status}: {body}")))
    } else {
        Err(ProviderError::Unavailable(format!("{status}: {body}")))
    }
}

/// A session's status, and its amount and currency when the API says
/// them, from the API's answer about session `id`, which must be about
/// that session.
async fn read_status(
    response: reqwest::Response,
    id: &str,
) -> Result<(SessionStatus, Option<(Units, Currency)>), ProviderError> {
    let status: Status = check(response, Some(id))
        .await?
        .json()
        .await
        .map_err(|e| ProviderError::Unreadable(e.to_string()))?;
    let unreadable = |what: String| ProviderError::Unreadable(format!("the provider {what}"));
    if let Some(answered_for) = status.session_id.as_deref().filter(|s| *s != id) {
        return Err(unreadable(format!(
            "answered for session `{answered_for}` when asked about `{id}`"
        )));
    }
    let charged = match (status.amount, status.currency.as_deref()) {
        (None, None) => None,
        (Some(amount), Some(currency)) => {
            // As recorded there: the gate compares it with the intent's own.
            let currency = Currency::recorded(currency)
                .map_err(|e| unreadable(format!("reported a session in {e}")))?;
            let amount = from_minor_units(amount, &currency)
                .map_err(|e| unreadable(format!("reported an amount it cannot mean: {e}")))?;
            Some((amount, currency))
        }
        _ => {
            return Err(unreadable(
                "reported an amount without its currency, or a currency without an amount".into(),
            ));
        }
    };
    let session_status = match status.status.to_ascii_lowercase().as_str() {
        // Both spellings are in use.
        "canceled" => SessionStatus::Cancelled,
        // Paid, then given back (a tollgate's operator refunded it): it
        // pays for no call any more.
        "refunded" => SessionStatus::Cancelled,
        other => SessionStatus::parse(other).ok_or_else(|| {
            unreadable(format!(
                "reported an unknown session status `{}`",
                status.status
            ))
        })?,
    };
    Ok((session_status, charged))
}

#[async_trait]
impl Provider for SessionsApiProvider {
    fn name(&self) -> &'static str {
        "sessions_api"
    }

    fn identity(&self) -> &str {
        &self.identity
    }

    async fn create_session(&self, req: &SessionRequest) -> Result<ProviderSession, ProviderError> {
        let minor = to_minor_units(req.amount, &req.currency)
            .map_err(|e| ProviderError::Refused(e.to_string()))?;
        let body = json!({
            "amount": minor,
            "currency": req.currency.as_str().to_ascii_lowercase(),
            "description": req.description,
        });
        let url = format!("{}/v1/sessions", self.base);
        let response = self
            .send(|| self.http.post(&url).json(&body), false)
            .await?;
        let created: Created = check(response, None)
            .await?
            .json()
            .await
            .map_err(|e| ProviderError::Unreadable(e.to_string()))?;
        Ok(ProviderSession {
            id: created.session_id,
            url: created.url,
        })
    }

    async fn session_state(&self, id: &str) -> Result<SessionState, ProviderError> {
        let url = format!("{}/v1/sessions/{id}", self.base);
        let response = self.send(|| self.http.get(&url), true).await?;
        let (status, charged) = read_status(response, id).await?;
        Ok(SessionState {
            status,
            funding: Funding::External {
                account: self.name().to_owned(),
            },
            charged,
        })
    }

    async fn cancel_session(&self, id: &str) -> Result<SessionStatus, ProviderError> {
        // A cancel is idempotent (a second one finds the session ended), so
        // it is retried like a read.
        let url = format!("{}/v1/sessions/{id}/cancel", self.base);
        let response = self.send(|| self.http.post(&url), true).await?;
        Ok(read_status(response, id).await?.0)
    }

    async fn pay_from_wallet(&self, _id: &str, _wallet: &str) -> Result<(), ProviderError> {
        Err(ProviderError::Unsupported(
            "pay a remote session from a local wallet",
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    use axum::{Json, Router, extract::State, http::StatusCode, routing::get};

    use super::*;
    use crate::money::{Currency, Units};

    /// A remote is recorded on intents by its origin, never with the
    /// credentials, path or query its URL may carry.
    #[test]
    fn a_remote_is_known_by_its_origin_alone() {
        let named = |base: &str| SessionsApiProvider::new(base, "k".into()).unwrap().identity;
        assert_eq!(
            named("https://user:secret@pay.example/t/SECRET/?token=x"),
            "sessions_api at https://pay.example"
        );
        assert_eq!(
            named("http://127.0.0.1:8080/"),
            "sessions_api at http://127.0.0.1:8080"
        );
        assert_ne!(named("https://a.example"), named("https://b.example"));
    }

    /// A sessions API that fails `failures` times, then answers.
    async fn flaky(failures: usize) -> (String, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let app = Router::new()
            .route(
                "/v1/sessions/{id}",
                get(
                    move |State(calls): State<Arc<AtomicUsize>>,
                          axum::extract::Path(id): axum::extract::Path<String>| async move {
                        if calls.fetch_add(1, Ordering::SeqCst) < failures {
                            Err(StatusCode::SERVICE_UNAVAILABLE)
                        } else {
                            // Session `cs_other` answers as another one.
                            let id = if id == "cs_other" { "cs_1".into() } else { id };
                            Ok(Json(json!({"sessionId": id, "status": "PAID",
                                           "amount": 500, "currency": "usd"})))
                        }
                    },
                ),
            )
            .route(
                "/v1/sessions",
                axum::routing::post(|State(calls): State<Arc<AtomicUsize>>| async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    StatusCode::INTERNAL_SERVER_ERROR
                }),
            )
            .with_state(calls.clone());
        (serve(app).await, calls)
    }

    /// Serves `app` on a port of its own; its base URL.
    async fn serve(app: Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    fn request(amount: &str) -> SessionRequest {
        SessionRequest {
            payment_id: "pay_1".into(),
            amount: Units::parse(amount).unwrap(),
            currency: Currency::parse("USD").unwrap(),
            description: "test".into(),
            expires_at: 0,
        }
    }

    #[tokio::test]
    async fn status_reads_are_retried_with_backoff() {
        let (base, calls) = flaky(2).await;
        let provider = SessionsApiProvider::new(&base, "key".into()).unwrap();
        let state = provider.session_state("cs_1").await.unwrap();
        assert_eq!(state.status, SessionStatus::Paid);
        let usd = Currency::parse("USD").unwrap();
        assert_eq!(state.charged, Some((Units::parse("5.00").unwrap(), usd)));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            3,
            "two failures, then the answer"
        );
        assert_eq!(
            state.funding,
            Funding::External {
                account: "sessions_api".into()
            }
        );
        // An answer about another session than the one asked about is not
        // taken for it.
        let other = provider.session_state("cs_other").await;
        assert!(
            matches!(&other, Err(ProviderError::Unreadable(m)) if m.contains("answered for session `cs_1`")),
            "{:?}",
            other.map(|s| s.status)
        );

        let (base, calls) = flaky(10).await;
        let provider = SessionsApiProvider::new(&base, "key".into()).unwrap();
        assert!(matches!(
            provider.session_state("cs_1").await,
            Err(ProviderError::Unavailable(_))
        ));
        assert_eq!(calls.load(Ordering::SeqCst), ATTEMPTS as usize, "bounded");
    }

    /// The seed API answers a status read with `{"status": …}` alone: taken
    /// as it is (the session was made here for the intent's amount), in
    /// either spelling of "cancelled". Every such answer was unreadable,
    /// and a session paid there never ran its call.
    #[tokio::test]
    async fn a_seed_shaped_status_answer_is_read() {
        let app = Router::new().route(
            "/v1/sessions/{id}",
            get(
                |axum::extract::Path(id): axum::extract::Path<String>| async move {
                    Json(match id.as_str() {
                        "sess_paid" => json!({"status": "paid"}),
                        "sess_pending" => json!({"status": "pending"}),
                        "sess_canceled" => json!({"status": "canceled"}),
                        "sess_refunded" => json!({"status": "refunded"}),
                        _ => json!({"status": "paid", "amount": 500}),
                    })
                },
            ),
        );
        let provider = SessionsApiProvider::new(&serve(app).await, "key".into()).unwrap();
        let paid = provider.session_state("sess_paid").await.unwrap();
        assert_eq!((paid.status, paid.charged), (SessionStatus::Paid, None));
        let status = async |id| provider.session_state(id).await.map(|s| s.status);
        assert_eq!(
            status("sess_pending").await.unwrap(),
            SessionStatus::Pending
        );
        assert_eq!(
            status("sess_canceled").await.unwrap(),
            SessionStatus::Cancelled
        );
        // Given back by a tollgate's operator: it pays for nothing now.
        assert_eq!(
            status("sess_refunded").await.unwrap(),
            SessionStatus::Cancelled
        );
        let half = status("sess_half").await;
        assert!(
            matches!(&half, Err(ProviderError::Unreadable(m)) if m.contains("without its currency")),
            "{half:?}"
        );
    }

    /// A rate limit that asks to be left alone longer than a call can wait
    /// is given up at once (it was asked twice more within 300 ms, and
    /// refused each time); one that asks for a moment is waited out.
    #[tokio::test]
    async fn a_rate_limit_is_waited_out_or_given_up_as_it_asks() {
        let limited = async |headers: &'static [(&'static str, &'static str)]| {
            let calls = Arc::new(AtomicUsize::new(0));
            let app = Router::new()
                .route(
                    "/v1/sessions/{id}",
                    get(move |State(calls): State<Arc<AtomicUsize>>| async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        let mut response = axum::response::IntoResponse::into_response(
                            StatusCode::TOO_MANY_REQUESTS,
                        );
                        for (name, value) in headers {
                            response
                                .headers_mut()
                                .insert(*name, axum::http::HeaderValue::from_static(value));
                        }
                        response
                    }),
                )
                .with_state(calls.clone());
            let provider = SessionsApiProvider::new(&serve(app).await, "key".into()).unwrap();
            let asked = provider.session_state("cs_1").await;
            assert!(
                matches!(asked, Err(ProviderError::Unavailable(_))),
                "{:?}",
                asked.map(|s| s.status)
            );
            calls.load(Ordering::SeqCst)
        };
        assert_eq!(limited(&[("retry-after", "60")]).await, 1);
        assert_eq!(limited(&[("x-ratelimit-reset", "4102444800")]).await, 1);
        assert_eq!(limited(&[("retry-after", "0")]).await, ATTEMPTS as usize);
        assert_eq!(limited(&[]).await, ATTEMPTS as usize);
    }

    /// A remote that runs out of its own time answers 408: that cancel may
    /// yet go through, so it is retried and the payment kept open, not
    /// taken for a refusal that ends the call here. (It was one.)
    #[tokio::test]
    async fn a_cancel_that_timed_out_there_is_tried_again_not_given_up() {
        let calls = Arc::new(AtomicUsize::new(0));
        let app = Router::new()
            .route(
                "/v1/sessions/{id}/cancel",
                axum::routing::post(|State(calls): State<Arc<AtomicUsize>>| async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    StatusCode::REQUEST_TIMEOUT
                }),
            )
            .with_state(calls.clone());
        let provider = SessionsApiProvider::new(&serve(app).await, "key".into()).unwrap();
        let cancelled = provider.cancel_session("cs_1").await;
        assert!(
            matches!(cancelled, Err(ProviderError::Unavailable(_))),
            "{cancelled:?}"
        );
        assert_eq!(calls.load(Ordering::SeqCst), ATTEMPTS as usize);
    }

    /// An answer that is neither a success nor a refusal (a redirect not
    /// followed) says nothing for good: the remote is taken as unavailable.
    #[tokio::test]
    async fn an_unfollowed_redirect_is_unavailable_not_a_refusal() {
        let app = Router::new().route(
            "/v1/sessions/{id}",
            get(|| async { StatusCode::MULTIPLE_CHOICES }),
        );
        let provider = SessionsApiProvider::new(&serve(app).await, "key".into()).unwrap();
        let asked = provider.session_state("cs_1").await;
        assert!(
            matches!(asked, Err(ProviderError::Unavailable(_))),
            "{:?}",
            asked.map(|s| s.status)
        );
    }

    #[tokio::test]
    async fn a_create_that_reached_the_server_is_not_repeated() {
        let (base, calls) = flaky(0).await;
        let provider = SessionsApiProvider::new(&base, "key".into()).unwrap();
        assert!(matches!(
            provider.create_session(&request("1.00")).await,
            Err(ProviderError::Unavailable(_))
        ));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "a POST that got an answer is never sent twice"
        );
        // Nothing listens here: the POST never arrived, so it is retried, then
        // refused. No server sees a refused connection, so the retries are
        // counted from the ones `send` logs.
        // (This thread's log only: the test's runtime is current-thread.)
        let (log, _logging) = crate::testing::LogCapture::start();
        let provider = SessionsApiProvider::new("http://127.0.0.1:9", "key".into()).unwrap();
        assert!(matches!(
            provider.create_session(&request("1.00")).await,
            Err(ProviderError::Unavailable(_))
        ));
        let retries = log
            .text()
            .lines()
            .filter(|l| l.contains("tollgate::provider::sessions_api") && l.contains("retrying"))
            .count();
        assert_eq!(
            retries,
            ATTEMPTS as usize - 1,
            "sent {ATTEMPTS} times in all"
        );
    }

    #[tokio::test]
    async fn amounts_finer_than_cents_are_refused_not_rounded() {
        let provider = SessionsApiProvider::new("http://127.0.0.1:9", "key".into()).unwrap();
        let refused = provider.create_session(&request("0.005")).await;
        assert!(
            matches!(refused, Err(ProviderError::Refused(_))),
            "{refused:?}"
        );
    }
}
