use std::time::Instant;
use tollgate::{config::Synchronous, money::*, store::*};
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let db = format!("sqlite://{}", dir.path().join("b.db").display());
    let store = SqliteStore::connect(&db, Synchronous::Normal).await?;
    let usd = Currency::parse("USD")?;
    store
        .topup(
            &AccountRef::wallet("w", &usd),
            Units::parse("100000")?,
            None,
        )
        .await?;
    if std::env::var("DROPIDX").is_ok() {
        for q in [
            "DROP INDEX holds_open",
            "DROP INDEX ledger_entries_txn",
            "DROP INDEX ledger_entries_account",
        ] {
            sqlx::query(q).execute(store.pool()).await?;
        }
    }
    let rev = AccountRef::new(AccountKind::Revenue, "r", &usd);
    let n = 3000;
    let mut th = 0.0;
    let mut tc = 0.0;
    for _ in 0..n {
        let id = new_id("pay");
        let t = Instant::now();
        store
            .hold(&HoldRequest {
                hold_id: id.clone(),
                principal: "w".into(),
                amount: Units(10000),
                currency: usd.clone(),
                tool: "echo".into(),
                args_hash: "x".into(),
                expires_at: now_ms() + 100000,
            })
            .await?;
        th += t.elapsed().as_secs_f64();
        let t = Instant::now();
        store.capture(&id, Units(10000), &rev).await?;
        tc += t.elapsed().as_secs_f64();
    }
    println!(
        "hold {:.1}µs capture {:.1}µs",
        th / n as f64 * 1e6,
        tc / n as f64 * 1e6
    );
    Ok(())
}
