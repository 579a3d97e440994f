//! A full disk: the agent runs under a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored), so its
//! writes fail with EFBIG as they would with ENOSPC. Apps must get a clear error, and nothing
//! that was not saved may have been acknowledged.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Arc;

use common::process::{AgentProcess, BIN};
use devicelink::client::{Client, ClientError};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_gives_clear_errors_and_never_acknowledges_unsaved_changes() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let mut cmd = Command::new(BIN);
    cmd.arg("--data-dir")
        .arg(dir.path())
        .arg("--socket")
        .arg(&socket)
        .args(["agent", "--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 4 << 20,
                rlim_max: 4 << 20,
            };
            libc::setrlimit(libc::RLIMIT_FSIZE, &limit);
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    let mut child = KillOnDrop(cmd.spawn().unwrap());
    let stdout = child.0.stdout.take().unwrap();
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        if line.starts_with("ipc socket: ") {
            break;
        }
    }
    let client = Arc::new(Client::connect(&socket).await.unwrap());
    let value = "v".repeat(16 * 1024);
    let mut acked = Vec::new();
    let mut error = None;
    for i in 0..4000 {
        match client
            .doc_set("big", "m", &format!("k{i}"), json!(value))
            .await
        {
            Ok(()) => acked.push(i),
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    let error = error.expect("writes beyond the disk's room must fail");
    let message = error.to_string();
    match &error {
        ClientError::Agent { message, .. } => {
            assert!(
                message.contains("could not be made durable") || message.contains("database error"),
                "{message}"
            )
        }
        // The agent may also give up entirely; the connection then drops. Nothing more is acked.
        ClientError::Closed => {}
        other => panic!("unexpected error: {other}"),
    }
    println!(
        "{} writes acknowledged before the disk filled; then: {message}",
        acked.len()
    );
    assert!(
        !acked.is_empty(),
        "the limit was too small to test anything"
    );
    drop(child);

    // With room again, every acknowledged write is there.
    let agent = AgentProcess::start(dir.path(), &[]);
    let doc = agent.client().await.doc_get("big").await.unwrap();
    for i in &acked {
        assert_eq!(
            doc["m"][format!("k{i}")],
            json!(value),
            "acknowledged write {i} lost"
        );
    }
}

/// The agent child, killed however the test ends (also when an assertion fails).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
