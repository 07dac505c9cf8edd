//! Redeeming a payment id: the confirm tool (two_step), the second call
//! (resubmit), and the waits of the interactive modes. A paid intent runs its
//! tool at most once; every retry gets the stored result back and is never
//! charged again.

use std::time::Duration;

use rmcp::model::{CallToolResult, JsonObject};
use serde_json::{Map, Value, json};
use tokio::time::Instant;

use super::{
    CallScope, Caller, Gate, Price,
    progress::ProgressReporter,
    recording::{self, Unrecorded},
    reply,
    reply::code,
    runs::UnderWay,
};
use crate::{
    money::{Units, format_in},
    provider::{ProviderError, SessionState},
    receipt::ReceiptClaims,
    store::{
        AccountKind, AccountRef, ApprovalStatus, Charge, Intent, IntentOutcome, IntentStatus,
        SessionStatus, StoreError, new_txn_id, now_ms, rfc3339,
    },
};

/// How often a concurrent redeem looks for the result of a run under way.
const RUN_POLL: Duration = Duration::from_millis(20);
/// Polling the provider while waiting: start quick, back off to this.
const FIRST_POLL: Duration = Duration::from_millis(2);
const MAX_POLL: Duration = Duration::from_secs(1);

/// How a redeem ended.
pub(super) enum Settled {
    /// Ran (or replayed), or ended for good (failed, expired, mismatch…).
    Final(CallToolResult),
    /// Still unpaid when the wait ended (or there was none); the intent
    /// stays payable. Carries the last look's answer (`payment_pending`, or
    /// `payment_system_unavailable` when the payment system failed then),
    /// and what ended the wait before its time, if anything did.
    Pending(CallToolResult, Option<&'static str>),
}

impl Settled {
    pub fn into_result(self) -> CallToolResult {
        match self {
            Settled::Final(r) | Settled::Pending(r, _) => r,
        }
    }
}

/// Keep polling the provider until `until`, reporting progress if asked.
/// The client's `notifications/cancelled` ends the wait early.
pub(super) struct Wait<'a> {
    pub until: Instant,
    pub progress: Option<&'a mut ProgressReporter>,
}

impl Wait<'_> {
    /// Whether there is time left to wait.
    fn open(&self) -> bool {
        Instant::now() < self.until
    }
}

impl Gate {
    /// `args_hash` is checked when the caller re-sent arguments (resubmit).
    pub(super) async fn redeem(
        &self,
        scope: &CallScope<'_>,
        payment_id: &str,
        tool: &str,
        args_hash: Option<&str>,
    ) -> CallToolResult {
        self.redeem_until(scope, payment_id, tool, args_hash, None)
            .await
            .into_result()
    }

