//! Document deletion: replicated tombstones.
//!
//! Deleting a document writes a tombstone into the system document `_devicelink/deleted` (root
//! map `deleted`: document name -> `{at: Unix ms, by: device id}`) and removes the document's
//! records on this device. The tombstones sync like any document, so every device that hears of
//! them, now or when it comes back online, removes its copy too, and from then on ignores sync
//! traffic for that name: a device that was offline during the delete does not bring it back.
//!
//! Writing to a deleted name from an app makes a **new, empty** document: the tombstone is lifted
//! (on every device). Tombstones are kept for [`TOMBSTONE_TTL`]; a device offline for longer may
//! bring an old copy back, as may a device that missed both the deletion and the re-creation.

use std::sync::Arc;
use std::time::Duration;

use yrs::{Any, Map, Out, ReadTxn};

use crate::docs::{DocError, DocRegistry, DELETED_MAP as MAP};

pub use crate::docs::DELETED_DOC;

/// How long a tombstone is kept: 90 days.
pub const TOMBSTONE_TTL: Duration = Duration::from_secs(90 * 24 * 3600);

/// Deletes `name` on every device: tombstone first (durable), then this device's copy.
/// Returns whether this device had it.
pub(crate) async fn delete(registry: &Arc<DocRegistry>, name: &str) -> Result<bool, DocError> {
    crate::store::DocStore::validate_name(name)?;
    let existed = registry.exists(name)?;
    if !existed && !registry.is_deleted(name) {
        return Err(DocError::NotFound(name.to_string()));
    }
    let tombstones = registry.handle(DELETED_DOC)?;
    let map = tombstones.yrs_doc().get_or_insert_map(MAP);
    let by = registry.device_id().to_string();
    tombstones
        .transact(|txn| {
            let mut record = std::collections::HashMap::new();
            record.insert("at".to_string(), Any::from(crate::store::now_ms() as f64));
            record.insert("by".to_string(), Any::from(by));
            map.insert(txn, name, Any::from(record));
        })
        .await?;
    registry.purge(name).await?;
    Ok(existed)
}

/// Keeps this device in line with the tombstones: removes every deleted document it still has
/// (at start and after every change, local or from a peer), and drops tombstones older than
/// [`TOMBSTONE_TTL`]. (Which names are deleted is tracked by the registry itself, and a write to a
/// deleted name lifts its tombstone there.)
pub(crate) async fn keep_tombstones(registry: Arc<DocRegistry>) {
    let doc = match registry.handle(DELETED_DOC) {
        Ok(doc) => doc,
        Err(e) => {
            tracing::error!("cannot open the tombstones document: {e}");
            return;
        }
    };
    let map = doc.yrs_doc().get_or_insert_map(MAP);
    let mut changes = doc.subscribe();
    let mut prune = tokio::time::interval(Duration::from_secs(3600));
    loop {
        let names: Vec<String> = doc.read(|txn| map.keys(txn).map(str::to_string).collect());
        // The agent's own documents are never purged, whatever a tombstone says (§22).
        let names = names
            .into_iter()
            .filter(|n| !n.starts_with(crate::group::RESERVED_PREFIX));
        for name in names {
            match registry.exists(&name) {
                Ok(true) => match registry.purge(&name).await {
                    Ok(_) => tracing::info!(doc = name, "document deleted on another device"),
                    Err(e) => tracing::error!(doc = name, "cannot delete: {e}"),
                },
                Ok(false) => {}
                Err(e) => tracing::error!(doc = name, "cannot check a deleted document: {e}"),
            }
        }
        tokio::select! {
            changed = changes.recv() => match changed {
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            _ = prune.tick() => {
                let cutoff = crate::store::now_ms().saturating_sub(TOMBSTONE_TTL.as_millis() as u64) as f64;
                let old: Vec<String> = doc.read(|txn| {
                    map.iter(txn)
                        .filter(|(_, v)| deleted_at(txn, v).is_some_and(|at| at < cutoff))
                        .map(|(k, _)| k.to_string())
                        .collect()
                });
                if !old.is_empty() {
                    let pruned = doc.transact(|txn| {
                        for name in &old {
                            map.remove(txn, name);
                        }
                    }).await;
                    if let Err(e) = pruned {
                        tracing::warn!("cannot prune old tombstones: {e}");
                    }
                }
            }
        }
    }
}

fn deleted_at<T: ReadTxn>(_txn: &T, value: &Out) -> Option<f64> {
    match value {
        Out::Any(Any::Map(record)) => match record.get("at") {
            Some(Any::Number(yrs::any::Number::Float(at))) => Some(*at),
            Some(Any::Number(yrs::any::Number::Int(at))) => Some(*at as f64),
            _ => None,
        },
        _ => None,
    }
}
