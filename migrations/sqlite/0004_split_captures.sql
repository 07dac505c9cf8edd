-- A charge is split into legs (src/terms.rs): the author's share, the
-- platform's, commissions, and sub-cent rounding. The capture (one UPDATE of
-- the hold) carries them as JSON, `[[account_id, amount, role], ...]`, and
-- the `holds_capture` trigger posts one entry per leg, in the same statement.
-- Each entry names its role; the transaction keeps the legs, so a statement
-- can show gross, shares and net without reading other entries.
ALTER TABLE holds ADD COLUMN legs TEXT;
ALTER TABLE ledger_transactions ADD COLUMN legs TEXT;
ALTER TABLE ledger_entries ADD COLUMN role TEXT;

DROP TRIGGER holds_capture;
CREATE TRIGGER holds_capture AFTER UPDATE OF status ON holds
WHEN OLD.status = 'open' AND NEW.status = 'captured'
BEGIN
    UPDATE accounts SET held = held - OLD.amount WHERE id = OLD.account_id;
    INSERT INTO ledger_transactions
        (id, kind, currency, amount, payer, beneficiary, tool, intent_id, payment_id, memo, created_at, legs)
    SELECT NEW.txn_id, 'capture', w.currency, NEW.captured, NEW.principal, b.name, NEW.tool, NULL, NEW.id,
           NULL, NEW.settled_at, NEW.legs
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
