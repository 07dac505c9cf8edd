//! API keys: who is calling over HTTP. A key is `tg_<id>_<secret>`; the
//! store keeps the id, the principal, the scopes and a SHA-256 of the secret,
//! never the secret itself. Secrets are 128 random bits, so a plain hash is
//! enough (no password stretching needed), and it is compared in constant
//! time.

use std::{fmt, str::FromStr};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Call tools over `/mcp`.
    Mcp,
    /// `POST /v1/sessions`. Creating a session never lets a key mark one paid.
    SessionsCreate,
    /// `GET /v1/sessions/{id}`.
    SessionsRead,
    /// A person's key: pay from its wallet at the checkout page, and
    /// approve a charge above the threshold there. The `mcp` key a client
    /// calls tools with may pay, but not approve: an agent holding it
    /// could otherwise approve its own charges.
    Approve,
    /// Everything, including `/metrics`.
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 5] = [
        Scope::Mcp,
        Scope::SessionsCreate,
        Scope::SessionsRead,
        Scope::Approve,
        Scope::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Mcp => "mcp",
            Scope::SessionsCreate => "sessions:create",
            Scope::SessionsRead => "sessions:read",
            Scope::Approve => "approve",
            Scope::Admin => "admin",
        }
    }
}

impl FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scope::ALL
            .into_iter()
            .find(|scope| scope.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Scope::ALL.iter().map(|s| s.as_str()).collect();
                format!(
                    "unknown scope `{s}` (expected one of: {})",
                    names.join(", ")
                )
            })
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stored key (without its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub id: String,
    pub secret_hash: String,
    pub principal: String,
    pub scopes: Vec<Scope>,
    pub label: Option<String>,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

impl ApiKey {
    /// A new key for `principal`: the record to store, and the key to hand
    /// out once.
    pub fn generate(
        principal: &str,
        mut scopes: Vec<Scope>,
        label: Option<String>,
        now: i64,
    ) -> (Self, String) {
        scopes.sort();
        scopes.dedup();
        let id = format!("key_{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
        let secret = uuid::Uuid::new_v4().simple().to_string();
        let presented = format!("tg_{id}_{secret}");
        let key = Self {
            secret_hash: hash(&secret),
            id,
            principal: principal.to_owned(),
            scopes,
            label,
            created_at: now,
            revoked_at: None,
        };
        (key, presented)
    }

    /// Whether `presented` is this key's secret.
    pub fn matches(&self, presented: &str) -> bool {
        match split(presented) {
            Some((id, secret)) if id == self.id => hash(secret)
                .as_bytes()
                .ct_eq(self.secret_hash.as_bytes())
                .into(),
            _ => false,
        }
    }

    pub fn allows(&self, scope: Scope) -> bool {
        self.revoked_at.is_none()
            && (self.scopes.contains(&scope) || self.scopes.contains(&Scope::Admin))
    }

    pub fn scopes_text(&self) -> String {
        self.scopes
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// The key id a presented key names, if it has the right shape.
pub fn key_id(presented: &str) -> Option<&str> {
    split(presented).map(|(id, _)| id)
}

fn split(presented: &str) -> Option<(&str, &str)> {
    let rest = presented.trim().strip_prefix("tg_")?;
    let (id, secret) = rest.rsplit_once('_')?;
    (id.starts_with("key_") && !secret.is_empty()).then_some((id, secret))
}

fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_matches_only_itself() {
        let (key, presented) = ApiKey::generate("alice", vec![Scope::Mcp, Scope::Mcp], None, 0);
        assert_eq!(key.scopes, [Scope::Mcp]);
        assert!(key.matches(&presented));
        assert_eq!(key_id(&presented), Some(key.id.as_str()));
        assert!(
            !presented.contains(&key.secret_hash),
            "only the hash is stored"
        );
        let mut wrong = presented.clone();
        wrong.pop();
        wrong.push('x');
        assert!(!key.matches(&wrong));
        assert!(!key.matches("tg_key_other_secret"));
        assert!(!key.matches("garbage"));
    }

    #[test]
    fn scopes_and_revocation() {
        let (mut key, _) = ApiKey::generate("alice", vec![Scope::SessionsCreate], None, 0);
        assert!(key.allows(Scope::SessionsCreate));
        assert!(!key.allows(Scope::SessionsRead));
        key.scopes.push(Scope::Admin);
        assert!(key.allows(Scope::Mcp), "admin may do everything");
        key.revoked_at = Some(1);
        assert!(!key.allows(Scope::Admin));
        assert!("sessions:pay".parse::<Scope>().is_err());
    }
}
