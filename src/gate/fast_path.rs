//! Fast path: a funded wallet pays at once. Hold, run, then capture on
//! success or release on a tool error: no extra round trip for the client.

use std::{sync::Arc, time::Duration};

use rmcp::model::CallToolResult;
use serde_json::json;

use super::{CallScope, Gate, PricedCall, catalog::Entry, recording, reply};
use crate::{
    config::LONGEST_DURATION,
    money::{Units, format_in},
    receipt::ReceiptClaims,
    store::{
        HoldOutcome, HoldRequest, RefundRequest, Store, StoreError, new_payment_id, now_ms, rfc3339,
    },
};

/// A hold outlives any sane tool run; past this a crashed server's hold is
/// expired by the sweeper and the wallet gets its funds back.
const HOLD_TTL: Duration = Duration::from_secs(15 * 60);

/// What a hold keeps past the longest run its backend allows: the time to
/// record the run's charge.
const HOLD_MARGIN: Duration = Duration::from_secs(5 * 60);

impl Gate {
    /// `None` when the fast path does not apply: anonymous caller, a price
    /// above the approval threshold, or a wallet that cannot cover it.
    pub(super) async fn try_fast_path(
        &self,
        scope: &CallScope<'_>,
        call: &PricedCall<'_>,
        entry: &Entry,
    ) -> Option<CallToolResult> {
        let principal = scope.caller.principal.as_ref()?;
        if call.amount > call.threshold.amount {
            return None;
        }
        let payment_id = new_payment_id();
        // Longer than the run may take (an upstream's timeout), so that
        // the expiry sweep cannot end the hold under a run still going. A
        // backend's limit is taken at most as long as a configured one may
        // be (the embedding API's is not checked): a deadline past that
        // would not fit the store's milliseconds.
        let run_limit = entry
            .backend
            .run_limit()
            .map(|limit| limit.min(LONGEST_DURATION) + HOLD_MARGIN);
        let ttl = HOLD_TTL
            .max(self.settings.payment_ttl)
            .max(run_limit.unwrap_or_default());
        let hold = HoldRequest {
            hold_id: payment_id.clone(),
            principal: principal.clone(),
            amount: call.amount,
            currency: call.price.currency.clone(),
            tool: call.tool.to_owned(),
            args_hash: call.args_hash.clone(),
            expires_at: now_ms() + ttl.as_millis() as i64,
            origin: call.origin.clone(),
        };
        match self.store.hold(&hold).await {
            Ok(HoldOutcome::Held) => {}
            Ok(HoldOutcome::Insufficient) => {
                tracing::debug!(
                    tool = call.tool,
                    principal,
                    "wallet cannot cover the price; slow path"
                );
                return None;
            }
            Ok(HoldOutcome::OverLimit(breach)) => {
                return Some(Gate::refused_by_limit(call.tool, &breach));
            }
            Err(e) => {
                // The hold may have landed with its answer lost, or land
                // later still: given back in the background.
                self.lost_holds.add(&self.store, payment_id.clone());
                return Some(reply::unavailable(e));
            }
        }

        let result = self
            .run_tool(scope, entry, call.tool, call.args.clone())
            .await;
        let in_currency = |units| format_in(units, &call.price.currency);
        let currency = call.price.currency.as_str();

        // A metered call that used nothing costs nothing, like a failed one.
        // So does a call whose client cancelled it or went away meanwhile:
        // its result would never reach anyone.
        let charge = Gate::charge_for(call.price, &call.args, &result);
        let abandoned = scope.cancelled.is_cancelled();
        if result.is_error == Some(true) || charge.total().is_zero() || abandoned {
            if let Err(e) = self.store.release(&payment_id).await {
                // Nothing is charged. The hold is released once the store
                // takes it, so the wallet is not short until it expires.
                tracing::error!(
                    payment_id,
                    "release after tool error failed: {e}; trying again"
                );
                self.lost_holds.add(&self.store, payment_id.clone());
            }
            let why = if abandoned {
                "the client cancelled the call or went away before its result"
            } else {
                "tool failed or used nothing"
            };
            tracing::info!(
                tool = call.tool,
                principal,
                payment_id,
                "{why}; hold released"
            );
            // Not the result: a client that comes back for the answer (an
            // HTTP stream resumed) must not get unpaid what it was not
            // charged for.
            let result = match abandoned {
                true => CallToolResult::error(vec![rmcp::model::ContentBlock::text(
                    "the call was cancelled before its answer; nothing was charged",
                )]),
                false => result,
            };
            return Some(reply::with_payment(
                result,
                json!({ "payment_id": payment_id, "status": "released",
                        "amount": in_currency(call.amount), "currency": currency,
                        "charged": in_currency(Units(0)) }),
            ));
        }

        // A metered call is charged what it used; the rest of the hold goes
        // back to the wallet as the capture ends it.
        let amount = in_currency(charge.total());
        let posted = recording::until_recorded(
            "capture after a successful run",
            &payment_id,
            self.settings.timeouts.record,
            || self.store.capture(&payment_id, &charge),
        )
        .await;
        let posted = match posted {
            Ok(posted) => posted,
            Err(e) => {
                // The charge could not be recorded: the result is not handed
                // over unpaid, and the hold is given back, now or once the
                // store is back.
                tracing::error!(payment_id, "capture failed after a successful run: {e}");
                self.withhold(&payment_id);
                return Some(reply::unrecorded(&payment_id, e));
            }
        };
        let receipt = self.signer.sign(&ReceiptClaims {
            payment_id: payment_id.clone(),
            tool: call.tool.to_owned(),
            args_hash: call.args_hash.clone(),
            amount: amount.clone(),
            currency: currency.to_owned(),
            payer: Some(principal.clone()),
            ledger_txn: posted.txn_id.clone(),
            paid_at: rfc3339(posted.at),
            agent: call.origin.agent.clone(),
            metadata: call.origin.metadata_value(),
        });
        tracing::info!(
            tool = call.tool,
            principal,
            payment_id,
            amount,
            currency,
            "charged (fast path)"
        );
        let mut payment = json!({ "payment_id": payment_id, "status": "paid", "amount": amount,
                                  "currency": currency, "receipt": receipt });
        if charge.total() != call.amount {
            payment["held"] = json!(in_currency(call.amount));
        }
        Some(reply::with_payment(result, payment))
    }
}

