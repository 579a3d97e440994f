//! The embedded agent: it owns a tokio runtime and one [`devicelink::AgentHandle`] at a time,
//! and takes it through start, pause/resume (the mobile lifecycle) and shutdown. It opens the
//! local IPC socket and the y-websocket endpoint only when the config asks for them.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use devicelink::{AgentHandle, Multiaddr};
use tokio::sync::{mpsc, watch};

use crate::callbacks::{call_listeners, Delivery, QUEUED_CALLS};
use crate::error::DeviceLinkError;

/// How to start an embedded agent. Only `data_dir` is required.
#[derive(Debug, Clone, uniffi::Record)]
pub struct AgentConfig {
    /// Holds the device's identity and its database (created if missing).
    pub data_dir: String,
    /// libp2p listen addresses; empty: every interface on free ports, TCP and QUIC (what the
    /// CLI's `devicelink agent` does).
    #[uniffi(default)]
    pub listen: Vec<String>,
    /// Devices to dial directly (and redial), without discovery.
    #[uniffi(default)]
    pub peers: Vec<String>,
    /// Find the user's devices on the LAN over mDNS (and be found, for pairing by code alone).
    #[uniffi(default = true)]
    pub mdns: bool,
    /// Also serve the local IPC socket, so other apps and the CLI on this device can use it.
    #[uniffi(default)]
    pub ipc: bool,
    /// The socket's path (default: next to the data, as the CLI expects it).
    #[uniffi(default)]
    pub ipc_socket: Option<String>,
    /// Also serve the y-websocket endpoint for unmodified Yjs apps (loopback only).
    #[uniffi(default)]
    pub ws: bool,
    /// Its address (default 127.0.0.1:4455).
    #[uniffi(default)]
    pub ws_addr: Option<String>,
    /// The name the other devices show (default: the host name).
    #[uniffi(default)]
    pub name: Option<String>,
}

/// Where the agent is in its lifecycle; subscriptions follow it.
#[derive(Clone)]
pub(crate) enum Phase {
    Running(AgentHandle),
    Paused,
    Stopped,
}

/// The local endpoints the config asked for (dropping them closes them).
#[derive(Default)]
struct Endpoints {
    ipc: Option<devicelink::ipc::server::IpcServer>,
    ws: Option<devicelink::bridge::WsServer>,
}

/// What every handle of one embedded agent shares.
pub(crate) struct Shared {
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    rt: tokio::runtime::Handle,
    config: AgentConfig,
    library_config: devicelink::AgentConfig,
    device_id: String,
    pub(crate) phase: watch::Sender<Phase>,
    endpoints: Mutex<Endpoints>,
    /// Serializes start, pause, resume and shutdown.
    lifecycle: tokio::sync::Mutex<()>,
    /// The queue of the callback thread, which calls every subscription's listener (started
    /// with the first subscription, ended by shutdown).
    deliveries: Mutex<Option<mpsc::Sender<Delivery>>>,
    /// The addresses bound before a pause: `resume()` listens on the same ports.
    bound_before_pause: Mutex<Vec<Multiaddr>>,
}

