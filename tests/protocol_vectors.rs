//! The binary test vectors of the sync protocol (`protocol/vectors/`), checked against the code.
//!
//! Each `protocol/vectors/<name>.bin` holds one complete FRAME exactly as written on a
//! `/devicelink/sync/1.4.0` stream: a 4-byte big-endian body length, then the postcard body
//! (see protocol/README.md). For every vector this test checks that
//! - the file equals `to_frame(&msg)` for the message defined below,
//! - the length prefix equals the body length, and the real frame codec yields the same body,
//! - `Message::decode(body)` gives back `msg`, and the first body byte is the spec's tag,
//! - Yjs payloads are real: updates apply cleanly to a fresh `yrs::Doc` and give the expected
//!   content, state vectors decode to the expected clocks, `Hello` versions are accepted or
//!   refused as the spec says.
//!
//! `protocol/vectors/invalid/` holds frames a receiver must reject; each is checked to fail.
//!
//! To (re)generate every file after an intentional wire change, run
//!
//! ```text
//! DEVICELINK_WRITE_VECTORS=1 cargo test --test protocol_vectors
//! ```
//!
//! which writes the files instead of comparing them; then review the diff and update
//! protocol/README.md and protocol/vectors/README.md to match.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use bytes::BytesMut;
use devicelink::sync::message::{codec, to_frame};
use devicelink::sync::{
    DocErrorCode, Hello, Message, Refusal, RefuseCode, Version, MAX_FRAME_LEN, PROTOCOL_VERSION,
};
use devicelink::yrs::updates::decoder::Decode;
use devicelink::yrs::updates::encoder::Encode;
use devicelink::yrs::{
    self, Any, Doc, GetString, Map, Out, ReadTxn, StateVector, Text, Transact, Update,
};
use tokio_util::codec::Decoder;

/// Set to `1` to write the vector files instead of checking them.
const WRITE_ENV: &str = "DEVICELINK_WRITE_VECTORS";

fn writing() -> bool {
    std::env::var(WRITE_ENV).is_ok_and(|v| v == "1")
}

fn protocol_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("protocol")
}

fn vectors_dir() -> PathBuf {
    protocol_dir().join("vectors")
}

fn invalid_dir() -> PathBuf {
    vectors_dir().join("invalid")
}

// ---------------------------------------------------------------------------------------------
// The Yjs payloads: real yrs documents with fixed client ids, so the bytes are deterministic.
// ---------------------------------------------------------------------------------------------

/// Document "notes" of client 1, written in two transactions:
/// 1. text `body` = "hello", map `meta`.title = "Notes"            (clocks 0..=5)
/// 2. text `body` += " world", map `meta`.pinned = true             (clocks 6..=12)
struct Fixture {
    /// Update of transaction 1 alone (applies to an empty document).
    first: Vec<u8>,
    /// Update of transaction 2 alone (needs transaction 1).
    second: Vec<u8>,
    /// `merge_updates_v1([first, second])`.
    merged: Vec<u8>,
    /// State vector after transaction 1: {1: 6}.
    sv_first: Vec<u8>,
    /// State vector after both: {1: 13}.
    sv_full: Vec<u8>,
    /// The whole document as one update (what a `SyncStep1` with an empty state vector gets).
    full_state: Vec<u8>,
    /// What a holder of `sv_first` lacks.
    diff_from_first: Vec<u8>,
    /// What a holder of `sv_full` lacks: nothing (the empty update).
    diff_from_full: Vec<u8>,
    /// Client 2: text `body` = LONG_TEXT in one transaction (an update over 127 bytes).
    long: Vec<u8>,
}

const LONG_TEXT: &str = "0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\
0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz";

