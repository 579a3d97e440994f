//! The agent: wires identity, store, documents and network together and exposes them through
//! [`AgentHandle`], the API used by the CLI, the demo, the tests and the local IPC server.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use libp2p::{Multiaddr, PeerId};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::docs::{DocError, DocHandle, DocRegistry};
use crate::identity::{self, IdentityError};
use crate::net::{self, NetCommand, NetError, Network, RedialPolicy};
use crate::status::{PeerStatus, PeerTable};
use crate::store::writer::{self, CompactionPolicy};
use crate::store::{self as store, DocStore, StoreError, TrustStore, TrustedDevice};
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
        }
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
    #[error("cannot start the store writer thread: {0}")]
    Thread(std::io::Error),
    #[error("the agent has stopped")]
    Stopped,
}

/// The agent's view of itself and its peers.
#[derive(Debug, Clone, Serialize)]
pub struct AgentStatus {
    pub device_id: String,
    pub device_name: String,
    pub listen_addrs: Vec<String>,
    pub docs: Vec<String>,
    pub peers: Vec<PeerStatus>,
}

struct Inner {
    device_id: PeerId,
    device_name: String,
    data_dir: PathBuf,
    registry: Arc<DocRegistry>,
    /// `None` once shut down, so the database can be reopened while handles remain.
    trust: RwLock<Option<TrustStore>>,
    peers: Arc<PeerTable>,
    listen_addrs: Arc<RwLock<Vec<Multiaddr>>>,
    commands: mpsc::UnboundedSender<NetCommand>,
    threads: Mutex<Option<(tokio::task::JoinHandle<()>, std::thread::JoinHandle<()>)>>,
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
        let keypair = identity::load_or_create(&config.data_dir)?;
        let device_id = keypair.public().to_peer_id();
        let db = store::open_db(&config.data_dir)?;
        let doc_store = DocStore::open(&db)?;
        let trust = TrustStore::open(&db)?;
        let (writer, writer_thread) =
            writer::spawn(doc_store.clone(), config.compaction).map_err(AgentError::Thread)?;
        let registry = Arc::new(DocRegistry::new(doc_store, writer));
        let peers = Arc::new(PeerTable::default());
        let listen_addrs = Arc::new(RwLock::new(Vec::new()));
        let ctx = Arc::new(SessionCtx {
            registry: registry.clone(),
            peers: peers.clone(),
        });
        let swarm = net::build_swarm(keypair)?;
        let mut network = Network::new(
            swarm,
            ctx,
            trust.clone(),
            peers.clone(),
            listen_addrs.clone(),
            config.device_name.clone(),
            config.redial,
            config.peers.clone(),
        );
        if let Err(e) = network.listen(&config.listen).await {
            drop(network);
            let _ = registry.writer().shutdown().await;
            return Err(e.into());
        }
        let (commands, command_rx) = mpsc::unbounded_channel();
        let net_task = tokio::spawn(network.run(command_rx));
        tracing::info!(device = %device_id, "agent started");
        Ok(AgentHandle {
            inner: Arc::new(Inner {
                device_id,
                device_name: config.device_name,
                data_dir: config.data_dir,
                registry,
                trust: RwLock::new(Some(trust)),
                peers,
                listen_addrs,
                commands,
                threads: Mutex::new(Some((net_task, writer_thread))),
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

    /// Opens (or creates) a document.
    pub fn open_doc(&self, name: &str) -> Result<DocHandle, AgentError> {
        let live = self.inner.registry.open(name)?;
        Ok(DocHandle::new(live, self.inner.registry.clone()))
    }

    /// Names of every document this device has.
    pub fn list_docs(&self) -> Result<Vec<String>, AgentError> {
        Ok(self.inner.registry.list()?)
    }

    /// Adds a device to the trust store; the agent starts syncing with it when connected.
    pub fn trust_add(&self, device: PeerId, name: &str) -> Result<(), AgentError> {
        self.trust()?.add(device, TrustedDevice::new(name))?;
        self.notify(NetCommand::TrustChanged)
    }

    /// Removes a device from the trust store and disconnects it.
    pub fn trust_remove(&self, device: &PeerId) -> Result<bool, AgentError> {
        let existed = self.trust()?.remove(device)?;
        self.notify(NetCommand::TrustChanged)?;
        Ok(existed)
    }

    /// The trusted devices.
    pub fn trusted(&self) -> Result<Vec<(PeerId, TrustedDevice)>, AgentError> {
        Ok(self.trust()?.list()?)
    }

    /// Dials `addr` now and keeps redialing it when it drops.
    pub fn dial(&self, addr: Multiaddr) -> Result<(), AgentError> {
        self.notify(NetCommand::Dial(addr))
    }

    fn trust(&self) -> Result<TrustStore, AgentError> {
        self.inner
            .trust
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(AgentError::Stopped)
    }

    fn notify(&self, command: NetCommand) -> Result<(), AgentError> {
        self.inner
            .commands
            .send(command)
            .map_err(|_| AgentError::Stopped)
    }

    /// Devices, connections, and per-peer sync progress.
    pub fn status(&self) -> Result<AgentStatus, AgentError> {
        let trusted: BTreeMap<PeerId, String> = self
            .trust()?
            .list()?
            .into_iter()
            .map(|(id, d)| (id, d.name))
            .collect();
        Ok(AgentStatus {
            device_id: self.inner.device_id.to_string(),
            device_name: self.inner.device_name.clone(),
            listen_addrs: self.listen_addrs().iter().map(|a| a.to_string()).collect(),
            docs: self.list_docs()?,
            peers: self.inner.peers.snapshot(&trusted, |doc| {
                self.inner.registry.open(doc).ok().map(|live| {
                    DocHandle::new(live, self.inner.registry.clone()).state_vector_decoded()
                })
            }),
        })
    }

    /// Whether a sync session with `peer` is running.
    pub fn is_syncing_with(&self, peer: &PeerId) -> bool {
        self.inner.peers.has_session(peer)
    }

    /// Makes everything written so far durable.
    pub async fn flush(&self) -> Result<(), AgentError> {
        Ok(self.inner.registry.writer().flush().await?)
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
        let Some((net_task, writer_thread)) = threads else {
            return Ok(());
        };
        let (done, done_rx) = oneshot::channel();
        if self.inner.commands.send(NetCommand::Shutdown(done)).is_ok() {
            let _ = done_rx.await;
        }
        let _ = net_task.await;
        let flushed = self.inner.registry.writer().shutdown().await;
        let _ = tokio::task::spawn_blocking(move || writer_thread.join()).await;
        self.inner.registry.close();
        self.inner
            .trust
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        tracing::info!(device = %self.inner.device_id, "agent stopped");
        Ok(flushed?)
    }
}
