//! The CLI on its own: bad pricing files, wallets, and `ledger verify` on a
//! hand-corrupted database.

use crate::harness::*;

async fn start_error(env: &Env) -> String {
    let out = env.cli(&["serve"]).await;
    assert!(
        !out.status.success(),
        "a bad pricing file must stop the server"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

on_both_backends! {
    #[tokio::test]
    async fn bad_pricing_files_fail_at_start_naming_field_and_line() {
        let cases = [
            (
                "price = \"-0.01\"",
                "pricing.toml:14: tools[0].price of `echo`: amount -0.01 is negative",
            ),
            (
                "price = \"NaN\"",
                "pricing.toml:14: tools[0].price of `echo`: `NaN` is not a decimal amount",
            ),
            ("price = \"1e3\"", "`1e3` is not a decimal amount"),
            ("price = 0.01", "write the price as a quoted decimal string"),
            (
                "price = \"0.01\"\nmode = \"barter\"",
                "pricing.toml:15: tools[0].mode of `echo`: unknown mode `barter`",
            ),
        ];
        for (line, expected) in cases {
            let env = Env::with_pricing(&pricing("resubmit", "").replacen("price = \"0.01\"", line, 1));
            let err = start_error(&env).await;
            assert!(
                err.contains(expected),
                "for {line:?} expected {expected:?} in: {err}"
            );
        }

        let env = Env::with_pricing(&format!(
            "{}\n[[tools]]\nname = \"echo\"\nprice = \"0.02\"\n",
            pricing("resubmit", "")
        ));
        let err = start_error(&env).await;
        assert!(
            err.contains("tools[2].name: duplicate tool `echo` (first priced on line 13)"),
            "{err}"
        );

        let env = Env::with_pricing(&format!(
            "{}\n[[tools]]\nname = \"ghost\"\nprice = \"1\"\n",
            pricing("resubmit", "")
        ));
        let err = start_error(&env).await;
        assert!(
            err.contains("pricing.toml:21: tools.name: no backend provides a tool named `ghost`"),
            "{err}"
        );

        // A currency code nobody holds (a typo) would open wallets and
        // prices in it.
        let env = Env::with_pricing(&pricing("resubmit", "").replacen("\"USD\"", "\"UDS\"", 1));
        let err = start_error(&env).await;
        assert!(
            err.contains("pricing.toml:4: server.currency: `UDS` is not an ISO 4217 currency code"),
            "{err}"
        );

        let env = Env::with_pricing(&pricing("telepathy", ""));
        let err = start_error(&env).await;
        assert!(
            err.contains("pricing.toml:3: server.mode: unknown mode `telepathy`"),
            "{err}"
        );

        let env = Env::with_pricing(
            "[server]\nname = \"x\"\ncurrency = \"USD\"\n[[tools]]\nname = \"echo\"\n",
        );
        let err = start_error(&env).await;
        assert!(err.contains("price"), "{err}");
    }
}

on_both_backends! {
    #[tokio::test]
    async fn wallet_commands_refuse_bad_amounts_without_touching_state() {
        let env = Env::new("resubmit");
        for bad in ["-5", "abc", "0", "0.0000001"] {
            let out = env.cli(&["wallet", "topup", "alice", bad]).await;
            assert!(!out.status.success(), "topup {bad} must fail");
        }
        let out = env.cli(&["wallet", "topup", "alice", "5", "--currency", "usx"]).await;
        assert!(!out.status.success(), "a top-up in no real currency must fail");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("`USX` is not an ISO 4217 currency code"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Money comes in whole cents: a tenth of one is refused, not rounded.
        let out = env.cli(&["wallet", "topup", "alice", "0.001"]).await;
        assert!(!out.status.success(), "a top-up finer than a cent must fail");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(
                "a top-up is whole minor units of USD: 0.001 USD has more decimal places than \
                 USD's minor unit (2)"
            ),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // None of them made a wallet (in USX or any other currency).
        let out = env.cli(&["wallet", "balance", "alice"]).await;
        assert!(!out.status.success());
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.contains("no wallet named `alice`"), "{said}");
        env.topup("alice", "2.5").await;
        let out = env.ok(&["wallet", "balance", "alice"]).await;
        assert!(
            out.contains("alice: balance 2.50 USD, held 0.00 USD, available 2.50 USD"),
            "{out}"
        );
        // With an idempotency key, running the command again credits nothing.
        let keyed = ["wallet", "topup", "alice", "1", "--idempotency-key", "order-77"];
        assert!(env.ok(&keyed).await.starts_with("topped up alice with 1.00 USD"));
        assert!(env.ok(&keyed).await.starts_with("already topped up alice with 1.00 USD"));
        let other = env.cli(&["wallet", "topup", "alice", "2", "--idempotency-key", "order-77"]).await;
        assert!(!other.status.success());
        assert!(String::from_utf8_lossy(&other.stderr).contains("used for another top-up"));
        assert_eq!(env.available("alice").await, "3.50");
        // A wallet in a code recorded before codes were checked (not ISO's)
        // can still have its limits set; a new such code cannot be made.
        let legacy = "INSERT INTO accounts (kind, name, currency, created_at) VALUES ('wallet', 'alice', 'CRD', 0)";
        tollgate::testing::execute(&env.db, legacy).await.unwrap();
        let set = env.ok(&["wallet", "limits", "alice", "--currency", "crd", "--daily", "1"]).await;
        assert!(set.contains("daily:    1.00"), "{set}");
        let out = env.cli(&["wallet", "limits", "alice", "--currency", "CRE", "--daily", "1"]).await;
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("not an ISO 4217"), "{out:?}");
        env.assert_ledger_ok().await;
    }
}

async fn corrupt(env: &Env, sql: &str) {
    tollgate::testing::execute(&env.db, sql)
        .await
        .expect("corrupt the database");
}

on_both_backends! {
    #[tokio::test]
    async fn ledger_verify_fails_on_a_hand_corrupted_database() {
        let env = Env::new("resubmit");
        env.topup("alice", "1.00").await;
        env.assert_ledger_ok().await;

        corrupt(
            &env,
            "UPDATE accounts SET balance = balance + 1 WHERE kind = 'wallet'",
        )
        .await;
        let out = env.cli(&["ledger", "verify"]).await;
        assert_eq!(out.status.code(), Some(1));
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(
            report.contains("ledger BROKEN") && report.contains("wallet:alice (USD): balance 1.000001"),
            "{report}"
        );

        let env = Env::new("resubmit");
        env.topup("alice", "1.00").await;
        corrupt(
            &env,
            "INSERT INTO ledger_entries (txn_id, account_id, amount, created_at)
         SELECT txn_id, account_id, 5, 0 FROM ledger_entries LIMIT 1",
        )
        .await;
        let out = env.cli(&["ledger", "verify"]).await;
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).contains("not zero"));

        // A hold just past its expiry is the sweep's to end, at its next
        // pass: no break. One left open for long is.
        let env = Env::new("resubmit");
        env.topup("alice", "1.00").await;
        let hold = |id: &str, expired_ago_ms: i64| {
            format!(
                "INSERT INTO holds (id, account_id, amount, status, principal, tool, args_hash, created_at, expires_at)
                 SELECT '{id}', id, 1, 'open', 'alice', 'echo', '', 0, {} FROM accounts WHERE kind = 'wallet'",
                tollgate::store::now_ms() - expired_ago_ms
            )
        };
        corrupt(&env, &hold("hold_recent", 5_000)).await;
        // As the store's hold would (on SQLite a trigger already did).
        corrupt(
            &env,
            "UPDATE accounts SET held = (SELECT COALESCE(SUM(h.amount), 0) FROM holds h
             WHERE h.account_id = accounts.id AND h.status = 'open') WHERE kind = 'wallet'",
        )
        .await;
        let out = env.cli(&["ledger", "verify"]).await;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
        corrupt(&env, &hold("hold_stale", 10 * 60_000)).await;
        let out = env.cli(&["ledger", "verify"]).await;
        assert!(!out.status.success());
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(
            report.contains("hold hold_stale is open over 2 minutes past its expiry")
                && !report.contains("hold_recent"),
            "{report}"
        );
    }
}

