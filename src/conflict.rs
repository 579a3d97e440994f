//! Conflict reporting: Yjs merges every concurrent edit, and when two devices set the same map
//! key concurrently one value silently wins. This module makes that visible.
//!
//! Detection happens on the device whose value lost: the agent remembers the id of the item its
//! own last write to each map key created ([`LocalWrite`]). When a remote update makes that item
//! disappear, and the remote update itself did not delete it (so its writer never saw it), the
//! two writes were concurrent. Yjs resolves the same way everywhere, so exactly one of the two
//! devices detects each conflict. It records a [`Conflict`] in the replicated system document
//! `_devicelink/conflicts`, so every device lists it, and resolving it anywhere clears it
//! everywhere. Text edits interleave by design and are never conflicts.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use yrs::{Map, Out};

use crate::docs::{DocError, DocHandle, DocRegistry, Overwrite};

/// The replicated document holding conflict records.
pub const CONFLICTS_DOC: &str = "_devicelink/conflicts";
const MAP: &str = "conflicts";

pub use crate::store::{LocalWrite, LocalWrites};

/// Two concurrent writes to one map key, and which one Yjs kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conflict {
    pub id: String,
    pub doc: String,
    /// Path of the map: its root name.
    pub map: Vec<String>,
    pub key: String,
    /// The value every device now has.
    pub winner_value: Value,
    pub winner_device: String,
    /// The value that was silently replaced.
    pub loser_value: Value,
    pub loser_device: String,
    pub detected_by: String,
    /// Seconds since the Unix epoch.
    pub detected_at: f64,
    pub resolution: Option<Resolution>,
}

/// How a conflict was settled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resolution {
    /// "winner", "other" or "merged".
    pub kept: String,
    pub value: Value,
    pub by: String,
    pub at: f64,
}

/// What the user keeps when resolving.
#[derive(Debug, Clone, PartialEq)]
pub enum Keep {
    /// The value written on this device.
    Local,
    /// The value written on the other device.
    Remote,
    Winner,
    Other,
    /// A merged value.
    Value(Value),
}

#[derive(Debug, thiserror::Error)]
pub enum ConflictError {
    #[error("no conflict {0}")]
    NotFound(String),
    #[error("conflict {0} is already resolved")]
    AlreadyResolved(String),
    #[error(
        "this device wrote neither value of conflict {0}; use --keep winner, other or a JSON value"
    )]
    NotInvolved(String),
    #[error(transparent)]
    Doc(#[from] DocError),
}

pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Conflict {
    /// The record of a local write another device's update replaced unseen, as detected on
    /// this device (`me`).
    pub fn from_overwrite(overwrite: Overwrite, me: &str) -> Self {
        Self {
            id: conflict_id(
                &overwrite.doc,
                &overwrite.map,
                &overwrite.key,
                &overwrite.lost,
            ),
            doc: overwrite.doc,
            map: vec![overwrite.map],
            key: overwrite.key,
            winner_value: overwrite.winner_value,
            winner_device: overwrite.winner_device.to_string(),
            loser_value: overwrite.lost.value,
            loser_device: me.to_string(),
            detected_by: me.to_string(),
            detected_at: now(),
            resolution: None,
        }
    }
}

/// A stable id, so the same conflict detected twice is one record.
pub fn conflict_id(doc: &str, map: &str, key: &str, lost: &LocalWrite) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!(
        "{doc}\0{map}\0{key}\0{}\0{}",
        lost.client, lost.clock
    ));
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes a newly detected conflict (no-op if it is already recorded).
pub async fn record(doc: &DocHandle, conflict: &Conflict) -> Result<(), DocError> {
    let map = doc.yrs_doc().get_or_insert_map(MAP);
    let json = serde_json::to_string(conflict).unwrap_or_default();
    let id = conflict.id.clone();
    doc.transact(|txn| {
        if map.get(txn, &id).is_none() {
            map.insert(txn, id, json);
        }
    })
    .await
}

/// Every conflict record; `open_only` leaves resolved ones out. Sorted by detection time.
pub fn list(doc: &DocHandle, open_only: bool) -> Vec<Conflict> {
    let map = doc.yrs_doc().get_or_insert_map(MAP);
    let mut out: Vec<Conflict> = doc.read(|txn| {
        map.iter(txn)
            .filter_map(|(_, value)| match value {
                Out::Any(yrs::Any::String(s)) => serde_json::from_str(&s).ok(),
                _ => None,
            })
            .collect()
    });
    out.retain(|c: &Conflict| !open_only || c.resolution.is_none());
    out.sort_by(|a, b| {
        a.detected_at
            .total_cmp(&b.detected_at)
            .then(a.id.cmp(&b.id))
    });
    out
}

