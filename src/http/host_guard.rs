//! The `Host` check on the checkout page, as rmcp does it on `/mcp`:
//! against `[http] allowed_hosts`, and the host the checkout URLs name
//! (`checkout_base_url`, on any port), so that a page served through DNS
//! rebinding (an attacker's name pointed at this machine) is refused.

use axum::{
    extract::{Request, State},
    http::{StatusCode, header, uri::Authority},
    middleware::Next,
    response::{IntoResponse, Response},
};

/// The hosts a request may name: `host` or `host:port` entries.
#[derive(Clone, Debug)]
pub(super) struct AllowedHosts(Vec<(String, Option<u16>)>);

impl AllowedHosts {
    /// `allowed_hosts`, and the host of `checkout_base_url` on any port (a
    /// browser leaves a scheme's default port out of `Host`).
    pub(super) fn new(allowed: &[String], checkout_base_url: &str) -> Self {
        let public = authority(url_authority(checkout_base_url)).map(|(host, _)| (host, None));
        Self(
            allowed
                .iter()
                .filter_map(|a| authority(a))
                .chain(public)
                .collect(),
        )
    }

    /// Whether a `Host` header's value names an allowed host (an entry
    /// without a port allows any port).
    fn allows(&self, host: &str) -> bool {
        let Some((host, port)) = authority(host) else {
            return false;
        };
        self.0
            .iter()
            .any(|(name, only)| *name == host && only.is_none_or(|p| Some(p) == port))
    }
}

/// The `host[:port]` of a URL (or an origin, or a bare authority).
fn url_authority(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.split('/').next().unwrap_or_default()
}

/// A site as a browser names it in `Origin`, from a URL, an origin or a
/// bare authority: its host (lowercase) and port, less the scheme's
/// default one, so that `https://Pay.Example.com:443/` and
/// `https://pay.example.com` are one site.
pub(super) fn site(url: &str) -> Option<(String, Option<u16>)> {
    let default_port = match url.split_once("://").map(|(scheme, _)| scheme) {
        Some(scheme) if scheme.eq_ignore_ascii_case("https") => Some(443),
        Some(scheme) if scheme.eq_ignore_ascii_case("http") => Some(80),
        _ => None,
    };
    let (host, port) = authority(url_authority(url))?;
    Some((host, port.filter(|p| Some(*p) != default_port)))
}

/// A host (lowercase, without brackets) and port, from `host[:port]`.
fn authority(text: &str) -> Option<(String, Option<u16>)> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    let (host, port) = match Authority::try_from(text) {
        Ok(a) => (a.host().to_owned(), a.port_u16()),
        Err(_) => (text.to_owned(), None),
    };
    let host = host.trim_matches(['[', ']']).to_ascii_lowercase();
    Some((host, port))
}

pub(super) async fn guard(
    State(allowed): State<AllowedHosts>,
    request: Request,
    next: Next,
) -> Response {
    // A Host header that is not text is refused, not passed over for the
    // URI's authority: the header is what names the site asked for.
    let host = match request.headers().get(header::HOST) {
        Some(value) => value.to_str().ok(),
        None => request.uri().authority().map(Authority::as_str),
    };
    match host {
        Some(host) if allowed.allows(host) => next.run(request).await,
        Some(host) => {
            tracing::warn!(host, "refused a request naming a host not allowed");
            (
                StatusCode::FORBIDDEN,
                "Forbidden: Host header is not allowed\n",
            )
                .into_response()
        }
        None => (
            StatusCode::BAD_REQUEST,
            "Bad Request: missing or unreadable Host header\n",
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_is_allowed_by_name_by_port_or_by_the_checkout_url() {
        let allowed = AllowedHosts::new(
            &[
                "localhost".into(),
                "127.0.0.1".into(),
                "::1".into(),
                "api.example.com:8443".into(),
            ],
            "https://Pay.Example.com:443/",
        );
        for host in [
            "localhost",
            "localhost:8080",
            "127.0.0.1:1",
            "[::1]:8080",
            "pay.example.com",
            "PAY.example.com:443",
            "pay.example.com:8443",
            "api.example.com:8443",
        ] {
            assert!(allowed.allows(host), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:8080",
            "127.0.0.2",
            "api.example.com:8444",
            "api.example.com",
            "",
        ] {
            assert!(!allowed.allows(host), "{host}");
        }
    }

    #[test]
    fn a_site_is_its_lowercase_host_and_a_port_other_than_its_schemes_default() {
        let pay = Some(("pay.example.com".to_owned(), None));
        for same in [
            "https://Pay.Example.com:443/",
            "https://pay.example.com",
            "HTTPS://pay.example.com/checkout/x?y=1",
            "http://pay.example.com:80",
            "pay.example.com",
        ] {
            assert_eq!(site(same), pay, "{same}");
        }
        for other in [
            "https://pay.example.com:8443",
            "http://pay.example.com:443",
            "https://evil.example",
        ] {
            assert_ne!(site(other), pay, "{other}");
        }
        assert_eq!(site(""), None);
    }
}