    pub(super) async fn redeem_until(
        &self,
        scope: &CallScope<'_>,
        payment_id: &str,
        tool: &str,
        args_hash: Option<&str>,
        mut wait: Option<Wait<'_>>,
    ) -> Settled {
        let mut intent = match self
            .bound_intent(scope.caller, payment_id, tool, args_hash)
            .await
        {
            Ok(intent) => intent,
            Err(answer) => return Settled::Final(answer),
        };
        // How long to wait on a run under way, from when it is first seen:
        // a call that waited for the payment first still waits the run out.
        let mut run_deadline = None;
        let mut poll = FIRST_POLL;
        // Whether the payment system failed at the last look.
        let mut failing = false;
        loop {
            // Counted before a claim can land (see `runs`).
            let mut under_way = Some(self.runs.enter(&intent.id));
            let step = match intent.status {
                IntentStatus::Succeeded | IntentStatus::Failed => {
                    return Settled::Final(self.replay(&intent).await);
                }
                IntentStatus::AwaitingPayment => self.check_payment(scope, &intent).await,
                // Paid but not running: left by an older tollgate (which
                // marked and claimed in two writes), perhaps one still
                // sharing this PostgreSQL database.
                IntentStatus::Paid => match self
                    .store
                    .transition_intent(&intent.id, IntentStatus::Paid, IntentStatus::Running)
                    .await
                {
                    Ok(true) => {
                        let claimed = under_way.unwrap_or_else(|| self.runs.enter(&intent.id));
                        return Settled::Final(self.run_paid(scope, intent, claimed).await);
                    }
                    Ok(false) => Step::Reload,
                    Err(e) => return Settled::Final(reply::unavailable(e)),
                },
                IntentStatus::Running => {
                    let deadline = *run_deadline
                        .get_or_insert_with(|| Instant::now() + self.settings.run_wait);
                    if Instant::now() >= deadline {
                        return Settled::Final(self.still_running(&intent));
                    }
                    // A progress call's client hears it is still alive.
                    if let Some(progress) = wait.as_mut().and_then(|w| w.progress.as_deref_mut()) {
                        progress.heartbeat(scope).await;
                    }
                    // Not under way here while it waits: if the run was
                    // dropped, recovery must not take this caller's retries
                    // for it (it would never be refunded).
                    under_way = None;
                    tokio::select! {
                        () = tokio::time::sleep(RUN_POLL) => Step::Reload,
                        // The run goes on (here or elsewhere); this caller
                        // can ask again by the payment id.
                        _ = self.wait_ended(scope) => return Settled::Final(self.still_running(&intent)),
                    }
                }
                IntentStatus::Expired => {
                    Step::Answer(ended(&intent, code::PAYMENT_EXPIRED, "expired"))
                }
                IntentStatus::Cancelled => {
                    Step::Answer(ended(&intent, code::PAYMENT_CANCELLED, "cancelled"))
                }
                IntentStatus::Declined => Step::Answer(self.declined(&intent).await),
            };
            let pending = match step {
                Step::Answer(result) => return Settled::Final(result),
                Step::Claimed => {
                    // Taken before the claim (only a wait on a run lets it go).
                    let claimed = under_way.unwrap_or_else(|| self.runs.enter(&intent.id));
                    return Settled::Final(self.run_paid(scope, intent, claimed).await);
                }
                Step::Pending(result) => Some((result, None)),
                Step::Unconfirmed(cause) => Some((self.unconfirmed(&intent), Some(cause))),
                Step::Reload => None,
            };
            if let Some((result, cause)) = pending {
                let waiting = wait.as_ref().is_some_and(Wait::open);
                // A wait polls every second at most: an outage is logged as
                // it starts and ends, not at every poll.
                match &cause {
                    Some(cause) if !waiting => tracing::error!(
                        payment_id = intent.id,
                        "payment system unavailable: {cause}"
                    ),
                    Some(cause) if !failing => tracing::warn!(
                        payment_id = intent.id,
                        "payment system unavailable ({cause}); waiting on for the payment"
                    ),
                    None if failing => {
                        tracing::info!(payment_id = intent.id, "the payment system answers again")
                    }
                    _ => {}
                }
                failing = cause.is_some();
                let Some(wait) = wait.as_mut().filter(|_| waiting) else {
                    return Settled::Pending(result, None);
                };
                if let Some(progress) = wait.progress.as_deref_mut() {
                    progress.heartbeat(scope).await;
                }
                let pause = poll.min(wait.until.saturating_duration_since(Instant::now()));
                poll = (poll * 2).min(MAX_POLL);
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    // The payment stays payable, the call redeemable.
                    why = self.wait_ended(scope) => return Settled::Pending(result, Some(why)),
                }
            }
            intent = match self.store.intent(&intent.id).await {
                Ok(Some(fresh)) => fresh,
                Ok(None) => {
                    return Settled::Final(reply::unavailable(format!(
                        "intent {} vanished",
                        intent.id
                    )));
                }
                // A waiting call waits on through a passing failure, on
                // what it last read (the next check asks again).
                Err(e) if wait.as_ref().is_some_and(Wait::open) => {
                    if !failing {
                        tracing::warn!(
                            payment_id = intent.id,
                            "cannot read the intent while waiting ({e}); waiting on"
                        );
                    }
                    failing = true;
                    intent
                }
                Err(e) => {
                    tracing::error!(payment_id = intent.id, "payment system unavailable: {e}");
                    return Settled::Final(self.unconfirmed(&intent));
                }
            };
        }
    }

    /// When a payment made for `intent` and never used is refunded (by
    /// recovery): `keep_results` past the intent's time. Until then it is
    /// redeemable.
    pub(super) fn refunded_unused_at(&self, intent: &Intent) -> i64 {
        let keep = i64::try_from(self.settings.keep_results.as_millis()).unwrap_or(i64::MAX);
        intent.expires_at.saturating_add(keep)
    }

    /// A paid call whose run is under way (here or at another instance):
    /// the caller may ask again by its payment id for the stored result.
    fn still_running(&self, intent: &Intent) -> CallToolResult {
        reply::error(
            code::PAYMENT_IN_PROGRESS,
            format!(
                "payment `{}` is paid and its call is still running; try again shortly",
                intent.id
            ),
            reply::details(json!({ "payment_id": intent.id, "status": "running" })),
        )
    }

    /// A payment whose check was cut short: the call was cancelled, or
    /// tollgate is stopping.
    fn not_checked(&self, intent: &Intent, why: &str) -> CallToolResult {
        tracing::info!(payment_id = intent.id, "stopped asking the provider: {why}");
        reply::error(
            code::PAYMENT_PENDING,
            format!(
                "payment `{}` was not checked ({why}), and the tool did not run. A payment made \
                 stands: {}.",
                intent.id,
                self.redeem_hint(intent)
            ),
            pending_details(intent),
        )
    }

    /// The answer to a call whose payment's time is over here while its
    /// session, which cannot be cancelled, is still open at the provider.
    fn payable_past_its_time(&self, intent: &Intent, why: &str) -> CallToolResult {
        let until = rfc3339(remote_grace_ends(intent));
        reply::error(
            code::PAYMENT_PENDING,
            format!(
                "payment `{}` is not paid, and its time here is over, but {why}: a payment \
                 made there by {until} still counts. Pay {} {} at {}, then {}",
                intent.id,
                format_in(intent.amount, &intent.currency),
                intent.currency,
                intent.payment_url.as_deref().unwrap_or("(no url)"),
                self.redeem_hint(intent)
            ),
            reply::details(json!({
                "payment_id": intent.id,
                "status": "pending",
                "payment_url": intent.payment_url,
                "expires_at": until,
            })),
        )
    }

    /// The answer when the payment system cannot say whether `intent` was
    /// paid: the tool did not run, and a payment made stands, redeemable by
    /// its id. A waiting call polls on through it (as if still pending).
    /// (The caller logs the cause.)
    fn unconfirmed(&self, intent: &Intent) -> CallToolResult {
        reply::error(
            code::UNAVAILABLE,
            format!(
                "payment system unavailable: payment `{}` could not be checked, and the tool did not run. \
                 A payment made stands: once the payment system is back, {}.",
                intent.id,
                self.redeem_hint(intent)
            ),
            reply::details(json!({
                "payment_id": intent.id,
                "payment_url": intent.payment_url,
                "expires_at": rfc3339(intent.expires_at),
            })),
        )
    }

    /// The intent a payment id names, if it belongs to this call: the same
    /// tool, the same principal and (when given) the same arguments.
    pub(super) async fn bound_intent(
        &self,
        caller: &Caller,
        payment_id: &str,
        tool: &str,
        args_hash: Option<&str>,
    ) -> Result<Intent, CallToolResult> {
        let intent = match self.store.intent(payment_id).await {
            Ok(Some(intent)) => intent,
            Ok(None) => {
                return Err(reply::payment_not_found(payment_id));
            }
            Err(e) => return Err(reply::unavailable(e)),
        };
        match mismatch(&intent, caller, tool, args_hash) {
            None => Ok(intent),
            Some(why) => Err(mismatch_reply(payment_id, tool, why)),
        }
    }

    /// A declined intent: the person said no, or the provider failed the
    /// payment.
    async fn declined(&self, intent: &Intent) -> CallToolResult {
        let failed = match intent.provider_session_id.as_deref() {
            Some(id) => matches!(
                self.session_state_of(intent, id).await.map(|s| s.status),
                Ok(SessionStatus::Failed)
            ),
            None => false,
        };
        if failed {
            ended(intent, code::PAYMENT_FAILED, "failed")
        } else {
            ended(intent, code::PAYMENT_DECLINED, "declined")
        }
    }

    /// Asks the provider about an intent still awaiting payment, and moves
    /// the intent along with what it says: paid, it is claimed for this
    /// call to run. Accepting the client's word is never enough: only the
    /// provider's `paid` counts.
    async fn check_payment(&self, scope: &CallScope<'_>, intent: &Intent) -> Step {
        let Some(session_id) = intent.provider_session_id.as_deref() else {
            return Step::Answer(reply::unavailable(format!(
                "intent {} has no payment session",
                intent.id
            )));
        };
        // A remote provider that hangs is bounded only by its own timeouts
        // and retries (half a minute): a call cancelled, or a server
        // stopping, does not wait for it. Only the question is cut short,
        // never a write.
        let provider = match self.provider_of(intent) {
            Ok(provider) => provider,
            Err(e) => {
                return Step::Answer(reply::error(
                    code::UNAVAILABLE,
                    format!(
                        "payment `{}` could not be checked, and the tool did not run: {e}. \
                         A payment made there stands.",
                        intent.id
                    ),
                    reply::details(json!({ "payment_id": intent.id })),
                ));
            }
        };
        let state = tokio::select! {
            state = provider.session_state(session_id) => match state {
                Ok(state) => state,
                Err(e) => return Step::Unconfirmed(e.to_string()),
            },
            why = self.interrupted(scope) => return Step::Answer(self.not_checked(intent, why)),
        };
        let (to, code, status) = match state.status {
            SessionStatus::Paid if !pays_for(&state, intent) => {
                return Step::Answer(charged_otherwise(&state, intent));
            }
            SessionStatus::Paid => {
                return match self
                    .store
                    .claim_paid_intent(&intent.id, &state.funding)
                    .await
                {
                    Ok(true) => Step::Claimed,
                    // Another call claimed it first: look again.
                    Ok(false) => Step::Reload,
                    Err(e) => Step::Unconfirmed(e.to_string()),
                };
            }
            SessionStatus::Pending if now_ms() <= intent.expires_at => {
                return Step::Pending(reply::error(
                    code::PAYMENT_PENDING,
                    format!(
                        "payment `{}` is not paid yet: pay {} {} at {}, then {}",
                        intent.id,
                        format_in(intent.amount, &intent.currency),
                        intent.currency,
                        intent.payment_url.as_deref().unwrap_or("(no url)"),
                        self.redeem_hint(intent)
                    ),
                    pending_details(intent),
                ));
            }
            // Its time is over, though its session may still be open at
            // the provider (a remote one, on the remote's clock): cancelled
            // there before the caller is told it expired, or a payment made
            // there after that answer would be taken for nothing.
            SessionStatus::Pending => (IntentStatus::Expired, code::PAYMENT_EXPIRED, "expired"),
            over => self.ending_at_the_providers_word(intent, over).await,
        };
        let still_open = state.status == SessionStatus::Pending;
        match self.end_reported(intent, to, still_open).await {
            Ok(true) => Step::Answer(ended(intent, code, status)),
            // Someone else moved it first (perhaps to paid): look again.
            Ok(false) => Step::Reload,
            Err(ProviderError::StillPayable(why)) => {
                Step::Pending(self.payable_past_its_time(intent, &why))
            }
            // Not ended: a payment made meanwhile still counts.
            Err(e) => Step::Unconfirmed(e.to_string()),
        }
    }

    /// What an intent still awaiting payment ends as, its provider having
    /// reported its session `over` (failed, cancelled or expired there):
    /// `(status, error code, status word)`. A failed payment is recorded as
    /// the provider's decline of the intent's approval, if it had one.
    pub(super) async fn ending_at_the_providers_word(
        &self,
        intent: &Intent,
        over: SessionStatus,
    ) -> (IntentStatus, &'static str, &'static str) {
        match over {
            SessionStatus::Failed => {
                let by = format!("provider {}", intent.provider);
                self.record_decision(intent, ApprovalStatus::Declined, &by)
                    .await;
                (IntentStatus::Declined, code::PAYMENT_FAILED, "failed")
            }
            SessionStatus::Cancelled => (
                IntentStatus::Cancelled,
                code::PAYMENT_CANCELLED,
                "cancelled",
            ),
            _ => (IntentStatus::Expired, code::PAYMENT_EXPIRED, "expired"),
        }
    }

    /// Ends an intent still awaiting payment as `to` (expired, declined,
    /// cancelled), cancelling its provider session first so that it can no
    /// longer be paid. False if the intent had already moved on, or if its
    /// session was paid before the cancel reached it: then the intent stays
    /// payable, and is refunded if it is never used. An error, and the
    /// intent left as it is, if the provider could not be made to cancel
    /// (unreachable, or its session still pending), or if it has no cancel
    /// and the session is still open there: ended here while still payable
    /// there, a payment made there would be taken and never seen. Upkeep
    /// tries again, and gives up a day past the intent's time: by then the
    /// remote's own time is surely over too.
    pub(super) async fn end_unpaid(
        &self,
        intent: &Intent,
        to: IntentStatus,
    ) -> Result<bool, ProviderError> {
        if let Some(session) = intent.provider_session_id.as_deref() {
            let cancelled = async { self.provider_of(intent)?.cancel_session(session).await };
            let not_cancelled = match cancelled.await {
                // A remote provider's payment is not in this store, so the
                // store's own check below cannot see it.
                Ok(SessionStatus::Paid) => return Ok(false),
                Ok(SessionStatus::Cancelled | SessionStatus::Expired | SessionStatus::Failed) => {
                    None
                }
                Ok(SessionStatus::Pending) => Some(ProviderError::Unavailable(format!(
                    "the provider did not cancel payment session `{session}` (still pending)"
                ))),
                Err(e @ ProviderError::Store(_)) => return Err(e),
                // Cannot be cancelled, ever: no cancel there (the seed API
                // has none), not for this key, or the session unknown
                // there. What the session says decides.
                Err(
                    e @ (ProviderError::NotFound(_)
                    | ProviderError::Unsupported(_)
                    | ProviderError::Refused(_)),
                ) => match self.session_state_of(intent, session).await {
                    Ok(state) if state.status == SessionStatus::Paid => return Ok(false),
                    // Payable there until the remote's own time is surely
                    // over: left open until then. (What the provider said
                    // is logged, not told to the caller.)
                    Ok(state)
                        if state.status == SessionStatus::Pending
                            && now_ms() < remote_grace_ends(intent) =>
                    {
                        tracing::info!(
                            payment_id = intent.id,
                            session,
                            "the provider cannot cancel the session ({e}), which is still open: \
                             the payment stays open"
                        );
                        Some(ProviderError::StillPayable(format!(
                            "payment session `{session}` cannot be cancelled at the provider, \
                             and is still open there"
                        )))
                    }
                    // Over there, or past its time.
                    Ok(_) => {
                        tracing::warn!(
                            payment_id = intent.id,
                            session,
                            "the provider cannot cancel the session ({e}): a payment made \
                             there now is not seen here"
                        );
                        None
                    }
                    // Unknown there though it was made there (a key changed
                    // for another principal's, say): it may be paid all the
                    // same, so left open until the give-up, as upkeep does.
                    Err(ProviderError::NotFound(_)) => Some(ProviderError::Unavailable(format!(
                        "the provider does not know payment session `{session}`"
                    ))),
                    Err(e) => Some(e),
                },
                Err(e) => Some(e),
            };
            if let Some(why) = not_cancelled {
                if now_ms() < remote_give_up(intent) {
                    return Err(why);
                }
                tracing::warn!(
                    payment_id = intent.id,
                    session,
                    "ending the payment a day past its time, though its session could not \
                     be cancelled ({why}): a payment made there now is not seen here"
                );
            }
        }
        Ok(self.store.end_unpaid_intent(&intent.id, to).await?)
    }

    /// Ends an intent still awaiting payment as `to`, its provider having
    /// just reported its session: cancelled there first (see
    /// [`Gate::end_unpaid`]) if `still_open`; over there (or unknown there),
    /// nothing to cancel.
    pub(super) async fn end_reported(
        &self,
        intent: &Intent,
        to: IntentStatus,
        still_open: bool,
    ) -> Result<bool, ProviderError> {
        if still_open {
            return self.end_unpaid(intent, to).await;
        }
        Ok(self.store.end_unpaid_intent(&intent.id, to).await?)
    }

    /// Runs a paid intent's tool, the one time it runs, and settles: the
    /// result and the ledger posting are stored in one transaction.
    async fn run_paid(
        &self,
        scope: &CallScope<'_>,
        intent: Intent,
        under_way: UnderWay,
    ) -> CallToolResult {
        let catalog = self.catalog();
        let Some(entry) = catalog.get(&intent.tool) else {
            // Its upstream dropped it since the payment: refund it now,
            // rather than leave it running, claimed, until this process ends.
            let message = format!(
                "`{}` is no longer served, so this paid call did not run; the payment was refunded.",
                intent.tool
            );
            let outcome = self.unrun(
                &intent,
                code::TOOL_GONE,
                message,
                "not run, its tool no longer served",
            );
            return match self.store.finish_intent(&outcome).await {
                Ok(_) => {
                    tracing::warn!(
                        payment_id = intent.id,
                        tool = intent.tool,
                        "tool gone; paid call refunded"
                    );
                    serde_json::from_str(&outcome.result_json).unwrap_or_else(reply::unavailable)
                }
                Err(e) => reply::unavailable(e),
            };
        };
        let args: JsonObject = serde_json::from_str(&intent.args_json).unwrap_or_default();
        let result = self
            .run_tool(scope, entry, &intent.tool, args.clone())
            .await;
        let mut outcome = IntentOutcome {
            intent_id: intent.id.clone(),
            succeeded: result.is_error != Some(true),
            // Set below, once it carries the payment block.
            result_json: String::new(),
            charge: self.intent_charge(&intent, entry.price.as_ref(), &args, &result),
            txn_id: new_txn_id(),
            at: now_ms(),
            not_run: None,
        };
        let (charge, txn_id, at) = (&outcome.charge, &outcome.txn_id, outcome.at);
        let in_currency = |units| format_in(units, &intent.currency);
        let amount = in_currency(if outcome.earns() {
            charge.total()
        } else {
            intent.amount
        });
        let payment = if outcome.earns() {
            let receipt = self.signer.sign(&ReceiptClaims {
                payment_id: intent.id.clone(),
                tool: intent.tool.clone(),
                args_hash: intent.args_hash.clone(),
                amount: amount.clone(),
                currency: intent.currency.to_string(),
                payer: intent.principal.clone(),
                ledger_txn: txn_id.clone(),
                paid_at: rfc3339(at),
                agent: intent.origin.agent.clone(),
                metadata: intent.origin.metadata_value(),
            });
            let mut paid = json!({ "payment_id": intent.id, "status": "paid", "amount": amount,
                                   "currency": intent.currency.as_str(), "receipt": receipt });
            if charge.total() != intent.amount {
                // A metered run: the rest of what was paid is refunded.
                paid["paid"] = json!(in_currency(intent.amount));
                paid["refunded"] = json!(in_currency(Units(intent.amount.0 - charge.total().0)));
            }
            paid
        } else {
            refunded(&intent)
        };
        let result = reply::with_payment(result, payment);
        outcome.result_json = serde_json::to_string(&result).unwrap_or_default();
        let finished = recording::until_recorded(
            "storing a paid run's result",
            &intent.id,
            self.settings.timeouts.record,
            || self.store.finish_intent(&outcome),
        )
        .await;
        if let Err(Unrecorded::Retried(StoreError::WrongState { .. }))
        | Err(Unrecorded::Refused(StoreError::WrongState { .. })) = &finished
        {
            // Someone else ended the run: crash recovery, which took this
            // instance for dead (its lease lapsed) and refunded the payment.
            // What was stored is the truth, so that is the answer. Unread,
            // it may be recovery's refund: this result is not handed over as
            // paid, and a retry of the payment id gets what was stored.
            match self.store.stored_result(&intent.id).await {
                Ok(Some(stored)) if stored.result_json != outcome.result_json => {
                    tracing::warn!(
                        payment_id = intent.id,
                        "crash recovery settled this run while it ran; answering with what it stored"
                    );
                    return self.replay(&intent).await;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(
                        payment_id = intent.id,
                        "this run was settled elsewhere, and what was stored cannot be read: {e}"
                    );
                    return reply::run_unrecorded(&intent.id);
                }
            }
        }
        match finished {
            // Only this call moved the intent to `running`, so a retry that
            // finds it moved on means an earlier attempt landed.
            Err(Unrecorded::Retried(StoreError::WrongState { .. })) | Ok(_) => {
                // Worded as the fast path's, so one grep finds every charge.
                let ended = match (outcome.earns(), outcome.succeeded) {
                    (true, _) => "charged",
                    (false, true) => "refunded: its run charged nothing",
                    (false, false) => "refunded: its tool failed",
                };
                tracing::info!(
                    tool = intent.tool,
                    principal = intent.principal.as_deref().unwrap_or("anonymous"),
                    payment_id = intent.id,
                    amount,
                    currency = intent.currency.as_str(),
                    "{ended} (slow path, {})",
                    intent.mode
                );
            }
            Err(e) => {
                // Not handed over before its charge is recorded. The intent
                // stays `running` (it never runs again) while the result and
                // the charge are stored in the background; a retry of the
                // payment id then gets them. Should this process die first,
                // crash recovery refunds the payment.
                tracing::error!(
                    payment_id = intent.id,
                    "could not store the result of a paid run: {e}"
                );
                let store = self.store.clone();
                recording::in_background(
                    "storing a paid run's result",
                    intent.id.clone(),
                    move || {
                        // Under way until this gives up or lands.
                        let _under_way = &under_way;
                        let (store, outcome) = (store.clone(), outcome.clone());
                        async move {
                            match store.finish_intent(&outcome).await {
                                // Landed unseen before, or settled by recovery.
                                Ok(_) | Err(StoreError::WrongState { .. }) => Ok(()),
                                Err(e) => Err(e),
                            }
                        }
                    },
                );
                return reply::run_unrecorded(&intent.id);
            }
        }
        result
    }

    /// What a paid intent's successful run is charged: its tool's tariff and
    /// terms, never more than was paid, in the currency paid. Pricing that
    /// changed since the intent was paid (its amount or its currency) cannot
    /// raise it or move it: the run is then charged what was paid.
    pub(super) fn intent_charge(
        &self,
        intent: &Intent,
        price: Option<&Price>,
        args: &JsonObject,
        result: &CallToolResult,
    ) -> Charge {
        let charge = price.map(|price| Gate::charge_for(price, args, result));
        match charge {
            Some(charge)
                if charge.total() <= intent.amount
                    && charge.beneficiary.currency == intent.currency =>
            {
                charge
            }
            _ => {
                let beneficiary = price.map_or(self.settings.beneficiary.as_str(), |p| {
                    p.terms.beneficiary.as_str()
                });
                tracing::warn!(
                    payment_id = intent.id,
                    "the tool's price changed since it was paid; charged what was paid"
                );
                Charge::whole(
                    AccountRef::new(AccountKind::Revenue, beneficiary, &intent.currency),
                    intent.amount,
                )
            }
        }
    }

    /// A consumed payment id: the stored result, never a second run.
    async fn replay(&self, intent: &Intent) -> CallToolResult {
        match self.store.stored_result(&intent.id).await {
            Ok(Some(stored)) => match serde_json::from_str::<CallToolResult>(&stored.result_json) {
                Ok(mut result) => {
                    if let Some(Value::Object(payment)) = result
                        .meta
                        .as_mut()
                        .and_then(|m| m.0.get_mut(reply::PAYMENT_META))
                    {
                        payment.insert("replayed".into(), json!(true));
                    }
                    result
                }
                Err(e) => {
                    reply::unavailable(format!("stored result of {} is unreadable: {e}", intent.id))
                }
            },
            // Pruned after `[server] keep_results`: the payment stays
            // consumed, and its ledger lines and receipt stand.
            Ok(None) => reply::error(
                code::RESULT_NOT_KEPT,
                format!(
                    "payment `{}` was used already ({}); its result is no longer kept. Call `{}` again for a new payment.",
                    intent.id,
                    intent.status.as_str(),
                    intent.tool
                ),
                reply::details(
                    json!({ "payment_id": intent.id, "status": intent.status.as_str() }),
                ),
            ),
            Err(e) => reply::unavailable(e),
        }
    }
}

