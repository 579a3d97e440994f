//! The live documents of an agent: `DocRegistry` keeps the yrs `Doc`s in use in memory, loads
//! one from the `DocStore` when an app or a peer needs it, evicts idle ones under a memory budget
//! (least recently used first), applies local and remote updates, hands updates to the
//! group-commit writer, and publishes every change to subscribers and to the sync sessions.
//!
//! Order of a local change: applied in memory -> published to peers and subscribers -> queued to
//! the writer -> the caller's acknowledgement completes once the writer has flushed it to disk.
//! Publishing before queueing means a change the writer has numbered in the change feed has
//! always been published already (sync sessions rely on it, see `sync::session`).
//!
//! A document leaves memory only when nothing refers to it: no [`DocHandle`], no subscriber, and
//! no update still queued for the disk (so a reload never misses one).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use bytes::Bytes;
use libp2p::PeerId;
use tokio::sync::{broadcast, mpsc};
use yrs::updates::decoder::Decode;
use yrs::{
    Array, GetString, Map, ReadTxn, StateVector, Text, Transact, Transaction, TransactionMut,
    Update, WriteTxn,
};

use crate::store::writer::{Append, WriterHandle};
use crate::store::{DocStore, LocalWrite, LocalWrites, StoreError};

/// Capacity of the agent-wide update channel the sync sessions read. A session that falls
/// further behind than this ends and resynchronizes by state vector.
pub const EVENT_CAPACITY: usize = 16 * 1024;

/// Capacity of a document's subscriber channel (made on the first subscription only). A
/// subscriber that falls further behind gets `RecvError::Lagged` and must resynchronize.
pub const DOC_EVENT_CAPACITY: usize = 1024;

/// Default memory budget of loaded documents.
pub const DEFAULT_CACHE_BYTES: usize = 128 << 20;

/// Estimated memory of a loaded document: yrs keeps several times its encoded size (blocks,
/// an id index, strings), plus a fixed cost per document (a `Doc`, its store and maps).
fn estimate_memory(encoded_bytes: usize) -> usize {
    4 * 1024 + encoded_bytes.saturating_mul(4)
}

/// Who made a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Origin {
    /// This device (an app or the API).
    Local,
    /// Another device, received over sync.
    Peer(PeerId),
}

/// One change to one document, as Yjs update v1 bytes (only what the change added).
#[derive(Debug, Clone)]
pub struct DocUpdate {
    pub doc: Arc<str>,
    pub update: Bytes,
    pub origin: Origin,
    /// The document's state vector right after this update: whoever received every update up
    /// to this one holds at least this.
    pub state: Arc<StateVector>,
    /// The document was deleted (on this device or another one); `update` is empty.
    pub deleted: bool,
    /// The local client (an IPC or y-websocket connection) that made the change, so it can
    /// tell its own changes from others'; 0 when none did.
    pub client: u64,
}

/// The outcome of applying an update.
pub(crate) struct Applied {
    /// Completes once the update is on disk (local updates only; `None` if nothing to wait for).
    pub durable: Option<tokio::sync::oneshot::Receiver<Result<(), StoreError>>>,
    /// The upper state vector of the update: its sender holds at least this.
    pub state_vector: StateVector,
}

/// Errors of document operations.
#[derive(Debug, thiserror::Error)]
pub enum DocError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("document {doc:?}: invalid Yjs update: {reason}")]
    InvalidUpdate { doc: String, reason: String },
    #[error("document {doc:?}: invalid Yjs state vector: {reason}")]
    InvalidStateVector { doc: String, reason: String },
    #[error(
        "document {doc:?}: the change could not be made durable, it is not acknowledged: {source}"
    )]
    NotDurable { doc: String, source: StoreError },
    #[error("document {0:?} was deleted")]
    Deleted(String),
    #[error("document {0:?} does not exist")]
    NotFound(String),
    #[error(
        "document {doc:?}: root {root:?} is a {found}, not a {wanted}: nothing was changed \
         (write to a {found} with {hint}, or use another root name)"
    )]
    WrongType {
        doc: String,
        root: String,
        found: RootKind,
        wanted: RootKind,
        hint: &'static str,
    },
    #[error("document {doc:?}: {reason}")]
    InvalidValue { doc: String, reason: String },
    #[error(
        "document {0:?} is reserved for the agent (names starting with {RESERVED_PREFIX:?}): \
         apps may read it, not write it"
    )]
    Reserved(String),
    #[error("the agent has stopped")]
    AgentStopped,
}

pub(crate) struct LiveDoc {
    name: Arc<str>,
    doc: yrs::Doc,
    /// Subscribers' channel, made on the first subscription (most documents never have one).
    events: Mutex<Option<broadcast::Sender<DocUpdate>>>,
    /// This device's last write to each map key, to tell concurrent overwrites from later ones.
    local_writes: Mutex<LocalWrites>,
    /// Updates queued to the writer and not yet written.
    inflight: Arc<AtomicUsize>,
    /// Estimated memory, for the cache budget.
    memory: AtomicUsize,
    /// The registry's clock at the last use, for least-recently-used eviction.
    last_used: AtomicU64,
}

impl LiveDoc {
    pub(crate) fn yrs(&self) -> &yrs::Doc {
        &self.doc
    }

    fn subscribers(&self) -> usize {
        lock(&self.events)
            .as_ref()
            .map_or(0, broadcast::Sender::receiver_count)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every guarded value here is replaced or updated in single steps: a panic elsewhere
    // cannot leave it half-updated.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The documents this agent has in memory, plus the paths to disk and to peers.
pub(crate) struct DocRegistry {
    docs: Mutex<HashMap<Arc<str>, Arc<LiveDoc>>>,
    /// `None` once the agent has shut down (so the database can be reopened).
    store: RwLock<Option<DocStore>>,
    writer: WriterHandle,
    bus: broadcast::Sender<DocUpdate>,
    device_id: String,
    /// Local writes replaced unseen by a remote update go here (the conflict layer records
    /// them).
    overwrites: mpsc::UnboundedSender<Overwrite>,
    /// Memory budget of loaded documents, in (estimated) bytes.
    cache_budget: usize,
    /// Estimated memory of every loaded document.
    cached: AtomicUsize,
    clock: AtomicU64,
    /// Deleted document names: the keys of the tombstones document, kept current by every
    /// change to it (so a sync session sees a lifted tombstone before the next message).
    tombstones: RwLock<HashSet<String>>,
}

/// Checks that `name` can name a document (not empty, at most 255 bytes, no control
/// characters); the error says what is wrong with it.
pub fn validate_name(name: &str) -> Result<(), DocError> {
    Ok(DocStore::validate_name(name)?)
}

impl DocError {
    /// Whether the caller's input was at fault (a bad name, a corrupt update or state vector),
    /// rather than the agent or its disk.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            DocError::InvalidUpdate { .. }
                | DocError::InvalidStateVector { .. }
                | DocError::InvalidValue { .. }
                | DocError::Reserved(_)
                | DocError::Store(StoreError::InvalidDocName { .. })
        )
    }
}

