//! Shared in-memory state: locking it, and counting what is under way.

use std::{
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::Notify;

/// Locks `mutex`, using its state as it is if a holder panicked: tollgate
/// guards only maps, queues and connections with it, none of which a panic
/// can leave half-changed in a way that matters, and money lives in the
/// store, not in memory.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What a caught panic said, for the log.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

/// Counts what is under way (calls, responses), so that a stopping
/// process can wait for them to end.
#[derive(Default)]
pub struct UnderWay {
    count: AtomicUsize,
    /// Woken when the count comes down to zero.
    idle: Notify,
}

/// Counted as under way until dropped.
pub struct Counted(Arc<UnderWay>);

impl Drop for Counted {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl UnderWay {
    pub fn enter(self: &Arc<Self>) -> Counted {
        self.count.fetch_add(1, Ordering::AcqRel);
        Counted(self.clone())
    }

    /// Waits up to `grace` for the count to come down to zero; what it was
    /// then.
    pub async fn drained(&self, grace: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            // Made before the count is read, so that a drop in between is
            // not missed: `notify_waiters` wakes every `Notified` made.
            let idle = self.idle.notified();
            if self.count.load(Ordering::Acquire) == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.count.load(Ordering::Acquire);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drained_waits_for_what_is_under_way_up_to_its_grace() {
        let under_way = Arc::new(UnderWay::default());
        assert_eq!(under_way.drained(Duration::from_millis(1)).await, 0);
        let (first, second) = (under_way.enter(), under_way.enter());
        assert_eq!(under_way.drained(Duration::from_millis(20)).await, 2);
        let waiter = {
            let under_way = under_way.clone();
            tokio::spawn(async move { under_way.drained(Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(first);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "one is still under way");
        drop(second);
        assert_eq!(waiter.await.expect("join"), 0);
    }
}
