//! Pairing two devices with a short code, over `/devicelink/pair/1.4.0`.
//!
//! The host (`devicelink pair`) opens a [`PairingCode`] like `42-815-067`: the first group is a
//! public slot (advertised over mDNS so the joiner can find the host), the whole code is the
//! password of a SPAKE2 exchange. The SPAKE2 identity binds both Noise-authenticated device ids,
//! so a machine in the middle gets a different key. Each side then proves it holds the key
//! (joiner first); a wrong code fails on both sides and costs the host one attempt. On success
//! both exchange names and addresses, add each other to their trust stores, and show the same
//! six-digit verification string derived from the key.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use hkdf::Hkdf;
use libp2p::{PeerId, StreamProtocol};
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use spake2::{Ed25519Group, Identity, Password, Spake2};
use tokio::sync::broadcast;
use tokio_util::codec::Framed;
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};

use crate::sync::message::{codec, Version, PROTOCOL_VERSION};

/// The libp2p stream protocol id of pairing.
pub const PAIR_PROTOCOL: StreamProtocol = StreamProtocol::new("/devicelink/pair/1.4.0");
/// How long a code stays valid by default.
pub const DEFAULT_EXPIRY: Duration = Duration::from_secs(5 * 60);
/// The longest a code may stay valid (longer requests are refused, not wrapped around).
pub const MAX_EXPIRY: Duration = Duration::from_secs(24 * 3600);
/// Wrong codes a host accepts before it burns its code.
pub const MAX_ATTEMPTS: u32 = 3;
/// After a failed attempt the host takes the next one no sooner than this ("busy" until then):
/// burning a code takes at least as long as a person mistyping it three times.
pub const ATTEMPT_SPACING: Duration = Duration::from_secs(5);
/// How long the joiner waits for the host's next message.
const STEP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the host, once it has given a joiner its SPAKE2 message, waits for the proof. The
/// exchange is automatic on both sides, so this is short: a joiner that stalls holds the code
/// ("busy" for everyone else) and counts as a failed attempt.
const HOST_STEP_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest pairing frame (they are all tiny).
const MAX_PAIR_FRAME: usize = 64 * 1024;

/// A pairing code: `SS-DDD-DDD`, a public two-digit slot and six secret digits.
#[derive(Clone, PartialEq, Eq)]
pub struct PairingCode {
    slot: u16,
    secret: u32,
}

impl PairingCode {
    pub fn generate() -> Self {
        let mut rng = rand::thread_rng();
        Self {
            slot: rng.gen_range(10..100),
            secret: rng.gen_range(0..1_000_000),
        }
    }

    /// The public part, advertised while the code is open.
    pub fn slot(&self) -> u16 {
        self.slot
    }

    /// What a device with this code open lists in the device group, and a joiner asking the
    /// relay presents (§27.4): a hash of the whole code, so that only who knows the code learns
    /// which device opened it.
    pub fn lookup_tag(&self) -> String {
        use sha2::Digest as _;
        let digest = Sha256::digest(format!("devicelink pair-lookup 1.4 {self}").as_bytes());
        digest[..16].iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for PairingCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02}-{:03}-{:03}",
            self.slot,
            self.secret / 1000,
            self.secret % 1000
        )
    }
}

impl fmt::Debug for PairingCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PairingCode({:02}-***-***)", self.slot)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a pairing code; it looks like 42-815-067 (8 digits)")]
pub struct BadCode(String);

impl FromStr for PairingCode {
    type Err = BadCode;

    fn from_str(s: &str) -> Result<Self, BadCode> {
        let digits: String = s.chars().filter(|c| !matches!(c, '-' | ' ')).collect();
        if digits.len() != 8 || !digits.chars().all(|c| c.is_ascii_digit()) {
            return Err(BadCode(s.chars().take(32).collect()));
        }
        let slot = digits[..2].parse().map_err(|_| BadCode(s.into()))?;
        let secret = digits[2..].parse().map_err(|_| BadCode(s.into()))?;
        if slot < 10 {
            return Err(BadCode(s.chars().take(32).collect()));
        }
        Ok(Self { slot, secret })
    }
}

