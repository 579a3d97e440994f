//! The sealed forms a blind device holds: [`Envelope`]s (one encrypted document update or
//! snapshot) and [`KeyGrant`]s (an epoch key sealed to one member). Only members can open
//! either; the blind device checks who wrote them and in what order, and reads nothing else.
//!
//! An envelope's header (kind, document id, author, sequence, key epoch, nonce, and for a
//! snapshot the updates it covers) is the AEAD's associated data; the author signs the header
//! and the ciphertext with its device key. The plaintext is the document's name and the Yjs
//! update, so a member that never heard of a document learns its name from the envelope.
//! See protocol/README.md §28.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use libp2p::identity::{Keypair, PublicKey};
use libp2p::PeerId;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A 32-byte symmetric key.
pub type Key = [u8; 32];
/// A document as the blind device knows it: a keyed hash of its name.
pub type DocId = [u8; 32];

const ENVELOPE_CONTEXT: &[u8] = b"devicelink envelope 1.4";
const GRANT_CONTEXT: &[u8] = b"devicelink key grant 1.4";

/// Why a sealed object was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("the author's signature does not match (forged or altered)")]
    BadSignature,
    #[error("the author {0} is not a device id with an Ed25519 key")]
    BadAuthor(String),
    #[error("cannot decrypt: not sealed with this group's key for that epoch")]
    Decrypt,
    #[error("the sealed content is malformed: {0}")]
    Malformed(String),
    #[error("the envelope names document {name:?}, whose id does not match the header")]
    WrongDocument { name: String },
    #[error("this device key cannot seal (not Ed25519)")]
    KeyType,
}

/// What an envelope carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// Updates of one author, numbered from 1 per document and author.
    Update,
    /// The whole document, replacing every update it covers.
    Snapshot,
}

/// Which key an envelope is sealed with: the epoch's number and its key's fingerprint (two
/// members rotating at once make two keys of one number; both stay usable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Epoch {
    pub number: u64,
    pub key_id: [u8; 8],
}

impl Epoch {
    pub fn of(number: u64, key: &Key) -> Self {
        let digest = Sha256::digest(key);
        let mut key_id = [0; 8];
        key_id.copy_from_slice(&digest[..8]);
        Self { number, key_id }
    }
}

/// One sealed update or snapshot of one document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub kind: Kind,
    pub doc: DocId,
    /// Device id bytes of the author (who signed it).
    pub author: Vec<u8>,
    /// For `Update`: 1, 2, ... per (document, author). For `Snapshot`: 0.
    pub seq: u64,
    pub epoch: Epoch,
    /// For `Snapshot`: the last sequence of each author it includes.
    pub covers: Vec<(Vec<u8>, u64)>,
    pub nonce: [u8; 24],
    #[serde(with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// What an envelope holds once opened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Content {
    pub name: String,
    #[serde(with = "serde_bytes")]
    pub update: Vec<u8>,
}

/// The keyed hash a document is known by on the blind device.
pub fn doc_id(name_key: &Key, name: &str) -> DocId {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(name_key).expect("HMAC takes any key");
    mac.update(b"devicelink doc id 1.4\0");
    mac.update(name.as_bytes());
    mac.finalize().into_bytes().into()
}

/// The key of one document in one epoch.
fn doc_key(epoch_key: &Key, doc: &DocId) -> Key {
    let hkdf = Hkdf::<Sha256>::new(Some(doc), epoch_key);
    let mut key = [0; 32];
    hkdf.expand(b"devicelink doc key 1.4", &mut key)
        .expect("32 bytes is a valid HKDF length");
    key
}

impl Envelope {
    /// Seals `content` for document `doc` as `author` (whose device key signs it).
    #[allow(clippy::too_many_arguments)]
    pub fn seal(
        author: &Keypair,
        kind: Kind,
        doc: DocId,
        seq: u64,
        epoch: Epoch,
        epoch_key: &Key,
        covers: Vec<(Vec<u8>, u64)>,
        content: &Content,
    ) -> Result<Self, SealError> {
        let mut nonce = [0; 24];
        rand::thread_rng().fill_bytes(&mut nonce);
        Self::seal_with_nonce(
            author, kind, doc, seq, epoch, epoch_key, covers, content, nonce,
        )
    }

