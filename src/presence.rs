//! `PresenceHub`: who is in a document right now (cursors, user names, colours), for every app
//! of this device and every connected device.
//!
//! Presence is Yjs *awareness*: per document, a map from a client id to a JSON state with a
//! clock, merged by the y-protocols rule (a higher clock wins; at an equal clock a removal wins).
//! It is ephemeral: kept in memory only, never stored, removed when its client leaves (its
//! connection closes, its device disconnects) or after [`OUTDATED`] without a renewal.
//!
//! Changes go out as [`PresenceEvent`]s to the y-websocket endpoint, IPC subscribers and sync
//! sessions (which forward them to peers, see protocol/README.md §23).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use tokio::sync::broadcast;
use yrs::block::ClientID;
use yrs::sync::awareness::{AwarenessUpdate, AwarenessUpdateEntry};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;

/// A state not renewed for this long is removed (as y-protocols does).
pub const OUTDATED: Duration = Duration::from_secs(30);
/// Largest JSON state of one client.
pub const MAX_STATE_LEN: usize = 64 * 1024;
/// Most clients present in one document; further ones are ignored.
pub const MAX_CLIENTS_PER_DOC: usize = 256;
/// Most documents with presence at once; presence in further ones is ignored.
pub const MAX_DOCS: usize = 65_536;
/// Most JSON held over every document and client; states beyond it are ignored until others
/// leave (presence is a few hundred bytes per user: this is tens of thousands of users).
pub const MAX_TOTAL_BYTES: usize = 16 << 20;
/// Most clients one local client (a connection) speaks for in one document: a Yjs provider
/// has one.
pub const MAX_CLIENTS_PER_LOCAL: usize = 4;
/// Events buffered per subscriber; a slower one misses some and re-reads [`PresenceHub::states`].
/// Each event holds the states it changed, so this also bounds what a slow subscriber pins.
const EVENT_CAPACITY: usize = 256;
/// JSON of a removed state.
const REMOVED: &str = "null";

/// Where a presence change came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// A local client (a y-websocket connection or an IPC connection), by its id.
    Local(u64),
    /// Another device, over sync.
    Peer(PeerId),
    /// This hub: a state that was not renewed in time.
    Expired,
}

/// Changed presence in one document.
#[derive(Debug, Clone)]
pub struct PresenceEvent {
    pub doc: Arc<str>,
    /// The changed clients only (removed ones with the JSON `null`).
    pub update: Arc<AwarenessUpdate>,
    pub source: Source,
    /// Whether linked devices should hear of it. A removal that only reflects this device's
    /// view (an expiry, a lost link) stays local: the others judge for themselves.
    pub forward: bool,
}

impl PresenceEvent {
    /// The changed clients as JSON (see [`PresenceHub::states_json`]).
    pub fn states_json(&self) -> serde_json::Value {
        to_json(&self.update)
    }

    /// The change as a y-protocols awareness update.
    pub fn encode(&self) -> Vec<u8> {
        self.update.encode_v1()
    }
}

/// Errors of presence input.
#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error("malformed awareness update: {0}")]
    Malformed(String),
    #[error("awareness state of client {client} is {len} bytes; at most {MAX_STATE_LEN} are kept")]
    TooLarge { client: u64, len: usize },
    #[error("awareness state of client {0} is not JSON")]
    NotJson(u64),
}

struct Entry {
    clock: u32,
    /// `None` once removed (kept a while, so a late older update does not bring it back).
    json: Option<Arc<str>>,
    renewed: Instant,
    source: Source,
}

/// Presence of every document, shared by the agent's endpoints and sessions.
pub struct PresenceHub {
    docs: Mutex<HashMap<Arc<str>, HashMap<u64, Entry>>>,
    /// Bytes of JSON held in `docs` (changed under its lock).
    held: std::sync::atomic::AtomicUsize,
    events: broadcast::Sender<PresenceEvent>,
    next_local: AtomicU64,
    /// Signalled when an entry is stored, so expiry sleeps while nobody is present.
    stored: tokio::sync::Notify,
}

