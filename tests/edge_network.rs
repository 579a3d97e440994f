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

/// Finding 4: the relay told any stranger which device had a pairing code open (slots 0..99 in
/// 0.03 s, with the device id), and three wrong guesses burned the code at once, so the real
/// joiner got "too many wrong codes". Lookups now need the whole code (the slot and a tag made
/// from the secret digits), and the host takes a new attempt at most every few seconds after a
/// failed one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_learn_nothing_from_lookups_and_cannot_burn_a_code() {
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    // The relay announces its address as external (it would be public), so that it can give
    // the laptop a reservation.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let public: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap();
    let relay = start_with(dirs[0].path(), "relay", |c| {
        c.serve_relay = true;
        c.listen = vec![public.clone()];
        c.external = vec![public.clone()];
    })
    .await;
    let relay_addr = with_id(&relay.listen_addrs()[0], &relay);
    let laptop = start_with(dirs[1].path(), "laptop", |c| {
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
