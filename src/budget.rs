//! A byte budget shared by a producer and the task draining its queue: the producer charges what
//! it queues, the drain releases what it has written, and either side can wait until the queue is
//! under the limit again. Used for the outgoing queues of IPC connections and peer sessions.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

pub(crate) struct ByteBudget {
    limit: usize,
    used: AtomicUsize,
    room: Notify,
}

impl ByteBudget {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            used: AtomicUsize::new(0),
            room: Notify::new(),
        }
    }

    pub fn charge(&self, bytes: usize) {
        self.used.fetch_add(bytes, Ordering::SeqCst);
    }

    pub fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::SeqCst);
        self.room.notify_waiters();
    }

    /// At or over the limit.
    pub fn is_full(&self) -> bool {
        self.used.load(Ordering::SeqCst) >= self.limit
    }

    /// Resolves once the queued bytes are under the limit.
    pub async fn wait_for_room(&self) {
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.is_full() {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fills_and_frees() {
        let budget = std::sync::Arc::new(ByteBudget::new(100));
        budget.charge(100);
        assert!(budget.is_full());
        let waiter = tokio::spawn({
            let budget = budget.clone();
            async move { budget.wait_for_room().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        budget.release(1);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("room")
            .unwrap();
    }
}
