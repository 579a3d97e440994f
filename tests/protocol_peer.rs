//! The agent against a hand-driven libp2p peer: version refusal, malformed and oversized frames,
//! and devices that are not trusted. The raw peer uses the same transport stack (TCP + Noise +
//! Yamux) but writes frames by hand.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::raw_peer::*;
use common::*;
use devicelink::sync::message::codec;
use devicelink::sync::{Hello, Message, RefuseCode, Version, PROTOCOL_VERSION};
use devicelink::AgentHandle;
use futures::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio_util::codec::Framed;
use tokio_util::compat::FuturesAsyncReadCompatExt;

fn hello(version: Version) -> Message {
    Message::Hello(Hello {
        version,
        device_name: "raw".into(),
        listen_addrs: vec![],
    })
}

/// Reads frames until the stream ends (bounded in time); returns the decoded messages.
async fn read_all(transport: &mut Transport) -> Vec<Message> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while let Ok(Some(Ok(frame))) = tokio::time::timeout_at(deadline, transport.next()).await {
        out.push(Message::decode(&frame).expect("the agent only sends valid frames"));
    }
    out
}

fn refusal(messages: &[Message]) -> Option<(RefuseCode, String)> {
    messages.iter().find_map(|m| match m {
        Message::Refuse(r) => Some((r.code, r.message.clone())),
        _ => None,
    })
}

async fn linked_pair() -> (
    AgentHandle,
    AgentHandle,
    tempfile::TempDir,
    tempfile::TempDir,
) {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(da.path(), "a").await;
    let b = start(db.path(), "b").await;
    link(&a, &b);
    wait_until(LIMIT, "a-b session", || a.is_syncing_with(&b.device_id())).await;
    (a, b, da, db)
}

/// Acceptance 5: a 1.3 peer is refused with a clear message, and the agent keeps serving B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_protocol_version_is_refused_clearly() {
    let (a, b, _da, _db) = linked_pair().await;
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    // Trusted, so the version is what gets refused.
    a.trust_add(keypair.public().to_peer_id(), "old-device")
        .unwrap();
    let mut raw = raw_peer_with(keypair, &a).await;
    let mut transport = open(&mut raw, &a).await.unwrap();
    transport
        .send(hello(Version { major: 1, minor: 3 }).encode().unwrap())
        .await
        .unwrap();
    let messages = read_all(&mut transport).await;
    assert!(matches!(messages.first(), Some(Message::Hello(h)) if h.version == PROTOCOL_VERSION));
    let (code, message) = refusal(&messages).expect("a Refuse frame");
    assert_eq!(code, RefuseCode::UnsupportedVersion);
    assert!(message.contains("1.3 is too old"), "{message}");
    assert!(
        !messages.iter().any(|m| m.doc().is_some()),
        "no document data for a refused peer"
    );

    // The agent logged it (visible in status) ...
    let raw_id = raw.id.to_string();
    wait_until(LIMIT, "the refusal in status", || {
        a.status().unwrap().peers.iter().any(|p| {
            p.device_id == raw_id
                && p.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("too old"))
        })
    })
    .await;
    // ... and an unknown major version is refused too.
    let mut transport = open(&mut raw, &a).await.unwrap();
    transport
        .send(hello(Version { major: 2, minor: 0 }).encode().unwrap())
        .await
        .unwrap();
    let (code, message) = refusal(&read_all(&mut transport).await).expect("a Refuse frame");
    assert_eq!(code, RefuseCode::UnsupportedVersion);
    assert!(message.contains("unknown major"), "{message}");

    // A peer still on the 1.3 stream id is answered with a clear refusal, not a bare
    // negotiation failure.
    let stream = raw
        .control
        .open_stream(
            a.device_id(),
            libp2p::StreamProtocol::new("/devicelink/sync/1.3.0"),
        )
        .await
        .expect("the 1.3 id is accepted, to be refused");
    let mut transport = Framed::new(stream.compat(), codec());
    let (code, message) = refusal(&read_all(&mut transport).await).expect("a Refuse frame");
    assert_eq!(code, RefuseCode::UnsupportedVersion);
    assert!(
        message.contains("/devicelink/sync/1.3.0 is too old"),
        "{message}"
    );

    assert_still_serving(&a, &b).await;
}

