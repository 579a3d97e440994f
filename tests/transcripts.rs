//! Session transcripts (protocol/vectors/sessions/): written from this file, replayed against a
//! real agent over libp2p in both stream roles, and `devicelink conformance` run against an
//! agent process.
//!
//! Regenerate the files after an intentional change: `DEVICELINK_WRITE_VECTORS=1 cargo test
//! --release --test transcripts`.

mod common;

use std::path::PathBuf;

use common::process::{stderr, stdout, AgentProcess};
use common::*;
use devicelink::conformance::{self, Expect, Identities, Identity, Step, Transcript};
use devicelink::sync::message::to_frame;
use devicelink::sync::{Hello, Message, Version};
use serde_json::json;

fn sessions_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("protocol/vectors/sessions")
}

fn send(msg: &Message, note: &str) -> Step {
    Step::Send {
        hex: conformance::to_hex(&to_frame(msg).expect("encodes")),
        note: note.to_string(),
    }
}

fn raw(bytes: &[u8], note: &str) -> Step {
    Step::Send {
        hex: conformance::to_hex(bytes),
        note: note.to_string(),
    }
}

fn expect(kind: &str) -> Step {
    Step::Expect(Expect {
        kind: kind.into(),
        ..Default::default()
    })
}

fn expect_doc(kind: &str, doc: &str, contains: Option<serde_json::Value>) -> Step {
    Step::Expect(Expect {
        kind: kind.into(),
        doc: Some(doc.into()),
        contains,
        ..Default::default()
    })
}

fn expect_code(kind: &str, code: &str) -> Step {
    Step::Expect(Expect {
        kind: kind.into(),
        code: Some(code.into()),
        ..Default::default()
    })
}

fn hello(major: u16, minor: u16) -> Message {
    Message::Hello(Hello {
        version: Version { major, minor },
        device_name: "conformance".into(),
        listen_addrs: vec![],
    })
}

fn step1(doc: &str) -> Message {
    Message::SyncStep1 {
        doc: doc.into(),
        state_vector: vec![0], // the empty state vector: "send me everything"
    }
}

/// A Yjs update (v1) by client `client`: `map[key] = value`.
fn map_update(client: u64, map: &str, key: &str, value: &str) -> Vec<u8> {
    use yrs::{Map, Transact};
    let doc = yrs::Doc::with_client_id(client);
    let root = doc.get_or_insert_map(map);
    let mut txn = doc.transact_mut();
    root.insert(&mut txn, key, value);
    txn.encode_update_v1()
}

fn transcript(name: &str, description: &str, identity: Identity, steps: Vec<Step>) -> Transcript {
    Transcript {
        name: name.into(),
        description: description.into(),
        identity,
        feature: None,
        steps,
    }
}

/// A transcript of optional feature `feature`.
fn featured(feature: &str, mut t: Transcript) -> Transcript {
    t.feature = Some(feature.into());
    t
}

/// Hello 1.4 announcing every optional feature.
fn hello_with_features() -> Step {
    let msg = Message::Hello(Hello {
        version: Version { major: 1, minor: 4 },
        device_name: "conformance".into(),
        listen_addrs: vec!["devicelink-features:feed,parts,awareness".into()],
    });
    send(&msg, "Hello 1.4 announcing feed, parts and awareness")
}

/// Opens a stream announcing every feature and sends `update` of `doc` as two `Part`s
/// (`what` names it in the notes), then `then`.
fn in_two_parts(doc: &str, update: &[u8], what: &str, then: Vec<Step>) -> Vec<Step> {
    let half = update.len() / 2;
    let part = |data: &[u8]| Message::Part {
        doc: doc.into(),
        kind: 4,
        total: update.len() as u64,
        data: data.to_vec(),
    };
    let mut steps = vec![
        Step::Open { may_fail: false },
        hello_with_features(),
        expect("Hello"),
        send(&part(&update[..half]), &format!("Part 1 of 2 of {what}")),
        send(&part(&update[half..]), "Part 2 of 2"),
    ];
    steps.extend(then);
    steps
}