/// Names starting with it are the agent's own documents: apps may read them, not write them,
/// and they are never deleted.
pub const RESERVED_PREFIX: &str = "_devicelink/";

/// A local map write that a remote update replaced although its author never saw it: the two
/// devices wrote the same key while apart. The document layer only reports it; `conflict`
/// makes a record of it.
#[derive(Debug, Clone)]
pub struct Overwrite {
    pub doc: String,
    pub map: String,
    pub key: String,
    /// This device's write that lost.
    pub lost: LocalWrite,
    /// The value every device now has, and the device whose update brought it.
    pub winner_value: serde_json::Value,
    pub winner_device: PeerId,
}

/// The tombstones document (see `lifecycle`): root map [`DELETED_MAP`], name -> `{at, by}`.
pub const DELETED_DOC: &str = "_devicelink/deleted";
pub(crate) const DELETED_MAP: &str = "deleted";

impl DocRegistry {
    pub fn new(
        store: DocStore,
        writer: WriterHandle,
        device_id: String,
        overwrites: mpsc::UnboundedSender<Overwrite>,
        cache_budget: usize,
    ) -> Self {
        Self {
            docs: Mutex::new(HashMap::new()),
            store: RwLock::new(Some(store)),
            writer,
            bus: broadcast::channel(EVENT_CAPACITY).0,
            device_id,
            overwrites,
            cache_budget,
            cached: AtomicUsize::new(0),
            clock: AtomicU64::new(0),
            tombstones: RwLock::new(HashSet::new()),
        }
    }

    /// Releases the database; later loads fail with `StoreError::Closed`.
    pub fn close(&self) {
        self.store.write().unwrap_or_else(|p| p.into_inner()).take();
        self.docs().clear();
    }

    pub(crate) fn store(&self) -> Result<DocStore, StoreError> {
        self.store
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(StoreError::Closed)
    }

    pub fn writer(&self) -> &WriterHandle {
        &self.writer
    }

    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    /// All changes to all documents, for the sync sessions.
    pub fn subscribe_all(&self) -> broadcast::Receiver<DocUpdate> {
        self.bus.subscribe()
    }

