//! Ledger and state-machine tests against a real SQLite file and, when
//! `TOLLGATE_TEST_POSTGRES` is set, a real PostgreSQL database.

use std::sync::Arc;

use super::*;
use crate::testing::TestDb;

/// Keeps a test's database (and its directory) alive.
pub(super) struct Place {
    pub(super) db: TestDb,
    _dir: tempfile::TempDir,
}

pub(super) async fn store() -> (Place, Arc<dyn Store>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = TestDb::fresh(dir.path());
    let store = open(&db.url).await.expect("connect");
    (Place { db, _dir: dir }, store)
}

/// Another store on the same database, as another server instance has.
async fn open(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    crate::testing::open_store(url).await
}

pub(super) fn usd() -> Currency {
    Currency::parse("USD").expect("usd")
}

pub(super) fn units(s: &str) -> Units {
    Units::parse(s).expect("amount")
}

pub(super) fn revenue() -> AccountRef {
    AccountRef::new(AccountKind::Revenue, "author", &usd())
}

pub(super) fn hold_request(id: &str, wallet: &str, amount: &str) -> HoldRequest {
    HoldRequest {
        hold_id: id.into(),
        principal: wallet.into(),
        amount: units(amount),
        currency: usd(),
        tool: "echo".into(),
        args_hash: "h".into(),
        expires_at: now_ms() + 60_000,
        origin: Origin::default(),
    }
}

/// Tops up USD wallet `wallet` with `amount`.
pub(super) async fn top_up(store: &dyn Store, wallet: &str, amount: &str) {
    store
        .topup(&AccountRef::wallet(wallet, &usd()), units(amount), None)
        .await
        .unwrap();
}

pub(super) async fn available(store: &dyn Store, wallet: &str) -> Units {
    store
        .balances(wallet)
        .await
        .expect("balances")
        .first()
        .map_or(Units(0), |b| b.available)
}

pub(super) async fn assert_sound(store: &dyn Store) {
    let report = store.verify(now_ms()).await.expect("verify");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

crate::on_both_backends! {
    #[tokio::test]
    async fn hold_capture_release_move_exactly_the_right_amounts() {
        let (_dir, store) = store().await;
        top_up(&*store, "w", "1.00").await;

        assert_eq!(
            store.hold(&hold_request("h1", "w", "0.30")).await.unwrap(),
            HoldOutcome::Held
        );
        let b = &store.balances("w").await.unwrap()[0];
        assert_eq!(
            (b.balance, b.held, b.available),
            (units("1.00"), units("0.30"), units("0.70"))
        );

        // A capture may take less than the hold, never more.
        let err = store
            .capture("h1", &Charge::whole(revenue(), units("0.31")))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("above the hold"), "{err}");
        store
            .capture("h1", &Charge::whole(revenue(), units("0.25")))
            .await
            .unwrap();
        assert_eq!(available(&*store, "w").await, units("0.75"));

        // A hold ends exactly once.
        assert!(matches!(
            store.release("h1").await,
            Err(StoreError::WrongState { .. })
        ));
        assert!(matches!(
            store.capture("h1", &Charge::whole(revenue(), units("0.01"))).await,
            Err(StoreError::WrongState { .. })
        ));
        assert!(matches!(
            store.release("nope").await,
            Err(StoreError::NotFound(_))
        ));

        store.hold(&hold_request("h2", "w", "0.75")).await.unwrap();
        assert_eq!(available(&*store, "w").await, Units(0));
        assert_eq!(
            store.hold(&hold_request("h3", "w", "0.01")).await.unwrap(),
            HoldOutcome::Insufficient
        );
        store.release("h2").await.unwrap();
        assert_eq!(available(&*store, "w").await, units("0.75"));
        assert_eq!(
            store
                .hold(&hold_request("h4", "nobody", "0.01"))
                .await
                .unwrap(),
            HoldOutcome::Insufficient
        );

        let lines = store.statement(AccountKind::Wallet, "w").await.unwrap();
        let amounts: Vec<(String, i64)> = lines.iter().map(|l| (l.kind.clone(), l.amount)).collect();
        assert_eq!(
            amounts,
            [("topup".into(), 1_000_000), ("capture".into(), -250_000)]
        );
        assert_eq!(lines[1].payment_id.as_deref(), Some("h1"));
        assert_sound(&*store).await;
    }
}

crate::on_both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_holds_never_overdraw() {
        let (_dir, store) = store().await;
        top_up(&*store, "w", "0.20").await;
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    let id = format!("h{i}");
                    let held =
                        store.hold(&hold_request(&id, "w", "0.01")).await.unwrap() == HoldOutcome::Held;
                    if held {
                        store.capture(&id, &Charge::whole(revenue(), units("0.01"))).await.unwrap();
                    }
                    held
                })
            })
            .collect();
        let mut charged = 0;
        for t in tasks {
            charged += usize::from(t.await.unwrap());
        }
        assert_eq!(charged, 20);
        assert_eq!(available(&*store, "w").await, Units(0));
        assert_sound(&*store).await;
    }
}

pub(super) fn intent(id: &str) -> Intent {
    Intent {
        id: id.into(),
        tool: "echo".into(),
        args_hash: "h".into(),
        args_json: "{}".into(),
        amount: units("0.05"),
        currency: usd(),
        principal: Some("alice".into()),
        session_id: None,
        mode: "two_step".into(),
        status: IntentStatus::AwaitingPayment,
        provider: "local".into(),
        provider_session_id: Some(id.into()),
        payment_url: None,
        created_at: now_ms(),
        expires_at: now_ms() + 60_000,
        origin: Origin::default(),
        approval: Some(Approval::new(ApprovalStatus::Waiting, None)),
    }
}

pub(super) fn session(id: &str, expires_at: i64) -> LocalSession {
    LocalSession {
        id: id.into(),
        amount: units("0.05"),
        currency: usd(),
        description: "test".into(),
        status: SessionStatus::Pending,
        created_at: now_ms(),
        expires_at,
        paid_from: None,
        owner: None,
    }
}

pub(super) fn outcome(id: &str, succeeded: bool) -> IntentOutcome {
    IntentOutcome {
        intent_id: id.into(),
        succeeded,
        result_json: "{}".into(),
        charge: Charge::whole(revenue(), units("0.05")),
        txn_id: new_txn_id(),
        at: now_ms(),
        not_run: None,
    }
}

crate::on_both_backends! {
    /// A caller's payments waiting are capped when they open at once, from
    /// two instances; anonymous callers have one cap per MCP session and
    /// one between them.
    #[tokio::test]
    async fn intents_racing_each_other_stay_within_their_callers_limit() {
        let (place, store) = store().await;
        let other = open(&place.db.url).await.unwrap();
        let limit = OpenLimit { per_caller: 3, anonymous: 4 };
        let opened = futures::future::join_all((0..24).map(|n| {
            let store = if n % 2 == 0 { store.clone() } else { other.clone() };
            async move { store.create_intent(&intent(&format!("race{n}")), &limit).await.unwrap() }
        }))
        .await;
        assert_eq!(opened.iter().filter(|&&o| o).count(), 3, "{opened:?}");
        let open = store.open_intents(Some("alice"), "any", now_ms()).await.unwrap();
        assert_eq!(open, OpenIntents { caller: 3, anonymous: 0 });
        assert!(open.at(&limit));

        // Anonymous callers: 3 in one session at most, 4 between sessions.
        let anonymous = |id: &str, session: &str| Intent {
            principal: None,
            session_id: Some(session.into()),
            ..intent(id)
        };
        for (id, session, expected) in [
            ("a1", "s1", true), ("a2", "s1", true), ("a3", "s1", true), ("a4", "s1", false),
            ("b1", "s2", true), ("b2", "s2", false),
        ] {
            let opened = store.create_intent(&anonymous(id, session), &limit).await.unwrap();
            assert_eq!(opened, expected, "{id}");
        }
        let open = store.open_intents(None, "s2", now_ms()).await.unwrap();
        assert_eq!(open, OpenIntents { caller: 1, anonymous: 4 });
        assert!(open.at(&limit), "anonymous callers are at theirs");
        // Alice's limit is her own.
        assert!(!store.create_intent(&intent("alice4"), &limit).await.unwrap());
        let bob = Intent { principal: Some("bob".into()), ..intent("bob1") };
        assert!(store.create_intent(&bob, &limit).await.unwrap());
        // Expired ones do not count.
        let past = Intent { expires_at: now_ms() - 1, ..anonymous("old", "s3") };
        store.create_intent(&past, &OpenLimit::NONE).await.unwrap();
        assert_eq!(store.open_intents(None, "s3", now_ms()).await.unwrap().caller, 0);
    }
}

crate::on_both_backends! {
    #[tokio::test]
    async fn intents_move_only_along_their_state_machine() {
        let (_dir, store) = store().await;
        top_up(&*store, "payer", "1.00").await;
        for id in ["a", "b"] {
            store
                .create_session(&session(id, now_ms() + 60_000))
                .await
                .unwrap();
            store.create_intent(&intent(id), &OpenLimit::NONE).await.unwrap();
        }

        // Cannot run or finish before being paid.
        assert!(
            !store
                .transition_intent("a", IntentStatus::Paid, IntentStatus::Running)
                .await
                .unwrap()
        );
        assert!(store.finish_intent(&outcome("a", true)).await.is_err());

        let refund_to = AccountRef::wallet("payer", &usd());
        store
            .pay_session("a", Some("payer"), now_ms())
            .await
            .unwrap();
        assert_eq!(available(&*store, "payer").await, units("0.95"));
        // Paid: claimed for its one run, in the one write.
        assert!(
            store
                .claim_paid_intent(
                    "a",
                    &Funding::InClearing {
                        refund_to: Some(refund_to.clone())
                    }
                )
                .await
                .unwrap()
        );
        assert_eq!(
            store.intent("a").await.unwrap().unwrap().status,
            IntentStatus::Running
        );
        assert!(
            !store
                .claim_paid_intent(
                    "a",
                    &Funding::InClearing {
                        refund_to: Some(refund_to.clone())
                    }
                )
                .await
                .unwrap(),
            "claimed once"
        );
        store.finish_intent(&outcome("a", true)).await.unwrap();
        assert!(
            store.finish_intent(&outcome("a", true)).await.is_err(),
            "finishes once"
        );
        assert_eq!(
            store.intent("a").await.unwrap().unwrap().status,
            IntentStatus::Succeeded
        );
        assert!(store.stored_result("a").await.unwrap().is_some());

        // A failed run is refunded to whoever paid.
        store
            .pay_session("b", Some("payer"), now_ms())
            .await
            .unwrap();
        assert!(
            store
                .claim_paid_intent(
                    "b",
                    &Funding::InClearing {
                        refund_to: Some(refund_to.clone()),
                    },
                )
                .await
                .unwrap()
        );
        store.finish_intent(&outcome("b", false)).await.unwrap();
        assert_eq!(available(&*store, "payer").await, units("0.95"));
        let kinds: Vec<String> = store
            .statement(AccountKind::Wallet, "payer")
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.kind)
            .collect();
        assert_eq!(
            kinds,
            ["topup", "session_payment", "session_payment", "refund"]
        );
        assert_sound(&*store).await;
    }
}