/// Ends the hold of a call answered without its result: released if still
/// open; refunded in full if its capture landed after all (its answer was
/// lost), since the caller was told nothing was charged.
pub(super) async fn give_back(store: Arc<dyn Store>, hold_id: String) -> Result<(), StoreError> {
    match store.release(&hold_id).await {
        Ok(()) => Ok(()),
        Err(StoreError::WrongState { status, .. }) if status == "captured" => {
            let refund = RefundRequest {
                payment_id: hold_id.clone(),
                amount: None,
                reason: "the call's result was withheld: its charge could not be confirmed".into(),
                idempotency_key: format!("withheld_{hold_id}"),
                restores_allowance: true,
            };
            store.refund(&refund).await.map(|_| ())
        }
        // Released or expired: nothing was charged.
        Err(StoreError::WrongState { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        money::{Currency, Units},
        store::{AccountKind, AccountRef, Charge},
        testing::{TestDb, open_store},
    };

    /// A store with wallet `w` holding 100 micro-units (and what keeps its
    /// database until dropped).
    async fn funded_wallet() -> ((tempfile::TempDir, TestDb), Arc<dyn Store>) {
        let dir = tempfile::tempdir().unwrap();
        let db = TestDb::fresh(dir.path());
        let store = open_store(&db.url).await.unwrap();
        let usd = Currency::parse("USD").unwrap();
        store
            .topup(&AccountRef::wallet("w", &usd), Units(100), None)
            .await
            .unwrap();
        ((dir, db), store)
    }

    /// A hold of 30 on `w`.
    fn hold_of_30(id: &str) -> HoldRequest {
        HoldRequest {
            hold_id: id.into(),
            principal: "w".into(),
            amount: Units(30),
            currency: Currency::parse("USD").unwrap(),
            tool: "echo".into(),
            args_hash: "h".into(),
            expires_at: now_ms() + 60_000,
            origin: Default::default(),
        }
    }

    crate::on_both_backends! {
        /// What is left of a call answered without its result: an open hold
        /// is released; a capture that landed unseen is refunded in full.
        #[tokio::test]
        async fn a_withheld_calls_hold_is_released_or_its_landed_capture_refunded() {
            let (_db, store) = funded_wallet().await;
            let usd = Currency::parse("USD").unwrap();
            let daily = crate::allowance::Limits { daily: Some(Units(1_000)), ..Default::default() };
            store.set_limits(&AccountRef::wallet("w", &usd), &daily).await.unwrap();
            let spent_today = async || store.limits("w").await.unwrap()[0].spent.day;
            let available = async || store.balances("w").await.unwrap()[0].available;
            for id in ["open", "captured"] {
                assert_eq!(store.hold(&hold_of_30(id)).await.unwrap(), HoldOutcome::Held);
            }
            let revenue = AccountRef::new(AccountKind::Revenue, "author", &usd);
            store.capture("captured", &Charge::whole(revenue, Units(30))).await.unwrap();
            assert_eq!(available().await, Units(40));
            assert_eq!(spent_today().await, Units(60));

            give_back(store.clone(), "open".into()).await.unwrap();
            give_back(store.clone(), "captured".into()).await.unwrap();
            assert_eq!(available().await, Units(100), "both given back");
            assert_eq!(spent_today().await, Units(0), "and the allowance they counted");
            give_back(store.clone(), "captured".into()).await.unwrap();
            assert_eq!(available().await, Units(100), "once");
            let report = store.verify(now_ms()).await.unwrap();
            assert!(report.problems.is_empty(), "{:?}", report.problems);
        }
    }

    crate::on_both_backends! {
        /// A hold whose answer was lost is released when it lands, even
        /// after the call was answered; one that never lands is forgotten
        /// once it could no longer land.
        #[tokio::test]
        async fn a_hold_that_lands_after_its_answer_was_lost_is_released() {
            use crate::gate::lost_holds::LostHolds;
            let (_db, store) = funded_wallet().await;
            let lost = LostHolds::new(Duration::from_secs(2), Duration::from_millis(50));
            lost.add(&store, "late".into());
            lost.add(&store, "never".into());
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(store.hold(&hold_of_30("late")).await.unwrap(), HoldOutcome::Held);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while store.balances("w").await.unwrap()[0].available != Units(100) {
                assert!(tokio::time::Instant::now() < deadline, "the late hold was kept");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(lost.followed(), 1, "`never` is still looked for");
            while lost.followed() > 0 {
                assert!(tokio::time::Instant::now() < deadline, "`never` was followed for good");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
