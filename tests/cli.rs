//! Black-box tests of the `devicelink` binary: real processes, real sockets, real sled dirs.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::process::{cli, stderr, stdout, AgentProcess, BIN};
use common::LIMIT;
use serde_json::json;

/// Acceptance 4: SIGKILL right after N acknowledged changes; on restart all N are there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_changes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut total = 0usize;
    for (cycle, n) in [200usize, 1_000, 3_000].into_iter().enumerate() {
        let agent = AgentProcess::start(dir.path(), &[]);
        let client = std::sync::Arc::new(agent.client().await);
        // Many concurrent writers: acknowledgements share flushes (group commit).
        let writes = (0..n).map(|i| {
            let client = client.clone();
            async move {
                let key = format!("c{cycle}-k{i}");
                client.doc_set("ledger", "entries", &key, json!(i)).await
            }
        });
        for result in futures::future::join_all(writes).await {
            result.expect("acknowledged");
        }
        client
            .doc_text_append("ledger", "log", &format!("cycle {cycle};"))
            .await
            .unwrap();
        total += n;
        agent.kill9(); // no chance to flush anything more
    }
    let agent = AgentProcess::start(dir.path(), &[]);
    let doc = agent.client().await.doc_get("ledger").await.unwrap();
    let entries = doc["entries"].as_object().expect("entries map");
    assert_eq!(
        entries.len(),
        total,
        "every acknowledged change survived SIGKILL"
    );
    for (cycle, n) in [200usize, 1_000, 3_000].into_iter().enumerate() {
        for i in 0..n {
            assert_eq!(entries[&format!("c{cycle}-k{i}")], json!(i));
        }
    }
    assert_eq!(doc["log"], "cycle 0;cycle 1;cycle 2;");
}

