//! One sync session with one trusted peer over one `/devicelink/sync/1.4.0` stream.
//!
//! 1. Both sides send `Hello`; an incompatible version is answered with `Refuse` and the stream
//!    is closed (both sides log the reason).
//! 2. Catching up. With feature `feed` (both sides announced it in `Hello`), each side asks the
//!    other for the documents changed since the checkpoint it holds of the other's change feed
//!    (`FeedRequest`), gets their names (`FeedPage`s) and pulls them with a window of `SyncStep1`s
//!    in flight; once all arrived it records the new checkpoint. A reconnect then costs what
//!    changed, not what is stored. Without it (a plain 1.4 peer), each side sends `SyncStep1` for
//!    every document; the other answers `SyncStep2` with exactly the missing updates, and a
//!    `SyncStep1` for an unknown document creates it and is answered with our own `SyncStep1`.
//! 3. From then on every change (local, or from a third device) is pushed as `Update`; with
//!    `feed`, a `FeedMark` every 250 ms tells the peer how far of the feed it has been sent.
//!    With feature `parts`, an update larger than 1 MiB travels in `Part`s, interleaved with the
//!    other traffic, so a document of any size syncs and never blocks the others.
//! 4. With feature `awareness`, presence changes (cursors, who is here) go both ways as
//!    `Awareness`; they are kept in memory only ([`crate::presence`]) and leave with the session.
//!
//! Reading and writing run concurrently (a writer task owns the sink), so two peers sending large
//! step-2 answers at once never wait on each other.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use libp2p::PeerId;
use tokio::sync::{broadcast, mpsc};
use tokio_util::codec::Framed;
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};

use super::message::{
    codec, DocErrorCode, Features, Hello, Message, MessageError, Refusal, RefuseCode,
    FEED_PAGE_LEN, MAX_FRAME_LEN, PART_LEN,
};
use super::outbox::{OutBudget, MAX_DEFERRED};
use crate::docs::{DocError, DocRegistry, DocUpdate, Origin};
use crate::presence::{PresenceEvent, PresenceHub, Source};
use crate::status::{PeerTable, Traffic};
use crate::store::StoreError;

/// How long a peer has to send its `Hello`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Most queued live updates merged into one write.
const MAX_UPDATE_BATCH: usize = 1024;
/// Most documents asked for (`SyncStep1` sent, answer pending) at once while catching up.
const PULL_WINDOW: usize = 64;
/// Most documents a peer may list in one session's `FeedPage`s.
const MAX_LISTED: usize = 1_000_000;
/// Largest message accepted in parts (4 GiB).
const MAX_PART_TOTAL: u64 = 4 << 30;
/// Most messages being reassembled from parts at once.
const MAX_REASSEMBLIES: usize = 4;
/// A message in parts that receives less than [`MIN_PART_PROGRESS`] in this long is dropped
/// (a stalled transfer, or one that crawls to hold memory).
const PART_STALL: Duration = Duration::from_secs(30);
/// Bytes a message in parts must receive in each [`PART_STALL`] (about 9 KB/s).
const MIN_PART_PROGRESS: u64 = 256 << 10;
/// Bytes held for messages in parts, over all of one session's transfers: a piece beyond it
/// ends its transfer (counted, not kept; answered with `DocError` once whole).
const MAX_HELD_IN_PARTS: u64 = 512 << 20;
/// How often the sender tells the peer how far of its feed has been sent (feature `feed`).
const MARK_EVERY: Duration = Duration::from_millis(250);
/// How many times a mark is checked after the last change went by (the change may take a
/// moment to become durable).
const MARK_CHECKS: u32 = 4;
/// The empty Yjs update (no structs, empty delete set).
const EMPTY_UPDATE: [u8; 2] = [0, 0];

