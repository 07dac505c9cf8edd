-- Holds left open by a tollgate from before instance leases (no owner was
-- recorded): that tollgate is stopped before the upgrade, so their calls
-- never finished, but recovery only takes the holds of instances that are
-- gone, and they waited for their expiry instead, the wallet short until
-- then. They are given to the instance that is never alive (as the runs of
-- `runs_from_before_leases` are), so recovery releases them.
UPDATE holds SET owner = 'before-leases' WHERE status = 'open' AND owner IS NULL;
