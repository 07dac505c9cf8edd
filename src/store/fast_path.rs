//! The fast path's hold and capture, as both backends' writers take them.
//! Each is one conditional statement: a hold only if the wallet covers it,
//! a capture (like a release) only of an open hold; the writer reports
//! whether it took effect.

use super::{HoldRequest, Posted, new_txn_id, now_ms, posting::CapturePlan};

/// Reserve `amount` if the wallet's available balance covers it and its
/// limits allow it.
#[derive(Debug)]
pub(super) struct Hold {
    pub id: String,
    pub principal: String,
    pub currency: String,
    pub amount: i64,
    pub tool: String,
    pub args_hash: String,
    /// Also what the wallet's daily and monthly caps count it in.
    pub created_at: i64,
    pub expires_at: i64,
    pub agent: Option<String>,
    pub metadata: Option<String>,
    /// The instance whose call it is (crash recovery).
    pub owner: String,
}

impl Hold {
    /// `request`, made now by the instance `owner`.
    pub fn new(request: &HoldRequest, owner: &str) -> Self {
        Self {
            id: request.hold_id.clone(),
            principal: request.principal.clone(),
            currency: request.currency.as_str().to_owned(),
            amount: request.amount.0,
            tool: request.tool.clone(),
            args_hash: request.args_hash.clone(),
            created_at: now_ms(),
            expires_at: request.expires_at,
            agent: request.origin.agent.clone(),
            metadata: request.origin.metadata.clone(),
            owner: owner.to_owned(),
        }
    }
}

/// End an open hold by charging at most its amount: the `holds_capture`
/// trigger gives the reservation back and posts the ledger transaction,
/// with one entry per leg.
#[derive(Debug)]
pub(super) struct Capture {
    pub hold_id: String,
    pub amount: i64,
    pub at: i64,
    pub txn_id: String,
    pub beneficiary_id: i64,
    /// The charge's legs, posted by the trigger.
    pub legs: String,
}

impl Capture {
    /// Capturing `plan` from `hold_id` now, as a new ledger transaction.
    pub fn new(hold_id: &str, plan: &CapturePlan) -> Self {
        Self {
            hold_id: hold_id.to_owned(),
            amount: plan.amount.0,
            at: now_ms(),
            txn_id: new_txn_id(),
            beneficiary_id: plan.beneficiary_id,
            legs: plan.legs.clone(),
        }
    }

    /// What the capture posts once it lands.
    pub fn posted(&self) -> Posted {
        Posted {
            txn_id: self.txn_id.clone(),
            at: self.at,
        }
    }
}
