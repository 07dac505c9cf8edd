//! A priced MCP server built on tollgate as a library: two tools written as
//! async Rust functions, one of them priced, served over stdio through the
//! same gate, store and payment modes as the `tollgate` binary.
//!
//! ```sh
//! cargo run --example weather                     # anonymous caller: payment sessions
//! TOLLGATE_PAYER=alice cargo run --example weather
//! ```
//!
//! Fund a wallet with the CLI on the same store:
//! `cargo run -- --db sqlite://weather.db wallet topup alice 1.00`.

use schemars::JsonSchema;
use serde::Deserialize;
use tollgate::{Caller, Tollgate, TollgateBuilder, config::ConfigError};

/// Prices and settings; a real server would read its own pricing.toml.
pub const PRICING: &str = r#"
[server]
name = "weather"
currency = "USD"
mode = "auto"

[store]
url = "sqlite://weather.db"

[[tools]]
name = "forecast"
price = "0.05"
"#;

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Forecast {
    /// City name.
    city: String,
    /// How many days ahead, 1 to 7.
    #[serde(default)]
    days: Option<u32>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoArguments {}

/// The example's tools; the test suite builds the server the same way.
pub fn weather(pricing: &str) -> Result<TollgateBuilder, ConfigError> {
    Ok(Tollgate::from_pricing(pricing)?
        .tool(
            "forecast",
            "The weather in a city, some days ahead.",
            |args: Forecast| async move {
                let days = args.days.unwrap_or(1);
                if !(1..=7).contains(&days) {
                    // A tool error: the caller is told why and charged nothing.
                    return Err(format!("days must be 1 to 7, not {days}"));
                }
                Ok(format!("{}: sunny for the next {days} day(s).", args.city))
            },
        )
        .tool(
            "cities",
            "The cities with forecasts.",
            |_: NoArguments| async { "Oslo, Lima, Pune" },
        ))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // stdout is the MCP transport: logs go to stderr.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let mut builder = weather(PRICING)?;
    if let Ok(db) = std::env::var("TOLLGATE_DB") {
        builder = builder.store_url(db);
    }
    let tollgate = builder.build().await?;
    let payer = std::env::var("TOLLGATE_PAYER").ok();
    tollgate.serve_stdio(Caller { principal: payer }).await?;
    Ok(())
}
