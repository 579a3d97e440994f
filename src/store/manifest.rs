//! The manifest: a small file beside the database (`<data dir>/manifest.json`, outside `db/`)
//! recording what the store has acknowledged: its feed epoch and head, each document's latest
//! change number, and the trusted devices. A damaged sled file can come back rolled back (sled
//! truncates its log at the first bad checksum) or empty, and would otherwise be served as if
//! nothing happened; comparing it with the manifest at start names what was lost.
//!
//! The manifest is written from memory a second after documents change (trust changes are
//! compared at each save and at least every 30 s; nothing wakes an idle agent sooner) and at
//! shutdown, after a flush of the database, so it never claims a change the disk does not
//! hold: a crash just before a write leaves an older manifest, which only under-reports. It is written atomically (temp file,
//! fsync, rename).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{DocStore, StoreError, TrustStore, TrustedDevice};

const FILE_NAME: &str = "manifest.json";
/// Names listed per kind in a [`StoreDamage`] report (the counts cover all).
const MAX_NAMES: usize = 100;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct ManifestFile {
    version: u32,
    epoch: u64,
    head: u64,
    docs: BTreeMap<String, u64>,
    trusted: BTreeMap<String, TrustedDevice>,
}

/// The in-memory manifest, kept up to date by the store and saved by [`Manifest::save`].
pub struct Manifest {
    path: PathBuf,
    state: Mutex<ManifestFile>,
    dirty: AtomicBool,
    /// Signalled on every document change, so the saver sleeps while nothing changes.
    changes: tokio::sync::Notify,
}

/// What the start-up check found: the store holds less than it had acknowledged.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoreDamage {
    /// One line for the log, `status` and `doctor`.
    pub summary: String,
    /// Documents the store no longer has, and documents it has at an older state (at most 100
    /// names each; the counts cover all).
    pub missing: Vec<String>,
    pub missing_count: usize,
    pub rolled_back: Vec<String>,
    pub rolled_back_count: usize,
    /// Linked devices the trust store had lost, restored from the manifest.
    pub trust_restored: Vec<String>,
}

