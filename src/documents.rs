//! [`Documents`]: the documents of one agent as apps see them, `agent.docs()`: open or create
//! one, check that it exists, list them (with metadata, a page at a time), delete one on every
//! device, make everything written durable. The agent's own `_devicelink/` documents are not
//! listed and cannot be deleted here; [`Documents::open_system`] reads them.

use std::sync::Arc;

use crate::docs::{DocRegistry, RESERVED_PREFIX};
use crate::store::StoreError;

pub use crate::docs::{DocError, DocHandle, DocUpdate, Durable, Origin, RootKind, TextOffsets};
pub use crate::store::DocMeta;

/// The documents concern of one agent.
#[derive(Clone)]
pub struct Documents {
    registry: Arc<DocRegistry>,
}

impl Documents {
    pub(crate) fn new(registry: Arc<DocRegistry>) -> Self {
        Self { registry }
    }

    /// Opens (or creates) document `name`.
    pub fn open(&self, name: &str) -> Result<DocHandle, DocError> {
        self.registry.handle(name)
    }

    /// One of the agent's own `_devicelink/` documents (read it; the agent writes it).
    pub fn open_system(&self, name: &str) -> Result<DocHandle, DocError> {
        self.registry.handle(name)
    }

    /// Checks that `name` can name a document (not empty, at most 255 bytes, no control
    /// characters); the error says what is wrong with it.
    pub fn check_name(&self, name: &str) -> Result<(), DocError> {
        crate::docs::validate_name(name)
    }

    /// Checks that apps may write document `name`: a valid name, not one of the agent's own
    /// (`_devicelink/`) documents, which apps read but never write.
    pub fn check_writable(&self, name: &str) -> Result<(), DocError> {
        self.check_name(name)?;
        if name.starts_with(RESERVED_PREFIX) {
            return Err(DocError::Reserved(name.to_string()));
        }
        Ok(())
    }

    /// Whether this device has document `name` (stored, or open in memory), without creating it.
    pub fn exists(&self, name: &str) -> Result<bool, DocError> {
        Ok(self.registry.exists(name)? && !self.registry.is_deleted(name))
    }

    /// Names of the documents this device has (the agent's own documents aside).
    pub fn list(&self) -> Result<Vec<String>, DocError> {
        let mut docs = self.registry.list()?;
        docs.retain(|d| !d.starts_with(RESERVED_PREFIX));
        Ok(docs)
    }

    /// A page of documents with their metadata (size, last change, which device), names after
    /// `after`, at most `limit`. Reads metadata only; nothing is loaded.
    pub fn list_meta(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, DocMeta)>, DocError> {
        let mut page = self
            .registry
            .store()?
            .list_meta(after, limit.saturating_add(8))?;
        page.retain(|(name, _)| !name.starts_with(RESERVED_PREFIX));
        page.truncate(limit);
        Ok(page)
    }

    /// Deletes a document on every device (see [`crate::lifecycle`]). Returns whether this device
    /// had it; an unknown name is an error.
    pub async fn delete(&self, name: &str) -> Result<bool, DocError> {
        if name.starts_with(RESERVED_PREFIX) {
            return Err(DocError::Store(StoreError::InvalidDocName {
                name: name.to_string(),
                reason: "reserved for the agent",
            }));
        }
        crate::lifecycle::delete(&self.registry, name).await
    }

    /// Makes everything written so far durable.
    pub async fn flush(&self) -> Result<(), DocError> {
        Ok(self.registry.writer().flush().await?)
    }
}