    fn docs(&self) -> MutexGuard<'_, HashMap<Arc<str>, Arc<LiveDoc>>> {
        lock(&self.docs)
    }

    fn touch(&self, live: &LiveDoc) {
        let now = self.clock.fetch_add(1, Ordering::Relaxed);
        live.last_used.store(now, Ordering::Relaxed);
    }

    /// The live document `name`, loaded from disk on first use (empty if it does not exist yet).
    pub fn open(&self, name: &str) -> Result<Arc<LiveDoc>, DocError> {
        if let Some(live) = self.docs().get(name).cloned() {
            self.touch(&live);
            return Ok(live);
        }
        DocStore::validate_name(name)?;
        // Load outside the map lock; if two callers race, the first insert wins.
        let store = self.store()?;
        let stored = store.load(name)?;
        let local_writes = store.local_writes(name)?;
        let doc = yrs::Doc::new();
        let mut encoded = 0;
        {
            let mut txn = doc.transact_mut();
            for (record, bytes) in &stored.updates {
                encoded += bytes.len();
                let corrupt = |reason: String| StoreError::Corrupt {
                    doc: name.to_string(),
                    record: record.to_string(),
                    reason,
                };
                if let Err(e) = crate::nesting::check_update_v1(bytes) {
                    // Stored before the limit existed: yrs cannot read it without overflowing
                    // its stack. Skipped loudly; the rest of the document loads.
                    tracing::error!(doc = name, %record, "skipping a stored update: {e}");
                    continue;
                }
                let update = decode_update(bytes).map_err(corrupt)?;
                // The record is intact (checksum) and decodes, but yrs will not integrate it:
                // a malformed update that was accepted as pending when it arrived. It was not
                // part of the document then either; skip it loudly and keep the rest.
                let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    txn.apply_update(update)
                }));
                match applied {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::error!(doc = name, %record, "skipping a stored update yrs cannot integrate: {e}")
                    }
                    Err(_) => {
                        tracing::error!(doc = name, %record, "skipping a stored update yrs cannot integrate")
                    }
                }
            }
        }
        let live = Arc::new(LiveDoc {
            name: Arc::from(name),
            doc,
            events: Mutex::new(None),
            local_writes: Mutex::new(local_writes),
            inflight: Arc::new(AtomicUsize::new(0)),
            memory: AtomicUsize::new(estimate_memory(encoded)),
            last_used: AtomicU64::new(0),
        });
        self.touch(&live);
        let live = {
            let mut docs = self.docs();
            let entry = docs.entry(live.name.clone()).or_insert_with(|| {
                self.cached
                    .fetch_add(live.memory.load(Ordering::Relaxed), Ordering::Relaxed);
                live
            });
            entry.clone()
        };
        self.evict_over_budget();
        Ok(live)
    }

    /// Evicts idle documents, least recently used first, while the loaded ones exceed the budget
    /// (down to 3/4 of it, so evictions come in batches).
    fn evict_over_budget(&self) {
        if self.cached.load(Ordering::Relaxed) <= self.cache_budget {
            return;
        }
        let mut docs = self.docs();
        let mut idle: Vec<(u64, Arc<str>)> = docs
            .iter()
            .filter(|(_, live)| Self::evictable(live))
            .map(|(name, live)| (live.last_used.load(Ordering::Relaxed), name.clone()))
            .collect();
        idle.sort_unstable();
        let target = self.cache_budget / 4 * 3;
        for (_, name) in idle {
            if self.cached.load(Ordering::Relaxed) <= target {
                break;
            }
            // Checked again under the map lock: nobody can take a new reference meanwhile.
            if docs.get(&name).is_some_and(Self::evictable) {
                if let Some(live) = docs.remove(&name) {
                    self.cached
                        .fetch_sub(live.memory.load(Ordering::Relaxed), Ordering::Relaxed);
                }
            }
        }
    }

    /// Nothing refers to `live` but the registry, and everything it holds is on disk.
    fn evictable(live: &Arc<LiveDoc>) -> bool {
        Arc::strong_count(live) == 1
            && live.inflight.load(Ordering::SeqCst) == 0
            && live.subscribers() == 0
    }

    pub fn cache_budget(&self) -> usize {
        self.cache_budget
    }

    /// How many documents are in memory, and their estimated bytes.
    pub fn cache_usage(&self) -> (usize, usize) {
        (self.docs().len(), self.cached.load(Ordering::Relaxed))
    }

    /// The loaded document `name`, if it is in memory (never loads).
    pub fn peek(&self, name: &str) -> Option<Arc<LiveDoc>> {
        self.docs().get(name).cloned()
    }

    /// Whether `name` is stored or in memory.
    pub fn exists(&self, name: &str) -> Result<bool, DocError> {
        Ok(self.docs().contains_key(name) || self.store()?.meta(name)?.is_some())
    }

    /// The state vector (v1) of `name` without creating it: `00` for a document this device
    /// does not have.
    pub fn state_vector_of(&self, name: &str) -> Result<Vec<u8>, DocError> {
        use yrs::updates::encoder::Encode;
        if !self.exists(name)? {
            DocStore::validate_name(name)?;
            return Ok(StateVector::default().encode_v1());
        }
        let live = self.open(name)?;
        let sv = live.doc.transact().state_vector().encode_v1();
        Ok(sv)
    }

    /// Opens `name` as a [`DocHandle`].
    pub fn handle(self: &Arc<Self>, name: &str) -> Result<DocHandle, DocError> {
        Ok(DocHandle::new(self.open(name)?, self.clone()))
    }

    /// Names of every document, stored or in memory, sorted.
    pub fn list(&self) -> Result<Vec<String>, DocError> {
        let mut names: BTreeSet<String> = self.store()?.list()?.into_iter().collect();
        names.extend(self.docs().keys().map(|k| k.to_string()));
        Ok(names.into_iter().collect())
    }

    /// Whether `name` was deleted (and not written to again since).
    pub fn is_deleted(&self, name: &str) -> bool {
        // The agent's own documents cannot be deleted, whatever a tombstone says (§22).
        if name.starts_with(RESERVED_PREFIX) {
            return false;
        }
        self.tombstones
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(name)
    }

    /// Re-reads the deleted names after a change to the tombstones document.
    fn refresh_tombstones(&self, live: &LiveDoc) {
        if &*live.name != DELETED_DOC {
            return;
        }
        let map = live.doc.get_or_insert_map(DELETED_MAP);
        let names = map.keys(&live.doc.transact()).map(str::to_string).collect();
        *self.tombstones.write().unwrap_or_else(|p| p.into_inner()) = names;
    }

    /// Loads the tombstones document, so the deleted names are known from the start.
    pub(crate) fn load_tombstones(&self) -> Result<(), DocError> {
        let live = self.open(DELETED_DOC)?;
        self.refresh_tombstones(&live);
        Ok(())
    }

    /// A local write to a deleted name makes it a new document: lift its tombstone first, so
    /// peers see the lift before the new content (it is durable before the write is).
    fn undelete_for_local_write(&self, name: &str) {
        if !self.is_deleted(name) {
            return;
        }
        match self.open(DELETED_DOC) {
            Ok(tombstones) => {
                let map = tombstones.doc.get_or_insert_map(DELETED_MAP);
                let (_, _durable) = self.transact(&tombstones, 0, |txn| {
                    map.remove(txn, name);
                });
            }
            Err(e) => tracing::error!(
                doc = name,
                "cannot lift the tombstone of a re-created document: {e}"
            ),
        }
    }

    /// Deletes `name` on this device: drops it from memory, tells its subscribers, removes its
    /// records from disk. Returns whether it existed.
    pub async fn purge(&self, name: &str) -> Result<bool, DocError> {
        let existed = self.exists(name)?;
        let live = self.docs().remove(name);
        if let Some(live) = &live {
            self.cached
                .fetch_sub(live.memory.load(Ordering::Relaxed), Ordering::Relaxed);
            let event = DocUpdate {
                doc: live.name.clone(),
                update: Bytes::new(),
                origin: Origin::Local,
                state: Arc::new(StateVector::default()),
                deleted: true,
                client: 0,
            };
            if let Some(events) = lock(&live.events).as_ref() {
                let _ = events.send(event);
            }
        }
        self.writer.purge(Arc::from(name)).await?;
        Ok(existed)
    }

    /// Applies a Yjs update received from `origin`. Returns whether it changed the document.
    ///
    /// With `durable`, the returned receiver completes once the update is on disk; remote
    /// updates are stored without waiting (the sender still has them, and state-vector sync
    /// recovers anything lost in a crash).
    pub fn apply_update(
        &self,
        name: &str,
        bytes: impl Into<Bytes>,
        origin: Origin,
    ) -> Result<Applied, DocError> {
        let acked = origin == Origin::Local;
        self.apply_update_by(name, bytes, origin, 0, acked)
    }

    /// [`DocRegistry::apply_update`], made by local client `client` (see [`DocUpdate::client`]).
    /// With `acked`, the update is flushed at once and `durable` completes when it is on disk;
    /// without, it is flushed with the next batch (within the writer's lazy-flush window), for
    /// senders that keep their data until they see it back (peers, y-websocket clients).
    pub fn apply_update_by(
        &self,
        name: &str,
        bytes: impl Into<Bytes>,
        origin: Origin,
        client: u64,
        acked: bool,
    ) -> Result<Applied, DocError> {
        let bytes: Bytes = bytes.into();
        let invalid = |reason: String| DocError::InvalidUpdate {
            doc: name.to_string(),
            reason,
        };
        let update = decode_update(&bytes).map_err(invalid)?;
        let state_vector = upper_state_vector(&update);
        match origin {
            // A deleted document is not brought back by a device that has not heard yet.
            Origin::Peer(_) if self.is_deleted(name) => {
                return Ok(Applied {
                    durable: None,
                    state_vector,
                })
            }
            Origin::Peer(_) => {}
            Origin::Local => self.undelete_for_local_write(name),
        }
        let remote_deletes = update.delete_set().clone();
        // Where each author's items in a large update start (see `all_new` below).
        let starts = (bytes.len() >= PASS_ON_AS_RECEIVED).then(|| update.state_vector_lower());
        let live = self.open(name)?;
        let watched = self.watched_maps(&live);
        // yrs asserts on some malformed input instead of returning an error, while integrating
        // or while committing (when the transaction drops): contain both, and store or pass on
        // nothing of an update that did not commit cleanly.
        let integrated = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut txn = live.doc.transact_mut();
            // A large update is passed on as received only if it is exactly what changes: the
            // document held none of its items yet and nothing was waiting for it (items held
            // back earlier would integrate in this transaction too, and are not in it).
            let all_new = starts.as_ref().is_some_and(|starts| {
                let before = txn.state_vector();
                !txn.has_missing_updates()
                    && starts
                        .iter()
                        .all(|(client, start)| *start >= before.get(client))
            });
            txn.apply_update(update)
                .map_err(|e| invalid(e.to_string()))?;
            let changed = !txn.insert_set().is_empty() || !txn.delete_set().is_empty();
            if let Origin::Peer(peer) = origin {
                self.detect_conflicts(&live, &txn, &watched, &remote_deletes, peer);
            }
            let keep = changed || txn.has_missing_updates();
            // What changed, for subscribers and other peers. A large update that was all new
            // and integrated whole goes out as it came: encoding the delta would hold a second
            // copy of it.
            let whole = all_new && !txn.has_missing_updates();
            let delta = changed.then(|| {
                let delta = if whole {
                    bytes.clone()
                } else {
                    Bytes::from(txn.encode_update_v1())
                };
                (delta, txn.state_vector())
            });
            drop(txn);
            Ok::<_, DocError>((keep, delta))
        }));
        let (keep, delta) = integrated
            .map_err(|_| invalid("the update could not be integrated (malformed)".into()))??;
        if !keep {
            return Ok(Applied {
                durable: None,
                state_vector,
            });
        }
        if let Some((delta, state)) = delta {
            self.publish(&live, delta, origin, state, client);
            self.refresh_tombstones(&live);
        }
        // Store what was received: it may hold not-yet-integrable parts the delta lacks.
        let append = self.append_op(&live, bytes, origin);
        let ack = if acked {
            Some(self.writer.append(append))
        } else {
            self.writer.append_unacked(append);
            None
        };
        Ok(Applied {
            durable: ack,
            state_vector,
        })
    }

    /// Runs `f` in a local write transaction; returns its result and, if it changed anything,
    /// the receiver that completes once the change is durable.
    pub fn transact<R>(
        &self,
        live: &LiveDoc,
        client: u64,
        f: impl FnOnce(&mut TransactionMut<'_>) -> R,
    ) -> (
        R,
        Option<tokio::sync::oneshot::Receiver<Result<(), StoreError>>>,
    ) {
        let mut txn = live.doc.transact_mut();
        let result = f(&mut txn);
        if txn.insert_set().is_empty() && txn.delete_set().is_empty() {
            return (result, None);
        }
        self.undelete_for_local_write(&live.name);
        let update = Bytes::from(txn.encode_update_v1());
        self.publish(
            live,
            update.clone(),
            Origin::Local,
            txn.state_vector(),
            client,
        );
        let ack = self
            .writer
            .append(self.append_op(live, update, Origin::Local));
        drop(txn);
        self.refresh_tombstones(live);
        (result, Some(ack))
    }

    /// The writer operation storing `update` of `live` (and its share of the cache budget).
    fn append_op(&self, live: &LiveDoc, update: Bytes, origin: Origin) -> Append {
        let grown = estimate_memory(update.len()) - estimate_memory(0);
        live.memory.fetch_add(grown, Ordering::Relaxed);
        self.cached.fetch_add(grown, Ordering::Relaxed);
        Append {
            name: live.name.clone(),
            doc: live.doc.clone(),
            update,
            by: match origin {
                Origin::Local => None,
                Origin::Peer(peer) => Some(peer),
            },
            inflight: live.inflight.clone(),
        }
    }

    /// Map refs for every map this device has a remembered write in (taken before a transaction).
    fn watched_maps(&self, live: &LiveDoc) -> HashMap<String, yrs::MapRef> {
        let writes = live.local_writes.lock().unwrap_or_else(|p| p.into_inner());
        let names: BTreeSet<String> = writes.keys().map(|(map, _)| map.clone()).collect();
        drop(writes);
        names
            .into_iter()
            .map(|name| {
                let map = live.doc.get_or_insert_map(name.as_str());
                (name, map)
            })
            .collect()
    }

    /// A local write deleted by this remote update although the update's author did not delete
    /// it (it never saw it) lost to a concurrent write: report it.
    fn detect_conflicts(
        &self,
        live: &LiveDoc,
        txn: &TransactionMut<'_>,
        maps: &HashMap<String, yrs::MapRef>,
        remote_deletes: &yrs::IdSet,
        peer: PeerId,
    ) {
        let mut writes = live.local_writes.lock().unwrap_or_else(|p| p.into_inner());
        let gone: Vec<(String, String)> = writes
            .iter()
            .filter(|(_, w)| txn.delete_set().contains(&w.id()))
            .map(|(k, _)| k.clone())
            .collect();
        for (map_name, key) in gone {
            let Some(write) = writes.remove(&(map_name.clone(), key.clone())) else {
                continue;
            };
            if let Ok(store) = self.store() {
                let _ = store.set_local_write(&live.name, &map_name, &key, None);
            }
            if remote_deletes.contains(&write.id()) {
                continue; // overwritten by someone who had seen it: a normal later edit
            }
            let winner = maps
                .get(&map_name)
                .and_then(|m| m.get(txn, &key))
                .map(|out| any_to_json(&yrs::types::ToJson::to_json(&out, txn)))
                .unwrap_or(serde_json::Value::Null);
            tracing::info!(doc = %live.name, map = map_name, key, "concurrent writes to one key");
            let _ = self.overwrites.send(Overwrite {
                doc: live.name.to_string(),
                map: map_name,
                key,
                lost: write,
                winner_value: winner,
                winner_device: peer,
            });
        }
    }

    /// Remembers a local map write (the conflict layer reads these back as [`Overwrite`]s).
    fn remember_write(&self, live: &LiveDoc, map: &str, key: &str, write: LocalWrite) {
        if let Ok(store) = self.store() {
            if let Err(e) = store.set_local_write(&live.name, map, key, Some(&write)) {
                tracing::warn!("cannot remember a local write: {e}");
            }
        }
        live.local_writes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((map.to_string(), key.to_string()), write);
    }

    fn publish(
        &self,
        live: &LiveDoc,
        update: Bytes,
        origin: Origin,
        state: StateVector,
        client: u64,
    ) {
        let event = DocUpdate {
            doc: live.name.clone(),
            update,
            origin,
            state: Arc::new(state),
            deleted: false,
            client,
        };
        // No receivers is fine: nobody is listening right now.
        if let Some(events) = lock(&live.events).as_ref() {
            let _ = events.send(event.clone());
        }
        let _ = self.bus.send(event);
    }
}

