//! End-to-end sync between real agents: real sled dirs, real Noise/TCP connections on 127.0.0.1.

mod common;

use common::*;
use devicelink::yrs::{Map, Text};
use std::time::Duration;

/// Acceptance 1: both sides edit (Y.Text and Y.Map) before they connect; after connecting both
/// hold identical state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_made_before_connecting_converge() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(da.path(), "a").await;
    let b = start(db.path(), "b").await;
    let doc_a = a.open_doc("shared").unwrap();
    let doc_b = b.open_doc("shared").unwrap();
    doc_a.append_text("body", "hello from a. ").await.unwrap();
    doc_a
        .set_map_value("meta", "title", "A's title")
        .await
        .unwrap();
    doc_b.append_text("body", "hello from b. ").await.unwrap();
    doc_b.set_map_value("meta", "owner", "b").await.unwrap();
    // A document only B has must reach A too.
    b.open_doc("only-b")
        .unwrap()
        .set_map_value("m", "k", 1i64)
        .await
        .unwrap();

    link(&a, &b);
    wait_until(LIMIT, "docs to converge", || same_state(&doc_a, &doc_b)).await;
    wait_until(LIMIT, "only-b to reach a", || {
        a.list_docs().unwrap().contains(&"only-b".to_string())
            && a.open_doc("only-b").unwrap().to_json()["m"]["k"] == 1
    })
    .await;

    assert_identical(&doc_a, &doc_b);
    let json = doc_a.to_json();
    let body = json["body"].as_str().unwrap();
    assert!(
        body.contains("hello from a. ") && body.contains("hello from b. "),
        "{body}"
    );
    assert_eq!(json["meta"]["title"], "A's title");
    assert_eq!(json["meta"]["owner"], "b");
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// Acceptance 2: concurrent edits on both sides while connected converge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_edits_while_connected_converge() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(da.path(), "a").await;
    let b = start(db.path(), "b").await;
    link(&a, &b);
    wait_until(LIMIT, "session", || a.is_syncing_with(&b.device_id())).await;

    let edit = |doc: devicelink::DocHandle, who: &'static str| async move {
        for i in 0..300 {
            let body = doc.yrs_doc().get_or_insert_text("body");
            let map = doc.yrs_doc().get_or_insert_map("keys");
            doc.transact(|txn| {
                let len = body.len(txn);
                body.insert(txn, len / 2, &format!("{who}{i} "));
                map.insert(txn, format!("{who}-{i}"), i as i64);
                map.insert(txn, "last", who);
            })
            .await
            .unwrap();
        }
    };
    let (ta, tb) = (
        tokio::spawn(edit(a.open_doc("doc").unwrap(), "a")),
        tokio::spawn(edit(b.open_doc("doc").unwrap(), "b")),
    );
    ta.await.unwrap();
    tb.await.unwrap();
    let (doc_a, doc_b) = (a.open_doc("doc").unwrap(), b.open_doc("doc").unwrap());
    wait_until(LIMIT, "concurrent edits to converge", || {
        same_state(&doc_a, &doc_b)
    })
    .await;
    assert_identical(&doc_a, &doc_b);
    let keys = doc_a.to_json()["keys"].as_object().unwrap().len();
    assert_eq!(keys, 601, "every key from both sides plus 'last'");
    // Status agrees: each side knows the other holds everything it has.
    for (me, other) in [(&a, &b), (&b, &a)] {
        let other_id = other.device_id().to_string();
        wait_until(LIMIT, "status to report in sync", || {
            let status = me.status().unwrap();
            let peer = status
                .peers
                .iter()
                .find(|p| p.device_id == other_id)
                .unwrap();
            peer.syncing && peer.pending.get("doc") == Some(&0)
        })
        .await;
    }
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// Acceptance 3: B stopped; A makes 10,000 changes; B restarts from its data dir and catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_peer_catches_up_on_10k_offline_changes() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(da.path(), "a").await;
    let b = start(db.path(), "b").await;
    link(&a, &b);
    let doc_a = a.open_doc("log").unwrap();
    doc_a.append_text("t", "start;").await.unwrap();
    let doc_b = b.open_doc("log").unwrap();
    wait_until(LIMIT, "first sync", || same_state(&doc_a, &doc_b)).await;
    let b_id = b.device_id();
    drop(doc_b);
    b.shutdown().await.unwrap();
    drop(b);
    wait_until(LIMIT, "a to notice b left", || !a.is_syncing_with(&b_id)).await;

    let text = doc_a.yrs_doc().get_or_insert_text("t");
    let map = doc_a.yrs_doc().get_or_insert_map("counts");
    let changes = (0..10_000).map(|i| {
        let (doc, text, map) = (doc_a.clone(), text.clone(), map.clone());
        async move {
            doc.transact(|txn| {
                if i % 2 == 0 {
                    let len = text.len(txn);
                    text.insert(txn, len, "x");
                } else {
                    map.insert(txn, format!("k{}", i % 500), i as i64);
                }
            })
            .await
        }
    });
    for result in futures::future::join_all(changes).await {
        result.unwrap();
    }

    // B comes back on its old data dir (and a new port); A redials it from what B told it.
    let b = start(db.path(), "b").await;
    assert_eq!(b.device_id(), b_id, "identity survives a restart");
    b.dial(a.listen_addrs()[0].clone()).unwrap();
    let doc_b = b.open_doc("log").unwrap();
    wait_until(LIMIT, "catch-up of 10,000 changes", || {
        same_state(&doc_a, &doc_b)
    })
    .await;
    assert_identical(&doc_a, &doc_b);
    assert_eq!(doc_b.text("t").len(), "start;".len() + 5_000);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// Reopening a data dir gives back exactly the same document state (snapshot + log, across
