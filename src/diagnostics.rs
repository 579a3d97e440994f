//! What an agent reports about itself: [`Diagnostics::status`] (its devices and connections,
//! per-peer sync progress, documents stored and loaded, the y-websocket endpoint, mDNS, the
//! store's health, reachability) and [`Diagnostics::doctor`] (the same, read for a person, plus
//! multicast per interface and the devices announced nearby). It reads every concern and
//! changes none; the agent wires it.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use libp2p::PeerId;
use serde::Serialize;

use crate::apps::AppRegistry;
use crate::devices::{Devices, DevicesError};
use crate::discovery::{Announcement, InterfaceReport};
use crate::docs::DocError;
use crate::net;
use crate::presence::PresenceHub;
use crate::status::{PeerStatus, PeerTable};
use crate::store;

/// Why a report could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DiagnosticsError {
    /// The trust store could not be read (or the agent has stopped).
    #[error(transparent)]
    Devices(#[from] DevicesError),
    #[error(transparent)]
    Doc(#[from] DocError),
}

/// A damaged store as `status` shows it: what was lost, and whether linked devices sent it back.
#[derive(Debug, Clone, Serialize)]
pub struct StoreDamageStatus {
    #[serde(flatten)]
    pub report: store::StoreDamage,
    /// Linked devices this device has caught up with since (they sent back what they have).
    pub healed_from: Vec<String>,
}

/// The agent's view of itself and its peers.
#[derive(Debug, Clone, Serialize)]
pub struct AgentStatus {
    pub device_id: String,
    pub device_name: String,
    pub listen_addrs: Vec<String>,
    /// How many documents this device stores (`doc_list` lists them).
    pub docs: usize,
    /// Documents in memory now, and their estimated bytes against the budget.
    pub docs_loaded: usize,
    pub cache_bytes: usize,
    pub cache_budget_bytes: usize,
    /// Where the y-websocket endpoint listens (`None`: not serving; `ws_note` says why).
    pub ws_endpoint: Option<String>,
    /// Why there is no y-websocket endpoint, when there is none.
    pub ws_note: Option<String>,
    /// mDNS: "advertising and browsing", or why other devices cannot find this one nearby.
    pub mdns: String,
    /// Clients present (awareness states) over all documents, local and from other devices.
    pub present: usize,
    /// Your devices, then at most [`crate::status::MAX_STRANGERS`] recently seen devices that
    /// are not (`trusted: false`).
    pub peers: Vec<PeerStatus>,
    /// How many of `peers` are not your devices.
    pub others: usize,
    /// Set when the store came up holding less than it had acknowledged (a damaged disk).
    pub store_damage: Option<StoreDamageStatus>,
    /// Whether devices on other networks can reach this one: public or behind a NAT, relay
    /// reservations and the relayed addresses they give.
    pub reach: net::reach::ReachReport,
    /// Blind devices: on a blind device what it holds for each member (never a name); on a
    /// full member which documents it has backed up on each blind device and how far.
    pub blind: BlindStatus,
}

/// The blind part of `status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BlindStatus {
    /// This device is blind.
    pub is_blind: bool,
    /// On a blind device: documents (counted by keyed hash), and per member device id its
    /// envelopes, snapshots, key grants and bytes.
    pub documents: usize,
    pub held: BTreeMap<String, crate::blind::Holding>,
    /// On a full member: per blind device, documents backed up there and how far.
    pub backups: Vec<crate::blind::BackupReport>,
}

/// What diagnostics read of the blind store (a blind device) or of the member's backups.
#[derive(Clone)]
pub(crate) enum BlindView {
    Blind(crate::blind::BlindStore),
    Member(crate::blind::MemberState),
}

/// What `devicelink doctor` reports.
#[derive(Debug, Clone, Serialize)]
pub struct DoctorReport {
    pub device_id: String,
    pub listen_addrs: Vec<String>,
    pub mdns: String,
    pub interfaces: Vec<InterfaceReport>,
    pub nearby: Vec<Announcement>,
    pub peers: Vec<PeerStatus>,
    /// The y-websocket endpoint for Yjs apps: where it listens and how many apps have tokens.
    pub yjs_apps: String,
    /// The store: fine, or what a damaged disk lost and whether it was pulled back.
    pub store: String,
    /// Reachability: public or behind a NAT (AutoNAT), relay reservations; per peer, the link
    /// kind and the last hole punch are in `peers`.
    pub reach: net::reach::ReachReport,
    /// As in `status`: what a blind device holds per member, or a member's backups.
    pub blind: BlindStatus,
}

/// Where the y-websocket endpoint listens, or why it does not (set by whoever serves it).
#[derive(Default)]
pub struct EndpointState {
    addr: RwLock<Option<std::net::SocketAddr>>,
    note: RwLock<Option<String>>,
}