/// Acceptance 5: malformed and oversized frames end that stream with an error; other peers are
/// unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_frames_end_only_that_stream() {
    let (a, b, _da, _db) = linked_pair().await;
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    a.trust_add(keypair.public().to_peer_id(), "fuzzer")
        .unwrap();
    let mut raw = raw_peer_with(keypair, &a).await;

    // Garbage body after a valid hello.
    let mut transport = open(&mut raw, &a).await.unwrap();
    transport
        .send(hello(PROTOCOL_VERSION).encode().unwrap())
        .await
        .unwrap();
    transport
        .send(Bytes::from_static(&[0xff, 0xff, 0xff, 0x07, 0x01]))
        .await
        .unwrap();
    let (code, _) = refusal(&read_all(&mut transport).await).expect("a Refuse frame");
    assert_eq!(code, RefuseCode::Malformed);

    // A length prefix far over the limit (written raw, bypassing our codec's own check).
    let mut transport = open(&mut raw, &a).await.unwrap();
    transport
        .send(hello(PROTOCOL_VERSION).encode().unwrap())
        .await
        .unwrap();
    {
        let io = transport.get_mut();
        io.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        io.write_all(&[0u8; 64]).await.unwrap();
        io.flush().await.unwrap();
    }
    let (code, message) = refusal(&read_all(&mut transport).await).expect("a Refuse frame");
    assert_eq!(code, RefuseCode::FrameTooLarge, "{message}");

    // A corrupt Yjs update inside a valid frame is a per-document error; the stream goes on.
    let mut transport = open(&mut raw, &a).await.unwrap();
    transport
        .send(hello(PROTOCOL_VERSION).encode().unwrap())
        .await
        .unwrap();
    let bad = Message::Update {
        doc: "victim".into(),
        update: vec![9, 9, 9, 9],
    };
    transport.send(bad.encode().unwrap()).await.unwrap();
    let deadline = tokio::time::Instant::now() + LIMIT;
    let mut got_doc_error = false;
    while let Ok(Some(Ok(frame))) = tokio::time::timeout_at(deadline, transport.next()).await {
        if let Message::DocError { doc, .. } = Message::decode(&frame).unwrap() {
            assert_eq!(doc, "victim");
            got_doc_error = true;
            break;
        }
    }
    assert!(got_doc_error, "a DocError answer for the corrupt update");
    assert_still_serving(&a, &b).await;
}

/// Acceptance 6: a device not in the trust store can neither read nor change any document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_devices_cannot_read_or_write() {
    let (da, dc) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(da.path(), "a").await;
    let secret = a.open_doc("secret").unwrap();
    secret.set_map_value("m", "pin", "1234").await.unwrap();
    let before = secret.encode_state();

    // A raw intruder speaking the protocol perfectly, but unknown to A.
    let mut raw = raw_peer_connected_to(&a).await;
    if let Ok(mut transport) = open(&mut raw, &a).await {
        let _ = transport
            .send(hello(PROTOCOL_VERSION).encode().unwrap())
            .await;
        let _ = transport
            .send(
                Message::SyncStep1 {
                    doc: "secret".into(),
                    state_vector: vec![0],
                }
                .encode()
                .unwrap(),
            )
            .await;
        let intruder_doc = yrs::Doc::new();
        let update = {
            use yrs::{Map, Transact};
            let map = intruder_doc.get_or_insert_map("m");
            let mut txn = intruder_doc.transact_mut();
            map.insert(&mut txn, "pin", "0000");
            txn.encode_update_v1()
        };
        let _ = transport
            .send(
                Message::Update {
                    doc: "secret".into(),
                    update,
                }
                .encode()
                .unwrap(),
            )
            .await;
        let messages = read_all(&mut transport).await;
        assert!(
            !messages.iter().any(|m| m.doc().is_some()),
            "an untrusted device got document data: {messages:?}"
        );
        if let Some((code, _)) = refusal(&messages) {
            assert_eq!(code, RefuseCode::NotTrusted);
        }
    }

    // A refused it at the connection, and says why.
    let raw_id = raw.id.to_string();
    wait_until(LIMIT, "the refusal in status", || {
        a.status().unwrap().peers.iter().any(|p| {
            p.device_id == raw_id
                && !p.trusted
                && p.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("not in the trust store"))
        })
    })
    .await;

    // A full agent C that trusts A, but A does not trust C.
    let c = start(dc.path(), "c").await;
    c.trust_add(a.device_id(), "a").unwrap();
    let c_doc = c.open_doc("secret").unwrap();
    c_doc.set_map_value("m", "pin", "6666").await.unwrap();
    c.dial(a.listen_addrs()[0].clone()).unwrap();
    // Give C every chance (several redials) to push or pull anything.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!a.is_syncing_with(&c.device_id()));
    assert_same_as_state(
        &secret,
        &before,
        "A's document was changed by an untrusted device",
    );
    assert_eq!(secret.to_json()["m"]["pin"], "1234");
    assert_eq!(c_doc.to_json()["m"]["pin"], "6666", "C read A's document");
    assert_eq!(a.list_docs().unwrap(), vec!["secret".to_string()]);

    // Control: once A trusts C, the same setup syncs (so the negative above is meaningful).
    a.trust_add(c.device_id(), "c").unwrap();
    wait_until(LIMIT, "sync after trusting", || same_state(&secret, &c_doc)).await;
    a.shutdown().await.unwrap();
    c.shutdown().await.unwrap();
}

