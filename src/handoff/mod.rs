//! Session handoff: an app publishes its current [`Activity`] on one device, the user continues
//! it on another with the documents it needs already caught up.
//!
//! Activities replicate in the system document `_devicelink/activities`, root map `activities`,
//! one entry per `(id, epoch)` (key `"{id}/{epoch:020}"`, value: the activity as JSON). The
//! current record of an activity is its highest epoch, so a write by a superseded holder (an older
//! epoch) can never override a newer one, whatever order the merges happen in.
//!
//! Claiming is arbitrated by the device holding the activity, over `/devicelink/handoff/1.4.0`:
//! the claimer first catches up every listed document to at least the recorded state vector,
//! then asks the holder, which grants one claim per epoch (serialized), writes epoch + 1 with the
//! new holder, and tells its app the activity was continued elsewhere. Two devices claiming at
//! once: exactly one gets the grant, the other a clear refusal.
//!
//! Apps use it through [`Activities`] (`agent.activities()`); this file owns the records and the
//! claim protocol.

use std::collections::BTreeMap;

use base64::Engine as _;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::codec::Framed;
use tokio_util::compat::FuturesAsyncReadCompatExt;
use yrs::{Map, Out};

use crate::docs::{DocError, DocHandle};

mod activities;
use crate::sync::message::{codec, Version, PROTOCOL_VERSION};
pub(crate) use activities::OpenClaimStream;
pub use activities::{Activities, ActivityEvent, ActivityWatch, Handoff};

pub const ACTIVITIES_DOC: &str = "_devicelink/activities";
pub const HANDOFF_PROTOCOL: StreamProtocol = StreamProtocol::new("/devicelink/handoff/1.4.0");
const MAP: &str = "activities";
/// Largest app state, as JSON text.
pub const MAX_APP_STATE: usize = 16 * 1024;
/// The longest activity id, in bytes (ids are printable, without spaces).
pub const MAX_ACTIVITY_ID: usize = 128;

/// Whether `id` is an acceptable activity id (from an app or read from a peer's record).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ACTIVITY_ID && id.chars().all(|c| c.is_ascii_graphic())
}
/// The longest a handoff may wait for documents and the holder's grant.
pub const MAX_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// A document an activity needs, at the state it was in when published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivityDoc {
    pub doc: String,
    /// Yjs v1 state vector, base64.
    pub state_vector: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActivityState {
    Active,
    Unpublished,
}

/// What a user is doing in an app, so another device can continue it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Activity {
    pub id: String,
    /// Reverse-DNS type, like `com.example.notes.edit`.
    #[serde(rename = "type")]
    pub activity_type: String,
    pub title: String,
    pub docs: Vec<ActivityDoc>,
    /// Small app state: cursor, selection, scroll, URL... (at most 16 KiB of JSON).
    pub app_state: Value,
    /// The device that published it.
    pub origin: String,
    /// The device holding it now.
    pub holder: String,
    /// Fencing token: grows by one at every handoff.
    pub epoch: u64,
    pub created_at: f64,
    pub updated_at: f64,
    pub expires_at: f64,
    pub state: ActivityState,
}

impl Activity {
    pub fn is_live(&self, now: f64) -> bool {
        self.state == ActivityState::Active && self.expires_at > now
    }
}

/// What an app publishes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActivityDraft {
    /// Set to update an activity this device holds; empty for a new one. (`activity_id` on the
    /// wire, so it never collides with a request's own `id`.)
    #[serde(default, rename = "activity_id")]
    pub id: Option<String>,
    #[serde(rename = "type")]
    pub activity_type: String,
    pub title: String,
    pub docs: Vec<String>,
    #[serde(default)]
    pub app_state: Value,
    /// Lifetime in seconds (default 1 hour).
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("no activity {0}")]
    NotFound(String),
    #[error("activity {0} has expired or was unpublished")]
    Gone(String),
    #[error("activity type {0:?} must be reverse-DNS, like com.example.notes.edit")]
    BadType(String),
    #[error("the app state is {0} bytes of JSON; at most 16384 are allowed")]
    StateTooLarge(usize),
    #[error("invalid activity: {0}")]
    Invalid(String),
    #[error("activity {id} is held by {holder}, not this device: only its holder can change it")]
    NotHolder { id: String, holder: String },
    #[error("activity {0} is already on this device")]
    AlreadyHere(String),
    #[error("could not catch up {doc:?} to the state the activity needs within {secs} s ({missing} changes missing); is a device that has it online?")]
    NotCaughtUp {
        doc: String,
        missing: u64,
        secs: u64,
    },
    #[error("the device holding activity {id} ({holder}) cannot be reached: {reason}")]
    HolderUnreachable {
        id: String,
        holder: String,
        reason: String,
    },
    #[error("claim refused: {0}")]
    Refused(String),
    #[error(transparent)]
    Doc(#[from] DocError),
}

