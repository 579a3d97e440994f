//! Durable local state on sled.
//!
//! One sled database per data dir holds:
//! - the document logs and snapshots ([`DocStore`]),
//! - the trust store of paired devices ([`TrustStore`]),
//! - the apps allowed to use the y-websocket endpoint ([`AppStore`]).
//!
//! [`writer`] owns the single write path for document updates: it batches appends and
//! makes them durable with one flush per batch (group commit) before acknowledging them.

mod apps;
mod docs;
pub mod manifest;
mod record;
mod trust;
pub(crate) mod writer;

use std::path::{Path, PathBuf};

pub use apps::{AppRecord, AppStore};
pub(crate) use docs::now_ms;
pub use docs::{DocMeta, DocStore, LocalWrite, LocalWrites, StoredDoc};
pub use manifest::{Manifest, StoreDamage};
pub use trust::{TrustStore, TrustedDevice};

/// Errors of the local store.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("the data dir {0} is in use by another devicelink agent (stop it, or use another --data-dir)")]
    Locked(PathBuf),
    #[error("cannot open the database in {path}: {source}")]
    Open { path: PathBuf, source: sled::Error },
    #[error("database error: {0}")]
    Db(#[from] sled::Error),
    #[error("document {doc:?}: stored {record} is corrupt: {reason} (the record is kept on disk untouched)")]
    Corrupt {
        doc: String,
        record: String,
        reason: String,
    },
    #[error("trust store entry {key} is corrupt: {reason}")]
    CorruptTrust { key: String, reason: String },
    #[error("app record {name:?} cannot be encoded: {reason}")]
    CorruptApp { name: String, reason: String },
    #[error("invalid document name {name:?}: {reason}")]
    InvalidDocName { name: String, reason: &'static str },
    #[error("the agent's store is closed")]
    Closed,
    #[error("cannot write the manifest {path}: {reason}")]
    Manifest { path: PathBuf, reason: String },
    #[error("the database in {path} is damaged ({reason}). Move that folder aside (e.g. to db.damaged) and start the agent again: it reports what is missing, restores your linked devices from manifest.json, and they send the documents back")]
    Damaged { path: PathBuf, reason: String },
    #[error("the disk did not finish a flush within {0:?}; changes since are not acknowledged (is the disk full or failing?)")]
    Stalled(std::time::Duration),
}

/// sled's page cache.
const SLED_CACHE_BYTES: u64 = 8 << 20;

/// How long opening waits for the database lock: an agent of this process that just shut down
/// may still be releasing it (a last manifest save finishing on a blocking thread).
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Opens (creating if needed) the sled database of a data dir. Another agent holding it is
/// [`StoreError::Locked`] (after a short wait for one that is just stopping).
pub fn open_db(data_dir: &Path) -> Result<sled::Db, StoreError> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match open_db_once(data_dir) {
            Err(StoreError::Locked(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            result => return result,
        }
    }
}

fn open_db_once(data_dir: &Path) -> Result<sled::Db, StoreError> {
    let path = data_dir.join("db");
    sled::Config::new()
        .path(&path)
        // sled's page cache (default 1 GiB) would otherwise grow with every document read;
        // loaded documents have their own budget (`--doc-cache-mb`).
        .cache_capacity(SLED_CACHE_BYTES)
        .mode(sled::Mode::HighThroughput)
        // The group-commit writer flushes; no background flusher, which would also keep the
        // database (and its lock) alive for a moment after shutdown.
        .flush_every_ms(None)
        .open()
        .map_err(|source| {
            let message = source.to_string();
            if message.contains("could not acquire lock") {
                StoreError::Locked(data_dir.to_path_buf())
            } else if matches!(source, sled::Error::Corruption { .. })
                || message.contains("sled version")
                || message.contains("corrupt")
            {
                StoreError::Damaged {
                    path,
                    reason: message,
                }
            } else {
                StoreError::Open { path, source }
            }
        })
}

/// Runs `open` (which reads the database), turning a panic inside sled (it panics on some
/// damaged files instead of returning an error) into [`StoreError::Damaged`].
pub fn guard_damaged<T>(
    data_dir: &Path,
    open: impl FnOnce() -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(open)).unwrap_or_else(|panic| {
        Err(StoreError::Damaged {
            path: data_dir.join("db"),
            reason: crate::panic_message(&*panic),
        })
    })
}
