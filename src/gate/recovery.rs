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

use rmcp::model::JsonObject;
use serde_json::json;

use super::{
    Gate,
    redeem::refunded,
    reply::{self, code},
};
use crate::store::{Intent, IntentOutcome, StoreError, new_txn_id, now_ms};

/// What one recovery pass settled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovered {
    pub holds_released: u64,
    pub runs_refunded: u64,
}

impl Gate {
    /// Releases dead instances' holds and refunds their interrupted runs.
    /// Safe on several instances at once: each settlement is conditional
    /// on the hold being open, or the intent running.
    pub async fn recover_interrupted(&self) -> Result<Recovered, StoreError> {
        let now = now_ms();
        let mut recovered = Recovered {
            holds_released: self.store.release_orphaned_holds(now).await?,
            runs_refunded: 0,
        };
        for intent in self.store.interrupted_runs(now).await? {
            match self.store.finish_intent(&self.interrupted(&intent)).await {
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
                Err(e) => return Err(e),
            }
        }
        Ok(recovered)
    }

    /// The outcome of a run cut off by its server's death: failed, so the
    /// payer gets everything back.
    fn interrupted(&self, intent: &Intent) -> IntentOutcome {
        let message = format!(
            "the server stopped while this paid call of `{}` was running, so it is not known \
             whether it finished. Nothing was charged: the payment was refunded. Call `{}` again \
             for a new payment.",
            intent.tool, intent.tool
        );
        let result = reply::with_payment(
            reply::error(
                code::RUN_INTERRUPTED,
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
        }
    }
}
