-- Only wallets keep a stored balance: theirs is checked in the statement
-- that debits them. Revenue, clearing and external accounts are the sum of
-- their entries, read when needed, so a capture updates no shared row (on
-- PostgreSQL concurrent captures would queue on it; the two backends keep
-- the same rule).
DROP TRIGGER ledger_entries_post;
CREATE TRIGGER ledger_entries_post AFTER INSERT ON ledger_entries
BEGIN
    UPDATE accounts SET balance = balance + NEW.amount
    WHERE id = NEW.account_id AND kind = 'wallet';
END;
UPDATE accounts SET balance = 0 WHERE kind <> 'wallet';
