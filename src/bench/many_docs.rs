//! The many-documents and large-document figures of `devicelink bench`: N documents of one key
//! (create rate, restart, idle memory, first sync to a new device, one changed document after a
//! reconnect with the bytes it cost) and one large document's first sync, all through agent
//! processes on loopback and their IPC sockets. Optionally beside automerge-repo on the same
//! workload (bench/automerge/).

use std::path::Path;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use serde_json::{json, Value};

use super::{proc_usage, trusted_pair, wait_for_every, AgentProc, BenchConfig, BenchError};
use crate::client::Client;

/// Requests in flight while creating documents.
const WINDOW: usize = 512;
/// How often progress is polled (every poll is a `status` request the agents answer).
const POLL: Duration = Duration::from_millis(5);

fn mb(kib: u64) -> f64 {
    (kib as f64 / 1024.0 * 10.0).round() / 10.0
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

/// This device's status entry for its (only) peer.
async fn peer(client: &Client) -> Value {
    client
        .status()
        .await
        .ok()
        .and_then(|s| s["peers"].as_array().and_then(|p| p.first().cloned()))
        .unwrap_or(Value::Null)
}

async fn docs_stored(client: &Client) -> u64 {
    client
        .status()
        .await
        .map(|s| s["docs"].as_u64().unwrap_or(0))
        .unwrap_or(0)
}

/// Samples the peak RSS (KiB) of `pids` until `stop` is set.
fn rss_sampler(
    pids: Vec<u32>,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    tokio::task::JoinHandle<u64>,
) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let task = tokio::spawn(async move {
        let mut peak = 0;
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            for pid in &pids {
                peak = peak.max(proc_usage(*pid).1);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        peak
    });
    (stop, task)
}

/// Runs the many-documents and large-document workloads.
pub(super) async fn run(config: &BenchConfig) -> Result<Value, BenchError> {
    let exe = std::env::current_exe()?;
    let root = tempfile::tempdir()?;
    let (da, db) = trusted_pair(root.path(), "a", "b")?;
    let n = config.docs;

    // Create N documents of one key, pipelined through IPC.
    let a = AgentProc::start(&exe, &da, "/ip4/127.0.0.1/tcp/0", &[])?;
    let ca = Client::connect(&a.socket).await?;
    let created = Instant::now();
    let names: Vec<String> = (0..n).map(|i| format!("doc/{i:06}")).collect();
    let mut in_flight = FuturesUnordered::new();
    let mut sent = 0;
    while sent < n || !in_flight.is_empty() {
        while sent < n && in_flight.len() < WINDOW {
            in_flight.push(ca.doc_set(&names[sent], "m", "k", json!(sent)));
            sent += 1;
        }
        if let Some(result) = in_flight.next().await {
            result?;
        }
    }
    drop(in_flight);
    let create_time = created.elapsed();
    let a_addr = a.addr.clone();
    drop(ca);
    a.stop();

    // Restart to ready: the socket answers a status request.
    let restarted = Instant::now();
    let a = AgentProc::start(&exe, &da, &a_addr, &[])?;
    let ca = Client::connect(&a.socket).await?;
    ca.status().await?;
    let restart_time = restarted.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (_, rss_idle) = proc_usage(a.pid());

    // First sync of N documents to a new device.
    let (stop, peak) = rss_sampler(vec![a.pid()]);
    let first_start = Instant::now();
    let b = AgentProc::start(&exe, &db, "/ip4/127.0.0.1/tcp/0", &[&a_addr])?;
    let (stop_b, peak_b) = rss_sampler(vec![b.pid()]);
    let cb = Client::connect(&b.socket).await?;
    let first_done = wait_for_every(POLL, "the first sync of many documents", || async {
        docs_stored(&cb).await >= n as u64 && peer(&cb).await["caught_up"] == true
    })
    .await?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    stop_b.store(true, std::sync::atomic::Ordering::Relaxed);
    let (rss_sync_a, rss_sync_b) = (peak.await.unwrap_or(0), peak_b.await.unwrap_or(0));
    // Marks (every 250 ms) let each side hold the other's checkpoint.
    tokio::time::sleep(Duration::from_secs(1)).await;

    // One document changes while B is off; B restarts and gets it through the changed-only path.
    let b_addr = b.addr.clone();
    drop(cb);
    b.stop();
    ca.doc_set("doc/000042", "m", "k", json!("changed")).await?;
    let b_restarted = Instant::now();
    let b = AgentProc::start(&exe, &db, &b_addr, &[&a_addr])?;
    let cb = Client::connect(&b.socket).await?;
    let connected = wait_for_every(POLL, "b to reconnect", || async {
        peer(&cb).await["syncing"] == true
    })
    .await?;
    let changed = wait_for_every(POLL, "the changed document", || async {
        cb.doc_get("doc/000042")
            .await
            .is_ok_and(|d| d["m"]["k"] == "changed")
    })
    .await?;
    wait_for_every(POLL, "b to catch up", || async {
        peer(&cb).await["caught_up"] == true
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reconnect = peer(&cb).await;
    drop(cb);
    drop(b);
    drop(ca);
    drop(a);

    let large = large_doc(&exe, root.path(), config.large_doc_mb).await?;
    let ours = json!({
        "docs": n,
        "create_docs_per_s": (n as f64 / create_time.as_secs_f64()).round(),
        "restart_to_ready_ms": ms(restart_time),
        "rss_idle_after_restart_mb": mb(rss_idle),
        "first_sync_s": ((first_done - first_start).as_secs_f64() * 100.0).round() / 100.0,
        "rss_during_first_sync_mb": mb(rss_sync_a.max(rss_sync_b)),
        "one_changed_after_reconnect_ms": ms(changed.saturating_duration_since(connected)),
        "one_changed_after_restart_ms": ms(changed - b_restarted),
        "one_changed_reconnect_bytes": reconnect["bytes_in"].as_u64().unwrap_or(0) + reconnect["bytes_out"].as_u64().unwrap_or(0),
        "one_changed_reconnect_docs_listed": reconnect["docs_total"],
        "large_doc_mb": config.large_doc_mb,
        "large_doc_first_sync_s": large["first_sync_s"],
        "rss_large_doc_mb": large["rss_mb"],
        "rss_large_doc_sender_before_mb": large["rss_sender_before_mb"],
        "rss_large_doc_sender_mb": large["rss_sender_mb"],
        "rss_large_doc_receiver_mb": large["rss_receiver_mb"],
    });
    let automerge = match &config.automerge_dir {
        Some(dir) => run_automerge(dir, config),
        None => json!({ "skipped": "run with --automerge DIR (see bench/automerge/README.md)" }),
    };
    let ratios = super::ratios(
        &ours,
        &automerge,
        &[
            (
                "create_docs_per_s",
                "create_docs_per_s",
                "create_docs_per_s",
            ),
            (
                "rss_idle",
                "rss_idle_after_restart_mb",
                "rss_idle_mb_after_restart",
            ),
            ("first_sync", "first_sync_s", "first_sync_s"),
            (
                "one_changed_after_reconnect",
                "one_changed_after_reconnect_ms",
                "one_changed_after_reconnect_ms",
            ),
            (
                "one_changed_reconnect_bytes",
                "one_changed_reconnect_bytes",
                "one_changed_reconnect_bytes",
            ),
            (
                "large_doc_first_sync",
                "large_doc_first_sync_s",
                "large_doc_first_sync_s",
            ),
        ],
    );
    Ok(
        json!({ "devicelink": ours, "automerge_repo": automerge, "ratio_devicelink_over_automerge": ratios }),
    )
}

/// First sync of one `mb`-MiB document (map values of 4 MiB) to a new device.
async fn large_doc(exe: &Path, root: &Path, size_mb: usize) -> Result<Value, BenchError> {
    if size_mb == 0 {
        return Ok(json!({ "first_sync_s": null, "rss_mb": null }));
    }
    let (dd, de) = trusted_pair(root, "d", "e")?;
    let d = AgentProc::start(exe, &dd, "/ip4/127.0.0.1/tcp/0", &[])?;
    let cd = Client::connect(&d.socket).await?;
    let piece = "x".repeat(4 << 20);
    for i in 0..size_mb.div_ceil(4) {
        cd.doc_set("large", "m", &format!("k{i}"), json!(piece))
            .await?;
    }
    // The sender as after a restart: what sending costs, not what writing 100 MB through IPC
    // left in its allocator (measured: ~490 MB before the transfer started).
    drop(cd);
    d.stop();
    let d = AgentProc::start(exe, &dd, "/ip4/127.0.0.1/tcp/0", &[])?;
    let cd = Client::connect(&d.socket).await?;
    let target = super::state_vector(&cd, "large").await;
    let (_, rss_before) = proc_usage(d.pid());
    let (stop, peak) = rss_sampler(vec![d.pid()]);
    let start = Instant::now();
    let e = AgentProc::start(exe, &de, "/ip4/127.0.0.1/tcp/0", &[&d.addr])?;
    let (stop_e, peak_e) = rss_sampler(vec![e.pid()]);
    let ce = Client::connect(&e.socket).await?;
    let done = wait_for_every(POLL, "the large document's first sync", || async {
        target.is_some() && super::state_vector(&ce, "large").await == target
    })
    .await?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    stop_e.store(true, std::sync::atomic::Ordering::Relaxed);
    let (sender, receiver) = (peak.await.unwrap_or(0), peak_e.await.unwrap_or(0));
    Ok(json!({
        "first_sync_s": ((done - start).as_secs_f64() * 100.0).round() / 100.0,
        "rss_mb": mb(sender.max(receiver)),
        "rss_sender_before_mb": mb(rss_before),
        "rss_sender_mb": mb(sender),
        "rss_receiver_mb": mb(receiver),
    }))
}

/// Runs automerge-repo on the same workload (node + bench/automerge, installed in `dir`).
fn run_automerge(dir: &Path, config: &BenchConfig) -> Value {
    super::run_node_peer(
        dir,
        &[
            ("DOCS", config.docs.to_string()),
            ("LARGE_MB", config.large_doc_mb.to_string()),
        ],
    )
}
