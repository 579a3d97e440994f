//! What it means for two replicas to hold the same document.
//!
//! Two devices have converged when their documents have the same state vector (they hold the
//! same changes), the same delete set (the same of them deleted) and the same content (every
//! root as JSON, text roots with their formatting). The encoded state is **not** compared: Yjs
//! squashes adjacent items of one client into one (for example when a document is loaded from a
//! compacted snapshot), so two converged replicas can encode the same content differently.

use std::collections::BTreeMap;

use yrs::{ReadTxn, Transact};

/// Where two documents differ (the first difference found, in the order below).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Divergence {
    #[error("state vectors differ: {0} vs {1}")]
    StateVector(String, String),
    #[error("delete sets differ: {0} vs {1}")]
    DeleteSet(String, String),
    #[error("content differs: {0} vs {1}")]
    Content(String, String),
}

/// `Ok` when `a` and `b` hold the same document (see the module docs), else the first
/// difference.
pub fn compare(a: &yrs::Doc, b: &yrs::Doc) -> Result<(), Divergence> {
    let (fa, fb) = (Fingerprint::of(a), Fingerprint::of(b));
    if fa.state_vector != fb.state_vector {
        return Err(Divergence::StateVector(
            format!("{:?}", fa.state_vector),
            format!("{:?}", fb.state_vector),
        ));
    }
    if fa.deleted != fb.deleted {
        return Err(Divergence::DeleteSet(
            format!("{:?}", fa.deleted),
            format!("{:?}", fb.deleted),
        ));
    }
    if fa.content != fb.content {
        return Err(Divergence::Content(
            fa.content.to_string(),
            fb.content.to_string(),
        ));
    }
    Ok(())
}

/// The parts of a document that converged replicas share, independent of squashing.
#[derive(Debug, PartialEq, Eq)]
struct Fingerprint {
    state_vector: BTreeMap<u64, u32>,
    /// Deleted clock ranges per client, sorted and merged.
    deleted: BTreeMap<u64, Vec<(u32, u32)>>,
    content: serde_json::Value,
}

impl Fingerprint {
    fn of(doc: &yrs::Doc) -> Self {
        let txn = doc.transact();
        let snapshot = txn.snapshot();
        let state_vector = snapshot
            .state_map
            .iter()
            .map(|(client, clock)| (client.get(), *clock))
            .collect();
        let mut deleted = BTreeMap::new();
        for (client, ranges) in snapshot.delete_set.iter() {
            let mut list: Vec<(u32, u32)> = ranges.iter().map(|r| (r.start, r.end)).collect();
            list.sort_unstable();
            let mut merged: Vec<(u32, u32)> = Vec::with_capacity(list.len());
            for (start, end) in list {
                match merged.last_mut() {
                    Some(last) if start <= last.1 => last.1 = last.1.max(end),
                    _ => merged.push((start, end)),
                }
            }
            if !merged.is_empty() {
                deleted.insert(client.get(), merged);
            }
        }
        drop(txn);
        Self {
            state_vector,
            deleted,
            content: content(doc),
        }
    }
}

/// Every root as JSON; text roots as their formatted runs (text and attributes).
fn content(doc: &yrs::Doc) -> serde_json::Value {
    use yrs::types::text::YChange;
    use yrs::Text;
    let mut view = crate::docs::doc_to_json(doc);
    let txn = doc.transact();
    // Text roots by declared type or, for roots only received from others, by content.
    let texts: Vec<(String, yrs::TextRef)> = txn
        .root_refs()
        .map(|(name, _)| name.to_string())
        .filter(|name| crate::docs::root_kind(&txn, name) == Some(crate::docs::RootKind::Text))
        .filter_map(|name| txn.get_text(name.as_str()).map(|text| (name, text)))
        .collect();
    if let serde_json::Value::Object(roots) = &mut view {
        for (name, text) in texts {
            let runs: Vec<serde_json::Value> = text
                .diff(&txn, YChange::identity)
                .into_iter()
                .map(|run| {
                    let attributes: BTreeMap<String, String> = run
                        .attributes
                        .iter()
                        .flat_map(|attrs| attrs.iter())
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect();
                    serde_json::json!({
                        "insert": run.insert.to_string(&txn),
                        "attributes": attributes,
                    })
                })
                .collect();
            // An empty text is left out, as in the JSON view (whether a root was declared is
            // not stored, so an emptied text reads the same as one never used).
            if !runs.is_empty() {
                roots.insert(
                    format!("{name} (formatted)"),
                    serde_json::Value::Array(runs),
                );
            }
        }
    }
    view
}

