//! The always-on device's AutoNAT v2 server, held to dialing back only where the asker is.
//!
//! AutoNAT v2 lets a device name an address of its own and have the server dial it (after the
//! device pays for it with data, if it is not the address the server sees). libp2p's server
//! dials whatever address it is given: a stranger could have the always-on device connect to a
//! third host, or to its own loopback services, and tell open ports from closed ones by the
//! answer. [`DialBackGuard`] wraps that server and refuses each dial-back whose IP address is
//! not one the asker's own direct connection comes from (so a device behind a NAT can still
//! test its other ports: that is what the check is for). Relayed askers have no such address
//! and get no dial-back; names (`/dns4/...`) are refused, as they could resolve anywhere.

use std::collections::HashMap;
use std::net::IpAddr;
use std::task::{Context, Poll};

use libp2p::autonat::v2::server;
use libp2p::core::transport::PortUse;
use libp2p::core::Endpoint;
use libp2p::swarm::{
    ConnectionClosed, ConnectionDenied, ConnectionId, DialFailure, FromSwarm, NetworkBehaviour,
    THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};

use super::pending::remote_ip;

/// The AutoNAT v2 server, dialing back only to the IP address the asker connects from.
#[derive(Default)]
pub struct DialBackGuard {
    inner: server::Behaviour,
    /// The IP address of each direct incoming connection, per device.
    observed: HashMap<PeerId, HashMap<ConnectionId, IpAddr>>,
    /// Dial-backs the server has asked for and the swarm has not finished: who asked.
    dial_backs: HashMap<ConnectionId, PeerId>,
}

/// A dial-back to somewhere the asker is not.
#[derive(Debug, thiserror::Error)]
#[error("AutoNAT dial-back to {addr} refused: {peer} does not connect from that address")]
pub struct DialBackRefused {
    peer: PeerId,
    addr: Multiaddr,
}

impl DialBackGuard {
    /// Whether `addr` starts with an IP address that `peer` connects from directly.
    fn is_askers(&self, peer: &PeerId, addr: &Multiaddr) -> bool {
        let ip = match addr.iter().next() {
            Some(libp2p::multiaddr::Protocol::Ip4(ip)) => IpAddr::V4(ip),
            Some(libp2p::multiaddr::Protocol::Ip6(ip)) => IpAddr::V6(ip),
            _ => return false,
        };
        self.observed
            .get(peer)
            .is_some_and(|connections| connections.values().any(|seen| *seen == ip))
    }
}

impl NetworkBehaviour for DialBackGuard {
    type ConnectionHandler = THandler<server::Behaviour>;
    type ToSwarm = <server::Behaviour as NetworkBehaviour>::ToSwarm;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.inner
            .handle_pending_inbound_connection(connection_id, local_addr, remote_addr)
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        let handler = self.inner.handle_established_inbound_connection(
            connection_id,
            peer,
            local_addr,
            remote_addr,
        )?;
        if let Some(ip) = remote_ip(remote_addr) {
            self.observed
                .entry(peer)
                .or_default()
                .insert(connection_id, ip);
        }
        Ok(handler)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        maybe_peer: Option<PeerId>,
        addresses: &[Multiaddr],
        effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        if let Some(asker) = self.dial_backs.get(&connection_id) {
            if let Some(elsewhere) = addresses.iter().find(|a| !self.is_askers(asker, a)) {
                return Err(ConnectionDenied::new(DialBackRefused {
                    peer: *asker,
                    addr: elsewhere.clone(),
                }));
            }
        }
        self.inner.handle_pending_outbound_connection(
            connection_id,
            maybe_peer,
            addresses,
            effective_role,
        )
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role_override: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.dial_backs.remove(&connection_id);
        self.inner.handle_established_outbound_connection(
            connection_id,
            peer,
            addr,
            role_override,
            port_use,
        )
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionClosed(ConnectionClosed {
                peer_id,
                connection_id,
                ..
            }) => {
                if let Some(connections) = self.observed.get_mut(&peer_id) {
                    connections.remove(&connection_id);
                    if connections.is_empty() {
                        self.observed.remove(&peer_id);
                    }
                }
            }
            FromSwarm::DialFailure(DialFailure { connection_id, .. }) => {
                self.dial_backs.remove(&connection_id);
            }
            _ => {}
        }
        self.inner.on_swarm_event(event);
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        connection: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        self.inner
            .on_connection_handler_event(peer, connection, event)
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        let event = std::task::ready!(self.inner.poll(cx));
        if let ToSwarm::Dial { opts } = &event {
            if let Some(asker) = opts.get_peer_id() {
                self.dial_backs.insert(opts.connection_id(), asker);
            }
        }
        Poll::Ready(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dial_backs_go_only_to_the_askers_own_address() {
        let mut guard = DialBackGuard::default();
        let asker = PeerId::random();
        let local: Multiaddr = "/ip4/203.0.113.1/tcp/4001".parse().unwrap();
        let seen: Multiaddr = "/ip4/198.51.100.66/tcp/50000".parse().unwrap();
        let connection = ConnectionId::new_unchecked(1);
        guard
            .handle_established_inbound_connection(connection, asker, &local, &seen)
            .expect("accepted");
        let dial = ConnectionId::new_unchecked(2);
        guard.dial_backs.insert(dial, asker);
        let try_dial = |guard: &mut DialBackGuard, addr: &str| {
            guard
                .handle_pending_outbound_connection(
                    dial,
                    Some(asker),
                    &[addr.parse().unwrap()],
                    Endpoint::Dialer,
                )
                .is_ok()
        };
        assert!(try_dial(&mut guard, "/ip4/198.51.100.66/tcp/4001"));
        assert!(try_dial(&mut guard, "/ip4/198.51.100.66/udp/4001/quic-v1"));
        assert!(!try_dial(&mut guard, "/ip4/198.51.100.7/tcp/4001"));
        assert!(!try_dial(&mut guard, "/ip4/127.0.0.1/tcp/9999"));
        assert!(!try_dial(&mut guard, "/dns4/localhost/tcp/9999"));
        // Our own dials (not dial-backs) are not this guard's business.
        assert!(guard
            .handle_pending_outbound_connection(
                ConnectionId::new_unchecked(3),
                None,
                &["/ip4/127.0.0.1/tcp/9999".parse().unwrap()],
                Endpoint::Dialer,
            )
            .is_ok());
    }
}
