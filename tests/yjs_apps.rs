//! Yjs apps, unchanged: the y-websocket endpoint with real `y-websocket` npm clients (2.x and
//! 3.x, through tests/node/driver.mjs) and a real headless Chromium, against two linked agent
//! processes; refusals before the upgrade; scoped, read-only and revoked tokens; presence across
//! devices (y-websocket and IPC); the JavaScript-friendly IPC additions.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use common::node::{self, Driver};
use common::process::{stderr, stdout, AgentProcess};
use common::*;
use devicelink::client::Client;
use devicelink::ipc::{self, Event};
use devicelink::AgentHandle;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// `devicelink app add NAME ARGS...` on a running agent; returns the token.
fn add_app(agent: &AgentProcess, name: &str, args: &[&str]) -> String {
    let mut all = vec!["app", "add", name];
    all.extend_from_slice(args);
    let out = agent.cli(&all);
    assert!(out.status.success(), "{}", stderr(&out));
    let token = stdout(&out)
        .lines()
        .find(|l| l.starts_with("dlapp_"))
        .expect("the token is printed")
        .to_string();
    token
}

fn skip_without_node() -> bool {
    if let Some(reason) = node::unavailable() {
        eprintln!("SKIP: {reason}");
        return true;
    }
    false
}

/// An edit through the endpoint on A reaches a provider on B and back, with both client
/// versions; presence set on A shows on B and leaves with the client; after agent A restarts,
/// the provider reconnects and an edit made while A was down is not lost.
#[test]
fn yjs_providers_sync_and_share_presence_across_two_agents() {
    if skip_without_node() {
        return;
    }
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = AgentProcess::linked_pair(da.path(), db.path());
    let (token_a, token_b) = (add_app(&a, "editor", &[]), add_app(&b, "editor", &[]));
    let mut driver = Driver::start();
    let doc = "notes/shared";
    for (client, url, token, version, user) in [
        ("a1", &a.ws, &token_a, 2, "alice"),
        ("b1", &b.ws, &token_b, 3, "bob"),
    ] {
        driver.ok(
            json!({"cmd": "connect", "client": client, "url": url, "doc": doc,
            "token": token, "version": version, "user": user}),
        );
    }

    // Content both ways, map and text.
    driver
        .ok(json!({"cmd": "set", "client": "a1", "map": "m", "key": "k", "value": {"from": "a"}}));
    driver
        .ok(json!({"cmd": "wait", "client": "b1", "map": "m", "key": "k", "value": {"from": "a"}}));
    driver
        .ok(json!({"cmd": "insert", "client": "b1", "text": "t", "index": 0, "value": "héllo 😀"}));
    driver.ok(json!({"cmd": "wait_text", "client": "a1", "text": "t", "value": "héllo 😀"}));
    // The agents hold it too (stored, readable over IPC).
    let json: Value = serde_json::from_str(&stdout(&b.cli(&["doc", "get", doc]))).unwrap();
    assert_eq!(json["m"]["k"], json!({"from": "a"}));

    // Presence across devices, and gone when the client leaves.
    driver.ok(json!({"cmd": "wait_presence", "client": "b1", "user": "alice", "present": true}));
    driver.ok(json!({"cmd": "wait_presence", "client": "a1", "user": "bob", "present": true}));
    driver.ok(json!({"cmd": "close", "client": "a1"}));
    driver.ok(json!({"cmd": "wait_presence", "client": "b1", "user": "alice", "present": false}));

    // Agent A restarts; the provider reconnects on its own and loses nothing.
    driver.ok(
        json!({"cmd": "connect", "client": "a2", "url": &a.ws, "doc": doc,
        "token": &token_a, "version": 2}),
    );
    let (addr_b, ws_a) = (b.addr.clone(), a.ws.clone());
    a.stop();
    driver.ok(json!({"cmd": "set", "client": "a2", "map": "m", "key": "offline", "value": "made while A was down"}));
    let same_port = ws_a.trim_start_matches("ws://").to_string();
    let _a = AgentProcess::start_with(da.path(), &[&addr_b], &["--no-mdns", "--ws", &same_port]);
    driver.ok(json!({"cmd": "wait_connected", "client": "a2", "timeout_ms": 30000}));
    driver.ok(
        json!({"cmd": "wait", "client": "b1", "map": "m", "key": "offline",
        "value": "made while A was down", "timeout_ms": 20000}),
    );
    driver
        .ok(json!({"cmd": "wait", "client": "a2", "map": "m", "key": "k", "value": {"from": "a"}}));
}

