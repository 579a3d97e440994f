//! The group-commit writer: the one place document updates are written to disk.
//!
//! Callers hand updates over a channel; a dedicated thread drains everything queued, appends it to
//! the per-document logs, makes the whole batch durable with one flush, and only then completes the
//! callers' acknowledgements. Many small writes share a single fsync. After a flush it compacts any
//! document whose log has grown past the [`CompactionPolicy`].

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use yrs::{ReadTxn, StateVector, Transact};

use super::{DocStore, StoreError};

/// When a document's log is folded into its snapshot.
#[derive(Debug, Clone, Copy)]
pub struct CompactionPolicy {
    /// Compact once the log holds this many records.
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
    tx: mpsc::UnboundedSender<WriteOp>,
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
    let (tx, rx) = mpsc::unbounded_channel();
    let thread = std::thread::Builder::new()
        .name("devicelink-writer".into())
        .spawn(move || Writer::new(store, policy).run(rx))?;
    Ok((WriterHandle { tx }, thread))
}

/// Most operations folded into one flush.
const MAX_BATCH: usize = 8192;

struct DocLog {
    tree: sled::Tree,
    last_seq: u64,
    records: u64,
    bytes: u64,
    snapshot_len: u64,
    doc: yrs::Doc,
}

struct Writer {
    store: DocStore,
    policy: CompactionPolicy,
    logs: HashMap<Arc<str>, DocLog>,
}

impl Writer {
    fn new(store: DocStore, policy: CompactionPolicy) -> Self {
        Self {
            store,
            policy,
            logs: HashMap::new(),
        }
    }

    fn run(mut self, mut rx: mpsc::UnboundedReceiver<WriteOp>) {
        let mut batch = Vec::with_capacity(64);
        while let Some(first) = rx.blocking_recv() {
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
        if let Err(e) = self.store.flush() {
            tracing::error!("final flush failed: {e}");
        }
    }

    /// Writes and flushes one batch, then completes its acknowledgements. Returns true on shutdown.
    fn commit(&mut self, batch: &mut Vec<WriteOp>) -> bool {
        let mut acks: Vec<(Ack, Result<(), StoreError>)> = Vec::with_capacity(batch.len());
        let mut shutdown = false;
        for op in batch.drain(..) {
            match op {
                WriteOp::Append {
                    name,
                    doc,
                    update,
                    ack,
                } => {
                    let result = self.append(name, doc, &update);
                    if let Err(e) = &result {
                        tracing::error!("could not store an update: {e}");
                    }
                    if let Some(ack) = ack {
                        acks.push((ack, result));
                    }
                }
                WriteOp::Flush(ack) => acks.push((ack, Ok(()))),
                WriteOp::Shutdown(ack) => {
                    acks.push((ack, Ok(())));
                    shutdown = true;
                }
            }
        }
        let flushed = self.store.flush();
        for (ack, result) in acks {
            let result = match (&flushed, result) {
                (Err(e), _) => Err(e.clone()),
                (Ok(()), r) => r,
            };
            let _ = ack.send(result);
        }
        if flushed.is_ok() && !shutdown {
            self.compact_grown_logs();
        }
        shutdown
    }

    fn append(&mut self, name: Arc<str>, doc: yrs::Doc, update: &[u8]) -> Result<(), StoreError> {
        let log = match self.logs.get_mut(&name) {
            Some(log) => log,
            None => {
                self.store.register(&name)?;
                let tree = self.store.log_tree(&name)?;
                let last_seq = self.store.last_seq(&name, &tree)?;
                let records = tree.len() as u64;
                self.logs.entry(name.clone()).or_insert(DocLog {
                    tree,
                    last_seq,
                    records,
                    bytes: 0,
                    snapshot_len: 0,
                    doc,
                })
            }
        };
        let seq = log.last_seq + 1;
        DocStore::append(&log.tree, seq, update)?;
        log.last_seq = seq;
        log.records += 1;
        log.bytes += update.len() as u64;
        Ok(())
    }

    fn compact_grown_logs(&mut self) {
        let policy = self.policy;
        for (name, log) in self.logs.iter_mut() {
            let too_many = log.records >= policy.max_log_records;
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
                    tracing::debug!(doc = %name, records = log.records, "compacted log");
                    log.records = 0;
                    log.bytes = 0;
                    log.snapshot_len = state.len() as u64;
                }
                Err(e) => tracing::error!(doc = %name, "compaction failed: {e}"),
            }
        }
    }
}
