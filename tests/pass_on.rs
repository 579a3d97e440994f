//! A large update is passed on to subscribers as received only when it is exactly what
//! changed (`docs::PASS_ON_AS_RECEIVED`): never when an edit held back for it integrates in the
//! same transaction, nor when most of it was known already. Through an agent's public API, in
//! a process of its own (sled's locks are shared by every database of a process).

use std::time::Duration;

use devicelink::docs::PASS_ON_AS_RECEIVED;
use devicelink::{Agent, AgentConfig};
use yrs::updates::decoder::Decode;
use yrs::{GetString, ReadTxn, StateVector, Text, Transact, Update};

/// What a subscriber has after applying every update it was sent.
fn subscriber_view(
    events: &mut tokio::sync::broadcast::Receiver<devicelink::docs::DocUpdate>,
) -> String {
    let seen = yrs::Doc::new();
    let text = seen.get_or_insert_text("t");
    while let Ok(event) = events.try_recv() {
        let update = Update::decode_v1(&event.update).expect("a valid update");
        seen.transact_mut().apply_update(update).expect("applies");
    }
    let txn = seen.transact();
    text.get_string(&txn)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_update_is_passed_on_whole_only_when_it_is_exactly_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = AgentConfig::new(dir.path());
    config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    config.discovery.enabled = false;
    let agent = Agent::start(config).await.unwrap();

    // A large update from one author, and a small edit another made after it.
    let author = yrs::Doc::with_client_id(1);
    let text = author.get_or_insert_text("t");
    let large_text = "x".repeat(PASS_ON_AS_RECEIVED + 10);
    text.insert(&mut author.transact_mut(), 0, &large_text);
    let large = author
        .transact()
        .encode_state_as_update_v1(&StateVector::default());
    let editor = yrs::Doc::with_client_id(2);
    editor
        .transact_mut()
        .apply_update(Update::decode_v1(&large).unwrap())
        .unwrap();
    let before = editor.transact().state_vector();
    let edited = editor.get_or_insert_text("t");
    edited.insert(&mut editor.transact_mut(), 0, "edit:");
    let small = editor.transact().encode_state_as_update_v1(&before);

    // All new, nothing waiting: passed on as received.
    let whole = agent.open_doc("whole").unwrap();
    let mut events = whole.subscribe();
    whole.apply_update(&large).await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(10), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&event.update[..], &large[..]);

    // The small edit arrives first and waits for the large update; the large one then
    // integrates both, and subscribers must get both.
    let waiting = agent.open_doc("waiting").unwrap();
    let mut events = waiting.subscribe();
    waiting.apply_update(&small).await.unwrap();
    waiting.apply_update(&large).await.unwrap();
    let view = subscriber_view(&mut events);
    let expected = format!("edit:{large_text}");
    assert!(
        view == expected,
        "subscribers have {} characters, starting {:?}",
        view.len(),
        &view[..view.len().min(8)]
    );

    // Mostly known already: only the delta goes out, not the large update again.
    let mut events = whole.subscribe();
    let grown = yrs::Doc::with_client_id(1);
    grown
        .transact_mut()
        .apply_update(Update::decode_v1(&large).unwrap())
        .unwrap();
    let grown_text = grown.get_or_insert_text("t");
    grown_text.push(&mut grown.transact_mut(), "!");
    let again = grown
        .transact()
        .encode_state_as_update_v1(&StateVector::default());
    whole.apply_update(&again).await.unwrap();
    let event = events.try_recv().unwrap();
    assert!(event.update.len() < 1024, "{} bytes", event.update.len());

    agent.shutdown().await.unwrap();
}
