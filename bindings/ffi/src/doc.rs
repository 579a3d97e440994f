//! One document of the embedded agent: JSON-valued writes, reads, Yjs v1 updates in and out, and
//! subscriptions that call the app back for every change (its own and other devices').

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use devicelink::{DocHandle, Origin};
use tokio::sync::{broadcast, mpsc, watch};

use crate::agent::{Agent, Phase, Shared};
use crate::callbacks::{Delivery, DocListener};
use crate::error::DeviceLinkError;

#[uniffi::export]
impl Agent {
    /// Document `name` (created by its first write). Names are up to 255 bytes; names starting
    /// with `_devicelink/` belong to the agent.
    pub fn doc(&self, name: String) -> Result<Arc<Doc>, DeviceLinkError> {
        Doc::open(self.shared.clone(), name).map(Arc::new)
    }

    /// The names of this device's documents.
    pub fn list_docs(&self) -> Result<Vec<String>, DeviceLinkError> {
        Ok(self.shared.current()?.docs().list()?)
    }
}

/// A document of the embedded agent.
#[derive(uniffi::Object)]
pub struct Doc {
    shared: Arc<Shared>,
    name: String,
}

impl Doc {
    pub(crate) fn open(shared: Arc<Shared>, name: String) -> Result<Self, DeviceLinkError> {
        shared.current()?.docs().open(&name)?;
        Ok(Self { shared, name })
    }

    fn handle(&self) -> Result<DocHandle, DeviceLinkError> {
        Ok(self.shared.current()?.docs().open(&self.name)?)
    }
}

fn parse_json(what: &str, text: &str) -> Result<serde_json::Value, DeviceLinkError> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        DeviceLinkError::InvalidArgument(format!(
            "{what} is not JSON ({e}); strings need quotes, like \"\\\"milk\\\"\""
        ))
    })?;
    Ok(value)
}

#[uniffi::export]
impl Doc {
    /// The document's name.
    pub fn name(&self) -> String {
        self.name.clone()
    }

    /// Sets `key` in the root map `map` to a JSON value (`"\"milk\""`, `"3"`, `"{\"a\":1}"`);
    /// returns once the change is durable on disk.
    pub fn set(&self, map: String, key: String, json_text: String) -> Result<(), DeviceLinkError> {
        let value = parse_json("the value", &json_text)?;
        let doc = self.handle()?;
        Ok(self.shared.block_on(doc.set_json(&map, &key, &value))?)
    }

    /// `key` of the root map `map` as JSON (`null` when absent).
    pub fn get(&self, map: String, key: String) -> Result<String, DeviceLinkError> {
        Ok(self.handle()?.map_value_json(&map, &key).to_string())
    }

    /// The whole document as JSON: every root by name.
    pub fn get_json(&self) -> Result<String, DeviceLinkError> {
        Ok(self.handle()?.to_json().to_string())
    }

    /// Appends `text` to the root text `name`; returns once durable.
    pub fn text_append(&self, name: String, text: String) -> Result<(), DeviceLinkError> {
        let doc = self.handle()?;
        Ok(self.shared.block_on(doc.append_text(&name, &text))?)
    }

    /// The root text `name`.
    pub fn text(&self, name: String) -> Result<String, DeviceLinkError> {
        Ok(self.handle()?.text(&name))
    }

    /// Applies a Yjs update (v1) made by the app's own Yjs; returns once durable. A corrupt or
    /// over-nested update is refused and changes nothing.
    pub fn apply_update(&self, update: Vec<u8>) -> Result<(), DeviceLinkError> {
        let doc = self.handle()?;
        Ok(self.shared.block_on(doc.apply_update(&update))?)
    }

    /// The document's state vector (Yjs v1 encoding).
    pub fn state_vector(&self) -> Result<Vec<u8>, DeviceLinkError> {
        Ok(self.handle()?.state_vector())
    }

    /// What the holder of `state_vector` lacks, as one Yjs v1 update (an empty state vector gives
    /// the whole document).
    pub fn diff(&self, state_vector: Vec<u8>) -> Result<Vec<u8>, DeviceLinkError> {
        let doc = self.handle()?;
        if state_vector.is_empty() {
            return Ok(doc.encode_state());
        }
        Ok(doc.diff(&state_vector)?)
    }

