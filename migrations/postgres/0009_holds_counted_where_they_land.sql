-- A hold that lands after its wallet's spending counters have moved into a
-- later day or month (made just before midnight, in a batch or on an
-- instance behind one made after it) is counted in that period, and made at
-- its start. `holds_end` and `holds_capture` give back to the counters a
-- hold was made in (`spent_day_start <= created_at`): before this, such a
-- hold was stamped with the earlier period and gave nothing back, leaving
-- the new period's cap short. (Only the hold's INSERT changes.)
CREATE OR REPLACE FUNCTION fast_path_batch(
    kinds text[], hold_ids text[], amounts bigint[], ats bigint[],
    principals text[], currencies text[], tools text[], args_hashes text[],
    expiries bigint[], day_starts bigint[], month_starts bigint[],
    agents text[], metadatas text[], owners text[],
    txn_ids text[], beneficiaries bigint[], splits text[])
RETURNS boolean[] LANGUAGE plpgsql AS $$
DECLARE
    done boolean[] := '{}';
    changed integer;
    wallet_id bigint;
    wallet_ids bigint[] := '{}';
BEGIN
    IF cardinality(kinds) > 1 THEN
        -- One lookup per write, by a unique key: a plan cached while a table
        -- was small stays an index scan as it grows (an `= ANY` over the
        -- batch's ids was planned as a scan of the whole holds table).
        FOR i IN 1 .. cardinality(kinds) LOOP
            IF kinds[i] = 'hold' THEN
                SELECT id INTO wallet_id FROM accounts
                WHERE kind = 'wallet' AND name = principals[i] AND currency = currencies[i];
            ELSE
                SELECT account_id INTO wallet_id FROM holds WHERE id = hold_ids[i];
            END IF;
            IF wallet_id IS NOT NULL THEN
                wallet_ids := wallet_ids || wallet_id;
            END IF;
        END LOOP;
        FOREACH wallet_id IN ARRAY ARRAY(SELECT DISTINCT w FROM unnest(wallet_ids) AS w ORDER BY w) LOOP
            PERFORM 1 FROM accounts WHERE id = wallet_id FOR NO KEY UPDATE;
        END LOOP;
    END IF;
    FOR i IN 1 .. cardinality(kinds) LOOP
        IF kinds[i] = 'hold' THEN
            WITH wallet AS (
                UPDATE accounts SET held = held + amounts[i],
                    spent_day = CASE WHEN spent_day_start >= day_starts[i] THEN spent_day ELSE 0 END + amounts[i],
                    spent_day_start = GREATEST(spent_day_start, day_starts[i]),
                    spent_month = CASE WHEN spent_month_start >= month_starts[i] THEN spent_month ELSE 0 END + amounts[i],
                    spent_month_start = GREATEST(spent_month_start, month_starts[i])
                WHERE kind = 'wallet' AND name = principals[i] AND currency = currencies[i]
                  AND balance - held >= amounts[i]
                  AND (per_call_max IS NULL OR amounts[i] <= per_call_max)
                  AND (allowed_tools IS NULL OR allowed_tools::jsonb @> jsonb_build_array(tools[i]))
                  AND (daily_cap IS NULL OR daily_cap >= amounts[i] +
                       CASE WHEN spent_day_start >= day_starts[i] THEN spent_day ELSE 0 END)
                  AND (monthly_cap IS NULL OR monthly_cap >= amounts[i] +
                       CASE WHEN spent_month_start >= month_starts[i] THEN spent_month ELSE 0 END)
                RETURNING id, spent_day_start, spent_month_start)
            INSERT INTO holds (id, account_id, amount, status, principal, tool, args_hash, created_at,
                               expires_at, agent, metadata, owner)
            SELECT hold_ids[i], wallet.id, amounts[i], 'open', principals[i], tools[i], args_hashes[i],
                   GREATEST(ats[i], wallet.spent_day_start, wallet.spent_month_start),
                   expiries[i], agents[i], metadatas[i], owners[i]
            FROM wallet;
        ELSIF kinds[i] = 'capture' THEN
            UPDATE holds SET status = 'captured', captured = amounts[i], settled_at = ats[i],
                             txn_id = txn_ids[i], beneficiary_account_id = beneficiaries[i], legs = splits[i]
            WHERE id = hold_ids[i] AND status = 'open' AND amount >= amounts[i];
        ELSIF kinds[i] = 'release' THEN
            UPDATE holds SET status = 'released', settled_at = ats[i]
            WHERE id = hold_ids[i] AND status = 'open';
        ELSE
            RAISE EXCEPTION 'unknown fast-path op %', kinds[i];
        END IF;
        GET DIAGNOSTICS changed = ROW_COUNT;
        done := done || (changed = 1);
    END LOOP;
    RETURN done;
END $$;
