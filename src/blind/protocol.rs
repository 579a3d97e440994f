//! `/devicelink/blind/1.4.0`: a full member and a blind device, over one stream the member
//! opens. Frames as in sync (u32 length, postcard), messages [`Request`] and [`Reply`].
//!
//! The member says `Hello` and lists the group (`Members`), then asks for every item after its
//! checkpoint (`Fetch`); the blind device sends them (`Item`), then `Caught`, then each new
//! item as it arrives, in index order, read from its store (a member that does not read holds
//! only its own stream). The member uploads `Put` (its next update of a document), `Snapshot`
//! (after `Heads` told it what the snapshot must cover) and `Grant`; each is answered
//! `Stored` or `Refused`, after every earlier item was sent.
//! This module also serves the blind side ([`serve`]); the member side is [`super::member`].

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use libp2p::{PeerId, StreamProtocol};
use serde::{Deserialize, Serialize};
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};

use super::envelope::{DocId, Envelope, KeyGrant, Kind};
use super::store::{BlindStore, Item, Refusal, Stored};
use crate::store::{TrustStore, TrustedDevice};
use crate::sync::message::{Version, PROTOCOL_VERSION};

pub const BLIND_PROTOCOL: StreamProtocol = StreamProtocol::new("/devicelink/blind/1.4.0");
/// Largest frame: one envelope (a document update or snapshot up to about 64 MiB).
pub const MAX_BLIND_FRAME: usize = 64 << 20;
/// How long the member has to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Items read from the store per step when sending.
const SEND_BATCH: usize = 64;

/// From the member.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    Hello {
        version: Version,
    },
    /// The group's full members and removed devices, as the member knows them, and the
    /// pairing codes open on members (slot and lookup tag: the blind device, serving as the
    /// relay, answers pair lookups with them; see `net::lookup`).
    Members {
        full: Vec<Vec<u8>>,
        removed: Vec<Vec<u8>>,
        open_codes: Vec<(Vec<u8>, u16, String)>,
    },
    /// Every item after index `after`, then live.
    Fetch {
        after: u64,
    },
    Put(Envelope),
    Snapshot(Envelope),
    Grant(KeyGrant),
    /// The last sequence of each author held for a document.
    Heads {
        doc: DocId,
    },
}

/// From the blind device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Reply {
    Hello {
        version: Version,
        /// Where the blind device listens.
        addrs: Vec<String>,
    },
    /// The session is refused (version, or not a member).
    Refuse {
        message: String,
    },
    Item {
        index: u64,
        item: Item,
    },
    /// Every item up to `head` was sent.
    Caught {
        head: u64,
    },
    Stored {
        doc: DocId,
        kind: Kind,
        seq: u64,
        stored: Stored,
    },
    GrantStored {
        index: u64,
    },
    Refused {
        doc: DocId,
        kind: Kind,
        seq: u64,
        refusal: Refusal,
    },
    Heads {
        doc: DocId,
        heads: Vec<(Vec<u8>, u64)>,
    },
}