fn entry_key(id: &str, epoch: u64) -> String {
    format!("{id}/{epoch:020}")
}

/// Every activity's current record (highest epoch), including gone ones.
pub fn current(doc: &DocHandle) -> BTreeMap<String, Activity> {
    let map = doc.yrs_doc().get_or_insert_map(MAP);
    let mut out: BTreeMap<String, Activity> = BTreeMap::new();
    doc.read(|txn| {
        for (_, value) in map.iter(txn) {
            let Out::Any(yrs::Any::String(json)) = value else {
                continue;
            };
            let Ok(activity) = serde_json::from_str::<Activity>(&json) else {
                continue;
            };
            if !valid_id(&activity.id) {
                continue; // written by a device without the limit: not offered to apps
            }
            match out.get(&activity.id) {
                Some(existing) if existing.epoch >= activity.epoch => {}
                _ => {
                    out.insert(activity.id.clone(), activity);
                }
            }
        }
    });
    out
}

/// The live activities (active, unexpired), newest first.
pub fn live(doc: &DocHandle) -> Vec<Activity> {
    let now = crate::conflict::now();
    let mut list: Vec<Activity> = current(doc)
        .into_values()
        .filter(|a| a.is_live(now))
        .collect();
    list.sort_by(|a, b| b.updated_at.total_cmp(&a.updated_at));
    list
}

/// Writes `activity` under its epoch.
pub async fn write(doc: &DocHandle, activity: &Activity) -> Result<(), DocError> {
    let map = doc.yrs_doc().get_or_insert_map(MAP);
    let json = serde_json::to_string(activity).unwrap_or_default();
    let key = entry_key(&activity.id, activity.epoch);
    doc.transact(|txn| {
        map.insert(txn, key, json);
    })
    .await
}

/// Removes records of activities that expired more than `grace` seconds ago.
pub async fn prune_expired(doc: &DocHandle, grace: f64) -> Result<usize, DocError> {
    let map = doc.yrs_doc().get_or_insert_map(MAP);
    let now = crate::conflict::now();
    let stale: Vec<String> = doc.read(|txn| {
        map.iter(txn)
            .filter_map(|(key, value)| match value {
                Out::Any(yrs::Any::String(json)) => serde_json::from_str::<Activity>(&json)
                    .ok()
                    .filter(|a| a.expires_at + grace < now)
                    .map(|_| key.to_string()),
                _ => None,
            })
            .collect()
    });
    if !stale.is_empty() {
        doc.transact(|txn| {
            for key in &stale {
                map.remove(txn, key);
            }
        })
        .await?;
    }
    Ok(stale.len())
}

/// Checks a draft and turns it into the record to write, given the current one if updating.
pub fn prepare(
    draft: ActivityDraft,
    existing: Option<&Activity>,
    me: &str,
    state_vectors: Vec<ActivityDoc>,
) -> Result<Activity, HandoffError> {
    let valid_type = draft.activity_type.contains('.')
        && draft.activity_type.len() <= 128
        && draft
            .activity_type
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if !valid_type {
        return Err(HandoffError::BadType(draft.activity_type));
    }
    if draft.id.as_deref().is_some_and(|id| !valid_id(id)) {
        return Err(HandoffError::Invalid(format!(
            "activity_id must be 1 to {MAX_ACTIVITY_ID} printable ASCII characters without spaces"
        )));
    }
    if draft.title.chars().count() > 200 {
        return Err(HandoffError::Invalid(
            "title longer than 200 characters".into(),
        ));
    }
    if draft.docs.len() > 64 {
        return Err(HandoffError::Invalid("more than 64 documents".into()));
    }
    let state_len = draft.app_state.to_string().len();
    if state_len > MAX_APP_STATE {
        return Err(HandoffError::StateTooLarge(state_len));
    }
    let now = crate::conflict::now();
    let expires_at = now + draft.ttl_secs.unwrap_or(3600).min(30 * 24 * 3600) as f64;
    Ok(match existing {
        Some(current) => {
            if current.holder != me {
                return Err(HandoffError::NotHolder {
                    id: current.id.clone(),
                    holder: current.holder.clone(),
                });
            }
            Activity {
                activity_type: draft.activity_type,
                title: draft.title,
                docs: state_vectors,
                app_state: draft.app_state,
                updated_at: now,
                expires_at,
                state: ActivityState::Active,
                ..current.clone()
            }
        }
        None => Activity {
            id: draft.id.unwrap_or_else(new_id),
            activity_type: draft.activity_type,
            title: draft.title,
            docs: state_vectors,
            app_state: draft.app_state,
            origin: me.to_string(),
            holder: me.to_string(),
            epoch: 1,
            created_at: now,
            updated_at: now,
            expires_at,
            state: ActivityState::Active,
        },
    })
}

