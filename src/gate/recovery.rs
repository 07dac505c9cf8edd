//! Crash recovery: what a process that died (kill -9, power lost, a machine
//! gone) left behind, settled by whichever instance notices first. A dead
//! instance is one whose lease (`Store::heartbeat`) has lapsed.
//!
//! - Its open holds are released: their calls never finished, so nothing
//!   is charged (charge on success).
//! - Its paid intents left `running` are settled as failed: refunded in
//!   full, with a stored answer saying so. Whether the tool finished is not
//!   known, so it is not charged; and it never runs again, since a retry of
//!   the payment id replays that answer.
//!
//! Upkeep also refunds payments that were paid but never redeemed: once an
//! intent's time has been over for `keep_results`, its caller is not coming
//! back, and the money should not sit in clearing for ever.

use std::future::ready;

use futures::{StreamExt, stream};
use rmcp::model::JsonObject;
use serde_json::json;

use super::{
    Gate,
    redeem::{pays_for, refunded, remote_give_up, remote_grace_ends},
    reply::{self, code},
};
use crate::{
    provider::ProviderError,
    store::{
        Cursor, Funding, Intent, IntentOutcome, IntentStatus, REMOTE_DUE_PAGE, SessionStatus,
        StoreError, UNREDEEMED_PAGE, new_txn_id, now_ms,
    },
};

/// How many remote payments upkeep asks the provider about at once: a few,
/// since the provider's rate limit is shared with live callers.
const REMOTE_ASKS_AT_ONCE: usize = 4;

/// What upkeep did with one remote payment past its time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RemoteSettled {
    /// Paid in time: kept, for its caller to redeem.
    Kept,
    /// Not paid: expired.
    Expired,
    /// Left as it was, to be asked about again.
    Unchanged,
    /// The provider could not be reached: the rest waits for the next pass.
    ProviderDown,
}

fn count(settled: &[RemoteSettled], which: RemoteSettled) -> u64 {
    settled.iter().filter(|s| **s == which).count() as u64
}

/// How long one of this instance's runs may sit `running` with nothing
/// under way for it before it is taken for dropped: the claim is counted
/// before it lands, so this is only a margin.
const ABANDONED_AFTER_MS: i64 = 60_000;

/// Why recovery refunds a payment nobody redeemed (see
/// [`Gate::refund_unredeemed`]).
const NOT_USED_IN_TIME: &str = "not used in time";

/// What one recovery pass settled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovered {
    pub holds_released: u64,
    pub runs_refunded: u64,
    /// Paid but never redeemed in time.
    pub unredeemed_refunded: u64,
    /// Remote payments made in time and found after the intent's time ran
    /// out: kept, paid, for their caller to redeem.
    pub remote_paid_kept: u64,
    /// Intents of a remote provider that were not paid in time: expired.
    pub remote_expired: u64,
}

impl Gate {
    /// Releases dead instances' holds and refunds their interrupted runs.
    /// Safe on several instances at once: each settlement is conditional
    /// on the hold being open, or the intent running.
    /// Payments paid but not redeemed by `before` are refunded too.
    pub async fn recover_interrupted(&self, before: i64) -> Result<Recovered, StoreError> {
        let now = now_ms();
        let mut recovered = Recovered {
            holds_released: self.store.release_orphaned_holds(now).await?,
            ..Recovered::default()
        };
        let stopped = |intent: &Intent| {
            format!(
                "the server stopped while this paid call of `{}` was running, so it is not \
                 known whether it finished. Nothing was charged: the payment was refunded.",
                intent.tool
            )
        };
        let dropped = |intent: &Intent| {
            format!(
                "this paid call of `{}` was claimed but its run was never recorded (the store \
                 was unreachable), so it is not known whether it finished. Nothing was \
                 charged: the payment was refunded.",
                intent.tool
            )
        };
        let mut interrupted: Vec<_> = (self.store.interrupted_runs(now).await?.into_iter())
            .map(|intent| (stopped(&intent), intent))
            .collect();
        // This instance's own runs that nobody here is running or recording.
        for intent in self.store.own_stale_runs(now - ABANDONED_AFTER_MS).await? {
            if !self.runs.contains(&intent.id) {
                interrupted.push((dropped(&intent), intent));
            }
        }
        for (message, intent) in interrupted {
            let outcome = self.unrun(&intent, code::RUN_INTERRUPTED, message, "run interrupted");
            match self.store.finish_intent(&outcome).await {
                Ok(_) => {
                    tracing::warn!(
                        payment_id = intent.id,
                        tool = intent.tool,
                        "refunded a paid run its server died in the middle of"
                    );
                    recovered.runs_refunded += 1;
                }
                // Another instance settled it first.
                Err(StoreError::WrongState { .. }) => {}
                // This one cannot be settled as it stands: say so, and go
                // on with the others rather than stop every later refund.
                Err(StoreError::Invalid(why)) => {
                    tracing::error!(
                        payment_id = intent.id,
                        "cannot refund an interrupted run: {why}"
                    );
                }
                Err(e) => return Err(e),
            }
        }
        self.settle_remote_due(now, &mut recovered).await;
        // Page by page, so that intents left as they were (redeemed
        // meanwhile, a provider that did not answer, one that cannot be
        // settled) do not hide those after them.
        let mut after = Cursor::start();
        loop {
            let page = self.store.unredeemed(before, &after).await?;
            for intent in &page {
                match self.refund_unredeemed(intent, NOT_USED_IN_TIME).await {
                    Ok(true) => recovered.unredeemed_refunded += 1,
                    Ok(false) => {}
                    Err(StoreError::Invalid(why)) => {
                        tracing::error!(
                            payment_id = intent.id,
                            "cannot refund an unredeemed payment: {why}"
                        );
                    }
                    Err(e) => return Err(e),
                }
            }
            match page.last() {
                Some(last) if page.len() == UNREDEEMED_PAGE => after = Cursor::after(last),
                _ => return Ok(recovered),
            }
        }
    }

