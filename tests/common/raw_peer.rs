//! A hand-driven libp2p peer for black-box tests: the agent's own transport stack (TCP + Noise +
//! Yamux), with frames written by hand on streams it opens.

use std::time::Duration;

use devicelink::sync::message::codec;
use devicelink::sync::SYNC_PROTOCOL;
use devicelink::{AgentHandle, PeerId};
use futures::StreamExt;
use libp2p::swarm::SwarmEvent;
use tokio_util::codec::Framed;
use tokio_util::compat::FuturesAsyncReadCompatExt;

use super::LIMIT;

pub type Transport =
    Framed<tokio_util::compat::Compat<libp2p::Stream>, tokio_util::codec::LengthDelimitedCodec>;

/// A raw libp2p peer connected to `agent`; its swarm is driven by a background task.
pub struct RawPeer {
    pub id: PeerId,
    pub control: devicelink::net::streams::Control,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for RawPeer {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// A raw peer that has dialed `agent` and completed the Noise handshake (the agent may still
/// drop the connection right after, if it does not trust the peer).
pub async fn raw_peer_connected_to(agent: &AgentHandle) -> RawPeer {
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    raw_peer_with(keypair, agent).await
}

pub async fn raw_peer_with(keypair: libp2p::identity::Keypair, agent: &AgentHandle) -> RawPeer {
    raw_peer_dialing(keypair, agent.device_id(), agent.listen_addrs()[0].clone()).await
}

/// A raw peer with `keypair` that has dialed the agent `agent_id` at `addr` (e.g. a process).
pub async fn raw_peer_dialing(
    keypair: libp2p::identity::Keypair,
    agent_id: PeerId,
    addr: libp2p::Multiaddr,
) -> RawPeer {
    let id = keypair.public().to_peer_id();
    let mut swarm = devicelink::net::build_swarm(keypair).unwrap();
    let control = swarm.behaviour().stream.new_control();
    let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(agent_id)
        .addresses(vec![addr])
        .build();
    swarm.dial(opts).unwrap();
    let (connected, connected_rx) = tokio::sync::oneshot::channel();
    let driver = tokio::spawn(async move {
        let mut connected = Some(connected);
        loop {
            if let SwarmEvent::ConnectionEstablished { .. } = swarm.select_next_some().await {
                if let Some(tx) = connected.take() {
                    let _ = tx.send(());
                }
            }
        }
    });
    tokio::time::timeout(LIMIT, connected_rx)
        .await
        .expect("raw peer connects in time")
        .expect("driver alive");
    RawPeer {
        id,
        control,
        driver,
    }
}

pub async fn open(peer: &mut RawPeer, agent: &AgentHandle) -> Result<Transport, String> {
    let stream = tokio::time::timeout(
        Duration::from_secs(10),
        peer.control.open_stream(agent.device_id(), SYNC_PROTOCOL),
    )
    .await
    .map_err(|_| "open_stream timed out".to_string())?
    .map_err(|e| e.to_string())?;
    Ok(Framed::new(stream.compat(), codec()))
}
