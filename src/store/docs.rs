//! `DocStore`: every document as a compacted snapshot plus an append-only update log, in a fixed
//! set of sled trees whatever the number of documents, plus the local **change feed**.
//!
//! Layout (layout 2, see protocol/README.md §15):
//! - `docs`: name -> [`DocMeta`] (postcard): the document's numeric id, log position, size, last
//!   change. Listing documents reads this tree only.
//! - `log`: `[id u64 BE][seq u64 BE]` -> log record of the updates one group commit wrote.
//! - `snapshots`: `[id u64 BE]` -> snapshot record (the merged state up to a log sequence number).
//! - `feed`: `[change u64 BE]` -> name. Every stored change, local or received, moves its document
//!   to the next change number, so the feed holds at most one entry per document and "what
//!   changed after N" is one range scan. Peers remember how far of it they have seen.
//! - `checkpoints`: peer id bytes -> postcard `(epoch, change)`: how far of that peer's feed this
//!   device holds.
//! - `store_meta`: `layout`, `feed_epoch` (random, made with the database: a device that lost its
//!   data dir starts a new feed).
//!
//! Loading a document = snapshot + every log record after it. Records are checksummed (see
//! `record`); a bad one is reported naming the document and the record, and nothing is deleted.
//! Creating a document costs a few inserts into existing trees (no sled tree per document).

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::record::{self, RecordError};

/// The item a local map write created, and the value written: kept per (map, key) so a later
/// remote update can be told to have replaced it unseen (a conflict, to the layers above).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalWrite {
    pub client: u64,
    pub clock: u32,
    pub value: serde_json::Value,
}

impl LocalWrite {
    pub fn id(&self) -> yrs::ID {
        yrs::ID::new(yrs::block::ClientID::new(self.client), self.clock)
    }
}

/// Local writes per (map, key), as kept in memory by a live document.
pub type LocalWrites = std::collections::BTreeMap<(String, String), LocalWrite>;
use super::StoreError;

/// Longest accepted document name, in bytes.
pub const MAX_DOC_NAME_LEN: usize = 256;

/// Storage layout written by this build.
const LAYOUT: u8 = 2;

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

/// What the store knows about one document without loading it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocMeta {
    /// Numeric id keying the document's log and snapshot records.
    pub id: u64,
    /// The highest log sequence number in use (log or snapshot).
    pub last_seq: u64,
    /// The document's position in the change feed (its latest change).
    pub change: u64,
    /// Updates and bytes in the log since the last snapshot.
    pub log_updates: u64,
    pub log_bytes: u64,
    /// Size of the last snapshot's payload.
    pub snapshot_len: u64,
    /// When the last change was stored (Unix milliseconds).
    pub updated_ms: u64,
    /// The device the last change came from; `None` = this device.
    pub by: Option<String>,
}

impl DocMeta {
    /// Bytes the document occupies on disk (snapshot + log since it), approximately.
    pub fn stored_bytes(&self) -> u64 {
        self.snapshot_len + self.log_bytes
    }
}

/// A document as read back from disk: its updates in the order to apply them.
#[derive(Debug, Default)]
pub struct StoredDoc {
    pub updates: Vec<(RecordId, Vec<u8>)>,
    /// `None` for a document that is not stored.
    pub meta: Option<DocMeta>,
}

/// The sled-backed store of document update logs, snapshots and the change feed.
#[derive(Clone)]
pub struct DocStore {
    db: sled::Db,
    names: sled::Tree,
    log: sled::Tree,
    snapshots: sled::Tree,
    feed: sled::Tree,
    checkpoints: sled::Tree,
    local_writes: sled::Tree,
    epoch: u64,
    /// How many documents are stored (sled counts a tree by walking it).
    count: Arc<AtomicUsize>,
    /// What the store acknowledged, kept beside the database (see [`super::manifest`]).
    manifest: Arc<std::sync::OnceLock<Arc<super::Manifest>>>,
}