type Transport = Framed<Compat<libp2p::Stream>, tokio_util::codec::LengthDelimitedCodec>;

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("stream i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("peer sent a bad frame: {0}")]
    BadFrame(#[from] MessageError),
    #[error("peer sent a frame over the size limit")]
    FrameTooLarge,
    #[error("peer refused the session ({code:?}): {message}")]
    RefusedByPeer { code: RefuseCode, message: String },
    #[error("refused the peer ({code:?}): {message}")]
    RefusedPeer { code: RefuseCode, message: String },
    #[error("peer did not say hello within {0:?}")]
    HelloTimeout(Duration),
    #[error("peer closed the stream")]
    Closed,
    #[error("fell behind the live update stream; resynchronizing by state vector")]
    Lagged,
    #[error("local store: {0}")]
    Store(#[from] StoreError),
}

/// What a session needs from the agent.
pub(crate) struct SessionCtx {
    pub registry: Arc<DocRegistry>,
    pub peers: Arc<PeerTable>,
    pub presence: Arc<PresenceHub>,
}

enum Outgoing {
    /// A message and what it was charged against the session's [`OutBudget`].
    Msg(Message, usize),
    Close,
}

/// Runs a session to its end. Returns the peer's hello once exchanged via `on_hello`.
pub(crate) async fn run(
    peer: PeerId,
    stream: libp2p::Stream,
    ctx: &SessionCtx,
    local_hello: Hello,
    on_hello: impl FnOnce(&Hello),
) -> Result<(), SessionError> {
    let mut transport = Framed::new(stream.compat(), codec());
    let hello = handshake(&mut transport, local_hello.clone()).await?;
    on_hello(&hello);
    let features = local_hello.features().both(hello.features());
    ctx.peers
        .session_started(peer, &hello.device_name, features.feed);
    // Ends the session in the peer table however this future ends, aborts included.
    let mut ended = SessionEnd {
        peers: &ctx.peers,
        peer,
        error: None,
    };

    // Subscribe before reading state vectors or the feed: nothing committed after this point can
    // be missed, and everything before it is covered by the state-vector or feed exchange.
    let bus = ctx.registry.subscribe_all();
    let presence = features.awareness.then(|| ctx.presence.subscribe());
    // Unbounded as a channel, bounded in bytes by the budget (see `outbox`).
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let budget = Arc::new(OutBudget::default());
    let mut reader = Reader::new(peer, ctx, out_tx.clone(), budget.clone(), features);
    if features.feed {
        let (epoch, after) = ctx.registry.store()?.checkpoint(&peer.to_bytes())?;
        reader.send(Message::FeedRequest { epoch, after });
    } else {
        reader.announce_all();
    }
    if features.awareness {
        // Who is here now (subscribed above, so no later change is missed): the peer sees it at
        // once, not at the next renewal 15 s away (§23).
        for (doc, held) in ctx.presence.held_for(peer) {
            reader.send(Message::Awareness {
                doc: doc.to_string(),
                update: yrs::updates::encoder::Encode::encode_v1(&held),
            });
        }
    }

    let (sink, source) = transport.split();
    let marks = features.feed.then(|| FeedMarks {
        writer: ctx.registry.writer().clone(),
        epoch: ctx.registry.store().map(|s| s.feed_epoch()).unwrap_or(0),
    });
    let out = Writer {
        peer,
        sink,
        registry: ctx.registry.clone(),
        peers: ctx.peers.clone(),
        features,
        bulk: VecDeque::new(),
        traffic: ctx.peers.traffic(peer),
        budget,
    };
    let mut writer = tokio::spawn(out.run(out_rx, bus, marks, presence));
    let mut writer_done = false;
    let result = tokio::select! {
        r = reader.run(source) => r,
        w = &mut writer => {
            writer_done = true;
            match w {
                Ok(r) => r,
                Err(e) => Err(SessionError::Io(std::io::Error::other(e))),
            }
        },
    };
    if let Err(e) = &result {
        if let (Some(refusal), false) = (refusal_for(e), writer_done) {
            let _ = out_tx.send(Outgoing::Msg(Message::Refuse(refusal), 0));
            let _ = out_tx.send(Outgoing::Close);
            let _ = tokio::time::timeout(Duration::from_secs(1), &mut writer).await;
        }
    }
    writer.abort();
    // Whoever was present through this peer has left, as far as this device can tell.
    ctx.presence.remove_source(Source::Peer(peer));
    ended.error = result.as_ref().err().map(|e| e.to_string());
    result
}

struct SessionEnd<'a> {
    peers: &'a PeerTable,
    peer: PeerId,
    error: Option<String>,
}

impl Drop for SessionEnd<'_> {
    fn drop(&mut self) {
        self.peers.session_ended(self.peer, self.error.take());
    }
}

/// What we tell a peer whose stream we end because of its own fault.
fn refusal_for(e: &SessionError) -> Option<Refusal> {
    let (code, message) = match e {
        SessionError::FrameTooLarge => (RefuseCode::FrameTooLarge, e.to_string()),
        SessionError::BadFrame(_) => (RefuseCode::Malformed, e.to_string()),
        SessionError::RefusedPeer { code, message } => (*code, message.clone()),
        _ => return None,
    };
    Some(Refusal { code, message })
}

async fn send(transport: &mut Transport, msg: &Message) -> Result<(), SessionError> {
    transport.send(msg.encode()?).await?;
    Ok(())
}

/// Exchanges `Hello`s and checks the version. Refuses (and tells the peer) on mismatch.
async fn handshake(transport: &mut Transport, local: Hello) -> Result<Hello, SessionError> {
    send(transport, &Message::Hello(local)).await?;
    let frame = match tokio::time::timeout(HELLO_TIMEOUT, transport.next()).await {
        Err(_) => {
            let message = format!("no Hello within {HELLO_TIMEOUT:?}");
            let refusal = Refusal {
                code: RefuseCode::ProtocolViolation,
                message,
            };
            let _ = send(transport, &Message::Refuse(refusal)).await;
            let _ = SinkExt::<Bytes>::close(transport).await; // FIN after the Refuse (§4.1)
            return Err(SessionError::HelloTimeout(HELLO_TIMEOUT));
        }
        Ok(None) => return Err(SessionError::Closed),
        Ok(Some(Ok(frame))) => frame,
        Ok(Some(Err(e))) => {
            let error = map_read_error(e);
            if let Some(refusal) = refusal_for(&error) {
                let _ = send(transport, &Message::Refuse(refusal)).await;
                let _ = SinkExt::<Bytes>::close(transport).await; // FIN after the Refuse (§4.1)
            }
            return Err(error);
        }
    };
    let refuse = |refusal: Refusal| async move {
        let _ = send(transport, &Message::Refuse(refusal.clone())).await;
        let _ = SinkExt::<Bytes>::close(transport).await;
        Err(SessionError::RefusedPeer {
            code: refusal.code,
            message: refusal.message,
        })
    };
    match Message::decode(&frame) {
        Ok(Message::Hello(hello)) => match hello.version.check_compatible() {
            Ok(()) => Ok(hello),
            Err(refusal) => refuse(refusal).await,
        },
        Ok(Message::Refuse(r)) => Err(SessionError::RefusedByPeer {
            code: r.code,
            message: r.message,
        }),
        Ok(other) => {
            refuse(Refusal {
                code: RefuseCode::ProtocolViolation,
                message: format!("expected Hello first, got {}", other.kind()),
            })
            .await
        }
        Err(e) => {
            refuse(Refusal {
                code: RefuseCode::Malformed,
                message: e.to_string(),
            })
            .await
        }
    }
}

