//! Room for the user's own devices: connections from devices that are not linked ("strangers":
//! a joiner pairing, an AutoNAT client, anyone on the internet who reaches the listener) hold at
//! most [`MAX_STRANGER_CONNECTIONS`] of the swarm's established slots at once. A stranger churning
//! through new identities (each one a fresh device id, so per-device limits do not apply) fills
//! those and no more: the linked devices always find the rest of
//! [`super::swarm::MAX_ESTABLISHED`] free, and a restarted phone is back at once.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use libp2p::core::transport::PortUse;
use libp2p::core::Endpoint;
use libp2p::swarm::{
    dummy, ConnectionClosed, ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler,
    THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};

/// Whether a device is one of the user's linked devices.
pub type Linked = Arc<dyn Fn(&PeerId) -> bool + Send + Sync>;

/// Established incoming connections from devices that are not linked, at most, over all of
/// them; more are refused at once (pairing needs one, an AutoNAT check one).
pub const MAX_STRANGER_CONNECTIONS: usize = 64;

/// Counts the established incoming connections of strangers.
pub struct StrangerLimit {
    linked: Linked,
    strangers: HashSet<ConnectionId>,
}

/// The strangers' share of the established connections is used up.
#[derive(Debug, thiserror::Error)]
#[error("{MAX_STRANGER_CONNECTIONS} connections from devices that are not linked are open already")]
pub struct TooManyStrangers;

impl StrangerLimit {
    pub fn new(linked: Linked) -> Self {
        Self {
            linked,
            strangers: HashSet::new(),
        }
    }

    /// Strangers' connections open now.
    pub fn open(&self) -> usize {
        self.strangers.len()
    }
}

impl NetworkBehaviour for StrangerLimit {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        _local_addr: &Multiaddr,
        _remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        if (self.linked)(&peer) {
            return Ok(dummy::ConnectionHandler);
        }
        if self.strangers.len() >= MAX_STRANGER_CONNECTIONS {
            return Err(ConnectionDenied::new(TooManyStrangers));
        }
        self.strangers.insert(connection_id);
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
        // A connection another behaviour refused after this one counted it is never
        // established: the swarm reports it as a listen failure, not a closed connection.
        match event {
            FromSwarm::ConnectionClosed(ConnectionClosed { connection_id, .. }) => {
                self.strangers.remove(&connection_id);
            }
            FromSwarm::ListenFailure(failure) => {
                self.strangers.remove(&failure.connection_id);
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

    #[test]
    fn strangers_fill_their_share_and_linked_devices_still_come_in() {
        let phone = PeerId::random();
        let mut limit = StrangerLimit::new(Arc::new(move |p: &PeerId| *p == phone));
        let (local, remote) = (
            "/ip4/203.0.113.1/tcp/4001".parse::<Multiaddr>().unwrap(),
            "/ip4/198.51.100.66/tcp/5000".parse::<Multiaddr>().unwrap(),
        );
        let mut ids = Vec::new();
        for _ in 0..MAX_STRANGER_CONNECTIONS {
            let id = ConnectionId::new_unchecked(rand::random());
            limit
                .handle_established_inbound_connection(id, PeerId::random(), &local, &remote)
                .expect("within the strangers' share");
            ids.push(id);
        }
        let next = ConnectionId::new_unchecked(rand::random());
        assert!(limit
            .handle_established_inbound_connection(next, PeerId::random(), &local, &remote)
            .is_err());
        let id = ConnectionId::new_unchecked(rand::random());
        assert!(limit
            .handle_established_inbound_connection(id, phone, &local, &remote)
            .is_ok());
        limit.strangers.remove(&ids[0]);
        assert_eq!(limit.open(), MAX_STRANGER_CONNECTIONS - 1);
        assert!(limit
            .handle_established_inbound_connection(next, PeerId::random(), &local, &remote)
            .is_ok());
    }
}
