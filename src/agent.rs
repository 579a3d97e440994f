//! The agent: wires identity, store, documents and network together and exposes them through
//! [`AgentHandle`], the API used by the CLI, the demo, the tests and the local IPC server.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot};

use crate::apps::AppRegistry;
use crate::diagnostics::Diagnostics;
pub use crate::diagnostics::{AgentStatus, DoctorReport, StoreDamageStatus};
use crate::discovery::DiscoveryConfig;
use crate::docs::{DocError, DocHandle, DocRegistry};
use crate::documents::Documents;
use crate::identity::{self, IdentityError};
use crate::net::{
    self, ConnectTarget, Neighborhood, NetCommand, NetError, Network, NetworkDeps, RedialPolicy,
};
use crate::presence::PresenceHub;
use crate::status::PeerTable;
use crate::store::writer::{self, CompactionPolicy};
use crate::store::{self as store, AppStore, DocStore, StoreError, TrustStore, TrustedDevice};
use crate::sync::session::SessionCtx;

/// How to start an agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Holds the identity key and the database.
    pub data_dir: PathBuf,
    /// libp2p listen addresses (port 0 picks a free port).
    pub listen: Vec<Multiaddr>,
    /// Addresses to dial (and redial) directly, without discovery.
    pub peers: Vec<Multiaddr>,
    /// Name shown to the other devices.
    pub device_name: String,
    pub redial: RedialPolicy,
    pub compaction: CompactionPolicy,
    /// mDNS discovery (off by default in the library; the CLI turns it on).
    pub discovery: DiscoveryConfig,
    /// Memory budget of loaded documents, in bytes: idle documents beyond it leave memory.
    pub doc_cache_bytes: usize,
    /// Whether a new identity may replace a missing or damaged one next to existing data.
    pub new_identity: identity::NewIdentity,
    /// Relays to reserve on, each ending in `/p2p/ID` (more come from the device group).
    pub relays: Vec<Multiaddr>,
    /// Serve as the relay of this device's group (an always-on device with a public address).
    pub serve_relay: bool,
    /// Addresses this device is reachable at from outside, when its interfaces do not show
    /// them (a VPS behind 1:1 NAT): announced to peers and in relay reservations.
    pub external: Vec<Multiaddr>,
    /// A blind store (`agent --serve-relay --blind`): it keeps and forwards only sealed
    /// envelopes, never a document or a key (see [`crate::blind`]). A data dir started blind
    /// stays blind.
    pub blind: bool,
}

impl AgentConfig {
    /// Defaults: listen on 127.0.0.1 with a free port, no static peers, the host name as name.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            listen: vec![loopback_any_port()],
            peers: Vec::new(),
            device_name: default_device_name(),
            redial: RedialPolicy::default(),
            compaction: CompactionPolicy::default(),
            discovery: DiscoveryConfig::default(),
            doc_cache_bytes: crate::docs::DEFAULT_CACHE_BYTES,
            new_identity: identity::NewIdentity::IfFresh,
            relays: Vec::new(),
            serve_relay: false,
            external: Vec::new(),
            blind: false,
        }
    }

    /// For a restart (an app resumed after a pause): `listen` with each free port (0) replaced
    /// by the port the stopped agent had bound, given its `listen_addrs()`, so the other
    /// devices find it where it was.
    pub fn keep_ports(&mut self, bound: &[Multiaddr]) {
        self.listen = crate::net::swarm::keep_bound_ports(&self.listen, bound);
    }
}

/// `/ip4/127.0.0.1/tcp/0`.
pub fn loopback_any_port() -> Multiaddr {
    Multiaddr::from(std::net::Ipv4Addr::LOCALHOST).with(libp2p::multiaddr::Protocol::Tcp(0))
}

/// The host name, or "devicelink" when it cannot be read.
pub fn default_device_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "devicelink".to_string())
}

/// Default data dir: `$XDG_DATA_HOME/devicelink` (or the platform's equivalent).
pub fn default_data_dir() -> Option<PathBuf> {
    directories::ProjectDirs::from("", "", "devicelink").map(|d| d.data_dir().to_path_buf())
}

/// Errors starting or talking to an agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Doc(#[from] DocError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Devices(#[from] crate::devices::DevicesError),
    #[error(transparent)]
    Diagnostics(#[from] crate::diagnostics::DiagnosticsError),
    #[error("cannot start the store writer thread: {0}")]
    Thread(std::io::Error),
    #[error("the agent has stopped")]
    Stopped,
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Config(String),
}

