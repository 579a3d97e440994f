//! Real-app scale between real agents: 10,000 documents to a new device, a reconnect that costs
//! what changed, deletion while a device is offline, memory bounded by the document cache, and a
//! 100 MB document syncing beside small ones.

mod common;

use std::time::Duration;

use common::process::AgentProcess;
use common::{link, start, wait_until};
use devicelink::AgentHandle;
use serde_json::json;

const MANY: usize = 10_000;

fn peer_status(agent: &AgentHandle, peer: &AgentHandle) -> devicelink::PeerStatus {
    let id = peer.device_id().to_string();
    agent
        .status()
        .unwrap()
        .peers
        .into_iter()
        .find(|p| p.device_id == id)
        .expect("peer in status")
}

fn has_value(agent: &AgentHandle, doc: &str, expected: serde_json::Value) -> bool {
    agent
        .open_doc(doc)
        .map(|d| d.to_json()["m"]["k"] == expected)
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_documents_reach_a_new_device_and_a_reconnect_costs_what_changed() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(dir_a.path(), "a").await;
    let mut writes = Vec::with_capacity(MANY);
    for i in 0..MANY {
        let doc = a.open_doc(&format!("note/{i:05}")).unwrap();
        writes.push(doc.set_map_value_deferred("m", "k", i as i64).unwrap());
    }
    for write in writes {
        write.wait().await.unwrap();
    }

    // First sync to a new device: every document arrives through the change feed.
    let b = start(dir_b.path(), "b").await;
    link(&a, &b);
    wait_until(Duration::from_secs(120), "10,000 documents on b", || {
        b.status().unwrap().docs >= MANY
    })
    .await;
    wait_until(Duration::from_secs(60), "b caught up with a", || {
        let s = peer_status(&b, &a);
        s.changed_only && s.caught_up && s.docs_done == s.docs_total
    })
    .await;
    assert!(peer_status(&b, &a).docs_total >= MANY);
    for i in [0, 1234, MANY - 1] {
        assert!(has_value(&b, &format!("note/{i:05}"), json!(i)), "note {i}");
    }
    // Let both sides exchange feed marks (every 250 ms) so each holds the other's checkpoint.
    tokio::time::sleep(Duration::from_secs(1)).await;
    b.shutdown().await.unwrap();

    // One document changes while b is off.
    a.open_doc("note/04242")
        .unwrap()
        .set_map_value("m", "k", "changed")
        .await
        .unwrap();
    let b = start(dir_b.path(), "b").await;
    b.dial(a.listen_addrs()[0].clone()).unwrap();
    wait_until(Duration::from_secs(30), "the changed document on b", || {
        has_value(&b, "note/04242", json!("changed"))
    })
    .await;
    wait_until(Duration::from_secs(30), "both caught up", || {
        let (ba, ab) = (peer_status(&b, &a), peer_status(&a, &b));
        ba.caught_up && ab.caught_up
    })
    .await;
    // The changed-only path: a listed only what changed (the document, and at most a few of the
    // agent's own system documents), not the 10,000 it stores; b answered as little.
    let (ba, ab) = (peer_status(&b, &a), peer_status(&a, &b));
    assert!(ba.changed_only, "{ba:?}");
    assert!(
        (1..=4).contains(&ba.docs_total),
        "a listed {} documents to b",
        ba.docs_total
    );
    assert!(
        ab.docs_total <= 4,
        "b listed {} documents to a",
        ab.docs_total
    );
    assert!(ab.docs_answered <= 4, "a answered {}", ab.docs_answered);
    assert!(
        ba.bytes_in + ba.bytes_out < 64 * 1024,
        "the reconnect took {} bytes",
        ba.bytes_in + ba.bytes_out
    );
    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_made_while_a_device_was_offline_does_not_come_back() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(dir_a.path(), "a").await;
    let b = start(dir_b.path(), "b").await;
    link(&a, &b);
    for doc in ["gone", "kept"] {
        a.open_doc(doc)
            .unwrap()
            .set_map_value("m", "k", doc)
            .await
            .unwrap();
    }
    wait_until(Duration::from_secs(20), "both documents on b", || {
        has_value(&b, "gone", json!("gone")) && has_value(&b, "kept", json!("kept"))
    })
    .await;
    b.flush().await.unwrap();
    b.shutdown().await.unwrap();

    let mut subscription = a.open_doc("gone").unwrap().subscribe();
    assert!(a.delete_doc("gone").await.unwrap());
    let event = tokio::time::timeout(Duration::from_secs(5), subscription.recv())
        .await
        .expect("a deleted event in time")
        .unwrap();
    assert!(event.deleted);
    drop(subscription);
    assert!(!a.list_docs().unwrap().contains(&"gone".to_string()));

    // b comes back with its old copy: it learns the deletion and drops it; a never gets it back.
    let b = start(dir_b.path(), "b").await;
    assert!(b.list_docs().unwrap().contains(&"gone".to_string()));
    b.dial(a.listen_addrs()[0].clone()).unwrap();
    wait_until(
        Duration::from_secs(20),
        "b drops the deleted document",
        || !b.list_docs().unwrap().contains(&"gone".to_string()),
    )
    .await;
    wait_until(Duration::from_secs(20), "both caught up", || {
        peer_status(&b, &a).caught_up && peer_status(&a, &b).caught_up
    })
    .await;
    a.open_doc("kept")
        .unwrap()
        .set_map_value("m", "k", "still syncing")
        .await
        .unwrap();
    wait_until(Duration::from_secs(20), "a later edit on b", || {
        has_value(&b, "kept", json!("still syncing"))
    })
    .await;
    for agent in [&a, &b] {
        assert!(!agent.list_docs().unwrap().contains(&"gone".to_string()));
    }
    // Re-creating the name makes a new, empty document that syncs again.
    a.open_doc("gone")
        .unwrap()
        .set_map_value("m", "new", true)
        .await
        .unwrap();
    wait_until(
        Duration::from_secs(20),
        "the re-created document on b",
        || {
            b.list_docs().unwrap().contains(&"gone".to_string())
                && b.open_doc("gone").unwrap().to_json() == json!({"m": {"new": true}})
        },
    )
    .await;
    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}

