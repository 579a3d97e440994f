//! What is known about each link and about this device's reachability: whether a peer is
//! connected directly on the LAN, directly across networks, directly after a hole punch, or
//! through a relay; how the last hole punch went; and what AutoNAT and identify say about this
//! device's own addresses. The network loop feeds it; `status`, `peers` and `doctor` read it.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use libp2p::core::ConnectedPoint;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId};
use serde::Serialize;

use super::relay::{is_relayed, RelayReport};

/// How a peer is connected (its best connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinkKind {
    /// Through a relay (the user's always-on device).
    Relayed,
    /// Directly, to a public address.
    Direct,
    /// Directly, after a hole punch through NATs (it started relayed).
    PunchedDirect,
    /// Directly, to an address on a local network (private, link-local or loopback).
    LanDirect,
}

impl LinkKind {
    pub fn label(self) -> &'static str {
        match self {
            Self::Relayed => "relayed",
            Self::Direct => "direct",
            Self::PunchedDirect => "punched-direct",
            Self::LanDirect => "LAN-direct",
        }
    }

    fn of(endpoint: &ConnectedPoint) -> Self {
        if endpoint.is_relayed() {
            return Self::Relayed;
        }
        let remote = match endpoint {
            // Only a hole punch dials in the listener's role (both sides dial at once; DCUtR
            // reports the connection on the side that started it, not on this one).
            ConnectedPoint::Dialer {
                role_override: libp2p::core::Endpoint::Listener,
                ..
            } => return Self::PunchedDirect,
            ConnectedPoint::Dialer { address, .. } => address,
            ConnectedPoint::Listener { send_back_addr, .. } => send_back_addr,
        };
        if is_local_network(remote) {
            Self::LanDirect
        } else {
            Self::Direct
        }
    }
}

/// Whether `addr` is on a local network: private, shared (CGNAT), link-local or loopback.
pub fn is_local_network(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => {
            ip.is_private()
                || ip.is_loopback()
                || ip.is_link_local()
                || (ip.octets()[0] == 100 && (ip.octets()[1] & 0xc0) == 64)
        }
        Protocol::Ip6(ip) => {
            ip.is_loopback()
                || (ip.segments()[0] & 0xfe00) == 0xfc00
                || (ip.segments()[0] & 0xffc0) == 0xfe80
        }
        _ => false,
    })
}

/// The last hole punch with a peer.
#[derive(Debug, Clone)]
struct Punch {
    at: Instant,
    failures: u32,
    error: Option<String>,
}

/// Hole punches that failed are tried again on a new relayed connection this often, at most
/// this many times in a row (a symmetric NAT fails every time; the relayed link stays).
pub const PUNCH_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(5);
pub const PUNCH_RETRIES: u32 = 2;

/// Links per peer, and what this device knows about its own addresses.
#[derive(Default)]
pub(crate) struct Reach {
    links: HashMap<PeerId, BTreeMap<ConnectionId, LinkKind>>,
    punches: HashMap<PeerId, Punch>,
    /// Addresses AutoNAT confirmed reachable from outside.
    confirmed: Vec<Multiaddr>,
    /// Addresses AutoNAT found not reachable, with why.
    unreachable: BTreeMap<Multiaddr, String>,
    /// This device's addresses as other devices see them (identify), newest last.
    observed: Vec<Multiaddr>,
}

impl Reach {
    /// A connection was established; returns the peer's best link now.
    pub fn connected(
        &mut self,
        peer: PeerId,
        connection: ConnectionId,
        endpoint: &ConnectedPoint,
    ) -> LinkKind {
        let links = self.links.entry(peer).or_default();
        let kind = match LinkKind::of(endpoint) {
            // A direct connection to a peer reached through a relay is a hole punch's: both
            // sides dial at once, and whichever dial wins, only one side hears it from DCUtR.
            LinkKind::Direct | LinkKind::LanDirect
                if links.values().any(|k| *k == LinkKind::Relayed) =>
            {
                LinkKind::PunchedDirect
            }
            kind => kind,
        };
        links.insert(connection, kind);
        self.best(&peer).unwrap_or(kind)
    }

    /// A connection closed; returns the peer's best link now, if still connected.
    pub fn closed(&mut self, peer: PeerId, connection: ConnectionId) -> Option<LinkKind> {
        if let Some(links) = self.links.get_mut(&peer) {
            links.remove(&connection);
            if links.is_empty() {
                self.links.remove(&peer);
            }
        }
        self.best(&peer)
    }

    /// The best link to `peer` (direct beats relayed).
    pub fn best(&self, peer: &PeerId) -> Option<LinkKind> {
        self.links.get(peer)?.values().copied().max()
    }

