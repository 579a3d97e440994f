//! Agent child processes for black-box tests: started on 127.0.0.1, killed on drop.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use devicelink::client::Client;

use super::LIMIT;

pub const BIN: &str = env!("CARGO_BIN_EXE_devicelink");

/// An agent child process, killed on drop.
pub struct AgentProcess {
    pub child: Child,
    pub data_dir: PathBuf,
    pub socket: PathBuf,
    pub device_id: String,
    /// The first listen address printed, and all of them.
    pub addr: String,
    pub addrs: Vec<String>,
    /// The y-websocket endpoint (`ws://127.0.0.1:PORT`), empty with `--no-ws`.
    pub ws: String,
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl AgentProcess {
    /// Starts `devicelink agent` on 127.0.0.1 (no mDNS) and waits until it prints its socket.
    pub fn start(data_dir: &Path, peers: &[&str]) -> Self {
        Self::start_with(data_dir, peers, &["--no-mdns"])
    }

    /// Same, with extra agent flags (e.g. `--mdns-loopback` instead of `--no-mdns`).
    pub fn start_with(data_dir: &Path, peers: &[&str], extra: &[&str]) -> Self {
        let mut cmd = Command::new(BIN);
        cmd.arg("agent")
            .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
            .args(extra);
        for peer in peers {
            cmd.args(["--peer", peer]);
        }
        // Never the fixed default port: tests run side by side.
        if !extra.iter().any(|a| *a == "--ws" || *a == "--no-ws") {
            cmd.args(["--ws", "127.0.0.1:0"]);
        }
        Self::launch(cmd, data_dir)
    }

    /// Starts `devicelink agent ARGS` inside network namespace `netns` (no mDNS, no
    /// y-websocket endpoint); its IPC socket is a file, reachable from the test's namespace.
    pub fn start_in(netns: &str, data_dir: &Path, args: &[&str]) -> Self {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns, BIN, "agent", "--no-mdns", "--no-ws"])
            .args(args);
        Self::launch(cmd, data_dir)
    }

    /// Starts `devicelink --data-dir DIR agent` inside `netns` as a user would: no other flag
    /// (default listeners, mDNS on every interface, the default y-websocket port). Without
    /// `XDG_RUNTIME_DIR` the socket is the data dir's `agent.sock`.
    pub fn start_as_user_in(netns: &str, data_dir: &Path) -> Self {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns, BIN, "--data-dir"])
            .arg(data_dir)
            .arg("agent")
            .env_remove("XDG_RUNTIME_DIR");
        Self::read_banner(cmd, data_dir)
    }

    /// Runs `cmd` (an `agent` command line) with this data dir and socket, and waits until the
    /// agent prints its socket.
    fn launch(mut cmd: Command, data_dir: &Path) -> Self {
        cmd.arg("--data-dir")
            .arg(data_dir)
            .arg("--socket")
            .arg(data_dir.join("agent.sock"));
        Self::read_banner(cmd, data_dir)
    }

    /// Starts `cmd` and reads its banner up to the socket line.
    fn read_banner(mut cmd: Command, data_dir: &Path) -> Self {
        let socket = data_dir.join("agent.sock");
        cmd.stdout(Stdio::piped()).stdin(Stdio::null());
        // DEVICELINK_TEST_LOG=1 shows the agents' logs (with RUST_LOG to choose what).
        if std::env::var_os("DEVICELINK_TEST_LOG").is_some() {
            cmd.stderr(Stdio::inherit());
        } else {
            cmd.stderr(Stdio::null());
        }
        let mut child = cmd.spawn().expect("spawn agent");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (mut device_id, mut addrs, mut ws) = (String::new(), Vec::new(), String::new());
        let deadline = Instant::now() + LIMIT;
        loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("agent prints its socket in time");
            if let Some(id) = line.strip_prefix("device id: ") {
                device_id = id.to_string();
            } else if let Some(a) = line.strip_prefix("listening: ") {
                addrs.push(a.to_string());
            } else if let Some(w) = line.strip_prefix("websocket: ") {
                ws = w.to_string();
            } else if line.starts_with("ipc socket: ") {
                break;
            }
        }
        Self {
            child,
            data_dir: data_dir.to_path_buf(),
            socket,
            device_id,
            addr: addrs.first().cloned().unwrap_or_default(),
            addrs,
            ws,
        }
    }

    /// Starts two agents in `da` and `db` that trust each other, `b` dialing `a`.
    pub fn linked_pair(da: &Path, db: &Path) -> (Self, Self) {
        let id = |dir: &Path| {
            stdout(&cli(dir, &dir.join("agent.sock"), &["id"]))
                .trim()
                .to_string()
        };
        let (id_a, id_b) = (id(da), id(db));
        for (dir, other) in [(da, &id_b), (db, &id_a)] {
            let out = cli(dir, &dir.join("agent.sock"), &["trust", "add", other]);
            assert!(out.status.success(), "{}", stderr(&out));
        }
        let a = Self::start(da, &[]);
        let b = Self::start(db, &[&a.addr]);
        (a, b)
    }

    /// Stops the agent with SIGTERM (a clean shutdown) and waits for it.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.socket)
            .await
            .expect("connect to agent")
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        cli(&self.data_dir, &self.socket, args)
    }

    pub fn kill9(mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

pub fn cli(data_dir: &Path, socket: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run devicelink")
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `devicelink pair` running on a host agent: its code and its output lines.
pub struct OpenCode {
    pub child: Child,
    pub code: String,
    lines: Receiver<String>,
    /// Every line read so far (stdout and stderr interleave in any order).
    seen: std::cell::RefCell<Vec<String>>,
}

impl Drop for OpenCode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl OpenCode {
    pub fn open(host: &AgentProcess, expires: u64) -> Self {
        let mut child = Command::new(BIN)
            .arg("--socket")
            .arg(&host.socket)
            .args(["pair", "--expires", &expires.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx2.send(format!("stderr: {line}"));
            }
        });
        let first = lines.recv_timeout(LIMIT).expect("pair prints its code");
        let code = first
            .strip_prefix("pairing code: ")
            .expect(&first)
            .to_string();
        Self {
            child,
            code,
            lines,
            seen: Default::default(),
        }
    }

    /// The first output line containing `needle`, already seen or still to come (bounded wait).
    pub fn expect_line(&self, needle: &str) -> String {
        if let Some(line) = self.seen.borrow().iter().find(|l| l.contains(needle)) {
            return line.clone();
        }
        let deadline = Instant::now() + LIMIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "host never printed {needle:?}; it printed {:?}",
                    self.seen.borrow()
                )
            });
            self.seen.borrow_mut().push(line.clone());
            if line.contains(needle) {
                return line;
            }
        }
    }

    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + LIMIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "pair did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
