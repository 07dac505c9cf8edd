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

#[derive(Default)]
pub(super) struct SessionOwners {
    owners: Mutex<HashMap<String, Owner>>,
}

struct Owner {
    principal: Option<String>,
    seen: Instant,
}

impl SessionOwners {
    /// A session opened by `principal`.
    pub fn opened(&self, session: &str, principal: Option<String>) {
        let owner = Owner {
            principal,
            seen: Instant::now(),
        };
        lock(&self.owners).insert(session.to_owned(), owner);
    }

    /// Whether `principal` may use `session`. A session not known here is
    /// not one rmcp serves either (it answers 404): nothing is recorded
    /// for it, so made-up ids take no memory.
    pub fn allows(&self, session: &str, principal: &Option<String>) -> bool {
        match lock(&self.owners).get_mut(session) {
            Some(owner) if owner.principal == *principal => {
                owner.seen = Instant::now();
                true
            }
            Some(_) => false,
            None => true,
        }
    }

    /// A session ended by its client.
    pub fn closed(&self, session: &str) {
        lock(&self.owners).remove(session);
    }

    /// Forgets sessions unused for `idle`: rmcp has closed them by then.
    pub fn forget_idle(&self, idle: Duration) {
        lock(&self.owners).retain(|_, owner| owner.seen.elapsed() < idle);
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
        assert!(owners.allows("s1", &judy));
        assert!(!owners.allows("s1", &kate));
        assert!(
            !owners.allows("s1", &None),
            "an anonymous caller is another principal"
        );
        assert!(owners.allows("made-up", &kate));
        assert_eq!(
            lock(&owners.owners).len(),
            1,
            "made-up ids are not recorded"
        );
        owners.forget_idle(Duration::from_secs(60));
        assert!(!owners.allows("s1", &kate), "used just now: kept");
        owners.forget_idle(Duration::ZERO);
        assert!(lock(&owners.owners).is_empty());
        owners.opened("s2", judy);
        owners.closed("s2");
        assert!(lock(&owners.owners).is_empty());
    }
}
