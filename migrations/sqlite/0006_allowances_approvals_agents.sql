-- Spending limits (src/allowance.rs), approvals, and who called.
--
-- A wallet's limits live on its own account row, with its spending
-- counters, so the statement that reserves money checks and counts them on
-- the row it writes: concurrent calls cannot slip past a cap. A counter is
-- what was committed in its period (UTC day, UTC month) and counts as
-- nothing once its period is over.
ALTER TABLE accounts ADD COLUMN per_call_max INTEGER;
ALTER TABLE accounts ADD COLUMN daily_cap INTEGER;
ALTER TABLE accounts ADD COLUMN monthly_cap INTEGER;
ALTER TABLE accounts ADD COLUMN allowed_tools TEXT;           -- JSON array; NULL: any tool
ALTER TABLE accounts ADD COLUMN spent_day_start INTEGER NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD COLUMN spent_day INTEGER NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD COLUMN spent_month_start INTEGER NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD COLUMN spent_month INTEGER NOT NULL DEFAULT 0;

-- The agent (an explicit id, or the MCP client's clientInfo) and the
-- caller's metadata, carried from the call into its ledger transaction.
ALTER TABLE holds ADD COLUMN agent TEXT;
ALTER TABLE holds ADD COLUMN metadata TEXT;
ALTER TABLE intents ADD COLUMN agent TEXT;
ALTER TABLE intents ADD COLUMN metadata TEXT;
ALTER TABLE ledger_transactions ADD COLUMN agent TEXT;
ALTER TABLE ledger_transactions ADD COLUMN metadata TEXT;

-- An intent's approval: auto_approved (under its threshold), waiting,
-- approved or declined, by whom and when, and the rule that asked.
ALTER TABLE intents ADD COLUMN approval TEXT;
ALTER TABLE intents ADD COLUMN approved_by TEXT;
ALTER TABLE intents ADD COLUMN approved_at INTEGER;
ALTER TABLE intents ADD COLUMN approval_rule TEXT;
ALTER TABLE ledger_transactions ADD COLUMN approval TEXT;
ALTER TABLE ledger_transactions ADD COLUMN approved_by TEXT;
ALTER TABLE ledger_transactions ADD COLUMN approved_at INTEGER;
CREATE INDEX intents_principal ON intents (principal, created_at) WHERE approval IS NOT NULL;

-- A hold counts in the periods of its created_at. (The hold's INSERT
-- checks the caps with the same expressions.)
DROP TRIGGER holds_reserve;
CREATE TRIGGER holds_reserve AFTER INSERT ON holds WHEN NEW.status = 'open'
BEGIN
    UPDATE accounts SET
        held = held + NEW.amount,
        spent_day = CASE WHEN spent_day_start >= NEW.created_at - NEW.created_at % 86400000
                         THEN spent_day ELSE 0 END + NEW.amount,
        spent_day_start = max(spent_day_start, NEW.created_at - NEW.created_at % 86400000),
        spent_month = CASE WHEN spent_month_start >= CAST(strftime('%s', NEW.created_at / 1000, 'unixepoch', 'start of month') AS INTEGER) * 1000
                           THEN spent_month ELSE 0 END + NEW.amount,
        spent_month_start = max(spent_month_start, CAST(strftime('%s', NEW.created_at / 1000, 'unixepoch', 'start of month') AS INTEGER) * 1000)
    WHERE id = NEW.account_id;
END;

-- A hold that ends without charging gives its amount back to the counters
-- still in its period (a counter whose period began after the hold was made
-- has already moved on).
DROP TRIGGER holds_end;
CREATE TRIGGER holds_end AFTER UPDATE OF status ON holds
WHEN OLD.status = 'open' AND NEW.status IN ('released', 'expired')
BEGIN
    UPDATE accounts SET
        held = held - OLD.amount,
        spent_day = CASE WHEN spent_day_start <= OLD.created_at THEN max(spent_day - OLD.amount, 0) ELSE spent_day END,
        spent_month = CASE WHEN spent_month_start <= OLD.created_at THEN max(spent_month - OLD.amount, 0) ELSE spent_month END
    WHERE id = OLD.account_id;
END;

-- A capture gives back to the counters what it did not charge, and posts
-- the transaction with the hold's agent and metadata. A fast-path charge is
-- under its approval threshold: auto-approved when the hold was made.
DROP TRIGGER holds_capture;
CREATE TRIGGER holds_capture AFTER UPDATE OF status ON holds
WHEN OLD.status = 'open' AND NEW.status = 'captured'
BEGIN
    UPDATE accounts SET
        held = held - OLD.amount,
        spent_day = CASE WHEN spent_day_start <= OLD.created_at THEN max(spent_day - (OLD.amount - NEW.captured), 0) ELSE spent_day END,
        spent_month = CASE WHEN spent_month_start <= OLD.created_at THEN max(spent_month - (OLD.amount - NEW.captured), 0) ELSE spent_month END
    WHERE id = OLD.account_id;
    INSERT INTO ledger_transactions
        (id, kind, currency, amount, payer, beneficiary, tool, intent_id, payment_id, memo, created_at, legs,
         agent, metadata, approval, approved_by, approved_at)
    SELECT NEW.txn_id, 'capture', w.currency, NEW.captured, NEW.principal, b.name, NEW.tool, NULL, NEW.id,
           NULL, NEW.settled_at, NEW.legs, NEW.agent, NEW.metadata, 'auto_approved', NULL, NEW.created_at
    FROM accounts w JOIN accounts b ON b.id = NEW.beneficiary_account_id AND b.currency = w.currency
    WHERE w.id = NEW.account_id;
    INSERT INTO ledger_entries (txn_id, account_id, amount, role, created_at)
    VALUES (NEW.txn_id, NEW.account_id, -NEW.captured, 'payer', NEW.settled_at);
    -- Without legs (a hold captured by an older tollgate), all to the beneficiary.
    INSERT INTO ledger_entries (txn_id, account_id, amount, role, created_at)
    SELECT NEW.txn_id, NEW.beneficiary_account_id, NEW.captured, 'author', NEW.settled_at
    WHERE NEW.legs IS NULL
    UNION ALL
    SELECT NEW.txn_id, json_extract(l.value, '$[0]'), json_extract(l.value, '$[1]'),
           json_extract(l.value, '$[2]'), NEW.settled_at
    FROM json_each(COALESCE(NEW.legs, '[]')) AS l;
END;