fn fixture() -> Fixture {
    let doc = Doc::with_client_id(1);
    let body = doc.get_or_insert_text("body");
    let meta = doc.get_or_insert_map("meta");
    let first = {
        let mut txn = doc.transact_mut();
        body.insert(&mut txn, 0, "hello");
        meta.insert(&mut txn, "title", "Notes");
        txn.encode_update_v1()
    };
    let sv_first = doc.transact().state_vector().encode_v1();
    let second = {
        let mut txn = doc.transact_mut();
        body.insert(&mut txn, 5, " world");
        meta.insert(&mut txn, "pinned", true);
        txn.encode_update_v1()
    };
    let (sv_full, full_state, diff_from_first, diff_from_full) = {
        let txn = doc.transact();
        let sv_full = txn.state_vector();
        let sv_1 = StateVector::decode_v1(&sv_first).expect("own state vector decodes");
        (
            sv_full.encode_v1(),
            txn.encode_state_as_update_v1(&StateVector::default()),
            txn.encode_diff_v1(&sv_1),
            txn.encode_diff_v1(&sv_full),
        )
    };
    let merged = yrs::merge_updates_v1([first.as_slice(), second.as_slice()])
        .expect("two updates of one client merge");

    let other = Doc::with_client_id(2);
    let text = other.get_or_insert_text("body");
    let long = {
        let mut txn = other.transact_mut();
        text.insert(&mut txn, 0, LONG_TEXT);
        txn.encode_update_v1()
    };
    Fixture {
        first,
        second,
        merged,
        sv_first,
        sv_full,
        full_state,
        diff_from_first,
        diff_from_full,
        long,
    }
}

// ---------------------------------------------------------------------------------------------
// The vectors.
// ---------------------------------------------------------------------------------------------

