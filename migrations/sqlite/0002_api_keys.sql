-- API keys for the HTTP service. Only a hash of each key's secret is kept.
CREATE TABLE api_keys (
    id           TEXT    PRIMARY KEY,   -- the key's public part, `key_…`
    secret_hash  TEXT    NOT NULL,      -- hex SHA-256 of the secret part
    principal    TEXT    NOT NULL,      -- who pays when this key calls
    scopes       TEXT    NOT NULL,      -- space-separated: mcp sessions:create sessions:read admin
    label        TEXT,
    created_at   INTEGER NOT NULL,
    revoked_at   INTEGER
) WITHOUT ROWID;

-- Sessions created through the sessions API belong to the key's principal,
-- who alone may read them. NULL: opened by this server's own gate.
ALTER TABLE payment_sessions ADD COLUMN owner TEXT;
