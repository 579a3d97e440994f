//! Issue 22, the public edge on the network side: strangers that reach a device's listener or
//! its relay (they need no link to the user's devices). Real agents on 127.0.0.1; the attacker
//! connects from another loopback address (127.0.0.2) so that it is a different host to the
//! agent, as it would be on the internet.

mod common;

use std::time::{Duration, Instant};

use common::raw_peer::*;
use common::*;
use devicelink::pairing::{HostEvent, PairError, PairingCode};
use devicelink::{Agent, AgentConfig, AgentHandle, Multiaddr};
use libp2p::multiaddr::Protocol;

async fn start_with(
    dir: &std::path::Path,
    name: &str,
    edit: impl FnOnce(&mut AgentConfig),
) -> AgentHandle {
    init_tracing();
    let mut config = AgentConfig::new(dir);
    config.device_name = name.to_string();
    edit(&mut config);
    Agent::start(config).await.expect("agent starts")
}

fn with_id(addr: &Multiaddr, agent: &AgentHandle) -> Multiaddr {
    addr.clone().with(Protocol::P2p(agent.device_id()))
}

/// An always-on device on a "public" address and a laptop with a reservation on it, linked by
/// pairing as a user links them.
async fn relay_and_laptop(
    relay_dir: &std::path::Path,
    laptop_dir: &std::path::Path,
) -> (AgentHandle, AgentHandle, Multiaddr) {
    // The relay announces its address as external (it would be public), so that it can give
    // the laptop a reservation.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let public: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap();
    let relay = start_with(relay_dir, "relay", |c| {
        c.serve_relay = true;
        c.listen = vec![public.clone()];
        c.external = vec![public.clone()];
    })
    .await;
    let relay_addr = with_id(&relay.listen_addrs()[0], &relay);
    let laptop = start_with(laptop_dir, "laptop", |c| {
        c.relays = vec![relay_addr.clone()]
    })
    .await;
    // Linked by pairing, as a user does: both are then in the device group.
    let (first, _) = laptop
        .devices()
        .pair_open(Duration::from_secs(60))
        .await
        .unwrap();
    relay
        .devices()
        .pair_join(&first, Some(with_id(&laptop.listen_addrs()[0], &laptop)))
        .await
        .expect("the relay pairs with the laptop");
    wait_until(LIMIT, "laptop and relay linked", || {
        laptop.is_syncing_with(&relay.device_id())
    })
    .await;
    wait_until(LIMIT, "the laptop's reservation on the relay", || {
        laptop
            .listen_addrs()
            .iter()
            .any(|a| a.iter().any(|p| p == Protocol::P2pCircuit))
    })
    .await;
    (relay, laptop, relay_addr)
}

