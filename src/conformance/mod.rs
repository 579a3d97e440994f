//! Device Linking 1.4 conformance: whole sessions, as transcripts, replayed against an
//! implementation over a real libp2p connection.
//!
//! A [`Transcript`] (protocol/vectors/sessions/*.json) is what one side of a session sends, as
//! exact frames in hex, and what it must get back, as matchers: message kind, document, codes,
//! and for Yjs payloads the content they must carry. `devicelink conformance ADDR --peer-id ID`
//! replays every transcript against ADDR and prints a pass/fail table; tests/transcripts.rs
//! replays them against the agent itself.
//!
//! Both stream roles are covered with two identities ([`Identities`]): "low" sorts below almost
//! every device id (so the target waits for it to open the sync stream, §3) and "high" above
//! (so the target opens the stream to it). The target must trust both; a third, fresh identity
//! plays the stranger.

mod peer;

use std::path::Path;

use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::sync::Message;
use peer::{RawPeer, Read, Stream, STEP_TIMEOUT};

/// One side of a session: what it does and what it must receive, in order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Transcript {
    pub name: String,
    pub description: String,
    /// Which identity plays this side.
    pub identity: Identity,
    /// An optional feature (§6.4) the transcript exercises: against a target whose `Hello` does
    /// not announce it, the transcript is skipped (and passes), since the feature is optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature: Option<String>,
    pub steps: Vec<Step>,
}

/// The identity a transcript's side uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Identity {
    /// Trusted by the target; sorts below it, so this side opens the sync stream.
    TrustedLow,
    /// Trusted by the target; sorts above it, so the target opens the sync stream.
    TrustedHigh,
    /// A fresh identity the target has never seen.
    Stranger,
}

/// One step of a transcript.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Open a sync stream to the target (as the opener). With `may_fail`, a target that refuses
    /// the stream or the connection passes the rest of the transcript.
    Open {
        #[serde(default)]
        may_fail: bool,
    },
    /// Wait for the target to open a sync stream (as the acceptor).
    Accept,
    /// Write these bytes: a whole frame (length prefix and body), or deliberate garbage.
    Send { hex: String, note: String },
    /// Read until a message matching this arrives (other messages in between are allowed,
    /// except a `Refuse`).
    Expect(Expect),
    /// Half-close this side of the stream and drop it.
    Close,
}

/// What must arrive.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Expect {
    /// A message kind (`Hello`, `Refuse`, `SyncStep1`, `SyncStep2`, `Update`, `DocError`), or
    /// `End` (the stream ends), or `RefusalOrEnd` (a `Refuse` with `code`, or the end, and no
    /// document data before it).
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub doc: Option<String>,
    /// `RefuseCode` or `DocErrorCode` name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// For `SyncStep2`/`Update`: applied to an empty document, the update's JSON view must
    /// contain this (objects by subset, other values equal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contains: Option<Value>,
}

/// The transcripts of protocol/vectors/sessions/, built in.
pub fn builtin() -> Vec<Transcript> {
    [
        include_str!("../../protocol/vectors/sessions/opener_sync.json"),
        include_str!("../../protocol/vectors/sessions/acceptor_sync.json"),
        include_str!("../../protocol/vectors/sessions/reconnect.json"),
        include_str!("../../protocol/vectors/sessions/version_1_5_accepted.json"),
        include_str!("../../protocol/vectors/sessions/refuse_version_1_3.json"),
        include_str!("../../protocol/vectors/sessions/refuse_version_2_0.json"),
        include_str!("../../protocol/vectors/sessions/refuse_not_trusted.json"),
        include_str!("../../protocol/vectors/sessions/malformed_frame.json"),
        include_str!("../../protocol/vectors/sessions/frame_too_large.json"),
        include_str!("../../protocol/vectors/sessions/second_hello.json"),
        include_str!("../../protocol/vectors/sessions/feature_feed.json"),
        include_str!("../../protocol/vectors/sessions/feature_parts.json"),
        include_str!("../../protocol/vectors/sessions/part_invalid_doc_name.json"),
        include_str!("../../protocol/vectors/sessions/feed_page_after_last.json"),
        include_str!("../../protocol/vectors/sessions/feed_page_other_head.json"),
        include_str!("../../protocol/vectors/sessions/feed_page_epoch_0.json"),
        include_str!("../../protocol/vectors/sessions/feature_not_in_use.json"),
    ]
    .iter()
    .filter_map(|text| match serde_json::from_str(text) {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::error!("a built-in transcript does not parse: {e}");
            None
        }
    })
    .collect()
}

/// The two trusted identities of a conformance runner.
pub struct Identities {
    pub low: Keypair,
    pub high: Keypair,
}

/// Errors setting up a run.
#[derive(Debug, thiserror::Error)]
pub enum ConformanceError {
    #[error("cannot read or write the runner's identity in {path}: {reason}")]
    Identity { path: String, reason: String },
}

impl Identities {
    /// Loads the runner's identities from `dir`, making them on first use.
    pub fn load_or_create(dir: &Path) -> Result<Self, ConformanceError> {
        Ok(Self {
            low: keypair_in(dir, "conformance-low.key", 0x00)?,
            high: keypair_in(dir, "conformance-high.key", 0xff)?,
        })
    }

