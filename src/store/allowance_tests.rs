//! Spending limits in the store, on both backends: checked in the statement
//! that reserves, counted on the wallet's row, given back by releases and
//! by captures below the hold.

use std::sync::Arc;

use super::tests::{
    assert_sound, available, hold_request, intent, outcome, revenue, session, store, units, usd,
};
use super::*;
use crate::allowance::{Limit, Limits, day_start, month_start};

fn limits(per_call: Option<&str>, daily: Option<&str>, tools: Option<&[&str]>) -> Limits {
    Limits {
        per_call: per_call.map(units),
        daily: daily.map(units),
        monthly: None,
        tools: tools.map(|t| t.iter().map(|s| s.to_string()).collect()),
    }
}

fn breach(outcome: HoldOutcome) -> crate::allowance::Breach {
    match outcome {
        HoldOutcome::OverLimit(breach) => breach,
        other => panic!("expected a limit to refuse it, got {other:?}"),
    }
}

async fn spent_today(store: &dyn Store, wallet: &str) -> Units {
    let now = now_ms();
    let wallets = store.limits(wallet).await.expect("limits");
    wallets.first().map_or(Units(0), |w| w.spent.at(now).0)
}

crate::on_both_backends! {
    #[tokio::test]
    async fn limits_are_checked_in_the_hold_and_counted() {
        let (_dir, store) = store().await;
        let wallet = AccountRef::wallet("w", &usd());
        store.topup(&wallet, units("10.00"), None).await.unwrap();
        store
            .set_limits(&wallet, &limits(Some("0.50"), Some("1.00"), None))
            .await
            .unwrap();

        let over = breach(store.hold(&hold_request("big", "w", "0.60")).await.unwrap());
        assert_eq!((over.limit, over.cap), (Limit::PerCall, Some(units("0.50"))));
        assert_eq!(store.hold(&hold_request("h1", "w", "0.40")).await.unwrap(), HoldOutcome::Held);
        assert_eq!(store.hold(&hold_request("h2", "w", "0.40")).await.unwrap(), HoldOutcome::Held);
        let daily = breach(store.hold(&hold_request("h3", "w", "0.40")).await.unwrap());
        assert_eq!((daily.limit, daily.spent), (Limit::Daily, units("0.80")));
        assert_eq!(daily.resets_at, Some(day_start(now_ms()) + 86_400_000));
        assert_eq!(spent_today(&*store, "w").await, units("0.80"));

        // A release gives its amount back; a capture gives back what it did
        // not charge.
        store.release("h1").await.unwrap();
        assert_eq!(spent_today(&*store, "w").await, units("0.40"));
        store.capture("h2", &Charge::whole(revenue(), units("0.10"))).await.unwrap();
        assert_eq!(spent_today(&*store, "w").await, units("0.10"));
        assert_eq!(store.hold(&hold_request("h4", "w", "0.50")).await.unwrap(), HoldOutcome::Held);
        assert_eq!(store.hold(&hold_request("h5", "w", "0.40")).await.unwrap(), HoldOutcome::Held);
        assert_eq!(spent_today(&*store, "w").await, units("1.00"));
        assert_eq!(breach(store.hold(&hold_request("h6", "w", "0.01")).await.unwrap()).limit, Limit::Daily);

        // The allow-list; and a wallet that cannot pay is still just that.
        store
            .set_limits(&wallet, &limits(None, None, Some(&["search"])))
            .await
            .unwrap();
        let listed = breach(store.hold(&hold_request("h7", "w", "0.01")).await.unwrap());
        assert_eq!((listed.limit, listed.tool.as_deref()), (Limit::AllowList, Some("echo")));
        store.set_limits(&wallet, &Limits::default()).await.unwrap();
        assert_eq!(
            store.hold(&hold_request("h8", "w", "100.00")).await.unwrap(),
            HoldOutcome::Insufficient
        );
        // Refusals reserved nothing: 10.00 less the 0.10 captured and the
        // two open holds.
        assert_eq!(available(&*store, "w").await, units("9.00"));
        let shown = store.limits("w").await.unwrap();
        assert_eq!(shown.len(), 1);
        assert!(shown[0].limits.is_empty());
        assert_sound(&*store).await;
    }
}

