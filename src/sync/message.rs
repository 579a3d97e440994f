//! Wire messages of `/devicelink/sync/1.4.0` and their framing.
//!
//! A frame is a big-endian `u32` length followed by that many bytes of a postcard-encoded
//! [`Message`]. Frames longer than [`MAX_FRAME_LEN`] are refused. Updates and state vectors are
//! Yjs v1 bytes, so a document stays byte-compatible with Yjs in JavaScript.

use bytes::Bytes;
use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};
use tokio_util::codec::LengthDelimitedCodec;

/// The libp2p stream protocol id of document sync.
pub const SYNC_PROTOCOL: StreamProtocol = StreamProtocol::new("/devicelink/sync/1.4.0");

/// Stream ids of earlier 1.x sync protocols: accepted only to refuse them with a clear message.
pub const LEGACY_SYNC_PROTOCOLS: [StreamProtocol; 4] = [
    StreamProtocol::new("/devicelink/sync/1.0.0"),
    StreamProtocol::new("/devicelink/sync/1.1.0"),
    StreamProtocol::new("/devicelink/sync/1.2.0"),
    StreamProtocol::new("/devicelink/sync/1.3.0"),
];

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: Version = Version { major: 1, minor: 4 };

/// Largest accepted frame body, in bytes (32 MiB).
pub const MAX_FRAME_LEN: usize = 32 * 1024 * 1024;

/// The `Hello.listen_addrs` entry that announces optional 1.4 features (it never parses as a
/// multiaddr, so peers without them ignore it, as §6.4 requires): `devicelink-features:` then
/// feature names separated by commas.
pub const FEATURES_PREFIX: &str = "devicelink-features:";
/// Feature: changed-only reconnect over the change feed (`FeedRequest`, `FeedPage`, `FeedMark`).
pub const FEATURE_FEED: &str = "feed";
/// Feature: messages larger than a frame sent as `Part`s.
pub const FEATURE_PARTS: &str = "parts";
/// Feature: presence (Yjs awareness) relayed between devices (`Awareness`).
pub const FEATURE_AWARENESS: &str = "awareness";
/// Most update bytes in one `Part` (1 MiB): big transfers interleave with other documents.
pub const PART_LEN: usize = 1 << 20;
/// Most names in one `FeedPage`.
pub const FEED_PAGE_LEN: usize = 512;

/// A protocol version `major.minor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    pub major: u16,
    pub minor: u16,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

impl Hello {
    /// The optional features the sender announced (empty for a peer without any).
    pub fn features(&self) -> Features {
        Features {
            feed: self.announces(FEATURE_FEED),
            parts: self.announces(FEATURE_PARTS),
            awareness: self.announces(FEATURE_AWARENESS),
        }
    }

    /// Whether the sender announced optional feature `name` (known to this build or not).
    pub fn announces(&self, name: &str) -> bool {
        self.listen_addrs.iter().any(|entry| {
            entry
                .strip_prefix(FEATURES_PREFIX)
                .is_some_and(|list| list.split(',').any(|n| n == name))
        })
    }

    /// The listen addresses without the feature entry.
    pub fn addrs(&self) -> Vec<String> {
        self.listen_addrs
            .iter()
            .filter(|a| !a.starts_with(FEATURES_PREFIX))
            .cloned()
            .collect()
    }
}

/// Optional features of 1.4, announced in `Hello` and used only when both sides announce them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
    pub feed: bool,
    pub parts: bool,
    pub awareness: bool,
}

impl Features {
    /// Everything this build supports.
    pub const ALL: Features = Features {
        feed: true,
        parts: true,
        awareness: true,
    };

    /// The `listen_addrs` entry announcing these features.
    pub fn entry(self) -> String {
        let mut names = Vec::new();
        if self.feed {
            names.push(FEATURE_FEED);
        }
        if self.parts {
            names.push(FEATURE_PARTS);
        }
        if self.awareness {
            names.push(FEATURE_AWARENESS);
        }
        format!("{FEATURES_PREFIX}{}", names.join(","))
    }

