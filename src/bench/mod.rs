//! `devicelink bench`: end-to-end figures, app to app through two agent processes on loopback,
//! measured only through the IPC socket (what an app sees). Prints one JSON line. Optionally
//! runs the same workloads on the standard Yjs stack (two clients through a y-websocket server)
//! for a side-by-side comparison (see bench/yjs/).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::client::{Client, ClientError};
use crate::ipc::Event;

mod endpoint;
mod hops;
mod many_docs;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("cannot start an agent: {0}")]
    Spawn(String),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0} did not finish within {1:?}")]
    Timeout(&'static str, Duration),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Workload sizes.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub latency_samples: usize,
    pub throughput_secs: f64,
    pub offline_changes: usize,
    pub big_doc_bytes: usize,
    /// Run the Yjs comparison (needs node and bench/yjs).
    pub yjs_dir: Option<PathBuf>,
    /// Documents in the many-documents section (0 skips it).
    pub docs: usize,
    /// Size of the large document whose first sync is measured, in MiB (0 skips it).
    pub large_doc_mb: usize,
    /// Run the automerge-repo comparison (needs node and bench/automerge).
    pub automerge_dir: Option<PathBuf>,
    /// How long an idle agent with a linked peer is watched for wake-ups, in seconds.
    pub idle_secs: u64,
}

impl BenchConfig {
    /// Small sizes, for a smoke run.
    pub fn quick() -> Self {
        Self {
            latency_samples: 200,
            throughput_secs: 1.0,
            offline_changes: 5_000,
            big_doc_bytes: 1 << 20,
            yjs_dir: None,
            docs: 1_000,
            large_doc_mb: 8,
            automerge_dir: None,
            idle_secs: 5,
        }
    }
}

impl Default for BenchConfig {
    fn default() -> Self {
        Self {
            latency_samples: 2000,
            throughput_secs: 3.0,
            offline_changes: 100_000,
            big_doc_bytes: 10 << 20,
            yjs_dir: None,
            docs: 10_000,
            large_doc_mb: 100,
            automerge_dir: None,
            idle_secs: 20,
        }
    }
}

const WINDOW: usize = 512;
const LIMIT: Duration = Duration::from_secs(120);