crate::on_both_backends! {
    /// A session paid one day and settled the next (a metered run: 0.03 of
    /// the 0.05 paid, the rest given back). Each period shows the split by
    /// the day it happened: a statement up to the first day has the
    /// payment unsettled, one from the second has the split on a line of
    /// its own, and the whole has it once, on the payment, with totals
    /// that come to the wallet's balance.
    #[tokio::test]
    async fn a_statement_dates_a_sessions_split_by_its_settlement() {
        use crate::statement::{Filter, render};
        let (_dir, store) = store().await;
        top_up(&*store, "payer", "1.00").await;
        let day = 86_400_000;
        let settled_at = now_ms();
        let paid_at = settled_at - day;
        let between = paid_at + day / 2;
        store.create_session(&session("s", settled_at + 60_000)).await.unwrap();
        store.create_intent(&intent("s"), &OpenLimit::NONE).await.unwrap();
        store.pay_session("s", Some("payer"), paid_at).await.unwrap();
        let funding = Funding::InClearing {
            refund_to: Some(AccountRef::wallet("payer", &usd())),
        };
        assert!(store.claim_paid_intent("s", &funding).await.unwrap());
        let metered = IntentOutcome {
            charge: Charge::whole(revenue(), units("0.03")),
            at: settled_at,
            ..outcome("s", true)
        };
        store.finish_intent(&metered).await.unwrap();

        let lines = store.statement(AccountKind::Wallet, "payer").await.unwrap();
        let payment = lines.iter().find(|l| l.kind == "session_payment").unwrap();
        assert_eq!((payment.at, payment.legs_at), (paid_at, Some(settled_at)));
        let statement = |since, until| render("wallet:payer", &lines, &Filter { tool: None, since, until });

        let first_day = statement(None, Some(between));
        assert!(first_day.ends_with("total: -0.05 USD over 1 line(s)\n"), "{first_day}");
        assert!(!first_day.contains("charge 0.03"), "{first_day}");

        let second_day = statement(Some(between), None);
        let settlement = second_day.lines().find(|l| l.contains(" settlement ")).expect(&second_day);
        assert!(settlement.contains("0.00  USD"), "{settlement}");
        assert!(settlement.contains("charge 0.03 = author 0.03"), "{settlement}");
        assert!(settlement.contains(&format!("for the payment of {}", rfc3339(paid_at))), "{settlement}");
        assert!(
            second_day.ends_with("total: 1.02 USD over 3 line(s); the split charges came to 0.03 USD\n"),
            "{second_day}"
        );

        let whole = statement(None, None);
        assert!(!whole.contains(" settlement "), "{whole}");
        assert_eq!(whole.matches("charge 0.03 = author 0.03").count(), 1, "{whole}");
        assert!(
            whole.ends_with("total: 0.97 USD over 3 line(s); the split charges came to 0.03 USD\n"),
            "{whole}"
        );
        assert_eq!(available(&*store, "payer").await, units("0.97"));
        assert_sound(&*store).await;
    }
}

crate::on_both_backends! {
    #[tokio::test]
    async fn sessions_refuse_bad_payments_without_changing_anything() {
        let (_dir, store) = store().await;
        top_up(&*store, "poor", "0.01").await;
        store
            .create_session(&session("s", now_ms() + 60_000))
            .await
            .unwrap();

        let err = store
            .pay_session("s", Some("poor"), now_ms())
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::InsufficientFunds { .. }), "{err}");
        assert_eq!(
            store.session("s").await.unwrap().unwrap().status,
            SessionStatus::Pending
        );
        assert_eq!(available(&*store, "poor").await, units("0.01"));
        assert!(matches!(
            store.pay_session("missing", None, now_ms()).await,
            Err(StoreError::NotFound(_))
        ));

        store.pay_session("s", None, now_ms()).await.unwrap();
        assert!(matches!(
            store.pay_session("s", None, now_ms()).await,
            Err(StoreError::WrongState { .. })
        ));
        assert!(
            !store
                .end_session("s", SessionStatus::Cancelled)
                .await
                .unwrap(),
            "paid stays paid"
        );

        store
            .create_session(&session("late", now_ms() - 1))
            .await
            .unwrap();
        let err = store.pay_session("late", None, now_ms()).await.unwrap_err();
        assert!(err.to_string().contains("expired"), "{err}");
        assert_eq!(
            store.session("late").await.unwrap().unwrap().status,
            SessionStatus::Expired
        );
        assert_sound(&*store).await;
    }
}

crate::on_both_backends! {
    #[tokio::test]
    async fn the_sweep_expires_what_is_past_its_time_and_nothing_else() {
        let (_dir, store) = store().await;
        top_up(&*store, "w", "1.00").await;
        let mut stale = hold_request("stale", "w", "0.40");
        // Long enough ago for `ledger verify` to count it (past its grace).
        stale.expires_at = now_ms() - 10 * 60_000;
        store.hold(&stale).await.unwrap();
        store
            .hold(&hold_request("fresh", "w", "0.10"))
            .await
            .unwrap();
        assert!(
            !store.verify(now_ms()).await.unwrap().problems.is_empty(),
            "a stale hold is a problem"
        );

        // An expired intent whose session was paid in time is kept for its caller.
        for id in ["unpaid", "paid"] {
            store
                .create_session(&session(id, now_ms() + 60_000))
                .await
                .unwrap();
            let mut i = intent(id);
            i.expires_at = now_ms() - 1;
            store.create_intent(&i, &OpenLimit::NONE).await.unwrap();
        }
        store.pay_session("paid", None, now_ms()).await.unwrap();

        let (log, logging) = crate::testing::LogCapture::start();
        assert_eq!(store.sweep_expired(now_ms()).await.unwrap(), 1);
        drop(logging);
        // Each end is logged with its payment id, so the id leads to it.
        let line = |id: &str| log.lines_of(id).join("\n");
        assert!(line("stale").contains("hold expired"), "{}", log.text());
        assert!(line("unpaid").contains("expired unpaid"), "{}", log.text());
        assert_eq!(line("paid"), "", "{}", log.text());
        assert_eq!(available(&*store, "w").await, units("0.90"));
        assert_eq!(
            store.intent("unpaid").await.unwrap().unwrap().status,
            IntentStatus::Expired
        );
        assert_eq!(
            store.intent("paid").await.unwrap().unwrap().status,
            IntentStatus::AwaitingPayment
        );
        assert_eq!(
            store.sweep_expired(now_ms()).await.unwrap(),
            0,
            "each expiry happens once"
        );
        store.release("fresh").await.unwrap();
        assert_sound(&*store).await;
    }
}

crate::on_both_backends! {
    #[tokio::test]
    async fn ledger_entries_cannot_be_rewritten() {
        let (place, store) = store().await;
        top_up(&*store, "w", "1.00").await;
        let update = crate::testing::execute(&place.db.url, "UPDATE ledger_entries SET amount = 0").await;
        assert!(update.unwrap_err().to_string().contains("never updated"));
        let delete = crate::testing::execute(&place.db.url, "DELETE FROM ledger_entries").await;
        assert!(delete.unwrap_err().to_string().contains("never deleted"));
        assert_sound(&*store).await;
    }
}

crate::on_both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn instances_starting_at_once_share_one_migrated_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = TestDb::fresh(dir.path());
        let (a, b) = tokio::join!(open(&db.url), open(&db.url));
        let (a, b) = (a.expect("first instance"), b.expect("second instance"));
        top_up(&*a, "w", "1.00").await;
        assert_eq!(available(&*b, "w").await, units("1.00"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_brand_new_wallet_charged_from_two_instances_never_overdraws() {
        let (place, a) = store().await;
        let b = open(&place.db.url).await.expect("second instance");
        // The wallet does not exist yet: its top-up races its first holds.
        let mut tasks = Vec::new();
        for i in 0..24 {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            tasks.push(tokio::spawn(async move {
                if i == 5 {
                    top_up(&*store, "new", "0.10").await;
                    return false;
                }
                let held = store
                    .hold(&hold_request(&format!("h{i}"), "new", "0.01"))
                    .await
                    .unwrap();
                held == HoldOutcome::Held
            }));
        }
        let mut held = 0;
        for task in tasks {
            held += usize::from(task.await.unwrap());
        }
        assert!(held <= 10, "{held} holds of 0.01 on 0.10");
        assert_eq!(
            available(&*a, "new").await,
            Units(units("0.10").0 - held as i64 * units("0.01").0)
        );
        assert_sound(&*a).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sweeps_on_every_instance_expire_each_hold_once() {
        let (place, a) = store().await;
        let b = open(&place.db.url).await.expect("second instance");
        top_up(&*a, "w", "1.00").await;
        for i in 0..40 {
            let mut request = hold_request(&format!("h{i}"), "w", "0.01");
            request.expires_at = now_ms() - 1;
            assert_eq!(a.hold(&request).await.unwrap(), HoldOutcome::Held);
        }
        assert_eq!(available(&*a, "w").await, units("0.60"));
        let sweeps = (0..8).map(|i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move { store.sweep_expired(now_ms()).await.unwrap() })
        });
        let mut expired = 0;
        for sweep in sweeps {
            expired += sweep.await.unwrap();
        }
        assert_eq!(expired, 40, "each hold expired exactly once");
        assert_eq!(available(&*b, "w").await, units("1.00"));
        assert_sound(&*a).await;
    }
}

/// The terms of a tool with every kind of fee.
fn fee_terms() -> crate::terms::Terms {
    use crate::terms::{Fee, Terms};
    let fee = |text: &str| Some(Fee::parse(text, &usd()).expect("fee"));
    Terms {
        platform_share: fee("10%"),
        commission_in: fee("2.5%"),
        commission_out: fee("0.01"),
        ..Terms::plain("alice")
    }
}

