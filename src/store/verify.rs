//! `ledger verify`: the checks, as portable SQL both backends run in one
//! snapshot, and the report built from what they return.

use super::{StoreError, VerifyReport, rows::Columns};
use crate::money::{Currency, format_signed_in, format_without_currency};

pub(super) const COUNTS: &str = "SELECT (SELECT COUNT(*) FROM ledger_transactions) AS transactions,
            (SELECT COUNT(*) FROM accounts) AS accounts,
            (SELECT COUNT(*) FROM holds WHERE status = 'open') AS open_holds";

/// Transactions whose entries do not sum to zero, or that have fewer than two.
pub(super) const UNBALANCED: &str = "SELECT t.id, t.currency, CAST(COALESCE(e.total, 0) AS BIGINT) AS total, COALESCE(e.n, 0) AS n
     FROM ledger_transactions t
     LEFT JOIN (SELECT txn_id, SUM(amount) AS total, COUNT(*) AS n FROM ledger_entries GROUP BY txn_id) e
       ON e.txn_id = t.id
     WHERE COALESCE(e.total, 0) <> 0 OR COALESCE(e.n, 0) < 2";

pub(super) const ORPHAN_ENTRIES: &str = "SELECT e.id, e.txn_id FROM ledger_entries e
     LEFT JOIN ledger_transactions t ON t.id = e.txn_id
     LEFT JOIN accounts a ON a.id = e.account_id
     WHERE t.id IS NULL OR a.id IS NULL OR a.currency <> t.currency";

/// Every account with its stored balance and hold (only wallets store a
/// balance), and what its entries and open holds say they should be.
pub(super) const ACCOUNTS: &str = "SELECT a.kind, a.name, a.currency, a.balance, a.held,
            (SELECT CAST(COALESCE(SUM(e.amount), 0) AS BIGINT) FROM ledger_entries e WHERE e.account_id = a.id) AS posted,
            (SELECT CAST(COALESCE(SUM(h.amount), 0) AS BIGINT) FROM holds h WHERE h.account_id = a.id AND h.status = 'open') AS open_held
     FROM accounts a ORDER BY a.id";

/// How long past its expiry an open hold is still no break: the expiry
/// sweep runs every 30 s at most (`app::Upkeep`), and a pass can be slow.
/// Without it, a healthy running service would fail `ledger verify`.
pub(super) const SWEEP_GRACE_MS: i64 = 120_000;

/// Holds still open past their expiry and its grace (`$1`: now, less the
/// grace).
pub(super) const STALE_HOLDS: &str =
    "SELECT id FROM holds WHERE status = 'open' AND expires_at < $1 ORDER BY id";

pub(super) const OVER_CAPTURED: &str = "SELECT id FROM holds WHERE captured > amount";

/// Captured holds whose ledger transaction is not their own capture (every
/// capture trigger writes one, kind `capture`, naming the hold as its
/// payment), or has no entry taking what they captured from the hold's
/// wallet: the money the hold says moved did not. (`+e.account_id` keeps
/// SQLite off the entries-by-account index, which would scan a busy
/// wallet's entries once per hold, for an automatic index by transaction.)
pub(super) const UNPOSTED_CAPTURES: &str =
    "SELECT h.id, h.captured, h.txn_id, a.kind, a.name, a.currency
     FROM holds h
     LEFT JOIN accounts a ON a.id = h.account_id
     LEFT JOIN ledger_transactions t
       ON t.id = h.txn_id AND t.kind = 'capture' AND t.payment_id = h.id
     LEFT JOIN ledger_entries e
       ON e.txn_id = t.id AND +e.account_id = h.account_id AND e.amount = -h.captured
     WHERE h.status = 'captured' AND e.id IS NULL ORDER BY h.id";

/// Refunded payments whose refunds add up to more than was captured, or
/// that have nothing to refund: what a refund is measured against is the
/// payment's capture (a fast-path hold's, a paid intent's settlement), or
/// the payment of a session made through the sessions API, as
/// `sql::CAPTURE_TXN_ID` finds it.
pub(super) const OVER_REFUNDED: &str = "SELECT payment_id,
            CAST(SUM(refunded) AS BIGINT) AS refunded, CAST(MAX(captured) AS BIGINT) AS captured,
            COUNT(currency) AS captures, COALESCE(MAX(currency), MAX(refund_currency)) AS currency
     FROM (SELECT r.payment_id, r.amount AS refunded, 0 AS captured, CAST(NULL AS TEXT) AS currency,
                  rt.currency AS refund_currency
           FROM refunds r LEFT JOIN ledger_transactions rt ON rt.id = r.txn_id
           UNION ALL
           SELECT payment_id, 0, amount, currency, NULL FROM ledger_transactions
           WHERE kind = 'capture' AND payment_id IN (SELECT payment_id FROM refunds)
           UNION ALL
           SELECT t.payment_id, 0, t.amount, t.currency, NULL FROM ledger_transactions t
           JOIN payment_sessions s ON s.id = t.payment_id
           WHERE t.kind = 'session_payment' AND s.owner IS NOT NULL
             AND t.payment_id IN (SELECT payment_id FROM refunds)) p
     GROUP BY payment_id
     HAVING COUNT(currency) = 0 OR SUM(refunded) > MAX(captured)
     ORDER BY payment_id";