    /// Calls `listener` for every change from now on, until `cancel()` or shutdown (a pause
    /// only suspends it). Keep the subscription to cancel it.
    ///
    /// Every subscription of one agent is called back on one thread of the agent's, in order:
    /// a listener that takes long delays the others (hand heavy work to your own thread). One
    /// that falls far behind gets the whole document as one update (origin `"resync"`).
    pub fn subscribe(
        &self,
        listener: Arc<dyn DocListener>,
    ) -> Result<Arc<Subscription>, DeviceLinkError> {
        let doc = self.handle()?;
        // Subscribed before returning: no change made after this call is missed.
        let updates = doc.subscribe();
        let phases = self.shared.phase.subscribe();
        let (cancel, cancelled) = watch::channel(false);
        let active = Arc::new(AtomicBool::new(true));
        let feed = Feed {
            deliveries: self.shared.deliveries()?,
            name: self.name.clone(),
            listener,
            active: active.clone(),
            phases,
            cancelled,
        };
        self.shared.spawn(feed.run(doc, updates));
        Ok(Arc::new(Subscription { cancel, active }))
    }
}

/// A live subscription; `cancel()` ends it (so does the agent's shutdown).
#[derive(uniffi::Object)]
pub struct Subscription {
    cancel: watch::Sender<bool>,
    /// Cleared by `cancel()`: calls already queued are dropped, not made.
    active: Arc<AtomicBool>,
}

#[uniffi::export]
impl Subscription {
    /// Stops the callbacks (one already running finishes). Safe to call twice.
    pub fn cancel(&self) {
        self.active.store(false, Ordering::Release);
        self.cancel.send_replace(true);
    }
}

/// What a subscription waits for.
enum Next {
    Cancelled,
    PhaseChanged,
    Update(Result<devicelink::DocUpdate, broadcast::error::RecvError>),
}

/// One subscription, a task on the agent's runtime: it follows the agent through pause and
/// resume and queues its listener's calls for the callback thread.
struct Feed {
    deliveries: mpsc::Sender<Delivery>,
    name: String,
    listener: Arc<dyn DocListener>,
    active: Arc<AtomicBool>,
    phases: watch::Receiver<Phase>,
    cancelled: watch::Receiver<bool>,
}

impl Feed {
    async fn run(mut self, doc: DocHandle, updates: broadcast::Receiver<devicelink::DocUpdate>) {
        self.phases.borrow_and_update();
        let mut current = Some((doc, updates));
        loop {
            if let Some((doc, updates)) = current.take() {
                if !self.deliver(&doc, updates).await {
                    return;
                }
            }
            // Paused, or the agent restarted: wait for it to run again.
            let phase = self.phases.borrow_and_update().clone();
            match phase {
                Phase::Stopped => return,
                Phase::Paused => {
                    if !self.wait_for_phase_change().await {
                        return;
                    }
                }
                Phase::Running(handle) => match handle.docs().open(&self.name) {
                    Ok(doc) => {
                        let updates = doc.subscribe();
                        current = Some((doc, updates));
                    }
                    Err(e) => {
                        tracing::warn!("subscription to {:?} ends: {e}", self.name);
                        return;
                    }
                },
            }
        }
    }

    /// Queues the listener's calls until the phase changes (true) or it is cancelled or the
    /// callback thread is gone (false).
    async fn deliver(
        &mut self,
        doc: &DocHandle,
        mut updates: broadcast::Receiver<devicelink::DocUpdate>,
    ) -> bool {
        loop {
            let next = tokio::select! {
                biased;
                _ = cancelled(&mut self.cancelled) => Next::Cancelled,
                _ = self.phases.changed() => Next::PhaseChanged,
                update = updates.recv() => Next::Update(update),
            };
            let (update, origin) = match next {
                Next::Cancelled => return false,
                Next::PhaseChanged => return true,
                Next::Update(Ok(change)) if change.deleted => continue,
                Next::Update(Ok(change)) => (change.update.to_vec(), origin_name(change.origin)),
                // Fell behind: the whole document is one update that covers everything missed.
                Next::Update(Err(broadcast::error::RecvError::Lagged(_))) => {
                    (doc.encode_state(), "resync".to_string())
                }
                Next::Update(Err(broadcast::error::RecvError::Closed)) => return true,
            };
            let delivery = Delivery {
                listener: self.listener.clone(),
                active: self.active.clone(),
                name: self.name.clone(),
                update,
                origin,
            };
            let queued = tokio::select! {
                biased;
                _ = cancelled(&mut self.cancelled) => return false,
                queued = self.deliveries.send(delivery) => queued,
            };
            if queued.is_err() {
                return false;
            }
        }
    }

    /// False when cancelled or the agent is gone for good.
    async fn wait_for_phase_change(&mut self) -> bool {
        tokio::select! {
            biased;
            _ = cancelled(&mut self.cancelled) => false,
            changed = self.phases.changed() => changed.is_ok(),
        }
    }
}

/// Completes once `cancel()` was called. A dropped [`Subscription`] handle does not cancel: the
/// subscription lives until `cancel()` or shutdown.
async fn cancelled(cancel: &mut watch::Receiver<bool>) {
    if cancel.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn origin_name(origin: Origin) -> String {
    match origin {
        Origin::Local => "local".into(),
        Origin::Peer(peer) => peer.to_string(),
    }
}
