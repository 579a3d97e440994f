//! Issue 22, the public edge: what an app with a token (even a read-only one) or a raw
//! WebSocket client can make the agent do. Each test reproduces a finding of the black-box
//! review against a real agent process (`devicelink agent`, as a user starts it) and its
//! y-websocket endpoint.

mod common;

use std::time::{Duration, Instant};

use common::process::{stderr, stdout, AgentProcess};
use common::*;
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message as Frame;

/// `devicelink app add NAME ARGS...` on a running agent; returns the token.
fn add_app(agent: &AgentProcess, name: &str, args: &[&str]) -> String {
    let mut all = vec!["app", "add", name];
    all.extend_from_slice(args);
    let out = agent.cli(&all);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
        .lines()
        .find(|l| l.starts_with("dlapp_"))
        .expect("the token is printed")
        .to_string()
}

/// A process's peak and current resident memory, in MB (Linux).
fn memory_mb(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb / 1024)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(agent: &AgentProcess, doc: &str, token: &str) -> Ws {
    let url = format!("{}/{doc}?token={token}", agent.ws);
    tokio_tungstenite::connect_async(url)
        .await
        .expect("the endpoint admits the app")
        .0
}

/// A lib0 variable-length unsigned integer.
fn var(mut n: u64, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// A y-protocols sync message (`step`: 0 SyncStep1, 1 SyncStep2, 2 Update) with `payload`.
fn sync_message(step: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    var(step, &mut out);
    var(payload.len() as u64, &mut out);
    out.extend_from_slice(payload);
    out
}

/// Reads frames for `window`; returns the bytes of binary frames and whether the server
/// closed the connection (with its reason).
async fn read_for(ws: &mut Ws, window: Duration) -> (usize, Option<String>) {
    let deadline = tokio::time::Instant::now() + window;
    let mut bytes = 0;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return (bytes, None),
            Ok(Some(Ok(Frame::Binary(data)))) => bytes += data.len(),
            Ok(Some(Ok(Frame::Close(frame)))) => {
                return (
                    bytes,
                    Some(frame.map(|f| f.reason.to_string()).unwrap_or_default()),
                )
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => return (bytes, Some(e.to_string())),
            Ok(None) => return (bytes, Some("closed".into())),
        }
    }
}

/// A plain app still syncs through the endpoint: its write reaches the agent's document.
async fn assert_endpoint_serves(agent: &AgentProcess, token: &str, key: &str) {
    let doc = yrs::Doc::new();
    let map = {
        use yrs::Transact;
        let map = doc.get_or_insert_map("m");
        let mut txn = doc.transact_mut();
        yrs::Map::insert(&map, &mut txn, key, true);
        txn.encode_update_v1()
    };
    let mut ws = connect(agent, "probe", token).await;
    ws.send(Frame::Binary(sync_message(2, &map).into()))
        .await
        .unwrap();
    let started = Instant::now();
    loop {
        let out = agent.cli(&["doc", "get", "probe"]);
        if stdout(&out).contains(key) {
            break;
        }
        assert!(started.elapsed() < LIMIT, "the endpoint stopped serving");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Finding 14: one 8 KB frame of 2,000 `SyncStep1`s from a read-only token made the agent send
/// a 5 MB document 2,000 times (10,000 MiB in 20 s). Repeated `SyncStep1`s are now answered at
/// most once a second, the newest one: three such frames get a handful of answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_sync_step1_cannot_multiply_what_the_agent_sends() {
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentProcess::start(dir.path(), &[]);
    let client = agent.client().await;
    let chunk = "x".repeat(1 << 20);
    for _ in 0..5 {
        client.doc_text_append("big", "body", &chunk).await.unwrap();
    }
    let big_len = 5 * chunk.len();
    let viewer = add_app(&agent, "viewer", &["--read-only"]);
    let mut ws = connect(&agent, "big", &viewer).await;
    let step1 = sync_message(0, &[0]); // an empty state vector: "send me everything"
    let frame: Vec<u8> = step1
        .iter()
        .copied()
        .cycle()
        .take(step1.len() * 2_000)
        .collect();
    let mut received = 0;
    for _ in 0..3 {
        ws.send(Frame::Binary(frame.clone().into())).await.unwrap();
        let (bytes, closed) = read_for(&mut ws, Duration::from_secs(1)).await;
        assert_eq!(closed, None);
        received += bytes;
    }
    let (bytes, _) = read_for(&mut ws, Duration::from_millis(1500)).await;
    received += bytes;
    let answers = received as f64 / big_len as f64;
    println!("6,000 SyncStep1s over 3 s: {received} bytes sent back, {answers:.1} documents");
    assert!(answers >= 1.0, "the first SyncStep1 is answered in full");
    assert!(answers <= 5.0, "{answers:.1} whole documents sent back");
    let writer = add_app(&agent, "writer", &[]);
    assert_endpoint_serves(&agent, &writer, "after_step1_flood").await;
}

/// Finding 15: a few bytes declaring a huge count (a state vector, an awareness update or an
/// update "of 250 million entries") made yrs reserve memory for them: 530 MB of RSS each. Such
/// frames are refused before yrs decodes them; the connection closes with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_messages_declaring_huge_counts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentProcess::start(dir.path(), &[]);
    let token = add_app(&agent, "app", &[]);
    let viewer = add_app(&agent, "viewer", &["--read-only"]);
    let pid = agent.child.id();
    let lie = [0xff, 0xff, 0xff, 0x7a, 0x00];
    let mut awareness = vec![1];
    var(lie.len() as u64, &mut awareness);
    awareness.extend_from_slice(&lie);
    let frames = [
        ("a state vector", sync_message(0, &lie)),
        ("an update", sync_message(2, &lie)),
        ("an awareness update", awareness),
    ];
    let (before, _) = memory_mb(pid);
    for (what, frame) in frames {
        for token in [&token, &viewer] {
            let mut ws = connect(&agent, "notes", token).await;
            ws.send(Frame::Binary(frame.clone().into())).await.unwrap();
            let (_, closed) = read_for(&mut ws, LIMIT).await;
            let reason = closed.unwrap_or_else(|| panic!("{what}: the connection stays open"));
            assert!(reason.contains("refused"), "{what}: {reason}");
        }
    }
    let (after, _) = memory_mb(pid);
    println!("agent peak RSS {before} MB before, {after} MB after six lying frames");
    assert!(after < before + 100, "peak RSS {before} -> {after} MB");
    assert_endpoint_serves(&agent, &token, "after_lies").await;
}

