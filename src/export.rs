//! `tollgate ledger export`: every ledger entry with its transaction's
//! audit data, as CSV or JSON lines, for tool authors and operators to
//! reconcile payouts in their own tools. Amounts are exact decimal strings,
//! signed (positive is money into the account).

use std::{borrow::Cow, io::Write};

use serde::Serialize;
use serde_json::Value;

use crate::{
    money::format_signed_in,
    statement::Filter,
    store::{AccountKind, StatementLine, Store, StoreError, rfc3339},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Csv,
    Jsonl,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("writing the export: {0}")]
    Io(#[from] std::io::Error),
    #[error("writing the export: {0}")]
    Csv(#[from] csv::Error),
    #[error("writing the export: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An account nothing is posted to (a misspelt name, most likely); a
    /// statement of one says the same.
    #[error("{0} has no entries: no such account, or nothing posted to it yet")]
    UnknownAccount(String),
}

/// Which entries to export.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Only this account's entries.
    pub account: Option<(AccountKind, String)>,
    /// Tool and time range.
    pub filter: Filter,
    /// Only entries recorded after this one (`entry_id`; 0: from the
    /// start). Entries are numbered in the order they were recorded, so a
    /// reconciler that goes on from the last one it read misses nothing,
    /// not even a capture recorded late (retried after an outage), which
    /// is dated when its call ran.
    pub after: i64,
}

impl Selection {
    fn keeps(&self, line: &StatementLine) -> bool {
        self.filter.keeps(line)
            && self.account.as_ref().is_none_or(|(kind, name)| {
                line.account
                    .as_ref()
                    .is_some_and(|(k, n)| k == kind && n == name)
            })
    }
}

/// One exported row.
#[derive(Debug, Serialize)]
struct Row<'a> {
    txn_id: &'a str,
    time: String,
    kind: &'a str,
    account_kind: Option<&'static str>,
    account: Option<Cow<'a, str>>,
    currency: &'a str,
    amount: String,
    role: Option<&'a str>,
    tool: Option<Cow<'a, str>>,
    payment_id: Option<&'a str>,
    intent_id: Option<&'a str>,
    payer: Option<Cow<'a, str>>,
    beneficiary: Option<Cow<'a, str>>,
    agent: Option<Cow<'a, str>>,
    approval: Option<&'static str>,
    approved_by: Option<Cow<'a, str>>,
    approved_at: Option<String>,
    memo: Option<Cow<'a, str>>,
    /// JSON text; JSON lines carry it as an object.
    metadata: Option<&'a str>,
    /// The entry's number, in the order entries were recorded (last, so
    /// that the columns before it keep their places).
    entry_id: i64,
}

/// A text a caller (or an operator) chose, as a CSV cell: one that a
/// spreadsheet would take for a formula (`=`, `+`, `-`, `@`, a tab or a
/// carriage return first) is written after a `'`, so opening an export
/// runs nothing. JSON lines carry the text as it is.
fn cell(text: Option<&str>, csv: bool) -> Option<Cow<'_, str>> {
    text.map(|text| {
        if csv && text.starts_with(['=', '+', '-', '@', '\t', '\r']) {
            Cow::Owned(format!("'{text}"))
        } else {
            Cow::Borrowed(text)
        }
    })
}

impl<'a> Row<'a> {
    fn of(entry_id: i64, line: &'a StatementLine, csv: bool) -> Self {
        let approval = line.approval.as_ref();
        Self {
            entry_id,
            txn_id: &line.txn_id,
            time: rfc3339(line.at),
            kind: &line.kind,
            account_kind: line.account.as_ref().map(|(k, _)| k.as_str()),
            account: cell(line.account.as_ref().map(|(_, n)| n.as_str()), csv),
            currency: line.currency.as_str(),
            amount: format_signed_in(line.amount, &line.currency),
            role: line.role.as_deref(),
            tool: cell(line.tool.as_deref(), csv),
            payment_id: line.payment_id.as_deref(),
            intent_id: line.intent_id.as_deref(),
            payer: cell(line.payer.as_deref(), csv),
            beneficiary: cell(line.beneficiary.as_deref(), csv),
            agent: cell(line.origin.agent.as_deref(), csv),
            approval: approval.map(|a| a.status.as_str()),
            approved_by: cell(approval.and_then(|a| a.by.as_deref()), csv),
            approved_at: approval.and_then(|a| a.at).map(rfc3339),
            memo: cell(line.memo.as_deref(), csv),
            metadata: line.origin.metadata.as_deref(),
        }
    }
}

/// How many entries an export reads from the store at a time.
pub const PAGE: i64 = 1000;

/// Writes the selected entries of `store`'s ledger, reading it `page`
/// entries at a time; returns how many it wrote. An export of an account
/// with no entries at all (a misspelt name, most likely) is refused, where
/// one with nothing in the period is empty.
pub async fn export(
    store: &dyn Store,
    selection: &Selection,
    format: Format,
    out: impl Write,
    page: i64,
) -> Result<usize, ExportError> {
    let account = selection
        .account
        .as_ref()
        .map(|(kind, name)| (*kind, name.as_str()));
    let mut writer = Writer::new(format, out);
    let mut after = selection.after;
    // Fixed first: pages read after it then miss no entry committed late.
    let upto = store.entries_settled_upto().await?;
    let mut count = 0;
    loop {
        let lines = store.entries_page(account, after, upto, page).await?;
        let Some((last, _)) = lines.last() else {
            if let (Some((kind, name)), 0) = (account, after) {
                return Err(ExportError::UnknownAccount(format!(
                    "{}:{name}",
                    kind.as_str()
                )));
            }
            break;
        };
        after = *last;
        for (entry_id, line) in lines.iter().filter(|(_, l)| selection.keeps(l)) {
            writer.write(*entry_id, line)?;
            count += 1;
        }
        if (lines.len() as i64) < page {
            break;
        }
    }
    writer.finish()?;
    Ok(count)
}

