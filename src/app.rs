//! Assembling a running tollgate from a config: store, provider, catalog,
//! receipt signer and gate. Shared by the binary, the tests and the bench.

use std::{
    panic::AssertUnwindSafe,
    path::PathBuf,
    sync::{
        Arc, Weak,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use futures::FutureExt;

use crate::{
    config::{Config, ConfigError, ProviderKind},
    gate::{Catalog, CatalogSources, Gate, GateSettings, Recovered, WithheldNotes},
    http::metrics,
    provider::{Provider, ProviderError, local::LocalProvider, sessions_api::SessionsApiProvider},
    receipt::{ReceiptError, ReceiptSigner, default_key_path},
    store::{PgStore, Pruned, SqliteStore, Store, StoreError, now_ms},
    tools::{
        ToolBackend,
        demo::demo_tools,
        upstream::{Upstream, UpstreamError},
    },
};

/// The shipped `pricing.toml`, used when no config file is found.
pub const DEFAULT_PRICING: &str = include_str!("../pricing.toml");

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Receipt(#[from] ReceiptError),
    #[error("store url `{0}`: use sqlite://PATH (or a bare path) or postgres://")]
    UnsupportedStore(String),
    #[error("the sessions_api provider reads its API key from ${0}, which is not set")]
    MissingSecret(String),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(
        "could not register this instance in the store (see the warnings above), so it does not serve"
    )]
    Unregistered,
}

/// Opens the store a URL names: `postgres://…` (or `postgresql://…`) for a
/// PostgreSQL database shared by several instances, `sqlite://PATH` or a
/// bare path for a SQLite file.
pub async fn open_store(url: &str, config: &Config) -> Result<Arc<dyn Store>, AppError> {
    if is_postgres(url) {
        return Ok(Arc::new(PgStore::connect(url, &config.pool).await?));
    }
    let url = sqlite_url(url)?;
    Ok(Arc::new(
        SqliteStore::connect(&url, config.synchronous).await?,
    ))
}

fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// The `sqlite:` URL a store URL that is not PostgreSQL's names (a bare
/// path is a file).
fn sqlite_url(url: &str) -> Result<String, AppError> {
    let url = if url.contains("://") || url.starts_with("sqlite:") {
        url.to_owned()
    } else {
        format!("sqlite://{url}")
    };
    if !url.starts_with("sqlite:") {
        return Err(AppError::UnsupportedStore(url));
    }
    Ok(url)
}

/// The file a SQLite store URL names, if it names one (not PostgreSQL, not
/// an in-memory database).
pub fn sqlite_file(url: &str) -> Option<PathBuf> {
    if is_postgres(url) {
        return None;
    }
    let url = sqlite_url(url).ok()?;
    if SqliteStore::in_memory(&url) {
        return None;
    }
    let options: sqlx::sqlite::SqliteConnectOptions = url.parse().ok()?;
    Some(options.get_filename().to_owned())
}

/// Where the receipt key lives: `TOLLGATE_RECEIPT_KEY`, the config, or the
/// user's data directory.
pub fn receipt_key_path(config: &Config) -> Result<PathBuf, ReceiptError> {
    match std::env::var_os("TOLLGATE_RECEIPT_KEY")
        .map(PathBuf::from)
        .or_else(|| config.receipt_key_file.clone())
    {
        Some(path) => Ok(path),
        None => default_key_path(),
    }
}

pub fn provider_for(config: &Config, store: Arc<dyn Store>) -> Result<Arc<dyn Provider>, AppError> {
    Ok(match &config.provider {
        ProviderKind::Local => Arc::new(LocalProvider::new(store, config.checkout_base_url())),
        ProviderKind::Mock => {
            tracing::warn!("provider `mock`: every payment is settled as soon as it is asked for");
            Arc::new(LocalProvider::new(store, config.checkout_base_url()).settling_at_once())
        }
        ProviderKind::SessionsApi { url, api_key_env } => {
            let key = std::env::var(api_key_env)
                .map_err(|_| AppError::MissingSecret(api_key_env.clone()))?;
            Arc::new(SessionsApiProvider::new(url, key)?)
        }
    })
}

/// The upstream MCP servers of the config, connected now (their tools must
/// be known to check the prices).
pub async fn upstreams(config: &Config) -> Result<Vec<Arc<dyn ToolBackend>>, AppError> {
    let mut backends: Vec<Arc<dyn ToolBackend>> = Vec::new();
    for upstream in &config.upstreams {
        backends.push(Upstream::connect(upstream).await?);
    }
    Ok(backends)
}

/// The `tollgate` binary's gate: the config's upstreams, and the built-in
/// demo tools if `[server] demo_tools` (by default, when there are no
/// upstreams).
pub async fn build_gate(config: &Config, store: Arc<dyn Store>) -> Result<Arc<Gate>, AppError> {
    let mut backends: Vec<Arc<dyn ToolBackend>> = Vec::new();
    if config.demo_tools {
        backends.push(Arc::new(demo_tools()));
    }
    backends.extend(upstreams(config).await?);
    build_gate_with(config, store, &backends).await
}

/// A gate over the given tool backends, with its upkeep running (see
/// [`spawn_upkeep`]) as long as the gate lives.
pub async fn build_gate_with(
    config: &Config,
    store: Arc<dyn Store>,
    backends: &[Arc<dyn ToolBackend>],
) -> Result<Arc<Gate>, AppError> {
    // Before the catalog is built: a tool list that changes while it is
    // being built is then seen as a change.
    let changes: Vec<_> = backends.iter().filter_map(|b| b.changes()).collect();
    let catalog = Catalog::build(config, backends)?;
    let provider = provider_for(config, store.clone())?;
    let key_path = receipt_key_path(config)?;
    let signer = ReceiptSigner::load_or_create(&key_path)?;
    let gate = Gate::new(
        store,
        provider,
        catalog,
        signer,
        GateSettings::from_config(config),
    )
    .with_sources(CatalogSources {
        config: config.clone(),
        backends: backends.to_vec(),
    })
    .noting_withheld_in(WithheldNotes::beside(&key_path));
    let gate = Arc::new(gate);
    gate.resume_withheld();
    // Upstreams may change their tools while we run.
    gate.watch_backends(changes);
    spawn_upkeep(&gate, Upkeep::from_config(config)).await?;
    Ok(gate)
}

/// How often a gate's upkeep runs, and what it keeps.
#[derive(Debug, Clone, Copy)]
pub struct Upkeep {
    /// This instance's lease: renewed every third of it.
    pub lease: Duration,
    /// Stored results and unpaid ended intents older than this are pruned.
    pub keep_results: Duration,
}

impl Upkeep {
    pub fn from_config(config: &Config) -> Self {
        Self {
            lease: config.instance_lease,
            keep_results: config.keep_results,
        }
    }

    fn every(&self) -> Duration {
        (self.lease / 3).min(Duration::from_secs(30))
    }
}

/// Registers this instance (before any call can open a hold in its name)
/// and keeps its lease renewed, every third of it, on a timer of its own:
/// a long upkeep pass (a large backlog to refund, a slow store) must not
/// let it lapse, or other instances would take this one's live holds for a
/// dead one's and release them. Until the gate is dropped, every third of
/// the lease, upkeep also expires holds, intents and dynamic confirm tools
/// past their time; recovers what dead instances left
/// (src/gate/recovery.rs; a lease after start, or after this instance's
/// own lease lapsed); and prunes
/// what is kept only for a while. Safe on several processes at once: each
/// step is a conditional update.
///
/// Fails if this instance cannot be registered: unregistered, it would be
/// taken for a dead one by the others on the store (several processes on one
/// SQLite file, or PostgreSQL), which release a dead one's holds and refund
/// its runs while its calls are under way.
pub async fn spawn_upkeep(gate: &Arc<Gate>, upkeep: Upkeep) -> Result<(), AppError> {
    let lease = Lease::default();
    let mut renewed = false;
    for attempt in 1..=REGISTRATION_ATTEMPTS {
        renewed = lease.renew(gate.store().as_ref(), upkeep.lease).await;
        if renewed {
            break;
        }
        if attempt < REGISTRATION_ATTEMPTS {
            tokio::time::sleep(RENEW_RETRY).await;
        }
    }
    if !renewed {
        return Err(AppError::Unregistered);
    }
    let weak = Arc::downgrade(gate);
    tokio::spawn({
        let (weak, lease) = (weak.clone(), lease.clone());
        async move {
            loop {
                // A failed renewal is tried again soon, not at the next
                // turn: by then the lease it failed to extend may have run
                // out, and other instances would take this one's holds.
                let wait = if renewed {
                    upkeep.every()
                } else {
                    RENEW_RETRY.min(upkeep.every())
                };
                tokio::time::sleep(wait).await;
                let Some(gate) = weak.upgrade() else { break };
                renewed = lease.renew(gate.store().as_ref(), upkeep.lease).await;
            }
        }
    });
    // Two loops: the second asks remote providers, which may take minutes
    // when one is slow, and the expiry sweep does not wait on it.
    every_while_alive(weak.clone(), upkeep.every(), move |gate| async move {
        sweep_pass(&gate, upkeep).await
    });
    every_while_alive(weak, upkeep.every(), move |gate| {
        let lease = lease.clone();
        async move { settle_pass(&gate, upkeep, &lease).await }
    });
    Ok(())
}

/// Runs `pass` on `owner` every `period` until the owner is dropped. A pass
/// that panics (a fault in tollgate) is logged and the next one runs all the
/// same: upkeep that stopped for good would leave holds unexpired and
/// nothing pruned, while the lease, renewed on its own timer, goes on
/// telling other instances that this one is alive.
fn every_while_alive<T, F, Fut>(owner: Weak<T>, period: Duration, pass: F)
where
    T: Send + Sync + 'static,
    F: Fn(Arc<T>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        while let Some(alive) = owner.upgrade() {
            if let Err(panic) = AssertUnwindSafe(pass(alive)).catch_unwind().await {
                let why = crate::sync::panic_message(&*panic);
                tracing::error!("an upkeep pass failed (it runs again next time): {why}");
            }
            tokio::time::sleep(period).await;
        }
    });
}

