//! One admitted y-websocket connection: the y-protocols exchange for one document, as the
//! reference y-websocket server does it.
//!
//! - On connect: `SyncStep1` with the agent's state vector, then the awareness states present.
//! - `SyncStep1` from the client: answered with `SyncStep2` (what it lacks); the first at once,
//!   repeated ones at most once a second (the newest is answered), so a client cannot make the
//!   agent send the whole document thousands of times.
//! - Every frame is checked before yrs decodes it (nesting, declared counts; see
//!   [`crate::nesting`]): a lie closes the connection.
//! - `SyncStep2` / `Update` from the client: applied as a local change (pushed to the other
//!   apps and devices at once, stored with the writer's next batch: the protocol has no
//!   acknowledgement, and a client re-sends what the agent lacks when it reconnects), unless the
//!   token is read-only (answered once with `Auth` denied).
//! - Every change made elsewhere goes to the client as `Update`; its own changes do not come
//!   back. A client too slow to keep up misses the live stream and gets one catch-up `Update`
//!   (the diff against what it had) instead of an ever-growing queue.
//! - Awareness: applied as the connection's [`PresenceClient`]; every change in the
//!   document, renewals and the client's own included, is sent back (y-websocket clients close a
//!   socket that hears nothing for 30 s; renewals every 15 s keep it open). A quiet connection
//!   also gets an empty awareness message every 10 s for the same reason.
//! - One message per WebSocket frame: 1.x-3.x clients decode only the first of a frame.
//! - The connection ends when the client leaves, the app's token is revoked, the document is
//!   deleted, or a send stalls for 30 s; the client's presence leaves with it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message as Frame;
use tokio_tungstenite::WebSocketStream;
use yrs::sync::{Message, MessageReader, SyncMessage};
use yrs::updates::decoder::DecoderV1;
use yrs::updates::encoder::Encode;
use yrs::{ReadTxn, StateVector, Transact};

use crate::agent::AgentHandle;
use crate::apps::AppGrant;
use crate::documents::DocHandle;
use crate::{PresenceClient, PresenceEvent, PresenceHub};

/// A send that does not complete in this time ends the connection (the client stopped reading).
const SEND_STALL: Duration = Duration::from_secs(30);
/// A connection with nothing sent for this long gets an empty awareness message.
const KEEPALIVE: Duration = Duration::from_secs(10);
/// A client's repeated `SyncStep1`s are answered at most this often (each answer can be the
/// whole document; the first is answered at once, later ones coalesce into the newest).
const STEP1_INTERVAL: Duration = Duration::from_secs(1);
/// Close code when the app's token is revoked.
pub const REVOKED: u16 = 4403;

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("websocket: {0}")]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("the client did not read for {0:?}")]
    Stalled(Duration),
}

pub(super) type Ws = WebSocketStream<TcpStream>;

pub(super) async fn run(agent: AgentHandle, ws: Ws, doc: String, grant: Arc<AppGrant>) {
    let presence = agent.presence().client();
    let handle = match agent.docs().open(&doc) {
        Ok(handle) => handle.for_client(presence.id()),
        Err(e) => {
            tracing::warn!(doc, "y-websocket: cannot open the document: {e}");
            let mut ws = ws;
            let _ = ws
                .close(Some(close(CloseCode::Error, &e.to_string())))
                .await;
            return;
        }
    };
    let mut conn = Connection {
        ws,
        doc: handle,
        grant,
        presence,
        client_sv: StateVector::default(),
        step1_asked: None,
        next_step1: Instant::now(),
        told_read_only: false,
        last_sent: Instant::now(),
    };
    if let Err(e) = conn.serve(&agent).await {
        tracing::debug!(doc, app = %conn.grant.name, "y-websocket connection ended: {e}");
    }
    // Dropping the connection drops its presence client: its states leave every device.
}

struct Connection {
    ws: Ws,
    doc: DocHandle,
    grant: Arc<AppGrant>,
    /// This connection as a presence client; its id is stamped on its changes too.
    presence: PresenceClient,
    /// What the client said it had (its `SyncStep1`): a catch-up diffs against it.
    client_sv: StateVector,
    /// A `SyncStep1` not answered yet (the newest), and when the next answer may go.
    step1_asked: Option<StateVector>,
    next_step1: Instant,
    told_read_only: bool,
    last_sent: Instant,
}

