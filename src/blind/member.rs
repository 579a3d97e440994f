//! A full member's side of a blind device: it fetches what it lacks, applies what it can open,
//! uploads what the blind device lacks, compacts, and hands new epoch keys to the other members.
//!
//! What this device knows the blind device holds of each document is kept per blind device
//! ([`MemberState`]): the state vector its envelopes add up to and the next sequence, so an
//! upload is exactly the Yjs diff the blind device lacks (local edits and those that came from
//! other devices alike). A document whose updates held on the blind device outweigh its
//! snapshot is compacted: the member asks which updates the snapshot must cover (`Heads`) and
//! uploads the whole document sealed as a snapshot; after a new epoch every document is
//! re-sealed that way.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::broadcast::error::RecvError;
use yrs::updates::encoder::Encode;
use yrs::StateVector;

use super::envelope::{doc_id, Content, DocId, Envelope, Epoch, Granted, Key, KeyGrant, Kind};
use super::keyring::{self, Keyring, KEYS_DOC};
use super::protocol::{framed, receive, send, BlindSessionError, Reply, Request, Transport};
use super::store::{Item, Refusal, Stored};
use crate::docs::{DocRegistry, Origin, RESERVED_PREFIX};
use crate::group::GROUP_DOC;
use crate::store::TrustStore;
use crate::sync::message::PROTOCOL_VERSION;

/// Uploads in flight at once (one per document).
const UPLOAD_WINDOW: usize = 64;
/// How long changes gather before they are uploaded. None: a change goes at once, and the
/// changes made while a document's upload awaits its answer go together in the next one (a
/// burst of keystrokes becomes a few envelopes, not one each).
const UPLOAD_DELAY: Duration = Duration::ZERO;
/// A document is compacted once the updates held for it on the blind device weigh at least
/// as much as its snapshot (and at least this much): storage stays under twice the snapshot,
/// and the snapshot of a document is re-sent after as many bytes of changes as it holds, so
/// the upload cost stays proportional to the changes.
const COMPACT_MIN_BYTES: u64 = 4 << 10;
/// How long after going idle the feed is read again (see `Session::run`).
const RECHECK_DELAY: Duration = Duration::from_millis(500);
/// How long to wait for the blind device's hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// What one member knows of one blind device, on disk (tree `blind_member`).
#[derive(Clone)]
pub struct MemberState {
    tree: sled::Tree,
}

/// What the blind device holds of one document, as far as this member knows.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Backup {
    /// This member's last sequence for the document.
    seq: u64,
    /// The state vector the blind device's envelopes add up to (Yjs v1).
    #[serde(with = "serde_bytes")]
    state: Vec<u8>,
    /// Hash of the delete set last uploaded or received (a change that only deletes moves no
    /// state vector).
    deletes: [u8; 32],
}

/// How far a member is with one blind device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// The last item index fetched and applied.
    pub fetched: u64,
    /// The last change of the local feed uploaded.
    pub uploaded: u64,
}

/// A member's report on one blind device (for `status`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupReport {
    pub device: String,
    /// Documents with at least one update or snapshot held there.
    pub documents: u64,
    pub fetched: u64,
    pub uploaded: u64,
    /// Documents with changes not on the blind device yet.
    pub behind: u64,
}

impl MemberState {
    pub fn open(db: &sled::Db) -> Result<Self, crate::store::StoreError> {
        Ok(Self {
            tree: db.open_tree("blind_member")?,
        })
    }

    fn progress_key(blind: &PeerId) -> Vec<u8> {
        let mut key = b"p".to_vec();
        key.extend_from_slice(&blind.to_bytes());
        key
    }

    fn doc_prefix(blind: &PeerId) -> Vec<u8> {
        let id = blind.to_bytes();
        let mut key = b"d".to_vec();
        key.push(id.len() as u8);
        key.extend_from_slice(&id);
        key
    }

    fn doc_key(blind: &PeerId, name: &str) -> Vec<u8> {
        let mut key = Self::doc_prefix(blind);
        key.extend_from_slice(name.as_bytes());
        key
    }

    fn granted_key(blind: &PeerId, epoch: &super::envelope::Epoch, to: &PeerId) -> Vec<u8> {
        let mut key = b"g".to_vec();
        key.extend_from_slice(&blind.to_bytes());
        key.extend_from_slice(&epoch.number.to_be_bytes());
        key.extend_from_slice(&epoch.key_id);
        key.extend_from_slice(&to.to_bytes());
        key
    }

