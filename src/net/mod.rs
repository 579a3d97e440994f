//! The libp2p side of the agent: the network loop. Trust gating, keeping trusted peers connected
//! (redial with exponential backoff), starting one sync session per trusted peer, and driving the
//! parts that live in their own modules: the swarm itself ([`swarm`]), relay reservations and the
//! relay server ([`relay`]), and what is known about each link and this device's reachability
//! ([`reach`]).
//!
//! Who opens the sync stream: of two connected devices, the one with the smaller device id. The
//! other accepts. So each pair of devices has exactly one session, whoever dialed.
//!
//! Dials made on a user's request (pairing, `dial`) and to devices found over mDNS leave from a
//! fresh local port: two devices that dial each other at the same moment from their listening
//! ports make one TCP connection by simultaneous open, both sides then start Noise as the
//! initiator and the handshake fails ("input error"; a joiner dialing a device that was just
//! then dialing it for a relay reservation). Redials of linked devices and `--peer`/relay
//! addresses keep the listening port (libp2p's default): the address others observe on those
//! connections is then the NAT's mapping of that port, which hole punches need (QUIC too); a
//! simultaneous redial that fails is redialed with backoff.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use libp2p::core::ConnectedPoint;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm};
use tokio::sync::{mpsc, oneshot};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::compat::FuturesAsyncReadCompatExt;

use crate::discovery::{Announcement, Discovery, DiscoveryConfig, DiscoveryEvent, ListenPorts};
use crate::pairing::{self, HostEvent, LocalDevice, PairingCode, PairingHost, PAIR_PROTOCOL};
use crate::status::PeerTable;
use crate::store::{TrustStore, TrustedDevice};
use crate::sync::message::{codec, Hello, Message, Refusal, RefuseCode, PROTOCOL_VERSION};
use crate::sync::session::{self, SessionCtx, SessionError};
use crate::sync::SYNC_PROTOCOL;

mod dial_back;
pub mod established;
pub mod lookup;
pub mod muxer;
pub mod pending;
pub mod reach;
pub mod relay;
pub mod streams;
pub mod swarm;

pub use swarm::{
    build_swarm, build_swarm_with, Behaviour, BehaviourEvent, SwarmOptions, HANDSHAKE_TIMEOUT,
};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot set up the libp2p transport: {0}")]
    Transport(String),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
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
            // Keeps "a dropped peer is redialed within 1 s" with the loop's tick on top.
            max: Duration::from_millis(500),
        }
    }
}

pub(crate) enum NetCommand {
    Dial(Multiaddr),
    /// Connect (trusted or not, for pairing) and report the authenticated device id.
    Connect {
        target: ConnectTarget,
        reply: oneshot::Sender<Result<PeerId, String>>,
    },
    /// Open a pairing code (advertised over mDNS while open).
    PairOpen {
        expiry: Duration,
        reply: oneshot::Sender<(PairingCode, tokio::sync::broadcast::Receiver<HostEvent>)>,
    },
    /// The trust store changed: drop peers no longer trusted, dial new ones.
    TrustChanged,
    /// Same, and say when the sessions of devices no longer trusted have been stopped (so
    /// nothing written after this reaches them: `unpair` then makes a new group key).
    TrustChangedThen(oneshot::Sender<()>),
    /// A pairing attempt ended: re-advertise and drop leftover untrusted connections.
    PairingEnded,
    /// A trusted device refused this one as not trusted: stop dialing it for a while.
    RefusedBy {
        peer: PeerId,
        message: String,
    },
    Shutdown(oneshot::Sender<()>),
}

/// How often the loop redials, expires pairing codes and drops lingering untrusted connections
/// while any of that is pending ([`Network::pending`]).
const TICK: Duration = Duration::from_millis(100);
/// How often it looks when nothing is pending (every linked device connected and syncing, no
/// code open, no stranger connected): an idle agent sleeps. Any event wakes it sooner.
const IDLE_TICK: Duration = Duration::from_secs(30);
/// After start, the loop ticks for this long whatever else: listeners, observed addresses,
/// reservations and reachability settle.
const SETTLING: Duration = Duration::from_secs(10);

/// How long an untrusted device may stay connected (to pair) when no pairing is open here.
const UNTRUSTED_GRACE: Duration = Duration::from_secs(5);

/// How long a device that refused this one as not trusted is left alone before another try:
/// the first pause, doubled on each further refusal up to the last. A trust change here (a new
/// pairing, a device added) tries at once.
const REFUSED_PAUSE: (Duration, Duration) = (Duration::from_secs(5), Duration::from_secs(600));

#[derive(Clone)]
pub(crate) enum ConnectTarget {
    Addr(Multiaddr),
    Peer(PeerId, Vec<Multiaddr>),
}

/// What the network shares with the rest of the agent about the neighbourhood and pairing.
pub(crate) struct Neighborhood {
    /// Agents announced over mDNS, by claimed id.
    pub nearby: Mutex<BTreeMap<PeerId, Announcement>>,
    pub host: PairingHost,
    /// Joins running on this device (untrusted connections are kept while any is).
    pub joins: AtomicUsize,
    /// Why mDNS is not running, if it is not.
    pub mdns_error: Mutex<Option<String>>,
    /// Serializes handoff claims this device arbitrates (one grant per epoch).
    pub claims: tokio::sync::Mutex<()>,
    /// "Your activity was continued on another device", for local apps.
    pub continued: tokio::sync::broadcast::Sender<crate::handoff::Activity>,
    /// This device's reachability and relay reservations, refreshed by the network loop.
    pub reach: Mutex<reach::ReachReport>,
}

impl Default for Neighborhood {
    fn default() -> Self {
        Self {
            nearby: Mutex::default(),
            host: PairingHost::default(),
            joins: AtomicUsize::new(0),
            mdns_error: Mutex::default(),
            claims: tokio::sync::Mutex::new(()),
            continued: tokio::sync::broadcast::channel(64).0,
            reach: Mutex::default(),
        }
    }
}

