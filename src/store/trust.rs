//! `TrustStore`: the devices this device syncs with. Only a device in here may open a sync stream.
//!
//! Tree `trust` maps a device id (libp2p PeerId bytes) to a postcard-encoded [`TrustedDevice`].

use std::time::{SystemTime, UNIX_EPOCH};

use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

use super::StoreError;

/// A paired device, as remembered on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustedDevice {
    pub name: String,
    /// Seconds since the Unix epoch when the device was added.
    pub added_at: u64,
    /// Last addresses the device told us it listens on (used to redial it).
    pub addrs: Vec<String>,
}

impl TrustedDevice {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            added_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            addrs: Vec::new(),
        }
    }

    /// The stored addresses that parse as multiaddrs.
    pub fn multiaddrs(&self) -> Vec<Multiaddr> {
        self.addrs.iter().filter_map(|a| a.parse().ok()).collect()
    }
}

/// The set of trusted devices, persisted in sled, plus the devices revoked by `unpair`.
#[derive(Clone)]
pub struct TrustStore {
    db: sled::Db,
    tree: sled::Tree,
    revoked: sled::Tree,
    /// Devices paired as blind (they get ciphertext only; see `crate::blind`).
    blind: sled::Tree,
}

impl TrustStore {
    pub fn open(db: &sled::Db) -> Result<Self, StoreError> {
        Ok(Self {
            db: db.clone(),
            tree: db.open_tree("trust")?,
            revoked: db.open_tree("revoked")?,
            blind: db.open_tree("blind_devices")?,
        })
    }

    pub fn is_trusted(&self, peer: &PeerId) -> bool {
        matches!(self.tree.contains_key(peer.to_bytes()), Ok(true))
    }

    pub fn get(&self, peer: &PeerId) -> Result<Option<TrustedDevice>, StoreError> {
        match self.tree.get(peer.to_bytes())? {
            Some(bytes) => Ok(Some(decode(peer, &bytes)?)),
            None => Ok(None),
        }
    }

    /// Adds (or renames) a trusted device and flushes it to disk. Known addresses are kept.
    pub fn add(&self, peer: PeerId, device: TrustedDevice) -> Result<(), StoreError> {
        let mut device = device;
        if let Some(old) = self.get(&peer)? {
            if device.addrs.is_empty() {
                device.addrs = old.addrs;
            }
        }
        self.put(&peer, &device)?;
        self.db.flush()?;
        Ok(())
    }

    /// Whether `peer` is a blind device: it is never sent a document or a key.
    pub fn is_blind(&self, peer: &PeerId) -> bool {
        matches!(self.blind.contains_key(peer.to_bytes()), Ok(true))
    }

    /// Records `peer` as blind, for good (a device is never promoted to a full member by data
    /// from the network).
    pub fn set_blind(&self, peer: &PeerId) -> Result<(), StoreError> {
        self.blind.insert(peer.to_bytes(), &[])?;
        self.db.flush()?;
        Ok(())
    }

    /// Whether `peer` was removed from the group (it is then never re-added from group data).
    pub fn is_revoked(&self, peer: &PeerId) -> bool {
        matches!(self.revoked.contains_key(peer.to_bytes()), Ok(true))
    }

    /// Removes `peer` and remembers it as revoked.
    pub fn revoke(&self, peer: &PeerId) -> Result<(), StoreError> {
        self.tree.remove(peer.to_bytes())?;
        self.revoked.insert(peer.to_bytes(), &[])?;
        self.db.flush()?;
        Ok(())
    }

    /// Forgets a revocation (the user paired the device again, explicitly).
    pub fn unrevoke(&self, peer: &PeerId) -> Result<(), StoreError> {
        self.revoked.remove(peer.to_bytes())?;
        Ok(())
    }

    /// Removes a device; returns whether it was trusted.
    pub fn remove(&self, peer: &PeerId) -> Result<bool, StoreError> {
        let existed = self.tree.remove(peer.to_bytes())?.is_some();
        self.db.flush()?;
        Ok(existed)
    }

    /// Remembers the addresses a trusted device listens on (no-op for untrusted devices). Keeps
    /// at most 16 addresses of at most 256 bytes that parse as multiaddrs.
    pub fn set_addrs(&self, peer: &PeerId, addrs: Vec<String>) -> Result<(), StoreError> {
        let addrs: Vec<String> = addrs
            .into_iter()
            .filter(|a| a.len() <= 256 && a.parse::<Multiaddr>().is_ok())
            .take(16)
            .collect();
        if let Some(mut device) = self.get(peer)? {
            if device.addrs != addrs {
                device.addrs = addrs;
                self.put(peer, &device)?;
            }
        }
        Ok(())
    }

    /// Puts `addrs` first among a trusted device's addresses (those it publishes itself), keeping
    /// the others it had after them, up to the same limits as [`Self::set_addrs`].
    pub fn add_addrs(&self, peer: &PeerId, addrs: &[String]) -> Result<(), StoreError> {
        if addrs.is_empty() {
            return Ok(());
        }
        let Some(device) = self.get(peer)? else {
            return Ok(());
        };
        let mut merged = addrs.to_vec();
        merged.extend(device.addrs.into_iter().filter(|a| !addrs.contains(a)));
        self.set_addrs(peer, merged)
    }

    /// Every trusted device, in device-id order.
    pub fn list(&self) -> Result<Vec<(PeerId, TrustedDevice)>, StoreError> {
        let mut out = Vec::new();
        for entry in self.tree.iter() {
            let (key, value) = entry?;
            let peer = PeerId::from_bytes(&key).map_err(|e| StoreError::CorruptTrust {
                key: format!("{key:?}"),
                reason: e.to_string(),
            })?;
            out.push((peer, decode(&peer, &value)?));
        }
        Ok(out)
    }

    fn put(&self, peer: &PeerId, device: &TrustedDevice) -> Result<(), StoreError> {
        let bytes = postcard::to_allocvec(device).map_err(|e| StoreError::CorruptTrust {
            key: peer.to_string(),
            reason: e.to_string(),
        })?;
        self.tree.insert(peer.to_bytes(), bytes)?;
        Ok(())
    }
}

fn decode(peer: &PeerId, bytes: &[u8]) -> Result<TrustedDevice, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::CorruptTrust {
        key: peer.to_string(),
        reason: e.to_string(),
    })
}
