//! devicelink for Node.js: the bindings crate's API ([`devicelink_ffi`]) as a napi-rs addon.
//! Calls that wait (start, writes, pairing, handoff) return Promises and run on a blocking
//! thread, so the event loop never waits; `subscribe` takes a callback `(update, origin)`.
//! Values are JS values (JSON in the agent); updates are Yjs v1 bytes (`Buffer`).

use std::collections::HashMap;
use std::sync::Arc;

use devicelink_ffi as ffi;
use napi::bindgen_prelude::*;
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi_derive::napi;

/// An error whose message starts with its kind (`WrongType: ...`), as JS code can match it.
fn js_error(e: ffi::DeviceLinkError) -> Error {
    Error::from_reason(format!("{}: {e}", e.kind()))
}

/// Runs a blocking call of the agent off the event loop.
async fn off_loop<T: Send + 'static>(
    call: impl FnOnce() -> std::result::Result<T, ffi::DeviceLinkError> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(call)
        .await
        .map_err(|e| Error::from_reason(format!("the call failed: {e}")))?
        .map_err(js_error)
}

fn parse(what: &str, text: String) -> Result<serde_json::Value> {
    serde_json::from_str(&text)
        .map_err(|e| Error::from_reason(format!("the agent returned invalid JSON for {what}: {e}")))
}

#[napi(object)]
pub struct AgentConfig {
    /// Holds the device's identity and database (created if missing).
    pub data_dir: String,
    /// libp2p listen addresses; none: every interface on free ports (TCP and QUIC).
    pub listen: Option<Vec<String>>,
    /// Devices to dial directly.
    pub peers: Option<Vec<String>>,
    /// mDNS discovery on the LAN (default true).
    pub mdns: Option<bool>,
    /// Serve the local IPC socket for other apps and the CLI (default false).
    pub ipc: Option<bool>,
    pub ipc_socket: Option<String>,
    /// Serve the y-websocket endpoint for Yjs apps (default false).
    pub ws: Option<bool>,
    pub ws_addr: Option<String>,
    /// The name the other devices show (default: the host name).
    pub name: Option<String>,
}

#[napi(object)]
pub struct PairedDevice {
    pub device_id: String,
    pub name: String,
    pub verification: String,
}

impl From<ffi::PairedDevice> for PairedDevice {
    fn from(p: ffi::PairedDevice) -> Self {
        Self {
            device_id: p.device_id,
            name: p.name,
            verification: p.verification,
        }
    }
}

#[napi(object)]
pub struct LinkedDevice {
    pub device_id: String,
    pub name: String,
    pub connected: bool,
}

#[napi(object)]
pub struct Activity {
    pub id: String,
    pub activity_type: String,
    pub title: String,
    pub docs: Vec<String>,
    pub app_state: serde_json::Value,
    pub origin: String,
    pub holder: String,
    pub epoch: i64,
    pub expires_at: f64,
}

fn activity(a: ffi::Activity) -> Result<Activity> {
    Ok(Activity {
        app_state: parse("app state", a.app_state_json)?,
        id: a.id,
        activity_type: a.activity_type,
        title: a.title,
        docs: a.docs,
        origin: a.origin,
        holder: a.holder,
        epoch: i64::try_from(a.epoch).unwrap_or(i64::MAX),
        expires_at: a.expires_at,
    })
}

#[napi(object)]
pub struct ActivityDraft {
    pub activity_type: String,
    pub title: String,
    pub docs: Vec<String>,
    pub app_state: Option<serde_json::Value>,
    pub ttl_secs: Option<u32>,
    pub id: Option<String>,
}

#[napi(object)]
pub struct HandoffResult {
    pub activity: Activity,
    /// Every document the activity needs, as JSON, by name.
    pub docs: HashMap<String, serde_json::Value>,
}

#[napi(object)]
pub struct Conflict {
    pub id: String,
    pub doc: String,
    pub map: String,
    pub key: String,
    pub winner_value: serde_json::Value,
    pub winner_device: String,
    pub loser_value: serde_json::Value,
    pub loser_device: String,
    pub resolved: Option<String>,
}

fn conflict(c: ffi::Conflict) -> Result<Conflict> {
    Ok(Conflict {
        winner_value: parse("a conflict", c.winner_value_json)?,
        loser_value: parse("a conflict", c.loser_value_json)?,
        id: c.id,
        doc: c.doc,
        map: c.map,
        key: c.key,
        winner_device: c.winner_device,
        loser_device: c.loser_device,
        resolved: c.resolved,
    })
}

/// The Device Linking agent, embedded in this process.
#[napi]
pub struct Agent {
    inner: Arc<ffi::Agent>,
}