impl Neighborhood {
    pub fn reach(&self) -> reach::ReachReport {
        self.reach.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn nearby(&self) -> Vec<Announcement> {
        self.nearby
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn pairing_window(&self) -> bool {
        self.host.is_open() || self.joins.load(Ordering::SeqCst) > 0
    }
}

/// Refuses an explicit TCP port another process listens on. libp2p binds its listeners with
/// SO_REUSEPORT (so hole punches can dial from the listening port), which would otherwise let a
/// second agent share the port and answer the first one's connections. A plain bind (without
/// SO_REUSEPORT) fails while any other socket listens there.
fn ensure_tcp_port_free(addr: &Multiaddr) -> Result<(), NetError> {
    let mut ip = None;
    let mut port = None;
    for protocol in addr.iter() {
        match protocol {
            libp2p::multiaddr::Protocol::Ip4(v4) => ip = Some(std::net::IpAddr::V4(v4)),
            libp2p::multiaddr::Protocol::Ip6(v6) => ip = Some(std::net::IpAddr::V6(v6)),
            libp2p::multiaddr::Protocol::Tcp(p) => port = Some(p),
            _ => {}
        }
    }
    let (Some(ip), Some(port)) = (ip, port) else {
        return Ok(());
    };
    if port == 0 {
        return Ok(());
    }
    match std::net::TcpListener::bind((ip, port)) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(NetError::Listen {
            addr: addr.clone(),
            reason: format!(
                "TCP port {port} is already in use by another program (another devicelink agent?); \
                 stop it, or pick another port (tcp/0 takes a free one)"
            ),
        }),
        // Anything else (no such address on this machine...) is what the real bind reports.
        Err(_) => Ok(()),
    }
}

/// The address a listener was asked to listen on.
fn listen_addr_of(
    waiting: &HashMap<libp2p::core::transport::ListenerId, Multiaddr>,
    listener: libp2p::core::transport::ListenerId,
    asked: &[Multiaddr],
) -> Multiaddr {
    waiting
        .get(&listener)
        .or(asked.first())
        .cloned()
        .unwrap_or_else(Multiaddr::empty)
}

/// Everything the network loop works with besides the swarm.
pub(crate) struct NetworkDeps {
    pub ctx: Arc<SessionCtx>,
    pub trust: TrustStore,
    pub peers: Arc<PeerTable>,
    pub listen_addrs: Arc<RwLock<Vec<Multiaddr>>>,
    pub device_name: String,
    pub redial: RedialPolicy,
    pub static_peers: Vec<Multiaddr>,
    pub neighborhood: Arc<Neighborhood>,
    pub discovery: DiscoveryConfig,
    /// Sender of this loop's own command channel (pairing tasks report trust changes on it).
    pub commands: mpsc::UnboundedSender<NetCommand>,
    /// Relays to reserve on (`--relay`), each ending in `/p2p/ID`.
    pub relays: Vec<(PeerId, Multiaddr)>,
    /// This device serves as its group's relay (`--serve-relay`).
    pub serve_relay: bool,
    /// The relay's record of joiners that found their host (shared with its circuit rules).
    pub relay_lookups: relay::RelayLookups,
    /// Addresses this device is reachable at from outside (`--external`), announced as is.
    pub external: Vec<Multiaddr>,
    /// This device's role with blind devices: it is one (`--blind`), or a full member.
    pub blind: BlindRole,
}

/// Whether this device is a blind store or a full member that uses them.
#[derive(Clone)]
pub(crate) enum BlindRole {
    /// This device is blind: it serves sealed items and syncs no documents.
    Blind(crate::blind::BlindStore),
    /// A full member: it opens a blind session to every blind device of its group.
    Member(Box<crate::blind::member::MemberCtx>),
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

/// A device that refused this one as not trusted: not dialed until `until` (once it refused
/// [`REFUSALS_BEFORE_PAUSE`] times in a row: a single refusal can be a race while two devices
/// are being linked).
#[derive(Debug, Clone, Copy)]
struct Refused {
    times: u32,
    until: Instant,
    pause: Duration,
}

const REFUSALS_BEFORE_PAUSE: u32 = 3;

/// An address given with `--peer`, dialed until it answers and redialed when it drops.
struct StaticPeer {
    addr: Multiaddr,
    peer: Option<PeerId>,
    backoff: Backoff,
}

pub(crate) struct Network {
    swarm: Swarm<Behaviour>,
    ctx: Arc<SessionCtx>,
    trust: TrustStore,
    peers: Arc<PeerTable>,
    listen_addrs: Arc<RwLock<Vec<Multiaddr>>>,
    device_name: String,
    redial: RedialPolicy,
    neighborhood: Arc<Neighborhood>,
    discovery_config: DiscoveryConfig,
    discovery: Option<Discovery>,
    commands: mpsc::UnboundedSender<NetCommand>,
    pending_connects: HashMap<ConnectionId, oneshot::Sender<Result<PeerId, String>>>,
    static_peers: Vec<StaticPeer>,
    /// Untrusted connections and when they were made: dropped after [`UNTRUSTED_GRACE`]
    /// (they may only pair in the meantime; sync streams are refused at once).
    untrusted: HashMap<PeerId, Instant>,
    backoffs: HashMap<PeerId, Backoff>,
    /// Trusted devices that refused this one as not trusted (it was removed from their group),
    /// and until when they are not dialed again.
    refused_by: HashMap<PeerId, Refused>,
    /// Which device answered at each address this device dialed (while connected).
    dialed: HashMap<Multiaddr, PeerId>,
    sessions: JoinSet<()>,
    session_of: HashMap<PeerId, AbortHandle>,
    reach: reach::Reach,
    reservations: relay::Reservations,
    /// Dials through a relay in flight, per peer (at most one each).
    relayed_dials: HashMap<PeerId, ConnectionId>,
    serve_relay: bool,
    blind: BlindRole,
    /// Blind sessions (this device a member), per blind device.
    blind_session_of: HashMap<PeerId, AbortHandle>,
    /// The relay's bound on pair lookups from strangers.
    lookups: lookup::LookupLimit,
    relay_lookups: relay::RelayLookups,
    /// When the slower upkeep (group relays, own group entry, reachability report) last ran.
    upkept: Instant,
    started: Instant,
}

/// How long after start relayed dials wait for this device's observed address (so the hole
/// punch on the relayed connection has an address to try).
const OBSERVED_WAIT: Duration = Duration::from_secs(2);

/// How often the slower upkeep runs.
const UPKEEP: Duration = Duration::from_secs(1);

impl Network {
    pub fn new(mut swarm: Swarm<Behaviour>, deps: NetworkDeps) -> Self {
        let redial = deps.redial;
        let mut reservations = relay::Reservations::default();
        for (peer, addr) in deps.relays {
            reservations.add_configured(peer, addr);
        }
        for addr in deps.external {
            swarm.add_external_address(addr);
        }
        Self {
            swarm,
            ctx: deps.ctx,
            trust: deps.trust,
            peers: deps.peers,
            listen_addrs: deps.listen_addrs,
            device_name: deps.device_name,
            redial,
            neighborhood: deps.neighborhood,
            discovery_config: deps.discovery,
            discovery: None,
            commands: deps.commands,
            pending_connects: HashMap::new(),
            static_peers: deps
                .static_peers
                .into_iter()
                .map(|addr| StaticPeer {
                    addr,
                    peer: None,
                    backoff: Backoff::new(redial),
                })
                .collect(),
            untrusted: HashMap::new(),
            backoffs: HashMap::new(),
            refused_by: HashMap::new(),
            dialed: HashMap::new(),
            sessions: JoinSet::new(),
            session_of: HashMap::new(),
            reach: reach::Reach::default(),
            reservations,
            relayed_dials: HashMap::new(),
            serve_relay: deps.serve_relay,
            blind: deps.blind,
            blind_session_of: HashMap::new(),
            lookups: lookup::LookupLimit::default(),
            relay_lookups: deps.relay_lookups,
            upkept: Instant::now() - UPKEEP,
            started: Instant::now(),
        }
    }