enum Step {
    Answer(CallToolResult),
    /// Paid, and this call claimed the one run.
    Claimed,
    /// Not paid yet: the `payment_pending` answer, unless the caller waits.
    Pending(CallToolResult),
    /// The payment system could not say (why): pending, as far as anyone
    /// here knows.
    Unconfirmed(String),
    Reload,
}

pub(super) fn mismatch_reply(payment_id: &str, tool: &str, why: &str) -> CallToolResult {
    tracing::warn!(payment_id, tool, "payment_mismatch: {why}");
    reply::error(
        code::PAYMENT_MISMATCH,
        format!("payment `{payment_id}` does not belong to this call: {why}"),
        reply::details(json!({ "payment_id": payment_id })),
    )
}

fn mismatch(
    intent: &Intent,
    caller: &Caller,
    tool: &str,
    args_hash: Option<&str>,
) -> Option<&'static str> {
    if intent.tool != tool {
        return Some("it was issued for another tool");
    }
    if intent.principal != caller.principal {
        return Some("it was issued to another principal");
    }
    if args_hash.is_some_and(|h| h != intent.args_hash && h != rehashed(intent).as_str()) {
        return Some("the arguments differ from the ones it was issued for");
    }
    None
}

/// The hash of an intent's stored arguments as [`crate::canonical::args_hash`] makes it now.
/// An intent opened before whole numbers were hashed as integers (by this
/// tollgate before an upgrade, or by an older instance on the same store)
/// holds its hash the old way.
fn rehashed(intent: &Intent) -> String {
    serde_json::from_str::<Value>(&intent.args_json)
        .map(|args| crate::canonical::args_hash(&args))
        .unwrap_or_default()
}

