//! What the agent knows about its peers right now: connection, sync progress, last sync time.
//! `PeerTable` is updated by the network loop and the sync sessions and read by `status()`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use libp2p::PeerId;
use serde::Serialize;
use yrs::StateVector;

/// A snapshot of one peer's state, as reported by [`crate::AgentHandle::status`].
#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    pub device_id: String,
    pub name: Option<String>,
    pub trusted: bool,
    pub connected: bool,
    /// A sync session is running (hello exchanged).
    pub syncing: bool,
    /// How many documents' initial state-vector exchange with this peer completed in this session.
    pub synced_docs: usize,
    /// The changed-only path (feature `feed`) is in use with this peer.
    pub changed_only: bool,
    /// Catching up with the peer's changes in this session: documents pulled / listed by the
    /// peer, and whether all arrived.
    pub docs_done: usize,
    pub docs_total: usize,
    pub caught_up: bool,
    /// Documents this device answered the peer's requests for, in this session.
    pub docs_answered: usize,
    /// Bytes of sync frames received from / sent to the peer in this session.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Documents that failed to sync with this peer, with the reason (the session goes on).
    pub doc_errors: BTreeMap<String, String>,
    /// Per document: how much of this device's content the peer is not known to have yet, in
    /// Yjs clock units (one per inserted character, item or map write); 0 = in sync. Only for
    /// documents whose state the peer has told us in this session and that are loaded now, at
    /// most [`MAX_PENDING_SHOWN`] of them (`docs_done`/`docs_total` count them all).
    pub pending: BTreeMap<String, u64>,
    /// When the last update or sync answer from this peer arrived.
    #[serde(serialize_with = "ser_time")]
    pub last_sync: Option<SystemTime>,
    /// Why the last session with this peer ended, if it ended with an error.
    pub last_error: Option<String>,
    /// How this device found the peer (mdns, address, it dialed us...).
    pub found_via: BTreeSet<String>,
    /// The address of the last connection.
    pub address: Option<String>,
    /// How it is connected now: `LAN-direct`, `direct`, `punched-direct` or `relayed`.
    pub link: Option<&'static str>,
    /// How the last hole punch with it went (it started relayed), if one was tried.
    pub punch: Option<String>,
    /// It refused this device as removed from the device group (until a session with it runs
    /// again, after a new pairing).
    pub removed_this_device: bool,
}

/// Most documents listed in [`PeerStatus::pending`].
pub const MAX_PENDING_SHOWN: usize = 1000;

/// Devices that are not trusted (strangers: devices trying to pair, refused peers, scanners)
/// are kept for status at most this many, the most recently seen...
pub const MAX_STRANGERS: usize = 32;
/// ... and for at most this long after their last connection closed.
pub const STRANGER_TTL: std::time::Duration = std::time::Duration::from_secs(600);

/// A Unix time in seconds as the local wall-clock time people read, with how long ago it was:
/// `14:02:11 (3 s ago)`, or with the date when it is not today.
pub fn local_time(unix_secs: f64) -> String {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let ago = (now - unix_secs).max(0.0);
    let ago = match ago as u64 {
        s if s < 120 => format!("{s} s ago"),
        s if s < 7200 => format!("{} min ago", s / 60),
        s if s < 172_800 => format!("{} h ago", s / 3600),
        s => format!("{} days ago", s / 86_400),
    };
    let (Some(at), Some(today)) = (local_fields(unix_secs as i64), local_fields(now as i64)) else {
        return ago;
    };
    let clock = format!("{:02}:{:02}:{:02}", at.tm_hour, at.tm_min, at.tm_sec);
    if (at.tm_year, at.tm_yday) == (today.tm_year, today.tm_yday) {
        format!("{clock} ({ago})")
    } else {
        format!(
            "{}-{:02}-{:02} {clock} ({ago})",
            at.tm_year + 1900,
            at.tm_mon + 1,
            at.tm_mday
        )
    }
}

/// The local calendar fields of a Unix time (the C library's time zone rules).
fn local_fields(unix_secs: i64) -> Option<libc::tm> {
    // time_t is 32 bits on some targets.
    #[allow(clippy::useless_conversion)]
    let time: libc::time_t = unix_secs.try_into().ok()?;
    // SAFETY: localtime_r only writes the `tm` it is given and reads `time`; a zeroed `tm` is a
    // valid value of this plain C struct.
    unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        (!libc::localtime_r(&time, &mut tm).is_null()).then_some(tm)
    }
}

fn ser_time<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    let secs = t
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map(|d| d.as_secs_f64());
    secs.serialize(s)
}

#[derive(Debug)]
struct PeerState {
    /// When the peer last connected, disconnected or otherwise changed (for forgetting strangers).
    seen: std::time::Instant,
    name: Option<String>,
    connections: u32,
    sessions: u32,
    synced_docs: usize,
    changed_only: bool,
    docs_done: usize,
    docs_total: usize,
    caught_up: bool,
    docs_answered: usize,
    /// This session's traffic, counted by the session itself without taking the table lock.
    traffic: Arc<Traffic>,
    doc_errors: BTreeMap<String, String>,
    /// What the peer is known to hold, per document (its SyncStep1, what it sent, what we sent).
    known: HashMap<String, StateVector>,
    last_sync: Option<SystemTime>,
    last_error: Option<String>,
    found_via: BTreeSet<String>,
    address: Option<String>,
    link: Option<&'static str>,
    punch: Option<String>,
    removed_this_device: bool,
}