/// Messages of `/devicelink/pair/1.4.0` (postcard, framed like sync).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PairMessage {
    /// 0, joiner -> host: version, the code's slot, the joiner's SPAKE2 message.
    Start {
        version: Version,
        slot: u16,
        #[serde(with = "serde_bytes")]
        spake: Vec<u8>,
    },
    /// 1, host -> joiner: the host's SPAKE2 message.
    Spake {
        #[serde(with = "serde_bytes")]
        spake: Vec<u8>,
    },
    /// 2, both (joiner first): proof of the shared key.
    Confirm {
        #[serde(with = "serde_bytes")]
        proof: Vec<u8>,
    },
    /// 3, both after confirmation: who I am and where to reach me.
    Welcome {
        name: String,
        listen_addrs: Vec<String>,
    },
    /// 4: the pairing attempt failed; the stream ends.
    Failed { code: PairFailure, message: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PairFailure {
    UnsupportedVersion,
    NoOpenCode,
    WrongCode,
    Expired,
    TooManyAttempts,
    Busy,
    ProtocolViolation,
}

/// Why pairing failed, as shown to the user.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PairError {
    #[error("wrong pairing code: nothing was linked (check the code on the other device)")]
    WrongCode,
    #[error("the other device has no open pairing code (start `devicelink pair` there first)")]
    NoOpenCode,
    #[error("the pairing code has expired; start a new one")]
    Expired,
    #[error("too many wrong codes: this pairing code is no longer valid; start a new one")]
    TooManyAttempts,
    #[error("the other device is busy with another pairing attempt; try again")]
    Busy,
    #[error("the other device speaks an incompatible version: {0}")]
    Version(String),
    #[error("the other device did not prove it knows the code: nothing was linked")]
    HostNotProven,
    #[error("no device nearby shows a code starting with {0}- (is `devicelink pair` still running on it, on this network? Or give its address: devicelink pair CODE --peer ADDR; `devicelink pair` on it prints the line)")]
    NotFound(u16),
    #[error("no device reachable through the relay shows a code starting with {0}- (is `devicelink pair` running there, and is that device linked with the relay?)")]
    NotOnRelay(u16),
    #[error("cannot reach the other device: {0}")]
    Unreachable(String),
    #[error("pairing protocol error: {0}")]
    Protocol(String),
    #[error("could not save the paired device: {0}")]
    Store(String),
}

impl PairError {
    fn failure(&self) -> PairFailure {
        match self {
            PairError::WrongCode | PairError::HostNotProven => PairFailure::WrongCode,
            PairError::NoOpenCode | PairError::NotFound(_) => PairFailure::NoOpenCode,
            PairError::Expired => PairFailure::Expired,
            PairError::TooManyAttempts => PairFailure::TooManyAttempts,
            PairError::Busy => PairFailure::Busy,
            PairError::Version(_) => PairFailure::UnsupportedVersion,
            _ => PairFailure::ProtocolViolation,
        }
    }

    fn from_failure(code: PairFailure, message: String) -> Self {
        match code {
            PairFailure::WrongCode => PairError::WrongCode,
            PairFailure::NoOpenCode => PairError::NoOpenCode,
            PairFailure::Expired => PairError::Expired,
            PairFailure::TooManyAttempts => PairError::TooManyAttempts,
            PairFailure::Busy => PairError::Busy,
            PairFailure::UnsupportedVersion => PairError::Version(message),
            PairFailure::ProtocolViolation => PairError::Protocol(message),
        }
    }
}

/// A completed pairing, as both sides report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Paired {
    pub device_id: String,
    pub name: String,
    pub listen_addrs: Vec<String>,
    /// Six digits both devices show; the user compares them.
    pub verification: String,
}

/// What the host reports while its code is open.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HostEvent {
    /// An attempt failed (wrong code, or the joiner stalled or went away mid-exchange): it
    /// counts against the code's attempts.
    AttemptFailed {
        device_id: String,
        attempts_left: u32,
        #[serde(default)]
        reason: String,
    },
    Paired(Paired),
    Closed {
        reason: String,
    },
}

struct OpenCode {
    code: PairingCode,
    expires_at: Instant,
    attempts_left: u32,
    in_progress: bool,
    /// Kept after expiry so a late joiner is told "expired" rather than "no code".
    expired: bool,
    /// Kept after the last attempt failed, so the joiner is told so rather than "no code".
    burned: bool,
    /// No attempt is taken before this (set by a failed one; see [`ATTEMPT_SPACING`]).
    next_attempt: Option<Instant>,
}

/// The host side's state: at most one open code.
#[derive(Clone)]
pub struct PairingHost {
    open: Arc<Mutex<Option<OpenCode>>>,
    events: broadcast::Sender<HostEvent>,
}

