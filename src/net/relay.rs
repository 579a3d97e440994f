//! Circuit relay v2 through the user's always-on device: the server side (`agent --serve-relay`)
//! and this device's reservations on relays (`agent --relay ADDR`, or any relay the device group
//! names).
//!
//! Server: serves only the devices [`RelayAccess`] admits (the user's linked devices) for
//! reservations; circuits are open to the user's devices and, slowly, to others (a device that
//! pairs through the relay is not linked yet; the device it reaches refuses it everything but
//! pairing). Limits are sized for sync, not just signalling: no byte cap, circuits live for hours.
//!
//! Client: one reservation per relay, made as soon as the relay is connected, renewed by libp2p
//! (at 3/4 of its lifetime), and made again with a backoff when the relay goes away or refuses.
//! The relayed addresses it yields are this device's listen addresses like any other: they go
//! into the sync hello and the device group, so peers with no direct path dial them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use libp2p::core::transport::ListenerId;
use libp2p::multiaddr::Protocol;
use libp2p::{relay, Multiaddr, PeerId};
use serde::Serialize;
use tokio::time::Instant;

/// Which devices may reserve on this relay (and open circuits without a pair lookup).
pub type RelayAccess = super::established::Linked;

/// How long a reservation lasts; clients renew it at 3/4 of this.
pub const RESERVATION_DURATION: Duration = Duration::from_secs(3600);
/// Reservations held at once, and per device.
pub const MAX_RESERVATIONS: usize = 128;
pub const MAX_RESERVATIONS_PER_PEER: usize = 4;
/// Circuits (relayed connections) at once, and per device (either end).
pub const MAX_CIRCUITS: usize = 256;
pub const MAX_CIRCUITS_PER_PEER: usize = 16;
/// How long one circuit may live; the devices then connect again (sync resumes where it was).
pub const MAX_CIRCUIT_DURATION: Duration = Duration::from_secs(6 * 3600);
/// Circuits a device that is not linked may open, per minute: enough to pair through the relay.
pub const STRANGER_CIRCUITS_PER_MINUTE: u32 = 4;
/// Circuits all devices that are not linked and have not found a host by its code (a joiner
/// given the host's relayed address) may open together, per minute: new identities cannot
/// multiply it, and a joiner that asks the relay with the code is not counted against it.
pub const UNASKED_CIRCUITS_PER_MINUTE: u32 = 30;
/// How long a found pairing host stays open to its joiner's circuits.
pub const LOOKUP_GRANT: Duration = Duration::from_secs(120);
/// Joiners remembered at once (a found host needs the whole code: there are few).
const MAX_GRANTS: usize = 1024;

/// The relay server: limits above, reservations only for admitted devices, circuits for them
/// and, a few a minute, for others (joiners); those that found their host by its code have
/// their own budget. These are the only rules: libp2p's default rate limiters (per device and
/// per IP address, 60 then one a minute) are not used, since devices behind one NAT share an
/// address with whoever else is there.
pub fn server(local: PeerId, access: RelayAccess, lookups: RelayLookups) -> relay::Behaviour {
    let mut config = relay::Config {
        max_reservations: MAX_RESERVATIONS,
        max_reservations_per_peer: MAX_RESERVATIONS_PER_PEER,
        reservation_duration: RESERVATION_DURATION,
        max_circuits: MAX_CIRCUITS,
        max_circuits_per_peer: MAX_CIRCUITS_PER_PEER,
        max_circuit_duration: MAX_CIRCUIT_DURATION,
        // 0: no byte limit (sync carries whole documents).
        max_circuit_bytes: 0,
        ..relay::Config::default()
    };
    // Reservations: linked devices only.
    let reserve_access = access.clone();
    config.reservation_rate_limiters = vec![Box::new(move |peer: PeerId, _: &Multiaddr, _| {
        reserve_access(&peer)
    })];
    // Circuits: linked devices freely; others a few a minute each, and those that did not ask
    // with the code a few a minute together (so identity churn cannot crowd out a joiner that
    // knows the code, nor fill its host's handshake slots).
    let mut stranger_circuits = StrangerRate::default();
    config.circuit_src_rate_limiters = vec![Box::new(move |peer: PeerId, _: &Multiaddr, _| {
        let now = std::time::Instant::now();
        access(&peer) || stranger_circuits.admit(peer, lookups.found_recently(&peer, now), now)
    })];
    let mut server = relay::Behaviour::new(local, config);
    // Fixed on: the relay does not wait for AutoNAT to call this device public (it is told so
    // with --serve-relay), and a status change later would go to every connection.
    server.set_status(Some(relay::Status::Enable));
    server
}

