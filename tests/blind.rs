//! The blind always-on device (`agent --serve-relay --blind`), end to end with agent processes:
//! it carries documents between devices that are never online together, holds no byte of their
//! names or content, and stops carrying them to a device removed from the group.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::process::{stderr, stdout, AgentProcess, OpenCode};

const WAIT: Duration = Duration::from_secs(30);

fn start_blind(dir: &Path) -> AgentProcess {
    AgentProcess::start_with(dir, &[], &["--no-mdns", "--serve-relay", "--blind"])
}

/// `joiner` joins the code `host` opens, dialing the host's address.
fn pair(host: &AgentProcess, joiner: &AgentProcess) -> String {
    let code = OpenCode::open(host, 120);
    let out = joiner.cli(&["pair", &code.code, "--peer", &host.addr]);
    assert!(out.status.success(), "pairing failed: {}", stderr(&out));
    stdout(&out)
}

fn status(agent: &AgentProcess) -> serde_json::Value {
    serde_json::from_str(&stdout(&agent.cli(&["status", "--json"]))).unwrap_or_default()
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The document as JSON text on `agent` ("" if it cannot be read).
fn doc(agent: &AgentProcess, name: &str) -> String {
    stdout(&agent.cli(&["doc", "get", name]))
}

/// Whether `member` has a blind session with `blind` and everything it wrote is uploaded.
fn backed_up(member: &AgentProcess, blind: &AgentProcess) -> bool {
    status(member)["blind"]["backups"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|b| b["device"] == blind.device_id.as_str() && b["behind"] == 0)
}

/// Every file under `dir` that contains `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        if path.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap().flatten() {
                stack.push(entry.path());
            }
        } else if let Ok(bytes) = std::fs::read(&path) {
            if bytes.windows(needle.len()).any(|w| w == needle) {
                found.push(path.display().to_string());
            }
        }
    }
    found
}

#[test]
fn a_blind_device_carries_documents_it_cannot_read() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let blind = start_blind(dirs[0].path());
    let laptop = AgentProcess::start(dirs[1].path(), &[]);
    let laptop_id = laptop.device_id.clone();
    let mut phone = AgentProcess::start(dirs[2].path(), &[]);
    let said = pair(&blind, &laptop);
    assert!(said.contains("blind device"), "{said}");
    pair(&laptop, &phone);
    // The phone learns the blind device from the group and keeps a session with it.
    wait_for("the phone to use the blind device", || {
        backed_up(&phone, &blind)
    });
    phone.stop();

    // The laptop writes while the phone is off, then stops too.
    let (name, secret, title) = (
        "plans-4f2a9e",
        "MARKER-plaintext-9c3e71d",
        "Quarterly-Zebra-Report",
    );
    let out = laptop.cli(&["doc", "text", name, "body", "--append", secret]);
    assert!(out.status.success(), "{}", stderr(&out));
    let value = format!("\"{title}\"");
    let out = laptop.cli(&["doc", "set", name, "meta", "title", &value]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for("the laptop to upload its changes", || {
        backed_up(&laptop, &blind)
            && status(&blind)["blind"]["held"][laptop.device_id.as_str()]["envelopes"]
                .as_u64()
                .is_some_and(|n| n >= 1)
    });
    laptop.stop();

    // The phone starts later and gets the document from the blind device alone.
    phone = AgentProcess::start(dirs[2].path(), &[]);
    wait_for("the phone to get the document", || {
        let text = doc(&phone, name);
        text.contains(secret) && text.contains(title)
    });

    // No byte of the document's name or content anywhere in the blind device's data dir.
    for needle in [name, secret, title, "Zebra", "body"] {
        let found = files_containing(dirs[0].path(), needle.as_bytes());
        assert!(found.is_empty(), "{needle:?} found in {found:?}");
    }
    // Nor through its own CLI: it has no such document, and says what it holds instead.
    let list = stdout(&blind.cli(&["doc", "list"]));
    assert!(!list.contains(name), "{list}");
    let got = doc(&blind, name);
    assert!(!got.contains(secret), "{got}");
    let summary = stdout(&blind.cli(&["status"]));
    assert!(summary.contains("blind store: 1 documents"), "{summary}");
    assert!(summary.contains(&laptop_id), "{summary}");
    let doctor = stdout(&blind.cli(&["doctor"]));
    assert!(doctor.contains("blind store: 1 documents"), "{doctor}");
    assert!(!doctor.contains(name), "{doctor}");
    let summary = stdout(&phone.cli(&["status"]));
    assert!(
        summary.contains(&format!("backed up on blind device {}", blind.device_id)),
        "{summary}"
    );
}