/// What an account's entries add up to.
pub(super) async fn posted(store: &dyn Store, kind: AccountKind, name: &str) -> i64 {
    let lines = store.statement(kind, name).await.expect("statement");
    lines.iter().map(|l| l.amount).sum()
}

crate::on_both_backends! {
    #[tokio::test]
    async fn a_split_capture_posts_every_leg_in_one_transaction() {
        use crate::terms::Role;
        let (_dir, store) = store().await;
        let usd = usd();
        top_up(&*store, "w", "10.00").await;
        let terms = fee_terms();
        // A metered call: the most it can cost is held, plus the fee.
        let held = terms.payer_pays(units("1.00"), &usd);
        assert_eq!(held, units("1.01"));
        store.hold(&hold_request("h1", "w", "1.01")).await.unwrap();
        let split = terms.split(units("1.00"), &usd);
        let charge = Charge::of(&split, "alice", &usd);
        let posted_txn = store.capture("h1", &charge).await.unwrap();
        // 1.00 at 10% and 2.5%: the cent left after rounding down goes to
        // the author (tied at half a cent with the commission, listed first).
        assert_eq!(split.leg(Role::Author), units("0.88"));
        assert_eq!(available(&*store, "w").await, units("8.99"));
        assert_eq!(posted(&*store, AccountKind::Revenue, "alice").await, 880_000);
        assert_eq!(posted(&*store, AccountKind::Revenue, "platform").await, 100_000);
        assert_eq!(posted(&*store, AccountKind::Revenue, "commissions").await, 30_000);

        // A sub-cent metered charge: the part below a cent goes to rounding.
        store.hold(&hold_request("h2", "w", "0.06")).await.unwrap();
        let split = terms.split(units("0.0123"), &usd);
        store
            .capture("h2", &Charge::of(&split, "alice", &usd))
            .await
            .unwrap();
        assert_eq!(available(&*store, "w").await, units("8.9677"));
        assert_eq!(posted(&*store, AccountKind::Revenue, "rounding").await, 2_300);

        // The author's statement shows each capture's legs.
        let lines = store.statement(AccountKind::Revenue, "alice").await.unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].txn_id, posted_txn.txn_id);
        assert_eq!(lines[0].role.as_deref(), Some("author"));
        let legs: std::collections::HashMap<_, _> = lines[0].legs.iter().cloned().collect();
        assert_eq!(legs["platform_share"], units("0.10"));
        assert_eq!(legs["commission_in"], units("0.02"));
        assert_eq!(legs["commission_out"], units("0.01"));
        // A retried capture answers with the first; a capture above the
        // hold changes nothing.
        assert_eq!(
            store.capture("h1", &charge).await.unwrap().txn_id,
            posted_txn.txn_id
        );
        store.hold(&hold_request("h3", "w", "0.50")).await.unwrap();
        let over = Charge::of(&terms.split(units("0.50"), &usd), "alice", &usd);
        assert!(store.capture("h3", &over).await.unwrap_err().to_string().contains("above the hold"));
        store.release("h3").await.unwrap();
        assert_eq!(available(&*store, "w").await, units("8.9677"));

        // Refunded in parts, each commission comes back under its own role,
        // though both went to one account, and in all exactly what it earned.
        for (key, amount) in [("r1", Some("0.37")), ("r2", Some("0.29")), ("r3", None)] {
            let refund = RefundRequest {
                payment_id: "h1".into(),
                amount: amount.map(units),
                reason: "test".into(),
                idempotency_key: key.into(),
                restores_allowance: false,
            };
            store.refund(&refund).await.unwrap();
        }
        let mut taken = std::collections::BTreeMap::<Option<String>, i64>::new();
        for line in store.statement(AccountKind::Revenue, "commissions").await.unwrap() {
            if line.amount < 0 {
                *taken.entry(line.role).or_default() += line.amount;
            }
        }
        assert_eq!(
            taken.into_iter().collect::<Vec<_>>(),
            [(Some("commission_in".to_owned()), -20_000), (Some("commission_out".to_owned()), -10_000)]
        );
        assert_sound(&*store).await;
    }
}

crate::on_both_backends! {
    #[tokio::test]
    async fn an_intent_whose_session_was_paid_is_not_ended_unpaid() {
        let (_dir, store) = store().await;
        for id in ["unpaid", "paid"] {
            store.create_session(&session(id, now_ms() + 60_000)).await.unwrap();
            store.create_intent(&intent(id), &OpenLimit::NONE).await.unwrap();
        }
        store.pay_session("paid", None, now_ms()).await.unwrap();
        let status = async |id: &str| store.intent(id).await.unwrap().unwrap().status;

        // A refusal or an expiry that comes after the payment does not end
        // the intent: its money, in clearing, stays claimable.
        for to in [IntentStatus::Declined, IntentStatus::Cancelled, IntentStatus::Expired] {
            assert!(!store.end_unpaid_intent("paid", to).await.unwrap(), "{to:?}");
        }
        assert_eq!(status("paid").await, IntentStatus::AwaitingPayment);
        let funding = Funding::InClearing { refund_to: None };
        assert!(store.claim_paid_intent("paid", &funding).await.unwrap());
        store.finish_intent(&outcome("paid", true)).await.unwrap();

        assert!(store.end_unpaid_intent("unpaid", IntentStatus::Declined).await.unwrap());
        assert_eq!(status("unpaid").await, IntentStatus::Declined);
        assert!(
            !store.end_unpaid_intent("unpaid", IntentStatus::Cancelled).await.unwrap(),
            "an intent ends once"
        );
        assert_sound(&*store).await;
    }
}

crate::on_both_backends! {
    /// A principal's approvals are the decisions asked of a person: the
    /// payments that went through under their threshold are not among
    /// them, so they cannot crowd the decisions out of the newest 500.
    #[tokio::test]
    async fn approvals_are_the_decisions_not_the_auto_approved_payments() {
        let (_dir, store) = store().await;
        for (id, status) in [
            ("asked", ApprovalStatus::Waiting),
            ("under", ApprovalStatus::AutoApproved),
        ] {
            let mut i = intent(id);
            i.approval = Some(Approval::new(status, None));
            store.create_intent(&i, &OpenLimit::NONE).await.unwrap();
        }
        let ids: Vec<String> = store
            .approvals("alice")
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.id)
            .collect();
        assert_eq!(ids, ["asked"]);
    }
}

crate::on_both_backends! {
    /// A wallet holds at most a trillion: a top-up past that is refused and
    /// changes nothing (SQLite would have turned the overflowing balance
    /// into an inexact number, PostgreSQL refused it with an opaque error).
    #[tokio::test]
    async fn a_topup_past_the_largest_balance_is_refused() {
        let (_dir, store) = store().await;
        let wallet = AccountRef::wallet("rich", &usd());
        store.topup(&wallet, units("999999999999.99"), None).await.unwrap();
        for more in ["0.02", "999999999999"] {
            let refused = store.topup(&wallet, units(more), None).await;
            assert!(
                matches!(&refused, Err(StoreError::Invalid(why)) if why.contains("at most 1000000000000")),
                "{refused:?}"
            );
        }
        store.topup(&wallet, units("0.01"), None).await.unwrap();
        assert_eq!(available(&*store, "rich").await, units("1000000000000"));
        assert_sound(&*store).await;
    }
}

crate::on_both_backends! {
    /// Paid, never redeemed intents come a page at a time, oldest first,
    /// each page starting after the last one's end: every one once,
    /// including two whose time ended at the same moment.
    #[tokio::test]
    async fn unredeemed_intents_come_page_after_page_each_once() {
        let (_dir, store) = store().await;
        let ended = now_ms() - 1_000;
        // (id, expires_at, paid): two share an end, one was never paid,
        // one ends after `before`.
        let intents = [
            ("b", ended - 30, true),
            ("a", ended - 20, true),
            ("d", ended - 10, true),
            ("c", ended - 10, true),
            ("unpaid", ended - 5, false),
            ("later", now_ms() + 60_000, true),
        ];
        for (id, expires_at, paid) in intents {
            store.create_session(&session(id, now_ms() + 60_000)).await.unwrap();
            store.create_intent(&Intent { expires_at, ..intent(id) }, &OpenLimit::NONE).await.unwrap();
            if paid {
                store.pay_session(id, None, now_ms()).await.unwrap();
            }
        }
        let ids = |page: &[Intent]| page.iter().map(|i| i.id.clone()).collect::<Vec<_>>();
        let all = store.unredeemed(ended, &Cursor::start()).await.unwrap();
        assert_eq!(ids(&all), ["b", "a", "c", "d"]);
        let rest = store.unredeemed(ended, &Cursor::after(&all[2])).await.unwrap();
        assert_eq!(ids(&rest), ["d"], "after c, its twin d");
        let rest = store.unredeemed(ended, &Cursor::after(&all[0])).await.unwrap();
        assert_eq!(ids(&rest), ["a", "c", "d"]);
        assert!(store.unredeemed(ended, &Cursor::after(&all[3])).await.unwrap().is_empty());
    }
}

crate::on_both_backends! {
    /// Intents awaiting a remote payment past their time come a page at a
    /// time too: those the provider leaves open (a remote session still
    /// pending) do not hide the ones after them.
    #[tokio::test]
    async fn remote_intents_past_their_time_come_page_after_page() {
        let (_dir, store) = store().await;
        let ended = now_ms() - 1_000;
        for (id, expires_at) in [("r2", ended - 10), ("r1", ended - 20), ("r3", ended - 10)] {
            // A session of another payment system: none in this ledger.
            let remote = Intent {
                expires_at,
                provider: "sessions_api".into(),
                provider_session_id: Some(format!("cs_{id}")),
                ..intent(id)
            };
            store.create_intent(&remote, &OpenLimit::NONE).await.unwrap();
        }
        // A local one is the sweep's, not upkeep's.
        store.create_session(&session("local", ended)).await.unwrap();
        store.create_intent(&Intent { expires_at: ended - 30, ..intent("local") }, &OpenLimit::NONE).await.unwrap();
        let ids = |page: &[Intent]| page.iter().map(|i| i.id.clone()).collect::<Vec<_>>();
        let all = store.remote_due(now_ms(), &Cursor::start()).await.unwrap();
        assert_eq!(ids(&all), ["r1", "r2", "r3"]);
        let rest = store.remote_due(now_ms(), &Cursor::after(&all[1])).await.unwrap();
        assert_eq!(ids(&rest), ["r3"], "after r2, its twin r3");
        assert_eq!(store.remote_due(ended - 15, &Cursor::start()).await.unwrap().len(), 1);
    }
}

