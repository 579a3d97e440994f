//! The device group: which devices belong to this user, replicated between them as a system
//! document, so pairing one device makes it known to all and `unpair` reaches all.
//!
//! Document `_devicelink/devices`, root map `devices`: device id -> `{name, addrs, removed,
//! relay}`. Each device keeps its own `addrs` current (they include its relayed addresses), and
//! `relay` marks an always-on device serving as the group's relay (`agent --serve-relay`);
//! `pair_slot` and `pair_tag` are the public slot and the lookup tag of a pairing code open on
//! that device (see `net::lookup`).
//! It syncs like any document, so only trusted devices can change it. Each agent reconciles its
//! trust store with it: members are trusted, removed devices are dropped and remembered as
//! revoked. A removed device cannot re-add itself (no member syncs with it); only an explicit new
//! pairing with a member re-admits it (see [`upsert`]).

use std::sync::Arc;

use libp2p::PeerId;
use yrs::{Any, Map, Out, ReadTxn};

use crate::docs::{DocError, DocHandle};
use crate::store::{TrustStore, TrustedDevice};

/// Name of the group document. Names starting with `_devicelink/` are reserved for the agent.
pub const GROUP_DOC: &str = "_devicelink/devices";
pub use crate::docs::RESERVED_PREFIX;
const MAP: &str = "devices";

/// One member as stored in the group document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: PeerId,
    pub name: String,
    pub addrs: Vec<String>,
    pub removed: bool,
    /// It serves as a relay for the group.
    pub relay: bool,
    /// A blind device: it stores only ciphertext and never gets a key (see [`crate::blind`]).
    pub blind: bool,
    /// The slot and the lookup tag of the pairing code open on it now, if any.
    pub pair_slot: Option<u16>,
    pub pair_tag: Option<String>,
}

/// Adds or refreshes members. A removed one is not resurrected, except those in `readmit`: a
/// device the user has just paired again, explicitly. Those in `blind` are recorded as blind
/// devices serving as the group's relay, in the same change (no member ever sees them
/// unmarked).
pub async fn upsert(
    doc: &DocHandle,
    members: &[(PeerId, String, Vec<String>)],
    readmit: &[PeerId],
    blind: &[PeerId],
) -> Result<(), DocError> {
    let map = doc.yrs_doc().get_or_insert_map(MAP);
    doc.transact(|txn| {
        for (id, name, addrs) in members {
            let key = id.to_string();
            let old = read_member(txn, &map, &key);
            if !readmit.contains(id) && old.as_ref().is_some_and(|m| m.removed) {
                continue;
            }
            let (mut relay, mut is_blind) = old.map_or((false, false), |m| (m.relay, m.blind));
            if blind.contains(id) {
                (relay, is_blind) = (true, true);
            }
            let mut value = entry(name, addrs, false, relay, None);
            set_blind(&mut value, is_blind);
            map.insert(txn, key, value);
        }
    })
    .await
}

/// Marks a device removed (a tombstone that replicates to every member).
pub async fn remove(doc: &DocHandle, id: PeerId, name: &str) -> Result<(), DocError> {
    let map = doc.yrs_doc().get_or_insert_map(MAP);
    doc.transact(|txn| {
        map.insert(txn, id.to_string(), entry(name, &[], true, false, None));
    })
    .await
}

fn set_blind(value: &mut Any, blind: bool) {
    if let (Any::Map(fields), true) = (value, blind) {
        Arc::make_mut(fields).insert("blind".to_string(), Any::Bool(true));
    }
}

/// What a device says about itself in its group entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfEntry<'a> {
    pub name: &'a str,
    pub addrs: &'a [String],
    pub relay: bool,
    pub pair_slot: Option<u16>,
    pub pair_tag: Option<String>,
}

/// Keeps this device's own entry current (addresses, relay, open pairing slot). Does
/// nothing when the entry says the same already, when this device is not in the group (never
/// paired) or was removed from it. Returns whether it wrote.
pub async fn publish_self(
    doc: &DocHandle,
    me: PeerId,
    wanted: SelfEntry<'_>,
) -> Result<bool, DocError> {
    let map = doc.yrs_doc().get_or_insert_map(MAP);
    let key = me.to_string();
    let current = doc.read(|txn| read_member(txn, &map, &key));
    match current {
        Some(m)
            if !m.removed
                && (m.addrs != wanted.addrs
                    || m.relay != wanted.relay
                    || m.name != wanted.name
                    || m.pair_slot != wanted.pair_slot
                    || m.pair_tag != wanted.pair_tag) => {}
        _ => return Ok(false),
    }
    doc.transact(|txn| {
        let value = entry(
            wanted.name,
            wanted.addrs,
            false,
            wanted.relay,
            wanted.pair_slot.zip(wanted.pair_tag.as_deref()),
        );
        map.insert(txn, key, value);
    })
    .await?;
    Ok(true)
}