impl Default for PeerState {
    fn default() -> Self {
        Self {
            seen: std::time::Instant::now(),
            name: None,
            connections: 0,
            sessions: 0,
            synced_docs: 0,
            changed_only: false,
            docs_done: 0,
            docs_total: 0,
            caught_up: false,
            docs_answered: 0,
            traffic: Arc::default(),
            doc_errors: BTreeMap::new(),
            known: HashMap::new(),
            last_sync: None,
            last_error: None,
            found_via: BTreeSet::new(),
            address: None,
            link: None,
            punch: None,
            removed_this_device: false,
        }
    }
}

/// Bytes of sync frames (with their length prefix) received and sent in one session.
#[derive(Debug, Default)]
pub(crate) struct Traffic {
    pub received: AtomicU64,
    pub sent: AtomicU64,
}

impl Traffic {
    pub fn received(&self, bytes: usize) {
        self.received.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn sent(&self, bytes: usize) {
        self.sent.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

/// Live per-peer state shared by the network loop and sessions.
#[derive(Debug, Default)]
pub(crate) struct PeerTable {
    peers: Mutex<HashMap<PeerId, PeerState>>,
}

impl PeerTable {
    fn lock(&self) -> MutexGuard<'_, HashMap<PeerId, PeerState>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn connected(&self, peer: PeerId, connections: u32) {
        let mut peers = self.lock();
        let state = peers.entry(peer).or_default();
        state.connections = connections;
        state.seen = std::time::Instant::now();
    }

    /// Forgets untrusted devices beyond [`MAX_STRANGERS`] (least recently seen first) and those
    /// not connected for [`STRANGER_TTL`], so throw-away identities cannot grow the table.
    pub fn forget_strangers(&self, is_trusted: impl Fn(&PeerId) -> bool) {
        let mut peers = self.lock();
        let mut strangers: Vec<(std::time::Instant, PeerId, bool)> = peers
            .iter()
            .filter(|(id, _)| !is_trusted(id))
            .map(|(id, s)| (s.seen, *id, s.connections > 0))
            .collect();
        if strangers.is_empty() {
            return;
        }
        strangers.sort_unstable_by_key(|s| std::cmp::Reverse(s.0));
        for (i, (seen, id, connected)) in strangers.into_iter().enumerate() {
            if i >= MAX_STRANGERS || (!connected && seen.elapsed() > STRANGER_TTL) {
                peers.remove(&id);
            }
        }
    }

    pub fn found_via(&self, peer: PeerId, how: &str) {
        self.lock()
            .entry(peer)
            .or_default()
            .found_via
            .insert(how.to_string());
    }

    pub fn set_address(&self, peer: PeerId, address: String) {
        self.lock().entry(peer).or_default().address = Some(address);
    }

    /// How the peer is connected now (`None`: not connected) and how its last hole punch went.
    pub fn set_link(&self, peer: PeerId, link: Option<&'static str>, punch: Option<String>) {
        let mut peers = self.lock();
        let state = peers.entry(peer).or_default();
        state.link = link;
        state.punch = punch;
    }

    pub fn is_connected(&self, peer: &PeerId) -> bool {
        self.lock().get(peer).is_some_and(|p| p.connections > 0)
    }

    pub fn session_started(&self, peer: PeerId, name: &str, changed_only: bool) {
        let mut peers = self.lock();
        let state = peers.entry(peer).or_default();
        state.sessions += 1;
        state.name = Some(name.chars().take(64).collect());
        state.synced_docs = 0;
        state.known.clear();
        state.last_error = None;
        state.changed_only = changed_only;
        state.docs_done = 0;
        state.docs_total = 0;
        state.caught_up = !changed_only;
        state.docs_answered = 0;
        state.traffic = Arc::default();
        state.doc_errors.clear();
        state.removed_this_device = false;
    }

    /// `peer` refused this device as removed from the device group.
    pub fn removed_this_device(&self, peer: PeerId) {
        self.lock().entry(peer).or_default().removed_this_device = true;
    }

    /// Progress of catching up with the peer's changes.
    pub fn catch_up(&self, peer: PeerId, done: usize, total: usize) {
        let mut peers = self.lock();
        let state = peers.entry(peer).or_default();
        state.docs_done = done;
        state.docs_total = total;
    }

    pub fn caught_up(&self, peer: PeerId) {
        self.lock().entry(peer).or_default().caught_up = true;
    }

    pub fn answered(&self, peer: PeerId) {
        self.lock().entry(peer).or_default().docs_answered += 1;
    }

    /// The byte counters of the session that just started with `peer`.
    pub fn traffic(&self, peer: PeerId) -> Arc<Traffic> {
        self.lock().entry(peer).or_default().traffic.clone()
    }

    /// Records why `doc` failed to sync with `peer` (kept for the last 64 documents).
    pub fn doc_failed(&self, peer: PeerId, doc: &str, reason: &str) {
        let mut peers = self.lock();
        let errors = &mut peers.entry(peer).or_default().doc_errors;
        if errors.len() >= 64 && !errors.contains_key(doc) {
            errors.pop_first();
        }
        errors.insert(doc.to_string(), reason.to_string());
    }

    /// Records that `peer` holds at least `sv` of `doc`.
    pub fn peer_has(&self, peer: PeerId, doc: &str, sv: &StateVector) {
        let mut peers = self.lock();
        let known = peers
            .entry(peer)
            .or_default()
            .known
            .entry(doc.to_string())
            .or_default();
        for (client, clock) in sv.iter() {
            known.set_max(*client, *clock);
        }
    }

    pub fn session_ended(&self, peer: PeerId, error: Option<String>) {
        let mut peers = self.lock();
        let state = peers.entry(peer).or_default();
        state.sessions = state.sessions.saturating_sub(1);
        if state.sessions == 0 {
            state.synced_docs = 0;
            state.known.clear();
        }
        if error.is_some() {
            state.last_error = error;
        }
    }

    pub fn has_session(&self, peer: &PeerId) -> bool {
        self.lock().get(peer).is_some_and(|p| p.sessions > 0)
    }

    pub fn doc_synced(&self, peer: PeerId, doc: &str) {
        let mut peers = self.lock();
        let state = peers.entry(peer).or_default();
        let _ = doc;
        state.synced_docs += 1;
        state.last_sync = Some(SystemTime::now());
    }

    pub fn touched(&self, peer: PeerId) {
        self.lock().entry(peer).or_default().last_sync = Some(SystemTime::now());
    }

    pub fn set_error(&self, peer: PeerId, error: String) {
        self.lock().entry(peer).or_default().last_error = Some(error);
    }

    /// Status of every peer seen, merged with the trusted set (name from the trust store wins).
    /// `local_sv` gives this device's state vector of a document, to compute what is pending.
    pub fn snapshot(
        &self,
        trusted: &BTreeMap<PeerId, String>,
        local_sv: impl Fn(&str) -> Option<StateVector>,
    ) -> Vec<PeerStatus> {
        let peers = self.lock();
        let ids: BTreeSet<PeerId> = peers.keys().chain(trusted.keys()).copied().collect();
        ids.into_iter()
            .map(|id| {
                let state = peers.get(&id);
                PeerStatus {
                    device_id: id.to_string(),
                    name: trusted
                        .get(&id)
                        .cloned()
                        .or_else(|| state.and_then(|s| s.name.clone())),
                    trusted: trusted.contains_key(&id),
                    connected: state.is_some_and(|s| s.connections > 0),
                    syncing: state.is_some_and(|s| s.sessions > 0),
                    synced_docs: state.map_or(0, |s| s.synced_docs),
                    changed_only: state.is_some_and(|s| s.changed_only),
                    docs_done: state.map_or(0, |s| s.docs_done),
                    docs_total: state.map_or(0, |s| s.docs_total),
                    caught_up: state.is_some_and(|s| s.caught_up),
                    docs_answered: state.map_or(0, |s| s.docs_answered),
                    bytes_in: state.map_or(0, |s| s.traffic.received.load(Ordering::Relaxed)),
                    bytes_out: state.map_or(0, |s| s.traffic.sent.load(Ordering::Relaxed)),
                    doc_errors: state.map(|s| s.doc_errors.clone()).unwrap_or_default(),
                    pending: state
                        .map(|s| {
                            s.known
                                .iter()
                                .filter_map(|(doc, known)| {
                                    Some((doc.clone(), missing(&local_sv(doc)?, known)))
                                })
                                .take(MAX_PENDING_SHOWN)
                                .collect()
                        })
                        .unwrap_or_default(),
                    last_sync: state.and_then(|s| s.last_sync),
                    last_error: state.and_then(|s| s.last_error.clone()),
                    found_via: state.map(|s| s.found_via.clone()).unwrap_or_default(),
                    address: state.and_then(|s| s.address.clone()),
                    link: state.and_then(|s| s.link),
                    punch: state.and_then(|s| s.punch.clone()),
                    removed_this_device: state.is_some_and(|s| s.removed_this_device),
                }
            })
            .collect()
    }
}

/// How many clock units `local` has beyond `known`.
fn missing(local: &StateVector, known: &StateVector) -> u64 {
    local
        .iter()
        .map(|(client, clock)| u64::from(clock.saturating_sub(known.get(client))))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_counts_clock_units_beyond_the_known_state() {
        let mut local = StateVector::default();
        local.set_max(yrs::block::ClientID::new(1), 10);
        local.set_max(yrs::block::ClientID::new(2), 5);
        let mut known = StateVector::default();
        known.set_max(yrs::block::ClientID::new(1), 4);
        assert_eq!(missing(&local, &known), 6 + 5);
        known.set_max(yrs::block::ClientID::new(2), 9);
        known.set_max(yrs::block::ClientID::new(1), 10);
        assert_eq!(missing(&local, &known), 0);
    }
}
