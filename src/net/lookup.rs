//! Finding a pairing host through a relay (`devicelink pair CODE --relay ADDR`): the joiner
//! knows the relay's address and the code's public slot, not the host's device id.
//!
//! A device with an open pairing code lists the slot in its own entry of the device group
//! (`pair_slot`), which the relay (a member) holds. The joiner, connected to the relay, asks
//! over `/devicelink/pair-lookup/1.4.0` which device holds that slot; the relay answers with the
//! id of a group device with the slot open and connected to it (so reachable through it), or
//! none. The joiner then dials `RELAY/p2p-circuit/p2p/HOST` and pairs as usual: the SPAKE2
//! exchange is unchanged, so the relay learns nothing that lets it pair in the joiner's place.
//! One question per stream; the answer only says which device is pairing right now.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use libp2p::{PeerId, StreamProtocol};
use serde::{Deserialize, Serialize};
use tokio_util::codec::Framed;
use tokio_util::compat::FuturesAsyncReadCompatExt;

use crate::sync::message::codec;

pub const PAIR_LOOKUP_PROTOCOL: StreamProtocol =
    StreamProtocol::new("/devicelink/pair-lookup/1.4.0");

/// How long either side waits for the other's message.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Serialize, Deserialize)]
struct Request {
    slot: u16,
}

#[derive(Debug, Serialize, Deserialize)]
struct Answer {
    /// The device id holding the slot, if any.
    device: Option<String>,
}

/// Relay side: answers one question with `find(slot)`.
pub async fn serve(stream: libp2p::Stream, find: impl FnOnce(u16) -> Option<PeerId>) {
    let mut framed = Framed::new(stream.compat(), codec());
    let request = match tokio::time::timeout(STEP_TIMEOUT, framed.next()).await {
        Ok(Some(Ok(frame))) => postcard::from_bytes::<Request>(&frame).ok(),
        _ => None,
    };
    let Some(request) = request else {
        return; // malformed or silent: the stream is dropped
    };
    let answer = Answer {
        device: find(request.slot).map(|p| p.to_string()),
    };
    if let Ok(bytes) = postcard::to_stdvec(&answer) {
        let send = async {
            framed.send(bytes::Bytes::from(bytes)).await?;
            SinkExt::<bytes::Bytes>::close(&mut framed).await
        };
        let _ = tokio::time::timeout(STEP_TIMEOUT, send).await;
    }
}

/// Joiner side: asks which device holds `slot`.
pub async fn ask(stream: libp2p::Stream, slot: u16) -> Result<Option<PeerId>, String> {
    let mut framed = Framed::new(stream.compat(), codec());
    let request = postcard::to_stdvec(&Request { slot }).map_err(|e| e.to_string())?;
    tokio::time::timeout(STEP_TIMEOUT, framed.send(bytes::Bytes::from(request)))
        .await
        .map_err(|_| "the relay did not take the question".to_string())?
        .map_err(|e| e.to_string())?;
    let frame = match tokio::time::timeout(STEP_TIMEOUT, framed.next()).await {
        Ok(Some(Ok(frame))) => frame,
        Ok(Some(Err(e))) => return Err(e.to_string()),
        Ok(None) => return Err("the relay closed the stream without answering".into()),
        Err(_) => return Err("the relay did not answer".into()),
    };
    let answer: Answer =
        postcard::from_bytes(&frame).map_err(|e| format!("malformed answer: {e}"))?;
    answer
        .device
        .map(|d| d.parse().map_err(|e| format!("malformed device id: {e}")))
        .transpose()
}
