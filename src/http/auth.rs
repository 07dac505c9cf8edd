//! API keys on HTTP: `Authorization: Bearer <key>` or `x-api-key: <key>`.
//! A missing or bad key is a 401, a key without the scope a 403, both with a
//! JSON body.

use axum::{
    Json,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use serde_json::json;

use crate::{
    keys::{ApiKey, Scope, key_id},
    store::{Store, StoreError},
};

#[derive(Debug)]
pub enum AuthError {
    Missing,
    Invalid,
    Forbidden(Scope),
    Store(StoreError),
}

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        let (status, error, message) = match self {
            AuthError::Missing => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "an API key is required: send `Authorization: Bearer <key>` or `x-api-key: <key>`"
                    .to_owned(),
            ),
            AuthError::Invalid => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "the API key is not valid (unknown, wrong or revoked)".to_owned(),
            ),
            AuthError::Forbidden(scope) => (
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("this API key lacks the `{scope}` scope"),
            ),
            // The store's own words stay in the log: they can name hosts,
            // files and databases, and this answer goes to anyone.
            AuthError::Store(e) => {
                tracing::warn!("API key check: store unavailable: {e}");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "payment system unavailable; try again later".to_owned(),
                )
            }
        };
        let mut response =
            (status, Json(json!({ "error": error, "message": message }))).into_response();
        if status == StatusCode::UNAUTHORIZED
            && let Ok(value) = "Bearer".parse()
        {
            response.headers_mut().insert("www-authenticate", value);
        }
        response
    }
}

/// The key a request presents, if any: `Authorization: Bearer KEY` (the
/// scheme in any case, as HTTP has it), else `X-Api-Key: KEY`. An
/// `Authorization` of another scheme (a proxy's own `Basic`, say) is not a
/// key, and does not hide an `X-Api-Key`.
pub fn presented_key(headers: &HeaderMap) -> Option<&str> {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim_start().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim());
    bearer.or_else(|| {
        headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    })
}

/// A key the rate limit verified for this request, so that its handler
/// need not read it from the store again.
#[derive(Debug, Clone)]
pub struct Verified(pub ApiKey);

/// The live key presented in `headers`, if it has `scope`.
pub async fn authenticate(
    store: &dyn Store,
    headers: &HeaderMap,
    scope: Scope,
) -> Result<ApiKey, AuthError> {
    authenticate_once(store, headers, None, scope).await
}

/// As [`authenticate`], taking the key the rate limit already `verified`
/// when there is one.
pub async fn authenticate_once(
    store: &dyn Store,
    headers: &HeaderMap,
    verified: Option<Verified>,
    scope: Scope,
) -> Result<ApiKey, AuthError> {
    let key = match verified {
        Some(Verified(key)) => key,
        None => {
            let presented = presented_key(headers).ok_or(AuthError::Missing)?;
            authenticate_key(store, presented).await?
        }
    };
    if key.allows(scope) {
        Ok(key)
    } else {
        Err(AuthError::Forbidden(scope))
    }
}

/// The live key `presented` names, whatever its scopes.
pub async fn authenticate_key(store: &dyn Store, presented: &str) -> Result<ApiKey, AuthError> {
    let id = key_id(presented).ok_or(AuthError::Invalid)?;
    let key = store
        .api_key(id)
        .await
        .map_err(AuthError::Store)?
        .ok_or(AuthError::Invalid)?;
    if key.revoked_at.is_some() || !key.matches(presented) {
        return Err(AuthError::Invalid);
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    #[test]
    fn a_key_is_read_from_either_header_whatever_the_schemes_case() {
        for (pairs, key) in [
            (vec![("authorization", "Bearer tg_a_b")], Some("tg_a_b")),
            (vec![("authorization", "bearer tg_a_b ")], Some("tg_a_b")),
            (vec![("authorization", "BEARER tg_a_b")], Some("tg_a_b")),
            (vec![("x-api-key", " tg_c_d")], Some("tg_c_d")),
            (
                vec![
                    ("authorization", "Basic dXNlcjpwdw=="),
                    ("x-api-key", "tg_c_d"),
                ],
                Some("tg_c_d"),
            ),
            (vec![("authorization", "Basic dXNlcjpwdw==")], None),
            (vec![("authorization", "Bearertg_a_b")], None),
            (vec![], None),
        ] {
            assert_eq!(presented_key(&headers(&pairs)), key, "{pairs:?}");
        }
    }
}