/// B's edits still reach A, and A's reach B.
async fn assert_still_serving(a: &AgentHandle, b: &AgentHandle) {
    let doc_a = a.open_doc("after").unwrap();
    let doc_b = b.open_doc("after").unwrap();
    doc_b.set_map_value("m", "from", "b").await.unwrap();
    doc_a.set_map_value("m", "to", "a").await.unwrap();
    wait_until(LIMIT, "a and b still syncing", || {
        same_state(&doc_a, &doc_b)
            && doc_a.to_json()["m"]
                .as_object()
                .is_some_and(|m| m.len() == 2)
    })
    .await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// Sends one message on a raw stream.
async fn send(transport: &mut Transport, msg: &Message) {
    transport.send(msg.encode().unwrap()).await.unwrap();
}

/// Reads frames until `want` matches one (bounded in time); returns everything read.
async fn read_until(transport: &mut Transport, want: impl Fn(&Message) -> bool) -> Vec<Message> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + LIMIT;
    while let Ok(Some(Ok(frame))) = tokio::time::timeout_at(deadline, transport.next()).await {
        let msg = Message::decode(&frame).expect("the agent only sends valid frames");
        let done = want(&msg);
        out.push(msg);
        if done {
            break;
        }
    }
    out
}

fn update_setting(key: &str, value: &str) -> Vec<u8> {
    use yrs::{Map, Transact};
    let doc = yrs::Doc::new();
    let map = doc.get_or_insert_map("m");
    let mut txn = doc.transact_mut();
    map.insert(&mut txn, key, value);
    txn.encode_update_v1()
}

/// A plain 1.4 peer (no features announced) gets the plain protocol: a `SyncStep1` per document,
/// never a feature message; feature messages from it are protocol violations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_features_gets_the_plain_protocol() {
    let da = tempfile::tempdir().unwrap();
    let a = start(da.path(), "a").await;
    a.open_doc("notes")
        .unwrap()
        .set_map_value("m", "k", "v")
        .await
        .unwrap();
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    a.trust_add(keypair.public().to_peer_id(), "plain").unwrap();
    let mut raw = raw_peer_with(keypair, &a).await;
    let mut transport = open(&mut raw, &a).await.unwrap();
    send(&mut transport, &hello(PROTOCOL_VERSION)).await;
    let got = read_until(
        &mut transport,
        |m| matches!(m, Message::SyncStep1 { doc, .. } if doc == "notes"),
    )
    .await;
    assert!(
        got.iter()
            .any(|m| matches!(m, Message::SyncStep1 { doc, .. } if doc == "notes")),
        "{got:?}"
    );
    let Some(Message::Hello(theirs)) = got.first() else {
        panic!("Hello first: {got:?}")
    };
    assert!(theirs.features().feed && theirs.features().parts);
    send(&mut transport, &Message::FeedRequest { epoch: 0, after: 0 }).await;
    let rest = read_all(&mut transport).await;
    assert!(
        !got.iter().chain(&rest).any(|m| matches!(
            m,
            Message::FeedRequest { .. }
                | Message::FeedPage { .. }
                | Message::FeedMark { .. }
                | Message::Part { .. }
        )),
        "a feature message to a plain peer: {got:?} {rest:?}"
    );
    let (code, _) = refusal(&rest).expect("a Refuse frame");
    assert_eq!(code, RefuseCode::ProtocolViolation);
    a.shutdown().await.unwrap();
}