#[cfg(test)]
mod tests {
    use super::*;
    use yrs::updates::decoder::Decode;
    use yrs::{GetString, Map, Text, Update};

    fn doc_with_client(client: u64) -> yrs::Doc {
        yrs::Doc::with_client_id(client)
    }

    fn apply(doc: &yrs::Doc, update: &[u8]) {
        let update = Update::decode_v1(update).unwrap();
        doc.transact_mut().apply_update(update).unwrap();
    }

    fn encode(doc: &yrs::Doc) -> Vec<u8> {
        doc.transact()
            .encode_state_as_update_v1(&yrs::StateVector::default())
    }

    /// Client 3 types "hello brave world", another device deletes "brave ", client 3 sets a
    /// title. Returns (a replica that got the updates one by one and keeps deleted content, one
    /// loaded from the writer's snapshot, where deleted content is collected into placeholder
    /// items and squashed with its neighbours): the same document, encoded differently.
    fn two_replicas() -> (yrs::Doc, yrs::Doc) {
        let writer = doc_with_client(3);
        let text = writer.get_or_insert_text("body");
        let mut updates = Vec::new();
        for (at, piece) in [(0, "hello "), (6, "brave "), (12, "world")] {
            let mut txn = writer.transact_mut();
            text.insert(&mut txn, at, piece);
            updates.push(txn.encode_update_v1());
        }
        let editor = doc_with_client(4);
        for update in &updates {
            apply(&editor, update);
        }
        {
            let text = editor.get_or_insert_text("body");
            let mut txn = editor.transact_mut();
            text.remove_range(&mut txn, 8, 1); // "a"
            updates.push(txn.encode_update_v1());
        }
        {
            let text = editor.get_or_insert_text("body");
            let mut txn = editor.transact_mut();
            text.remove_range(&mut txn, 6, 5); // the rest of "brave "
            updates.push(txn.encode_update_v1());
        }
        for update in &updates[3..] {
            apply(&writer, update);
        }
        let map = writer.get_or_insert_map("meta");
        {
            let mut txn = writer.transact_mut();
            map.insert(&mut txn, "title", "Greeting");
            updates.push(txn.encode_update_v1());
        }
        let live = yrs::Doc::with_options(yrs::Options {
            skip_gc: true,
            ..yrs::Options::with_client_id(yrs::ClientID::new(10))
        });
        for update in &updates {
            apply(&live, update);
        }
        let loaded = doc_with_client(11);
        apply(&loaded, &encode(&writer));
        (live, loaded)
    }

    #[test]
    fn differently_squashed_replicas_are_the_same_document() {
        let (live, loaded) = two_replicas();
        assert_eq!(
            live.get_or_insert_text("body").get_string(&live.transact()),
            "hello world"
        );
        assert_eq!(
            loaded
                .get_or_insert_text("body")
                .get_string(&loaded.transact()),
            "hello world"
        );
        assert_ne!(
            encode(&live),
            encode(&loaded),
            "the test needs two encodings of one document (squashed differently)"
        );
        assert_eq!(compare(&live, &loaded), Ok(()));
    }

    #[test]
    fn a_missing_insert_or_deletion_is_a_divergence() {
        let (live, loaded) = two_replicas();
        // One more insert on one side only.
        let text = loaded.get_or_insert_text("body");
        text.insert(&mut loaded.transact_mut(), 0, ">");
        assert!(matches!(
            compare(&live, &loaded),
            Err(Divergence::StateVector(..))
        ));
        // The same inserts, but a deletion on one side only.
        let (live, loaded) = two_replicas();
        let text = live.get_or_insert_text("body");
        let writer_of_delete = doc_with_client(12);
        apply(&writer_of_delete, &encode(&live));
        let delete = {
            let text = writer_of_delete.get_or_insert_text("body");
            let mut txn = writer_of_delete.transact_mut();
            text.remove_range(&mut txn, 0, 1);
            txn.encode_update_v1()
        };
        apply(&live, &delete);
        assert_eq!(text.get_string(&live.transact()), "ello world");
        assert!(matches!(
            compare(&live, &loaded),
            Err(Divergence::DeleteSet(..))
        ));
    }

    #[test]
    fn formatting_counts_as_content() {
        let (a, b) = two_replicas();
        let (fa, fb) = (Fingerprint::of(&a), Fingerprint::of(&b));
        assert_eq!(fa.content, fb.content);
        assert!(fa.content.get("body (formatted)").is_some());
    }
}