/// Rows out, one at a time, in either format (a CSV header before the
/// first).
enum Writer<W: Write> {
    Csv(Box<csv::Writer<W>>),
    Jsonl(W),
}

impl<W: Write> Writer<W> {
    fn new(format: Format, out: W) -> Self {
        match format {
            Format::Csv => Writer::Csv(Box::new(csv::Writer::from_writer(out))),
            Format::Jsonl => Writer::Jsonl(out),
        }
    }

    fn write(&mut self, entry_id: i64, line: &StatementLine) -> Result<(), ExportError> {
        match self {
            Writer::Csv(csv) => csv.serialize(Row::of(entry_id, line, true))?,
            Writer::Jsonl(out) => {
                let mut row = serde_json::to_value(Row::of(entry_id, line, false))?;
                row["metadata"] = line.origin.metadata_value().unwrap_or(Value::Null);
                serde_json::to_writer(&mut *out, &row)?;
                out.write_all(b"\n")?;
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<(), ExportError> {
        match self {
            Writer::Csv(mut csv) => csv.flush()?,
            Writer::Jsonl(mut out) => out.flush()?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{money::Currency, store::Origin};

    /// Writes the selected ones of `lines` (entries 1, 2, …); returns how many.
    fn write(
        lines: &[StatementLine],
        selection: &Selection,
        format: Format,
        out: impl Write,
    ) -> Result<usize, ExportError> {
        let mut writer = Writer::new(format, out);
        let mut count = 0;
        for (i, line) in lines.iter().enumerate().filter(|(_, l)| selection.keeps(l)) {
            writer.write(i as i64 + 1, line)?;
            count += 1;
        }
        writer.finish()?;
        Ok(count)
    }

    fn line(account: &str, amount: i64, metadata: Option<&str>) -> StatementLine {
        StatementLine {
            txn_id: "txn_1".into(),
            kind: "capture".into(),
            at: 0,
            amount,
            role: Some("author".into()),
            legs: Vec::new(),
            legs_at: None,
            currency: Currency::parse("USD").unwrap(),
            tool: Some("echo".into()),
            payment_id: Some("pay_1".into()),
            beneficiary: Some("alice".into()),
            memo: Some("a, \"quoted\" memo".into()),
            account: Some((AccountKind::Revenue, account.into())),
            payer: Some("bob".into()),
            intent_id: None,
            origin: Origin {
                agent: Some("claude-code/1.0".into()),
                metadata: metadata.map(Into::into),
            },
            approval: None,
        }
    }

    #[test]
    fn csv_has_a_header_and_quotes_what_needs_it() {
        let lines = [
            line("alice", 880_000, Some(r#"{"order":"42"}"#)),
            line("platform", 100_000, None),
        ];
        let only_alice = Selection {
            account: Some((AccountKind::Revenue, "alice".into())),
            ..Selection::default()
        };
        let mut out = Vec::new();
        assert_eq!(
            write(&lines, &only_alice, Format::Csv, &mut out).unwrap(),
            1
        );
        let text = String::from_utf8(out).unwrap();
        let mut rows = text.lines();
        assert!(
            rows.next()
                .unwrap()
                .starts_with("txn_id,time,kind,account_kind,account,currency,amount,role,")
                && text
                    .lines()
                    .next()
                    .unwrap()
                    .ends_with(",memo,metadata,entry_id")
        );
        let row = rows.next().unwrap();
        assert!(
            row.contains(",revenue,alice,USD,0.88,author,echo,pay_1,"),
            "{row}"
        );
        assert!(row.contains(r#""a, ""quoted"" memo""#), "{row}");
        assert!(row.ends_with(r#""{""order"":""42""}",1"#), "{row}");
        assert_eq!(rows.next(), None);
    }

    #[test]
    fn jsonl_is_one_object_per_entry_with_metadata_as_json() {
        let lines = [
            line("alice", 880_000, Some(r#"{"order":"42"}"#)),
            line("platform", -100_000, None),
        ];
        let mut out = Vec::new();
        assert_eq!(
            write(&lines, &Selection::default(), Format::Jsonl, &mut out).unwrap(),
            2
        );
        let rows: Vec<Value> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(rows[0]["metadata"]["order"], "42");
        assert_eq!(rows[0]["agent"], "claude-code/1.0");
        assert_eq!(rows[1]["amount"], "-0.10");
        assert_eq!(rows[1]["metadata"], Value::Null);
    }

    /// A caller's text that a spreadsheet would run as a formula is written
    /// as text in CSV (after a `'`), and as it is in JSON lines; amounts,
    /// negative ones too, stay numbers.
    #[test]
    fn csv_cells_that_look_like_formulas_are_written_as_text() {
        let mut hostile = line("platform", -100_000, None);
        hostile.origin.agent = Some("=HYPERLINK(\"http://x\")".into());
        hostile.memo = Some("@SUM(A1)".into());
        let mut out = Vec::new();
        write(
            &[hostile.clone()],
            &Selection::default(),
            Format::Csv,
            &mut out,
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        let row = text.lines().nth(1).unwrap();
        assert!(row.contains(",-0.10,"), "{row}");
        assert!(row.contains(r#""'=HYPERLINK(""http://x"")""#), "{row}");
        assert!(row.contains(",'@SUM(A1),"), "{row}");
        let mut out = Vec::new();
        write(&[hostile], &Selection::default(), Format::Jsonl, &mut out).unwrap();
        let row: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(row["agent"], "=HYPERLINK(\"http://x\")");
        assert_eq!(row["memo"], "@SUM(A1)");
    }
}