impl DocStore {
    /// Opens the document trees, converting a layout-1 database (a tree per document) first.
    pub fn open(db: &sled::Db) -> Result<Self, StoreError> {
        let meta = db.open_tree("store_meta")?;
        let store = Self {
            db: db.clone(),
            names: db.open_tree("docs")?,
            log: db.open_tree("log")?,
            snapshots: db.open_tree("snapshots")?,
            feed: db.open_tree("feed")?,
            checkpoints: db.open_tree("checkpoints")?,
            local_writes: db.open_tree("local_writes")?,
            epoch: 0,
            count: Arc::default(),
            manifest: Arc::default(),
        };
        if meta.get("layout")?.is_none() {
            store.migrate_layout_1()?;
            meta.insert("layout", &[LAYOUT])?;
        }
        let epoch = match meta.get("feed_epoch")? {
            Some(bytes) => decode_u64(&bytes).ok_or_else(|| StoreError::Corrupt {
                doc: "(store)".into(),
                record: "feed_epoch".into(),
                reason: "not 8 bytes".into(),
            })?,
            None => {
                // Never 0: 0 means "no checkpoint" on the wire.
                let epoch = rand::random::<u64>().max(1);
                meta.insert("feed_epoch", &epoch.to_be_bytes())?;
                epoch
            }
        };
        db.flush()?;
        store.count.store(store.names.len(), Ordering::Relaxed);
        Ok(Self { epoch, ..store })
    }

