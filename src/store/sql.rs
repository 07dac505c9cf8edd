//! Statements both backends run as they are. Parameters are `$N`, which
//! PostgreSQL and sqlx's SQLite driver both bind by number. Sums are cast
//! to BIGINT because PostgreSQL sums BIGINTs into NUMERIC.

/// Wallet balances of a principal, per currency.
pub(super) const BALANCES: &str = "SELECT currency, balance, held FROM accounts
     WHERE kind = 'wallet' AND name = $1 ORDER BY currency";

/// Ledger lines as `rows::statement_line` reads them: `$amount`, `$legs`
/// with `$legs_at`, when they were posted (the transaction's own unless
/// given), and `$account` (kind and name) for each line, then `$tail`.
macro_rules! ledger_lines {
    ($amount:literal, $account:literal, $tail:literal) => {
        ledger_lines!($amount, "t.legs", "t.created_at", $account, $tail)
    };
    ($amount:literal, $legs:expr, $legs_at:expr, $account:literal, $tail:literal) => {
        concat!(
            "SELECT t.id, t.kind, t.created_at, ",
            $amount,
            ", ",
            $legs,
            " AS legs, ",
            $legs_at,
            " AS legs_at, t.currency, t.tool, t.payment_id, t.beneficiary, t.memo, t.payer, t.intent_id,
                    t.agent, t.metadata, t.approval, t.approved_by, t.approved_at,
                    CAST(NULL AS TEXT) AS approval_rule, ",
            $account,
            " FROM ledger_entries e
             JOIN accounts a ON a.id = e.account_id
             JOIN ledger_transactions t ON t.id = e.txn_id ",
            $tail
        )
    };
}

/// The settlement capture of the session a wallet paid on line `t`, for
/// its split: `$column` of it. A statement shows the split by the
/// capture's date, which is later than the payment's.
macro_rules! settlement_of_payment {
    ($column:literal) => {
        concat!(
            "CASE WHEN t.kind = 'session_payment' AND a.kind = 'wallet' THEN
                 (SELECT s.",
            $column,
            " FROM ledger_transactions s
                  WHERE s.intent_id = t.intent_id AND s.kind = 'capture'
                  ORDER BY s.created_at, s.id LIMIT 1) END"
        )
    };
}

/// One account's entries (`$1`: name, `$2`: kind) with their transactions'
/// audit data. A wallet's payment of a session shows the split its
/// settlement posted (out of clearing, once the tool ran), dated by that
/// settlement, as a fast-path capture shows its own.
pub(super) const STATEMENT: &str = ledger_lines!(
    "e.amount, e.role",
    concat!("COALESCE(t.legs, ", settlement_of_payment!("legs"), ")"),
    concat!(
        "CASE WHEN t.legs IS NOT NULL THEN t.created_at ELSE ",
        settlement_of_payment!("created_at"),
        " END"
    ),
    "a.kind AS account_kind, a.name AS account_name",
    "WHERE a.kind = $2 AND a.name = $1 ORDER BY e.id"
);

/// Every entry of the transactions naming payment `$1` as their payment
/// or intent. A scan of the transactions: for an operator's look-up, not
/// for a call.
pub(super) const PAYMENT_LINES: &str = ledger_lines!(
    "e.amount, e.role",
    "a.kind AS account_kind, a.name AS account_name",
    "WHERE t.payment_id = $1 OR t.intent_id = $1 ORDER BY e.id"
);

/// A hold with its wallet's name and currency (`$1`: its id).
pub(super) const HOLD_RECORD: &str =
    "SELECT h.id, a.name AS wallet, a.currency, h.amount, h.status, h.captured, h.principal,
            h.tool, h.created_at, h.expires_at, h.settled_at
     FROM holds h JOIN accounts a ON a.id = h.account_id WHERE h.id = $1";

/// A page of entries for export: up to `$2` after entry `$1`, up to entry
/// `$3`.
pub(super) const ENTRIES_PAGE: &str = ledger_lines!(
    "e.amount, e.role, e.id AS entry_id",
    "a.kind AS account_kind, a.name AS account_name",
    "WHERE e.id > $1 AND e.id <= $3 ORDER BY e.id LIMIT $2"
);