/// several compactions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopening_a_data_dir_restores_the_exact_state() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = devicelink::AgentConfig::new(dir.path());
    config.compaction.max_log_records = 100;
    let agent = devicelink::Agent::start(config.clone()).await.unwrap();
    let doc = agent.open_doc("d").unwrap();
    for i in 0..1_050 {
        doc.set_map_value("m", &format!("k{}", i % 37), i as i64)
            .await
            .unwrap();
        if i % 3 == 0 {
            doc.append_text("t", "ab").await.unwrap();
        }
    }
    let (state, json) = (doc.encode_state(), doc.to_json());
    drop(doc);
    agent.shutdown().await.unwrap();
    drop(agent);

    let agent = devicelink::Agent::start(config).await.unwrap();
    let doc = agent.open_doc("d").unwrap();
    assert_eq!(doc.to_json(), json);
    assert_same_as_state(&doc, &state, "the reopened document");
    agent.shutdown().await.unwrap();
}

/// A corrupt stored record is a clear error naming the document; other documents still open and
/// the bad document's data stays on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_record_is_reported_not_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let agent = start(dir.path(), "a").await;
    for name in ["good", "bad"] {
        let doc = agent.open_doc(name).unwrap();
        doc.append_text("t", "one").await.unwrap();
        doc.append_text("t", "two").await.unwrap();
    }
    agent.shutdown().await.unwrap();
    drop(agent);
    {
        let db = devicelink::store::open_db(dir.path()).unwrap();
        let store = devicelink::store::DocStore::open(&db).unwrap();
        store.corrupt_log_record_for_test("bad", 1).unwrap();
    }
    let agent = start(dir.path(), "a").await;
    let err = match agent.open_doc("bad") {
        Ok(_) => panic!("a corrupt document must not open silently"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("\"bad\"") && err.contains("log record 1"),
        "{err}"
    );
    assert_eq!(agent.open_doc("good").unwrap().text("t"), "onetwo");
    assert!(
        agent.list_docs().unwrap().contains(&"bad".to_string()),
        "kept on disk"
    );
    agent.shutdown().await.unwrap();
}

/// A peer that drops is redialed by the other side with backoff, from the addresses it announced
/// in its hello, and catches up by state vectors; here B never dials anyone itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_peer_is_redialed_automatically() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(da.path(), "a").await;
    let b = start(db.path(), "b").await;
    link(&a, &b);
    let b_id = b.device_id();
    let b_addr = b.listen_addrs()[0].clone();
    wait_until(LIMIT, "first session", || a.is_syncing_with(&b_id)).await;
    b.shutdown().await.unwrap();
    drop(b);
    wait_until(LIMIT, "a to notice", || !a.is_syncing_with(&b_id)).await;
    let doc_a = a.open_doc("d").unwrap();
    doc_a
        .append_text("t", "written while b was away")
        .await
        .unwrap();

    // B restarts on the same address and does not dial: A must find it again.
    let mut config = devicelink::AgentConfig::new(db.path());
    config.listen = vec![b_addr];
    let b = devicelink::Agent::start(config).await.unwrap();
    let doc_b = b.open_doc("d").unwrap();
    wait_until(LIMIT, "a to redial b and sync", || {
        same_state(&doc_a, &doc_b)
    })
    .await;
    assert_eq!(doc_b.text("t"), "written while b was away");
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// Issue 23 (§23): presence held before a session starts reaches the peer when the session
/// starts, not at the next renewal (15 s later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_held_before_a_session_reaches_the_peer_at_session_start() {
    use devicelink::presence::single;
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(da.path(), "a").await;
    let b = start(db.path(), "b").await;
    let alice = serde_json::json!({"user": {"name": "alice"}});
    let app = a.presence().client();
    app.apply("notes", single(4242, 1, Some(&alice))).unwrap();
    link(&a, &b);
    let started = std::time::Instant::now();
    wait_until(Duration::from_secs(5), "alice's presence on b", || {
        b.presence()
            .states_json("notes")
            .to_string()
            .contains("alice")
    })
    .await;
    println!("presence on b {:?} after linking", started.elapsed());
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}
