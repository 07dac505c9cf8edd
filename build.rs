//! Lets the PostgreSQL variants of the tests run when
//! `TOLLGATE_TEST_POSTGRES` names a database server, and show as ignored
//! (with the reason) when it does not.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(tollgate_pg)");
    println!("cargo::rerun-if-env-changed=TOLLGATE_TEST_POSTGRES");
    // New migrations are embedded by `sqlx::migrate!`: rebuild when they change.
    println!("cargo::rerun-if-changed=migrations");
    println!("cargo::rerun-if-changed=build.rs");
    if std::env::var_os("TOLLGATE_TEST_POSTGRES").is_some_and(|url| !url.is_empty()) {
        println!("cargo::rustc-cfg=tollgate_pg");
    }
}