    /// What two sides can both use.
    pub fn both(self, other: Features) -> Features {
        Features {
            feed: self.feed && other.feed,
            parts: self.parts && other.parts,
            awareness: self.awareness && other.awareness,
        }
    }
}

impl Refusal {
    /// The refusal a device that is not trusted gets for its sync stream.
    /// To a device that `by` removed from its device group (`unpair`).
    pub fn removed(by: &libp2p::PeerId) -> Self {
        Self {
            code: RefuseCode::NotTrusted,
            message: format!(
                "this device was removed from the device group by device {by}; pair it again to rejoin"
            ),
        }
    }

    pub fn not_trusted(peer: &libp2p::PeerId) -> Self {
        Self {
            code: RefuseCode::NotTrusted,
            message: format!("device {peer} is not trusted by this device; pair it first"),
        }
    }
}

impl Version {
    /// Whether a peer announcing `self` may sync with this build: the same major version and at
    /// least this build's minor. A higher minor is accepted (it must speak this minor's messages
    /// too); returns the refusal otherwise.
    pub fn check_compatible(self) -> Result<(), Refusal> {
        if self.major != PROTOCOL_VERSION.major {
            return Err(Refusal {
                code: RefuseCode::UnsupportedVersion,
                message: format!(
                    "protocol version {self} has an unknown major version; this device speaks {PROTOCOL_VERSION}"
                ),
            });
        }
        if self.minor < PROTOCOL_VERSION.minor {
            return Err(Refusal {
                code: RefuseCode::UnsupportedVersion,
                message: format!(
                    "protocol version {self} is too old; this device needs {PROTOCOL_VERSION} or newer (update devicelink on the other device)"
                ),
            });
        }
        Ok(())
    }
}

/// First message on a stream, sent by both sides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: Version,
    /// Human-readable device name.
    pub device_name: String,
    /// Multiaddrs the sender listens on, so the receiver can redial it.
    pub listen_addrs: Vec<String>,
}

/// Why a stream is being closed by the sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefuseCode {
    UnsupportedVersion,
    NotTrusted,
    ProtocolViolation,
    FrameTooLarge,
    Malformed,
    ShuttingDown,
}

/// A refusal: the last message before the sender closes the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub code: RefuseCode,
    pub message: String,
}

/// Per-document failures that do not end the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DocErrorCode {
    InvalidUpdate,
    InvalidStateVector,
    InvalidDocName,
    Storage,
}

/// Every message of the sync protocol. The enum index is the postcard tag on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// 0: version and addresses; must be the first frame in each direction.
    Hello(Hello),
    /// 1: the sender refuses to go on and closes the stream.
    Refuse(Refusal),
    /// 2: "this is what I have of `doc`"; the receiver answers with `SyncStep2`.
    SyncStep1 {
        doc: String,
        #[serde(with = "serde_bytes")]
        state_vector: Vec<u8>,
    },
    /// 3: exactly the updates the step-1 sender lacked.
    SyncStep2 {
        doc: String,
        #[serde(with = "serde_bytes")]
        update: Vec<u8>,
    },
    /// 4: a live change.
    Update {
        doc: String,
        #[serde(with = "serde_bytes")]
        update: Vec<u8>,
    },
    /// 5: the receiver could not use a message about `doc`; the stream goes on.
    DocError {
        doc: String,
        code: DocErrorCode,
        message: String,
    },
    /// 6 (feature `feed`): "list the documents you changed after `after` in your feed `epoch`".
    FeedRequest { epoch: u64, after: u64 },
    /// 7 (feature `feed`): a page of the answer; `head` is the feed position it covers.
    FeedPage {
        epoch: u64,
        head: u64,
        docs: Vec<String>,
        last: bool,
    },
    /// 8 (feature `feed`): every change up to `head` of the sender's feed has been sent.
    FeedMark { epoch: u64, head: u64 },
    /// 9 (feature `parts`): a piece of a `SyncStep2` (`kind` 3) or `Update` (`kind` 4) whose
    /// update is `total` bytes long; pieces arrive in order and are concatenated.
    Part {
        doc: String,
        kind: u8,
        total: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// 10 (feature `awareness`): presence in `doc` changed; `update` is a y-protocols awareness
    /// update (the changed clients only). Ephemeral: never stored, never answered.
    Awareness {
        doc: String,
        #[serde(with = "serde_bytes")]
        update: Vec<u8>,
    },
}