/// A feed-announcing peer answers the target's FeedRequest with `pages`, which break §9.5: the
/// target refuses the stream with `ProtocolViolation`.
fn feed_violation(name: &str, description: &str, pages: Vec<(Message, &str)>) -> Transcript {
    let mut steps = vec![
        Step::Open { may_fail: false },
        hello_with_features(),
        expect("Hello"),
        expect("FeedRequest"),
    ];
    steps.extend(pages.iter().map(|(page, note)| send(page, note)));
    steps.extend([expect_code("Refuse", "ProtocolViolation"), expect("End")]);
    transcript(name, description, Identity::TrustedLow, steps)
}

/// A peer announcing `major.minor` gets the target's Hello, then `UnsupportedVersion`.
fn refused_version(major: u16, minor: u16, description: &str) -> Transcript {
    transcript(
        &format!("refuse_version_{major}_{minor}"),
        description,
        Identity::TrustedLow,
        vec![
            Step::Open { may_fail: false },
            send(&hello(major, minor), &format!("Hello {major}.{minor}")),
            expect("Hello"),
            expect_code("Refuse", "UnsupportedVersion"),
            expect("End"),
        ],
    )
}

/// Every transcript, as the files should hold them.
fn transcripts() -> Vec<Transcript> {
    let notes = "conformance/notes";
    let fresh = "conformance/fresh";
    let h14 = || send(&hello(1, 4), "Hello 1.4");
    vec![
        transcript(
            "opener_sync",
            "This side opens the sync stream (its id sorts below the target's). Hello both ways; a live Update is applied (a SyncStep1 then gets it back in SyncStep2); a SyncStep1 for a document the target does not have creates it mid-session and the target asks for it with its own SyncStep1; the content sent then is served back; a bad document name and a bad update get a DocError and the stream goes on.",
            Identity::TrustedLow,
            vec![
                Step::Open { may_fail: false },
                h14(),
                expect("Hello"),
                send(
                    &Message::Update { doc: notes.into(), update: map_update(1, "m", "k", "from the runner") },
                    "Update conformance/notes: m.k = \"from the runner\" (client 1)",
                ),
                send(&step1(notes), "SyncStep1 conformance/notes, empty state vector"),
                expect_doc("SyncStep2", notes, Some(json!({"m": {"k": "from the runner"}}))),
                send(&step1(fresh), "SyncStep1 conformance/fresh (unknown to the target)"),
                expect_doc("SyncStep2", fresh, None),
                expect_doc("SyncStep1", fresh, None),
                send(
                    &Message::SyncStep2 { doc: fresh.into(), update: map_update(2, "m", "made", "mid-session") },
                    "SyncStep2 conformance/fresh: m.made = \"mid-session\" (client 2)",
                ),
                send(&step1(fresh), "SyncStep1 conformance/fresh, empty state vector"),
                expect_doc("SyncStep2", fresh, Some(json!({"m": {"made": "mid-session"}}))),
                send(&step1(""), "SyncStep1 with an empty document name"),
                Step::Expect(Expect { kind: "DocError".into(), doc: Some(String::new()), code: Some("InvalidDocName".into()), contains: None }),
                send(
                    &Message::Update { doc: notes.into(), update: vec![0xff, 0xff, 0xff] },
                    "Update conformance/notes with bytes that are not a Yjs update",
                ),
                Step::Expect(Expect { kind: "DocError".into(), doc: Some(notes.into()), code: Some("InvalidUpdate".into()), contains: None }),
                Step::Close,
            ],
        ),
        transcript(
            "acceptor_sync",
            "The target opens the sync stream (this side's id sorts above the target's) and sends Hello first; this side answers Hello, sends an Update and reads it back.",
            Identity::TrustedHigh,
            vec![
                Step::Accept,
                expect("Hello"),
                h14(),
                send(
                    &Message::Update { doc: "conformance/acceptor".into(), update: map_update(3, "m", "role", "acceptor") },
                    "Update conformance/acceptor: m.role = \"acceptor\" (client 3)",
                ),
                send(&step1("conformance/acceptor"), "SyncStep1 conformance/acceptor"),
                expect_doc("SyncStep2", "conformance/acceptor", Some(json!({"m": {"role": "acceptor"}}))),
                Step::Close,
            ],
        ),
        transcript(
            "reconnect",
            "A change sent on one stream is served on the next one: stream 1 sends an Update (and reads it back, so it was applied), closes; stream 2 replaces it and gets the change in SyncStep2.",
            Identity::TrustedLow,
            vec![
                Step::Open { may_fail: false },
                h14(),
                expect("Hello"),
                send(
                    &Message::Update { doc: "conformance/reconnect".into(), update: map_update(4, "m", "n", "before the reconnect") },
                    "Update conformance/reconnect (client 4)",
                ),
                send(&step1("conformance/reconnect"), "SyncStep1 conformance/reconnect"),
                expect_doc("SyncStep2", "conformance/reconnect", Some(json!({"m": {"n": "before the reconnect"}}))),
                Step::Close,
                Step::Open { may_fail: false },
                h14(),
                expect("Hello"),
                send(&step1("conformance/reconnect"), "SyncStep1 conformance/reconnect on the new stream"),
                expect_doc("SyncStep2", "conformance/reconnect", Some(json!({"m": {"n": "before the reconnect"}}))),
                Step::Close,
            ],
        ),
        transcript(
            "version_1_5_accepted",
            "A peer announcing 1.5 (a higher minor) is accepted and synced with the 1.4 messages.",
            Identity::TrustedLow,
            vec![
                Step::Open { may_fail: false },
                send(&hello(1, 5), "Hello 1.5"),
                expect("Hello"),
                send(&step1("conformance/v15"), "SyncStep1 conformance/v15"),
                expect_doc("SyncStep2", "conformance/v15", None),
                Step::Close,
            ],
        ),
        refused_version(
            1,
            3,
            "A peer announcing 1.3 gets the target's Hello, then Refuse UnsupportedVersion, then the end of the stream.",
        ),
        refused_version(
            2,
            0,
            "A peer announcing 2.0 (another major) is refused with UnsupportedVersion.",
        ),
        transcript(
            "refuse_not_trusted",
            "A device the target does not trust gets Refuse NotTrusted (or its stream or connection is closed) and no document data.",
            Identity::Stranger,
            vec![
                Step::Open { may_fail: true },
                h14(),
                send(&step1(notes), "SyncStep1 conformance/notes"),
                expect_code("RefusalOrEnd", "NotTrusted"),
            ],
        ),
        transcript(
            "malformed_frame",
            "A frame whose body is not a message ends the stream with Refuse Malformed.",
            Identity::TrustedLow,
            vec![
                Step::Open { may_fail: false },
                h14(),
                expect("Hello"),
                raw(&[0, 0, 0, 3, 0xff, 0xff, 0xff], "a 3-byte frame with body ff ff ff"),
                expect_code("Refuse", "Malformed"),
                expect("End"),
            ],
        ),
        transcript(
            "frame_too_large",
            "A length prefix over 32 MiB ends the stream with Refuse FrameTooLarge (the body is never read).",
            Identity::TrustedLow,
            vec![
                Step::Open { may_fail: false },
                h14(),
                expect("Hello"),
                raw(&[0x02, 0x00, 0x00, 0x01, 0x00], "length prefix 33 554 433, then one byte"),
                expect_code("Refuse", "FrameTooLarge"),
                expect("End"),
            ],
        ),
        transcript(
            "second_hello",
            "A second Hello on one stream is a ProtocolViolation.",
            Identity::TrustedLow,
            vec![
                Step::Open { may_fail: false },
                h14(),
                expect("Hello"),
                h14(),
                expect_code("Refuse", "ProtocolViolation"),
                expect("End"),
            ],
        ),
        featured(
            "feed",
            transcript(
                "feature_feed",
                "Both Hellos announce `feed`: the target asks for this side's changes with FeedRequest instead of a SyncStep1 per document, and answers this side's FeedRequest with FeedPages (the last one marked). Skipped against a target without `feed`.",
                Identity::TrustedLow,
                vec![
                    Step::Open { may_fail: false },
                    hello_with_features(),
                    expect("Hello"),
                    expect("FeedRequest"),
                    send(
                        &Message::FeedPage { epoch: 1, head: 0, docs: vec![], last: true },
                        "FeedPage: nothing changed here (epoch 1, head 0, last)",
                    ),
                    send(
                        &Message::FeedRequest { epoch: 0, after: 0 },
                        "FeedRequest: everything (no checkpoint of the target's feed)",
                    ),
                    expect("FeedPage"),
                    Step::Close,
                ],
            ),
        ),
        featured(
            "parts",
            transcript(
                "feature_parts",
                "Both Hellos announce `parts`: an Update sent as two Parts is reassembled and applied (a SyncStep1 then gets it back). Skipped against a target without `parts`.",
                Identity::TrustedLow,
                in_two_parts(
                    "conformance/parts",
                    &map_update(5, "m", "sent", "in two parts"),
                    "an Update of conformance/parts (client 5)",
                    vec![
                        send(&step1("conformance/parts"), "SyncStep1 conformance/parts"),
                        expect_doc("SyncStep2", "conformance/parts", Some(json!({"m": {"sent": "in two parts"}}))),
                        Step::Close,
                    ],
                ),
            ),
        ),
        featured(
            "parts",
            transcript(
                "part_invalid_doc_name",
                "An Update in two Parts for the invalid document name \"\" (§9.6): not a stream error; once whole it is answered with DocError { InvalidDocName } and the stream goes on (a SyncStep1 is still answered). Skipped against a target without `parts`.",
                Identity::TrustedLow,
                in_two_parts(
                    "",
                    &map_update(6, "m", "k", "never stored"),
                    "an Update of the document \"\"",
                    vec![
                        expect_code("DocError", "InvalidDocName"),
                        send(&step1("conformance/after-parts"), "SyncStep1 conformance/after-parts"),
                        expect_doc("SyncStep2", "conformance/after-parts", None),
                        Step::Close,
                    ],
                ),
            ),
        ),
        featured(
            "feed",
            feed_violation(
                "feed_page_after_last",
                "A FeedPage after the last page of its answer (§9.5, §10): the target refuses with ProtocolViolation. Skipped against a target without `feed`.",
                vec![
                    (Message::FeedPage { epoch: 1, head: 0, docs: vec![], last: true }, "FeedPage: nothing changed here (epoch 1, head 0, last)"),
                    (Message::FeedPage { epoch: 1, head: 0, docs: vec![], last: true }, "FeedPage again, after the last one"),
                ],
            ),
        ),
        featured(
            "feed",
            feed_violation(
                "feed_page_other_head",
                "Pages of one answer with different heads (§9.5, §10): the target refuses with ProtocolViolation. Skipped against a target without `feed`.",
                vec![
                    (Message::FeedPage { epoch: 1, head: 7, docs: vec!["conformance/listed".into()], last: false }, "FeedPage 1: epoch 1, head 7, one name, not last"),
                    (Message::FeedPage { epoch: 1, head: 8, docs: vec![], last: true }, "FeedPage 2: head 8, not the answer's head"),
                ],
            ),
        ),
        featured(
            "feed",
            feed_violation(
                "feed_page_epoch_0",
                "A FeedPage with epoch 0 (§9.5, §10): the target refuses with ProtocolViolation. Skipped against a target without `feed`.",
                vec![(Message::FeedPage { epoch: 0, head: 0, docs: vec![], last: true }, "FeedPage with epoch 0")],
            ),
        ),
        transcript(
            "feature_not_in_use",
            "A FeedRequest from a peer whose Hello announced no feature (§6.1): the feature is not in use, so the target refuses with ProtocolViolation, whatever it announced itself.",
            Identity::TrustedLow,
            vec![
                Step::Open { may_fail: false },
                send(&hello(1, 4), "Hello 1.4, no features"),
                expect("Hello"),
                send(&Message::FeedRequest { epoch: 0, after: 0 }, "FeedRequest without the feature in use"),
                expect_code("Refuse", "ProtocolViolation"),
                expect("End"),
            ],
        ),
    ]
}

