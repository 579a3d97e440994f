//! Soak: two linked agents keep syncing for a minute while agent A is under every pressure of the
//! hardening review at once: an IPC subscriber that never reads, a stranger reconnecting with a
//! new identity again and again, and 1,000 half-open TCP connections. Checks that neither agent's
//! memory grows past a stated bound and that trusted sync stays fast.
//!
//! Ignored in the normal run (it takes a minute): `just soak`, or
//! `cargo test --release --test soak -- --ignored --nocapture`. `DEVICELINK_SOAK_SECS` changes
//! the duration.

mod common;

use std::time::{Duration, Instant};

use common::process::AgentProcess;
use common::*;
use devicelink::ipc::Event;
use serde_json::json;
use tokio::io::AsyncWriteExt;

/// Most RSS either agent may reach during the soak, in MiB.
const RSS_BOUND_MIB: u64 = 160;
/// Trusted app-to-app latency (write on A, event on B) that 99% of changes must beat.
const P99_BOUND: Duration = Duration::from_millis(10);

fn rss_mib(pid: u32) -> u64 {
    rss_kib(pid) / 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a minute long: run with `just soak`"]
async fn slow_reader_stranger_and_half_open_connections_at_once() {
    let secs: u64 = std::env::var("DEVICELINK_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = AgentProcess::linked_pair(da.path(), db.path());
    let (pid_a, pid_b) = (a.child.id(), b.child.id());
    let client_a = a.client().await;
    let client_b = b.client().await;
    let mut events = client_b.take_events().unwrap();
    client_b.subscribe("soak").await.unwrap();
    // The link is up once a first change arrives.
    client_a.doc_set("soak", "m", "k", json!(-1)).await.unwrap();
    tokio::time::timeout(LIMIT, events.recv())
        .await
        .expect("linked")
        .unwrap();
    let start_rss = (rss_mib(pid_a), rss_mib(pid_b));

    // 1. A subscriber on A that never reads.
    let mut slow = tokio::net::UnixStream::connect(&a.socket).await.unwrap();
    slow.write_all(b"{\"id\":1,\"op\":\"doc_subscribe\",\"doc\":\"soak\"}\n")
        .await
        .unwrap();
    // 2. 1,000 half-open connections to A's libp2p port, held for the whole soak.
    let port: u16 = a.addr.rsplit('/').next().unwrap().parse().unwrap();
    let mut half_open = Vec::new();
    for _ in 0..1000 {
        if let Ok(s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            half_open.push(s);
        }
    }
    // 3. A stranger reconnecting with a new identity every 50 ms (and reopening half-open
    // connections as the agent drops them).
    let deadline = Instant::now() + Duration::from_secs(secs);
    let (a_id, a_addr): (devicelink::PeerId, libp2p::Multiaddr) =
        (a.device_id.parse().unwrap(), a.addr.parse().unwrap());
    let stranger = tokio::spawn(async move {
        let mut visits = 0u64;
        while Instant::now() < deadline {
            let keypair = libp2p::identity::Keypair::generate_ed25519();
            let peer = tokio::time::timeout(
                Duration::from_secs(2),
                common::raw_peer::raw_peer_dialing(keypair, a_id, a_addr.clone()),
            )
            .await;
            drop(peer);
            visits += 1;
            if half_open.len() < 1000 {
                if let Ok(s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                    half_open.push(s);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        visits
    });

    // Meanwhile: trusted sync, measured app to app.
    let mut latencies = Vec::new();
    let mut peak = start_rss;
    let mut i = 0i64;
    let filler = "s".repeat(4096);
    while Instant::now() < deadline {
        let sent = Instant::now();
        // 4 KiB per change, so the subscriber that never reads passes its 8 MiB queue bound.
        client_a
            .doc_set("soak", "m", "k", json!(format!("{i}:{filler}")))
            .await
            .unwrap();
        loop {
            let event = tokio::time::timeout(LIMIT, events.recv())
                .await
                .expect("the change reaches b")
                .unwrap();
            if let Event::Update { .. } = event {
                break;
            }
        }
        latencies.push(sent.elapsed());
        if i % 50 == 0 {
            peak = (peak.0.max(rss_mib(pid_a)), peak.1.max(rss_mib(pid_b)));
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let visits = stranger.await.unwrap();
    drop(slow);
    latencies.sort();
    let pct = |p: usize| latencies[(latencies.len() * p / 100).min(latencies.len() - 1)];
    let status = client_a.status().await.unwrap();
    println!(
        "soak {secs} s: {} changes, p50 {:?}, p99 {:?}, max {:?}; RSS A {} -> peak {} MiB, B {} -> peak {} MiB; {visits} stranger visits; A lists {} peers ({} others)",
        latencies.len(),
        pct(50),
        pct(99),
        latencies.last().unwrap(),
        start_rss.0,
        peak.0,
        start_rss.1,
        peak.1,
        status["peers"].as_array().map_or(0, Vec::len),
        status["others"]
    );
    assert!(
        peak.0 <= RSS_BOUND_MIB && peak.1 <= RSS_BOUND_MIB,
        "RSS peaked at {peak:?} MiB"
    );
    assert!(pct(99) < P99_BOUND, "p99 {:?}", pct(99));
    assert!(
        status["peers"].as_array().map_or(0, Vec::len) <= 1 + devicelink::status::MAX_STRANGERS
    );
}
