//! One sync session with one trusted peer over one `/devicelink/sync/1.4.0` stream.
//!
//! 1. Both sides send `Hello`; an incompatible version is answered with `Refuse` and the stream
//!    is closed (both sides log the reason).
//! 2. Each side sends `SyncStep1` (its state vector) for every document it has; the other answers
//!    `SyncStep2` with exactly the missing updates. A `SyncStep1` for an unknown document creates
//!    it and is answered with our own `SyncStep1` too, so documents spread in both directions.
//! 3. From then on every change (local, or from a third device) is pushed as `Update`.
//!
//! Reading and writing run concurrently (a writer task owns the sink), so two peers sending large
//! step-2 answers at once never wait on each other.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use libp2p::PeerId;
use tokio::sync::{broadcast, mpsc};
use tokio_util::codec::Framed;
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};

use super::message::{codec, DocErrorCode, Hello, Message, MessageError, Refusal, RefuseCode};
use crate::docs::{DocError, DocRegistry, DocUpdate, Origin};
use crate::status::PeerTable;
use crate::store::StoreError;

/// How long a peer has to send its `Hello`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Most queued live updates merged into one write.
const MAX_UPDATE_BATCH: usize = 1024;

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
}

/// What a session needs from the agent.
pub(crate) struct SessionCtx {
    pub registry: Arc<DocRegistry>,
    pub peers: Arc<PeerTable>,
}

enum Outgoing {
    Msg(Message),
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
    let hello = handshake(&mut transport, local_hello).await?;
    on_hello(&hello);
    ctx.peers.session_started(peer, &hello.device_name);
    // Ends the session in the peer table however this future ends, aborts included.
    let mut ended = SessionEnd {
        peers: &ctx.peers,
        peer,
        error: None,
    };

    // Subscribe before reading state vectors: nothing committed after this point can be missed,
    // and everything before it is covered by the state-vector exchange.
    let bus = ctx.registry.subscribe_all();
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let mut announced = HashSet::new();
    for doc in ctx.registry.list().unwrap_or_default() {
        match ctx.registry.handle(&doc) {
            Ok(handle) => {
                let _ = out_tx.send(Outgoing::Msg(Message::SyncStep1 {
                    state_vector: handle.state_vector(),
                    doc: doc.clone(),
                }));
                announced.insert(doc);
            }
            Err(e) => {
                tracing::error!(%peer, doc, "not syncing a document that cannot be loaded: {e}")
            }
        }
    }

    let (sink, source) = transport.split();
    let mut writer = tokio::spawn(write_loop(peer, sink, out_rx, bus, ctx.peers.clone()));
    let mut reader = Reader {
        peer,
        ctx,
        out: out_tx.clone(),
        announced,
    };
    let result = tokio::select! {
        r = reader.run(source) => r,
        w = &mut writer => match w {
            Ok(r) => r,
            Err(e) => Err(SessionError::Io(std::io::Error::other(e))),
        },
    };
    if let Err(e) = &result {
        if let Some(refusal) = refusal_for(e) {
            let _ = out_tx.send(Outgoing::Msg(Message::Refuse(refusal)));
            let _ = out_tx.send(Outgoing::Close);
            let _ = tokio::time::timeout(Duration::from_secs(1), &mut writer).await;
        }
    }
    writer.abort();
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
            return Err(SessionError::HelloTimeout(HELLO_TIMEOUT));
        }
        Ok(None) => return Err(SessionError::Closed),
        Ok(Some(Ok(frame))) => frame,
        Ok(Some(Err(e))) => {
            let error = map_read_error(e);
            if let Some(refusal) = refusal_for(&error) {
                let _ = send(transport, &Message::Refuse(refusal)).await;
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
                message: format!("expected Hello first, got {}", kind(&other)),
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

fn kind(msg: &Message) -> &'static str {
    match msg {
        Message::Hello(_) => "Hello",
        Message::Refuse(_) => "Refuse",
        Message::SyncStep1 { .. } => "SyncStep1",
        Message::SyncStep2 { .. } => "SyncStep2",
        Message::Update { .. } => "Update",
        Message::DocError { .. } => "DocError",
    }
}

struct Reader<'a> {
    peer: PeerId,
    ctx: &'a SessionCtx,
    out: mpsc::UnboundedSender<Outgoing>,
    announced: HashSet<String>,
}

