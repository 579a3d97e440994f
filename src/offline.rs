//! A device's data dir while its agent is not running: the trust store and the app tokens,
//! edited in place. The CLI falls back to it when no agent answers (`trust`, `app`); the bench
//! uses it to link its agents before they start. A running agent holds the database, so this
//! fails with [`OfflineError`] then: ask the agent instead.

use std::path::Path;

use libp2p::PeerId;

use crate::apps::AppRegistry;
use crate::store::{self, AppStore, StoreError, TrustStore, TrustedDevice};

#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct OfflineError(#[from] StoreError);

/// The data dir of a device whose agent is not running.
pub struct OfflineDevice {
    db: sled::Db,
    trust: TrustStore,
}

impl OfflineDevice {
    /// Opens the database in `data_dir` (fails while an agent runs on it).
    pub fn open(data_dir: &Path) -> Result<Self, OfflineError> {
        let db = store::open_db(data_dir)?;
        let trust = TrustStore::open(&db)?;
        Ok(Self { db, trust })
    }

    /// Trusts `device` under `name` (a device removed before is admitted again).
    pub fn trust_add(&self, device: PeerId, name: &str) -> Result<(), OfflineError> {
        self.trust.unrevoke(&device)?;
        self.trust
            .add(device, TrustedDevice::new(name.to_string()))?;
        Ok(())
    }

    /// Stops trusting `device`, remembered as removed (so the device group does not bring it
    /// back at the next start). Returns whether it was trusted.
    pub fn trust_remove(&self, device: &PeerId) -> Result<bool, OfflineError> {
        if !self.trust.is_trusted(device) {
            return Ok(false);
        }
        self.trust.revoke(device)?;
        Ok(true)
    }

    /// The trusted devices: id, name, last known addresses.
    pub fn trusted(&self) -> Result<Vec<(PeerId, String, Vec<String>)>, OfflineError> {
        Ok(self
            .trust
            .list()?
            .into_iter()
            .map(|(id, d)| (id, d.name, d.addrs))
            .collect())
    }

    /// The app tokens of this device.
    pub fn apps(&self) -> Result<AppRegistry, OfflineError> {
        Ok(AppRegistry::load(AppStore::open(&self.db)?)?)
    }
}
