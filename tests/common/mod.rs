//! Helpers shared by the integration tests: agents on 127.0.0.1 in temp dirs, bounded waits.
#![allow(dead_code)]

pub mod netns;
pub mod node;
pub mod process;
pub mod raw_peer;

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use devicelink::{Agent, AgentConfig, AgentHandle, DocHandle};

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Starts an agent on 127.0.0.1 (ephemeral port) with its data in `dir`.
pub async fn start(dir: &Path, name: &str) -> AgentHandle {
    init_tracing();
    let mut config = AgentConfig::new(dir);
    config.device_name = name.to_string();
    Agent::start(config).await.expect("agent starts")
}

/// Makes `a` and `b` trust each other, and has `a` dial `b`.
pub fn link(a: &AgentHandle, b: &AgentHandle) {
    a.trust_add(b.device_id(), b.device_name()).unwrap();
    b.trust_add(a.device_id(), a.device_name()).unwrap();
    a.dial(b.listen_addrs()[0].clone()).unwrap();
}

/// Polls `cond` every 10 ms until it holds; panics with `what` after `limit`.
pub async fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Same as `wait_until`, with an async condition.
pub async fn wait_until_async<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Two replicas hold the same document: same state vector, delete set and content (see
/// `devicelink::convergence`; encodings may differ in how items are squashed).
pub fn same_state(a: &DocHandle, b: &DocHandle) -> bool {
    devicelink::convergence::compare(a.yrs_doc(), b.yrs_doc()).is_ok()
}

/// Asserts that two replicas converged, naming the first difference.
pub fn assert_identical(a: &DocHandle, b: &DocHandle) {
    if let Err(divergence) = devicelink::convergence::compare(a.yrs_doc(), b.yrs_doc()) {
        panic!("{}: {divergence}", a.name());
    }
}

/// Asserts that `doc` holds the same document as `state` (an encoded state taken earlier, on
/// this device or another), by the convergence rule, not byte for byte: a reload from a snapshot
/// may squash items differently.
pub fn assert_same_as_state(doc: &DocHandle, state: &[u8], what: &str) {
    use yrs::updates::decoder::Decode;
    use yrs::Transact;
    let earlier = yrs::Doc::new();
    let update = yrs::Update::decode_v1(state).expect("an encoded state");
    earlier
        .transact_mut()
        .apply_update(update)
        .expect("an encoded state applies");
    if let Err(divergence) = devicelink::convergence::compare(doc.yrs_doc(), &earlier) {
        panic!("{what}: {divergence}");
    }
}

pub const LIMIT: Duration = Duration::from_secs(20);

/// Resident memory of process `pid`, in KiB (0 if it cannot be read).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
}

/// Tiny deterministic generator (xorshift64*) for randomized tests; the seed is printed and
/// `DEVICELINK_SEED` replays a run.
pub struct Rng(pub u64);

impl Rng {
    pub fn seeded(test: &str) -> Self {
        let seed = std::env::var("DEVICELINK_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            })
            | 1;
        println!("{test}: seed {seed} (replay with DEVICELINK_SEED={seed})");
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}