/// Updates of at least this many bytes that integrate whole are passed on to subscribers and
/// peers as received rather than re-encoded (see [`DocRegistry::apply_update_by`]).
pub const PASS_ON_AS_RECEIVED: usize = 1 << 20;

/// A change applied in memory whose disk write may still be in flight.
#[must_use = "await `wait` to know the change is durable"]
pub struct Durable {
    doc: Arc<str>,
    ack: Option<tokio::sync::oneshot::Receiver<Result<(), StoreError>>>,
}

impl Durable {
    /// The wait for a change of `doc` applied with an acknowledgement (`None`: nothing to wait for).
    pub(crate) fn pending(
        doc: &str,
        ack: tokio::sync::oneshot::Receiver<Result<(), StoreError>>,
    ) -> Self {
        Self {
            doc: doc.into(),
            ack: Some(ack),
        }
    }

    /// Completes once the change is on disk (at once if it changed nothing).
    pub async fn wait(self) -> Result<(), DocError> {
        let Some(ack) = self.ack else { return Ok(()) };
        match ack.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(DocError::NotDurable {
                doc: self.doc.to_string(),
                source,
            }),
            Err(_) => Err(DocError::AgentStopped),
        }
    }
}

/// The unit of text offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextOffsets {
    /// UTF-8 bytes (Rust strings, the yrs default).
    Utf8,
    /// UTF-16 code units (JavaScript strings).
    Utf16,
}