    /// [`Envelope::seal`] with a given nonce: for test vectors only (a nonce must never repeat
    /// under one key; `seal` draws a random one).
    #[allow(clippy::too_many_arguments)]
    pub fn seal_with_nonce(
        author: &Keypair,
        kind: Kind,
        doc: DocId,
        seq: u64,
        epoch: Epoch,
        epoch_key: &Key,
        covers: Vec<(Vec<u8>, u64)>,
        content: &Content,
        nonce: [u8; 24],
    ) -> Result<Self, SealError> {
        let mut envelope = Envelope {
            kind,
            doc,
            author: author.public().to_peer_id().to_bytes(),
            seq,
            epoch,
            covers,
            nonce,
            ciphertext: Vec::new(),
            signature: Vec::new(),
        };
        let plaintext =
            postcard::to_allocvec(content).map_err(|e| SealError::Malformed(e.to_string()))?;
        let key = doc_key(epoch_key, &doc);
        envelope.ciphertext = encrypt(&key, &nonce, &plaintext, &envelope.header())?;
        envelope.signature = sign(author, &envelope.signed_bytes())?;
        Ok(envelope)
    }

    /// The author's device id.
    pub fn author(&self) -> Result<PeerId, SealError> {
        device_id(&self.author)
    }

    /// Checks the author's signature (what the blind device can check).
    pub fn verify(&self) -> Result<PeerId, SealError> {
        let author = self.author()?;
        let key = public_key_of(&author)?;
        if key.verify(&self.signed_bytes(), &self.signature) {
            Ok(author)
        } else {
            Err(SealError::BadSignature)
        }
    }

    /// Checks the signature and decrypts with the epoch's key; the name inside must hash to
    /// the header's document id.
    pub fn open(&self, epoch_key: &Key, name_key: &Key) -> Result<Content, SealError> {
        self.verify()?;
        let key = doc_key(epoch_key, &self.doc);
        let plaintext = decrypt(&key, &self.nonce, &self.ciphertext, &self.header())?;
        let content: Content =
            postcard::from_bytes(&plaintext).map_err(|e| SealError::Malformed(e.to_string()))?;
        if doc_id(name_key, &content.name) != self.doc {
            return Err(SealError::WrongDocument { name: content.name });
        }
        Ok(content)
    }

    /// The associated data: everything in the header.
    fn header(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(ENVELOPE_CONTEXT);
        out.push(match self.kind {
            Kind::Update => 0,
            Kind::Snapshot => 1,
        });
        out.extend_from_slice(&self.doc);
        push_bytes(&mut out, &self.author);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.epoch.number.to_be_bytes());
        out.extend_from_slice(&self.epoch.key_id);
        out.extend_from_slice(&(self.covers.len() as u32).to_be_bytes());
        for (author, seq) in &self.covers {
            push_bytes(&mut out, author);
            out.extend_from_slice(&seq.to_be_bytes());
        }
        out.extend_from_slice(&self.nonce);
        out
    }

    fn signed_bytes(&self) -> Vec<u8> {
        let mut out = self.header();
        out.extend_from_slice(&Sha256::digest(&self.ciphertext));
        out
    }
}

/// What a key grant carries: the epoch key, and the devices removed from the group when it was
/// made (a member that was offline learns of the removal with the key, before anything sealed
/// with it, and stops syncing with them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Granted {
    pub key: Key,
    pub removed: Vec<Vec<u8>>,
}