/// Members serving as a relay (not removed, not `me`), with their addresses.
pub fn relays(doc: &DocHandle, me: PeerId) -> Vec<(PeerId, Vec<String>)> {
    members(doc)
        .into_iter()
        .filter(|m| m.relay && !m.removed && m.id != me)
        .map(|m| (m.id, m.addrs))
        .collect()
}

fn entry(
    name: &str,
    addrs: &[String],
    removed: bool,
    relay: bool,
    pairing: Option<(u16, &str)>,
) -> Any {
    let mut m = std::collections::HashMap::new();
    m.insert("name".to_string(), Any::from(name));
    m.insert(
        "addrs".to_string(),
        Any::Array(addrs.iter().map(|a| Any::from(a.as_str())).collect()),
    );
    m.insert("removed".to_string(), Any::Bool(removed));
    if relay {
        m.insert("relay".to_string(), Any::Bool(true));
    }
    if let Some((slot, tag)) = pairing {
        m.insert("pair_slot".to_string(), Any::from(f64::from(slot)));
        m.insert("pair_tag".to_string(), Any::from(tag));
    }
    Any::Map(Arc::new(m))
}

fn read_member<T: ReadTxn>(txn: &T, map: &yrs::MapRef, key: &str) -> Option<Member> {
    let id: PeerId = key.parse().ok()?;
    let Some(Out::Any(Any::Map(fields))) = map.get(txn, key) else {
        return None;
    };
    let text = |k: &str| match fields.get(k) {
        Some(Any::String(s)) => s.to_string(),
        _ => String::new(),
    };
    let addrs = match fields.get("addrs") {
        Some(Any::Array(items)) => items
            .iter()
            .filter_map(|a| match a {
                Any::String(s) => Some(s.to_string()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    Some(Member {
        id,
        name: text("name"),
        addrs,
        removed: matches!(fields.get("removed"), Some(Any::Bool(true))),
        relay: matches!(fields.get("relay"), Some(Any::Bool(true))),
        blind: matches!(fields.get("blind"), Some(Any::Bool(true))),
        pair_slot: match fields.get("pair_slot") {
            Some(Any::Number(n)) => n.as_i64().and_then(|n| u16::try_from(n).ok()),
            _ => None,
        },
        pair_tag: match fields.get("pair_tag") {
            Some(Any::String(tag)) => Some(tag.to_string()),
            _ => None,
        },
    })
}

/// Whether `id` is marked removed in the group.
pub fn is_removed(doc: &DocHandle, id: PeerId) -> bool {
    let map = doc.yrs_doc().get_or_insert_map(MAP);
    doc.read(|txn| read_member(txn, &map, &id.to_string()))
        .is_some_and(|m| m.removed)
}

/// Every member in the document.
pub fn members(doc: &DocHandle) -> Vec<Member> {
    let map = doc.yrs_doc().get_or_insert_map(MAP);
    doc.read(|txn| {
        map.keys(txn)
            .filter_map(|key| read_member(txn, &map, key))
            .collect()
    })
}

/// What reconciling changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    pub trusted: Vec<PeerId>,
    pub revoked: Vec<PeerId>,
    /// This device itself was removed from the group.
    pub removed_self: bool,
}

/// Brings the trust store in line with the group document.
pub fn reconcile(doc: &DocHandle, trust: &TrustStore, me: PeerId) -> Reconciled {
    let mut out = Reconciled::default();
    for member in members(doc) {
        if member.id == me {
            out.removed_self |= member.removed;
            continue;
        }
        if member.blind && !trust.is_blind(&member.id) {
            if let Err(e) = trust.set_blind(&member.id) {
                tracing::error!(device = %member.id, "cannot record it as blind: {e}");
                continue;
            }
            // The network ends a sync session it may have with it (see `enforce_trust`).
            out.trusted.push(member.id);
        }
        if member.removed {
            if !trust.is_revoked(&member.id) || trust.is_trusted(&member.id) {
                if let Err(e) = trust.revoke(&member.id) {
                    tracing::error!(device = %member.id, "cannot revoke: {e}");
                    continue;
                }
                out.revoked.push(member.id);
            }
        } else if trust.is_trusted(&member.id) {
            // Its own current addresses (relayed ones included) are how to reach it.
            if let Err(e) = trust.add_addrs(&member.id, &member.addrs) {
                tracing::warn!(device = %member.id, "cannot remember its addresses: {e}");
            }
        } else if !trust.is_revoked(&member.id) {
            let mut device = TrustedDevice::new(member.name.clone());
            device.addrs = member.addrs.clone();
            match trust.add(member.id, device) {
                Ok(()) => out.trusted.push(member.id),
                Err(e) => tracing::error!(device = %member.id, "cannot trust group member: {e}"),
            }
        }
    }
    out
}