impl Default for PairingHost {
    fn default() -> Self {
        Self {
            open: Arc::default(),
            events: broadcast::channel(64).0,
        }
    }
}

impl PairingHost {
    fn lock(&self) -> MutexGuard<'_, Option<OpenCode>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a new code valid for `expiry`. A code still open is closed first, and whoever
    /// waits on it is told it was replaced.
    pub fn open(&self, expiry: Duration) -> PairingCode {
        let code = PairingCode::generate();
        let replaced = self.lock().replace(OpenCode {
            code: code.clone(),
            expires_at: Instant::now() + expiry.min(MAX_EXPIRY),
            attempts_left: MAX_ATTEMPTS,
            in_progress: false,
            expired: false,
            burned: false,
            next_attempt: None,
        });
        if replaced.is_some_and(|old| !old.expired && !old.burned) {
            let _ = self.events.send(HostEvent::Closed {
                reason: "replaced by a newer pairing code (`devicelink pair` ran again)".into(),
            });
        }
        code
    }

    /// Events about the open code.
    pub fn subscribe(&self) -> broadcast::Receiver<HostEvent> {
        self.events.subscribe()
    }

    /// The slot of the open, unexpired code.
    pub fn open_slot(&self) -> Option<u16> {
        self.lock()
            .as_ref()
            .filter(|o| !o.expired && !o.burned && o.expires_at > Instant::now())
            .map(|o| o.code.slot)
    }

    /// The slot and lookup tag of the open, unexpired code ([`PairingCode::lookup_tag`]), read
    /// together (one code's, even if a new one is opened meanwhile).
    pub fn open_lookup(&self) -> Option<(u16, String)> {
        self.lock()
            .as_ref()
            .filter(|o| !o.expired && !o.burned && o.expires_at > Instant::now())
            .map(|o| (o.code.slot, o.code.lookup_tag()))
    }

    /// Whether a code is open (so untrusted connections must be allowed for a while).
    pub fn is_open(&self) -> bool {
        self.open_slot().is_some()
    }

    /// Closes the code if it has expired; returns whether it did.
    pub fn expire(&self) -> bool {
        let mut open = self.lock();
        let Some(code) = open.as_mut() else {
            return false;
        };
        if !code.expired && code.expires_at <= Instant::now() {
            code.expired = true;
            drop(open);
            let _ = self.events.send(HostEvent::Closed {
                reason: PairError::Expired.to_string(),
            });
            return true;
        }
        false
    }

    /// Claims the open code for one attempt by `slot`.
    fn begin(&self, slot: u16) -> Result<PairingCode, PairError> {
        let mut guard = self.lock();
        let open = guard.as_mut().ok_or(PairError::NoOpenCode)?;
        if open.code.slot != slot {
            return Err(PairError::NoOpenCode);
        }
        if open.burned {
            return Err(PairError::TooManyAttempts);
        }
        if open.expired || open.expires_at <= Instant::now() {
            return Err(PairError::Expired);
        }
        if open.in_progress || open.next_attempt.is_some_and(|at| Instant::now() < at) {
            return Err(PairError::Busy);
        }
        open.in_progress = true;
        Ok(open.code.clone())
    }

    /// Ends an attempt on `code`: success consumes the code; any failure after the exchange
    /// began (a wrong code, a stall, a joiner that went away) costs one attempt, since each
    /// exchange lets the joiner test one guess.
    fn finish(&self, peer: PeerId, code: &PairingCode, outcome: &Result<Paired, PairError>) {
        let mut guard = self.lock();
        // The code may have been replaced by a newer one meanwhile: that one is not touched.
        let Some(open) = guard.as_mut().filter(|o| &o.code == code) else {
            return;
        };
        open.in_progress = false;
        if open.expired {
            return;
        }
        match outcome {
            Ok(paired) => {
                *guard = None;
                drop(guard);
                let _ = self.events.send(HostEvent::Paired(paired.clone()));
            }
            Err(PairError::Store(_)) => {}
            Err(e) => {
                open.attempts_left = open.attempts_left.saturating_sub(1);
                open.next_attempt = Some(Instant::now() + ATTEMPT_SPACING);
                let attempts_left = open.attempts_left;
                open.burned = attempts_left == 0;
                drop(guard);
                let _ = self.events.send(HostEvent::AttemptFailed {
                    device_id: peer.to_string(),
                    attempts_left,
                    reason: e.to_string(),
                });
                if attempts_left == 0 {
                    let _ = self.events.send(HostEvent::Closed {
                        reason: PairError::TooManyAttempts.to_string(),
                    });
                }
            }
        }
    }
}

