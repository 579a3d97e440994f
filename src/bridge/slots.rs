//! Who gets a connection slot on the y-websocket endpoint: sockets still in their HTTP upgrade
//! (at most [`MAX_PENDING`], the oldest evicted for a new one, each with [`UPGRADE_DEADLINE`]),
//! and admitted connections (at most [`MAX_CONNECTIONS`], of which one app holds at most
//! [`MAX_PER_APP`]). Silent sockets cannot keep an app from connecting, and one app's
//! connections cannot lock the others out.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::task::AbortHandle;

/// Most admitted connections at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most admitted connections of one app (its tabs, windows and workers).
pub const MAX_PER_APP: usize = 256;
/// Most sockets in their HTTP upgrade at once; a new one evicts the oldest.
pub const MAX_PENDING: usize = 64;
/// Time a client has to finish the HTTP upgrade (a local app takes milliseconds).
pub const UPGRADE_DEADLINE: Duration = Duration::from_secs(3);

/// The endpoint's slots.
#[derive(Default)]
pub(super) struct Slots {
    pending: Mutex<Pending>,
    admitted: Mutex<Admitted>,
}

#[derive(Default)]
struct Pending {
    next_id: u64,
    queue: VecDeque<(u64, AbortHandle)>,
}

#[derive(Default)]
struct Admitted {
    total: usize,
    per_app: HashMap<String, usize>,
}

/// Why a connection was not admitted.
#[derive(Debug, thiserror::Error)]
pub(super) enum SlotError {
    #[error("the endpoint serves {MAX_CONNECTIONS} connections already; try again later")]
    Full,
    #[error(
        "app {0:?} has {MAX_PER_APP} connections open already; close some (each tab or window \
         holds one per document)"
    )]
    AppFull(String),
}

impl Slots {
    /// Registers a socket entering its upgrade (run by `task`); evicts the oldest one if
    /// [`MAX_PENDING`] are waiting. Returns its id for [`Slots::upgraded`].
    pub(super) fn upgrading(&self, task: AbortHandle) -> u64 {
        let mut pending = lock(&self.pending);
        pending.next_id += 1;
        let id = pending.next_id;
        pending.queue.push_back((id, task));
        while pending.queue.len() > MAX_PENDING {
            if let Some((_, oldest)) = pending.queue.pop_front() {
                oldest.abort();
            }
        }
        id
    }

    /// The socket's upgrade ended (admitted, refused or timed out).
    pub(super) fn upgraded(&self, id: u64) {
        lock(&self.pending)
            .queue
            .retain(|(pending, _)| *pending != id);
    }

    /// Takes a slot for a connection of `app`; it is freed when the returned guard drops.
    pub(super) fn admit(self: &Arc<Self>, app: &str) -> Result<Slot, SlotError> {
        let mut admitted = lock(&self.admitted);
        if admitted.total >= MAX_CONNECTIONS {
            return Err(SlotError::Full);
        }
        let count = admitted.per_app.entry(app.to_string()).or_default();
        if *count >= MAX_PER_APP {
            return Err(SlotError::AppFull(app.to_string()));
        }
        *count += 1;
        admitted.total += 1;
        Ok(Slot {
            slots: self.clone(),
            app: app.to_string(),
        })
    }
}

/// An admitted connection's slot, freed on drop.
pub(super) struct Slot {
    slots: Arc<Slots>,
    app: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut admitted = lock(&self.slots.admitted);
        admitted.total -= 1;
        if let Some(count) = admitted.per_app.get_mut(&self.app) {
            *count -= 1;
            if *count == 0 {
                admitted.per_app.remove(&self.app);
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_app_cannot_take_every_slot() {
        let slots = Arc::new(Slots::default());
        let greedy: Vec<_> = (0..MAX_PER_APP)
            .map(|_| slots.admit("greedy").unwrap())
            .collect();
        assert!(matches!(slots.admit("greedy"), Err(SlotError::AppFull(_))));
        let other = slots.admit("notes").unwrap();
        drop(greedy);
        drop(other);
        assert_eq!(lock(&slots.admitted).total, 0);
        assert!(lock(&slots.admitted).per_app.is_empty());
    }

    #[tokio::test]
    async fn a_new_upgrade_evicts_the_oldest_pending_one() {
        let slots = Slots::default();
        let tasks: Vec<_> = (0..=MAX_PENDING)
            .map(|_| tokio::spawn(std::future::pending::<()>()))
            .collect();
        let ids: Vec<_> = tasks
            .iter()
            .map(|t| slots.upgrading(t.abort_handle()))
            .collect();
        let mut tasks = tasks.into_iter();
        let oldest = tasks.next().unwrap();
        assert!(oldest.await.unwrap_err().is_cancelled());
        assert_eq!(lock(&slots.pending).queue.len(), MAX_PENDING);
        slots.upgraded(ids[1]);
        assert_eq!(lock(&slots.pending).queue.len(), MAX_PENDING - 1);
    }
}