/// The byte offset of UTF-16 offset `units` in `text` (clamped to its end).
fn utf16_to_byte(text: &str, units: usize) -> usize {
    let mut seen = 0;
    for (at, c) in text.char_indices() {
        if seen >= units {
            return at;
        }
        seen += c.len_utf16();
    }
    text.len()
}

/// A handle on one document of a running agent. Cheap to clone.
#[derive(Clone)]
pub struct DocHandle {
    live: Arc<LiveDoc>,
    registry: Arc<DocRegistry>,
    /// Stamped on the changes made through this handle ([`DocUpdate::client`]).
    client: u64,
}

impl DocHandle {
    pub(crate) fn new(live: Arc<LiveDoc>, registry: Arc<DocRegistry>) -> Self {
        Self {
            live,
            registry,
            client: 0,
        }
    }

    /// The same document, with changes made through the returned handle marked as made by
    /// local client `client` (an IPC or y-websocket connection).
    pub fn for_client(mut self, client: u64) -> Self {
        self.client = client;
        self
    }

    pub fn name(&self) -> &str {
        &self.live.name
    }

    /// Makes a local change in a yrs transaction. Returns once the change is durable on disk
    /// (it is pushed to connected peers right away, without waiting for the disk).
    pub async fn transact<R>(
        &self,
        f: impl FnOnce(&mut TransactionMut<'_>) -> R,
    ) -> Result<R, DocError> {
        let (result, durable) = self.transact_deferred(f);
        durable.wait().await?;
        Ok(result)
    }

    /// Makes a local change now (in call order) and returns a [`Durable`] to await the disk:
    /// lets a caller pipeline many changes and wait for them together.
    pub fn transact_deferred<R>(
        &self,
        f: impl FnOnce(&mut TransactionMut<'_>) -> R,
    ) -> (R, Durable) {
        let (result, ack) = self.registry.transact(&self.live, self.client, f);
        (result, self.durable(ack))
    }

    /// Applies a Yjs update (v1) made elsewhere by a local app; returns once it is durable.
    pub async fn apply_update(&self, update: &[u8]) -> Result<(), DocError> {
        self.apply_update_deferred(update)?.wait().await
    }

    /// Applies a Yjs update now; the [`Durable`] completes once it is on disk.
    pub fn apply_update_deferred(&self, update: &[u8]) -> Result<Durable, DocError> {
        let applied = self.registry.apply_update_by(
            &self.live.name,
            Bytes::copy_from_slice(update),
            Origin::Local,
            self.client,
            true,
        )?;
        Ok(self.durable(applied.durable))
    }

    /// Applies a Yjs update in the v2 encoding (`Y.encodeStateAsUpdateV2`) now; it is stored
    /// and sent as v1. The [`Durable`] completes once it is on disk.
    pub fn apply_update_v2_deferred(&self, update: &[u8]) -> Result<Durable, DocError> {
        let v1 = v2_to_v1(update).map_err(|reason| DocError::InvalidUpdate {
            doc: self.name().to_string(),
            reason,
        })?;
        self.apply_update_deferred(&v1)
    }

    /// Applies a Yjs update now and stores it with the writer's next batch (flushed within its
    /// lazy-flush window), without a flush of its own: for a sender that gets no
    /// acknowledgement and re-sends what the agent lacks when it reconnects (a y-websocket
    /// client, whose protocol has no acknowledgement).
    pub fn apply_update_unacked(&self, update: &[u8]) -> Result<(), DocError> {
        self.registry
            .apply_update_by(
                &self.live.name,
                Bytes::copy_from_slice(update),
                Origin::Local,
                self.client,
                false,
            )
            .map(drop)
    }

    fn durable(
        &self,
        ack: Option<tokio::sync::oneshot::Receiver<Result<(), StoreError>>>,
    ) -> Durable {
        Durable {
            doc: self.live.name.clone(),
            ack,
        }
    }

    /// Reads the document in a read transaction.
    pub fn read<R>(&self, f: impl FnOnce(&Transaction<'_>) -> R) -> R {
        f(&self.live.doc.transact())
    }

    /// Sets `map.key = value` in the root map `map`; returns once durable. A root `map` of
    /// another type is refused ([`DocError::WrongType`]) and nothing changes.
    pub async fn set_map_value(
        &self,
        map: &str,
        key: &str,
        value: impl Into<yrs::Any>,
    ) -> Result<(), DocError> {
        self.set_map_value_deferred(map, key, value)?.wait().await
    }

    /// Sets `map.key = value` now; the [`Durable`] completes once it is on disk.
    pub fn set_map_value_deferred(
        &self,
        map: &str,
        key: &str,
        value: impl Into<yrs::Any>,
    ) -> Result<Durable, DocError> {
        let value = value.into();
        let json = any_to_json(&value);
        let client = self.live.doc.client_id();
        let (clock, durable) = self.transact_deferred(|txn| {
            self.check_root(txn, map, RootKind::Map)?;
            let root = txn.get_or_insert_map(map);
            // The new map item gets the next clock of this document's client.
            let clock = txn.state_vector().get(&client);
            root.insert(txn, key, value);
            Ok::<_, DocError>(clock)
        });
        let write = LocalWrite {
            client: client.get(),
            clock: clock?,
            value: json,
        };
        self.registry.remember_write(&self.live, map, key, write);
        Ok(durable)
    }

    /// Sets `map.key` to a JSON value; returns once durable. Integers beyond ±(2^53 - 1) are
    /// refused ([`DocError::InvalidValue`]: JavaScript would read them rounded).
    pub async fn set_json(
        &self,
        map: &str,
        key: &str,
        value: &serde_json::Value,
    ) -> Result<(), DocError> {
        self.set_json_deferred(map, key, value)?.wait().await
    }

    /// [`DocHandle::set_json`] applied now, durable later.
    pub fn set_json_deferred(
        &self,
        map: &str,
        key: &str,
        value: &serde_json::Value,
    ) -> Result<Durable, DocError> {
        check_json_numbers(value).map_err(|reason| DocError::InvalidValue {
            doc: self.name().to_string(),
            reason,
        })?;
        self.set_map_value_deferred(map, key, json_to_any(value))
    }

    /// Appends `text` to the root text `name`; returns once durable. A root `name` of another
    /// type is refused ([`DocError::WrongType`]) and nothing changes.
    pub async fn append_text(&self, name: &str, text: &str) -> Result<(), DocError> {
        self.append_text_deferred(name, text)?.wait().await
    }

    /// Appends `text` now; the [`Durable`] completes once it is on disk.
    pub fn append_text_deferred(&self, name: &str, text: &str) -> Result<Durable, DocError> {
        let (checked, durable) = self.transact_deferred(|txn| {
            self.check_root(txn, name, RootKind::Text)?;
            let root = txn.get_or_insert_text(name);
            let len = root.len(txn);
            root.insert(txn, len, text);
            Ok::<_, DocError>(())
        });
        checked.map(|()| durable)
    }

    /// Edits root text `name`: deletes `delete` characters at `index` (default: the end) and
    /// inserts `insert` there. Indexes are UTF-8 byte offsets, clamped to the text and snapped to
    /// character boundaries. Returns the new length in bytes, once durable.
    pub async fn edit_text(
        &self,
        name: &str,
        index: Option<u32>,
        delete: u32,
        insert: &str,
    ) -> Result<u32, DocError> {
        let (len, durable) = self.edit_text_deferred(name, index, delete, insert)?;
        durable.wait().await?;
        Ok(len)
    }

    /// [`DocHandle::edit_text`] applied now, durable later.
    pub fn edit_text_deferred(
        &self,
        name: &str,
        index: Option<u32>,
        delete: u32,
        insert: &str,
    ) -> Result<(u32, Durable), DocError> {
        self.edit_text_in_deferred(name, index, delete, insert, TextOffsets::Utf8)
    }

    /// [`DocHandle::edit_text_deferred`] with `index`, `delete` and the returned length in
    /// `offsets` units (UTF-16 code units are what JavaScript strings index by).
    pub fn edit_text_in_deferred(
        &self,
        name: &str,
        index: Option<u32>,
        delete: u32,
        insert: &str,
        offsets: TextOffsets,
    ) -> Result<(u32, Durable), DocError> {
        let (len, durable) = self.transact_deferred(|txn| {
            self.check_root(txn, name, RootKind::Text)?;
            let root = txn.get_or_insert_text(name);
            let (index, delete) = match (offsets, index) {
                (TextOffsets::Utf16, Some(i)) => {
                    let current = root.get_string(txn);
                    let at = utf16_to_byte(&current, i as usize);
                    let end = utf16_to_byte(&current, (i as usize).saturating_add(delete as usize));
                    (Some(at as u32), (end - at) as u32)
                }
                (TextOffsets::Utf16, None) => (None, 0),
                (TextOffsets::Utf8, index) => (index, delete),
            };
            let len = Self::edit_text_in(&root, txn, index, delete, insert);
            Ok::<_, DocError>(match offsets {
                TextOffsets::Utf8 => len,
                TextOffsets::Utf16 => root.get_string(txn).encode_utf16().count() as u32,
            })
        });
        Ok((len?, durable))
    }

    /// Refuses a write of `wanted` onto root `name` when it holds another kind.
    fn check_root(
        &self,
        txn: &TransactionMut<'_>,
        name: &str,
        wanted: RootKind,
    ) -> Result<(), DocError> {
        match root_kind(txn, name) {
            Some(found) if found != wanted => Err(DocError::WrongType {
                doc: self.live.name.to_string(),
                root: name.to_string(),
                found,
                wanted,
                hint: found.hint(),
            }),
            _ => Ok(()),
        }
    }

    /// Edits `root` at a UTF-8 byte `index` (snapped to character boundaries); returns the new
    /// length in bytes.
    fn edit_text_in(
        root: &yrs::TextRef,
        txn: &mut TransactionMut<'_>,
        index: Option<u32>,
        delete: u32,
        insert: &str,
    ) -> u32 {
        // Offsets are UTF-8 bytes (the yrs default). An append needs no look at the text;
        // any other edit snaps both ends to character boundaries so it cannot split one.
        let len = root.len(txn);
        let (at, delete) = match index {
            None if delete == 0 => (len, 0),
            Some(i) if i >= len && delete == 0 => (len, 0),
            _ => {
                let current = root.get_string(txn);
                let len = current.len();
                let mut at = index.map_or(len, |i| (i as usize).min(len));
                while !current.is_char_boundary(at) {
                    at -= 1;
                }
                let mut end = at.saturating_add(delete as usize).min(len);
                while !current.is_char_boundary(end) {
                    end += 1;
                }
                (at as u32, (end - at) as u32)
            }
        };
        if delete > 0 {
            root.remove_range(txn, at, delete);
        }
        if !insert.is_empty() {
            root.insert(txn, at, insert);
        }
        root.len(txn)
    }

    /// The root text `name` as a string (empty if absent or not a text). Reading declares no
    /// type, so a root only received from others keeps whatever type it really has.
    pub fn text(&self, name: &str) -> String {
        let txn = self.live.doc.transact();
        match root_kind(&txn, name) {
            Some(RootKind::Text) => txn
                .get_text(name)
                .map(|t| t.get_string(&txn))
                .unwrap_or_default(),
            _ => String::new(),
        }
    }

    /// The underlying yrs document, to get root types (`get_or_insert_text`, ...). Make changes
    /// through [`DocHandle::transact`] so they are persisted and synced.
    pub fn yrs_doc(&self) -> &yrs::Doc {
        &self.live.doc
    }

    /// The state vector, decoded.
    pub fn state_vector_decoded(&self) -> StateVector {
        self.live.doc.transact().state_vector()
    }

    /// The state vector, Yjs v1 encoding.
    pub fn state_vector(&self) -> Vec<u8> {
        use yrs::updates::encoder::Encode;
        self.live.doc.transact().state_vector().encode_v1()
    }

    /// The whole document as one Yjs update (v1).
    pub fn encode_state(&self) -> Vec<u8> {
        self.live
            .doc
            .transact()
            .encode_state_as_update_v1(&StateVector::default())
    }

    /// What a holder of `state_vector` lacks, as one Yjs update (v1).
    pub fn diff(&self, state_vector: &[u8]) -> Result<Vec<u8>, DocError> {
        let sv =
            decode_state_vector(state_vector).map_err(|reason| DocError::InvalidStateVector {
                doc: self.name().to_string(),
                reason,
            })?;
        Ok(self.live.doc.transact().encode_diff_v1(&sv))
    }

    /// A JSON view of every root type (text as a string, maps as objects, arrays as lists).
    pub fn to_json(&self) -> serde_json::Value {
        doc_to_json(&self.live.doc)
    }

    /// The JSON value under `key` in the root map `map` (null if absent), read without
    /// converting the rest of the document.
    pub fn map_value_json(&self, map: &str, key: &str) -> serde_json::Value {
        use yrs::types::ToJson;
        use yrs::Map;
        let txn = self.live.doc.transact();
        txn.get_map(map)
            .and_then(|m| m.get(&txn, key))
            .map(|out| any_to_json(&out.to_json(&txn)))
            .unwrap_or(serde_json::Value::Null)
    }

    /// Every change to this document from now on, local and remote.
    pub fn subscribe(&self) -> broadcast::Receiver<DocUpdate> {
        lock(&self.live.events)
            .get_or_insert_with(|| broadcast::channel(DOC_EVENT_CAPACITY).0)
            .subscribe()
    }
}

/// Decodes a Yjs v1 update from outside (peer, app, disk). yrs panics on some malformed input
/// rather than returning an error; that is turned into an error here. Bytes left after the
/// update are an error too: they are what a Yjs v2 update (or any other data) looks like when read
/// as v1, which would otherwise be "applied" as an empty update and silently lost.
///
/// Values nested deeper than the limits of [`crate::nesting`] are refused before yrs (which
/// recurses over them) sees the bytes.
pub(crate) fn decode_update(bytes: &[u8]) -> Result<Update, String> {
    use yrs::updates::decoder::{Decoder, DecoderV1};
    crate::nesting::check_update_v1(bytes).map_err(|e| e.to_string())?;
    let decoded = std::panic::catch_unwind(|| {
        let mut decoder = DecoderV1::from(bytes);
        let update = Update::decode(&mut decoder)?;
        let rest = decoder.read_to_end()?.len();
        Ok::<_, yrs::encoding::read::Error>((update, rest))
    })
    .map_err(|_| "malformed update (rejected by the decoder)".to_string())?
    .map_err(|e| e.to_string())?;
    match decoded {
        (update, 0) => Ok(update),
        (_, rest) => Err(format!(
            "not a Yjs v1 update: {rest} of {} bytes left after the end (a v2 update must be sent as v2)",
            bytes.len()
        )),
    }
}

/// Decodes a Yjs v2 update (`Y.encodeStateAsUpdateV2`) and re-encodes it as v1, the encoding the
/// agent stores and sends.
///
/// The v2 layout cannot be checked for nesting before it is decoded, so it is decoded (and the
/// decoded form dropped) on a thread whose stack fits the deepest nesting its size allows; the
/// v1 form is then checked like any other update.
pub(crate) fn v2_to_v1(bytes: &[u8]) -> Result<Vec<u8>, String> {
    use yrs::updates::encoder::Encode;
    /// Largest v2 update taken: its nesting could need more stack than is reserved below.
    const MAX_V2_LEN: usize = 8 << 20;
    /// Stack reserved per input byte: one nesting level takes two bytes and under 512 bytes of
    /// stack in yrs's decoder, encoder and drop.
    const STACK_PER_BYTE: usize = 256;
    if bytes.len() > MAX_V2_LEN {
        return Err(format!(
            "a v2 update of {} bytes is over the {MAX_V2_LEN}-byte limit for v2; send it as v1",
            bytes.len()
        ));
    }
    let owned = bytes.to_vec();
    let stack = (8 << 20) + owned.len() * STACK_PER_BYTE;
    let decoded = std::thread::Builder::new()
        .name("devicelink-v2".into())
        .stack_size(stack)
        .spawn(move || {
            std::panic::catch_unwind(|| Update::decode_v2(&owned))
                .map_err(|_| "malformed v2 update (rejected by the decoder)".to_string())?
                .map_err(|e| format!("not a Yjs v2 update: {e}"))
                .map(|update| update.encode_v1())
        })
        .map_err(|e| format!("cannot decode the v2 update: {e}"))?
        .join()
        .map_err(|_| "malformed v2 update (rejected by the decoder)".to_string())??;
    crate::nesting::check_update_v1(&decoded).map_err(|e| e.to_string())?;
    Ok(decoded)
}

/// Decodes a Yjs v1 state vector from outside, like [`decode_update`].
pub(crate) fn decode_state_vector(bytes: &[u8]) -> Result<StateVector, String> {
    crate::nesting::check_state_vector_v1(bytes).map_err(|e| e.to_string())?;
    std::panic::catch_unwind(|| StateVector::decode_v1(bytes))
        .map_err(|_| "malformed state vector (rejected by the decoder)".to_string())?
        .map_err(|e| e.to_string())
}

/// The highest clock of each client in `update`: whoever made it holds at least this (a device's
/// clocks per client are contiguous). Unlike `Update::state_vector`, also right for deltas.
pub(crate) fn upper_state_vector(update: &Update) -> StateVector {
    let mut sv = StateVector::default();
    for (client, ranges) in update.insertions(true).iter() {
        for range in ranges.iter() {
            sv.set_max(*client, range.end);
        }
    }
    sv
}

/// What a root of a document holds. A root's type is fixed by the first device that uses it;
/// writing it as another type would hide its content from every view (Yjs reads a root as one
/// type), so writes check it first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootKind {
    Map,
    Text,
    Array,
    Xml,
}

impl std::fmt::Display for RootKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RootKind::Map => "map",
            RootKind::Text => "text",
            RootKind::Array => "array",
            RootKind::Xml => "XML fragment",
        })
    }
}