type Transport = Framed<Compat<libp2p::Stream>, tokio_util::codec::LengthDelimitedCodec>;

fn transport(stream: libp2p::Stream) -> Transport {
    let mut codec = codec();
    codec.set_max_frame_length(MAX_PAIR_FRAME);
    Framed::new(stream.compat(), codec)
}

async fn send(t: &mut Transport, msg: &PairMessage) -> Result<(), PairError> {
    let body = postcard::to_allocvec(msg).map_err(|e| PairError::Protocol(e.to_string()))?;
    t.send(Bytes::from(body))
        .await
        .map_err(|e| PairError::Unreachable(e.to_string()))
}

async fn recv(t: &mut Transport, within: Duration) -> Result<PairMessage, PairError> {
    let frame = tokio::time::timeout(within, t.next())
        .await
        .map_err(|_| PairError::Unreachable("timed out waiting for the other device".into()))?
        .ok_or_else(|| PairError::Unreachable("the other device closed the connection".into()))?
        .map_err(|e| PairError::Protocol(e.to_string()))?;
    let msg: PairMessage =
        postcard::from_bytes(&frame).map_err(|e| PairError::Protocol(e.to_string()))?;
    if let PairMessage::Failed { code, message } = msg {
        return Err(PairError::from_failure(code, message));
    }
    Ok(msg)
}

async fn fail(t: &mut Transport, error: &PairError) {
    let _ = send(
        t,
        &PairMessage::Failed {
            code: error.failure(),
            message: error.to_string(),
        },
    )
    .await;
    let _ = SinkExt::<Bytes>::close(t).await;
}

/// The secrets both sides derive from the SPAKE2 key.
struct Keys {
    joiner_proof: Vec<u8>,
    host_proof: Vec<u8>,
    verification: String,
}

fn identity(a: PeerId, b: PeerId) -> Identity {
    let (lo, hi) = if a.to_bytes() <= b.to_bytes() {
        (a, b)
    } else {
        (b, a)
    };
    let mut id = b"devicelink/pair/1.4.0|".to_vec();
    id.extend_from_slice(&lo.to_bytes());
    id.push(b'|');
    id.extend_from_slice(&hi.to_bytes());
    Identity::new(&id)
}

fn derive(key: &[u8]) -> Keys {
    let hk = Hkdf::<Sha256>::new(None, key);
    let expand = |info: &[u8], len: usize| {
        let mut out = vec![0u8; len];
        // 32 or 4 bytes is always within HKDF-SHA256's output limit.
        let _ = hk.expand(info, &mut out);
        out
    };
    let digits = expand(b"devicelink pair verification", 4);
    let n = u32::from_be_bytes([digits[0], digits[1], digits[2], digits[3]]) % 1_000_000;
    Keys {
        joiner_proof: expand(b"devicelink pair confirm joiner", 32),
        host_proof: expand(b"devicelink pair confirm host", 32),
        verification: format!("{:03} {:03}", n / 1000, n % 1000),
    }
}

/// Who this device is, for the `Welcome` message.
#[derive(Debug, Clone)]
pub struct LocalDevice {
    pub id: PeerId,
    pub name: String,
    pub listen_addrs: Vec<String>,
}