/// What else a vector must satisfy beyond encoding and round-tripping.
enum Check {
    None,
    /// A `Hello` whose version a 1.4 receiver accepts (`true`) or refuses (`false`).
    Version {
        accepted: bool,
    },
    /// A `SyncStep1` whose state vector decodes to exactly these `(client, clock)` pairs.
    StateVector(Vec<(u64, u32)>),
    /// A `SyncStep2`/`Update` whose update, applied to a fresh doc after `prior` updates, applies
    /// completely and leaves text `body` = `text` and map `meta` = `meta`.
    Yjs {
        prior: Vec<Vec<u8>>,
        text: &'static str,
        meta: Vec<(&'static str, Any)>,
    },
}

struct Vector {
    name: &'static str,
    msg: Message,
    check: Check,
}

fn hello(major: u16, minor: u16, name: &str, addrs: &[&str]) -> Message {
    Message::Hello(Hello {
        version: Version { major, minor },
        device_name: name.into(),
        listen_addrs: addrs.iter().map(|a| a.to_string()).collect(),
    })
}

/// The device id in examples: the Ed25519 key whose secret is 32 bytes of 1.
fn example_device() -> devicelink::PeerId {
    libp2p::identity::Keypair::ed25519_from_bytes([1u8; 32])
        .expect("a valid key")
        .public()
        .to_peer_id()
}

fn refuse(code: RefuseCode, message: &str) -> Message {
    Message::Refuse(Refusal {
        code,
        message: message.into(),
    })
}

fn doc_error(doc: &str, code: DocErrorCode, message: &str) -> Message {
    Message::DocError {
        doc: doc.into(),
        code,
        message: message.into(),
    }
}

fn sync_step1(doc: &str, state_vector: &[u8]) -> Message {
    Message::SyncStep1 {
        doc: doc.into(),
        state_vector: state_vector.to_vec(),
    }
}

fn full_meta() -> Vec<(&'static str, Any)> {
    vec![
        ("pinned", Any::Bool(true)),
        ("title", Any::String("Notes".into())),
    ]
}

fn vectors() -> Vec<Vector> {
    let f = fixture();
    let empty_sv = StateVector::default().encode_v1();
    let v = |name, msg, check| Vector { name, msg, check };
    vec![
        // Hello (tag 0)
        v(
            "hello_1_4.bin",
            hello(1, 4, "laptop", &["/ip4/10.0.0.2/tcp/4001"]),
            Check::Version { accepted: true },
        ),
        v(
            "hello_1_5.bin",
            hello(
                1,
                5,
                "desktop",
                &["/ip4/192.168.1.20/tcp/4001", "/ip6/fe80::1/tcp/4001"],
            ),
            Check::Version { accepted: true },
        ),
        v(
            "hello_1_300.bin",
            hello(1, 300, "future", &[]),
            Check::Version { accepted: true },
        ),
        v(
            "hello_1_3.bin",
            hello(1, 3, "old-device", &[]),
            Check::Version { accepted: false },
        ),
        v(
            "hello_2_0.bin",
            hello(2, 0, "alien", &[]),
            Check::Version { accepted: false },
        ),
        // Refuse (tag 1), one per RefuseCode
        v(
            "refuse_unsupported_version.bin",
            refuse(
                RefuseCode::UnsupportedVersion,
                "protocol version 1.3 is too old; this device needs 1.4 or newer \
                 (update devicelink on the other device)",
            ),
            Check::None,
        ),
        v(
            "refuse_not_trusted.bin",
            Message::Refuse(Refusal::not_trusted(&example_device())),
            Check::None,
        ),
        v(
            "refuse_protocol_violation.bin",
            refuse(
                RefuseCode::ProtocolViolation,
                "expected Hello first, got Update",
            ),
            Check::None,
        ),
        v(
            "refuse_frame_too_large.bin",
            refuse(
                RefuseCode::FrameTooLarge,
                "peer sent a frame over the size limit",
            ),
            Check::None,
        ),
        v(
            "refuse_malformed.bin",
            refuse(RefuseCode::Malformed, "malformed frame"),
            Check::None,
        ),
        v(
            "refuse_shutting_down.bin",
            refuse(RefuseCode::ShuttingDown, "the agent is shutting down"),
            Check::None,
        ),
        // SyncStep1 (tag 2)
        v(
            "sync_step1_empty_sv.bin",
            sync_step1("notes", &empty_sv),
            Check::StateVector(vec![]),
        ),
        v(
            "sync_step1_partial.bin",
            sync_step1("notes", &f.sv_first),
            Check::StateVector(vec![(1, 6)]),
        ),
        v(
            "sync_step1.bin",
            sync_step1("notes", &f.sv_full),
            Check::StateVector(vec![(1, 13)]),
        ),
        v(
            "sync_step1_utf8_name.bin",
            sync_step1("journal/été", &empty_sv),
            Check::StateVector(vec![]),
        ),
        v(
            "sync_step1_empty_doc_name.bin",
            sync_step1("", &empty_sv),
            Check::StateVector(vec![]),
        ),
        // SyncStep2 (tag 3)
        v(
            "sync_step2.bin",
            Message::SyncStep2 {
                doc: "notes".into(),
                update: f.full_state.clone(),
            },
            Check::Yjs {
                prior: vec![],
                text: "hello world",
                meta: full_meta(),
            },
        ),
        v(
            "sync_step2_delta.bin",
            Message::SyncStep2 {
                doc: "notes".into(),
                update: f.diff_from_first.clone(),
            },
            Check::Yjs {
                prior: vec![f.first.clone()],
                text: "hello world",
                meta: full_meta(),
            },
        ),
        v(
            "sync_step2_nothing_missing.bin",
            Message::SyncStep2 {
                doc: "notes".into(),
                update: f.diff_from_full.clone(),
            },
            Check::Yjs {
                prior: vec![f.full_state.clone()],
                text: "hello world",
                meta: full_meta(),
            },
        ),
        // Update (tag 4)
        v(
            "update.bin",
            Message::Update {
                doc: "notes".into(),
                update: f.first.clone(),
            },
            Check::Yjs {
                prior: vec![],
                text: "hello",
                meta: vec![("title", Any::String("Notes".into()))],
            },
        ),
        v(
            "update_second.bin",
            Message::Update {
                doc: "notes".into(),
                update: f.second.clone(),
            },
            Check::Yjs {
                prior: vec![f.first.clone()],
                text: "hello world",
                meta: full_meta(),
            },
        ),
        v(
            "update_merged.bin",
            Message::Update {
                doc: "notes".into(),
                update: f.merged.clone(),
            },
            Check::Yjs {
                prior: vec![],
                text: "hello world",
                meta: full_meta(),
            },
        ),
        v(
            "update_long.bin",
            Message::Update {
                doc: "notes".into(),
                update: f.long.clone(),
            },
            Check::Yjs {
                prior: vec![],
                text: LONG_TEXT,
                meta: vec![],
            },
        ),
        // DocError (tag 5), one per DocErrorCode
        v(
            "doc_error_invalid_update.bin",
            doc_error(
                "notes",
                DocErrorCode::InvalidUpdate,
                "document \"notes\": invalid Yjs update: unexpected end of buffer",
            ),
            Check::None,
        ),
        v(
            "doc_error_invalid_state_vector.bin",
            doc_error(
                "notes",
                DocErrorCode::InvalidStateVector,
                "bad state vector",
            ),
            Check::None,
        ),
        v(
            "doc_error_invalid_doc_name.bin",
            doc_error(
                "",
                DocErrorCode::InvalidDocName,
                "invalid document name \"\": empty",
            ),
            Check::None,
        ),
        v(
            "doc_error_storage.bin",
            doc_error("notes", DocErrorCode::Storage, "database error"),
            Check::None,
        ),
        // Optional features (announced in Hello.listen_addrs).
        v(
            "hello_1_4_features.bin",
            hello(
                1,
                4,
                "laptop",
                &["/ip4/10.0.0.2/tcp/4001", "devicelink-features:feed,parts"],
            ),
            Check::Version { accepted: true },
        ),
        v(
            "hello_1_4_awareness.bin",
            hello(
                1,
                4,
                "laptop",
                &[
                    "/ip4/10.0.0.2/tcp/4001",
                    "devicelink-features:feed,parts,awareness",
                ],
            ),
            Check::Version { accepted: true },
        ),
        // FeedRequest (tag 6)
        v(
            "feed_request_first.bin",
            Message::FeedRequest { epoch: 0, after: 0 },
            Check::None,
        ),
        v(
            "feed_request.bin",
            Message::FeedRequest {
                epoch: 0x0123_4567_89ab_cdef,
                after: 300,
            },
            Check::None,
        ),
        // FeedPage (tag 7)
        v(
            "feed_page.bin",
            Message::FeedPage {
                epoch: 0x0123_4567_89ab_cdef,
                head: 302,
                docs: vec!["_devicelink/devices".into(), "notes".into()],
                last: true,
            },
            Check::None,
        ),
        v(
            "feed_page_empty.bin",
            Message::FeedPage {
                epoch: 0x0123_4567_89ab_cdef,
                head: 300,
                docs: vec![],
                last: true,
            },
            Check::None,
        ),
        // FeedMark (tag 8)
        v(
            "feed_mark.bin",
            Message::FeedMark {
                epoch: 0x0123_4567_89ab_cdef,
                head: 305,
            },
            Check::None,
        ),
        // Part (tag 9): the whole `notes` update split in two pieces.
        v(
            "part_first.bin",
            Message::Part {
                doc: "notes".into(),
                kind: 3,
                total: f.full_state.len() as u64,
                data: f.full_state[..20].to_vec(),
            },
            Check::None,
        ),
        v(
            "part_last.bin",
            Message::Part {
                doc: "notes".into(),
                kind: 3,
                total: f.full_state.len() as u64,
                data: f.full_state[20..].to_vec(),
            },
            Check::None,
        ),
        // Awareness (tag 10): a y-protocols awareness update, varuint count then per client
        // varuint id, varuint clock, varstring JSON ("null" = the client left).
        v(
            "awareness.bin",
            Message::Awareness {
                doc: "notes".into(),
                update: awareness_update(42, 3, r##"{"user":{"name":"alice","color":"#30bced"}}"##),
            },
            Check::None,
        ),
        v(
            "awareness_left.bin",
            Message::Awareness {
                doc: "notes".into(),
                update: awareness_update(42, 4, "null"),
            },
            Check::None,
        ),
    ]
}

/// One client's awareness entry, as y-protocols encodes an update.
fn awareness_update(client: u64, clock: u64, json: &str) -> Vec<u8> {
    let mut out = varint(1);
    out.extend(varint(client));
    out.extend(varint(clock));
    out.extend(varint(json.len() as u64));
    out.extend(json.as_bytes());
    out
}

// ---------------------------------------------------------------------------------------------
// Tags as the spec tables give them. The matches are exhaustive on purpose: a new variant does
// not compile here until it has a tag, a vector and a line in protocol/README.md.
// ---------------------------------------------------------------------------------------------

const MESSAGE_TAGS: usize = 11;
const REFUSE_CODES: usize = 6;
const DOC_ERROR_CODES: usize = 4;

fn message_tag(msg: &Message) -> u8 {
    match msg {
        Message::Hello(_) => 0,
        Message::Refuse(_) => 1,
        Message::SyncStep1 { .. } => 2,
        Message::SyncStep2 { .. } => 3,
        Message::Update { .. } => 4,
        Message::DocError { .. } => 5,
        Message::FeedRequest { .. } => 6,
        Message::FeedPage { .. } => 7,
        Message::FeedMark { .. } => 8,
        Message::Part { .. } => 9,
        Message::Awareness { .. } => 10,
    }
}

fn refuse_code_tag(code: RefuseCode) -> u8 {
    match code {
        RefuseCode::UnsupportedVersion => 0,
        RefuseCode::NotTrusted => 1,
        RefuseCode::ProtocolViolation => 2,
        RefuseCode::FrameTooLarge => 3,
        RefuseCode::Malformed => 4,
        RefuseCode::ShuttingDown => 5,
    }
}

fn doc_error_code_tag(code: DocErrorCode) -> u8 {
    match code {
        DocErrorCode::InvalidUpdate => 0,
        DocErrorCode::InvalidStateVector => 1,
        DocErrorCode::InvalidDocName => 2,
        DocErrorCode::Storage => 3,
    }
}

/// Postcard unsigned LEB128 varint of `n` (what the spec prescribes for lengths and tags).
fn varint(mut n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// The position of the byte right after a postcard string or byte field starting at `at`.
fn skip_bytes_field(body: &[u8], at: usize) -> usize {
    let mut len = 0u64;
    let mut i = at;
    loop {
        let byte = body[i];
        len |= u64::from(byte & 0x7f) << (7 * (i - at));
        i += 1;
        if byte & 0x80 == 0 {
            break;
        }
    }
    i + len as usize
}

// ---------------------------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------------------------

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The body of a frame, after checking that its length prefix equals the body length.
fn split_frame<'a>(name: &str, frame: &'a [u8]) -> &'a [u8] {
    assert!(frame.len() >= 4, "{name}: shorter than a length prefix");
    let (prefix, body) = frame.split_at(4);
    let len = u32::from_be_bytes(prefix.try_into().expect("4 bytes")) as usize;
    assert_eq!(
        len,
        body.len(),
        "{name}: length prefix {len} does not match the body length {}",
        body.len()
    );
    body
}

fn write_file(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().expect("vector files have a parent dir"))
        .expect("create the vectors dir");
    std::fs::write(path, bytes).expect("write a vector file");
    eprintln!("wrote {} ({} bytes)", path.display(), bytes.len());
}

