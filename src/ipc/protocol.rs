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

impl Request {
    /// Parses one request line. Same result as deserializing a `Request`, at about half the
    /// cost: `flatten` buffers the whole object twice, while this reads `id` (skipping the rest)
    /// and then the body, which ignores `id` like any field it does not know.
    pub fn from_json(line: &[u8]) -> Result<Self, serde_json::Error> {
        #[derive(Deserialize)]
        struct Id {
            id: u64,
        }
        let Id { id } = serde_json::from_slice(line)?;
        Ok(Self {
            id,
            body: serde_json::from_slice(line)?,
        })
    }
}

/// What a request asks for, tagged by `op`. Unknown fields are ignored, so newer apps can send
/// optional fields to older agents; an unknown `op` is an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum RequestBody {
    /// Device, peers and per-document sync state.
    Status,
    /// Documents with their metadata, sorted by name, a page at a time: names after `after`
    /// (default: from the start), at most `limit` (default 1000, at most 10000). `next` in the
    /// answer is the `after` of the next page (`null` at the end).
    DocList {
        #[serde(default)]
        after: Option<String>,
        #[serde(default)]
        limit: Option<usize>,
    },
    /// Deletes a document on every device (replicated tombstone); subscribers get `deleted`.
    DocDelete {
        doc: String,
    },
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
    /// `delete` units there (default 0). `offsets` is the unit of `index`, `delete` and the
    /// returned `len`: "utf8" bytes (default, Rust and yrs) or "utf16" code units (JavaScript
    /// string indexes).
    DocText {
        doc: String,
        name: String,
        #[serde(default)]
        index: Option<u32>,
        #[serde(default)]
        delete: u32,
        #[serde(default)]
        insert: String,
        #[serde(default)]
        offsets: Option<String>,
    },
    /// Applies a Yjs update (base64): v1 unless `encoding` is `"v2"`.
    DocApply {
        doc: String,
        update: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        encoding: Option<String>,
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
    /// Pushes an `update` event for every change to `doc` until unsubscribed. With the app's
    /// `state_vector` (v1, base64), the answer's `update` holds what the app lacks (Yjs sync
    /// step 2), so the app is caught up with no gap before the first event.
    DocSubscribe {
        doc: String,
        #[serde(default)]
        state_vector: Option<String>,
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
        /// Reach the host through this relay (its address ending in `/p2p/ID`; the relay finds
        /// the host by the code's slot), or the host's relayed address.
        #[serde(default)]
        relay: Option<String>,
    },
    /// Removes a device from the group, on every device.
    Unpair {
        device: String,
    },
    /// Paired devices and nearby unpaired agents.
    Peers,
    /// Discovery and connectivity diagnosis.
    Doctor,
    /// Publishes (or, with `id`, updates) this device's current activity.
    ActivityPublish {
        #[serde(flatten)]
        draft: crate::handoff::ActivityDraft,
    },
    /// Live activities of all devices.
    ActivityList,
    ActivityUnpublish {
        activity_id: String,
    },
    /// Pushes `activities` events (the full list) on every change, and `activity_continued`
    /// when an activity of this device is continued elsewhere.
    ActivitySubscribe,
    /// Continues an activity here: catches its documents up, claims it, returns its app state.
    Handoff {
        activity_id: String,
        #[serde(default)]
        timeout_secs: Option<u64>,
    },
    /// Conflicts (open ones unless `all`), optionally of one document.
    ConflictList {
        #[serde(default)]
        doc: Option<String>,
        #[serde(default)]
        all: bool,
    },
    /// Resolves a conflict: `keep` is "local", "remote", "winner", "other", or `value` is set.
    ConflictResolve {
        conflict_id: String,
        #[serde(default)]
        keep: Option<String>,
        #[serde(default)]
        value: Option<serde_json::Value>,
    },
    /// Pushes a `conflicts` event (the open conflicts) on every change.
    ConflictSubscribe,
    /// Creates an app allowed to use the y-websocket endpoint; answers its token (only now).
    AppAdd {
        name: String,
        #[serde(default)]
        origins: Vec<String>,
        #[serde(default)]
        prefixes: Vec<String>,
        #[serde(default)]
        read_only: bool,
    },
    /// The apps (never their tokens).
    AppList,
    /// Revokes an app's token; its open connections end.
    AppRemove {
        name: String,
    },
    /// Scopes this connection to an app: from now on it may use only the documents the token
    /// allows (read-only if the token is), and no device, pairing or app management.
    AppAuth {
        token: String,
    },
    /// Sets this connection's presence in `doc` (any JSON object; `null` to leave). It is kept
    /// alive while the connection is open and removed when it closes.
    AwarenessSet {
        doc: String,
        state: serde_json::Value,
    },
    /// Who is present in `doc` now (apps on this device and on linked devices).
    AwarenessGet {
        doc: String,
    },
    /// Pushes an `awareness` event on every presence change in `doc` until unsubscribed.
    AwarenessSubscribe {
        doc: String,
    },
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
    /// A handoff could not complete (documents not caught up, holder unreachable, refused).
    Handoff,
    /// No such activity or conflict.
    NotFound,
    NoSuchSubscription,
    /// The connection's app token does not allow this (see `app_auth`).
    Forbidden,
    /// A write names a root of another type (a map write onto a text, a text edit onto a map);
    /// nothing was changed.
    WrongType,
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
        /// This connection made the change (an app can skip its own echo).
        own: bool,
    },
    /// Presence in a subscribed document changed: the changed clients, each with its state
    /// (`null`: left). `origin` is "local" or the device id it came from.
    Awareness {
        subscription: u64,
        doc: String,
        states: serde_json::Value,
        origin: String,
    },
    /// Progress of a pairing code opened with `pair_start` on this connection.
    Pairing { update: crate::pairing::HostEvent },
    /// The live activities, after any change.
    Activities {
        activities: Vec<crate::handoff::Activity>,
    },
    /// An activity of this device was continued on another device (`activity.holder`).
    ActivityContinued { activity: crate::handoff::Activity },
    /// The open conflicts, after any change.
    Conflicts {
        open: Vec<crate::conflict::Conflict>,
    },
    /// A subscribed document was deleted (here or on another device).
    Deleted { subscription: u64, doc: String },
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

