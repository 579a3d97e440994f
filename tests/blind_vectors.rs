//! Test vectors of the blind store's sealed forms (`protocol/vectors/blind/`, protocol/README.md
//! §28), checked against the code: made from fixed keys and nonces, each file equals what
//! sealing gives, opens to the stated content with the stated key, and fails to open when one
//! byte of its header or ciphertext changes.
//!
//! Regenerate after an intentional format change with
//! `DEVICELINK_WRITE_VECTORS=1 cargo test --test blind_vectors`, then update §28.

use std::path::PathBuf;

use devicelink::blind::envelope::{
    doc_id, Content, Envelope, Epoch, Granted, Key, KeyGrant, Kind, SealError,
};
use libp2p::identity::Keypair;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("protocol/vectors/blind")
}

fn writing() -> bool {
    std::env::var("DEVICELINK_WRITE_VECTORS").is_ok_and(|v| v == "1")
}

/// The example devices: Ed25519 keys with secrets `01` x 32 (laptop) and `02` x 32 (phone).
fn device(byte: u8) -> Keypair {
    Keypair::ed25519_from_bytes([byte; 32]).unwrap()
}

const EPOCH_KEY: Key = [0x11; 32];
const NAME_KEY: Key = [0x22; 32];

fn check(name: &str, bytes: &[u8]) {
    let path = dir().join(name);
    if writing() {
        std::fs::create_dir_all(dir()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        return;
    }
    let stored = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(stored, bytes, "{name} differs from what sealing gives");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn document_id_vector() {
    // HMAC-SHA256(name key, "devicelink doc id 1.4\0" || name), as hex.
    check(
        "doc_id_notes.hex",
        hex(&doc_id(&NAME_KEY, "notes")).as_bytes(),
    );
}

#[test]
fn update_and_snapshot_envelope_vectors() {
    let laptop = device(1);
    let doc = doc_id(&NAME_KEY, "notes");
    let epoch = Epoch::of(1, &EPOCH_KEY);
    // A Yjs update: the empty update (no structs, empty delete set) is enough for the format.
    let content = Content {
        name: "notes".into(),
        update: vec![0, 0],
    };
    let update = Envelope::seal_with_nonce(
        &laptop,
        Kind::Update,
        doc,
        1,
        epoch,
        &EPOCH_KEY,
        vec![],
        &content,
        [0x33; 24],
    )
    .unwrap();
    let covers = vec![(laptop.public().to_peer_id().to_bytes(), 1)];
    let snapshot = Envelope::seal_with_nonce(
        &laptop,
        Kind::Snapshot,
        doc,
        0,
        epoch,
        &EPOCH_KEY,
        covers,
        &content,
        [0x44; 24],
    )
    .unwrap();
    for (name, envelope) in [
        ("envelope_update.bin", &update),
        ("envelope_snapshot.bin", &snapshot),
    ] {
        let bytes = postcard::to_allocvec(envelope).unwrap();
        check(name, &bytes);
        let decoded: Envelope = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(decoded.open(&EPOCH_KEY, &NAME_KEY).unwrap(), content);
        assert_eq!(decoded.verify().unwrap(), laptop.public().to_peer_id());
        // Every header field is bound: a changed sequence, epoch or cover fails the signature.
        let mut moved = decoded.clone();
        moved.seq += 1;
        assert_eq!(
            moved.open(&EPOCH_KEY, &NAME_KEY),
            Err(SealError::BadSignature)
        );
        let mut flipped = decoded.clone();
        let last = flipped.ciphertext.len() - 1;
        flipped.ciphertext[last] ^= 1;
        assert_eq!(flipped.verify(), Err(SealError::BadSignature));
        assert_eq!(
            decoded.open(&[0x12; 32], &NAME_KEY),
            Err(SealError::Decrypt)
        );
    }
}

#[test]
fn key_grant_vector() {
    let (laptop, phone) = (device(1), device(2));
    let next_key: Key = [0x55; 32];
    let epoch = Epoch::of(2, &next_key);
    let granted = Granted {
        key: next_key,
        removed: vec![device(3).public().to_peer_id().to_bytes()],
    };
    let grant = KeyGrant::seal_with_nonce(
        &laptop,
        &phone.public().to_peer_id(),
        epoch,
        &granted,
        [0x66; 24],
    )
    .unwrap();
    let bytes = postcard::to_allocvec(&grant).unwrap();
    check("key_grant.bin", &bytes);
    let decoded: KeyGrant = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(decoded.open(&phone).unwrap(), granted);
    assert!(
        decoded.open(&device(3)).is_err(),
        "only the recipient opens it"
    );
}
