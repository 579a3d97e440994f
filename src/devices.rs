//! [`Devices`]: linking this device with the user's others, as `agent.devices()`: open a
//! pairing code, join one (found over mDNS, dialed, or looked up through the relay), unpair;
//! the trust store (add, remove, list), addresses to dial, devices announced nearby.
//! The code exchange itself is `pairing`; this module drives it over the agent's network and
//! records the outcome in the trust store and the device group.

use std::sync::{Arc, RwLock};

use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot};

use crate::discovery::Announcement;
use crate::docs::{DocError, DocRegistry};
use crate::net::{self, ConnectTarget, Neighborhood, NetCommand};
use crate::pairing::{self, HostEvent, LocalDevice, PairError, Paired, PairingCode};
use crate::store::{StoreError, TrustStore, TrustedDevice};

/// How long a joiner told "busy" keeps trying (beyond the host's spacing after a failed attempt
/// and a stalled exchange).
const BUSY_PATIENCE: std::time::Duration = std::time::Duration::from_secs(12);

/// Errors of unpairing (pairing reports a [`PairError`]).
#[derive(Debug, thiserror::Error)]
pub enum DevicesError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Doc(#[from] DocError),
    #[error("{0}")]
    Refused(String),
    #[error("the agent has stopped")]
    Stopped,
}

/// The devices concern of one agent, over shared views of its parts (the agent wires it).
#[derive(Clone)]
pub struct Devices {
    pub(crate) me: PeerId,
    pub(crate) name: String,
    pub(crate) listen_addrs: Arc<RwLock<Vec<Multiaddr>>>,
    pub(crate) registry: Arc<DocRegistry>,
    pub(crate) trust: Arc<RwLock<Option<TrustStore>>>,
    pub(crate) commands: mpsc::UnboundedSender<NetCommand>,
    pub(crate) control: Arc<tokio::sync::Mutex<crate::net::streams::Control>>,
    pub(crate) neighborhood: Arc<Neighborhood>,
    /// This device is a blind store (`agent --blind`).
    pub(crate) blind: bool,
}

impl Devices {
    fn trust(&self) -> Result<TrustStore, DevicesError> {
        self.trust
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(DevicesError::Stopped)
    }

    fn notify(&self, command: NetCommand) -> Result<(), DevicesError> {
        self.commands
            .send(command)
            .map_err(|_| DevicesError::Stopped)
    }

    /// Adds a device to the trust store (lifting an earlier removal: the user asked for it);
    /// the agent starts syncing with it when connected.
    pub fn trust_add(&self, device: PeerId, name: &str) -> Result<(), DevicesError> {
        let trust = self.trust()?;
        trust.unrevoke(&device)?;
        trust.add(device, TrustedDevice::new(name))?;
        self.notify(NetCommand::TrustChanged)
    }

    /// Removes a device from this device's trust store and disconnects it (this device only: a
    /// member of the device group is trusted again from the group; see [`Self::forget`]).
    pub fn trust_remove(&self, device: &PeerId) -> Result<bool, DevicesError> {
        let existed = self.trust()?.remove(device)?;
        self.notify(NetCommand::TrustChanged)?;
        Ok(existed)
    }

    /// What `devicelink trust remove` does: a member of the device group is unpaired (on every
    /// device; the group would otherwise trust it again), any other device is removed here.
    /// Returns whether it was trusted or a member.
    pub async fn forget(&self, device: &PeerId) -> Result<bool, DevicesError> {
        let group = self.registry.handle(crate::group::GROUP_DOC)?;
        let member = crate::group::members(&group)
            .iter()
            .any(|m| m.id == *device && !m.removed);
        if member {
            return self.unpair(device).await;
        }
        self.trust_remove(device)
    }

    /// The trusted devices.
    pub fn trusted(&self) -> Result<Vec<(PeerId, TrustedDevice)>, DevicesError> {
        Ok(self.trust()?.list()?)
    }

    /// Dials `addr` now and keeps redialing it when it drops.
    pub fn dial(&self, addr: Multiaddr) -> Result<(), DevicesError> {
        self.notify(NetCommand::Dial(addr))
    }

    /// Agents announced over mDNS (claimed ids, not yet verified).
    pub fn nearby(&self) -> Vec<Announcement> {
        self.neighborhood.nearby()
    }

