//! Devices on different networks (issue 11), on real NATs: network namespaces and nftables
//! masquerade (see tests/common/netns.rs). The always-on device runs in `internet` with
//! `--serve-relay`; the laptop is behind the home NAT, the phone behind the cafe NAT; mDNS off.
//!
//! - (a) laptop and phone each link with the always-on device (named by DNS: `pair CODE --peer
//!   /dns4/relay.devicelink.test/tcp/4001`, and the laptop's `--relay /dns4/...`), learn each other through the
//!   device group, reach each other and sync both ways;
//! - (b) endpoint-independent NATs: the link upgrades to a direct one by hole punching;
//!   symmetric NATs: it stays relayed and still syncs;
//! - (c) the laptop edits and stops; the phone starts later and gets the edit from the
//!   always-on device;
//! - (d) the always-on device restarts: devices reserve again and reconnect on their own;
//! - (e) a device that is not linked cannot reserve, read or write through the relay;
//! - (f) a new device on another network pairs with the laptop through the relay
//!   (`pair CODE --relay ADDR`: the relay finds the laptop by the code's slot).
//!
//! Skipped, with the reason printed, where network namespaces cannot be created (not root).
//! Run with `--nocapture` to see the figures (times to connect, latency per path).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::netns::{Nat, Topology, INTERNET_HOST};
use common::process::{stderr, stdout, AgentProcess, OpenCode};
use serde_json::Value;

/// Waits longer than the usual limit: a hole punch makes up to three attempts, and one retry.
const NAT_LIMIT: Duration = Duration::from_secs(40);

fn topology(nat: Nat) -> Option<Topology> {
    match Topology::create(nat) {
        Ok(t) => Some(t),
        Err(why) => {
            eprintln!("skipped: {why}");
            None
        }
    }
}

fn start_always_on(t: &Topology, dir: &Path) -> AgentProcess {
    AgentProcess::start_in(
        &t.ns("internet"),
        dir,
        &[
            "--listen",
            "/ip4/0.0.0.0/tcp/4001",
            "--listen",
            "/ip4/0.0.0.0/udp/4001/quic-v1",
            "--serve-relay",
            "--name",
            "always-on",
        ],
    )
}

fn relay_addr(always_on: &AgentProcess) -> String {
    format!("/ip4/{INTERNET_HOST}/tcp/4001/p2p/{}", always_on.device_id)
}

fn start_device(t: &Topology, which: &str, dir: &Path, extra: &[&str]) -> AgentProcess {
    let mut args = vec![
        "--listen",
        "/ip4/0.0.0.0/tcp/0",
        "--listen",
        "/ip4/0.0.0.0/udp/0/quic-v1",
        "--name",
        which,
    ];
    args.extend_from_slice(extra);
    AgentProcess::start_in(&t.ns(which), dir, &args)
}

/// `devicelink pair CODE --peer ADDR` from `device` with a code the always-on device opened.
fn link_with(device: &AgentProcess, always_on: &AgentProcess) {
    let host = OpenCode::open(always_on, 60);
    // By name (the hosts files of start_laptop).
    let addr = format!("/dns4/{RELAY_NAME}/tcp/4001");
    let out = device.cli(&["pair", &host.code, "--peer", &addr]);
    assert!(out.status.success(), "pairing failed: {}", stderr(&out));
}

fn status(agent: &AgentProcess) -> Value {
    serde_json::from_str(&stdout(&agent.cli(&["status", "--json"]))).unwrap_or_default()
}

fn peer(agent: &AgentProcess, other: &AgentProcess) -> Value {
    status(agent)["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["device_id"] == other.device_id.as_str())
        .cloned()
        .unwrap_or_default()
}

fn link(agent: &AgentProcess, other: &AgentProcess) -> String {
    let p = peer(agent, other);
    if p["connected"] == true {
        p["link"].as_str().unwrap_or("?").to_string()
    } else {
        "offline".to_string()
    }
}

/// Waits for `cond` (bounded); returns how long it took.
fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
    start.elapsed()
}

fn set(agent: &AgentProcess, doc: &str, key: &str, value: &str) {
    let out = agent.cli(&["doc", "set", doc, "m", key, value]);
    assert!(out.status.success(), "{}", stderr(&out));
}

