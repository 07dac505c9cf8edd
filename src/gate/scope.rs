//! What the gate knows about one `tools/call`: who pays, from which MCP
//! session, and the request itself (for elicitation, progress and
//! cancellation).

use std::sync::atomic::{AtomicU32, Ordering};

use rmcp::{
    RoleServer,
    model::{JsonObject, ProgressToken, ProtocolVersion},
    service::RequestContext,
};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::Caller;
use crate::{store::Origin, tools::CallContext};

/// `_meta` key of an explicit agent id on a `tools/call`.
pub const AGENT_META: &str = "tollgate/agent";
/// `_meta` key of the caller's metadata: a JSON object, kept with the
/// payment and shown in statements and receipts.
pub const METADATA_META: &str = "tollgate/metadata";
/// The most bytes of metadata (as compact JSON) a call may carry.
pub const METADATA_MAX_BYTES: usize = 2048;
/// The longest agent id kept.
const AGENT_MAX_CHARS: usize = 200;

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

/// The session of the requests an HTTP client makes without one (served
/// statelessly): one per principal, one for anonymous callers between them.
pub fn stateless_session(principal: Option<&str>) -> String {
    match principal {
        Some(principal) => format!("stateless:{principal}"),
        None => ANONYMOUS_STATELESS.to_owned(),
    }
}

/// Anonymous callers without a session: their dynamic confirm tools are
/// listed to no one (every such caller would see them), though the name
/// each is told still works.
pub const ANONYMOUS_STATELESS: &str = "stateless:";

pub struct CallScope<'a> {
    pub caller: &'a Caller,
    /// Identifies the MCP session (one per stdio process, one per HTTP
    /// session; see [`stateless_session`] for HTTP requests without one).
    pub session_id: &'a str,
    pub request: &'a RequestContext<RoleServer>,
    /// Cancelled when the client cancels the call or goes away (see
    /// [`abandonment`]): nobody will read its answer.
    pub cancelled: CancellationToken,
    /// The progress notifications the gate has sent for this call (while
    /// it waited for the payment in progress mode).
    pub progress_sent: AtomicU32,
}

/// Put in an HTTP request's extensions by the service, and cancelled when
/// the response to the request is dropped: the client went away. rmcp does
/// not cancel a call for that.
#[derive(Clone, Default)]
pub struct ClientGone(pub CancellationToken);

/// What cancels a call: the client's `notifications/cancelled` (rmcp's
/// token for the request), or over HTTP the client going away.
pub fn abandonment(request: &RequestContext<RoleServer>) -> CancellationToken {
    let gone = request
        .extensions
        .get::<http::request::Parts>()
        .and_then(|parts| parts.extensions.get::<ClientGone>());
    let Some(ClientGone(gone)) = gone else {
        return request.ct.clone();
    };
    let either = request.ct.child_token();
    let (cancel, gone) = (either.clone(), gone.clone());
    tokio::spawn(async move {
        tokio::select! {
            () = gone.cancelled() => cancel.cancel(),
            () = cancel.cancelled() => {}
        }
    });
    either
}

impl CallScope<'_> {
    /// What the tool backend may use of this call: progress, elicitation
    /// (on sessions where the server may send requests) and cancellation.
    pub fn backend_context(&self, elicitation_timeout: std::time::Duration) -> CallContext {
        CallContext {
            progress: self
                .progress_token()
                .map(|token| (self.request.peer.clone(), token)),
            progress_heard: f64::from(self.progress_sent.load(Ordering::Acquire)),
            elicitation: (self.elicits().any() && !self.is_modern())
                .then(|| (self.request.peer.clone(), elicitation_timeout)),
            cancelled: self.cancelled.clone(),
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

    /// Who is making this call besides the principal: an explicit agent id
    /// (`_meta["tollgate/agent"]`) or else the client's `clientInfo`, and the
    /// caller's metadata. `Err` names what is wrong with the metadata.
    pub fn origin(&self, params_meta: Option<&JsonObject>) -> Result<Origin, String> {
        let meta = |key: &str| {
            params_meta
                .and_then(|m| m.get(key))
                .or_else(|| self.request.meta.get(key))
        };
        let agent = match meta(AGENT_META) {
            Some(Value::String(agent)) if !agent.trim().is_empty() => Some(agent.trim().to_owned()),
            Some(Value::String(_)) | None => self
                .request
                .client_info()
                .map(|info| format!("{}/{}", info.name, info.version)),
            Some(_) => return Err(format!("_meta[\"{AGENT_META}\"] must be a string")),
        }
        // Control and direction characters dropped: the id is shown in
        // statements and exports, where an escape, a line break or a
        // right-to-left override would forge what is read.
        .map(|agent| {
            agent
                .chars()
                .filter(|&c| !c.is_control() && !invisible(c))
                .take(AGENT_MAX_CHARS)
                .collect()
        });
        let metadata = match meta(METADATA_META) {
            None | Some(Value::Null) => None,
            Some(value @ Value::Object(_)) => {
                let text = value.to_string();
                if text.len() > METADATA_MAX_BYTES {
                    return Err(format!(
                        "_meta[\"{METADATA_META}\"] is {} bytes; the limit is {METADATA_MAX_BYTES}",
                        text.len()
                    ));
                }
                Some(text)
            }
            Some(_) => return Err(format!("_meta[\"{METADATA_META}\"] must be a JSON object")),
        };
        Ok(Origin { agent, metadata })
    }

    pub fn progress_token(&self) -> Option<ProgressToken> {
        self.request.meta.get_progress_token()
    }
}

/// Format characters that change how text around them reads: zero-width
/// marks, line and paragraph separators, direction overrides and isolates.
fn invisible(c: char) -> bool {
    matches!(c, '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
}