/// Host side of one attempt on an inbound pair stream from `peer`. Returns the paired device;
/// the caller stores it. Reports the outcome to the host's subscribers.
pub async fn host(
    state: &PairingHost,
    me: &LocalDevice,
    peer: PeerId,
    stream: libp2p::Stream,
    save: impl FnOnce(&Paired) -> Result<(), String>,
) -> Result<Paired, PairError> {
    let mut t = transport(stream);
    let (slot, their_spake) = match recv(&mut t, STEP_TIMEOUT).await {
        Ok(PairMessage::Start {
            version,
            slot,
            spake,
        }) => {
            if let Err(refusal) = version.check_compatible() {
                let e = PairError::Version(refusal.message);
                fail(&mut t, &e).await;
                return Err(e);
            }
            (slot, spake)
        }
        Ok(other) => {
            let e = PairError::Protocol(format!("expected Start, got {other:?}"));
            fail(&mut t, &e).await;
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    let code = match state.begin(slot) {
        Ok(code) => code,
        Err(e) => {
            fail(&mut t, &e).await;
            return Err(e);
        }
    };
    let outcome = host_exchange(&mut t, me, peer, &code, their_spake, save).await;
    if let Err(e) = &outcome {
        fail(&mut t, e).await;
    }
    state.finish(peer, &code, &outcome);
    outcome
}

async fn host_exchange(
    t: &mut Transport,
    me: &LocalDevice,
    peer: PeerId,
    code: &PairingCode,
    their_spake: Vec<u8>,
    save: impl FnOnce(&Paired) -> Result<(), String>,
) -> Result<Paired, PairError> {
    let (spake, ours) = Spake2::<Ed25519Group>::start_symmetric(
        &Password::new(code.to_string()),
        &identity(me.id, peer),
    );
    send(t, &PairMessage::Spake { spake: ours }).await?;
    // A malformed SPAKE2 message from the joiner is as good as a wrong code.
    let key = spake
        .finish(&their_spake)
        .map_err(|_| PairError::WrongCode)?;
    let keys = derive(&key);
    match recv(t, HOST_STEP_TIMEOUT).await? {
        PairMessage::Confirm { proof } if proof == keys.joiner_proof => {}
        PairMessage::Confirm { .. } => return Err(PairError::WrongCode),
        other => {
            return Err(PairError::Protocol(format!(
                "expected Confirm, got {other:?}"
            )))
        }
    }
    send(
        t,
        &PairMessage::Confirm {
            proof: keys.host_proof,
        },
    )
    .await?;
    welcome_and_save(t, me, peer, keys.verification, save).await
}

/// Joiner side: runs the exchange on a stream opened to the host `peer`.
pub async fn join(
    me: &LocalDevice,
    peer: PeerId,
    stream: libp2p::Stream,
    code: &PairingCode,
    save: impl FnOnce(&Paired) -> Result<(), String>,
) -> Result<Paired, PairError> {
    let mut t = transport(stream);
    let (spake, ours) = Spake2::<Ed25519Group>::start_symmetric(
        &Password::new(code.to_string()),
        &identity(me.id, peer),
    );
    send(
        &mut t,
        &PairMessage::Start {
            version: PROTOCOL_VERSION,
            slot: code.slot,
            spake: ours,
        },
    )
    .await?;
    let theirs = match recv(&mut t, STEP_TIMEOUT).await? {
        PairMessage::Spake { spake } => spake,
        other => {
            return Err(PairError::Protocol(format!(
                "expected Spake, got {other:?}"
            )))
        }
    };
    let key = spake
        .finish(&theirs)
        .map_err(|_| PairError::HostNotProven)?;
    let keys = derive(&key);
    send(
        &mut t,
        &PairMessage::Confirm {
            proof: keys.joiner_proof,
        },
    )
    .await?;
    match recv(&mut t, STEP_TIMEOUT).await? {
        PairMessage::Confirm { proof } if proof == keys.host_proof => {}
        PairMessage::Confirm { .. } => {
            let e = PairError::HostNotProven;
            fail(&mut t, &e).await;
            return Err(e);
        }
        other => {
            return Err(PairError::Protocol(format!(
                "expected Confirm, got {other:?}"
            )))
        }
    }
    welcome_and_save(&mut t, me, peer, keys.verification, save).await
}

async fn welcome_and_save(
    t: &mut Transport,
    me: &LocalDevice,
    peer: PeerId,
    verification: String,
    save: impl FnOnce(&Paired) -> Result<(), String>,
) -> Result<Paired, PairError> {
    send(
        t,
        &PairMessage::Welcome {
            name: me.name.clone(),
            listen_addrs: me.listen_addrs.clone(),
        },
    )
    .await?;
    let (name, listen_addrs) = match recv(t, STEP_TIMEOUT).await? {
        PairMessage::Welcome { name, listen_addrs } => (name, listen_addrs),
        other => {
            return Err(PairError::Protocol(format!(
                "expected Welcome, got {other:?}"
            )))
        }
    };
    let paired = Paired {
        device_id: peer.to_string(),
        name: name.chars().take(64).collect(),
        listen_addrs: listen_addrs.into_iter().take(16).collect(),
        verification,
    };
    save(&paired).map_err(PairError::Store)?;
    let _ = SinkExt::<Bytes>::close(t).await;
    Ok(paired)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_reject_garbage() {
        for _ in 0..100 {
            let code = PairingCode::generate();
            assert_eq!(code.to_string().parse::<PairingCode>().unwrap(), code);
            assert!((10..100).contains(&code.slot()));
        }
        assert_eq!(
            "42-815-067".parse::<PairingCode>().unwrap().to_string(),
            "42-815-067"
        );
        assert_eq!(
            "42 815 067".parse::<PairingCode>().unwrap().to_string(),
            "42-815-067"
        );
        for bad in ["", "42-815", "42-815-06x", "09-815-067", "4281506712", "🙂"] {
            assert!(bad.parse::<PairingCode>().is_err(), "{bad}");
        }
        let code: PairingCode = "42-815-067".parse().unwrap();
        assert_eq!(
            format!("{code:?}"),
            "PairingCode(42-***-***)",
            "Debug never shows the secret"
        );
    }

    #[test]
    fn both_sides_derive_the_same_secrets_only_with_the_same_code_and_ids() {
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        let run = |code_a: &str, code_b: &str, ids_b: (PeerId, PeerId)| {
            let (sa, ma) =
                Spake2::<Ed25519Group>::start_symmetric(&Password::new(code_a), &identity(a, b));
            let (sb, mb) = Spake2::<Ed25519Group>::start_symmetric(
                &Password::new(code_b),
                &identity(ids_b.0, ids_b.1),
            );
            let ka = derive(&sa.finish(&mb).unwrap());
            let kb = derive(&sb.finish(&ma).unwrap());
            ka.joiner_proof == kb.joiner_proof && ka.verification == kb.verification
        };
        assert!(
            run("42-815-067", "42-815-067", (b, a)),
            "same code, same ids (either order)"
        );
        assert!(!run("42-815-067", "42-815-068", (b, a)), "wrong code");
        assert!(
            !run("42-815-067", "42-815-067", (c, a)),
            "a device in the middle"
        );
    }

    #[test]
    fn attempts_are_limited_and_success_consumes_the_code() {
        let host = PairingHost::default();
        let code = host.open(DEFAULT_EXPIRY);
        let peer = PeerId::random();
        let mut events = host.subscribe();
        let failures = [
            PairError::WrongCode,
            PairError::Unreachable("timed out".into()),
            PairError::WrongCode,
        ];
        for (i, (failure, left)) in failures
            .into_iter()
            .zip((0..MAX_ATTEMPTS).rev())
            .enumerate()
        {
            if i > 0 {
                // Right after a failed attempt the host is busy for a while ...
                assert!(matches!(host.begin(code.slot()), Err(PairError::Busy)));
                // ... then takes the next one (time passes here by moving the mark).
                host.lock().as_mut().unwrap().next_attempt = Some(Instant::now());
            }
            host.begin(code.slot()).unwrap();
            host.finish(peer, &code, &Err(failure));
            assert_eq!(host.is_open(), left > 0);
            assert!(matches!(
                events.try_recv(),
                Ok(HostEvent::AttemptFailed { attempts_left, .. }) if attempts_left == left
            ));
        }
        assert!(matches!(events.try_recv(), Ok(HostEvent::Closed { .. })));
        assert!(
            matches!(host.begin(code.slot()), Err(PairError::TooManyAttempts)),
            "the joiner is told the code is burned"
        );
        let code = host.open(DEFAULT_EXPIRY);
        assert!(matches!(
            host.begin(code.slot() ^ 1),
            Err(PairError::NoOpenCode)
        ));
        host.begin(code.slot()).unwrap();
        assert!(matches!(host.begin(code.slot()), Err(PairError::Busy)));
        let paired = Paired {
            device_id: peer.to_string(),
            name: "x".into(),
            listen_addrs: vec![],
            verification: "000 000".into(),
        };
        host.finish(peer, &code, &Ok(paired));
        assert!(
            matches!(host.begin(code.slot()), Err(PairError::NoOpenCode)),
            "single use"
        );
        let code = host.open(Duration::ZERO);
        assert!(matches!(host.begin(code.slot()), Err(PairError::Expired)));
    }

    #[test]
    fn a_new_code_closes_the_open_one() {
        let host = PairingHost::default();
        let first = host.open(DEFAULT_EXPIRY);
        let mut events = host.subscribe();
        host.begin(first.slot()).unwrap();
        let second = host.open(DEFAULT_EXPIRY);
        assert!(
            matches!(events.try_recv(), Ok(HostEvent::Closed { reason }) if reason.contains("replaced"))
        );
        // The first attempt ending later does not touch the new code.
        host.finish(PeerId::random(), &first, &Err(PairError::WrongCode));
        assert!(events.try_recv().is_err());
        assert_eq!(host.open_slot(), Some(second.slot()));
    }
}