fn get(agent: &AgentProcess, doc: &str) -> Value {
    serde_json::from_str(&stdout(&agent.cli(&["doc", "get", doc]))).unwrap_or_default()
}

fn reservation(agent: &AgentProcess) -> Value {
    status(agent)["reach"]["relays"]
        .as_array()
        .and_then(|r| r.first().cloned())
        .unwrap_or_default()
}

/// App-to-app latency from `from` to `to` (an app on each), p50 and p99 over `rounds` changes.
fn latency(from: &AgentProcess, to: &AgentProcess, rounds: usize) -> (Duration, Duration) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (writer, reader) = (from.client().await, to.client().await);
        let mut events = reader.take_events().unwrap();
        reader.subscribe("latency").await.unwrap();
        let mut times = Vec::with_capacity(rounds);
        for i in 0..rounds {
            let start = Instant::now();
            writer
                .doc_set("latency", "m", "k", serde_json::json!(i))
                .await
                .unwrap();
            loop {
                let event = tokio::time::timeout(common::LIMIT, events.recv())
                    .await
                    .expect("the change arrives")
                    .expect("events go on");
                if matches!(event, devicelink::ipc::protocol::Event::Update { .. }) {
                    break;
                }
            }
            times.push(start.elapsed());
        }
        times.sort();
        (times[rounds / 2], times[rounds * 99 / 100])
    })
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Stops the laptop and the phone and starts them again on their data.
fn restart(
    t: &Topology,
    dirs: &[tempfile::TempDir],
    always_on: &AgentProcess,
    laptop: AgentProcess,
    phone: AgentProcess,
) -> (AgentProcess, AgentProcess) {
    laptop.stop();
    phone.stop();
    (
        start_laptop(t, dirs[1].path(), always_on),
        start_device(t, "cafe", dirs[2].path(), &[]),
    )
}

/// The always-on device's DNS name, as the laptop and phone know it (their hosts files).
const RELAY_NAME: &str = "relay.devicelink.test";

/// The relay's address by name (`/dns4/...`), as a VPS is usually known.
fn relay_addr_by_name(always_on: &AgentProcess) -> String {
    format!("/dns4/{RELAY_NAME}/tcp/4001/p2p/{}", always_on.device_id)
}

/// The laptop names the relay with --relay, by its DNS name (the phone learns it from the
/// device group).
fn start_laptop(t: &Topology, dir: &Path, always_on: &AgentProcess) -> AgentProcess {
    for which in ["home", "cafe"] {
        t.name_host(which, RELAY_NAME, INTERNET_HOST)
            .expect("a name for the relay");
    }
    start_device(t, "home", dir, &["--relay", &relay_addr_by_name(always_on)])
}

/// The laptop names the relay with --relay; the phone learns it from the device group.
fn three_devices(t: &Topology, dirs: &[tempfile::TempDir]) -> [AgentProcess; 3] {
    let always_on = start_always_on(t, dirs[0].path());
    let laptop = start_laptop(t, dirs[1].path(), &always_on);
    let phone = start_device(t, "cafe", dirs[2].path(), &[]);
    link_with(&laptop, &always_on);
    link_with(&phone, &always_on);
    [always_on, laptop, phone]
}

