//! Raw protocol streams over the swarm's connections: sync, pairing, handoff claims and pair
//! lookups each open and accept plain streams of their own protocol.
//!
//! [`Control::open_stream`] opens a stream of a protocol to a device (dialing it first if it is
//! not connected); [`Control::accept`] hands out the streams other devices open for a protocol.
//! This is what `libp2p-stream` offers; devicelink has its own because that crate keeps every
//! connection's stream sender after the connection closes (about 0.8 KiB each, for good), and a
//! device on the internet sees connections from anyone: here a connection's state goes with it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::{ready, Ready};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures::channel::{mpsc, oneshot};
use futures::StreamExt;
use libp2p::core::transport::PortUse;
use libp2p::core::upgrade::{InboundUpgrade, OutboundUpgrade, UpgradeInfo};
use libp2p::core::Endpoint;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::handler::{
    ConnectionEvent, DialUpgradeError, FullyNegotiatedInbound, FullyNegotiatedOutbound,
};
use libp2p::swarm::{
    ConnectionClosed, ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId,
    DialError, DialFailure, FromSwarm, NetworkBehaviour, Stream, StreamProtocol,
    StreamUpgradeError, SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};

/// Streams of one protocol opened by other devices and not yet taken, at most; more are reset.
const INCOMING_BUFFER: usize = 64;

/// Why a stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenStreamError {
    #[error("the device does not speak {0}")]
    UnsupportedProtocol(StreamProtocol),
    #[error("failed to open a stream: {0}")]
    Io(#[from] io::Error),
}

/// [`Control::accept`] was called twice for one protocol (while the first is still taken).
#[derive(Debug, thiserror::Error)]
#[error("streams of {0} are taken already")]
pub struct AlreadyAccepted(StreamProtocol);

/// A request to open a stream on a connection.
struct Open {
    protocol: StreamProtocol,
    reply: oneshot::Sender<Result<Stream, OpenStreamError>>,
}

/// What the behaviour, its handlers and the controls share.
struct Registry {
    accepting: HashMap<StreamProtocol, mpsc::Sender<(PeerId, Stream)>>,
    /// Each connection's queue of streams to open, per device.
    connections: HashMap<PeerId, Vec<(ConnectionId, mpsc::UnboundedSender<Open>)>>,
    /// Streams waiting for a connection to their device (a dial is under way).
    waiting: HashMap<PeerId, Vec<Open>>,
    dial: mpsc::UnboundedSender<PeerId>,
}

fn lock(registry: &Mutex<Registry>) -> MutexGuard<'_, Registry> {
    registry.lock().unwrap_or_else(|e| e.into_inner())
}

impl Registry {
    /// Sends `open` down a connection to `peer`, or gives it back if there is none.
    fn route(&mut self, peer: &PeerId, open: Open) -> Result<(), Open> {
        let Some(connections) = self.connections.get_mut(peer) else {
            return Err(open);
        };
        let mut open = open;
        // The newest connection first: an older one may be closing.
        while let Some((_, queue)) = connections.last() {
            match queue.unbounded_send(open) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    open = e.into_inner();
                    connections.pop();
                }
            }
        }
        self.connections.remove(peer);
        Err(open)
    }

    fn accepted_protocols(&mut self) -> Vec<StreamProtocol> {
        self.accepting.retain(|_, taker| !taker.is_closed());
        self.accepting.keys().cloned().collect()
    }

    fn incoming(&mut self, peer: PeerId, stream: Stream, protocol: StreamProtocol) {
        let Some(taker) = self.accepting.get_mut(&protocol) else {
            return;
        };
        if let Err(e) = taker.try_send((peer, stream)) {
            if e.is_disconnected() {
                self.accepting.remove(&protocol);
            } else {
                tracing::debug!(%peer, %protocol, "incoming stream dropped: its taker is behind");
            }
        }
    }
}

/// The network behaviour: one [`StreamHandler`] per connection.
pub struct Behaviour {
    registry: Arc<Mutex<Registry>>,
    dials: mpsc::UnboundedReceiver<PeerId>,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self::new()
    }
}