/// Finding 4: the relay told any stranger which device had a pairing code open (slots 0..99 in
/// 0.03 s, with the device id), and three wrong guesses burned the code at once, so the real
/// joiner got "too many wrong codes". Lookups now need the whole code (the slot and a tag made
/// from the secret digits), and the host takes a new attempt at most every few seconds after a
/// failed one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_learn_nothing_from_lookups_and_cannot_burn_a_code() {
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let (relay, laptop, relay_addr) = relay_and_laptop(dirs[0].path(), dirs[1].path()).await;
    let (code, mut events) = laptop
        .devices()
        .pair_open(Duration::from_secs(300))
        .await
        .unwrap();

    // A stranger asks the relay about every slot, with tags it can only guess.
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    let mut stranger =
        raw_peer_dialing(keypair, relay.device_id(), relay.listen_addrs()[0].clone()).await;
    // Give the laptop time to list its code in the group (the real joiner polls for 10 s).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut answered = 0;
    for slot in 10..100u16 {
        let Ok(stream) = stranger
            .control
            .open_stream(
                relay.device_id(),
                devicelink::net::lookup::PAIR_LOOKUP_PROTOCOL,
            )
            .await
        else {
            continue;
        };
        let guess: PairingCode = format!("{slot:02}-123-456").parse().unwrap();
        if let Ok(found) = devicelink::net::lookup::ask(stream, slot, &guess.lookup_tag()).await {
            answered += 1;
            assert_eq!(found, None, "slot {slot}: a device id for a wrong code");
        }
    }
    println!("{answered} of 90 lookups answered, none with a device");

    // Wrong codes at the laptop itself, as fast as a stranger can (its id known some other way).
    let mallory = start(dirs[2].path(), "mallory").await;
    let text = code.to_string();
    let last = text.chars().last().and_then(|c| c.to_digit(10)).unwrap();
    let wrong: PairingCode = format!("{}{}", &text[..text.len() - 1], (last + 1) % 10)
        .parse()
        .unwrap();
    let laptop_addr = with_id(&laptop.listen_addrs()[0], &laptop);
    let started = Instant::now();
    let mut counted = 0;
    let mallory_devices = mallory.devices();
    let window = Duration::from_secs(3);
    while let Some(left) = window.checked_sub(started.elapsed()) {
        // The client waits out "busy" by itself; what is still waiting at 3 s is dropped.
        let attempt = mallory_devices.pair_join(&wrong, Some(laptop_addr.clone()));
        match tokio::time::timeout(left, attempt).await {
            Err(_) => break,
            Ok(Err(PairError::WrongCode)) => counted += 1,
            Ok(Err(PairError::Busy)) => {}
            Ok(other) => panic!("unexpected: {other:?}"),
        }
    }
    assert_eq!(counted, 1, "wrong codes counted within 3 s");
    // The real joiner, on another network, still pairs through the relay (told "busy" while
    // the host waits after the wrong code, it tries again, as a person would).
    let phone = start(dirs[3].path(), "phone").await;
    let started = Instant::now();
    let paired = loop {
        match phone
            .devices()
            .pair_join_through_relay(&code, relay_addr.clone())
            .await
        {
            Err(PairError::Busy) if started.elapsed() < LIMIT => {
                tokio::time::sleep(Duration::from_millis(500)).await
            }
            other => break other.expect("the real joiner pairs"),
        }
    };
    assert_eq!(paired.device_id, laptop.device_id().to_string());
    let mut burned = false;
    while let Ok(event) = events.try_recv() {
        burned |= matches!(event, HostEvent::Closed { .. });
    }
    assert!(!burned, "the code was burned");
    for agent in [relay, laptop, mallory, phone] {
        agent.shutdown().await.unwrap();
    }
}

