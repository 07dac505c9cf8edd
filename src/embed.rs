//! Embedding the gate in your own Rust MCP server: register your tools as
//! async functions, price them in `pricing.toml`, and serve them through the
//! same gate, store, ledger and payment modes as the `tollgate` binary.
//!
//! ```no_run
//! use schemars::JsonSchema;
//! use serde::Deserialize;
//! use tollgate::{Caller, Tollgate};
//!
//! #[derive(Deserialize, JsonSchema)]
//! struct Forecast {
//!     /// City name.
//!     city: String,
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let pricing = r#"
//!     [server]
//!     name = "weather"
//!     currency = "USD"
//!     mode = "auto"
//!
//!     [[tools]]
//!     name = "forecast"
//!     price = "0.05"
//! "#;
//! let tollgate = Tollgate::from_pricing(pricing)?
//!     .tool("forecast", "Tomorrow's weather for a city.", |args: Forecast| async move {
//!         format!("Sunny in {} tomorrow.", args.city)
//!     })
//!     .build()
//!     .await?;
//! tollgate.serve_stdio(Caller { principal: Some("alice".into()) }).await?;
//! # Ok(())
//! # }
//! ```

use std::{future::Future, sync::Arc};

use rmcp::ServiceExt;
use schemars::JsonSchema;
use serde::de::DeserializeOwned;

use crate::{
    app::{self, AppError},
    config::{Config, ConfigError},
    gate::{Caller, Gate, SHUTDOWN_GRACE},
    server::TollgateServer,
    tools::{
        ToolBackend,
        functions::{FnTools, IntoToolResult},
    },
};

/// A running gate over your tools. Build one with [`Tollgate::builder`] or
/// [`Tollgate::from_pricing`].
pub struct Tollgate {
    gate: Arc<Gate>,
    /// `[server] max_message_bytes`: stdio's longest line.
    max_message_bytes: usize,
}

/// Collects tools and settings for a [`Tollgate`].
pub struct TollgateBuilder {
    config: Config,
    tools: FnTools,
    backends: Vec<Arc<dyn ToolBackend>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("MCP session failed: {0}")]
    Session(String),
}

impl Tollgate {
    pub fn builder(config: Config) -> TollgateBuilder {
        TollgateBuilder {
            config,
            tools: FnTools::new(),
            backends: Vec::new(),
        }
    }

    /// A builder from `pricing.toml` text.
    pub fn from_pricing(text: &str) -> Result<TollgateBuilder, ConfigError> {
        Ok(Self::builder(Config::parse(text, "<pricing>")?))
    }

    /// The gate itself (store, catalog, provider), for the HTTP service or
    /// custom transports.
    pub fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }

    /// The MCP handler for one session whose caller is `caller`.
    pub fn server(&self, caller: Caller) -> TollgateServer {
        TollgateServer::new(self.gate.clone(), caller)
    }

    /// Serves MCP over stdio until the client goes away, behind the same
    /// guard as `tollgate serve`: oversized, malformed and too deeply nested
    /// lines get a JSON-RPC error and never reach the gate. Then waits (up
    /// to [`SHUTDOWN_GRACE`]) for the calls still under way to be charged
    /// or released, so that a `main` that returns right after drops none
    /// of them with their holds open.
    pub async fn serve_stdio(&self, caller: Caller) -> Result<(), ServeError> {
        // The embedder's gate may serve other transports too: stdin's end
        // ends only this session (rmcp's own grace, then cancellation).
        let (transport, _stdin_closed) = crate::stdio_guard::transport(
            crate::stdio::stdin(),
            crate::stdio::stdout(),
            self.max_message_bytes,
        );
        let server = self.server(caller);
        let session = server.session_id().to_owned();
        let running = server
            .serve(transport)
            .await
            .map_err(|e| ServeError::Session(e.to_string()))?;
        let ended = running.waiting().await;
        let mut left = self.gate.calls_finished(SHUTDOWN_GRACE).await;
        // The session is over: its dynamic payments are ended.
        left += self.gate.end_session(&session).await;
        if left > 0 {
            tracing::warn!(
                "{left} call(s) still under way {}s after the client left; returning anyway",
                SHUTDOWN_GRACE.as_secs()
            );
        }
        ended.map_err(|e| ServeError::Session(e.to_string()))?;
        Ok(())
    }

    /// Stops taking calls (new ones get a JSON-RPC error, and calls waiting
    /// for a payment stop waiting, the payment left payable), and waits up
    /// to `grace` for the calls under way to be charged or released and
    /// answered: for an embedder's own shutdown, on a signal, before it
    /// stops its transports. How many calls had not finished.
    pub async fn shutdown(&self, grace: std::time::Duration) -> usize {
        self.gate.close();
        self.gate.calls_finished(grace).await
    }
}

impl TollgateBuilder {
    /// Adds a tool written as an async function of its typed arguments. Its
    /// price comes from `[[tools]]` in the pricing; an unpriced tool is free.
    pub fn tool<A, F, Fut, R>(
        mut self,
        name: impl Into<String>,
        description: impl Into<String>,
        handler: F,
    ) -> Self
    where
        A: DeserializeOwned + JsonSchema + Send + 'static,
        F: Fn(A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = R> + Send + 'static,
        R: IntoToolResult + 'static,
    {
        self.tools = self.tools.tool(name, description, handler);
        self
    }

    /// The longest a tool added with [`TollgateBuilder::tool`] may run
    /// (see [`FnTools::run_limit`]): a run past it is stopped and charges
    /// nothing, and a fast-path hold outlives it.
    pub fn run_limit(mut self, limit: std::time::Duration) -> Self {
        self.tools = self.tools.run_limit(limit);
        self
    }

    /// Adds another source of tools (anything implementing [`ToolBackend`]).
    pub fn backend(mut self, backend: Arc<dyn ToolBackend>) -> Self {
        self.backends.push(backend);
        self
    }

    /// Where the store lives, instead of the pricing's `[store] url`.
    pub fn store_url(mut self, url: impl Into<String>) -> Self {
        self.config.store_url = url.into();
        self
    }

    /// Opens the store, connects the pricing's upstreams, checks every price
    /// against the tools, and builds the gate.
    pub async fn build(self) -> Result<Tollgate, AppError> {
        let store = app::open_store(&self.config.store_url, &self.config).await?;
        let mut backends: Vec<Arc<dyn ToolBackend>> = vec![Arc::new(self.tools)];
        backends.extend(self.backends);
        backends.extend(app::upstreams(&self.config).await?);
        let gate = app::build_gate_with(&self.config, store, &backends).await?;
        Ok(Tollgate {
            gate,
            max_message_bytes: self.config.max_message_bytes,
        })
    }
}
