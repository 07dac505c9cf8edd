//! Dynamic-tools mode: each intent gets a confirm tool of its own,
//! `confirm_<payment id>`, listed only to the MCP session that opened it and
//! announced with `notifications/tools/list_changed` (on 2026-07-28
//! sessions, through their `subscriptions/listen` stream). It is removed once
//! used, or once its intent's time is over, so the list does not grow
//! without bound; a paid intent's stays while the payment can be redeemed
//! (`[server] keep_results` longer, until recovery refunds it). Calling it from
//! another session, even in another process, gets `payment_mismatch`: the
//! session is recorded on the intent, so when the session closes its
//! payments are ended ([`Gate::end_closed_sessions_payments`]). HTTP
//! requests served without a session (2026-07-28 clients) share one per
//! principal ([`super::stateless_session`]).

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
    ANONYMOUS_STATELESS, CallScope, Gate, PricedCall, SESSION_END_GRACE,
    redeem::{mismatch_reply, pays_for, remote_grace_ends},
    reply::{self, code},
    slow_path::{Opened, Purpose},
};
use crate::{
    money::format_in,
    provider::ProviderError,
    store::{IntentStatus, SessionStatus, now_ms},
    sync::lock,
};

const PREFIX: &str = "confirm_pay_";

/// Why a closed session's paid payment is refunded (completes "was paid
/// but").
const CLOSED_UNUSED: &str = "the MCP session it was offered to closed before it was used";

/// The payment id a dynamic confirm tool's name carries, if it is one.
pub fn dynamic_confirm_payment_id(tool: &str) -> Option<&str> {
    tool.strip_prefix("confirm_")
        .filter(|id| tool.starts_with(PREFIX) && id.len() > 4)
}

struct Offered {
    tool: Tool,
    /// Until when it is listed without asking: the intent's expiry, then,
    /// for a paid intent, the end of its redeem window.
    expires_at: i64,
    /// Its intent was found paid after its time: listed until
    /// `expires_at`, then removed without asking again.
    paid: bool,
}

/// What became of an offer whose time is over.
pub(super) enum Outcome {
    /// Paid: listed until then.
    KeepUntil(i64),
    Remove,
    /// Not known yet (a remote session still pending, or a remote provider
    /// a list does not wait on): asked again next time.
    Unknown,
    /// The store or the provider did not answer: asked again next time.
    Unanswered,
}

/// One session's dynamic tools and the ways to tell it they changed.
#[derive(Default)]
struct SessionTools {
    offered: BTreeMap<String, Offered>,
    peer: Option<Peer<RoleServer>>,
    sinks: Vec<SubscriptionSink>,
}

#[derive(Default, Clone)]
pub struct DynamicTools {
    sessions: Arc<Mutex<HashMap<String, SessionTools>>>,
}

impl SessionTools {
    /// Nothing offered and no one to tell: no reason to keep it.
    fn is_empty(&self) -> bool {
        self.offered.is_empty() && self.peer.is_none() && self.sinks.is_empty()
    }
}

impl DynamicTools {
    /// Runs `f` on a session's entry, made if new: for a session being
    /// served (a call, a handshake, a listen stream).
    fn with<R>(&self, session: &str, f: impl FnOnce(&mut SessionTools) -> R) -> R {
        let mut sessions = lock(&self.sessions);
        f(sessions.entry(session.to_owned()).or_default())
    }

    /// Runs `f` on a session's entry if there is one, and forgets the entry
    /// once it is empty. Never makes one: a list, an announcement or the
    /// upkeep may come after the session closed (and was forgotten), or
    /// for a stateless one with nothing offered.
    fn with_known<R>(&self, session: &str, f: impl FnOnce(&mut SessionTools) -> R) -> Option<R> {
        let mut sessions = lock(&self.sessions);
        let tools = sessions.get_mut(session)?;
        let answer = f(tools);
        if tools.is_empty() {
            sessions.remove(session);
        }
        Some(answer)
    }