fn map_read_error(e: std::io::Error) -> SessionError {
    let too_large = e
        .get_ref()
        .is_some_and(|inner| inner.is::<tokio_util::codec::LengthDelimitedCodecError>());
    if too_large {
        SessionError::FrameTooLarge
    } else {
        SessionError::Io(e)
    }
}

/// The receiving half of a session: answers and applies what the peer sends, and (feature
/// `feed`) pulls the documents the peer changed since this device last caught up with it.
struct Reader<'a> {
    peer: PeerId,
    ctx: &'a SessionCtx,
    out: mpsc::UnboundedSender<Outgoing>,
    budget: Arc<OutBudget>,
    /// `SyncStep1`s not answered yet because the budget is spent, oldest first (one per
    /// document; the first request's answer covers the later ones).
    deferred: VecDeque<(String, Vec<u8>)>,
    deferred_docs: HashSet<String>,
    features: Features,
    /// Documents this side has sent its `SyncStep1` for (without feature `feed`).
    announced: HashSet<String>,
    pull: Pull,
    /// Messages arriving in `Part`s, by document and kind.
    parts: HashMap<(String, u8), Reassembly>,
    traffic: Arc<Traffic>,
    /// The peer's `FeedRequest` was answered (one per session: a second is a violation).
    feed_answered: bool,
}

/// The changed-only catch-up with the peer's feed (feature `feed`).
#[derive(Default)]
struct Pull {
    epoch: u64,
    head: u64,
    /// Names listed by the peer, not yet asked for.
    queue: VecDeque<Arc<str>>,
    /// Every name listed in this answer (a repeated name is asked for once).
    seen: HashSet<Arc<str>>,
    /// Asked for (`SyncStep1` sent), answer not yet applied.
    asked: HashSet<String>,
    listed: usize,
    done: usize,
    /// The last `FeedPage` arrived.
    listed_all: bool,
    /// Every listed document was pulled; checkpoints may be recorded.
    complete: bool,
    /// The highest `FeedMark` seen.
    mark: u64,
    /// Something the peer sent could not be applied: record no checkpoint in this session.
    failed: bool,
}

struct Reassembly {
    total: u64,
    /// Bytes received so far.
    received: u64,
    /// The pieces, unless the document name is invalid (then they are counted, not kept).
    data: Vec<u8>,
    /// The document name breaks §12: answered with `DocError` once whole.
    invalid_name: Option<DocError>,
    /// Over the session's [`MAX_HELD_IN_PARTS`]: pieces counted, not kept; answered with
    /// `DocError` once whole.
    over_budget: bool,
    /// Bytes received since `window_start` (see [`MIN_PART_PROGRESS`]).
    window_bytes: u64,
    window_start: tokio::time::Instant,
}

impl<'a> Reader<'a> {
    fn new(
        peer: PeerId,
        ctx: &'a SessionCtx,
        out: mpsc::UnboundedSender<Outgoing>,
        budget: Arc<OutBudget>,
        features: Features,
    ) -> Self {
        Self {
            peer,
            ctx,
            out,
            budget,
            deferred: VecDeque::new(),
            deferred_docs: HashSet::new(),
            features,
            announced: HashSet::new(),
            pull: Pull::default(),
            parts: HashMap::new(),
            traffic: ctx.peers.traffic(peer),
            feed_answered: false,
        }
    }

    /// Without feature `feed`: a `SyncStep1` for every document (each is loaded for it).
    fn announce_all(&mut self) {
        for doc in self.ctx.registry.list().unwrap_or_default() {
            match self.ctx.registry.handle(&doc) {
                Ok(handle) => {
                    self.send(Message::SyncStep1 {
                        state_vector: handle.state_vector(),
                        doc: doc.clone(),
                    });
                    self.announced.insert(doc);
                }
                Err(e) => {
                    tracing::error!(peer = %self.peer, doc, "not syncing a document that cannot be loaded: {e}")
                }
            }
        }
    }

    async fn run(
        &mut self,
        mut source: futures::stream::SplitStream<Transport>,
    ) -> Result<(), SessionError> {
        let mut tick = tokio::time::interval(PART_STALL / 4);
        loop {
            tokio::select! {
                frame = source.next() => {
                    let Some(frame) = frame else { return Err(SessionError::Closed) };
                    let frame = frame.map_err(map_read_error)?;
                    self.traffic.received(frame.len() + 4);
                    let msg = Message::decode(&frame)?;
                    self.handle(msg).await?;
                }
                _ = self.budget.wait_for_room(), if !self.deferred.is_empty() => {
                    self.answer_deferred();
                }
                _ = tick.tick(), if !self.parts.is_empty() => self.expire_parts(),
            }
        }
    }

    fn send(&self, msg: Message) {
        let cost = OutBudget::cost(&msg);
        self.budget.charge(cost);
        if self.out.send(Outgoing::Msg(msg, cost)).is_err() {
            self.budget.release(cost);
        }
    }

    /// A `SyncStep1` from the peer: answered now, or deferred while the budget is spent (in
    /// order), or dropped when an answer for the same document is already queued or deferred.
    fn request(&mut self, doc: String, state_vector: Vec<u8>) -> Result<(), SessionError> {
        if self.budget.is_answering(&doc) || self.deferred_docs.contains(&doc) {
            return Ok(());
        }
        if self.deferred.is_empty() && !self.budget.is_full() {
            self.answer(doc, &state_vector);
            return Ok(());
        }
        if self.deferred.len() >= MAX_DEFERRED {
            return Err(SessionError::RefusedPeer {
                code: RefuseCode::ProtocolViolation,
                message: format!("more than {MAX_DEFERRED} requests outstanding"),
            });
        }
        self.deferred_docs.insert(doc.clone());
        self.deferred.push_back((doc, state_vector));
        Ok(())
    }

