//! What a session has queued for its peer, bounded in bytes. Answers to the peer's requests
//! (`SyncStep2`, feed pages) are charged when queued and released once written to the stream
//! (a large answer at most a quarter of the budget, so at most four are held at once).
//! While the budget is spent, further `SyncStep1` requests are deferred, not answered, so a peer
//! that asks and never reads costs at most the budget (plus one answer), and the session keeps
//! reading (applying the peer's changes) so two busy devices never wait on each other. At most
//! one answer per document is in flight: a repeated request for a document whose answer is
//! still queued is already covered by it (and by the live updates after it).

use std::collections::HashSet;
use std::sync::Mutex;

use super::message::Message;
use crate::budget::ByteBudget;

/// Bytes of answers queued for one peer before further requests wait.
pub(crate) const MAX_QUEUED_BYTES: usize = 16 << 20;
/// The most one message is charged: a large answer (sent in parts) takes a quarter of the budget,
/// so answers to other documents keep flowing beside it, and at most four large answers are in
/// memory at once.
const MAX_CHARGE: usize = MAX_QUEUED_BYTES / 4;
/// Requests deferred at most; a peer that has more outstanding breaks the protocol.
pub(crate) const MAX_DEFERRED: usize = 65_536;

pub(crate) struct OutBudget {
    bytes: ByteBudget,
    /// Documents whose `SyncStep2` is queued and not yet written.
    answering: Mutex<HashSet<String>>,
}

impl Default for OutBudget {
    fn default() -> Self {
        Self {
            bytes: ByteBudget::new(MAX_QUEUED_BYTES),
            answering: Mutex::default(),
        }
    }
}

impl OutBudget {
    /// What queuing `msg` costs: its payload (small messages a nominal 64 bytes), at most
    /// [`MAX_CHARGE`].
    pub fn cost(msg: &Message) -> usize {
        let bytes = match msg {
            Message::SyncStep2 { doc, update }
            | Message::Update { doc, update }
            | Message::Part {
                doc, data: update, ..
            } => update.len() + doc.len() + 16,
            Message::FeedPage { docs, .. } => docs.iter().map(|d| d.len() + 2).sum::<usize>() + 32,
            _ => 64,
        };
        bytes.min(MAX_CHARGE)
    }

    pub fn charge(&self, bytes: usize) {
        self.bytes.charge(bytes);
    }

    pub fn release(&self, bytes: usize) {
        self.bytes.release(bytes);
    }

    pub fn is_full(&self) -> bool {
        self.bytes.is_full()
    }

    /// Resolves once the queued bytes are under the budget.
    pub async fn wait_for_room(&self) {
        self.bytes.wait_for_room().await
    }

    fn answering(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.answering.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks an answer for `doc` as queued; false if one already is.
    pub fn start_answer(&self, doc: &str) -> bool {
        let mut answering = self.answering();
        if answering.contains(doc) {
            return false;
        }
        answering.insert(doc.to_string())
    }

    pub fn is_answering(&self, doc: &str) -> bool {
        self.answering().contains(doc)
    }

    /// The answer for `doc` has been written.
    pub fn answered(&self, doc: &str) {
        self.answering().remove(doc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_answer_per_document_in_flight() {
        let budget = OutBudget::default();
        assert!(budget.start_answer("a"));
        assert!(!budget.start_answer("a"));
        budget.answered("a");
        assert!(budget.start_answer("a"));
        assert_eq!(
            OutBudget::cost(&Message::SyncStep2 {
                doc: "a".into(),
                update: vec![0; 100 << 20],
            }),
            MAX_QUEUED_BYTES / 4,
            "a large answer counts a quarter of the budget"
        );
    }
}