    /// A hole punch succeeded with `connection`: returns the relayed connections to close (the
    /// direct one replaces them, so every stream goes direct).
    pub fn punched(&mut self, peer: PeerId, connection: ConnectionId) -> Vec<ConnectionId> {
        self.punches.insert(
            peer,
            Punch {
                at: Instant::now(),
                failures: 0,
                error: None,
            },
        );
        let Some(links) = self.links.get_mut(&peer) else {
            return Vec::new();
        };
        links.insert(connection, LinkKind::PunchedDirect);
        links
            .iter()
            .filter(|(_, k)| **k == LinkKind::Relayed)
            .map(|(c, _)| *c)
            .collect()
    }

    pub fn punch_failed(&mut self, peer: PeerId, error: String) {
        let punch = self.punches.entry(peer).or_insert(Punch {
            at: Instant::now(),
            failures: 0,
            error: None,
        });
        punch.at = Instant::now();
        punch.failures += 1;
        punch.error = Some(error);
    }

    /// Whether the failed hole punch with `peer` will be tried again (now or after its pause).
    fn will_retry(&self, peer: &PeerId, punch: &Punch) -> bool {
        punch.error.is_some()
            && punch.failures <= PUNCH_RETRIES
            && self.best(peer) == Some(LinkKind::Relayed)
    }

    /// Whether a failed hole punch will be tried again.
    pub fn punches_pending(&self) -> bool {
        self.punches
            .iter()
            .any(|(peer, p)| self.will_retry(peer, p))
    }

    /// Peers still only relayed whose last punch failed a while ago and may be tried again
    /// (by closing the relayed connections: the redial makes a new one, which punches).
    pub fn punch_retries_due(&self) -> Vec<(PeerId, Vec<ConnectionId>)> {
        self.punches
            .iter()
            .filter(|(peer, p)| self.will_retry(peer, p) && p.at.elapsed() >= PUNCH_RETRY_AFTER)
            .map(|(peer, _)| {
                let relayed = self.links[peer].keys().copied().collect();
                (*peer, relayed)
            })
            .collect()
    }

    /// Marks a retry as started (so it is not started twice).
    pub fn punch_retrying(&mut self, peer: &PeerId) {
        if let Some(p) = self.punches.get_mut(peer) {
            p.at = Instant::now();
            p.failures += 1;
        }
    }

    /// How the last hole punch with `peer` went, for `status`.
    pub fn punch_summary(&self, peer: &PeerId) -> Option<String> {
        let p = self.punches.get(peer)?;
        Some(match &p.error {
            None => "succeeded".to_string(),
            Some(e) => format!("failed {} time(s): {e}", p.failures.min(PUNCH_RETRIES + 1)),
        })
    }

    pub fn forget_peer(&mut self, peer: &PeerId) {
        if !self.links.contains_key(peer) {
            self.punches.remove(peer);
        }
    }

    /// Whether some device has told this one how it sees it (identify).
    pub fn has_observed(&self) -> bool {
        !self.observed.is_empty()
    }

    pub fn observed(&mut self, addr: Multiaddr) {
        if is_relayed(&addr) {
            return;
        }
        self.observed.retain(|a| a != &addr);
        self.observed.push(addr);
        if self.observed.len() > 8 {
            self.observed.remove(0);
        }
    }

    pub fn confirmed(&mut self, addr: Multiaddr) {
        self.unreachable.remove(&addr);
        if !self.confirmed.contains(&addr) {
            self.confirmed.push(addr);
        }
    }

    pub fn expired(&mut self, addr: &Multiaddr) {
        self.confirmed.retain(|a| a != addr);
    }

    pub fn not_reachable(&mut self, addr: Multiaddr, why: String) {
        let has_ip = matches!(
            addr.iter().next(),
            Some(
                Protocol::Ip4(_)
                    | Protocol::Ip6(_)
                    | Protocol::Dns(_)
                    | Protocol::Dns4(_)
                    | Protocol::Dns6(_)
            )
        );
        if self.unreachable.len() < 16 && has_ip && !is_relayed(&addr) {
            self.unreachable.insert(addr, why);
        }
    }