/// As [`ENTRIES_PAGE`], of one account's entries (`$4`: kind, `$5`: name).
pub(super) const ACCOUNT_ENTRIES_PAGE: &str = ledger_lines!(
    "e.amount, e.role, e.id AS entry_id",
    "a.kind AS account_kind, a.name AS account_name",
    "WHERE a.kind = $4 AND a.name = $5 AND e.id > $1 AND e.id <= $3 ORDER BY e.id LIMIT $2"
);

/// The highest entry id (0 for none).
pub(super) const ENTRIES_UPTO: &str =
    "SELECT CAST(COALESCE(MAX(id), 0) AS BIGINT) AS upto FROM ledger_entries";

/// A tool's transactions that moved revenue (`$1`: the tool), one line
/// each: the sum of their revenue legs.
pub(super) const TOOL_STATEMENT: &str = ledger_lines!(
    "CAST(SUM(e.amount) AS BIGINT) AS amount, CAST(NULL AS TEXT) AS role",
    "CAST(NULL AS TEXT) AS account_kind, CAST(NULL AS TEXT) AS account_name",
    "WHERE a.kind = 'revenue' AND t.tool = $1 GROUP BY t.id ORDER BY MIN(e.id)"
);

pub(super) const INSERT_TRANSACTION: &str = "INSERT INTO ledger_transactions
       (id, kind, currency, amount, payer, beneficiary, tool, intent_id, payment_id, memo, created_at, legs,
        agent, metadata, approval, approved_by, approved_at)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)";

/// Wallet rows with their available balance, limits and spending
/// counters, as `rows::limits` reads them, followed by `$tail`.
macro_rules! wallet_with_limits {
    ($tail:literal) => {
        concat!(
            "SELECT balance - held AS available, currency, per_call_max, daily_cap, monthly_cap,
                    allowed_tools, spent_day_start, spent_day, spent_month_start, spent_month
             FROM accounts ",
            $tail
        )
    };
}
pub(super) use wallet_with_limits;

/// A wallet's limits and spending counters, per currency (`$1`: its name).
pub(super) const LIMITS: &str =
    wallet_with_limits!("WHERE kind = 'wallet' AND name = $1 ORDER BY currency");

/// Sets a wallet's limits (`$1`: its account id).
pub(super) const SET_LIMITS: &str =
    "UPDATE accounts SET per_call_max = $2, daily_cap = $3, monthly_cap = $4, allowed_tools = $5
     WHERE id = $1";

/// Counts `$2` as spent by wallet `$1` in the day starting at `$3` and the
/// month starting at `$4` (a session paid from it; holds are counted by the
/// statement that makes them).
pub(super) const COUNT_SPEND: &str = "UPDATE accounts SET
        spent_day = CASE WHEN spent_day_start >= $3 THEN spent_day ELSE 0 END + $2,
        spent_day_start = CASE WHEN spent_day_start >= $3 THEN spent_day_start ELSE $3 END,
        spent_month = CASE WHEN spent_month_start >= $4 THEN spent_month ELSE 0 END + $2,
        spent_month_start = CASE WHEN spent_month_start >= $4 THEN spent_month_start ELSE $4 END
     WHERE id = $1";

/// A wallet `$1` given back `$2` of what it paid at `$3` (a session's
/// payment, refunded because the run failed, used less, or was never
/// redeemed; or a withheld call's hold): its spending counters come down by
/// that much, as a released hold's do, if their day or month began by then
/// (so the payment was counted in them); else they are left as they are.
pub(super) const GIVE_BACK_SPEND: &str = "UPDATE accounts SET
        spent_day = CASE WHEN spent_day_start <= $3
                         THEN CASE WHEN spent_day > $2 THEN spent_day - $2 ELSE 0 END
                         ELSE spent_day END,
        spent_month = CASE WHEN spent_month_start <= $3
                           THEN CASE WHEN spent_month > $2 THEN spent_month - $2 ELSE 0 END
                           ELSE spent_month END
     WHERE id = $1 AND kind = 'wallet'";

/// How many payments principal `$principal` has waiting (unexpired) at
/// `$now`; when `$principal` is null, anonymous callers on MCP session
/// `$session`. Counted the same way by [`OPEN_INTENTS`] and the cap in
/// [`CREATE_INTENT`].
macro_rules! caller_waiting {
    ($principal:literal, $session:literal, $now:literal) => {
        concat!(
            "(SELECT COUNT(*) FROM intents
              WHERE status = 'awaiting_payment' AND expires_at > ",
            $now,
            " AND (principal = ",
            $principal,
            " OR (",
            $principal,
            " IS NULL AND principal IS NULL AND session_id = ",
            $session,
            ")))"
        )
    };
}

