//! Two agents embedded in one process, linked over 127.0.0.1, syncing a document.
//!
//! Run with `cargo run --example embedded`.

use std::time::{Duration, Instant};

use devicelink::{Agent, AgentConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let a = Agent::start(AgentConfig::new(dir_a.path())).await?;
    let b = Agent::start(AgentConfig::new(dir_b.path())).await?;
    a.trust_add(b.device_id(), "b")?;
    b.trust_add(a.device_id(), "a")?;
    a.dial(b.listen_addrs()[0].clone())?;

    let on_a = a.open_doc("todo")?;
    let on_b = b.open_doc("todo")?;
    let mut changes = on_b.subscribe();
    on_a.set_map_value("items", "milk", false).await?; // durable on A when this returns

    let started = Instant::now();
    let change = tokio::time::timeout(Duration::from_secs(10), changes.recv()).await??;
    println!(
        "B received {} bytes from {:?} after {:?}: {}",
        change.update.len(),
        change.origin,
        started.elapsed(),
        on_b.to_json()
    );
    a.shutdown().await?;
    b.shutdown().await?;
    Ok(())
}