impl Connection {
    async fn serve(&mut self, agent: &AgentHandle) -> Result<(), ConnError> {
        let hub = agent.presence().clone();
        // Subscribe before reading the state: nothing after this point can be missed.
        let mut changes = self.doc.subscribe();
        let mut presence = hub.subscribe();
        let sv = self.doc.state_vector_decoded();
        self.send(Message::Sync(SyncMessage::SyncStep1(sv))).await?;
        let joined = hub.states_for_join(self.doc.name());
        if !joined.clients.is_empty() {
            self.send(Message::Awareness(joined)).await?;
        }
        let mut keepalive = tokio::time::interval(KEEPALIVE);
        keepalive.reset();
        let revoked = self.grant.revoked.clone();
        loop {
            let (step1_asked, step1_due) = (self.step1_asked.is_some(), self.next_step1);
            tokio::select! {
                _ = tokio::time::sleep_until(step1_due.into()), if step1_asked => {
                    self.answer_step1().await?;
                }
                frame = self.ws.next() => match frame {
                    Some(Ok(Frame::Binary(data))) => {
                        if let Some(reason) = self.receive(&data, &hub).await? {
                            let _ = self.ws.close(Some(close(CloseCode::Invalid, &reason))).await;
                            return Ok(());
                        }
                    }
                    Some(Ok(Frame::Close(_))) | None => return Ok(()),
                    Some(Ok(_)) => {} // text, ping, pong: y-websocket sends none of interest
                    Some(Err(e)) => return Err(e.into()),
                },
                change = changes.recv() => match change {
                    Ok(change) if change.deleted => {
                        let _ = self.ws.close(Some(close(CloseCode::Normal, "the document was deleted"))).await;
                        return Ok(());
                    }
                    Ok(change) if change.client == self.presence.id() => {}
                    Ok(change) => {
                        self.send(Message::Sync(SyncMessage::Update(change.update.to_vec()))).await?;
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Too slow for the live stream: one diff covers everything missed.
                        let diff = self.doc.yrs_doc().transact().encode_diff_v1(&self.client_sv);
                        self.client_sv = self.doc.state_vector_decoded();
                        self.send(Message::Sync(SyncMessage::Update(diff))).await?;
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
                event = presence.recv() => match event {
                    Ok(event) => self.relay_presence(&event).await?,
                    Err(broadcast::error::RecvError::Lagged(_)) => self.send_presence(&hub).await?,
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
                _ = revoked.cancelled() => {
                    // 4400-4499: y-websocket 3.x clients stop reconnecting (2.x retry, refused).
                    let _ = self.ws.close(Some(close(CloseCode::from(REVOKED), "the app's token was revoked"))).await;
                    return Ok(());
                }
                _ = keepalive.tick() => {
                    if self.last_sent.elapsed() >= KEEPALIVE {
                        self.send(Message::Awareness(yrs::sync::AwarenessUpdate { clients: Default::default() })).await?;
                    }
                }
            }
        }
    }

    /// Handles one frame from the client; returns a reason to close the connection, if any.
    async fn receive(
        &mut self,
        data: &[u8],
        hub: &PresenceHub,
    ) -> Result<Option<String>, ConnError> {
        // yrs reserves memory for the counts a message declares: lies are refused first.
        if let Err(e) = crate::nesting::check_y_protocols_frame(data) {
            return Ok(Some(format!("refused y-protocols message: {e}")));
        }
        let mut decoder = DecoderV1::from(data);
        for message in MessageReader::new(&mut decoder) {
            let message = match message {
                Ok(message) => message,
                Err(e) => return Ok(Some(format!("malformed y-protocols message: {e}"))),
            };
            match message {
                Message::Sync(SyncMessage::SyncStep1(sv)) => self.step1_asked = Some(sv),
                Message::Sync(SyncMessage::SyncStep2(update))
                | Message::Sync(SyncMessage::Update(update)) => {
                    if !self.grant.may_write(self.doc.name()) {
                        if !self.told_read_only {
                            self.told_read_only = true;
                            let reason = "read-only token: changes are not saved".to_string();
                            self.send(Message::Auth(Some(reason))).await?;
                        }
                        continue;
                    }
                    if let Err(e) = self.doc.apply_update_unacked(&update) {
                        return Ok(Some(e.to_string()));
                    }
                }
                Message::Awareness(update) => {
                    if let Err(e) = self.presence.apply(self.doc.name(), update) {
                        tracing::debug!(doc = self.doc.name(), "presence ignored: {e}");
                    }
                }
                Message::AwarenessQuery => self.send_presence(hub).await?,
                Message::Auth(_) | Message::Custom(..) => {}
            }
        }
        self.answer_step1_if_due().await?;
        Ok(None)
    }

    /// Answers the newest `SyncStep1` with what the client lacks, unless one was answered
    /// within [`STEP1_INTERVAL`] (then the select loop answers it when that is over).
    async fn answer_step1_if_due(&mut self) -> Result<(), ConnError> {
        if self.step1_asked.is_some() && Instant::now() >= self.next_step1 {
            self.answer_step1().await?;
        }
        Ok(())
    }

    async fn answer_step1(&mut self) -> Result<(), ConnError> {
        let Some(sv) = self.step1_asked.take() else {
            return Ok(());
        };
        let diff = self.doc.yrs_doc().transact().encode_diff_v1(&sv);
        self.client_sv = sv;
        self.next_step1 = Instant::now() + STEP1_INTERVAL;
        self.send(Message::Sync(SyncMessage::SyncStep2(diff))).await
    }

    async fn relay_presence(&mut self, event: &PresenceEvent) -> Result<(), ConnError> {
        if &*event.doc != self.doc.name() {
            return Ok(());
        }
        self.send(Message::Awareness((*event.update).clone())).await
    }

    async fn send_presence(&mut self, hub: &PresenceHub) -> Result<(), ConnError> {
        let states = hub.states(self.doc.name());
        if states.clients.is_empty() {
            return Ok(());
        }
        self.send(Message::Awareness(states)).await
    }

    /// Sends one message in its own frame; a client that does not take it within
    /// [`SEND_STALL`] ends the connection.
    async fn send(&mut self, message: Message) -> Result<(), ConnError> {
        let frame = Frame::Binary(message.encode_v1().into());
        match tokio::time::timeout(SEND_STALL, self.ws.send(frame)).await {
            Ok(result) => result?,
            Err(_) => return Err(ConnError::Stalled(SEND_STALL)),
        }
        self.last_sent = Instant::now();
        Ok(())
    }
}

/// A close frame; the reason is cut to what a close frame can carry (123 bytes).
fn close(code: CloseCode, reason: &str) -> CloseFrame {
    let mut end = reason.len().min(120);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    CloseFrame {
        code,
        reason: reason[..end].to_string().into(),
    }
}