impl Shared {
    /// Runs `future` on the agent's runtime and waits for it (never call from inside it).
    pub(crate) fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.rt.block_on(future)
    }

    /// Runs `future` on the agent's runtime, in the background.
    pub(crate) fn spawn(&self, future: impl Future<Output = ()> + Send + 'static) {
        self.rt.spawn(future);
    }

    /// The callback thread's queue, starting the thread on first use.
    pub(crate) fn deliveries(&self) -> Result<mpsc::Sender<Delivery>, DeviceLinkError> {
        let mut deliveries = lock(&self.deliveries);
        if let Some(sender) = deliveries.as_ref() {
            return Ok(sender.clone());
        }
        self.current()?;
        let (sender, receiver) = mpsc::channel(QUEUED_CALLS);
        std::thread::Builder::new()
            .name("devicelink-callbacks".into())
            .spawn(move || call_listeners(receiver))
            .map_err(|e| DeviceLinkError::Storage(format!("cannot start a thread: {e}")))?;
        *deliveries = Some(sender.clone());
        Ok(sender)
    }

    /// The running agent, or why there is none.
    pub(crate) fn current(&self) -> Result<AgentHandle, DeviceLinkError> {
        match &*self.phase.borrow() {
            Phase::Running(handle) => Ok(handle.clone()),
            Phase::Paused => Err(DeviceLinkError::Paused(
                "the agent is paused: call resume() first".into(),
            )),
            Phase::Stopped => Err(DeviceLinkError::Stopped(
                "the agent was shut down: start a new one".into(),
            )),
        }
    }

    /// Starts the library agent and the endpoints the config asked for.
    async fn launch(&self) -> Result<AgentHandle, DeviceLinkError> {
        let bound = std::mem::take(&mut *lock(&self.bound_before_pause));
        let mut config = self.library_config.clone();
        config.keep_ports(&bound);
        let handle = match devicelink::Agent::start(config.clone()).await {
            Ok(handle) => handle,
            // A port taken meanwhile: listen on free ports as at the first start.
            Err(e) if config.listen != self.library_config.listen => {
                tracing::info!("cannot listen where the agent was ({e}); on free ports instead");
                devicelink::Agent::start(self.library_config.clone()).await?
            }
            Err(e) => return Err(e.into()),
        };
        match self.open_endpoints(&handle).await {
            Ok(endpoints) => {
                *lock(&self.endpoints) = endpoints;
                Ok(handle)
            }
            Err(e) => {
                let _ = handle.shutdown().await;
                Err(e)
            }
        }
    }

    async fn open_endpoints(&self, handle: &AgentHandle) -> Result<Endpoints, DeviceLinkError> {
        let mut endpoints = Endpoints::default();
        if self.config.ipc {
            let path = match &self.config.ipc_socket {
                Some(path) => PathBuf::from(path),
                None => devicelink::ipc::default_socket_path(&self.library_config.data_dir),
            };
            let server = devicelink::ipc::server::serve(handle.clone(), path)
                .await
                .map_err(|e| DeviceLinkError::Network(format!("the IPC socket: {e}")))?;
            endpoints.ipc = Some(server);
        }
        if self.config.ws {
            let text = self
                .config
                .ws_addr
                .as_deref()
                .unwrap_or(devicelink::bridge::DEFAULT_ADDR);
            let addr = text.parse().map_err(|_| {
                DeviceLinkError::InvalidArgument(format!(
                    "ws_addr {text:?} is not an address like 127.0.0.1:4455"
                ))
            })?;
            let server = devicelink::bridge::serve(handle.clone(), addr)
                .await
                .map_err(|e| DeviceLinkError::Network(format!("the y-websocket endpoint: {e}")))?;
            endpoints.ws = Some(server);
        }
        Ok(endpoints)
    }

    /// Closes the endpoints and stops the library agent (everything durable is flushed).
    async fn stop(&self, next: Phase) -> Result<(), DeviceLinkError> {
        if matches!(next, Phase::Stopped) {
            // The callback thread ends once the subscriptions (which end now) have let go.
            lock(&self.deliveries).take();
        }
        let pausing = matches!(next, Phase::Paused);
        let previous = self.phase.send_replace(next);
        *lock(&self.endpoints) = Endpoints::default();
        if let Phase::Running(handle) = previous {
            if pausing {
                *lock(&self.bound_before_pause) = handle.listen_addrs();
            }
            handle.shutdown().await?;
        }
        Ok(())
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let runtime = self
            .runtime
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(runtime) = runtime {
            // Flush and close when dropped from a plain thread; never block inside a runtime.
            if tokio::runtime::Handle::try_current().is_err() {
                let _ = runtime.block_on(self.stop(Phase::Stopped));
            }
            runtime.shutdown_background();
        }
    }
}

/// The Device Linking agent, embedded in this app: it syncs this device's documents with the
/// user's other devices. Calls block until done; events arrive on subscription callbacks.
#[derive(uniffi::Object)]
pub struct Agent {
    pub(crate) shared: Arc<Shared>,
}

fn parse_addrs(field: &str, texts: &[String]) -> Result<Vec<Multiaddr>, DeviceLinkError> {
    texts
        .iter()
        .map(|text| {
            devicelink::args::parse_multiaddr(text)
                .map_err(|e| DeviceLinkError::InvalidArgument(format!("{field}: {e}")))
        })
        .collect()
}