impl RootKind {
    /// The command that writes this kind, for error messages.
    fn hint(self) -> &'static str {
        match self {
            RootKind::Map => "`doc set` (IPC doc_set)",
            RootKind::Text => "`doc text` (IPC doc_text)",
            RootKind::Array | RootKind::Xml => "a Yjs update (IPC doc_apply)",
        }
    }
}

/// The kind of root `name`: its declared type, or for a root only received from others (no
/// declared type yet) what its content shows; `None` when it does not exist or holds nothing.
pub fn root_kind<T: ReadTxn>(txn: &T, name: &str) -> Option<RootKind> {
    let (_, out) = txn.root_refs().find(|(n, _)| *n == name)?;
    match out {
        yrs::Out::YMap(_) => Some(RootKind::Map),
        yrs::Out::YText(_) => Some(RootKind::Text),
        yrs::Out::YArray(_) => Some(RootKind::Array),
        yrs::Out::YXmlElement(_) | yrs::Out::YXmlFragment(_) | yrs::Out::YXmlText(_) => {
            Some(RootKind::Xml)
        }
        _ => {
            if txn.get_map(name).is_some_and(|m| m.len(txn) > 0) {
                Some(RootKind::Map)
            } else if txn
                .get_text(name)
                .is_some_and(|t| !t.get_string(txn).is_empty())
            {
                Some(RootKind::Text)
            } else if txn.get_array(name).is_some_and(|a| a.len(txn) > 0) {
                Some(RootKind::Array)
            } else {
                None
            }
        }
    }
}

