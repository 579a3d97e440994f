//! `AppRegistry`: per-app access to the agent from outside its own user's tools.
//!
//! Any web page can open `ws://127.0.0.1`, so the y-websocket endpoint serves only apps that
//! hold a token made by `devicelink app add`. A token is scoped: the browser origins allowed to
//! use it, the document-name prefixes it may touch, and whether it may write. Tokens are shown
//! once and stored hashed ([`crate::store::AppStore`]); removing an app revokes its token at
//! once and ends every connection made with it ([`AppGrant::revoked`]).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use base64::Engine as _;
use rand::RngCore as _;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::store::{AppRecord, AppStore, StoreError};

/// Tokens start with this, so they are easy to recognise (and to grep for in a leak).
pub const TOKEN_PREFIX: &str = "dlapp_";
/// Longest app name.
pub const MAX_NAME_LEN: usize = 64;
/// Most origins and most prefixes per app.
pub const MAX_SCOPE_ENTRIES: usize = 64;

/// Errors managing apps.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("invalid app name {0:?}: use 1-64 letters, digits, '.', '_' or '-'")]
    BadName(String),
    #[error("an app named {0:?} exists already (remove it first to issue a new token)")]
    Exists(String),
    #[error("invalid origin {0:?}: give scheme://host[:port], e.g. http://localhost:5173")]
    BadOrigin(String),
    #[error(
        "invalid document prefix {0:?}: it must be non-empty and not start with \"_devicelink/\""
    )]
    BadPrefix(String),
    #[error("too many origins or prefixes (at most {MAX_SCOPE_ENTRIES} each)")]
    TooMany,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a token allows; shared by every connection made with it.
#[derive(Debug)]
pub struct AppGrant {
    pub name: String,
    origins: Vec<String>,
    prefixes: Vec<String>,
    pub read_only: bool,
    /// Cancelled when the app is removed: connections made with the token end.
    pub revoked: CancellationToken,
}

impl AppGrant {
    /// Whether a client sending `origin` (the HTTP `Origin` header, if any) may use the token.
    /// Non-browser clients send none and are allowed; browsers always send one.
    pub fn allows_origin(&self, origin: Option<&str>) -> bool {
        match origin {
            None => true,
            Some(origin) => match normalize_origin(origin) {
                Some(origin) => self.origins.contains(&origin),
                None => false,
            },
        }
    }

    /// Whether the app may read (open, list, follow) `doc`.
    pub fn may_read(&self, doc: &str) -> bool {
        if self.prefixes.is_empty() {
            return true;
        }
        self.prefixes.iter().any(|p| doc.starts_with(p.as_str()))
    }

    /// Whether the app may change `doc`.
    pub fn may_write(&self, doc: &str) -> bool {
        !self.read_only && self.may_read(doc)
    }

    /// The prefixes the app is limited to (empty: every document).
    pub fn prefixes(&self) -> &[String] {
        &self.prefixes
    }
}

/// An app as listed (never with its token).
#[derive(Debug, Clone, Serialize)]
pub struct AppInfo {
    pub name: String,
    pub origins: Vec<String>,
    pub prefixes: Vec<String>,
    pub read_only: bool,
    /// Seconds since the Unix epoch.
    pub created_at: f64,
}

impl From<&AppRecord> for AppInfo {
    fn from(r: &AppRecord) -> Self {
        Self {
            name: r.name.clone(),
            origins: r.origins.clone(),
            prefixes: r.prefixes.clone(),
            read_only: r.read_only,
            created_at: r.created_ms as f64 / 1000.0,
        }
    }
}

/// The apps of this agent: persisted records plus the live grants, looked up by token hash.
pub struct AppRegistry {
    store: AppStore,
    grants: RwLock<HashMap<[u8; 32], Arc<AppGrant>>>,
}

impl AppRegistry {
    /// Loads the apps stored in `store`.
    pub(crate) fn load(store: AppStore) -> Result<Self, StoreError> {
        let grants = store
            .list()?
            .into_iter()
            .map(|r| (r.token_hash, Arc::new(grant_of(&r))))
            .collect();
        Ok(Self {
            store,
            grants: RwLock::new(grants),
        })
    }