impl Default for PresenceHub {
    fn default() -> Self {
        Self {
            docs: Mutex::new(HashMap::new()),
            held: std::sync::atomic::AtomicUsize::new(0),
            events: broadcast::channel(EVENT_CAPACITY).0,
            next_local: AtomicU64::new(1),
            stored: tokio::sync::Notify::new(),
        }
    }
}

impl PresenceHub {
    /// Every later presence change, in every document.
    pub fn subscribe(&self) -> broadcast::Receiver<PresenceEvent> {
        self.events.subscribe()
    }

    /// A fresh id for a local client ([`Source::Local`]).
    pub(crate) fn local_id(&self) -> u64 {
        self.next_local.fetch_add(1, Ordering::Relaxed)
    }

    /// Decodes a y-protocols awareness update and applies it.
    pub(crate) fn apply_encoded(
        &self,
        doc: &str,
        bytes: &[u8],
        source: Source,
    ) -> Result<usize, PresenceError> {
        crate::nesting::check_awareness_v1(bytes)
            .map_err(|e| PresenceError::Malformed(e.to_string()))?;
        let update = AwarenessUpdate::decode_v1(bytes)
            .map_err(|e| PresenceError::Malformed(e.to_string()))?;
        self.apply(doc, update, source)
    }

    /// Applies an awareness update from `source`; returns how many clients changed. Entries
    /// that are too large or not JSON fail the whole update (nothing is applied).
    pub(crate) fn apply(
        &self,
        doc: &str,
        update: AwarenessUpdate,
        source: Source,
    ) -> Result<usize, PresenceError> {
        for (client, entry) in &update.clients {
            if entry.json.len() > MAX_STATE_LEN {
                return Err(PresenceError::TooLarge {
                    client: client.get(),
                    len: entry.json.len(),
                });
            }
            if serde_json::from_str::<serde::de::IgnoredAny>(&entry.json).is_err() {
                return Err(PresenceError::NotJson(client.get()));
            }
        }
        let now = Instant::now();
        let mut changed = HashMap::new();
        let name = {
            let mut docs = lock(&self.docs);
            let full = docs.len() >= MAX_DOCS;
            let Some((name, clients)) = doc_entry(&mut docs, doc, full) else {
                return Ok(0);
            };
            for (client, incoming) in update.clients {
                let removal = &*incoming.json == REMOVED;
                let local = matches!(source, Source::Local(_));
                let current = clients.get(&client.get());
                // A state coming (back) to life takes a place: bounded per document (live ones,
                // and entries kept at all) and, for a local client, per connection (its live
                // ones, and its removals kept a while, so set/remove cycles cannot fill a
                // document with removals either).
                let comes_alive = !removal && current.is_none_or(|c| c.json.is_none());
                let has_room = || {
                    let live = clients.values().filter(|e| e.json.is_some()).count();
                    let kept_room = current.is_some() || clients.len() < 2 * MAX_CLIENTS_PER_DOC;
                    let (own_live, own_all) = clients
                        .values()
                        .filter(|e| e.source == source)
                        .fold((0, 0), |(l, a), e| {
                            (l + usize::from(e.json.is_some()), a + 1)
                        });
                    live < MAX_CLIENTS_PER_DOC
                        && kept_room
                        && (!local
                            || (own_live < MAX_CLIENTS_PER_LOCAL
                                && own_all < 4 * MAX_CLIENTS_PER_LOCAL))
                };
                let accept = match current {
                    // As y-protocols: a client not held counts as held at clock 0, so its
                    // first entry needs a clock above 0 (§23).
                    None => !removal && incoming.clock > 0,
                    // A local app speaks for its own clients only: it cannot take over (or, by
                    // leaving, remove) a client another app or device set.
                    Some(current)
                        if local && current.json.is_some() && current.source != source =>
                    {
                        false
                    }
                    Some(current) => {
                        incoming.clock > current.clock
                            || (incoming.clock == current.clock
                                && removal
                                && current.json.is_some())
                    }
                } && (!comes_alive || has_room());
                let old_len = current.and_then(|e| e.json.as_ref()).map_or(0, |j| j.len());
                let new_len = if removal { 0 } else { incoming.json.len() };
                let held = self.held.load(Ordering::Relaxed);
                if !accept || (new_len > old_len && held + new_len - old_len > MAX_TOTAL_BYTES) {
                    continue;
                }
                self.held.store(held + new_len - old_len, Ordering::Relaxed);
                clients.insert(
                    client.get(),
                    Entry {
                        clock: incoming.clock,
                        json: (!removal).then(|| incoming.json.clone()),
                        renewed: now,
                        source,
                    },
                );
                changed.insert(client, incoming);
            }
            name
        };
        let count = changed.len();
        if count > 0 {
            self.stored.notify_one();
            self.emit(name, changed, source, true);
        }
        Ok(count)
    }

