//! The payment gate: stands in front of every priced call and decides
//! between the fast path (charge a funded wallet) and a payment mode.

pub mod catalog;
mod fast_path;
mod redeem;
pub mod reply;
mod slow_path;

use std::{sync::Arc, time::Duration};

use rmcp::{
    ErrorData as McpError,
    model::{CallToolResult, JsonObject},
};
use serde_json::{Value, json};

use crate::{
    canonical::args_hash,
    config::{Config, Mode},
    money::{Currency, Units},
    provider::Provider,
    receipt::ReceiptSigner,
    store::{AccountKind, AccountRef, Store},
};
pub use catalog::{Catalog, PAYMENT_ID_ARG, Price, confirm_tool_name};

/// Who is calling: the principal pays. `None` is anonymous, which has no
/// wallet and can only pay through payment sessions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    pub principal: Option<String>,
}

/// Settings the gate needs from `pricing.toml`.
#[derive(Debug, Clone)]
pub struct GateSettings {
    pub server_name: String,
    pub payment_ttl: Duration,
    /// Prices above this never take the fast path.
    pub approval_threshold: Units,
    /// How long a concurrent confirm waits for the run already under way.
    pub run_wait: Duration,
}

impl GateSettings {
    pub fn from_config(config: &Config) -> Self {
        Self {
            server_name: config.server_name.clone(),
            payment_ttl: config.payment_ttl,
            approval_threshold: config.approval_threshold,
            run_wait: Duration::from_secs(60),
        }
    }
}

pub struct Gate {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) provider: Arc<dyn Provider>,
    pub(crate) catalog: Catalog,
    pub(crate) signer: ReceiptSigner,
    pub(crate) settings: GateSettings,
}

/// A priced call that passed validation.
pub(crate) struct PricedCall<'a> {
    pub tool: &'a str,
    pub price: &'a Price,
    pub args: JsonObject,
    pub args_hash: String,
}

impl Gate {
    pub fn new(
        store: Arc<dyn Store>,
        provider: Arc<dyn Provider>,
        catalog: Catalog,
        signer: ReceiptSigner,
        settings: GateSettings,
    ) -> Self {
        Self {
            store,
            provider,
            catalog,
            signer,
            settings,
        }
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The account a tool's earnings go to.
    pub(crate) fn revenue_account(&self, currency: &Currency) -> AccountRef {
        AccountRef::new(AccountKind::Revenue, &self.settings.server_name, currency)
    }

    /// Handles one `tools/call`. Only an unknown tool is a JSON-RPC error;
    /// everything else, payment problems included, is a tool result.
    pub async fn call(
        &self,
        caller: &Caller,
        name: &str,
        args: Option<JsonObject>,
    ) -> Result<CallToolResult, McpError> {
        let mut args = args.unwrap_or_default();
        if let Some(tool) = self.catalog.confirmed_tool(name) {
            return Ok(self.confirm(caller, tool, &args).await);
        }
        let entry = self
            .catalog
            .get(name)
            .ok_or_else(|| McpError::invalid_params(format!("unknown tool `{name}`"), None))?;
        let Some(price) = &entry.price else {
            return Ok(entry.backend.call(name, args).await);
        };
        let mode = self.mode_for(price);
        // The payment id rides along with the arguments in resubmit mode; it
        // is not part of what the tool is priced for.
        let payment_id = match mode {
            Mode::Resubmit => match args.remove(PAYMENT_ID_ARG) {
                None | Some(Value::Null) => None,
                Some(Value::String(id)) => Some(id),
                Some(_) => {
                    return Ok(reply::error(
                        reply::code::INVALID_ARGUMENTS,
                        "invalid argument `payment_id`: expected a string",
                        reply::details(json!({ "field": PAYMENT_ID_ARG })),
                    ));
                }
            },
            _ => None,
        };
        if let Err(e) = entry.backend.validate(name, &args) {
            return Ok(reply::error(
                reply::code::INVALID_ARGUMENTS,
                format!("{e}; nothing was charged"),
                reply::details(json!({ "field": e.field })),
            ));
        }
        let call = PricedCall {
            tool: name,
            price,
            args_hash: args_hash(&Value::Object(args.clone())),
            args,
        };
        if let Some(payment_id) = payment_id {
            return Ok(self
                .redeem(caller, &payment_id, call.tool, Some(&call.args_hash))
                .await);
        }
        if let Some(result) = self.try_fast_path(caller, &call, entry).await {
            return Ok(result);
        }
        Ok(self.open_intent(caller, &call, mode).await)
    }

    /// The mode this call is served in. `auto` means elicitation where the
    /// client supports it; until elicitation lands it is resubmit.
    fn mode_for(&self, price: &Price) -> Mode {
        match price.mode {
            Mode::Auto => {
                tracing::debug!("mode auto: serving as resubmit");
                Mode::Resubmit
            }
            mode => mode,
        }
    }

    /// `confirm_<tool>_payment {payment_id}`.
    async fn confirm(&self, caller: &Caller, tool: &str, args: &JsonObject) -> CallToolResult {
        match args.get(PAYMENT_ID_ARG) {
            Some(Value::String(id)) if args.len() == 1 => self.redeem(caller, id, tool, None).await,
            _ => reply::error(
                reply::code::INVALID_ARGUMENTS,
                "invalid argument `payment_id`: pass exactly {\"payment_id\": \"...\"}",
                reply::details(json!({ "field": PAYMENT_ID_ARG })),
            ),
        }
    }
}
