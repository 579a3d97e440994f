//! Session handoff between real agents: publish on one device, continue on another with the
//! documents caught up first; origin offline; two devices claiming at once.

mod common;

use std::time::Duration;

use common::*;
use devicelink::handoff::{Activity, ActivityDraft, HandoffError};
use devicelink::AgentHandle;
use serde_json::json;

fn draft(doc: &str) -> ActivityDraft {
    ActivityDraft {
        id: None,
        activity_type: "com.example.notes.edit".into(),
        title: "Editing the draft".into(),
        docs: vec![doc.into()],
        app_state: json!({ "cursor": 42, "scroll": 0.5 }),
        ttl_secs: None,
    }
}

fn trust_all(agents: &[&AgentHandle]) {
    for a in agents {
        for b in agents {
            if a.device_id() != b.device_id() {
                a.trust_add(b.device_id(), b.device_name()).unwrap();
            }
        }
    }
}

fn current(agent: &AgentHandle, id: &str) -> Option<Activity> {
    agent
        .activities()
        .list()
        .unwrap()
        .into_iter()
        .find(|a| a.id == id)
}

/// Acceptance 1: A edits and publishes while B is offline; B comes online and claims it; B's
/// documents cover A's recorded state when the app state is handed over; A hears "continued".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handoff_after_publishing_while_the_other_device_was_offline() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(da.path(), "laptop").await;
    let b = start(db.path(), "phone").await;
    link(&a, &b);
    wait_until(LIMIT, "session", || a.is_syncing_with(&b.device_id())).await;
    let b_id = b.device_id();
    b.shutdown().await.unwrap();
    drop(b);
    wait_until(LIMIT, "a to see b leave", || !a.is_syncing_with(&b_id)).await;

    let doc = a.open_doc("draft").unwrap();
    for i in 0..200 {
        doc.append_text("body", &format!("line {i}\n"))
            .await
            .unwrap();
    }
    doc.set_map_value("meta", "title", "Quarterly plan")
        .await
        .unwrap();
    let mut continued = a.activities().continued_elsewhere();
    let published = a.activities().publish(draft("draft")).await.unwrap();
    assert_eq!(
        (published.epoch, published.holder.clone()),
        (1, a.device_id().to_string())
    );
    let left_at = doc.to_json();

    let b = start(db.path(), "phone").await;
    b.dial(a.listen_addrs()[0].clone()).unwrap();
    wait_until(LIMIT, "the activity to reach b", || {
        current(&b, &published.id).is_some()
    })
    .await;
    let handoff = b
        .activities()
        .handoff(&published.id, Duration::from_secs(10))
        .await
        .unwrap();

    // The documents handed over are at least what the user left on A.
    assert_eq!(handoff.docs["draft"], left_at);
    let needed = &handoff.activity.docs[0].state_vector;
    let b_doc = b.open_doc("draft").unwrap();
    assert_eq!(
        devicelink::handoff::missing(&b_doc.state_vector_decoded(), needed),
        0
    );
    assert_eq!(
        handoff.activity.app_state,
        json!({ "cursor": 42, "scroll": 0.5 })
    );
    assert_eq!(handoff.activity.holder, b.device_id().to_string());
    assert_eq!(handoff.activity.epoch, 2);

    let event = tokio::time::timeout(LIMIT, continued.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (event.id.as_str(), event.holder.as_str()),
        (published.id.as_str(), b_id.to_string().as_str())
    );
    wait_until(LIMIT, "a to see the new holder", || {
        current(&a, &published.id).is_some_and(|x| x.holder == b_id.to_string())
    })
    .await;
    // Claiming it again on B is refused clearly; A can take it back.
    assert!(matches!(
        b.activities().handoff(&published.id, LIMIT).await,
        Err(HandoffError::AlreadyHere(_))
    ));
    let back = a.activities().handoff(&published.id, LIMIT).await.unwrap();
    assert_eq!(
        (back.activity.epoch, back.activity.holder),
        (3, a.device_id().to_string())
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// Acceptance 2: the origin goes offline. With nobody holding the data the claim fails clearly;
/// with another peer holding it the documents catch up from there, and the claim (which needs
/// the holder) fails clearly: never a stale document, never a silent success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_offline_fails_clearly_and_never_hands_over_stale_documents() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start(dirs[0].path(), "a").await;
    let b = start(dirs[1].path(), "b").await;
    let c = start(dirs[2].path(), "c").await;
    trust_all(&[&a, &b, &c]);
    a.dial(c.listen_addrs()[0].clone()).unwrap();
    wait_until(LIMIT, "a-c session", || a.is_syncing_with(&c.device_id())).await;
    b.shutdown().await.unwrap();
    drop(b);

    let doc = a.open_doc("report").unwrap();
    doc.append_text("body", "the final numbers").await.unwrap();
    let published = a.activities().publish(draft("report")).await.unwrap();
    let c_doc = c.open_doc("report").unwrap();
    wait_until(LIMIT, "c to have the data and the activity", || {
        same_state(&doc, &c_doc) && current(&c, &published.id).is_some()
    })
    .await;
    a.shutdown().await.unwrap();

    // B knows the activity only if it could sync; isolated, it cannot even see it...
    let b = start(dirs[1].path(), "b").await;
    assert!(matches!(
        b.activities()
            .handoff(&published.id, Duration::from_secs(1))
            .await,
        Err(HandoffError::NotFound(_))
    ));
    // ... connected to C it gets the activity and the documents, but the holder is offline.
    b.dial(c.listen_addrs()[0].clone()).unwrap();
    wait_until(LIMIT, "the activity to reach b", || {
        current(&b, &published.id).is_some()
    })
    .await;
    let err = b
        .activities()
        .handoff(&published.id, Duration::from_secs(3))
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(err, HandoffError::HolderUnreachable { .. }),
        "{message}"
    );
    assert!(message.contains(&a.device_id().to_string()), "{message}");
    let b_doc = b.open_doc("report").unwrap();
    assert_eq!(
        devicelink::handoff::missing(
            &b_doc.state_vector_decoded(),
            &published.docs[0].state_vector
        ),
        0
    );
    assert_eq!(
        current(&b, &published.id).unwrap().holder,
        a.device_id().to_string(),
        "nothing changed hands"
    );
    b.shutdown().await.unwrap();
    c.shutdown().await.unwrap();
}