struct Inner {
    device_id: PeerId,
    device_name: String,
    data_dir: PathBuf,
    registry: Arc<DocRegistry>,
    presence: Arc<PresenceHub>,
    apps: Arc<AppRegistry>,
    /// `None` once shut down, so the database can be reopened while handles remain.
    trust: Arc<RwLock<Option<TrustStore>>>,
    peers: Arc<PeerTable>,
    listen_addrs: Arc<RwLock<Vec<Multiaddr>>>,
    commands: mpsc::UnboundedSender<NetCommand>,
    activities: crate::handoff::Activities,
    devices: crate::devices::Devices,
    docs: Documents,
    diagnostics: Diagnostics,
    failure: Arc<Failure>,
    manifest: Arc<store::Manifest>,
    threads: Mutex<Option<Tasks>>,
}

/// Why the agent can no longer work, once one of its long-running tasks ended unexpectedly.
#[derive(Default)]
struct Failure {
    failed: tokio_util::sync::CancellationToken,
    reason: Mutex<Option<String>>,
    stopping: std::sync::atomic::AtomicBool,
}

impl Failure {
    fn set(&self, reason: String) {
        tracing::error!("{reason}; the agent cannot go on");
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(reason);
        self.failed.cancel();
    }
}

/// Runs one of the agent's long-running tasks. A panic, or an end that is not a shutdown, is
/// recorded as the agent's failure (see [`AgentHandle::failed`]) instead of leaving the agent
/// half alive: answering locally while its network is gone.
async fn supervised(
    name: &'static str,
    task: impl std::future::Future<Output = ()>,
    failure: Arc<Failure>,
) {
    use futures::FutureExt as _;
    let ended = std::panic::AssertUnwindSafe(task).catch_unwind().await;
    if failure.stopping.load(std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    match ended {
        Ok(()) => failure.set(format!("the {name} task stopped")),
        Err(panic) => failure.set(format!(
            "the {name} task panicked: {}",
            crate::panic_message(&*panic)
        )),
    }
}

/// What `shutdown` stops and waits for.
struct Tasks {
    net: tokio::task::JoinHandle<()>,
    group: tokio::task::JoinHandle<()>,
    writer: std::thread::JoinHandle<()>,
}

/// A running agent. Cheap to clone; [`AgentHandle::shutdown`] stops it.
#[derive(Clone)]
pub struct AgentHandle {
    inner: Arc<Inner>,
}

/// Entry point: `Agent::start(config)`.
pub struct Agent;

impl Agent {
    /// Opens the data dir (creating identity and database on first start), starts listening and
    /// dialing, and returns once the listen addresses are known. Must run inside a tokio runtime.
    pub async fn start(config: AgentConfig) -> Result<AgentHandle, AgentError> {
        let relays = config
            .relays
            .iter()
            .map(|addr| net::relay::parse_relay_addr(addr).map_err(AgentError::Config))
            .collect::<Result<Vec<_>, _>>()?;
        let had_identity = config.data_dir.join("identity.key").exists();
        let keypair = identity::load(&config.data_dir, config.new_identity)?;
        let device_id = keypair.public().to_peer_id();
        // A damaged database is a clear error or a named report, never a panic or a silent
        // rollback (see `store::manifest`).
        let dir = &config.data_dir;
        let (db, doc_store, trust, damage) = store::guard_damaged(dir, || {
            let db = store::open_db(dir)?;
            let doc_store = DocStore::open(&db)?;
            let trust = TrustStore::open(&db)?;
            let damage = store::manifest::check(dir, &doc_store, &trust, had_identity)?;
            Ok((db, doc_store, trust, damage))
        })?;
        if let Some(damage) = &damage {
            tracing::error!(
                missing = ?damage.missing,
                rolled_back = ?damage.rolled_back,
                "{}",
                damage.summary
            );
        }
        let blind_store = check_blind_role(&db, &doc_store, config.blind)?;
        let member_state = crate::blind::MemberState::open(&db)?;
        let manifest = Arc::new(store::Manifest::from_store(dir, &doc_store, &trust)?);
        manifest.save(&doc_store, &trust)?;
        doc_store.attach_manifest(manifest.clone());
        let (writer, writer_thread) =
            writer::spawn(doc_store.clone(), config.compaction).map_err(AgentError::Thread)?;
        let (conflicts_tx, conflicts_rx) = mpsc::unbounded_channel();
        // Documents load when an app or a peer first needs them, not here.
        let registry = Arc::new(DocRegistry::new(
            doc_store,
            writer,
            device_id.to_string(),
            conflicts_tx,
            config.doc_cache_bytes,
        ));
        if let Err(e) = registry.load_tombstones() {
            tracing::error!("cannot read the deleted documents: {e}");
        }
        let peers = Arc::new(PeerTable::default());
        let listen_addrs = Arc::new(RwLock::new(Vec::new()));
        let presence = Arc::new(PresenceHub::default());
        tokio::spawn(PresenceHub::expire_forever(Arc::downgrade(&presence)));
        let apps = Arc::new(AppRegistry::load(AppStore::open(&db)?)?);
        let ctx = Arc::new(SessionCtx {
            registry: registry.clone(),
            peers: peers.clone(),
            presence: presence.clone(),
        });
        let linked = {
            let trust = trust.clone();
            Arc::new(move |peer: &PeerId| trust.is_trusted(peer)) as net::established::Linked
        };
        let relay_lookups = net::relay::RelayLookups::default();
        let (commands, command_rx) = mpsc::unbounded_channel();
        let blind_view = match &blind_store {
            Some(store) => crate::diagnostics::BlindView::Blind(store.clone()),
            None => crate::diagnostics::BlindView::Member(member_state.clone()),
        };
        let blind_role = match blind_store {
            Some(store) => net::BlindRole::Blind(store),
            None => net::BlindRole::Member(Box::new(crate::blind::member::MemberCtx {
                registry: registry.clone(),
                keypair: keypair.clone(),
                trust: trust.clone(),
                state: member_state.clone(),
                stop_untrusted: {
                    let commands = commands.clone();
                    Arc::new(move || {
                        let (done, stopped) = oneshot::channel();
                        let _ = commands.send(NetCommand::TrustChangedThen(done));
                        stopped
                    })
                },
            })),
        };
        let swarm = net::build_swarm_with(
            keypair,
            net::SwarmOptions {
                linked: Some(linked),
                serve_relay: config.serve_relay,
                lookups: relay_lookups.clone(),
            },
        )?;
        let control = swarm.behaviour().stream.new_control();
        let neighborhood = Arc::new(Neighborhood::default());
        let mut network = Network::new(
            swarm,
            NetworkDeps {
                ctx,
                trust: trust.clone(),
                peers: peers.clone(),
                listen_addrs: listen_addrs.clone(),
                device_name: config.device_name.clone(),
                redial: config.redial,
                static_peers: config.peers.clone(),
                neighborhood: neighborhood.clone(),
                discovery: config.discovery.clone(),
                commands: commands.clone(),
                relays,
                serve_relay: config.serve_relay,
                relay_lookups,
                external: config.external.clone(),
                blind: blind_role,
            },
        );
        if let Err(e) = network.listen(&config.listen).await {
            drop(network);
            let _ = registry.writer().shutdown().await;
            return Err(e.into());
        }
        let failure = Arc::new(Failure::default());
        let net_task = tokio::spawn(supervised(
            "network",
            network.run(command_rx),
            failure.clone(),
        ));
        let (trust_for_manifest, manifest_for_task) = (trust.clone(), manifest.clone());
        let group_task = tokio::spawn(supervised(
            "device group",
            {
                let registry = registry.clone();
                let (trust, commands) = (trust.clone(), commands.clone());
                async move {
                    tokio::join!(
                        reconcile_group(registry.clone(), trust, device_id, commands),
                        record_conflicts(registry.clone(), conflicts_rx),
                        crate::lifecycle::keep_tombstones(registry.clone()),
                        prune_activities(registry.clone()),
                        save_manifest(registry, trust_for_manifest, manifest_for_task),
                    );
                }
            },
            failure.clone(),
        ));
        tracing::info!(device = %device_id, "agent started");
        let control = Arc::new(tokio::sync::Mutex::new(control));
        let trust = Arc::new(RwLock::new(Some(trust)));
        let activities = crate::handoff::Activities::new(
            registry.clone(),
            device_id,
            claim_stream_opener(commands.clone(), control.clone(), trust.clone()),
            neighborhood.continued.clone(),
        );
        let devices = crate::devices::Devices {
            me: device_id,
            name: config.device_name.clone(),
            listen_addrs: listen_addrs.clone(),
            registry: registry.clone(),
            trust: trust.clone(),
            commands: commands.clone(),
            control: control.clone(),
            neighborhood: neighborhood.clone(),
            blind: config.blind,
        };
        let docs = Documents::new(registry.clone());
        let diagnostics = Diagnostics {
            devices: devices.clone(),
            peers: peers.clone(),
            presence: presence.clone(),
            apps: apps.clone(),
            damage,
            endpoint: Arc::default(),
            blind: Arc::new(RwLock::new(Some(blind_view))),
        };
        Ok(AgentHandle {
            inner: Arc::new(Inner {
                docs,
                device_id,
                device_name: config.device_name,
                data_dir: config.data_dir,
                registry,
                presence,
                apps,
                trust,
                peers,
                listen_addrs,
                commands,
                activities,
                devices,
                failure,
                manifest,
                diagnostics,
                threads: Mutex::new(Some(Tasks {
                    net: net_task,
                    group: group_task,
                    writer: writer_thread,
                })),
            }),
        })
    }
}

impl AgentHandle {
    /// This device's id (its libp2p PeerId).
    pub fn device_id(&self) -> PeerId {
        self.inner.device_id
    }

    pub fn device_name(&self) -> &str {
        &self.inner.device_name
    }

    pub fn data_dir(&self) -> &Path {
        &self.inner.data_dir
    }

    /// The addresses the agent listens on.
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.inner
            .listen_addrs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Documents: open, check, list, delete, flush (see [`Documents`]).
    pub fn docs(&self) -> &Documents {
        &self.inner.docs
    }

    /// Shorthand for `docs().open(name)`.
    pub fn open_doc(&self, name: &str) -> Result<DocHandle, AgentError> {
        Ok(self.inner.docs.open(name)?)
    }

    /// Shorthand for `docs().exists(name)`.
    pub fn doc_exists(&self, name: &str) -> Result<bool, AgentError> {
        Ok(self.inner.docs.exists(name)?)
    }

    /// Shorthand for `docs().list()`.
    pub fn list_docs(&self) -> Result<Vec<String>, AgentError> {
        Ok(self.inner.docs.list()?)
    }

    /// Shorthand for `docs().delete(name)`.
    pub async fn delete_doc(&self, name: &str) -> Result<bool, AgentError> {
        Ok(self.inner.docs.delete(name).await?)
    }

    /// Shorthand for `devices().trust_add(device, name)`.
    pub fn trust_add(&self, device: PeerId, name: &str) -> Result<(), AgentError> {
        Ok(self.inner.devices.trust_add(device, name)?)
    }

    /// Shorthand for `devices().trust_remove(device)`.
    pub fn trust_remove(&self, device: &PeerId) -> Result<bool, AgentError> {
        Ok(self.inner.devices.trust_remove(device)?)
    }

    /// Shorthand for `devices().trusted()`.
    pub fn trusted(&self) -> Result<Vec<(PeerId, TrustedDevice)>, AgentError> {
        Ok(self.inner.devices.trusted()?)
    }

    /// Shorthand for `devices().dial(addr)`.
    pub fn dial(&self, addr: Multiaddr) -> Result<(), AgentError> {
        Ok(self.inner.devices.dial(addr)?)
    }

    fn trust(&self) -> Result<TrustStore, AgentError> {
        self.inner
            .trust
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(AgentError::Stopped)
    }

    /// Resolves if the agent can no longer work (one of its tasks panicked or stopped), with the
    /// reason. The binary exits with an error then, rather than staying half alive.
    pub async fn failed(&self) -> String {
        self.inner.failure.failed.cancelled().await;
        self.inner
            .failure
            .reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_default()
    }

    /// Devices, connections, and per-peer sync progress (see [`crate::diagnostics`]).
    pub fn status(&self) -> Result<AgentStatus, AgentError> {
        Ok(self.inner.diagnostics.status()?)
    }

    /// Discovery and connectivity diagnosis: multicast per interface, how each peer was found,
    /// whether it is connected, how far behind it is per document.
    pub async fn doctor(&self) -> Result<DoctorReport, AgentError> {
        Ok(self.inner.diagnostics.doctor().await?)
    }

    /// Where the y-websocket endpoint listens, once [`crate::bridge::serve`] started it.
    pub fn ws_endpoint(&self) -> Option<std::net::SocketAddr> {
        self.inner.diagnostics.endpoint().addr()
    }

    /// Why there is no y-websocket endpoint (shown by `status` and `doctor`).
    pub fn set_ws_note(&self, note: Option<String>) {
        self.inner.diagnostics.endpoint().set_note(note);
    }

    pub(crate) fn set_ws_endpoint(&self, addr: Option<std::net::SocketAddr>) {
        self.inner.diagnostics.endpoint().set_addr(addr);
    }

    /// Presence (Yjs awareness) of every document: local apps' and other devices'.
    pub fn presence(&self) -> &Arc<PresenceHub> {
        &self.inner.presence
    }

    /// The apps allowed to use the y-websocket endpoint, and their tokens.
    pub fn apps(&self) -> &AppRegistry {
        &self.inner.apps
    }

    /// Linking devices: pairing by code (here, on the LAN or through a relay) and unpairing.
    pub fn devices(&self) -> crate::devices::Devices {
        self.inner.devices.clone()
    }

    /// Shorthand for `devices().mdns_error()`.
    pub fn mdns_error(&self) -> Option<String> {
        self.inner.devices.mdns_error()
    }

    /// Whether a sync session with `peer` is running.
    pub fn is_syncing_with(&self, peer: &PeerId) -> bool {
        self.inner.peers.has_session(peer)
    }

    /// Shorthand for `docs().flush()`.
    pub async fn flush(&self) -> Result<(), AgentError> {
        Ok(self.inner.docs.flush().await?)
    }

    /// Stops networking, flushes every pending write, and closes the database (it can be reopened
    /// at once, even while handles to this agent remain; they then fail with `Stopped`). Idempotent.
    pub async fn shutdown(&self) -> Result<(), AgentError> {
        let threads = self
            .inner
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(tasks) = threads else {
            return Ok(());
        };
        self.inner
            .failure
            .stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        tasks.group.abort();
        let _ = tasks.group.await;
        let (done, done_rx) = oneshot::channel();
        if self.inner.commands.send(NetCommand::Shutdown(done)).is_ok() {
            let _ = done_rx.await;
        }
        let _ = tasks.net.await;
        let flushed = self.inner.registry.writer().shutdown().await;
        let writer = tasks.writer;
        let _ = tokio::task::spawn_blocking(move || writer.join()).await;
        if let (Ok(store), Ok(trust)) = (self.inner.registry.store(), self.trust()) {
            if let Err(e) = self.inner.manifest.save(&store, &trust) {
                tracing::warn!("{e}");
            }
        }
        self.inner.registry.close();
        self.inner
            .trust
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        self.inner.apps.close();
        self.inner
            .diagnostics
            .blind
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        tracing::info!(device = %self.inner.device_id, "agent stopped");
        Ok(flushed?)
    }
}

/// A data dir's role with blind devices, fixed at its first start: returns the blind store of a
/// blind device. A blind data dir refuses to start as a full member (it would join nothing and
/// look broken), and a data dir that holds documents cannot become blind.
fn check_blind_role(
    db: &sled::Db,
    docs: &DocStore,
    blind: bool,
) -> Result<Option<crate::blind::BlindStore>, AgentError> {
    let meta = db.open_tree("blind_meta").map_err(StoreError::from)?;
    let was_blind = meta.contains_key("role").map_err(StoreError::from)?;
    match (was_blind, blind) {
        (true, false) => Err(AgentError::Config(
            "this data dir belongs to a blind device: start it with `devicelink agent --serve-relay --blind`"
                .into(),
        )),
        (false, true) if docs.count() > 0 => Err(AgentError::Config(format!(
            "this data dir holds {} documents: a blind device must start from an empty data dir (use another --data-dir)",
            docs.count()
        ))),
        (_, true) => {
            meta.insert("role", "blind").map_err(StoreError::from)?;
            meta.flush().map_err(StoreError::from)?;
            Ok(Some(crate::blind::BlindStore::open(db)?))
        }
        (false, false) => Ok(None),
    }
}

/// Keeps the trust store in line with the replicated device group, now and after every change.
async fn reconcile_group(
    registry: Arc<DocRegistry>,
    trust: TrustStore,
    me: PeerId,
    commands: mpsc::UnboundedSender<NetCommand>,
) {
    let doc = match registry.handle(crate::group::GROUP_DOC) {
        Ok(doc) => doc,
        Err(e) => {
            tracing::error!("cannot open the device group: {e}");
            return;
        }
    };
    let mut changes = doc.subscribe();
    loop {
        let result = crate::group::reconcile(&doc, &trust, me);
        if result.removed_self {
            tracing::warn!("this device was removed from its device group");
        }
        if !result.trusted.is_empty() || !result.revoked.is_empty() {
            tracing::info!(trusted = ?result.trusted, revoked = ?result.revoked, "device group changed");
            if commands.send(NetCommand::TrustChanged).is_err() {
                return;
            }
        }
        match changes.recv().await {
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Saves the manifest a second after documents change (one save per burst), and checks the
/// trusted devices at least every 30 s (see [`store::manifest`]); idle, it sleeps.
async fn save_manifest(
    registry: Arc<DocRegistry>,
    trust: TrustStore,
    manifest: Arc<store::Manifest>,
) {
    loop {
        manifest
            .changed_or_after(std::time::Duration::from_secs(30))
            .await;
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let Ok(store) = registry.store() else { return };
        let (manifest, trust) = (manifest.clone(), trust.clone());
        let saved = tokio::task::spawn_blocking(move || manifest.save(&store, &trust)).await;
        if let Ok(Err(e)) = saved {
            tracing::warn!("{e}");
        }
    }
}

/// Writes detected conflicts into the replicated conflicts document.
async fn record_conflicts(
    registry: Arc<DocRegistry>,
    mut detected: mpsc::UnboundedReceiver<crate::docs::Overwrite>,
) {
    while let Some(overwrite) = detected.recv().await {
        let conflict = crate::conflict::Conflict::from_overwrite(overwrite, registry.device_id());
        let doc = match registry.handle(crate::conflict::CONFLICTS_DOC) {
            Ok(doc) => doc,
            Err(e) => {
                tracing::error!("cannot open the conflicts document: {e}");
                continue;
            }
        };
        if let Err(e) = crate::conflict::record(&doc, &conflict).await {
            tracing::error!("cannot record a conflict: {e}");
        }
    }
}

impl AgentHandle {
    /// Conflict reports: list them, resolve one.
    pub fn conflicts(&self) -> crate::conflict::Conflicts {
        crate::conflict::Conflicts::new(
            self.inner.registry.clone(),
            self.inner.device_id.to_string(),
        )
    }

    /// Handoff: publish what the user is doing, list it, continue it here.
    pub fn activities(&self) -> crate::handoff::Activities {
        self.inner.activities.clone()
    }
}

/// How a handoff reaches the device holding an activity: connect (at the addresses the trust
/// store knows) within the time left, then open the handoff stream.
fn claim_stream_opener(
    commands: mpsc::UnboundedSender<NetCommand>,
    control: Arc<tokio::sync::Mutex<crate::net::streams::Control>>,
    trust: Arc<RwLock<Option<TrustStore>>>,
) -> crate::handoff::OpenClaimStream {
    Arc::new(move |holder, limit| {
        let (commands, control) = (commands.clone(), control.clone());
        let addrs = trust
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(|t| t.get(&holder).ok().flatten())
            .map(|d| d.multiaddrs())
            .unwrap_or_default();
        Box::pin(async move {
            let (reply, rx) = oneshot::channel();
            commands
                .send(NetCommand::Connect {
                    target: ConnectTarget::Peer(holder, addrs),
                    reply,
                })
                .map_err(|_| "the agent stopped".to_string())?;
            tokio::time::timeout(limit, rx)
                .await
                .map_err(|_| "no connection in time (is it online?)".to_string())?
                .map_err(|_| "the agent stopped".to_string())??;
            control
                .lock()
                .await
                .open_stream(holder, crate::handoff::HANDOFF_PROTOCOL)
                .await
                .map_err(|e| e.to_string())
        })
    })
}

/// Drops activity records that expired more than an hour ago (they are already invisible).
async fn prune_activities(registry: Arc<DocRegistry>) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
    loop {
        every.tick().await;
        let Ok(doc) = registry.handle(crate::handoff::ACTIVITIES_DOC) else {
            continue;
        };
        match crate::handoff::prune_expired(&doc, 3600.0).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!("pruned {n} expired activity records"),
            Err(e) => tracing::warn!("cannot prune expired activities: {e}"),
        }
    }
}
