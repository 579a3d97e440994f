//! `DocStore`: each document as a compacted snapshot plus an append-only update log in sled.
//!
//! Layout: tree `docs` lists document names; tree `snapshots` maps a name to its snapshot record
//! (the merged state up to a log sequence number); tree `log/<name>` maps a big-endian `u64`
//! sequence number to a record of the updates one group commit wrote for it. Loading a document
//! = snapshot + every log record after it. Records are checksummed (see `record`); a bad one is
//! reported naming the document and the record, and nothing is deleted.

use std::fmt;

use super::record::{self, RecordError};
use super::StoreError;

/// Longest accepted document name, in bytes.
pub const MAX_DOC_NAME_LEN: usize = 256;

/// Where a stored update came from, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordId {
    Snapshot { upto: u64 },
    Log { seq: u64 },
}

impl fmt::Display for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordId::Snapshot { upto } => write!(f, "snapshot (up to log record {upto})"),
            RecordId::Log { seq } => write!(f, "log record {seq}"),
        }
    }
}

/// A document as read back from disk: its updates in the order to apply them.
#[derive(Debug, Default)]
pub struct StoredDoc {
    pub updates: Vec<(RecordId, Vec<u8>)>,
    /// The highest sequence number in use (log or snapshot); the next append uses `last_seq + 1`.
    pub last_seq: u64,
}

/// The sled-backed store of document update logs and snapshots.
#[derive(Clone)]
pub struct DocStore {
    db: sled::Db,
    names: sled::Tree,
    snapshots: sled::Tree,
    local_writes: sled::Tree,
}

impl DocStore {
    pub fn open(db: &sled::Db) -> Result<Self, StoreError> {
        Ok(Self {
            db: db.clone(),
            names: db.open_tree("docs")?,
            snapshots: db.open_tree("snapshots")?,
            local_writes: db.open_tree("local_writes")?,
        })
    }

    /// Checks that `name` is usable as a document name.
    pub fn validate_name(name: &str) -> Result<(), StoreError> {
        let reason = if name.is_empty() {
            Some("empty")
        } else if name.len() > MAX_DOC_NAME_LEN {
            Some("longer than 256 bytes")
        } else if name.chars().any(char::is_control) {
            Some("contains control characters")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(StoreError::InvalidDocName {
                name: name.chars().take(64).collect(),
                reason,
            }),
            None => Ok(()),
        }
    }

    /// Names of every stored document, sorted.
    pub fn list(&self) -> Result<Vec<String>, StoreError> {
        self.names
            .iter()
            .keys()
            .map(|key| {
                let key = key?;
                String::from_utf8(key.to_vec()).map_err(|_| StoreError::CorruptTrust {
                    key: format!("docs/{key:?}"),
                    reason: "document name is not UTF-8".into(),
                })
            })
            .collect()
    }

    /// Records that `name` exists (made durable by the next flush).
    pub fn register(&self, name: &str) -> Result<(), StoreError> {
        Self::validate_name(name)?;
        self.names.insert(name, &[])?;
        Ok(())
    }