/// The joiners that found a pairing host through this relay's pair lookup, and when: the
/// circuits of devices that are not linked are open to them only.
#[derive(Clone, Default)]
pub struct RelayLookups(Arc<std::sync::Mutex<HashMap<PeerId, std::time::Instant>>>);

impl RelayLookups {
    /// `joiner` named an open code correctly.
    pub(crate) fn found(&self, joiner: PeerId) {
        let now = std::time::Instant::now();
        let mut found = self.0.lock().unwrap_or_else(|e| e.into_inner());
        found.retain(|_, at| now.duration_since(*at) < LOOKUP_GRANT);
        if found.len() < MAX_GRANTS || found.contains_key(&joiner) {
            found.insert(joiner, now);
        }
    }

    fn found_recently(&self, peer: &PeerId, now: std::time::Instant) -> bool {
        let found = self.0.lock().unwrap_or_else(|e| e.into_inner());
        found
            .get(peer)
            .is_some_and(|at| now.duration_since(*at) < LOOKUP_GRANT)
    }
}

/// A per-device budget of [`STRANGER_CIRCUITS_PER_MINUTE`], for at most 1,024 devices a minute,
/// and [`UNASKED_CIRCUITS_PER_MINUTE`] over every device that did not ask with the code.
#[derive(Default)]
struct StrangerRate {
    window: Option<std::time::Instant>,
    used: HashMap<PeerId, u32>,
    unasked: u32,
}

impl StrangerRate {
    fn admit(&mut self, peer: PeerId, asked: bool, now: std::time::Instant) -> bool {
        if self
            .window
            .is_none_or(|w| now.duration_since(w) > Duration::from_secs(60))
        {
            self.window = Some(now);
            self.used.clear();
            self.unasked = 0;
        }
        if self.used.len() >= 1024 && !self.used.contains_key(&peer) {
            return false;
        }
        if !asked && self.unasked >= UNASKED_CIRCUITS_PER_MINUTE {
            return false;
        }
        let used = self.used.entry(peer).or_default();
        if *used >= STRANGER_CIRCUITS_PER_MINUTE {
            return false;
        }
        *used += 1;
        if !asked {
            self.unasked += 1;
        }
        true
    }
}

/// Splits a relay address given by the user into the relay's id and its address
/// (`/ip4/203.0.113.7/tcp/4001/p2p/12D3...`).
pub fn parse_relay_addr(addr: &Multiaddr) -> Result<(PeerId, Multiaddr), String> {
    let mut transport = Multiaddr::empty();
    let mut peer = None;
    for protocol in addr.iter() {
        match protocol {
            Protocol::P2p(id) => peer = Some(id),
            Protocol::P2pCircuit => {
                return Err(format!(
                    "{addr} is a relayed address; give the relay's own address, ending in /p2p/ID"
                ))
            }
            other if peer.is_none() => transport.push(other),
            _ => return Err(format!("{addr}: nothing may follow /p2p/ID")),
        }
    }
    match peer {
        None => Err(format!("{addr} must end in /p2p/ID, the relay's device id")),
        Some(_) if transport.is_empty() => Err(format!("{addr} has no address before /p2p/ID")),
        Some(peer) => Ok((peer, transport)),
    }
}

/// Whether an address goes through a relay.
pub fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

/// The relay's own address (`.../p2p/RELAY`) in a relayed address, if it names one.
pub fn relay_of(addr: &Multiaddr) -> Option<Multiaddr> {
    let mut relay = Multiaddr::empty();
    for protocol in addr.iter() {
        if protocol == Protocol::P2pCircuit {
            return matches!(relay.iter().last(), Some(Protocol::P2p(_))).then_some(relay);
        }
        relay.push(protocol);
    }
    None
}

/// Whether an address is only meaningful on this machine (loopback) or says "any address".
pub fn is_local_only(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_loopback() || ip.is_unspecified(),
        Protocol::Ip6(ip) => ip.is_loopback() || ip.is_unspecified(),
        _ => false,
    })
}

/// Where a relay came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RelaySource {
    /// `agent --relay ADDR`.
    Flag,
    /// A device of the group that serves as a relay.
    DeviceGroup,
}

/// One relay this device reserves on, as reported by `status` and `doctor`.
#[derive(Debug, Clone, Serialize)]
pub struct RelayReport {
    pub relay: String,
    pub source: RelaySource,
    /// `reserved`, `reserving` or `not reserved`.
    pub state: String,
    /// The relayed addresses peers can dial this device at (while reserved).
    pub relayed_addrs: Vec<String>,
    /// Why the last reservation ended or failed.
    pub last_error: Option<String>,
    /// Seconds since the Unix epoch when the current reservation was first accepted.
    pub reserved_since: Option<u64>,
}

