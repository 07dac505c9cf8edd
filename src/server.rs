//! The rmcp `ServerHandler`: lists the catalog and hands every call to the gate.

use std::sync::Arc;

use rmcp::{
    ErrorData as McpError, RoleServer, ServerHandler,
    model::{
        CallToolRequestParams, CallToolResponse, Implementation, ListToolsResult,
        PaginatedRequestParams, ServerCapabilities, ServerConfig, SubscriptionFilter, Tool,
    },
    service::{RequestContext, SubscriptionContext},
};

use crate::{
    gate::{CallScope, Caller, Gate},
    store::new_id,
};

/// One MCP session's handler. The gate (store, catalog, provider) is shared;
/// the caller and the session id are this session's.
#[derive(Clone)]
pub struct TollgateServer {
    gate: Arc<Gate>,
    caller: Caller,
    session_id: String,
}

impl TollgateServer {
    pub fn new(gate: Arc<Gate>, caller: Caller) -> Self {
        Self {
            gate,
            caller,
            session_id: new_id("sess"),
        }
    }

    pub fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }

    pub fn session_id(&self) -> &str {
        &self.session_id
    }
}

impl ServerHandler for TollgateServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().enable_tool_list_changed().build())
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
            self.gate.tools_for(&self.session_id),
        ))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        self.gate.tool_for(&self.session_id, name)
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let scope = CallScope {
            caller: &self.caller,
            session_id: &self.session_id,
            request: &context,
        };
        self.gate.call(&scope, request).await
    }

    fn accepted_subscription_filter(
        &self,
        requested: &SubscriptionFilter,
    ) -> Option<SubscriptionFilter> {
        Some(requested.intersection(&SubscriptionFilter::builder().tools_list_changed().build()))
    }

    /// 2026-07-28 clients hear `tools/list_changed` (dynamic confirm tools)
    /// on a `subscriptions/listen` stream.
    async fn listen(&self, context: SubscriptionContext) -> Result<(), McpError> {
        let dynamic = self.gate.dynamic_tools();
        let sink = context.sink().clone();
        let id = sink.id().clone();
        dynamic.attach_listener(&self.session_id, sink);
        context.cancelled().await;
        dynamic.detach_listener(&self.session_id, &id);
        Ok(())
    }
}