fn read_file(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e} (generate the vectors with {WRITE_ENV}=1 cargo test --test protocol_vectors)",
            path.display()
        )
    })
}

/// The `.bin` file names directly in `dir`.
fn bin_files(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .expect("read the vectors dir")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| n.ends_with(".bin"))
        .collect()
}

fn apply(doc: &Doc, update: &[u8], what: &str) {
    let update = Update::decode_v1(update).unwrap_or_else(|e| panic!("{what}: not Yjs v1: {e}"));
    let mut txn = doc.transact_mut();
    txn.apply_update(update)
        .unwrap_or_else(|e| panic!("{what}: does not apply: {e}"));
}

fn check_semantics(vector: &Vector) {
    let name = vector.name;
    match (&vector.check, &vector.msg) {
        (Check::None, _) => {}
        (Check::Version { accepted }, Message::Hello(hello)) => {
            let result = hello.version.check_compatible();
            assert_eq!(result.is_ok(), *accepted, "{name}: {result:?}");
            if let Err(refusal) = result {
                assert_eq!(refusal.code, RefuseCode::UnsupportedVersion, "{name}");
                assert!(
                    !refusal.message.is_empty(),
                    "{name}: refusal without a reason"
                );
            }
        }
        (Check::StateVector(expected), Message::SyncStep1 { state_vector, .. }) => {
            let sv = StateVector::decode_v1(state_vector)
                .unwrap_or_else(|e| panic!("{name}: state vector does not decode: {e}"));
            let mut got: Vec<(u64, u32)> = sv.iter().map(|(c, k)| (c.get(), *k)).collect();
            got.sort_unstable();
            assert_eq!(&got, expected, "{name}: state vector");
        }
        (
            Check::Yjs { prior, text, meta },
            Message::SyncStep2 { update, .. } | Message::Update { update, .. },
        ) => {
            let doc = Doc::new();
            for (i, p) in prior.iter().enumerate() {
                apply(&doc, p, &format!("{name}: prior update {i}"));
            }
            apply(&doc, update, name);
            let body = doc.get_or_insert_text("body");
            let map = doc.get_or_insert_map("meta");
            let txn = doc.transact();
            assert!(
                !txn.has_missing_updates(),
                "{name}: the update did not apply completely (missing dependencies)"
            );
            assert_eq!(body.get_string(&txn), *text, "{name}: text `body`");
            let mut got: Vec<(String, Any)> = map
                .iter(&txn)
                .map(|(k, v)| match v {
                    Out::Any(any) => (k.to_string(), any),
                    other => panic!("{name}: meta.{k} is not a plain value: {other:?}"),
                })
                .collect();
            got.sort_by(|a, b| a.0.cmp(&b.0));
            let expected: Vec<(String, Any)> = meta
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect();
            assert_eq!(got, expected, "{name}: map `meta`");
        }
        _ => panic!("{name}: check does not fit the message kind"),
    }
}