/// How many payments all anonymous callers have waiting at `$now`.
macro_rules! anonymous_waiting {
    ($now:literal) => {
        concat!(
            "(SELECT COUNT(*) FROM intents
              WHERE status = 'awaiting_payment' AND expires_at > ",
            $now,
            " AND principal IS NULL)"
        )
    };
}

/// Intents awaiting payment, unexpired, of principal `$1`, or, when `$1`
/// is null, of anonymous callers on MCP session `$2` (`n`) and of all
/// anonymous callers (`anonymous`; 0 for a principal), at `$3`.
pub(super) const OPEN_INTENTS: &str = concat!(
    "SELECT ",
    caller_waiting!("$1", "$2", "$3"),
    " AS n, CASE WHEN $1 IS NULL THEN ",
    anonymous_waiting!("$3"),
    " ELSE 0 END AS anonymous"
);

/// Intents of a principal that needed a person's decision, newest first,
/// at most [`super::APPROVALS_LISTED`]. Auto-approved ones (every payment
/// under its threshold) are left out here, or they would crowd out the
/// decisions.
pub(super) const APPROVALS: &str =
    "SELECT * FROM intents WHERE principal = $1 AND approval IS NOT NULL
       AND approval <> 'auto_approved'
     ORDER BY created_at DESC, id LIMIT $2";

/// waiting → approved or declined; not once its session here is paid: the
/// payment decided it (and its payer's statement line says so already).
pub(super) const DECIDE_APPROVAL: &str =
    "UPDATE intents SET approval = $2, approved_by = $3, approved_at = $4, updated_at = $4
     WHERE id = $1 AND approval = 'waiting'
       AND NOT EXISTS (SELECT 1 FROM payment_sessions s
                       WHERE s.id = intents.provider_session_id AND s.status = 'paid')";

/// One entry; a trigger moves the account's balance.
pub(super) const INSERT_ENTRY: &str = "INSERT INTO ledger_entries (txn_id, account_id, amount, created_at, role) VALUES ($1, $2, $3, $4, $5)";

pub(super) const CREATE_ACCOUNT: &str =
    "INSERT INTO accounts (kind, name, currency, created_at) VALUES ($1, $2, $3, $4)
     ON CONFLICT (kind, name, currency) DO NOTHING";

pub(super) const ACCOUNT_ID: &str =
    "SELECT id FROM accounts WHERE kind = $1 AND name = $2 AND currency = $3";

pub(super) const HOLD: &str =
    "SELECT status, amount, captured, txn_id, settled_at, beneficiary_account_id
     FROM holds WHERE id = $1";

/// Opens an intent unless its caller already has `$22` payments waiting
/// (principal `$7`, or, when `$7` is null, anonymous MCP session `$8`), or,
/// for an anonymous caller, anonymous callers have `$23` between them: the
/// counts and the insert in one statement, so that calls racing each other
/// cannot all pass the count (on PostgreSQL the caller also holds a lock).
pub(super) const CREATE_INTENT: &str = concat!(
    "INSERT INTO intents (id, tool, args_hash, args_json, amount, currency, principal, session_id, mode,
                          status, provider, provider_session_id, payment_url, created_at, expires_at,
                          updated_at, agent, metadata, approval, approved_by, approved_at, approval_rule)
     SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $14, $16, $17, $18, $19, $20, $21
     WHERE ",
    caller_waiting!("$7", "$8", "$14"),
    " < $22 AND ($7 IS NOT NULL OR ",
    anonymous_waiting!("$14"),
    " < $23)"
);

pub(super) const INTENT: &str = "SELECT * FROM intents WHERE id = $1";

/// Moves an intent (`$1`) from `$2` to `$3`. An intent set running is
/// stamped with the instance running it (`$5`), for crash recovery.
pub(super) const TRANSITION_INTENT: &str = "UPDATE intents SET status = $3, updated_at = $4,
                        runner = CASE WHEN $3 = 'running' THEN $5 ELSE runner END
     WHERE id = $1 AND status = $2";