impl Behaviour {
    pub fn new() -> Self {
        let (dial, dials) = mpsc::unbounded();
        Self {
            registry: Arc::new(Mutex::new(Registry {
                accepting: HashMap::new(),
                connections: HashMap::new(),
                waiting: HashMap::new(),
                dial,
            })),
            dials,
        }
    }

    /// A handle to open and accept streams.
    pub fn new_control(&self) -> Control {
        Control {
            registry: self.registry.clone(),
        }
    }

    /// Connections and waiting streams tracked now (for tests: they follow the connections).
    pub fn tracked(&self) -> (usize, usize) {
        let registry = lock(&self.registry);
        (
            registry.connections.values().map(Vec::len).sum(),
            registry.waiting.values().map(Vec::len).sum(),
        )
    }

    fn handler(&self, peer: PeerId, connection: ConnectionId) -> StreamHandler {
        let (queue, opens) = mpsc::unbounded();
        let mut registry = lock(&self.registry);
        registry
            .connections
            .entry(peer)
            .or_default()
            .push((connection, queue.clone()));
        for open in registry.waiting.remove(&peer).unwrap_or_default() {
            let _ = queue.unbounded_send(open);
        }
        StreamHandler {
            peer,
            registry: self.registry.clone(),
            opens,
        }
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = StreamHandler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        _local_addr: &Multiaddr,
        _remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer, connection_id))
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        _addr: &Multiaddr,
        _role_override: Endpoint,
        _port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer, connection_id))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionClosed(ConnectionClosed {
                peer_id,
                connection_id,
                ..
            }) => {
                let mut registry = lock(&self.registry);
                if let Some(connections) = registry.connections.get_mut(&peer_id) {
                    connections.retain(|(id, _)| *id != connection_id);
                    if connections.is_empty() {
                        registry.connections.remove(&peer_id);
                    }
                }
            }
            // A dial that could not reach the device fails the streams waiting for it (a dial
            // skipped because another is under way leaves them to that one).
            FromSwarm::DialFailure(DialFailure {
                peer_id: Some(peer),
                error:
                    error @ (DialError::Transport(_)
                    | DialError::Denied { .. }
                    | DialError::NoAddresses
                    | DialError::WrongPeerId { .. }
                    | DialError::LocalPeerId { .. }),
                ..
            }) => {
                let waiting = lock(&self.registry).waiting.remove(&peer);
                for open in waiting.unwrap_or_default() {
                    let reason = io::Error::new(io::ErrorKind::NotConnected, error.to_string());
                    let _ = open.reply.send(Err(OpenStreamError::Io(reason)));
                }
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

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        while let Poll::Ready(Some(peer)) = self.dials.poll_next_unpin(cx) {
            // Connected meanwhile: the waiting streams go down that connection.
            let mut registry = lock(&self.registry);
            if registry.connections.contains_key(&peer) {
                for open in registry.waiting.remove(&peer).unwrap_or_default() {
                    if let Err(open) = registry.route(&peer, open) {
                        registry.waiting.entry(peer).or_default().push(open);
                    }
                }
                continue;
            }
            return Poll::Ready(ToSwarm::Dial {
                opts: DialOpts::peer_id(peer)
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build(),
            });
        }
        Poll::Pending
    }
}

/// Opens streams to devices and takes the streams they open.
#[derive(Clone)]
pub struct Control {
    registry: Arc<Mutex<Registry>>,
}

impl Control {
    /// Opens a stream of `protocol` to `peer`, dialing it if it is not connected (at the
    /// addresses the swarm knows for it).
    pub async fn open_stream(
        &mut self,
        peer: PeerId,
        protocol: StreamProtocol,
    ) -> Result<Stream, OpenStreamError> {
        let (reply, answer) = oneshot::channel();
        {
            let mut registry = lock(&self.registry);
            if let Err(open) = registry.route(&peer, Open { protocol, reply }) {
                registry.waiting.entry(peer).or_default().push(open);
                let _ = registry.dial.unbounded_send(peer);
            }
        }
        answer.await.map_err(|_| {
            io::Error::new(
                io::ErrorKind::ConnectionReset,
                "the connection closed before the stream opened",
            )
        })?
    }