/// A command that only reads refuses a database that is not there (a
/// mistyped `--db` would otherwise be created empty and shown as empty
/// wallets and a sound ledger); `receipt verify` checks with the key that
/// signed and makes none up; a wallet's name is trimmed, as a principal's is.
#[tokio::test]
async fn reading_commands_create_nothing_and_wallet_names_are_trimmed() {
    let env = Env::new("resubmit");
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("typo.db");
    let typo = typo.to_str().unwrap();
    for args in [
        &["wallet", "balance", "alice"][..],
        &["wallet", "statement", "alice"],
        &["wallet", "limits", "alice"],
        &["sessions", "list"],
        &["keys", "list"],
        &["ledger", "verify"],
        &["ledger", "statement", "--wallet", "alice"],
    ] {
        let out = env.cli(&[&["--db", typo][..], args].concat()).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains("no database at"), "{args:?}: {stderr}");
    }
    assert!(
        !std::path::Path::new(typo).exists(),
        "a database was created"
    );

    let no_key = dir.path().join("receipt.key");
    let out = env
        .command()
        .env("TOLLGATE_RECEIPT_KEY", &no_key)
        .args(["receipt", "verify", "tgr1.e30.AAAA"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("no receipt key at"), "{stderr}");
    assert!(!no_key.exists(), "a key was made up");

    env.ok(&["wallet", "topup", " alice ", "1"]).await;
    assert_eq!(env.available("alice").await, "1.00");
    let out = env.cli(&["wallet", "topup", "  ", "1"]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("a wallet name cannot be empty"));

    // A misspelt wallet is said so, not shown as one with no funds; paying
    // from it makes no account; and setting its limits (which may come
    // before a first top-up) says it is new.
    for args in [
        &["wallet", "balance", "alcie"][..],
        &["wallet", "statement", "alcie"],
    ] {
        let out = env.cli(args).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            stderr.contains("no wallet named `alcie`"),
            "{args:?}: {stderr}"
        );
    }
    let client = env.client(None).await;
    let id = payment_id_of(&call(&client, "echo", echo_args("hi")).await);
    let out = env.cli(&["sessions", "pay", &id, "--from", "alcie"]).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no wallet named `alcie`"),
        "{out:?}"
    );
    let listed = env.ok(&["sessions", "list"]).await;
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("pending")),
        "still unpaid: {listed}"
    );
    client.cancel().await.ok();
    let out = env.cli(&["wallet", "statement", "alcie"]).await;
    assert!(!out.status.success(), "paying from alcie made a wallet");
    let out = env
        .cli(&["wallet", "limits", "alcie", "--daily", "1"])
        .await;
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("note: wallet alcie is new here"),
        "{stderr}"
    );
    let out = env
        .cli(&["wallet", "limits", "alice", "--daily", "1"])
        .await;
    assert!(!String::from_utf8_lossy(&out.stderr).contains("is new here"));

    // A misspelt account is said so, not shown as an empty statement or
    // export; a beneficiary's name is trimmed as a wallet's is.
    for args in [
        &["ledger", "statement", "--wallet", "alcie"][..],
        &["ledger", "statement", "--beneficiary", "nobody"],
        &["ledger", "export", "--format", "csv", "--wallet", "alcie"],
        &[
            "ledger",
            "export",
            "--format",
            "jsonl",
            "--beneficiary",
            "nobody",
        ],
    ] {
        let out = env.cli(args).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            stderr.contains("has no entries: no such account"),
            "{args:?}: {stderr}"
        );
    }
    let csv = env
        .ok(&["ledger", "export", "--format", "csv", "--wallet", " alice "])
        .await;
    assert_eq!(csv.lines().count(), 2, "the header and the top-up: {csv}");
    // A window with nothing in it is an empty export, not an error.
    let csv = env
        .ok(&[
            "ledger",
            "export",
            "--format",
            "csv",
            "--wallet",
            "alice",
            "--until",
            "2020-01-01",
        ])
        .await;
    assert_eq!(csv.lines().count(), 0, "{csv}");
    for limit in ["--limit=-1", "--limit=0"] {
        let out = env.cli(&["sessions", "list", limit]).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{limit}: refused on every backend");
        assert!(stderr.contains("is not in 1.."), "{limit}: {stderr}");
    }
    env.assert_ledger_ok().await;
}

