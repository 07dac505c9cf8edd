//! Per-key rate limits on `/v1`, with `X-RateLimit-Limit`,
//! `X-RateLimit-Remaining` and `X-RateLimit-Reset` on every response and a
//! 429 past the limit. Requests without a valid key are limited by address.
//! Creating sessions and reading them have separate limits, as in the seed
//! payment API; a cancel counts with the reads.

use std::{net::SocketAddr, num::NonZeroU32, sync::Arc, time::Duration};

use axum::{
    Json,
    extract::{ConnectInfo, Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
};
use governor::{
    Quota, RateLimiter,
    clock::{Clock, DefaultClock},
    middleware::StateInformationMiddleware,
    state::keyed::DashMapStateStore,
};
use serde_json::json;

use super::{
    HttpState,
    auth::{Verified, authenticate_key, presented_key},
};

type Limiter =
    RateLimiter<String, DashMapStateStore<String>, DefaultClock, StateInformationMiddleware>;

struct Limit {
    per_minute: u32,
    limiter: Limiter,
}

impl Limit {
    fn new(per_minute: u32) -> Self {
        let n = NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN);
        Self {
            per_minute: n.get(),
            limiter: RateLimiter::dashmap(Quota::per_minute(n))
                .with_middleware::<StateInformationMiddleware>(),
        }
    }
}

pub struct RateLimits {
    create: Limit,
    read: Limit,
}

impl RateLimits {
    pub fn new(create_per_minute: u32, read_per_minute: u32) -> Self {
        Self {
            create: Limit::new(create_per_minute),
            read: Limit::new(read_per_minute),
        }
    }

    /// Forgets keys and addresses whose buckets are full again, so the
    /// limiters do not grow with every caller ever seen.
    pub fn forget_idle(&self) {
        self.create.limiter.retain_recent();
        self.read.limiter.retain_recent();
    }
}

/// Seconds since the Unix epoch, `after` from now.
fn epoch_after(after: Duration) -> u64 {
    (std::time::SystemTime::now() + after)
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() + u64::from(d.subsec_nanos() > 0))
}

fn set_headers(headers: &mut HeaderMap, limit: u32, remaining: u32, reset: u64) {
    for (name, value) in [
        ("x-ratelimit-limit", u64::from(limit)),
        ("x-ratelimit-remaining", u64::from(remaining)),
        ("x-ratelimit-reset", reset),
    ] {
        headers.insert(name, HeaderValue::from(value));
    }
}

pub async fn rate_limit(
    State(state): State<Arc<HttpState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    // Counted against a key only once it verifies: an id anyone can write
    // down would let a client dodge its address's limit (and fill the
    // limiter with made-up ids), or use up another key's.
    let key = match presented_key(request.headers()) {
        Some(presented) => authenticate_key(state.store.as_ref(), presented).await.ok(),
        None => None,
    };
    let who = key.as_ref().map_or_else(
        || format!("addr:{}", peer.ip()),
        |key| format!("key:{}", key.id),
    );
    // A cancel is a POST too, but it only ends what a create began: it must
    // not use up the room for creating.
    let limit = if request.method() == Method::POST && request.uri().path() == "/v1/sessions" {
        &state.limits.create
    } else {
        &state.limits.read
    };
    // Time for one token to come back; the bucket is full again after
    // `used` of them.
    let per_token = Duration::from_secs(60) / limit.per_minute;
    match limit.limiter.check_key(&who) {
        Ok(snapshot) => {
            let remaining = snapshot.remaining_burst_capacity();
            let mut request = request;
            if let Some(key) = key {
                request.extensions_mut().insert(Verified(key));
            }
            let mut response = next.run(request).await;
            let reset = epoch_after(per_token * (limit.per_minute - remaining));
            set_headers(response.headers_mut(), limit.per_minute, remaining, reset);
            response
        }
        Err(not_until) => {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            let mut response = (
                StatusCode::TOO_MANY_REQUESTS,
                Json(json!({
                    "error": "rate_limited",
                    "message": format!("more than {} requests a minute; retry in {}s", limit.per_minute, wait.as_secs() + 1),
                })),
            )
                .into_response();
            set_headers(
                response.headers_mut(),
                limit.per_minute,
                0,
                epoch_after(wait),
            );
            response
                .headers_mut()
                .insert("retry-after", HeaderValue::from(wait.as_secs() + 1));
            response
        }
    }
}