    /// Starts listening on `addrs` and waits until each listener has reported an address (a
    /// listener on every interface reports one per interface; the first one counts).
    pub async fn listen(&mut self, addrs: &[Multiaddr]) -> Result<(), NetError> {
        let mut waiting: HashMap<libp2p::core::transport::ListenerId, Multiaddr> = HashMap::new();
        for addr in addrs {
            ensure_tcp_port_free(addr)?;
            let id = self
                .swarm
                .listen_on(addr.clone())
                .map_err(|e| NetError::Listen {
                    addr: addr.clone(),
                    reason: e.to_string(),
                })?;
            waiting.insert(id, addr.clone());
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !waiting.is_empty() {
            let event = tokio::time::timeout_at(deadline, self.swarm.select_next_some()).await;
            match event {
                Ok(SwarmEvent::NewListenAddr {
                    listener_id,
                    address,
                }) => {
                    waiting.remove(&listener_id);
                    self.on_listen_addr(address);
                }
                Ok(SwarmEvent::ListenerError { listener_id, error }) => {
                    return Err(NetError::Listen {
                        addr: listen_addr_of(&waiting, listener_id, addrs),
                        reason: error.to_string(),
                    })
                }
                Ok(SwarmEvent::ListenerClosed {
                    listener_id,
                    reason,
                    ..
                }) => {
                    return Err(NetError::Listen {
                        addr: listen_addr_of(&waiting, listener_id, addrs),
                        reason: match reason {
                            Err(e) => e.to_string(),
                            Ok(()) => "the listener closed".to_string(),
                        },
                    })
                }
                Ok(_) => {}
                Err(_) => {
                    let addr = waiting
                        .values()
                        .next()
                        .cloned()
                        .unwrap_or_else(|| addrs[0].clone());
                    return Err(NetError::Listen {
                        addr,
                        reason: "no listen address reported within 5s".into(),
                    });
                }
            }
        }
        Ok(())
    }

    fn on_listen_addr(&mut self, address: Multiaddr) {
        // The relay server hands its external addresses to the devices reserving on it: its
        // own addresses, unless loopback (a VPS behind 1:1 NAT passes --external instead).
        if self.serve_relay && !relay::is_relayed(&address) && !relay::is_local_only(&address) {
            self.swarm.add_external_address(address.clone());
        }
        let mut addrs = self.listen_addrs.write().unwrap_or_else(|p| p.into_inner());
        if !addrs.contains(&address) {
            addrs.push(address);
            drop(addrs);
            self.advertise();
        }
    }

    fn forget_listen_addrs(&mut self, gone: &[Multiaddr]) {
        self.listen_addrs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|a| !gone.contains(a));
        self.advertise();
    }

    /// Runs until a shutdown command (or until every command sender is gone).
    pub async fn run(mut self, mut commands: mpsc::UnboundedReceiver<NetCommand>) {
        let mut control = self.swarm.behaviour().stream.new_control();
        let accepted = (
            control.accept(SYNC_PROTOCOL),
            control.accept(PAIR_PROTOCOL),
            control.accept(crate::handoff::HANDOFF_PROTOCOL),
            control.accept(lookup::PAIR_LOOKUP_PROTOCOL),
        );
        let mut incoming_blind = match control.accept(crate::blind::protocol::BLIND_PROTOCOL) {
            Ok(streams) => streams,
            Err(_) => {
                tracing::error!("cannot accept blind store streams");
                return;
            }
        };
        let mut legacy = futures::stream::select_all(
            crate::sync::message::LEGACY_SYNC_PROTOCOLS
                .into_iter()
                .filter_map(|p| {
                    control
                        .accept(p.clone())
                        .ok()
                        .map(|s| s.map(move |x| (p.clone(), x)))
                }),
        );
        let (mut incoming, mut incoming_pair, mut incoming_claims, mut lookups) = match accepted {
            (Ok(sync), Ok(pair), Ok(claims), Ok(lookups)) => (sync, pair, claims, lookups),
            _ => {
                tracing::error!("cannot accept sync, pairing, handoff and lookup streams");
                return;
            }
        };
        let (discovered_tx, mut discovered) = mpsc::unbounded_channel();
        self.start_discovery(discovered_tx);
        // The first tick at once: linked devices are dialed as soon as the agent starts.
        let tick = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(tick);
        let done = loop {
            let mut ticked = false;
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                Some((peer, stream)) = incoming.next() => self.on_inbound_stream(peer, stream),
                Some((peer, stream)) = incoming_pair.next() => self.on_pair_stream(peer, stream),
                Some((peer, stream)) = incoming_claims.next() => self.on_claim_stream(peer, stream),
                Some((asker, stream)) = lookups.next() => self.on_lookup_stream(asker, stream),
                Some((peer, stream)) = incoming_blind.next() => self.on_blind_stream(peer, stream),
                Some((protocol, (peer, stream))) = legacy.next() => {
                    let message = format!(
                        "this device speaks devicelink sync {PROTOCOL_VERSION}; {protocol} is too old: update devicelink on device {peer}"
                    );
                    tracing::error!(%peer, "refused an old peer: {message}");
                    self.peers.set_error(peer, message.clone());
                    let refusal = Refusal { code: RefuseCode::UnsupportedVersion, message };
                    self.sessions.spawn(refuse(stream, refusal));
                }
                Some(event) = discovered.recv() => self.on_discovery(event),
                command = commands.recv() => match command {
                    Some(NetCommand::Dial(addr)) => self.add_static_peer(addr),
                    Some(NetCommand::Connect { target, reply }) => self.connect(target, reply),
                    Some(NetCommand::PairOpen { expiry, reply }) => {
                        let code = self.neighborhood.host.open(expiry);
                        let events = self.neighborhood.host.subscribe();
                        self.advertise();
                        self.upkept = Instant::now() - UPKEEP; // list the slot for relays now
                        let _ = reply.send((code, events));
                    }
                    Some(NetCommand::TrustChanged) => {
                        self.refused_by.clear();
                        self.enforce_trust();
                    }
                    Some(NetCommand::TrustChangedThen(done)) => {
                        self.refused_by.clear();
                        self.enforce_trust();
                        let _ = done.send(());
                    }
                    Some(NetCommand::RefusedBy { peer, message }) => self.on_refused_by(peer, message),
                    Some(NetCommand::PairingEnded) => {
                        self.refused_by.clear();
                        self.advertise();
                        self.enforce_trust();
                    }
                    Some(NetCommand::Shutdown(done)) => break Some(done),
                    None => break None,
                },
                _ = &mut tick => {
                    ticked = true;
                    if self.neighborhood.host.expire() {
                        self.advertise();
                        self.enforce_trust();
                    }
                    self.drop_untrusted_after_grace();
                    let trust = &self.trust;
                    self.peers.forget_strangers(|peer| trust.is_trusted(peer));
                    self.maintain_connections();
                    self.restart_ended_sessions();
                    self.maintain_reservations();
                    if self.upkept.elapsed() >= UPKEEP {
                        self.upkept = Instant::now();
                        self.upkeep().await;
                    }
                }
                Some(ended) = self.sessions.join_next(), if !self.sessions.is_empty() => {
                    if let Err(e) = ended {
                        if e.is_panic() {
                            // One session or pairing task: reported; a sync session is
                            // reopened on the next tick (`restart_ended_sessions`).
                            tracing::error!("a network task panicked: {e}");
                        }
                    }
                }
            }
            // After an event, look again soon (it may have left work: a dial, a session to
            // reopen); after a tick, sleep long unless something is still pending.
            let now = tokio::time::Instant::now();
            if ticked {
                let next = if self.pending() { TICK } else { IDLE_TICK };
                tick.as_mut().reset(now + next);
            } else if tick.deadline() > now + TICK {
                tick.as_mut().reset(now + TICK);
            }
        };
        self.sessions.shutdown().await;
        drop(incoming);
        drop(incoming_pair);
        drop(incoming_claims);
        drop(lookups);
        drop(incoming_blind);
        drop(self);
        if let Some(done) = done {
            let _ = done.send(());
        }
    }