crate::on_both_backends! {
    #[tokio::test]
    async fn a_session_whose_intent_has_ended_takes_no_payment() {
        let (_dir, store) = store().await;
        let payer = AccountRef::wallet("payer", &usd());
        store.topup(&payer, units("1.00"), None).await.unwrap();
        for (id, to) in [("cancelled", IntentStatus::Cancelled), ("expired", IntentStatus::Expired)] {
            store.create_session(&session(id, now_ms() + 60_000)).await.unwrap();
            store.create_intent(&intent(id), &OpenLimit::NONE).await.unwrap();
            // Ended while its session stayed pending (a cancel that failed).
            assert!(store.end_unpaid_intent(id, to).await.unwrap());
            let refused = store.pay_session(id, Some("payer"), now_ms()).await;
            assert!(matches!(refused, Err(StoreError::WrongState { .. })), "{refused:?}");
            let session = store.session(id).await.unwrap().unwrap();
            assert_eq!(session.status.as_str(), id, "the session ends as its intent did");
        }
        assert_eq!(available(&*store, "payer").await, units("1.00"));
        assert_sound(&*store).await;
    }
}

crate::on_postgres! {
    /// Another instance migrating (it holds sqlx's advisory lock) for
    /// longer than the statement timeout: a starting instance waits its
    /// turn. Its migrations ran under that timeout, and it failed to start.
    #[tokio::test]
    async fn a_start_waits_for_another_instances_migrations_past_the_statement_timeout() {
        use sqlx::{Connection, migrate::Migrate};
        let dir = tempfile::tempdir().unwrap();
        let db = TestDb::fresh(dir.path());
        let mut other = sqlx::PgConnection::connect(&db.url).await.unwrap();
        other.lock().await.unwrap();
        let settings = crate::config::PoolSettings {
            statement_timeout: std::time::Duration::from_millis(100),
            ..Default::default()
        };
        let url = db.url.clone();
        let starting = tokio::spawn(async move { PgStore::connect(&url, &settings).await });
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        assert!(!starting.is_finished(), "the start waits for the migrations");
        other.unlock().await.unwrap();
        let store = starting.await.unwrap().expect("started once the other was done");
        store.ping().await.unwrap();
    }
}

crate::on_postgres! {
    /// A refusal (decline, cancel) that waits on a payment of its intent's
    /// session (here another transaction has locked the intent and marked
    /// the session paid, and not yet committed) sees that payment once it
    /// commits, and leaves the intent payable. In one statement it judged
    /// the session by its snapshot from before the wait, and ended the
    /// intent with its money in clearing.
    #[tokio::test]
    async fn a_refusal_waiting_on_a_payment_leaves_the_intent_payable() {
        use sqlx::Connection;
        let (place, store) = store().await;
        store.create_session(&session("s", now_ms() + 60_000)).await.unwrap();
        store.create_intent(&intent("s"), &OpenLimit::NONE).await.unwrap();

        let mut payment = sqlx::PgConnection::connect(&place.db.url).await.unwrap();
        sqlx::query("BEGIN").execute(&mut payment).await.unwrap();
        sqlx::query("SELECT 1 FROM intents WHERE id = 's' FOR UPDATE")
            .execute(&mut payment)
            .await
            .unwrap();
        sqlx::query("UPDATE payment_sessions SET status = 'paid' WHERE id = 's'")
            .execute(&mut payment)
            .await
            .unwrap();
        let refusing = {
            let store = store.clone();
            tokio::spawn(async move { store.end_unpaid_intent("s", IntentStatus::Declined).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(!refusing.is_finished(), "the refusal waits for the payment");
        sqlx::query("COMMIT").execute(&mut payment).await.unwrap();

        assert!(!refusing.await.unwrap().unwrap(), "nothing ended");
        let intent = store.intent("s").await.unwrap().unwrap();
        assert_eq!(intent.status, IntentStatus::AwaitingPayment, "still payable");
    }
}

crate::on_postgres! {
    /// A payment that comes while the expiry sweep is ending its intent
    /// (here: another transaction has expired it and not yet committed)
    /// waits for it, and then takes nothing.
    #[tokio::test]
    async fn a_payment_racing_the_expiry_of_its_intent_takes_nothing() {
        use sqlx::Connection;
        let (place, store) = store().await;
        let payer = AccountRef::wallet("payer", &usd());
        store.topup(&payer, units("1.00"), None).await.unwrap();
        store.create_session(&session("s", now_ms() + 60_000)).await.unwrap();
        store.create_intent(&intent("s"), &OpenLimit::NONE).await.unwrap();

        let mut sweep = sqlx::PgConnection::connect(&place.db.url).await.unwrap();
        sqlx::query("BEGIN").execute(&mut sweep).await.unwrap();
        sqlx::query("UPDATE intents SET status = 'expired' WHERE id = 's'")
            .execute(&mut sweep)
            .await
            .unwrap();
        let paying = {
            let store = store.clone();
            tokio::spawn(async move { store.pay_session("s", Some("payer"), now_ms()).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(!paying.is_finished(), "the payment waits for the intent");
        sqlx::query("COMMIT").execute(&mut sweep).await.unwrap();

        let refused = paying.await.unwrap();
        assert!(matches!(refused, Err(StoreError::WrongState { .. })), "{refused:?}");
        assert_eq!(store.session("s").await.unwrap().unwrap().status.as_str(), "expired");
        assert_eq!(available(&*store, "payer").await, units("1.00"));
        assert_sound(&*store).await;
    }
}

crate::on_both_backends! {
    /// A top-up with an idempotency key is made once: the same key again
    /// credits nothing and answers with the first one's transaction; for
    /// another wallet or amount it is refused. Without a key, each credits.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_topup_with_a_key_is_made_once() {
        let (_dir, store) = store().await;
        let alice = AccountRef::wallet("alice", &usd());
        let first = store.topup_with_key(&alice, units("1.00"), None, Some("k1")).await.unwrap();
        assert!(!first.replayed);
        let again = store
            .topup_with_key(&alice, units("1.00"), Some("retry".into()), Some("k1"))
            .await
            .unwrap();
        assert!(again.replayed);
        assert_eq!(again.posted.txn_id, first.posted.txn_id);
        assert_eq!(available(&*store, "alice").await, units("1.00"));
        let bob = AccountRef::wallet("bob", &usd());
        for (wallet, amount) in [(&alice, "2.00"), (&bob, "1.00")] {
            let refused = store.topup_with_key(wallet, units(amount), None, Some("k1")).await;
            assert!(matches!(refused, Err(StoreError::Invalid(_))), "{refused:?}");
        }
        // Sixteen at once with one key, five times over: each key credits
        // once, and the others replay it (none fails on the key's clash).
        for key in ["k2", "k3", "k4", "k5", "k6"] {
            let at_once: Vec<_> = (0..16)
                .map(|_| {
                    let (store, alice) = (store.clone(), alice.clone());
                    tokio::spawn(async move {
                        store.topup_with_key(&alice, units("0.10"), None, Some(key)).await
                    })
                })
                .collect();
            let mut credited = 0;
            for topup in at_once {
                credited += usize::from(!topup.await.unwrap().unwrap().replayed);
            }
            assert_eq!(credited, 1, "{key}");
        }
        store.topup(&alice, units("0.25"), None).await.unwrap();
        store.topup(&alice, units("0.25"), None).await.unwrap();
        assert_eq!(available(&*store, "alice").await, units("2.00"));
        assert_eq!(available(&*store, "bob").await, units("0.00"));
        assert_sound(&*store).await;
    }
}

crate::on_postgres! {
    /// Expiry sweeps racing payments that come just as their intents' time
    /// ends: every intent ends either paid and still claimable, or expired
    /// with its session unpaid. Never expired with its money taken (that
    /// money would sit in clearing with nothing to redeem or refund it), as
    /// a payment committing between a one-statement sweep's snapshot and
    /// its lock on the intent was (this test failed on every run then).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sweeps_racing_payments_never_expire_a_paid_intent() {
        const INTENTS: usize = 300;
        let (place, store) = store().await;
        let payer = AccountRef::wallet("payer", &usd());
        store.topup(&payer, units("100.00"), None).await.unwrap();
        for i in 0..INTENTS {
            let id = format!("i{i:03}");
            store.create_session(&session(&id, now_ms() + 60_000)).await.unwrap();
            store.create_intent(&intent(&id), &OpenLimit::NONE).await.unwrap();
        }
        // Intent i's time ends at `start` + i ms, as its payment comes: set
        // in one statement once they are all made, since making them takes
        // seconds on a loaded machine, and with times set as they were made
        // every payment came too late.
        let start = now_ms() + 300;
        let times = format!(
            "UPDATE intents SET expires_at = {start} + CAST(SUBSTR(id, 2) AS BIGINT)"
        );
        assert_eq!(crate::testing::execute(&place.db.url, &times).await.unwrap(), INTENTS as u64);
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sweeps: Vec<_> = (0..2)
            .map(|_| {
                let (store, done) = (store.clone(), done.clone());
                tokio::spawn(async move {
                    while !done.load(std::sync::atomic::Ordering::Acquire) {
                        store.sweep_expired(now_ms()).await.unwrap();
                    }
                })
            })
            .collect();
        let payments: Vec<_> = (0..INTENTS)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    // Aimed up to 49ms either side of its intent's end
                    // (half before, half after), not all at the end
                    // itself: there a loaded machine, waking the tasks
                    // late, let none pay in time.
                    let offset = (i % 50) as i64;
                    let at = start + i as i64 + if i % 2 == 0 { -offset } else { offset };
                    let wait = std::time::Duration::from_millis((at - now_ms()).max(0) as u64);
                    tokio::time::sleep(wait).await;
                    store.pay_session(&format!("i{i:03}"), Some("payer"), now_ms()).await.is_ok()
                })
            })
            .collect();
        let mut paid = 0;
        for payment in payments {
            paid += usize::from(payment.await.unwrap());
        }
        done.store(true, std::sync::atomic::Ordering::Release);
        for sweep in sweeps {
            sweep.await.unwrap();
        }
        store.sweep_expired(now_ms()).await.unwrap();
        let mut claimable = 0;
        for i in 0..INTENTS {
            let id = format!("i{i:03}");
            let intent = store.intent(&id).await.unwrap().unwrap().status;
            let session = store.session(&id).await.unwrap().unwrap().status.as_str().to_owned();
            match (intent, session.as_str()) {
                (IntentStatus::AwaitingPayment, "paid") => claimable += 1,
                (IntentStatus::Expired, "expired") => {}
                other => panic!("{id}: {other:?}"),
            }
        }
        assert_eq!(claimable, paid, "every payment that was taken can be claimed");
        assert!(paid > 0 && paid < INTENTS, "payments and sweeps raced: {paid} paid");
        let taken = units("100.00").0 - available(&*store, "payer").await.0;
        assert_eq!(taken, paid as i64 * units("0.05").0, "charged only what is claimable");
        assert_sound(&*store).await;
    }
}