/// A wrong token, a missing token and a foreign Origin get 401/401/403 before the upgrade; a
/// token scoped to `notes/` cannot open `mail/1`; an allowed Origin can connect; removing the
/// app closes its open connections at once, with a code that stops 3.x clients reconnecting.
#[test]
fn the_endpoint_refuses_wrong_tokens_origins_and_documents_and_revokes_at_once() {
    if skip_without_node() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentProcess::start(dir.path(), &[]);
    let notes = add_app(
        &agent,
        "notes",
        &["--origin", "http://localhost:5173", "--docs", "notes/"],
    );
    let mut driver = Driver::start();
    let mut refused = |client: &str, doc: &str, token: &str, origin: Option<&str>| {
        let mut cmd = json!({"cmd": "connect", "client": client, "url": &agent.ws, "doc": doc,
            "token": token, "timeout_ms": 5000});
        if let Some(origin) = origin {
            cmd["origin"] = json!(origin);
        }
        let reply = driver.call(cmd);
        assert_eq!(reply["ok"], false, "{reply}");
        reply["status"].as_u64()
    };
    assert_eq!(refused("w", "notes/1", "dlapp_wrong", None), Some(401));
    assert_eq!(refused("m", "notes/1", "", None), Some(401));
    assert_eq!(
        refused("o", "notes/1", &notes, Some("http://evil.example")),
        Some(403)
    );
    assert_eq!(refused("s", "mail/1", &notes, None), Some(403));

    for (client, version) in [("ok2", 2), ("ok3", 3)] {
        driver.ok(
            json!({"cmd": "connect", "client": client, "url": &agent.ws, "doc": "notes/1",
            "token": &notes, "origin": "http://localhost:5173", "version": version}),
        );
    }
    let out = agent.cli(&["app", "remove", "notes"]);
    assert!(out.status.success(), "{}", stderr(&out));
    for client in ["ok2", "ok3"] {
        let closed = driver.wait_event(LIMIT, |e| e["event"] == "closed" && e["client"] == client);
        assert_eq!(closed["code"], 4403, "{closed}");
    }
    // The 2.x client retries and is refused from now on.
    let refusal = driver.wait_event(LIMIT, |e| e["event"] == "refused" && e["client"] == "ok2");
    assert_eq!(refusal["status"], 401, "{refusal}");
    let list = stdout(&agent.cli(&["app", "list"]));
    assert_eq!(serde_json::from_str::<Value>(&list).unwrap(), json!([]));
}

/// A read-only token follows a document but its edits are not stored.
#[test]
fn a_read_only_token_follows_but_does_not_write() {
    if skip_without_node() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentProcess::start(dir.path(), &[]);
    let writer = add_app(&agent, "writer", &[]);
    let viewer = add_app(&agent, "viewer", &["--read-only"]);
    let mut driver = Driver::start();
    driver.ok(
        json!({"cmd": "connect", "client": "w", "url": &agent.ws, "doc": "d", "token": writer}),
    );
    driver.ok(
        json!({"cmd": "connect", "client": "v", "url": &agent.ws, "doc": "d", "token": viewer}),
    );
    driver.ok(json!({"cmd": "set", "client": "w", "map": "m", "key": "by", "value": "writer"}));
    driver.ok(json!({"cmd": "wait", "client": "v", "map": "m", "key": "by", "value": "writer"}));
    driver.ok(json!({"cmd": "set", "client": "v", "map": "m", "key": "sneaky", "value": true}));
    driver.ok(json!({"cmd": "set", "client": "w", "map": "m", "key": "after", "value": 1}));
    driver.ok(json!({"cmd": "wait", "client": "v", "map": "m", "key": "after", "value": 1}));
    let stored: Value = serde_json::from_str(&stdout(&agent.cli(&["doc", "get", "d"]))).unwrap();
    assert_eq!(stored["m"], json!({"by": "writer", "after": 1}));
    let seen = driver.ok(json!({"cmd": "get", "client": "w"}));
    assert_eq!(seen["json"]["m"].get("sneaky"), None, "{seen}");
}

/// Two pages in a real Chromium, each on its own agent: typing in one shows in the other and
/// each sees the other's presence.
#[test]
fn two_browser_pages_on_two_agents_edit_together() {
    if skip_without_node() {
        return;
    }
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = AgentProcess::linked_pair(da.path(), db.path());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let origin = format!("http://127.0.0.1:{port}");
    let token_a = add_app(&a, "web", &["--origin", &origin]);
    let token_b = add_app(&b, "web", &["--origin", &origin]);
    let out = Command::new("node")
        .arg(node::node_dir().join("browser.mjs"))
        .env("DL_WEB_PORT", port.to_string())
        .env("DL_WS_A", &a.ws)
        .env("DL_TOKEN_A", token_a)
        .env("DL_WS_B", &b.ws)
        .env("DL_TOKEN_B", token_b)
        .env("DL_DOC", "notes/web")
        .output()
        .expect("run browser.mjs");
    let (text, errors) = (stdout(&out), stderr(&out));
    if out.status.code() == Some(77) {
        eprintln!("SKIP: the browser cannot start here: {text}{errors}");
        return;
    }
    assert!(
        out.status.success() && text.contains("BROWSER OK"),
        "browser test failed:\n{text}\n{errors}"
    );
    let json: Value = serde_json::from_str(&stdout(&b.cli(&["doc", "get", "notes/web"]))).unwrap();
    assert!(json.to_string().contains("hello from A"), "{json}");
}