/// A feature peer: its listing request is answered from the change feed; a transfer in parts it
/// never finishes does not hold up other documents; over-long listings and oversized parts end
/// only that stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feature_peer_cannot_stall_or_overflow_the_agent() {
    let (a, b, _da, _db) = linked_pair().await;
    a.open_doc("listed")
        .unwrap()
        .set_map_value("m", "k", "v")
        .await
        .unwrap();
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    a.trust_add(keypair.public().to_peer_id(), "featured")
        .unwrap();
    let mut raw = raw_peer_with(keypair, &a).await;
    let featured = Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        device_name: "raw".into(),
        listen_addrs: vec![devicelink::sync::Features::ALL.entry()],
    });

    let mut transport = open(&mut raw, &a).await.unwrap();
    send(&mut transport, &featured).await;
    // The agent asks for our changes (we have no checkpoint of its feed: it lists everything).
    let got = read_until(&mut transport, |m| matches!(m, Message::FeedRequest { .. })).await;
    assert!(
        matches!(got.last(), Some(Message::FeedRequest { .. })),
        "{got:?}"
    );
    send(&mut transport, &Message::FeedRequest { epoch: 0, after: 0 }).await;
    let mut listed = Vec::new();
    let pages = read_until(&mut transport, |m| {
        matches!(m, Message::FeedPage { last: true, .. })
    })
    .await;
    for m in &pages {
        if let Message::FeedPage { docs, epoch, .. } = m {
            assert_ne!(*epoch, 0);
            listed.extend(docs.clone());
        }
    }
    assert!(listed.contains(&"listed".to_string()), "{pages:?}");

    // A transfer in parts that never finishes, then a small update of another document.
    let part = Message::Part {
        doc: "never".into(),
        kind: 4,
        total: 8 << 20,
        data: vec![0; 1024],
    };
    send(&mut transport, &part).await;
    let update = Message::Update {
        doc: "beside".into(),
        update: update_setting("k", "arrived"),
    };
    send(&mut transport, &update).await;
    wait_until(LIMIT, "the update beside an unfinished transfer", || {
        a.open_doc("beside").unwrap().to_json()["m"]["k"] == "arrived"
    })
    .await;
    // Our answer to the agent's request: more names in one page than allowed.
    let page = Message::FeedPage {
        epoch: 7,
        head: 1,
        docs: (0..513).map(|i| format!("d{i}")).collect(),
        last: true,
    };
    send(&mut transport, &page).await;
    let (code, message) = refusal(&read_all(&mut transport).await).expect("a Refuse frame");
    assert_eq!(code, RefuseCode::ProtocolViolation, "{message}");

    // A piece over 1 MiB.
    let mut transport = open(&mut raw, &a).await.unwrap();
    send(&mut transport, &featured).await;
    let part = Message::Part {
        doc: "big".into(),
        kind: 4,
        total: 4 << 20,
        data: vec![0; (1 << 20) + 1],
    };
    send(&mut transport, &part).await;
    let (code, message) = refusal(&read_all(&mut transport).await).expect("a Refuse frame");
    assert_eq!(code, RefuseCode::ProtocolViolation, "{message}");
    assert!(!a.list_docs().unwrap().contains(&"never".to_string()));
    assert_still_serving(&a, &b).await;
}

/// A feature peer that declines every document it listed (answering the agent's `SyncStep1`s
/// with `DocError`) does not stall the agent's catch-up: each answer counts, more than the pull
/// window of 64 are asked for, and the catch-up completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declined_documents_do_not_stall_a_catch_up() {
    let da = tempfile::tempdir().unwrap();
    let a = start(da.path(), "a").await;
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    let raw_id = keypair.public().to_peer_id();
    a.trust_add(raw_id, "decliner").unwrap();
    let mut raw = raw_peer_with(keypair, &a).await;
    let (mut transport, _) = feature_session(&mut raw, &a).await;
    let listed: Vec<String> = (0..100).map(|i| format!("declined/{i}")).collect();
    let listed: Vec<&str> = listed.iter().map(String::as_str).collect();
    serve_listing(&mut transport, (9, 100), &listed, &listed).await;
    wait_until(LIMIT, "the catch-up completes", || {
        a.status()
            .unwrap()
            .peers
            .iter()
            .any(|p| p.device_id == raw_id.to_string() && p.caught_up)
    })
    .await;
    a.shutdown().await.unwrap();
}

/// A feature peer session: Hello with every optional feature, then the agent's `FeedRequest`.
async fn feature_session(raw: &mut RawPeer, agent: &AgentHandle) -> (Transport, (u64, u64)) {
    let mut transport = open(raw, agent).await.unwrap();
    send(
        &mut transport,
        &Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            device_name: "raw".into(),
            listen_addrs: vec![devicelink::sync::Features::ALL.entry()],
        }),
    )
    .await;
    let got = read_until(&mut transport, |m| matches!(m, Message::FeedRequest { .. })).await;
    match got.last() {
        Some(Message::FeedRequest { epoch, after }) => (transport, (*epoch, *after)),
        other => panic!("no FeedRequest: {other:?} in {got:?}"),
    }
}

/// Lists `docs` as one page of feed `epoch` at `head`, then answers each `SyncStep1` for them:
/// `SyncStep2` with a change, or `DocError` for those in `decline`. Returns once all answered.
async fn serve_listing(
    transport: &mut Transport,
    (epoch, head): (u64, u64),
    docs: &[&str],
    decline: &[&str],
) {
    send(
        transport,
        &Message::FeedPage {
            epoch,
            head,
            docs: docs.iter().map(|d| d.to_string()).collect(),
            last: true,
        },
    )
    .await;
    let mut answered = 0;
    while answered < docs.len() {
        let frame = tokio::time::timeout(LIMIT, transport.next())
            .await
            .expect("the agent asks for every listed document")
            .expect("stream open")
            .expect("a frame");
        let Message::SyncStep1 { doc, .. } = Message::decode(&frame).unwrap() else {
            continue;
        };
        if !docs.contains(&doc.as_str()) {
            continue;
        }
        answered += 1;
        let answer = if decline.contains(&doc.as_str()) {
            Message::DocError {
                doc,
                code: devicelink::sync::DocErrorCode::Storage,
                message: "cannot read it right now".into(),
            }
        } else {
            let update = update_setting("from", "raw");
            Message::SyncStep2 { doc, update }
        };
        send(transport, &answer).await;
    }
}

