//! Conflict reporting between real agents: concurrent writes to one map key while partitioned.

mod common;

use common::*;
use devicelink::conflict::Keep;
use devicelink::AgentHandle;

/// Starts A and B, links them, then partitions them (B stopped) and returns B's dir to restart.
async fn partitioned() -> (AgentHandle, tempfile::TempDir, tempfile::TempDir) {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(da.path(), "a").await;
    let b = start(db.path(), "b").await;
    link(&a, &b);
    let (doc_a, doc_b) = (a.open_doc("note").unwrap(), b.open_doc("note").unwrap());
    doc_a.set_map_value("meta", "title", "first").await.unwrap();
    doc_a.append_text("body", "hello").await.unwrap();
    wait_until(LIMIT, "initial sync", || same_state(&doc_a, &doc_b)).await;
    // B writes once more while connected: sequential overwrites are not conflicts.
    doc_b
        .set_map_value("meta", "title", "second")
        .await
        .unwrap();
    wait_until(LIMIT, "b's write on a", || {
        doc_a.to_json()["meta"]["title"] == "second"
    })
    .await;
    let b_id = b.device_id();
    b.shutdown().await.unwrap();
    wait_until(LIMIT, "a to see b leave", || !a.is_syncing_with(&b_id)).await;
    (a, da, db)
}

/// Restarts B from its dir without dialing anyone (still partitioned).
async fn restart_b(dir: &std::path::Path) -> AgentHandle {
    start(dir, "b").await
}

/// A and B each set the same key while apart, then meet: one conflict, recorded on both.
async fn conflict_on_both() -> (
    AgentHandle,
    AgentHandle,
    tempfile::TempDir,
    tempfile::TempDir,
) {
    let (a, da, db) = partitioned().await;
    a.open_doc("note")
        .unwrap()
        .set_map_value("meta", "title", "from a")
        .await
        .unwrap();
    let b = restart_b(db.path()).await;
    b.open_doc("note")
        .unwrap()
        .set_map_value("meta", "title", "from b")
        .await
        .unwrap();
    reconnect(&a, &b).await;
    wait_until(LIMIT, "one conflict on each side", || {
        a.conflicts().list(None, false).unwrap().len() == 1
            && b.conflicts().list(None, false).unwrap().len() == 1
    })
    .await;
    (a, b, da, db)
}

async fn reconnect(a: &AgentHandle, b: &AgentHandle) {
    b.dial(a.listen_addrs()[0].clone()).unwrap();
    let (doc_a, doc_b) = (a.open_doc("note").unwrap(), b.open_doc("note").unwrap());
    wait_until(LIMIT, "reconnect and converge", || {
        same_state(&doc_a, &doc_b)
    })
    .await;
}