/// Acceptance 5: two devices claim one activity at the same moment: exactly one succeeds, and
/// every device agrees who holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_claims_exactly_one_wins_everywhere() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start(dirs[0].path(), "a").await;
    let b = start(dirs[1].path(), "b").await;
    let c = start(dirs[2].path(), "c").await;
    trust_all(&[&a, &b, &c]);
    a.dial(b.listen_addrs()[0].clone()).unwrap();
    a.dial(c.listen_addrs()[0].clone()).unwrap();
    b.dial(c.listen_addrs()[0].clone()).unwrap();
    a.open_doc("shared")
        .unwrap()
        .append_text("t", "x")
        .await
        .unwrap();
    let published = a.activities().publish(draft("shared")).await.unwrap();
    wait_until(LIMIT, "b and c to see it", || {
        current(&b, &published.id).is_some() && current(&c, &published.id).is_some()
    })
    .await;

    let (on_b, on_c) = (b.activities(), c.activities());
    let (rb, rc) = tokio::join!(
        on_b.handoff(&published.id, LIMIT),
        on_c.handoff(&published.id, LIMIT)
    );
    let winners: Vec<String> = [rb.as_ref().ok(), rc.as_ref().ok()]
        .into_iter()
        .flatten()
        .map(|h| h.activity.holder.clone())
        .collect();
    assert_eq!(
        winners.len(),
        1,
        "exactly one claim succeeds: {rb:?} / {rc:?}"
    );
    let loser = match (rb, rc) {
        (Ok(_), Err(e)) | (Err(e), Ok(_)) => e,
        other => panic!("exactly one claim must fail: {other:?}"),
    };
    assert!(loser.to_string().contains("already continued"), "{loser}");
    for agent in [&a, &b, &c] {
        wait_until(LIMIT, "every device to agree", || {
            current(agent, &published.id).is_some_and(|x| x.holder == winners[0] && x.epoch == 2)
        })
        .await;
    }
    for agent in [a, b, c] {
        agent.shutdown().await.unwrap();
    }
}

/// Bad drafts get clear errors; unpublishing makes it disappear everywhere; only the holder may
/// update an activity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_rules_and_unpublish() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(da.path(), "a").await;
    let b = start(db.path(), "b").await;
    link(&a, &b);
    let mut bad = draft("d");
    bad.activity_type = "notes".into();
    assert!(matches!(
        a.activities().publish(bad).await,
        Err(HandoffError::BadType(_))
    ));
    let mut big = draft("d");
    big.app_state = json!({ "blob": "x".repeat(20_000) });
    assert!(matches!(
        a.activities().publish(big).await,
        Err(HandoffError::StateTooLarge(_))
    ));
    let mut reserved = draft("d");
    reserved.docs = vec!["_devicelink/devices".into()];
    assert!(a.activities().publish(reserved).await.is_err());

    let published = a.activities().publish(draft("d")).await.unwrap();
    wait_until(LIMIT, "b to see it", || {
        current(&b, &published.id).is_some()
    })
    .await;
    let mut update = draft("d");
    update.id = Some(published.id.clone());
    assert!(matches!(
        b.activities().publish(update.clone()).await,
        Err(HandoffError::NotHolder { .. })
    ));
    update.title = "Renamed".into();
    assert_eq!(
        a.activities().publish(update).await.unwrap().title,
        "Renamed"
    );
    a.activities().unpublish(&published.id).await.unwrap();
    wait_until(LIMIT, "it to disappear on b", || {
        current(&b, &published.id).is_none()
    })
    .await;
    assert!(current(&a, &published.id).is_none());
    assert!(matches!(
        b.activities().handoff(&published.id, LIMIT).await,
        Err(HandoffError::Gone(_))
    ));

    let mut short = draft("d");
    short.ttl_secs = Some(1);
    let expiring = a.activities().publish(short).await.unwrap();
    wait_until(LIMIT, "b to see the short one", || {
        current(&b, &expiring.id).is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        current(&b, &expiring.id).is_none() && current(&a, &expiring.id).is_none(),
        "expired everywhere"
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// Records of activities long expired are pruned from the replicated document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_expired_activity_records_are_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let a = start(dir.path(), "a").await;
    let mut short = draft("d");
    short.ttl_secs = Some(0);
    let gone = a.activities().publish(short).await.unwrap();
    let kept = a.activities().publish(draft("d")).await.unwrap();
    let doc = a
        .docs()
        .open_system(devicelink::handoff::ACTIVITIES_DOC)
        .unwrap();
    assert!(devicelink::handoff::current(&doc).contains_key(&gone.id));
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        devicelink::handoff::prune_expired(&doc, 0.0).await.unwrap(),
        1
    );
    let records = devicelink::handoff::current(&doc);
    assert!(!records.contains_key(&gone.id) && records.contains_key(&kept.id));
    a.shutdown().await.unwrap();
}
