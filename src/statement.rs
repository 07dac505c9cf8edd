//! Account statements for people: a wallet's spending, what a tool author
//! earned, or what one tool earned across accounts, with each split capture
//! broken down (charge, platform share, commissions, net) and who was behind
//! it (agent, approval, the caller's metadata), so that payouts can be
//! reconciled.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet},
    fmt::Write,
};

use crate::{
    money::{Currency, Units, format_in, format_signed_in},
    store::{APPROVALS_LISTED, ApprovalStatus, Intent, StatementLine, rfc3339},
    terms::Role,
};

/// Which lines of an account's statement to show.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub tool: Option<String>,
    /// Unix ms, inclusive.
    pub since: Option<i64>,
    /// Unix ms, exclusive.
    pub until: Option<i64>,
}

impl Filter {
    pub fn keeps(&self, line: &StatementLine) -> bool {
        self.keeps_tool(line) && self.keeps_time(line.at)
    }

    pub fn keeps_tool(&self, line: &StatementLine) -> bool {
        self.tool
            .as_ref()
            .is_none_or(|tool| line.tool.as_ref() == Some(tool))
    }

    pub fn keeps_time(&self, at: i64) -> bool {
        self.since.is_none_or(|since| at >= since) && self.until.is_none_or(|until| at < until)
    }
}

/// Characters that would forge what a statement reads, not show as
/// themselves: control characters (a line break starts a made-up line, an
/// ANSI escape rewrites the terminal), line and paragraph separators, and
/// direction marks, overrides and isolates (text read out of order).
pub fn forges(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
        )
}

/// Text recorded from someone else (a memo, a session's description, a
/// caller's metadata) as a statement shows it: every character that
/// [`forges`] written as an escape (`\n`, `\u{1b}`), so that it reads as
/// what was sent, on its one line.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(forges) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if forges(c) => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Parses `2026-11-21` (the start of that day, UTC) or an RFC 3339 time.
/// `end_of_day` moves a bare date to the start of the next day, so that
/// `--until 2026-11-21` includes the 21st.
pub fn parse_time(text: &str, end_of_day: bool) -> Result<i64, String> {
    if let Ok(date) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        let day = if end_of_day {
            date.succ_opt().unwrap_or(date)
        } else {
            date
        };
        return Ok(day
            .and_hms_opt(0, 0, 0)
            .map_or(0, |t| t.and_utc().timestamp_millis()));
    }
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_millis())
        .map_err(|_| format!("`{text}` is neither a date (2026-11-21) nor an RFC 3339 time"))
}

/// What a split capture charged for the tool: every leg but the payer's
/// fee on top (the outgoing commission).
fn charged(legs: &[(String, Units)]) -> i64 {
    legs.iter()
        .filter(|(role, _)| role != Role::CommissionOut.as_str())
        .map(|(_, amount)| amount.0)
        .sum()
}

/// The charge of a split capture (what the tool's price came to) and its
/// breakdown, as "charge 1.00 = author 0.88 + platform_share 0.10 + …".
fn breakdown(legs: &[(String, Units)], currency: &Currency) -> Option<String> {
    if legs.is_empty() {
        return None;
    }
    let parts: Vec<String> = legs
        .iter()
        .filter(|(role, _)| role != Role::CommissionOut.as_str())
        .map(|(role, amount)| format!("{role} {}", format_in(*amount, currency)))
        .collect();
    let mut text = format!(
        "charge {} = {}",
        format_in(Units(charged(legs)), currency),
        parts.join(" + ")
    );
    if let Some((_, fee)) = legs
        .iter()
        .find(|(role, _)| role == Role::CommissionOut.as_str())
    {
        let _ = write!(text, "; payer fee {}", format_in(*fee, currency));
    }
    Some(text)
}

/// Who was behind a line: agent, approval, metadata and memo, as
/// "agent claude-code/1.2; approved by wallet:alice at …; metadata {…}".
fn details(line: &StatementLine) -> String {
    let mut parts = Vec::new();
    if let Some(agent) = &line.origin.agent {
        parts.push(format!("agent {}", printable(agent)));
    }
    if let Some(approval) = &line.approval {
        parts.push(describe_approval(
            approval.status,
            approval.by.as_deref(),
            approval.at,
        ));
    }
    if let Some(metadata) = &line.origin.metadata {
        parts.push(format!("metadata {}", printable(metadata)));
    }
    if let Some(memo) = &line.memo {
        parts.push(format!("memo: {}", printable(memo)));
    }
    parts.join("; ")
}

