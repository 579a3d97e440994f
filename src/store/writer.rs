//! The group-commit writer: the one place document updates are written to disk.
//!
//! Callers hand updates over a channel; a dedicated thread drains everything queued, appends it to
//! the per-document logs, makes the whole batch durable with one flush, and only then completes the
//! callers' acknowledgements. Many small writes share a single fsync, and a document's updates in
//! one batch share a single log record. Batches nobody waits on (updates received from peers)
//! are flushed at most [`LAZY_FLUSH`] later. After a flush it compacts any document whose log has
//! grown past the [`CompactionPolicy`].

use std::collections::HashMap;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::oneshot;
use yrs::{ReadTxn, StateVector, Transact};

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

enum WriteOp {
    Append {
        name: Arc<str>,
        doc: yrs::Doc,
        update: Bytes,
        ack: Option<Ack>,
    },
    Flush(Ack),
    Shutdown(Ack),
}

/// Sends work to the writer thread. Cheap to clone.
#[derive(Clone)]
pub(crate) struct WriterHandle {
    tx: mpsc::Sender<WriteOp>,
}

impl WriterHandle {
    /// Queues an update; the returned receiver completes once it is durable.
    pub fn append(
        &self,
        name: Arc<str>,
        doc: yrs::Doc,
        update: Bytes,
    ) -> oneshot::Receiver<Result<(), StoreError>> {
        let (ack, rx) = oneshot::channel();
        // If the writer is gone, `ack` is dropped and the receiver reports it as closed.
        let _ = self.tx.send(WriteOp::Append {
            name,
            doc,
            update,
            ack: Some(ack),
        });
        rx
    }

    /// Queues an update whose durability nobody waits for (remote updates: the peer still has it).
    pub fn append_unacked(&self, name: Arc<str>, doc: yrs::Doc, update: Bytes) {
        let _ = self.tx.send(WriteOp::Append {
            name,
            doc,
            update,
            ack: None,
        });
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
    let thread = std::thread::Builder::new()
        .name("devicelink-writer".into())
        .spawn(move || Writer::new(store, policy).run(rx))?;
    Ok((WriterHandle { tx }, thread))
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
    updates: Vec<Bytes>,
    bytes: usize,
    /// The first error writing any of this document's records in this batch.
    result: Result<(), StoreError>,
}

struct DocLog {
    tree: sled::Tree,
    last_seq: u64,
    updates: u64,
    bytes: u64,
    snapshot_len: u64,
    doc: yrs::Doc,
}

struct Writer {
    store: DocStore,
    policy: CompactionPolicy,
    logs: HashMap<Arc<str>, DocLog>,
    /// When the oldest write not yet flushed was made (`None`: everything is flushed).
    unflushed_since: Option<Instant>,
    flusher: Flusher,
}

impl Writer {
    fn new(store: DocStore, policy: CompactionPolicy) -> Self {
        Self {
            flusher: Flusher::new(store.clone()),
            store,
            policy,
            logs: HashMap::new(),
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
    /// commit costs one sled insert per document however many small changes it carries.
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
                WriteOp::Append {
                    name,
                    doc,
                    update,
                    ack,
                } => {
                    let slot = match pending.iter().position(|p| p.name == name) {
                        Some(i) => i,
                        None => {
                            pending.push(PendingRecord {
                                name: name.clone(),
                                doc,
                                updates: Vec::new(),
                                bytes: 0,
                                result: Ok(()),
                            });
                            pending.len() - 1
                        }
                    };
                    let record = &mut pending[slot];
                    record.bytes += update.len();
                    record.updates.push(update);
                    if record.bytes >= MAX_RECORD_BYTES {
                        self.write_record(record);
                    }
                    if let Some(ack) = ack {
                        acks.push((ack, Some(name)));
                    }
                }
                WriteOp::Flush(ack) => acks.push((ack, None)),
                WriteOp::Shutdown(ack) => {
                    acks.push((ack, None));
                    shutdown = true;
                }
            }
        }
        for record in &mut pending {
            self.write_record(record);
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

    /// Writes out what `record` holds as one log record, keeping the first error.
    fn write_record(&mut self, record: &mut PendingRecord) {
        if record.updates.is_empty() {
            return;
        }
        let updates = std::mem::take(&mut record.updates);
        record.bytes = 0;
        let result = self.append(&record.name, &record.doc, &updates);
        if record.result.is_ok() {
            record.result = result;
        }
    }

    /// Makes everything written durable; on success nothing is left unflushed.
    fn flush(&mut self) -> Result<(), StoreError> {
        let flushed = self.flusher.flush();
        if flushed.is_ok() {
            self.unflushed_since = None;
        }
        flushed
    }

    /// Completes every acknowledgement of `batch` with `error`. Returns true on shutdown.
    fn fail_batch(&mut self, batch: &mut Vec<WriteOp>, error: StoreError) -> bool {
        let mut shutdown = false;
        for op in batch.drain(..) {
            let ack = match op {
                WriteOp::Append { ack, .. } => ack,
                WriteOp::Flush(ack) => Some(ack),
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

    /// Appends `updates` of `name` as one log record.
    fn append(
        &mut self,
        name: &Arc<str>,
        doc: &yrs::Doc,
        updates: &[Bytes],
    ) -> Result<(), StoreError> {
        let log = match self.logs.get_mut(name) {
            Some(log) => log,
            None => {
                self.store.register(name)?;
                let tree = self.store.log_tree(name)?;
                let last_seq = self.store.last_seq(name, &tree)?;
                let updates = tree.len() as u64; // at least one update per record
                self.logs.entry(name.clone()).or_insert(DocLog {
                    tree,
                    last_seq,
                    updates,
                    bytes: 0,
                    snapshot_len: 0,
                    doc: doc.clone(),
                })
            }
        };
        let seq = log.last_seq + 1;
        DocStore::append(&log.tree, seq, updates)?;
        log.last_seq = seq;
        log.updates += updates.len() as u64;
        log.bytes += updates.iter().map(|u| u.len() as u64).sum::<u64>();
        Ok(())
    }

    fn flush_and_compact(&mut self) {
        match self.flush() {
            Ok(()) => self.compact_grown_logs(),
            // `unflushed_since` stays set: the next timeout retries.
            Err(e) => tracing::error!("flush failed: {e}"),
        }
    }

    fn compact_grown_logs(&mut self) {
        let policy = self.policy;
        for (name, log) in self.logs.iter_mut() {
            let too_many = log.updates >= policy.max_log_records;
            let too_big = log.bytes >= policy.min_log_bytes.max(log.snapshot_len);
            if !(too_many || too_big) {
                continue;
            }
            // The live doc holds at least everything appended so far (it is updated before the
            // update is queued here), so its state covers the whole log up to `last_seq`.
            let state = log
                .doc
                .transact()
                .encode_state_as_update_v1(&StateVector::default());
            match self.store.compact(name, &log.tree, log.last_seq, &state) {
                Ok(()) => {
                    tracing::debug!(doc = %name, updates = log.updates, "compacted log");
                    log.updates = 0;
                    log.bytes = 0;
                    log.snapshot_len = state.len() as u64;
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
