//! The agent's callback thread: every subscription's calls into the app (its [`DocListener`]s),
//! made in order on one thread of the agent's, whatever the number of subscriptions.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

/// What an app implements to hear of a document's changes.
#[uniffi::export(foreign)]
pub trait DocListener: Send + Sync {
    /// Called, on the agent's callback thread, for every change in order: `update` is a Yjs update
    /// v1 (apply it to your own Yjs document), `origin` is `"local"` for this device's changes
    /// or the device id of the device that made it. After a listener fell far behind it gets
    /// the whole document as one update, with origin `"resync"`.
    fn on_update(&self, update: Vec<u8>, origin: String);
}

/// One call of a listener, queued for the agent's callback thread.
pub(crate) struct Delivery {
    pub(crate) listener: Arc<dyn DocListener>,
    pub(crate) active: Arc<AtomicBool>,
    pub(crate) name: String,
    pub(crate) update: Vec<u8>,
    pub(crate) origin: String,
}

/// Calls made ahead of a slow listener; beyond them its subscription waits, then resyncs.
pub(crate) const QUEUED_CALLS: usize = 64;

/// The agent's callback thread: makes every subscription's calls in order until the agent and
/// its subscriptions are gone.
pub(crate) fn call_listeners(mut deliveries: mpsc::Receiver<Delivery>) {
    while let Some(delivery) = deliveries.blocking_recv() {
        if !delivery.active.load(Ordering::Acquire) {
            continue;
        }
        let Delivery {
            listener,
            name,
            update,
            origin,
            ..
        } = delivery;
        let called = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            listener.on_update(update, origin)
        }));
        if called.is_err() {
            tracing::warn!("a listener of {name:?} failed; it keeps getting changes");
        }
    }
}
