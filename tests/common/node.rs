//! Real Yjs clients for black-box tests: `tests/node/driver.mjs` (y-websocket 2.x and 3.x
//! providers run on command, one JSON line per command and per reply), killed on drop.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The folder of the Node puppets.
pub fn node_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node")
}

/// Why the Node tests cannot run here, if they cannot. Installs tests/node's packages on
/// first use (`npm ci`, once per test binary). With `DEVICELINK_REQUIRE_NODE=1` (set by
/// .ci/run) a missing setup is a failure, not a skip.
pub fn unavailable() -> Option<String> {
    static SETUP: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let reason = SETUP.get_or_init(setup).clone();
    if let Some(reason) = &reason {
        assert!(
            std::env::var("DEVICELINK_REQUIRE_NODE").is_err(),
            "DEVICELINK_REQUIRE_NODE is set but {reason}"
        );
    }
    reason
}

fn setup() -> Option<String> {
    if Command::new("node").arg("--version").output().is_err() {
        return Some("node is not installed".to_string());
    }
    let installed = ["y-websocket-3", "@chainsafe/libp2p-yamux"];
    if installed
        .iter()
        .all(|package| node_dir().join("node_modules").join(package).exists())
    {
        return None;
    }
    let installed = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(node_dir())
        .stdout(Stdio::null())
        .status();
    match installed {
        Ok(status) if status.success() => None,
        Ok(status) => Some(format!(
            "`npm ci` in {} failed ({status})",
            node_dir().display()
        )),
        Err(e) => Some(format!("cannot run npm: {e}")),
    }
}

/// A running driver.
pub struct Driver {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<Value>,
    /// Events printed unprompted, in order.
    pub events: Vec<Value>,
    next: u64,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    pub fn start() -> Self {
        let mut child = Command::new("node")
            .arg(node_dir().join("driver.mjs"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start node driver");
        let stdout = child.stdout.take().expect("stdout");
        let stdin = child.stdin.take().expect("stdin");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(value) = serde_json::from_str::<Value>(&line) {
                    if tx.send(value).is_err() {
                        break;
                    }
                }
            }
        });
        Self {
            child,
            stdin,
            lines,
            events: Vec::new(),
            next: 1,
        }
    }

    /// Sends `command` and returns its reply (events that arrive meanwhile are kept).
    pub fn call(&mut self, mut command: Value) -> Value {
        let re = self.next;
        self.next += 1;
        command["re"] = json!(re);
        let wait = command["timeout_ms"].as_u64().unwrap_or(10_000) + 15_000;
        writeln!(self.stdin, "{command}").expect("write to driver");
        self.stdin.flush().expect("flush driver");
        let deadline = Instant::now() + Duration::from_millis(wait);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("driver did not answer {command}"));
            if line["re"] == json!(re) {
                return line;
            }
            if line.get("event").is_some() {
                self.events.push(line);
            }
        }
    }

    /// Sends `command` and asserts it succeeded.
    pub fn ok(&mut self, command: Value) -> Value {
        let reply = self.call(command.clone());
        assert_eq!(reply["ok"], true, "{command} -> {reply}");
        reply
    }

    /// Waits for an unprompted event matching `pick`.
    pub fn wait_event(&mut self, limit: Duration, pick: impl Fn(&Value) -> bool) -> Value {
        if let Some(found) = self.events.iter().find(|e| pick(e)) {
            return found.clone();
        }
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no matching driver event; saw {:?}", self.events));
            if line.get("event").is_some() {
                self.events.push(line.clone());
                if pick(&line) {
                    return line;
                }
            }
        }
    }
}