async fn serve_ipc(agent: &AgentHandle, dir: &Path) -> ipc::server::IpcServer {
    ipc::server::serve(agent.clone(), dir.join("ipc").join("agent.sock"))
        .await
        .expect("ipc server starts")
}

/// What JavaScript apps need from IPC: UTF-16 text offsets, a subscription that starts with
/// the diff the app lacks, and events that say which changes were the app's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipc_speaks_javascript() {
    let dir = tempfile::tempdir().unwrap();
    let agent = start(dir.path(), "a").await;
    let server = serve_ipc(&agent, dir.path()).await;
    let client = Client::connect(server.path()).await.unwrap();
    let other = Client::connect(server.path()).await.unwrap();

    // In "é😀x" JavaScript puts "x" at 3 (UTF-16 units); UTF-8 puts it at 7.
    client.doc_text_append("t", "body", "é😀x").await.unwrap();
    let answer = client
        .request(ipc::RequestBody::DocText {
            doc: "t".into(),
            name: "body".into(),
            index: Some(3),
            delete: 1,
            insert: "y!".into(),
            offsets: Some("utf16".into()),
        })
        .await
        .unwrap();
    assert_eq!(answer, json!({"len": 5, "offsets": "utf16"}));
    assert_eq!(client.doc_get("t").await.unwrap()["body"], "é😀y!");
    let bad = client
        .request(ipc::RequestBody::DocText {
            doc: "t".into(),
            name: "body".into(),
            index: Some(0),
            delete: 0,
            insert: "z".into(),
            offsets: Some("utf32".into()),
        })
        .await;
    assert!(bad.is_err());

    // Subscribe with the app's state vector: the answer carries exactly what it lacks.
    let app_doc = yrs::Doc::new();
    let sv = {
        use yrs::{ReadTxn, Transact};
        app_doc.transact().state_vector()
    };
    let answer = client
        .request(ipc::RequestBody::DocSubscribe {
            doc: "t".into(),
            state_vector: Some(B64.encode(yrs::updates::encoder::Encode::encode_v1(&sv))),
        })
        .await
        .unwrap();
    let missing = B64.decode(answer["update"].as_str().unwrap()).unwrap();
    {
        use yrs::updates::decoder::Decode;
        use yrs::{GetString, Transact};
        let mut txn = app_doc.transact_mut();
        txn.apply_update(yrs::Update::decode_v1(&missing).unwrap())
            .unwrap();
        drop(txn);
        let text = app_doc.get_or_insert_text("body");
        assert_eq!(text.get_string(&app_doc.transact()), "é😀y!");
    }

    // Own changes are marked as such; another connection's are not.
    let mut events = client.take_events().unwrap();
    client.doc_set("t", "m", "mine", json!(1)).await.unwrap();
    other.doc_set("t", "m", "theirs", json!(2)).await.unwrap();
    let mut own = Vec::new();
    while own.len() < 2 {
        match tokio::time::timeout(LIMIT, events.recv()).await {
            Ok(Some(Event::Update { own: mine, .. })) => own.push(mine),
            Ok(Some(_)) => {}
            other => panic!("no update event: {other:?}"),
        }
    }
    assert_eq!(own, vec![true, false]);
}

