//! Finding a pairing host through a relay (`devicelink pair CODE --relay ADDR`): the joiner
//! knows the relay's address and the code, not the host's device id.
//!
//! A device with an open pairing code lists the code's lookup tag (a hash of the whole code,
//! [`crate::pairing::PairingCode::lookup_tag`]) in its own entry of the device group
//! (`pair_tag`), which the relay (a member) holds. The joiner, connected to the relay, asks over
//! `/devicelink/pair-lookup/1.4.0` which device holds that tag; the relay answers with the id of
//! a group device with that code open and connected to it (so reachable through it), or none.
//! A stranger without the code learns nothing (not even which slots are open: a wrong tag and a
//! closed slot get the same answer); a match confirms the whole code, so the relay takes at most
//! [`MAX_MISSES_PER_CODE`] wrong tags for an open code, and a bounded number of questions per
//! second. The joiner then dials `RELAY/p2p-circuit/p2p/HOST` and pairs as usual: the SPAKE2
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
/// Questions a relay answers per second, over every asker (a joiner asks every 300 ms for
/// up to 10 s; a stranger guessing tags gets a few thousand tries in a code's 5 minutes, out of
/// a million codes per slot).
pub const LOOKUPS_PER_SEC: f64 = 10.0;
/// Questions answered at once beyond the rate, after a quiet while.
const LOOKUP_BURST: f64 = 20.0;
/// Questions open at once (each waits up to 5 s for its request); more are dropped unread.
pub const MAX_OPEN_LOOKUPS: usize = 32;

/// The relay's bound on pair lookups: a token bucket and a cap on open questions.
pub(crate) struct LookupLimit {
    tokens: f64,
    refilled: std::time::Instant,
    open: std::sync::Arc<()>,
    misses: Misses,
}

impl Default for LookupLimit {
    fn default() -> Self {
        Self {
            tokens: LOOKUP_BURST,
            refilled: std::time::Instant::now(),
            open: std::sync::Arc::new(()),
            misses: Misses::default(),
        }
    }
}

impl LookupLimit {
    /// The wrong tags counted per open code.
    pub(crate) fn misses(&self) -> Misses {
        self.misses.clone()
    }

    /// A ticket to answer one question (held while it is answered), or `None`: drop it.
    pub(crate) fn admit(&mut self) -> Option<std::sync::Arc<()>> {
        let now = std::time::Instant::now();
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * LOOKUPS_PER_SEC).min(LOOKUP_BURST);
        self.refilled = now;
        // Every ticket is a clone of `open`: its count is the questions open, plus this one.
        if self.tokens < 1.0 || std::sync::Arc::strong_count(&self.open) > MAX_OPEN_LOOKUPS {
            return None;
        }
        self.tokens -= 1.0;
        Some(self.open.clone())
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Request {
    slot: u16,
    tag: String,
}

/// Wrong tags a relay takes for one open code's slot; then it stops answering for that code (the
/// joiner can still dial the host's relayed address, which `devicelink pair` prints). A match
/// confirms the whole code, so this is what bounds guessing it through the relay.
pub const MAX_MISSES_PER_CODE: u32 = 10;

/// A code open on a group device, as the relay sees it in the device group.
pub(crate) struct OpenCode {
    pub(crate) device: PeerId,
    pub(crate) slot: u16,
    pub(crate) tag: String,
}

/// Wrong tags asked for each open code, by device and tag (a new code starts afresh).
pub(crate) type Misses =
    std::sync::Arc<std::sync::Mutex<std::collections::HashMap<(PeerId, String), u32>>>;

/// The relay's answer to "which device has the code (`slot`, `tag`) open?".
pub(crate) fn answer(open: &[OpenCode], misses: &Misses, slot: u16, tag: &str) -> Option<PeerId> {
    let code = open.iter().find(|c| c.slot == slot)?;
    let mut misses = misses.lock().unwrap_or_else(|p| p.into_inner());
    if misses.len() > 1024 {
        misses.clear(); // codes come and go; this only forgets old ones' counts
    }
    let count = misses.entry((code.device, code.tag.clone())).or_default();
    if *count >= MAX_MISSES_PER_CODE {
        return None;
    }
    if code.tag != tag {
        *count += 1;
        return None;
    }
    Some(code.device)
}

/// Longest tag read (a tag is 32 hex digits).
const MAX_TAG_LEN: usize = 64;

#[derive(Debug, Serialize, Deserialize)]
struct Answer {
    /// The device id holding the slot, if any.
    device: Option<String>,
}

/// Relay side: answers one question with `find(slot, tag)`.
pub async fn serve(stream: libp2p::Stream, find: impl FnOnce(u16, &str) -> Option<PeerId>) {
    let mut framed = Framed::new(stream.compat(), codec());
    let request = match tokio::time::timeout(STEP_TIMEOUT, framed.next()).await {
        Ok(Some(Ok(frame))) => postcard::from_bytes::<Request>(&frame).ok(),
        _ => None,
    };
    let Some(request) = request.filter(|r| r.tag.len() <= MAX_TAG_LEN) else {
        return; // malformed or silent: the stream is dropped
    };
    let answer = Answer {
        device: find(request.slot, &request.tag).map(|p| p.to_string()),
    };
    if let Ok(bytes) = postcard::to_stdvec(&answer) {
        let send = async {
            framed.send(bytes::Bytes::from(bytes)).await?;
            SinkExt::<bytes::Bytes>::close(&mut framed).await
        };
        let _ = tokio::time::timeout(STEP_TIMEOUT, send).await;
    }
}

/// Joiner side: asks which device has the code with `slot` and lookup tag `tag` open.
pub async fn ask(stream: libp2p::Stream, slot: u16, tag: &str) -> Result<Option<PeerId>, String> {
    let mut framed = Framed::new(stream.compat(), codec());
    let request = postcard::to_stdvec(&Request {
        slot,
        tag: tag.to_string(),
    })
    .map_err(|e| e.to_string())?;
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