on_both_backends! {
    /// A database a newer tollgate has migrated is refused, saying so and
    /// what to do, and left as it was. (Rolled back after an upgrade, this
    /// build would otherwise misread the newer shape.) On PostgreSQL, a
    /// database that does not exist and a server that refuses the
    /// connection each say so. Every cause of an error is said once.
    #[tokio::test]
    async fn a_database_it_cannot_use_is_refused_saying_why_once() {
        let env = Env::new("resubmit");
        assert!(env.cli(&["wallet", "topup", "alice", "1.00"]).await.status.success());
        let postgres = env.db.starts_with("postgres");
        let checksum = if postgres { "decode('00', 'hex')" } else { "X'00'" };
        let newer = format!(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
             VALUES (9999, 'from a newer tollgate', TRUE, {checksum}, 1)"
        );
        tollgate::testing::execute(&env.db, &newer).await.unwrap();
        for args in [&["serve"][..], &["wallet", "balance", "alice"]] {
            let out = env.cli(args).await;
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{args:?} used it: {stderr}");
            assert!(
                stderr.contains("written by a newer tollgate: its migration 9999 is unknown")
                    && stderr.contains("Run that tollgate (or a newer one)"),
                "{args:?}: {stderr}"
            );
            assert_eq!(stderr.matches("9999").count(), 1, "said once: {stderr}");
        }
        let forget = "DELETE FROM _sqlx_migrations WHERE version = 9999";
        assert_eq!(tollgate::testing::execute(&env.db, forget).await.unwrap(), 1);
        let out = env.cli(&["wallet", "balance", "alice"]).await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && stdout.contains("available 1.00 USD"), "{stdout}");

        if postgres {
            // A database that does not exist (sqlx says the server's message,
            // then gives it as the cause), and a port nothing listens on (the
            // pool would retry until its timeout and say only that).
            let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
            let refused = format!("postgres://postgres@{closed}/postgres");
            let missing = tollgate::testing::database_url(&env.db, "tollgate_no_such_database");
            for (db, why) in [(missing.as_str(), "does not exist"), (&refused, "refused")] {
                let cwd = tempfile::tempdir().unwrap();
                let out = env.cli_on(db, cwd.path(), &["wallet", "balance", "alice"]).await;
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert!(!out.status.success(), "{db}");
                assert_eq!(stderr.matches(why).count(), 1, "{db}, said once: {stderr}");
            }
        }
    }
}