/// Issue 23, item 1 (§9.5): a listed document answered with `DocError` must not be skipped for
/// good. The session records no checkpoint, the next session asks from the old checkpoint and
/// gets the document; only a session where every listed document arrived records one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_document_is_asked_for_again_in_the_next_session() {
    let da = tempfile::tempdir().unwrap();
    let a = start(da.path(), "a").await;
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    a.trust_add(keypair.public().to_peer_id(), "raw").unwrap();
    let mut raw = raw_peer_with(keypair, &a).await;
    let feed = (7_u64, 40_u64);

    // Session 1: "notes" arrives, "lost" is answered with DocError (a storage error, once).
    let (mut transport, (_, after)) = feature_session(&mut raw, &a).await;
    assert_eq!(after, 0, "no checkpoint of this peer yet");
    serve_listing(&mut transport, feed, &["notes", "lost"], &["lost"]).await;
    wait_until(LIMIT, "notes to arrive", || {
        a.open_doc("notes").unwrap().to_json()["m"]["from"] == "raw"
    })
    .await;
    // Give the agent every chance to (wrongly) record a checkpoint, marks included.
    tokio::time::sleep(Duration::from_millis(600)).await;
    drop(transport);

    // Session 2: the agent asks from the old checkpoint, so "lost" is listed again; this time
    // every listed document arrives.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (mut transport, (epoch, after)) = feature_session(&mut raw, &a).await;
    assert_eq!(
        (epoch, after),
        (0, 0),
        "a catch-up with a declined document recorded a checkpoint: the document would never be listed again"
    );
    serve_listing(&mut transport, feed, &["lost"], &[]).await;
    wait_until(LIMIT, "the declined document to arrive", || {
        a.list_docs().unwrap().contains(&"lost".to_string())
            && a.open_doc("lost").unwrap().to_json()["m"]["from"] == "raw"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    drop(transport);

    // Session 3: a complete catch-up was recorded: the agent asks only after its head.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_transport, checkpoint) = feature_session(&mut raw, &a).await;
    assert_eq!(
        checkpoint, feed,
        "a complete catch-up records its checkpoint"
    );
    a.shutdown().await.unwrap();
}

/// Issue 23, item 2 (§9.5): a `FeedMark` covers only changes sent as `Update`, so the agent
/// sends none before its `FeedPage` (changes made before the session are listed there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_feed_mark_before_the_feed_page() {
    let da = tempfile::tempdir().unwrap();
    let a = start(da.path(), "a").await;
    for i in 0..3 {
        a.open_doc(&format!("before/{i}"))
            .unwrap()
            .set_map_value("m", "k", i as i64)
            .await
            .unwrap();
    }
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    a.trust_add(keypair.public().to_peer_id(), "raw").unwrap();
    let mut raw = raw_peer_with(keypair, &a).await;
    let (mut transport, _) = feature_session(&mut raw, &a).await;
    // Wait past several mark intervals (250 ms) before asking for the agent's feed.
    let mut early = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(900);
    while let Ok(Some(Ok(frame))) = tokio::time::timeout_at(deadline, transport.next()).await {
        early.push(Message::decode(&frame).unwrap());
    }
    assert!(
        !early.iter().any(|m| matches!(m, Message::FeedMark { .. })),
        "a FeedMark before the FeedPage: {early:?}"
    );
    send(&mut transport, &Message::FeedRequest { epoch: 0, after: 0 }).await;
    let got = read_until(&mut transport, |m| {
        matches!(m, Message::FeedPage { last: true, .. })
    })
    .await;
    let head = match got.last() {
        Some(Message::FeedPage { head, docs, .. }) => {
            assert!(docs.iter().any(|d| d == "before/0"), "{got:?}");
            *head
        }
        other => panic!("no FeedPage: {other:?}"),
    };
    assert!(
        !got.iter().any(|m| matches!(m, Message::FeedMark { .. })),
        "a FeedMark before the FeedPage: {got:?}"
    );
    // After the page, a new change goes out as Update, then a mark covering it.
    a.open_doc("after")
        .unwrap()
        .set_map_value("m", "k", 1)
        .await
        .unwrap();
    let got = read_until(&mut transport, |m| matches!(m, Message::FeedMark { .. })).await;
    let update_at = got
        .iter()
        .position(|m| matches!(m, Message::Update { doc, .. } if doc == "after"))
        .unwrap_or_else(|| panic!("no Update for the new change: {got:?}"));
    match got.last() {
        Some(Message::FeedMark { head: mark, .. }) => {
            assert!(*mark > head, "the mark covers the new change: {got:?}");
            assert!(update_at < got.len() - 1);
        }
        other => panic!("no FeedMark: {other:?}"),
    }
    a.shutdown().await.unwrap();
}

