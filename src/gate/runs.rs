//! The paid runs this process has under way: from just before an intent is
//! claimed (moved to `running` in this instance's name) until its outcome
//! is stored, in the background if need be. A `running` intent of this
//! instance that is not under way here was claimed and then dropped (the
//! claim's answer lost, a settlement that failed, a background write that
//! gave up): nobody will finish it, and recovery refunds it rather than
//! leave its money in clearing until the process ends.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use crate::sync::lock;

#[derive(Clone, Default)]
pub(crate) struct RunsUnderWay(Arc<Mutex<HashMap<String, usize>>>);

/// One claim or run of an intent, under way until dropped.
pub(crate) struct UnderWay {
    runs: RunsUnderWay,
    intent_id: String,
}

impl RunsUnderWay {
    /// Call before the claim, so that recovery never sees the claim landed
    /// and the run not yet counted.
    pub fn enter(&self, intent_id: &str) -> UnderWay {
        *lock(&self.0).entry(intent_id.to_owned()).or_default() += 1;
        UnderWay {
            runs: self.clone(),
            intent_id: intent_id.to_owned(),
        }
    }

    pub fn contains(&self, intent_id: &str) -> bool {
        lock(&self.0).contains_key(intent_id)
    }
}

impl Drop for UnderWay {
    fn drop(&mut self) {
        let mut runs = lock(&self.runs.0);
        if let Some(count) = runs.get_mut(&self.intent_id) {
            *count -= 1;
            if *count == 0 {
                runs.remove(&self.intent_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_intent_is_under_way_while_any_of_its_claims_is() {
        let runs = RunsUnderWay::default();
        let first = runs.enter("i1");
        let second = runs.enter("i1");
        drop(first);
        assert!(runs.contains("i1"));
        drop(second);
        assert!(!runs.contains("i1"));
        assert!(lock(&runs.0).is_empty(), "nothing kept once done");
    }
}