/// Another program's SQLite database (tables, none of them tollgate's) is
/// refused by every command, even one that only reads, and left exactly as
/// it was: no tables added, no journal mode changed, no files beside it.
#[tokio::test]
async fn another_programs_sqlite_database_is_refused_and_left_untouched() {
    let env = Env::new("resubmit");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.db");
    let db = path.display().to_string();
    // A program that keeps its migrations with sqlx, as tollgate does.
    for create in [
        "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)",
        "CREATE TABLE _sqlx_migrations (version BIGINT PRIMARY KEY, description TEXT NOT NULL)",
    ] {
        tollgate::testing::execute(&format!("sqlite://{db}?mode=rwc"), create)
            .await
            .unwrap();
    }
    let before = std::fs::read(&path).unwrap();
    for args in [
        &["serve"][..],
        &["wallet", "balance", "alice"],
        &["wallet", "topup", "alice", "1"],
        &["ledger", "verify"],
    ] {
        let out = env.cli_on(&db, dir.path(), args).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} used it: {stderr}");
        assert!(
            stderr.contains(&format!("`{db}` is another program's SQLite database"))
                && stderr.contains("give tollgate a database file of its own"),
            "{args:?}: {stderr}"
        );
    }
    assert!(std::fs::read(&path).unwrap() == before, "the file changed");
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(files, ["notes.db"], "files made beside it");
}

