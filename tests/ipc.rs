//! The local IPC socket end to end: real agents, real Unix sockets, real clients (Rust, Python,
//! raw bytes), and another local user.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use devicelink::client::Client;
use devicelink::ipc::{self, server::IpcServer, Event};
use devicelink::AgentHandle;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader as TokioBufReader};
use tokio::net::UnixStream;

async fn serve(agent: &AgentHandle, dir: &Path) -> IpcServer {
    ipc::server::serve(agent.clone(), dir.join("ipc").join("agent.sock"))
        .await
        .expect("ipc server starts")
}

/// Two linked agents, each serving IPC; the temp dirs live as long as the returned guard.
async fn linked_pair_with_ipc() -> (
    AgentHandle,
    AgentHandle,
    IpcServer,
    IpcServer,
    [tempfile::TempDir; 2],
) {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(da.path(), "a").await;
    let b = start(db.path(), "b").await;
    let (server_a, server_b) = (serve(&a, da.path()).await, serve(&b, db.path()).await);
    link(&a, &b);
    wait_until(LIMIT, "session", || a.is_syncing_with(&b.device_id())).await;
    (a, b, server_a, server_b, [da, db])
}

/// Acceptance 2: a subscriber on B receives each of 1,000 updates made on A, none missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_receives_every_one_of_1000_remote_updates() {
    let (a, b, server_a, server_b, _dirs) = linked_pair_with_ipc().await;

    let client_b = Client::connect(server_b.path()).await.unwrap();
    let mut events = client_b.take_events().unwrap();
    client_b.subscribe("feed").await.unwrap();
    let client_a = Arc::new(Client::connect(server_a.path()).await.unwrap());
    for chunk in 0..10 {
        let writes = (0..100).map(|i| {
            let client = client_a.clone();
            let n = chunk * 100 + i;
            async move {
                client
                    .doc_set("feed", "items", &format!("item{n}"), json!(n))
                    .await
            }
        });
        for r in futures::future::join_all(writes).await {
            r.unwrap();
        }
    }

    // Rebuild the document from the events alone: it must hold all 1,000 values.
    let replica = yrs::Doc::new();
    let items = replica.get_or_insert_map("items");
    let a_id = a.device_id().to_string();
    let started = Instant::now();
    let (mut received, mut have) = (0, 0);
    while have < 1000 {
        let left = LIMIT.saturating_sub(started.elapsed());
        let event = tokio::time::timeout(left, events.recv())
            .await
            .unwrap_or_else(|_| panic!("only {have} of 1000 updates arrived"))
            .expect("event stream open");
        match event {
            Event::Update {
                update,
                origin,
                doc,
                ..
            } => {
                assert_eq!((doc.as_str(), origin.as_str()), ("feed", a_id.as_str()));
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(update)
                    .unwrap();
                use yrs::updates::decoder::Decode;
                use yrs::{Map, Transact};
                let mut txn = replica.transact_mut();
                txn.apply_update(yrs::Update::decode_v1(&bytes).unwrap())
                    .unwrap();
                have = items.len(&txn);
                received += 1;
            }
            Event::Lagged { missed, .. } => panic!("subscriber lagged, missed {missed}"),
            other => panic!("unexpected event {other:?}"),
        }
    }
    println!("1000 updates arrived in {received} events (the wire merges queued updates)");
    let json = devicelink::docs::doc_to_json(&replica);
    for n in 0..1000 {
        assert_eq!(json["items"][format!("item{n}")], json!(n));
    }
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// Acceptance 3: the Python example (standard library only) against real agents: a watcher on B
/// sees a note added on A, and `show` on B prints it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_example_works_against_real_agents() {
    if Command::new("python3").arg("--version").output().is_err() {
        println!("SKIPPED: python3 is not installed");
        return;
    }
    let (a, b, server_a, server_b, _dirs) = linked_pair_with_ipc().await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/python/notes.py");
    let python = |socket: &Path, args: &[&str]| {
        let mut cmd = Command::new("python3");
        cmd.arg(&script).arg("--socket").arg(socket).args(args);
        cmd
    };

    let mut watcher = python(server_b.path(), &["watch", "--count", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watcher.stdout.take().unwrap()).lines();
    let first = tokio::task::spawn_blocking(move || {
        let line = lines.next();
        (line, lines)
    })
    .await
    .unwrap();
    let (subscribed, mut lines) = first;
    assert!(subscribed.unwrap().unwrap().contains("subscribed"));

    let out = python(server_a.path(), &["add", "buy milk"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let event = tokio::task::spawn_blocking(move || lines.next())
        .await
        .unwrap();
    let event: Value = serde_json::from_str(&event.expect("watcher printed").unwrap()).unwrap();
    assert_eq!(event["origin"], a.device_id().to_string());
    assert!(
        event["body"].as_str().unwrap().contains("buy milk"),
        "{event}"
    );
    let status = tokio::task::spawn_blocking(move || watcher.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());

    wait_until(LIMIT, "the meta write to reach b", || {
        b.open_doc("notes").unwrap().to_json()["meta"]["updated"].is_number()
    })
    .await;
    let out = python(server_b.path(), &["show"]).output().unwrap();
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["body"], "buy milk\n");
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// Acceptance 4: random bytes and malformed JSON never crash the agent; each bad line gets an
/// error response, the connection stays usable, and stored data is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_socket_gets_errors_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let agent = start(dir.path(), "a").await;
    let server = serve(&agent, dir.path()).await;
    let doc = agent.open_doc("precious").unwrap();
    doc.set_map_value("m", "k", "v").await.unwrap();
    let before = doc.encode_state();

    let mut lines: Vec<Vec<u8>> = [
        "{}",
        "{\"id\":1}",
        "{\"id\":2,\"op\":\"no_such_op\"}",
        "{\"id\":\"three\",\"op\":\"status\"}",
        "{\"id\":4,\"op\":\"doc_set\",\"doc\":\"\",\"map\":\"m\",\"key\":\"k\",\"value\":1}",
        "{\"id\":5,\"op\":\"doc_apply\",\"doc\":\"precious\",\"update\":\"!!!\"}",
        "{\"id\":6,\"op\":\"doc_apply\",\"doc\":\"precious\",\"update\":\"AAEC/w==\"}",
        "{\"id\":7,\"op\":\"doc_diff\",\"doc\":\"precious\",\"state_vector\":\"/////w==\"}",
        "{\"id\":8,\"op\":\"doc_get\",\"doc\":\"bad\\u0001name\"}",
        "{\"id\":9,\"op\":\"doc_unsubscribe\",\"subscription\":99}",
        "{\"id\":10,\"op\":\"trust_add\",\"device\":\"not-a-peer\"}",
        "{\"id\":11,\"op\":\"peer_dial\",\"addr\":\"nonsense\"}",
        "{\"id\":12,\"op\":\"doc_text\",\"doc\":\"precious\",\"name\":\"t\",\"index\":4294967295,\"delete\":4294967295,\"insert\":\"\"}",
        "[1,2,3]",
        "null",
        "{\"id\":13,\"op\":\"status\",\"extra\":true}",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let mut rng = Rng::seeded("ipc fuzz");
    for _ in 0..300 {
        let len = (rng.next() % 200) as usize + 1;
        let mut line: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        line.retain(|&b| b != b'\n');
        if line.iter().all(u8::is_ascii_whitespace) {
            line.push(b'x');
        }
        lines.push(line);
    }
    // Each line gets exactly one response: an error, except id 12 (an edit clamped to a no-op)
    // and id 13 (unknown fields are ignored, for forward compatibility).
    let stream = UnixStream::connect(server.path()).await.unwrap();
    let (read, mut write) = stream.into_split();
    let mut reader = TokioBufReader::new(read).lines();
    for line in &lines {
        write.write_all(line).await.unwrap();
        write.write_all(b"\n").await.unwrap();
    }
    // A line over the 16 MiB limit.
    write
        .write_all(&vec![b'x'; ipc::MAX_LINE_LEN + 10])
        .await
        .unwrap();
    write.write_all(b"\n").await.unwrap();
    write
        .write_all(b"{\"id\":100,\"op\":\"doc_get\",\"doc\":\"precious\"}\n")
        .await
        .unwrap();
    let mut errors = 0;
    let mut seen_valid = None;
    let started = Instant::now();
    while seen_valid.is_none() {
        let left = LIMIT.saturating_sub(started.elapsed());
        let line = tokio::time::timeout(left, reader.next_line())
            .await
            .expect("answers in time")
            .expect("connection alive")
            .expect("agent did not close");
        let response: Value = serde_json::from_str(&line).unwrap();
        if response["id"] == 100 {
            seen_valid = Some(response);
        } else if response["ok"] == false {
            errors += 1;
            assert!(response["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()));
        } else {
            assert!(
                response["id"] == 12 || response["id"] == 13,
                "unexpected success: {response}"
            );
        }
    }
    assert_eq!(
        errors,
        lines.len() + 1 - 2,
        "one error per bad line and the long line, not 12, 13"
    );
    assert_eq!(seen_valid.unwrap()["result"]["m"]["k"], "v");
    assert_same_as_state(&doc, &before, "stored data unchanged");

    // Abrupt disconnects mid-line and a fresh connection still served.
    for _ in 0..20 {
        let mut s = UnixStream::connect(server.path()).await.unwrap();
        let _ = s.write_all(b"{\"id\":1,\"op\":\"sta").await;
    }
    let client = Client::connect(server.path()).await.unwrap();
    assert_eq!(client.doc_get("precious").await.unwrap()["m"]["k"], "v");
    drop(server);
    agent.shutdown().await.unwrap();
    drop(agent);
    let agent = start(dir.path(), "a").await;
    assert_same_as_state(
        &agent.open_doc("precious").unwrap(),
        &before,
        "stored data after a restart",
    );
    agent.shutdown().await.unwrap();
}

/// Acceptance 5: the socket is private: folder 0700, socket 0600, and another local user cannot
/// connect (checked for real when the test runs as root and can switch to `nobody`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_local_users_cannot_connect() {
    let dir = tempfile::tempdir().unwrap();
    // A world-traversable parent, so only our own modes protect the socket.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let agent = start(&dir.path().join("data"), "a").await;
    let server = serve(&agent, dir.path()).await;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(server.path()), 0o600);
    assert_eq!(mode(server.path().parent().unwrap()), 0o700);

    let euid = Command::new("id").arg("-u").output().unwrap();
    if String::from_utf8_lossy(&euid.stdout).trim() != "0" {
        println!("SKIPPED cross-user connect: needs root to switch users; modes checked above");
        agent.shutdown().await.unwrap();
        return;
    }
    // Run our own binary as `nobody` from a world-readable copy.
    let bin_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(bin_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = bin_dir.path().join("devicelink");
    std::fs::copy(env!("CARGO_BIN_EXE_devicelink"), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_nobody = |socket: &Path| {
        use std::os::unix::process::CommandExt;
        // A child forked by another test thread while the copy was open for writing holds it
        // until it execs: exec then fails with "Text file busy" for a moment. Try again.
        let mut tries = 0;
        loop {
            let out = Command::new(&bin)
                .arg("--socket")
                .arg(socket)
                .arg("--data-dir")
                .arg(bin_dir.path())
                .arg("status")
                .uid(65534)
                .gid(65534)
                .output();
            match out {
                Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 50 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                out => break out.unwrap(),
            }
        }
    };
    let out = as_nobody(server.path());
    assert!(!out.status.success(), "nobody connected to the agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Permission denied"), "{err}");
    // Even with the folder opened up, the socket's own mode keeps others out.
    std::fs::set_permissions(
        server.path().parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let out = as_nobody(server.path());
    assert!(
        !out.status.success(),
        "nobody connected through a 0600 socket"
    );
    // Control: the owner can connect.
    assert!(Client::connect(server.path()).await.is_ok());
    let _ = std::io::stdout().flush();
    agent.shutdown().await.unwrap();
}
