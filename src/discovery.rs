//! Finding the user's other devices on the local network with mDNS (mdns-sd).
//!
//! Every agent advertises `_devicelink._udp.local.` with TXT records `v` (protocol version),
//! `id` (device id), `name` and, while a pairing code is open, `pair` (the code's public slot), and
//! browses for the others. Nothing about documents is ever broadcast. An announcement is only a
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

/// The running advertiser and browser. Dropping it stops both.
pub struct Discovery {
    daemon: ServiceDaemon,
    device_id: PeerId,
    name: String,
    port: u16,
    config: DiscoveryConfig,
    browser: tokio::task::JoinHandle<()>,
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.browser.abort();
        let _ = self.daemon.shutdown();
    }
}

impl Discovery {
    /// Starts advertising `device_id` (listening on TCP `port`) and browsing for other agents.
    pub fn start(
        config: DiscoveryConfig,
        device_id: PeerId,
        name: &str,
        port: u16,
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
        let discovery = Self {
            daemon,
            device_id,
            name: name.to_string(),
            port,
            config,
            browser,
        };
        discovery.advertise(None)?;
        Ok(discovery)
    }

    /// (Re-)announces this device, with `pair_slot` while a pairing code is open.
    pub fn advertise(&self, pair_slot: Option<u16>) -> Result<(), DiscoveryError> {
        let version = PROTOCOL_VERSION.to_string();
        let id = self.device_id.to_string();
        let slot = pair_slot.map(|s| s.to_string());
        let mut properties = vec![
            ("v", version.as_str()),
            ("id", id.as_str()),
            ("name", self.name.as_str()),
        ];
        if let Some(slot) = &slot {
            properties.push(("pair", slot.as_str()));
        }
        let host = format!("dl-{:08x}.local.", crc32fast::hash(id.as_bytes()));
        let ips: Vec<IpAddr> = self.config.advertise_ips.clone();
        let info = ServiceInfo::new(
            SERVICE_TYPE,
            &id,
            &host,
            &ips[..],
            self.port,
            &properties[..],
        )?;
        let info = if ips.is_empty() {
            info.enable_addr_auto()
        } else {
            info
        };
        self.daemon.register(info)?;
        Ok(())
    }
}

fn instance_id(fullname: &str) -> Option<PeerId> {
    fullname.split('.').next()?.parse().ok()
}

fn parse(service: &mdns_sd::ResolvedService) -> Option<Announcement> {
    let claimed_id: PeerId = service.get_property_val_str("id")?.parse().ok()?;
    let port = service.get_port();
    let addrs = service
        .get_addresses()
        .iter()
        .map(|ip| {
            let ip = ip.to_ip_addr();
            let base = match ip {
                IpAddr::V4(v4) => Multiaddr::empty().with(Protocol::Ip4(v4)),
                IpAddr::V6(v6) => Multiaddr::empty().with(Protocol::Ip6(v6)),
            };
            base.with(Protocol::Tcp(port))
        })
        .collect();
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
