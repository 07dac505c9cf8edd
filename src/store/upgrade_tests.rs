//! Upgrades, on both backends: a ledger written by a tollgate of the first
//! schema keeps its money through every migration since, and what that
//! tollgate left under way (an open hold, a paid call not yet redeemed) is
//! settled by today's code.

use std::borrow::Cow;

use sqlx::{Connection, migrate::Migrator};

use super::tests::{assert_sound, available, outcome, posted, revenue, units};
use super::*;
use crate::testing::{Backend, TestDb, current, execute};

/// The database at `url` as the first release left it: only the first
/// migration applied.
async fn at_first_schema(url: &str) {
    let first = |all: Migrator| Migrator {
        migrations: Cow::Owned(all.migrations[..1].to_vec()),
        ..Migrator::DEFAULT
    };
    match current() {
        Backend::Sqlite => {
            let url = format!("sqlite://{url}?mode=rwc");
            let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
            let migrator = first(sqlx::migrate!("./migrations/sqlite"));
            migrator.run(&mut conn).await.unwrap();
        }
        Backend::Postgres => {
            let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
            let migrator = first(sqlx::migrate!("./migrations/postgres"));
            migrator.run(&mut conn).await.unwrap();
        }
    }
}

/// What a tollgate of the first schema wrote, as its statements and
/// triggers wrote it, at time `t`:
/// - alice topped up 1.00;
/// - a fast-path call held 0.30 and captured it for `author`;
/// - another holds 0.20, still open: its instance died before it ended;
/// - a slow-path call's session is paid (0.05, dev settlement, in
///   clearing) and its intent not yet redeemed.
fn first_schema_money(t: i64) -> Vec<String> {
    let expires = t + 900_000;
    // The first PostgreSQL schema reserved in the store's statement, not in
    // a trigger as SQLite's did.
    let reserve = |amount: i64| match current() {
        Backend::Sqlite => None,
        Backend::Postgres => Some(format!(
            "UPDATE accounts SET held = held + {amount} WHERE id = 2"
        )),
    };
    let hold = |id: &str, amount: i64| {
        format!(
            "INSERT INTO holds (id, account_id, amount, status, principal, tool, args_hash, created_at, expires_at)
             VALUES ('{id}', 2, {amount}, 'open', 'alice', 'echo', 'h', {t}, {expires})"
        )
    };
    let mut sql = vec![
        format!(
            "INSERT INTO accounts (id, kind, name, currency, created_at) VALUES
             (1, 'external', 'topups', 'USD', {t}), (2, 'wallet', 'alice', 'USD', {t}),
             (3, 'revenue', 'author', 'USD', {t}), (4, 'external', 'dev-settlement', 'USD', {t}),
             (5, 'clearing', 'payments', 'USD', {t})"
        ),
        format!(
            "INSERT INTO ledger_transactions (id, kind, currency, amount, beneficiary, created_at)
             VALUES ('txn_old_topup', 'topup', 'USD', 1000000, 'alice', {t})"
        ),
        format!(
            "INSERT INTO ledger_entries (txn_id, account_id, amount, created_at)
             VALUES ('txn_old_topup', 1, -1000000, {t}), ('txn_old_topup', 2, 1000000, {t})"
        ),
        hold("pay_old_captured", 300_000),
    ];
    sql.extend(reserve(300_000));
    sql.push(format!(
        "UPDATE holds SET status = 'captured', captured = 300000, settled_at = {t},
                beneficiary_account_id = 3, txn_id = 'txn_old_capture'
         WHERE id = 'pay_old_captured'"
    ));
    sql.push(hold("pay_old_open", 200_000));
    sql.extend(reserve(200_000));
    sql.extend([
        format!(
            "INSERT INTO payment_sessions (id, amount, currency, description, status, created_at, expires_at, updated_at)
             VALUES ('pay_old_intent', 50000, 'USD', 'old', 'paid', {t}, {expires}, {t})"
        ),
        format!(
            "INSERT INTO intents (id, tool, args_hash, args_json, amount, currency, principal, session_id,
                                  mode, status, provider, provider_session_id, created_at, expires_at, updated_at)
             VALUES ('pay_old_intent', 'echo', 'h', '{{}}', 50000, 'USD', 'alice', 'mcp-1',
                     'two_step', 'awaiting_payment', 'local', 'pay_old_intent', {t}, {expires}, {t})"
        ),
        format!(
            "INSERT INTO ledger_transactions (id, kind, currency, amount, payer, beneficiary, tool, intent_id, payment_id, memo, created_at)
             VALUES ('txn_old_session', 'session_payment', 'USD', 50000, 'dev-settlement', 'clearing:payments',
                     'echo', 'pay_old_intent', 'pay_old_intent', 'old', {t})"
        ),
        format!(
            "INSERT INTO ledger_entries (txn_id, account_id, amount, created_at)
             VALUES ('txn_old_session', 4, -50000, {t}), ('txn_old_session', 5, 50000, {t})"
        ),
    ]);
    if current() == Backend::Postgres {
        // The ids above were given, not drawn: the next account drawn must
        // not take one of them.
        sql.push("SELECT setval('accounts_id_seq', 5)".into());
    }
    sql
}

