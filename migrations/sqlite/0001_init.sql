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
);
CREATE INDEX ledger_transactions_payment ON ledger_transactions (payment_id);

-- Entries are only ever inserted; a correction is a new transaction.
CREATE TABLE ledger_entries (
    id          INTEGER PRIMARY KEY,
    txn_id      TEXT    NOT NULL REFERENCES ledger_transactions (id),
    account_id  INTEGER NOT NULL REFERENCES accounts (id),
    amount      INTEGER NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE INDEX ledger_entries_account ON ledger_entries (account_id, id);
CREATE INDEX ledger_entries_txn ON ledger_entries (txn_id);

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
    settled_at  INTEGER
);
CREATE INDEX holds_open ON holds (status, expires_at);

-- One priced call on the slow path, bound to tool, arguments, price and principal.
CREATE TABLE intents (
    id                   TEXT    PRIMARY KEY,   -- the payment id clients see
    tool                 TEXT    NOT NULL,
    args_hash            TEXT    NOT NULL,
    args_json            TEXT    NOT NULL,
    amount               INTEGER NOT NULL,
    currency             TEXT    NOT NULL,
    principal            TEXT,                  -- NULL: anonymous
    mode                 TEXT    NOT NULL,
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