impl Manifest {
    /// The manifest of the store in `data_dir`, filled from `store` and `trust` as they are now.
    pub fn from_store(
        data_dir: &Path,
        store: &DocStore,
        trust: &TrustStore,
    ) -> Result<Self, StoreError> {
        let mut docs = BTreeMap::new();
        for (name, meta) in store.list_meta(None, usize::MAX)? {
            docs.insert(name, meta.change);
        }
        let state = ManifestFile {
            version: 1,
            epoch: store.feed_epoch(),
            head: store.feed_head()?,
            docs,
            trusted: trusted_map(trust)?,
        };
        Ok(Self {
            path: data_dir.join(FILE_NAME),
            state: Mutex::new(state),
            dirty: AtomicBool::new(true),
            changes: tokio::sync::Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ManifestFile> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A document's latest change is now `change` (not durable yet: see [`Self::save`]).
    pub(crate) fn changed(&self, name: &str, change: u64) {
        let mut state = self.lock();
        state.head = state.head.max(change);
        match state.docs.get_mut(name) {
            Some(c) => *c = change,
            None => {
                state.docs.insert(name.to_string(), change);
            }
        }
        self.dirty.store(true, Ordering::SeqCst);
        self.changes.notify_one();
    }

    /// A document was purged (deleted on purpose).
    pub(crate) fn removed(&self, name: &str) {
        self.lock().docs.remove(name);
        self.dirty.store(true, Ordering::SeqCst);
        self.changes.notify_one();
    }

    /// Returns once a document changed since the last call, or after `at_most`.
    pub async fn changed_or_after(&self, at_most: Duration) {
        let _ = tokio::time::timeout(at_most, self.changes.notified()).await;
    }

    /// Writes the manifest if anything changed: flushes `store` first, so the file never claims
    /// more than the disk holds.
    pub fn save(&self, store: &DocStore, trust: &TrustStore) -> Result<(), StoreError> {
        let trusted = trusted_map(trust)?;
        let unchanged = self.lock().trusted == trusted;
        if !self.dirty.swap(false, Ordering::SeqCst) && unchanged {
            return Ok(());
        }
        let snapshot = {
            let mut state = self.lock();
            state.trusted = trusted;
            state.clone()
        };
        let written = store.flush().and_then(|()| {
            let json = serde_json::to_vec(&snapshot).map_err(|e| StoreError::Manifest {
                path: self.path.clone(),
                reason: e.to_string(),
            })?;
            write_atomically(&self.path, &json).map_err(|e| StoreError::Manifest {
                path: self.path.clone(),
                reason: e.to_string(),
            })
        });
        if written.is_err() {
            self.dirty.store(true, Ordering::SeqCst);
        }
        written
    }
}

fn trusted_map(trust: &TrustStore) -> Result<BTreeMap<String, TrustedDevice>, StoreError> {
    Ok(trust
        .list()?
        .into_iter()
        .map(|(id, device)| (id.to_string(), device))
        .collect())
}

/// Compares the store as opened with the manifest written by the last run. Restores lost trust
/// entries (the user's linked devices, which hold the lost documents) and forgets every feed
/// checkpoint, so the next catch-up with each linked device pulls back whatever it has that this
/// device lost. `had_identity`: the data dir already had a device identity before this start.
pub fn check(
    data_dir: &Path,
    store: &DocStore,
    trust: &TrustStore,
    had_identity: bool,
) -> Result<Option<StoreDamage>, StoreError> {
    let path = data_dir.join(FILE_NAME);
    let saved: ManifestFile = match std::fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(saved) => saved,
            Err(e) => {
                tracing::warn!("{} is unreadable ({e}); it is rewritten", path.display());
                return Ok(None);
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if had_identity && store.count() == 0 && trust.list()?.is_empty() {
                // A device that has run before, with an empty store and no manifest to tell.
                tracing::warn!(
                    "the database in {} is empty although this device has run before; if it held documents, they were lost (linked devices can send them back once paired again)",
                    data_dir.join("db").display()
                );
            }
            return Ok(None);
        }
        Err(e) => {
            return Err(StoreError::Manifest {
                path,
                reason: e.to_string(),
            })
        }
    };
    let same_feed = saved.epoch == store.feed_epoch();
    let (mut missing, mut rolled_back) = (Vec::new(), Vec::new());
    for (name, change) in &saved.docs {
        match store.meta(name) {
            Ok(None) => missing.push(name.clone()),
            Ok(Some(meta)) if same_feed && meta.change < *change => rolled_back.push(name.clone()),
            Ok(Some(_)) => {}
            Err(_) => rolled_back.push(name.clone()),
        }
    }
    let head_back = same_feed && store.feed_head()? < saved.head;
    let mut trust_restored = Vec::new();
    for (id, device) in &saved.trusted {
        let Ok(peer) = id.parse::<libp2p::PeerId>() else {
            continue;
        };
        if !trust.is_trusted(&peer) && !trust.is_revoked(&peer) {
            trust.add(peer, device.clone())?;
            trust_restored.push(id.clone());
        }
    }
    if missing.is_empty() && rolled_back.is_empty() && !head_back && trust_restored.is_empty() {
        return Ok(None);
    }
    store.forget_checkpoints()?;
    let summary = format!(
        "the database in {} holds less than this device had acknowledged (it was damaged or replaced): {} document(s) missing, {} rolled back to an older state{}; asking linked devices for everything they have",
        data_dir.join("db").display(),
        missing.len(),
        rolled_back.len(),
        if trust_restored.is_empty() {
            String::new()
        } else {
            format!(
                ", {} linked device(s) restored to the trust store",
                trust_restored.len()
            )
        }
    );
    let (missing_count, rolled_back_count) = (missing.len(), rolled_back.len());
    missing.truncate(MAX_NAMES);
    rolled_back.truncate(MAX_NAMES);
    Ok(Some(StoreDamage {
        summary,
        missing,
        missing_count,
        rolled_back,
        rolled_back_count,
        trust_restored,
    }))
}

/// Writes `bytes` to `path` so that it is either the old or the new content after a crash.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let temp = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