#[cfg(test)]
mod tests {
    use super::*;

    /// No request field may be called `id`: it would collide with the request's own id.
    #[test]
    fn every_request_round_trips_next_to_its_id() {
        let bodies = vec![
            RequestBody::Status,
            RequestBody::DocSet {
                doc: "d".into(),
                map: "m".into(),
                key: "k".into(),
                value: serde_json::json!({"a": 1}),
            },
            RequestBody::ActivityPublish {
                draft: crate::handoff::ActivityDraft {
                    id: Some("act".into()),
                    activity_type: "com.example.x".into(),
                    title: "t".into(),
                    docs: vec!["d".into()],
                    app_state: serde_json::json!({"cursor": 1}),
                    ttl_secs: Some(5),
                },
            },
            RequestBody::ActivityUnpublish {
                activity_id: "act".into(),
            },
            RequestBody::Handoff {
                activity_id: "act".into(),
                timeout_secs: Some(3),
            },
            RequestBody::ConflictResolve {
                conflict_id: "c".into(),
                keep: Some("local".into()),
                value: None,
            },
            RequestBody::PairJoin {
                code: "42-815-067".into(),
                addr: None,
                relay: None,
            },
            RequestBody::DocUnsubscribe { subscription: 3 },
            RequestBody::DocList {
                after: None,
                limit: None,
            },
            RequestBody::DocText {
                doc: "d".into(),
                name: "t".into(),
                index: Some(2),
                delete: 1,
                insert: "x".into(),
                offsets: Some("utf16".into()),
            },
            RequestBody::DocSubscribe {
                doc: "d".into(),
                state_vector: Some("AA==".into()),
            },
            RequestBody::AppAdd {
                name: "notes".into(),
                origins: vec!["http://localhost:5173".into()],
                prefixes: vec!["notes/".into()],
                read_only: true,
            },
            RequestBody::AwarenessSet {
                doc: "d".into(),
                state: serde_json::json!({"user": {"name": "a"}}),
            },
        ];
        for body in bodies {
            let request = Request { id: 77, body };
            let line = serde_json::to_string(&request).unwrap();
            let back: Request =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
            assert_eq!(back, request, "{line}");
            let fast =
                Request::from_json(line.as_bytes()).unwrap_or_else(|e| panic!("{line}: {e}"));
            assert_eq!(fast, request, "{line}");
        }
    }

    #[test]
    fn fast_parse_refuses_what_the_derived_parse_refuses() {
        for line in [
            r#"{"op":"status"}"#,
            r#"{"id":"seven","op":"status"}"#,
            r#"{"id":1,"op":"no_such_op"}"#,
            r#"{"id":1}"#,
            r#"{"id":1,"op":"doc_get"}"#,
            r#"[1,2]"#,
            "not json",
        ] {
            assert!(serde_json::from_str::<Request>(line).is_err(), "{line}");
            assert!(Request::from_json(line.as_bytes()).is_err(), "{line}");
        }
    }
}