/// A y-protocols awareness message for one client: its `state` (JSON text, `null` to leave).
fn awareness_message(client: u64, clock: u64, state: &str) -> Vec<u8> {
    let mut update = Vec::new();
    var(1, &mut update);
    var(client, &mut update);
    var(clock, &mut update);
    var(state.len() as u64, &mut update);
    update.extend_from_slice(state.as_bytes());
    let mut out = vec![1];
    var(update.len() as u64, &mut out);
    out.extend_from_slice(&update);
    out
}

/// Polls the agent's awareness states of "notes" (as JSON text) until `done` holds; panics
/// naming `what` after [`LIMIT`].
async fn awareness_until(
    client: &devicelink::client::Client,
    what: &str,
    done: impl Fn(&str) -> bool,
) {
    let started = Instant::now();
    loop {
        let states = client.awareness_get("notes").await.unwrap().to_string();
        if done(&states) {
            return;
        }
        assert!(started.elapsed() < LIMIT, "waited for {what}: {states}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Finding 7: a read-only token could set presence for another user's client id and, by
/// leaving, remove that user on every device. A connection now speaks for its own clients only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_cannot_take_over_or_remove_another_apps_presence() {
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentProcess::start(dir.path(), &[]);
    let writer = add_app(&agent, "writer", &[]);
    let viewer = add_app(&agent, "viewer", &["--read-only"]);
    let client = agent.client().await;
    let mut alice = connect(&agent, "notes", &writer).await;
    alice
        .send(Frame::Binary(
            awareness_message(42, 1, r#"{"user":"alice"}"#).into(),
        ))
        .await
        .unwrap();
    awareness_until(&client, "alice's presence", |s| s.contains("alice")).await;
    let mut mallory = connect(&agent, "notes", &viewer).await;
    for message in [
        awareness_message(42, 9, r#"{"user":"mallory"}"#),
        awareness_message(42, 10, "null"),
    ] {
        mallory.send(Frame::Binary(message.into())).await.unwrap();
    }
    // Mallory's own client is taken, so her messages were read; then she leaves.
    mallory
        .send(Frame::Binary(
            awareness_message(7, 1, r#"{"user":"mallory"}"#).into(),
        ))
        .await
        .unwrap();
    awareness_until(&client, "mallory's own presence", |s| s.contains("mallory")).await;
    drop(mallory);
    awareness_until(&client, "mallory's presence to leave with her", |s| {
        !s.contains("mallory")
    })
    .await;
    let now = client.awareness_get("notes").await.unwrap().to_string();
    assert!(
        now.contains("alice"),
        "alice was taken over or removed: {now}"
    );
    drop(alice);
}

/// Finding 8: 1,300 silent local sockets delayed an app's connect by 7 s, and 1,024 read-only
/// connections of one app locked every other app out. Upgrades now have a 3 s deadline and the
/// oldest pending one is evicted for a new one; one app holds at most 256 connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_and_one_greedy_app_cannot_lock_the_others_out() {
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentProcess::start(dir.path(), &[]);
    let notes = add_app(&agent, "notes", &[]);
    let greedy = add_app(&agent, "greedy", &["--read-only"]);
    let addr = agent.ws.trim_start_matches("ws://").to_string();
    let mut silent = Vec::new();
    for _ in 0..1_300 {
        silent.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    let started = Instant::now();
    let app = tokio::time::timeout(
        devicelink::bridge::UPGRADE_DEADLINE,
        connect(&agent, "notes", &notes),
    )
    .await
    .expect("an app connects while 1,300 silent sockets are open");
    println!(
        "connected in {:?} beside 1,300 silent sockets",
        started.elapsed()
    );
    drop(app);

    let mut held = Vec::new();
    let mut too_many = 0;
    for _ in 0..devicelink::bridge::MAX_PER_APP + 20 {
        let url = format!("{}/notes?token={greedy}", agent.ws);
        match tokio_tungstenite::connect_async(url).await {
            Ok((ws, _)) => held.push(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status().as_u16(), 429);
                too_many += 1;
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(held.len(), devicelink::bridge::MAX_PER_APP);
    assert_eq!(too_many, 20);
    assert_endpoint_serves(&agent, &notes, "beside_the_greedy_app").await;
    drop(silent);
}

/// Finding 9: six read-only connections streaming unfinished 240 MiB frames took 1.24 GB on
/// the agent (every token could send 256 MiB messages). A client whose token may only read
/// its document now sends messages of 256 KiB at most (its sync requests and presence): the
/// agent refuses a larger frame from its header and closes the connection, while an app that
/// may write still sends a 1 MiB update, and a viewer with a small message is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_clients_cannot_send_large_frames() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentProcess::start(dir.path(), &[]);
    let writer = add_app(&agent, "app", &[]);
    let viewer = add_app(&agent, "viewer", &["--read-only"]);
    let pid = agent.child.id();
    let (before, _) = memory_mb(pid);

    // An unfinished 240 MiB frame from a viewer: refused at its header.
    let mut streaming = Vec::new();
    for _ in 0..6 {
        let mut ws = connect(&agent, "notes", &viewer).await;
        let tokio_tungstenite::MaybeTlsStream::Plain(tcp) = ws.get_mut() else {
            panic!("a plain TCP connection");
        };
        // FIN + binary, masked, 64-bit length of 240 MiB, a mask key.
        let mut header = vec![0x82, 0x80 | 127];
        header.extend_from_slice(&(240u64 << 20).to_be_bytes());
        header.extend_from_slice(&[1, 2, 3, 4]);
        tcp.write_all(&header).await.unwrap();
        let chunk = vec![0u8; 64 << 10];
        let mut sent = 0usize;
        let refused = tokio::time::timeout(LIMIT, async {
            while sent < 64 << 20 {
                if tcp.write_all(&chunk).await.is_err() {
                    return true;
                }
                sent += chunk.len();
            }
            false
        })
        .await
        .unwrap_or(false);
        assert!(refused, "a viewer streamed {} MiB of one frame", sent >> 20);
        streaming.push(ws);
    }
    let (after, _) = memory_mb(pid);
    println!("agent peak RSS {before} MB before, {after} MB after six 240 MiB frame headers");
    assert!(after < before + 100, "peak RSS {before} -> {after} MB");

    // What a viewer sends in earnest still comes through: its presence.
    let mut ws = connect(&agent, "notes", &viewer).await;
    ws.send(Frame::Binary(
        awareness_message(7, 1, r#"{"user":"viewer"}"#).into(),
    ))
    .await
    .unwrap();
    let (_, closed) = read_for(&mut ws, Duration::from_millis(500)).await;
    assert_eq!(closed, None, "a viewer's presence closed its connection");

    // A 1 MiB update from an app that may write is taken and stored.
    let update = {
        use yrs::Transact;
        let doc = yrs::Doc::new();
        let text = doc.get_or_insert_text("t");
        let mut txn = doc.transact_mut();
        yrs::Text::insert(&text, &mut txn, 0, &"x".repeat(1 << 20));
        txn.encode_update_v1()
    };
    let mut ws = connect(&agent, "big", &writer).await;
    ws.send(Frame::Binary(sync_message(2, &update).into()))
        .await
        .unwrap();
    let started = Instant::now();
    loop {
        let out = agent.cli(&["doc", "get", "big"]);
        if stdout(&out).len() > 1 << 20 {
            break;
        }
        assert!(started.elapsed() < LIMIT, "the 1 MiB update did not arrive");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(streaming);
}