/// An in-memory SQLite store is refused at start, naming it: the store's
/// own connections would each open another database (and one of them a
/// file named after it), so every write failed with "no such table".
#[tokio::test]
async fn an_in_memory_sqlite_store_is_refused_at_start() {
    let env = Env::new("resubmit");
    for url in [
        "sqlite::memory:",
        "sqlite://:memory:",
        ":memory:",
        "sqlite://tollgate.db?mode=memory",
    ] {
        for args in [&["serve"][..], &["wallet", "topup", "alice", "1"]] {
            let cwd = tempfile::tempdir().unwrap();
            let out = env.cli_on(url, cwd.path(), args).await;
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{url} {args:?} succeeded");
            assert!(
                stderr.contains(url)
                    && stderr.contains("is an in-memory SQLite database")
                    && stderr.contains("give the path of a database file"),
                "{url} {args:?}: {stderr}"
            );
            let made: Vec<_> = std::fs::read_dir(cwd.path()).unwrap().collect();
            assert!(made.is_empty(), "{url} {args:?} made {made:?}");
        }
    }
}

/// With no key configured and no data directory (neither XDG_DATA_HOME nor
/// HOME, as in a bare service unit), the server refuses to start and says
/// what to set, rather than keep its receipt key in a shared directory or
/// wherever it happens to be started.
#[tokio::test]
async fn without_a_place_for_the_receipt_key_the_server_says_what_to_set() {
    let env = Env::new("resubmit");
    let out = env
        .command()
        .env_remove("TOLLGATE_RECEIPT_KEY")
        .env_remove("HOME")
        .env_remove("XDG_DATA_HOME")
        .arg("serve")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("run tollgate");
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("neither XDG_DATA_HOME nor HOME is set"),
        "{said}"
    );
    assert!(said.contains("[receipts] key_file"), "{said}");
}

/// A server that cannot register its instance in the store does not serve:
/// the other processes on the store would take it for a dead one and release
/// its holds under its calls. (It used to serve all the same, and register
/// at a later renewal.)
#[tokio::test]
async fn a_server_that_cannot_register_its_instance_does_not_serve() {
    let env = Env::new("resubmit");
    env.topup("alice", "1.00").await;
    corrupt(
        &env,
        "CREATE TRIGGER instances_down BEFORE INSERT ON instances
         BEGIN SELECT RAISE(ABORT, 'the store refuses this write'); END",
    )
    .await;
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        env.command()
            .arg("serve")
            .stdin(std::process::Stdio::null())
            .output(),
    )
    .await
    .expect("it gives up, not waits")
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("could not register this instance in the store"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "nothing on the MCP channel");
}