fn rss_mb(pid: u32) -> f64 {
    common::rss_kib(pid) as f64 / 1024.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_every_document_once_keeps_memory_within_the_cache_budget() {
    // Documents of ~1 KB, as apps keep them. (sled 0.34 keeps records of several KB in its page
    // cache once read, whatever its capacity; see README "Scale".)
    const DOCS: usize = 20_000;
    const BUDGET_MB: u64 = 8;
    let dir = tempfile::tempdir().unwrap();
    let value = "x".repeat(1024);
    {
        let agent = AgentProcess::start(dir.path(), &[]);
        let client = agent.client().await;
        let names: Vec<String> = (0..DOCS).map(|i| format!("page/{i}")).collect();
        for chunk in names.chunks(500) {
            let writes = chunk
                .iter()
                .map(|name| client.doc_set(name, "m", "k", json!(value.clone())));
            for result in futures::future::join_all(writes).await {
                result.unwrap();
            }
        }
    }
    let budget = BUDGET_MB.to_string();
    let agent = AgentProcess::start_with(
        dir.path(),
        &[],
        &["--no-mdns", "--doc-cache-mb", budget.as_str()],
    );
    let client = agent.client().await;
    let idle = rss_mb(agent.child.id());
    let mut peak: f64 = idle;
    for i in 0..DOCS {
        let doc = client.doc_get(&format!("page/{i}")).await.unwrap();
        assert_eq!(doc["m"]["k"].as_str().map(str::len), Some(value.len()));
        if i % 1000 == 0 {
            peak = peak.max(rss_mb(agent.child.id()));
        }
    }
    peak = peak.max(rss_mb(agent.child.id()));
    let status = client.status().await.unwrap();
    println!("idle {idle:.1} MB, peak {peak:.1} MB while reading {DOCS} documents of 1 KiB, status {status}");
    assert!(status["docs_loaded"].as_u64().unwrap() < DOCS as u64 / 2);
    assert!(status["cache_bytes"].as_u64().unwrap() <= BUDGET_MB << 20);
    // Everything loaded takes ~130 MB (measured with a budget that holds them all).
    assert!(
        peak <= (BUDGET_MB + 64) as f64,
        "RSS reached {peak:.1} MB with a {BUDGET_MB} MB cache budget"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_megabyte_document_syncs_while_small_documents_keep_syncing() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(dir_a.path(), "a").await;
    let big = a.open_doc("big").unwrap();
    let piece = "b".repeat(4 << 20);
    for i in 0..25 {
        big.set_map_value("m", &format!("k{i:02}"), piece.as_str())
            .await
            .unwrap();
    }
    assert!(big.encode_state().len() > 100 << 20);
    let b = start(dir_b.path(), "b").await;
    // B's own record of what arrives in which order (a subscription sees every update as B
    // applies it), so the check does not depend on how fast this machine moves 100 MB.
    let mut small_on_b = b.open_doc("small").unwrap().subscribe();
    let big_on_b = b.open_doc("big").unwrap();
    let mut big_updates = big_on_b.subscribe();
    link(&a, &b);
    // Small edits keep flowing while the big document is in transfer.
    let small = a.open_doc("small").unwrap();
    let writer = tokio::spawn(async move {
        for i in 0i64.. {
            if small.set_map_value("m", "k", i).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let big_complete = || {
        use yrs::Map;
        let map = big_on_b.yrs_doc().get_or_insert_map("m");
        big_on_b.read(|txn| map.len(txn)) == 25
    };
    let mut small_seen_before_big = false;
    let start_time = std::time::Instant::now();
    while !big_complete() {
        tokio::select! {
            update = small_on_b.recv() => {
                if update.is_ok() && !big_complete() {
                    small_seen_before_big = true;
                }
            }
            _ = big_updates.recv() => {}
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        assert!(
            start_time.elapsed() < Duration::from_secs(180),
            "the 100 MB document did not arrive in time: {:?}",
            peer_status(&b, &a)
        );
    }
    writer.abort();
    assert!(
        small_seen_before_big,
        "no small edit arrived while the big document was in transfer"
    );
    common::assert_identical(&a.open_doc("big").unwrap(), &b.open_doc("big").unwrap());
    let small = a.open_doc("small").unwrap();
    small.set_map_value("m", "k", "after").await.unwrap();
    wait_until(
        Duration::from_secs(20),
        "a small edit after the big one",
        || has_value(&b, "small", json!("after")),
    )
    .await;
    assert!(peer_status(&b, &a).doc_errors.is_empty());
    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}

/// A device whose database is gone (identity kept) starts a new change feed: both sides notice
/// the checkpoints no longer hold and list everything, so nothing is missed either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_lost_its_database_gets_everything_again() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(dir_a.path(), "a").await;
    let b = start(dir_b.path(), "b").await;
    link(&a, &b);
    for i in 0..50 {
        a.open_doc(&format!("n{i}"))
            .unwrap()
            .set_map_value("m", "k", i)
            .await
            .unwrap();
    }
    wait_until(Duration::from_secs(20), "50 documents on b", || {
        has_value(&b, "n49", json!(49))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await; // marks: checkpoints on both sides
    b.shutdown().await.unwrap();
    std::fs::remove_dir_all(dir_b.path().join("db")).unwrap();

    // b comes back empty with the same identity; a still trusts it.
    let b = start(dir_b.path(), "b").await;
    b.trust_add(a.device_id(), "a").unwrap();
    b.open_doc("from-b")
        .unwrap()
        .set_map_value("m", "k", "b")
        .await
        .unwrap();
    b.dial(a.listen_addrs()[0].clone()).unwrap();
    wait_until(
        Duration::from_secs(30),
        "everything back on b, b's new doc on a",
        || {
            (0..50).all(|i| has_value(&b, &format!("n{i}"), json!(i)))
                && has_value(&a, "from-b", json!("b"))
        },
    )
    .await;
    assert!(peer_status(&b, &a).docs_total >= 50);
    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}

/// A tombstone naming one of the agent's own documents (which no conforming device writes)
/// deletes nothing: the activities survive and keep syncing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tombstone_cannot_delete_the_agents_own_documents() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(da.path(), "a").await;
    let b = start(db.path(), "b").await;
    link(&a, &b);
    wait_until(Duration::from_secs(20), "session", || {
        a.is_syncing_with(&b.device_id())
    })
    .await;
    let draft = |title: &str| devicelink::handoff::ActivityDraft {
        id: None,
        activity_type: "com.example.notes.edit".into(),
        title: title.into(),
        docs: vec![],
        app_state: json!({}),
        ttl_secs: None,
    };
    a.activities().publish(draft("on a")).await.unwrap();
    let activities = devicelink::handoff::ACTIVITIES_DOC;
    let tombstones = b.docs().open_system(devicelink::docs::DELETED_DOC).unwrap();
    tombstones
        .set_map_value(
            "deleted",
            activities,
            devicelink::docs::json_to_any(&json!({"at": 1, "by": b.device_id().to_string()})),
        )
        .await
        .unwrap();
    let on_a = a.docs().open_system(devicelink::docs::DELETED_DOC).unwrap();
    wait_until(Duration::from_secs(20), "the tombstone reaches a", || {
        on_a.to_json()["deleted"].get(activities).is_some()
    })
    .await;
    // A change to the activities after the tombstone still arrives, and nothing was purged.
    b.activities().publish(draft("on b")).await.unwrap();
    wait_until(Duration::from_secs(20), "b's activity reaches a", || {
        a.activities()
            .list()
            .unwrap()
            .iter()
            .any(|x| x.title == "on b")
    })
    .await;
    assert!(a
        .activities()
        .list()
        .unwrap()
        .iter()
        .any(|x| x.title == "on a"));
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}