/// JSON view of a document. Root types this device has not used yet have no declared type;
/// they are shown as a map if they have keys, else as text if they hold text, else as an array.
/// Empty roots are left out: whether a root was declared is not stored, so an emptied text would
/// otherwise read `""` before a restart and `null` after.
pub fn doc_to_json(doc: &yrs::Doc) -> serde_json::Value {
    let txn = doc.transact();
    let names: Vec<Arc<str>> = txn.root_refs().map(|(name, _)| Arc::from(name)).collect();
    let mut out = serde_json::Map::new();
    for name in names {
        let value = match txn.root_refs().find(|(n, _)| **n == *name).map(|(_, v)| v) {
            Some(yrs::Out::UndefinedRef(_)) => infer_root_json(&txn, &name),
            Some(out) => any_to_json(&yrs::types::ToJson::to_json(&out, &txn)),
            None => continue,
        };
        let empty = match &value {
            serde_json::Value::Null => true,
            serde_json::Value::String(s) => s.is_empty(),
            serde_json::Value::Array(a) => a.is_empty(),
            serde_json::Value::Object(o) => o.is_empty(),
            _ => false,
        };
        if !empty {
            out.insert(name.to_string(), value);
        }
    }
    serde_json::Value::Object(out)
}

fn infer_root_json(txn: &Transaction<'_>, name: &Arc<str>) -> serde_json::Value {
    use yrs::types::ToJson;
    if let Some(map) = txn.get_map(name.clone()) {
        if map.len(txn) > 0 {
            return any_to_json(&map.to_json(txn));
        }
    }
    if let Some(text) = txn.get_text(name.clone()) {
        let s = text.get_string(txn);
        if !s.is_empty() {
            return serde_json::Value::String(s);
        }
    }
    match txn.get_array(name.clone()) {
        Some(array) if array.len(txn) > 0 => any_to_json(&array.to_json(txn)),
        _ => serde_json::Value::Null,
    }
}