    /// Why mDNS is not running, if it is not.
    pub fn mdns_error(&self) -> Option<String> {
        self.neighborhood
            .mdns_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The addresses the agent listens on.
    pub(crate) fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.listen_addrs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Opens a pairing code for `expiry` (advertised over mDNS while open). The receiver reports
    /// failed attempts and the outcome.
    pub async fn pair_open(
        &self,
        expiry: std::time::Duration,
    ) -> Result<(PairingCode, tokio::sync::broadcast::Receiver<HostEvent>), DevicesError> {
        let (reply, rx) = oneshot::channel();
        self.notify(NetCommand::PairOpen { expiry, reply })?;
        rx.await.map_err(|_| DevicesError::Stopped)
    }

    /// Pairs with the device that opened `code` on another network, through `relay`: the
    /// relay's address (ending in `/p2p/ID`; the relay says which of its devices has the code's
    /// slot open, see [`net::lookup`]) or the host's relayed address.
    pub async fn pair_join_through_relay(
        &self,
        code: &PairingCode,
        relay: Multiaddr,
    ) -> Result<Paired, PairError> {
        let joins = &self.neighborhood.joins;
        joins.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let found = match net::relay::relay_of(&relay) {
            // The host's relayed address: ask the relay with the code all the same (the relay
            // opens circuits to those that did, beside the few it opens for anyone), and dial
            // the address as given if the relay cannot say.
            Some(relay_addr) => Ok(self
                .find_pairing_host(code, &relay_addr)
                .await
                .unwrap_or(relay)),
            None => self.find_pairing_host(code, &relay).await,
        };
        joins.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        let host = found?;
        self.pair_join(code, Some(host)).await
    }

    /// Asks the relay at `relay` which device has `code`'s slot open (for up to 10 s: the host
    /// lists it in the device group within a second of opening it); returns its relayed address.
    async fn find_pairing_host(
        &self,
        code: &PairingCode,
        relay: &Multiaddr,
    ) -> Result<Multiaddr, PairError> {
        use libp2p::multiaddr::Protocol;
        let (relay_id, _) = net::relay::parse_relay_addr(relay).map_err(PairError::Unreachable)?;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let (reply, rx) = oneshot::channel();
            self.notify(NetCommand::Connect {
                target: ConnectTarget::Addr(relay.clone()),
                reply,
            })
            .map_err(|e| PairError::Unreachable(e.to_string()))?;
            rx.await
                .map_err(|_| PairError::Unreachable("the agent stopped".into()))?
                .map_err(|e| PairError::Unreachable(format!("the relay: {e}")))?;
            let stream = self
                .control
                .lock()
                .await
                .open_stream(relay_id, net::lookup::PAIR_LOOKUP_PROTOCOL)
                .await;
            let answer = match stream {
                Ok(stream) => net::lookup::ask(stream, code.slot(), &code.lookup_tag()).await,
                Err(e) => Err(e.to_string()),
            };
            match answer {
                Ok(Some(host)) => {
                    return Ok(relay
                        .clone()
                        .with(Protocol::P2pCircuit)
                        .with(Protocol::P2p(host)))
                }
                Ok(None) => {}
                Err(e) => tracing::debug!("pairing lookup on the relay failed: {e}"),
            }
            if tokio::time::Instant::now() > deadline {
                return Err(PairError::NotOnRelay(code.slot()));
            }
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
    }

    /// Pairs with the device that opened `code`: found over mDNS by the code's slot, or dialed at
    /// `addr`. Both devices then trust each other (and the rest of each other's group).
    pub async fn pair_join(
        &self,
        code: &PairingCode,
        addr: Option<Multiaddr>,
    ) -> Result<Paired, PairError> {
        let neighborhood = &self.neighborhood;
        neighborhood
            .joins
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let result = self.pair_join_inner(code, addr).await;
        neighborhood
            .joins
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        let _ = self.notify(NetCommand::PairingEnded);
        result
    }

    async fn pair_join_inner(
        &self,
        code: &PairingCode,
        addr: Option<Multiaddr>,
    ) -> Result<Paired, PairError> {
        let target = match addr {
            Some(addr) => ConnectTarget::Addr(addr),
            None => {
                let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
                loop {
                    let found = self
                        .neighborhood
                        .nearby()
                        .into_iter()
                        .find(|a| a.pair_slot == Some(code.slot()));
                    if let Some(a) = found {
                        break ConnectTarget::Peer(a.claimed_id, a.addrs);
                    }
                    if tokio::time::Instant::now() > deadline {
                        return Err(PairError::NotFound(code.slot()));
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        };
        // The host turns attempts away as "busy" while another runs and for a few seconds after
        // a failed one (pairing::ATTEMPT_SPACING): wait that out, as a person retyping would.
        let busy_until = tokio::time::Instant::now() + BUSY_PATIENCE;
        loop {
            match self.attempt_pairing(code, &target).await {
                Err(PairError::Busy) if tokio::time::Instant::now() < busy_until => {
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
                outcome => return outcome,
            }
        }
    }

    /// One pairing attempt with the device at `target`.
    async fn attempt_pairing(
        &self,
        code: &PairingCode,
        target: &ConnectTarget,
    ) -> Result<Paired, PairError> {
        // A connection to the same device that is just closing can fail the first stream: retry.
        let mut attempt = 0;
        let (peer, stream) = loop {
            attempt += 1;
            let (reply, rx) = oneshot::channel();
            self.notify(NetCommand::Connect {
                target: target.clone(),
                reply,
            })
            .map_err(|e| PairError::Unreachable(e.to_string()))?;
            let peer = rx
                .await
                .map_err(|_| PairError::Unreachable("the agent stopped".into()))?
                .map_err(PairError::Unreachable)?;
            if peer == self.me {
                return Err(PairError::Unreachable("that address is this device".into()));
            }
            let opened = self
                .control
                .lock()
                .await
                .open_stream(peer, pairing::PAIR_PROTOCOL)
                .await;
            match opened {
                Ok(stream) => break (peer, stream),
                Err(e) if attempt >= 3 => return Err(PairError::Unreachable(e.to_string())),
                Err(e) => {
                    tracing::debug!(%peer, "pairing stream failed ({e}); retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(100 * attempt)).await;
                }
            }
        };
        let me = LocalDevice {
            id: self.me,
            name: self.name.clone(),
            listen_addrs: self.pairing_addrs(),
        };
        let trust = self.trust().map_err(|e| PairError::Store(e.to_string()))?;
        let paired = pairing::join(&me, peer, stream, code, |p| {
            net::save_paired(&trust, peer, p)
        })
        .await?;
        net::record_in_group(&self.registry, &me, peer, &paired).await;
        let _ = self.notify(NetCommand::TrustChanged);
        Ok(paired)
    }

    /// Removes `device` from the group on every device: it is disconnected and refused from now
    /// on. Returns whether it was a member.
    pub async fn unpair(&self, device: &PeerId) -> Result<bool, DevicesError> {
        if *device == self.me {
            return Err(DevicesError::Refused(
                "that is this device's own id: unpair it from one of your other devices".into(),
            ));
        }
        let trust = self.trust()?;
        let name = trust.get(device)?.map(|d| d.name);
        let group = self.registry.handle(crate::group::GROUP_DOC)?;
        let known = name.is_some()
            || crate::group::members(&group)
                .iter()
                .any(|m| m.id == *device && !m.removed);
        let was_full_member = !trust.is_blind(device);
        trust.revoke(device)?;
        // Its sessions stop before anything more is written (the removal, the new key).
        let (done, stopped) = oneshot::channel();
        self.notify(NetCommand::TrustChangedThen(done))?;
        let _ = stopped.await;
        crate::group::remove(&group, *device, name.as_deref().unwrap_or("")).await?;
        // What is written from now on is sealed with a key the removed device never gets.
        let keys = self.registry.handle(crate::blind::keyring::KEYS_DOC)?;
        if was_full_member && !crate::blind::keyring::Keyring::load(&keys).is_empty() {
            let (epoch, _) = crate::blind::keyring::rotate(&keys).await?;
            tracing::info!(
                epoch = epoch.number,
                "new group key after removing {device}"
            );
        }
        Ok(known)
    }

    /// The addresses this device gives in pairing (with the blind mark on a blind device).
    fn pairing_addrs(&self) -> Vec<String> {
        let addrs = self.listen_addrs().iter().map(|a| a.to_string()).collect();
        crate::blind::marked(addrs, self.blind)
    }
}