/// A map value nested `depth` deep (`[[[...1...]]]`), as raw Yjs v1 bytes: built by hand, since
/// yrs itself recurses to encode it.
fn deeply_nested_update(depth: usize) -> Vec<u8> {
    use yrs::{Map, Transact};
    let doc = yrs::Doc::with_client_id(77);
    let map = doc.get_or_insert_map("m");
    let shallow = {
        let mut txn = doc.transact_mut();
        map.insert(&mut txn, "k", 1);
        txn.encode_update_v1()
    };
    // ... Any content: 1 value, tag 125 (integer), 1, then an empty delete set.
    assert!(shallow.ends_with(&[1, 125, 1, 0]), "{shallow:?}");
    let mut bytes = shallow[..shallow.len() - 3].to_vec();
    for _ in 0..depth {
        bytes.extend_from_slice(&[117, 1]); // an array of one element
    }
    bytes.extend_from_slice(&[125, 1, 0]);
    bytes
}

/// Issue 22, finding 1: one 51 KB update nested 25,000 deep crashed the agent (stack overflow)
/// through IPC `doc_apply` and a linked peer's `Update`. Now it is refused on both paths and the
/// agent keeps serving; a nesting within the limit is still accepted and readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_updates_are_refused_without_a_crash() {
    let deep = deeply_nested_update(25_000);
    assert!(deep.len() < 52 * 1024);

    // IPC, against the real binary (a crash would end the process).
    let dir = tempfile::tempdir().unwrap();
    let mut agent = common::process::AgentProcess::start(dir.path(), &[]);
    let client = agent.client().await;
    match client.doc_apply("deep", &deep).await {
        Err(devicelink::client::ClientError::Agent { code, message }) => {
            assert_eq!(
                code,
                devicelink::ipc::ErrorCode::InvalidArgument,
                "{message}"
            );
            assert!(message.contains("nests deeper than 128"), "{message}");
        }
        other => panic!("a 25,000-deep update through IPC: {other:?}"),
    }
    client
        .doc_apply("fine", &deeply_nested_update(100))
        .await
        .unwrap();
    let got = client.doc_get("fine").await.unwrap();
    assert!(got["m"]["k"].is_array(), "{got}");
    assert!(client.status().await.is_ok(), "the agent stopped answering");
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the agent exited"
    );

    // A linked peer's Update.
    let da = tempfile::tempdir().unwrap();
    let a = start(da.path(), "a").await;
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    a.trust_add(keypair.public().to_peer_id(), "raw").unwrap();
    let mut raw = raw_peer_with(keypair, &a).await;
    let mut transport = open(&mut raw, &a).await.unwrap();
    send(&mut transport, &hello(PROTOCOL_VERSION)).await;
    send(
        &mut transport,
        &Message::Update {
            doc: "deep".into(),
            update: deep,
        },
    )
    .await;
    let got = read_until(&mut transport, |m| matches!(m, Message::DocError { .. })).await;
    match got.last() {
        Some(Message::DocError { doc, message, .. }) => {
            assert_eq!(doc, "deep");
            assert!(message.contains("nests deeper"), "{message}");
        }
        other => panic!("no DocError for the deep update: {other:?} in {got:?}"),
    }
    assert!(!a.list_docs().unwrap().contains(&"deep".to_string()));
    let ok = a.open_doc("after").unwrap();
    ok.set_map_value("m", "k", 1).await.unwrap();
    a.shutdown().await.unwrap();
}