#[napi]
impl Agent {
    /// Starts the agent (Promise): opens the data dir, listens, syncs with linked devices.
    #[napi(factory)]
    pub async fn start(config: AgentConfig) -> Result<Agent> {
        let config = ffi::AgentConfig {
            data_dir: config.data_dir,
            listen: config.listen.unwrap_or_default(),
            peers: config.peers.unwrap_or_default(),
            mdns: config.mdns.unwrap_or(true),
            ipc: config.ipc.unwrap_or(false),
            ipc_socket: config.ipc_socket,
            ws: config.ws.unwrap_or(false),
            ws_addr: config.ws_addr,
            name: config.name,
        };
        let inner = off_loop(move || ffi::Agent::start(config)).await?;
        Ok(Agent { inner })
    }

    #[napi]
    pub fn device_id(&self) -> String {
        self.inner.device_id()
    }

    #[napi]
    pub fn name(&self) -> String {
        self.inner.name()
    }

    #[napi]
    pub fn listen_addrs(&self) -> Vec<String> {
        self.inner.listen_addrs()
    }

    #[napi]
    pub fn ws_url(&self) -> Option<String> {
        self.inner.ws_url()
    }

    #[napi]
    pub fn is_running(&self) -> bool {
        self.inner.is_running()
    }

    /// Flushes, closes connections, listeners and endpoints, stops discovery (background).
    #[napi]
    pub async fn pause(&self) -> Result<()> {
        let inner = self.inner.clone();
        off_loop(move || inner.pause()).await
    }

    #[napi]
    pub async fn resume(&self) -> Result<()> {
        let inner = self.inner.clone();
        off_loop(move || inner.resume()).await
    }

    /// Flushes and stops the agent; subscriptions end (and stop holding the process open).
    #[napi]
    pub async fn shutdown(&self) -> Result<()> {
        let inner = self.inner.clone();
        off_loop(move || inner.shutdown()).await
    }

    #[napi]
    pub fn doc(&self, name: String) -> Result<Doc> {
        let inner = self.inner.doc(name).map_err(js_error)?;
        Ok(Doc { inner })
    }

    #[napi]
    pub fn list_docs(&self) -> Result<Vec<String>> {
        self.inner.list_docs().map_err(js_error)
    }

    /// Opens a pairing code for `expiresSecs` seconds.
    #[napi]
    pub async fn pair_open(&self, expires_secs: u32) -> Result<PairHost> {
        let inner = self.inner.clone();
        let host = off_loop(move || inner.pair_open(u64::from(expires_secs))).await?;
        Ok(PairHost { inner: host })
    }

    /// Pairs with the device showing `code` (found over mDNS, or dialed at `peerAddr`).
    #[napi]
    pub async fn pair_join(&self, code: String, peer_addr: Option<String>) -> Result<PairedDevice> {
        let inner = self.inner.clone();
        Ok(off_loop(move || inner.pair_join(code, peer_addr))
            .await?
            .into())
    }

    #[napi]
    pub fn devices(&self) -> Result<Vec<LinkedDevice>> {
        Ok(self
            .inner
            .devices()
            .map_err(js_error)?
            .into_iter()
            .map(|d| LinkedDevice {
                device_id: d.device_id,
                name: d.name,
                connected: d.connected,
            })
            .collect())
    }

    #[napi]
    pub async fn unpair(&self, device_id: String) -> Result<bool> {
        let inner = self.inner.clone();
        off_loop(move || inner.unpair(device_id)).await
    }

    #[napi]
    pub async fn publish_activity(&self, draft: ActivityDraft) -> Result<Activity> {
        let draft = ffi::ActivityDraft {
            activity_type: draft.activity_type,
            title: draft.title,
            docs: draft.docs,
            app_state_json: draft
                .app_state
                .unwrap_or(serde_json::Value::Null)
                .to_string(),
            ttl_secs: draft.ttl_secs.map(u64::from),
            id: draft.id,
        };
        let inner = self.inner.clone();
        activity(off_loop(move || inner.publish_activity(draft)).await?)
    }

    #[napi]
    pub fn activities(&self) -> Result<Vec<Activity>> {
        let list = self.inner.activities().map_err(js_error)?;
        list.into_iter().map(activity).collect()
    }

    #[napi]
    pub async fn unpublish_activity(&self, id: String) -> Result<()> {
        let inner = self.inner.clone();
        off_loop(move || inner.unpublish_activity(id)).await
    }

    /// Continues an activity here, its documents caught up (within `timeoutSecs`).
    #[napi]
    pub async fn handoff(&self, id: String, timeout_secs: u32) -> Result<HandoffResult> {
        let inner = self.inner.clone();
        let done = off_loop(move || inner.handoff(id, u64::from(timeout_secs))).await?;
        let docs = done
            .docs_json
            .into_iter()
            .map(|(name, json)| Ok((name, parse("a document", json)?)))
            .collect::<Result<_>>()?;
        Ok(HandoffResult {
            activity: activity(done.activity)?,
            docs,
        })
    }