    /// Answers deferred requests while the budget allows.
    fn answer_deferred(&mut self) {
        while !self.budget.is_full() {
            let Some((doc, state_vector)) = self.deferred.pop_front() else {
                return;
            };
            self.deferred_docs.remove(&doc);
            self.answer(doc, &state_vector);
        }
    }

    async fn handle(&mut self, msg: Message) -> Result<(), SessionError> {
        match msg {
            Message::SyncStep1 { doc, state_vector } => self.request(doc, state_vector)?,
            Message::SyncStep2 { doc, update } => {
                if self.apply(&doc, update).await {
                    self.ctx.peers.doc_synced(self.peer, &doc);
                }
                if self.pull.asked.remove(&doc) {
                    self.pull.done += 1;
                    self.pump();
                }
            }
            Message::Update { doc, update } => {
                crate::hop!("received", doc);
                if self.apply(&doc, update).await {
                    crate::hop!("applied_from_peer", doc);
                    self.ctx.peers.touched(self.peer);
                }
            }
            Message::DocError { doc, code, message } => {
                tracing::warn!(peer = %self.peer, doc, ?code, "peer could not use our data: {message}");
                self.ctx
                    .peers
                    .set_error(self.peer, format!("document {doc:?}: {code:?}: {message}"));
                // An answer all the same: the catch-up does not wait for this document, but it
                // did not arrive, so this session records no checkpoint and the next one lists
                // it again (§9.5).
                if self.pull.asked.remove(&doc) {
                    self.pull.failed = true;
                    self.ctx.peers.doc_failed(
                        self.peer,
                        &doc,
                        &format!("the peer could not send it ({code:?}): {message}"),
                    );
                    self.pull.done += 1;
                    self.pump();
                }
            }
            Message::Refuse(r) => {
                return Err(SessionError::RefusedByPeer {
                    code: r.code,
                    message: r.message,
                })
            }
            Message::Hello(_) => {
                return Err(SessionError::RefusedPeer {
                    code: RefuseCode::ProtocolViolation,
                    message: "second Hello on one stream".into(),
                })
            }
            Message::FeedRequest { epoch, after } if self.features.feed => {
                // Each answer lists every changed document: a peer asking again and again
                // (without reading) would pile up listings; the protocol has one per session.
                if std::mem::replace(&mut self.feed_answered, true) {
                    return Err(SessionError::RefusedPeer {
                        code: RefuseCode::ProtocolViolation,
                        message: "second FeedRequest in one session".into(),
                    });
                }
                self.list_changes(epoch, after).await?
            }
            Message::FeedPage {
                epoch,
                head,
                docs,
                last,
            } if self.features.feed => self.listed(epoch, head, docs, last)?,
            Message::FeedMark { epoch, head } if self.features.feed => {
                if epoch == self.pull.epoch {
                    self.pull.mark = self.pull.mark.max(head);
                    self.record_checkpoint();
                }
            }
            Message::Awareness { doc, update } if self.features.awareness => {
                if crate::store::DocStore::validate_name(&doc).is_err() {
                    return Ok(()); // presence is best effort: nothing to report
                }
                if let Err(e) =
                    self.ctx
                        .presence
                        .apply_encoded(&doc, &update, Source::Peer(self.peer))
                {
                    tracing::debug!(peer = %self.peer, doc, "presence from peer ignored: {e}");
                }
            }
            Message::Part {
                doc,
                kind,
                total,
                data,
            } if self.features.parts => {
                if let Some(whole) = self.piece(doc, kind, total, data)? {
                    return Box::pin(self.handle(whole)).await;
                }
            }
            other => {
                return Err(SessionError::RefusedPeer {
                    code: RefuseCode::ProtocolViolation,
                    message: format!("{} without announcing its feature", other.kind()),
                })
            }
        }
        Ok(())
    }

    /// Answers a `SyncStep1` with what the peer lacks. With feature `feed`, a document this
    /// device does not have (or deleted) is answered with the empty update and not created.
    fn answer(&mut self, doc: String, state_vector: &[u8]) {
        if let Ok(sv) = crate::docs::decode_state_vector(state_vector) {
            self.ctx.peers.peer_has(self.peer, &doc, &sv);
        }
        let registry = &self.ctx.registry;
        let absent = match registry.exists(&doc) {
            Ok(exists) => registry.is_deleted(&doc) || (self.features.feed && !exists),
            Err(e) => return self.doc_error(doc, e),
        };
        if absent {
            if let Err(e) = crate::store::DocStore::validate_name(&doc) {
                return self.doc_error(doc, e.into());
            }
            self.ctx.peers.answered(self.peer);
            self.budget.start_answer(&doc);
            return self.send(Message::SyncStep2 {
                doc,
                update: EMPTY_UPDATE.to_vec(),
            });
        }
        match registry
            .handle(&doc)
            .and_then(|handle| Ok((handle.diff(state_vector)?, handle)))
        {
            Ok((update, handle)) => {
                self.ctx.peers.answered(self.peer);
                self.budget.start_answer(&doc);
                self.send(Message::SyncStep2 {
                    doc: doc.clone(),
                    update,
                });
                if !self.features.feed && self.announced.insert(doc.clone()) {
                    self.send(Message::SyncStep1 {
                        doc,
                        state_vector: handle.state_vector(),
                    });
                }
            }
            Err(e) => self.doc_error(doc, e),
        }
    }