    /// Layout 1 kept a `log/<name>` tree per document and keyed snapshots by name; move every
    /// record into layout 2 (idempotent: a crash midway is finished at the next start).
    fn migrate_layout_1(&self) -> Result<(), StoreError> {
        let old_trees: Vec<sled::IVec> = self
            .db
            .tree_names()
            .into_iter()
            .filter(|n| n.starts_with(b"log/"))
            .collect();
        let names: Vec<sled::IVec> = self.names.iter().keys().collect::<Result<_, _>>()?;
        if names.is_empty() && old_trees.is_empty() {
            return Ok(());
        }
        tracing::info!(
            docs = names.len(),
            "converting the document store to layout 2"
        );
        for key in names {
            let existing = self.names.get(&key)?;
            let name = String::from_utf8_lossy(&key).into_owned();
            let mut meta = match existing
                .as_deref()
                .and_then(|v| postcard::from_bytes(v).ok())
            {
                Some(meta) if !existing.as_deref().is_some_and(|v| v.is_empty()) => meta,
                _ => DocMeta {
                    id: self.db.generate_id()? + 1,
                    ..DocMeta::default()
                },
            };
            if let Some(snapshot) = self.snapshots.remove(&key)? {
                if let Ok((upto, payload)) = record::decode_snapshot(&snapshot) {
                    meta.last_seq = meta.last_seq.max(upto);
                    meta.snapshot_len = payload.len() as u64;
                }
                self.snapshots.insert(meta.id.to_be_bytes(), snapshot)?;
            }
            let old = self.db.open_tree(format!("log/{name}"))?;
            for entry in old.iter() {
                let (seq, value) = entry?;
                if let Some(seq) = decode_u64(&seq) {
                    meta.last_seq = meta.last_seq.max(seq);
                    meta.log_updates += 1;
                    meta.log_bytes += value.len() as u64;
                    self.log.insert(log_key(meta.id, seq), value)?;
                }
            }
            if meta.change == 0 {
                meta.change = self.next_change()?;
                self.feed
                    .insert(meta.change.to_be_bytes(), name.as_bytes())?;
            }
            self.names.insert(&key, encode_meta(&meta))?;
            self.db.flush()?;
            self.db.drop_tree(format!("log/{name}"))?;
        }
        for tree in old_trees {
            self.db.drop_tree(tree)?;
        }
        self.db.flush()?;
        Ok(())
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

    /// This store's change feed epoch (random, fixed for the life of the database).
    pub fn feed_epoch(&self) -> u64 {
        self.epoch
    }

    /// Names of every stored document, sorted.
    pub fn list(&self) -> Result<Vec<String>, StoreError> {
        self.names
            .iter()
            .keys()
            .map(|key| Ok(decode_name(&key?)))
            .collect()
    }

    /// How many documents are stored.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// A page of documents with their metadata: names sorted, strictly after `after`.
    pub fn list_meta(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, DocMeta)>, StoreError> {
        let range = match after {
            Some(after) => self.names.range::<&[u8], _>((
                std::ops::Bound::Excluded(after.as_bytes()),
                std::ops::Bound::Unbounded,
            )),
            None => self.names.iter(),
        };
        range
            .take(limit)
            .map(|entry| {
                let (key, value) = entry?;
                let name = decode_name(&key);
                let meta = self.decode_meta(&name, &value)?;
                Ok((name, meta))
            })
            .collect()
    }

    /// The metadata of `name`, if stored.
    pub fn meta(&self, name: &str) -> Result<Option<DocMeta>, StoreError> {
        match self.names.get(name)? {
            Some(value) => Ok(Some(self.decode_meta(name, &value)?)),
            None => Ok(None),
        }
    }

    fn decode_meta(&self, name: &str, value: &[u8]) -> Result<DocMeta, StoreError> {
        postcard::from_bytes(value).map_err(|e| StoreError::Corrupt {
            doc: name.to_string(),
            record: "metadata".into(),
            reason: e.to_string(),
        })
    }

    /// Reads a document's snapshot and log. Every record is checksum-verified; the first bad one
    /// aborts the load with an error naming the document and the record.
    pub fn load(&self, name: &str) -> Result<StoredDoc, StoreError> {
        let corrupt = |record: RecordId, reason: String| StoreError::Corrupt {
            doc: name.to_string(),
            record: record.to_string(),
            reason,
        };
        let Some(meta) = self.meta(name)? else {
            return Ok(StoredDoc::default());
        };
        let mut out = StoredDoc::default();
        let mut upto = 0;
        if let Some(bytes) = self.snapshots.get(meta.id.to_be_bytes())? {
            let (snap_upto, payload) = record::decode_snapshot(&bytes)
                .map_err(|e: RecordError| corrupt(RecordId::Snapshot { upto: 0 }, e.to_string()))?;
            upto = snap_upto;
            out.updates
                .push((RecordId::Snapshot { upto }, payload.to_vec()));
        }
        for entry in self
            .log
            .range(log_key(meta.id, upto + 1)..log_key(meta.id + 1, 0))
        {
            let (key, value) = entry?;
            let seq = decode_u64(&key[8..]).unwrap_or(0);
            let updates = record::decode_log(&value)
                .map_err(|e| corrupt(RecordId::Log { seq }, e.to_string()))?;
            for update in updates {
                out.updates.push((RecordId::Log { seq }, update.to_vec()));
            }
        }
        out.meta = Some(meta);
        Ok(out)
    }

    /// The metadata a new document starts with (a fresh id; nothing written yet).
    pub(crate) fn new_meta(&self) -> Result<DocMeta, StoreError> {
        Ok(DocMeta {
            // generate_id starts at 0; keep 0 free.
            id: self.db.generate_id()? + 1,
            ..DocMeta::default()
        })
    }

    /// The next change number (one past the feed's last entry).
    pub(crate) fn next_change(&self) -> Result<u64, StoreError> {
        Ok(self.feed_head()? + 1)
    }

    /// The highest change number in the feed (0 for an empty feed).
    pub fn feed_head(&self) -> Result<u64, StoreError> {
        Ok(match self.feed.last()? {
            Some((key, _)) => decode_u64(&key).unwrap_or(0),
            None => 0,
        })
    }

    /// Appends one log record holding `updates` in order as change number `change`, and updates
    /// the document's metadata and feed entry (not yet flushed).
    pub(crate) fn append<B: AsRef<[u8]>>(
        &self,
        name: &str,
        meta: &mut DocMeta,
        change: u64,
        updates: &[B],
        by: Option<&str>,
    ) -> Result<(), StoreError> {
        let seq = meta.last_seq + 1;
        let bytes: u64 = updates.iter().map(|u| u.as_ref().len() as u64).sum();
        self.log
            .insert(log_key(meta.id, seq), record::encode_log(updates))?;
        if meta.change != 0 {
            self.feed.remove(meta.change.to_be_bytes())?;
        }
        self.feed.insert(change.to_be_bytes(), name.as_bytes())?;
        meta.last_seq = seq;
        meta.change = change;
        meta.log_updates += updates.len() as u64;
        meta.log_bytes += bytes;
        meta.updated_ms = now_ms();
        meta.by = by.map(str::to_string);
        if self.names.insert(name, encode_meta(meta))?.is_none() {
            self.count.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(manifest) = self.manifest.get() {
            manifest.changed(name, change);
        }
        Ok(())
    }

    /// From now on, every change and purge is recorded in `manifest` too.
    pub fn attach_manifest(&self, manifest: Arc<super::Manifest>) {
        let _ = self.manifest.set(manifest);
    }

    /// Forgets how far of each peer's feed this device holds, so the next catch-up with each
    /// peer lists everything it has (after the store lost data).
    pub(crate) fn forget_checkpoints(&self) -> Result<(), StoreError> {
        self.checkpoints.clear()?;
        self.db.flush()?;
        Ok(())
    }

    /// Replaces the log up to `meta.last_seq` by a snapshot of the full state. The snapshot is
    /// flushed before the log records it covers are removed, so a crash in between loses nothing
    /// (replaying a covered update is a no-op in Yjs).
    pub(crate) fn compact(
        &self,
        name: &str,
        meta: &mut DocMeta,
        state: &[u8],
    ) -> Result<(), StoreError> {
        let upto = meta.last_seq;
        self.snapshots
            .insert(meta.id.to_be_bytes(), record::encode_snapshot(upto, state))?;
        meta.log_updates = 0;
        meta.log_bytes = 0;
        meta.snapshot_len = state.len() as u64;
        self.names.insert(name, encode_meta(meta))?;
        self.db.flush()?;
        let mut batch = sled::Batch::default();
        for key in self
            .log
            .range(log_key(meta.id, 0)..=log_key(meta.id, upto))
            .keys()
        {
            batch.remove(key?);
        }
        self.log.apply_batch(batch)?;
        Ok(())
    }

    /// Removes every record of `name` (log, snapshot, metadata, feed entry, remembered writes).
    /// Returns whether it was stored.
    pub(crate) fn purge(&self, name: &str) -> Result<bool, StoreError> {
        let Some(meta) = self.meta(name)? else {
            return Ok(false);
        };
        let mut batch = sled::Batch::default();
        for key in self
            .log
            .range(log_key(meta.id, 0)..log_key(meta.id + 1, 0))
            .keys()
        {
            batch.remove(key?);
        }
        self.log.apply_batch(batch)?;
        self.snapshots.remove(meta.id.to_be_bytes())?;
        if meta.change != 0 {
            self.feed.remove(meta.change.to_be_bytes())?;
        }
        for key in self.local_writes.scan_prefix(doc_prefix(name)).keys() {
            self.local_writes.remove(key?)?;
        }
        if self.names.remove(name)?.is_some() {
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(manifest) = self.manifest.get() {
            manifest.removed(name);
        }
        Ok(true)
    }

    /// Names of the documents whose latest change is after `after`, oldest change first, at most
    /// `limit` of them, with the change number of the last one listed.
    pub fn changed_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<String>, u64), StoreError> {
        let mut names = Vec::new();
        let mut last = after;
        for entry in self.feed.range((after + 1).to_be_bytes()..).take(limit) {
            let (key, value) = entry?;
            last = decode_u64(&key).unwrap_or(last);
            names.push(decode_name(&value));
        }
        Ok((names, last))
    }

    /// How far of `peer`'s feed this device holds: `(epoch, change)`, `(0, 0)` if nothing.
    pub fn checkpoint(&self, peer: &[u8]) -> Result<(u64, u64), StoreError> {
        Ok(self
            .checkpoints
            .get(peer)?
            .and_then(|v| postcard::from_bytes(&v).ok())
            .unwrap_or((0, 0)))
    }

    /// Records how far of `peer`'s feed this device holds (durable with the next flush).
    pub(crate) fn set_checkpoint(
        &self,
        peer: &[u8],
        epoch: u64,
        change: u64,
    ) -> Result<(), StoreError> {
        let value = postcard::to_allocvec(&(epoch, change)).unwrap_or_default();
        self.checkpoints.insert(peer, value)?;
        Ok(())
    }

    /// Makes every write so far durable (one fsync for all of them).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// The remembered last local write to each map key of `name` (for conflict detection).
    pub fn local_writes(&self, name: &str) -> Result<LocalWrites, StoreError> {
        let mut out = LocalWrites::new();
        for entry in self.local_writes.scan_prefix(doc_prefix(name)) {
            let (key, value) = entry?;
            let decoded = postcard::from_bytes::<(String, String)>(&key[doc_prefix(name).len()..])
                .ok()
                .zip(postcard::from_bytes::<(u64, u32, String)>(&value).ok());
            if let Some(((map, k), (client, clock, json))) = decoded {
                let value = serde_json::from_str(&json).unwrap_or(serde_json::Value::Null);
                out.insert(
                    (map, k),
                    LocalWrite {
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
        write: Option<&LocalWrite>,
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
        let meta = self.meta(name)?.ok_or(StoreError::Closed)?;
        self.log
            .insert(log_key(meta.id, seq), &b"\x01garbage!"[..])?;
        self.flush()
    }
}

fn encode_meta(meta: &DocMeta) -> Vec<u8> {
    postcard::to_allocvec(meta).unwrap_or_default()
}

fn log_key(id: u64, seq: u64) -> [u8; 16] {
    let mut key = [0; 16];
    key[..8].copy_from_slice(&id.to_be_bytes());
    key[8..].copy_from_slice(&seq.to_be_bytes());
    key
}

fn decode_name(bytes: &[u8]) -> String {
    // Names are validated UTF-8 when first stored; a damaged one still lists, visibly.
    String::from_utf8_lossy(bytes).into_owned()
}

fn doc_prefix(name: &str) -> Vec<u8> {
    let mut prefix = (name.len() as u16).to_be_bytes().to_vec();
    prefix.extend_from_slice(name.as_bytes());
    prefix
}

fn decode_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_store() -> (tempfile::TempDir, sled::Db, DocStore) {
        let dir = tempfile::tempdir().unwrap();
        let db = super::super::open_db(dir.path()).unwrap();
        let store = DocStore::open(&db).unwrap();
        (dir, db, store)
    }

    #[test]
    fn the_feed_keeps_one_entry_per_document_in_change_order() {
        let (_dir, _db, store) = temp_store();
        let mut a = store.new_meta().unwrap();
        let mut b = store.new_meta().unwrap();
        store.append("a", &mut a, 1, &[b"x"], None).unwrap();
        store.append("b", &mut b, 2, &[b"y"], Some("peer")).unwrap();
        store.append("a", &mut a, 3, &[b"z"], None).unwrap();
        assert_eq!(store.feed_head().unwrap(), 3);
        assert_eq!(
            store.changed_after(0, 10).unwrap(),
            (vec!["b".to_string(), "a".to_string()], 3)
        );
        assert_eq!(store.changed_after(2, 10).unwrap(), (vec!["a".into()], 3));
        assert_eq!(store.changed_after(3, 10).unwrap(), (vec![], 3));
        assert_eq!(store.load("a").unwrap().updates.len(), 2);
        assert_eq!(
            store.meta("b").unwrap().unwrap().by.as_deref(),
            Some("peer")
        );
        assert!(store.purge("a").unwrap());
        assert!(store.load("a").unwrap().meta.is_none());
        assert_eq!(store.changed_after(0, 10).unwrap().0, vec!["b".to_string()]);
    }

    #[test]
    fn a_layout_1_database_is_converted_with_its_records() {
        let dir = tempfile::tempdir().unwrap();
        {
            // Layout 1: names with empty values, a snapshot keyed by name, a tree per document.
            let db = super::super::open_db(dir.path()).unwrap();
            db.open_tree("docs").unwrap().insert("old", &[]).unwrap();
            let snapshot = record::encode_snapshot(1, &[0, 0]);
            db.open_tree("snapshots")
                .unwrap()
                .insert("old", snapshot)
                .unwrap();
            let log = db.open_tree("log/old").unwrap();
            log.insert(2u64.to_be_bytes(), record::encode_log(&[b"u2"]))
                .unwrap();
            db.flush().unwrap();
        }
        let db = super::super::open_db(dir.path()).unwrap();
        let store = DocStore::open(&db).unwrap();
        let loaded = store.load("old").unwrap();
        assert_eq!(loaded.updates.len(), 2);
        assert_eq!(loaded.updates[1].1, b"u2");
        assert_eq!(loaded.meta.unwrap().last_seq, 2);
        assert!(!db.tree_names().iter().any(|n| n.starts_with(b"log/")));
        assert_eq!(
            store.changed_after(0, 10).unwrap().0,
            vec!["old".to_string()]
        );
    }
}
