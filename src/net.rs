//! The libp2p side of the agent: the swarm (TCP + Noise + Yamux, one stream behaviour), trust
//! gating, keeping trusted peers connected (redial with exponential backoff), and starting one
//! sync session per trusted peer.
//!
//! Who opens the sync stream: of two connected devices, the one with the smaller device id. The
//! other accepts. So each pair of devices has exactly one session, whoever dialed.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use libp2p::core::ConnectedPoint;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{identity::Keypair, noise, tcp, yamux, Multiaddr, PeerId, Swarm};
use tokio::sync::{mpsc, oneshot};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::compat::FuturesAsyncReadCompatExt;

use crate::status::PeerTable;
use crate::store::TrustStore;
use crate::sync::message::{codec, Hello, Message, Refusal, RefuseCode, PROTOCOL_VERSION};
use crate::sync::session::{self, SessionCtx, SessionError};
use crate::sync::SYNC_PROTOCOL;

/// The composed network behaviour: raw protocol streams (sync now; pairing later).
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    pub stream: libp2p_stream::Behaviour,
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot set up the libp2p transport: {0}")]
    Transport(String),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
}

/// Builds a swarm for `keypair`: TCP (nodelay) + Noise + Yamux and the stream behaviour.
pub fn build_swarm(keypair: Keypair) -> Result<Swarm<Behaviour>, NetError> {
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| NetError::Transport(e.to_string()))?
        .with_behaviour(|_| Behaviour {
            stream: libp2p_stream::Behaviour::new(),
        })
        .map_err(|e| NetError::Transport(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    Ok(swarm)
}

/// Redial timing.
#[derive(Debug, Clone, Copy)]
pub struct RedialPolicy {
    pub min: Duration,
    pub max: Duration,
}

impl Default for RedialPolicy {
    fn default() -> Self {
        Self {
            min: Duration::from_millis(100),
            max: Duration::from_secs(1),
        }
    }
}

pub(crate) enum NetCommand {
    Dial(Multiaddr),
    /// The trust store changed: drop peers no longer trusted, dial new ones.
    TrustChanged,
    Shutdown(oneshot::Sender<()>),
}

#[derive(Debug, Clone, Copy)]
struct Backoff {
    next_at: Instant,
    delay: Duration,
}

impl Backoff {
    fn new(policy: RedialPolicy) -> Self {
        Self {
            next_at: Instant::now(),
            delay: policy.min,
        }
    }

    fn due(&self) -> bool {
        Instant::now() >= self.next_at
    }

    /// Schedules the next attempt after the current delay and doubles it.
    fn failed(&mut self, policy: RedialPolicy) {
        self.next_at = Instant::now() + self.delay;
        self.delay = (self.delay * 2).min(policy.max);
    }
}

/// An address given with `--peer`, dialed until it answers and redialed when it drops.
struct StaticPeer {
    addr: Multiaddr,
    peer: Option<PeerId>,
    backoff: Backoff,
}

pub(crate) struct Network {
    pub swarm: Swarm<Behaviour>,
    pub ctx: Arc<SessionCtx>,
    pub trust: TrustStore,
    pub peers: Arc<PeerTable>,
    pub listen_addrs: Arc<RwLock<Vec<Multiaddr>>>,
    pub device_name: String,
    pub redial: RedialPolicy,
    static_peers: Vec<StaticPeer>,
    backoffs: HashMap<PeerId, Backoff>,
    sessions: JoinSet<()>,
    session_of: HashMap<PeerId, AbortHandle>,
}

impl Network {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        swarm: Swarm<Behaviour>,
        ctx: Arc<SessionCtx>,
        trust: TrustStore,
        peers: Arc<PeerTable>,
        listen_addrs: Arc<RwLock<Vec<Multiaddr>>>,
        device_name: String,
        redial: RedialPolicy,
        static_peers: Vec<Multiaddr>,
    ) -> Self {
        Self {
            swarm,
            ctx,
            trust,
            peers,
            listen_addrs,
            device_name,
            redial,
            static_peers: static_peers
                .into_iter()
                .map(|addr| StaticPeer {
                    addr,
                    peer: None,
                    backoff: Backoff::new(redial),
                })
                .collect(),
            backoffs: HashMap::new(),
            sessions: JoinSet::new(),
            session_of: HashMap::new(),
        }
    }

    /// Starts listening on `addrs` and waits until each listener has reported an address.
    pub async fn listen(&mut self, addrs: &[Multiaddr]) -> Result<(), NetError> {
        for addr in addrs {
            self.swarm
                .listen_on(addr.clone())
                .map_err(|e| NetError::Listen {
                    addr: addr.clone(),
                    reason: e.to_string(),
                })?;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut ready = 0;
        while ready < addrs.len() {
            let event = tokio::time::timeout_at(deadline, self.swarm.select_next_some()).await;
            match event {
                Ok(SwarmEvent::NewListenAddr { address, .. }) => {
                    ready += 1;
                    self.on_listen_addr(address);
                }
                Ok(SwarmEvent::ListenerError { error, .. }) => {
                    return Err(NetError::Listen {
                        addr: addrs[ready.min(addrs.len() - 1)].clone(),
                        reason: error.to_string(),
                    })
                }
                Ok(SwarmEvent::ListenerClosed {
                    addresses, reason, ..
                }) => {
                    return Err(NetError::Listen {
                        addr: addresses
                            .first()
                            .cloned()
                            .unwrap_or_else(|| addrs[0].clone()),
                        reason: format!("{reason:?}"),
                    })
                }
                Ok(_) => {}
                Err(_) => {
                    return Err(NetError::Listen {
                        addr: addrs[ready.min(addrs.len() - 1)].clone(),
                        reason: "no listen address reported within 5s".into(),
                    })
                }
            }
        }
        Ok(())
    }

    fn on_listen_addr(&self, address: Multiaddr) {
        let mut addrs = self.listen_addrs.write().unwrap_or_else(|p| p.into_inner());
        if !addrs.contains(&address) {
            addrs.push(address);
        }
    }

    /// Runs until a shutdown command (or until every command sender is gone).
    pub async fn run(mut self, mut commands: mpsc::UnboundedReceiver<NetCommand>) {
        let mut control = self.swarm.behaviour().stream.new_control();
        let mut incoming = match control.accept(SYNC_PROTOCOL) {
            Ok(incoming) => incoming,
            Err(e) => {
                tracing::error!("cannot accept sync streams: {e:?}");
                return;
            }
        };
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let done = loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                Some((peer, stream)) = incoming.next() => self.on_inbound_stream(peer, stream),
                command = commands.recv() => match command {
                    Some(NetCommand::Dial(addr)) => self.add_static_peer(addr),
                    Some(NetCommand::TrustChanged) => self.enforce_trust(),
                    Some(NetCommand::Shutdown(done)) => break Some(done),
                    None => break None,
                },
                _ = tick.tick() => self.maintain_connections(),
                Some(_) = self.sessions.join_next(), if !self.sessions.is_empty() => {}
            }
        };
        self.sessions.shutdown().await;
        drop(incoming);
        drop(self);
        if let Some(done) = done {
            let _ = done.send(());
        }
    }

    fn add_static_peer(&mut self, addr: Multiaddr) {
        if self.static_peers.iter().all(|p| p.addr != addr) {
            self.static_peers.push(StaticPeer {
                addr,
                peer: None,
                backoff: Backoff::new(self.redial),
            });
        }
    }

    fn trusted(&self) -> BTreeMap<PeerId, Vec<Multiaddr>> {
        match self.trust.list() {
            Ok(list) => list
                .into_iter()
                .map(|(id, device)| (id, device.multiaddrs()))
                .collect(),
            Err(e) => {
                tracing::error!("cannot read the trust store: {e}");
                BTreeMap::new()
            }
        }
    }

    /// Dials every trusted device that is not connected and every `--peer` address, each on its
    /// own backoff schedule.
    fn maintain_connections(&mut self) {
        let local = *self.swarm.local_peer_id();
        for (peer, addrs) in self.trusted() {
            if peer == local || addrs.is_empty() || self.swarm.is_connected(&peer) {
                continue;
            }
            let backoff = self
                .backoffs
                .entry(peer)
                .or_insert_with(|| Backoff::new(self.redial));
            if !backoff.due() {
                continue;
            }
            backoff.failed(self.redial);
            let opts = DialOpts::peer_id(peer)
                .addresses(addrs)
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build();
            if let Err(e) = self.swarm.dial(opts) {
                tracing::debug!(%peer, "dial not started: {e}");
            }
        }
        for i in 0..self.static_peers.len() {
            let connected = self.static_peers[i]
                .peer
                .is_some_and(|p| self.swarm.is_connected(&p));
            let static_peer = &mut self.static_peers[i];
            if connected || !static_peer.backoff.due() {
                continue;
            }
            static_peer.backoff.failed(self.redial);
            let addr = static_peer.addr.clone();
            if let Err(e) = self
                .swarm
                .dial(DialOpts::unknown_peer_id().address(addr).build())
            {
                tracing::debug!("dial not started: {e}");
            }
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!("listening on {address}");
                self.on_listen_addr(address);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                num_established,
                ..
            } => self.on_connected(peer_id, &endpoint, num_established.get()),
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                cause,
                ..
            } => {
                self.peers.connected(peer_id, num_established);
                if num_established == 0 {
                    tracing::info!(peer = %peer_id, "disconnected{}", cause.map(|c| format!(": {c}")).unwrap_or_default());
                    // Redial soon, then back off.
                    self.backoffs.insert(peer_id, Backoff::new(self.redial));
                    for sp in self
                        .static_peers
                        .iter_mut()
                        .filter(|s| s.peer == Some(peer_id))
                    {
                        sp.backoff = Backoff::new(self.redial);
                    }
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(peer = ?peer_id, "dial failed: {error}");
            }
            SwarmEvent::IncomingConnectionError { error, .. } => {
                tracing::debug!("incoming connection failed: {error}");
            }
            _ => {}
        }
    }

    fn on_connected(&mut self, peer: PeerId, endpoint: &ConnectedPoint, connections: u32) {
        if let ConnectedPoint::Dialer { address, .. } = endpoint {
            for sp in self.static_peers.iter_mut().filter(|s| &s.addr == address) {
                sp.peer = Some(peer);
                sp.backoff = Backoff::new(self.redial);
            }
        }
        if !self.trust.is_trusted(&peer) {
            tracing::warn!(%peer, "refusing a device that is not in the trust store (add it with `devicelink trust add {peer}`)");
            self.peers
                .set_error(peer, "not in the trust store; connection refused".into());
            let _ = self.swarm.disconnect_peer_id(peer);
            return;
        }
        tracing::info!(%peer, "connected");
        self.peers.connected(peer, connections);
        self.backoffs.remove(&peer);
        let opener = *self.swarm.local_peer_id() < peer;
        if opener && self.session_of.get(&peer).is_none_or(|h| h.is_finished()) {
            let control = self.swarm.behaviour().stream.new_control();
            let task = open_sessions(peer, control, self.session_ctx());
            let handle = self.sessions.spawn(task);
            self.session_of.insert(peer, handle);
        }
    }

    fn on_inbound_stream(&mut self, peer: PeerId, stream: libp2p::Stream) {
        if !self.trust.is_trusted(&peer) {
            tracing::warn!(%peer, "refused a sync stream from a device that is not trusted");
            self.sessions.spawn(refuse(
                stream,
                RefuseCode::NotTrusted,
                format!("device {peer} is not trusted by this device; pair it first"),
            ));
            let _ = self.swarm.disconnect_peer_id(peer);
            return;
        }
        // A new stream from the same peer replaces a stale one.
        if let Some(old) = self.session_of.remove(&peer) {
            old.abort();
        }
        let ctx = self.session_ctx();
        let handle = self.sessions.spawn(async move {
            let result = ctx.run(peer, stream).await;
            log_session_end(peer, &result);
        });
        self.session_of.insert(peer, handle);
    }

    /// Disconnects peers that are no longer trusted and dials new ones right away.
    fn enforce_trust(&mut self) {
        let connected: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        for peer in connected {
            if !self.trust.is_trusted(&peer) {
                tracing::info!(%peer, "no longer trusted; disconnecting");
                if let Some(handle) = self.session_of.remove(&peer) {
                    handle.abort();
                }
                let _ = self.swarm.disconnect_peer_id(peer);
            }
        }
        self.backoffs.clear();
        self.maintain_connections();
    }

    fn session_ctx(&self) -> SessionRunner {
        SessionRunner {
            ctx: self.ctx.clone(),
            trust: self.trust.clone(),
            listen_addrs: self.listen_addrs.clone(),
            device_name: self.device_name.clone(),
        }
    }
}