/// Issue 23, item 3 (§2): a stock js-libp2p peer (TCP + Noise + Yamux with its default settings,
/// whose muxer writes data frames as large as the window it was granted) sends an 8 MB update on
/// the sync stream. The agent's muxer refuses data frames over 1 MiB, so it must never grant a
/// stream window over 1 MiB: the connection stays up and the document arrives whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stock_js_libp2p_peer_sends_large_updates() {
    if let Some(reason) = common::node::unavailable() {
        eprintln!("skipping: {reason}");
        return;
    }
    let da = tempfile::tempdir().unwrap();
    let a = start(da.path(), "a").await;
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    a.trust_add(keypair.public().to_peer_id(), "js-libp2p")
        .unwrap();

    // Incompressible text, so every byte crosses the wire.
    let mut rng = Rng::seeded("a_stock_js_libp2p_peer_sends_large_updates");
    let text: String = (0..8_000_000)
        .map(|_| char::from(b'a' + rng.below(26) as u8))
        .collect();
    let update = {
        use yrs::{Text, Transact};
        let doc = yrs::Doc::with_client_id(4242);
        let body = doc.get_or_insert_text("body");
        let mut txn = doc.transact_mut();
        body.insert(&mut txn, 0, &text);
        txn.encode_update_v1()
    };
    let mut payload = Vec::new();
    for message in [
        hello(PROTOCOL_VERSION),
        Message::Update {
            doc: "large".into(),
            update,
        },
    ] {
        let body = message.encode().unwrap();
        payload.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
        payload.extend_from_slice(&body);
    }
    let work = tempfile::tempdir().unwrap();
    let send_path = work.path().join("send.bin");
    std::fs::write(&send_path, &payload).unwrap();
    let config_path = work.path().join("config.json");
    let addr = format!("{}/p2p/{}", a.listen_addrs()[0], a.device_id());
    let config = serde_json::json!({
        "addr": addr,
        "key": keypair
            .to_protobuf_encoding()
            .unwrap()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>(),
        "protocol": devicelink::sync::SYNC_PROTOCOL.to_string(),
        "send": send_path,
        "hold_ms": 2000,
        "limit_ms": 60000,
    });
    std::fs::write(&config_path, config.to_string()).unwrap();

    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("node")
            .arg(common::node::node_dir().join("libp2p_peer.mjs"))
            .arg(&config_path)
            .output()
    })
    .await
    .unwrap()
    .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: serde_json::Value = stdout
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str(line).ok())
        .unwrap_or_else(|| {
            panic!(
                "no report from the js-libp2p peer: {stdout} {}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
    assert_eq!(report["error"], serde_json::Value::Null, "{report}");
    assert_eq!(report["sent"], payload.len(), "{report}");
    assert_eq!(report["connection_closed"], false, "{report}");
    assert!(
        report["received"].as_u64().unwrap_or(0) > 0,
        "the agent answered the Hello: {report}"
    );
    wait_until(LIMIT, "the large document on the agent", || {
        a.open_doc("large")
            .map(|doc| doc.text("body").len() == text.len())
            .unwrap_or(false)
    })
    .await;
    assert_eq!(a.open_doc("large").unwrap().text("body"), text);
    a.shutdown().await.unwrap();
}

/// Issue 23, spec gaps (§9.5): a listing that repeats a name and lists an invalid one. The
/// repeated name is asked for once, the invalid one not at all, and neither keeps the catch-up
/// from completing: the next session asks from the recorded checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_and_invalid_names_in_a_listing_lose_nothing() {
    let da = tempfile::tempdir().unwrap();
    let a = start(da.path(), "a").await;
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    a.trust_add(keypair.public().to_peer_id(), "raw").unwrap();
    let mut raw = raw_peer_with(keypair, &a).await;
    let feed = (11_u64, 3_u64);
    let (mut transport, _) = feature_session(&mut raw, &a).await;
    let page = |docs: Vec<&str>, last: bool| Message::FeedPage {
        epoch: feed.0,
        head: feed.1,
        docs: docs.into_iter().map(String::from).collect(),
        last,
    };
    send(&mut transport, &page(vec!["twice", "", "twice"], false)).await;
    send(&mut transport, &page(vec!["twice", "bad\u{7}name"], true)).await;
    // Answer what the agent asks for; count its questions.
    let mut asked = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(Some(Ok(frame))) = tokio::time::timeout_at(deadline, transport.next()).await {
        if let Message::SyncStep1 { doc, .. } = Message::decode(&frame).unwrap() {
            asked.push(doc.clone());
            let update = update_setting("from", "raw");
            send(&mut transport, &Message::SyncStep2 { doc, update }).await;
        }
    }
    assert_eq!(
        asked,
        vec!["twice".to_string()],
        "asked once, invalid names never"
    );
    assert_eq!(a.open_doc("twice").unwrap().to_json()["m"]["from"], "raw");
    drop(transport);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_transport, checkpoint) = feature_session(&mut raw, &a).await;
    assert_eq!(
        checkpoint, feed,
        "the catch-up completed and recorded its checkpoint"
    );
    a.shutdown().await.unwrap();
}

/// Issue 22, finding 5: a trusted peer that sends `FeedRequest(0, 0)` over and over without
/// reading made the agent queue one full listing per request (2,000 against 10,000 documents:
/// RSS 83 -> 1,454 MB). The protocol has one `FeedRequest` per session: the second ends the
/// session with `ProtocolViolation`, after one answer only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_feed_requests_get_one_answer_then_a_refusal() {
    let (a, b, _da, _db) = linked_pair().await;
    // Two pages' worth of documents.
    let mut durable = Vec::new();
    for i in 0..600 {
        let doc = a.open_doc(&format!("d{i}")).unwrap();
        durable.push(doc.set_map_value_deferred("m", "k", i as i64).unwrap());
    }
    for d in durable {
        d.wait().await.unwrap();
    }
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    a.trust_add(keypair.public().to_peer_id(), "asks again")
        .unwrap();
    let mut raw = raw_peer_with(keypair, &a).await;
    let (mut transport, _) = feature_session(&mut raw, &a).await;
    // 2,000 requests written without reading a single answer.
    let request = Message::FeedRequest { epoch: 0, after: 0 }
        .encode()
        .unwrap();
    for _ in 0..2_000 {
        if transport.feed(request.clone()).await.is_err() {
            break; // the agent already refused and closed the stream
        }
    }
    let _ = SinkExt::<Bytes>::flush(&mut transport).await;
    let got = read_all(&mut transport).await;
    let (code, message) = refusal(&got).expect("a Refuse frame");
    assert_eq!(code, RefuseCode::ProtocolViolation, "{message}");
    assert!(message.contains("second FeedRequest"), "{message}");
    let last_pages = got
        .iter()
        .filter(|m| matches!(m, Message::FeedPage { last: true, .. }))
        .count();
    assert_eq!(last_pages, 1, "one answer, not one per request");
    assert_still_serving(&a, &b).await;
}

