//! The rmcp `ServerHandler`: lists the catalog and hands every call to the gate.

use std::sync::Arc;

use rmcp::{
    ErrorData as McpError, RoleServer, ServerHandler,
    model::{
        CallToolRequestParams, CallToolResponse, Implementation, ListToolsResult,
        PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
    },
    service::RequestContext,
};

use crate::gate::{Caller, Gate};

/// One MCP session's handler. The gate (store, catalog, provider) is shared;
/// the caller is this session's principal.
#[derive(Clone)]
pub struct TollgateServer {
    gate: Arc<Gate>,
    caller: Caller,
}

impl TollgateServer {
    pub fn new(gate: Arc<Gate>, caller: Caller) -> Self {
        Self { gate, caller }
    }

    pub fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }
}

impl ServerHandler for TollgateServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("tollgate", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "Some tools cost money; their price is in the description and in _meta[\"tollgate/price\"]. \
                 A call that needs payment answers with a payment_id and a payment_url: pay there, then follow \
                 the answer's instructions to finish the call.",
            )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        Ok(ListToolsResult::with_all_items(
            self.gate.catalog().listed().to_vec(),
        ))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        self.gate.catalog().listed_tool(name)
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let result = self
            .gate
            .call(&self.caller, &request.name, request.arguments)
            .await?;
        Ok(result.into())
    }
}
