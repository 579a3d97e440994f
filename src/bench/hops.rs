//! Where the time of one live change goes, and the machine's floor for the same hops: the
//! `hops` figures of `devicelink bench`.
//!
//! - The breakdown: two agents whose logs record each hop ([`crate::hops`]); an app writes one
//!   change at a time on A and waits for it on B, as in the latency figure. Each change's
//!   stamps (the app's, then A's `request`, `applied`, `sent`, B's `received`,
//!   `applied_from_peer`, `to_app`, then the app's again) give the time of each hop. Writing the
//!   log lines costs a few microseconds per stamp, so this run is apart from the headline
//!   latency and its own total is reported next to the hops.
//! - The floor: the same three sockets with nothing done between them (app -> Unix socket ->
//!   thread -> TCP on loopback -> thread -> Unix socket -> app), one message at a time.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{syncing, trusted_pair, wait_for, AgentProc, BenchError};
use crate::client::{Client, ClientError};
use crate::hops::unix_us;
use crate::ipc::Event;

/// The document the breakdown writes.
const DOC: &str = "hops";
/// Changes made before the counted ones (connections and caches warm).
const WARMUP: usize = 50;
/// A message of the floor's chain: about one small change's request.
const FLOOR_MESSAGE: usize = 96;

/// The hops of a change, each from one stamp to the next: `(name, stage it ends at)`. The
/// first starts at the app's write; `None` ends at the app seeing the change.
const HOPS: [(&str, Option<&str>); 7] = [
    ("app_to_agent", Some("request")),
    ("apply_on_sender", Some("applied")),
    ("send", Some("sent")),
    ("wire", Some("received")),
    ("apply_on_receiver", Some("applied_from_peer")),
    ("to_app_queue", Some("to_app")),
    ("agent_to_app", None),
];

/// Runs the breakdown and the floor; returns `{"breakdown": .., "floor": ..}`.
pub(super) async fn run(samples: usize) -> Result<Value, BenchError> {
    let breakdown = breakdown(samples).await?;
    let floor = tokio::task::spawn_blocking(move || floor(samples))
        .await
        .map_err(|e| BenchError::Spawn(format!("the floor's threads: {e}")))??;
    Ok(json!({ "breakdown": breakdown, "floor": floor }))
}

async fn breakdown(samples: usize) -> Result<Value, BenchError> {
    let exe = std::env::current_exe()?;
    let root = tempfile::tempdir()?;
    let (da, db) = trusted_pair(root.path(), "a", "b")?;
    let (log_a, log_b) = (root.path().join("a.log"), root.path().join("b.log"));
    let filter = format!("warn,{}=trace", crate::hops::TARGET);
    let listen = "/ip4/127.0.0.1/tcp/0";
    let a = AgentProc::start_logging(&exe, &da, listen, &[], Some((&log_a, &filter)))?;
    let b = AgentProc::start_logging(&exe, &db, listen, &[&a.addr], Some((&log_b, &filter)))?;
    let ca = Client::connect(&a.socket).await?;
    let cb = Client::connect(&b.socket).await?;
    wait_for("the first session", || syncing(&ca)).await?;
    let mut events = cb
        .take_events()
        .ok_or_else(|| BenchError::Spawn("events taken".into()))?;
    cb.subscribe(DOC).await?;
    let mut windows = Vec::with_capacity(samples);
    for i in 0..WARMUP + samples {
        let sent = unix_us();
        let write = ca.doc_set(DOC, "m", "k", json!(i));
        let seen = async {
            loop {
                match events.recv().await {
                    Some(Event::Update { .. }) => return Ok(unix_us()),
                    Some(_) => continue,
                    None => return Err(ClientError::Closed),
                }
            }
        };
        let (written, seen) =
            tokio::join!(write, tokio::time::timeout(Duration::from_secs(10), seen));
        written?;
        let seen =
            seen.map_err(|_| BenchError::Timeout("a live update", Duration::from_secs(10)))??;
        if i >= WARMUP {
            windows.push((sent, seen));
        }
    }
    drop((events, ca, cb, a, b));
    let stamps = [read_stamps(&log_a)?, read_stamps(&log_b)?].concat();
    Ok(hop_times(&windows, &stamps))
}

/// The hop stamps of [`DOC`] in an agent's log, in order: `(stage, at_us)`.
fn read_stamps(log: &Path) -> Result<Vec<(String, u64)>, BenchError> {
    Ok(std::fs::read_to_string(log)?
        .lines()
        .filter_map(crate::hops::parse)
        .filter(|(_, doc, _)| *doc == DOC)
        .map(|(stage, _, at)| (stage.to_string(), at))
        .collect())
}

/// Per-hop times of the changes whose every stamp falls inside their window (the app's write
/// to the app seeing it: one change at a time, so the windows do not overlap).
fn hop_times(windows: &[(u64, u64)], stamps: &[(String, u64)]) -> Value {
    let mut per_hop: Vec<Vec<u64>> = vec![Vec::new(); HOPS.len()];
    let mut totals = Vec::new();
    for &(sent, seen) in windows {
        let at = |stage: &str| {
            stamps
                .iter()
                .find(|(s, at)| s == stage && (sent..=seen).contains(at))
                .map(|(_, at)| *at)
        };
        let ends: Option<Vec<u64>> = HOPS
            .iter()
            .map(|(_, stage)| stage.map_or(Some(seen), at))
            .collect();
        let Some(ends) = ends else { continue };
        let mut start = sent;
        for (i, end) in ends.into_iter().enumerate() {
            per_hop[i].push(end.saturating_sub(start));
            start = end.max(start);
        }
        totals.push(seen - sent);
    }
    let p50: serde_json::Map<String, Value> = HOPS
        .iter()
        .zip(&mut per_hop)
        .map(|((name, _), times)| (name.to_string(), json!(percentile_us(times, 0.5))))
        .collect();
    json!({
        "samples": totals.len(),
        "samples_without_every_stamp": windows.len() - totals.len(),
        "p50_us": p50,
        "traced_total_p50_us": percentile_us(&mut totals, 0.5),
        "traced_total_p99_us": percentile_us(&mut totals, 0.99),
    })
}