#[test]
fn removing_a_device_cuts_it_off_and_a_member_offline_gets_the_new_key() {
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let blind = start_blind(dirs[0].path());
    let laptop = AgentProcess::start(dirs[1].path(), &[]);
    let phone = AgentProcess::start(dirs[2].path(), &[]);
    let mut tablet = AgentProcess::start(dirs[3].path(), &[]);
    pair(&blind, &laptop);
    pair(&laptop, &phone);
    pair(&laptop, &tablet);
    wait_for("phone and tablet to use the blind device", || {
        backed_up(&phone, &blind) && backed_up(&tablet, &blind)
    });
    let out = laptop.cli(&["doc", "text", "before", "body", "--append", "shared-before"]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for("the phone to get what was written before", || {
        doc(&phone, "before").contains("shared-before")
    });

    // The tablet is off while the laptop removes the phone (a new key epoch) and writes.
    tablet.stop();
    let out = laptop.cli(&["unpair", &phone.device_id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let secret = "written-after-removal-5e8b";
    let out = laptop.cli(&["doc", "text", "after", "body", "--append", secret]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for("the laptop to upload its changes", || {
        backed_up(&laptop, &blind)
    });
    laptop.stop();

    // The tablet comes back with only the blind device online: it gets the new key sealed to
    // it there, and what was written with it.
    tablet = AgentProcess::start(dirs[3].path(), &[]);
    wait_for("the tablet to get what was written after", || {
        doc(&tablet, "after").contains(secret)
    });
    // The removed phone, online all along, never gets it: the blind device no longer serves
    // it (and it lacks the new key).
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert!(
            !doc(&phone, "after").contains(secret),
            "the removed phone got it"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        doc(&phone, "before").contains("shared-before"),
        "it keeps what it had"
    );
    let peers = status(&blind)["peers"].clone();
    let phone_trusted = peers
        .as_array()
        .into_iter()
        .flatten()
        .any(|p| p["device_id"] == phone.device_id.as_str() && p["trusted"] == true);
    assert!(
        !phone_trusted,
        "the blind device still serves the phone: {peers}"
    );
}

/// 20,000 small updates through IPC, uploaded live: the blind device ends up holding one
/// snapshot and fewer update bytes than it, so its storage stays under twice the snapshot.
#[test]
fn many_small_updates_compact_to_under_twice_the_snapshot() {
    use futures::StreamExt as _;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let blind = start_blind(dirs[0].path());
    let laptop = AgentProcess::start(dirs[1].path(), &[]);
    let phone = AgentProcess::start(dirs[2].path(), &[]);
    pair(&blind, &laptop);
    pair(&laptop, &phone);
    wait_for("the phone to use the blind device", || {
        backed_up(&phone, &blind)
    });
    phone.stop();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = laptop.client().await;
        let appended: Vec<_> = futures::stream::iter(0..20_000)
            .map(|i| {
                let client = &client;
                async move {
                    client
                        .doc_text_append("log", "body", &format!("{} ", i % 10))
                        .await
                }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        assert!(appended.iter().all(Result::is_ok));
    });
    wait_for("the laptop to upload its changes", || {
        backed_up(&laptop, &blind)
    });
    let held = || status(&blind)["blind"]["held"][laptop.device_id.as_str()].clone();
    wait_for("storage under twice the snapshot", || {
        let held = held();
        let (bytes, snapshot) = (held["bytes"].as_u64(), held["snapshot_bytes"].as_u64());
        held["snapshots"] == 1 && bytes.zip(snapshot).is_some_and(|(b, s)| b <= 2 * s)
    });
    let held = held();
    println!(
        "20,000 updates: the blind device holds {} bytes ({} in the snapshot, {} updates after it)",
        held["bytes"], held["snapshot_bytes"], held["envelopes"]
    );
    // The snapshot and the updates after it are the whole document: the phone, started after
    // the laptop stopped, gets it from them.
    laptop.stop();
    let phone = AgentProcess::start(dirs[2].path(), &[]);
    wait_for("the phone to get the document", || {
        let text: serde_json::Value = serde_json::from_str(&doc(&phone, "log")).unwrap_or_default();
        text["body"].as_str().is_some_and(|t| t.len() == 40_000)
    });
}

/// A member's uploads, checked by the blind device itself: a replayed, a reordered and a forged
/// envelope are refused with what was expected; a device that is not a member gets no session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_blind_device_refuses_forged_replayed_and_reordered_envelopes() {
    use devicelink::blind::envelope::{doc_id, random_key, Content, Envelope, Epoch, Kind};
    use devicelink::blind::protocol::{Reply, Request, BLIND_PROTOCOL, MAX_BLIND_FRAME};
    use devicelink::blind::store::Refusal;
    use futures::{SinkExt as _, StreamExt as _};
    use libp2p::identity::Keypair;
    use tokio_util::compat::FuturesAsyncReadCompatExt as _;

    let dir = tempfile::tempdir().unwrap();
    let mut config = devicelink::AgentConfig::new(dir.path());
    config.serve_relay = true;
    config.blind = true;
    let blind = devicelink::Agent::start(config).await.unwrap();
    let member = Keypair::generate_ed25519();
    let member_id = member.public().to_peer_id();
    blind.devices().trust_add(member_id, "laptop").unwrap();

    async fn session(
        peer: &mut common::raw_peer::RawPeer,
        blind: devicelink::PeerId,
    ) -> common::raw_peer::Transport {
        let stream = peer
            .control
            .open_stream(blind, BLIND_PROTOCOL)
            .await
            .unwrap();
        let codec = tokio_util::codec::LengthDelimitedCodec::builder()
            .max_frame_length(MAX_BLIND_FRAME)
            .new_codec();
        tokio_util::codec::Framed::new(stream.compat(), codec)
    }
    async fn send(t: &mut common::raw_peer::Transport, request: &Request) -> std::io::Result<()> {
        let bytes = postcard::to_allocvec(request).unwrap();
        t.send(bytes::Bytes::from(bytes)).await
    }
    async fn receive(t: &mut common::raw_peer::Transport) -> Option<Reply> {
        let frame = tokio::time::timeout(WAIT, t.next()).await.ok()??.ok()?;
        postcard::from_bytes(&frame).ok()
    }
    let hello = Request::Hello {
        version: devicelink::sync::message::PROTOCOL_VERSION,
    };

    let mut peer = common::raw_peer::raw_peer_with(member.clone(), &blind).await;
    let mut t = session(&mut peer, blind.device_id()).await;
    send(&mut t, &hello).await.unwrap();
    assert!(matches!(receive(&mut t).await, Some(Reply::Hello { .. })));
    let (key, name_key) = (random_key(), random_key());
    let sealed = |author: &Keypair, seq: u64| {
        let content = Content {
            name: "notes".into(),
            update: vec![0, 0],
        };
        let doc = doc_id(&name_key, "notes");
        let epoch = Epoch::of(1, &key);
        Envelope::seal(
            author,
            Kind::Update,
            doc,
            seq,
            epoch,
            &key,
            vec![],
            &content,
        )
        .unwrap()
    };
    async fn put(t: &mut common::raw_peer::Transport, envelope: Envelope) -> Result<(), Refusal> {
        send(t, &Request::Put(envelope)).await.unwrap();
        match receive(t).await {
            Some(Reply::Stored { .. }) => Ok(()),
            Some(Reply::Refused { refusal, .. }) => Err(refusal),
            other => panic!("unexpected answer {other:?}"),
        }
    }
    let first = sealed(&member, 1);
    assert_eq!(put(&mut t, first.clone()).await, Ok(()));
    assert_eq!(
        put(&mut t, first).await,
        Err(Refusal::Replayed {
            got: 1,
            expected: 2
        })
    );
    assert_eq!(
        put(&mut t, sealed(&member, 3)).await,
        Err(Refusal::OutOfOrder {
            got: 3,
            expected: 2
        })
    );
    let mut forged = sealed(&Keypair::generate_ed25519(), 2);
    forged.author = member_id.to_bytes();
    assert!(matches!(put(&mut t, forged).await, Err(Refusal::Forged(_))));
    let mut altered = sealed(&member, 2);
    altered.ciphertext[0] ^= 1;
    assert!(matches!(
        put(&mut t, altered).await,
        Err(Refusal::Forged(_))
    ));
    assert_eq!(put(&mut t, sealed(&member, 2)).await, Ok(()));
    let held = blind.status().unwrap().blind.held;
    assert_eq!(held[&member_id.to_string()].envelopes, 2);

    // A device that is not a member: the stream is dropped without an answer.
    let mut stranger = common::raw_peer::raw_peer_connected_to(&blind).await;
    if let Ok(Ok(stream)) = tokio::time::timeout(
        Duration::from_secs(5),
        stranger
            .control
            .open_stream(blind.device_id(), BLIND_PROTOCOL),
    )
    .await
    {
        let codec = tokio_util::codec::LengthDelimitedCodec::new();
        let mut t = tokio_util::codec::Framed::new(stream.compat(), codec);
        // The connection may already be gone (strangers are dropped): then nothing is answered.
        if send(&mut t, &hello).await.is_ok() {
            assert!(receive(&mut t).await.is_none(), "a stranger got an answer");
        }
    }
    blind.shutdown().await.unwrap();
}

/// The default path: the laptop and the phone run `devicelink agent` with no flag on a
/// namespace LAN (mDNS, default listeners); only the blind device has its two flags. The laptop
/// joins the blind device's code by address, the phone joins the laptop's code alone (found over
/// mDNS), and the phone, started again after the laptop stopped, gets the laptop's edit from the
/// blind device.
#[test]
fn devices_started_as_users_start_them_use_a_blind_device() {
    let lan = match common::netns::Lan::create() {
        Ok(lan) => lan,
        Err(why) => return eprintln!("skipped: {why}"),
    };
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let blind = AgentProcess::start_in(&lan.ns(0), dirs[0].path(), &["--serve-relay", "--blind"]);
    let laptop = AgentProcess::start_as_user_in(&lan.ns(0), dirs[1].path());
    let phone = AgentProcess::start_as_user_in(&lan.ns(1), dirs[2].path());
    pair(&blind, &laptop);
    let code = OpenCode::open(&laptop, 120);
    let out = phone.cli(&["pair", &code.code]);
    assert!(
        out.status.success(),
        "pairing by code alone: {}",
        stderr(&out)
    );
    wait_for("the phone to use the blind device", || {
        backed_up(&phone, &blind)
    });
    phone.stop();
    let out = laptop.cli(&[
        "doc",
        "text",
        "defaults",
        "body",
        "--append",
        "as-a-user-would",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for("the laptop to upload its change", || {
        backed_up(&laptop, &blind)
    });
    laptop.stop();
    let phone = AgentProcess::start_as_user_in(&lan.ns(1), dirs[2].path());
    wait_for("the phone to get the edit from the blind device", || {
        doc(&phone, "defaults").contains("as-a-user-would")
    });
}