/// The payment block of a paid intent whose run earned nothing: all of it
/// went back to the payer.
pub(super) fn refunded(intent: &Intent) -> Value {
    let in_currency = |units| format_in(units, &intent.currency);
    json!({ "payment_id": intent.id, "status": "refunded", "amount": in_currency(intent.amount),
            "currency": intent.currency.as_str(), "charged": in_currency(Units(0)) })
}

/// How long past its time an intent whose session is still pending at its
/// provider stays open. A local session ends with its intent; a remote one
/// runs on the remote's clock and time, and may take the payment a little
/// later: ended at once, that payment would be lost to both sides.
const REMOTE_PENDING_GRACE_MS: i64 = 10 * 60_000;

/// How long past the grace an intent whose provider session cannot be
/// cancelled is left open, before it is ended all the same.
const GIVE_UP_CANCEL_MS: i64 = 24 * 3_600_000;

/// Until when an intent whose provider session is still pending is left
/// open (see [`REMOTE_PENDING_GRACE_MS`]).
pub(super) fn remote_grace_ends(intent: &Intent) -> i64 {
    intent.expires_at.saturating_add(REMOTE_PENDING_GRACE_MS)
}

/// Until when an intent whose provider session cannot be cancelled, or
/// cannot be found there, is left open (see [`GIVE_UP_CANCEL_MS`]).
pub(super) fn remote_give_up(intent: &Intent) -> i64 {
    remote_grace_ends(intent).saturating_add(GIVE_UP_CANCEL_MS)
}

