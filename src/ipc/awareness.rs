//! Presence for one IPC connection: the states it set (`awareness_set`), renewed while it is
//! open and removed when it closes, and its `awareness` event subscriptions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rand::Rng as _;
use serde_json::Value;
use tokio::sync::broadcast;
use tokio::task::AbortHandle;

use super::protocol::{ErrorCode, Event};
use crate::{PresenceClient, PresenceEvent, PresenceHub, PresenceSource as Source};

/// One state this connection set: its awareness client id, clock and JSON.
struct Own {
    client: u64,
    clock: u32,
    state: Value,
}

/// The presence of one connection.
pub(super) struct ConnPresence {
    /// This connection as a presence client (its states leave when it is dropped).
    client: Arc<PresenceClient>,
    own: Arc<Mutex<HashMap<String, Own>>>,
    renewer: Option<AbortHandle>,
}

impl ConnPresence {
    pub(super) fn new(client: PresenceClient) -> Self {
        Self {
            client: Arc::new(client),
            own: Arc::default(),
            renewer: None,
        }
    }

    /// Sets (or, with `null`, removes) this connection's presence in `doc`; answers its client id.
    pub(super) fn set(&mut self, doc: &str, state: Value) -> Result<u64, (ErrorCode, String)> {
        let (client, clock) = {
            let mut own = lock(&self.own);
            let entry = own.entry(doc.to_string()).or_insert_with(|| Own {
                // Yjs client ids are 32-bit in JavaScript; keep to that range.
                client: rand::thread_rng().gen_range(1..u32::MAX as u64),
                clock: 0,
                state: Value::Null,
            });
            entry.clock = entry.clock.wrapping_add(1);
            entry.state = state.clone();
            (entry.client, entry.clock)
        };
        self.client
            .set(doc, client, clock, (!state.is_null()).then_some(&state))
            .map_err(|e| (ErrorCode::InvalidArgument, e.to_string()))?;
        if state.is_null() {
            lock(&self.own).remove(doc);
        }
        self.renew_in_background();
        Ok(client)
    }

    /// Keeps the states alive: renewed every [`PresenceClient::RENEW_EVERY`].
    fn renew_in_background(&mut self) {
        if self.renewer.is_some() {
            return;
        }
        let (client, own) = (self.client.clone(), self.own.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(PresenceClient::RENEW_EVERY);
            tick.tick().await;
            loop {
                tick.tick().await;
                let renewals: Vec<_> = lock(&own)
                    .iter_mut()
                    .map(|(doc, s)| {
                        s.clock = s.clock.wrapping_add(1);
                        (doc.clone(), s.client, s.clock, s.state.clone())
                    })
                    .collect();
                for (doc, id, clock, state) in renewals {
                    let _ = client.set(&doc, id, clock, Some(&state));
                }
            }
        });
        self.renewer = Some(task.abort_handle());
    }
}

impl Drop for ConnPresence {
    fn drop(&mut self) {
        // The renewer holds the client too: stop it, so the client (and with it this
        // connection's presence) goes now.
        if let Some(task) = self.renewer.take() {
            task.abort();
        }
    }
}

/// Forwards presence changes in `doc` as `awareness` events until the connection goes.
pub(super) async fn forward(
    subscription: u64,
    doc: String,
    mut events: broadcast::Receiver<PresenceEvent>,
    hub: Arc<PresenceHub>,
    out: super::outbox::Outbox,
) {
    loop {
        let (states, origin) = match events.recv().await {
            Ok(event) if *event.doc == *doc => (
                event.states_json(),
                match event.source {
                    Source::Local(_) => "local".to_string(),
                    Source::Peer(peer) => peer.to_string(),
                    Source::Expired => "expired".to_string(),
                },
            ),
            Ok(_) => continue,
            // Missed some: send everyone present now.
            Err(broadcast::error::RecvError::Lagged(_)) => {
                (hub.states_json(&doc), "local".to_string())
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let event = Event::Awareness {
            subscription,
            doc: doc.clone(),
            states,
            origin,
        };
        if out.event(&event).is_err() {
            return;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
