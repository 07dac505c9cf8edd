-- tollgate store, SQLite. Amounts are INTEGER micro-units (10^-6 of the
-- currency's major unit); times are Unix milliseconds.

-- Ledger accounts. `balance` is the sum of the account's posted entries;
-- `held` the sum of its open holds. A wallet can never go below zero.
CREATE TABLE accounts (
    id          INTEGER PRIMARY KEY,
    kind        TEXT    NOT NULL CHECK (kind IN ('wallet', 'revenue', 'clearing', 'external')),
    name        TEXT    NOT NULL,
    currency    TEXT    NOT NULL,
    balance     INTEGER NOT NULL DEFAULT 0,
    held        INTEGER NOT NULL DEFAULT 0 CHECK (held >= 0),
    created_at  INTEGER NOT NULL,
    UNIQUE (kind, name, currency),
    CHECK (kind <> 'wallet' OR balance - held >= 0)
);

-- One row per money movement, with its audit data.
CREATE TABLE ledger_transactions (
    id           TEXT    PRIMARY KEY,
    kind         TEXT    NOT NULL,   -- topup | capture | session_payment | refund
    currency     TEXT    NOT NULL,
    amount       INTEGER NOT NULL,
    payer        TEXT,
    beneficiary  TEXT,
    tool         TEXT,
    intent_id    TEXT,
    payment_id   TEXT,
    memo         TEXT,
    created_at   INTEGER NOT NULL
) WITHOUT ROWID;

-- Entries are only ever inserted; a correction is a new transaction.
CREATE TABLE ledger_entries (
    id          INTEGER PRIMARY KEY,
    txn_id      TEXT    NOT NULL REFERENCES ledger_transactions (id),
    account_id  INTEGER NOT NULL REFERENCES accounts (id),
    amount      INTEGER NOT NULL,
    created_at  INTEGER NOT NULL
);
-- Statements read entries by account. Entries by transaction are only
-- needed by `ledger verify`, which reads them all anyway: no index, one page
-- less to write per posting.
CREATE INDEX ledger_entries_account ON ledger_entries (account_id, id);

-- Funds reserved before a tool runs. Ends captured, released or expired.
CREATE TABLE holds (
    id          TEXT    PRIMARY KEY,
    account_id  INTEGER NOT NULL REFERENCES accounts (id),
    amount      INTEGER NOT NULL CHECK (amount > 0),
    status      TEXT    NOT NULL CHECK (status IN ('open', 'captured', 'released', 'expired')),
    captured    INTEGER CHECK (captured IS NULL OR (captured >= 0 AND captured <= amount)),
    principal   TEXT    NOT NULL,
    tool        TEXT    NOT NULL,
    args_hash   TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    settled_at  INTEGER,
    -- Set by a capture: where the money goes, and the ledger transaction
    -- the `holds_capture` trigger posts.
    beneficiary_account_id INTEGER REFERENCES accounts (id),
    txn_id      TEXT
) WITHOUT ROWID;
-- Only open holds need finding by expiry; the partial index stays small.
CREATE INDEX holds_open ON holds (expires_at) WHERE status = 'open';

-- One priced call on the slow path, bound to tool, arguments, price and principal.
CREATE TABLE intents (
    id                   TEXT    PRIMARY KEY,   -- the payment id clients see
    tool                 TEXT    NOT NULL,
    args_hash            TEXT    NOT NULL,
    args_json            TEXT    NOT NULL,
    amount               INTEGER NOT NULL,
    currency             TEXT    NOT NULL,
    principal            TEXT,                  -- NULL: anonymous
    session_id           TEXT,                  -- the MCP session that opened it
    mode                 TEXT    NOT NULL,      -- the payment mode, or approval
    status               TEXT    NOT NULL CHECK (status IN (
        'awaiting_payment', 'paid', 'running', 'succeeded', 'failed',
        'expired', 'cancelled', 'declined')),
    provider             TEXT    NOT NULL,
    provider_session_id  TEXT,
    payment_url          TEXT,
    refund_account_id    INTEGER REFERENCES accounts (id),
    created_at           INTEGER NOT NULL,
    expires_at           INTEGER NOT NULL,
    updated_at           INTEGER NOT NULL
);
CREATE INDEX intents_status ON intents (status, expires_at);

-- The local provider's payment sessions.
CREATE TABLE payment_sessions (
    id                 TEXT    PRIMARY KEY,
    amount             INTEGER NOT NULL,
    currency           TEXT    NOT NULL,
    description        TEXT    NOT NULL,
    status             TEXT    NOT NULL CHECK (status IN ('pending', 'paid', 'failed', 'expired', 'cancelled')),
    created_at         INTEGER NOT NULL,
    expires_at         INTEGER NOT NULL,
    updated_at         INTEGER NOT NULL,
    paid_from_account  INTEGER REFERENCES accounts (id)
);

-- The result of an intent's one run, returned to every retry.
CREATE TABLE stored_results (
    intent_id   TEXT    PRIMARY KEY REFERENCES intents (id),
    is_error    INTEGER NOT NULL,
    result_json TEXT    NOT NULL,
    created_at  INTEGER NOT NULL
);

-- Derived balances are kept by the database itself, so no code path can
-- post an entry and forget the balance. Hold, capture and release are each a
-- single statement (one round trip, atomic, and taking the write lock at its
-- start); these triggers do the rest of their work inside that statement.
CREATE TRIGGER ledger_entries_post AFTER INSERT ON ledger_entries
BEGIN
    UPDATE accounts SET balance = balance + NEW.amount WHERE id = NEW.account_id;
END;

CREATE TRIGGER ledger_entries_never_updated BEFORE UPDATE ON ledger_entries
BEGIN
    SELECT RAISE(ABORT, 'ledger entries are never updated; post a correcting transaction');
END;

CREATE TRIGGER ledger_entries_never_deleted BEFORE DELETE ON ledger_entries
BEGIN
    SELECT RAISE(ABORT, 'ledger entries are never deleted; post a correcting transaction');
END;

CREATE TRIGGER holds_reserve AFTER INSERT ON holds WHEN NEW.status = 'open'
BEGIN
    UPDATE accounts SET held = held + NEW.amount WHERE id = NEW.account_id;
END;

CREATE TRIGGER holds_end AFTER UPDATE OF status ON holds
WHEN OLD.status = 'open' AND NEW.status IN ('released', 'expired')
BEGIN
    UPDATE accounts SET held = held - OLD.amount WHERE id = OLD.account_id;
END;

-- A capture gives the reservation back, then posts its ledger transaction:
-- wallet -> beneficiary, with the hold's audit data (payer, tool, payment
-- id). One trigger, so the order is fixed: the wallet's CHECK sees the
-- reservation gone before the debit lands.
CREATE TRIGGER holds_capture AFTER UPDATE OF status ON holds
WHEN OLD.status = 'open' AND NEW.status = 'captured'
BEGIN
    UPDATE accounts SET held = held - OLD.amount WHERE id = OLD.account_id;
    INSERT INTO ledger_transactions
        (id, kind, currency, amount, payer, beneficiary, tool, intent_id, payment_id, memo, created_at)
    SELECT NEW.txn_id, 'capture', w.currency, NEW.captured, NEW.principal, b.name, NEW.tool, NULL, NEW.id,
           NULL, NEW.settled_at
    FROM accounts w JOIN accounts b ON b.id = NEW.beneficiary_account_id AND b.currency = w.currency
    WHERE w.id = NEW.account_id;
    INSERT INTO ledger_entries (txn_id, account_id, amount, created_at)
    VALUES (NEW.txn_id, NEW.account_id, -NEW.captured, NEW.settled_at),
           (NEW.txn_id, NEW.beneficiary_account_id, NEW.captured, NEW.settled_at);
END;

CREATE TRIGGER holds_end_once BEFORE UPDATE OF status ON holds WHEN OLD.status <> 'open'
BEGIN
    SELECT RAISE(ABORT, 'a hold ends exactly once');
END;
