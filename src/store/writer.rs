//! The group-commit writer: the one place document updates are written to disk.
//!
//! Callers hand updates over a channel; a dedicated thread drains everything queued, appends it to
//! the per-document logs, makes the whole batch durable with one flush, and only then completes the
//! callers' acknowledgements. Many small writes share a single fsync, and a document's updates in
//! one batch share a single log record. Batches nobody waits on (updates received from peers)
//! are flushed at most [`LAZY_FLUSH`] later. After a flush it compacts any document whose log has
//! grown past the [`CompactionPolicy`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::oneshot;
use yrs::{ReadTxn, StateVector, Transact};

use super::docs::DocMeta;
use super::{DocStore, StoreError};

/// When a document's log is folded into its snapshot.
#[derive(Debug, Clone, Copy)]
pub struct CompactionPolicy {
    /// Compact once the log holds this many updates.
    pub max_log_records: u64,
    /// ... or once the log holds this many bytes and more than the last snapshot's size.
    pub min_log_bytes: u64,
}

impl Default for CompactionPolicy {
    fn default() -> Self {
        Self {
            max_log_records: 10_000,
            min_log_bytes: 8 << 20,
        }
    }
}

pub(crate) type Ack = oneshot::Sender<Result<(), StoreError>>;

/// One update to append.
pub(crate) struct Append {
    pub name: Arc<str>,
    /// The live document, to compact from once its log has grown.
    pub doc: yrs::Doc,
    pub update: Bytes,
    /// The device it came from (`None`: this device).
    pub by: Option<libp2p::PeerId>,
    /// Counts this document's updates queued but not yet written; decremented once written
    /// (readable by a later load), so the document may leave memory only at zero.
    pub inflight: Arc<AtomicUsize>,
}

enum WriteOp {
    Append(Append, Option<Ack>),
    Checkpoint {
        peer: Vec<u8>,
        epoch: u64,
        change: u64,
    },
    Purge(Arc<str>, Ack),
    Flush(Ack),
    Shutdown(Ack),
}

/// Sends work to the writer thread. Cheap to clone.
#[derive(Clone)]
pub(crate) struct WriterHandle {
    tx: mpsc::Sender<WriteOp>,
    durable_head: Arc<AtomicU64>,
}

impl WriterHandle {
    /// Queues an update; the returned receiver completes once it is durable.
    pub fn append(&self, append: Append) -> oneshot::Receiver<Result<(), StoreError>> {
        let (ack, rx) = oneshot::channel();
        append.inflight.fetch_add(1, Ordering::SeqCst);
        // If the writer is gone, `ack` is dropped and the receiver reports it as closed.
        let _ = self.tx.send(WriteOp::Append(append, Some(ack)));
        rx
    }

    /// Queues an update whose durability nobody waits for (remote updates: the peer still has it).
    pub fn append_unacked(&self, append: Append) {
        append.inflight.fetch_add(1, Ordering::SeqCst);
        let _ = self.tx.send(WriteOp::Append(append, None));
    }

    /// Records how far of `peer`'s feed this device holds, after every update queued before it.
    pub fn checkpoint(&self, peer: Vec<u8>, epoch: u64, change: u64) {
        let _ = self.tx.send(WriteOp::Checkpoint {
            peer,
            epoch,
            change,
        });
    }

