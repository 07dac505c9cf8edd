-- Crash recovery and pruning (src/store/recovery.rs).
--
-- Each serving process registers itself in `instances` and renews its lease
-- (`alive_until`) while it runs. The holds it opens and the paid intents it
-- runs carry its id (`holds.owner`, `intents.runner`). Once its lease has
-- lapsed (a crash, a kill -9, a lost machine), any instance releases those
-- holds and refunds those runs: nothing stays reserved or in clearing.
CREATE TABLE instances (
    id          TEXT    PRIMARY KEY,
    started_at  INTEGER NOT NULL,
    alive_until INTEGER NOT NULL
);
ALTER TABLE holds ADD COLUMN owner TEXT;
ALTER TABLE intents ADD COLUMN runner TEXT;
CREATE INDEX intents_running ON intents (runner) WHERE status = 'running';

-- What pruning deletes, by age: stored results, unpaid intents that ended,
-- their sessions, and holds that ended without moving money.
CREATE INDEX stored_results_age ON stored_results (created_at);
CREATE INDEX intents_unpaid_ended ON intents (updated_at) WHERE status IN ('expired', 'cancelled');
CREATE INDEX sessions_unpaid_ended ON payment_sessions (updated_at) WHERE status IN ('expired', 'cancelled');
CREATE INDEX holds_unspent ON holds (settled_at) WHERE status IN ('released', 'expired');