crate::on_both_backends! {
    #[tokio::test]
    async fn a_metered_intent_is_charged_its_usage_and_refunds_the_rest() {
        let (_dir, store) = store().await;
        let payer = AccountRef::wallet("payer", &usd());
        store.topup(&payer, units("1.00"), None).await.unwrap();
        store.create_session(&session("m", now_ms() + 60_000)).await.unwrap();
        store.create_intent(&intent("m"), &OpenLimit::NONE).await.unwrap();
        store.pay_session("m", Some("payer"), now_ms()).await.unwrap();
        assert!(store
            .claim_paid_intent("m", &Funding::InClearing { refund_to: Some(payer) })
            .await
            .unwrap());
        // Above what was paid: refused, and the intent still awaits its result.
        let mut over = outcome("m", true);
        over.charge = Charge::whole(revenue(), units("0.06"));
        assert!(matches!(store.finish_intent(&over).await, Err(StoreError::Invalid(_))));
        assert_eq!(store.intent("m").await.unwrap().unwrap().status, IntentStatus::Running);

        let mut used = outcome("m", true);
        used.charge = Charge::whole(revenue(), units("0.02"));
        store.finish_intent(&used).await.unwrap();
        assert_eq!(available(&*store, "payer").await, units("0.98"));
        assert_eq!(posted(&*store, AccountKind::Revenue, "author").await, 20_000);
        assert_eq!(posted(&*store, AccountKind::Clearing, "payments").await, 0);
        assert_sound(&*store).await;
    }
}

/// One step of the model-based test.
#[derive(Debug, Clone)]
enum Op {
    Topup {
        wallet: usize,
        cents: i64,
    },
    Hold {
        wallet: usize,
        cents: i64,
    },
    /// Capture the `hold`-th hold ever made, charging `percent` of it.
    Capture {
        hold: usize,
        percent: i64,
    },
    Release {
        hold: usize,
    },
    /// Refund `percent` of what is left of the `hold`-th hold's capture
    /// (0: all of it).
    Refund {
        hold: usize,
        percent: i64,
    },
    /// Set (or, with `None`, lift) a wallet's daily cap.
    DailyCap {
        wallet: usize,
        cents: Option<i64>,
    },
}

/// The ledger as a person would keep it by hand, in micro-units.
#[derive(Default)]
struct Model {
    /// (balance, held) per wallet.
    wallets: [(i64, i64); 2],
    /// (daily cap, spent today) per wallet: open holds in full, captures
    /// at what they charged.
    caps: [(Option<i64>, i64); 2],
    /// (wallet, amount, open) per hold made.
    holds: Vec<(usize, i64, bool)>,
    /// Per captured hold: what each account still holds of it, in the
    /// order of the capture's legs (merged by account).
    captured: std::collections::BTreeMap<usize, Vec<(String, i64)>>,
    /// Per captured hold: what its capture charged the payer.
    charged: std::collections::BTreeMap<usize, i64>,
    /// Revenue per account name.
    revenue: std::collections::BTreeMap<String, i64>,
}

const WALLETS: [&str; 2] = ["w0", "w1"];

fn any_op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        (0..2usize, 1..500i64).prop_map(|(wallet, cents)| Op::Topup { wallet, cents }),
        (0..2usize, 1..300i64).prop_map(|(wallet, cents)| Op::Hold { wallet, cents }),
        (0..8usize, 1..=100i64).prop_map(|(hold, percent)| Op::Capture { hold, percent }),
        (0..8usize).prop_map(|hold| Op::Release { hold }),
        (0..2usize, proptest::option::of(0..600i64))
            .prop_map(|(wallet, cents)| Op::DailyCap { wallet, cents }),
        (0..8usize, 0..=100i64).prop_map(|(hold, percent)| Op::Refund { hold, percent }),
    ]
}

/// Runs `ops` on a fresh store and on the model, comparing every wallet
/// and revenue account, and `ledger verify`, after each step.
async fn run_against_model(ops: Vec<Op>) -> Result<(), String> {
    let (_dir, store) = store().await;
    let usd = usd();
    let terms = fee_terms();
    let mut model = Model::default();
    for (step, op) in ops.into_iter().enumerate() {
        match op.clone() {
            Op::Topup { wallet, cents } => {
                let amount = Units(cents * 10_000);
                store
                    .topup(&AccountRef::wallet(WALLETS[wallet], &usd), amount, None)
                    .await
                    .map_err(|e| e.to_string())?;
                model.wallets[wallet].0 += amount.0;
            }
            Op::Hold { wallet, cents } => {
                let id = format!("h{}", model.holds.len());
                let amount = Units(cents * 10_000);
                let outcome = store
                    .hold(&hold_request(
                        &id,
                        WALLETS[wallet],
                        &crate::money::format_in(amount, &usd),
                    ))
                    .await
                    .map_err(|e| e.to_string())?;
                let (balance, held) = model.wallets[wallet];
                let (cap, spent) = model.caps[wallet];
                let over_cap = cap.is_some_and(|cap| spent + amount.0 > cap);
                let covered = balance - held >= amount.0;
                let expected = match outcome {
                    HoldOutcome::OverLimit(_) => over_cap,
                    HoldOutcome::Insufficient => !over_cap && !covered,
                    HoldOutcome::Held => !over_cap && covered,
                };
                if !expected {
                    return Err(format!("step {step} {op:?}: store said {outcome:?}"));
                }
                if outcome == HoldOutcome::Held {
                    model.wallets[wallet].1 += amount.0;
                    model.caps[wallet].1 += amount.0;
                    model.holds.push((wallet, amount.0, true));
                }
            }
            Op::Capture { hold, percent } => {
                let Some(&(wallet, amount, open)) = model.holds.get(hold) else {
                    continue;
                };
                // The charge plus its 0.01 fee must fit in the hold.
                let charge = Units((amount * percent / 100 - 10_000).max(0));
                let split = terms.split(charge, &usd);
                let captured = store
                    .capture(&format!("h{hold}"), &Charge::of(&split, "alice", &usd))
                    .await;
                let fits = open && split.payer_pays.0 <= amount && !split.payer_pays.is_zero();
                // The same capture again (a retry whose answer was lost) is
                // answered with the first one, and changes nothing.
                let repeated = model.charged.get(&hold) == Some(&split.payer_pays.0);
                if (fits || repeated) != captured.is_ok() {
                    return Err(format!("step {step} {op:?}: store said {captured:?}"));
                }
                if fits {
                    model.holds[hold].2 = false;
                    model.wallets[wallet].1 -= amount;
                    model.wallets[wallet].0 -= split.payer_pays.0;
                    model.caps[wallet].1 -= amount - split.payer_pays.0;
                    let mut kept: Vec<(String, i64)> = Vec::new();
                    for (_, account, leg) in &split.legs {
                        *model.revenue.entry(account.clone()).or_default() += leg.0;
                        match kept.iter_mut().find(|(a, _)| a == account) {
                            Some(k) => k.1 += leg.0,
                            None => kept.push((account.clone(), leg.0)),
                        }
                    }
                    model.captured.insert(hold, kept);
                    model.charged.insert(hold, split.payer_pays.0);
                }
            }
            Op::Release { hold } => {
                let Some(&(wallet, amount, open)) = model.holds.get(hold) else {
                    continue;
                };
                let released = store.release(&format!("h{hold}")).await;
                if open != released.is_ok() {
                    return Err(format!("step {step} {op:?}: store said {released:?}"));
                }
                if open {
                    model.holds[hold].2 = false;
                    model.wallets[wallet].1 -= amount;
                    model.caps[wallet].1 -= amount;
                }
            }
            Op::Refund { hold, percent } => {
                let left: i64 = model
                    .captured
                    .get(&hold)
                    .map_or(0, |kept| kept.iter().map(|(_, k)| k).sum());
                let amount = if percent == 0 {
                    left
                } else {
                    left * percent / 100
                };
                let request = RefundRequest {
                    payment_id: format!("h{hold}"),
                    amount: (percent != 0).then_some(Units(amount)),
                    reason: "model".into(),
                    idempotency_key: format!("k{step}"),
                    restores_allowance: false,
                };
                let refunded = store.refund(&request).await;
                let possible = model.captured.contains_key(&hold) && amount > 0;
                if possible != refunded.is_ok() {
                    return Err(format!("step {step} {op:?}: store said {refunded:?}"));
                }
                if possible {
                    let kept = model.captured.get_mut(&hold).ok_or("no capture")?;
                    let weights: Vec<i64> = kept.iter().map(|(_, k)| *k).collect();
                    for ((account, k), part) in kept
                        .iter_mut()
                        .zip(crate::terms::pro_rata(amount, &weights))
                    {
                        *k -= part;
                        *model.revenue.entry(account.clone()).or_default() -= part;
                    }
                    let wallet = model.holds[hold].0;
                    model.wallets[wallet].0 += amount;
                }
            }
            Op::DailyCap { wallet, cents } => {
                let limits = crate::allowance::Limits {
                    daily: cents.map(|c| Units(c * 10_000)),
                    ..Default::default()
                };
                store
                    .set_limits(&AccountRef::wallet(WALLETS[wallet], &usd), &limits)
                    .await
                    .map_err(|e| e.to_string())?;
                model.caps[wallet].0 = limits.daily.map(|d| d.0);
            }
        }
        for (i, wallet) in WALLETS.iter().enumerate() {
            let limits = store.limits(wallet).await.map_err(|e| e.to_string())?;
            let spent = limits.first().map_or(0, |w| w.spent.at(now_ms()).0.0);
            if spent != model.caps[i].1 {
                return Err(format!(
                    "step {step} {op:?}: {wallet} spent {spent} today, model says {}",
                    model.caps[i].1
                ));
            }
        }
        for (i, wallet) in WALLETS.iter().enumerate() {
            let found = store.balances(wallet).await.map_err(|e| e.to_string())?;
            let (balance, held) = found.first().map_or((0, 0), |b| (b.balance.0, b.held.0));
            if (balance, held) != model.wallets[i] {
                return Err(format!(
                    "step {step} {op:?}: {wallet} is {:?}, model says {:?}",
                    (balance, held),
                    model.wallets[i]
                ));
            }
        }
        for (account, expected) in &model.revenue {
            let found = posted(&*store, AccountKind::Revenue, account).await;
            if found != *expected {
                return Err(format!(
                    "step {step} {op:?}: revenue:{account} is {found}, model says {expected}"
                ));
            }
        }
        let report = store.verify(now_ms()).await.map_err(|e| e.to_string())?;
        if !report.problems.is_empty() {
            return Err(format!("step {step} {op:?}: verify: {:?}", report.problems));
        }
    }
    Ok(())
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
    /// Random sequences of top-ups, holds, split captures, releases,
    /// refunds and daily caps against an in-memory model (SQLite; proptest shrinks a failure to
    /// its shortest sequence).
    #[test]
    fn the_ledger_agrees_with_a_model_after_every_step(
        ops in proptest::collection::vec(any_op(), 1..40)
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let result = runtime.block_on(run_against_model(ops));
        proptest::prop_assert!(result.is_ok(), "{}", result.unwrap_err());
    }
}

