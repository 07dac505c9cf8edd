//! What a posting is made of, the same on both backends: the well-known
//! accounts, the transaction header, the audit data of each kind of money
//! movement, and how a finished intent settles.

use super::{
    AccountKind, AccountRef, Audit, Intent, IntentOutcome, LocalSession, Posted, StoreError,
    rows::{Columns, currency_of},
};
use crate::money::{Currency, Units};

/// The account that holds money paid through sessions until a run earns it.
pub(super) fn clearing(currency: &Currency) -> AccountRef {
    AccountRef::new(AccountKind::Clearing, "payments", currency)
}

/// Where dev-mode settlements come from.
pub(super) fn dev_settlement(currency: &Currency) -> AccountRef {
    AccountRef::new(AccountKind::External, "dev-settlement", currency)
}

/// Where wallet top-ups come from.
pub(super) fn topups(currency: &Currency) -> AccountRef {
    AccountRef::new(AccountKind::External, "topups", currency)
}

/// A ledger transaction about to be written, with its entries.
pub(super) struct TxnHeader<'a> {
    pub id: String,
    pub kind: &'a str,
    pub currency: &'a Currency,
    pub amount: Units,
    pub audit: &'a Audit,
    pub at: i64,
}

/// Entries `(account id, signed micro-units)` must sum to zero.
pub(super) fn check_balanced(kind: &str, entries: &[(i64, i64)]) -> Result<(), StoreError> {
    let sum: i64 = entries.iter().map(|(_, amount)| amount).sum();
    if sum == 0 {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "unbalanced {kind} transaction (sums to {sum})"
        )))
    }
}

pub(super) fn topup_audit(wallet: &AccountRef, memo: Option<String>) -> Audit {
    Audit {
        beneficiary: Some(wallet.name.clone()),
        memo,
        ..Audit::default()
    }
}

/// A local session paid from a wallet, or by dev settlement (`None`).
pub(super) fn session_payment_audit(session: &LocalSession, from_wallet: Option<&str>) -> Audit {
    Audit {
        payer: Some(from_wallet.unwrap_or("dev-settlement").to_owned()),
        beneficiary: Some("clearing:payments".into()),
        intent_id: Some(session.id.clone()),
        payment_id: Some(session.id.clone()),
        memo: Some(session.description.clone()),
        ..Audit::default()
    }
}

/// An intent paid outside the ledger, through `account`.
pub(super) fn external_payment_audit(intent: &Intent, account: &str) -> Audit {
    Audit {
        payer: intent.principal.clone(),
        beneficiary: Some("clearing:payments".into()),
        tool: Some(intent.tool.clone()),
        intent_id: Some(intent.id.clone()),
        payment_id: Some(intent.id.clone()),
        memo: Some(format!("paid through {account}")),
    }
}

/// A capture that changed nothing, read from the hold's row (`HOLD`): the
/// capture itself when the hold was already captured just so (a retried
/// capture whose first answer was lost, say to a dropped connection), else
/// why it was refused.
pub(super) fn settled_capture(
    hold_id: &str,
    hold: Option<&impl Columns>,
    amount: Units,
    beneficiary_id: i64,
) -> Result<Posted, StoreError> {
    let Some(hold) = hold else {
        return Err(StoreError::hold_not_open(hold_id, None));
    };
    let status = hold.text("status")?;
    match status.as_str() {
        "open" => Err(StoreError::capture_above_hold(amount, hold.int("amount")?)),
        "captured"
            if hold.opt_int("captured")? == Some(amount.0)
                && hold.opt_int("beneficiary_account_id")? == Some(beneficiary_id) =>
        {
            Ok(Posted {
                txn_id: hold.opt_text("txn_id")?.unwrap_or_default(),
                at: hold.opt_int("settled_at")?.unwrap_or_default(),
            })
        }
        _ => Err(StoreError::hold_not_open(hold_id, Some(status))),
    }
}

/// How a finished intent's money moves out of clearing.
pub(super) struct Settlement {
    pub amount: Units,
    pub audit: Audit,
    /// Transaction kind and account: the beneficiary on success, the payer's
    /// refund account on failure, nothing when there is nobody to refund.
    pub destination: Option<(&'static str, i64)>,
}

impl Settlement {
    /// From the row `FINISH_INTENT` returned. Charge on success: a
    /// successful run earns the payment, a failed one gives it back.
    pub(super) fn of(
        outcome: &IntentOutcome,
        row: &impl Columns,
        beneficiary_id: i64,
    ) -> Result<Self, StoreError> {
        let currency = &outcome.beneficiary.currency;
        let intent_currency = currency_of(row.text("currency")?)?;
        if &intent_currency != currency {
            return Err(StoreError::Invalid(format!(
                "intent {} is in {intent_currency}, beneficiary account in {currency}",
                outcome.intent_id
            )));
        }
        let mut audit = Audit {
            payer: row.opt_text("principal")?,
            tool: row.opt_text("tool")?,
            intent_id: Some(outcome.intent_id.clone()),
            payment_id: Some(outcome.intent_id.clone()),
            ..Audit::default()
        };
        let destination = if outcome.succeeded {
            audit.beneficiary = Some(outcome.beneficiary.name.clone());
            Some(("capture", beneficiary_id))
        } else {
            audit.memo = Some("tool failed: payment refunded".into());
            row.opt_int("refund_account_id")?
                .map(|account| ("refund", account))
        };
        Ok(Self {
            amount: Units(row.int("amount")?),
            audit,
            destination,
        })
    }
}