/// Whether the local payment session of `$intent` (a row of `intents`)
/// was paid. Its money is then in clearing, and only a claim (a run, or the
/// refund of an unredeemed payment) may end the intent: nothing that ends
/// an unpaid intent touches one for which this holds.
macro_rules! session_paid {
    ($intent:literal) => {
        concat!(
            "EXISTS (SELECT 1 FROM payment_sessions s WHERE s.id = ",
            $intent,
            ".provider_session_id AND s.status = 'paid')"
        )
    };
}
pub(super) use session_paid;

/// Ends intent `$1`, still awaiting payment, as `$2` (expired, declined,
/// cancelled) at `$3`, unless its local payment session was paid.
pub(super) const END_UNPAID_INTENT: &str = concat!(
    "UPDATE intents SET status = $2, updated_at = $3
     WHERE id = $1 AND status = 'awaiting_payment' AND NOT ",
    session_paid!("intents")
);

/// Registers instance `$1` (started at `$2`) or renews its lease to `$3`.
pub(super) const HEARTBEAT: &str =
    "INSERT INTO instances (id, started_at, alive_until) VALUES ($1, $2, $3)
     ON CONFLICT (id) DO UPDATE SET alive_until = excluded.alive_until";
/// Forgets instances whose lease lapsed before `$1`.
pub(super) const FORGET_INSTANCES: &str = "DELETE FROM instances WHERE alive_until < $1";

/// Whether `$owner` (a column) names no instance alive at `$1`, and not
/// this one (`$2`): an instance never takes its own calls for a dead one's,
/// even when its lease lapsed because renewals failed.
macro_rules! owner_gone {
    ($owner:literal) => {
        concat!(
            $owner,
            " IS NOT NULL AND ",
            $owner,
            " <> $2 AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.id = ",
            $owner,
            " AND i.alive_until >= $1)"
        )
    };
}
pub(super) use owner_gone;

/// Releases (`holds_end` gives the reservation back) the open holds of
/// other instances (than `$2`) no longer alive at `$1`: their calls never
/// finished.
pub(super) const RELEASE_ORPHANED_HOLDS: &str = concat!(
    "UPDATE holds SET status = 'released', settled_at = $1 WHERE status = 'open' AND ",
    owner_gone!("holds.owner")
);

/// Paid intents left running by other instances (than `$2`) no longer
/// alive at `$1`.
pub(super) const INTERRUPTED_RUNS: &str = concat!(
    "SELECT * FROM intents WHERE status = 'running' AND ",
    owner_gone!("intents.runner"),
    " ORDER BY id"
);

/// This instance's (`$2`) paid intents left running since before `$1`.
pub(super) const OWN_STALE_RUNS: &str = "SELECT * FROM intents WHERE status = 'running' AND runner = $2 AND updated_at < $1 ORDER BY id";

/// Whether `$intent`'s payment is seen in this ledger: it has no provider
/// session, or a local one. A remote provider's (`sessions_api`) is only
/// known by asking it.
macro_rules! paid_here {
    ($intent:literal) => {
        concat!(
            "(",
            $intent,
            ".provider_session_id IS NULL OR EXISTS (SELECT 1 FROM payment_sessions s WHERE s.id = ",
            $intent,
            ".provider_session_id))"
        )
    };
}
pub(super) use paid_here;

/// Intents awaiting a remote provider's payment whose time ended before
/// `$1`, oldest first, a page after the one ending at (`$2`, `$3`): the gate
/// asks the provider about each.
pub(super) const REMOTE_DUE: &str = concat!(
    "SELECT * FROM intents i WHERE i.status = 'awaiting_payment' AND i.expires_at < $1
       AND (i.expires_at > $2 OR (i.expires_at = $2 AND i.id > $3)) AND NOT ",
    paid_here!("i"),
    " ORDER BY i.expires_at, i.id LIMIT $4"
);