/// An epoch key sealed by one member to another, for a member that was offline when the key
/// was made (kept on the blind device and handed only to `to`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyGrant {
    pub from: Vec<u8>,
    pub to: Vec<u8>,
    pub epoch: Epoch,
    pub nonce: [u8; 24],
    #[serde(with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl KeyGrant {
    /// Seals `granted` (the key of `epoch`) from `from` to device `to`: X25519 between their
    /// device keys.
    pub fn seal(
        from: &Keypair,
        to: &PeerId,
        epoch: Epoch,
        granted: &Granted,
    ) -> Result<Self, SealError> {
        let mut nonce = [0; 24];
        rand::thread_rng().fill_bytes(&mut nonce);
        Self::seal_with_nonce(from, to, epoch, granted, nonce)
    }

    /// [`KeyGrant::seal`] with a given nonce: for test vectors only.
    pub fn seal_with_nonce(
        from: &Keypair,
        to: &PeerId,
        epoch: Epoch,
        granted: &Granted,
        nonce: [u8; 24],
    ) -> Result<Self, SealError> {
        let mut grant = KeyGrant {
            from: from.public().to_peer_id().to_bytes(),
            to: to.to_bytes(),
            epoch,
            nonce,
            ciphertext: Vec::new(),
            signature: Vec::new(),
        };
        let shared = shared_key(from, to, &grant)?;
        let plaintext =
            postcard::to_allocvec(granted).map_err(|e| SealError::Malformed(e.to_string()))?;
        grant.ciphertext = encrypt(&shared, &nonce, &plaintext, &grant.header())?;
        grant.signature = sign(from, &grant.signed_bytes())?;
        Ok(grant)
    }

    pub fn to(&self) -> Result<PeerId, SealError> {
        device_id(&self.to)
    }

    pub fn from(&self) -> Result<PeerId, SealError> {
        device_id(&self.from)
    }

    /// Checks the sender's signature.
    pub fn verify(&self) -> Result<PeerId, SealError> {
        let from = self.from()?;
        if public_key_of(&from)?.verify(&self.signed_bytes(), &self.signature) {
            Ok(from)
        } else {
            Err(SealError::BadSignature)
        }
    }

    /// Opens the grant as its recipient `me`.
    pub fn open(&self, me: &Keypair) -> Result<Granted, SealError> {
        let from = self.verify()?;
        let shared = shared_key(me, &from, self)?;
        let plaintext = decrypt(&shared, &self.nonce, &self.ciphertext, &self.header())?;
        let granted: Granted =
            postcard::from_bytes(&plaintext).map_err(|e| SealError::Malformed(e.to_string()))?;
        if Epoch::of(self.epoch.number, &granted.key) != self.epoch {
            return Err(SealError::Malformed(
                "the key does not match its epoch".into(),
            ));
        }
        Ok(granted)
    }

    fn header(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(GRANT_CONTEXT);
        push_bytes(&mut out, &self.from);
        push_bytes(&mut out, &self.to);
        out.extend_from_slice(&self.epoch.number.to_be_bytes());
        out.extend_from_slice(&self.epoch.key_id);
        out.extend_from_slice(&self.nonce);
        out
    }

    fn signed_bytes(&self) -> Vec<u8> {
        let mut out = self.header();
        out.extend_from_slice(&self.ciphertext);
        out
    }
}

/// The key two devices share: X25519 between `mine` and `theirs` (both Ed25519 device keys,
/// mapped to X25519 as libsodium does), expanded with the grant's header.
fn shared_key(mine: &Keypair, theirs: &PeerId, grant: &KeyGrant) -> Result<Key, SealError> {
    let my_secret = mine
        .clone()
        .try_into_ed25519()
        .map_err(|_| SealError::KeyType)?;
    let bytes = my_secret.to_bytes();
    let mut seed = [0; 32];
    seed.copy_from_slice(&bytes[..32]);
    let scalar = ed25519_dalek::SigningKey::from_bytes(&seed).to_scalar_bytes();
    let secret = x25519_dalek::StaticSecret::from(scalar);
    let their_ed = public_key_of(theirs)?
        .try_into_ed25519()
        .map_err(|_| SealError::BadAuthor(theirs.to_string()))?;
    let their_x = ed25519_dalek::VerifyingKey::from_bytes(&their_ed.to_bytes())
        .map_err(|_| SealError::BadAuthor(theirs.to_string()))?
        .to_montgomery();
    let shared = secret.diffie_hellman(&x25519_dalek::PublicKey::from(their_x.to_bytes()));
    let hkdf = Hkdf::<Sha256>::new(Some(&grant.header()), shared.as_bytes());
    let mut key = [0; 32];
    hkdf.expand(b"devicelink grant key 1.4", &mut key)
        .expect("32 bytes is a valid HKDF length");
    Ok(key)
}

fn encrypt(key: &Key, nonce: &[u8; 24], msg: &[u8], aad: &[u8]) -> Result<Vec<u8>, SealError> {
    XChaCha20Poly1305::new(key.into())
        .encrypt(XNonce::from_slice(nonce), Payload { msg, aad })
        .map_err(|_| SealError::Decrypt)
}

