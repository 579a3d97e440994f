//! The libp2p swarm: transports (TCP and QUIC, plus circuits through a relay) and the composed
//! network behaviour.
//!
//! - TCP (nodelay) + Noise + Yamux (stream windows bounded by [`super::muxer`]), with a short
//!   handshake timeout; QUIC (TLS 1.3 built in) beside it. Both reuse their listening port when
//!   dialing, so the address a NAT shows for outgoing connections is the one a hole punch needs.
//! - Addresses by name (`/dns4/relay.example.net/tcp/4001/p2p/ID`, `/dns6`, `/dns`), resolved
//!   with the system's settings.
//! - `/p2p-circuit`: connections relayed by the user's always-on device (circuit relay v2).
//! - Behaviours: connection limits; raw protocol streams (sync, pairing, handoff); identify (each
//!   side learns its address as the other sees it); the relay client; DCUtR (hole punching over a
//!   relayed connection); the AutoNAT v2 client (is an observed address reachable from outside?);
//!   and, on an always-on device only, the relay server and the AutoNAT v2 server.

use std::time::Duration;

use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{autonat, dcutr, identify, identity::Keypair, noise, relay, tcp, Swarm};

use super::established::Linked;
use super::muxer::Yamux;
use super::relay::RelayLookups;
use super::NetError;

/// The composed network behaviour.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// Connections in their handshake: in all, and from one address.
    pub pending: super::pending::PendingLimits,
    /// Established connections: in all, per device, and the share of devices not linked.
    pub established: super::established::EstablishedLimits,
    pub stream: super::streams::Behaviour,
    pub identify: identify::Behaviour,
    pub relay_client: relay::client::Behaviour,
    pub dcutr: dcutr::Behaviour,
    pub autonat: autonat::v2::client::Behaviour,
    /// Only on a device started with `--serve-relay`.
    pub relay_server: Toggle<relay::Behaviour>,
    /// Only with the relay server: tells the user's NAT'd devices whether an address of theirs
    /// is reachable from outside.
    /// It dials back only the asker's own address.
    pub autonat_server: Toggle<super::dial_back::DialBackGuard>,
}

/// How long a connection may take to finish its handshake (Noise + Yamux, or QUIC).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The identify protocol version string devicelink announces.
pub const IDENTIFY_VERSION: &str = "/devicelink/1.4.0";

/// What kind of swarm to build.
#[derive(Default, Clone)]
pub struct SwarmOptions {
    /// The user's linked devices: everyone else shares [`super::established::MAX_STRANGER_CONNECTIONS`]
    /// connections, and (with `serve_relay`) only these may reserve on the relay. `None`: no
    /// share for strangers and, as a relay, no reservations (test peers).
    pub linked: Option<Linked>,
    /// Serve as a relay (and AutoNAT server).
    pub serve_relay: bool,
    /// The relay's record of joiners that found their host by its code (see
    /// [`super::relay::server`]); the network loop fills it.
    pub lookups: RelayLookups,
}

/// A plain device's swarm (no relay server).
pub fn build_swarm(keypair: Keypair) -> Result<Swarm<Behaviour>, NetError> {
    build_swarm_with(keypair, SwarmOptions::default())
}