/// Acceptance 3: concurrent sets of one key produce exactly one conflict record on each side;
/// resolving it on one device clears it on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sets_of_one_key_make_one_conflict_resolved_everywhere() {
    let (a, b, _da, _db) = conflict_on_both().await;
    // Settle for a moment: still exactly one on each side.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let (ca, cb) = (
        a.conflicts().list(None, false).unwrap(),
        b.conflicts().list(None, false).unwrap(),
    );
    assert_eq!(ca.len(), 1);
    assert_eq!(ca, cb, "the same record on both devices");
    let c = &ca[0];
    assert_eq!(
        (c.doc.as_str(), c.map.as_slice(), c.key.as_str()),
        ("note", &["meta".to_string()][..], "title")
    );
    let current = a.open_doc("note").unwrap().to_json()["meta"]["title"].clone();
    assert_eq!(
        c.winner_value, current,
        "the winner is what both devices show"
    );
    let mut values = [
        c.winner_value.as_str().unwrap(),
        c.loser_value.as_str().unwrap(),
    ];
    values.sort();
    assert_eq!(values, ["from a", "from b"]);
    let devices = [a.device_id().to_string(), b.device_id().to_string()];
    assert!(devices.contains(&c.winner_device) && devices.contains(&c.loser_device));
    assert_ne!(c.winner_device, c.loser_device);

    // Resolve on A by picking the value that lost: cleared on both, value everywhere.
    let resolved = a.conflicts().resolve(&c.id, Keep::Other).await.unwrap();
    assert_eq!(resolved.resolution.as_ref().unwrap().kept, "other");
    let lost = c.loser_value.clone();
    wait_until(LIMIT, "resolution to replicate", || {
        b.conflicts().list(None, false).unwrap().is_empty()
            && b.open_doc("note").unwrap().to_json()["meta"]["title"] == lost
    })
    .await;
    assert!(a.conflicts().list(None, false).unwrap().is_empty());
    assert_eq!(a.open_doc("note").unwrap().to_json()["meta"]["title"], lost);
    assert_eq!(
        b.conflicts().list(None, true).unwrap().len(),
        1,
        "kept as resolved history"
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// Acceptance 4: concurrent sets of different keys, and concurrent text edits, are no conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_keys_and_text_edits_are_not_conflicts() {
    let (a, _da, db) = partitioned().await;
    let doc_a = a.open_doc("note").unwrap();
    doc_a.set_map_value("meta", "color", "red").await.unwrap();
    doc_a.append_text("body", " from a").await.unwrap();
    let b = restart_b(db.path()).await;
    let doc_b = b.open_doc("note").unwrap();
    doc_b.set_map_value("meta", "size", 3i64).await.unwrap();
    doc_b
        .edit_text("body", Some(0), 0, "b says ")
        .await
        .unwrap();
    reconnect(&a, &b).await;
    let json = a.open_doc("note").unwrap().to_json();
    assert_eq!(
        (
            json["meta"]["color"].as_str(),
            json["meta"]["size"].as_i64()
        ),
        (Some("red"), Some(3))
    );
    assert!(json["body"].as_str().unwrap().contains("from a"));
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(
        a.conflicts().list(None, true).unwrap().is_empty(),
        "{:?}",
        a.conflicts().list(None, true)
    );
    assert!(
        b.conflicts().list(None, true).unwrap().is_empty(),
        "{:?}",
        b.conflicts().list(None, true)
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// Hardening 12: two devices resolved the same conflict while apart (one kept the other value,
/// one a merged value). After they met, the record said "kept other" while the document held the
/// merged value. Now the record shows what the document holds, the same on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_resolved_on_two_devices_apart_reads_as_the_document_holds() {
    let (a, b, _da, db) = conflict_on_both().await;
    let id = a.conflicts().list(None, false).unwrap()[0].id.clone();
    // Apart again, each device resolves it its own way.
    let (b_id, b_dir) = (b.device_id(), db);
    b.shutdown().await.unwrap();
    wait_until(LIMIT, "a to see b leave", || !a.is_syncing_with(&b_id)).await;
    a.conflicts().resolve(&id, Keep::Other).await.unwrap();
    let b = restart_b(b_dir.path()).await;
    b.conflicts()
        .resolve(&id, Keep::Value(serde_json::json!("merged title")))
        .await
        .unwrap();
    reconnect(&a, &b).await;
    let settled = |agent: &AgentHandle| {
        let held = agent.open_doc("note").unwrap().to_json()["meta"]["title"].clone();
        let record = agent
            .conflicts()
            .list(None, true)
            .unwrap()
            .into_iter()
            .find(|c| c.id == id)
            .and_then(|c| c.resolution);
        (held, record)
    };
    wait_until(LIMIT, "the records to settle", || {
        let (conflicts_a, conflicts_b) = (
            a.docs()
                .open_system(devicelink::conflict::CONFLICTS_DOC)
                .unwrap(),
            b.docs()
                .open_system(devicelink::conflict::CONFLICTS_DOC)
                .unwrap(),
        );
        same_state(&conflicts_a, &conflicts_b)
    })
    .await;
    for agent in [&a, &b] {
        let (held, resolution) = settled(agent);
        let resolution = resolution.expect("resolved");
        assert_eq!(
            resolution.value, held,
            "the record names the value the document holds"
        );
        let kept = if held == "merged title" {
            "merged"
        } else {
            "other"
        };
        assert_eq!(resolution.kept, kept);
    }
}