/// How soon a lease renewal that failed is tried again.
const RENEW_RETRY: Duration = Duration::from_secs(1);
/// How many times the first registration is tried before start-up fails.
const REGISTRATION_ATTEMPTS: u32 = 3;

/// This instance's lease, as it last renewed it.
#[derive(Clone, Default)]
struct Lease {
    /// Until when it runs (ms since the epoch; 0 before the first renewal
    /// lands).
    until: Arc<AtomicI64>,
    /// When it was registered, or last renewed after it had lapsed.
    resumed_at: Arc<AtomicI64>,
}

impl Lease {
    /// Renews this instance's lease; logged if it could not. A renewal
    /// that takes a third of the lease (a pool with no free connection) is
    /// given up and tried again.
    /// Whether it was renewed.
    async fn renew(&self, store: &dyn Store, lease: Duration) -> bool {
        let now = now_ms();
        let until = now.saturating_add(millis(lease));
        match tokio::time::timeout(lease / 3, store.heartbeat(now, until)).await {
            Ok(Ok(())) => {
                let before = self.until.swap(until, Ordering::AcqRel);
                if before <= now {
                    // Just started, or it was asleep (a laptop's lid
                    // closed) or cut off from the store: the other
                    // instances on it may have been asleep too, and their
                    // timers may not have fired yet to renew their leases.
                    if before != 0 {
                        tracing::warn!(
                            "this instance's lease had lapsed; it recovers no other instance's \
                             work for a lease, so that those alive can renew theirs"
                        );
                    }
                    self.resumed_at.store(now, Ordering::Release);
                }
                return true;
            }
            Ok(Err(e)) => tracing::warn!("could not renew this instance's lease: {e}"),
            Err(_) => tracing::warn!("renewing this instance's lease took too long"),
        }
        false
    }