    /// The streams of `protocol` other devices open, from now on.
    pub fn accept(&mut self, protocol: StreamProtocol) -> Result<IncomingStreams, AlreadyAccepted> {
        let mut registry = lock(&self.registry);
        registry.accepting.retain(|_, taker| !taker.is_closed());
        if registry.accepting.contains_key(&protocol) {
            return Err(AlreadyAccepted(protocol));
        }
        let (taker, streams) = mpsc::channel(INCOMING_BUFFER);
        registry.accepting.insert(protocol, taker);
        Ok(IncomingStreams(streams))
    }
}

/// Streams other devices opened for one protocol, with who opened each.
#[must_use = "streams are taken only while this is polled"]
pub struct IncomingStreams(mpsc::Receiver<(PeerId, Stream)>);

impl futures::Stream for IncomingStreams {
    type Item = (PeerId, Stream);

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Self::Item>> {
        self.0.poll_next_unpin(cx)
    }
}

/// The protocols one stream may be negotiated as.
pub struct Protocols(Vec<StreamProtocol>);

impl UpgradeInfo for Protocols {
    type Info = StreamProtocol;
    type InfoIter = std::vec::IntoIter<StreamProtocol>;

    fn protocol_info(&self) -> Self::InfoIter {
        self.0.clone().into_iter()
    }
}

impl InboundUpgrade<Stream> for Protocols {
    type Output = (Stream, StreamProtocol);
    type Error = Infallible;
    type Future = Ready<Result<Self::Output, Infallible>>;

    fn upgrade_inbound(self, stream: Stream, protocol: StreamProtocol) -> Self::Future {
        ready(Ok((stream, protocol)))
    }
}

impl OutboundUpgrade<Stream> for Protocols {
    type Output = (Stream, StreamProtocol);
    type Error = Infallible;
    type Future = Ready<Result<Self::Output, Infallible>>;

    fn upgrade_outbound(self, stream: Stream, protocol: StreamProtocol) -> Self::Future {
        ready(Ok((stream, protocol)))
    }
}

/// One connection's streams: it negotiates the protocols accepted now for incoming streams,
/// and opens the streams asked of it.
pub struct StreamHandler {
    peer: PeerId,
    registry: Arc<Mutex<Registry>>,
    opens: mpsc::UnboundedReceiver<Open>,
}

type Reply = (
    StreamProtocol,
    oneshot::Sender<Result<Stream, OpenStreamError>>,
);

impl ConnectionHandler for StreamHandler {
    type FromBehaviour = Infallible;
    type ToBehaviour = Infallible;
    type InboundProtocol = Protocols;
    type OutboundProtocol = Protocols;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = Reply;

    fn listen_protocol(&self) -> SubstreamProtocol<Protocols, ()> {
        SubstreamProtocol::new(Protocols(lock(&self.registry).accepted_protocols()), ())
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Protocols, Reply, Infallible>> {
        match self.opens.poll_next_unpin(cx) {
            Poll::Ready(Some(Open { protocol, reply })) => {
                Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest {
                    protocol: SubstreamProtocol::new(
                        Protocols(vec![protocol.clone()]),
                        (protocol, reply),
                    ),
                })
            }
            _ => Poll::Pending,
        }
    }

    fn on_behaviour_event(&mut self, event: Infallible) {
        match event {}
    }

    fn on_connection_event(&mut self, event: ConnectionEvent<Protocols, Protocols, (), Reply>) {
        match event {
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
                protocol: (stream, protocol),
                ..
            }) => lock(&self.registry).incoming(self.peer, stream, protocol),
            ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound {
                protocol: (stream, _),
                info: (_, reply),
            }) => {
                let _ = reply.send(Ok(stream));
            }
            ConnectionEvent::DialUpgradeError(DialUpgradeError {
                info: (protocol, reply),
                error,
            }) => {
                let error = match error {
                    StreamUpgradeError::NegotiationFailed => {
                        OpenStreamError::UnsupportedProtocol(protocol)
                    }
                    StreamUpgradeError::Timeout => io::Error::from(io::ErrorKind::TimedOut).into(),
                    StreamUpgradeError::Io(e) => e.into(),
                    StreamUpgradeError::Apply(never) => match never {},
                };
                let _ = reply.send(Err(error));
            }
            _ => {}
        }
    }
}