/// Finding 2: 64 silent TCP sockets from one host filled the agent's 64 pending-handshake
/// slots (reopened as the 5 s handshake timeout closed them), so a restarted device could not
/// reconnect for as long as the attack went on. Now one address holds at most 8 of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_from_one_host_do_not_keep_devices_out() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(da.path(), "relay").await;
    let target = a
        .listen_addrs()
        .iter()
        .find_map(|addr| {
            let mut ip = None;
            let mut port = None;
            for p in addr.iter() {
                match p {
                    Protocol::Ip4(v) => ip = Some(v),
                    Protocol::Tcp(v) => port = Some(v),
                    _ => {}
                }
            }
            Some(std::net::SocketAddr::from((ip?, port?)))
        })
        .expect("a TCP address");
    // The attacker keeps 64 silent sockets open from 127.0.0.2, reopening closed ones.
    let attack = tokio::spawn(async move {
        let mut open = Vec::new();
        loop {
            // Reopen the ones the agent closed (a read of 0 bytes), keep the silent ones.
            open.retain(|s: &tokio::net::TcpStream| {
                matches!(s.try_read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            });
            while open.len() < 64 {
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
                match socket.connect(target).await {
                    Ok(stream) => open.push(stream),
                    Err(_) => break,
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b = start(db.path(), "phone").await;
    let started = Instant::now();
    link(&b, &a);
    wait_until(LIMIT, "the phone connects beside 64 silent sockets", || {
        b.is_syncing_with(&a.device_id())
    })
    .await;
    println!(
        "connected in {:?} beside 64 silent sockets",
        started.elapsed()
    );
    attack.abort();
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// A fresh identity (a new device id, as an attacker churning identities has) dialing `addr`
/// from 127.0.0.1; its swarm, and whether a connection to the device `addr` ends in came up.
async fn stranger_dial(addr: Multiaddr) -> (libp2p::Swarm<devicelink::net::Behaviour>, bool) {
    use futures::StreamExt;
    use libp2p::swarm::SwarmEvent;
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    let mut swarm = devicelink::net::build_swarm(keypair).unwrap();
    let target = addr
        .iter()
        .filter_map(|p| match p {
            Protocol::P2p(id) => Some(id),
            _ => None,
        })
        .last()
        .expect("an address ending in /p2p/ID");
    swarm.dial(addr).unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == target => {
                    return true
                }
                SwarmEvent::OutgoingConnectionError { peer_id, .. } if peer_id == Some(target) => {
                    return false
                }
                _ => {}
            }
        }
    })
    .await
    .unwrap_or(false);
    (swarm, outcome)
}

/// Finding 13: libp2p's own per-IP circuit limiter (60 circuits, then one a minute) ran behind
/// devicelink's rules, unlisted: strangers behind one NAT spent it in 0.1 s and a new device
/// behind the same NAT could not pair through the relay. Now the relay's rules are the only
/// ones: linked devices open circuits freely; devices that are not linked a few a minute each,
/// and those that did not ask with the code 30 a minute all together. 70 new identities from
/// the joiner's own address get at most those 30 circuits to the laptop, and the joiner, who
/// asks with the code, then pairs through the relay all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_behind_one_address_cannot_spend_a_joiners_circuits() {
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let (relay, laptop, relay_addr) = relay_and_laptop(dirs[0].path(), dirs[1].path()).await;
    let (code, _events) = laptop
        .devices()
        .pair_open(Duration::from_secs(300))
        .await
        .unwrap();
    let circuit = relay_addr
        .clone()
        .with(Protocol::P2pCircuit)
        .with(Protocol::P2p(laptop.device_id()));
    let mut reached = 0;
    for _ in 0..70 {
        let (_swarm, connected) = stranger_dial(circuit.clone()).await;
        reached += usize::from(connected);
    }
    println!("{reached} of 70 new identities got a circuit to the laptop");
    assert!(
        reached <= devicelink::net::relay::UNASKED_CIRCUITS_PER_MINUTE as usize,
        "{reached} circuits for strangers without the code"
    );
    let phone = start(dirs[2].path(), "phone").await;
    let paired = phone
        .devices()
        .pair_join_through_relay(&code, relay_addr.clone())
        .await
        .expect("the joiner pairs through the relay beside 70 strangers on its address");
    assert_eq!(paired.device_id, laptop.device_id().to_string());
    // The strangers spent the minute's circuits for devices that did not ask with the code; a
    // joiner given the host's relayed address (as `devicelink pair` prints it) asks first, so
    // it still gets its circuit.
    let (code, _events) = laptop
        .devices()
        .pair_open(Duration::from_secs(300))
        .await
        .unwrap();
    let tablet = start(dirs[3].path(), "tablet").await;
    let paired = tablet
        .devices()
        .pair_join_through_relay(&code, circuit.clone())
        .await
        .expect("a joiner with the host's relayed address pairs");
    assert_eq!(paired.device_id, laptop.device_id().to_string());
    for agent in [relay, laptop, phone, tablet] {
        agent.shutdown().await.unwrap();
    }
}

/// Finding 10: ~750 new identities a second filled the relay's 256 established connections,
/// so a restarted phone was back only after 11-25 s. Devices that are not linked now share 64
/// of them: with 300 strangers connected, the restarted phone is back at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_churn_does_not_keep_linked_devices_off_the_relay() {
    let (dr, dp) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let relay = start(dr.path(), "relay").await;
    let phone = start(dp.path(), "phone").await;
    link(&phone, &relay);
    wait_until(LIMIT, "phone and relay linked", || {
        phone.is_syncing_with(&relay.device_id())
    })
    .await;
    phone.shutdown().await.unwrap();
    let relay_addr = with_id(&relay.listen_addrs()[0], &relay);
    // 300 new identities connect; each one's swarm is kept running, and counts its connection
    // as open until the relay closes it.
    let open = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut strangers = Vec::new();
    for _ in 0..300 {
        let (mut swarm, connected) = stranger_dial(relay_addr.clone()).await;
        let open = open.clone();
        if connected {
            open.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        strangers.push(tokio::spawn(async move {
            use futures::StreamExt;
            let mut counted = connected;
            loop {
                let event = swarm.select_next_some().await;
                if let libp2p::swarm::SwarmEvent::ConnectionClosed {
                    num_established: 0, ..
                } = event
                {
                    if std::mem::take(&mut counted) {
                        open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }
            }
        }));
    }
    wait_until(LIMIT, "the relay keeps the strangers' share only", || {
        open.load(std::sync::atomic::Ordering::SeqCst)
            <= devicelink::net::established::MAX_STRANGER_CONNECTIONS
    })
    .await;
    let started = Instant::now();
    let phone = start(dp.path(), "phone").await;
    phone.dial(relay.listen_addrs()[0].clone()).unwrap();
    wait_until(LIMIT, "the restarted phone is back on the relay", || {
        phone.is_syncing_with(&relay.device_id())
    })
    .await;
    println!(
        "phone back in {:?} beside 300 strangers ({} of their connections open)",
        started.elapsed(),
        open.load(std::sync::atomic::Ordering::SeqCst)
    );
    for task in strangers {
        task.abort();
    }
    for agent in [relay, phone] {
        agent.shutdown().await.unwrap();
    }
}

/// AutoNAT v2 framing: an unsigned-varint length, then a protobuf message.
mod autonat_wire {
    use futures::{AsyncReadExt, AsyncWriteExt};

    fn varint(mut n: u64, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }

    fn read_varint(bytes: &[u8], at: &mut usize) -> u64 {
        let (mut n, mut shift) = (0u64, 0);
        loop {
            let byte = bytes[*at];
            *at += 1;
            n |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return n;
            }
            shift += 7;
        }
    }

    /// A length-delimited field (wire type 2) with field number `field`.
    fn bytes_field(field: u8, bytes: &[u8], out: &mut Vec<u8>) {
        out.push(field << 3 | 2);
        varint(bytes.len() as u64, out);
        out.extend_from_slice(bytes);
    }

    async fn send(stream: &mut libp2p::Stream, message: &[u8]) {
        let mut frame = Vec::new();
        varint(message.len() as u64, &mut frame);
        frame.extend_from_slice(message);
        stream.write_all(&frame).await.unwrap();
        stream.flush().await.unwrap();
    }

    /// The next message: which field of `Message` it is, and that field's varint fields.
    async fn receive(stream: &mut libp2p::Stream) -> (u8, Vec<(u64, u64)>) {
        let mut len = Vec::new();
        loop {
            let mut byte = [0u8];
            stream.read_exact(&mut byte).await.unwrap();
            len.push(byte[0]);
            if byte[0] & 0x80 == 0 {
                break;
            }
        }
        let len = read_varint(&len, &mut 0) as usize;
        let mut message = vec![0u8; len];
        stream.read_exact(&mut message).await.unwrap();
        let kind = message[0] >> 3;
        let mut at = 1;
        let inner_len = read_varint(&message, &mut at) as usize;
        let inner = &message[at..at + inner_len];
        let mut fields = Vec::new();
        let mut at = 0;
        while at < inner.len() {
            let tag = read_varint(inner, &mut at);
            fields.push((tag >> 3, read_varint(inner, &mut at)));
        }
        (kind, fields)
    }

    /// Asks the server at the other end of `stream` to dial `target` back, paying the data it
    /// asks for; returns the `DialResponse` fields (1: status, 3: dial status).
    pub async fn dial_request(
        mut stream: libp2p::Stream,
        target: &libp2p::Multiaddr,
    ) -> Vec<(u64, u64)> {
        let mut request = Vec::new();
        bytes_field(1, &target.to_vec(), &mut request);
        request.push(2 << 3 | 1);
        request.extend_from_slice(&7u64.to_le_bytes());
        let mut message = Vec::new();
        bytes_field(1, &request, &mut message);
        send(&mut stream, &message).await;
        loop {
            match receive(&mut stream).await {
                (2, response) => return response,
                (3, data_request) => {
                    let mut owed = data_request
                        .iter()
                        .find(|(field, _)| *field == 2)
                        .map_or(0, |(_, n)| *n);
                    while owed > 0 {
                        let chunk = owed.min(4000);
                        let mut data = Vec::new();
                        bytes_field(1, &vec![0u8; chunk as usize], &mut data);
                        let mut message = Vec::new();
                        bytes_field(4, &data, &mut message);
                        send(&mut stream, &message).await;
                        owed -= chunk;
                    }
                }
                (other, _) => panic!("unexpected AutoNAT message {other}"),
            }
        }
    }
}

/// A TCP listener on `ip` (port 0) inside namespace `ns`; its port, and a count of the
/// connections it accepted, kept up for `for_how_long`.
fn counting_listener(
    ns: &str,
    ip: &'static str,
    for_how_long: Duration,
) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    common::netns::in_netns(ns, move || {
        let listener = std::net::TcpListener::bind((ip, 0)).expect("bind in namespace");
        listener.set_nonblocking(true).unwrap();
        tx.send(listener.local_addr().unwrap().port()).unwrap();
        let until = Instant::now() + for_how_long;
        while Instant::now() < until {
            if listener.accept().is_ok() {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    (rx.recv().expect("listener bound"), accepted)
}

/// Finding 12: the always-on device's AutoNAT v2 server dialed any address a stranger named (a
/// third host, its own 127.0.0.1 services), and the answer told open ports from closed ones.
/// It now dials back only the IP address the asker connects from. On a namespace LAN: the
/// always-on device (`agent --serve-relay`, as a user starts it) at 198.51.100.1, the asker at
/// 198.51.100.2. A dial-back to the asker's own address still comes (the check works); to a
/// third address, or to the device's own loopback, never.
#[test]
fn autonat_dials_back_only_the_askers_own_address() {
    let lan = match common::netns::Lan::create() {
        Ok(lan) => lan,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let (relay_ns, asker_ns) = (lan.ns(0), lan.ns(1));
    common::netns::add_address(&asker_ns, "198.51.100.3/24").expect("a third address");
    let dir = tempfile::tempdir().unwrap();
    let relay = common::process::AgentProcess::start_in(&relay_ns, dir.path(), &["--serve-relay"]);
    // It listens on every interface (0.0.0.0): its TCP port, at its LAN address.
    let port = relay
        .addrs
        .iter()
        .find_map(|a| {
            let addr: Multiaddr = a.parse().ok()?;
            addr.iter().find_map(|p| match p {
                Protocol::Tcp(port) => Some(port),
                _ => None,
            })
        })
        .unwrap_or_else(|| panic!("a TCP address among {:?}", relay.addrs));
    let relay_addr: Multiaddr = format!("/ip4/198.51.100.1/tcp/{port}").parse().unwrap();
    let relay_id: libp2p::PeerId = relay.device_id.parse().unwrap();
    let window = Duration::from_secs(60);
    let targets = [
        (
            "asker's own",
            counting_listener(&asker_ns, "198.51.100.2", window),
        ),
        (
            "third host",
            counting_listener(&asker_ns, "198.51.100.3", window),
        ),
        (
            "relay's own loopback",
            counting_listener(&relay_ns, "127.0.0.1", window),
        ),
    ];
    let ips = ["198.51.100.2", "198.51.100.3", "127.0.0.1"];
    let asks: Vec<(
        &str,
        Multiaddr,
        std::sync::Arc<std::sync::atomic::AtomicUsize>,
    )> = targets
        .into_iter()
        .zip(ips)
        .map(|((name, (port, count)), ip)| {
            (
                name,
                format!("/ip4/{ip}/tcp/{port}").parse().unwrap(),
                count,
            )
        })
        .collect();
    let outcomes = common::netns::in_netns(&asker_ns, move || {
        use futures::StreamExt;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let keypair = libp2p::identity::Keypair::generate_ed25519();
            let mut swarm = devicelink::net::build_swarm(keypair).unwrap();
            let mut control = swarm.behaviour().stream.new_control();
            swarm
                .dial(relay_addr.with(Protocol::P2p(relay_id)))
                .unwrap();
            let driver = tokio::spawn(async move {
                loop {
                    swarm.select_next_some().await;
                }
            });
            let protocol = libp2p::StreamProtocol::new("/libp2p/autonat/2/dial-request");
            let mut outcomes = Vec::new();
            for (name, target, accepted) in asks {
                let stream = tokio::time::timeout(LIMIT, async {
                    loop {
                        match control.open_stream(relay_id, protocol.clone()).await {
                            Ok(stream) => return stream,
                            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                        }
                    }
                })
                .await
                .expect("the always-on device serves AutoNAT");
                let response =
                    tokio::time::timeout(LIMIT, autonat_wire::dial_request(stream, &target))
                        .await
                        .expect("an AutoNAT answer");
                tokio::time::sleep(Duration::from_secs(1)).await;
                let dialed = accepted.load(std::sync::atomic::Ordering::SeqCst) > 0;
                println!("{name} ({target}): dialed {dialed}, response {response:?}");
                outcomes.push((name, dialed));
            }
            driver.abort();
            outcomes
        })
    })
    .join()
    .expect("the asker ran");
    assert_eq!(
        outcomes,
        [
            ("asker's own", true),
            ("third host", false),
            ("relay's own loopback", false)
        ]
    );
    relay.stop();
}

/// Finding 11: 61,440 pair-lookup streams that never sent their question took the relay from
/// 22 to 491 MB (472 MB kept). The relay now answers at most 32 questions at once (each waits
/// 5 s for its request) and drops other streams unread. 64 strangers (all a device lets in at
/// once) open as many silent lookup streams as their connections take against `agent
/// --serve-relay` (a process, as a user starts it): its memory stays put, and once they go it
/// answers the next question at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_lookup_streams_hold_no_memory_on_the_relay() {
    use devicelink::net::lookup;
    let dir = tempfile::tempdir().unwrap();
    let relay =
        common::process::AgentProcess::start_with(dir.path(), &[], &["--no-mdns", "--serve-relay"]);
    let relay_id: libp2p::PeerId = relay.device_id.parse().unwrap();
    let relay_addr: Multiaddr = relay.addr.parse().unwrap();
    let pid = relay.child.id();
    let before = rss_kib(pid);
    let mut strangers = Vec::new();
    let mut held = Vec::new();
    for _ in 0..devicelink::net::established::MAX_STRANGER_CONNECTIONS {
        let keypair = libp2p::identity::Keypair::generate_ed25519();
        let mut stranger = raw_peer_dialing(keypair, relay_id, relay_addr.clone()).await;
        for _ in 0..1000 {
            let open = stranger
                .control
                .open_stream(relay_id, lookup::PAIR_LOOKUP_PROTOCOL);
            match tokio::time::timeout(Duration::from_secs(2), open).await {
                Ok(Ok(stream)) => held.push(stream),
                _ => break,
            }
        }
        strangers.push(stranger);
    }
    let during = rss_kib(pid);
    println!(
        "relay RSS {} MB before, {} MB with {} silent lookup streams open",
        before >> 10,
        during >> 10,
        held.len()
    );
    assert!(
        during < before + (30 << 10),
        "relay RSS {} -> {} MB",
        before >> 10,
        during >> 10
    );
    drop(held);
    drop(strangers);
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    let mut asker = raw_peer_dialing(keypair, relay_id, relay_addr).await;
    let answer = tokio::time::timeout(LIMIT, async {
        loop {
            if let Ok(stream) = asker
                .control
                .open_stream(relay_id, lookup::PAIR_LOOKUP_PROTOCOL)
                .await
            {
                if let Ok(found) = lookup::ask(stream, 12, "no-such-tag").await {
                    return found;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the relay answers again");
    assert_eq!(answer, None);
    relay.stop();
}