/// Picks the value to keep; the caller writes it to the document and then [`mark_resolved`].
pub fn choose(
    conflict: &Conflict,
    keep: &Keep,
    me: &str,
) -> Result<(String, Value), ConflictError> {
    let mine_is_winner = if conflict.winner_device == me {
        Some(true)
    } else if conflict.loser_device == me {
        Some(false)
    } else {
        None
    };
    let not_involved = || ConflictError::NotInvolved(conflict.id.clone());
    Ok(match keep {
        Keep::Winner => ("winner".into(), conflict.winner_value.clone()),
        Keep::Other => ("other".into(), conflict.loser_value.clone()),
        Keep::Local if mine_is_winner.ok_or_else(not_involved)? => {
            ("winner".into(), conflict.winner_value.clone())
        }
        Keep::Local => ("other".into(), conflict.loser_value.clone()),
        Keep::Remote if mine_is_winner.ok_or_else(not_involved)? => {
            ("other".into(), conflict.loser_value.clone())
        }
        Keep::Remote => ("winner".into(), conflict.winner_value.clone()),
        Keep::Value(v) => ("merged".into(), v.clone()),
    })
}

/// Marks a conflict resolved (replicates to every device).
pub async fn mark_resolved(
    doc: &DocHandle,
    mut conflict: Conflict,
    resolution: Resolution,
) -> Result<Conflict, DocError> {
    let map = doc.yrs_doc().get_or_insert_map(MAP);
    conflict.resolution = Some(resolution);
    let json = serde_json::to_string(&conflict).unwrap_or_default();
    let id = conflict.id.clone();
    doc.transact(|txn| {
        map.insert(txn, id, json);
    })
    .await?;
    Ok(conflict)
}

/// The conflict concern of one agent: `agent.conflicts()`.
#[derive(Clone)]
pub struct Conflicts {
    registry: Arc<DocRegistry>,
    me: String,
}

impl Conflicts {
    pub(crate) fn new(registry: Arc<DocRegistry>, me: String) -> Self {
        Self { registry, me }
    }

    fn records(&self) -> Result<DocHandle, ConflictError> {
        Ok(self.registry.handle(CONFLICTS_DOC)?)
    }

    /// Conflicts recorded on any device of the group, optionally only for `doc`; open ones
    /// unless `include_resolved`.
    pub fn list(
        &self,
        doc: Option<&str>,
        include_resolved: bool,
    ) -> Result<Vec<Conflict>, ConflictError> {
        Ok(list(&self.records()?, !include_resolved)
            .into_iter()
            .filter(|c| doc.is_none_or(|d| c.doc == d))
            .map(|c| self.resolution_as_stored(c))
            .collect())
    }

    /// Every later change to the recorded conflicts (here or on another device).
    pub fn watch(&self) -> Result<ConflictWatch, ConflictError> {
        Ok(ConflictWatch {
            changes: self.records()?.subscribe(),
            conflicts: self.clone(),
        })
    }

    /// A resolved conflict as the document holds it. Two devices that resolved the same conflict
    /// while apart each wrote a value and a record; Yjs keeps one of each independently, so the
    /// record kept can name the value that lost. The document is the truth: the resolution shows
    /// the value it holds (`kept`: winner, other or merged accordingly).
    fn resolution_as_stored(&self, mut conflict: Conflict) -> Conflict {
        let Some(resolution) = conflict.resolution.as_mut() else {
            return conflict;
        };
        let Ok(doc) = self.registry.handle(&conflict.doc) else {
            return conflict;
        };
        let map = conflict.map.first().cloned().unwrap_or_default();
        let held = doc.map_value_json(&map, &conflict.key);
        if held != resolution.value {
            resolution.kept = if held == conflict.winner_value {
                "winner"
            } else if held == conflict.loser_value {
                "other"
            } else {
                "merged"
            }
            .to_string();
            resolution.value = held;
        }
        conflict
    }

    /// Settles a conflict: writes the kept value (unless it is already the winner) and marks the
    /// conflict resolved on every device.
    pub async fn resolve(&self, id: &str, keep: Keep) -> Result<Conflict, ConflictError> {
        let records = self.records()?;
        let conflict = list(&records, false)
            .into_iter()
            .find(|c| c.id == id)
            .ok_or_else(|| ConflictError::NotFound(id.to_string()))?;
        if conflict.resolution.is_some() {
            return Err(ConflictError::AlreadyResolved(id.to_string()));
        }
        let (kept, value) = choose(&conflict, &keep, &self.me)?;
        if kept != "winner" {
            let doc = self.registry.handle(&conflict.doc)?;
            let map = conflict.map.first().cloned().unwrap_or_default();
            doc.set_json(&map, &conflict.key, &value).await?;
        }
        let resolution = Resolution {
            kept,
            value,
            by: self.me.clone(),
            at: now(),
        };
        Ok(mark_resolved(&records, conflict, resolution).await?)
    }
}

/// A stream of the open conflicts after each change to them, from [`Conflicts::watch`].
pub struct ConflictWatch {
    conflicts: Conflicts,
    changes: tokio::sync::broadcast::Receiver<crate::docs::DocUpdate>,
}

impl ConflictWatch {
    /// The open conflicts after the next change; `None` once the agent has stopped.
    pub async fn next(&mut self) -> Option<Vec<Conflict>> {
        loop {
            if let Err(tokio::sync::broadcast::error::RecvError::Closed) = self.changes.recv().await
            {
                return None;
            }
            if let Ok(open) = self.conflicts.list(None, false) {
                return Some(open);
            }
        }
    }
}
