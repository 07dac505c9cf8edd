//! Dynamic-tools mode: each intent gets a confirm tool of its own,
//! `confirm_<payment id>`, listed only to the MCP session that opened it and
//! announced with `notifications/tools/list_changed` (on 2026-07-28
//! sessions, through their `subscriptions/listen` stream). It is removed once
//! used or expired, so the list does not grow without bound. Calling it from
//! another session, even in another process, gets `payment_mismatch`: the
//! session is recorded on the intent. HTTP requests served without a
//! session (2026-07-28 clients) share one per principal
//! ([`super::stateless_session`]).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use rmcp::{
    Peer, RoleServer,
    model::{CallToolResult, MetaObject, RequestId, Tool},
    service::SubscriptionSink,
};
use serde_json::json;

use super::{
    ANONYMOUS_STATELESS, CallScope, Gate, PricedCall,
    redeem::mismatch_reply,
    reply::{self, code},
    slow_path::{Opened, Purpose},
};
use crate::{money::format_amount, store::now_ms, sync::lock};

const PREFIX: &str = "confirm_pay_";

/// The payment id a dynamic confirm tool's name carries, if it is one.
pub fn dynamic_confirm_payment_id(tool: &str) -> Option<&str> {
    tool.strip_prefix("confirm_")
        .filter(|id| tool.starts_with(PREFIX) && id.len() > 4)
}

struct Offered {
    tool: Tool,
    expires_at: i64,
}

/// One session's dynamic tools and the ways to tell it they changed.
#[derive(Default)]
struct SessionTools {
    offered: BTreeMap<String, Offered>,
    peer: Option<Peer<RoleServer>>,
    sinks: Vec<SubscriptionSink>,
}

impl SessionTools {
    fn prune(&mut self, now: i64) -> bool {
        let before = self.offered.len();
        self.offered.retain(|_, o| o.expires_at > now);
        self.offered.len() != before
    }
}

#[derive(Default, Clone)]
pub struct DynamicTools {
    sessions: Arc<Mutex<HashMap<String, SessionTools>>>,
}

impl DynamicTools {
    fn with<R>(&self, session: &str, f: impl FnOnce(&mut SessionTools) -> R) -> R {
        let mut sessions = lock(&self.sessions);
        f(sessions.entry(session.to_owned()).or_default())
    }

    /// The confirm tools a session sees now (expired ones dropped).
    pub fn listed(&self, session: &str) -> Vec<Tool> {
        if session == ANONYMOUS_STATELESS {
            return Vec::new();
        }
        let now = now_ms();
        self.with(session, |s| {
            s.prune(now);
            s.offered.values().map(|o| o.tool.clone()).collect()
        })
    }

    /// Remembers a session's peer, so it hears when the tool list changes.
    pub fn attach_peer(&self, session: &str, peer: Peer<RoleServer>) {
        self.with(session, |s| s.peer = Some(peer));
    }

    /// Tells every session the tool list changed (an upstream's did).
    pub async fn announce_all(&self) {
        let sessions: Vec<String> = {
            let sessions = lock(&self.sessions);
            sessions.keys().cloned().collect()
        };
        for session in sessions {
            self.announce(&session).await;
        }
    }

    /// A 2026-07-28 session's `subscriptions/listen` stream.
    pub fn attach_listener(&self, session: &str, sink: SubscriptionSink) {
        self.with(session, |s| s.sinks.push(sink));
    }

    /// The stream opened by listen request `id` has ended.
    pub fn detach_listener(&self, session: &str, id: &RequestId) {
        self.with(session, |s| s.sinks.retain(|sink| sink.id() != id));
    }

    /// Forgets a session that has closed.
    pub fn forget(&self, session: &str) {
        let mut sessions = lock(&self.sessions);
        sessions.remove(session);
    }

    /// Drops expired tools everywhere and tells the sessions that lost some.
    pub async fn prune_expired(&self) {
        let now = now_ms();
        let changed: Vec<String> = {
            let mut sessions = lock(&self.sessions);
            sessions
                .iter_mut()
                .filter_map(|(id, s)| s.prune(now).then(|| id.clone()))
                .collect()
        };
        for session in changed {
            self.announce(&session).await;
        }
    }