crate::on_both_backends! {
    #[tokio::test]
    async fn refunds_give_back_each_legs_share_never_more_than_was_captured() {
        let (_dir, store) = store().await;
        let usd = usd();
        top_up(&*store, "w", "10.00").await;
        store.hold(&hold_request("h1", "w", "1.01")).await.unwrap();
        let split = fee_terms().split(units("1.00"), &usd);
        store.capture("h1", &Charge::of(&split, "alice", &usd)).await.unwrap();
        let refund = |amount: Option<&str>, key: &str| RefundRequest {
            payment_id: "h1".into(),
            amount: amount.map(units),
            reason: "wrong answer".into(),
            idempotency_key: key.into(),
            restores_allowance: false,
        };

        let first = store.refund(&refund(Some("0.50"), "k1")).await.unwrap();
        assert_eq!((first.amount, first.refunded, first.captured), (units("0.50"), units("0.50"), units("1.01")));
        assert!(!first.replayed);
        assert_eq!(available(&*store, "w").await, units("9.49"));
        // Each leg gave back its share: 0.50 of 1.01, to the micro-unit.
        assert_eq!(posted(&*store, AccountKind::Revenue, "alice").await, 880_000 - 435_644);
        assert_eq!(posted(&*store, AccountKind::Revenue, "platform").await, 100_000 - 49_505);
        assert_sound(&*store).await;

        // The same key again: the same refund, nothing more.
        let again = store.refund(&refund(Some("0.50"), "k1")).await.unwrap();
        assert!(again.replayed);
        assert_eq!(again.txn_id, first.txn_id);
        assert!(matches!(
            store.refund(&refund(Some("0.20"), "k1")).await,
            Err(StoreError::Invalid(_))
        ));
        // Never more than is left.
        let err = store.refund(&refund(Some("0.52"), "k2")).await.unwrap_err();
        assert!(err.to_string().contains("0.51 of the 1.01 captured is left"), "{err}");
        assert_eq!(available(&*store, "w").await, units("9.49"));

        // The rest: every account is back where it started.
        let rest = store.refund(&refund(None, "k3")).await.unwrap();
        assert_eq!((rest.amount, rest.refunded), (units("0.51"), units("1.01")));
        assert_eq!(available(&*store, "w").await, units("10.00"));
        for account in ["alice", "platform", "commissions"] {
            assert_eq!(posted(&*store, AccountKind::Revenue, account).await, 0, "{account}");
        }
        assert!(matches!(store.refund(&refund(None, "k4")).await, Err(StoreError::Invalid(_))));
        // Only captured payments can be refunded.
        store.hold(&hold_request("h2", "w", "0.10")).await.unwrap();
        store.release("h2").await.unwrap();
        let mut released = refund(None, "k5");
        released.payment_id = "h2".into();
        assert!(matches!(store.refund(&released).await, Err(StoreError::NotFound(_))));
        let kinds: Vec<String> = store
            .statement(AccountKind::Wallet, "w")
            .await
            .unwrap()
            .into_iter()
            .filter(|l| l.kind == "refund")
            .map(|l| l.memo.unwrap_or_default())
            .collect();
        assert_eq!(kinds, ["wrong answer", "wrong answer"]);
        assert_sound(&*store).await;
    }
}

crate::on_both_backends! {
    /// A person declines an approval just as the call's session is paid:
    /// the payment stands and the call runs when redeemed, so its records
    /// show it approved by whoever paid, beside who said no, not a charge
    /// "declined". (The decline stayed, and the capture carried it.)
    #[tokio::test]
    async fn a_payment_that_lands_as_an_approval_is_declined_shows_who_paid() {
        let (_dir, store) = store().await;
        top_up(&*store, "payer", "1.00").await;
        store.create_session(&session("d", now_ms() + 60_000)).await.unwrap();
        store.create_intent(&intent("d"), &OpenLimit::NONE).await.unwrap();
        assert!(
            store
                .decide_approval("d", ApprovalStatus::Declined, "alice via elicitation")
                .await
                .unwrap()
        );
        store.pay_session("d", Some("payer"), now_ms()).await.unwrap();
        let line = store
            .statement(AccountKind::Wallet, "payer")
            .await
            .unwrap()
            .into_iter()
            .find(|l| l.kind == "session_payment")
            .unwrap();
        let on_line = line.approval.expect("the payment line's approval");
        assert_eq!(on_line.status, ApprovalStatus::Approved);
        let funding = Funding::InClearing {
            refund_to: Some(AccountRef::wallet("payer", &usd())),
        };
        assert!(store.claim_paid_intent("d", &funding).await.unwrap());
        let approval = store.intent("d").await.unwrap().unwrap().approval.unwrap();
        assert_eq!(approval.status, ApprovalStatus::Approved);
        assert_eq!(approval.by, on_line.by);
        // Who paid, and who had said no as it landed.
        assert_eq!(
            approval.by.as_deref(),
            Some("wallet:payer (paid as alice via elicitation declined)")
        );

        // The other order: a no that comes after the payment decides
        // nothing, and the records say only who paid.
        store.create_session(&session("e", now_ms() + 60_000)).await.unwrap();
        store.create_intent(&intent("e"), &OpenLimit::NONE).await.unwrap();
        store.pay_session("e", Some("payer"), now_ms()).await.unwrap();
        assert!(
            !store
                .decide_approval("e", ApprovalStatus::Declined, "alice via elicitation")
                .await
                .unwrap()
        );
        assert!(store.claim_paid_intent("e", &funding).await.unwrap());
        let approval = store.intent("e").await.unwrap().unwrap().approval.unwrap();
        assert_eq!(approval.status, ApprovalStatus::Approved);
        assert_eq!(approval.by.as_deref(), Some("wallet:payer"));
    }
}

crate::on_both_backends! {
    /// Two refunds of two payments under one idempotency key, at once: one
    /// is made, and the other is told the key was used. (On PostgreSQL the
    /// second failed on the key's index, as "payment system unavailable".)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_idempotency_key_makes_one_refund_even_at_once() {
        let (_dir, store) = store().await;
        top_up(&*store, "w", "10.00").await;
        for round in 0..5 {
            let refund = |hold: String| RefundRequest {
                payment_id: hold,
                amount: None,
                reason: "twice".into(),
                idempotency_key: format!("key-{round}"),
                restores_allowance: false,
            };
            let (a, b) = (format!("a{round}"), format!("b{round}"));
            for hold in [&a, &b] {
                store.hold(&hold_request(hold, "w", "0.10")).await.unwrap();
                store
                    .capture(hold, &Charge::whole(revenue(), units("0.10")))
                    .await
                    .unwrap();
            }
            let (a, b) = (refund(a), refund(b));
            let (first, second) = tokio::join!(store.refund(&a), store.refund(&b));
            let made = [&first, &second].iter().filter(|r| r.is_ok()).count();
            let refused = [&first, &second]
                .iter()
                .filter(|r| matches!(r, Err(StoreError::Invalid(m)) if m.contains("was used for another refund")))
                .count();
            assert_eq!((made, refused), (1, 1), "{first:?} {second:?}");
        }
        assert_sound(&*store).await;
    }
}

crate::on_both_backends! {
    /// A session made through the sessions API has no intent here: its
    /// payment stays in clearing, and only the operator's refund gives it
    /// back. A call's own session is refunded through its intent instead,
    /// so its id refunds nothing. (Neither could be refunded before.)
    #[tokio::test]
    async fn a_sessions_api_payment_is_refunded_to_whoever_paid_it() {
        let (_dir, store) = store().await;
        top_up(&*store, "bob", "1.00").await;
        let mut api = session("cs_api", now_ms() + 60_000);
        api.owner = Some("shop".into());
        store.create_session(&api).await.unwrap();
        let refund = |payment_id: &str, amount: Option<&str>, key: &str| RefundRequest {
            payment_id: payment_id.into(),
            amount: amount.map(units),
            reason: "paid by mistake".into(),
            idempotency_key: key.into(),
            restores_allowance: false,
        };
        // Unpaid, there is nothing to give back.
        assert!(matches!(
            store.refund(&refund("cs_api", None, "k0")).await,
            Err(StoreError::NotFound(_))
        ));
        store.pay_session("cs_api", Some("bob"), now_ms()).await.unwrap();
        assert_eq!(available(&*store, "bob").await, units("0.95"));

        let part = store.refund(&refund("cs_api", Some("0.02"), "k1")).await.unwrap();
        assert_eq!((part.amount, part.captured), (units("0.02"), units("0.05")));
        assert_eq!(available(&*store, "bob").await, units("0.97"));
        let rest = store.refund(&refund("cs_api", None, "k2")).await.unwrap();
        assert_eq!((rest.amount, rest.refunded), (units("0.03"), units("0.05")));
        assert_eq!(available(&*store, "bob").await, units("1.00"));
        assert_eq!(posted(&*store, AccountKind::Clearing, "payments").await, 0);
        assert!(matches!(
            store.refund(&refund("cs_api", None, "k3")).await,
            Err(StoreError::Invalid(_))
        ));

        // A call's session: its intent's capture or refund moves the money.
        store
            .create_session(&session("cs_call", now_ms() + 60_000))
            .await
            .unwrap();
        store.pay_session("cs_call", Some("bob"), now_ms()).await.unwrap();
        assert!(matches!(
            store.refund(&refund("cs_call", None, "k4")).await,
            Err(StoreError::NotFound(_))
        ));
        assert_eq!(available(&*store, "bob").await, units("0.95"));
        assert_sound(&*store).await;
    }
}