/// An agent child process on 127.0.0.1, killed on drop.
struct AgentProc {
    child: Child,
    started: Instant,
    socket: PathBuf,
    addr: String,
    /// The y-websocket endpoint, `ws://127.0.0.1:PORT`.
    ws: String,
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl AgentProc {
    fn start(exe: &Path, dir: &Path, listen: &str, peers: &[&str]) -> Result<Self, BenchError> {
        Self::start_logging(exe, dir, listen, peers, None)
    }

    /// Starts an agent whose log goes to `log = (file, filter)` (`RUST_LOG`) instead of nowhere.
    fn start_logging(
        exe: &Path,
        dir: &Path,
        listen: &str,
        peers: &[&str],
        log: Option<(&Path, &str)>,
    ) -> Result<Self, BenchError> {
        let socket = dir.join("agent.sock");
        let mut cmd = Command::new(exe);
        cmd.arg("--data-dir")
            .arg(dir)
            .arg("--socket")
            .arg(&socket)
            .args([
                "agent",
                "--no-mdns",
                "--listen",
                listen,
                "--ws",
                "127.0.0.1:0",
            ])
            .stdout(Stdio::piped())
            .stdin(Stdio::null());
        match log {
            Some((file, filter)) => {
                cmd.stderr(std::fs::File::create(file)?)
                    .env("RUST_LOG", filter);
            }
            None => {
                cmd.stderr(Stdio::null());
            }
        }
        for p in peers {
            cmd.args(["--peer", p]);
        }
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(|e| BenchError::Spawn(e.to_string()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| BenchError::Spawn("no stdout".into()))?;
        let (mut addr, mut ws) = (String::new(), String::new());
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            if let Some(a) = line.strip_prefix("listening: ") {
                addr = a.to_string();
            }
            if let Some(w) = line.strip_prefix("websocket: ") {
                ws = w.to_string();
            }
            if line.starts_with("ipc socket: ") {
                break;
            }
        }
        if addr.is_empty() {
            return Err(BenchError::Spawn("the agent printed no address".into()));
        }
        Ok(Self {
            child,
            started,
            socket,
            addr,
            ws,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// Makes data dirs `root/a` and `root/b` whose agents trust each other (before they start).
fn trusted_pair(root: &Path, a: &str, b: &str) -> Result<(PathBuf, PathBuf), BenchError> {
    let (da, db) = (root.join(a), root.join(b));
    std::fs::create_dir_all(&da)?;
    std::fs::create_dir_all(&db)?;
    trust_each_other(&[&da, &db])?;
    Ok((da, db))
}

/// Makes the agents in `dirs` trust each other (before they start).
fn trust_each_other(dirs: &[&Path]) -> Result<(), BenchError> {
    let ids: Vec<_> = dirs
        .iter()
        .map(|d| crate::identity::device_id(d).map_err(|e| BenchError::Spawn(e.to_string())))
        .collect::<Result<_, _>>()?;
    for (i, dir) in dirs.iter().enumerate() {
        let device = crate::offline::OfflineDevice::open(dir)
            .map_err(|e| BenchError::Spawn(e.to_string()))?;
        for (j, id) in ids.iter().enumerate() {
            if i != j {
                device
                    .trust_add(*id, &format!("bench-{j}"))
                    .map_err(|e| BenchError::Spawn(e.to_string()))?;
            }
        }
    }
    Ok(())
}

async fn wait_for<F, Fut>(what: &'static str, cond: F) -> Result<Instant, BenchError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    wait_for_every(Duration::from_micros(500), what, cond).await
}

/// Polls `cond` every `every` until it holds; the time it first held.
async fn wait_for_every<F, Fut>(
    every: Duration,
    what: &'static str,
    mut cond: F,
) -> Result<Instant, BenchError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        if start.elapsed() > LIMIT {
            return Err(BenchError::Timeout(what, LIMIT));
        }
        tokio::time::sleep(every).await;
    }
    Ok(Instant::now())
}

async fn syncing(client: &Client) -> bool {
    client
        .status()
        .await
        .map(|s| {
            s["peers"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["syncing"] == true))
        })
        .unwrap_or(false)
}

async fn state_vector(client: &Client, doc: &str) -> Option<Value> {
    let body = crate::ipc::RequestBody::DocStateVector {
        doc: doc.to_string(),
    };
    client
        .request(body)
        .await
        .ok()
        .map(|v| v["state_vector"].clone())
}

async fn same_sv(a: &Client, b: &Client, doc: &str) -> bool {
    let (x, y) = (state_vector(a, doc).await, state_vector(b, doc).await);
    x.is_some() && x == y
}

/// `(utime + stime)` clock ticks and RSS in KiB of a process.
fn proc_usage(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = fields
        .get(11)
        .and_then(|u| u.parse::<u64>().ok())
        .unwrap_or(0)
        + fields
            .get(12)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (ticks, rss)
}

/// Context switches per second of an idle process, over `window`.
struct Wakeups {
    total: f64,
    /// Of those, sled's worker threads (`sled-io-*`), which wait with a 1 s timeout.
    sled: f64,
    /// Per thread name (threads of one name summed).
    by_thread: Value,
}

/// Voluntary and involuntary context switches of each thread of `pid`, by thread id.
fn switches(pid: u32) -> std::collections::BTreeMap<u32, (String, u64)> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<u32>().ok())
        else {
            continue;
        };
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let count = status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        out.insert(tid, (name.trim().to_string(), count));
    }
    out
}