    /// Creates an app and returns it with its token (shown only now).
    pub fn add(
        &self,
        name: &str,
        origins: &[String],
        prefixes: &[String],
        read_only: bool,
    ) -> Result<(AppInfo, String), AppError> {
        let valid_name = !name.is_empty()
            && name.len() <= MAX_NAME_LEN
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !valid_name {
            return Err(AppError::BadName(name.to_string()));
        }
        if origins.len() > MAX_SCOPE_ENTRIES || prefixes.len() > MAX_SCOPE_ENTRIES {
            return Err(AppError::TooMany);
        }
        let origins = origins
            .iter()
            .map(|o| normalize_origin(o).ok_or_else(|| AppError::BadOrigin(o.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        for p in prefixes {
            if p.is_empty() || p.starts_with(crate::group::RESERVED_PREFIX) {
                return Err(AppError::BadPrefix(p.clone()));
            }
        }
        if self.store.list()?.iter().any(|a| a.name == name) {
            return Err(AppError::Exists(name.to_string()));
        }
        let mut secret = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut secret);
        let token = format!(
            "{TOKEN_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
        );
        let record = AppRecord {
            name: name.to_string(),
            token_hash: hash(&token),
            origins,
            prefixes: prefixes.to_vec(),
            read_only,
            created_ms: crate::store::now_ms(),
        };
        self.store.put(&record)?;
        write(&self.grants).insert(record.token_hash, Arc::new(grant_of(&record)));
        Ok((AppInfo::from(&record), token))
    }

    /// Every app, sorted by name.
    pub fn list(&self) -> Result<Vec<AppInfo>, AppError> {
        Ok(self.store.list()?.iter().map(AppInfo::from).collect())
    }

    /// Removes an app: its token stops working and its open connections end now.
    pub fn remove(&self, name: &str) -> Result<bool, AppError> {
        let existed = self.store.remove(name)?;
        write(&self.grants).retain(|_, grant| {
            if grant.name == name {
                grant.revoked.cancel();
                false
            } else {
                true
            }
        });
        Ok(existed)
    }

    /// Releases the database and revokes every grant (the agent stops).
    pub(crate) fn close(&self) {
        self.store.close();
        for (_, grant) in write(&self.grants).drain() {
            grant.revoked.cancel();
        }
    }

    /// The grant of `token`, if it belongs to an app.
    pub fn authenticate(&self, token: &str) -> Option<Arc<AppGrant>> {
        let grants = self.grants.read().unwrap_or_else(|e| e.into_inner());
        grants.get(&hash(token)).cloned()
    }
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

fn grant_of(r: &AppRecord) -> AppGrant {
    AppGrant {
        name: r.name.clone(),
        origins: r.origins.clone(),
        prefixes: r.prefixes.clone(),
        read_only: r.read_only,
        revoked: CancellationToken::new(),
    }
}

fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// `scheme://host[:port]`, lower-cased, without a trailing `/`; `None` if it is not one.
pub fn normalize_origin(origin: &str) -> Option<String> {
    let origin = origin.trim().trim_end_matches('/').to_ascii_lowercase();
    let (scheme, rest) = origin.split_once("://")?;
    let scheme_ok = !scheme.is_empty()
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    let host_ok = !rest.is_empty() && !rest.contains(['/', '?', '#', '@', ' ']);
    (scheme_ok && host_ok).then_some(origin)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> (tempfile::TempDir, AppRegistry) {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::open_db(dir.path()).unwrap();
        let apps = AppRegistry::load(AppStore::open(&db).unwrap()).unwrap();
        (dir, apps)
    }

    #[test]
    fn a_token_is_scoped_and_revocable() {
        let (_dir, apps) = registry();
        let (info, token) = apps
            .add(
                "notes",
                &["http://LOCALHOST:5173/".into()],
                &["notes/".into()],
                false,
            )
            .unwrap();
        assert_eq!(info.origins, vec!["http://localhost:5173"]);
        let grant = apps.authenticate(&token).expect("token works");
        assert!(grant.allows_origin(None));
        assert!(grant.allows_origin(Some("http://localhost:5173")));
        assert!(!grant.allows_origin(Some("http://evil.example")));
        assert!(!grant.allows_origin(Some("null")));
        assert!(grant.may_write("notes/1"));
        assert!(!grant.may_read("mail/1"));
        assert!(apps.authenticate("dlapp_wrong").is_none());
        assert!(matches!(
            apps.add("notes", &[], &[], false),
            Err(AppError::Exists(_))
        ));
        assert!(apps.remove("notes").unwrap());
        assert!(grant.revoked.is_cancelled());
        assert!(apps.authenticate(&token).is_none());
    }

    #[test]
    fn bad_names_origins_and_prefixes_are_refused() {
        let (_dir, apps) = registry();
        assert!(matches!(
            apps.add("a b", &[], &[], false),
            Err(AppError::BadName(_))
        ));
        assert!(matches!(
            apps.add("x", &["localhost".into()], &[], false),
            Err(AppError::BadOrigin(_))
        ));
        assert!(matches!(
            apps.add("x", &[], &["_devicelink/".into()], false),
            Err(AppError::BadPrefix(_))
        ));
        assert!(apps.list().unwrap().is_empty());
    }

    #[test]
    fn read_only_tokens_cannot_write() {
        let (_dir, apps) = registry();
        let (_, token) = apps.add("viewer", &[], &[], true).unwrap();
        let grant = apps.authenticate(&token).unwrap();
        assert!(grant.may_read("anything"));
        assert!(!grant.may_write("anything"));
    }
}