    fn start_discovery(&mut self, events: mpsc::UnboundedSender<DiscoveryEvent>) {
        if !self.discovery_config.enabled {
            self.set_mdns_error(Some("mDNS is turned off (--no-mdns)".to_string()));
            return;
        }
        match Discovery::start(
            self.discovery_config.clone(),
            *self.swarm.local_peer_id(),
            &self.device_name,
            events,
        ) {
            Ok(discovery) => {
                self.discovery = Some(discovery);
                self.advertise();
            }
            Err(e) => {
                let error = e.to_string();
                tracing::warn!("{error}; direct --peer dialing still works");
                self.set_mdns_error(Some(error));
            }
        }
    }

    fn set_mdns_error(&self, error: Option<String>) {
        *self
            .neighborhood
            .mdns_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = error;
    }

    /// (Re-)announces this device over mDNS: where it listens now (every TCP and QUIC listener)
    /// and the open pairing slot, if any. Called whenever either changes.
    fn advertise(&mut self) {
        let Some(discovery) = &mut self.discovery else {
            return;
        };
        let ports = ListenPorts::of(&self.listen_addrs.read().unwrap_or_else(|p| p.into_inner()));
        let error = match discovery.advertise(&ports, self.neighborhood.host.open_slot()) {
            Ok(true) => None,
            Ok(false) => Some("not listening on any TCP or QUIC address yet".to_string()),
            Err(e) => {
                tracing::warn!("cannot update the mDNS announcement: {e}");
                Some(format!("cannot announce this device: {e}"))
            }
        };
        self.set_mdns_error(error);
    }

    fn on_discovery(&mut self, event: DiscoveryEvent) {
        let mut nearby = self
            .neighborhood
            .nearby
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match event {
            DiscoveryEvent::Found(announcement) => {
                let id = announcement.claimed_id;
                let addrs = announcement.addrs.clone();
                tracing::debug!(device = %id, name = announcement.name, "found over mDNS");
                nearby.insert(id, announcement);
                drop(nearby);
                if self.trust.is_trusted(&id) && !self.is_paused(&id) {
                    self.peers.found_via(id, "mdns");
                    if !self.swarm.is_connected(&id) {
                        // The dial names the claimed id: Noise fails unless it is really that
                        // device. It goes out even while another dial is in flight: that one may
                        // be to addresses the device no longer listens on (a QUIC dial to a
                        // closed port waits for its handshake timeout).
                        let opts = DialOpts::peer_id(id)
                            .addresses(addrs)
                            .condition(PeerCondition::Disconnected)
                            .allocate_new_port()
                            .build();
                        if let Err(e) = self.swarm.dial(opts) {
                            tracing::debug!(device = %id, "dial not started: {e}");
                        }
                    }
                }
            }
            DiscoveryEvent::Lost(id) => {
                nearby.remove(&id);
            }
        }
    }

    fn connect(&mut self, target: ConnectTarget, reply: oneshot::Sender<Result<PeerId, String>>) {
        if let ConnectTarget::Addr(addr) = &target {
            let local = *self.swarm.local_peer_id();
            let plain: Multiaddr = addr
                .iter()
                .filter(|p| !matches!(p, libp2p::multiaddr::Protocol::P2p(_)))
                .collect();
            let own = addr
                .iter()
                .any(|p| p == libp2p::multiaddr::Protocol::P2p(local))
                || self
                    .listen_addrs
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains(&plain);
            if own {
                let _ = reply.send(Err(format!(
                    "{addr} is this device's own address: give the address of the other device \
                     (`devicelink pair` on it prints it)"
                )));
                return;
            }
        }
        let opts = match target {
            ConnectTarget::Peer(peer, _) if self.swarm.is_connected(&peer) => {
                let _ = reply.send(Ok(peer));
                return;
            }
            ConnectTarget::Peer(peer, addrs) => DialOpts::peer_id(peer)
                .addresses(addrs)
                .allocate_new_port()
                .build(),
            // Already connected through that address (e.g. a pairing retried): reuse it.
            ConnectTarget::Addr(addr) => match self.dialed.get(&addr) {
                Some(peer) if self.swarm.is_connected(peer) => {
                    let _ = reply.send(Ok(*peer));
                    return;
                }
                _ => DialOpts::unknown_peer_id()
                    .address(addr)
                    .allocate_new_port()
                    .build(),
            },
        };
        let id = opts.connection_id();
        match self.swarm.dial(opts) {
            Ok(()) => {
                self.pending_connects.insert(id, reply);
            }
            Err(e) => {
                let _ = reply.send(Err(e.to_string()));
            }
        }
    }

    /// A pairing stream from `peer`: run the host side of the exchange.
    fn on_pair_stream(&mut self, peer: PeerId, stream: libp2p::Stream) {
        let blind = matches!(self.blind, BlindRole::Blind(_));
        let me = LocalDevice {
            id: *self.swarm.local_peer_id(),
            name: self.device_name.clone(),
            listen_addrs: crate::blind::marked(self.listen_addr_strings(), blind),
        };
        let (host, trust, commands, registry) = (
            self.neighborhood.host.clone(),
            self.trust.clone(),
            self.commands.clone(),
            self.ctx.registry.clone(),
        );
        self.sessions.spawn(async move {
            let result = pairing::host(&host, &me, peer, stream, |paired| {
                save_paired(&trust, peer, paired)
            })
            .await;
            match result {
                Ok(paired) => {
                    tracing::info!(device = %peer, name = paired.name, "paired");
                    record_in_group(&registry, &me, peer, &paired).await;
                }
                // "Busy" turns a joiner away without an attempt: not worth a warning each
                // (a stranger can ask as often as it likes).
                Err(crate::pairing::PairError::Busy) => {
                    tracing::debug!(device = %peer, "pairing attempt turned away: busy")
                }
                Err(e) => tracing::warn!(device = %peer, "pairing attempt failed: {e}"),
            }
            let _ = commands.send(NetCommand::PairingEnded);
        });
    }

    /// A blind session from member `peer` (this device blind): serve it from the blind store.
    fn on_blind_stream(&mut self, peer: PeerId, stream: libp2p::Stream) {
        let BlindRole::Blind(store) = &self.blind else {
            return; // a full member serves no blind sessions: dropping the stream says so
        };
        if !self.trust.is_trusted(&peer) {
            tracing::warn!(%peer, "refused a blind session from a device that is not a member");
            return;
        }
        let commands = self.commands.clone();
        let server = crate::blind::protocol::Server {
            store: store.clone(),
            trust: self.trust.clone(),
            addrs: self.listen_addr_strings(),
            trust_changed: Box::new(move || {
                let _ = commands.send(NetCommand::TrustChanged);
            }),
        };
        self.sessions.spawn(async move {
            match server.serve(peer, stream).await {
                Ok(()) | Err(crate::blind::protocol::BlindSessionError::Closed) => {
                    tracing::info!(%peer, "blind session ended")
                }
                Err(e) => tracing::warn!(%peer, "blind session ended: {e}"),
            }
        });
    }

