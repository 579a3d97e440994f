//! What a blind device keeps: sealed envelopes and key grants, numbered in arrival order, in
//! sled. It checks signatures and order, never content (it has no key).
//!
//! Trees: `blind_items` (index -> item), `blind_doc_items` (document id + index), `blind_heads`
//! (document id + author -> last sequence, kept after compaction so a replay stays refused),
//! `blind_snapshots` (document id -> index and bytes of its snapshot), `blind_held` (document id
//! -> how many updates beyond the snapshot, and their bytes: kept as they change, so an upload's
//! answer costs no scan), `blind_meta` (`next`: the next index; indexes are never reused, so a
//! member's "everything after N" stays exact).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::envelope::{DocId, Envelope, KeyGrant, Kind, SealError};
use crate::store::StoreError;

/// Bytes of items read from the store at once (one item may exceed it).
pub const READ_BUDGET: usize = 8 << 20;

/// One stored object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Item {
    Envelope(Envelope),
    Grant(KeyGrant),
}

impl Item {
    fn author(&self) -> &[u8] {
        match self {
            Item::Envelope(e) => &e.author,
            Item::Grant(g) => &g.from,
        }
    }

    /// Whether `peer` is sent this item: envelopes go to every member but their author,
    /// grants only to the member they are sealed to.
    pub fn is_for(&self, peer: &PeerId) -> bool {
        let peer = peer.to_bytes();
        match self {
            Item::Envelope(e) => e.author != peer,
            Item::Grant(g) => g.to == peer,
        }
    }
}

/// Why the blind device refused an item (sent back to the member, with what to do).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    #[error("not signed by the device that sent it: {0}")]
    Forged(String),
    #[error(
        "sequence {got} of this document and author is already held (replayed); next is {expected}"
    )]
    Replayed { got: u64, expected: u64 },
    #[error("sequence {got} skips ahead (reordered or lost); next is {expected}")]
    OutOfOrder { got: u64, expected: u64 },
    #[error("the snapshot misses updates held here: {0}")]
    SnapshotMissesUpdates(String),
    #[error("the snapshot adds nothing to the one held")]
    StaleSnapshot,
    #[error("the blind device's store failed: {0}")]
    Store(String),
}

impl From<SealError> for Refusal {
    fn from(e: SealError) -> Self {
        Refusal::Forged(e.to_string())
    }
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Self {
        Refusal::Store(e.to_string())
    }
}

impl From<sled::Error> for Refusal {
    fn from(e: sled::Error) -> Self {
        Refusal::Store(e.to_string())
    }
}

/// What an accepted item left on the blind device for its document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    pub index: u64,
    /// Updates held for the document beyond its snapshot, and their bytes.
    pub held_updates: u64,
    pub held_bytes: u64,
    /// Bytes of the document's snapshot (0 if none).
    pub snapshot_bytes: u64,
    /// The last sequence held of each author of the document.
    pub heads: Vec<(Vec<u8>, u64)>,
}

/// What one member's items take on the blind device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holding {
    pub envelopes: u64,
    pub snapshots: u64,
    /// Bytes of the snapshots among `bytes`.
    pub snapshot_bytes: u64,
    pub grants: u64,
    pub bytes: u64,
}

/// The blind device's storage.
#[derive(Clone)]
pub struct BlindStore {
    db: sled::Db,
    items: sled::Tree,
    doc_items: sled::Tree,
    heads: sled::Tree,
    snapshots: sled::Tree,
    held: sled::Tree,
    meta: sled::Tree,
    /// Serializes writers: an order check and its write are one step.
    write: Arc<Mutex<()>>,
    head: Arc<watch::Sender<u64>>,
    /// Pairing codes open on members (device, slot, lookup tag), as the last member told:
    /// in memory only.
    open_codes: Arc<Mutex<Vec<(PeerId, u16, String)>>>,
}

impl BlindStore {
    pub fn open(db: &sled::Db) -> Result<Self, StoreError> {
        let meta = db.open_tree("blind_meta")?;
        let next = read_u64(meta.get("next")?.as_deref()).unwrap_or(1);
        let (head, _) = watch::channel(next.saturating_sub(1));
        Ok(Self {
            db: db.clone(),
            items: db.open_tree("blind_items")?,
            doc_items: db.open_tree("blind_doc_items")?,
            heads: db.open_tree("blind_heads")?,
            held: db.open_tree("blind_held")?,
            snapshots: db.open_tree("blind_snapshots")?,
            meta,
            write: Arc::new(Mutex::new(())),
            head: Arc::new(head),
            open_codes: Arc::default(),
        })
    }

