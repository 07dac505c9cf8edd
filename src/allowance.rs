//! Spending limits of a principal's wallet (one per currency): a per-call
//! maximum, daily and monthly caps, and an optional allow-list of tools.
//!
//! The store enforces them in the statement that reserves the money (the
//! fast path's hold, a wallet paying a session), against counters kept on
//! the wallet's own row, so concurrent calls cannot slip past a cap. A
//! counter holds what was committed in its period (UTC day, UTC month):
//! open holds at their full amount, captures at what they charged, and
//! session payments. A released or expired hold gives its amount back, a
//! capture gives back what it did not charge; refunds do not restore the
//! allowance. This module holds the same rules for people: which limit a
//! refused call broke, and when it resets.

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use serde_json::{Value, json};

use crate::{
    money::{Currency, Units, format_in},
    store::rfc3339,
};

const DAY_MS: i64 = 86_400_000;

/// What a wallet may spend. `None` is no limit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    pub per_call: Option<Units>,
    pub daily: Option<Units>,
    pub monthly: Option<Units>,
    /// The only tools the wallet pays for.
    pub tools: Option<Vec<String>>,
}

/// What a wallet has committed in its current periods, as the store counts
/// it: a counter whose period start is before the current period's counts
/// as nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spent {
    pub day_start: i64,
    pub day: Units,
    pub month_start: i64,
    pub month: Units,
}

impl Spent {
    /// Spent in the day and the month that contain `now`.
    pub fn at(&self, now: i64) -> (Units, Units) {
        let day = if self.day_start >= day_start(now) {
            self.day
        } else {
            Units(0)
        };
        let month = if self.month_start >= month_start(now) {
            self.month
        } else {
            Units(0)
        };
        (day, month)
    }
}

/// Which limit a call broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    PerCall,
    Daily,
    Monthly,
    AllowList,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::PerCall => "per_call",
            Limit::Daily => "daily",
            Limit::Monthly => "monthly",
            Limit::AllowList => "allow_list",
        }
    }
}

/// A call refused by a limit: which one, and when it resets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Breach {
    pub wallet: String,
    pub currency: Currency,
    pub limit: Limit,
    /// The cap (none for the allow-list).
    pub cap: Option<Units>,
    /// Already committed in the period (daily, monthly).
    pub spent: Units,
    pub needed: Units,
    pub tool: Option<String>,
    /// Unix ms; none for limits that do not reset.
    pub resets_at: Option<i64>,
}

impl Breach {
    /// The error's details for the client.
    pub fn details(&self) -> Value {
        let amount = |units| format_in(units, &self.currency);
        json!({
            "limit": self.limit.as_str(),
            "wallet": self.wallet,
            "currency": self.currency.as_str(),
            "cap": self.cap.map(amount),
            "spent": amount(self.spent),
            "needed": amount(self.needed),
            "tool": self.tool,
            "resets_at": self.resets_at.map(rfc3339),
        })
    }
}

impl std::fmt::Display for Breach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (wallet, currency) = (&self.wallet, &self.currency);
        let amount = |units| format_in(units, currency);
        let cap = self.cap.map(amount).unwrap_or_default();
        let needed = amount(self.needed);
        match self.limit {
            Limit::AllowList => match &self.tool {
                Some(tool) => write!(
                    f,
                    "wallet `{wallet}` may not pay for tool `{tool}`: it is not on the wallet's allow-list"
                ),
                None => write!(
                    f,
                    "wallet `{wallet}` pays only for the tools on its allow-list, and this payment is for no tool"
                ),
            },
            Limit::PerCall => write!(
                f,
                "this call costs {needed} {currency}, above wallet `{wallet}`'s per-call limit of {cap} {currency}"
            ),
            Limit::Daily | Limit::Monthly => {
                let period = if self.limit == Limit::Daily {
                    "daily"
                } else {
                    "monthly"
                };
                write!(
                    f,
                    "wallet `{wallet}`'s {period} limit of {cap} {currency} would be passed: {} spent, this call needs {needed}; it resets at {}",
                    amount(self.spent),
                    self.resets_at.map(rfc3339).unwrap_or_default()
                )
            }
        }
    }
}

impl Limits {
    pub fn is_empty(&self) -> bool {
        *self == Limits::default()
    }

    /// The limit a charge of `amount` for `tool` would break at `now`, if
    /// any; the same conditions the store's statements check. `tool` is
    /// `None` for a payment that is for no tool (a session made through the
    /// sessions API): a wallet with an allow-list pays only for the tools
    /// on it, so not for that.
    pub fn breach(
        &self,
        wallet: &str,
        currency: &Currency,
        spent: &Spent,
        tool: Option<&str>,
        amount: Units,
        now: i64,
    ) -> Option<Breach> {
        let (day, month) = spent.at(now);
        let breach = |limit, cap, spent, resets_at| Breach {
            wallet: wallet.to_owned(),
            currency: currency.clone(),
            limit,
            cap,
            spent,
            needed: amount,
            tool: tool.map(str::to_owned),
            resets_at,
        };
        if let Some(allowed) = &self.tools
            && !tool.is_some_and(|tool| allowed.iter().any(|t| t == tool))
        {
            return Some(breach(Limit::AllowList, None, Units(0), None));
        }
        if let Some(cap) = self.per_call
            && amount > cap
        {
            return Some(breach(Limit::PerCall, Some(cap), Units(0), None));
        }
        if let Some(cap) = self.daily
            && day.0.saturating_add(amount.0) > cap.0
        {
            let resets = day_start(now) + DAY_MS;
            return Some(breach(Limit::Daily, Some(cap), day, Some(resets)));
        }
        if let Some(cap) = self.monthly
            && month.0.saturating_add(amount.0) > cap.0
        {
            let resets = next_month_start(now);
            return Some(breach(Limit::Monthly, Some(cap), month, Some(resets)));
        }
        None
    }

