//! Finding the user's other devices on the local network with mDNS (mdns-sd).
//!
//! Every agent advertises `_devicelink._udp.local.` with TXT records `v` (protocol version),
//! `id` (device id), `name`, `quic` (its QUIC port, when it listens on QUIC) and, while a pairing
//! code is open, `pair` (the code's public slot), and browses for the others. The announcement
//! follows the agent's listeners: [`Discovery::advertise`] is called again whenever a listen
//! address comes or goes, and the A/AAAA records follow the interfaces (mdns-sd watches them).
//! Nothing about documents is ever broadcast. An announcement is only a
//! *claim*: the agent dials the claimed id, and the Noise handshake fails unless the device really
//! holds that id's key, so a spoofed announcement cannot impersonate a trusted device.

use std::net::{IpAddr, Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::Duration;

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent, ServiceInfo};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::sync::PROTOCOL_VERSION;

/// The DNS-SD service type of devicelink agents.
pub const SERVICE_TYPE: &str = "_devicelink._udp.local.";

/// How discovery runs.
#[derive(Debug, Clone, Default)]
pub struct DiscoveryConfig {
    /// Advertise and browse at all (`--no-mdns` turns it off).
    pub enabled: bool,
    /// Use only the loopback interface (tests, and several agents on one machine).
    pub loopback_only: bool,
    /// Addresses to advertise; empty = every address of the enabled interfaces.
    pub advertise_ips: Vec<IpAddr>,
}

impl DiscoveryConfig {
    /// mDNS on the loopback interface only, advertising 127.0.0.1: no traffic leaves the machine.
    pub fn loopback() -> Self {
        Self {
            enabled: true,
            loopback_only: true,
            advertise_ips: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
        }
    }
}

/// Another agent announcing itself (unauthenticated until dialed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Announcement {
    #[serde(serialize_with = "ser_display")]
    pub claimed_id: PeerId,
    pub name: String,
    pub version: String,
    #[serde(serialize_with = "ser_addrs")]
    pub addrs: Vec<Multiaddr>,
    /// The public slot of the pairing code it has open, if any.
    pub pair_slot: Option<u16>,
}

fn ser_display<S: serde::Serializer>(v: &PeerId, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn ser_addrs<S: serde::Serializer>(v: &[Multiaddr], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|a| a.to_string()))
}

#[derive(Debug, Clone)]
pub enum DiscoveryEvent {
    Found(Announcement),
    Lost(PeerId),
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("mDNS is unavailable: {0}")]
    Mdns(#[from] mdns_sd::Error),
}

/// What an announcement says about where this device listens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenPorts {
    /// The TCP port (the SRV record's port; 0 = no TCP listener).
    pub tcp: Option<u16>,
    /// The QUIC (UDP) port.
    pub quic: Option<u16>,
    /// Addresses the listeners are bound to; empty when one listens on every interface (then
    /// the interfaces' addresses are announced, following them as they come and go).
    pub ips: Vec<IpAddr>,
}

impl ListenPorts {
    /// The ports and bound addresses of a set of listen addresses (relayed ones are ignored).
    pub fn of(addrs: &[Multiaddr]) -> Self {
        let mut ports = Self::default();
        let mut any_unspecified = false;
        for addr in addrs {
            if addr.iter().any(|p| matches!(p, Protocol::P2pCircuit)) {
                continue;
            }
            let mut ip = None;
            let mut udp = None;
            for protocol in addr.iter() {
                match protocol {
                    Protocol::Ip4(v4) => ip = Some(IpAddr::V4(v4)),
                    Protocol::Ip6(v6) => ip = Some(IpAddr::V6(v6)),
                    Protocol::Tcp(port) if ports.tcp.is_none() => ports.tcp = Some(port),
                    Protocol::Udp(port) => udp = Some(port),
                    Protocol::QuicV1 if ports.quic.is_none() => ports.quic = udp,
                    _ => {}
                }
            }
            match ip {
                Some(ip) if ip.is_unspecified() => any_unspecified = true,
                Some(ip) if !ports.ips.contains(&ip) => ports.ips.push(ip),
                _ => {}
            }
        }
        if any_unspecified {
            ports.ips.clear();
        }
        ports
    }