fn decrypt(key: &Key, nonce: &[u8; 24], msg: &[u8], aad: &[u8]) -> Result<Vec<u8>, SealError> {
    XChaCha20Poly1305::new(key.into())
        .decrypt(XNonce::from_slice(nonce), Payload { msg, aad })
        .map_err(|_| SealError::Decrypt)
}

fn sign(keypair: &Keypair, bytes: &[u8]) -> Result<Vec<u8>, SealError> {
    keypair.sign(bytes).map_err(|_| SealError::KeyType)
}

fn device_id(bytes: &[u8]) -> Result<PeerId, SealError> {
    PeerId::from_bytes(bytes).map_err(|e| SealError::BadAuthor(e.to_string()))
}

/// The public key inside an Ed25519 device id.
fn public_key_of(peer: &PeerId) -> Result<PublicKey, SealError> {
    let multihash: &libp2p::multihash::Multihash<64> = peer.as_ref();
    if multihash.code() != 0 {
        return Err(SealError::BadAuthor(peer.to_string()));
    }
    PublicKey::try_decode_protobuf(multihash.digest())
        .map_err(|_| SealError::BadAuthor(peer.to_string()))
}

fn push_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// A fresh random key.
pub fn random_key() -> Key {
    let mut key = [0; 32];
    rand::thread_rng().fill_bytes(&mut key);
    key
}

/// An update envelope of document `notes` (epoch 1 of `key`), for tests.
#[cfg(test)]
pub(crate) fn sealed_update(
    author: &Keypair,
    key: &Key,
    name_key: &Key,
    seq: u64,
    update: Vec<u8>,
) -> Envelope {
    let content = Content {
        name: "notes".into(),
        update,
    };
    let doc = doc_id(name_key, "notes");
    let epoch = Epoch::of(1, key);
    Envelope::seal(author, Kind::Update, doc, seq, epoch, key, vec![], &content)
        .expect("an Ed25519 key seals")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(author: &Keypair, key: &Key, name_key: &Key, seq: u64) -> Envelope {
        sealed_update(author, key, name_key, seq, vec![1, 2, 3])
    }

    #[test]
    fn envelope_opens_only_with_its_key_and_unaltered() {
        let author = Keypair::generate_ed25519();
        let (key, name_key) = (random_key(), random_key());
        let envelope = sealed(&author, &key, &name_key, 1);
        assert_eq!(envelope.verify().unwrap(), author.public().to_peer_id());
        assert_eq!(
            envelope.open(&key, &name_key).unwrap().update,
            vec![1, 2, 3]
        );
        assert_eq!(
            envelope.open(&random_key(), &name_key),
            Err(SealError::Decrypt)
        );
        // The header is signed: another sequence number (a reorder) is caught.
        let mut moved = envelope.clone();
        moved.seq = 2;
        assert_eq!(moved.verify(), Err(SealError::BadSignature));
        // Someone else cannot sign in the author's name.
        let forger = Keypair::generate_ed25519();
        let mut forged = sealed(&forger, &key, &name_key, 1);
        forged.author = envelope.author.clone();
        assert_eq!(forged.verify(), Err(SealError::BadSignature));
        // Ciphertext is signed too.
        let mut flipped = envelope;
        flipped.ciphertext[0] ^= 1;
        assert_eq!(flipped.verify(), Err(SealError::BadSignature));
    }

    #[test]
    fn grant_opens_only_for_its_recipient() {
        let (laptop, phone, other) = (
            Keypair::generate_ed25519(),
            Keypair::generate_ed25519(),
            Keypair::generate_ed25519(),
        );
        let key = random_key();
        let epoch = Epoch::of(2, &key);
        let granted = Granted {
            key,
            removed: vec![other.public().to_peer_id().to_bytes()],
        };
        let grant = KeyGrant::seal(&laptop, &phone.public().to_peer_id(), epoch, &granted).unwrap();
        assert_eq!(grant.open(&phone).unwrap(), granted);
        assert!(grant.open(&other).is_err());
        assert!(grant.open(&laptop).is_err());
    }

    #[test]
    fn document_ids_are_keyed() {
        let (a, b) = (random_key(), random_key());
        assert_eq!(doc_id(&a, "notes"), doc_id(&a, "notes"));
        assert_ne!(doc_id(&a, "notes"), doc_id(&b, "notes"));
        assert_ne!(doc_id(&a, "notes"), doc_id(&a, "notes2"));
    }
}