    #[napi]
    pub fn conflicts(
        &self,
        doc: Option<String>,
        include_resolved: Option<bool>,
    ) -> Result<Vec<Conflict>> {
        let list = self
            .inner
            .conflicts(doc, include_resolved.unwrap_or(false))
            .map_err(js_error)?;
        list.into_iter().map(conflict).collect()
    }

    /// `keep`: "winner", "other", "local", "remote", or a value to write instead.
    #[napi]
    pub async fn resolve_conflict(&self, id: String, keep: serde_json::Value) -> Result<Conflict> {
        let keep = match keep {
            serde_json::Value::String(word)
                if matches!(word.as_str(), "winner" | "other" | "local" | "remote") =>
            {
                word
            }
            value => value.to_string(),
        };
        let inner = self.inner.clone();
        conflict(off_loop(move || inner.resolve_conflict(id, keep)).await?)
    }
}

/// An open pairing code.
#[napi]
pub struct PairHost {
    inner: Arc<ffi::PairHost>,
}

#[napi]
impl PairHost {
    #[napi]
    pub fn code(&self) -> String {
        self.inner.code()
    }

    /// Resolves when a device paired with the code; rejects when it expired or was burned.
    #[napi]
    pub async fn wait(&self) -> Result<PairedDevice> {
        let inner = self.inner.clone();
        Ok(off_loop(move || inner.wait()).await?.into())
    }
}

/// `(update: Buffer, origin: string) => void`, held strongly: a subscription keeps the process
/// alive until it is cancelled or the agent shuts down.
type UpdateCallback =
    ThreadsafeFunction<FnArgs<(Buffer, String)>, (), FnArgs<(Buffer, String)>, Status, false>;

struct JsListener {
    callback: UpdateCallback,
}

impl ffi::DocListener for JsListener {
    fn on_update(&self, update: Vec<u8>, origin: String) {
        // Fails only while Node exits: nothing is left to tell then.
        let _ = self.callback.call(
            (Buffer::from(update), origin).into(),
            ThreadsafeFunctionCallMode::NonBlocking,
        );
    }
}

/// A document of the embedded agent.
#[napi]
pub struct Doc {
    inner: Arc<ffi::Doc>,
}

#[napi]
impl Doc {
    #[napi]
    pub fn name(&self) -> String {
        self.inner.name()
    }

    /// Sets `key` of the root map `map` to a JSON value; resolves once durable.
    #[napi]
    pub async fn set(&self, map: String, key: String, value: serde_json::Value) -> Result<()> {
        let inner = self.inner.clone();
        off_loop(move || inner.set(map, key, value.to_string())).await
    }

    #[napi]
    pub fn get(&self, map: String, key: String) -> Result<serde_json::Value> {
        parse("a value", self.inner.get(map, key).map_err(js_error)?)
    }

    /// The whole document: every root by name.
    #[napi]
    pub fn get_json(&self) -> Result<serde_json::Value> {
        parse("the document", self.inner.get_json().map_err(js_error)?)
    }

    #[napi]
    pub async fn text_append(&self, name: String, text: String) -> Result<()> {
        let inner = self.inner.clone();
        off_loop(move || inner.text_append(name, text)).await
    }

    #[napi]
    pub fn text(&self, name: String) -> Result<String> {
        self.inner.text(name).map_err(js_error)
    }

    /// Applies a Yjs v1 update (from `Y.encodeStateAsUpdate`...); resolves once durable.
    #[napi]
    pub async fn apply_update(&self, update: Uint8Array) -> Result<()> {
        let inner = self.inner.clone();
        let update = update.to_vec();
        off_loop(move || inner.apply_update(update)).await
    }

    #[napi]
    pub fn state_vector(&self) -> Result<Buffer> {
        Ok(self.inner.state_vector().map_err(js_error)?.into())
    }

    /// What the holder of `stateVector` lacks, as one Yjs v1 update.
    #[napi]
    pub fn diff(&self, state_vector: Uint8Array) -> Result<Buffer> {
        Ok(self
            .inner
            .diff(state_vector.to_vec())
            .map_err(js_error)?
            .into())
    }

    /// Calls `callback(update, origin)` for every change from now on.
    #[napi]
    pub fn subscribe(&self, callback: UpdateCallback) -> Result<Subscription> {
        let listener = Arc::new(JsListener { callback });
        let inner = self.inner.subscribe(listener).map_err(js_error)?;
        Ok(Subscription { inner })
    }
}

#[napi]
pub struct Subscription {
    inner: Arc<ffi::Subscription>,
}

#[napi]
impl Subscription {
    #[napi]
    pub fn cancel(&self) {
        self.inner.cancel();
    }
}
