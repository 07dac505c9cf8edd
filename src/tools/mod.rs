//! Tool backends: what actually runs once the gate lets a call through.

pub mod demo;
pub mod upstream;

use async_trait::async_trait;
use rmcp::model::{CallToolResult, JsonObject, Tool};

use crate::config::Unpriced;

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
    async fn call(&self, tool: &str, args: JsonObject) -> CallToolResult;
    /// What happens to this backend's tools that `pricing.toml` does not price.
    fn unpriced(&self) -> Unpriced {
        Unpriced::Free
    }
}
