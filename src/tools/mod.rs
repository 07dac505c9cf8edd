//! Tool backends: what actually runs once the gate lets a call through.

pub mod demo;
pub mod functions;
pub mod schema;
pub mod upstream;

use async_trait::async_trait;
use rmcp::{
    Peer, RoleServer,
    model::{CallToolResult, JsonObject, ProgressToken, Tool},
};
use tokio_util::sync::CancellationToken;

use crate::config::Unpriced;

/// What a backend may use of the MCP call it serves: where to relay
/// progress, and the client's cancellation.
#[derive(Clone, Default)]
pub struct CallContext {
    /// The client's peer and progress token, when it asked for progress.
    pub progress: Option<(Peer<RoleServer>, ProgressToken)>,
    /// The progress value the client has already heard on that token (the
    /// gate's own notifications while the call waited for its payment): a
    /// backend's progress must go on from it, as MCP requires it to grow.
    pub progress_heard: f64,
    /// The client's peer, when it can answer an elicitation in this call,
    /// and how long such a request may wait.
    pub elicitation: Option<(Peer<RoleServer>, std::time::Duration)>,
    /// Cancelled when the client cancels the call.
    pub cancelled: CancellationToken,
}

/// Arguments that do not fit a tool's input schema.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid argument `{field}`: {message}")]
pub struct ArgumentError {
    /// Dotted path of the offending field, or `arguments` for the whole object.
    pub field: String,
    pub message: String,
}

/// A source of tools. The built-in demo tools are one; upstream MCP servers
/// come later.
#[async_trait]
pub trait ToolBackend: Send + Sync {
    /// The tools this backend serves, as it describes them (no prices).
    fn tools(&self) -> Vec<Tool>;
    /// Checks arguments against the tool's input schema without running it.
    fn validate(&self, tool: &str, args: &JsonObject) -> Result<(), ArgumentError>;
    /// Runs the tool. A tool failure is a result with `is_error: true`.
    async fn call(&self, tool: &str, args: JsonObject, context: &CallContext) -> CallToolResult;
    /// Ticks when the backend's tool list changes (upstreams that announce
    /// `tools/list_changed`); `None` for a fixed list.
    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    /// What happens to this backend's tools that `pricing.toml` does not price.
    fn unpriced(&self) -> Unpriced {
        Unpriced::Free
    }

    /// The longest a run may take, if the backend bounds it: a fast-path
    /// hold outlives it, so a long run is not left without its funds.
    fn run_limit(&self) -> Option<std::time::Duration> {
        None
    }

    /// Why this backend cannot serve its tools as they were given, if it
    /// cannot (two tools under one name, of which it serves only one; a
    /// tool whose arguments are not an object): the catalog refuses to
    /// start with it.
    fn misbuilt(&self) -> Option<&str> {
        None
    }
}
