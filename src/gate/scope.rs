//! What the gate knows about one `tools/call`: who pays, from which MCP
//! session, and the request itself (for elicitation, progress and
//! cancellation).

use rmcp::{
    RoleServer,
    model::{ProgressToken, ProtocolVersion},
    service::RequestContext,
};

use super::Caller;
use crate::tools::CallContext;

/// How a client can answer an elicitation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elicits {
    /// It declared no elicitation capability.
    No,
    /// Forms only.
    Form,
    /// URL mode (and perhaps forms too).
    Url { form: bool },
}

impl Elicits {
    pub fn any(self) -> bool {
        self != Elicits::No
    }
    pub fn form(self) -> bool {
        matches!(self, Elicits::Form | Elicits::Url { form: true })
    }
}

pub struct CallScope<'a> {
    pub caller: &'a Caller,
    /// Identifies the MCP session (one per stdio process, one per HTTP
    /// session).
    pub session_id: &'a str,
    pub request: &'a RequestContext<RoleServer>,
}

impl CallScope<'_> {
    /// What the tool backend may use of this call: progress, elicitation
    /// (on sessions where the server may send requests) and cancellation.
    pub fn backend_context(&self, elicitation_timeout: std::time::Duration) -> CallContext {
        CallContext {
            progress: self
                .progress_token()
                .map(|token| (self.request.peer.clone(), token)),
            elicitation: (self.elicits().any() && !self.is_modern())
                .then(|| (self.request.peer.clone(), elicitation_timeout)),
            cancelled: self.request.ct.clone(),
        }
    }

    /// A 2026-07-28 session: the server may not send requests to the client,
    /// so elicitation travels in an `InputRequiredResult` instead.
    pub fn is_modern(&self) -> bool {
        self.request
            .protocol_version()
            .is_some_and(|v| v >= ProtocolVersion::V_2026_07_28)
    }

    pub fn elicits(&self) -> Elicits {
        let Some(cap) = self
            .request
            .client_capabilities()
            .and_then(|c| c.elicitation)
        else {
            return Elicits::No;
        };
        match (cap.form.is_some(), cap.url.is_some()) {
            (form, true) => Elicits::Url { form },
            // A bare `elicitation: {}` means forms, per the spec.
            (_, false) => Elicits::Form,
        }
    }

    pub fn progress_token(&self) -> Option<ProgressToken> {
        self.request.meta.get_progress_token()
    }
}