    fn is_empty(&self) -> bool {
        self.tcp.is_none() && self.quic.is_none()
    }
}

/// The running advertiser and browser. Dropping it stops both.
pub struct Discovery {
    daemon: ServiceDaemon,
    device_id: PeerId,
    name: String,
    config: DiscoveryConfig,
    /// What the current announcement says (empty: nothing announced yet) and its pairing slot.
    announced: ListenPorts,
    announced_slot: Option<u16>,
    browser: tokio::task::JoinHandle<()>,
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.browser.abort();
        let _ = self.daemon.shutdown();
    }
}

impl Discovery {
    /// Starts browsing for other agents; [`Discovery::advertise`] announces this device.
    pub fn start(
        config: DiscoveryConfig,
        device_id: PeerId,
        name: &str,
        events: mpsc::UnboundedSender<DiscoveryEvent>,
    ) -> Result<Self, DiscoveryError> {
        let daemon = ServiceDaemon::new()?;
        if config.loopback_only {
            daemon.disable_interface(IfKind::All)?;
            daemon.enable_interface(IfKind::LoopbackV4)?;
        }
        let receiver = daemon.browse(SERVICE_TYPE)?;
        let browser = tokio::spawn(async move {
            while let Ok(event) = receiver.recv_async().await {
                let event = match event {
                    ServiceEvent::ServiceResolved(service) => match parse(&service) {
                        Some(a) if a.claimed_id != device_id => DiscoveryEvent::Found(a),
                        _ => continue,
                    },
                    ServiceEvent::ServiceRemoved(_, fullname) => match instance_id(&fullname) {
                        Some(id) if id != device_id => DiscoveryEvent::Lost(id),
                        _ => continue,
                    },
                    _ => continue,
                };
                if events.send(event).is_err() {
                    return;
                }
            }
        });
        Ok(Self {
            daemon,
            device_id,
            name: name.to_string(),
            config,
            announced: ListenPorts::default(),
            announced_slot: None,
            browser,
        })
    }

    /// (Re-)announces this device listening on `ports`, with `pair_slot` while a pairing code
    /// is open; withdraws the announcement while it listens nowhere. Returns whether anything
    /// is announced.
    pub fn advertise(
        &mut self,
        ports: &ListenPorts,
        pair_slot: Option<u16>,
    ) -> Result<bool, DiscoveryError> {
        if *ports == self.announced && pair_slot == self.announced_slot {
            return Ok(!ports.is_empty()); // unchanged: no new announcement (and no new probing)
        }
        let id = self.device_id.to_string();
        if ports.is_empty() {
            if !self.announced.is_empty() {
                let fullname = format!("{id}.{SERVICE_TYPE}");
                // Best effort: the record also expires on its own (its TTL).
                let _ = self.daemon.unregister(&fullname);
            }
            self.announced = ListenPorts::default();
            self.announced_slot = pair_slot;
            return Ok(false);
        }
        let version = PROTOCOL_VERSION.to_string();
        let slot = pair_slot.map(|s| s.to_string());
        let quic = ports.quic.map(|p| p.to_string());
        let mut properties = vec![
            ("v", version.as_str()),
            ("id", id.as_str()),
            ("name", self.name.as_str()),
        ];
        if let Some(quic) = &quic {
            properties.push(("quic", quic.as_str()));
        }
        if let Some(slot) = &slot {
            properties.push(("pair", slot.as_str()));
        }
        let host = format!("dl-{:08x}.local.", crc32fast::hash(id.as_bytes()));
        let ips: Vec<IpAddr> = if self.config.advertise_ips.is_empty() {
            ports.ips.clone()
        } else {
            self.config.advertise_ips.clone()
        };
        let info = ServiceInfo::new(
            SERVICE_TYPE,
            &id,
            &host,
            &ips[..],
            ports.tcp.unwrap_or(0),
            &properties[..],
        )?;
        let info = if ips.is_empty() {
            info.enable_addr_auto()
        } else {
            info
        };
        self.daemon.register(info)?;
        self.announced = ports.clone();
        self.announced_slot = pair_slot;
        Ok(true)
    }
}

fn instance_id(fullname: &str) -> Option<PeerId> {
    fullname.split('.').next()?.parse().ok()
}

