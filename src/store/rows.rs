//! Reading store rows into domain types, shared by both backends: each
//! backend says how to read a column ([`Columns`]), and the mapping from
//! columns to intents, sessions and keys is written once.

use sqlx::Row;

use super::{
    AccountKind, AccountRef, Approval, ApprovalStatus, HoldRecord, Intent, IntentStatus,
    LocalSession, OpenIntents, Origin, SessionStatus, StatementLine, StoreError, StoreStats,
    StoredResult, WalletBalance, WalletLimits, parse_scopes,
};
use crate::{
    allowance::{Limits, Spent},
    keys::ApiKey,
    money::{Currency, Units},
};

/// Typed column access on one row of either backend.
pub(super) trait Columns {
    fn text(&self, column: &str) -> Result<String, StoreError>;
    fn opt_text(&self, column: &str) -> Result<Option<String>, StoreError>;
    fn int(&self, column: &str) -> Result<i64, StoreError>;
    fn opt_int(&self, column: &str) -> Result<Option<i64>, StoreError>;
    fn flag(&self, column: &str) -> Result<bool, StoreError>;
}

/// How many rows a write changed, on either backend.
pub(super) trait Changed {
    fn changed(&self) -> u64;
}
impl Changed for sqlx::sqlite::SqliteQueryResult {
    fn changed(&self) -> u64 {
        self.rows_affected()
    }
}
impl Changed for sqlx::postgres::PgQueryResult {
    fn changed(&self) -> u64 {
        self.rows_affected()
    }
}

macro_rules! columns_for {
    ($row:ty) => {
        impl Columns for $row {
            fn text(&self, column: &str) -> Result<String, StoreError> {
                Ok(self.try_get(column)?)
            }
            fn opt_text(&self, column: &str) -> Result<Option<String>, StoreError> {
                Ok(self.try_get(column)?)
            }
            fn int(&self, column: &str) -> Result<i64, StoreError> {
                Ok(self.try_get(column)?)
            }
            fn opt_int(&self, column: &str) -> Result<Option<i64>, StoreError> {
                Ok(self.try_get(column)?)
            }
            fn flag(&self, column: &str) -> Result<bool, StoreError> {
                Ok(self.try_get(column)?)
            }
        }
    };
}
columns_for!(sqlx::sqlite::SqliteRow);
columns_for!(sqlx::postgres::PgRow);

pub(super) fn currency_of(text: String) -> Result<Currency, StoreError> {
    Currency::recorded(&text).map_err(|e| StoreError::Corrupt(e.to_string()))
}

pub(super) fn intent(row: &impl Columns) -> Result<Intent, StoreError> {
    let status = row.text("status")?;
    Ok(Intent {
        id: row.text("id")?,
        tool: row.text("tool")?,
        args_hash: row.text("args_hash")?,
        args_json: row.text("args_json")?,
        amount: Units(row.int("amount")?),
        currency: currency_of(row.text("currency")?)?,
        principal: row.opt_text("principal")?,
        session_id: row.opt_text("session_id")?,
        mode: row.text("mode")?,
        status: IntentStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("intent status {status}")))?,
        provider: row.text("provider")?,
        provider_session_id: row.opt_text("provider_session_id")?,
        payment_url: row.opt_text("payment_url")?,
        created_at: row.int("created_at")?,
        expires_at: row.int("expires_at")?,
        origin: origin(row)?,
        approval: approval(row)?,
    })
}

/// The `agent` and `metadata` columns.
pub(super) fn origin(row: &impl Columns) -> Result<Origin, StoreError> {
    Ok(Origin {
        agent: row.opt_text("agent")?,
        metadata: row.opt_text("metadata")?,
    })
}

/// The `approval`, `approved_by`, `approved_at` and `approval_rule`
/// columns (a ledger transaction's rule is always null).
pub(super) fn approval(row: &impl Columns) -> Result<Option<Approval>, StoreError> {
    let Some(status) = row.opt_text("approval")? else {
        return Ok(None);
    };
    Ok(Some(Approval {
        status: ApprovalStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("approval status {status}")))?,
        by: row.opt_text("approved_by")?,
        at: row.opt_int("approved_at")?,
        rule: row.opt_text("approval_rule")?,
    }))
}

pub(super) fn limits(row: &impl Columns) -> Result<WalletLimits, StoreError> {
    let amount = |column| Ok::<_, StoreError>(row.opt_int(column)?.map(Units));
    Ok(WalletLimits {
        currency: currency_of(row.text("currency")?)?,
        limits: Limits {
            per_call: amount("per_call_max")?,
            daily: amount("daily_cap")?,
            monthly: amount("monthly_cap")?,
            tools: Limits::parse_tools_json(row.opt_text("allowed_tools")?.as_deref()),
        },
        spent: Spent {
            day_start: row.int("spent_day_start")?,
            day: Units(row.int("spent_day")?),
            month_start: row.int("spent_month_start")?,
            month: Units(row.int("spent_month")?),
        },
    })
}