struct Entry {
    source: RelaySource,
    /// The relay's addresses (without `/p2p/ID`); tried in turn.
    addrs: Vec<Multiaddr>,
    next_addr: usize,
    listener: Option<ListenerId>,
    relayed: Vec<Multiaddr>,
    reserved_since: Option<SystemTime>,
    last_error: Option<String>,
    retry_at: Instant,
    delay: Duration,
}

/// First and longest wait before reserving again after a failure (a connection to the relay
/// makes it try at once).
const RETRY: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(30));

/// This device's reservations, one per relay.
#[derive(Default)]
pub(crate) struct Reservations {
    relays: HashMap<PeerId, Entry>,
}

impl Reservations {
    /// Relays named by `--relay` (kept whatever the device group says).
    pub fn add_configured(&mut self, peer: PeerId, addr: Multiaddr) {
        self.upsert(peer, vec![addr], RelaySource::Flag);
    }

    /// The relays the device group names now (its members started with `--serve-relay`).
    pub fn set_from_group(&mut self, relays: Vec<(PeerId, Vec<Multiaddr>)>) {
        self.relays.retain(|peer, e| {
            e.source == RelaySource::Flag || relays.iter().any(|(p, _)| p == peer)
        });
        for (peer, addrs) in relays {
            let addrs: Vec<Multiaddr> = addrs
                .into_iter()
                .filter(|a| !is_relayed(a))
                .map(|a| strip_p2p(&a))
                .collect();
            if !addrs.is_empty() {
                self.upsert(peer, addrs, RelaySource::DeviceGroup);
            }
        }
    }

    fn upsert(&mut self, peer: PeerId, mut addrs: Vec<Multiaddr>, source: RelaySource) {
        // Addresses other devices can reach first; loopback ones last (a relay on this machine).
        addrs.sort_by_key(is_local_only);
        addrs.dedup();
        match self.relays.get_mut(&peer) {
            Some(entry) => match (entry.source, source) {
                // The group's view replaces itself; `--relay` replaces the group's.
                (RelaySource::DeviceGroup, _) => {
                    entry.addrs = addrs;
                    entry.source = source;
                }
                // A relay named by `--relay`: more ways to reach it are added.
                (RelaySource::Flag, _) => {
                    for a in addrs {
                        if !entry.addrs.contains(&a) {
                            entry.addrs.push(a);
                        }
                    }
                }
            },
            None => {
                self.relays.insert(
                    peer,
                    Entry {
                        source,
                        addrs,
                        next_addr: 0,
                        listener: None,
                        relayed: Vec::new(),
                        reserved_since: None,
                        last_error: None,
                        retry_at: Instant::now(),
                        delay: RETRY.0,
                    },
                );
            }
        }
    }

    /// The relay is connected: reserve at once if not reserved.
    pub fn on_connected(&mut self, peer: &PeerId) {
        if let Some(entry) = self.relays.get_mut(peer) {
            if entry.listener.is_none() {
                entry.retry_at = Instant::now();
            }
        }
    }

    /// Whether a relay this device should reserve on has no reservation yet (one is being
    /// made, or will be retried).
    pub fn pending(&self, local: PeerId) -> bool {
        self.relays.iter().any(|(peer, entry)| {
            *peer != local && entry.listener.is_none() && !entry.addrs.is_empty()
        })
    }

    /// Relays to reserve on now: `(relay, listen address ending in /p2p-circuit)`. The caller
    /// starts each listener and reports its id with [`Self::listening`].
    pub fn due(&mut self, local: PeerId) -> Vec<(PeerId, Multiaddr)> {
        let now = Instant::now();
        let mut out = Vec::new();
        for (peer, entry) in &mut self.relays {
            if *peer == local || entry.listener.is_some() || entry.retry_at > now {
                continue;
            }
            let Some(addr) = entry.addrs.get(entry.next_addr % entry.addrs.len().max(1)) else {
                continue;
            };
            out.push((
                *peer,
                addr.clone()
                    .with(Protocol::P2p(*peer))
                    .with(Protocol::P2pCircuit),
            ));
        }
        out
    }

    pub fn listening(&mut self, relay: PeerId, listener: Result<ListenerId, String>) {
        if let Some(entry) = self.relays.get_mut(&relay) {
            match listener {
                Ok(id) => entry.listener = Some(id),
                Err(e) => entry.failed(e),
            }
        }
    }

    /// A listen address was reported; returns whether it is a relayed one of ours.
    pub fn on_new_listen_addr(&mut self, listener: ListenerId, addr: &Multiaddr) -> bool {
        let Some(entry) = self
            .relays
            .values_mut()
            .find(|e| e.listener == Some(listener))
        else {
            return false;
        };
        if !entry.relayed.contains(addr) {
            entry.relayed.push(addr.clone());
        }
        if entry.reserved_since.is_none() {
            entry.reserved_since = Some(SystemTime::now());
            tracing::info!("relay reservation accepted: reachable at {addr}");
        }
        entry.last_error = None;
        entry.delay = RETRY.0;
        true
    }