    /// Intents awaiting a remote provider's payment whose time ran out
    /// (the expiry sweep cannot see such a payment, so it leaves them
    /// here): paid in time, the money enters clearing and the intent stays
    /// redeemable (refunded if never used); otherwise it expires. One the
    /// provider cannot answer about now is asked again next time. A few are
    /// asked about at once, so that a slow provider holds up the rest of
    /// upkeep (expiring holds, pruning) a few times less.
    async fn settle_remote_due(&self, now: i64, recovered: &mut Recovered) {
        let mut after = Cursor::start();
        loop {
            let page = match self.store.remote_due(now, &after).await {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!("cannot list remote payments past their time: {e}");
                    return;
                }
            };
            // Stops at the first sign the provider is down (the calls still
            // under way are dropped: each step is a conditional update).
            // (Owned intents: a future borrowing one from the page trips
            // the compiler's check that upkeep's future is `Send`.)
            let settled: Vec<RemoteSettled> = stream::iter(page.iter().cloned())
                .map(|intent| async move { self.settle_remote(&intent, now).await })
                .buffer_unordered(REMOTE_ASKS_AT_ONCE)
                .take_while(|settled| ready(*settled != RemoteSettled::ProviderDown))
                .collect()
                .await;
            recovered.remote_paid_kept += count(&settled, RemoteSettled::Kept);
            recovered.remote_expired += count(&settled, RemoteSettled::Expired);
            if settled.len() < page.len() {
                return; // the provider is down: all of it, next pass
            }
            match page.last() {
                Some(last) if page.len() == REMOTE_DUE_PAGE => after = Cursor::after(last),
                _ => return,
            }
        }
    }

    /// One intent of [`Gate::settle_remote_due`].
    async fn settle_remote(&self, intent: &Intent, now: i64) -> RemoteSettled {
        let Some(session) = intent.provider_session_id.as_deref() else {
            return RemoteSettled::Unchanged;
        };
        let state = match self.session_state_of(intent, session).await {
            Ok(state) => Some(state),
            Err(e @ ProviderError::Unavailable(_)) => {
                tracing::warn!(payment_id = intent.id, "cannot ask about a payment: {e}");
                return RemoteSettled::ProviderDown;
            }
            // About this one only: unknown there though it was made there
            // (a key changed for another principal's, say: it may be paid
            // all the same), an answer that cannot be used (a status a newer
            // remote says), a refusal. The others are still asked, and this
            // one again until a day past its time, then taken as never paid.
            Err(
                e @ (ProviderError::NotFound(_)
                | ProviderError::Unreadable(_)
                | ProviderError::Refused(_)),
            ) if now >= remote_give_up(intent) => {
                tracing::warn!(
                    payment_id = intent.id,
                    "cannot ask about a payment ({e}) a day past its time: taken as never paid"
                );
                None
            }
            Err(e) => {
                tracing::warn!(payment_id = intent.id, "cannot ask about a payment: {e}");
                return RemoteSettled::Unchanged;
            }
        };
        // The remote session runs on the remote's clock and time, and may
        // still take the payment: asked again until the grace is over.
        if let Some(state) = &state
            && state.status == SessionStatus::Pending
            && now < remote_grace_ends(intent)
        {
            return RemoteSettled::Unchanged;
        }
        let paid_remotely = match &state {
            Some(state) if state.status == SessionStatus::Paid && pays_for(state, intent) => {
                match &state.funding {
                    Funding::External { account } => Some(account.as_str()),
                    Funding::InClearing { .. } => None,
                }
            }
            _ => None,
        };
        let settled = match paid_remotely {
            Some(account) => self
                .store
                .mark_paid_externally(&intent.id, account)
                .await
                .map_err(ProviderError::from)
                .map(|kept| kept.then_some(RemoteSettled::Kept)),
            // Still open there past the grace: cancelled there first.
            // Over there, unknown there, or paid but not for this intent
            // (refused): nothing to cancel.
            None => {
                let still_open = state
                    .as_ref()
                    .is_some_and(|s| s.status == SessionStatus::Pending);
                self.end_reported(intent, IntentStatus::Expired, still_open)
                    .await
                    .map(|ended| ended.then_some(RemoteSettled::Expired))
            }
        };
        match settled {
            Ok(Some(settled)) => settled,
            Ok(None) => RemoteSettled::Unchanged, // redeemed meanwhile
            // Left as it is: asked again next pass.
            Err(e) => {
                tracing::warn!(payment_id = intent.id, "cannot settle a payment: {e}");
                RemoteSettled::Unchanged
            }
        }
    }

    /// Takes a paid, never redeemed intent through `running` (so no late
    /// redeem can run it) to failed, refunded. `why` it was not used
    /// completes "payment … was paid but".
    pub(super) async fn refund_unredeemed(
        &self,
        intent: &Intent,
        why: &str,
    ) -> Result<bool, StoreError> {
        let _under_way = self.runs.enter(&intent.id);
        let claimed = if intent.status == IntentStatus::AwaitingPayment {
            let Some(session) = intent.provider_session_id.as_deref() else {
                return Ok(false);
            };
            let state = match self.session_state_of(intent, session).await {
                Ok(state) if state.status == SessionStatus::Paid && pays_for(&state, intent) => {
                    state
                }
                _ => return Ok(false),
            };
            self.store
                .claim_paid_intent(&intent.id, &state.funding)
                .await?
        } else {
            // Paid but not running: left by an older tollgate, which
            // marked and claimed in two writes.
            self.store
                .transition_intent(&intent.id, IntentStatus::Paid, IntentStatus::Running)
                .await?
        };
        if !claimed {
            return Ok(false); // redeemed after all, or refunded elsewhere
        }
        let message = format!(
            "payment `{}` was paid but {why}, so it was refunded and `{}` was not run.",
            intent.id, intent.tool
        );
        let outcome = self.unrun(
            intent,
            code::PAYMENT_UNREDEEMED,
            message,
            &format!("not run, {why}"),
        );
        self.store.finish_intent(&outcome).await?;
        tracing::info!(
            payment_id = intent.id,
            tool = intent.tool,
            "refunded a payment paid but never redeemed"
        );
        Ok(true)
    }

    /// The outcome of a paid intent whose run did not happen, or whose end
    /// is not known (`not_run` says which, for the ledger): failed, so the
    /// payer gets everything back.
    pub(super) fn unrun(
        &self,
        intent: &Intent,
        code: &str,
        message: String,
        not_run: &str,
    ) -> IntentOutcome {
        let message = format!("{message} Call `{}` again for a new payment.", intent.tool);
        let result = reply::with_payment(
            reply::error(
                code,
                message,
                reply::details(json!({ "payment_id": intent.id, "status": "refunded" })),
            ),
            refunded(intent),
        );
        let catalog = self.catalog();
        let price = catalog.get(&intent.tool).and_then(|e| e.price.as_ref());
        let args: JsonObject = serde_json::from_str(&intent.args_json).unwrap_or_default();
        IntentOutcome {
            intent_id: intent.id.clone(),
            succeeded: false,
            result_json: serde_json::to_string(&result).unwrap_or_default(),
            charge: self.intent_charge(intent, price, &args, &result),
            txn_id: new_txn_id(),
            at: now_ms(),
            not_run: Some(not_run.to_owned()),
        }
    }
}