    /// Everyone present now that `peer` did not tell this device about, per document: what a
    /// sync session with `peer` sends when it starts (§23), so the peer sees who is here at once
    /// rather than at the next renewal.
    pub(crate) fn held_for(&self, peer: PeerId) -> Vec<(Arc<str>, AwarenessUpdate)> {
        let docs = lock(&self.docs);
        docs.iter()
            .filter_map(|(doc, clients)| {
                let clients: HashMap<ClientID, AwarenessUpdateEntry> = clients
                    .iter()
                    .filter(|(_, e)| e.source != Source::Peer(peer))
                    .filter_map(|(id, e)| {
                        let json = e.json.clone()?;
                        Some((
                            ClientID::new(*id),
                            AwarenessUpdateEntry {
                                clock: e.clock,
                                json,
                            },
                        ))
                    })
                    .collect();
                (!clients.is_empty()).then(|| (doc.clone(), AwarenessUpdate { clients }))
            })
            .collect()
    }

    /// A new local client of the hub (a y-websocket or IPC connection, an embedding app): what
    /// it sets is marked as its own and removed everywhere when it is dropped.
    pub fn client(self: &Arc<Self>) -> PresenceClient {
        PresenceClient {
            hub: self.clone(),
            id: self.local_id(),
            used: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Everyone present in `doc` now as JSON: `[{"client", "clock", "state"}]`.
    pub fn states_json(&self, doc: &str) -> serde_json::Value {
        to_json(&self.states(doc))
    }

    /// Everyone present in `doc` now, as one awareness update (empty if nobody).
    pub fn states(&self, doc: &str) -> AwarenessUpdate {
        self.snapshot(doc, false)
    }

    /// [`PresenceHub::states`] plus the recent removals (JSON `null`), for a client that
    /// (re)joins: a y-protocols client that finds its own earlier state removed raises its clock
    /// and announces itself again at once, instead of at its next renewal.
    pub fn states_for_join(&self, doc: &str) -> AwarenessUpdate {
        self.snapshot(doc, true)
    }

    fn snapshot(&self, doc: &str, removed: bool) -> AwarenessUpdate {
        let docs = lock(&self.docs);
        let clients = docs
            .get(doc)
            .map(|clients| {
                clients
                    .iter()
                    .filter_map(|(id, e)| {
                        let json = match &e.json {
                            Some(json) => json.clone(),
                            None if removed => Arc::from(REMOVED),
                            None => return None,
                        };
                        Some((
                            ClientID::new(*id),
                            AwarenessUpdateEntry {
                                clock: e.clock,
                                json,
                            },
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        AwarenessUpdate { clients }
    }

    /// Removes every state `source` set (a client left, a device disconnected).
    pub(crate) fn remove_source(&self, source: Source) {
        let forward = matches!(source, Source::Local(_));
        self.remove_where(|e| e.source == source, source, forward);
    }

    /// Removes states not renewed within [`OUTDATED`], and forgets old removals.
    pub(crate) fn expire(&self) {
        let now = Instant::now();
        self.remove_where(
            |e| now.duration_since(e.renewed) >= OUTDATED,
            Source::Expired,
            false,
        );
        lock(&self.docs).retain(|_, clients| {
            clients.retain(|_, e| e.json.is_some() || now.duration_since(e.renewed) < OUTDATED);
            !clients.is_empty()
        });
    }

    /// Runs [`PresenceHub::expire`] every few seconds while anyone is present, until the hub
    /// is dropped; with nobody present it sleeps until someone is (checking for the drop
    /// every minute).
    pub(crate) async fn expire_forever(hub: std::sync::Weak<PresenceHub>) {
        loop {
            let Some(strong) = hub.upgrade() else { return };
            if lock(&strong.docs).is_empty() {
                let _ =
                    tokio::time::timeout(Duration::from_secs(60), strong.stored.notified()).await;
            } else {
                tokio::time::sleep(OUTDATED / 10).await;
                strong.expire();
            }
        }
    }

    /// How many clients are present, over all documents.
    pub fn present(&self) -> usize {
        lock(&self.docs)
            .values()
            .map(|c| c.values().filter(|e| e.json.is_some()).count())
            .sum()
    }

    fn remove_where(&self, mut pick: impl FnMut(&Entry) -> bool, source: Source, forward: bool) {
        let now = Instant::now();
        let mut removed: Vec<(Arc<str>, HashMap<ClientID, AwarenessUpdateEntry>)> = Vec::new();
        {
            let mut docs = lock(&self.docs);
            for (name, clients) in docs.iter_mut() {
                let mut gone = HashMap::new();
                for (id, entry) in clients.iter_mut() {
                    if entry.json.is_none() || !pick(entry) {
                        continue;
                    }
                    entry.clock = entry.clock.wrapping_add(1);
                    if let Some(json) = entry.json.take() {
                        self.held.fetch_sub(json.len(), Ordering::Relaxed);
                    }
                    entry.renewed = now;
                    gone.insert(
                        ClientID::new(*id),
                        AwarenessUpdateEntry {
                            clock: entry.clock,
                            json: Arc::from(REMOVED),
                        },
                    );
                }
                if !gone.is_empty() {
                    removed.push((name.clone(), gone));
                }
            }
        }
        for (doc, gone) in removed {
            self.emit(doc, gone, source, forward);
        }
    }

    fn emit(
        &self,
        doc: Arc<str>,
        clients: HashMap<ClientID, AwarenessUpdateEntry>,
        source: Source,
        forward: bool,
    ) {
        let _ = self.events.send(PresenceEvent {
            doc,
            update: Arc::new(AwarenessUpdate { clients }),
            source,
            forward,
        });
    }
}

/// One local client's presence: its changes carry its [`Source::Local`] id, and its states leave
/// every device when it is dropped (its connection closed).
pub struct PresenceClient {
    hub: Arc<PresenceHub>,
    id: u64,
    /// Whether it applied anything: one that never did has nothing to remove when dropped
    /// (and skips the walk over every document's presence).
    used: std::sync::atomic::AtomicBool,
}

impl PresenceClient {
    /// This client's local id (the id of its [`Source::Local`]).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Applies an awareness update from this client; returns how many clients changed.
    pub fn apply(&self, doc: &str, update: AwarenessUpdate) -> Result<usize, PresenceError> {
        self.used.store(true, Ordering::Relaxed);
        self.hub.apply(doc, update, Source::Local(self.id))
    }

    /// Decodes a y-protocols awareness update from this client and applies it.
    pub fn apply_encoded(&self, doc: &str, bytes: &[u8]) -> Result<usize, PresenceError> {
        self.used.store(true, Ordering::Relaxed);
        self.hub.apply_encoded(doc, bytes, Source::Local(self.id))
    }

    /// How often a client renews the states it holds, so they do not expire (half of
    /// [`OUTDATED`], as y-protocols does).
    pub const RENEW_EVERY: Duration = Duration::from_secs(OUTDATED.as_secs() / 2);

    /// Sets awareness client `client`'s state at `clock` (JSON; `None` to leave) as this client.
    pub fn set(
        &self,
        doc: &str,
        client: u64,
        clock: u32,
        state: Option<&serde_json::Value>,
    ) -> Result<usize, PresenceError> {
        self.apply(doc, single(client, clock, state))
    }

    /// Whether `source` is this client (to leave its own changes out of what it is sent).
    pub fn is(&self, source: Source) -> bool {
        source == Source::Local(self.id)
    }
}

impl Drop for PresenceClient {
    fn drop(&mut self) {
        if self.used.load(Ordering::Relaxed) {
            self.hub.remove_source(Source::Local(self.id));
        }
    }
}

/// The clients of `doc`, created unless the hub is `full`.
fn doc_entry<'a>(
    docs: &'a mut HashMap<Arc<str>, HashMap<u64, Entry>>,
    doc: &str,
    full: bool,
) -> Option<(Arc<str>, &'a mut HashMap<u64, Entry>)> {
    let name = match docs.get_key_value(doc) {
        Some((name, _)) => name.clone(),
        None if full => return None,
        None => Arc::from(doc),
    };
    let clients = docs.entry(name.clone()).or_default();
    Some((name, clients))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A one-client awareness update: `state` (JSON, `None` to leave) at `clock`.
pub fn single(client: u64, clock: u32, state: Option<&serde_json::Value>) -> AwarenessUpdate {
    let json: Arc<str> = match state {
        Some(v) => Arc::from(v.to_string()),
        None => Arc::from(REMOVED),
    };
    AwarenessUpdate {
        clients: HashMap::from([(ClientID::new(client), AwarenessUpdateEntry { clock, json })]),
    }
}

/// `[{"client": id, "state": json-or-null}]` for an IPC event.
pub fn to_json(update: &AwarenessUpdate) -> serde_json::Value {
    let mut list: Vec<_> = update
        .clients
        .iter()
        .map(|(id, e)| {
            serde_json::json!({
                "client": id.get(),
                "clock": e.clock,
                "state": serde_json::from_str::<serde_json::Value>(&e.json).unwrap_or(serde_json::Value::Null),
            })
        })
        .collect();
    list.sort_by_key(|v| v["client"].as_u64());
    serde_json::Value::Array(list)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn higher_clocks_win_and_removals_win_ties() {
        let hub = PresenceHub::default();
        let mut events = hub.subscribe();
        let alice = json!({"user": {"name": "alice"}});
        assert_eq!(
            hub.apply("d", single(1, 1, Some(&alice)), Source::Local(9))
                .unwrap(),
            1
        );
        // The same clock again changes nothing (a duplicate, e.g. forwarded twice).
        assert_eq!(
            hub.apply("d", single(1, 1, Some(&json!({}))), Source::Local(9))
                .unwrap(),
            0
        );
        assert_eq!(hub.states("d").clients.len(), 1);
        assert_eq!(
            hub.apply("d", single(1, 1, None), Source::Local(9))
                .unwrap(),
            1
        );
        assert!(hub.states("d").clients.is_empty());
        // An older state does not come back after a removal.
        assert_eq!(
            hub.apply("d", single(1, 0, Some(&alice)), Source::Local(9))
                .unwrap(),
            0
        );
        assert_eq!(events.try_recv().unwrap().update.clients.len(), 1);
        assert!(events.try_recv().is_ok());
        assert!(events.try_recv().is_err());
        // A client never seen before at clock 0 is dropped, as y-protocols drops it.
        assert_eq!(
            hub.apply("d", single(2, 0, Some(&alice)), Source::Local(9))
                .unwrap(),
            0
        );
        assert!(hub.states("d").clients.is_empty());
    }

    #[test]
    fn a_leaving_source_takes_its_states_along() {
        let hub = PresenceHub::default();
        let peer = PeerId::random();
        hub.apply("d", single(1, 3, Some(&json!(1))), Source::Local(1))
            .unwrap();
        hub.apply("d", single(2, 3, Some(&json!(2))), Source::Peer(peer))
            .unwrap();
        let mut events = hub.subscribe();
        hub.remove_source(Source::Peer(peer));
        let event = events.try_recv().unwrap();
        assert!(!event.forward, "a lost link is not news for other devices");
        assert_eq!(&*event.update.clients[&ClientID::new(2)].json, "null");
        assert_eq!(event.update.clients[&ClientID::new(2)].clock, 4);
        assert_eq!(hub.present(), 1);
        hub.remove_source(Source::Local(1));
        assert!(events.try_recv().unwrap().forward);
        assert_eq!(hub.present(), 0);
    }

    #[test]
    fn oversized_or_non_json_states_are_refused() {
        let hub = PresenceHub::default();
        let big = json!("x".repeat(MAX_STATE_LEN));
        assert!(matches!(
            hub.apply("d", single(1, 1, Some(&big)), Source::Local(1)),
            Err(PresenceError::TooLarge { .. })
        ));
        let mut bad = single(1, 1, None);
        bad.clients.get_mut(&ClientID::new(1)).unwrap().json = Arc::from("{nope");
        assert!(matches!(
            hub.apply("d", bad, Source::Local(1)),
            Err(PresenceError::NotJson(1))
        ));
        assert!(matches!(
            hub.apply_encoded("d", &[5, 1], Source::Local(1)),
            Err(PresenceError::Malformed(_))
        ));
    }

    #[test]
    fn a_document_holds_a_bounded_number_of_clients() {
        let hub = PresenceHub::default();
        for client in 0..(MAX_CLIENTS_PER_DOC as u64 + 10) {
            let source = Source::Local(client + 1);
            hub.apply("d", single(client, 1, Some(&json!({}))), source)
                .unwrap();
        }
        assert_eq!(hub.present(), MAX_CLIENTS_PER_DOC);
    }

    /// Issue 22, finding 7: a local app cannot set, take over or (by leaving) remove a client
    /// another app set, nor speak for more than a few clients.
    #[test]
    fn a_local_app_speaks_for_its_own_clients_only() {
        let hub = Arc::new(PresenceHub::default());
        let alice = hub.client();
        let mallory = hub.client();
        alice
            .apply("d", single(42, 1, Some(&json!({"user": "alice"}))))
            .unwrap();
        assert_eq!(
            mallory
                .apply("d", single(42, 9, Some(&json!({"user": "mallory"}))))
                .unwrap(),
            0
        );
        assert_eq!(mallory.apply("d", single(42, 9, None)).unwrap(), 0);
        drop(mallory);
        assert!(hub.states_json("d").to_string().contains("alice"));
        let many = hub.client();
        for client in 100..120 {
            many.apply("d", single(client, 1, Some(&json!({}))))
                .unwrap();
        }
        assert_eq!(hub.present(), 1 + MAX_CLIENTS_PER_LOCAL);
        // Removing its clients and setting them (or others) again gains it nothing.
        let cycler = hub.client();
        for round in 0..50u32 {
            for client in 200..210 {
                let _ = cycler.apply("d", single(client, 2 * round + 1, Some(&json!({}))));
                let _ = cycler.apply("d", single(client, 2 * round + 2, None));
            }
            for client in 200..210 {
                let _ = cycler.apply("d", single(client, 2 * round + 3, Some(&json!({}))));
            }
        }
        assert!(hub.present() <= 1 + 2 * MAX_CLIENTS_PER_LOCAL);
        let entries = lock(&hub.docs)["d"].len();
        assert!(
            entries <= 1 + 5 * MAX_CLIENTS_PER_LOCAL,
            "{entries} entries kept"
        );
    }

    /// Issue 22, finding 7: the JSON held over every document has a bound; leaving frees it.
    #[test]
    fn presence_holds_a_bounded_number_of_bytes() {
        let hub = Arc::new(PresenceHub::default());
        let state = json!({"pad": "x".repeat(MAX_STATE_LEN - 100)});
        let clients: Vec<_> = (0..(MAX_TOTAL_BYTES / MAX_STATE_LEN + 50) as u64)
            .map(|i| {
                let client = hub.client();
                client
                    .apply(&format!("d{i}"), single(i + 1, 1, Some(&state)))
                    .unwrap();
                client
            })
            .collect();
        let held = hub.held.load(Ordering::Relaxed);
        assert!(held <= MAX_TOTAL_BYTES, "{held}");
        assert!(hub.present() < clients.len());
        drop(clients);
        assert_eq!(hub.held.load(Ordering::Relaxed), 0);
        let late = hub.client();
        assert_eq!(late.apply("late", single(1, 1, Some(&state))).unwrap(), 1);
    }
}
