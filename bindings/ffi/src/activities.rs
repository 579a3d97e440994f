//! Handoff (publish what the user is doing, list it on every device, continue it on another)
//! and conflict reports (list, resolve), with JSON values as text.

use std::collections::HashMap;

use crate::agent::Agent;
use crate::error::DeviceLinkError;

/// What the user is doing in an app, so another device can continue it.
#[derive(Debug, Clone, uniffi::Record)]
pub struct Activity {
    pub id: String,
    /// Reverse-DNS type, like `com.example.notes.edit`.
    pub activity_type: String,
    pub title: String,
    /// The documents it needs.
    pub docs: Vec<String>,
    /// Small app state (cursor, selection...) as JSON.
    pub app_state_json: String,
    /// The device that published it, and the one holding it now.
    pub origin: String,
    pub holder: String,
    /// Grows by one at every handoff.
    pub epoch: u64,
    /// Seconds since the Unix epoch.
    pub expires_at: f64,
}

impl From<devicelink::handoff::Activity> for Activity {
    fn from(a: devicelink::handoff::Activity) -> Self {
        Self {
            id: a.id,
            activity_type: a.activity_type,
            title: a.title,
            docs: a.docs.into_iter().map(|d| d.doc).collect(),
            app_state_json: a.app_state.to_string(),
            origin: a.origin,
            holder: a.holder,
            epoch: a.epoch,
            expires_at: a.expires_at,
        }
    }
}

/// What an app publishes.
#[derive(Debug, Clone, uniffi::Record)]
pub struct ActivityDraft {
    pub activity_type: String,
    pub title: String,
    pub docs: Vec<String>,
    /// JSON, at most 16 KiB.
    #[uniffi(default = "null")]
    pub app_state_json: String,
    /// Lifetime in seconds (default one hour).
    #[uniffi(default)]
    pub ttl_secs: Option<u64>,
    /// The id of an activity this device holds, to update it; none for a new one.
    #[uniffi(default)]
    pub id: Option<String>,
}

/// A continued activity, with its documents caught up to at least the published state.
#[derive(Debug, Clone, uniffi::Record)]
pub struct HandoffResult {
    pub activity: Activity,
    /// Every document it needs, as JSON, by name.
    pub docs_json: HashMap<String, String>,
}

/// Two devices wrote the same map key while apart: one value won everywhere, the other was
/// replaced. Show it; `resolve_conflict` settles it.
#[derive(Debug, Clone, uniffi::Record)]
pub struct Conflict {
    pub id: String,
    pub doc: String,
    pub map: String,
    pub key: String,
    pub winner_value_json: String,
    pub winner_device: String,
    pub loser_value_json: String,
    pub loser_device: String,
    /// "winner", "other" or "merged" once resolved.
    pub resolved: Option<String>,
}

impl From<devicelink::conflict::Conflict> for Conflict {
    fn from(c: devicelink::conflict::Conflict) -> Self {
        Self {
            map: c.map.first().cloned().unwrap_or_default(),
            id: c.id,
            doc: c.doc,
            key: c.key,
            winner_value_json: c.winner_value.to_string(),
            winner_device: c.winner_device,
            loser_value_json: c.loser_value.to_string(),
            loser_device: c.loser_device,
            resolved: c.resolution.map(|r| r.kept),
        }
    }
}

fn json(what: &str, text: &str) -> Result<serde_json::Value, DeviceLinkError> {
    serde_json::from_str(text)
        .map_err(|e| DeviceLinkError::InvalidArgument(format!("{what} is not JSON: {e}")))
}

#[uniffi::export]
impl Agent {
    /// Publishes (or updates) an activity of this device; every linked device lists it.
    pub fn publish_activity(&self, draft: ActivityDraft) -> Result<Activity, DeviceLinkError> {
        let draft = devicelink::handoff::ActivityDraft {
            id: draft.id,
            activity_type: draft.activity_type,
            title: draft.title,
            docs: draft.docs,
            app_state: json("app_state_json", &draft.app_state_json)?,
            ttl_secs: draft.ttl_secs,
        };
        let handle = self.shared.current()?;
        Ok(self
            .shared
            .block_on(handle.activities().publish(draft))?
            .into())
    }

    /// Live activities of every device in the group, newest first.
    pub fn activities(&self) -> Result<Vec<Activity>, DeviceLinkError> {
        let handle = self.shared.current()?;
        Ok(handle
            .activities()
            .list()?
            .into_iter()
            .map(Into::into)
            .collect())
    }

    /// Withdraws an activity this device published or holds.
    pub fn unpublish_activity(&self, id: String) -> Result<(), DeviceLinkError> {
        let handle = self.shared.current()?;
        Ok(self.shared.block_on(handle.activities().unpublish(&id))?)
    }

    /// Continues activity `id` here: catches its documents up to the published state, claims
    /// it from its holder, and returns it. Nothing is handed over if that cannot finish within
    /// `timeout_secs`.
    pub fn handoff(&self, id: String, timeout_secs: u64) -> Result<HandoffResult, DeviceLinkError> {
        let handle = self.shared.current()?;
        let timeout = std::time::Duration::from_secs(timeout_secs.max(1));
        let done = self
            .shared
            .block_on(handle.activities().handoff(&id, timeout))?;
        Ok(HandoffResult {
            activity: done.activity.into(),
            docs_json: done
                .docs
                .into_iter()
                .map(|(name, value)| (name, value.to_string()))
                .collect(),
        })
    }

    /// Conflicts recorded on any device (only `doc`'s when given); open ones unless
    /// `include_resolved`.
    pub fn conflicts(
        &self,
        doc: Option<String>,
        include_resolved: bool,
    ) -> Result<Vec<Conflict>, DeviceLinkError> {
        let handle = self.shared.current()?;
        Ok(handle
            .conflicts()
            .list(doc.as_deref(), include_resolved)?
            .into_iter()
            .map(Into::into)
            .collect())
    }

    /// Settles a conflict everywhere. `keep`: `"winner"`, `"other"`, `"local"`, `"remote"`, or a
    /// JSON value to write instead (a merge).
    pub fn resolve_conflict(&self, id: String, keep: String) -> Result<Conflict, DeviceLinkError> {
        use devicelink::conflict::Keep;
        let keep = match keep.as_str() {
            "winner" => Keep::Winner,
            "other" => Keep::Other,
            "local" => Keep::Local,
            "remote" => Keep::Remote,
            value => Keep::Value(json("keep", value)?),
        };
        let handle = self.shared.current()?;
        Ok(self
            .shared
            .block_on(handle.conflicts().resolve(&id, keep))?
            .into())
    }
}
