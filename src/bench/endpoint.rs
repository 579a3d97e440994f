//! The y-websocket endpoint figures of `devicelink bench --yjs DIR`: two y-websocket clients
//! (bench/yjs/endpoint.mjs), one on each of two linked agents, measure app-to-app latency of a
//! map change and of a presence change; then 50 more clients connect to one agent and its
//! memory is read before and after. The same script against the plain y-websocket server, in
//! the same run, gives the figures to compare with. Both sides run [`RUNS`] times, interleaved,
//! and the medians are reported: on a shared 2-core machine one run varies by ±30%.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use super::{proc_usage, syncing, trusted_pair, wait_for, AgentProc, BenchError};
use crate::client::Client;

/// Extra clients connected to one agent for the memory figure.
const CLIENTS: usize = 50;
/// Interleaved runs of each side.
const RUNS: usize = 5;

/// Runs both sides; returns `{"devicelink": .., "y_websocket": .., "ratio": ..}`.
pub(super) async fn run(yjs_dir: &Path, rounds: usize) -> Result<Value, BenchError> {
    let dir = yjs_dir.canonicalize()?;
    if !dir.join("node_modules").exists() {
        return Ok(json!({ "error": format!("run `npm install` in {} first", dir.display()) }));
    }
    let exe = std::env::current_exe()?;
    let root = tempfile::tempdir()?;
    let (da, db) = trusted_pair(root.path(), "a", "b")?;
    let a = AgentProc::start(&exe, &da, "/ip4/127.0.0.1/tcp/0", &[])?;
    let b = AgentProc::start(&exe, &db, "/ip4/127.0.0.1/tcp/0", &[&a.addr])?;
    let ca = Client::connect(&a.socket).await?;
    let cb = Client::connect(&b.socket).await?;
    wait_for("the first session", || syncing(&ca)).await?;
    let (_, token_a) = ca.app_add("bench", &[], &[], false).await?;
    let (_, token_b) = cb.app_add("bench", &[], &[], false).await?;
    let env = [
        ("WS_A", a.ws.clone()),
        ("WS_B", b.ws.clone()),
        ("TOKEN_A", token_a),
        ("TOKEN_B", token_b),
    ];
    let pid = a.pid();
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for run in 0..RUNS {
        // The memory figure once, in the first run.
        let clients = if run == 0 { CLIENTS } else { 0 };
        ours.push(run_script(&dir, &env, rounds, clients, Some(pid))?);
        theirs.push(run_script(&dir, &[], rounds, clients, None)?);
    }
    drop((ca, cb, a, b));
    let (ours, theirs) = (medians(ours), medians(theirs));
    let ratio = |key: &str, p: &str| match (ours[key][p].as_f64(), theirs[key][p].as_f64()) {
        (Some(o), Some(t)) if t > 0.0 => json!((o / t * 100.0).round() / 100.0),
        _ => Value::Null,
    };
    let ratios = json!({
        "latency_p50": ratio("latency_us", "p50"),
        "latency_p99": ratio("latency_us", "p99"),
        "presence_p50": ratio("presence_us", "p50"),
    });
    Ok(
        json!({ "devicelink": ours, "y_websocket": theirs, "ratio_devicelink_over_y_websocket": ratios }),
    )
}

/// Runs endpoint.mjs; with `agent`, reads that process's RSS before and after the extra
/// clients connect (the script measures the reference server's itself).
fn run_script(
    dir: &Path,
    env: &[(&str, String)],
    rounds: usize,
    clients: usize,
    agent: Option<u32>,
) -> Result<Value, BenchError> {
    let mut child = Command::new("node")
        .arg(dir.join("endpoint.mjs"))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("ROUNDS", rounds.to_string())
        .env("CLIENTS", clients.to_string())
        .env("DOC", "bench/endpoint")
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        return Err(BenchError::Spawn("node has no stdio".into()));
    };
    let (mut rss_before, mut rss_after) = (None, None);
    let mut last = Value::Null;
    for line in BufReader::new(stdout).lines() {
        let line: Value = serde_json::from_str(&line?).unwrap_or(Value::Null);
        if let Some(open) = line["clients_open"].as_u64() {
            let rss = agent.map(|pid| proc_usage(pid).1);
            if open == 0 {
                rss_before = rss;
            } else {
                rss_after = rss;
            }
            writeln!(stdin, "go")?;
            continue;
        }
        last = line;
    }
    let status = child.wait()?;
    if !status.success() || last.is_null() {
        return Ok(json!({ "error": format!("endpoint.mjs failed ({status})") }));
    }
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        let mb = |kib: u64| (kib as f64 / 1024.0 * 10.0).round() / 10.0;
        last["server_rss_before_mb"] = json!(mb(before));
        last["server_rss_mb"] = json!(mb(after));
    }
    if let (Some(before), Some(after)) = (
        last["server_rss_before_mb"].as_f64(),
        last["server_rss_mb"].as_f64(),
    ) {
        last["rss_added_by_clients_mb"] = json!(((after - before) * 10.0).round() / 10.0);
    }
    Ok(last)
}

/// The first run's report (with the memory figures), its latency and presence percentiles
/// replaced by the medians over all runs; `runs` keeps every run's p50s.
fn medians(runs: Vec<Value>) -> Value {
    let mut report = runs.first().cloned().unwrap_or(Value::Null);
    if report.get("error").is_some() {
        return report;
    }
    for key in ["latency_us", "presence_us"] {
        for p in ["p50", "p99"] {
            let mut values: Vec<f64> = runs.iter().filter_map(|r| r[key][p].as_f64()).collect();
            values.sort_by(f64::total_cmp);
            if let Some(median) = values.get(values.len() / 2) {
                report[key][p] = json!(median);
            }
        }
        report[key]["p50_each_run"] = json!(runs
            .iter()
            .map(|r| r[key]["p50"].clone())
            .collect::<Vec<_>>());
    }
    report["runs"] = json!(runs.len());
    report
}