pub(super) fn session(row: &impl Columns) -> Result<LocalSession, StoreError> {
    let status = row.text("status")?;
    let currency = currency_of(row.text("currency")?)?;
    let paid_kind = row.opt_text("paid_kind")?;
    let paid_from = match (
        paid_kind.as_deref().and_then(AccountKind::parse),
        row.opt_text("paid_name")?,
    ) {
        (Some(kind), Some(name)) => Some(AccountRef::new(kind, name, &currency)),
        _ => None,
    };
    Ok(LocalSession {
        id: row.text("id")?,
        amount: Units(row.int("amount")?),
        currency,
        description: row.text("description")?,
        status: SessionStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("session status {status}")))?,
        created_at: row.int("created_at")?,
        expires_at: row.int("expires_at")?,
        paid_from,
        owner: row.opt_text("owner")?,
    })
}

pub(super) fn hold_record(row: &impl Columns) -> Result<HoldRecord, StoreError> {
    Ok(HoldRecord {
        id: row.text("id")?,
        wallet: row.text("wallet")?,
        currency: currency_of(row.text("currency")?)?,
        amount: Units(row.int("amount")?),
        status: row.text("status")?,
        captured: row.opt_int("captured")?.map(Units),
        principal: row.text("principal")?,
        tool: row.text("tool")?,
        created_at: row.int("created_at")?,
        expires_at: row.int("expires_at")?,
        settled_at: row.opt_int("settled_at")?,
    })
}

pub(super) fn api_key(row: &impl Columns) -> Result<ApiKey, StoreError> {
    Ok(ApiKey {
        id: row.text("id")?,
        secret_hash: row.text("secret_hash")?,
        principal: row.text("principal")?,
        scopes: parse_scopes(&row.text("scopes")?)?,
        label: row.opt_text("label")?,
        created_at: row.int("created_at")?,
        revoked_at: row.opt_int("revoked_at")?,
    })
}

pub(super) fn open_intents(row: &impl Columns) -> Result<OpenIntents, StoreError> {
    Ok(OpenIntents {
        caller: row.int("n")?,
        anonymous: row.int("anonymous")?,
    })
}

pub(super) fn wallet_balance(row: &impl Columns) -> Result<WalletBalance, StoreError> {
    let balance = row.int("balance")?;
    let held = row.int("held")?;
    Ok(WalletBalance {
        currency: currency_of(row.text("currency")?)?,
        balance: Units(balance),
        held: Units(held),
        available: Units(balance - held),
    })
}

pub(super) fn statement_line(row: &impl Columns) -> Result<StatementLine, StoreError> {
    Ok(StatementLine {
        txn_id: row.text("id")?,
        kind: row.text("kind")?,
        at: row.int("created_at")?,
        amount: row.int("amount")?,
        role: row.opt_text("role")?,
        legs: super::posting::legs_by_role(row.opt_text("legs")?.as_deref()),
        legs_at: row.opt_int("legs_at")?,
        currency: currency_of(row.text("currency")?)?,
        tool: row.opt_text("tool")?,
        payment_id: row.opt_text("payment_id")?,
        beneficiary: row.opt_text("beneficiary")?,
        memo: row.opt_text("memo")?,
        account: match (row.opt_text("account_kind")?, row.opt_text("account_name")?) {
            (Some(kind), Some(name)) => AccountKind::parse(&kind).map(|kind| (kind, name)),
            _ => None,
        },
        payer: row.opt_text("payer")?,
        intent_id: row.opt_text("intent_id")?,
        origin: origin(row)?,
        approval: approval(row)?,
    })
}

/// A ledger line of an export page, with its entry's id.
pub(super) fn entry_line(row: &impl Columns) -> Result<(i64, StatementLine), StoreError> {
    Ok((row.int("entry_id")?, statement_line(row)?))
}

/// `/metrics` figures from the rows of [`super::sql::STATS_OPEN_HOLDS`],
/// [`super::sql::STATS_INTENTS`] and [`super::sql::STATS_REVENUE`].
pub(super) fn stats<R: Columns>(
    open_holds: &R,
    intents: &[R],
    revenue: &[R],
) -> Result<StoreStats, StoreError> {
    Ok(StoreStats {
        open_holds: open_holds.int("n")?,
        stored_results: open_holds.int("stored_results")?,
        intents: intents
            .iter()
            .map(|row| Ok((row.text("status")?, row.int("n")?)))
            .collect::<Result<_, StoreError>>()?,
        revenue: revenue
            .iter()
            .map(|row| Ok((row.text("tool")?, row.text("currency")?, row.int("total")?)))
            .collect::<Result<_, StoreError>>()?,
    })
}

pub(super) fn stored_result(row: &impl Columns) -> Result<StoredResult, StoreError> {
    Ok(StoredResult {
        is_error: row.flag("is_error")?,
        result_json: row.text("result_json")?,
    })
}
