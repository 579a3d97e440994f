//! The sync protocol `/devicelink/sync/1.4.0`: wire messages ([`message`]) and the per-peer
//! session that runs them ([`session`]). protocol/README.md is the normative description.

pub mod message;
pub(crate) mod outbox;
pub(crate) mod session;

pub use message::{
    DocErrorCode, Features, Hello, Message, MessageError, Refusal, RefuseCode, Version,
    MAX_FRAME_LEN, PROTOCOL_VERSION, SYNC_PROTOCOL,
};
pub use session::SessionError;
