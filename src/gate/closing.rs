//! Stopping gracefully. Once the gate closes, new calls are turned away and
//! calls waiting for a payment stop waiting (the payment stays payable, and
//! the call can be redeemed later by its payment id), while calls whose tool
//! is running are given time to finish, be charged or released, and answer.
//! Without this, a process stopping under a running call dropped it: its
//! client got no answer and its hold stayed open until recovery.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use super::{CallScope, Gate};
use crate::sync::{Counted, UnderWay};

/// How long a stopping server waits for the calls under way.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(25);

/// How long a stopping server waits, once its transports are down, for its
/// MCP sessions to close and for what they leave to be ended (a dynamic
/// confirm tool's payment: a few store writes, a cancel at a remote).
pub const SESSION_END_GRACE: Duration = Duration::from_secs(5);

#[derive(Default)]
pub(crate) struct Closing {
    /// Cancelled when the gate closes.
    closed: CancellationToken,
    /// Cancelled when the only client can no longer answer (it closed
    /// stdin): calls stop waiting for a payment or a person, while calls
    /// it sent before are still taken.
    inputs_ended: CancellationToken,
    calls: Arc<UnderWay>,
    /// The MCP sessions open: each ends its payments as it closes.
    sessions: Arc<UnderWay>,
}

impl Closing {
    /// Counts a new call as under way until the guard is dropped; `None`
    /// once closed.
    pub fn enter(&self) -> Option<Counted> {
        let call = self.calls.enter();
        // Checked after counting: a call that gets in is always waited for.
        (!self.closed.is_cancelled()).then_some(call)
    }

    /// Counts work a closing gate must still wait for (ending what a
    /// session that just closed left), until the guard is dropped.
    pub fn enter_even_closing(&self) -> Counted {
        self.calls.enter()
    }

    pub fn close(&self) {
        self.closed.cancel();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    pub fn end_inputs(&self) {
        self.inputs_ended.cancel();
    }

    /// Resolves once the gate is closed: waits for a payment end then.
    pub async fn closed(&self) {
        self.closed.cancelled().await;
    }

    /// Waits up to `grace` for the calls under way to end; how many had not.
    pub async fn drained(&self, grace: Duration) -> usize {
        self.calls.drained(grace).await
    }

    /// Counts an MCP session as open until the guard is dropped.
    pub fn session_opened(&self) -> Counted {
        self.sessions.enter()
    }

    /// Waits up to `grace` for the sessions to close, then as long again
    /// for what their closing started; how many sessions or tasks were
    /// left.
    pub async fn sessions_ended(&self, grace: Duration) -> usize {
        self.sessions.drained(grace).await + self.calls.drained(grace).await
    }
}

impl Gate {
    /// Resolves when a call should stop what it is doing (a provider's
    /// check, a wait on a run elsewhere): its client cancelled it or went
    /// away, or the gate is closing. Says which, for the log and the answer.
    pub(super) async fn interrupted(&self, scope: &CallScope<'_>) -> &'static str {
        tokio::select! {
            () = scope.cancelled.cancelled() => "the call was cancelled",
            () = self.closing.closed() => "tollgate is shutting down",
        }
    }

    /// Resolves when a call should stop waiting for a payment or a person's
    /// answer: as [`Gate::interrupted`], or once a stdio client has closed
    /// its input, after which it can neither answer nor cancel. A call it
    /// sent before then that needs no wait (a payment already made) is
    /// still served.
    pub(super) async fn wait_ended(&self, scope: &CallScope<'_>) -> &'static str {
        tokio::select! {
            why = self.interrupted(scope) => why,
            () = self.closing.inputs_ended.cancelled() => "the client closed its input",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_closed_gate_turns_new_calls_away_and_waits_for_those_under_way() {
        let closing = Closing::default();
        let call = closing.enter().expect("open");
        closing.close();
        assert!(closing.enter().is_none(), "closed: no new call");
        assert_eq!(closing.drained(Duration::from_millis(20)).await, 1);
        drop(call);
        assert_eq!(closing.drained(Duration::from_millis(20)).await, 0);
    }
}