    async fn offer(&self, session: &str, peer: Peer<RoleServer>, name: String, offered: Offered) {
        if session == ANONYMOUS_STATELESS {
            return; // listed to no one, so nothing to keep or announce
        }
        self.with(session, |s| {
            s.peer = Some(peer);
            s.offered.insert(name, offered);
        });
        self.announce(session).await;
    }

    async fn withdraw(&self, session: &str, name: &str) {
        if self.with(session, |s| s.offered.remove(name).is_some()) {
            self.announce(session).await;
        }
    }

    /// `notifications/tools/list_changed` to one session: on its listen
    /// streams if it opened any (2026-07-28), else to its peer.
    async fn announce(&self, session: &str) {
        let (peer, sinks) = self.with(session, |s| (s.peer.clone(), s.sinks.clone()));
        if !sinks.is_empty() {
            for sink in sinks {
                if let Err(e) = sink.notify_tool_list_changed().await {
                    tracing::debug!("list_changed not sent on a listen stream: {e}");
                }
            }
        } else if let Some(peer) = peer
            && let Err(e) = peer.notify_tool_list_changed().await
        {
            tracing::debug!("list_changed not sent: {e}");
        }
    }
}

impl Gate {
    /// Opens the confirm tool for a new intent and answers like two_step.
    pub(super) async fn offer_dynamic_confirm(
        &self,
        scope: &CallScope<'_>,
        call: &PricedCall<'_>,
        opened: &Opened,
        purpose: Purpose,
    ) -> CallToolResult {
        let intent = &opened.intent;
        let name = format!("confirm_{}", intent.id);
        let schema = json!({ "type": "object", "properties": {}, "additionalProperties": false });
        let mut meta = MetaObject::new();
        meta.0.insert("tollgate/confirms".into(), json!(call.tool));
        meta.0
            .insert("tollgate/payment_id".into(), json!(intent.id));
        let tool = Tool::new(
            name.clone(),
            format!(
                "Runs `{}` once payment {} of {} {} is made (pay at {}). Takes no arguments.",
                call.tool,
                intent.id,
                format_amount(intent.amount),
                intent.currency,
                opened.url
            ),
            Arc::new(schema.as_object().cloned().unwrap_or_default()),
        )
        .with_meta(meta);
        self.dynamic
            .offer(
                scope.session_id,
                scope.request.peer.clone(),
                name.clone(),
                Offered {
                    tool,
                    expires_at: intent.expires_at,
                },
            )
            .await;
        self.payment_required(opened, purpose, Some(name))
    }

    /// A call to `confirm_<payment id>`.
    pub(super) async fn dynamic_confirm(
        &self,
        scope: &CallScope<'_>,
        name: &str,
        payment_id: &str,
    ) -> CallToolResult {
        let intent = match self.store.intent(payment_id).await {
            Ok(Some(intent)) => intent,
            Ok(None) => {
                return reply::payment_not_found(payment_id);
            }
            Err(e) => return reply::unavailable(e),
        };
        if intent.session_id.as_deref() != Some(scope.session_id) {
            return mismatch_reply(
                payment_id,
                name,
                "its confirm tool belongs to another session",
            );
        }
        let result = self.redeem(scope, payment_id, &intent.tool, None).await;
        // Used, or ended for good: the tool goes away. An answer that says
        // to try again (not paid yet, the payment system or the run busy),
        // or that the caller is not its payer, leaves it listed.
        let try_again = result.structured_content.as_ref().is_some_and(|s| {
            [
                code::PAYMENT_PENDING,
                code::UNAVAILABLE,
                code::PAYMENT_IN_PROGRESS,
                code::PAYMENT_MISMATCH,
            ]
            .contains(&s["error"].as_str().unwrap_or_default())
        });
        if !try_again {
            self.dynamic.withdraw(scope.session_id, name).await;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirm_names_carry_the_payment_id() {
        assert_eq!(
            dynamic_confirm_payment_id("confirm_pay_abc123"),
            Some("pay_abc123")
        );
        assert_eq!(dynamic_confirm_payment_id("confirm_echo_payment"), None);
        assert_eq!(dynamic_confirm_payment_id("echo"), None);
        assert_eq!(dynamic_confirm_payment_id("confirm_pay_"), None);
    }
}