    pub fn progress(&self, blind: &PeerId) -> Progress {
        self.tree
            .get(Self::progress_key(blind))
            .ok()
            .flatten()
            .and_then(|v| postcard::from_bytes(&v).ok())
            .unwrap_or_default()
    }

    fn set_progress(&self, blind: &PeerId, progress: &Progress) -> Result<(), sled::Error> {
        let bytes = postcard::to_allocvec(progress).unwrap_or_default();
        self.tree.insert(Self::progress_key(blind), bytes)?;
        self.tree.flush()?;
        Ok(())
    }

    fn backup(&self, blind: &PeerId, name: &str) -> Backup {
        self.tree
            .get(Self::doc_key(blind, name))
            .ok()
            .flatten()
            .and_then(|v| postcard::from_bytes(&v).ok())
            .unwrap_or_default()
    }

    fn set_backup(&self, blind: &PeerId, name: &str, backup: &Backup) -> Result<(), sled::Error> {
        let bytes = postcard::to_allocvec(backup).unwrap_or_default();
        self.tree.insert(Self::doc_key(blind, name), bytes)?;
        Ok(())
    }

    /// What this member knows of each blind device it has used.
    pub(crate) fn reports(&self, registry: &DocRegistry) -> Vec<BackupReport> {
        let mut out = Vec::new();
        for (key, value) in self.tree.scan_prefix(b"p").flatten() {
            let Ok(blind) = PeerId::from_bytes(&key[1..]) else {
                continue;
            };
            let progress: Progress = postcard::from_bytes(&value).unwrap_or_default();
            let documents = self.tree.scan_prefix(Self::doc_prefix(&blind)).count() as u64;
            out.push(BackupReport {
                device: blind.to_string(),
                documents,
                fetched: progress.fetched,
                uploaded: progress.uploaded,
                behind: self.behind(registry, &blind, progress.uploaded),
            });
        }
        out
    }
}

impl MemberState {
    /// Documents changed after feed position `uploaded` whose state the blind device does not
    /// hold all of (as far as this member knows).
    fn behind(&self, registry: &DocRegistry, blind: &PeerId, uploaded: u64) -> u64 {
        let Ok(store) = registry.store() else {
            return 0;
        };
        let Ok((names, _)) = store.changed_after(uploaded, usize::MAX) else {
            return 0;
        };
        let names: BTreeSet<String> = names
            .into_iter()
            .filter(|n| !n.starts_with(RESERVED_PREFIX) && !registry.is_deleted(n))
            .collect();
        names
            .iter()
            .filter(|name| {
                let held = decode_sv(&self.backup(blind, name).state);
                let local = registry.state_vector_of(name).map(|sv| decode_sv(&sv));
                local.is_ok_and(|local| {
                    !matches!(
                        local.partial_cmp(&held),
                        Some(std::cmp::Ordering::Less | std::cmp::Ordering::Equal)
                    )
                })
            })
            .count() as u64
    }
}

/// Stops the sessions of devices no longer trusted; the receiver completes once they stopped.
pub(crate) type StopUntrusted = Arc<dyn Fn() -> tokio::sync::oneshot::Receiver<()> + Send + Sync>;

/// What a member's blind sessions need.
#[derive(Clone)]
pub(crate) struct MemberCtx {
    pub registry: Arc<DocRegistry>,
    pub keypair: Keypair,
    pub trust: TrustStore,
    pub state: MemberState,
    pub stop_untrusted: StopUntrusted,
}

/// One upload waiting for its answer.
struct InFlight {
    name: String,
    seq: u64,
    state: Vec<u8>,
    deletes: [u8; 32],
}

/// One session with one blind device.
struct Session<'a> {
    ctx: &'a MemberCtx,
    blind: PeerId,
    me: PeerId,
    ring: Keyring,
    /// The sending half; the receiving half is read by its own task into `replies`, so this
    /// member never stops reading while it sends (two sides both blocked on sending would
    /// wait for each other for good).
    transport: futures::stream::SplitSink<Transport, bytes::Bytes>,
    replies: tokio::sync::mpsc::UnboundedReceiver<Result<Reply, BlindSessionError>>,
    /// Grants sent and not yet answered, in order (answers come in order).
    grants_pending: std::collections::VecDeque<Vec<u8>>,
    progress: Progress,
    /// The feed position the current uploads reach once done.
    upload_target: u64,
    caught: bool,
    /// Documents to upload, none of them in flight.
    dirty: BTreeSet<String>,
    /// Documents changed while their upload is in flight: dirty again once it is answered.
    again: BTreeSet<String>,
    in_flight: HashMap<DocId, InFlight>,
    /// Documents to compact or re-seal: asked `Heads`, waiting for the answer (then for the
    /// snapshot's, with what it holds).
    compacting: HashMap<DocId, String>,
    snapshots_in_flight: HashMap<DocId, InFlight>,
    /// Documents to re-seal under the current epoch, not asked yet.
    reseal: BTreeSet<String>,
    /// Last sequence per (document, author) received in this session: the blind device may
    /// not reorder or replay.
    seen: HashMap<(DocId, Vec<u8>), u64>,
    durable: Vec<crate::docs::Durable>,
}