    pub fn set_open_codes(&self, codes: Vec<(PeerId, u16, String)>) {
        *self.open_codes.lock().unwrap_or_else(|p| p.into_inner()) = codes;
    }

    pub fn open_codes(&self) -> Vec<(PeerId, u16, String)> {
        self.open_codes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The index of the last item stored, watched: it changes whenever one is.
    pub fn watch_head(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    /// Stores `member`'s update envelope if it is signed by `member` and is the next of its
    /// document and author.
    pub fn put(&self, member: &PeerId, envelope: Envelope) -> Result<Stored, Refusal> {
        check_envelope(member, &envelope, Kind::Update)?;
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let head_key = head_key(&envelope.doc, &envelope.author);
        let last = read_u64(self.heads.get(&head_key)?.as_deref()).unwrap_or(0);
        let expected = last + 1;
        if envelope.seq < expected {
            return Err(Refusal::Replayed {
                got: envelope.seq,
                expected,
            });
        }
        if envelope.seq > expected {
            return Err(Refusal::OutOfOrder {
                got: envelope.seq,
                expected,
            });
        }
        let doc = envelope.doc;
        let (index, len) = self.insert(&Item::Envelope(envelope))?;
        self.doc_items.insert(doc_index_key(&doc, index), &[])?;
        self.heads.insert(head_key, &expected.to_be_bytes())?;
        let (count, bytes) = self.held_of(&doc)?;
        self.held.insert(doc, pair(count + 1, bytes + len))?;
        self.db.flush()?;
        self.head.send_replace(index);
        self.describe(&doc, index)
    }

    /// Replaces the document's updates by `envelope`, a snapshot, if it covers every update
    /// held (compare and swap); what it covers is dropped.
    pub fn put_snapshot(&self, member: &PeerId, envelope: Envelope) -> Result<Stored, Refusal> {
        check_envelope(member, &envelope, Kind::Snapshot)?;
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let doc = envelope.doc;
        let covers: BTreeMap<&[u8], u64> = envelope
            .covers
            .iter()
            .map(|(a, s)| (a.as_slice(), *s))
            .collect();
        for (author, last) in self.heads(&doc)? {
            let covered = covers.get(author.as_slice()).copied().unwrap_or(0);
            if covered < last {
                let who = PeerId::from_bytes(&author).map_or("?".into(), |p| p.to_string());
                return Err(Refusal::SnapshotMissesUpdates(format!(
                    "device {who}: updates up to {last} held, the snapshot covers {covered}"
                )));
            }
        }
        let old = self.snapshot_of(&doc)?;
        if let Some(Item::Envelope(old)) = &old {
            if old.covers == envelope.covers && old.epoch >= envelope.epoch {
                return Err(Refusal::StaleSnapshot);
            }
        }
        let (index, len) = self.insert(&Item::Envelope(envelope))?;
        // Everything held before it is covered: the updates (checked above) and the old
        // snapshot.
        let mut batch = sled::Batch::default();
        let mut doc_batch = sled::Batch::default();
        for key in self.doc_items.scan_prefix(doc).keys() {
            let key = key?;
            let Some(old_index) = read_u64(key.get(32..)) else {
                continue;
            };
            if old_index != index {
                batch.remove(&old_index.to_be_bytes());
                doc_batch.remove(key);
            }
        }
        self.items.apply_batch(batch)?;
        self.doc_items.apply_batch(doc_batch)?;
        self.doc_items.insert(doc_index_key(&doc, index), &[])?;
        self.snapshots.insert(doc, pair(index, len))?;
        self.held.insert(doc, pair(0, 0))?;
        self.db.flush()?;
        self.head.send_replace(index);
        self.describe(&doc, index)
    }

    /// Stores a key grant from `member`.
    pub fn put_grant(&self, member: &PeerId, grant: KeyGrant) -> Result<u64, Refusal> {
        check_author(member, grant.verify()?)?;
        grant.to()?;
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let (index, _) = self.insert(&Item::Grant(grant))?;
        self.db.flush()?;
        self.head.send_replace(index);
        Ok(index)
    }

    /// Items after index `after`, oldest first, at most `limit` of them and about
    /// [`READ_BUDGET`] bytes, with the last index read (items skipped by `keep` count as read).
    pub fn after(
        &self,
        after: u64,
        limit: usize,
        keep: impl Fn(&Item) -> bool,
    ) -> Result<(Vec<(u64, Item)>, u64), StoreError> {
        let mut out = Vec::new();
        let mut last = after;
        let mut bytes = 0;
        for entry in self.items.range((after + 1).to_be_bytes()..) {
            let (key, value) = entry?;
            if bytes >= READ_BUDGET {
                break;
            }
            bytes += value.len();
            let Some(index) = read_u64(Some(&key)) else {
                continue;
            };
            last = index;
            match postcard::from_bytes::<Item>(&value) {
                Ok(item) if keep(&item) => out.push((index, item)),
                Ok(_) => {}
                Err(e) => tracing::error!(index, "a stored blind item does not decode: {e}"),
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok((out, last))
    }

    /// What each member's items take, by device id.
    pub fn holdings(&self) -> Result<BTreeMap<String, Holding>, StoreError> {
        let mut out: BTreeMap<String, Holding> = BTreeMap::new();
        for entry in self.items.iter() {
            let (_, value) = entry?;
            let Ok(item) = postcard::from_bytes::<Item>(&value) else {
                continue;
            };
            let who = PeerId::from_bytes(item.author()).map_or("?".into(), |p| p.to_string());
            let holding = out.entry(who).or_default();
            holding.bytes += value.len() as u64;
            match &item {
                Item::Envelope(e) if e.kind == Kind::Snapshot => {
                    holding.snapshots += 1;
                    holding.snapshot_bytes += value.len() as u64;
                }
                Item::Envelope(_) => holding.envelopes += 1,
                Item::Grant(_) => holding.grants += 1,
            }
        }
        Ok(out)
    }

    /// Documents (by id only) held.
    pub fn doc_count(&self) -> usize {
        self.heads
            .iter()
            .keys()
            .filter_map(|k| k.ok())
            .map(|k| k.get(..32).map(<[u8]>::to_vec))
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    }

    /// Stores `item` under the next index; returns the index and the bytes it takes.
    fn insert(&self, item: &Item) -> Result<(u64, u64), Refusal> {
        let next = read_u64(self.meta.get("next")?.as_deref()).unwrap_or(1);
        let bytes = postcard::to_allocvec(item).map_err(|e| Refusal::Store(e.to_string()))?;
        let len = bytes.len() as u64;
        self.items.insert(next.to_be_bytes(), bytes)?;
        self.meta.insert("next", &(next + 1).to_be_bytes())?;
        Ok((next, len))
    }

    /// Updates held for `doc` beyond its snapshot: how many, and their bytes.
    fn held_of(&self, doc: &DocId) -> Result<(u64, u64), StoreError> {
        Ok(read_pair(self.held.get(doc)?.as_deref()).unwrap_or((0, 0)))
    }

    pub fn heads(&self, doc: &DocId) -> Result<Vec<(Vec<u8>, u64)>, StoreError> {
        let mut out = Vec::new();
        for entry in self.heads.scan_prefix(doc) {
            let (key, value) = entry?;
            if let (Some(author), Some(seq)) = (key.get(32..), read_u64(Some(&value))) {
                out.push((author.to_vec(), seq));
            }
        }
        Ok(out)
    }

    /// The document's snapshot: its index, the item, and the bytes it takes.
    /// The document's snapshot, decoded.
    fn snapshot_of(&self, doc: &DocId) -> Result<Option<Item>, StoreError> {
        let Some((index, _)) = read_pair(self.snapshots.get(doc)?.as_deref()) else {
            return Ok(None);
        };
        let item = self.items.get(index.to_be_bytes())?;
        Ok(item.and_then(|bytes| postcard::from_bytes(&bytes).ok()))
    }

    fn describe(&self, doc: &DocId, index: u64) -> Result<Stored, Refusal> {
        let (_, snapshot_bytes) = read_pair(self.snapshots.get(doc)?.as_deref()).unwrap_or((0, 0));
        let (held_updates, held_bytes) = self.held_of(doc)?;
        Ok(Stored {
            index,
            held_updates,
            held_bytes,
            snapshot_bytes,
            heads: self.heads(doc)?,
        })
    }
}

/// An upload of `kind` from `member`: signed by `member` itself.
fn check_envelope(member: &PeerId, envelope: &Envelope, kind: Kind) -> Result<(), Refusal> {
    check_author(member, envelope.verify()?)?;
    match (envelope.kind, kind) {
        (Kind::Update, Kind::Update) | (Kind::Snapshot, Kind::Snapshot) => Ok(()),
        (_, Kind::Update) => Err(Refusal::Forged("a snapshot sent as an update".into())),
        (_, Kind::Snapshot) => Err(Refusal::Forged("an update sent as a snapshot".into())),
    }
}

fn check_author(member: &PeerId, author: PeerId) -> Result<(), Refusal> {
    if &author == member {
        Ok(())
    } else {
        Err(Refusal::Forged(format!(
            "signed by {author}, sent by {member}: a member uploads only its own items"
        )))
    }
}

fn head_key(doc: &DocId, author: &[u8]) -> Vec<u8> {
    let mut key = doc.to_vec();
    key.extend_from_slice(author);
    key
}

fn doc_index_key(doc: &DocId, index: u64) -> Vec<u8> {
    let mut key = doc.to_vec();
    key.extend_from_slice(&index.to_be_bytes());
    key
}

/// Two numbers as one value (16 bytes, big-endian).
fn pair(a: u64, b: u64) -> Vec<u8> {
    [a.to_be_bytes(), b.to_be_bytes()].concat()
}

fn read_pair(bytes: Option<&[u8]>) -> Option<(u64, u64)> {
    let bytes = bytes?;
    Some((read_u64(bytes.get(..8))?, read_u64(bytes.get(8..16))?))
}

fn read_u64(bytes: Option<&[u8]>) -> Option<u64> {
    Some(u64::from_be_bytes(bytes?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use libp2p::identity::Keypair;

    use super::*;
    use crate::blind::envelope::{doc_id, random_key, sealed_update, Content, Epoch};

    fn update(author: &Keypair, key: &[u8; 32], seq: u64) -> Envelope {
        sealed_update(author, key, key, seq, vec![seq as u8; 100])
    }

    #[test]
    fn refuses_forged_replayed_and_reordered_updates() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlindStore::open(&sled::open(dir.path()).unwrap()).unwrap();
        let (laptop, phone) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let laptop_id = laptop.public().to_peer_id();
        let key = random_key();
        let first = update(&laptop, &key, 1);
        assert_eq!(store.put(&laptop_id, first.clone()).unwrap().index, 1);
        // Replayed: the same envelope again.
        assert!(matches!(
            store.put(&laptop_id, first),
            Err(Refusal::Replayed {
                got: 1,
                expected: 2
            })
        ));
        // Reordered: 3 before 2.
        assert!(matches!(
            store.put(&laptop_id, update(&laptop, &key, 3)),
            Err(Refusal::OutOfOrder {
                got: 3,
                expected: 2
            })
        ));
        // Forged: the phone uploads as the laptop, or a header was changed.
        let mut forged = update(&phone, &key, 2);
        forged.author = laptop_id.to_bytes();
        assert!(matches!(
            store.put(&laptop_id, forged),
            Err(Refusal::Forged(_))
        ));
        assert!(matches!(
            store.put(&phone.public().to_peer_id(), update(&laptop, &key, 2)),
            Err(Refusal::Forged(_))
        ));
        assert_eq!(
            store
                .put(&laptop_id, update(&laptop, &key, 2))
                .unwrap()
                .index,
            2
        );
    }

    #[test]
    fn snapshot_replaces_only_what_it_covers() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlindStore::open(&sled::open(dir.path()).unwrap()).unwrap();
        let laptop = Keypair::generate_ed25519();
        let id = laptop.public().to_peer_id();
        let key = random_key();
        for seq in 1..=10 {
            store.put(&id, update(&laptop, &key, seq)).unwrap();
        }
        let snapshot = |covers: u64| {
            let content = Content {
                name: "notes".into(),
                update: vec![0; 300],
            };
            Envelope::seal(
                &laptop,
                Kind::Snapshot,
                doc_id(&key, "notes"),
                0,
                Epoch::of(1, &key),
                &key,
                vec![(id.to_bytes(), covers)],
                &content,
            )
            .unwrap()
        };
        assert!(matches!(
            store.put_snapshot(&id, snapshot(9)),
            Err(Refusal::SnapshotMissesUpdates(_))
        ));
        let stored = store.put_snapshot(&id, snapshot(10)).unwrap();
        assert_eq!(stored.held_updates, 0);
        assert!(stored.snapshot_bytes > 300, "{stored:?}");
        let (items, last) = store.after(0, 100, |_| true).unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(last, 11);
        assert_eq!(
            store.put_snapshot(&id, snapshot(10)),
            Err(Refusal::StaleSnapshot)
        );
        // Sequences stay: a replay of update 10 is still refused after compaction.
        assert!(matches!(
            store.put(&id, update(&laptop, &key, 10)),
            Err(Refusal::Replayed { .. })
        ));
    }
}
