//! One document of the embedded agent: JSON-valued writes, reads, Yjs v1 updates in and out, and
//! subscriptions that call the app back for every change (its own and other devices').

use std::sync::Arc;

use devicelink::{DocHandle, Origin};
use tokio::sync::{broadcast, watch};

use crate::agent::{Agent, Phase, Shared};
use crate::error::DeviceLinkError;

/// What an app implements to hear of a document's changes.
#[uniffi::export(foreign)]
pub trait DocListener: Send + Sync {
    /// Called, on a thread of the agent's, for every change in order: `update` is a Yjs update
    /// v1 (apply it to your own Yjs document), `origin` is `"local"` for this device's changes
    /// or the device id of the device that made it. After a listener fell far behind it gets
    /// the whole document as one update, with origin `"resync"`.
    fn on_update(&self, update: Vec<u8>, origin: String);
}

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
    devicelink::docs::check_json_numbers(&value)
        .map_err(|e| DeviceLinkError::InvalidArgument(format!("{what}: {e}")))?;
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
        let any = devicelink::docs::json_to_any(&value);
        Ok(self.shared.block_on(doc.set_map_value(&map, &key, any))?)
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
    pub fn subscribe(
        &self,
        listener: Arc<dyn DocListener>,
    ) -> Result<Arc<Subscription>, DeviceLinkError> {
        let doc = self.handle()?;
        // Subscribed before returning: no change made after this call is missed.
        let updates = doc.subscribe();
        let phases = self.shared.phase.subscribe();
        let (cancel, cancelled) = watch::channel(false);
        let feed = Feed {
            shared: self.shared.clone(),
            name: self.name.clone(),
            listener,
            phases,
            cancelled,
        };
        std::thread::Builder::new()
            .name(format!("devicelink-sub-{}", self.name))
            .spawn(move || feed.run(doc, updates))
            .map_err(|e| DeviceLinkError::Storage(format!("cannot start a thread: {e}")))?;
        Ok(Arc::new(Subscription { cancel }))
    }
}

/// A live subscription; `cancel()` ends it (so does the agent's shutdown).
#[derive(uniffi::Object)]
pub struct Subscription {
    cancel: watch::Sender<bool>,
}

#[uniffi::export]
impl Subscription {
    /// Stops the callbacks (one already running finishes). Safe to call twice.
    pub fn cancel(&self) {
        self.cancel.send_replace(true);
    }
}

/// What a subscription's thread waits for.
enum Next {
    Cancelled,
    PhaseChanged,
    Update(Result<devicelink::DocUpdate, broadcast::error::RecvError>),
}

/// One subscription's delivery thread: it follows the agent through pause and resume.
struct Feed {
    shared: Arc<Shared>,
    name: String,
    listener: Arc<dyn DocListener>,
    phases: watch::Receiver<Phase>,
    cancelled: watch::Receiver<bool>,
}

impl Feed {
    fn run(mut self, doc: DocHandle, updates: broadcast::Receiver<devicelink::DocUpdate>) {
        self.phases.borrow_and_update();
        let mut current = Some((doc, updates));
        loop {
            if let Some((doc, updates)) = current.take() {
                if !self.deliver(&doc, updates) {
                    return;
                }
            }
            // Paused, or the agent restarted: wait for it to run again.
            let phase = self.phases.borrow_and_update().clone();
            match phase {
                Phase::Stopped => return,
                Phase::Paused => {
                    if !self.wait_for_phase_change() {
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

    /// Hands updates to the listener until the phase changes (true) or it is cancelled (false).
    fn deliver(
        &mut self,
        doc: &DocHandle,
        mut updates: broadcast::Receiver<devicelink::DocUpdate>,
    ) -> bool {
        loop {
            let next = self.shared.block_on(async {
                tokio::select! {
                    biased;
                    _ = cancelled(&mut self.cancelled) => Next::Cancelled,
                    _ = self.phases.changed() => Next::PhaseChanged,
                    update = updates.recv() => Next::Update(update),
                }
            });
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
            let listener = &self.listener;
            let called = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                listener.on_update(update, origin)
            }));
            if called.is_err() {
                tracing::warn!(
                    "a listener of {:?} failed; it keeps getting changes",
                    self.name
                );
            }
        }
    }

    /// False when cancelled or the agent is gone for good.
    fn wait_for_phase_change(&mut self) -> bool {
        self.shared.block_on(async {
            tokio::select! {
                biased;
                _ = cancelled(&mut self.cancelled) => false,
                changed = self.phases.changed() => changed.is_ok(),
            }
        })
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
