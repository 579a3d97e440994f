//! `AppStore`: the apps allowed to use the agent's y-websocket endpoint (and to scope an IPC
//! connection), persisted in sled.
//!
//! Tree `apps` maps an app name to a postcard-encoded [`AppRecord`]. Tokens are never stored:
//! only their SHA-256, so a copy of the database does not hand out access.

use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use super::StoreError;

/// One app, as remembered on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppRecord {
    pub name: String,
    /// SHA-256 of the app's token.
    pub token_hash: [u8; 32],
    /// Browser origins allowed to connect with this token (`scheme://host[:port]`). A client
    /// that sends no `Origin` (not a browser) is allowed; one that sends another is refused.
    pub origins: Vec<String>,
    /// Document-name prefixes the app may use; empty means every document.
    pub prefixes: Vec<String>,
    /// The app may read and follow documents but not change them.
    pub read_only: bool,
    /// Milliseconds since the Unix epoch.
    pub created_ms: u64,
}

/// The app table, persisted in sled. [`AppStore::close`] lets go of the database (the agent
/// stops; handles may live on), after which every call is [`StoreError::Closed`].
#[derive(Clone)]
pub struct AppStore {
    tree: Arc<RwLock<Option<sled::Tree>>>,
}

impl AppStore {
    pub fn open(db: &sled::Db) -> Result<Self, StoreError> {
        Ok(Self {
            tree: Arc::new(RwLock::new(Some(db.open_tree("apps")?))),
        })
    }

    /// Releases the database.
    pub fn close(&self) {
        self.tree.write().unwrap_or_else(|p| p.into_inner()).take();
    }

    fn tree(&self) -> Result<sled::Tree, StoreError> {
        self.tree
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(StoreError::Closed)
    }

    /// Every app, sorted by name. A record that does not decode is skipped with a warning (it
    /// grants nothing; `app remove` still deletes it).
    pub fn list(&self) -> Result<Vec<AppRecord>, StoreError> {
        let mut apps = Vec::new();
        for entry in self.tree()?.iter() {
            let (key, value) = entry?;
            match postcard::from_bytes::<AppRecord>(&value) {
                Ok(app) => apps.push(app),
                Err(e) => tracing::warn!(
                    app = %String::from_utf8_lossy(&key),
                    "app record is corrupt and grants nothing: {e}"
                ),
            }
        }
        Ok(apps)
    }

    /// Adds or replaces `app` (durable when this returns).
    pub fn put(&self, app: &AppRecord) -> Result<(), StoreError> {
        let bytes = postcard::to_allocvec(app).map_err(|e| StoreError::CorruptApp {
            name: app.name.clone(),
            reason: e.to_string(),
        })?;
        let tree = self.tree()?;
        tree.insert(app.name.as_bytes(), bytes)?;
        tree.flush()?;
        Ok(())
    }

    /// Removes an app; returns whether it existed.
    pub fn remove(&self, name: &str) -> Result<bool, StoreError> {
        let tree = self.tree()?;
        let existed = tree.remove(name.as_bytes())?.is_some();
        tree.flush()?;
        Ok(existed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apps_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let app = AppRecord {
            name: "notes".into(),
            token_hash: [7; 32],
            origins: vec!["http://localhost:5173".into()],
            prefixes: vec!["notes/".into()],
            read_only: true,
            created_ms: 1,
        };
        {
            let db = crate::store::open_db(dir.path()).unwrap();
            AppStore::open(&db).unwrap().put(&app).unwrap();
        }
        let db = crate::store::open_db(dir.path()).unwrap();
        let store = AppStore::open(&db).unwrap();
        assert_eq!(store.list().unwrap(), vec![app]);
        assert!(store.remove("notes").unwrap());
        assert!(!store.remove("notes").unwrap());
        assert!(store.list().unwrap().is_empty());
    }
}
