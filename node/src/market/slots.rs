//! Pools of places for work taken from peers — discoveries, invocations, executions,
//! placements and detached jobs — each giving one peer at most a share, so a peer (or a
//! handful) cannot take a pool whole and turn everyone else away as busy, or make them
//! wait behind all of its own work.
//!
//! A place is taken at once or refused ([`Pool::take`]), or waited for
//! ([`Pool::acquire`]): a peer then first waits for a place within its share, and only
//! then in the one line of the pool, so the line holds at most a share of any one peer's
//! waiters.

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
    total: usize,
    per_peer: usize,
    held: Arc<Mutex<HashMap<PeerId, usize>>>,
    /// Each waiting or holding peer's own share, for [`Pool::acquire`]; gone once the
    /// peer holds and waits for nothing.
    shares: Arc<Mutex<HashMap<PeerId, Arc<Semaphore>>>>,
}

/// One place waited for in a [`Pool`], given back when dropped.
#[derive(Debug)]
pub struct Waited {
    _place: OwnedSemaphorePermit,
    _share: OwnedSemaphorePermit,
    peer: PeerId,
    shares: Arc<Mutex<HashMap<PeerId, Arc<Semaphore>>>>,
}

impl Drop for Waited {
    fn drop(&mut self) {
        forget_idle_share(&self.shares, &self.peer, 1);
    }
}

/// Forgets a peer's share when a wait for a place is given up.
struct ForgetIfIdle<'a> {
    shares: &'a Mutex<HashMap<PeerId, Arc<Semaphore>>>,
    peer: PeerId,
    armed: bool,
}

impl Drop for ForgetIfIdle<'_> {
    fn drop(&mut self) {
        if self.armed {
            forget_idle_share(self.shares, &self.peer, 0);
        }
    }
}

/// Forgets `peer`'s share once nobody holds or waits on it but the `holding` places
/// about to be given back (so the table holds only peers with work).
fn forget_idle_share(
    shares: &Mutex<HashMap<PeerId, Arc<Semaphore>>>,
    peer: &PeerId,
    holding: usize,
) {
    let mut shares = shares.lock().unwrap_or_else(|e| e.into_inner());
    // One reference is the table's; any other is a waiter's or a holder's.
    if let Some(share) = shares.get(peer)
        && Arc::strong_count(share) <= 1 + holding
    {
        shares.remove(peer);
    }
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
            total,
            per_peer: total.div_ceil(SHARE).max(1),
            held: Arc::default(),
            shares: Arc::default(),
        }
    }

    /// Places taken now, by [`Pool::take`] and [`Pool::acquire`].
    pub fn in_use(&self) -> usize {
        self.total - self.places.available_permits()
    }

    /// Waits for a place for `peer`: first for one within its share, then in the pool's
    /// line. Cancel-safe: dropping the future gives back whatever it took.
    pub async fn acquire(&self, peer: PeerId) -> Waited {
        let share = {
            let mut shares = self.shares.lock().unwrap_or_else(|e| e.into_inner());
            shares
                .entry(peer)
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_peer)))
                .clone()
        };
        // Declared first, so dropped last if the wait is given up: the share is forgotten
        // once nothing refers to it.
        let mut forget = ForgetIfIdle {
            shares: &self.shares,
            peer,
            armed: true,
        };
        // Never closed: the pool owns its semaphores.
        let within_share = share.acquire_owned().await.expect("never closed");
        let place = self
            .places
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        forget.armed = false;
        Waited {
            _place: place,
            _share: within_share,
            peer,
            shares: self.shares.clone(),
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
    use std::time::Duration;

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

    #[tokio::test(start_paused = true)]
    async fn a_waiting_peer_waits_within_its_share_so_others_go_first() {
        let pool = Pool::new(4);
        let greedy = PeerId::random();
        let first = pool.acquire(greedy).await;
        // The greedy peer's second waiter blocks on its share (a quarter of 4), not in the
        // pool's line: another peer's waiter gets a place at once.
        let second = tokio::spawn({
            let pool = pool.clone();
            async move { pool.acquire(greedy).await }
        });
        tokio::task::yield_now().await;
        let other = tokio::time::timeout(Duration::from_secs(1), pool.acquire(PeerId::random()))
            .await
            .expect("another peer is not behind the greedy one");
        assert_eq!(pool.in_use(), 2);
        drop(first);
        let second = second.await.unwrap();
        drop((second, other));
        assert_eq!(pool.in_use(), 0);
        assert!(pool.shares.lock().unwrap().is_empty(), "no idle share kept");
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_gives_up_leaves_nothing_behind() {
        let pool = Pool::new(1);
        let holder = pool.acquire(PeerId::random()).await;
        let quitter = PeerId::random();
        let gave_up = tokio::time::timeout(Duration::from_secs(1), pool.acquire(quitter)).await;
        assert!(gave_up.is_err());
        drop(holder);
        assert!(
            pool.shares.lock().unwrap().is_empty(),
            "the quitter's share is forgotten"
        );
        let again = pool.acquire(quitter).await;
        drop(again);
        assert!(pool.shares.lock().unwrap().is_empty());
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