    /// The allow-list as the store keeps it: a JSON array.
    pub fn tools_json(&self) -> Option<String> {
        self.tools.as_ref().map(|tools| json!(tools).to_string())
    }

    pub fn parse_tools_json(text: Option<&str>) -> Option<Vec<String>> {
        text.and_then(|t| serde_json::from_str(t).ok())
    }
}

/// Parses a cap as given on the command line: an amount, or `none`.
pub fn parse_cap(text: &str) -> Result<Option<Units>, String> {
    if text.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    Units::parse(text)
        .map(Some)
        .map_err(|e| format!("`{text}`: {e} (or `none` for no limit)"))
}

/// A wallet's limits for people, with what it spent in the current
/// periods and when they reset.
pub fn describe(wallet: &str, w: &crate::store::WalletLimits, now: i64) -> String {
    let (day, month) = w.spent.at(now);
    let amount = |units| format_in(units, &w.currency);
    let cap = |c: Option<Units>| c.map_or("none".to_owned(), amount);
    let tools = w
        .limits
        .tools
        .as_ref()
        .map_or("any".to_owned(), |t| t.join(", "));
    format!(
        "limits of wallet {wallet} ({}):\n  per call: {}\n  daily:    {} ({} spent today; resets at {})\n  monthly:  {} ({} spent this month; resets at {})\n  tools:    {tools}\n",
        w.currency,
        cap(w.limits.per_call),
        cap(w.limits.daily),
        amount(day),
        rfc3339(day_start(now) + DAY_MS),
        cap(w.limits.monthly),
        amount(month),
        rfc3339(next_month_start(now)),
    )
}

/// Start (Unix ms) of the UTC day containing `ms`.
pub fn day_start(ms: i64) -> i64 {
    ms - ms.rem_euclid(DAY_MS)
}

fn utc(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

fn first_of(year: i32, month: u32) -> i64 {
    NaiveDate::from_ymd_opt(year, month, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map_or(0, |t| Utc.from_utc_datetime(&t).timestamp_millis())
}

/// Start (Unix ms) of the UTC month containing `ms`.
pub fn month_start(ms: i64) -> i64 {
    let t = utc(ms);
    first_of(t.year(), t.month())
}

fn next_month_start(ms: i64) -> i64 {
    let t = utc(ms);
    match t.month() {
        12 => first_of(t.year() + 1, 1),
        m => first_of(t.year(), m + 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usd() -> Currency {
        Currency::parse("USD").unwrap()
    }

    // 2026-11-21T15:00:00Z
    const NOW: i64 = 1_795_273_200_000;

    #[test]
    fn periods_are_utc_days_and_months() {
        assert_eq!(rfc3339(day_start(NOW)), "2026-11-21T00:00:00Z");
        assert_eq!(rfc3339(month_start(NOW)), "2026-11-01T00:00:00Z");
        assert_eq!(rfc3339(next_month_start(NOW)), "2026-12-01T00:00:00Z");
        let december = NOW + 20 * DAY_MS;
        assert_eq!(rfc3339(next_month_start(december)), "2027-01-01T00:00:00Z");
    }

    #[test]
    fn each_limit_is_named_with_its_reset() {
        let limits = Limits {
            per_call: Some(Units(500_000)),
            daily: Some(Units(1_000_000)),
            monthly: Some(Units(3_000_000)),
            tools: Some(vec!["echo".into()]),
        };
        let spent = Spent {
            day_start: day_start(NOW),
            day: Units(900_000),
            month_start: month_start(NOW),
            month: Units(2_950_000),
        };
        let check = |tool, amount| limits.breach("alice", &usd(), &spent, tool, Units(amount), NOW);
        assert_eq!(check(Some("divide"), 1).unwrap().limit, Limit::AllowList);
        assert_eq!(check(Some("echo"), 600_000).unwrap().limit, Limit::PerCall);
        let daily = check(Some("echo"), 200_000).unwrap();
        assert_eq!(daily.limit, Limit::Daily);
        assert_eq!(rfc3339(daily.resets_at.unwrap()), "2026-11-22T00:00:00Z");
        assert!(daily.to_string().contains("0.90 spent"), "{daily}");
        assert!(check(Some("echo"), 50_000).is_none());
        assert_eq!(check(Some("echo"), 60_000).unwrap().limit, Limit::Monthly);
        // A payment for no tool (a sessions-API session) is not on the list.
        let untooled = check(None, 1).unwrap();
        assert_eq!(untooled.limit, Limit::AllowList);
        assert!(
            untooled.to_string().contains("this payment is for no tool"),
            "{untooled}"
        );
        let anything = Limits {
            tools: None,
            ..limits.clone()
        };
        assert!(
            anything
                .breach("alice", &usd(), &spent, None, Units(1), NOW)
                .is_none()
        );
        // Yesterday's counter is today's zero.
        let stale = Spent {
            day_start: day_start(NOW) - DAY_MS,
            ..spent
        };
        assert!(
            limits
                .breach("alice", &usd(), &stale, Some("echo"), Units(50_000), NOW)
                .is_none()
        );
    }
}