fn parse(service: &mdns_sd::ResolvedService) -> Option<Announcement> {
    let claimed_id: PeerId = service.get_property_val_str("id")?.parse().ok()?;
    let tcp = Some(service.get_port()).filter(|p| *p != 0);
    let quic: Option<u16> = service
        .get_property_val_str("quic")
        .and_then(|p| p.parse().ok())
        .filter(|p| *p != 0);
    let mut addrs = Vec::new();
    for ip in service.get_addresses() {
        let base = match ip.to_ip_addr() {
            IpAddr::V4(v4) => Multiaddr::empty().with(Protocol::Ip4(v4)),
            // A link-local address needs its interface to be dialed: not announced usefully.
            IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80 => continue,
            IpAddr::V6(v6) => Multiaddr::empty().with(Protocol::Ip6(v6)),
        };
        if let Some(port) = tcp {
            addrs.push(base.clone().with(Protocol::Tcp(port)));
        }
        if let Some(port) = quic {
            addrs.push(base.with(Protocol::Udp(port)).with(Protocol::QuicV1));
        }
    }
    Some(Announcement {
        claimed_id,
        name: service
            .get_property_val_str("name")
            .unwrap_or("")
            .to_string(),
        version: service.get_property_val_str("v").unwrap_or("").to_string(),
        addrs,
        pair_slot: service
            .get_property_val_str("pair")
            .and_then(|s| s.parse().ok()),
    })
}

/// Whether IPv4 multicast works on one interface, as `doctor` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct InterfaceReport {
    pub name: String,
    pub addr: String,
    pub multicast: bool,
    pub detail: String,
}

/// Sends a multicast datagram to the mDNS group on `iface` with loopback on and waits for it to
/// come back: the same path mDNS uses. Uses port 0-bound sockets, so it never disturbs mDNS.
pub fn probe_multicast(iface: Ipv4Addr) -> Result<(), String> {
    let group = Ipv4Addr::new(224, 0, 0, 251);
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .map_err(|e| format!("socket: {e}"))?;
    socket
        .set_reuse_address(true)
        .map_err(|e| format!("reuse: {e}"))?;
    socket
        .bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0).into())
        .map_err(|e| format!("bind: {e}"))?;
    socket
        .join_multicast_v4(&group, &iface)
        .map_err(|e| format!("join 224.0.0.251: {e}"))?;
    socket
        .set_multicast_if_v4(&iface)
        .map_err(|e| format!("multicast interface: {e}"))?;
    socket
        .set_multicast_loop_v4(true)
        .map_err(|e| format!("multicast loop: {e}"))?;
    let socket: UdpSocket = socket.into();
    socket
        .set_read_timeout(Some(Duration::from_millis(300)))
        .map_err(|e| format!("timeout: {e}"))?;
    let port = socket
        .local_addr()
        .map_err(|e| format!("local addr: {e}"))?
        .port();
    let token = format!("devicelink-probe-{}", std::process::id());
    socket
        .send_to(token.as_bytes(), SocketAddrV4::new(group, port))
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = [0u8; 64];
    loop {
        match socket.recv_from(&mut buf) {
            Ok((n, _)) if &buf[..n] == token.as_bytes() => return Ok(()),
            Ok(_) => continue,
            Err(e) => return Err(format!("no multicast echo within 300 ms: {e}")),
        }
    }
}

/// Probes every IPv4 interface that is up (loopback included).
pub fn probe_interfaces() -> Vec<InterfaceReport> {
    let interfaces = match if_addrs::get_if_addrs() {
        Ok(list) => list,
        Err(e) => {
            return vec![InterfaceReport {
                name: "*".into(),
                addr: String::new(),
                multicast: false,
                detail: format!("cannot list interfaces: {e}"),
            }]
        }
    };
    interfaces
        .into_iter()
        .filter_map(|iface| match iface.ip() {
            IpAddr::V4(v4) => Some((iface.name, v4)),
            IpAddr::V6(_) => None,
        })
        .map(|(name, v4)| {
            let result = probe_multicast(v4);
            InterfaceReport {
                name,
                addr: v4.to_string(),
                multicast: result.is_ok(),
                detail: result.err().unwrap_or_else(|| "multicast works".into()),
            }
        })
        .collect()
}