    pub fn low_id(&self) -> PeerId {
        self.low.public().to_peer_id()
    }

    pub fn high_id(&self) -> PeerId {
        self.high.public().to_peer_id()
    }
}

/// A key whose public key starts with two `byte`s, so its id sorts at an end (ids compare by
/// their multihash, i.e. by the public key).
fn keypair_in(dir: &Path, file: &str, byte: u8) -> Result<Keypair, ConformanceError> {
    let path = dir.join(file);
    let error = |reason: String| ConformanceError::Identity {
        path: path.display().to_string(),
        reason,
    };
    if let Ok(bytes) = std::fs::read(&path) {
        return Keypair::from_protobuf_encoding(&bytes).map_err(|e| error(e.to_string()));
    }
    let keypair = loop {
        let candidate = libp2p::identity::ed25519::Keypair::generate();
        let public = candidate.public().to_bytes();
        if public[0] == byte && public[1] == byte {
            break Keypair::from(candidate);
        }
    };
    let bytes = keypair
        .to_protobuf_encoding()
        .map_err(|e| error(e.to_string()))?;
    crate::identity::create_private_dir(dir).map_err(|e| error(e.to_string()))?;
    let temp = dir.join(format!("{file}.tmp"));
    std::fs::write(&temp, bytes).map_err(|e| error(e.to_string()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| error(e.to_string()))?;
    }
    std::fs::rename(&temp, &path).map_err(|e| error(e.to_string()))?;
    Ok(keypair)
}

/// The outcome of one transcript.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

/// Every transcript's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub outcomes: Vec<Outcome>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.outcomes.iter().all(|o| o.passed)
    }

    /// A plain-text table: one row per transcript.
    pub fn table(&self) -> String {
        let width = self
            .outcomes
            .iter()
            .map(|o| o.name.len())
            .max()
            .unwrap_or(4);
        let mut out = String::new();
        for o in &self.outcomes {
            let mark = if o.passed { "pass" } else { "FAIL" };
            out.push_str(&format!("{mark}  {:<width$}  {}\n", o.name, o.detail));
        }
        let failed = self.outcomes.iter().filter(|o| !o.passed).count();
        out.push_str(&format!(
            "{} of {} passed{}\n",
            self.outcomes.len() - failed,
            self.outcomes.len(),
            if failed > 0 { "" } else { ": conforms" }
        ));
        out
    }
}

/// Replays `transcripts` against the device `target` at `addr`.
pub async fn run(
    transcripts: &[Transcript],
    ids: &Identities,
    target: PeerId,
    addr: &Multiaddr,
) -> Report {
    let mut outcomes = Vec::new();
    for t in transcripts {
        let result = replay(t, ids, target, addr.clone()).await;
        outcomes.push(Outcome {
            name: t.name.clone(),
            passed: result.is_ok(),
            detail: match result {
                Ok(note) => note,
                Err(e) => e,
            },
        });
    }
    Report { outcomes }
}

/// Replays one transcript; `Ok` carries a short note, `Err` what went wrong and at which step.
pub async fn replay(
    t: &Transcript,
    ids: &Identities,
    target: PeerId,
    addr: Multiaddr,
) -> Result<String, String> {
    let keypair = match t.identity {
        Identity::TrustedLow => {
            if ids.low_id() >= target {
                return Err("the runner's low id does not sort below the target's".into());
            }
            ids.low.clone()
        }
        Identity::TrustedHigh => {
            if ids.high_id() <= target {
                return Err("the runner's high id does not sort above the target's".into());
            }
            ids.high.clone()
        }
        Identity::Stranger => Keypair::generate_ed25519(),
    };
    let may_fail = t
        .steps
        .iter()
        .any(|s| matches!(s, Step::Open { may_fail: true }));
    let mut peer = match RawPeer::connect(keypair, target, addr).await {
        Ok(peer) => peer,
        Err(_) if may_fail => return Ok("the connection was refused".into()),
        Err(e) => return Err(e),
    };
    let mut stream: Option<Stream> = None;
    for (i, step) in t.steps.iter().enumerate() {
        let at = |e: String| format!("step {}: {e}", i + 1);
        match step {
            Step::Open { may_fail } => match peer.open().await {
                Ok(s) => stream = Some(s),
                Err(_) if *may_fail => return Ok("the stream was refused".into()),
                Err(e) => return Err(at(e)),
            },
            Step::Accept => stream = Some(peer.accept().await.map_err(at)?),
            Step::Send { hex, note } => {
                let bytes = decode_hex(hex).map_err(at)?;
                let s = stream.as_mut().ok_or_else(|| at("no stream open".into()))?;
                if let Err(e) = s.write_raw(&bytes).await {
                    if may_fail {
                        return Ok("the stream was closed before data".into());
                    }
                    return Err(at(format!("sending {note}: {e}")));
                }
            }
            Step::Expect(expect) => {
                let s = stream.as_mut().ok_or_else(|| at("no stream open".into()))?;
                let got = await_match(s, expect).await.map_err(at)?;
                if let (Some(feature), Some(Message::Hello(hello))) = (&t.feature, &got) {
                    if !hello.announces(feature) {
                        return Ok(format!(
                            "skipped: the target does not announce feature `{feature}` (optional)"
                        ));
                    }
                }
            }
            Step::Close => {
                if let Some(mut s) = stream.take() {
                    s.close().await;
                }
            }
        }
    }
    Ok(format!("{} steps", t.steps.len()))
}