    /// "Which device has the code with this slot and tag open?" from a device pairing through
    /// this relay: a group device with that code open and connected here (see [`lookup`]). Only
    /// a relay answers, and only [`lookup::LOOKUPS_PER_SEC`] questions a second.
    fn on_lookup_stream(&mut self, asker: PeerId, stream: libp2p::Stream) {
        if !self.serve_relay {
            return;
        }
        let Some(ticket) = self.lookups.admit() else {
            tracing::debug!("pair lookup dropped: over the relay's rate");
            return;
        };
        let open = self.open_codes();
        let misses = self.lookups.misses();
        let found = self.relay_lookups.clone();
        self.sessions.spawn(async move {
            lookup::serve(stream, move |slot, tag| {
                let host = lookup::answer(&open, &misses, slot, tag);
                if host.is_some() {
                    found.found(asker);
                }
                host
            })
            .await;
            drop(ticket);
        });
    }

    /// The pairing codes open on group devices connected here: from the device group, or on a
    /// blind relay (which holds no group) as its members told it.
    fn open_codes(&self) -> Vec<lookup::OpenCode> {
        let reachable = |id: &PeerId| self.trust.is_trusted(id) && self.swarm.is_connected(id);
        if let BlindRole::Blind(store) = &self.blind {
            return store
                .open_codes()
                .into_iter()
                .filter(|(id, _, _)| reachable(id))
                .map(|(device, slot, tag)| lookup::OpenCode { device, slot, tag })
                .collect();
        }
        match self.ctx.registry.handle(crate::group::GROUP_DOC) {
            Ok(group) => crate::group::members(&group)
                .into_iter()
                .filter(|m| !m.removed && reachable(&m.id))
                .filter_map(|m| {
                    Some(lookup::OpenCode {
                        device: m.id,
                        slot: m.pair_slot?,
                        tag: m.pair_tag?,
                    })
                })
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// A handoff claim from `peer` for an activity this device holds.
    fn on_claim_stream(&mut self, peer: PeerId, stream: libp2p::Stream) {
        if !self.trust.is_trusted(&peer) {
            tracing::warn!(%peer, "ignored a handoff claim from an untrusted device");
            return;
        }
        let me = self.swarm.local_peer_id().to_string();
        let (registry, neighborhood) = (self.ctx.registry.clone(), self.neighborhood.clone());
        self.sessions.spawn(crate::handoff::serve_claim(
            stream,
            move |id, epoch| async move {
                let _one_at_a_time = neighborhood.claims.lock().await;
                let doc = registry
                    .handle(crate::handoff::ACTIVITIES_DOC)
                    .map_err(|e| e.to_string())?;
                let current = crate::handoff::current(&doc)
                    .remove(&id)
                    .ok_or_else(|| format!("no activity {id}"))?;
                if !current.is_live(crate::conflict::now()) {
                    return Err(format!("activity {id} has expired or was unpublished"));
                }
                if current.holder != me || current.epoch != epoch {
                    return Err(format!(
                        "activity {id} was already continued on {} (epoch {})",
                        current.holder, current.epoch
                    ));
                }
                let granted = crate::handoff::Activity {
                    holder: peer.to_string(),
                    epoch: current.epoch + 1,
                    updated_at: crate::conflict::now(),
                    ..current
                };
                crate::handoff::write(&doc, &granted)
                    .await
                    .map_err(|e| e.to_string())?;
                tracing::info!(activity = id, on = %peer, "activity continued on another device");
                let _ = neighborhood.continued.send(granted.clone());
                Ok(granted)
            },
        ));
    }

    fn listen_addr_strings(&self) -> Vec<String> {
        self.listen_addrs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|a| a.to_string())
            .collect()
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

    /// Trusted devices and where to dial them: what they announce over mDNS now first (fresh),
    /// then the addresses remembered from earlier (stale after the device restarted on new
    /// ports).
    fn trusted(&self) -> BTreeMap<PeerId, Vec<Multiaddr>> {
        let nearby = self
            .neighborhood
            .nearby
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match self.trust.list() {
            Ok(list) => list
                .into_iter()
                .map(|(id, device)| {
                    let mut addrs = nearby.get(&id).map(|a| a.addrs.clone()).unwrap_or_default();
                    for addr in device.multiaddrs() {
                        if !addrs.contains(&addr) {
                            addrs.push(addr);
                        }
                    }
                    (id, addrs)
                })
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
        let now = Instant::now();
        // Kept a while after the pause ends, so that a device refusing again pauses longer.
        self.refused_by
            .retain(|_, r| r.until + r.pause.max(REFUSED_PAUSE.1) > now);
        for (peer, addrs) in self.trusted() {
            if peer == local
                || addrs.is_empty()
                || self.swarm.is_connected(&peer)
                || self.is_paused(&peer)
            {
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
            // Relayed addresses are dialed on their own: a direct address that swallows
            // packets (a peer's address on another network, a QUIC port behind a NAT) would
            // otherwise hold the whole dial, relayed path included, until its handshake timeout.
            let (relayed, direct): (Vec<Multiaddr>, Vec<Multiaddr>) =
                addrs.into_iter().partition(relay::is_relayed);
            if !direct.is_empty() {
                let opts = DialOpts::peer_id(peer)
                    .addresses(direct)
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build();
                if let Err(e) = self.swarm.dial(opts) {
                    tracing::debug!(%peer, "dial not started: {e}");
                }
            }
            // A hole punch over the relayed connection needs this device's address as others
            // see it (identify, from the relay): wait for it a moment after start.
            let punch_ready = self.reach.has_observed() || self.started.elapsed() > OBSERVED_WAIT;
            if !relayed.is_empty() && punch_ready && !self.relayed_dials.contains_key(&peer) {
                let opts = DialOpts::peer_id(peer)
                    .addresses(relayed)
                    .condition(PeerCondition::Disconnected)
                    .build();
                let id = opts.connection_id();
                match self.swarm.dial(opts) {
                    Ok(()) => {
                        self.relayed_dials.insert(peer, id);
                    }
                    Err(e) => tracing::debug!(%peer, "relayed dial not started: {e}"),
                }
            }
        }
        for i in 0..self.static_peers.len() {
            let connected = self.static_peers[i]
                .peer
                .is_some_and(|p| self.swarm.is_connected(&p) || self.is_paused(&p));
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
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                if !self.reservations.on_new_listen_addr(listener_id, &address) {
                    tracing::info!("listening on {address}");
                }
                self.on_listen_addr(address);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                tracing::info!("no longer listening on {address}");
                self.forget_listen_addrs(&[address]);
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                addresses,
                reason,
            } => {
                let reason = reason.map_err(|e| reservation_error(&e));
                match self.reservations.on_listener_closed(listener_id, reason) {
                    Some(relayed) => self.forget_listen_addrs(&relayed),
                    None => self.forget_listen_addrs(&addresses),
                }
            }
            SwarmEvent::ExternalAddrConfirmed { address } => {
                tracing::info!("reachable from outside at {address}");
                self.reach.confirmed(address);
            }
            SwarmEvent::ExternalAddrExpired { address } => self.reach.expired(&address),
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                if let Some(reply) = self.pending_connects.remove(&connection_id) {
                    let _ = reply.send(Ok(peer_id));
                }
                self.relayed_dials.retain(|_, c| *c != connection_id);
                // The one place connection state is recorded (with `ConnectionClosed`), whatever
                // the peer's trust: `status`, `peers`, `doctor` and sessions all read it.
                self.peers.connected(peer_id, num_established.get());
                let link = self.reach.connected(peer_id, connection_id, &endpoint);
                self.peers.set_link(
                    peer_id,
                    Some(link.label()),
                    self.reach.punch_summary(&peer_id),
                );
                self.reservations.on_connected(&peer_id);
                self.on_connected(peer_id, &endpoint)
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                cause,
                ..
            } => {
                self.peers.connected(peer_id, num_established);
                let link = self.reach.closed(peer_id, connection_id);
                self.peers.set_link(
                    peer_id,
                    link.map(reach::LinkKind::label),
                    self.reach.punch_summary(&peer_id),
                );
                if num_established == 0 {
                    self.untrusted.remove(&peer_id);
                    if !self.trust.is_trusted(&peer_id) {
                        self.reach.forget_peer(&peer_id);
                    }
                    self.dialed.retain(|_, p| *p != peer_id);
                    tracing::info!(peer = %peer_id, "disconnected{}", cause.map(|c| format!(": {c}")).unwrap_or_default());
                    // Redial soon, then back off (only devices this one dials: trusted ones).
                    if self.trust.is_trusted(&peer_id) {
                        self.backoffs.insert(peer_id, Backoff::new(self.redial));
                    }
                    for sp in self
                        .static_peers
                        .iter_mut()
                        .filter(|s| s.peer == Some(peer_id))
                    {
                        sp.backoff = Backoff::new(self.redial);
                    }
                }
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id,
                connection_id,
                error,
            } => {
                if let Some(reply) = self.pending_connects.remove(&connection_id) {
                    let _ = reply.send(Err(error.to_string()));
                }
                self.relayed_dials.retain(|_, c| *c != connection_id);
                tracing::debug!(peer = ?peer_id, "dial failed: {error}");
            }
            SwarmEvent::IncomingConnectionError { error, .. } => {
                tracing::debug!("incoming connection failed: {error}");
            }
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        use libp2p::{autonat, dcutr, identify, relay as p2p_relay};
        match event {
            BehaviourEvent::Identify(identify::Event::Received { info, .. }) => {
                self.reach.observed(info.observed_addr);
            }
            BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            }) => {
                match result {
                    Ok(connection) => {
                        tracing::info!(peer = %remote_peer_id, "hole punch succeeded: direct connection");
                        // Every stream goes direct from now on: the relayed link is closed. Not
                        // for a device that is not linked: it is pairing, and its pairing stream
                        // runs on the relayed link (which ends with the pairing).
                        let relayed = self.reach.punched(remote_peer_id, connection);
                        if self.trust.is_trusted(&remote_peer_id) {
                            for relayed in relayed {
                                self.swarm.close_connection(relayed);
                            }
                        }
                    }
                    Err(e) => {
                        tracing::info!(peer = %remote_peer_id, "hole punch failed ({e}); staying relayed");
                        self.reach.punch_failed(remote_peer_id, e.to_string());
                    }
                }
                self.peers.set_link(
                    remote_peer_id,
                    self.reach.best(&remote_peer_id).map(reach::LinkKind::label),
                    self.reach.punch_summary(&remote_peer_id),
                );
            }
            BehaviourEvent::Autonat(autonat::v2::client::Event {
                tested_addr,
                server,
                result,
                ..
            }) => match result {
                Ok(()) => self.reach.confirmed(tested_addr),
                Err(e) => {
                    tracing::info!("{tested_addr} is not reachable from outside ({e})");
                    self.reach
                        .not_reachable(tested_addr, format!("{e} (tested by {server})"));
                }
            },
            BehaviourEvent::RelayServer(event) => match event {
                p2p_relay::Event::ReservationReqDenied { src_peer_id, .. } => {
                    tracing::info!(peer = %src_peer_id, "refused a relay reservation: not one of this group's devices");
                }
                p2p_relay::Event::ReservationReqAccepted {
                    src_peer_id,
                    renewed,
                } => {
                    tracing::debug!(peer = %src_peer_id, renewed, "relay reservation accepted");
                }
                p2p_relay::Event::CircuitReqDenied {
                    src_peer_id,
                    dst_peer_id,
                    ..
                } => {
                    tracing::info!(from = %src_peer_id, to = %dst_peer_id, "refused a relayed connection");
                }
                other => tracing::debug!("relay: {other:?}"),
            },
            BehaviourEvent::RelayClient(event) => tracing::debug!("relay client: {event:?}"),
            _ => {}
        }
    }

    /// Starts a reservation on each relay that has none and is due.
    fn maintain_reservations(&mut self) {
        let local = *self.swarm.local_peer_id();
        for (relay, addr) in self.reservations.due(local) {
            let listener = self
                .swarm
                .listen_on(addr.clone())
                .map_err(|e| e.to_string());
            if let Err(e) = &listener {
                tracing::warn!("cannot reserve on the relay at {addr}: {e}");
            }
            self.reservations.listening(relay, listener);
        }
        // A failed hole punch is tried again a few times, on a fresh relayed connection (the
        // device that saw it fail closes the old one; both redial).
        for (peer, relayed) in self.reach.punch_retries_due() {
            self.reach.punch_retrying(&peer);
            for connection in relayed {
                self.swarm.close_connection(connection);
            }
        }
    }

    /// Once a second: relays named by the device group, this device's own entry in it (current
    /// addresses, relayed ones included), and the reachability report.
    async fn upkeep(&mut self) {
        let local = *self.swarm.local_peer_id();
        match self.ctx.registry.handle(crate::group::GROUP_DOC) {
            Ok(group) => {
                let relays = crate::group::relays(&group, local)
                    .into_iter()
                    .filter(|(peer, _)| self.trust.is_trusted(peer))
                    .map(|(peer, addrs)| {
                        (peer, addrs.iter().filter_map(|a| a.parse().ok()).collect())
                    })
                    .collect();
                self.reservations.set_from_group(relays);
                let addrs = self.listen_addr_strings();
                let pairing = self.neighborhood.host.open_lookup();
                let wanted = crate::group::SelfEntry {
                    name: &self.device_name,
                    addrs: &addrs,
                    relay: self.serve_relay,
                    pair_slot: pairing.as_ref().map(|(slot, _)| *slot),
                    pair_tag: pairing.map(|(_, tag)| tag),
                };
                let published = crate::group::publish_self(&group, local, wanted);
                if let Err(e) = published.await {
                    tracing::warn!("cannot publish this device's addresses in its group: {e}");
                }
            }
            Err(e) => tracing::warn!("cannot open the device group: {e}"),
        }
        let serving: Option<Vec<Multiaddr>> = self
            .serve_relay
            .then(|| self.swarm.external_addresses().cloned().collect());
        let report = self
            .reach
            .report(serving.as_deref(), self.reservations.report());
        *self
            .neighborhood
            .reach
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = report;
    }

    fn on_connected(&mut self, peer: PeerId, endpoint: &ConnectedPoint) {
        match endpoint {
            ConnectedPoint::Dialer { address, .. } => {
                self.dialed.insert(address.clone(), peer);
                for sp in self.static_peers.iter_mut().filter(|s| &s.addr == address) {
                    sp.peer = Some(peer);
                    sp.backoff = Backoff::new(self.redial);
                    self.peers.found_via(peer, "address (--peer)");
                }
                self.peers.set_address(peer, address.to_string());
            }
            ConnectedPoint::Listener { send_back_addr, .. } => {
                self.peers.found_via(peer, "it dialed this device");
                self.peers.set_address(peer, send_back_addr.to_string());
            }
        }
        if !self.trust.is_trusted(&peer) {
            if self.trust.is_revoked(&peer) {
                // It is told why (so it stops dialing), and may still pair again on purpose: like
                // any untrusted device it is dropped after the grace unless a pairing is open.
                tracing::warn!(%peer, "a device removed from this group connected; telling it so");
                self.peers.set_error(
                    peer,
                    "removed from the device group; sync refused (pair it again to re-admit it)"
                        .into(),
                );
                self.untrusted.entry(peer).or_insert_with(Instant::now);
                if self.neighborhood.pairing_window() {
                    return; // it may be here to pair again
                }
                let mut control = self.swarm.behaviour().stream.new_control();
                let refusal = Refusal::removed(self.swarm.local_peer_id());
                self.sessions.spawn(async move {
                    let open = control.open_stream(peer, SYNC_PROTOCOL);
                    if let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_secs(2), open).await
                    {
                        refuse(stream, refusal).await;
                    }
                });
                return;
            }
            // It may only pair: sync streams are refused, and the connection is dropped after a
            // short grace unless a pairing is open here.
            tracing::info!(%peer, "a device that is not in the trust store connected; it may only pair");
            self.peers.set_error(
                peer,
                "not in the trust store; sync refused (pair it with `devicelink pair`)".into(),
            );
            self.untrusted.entry(peer).or_insert_with(Instant::now);
            return;
        }
        self.untrusted.remove(&peer);
        tracing::info!(%peer, "connected");
        self.backoffs.remove(&peer);
        self.start_session_if_opener(peer);
    }

