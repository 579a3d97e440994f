//! A hand-driven libp2p peer for conformance runs: the same transport stack as an agent (TCP,
//! Noise, Yamux) with sync streams opened or accepted on request and frames written by hand.

use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use libp2p::identity::Keypair;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId};
use tokio::io::AsyncWriteExt;
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};

use crate::sync::message::codec;
use crate::sync::SYNC_PROTOCOL;

/// How long a connection, a stream or an expected frame may take.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// A connected raw peer; its swarm runs in a background task until this is dropped.
pub struct RawPeer {
    target: PeerId,
    control: crate::net::streams::Control,
    incoming: crate::net::streams::IncomingStreams,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for RawPeer {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl RawPeer {
    /// Dials `target` at `addr` as `keypair` and waits for the Noise handshake.
    pub async fn connect(
        keypair: Keypair,
        target: PeerId,
        addr: Multiaddr,
    ) -> Result<Self, String> {
        let mut swarm = crate::net::build_swarm(keypair).map_err(|e| e.to_string())?;
        let mut control = swarm.behaviour().stream.new_control();
        let incoming = control
            .accept(SYNC_PROTOCOL)
            .map_err(|e| format!("cannot accept sync streams: {e}"))?;
        let opts = DialOpts::peer_id(target).addresses(vec![addr]).build();
        swarm.dial(opts).map_err(|e| format!("cannot dial: {e}"))?;
        let (connected, connected_rx) = tokio::sync::oneshot::channel();
        let driver = tokio::spawn(async move {
            let mut connected = Some(connected);
            loop {
                match swarm.select_next_some().await {
                    SwarmEvent::ConnectionEstablished { .. } => {
                        if let Some(tx) = connected.take() {
                            let _ = tx.send(Ok(()));
                        }
                    }
                    SwarmEvent::OutgoingConnectionError { error, .. } => {
                        if let Some(tx) = connected.take() {
                            let _ = tx.send(Err(error.to_string()));
                        }
                    }
                    _ => {}
                }
            }
        });
        match tokio::time::timeout(STEP_TIMEOUT, connected_rx).await {
            Ok(Ok(Ok(()))) => Ok(Self {
                target,
                control,
                incoming,
                driver,
            }),
            Ok(Ok(Err(e))) => Err(format!("cannot connect: {e}")),
            _ => Err("no connection within 10 s".into()),
        }
    }

    /// Opens a sync stream to the target.
    pub async fn open(&mut self) -> Result<Stream, String> {
        let stream = tokio::time::timeout(
            STEP_TIMEOUT,
            self.control.open_stream(self.target, SYNC_PROTOCOL),
        )
        .await
        .map_err(|_| "opening a sync stream timed out".to_string())?
        .map_err(|e| format!("cannot open a sync stream: {e}"))?;
        Ok(Stream::new(stream))
    }

    /// Waits for the target to open a sync stream.
    pub async fn accept(&mut self) -> Result<Stream, String> {
        loop {
            let next = tokio::time::timeout(STEP_TIMEOUT, self.incoming.next())
                .await
                .map_err(|_| "the target opened no sync stream within 10 s".to_string())?;
            match next {
                Some((peer, stream)) if peer == self.target => return Ok(Stream::new(stream)),
                Some(_) => continue,
                None => return Err("the peer stopped".into()),
            }
        }
    }
}

/// One sync stream: raw bytes out, decoded frames in.
pub struct Stream {
    framed: Framed<Compat<libp2p::Stream>, LengthDelimitedCodec>,
}

/// What reading a frame gave.
pub enum Read {
    Frame(Bytes),
    /// The stream ended (closed or reset).
    End,
    Timeout,
}

impl Stream {
    fn new(stream: libp2p::Stream) -> Self {
        Self {
            framed: Framed::new(stream.compat(), codec()),
        }
    }

    /// Writes bytes as they are (a whole frame, length prefix included, or any garbage).
    pub async fn write_raw(&mut self, bytes: &[u8]) -> Result<(), String> {
        let io = self.framed.get_mut();
        io.write_all(bytes)
            .await
            .map_err(|e| format!("write failed: {e}"))?;
        io.flush().await.map_err(|e| format!("flush failed: {e}"))
    }

    /// Reads the next frame body, within `limit`.
    pub async fn read(&mut self, limit: Duration) -> Read {
        match tokio::time::timeout(limit, self.framed.next()).await {
            Ok(Some(Ok(frame))) => Read::Frame(frame.freeze()),
            Ok(Some(Err(_))) | Ok(None) => Read::End,
            Err(_) => Read::Timeout,
        }
    }

    /// Half-closes this side (FIN).
    pub async fn close(&mut self) {
        let _ = tokio::time::timeout(STEP_TIMEOUT, SinkExt::<Bytes>::close(&mut self.framed)).await;
    }
}
