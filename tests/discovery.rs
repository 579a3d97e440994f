//! mDNS discovery between real agent processes, restricted to the loopback interface and
//! advertising 127.0.0.1 so no test traffic leaves the machine. Skips, saying why, where
//! multicast does not work; the direct-dial paths are covered in tests/pairing.rs.

mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::process::{stdout, AgentProcess};
use common::LIMIT;

const MDNS: &[&str] = &["--mdns-loopback"];

fn multicast_unavailable() -> Option<String> {
    devicelink::discovery::probe_multicast(Ipv4Addr::LOCALHOST).err()
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + LIMIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn status(agent: &AgentProcess) -> serde_json::Value {
    serde_json::from_str(&stdout(&agent.cli(&["status", "--json"]))).unwrap_or_default()
}

fn peer<'a>(status: &'a serde_json::Value, id: &str) -> Option<&'a serde_json::Value> {
    status["peers"]
        .as_array()?
        .iter()
        .find(|p| p["device_id"] == id)
}

/// Acceptance 1: agents find each other over mDNS, pair by code without any address, and after
/// a restart sync again without any `--peer` flag.
#[test]
fn agents_find_each_other_pair_and_resync_over_mdns() {
    if let Some(reason) = multicast_unavailable() {
        println!("SKIPPED: multicast is unavailable on loopback here: {reason}");
        return;
    }
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = AgentProcess::start_with(da.path(), &[], MDNS);
    let b = AgentProcess::start_with(db.path(), &[], MDNS);

    // Unpaired, they are only "nearby".
    wait_for("b to see a nearby", || {
        let peers = stdout(&b.cli(&["peers"]));
        peers
            .split("nearby, not paired:")
            .nth(1)
            .is_some_and(|n| n.contains(&a.device_id))
    });

    // Pair with nothing but the code: B finds A by the code's slot over mDNS.
    let mut host = std::process::Command::new(common::process::BIN)
        .arg("--socket")
        .arg(&a.socket)
        .args(["pair", "--expires", "60"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(host.stdout.take().unwrap()));
    let code = lines
        .next()
        .unwrap()
        .unwrap()
        .strip_prefix("pairing code: ")
        .unwrap()
        .to_string();
    let out = b.cli(&["pair", &code]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(host.wait().unwrap().success());

    // Restart both: new ports, no --peer; they must find each other again over mDNS.
    let (a_id, b_id) = (a.device_id.clone(), b.device_id.clone());
    a.kill9();
    b.kill9();
    let a = AgentProcess::start_with(da.path(), &[], MDNS);
    let b = AgentProcess::start_with(db.path(), &[], MDNS);
    assert!(a
        .cli(&["doc", "set", "notes", "m", "k", "\"over mdns\""])
        .status
        .success());
    wait_for("b to receive a's change with no --peer", || {
        let out = b.cli(&["doc", "get", "notes"]);
        serde_json::from_str::<serde_json::Value>(&stdout(&out)).unwrap_or_default()["m"]["k"]
            == "over mdns"
    });
    let s = status(&b);
    let via = peer(&s, &a_id).expect("a in b's status")["found_via"].to_string();
    assert!(
        via.contains("mdns")
            || peer(&status(&a), &b_id).unwrap()["found_via"]
                .to_string()
                .contains("mdns"),
        "{via}"
    );
}

/// A spoofed announcement (a trusted device's id, an untrusted agent's address) cannot make an
/// agent trust or sync with the impostor: the dial names the claimed id and Noise refuses.
#[test]
fn spoofed_announcements_cannot_poison_the_trust_store() {
    if let Some(reason) = multicast_unavailable() {
        println!("SKIPPED: multicast is unavailable on loopback here: {reason}");
        return;
    }
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = AgentProcess::start(dirs[0].path(), &[]);
    let b = AgentProcess::start_with(dirs[1].path(), &[], MDNS);
    let impostor = AgentProcess::start(dirs[2].path(), &[]);
    // B trusts A (A is not running mDNS, so only the spoof announces A's id).
    assert!(b
        .cli(&["trust", "add", &a.device_id, "--name", "a"])
        .status
        .success());
    let impostor_port: u16 = impostor.addr.rsplit('/').next().unwrap().parse().unwrap();

    let daemon = mdns_sd::ServiceDaemon::new().unwrap();
    daemon.disable_interface(mdns_sd::IfKind::All).unwrap();
    daemon
        .enable_interface(mdns_sd::IfKind::LoopbackV4)
        .unwrap();
    let props = [("v", "1.4"), ("id", a.device_id.as_str()), ("name", "a")];
    let info = mdns_sd::ServiceInfo::new(
        devicelink::discovery::SERVICE_TYPE,
        "spoof",
        "spoof.local.",
        "127.0.0.1",
        impostor_port,
        &props[..],
    )
    .unwrap();
    daemon.register(info).unwrap();

    wait_for("b to hear the spoofed announcement", || {
        peer(&status(&b), &a.device_id).is_some_and(|p| p["found_via"].to_string().contains("mdns"))
    });
    std::thread::sleep(Duration::from_secs(2));
    let s = status(&b);
    assert!(peer(&s, &impostor.device_id).is_none_or(|p| p["syncing"] != true));
    assert_ne!(
        peer(&s, &a.device_id).unwrap()["connected"],
        true,
        "connected to an impostor as A"
    );
    let trusted = stdout(&b.cli(&["trust", "list"]));
    assert!(
        !trusted.contains(&impostor.device_id),
        "the impostor got into the trust store"
    );
    let _ = daemon.shutdown();
}
