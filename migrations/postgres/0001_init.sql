-- tollgate store, PostgreSQL. The same tables as the SQLite store: amounts
-- are BIGINT micro-units (10^-6 of the currency's major unit), times Unix
-- milliseconds. Several tollgate instances share one database, so every
-- write is safe at Read Committed (see src/store/postgres).

-- Ledger accounts. A wallet's `balance` is the sum of its posted entries
-- and `held` the sum of its open holds; a wallet can never go below zero.
-- Other accounts (revenue, clearing, external) keep no stored balance: theirs
-- is the sum of their entries, read when needed. Stored, it would be one row
-- that every capture updates, and concurrent captures would queue on its lock.
CREATE TABLE accounts (
    id          BIGSERIAL PRIMARY KEY,
    kind        TEXT   NOT NULL CHECK (kind IN ('wallet', 'revenue', 'clearing', 'external')),
    name        TEXT   NOT NULL,
    currency    TEXT   NOT NULL,
    balance     BIGINT NOT NULL DEFAULT 0,
    held        BIGINT NOT NULL DEFAULT 0 CHECK (held >= 0),
    created_at  BIGINT NOT NULL,
    UNIQUE (kind, name, currency),
    CHECK (kind <> 'wallet' OR balance - held >= 0)
);

-- One row per money movement, with its audit data.
CREATE TABLE ledger_transactions (
    id           TEXT   PRIMARY KEY,
    kind         TEXT   NOT NULL,   -- topup | capture | session_payment | refund
    currency     TEXT   NOT NULL,
    amount       BIGINT NOT NULL,
    payer        TEXT,
    beneficiary  TEXT,
    tool         TEXT,
    intent_id    TEXT,
    payment_id   TEXT,
    memo         TEXT,
    created_at   BIGINT NOT NULL
);

-- Entries are only ever inserted; a correction is a new transaction.
CREATE TABLE ledger_entries (
    id          BIGSERIAL PRIMARY KEY,
    txn_id      TEXT   NOT NULL REFERENCES ledger_transactions (id),
    account_id  BIGINT NOT NULL REFERENCES accounts (id),
    amount      BIGINT NOT NULL,
    created_at  BIGINT NOT NULL
);
CREATE INDEX ledger_entries_account ON ledger_entries (account_id, id);

-- Funds reserved before a tool runs. Ends captured, released or expired.
CREATE TABLE holds (
    id          TEXT   PRIMARY KEY,
    account_id  BIGINT NOT NULL REFERENCES accounts (id),
    amount      BIGINT NOT NULL CHECK (amount > 0),
    status      TEXT   NOT NULL CHECK (status IN ('open', 'captured', 'released', 'expired')),
    captured    BIGINT CHECK (captured IS NULL OR (captured >= 0 AND captured <= amount)),
    principal   TEXT   NOT NULL,
    tool        TEXT   NOT NULL,
    args_hash   TEXT   NOT NULL,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    settled_at  BIGINT,
    beneficiary_account_id BIGINT REFERENCES accounts (id),
    txn_id      TEXT
);
CREATE INDEX holds_open ON holds (expires_at) WHERE status = 'open';

-- One priced call on the slow path, bound to tool, arguments, price and principal.
CREATE TABLE intents (
    id                   TEXT   PRIMARY KEY,
    tool                 TEXT   NOT NULL,
    args_hash            TEXT   NOT NULL,
    args_json            TEXT   NOT NULL,
    amount               BIGINT NOT NULL,
    currency             TEXT   NOT NULL,
    principal            TEXT,
    session_id           TEXT,
    mode                 TEXT   NOT NULL,
    status               TEXT   NOT NULL CHECK (status IN (
        'awaiting_payment', 'paid', 'running', 'succeeded', 'failed',
        'expired', 'cancelled', 'declined')),
    provider             TEXT   NOT NULL,
    provider_session_id  TEXT,
    payment_url          TEXT,
    refund_account_id    BIGINT REFERENCES accounts (id),
    created_at           BIGINT NOT NULL,
    expires_at           BIGINT NOT NULL,
    updated_at           BIGINT NOT NULL
);
CREATE INDEX intents_status ON intents (status, expires_at);

-- The local provider's payment sessions. `owner`: the principal whose API
-- key created it through the sessions API (NULL: this server's own gate).
CREATE TABLE payment_sessions (
    id                 TEXT   PRIMARY KEY,
    amount             BIGINT NOT NULL,
    currency           TEXT   NOT NULL,
    description        TEXT   NOT NULL,
    status             TEXT   NOT NULL CHECK (status IN ('pending', 'paid', 'failed', 'expired', 'cancelled')),
    created_at         BIGINT NOT NULL,
    expires_at         BIGINT NOT NULL,
    updated_at         BIGINT NOT NULL,
    paid_from_account  BIGINT REFERENCES accounts (id),
    owner              TEXT
);

-- The result of an intent's one run, returned to every retry.
CREATE TABLE stored_results (
    intent_id   TEXT    PRIMARY KEY REFERENCES intents (id),
    is_error    BOOLEAN NOT NULL,
    result_json TEXT    NOT NULL,
    created_at  BIGINT  NOT NULL
);

-- API keys for the HTTP service. Only a hash of each key's secret is kept.
CREATE TABLE api_keys (
    id           TEXT   PRIMARY KEY,
    secret_hash  TEXT   NOT NULL,
    principal    TEXT   NOT NULL,
    scopes       TEXT   NOT NULL,
    label        TEXT,
    created_at   BIGINT NOT NULL,
    revoked_at   BIGINT
);

-- Derived balances are kept by the database itself, as on SQLite. The
-- reservation of a hold is not a trigger here: at Read Committed a balance
-- check must be the WHERE of the UPDATE that reserves (it is re-checked on
-- the row's newest version after a wait), so the store does it in one
-- statement (src/store/postgres).
CREATE FUNCTION ledger_entries_post() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE accounts SET balance = balance + NEW.amount WHERE id = NEW.account_id AND kind = 'wallet';
    RETURN NULL;
END $$;
CREATE TRIGGER ledger_entries_post AFTER INSERT ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_entries_post();

CREATE FUNCTION ledger_entries_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger entries are never %; post a correcting transaction',
        CASE TG_OP WHEN 'UPDATE' THEN 'updated' ELSE 'deleted' END;
END $$;
CREATE TRIGGER ledger_entries_never_changed BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_entries_immutable();

CREATE FUNCTION holds_end_once() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'a hold ends exactly once';
END $$;
CREATE TRIGGER holds_end_once BEFORE UPDATE OF status ON holds
    FOR EACH ROW WHEN (OLD.status <> 'open') EXECUTE FUNCTION holds_end_once();

CREATE FUNCTION holds_end() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE accounts SET held = held - OLD.amount WHERE id = OLD.account_id;
    RETURN NULL;
END $$;
CREATE TRIGGER holds_end AFTER UPDATE OF status ON holds
    FOR EACH ROW WHEN (OLD.status = 'open' AND NEW.status IN ('released', 'expired'))
    EXECUTE FUNCTION holds_end();

-- A capture gives the reservation back, then posts its ledger transaction:
-- wallet -> beneficiary, with the hold's audit data. The wallet's row is
-- locked first, then the beneficiary's, always in that order.
CREATE FUNCTION holds_capture() RETURNS trigger LANGUAGE plpgsql AS $$
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
    RETURN NULL;
END $$;
CREATE TRIGGER holds_capture AFTER UPDATE OF status ON holds
    FOR EACH ROW WHEN (OLD.status = 'open' AND NEW.status = 'captured')
    EXECUTE FUNCTION holds_capture();
