//! Which principal each MCP session over HTTP belongs to: the one whose key
//! opened it (`initialize`). Every later request that names the session
//! (a POST, the GET event stream, a DELETE) must come with a key of that
//! principal, so another key that learnt a session id can neither list nor
//! confirm the session's dynamic tools, nor answer its prompts (which may
//! approve a charge), nor end it.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::sync::lock;

/// What a request may do with the session it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {
    Owner,
    /// Opened with another principal's key.
    Another,
    /// Not a session known here.
    Unknown,
}

#[derive(Default)]
pub(super) struct SessionOwners {
    owners: Mutex<HashMap<String, Owner>>,
}

struct Owner {
    principal: Option<String>,
    /// When a request for it last began or ended.
    seen: Instant,
    /// Its requests whose responses are still going (a call waiting on a
    /// payment, an event stream): it is not idle while there are any.
    in_flight: usize,
}

impl SessionOwners {
    /// A session opened by `principal`.
    pub fn opened(&self, session: &str, principal: Option<String>) {
        let owner = Owner {
            principal,
            seen: Instant::now(),
            in_flight: 0,
        };
        lock(&self.owners).insert(session.to_owned(), owner);
    }

    /// Whether `principal` may use `session`. A session not known here is
    /// refused as unknown (the client opens another): it is a made-up id,
    /// or one forgotten after [`Self::forget_idle`], which rmcp may still
    /// serve (a session that only waits keeps its timer running there)
    /// and which must not become anyone's. Nothing is recorded for it.
    pub fn allows(&self, session: &str, principal: &Option<String>) -> Access {
        match lock(&self.owners).get_mut(session) {
            Some(owner) if owner.principal == *principal => {
                owner.seen = Instant::now();
                owner.in_flight += 1;
                Access::Owner
            }
            Some(_) => Access::Another,
            None => Access::Unknown,
        }
    }

    /// A response allowed as [`Access::Owner`] has ended (its body was sent
    /// or dropped).
    pub fn finished(&self, session: &str) {
        if let Some(owner) = lock(&self.owners).get_mut(session) {
            owner.in_flight = owner.in_flight.saturating_sub(1);
            owner.seen = Instant::now();
        }
    }

    /// A session ended by its client.
    pub fn closed(&self, session: &str) {
        lock(&self.owners).remove(session);
    }

    /// Forgets sessions unused for `idle` (rmcp has closed them by then),
    /// but never one with a response still going.
    pub fn forget_idle(&self, idle: Duration) {
        lock(&self.owners).retain(|_, owner| owner.in_flight > 0 || owner.seen.elapsed() < idle);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_its_openers_and_unknown_ones_are_not_kept() {
        let owners = SessionOwners::default();
        let (judy, kate) = (Some("judy".to_owned()), Some("kate".to_owned()));
        owners.opened("s1", judy.clone());
        assert_eq!(owners.allows("s1", &judy), Access::Owner);
        assert_eq!(owners.allows("s1", &kate), Access::Another);
        assert_eq!(
            owners.allows("s1", &None),
            Access::Another,
            "an anonymous caller is another principal"
        );
        assert_eq!(owners.allows("made-up", &kate), Access::Unknown);
        assert_eq!(
            lock(&owners.owners).len(),
            1,
            "made-up ids are not recorded"
        );
        owners.forget_idle(Duration::ZERO);
        assert_eq!(
            owners.allows("s1", &kate),
            Access::Another,
            "judy's response is still going: kept however long"
        );
        owners.finished("s1");
        owners.forget_idle(Duration::from_secs(60));
        assert_eq!(
            owners.allows("s1", &kate),
            Access::Another,
            "used just now: kept"
        );
        owners.forget_idle(Duration::ZERO);
        assert!(lock(&owners.owners).is_empty());
        assert_eq!(
            owners.allows("s1", &kate),
            Access::Unknown,
            "forgotten, it is nobody's: refused as unknown, not handed to kate"
        );
        owners.opened("s2", judy);
        owners.closed("s2");
        assert!(lock(&owners.owners).is_empty());
    }
}