/// Intents paid but never redeemed, whose time ended before `$1`: marked
/// paid, or still awaiting payment though their local session was paid.
/// One page, in (expires_at, id) order, after the one ending at (`$2`, `$3`).
pub(super) const UNREDEEMED: &str = concat!(
    "SELECT * FROM intents i
     WHERE i.expires_at < $1
       AND (i.expires_at > $2 OR (i.expires_at = $2 AND i.id > $3))
       AND (i.status = 'paid' OR (i.status = 'awaiting_payment' AND ",
    session_paid!("i"),
    "))
     ORDER BY i.expires_at, i.id LIMIT $4"
);

/// What is kept only for a while, older than `$1`: stored results (a retry
/// after that is told the result is gone), unpaid intents that ended and
/// their sessions, and holds that ended without moving money. The ledger,
/// captured holds, paid intents (refunds need them) and intents a person
/// declined an approval of (the approvals statement shows them) are kept.
// Pruning deletes at most `$2` rows a statement (`PRUNE_BATCH`): a large
// backlog (the first pass after an upgrade or a long stop) must not hold
// SQLite's write lock, or run into PostgreSQL's statement timeout and fail
// the same way every pass.
pub(super) const PRUNE_RESULTS: &str = "DELETE FROM stored_results WHERE intent_id IN (
     SELECT intent_id FROM stored_results WHERE created_at < $1 LIMIT $2)";
pub(super) const PRUNE_INTENTS: &str = "DELETE FROM intents WHERE id IN (
     SELECT id FROM intents
     WHERE (status IN ('expired', 'cancelled')
            OR (status = 'declined' AND (approval IS NULL OR approval <> 'declined')))
       AND updated_at < $1
     LIMIT $2)";
pub(super) const PRUNE_SESSIONS: &str = "DELETE FROM payment_sessions WHERE id IN (
     SELECT id FROM payment_sessions
     WHERE status IN ('expired', 'cancelled', 'failed') AND updated_at < $1
     LIMIT $2)";
pub(super) const PRUNE_HOLDS: &str = "DELETE FROM holds WHERE id IN (
     SELECT id FROM holds WHERE status IN ('released', 'expired') AND settled_at < $1
     LIMIT $2)";

/// awaiting_payment → running for instance `$5`: paid, and claimed for its
/// one run, in one statement (it passes through `paid` without a commit of
/// its own, which cost each slow-path flow a write). With no `$5`, → paid
/// only (a remote payment found after the intent's time: redeemable, or
/// refunded if never used). Notes the account a refund goes back to; a
/// waiting approval is approved by whoever paid (`$4`), and so is a
/// declined one: a payment that landed as the person said no (the intent
/// stays payable then) is what the charge's records must show, beside who
/// said no (as [`approved_by_payment`] words it).
pub(super) const CLAIM_PAID: &str =
    "UPDATE intents SET status = CASE WHEN $5 IS NULL THEN 'paid' ELSE 'running' END,
            runner = $5, refund_account_id = $2, updated_at = $3,
            approved_by = CASE WHEN approval = 'waiting' THEN $4
                               WHEN approval = 'declined'
                               THEN CAST($4 AS TEXT) || ' (paid as ' || COALESCE(approved_by, 'a person')
                                    || ' declined)'
                               ELSE approved_by END,
            approved_at = CASE WHEN approval IN ('waiting', 'declined') THEN $3 ELSE approved_at END,
            approval = CASE WHEN approval IN ('waiting', 'declined') THEN 'approved' ELSE approval END
     WHERE id = $1 AND status = 'awaiting_payment'";

/// Who approved a charge by paying it, as [`CLAIM_PAID`] records it: the
/// payer, and, when a person had declined as the payment landed, who.
pub(super) fn approved_by_payment(
    status: ApprovalStatus,
    payer: String,
    decided_by: Option<&str>,
) -> String {
    match status {
        ApprovalStatus::Declined => format!(
            "{payer} (paid as {} declined)",
            decided_by.unwrap_or("a person")
        ),
        _ => payer,
    }
}

/// running → succeeded or failed, with what settling it needs.
pub(super) const FINISH_INTENT: &str =
    "UPDATE intents SET status = $2, updated_at = $3 WHERE id = $1 AND status = 'running'
     RETURNING amount, currency, principal, tool, refund_account_id, agent, metadata, approval,
               approved_by, approved_at, approval_rule, provider_session_id";

pub(super) const STORE_RESULT: &str = "INSERT INTO stored_results (intent_id, is_error, result_json, created_at) VALUES ($1, $2, $3, $4)";

pub(super) const STORED_RESULT: &str =
    "SELECT is_error, result_json FROM stored_results WHERE intent_id = $1";

pub(super) const CREATE_SESSION: &str = "INSERT INTO payment_sessions (id, amount, currency, description, status, created_at, expires_at, updated_at, owner)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $6, $8)";

