-- Refunds of captured payments (`tollgate refund`): at most once per
-- idempotency key, and never more in all than was captured. Each is also a
-- `refund` ledger transaction that takes back from every leg of the capture
-- its share, and returns it to whoever paid; `reason` is kept here and as
-- the transaction's memo.
CREATE TABLE refunds (
    idempotency_key TEXT    PRIMARY KEY,
    payment_id      TEXT    NOT NULL,
    txn_id          TEXT    NOT NULL REFERENCES ledger_transactions (id),
    amount          BIGINT  NOT NULL CHECK (amount > 0),
    reason          TEXT    NOT NULL,
    created_at      BIGINT  NOT NULL
);
CREATE INDEX refunds_payment ON refunds (payment_id);