/// Runs one session with blind device `blind` over `stream` (opened by this member).
pub(crate) async fn run(
    ctx: &MemberCtx,
    blind: PeerId,
    stream: libp2p::Stream,
) -> Result<(), BlindSessionError> {
    let mut transport = framed(stream);
    send(
        &mut transport,
        &Request::Hello {
            version: PROTOCOL_VERSION,
        },
    )
    .await?;
    let hello = tokio::time::timeout(HELLO_TIMEOUT, receive::<Reply>(&mut transport))
        .await
        .map_err(|_| BlindSessionError::HelloTimeout)??;
    match hello {
        Reply::Hello { addrs, .. } => {
            if let Err(e) = ctx.trust.set_addrs(&blind, addrs) {
                tracing::warn!(%blind, "cannot remember the blind device's addresses: {e}");
            }
        }
        Reply::Refuse { message } => return Err(BlindSessionError::Refused(message)),
        other => return Err(BlindSessionError::Refused(format!("unexpected {other:?}"))),
    }
    // The group key is made when a member pairs the blind device and reaches the others by
    // sync; a session never makes one (two made at once would name documents differently).
    let ring = Keyring::load(&ctx.registry.handle(KEYS_DOC)?);
    if ring.is_empty() {
        return Err(BlindSessionError::Refused(
            "this device does not hold the group key yet (it comes from the device that paired the blind device)".into(),
        ));
    }
    let progress = ctx.state.progress(&blind);
    let (sink, mut source) = futures::StreamExt::split(transport);
    let (replies_tx, replies) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        loop {
            let reply = receive::<Reply>(&mut source).await;
            let end = reply.is_err();
            if replies_tx.send(reply).is_err() || end {
                return;
            }
        }
    });
    let _reader = AbortOnDrop(reader);
    let mut session = Session {
        ctx,
        blind,
        me: ctx.keypair.public().to_peer_id(),
        ring,
        transport: sink,
        replies,
        grants_pending: Default::default(),
        upload_target: progress.uploaded,
        progress,
        caught: false,
        dirty: BTreeSet::new(),
        again: BTreeSet::new(),
        in_flight: HashMap::new(),
        compacting: HashMap::new(),
        snapshots_in_flight: HashMap::new(),
        reseal: BTreeSet::new(),
        seen: HashMap::new(),
        durable: Vec::new(),
    };
    session.send_members().await?;
    session.send_grants().await?;
    let after = session.progress.fetched;
    send(&mut session.transport, &Request::Fetch { after }).await?;
    session.run().await
}