/// Sessions joined with the account that paid them, as `rows::session`
/// reads them, followed by `$tail`.
macro_rules! sessions_where {
    ($tail:literal) => {
        concat!(
            "SELECT s.id, s.amount, s.currency, s.description, s.status, s.created_at, s.expires_at,
                    s.owner, a.kind AS paid_kind, a.name AS paid_name
             FROM payment_sessions s LEFT JOIN accounts a ON a.id = s.paid_from_account ",
            $tail
        )
    };
}
pub(super) const SESSION: &str = sessions_where!("WHERE s.id = $1");
pub(super) const RECENT_SESSIONS: &str =
    sessions_where!("ORDER BY s.created_at DESC, s.id LIMIT $1");

pub(super) const EXPIRE_SESSION: &str =
    "UPDATE payment_sessions SET status = 'expired', updated_at = $2 WHERE id = $1";

pub(super) const MARK_SESSION_PAID: &str =
    "UPDATE payment_sessions SET status = 'paid', paid_from_account = $2, updated_at = $3
     WHERE id = $1 AND status = 'pending'";

pub(super) const END_SESSION: &str =
    "UPDATE payment_sessions SET status = $2, updated_at = $3 WHERE id = $1 AND status = 'pending'";

pub(super) const CREATE_API_KEY: &str = "INSERT INTO api_keys (id, secret_hash, principal, scopes, label, created_at) VALUES ($1, $2, $3, $4, $5, $6)";
pub(super) const API_KEY: &str = "SELECT * FROM api_keys WHERE id = $1";
pub(super) const API_KEYS: &str = "SELECT * FROM api_keys ORDER BY created_at, id";
pub(super) const REVOKE_API_KEY: &str =
    "UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL";

/// Transaction `$1` (a top-up made with an idempotency key) and what it
/// credited account `$2`, if anything.
pub(super) const TOPUP: &str = "SELECT t.created_at, (SELECT e.amount FROM ledger_entries e
                                 WHERE e.txn_id = t.id AND e.account_id = $2) AS credited
     FROM ledger_transactions t WHERE t.id = $1 AND t.kind = 'topup'";

/// When a local session was paid (its spending was counted then).
pub(super) const SESSION_PAID_AT: &str =
    "SELECT updated_at FROM payment_sessions WHERE id = $1 AND status = 'paid'";

/// When a hold was made (its spending was counted then).
pub(super) const HOLD_MADE_AT: &str = "SELECT created_at FROM holds WHERE id = $1";

/// A wallet's balance (`$1`: its account id).
pub(super) const WALLET_BALANCE: &str = "SELECT balance FROM accounts WHERE id = $1";

/// A refund made with an idempotency key.
pub(super) const REFUND_BY_KEY: &str =
    "SELECT payment_id, txn_id, amount FROM refunds WHERE idempotency_key = $1";
/// The capture of a payment: a fast-path hold names it; a paid intent's is
/// found by its payment id (a scan: refunds are rare, and an index would
/// cost every capture a write). A session made through the sessions API has
/// no intent here, so its payment into clearing is what a refund undoes;
/// a call's session is not, since its intent's capture or refund moves
/// that money on.
pub(super) const CAPTURE_TXN_ID: &str =
    "SELECT txn_id AS id FROM holds WHERE id = $1 AND status = 'captured'
     UNION ALL
     SELECT id FROM ledger_transactions WHERE payment_id = $1 AND kind = 'capture'
     UNION ALL
     SELECT t.id FROM ledger_transactions t JOIN payment_sessions s ON s.id = t.payment_id
     WHERE t.payment_id = $1 AND t.kind = 'session_payment' AND s.owner IS NOT NULL";
/// What a capture paid to whom: its positive entries, but not the rest of
/// a metered payment it gave back.
pub(super) const CAPTURE_LEGS: &str = "SELECT account_id, amount, role FROM ledger_entries
     WHERE txn_id = $1 AND amount > 0 AND (role IS NULL OR role <> 'refund') ORDER BY id";
