//! # devicelink
//!
//! A local-first device sync agent. Every device of a user runs an agent that keeps Yjs
//! documents (via [yrs]) durable in a local sled database and replicates them directly to the
//! user's other devices over Noise-encrypted libp2p streams, with no server.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use devicelink::{Agent, AgentConfig};
//! let agent = Agent::start(AgentConfig::new("/tmp/devicelink-a")).await?;
//! let notes = agent.open_doc("notes")?;
//! notes.append_text("body", "hello").await?; // durable on disk when this returns
//! agent.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! Modules, by what they own:
//! - [`identity`]: the device keypair and device id.
//! - [`store`]: sled storage: document logs and snapshots, the trust store, group commit.
//! - [`nesting`]: the bound on how deeply an update's values nest, checked before yrs decodes it.
//! - [`docs`]: the live yrs documents (loaded on demand, evicted under a budget), local and
//!   remote updates, subscriptions; [`lifecycle`]: deletion by replicated tombstones.
//! - [`sync`]: the `/devicelink/sync/1.4.0` wire protocol and per-peer sessions.
//! - [`net`]: the libp2p swarm, trust gating, redial.
//! - [`agent`]: ties it together behind [`AgentHandle`], with a handle per concern:
//!   [`documents`] (`docs()`), [`devices`] (pairing, trust), [`handoff::Activities`],
//!   [`conflict::Conflicts`], [`PresenceHub`] (`presence()`, with a [`PresenceClient`] per
//!   local client), [`apps::AppRegistry`] (`apps()`); [`diagnostics`]: its `status` and
//!   `doctor` reports. Front ends (CLI, IPC server, y-websocket bridge, bench, bindings) use
//!   only these.
//! - [`ipc`]: the local JSON-lines socket apps use; [`client`]: its async Rust client.
//! - [`bridge`]: the y-websocket endpoint, so unmodified Yjs apps use the agent as provider;
//!   [`apps`]: the per-app tokens it (and a scoped IPC connection) requires;
//!   [`presence`]: awareness (cursors, who is here), shared by apps and devices.
//! - [`offline`]: a data dir whose agent is not running (trust and app tokens edited in place).
//! - [`demo`]: the two-agent demonstration run by `devicelink demo`; [`args`]: parsing what
//!   users type (durations, addresses, devices by name).
//! - [`conformance`]: session transcripts replayed against another implementation;
//!   [`convergence`]: what "two replicas hold the same document" means.

pub mod agent;
pub mod apps;
pub mod args;
pub mod bench;
pub mod blind;
pub mod bridge;
pub(crate) mod budget;
pub mod client;
pub mod conflict;
pub mod conformance;
pub mod convergence;
pub mod demo;
pub mod devices;
pub mod diagnostics;
pub mod discovery;
pub mod docs;
pub mod documents;
pub mod group;
pub mod handoff;
pub mod hops;
pub mod identity;
pub mod ipc;
pub mod lifecycle;
pub mod nesting;
pub mod net;
pub mod offline;
pub mod pairing;
pub mod presence;
pub mod service;
pub mod status;
pub mod store;
pub mod sync;

pub use agent::{Agent, AgentConfig, AgentError, AgentHandle, AgentStatus};
pub use documents::{DocError, DocHandle, DocUpdate, Documents, Durable, Origin, TextOffsets};
pub use libp2p::{Multiaddr, PeerId};
pub use presence::{
    PresenceClient, PresenceError, PresenceEvent, PresenceHub, Source as PresenceSource,
};
pub use status::PeerStatus;
pub use yrs;

/// The message of a caught panic (`catch_unwind`'s payload), for reporting it.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
