//! Whether this host's clock agrees with the database's. Leases are judged
//! by the database's clock, but expiries (of holds, payments, sessions) are
//! stamped and swept by each instance's own: an instance whose clock runs
//! ahead ends other instances' holds and payments early by as much. Clocks
//! kept in sync (NTP) agree to milliseconds; this says when they do not.

use std::sync::atomic::{AtomicI64, Ordering};

/// Disagreement beyond this is warned of.
const TOLERATED_SKEW_MS: i64 = 2_000;
/// A skew that lasts is warned of again this often, not at every lease.
const WARN_EVERY_MS: i64 = 10 * 60 * 1000;

#[derive(Default)]
pub(super) struct ClockCheck {
    /// When the last warning was given (this host's clock), 0 for never.
    last_warned: AtomicI64,
}

impl ClockCheck {
    /// The database's clock read `db_now` while this host's went from
    /// `before` to `after`: how far outside that span it was (0 within it),
    /// set as the `tollgate_clock_skew_seconds` gauge. True if that was
    /// warned of now.
    pub(super) fn observe(&self, db_now: i64, before: i64, after: i64) -> bool {
        let skew = if db_now < before {
            db_now - before
        } else if db_now > after {
            db_now - after
        } else {
            0
        };
        metrics::gauge!("tollgate_clock_skew_seconds").set(skew as f64 / 1000.0);
        if skew.abs() <= TOLERATED_SKEW_MS {
            return false;
        }
        let last = self.last_warned.load(Ordering::Acquire);
        if last != 0 && after.saturating_sub(last) < WARN_EVERY_MS {
            return false;
        }
        self.last_warned.store(after, Ordering::Release);
        let (by, way) = (
            skew.abs() as f64 / 1000.0,
            if skew < 0 { "ahead of" } else { "behind" },
        );
        tracing::warn!(
            skew_ms = skew,
            "this host's clock is {by:.1}s {way} the database's: expiries are judged by each \
             instance's clock, so instances sharing this database may end each other's holds \
             and payments early by that much; keep their clocks in sync (NTP)"
        );
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skewed_clock_is_warned_of_now_and_then() {
        let check = ClockCheck::default();
        let at = 1_800_000_000_000;
        assert!(!check.observe(at + 5, at, at + 10), "within the read");
        assert!(
            !check.observe(at + 10 + TOLERATED_SKEW_MS, at, at + 10),
            "tolerated"
        );
        assert!(
            check.observe(at - 30_000, at, at + 10),
            "30 s behind the host"
        );
        assert!(
            !check.observe(at - 30_000, at + 1_000, at + 1_010),
            "not again at once"
        );
        let later = at + WARN_EVERY_MS + 20;
        assert!(
            check.observe(later + 30_000, later, later + 10),
            "again, later"
        );
    }
}
