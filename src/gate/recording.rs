//! Writes that must land after a tool has run: the fast path's capture and
//! a paid intent's stored result. A tool's work cannot be taken back, so
//! when the payment system is briefly unreachable (a database restart, a
//! dropped connection) these are tried again for a while rather than given
//! up at the first error. Both are safe to repeat: a capture of a hold
//! already captured the same way answers with that capture, and an intent
//! leaves `running` once only.

//!
//! A call answered without its result, because such a write did not land
//! in time (`[timeouts] record`), leaves the rest to [`in_background`]: the
//! paid run's result is stored once the store is back (a retry of the
//! payment id then gets it), or the fast path's hold is given back.

use std::{future::Future, time::Duration};

use crate::store::StoreError;

const FIRST_PAUSE: Duration = Duration::from_millis(50);
const LONGEST_PAUSE: Duration = Duration::from_secs(1);
/// How long a write left to the background keeps trying.
const BACKGROUND_PATIENCE: Duration = Duration::from_secs(3600);

/// How many attempts apart a write still failing is logged again.
const LOG_EVERY: u32 = 60;

/// Runs `write` (payment `payment_id`'s) until it lands, fails for a reason
/// other than the payment system being unreachable, or `patience` runs out.
/// `Retried(e)` says a later attempt failed after an earlier one may have
/// landed unseen. Logged when it starts failing, every minute or so while
/// it does, and when it lands after all.
pub(super) async fn until_recorded<T, F, Fut>(
    what: &str,
    payment_id: &str,
    patience: Duration,
    mut write: F,
) -> Result<T, Unrecorded>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let deadline = tokio::time::Instant::now() + patience;
    let mut pause = FIRST_PAUSE;
    let mut attempt = 1;
    loop {
        match write().await {
            Ok(done) => {
                if attempt > 1 {
                    tracing::info!(payment_id, attempt, "{what}: recorded");
                }
                return Ok(done);
            }
            Err(e @ StoreError::Unavailable(_))
                if tokio::time::Instant::now() + pause < deadline =>
            {
                if attempt % LOG_EVERY == 1 {
                    tracing::warn!(
                        payment_id,
                        attempt,
                        "{what}: payment system unavailable ({e}); trying again"
                    );
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(LONGEST_PAUSE);
                attempt += 1;
            }
            Err(e) if attempt > 1 => return Err(Unrecorded::Retried(e)),
            Err(e) => return Err(Unrecorded::Refused(e)),
        }
    }
}

/// Keeps trying `write` off the call's path, for up to an hour, once the
/// call has been answered without it.
pub(super) fn in_background<F, Fut>(what: &'static str, payment_id: String, write: F)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), StoreError>> + Send,
{
    tokio::spawn(async move {
        match until_recorded(what, &payment_id, BACKGROUND_PATIENCE, write).await {
            Ok(()) => tracing::warn!(payment_id, "{what}: done, after the call was answered"),
            Err(e) => {
                tracing::error!(payment_id, "{what}: gave up: {e}");
                crate::http::metrics::record_unrecorded(what);
            }
        }
    });
}

#[derive(Debug)]
pub(super) enum Unrecorded {
    /// The first attempt failed, and nothing was written.
    Refused(StoreError),
    /// An attempt after an unreachable one failed: the unreachable one may
    /// have landed (its answer was lost).
    Retried(StoreError),
}

impl std::fmt::Display for Unrecorded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unrecorded::Refused(e) | Unrecorded::Retried(e) => e.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::testing::LogCapture;

    /// A write retried through an outage is logged with its payment id when
    /// it starts failing and when it lands, not at every attempt. (It was
    /// logged at every attempt, up to once a second for an hour, with no
    /// payment id.)
    #[tokio::test]
    async fn a_write_retried_through_an_outage_is_logged_by_its_payment_id() {
        let (log, _logging) = LogCapture::start();
        let attempts = AtomicU32::new(0);
        let recorded = until_recorded("storing", "pay_1", Duration::from_secs(60), || async {
            if attempts.fetch_add(1, Ordering::SeqCst) < 5 {
                Err(StoreError::Unavailable(sqlx::Error::PoolTimedOut))
            } else {
                Ok(())
            }
        })
        .await;
        assert!(recorded.is_ok());
        let lines = log.lines_of("pay_1");
        assert_eq!(lines.len(), 2, "{}", log.text());
        assert!(
            lines[0].contains("WARN") && lines[0].contains("trying again"),
            "{lines:?}"
        );
        assert!(
            lines[1].contains("recorded") && lines[1].contains("attempt=6"),
            "{lines:?}"
        );
    }
}