/// The details of an answer that leaves `intent` waiting for its payment.
fn pending_details(intent: &Intent) -> Map<String, Value> {
    reply::details(json!({
        "payment_id": intent.id,
        "status": "pending",
        "payment_url": intent.payment_url,
        "expires_at": rfc3339(intent.expires_at),
    }))
}

/// The answer for an intent that ended without running.
pub(super) fn ended(intent: &Intent, code: &str, status: &str) -> CallToolResult {
    let mut details = Map::new();
    details.insert("payment_id".into(), json!(intent.id));
    details.insert("status".into(), json!(status));
    reply::error(
        code,
        format!(
            "payment `{}` is {status}; nothing was charged. Call `{}` again for a new payment.",
            intent.id, intent.tool
        ),
        details,
    )
}

/// Whether a provider's session, paid, pays for `intent`: a remote
/// provider's word on what it charged must match the intent's amount and
/// currency (another session's payment, or another reading of minor
/// units, is not this payment).
pub(super) fn pays_for(state: &SessionState, intent: &Intent) -> bool {
    state
        .charged
        .as_ref()
        .is_none_or(|(amount, currency)| *amount == intent.amount && *currency == intent.currency)
}

/// The answer to a payment its provider reports charged for something else.
fn charged_otherwise(state: &SessionState, intent: &Intent) -> CallToolResult {
    let reported = state
        .charged
        .as_ref()
        .map_or_else(String::new, |(amount, currency)| {
            format!("{} {currency}", format_in(*amount, currency))
        });
    tracing::error!(
        payment_id = intent.id,
        reported,
        "the provider reports the session paid for another amount or currency: not taken"
    );
    reply::error(
        code::PAYMENT_FAILED,
        format!(
            "the payment provider reports payment `{}` paid as {reported}, not the {} {} it is \
             for, so it is not taken as this payment and `{}` does not run",
            intent.id,
            format_in(intent.amount, &intent.currency),
            intent.currency,
            intent.tool
        ),
        reply::details(json!({ "payment_id": intent.id, "status": "failed" })),
    )
}