crate::on_both_backends! {
    /// `ledger verify` takes every legitimate refund and capture as sound
    /// (split and metered fast-path captures, partial refunds, a metered
    /// session's settlement, a sessions-API payment), and fails, saying
    /// which and why, on refunds that add up to more than their payment,
    /// refunds of nothing, and a captured hold whose money the ledger never
    /// took from its wallet.
    #[tokio::test]
    async fn verify_catches_over_refunds_and_captures_the_ledger_never_took() {
        let (place, store) = store().await;
        top_up(&*store, "w", "10.00").await;
        let refund = |payment_id: &str, amount: Option<&str>, key: &str| RefundRequest {
            payment_id: payment_id.into(),
            amount: amount.map(units),
            reason: "test".into(),
            idempotency_key: key.into(),
            restores_allowance: false,
        };
        // Fast path: a split capture, refunded in part; a metered one below
        // its hold, refunded whole.
        let usd = usd();
        store.hold(&hold_request("h1", "w", "1.01")).await.unwrap();
        let split = fee_terms().split(units("1.00"), &usd);
        store.capture("h1", &Charge::of(&split, "alice", &usd)).await.unwrap();
        store.refund(&refund("h1", Some("0.50"), "k1")).await.unwrap();
        store.hold(&hold_request("h2", "w", "0.50")).await.unwrap();
        store.capture("h2", &Charge::whole(revenue(), units("0.20"))).await.unwrap();
        store.refund(&refund("h2", None, "k2")).await.unwrap();
        store.hold(&hold_request("h3", "w", "0.20")).await.unwrap();
        store.capture("h3", &Charge::whole(revenue(), units("0.20"))).await.unwrap();
        // Slow path: 0.03 of the 0.05 paid charged, and 0.01 of it refunded.
        store.create_session(&session("s", now_ms() + 60_000)).await.unwrap();
        store.create_intent(&intent("s"), &OpenLimit::NONE).await.unwrap();
        store.pay_session("s", Some("w"), now_ms()).await.unwrap();
        let funding = Funding::InClearing {
            refund_to: Some(AccountRef::wallet("w", &usd)),
        };
        assert!(store.claim_paid_intent("s", &funding).await.unwrap());
        let metered = IntentOutcome {
            charge: Charge::whole(revenue(), units("0.03")),
            ..outcome("s", true)
        };
        store.finish_intent(&metered).await.unwrap();
        store.refund(&refund("s", Some("0.01"), "k3")).await.unwrap();
        // A session made through the sessions API, refunded in part.
        let mut api = session("cs_api", now_ms() + 60_000);
        api.owner = Some("shop".into());
        store.create_session(&api).await.unwrap();
        store.pay_session("cs_api", Some("w"), now_ms()).await.unwrap();
        store.refund(&refund("cs_api", Some("0.02"), "k4")).await.unwrap();
        assert_sound(&*store).await;

        let problems = || async { store.verify(now_ms()).await.expect("verify").problems };
        let corrupt = |sql: String| {
            let url = place.db.url.clone();
            async move {
                crate::testing::execute(&url, &sql).await.expect("corrupt the database");
            }
        };
        // A refund row forged past what was captured, and one of a payment
        // that has no capture at all.
        for (key, payment, amount) in [("forged", "h1", 600_000), ("ghost", "nothing", 10_000)] {
            corrupt(format!(
                "INSERT INTO refunds (idempotency_key, payment_id, txn_id, amount, reason, created_at)
                 SELECT '{key}', '{payment}', txn_id, {amount}, 'forged', 0 FROM refunds
                 WHERE idempotency_key = 'k1'"
            ))
            .await;
        }
        assert_eq!(
            problems().await,
            [
                "payment h1: refunds total 1.10 USD, more than the 1.01 USD captured",
                "payment nothing: refunds total 0.01 USD, but it has no capture to refund",
            ]
        );
        corrupt("DELETE FROM refunds WHERE idempotency_key IN ('forged', 'ghost')".into()).await;
        assert_sound(&*store).await;

        // A hold that says it captured more than its transaction took, one
        // pointed at a transaction that is not its capture, and one pointed
        // at another hold's capture of the same wallet and amount.
        corrupt("UPDATE holds SET captured = 300000 WHERE id = 'h2'".into()).await;
        corrupt(
            "UPDATE holds SET txn_id = (SELECT txn_id FROM refunds WHERE idempotency_key = 'k1')
             WHERE id = 'h1'"
                .into(),
        )
        .await;
        corrupt(
            "UPDATE holds SET txn_id = (SELECT txn_id FROM holds WHERE id = 'h2') WHERE id = 'h3'"
                .into(),
        )
        .await;
        let found = problems().await;
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(
            found[0].starts_with("hold h1 captured 1.01 USD, but its transaction txn_")
                && found[0].ends_with(" is not its capture or takes no such amount from wallet:w"),
            "{found:?}"
        );
        assert!(
            found[1].starts_with("hold h2 captured 0.30 USD, but its transaction txn_"),
            "{found:?}"
        );
        assert!(
            found[2].starts_with("hold h3 captured 0.20 USD, but its transaction txn_"),
            "{found:?}"
        );
    }
}

crate::on_both_backends! {
    /// A paid run left `running` by a tollgate from before instance leases
    /// (no runner recorded) is taken for a dead instance's once the
    /// migration runs, and so recovered, rather than left running for good.
    #[tokio::test]
    async fn a_run_from_before_leases_is_recovered_after_the_upgrade() {
        let (place, store) = store().await;
        store.create_session(&session("old", now_ms() + 60_000)).await.unwrap();
        store.create_intent(&intent("old"), &OpenLimit::NONE).await.unwrap();
        store.pay_session("old", None, now_ms()).await.unwrap();
        let funding = Funding::InClearing { refund_to: None };
        assert!(store.claim_paid_intent("old", &funding).await.unwrap());
        // As an older tollgate left it, and before this upgrade's migration.
        let url = &place.db.url;
        crate::testing::execute(url, "UPDATE intents SET runner = NULL WHERE id = 'old'")
            .await
            .unwrap();
        assert!(store.interrupted_runs(now_ms()).await.unwrap().is_empty());
        let forget = "DELETE FROM _sqlx_migrations WHERE description = 'runs from before leases'";
        assert_eq!(crate::testing::execute(url, forget).await.unwrap(), 1);
        let upgraded = open(url).await.unwrap();
        let interrupted = upgraded.interrupted_runs(now_ms()).await.unwrap();
        assert_eq!(interrupted.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["old"]);
    }
}

crate::on_both_backends! {
    #[tokio::test]
    async fn a_dead_instances_holds_and_runs_are_recovered_and_no_one_elses() {
        let (place, a) = store().await;
        let b = open(&place.db.url).await.expect("second instance");
        let now = now_ms();
        for store in [&a, &b] {
            store.heartbeat(now, now + 60_000).await.unwrap();
        }
        let payer = AccountRef::wallet("payer", &usd());
        a.topup(&payer, units("1.00"), None).await.unwrap();
        assert_eq!(a.hold(&hold_request("ha", "payer", "0.10")).await.unwrap(), HoldOutcome::Held);
        assert_eq!(b.hold(&hold_request("hb", "payer", "0.20")).await.unwrap(), HoldOutcome::Held);
        // One paid run on each instance.
        for (id, store) in [("ia", &a), ("ib", &b)] {
            store.create_session(&session(id, now + 60_000)).await.unwrap();
            store.create_intent(&intent(id), &OpenLimit::NONE).await.unwrap();
            store.pay_session(id, Some("payer"), now).await.unwrap();
            let funding = Funding::InClearing { refund_to: Some(payer.clone()) };
            assert!(store.claim_paid_intent(id, &funding).await.unwrap());
        }
        assert_eq!(available(&*a, "payer").await, units("0.60"));

        // Both alive: nothing is anyone's to recover.
        assert_eq!(b.release_orphaned_holds(now_ms()).await.unwrap(), 0);
        assert!(b.interrupted_runs(now_ms()).await.unwrap().is_empty());

        // `a` dies: its lease lapses.
        a.heartbeat(now, now - 1).await.unwrap();
        assert_eq!(b.release_orphaned_holds(now_ms()).await.unwrap(), 1);
        assert_eq!(b.release_orphaned_holds(now_ms()).await.unwrap(), 0, "released once");
        assert_eq!(available(&*b, "payer").await, units("0.70"), "only a's hold came back");
        let interrupted: Vec<String> =
            b.interrupted_runs(now_ms()).await.unwrap().into_iter().map(|i| i.id).collect();
        assert_eq!(interrupted, ["ia"]);
        // b's own hold and run are untouched and still end normally.
        b.capture("hb", &Charge::whole(revenue(), units("0.20"))).await.unwrap();
        b.finish_intent(&outcome("ib", true)).await.unwrap();
        // The interrupted run, settled as failed, goes back to the payer once.
        b.finish_intent(&outcome("ia", false)).await.unwrap();
        assert!(b.finish_intent(&outcome("ia", false)).await.is_err(), "settled once");
        assert!(b.interrupted_runs(now_ms()).await.unwrap().is_empty());
        assert_eq!(available(&*b, "payer").await, units("0.75"));
        assert_sound(&*b).await;

        // A hold opened by a store that never registered counts as dead too:
        // every serving instance registers before its first call.
        let c = open(&place.db.url).await.expect("third instance");
        assert_eq!(c.hold(&hold_request("hc", "payer", "0.05")).await.unwrap(), HoldOutcome::Held);
        assert_eq!(b.release_orphaned_holds(now_ms()).await.unwrap(), 1);
        assert_eq!(available(&*b, "payer").await, units("0.75"));

        // An instance never takes its own calls for a dead one's, even with
        // its own lease lapsed (its renewals failing): only another may.
        assert_eq!(b.hold(&hold_request("hb2", "payer", "0.05")).await.unwrap(), HoldOutcome::Held);
        b.heartbeat(now, now - 1).await.unwrap();
        assert_eq!(b.release_orphaned_holds(now_ms()).await.unwrap(), 0, "b's own");
        assert_eq!(c.release_orphaned_holds(now_ms()).await.unwrap(), 1, "b's, by c");
        assert_sound(&*b).await;
    }

    #[tokio::test]
    async fn pruning_deletes_only_what_is_kept_for_a_while() {
        let (place, store) = store().await;
        let payer = AccountRef::wallet("payer", &usd());
        store.topup(&payer, units("1.00"), None).await.unwrap();
        // An unpaid intent that expired, with its session.
        store.create_session(&session("gone", now_ms() - 1)).await.unwrap();
        let mut expired = intent("gone");
        expired.expires_at = now_ms() - 1;
        store.create_intent(&expired, &OpenLimit::NONE).await.unwrap();
        store.sweep_expired(now_ms()).await.unwrap();
        // A paid intent that ran (its result is stored).
        store.create_session(&session("ran", now_ms() + 60_000)).await.unwrap();
        store.create_intent(&intent("ran"), &OpenLimit::NONE).await.unwrap();
        store.pay_session("ran", Some("payer"), now_ms()).await.unwrap();
        let funding = Funding::InClearing { refund_to: Some(payer.clone()) };
        assert!(store.claim_paid_intent("ran", &funding).await.unwrap());
        store.finish_intent(&outcome("ran", true)).await.unwrap();
        // A released hold and a captured one.
        store.hold(&hold_request("released", "payer", "0.10")).await.unwrap();
        store.release("released").await.unwrap();
        store.hold(&hold_request("captured", "payer", "0.10")).await.unwrap();
        store.capture("captured", &Charge::whole(revenue(), units("0.10"))).await.unwrap();
        // Two declined at checkout (sessions failed): one a person's no to
        // an approval, kept with its decision for the approvals statement.
        for id in ["no", "refused"] {
            store.create_session(&session(id, now_ms() + 60_000)).await.unwrap();
            store.create_intent(&intent(id), &OpenLimit::NONE).await.unwrap();
            assert!(store.end_session(id, SessionStatus::Failed).await.unwrap());
            assert!(store.end_unpaid_intent(id, IntentStatus::Declined).await.unwrap());
        }
        let decided = "UPDATE intents SET approval = 'declined', approved_by = 'alice' WHERE id = 'refused'";
        crate::testing::execute(&place.db.url, decided).await.unwrap();
        let statement_before = store.statement(AccountKind::Wallet, "payer").await.unwrap().len();

        // Nothing is old enough yet.
        assert_eq!(store.prune(now_ms() - 60_000).await.unwrap(), Pruned::default());
        let pruned = store.prune(now_ms() + 1).await.unwrap();
        assert_eq!(
            pruned,
            Pruned { results: 1, intents: 2, sessions: 3, holds: 1 }
        );
        assert!(store.intent("gone").await.unwrap().is_none());
        assert!(store.session("gone").await.unwrap().is_none());
        assert!(store.intent("no").await.unwrap().is_none());
        assert_eq!(store.intent("refused").await.unwrap().unwrap().status, IntentStatus::Declined);
        assert!(store.stored_result("ran").await.unwrap().is_none());
        // The paid intent stays (it is consumed, and refunds need it), so
        // does the ledger, and the captured payment can still be refunded.
        assert_eq!(store.intent("ran").await.unwrap().unwrap().status, IntentStatus::Succeeded);
        assert_eq!(store.statement(AccountKind::Wallet, "payer").await.unwrap().len(), statement_before);
        store
            .refund(&RefundRequest {
                payment_id: "captured".into(),
                amount: None,
                reason: "test".into(),
                idempotency_key: "k".into(),
                restores_allowance: false,
            })
            .await
            .unwrap();
        assert_sound(&*store).await;

        // A backlog larger than one batch goes in one pass, batch by batch.
        let backlog = 2_345;
        let sql = "INSERT INTO intents (id, tool, args_hash, args_json, amount, currency, mode,
                       status, provider, created_at, expires_at, updated_at)
                   WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2345)
                   SELECT 'old_' || i, 'echo', 'h', '{}', 1, 'USD', 'two_step', 'expired',
                          'local', 1, 1, 1 FROM n";
        crate::testing::execute(&place.db.url, sql).await.unwrap();
        assert_eq!(store.prune(now_ms()).await.unwrap().intents, backlog);
    }
}

