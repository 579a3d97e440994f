//! The one error type of the bindings: a kind foreign code can catch, and the agent's message,
//! which says what went wrong and what to do.

use devicelink::{AgentError, DocError};

/// Every failure of the bindings. In Python each kind is an exception class
/// (`DeviceLinkError.WrongType`...), in Node the message starts with the kind.
#[derive(Debug, thiserror::Error, uniffi::Error)]
#[uniffi(flat_error)]
pub enum DeviceLinkError {
    /// An argument the agent cannot use (a bad address, JSON, code or name).
    #[error("{0}")]
    InvalidArgument(String),
    /// No such document, activity, conflict or device.
    #[error("{0}")]
    NotFound(String),
    /// A write onto a root of the other type; nothing was changed.
    #[error("{0}")]
    WrongType(String),
    /// Pairing failed (wrong code, expired, unreachable...); nothing was linked.
    #[error("{0}")]
    Pairing(String),
    /// A handoff could not finish; nothing was handed over.
    #[error("{0}")]
    Handoff(String),
    /// The data dir or the database failed (a full disk, a damaged store...).
    #[error("{0}")]
    Storage(String),
    /// The network could not start or be reached.
    #[error("{0}")]
    Network(String),
    /// The agent is paused: call `resume()` first.
    #[error("{0}")]
    Paused(String),
    /// The agent was shut down.
    #[error("{0}")]
    Stopped(String),
}

impl DeviceLinkError {
    /// The kind, as the Node addon prefixes messages with it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidArgument(_) => "InvalidArgument",
            Self::NotFound(_) => "NotFound",
            Self::WrongType(_) => "WrongType",
            Self::Pairing(_) => "Pairing",
            Self::Handoff(_) => "Handoff",
            Self::Storage(_) => "Storage",
            Self::Network(_) => "Network",
            Self::Paused(_) => "Paused",
            Self::Stopped(_) => "Stopped",
        }
    }
}

impl From<DocError> for DeviceLinkError {
    fn from(e: DocError) -> Self {
        let message = e.to_string();
        match e {
            _ if e.is_bad_input() => Self::InvalidArgument(message),
            DocError::WrongType { .. } => Self::WrongType(message),
            DocError::NotFound(_) | DocError::Deleted(_) => Self::NotFound(message),
            DocError::InvalidUpdate { .. }
            | DocError::InvalidStateVector { .. }
            | DocError::InvalidValue { .. }
            | DocError::Reserved(_) => Self::InvalidArgument(message),
            DocError::AgentStopped => Self::Stopped(message),
            DocError::Store(_) | DocError::NotDurable { .. } => Self::Storage(message),
        }
    }
}

impl From<AgentError> for DeviceLinkError {
    fn from(e: AgentError) -> Self {
        let message = e.to_string();
        match e {
            AgentError::Doc(doc) => doc.into(),
            AgentError::Devices(devices) => devices.into(),
            AgentError::Stopped => Self::Stopped(message),
            AgentError::Diagnostics(devicelink::diagnostics::DiagnosticsError::Devices(e)) => {
                e.into()
            }
            AgentError::Net(_) => Self::Network(message),
            AgentError::Refused(_) => Self::InvalidArgument(message),
            _ => Self::Storage(message),
        }
    }
}

impl From<devicelink::pairing::PairError> for DeviceLinkError {
    fn from(e: devicelink::pairing::PairError) -> Self {
        Self::Pairing(e.to_string())
    }
}

impl From<devicelink::devices::DevicesError> for DeviceLinkError {
    fn from(e: devicelink::devices::DevicesError) -> Self {
        use devicelink::devices::DevicesError;
        let message = e.to_string();
        match e {
            DevicesError::Doc(doc) => doc.into(),
            DevicesError::Refused(_) => Self::InvalidArgument(message),
            DevicesError::Stopped => Self::Stopped(message),
            DevicesError::Store(_) => Self::Storage(message),
        }
    }
}

impl From<devicelink::handoff::HandoffError> for DeviceLinkError {
    fn from(e: devicelink::handoff::HandoffError) -> Self {
        use devicelink::handoff::HandoffError;
        let message = e.to_string();
        match e {
            HandoffError::NotFound(_) | HandoffError::Gone(_) => Self::NotFound(message),
            HandoffError::Doc(doc) => doc.into(),
            _ => Self::Handoff(message),
        }
    }
}

impl From<devicelink::conflict::ConflictError> for DeviceLinkError {
    fn from(e: devicelink::conflict::ConflictError) -> Self {
        use devicelink::conflict::ConflictError;
        let message = e.to_string();
        match e {
            ConflictError::NotFound(_) => Self::NotFound(message),
            ConflictError::Doc(doc) => doc.into(),
            _ => Self::InvalidArgument(message),
        }
    }
}