/// Builds a swarm for `keypair`.
pub fn build_swarm_with(
    keypair: Keypair,
    options: SwarmOptions,
) -> Result<Swarm<Behaviour>, NetError> {
    use libp2p::Transport as _;
    let transport_error = |e: &dyn std::fmt::Display| NetError::Transport(e.to_string());
    let dns_config = system_resolver();
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_quic_config(|mut config| {
            config.handshake_timeout = HANDSHAKE_TIMEOUT;
            config
        })
        .with_other_transport(|key| {
            let noise = noise::Config::new(key)?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                    .upgrade(libp2p::core::upgrade::Version::V1)
                    .authenticate(noise)
                    .multiplex(Yamux::default())
                    .timeout(HANDSHAKE_TIMEOUT),
            )
        })
        .map_err(|e| transport_error(&e))?
        .with_dns_config(dns_config.0, dns_config.1)
        .with_relay_client(noise::Config::new, Yamux::default)
        .map_err(|e| transport_error(&e))?
        .with_behaviour(|key, relay_client| {
            let local = key.public().to_peer_id();
            let serving = options.serve_relay;
            let linked = options.linked.clone();
            Behaviour {
                pending: super::pending::PendingLimits::default(),
                established: super::established::EstablishedLimits::new(linked.clone()),
                stream: super::streams::Behaviour::new(),
                identify: identify::Behaviour::new(
                    // Any peer that reaches the device (a stranger over a relay circuit too)
                    // hears this: addresses confirmed as external only (linked devices learn
                    // the others from Hello and mDNS), and no version to look up flaws by.
                    identify::Config::new(IDENTIFY_VERSION.into(), key.public())
                        .with_agent_version("devicelink".into())
                        .with_hide_listen_addrs(true),
                ),
                relay_client,
                dcutr: dcutr::Behaviour::new(local),
                autonat: autonat::v2::client::Behaviour::default(),
                relay_server: Toggle::from(serving.then(|| {
                    let access = linked.unwrap_or_else(|| std::sync::Arc::new(|_: &_| false));
                    super::relay::server(local, access, options.lookups.clone())
                })),
                autonat_server: Toggle::from(
                    serving.then(super::dial_back::DialBackGuard::default),
                ),
            }
        })
        .map_err(|e| transport_error(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    Ok(swarm)
}

/// The system's resolver settings (`/etc/resolv.conf` and `/etc/hosts` on Linux), for addresses
/// given by name. Without readable settings, names resolve from the hosts file only (said once
/// in the log): addresses by IP are unaffected.
fn system_resolver() -> (libp2p::dns::ResolverConfig, libp2p::dns::ResolverOpts) {
    hickory_resolver::system_conf::read_system_conf().unwrap_or_else(|e| {
        tracing::warn!(
            "cannot read the system's DNS settings ({e}): addresses by name (/dns4/...) resolve \
             from the hosts file only"
        );
        (
            libp2p::dns::ResolverConfig::from_parts(None, Vec::new(), Vec::new()),
            libp2p::dns::ResolverOpts::default(),
        )
    })
}

/// `configured` listen addresses with each port 0 replaced by the port an earlier run bound for
/// the same kind of address (IPv4 or IPv6; TCP or QUIC) in `bound`; others are kept as they are.
pub(crate) fn keep_bound_ports(
    configured: &[libp2p::Multiaddr],
    bound: &[libp2p::Multiaddr],
) -> Vec<libp2p::Multiaddr> {
    use libp2p::multiaddr::Protocol;
    /// (IPv6, TCP, QUIC) and the port of an address.
    fn shape(addr: &libp2p::Multiaddr) -> ((bool, bool, bool), Option<u16>) {
        let (mut kind, mut port) = ((false, false, false), None);
        for protocol in addr.iter() {
            match protocol {
                Protocol::Ip6(_) => kind.0 = true,
                Protocol::Tcp(p) => (kind.1, port) = (true, Some(p)),
                Protocol::Udp(p) => port = Some(p),
                Protocol::QuicV1 => kind.2 = true,
                _ => {}
            }
        }
        (kind, port)
    }
    // Ports configured explicitly are not taken for another address.
    let fixed: Vec<_> = configured.iter().map(shape).collect();
    configured
        .iter()
        .map(|addr| {
            let (kind, port) = shape(addr);
            let earlier = bound
                .iter()
                // A relayed address carries the relay's port, not one of this device's.
                .filter(|b| !b.iter().any(|p| p == Protocol::P2pCircuit))
                .map(shape)
                .find(|b| b.0 == kind && b.1.is_some_and(|p| p != 0) && !fixed.contains(b));
            match (port, earlier) {
                (Some(0), Some((_, Some(bound_port)))) => addr
                    .iter()
                    .map(|protocol| match protocol {
                        Protocol::Tcp(0) => Protocol::Tcp(bound_port),
                        Protocol::Udp(0) => Protocol::Udp(bound_port),
                        other => other,
                    })
                    .collect(),
                _ => addr.clone(),
            }
        })
        .collect()
}

#[cfg(test)]
mod keep_bound_ports_tests {
    use super::keep_bound_ports;
    use libp2p::Multiaddr;

    fn addrs(texts: &[&str]) -> Vec<Multiaddr> {
        texts
            .iter()
            .map(|t| t.parse().expect("multiaddr"))
            .collect()
    }

    #[test]
    fn port_0_takes_the_port_bound_for_the_same_kind_of_address() {
        let configured = addrs(&[
            "/ip4/127.0.0.1/tcp/4001",
            "/ip4/0.0.0.0/tcp/0",
            "/ip4/0.0.0.0/udp/0/quic-v1",
            "/ip6/::/tcp/0",
        ]);
        let bound = addrs(&[
            "/ip4/127.0.0.1/tcp/4001",
            "/ip4/192.0.2.7/tcp/41000",
            "/ip4/127.0.0.1/tcp/41000",
            "/ip4/127.0.0.1/udp/42000/quic-v1",
        ]);
        assert_eq!(
            keep_bound_ports(&configured, &bound),
            addrs(&[
                "/ip4/127.0.0.1/tcp/4001",
                "/ip4/0.0.0.0/tcp/41000",
                "/ip4/0.0.0.0/udp/42000/quic-v1",
                // Nothing bound over IPv6: left to pick a free port again.
                "/ip6/::/tcp/0",
            ])
        );
    }
}