    /// A listener closed; returns the relayed addresses it had (now gone), if it was a relay's.
    pub fn on_listener_closed(
        &mut self,
        listener: ListenerId,
        reason: Result<(), String>,
    ) -> Option<Vec<Multiaddr>> {
        let entry = self
            .relays
            .values_mut()
            .find(|e| e.listener == Some(listener))?;
        let gone = std::mem::take(&mut entry.relayed);
        let reason = match reason {
            Ok(()) if entry.reserved_since.is_some() => {
                "the connection to the relay closed".to_string()
            }
            Ok(()) => "the relay could not be reached".to_string(),
            Err(e) => e,
        };
        tracing::warn!("relay reservation ended: {reason}; trying again");
        entry.failed(reason);
        Some(gone)
    }

    /// What `status` and `doctor` show.
    pub fn report(&self) -> Vec<RelayReport> {
        let mut out: Vec<RelayReport> = self
            .relays
            .iter()
            .map(|(peer, e)| RelayReport {
                relay: peer.to_string(),
                source: e.source,
                state: if !e.relayed.is_empty() {
                    "reserved"
                } else if e.listener.is_some() {
                    "reserving"
                } else {
                    "not reserved"
                }
                .to_string(),
                relayed_addrs: e.relayed.iter().map(|a| a.to_string()).collect(),
                last_error: e.last_error.clone(),
                reserved_since: e
                    .reserved_since
                    .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                    .map(|d| d.as_secs()),
            })
            .collect();
        out.sort_by(|a, b| a.relay.cmp(&b.relay));
        out
    }
}

impl Entry {
    fn failed(&mut self, reason: String) {
        self.listener = None;
        self.relayed.clear();
        self.reserved_since = None;
        self.last_error = Some(reason);
        self.next_addr = self.next_addr.wrapping_add(1);
        self.retry_at = Instant::now() + self.delay;
        self.delay = (self.delay * 2).min(RETRY.1);
    }
}

/// `addr` without a trailing `/p2p/ID`.
fn strip_p2p(addr: &Multiaddr) -> Multiaddr {
    addr.iter()
        .filter(|p| !matches!(p, Protocol::P2p(_)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_addresses_must_name_the_relay() {
        let id = PeerId::random();
        let ok: Multiaddr = format!("/ip4/203.0.113.7/tcp/4001/p2p/{id}")
            .parse()
            .unwrap();
        assert_eq!(
            parse_relay_addr(&ok).unwrap(),
            (id, "/ip4/203.0.113.7/tcp/4001".parse().unwrap())
        );
        let no_id: Multiaddr = "/ip4/203.0.113.7/tcp/4001".parse().unwrap();
        assert!(parse_relay_addr(&no_id).unwrap_err().contains("/p2p/ID"));
        let relayed: Multiaddr = format!("{ok}/p2p-circuit/p2p/{}", PeerId::random())
            .parse()
            .unwrap();
        assert!(parse_relay_addr(&relayed)
            .unwrap_err()
            .contains("relayed address"));
        let only_id: Multiaddr = format!("/p2p/{id}").parse().unwrap();
        assert!(parse_relay_addr(&only_id).is_err());
    }

    #[test]
    fn strangers_get_a_few_circuits_a_minute() {
        let mut rate = StrangerRate::default();
        let (a, b) = (PeerId::random(), PeerId::random());
        let now = std::time::Instant::now();
        let admitted = (0..10).filter(|_| rate.admit(a, true, now)).count();
        assert_eq!(admitted, STRANGER_CIRCUITS_PER_MINUTE as usize);
        assert!(rate.admit(b, true, now), "the budget is per device");
        assert!(
            rate.admit(a, true, now + Duration::from_secs(61)),
            "and per minute"
        );
        // New identities that did not ask with the code share one budget; one that asked
        // still gets its circuits once that is spent.
        let now = now + Duration::from_secs(61);
        let churned = (0..100)
            .filter(|_| rate.admit(PeerId::random(), false, now))
            .count();
        assert_eq!(churned, UNASKED_CIRCUITS_PER_MINUTE as usize);
        assert!(rate.admit(PeerId::random(), true, now));
    }

    #[test]
    fn a_lost_reservation_is_retried_and_reported() {
        let mut reservations = Reservations::default();
        let relay = PeerId::random();
        reservations.add_configured(relay, "/ip4/203.0.113.7/tcp/4001".parse().unwrap());
        let due = reservations.due(PeerId::random());
        assert_eq!(due.len(), 1);
        assert!(is_relayed(&due[0].1));
        assert_eq!(reservations.report()[0].state, "not reserved");
    }
}
