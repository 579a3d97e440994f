//! The group's keys: every epoch key the full members have made, in the system document
//! `_devicelink/keys`, which replicates between full members only (a blind device never runs a
//! document sync session, so it never holds it).
//!
//! Root map `epochs`: hex of the key's fingerprint -> `{number, key}` (the number as a decimal
//! string, the key in base64). The
//! current epoch is the highest `(number, fingerprint)`; the key that names documents (the
//! HMAC key of document ids) derives from the lowest, so it never changes and every member
//! computes the same ids. The first full member to pair a blind device makes epoch 1; `unpair`
//! makes the next one (see [`super::member`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine as _;
use hkdf::Hkdf;
use sha2::Sha256;
use yrs::{Any, Map, Out};

use super::envelope::{random_key, Epoch, Key};
use crate::docs::{DocError, DocHandle};

/// The system document holding the group's keys.
pub const KEYS_DOC: &str = "_devicelink/keys";
const MAP: &str = "epochs";

/// The epoch keys a member holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Keyring {
    epochs: BTreeMap<Epoch, Key>,
}

impl Keyring {
    /// Reads every key in the keys document (entries that do not parse are skipped).
    pub fn load(doc: &DocHandle) -> Self {
        let map = doc.yrs_doc().get_or_insert_map(MAP);
        let epochs = doc.read(|txn| {
            map.iter(txn)
                .filter_map(|(_, value)| parse_entry(value))
                .collect()
        });
        Self { epochs }
    }

    pub fn is_empty(&self) -> bool {
        self.epochs.is_empty()
    }

    /// The epoch new envelopes are sealed with.
    pub fn current(&self) -> Option<(Epoch, Key)> {
        self.epochs.iter().next_back().map(|(e, k)| (*e, *k))
    }

    pub fn get(&self, epoch: &Epoch) -> Option<Key> {
        self.epochs.get(epoch).copied()
    }

    /// The key of document ids, from the group's first epoch.
    pub fn name_key(&self) -> Option<Key> {
        let (_, first) = self.epochs.iter().next()?;
        let hkdf = Hkdf::<Sha256>::new(None, first);
        let mut key = [0; 32];
        hkdf.expand(b"devicelink name key 1.4", &mut key)
            .expect("32 bytes is a valid HKDF length");
        Some(key)
    }

    pub fn epochs(&self) -> impl Iterator<Item = &Epoch> {
        self.epochs.keys()
    }
}

fn parse_entry(value: Out) -> Option<(Epoch, Key)> {
    let Out::Any(Any::Map(fields)) = value else {
        return None;
    };
    let Some(Any::String(number)) = fields.get("number") else {
        return None;
    };
    let number: u64 = number.parse().ok()?;
    let Some(Any::String(encoded)) = fields.get("key") else {
        return None;
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded.as_bytes())
        .ok()?;
    let key: Key = bytes.try_into().ok()?;
    Some((Epoch::of(number, &key), key))
}

/// Adds an epoch key (made here or received in a grant). Returns its epoch.
pub async fn add(doc: &DocHandle, number: u64, key: Key) -> Result<Epoch, DocError> {
    let epoch = Epoch::of(number, &key);
    let map = doc.yrs_doc().get_or_insert_map(MAP);
    let id: String = epoch.key_id.iter().map(|b| format!("{b:02x}")).collect();
    let mut fields = std::collections::HashMap::new();
    fields.insert("number".to_string(), Any::from(number.to_string()));
    fields.insert(
        "key".to_string(),
        Any::from(base64::engine::general_purpose::STANDARD.encode(key)),
    );
    doc.transact(|txn| {
        map.insert(txn, id, Any::Map(Arc::new(fields)));
    })
    .await?;
    Ok(epoch)
}

/// The keyring, with a first epoch made if there was none.
pub async fn ensure(doc: &DocHandle) -> Result<Keyring, DocError> {
    let ring = Keyring::load(doc);
    if !ring.is_empty() {
        return Ok(ring);
    }
    add(doc, 1, random_key()).await?;
    Ok(Keyring::load(doc))
}

/// Makes the next epoch (after a device left the group) and returns it with its key.
pub async fn rotate(doc: &DocHandle) -> Result<(Epoch, Key), DocError> {
    let next = Keyring::load(doc)
        .current()
        .map_or(1, |(epoch, _)| epoch.number + 1);
    let key = random_key();
    let epoch = add(doc, next, key).await?;
    Ok((epoch, key))
}
