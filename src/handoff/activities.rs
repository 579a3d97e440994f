//! [`Activities`]: handoff as an app uses it (publish, list, withdraw, continue here), over the
//! activity records of this module and a way to reach the holding device that the agent gives it.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use libp2p::PeerId;
use tokio::sync::broadcast;

use super::{Activity, ActivityDoc, ActivityDraft, ActivityState, HandoffError};
use crate::docs::{DocHandle, DocRegistry, DocUpdate, RESERVED_PREFIX};

/// Opens a handoff stream to a device within a time limit (the agent connects and opens it).
pub(crate) type OpenClaimStream = Arc<
    dyn Fn(PeerId, Duration) -> BoxFuture<'static, Result<libp2p::Stream, String>> + Send + Sync,
>;

/// The handoff concern of one agent: `agent.activities()`.
#[derive(Clone)]
pub struct Activities {
    registry: Arc<DocRegistry>,
    me: PeerId,
    open_claim: OpenClaimStream,
    continued: broadcast::Sender<Activity>,
}

impl Activities {
    pub(crate) fn new(
        registry: Arc<DocRegistry>,
        me: PeerId,
        open_claim: OpenClaimStream,
        continued: broadcast::Sender<Activity>,
    ) -> Self {
        Self {
            registry,
            me,
            open_claim,
            continued,
        }
    }

    fn store(&self) -> Result<DocHandle, HandoffError> {
        Ok(self.registry.handle(super::ACTIVITIES_DOC)?)
    }

    fn doc(&self, name: &str) -> Result<DocHandle, HandoffError> {
        self.registry
            .handle(name)
            .map_err(|e| HandoffError::Invalid(e.to_string()))
    }

    /// Publishes (or, with the id of one this device holds, updates) this device's activity.
    /// Records the current state vector of each document it needs.
    pub async fn publish(&self, draft: ActivityDraft) -> Result<Activity, HandoffError> {
        let mut docs = Vec::with_capacity(draft.docs.len());
        for name in &draft.docs {
            if name.starts_with(RESERVED_PREFIX) {
                return Err(HandoffError::Invalid(format!(
                    "{name:?} is reserved for the agent"
                )));
            }
            docs.push(ActivityDoc {
                doc: name.clone(),
                state_vector: super::encode_sv(&self.doc(name)?.state_vector()),
            });
        }
        let store = self.store()?;
        let existing = draft
            .id
            .as_ref()
            .and_then(|id| super::current(&store).remove(id));
        let activity = super::prepare(draft, existing.as_ref(), &self.me.to_string(), docs)?;
        super::write(&store, &activity).await?;
        Ok(activity)
    }

    /// Live activities of every device in the group (newest first).
    pub fn list(&self) -> Result<Vec<Activity>, HandoffError> {
        Ok(super::live(&self.store()?))
    }

    /// Withdraws an activity (by its origin or holder); it disappears everywhere.
    pub async fn unpublish(&self, id: &str) -> Result<(), HandoffError> {
        let store = self.store()?;
        let current = super::current(&store)
            .remove(id)
            .ok_or_else(|| HandoffError::NotFound(id.to_string()))?;
        let me = self.me.to_string();
        if current.origin != me && current.holder != me {
            return Err(HandoffError::NotHolder {
                id: id.to_string(),
                holder: current.holder,
            });
        }
        let withdrawn = Activity {
            state: ActivityState::Unpublished,
            updated_at: crate::conflict::now(),
            ..current
        };
        super::write(&store, &withdrawn).await?;
        Ok(())
    }

    /// Activities of this device that were continued on another one.
    pub fn continued_elsewhere(&self) -> broadcast::Receiver<Activity> {
        self.continued.subscribe()
    }

    /// Every later change: the live activities after each change to them, and this device's
    /// activities continued on another one.
    pub fn watch(&self) -> Result<ActivityWatch, HandoffError> {
        Ok(ActivityWatch {
            changes: self.store()?.subscribe(),
            continued: self.continued.subscribe(),
            activities: self.clone(),
        })
    }