crate::on_both_backends! {
    #[tokio::test]
    async fn a_ledger_from_the_first_schema_keeps_its_money_through_every_migration() {
        let dir = tempfile::tempdir().unwrap();
        let db = TestDb::fresh(dir.path());
        at_first_schema(&db.url).await;
        let t = now_ms() - 60_000;
        for statement in first_schema_money(t) {
            execute(&db.url, &statement)
                .await
                .unwrap_or_else(|e| panic!("{statement}: {e}"));
        }

        // Every migration since runs as the store opens.
        let store = crate::testing::open_store(&db.url).await.expect("upgraded");
        let alice = &store.balances("alice").await.unwrap()[0];
        assert_eq!(
            (alice.balance, alice.held, alice.available),
            (units("0.70"), units("0.20"), units("0.50")),
            "the wallet as the old tollgate left it"
        );
        let lines = store.statement(AccountKind::Wallet, "alice").await.unwrap();
        let seen: Vec<_> = lines
            .iter()
            .map(|l| (l.kind.as_str(), l.amount, l.payment_id.as_deref()))
            .collect();
        assert_eq!(
            seen,
            [("topup", 1_000_000, None), ("capture", -300_000, Some("pay_old_captured"))]
        );
        assert_eq!(posted(&*store, AccountKind::Revenue, "author").await, 300_000);
        assert_eq!(posted(&*store, AccountKind::Clearing, "payments").await, 50_000);
        assert_sound(&*store).await;

        // The hold the old instance left open is its dead instance's: given
        // back by recovery, once.
        let now = now_ms();
        store.heartbeat(now, now + 60_000).await.unwrap();
        assert_eq!(store.release_orphaned_holds(now).await.unwrap(), 1);
        assert_eq!(store.release_orphaned_holds(now).await.unwrap(), 0);
        assert_eq!(available(&*store, "alice").await, units("0.70"));

        // The paid call it left unredeemed runs once, and its payment goes
        // from clearing to the author.
        let funding = Funding::InClearing { refund_to: None };
        assert!(store.claim_paid_intent("pay_old_intent", &funding).await.unwrap());
        assert!(!store.claim_paid_intent("pay_old_intent", &funding).await.unwrap(), "once");
        store.finish_intent(&outcome("pay_old_intent", true)).await.unwrap();
        assert_eq!(posted(&*store, AccountKind::Clearing, "payments").await, 0);
        assert_eq!(posted(&*store, AccountKind::Revenue, "author").await, 350_000);

        // And today's code goes on from there.
        let hold = super::tests::hold_request("pay_new", "alice", "0.10");
        assert_eq!(store.hold(&hold).await.unwrap(), HoldOutcome::Held);
        store.capture("pay_new", &Charge::whole(revenue(), units("0.10"))).await.unwrap();
        assert_eq!(available(&*store, "alice").await, units("0.60"));
        assert_eq!(posted(&*store, AccountKind::Revenue, "author").await, 450_000);
        assert_sound(&*store).await;
    }
}