fn new_id() -> String {
    let bytes: [u8; 8] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How many clock units `local` lacks of `needed` (0 = caught up).
pub fn missing(local: &yrs::StateVector, needed_b64: &str) -> u64 {
    let Ok(bytes) = B64.decode(needed_b64) else {
        return 0;
    };
    let Ok(needed) = crate::docs::decode_state_vector(&bytes) else {
        return 0;
    };
    needed
        .iter()
        .map(|(client, clock)| u64::from(clock.saturating_sub(local.get(client))))
        .sum()
}

pub fn encode_sv(sv: &[u8]) -> String {
    B64.encode(sv)
}

/// Messages of `/devicelink/handoff/1.4.0` (postcard, framed like sync).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HandoffMessage {
    /// 0, claimer -> holder.
    Claim {
        version: Version,
        activity: String,
        epoch: u64,
    },
    /// 1, holder -> claimer: the new record (JSON), now held by the claimer.
    Granted { activity: String },
    /// 2, holder -> claimer.
    Refused { reason: String },
}

type Transport =
    Framed<tokio_util::compat::Compat<libp2p::Stream>, tokio_util::codec::LengthDelimitedCodec>;

async fn send(t: &mut Transport, msg: &HandoffMessage) -> std::io::Result<()> {
    let body = postcard::to_allocvec(msg).map_err(std::io::Error::other)?;
    t.send(Bytes::from(body)).await
}

async fn recv(t: &mut Transport) -> std::io::Result<HandoffMessage> {
    let frame = tokio::time::timeout(std::time::Duration::from_secs(15), t.next())
        .await
        .map_err(|_| std::io::Error::other("timed out"))?
        .ok_or_else(|| std::io::Error::other("stream closed"))??;
    postcard::from_bytes(&frame).map_err(std::io::Error::other)
}

/// Claimer side: asks the holder for `activity` at `epoch`; returns the granted record.
pub async fn request_claim(
    stream: libp2p::Stream,
    activity: &Activity,
) -> Result<Activity, HandoffError> {
    let unreachable = |reason: String| HandoffError::HolderUnreachable {
        id: activity.id.clone(),
        holder: activity.holder.clone(),
        reason,
    };
    let mut t = Framed::new(stream.compat(), codec());
    let claim = HandoffMessage::Claim {
        version: PROTOCOL_VERSION,
        activity: activity.id.clone(),
        epoch: activity.epoch,
    };
    send(&mut t, &claim)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    match recv(&mut t).await.map_err(|e| unreachable(e.to_string()))? {
        HandoffMessage::Granted { activity } => serde_json::from_str(&activity)
            .map_err(|e| HandoffError::Refused(format!("bad grant: {e}"))),
        HandoffMessage::Refused { reason } => Err(HandoffError::Refused(reason)),
        HandoffMessage::Claim { .. } => Err(HandoffError::Refused("protocol violation".into())),
    }
}

/// Holder side: reads one claim and answers it with `decide`, which writes the grant.
pub async fn serve_claim<F, Fut>(stream: libp2p::Stream, decide: F)
where
    F: FnOnce(String, u64) -> Fut,
    Fut: std::future::Future<Output = Result<Activity, String>>,
{
    let mut t = Framed::new(stream.compat(), codec());
    let answer = match recv(&mut t).await {
        Ok(HandoffMessage::Claim {
            version,
            activity,
            epoch,
        }) => match version.check_compatible() {
            Err(refusal) => HandoffMessage::Refused {
                reason: refusal.message,
            },
            Ok(()) => match decide(activity, epoch).await {
                Ok(granted) => HandoffMessage::Granted {
                    activity: serde_json::to_string(&granted).unwrap_or_default(),
                },
                Err(reason) => HandoffMessage::Refused { reason },
            },
        },
        Ok(_) => HandoffMessage::Refused {
            reason: "expected a Claim".into(),
        },
        Err(_) => return,
    };
    let _ = send(&mut t, &answer).await;
    let _ = SinkExt::<Bytes>::close(&mut t).await;
}
