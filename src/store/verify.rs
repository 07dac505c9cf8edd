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

/// An amount in the currency its row records; a currency that is not even
/// three letters (a damaged row, which verify is there to report, not to
/// trip on) gives no digits to go by.
fn amount(micros: i64, currency: &str) -> String {
    match Currency::recorded(currency) {
        Ok(currency) => format_signed_in(micros, &currency),
        Err(_) => format_without_currency(micros),
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
        Ok(report)
    }
}