/// (a), (b) with endpoint-independent NATs, (c).
#[test]
fn devices_behind_two_nats_meet_through_the_relay_punch_through_and_store_and_forward() {
    let Some(t) = topology(Nat::EndpointIndependent) else {
        return;
    };
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let [always_on, laptop, phone] = three_devices(&t, &dirs);

    // (a) Through the device group they know each other, reach each other and sync.
    let met = wait_until("laptop and phone to connect", NAT_LIMIT, || {
        link(&laptop, &phone) != "offline" && link(&phone, &laptop) != "offline"
    });
    println!(
        "laptop and phone connected {} after the second pairing",
        ms(met)
    );
    assert_eq!(peer(&laptop, &phone)["trusted"], true);
    // Both reserved on the relay: the laptop named it, the phone learned it from the group.
    for device in [&laptop, &phone] {
        wait_until("a reservation on the relay", NAT_LIMIT, || {
            reservation(device)["state"] == "reserved"
        });
    }
    assert_eq!(reservation(&laptop)["source"], "flag");
    // The always-on device has a public address: a plain direct link, not a LAN one.
    assert_eq!(link(&laptop, &always_on), "direct");
    assert_eq!(reservation(&phone)["source"], "device-group");
    set(&laptop, "trip", "from_laptop", "1");
    set(&phone, "trip", "from_phone", "2");
    wait_until("both edits on both devices", NAT_LIMIT, || {
        [&laptop, &phone]
            .iter()
            .all(|d| get(d, "trip")["m"] == serde_json::json!({"from_laptop": 1, "from_phone": 2}))
    });

    // (b) Endpoint-independent NATs: a hole punch makes the link direct.
    let punched = wait_until("a direct link after a hole punch", NAT_LIMIT, || {
        link(&laptop, &phone) == "punched-direct" || link(&phone, &laptop) == "punched-direct"
    });
    println!("link punched-direct {} later", ms(punched));
    wait_until("the relayed connection to close", NAT_LIMIT, || {
        link(&laptop, &phone) != "relayed" && link(&phone, &laptop) != "relayed"
    });
    let (p50, p99) = latency(&laptop, &phone, 100);
    println!(
        "app-to-app over the punched direct path: p50 {}, p99 {}",
        ms(p50),
        ms(p99)
    );
    let doctor = stdout(&laptop.cli(&["doctor"]));
    assert!(doctor.contains("reachability: "), "{doctor}");
    assert!(doctor.contains("relay: reserved on"), "{doctor}");
    assert!(doctor.contains("punched-direct"), "{doctor}");
    let peers = stdout(&laptop.cli(&["peers"]));
    assert!(peers.contains("punched-direct"), "{peers}");
    assert!(
        stdout(&always_on.cli(&["doctor"])).contains("serving as the relay"),
        "the always-on device says what it is"
    );

    // Start to connected and to direct: both devices restarted (they know each other).
    let started = Instant::now();
    let (laptop, phone) = restart(&t, &dirs, &always_on, laptop, phone);
    wait_until("laptop and phone to connect again", NAT_LIMIT, || {
        link(&laptop, &phone) != "offline"
    });
    let connected = started.elapsed();
    wait_until("a direct link again", NAT_LIMIT, || {
        link(&laptop, &phone) == "punched-direct" || link(&phone, &laptop) == "punched-direct"
    });
    println!(
        "from start: connected after {}, punched-direct after {}",
        ms(connected),
        ms(started.elapsed())
    );

    // (c) The laptop edits and stops; the phone, started later, gets it from the always-on
    // device.
    phone.stop();
    set(&laptop, "notes", "written", "\"while the phone was off\"");
    wait_until("the always-on device to hold the edit", NAT_LIMIT, || {
        get(&always_on, "notes")["m"]["written"] == "while the phone was off"
    });
    laptop.stop();
    let started = Instant::now();
    let phone = start_device(&t, "cafe", dirs[2].path(), &[]);
    wait_until(
        "the phone to get the edit from the always-on device",
        NAT_LIMIT,
        || get(&phone, "notes")["m"]["written"] == "while the phone was off",
    );
    println!(
        "phone started and had the laptop's edit (laptop off) after {}",
        ms(started.elapsed())
    );
}

