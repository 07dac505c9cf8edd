//! Upstream MCP servers: tollgate connects to them as an MCP client (rmcp)
//! and serves their tools, priced in `pricing.toml`, through the same gate.
//! The upstream validates its own arguments; whatever it answers with
//! `isError`, and any transport failure or timeout, is a tool error, so the
//! gate releases the hold (or refunds) and nothing is charged.

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
};

use async_trait::async_trait;
use rmcp::{
    RoleClient, ServiceExt,
    model::{
        CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, JsonObject, Tool,
    },
    service::RunningService,
    transport::{
        ConfigureCommandExt, StreamableHttpClientTransport, TokioChildProcess,
        streamable_http_client::StreamableHttpClientTransportConfig,
    },
};

use super::{ArgumentError, ToolBackend};
use crate::config::{Unpriced, UpstreamConfig, UpstreamTransport};

#[derive(Debug, thiserror::Error)]
#[error("upstream `{name}`: {message}")]
pub struct UpstreamError {
    pub name: String,
    pub message: String,
}

type Client = RunningService<RoleClient, ()>;

pub struct Upstream {
    config: UpstreamConfig,
    client: tokio::sync::RwLock<Option<Client>>,
    /// The upstream's tools as served here (names prefixed).
    tools: RwLock<Vec<Tool>>,
}

impl Upstream {
    /// Connects and lists the upstream's tools; an upstream that cannot be
    /// reached at start is an error, because its prices cannot be checked.
    pub async fn connect(config: &UpstreamConfig) -> Result<Arc<Self>, UpstreamError> {
        let upstream = Arc::new(Self {
            config: config.clone(),
            client: tokio::sync::RwLock::new(None),
            tools: RwLock::new(Vec::new()),
        });
        upstream.open().await.map_err(|message| UpstreamError {
            name: config.name.clone(),
            message,
        })?;
        Ok(upstream)
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    fn served_name(&self, tool: &str) -> String {
        format!("{}{tool}", self.config.prefix.as_deref().unwrap_or(""))
    }

    /// (Re)connects and refreshes the tool list.
    async fn open(&self) -> Result<(), String> {
        let client = match &self.config.transport {
            UpstreamTransport::Stdio { command, env, cwd } => {
                let (program, args) = command.split_first().ok_or("empty command")?;
                let cmd = tokio::process::Command::new(program).configure(|cmd| {
                    cmd.args(args).envs(env);
                    if let Some(cwd) = cwd {
                        cmd.current_dir(cwd);
                    }
                });
                let (transport, _stderr) = TokioChildProcess::builder(cmd)
                    .stderr(std::process::Stdio::inherit())
                    .spawn()
                    .map_err(|e| format!("cannot start {program}: {e}"))?;
                ().serve(transport)
                    .await
                    .map_err(|e| format!("handshake failed: {e}"))?
            }
            UpstreamTransport::Http { url, headers } => {
                let mut config = StreamableHttpClientTransportConfig::with_uri(url.as_str());
                let mut custom = std::collections::HashMap::new();
                for (name, value) in expand_headers(headers)? {
                    if let Some(token) = value
                        .strip_prefix("Bearer ")
                        .filter(|_| name.eq_ignore_ascii_case("authorization"))
                    {
                        config = config.auth_header(token.to_owned());
                        continue;
                    }
                    let name = http::HeaderName::try_from(name.as_str())
                        .map_err(|e| format!("header {name}: {e}"))?;
                    let value = http::HeaderValue::try_from(value.as_str())
                        .map_err(|e| format!("header {name}: {e}"))?;
                    custom.insert(name, value);
                }
                config = config.custom_headers(custom);
                ().serve(StreamableHttpClientTransport::from_config(config))
                    .await
                    .map_err(|e| format!("cannot connect to {url}: {e}"))?
            }
        };
        let listed = client
            .list_all_tools()
            .await
            .map_err(|e| format!("tools/list failed: {e}"))?;
        let tools: Vec<Tool> = listed
            .into_iter()
            .map(|mut tool| {
                tool.name = self.served_name(&tool.name).into();
                tool
            })
            .collect();
        tracing::info!(
            upstream = self.config.name,
            tools = tools.len(),
            "connected to upstream"
        );
        if let Ok(mut cached) = self.tools.write() {
            *cached = tools;
        }
        *self.client.write().await = Some(client);
        Ok(())
    }

    fn failure(&self, message: String) -> CallToolResult {
        tracing::warn!(upstream = self.config.name, "{message}");
        CallToolResult::error(vec![ContentBlock::text(format!(
            "upstream `{}` unavailable: {message}; nothing was charged",
            self.config.name
        ))])
    }
}

/// Header values may name environment variables, `${NAME}`, so that secrets
/// stay out of pricing.toml.
fn expand_headers(headers: &BTreeMap<String, String>) -> Result<Vec<(String, String)>, String> {
    headers
        .iter()
        .map(|(name, value)| {
            let mut out = String::new();
            let mut rest = value.as_str();
            while let Some(start) = rest.find("${") {
                out.push_str(&rest[..start]);
                let after = &rest[start + 2..];
                let end = after
                    .find('}')
                    .ok_or_else(|| format!("header {name}: unclosed ${{"))?;
                let var = &after[..end];
                out.push_str(
                    &std::env::var(var).map_err(|_| format!("header {name}: ${var} is not set"))?,
                );
                rest = &after[end + 1..];
            }
            out.push_str(rest);
            Ok((name.clone(), out))
        })
        .collect()
}

#[async_trait]
impl ToolBackend for Upstream {
    fn tools(&self) -> Vec<Tool> {
        self.tools.read().map(|t| t.clone()).unwrap_or_default()
    }

    fn validate(&self, _tool: &str, _args: &JsonObject) -> Result<(), ArgumentError> {
        // The upstream checks its own arguments; a refusal there is a tool
        // error, which charges nothing.
        Ok(())
    }

    fn unpriced(&self) -> Unpriced {
        self.config.unpriced
    }

    async fn call(&self, tool: &str, args: JsonObject) -> CallToolResult {
        let name = tool
            .strip_prefix(self.config.prefix.as_deref().unwrap_or(""))
            .unwrap_or(tool)
            .to_owned();
        let guard = self.client.read().await;
        let Some(client) = guard.as_ref() else {
            return self.failure("not connected".into());
        };
        let params = CallToolRequestParams::new(name).with_arguments(args);
        // Dropping the call on timeout sends notifications/cancelled upstream.
        match tokio::time::timeout(self.config.timeout, client.call_tool_once(params)).await {
            Ok(Ok(CallToolResponse::Complete(result))) => result,
            Ok(Ok(_)) => self.failure("it asked for input tollgate cannot relay".into()),
            Ok(Err(e)) => self.failure(format!("call failed: {e}")),
            Err(_) => self.failure(format!(
                "no answer within {}s",
                self.config.timeout.as_secs_f64()
            )),
        }
    }
}