/// Two agent processes linked with `trust add` and `--peer`: `doc set` on A, `doc get` on B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agent_processes_sync_through_the_cli() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let id = |dir: &Path| {
        let out = cli(dir, &dir.join("agent.sock"), &["id"]);
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out).trim().to_string()
    };
    let (id_a, id_b) = (id(da.path()), id(db.path()));
    assert_eq!(id(da.path()), id_a, "the device id is stable");
    // With no agent running, `trust add` edits the store directly.
    for (dir, other) in [(da.path(), &id_b), (db.path(), &id_a)] {
        let out = cli(
            dir,
            &dir.join("agent.sock"),
            &["trust", "add", other, "--name", "peer"],
        );
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let b = AgentProcess::start(db.path(), &[]);
    let a = AgentProcess::start(da.path(), &[&b.addr]);
    assert_eq!(
        (a.device_id.as_str(), b.device_id.as_str()),
        (id_a.as_str(), id_b.as_str())
    );

    // `doc watch` on B, started before the change, prints it when it arrives.
    let mut watch = Command::new(BIN)
        .arg("--socket")
        .arg(&b.socket)
        .args(["doc", "watch", "trip"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let watch_out = watch.stdout.take().unwrap();
    let (line_tx, line_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(watch_out).lines().map_while(Result::ok) {
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });
    // Its first line (the current state) means the subscription is in place.
    let first = line_rx.recv_timeout(LIMIT).expect("doc watch started");
    assert!(first.contains("\"state\""), "{first}");

    let out = a.cli(&["doc", "set", "trip", "plan", "city", "\"Lisbon\""]);
    assert!(out.status.success(), "{}", stderr(&out));
    let start = Instant::now();
    loop {
        let out = b.cli(&["doc", "get", "trip"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        if json["plan"]["city"] == "Lisbon" {
            break;
        }
        assert!(start.elapsed() < LIMIT, "B never saw A's change: {json}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let line = line_rx
        .recv_timeout(LIMIT)
        .expect("doc watch printed the change");
    let event: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["origin"], id_a.as_str());
    assert_eq!(event["state"]["plan"]["city"], "Lisbon");
    let _ = watch.kill();
    let _ = watch.wait();

    let out = a.cli(&["trust", "list"]);
    assert!(
        stdout(&out).contains(&id_b),
        "trust list through the running agent: {}",
        stdout(&out)
    );
    let out = b.cli(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(status["device_id"], id_b.as_str());
    assert!(status["docs"].as_u64().unwrap() >= 1, "{status}");
    let out = b.cli(&["doc", "list"]);
    assert!(
        stdout(&out).lines().any(|l| l.starts_with("trip\t")),
        "doc list: {}",
        stdout(&out)
    );
}

/// SIGTERM stops the agent cleanly (exit 0) after a final flush.
#[test]
fn sigterm_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = AgentProcess::start(dir.path(), &[]);
    let pid = agent.child.id().to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(status.success());
    let deadline = Instant::now() + LIMIT;
    let exit = loop {
        if let Some(exit) = agent.child.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "agent did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "clean exit: {exit:?}");
    assert!(!agent.socket.exists(), "socket removed on stop");
}

/// Commands that need an agent say clearly that none is running; bad arguments are rejected.
#[test]
fn clear_errors_without_agent_and_for_bad_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    for args in [&["status"][..], &["doc", "get", "x"], &["doc", "list"]] {
        let out = cli(dir.path(), &socket, args);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("no devicelink agent is running"),
            "{}",
            stderr(&out)
        );
    }
    let out = cli(dir.path(), &socket, &["trust", "add", "not-a-device-id"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not-a-device-id"), "{}", stderr(&out));
    let out = cli(dir.path(), &socket, &["agent", "--listen", "nonsense"]);
    assert!(!out.status.success());
    let out = cli(dir.path(), &socket, &["frobnicate"]);
    assert!(!out.status.success());
}

/// A second agent on the same data dir is refused with a clear message.
#[test]
fn second_agent_on_the_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _first = AgentProcess::start(dir.path(), &[]);
    let out = cli(
        dir.path(),
        &dir.path().join("other.sock"),
        &["agent", "--listen", "/ip4/127.0.0.1/tcp/0"],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("in use by another devicelink agent"),
        "{}",
        stderr(&out)
    );
}

/// `activity publish`, `activity list`, `handoff` and `conflicts` through the real binary.
#[test]
fn activity_and_handoff_through_the_cli() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let id = |dir: &Path| {
        stdout(&cli(dir, &dir.join("agent.sock"), &["id"]))
            .trim()
            .to_string()
    };
    let (id_a, id_b) = (id(da.path()), id(db.path()));
    assert!(cli(
        da.path(),
        &da.path().join("agent.sock"),
        &["trust", "add", &id_b]
    )
    .status
    .success());
    assert!(cli(
        db.path(),
        &db.path().join("agent.sock"),
        &["trust", "add", &id_a]
    )
    .status
    .success());
    let a = AgentProcess::start(da.path(), &[]);
    let b = AgentProcess::start(db.path(), &[&a.addr]);

    assert!(a
        .cli(&["doc", "text", "notes", "body", "--append", "hello"])
        .status
        .success());
    let out = a.cli(&[
        "activity",
        "publish",
        "--type",
        "com.example.notes.edit",
        "--title",
        "Notes",
        "--doc",
        "notes",
        "--state",
        "{\"cursor\":3}",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let published: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let activity_id = published["id"].as_str().unwrap().to_string();
    assert_eq!(published["holder"], id_a.as_str());

    let start = Instant::now();
    while !stdout(&b.cli(&["activity", "list"])).contains(&activity_id) {
        assert!(start.elapsed() < LIMIT, "activity never reached b");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = b.cli(&["handoff", &activity_id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let handoff: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(handoff["activity"]["app_state"]["cursor"], 3);
    assert_eq!(handoff["activity"]["holder"], id_b.as_str());
    assert_eq!(handoff["docs"]["notes"]["body"], "hello");

    let out = b.cli(&["handoff", "no-such-activity"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no activity no-such-activity"),
        "{}",
        stderr(&out)
    );
    let out = b.cli(&["conflicts"]);
    assert!(out.status.success());
    assert_eq!(stdout(&out).trim(), "[]");
    let out = b.cli(&["conflicts", "resolve", "nope", "--keep", "local"]);
    assert!(!out.status.success());
    let out = a.cli(&["activity", "publish", "--type", "bad", "--title", "x"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("reverse-DNS"), "{}", stderr(&out));
}

/// `service install` writes a user unit whose ExecStart really runs this agent with the flags
/// given (the unit's command line is started here, as systemd would); `service uninstall`
/// removes it. (`--no-start`: no service manager runs in the test.)
#[test]
fn service_install_writes_a_unit_that_runs_the_agent() {
    let home = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let socket = data.path().join("svc.sock");
    let config = home.path().join("config");
    let devicelink = |args: &[&str]| {
        Command::new(BIN)
            .env("HOME", home.path())
            .env("XDG_CONFIG_HOME", &config)
            .arg("--data-dir")
            .arg(data.path())
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = devicelink(&[
        "service",
        "install",
        "--no-start",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--name",
        "svc",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The test binary lives in the build folder: the user is warned.
    assert!(
        stderr(&out).contains("warning: the service would run")
            && stderr(&out).contains("is in a build folder"),
        "{}",
        stderr(&out)
    );
    let unit_path = config.join("systemd/user/devicelink.service");
    let unit = std::fs::read_to_string(&unit_path).expect("the unit is written");
    assert!(unit.contains("WantedBy=default.target"), "{unit}");
    assert!(unit.contains("Restart=on-failure"), "{unit}");
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("an ExecStart line");
    let argv: Vec<&str> = exec.split_whitespace().collect();
    assert!(argv.contains(&"agent") && argv.contains(&"svc"), "{exec}");

    // Run the unit's command line, as systemd would.
    let mut child = Command::new(argv[0])
        .args(&argv[1..])
        .args(["--no-ws", "--no-mdns"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let deadline = Instant::now() + LIMIT;
    for line in lines.map_while(Result::ok) {
        if line.starts_with("ipc socket: ") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the service's agent did not start"
        );
    }
    let status = devicelink(&["status", "--json"]);
    let _ = child.kill();
    let _ = child.wait();
    let status: serde_json::Value = serde_json::from_str(&stdout(&status)).unwrap();
    assert_eq!(status["device_name"], "svc", "{status}");

    // Where systemd is not running, installing with a start says so plainly and how to run it.
    if !std::path::Path::new("/run/systemd/system").exists() {
        let out = devicelink(&["service", "install", "--name", "svc"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let text = stdout(&out);
        assert!(
            text.contains("systemd is not running")
                && text.contains("start the agent yourself with:"),
            "{text}"
        );
    }
    let out = devicelink(&["service", "uninstall", "--no-stop"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("removed"), "{}", stdout(&out));
    assert!(!unit_path.exists());
    let out = devicelink(&["service", "uninstall", "--no-stop"]);
    assert!(stdout(&out).contains("no service was installed"));
    // A user for a user service makes no sense: refused by the argument parser.
    let out = devicelink(&["service", "install", "--user", "nobody"]);
    assert!(!out.status.success());
}