crate::on_both_backends! {
    /// An export reads the ledger a page at a time and writes what one
    /// read of all of it would; an account's export reads only its entries,
    /// and one of an account with none is refused.
    #[tokio::test]
    async fn an_export_pages_through_the_ledger() {
        use crate::export::{self, ExportError, Format, Selection};
        let (_dir, store) = store().await;
        for (wallet, amount) in [("a", "1.00"), ("b", "2.00"), ("a", "0.50"), ("c", "3.00"), ("a", "0.25")] {
            top_up(&*store, wallet, amount).await;
        }
        let run = async |selection: &Selection, page: i64| {
            let mut out = Vec::new();
            let count = export::export(&*store, selection, Format::Jsonl, &mut out, page).await?;
            Ok::<_, ExportError>((count, String::from_utf8(out).unwrap()))
        };
        let all = Selection::default();
        let (count, whole) = run(&all, 1000).await.unwrap();
        assert_eq!(count, 10, "two entries per top-up");
        for page in [1, 2, 3] {
            assert_eq!(run(&all, page).await.unwrap(), (count, whole.clone()), "pages of {page}");
        }
        let only_a = Selection {
            account: Some((AccountKind::Wallet, "a".into())),
            ..Selection::default()
        };
        let (count, text) = run(&only_a, 2).await.unwrap();
        assert_eq!(count, 3, "{text}");
        let amounts: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["amount"].to_string())
            .collect();
        assert_eq!(amounts, ["\"1.00\"", "\"0.50\"", "\"0.25\""]);
        let misspelt = Selection {
            account: Some((AccountKind::Wallet, "aa".into())),
            ..Selection::default()
        };
        assert!(matches!(run(&misspelt, 2).await, Err(ExportError::UnknownAccount(a)) if a == "wallet:aa"));

        // Going on from an entry: only what was recorded after it.
        let ids: Vec<i64> = whole
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["entry_id"].as_i64().unwrap())
            .collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        let rest = Selection { after: ids[3], ..Selection::default() };
        let (count, text) = run(&rest, 2).await.unwrap();
        assert_eq!(count, 6);
        assert_eq!(text, whole.lines().skip(4).map(|l| format!("{l}\n")).collect::<String>());
        let (count, _) = run(&Selection { after: ids[9], ..Selection::default() }, 2).await.unwrap();
        assert_eq!(count, 0, "nothing after the last");
    }
}

crate::on_postgres! {
    /// On PostgreSQL an entry can commit after one with a later id: an
    /// export waits for the ledger's writes in flight, so that it neither
    /// leaves out such an entry nor lets `--after` skip it next time.
    #[tokio::test]
    async fn an_export_waits_for_ledger_writes_in_flight() {
        use sqlx::Connection;

        use crate::export::{self, Format, Selection};
        let (place, store) = store().await;
        top_up(&*store, "a", "1.00").await;
        // A posting written and not yet committed (as a capture in flight),
        // then one after it that commits at once.
        let mut late = sqlx::PgConnection::connect(&place.db.url).await.unwrap();
        for sql in [
            "BEGIN",
            "INSERT INTO ledger_transactions (id, kind, currency, amount, created_at)
             VALUES ('txn_late', 'topup', 'USD', 0, 0)",
            "INSERT INTO ledger_entries (txn_id, account_id, amount, created_at)
             SELECT 'txn_late', id, 1, 0 FROM accounts WHERE kind = 'wallet' AND name = 'a'",
            "INSERT INTO ledger_entries (txn_id, account_id, amount, created_at)
             SELECT 'txn_late', id, -1, 0 FROM accounts WHERE kind = 'wallet' AND name = 'a'",
        ] {
            sqlx::query(sql).execute(&mut late).await.unwrap();
        }
        top_up(&*store, "b", "2.00").await;

        let exporting = tokio::spawn({
            let store = store.clone();
            async move {
                let mut out = Vec::new();
                export::export(&*store, &Selection::default(), Format::Jsonl, &mut out, 2)
                    .await
                    .unwrap();
                String::from_utf8(out).unwrap()
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(!exporting.is_finished(), "it waits for the write in flight");
        // A writer that comes meanwhile is not held up until that one ends:
        // the export gives way, and waits again.
        top_up(&*store, "c", "3.00").await;
        assert!(!exporting.is_finished(), "still waiting for the first");
        sqlx::query("COMMIT").execute(&mut late).await.unwrap();
        let exported = exporting.await.unwrap();
        assert_eq!(exported.lines().count(), 8, "{exported}");
        assert!(exported.contains("txn_late"), "{exported}");
        late.close().await.ok();
    }
}

crate::on_postgres! {
    /// Instances on hosts whose clocks disagree by more than a lease do not
    /// take each other for dead: PostgreSQL stamps and judges leases by its
    /// own clock.
    #[tokio::test]
    async fn leases_go_by_the_databases_clock_not_the_hosts() {
        let (place, a) = store().await;
        let b = open(&place.db.url).await.expect("second instance");
        let skew = 10 * 60_000;
        // a's host runs ten minutes behind; b's is right.
        let behind = now_ms() - skew;
        a.heartbeat(behind, behind + 60_000).await.unwrap();
        b.heartbeat(now_ms(), now_ms() + 60_000).await.unwrap();
        let payer = AccountRef::wallet("payer", &usd());
        a.topup(&payer, units("1.00"), None).await.unwrap();
        assert_eq!(a.hold(&hold_request("ha", "payer", "0.10")).await.unwrap(), HoldOutcome::Held);
        a.create_session(&session("ia", now_ms() + 60_000)).await.unwrap();
        a.create_intent(&intent("ia"), &OpenLimit::NONE).await.unwrap();
        a.pay_session("ia", Some("payer"), now_ms()).await.unwrap();
        let funding = Funding::InClearing { refund_to: Some(payer.clone()) };
        assert!(a.claim_paid_intent("ia", &funding).await.unwrap());

        // Alive by the database's clock, whatever either host's says.
        for b_clock in [now_ms(), now_ms() + skew] {
            assert_eq!(b.release_orphaned_holds(b_clock).await.unwrap(), 0);
            assert!(b.interrupted_runs(b_clock).await.unwrap().is_empty());
        }
        assert_eq!(available(&*b, "payer").await, units("0.85"));

        // Its lease lapsed: recovered as before.
        a.heartbeat(behind, behind - 1).await.unwrap();
        assert_eq!(b.release_orphaned_holds(now_ms()).await.unwrap(), 1);
        let interrupted: Vec<String> =
            b.interrupted_runs(now_ms()).await.unwrap().into_iter().map(|i| i.id).collect();
        assert_eq!(interrupted, ["ia"]);
        assert_sound(&*b).await;
    }
}