/// The files hold exactly what this file writes, and the binary builds the same in.
#[test]
fn transcript_files_are_up_to_date() {
    let dir = sessions_dir();
    let write = std::env::var("DEVICELINK_WRITE_VECTORS").is_ok();
    if write {
        std::fs::create_dir_all(&dir).unwrap();
    }
    for t in transcripts() {
        let path = dir.join(format!("{}.json", t.name));
        let text = serde_json::to_string_pretty(&t).unwrap() + "\n";
        if write {
            std::fs::write(&path, &text).unwrap();
        }
        let on_disk = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (regenerate with DEVICELINK_WRITE_VECTORS=1)",
                path.display()
            )
        });
        assert_eq!(
            on_disk,
            text,
            "{} is stale (regenerate with DEVICELINK_WRITE_VECTORS=1)",
            path.display()
        );
    }
    let built_in: Vec<String> = conformance::builtin().into_iter().map(|t| t.name).collect();
    let written: Vec<String> = transcripts().into_iter().map(|t| t.name).collect();
    assert_eq!(
        built_in, written,
        "src/conformance builds in a different list"
    );
}

/// Every transcript, replayed against an in-process agent over real libp2p.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transcripts_replay_against_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let runner = tempfile::tempdir().unwrap();
    let ids = Identities::load_or_create(runner.path()).unwrap();
    let agent = start(dir.path(), "target").await;
    agent.trust_add(ids.low_id(), "conformance low").unwrap();
    agent.trust_add(ids.high_id(), "conformance high").unwrap();
    let report = conformance::run(
        &conformance::builtin(),
        &ids,
        agent.device_id(),
        &agent.listen_addrs()[0],
    )
    .await;
    assert!(report.passed(), "\n{}", report.table());
    assert_eq!(report.outcomes.len(), conformance::builtin().len());
    // The agent announces every optional feature: nothing may be skipped.
    assert!(
        report
            .outcomes
            .iter()
            .all(|o| !o.detail.starts_with("skipped")),
        "\n{}",
        report.table()
    );
    // What the sessions wrote is really stored.
    let notes = agent.open_doc("conformance/notes").unwrap();
    assert_eq!(notes.to_json()["m"]["k"], "from the runner");
}

/// `devicelink conformance` against an agent process: prints the ids to trust, a table, and
/// exits 0; against a target that does not trust it, exits non-zero with failures.
#[test]
fn the_conformance_command_passes_against_an_agent() {
    let (target_dir, runner_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let run = |target: &AgentProcess| {
        std::process::Command::new(common::process::BIN)
            .args(["conformance", &target.addr, "--peer-id", &target.device_id])
            .arg("--data-dir")
            .arg(runner_dir.path())
            .output()
            .expect("run devicelink conformance")
    };
    let target = AgentProcess::start(target_dir.path(), &[]);
    // Not trusted yet: it says which ids to trust and fails.
    let out = run(&target);
    assert!(!out.status.success(), "{}", stdout(&out));
    let text = stdout(&out);
    let ids: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("trust: "))
        .map(|l| l.split_whitespace().next().unwrap_or_default().to_string())
        .collect();
    assert_eq!(ids.len(), 2, "{text}");
    for id in &ids {
        let out = target.cli(&["trust", "add", id]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let out = run(&target);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("17 of 17 passed: conforms"),
        "{}",
        stdout(&out)
    );
}