/// Everything a session task needs, detached from the swarm.
#[derive(Clone)]
struct SessionRunner {
    ctx: Arc<SessionCtx>,
    trust: TrustStore,
    listen_addrs: Arc<RwLock<Vec<Multiaddr>>>,
    device_name: String,
}

impl SessionRunner {
    async fn run(&self, peer: PeerId, stream: libp2p::Stream) -> Result<(), SessionError> {
        let listen_addrs = self
            .listen_addrs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|a| a.to_string())
            .collect();
        let hello = Hello {
            version: PROTOCOL_VERSION,
            device_name: self.device_name.clone(),
            listen_addrs,
        };
        let trust = self.trust.clone();
        let result = session::run(peer, stream, &self.ctx, hello, |theirs| {
            if let Err(e) = trust.set_addrs(&peer, theirs.listen_addrs.clone()) {
                tracing::warn!(%peer, "cannot remember the peer's addresses: {e}");
            }
        })
        .await;
        if let Err(e) = &result {
            if !matches!(e, SessionError::Closed) {
                self.ctx.peers.set_error(peer, e.to_string());
            }
        }
        result
    }
}

/// The opener side: opens the sync stream and reopens it while the peer stays connected.
async fn open_sessions(peer: PeerId, mut control: libp2p_stream::Control, runner: SessionRunner) {
    let mut delay = Duration::from_millis(50);
    loop {
        if !runner.ctx.peers.is_connected(&peer) || !runner.trust.is_trusted(&peer) {
            return;
        }
        let result = match control.open_stream(peer, SYNC_PROTOCOL).await {
            Ok(stream) => runner.run(peer, stream).await,
            Err(e) => {
                tracing::warn!(%peer, "cannot open a sync stream: {e}");
                runner.ctx.peers.set_error(peer, e.to_string());
                Err(SessionError::Closed)
            }
        };
        log_session_end(peer, &result);
        if matches!(result, Err(SessionError::Lagged)) {
            continue;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

fn log_session_end(peer: PeerId, result: &Result<(), SessionError>) {
    match result {
        Ok(()) | Err(SessionError::Closed) => tracing::info!(%peer, "sync session ended"),
        Err(e @ (SessionError::RefusedByPeer { .. } | SessionError::RefusedPeer { .. })) => {
            tracing::error!(%peer, "sync session refused: {e}")
        }
        Err(e) => tracing::warn!(%peer, "sync session ended: {e}"),
    }
}

/// Sends a refusal on a stream we will not serve, then closes it.
async fn refuse(stream: libp2p::Stream, code: RefuseCode, message: String) {
    let mut transport = tokio_util::codec::Framed::new(stream.compat(), codec());
    if let Ok(frame) = Message::Refuse(Refusal { code, message }).encode() {
        let send = async {
            transport.send(frame).await?;
            SinkExt::<bytes::Bytes>::close(&mut transport).await
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), send).await;
    }
}