    pub(crate) fn log_tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree(format!("log/{name}"))?)
    }

    /// Reads a document's snapshot and log. Every record is checksum-verified; the first bad one
    /// aborts the load with an error naming the document and the record.
    pub fn load(&self, name: &str) -> Result<StoredDoc, StoreError> {
        let corrupt = |record: RecordId, reason: String| StoreError::Corrupt {
            doc: name.to_string(),
            record: record.to_string(),
            reason,
        };
        let mut out = StoredDoc::default();
        let mut upto = 0;
        if let Some(bytes) = self.snapshots.get(name)? {
            let (snap_upto, payload) = record::decode_snapshot(&bytes)
                .map_err(|e: RecordError| corrupt(RecordId::Snapshot { upto: 0 }, e.to_string()))?;
            upto = snap_upto;
            out.updates
                .push((RecordId::Snapshot { upto }, payload.to_vec()));
        }
        out.last_seq = upto;
        for entry in self.log_tree(name)?.range((upto + 1).to_be_bytes()..) {
            let (key, value) = entry?;
            let seq = decode_seq(&key)
                .ok_or_else(|| corrupt(RecordId::Log { seq: 0 }, format!("bad log key {key:?}")))?;
            let updates = record::decode_log(&value)
                .map_err(|e| corrupt(RecordId::Log { seq }, e.to_string()))?;
            for update in updates {
                out.updates.push((RecordId::Log { seq }, update.to_vec()));
            }
            out.last_seq = seq;
        }
        Ok(out)
    }

    /// The highest sequence number used by `name` (0 for a new document).
    pub(crate) fn last_seq(&self, name: &str, log: &sled::Tree) -> Result<u64, StoreError> {
        let from_log = match log.last()? {
            Some((key, _)) => decode_seq(&key).unwrap_or(0),
            None => 0,
        };
        let from_snapshot = match self.snapshots.get(name)? {
            Some(bytes) => record::decode_snapshot(&bytes).map(|(u, _)| u).unwrap_or(0),
            None => 0,
        };
        Ok(from_log.max(from_snapshot))
    }

    /// Appends one record holding `updates` in order (not yet flushed).
    pub(crate) fn append<B: AsRef<[u8]>>(
        log: &sled::Tree,
        seq: u64,
        updates: &[B],
    ) -> Result<(), StoreError> {
        log.insert(seq.to_be_bytes(), record::encode_log(updates))?;
        Ok(())
    }

    /// Replaces the log up to `upto` by a snapshot of the full state. The snapshot is flushed
    /// before the log records it covers are removed, so a crash in between loses nothing
    /// (replaying a covered update is a no-op in Yjs).
    pub(crate) fn compact(
        &self,
        name: &str,
        log: &sled::Tree,
        upto: u64,
        state: &[u8],
    ) -> Result<(), StoreError> {
        self.snapshots
            .insert(name, record::encode_snapshot(upto, state))?;
        self.db.flush()?;
        let mut batch = sled::Batch::default();
        for key in log.range(..=upto.to_be_bytes()).keys() {
            batch.remove(key?);
        }
        log.apply_batch(batch)?;
        Ok(())
    }

    /// Makes every write so far durable (one fsync for all of them).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// The remembered last local write to each map key of `name` (for conflict detection).
    pub fn local_writes(&self, name: &str) -> Result<crate::conflict::LocalWrites, StoreError> {
        let mut out = crate::conflict::LocalWrites::new();
        for entry in self.local_writes.scan_prefix(doc_prefix(name)) {
            let (key, value) = entry?;
            let decoded = postcard::from_bytes::<(String, String)>(&key[doc_prefix(name).len()..])
                .ok()
                .zip(postcard::from_bytes::<(u64, u32, String)>(&value).ok());
            if let Some(((map, k), (client, clock, json))) = decoded {
                let value = serde_json::from_str(&json).unwrap_or(serde_json::Value::Null);
                out.insert(
                    (map, k),
                    crate::conflict::LocalWrite {
                        client,
                        clock,
                        value,
                    },
                );
            }
        }
        Ok(out)
    }

    /// Remembers (or with `None`, forgets) the last local write to `map.key` of `name`.
    pub fn set_local_write(
        &self,
        name: &str,
        map: &str,
        key: &str,
        write: Option<&crate::conflict::LocalWrite>,
    ) -> Result<(), StoreError> {
        let mut k = doc_prefix(name);
        k.extend(postcard::to_allocvec(&(map, key)).unwrap_or_default());
        match write {
            Some(w) => {
                let v = postcard::to_allocvec(&(w.client, w.clock, w.value.to_string()))
                    .unwrap_or_default();
                self.local_writes.insert(k, v)?;
            }
            None => {
                self.local_writes.remove(k)?;
            }
        }
        Ok(())
    }

    /// Overwrites a raw log record; only for tests that simulate disk corruption.
    #[doc(hidden)]
    pub fn corrupt_log_record_for_test(&self, name: &str, seq: u64) -> Result<(), StoreError> {
        let log = self.log_tree(name)?;
        log.insert(seq.to_be_bytes(), &b"\x01garbage!"[..])?;
        self.flush()
    }
}

fn doc_prefix(name: &str) -> Vec<u8> {
    let mut prefix = (name.len() as u16).to_be_bytes().to_vec();
    prefix.extend_from_slice(name.as_bytes());
    prefix
}

fn decode_seq(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}