/// Reads until `expect` is met; returns the message that met it (none for an end).
async fn await_match(stream: &mut Stream, expect: &Expect) -> Result<Option<Message>, String> {
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let frame = match stream.read(left).await {
            Read::Frame(frame) => frame,
            Read::End if expect.kind == "End" || expect.kind == "RefusalOrEnd" => return Ok(None),
            Read::End => {
                return Err(format!(
                    "the stream ended waiting for {}; got {seen:?}",
                    describe(expect)
                ))
            }
            Read::Timeout => {
                return Err(format!(
                    "no {} within {STEP_TIMEOUT:?}; got {seen:?}",
                    describe(expect)
                ))
            }
        };
        let msg =
            Message::decode(&frame).map_err(|e| format!("the target sent a bad frame: {e}"))?;
        let kind = msg.kind();
        match (expect.kind.as_str(), &msg) {
            ("RefusalOrEnd", Message::Refuse(r)) => {
                return match &expect.code {
                    Some(code) if format!("{:?}", r.code) != *code => {
                        Err(format!("refused with {:?}, not {code}", r.code))
                    }
                    _ => Ok(None),
                }
            }
            ("RefusalOrEnd", m) if m.doc().is_some() => {
                return Err(format!("document data before the refusal: {kind}"))
            }
            (_, Message::Refuse(r)) if expect.kind != "Refuse" && expect.kind != "End" => {
                return Err(format!(
                    "refused ({:?}: {}) while waiting for {}",
                    r.code,
                    r.message,
                    describe(expect)
                ))
            }
            _ => {}
        }
        if kind == expect.kind && matches(expect, &msg)? {
            return Ok(Some(msg));
        }
        seen.push(match msg.doc() {
            Some(doc) => format!("{kind}({doc})"),
            None => kind.to_string(),
        });
        if seen.len() > 64 {
            seen.remove(0);
        }
    }
}

fn matches(expect: &Expect, msg: &Message) -> Result<bool, String> {
    if let Some(doc) = &expect.doc {
        if msg.doc() != Some(doc.as_str()) {
            return Ok(false);
        }
    }
    match msg {
        Message::Hello(h) if h.version.major != 1 || h.version.minor < 4 => {
            return Err(format!("the target announced version {}", h.version));
        }
        Message::Refuse(r) => {
            if let Some(code) = &expect.code {
                if format!("{:?}", r.code) != *code {
                    return Err(format!(
                        "refused with {:?} ({}), not {code}",
                        r.code, r.message
                    ));
                }
            }
        }
        Message::DocError { code, message, .. } => {
            if let Some(want) = &expect.code {
                if format!("{code:?}") != *want {
                    return Err(format!("DocError {code:?} ({message}), not {want}"));
                }
            }
        }
        Message::SyncStep2 { update, .. } | Message::Update { update, .. } => {
            if let Some(want) = &expect.contains {
                let have = content_of(update)?;
                if !contains(&have, want) {
                    return Err(format!("the update holds {have}, which lacks {want}"));
                }
            }
        }
        _ => {}
    }
    Ok(true)
}

/// The JSON view of `update` applied to an empty document.
fn content_of(update: &[u8]) -> Result<Value, String> {
    use yrs::updates::decoder::Decode;
    use yrs::Transact;
    let doc = yrs::Doc::new();
    let update = yrs::Update::decode_v1(update).map_err(|e| format!("not a Yjs update: {e}"))?;
    doc.transact_mut()
        .apply_update(update)
        .map_err(|e| format!("the update does not apply: {e}"))?;
    Ok(crate::docs::doc_to_json(&doc))
}

/// `want` is in `have`: objects by subset (recursively), anything else equal.
fn contains(have: &Value, want: &Value) -> bool {
    match (have, want) {
        (Value::Object(h), Value::Object(w)) => w
            .iter()
            .all(|(k, v)| h.get(k).is_some_and(|hv| contains(hv, v))),
        _ => have == want,
    }
}

fn describe(expect: &Expect) -> String {
    let mut s = expect.kind.clone();
    if let Some(doc) = &expect.doc {
        s.push_str(&format!("({doc:?})"));
    }
    if let Some(code) = &expect.code {
        s.push_str(&format!(" {code}"));
    }
    s
}

fn decode_hex(hex: &str) -> Result<Vec<u8>, String> {
    let hex: String = hex.split_whitespace().collect();
    if hex.len() % 2 != 0 {
        return Err("odd number of hex digits".into());
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).map_err(|e| e.to_string()))
        .collect()
}

/// Lower-case hex of `bytes` (what transcripts store).
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
