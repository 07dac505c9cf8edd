//! Fast-path holds whose answer was lost: the caller was told the payment
//! system was unavailable, but the hold may have landed, or may land later
//! still (PostgreSQL goes on with a statement whose connection broke until
//! its statement timeout). Each is released as soon as it is found, for as
//! long as it could land; without that, a hold landing after one look would
//! keep the caller's funds and allowance until it expires.
//!
//! One task per process does it, for a bounded number of holds, so that an
//! outage with many calls failing does not start a task, and a retry loop,
//! for each.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

use crate::{
    store::{Store, StoreError},
    sync::lock,
};

/// The most holds followed at once; past that, one expires on its own.
const MOST_FOLLOWED: usize = 10_000;

#[derive(Clone)]
pub(crate) struct LostHolds {
    inner: Arc<Mutex<Followed>>,
    /// How long a hold may still land after its answer was lost.
    may_land: Duration,
    /// How long between looks.
    pause: Duration,
}

#[derive(Default)]
struct Followed {
    /// Hold id → until when it is looked for.
    holds: HashMap<String, Instant>,
    /// Whether the task is running.
    reaping: bool,
}

impl LostHolds {
    pub fn new(may_land: Duration, pause: Duration) -> Self {
        Self {
            inner: Arc::default(),
            may_land,
            pause,
        }
    }

    /// Follows `hold_id` until it is released, ends otherwise, or can no
    /// longer land.
    pub fn add(&self, store: &Arc<dyn Store>, hold_id: String) {
        let mut followed = lock(&self.inner);
        if followed.holds.len() >= MOST_FOLLOWED {
            tracing::warn!(
                payment_id = hold_id.as_str(),
                "too many holds whose answer was lost: this one, if it landed, expires on its own"
            );
            return;
        }
        tracing::info!(
            payment_id = hold_id.as_str(),
            "a hold's answer was lost: it is released if it landed"
        );
        followed
            .holds
            .insert(hold_id, Instant::now() + self.may_land);
        if !followed.reaping {
            followed.reaping = true;
            let (me, store) = (self.clone(), store.clone());
            tokio::spawn(async move { me.reap(store).await });
        }
    }

    /// How many are followed now.
    #[cfg(test)]
    pub fn followed(&self) -> usize {
        lock(&self.inner).holds.len()
    }

    async fn reap(self, store: Arc<dyn Store>) {
        loop {
            let due: Vec<String> = {
                let mut followed = lock(&self.inner);
                let now = Instant::now();
                followed.holds.retain(|_, until| *until > now);
                if followed.holds.is_empty() {
                    followed.reaping = false;
                    return;
                }
                followed.holds.keys().cloned().collect()
            };
            for hold_id in due {
                let done = match store.release(&hold_id).await {
                    Ok(()) => {
                        tracing::info!(
                            payment_id = hold_id.as_str(),
                            "released a hold whose answer was lost"
                        );
                        true
                    }
                    // Ended otherwise (expired, or by recovery).
                    Err(StoreError::WrongState { .. }) => true,
                    // Not landed (yet), or the store is still unreachable.
                    Err(_) => false,
                };
                if done {
                    lock(&self.inner).holds.remove(&hold_id);
                }
            }
            tokio::time::sleep(self.pause).await;
        }
    }
}