crate::on_both_backends! {
    #[tokio::test]
    async fn a_wallet_paying_a_session_is_held_to_its_caps() {
        let (_dir, store) = store().await;
        let wallet = AccountRef::wallet("payer", &usd());
        store.topup(&wallet, units("1.00"), None).await.unwrap();
        store
            .set_limits(&wallet, &limits(None, Some("0.08"), None))
            .await
            .unwrap();
        let expires = now_ms() + 60_000;
        store.create_session(&session("a", expires)).await.unwrap();
        store.create_session(&session("b", expires)).await.unwrap();
        store.pay_session("a", Some("payer"), now_ms()).await.unwrap();
        assert_eq!(spent_today(&*store, "payer").await, units("0.05"));
        let err = store.pay_session("b", Some("payer"), now_ms()).await.unwrap_err();
        match err {
            StoreError::OverLimit(b) => assert_eq!((b.limit, b.spent), (Limit::Daily, units("0.05"))),
            other => panic!("expected the daily cap to refuse it, got {other}"),
        }
        assert_eq!(available(&*store, "payer").await, units("0.95"));
        // The session is still payable another way.
        assert_eq!(store.session("b").await.unwrap().unwrap().status, SessionStatus::Pending);
        assert_sound(&*store).await;
    }
}

/// 64 calls at once, of the given amounts, against a daily cap on a wallet
/// that could pay them all: what was held never passes the cap, and every
/// call refused would have passed it.
async fn concurrent_calls_against_a_cap(cap: i64, amounts: Vec<i64>) -> Result<(), String> {
    let (_dir, store) = store().await;
    let wallet = AccountRef::wallet("w", &usd());
    let fail = |e: StoreError| e.to_string();
    store
        .topup(&wallet, Units(amounts.iter().sum::<i64>() + 1), None)
        .await
        .map_err(fail)?;
    let caps = Limits {
        daily: Some(Units(cap)),
        ..Limits::default()
    };
    store.set_limits(&wallet, &caps).await.map_err(fail)?;
    let calls: Vec<_> = amounts
        .iter()
        .enumerate()
        .map(|(i, amount)| {
            let store: Arc<dyn Store> = store.clone();
            let mut request = hold_request(&format!("h{i}"), "w", "0.01");
            request.amount = Units(*amount);
            tokio::spawn(async move { (request.amount.0, store.hold(&request).await) })
        })
        .collect();
    let (mut held, mut refused) = (0i64, Vec::new());
    for call in calls {
        match call.await.map_err(|e| e.to_string())? {
            (amount, Ok(HoldOutcome::Held)) => held += amount,
            (amount, Ok(HoldOutcome::OverLimit(b))) if b.limit == Limit::Daily => {
                refused.push(amount)
            }
            (_, other) => return Err(format!("unexpected outcome {other:?}")),
        }
    }
    if held > cap {
        return Err(format!("held {held} past the cap of {cap}"));
    }
    // Holds only add up here, so a call refused at any moment would still
    // pass the cap on top of the final total.
    if let Some(a) = refused.iter().find(|a| held + **a <= cap) {
        return Err(format!(
            "a call of {a} was refused with {held} of {cap} held"
        ));
    }
    let counted = spent_today(&*store, "w").await;
    if counted != Units(held) {
        return Err(format!("the counter says {counted:?}, the holds {held}"));
    }
    let report = store.verify(now_ms()).await.map_err(fail)?;
    if !report.problems.is_empty() {
        return Err(format!("verify: {:?}", report.problems));
    }
    Ok(())
}

fn concurrent_caps_case(cap: i64, amounts: Vec<i64>) -> Result<(), String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?
        .block_on(concurrent_calls_against_a_cap(cap, amounts))
}