    /// The confirm tools a session is offered. Those past their time are
    /// ended by [`Gate::end_due_confirm_tools`], which runs before a list.
    pub fn listed(&self, session: &str) -> Vec<Tool> {
        if session == ANONYMOUS_STATELESS {
            return Vec::new();
        }
        self.with_known(session, |s| {
            s.offered.values().map(|o| o.tool.clone()).collect()
        })
        .unwrap_or_default()
    }

    /// Offers whose intent must be looked at, as (session, tool name, past
    /// its time), in one session or all: those past their time, and those
    /// not yet known paid (their payment may have been declined or
    /// cancelled at checkout). Those already kept for a paid intent are
    /// simply removed once past their time.
    fn due(&self, only: Option<&str>, now: i64) -> (Vec<(String, String, bool)>, Vec<String>) {
        let mut sessions = lock(&self.sessions);
        let (mut due, mut changed) = (Vec::new(), Vec::new());
        for (id, s) in sessions.iter_mut() {
            if only.is_some_and(|only| only != id) {
                continue;
            }
            let before = s.offered.len();
            s.offered.retain(|_, o| !(o.paid && o.expires_at <= now));
            if s.offered.len() != before {
                changed.push(id.clone());
            }
            due.extend(
                s.offered
                    .iter()
                    .filter(|(_, o)| o.expires_at <= now || !o.paid)
                    .map(|(name, o)| (id.clone(), name.clone(), o.expires_at <= now)),
            );
        }
        sessions.retain(|_, s| !s.is_empty());
        (due, changed)
    }

    /// Applies what became of due offers; true if the list changed.
    fn settle(&self, session: &str, name: &str, outcome: Outcome) -> bool {
        self.with_known(session, |s| match outcome {
            Outcome::Remove => s.offered.remove(name).is_some(),
            Outcome::KeepUntil(until) => {
                if let Some(o) = s.offered.get_mut(name) {
                    (o.expires_at, o.paid) = (until, true);
                }
                false
            }
            Outcome::Unknown | Outcome::Unanswered => false,
        })
        .unwrap_or(false)
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
        self.with_known(session, |s| s.sinks.retain(|sink| sink.id() != id));
    }

    /// How many sessions have an entry (offers, a peer or listen streams):
    /// a closed session's must not come back.
    pub fn sessions_kept(&self) -> usize {
        lock(&self.sessions).len()
    }

    /// Forgets a session that has closed; the payment ids of the confirm
    /// tools it was still offered.
    pub fn forget(&self, session: &str) -> Vec<String> {
        let mut sessions = lock(&self.sessions);
        let Some(forgotten) = sessions.remove(session) else {
            return Vec::new();
        };
        forgotten
            .offered
            .keys()
            .filter_map(|name| dynamic_confirm_payment_id(name).map(str::to_owned))
            .collect()
    }

    async fn offer(&self, session: &str, peer: Peer<RoleServer>, name: String, offered: Offered) {
        if session == ANONYMOUS_STATELESS {
            return; // listed to no one, so nothing to keep or announce
        }
        // A stateless request's peer ends with the request: its session
        // is told of changes on listen streams, if at all.
        let stateless = session.starts_with(ANONYMOUS_STATELESS);
        self.with(session, |s| {
            if !stateless {
                s.peer = Some(peer);
            }
            s.offered.insert(name, offered);
        });
        self.announce(session).await;
    }

    async fn withdraw(&self, session: &str, name: &str) {
        if self
            .with_known(session, |s| s.offered.remove(name).is_some())
            .unwrap_or(false)
        {
            self.announce(session).await;
        }
    }

