//! One IPC connection's outgoing lines, bounded in bytes, and the task that writes them.
//!
//! Responses are always queued, but the connection reads its next request only while the queue
//! is under [`MAX_QUEUED_BYTES`]: an app that pipelines requests and never reads costs the budget
//! plus one answer. Events are dropped while the queue is over the budget; a document
//! subscription then sends one `lagged` event (with how many it missed) once there is room, so
//! the app knows to re-read. Memory per slow reader is bounded either way.

use std::sync::Arc;

use tokio::io::AsyncWrite;
use tokio::sync::mpsc;

use crate::budget::ByteBudget;

/// Bytes queued for one connection before its requests wait and its events are dropped.
pub const MAX_QUEUED_BYTES: usize = 8 << 20;

/// The sending side; cheap to clone (subscription tasks hold one each).
#[derive(Clone)]
pub(crate) struct Outbox {
    lines: mpsc::UnboundedSender<String>,
    budget: Arc<ByteBudget>,
}

/// The connection's writer is gone (the app closed it).
#[derive(Debug)]
pub(crate) struct Closed;

impl Outbox {
    /// An outbox writing to `write`, and the writer task (it ends when every sender is dropped).
    pub fn new(
        write: impl AsyncWrite + Unpin + Send + 'static,
    ) -> (Self, tokio::task::JoinHandle<std::io::Result<()>>) {
        let (lines, rx) = mpsc::unbounded_channel();
        let budget = Arc::new(ByteBudget::new(MAX_QUEUED_BYTES));
        let writer = tokio::spawn(write_lines(write, rx, budget.clone()));
        (Self { lines, budget }, writer)
    }

    /// Queues a response (never dropped).
    pub fn reply(&self, value: &impl serde::Serialize) -> Result<(), Closed> {
        let line = serde_json::to_string(value).map_err(|_| Closed)?;
        self.push(line)
    }

    /// Queues an event unless the queue is over the budget; `Ok(false)`: dropped.
    pub fn event(&self, value: &impl serde::Serialize) -> Result<bool, Closed> {
        if self.lines.is_closed() {
            return Err(Closed);
        }
        if self.is_full() {
            return Ok(false);
        }
        self.reply(value).map(|()| true)
    }

    pub fn is_full(&self) -> bool {
        self.budget.is_full()
    }

    /// Resolves once the queue is under the budget.
    pub async fn wait_for_room(&self) {
        self.budget.wait_for_room().await
    }

    fn push(&self, line: String) -> Result<(), Closed> {
        let len = line.len() + 1;
        self.budget.charge(len);
        self.lines.send(line).map_err(|_| {
            self.budget.release(len);
            Closed
        })
    }
}

/// Writes queued lines (see [`super::write_lines`]), giving their bytes back to the budget once
/// written.
async fn write_lines(
    write: impl AsyncWrite + Unpin,
    lines: mpsc::UnboundedReceiver<String>,
    budget: Arc<ByteBudget>,
) -> std::io::Result<()> {
    super::write_lines(write, lines, |bytes| budget.release(bytes)).await
}