    /// Answers a `FeedRequest`: every document changed after `after` (all of them if the peer's
    /// checkpoint is of another feed or ahead of this one), system documents first.
    async fn list_changes(&mut self, epoch: u64, after: u64) -> Result<(), SessionError> {
        let store = self.ctx.registry.store()?;
        // Everything queued so far gets its change number and reaches the disk, so the listing
        // is complete and its head durable (a peer may record it as a checkpoint).
        self.ctx.registry.writer().flush().await?;
        let head = self.ctx.registry.writer().durable_head();
        let after = if epoch == store.feed_epoch() && after <= head {
            after
        } else {
            0
        };
        let (mut docs, _) = store.changed_after(after, usize::MAX)?;
        docs.sort_by_key(|d| !d.starts_with(crate::group::RESERVED_PREFIX));
        let pages = docs.len().div_ceil(FEED_PAGE_LEN).max(1);
        let mut docs = docs.into_iter();
        for page in 0..pages {
            self.send(Message::FeedPage {
                epoch: store.feed_epoch(),
                head,
                docs: docs.by_ref().take(FEED_PAGE_LEN).collect(),
                last: page + 1 == pages,
            });
        }
        Ok(())
    }

    /// A page of the peer's changed documents: queue them and keep a window of them asked for.
    fn listed(
        &mut self,
        epoch: u64,
        head: u64,
        docs: Vec<String>,
        last: bool,
    ) -> Result<(), SessionError> {
        let pull = &mut self.pull;
        let violation = |message: String| SessionError::RefusedPeer {
            code: RefuseCode::ProtocolViolation,
            message,
        };
        if pull.listed_all || docs.len() > FEED_PAGE_LEN || pull.listed + docs.len() > MAX_LISTED {
            return Err(violation(format!(
                "FeedPage after the last one, over {FEED_PAGE_LEN} names, or over {MAX_LISTED} in all"
            )));
        }
        if epoch == 0 {
            return Err(violation("FeedPage with epoch 0".into()));
        }
        // Every page of one answer carries the same epoch and head (the first page's).
        if pull.epoch != 0 && (epoch, head) != (pull.epoch, pull.head) {
            return Err(violation(format!(
                "FeedPage of epoch {epoch} head {head} in an answer of epoch {} head {}",
                pull.epoch, pull.head
            )));
        }
        pull.epoch = epoch;
        pull.head = head;
        pull.listed += docs.len();
        pull.listed_all = last;
        for doc in docs {
            if let Err(e) = crate::docs::validate_name(&doc) {
                // No device can hold such a document (§12): nothing to pull.
                tracing::warn!(peer = %self.peer, "the peer listed an invalid document name: {e}");
                pull.done += 1;
                continue;
            }
            let doc: Arc<str> = doc.into();
            if !pull.seen.insert(doc.clone()) || self.ctx.registry.is_deleted(&doc) {
                pull.done += 1;
            } else {
                pull.queue.push_back(doc);
            }
        }
        self.pump();
        Ok(())
    }

    /// Asks for listed documents while fewer than [`PULL_WINDOW`] answers are outstanding;
    /// records the checkpoint once everything listed has arrived.
    fn pump(&mut self) {
        while self.pull.asked.len() < PULL_WINDOW {
            let Some(doc) = self.pull.queue.pop_front() else {
                break;
            };
            match self.ctx.registry.state_vector_of(&doc) {
                Ok(state_vector) => {
                    self.pull.asked.insert(doc.to_string());
                    self.send(Message::SyncStep1 {
                        doc: doc.to_string(),
                        state_vector,
                    });
                }
                Err(e) => {
                    self.pull.failed = true;
                    self.pull.done += 1;
                    self.ctx
                        .peers
                        .doc_failed(self.peer, &doc, &format!("cannot sync: {e}"));
                }
            }
        }
        self.ctx
            .peers
            .catch_up(self.peer, self.pull.done, self.pull.listed);
        if self.pull.listed_all && self.pull.queue.is_empty() && self.pull.asked.is_empty() {
            if !self.pull.complete {
                self.pull.complete = true;
                self.ctx.peers.caught_up(self.peer);
                tracing::debug!(peer = %self.peer, docs = self.pull.listed, "caught up with the peer's changes");
            }
            self.record_checkpoint();
        }
    }

    /// Remembers how far of the peer's feed this device holds (through the writer, so after the
    /// updates it received: the checkpoint never reaches the disk before they do).
    fn record_checkpoint(&mut self) {
        if !self.pull.complete || self.pull.failed {
            return;
        }
        let change = self.pull.head.max(self.pull.mark);
        self.ctx
            .registry
            .writer()
            .checkpoint(self.peer.to_bytes(), self.pull.epoch, change);
    }