impl AgentConfig {
    fn to_library(&self) -> Result<devicelink::AgentConfig, DeviceLinkError> {
        if self.data_dir.trim().is_empty() {
            return Err(DeviceLinkError::InvalidArgument(
                "data_dir is empty: give the folder that holds this device's data".into(),
            ));
        }
        let mut config = devicelink::AgentConfig::new(&self.data_dir);
        config.listen = if self.listen.is_empty() {
            parse_addrs(
                "listen",
                &[
                    "/ip4/0.0.0.0/tcp/0".into(),
                    "/ip4/0.0.0.0/udp/0/quic-v1".into(),
                ],
            )?
        } else {
            parse_addrs("listen", &self.listen)?
        };
        config.peers = parse_addrs("peers", &self.peers)?;
        config.discovery.enabled = self.mdns;
        if let Some(name) = self.name.as_ref().filter(|n| !n.trim().is_empty()) {
            config.device_name = name.trim().to_string();
        }
        Ok(config)
    }
}

#[uniffi::export]
impl Agent {
    /// Starts the agent: opens (or creates) the data dir, listens, and starts syncing with the
    /// devices linked before.
    #[uniffi::constructor]
    pub fn start(config: AgentConfig) -> Result<Arc<Self>, DeviceLinkError> {
        let library_config = config.to_library()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("devicelink")
            .enable_all()
            .build()
            .map_err(|e| DeviceLinkError::Storage(format!("cannot start the runtime: {e}")))?;
        let rt = runtime.handle().clone();
        let (phase, _) = watch::channel(Phase::Stopped);
        let mut shared = Shared {
            runtime: Mutex::new(Some(runtime)),
            rt,
            config,
            library_config,
            device_id: String::new(),
            phase,
            endpoints: Mutex::new(Endpoints::default()),
            lifecycle: tokio::sync::Mutex::new(()),
            deliveries: Mutex::new(None),
            bound_before_pause: Mutex::new(Vec::new()),
        };
        let handle = shared.block_on(shared.launch())?;
        shared.device_id = handle.device_id().to_string();
        shared.phase.send_replace(Phase::Running(handle));
        Ok(Arc::new(Self {
            shared: Arc::new(shared),
        }))
    }

    /// This device's id (stable across restarts: it is kept in the data dir).
    pub fn device_id(&self) -> String {
        self.shared.device_id.clone()
    }

    /// The name the other devices show.
    pub fn name(&self) -> String {
        self.shared.library_config.device_name.clone()
    }

    /// The addresses the agent listens on (empty while paused).
    pub fn listen_addrs(&self) -> Vec<String> {
        self.shared
            .current()
            .map(|h| h.listen_addrs().iter().map(|a| a.to_string()).collect())
            .unwrap_or_default()
    }

    /// The y-websocket endpoint, when the config turned it on (`ws://...`).
    pub fn ws_url(&self) -> Option<String> {
        let handle = self.shared.current().ok()?;
        handle.ws_endpoint().map(|addr| format!("ws://{addr}"))
    }

    /// Whether the agent is running (not paused, not shut down).
    pub fn is_running(&self) -> bool {
        self.shared.current().is_ok()
    }

    /// For the background (a phone app leaving the foreground): flushes every change to disk,
    /// closes connections, listeners and endpoints, and stops discovery. `resume()` listens on
    /// the same ports again (free ones if they were taken meanwhile). Documents cannot be
    /// used until `resume()`; subscriptions stay and deliver again after it.
    pub fn pause(&self) -> Result<(), DeviceLinkError> {
        let shared = &self.shared;
        shared.block_on(async {
            let _serial = shared.lifecycle.lock().await;
            match &*shared.phase.borrow() {
                Phase::Running(_) => {}
                Phase::Paused => return Ok(()),
                Phase::Stopped => return shared.current().map(|_| ()),
            }
            shared.stop(Phase::Paused).await
        })
    }

    /// Back to the foreground: listens and discovers again, reconnects to the linked devices
    /// and catches up what changed meanwhile.
    pub fn resume(&self) -> Result<(), DeviceLinkError> {
        let shared = &self.shared;
        shared.block_on(async {
            let _serial = shared.lifecycle.lock().await;
            match &*shared.phase.borrow() {
                Phase::Paused => {}
                Phase::Running(_) => return Ok(()),
                Phase::Stopped => return shared.current().map(|_| ()),
            }
            let handle = shared.launch().await?;
            shared.phase.send_replace(Phase::Running(handle));
            Ok(())
        })
    }

    /// Flushes and stops the agent; subscriptions end. Safe to call twice.
    pub fn shutdown(&self) -> Result<(), DeviceLinkError> {
        let shared = &self.shared;
        shared.block_on(async {
            let _serial = shared.lifecycle.lock().await;
            shared.stop(Phase::Stopped).await
        })
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