async fn idle_wakeups(pid: u32, window: Duration) -> Wakeups {
    let before = switches(pid);
    tokio::time::sleep(window).await;
    let after = switches(pid);
    let secs = window.as_secs_f64().max(1e-3);
    let mut by_name: std::collections::BTreeMap<String, u64> = Default::default();
    for (tid, (name, count)) in &after {
        let start = before.get(tid).map_or(0, |(_, c)| *c);
        *by_name.entry(name.clone()).or_default() += count.saturating_sub(start);
    }
    let per_sec = |n: u64| (n as f64 / secs * 10.0).round() / 10.0;
    let total = by_name.values().sum();
    let sled = by_name
        .iter()
        .filter(|(name, _)| name.starts_with("sled-io"))
        .map(|(_, n)| n)
        .sum();
    Wakeups {
        total: per_sec(total),
        sled: per_sec(sled),
        by_thread: by_name
            .into_iter()
            .map(|(name, n)| (name, json!(per_sec(n))))
            .collect::<serde_json::Map<_, _>>()
            .into(),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

/// Makes `count` single-character appends (one update each) with up to WINDOW requests in
/// flight (or until `deadline`); returns how many were acknowledged and the time.
async fn pipelined_sets(
    client: &Arc<Client>,
    doc: &str,
    count: usize,
    deadline: Option<Instant>,
) -> Result<(usize, Duration), BenchError> {
    use futures::stream::{FuturesUnordered, StreamExt};
    let start = Instant::now();
    // Requests in flight as futures of this task: no task spawn or cross-thread wake per change.
    let mut in_flight = FuturesUnordered::new();
    let mut sent = 0;
    let mut done = 0;
    while done < count {
        while sent < count
            && in_flight.len() < WINDOW
            && deadline.is_none_or(|d| Instant::now() < d)
        {
            // One single-character insert per update, as the Yjs workload does.
            in_flight.push(client.doc_text_append(doc, "t", "x"));
            sent += 1;
        }
        match in_flight.next().await {
            Some(result) => {
                result?;
                done += 1;
            }
            None => break,
        }
    }
    Ok((done, start.elapsed()))
}

/// Runs every workload and returns the JSON report.
pub async fn run(config: &BenchConfig) -> Result<Value, BenchError> {
    let exe = std::env::current_exe()?;
    let root = tempfile::tempdir()?;
    let (da, db) = trusted_pair(root.path(), "a", "b")?;
    let a = AgentProc::start(&exe, &da, "/ip4/127.0.0.1/tcp/0", &[])?;
    let b = AgentProc::start(&exe, &db, "/ip4/127.0.0.1/tcp/0", &[&a.addr])?;
    let ca = Arc::new(Client::connect(&a.socket).await?);
    let cb = Client::connect(&b.socket).await?;
    wait_for("the first session", || syncing(&ca)).await?;

    // Idle: CPU over 3 s, RSS.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (t0a, _) = proc_usage(a.pid());
    let (t0b, _) = proc_usage(b.pid());
    let idle_window = Duration::from_secs(3);
    tokio::time::sleep(idle_window).await;
    let (t1a, rss_idle_a) = proc_usage(a.pid());
    let (t1b, rss_idle_b) = proc_usage(b.pid());
    let ticks_per_sec = 100.0;
    let idle_cpu =
        ((t1a - t0a).max(t1b - t0b)) as f64 / ticks_per_sec / idle_window.as_secs_f64() * 100.0;
    // Wake-ups of an idle agent with a linked peer: context switches of all its threads, once
    // its start-up has settled (the network looks after things more often for its first 10 s).
    let settled = a.started + Duration::from_secs(12);
    tokio::time::sleep(settled.saturating_duration_since(Instant::now())).await;
    let idle_wakeups = idle_wakeups(a.pid(), Duration::from_secs(config.idle_secs)).await;

    // Latency: write on A through IPC, event seen on B through IPC.
    let mut events = cb
        .take_events()
        .ok_or_else(|| BenchError::Spawn("events taken".into()))?;
    cb.subscribe("latency").await?;
    let mut samples = Vec::with_capacity(config.latency_samples);
    for i in 0..config.latency_samples {
        let start = Instant::now();
        let write = ca.doc_set("latency", "m", "k", json!(i));
        let seen = async {
            loop {
                match events.recv().await {
                    Some(Event::Update { .. }) => return Ok(start.elapsed()),
                    Some(_) => continue,
                    None => return Err(ClientError::Closed),
                }
            }
        };
        let (written, seen) =
            tokio::join!(write, tokio::time::timeout(Duration::from_secs(10), seen));
        written?;
        samples.push(
            seen.map_err(|_| BenchError::Timeout("a live update", Duration::from_secs(10)))??,
        );
    }
    samples.sort();

    // Sustained single-change updates, durable, with replication to B; RSS under load.
    let load_start = proc_usage(a.pid());
    let deadline = Instant::now() + Duration::from_secs_f64(config.throughput_secs);
    let sampler = {
        let (pa, pb) = (a.pid(), b.pid());
        tokio::spawn(async move {
            let mut max = 0;
            while Instant::now() < deadline {
                max = max.max(proc_usage(pa).1).max(proc_usage(pb).1);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            max
        })
    };
    let (acked, elapsed) = pipelined_sets(&ca, "throughput", usize::MAX, Some(deadline)).await?;
    let replicated = wait_for("throughput replication", || same_sv(&ca, &cb, "throughput")).await?;
    let rss_load = sampler.await.unwrap_or(0);
    let load_cpu =
        (proc_usage(a.pid()).0 - load_start.0) as f64 / ticks_per_sec / elapsed.as_secs_f64()
            * 100.0;
    let updates_per_sec = acked as f64 / elapsed.as_secs_f64();

    // Offline changes: B stops; A makes N changes; B restarts on its old address without
    // dialing, so A must redial it; then B catches up.
    let b_addr = b.addr.clone();
    drop(events);
    drop(cb);
    b.stop();
    wait_for("a to notice b left", || async { !syncing(&ca).await }).await?;
    let (offline_done, offline_time) =
        pipelined_sets(&ca, "offline", config.offline_changes, None).await?;
    let restarted = Instant::now();
    let b = AgentProc::start(&exe, &db, &b_addr, &[])?;
    let ready = Instant::now();
    let cb = Client::connect(&b.socket).await?;
    let connected = wait_for("a to redial b", || syncing(&cb)).await?;
    let caught_up = wait_for("the catch-up", || same_sv(&ca, &cb, "offline")).await?;

    // First sync of a 10 MB document to a new device.
    let (dd, de) = trusted_pair(root.path(), "d", "e")?;
    let d = AgentProc::start(&exe, &dd, "/ip4/127.0.0.1/tcp/0", &[])?;
    let cd = Client::connect(&d.socket).await?;
    let chunk = "x".repeat(64 * 1024);
    for _ in 0..config.big_doc_bytes / chunk.len() {
        cd.doc_text_append("big", "body", &chunk).await?;
    }
    let e_start = Instant::now();
    let e = AgentProc::start(&exe, &de, "/ip4/127.0.0.1/tcp/0", &[&d.addr])?;
    let ce = Client::connect(&e.socket).await?;
    let e_connected = wait_for("the new device to connect", || syncing(&ce)).await?;
    let e_done = wait_for("the 10 MB first sync", || same_sv(&cd, &ce, "big")).await?;
    let (_, rss_big) = proc_usage(d.pid());
    drop(e);

    let ours = json!({
        "latency_p50_us": percentile(&samples, 0.50),
        "latency_p99_us": percentile(&samples, 0.99),
        "latency_samples": samples.len(),
        "updates_per_sec": updates_per_sec.round(),
        "updates_acked": acked,
        "throughput_replicated_ms": (replicated - deadline.min(replicated)).as_secs_f64() * 1e3,
        "agent_cpu_under_load_percent": load_cpu.round(),
        "offline_changes": offline_done,
        "offline_write_ms": offline_time.as_secs_f64() * 1e3,
        "redial_ms": (connected - ready).as_secs_f64() * 1e3,
        "restart_to_connected_ms": (connected - restarted).as_secs_f64() * 1e3,
        "catchup_after_connect_ms": (caught_up - connected).as_secs_f64() * 1e3,
        "first_sync_10mb_ms": (e_done - e_connected).as_secs_f64() * 1e3,
        "first_sync_10mb_incl_connect_ms": (e_done - e_start).as_secs_f64() * 1e3,
        "agent_rss_idle_mb": (rss_idle_a.max(rss_idle_b) as f64 / 1024.0 * 10.0).round() / 10.0,
        "agent_rss_load_mb": (rss_load as f64 / 1024.0 * 10.0).round() / 10.0,
        "agent_rss_10mb_doc_mb": (rss_big as f64 / 1024.0 * 10.0).round() / 10.0,
        "agent_idle_cpu_percent": (idle_cpu * 100.0).round() / 100.0,
        "idle_wakeups_per_sec": idle_wakeups.total,
        "idle_wakeups_per_sec_sled_threads": idle_wakeups.sled,
        "idle_wakeups_per_sec_by_thread": idle_wakeups.by_thread,
    });
    let yjs = match &config.yjs_dir {
        Some(dir) => run_yjs(dir, config),
        None => json!({ "skipped": "run with --yjs DIR (see bench/yjs/README.md)" }),
    };
    let ratios = ratios(
        &ours,
        &yjs,
        &[
            ("latency_p50", "latency_p50_us", "latency_p50_us"),
            ("latency_p99", "latency_p99_us", "latency_p99_us"),
            ("updates_per_sec", "updates_per_sec", "updates_per_sec"),
            ("rss", "agent_rss_load_mb", "server_rss_mb"),
        ],
    );
    drop((a, b, d));
    let hops = hops::run(config.latency_samples).await?;
    let floor_ratio = ratio(
        ours["latency_p50_us"].as_f64(),
        hops["floor"]["total_p50_us"].as_f64(),
    );
    let endpoint = match &config.yjs_dir {
        Some(dir) => endpoint::run(dir, config.latency_samples).await?,
        None => json!({ "skipped": "run with --yjs DIR (see bench/yjs/README.md)" }),
    };
    let many = if config.docs > 0 || config.large_doc_mb > 0 {
        many_docs::run(config).await?
    } else {
        json!({ "skipped": "--docs 0" })
    };
    Ok(json!({
        "devicelink": ours,
        "yjs": yjs,
        "ratio_devicelink_over_yjs": ratios,
        "hops": hops,
        "ratio_latency_over_floor_p50": floor_ratio,
        "y_websocket_endpoint": endpoint,
        "many_docs": many,
    }))
}

/// `ours / theirs` rounded to hundredths; null where either is missing or `theirs` is 0.
fn ratio(ours: Option<f64>, theirs: Option<f64>) -> Value {
    match (ours, theirs) {
        (Some(o), Some(t)) if t > 0.0 => json!((o / t * 100.0).round() / 100.0),
        _ => Value::Null,
    }
}

/// `{name: ours[ours_key] / theirs[theirs_key]}` for each `(name, ours_key, theirs_key)`,
/// rounded to hundredths; null where either figure is missing.
fn ratios(ours: &Value, theirs: &Value, pairs: &[(&str, &str, &str)]) -> Value {
    let ratios = pairs.iter().map(|(name, ours_key, theirs_key)| {
        let ratio = ratio(ours[*ours_key].as_f64(), theirs[*theirs_key].as_f64());
        (name.to_string(), ratio)
    });
    Value::Object(ratios.collect())
}

/// Runs the Yjs peer workload (node + yjs + y-websocket, installed in `dir`).
fn run_yjs(dir: &Path, config: &BenchConfig) -> Value {
    run_node_peer(
        dir,
        &[
            ("SAMPLES", config.latency_samples.to_string()),
            ("SECONDS", config.throughput_secs.to_string()),
            ("OFFLINE", config.offline_changes.to_string()),
        ],
    )
}

/// Runs `bench.mjs` of a comparison peer installed in `dir` with `env`; its last stdout line is
/// its JSON report.
fn run_node_peer(dir: &Path, env: &[(&str, String)]) -> Value {
    let dir = match dir.canonicalize() {
        Ok(dir) => dir,
        Err(e) => return json!({ "error": format!("{}: {e}", dir.display()) }),
    };
    if !dir.join("node_modules").exists() {
        return json!({ "error": format!("run `npm install` in {} first", dir.display()) });
    }
    let output = Command::new("node")
        .arg(dir.join("bench.mjs"))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(&dir)
        .stderr(Stdio::inherit())
        .output();
    match output {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or_else(|| json!({ "error": "no JSON line from bench.mjs" })),
        Ok(out) => {
            json!({ "error": format!("bench.mjs failed: {}", String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")) })
        }
        Err(e) => json!({ "error": format!("cannot run node: {e}") }),
    }
}
