//! What a blind always-on device adds to a live update, against a full member in its place:
//! a laptop and a phone that reach each other only through the always-on device (restarted
//! without listeners after pairing, so neither can dial the other), in one process over
//! 127.0.0.1. A change on the laptop until the phone's document has it, p50/p99, per kind.
//!
//! Run with `cargo run --release --example blind_latency [SAMPLES]`.

use std::path::Path;
use std::time::{Duration, Instant};

use devicelink::{Agent, AgentConfig, AgentHandle};

async fn start(
    dir: &Path,
    blind: bool,
    listen: bool,
    peers: Vec<devicelink::Multiaddr>,
) -> AgentHandle {
    let mut config = AgentConfig::new(dir);
    config.blind = blind;
    config.peers = peers;
    if !listen {
        config.listen = Vec::new();
    }
    Agent::start(config).await.expect("agent starts")
}

/// `joiner` joins a code `host` opens.
async fn pair(host: &AgentHandle, joiner: &AgentHandle) {
    let (code, _) = host
        .devices()
        .pair_open(Duration::from_secs(60))
        .await
        .unwrap();
    let addr = host.listen_addrs()[0].clone();
    joiner.devices().pair_join(&code, Some(addr)).await.unwrap();
}

async fn measure(blind: bool, samples: usize) -> (f64, f64) {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let always_on = start(dirs[0].path(), blind, true, Vec::new()).await;
    let laptop = start(dirs[1].path(), false, true, Vec::new()).await;
    let phone = start(dirs[2].path(), false, true, Vec::new()).await;
    pair(&always_on, &laptop).await;
    pair(&laptop, &phone).await;
    tokio::time::sleep(Duration::from_secs(2)).await; // the group reaches everyone
    laptop.shutdown().await.unwrap();
    phone.shutdown().await.unwrap();
    drop((laptop, phone));
    let via = vec![always_on.listen_addrs()[0].clone()];
    let laptop = start(dirs[1].path(), false, false, via.clone()).await;
    let phone = start(dirs[2].path(), false, false, via).await;
    let (on_laptop, on_phone) = (
        laptop.open_doc("latency").unwrap(),
        phone.open_doc("latency").unwrap(),
    );
    let mut times = Vec::with_capacity(samples);
    for i in 0..samples + 20 {
        let start = Instant::now();
        on_laptop.set_map_value("m", "k", i as f64).await.unwrap();
        let deadline = start + Duration::from_secs(20);
        while on_phone.map_value_json("m", "k").as_f64() != Some(i as f64) {
            if Instant::now() > deadline {
                for agent in [&laptop, &phone, &always_on] {
                    let status = agent.status().unwrap();
                    eprintln!("{}", serde_json::to_string(&status.peers).unwrap());
                }
                panic!("the phone never got change {i}");
            }
            tokio::time::sleep(Duration::from_micros(50)).await;
        }
        if i >= 20 {
            times.push(start.elapsed().as_secs_f64() * 1000.0);
        }
    }
    assert!(
        !laptop.is_syncing_with(&phone.device_id()),
        "the two were linked directly"
    );
    times.sort_by(f64::total_cmp);
    for agent in [laptop, phone, always_on] {
        agent.shutdown().await.unwrap();
    }
    (
        times[times.len() / 2],
        times[(times.len() * 99 / 100).min(times.len() - 1)],
    )
}

#[tokio::main]
async fn main() {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let samples: usize = std::env::args()
        .nth(1)
        .map_or(200, |s| s.parse().expect("SAMPLES is a number"));
    let (full_p50, full_p99) = measure(false, samples).await;
    let (blind_p50, blind_p99) = measure(true, samples).await;
    println!(
        "{{\"samples\":{samples},\"full_member_p50_ms\":{full_p50:.3},\"full_member_p99_ms\":{full_p99:.3},\"blind_p50_ms\":{blind_p50:.3},\"blind_p99_ms\":{blind_p99:.3}}}"
    );
}