    /// Removes a document's records, after every update queued before it; durable on return.
    pub async fn purge(&self, name: Arc<str>) -> Result<(), StoreError> {
        let (ack, rx) = oneshot::channel();
        self.tx
            .send(WriteOp::Purge(name, ack))
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// The change feed's last durable change number: every change up to it is on disk.
    pub fn durable_head(&self) -> u64 {
        self.durable_head.load(Ordering::SeqCst)
    }

    pub async fn flush(&self) -> Result<(), StoreError> {
        let (ack, rx) = oneshot::channel();
        self.tx
            .send(WriteOp::Flush(ack))
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Flushes everything queued so far and stops the writer thread.
    pub async fn shutdown(&self) -> Result<(), StoreError> {
        let (ack, rx) = oneshot::channel();
        self.tx
            .send(WriteOp::Shutdown(ack))
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }
}

/// Starts the writer thread over `store`.
pub(crate) fn spawn(
    store: DocStore,
    policy: CompactionPolicy,
) -> std::io::Result<(WriterHandle, JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel();
    let head = store
        .feed_head()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let durable_head = Arc::new(AtomicU64::new(head));
    let writer = Writer::new(store, policy, head, durable_head.clone());
    let thread = std::thread::Builder::new()
        .name("devicelink-writer".into())
        .spawn(move || writer.run(rx))?;
    Ok((WriterHandle { tx, durable_head }, thread))
}

/// Most operations folded into one flush.
const MAX_BATCH: usize = 8192;

/// Longest a flush may take before the writes waiting on it are told they failed. sled can
/// wait forever on a flush after an I/O error (a full disk); apps must get an answer.
const FLUSH_STALL: Duration = Duration::from_secs(5);

/// Runs sled flushes on a thread of its own, so a flush that never returns stalls no caller
/// longer than [`FLUSH_STALL`].
struct Flusher {
    /// How long a flush may take (`FLUSH_STALL`; shorter in tests).
    stall: Duration,
    requests: Option<mpsc::Sender<()>>,
    results: mpsc::Receiver<Result<(), StoreError>>,
    thread: Option<JoinHandle<()>>,
    /// A flush was requested and its result not yet received.
    outstanding: bool,
}

impl Flusher {
    fn new(store: DocStore) -> Self {
        Self::with(FLUSH_STALL, move || store.flush())
    }

    /// A flusher running `flush` on its thread, allowing it `stall` per call.
    fn with(
        stall: Duration,
        mut flush: impl FnMut() -> Result<(), StoreError> + Send + 'static,
    ) -> Self {
        let (requests, requests_rx) = mpsc::channel::<()>();
        let (results_tx, results) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("devicelink-flush".into())
            .spawn(move || {
                while requests_rx.recv().is_ok() {
                    if results_tx.send(flush()).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| tracing::error!("cannot start the flush thread: {e}"))
            .ok();
        Self {
            stall,
            requests: Some(requests),
            results,
            thread,
            outstanding: false,
        }
    }

    /// Whether an earlier flush is still stuck (collecting its result if it has come since).
    fn stalled(&mut self) -> bool {
        if self.outstanding && self.results.try_recv().is_ok() {
            self.outstanding = false;
        }
        self.outstanding
    }

    /// Makes everything written so far durable, or says why not within the stall limit.
    fn flush(&mut self) -> Result<(), StoreError> {
        if self.stalled() {
            return Err(StoreError::Stalled(self.stall));
        }
        let requests = self.requests.as_ref().ok_or(StoreError::Closed)?;
        requests.send(()).map_err(|_| StoreError::Closed)?;
        self.outstanding = true;
        match self.results.recv_timeout(self.stall) {
            Ok(result) => {
                self.outstanding = false;
                result
            }
            Err(RecvTimeoutError::Timeout) => {
                tracing::error!(
                    "a flush did not finish within {:?}; failing writes until it does",
                    self.stall
                );
                Err(StoreError::Stalled(self.stall))
            }
            Err(RecvTimeoutError::Disconnected) => Err(StoreError::Closed),
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        // Ends the thread, and with it its handle on the database (a restart in the same
        // process needs the database lock back). A stuck thread is left behind.
        self.requests = None;
        if let Some(thread) = self.thread.take() {
            if !self.outstanding {
                let _ = thread.join();
            }
        }
    }
}

/// Longest a write nobody waits for stays unflushed.
const LAZY_FLUSH: Duration = Duration::from_millis(50);

/// A log record past this size is written out and the document's next updates start another.
const MAX_RECORD_BYTES: usize = 1 << 20;

/// The updates of one document in the batch being committed.
struct PendingRecord {
    name: Arc<str>,
    doc: yrs::Doc,
    /// Who made the last of these updates (`None`: this device).
    by: Option<libp2p::PeerId>,
    updates: Vec<Bytes>,
    /// One count per update, released once written.
    inflight: Vec<Arc<AtomicUsize>>,
    bytes: usize,
    /// The first error writing any of this document's records in this batch.
    result: Result<(), StoreError>,
}

/// Most document metadata kept cached by the writer (it is re-read from sled past this).
const META_CACHE: usize = 4096;

struct Writer {
    store: DocStore,
    policy: CompactionPolicy,
    /// Metadata of recently written documents (the writer is their only writer).
    metas: HashMap<Arc<str>, DocMeta>,
    /// The last change number handed out.
    head: u64,
    /// The last change number known durable (shared with sessions).
    durable_head: Arc<AtomicU64>,
    /// Documents whose log has grown past the policy, compacted after the next flush.
    to_compact: HashMap<Arc<str>, yrs::Doc>,
    /// When the oldest write not yet flushed was made (`None`: everything is flushed).
    unflushed_since: Option<Instant>,
    flusher: Flusher,
}

impl Writer {
    fn new(
        store: DocStore,
        policy: CompactionPolicy,
        head: u64,
        durable_head: Arc<AtomicU64>,
    ) -> Self {
        Self {
            flusher: Flusher::new(store.clone()),
            store,
            policy,
            metas: HashMap::new(),
            head,
            durable_head,
            to_compact: HashMap::new(),
            unflushed_since: None,
        }
    }

    fn run(mut self, rx: mpsc::Receiver<WriteOp>) {
        let mut batch = Vec::with_capacity(64);
        loop {
            // Written but not yet flushed (only unacknowledged updates): flush when it is due.
            let first = match self.unflushed_since {
                None => match rx.recv() {
                    Ok(op) => op,
                    Err(_) => break,
                },
                Some(since) => match rx.recv_timeout(LAZY_FLUSH.saturating_sub(since.elapsed())) {
                    Ok(op) => op,
                    Err(RecvTimeoutError::Timeout) => {
                        self.flush_and_compact();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                },
            };
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            if self.commit(&mut batch) {
                return;
            }
        }
        // Every sender is gone: make whatever was written durable.
        if let Err(e) = self.flush() {
            tracing::error!("final flush failed: {e}");
        }
    }

    /// Writes and flushes one batch, then completes its acknowledgements. Returns true on shutdown.
    ///
    /// The updates of one document in the batch go into a single log record (in order), so a
    /// commit costs a few sled inserts per document however many small changes it carries.
    /// Checkpoints and purges are applied in queue order relative to the updates around them.
    fn commit(&mut self, batch: &mut Vec<WriteOp>) -> bool {
        if self.flusher.stalled() {
            // Writing on would only queue behind the stuck flush (sled may block the writer).
            // The changes stay in memory; nobody is told they are saved.
            return self.fail_batch(batch, StoreError::Stalled(self.flusher.stall));
        }
        let mut acks: Vec<(Ack, Option<Arc<str>>)> = Vec::with_capacity(batch.len());
        let mut pending: Vec<PendingRecord> = Vec::new();
        let mut shutdown = false;
        for op in batch.drain(..) {
            match op {
                WriteOp::Append(append, ack) => {
                    let slot = match pending.iter().position(|p| p.name == append.name) {
                        Some(i) => i,
                        None => {
                            pending.push(PendingRecord {
                                name: append.name.clone(),
                                doc: append.doc,
                                by: None,
                                updates: Vec::new(),
                                inflight: Vec::new(),
                                bytes: 0,
                                result: Ok(()),
                            });
                            pending.len() - 1
                        }
                    };
                    let record = &mut pending[slot];
                    record.bytes += append.update.len();
                    record.updates.push(append.update);
                    record.inflight.push(append.inflight);
                    record.by = append.by;
                    if record.bytes >= MAX_RECORD_BYTES {
                        self.write_record(record);
                    }
                    if let Some(ack) = ack {
                        acks.push((ack, Some(append.name)));
                    }
                }
                WriteOp::Checkpoint {
                    peer,
                    epoch,
                    change,
                } => {
                    // Everything queued before it is written first.
                    self.write_all(&mut pending);
                    if let Err(e) = self.store.set_checkpoint(&peer, epoch, change) {
                        tracing::error!("cannot record a sync checkpoint: {e}");
                    }
                }
                WriteOp::Purge(name, ack) => {
                    self.write_all(&mut pending);
                    self.metas.remove(&name);
                    self.to_compact.remove(&name);
                    let purged = self.store.purge(&name).map(|_| ());
                    match purged {
                        Ok(()) => acks.push((ack, None)),
                        Err(e) => {
                            let _ = ack.send(Err(e));
                        }
                    }
                }
                WriteOp::Flush(ack) => acks.push((ack, None)),
                WriteOp::Shutdown(ack) => {
                    acks.push((ack, None));
                    shutdown = true;
                }
            }
        }
        self.write_all(&mut pending);
        for record in &pending {
            if let Err(e) = &record.result {
                tracing::error!(doc = %record.name, "could not store updates: {e}");
            }
        }
        // Nobody waits on a batch of remote updates alone (their senders still hold them):
        // such batches share a flush at most LAZY_FLUSH later, so streaming them in costs
        // few fsyncs.
        let lazy = acks.is_empty()
            && !shutdown
            && self
                .unflushed_since
                .is_none_or(|since| since.elapsed() < LAZY_FLUSH);
        if lazy {
            self.unflushed_since.get_or_insert_with(Instant::now);
            return false;
        }
        let flushed = self.flush();
        for (ack, doc) in acks {
            let result = match (&flushed, doc) {
                (Err(e), _) => Err(e.clone()),
                (Ok(()), None) => Ok(()),
                (Ok(()), Some(doc)) => pending
                    .iter()
                    .find(|p| p.name == doc)
                    .map_or(Ok(()), |p| p.result.clone()),
            };
            let _ = ack.send(result);
        }
        if flushed.is_ok() && !shutdown {
            self.compact_grown_logs();
        }
        shutdown
    }

    /// Writes out every pending record (in order) that still holds updates.
    fn write_all(&mut self, pending: &mut [PendingRecord]) {
        for record in pending.iter_mut() {
            self.write_record(record);
        }
    }

    /// Writes out what `record` holds as one log record, keeping the first error, and releases
    /// its in-flight counts (written or failed, a later load sees what is on disk).
    fn write_record(&mut self, record: &mut PendingRecord) {
        if record.updates.is_empty() {
            return;
        }
        let updates = std::mem::take(&mut record.updates);
        record.bytes = 0;
        let result = self.append(record, &updates);
        for count in record.inflight.drain(..) {
            count.fetch_sub(1, Ordering::SeqCst);
        }
        if record.result.is_ok() {
            record.result = result;
        }
    }

    /// Makes everything written durable; on success nothing is left unflushed.
    fn flush(&mut self) -> Result<(), StoreError> {
        let flushed = self.flusher.flush();
        if flushed.is_ok() {
            self.unflushed_since = None;
            self.durable_head.store(self.head, Ordering::SeqCst);
        }
        flushed
    }

    /// Completes every acknowledgement of `batch` with `error`. Returns true on shutdown.
    fn fail_batch(&mut self, batch: &mut Vec<WriteOp>, error: StoreError) -> bool {
        let mut shutdown = false;
        for op in batch.drain(..) {
            let ack = match op {
                WriteOp::Append(append, ack) => {
                    append.inflight.fetch_sub(1, Ordering::SeqCst);
                    ack
                }
                WriteOp::Checkpoint { .. } => None,
                WriteOp::Purge(_, ack) | WriteOp::Flush(ack) => Some(ack),
                WriteOp::Shutdown(ack) => {
                    shutdown = true;
                    Some(ack)
                }
            };
            if let Some(ack) = ack {
                let _ = ack.send(Err(error.clone()));
            }
        }
        shutdown
    }

    /// Appends `updates` of `record`'s document as one log record, as the next change.
    fn append(&mut self, record: &PendingRecord, updates: &[Bytes]) -> Result<(), StoreError> {
        let name = &record.name;
        let mut meta = match self.metas.remove(name) {
            Some(meta) => meta,
            None => {
                DocStore::validate_name(name)?;
                match self.store.meta(name)? {
                    Some(meta) => meta,
                    None => self.store.new_meta()?,
                }
            }
        };
        let change = self.head + 1;
        let by = record.by.map(|peer| peer.to_string());
        let result = self
            .store
            .append(name, &mut meta, change, updates, by.as_deref());
        if result.is_ok() {
            self.head = change;
            let policy = self.policy;
            let too_many = meta.log_updates >= policy.max_log_records;
            let too_big = meta.log_bytes >= policy.min_log_bytes.max(meta.snapshot_len);
            if too_many || too_big {
                self.to_compact.insert(name.clone(), record.doc.clone());
            }
        }
        if self.metas.len() >= META_CACHE {
            self.metas.clear();
        }
        // On error the cached copy may be ahead of the disk: re-read it next time.
        if result.is_ok() {
            self.metas.insert(name.clone(), meta);
        }
        result
    }

    fn flush_and_compact(&mut self) {
        match self.flush() {
            Ok(()) => self.compact_grown_logs(),
            // `unflushed_since` stays set: the next timeout retries.
            Err(e) => tracing::error!("flush failed: {e}"),
        }
    }

    fn compact_grown_logs(&mut self) {
        for (name, doc) in std::mem::take(&mut self.to_compact) {
            let mut meta = match self.metas.remove(&name) {
                Some(meta) => meta,
                None => match self.store.meta(&name) {
                    Ok(Some(meta)) => meta,
                    _ => continue,
                },
            };
            // The live doc holds at least everything appended so far (it is updated before the
            // update is queued here), so its state covers the whole log up to `last_seq`.
            let state = doc
                .transact()
                .encode_state_as_update_v1(&StateVector::default());
            match self.store.compact(&name, &mut meta, &state) {
                Ok(()) => {
                    tracing::debug!(doc = %name, "compacted log");
                    self.metas.insert(name, meta);
                }
                Err(e) => tracing::error!(doc = %name, "compaction failed: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flush that hangs (as sled's can after a disk-full error) fails its caller after the
    /// stall limit, fails later flushes at once while it hangs, and normal service resumes once
    /// it returns.
    #[test]
    fn a_stuck_flush_fails_callers_in_time_and_service_resumes() {
        let (release, hang) = mpsc::channel::<()>();
        let mut calls = 0;
        let mut flusher = Flusher::with(Duration::from_millis(50), move || {
            calls += 1;
            if calls == 1 {
                let _ = hang.recv(); // stuck until released
            }
            Ok(())
        });
        let started = Instant::now();
        assert!(matches!(flusher.flush(), Err(StoreError::Stalled(_))));
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(flusher.stalled());
        assert!(matches!(flusher.flush(), Err(StoreError::Stalled(_))));
        release.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while flusher.stalled() {
            assert!(
                Instant::now() < deadline,
                "the released flush never reported back"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(flusher.flush().is_ok());
    }

    #[test]
    fn a_failed_flush_reports_its_error() {
        let mut flusher = Flusher::with(Duration::from_secs(5), || Err(StoreError::Closed));
        assert!(matches!(flusher.flush(), Err(StoreError::Closed)));
        assert!(!flusher.stalled());
    }
}
