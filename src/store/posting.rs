//! What a posting is made of, the same on both backends: the well-known
//! accounts, the transaction header, the audit data of each kind of money
//! movement, and how a finished intent settles.

use serde_json::json;

use super::{
    AccountKind, AccountRef, Audit, Charge, Intent, IntentOutcome, LocalSession, Posted,
    StoreError,
    rows::{Columns, currency_of},
};
use crate::money::{Currency, Units, format_in};

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
    /// A split capture's legs (see [`CapturePlan::legs`]).
    pub legs: Option<String>,
}

/// One ledger entry: account id, signed micro-units, and its role in a
/// split capture.
pub(super) type Entry = (i64, i64, Option<&'static str>);

/// Entries must sum to zero.
pub(super) fn check_balanced(kind: &str, entries: &[Entry]) -> Result<(), StoreError> {
    let sum: i64 = entries.iter().map(|(_, amount, _)| amount).sum();
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

/// A local session paid from a wallet, or by dev settlement (`None`),
/// for a call of `tool` (none for a session made through the sessions
/// API): a statement filtered by tool shows the payment beside its refund.
pub(super) fn session_payment_audit(
    session: &LocalSession,
    from_wallet: Option<&str>,
    tool: Option<String>,
) -> Audit {
    Audit {
        payer: Some(from_wallet.unwrap_or("dev-settlement").to_owned()),
        beneficiary: Some("clearing:payments".into()),
        tool,
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
        origin: intent.origin.clone(),
        approval: None,
    }
}

/// A charge with its accounts resolved to ids, as a capture posts it.
pub(super) struct CapturePlan {
    pub amount: Units,
    pub currency: Currency,
    pub beneficiary_id: i64,
    /// `[[account_id, amount, role], ...]`: what the `holds_capture` trigger
    /// posts, and what a statement shows of the split.
    pub legs: String,
    pub entries: Vec<Entry>,
}

impl CapturePlan {
    /// `ids` are the account ids of the charge's legs, in order.
    pub(super) fn new(
        charge: &Charge,
        beneficiary_id: i64,
        ids: &[i64],
    ) -> Result<Self, StoreError> {
        let amount = charge.total();
        if amount.is_zero() {
            return Err(StoreError::Invalid(
                "capture amount must be above zero; release instead".into(),
            ));
        }
        if charge.legs.iter().any(|(_, account, leg)| {
            leg.is_zero() || account.currency != charge.beneficiary.currency
        }) {
            return Err(StoreError::Invalid(format!(
                "a charge's legs must be above zero and in {}",
                charge.beneficiary.currency
            )));
        }
        let entries: Vec<Entry> = charge
            .legs
            .iter()
            .zip(ids)
            .map(|((role, _, leg), id)| (*id, leg.0, Some(role.as_str())))
            .collect();
        let legs = json!(
            entries
                .iter()
                .map(|(id, leg, role)| json!([id, leg, role]))
                .collect::<Vec<_>>()
        )
        .to_string();
        Ok(Self {
            amount,
            currency: charge.beneficiary.currency.clone(),
            beneficiary_id,
            legs,
            entries,
        })
    }
}

/// The legs of a split capture, by role, from a transaction's `legs`.
pub(super) fn legs_by_role(legs: Option<&str>) -> Vec<(String, Units)> {
    let Some(legs) = legs else {
        return Vec::new();
    };
    let parsed: Vec<(i64, i64, String)> = serde_json::from_str(legs).unwrap_or_default();
    parsed
        .into_iter()
        .map(|(_, amount, role)| (role, Units(amount)))
        .collect()
}

/// A capture that changed nothing, read from the hold's row (`HOLD`): the
/// capture itself when the hold was already captured just so (a retried
/// capture whose first answer was lost, say to a dropped connection), else
/// why it was refused.
pub(super) fn settled_capture(
    hold_id: &str,
    hold: Option<&impl Columns>,
    plan: &CapturePlan,
) -> Result<Posted, StoreError> {
    let (amount, beneficiary_id) = (plan.amount, plan.beneficiary_id);
    let Some(hold) = hold else {
        return Err(StoreError::hold_not_open(hold_id, None));
    };
    let status = hold.text("status")?;
    match status.as_str() {
        "open" => Err(StoreError::capture_above_hold(
            amount,
            hold.int("amount")?,
            &plan.currency,
        )),
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
    pub kind: &'static str,
    /// What the transaction moves: the charge on success, the refund on
    /// failure.
    pub amount: Units,
    pub audit: Audit,
    pub entries: Vec<Entry>,
    pub legs: Option<String>,
    /// What goes back to the payer, which gives back that much of a
    /// wallet's spending allowance: (account, amount).
    pub given_back: Option<(i64, i64)>,
}

impl Settlement {
    /// From the row `FINISH_INTENT` returned. Charge on success: a
    /// successful run earns its charge (`plan`, at most what was paid) and
    /// the rest goes back to the payer; a failed run, or one charged
    /// nothing (`plan` is `None`), gives it all back. `None` when nothing moves: a failed run with
    /// nobody to refund, whose money stays in clearing for an operator.
    pub(super) fn of(
        outcome: &IntentOutcome,
        row: &impl Columns,
        clearing_id: i64,
        plan: Option<&CapturePlan>,
    ) -> Result<Option<Self>, StoreError> {
        let currency = &outcome.charge.beneficiary.currency;
        let intent_currency = currency_of(row.text("currency")?)?;
        if &intent_currency != currency {
            return Err(StoreError::Invalid(format!(
                "intent {} is in {intent_currency}, beneficiary account in {currency}",
                outcome.intent_id
            )));
        }
        let paid = row.int("amount")?;
        let refund_to = row.opt_int("refund_account_id")?;
        let mut audit = Audit {
            payer: row.opt_text("principal")?,
            tool: row.opt_text("tool")?,
            intent_id: Some(outcome.intent_id.clone()),
            payment_id: Some(outcome.intent_id.clone()),
            origin: super::rows::origin(row)?,
            approval: super::rows::approval(row)?,
            ..Audit::default()
        };
        let Some(plan) = plan else {
            audit.memo = Some(match (&outcome.not_run, outcome.succeeded) {
                (Some(why), _) => format!("{why}: payment refunded"),
                (None, true) => "nothing used: payment refunded".into(),
                (None, false) => "tool failed: payment refunded".into(),
            });
            return Ok(refund_to.map(|refund_to| Self {
                kind: "refund",
                amount: Units(paid),
                audit,
                entries: vec![
                    (clearing_id, -paid, None),
                    (refund_to, paid, Some("refund")),
                ],
                legs: None,
                given_back: Some((refund_to, paid)),
            }));
        };
        let charged = plan.amount.0;
        let in_currency = |units| format_in(units, &plan.currency);
        if charged > paid {
            return Err(StoreError::Invalid(format!(
                "intent {}: a charge of {} is above the {} paid",
                outcome.intent_id,
                in_currency(plan.amount),
                in_currency(Units(paid)),
            )));
        }
        audit.beneficiary = Some(outcome.charge.beneficiary.name.clone());
        let mut entries = plan.entries.clone();
        // A metered run charged less than was paid: the rest goes back, or,
        // with nobody to refund, stays in clearing like a failed run's.
        let rest = paid - charged;
        let mut given_back = None;
        let out_of_clearing = match refund_to {
            Some(refund_to) if rest > 0 => {
                audit.memo = Some(format!(
                    "charged {} of {} paid; the rest refunded",
                    in_currency(plan.amount),
                    in_currency(Units(paid))
                ));
                entries.push((refund_to, rest, Some("refund")));
                given_back = Some((refund_to, rest));
                paid
            }
            _ => charged,
        };
        entries.push((clearing_id, -out_of_clearing, None));
        Ok(Some(Self {
            kind: "capture",
            amount: plan.amount,
            audit,
            entries,
            legs: Some(plan.legs.clone()),
            given_back,
        }))
    }
}
