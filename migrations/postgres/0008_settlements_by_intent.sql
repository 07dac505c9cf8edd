-- A wallet's statement shows the split of a session it paid, which the
-- intent's settlement (a later transaction, out of clearing) posts: found
-- by intent.
-- Fast-path captures, which have no intent, are left out: they would pay an
-- index write each.
CREATE INDEX ledger_transactions_settlement ON ledger_transactions (intent_id)
    WHERE kind = 'capture' AND intent_id IS NOT NULL;
