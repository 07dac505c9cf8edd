//! `/metrics` in Prometheus text format. Calls (by tool, mode and outcome)
//! and the gate's latency are counted as they happen (see
//! [`record_call`]); open holds, intents by status and revenue are read from
//! the store at scrape time, so they are exact and survive restarts.

use std::sync::{Arc, OnceLock};

use axum::{
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use super::{HttpState, auth::authenticate};
use crate::{
    keys::Scope,
    money::SCALE,
    store::{IntentStatus, StoreStats},
};

const LATENCY: &str = "tollgate_gate_seconds";

/// The process-wide recorder, installed on first use.
pub fn recorder() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0, 5.0, 30.0,
            ];
            let built = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(LATENCY.into()), &buckets)
                .map_err(|e| e.to_string())
                .and_then(|b| b.install_recorder().map_err(|e| e.to_string()));
            match built {
                Ok(handle) => Some(handle),
                Err(e) => {
                    tracing::warn!("metrics disabled: {e}");
                    None
                }
            }
        })
        .as_ref()
}

/// Folds the latency samples taken since the last time into the
/// histograms. Without it they pile up until a scrape; the HTTP service runs
/// it every few seconds.
pub fn upkeep() {
    if let Some(handle) = recorder() {
        handle.run_upkeep();
    }
}

/// One `tools/call`: what it was, how it ended, how long the gate took.
pub fn record_call(tool: &str, mode: &str, outcome: &str, seconds: f64) {
    metrics::counter!("tollgate_calls_total", "tool" => tool.to_owned(), "mode" => mode.to_owned(), "outcome" => outcome.to_owned())
        .increment(1);
    metrics::histogram!(LATENCY, "tool" => tool.to_owned()).record(seconds);
}

/// What upkeep did off the call path, `count` times: `hold_expired`,
/// `orphaned_hold_released`, `interrupted_run_refunded`,
/// `unredeemed_refunded`, `remote_paid_kept`, `remote_expired`.
pub fn record_upkeep(event: &'static str, count: u64) {
    if count > 0 {
        metrics::counter!("tollgate_upkeep_total", "event" => event).increment(count);
    }
}

/// A charge or a result that could not be recorded even in the background
/// (given up after an hour): money an operator must look at.
pub fn record_unrecorded(what: &'static str) {
    metrics::counter!("tollgate_unrecorded_total", "what" => what).increment(1);
}

pub async fn scrape(State(state): State<Arc<HttpState>>, headers: HeaderMap) -> Response {
    if let Err(e) = authenticate(state.store.as_ref(), &headers, Scope::Admin).await {
        return e.into_response();
    }
    let Some(handle) = recorder() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder unavailable\n",
        )
            .into_response();
    };
    match state.store.stats().await {
        Ok(stats) => record_stats(stats),
        Err(e) => tracing::warn!("metrics: store unavailable: {e}"),
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
        .into_response()
}

/// The store's figures as gauges, as of this scrape.
fn record_stats(stats: StoreStats) {
    metrics::gauge!("tollgate_open_holds").set(stats.open_holds as f64);
    metrics::gauge!("tollgate_stored_results").set(stats.stored_results as f64);
    // A status with no intents left has no row: it is zero now, not what it
    // was at the last scrape. Each gauge is set once, so that a scrape at
    // the same time never sees a passing zero.
    for status in IntentStatus::ALL {
        let n = stats
            .intents
            .iter()
            .find(|(s, _)| s == status.as_str())
            .map_or(0, |(_, n)| *n);
        metrics::gauge!("tollgate_intents", "status" => status.as_str()).set(n as f64);
    }
    for (tool, currency, micros) in stats.revenue {
        // Major units, as a number (no digits to show, so no currency's
        // minor unit to go by); the ledger keeps the exact figure.
        let amount = micros as f64 / 10f64.powi(SCALE as i32);
        metrics::gauge!("tollgate_revenue", "tool" => tool, "currency" => currency).set(amount);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value the rendered gauge of intents in `status` shows.
    fn intents_shown(status: &str) -> Option<String> {
        let rendered = recorder()?.render();
        let line = format!("tollgate_intents{{status=\"{status}\"}} ");
        rendered
            .lines()
            .find_map(|l| l.strip_prefix(&line).map(str::to_owned))
    }

    #[test]
    fn a_status_whose_intents_are_all_gone_shows_zero() {
        assert!(recorder().is_some(), "the recorder is installed");
        let stats = |intents: Vec<(String, i64)>| StoreStats {
            open_holds: 0,
            stored_results: 0,
            intents,
            revenue: Vec::new(),
        };
        record_stats(stats(vec![("awaiting_payment".into(), 3)]));
        assert_eq!(intents_shown("awaiting_payment").as_deref(), Some("3"));
        record_stats(stats(Vec::new()));
        assert_eq!(intents_shown("awaiting_payment").as_deref(), Some("0"));
    }
}