    /// One piece of a message sent in parts; returns the message once whole.
    fn piece(
        &mut self,
        doc: String,
        kind: u8,
        total: u64,
        data: Vec<u8>,
    ) -> Result<Option<Message>, SessionError> {
        let violation = |message: String| SessionError::RefusedPeer {
            code: RefuseCode::ProtocolViolation,
            message,
        };
        if !matches!(kind, 3 | 4) || data.len() > PART_LEN || total > MAX_PART_TOTAL {
            return Err(violation(format!(
                "Part of kind {kind} with {} bytes of a {total}-byte total",
                data.len()
            )));
        }
        let key = (doc, kind);
        if !self.parts.contains_key(&key) && self.parts.len() >= MAX_REASSEMBLIES {
            return Err(violation(format!(
                "more than {MAX_REASSEMBLIES} messages in parts at once"
            )));
        }
        // What the other messages in parts hold, reservations included.
        let held: u64 = self
            .parts
            .iter()
            .filter(|(other, _)| **other != key)
            .map(|(_, r)| r.data.capacity() as u64)
            .sum();
        let entry = self.parts.entry(key.clone()).or_insert_with(|| Reassembly {
            total,
            received: 0,
            data: Vec::new(),
            invalid_name: crate::docs::validate_name(&key.0).err(),
            over_budget: false,
            window_bytes: 0,
            window_start: tokio::time::Instant::now(),
        });
        if entry.total != total || entry.received + data.len() as u64 > total {
            return Err(violation(format!(
                "Part of {:?} overruns its announced {total} bytes",
                key.0
            )));
        }
        entry.received += data.len() as u64;
        entry.window_bytes += data.len() as u64;
        if entry.invalid_name.is_none() && !entry.over_budget {
            let holding = (entry.data.len() + data.len()).max(entry.data.capacity());
            if held + holding as u64 > MAX_HELD_IN_PARTS {
                entry.over_budget = true;
                entry.data = Vec::new();
                tracing::warn!(
                    peer = %self.peer,
                    doc = key.0,
                    "a message in parts of {total} bytes is over the {MAX_HELD_IN_PARTS}-byte \
                     reassembly budget beside the others; its pieces are dropped"
                );
            } else {
                if entry.data.capacity() == 0 && held + total <= MAX_HELD_IN_PARTS {
                    // Room for the whole message at once when it fits the budget beside the
                    // others (counted as held from now on): grown by doubling it would be
                    // copied at each step and hold up to twice its size. Pages are committed
                    // only as pieces arrive; a refused reservation just grows.
                    let _ = entry.data.try_reserve_exact(total as usize);
                }
                entry.data.extend_from_slice(&data);
            }
        }
        if entry.received < total {
            return Ok(None);
        }
        let Some(whole) = self.parts.remove(&key) else {
            return Ok(None);
        };
        if let Some(e) = whole.invalid_name {
            self.pull.failed = true;
            self.ctx.peers.doc_failed(self.peer, &key.0, &e.to_string());
            self.doc_error(key.0, e);
            return Ok(None);
        }
        if whole.over_budget {
            let reason = format!(
                "its {total} bytes arrived in parts beside others over this device's \
                 {MAX_HELD_IN_PARTS}-byte reassembly budget; send it again"
            );
            self.pull.failed = true;
            self.ctx.peers.doc_failed(self.peer, &key.0, &reason);
            tracing::warn!(peer = %self.peer, doc = key.0, "rejected a message from the peer: {reason}");
            self.send(Message::DocError {
                doc: key.0,
                code: DocErrorCode::Storage,
                message: reason,
            });
            return Ok(None);
        }
        let (doc, update) = (key.0, whole.data);
        Ok(Some(match kind {
            3 => Message::SyncStep2 { doc, update },
            _ => Message::Update { doc, update },
        }))
    }

    /// Drops transfers in parts that received less than [`MIN_PART_PROGRESS`] in the last
    /// [`PART_STALL`] (stalled, or crawling).
    fn expire_parts(&mut self) {
        let now = tokio::time::Instant::now();
        let mut stale = Vec::new();
        for (key, r) in self.parts.iter_mut() {
            if now.duration_since(r.window_start) < PART_STALL {
                continue;
            }
            if r.window_bytes < MIN_PART_PROGRESS {
                stale.push(key.clone());
            } else {
                (r.window_bytes, r.window_start) = (0, now);
            }
        }
        for key in stale {
            if let Some(r) = self.parts.remove(&key) {
                self.pull.failed = true;
                let reason = format!(
                    "a transfer in parts stalled at {} of {} bytes (under {MIN_PART_PROGRESS} \
                     bytes in {PART_STALL:?}); dropped",
                    r.received, r.total
                );
                tracing::warn!(peer = %self.peer, doc = key.0, "{reason}");
                self.ctx.peers.doc_failed(self.peer, &key.0, &reason);
            }
        }
    }

    /// Applies a peer's update; a bad one is reported back and the session goes on. Large ones
    /// are applied off the async thread, so the agent's other work goes on meanwhile.
    async fn apply(&mut self, doc: &str, update: Vec<u8>) -> bool {
        let registry = self.ctx.registry.clone();
        let origin = Origin::Peer(self.peer);
        let applied = if update.len() > PART_LEN {
            let doc = doc.to_string();
            tokio::task::spawn_blocking(move || registry.apply_update(&doc, update, origin))
                .await
                .unwrap_or(Err(DocError::AgentStopped))
        } else {
            registry.apply_update(doc, update, origin)
        };
        match applied {
            Ok(applied) => {
                self.ctx
                    .peers
                    .peer_has(self.peer, doc, &applied.state_vector);
                true
            }
            Err(e) => {
                self.pull.failed = true;
                self.ctx.peers.doc_failed(self.peer, doc, &e.to_string());
                self.doc_error(doc.to_string(), e);
                false
            }
        }
    }

    fn doc_error(&mut self, doc: String, e: DocError) {
        tracing::warn!(peer = %self.peer, doc, "rejected a message from the peer: {e}");
        let code = match &e {
            DocError::InvalidUpdate { .. } => DocErrorCode::InvalidUpdate,
            DocError::InvalidStateVector { .. } => DocErrorCode::InvalidStateVector,
            DocError::Store(StoreError::InvalidDocName { .. }) => DocErrorCode::InvalidDocName,
            _ => DocErrorCode::Storage,
        };
        self.send(Message::DocError {
            doc,
            code,
            message: e.to_string(),
        });
    }
}