/// The `p` quantile of `times` (sorted here), null when there are none.
fn percentile_us(times: &mut [u64], p: f64) -> Value {
    if times.is_empty() {
        return Value::Null;
    }
    times.sort_unstable();
    json!(times[((times.len() - 1) as f64 * p).round() as usize])
}

/// The same three sockets as a change's path, nothing done between them: one message at a
/// time from the app's end through both to the app's other end.
fn floor(samples: usize) -> Result<Value, BenchError> {
    let (mut app_out, a_in) = UnixStream::pair()?;
    let (b_out, mut app_in) = UnixStream::pair()?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let a_out = std::net::TcpStream::connect(listener.local_addr()?)?;
    let (b_in, _) = listener.accept()?;
    a_out.set_nodelay(true)?;
    b_in.set_nodelay(true)?;
    let count = WARMUP + samples;
    // Each hop thread reads a message, stamps it and passes it on.
    let forward = |mut from: Box<dyn Read + Send>, mut to: Box<dyn Write + Send>| {
        std::thread::spawn(move || -> std::io::Result<Vec<Instant>> {
            let mut stamps = Vec::with_capacity(count);
            let mut message = [0u8; FLOOR_MESSAGE];
            for _ in 0..count {
                from.read_exact(&mut message)?;
                stamps.push(Instant::now());
                to.write_all(&message)?;
            }
            Ok(stamps)
        })
    };
    let hop_a = forward(Box::new(a_in), Box::new(a_out));
    let hop_b = forward(Box::new(b_in), Box::new(b_out));
    let mut app = Vec::with_capacity(count);
    let mut message = [7u8; FLOOR_MESSAGE];
    for _ in 0..count {
        let sent = Instant::now();
        app_out.write_all(&message)?;
        app_in.read_exact(&mut message)?;
        app.push((sent, Instant::now()));
    }
    let joined = |hop: std::thread::JoinHandle<std::io::Result<Vec<Instant>>>| {
        hop.join()
            .map_err(|_| BenchError::Spawn("a floor thread panicked".into()))?
            .map_err(BenchError::Io)
    };
    let (at_a, at_b) = (joined(hop_a)?, joined(hop_b)?);
    let us = |from: Instant, to: Instant| to.saturating_duration_since(from).as_micros() as u64;
    let (mut to_a, mut wire, mut to_app, mut total) = (vec![], vec![], vec![], vec![]);
    for i in WARMUP..count {
        let (sent, seen) = app[i];
        to_a.push(us(sent, at_a[i]));
        wire.push(us(at_a[i], at_b[i]));
        to_app.push(us(at_b[i], seen));
        total.push(us(sent, seen));
    }
    Ok(json!({
        "samples": samples,
        "p50_us": {
            "app_to_agent": percentile_us(&mut to_a, 0.5),
            "wire": percentile_us(&mut wire, 0.5),
            "agent_to_app": percentile_us(&mut to_app, 0.5),
        },
        "total_p50_us": percentile_us(&mut total.clone(), 0.5),
        "total_p99_us": percentile_us(&mut total, 0.99),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamps(list: &[(&str, u64)]) -> Vec<(String, u64)> {
        list.iter().map(|(s, at)| (s.to_string(), *at)).collect()
    }

    #[test]
    fn hops_are_measured_between_stamps_inside_each_window() {
        let all = stamps(&[
            ("request", 110),
            ("applied", 120),
            ("sent", 140),
            ("received", 170),
            ("applied_from_peer", 180),
            ("to_app", 185),
            // The second change lost its `sent` stamp: not counted.
            ("request", 1010),
            ("applied", 1020),
            ("received", 1070),
            ("applied_from_peer", 1080),
            ("to_app", 1085),
        ]);
        let times = hop_times(&[(100, 200), (1000, 1100)], &all);
        assert_eq!(times["samples"], 1);
        assert_eq!(times["samples_without_every_stamp"], 1);
        assert_eq!(
            times["p50_us"],
            json!({"app_to_agent": 10, "apply_on_sender": 10, "send": 20, "wire": 30,
                   "apply_on_receiver": 10, "to_app_queue": 5, "agent_to_app": 15})
        );
        assert_eq!(times["traced_total_p50_us"], 100);
    }

    #[test]
    fn the_floor_passes_every_message_through_both_hops() {
        let floor = floor(20).unwrap();
        assert_eq!(floor["samples"], 20);
        let total = floor["total_p50_us"].as_u64().unwrap();
        let hops: u64 = ["app_to_agent", "wire", "agent_to_app"]
            .iter()
            .map(|h| floor["p50_us"][h].as_u64().unwrap())
            .sum();
        assert!(total > 0 && hops > 0, "{floor}");
    }
}