    /// Whether the lease runs now, and has for a whole lease since it was
    /// registered or last lapsed: a live instance renews every third of a
    /// lease, each try cut short at another third, so only then can
    /// another instance's lapsed lease be told from one that lapsed while
    /// the host slept.
    fn held(&self, lease: Duration) -> bool {
        let now = now_ms();
        self.until.load(Ordering::Acquire) > now
            && now >= (self.resumed_at.load(Ordering::Acquire)).saturating_add(millis(lease))
    }
}

fn millis(span: Duration) -> i64 {
    i64::try_from(span.as_millis()).unwrap_or(i64::MAX)
}

/// Counts and logs what recovery did: what dead instances left (a warning:
/// a crash happened), and the routine settling of payments never used or
/// paid at a remote past their time.
fn report_recovered(r: &Recovered) {
    for (event, count) in [
        ("orphaned_hold_released", r.holds_released),
        ("interrupted_run_refunded", r.runs_refunded),
        ("unredeemed_refunded", r.unredeemed_refunded),
        ("remote_paid_kept", r.remote_paid_kept),
        ("remote_expired", r.remote_expired),
    ] {
        metrics::record_upkeep(event, count);
    }
    if r.holds_released + r.runs_refunded > 0 {
        tracing::warn!(
            holds_released = r.holds_released,
            runs_refunded = r.runs_refunded,
            "recovered what dead instances left: open holds released, interrupted paid runs \
             refunded"
        );
    }
    if r.unredeemed_refunded + r.remote_paid_kept + r.remote_expired > 0 {
        tracing::info!(
            unredeemed_refunded = r.unredeemed_refunded,
            remote_paid_kept = r.remote_paid_kept,
            remote_expired = r.remote_expired,
            "refunded payments never redeemed, and settled remote payments past their time"
        );
    }
}

/// What upkeep keeps only for a while ends before this.
fn kept_since(upkeep: Upkeep) -> i64 {
    now_ms().saturating_sub(i64::try_from(upkeep.keep_results.as_millis()).unwrap_or(i64::MAX))
}