    /// `peer` refused this device as not trusted (it removed this device from its group): say so
    /// in status, hang up, and stop dialing it.
    fn on_refused_by(&mut self, peer: PeerId, message: String) {
        tracing::warn!(%peer, "refused by a device of the group: {message}; not dialing it for now");
        let now = Instant::now();
        let refused = match self.refused_by.get(&peer) {
            None => Refused {
                times: 1,
                until: now,
                pause: Duration::ZERO,
            },
            Some(r) if r.times + 1 < REFUSALS_BEFORE_PAUSE => Refused {
                times: r.times + 1,
                until: now,
                pause: Duration::ZERO,
            },
            Some(r) => {
                let pause = (r.pause * 2).clamp(REFUSED_PAUSE.0, REFUSED_PAUSE.1);
                Refused {
                    times: r.times + 1,
                    until: now + pause,
                    pause,
                }
            }
        };
        self.refused_by.insert(peer, refused);
        self.peers.removed_this_device(peer);
        let mut error = format!("this device was refused by {peer}: {message}");
        if refused.pause.is_zero() {
            self.peers.set_error(peer, error);
            return; // not yet: the usual reconnect and backoff go on
        }
        error.push_str(&format!(
            " (not dialing it for {} s)",
            refused.pause.as_secs()
        ));
        self.peers.set_error(peer, error);
        if let Some(handle) = self.session_of.remove(&peer) {
            handle.abort();
        }
        if !self.neighborhood.pairing_window() {
            // (While a pairing is open here, it may be the device pairing this one again.)
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    fn is_paused(&self, peer: &PeerId) -> bool {
        self.refused_by
            .get(peer)
            .is_some_and(|r| r.until > Instant::now())
    }

    /// Reopens the sync session with connected trusted peers whose opener task ended while the
    /// peer stayed connected (it only ends by itself on a disconnect, so this catches a panic).
    fn restart_ended_sessions(&mut self) {
        let local = *self.swarm.local_peer_id();
        let ended: Vec<PeerId> = self
            .session_of
            .iter()
            .filter(|(peer, handle)| {
                local < **peer
                    && handle.is_finished()
                    && self.swarm.is_connected(peer)
                    && self.trust.is_trusted(peer)
            })
            .map(|(peer, _)| *peer)
            .collect();
        for peer in ended {
            self.start_session_if_opener(peer);
        }
    }

    /// Of two devices, the one with the smaller id opens the sync stream. With a blind device
    /// there is no sync session: the member opens a blind session instead.
    fn start_session_if_opener(&mut self, peer: PeerId) {
        match &self.blind {
            BlindRole::Blind(_) => return,
            BlindRole::Member(ctx) if self.trust.is_blind(&peer) => {
                if self
                    .blind_session_of
                    .get(&peer)
                    .is_none_or(|h| h.is_finished())
                {
                    let control = self.swarm.behaviour().stream.new_control();
                    let task =
                        open_blind_sessions(peer, control, (**ctx).clone(), self.ctx.peers.clone());
                    let handle = self.sessions.spawn(task);
                    self.blind_session_of.insert(peer, handle);
                }
                return;
            }
            BlindRole::Member(_) => {}
        }
        let opener = *self.swarm.local_peer_id() < peer;
        if opener && self.session_of.get(&peer).is_none_or(|h| h.is_finished()) {
            let control = self.swarm.behaviour().stream.new_control();
            let task = open_sessions(peer, control, self.session_ctx());
            let handle = self.sessions.spawn(task);
            self.session_of.insert(peer, handle);
        }
    }

    fn on_inbound_stream(&mut self, peer: PeerId, stream: libp2p::Stream) {
        let blind = matches!(self.blind, BlindRole::Blind(_));
        if self.trust.is_trusted(&peer) && (blind || self.trust.is_blind(&peer)) {
            let message = if blind {
                "this device is a blind store: it holds only ciphertext and syncs no documents"
            } else {
                "you were paired as a blind device: documents go to you sealed, over /devicelink/blind"
            };
            let refusal = Refusal {
                code: RefuseCode::ProtocolViolation,
                message: message.into(),
            };
            self.sessions.spawn(refuse(stream, refusal));
            return;
        }
        if !self.trust.is_trusted(&peer) {
            tracing::warn!(%peer, "refused a sync stream from a device that is not trusted");
            let refusal = if self.trust.is_revoked(&peer) {
                Refusal::removed(self.swarm.local_peer_id())
            } else {
                Refusal::not_trusted(&peer)
            };
            self.sessions.spawn(refuse(stream, refusal));
            // The connection itself is dropped after the untrusted grace period.
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
            let trusted = self.trust.is_trusted(&peer);
            if trusted && self.trust.is_blind(&peer) {
                // Learned to be blind while a sync session ran: it gets no document from now.
                if let Some(handle) = self.session_of.remove(&peer) {
                    tracing::info!(%peer, "a blind device: ending its sync session");
                    handle.abort();
                }
            }
            if trusted && self.session_of.get(&peer).is_none_or(|h| h.is_finished()) {
                // Newly trusted while connected (just paired): start syncing.
                self.start_session_if_opener(peer);
            }
            let was_syncing = self.session_of.get(&peer).is_some_and(|h| !h.is_finished())
                || self
                    .blind_session_of
                    .get(&peer)
                    .is_some_and(|h| !h.is_finished());
            if !trusted && (self.trust.is_revoked(&peer) || was_syncing) {
                tracing::info!(%peer, "no longer trusted; disconnecting");
                if let Some(handle) = self.session_of.remove(&peer) {
                    handle.abort();
                }
                if let Some(handle) = self.blind_session_of.remove(&peer) {
                    handle.abort();
                }
                let _ = self.swarm.disconnect_peer_id(peer);
            }
        }
        self.backoffs.clear();
        self.maintain_connections();
    }

    /// Whether the loop has work due within a tick or two: a code open, strangers connected, a
    /// linked device or `--peer` address not connected (redial, or a pause that ends), a sync
    /// session to reopen, a reservation or hole punch to retry, or the agent just started.
    fn pending(&self) -> bool {
        let local = *self.swarm.local_peer_id();
        self.started.elapsed() < SETTLING
            || self.neighborhood.pairing_window()
            || !self.untrusted.is_empty()
            || self.reservations.pending(local)
            || self.reach.punches_pending()
            || self
                .static_peers
                .iter()
                .any(|s| !s.peer.is_some_and(|p| self.swarm.is_connected(&p)))
            || self.session_of.iter().any(|(peer, session)| {
                local < *peer && session.is_finished() && self.swarm.is_connected(peer)
            })
            || self.trusted().into_iter().any(|(peer, addrs)| {
                peer != local && !addrs.is_empty() && !self.swarm.is_connected(&peer)
            })
    }

    fn drop_untrusted_after_grace(&mut self) {
        if self.untrusted.is_empty() || self.neighborhood.pairing_window() {
            return;
        }
        let now = Instant::now();
        let expired: Vec<PeerId> = self
            .untrusted
            .iter()
            .filter(|(_, since)| now.duration_since(**since) > UNTRUSTED_GRACE)
            .map(|(peer, _)| *peer)
            .collect();
        for peer in expired {
            self.untrusted.remove(&peer);
            if !self.trust.is_trusted(&peer) {
                tracing::debug!(%peer, "dropping an untrusted connection");
                let _ = self.swarm.disconnect_peer_id(peer);
            }
        }
    }

    fn session_ctx(&self) -> SessionRunner {
        SessionRunner {
            ctx: self.ctx.clone(),
            trust: self.trust.clone(),
            listen_addrs: self.listen_addrs.clone(),
            device_name: self.device_name.clone(),
            commands: self.commands.clone(),
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
    commands: mpsc::UnboundedSender<NetCommand>,
}

impl SessionRunner {
    async fn run(&self, peer: PeerId, stream: libp2p::Stream) -> Result<(), SessionError> {
        let mut listen_addrs: Vec<String> = self
            .listen_addrs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|a| a.to_string())
            .collect();
        listen_addrs.push(crate::sync::Features::ALL.entry());
        let hello = Hello {
            version: PROTOCOL_VERSION,
            device_name: self.device_name.clone(),
            listen_addrs,
        };
        let trust = self.trust.clone();
        let result = session::run(peer, stream, &self.ctx, hello, |theirs| {
            if let Err(e) = trust.set_addrs(&peer, theirs.addrs()) {
                tracing::warn!(%peer, "cannot remember the peer's addresses: {e}");
            }
        })
        .await;
        match &result {
            Err(SessionError::RefusedByPeer {
                code: RefuseCode::NotTrusted,
                message,
            }) => {
                let message = message.clone();
                let _ = self.commands.send(NetCommand::RefusedBy { peer, message });
            }
            Err(SessionError::Closed) | Ok(()) => {}
            Err(e) => self.ctx.peers.set_error(peer, e.to_string()),
        }
        result
    }
}

/// A member's side with a blind device: opens the blind session and reopens it while the
/// blind device stays connected and trusted.
async fn open_blind_sessions(
    peer: PeerId,
    mut control: crate::net::streams::Control,
    ctx: crate::blind::member::MemberCtx,
    peers: Arc<PeerTable>,
) {
    let mut delay = Duration::from_millis(200);
    loop {
        if !peers.is_connected(&peer) || !ctx.trust.is_trusted(&peer) {
            return;
        }
        let result = match control
            .open_stream(peer, crate::blind::protocol::BLIND_PROTOCOL)
            .await
        {
            Ok(stream) => crate::blind::member::run(&ctx, peer, stream).await,
            Err(e) => Err(crate::blind::protocol::BlindSessionError::Refused(
                e.to_string(),
            )),
        };
        match result {
            Ok(()) | Err(crate::blind::protocol::BlindSessionError::Closed) => {
                tracing::info!(%peer, "blind session ended")
            }
            Err(e) => {
                tracing::warn!(%peer, "blind session ended: {e}");
                peers.set_error(peer, format!("blind store: {e}"));
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// The opener side: opens the sync stream and reopens it while the peer stays connected.
async fn open_sessions(
    peer: PeerId,
    mut control: crate::net::streams::Control,
    runner: SessionRunner,
) {
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
async fn refuse(stream: libp2p::Stream, refusal: Refusal) {
    let mut transport = tokio_util::codec::Framed::new(stream.compat(), codec());
    if let Ok(frame) = Message::Refuse(refusal).encode() {
        let send = async {
            transport.send(frame).await?;
            SinkExt::<bytes::Bytes>::close(&mut transport).await
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), send).await;
    }
}

/// Stores a freshly paired device as trusted (clearing any earlier revocation).
pub(crate) fn save_paired(
    trust: &TrustStore,
    peer: PeerId,
    paired: &pairing::Paired,
) -> Result<(), String> {
    trust.unrevoke(&peer).map_err(|e| e.to_string())?;
    if crate::blind::is_marked_blind(&paired.listen_addrs) {
        trust.set_blind(&peer).map_err(|e| e.to_string())?;
    }
    let mut device = TrustedDevice::new(paired.name.clone());
    device.addrs = crate::blind::unmarked(&paired.listen_addrs);
    trust.add(peer, device).map_err(|e| e.to_string())
}

/// Adds both devices of a pairing to the replicated device group.
pub(crate) async fn record_in_group(
    registry: &Arc<crate::docs::DocRegistry>,
    me: &LocalDevice,
    peer: PeerId,
    paired: &pairing::Paired,
) {
    let doc = match registry.handle(crate::group::GROUP_DOC) {
        Ok(doc) => doc,
        Err(e) => {
            tracing::error!("cannot open the device group: {e}");
            return;
        }
    };
    if crate::blind::is_marked_blind(&me.listen_addrs) {
        return; // a blind device keeps no group document: its members tell it who they are
    }
    let peer_is_blind = crate::blind::is_marked_blind(&paired.listen_addrs);
    let peer_addrs = crate::blind::unmarked(&paired.listen_addrs);
    let members = [
        (me.id, me.name.clone(), me.listen_addrs.clone()),
        (peer, paired.name.clone(), peer_addrs),
    ];
    // The user paired `peer` on purpose: an earlier removal from the group is lifted.
    let blind: &[PeerId] = if peer_is_blind { &[peer] } else { &[] };
    if let Err(e) = crate::group::upsert(&doc, &members, &[peer], blind).await {
        tracing::error!("cannot record the pairing in the device group: {e}");
    }
    if peer_is_blind {
        // The group key exists before the first envelope is sealed.
        let keys = registry.handle(crate::blind::keyring::KEYS_DOC);
        if let Err(e) = async { crate::blind::keyring::ensure(&keys?).await }.await {
            tracing::error!("cannot make the group key: {e}");
        }
    }
}

/// Why a relay listener closed, from libp2p's error chain (a refused reservation says so).
fn reservation_error(error: &std::io::Error) -> String {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(inner) = source {
        let text = inner.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = inner.source();
    }
    message
}