mod caps_under_64_concurrent_calls {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(8))]

        #[test]
        fn sqlite(cap in 1i64..2_000_000, amounts in proptest::collection::vec(1i64..100_000, 64)) {
            crate::testing::select(crate::testing::Backend::Sqlite);
            let result = concurrent_caps_case(cap, amounts);
            prop_assert!(result.is_ok(), "{}", result.unwrap_err());
        }

        #[test]
        #[cfg_attr(
            not(tollgate_pg),
            ignore = "PostgreSQL: set TOLLGATE_TEST_POSTGRES to a server URL to run it"
        )]
        fn postgres(cap in 1i64..2_000_000, amounts in proptest::collection::vec(1i64..100_000, 64)) {
            crate::testing::select(crate::testing::Backend::Postgres);
            let result = concurrent_caps_case(cap, amounts);
            prop_assert!(result.is_ok(), "{}", result.unwrap_err());
        }
    }
}

crate::on_both_backends! {
    /// A payment made just before a day (or month) ends can land after
    /// another has started the next: a write queued behind others, or
    /// another instance. It is then counted in the period under way, and
    /// whatever it does not charge is given back to that period: a released
    /// hold, a capture below its hold, a session's payment refunded. (Each
    /// used to give back nothing, leaving the new period's cap short.)
    #[tokio::test]
    async fn a_payment_counted_in_the_next_period_gives_back_to_it() {
        let (place, store) = store().await;
        let wallet = AccountRef::wallet("w", &usd());
        store.topup(&wallet, units("10.00"), None).await.unwrap();
        let caps = Limits {
            daily: Some(units("5.00")),
            monthly: Some(units("9.00")),
            ..Limits::default()
        };
        store.set_limits(&wallet, &caps).await.unwrap();
        // As if a payment made at the start of the next month had landed
        // first: the counters are in that day and that month.
        let next_month = month_start(month_start(now_ms()) + 40 * 86_400_000);
        let moved = crate::testing::execute(
            &place.db.url,
            &format!(
                "UPDATE accounts SET spent_day_start = {next_month}, spent_day = 1000000,
                        spent_month_start = {next_month}, spent_month = 1000000
                 WHERE kind = 'wallet' AND name = 'w'"
            ),
        )
        .await
        .unwrap();
        assert_eq!(moved, 1);
        let counted = |store: Arc<dyn Store>| async move {
            let spent = store.limits("w").await.unwrap()[0].spent;
            assert_eq!((spent.day_start, spent.month_start), (next_month, next_month));
            (spent.day, spent.month)
        };

        assert_eq!(store.hold(&hold_request("h1", "w", "0.40")).await.unwrap(), HoldOutcome::Held);
        assert_eq!(counted(store.clone()).await, (units("1.40"), units("1.40")));
        store.release("h1").await.unwrap();
        assert_eq!(counted(store.clone()).await, (units("1.00"), units("1.00")), "released");

        assert_eq!(store.hold(&hold_request("h2", "w", "0.40")).await.unwrap(), HoldOutcome::Held);
        store.capture("h2", &Charge::whole(revenue(), units("0.10"))).await.unwrap();
        assert_eq!(counted(store.clone()).await, (units("1.10"), units("1.10")), "captured 0.10");

        store.create_session(&session("s", now_ms() + 60_000)).await.unwrap();
        store.create_intent(&intent("s"), &OpenLimit::NONE).await.unwrap();
        store.pay_session("s", Some("w"), now_ms()).await.unwrap();
        assert_eq!(counted(store.clone()).await, (units("1.15"), units("1.15")), "paid 0.05");
        let funding = Funding::InClearing {
            refund_to: Some(wallet.clone()),
        };
        assert!(store.claim_paid_intent("s", &funding).await.unwrap());
        store.finish_intent(&outcome("s", false)).await.unwrap();
        assert_eq!(counted(store.clone()).await, (units("1.10"), units("1.10")), "refunded");

        assert_eq!(available(&*store, "w").await, units("9.90"));
        assert_sound(&*store).await;
    }
}
