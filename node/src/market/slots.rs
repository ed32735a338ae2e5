//! Pools of places for work taken from peers — discoveries, invocations and executions —
//! each giving one peer at most a share, so a peer (or a handful) cannot take a pool
//! whole and turn everyone else away as busy.

use libp2p::PeerId;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The share of a pool one peer may hold: a quarter.
pub const SHARE: usize = 4;

/// A pool of places, at most `total` taken in all and `total / SHARE` (at least 1) by
/// one peer.
#[derive(Debug, Clone)]
pub struct Pool {
    places: Arc<Semaphore>,
    per_peer: usize,
    held: Arc<Mutex<HashMap<PeerId, usize>>>,
}

/// One place taken from a [`Pool`], given back when dropped.
#[derive(Debug)]
pub struct Slot {
    _place: OwnedSemaphorePermit,
    peer: PeerId,
    held: Arc<Mutex<HashMap<PeerId, usize>>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = held.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.peer);
            }
        }
    }
}

impl Pool {
    /// A pool of `total` places.
    pub fn new(total: usize) -> Pool {
        Pool {
            places: Arc::new(Semaphore::new(total)),
            per_peer: total.div_ceil(SHARE).max(1),
            held: Arc::default(),
        }
    }

    /// A place for `peer`, or `None` when the pool is full or `peer` holds its share.
    pub fn take(&self, peer: PeerId) -> Option<Slot> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.get(&peer).copied().unwrap_or(0) >= self.per_peer {
            return None;
        }
        let place = self.places.clone().try_acquire_owned().ok()?;
        *held.entry(peer).or_default() += 1;
        Some(Slot {
            _place: place,
            peer,
            held: self.held.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_peer_takes_at_most_its_share_and_others_still_get_places() {
        let pool = Pool::new(8);
        let greedy = PeerId::random();
        let taken: Vec<Slot> = std::iter::from_fn(|| pool.take(greedy)).take(100).collect();
        assert_eq!(taken.len(), 2, "a quarter of 8");
        let others: Vec<Slot> = (0..6).filter_map(|_| pool.take(PeerId::random())).collect();
        assert_eq!(others.len(), 6);
        assert!(pool.take(PeerId::random()).is_none(), "the pool is full");
        drop(taken);
        assert!(pool.take(greedy).is_some(), "its places came back");
    }

    #[test]
    fn a_refused_peer_leaves_no_entry_behind() {
        let pool = Pool::new(1);
        let first = pool.take(PeerId::random()).unwrap();
        for _ in 0..100 {
            assert!(pool.take(PeerId::random()).is_none());
        }
        assert_eq!(pool.held.lock().unwrap().len(), 1);
        drop(first);
        assert!(pool.held.lock().unwrap().is_empty());
    }
}
