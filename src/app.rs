//! Assembling a running tollgate from a config: store, provider, catalog,
//! receipt signer and gate. Shared by the binary, the tests and the bench.

use std::{path::PathBuf, sync::Arc, time::Duration};

use crate::{
    config::{Config, ConfigError, ProviderKind},
    gate::{Catalog, CatalogSources, Gate, GateSettings},
    provider::{Provider, ProviderError, local::LocalProvider, sessions_api::SessionsApiProvider},
    receipt::{ReceiptError, ReceiptSigner, default_key_path},
    store::{PgStore, SqliteStore, Store, StoreError, now_ms},
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
}

/// Opens the store a URL names: `postgres://…` (or `postgresql://…`) for a
/// PostgreSQL database shared by several instances, `sqlite://PATH` or a
/// bare path for a SQLite file.
pub async fn open_store(url: &str, config: &Config) -> Result<Arc<dyn Store>, AppError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Arc::new(PgStore::connect(url, &config.pool).await?));
    }
    let url = if url.contains("://") || url.starts_with("sqlite:") {
        url.to_owned()
    } else {
        format!("sqlite://{url}")
    };
    if !url.starts_with("sqlite:") {
        return Err(AppError::UnsupportedStore(url));
    }
    Ok(Arc::new(
        SqliteStore::connect(&url, config.synchronous).await?,
    ))
}

/// Where the receipt key lives: `TOLLGATE_RECEIPT_KEY`, the config, or the
/// user's data directory.
pub fn receipt_key_path(config: &Config) -> PathBuf {
    std::env::var_os("TOLLGATE_RECEIPT_KEY")
        .map(PathBuf::from)
        .or_else(|| config.receipt_key_file.clone())
        .unwrap_or_else(default_key_path)
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

/// The `tollgate` binary's gate: the built-in demo tools and the config's
/// upstreams.
pub async fn build_gate(config: &Config, store: Arc<dyn Store>) -> Result<Arc<Gate>, AppError> {
    let mut backends: Vec<Arc<dyn ToolBackend>> = vec![Arc::new(demo_tools())];
    backends.extend(upstreams(config).await?);
    build_gate_with(config, store, &backends)
}

/// A gate over the given tool backends.
pub fn build_gate_with(
    config: &Config,
    store: Arc<dyn Store>,
    backends: &[Arc<dyn ToolBackend>],
) -> Result<Arc<Gate>, AppError> {
    let catalog = Catalog::build(config, backends)?;
    let signer = ReceiptSigner::load_or_create(&receipt_key_path(config))?;
    let provider = provider_for(config, store.clone())?;
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
    });
    let gate = Arc::new(gate);
    // Upstreams may change their tools while we run.
    gate.watch_backends();
    Ok(gate)
}

/// Expires holds and intents past their time, and dynamic confirm tools
/// past theirs, now and then every `every`. Safe on several processes at
/// once: each expiry is a conditional update.
pub fn spawn_sweeper(gate: Arc<Gate>, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            gate.dynamic_tools().prune_expired().await;
            match gate.store().sweep_expired(now_ms()).await {
                Ok(0) => {}
                Ok(n) => tracing::info!("expired {n} holds past their time"),
                Err(e) => tracing::warn!("expiry sweep failed: {e}"),
            }
            tokio::time::sleep(every).await;
        }
    })
}
