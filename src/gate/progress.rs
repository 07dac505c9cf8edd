//! Progress mode: the call itself waits for the payment, telling the client
//! where to pay through `notifications/progress`, and answers with the
//! tool's result once paid.

use std::sync::atomic::Ordering;

use rmcp::model::{CallToolResult, ProgressNotificationParam, ProgressToken};
use tokio::time::Instant;

use super::{
    CallScope, Gate,
    redeem::{Settled, Wait},
    reply::{self, code},
    slow_path::{Opened, Purpose, how_to_pay},
};

/// Sends the progress notifications of one waiting call: one at once, then
/// a heartbeat every `every`.
pub(super) struct ProgressReporter {
    token: ProgressToken,
    message: String,
    every: std::time::Duration,
    started: Instant,
    next: Instant,
    sent: u32,
}

impl ProgressReporter {
    pub fn new(token: ProgressToken, message: String, every: std::time::Duration) -> Self {
        let now = Instant::now();
        Self {
            token,
            message,
            every,
            started: now,
            next: now,
            sent: 0,
        }
    }

    /// Reports if a heartbeat is due. A client that has gone away is not an
    /// error here: the wait ends on cancellation or timeout.
    pub async fn heartbeat(&mut self, scope: &CallScope<'_>) {
        let now = Instant::now();
        if now < self.next {
            return;
        }
        self.sent += 1;
        scope.progress_sent.store(self.sent, Ordering::Release);
        self.next = now + self.every;
        let waited = now.duration_since(self.started).as_secs();
        let param = ProgressNotificationParam::new(self.token.clone(), f64::from(self.sent))
            .with_message(format!("{} (waiting {waited}s)", self.message));
        if let Err(e) = scope.request.peer.notify_progress(param).await {
            tracing::debug!("progress notification not sent: {e}");
        }
    }
}

impl Gate {
    pub(super) async fn wait_with_progress(
        &self,
        scope: &CallScope<'_>,
        opened: &Opened,
        purpose: Purpose,
    ) -> CallToolResult {
        let intent = &opened.intent;
        let Some(token) = scope.progress_token() else {
            return self.payment_required(opened, purpose, None);
        };
        let timeouts = &self.settings.timeouts;
        let mut reporter = ProgressReporter::new(
            token,
            format!(
                "{}; this call finishes by itself once paid",
                how_to_pay(opened, purpose)
            ),
            timeouts.progress_heartbeat,
        );
        let wait = Wait {
            until: Instant::now() + timeouts.progress,
            progress: Some(&mut reporter),
        };
        match self
            .redeem_until(
                scope,
                &intent.id,
                &intent.tool,
                Some(&intent.args_hash),
                Some(wait),
            )
            .await
        {
            Settled::Final(result) => result,
            // Failing to the end: the caller is told the payment system is
            // unavailable, not that nobody paid.
            Settled::Pending(last, _) if reply::code_of(&last) == Some(code::UNAVAILABLE) => last,
            Settled::Pending(_, ended_early) => {
                let why = match ended_early {
                    Some(why) => format!("Stopped waiting: {why}"),
                    None => format!("Stopped waiting after {}s", timeouts.progress.as_secs()),
                };
                self.stopped_waiting(opened, purpose, &why)
            }
        }
    }
}