/// Where the writer learns how far this device's feed is durable (feature `feed`).
struct FeedMarks {
    writer: crate::store::writer::WriterHandle,
    epoch: u64,
}

/// The sending half of a session: queued protocol messages first, then live updates, then the
/// pieces of large messages, one at a time so they interleave with everything else.
struct Writer {
    peer: PeerId,
    sink: futures::stream::SplitSink<Transport, Bytes>,
    /// To check the group before the group's keys go out (see `withheld`).
    registry: Arc<DocRegistry>,
    peers: Arc<PeerTable>,
    features: Features,
    /// Large messages still to send in parts, each cut into its next piece only when that
    /// piece goes out (no second copy of a large update).
    bulk: VecDeque<InParts>,
    traffic: Arc<Traffic>,
    budget: Arc<OutBudget>,
}

/// A large `SyncStep2` or `Update` being sent as `Part`s.
struct InParts {
    doc: String,
    kind: u8,
    update: Vec<u8>,
    sent: usize,
    /// Charged against the budget; released once every piece is written.
    cost: usize,
}

impl InParts {
    /// The next piece, or `None` once all went out.
    fn next_part(&mut self) -> Option<Message> {
        if self.sent >= self.update.len() {
            return None;
        }
        let end = (self.sent + PART_LEN).min(self.update.len());
        let part = Message::Part {
            doc: self.doc.clone(),
            kind: self.kind,
            total: self.update.len() as u64,
            data: self.update[self.sent..end].to_vec(),
        };
        self.sent = end;
        Some(part)
    }
}

impl Writer {
    /// Queues `msg` for the stream: at once, or split into parts (feature `parts`), or, if it
    /// cannot be sent to this peer at all, reported and skipped (the session goes on).
    /// Writes `msg` (charged `cost`), or queues it for sending in parts; the budget is released
    /// once it is written.
    async fn emit(&mut self, msg: Message, cost: usize) -> Result<(), SessionError> {
        let big_answer = matches!(&msg, Message::SyncStep2 { update, .. } | Message::Update { update, .. }
            if update.len() > PART_LEN && self.features.parts);
        if big_answer {
            let kind = if matches!(msg, Message::SyncStep2 { .. }) {
                3
            } else {
                4
            };
            if let Message::SyncStep2 { doc, update } | Message::Update { doc, update } = msg {
                self.bulk.push_back(InParts {
                    doc,
                    kind,
                    update,
                    sent: 0,
                    cost,
                });
            }
            return Ok(());
        }
        let written = self.emit_whole(&msg).await;
        if let Message::SyncStep2 { doc, .. } = &msg {
            self.budget.answered(doc);
        }
        self.budget.release(cost);
        written
    }

    async fn emit_whole(&mut self, msg: &Message) -> Result<(), SessionError> {
        let (doc, update) = match msg {
            Message::SyncStep2 { doc, update } | Message::Update { doc, update } => (doc, update),
            _ => return self.feed(msg).await,
        };
        if update.len() <= PART_LEN {
            return self.feed(msg).await;
        }
        if update.len() + doc.len() + 16 <= MAX_FRAME_LEN {
            return self.feed(msg).await;
        }
        let reason = format!(
            "{} bytes to send exceed the {MAX_FRAME_LEN}-byte frame limit of a peer without large-document support (feature `parts`); not sent",
            update.len()
        );
        tracing::error!(peer = %self.peer, doc, "{reason}");
        self.peers.doc_failed(self.peer, doc, &reason);
        Ok(())
    }

    async fn feed(&mut self, msg: &Message) -> Result<(), SessionError> {
        let body = msg.encode()?;
        self.traffic.sent(body.len() + 4);
        self.sink.feed(body).await?;
        Ok(())
    }