/// "approved by wallet:alice at 2026-11-21T10:00:00Z", "auto-approved".
pub(crate) fn describe_approval(
    status: ApprovalStatus,
    by: Option<&str>,
    at: Option<i64>,
) -> String {
    let mut text = match status {
        ApprovalStatus::AutoApproved => return "auto-approved under its threshold".into(),
        ApprovalStatus::Waiting => return "waiting for approval".into(),
        ApprovalStatus::Approved => "approved".to_owned(),
        ApprovalStatus::Declined => "declined".to_owned(),
    };
    if let Some(by) = by {
        let _ = write!(text, " by {}", printable(by));
    }
    if let Some(at) = at {
        let _ = write!(text, " at {}", rfc3339(at));
    }
    text
}

/// The statement as a table, with totals per currency. `title` names
/// whose it is: "wallet:alice", "revenue:author", "tool echo".
pub fn render(title: &str, lines: &[StatementLine], filter: &Filter) -> String {
    let mut out = format!("statement for {title}\n");
    let _ = writeln!(
        out,
        "{:<20}  {:<15}  {:>12}  {:<8}  {:<12}  {:<38}  split; details",
        "time", "kind", "amount", "currency", "tool", "reference"
    );
    // Per currency: (the currency, net, charged, lines).
    let mut totals: BTreeMap<&str, (&Currency, i64, i64, usize)> = BTreeMap::new();
    // An account that takes two legs of one capture (both commissions, say)
    // has a line for each, and a wallet that paid a session has its payment
    // and the settlement's refund of what a metered run did not use: either
    // way, one payment, and its charge counts once.
    let mut counted: BTreeSet<&str> = BTreeSet::new();
    // Each shown line with its time: a settlement's own line is dated when
    // it happened, not where its payment sits, so they are put in time
    // order before they are printed.
    let mut shown: Vec<(i64, String)> = Vec::new();
    for line in lines.iter().filter(|l| filter.keeps_tool(l)) {
        let currency = &line.currency;
        // A split is shown and counted in the period it was posted in. A
        // session a wallet paid is split by its settlement, once the tool
        // ran, which can be days after the payment: a period that ends
        // between the two shows the payment as not yet settled.
        let split_in =
            !line.legs.is_empty() && line.legs_at.is_some_and(|at| filter.keeps_time(at));
        let legs = if split_in { &line.legs[..] } else { &[][..] };
        let (at, kind, amount, legs, settles) = if filter.keeps_time(line.at) {
            // A settlement's give-back to the payer of what a metered run
            // did not use: to the payer, a refund; the charge's split is
            // on the payment's own line.
            match line.kind == "capture" && line.role.as_deref() == Some("refund") {
                true => (line.at, "refund", line.amount, &[][..], None),
                false => (line.at, line.kind.as_str(), line.amount, legs, None),
            }
        } else if split_in {
            // Paid before the period, settled in it: the settlement moved
            // none of the wallet's money (the payment did), but its split
            // charge belongs to this period, on a line of its own.
            let at = line.legs_at.unwrap_or(line.at);
            (at, "settlement", 0, legs, Some(line.at))
        } else {
            continue;
        };
        let notes: Vec<String> = [
            breakdown(legs, currency).unwrap_or_default(),
            settles
                .map(|paid| format!("for the payment of {}", rfc3339(paid)))
                .unwrap_or_default(),
            details(line),
        ]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect();
        shown.push((
            at,
            format!(
                "{:<20}  {:<15}  {:>12}  {:<8}  {:<12}  {:<38}  {}\n",
                rfc3339(at),
                kind,
                format_signed_in(amount, currency),
                currency.as_str(),
                printable(line.tool.as_deref().unwrap_or("-")),
                printable(line.payment_id.as_deref().unwrap_or(&line.txn_id)),
                notes.join("; "),
            ),
        ));
        let total = totals
            .entry(currency.as_str())
            .or_insert((currency, 0, 0, 0));
        total.1 += amount;
        total.3 += 1;
        if !legs.is_empty() && counted.insert(line.payment_id.as_deref().unwrap_or(&line.txn_id)) {
            total.2 += charged(legs);
        }
    }
    // Stable: lines of one moment keep the ledger's order.
    shown.sort_by_key(|(at, _)| *at);
    for (_, row) in shown {
        out.push_str(&row);
    }
    for (currency, net, charged, count) in totals.into_values() {
        let _ = write!(
            out,
            "total: {} {currency} over {count} line(s)",
            format_signed_in(net, currency)
        );
        if charged != 0 {
            let _ = write!(
                out,
                "; the split charges came to {} {currency}",
                format_signed_in(charged, currency)
            );
        }
        out.push('\n');
    }
    out
}