/// Who paid for a payment: a hold's wallet, an intent's refund account, or
/// the account that paid a session made through the sessions API.
pub(super) const REFUND_DESTINATION: &str = "SELECT account_id FROM holds WHERE id = $1
     UNION ALL
     SELECT refund_account_id AS account_id FROM intents WHERE id = $1 AND refund_account_id IS NOT NULL
     UNION ALL
     SELECT paid_from_account AS account_id FROM payment_sessions
     WHERE id = $1 AND owner IS NOT NULL AND paid_from_account IS NOT NULL";
/// What earlier refunds of a payment took back from each account, by role.
pub(super) const REFUNDED_BY_ACCOUNT: &str =
    "SELECT e.account_id, e.role, CAST(SUM(-e.amount) AS BIGINT) AS taken
     FROM refunds r JOIN ledger_entries e ON e.txn_id = r.txn_id
     WHERE r.payment_id = $1 AND e.amount < 0 GROUP BY e.account_id, e.role";
pub(super) const REFUNDED_SO_FAR: &str =
    "SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) AS total FROM refunds WHERE payment_id = $1";
pub(super) const INSERT_REFUND: &str =
    "INSERT INTO refunds (idempotency_key, payment_id, txn_id, amount, reason, created_at)
     VALUES ($1, $2, $3, $4, $5, $6)";

pub(super) const STATS_OPEN_HOLDS: &str = "SELECT COUNT(*) AS n,
       (SELECT COUNT(*) FROM stored_results) AS stored_results
     FROM holds WHERE status = 'open'";
pub(super) const STATS_INTENTS: &str =
    "SELECT status, COUNT(*) AS n FROM intents GROUP BY status ORDER BY status";
/// What each tool's calls have earned, net of refunds: every posting to a
/// revenue account (the author's, the platform's, commissions, rounding)
/// by the tool's captures, less what refunds took back from them. Tool-less
/// revenue ("-") comes last on both stores, which sort NULLs differently.
pub(super) const STATS_REVENUE: &str =
    "SELECT COALESCE(t.tool, '-') AS tool, t.currency, CAST(SUM(e.amount) AS BIGINT) AS total
     FROM ledger_entries e
     JOIN accounts a ON a.id = e.account_id
     JOIN ledger_transactions t ON t.id = e.txn_id
     WHERE a.kind = 'revenue' AND t.kind IN ('capture', 'refund')
     GROUP BY t.tool, t.currency ORDER BY t.tool IS NULL, t.tool, t.currency";

/// A parameter of a shared statement.
pub(super) enum Param<'a> {
    Text(Option<&'a str>),
    Int(Option<i64>),
    Flag(bool),
}

impl<'a> From<&'a str> for Param<'a> {
    fn from(text: &'a str) -> Self {
        Param::Text(Some(text))
    }
}
impl<'a> From<&'a String> for Param<'a> {
    fn from(text: &'a String) -> Self {
        Param::Text(Some(text))
    }
}
impl<'a> From<&'a Option<String>> for Param<'a> {
    fn from(text: &'a Option<String>) -> Self {
        Param::Text(text.as_deref())
    }
}
impl<'a> From<Option<&'a str>> for Param<'a> {
    fn from(text: Option<&'a str>) -> Self {
        Param::Text(text)
    }
}
impl From<i64> for Param<'_> {
    fn from(n: i64) -> Self {
        Param::Int(Some(n))
    }
}
impl From<Option<i64>> for Param<'_> {
    fn from(n: Option<i64>) -> Self {
        Param::Int(n)
    }
}
impl From<bool> for Param<'_> {
    fn from(flag: bool) -> Self {
        Param::Flag(flag)
    }
}

/// A shared statement with its parameters, in `$N` order.
pub(super) struct Statement<'a> {
    pub sql: &'static str,
    pub params: Vec<Param<'a>>,
}

macro_rules! statement {
    ($sql:expr $(, $param:expr)* $(,)?) => {
        Statement { sql: $sql, params: vec![$(Param::from($param)),*] }
    };
}
pub(super) use statement;

/// Binds a statement's parameters, for either backend.
pub(super) fn query<'q, DB>(
    statement: Statement<'q>,
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>
where
    DB: sqlx::Database,
    Option<&'q str>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<i64>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    bool: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    let mut query = sqlx::query(statement.sql);
    for param in statement.params {
        query = match param {
            Param::Text(text) => query.bind(text),
            Param::Int(n) => query.bind(n),
            Param::Flag(flag) => query.bind(flag),
        };
    }
    query
}