    async fn run(
        mut self,
        mut out: mpsc::UnboundedReceiver<Outgoing>,
        mut bus: broadcast::Receiver<DocUpdate>,
        marks: Option<FeedMarks>,
        mut presence: Option<broadcast::Receiver<PresenceEvent>>,
    ) -> Result<(), SessionError> {
        // A mark is checked MARK_EVERY after a change went by on the bus (every change the feed
        // numbers is published there first), and a few times more while it is not durable yet;
        // with nothing changing, no timer runs.
        let mark_timer = tokio::time::sleep(MARK_EVERY);
        tokio::pin!(mark_timer);
        let mut mark_checks = 0_u32;
        let mut marked = 0;
        // Marks start once the last `FeedPage` answering the peer's `FeedRequest` went out:
        // changes up to its head are listed there, not sent as `Update`, and a mark may only
        // cover changes sent as `Update` (§9.5).
        let mut paged = false;
        loop {
            tokio::select! {
                biased;
                item = out.recv() => match item {
                    Some(Outgoing::Msg(msg, cost)) => {
                        // Write everything queued, then flush once.
                        let (mut next, mut close, mut answered) = (Some((msg, cost)), false, Vec::new());
                        while let Some((msg, cost)) = next.take() {
                            if let Message::FeedPage { head, last: true, .. } = &msg {
                                paged = true;
                                marked = marked.max(*head);
                            }
                            if let Message::SyncStep2 { doc, update } = &msg {
                                if update.len() <= PART_LEN {
                                    if let Ok(decoded) = crate::docs::decode_update(update) {
                                        answered.push((doc.clone(), crate::docs::upper_state_vector(&decoded)));
                                    }
                                }
                            }
                            self.emit(msg, cost).await?;
                            match out.try_recv() {
                                Ok(Outgoing::Msg(msg, cost)) => next = Some((msg, cost)),
                                Ok(Outgoing::Close) => close = true,
                                Err(_) => {}
                            }
                        }
                        self.sink.flush().await?;
                        for (doc, sv) in answered {
                            self.peers.peer_has(self.peer, &doc, &sv);
                        }
                        if close {
                            let _ = SinkExt::<Bytes>::close(&mut self.sink).await;
                            return Ok(());
                        }
                    }
                    Some(Outgoing::Close) | None => {
                        let _ = self.sink.close().await;
                        return Ok(());
                    }
                },
                event = bus.recv() => {
                    let first = match event {
                        Ok(event) => event,
                        Err(broadcast::error::RecvError::Lagged(_)) => return Err(SessionError::Lagged),
                        Err(broadcast::error::RecvError::Closed) => return Ok(()),
                    };
                    self.push_live(first, &mut bus).await?;
                    if marks.is_some() {
                        if mark_checks == 0 {
                            mark_timer.as_mut().reset(tokio::time::Instant::now() + MARK_EVERY);
                        }
                        mark_checks = MARK_CHECKS;
                    }
                }
                event = recv_presence(&mut presence), if presence.is_some() => {
                    // Presence is ephemeral: a missed change is renewed within 15 s.
                    let Ok(event) = event else { continue };
                    if event.forward && event.source != Source::Peer(self.peer) {
                        self.feed(&Message::Awareness {
                            doc: event.doc.to_string(),
                            update: event.encode(),
                        })
                        .await?;
                        self.sink.flush().await?;
                    }
                }
                _ = std::future::ready(()), if !self.bulk.is_empty() => {
                    let part = self.bulk.front_mut().and_then(InParts::next_part);
                    match part {
                        Some(part) => {
                            self.feed(&part).await?;
                            self.sink.flush().await?;
                        }
                        None => {
                            if let Some(done) = self.bulk.pop_front() {
                                if done.kind == 3 {
                                    self.budget.answered(&done.doc);
                                }
                                self.budget.release(done.cost);
                            }
                        }
                    }
                }
                _ = &mut mark_timer, if mark_checks > 0 && paged && self.bulk.is_empty() => {
                    let Some(marks) = &marks else { continue };
                    mark_checks -= 1;
                    if mark_checks > 0 {
                        mark_timer.as_mut().reset(tokio::time::Instant::now() + MARK_EVERY);
                    }
                    // Every change numbered up to `head` was published before it was numbered:
                    // once the bus is drained, all of them have gone out (or came from the peer).
                    let head = marks.writer.durable_head();
                    if head <= marked {
                        continue;
                    }
                    loop {
                        match bus.try_recv() {
                            Ok(event) => self.push_live(event, &mut bus).await?,
                            Err(broadcast::error::TryRecvError::Lagged(_)) => return Err(SessionError::Lagged),
                            Err(_) => break,
                        }
                    }
                    if !self.bulk.is_empty() {
                        // A large update still in parts: mark once it is out.
                        mark_checks = mark_checks.max(1);
                        continue;
                    }
                    self.feed(&Message::FeedMark { epoch: marks.epoch, head }).await?;
                    self.sink.flush().await?;
                    marked = head;
                }
            }
        }
    }

    /// Pushes `first` and every change already queued behind it (not those from the peer).
    /// Whether a live change of `doc` is kept from this peer: the group's keys never go to a
    /// device the group has removed, even in the moment before this session is stopped.
    fn withheld(&self, doc: &str) -> bool {
        doc == crate::blind::keyring::KEYS_DOC
            && self
                .registry
                .handle(crate::group::GROUP_DOC)
                .is_ok_and(|group| crate::group::is_removed(&group, self.peer))
    }

    async fn push_live(
        &mut self,
        first: DocUpdate,
        bus: &mut broadcast::Receiver<DocUpdate>,
    ) -> Result<(), SessionError> {
        let from_peer = Origin::Peer(self.peer);
        // Everything already queued goes out in one flush, a frame per update: merging
        // (yrs decodes every update) or diffing the live doc (yrs scans whole text
        // blocks) costs more than the peer applying each small update (see benches/).
        let mut sent: HashMap<Arc<str>, Arc<yrs::StateVector>> = HashMap::new();
        let mut event = first;
        let mut queued = 1;
        loop {
            if event.origin != from_peer && !event.deleted && !self.withheld(&event.doc) {
                let frame = Message::Update {
                    doc: event.doc.to_string(),
                    update: event.update.to_vec(),
                };
                self.emit(frame, 0).await?;
                sent.insert(event.doc, event.state);
            }
            if queued == MAX_UPDATE_BATCH {
                break;
            }
            event = match bus.try_recv() {
                Ok(event) => event,
                Err(broadcast::error::TryRecvError::Lagged(_)) => return Err(SessionError::Lagged),
                Err(_) => break,
            };
            queued += 1;
        }
        if sent.is_empty() {
            return Ok(());
        }
        self.sink.flush().await?;
        for (doc, sv) in sent {
            crate::hop!("sent", doc);
            self.peers.peer_has(self.peer, &doc, &sv);
        }
        Ok(())
    }
}

/// The next presence change (pending forever without a subscription).
async fn recv_presence(
    presence: &mut Option<broadcast::Receiver<PresenceEvent>>,
) -> Result<PresenceEvent, broadcast::error::RecvError> {
    match presence {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
