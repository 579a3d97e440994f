//! The default path: two devices on one LAN segment (two network namespaces joined by a veth
//! pair, multicast on), each running `devicelink --data-dir DIR agent` and nothing else, pair by
//! code alone over mDNS, sync, and find each other again after a restart. Skips, saying why,
//! without root (namespaces).

mod common;

use std::time::{Duration, Instant};

use common::netns::Lan;
use common::process::{stderr, stdout, AgentProcess, OpenCode};
use common::LIMIT;

fn lan() -> Option<Lan> {
    match Lan::create() {
        Ok(lan) => Some(lan),
        Err(why) => {
            eprintln!("skipped: {why}");
            None
        }
    }
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < LIMIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

fn doc_get(agent: &AgentProcess, doc: &str) -> serde_json::Value {
    serde_json::from_str(&stdout(&agent.cli(&["doc", "get", doc]))).unwrap_or_default()
}

#[test]
fn default_agents_on_one_lan_pair_by_code_alone_and_sync() {
    let Some(lan) = lan() else { return };
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let laptop = AgentProcess::start_as_user_in(&lan.ns(0), da.path());
    let phone = AgentProcess::start_as_user_in(&lan.ns(1), db.path());

    // The banner lists every listener: TCP and QUIC, on the LAN address too.
    for agent in [&laptop, &phone] {
        assert!(
            agent.addrs.iter().any(|a| a.contains("/tcp/")),
            "no TCP address in the banner: {:?}",
            agent.addrs
        );
        assert!(
            agent.addrs.iter().any(|a| a.contains("/quic-v1")),
            "no QUIC address in the banner: {:?}",
            agent.addrs
        );
        assert!(
            agent.addrs.iter().any(|a| a.contains("198.51.100.")),
            "the LAN address is not listed: {:?}",
            agent.addrs
        );
        let doctor = stdout(&agent.cli(&["doctor"]));
        assert!(
            !doctor.contains("no TCP listen address"),
            "doctor says mDNS is not announcing: {doctor}"
        );
    }

    // Pair with the code alone: the phone finds the laptop over mDNS.
    let host = OpenCode::open(&laptop, 120);
    let started = Instant::now();
    let out = phone.cli(&["pair", &host.code]);
    assert!(
        out.status.success(),
        "pairing by code alone failed: {}{}",
        stdout(&out),
        stderr(&out)
    );
    println!("paired over mDNS in {:?}", started.elapsed());
    host.expect_line("paired with");

    // A change on the laptop reaches the phone.
    let out = laptop.cli(&["doc", "set", "notes", "meta", "title", "\"Groceries\""]);
    assert!(out.status.success(), "{}", stderr(&out));
    let synced = wait_for("the phone to get the laptop's change", || {
        doc_get(&phone, "notes")["meta"]["title"] == "Groceries"
    });
    println!("synced in {synced:?}");

    // Both restart (as a user would: no flags), each on new free ports, so the addresses they
    // remember of each other are stale: only mDNS can bring them together again.
    phone.stop();
    let out = laptop.cli(&["doc", "set", "notes", "meta", "while", "\"away\""]);
    assert!(out.status.success(), "{}", stderr(&out));
    laptop.stop();
    let laptop = AgentProcess::start_as_user_in(&lan.ns(0), da.path());
    let phone = AgentProcess::start_as_user_in(&lan.ns(1), db.path());
    let found = wait_for("the restarted phone to catch up", || {
        doc_get(&phone, "notes")["meta"]["while"] == "away"
    });
    println!("restarted devices found each other and caught up in {found:?}");
    let out = phone.cli(&["doc", "text", "notes", "body", "--append", "from the phone"]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for("the laptop to get the phone's change", || {
        doc_get(&laptop, "notes")["body"] == "from the phone"
    });
    let peers = stdout(&laptop.cli(&["peers"]));
    let line = peers
        .lines()
        .find(|l| l.contains(&phone.device_id))
        .unwrap_or_else(|| panic!("the phone is not listed: {peers}"));
    // `direct`, not `LAN-direct`: the test LAN uses a documentation range, not a private one.
    assert!(
        line.contains("online") && line.contains("direct"),
        "{peers}"
    );
    // One of them found the other over mDNS (the other sees "it dialed this device").
    let found_via = |agent: &AgentProcess, other: &AgentProcess| {
        let status: serde_json::Value =
            serde_json::from_str(&stdout(&agent.cli(&["status", "--json"]))).unwrap_or_default();
        status["peers"]
            .as_array()
            .and_then(|peers| {
                peers
                    .iter()
                    .find(|p| p["device_id"] == other.device_id.as_str())
            })
            .map(|p| p["found_via"].to_string())
            .unwrap_or_default()
    };
    let (on_laptop, on_phone) = (found_via(&laptop, &phone), found_via(&phone, &laptop));
    assert!(
        on_laptop.contains("mdns") || on_phone.contains("mdns"),
        "not found over mDNS: laptop {on_laptop}, phone {on_phone}"
    );
    // The human status names the other device with its link and state.
    let summary = stdout(&phone.cli(&["status"]));
    assert!(
        summary.contains("your devices:") && summary.contains("in sync"),
        "{summary}"
    );
}
