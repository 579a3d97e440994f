//! Device identity: an Ed25519 keypair kept in the data dir (`identity.key`, mode 0600).
//! The device id is the libp2p `PeerId` derived from its public key.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;
use libp2p::PeerId;

const FILE_NAME: &str = "identity.key";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read or write the identity key {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the identity key {path} is damaged ({reason}). This device's data is tied to that key: restore identity.key from a backup, or start over as a new device with `devicelink agent --new-identity` (the damaged key is kept as identity.key.damaged; your devices must pair this one again)")]
    Corrupt { path: PathBuf, reason: String },
    #[error("the identity key {path} is missing, but {data} holds a device's data and trust. Restore identity.key from a backup, or start over as a new device with `devicelink agent --new-identity` (your devices must pair this one again)")]
    Missing { path: PathBuf, data: PathBuf },
}

/// What to do when the data dir has no usable identity key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NewIdentity {
    /// Create one only for a fresh data dir (no database yet); else refuse.
    #[default]
    IfFresh,
    /// Create a new one even next to existing data (`--new-identity`): a damaged key is moved
    /// aside, a good one is kept.
    Allow,
}

/// Loads the device keypair from `data_dir`, creating it (and the dir) on first start.
pub fn load_or_create(data_dir: &Path) -> Result<Keypair, IdentityError> {
    load(data_dir, NewIdentity::IfFresh)
}

/// Loads the device keypair from `data_dir`; `new` says when a new one may be made.
pub fn load(data_dir: &Path, new: NewIdentity) -> Result<Keypair, IdentityError> {
    let path = data_dir.join(FILE_NAME);
    let io = |source| IdentityError::Io {
        path: path.clone(),
        source,
    };
    match fs::read(&path) {
        Ok(bytes) => match Keypair::from_protobuf_encoding(&bytes) {
            Ok(keypair) => Ok(keypair),
            Err(e) if new == NewIdentity::Allow => {
                tracing::warn!(
                    "the identity key {} is damaged ({e}); starting as a new device",
                    path.display()
                );
                fs::rename(&path, data_dir.join("identity.key.damaged")).map_err(io)?;
                create(data_dir, &path)
            }
            Err(e) => Err(IdentityError::Corrupt {
                path: path.clone(),
                reason: if bytes.is_empty() {
                    "the file is empty".into()
                } else {
                    e.to_string()
                },
            }),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let data = data_dir.join("db");
            if data.exists() && new == NewIdentity::IfFresh {
                return Err(IdentityError::Missing { path, data });
            }
            create(data_dir, &path)
        }
        Err(e) => Err(io(e)),
    }
}

fn create(data_dir: &Path, path: &Path) -> Result<Keypair, IdentityError> {
    let io = |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    };
    create_private_dir(data_dir).map_err(io)?;
    let keypair = Keypair::generate_ed25519();
    let bytes = keypair
        .to_protobuf_encoding()
        .map_err(|e| IdentityError::Corrupt {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    write_atomically(path, &bytes).map_err(io)?;
    Ok(keypair)
}

/// The device id of the keypair in `data_dir` (creating it if needed).
pub fn device_id(data_dir: &Path) -> Result<PeerId, IdentityError> {
    Ok(load_or_create(data_dir)?.public().to_peer_id())
}

/// Creates `dir` (and parents) with mode 0700 for the leaf.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}

/// Writes `bytes` to `path` (mode 0600) so that it is either absent or complete, also after a
/// crash or a full disk: a temp file, fsync, rename, fsync of the folder.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let temp = path.with_extension("key.tmp");
    let _ = fs::remove_file(&temp);
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let written = (|| {
        let mut file = options.open(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temp, path)?;
        if let Some(dir) = path.parent() {
            fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        let a = device_id(dir.path()).unwrap();
        let b = device_id(dir.path()).unwrap();
        assert_eq!(a, b, "the id is stable across starts");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.path().join(FILE_NAME))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn corrupt_key_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILE_NAME), b"nope").unwrap();
        let err = load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, IdentityError::Corrupt { .. }), "{err}");
        let empty = tempfile::tempdir().unwrap();
        fs::write(empty.path().join(FILE_NAME), b"").unwrap();
        let err = load_or_create(empty.path()).unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
        assert!(err.to_string().contains("--new-identity"), "{err}");
    }

    #[test]
    fn missing_key_next_to_data_is_refused_unless_asked() {
        let dir = tempfile::tempdir().unwrap();
        let old = device_id(dir.path()).unwrap();
        fs::create_dir(dir.path().join("db")).unwrap();
        fs::remove_file(dir.path().join(FILE_NAME)).unwrap();
        let err = load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, IdentityError::Missing { .. }), "{err}");
        let new = load(dir.path(), NewIdentity::Allow).unwrap();
        assert_ne!(new.public().to_peer_id(), old);
        assert!(!dir.path().join("identity.key.tmp").exists());
    }
}
