//! devicelink for apps in other languages: the library's [`devicelink::Agent`] behind an API that
//! uniffi exports to Python, Kotlin and Swift, and that the Node addon (`bindings/node`) wraps.
//!
//! The embedded agent owns its tokio runtime, so the calls here are plain blocking calls (each
//! also has an `async` twin in Rust for the Node addon). Documents travel as Yjs update v1
//! bytes, so an app applies them with its own language's Yjs (pycrdt, yjs, y-swift...).
//!
//! Modules, by what they own:
//! - [`agent`]: start, pause/resume (mobile lifecycle), shutdown, the optional local endpoints.
//! - [`doc`]: one document: writes, reads, updates, subscriptions; [`callbacks`]: the thread
//!   that calls every subscription's listener.
//! - [`devices`]: pairing by code, the linked devices.
//! - [`activities`]: handoff (publish, list, continue) and conflict reports.

uniffi::setup_scaffolding!("devicelink");

pub mod activities;
pub mod agent;
pub mod callbacks;
pub mod devices;
pub mod doc;
mod error;

pub use activities::{Activity, ActivityDraft, Conflict, HandoffResult};
pub use agent::{Agent, AgentConfig};
pub use callbacks::DocListener;
pub use devices::{LinkedDevice, PairHost, PairedDevice};
pub use doc::{Doc, Subscription};
pub use error::DeviceLinkError;
