//! The Rust in-process figure that `bindings/python/latency.py` compares with: two agents in
//! one process, linked over 127.0.0.1; a change on A to B's subscription, p50/p99.
//!
//! Run with `cargo run --release --example embedded_latency [SAMPLES]`.

use std::time::{Duration, Instant};

use devicelink::{Agent, AgentConfig, Origin};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let samples: usize = std::env::args().nth(1).map_or(Ok(500), |s| s.parse())?;
    let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let a = Agent::start(AgentConfig::new(dir_a.path())).await?;
    let b = Agent::start(AgentConfig::new(dir_b.path())).await?;
    a.trust_add(b.device_id(), "b")?;
    b.trust_add(a.device_id(), "a")?;
    a.dial(b.listen_addrs()[0].clone())?;
    let (on_a, on_b) = (a.open_doc("latency")?, b.open_doc("latency")?);
    let mut changes = on_b.subscribe();
    let mut times = Vec::with_capacity(samples);
    for i in 0..samples + 20 {
        let start = Instant::now();
        on_a.set_map_value("m", "k", i as f64).await?;
        loop {
            let change = tokio::time::timeout(Duration::from_secs(10), changes.recv()).await??;
            if change.origin == Origin::Peer(a.device_id()) {
                break;
            }
        }
        if i >= 20 {
            times.push(start.elapsed().as_secs_f64() * 1000.0);
        }
    }
    times.sort_by(f64::total_cmp);
    println!(
        "{{\"samples\":{samples},\"p50_ms\":{:.3},\"p99_ms\":{:.3}}}",
        times[times.len() / 2],
        times[(times.len() * 99 / 100).min(times.len() - 1)]
    );
    a.shutdown().await?;
    b.shutdown().await?;
    Ok(())
}
