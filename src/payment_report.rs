//! `tollgate payment show ID`: what became of one payment, for a person
//! asking "was I charged for that call, and why (not)?". Put together from
//! what the store keeps of it: the call's hold (fast path) or intent (slow
//! path), its payment session, its stored result, and every ledger line
//! that names it. A released hold or an intent ended unpaid has no ledger
//! line, so a statement never shows it; this does.

use std::fmt::Write;

use serde_json::Value;

use crate::{
    money::{format_in, format_signed_in},
    statement::{describe_approval, printable},
    store::{HoldRecord, Intent, IntentStatus, LocalSession, StatementLine, StoredResult, rfc3339},
};

/// What the store keeps of one payment.
pub struct PaymentRecord<'a> {
    pub id: &'a str,
    pub hold: Option<&'a HoldRecord>,
    pub intent: Option<&'a Intent>,
    pub session: Option<&'a LocalSession>,
    pub result: Option<&'a StoredResult>,
    pub lines: &'a [StatementLine],
}

impl PaymentRecord<'_> {
    /// Whether the store knows the id at all.
    pub fn is_known(&self) -> bool {
        self.hold.is_some()
            || self.intent.is_some()
            || self.session.is_some()
            || !self.lines.is_empty()
    }

    pub fn render(&self) -> String {
        let mut out = format!("payment {}\n", printable(self.id));
        if let Some(hold) = self.hold {
            describe_hold(&mut out, hold);
        }
        if let Some(intent) = self.intent {
            describe_intent(&mut out, intent);
        }
        if let Some(session) = self.session {
            let _ = write!(
                out,
                "session: {} {} {}, {}",
                session.status.as_str(),
                format_in(session.amount, &session.currency),
                session.currency,
                printable(&session.description)
            );
            if let Some(from) = &session.paid_from {
                let _ = write!(
                    out,
                    ", paid from {}:{}",
                    from.kind.as_str(),
                    printable(&from.name)
                );
            }
            out.push('\n');
        }
        if self.intent.is_some() {
            out.push_str(&describe_result(self.result));
        }
        if self.lines.is_empty() {
            out.push_str("ledger: no line: no money moved\n");
        } else {
            out.push_str("ledger:\n");
            for line in self.lines {
                let account = line
                    .account
                    .as_ref()
                    .map(|(kind, name)| format!("{}:{}", kind.as_str(), printable(name)))
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "  {:<20}  {:<15}  {:<28}  {:>12} {:<4}  {}",
                    rfc3339(line.at),
                    line.kind,
                    account,
                    format_signed_in(line.amount, &line.currency),
                    line.currency.as_str(),
                    line.memo.as_deref().map(printable).unwrap_or_default(),
                );
            }
        }
        out
    }
}

fn describe_hold(out: &mut String, hold: &HoldRecord) {
    let amount = |units| format!("{} {}", format_in(units, &hold.currency), hold.currency);
    let _ = writeln!(
        out,
        "call: tool `{}` for principal {}, fast path: {} held from wallet {} at {}",
        printable(&hold.tool),
        printable(&hold.principal),
        amount(hold.amount),
        printable(&hold.wallet),
        rfc3339(hold.created_at)
    );
    let settled = hold.settled_at.map(rfc3339).unwrap_or_default();
    let status = match hold.status.as_str() {
        "captured" => format!(
            "charged {} at {settled}: the tool ran, the rest went back",
            amount(hold.captured.unwrap_or_default())
        ),
        "released" => format!(
            "released at {settled}: nothing charged (the tool failed, or its answer could not \
             be delivered or recorded)"
        ),
        "expired" => format!(
            "expired at {settled}: nothing charged (its call never finished; the hold was given \
             back)"
        ),
        _ => format!(
            "open until {}: its call is under way",
            rfc3339(hold.expires_at)
        ),
    };
    let _ = writeln!(out, "status: {status}");
}

fn describe_intent(out: &mut String, intent: &Intent) {
    let _ = writeln!(
        out,
        "call: tool `{}` for {}, slow path ({}): {} {}, opened {}, payable until {}",
        printable(&intent.tool),
        intent.principal.as_deref().map_or_else(
            || "an anonymous caller".to_owned(),
            |p| format!("principal {}", printable(p))
        ),
        intent.mode,
        format_in(intent.amount, &intent.currency),
        intent.currency,
        rfc3339(intent.created_at),
        rfc3339(intent.expires_at)
    );
    let meaning = match intent.status {
        IntentStatus::AwaitingPayment => "waiting for its payment",
        IntentStatus::Paid => "paid, its tool not yet run",
        IntentStatus::Running => "paid, its tool running",
        IntentStatus::Succeeded => "paid, and its tool ran: charged",
        IntentStatus::Failed => "paid, but its tool failed or never ran: refunded",
        IntentStatus::Expired => "not paid in time: nothing charged",
        IntentStatus::Cancelled => "cancelled: nothing charged",
        IntentStatus::Declined => "declined: nothing charged",
    };
    let _ = writeln!(out, "status: {} ({meaning})", intent.status.as_str());
    let _ = write!(out, "provider: {}", printable(&intent.provider));
    if let Some(session) = &intent.provider_session_id {
        let _ = write!(out, ", session {}", printable(session));
    }
    out.push('\n');
    if let Some(approval) = &intent.approval {
        let described = describe_approval(approval.status, approval.by.as_deref(), approval.at);
        let _ = writeln!(out, "approval: {described}");
    }
}

/// A slow-path call's stored result: whether there is one, and its error
/// code when it is an error.
fn describe_result(result: Option<&StoredResult>) -> String {
    match result {
        None => "result: none kept (never run, or pruned after `keep_results`)\n".into(),
        Some(result) if !result.is_error => "result: kept, a success\n".into(),
        Some(result) => {
            let code = serde_json::from_str::<Value>(&result.result_json)
                .ok()
                .and_then(|r| r["structuredContent"]["error"].as_str().map(str::to_owned));
            match code {
                Some(code) => format!("result: kept, an error (`{}`)\n", printable(&code)),
                None => "result: kept, an error\n".into(),
            }
        }
    }
}