/// One round of the store's own upkeep: holds and payments past their time
/// are ended, and what is kept only for a while is pruned. It asks no
/// provider, so a slow one cannot hold it up.
async fn sweep_pass(gate: &Gate, upkeep: Upkeep) {
    let store = gate.store();
    match store.sweep_expired(now_ms()).await {
        Ok(0) => {}
        Ok(n) => {
            metrics::record_upkeep("hold_expired", n);
            tracing::info!("expired {n} holds past their time");
        }
        Err(e) => tracing::warn!("expiry sweep failed: {e}"),
    }
    match store.prune(kept_since(upkeep)).await {
        Ok(pruned) if pruned == Pruned::default() => {}
        Ok(pruned) => tracing::info!(
            results = pruned.results,
            intents = pruned.intents,
            sessions = pruned.sessions,
            holds = pruned.holds,
            "pruned what is kept only for a while"
        ),
        Err(e) => tracing::warn!("pruning failed: {e}"),
    }
}

/// One round of settling what calls left behind, which may wait on remote
/// providers. Recovery runs only while this instance's own lease runs
/// (looked at just before), and has for a lease since it was registered or
/// last lapsed: otherwise it could not tell which instances are really gone.
async fn settle_pass(gate: &Gate, upkeep: Upkeep, lease: &Lease) {
    if lease.held(upkeep.lease) {
        match gate.recover_interrupted(kept_since(upkeep)).await {
            Ok(r) => report_recovered(&r),
            Err(e) => tracing::warn!("crash recovery failed: {e}"),
        }
    }
    gate.end_due_confirm_tools(None).await;
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// Several processes on one store wake from a host's sleep with every
    /// lease lapsed. The first to renew, or one started just then, must not
    /// take the others, whose timers have not fired yet, for dead: it
    /// recovers nothing for a lease. (It released their live holds and
    /// refunded their runs under way.)
    #[tokio::test]
    async fn an_instance_that_starts_or_wakes_waits_before_recovering_others() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::testing::TestDb::fresh(dir.path());
        let store = crate::testing::open_store(&db.url).await.unwrap();
        let span = Duration::from_secs(30);
        let lease = Lease::default();
        let a_lease_on = || lease.resumed_at.fetch_sub(millis(span), Ordering::AcqRel);
        assert!(!lease.held(span), "not before it is registered");
        // Started as the host wakes: the others may not have renewed yet.
        assert!(lease.renew(store.as_ref(), span).await);
        assert!(!lease.held(span), "registered a moment ago");
        a_lease_on();
        assert!(lease.held(span), "the others have had their turn to renew");
        // The host sleeps past the lease; on waking, the lease is renewed.
        lease.until.store(now_ms() - 1, Ordering::Release);
        assert!(!lease.held(span), "lapsed");
        assert!(lease.renew(store.as_ref(), span).await);
        assert!(!lease.held(span), "renewed, but it lapsed a moment ago");
        a_lease_on();
        assert!(lease.held(span));
        // A renewal in time is no lapse.
        assert!(lease.renew(store.as_ref(), span).await);
        assert!(lease.held(span));
    }

    /// What recovery did is counted in `/metrics`, by event (it was only
    /// logged, and routine refunds of unused payments as a crash warning).
    #[test]
    fn recovery_is_counted_by_event() {
        let recorder = metrics::recorder().expect("the recorder is installed");
        let shown = |event: &str| {
            let line = format!("tollgate_upkeep_total{{event=\"{event}\"}} ");
            recorder
                .render()
                .lines()
                .find_map(|l| l.strip_prefix(&line).and_then(|n| n.parse::<u64>().ok()))
                .unwrap_or(0)
        };
        let before = (
            shown("orphaned_hold_released"),
            shown("unredeemed_refunded"),
        );
        report_recovered(&Recovered {
            holds_released: 2,
            unredeemed_refunded: 1,
            ..Recovered::default()
        });
        assert_eq!(shown("orphaned_hold_released"), before.0 + 2);
        assert_eq!(shown("unredeemed_refunded"), before.1 + 1);
    }

    #[tokio::test]
    async fn a_pass_that_panics_does_not_stop_the_passes_after_it() {
        let passes = Arc::new(AtomicUsize::new(0));
        every_while_alive(
            Arc::downgrade(&passes),
            Duration::from_millis(5),
            |passes| async move {
                if passes.fetch_add(1, Ordering::SeqCst) == 0 {
                    panic!("a fault in the first pass");
                }
            },
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while passes.load(Ordering::SeqCst) < 3 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "passes stopped after a panic"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Once the owner is dropped, the passes end.
        let weak = Arc::downgrade(&passes);
        drop(passes);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(weak.upgrade().is_none(), "a pass keeps its owner alive");
    }
}