    /// The reachability report for `status` and `doctor`.
    pub fn report(
        &self,
        serving_relay: Option<&[Multiaddr]>,
        relays: Vec<RelayReport>,
    ) -> ReachReport {
        let public: Vec<String> = self
            .confirmed
            .iter()
            .filter(|a| !is_relayed(a))
            .map(|a| a.to_string())
            .collect();
        let mut summary = match serving_relay {
            Some(addrs) => format!(
                "public: serving as the relay of your devices at {}",
                join(addrs.iter().map(|a| a.to_string()))
            ),
            None if !public.is_empty() => format!(
                "public: reachable from outside at {} (AutoNAT)",
                public.join(", ")
            ),
            None if !self.unreachable.is_empty() => format!(
                "behind a NAT or firewall: {} not reachable from outside (AutoNAT); devices on other networks reach this one through a relay or a hole punch",
                join(self.unreachable.keys().map(|a| a.to_string()))
            ),
            None if !self.observed.is_empty() => format!(
                "not yet known: other devices see this one as {} (not yet tested from outside)",
                join(self.observed.iter().map(|a| a.to_string()))
            ),
            None => "not yet known: no device outside this machine has seen this one".to_string(),
        };
        if serving_relay.is_none() {
            summary.push_str("; ");
            summary.push_str(&match relays.iter().find(|r| r.state == "reserved") {
                Some(r) => format!(
                    "relay: reserved on {}, reachable as {}",
                    r.relay,
                    join(r.relayed_addrs.iter().cloned())
                ),
                None => match relays.first() {
                    Some(r) => format!(
                        "relay: {} on {}{}",
                        r.state,
                        r.relay,
                        r.last_error
                            .as_ref()
                            .map(|e| format!(" ({e})"))
                            .unwrap_or_default()
                    ),
                    None => "no relay (start an always-on device with --serve-relay and link it, or pass --relay ADDR)".to_string(),
                },
            });
        }
        ReachReport {
            summary,
            serving_relay: serving_relay.is_some(),
            public_addrs: public,
            not_reachable: self
                .unreachable
                .iter()
                .map(|(a, why)| (a.to_string(), why.clone()))
                .collect(),
            observed_addrs: self.observed.iter().map(|a| a.to_string()).collect(),
            relays,
        }
    }
}

fn join(items: impl Iterator<Item = String>) -> String {
    items.collect::<Vec<_>>().join(", ")
}

/// This device's reachability, as `status` and `doctor` report it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReachReport {
    /// One sentence: public / behind a NAT / not yet known, and the relay reservation.
    pub summary: String,
    pub serving_relay: bool,
    /// Addresses AutoNAT confirmed reachable from outside.
    pub public_addrs: Vec<String>,
    /// Addresses AutoNAT found not reachable from outside, with the reason.
    pub not_reachable: BTreeMap<String, String>,
    /// How other devices see this one (identify).
    pub observed_addrs: Vec<String>,
    /// The relays this device reserves on.
    pub relays: Vec<RelayReport>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener(remote: &str) -> ConnectedPoint {
        ConnectedPoint::Listener {
            local_addr: "/ip4/0.0.0.0/tcp/1".parse().unwrap(),
            send_back_addr: remote.parse().unwrap(),
        }
    }

    /// A circuit from `peer` through a relay, as the listening side sees it.
    fn relayed_from(peer: PeerId) -> ConnectedPoint {
        ConnectedPoint::Listener {
            local_addr: format!(
                "/ip4/203.0.113.7/tcp/4001/p2p/{}/p2p-circuit",
                PeerId::random()
            )
            .parse()
            .unwrap(),
            send_back_addr: format!("/p2p/{peer}").parse().unwrap(),
        }
    }

    #[test]
    fn link_kinds_and_the_best_link() {
        let mut reach = Reach::default();
        let peer = PeerId::random();
        let relayed = relayed_from(peer);
        let (c1, c2) = (
            ConnectionId::new_unchecked(1),
            ConnectionId::new_unchecked(2),
        );
        assert_eq!(reach.connected(peer, c1, &relayed), LinkKind::Relayed);
        // Direct while a relayed connection is open: the other side's hole punch.
        assert_eq!(
            reach.connected(peer, c2, &listener("/ip4/198.51.100.2/tcp/5")),
            LinkKind::PunchedDirect
        );
        assert_eq!(reach.punched(peer, c2), vec![c1]);
        assert_eq!(reach.best(&peer), Some(LinkKind::PunchedDirect));
        assert_eq!(reach.closed(peer, c2), Some(LinkKind::Relayed));
        assert_eq!(reach.closed(peer, c1), None);
        assert_eq!(
            LinkKind::of(&listener("/ip4/198.51.100.2/tcp/5")),
            LinkKind::Direct
        );
        assert_eq!(
            LinkKind::of(&listener("/ip4/192.168.1.20/tcp/5")),
            LinkKind::LanDirect
        );
        assert_eq!(
            LinkKind::of(&listener("/ip4/100.64.1.2/tcp/5")),
            LinkKind::LanDirect
        );
    }

    #[test]
    fn failed_punches_are_retried_a_bounded_number_of_times() {
        let mut reach = Reach::default();
        let peer = PeerId::random();
        let relayed = relayed_from(peer);
        reach.connected(peer, ConnectionId::new_unchecked(1), &relayed);
        reach.punch_failed(peer, "no addresses".into());
        assert!(reach.punch_retries_due().is_empty(), "not before the pause");
        for _ in 0..PUNCH_RETRIES {
            reach.punch_retrying(&peer);
        }
        reach.punches.get_mut(&peer).unwrap().at -= PUNCH_RETRY_AFTER;
        assert!(reach.punch_retries_due().is_empty(), "retries are bounded");
        assert!(reach.punch_summary(&peer).unwrap().contains("no addresses"));
    }
}
