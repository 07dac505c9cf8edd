//! tollgate: an MCP server that charges for tool calls.
//!
//! Tool authors price tools in `pricing.toml`; the [`gate::Gate`] stands in
//! front of every priced call and either charges a funded wallet at once (the
//! fast path) or walks the caller through a payment mode, backed by a
//! durable [`store::Store`] with a double-entry ledger.

pub mod allowance;
pub mod app;
pub mod approvals;
pub mod canonical;
pub mod config;
pub mod embed;
pub mod export;
#[doc(hidden)]
pub mod fuzz_checks;
pub mod gate;
pub mod http;
pub mod keys;
pub mod money;
pub mod payment_report;
pub mod provider;
pub mod receipt;
pub mod server;
pub mod statement;
pub mod stdio;
pub mod stdio_guard;
pub mod store;
pub mod sync;
pub mod tariff;
pub mod terms;
#[doc(hidden)]
pub mod testing;
pub mod tools;

pub use embed::{Tollgate, TollgateBuilder};
pub use gate::Caller;