impl EndpointState {
    pub fn addr(&self) -> Option<std::net::SocketAddr> {
        *self.addr.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_addr(&self, addr: Option<std::net::SocketAddr>) {
        *self.addr.write().unwrap_or_else(|e| e.into_inner()) = addr;
    }

    pub fn set_note(&self, note: Option<String>) {
        *self.note.write().unwrap_or_else(|e| e.into_inner()) = note;
    }

    fn note(&self) -> Option<String> {
        self.note.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The reports of one agent, over shared views of its parts (identity, addresses, trust,
/// documents and network state through [`Devices`]).
#[derive(Clone)]
pub struct Diagnostics {
    pub(crate) devices: Devices,
    pub(crate) peers: Arc<PeerTable>,
    pub(crate) presence: Arc<PresenceHub>,
    pub(crate) apps: Arc<AppRegistry>,
    /// What the start-up check found missing from the store, if anything.
    pub(crate) damage: Option<store::StoreDamage>,
    pub(crate) endpoint: Arc<EndpointState>,
    /// `None` once the agent has stopped (the database can then be reopened).
    pub(crate) blind: Arc<RwLock<Option<BlindView>>>,
}

impl Diagnostics {
    fn blind_status(&self) -> Result<BlindStatus, DiagnosticsError> {
        let view = self.blind.read().unwrap_or_else(|p| p.into_inner()).clone();
        Ok(match view {
            None => BlindStatus::default(),
            Some(BlindView::Blind(store)) => BlindStatus {
                is_blind: true,
                documents: store.doc_count(),
                held: store.holdings().map_err(DocError::Store)?,
                backups: Vec::new(),
            },
            Some(BlindView::Member(state)) => BlindStatus {
                backups: state.reports(&self.devices.registry),
                ..Default::default()
            },
        })
    }

    /// The y-websocket endpoint's state.
    pub fn endpoint(&self) -> &EndpointState {
        &self.endpoint
    }

    /// Devices, connections, and per-peer sync progress.
    pub fn status(&self) -> Result<AgentStatus, DiagnosticsError> {
        let devices = &self.devices;
        let trusted: BTreeMap<PeerId, String> = devices
            .trusted()?
            .into_iter()
            .map(|(id, d)| (id, d.name))
            .collect();
        // Pending work is shown for loaded documents only: status never loads documents.
        let mut peers = self.peers.snapshot(&trusted, |doc| {
            use yrs::{ReadTxn, Transact};
            devices
                .registry
                .peek(doc)
                .map(|live| live.yrs().transact().state_vector())
        });
        // Your devices first (in id order), then the strangers.
        peers.sort_by_key(|p| !p.trusted);
        let others = peers.iter().filter(|p| !p.trusted).count();
        let store_damage = self.damage.clone().map(|report| StoreDamageStatus {
            report,
            healed_from: peers
                .iter()
                .filter(|p| p.trusted && p.caught_up && p.syncing)
                .map(|p| p.device_id.clone())
                .collect(),
        });
        let endpoint = self.endpoint.addr();
        let (docs_loaded, cache_bytes) = devices.registry.cache_usage();
        Ok(AgentStatus {
            device_id: devices.me.to_string(),
            device_name: devices.name.clone(),
            listen_addrs: devices
                .listen_addrs()
                .iter()
                .map(|a| a.to_string())
                .collect(),
            docs: devices.registry.store().map_err(DocError::Store)?.count(),
            docs_loaded,
            cache_bytes,
            cache_budget_bytes: devices.registry.cache_budget(),
            ws_endpoint: endpoint.map(|a| format!("ws://{a}")),
            ws_note: match endpoint {
                Some(_) => None,
                None => Some(
                    self.endpoint
                        .note()
                        .unwrap_or_else(|| "not serving (started with --no-ws)".into()),
                ),
            },
            mdns: self.mdns(),
            present: self.presence.present(),
            peers,
            others,
            store_damage,
            reach: devices.neighborhood.reach(),
            blind: self.blind_status()?,
        })
    }

    fn mdns(&self) -> String {
        self.devices
            .mdns_error()
            .unwrap_or_else(|| "advertising and browsing".into())
    }

    /// Discovery and connectivity diagnosis: multicast per interface, how each peer was found,
    /// whether it is connected, how far behind it is per document.
    pub async fn doctor(&self) -> Result<DoctorReport, DiagnosticsError> {
        let interfaces = tokio::task::spawn_blocking(crate::discovery::probe_interfaces)
            .await
            .unwrap_or_default();
        let status = self.status()?;
        let store = match &status.store_damage {
            None => "fine (it holds everything acknowledged)".to_string(),
            Some(d) if d.healed_from.is_empty() => format!(
                "{} Missing: {:?}; rolled back: {:?}. Not yet caught up with a linked device.",
                d.report.summary, d.report.missing, d.report.rolled_back
            ),
            Some(d) => format!(
                "{} Missing: {:?}; rolled back: {:?}. Caught up since with {} linked device(s), which sent back what they have.",
                d.report.summary,
                d.report.missing,
                d.report.rolled_back,
                d.healed_from.len()
            ),
        };
        Ok(DoctorReport {
            store,
            reach: status.reach.clone(),
            blind: status.blind.clone(),
            device_id: status.device_id,
            listen_addrs: status.listen_addrs,
            mdns: self.mdns(),
            interfaces,
            nearby: self.devices.nearby(),
            peers: status.peers,
            yjs_apps: match status.ws_endpoint {
                Some(endpoint) => format!(
                    "serving {endpoint}; {} app(s) with a token; {} client(s) present",
                    self.apps.list().map(|a| a.len()).unwrap_or(0),
                    status.present
                ),
                None => status.ws_note.unwrap_or_else(|| "not serving".into()),
            },
        })
    }
}