/// The charges a principal was asked to approve: what, how much, and who
/// decided when.
pub fn render_approvals(principal: &str, intents: &[Intent], filter: &Filter) -> String {
    let shown: Vec<&Intent> = intents
        .iter()
        .filter(|i| {
            filter.keeps_time(i.created_at)
                && filter.tool.as_ref().is_none_or(|t| *t == i.tool)
                && i.approval
                    .as_ref()
                    .is_some_and(|a| a.status != ApprovalStatus::AutoApproved)
        })
        .collect();
    let mut out = format!("approvals for {principal}: {}\n", shown.len());
    if intents.len() >= APPROVALS_LISTED {
        let _ = writeln!(
            out,
            "(from the newest {APPROVALS_LISTED} decisions only; older ones are not shown)"
        );
    }
    for intent in shown {
        let Some(approval) = &intent.approval else {
            continue;
        };
        let _ = writeln!(
            out,
            "{:<20}  {:<38}  {:<12}  {:>12} {:<4}  {:<16}  {}{}",
            rfc3339(intent.created_at),
            printable(&intent.id),
            printable(&intent.tool),
            format_in(intent.amount, &intent.currency),
            intent.currency.as_str(),
            intent.status.as_str(),
            describe_approval(approval.status, approval.by.as_deref(), approval.at),
            approval
                .rule
                .as_deref()
                .map(|r| format!(" (rule {})", printable(r)))
                .unwrap_or_default(),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Currency;

    fn line(amount: i64, legs: &[(&str, i64)], at: i64, tool: &str) -> StatementLine {
        StatementLine {
            txn_id: "txn_1".into(),
            kind: "capture".into(),
            at,
            amount,
            role: Some("author".into()),
            legs: legs
                .iter()
                .map(|(role, amount)| (role.to_string(), Units(*amount)))
                .collect(),
            legs_at: Some(at),
            currency: Currency::parse("USD").unwrap(),
            tool: Some(tool.into()),
            payment_id: Some("pay_1".into()),
            beneficiary: Some("alice".into()),
            memo: None,
            account: None,
            payer: Some("bob".into()),
            intent_id: None,
            origin: Default::default(),
            approval: None,
        }
    }

    #[test]
    fn an_author_sees_the_charge_the_shares_and_the_net() {
        let legs = [
            ("author", 880_000),
            ("platform_share", 100_000),
            ("commission_in", 20_000),
            ("commission_out", 10_000),
        ];
        let lines = [
            line(880_000, &legs, 1_000, "echo"),
            StatementLine {
                txn_id: "txn_2".into(),
                payment_id: Some("pay_2".into()),
                ..line(10_000, &[("author", 10_000)], 2_000, "divide")
            },
        ];
        let text = render("revenue:alice", &lines, &Filter::default());
        assert!(
            text.contains(
                "charge 1.00 = author 0.88 + platform_share 0.10 + commission_in 0.02; payer fee 0.01"
            ),
            "{text}"
        );
        assert!(
            text.contains("total: 0.89 USD over 2 line(s); the split charges came to 1.01 USD"),
            "{text}"
        );
        let only_echo = Filter {
            tool: Some("echo".into()),
            ..Filter::default()
        };
        let text = render("revenue:alice", &lines, &only_echo);
        assert!(text.contains("total: 0.88 USD over 1 line(s)"), "{text}");
        let before = Filter {
            until: Some(1_500),
            ..Filter::default()
        };
        assert!(render("revenue:alice", &lines, &before).contains("over 1 line(s)"));
    }

    #[test]
    fn an_account_with_two_legs_of_one_capture_counts_its_charge_once() {
        let legs = [
            ("author", 970_000),
            ("commission_in", 30_000),
            ("commission_out", 50_000),
        ];
        let lines = [
            StatementLine {
                role: Some("commission_in".into()),
                ..line(30_000, &legs, 1_000, "echo")
            },
            StatementLine {
                role: Some("commission_out".into()),
                ..line(50_000, &legs, 1_000, "echo")
            },
        ];
        let text = render("revenue:commissions", &lines, &Filter::default());
        assert!(
            text.contains("total: 0.08 USD over 2 line(s); the split charges came to 1.00 USD"),
            "{text}"
        );
    }

    /// A wallet that paid a session for a metered tool has two lines of
    /// one payment: the payment, and the settlement's refund of what the
    /// run did not use. Both show the split; the charge counts once.
    #[test]
    fn a_session_paid_and_partly_refunded_counts_its_charge_once() {
        let legs = [("author", 15_000)];
        let lines = [
            StatementLine {
                kind: "session_payment".into(),
                role: None,
                // The split is the settlement's, posted when the tool ran.
                legs_at: Some(2_000),
                ..line(-100_000, &legs, 1_000, "search")
            },
            StatementLine {
                txn_id: "txn_2".into(),
                role: Some("refund".into()),
                ..line(85_000, &legs, 2_000, "search")
            },
        ];
        let text = render("wallet:bob", &lines, &Filter::default());
        assert!(
            text.contains("total: -0.015 USD over 2 line(s); the split charges came to 0.015 USD"),
            "{text}"
        );
        // The give-back reads as a refund, and the split is shown once, on
        // the payment's line.
        let given_back = text
            .lines()
            .find(|l| l.contains("0.085"))
            .unwrap_or_default();
        assert!(given_back.contains(" refund "), "{given_back}");
        assert_eq!(
            text.matches("charge 0.015 = author 0.015").count(),
            1,
            "{text}"
        );

        // A period that ends between payment and settlement has the
        // payment unsettled; one that starts between them has the split on
        // a settlement line of its own, which moved none of the wallet's
        // money.
        let paid = Filter {
            until: Some(1_500),
            ..Filter::default()
        };
        let text = render("wallet:bob", &lines, &paid);
        assert!(!text.contains("charge"), "{text}");
        assert!(
            text.ends_with("total: -0.10 USD over 1 line(s)\n"),
            "{text}"
        );
        let settled = Filter {
            since: Some(1_500),
            ..Filter::default()
        };
        let text = render("wallet:bob", &lines, &settled);
        let settlement = text
            .lines()
            .find(|l| l.contains(" settlement "))
            .unwrap_or_default();
        assert!(settlement.contains("charge 0.015 = author 0.015"), "{text}");
        assert!(
            text.ends_with(
                "total: 0.085 USD over 2 line(s); the split charges came to 0.015 USD\n"
            ),
            "{text}"
        );

        // Shown in time order: a top-up between the two comes before the
        // settlement line, though the payment it sits on came first.
        let mut with_top_up = lines.to_vec();
        with_top_up.push(StatementLine {
            txn_id: "txn_3".into(),
            kind: "topup".into(),
            role: None,
            payment_id: None,
            ..line(50_000, &[], 1_800, "-")
        });
        let text = render("wallet:bob", &with_top_up, &settled);
        let at = |kind: &str| text.find(kind).unwrap_or_else(|| panic!("{kind}: {text}"));
        assert!(at(" topup ") < at(" settlement "), "{text}");
    }

    /// A memo recorded with a line break, an ANSI escape or a direction
    /// override (a session's description stored before the sessions API
    /// refused them) prints escaped, on its own line: it cannot forge
    /// another line or rewrite the terminal.
    #[test]
    fn a_memo_that_would_forge_lines_prints_escaped_on_its_one_line() {
        let forged = "Pro feature\n1970-01-01T00:00:05Z  topup  1000.00  USD\u{1b}[2K\u{202e}";
        let lines = [StatementLine {
            kind: "session_payment".into(),
            role: None,
            memo: Some(forged.into()),
            origin: crate::store::Origin {
                agent: Some("bot\r".into()),
                metadata: Some("{\"k\":\"a\u{2028}b\"}".into()),
            },
            ..line(-100_000, &[], 1_000, "echo")
        }];
        let text = render("wallet:bob", &lines, &Filter::default());
        assert_eq!(
            text.lines().count(),
            4,
            "title, columns, the line, the total: {text}"
        );
        assert!(!text.lines().any(|l| l.chars().any(forges)), "{text:?}");
        assert!(
            text.contains(
                "memo: Pro feature\\n1970-01-01T00:00:05Z  topup  1000.00  USD\\u{1b}[2K\\u{202e}"
            ),
            "{text}"
        );
        assert!(text.contains("agent bot\\r;"), "{text}");
        assert!(text.contains("metadata {\"k\":\"a\\u{2028}b\"}"), "{text}");
        // Plain text, accents and emoji included, is left as it is.
        assert_eq!(printable("Café ☕ 👩‍💻"), "Café ☕ 👩‍💻");
    }

    #[test]
    fn dates_and_times() {
        assert_eq!(parse_time("1970-01-02", false), Ok(86_400_000));
        assert_eq!(parse_time("1970-01-01", true), Ok(86_400_000));
        assert_eq!(parse_time("1970-01-01T00:00:01Z", false), Ok(1_000));
        assert!(parse_time("yesterday", false).is_err());
    }
}