/// Issue 22, finding 16: identify told a stranger (any peer that reached the agent, e.g. over a
/// relay circuit) the device's LAN addresses and the agent's version. It now tells only
/// addresses confirmed as external and no version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identify_tells_a_stranger_no_addresses_and_no_version() {
    use libp2p::swarm::SwarmEvent;
    let dir = tempfile::tempdir().unwrap();
    let agent = start(dir.path(), "laptop").await;
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    let mut swarm = devicelink::net::build_swarm(keypair).unwrap();
    swarm.dial(agent.listen_addrs()[0].clone()).unwrap();
    let info = tokio::time::timeout(LIMIT, async {
        loop {
            if let SwarmEvent::Behaviour(devicelink::net::BehaviourEvent::Identify(
                libp2p::identify::Event::Received { peer_id, info, .. },
            )) = swarm.select_next_some().await
            {
                if peer_id == agent.device_id() {
                    return info;
                }
            }
        }
    })
    .await
    .expect("the agent answers identify");
    assert!(
        info.listen_addrs.is_empty(),
        "addresses told to a stranger: {:?}",
        info.listen_addrs
    );
    assert_eq!(info.agent_version, "devicelink");
    agent.shutdown().await.unwrap();
}

/// Issue 22, finding 6: transfers in parts held memory without bound (4 transfers announcing
/// 4 GiB, 768 MiB sent into each, then one byte every 30 s: 3.1 GB kept as long as the peer
/// went on). Now a session holds at most 512 MiB of them (a transfer beyond it is counted, not
/// kept, and answered with `DocError` once whole), and a transfer that receives under 256 KiB in
/// 30 s is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_in_parts_are_bounded_and_crawling_ones_end() {
    let (a, b, _da, _db) = linked_pair().await;
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    let crawler = keypair.public().to_peer_id();
    a.trust_add(crawler, "crawler").unwrap();
    let mut raw = raw_peer_with(keypair, &a).await;
    let (mut transport, _) = feature_session(&mut raw, &a).await;
    const TOTAL: u64 = 200 << 20;
    let piece = vec![0u8; 1 << 20];
    let part = |doc: &str, data: &[u8]| Message::Part {
        doc: doc.into(),
        kind: 4,
        total: TOTAL,
        data: data.to_vec(),
    };
    // Three transfers of 200 MiB: two sent but for their last byte, the third whole.
    for doc in ["held1", "held2", "third"] {
        let whole = doc == "third";
        let mut sent = 0u64;
        while sent < TOTAL - u64::from(!whole) {
            let len = (TOTAL - u64::from(!whole) - sent).min(piece.len() as u64) as usize;
            transport
                .feed(part(doc, &piece[..len]).encode().unwrap())
                .await
                .unwrap();
            sent += len as u64;
        }
        SinkExt::<Bytes>::flush(&mut transport).await.unwrap();
    }
    // The third went over the budget beside the other two: answered with DocError, not kept.
    let got = read_until(&mut transport, |m| matches!(m, Message::DocError { .. })).await;
    match got.last() {
        Some(Message::DocError { doc, message, .. }) => {
            assert_eq!(doc, "third");
            assert!(message.contains("budget"), "{message}");
        }
        other => panic!("no DocError for the third transfer: {other:?}"),
    }
    // The two held ones crawl: one byte every 5 s. They are dropped within about 40 s.
    let started = std::time::Instant::now();
    let dropped = |a: &AgentHandle| {
        let status = a.status().unwrap();
        let errors = status
            .peers
            .iter()
            .find(|p| p.device_id == crawler.to_string())
            .map(|p| p.doc_errors.clone())
            .unwrap_or_default();
        ["held1", "held2"]
            .iter()
            .all(|doc| errors.get(*doc).is_some_and(|e| e.contains("stalled")))
    };
    while !dropped(&a) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "crawling transfers were not dropped"
        );
        for doc in ["held1", "held2"] {
            let _ = transport.send(part(doc, &[0]).encode().unwrap()).await;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    println!("crawling transfers dropped after {:?}", started.elapsed());
    assert!(!a
        .list_docs()
        .unwrap()
        .iter()
        .any(|d| d.starts_with("held") || d == "third"));
    assert_still_serving(&a, &b).await;
}