    /// Continues activity `id` on this device: catches up every document it needs to at least
    /// the recorded state (from any peer), then claims it from its holder, then returns its app
    /// state and documents. Fails clearly, and hands nothing over, if either step cannot finish
    /// within `timeout`.
    pub async fn handoff(&self, id: &str, timeout: Duration) -> Result<Handoff, HandoffError> {
        let store = self.store()?;
        let me = self.me.to_string();
        let activity = super::current(&store)
            .remove(id)
            .ok_or_else(|| HandoffError::NotFound(id.to_string()))?;
        if !activity.is_live(crate::conflict::now()) {
            return Err(HandoffError::Gone(id.to_string()));
        }
        if activity.holder == me {
            return Err(HandoffError::AlreadyHere(id.to_string()));
        }
        // 1. Never hand over a document older than the one the user left.
        let deadline = tokio::time::Instant::now() + timeout.min(super::MAX_TIMEOUT);
        for needed in &activity.docs {
            let doc = self.doc(&needed.doc)?;
            loop {
                let missing = super::missing(&doc.state_vector_decoded(), &needed.state_vector);
                if missing == 0 {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(HandoffError::NotCaughtUp {
                        doc: needed.doc.clone(),
                        missing,
                        secs: timeout.as_secs(),
                    });
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        // 2. Claim it from its holder, which grants one claim per epoch.
        let unreachable = |reason: String| HandoffError::HolderUnreachable {
            id: id.to_string(),
            holder: activity.holder.clone(),
            reason,
        };
        let holder: PeerId = activity
            .holder
            .parse()
            .map_err(|_| unreachable("bad device id".into()))?;
        let mut attempt = 0u64;
        let granted = loop {
            attempt += 1;
            match self.claim_once(&activity, holder, deadline).await {
                Ok(granted) => break granted,
                // The stream can die after the holder granted the claim: our replica then shows
                // this device as the holder at a newer epoch.
                Err(e) => {
                    let mine = super::current(&store)
                        .remove(id)
                        .filter(|a| a.holder == me && a.epoch > activity.epoch);
                    if let Some(granted) = mine {
                        break granted;
                    }
                    let retry = matches!(e, HandoffError::HolderUnreachable { .. })
                        && attempt < 3
                        && tokio::time::Instant::now() < deadline;
                    if !retry {
                        return Err(e);
                    }
                    tracing::debug!("claim attempt {attempt} failed ({e}); retrying");
                    tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                }
            }
        };
        super::write(&store, &granted).await?;
        // 3. Deliver the app state with the caught-up documents.
        let mut docs = std::collections::BTreeMap::new();
        for needed in &granted.docs {
            docs.insert(needed.doc.clone(), self.doc(&needed.doc)?.to_json());
        }
        Ok(Handoff {
            activity: granted,
            docs,
        })
    }

    /// One claim attempt: reach the holder and ask it.
    async fn claim_once(
        &self,
        activity: &Activity,
        holder: PeerId,
        deadline: tokio::time::Instant,
    ) -> Result<Activity, HandoffError> {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let stream = (self.open_claim)(holder, left.max(Duration::from_secs(1)))
            .await
            .map_err(|reason| HandoffError::HolderUnreachable {
                id: activity.id.clone(),
                holder: activity.holder.clone(),
                reason,
            })?;
        super::request_claim(stream, activity).await
    }
}

/// The result of a handoff, as delivered to the app on the claiming device.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Handoff {
    pub activity: Activity,
    /// Every document the activity needs, as JSON, caught up to at least the recorded state.
    pub docs: std::collections::BTreeMap<String, serde_json::Value>,
}

/// What an [`ActivityWatch`] hears.
#[derive(Debug, Clone)]
pub enum ActivityEvent {
    /// The live activities, after a change to them (here or on another device).
    Changed(Vec<Activity>),
    /// An activity of this device was continued on another one.
    ContinuedElsewhere(Activity),
}

/// A stream of [`ActivityEvent`]s, from [`Activities::watch`].
pub struct ActivityWatch {
    activities: Activities,
    changes: broadcast::Receiver<DocUpdate>,
    continued: broadcast::Receiver<Activity>,
}

impl ActivityWatch {
    /// The next event; `None` once the agent has stopped. Changes that come faster than they are
    /// read are merged into one `Changed`.
    pub async fn next(&mut self) -> Option<ActivityEvent> {
        loop {
            tokio::select! {
                change = self.changes.recv() => match change {
                    Err(broadcast::error::RecvError::Closed) => return None,
                    // A missed change is covered by listing now.
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        if let Ok(activities) = self.activities.list() {
                            return Some(ActivityEvent::Changed(activities));
                        }
                    }
                },
                activity = self.continued.recv() => match activity {
                    Ok(activity) => return Some(ActivityEvent::ContinuedElsewhere(activity)),
                    Err(broadcast::error::RecvError::Closed) => return None,
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                },
            }
        }
    }
}