impl Reader<'_> {
    async fn run(
        &mut self,
        mut source: futures::stream::SplitStream<Transport>,
    ) -> Result<(), SessionError> {
        while let Some(frame) = source.next().await {
            let frame = frame.map_err(map_read_error)?;
            let msg = Message::decode(&frame)?;
            self.handle(msg)?;
        }
        Err(SessionError::Closed)
    }

    fn send(&self, msg: Message) {
        let _ = self.out.send(Outgoing::Msg(msg));
    }

    fn handle(&mut self, msg: Message) -> Result<(), SessionError> {
        match msg {
            Message::SyncStep1 { doc, state_vector } => {
                if let Ok(sv) = crate::docs::decode_state_vector(&state_vector) {
                    self.ctx.peers.peer_has(self.peer, &doc, &sv);
                }
                let answer = self
                    .ctx
                    .registry
                    .handle(&doc)
                    .and_then(|handle| Ok((handle.diff(&state_vector)?, handle)));
                match answer {
                    Ok((update, handle)) => {
                        self.send(Message::SyncStep2 {
                            doc: doc.clone(),
                            update,
                        });
                        if self.announced.insert(doc.clone()) {
                            self.send(Message::SyncStep1 {
                                doc,
                                state_vector: handle.state_vector(),
                            });
                        }
                    }
                    Err(e) => self.doc_error(doc, e),
                }
            }
            Message::SyncStep2 { doc, update } => {
                if self.apply(&doc, &update) {
                    self.ctx.peers.doc_synced(self.peer, &doc);
                }
            }
            Message::Update { doc, update } => {
                if self.apply(&doc, &update) {
                    self.ctx.peers.touched(self.peer);
                }
            }
            Message::DocError { doc, code, message } => {
                tracing::warn!(peer = %self.peer, doc, ?code, "peer could not use our data: {message}");
                self.ctx
                    .peers
                    .set_error(self.peer, format!("document {doc:?}: {code:?}: {message}"));
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
        }
        Ok(())
    }

    /// Applies a peer's update; a bad one is reported back and the session goes on.
    fn apply(&mut self, doc: &str, update: &[u8]) -> bool {
        match self
            .ctx
            .registry
            .apply_update(doc, update, Origin::Peer(self.peer))
        {
            Ok(applied) => {
                self.ctx
                    .peers
                    .peer_has(self.peer, doc, &applied.state_vector);
                true
            }
            Err(e) => {
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

/// Sends queued protocol messages and pushes live updates not originating from `peer`.
async fn write_loop(
    peer: PeerId,
    mut sink: futures::stream::SplitSink<Transport, Bytes>,
    mut out: mpsc::UnboundedReceiver<Outgoing>,
    mut bus: broadcast::Receiver<DocUpdate>,
    peers: Arc<PeerTable>,
) -> Result<(), SessionError> {
    let from_peer = Origin::Peer(peer);
    loop {
        tokio::select! {
            biased;
            item = out.recv() => match item {
                Some(Outgoing::Msg(msg)) => {
                    // Write everything queued, then flush once.
                    let (mut next, mut close, mut answered) = (Some(msg), false, Vec::new());
                    while let Some(msg) = next.take() {
                        if let Message::SyncStep2 { doc, update } = &msg {
                            if let Ok(decoded) = crate::docs::decode_update(update) {
                                answered.push((doc.clone(), crate::docs::upper_state_vector(&decoded)));
                            }
                        }
                        sink.feed(msg.encode()?).await?;
                        match out.try_recv() {
                            Ok(Outgoing::Msg(msg)) => next = Some(msg),
                            Ok(Outgoing::Close) => close = true,
                            Err(_) => {}
                        }
                    }
                    sink.flush().await?;
                    for (doc, sv) in answered {
                        peers.peer_has(peer, &doc, &sv);
                    }
                    if close {
                        let _ = SinkExt::<Bytes>::close(&mut sink).await;
                        return Ok(());
                    }
                }
                Some(Outgoing::Close) | None => {
                    let _ = sink.close().await;
                    return Ok(());
                }
            },
            event = bus.recv() => {
                let first = match event {
                    Ok(event) => event,
                    Err(broadcast::error::RecvError::Lagged(_)) => return Err(SessionError::Lagged),
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                };
                // Everything already queued goes out in one flush, a frame per update: merging
                // (yrs decodes every update) or diffing the live doc (yrs scans whole text
                // blocks) costs more than the peer applying each small update (see benches/).
                let mut sent: HashMap<Arc<str>, Arc<yrs::StateVector>> = HashMap::new();
                let mut event = first;
                let mut queued = 1;
                loop {
                    if event.origin != from_peer {
                        let frame = Message::Update {
                            doc: event.doc.to_string(),
                            update: event.update.to_vec(),
                        };
                        sink.feed(frame.encode()?).await?;
                        sent.insert(event.doc, event.state);
                    }
                    if queued == MAX_UPDATE_BATCH {
                        break;
                    }
                    event = match bus.try_recv() {
                        Ok(event) => event,
                        Err(broadcast::error::TryRecvError::Lagged(_)) => {
                            return Err(SessionError::Lagged)
                        }
                        Err(_) => break,
                    };
                    queued += 1;
                }
                if sent.is_empty() {
                    continue;
                }
                sink.flush().await?;
                for (doc, sv) in sent {
                    peers.peer_has(peer, &doc, &sv);
                }
            }
        }
    }
}