/// (b) with symmetric NATs, (d), (e) and (f).
#[test]
fn symmetric_nats_stay_relayed_relay_restarts_and_strangers_are_refused() {
    let Some(t) = topology(Nat::Symmetric) else {
        return;
    };
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let [always_on, laptop, phone] = three_devices(&t, &dirs);

    // (b) Symmetric NATs: punches fail, the link stays relayed and still syncs both ways.
    wait_until("laptop and phone to connect", NAT_LIMIT, || {
        link(&laptop, &phone) == "relayed" && link(&phone, &laptop) == "relayed"
    });
    wait_until("a hole punch to be tried and fail", NAT_LIMIT, || {
        peer(&laptop, &phone)["punch"]
            .as_str()
            .is_some_and(|p| p.contains("failed"))
            || peer(&phone, &laptop)["punch"]
                .as_str()
                .is_some_and(|p| p.contains("failed"))
    });
    set(&laptop, "trip", "from_laptop", "1");
    set(&phone, "trip", "from_phone", "2");
    wait_until(
        "both edits on both devices over the relay",
        NAT_LIMIT,
        || {
            [&laptop, &phone].iter().all(|d| {
                get(d, "trip")["m"] == serde_json::json!({"from_laptop": 1, "from_phone": 2})
            })
        },
    );
    wait_until("the link to be relayed", NAT_LIMIT, || {
        link(&laptop, &phone) == "relayed"
    });
    let (p50, p99) = latency(&laptop, &phone, 100);
    println!(
        "app-to-app over the relayed path: p50 {}, p99 {}",
        ms(p50),
        ms(p99)
    );
    assert_eq!(link(&laptop, &phone), "relayed", "no direct path exists");
    // Either side may be the one that tried the punch; its doctor says why it failed.
    let doctors = stdout(&phone.cli(&["doctor"])) + &stdout(&laptop.cli(&["doctor"]));
    assert!(doctors.contains("hole punch: failed"), "{doctors}");
    assert!(doctors.contains("relayed"), "{doctors}");

    // Start to connected, relayed: both devices restarted.
    let started = Instant::now();
    let (laptop, phone) = restart(&t, &dirs, &always_on, laptop, phone);
    wait_until("laptop and phone to connect again", NAT_LIMIT, || {
        link(&laptop, &phone) == "relayed"
    });
    println!(
        "from start to connected through the relay: {}",
        ms(started.elapsed())
    );

    // (d) The always-on device restarts: both reserve again and reconnect on their own.
    always_on.stop();
    wait_until("the laptop to lose its reservation", NAT_LIMIT, || {
        reservation(&laptop)["state"] != "reserved"
    });
    let restarted = Instant::now();
    let always_on = start_always_on(&t, dirs[0].path());
    wait_until("both devices to reserve again", NAT_LIMIT, || {
        reservation(&laptop)["state"] == "reserved" && reservation(&phone)["state"] == "reserved"
    });
    wait_until(
        "laptop and phone to reconnect through the relay",
        NAT_LIMIT,
        || link(&laptop, &phone) != "offline" && link(&phone, &laptop) != "offline",
    );
    println!(
        "back (reserved and reconnected) {} after the always-on device restarted",
        ms(restarted.elapsed())
    );
    set(&phone, "trip", "after_restart", "3");
    wait_until("a change after the restart", NAT_LIMIT, || {
        get(&laptop, "trip")["m"]["after_restart"] == 3
    });

    // (e) A device that is not linked: its reservation is refused, and what it dials through
    // the relay refuses it sync (it reads nothing and its writes go nowhere).
    let laptop_relayed = reservation(&laptop)["relayed_addrs"][0]
        .as_str()
        .unwrap()
        .to_string();
    // It even trusts the laptop on its own side, so it really tries to sync.
    let stranger_dir = dirs[3].path();
    let socket = stranger_dir.join("agent.sock");
    for args in [&["id"][..], &["trust", "add", &laptop.device_id]] {
        let out = common::process::cli(stranger_dir, &socket, args);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let stranger = AgentProcess::start_in(
        &t.ns("internet"),
        dirs[3].path(),
        &[
            "--listen",
            "/ip4/0.0.0.0/tcp/0",
            "--relay",
            &relay_addr(&always_on),
            "--peer",
            &laptop_relayed,
        ],
    );
    wait_until(
        "the stranger's reservation to be refused",
        NAT_LIMIT,
        || {
            reservation(&stranger)["last_error"]
                .as_str()
                .is_some_and(|e| !e.is_empty())
        },
    );
    let refused = reservation(&stranger);
    assert_ne!(refused["state"], "reserved", "{refused}");
    set(&stranger, "trip", "from_stranger", "666");
    // It reaches the laptop through the relay (a few circuits a minute are open to devices
    // that are not linked, so a joiner can dial a host's relayed address), and the laptop
    // refuses it everything but pairing.
    wait_until(
        "the stranger to be refused by the laptop",
        NAT_LIMIT,
        || {
            peer(&laptop, &stranger)["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("sync refused"))
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    for device in [&laptop, &phone, &always_on] {
        assert!(
            get(device, "trip")["m"].get("from_stranger").is_none(),
            "a stranger's write arrived"
        );
    }
    assert!(
        get(&stranger, "trip")["m"].get("from_laptop").is_none(),
        "a stranger read a document"
    );
    let denied = peer(&always_on, &stranger);
    assert_ne!(denied["trusted"], true);

    drop(stranger);

    // (f) A new device in the cafe pairs with the laptop at home, through the relay: it knows
    // the relay's address and the code, not the laptop's id.
    let tablet_dir = tempfile::tempdir().unwrap();
    let tablet = start_device(&t, "cafe", tablet_dir.path(), &[]);
    let host = OpenCode::open(&laptop, 60);
    let started = Instant::now();
    let out = tablet.cli(&["pair", &host.code, "--relay", &relay_addr(&always_on)]);
    assert!(
        out.status.success(),
        "pairing through the relay: {}",
        stderr(&out)
    );
    host.expect_line("paired with");
    println!("paired through the relay in {}", ms(started.elapsed()));
    set(&tablet, "trip", "from_tablet", "4");
    wait_until(
        "the tablet's edit on the laptop and the phone",
        NAT_LIMIT,
        || {
            get(&laptop, "trip")["m"]["from_tablet"] == 4
                && get(&phone, "trip")["m"]["from_tablet"] == 4
        },
    );
    assert_eq!(get(&tablet, "trip")["m"]["from_laptop"], 1);
    // A wrong slot is a clear error, not a hang.
    let out = tablet.cli(&["pair", "11-111-111", "--relay", &relay_addr(&always_on)]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("a code starting with 11-"),
        "{}",
        stderr(&out)
    );
}

/// The always-on device blind (`--serve-relay --blind`, issue 20) on the same topology: the
/// laptop links with it by name, the phone pairs with the laptop through it (the blind relay
/// answers the lookup from what its members told it), they sync through it, and the phone,
/// started after the laptop stopped, gets the laptop's edit from it alone; its data dir holds
/// none of the document.
#[test]
fn a_blind_always_on_device_relays_and_stores_across_nats() {
    let Some(t) = topology(Nat::Symmetric) else {
        return;
    };
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let always_on = AgentProcess::start_in(
        &t.ns("internet"),
        dirs[0].path(),
        &[
            "--listen",
            "/ip4/0.0.0.0/tcp/4001",
            "--serve-relay",
            "--blind",
            "--name",
            "always-on",
        ],
    );
    let laptop = start_laptop(&t, dirs[1].path(), &always_on);
    link_with(&laptop, &always_on);
    wait_until("the laptop's reservation", NAT_LIMIT, || {
        reservation(&laptop)["state"] == "reserved"
    });
    let phone = start_device(&t, "cafe", dirs[2].path(), &[]);
    let host = OpenCode::open(&laptop, 60);
    let out = phone.cli(&["pair", &host.code, "--relay", &relay_addr(&always_on)]);
    assert!(
        out.status.success(),
        "pairing through the blind relay: {}",
        stderr(&out)
    );
    set(&laptop, "trip", "from_laptop", "1");
    wait_until("the laptop's edit on the phone, relayed", NAT_LIMIT, || {
        get(&phone, "trip")["m"]["from_laptop"] == 1
    });
    assert_eq!(link(&phone, &laptop), "relayed");

    // Store and forward: the phone is off while the laptop writes, then the laptop is off.
    phone.stop();
    let secret = "written-behind-the-nat-3b7c";
    set(&laptop, "notes-7f1e", "written", &format!("\"{secret}\""));
    wait_until("the laptop to back up its edit", NAT_LIMIT, || {
        status(&laptop)["blind"]["backups"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|b| b["device"] == always_on.device_id.as_str() && b["behind"] == 0)
    });
    laptop.stop();
    let phone = start_device(&t, "cafe", dirs[2].path(), &[]);
    wait_until(
        "the phone to get the edit from the blind device",
        NAT_LIMIT,
        || get(&phone, "notes-7f1e")["m"]["written"] == secret,
    );
    for needle in [secret, "notes-7f1e", "from_laptop"] {
        let mut stack = vec![dirs[0].path().to_path_buf()];
        while let Some(path) = stack.pop() {
            if path.is_dir() {
                stack.extend(
                    std::fs::read_dir(&path)
                        .unwrap()
                        .flatten()
                        .map(|e| e.path()),
                );
            } else if let Ok(bytes) = std::fs::read(&path) {
                assert!(
                    !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                    "{needle:?} in {}",
                    path.display()
                );
            }
        }
    }
}
