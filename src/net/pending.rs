//! Incoming connections in their handshake: at most [`MAX_PENDING_INCOMING`] in all (more are
//! dropped at once, so half-open connections cannot use up the process's file descriptors) and
//! [`MAX_PENDING_PER_IP`] from one address (TCP and QUIC alike), so one host's silent sockets
//! cannot fill the slots and keep the user's devices from (re)connecting. Relayed connections
//! count in the total only; the relay's own circuit limits bound them per device.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::task::{Context, Poll};

use libp2p::core::transport::PortUse;
use libp2p::core::Endpoint;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{
    dummy, ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};

/// Handshakes in progress, at most, over every address.
pub const MAX_PENDING_INCOMING: usize = 256;
/// Handshakes in progress from one IP address (for IPv6, one /64: a host is usually given a
/// whole /64 and can pick any address in it), at most; further connections from it are
/// refused at once until one finishes or times out.
pub const MAX_PENDING_PER_IP: usize = 8;

/// Counts handshakes in progress, and those per remote IP address.
#[derive(Default)]
pub struct PendingLimits {
    /// Every pending connection, with its address if it is direct.
    by_connection: HashMap<ConnectionId, Option<IpAddr>>,
    by_ip: HashMap<IpAddr, usize>,
}

/// A limit was reached.
#[derive(Debug, thiserror::Error)]
pub enum TooManyPending {
    #[error("{MAX_PENDING_INCOMING} connections are in their handshake already")]
    Full,
    #[error("{0} has {MAX_PENDING_PER_IP} connections in their handshake already")]
    FromAddress(IpAddr),
}

/// The IP address a direct connection comes from (none for a relayed one).
pub(super) fn remote_ip(addr: &Multiaddr) -> Option<IpAddr> {
    if addr.iter().any(|p| p == Protocol::P2pCircuit) {
        return None;
    }
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

/// The block of addresses one host may use: an IPv4 address, or the /64 an IPv6 address is in.
fn address_block(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
    }
}

impl PendingLimits {
    fn finished(&mut self, connection: ConnectionId) {
        let Some(Some(ip)) = self.by_connection.remove(&connection) else {
            return;
        };
        if let Some(count) = self.by_ip.get_mut(&ip) {
            *count -= 1;
            if *count == 0 {
                self.by_ip.remove(&ip);
            }
        }
    }
}

impl NetworkBehaviour for PendingLimits {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        _local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        if self.by_connection.len() >= MAX_PENDING_INCOMING {
            return Err(ConnectionDenied::new(TooManyPending::Full));
        }
        let ip = remote_ip(remote_addr).map(address_block);
        if let Some(ip) = ip {
            let count = self.by_ip.entry(ip).or_default();
            if *count >= MAX_PENDING_PER_IP {
                return Err(ConnectionDenied::new(TooManyPending::FromAddress(ip)));
            }
            *count += 1;
        }
        self.by_connection.insert(connection_id, ip);
        Ok(())
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        _peer: PeerId,
        _local_addr: &Multiaddr,
        _remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.finished(connection_id);
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        _peer: PeerId,
        _addr: &Multiaddr,
        _role_override: Endpoint,
        _port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ListenFailure(failure) => self.finished(failure.connection_id),
            FromSwarm::ConnectionEstablished(established) => {
                self.finished(established.connection_id)
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _peer: PeerId,
        _connection: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> Multiaddr {
        text.parse().expect("multiaddr")
    }

    #[test]
    fn one_address_gets_a_few_handshakes_the_others_are_unaffected() {
        let mut pending = PendingLimits::default();
        let local = addr("/ip4/203.0.113.1/tcp/4001");
        let attacker = addr("/ip4/198.51.100.66/tcp/50000");
        let ids: Vec<_> = (0..MAX_PENDING_PER_IP)
            .map(|_| {
                let id = ConnectionId::new_unchecked(rand::random());
                pending
                    .handle_pending_inbound_connection(id, &local, &attacker)
                    .unwrap();
                id
            })
            .collect();
        let next = ConnectionId::new_unchecked(rand::random());
        assert!(pending
            .handle_pending_inbound_connection(next, &local, &attacker)
            .is_err());
        // Another address, and a relayed connection through any relay, still come in.
        let phone = addr("/ip4/198.51.100.7/udp/4001/quic-v1");
        let id = ConnectionId::new_unchecked(rand::random());
        assert!(pending
            .handle_pending_inbound_connection(id, &local, &phone)
            .is_ok());
        let circuit = addr("/ip4/198.51.100.66/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit");
        for _ in 0..20 {
            let id = ConnectionId::new_unchecked(rand::random());
            assert!(pending
                .handle_pending_inbound_connection(id, &local, &circuit)
                .is_ok());
        }
        // One host in IPv6 has a whole /64: new addresses in it are the same host.
        let block = |n: u16| addr(&format!("/ip6/2001:db8:1:2::{n:x}/tcp/5000"));
        for n in 0..MAX_PENDING_PER_IP as u16 {
            let id = ConnectionId::new_unchecked(rand::random());
            pending
                .handle_pending_inbound_connection(id, &local, &block(n + 1))
                .unwrap();
        }
        let next = ConnectionId::new_unchecked(rand::random());
        assert!(pending
            .handle_pending_inbound_connection(next, &local, &block(999))
            .is_err());
        let elsewhere = addr("/ip6/2001:db8:1:3::1/tcp/5000");
        let id = ConnectionId::new_unchecked(rand::random());
        assert!(pending
            .handle_pending_inbound_connection(id, &local, &elsewhere)
            .is_ok());
        // A finished handshake frees its slot.
        pending.finished(ids[0]);
        let again = ConnectionId::new_unchecked(rand::random());
        assert!(pending
            .handle_pending_inbound_connection(again, &local, &attacker)
            .is_ok());
    }
}