/// Converts a yrs `Any` to JSON (binary as an array of bytes, undefined as null).
pub fn any_to_json(any: &yrs::Any) -> serde_json::Value {
    use serde_json::Value;
    match any {
        yrs::Any::Null | yrs::Any::Undefined => Value::Null,
        yrs::Any::Bool(b) => Value::Bool(*b),
        yrs::Any::Number(yrs::any::Number::Int(n)) => Value::from(*n),
        // A whole number is shown as an integer whichever way it was encoded (Yjs encodes
        // integers beyond 2^31 as floats), so it reads the same before and after a reload.
        yrs::Any::Number(yrs::any::Number::Float(n))
            if n.fract() == 0.0 && n.abs() <= MAX_SAFE_INTEGER as f64 =>
        {
            Value::from(*n as i64)
        }
        yrs::Any::Number(yrs::any::Number::Float(n)) => serde_json::Number::from_f64(*n)
            .map(Value::Number)
            .unwrap_or(Value::Null),
        yrs::Any::String(s) => Value::String(s.to_string()),
        yrs::Any::Buffer(b) => Value::Array(b.iter().map(|x| Value::from(*x)).collect()),
        yrs::Any::Array(items) => Value::Array(items.iter().map(any_to_json).collect()),
        yrs::Any::Map(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), any_to_json(v)))
                .collect(),
        ),
    }
}

/// Converts JSON to a yrs `Any` (integers stay integers, other numbers are floats).
/// The largest integer a Yjs document stores exactly (JavaScript's `Number.MAX_SAFE_INTEGER`):
/// larger ones are encoded as floats and read back rounded.
pub const MAX_SAFE_INTEGER: i64 = (1 << 53) - 1;

/// Checks that every number in `value` is stored as sent: integers beyond ±(2^53 - 1) would
/// silently become rounded floats.
pub fn check_json_numbers(value: &serde_json::Value) -> Result<(), String> {
    use serde_json::Value;
    match value {
        Value::Number(n)
            if (n.is_u64() || n.is_i64())
                && !n
                    .as_i64()
                    .is_some_and(|i| (-MAX_SAFE_INTEGER..=MAX_SAFE_INTEGER).contains(&i)) =>
        {
            Err(format!(
                "the integer {n} is out of range: documents store integers up to ±(2^53 - 1) exactly, like JavaScript (send larger ones as strings)"
            ))
        }
        Value::Array(items) => items.iter().try_for_each(check_json_numbers),
        Value::Object(map) => map.values().try_for_each(check_json_numbers),
        _ => Ok(()),
    }
}

pub fn json_to_any(value: &serde_json::Value) -> yrs::Any {
    use serde_json::Value;
    match value {
        Value::Null => yrs::Any::Null,
        Value::Bool(b) => yrs::Any::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => yrs::Any::Number(yrs::any::Number::Int(i)),
            None => yrs::Any::Number(yrs::any::Number::Float(n.as_f64().unwrap_or(0.0))),
        },
        Value::String(s) => yrs::Any::String(Arc::from(s.as_str())),
        Value::Array(items) => yrs::Any::Array(items.iter().map(json_to_any).collect()),
        Value::Object(map) => yrs::Any::Map(Arc::new(
            map.iter()
                .map(|(k, v)| (k.clone(), json_to_any(v)))
                .collect(),
        )),
    }
}
