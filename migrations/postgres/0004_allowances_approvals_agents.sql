-- Spending limits (src/allowance.rs), approvals, and who called. See the
-- SQLite migration of the same name. Here the hold's reserving UPDATE
-- (src/store/postgres.rs) checks and counts the caps on the wallet's row it
-- locks; the triggers give back what a hold did not spend.
ALTER TABLE accounts ADD COLUMN per_call_max BIGINT;
ALTER TABLE accounts ADD COLUMN daily_cap BIGINT;
ALTER TABLE accounts ADD COLUMN monthly_cap BIGINT;
ALTER TABLE accounts ADD COLUMN allowed_tools TEXT;
ALTER TABLE accounts ADD COLUMN spent_day_start BIGINT NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD COLUMN spent_day BIGINT NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD COLUMN spent_month_start BIGINT NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD COLUMN spent_month BIGINT NOT NULL DEFAULT 0;

ALTER TABLE holds ADD COLUMN agent TEXT;
ALTER TABLE holds ADD COLUMN metadata TEXT;
ALTER TABLE intents ADD COLUMN agent TEXT;
ALTER TABLE intents ADD COLUMN metadata TEXT;
ALTER TABLE ledger_transactions ADD COLUMN agent TEXT;
ALTER TABLE ledger_transactions ADD COLUMN metadata TEXT;

ALTER TABLE intents ADD COLUMN approval TEXT;
ALTER TABLE intents ADD COLUMN approved_by TEXT;
ALTER TABLE intents ADD COLUMN approved_at BIGINT;
ALTER TABLE intents ADD COLUMN approval_rule TEXT;
ALTER TABLE ledger_transactions ADD COLUMN approval TEXT;
ALTER TABLE ledger_transactions ADD COLUMN approved_by TEXT;
ALTER TABLE ledger_transactions ADD COLUMN approved_at BIGINT;
CREATE INDEX intents_principal ON intents (principal, created_at) WHERE approval IS NOT NULL;

CREATE OR REPLACE FUNCTION holds_end() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE accounts SET
        held = held - OLD.amount,
        spent_day = CASE WHEN spent_day_start <= OLD.created_at THEN GREATEST(spent_day - OLD.amount, 0) ELSE spent_day END,
        spent_month = CASE WHEN spent_month_start <= OLD.created_at THEN GREATEST(spent_month - OLD.amount, 0) ELSE spent_month END
    WHERE id = OLD.account_id;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION holds_capture() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE accounts SET
        held = held - OLD.amount,
        spent_day = CASE WHEN spent_day_start <= OLD.created_at THEN GREATEST(spent_day - (OLD.amount - NEW.captured), 0) ELSE spent_day END,
        spent_month = CASE WHEN spent_month_start <= OLD.created_at THEN GREATEST(spent_month - (OLD.amount - NEW.captured), 0) ELSE spent_month END
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
    INSERT INTO ledger_entries (txn_id, account_id, amount, role, created_at)
    SELECT NEW.txn_id, NEW.beneficiary_account_id, NEW.captured, 'author', NEW.settled_at
    WHERE NEW.legs IS NULL
    UNION ALL
    SELECT NEW.txn_id, (l->>0)::bigint, (l->>1)::bigint, l->>2, NEW.settled_at
    FROM jsonb_array_elements(COALESCE(NEW.legs, '[]')::jsonb) AS l;
    RETURN NULL;
END $$;