    /// `notifications/tools/list_changed` to one session: on its listen
    /// streams if it opened any (2026-07-28), else to its peer.
    async fn announce(&self, session: &str) {
        let Some((peer, sinks)) = self.with_known(session, |s| (s.peer.clone(), s.sinks.clone()))
        else {
            return;
        };
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
    /// Ends the confirm tools whose intent's time is over, in one session
    /// (before it lists its tools) or, in upkeep, all, and tells the
    /// sessions whose list changed. A paid intent's stays listed while it
    /// can be redeemed: a payment made in time is not lost to a client that
    /// lists its tools before calling. A list does not wait on a remote
    /// provider: what only it can say is left to upkeep.
    pub async fn end_due_confirm_tools(&self, only: Option<&str>) {
        // Upkeep asks a remote provider about offers past their time, until
        // it fails to answer once. Those still in their time are looked at
        // here only (store reads), after those past it.
        let mut ask_remote = only.is_none();
        let (mut due, mut changed) = self.dynamic.due(only, now_ms());
        due.sort_by_key(|(.., past_time)| !past_time);
        for (session, name, past_time) in due {
            let Some(payment_id) = dynamic_confirm_payment_id(&name) else {
                continue;
            };
            let outcome = self.offer_outcome(payment_id, ask_remote, past_time).await;
            if matches!(outcome, Outcome::Unanswered) && !self.provider.is_local() {
                ask_remote = false;
            }
            if self.dynamic.settle(&session, &name, outcome) && !changed.contains(&session) {
                changed.push(session);
            }
        }
        for session in changed {
            self.dynamic.announce(&session).await;
        }
    }

    /// What becomes of a confirm tool: past its intent's time, or still in
    /// it (`past_time` false), when it is removed only once its payment can
    /// no longer be made (declined, cancelled or failed at checkout) or its
    /// intent has ended, so a client that lists its tools is not offered a
    /// call that can only fail. An offer still in its time never asks a
    /// remote provider (one request per offer, each pass): its end there is
    /// seen once its time is over.
    async fn offer_outcome(&self, payment_id: &str, ask_remote: bool, past_time: bool) -> Outcome {
        let intent = match self.store.intent(payment_id).await {
            Ok(Some(intent)) => intent,
            Ok(None) => return Outcome::Remove,
            Err(_) => return Outcome::Unanswered,
        };
        // What an unpaid offer comes to when nothing says its payment ended.
        let undecided = if past_time {
            Outcome::Remove
        } else {
            Outcome::Unknown
        };
        let paid = match intent.status {
            IntentStatus::Paid | IntentStatus::Running => true,
            IntentStatus::AwaitingPayment => {
                let Some(session) = intent.provider_session_id.as_deref() else {
                    return undecided;
                };
                let provider = match self.provider_of(&intent) {
                    Ok(provider) => provider,
                    Err(_) => return Outcome::Unknown,
                };
                // A remote is asked only in upkeep, about an offer past
                // its time.
                let may_ask = provider.is_local() || (ask_remote && past_time);
                if !may_ask {
                    return Outcome::Unknown;
                }
                match provider.session_state(session).await {
                    // A remote session may still take the payment (see
                    // `remote_grace_ends`): listed meanwhile.
                    Ok(state) if state.status == SessionStatus::Pending => {
                        return if !past_time || now_ms() < remote_grace_ends(&intent) {
                            Outcome::Unknown
                        } else {
                            Outcome::Remove
                        };
                    }
                    Ok(state) if state.status == SessionStatus::Paid => {
                        if !(past_time && pays_for(&state, &intent)) {
                            return undecided;
                        }
                        true
                    }
                    // Over there (declined, cancelled or expired at
                    // checkout): ended here too, so that it no longer
                    // takes one of its caller's open-payment places.
                    Ok(state) => {
                        let (to, _, _) = self
                            .ending_at_the_providers_word(&intent, state.status)
                            .await;
                        if let Err(e) = self.end_reported(&intent, to, false).await {
                            tracing::warn!(
                                payment_id = intent.id,
                                "a confirm tool's payment, over at its provider, not ended here: {e}"
                            );
                        }
                        false
                    }
                    Err(_) => return Outcome::Unanswered,
                }
            }
            _ => false,
        };
        let redeemable_until = self.refunded_unused_at(&intent);
        if paid && redeemable_until > now_ms() {
            Outcome::KeepUntil(redeemable_until)
        } else {
            Outcome::Remove
        }
    }

    /// Ends the payments of a session that has closed (see
    /// [`Gate::end_closed_sessions_payments`]), and forgets it; or, if its
    /// closing already started that, waits for it. Either way, waits up to
    /// [`SESSION_END_GRACE`] for the calls and endings under way; how many
    /// were left.
    pub async fn end_session(&self, session: &str) -> usize {
        let offered = self.dynamic.forget(session);
        if !offered.is_empty() {
            self.end_closed_sessions_payments(session, offered).await;
        }
        self.calls_finished(SESSION_END_GRACE).await
    }

    /// Ends the payments a closed session was offered confirm tools for:
    /// only that session could redeem them. One not paid is cancelled, so
    /// nobody pays it for nothing; one paid and not used is refunded now,
    /// not held until recovery refunds it `keep_results` later. What cannot
    /// be ended now (its provider down) is left to upkeep and recovery.
    pub async fn end_closed_sessions_payments(&self, session: &str, payment_ids: Vec<String>) {
        for payment_id in payment_ids {
            let intent = match self.store.intent(&payment_id).await {
                Ok(Some(intent)) => intent,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(payment_id, "cannot end a closed session's payment: {e}");
                    continue;
                }
            };
            let unpaid = match intent.status {
                IntentStatus::AwaitingPayment => {
                    self.end_unpaid(&intent, IntentStatus::Cancelled).await
                }
                IntentStatus::Paid => Ok(false),
                _ => continue, // running, or over already
            };
            let ended = match unpaid {
                Ok(true) => Ok("cancelled"),
                // Paid, perhaps just now.
                Ok(false) => self
                    .refund_unredeemed(&intent, CLOSED_UNUSED)
                    .await
                    .map(|refunded| {
                        if refunded {
                            "refunded"
                        } else {
                            "left as it was"
                        }
                    })
                    .map_err(ProviderError::from),
                Err(e) => Err(e),
            };
            match ended {
                Ok(what) => tracing::info!(
                    payment_id,
                    session,
                    "{what} the payment of a closed session's confirm tool"
                ),
                Err(e) => tracing::warn!(
                    payment_id,
                    session,
                    "cannot end a closed session's payment now (upkeep tries again): {e}"
                ),
            }
        }
    }

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
                format_in(intent.amount, &intent.currency),
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
                    paid: false,
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
        let answered = result
            .structured_content
            .as_ref()
            .and_then(|s| s["error"].as_str());
        let try_again = answered.is_some_and(|answered| {
            [
                code::PAYMENT_PENDING,
                code::UNAVAILABLE,
                code::PAYMENT_IN_PROGRESS,
                code::PAYMENT_MISMATCH,
            ]
            .contains(&answered)
        });
        // An "expired" answer is final: a session still open at a remote
        // provider was cancelled there first.
        if !try_again {
            self.dynamic.withdraw(scope.session_id, name).await;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What only reads or ends offers never makes an entry: a session
    /// forgotten when it closed stays forgotten.
    #[test]
    fn reading_or_ending_offers_keeps_no_entry_for_an_unknown_session() {
        let tools = DynamicTools::default();
        assert!(tools.listed("sess_gone").is_empty());
        assert!(!tools.settle("sess_gone", "confirm_pay_x", Outcome::Remove));
        tools.detach_listener("sess_gone", &RequestId::Number(1));
        let (due, changed) = tools.due(None, i64::MAX);
        assert!(due.is_empty() && changed.is_empty());
        assert_eq!(tools.sessions_kept(), 0);
    }

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
