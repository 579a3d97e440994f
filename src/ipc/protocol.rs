//! The JSON-lines messages of the local IPC socket.

use serde::{Deserialize, Serialize};

/// Longest accepted request line (16 MiB, room for a base64 update of 12 MiB).
pub const MAX_LINE_LEN: usize = 16 * 1024 * 1024;

/// One request line: `{"id": 7, "op": "doc_set", ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    #[serde(flatten)]
    pub body: RequestBody,
}

/// What a request asks for, tagged by `op`. Unknown fields are ignored, so newer apps can send
/// optional fields to older agents; an unknown `op` is an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum RequestBody {
    /// Device, peers and per-document sync state.
    Status,
    /// Names of every document.
    DocList,
    /// Opens (creating if needed) a document.
    DocOpen {
        doc: String,
    },
    /// The document as JSON (every root type).
    DocGet {
        doc: String,
    },
    /// Sets `map[key] = value` (any JSON value) in root map `map`.
    DocSet {
        doc: String,
        map: String,
        key: String,
        value: serde_json::Value,
    },
    /// Edits root text `name`: inserts `insert` at `index` (default: the end) after deleting
    /// `delete` characters there (default 0).
    DocText {
        doc: String,
        name: String,
        #[serde(default)]
        index: Option<u32>,
        #[serde(default)]
        delete: u32,
        #[serde(default)]
        insert: String,
    },
    /// Applies a Yjs update (v1, base64).
    DocApply {
        doc: String,
        update: String,
    },
    /// The state vector (v1, base64).
    DocStateVector {
        doc: String,
    },
    /// What a holder of `state_vector` (v1, base64; empty = everything) lacks, as an update.
    DocDiff {
        doc: String,
        #[serde(default)]
        state_vector: String,
    },
    /// Pushes an `update` event for every change to `doc` until unsubscribed.
    DocSubscribe {
        doc: String,
    },
    DocUnsubscribe {
        subscription: u64,
    },
    /// Adds a device to the trust store.
    TrustAdd {
        device: String,
        #[serde(default)]
        name: Option<String>,
    },
    TrustRemove {
        device: String,
    },
    TrustList,
    /// Dials a multiaddr and keeps it connected.
    PeerDial {
        addr: String,
    },
    /// Opens a pairing code (default expiry 300 s); `pairing` events follow on this connection.
    PairStart {
        #[serde(default)]
        expiry_secs: Option<u64>,
    },
    /// Pairs with the device showing `code`, found over mDNS or dialed at `addr`.
    PairJoin {
        code: String,
        #[serde(default)]
        addr: Option<String>,
    },
    /// Removes a device from the group, on every device.
    Unpair {
        device: String,
    },
    /// Paired devices and nearby unpaired agents.
    Peers,
    /// Discovery and connectivity diagnosis.
    Doctor,
}

/// One response line: `{"id": 7, "ok": true, "result": ...}` or `{"id": 7, "ok": false, "error": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// The request's id; `null` when the request line could not be parsed far enough to read it.
    pub id: Option<u64>,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

/// Machine-readable error kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The line is not JSON or not a known request.
    BadRequest,
    /// The line is longer than [`MAX_LINE_LEN`].
    LineTooLong,
    /// An argument is invalid (bad base64, bad device id, bad doc name, invalid update...).
    InvalidArgument,
    /// The change could not be made durable; it is not acknowledged.
    NotDurable,
    /// Stored data could not be read.
    Storage,
    /// Pairing failed (wrong or expired code, unreachable device...).
    Pairing,
    NoSuchSubscription,
    Internal,
}

/// A pushed event: `{"event": "update", ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A change to a subscribed document: `origin` is "local" or the device id it came from.
    Update {
        subscription: u64,
        doc: String,
        update: String,
        origin: String,
    },
    /// Progress of a pairing code opened with `pair_start` on this connection.
    Pairing { update: crate::pairing::HostEvent },
    /// The subscriber fell behind and missed `missed` updates: re-read the doc (or diff by
    /// state vector) to catch up.
    Lagged { subscription: u64, missed: u64 },
}

impl Response {
    pub fn ok(id: u64, result: serde_json::Value) -> Self {
        Self {
            id: Some(id),
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    pub fn err(id: Option<u64>, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            id,
            ok: false,
            result: None,
            error: Some(ErrorBody {
                code,
                message: message.into(),
            }),
        }
    }
}
