//! A byte budget for the replies queued to peers.
//!
//! The server reads a wanted block from disk and queues it for the peer's sender, which
//! may be slow or never read at all. Bounding that queue in messages alone lets one peer
//! hold about 130 MiB (64 blocks of 2 MiB plus a merged message). So every queued reply
//! is charged against the peer's byte budget and a global one *before* its block is read:
//! a [`Charge`] of the largest block size is taken first, shrunk to the block's real size
//! once read, and given back when the sender has written the message (or dropped it).
//! The server waits for room; a peer that never reads stalls only its own replies, until
//! the sender's write timeout drops its queue.

use libp2p::PeerId;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes charged against a peer's budget and the global one; given back on drop.
#[derive(Debug)]
pub struct Charge {
    peer: OwnedSemaphorePermit,
    total: OwnedSemaphorePermit,
}

impl Charge {
    /// Bytes charged.
    pub fn bytes(&self) -> usize {
        self.peer.num_permits()
    }

    /// Gives back all but `bytes` (at least one byte stays charged).
    pub fn shrink_to(&mut self, bytes: usize) {
        let keep = bytes.max(1);
        let excess = self.peer.num_permits().saturating_sub(keep);
        if excess > 0 {
            drop(self.peer.split(excess));
            drop(self.total.split(excess));
        }
    }
}

/// The budgets: `per_peer` bytes for each peer, `total` for all together.
#[derive(Debug)]
pub struct ReplyBudget {
    per_peer: usize,
    total_bytes: usize,
    total: Arc<Semaphore>,
    peers: Mutex<HashMap<PeerId, Arc<Semaphore>>>,
}

impl ReplyBudget {
    /// Budgets of `per_peer` bytes for each peer and `total` bytes for all peers.
    pub fn new(per_peer: usize, total: usize) -> ReplyBudget {
        let total = total.max(1);
        ReplyBudget {
            per_peer: per_peer.clamp(1, total),
            total_bytes: total,
            total: Arc::new(Semaphore::new(total)),
            peers: Mutex::default(),
        }
    }

    /// Charges `bytes` (clamped to the per-peer budget) to `peer`, waiting for room.
    pub async fn charge(&self, peer: PeerId, bytes: usize) -> Charge {
        let bytes = bytes.clamp(1, self.per_peer);
        let n = u32::try_from(bytes).unwrap_or(u32::MAX);
        let own = {
            let mut peers = super::lock(&self.peers);
            peers
                .entry(peer)
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_peer)))
                .clone()
        };
        // Neither semaphore is ever closed.
        let peer_permit = own
            .acquire_many_owned(n)
            .await
            .expect("budgets are never closed");
        let total_permit = self
            .total
            .clone()
            .acquire_many_owned(n)
            .await
            .expect("budgets are never closed");
        Charge {
            peer: peer_permit,
            total: total_permit,
        }
    }

    /// Bytes charged to `peer` now.
    pub fn charged(&self, peer: &PeerId) -> usize {
        super::lock(&self.peers)
            .get(peer)
            .map_or(0, |s| self.per_peer - s.available_permits())
    }

    /// Bytes charged to all peers now.
    pub fn charged_total(&self) -> usize {
        self.total_bytes - self.total.available_permits()
    }

    /// Forgets a peer that left. Charges still held keep its budget alive and give their
    /// bytes back to the total as usual; the table keeps no entry for a peer gone, so
    /// throwaway PeerIds cannot grow it.
    pub fn forget(&self, peer: &PeerId) {
        super::lock(&self.peers).remove(peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_peer_waits_once_its_budget_is_used_and_others_do_not() {
        let budget = ReplyBudget::new(8 << 20, 64 << 20);
        let hog = PeerId::random();
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(budget.charge(hog, 2 << 20).await);
        }
        assert_eq!(budget.charged(&hog), 8 << 20);
        // A fifth block waits…
        let more = tokio::time::timeout(Duration::from_millis(50), budget.charge(hog, 2 << 20));
        assert!(more.await.is_err(), "the per-peer budget was passed");
        // …while another peer is served.
        let other = budget.charge(PeerId::random(), 2 << 20).await;
        assert_eq!(other.bytes(), 2 << 20);
        // Giving one back lets the hog go on.
        held.pop();
        let next = budget.charge(hog, 2 << 20).await;
        assert_eq!(budget.charged(&hog), 8 << 20);
        drop((held, next, other));
        assert_eq!(budget.charged_total(), 0);
    }

    #[tokio::test]
    async fn shrinking_gives_back_the_excess_and_the_total_is_bounded() {
        let budget = ReplyBudget::new(4 << 20, 6 << 20);
        let a = PeerId::random();
        let mut charge = budget.charge(a, 2 << 20).await;
        charge.shrink_to(1000);
        assert_eq!(budget.charged(&a), 1000);
        assert_eq!(budget.charged_total(), 1000);
        let _b = budget.charge(PeerId::random(), 4 << 20).await;
        let c = tokio::time::timeout(
            Duration::from_millis(50),
            budget.charge(PeerId::random(), 2 << 20),
        );
        assert!(c.await.is_err(), "the global budget was passed");
        drop(charge);
        budget.forget(&a);
        assert_eq!(budget.charged(&a), 0);
    }
}