/// A frame that is not a valid message.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("malformed frame: {0}")]
    Malformed(#[from] postcard::Error),
    #[error("frame of {0} bytes is over the {MAX_FRAME_LEN} byte limit")]
    TooLarge(usize),
}

impl Message {
    /// Encodes the frame body (without the length prefix).
    pub fn encode(&self) -> Result<Bytes, MessageError> {
        let body = postcard::to_allocvec(self)?;
        if body.len() > MAX_FRAME_LEN {
            return Err(MessageError::TooLarge(body.len()));
        }
        Ok(Bytes::from(body))
    }

    /// Decodes a frame body; trailing bytes are an error.
    pub fn decode(body: &[u8]) -> Result<Self, MessageError> {
        if body.len() > MAX_FRAME_LEN {
            return Err(MessageError::TooLarge(body.len()));
        }
        let (msg, rest) = postcard::take_from_bytes(body)?;
        if !rest.is_empty() {
            return Err(MessageError::Malformed(
                postcard::Error::DeserializeBadEncoding,
            ));
        }
        Ok(msg)
    }

    /// The message's name, as the spec writes it.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Refuse(_) => "Refuse",
            Message::SyncStep1 { .. } => "SyncStep1",
            Message::SyncStep2 { .. } => "SyncStep2",
            Message::Update { .. } => "Update",
            Message::DocError { .. } => "DocError",
            Message::FeedRequest { .. } => "FeedRequest",
            Message::FeedPage { .. } => "FeedPage",
            Message::FeedMark { .. } => "FeedMark",
            Message::Part { .. } => "Part",
            Message::Awareness { .. } => "Awareness",
        }
    }

    /// The document a message is about, if any.
    pub fn doc(&self) -> Option<&str> {
        match self {
            Message::SyncStep1 { doc, .. }
            | Message::SyncStep2 { doc, .. }
            | Message::Update { doc, .. }
            | Message::DocError { doc, .. }
            | Message::Part { doc, .. }
            | Message::Awareness { doc, .. } => Some(doc),
            Message::Hello(_)
            | Message::Refuse(_)
            | Message::FeedRequest { .. }
            | Message::FeedPage { .. }
            | Message::FeedMark { .. } => None,
        }
    }
}

/// The frame codec: u32 big-endian length prefix, at most [`MAX_FRAME_LEN`].
pub fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .big_endian()
        .length_field_length(4)
        .max_frame_length(MAX_FRAME_LEN)
        .new_codec()
}

/// Length prefix + body, as written on the stream.
pub fn to_frame(msg: &Message) -> Result<Vec<u8>, MessageError> {
    let body = msg.encode()?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn versions() {
        assert!(PROTOCOL_VERSION.check_compatible().is_ok());
        assert!(Version { major: 1, minor: 7 }.check_compatible().is_ok());
        let old = Version { major: 1, minor: 3 }
            .check_compatible()
            .unwrap_err();
        assert_eq!(old.code, RefuseCode::UnsupportedVersion);
        assert!(old.message.contains("1.3 is too old"), "{}", old.message);
        let alien = Version { major: 2, minor: 0 }
            .check_compatible()
            .unwrap_err();
        assert!(alien.message.contains("unknown major"), "{}", alien.message);
    }

    #[test]
    fn round_trip() {
        let msg = Message::Update {
            doc: "notes".into(),
            update: vec![1, 2, 3],
        };
        assert_eq!(Message::decode(&msg.encode().unwrap()).unwrap(), msg);
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        let mut body = Message::Refuse(Refusal {
            code: RefuseCode::NotTrusted,
            message: "x".into(),
        })
        .encode()
        .unwrap()
        .to_vec();
        body.push(0);
        assert!(Message::decode(&body).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Message::decode(&body);
        }
    }
}