/// A connection scoped with an app token reaches only its documents, writes only if allowed,
/// and cannot manage devices or apps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_token_scopes_an_ipc_connection() {
    let dir = tempfile::tempdir().unwrap();
    let agent = start(dir.path(), "a").await;
    let server = serve_ipc(&agent, dir.path()).await;
    let admin = Client::connect(server.path()).await.unwrap();
    admin
        .doc_set("mail/1", "m", "secret", json!(1))
        .await
        .unwrap();
    let (_, notes) = admin
        .app_add("notes", &[], &["notes/"], false)
        .await
        .unwrap();
    let (_, viewer) = admin
        .app_add("viewer", &[], &["notes/"], true)
        .await
        .unwrap();

    let app = Client::connect(server.path()).await.unwrap();
    app.app_auth(&notes).await.unwrap();
    app.doc_set("notes/1", "m", "k", json!(1)).await.unwrap();
    let forbidden = |r: Result<Value, devicelink::client::ClientError>| {
        let e = r.expect_err("refused").to_string();
        assert!(e.contains("may not") || e.contains("scoped"), "{e}");
    };
    forbidden(app.doc_get("mail/1").await);
    forbidden(app.status().await);
    forbidden(app.request(ipc::RequestBody::AppList).await);
    let listed = app.doc_list().await.unwrap();
    assert_eq!(listed, vec!["notes/1".to_string()]);
    assert!(app.app_auth("dlapp_wrong").await.is_err());

    let read_only = Client::connect(server.path()).await.unwrap();
    read_only.app_auth(&viewer).await.unwrap();
    assert_eq!(read_only.doc_get("notes/1").await.unwrap()["m"]["k"], 1);
    forbidden(
        read_only
            .doc_set("notes/1", "m", "k", json!(2))
            .await
            .map(|_| Value::Null),
    );

    // Revoking the app ends its connections.
    assert!(admin.app_remove("notes").await.unwrap());
    let gone = tokio::time::timeout(LIMIT, async {
        loop {
            if app.doc_get("notes/1").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(gone.is_ok(), "the revoked connection still works");
}

/// Presence set over IPC on A reaches a subscriber on B over libp2p, is kept while the setting
/// connection is open, and leaves when it closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_over_ipc_crosses_devices() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(da.path(), "a").await;
    let b = start(db.path(), "b").await;
    let (server_a, server_b) = (
        serve_ipc(&a, da.path()).await,
        serve_ipc(&b, db.path()).await,
    );
    link(&a, &b);
    wait_until(LIMIT, "session", || a.is_syncing_with(&b.device_id())).await;

    let watcher = Client::connect(server_b.path()).await.unwrap();
    let mut events = watcher.take_events().unwrap();
    watcher.awareness_subscribe("notes/1").await.unwrap();
    let setter = Client::connect(server_a.path()).await.unwrap();
    let client_id = setter
        .awareness_set("notes/1", json!({"user": {"name": "alice"}, "cursor": 3}))
        .await
        .unwrap();

    let (states, origin) = next_awareness(&mut events).await;
    assert_eq!(origin, a.device_id().to_string());
    assert_eq!(states[0]["client"], client_id);
    assert_eq!(states[0]["state"]["user"]["name"], "alice");
    let present = watcher.awareness_get("notes/1").await.unwrap();
    assert_eq!(present.as_array().map(Vec::len), Some(1), "{present}");

    drop(setter);
    let (states, _) = next_awareness(&mut events).await;
    assert_eq!(states[0]["client"], client_id);
    assert_eq!(states[0]["state"], Value::Null);
    wait_until_async(LIMIT, "presence gone on B", || async {
        watcher.awareness_get("notes/1").await.unwrap() == json!([])
    })
    .await;
}

async fn next_awareness(
    events: &mut tokio::sync::mpsc::UnboundedReceiver<Event>,
) -> (Value, String) {
    loop {
        match tokio::time::timeout(LIMIT, events.recv()).await {
            Ok(Some(Event::Awareness { states, origin, .. })) => return (states, origin),
            Ok(Some(_)) => {}
            other => panic!("no awareness event: {other:?}"),
        }
    }
}

/// The endpoint answers a bad upgrade with an HTTP status and a reason, and never upgrades it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_carry_a_status_and_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let agent = start(dir.path(), "a").await;
    let endpoint = devicelink::bridge::serve(agent.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let (_, token) = agent
        .apps()
        .add("notes", &[], &["notes/".to_string()], false)
        .unwrap();
    let url = |path: &str| format!("ws://{}{path}", endpoint.addr());
    let status_of = |url: String| async move {
        match tokio_tungstenite::connect_async(url).await {
            Ok(_) => (200, String::new()),
            Err(tungstenite::Error::Http(response)) => (
                response.status().as_u16(),
                String::from_utf8_lossy(response.body().as_deref().unwrap_or_default())
                    .into_owned(),
            ),
            Err(e) => panic!("unexpected error: {e}"),
        }
    };
    let (status, reason) = status_of(url("/notes/1")).await;
    assert_eq!(
        (status, reason.contains("missing token")),
        (401, true),
        "{reason}"
    );
    let (status, _) = status_of(url("/notes/1?token=dlapp_nope")).await;
    assert_eq!(status, 401);
    let (status, reason) = status_of(url(&format!("/mail/1?token={token}"))).await;
    assert_eq!(status, 403, "{reason}");
    let (status, _) = status_of(url(&format!("/_devicelink/devices?token={token}"))).await;
    assert_eq!(status, 403);
    let (status, _) = status_of(url(&format!("/?token={token}"))).await;
    assert_eq!(status, 400);
    let (status, _) = status_of(url(&format!("/notes/caf%C3%A9?token={token}"))).await;
    assert_eq!(status, 200);
    assert!(agent.status().unwrap().ws_endpoint.is_some());
}
