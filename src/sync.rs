//! Locking shared in-memory state.

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`, using its state as it is if a holder panicked: tollgate
/// guards only maps, queues and connections with it, none of which a panic
/// can leave half-changed in a way that matters, and money lives in the
/// store, not in memory.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