use super::{
    ApiKey, ApprovalStatus, Intent, IntentStatus, LocalSession, OpenLimit, SessionStatus,
    posting::TxnHeader,
};

impl<'a> Statement<'a> {
    pub(super) fn insert_transaction(header: &'a TxnHeader<'a>) -> Self {
        let a = header.audit;
        statement!(
            INSERT_TRANSACTION,
            &header.id,
            header.kind,
            header.currency.as_str(),
            header.amount.0,
            &a.payer,
            &a.beneficiary,
            &a.tool,
            &a.intent_id,
            &a.payment_id,
            &a.memo,
            header.at,
            &header.legs,
            &a.origin.agent,
            &a.origin.metadata,
            Param::Text(a.approval.as_ref().map(|x| x.status.as_str())),
            Param::Text(a.approval.as_ref().and_then(|x| x.by.as_deref())),
            Param::Int(a.approval.as_ref().and_then(|x| x.at)),
        )
    }

    pub(super) fn insert_entry(
        txn_id: &'a str,
        (account_id, amount, role): super::posting::Entry,
        at: i64,
    ) -> Self {
        statement!(
            INSERT_ENTRY,
            txn_id,
            account_id,
            amount,
            at,
            Param::Text(role)
        )
    }

    pub(super) fn create_account(account: &'a super::AccountRef, at: i64) -> Self {
        statement!(
            CREATE_ACCOUNT,
            account.kind.as_str(),
            &account.name,
            account.currency.as_str(),
            at
        )
    }

    pub(super) fn account_id(account: &'a super::AccountRef) -> Self {
        statement!(
            ACCOUNT_ID,
            account.kind.as_str(),
            &account.name,
            account.currency.as_str()
        )
    }

    pub(super) fn create_intent(intent: &'a Intent, limit: &OpenLimit) -> Self {
        statement!(
            CREATE_INTENT,
            &intent.id,
            &intent.tool,
            &intent.args_hash,
            &intent.args_json,
            intent.amount.0,
            intent.currency.as_str(),
            &intent.principal,
            &intent.session_id,
            &intent.mode,
            intent.status.as_str(),
            &intent.provider,
            &intent.provider_session_id,
            &intent.payment_url,
            intent.created_at,
            intent.expires_at,
            &intent.origin.agent,
            &intent.origin.metadata,
            Param::Text(intent.approval.as_ref().map(|x| x.status.as_str())),
            Param::Text(intent.approval.as_ref().and_then(|x| x.by.as_deref())),
            Param::Int(intent.approval.as_ref().and_then(|x| x.at)),
            Param::Text(intent.approval.as_ref().and_then(|x| x.rule.as_deref())),
            limit.per_caller,
            limit.anonymous,
        )
    }

    pub(super) fn transition_intent(
        id: &'a str,
        from: IntentStatus,
        to: IntentStatus,
        at: i64,
        instance: &'a str,
    ) -> Self {
        statement!(
            TRANSITION_INTENT,
            id,
            from.as_str(),
            to.as_str(),
            at,
            instance
        )
    }

    pub(super) fn finish_intent(outcome: &'a super::IntentOutcome) -> Self {
        let status = if outcome.succeeded {
            "succeeded"
        } else {
            "failed"
        };
        statement!(FINISH_INTENT, &outcome.intent_id, status, outcome.at)
    }

    pub(super) fn store_result(outcome: &'a super::IntentOutcome) -> Self {
        statement!(
            STORE_RESULT,
            &outcome.intent_id,
            !outcome.succeeded,
            &outcome.result_json,
            outcome.at
        )
    }

    pub(super) fn create_session(session: &'a LocalSession) -> Self {
        statement!(
            CREATE_SESSION,
            &session.id,
            session.amount.0,
            session.currency.as_str(),
            &session.description,
            session.status.as_str(),
            session.created_at,
            session.expires_at,
            &session.owner,
        )
    }

    pub(super) fn end_session(id: &'a str, to: SessionStatus, at: i64) -> Self {
        statement!(END_SESSION, id, to.as_str(), at)
    }

    pub(super) fn create_api_key(key: &'a ApiKey, scopes: &'a str) -> Self {
        statement!(
            CREATE_API_KEY,
            &key.id,
            &key.secret_hash,
            &key.principal,
            scopes,
            &key.label,
            key.created_at,
        )
    }
}