/// Why a blind session ended.
#[derive(Debug, thiserror::Error)]
pub enum BlindSessionError {
    #[error("stream i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad frame: {0}")]
    Decode(#[from] postcard::Error),
    #[error("the other side closed the stream")]
    Closed,
    #[error("refused: {0}")]
    Refused(String),
    #[error("the other side did not say hello in time")]
    HelloTimeout,
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("documents: {0}")]
    Doc(#[from] crate::docs::DocError),
    #[error("{0}")]
    Sealed(#[from] super::envelope::SealError),
}

pub(crate) type Transport = Framed<Compat<libp2p::Stream>, LengthDelimitedCodec>;

pub(crate) fn framed(stream: libp2p::Stream) -> Transport {
    let codec = LengthDelimitedCodec::builder()
        .big_endian()
        .length_field_length(4)
        .max_frame_length(MAX_BLIND_FRAME)
        .new_codec();
    Framed::new(stream.compat(), codec)
}

pub(crate) async fn send<T: Serialize>(
    transport: &mut (impl futures::Sink<bytes::Bytes, Error = std::io::Error> + Unpin),
    message: &T,
) -> Result<(), BlindSessionError> {
    let bytes = postcard::to_allocvec(message)?;
    transport.send(bytes::Bytes::from(bytes)).await?;
    Ok(())
}

pub(crate) async fn receive<T: for<'de> Deserialize<'de>>(
    transport: &mut (impl futures::Stream<Item = std::io::Result<bytes::BytesMut>> + Unpin),
) -> Result<T, BlindSessionError> {
    match transport.next().await {
        Some(frame) => Ok(postcard::from_bytes(&frame?)?),
        None => Err(BlindSessionError::Closed),
    }
}

/// The blind device's side of one member's session.
pub(crate) struct Server {
    pub store: BlindStore,
    pub trust: TrustStore,
    pub addrs: Vec<String>,
    /// Told when `Members` changed the trust store.
    pub trust_changed: Box<dyn Fn() + Send + Sync>,
}

impl Server {
    pub async fn serve(
        &self,
        member: PeerId,
        stream: libp2p::Stream,
    ) -> Result<(), BlindSessionError> {
        let mut transport = framed(stream);
        let hello = tokio::time::timeout(HELLO_TIMEOUT, receive::<Request>(&mut transport))
            .await
            .map_err(|_| BlindSessionError::HelloTimeout)??;
        match hello {
            Request::Hello { version } if version.major == PROTOCOL_VERSION.major => {}
            other => {
                let message = format!(
                    "this blind device speaks {} of /devicelink/blind; got {other:?}",
                    PROTOCOL_VERSION
                );
                send(
                    &mut transport,
                    &Reply::Refuse {
                        message: message.clone(),
                    },
                )
                .await?;
                return Err(BlindSessionError::Refused(message));
            }
        }
        let reply = Reply::Hello {
            version: PROTOCOL_VERSION,
            addrs: self.addrs.clone(),
        };
        send(&mut transport, &reply).await?;
        let mut head = self.store.watch_head();
        // `None` until the member asks to fetch; then the last index sent.
        let mut sent: Option<u64> = None;
        loop {
            tokio::select! {
                frame = receive::<Request>(&mut transport) => {
                    let request = frame?;
                    if !self.trust.is_trusted(&member) {
                        let message = "removed from the device group".to_string();
                        send(&mut transport, &Reply::Refuse { message: message.clone() }).await?;
                        return Err(BlindSessionError::Refused(message));
                    }
                    let reply = self.answer(&member, request, &mut sent, &mut transport).await?;
                    if let Some(reply) = reply {
                        // Items stored before the answer go first: a member that sees `Stored`
                        // has seen everything the store held before it.
                        if let Some(after) = sent.as_mut() {
                            self.send_new(&member, after, &mut transport).await?;
                        }
                        send(&mut transport, &reply).await?;
                    }
                }
                changed = head.changed(), if sent.is_some() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    if let Some(after) = sent.as_mut() {
                        self.send_new(&member, after, &mut transport).await?;
                    }
                }
            }
        }
    }

    async fn answer(
        &self,
        member: &PeerId,
        request: Request,
        sent: &mut Option<u64>,
        transport: &mut Transport,
    ) -> Result<Option<Reply>, BlindSessionError> {
        Ok(Some(match request {
            Request::Hello { .. } => return Ok(None),
            Request::Members {
                full,
                removed,
                open_codes,
            } => {
                self.apply_members(member, &full, &removed);
                let codes = open_codes
                    .into_iter()
                    .filter_map(|(id, slot, tag)| Some((PeerId::from_bytes(&id).ok()?, slot, tag)))
                    .collect();
                self.store.set_open_codes(codes);
                return Ok(None);
            }
            Request::Fetch { after } => {
                let mut last = after;
                self.send_new(member, &mut last, transport).await?;
                *sent = Some(last);
                Reply::Caught { head: last }
            }
            Request::Put(envelope) => {
                let (doc, seq) = (envelope.doc, envelope.seq);
                stored_or_refused(doc, Kind::Update, seq, self.store.put(member, envelope))
            }
            Request::Snapshot(envelope) => {
                let doc = envelope.doc;
                let result = self.store.put_snapshot(member, envelope);
                stored_or_refused(doc, Kind::Snapshot, 0, result)
            }
            Request::Grant(grant) => match self.store.put_grant(member, grant) {
                Ok(index) => Reply::GrantStored { index },
                Err(refusal) => Reply::Refused {
                    doc: [0; 32],
                    kind: Kind::Update,
                    seq: 0,
                    refusal,
                },
            },
            Request::Heads { doc } => Reply::Heads {
                doc,
                heads: self.store.heads(&doc)?,
            },
        }))
    }

    /// Sends the items after `after` that are for `member`, advancing `after`.
    async fn send_new(
        &self,
        member: &PeerId,
        after: &mut u64,
        transport: &mut Transport,
    ) -> Result<(), BlindSessionError> {
        loop {
            let (items, last) = self.store.after(*after, SEND_BATCH, |i| i.is_for(member))?;
            if last == *after {
                return Ok(());
            }
            for (index, item) in items {
                send(transport, &Reply::Item { index, item }).await?;
            }
            *after = last;
        }
    }

    /// A member's view of the group: its full members become trusted here (so they may fetch
    /// and reserve), removed devices are revoked for good (a stale view cannot bring them back).
    fn apply_members(&self, from: &PeerId, full: &[Vec<u8>], removed: &[Vec<u8>]) {
        let mut changed = false;
        for id in removed.iter().filter_map(|b| PeerId::from_bytes(b).ok()) {
            if id != *from && !self.trust.is_revoked(&id) {
                tracing::info!(device = %id, "removed from the group: no longer served");
                changed |= self.trust.revoke(&id).is_ok();
            }
        }
        for id in full.iter().filter_map(|b| PeerId::from_bytes(b).ok()) {
            if self.trust.is_trusted(&id) || self.trust.is_revoked(&id) {
                continue;
            }
            let name = format!("member {}", &id.to_string()[..12.min(id.to_string().len())]);
            if self.trust.add(id, TrustedDevice::new(name)).is_ok() {
                tracing::info!(device = %id, "a new member of the group (told by {from})");
                changed = true;
            }
        }
        if changed {
            (self.trust_changed)();
        }
    }
}

fn stored_or_refused(doc: DocId, kind: Kind, seq: u64, result: Result<Stored, Refusal>) -> Reply {
    match result {
        Ok(stored) => Reply::Stored {
            doc,
            kind,
            seq,
            stored,
        },
        Err(refusal) => Reply::Refused {
            doc,
            kind,
            seq,
            refusal,
        },
    }
}