/// The checks of the spec's tag tables against the actual bytes.
fn check_tags(name: &str, msg: &Message, body: &[u8]) {
    assert_eq!(body[0], message_tag(msg), "{name}: message tag");
    match msg {
        Message::Refuse(r) => {
            assert_eq!(body[1], refuse_code_tag(r.code), "{name}: RefuseCode tag");
            let mut expected = vec![message_tag(msg), refuse_code_tag(r.code)];
            expected.extend(varint(r.message.len() as u64));
            expected.extend(r.message.as_bytes());
            assert_eq!(body, expected, "{name}: Refuse layout");
        }
        Message::DocError { doc, code, message } => {
            let at = skip_bytes_field(body, 1);
            assert_eq!(
                body[at],
                doc_error_code_tag(*code),
                "{name}: DocErrorCode tag"
            );
            let mut expected = vec![message_tag(msg)];
            expected.extend(varint(doc.len() as u64));
            expected.extend(doc.as_bytes());
            expected.push(doc_error_code_tag(*code));
            expected.extend(varint(message.len() as u64));
            expected.extend(message.as_bytes());
            assert_eq!(body, expected, "{name}: DocError layout");
        }
        Message::Hello(h) => {
            let mut expected = vec![message_tag(msg)];
            expected.extend(varint(h.version.major.into()));
            expected.extend(varint(h.version.minor.into()));
            expected.extend(varint(h.device_name.len() as u64));
            expected.extend(h.device_name.as_bytes());
            expected.extend(varint(h.listen_addrs.len() as u64));
            for a in &h.listen_addrs {
                expected.extend(varint(a.len() as u64));
                expected.extend(a.as_bytes());
            }
            assert_eq!(body, expected, "{name}: Hello layout");
        }
        Message::SyncStep1 {
            doc,
            state_vector: bytes,
        }
        | Message::SyncStep2 { doc, update: bytes }
        | Message::Update { doc, update: bytes }
        | Message::Awareness { doc, update: bytes } => {
            let mut expected = vec![message_tag(msg)];
            expected.extend(varint(doc.len() as u64));
            expected.extend(doc.as_bytes());
            expected.extend(varint(bytes.len() as u64));
            expected.extend(bytes);
            assert_eq!(body, expected, "{name}: doc + bytes layout");
        }
        Message::FeedRequest { epoch, after } => {
            let mut expected = vec![message_tag(msg)];
            expected.extend(varint(*epoch));
            expected.extend(varint(*after));
            assert_eq!(body, expected, "{name}: FeedRequest layout");
        }
        Message::FeedPage {
            epoch,
            head,
            docs,
            last,
        } => {
            let mut expected = vec![message_tag(msg)];
            expected.extend(varint(*epoch));
            expected.extend(varint(*head));
            expected.extend(varint(docs.len() as u64));
            for d in docs {
                expected.extend(varint(d.len() as u64));
                expected.extend(d.as_bytes());
            }
            expected.push(u8::from(*last));
            assert_eq!(body, expected, "{name}: FeedPage layout");
        }
        Message::FeedMark { epoch, head } => {
            let mut expected = vec![message_tag(msg)];
            expected.extend(varint(*epoch));
            expected.extend(varint(*head));
            assert_eq!(body, expected, "{name}: FeedMark layout");
        }
        Message::Part {
            doc,
            kind,
            total,
            data,
        } => {
            let mut expected = vec![message_tag(msg)];
            expected.extend(varint(doc.len() as u64));
            expected.extend(doc.as_bytes());
            expected.push(*kind);
            expected.extend(varint(*total));
            expected.extend(varint(data.len() as u64));
            expected.extend(data);
            assert_eq!(body, expected, "{name}: Part layout");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------------------------

#[test]
fn vectors_encode_and_decode_as_specified() {
    let write = writing();
    for vector in vectors() {
        let name = vector.name;
        let expected = to_frame(&vector.msg).expect("vector messages encode");
        let path = vectors_dir().join(name);
        if write {
            write_file(&path, &expected);
        }
        let frame = read_file(&path);
        assert!(
            frame == expected,
            "{name}: file differs from to_frame(msg)\n file: {}\n code: {}\n\
             (after an intentional wire change: {WRITE_ENV}=1 cargo test --test protocol_vectors)",
            hex(&frame),
            hex(&expected)
        );
        let body = split_frame(name, &frame);

        // The real stream codec sees the same frame and body.
        let mut buf = BytesMut::from(&frame[..]);
        let framed = codec()
            .decode(&mut buf)
            .unwrap_or_else(|e| panic!("{name}: frame codec rejects it: {e}"))
            .unwrap_or_else(|| panic!("{name}: frame codec wants more bytes"));
        assert_eq!(&framed[..], body, "{name}: codec body");
        assert!(buf.is_empty(), "{name}: codec left bytes over");

        let decoded = Message::decode(body).unwrap_or_else(|e| panic!("{name}: decode: {e}"));
        assert_eq!(decoded, vector.msg, "{name}: decoded message");
        check_tags(name, &vector.msg, body);
        check_semantics(&vector);
    }
}

/// How a negative vector must fail.
enum Reject {
    /// The prefix matches the body, but `Message::decode` must fail.
    Decode,
    /// The 4-byte prefix alone announces a body over `MAX_FRAME_LEN` (the file has no body).
    Oversized,
}

fn invalid_vectors() -> Vec<(&'static str, Vec<u8>, Reject)> {
    let frame = |body: &[u8]| {
        let mut out = (body.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(body);
        out
    };
    let hello_body = hello(1, 4, "laptop", &["/ip4/10.0.0.2/tcp/4001"])
        .encode()
        .expect("encodes");
    let refuse_body = Message::Refuse(Refusal::not_trusted(&example_device()))
        .encode()
        .expect("encodes");
    let mut trailing = refuse_body.to_vec();
    trailing.push(0x00);
    let over = u32::try_from(MAX_FRAME_LEN + 1).expect("limit fits a u32");
    vec![
        ("empty_body.bin", frame(&[]), Reject::Decode),
        (
            "truncated_body.bin",
            frame(&hello_body[..hello_body.len() - 3]),
            Reject::Decode,
        ),
        ("unknown_message_tag.bin", frame(&[0x0b]), Reject::Decode),
        (
            "feed_page_bad_bool.bin",
            frame(&[0x07, 0x01, 0x00, 0x00, 0x02]),
            Reject::Decode,
        ),
        (
            "unknown_refuse_code.bin",
            frame(&[0x01, 0x06, 0x00]),
            Reject::Decode,
        ),
        (
            "unknown_doc_error_code.bin",
            frame(&[0x05, 0x05, b'n', b'o', b't', b'e', b's', 0x04, 0x00]),
            Reject::Decode,
        ),
        ("trailing_byte.bin", frame(&trailing), Reject::Decode),
        (
            "invalid_utf8.bin",
            frame(&[0x00, 0x01, 0x04, 0x01, 0xff, 0x00]),
            Reject::Decode,
        ),
        (
            "varint_overflow.bin",
            frame(&[0x00, 0x01, 0xff, 0xff, 0x7f, 0x00, 0x00]),
            Reject::Decode,
        ),
        (
            "length_past_end.bin",
            frame(&[0x04, 0x7f, b'n', b'o', b't', b'e', b's']),
            Reject::Decode,
        ),
        (
            "oversized_length_prefix.bin",
            over.to_be_bytes().to_vec(),
            Reject::Oversized,
        ),
    ]
}

#[test]
fn invalid_vectors_are_rejected() {
    let write = writing();
    for (name, expected, reject) in invalid_vectors() {
        let path = invalid_dir().join(name);
        if write {
            write_file(&path, &expected);
        }
        let frame = read_file(&path);
        assert!(
            frame == expected,
            "invalid/{name}: file differs\n file: {}\n code: {}",
            hex(&frame),
            hex(&expected)
        );
        match reject {
            Reject::Decode => {
                let body = split_frame(name, &frame);
                let result = Message::decode(body);
                assert!(result.is_err(), "invalid/{name} decoded: {result:?}");
            }
            Reject::Oversized => {
                assert_eq!(frame.len(), 4, "invalid/{name}: only a prefix");
                let len = u32::from_be_bytes(frame[..4].try_into().expect("4 bytes")) as usize;
                assert!(
                    len > MAX_FRAME_LEN,
                    "invalid/{name}: {len} is within the limit"
                );
                // The stream codec refuses it from the prefix alone, before any body arrives.
                let mut buf = BytesMut::from(&frame[..]);
                assert!(
                    codec().decode(&mut buf).is_err(),
                    "invalid/{name}: the frame codec accepted the prefix"
                );
            }
        }
    }
}

#[test]
fn frame_limit_is_32_mib_inclusive() {
    assert_eq!(MAX_FRAME_LEN, 33_554_432);
    // A prefix of exactly the limit is acceptable: the codec waits for the body.
    let mut buf = BytesMut::from(&(MAX_FRAME_LEN as u32).to_be_bytes()[..]);
    assert!(matches!(codec().decode(&mut buf), Ok(None)));
    // One more is refused.
    let mut buf = BytesMut::from(&((MAX_FRAME_LEN + 1) as u32).to_be_bytes()[..]);
    assert!(codec().decode(&mut buf).is_err());
}

#[test]
fn vectors_cover_every_variant_and_code() {
    let vectors = vectors();
    let mut messages = BTreeSet::new();
    let mut refuse_codes = BTreeSet::new();
    let mut doc_error_codes = BTreeSet::new();
    for v in &vectors {
        messages.insert(message_tag(&v.msg));
        match &v.msg {
            Message::Refuse(r) => {
                refuse_codes.insert(refuse_code_tag(r.code));
            }
            Message::DocError { code, .. } => {
                doc_error_codes.insert(doc_error_code_tag(*code));
            }
            _ => {}
        }
    }
    let all = |n: usize| (0..n as u8).collect::<BTreeSet<u8>>();
    assert_eq!(
        messages,
        all(MESSAGE_TAGS),
        "Message variants with a vector"
    );
    assert_eq!(refuse_codes, all(REFUSE_CODES), "RefuseCodes with a vector");
    assert_eq!(
        doc_error_codes,
        all(DOC_ERROR_CODES),
        "DocErrorCodes with a vector"
    );
    let names: BTreeSet<&str> = vectors.iter().map(|v| v.name).collect();
    assert_eq!(names.len(), vectors.len(), "vector names are unique");
    assert_eq!(PROTOCOL_VERSION, Version { major: 1, minor: 4 });
}

/// No stray files, and every file is described in protocol/vectors/README.md.
#[test]
fn vector_files_are_listed_and_documented() {
    if writing() {
        // Files are being (re)written by the other tests right now.
        return;
    }
    let listing = std::fs::read_to_string(vectors_dir().join("README.md"))
        .expect("protocol/vectors/README.md exists");
    let valid: BTreeSet<String> = vectors().iter().map(|v| v.name.to_string()).collect();
    let invalid: BTreeSet<String> = invalid_vectors()
        .iter()
        .map(|(n, _, _)| n.to_string())
        .collect();
    assert_eq!(
        bin_files(&vectors_dir()),
        valid,
        "files in protocol/vectors/"
    );
    assert_eq!(
        bin_files(&invalid_dir()),
        invalid,
        "files in protocol/vectors/invalid/"
    );
    for name in &valid {
        assert!(
            listing.contains(&format!("`{name}`")),
            "protocol/vectors/README.md does not describe {name}"
        );
    }
    for name in &invalid {
        assert!(
            listing.contains(&format!("`invalid/{name}`")),
            "protocol/vectors/README.md does not describe invalid/{name}"
        );
    }
}

/// The annotated hex dumps in protocol/README.md show the real bytes.
#[test]
fn spec_hex_dumps_match_the_vectors() {
    let spec =
        std::fs::read_to_string(protocol_dir().join("README.md")).expect("protocol/README.md");
    for name in [
        "hello_1_4.bin",
        "refuse_not_trusted.bin",
        "sync_step1.bin",
        "update.bin",
    ] {
        let frame = to_frame(
            &vectors()
                .into_iter()
                .find(|v| v.name == name)
                .expect("annotated vector exists")
                .msg,
        )
        .expect("encodes");
        let line = format!("{name}: {}", hex(&frame));
        assert!(
            spec.contains(&line),
            "protocol/README.md lacks the exact line\n{line}"
        );
    }
}