/// An amount in the currency its row records; a currency that is not even
/// three letters (a damaged row, which verify is there to report, not to
/// trip on) gives no digits to go by.
fn amount(micros: i64, currency: &str) -> String {
    match Currency::recorded(currency) {
        Ok(currency) => format_signed_in(micros, &currency),
        Err(_) => format_without_currency(micros),
    }
}

/// As [`amount`], followed by the currency's code when the row has one.
fn amount_in(micros: i64, currency: &str) -> String {
    match currency {
        "" => amount(micros, currency),
        _ => format!("{} {currency}", amount(micros, currency)),
    }
}

/// The rows of each check, in one snapshot.
pub(super) struct Found<R> {
    pub counts: R,
    pub unbalanced: Vec<R>,
    pub orphan_entries: Vec<R>,
    pub accounts: Vec<R>,
    pub stale_holds: Vec<R>,
    pub over_captured: Vec<R>,
    pub unposted_captures: Vec<R>,
    pub over_refunded: Vec<R>,
}

impl<R: Columns> Found<R> {
    pub(super) fn report(&self) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport {
            transactions: self.counts.int("transactions")?,
            accounts: self.counts.int("accounts")?,
            open_holds: self.counts.int("open_holds")?,
            problems: Vec::new(),
        };
        let problems = &mut report.problems;
        for row in &self.unbalanced {
            let (id, total, n) = (row.text("id")?, row.int("total")?, row.int("n")?);
            let currency = row.text("currency")?;
            problems.push(if n < 2 {
                format!("transaction {id} has {n} entries")
            } else {
                format!(
                    "transaction {id} sums to {}, not zero",
                    amount(total, &currency)
                )
            });
        }
        for row in &self.orphan_entries {
            problems.push(format!(
                "entry {} of {} has no transaction, no account, or another currency",
                row.int("id")?,
                row.text("txn_id")?
            ));
        }
        for row in &self.accounts {
            let (kind, currency) = (row.text("kind")?, row.text("currency")?);
            let name = format!("{kind}:{} ({currency})", row.text("name")?);
            let in_currency = |micros| amount(micros, &currency);
            let (balance, held) = (row.int("balance")?, row.int("held")?);
            let (posted, open_held) = (row.int("posted")?, row.int("open_held")?);
            // Only wallets store a balance; other accounts' is their entries.
            if kind == "wallet" && balance != posted {
                problems.push(format!(
                    "account {name}: balance {} but its entries sum to {}",
                    in_currency(balance),
                    in_currency(posted)
                ));
            }
            if held != open_held {
                problems.push(format!(
                    "account {name}: held {} but its open holds sum to {}",
                    in_currency(held),
                    in_currency(open_held)
                ));
            }
            if kind == "wallet" && (balance < 0 || balance - held < 0) {
                problems.push(format!(
                    "wallet {name}: available balance {} is below zero",
                    in_currency(balance - held)
                ));
            }
        }
        for row in &self.stale_holds {
            problems.push(format!(
                "hold {} is open over {} minutes past its expiry",
                row.text("id")?,
                SWEEP_GRACE_MS / 60_000
            ));
        }
        for row in &self.over_captured {
            problems.push(format!(
                "hold {} captured more than it held",
                row.text("id")?
            ));
        }
        for row in &self.unposted_captures {
            let currency = row.opt_text("currency")?.unwrap_or_default();
            let wallet = match (row.opt_text("kind")?, row.opt_text("name")?) {
                (Some(kind), Some(name)) => format!("{kind}:{name}"),
                _ => "its wallet".to_owned(),
            };
            let captured = row
                .opt_int("captured")?
                .map_or_else(|| "no amount".to_owned(), |c| amount_in(c, &currency));
            let txn = row
                .opt_text("txn_id")?
                .unwrap_or_else(|| "(none)".to_owned());
            problems.push(format!(
                "hold {} captured {captured}, but its transaction {txn} is not its capture or takes no such amount from {wallet}",
                row.text("id")?
            ));
        }
        for row in &self.over_refunded {
            let id = row.text("payment_id")?;
            let currency = row.opt_text("currency")?.unwrap_or_default();
            let refunded = amount_in(row.int("refunded")?, &currency);
            problems.push(match row.opt_int("captured")? {
                Some(captured) if row.int("captures")? > 0 => format!(
                    "payment {id}: refunds total {refunded}, more than the {} captured",
                    amount_in(captured, &currency)
                ),
                _ => format!(
                    "payment {id}: refunds total {refunded}, but it has no capture to refund"
                ),
            });
        }
        Ok(report)
    }
}