/// dev_settle lets anyone settle a payment for nothing at the checkout
/// page: the HTTP service refuses it on an address that is not loopback.
#[tokio::test]
async fn dev_settle_is_refused_on_an_address_others_can_reach() {
    let pricing = crate::harness::pricing("two_step", "")
        .replace("[store]", "[provider]\ndev_settle = true\n\n[store]");
    let env = Env::with_pricing(&pricing);
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        env.command()
            .args(["serve", "--http", "0.0.0.0:0"])
            .stdin(std::process::Stdio::null())
            .output(),
    )
    .await
    .expect("it refuses, not serves")
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("dev_settle = true lets anyone settle payments for nothing"),
        "{stderr}"
    );
}

/// Runs `args` with stdout a pipe nobody reads any more, as in
/// `tollgate sessions list | head -0`.
async fn with_stdout_closed(env: &Env, args: &[&str]) -> std::process::Output {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    env.command()
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run tollgate")
        .wait_with_output()
        .await
        .expect("run tollgate")
}

/// A reader that stops reading (`| head -1`) ends a command quietly, as it
/// would `cat`: no panic, no error. A broken ledger still fails its verify.
#[tokio::test]
async fn a_command_whose_output_is_not_read_ends_quietly() {
    let env = Env::new("resubmit");
    env.topup("alice", "1.00").await;
    env.mcp_key("alice").await;
    let client = env.client(Some("alice")).await;
    let paid = call(&client, "echo", echo_args("hello")).await;
    let receipt = payment_meta(&paid)["receipt"]
        .as_str()
        .expect("a receipt")
        .to_owned();
    client.cancel().await.ok();
    for args in [
        &["sessions", "list"][..],
        &["keys", "list"],
        &["wallet", "balance", "alice"],
        &["wallet", "statement", "alice"],
        &["ledger", "statement", "--wallet", "alice"],
        &["ledger", "export", "--format", "csv"],
        &["ledger", "export", "--format", "jsonl"],
        &["ledger", "verify"],
        &["receipt", "verify", &receipt],
    ] {
        let out = with_stdout_closed(&env, args).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(
            !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
            "{args:?}: {stderr}"
        );
    }
    corrupt(
        &env,
        "UPDATE accounts SET balance = balance + 1 WHERE kind = 'wallet'",
    )
    .await;
    let out = with_stdout_closed(&env, &["ledger", "verify"]).await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What the CLI says for people: `serve --help` names both transports,
/// `keys list` shows a key's label, and setting limits logs no raw
/// micro-units.
#[tokio::test]
async fn the_cli_shows_labels_help_and_limits_as_people_read_them() {
    let env = Env::new("resubmit");
    let help = env.ok(&["serve", "--help"]).await;
    let first = help.lines().next().unwrap_or_default();
    assert!(first.contains("stdio") && first.contains("HTTP"), "{help}");

    let labelled = env
        .ok(&[
            "keys",
            "create",
            "--principal",
            "shop",
            "--scope",
            "mcp",
            "--label",
            "billing-bot",
        ])
        .await;
    let id = tollgate::keys::key_id(labelled.trim())
        .expect("a key")
        .to_owned();
    let plain = env.mcp_key("shop").await;
    let plain_id = tollgate::keys::key_id(&plain).expect("a key").to_owned();
    let listed = env.ok(&["keys", "list"]).await;
    let row = |id: &str| {
        listed
            .lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_default()
            .to_owned()
    };
    assert!(
        listed.lines().next().unwrap_or_default().ends_with("label"),
        "{listed}"
    );
    assert!(row(&id).ends_with("  billing-bot"), "{listed}");
    assert!(row(&plain_id).ends_with("  -"), "{listed}");

    env.topup("alice", "1").await;
    let out = env
        .command()
        .env("TOLLGATE_LOG", "tollgate=info")
        .args([
            "wallet",
            "limits",
            "alice",
            "--daily",
            "5",
            "--per-call",
            "0.25",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("run tollgate");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("wallet limits set"), "{stderr}");
    assert!(!stderr.contains("Units("), "{stderr}");
    assert!(
        stdout.contains("per call: 0.25") && stdout.contains("daily:    5.00"),
        "{stdout}"
    );
}
