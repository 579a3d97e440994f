//! The blind always-on device: it relays and stores for the group, and holds only ciphertext.
//!
//! A device started with `agent --serve-relay --blind` is paired like any other but recorded
//! in the group as blind. Full members never run a document sync session with it; instead each
//! opens `/devicelink/blind/1.4.0` ([`protocol`]) and exchanges sealed items: [`envelope`]s
//! (document updates and snapshots, encrypted with a key derived from the group's epoch key,
//! signed by their author) and key grants. The blind device ([`store`]) checks signatures and
//! order and keeps items by a keyed hash of the document name; the members ([`member`]) fetch
//! what they lack, upload what it lacks, compact, and rotate keys ([`keyring`]) when a device
//! leaves the group.

pub mod envelope;
pub mod keyring;
pub mod member;
pub mod protocol;
pub mod store;

pub use member::{BackupReport, MemberState};
pub use store::{BlindStore, Holding};

/// The entry a blind device adds to the addresses it gives in pairing (it never parses as a
/// multiaddr, so a device without this feature ignores it).
pub const BLIND_MARK: &str = "devicelink-features:blind";

/// The addresses a device gives in pairing: with the mark when it is blind.
pub(crate) fn marked(mut addrs: Vec<String>, blind: bool) -> Vec<String> {
    if blind {
        addrs.push(BLIND_MARK.to_string());
    }
    addrs
}

/// The addresses a device gave in pairing, without the mark.
pub(crate) fn unmarked(addrs: &[String]) -> Vec<String> {
    addrs.iter().filter(|a| *a != BLIND_MARK).cloned().collect()
}

/// Whether the addresses a device gave in pairing say it is blind.
pub fn is_marked_blind(addrs: &[String]) -> bool {
    addrs.iter().any(|a| a == BLIND_MARK)
}