/// Aborts the reader task when the session ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Session<'_> {
    async fn run(&mut self) -> Result<(), BlindSessionError> {
        let mut updates = self.ctx.registry.subscribe_all();
        let upload_at = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(upload_at);
        let mut armed = false;
        // Once idle, the feed is read again a moment later: a change's feed entry is written
        // after it is announced, and is then recorded as uploaded.
        let recheck_at = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(recheck_at);
        let mut recheck = false;
        loop {
            let can_upload = self.caught && self.in_flight.len() < UPLOAD_WINDOW;
            tokio::select! {
                reply = self.replies.recv() => match reply {
                    Some(reply) => self.on_reply(reply?).await?,
                    None => return Err(BlindSessionError::Closed),
                },
                update = updates.recv() => match update {
                    Ok(update) => {
                        self.on_local_change(&update.doc).await?;
                        // A change is announced before its feed entry is written: with no
                        // announcement left unread, every entry in the feed has been seen.
                        if updates.is_empty() {
                            let head = self.ctx.registry.store()?.feed_head()?;
                            self.upload_target = self.upload_target.max(head);
                        }
                    }
                    Err(RecvError::Lagged(_)) => self.mark_changed_since_upload()?,
                    Err(RecvError::Closed) => return Ok(()),
                },
                _ = &mut upload_at, if armed && can_upload => {
                    armed = false;
                    self.upload_some().await?;
                }
                _ = &mut recheck_at, if recheck => {
                    recheck = false;
                    if self.caught && self.dirty.is_empty() && self.in_flight.is_empty() {
                        self.mark_changed_since_upload()?;
                    }
                }
            }
            let idle = self.dirty.is_empty() && self.in_flight.is_empty();
            if self.caught && idle && !recheck && self.behind_feed()? {
                recheck = true;
                recheck_at
                    .as_mut()
                    .reset(tokio::time::Instant::now() + RECHECK_DELAY);
            }
            let work = (!self.dirty.is_empty() && self.in_flight.len() < UPLOAD_WINDOW)
                || (!self.reseal.is_empty() && self.compacting.len() < UPLOAD_WINDOW);
            if self.caught && work && !armed {
                armed = true;
                upload_at
                    .as_mut()
                    .reset(tokio::time::Instant::now() + UPLOAD_DELAY);
            }
            self.maybe_record_upload()?;
        }
    }

    async fn on_local_change(&mut self, doc: &str) -> Result<(), BlindSessionError> {
        if doc == KEYS_DOC {
            let ring = Keyring::load(&self.ctx.registry.handle(KEYS_DOC)?);
            let rotated = ring.current() != self.ring.current();
            self.ring = ring;
            if rotated {
                tracing::info!(blind = %self.blind, "new key epoch: re-sealing every document");
                self.send_members().await?;
                self.send_grants().await?;
                self.reseal = self.local_docs()?.into_iter().collect();
            }
        } else if doc == GROUP_DOC {
            self.send_members().await?;
            self.send_grants().await?;
        } else if !doc.starts_with(RESERVED_PREFIX) {
            self.mark_dirty(doc.to_string());
        }
        Ok(())
    }

    /// `name` changed: upload it, or again once its upload in flight is answered.
    fn mark_dirty(&mut self, name: String) {
        if self.in_flight.values().any(|f| f.name == name) {
            self.again.insert(name);
        } else {
            self.dirty.insert(name);
        }
    }

    /// The upload of `name` was answered: a change made meanwhile goes next.
    fn landed(&mut self, name: &str) {
        if self.again.remove(name) {
            self.dirty.insert(name.to_string());
        }
    }

    fn local_docs(&self) -> Result<Vec<String>, BlindSessionError> {
        let mut docs = self.ctx.registry.list()?;
        docs.retain(|d| !d.starts_with(RESERVED_PREFIX));
        Ok(docs)
    }

    /// Every document changed since the last recorded upload (after a reconnect, or after this
    /// session fell behind the live changes).
    fn mark_changed_since_upload(&mut self) -> Result<(), BlindSessionError> {
        let store = self.ctx.registry.store()?;
        let (names, last) = store.changed_after(self.progress.uploaded, usize::MAX)?;
        for name in names {
            if !name.starts_with(RESERVED_PREFIX) {
                self.mark_dirty(name);
            }
        }
        self.upload_target = self.upload_target.max(last);
        Ok(())
    }

    /// Whether the feed has entries after the last recorded upload.
    fn behind_feed(&self) -> Result<bool, BlindSessionError> {
        Ok(self.ctx.registry.store()?.feed_head()? > self.progress.uploaded)
    }

    /// Once every change is uploaded, records how far the feed went.
    fn maybe_record_upload(&mut self) -> Result<(), BlindSessionError> {
        if self.caught
            && self.dirty.is_empty()
            && self.again.is_empty()
            && self.in_flight.is_empty()
            && self.upload_target > self.progress.uploaded
        {
            self.progress.uploaded = self.upload_target;
            self.ctx
                .state
                .set_progress(&self.blind, &self.progress)
                .map_err(crate::store::StoreError::from)?;
        }
        Ok(())
    }

    async fn send_members(&mut self) -> Result<(), BlindSessionError> {
        let group = self.ctx.registry.handle(GROUP_DOC)?;
        let (mut full, mut removed) = (vec![self.me.to_bytes()], Vec::new());
        let mut open_codes = Vec::new();
        for member in crate::group::members(&group) {
            if member.removed {
                removed.push(member.id.to_bytes());
                continue;
            }
            if let (Some(slot), Some(tag)) = (member.pair_slot, member.pair_tag.clone()) {
                open_codes.push((member.id.to_bytes(), slot, tag));
            }
            if !member.blind && member.id != self.me {
                full.push(member.id.to_bytes());
            }
        }
        let members = Request::Members {
            full,
            removed,
            open_codes,
        };
        send(&mut self.transport, &members).await
    }

    /// Seals the current epoch's key to every other full member that has not been sent it
    /// through this blind device (a member offline during a rotation gets it from there).
    async fn send_grants(&mut self) -> Result<(), BlindSessionError> {
        let Some((epoch, key)) = self.ring.current() else {
            return Ok(());
        };
        let group = self.ctx.registry.handle(GROUP_DOC)?;
        let members = crate::group::members(&group);
        let removed: Vec<Vec<u8>> = members
            .iter()
            .filter(|m| m.removed)
            .map(|m| m.id.to_bytes())
            .collect();
        let granted = Granted { key, removed };
        for member in members {
            if member.removed || member.blind || member.id == self.me {
                continue;
            }
            let granted_key = MemberState::granted_key(&self.blind, &epoch, &member.id);
            if matches!(self.ctx.state.tree.contains_key(&granted_key), Ok(true)) {
                continue;
            }
            match KeyGrant::seal(&self.ctx.keypair, &member.id, epoch, &granted) {
                Ok(grant) => send(&mut self.transport, &Request::Grant(grant)).await?,
                Err(e) => {
                    tracing::warn!(device = %member.id, "cannot seal the group key to it: {e}");
                    continue;
                }
            }
            self.grants_pending.push_back(granted_key);
        }
        Ok(())
    }

    async fn on_reply(&mut self, reply: Reply) -> Result<(), BlindSessionError> {
        match reply {
            Reply::Item { index, item } => self.on_item(index, item).await?,
            Reply::Caught { head } => {
                self.settle(head).await?;
                self.caught = true;
                self.mark_changed_since_upload()?;
                tracing::info!(blind = %self.blind, head, "caught up with the blind device");
            }
            Reply::Stored {
                doc, kind, stored, ..
            } => self.on_stored(doc, kind, stored).await?,
            Reply::Refused {
                doc,
                kind: Kind::Update,
                seq: 0,
                refusal,
            } if doc == [0; 32] => {
                // A grant (the only request answered with no document).
                self.grants_pending.pop_front();
                tracing::error!(blind = %self.blind, "the blind device refused a key grant: {refusal}");
            }
            Reply::Refused {
                doc, kind, refusal, ..
            } => self.on_refused(doc, kind, refusal),
            Reply::Heads { doc, heads } => self.seal_snapshot(doc, heads).await?,
            Reply::GrantStored { .. } => {
                if let Some(granted_key) = self.grants_pending.pop_front() {
                    self.ctx
                        .state
                        .tree
                        .insert(granted_key, &[])
                        .map_err(crate::store::StoreError::from)?;
                }
            }
            Reply::Hello { .. } => {}
            Reply::Refuse { message } => return Err(BlindSessionError::Refused(message)),
        }
        Ok(())
    }

    /// Waits until every applied item is durable, then records `index` as fetched.
    async fn settle(&mut self, index: u64) -> Result<(), BlindSessionError> {
        for durable in self.durable.drain(..) {
            durable.wait().await?;
        }
        if index > self.progress.fetched {
            self.progress.fetched = index;
            self.ctx
                .state
                .set_progress(&self.blind, &self.progress)
                .map_err(crate::store::StoreError::from)?;
        }
        Ok(())
    }

    async fn on_item(&mut self, index: u64, item: Item) -> Result<(), BlindSessionError> {
        match item {
            Item::Grant(grant) => self.on_grant(grant).await?,
            Item::Envelope(envelope) => self.on_envelope(envelope)?,
        }
        // Live items (after catching up) are recorded as they come; the backlog at `Caught`
        // and every few hundred items (a long catch-up cut short resumes near where it was).
        if self.caught || self.durable.len() >= 256 {
            self.settle(index).await?;
        }
        Ok(())
    }

    async fn on_grant(&mut self, grant: KeyGrant) -> Result<(), BlindSessionError> {
        if grant.to().ok() != Some(self.me) || self.ring.get(&grant.epoch).is_some() {
            return Ok(());
        }
        match grant.open(&self.ctx.keypair) {
            Ok(granted) => {
                self.learn_removals(&granted.removed).await?;
                let keys = self.ctx.registry.handle(KEYS_DOC)?;
                keyring::add(&keys, grant.epoch.number, granted.key).await?;
                self.ring = Keyring::load(&keys);
                tracing::info!(
                    epoch = grant.epoch.number,
                    "received a new group key through the blind device"
                );
            }
            Err(e) => tracing::warn!("a key grant from the blind device does not open: {e}"),
        }
        Ok(())
    }

    /// Devices a member removed while this one was away: removed here too (in the group, so
    /// it replicates), and their sessions stopped before anything sealed with the new key is
    /// opened.
    async fn learn_removals(&mut self, removed: &[Vec<u8>]) -> Result<(), BlindSessionError> {
        let group = self.ctx.registry.handle(GROUP_DOC)?;
        let members = crate::group::members(&group);
        let mut any = false;
        for id in removed.iter().filter_map(|b| PeerId::from_bytes(b).ok()) {
            if id == self.me || self.ctx.trust.is_revoked(&id) {
                continue;
            }
            let name = members
                .iter()
                .find(|m| m.id == id)
                .map_or(String::new(), |m| m.name.clone());
            tracing::warn!(device = %id, "removed from the group while this device was away (told with the new group key)");
            self.ctx.trust.revoke(&id)?;
            crate::group::remove(&group, id, &name).await?;
            any = true;
        }
        if any {
            let _ = (self.ctx.stop_untrusted)().await;
        }
        Ok(())
    }

    fn on_envelope(&mut self, envelope: Envelope) -> Result<(), BlindSessionError> {
        if self.ring.get(&envelope.epoch).is_none() {
            // Another member may still hand it over (by sync, or sealed here): stop before it,
            // so the fetch resumes from this item once the key has arrived.
            self.ring = Keyring::load(&self.ctx.registry.handle(KEYS_DOC)?);
        }
        let (Some(key), Some(name_key)) = (self.ring.get(&envelope.epoch), self.ring.name_key())
        else {
            return Err(BlindSessionError::Refused(format!(
                "an envelope is sealed with key epoch {} that this device does not hold yet; fetching resumes there once it arrives",
                envelope.epoch.number
            )));
        };
        let author = envelope.author()?;
        if self.ctx.trust.is_revoked(&author) {
            tracing::warn!(%author, "ignored an envelope from a device removed from the group");
            return Ok(());
        }
        let content = match envelope.open(&key, &name_key) {
            // The agent's own documents (the group, its keys) never travel sealed: only members
            // write them, over sync.
            Ok(content) if content.name.starts_with(RESERVED_PREFIX) => {
                tracing::error!(%author, doc = %content.name, "refused a sealed update of a reserved document");
                return Ok(());
            }
            Ok(content) => content,
            Err(e) => {
                tracing::error!(blind = %self.blind, "refused an envelope from the blind device: {e}");
                return Ok(());
            }
        };
        let seen_key = (envelope.doc, envelope.author.clone());
        match envelope.kind {
            Kind::Update => {
                let last = self.seen.get(&seen_key).copied().unwrap_or(0);
                if envelope.seq <= last {
                    tracing::error!(
                        blind = %self.blind,
                        seq = envelope.seq,
                        last,
                        "refused a replayed or reordered envelope from the blind device"
                    );
                    return Ok(());
                }
                self.seen.insert(seen_key, envelope.seq);
            }
            Kind::Snapshot => {
                for (author, seq) in &envelope.covers {
                    let last = self.seen.entry((envelope.doc, author.clone())).or_default();
                    *last = (*last).max(*seq);
                }
            }
        }
        let name = content.name;
        let applied =
            self.ctx
                .registry
                .apply_update_by(&name, content.update, Origin::Peer(author), 0, true);
        let applied = match applied {
            Ok(applied) => applied,
            Err(e) => {
                tracing::error!(doc = %name, "an update from the blind device does not apply: {e}");
                return Ok(());
            }
        };
        if let Some(ack) = applied.durable {
            self.durable.push(crate::docs::Durable::pending(&name, ack));
        }
        // The blind device holds this much more of the document now.
        let mut backup = self.ctx.state.backup(&self.blind, &name);
        let mut state = decode_sv(&backup.state);
        state.merge(applied.state_vector);
        backup.state = state.encode_v1();
        if !self.in_flight.contains_key(&envelope.doc) {
            let doc = self.ctx.registry.handle(&name)?;
            if doc.state_vector_decoded() <= state {
                backup.deletes = doc.read(|txn| delete_set_hash(txn));
            }
        }
        self.ctx
            .state
            .set_backup(&self.blind, &name, &backup)
            .map_err(crate::store::StoreError::from)?;
        Ok(())
    }

    /// Uploads the next dirty documents (what the blind device lacks of each), and asks for
    /// the heads of the next documents to re-seal.
    async fn upload_some(&mut self) -> Result<(), BlindSessionError> {
        let Some((epoch, key)) = self.ring.current() else {
            return Ok(());
        };
        let Some(name_key) = self.ring.name_key() else {
            return Ok(());
        };
        while self.in_flight.len() < UPLOAD_WINDOW {
            let Some(name) = self.dirty.pop_first() else {
                break;
            };
            match self.seal_update(&name, &name_key, epoch, &key) {
                Ok(Some((envelope, flight))) => {
                    let id = envelope.doc;
                    send(&mut self.transport, &Request::Put(envelope)).await?;
                    self.in_flight.insert(id, flight);
                }
                Ok(None) => {}
                // One document that cannot be read or sealed does not hold up the others.
                Err(e) => {
                    tracing::error!(doc = %name, "cannot back it up on the blind device: {e}")
                }
            }
        }
        while self.compacting.len() < UPLOAD_WINDOW {
            let Some(name) = self.reseal.pop_first() else {
                break;
            };
            let id = doc_id(&name_key, &name);
            self.compacting.insert(id, name);
            send(&mut self.transport, &Request::Heads { doc: id }).await?;
        }
        Ok(())
    }

    /// The envelope with what the blind device lacks of document `name` (`None`: nothing).
    fn seal_update(
        &self,
        name: &str,
        name_key: &Key,
        epoch: Epoch,
        key: &Key,
    ) -> Result<Option<(Envelope, InFlight)>, BlindSessionError> {
        if self.ctx.registry.is_deleted(name) {
            return Ok(None);
        }
        let doc = self.ctx.registry.handle(name)?;
        let backup = self.ctx.state.backup(&self.blind, name);
        // The diff, the state it reaches and the delete set, read together: a change landing
        // in between would otherwise count as uploaded without being sent.
        let held = decode_sv(&backup.state);
        let (diff, state, deletes) = doc.read(|txn| {
            use yrs::ReadTxn as _;
            let own = txn.state_vector().encode_v1();
            (txn.encode_diff_v1(&held), own, delete_set_hash(txn))
        });
        let adds = crate::docs::decode_update(&diff)
            .map(|u| !crate::docs::upper_state_vector(&u).is_empty())
            .unwrap_or(true);
        if !adds && deletes == backup.deletes {
            return Ok(None);
        }
        if too_large(diff.len()) {
            tracing::error!(doc = %name, bytes = diff.len(), "a change over the blind device's 64 MiB envelope limit is not backed up there");
            return Ok(None);
        }
        let seq = backup.seq + 1;
        let content = Content {
            name: name.to_string(),
            update: diff,
        };
        let id = doc_id(name_key, name);
        let envelope = Envelope::seal(
            &self.ctx.keypair,
            Kind::Update,
            id,
            seq,
            epoch,
            key,
            Vec::new(),
            &content,
        )?;
        let flight = InFlight {
            name: name.to_string(),
            seq,
            state,
            deletes,
        };
        Ok(Some((envelope, flight)))
    }

    async fn on_stored(
        &mut self,
        doc: DocId,
        kind: Kind,
        stored: Stored,
    ) -> Result<(), BlindSessionError> {
        match kind {
            Kind::Update => {
                let Some(done) = self.in_flight.remove(&doc) else {
                    return Ok(());
                };
                self.landed(&done.name);
                let backup = Backup {
                    seq: done.seq,
                    state: merged(
                        &self.ctx.state.backup(&self.blind, &done.name).state,
                        &done.state,
                    ),
                    deletes: done.deletes,
                };
                self.ctx
                    .state
                    .set_backup(&self.blind, &done.name, &backup)
                    .map_err(crate::store::StoreError::from)?;
                let due = stored.held_bytes >= COMPACT_MIN_BYTES.max(stored.snapshot_bytes);
                if due && !self.compacting.contains_key(&doc) {
                    self.compacting.insert(doc, done.name);
                    send(&mut self.transport, &Request::Heads { doc }).await?;
                }
            }
            Kind::Snapshot => {
                self.compacting.remove(&doc);
                if let Some(done) = self.snapshots_in_flight.remove(&doc) {
                    let mut backup = self.ctx.state.backup(&self.blind, &done.name);
                    backup.state = merged(&backup.state, &done.state);
                    backup.deletes = done.deletes;
                    self.ctx
                        .state
                        .set_backup(&self.blind, &done.name, &backup)
                        .map_err(crate::store::StoreError::from)?;
                    tracing::debug!(doc = %done.name, bytes = stored.snapshot_bytes, "compacted on the blind device");
                }
            }
        }
        Ok(())
    }

    fn on_refused(&mut self, doc: DocId, kind: Kind, refusal: Refusal) {
        match (kind, &refusal) {
            (
                Kind::Update,
                Refusal::Replayed { expected, .. } | Refusal::OutOfOrder { expected, .. },
            ) => {
                // Its count and ours differ (an answer lost in a crash): take its count and
                // send the diff again.
                if let Some(flight) = self.in_flight.remove(&doc) {
                    let mut backup = self.ctx.state.backup(&self.blind, &flight.name);
                    backup.seq = expected.saturating_sub(1);
                    let _ = self
                        .ctx
                        .state
                        .set_backup(&self.blind, &flight.name, &backup);
                    self.again.remove(&flight.name);
                    self.dirty.insert(flight.name);
                }
            }
            (Kind::Update, _) => {
                if let Some(flight) = self.in_flight.remove(&doc) {
                    tracing::error!(doc = %flight.name, "the blind device refused an update: {refusal}");
                    self.landed(&flight.name);
                }
            }
            (Kind::Snapshot, _) => {
                // Someone else's update arrived first, or nothing was new: compacting waits
                // for the next time it is due.
                self.snapshots_in_flight.remove(&doc);
                if let Some(name) = self.compacting.remove(&doc) {
                    tracing::debug!(doc = %name, "snapshot not taken: {refusal}");
                }
            }
        }
    }

    /// Answer to `Heads`: uploads the whole document, covering what the blind device holds
    /// (every item before this answer has been received and applied here).
    async fn seal_snapshot(
        &mut self,
        doc: DocId,
        heads: Vec<(Vec<u8>, u64)>,
    ) -> Result<(), BlindSessionError> {
        let Some(name) = self.compacting.get(&doc).cloned() else {
            return Ok(());
        };
        let (Some((epoch, key)), Some(_)) = (self.ring.current(), self.ring.name_key()) else {
            return Ok(());
        };
        if self.in_flight.contains_key(&doc) || self.ctx.registry.is_deleted(&name) {
            self.compacting.remove(&doc);
            return Ok(());
        }
        let handle = self.ctx.registry.handle(&name)?;
        // The content, the state it reaches and its delete set, read together.
        let (update, state, deletes) = handle.read(|txn| {
            use yrs::ReadTxn as _;
            (
                txn.encode_state_as_update_v1(&StateVector::default()),
                txn.state_vector().encode_v1(),
                delete_set_hash(txn),
            )
        });
        let content = Content {
            name: name.clone(),
            update,
        };
        if too_large(content.update.len()) {
            tracing::error!(doc = %name, bytes = content.update.len(), "a document over the blind device's 64 MiB envelope limit is not compacted there");
            self.compacting.remove(&doc);
            return Ok(());
        }
        let envelope = Envelope::seal(
            &self.ctx.keypair,
            Kind::Snapshot,
            doc,
            0,
            epoch,
            &key,
            heads,
            &content,
        );
        match envelope {
            Ok(envelope) => {
                // What it holds counts as on the blind device once the snapshot is stored.
                let flight = InFlight {
                    name,
                    seq: 0,
                    state,
                    deletes,
                };
                self.snapshots_in_flight.insert(doc, flight);
                send(&mut self.transport, &Request::Snapshot(envelope)).await?;
            }
            Err(e) => {
                tracing::error!(doc = %name, "cannot seal a snapshot: {e}");
                self.compacting.remove(&doc);
            }
        }
        Ok(())
    }
}

/// Whether an update of `len` bytes would not fit one frame of the blind protocol (with room
/// for the envelope's header, the name and the signature).
fn too_large(len: usize) -> bool {
    len + (64 << 10) > super::protocol::MAX_BLIND_FRAME
}

/// A state vector kept in this member's records (empty: nothing held yet).
fn decode_sv(bytes: &[u8]) -> StateVector {
    crate::docs::decode_state_vector(bytes).unwrap_or_default()
}

fn merged(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut sv = decode_sv(a);
    sv.merge(decode_sv(b));
    sv.encode_v1()
}

/// Hash of the document's delete set (the update a holder of its whole state vector lacks).
fn delete_set_hash<T: yrs::ReadTxn>(txn: &T) -> [u8; 32] {
    Sha256::digest(txn.encode_diff_v1(&txn.state_vector())).into()
}
