//! Established connections, bounded: at most [`MAX_ESTABLISHED`] in all, [`MAX_PER_PEER`] to one
//! device, and [`MAX_STRANGER_CONNECTIONS`] incoming from devices that are not linked
//! ("strangers": a joiner pairing, an AutoNAT client, anyone on the internet who reaches the
//! listener). A stranger churning through new identities (each one a fresh device id, so
//! per-device limits do not apply) fills the strangers' share and no more: the linked devices
//! always find the rest free, and a restarted phone is back at once.
//!
//! Its own rather than libp2p's `connection_limits`, which keeps an entry for every device that
//! ever connected; here what a connection counts leaves with it.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use libp2p::core::transport::PortUse;
use libp2p::core::Endpoint;
use libp2p::swarm::{
    dummy, ConnectionClosed, ConnectionDenied, ConnectionId, DialFailure, FromSwarm,
    NetworkBehaviour, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};

/// Whether a device is one of the user's linked devices.
pub type Linked = Arc<dyn Fn(&PeerId) -> bool + Send + Sync>;

/// Established connections, at most, in and out (each device needs one; pairing, one more).
pub const MAX_ESTABLISHED: usize = 256;
/// Established connections per device, at most (a relayed and a direct one during a hole punch,
/// an AutoNAT dial-back, a pairing: each counts).
pub const MAX_PER_PEER: usize = 8;
/// Established incoming connections from devices that are not linked, at most, over all of
/// them; more are refused at once (pairing needs one, an AutoNAT check one).
pub const MAX_STRANGER_CONNECTIONS: usize = 64;

/// A limit that refused a connection.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("{MAX_ESTABLISHED} connections are open already")]
    Full,
    #[error("{MAX_PER_PEER} connections to this device are open already")]
    PeerFull,
    #[error(
        "{MAX_STRANGER_CONNECTIONS} connections from devices that are not linked are open already"
    )]
    StrangersFull,
}

/// Counts established connections, per device and those of strangers.
pub struct EstablishedLimits {
    /// `None`: no share for strangers (test peers, with no device group).
    linked: Option<Linked>,
    by_peer: HashMap<PeerId, HashSet<ConnectionId>>,
    peer_of: HashMap<ConnectionId, PeerId>,
    strangers: HashSet<ConnectionId>,
}

impl EstablishedLimits {
    pub fn new(linked: Option<Linked>) -> Self {
        Self {
            linked,
            by_peer: HashMap::new(),
            peer_of: HashMap::new(),
            strangers: HashSet::new(),
        }
    }

    /// Connections open now: all, and those of strangers.
    pub fn open(&self) -> (usize, usize) {
        (self.peer_of.len(), self.strangers.len())
    }

    fn admit(
        &mut self,
        connection: ConnectionId,
        peer: PeerId,
        incoming: bool,
    ) -> Result<(), ConnectionDenied> {
        if self.peer_of.len() >= MAX_ESTABLISHED {
            return Err(ConnectionDenied::new(Refused::Full));
        }
        if self.by_peer.get(&peer).map_or(0, HashSet::len) >= MAX_PER_PEER {
            return Err(ConnectionDenied::new(Refused::PeerFull));
        }
        let stranger = incoming && self.linked.as_ref().is_some_and(|linked| !linked(&peer));
        if stranger {
            if self.strangers.len() >= MAX_STRANGER_CONNECTIONS {
                return Err(ConnectionDenied::new(Refused::StrangersFull));
            }
            self.strangers.insert(connection);
        }
        self.by_peer.entry(peer).or_default().insert(connection);
        self.peer_of.insert(connection, peer);
        Ok(())
    }

    /// The connection closed, or another behaviour refused it after this one counted it.
    fn gone(&mut self, connection: ConnectionId) {
        self.strangers.remove(&connection);
        let Some(peer) = self.peer_of.remove(&connection) else {
            return;
        };
        if let Some(connections) = self.by_peer.get_mut(&peer) {
            connections.remove(&connection);
            if connections.is_empty() {
                self.by_peer.remove(&peer);
            }
        }
    }
}

impl NetworkBehaviour for EstablishedLimits {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        _local_addr: &Multiaddr,
        _remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.admit(connection_id, peer, true)?;
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        _addr: &Multiaddr,
        _role_override: Endpoint,
        _port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.admit(connection_id, peer, false)?;
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionClosed(ConnectionClosed { connection_id, .. }) => {
                self.gone(connection_id)
            }
            FromSwarm::ListenFailure(failure) => self.gone(failure.connection_id),
            FromSwarm::DialFailure(DialFailure { connection_id, .. }) => self.gone(connection_id),
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

    fn id() -> ConnectionId {
        ConnectionId::new_unchecked(rand::random())
    }

    #[test]
    fn strangers_fill_their_share_and_linked_devices_still_come_in() {
        let phone = PeerId::random();
        let mut limits = EstablishedLimits::new(Some(Arc::new(move |p: &PeerId| *p == phone)));
        let mut ids = Vec::new();
        for _ in 0..MAX_STRANGER_CONNECTIONS {
            let connection = id();
            limits
                .admit(connection, PeerId::random(), true)
                .expect("within the strangers' share");
            ids.push(connection);
        }
        assert!(limits.admit(id(), PeerId::random(), true).is_err());
        // This device dialing out is not a stranger's doing.
        assert!(limits.admit(id(), PeerId::random(), false).is_ok());
        assert!(limits.admit(id(), phone, true).is_ok());
        limits.gone(ids[0]);
        assert_eq!(limits.open().1, MAX_STRANGER_CONNECTIONS - 1);
        assert!(limits.admit(id(), PeerId::random(), true).is_ok());
    }

    #[test]
    fn per_device_and_total_bounds_and_nothing_kept_after() {
        let mut limits = EstablishedLimits::new(None);
        let peer = PeerId::random();
        let mine: Vec<_> = (0..MAX_PER_PEER)
            .map(|_| {
                let connection = id();
                limits.admit(connection, peer, true).unwrap();
                connection
            })
            .collect();
        assert!(limits.admit(id(), peer, true).is_err());
        let others: Vec<_> = (MAX_PER_PEER..MAX_ESTABLISHED)
            .map(|_| {
                let connection = id();
                limits.admit(connection, PeerId::random(), true).unwrap();
                connection
            })
            .collect();
        assert!(limits.admit(id(), PeerId::random(), false).is_err());
        for connection in mine.into_iter().chain(others) {
            limits.gone(connection);
        }
        assert_eq!(limits.open(), (0, 0));
        assert!(
            limits.by_peer.is_empty(),
            "an entry per device outlived its connections"
        );
    }
}
