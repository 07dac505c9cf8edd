-- Paid runs left `running` by a tollgate from before instance leases (no
-- runner was recorded): nobody can finish them, and crash recovery only
-- takes the runs of instances that are gone. They are given to an instance
-- that is never alive, so recovery refunds them.
UPDATE intents SET runner = 'before-leases' WHERE status = 'running' AND runner IS NULL;
