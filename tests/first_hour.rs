//! The first hour of a user (issue 18): writes of the wrong type are refused and change nothing,
//! typos and missing things get errors that say what to do, the CLI parses what people type, and
//! its output survives a closed pipe.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::process::{cli, stderr, stdout, AgentProcess, BIN};
use common::*;
use devicelink::client::ClientError;
use devicelink::docs::DocError;
use devicelink::ipc::ErrorCode;
use serde_json::json;

fn get(agent: &AgentProcess, doc: &str) -> serde_json::Value {
    serde_json::from_str(&stdout(&agent.cli(&["doc", "get", doc]))).unwrap_or_default()
}

/// Point 2: a map write onto a text root, or a text edit onto a map root, is refused on every
/// path with `wrong_type`, naming the root and its type, and nothing changes (here or on the
/// linked device).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_of_the_wrong_type_are_refused_everywhere_and_change_nothing() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = AgentProcess::linked_pair(da.path(), db.path());
    assert!(a
        .cli(&["doc", "text", "notes", "body", "--append", "milk"])
        .status
        .success());
    assert!(a
        .cli(&["doc", "set", "notes", "meta", "title", "\"Groceries\""])
        .status
        .success());
    let want = json!({"body": "milk", "meta": {"title": "Groceries"}});
    let deadline = Instant::now() + LIMIT;
    while get(&b, "notes") != want {
        assert!(
            Instant::now() < deadline,
            "b never got {want}: {}",
            get(&b, "notes")
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // CLI.
    let out = a.cli(&["doc", "set", "notes", "body", "k", "1"]);
    assert!(!out.status.success(), "a map write onto a text succeeded");
    let err = stderr(&out);
    assert!(
        err.contains("\"body\" is a text, not a map") && err.contains("nothing was changed"),
        "{err}"
    );
    let out = a.cli(&["doc", "text", "notes", "meta", "--append", "x"]);
    assert!(!out.status.success(), "a text append onto a map succeeded");
    assert!(
        stderr(&out).contains("\"meta\" is a map, not a text"),
        "{}",
        stderr(&out)
    );

    // IPC, through the Rust client.
    let client = a.client().await;
    for (body, root) in [
        (
            json!({"op": "doc_set", "doc": "notes", "map": "body", "key": "k", "value": 1}),
            "body",
        ),
        (
            json!({"op": "doc_text", "doc": "notes", "name": "meta", "insert": "x"}),
            "meta",
        ),
    ] {
        let body: devicelink::ipc::RequestBody = serde_json::from_value(body).unwrap();
        match client.request(body).await {
            Err(ClientError::Agent { code, message }) => {
                assert_eq!(code, ErrorCode::WrongType, "{message}");
                assert!(message.contains(root), "{message}");
            }
            other => panic!("a wrong-type write through IPC: {other:?}"),
        }
    }
    assert!(matches!(
        client.doc_set("notes", "body", "k", json!(1)).await,
        Err(ClientError::Agent {
            code: ErrorCode::WrongType,
            ..
        })
    ));

    // Nothing changed, on either device, even after a restart.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(get(&a, "notes"), want);
    assert_eq!(get(&b, "notes"), want);
    drop(client);
    a.stop();
    let a = AgentProcess::start(da.path(), &[]);
    assert_eq!(get(&a, "notes"), want);

    // The library (DocHandle), on a root only received from another device (no declared type).
    let dc = tempfile::tempdir().unwrap();
    let agent = start(dc.path(), "c").await;
    let doc = agent.open_doc("received").unwrap();
    let remote = yrs::Doc::new();
    let update = {
        use yrs::{Text, Transact};
        let text = remote.get_or_insert_text("body");
        let mut txn = remote.transact_mut();
        text.insert(&mut txn, 0, "from elsewhere");
        txn.encode_update_v1()
    };
    doc.apply_update(&update).await.unwrap();
    let before = doc.state_vector();
    match doc.set_map_value("body", "k", 1).await {
        Err(DocError::WrongType { root, .. }) => assert_eq!(root, "body"),
        other => panic!("DocHandle map write onto a text: {other:?}"),
    }
    assert_eq!(
        doc.state_vector(),
        before,
        "the refused write changed the document"
    );
    assert_eq!(doc.to_json(), json!({"body": "from elsewhere"}));
    doc.append_text("body", "!").await.unwrap();
    assert_eq!(doc.text("body"), "from elsewhere!");
    agent.shutdown().await.unwrap();
}

/// Friction: `doc get` of a missing document, a missing data dir, an unknown app.
#[test]
fn typos_are_errors_that_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentProcess::start(dir.path(), &[]);
    let out = agent.cli(&["doc", "get", "nots"]);
    assert!(
        !out.status.success(),
        "doc get of a missing document succeeded"
    );
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));
    assert!(
        !stdout(&agent.cli(&["doc", "list"])).contains("nots"),
        "doc get created it"
    );

    let out = agent.cli(&["app", "remove", "nosuchapp"]);
    assert!(!out.status.success(), "removing an unknown app succeeded");
    assert!(stderr(&out).contains("no app named"), "{}", stderr(&out));

    let missing = dir.path().join("typo");
    for args in [
        &["status"][..],
        &["id"],
        &["doc", "get", "x"],
        &["trust", "list"],
    ] {
        let out = Command::new(BIN)
            .arg("--data-dir")
            .arg(&missing)
            .args(args)
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "{args:?} on a missing data dir succeeded"
        );
        assert!(
            stderr(&out).contains("does not exist"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    assert!(!missing.exists(), "a command created the mistyped data dir");
}

/// Friction: durations and addresses as people type them; help on every argument.
#[test]
fn the_cli_parses_what_people_type() {
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentProcess::start(dir.path(), &[]);
    let mut host = Command::new(BIN)
        .arg("--socket")
        .arg(&agent.socket)
        .args(["pair", "--expires", "5m"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(host.stdout.take().unwrap()).lines();
    let _code = lines.next().unwrap().unwrap();
    let second = lines.next().unwrap().unwrap();
    assert!(second.contains("valid 5 min"), "{second}");
    let _ = host.kill();
    let _ = host.wait();

    let out = agent.cli(&["pair", "--expires", "5 minutes"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("90s, 5m, 1h"), "{}", stderr(&out));
    let out = agent.cli(&["pair", "11-222-333", "--peer", "127.0.0.1:4001"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("did you mean /ip4/127.0.0.1/tcp/4001?"),
        "{}",
        stderr(&out)
    );
    // Pairing with this device itself says so.
    let own = agent
        .addrs
        .iter()
        .find(|a| a.contains("/tcp/"))
        .unwrap()
        .clone();
    let out = agent.cli(&["pair", "11-222-333", "--peer", &own]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("this device"), "{}", stderr(&out));

    // Every argument of every command has help text.
    let help =
        |args: &[&str]| stdout(&Command::new(BIN).args(args).arg("--help").output().unwrap());
    let top = help(&[]);
    let commands: Vec<String> = top
        .split("Commands:")
        .nth(1)
        .unwrap()
        .split("Options:")
        .next()
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| c != "help")
        .collect();
    assert!(commands.len() > 15, "{top}");
    // Common commands come first.
    assert_eq!(&commands[..3], ["agent", "pair", "status"], "{top}");
    for command in commands {
        let text = help(&[&command]);
        for section in ["Arguments:", "Options:"] {
            let Some(body) = text.split(section).nth(1) else {
                continue;
            };
            let body = body.split("\n\n").next().unwrap_or_default();
            for line in body.lines().filter(|l| l.starts_with("  ")) {
                let line = line.trim();
                let described = line.contains("  ") || !line.starts_with(['-', '<', '[']);
                assert!(
                    described,
                    "`devicelink {command}`: {line:?} has no help text\n{text}"
                );
            }
        }
    }
}

/// Friction: `devicelink pair | head -1` ends quietly when `head` closes the pipe.
#[test]
fn output_cut_off_by_a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentProcess::start(dir.path(), &[]);
    let mut pair = Command::new(BIN)
        .arg("--socket")
        .arg(&agent.socket)
        .args(["pair", "--expires", "60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(pair.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert!(first.starts_with("pairing code: "), "{first}");
    drop(out); // what `head -1` does after its line
               // The host's next line (a failed attempt: a wrong code from another device) hits the
               // closed pipe.
    let code = first
        .trim()
        .strip_prefix("pairing code: ")
        .unwrap()
        .to_string();
    let slot = code.split('-').next().unwrap();
    let wrong = if code.ends_with("000") {
        format!("{slot}-111-111")
    } else {
        format!("{slot}-000-000")
    };
    let other_dir = tempfile::tempdir().unwrap();
    let other = AgentProcess::start(other_dir.path(), &[]);
    let out = other.cli(&["pair", &wrong, "--peer", &agent.addr]);
    assert!(!out.status.success(), "a wrong code paired");
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(status) = pair.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "pair did not end");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut pair.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        !err.contains("panicked"),
        "pair panicked on a closed pipe: {err}"
    );
    println!("pair ended with {status:?}");
}

/// Point 3: an explicit TCP port another agent holds is a start-up error, not a shared port.
#[test]
fn a_port_another_agent_holds_is_a_startup_error() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let first = AgentProcess::start(da.path(), &[]);
    let taken = first
        .addrs
        .iter()
        .find(|a| a.contains("/tcp/"))
        .unwrap()
        .clone();
    let out = Command::new(BIN)
        .arg("--data-dir")
        .arg(db.path())
        .args(["agent", "--no-mdns", "--no-ws", "--listen", &taken])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "a second agent started on {taken}");
    let err = stderr(&out);
    assert!(err.contains("already in use"), "{err}");
    // The first agent still answers on its socket.
    assert!(first.cli(&["status", "--json"]).status.success());
}

/// Point 4 and names: `app add` prints the endpoint of the agent it talked to and says tokens
/// are per device; `status` says why there is no endpoint; `trust remove` takes a name.
#[test]
fn apps_endpoints_and_device_names() {
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentProcess::start(dir.path(), &[]);
    let out = agent.cli(&["app", "add", "notes-web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("per device"), "{}", stdout(&out));
    assert!(
        stderr(&out).contains(&format!("'{}'", agent.ws)),
        "app add did not print this agent's endpoint {}: {}",
        agent.ws,
        stderr(&out)
    );
    let quiet = tempfile::tempdir().unwrap();
    let no_ws = AgentProcess::start_with(quiet.path(), &[], &["--no-mdns", "--no-ws"]);
    let status: serde_json::Value =
        serde_json::from_str(&stdout(&no_ws.cli(&["status", "--json"]))).unwrap();
    assert!(
        status["ws_note"].as_str().unwrap().contains("--no-ws"),
        "{status}"
    );
    let summary = stdout(&no_ws.cli(&["status"]));
    assert!(
        summary.contains("this device:") && summary.contains("--no-ws"),
        "{summary}"
    );

    let other = libp2p::identity::Keypair::generate_ed25519()
        .public()
        .to_peer_id();
    let out = agent.cli(&["trust", "add", &other.to_string(), "--name", "old-phone"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = agent.cli(&["trust", "remove", "Old-Phone"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stdout(&agent.cli(&["trust", "list"])).contains(&other.to_string()));
    let out = agent.cli(&["unpair", "tablet"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no device named \"tablet\""),
        "{}",
        stderr(&out)
    );
    let _ = cli; // (the plain helper is used by other test files)
}
