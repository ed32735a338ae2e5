//! A queue of requests per peer, served round robin: one peer's flood waits behind its
//! own requests, not in front of everyone else's.
//!
//! Requests from other peers wait in a [`fair_queue`]: each peer has its own line, and
//! the one reader takes the first request of each peer in turn. The queue is bounded in
//! all and per peer. A peer at its share is refused; when the whole queue is full, a
//! request of a peer with fewer waiting pushes out the newest request of the peer with
//! the most, so a hundred fresh PeerIds flooding cannot keep an honest peer out: they
//! only share the queue with it. Whoever is pushed out or refused gets its request
//! back, to answer it (a refusal) rather than leave its sender waiting.

use libp2p::PeerId;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// What became of a request pushed onto a [`fair_queue`].
#[derive(Debug)]
pub enum Pushed<T> {
    /// It waits its turn.
    Queued,
    /// It waits its turn, and this request of another peer was pushed out for it.
    Displaced(T),
    /// Refused: its peer has its share waiting, or the queue is full of requests of
    /// peers with no more waiting than it; the request comes back.
    Refused(T),
    /// The reader has gone; the request comes back.
    Closed(T),
}

struct Lines<T> {
    /// Each peer's waiting requests, oldest first.
    lines: HashMap<PeerId, VecDeque<T>>,
    /// Peers with requests waiting, in the order they are served.
    turns: VecDeque<PeerId>,
    total: usize,
    max_total: usize,
    max_per_peer: usize,
    senders: usize,
    reader: bool,
}

struct Shared<T> {
    lines: Mutex<Lines<T>>,
    ready: Notify,
}

impl<T> Shared<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Lines<T>> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The writing end of a [`fair_queue`]; clones share it.
pub struct FairSender<T> {
    shared: Arc<Shared<T>>,
}

/// The reading end of a [`fair_queue`] (one reader).
pub struct FairReceiver<T> {
    shared: Arc<Shared<T>>,
}

/// A queue per peer, served round robin, holding at most `max_total` requests, `max_per_peer` of one peer.
pub fn fair_queue<T>(max_total: usize, max_per_peer: usize) -> (FairSender<T>, FairReceiver<T>) {
    let shared = Arc::new(Shared {
        lines: Mutex::new(Lines {
            lines: HashMap::new(),
            turns: VecDeque::new(),
            total: 0,
            max_total: max_total.max(1),
            max_per_peer: max_per_peer.clamp(1, max_total.max(1)),
            senders: 1,
            reader: true,
        }),
        ready: Notify::new(),
    });
    (
        FairSender {
            shared: shared.clone(),
        },
        FairReceiver { shared },
    )
}

impl<T> Clone for FairSender<T> {
    fn clone(&self) -> Self {
        self.shared.lock().senders += 1;
        FairSender {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for FairSender<T> {
    fn drop(&mut self) {
        self.shared.lock().senders -= 1;
        self.shared.ready.notify_one();
    }
}

impl<T> Drop for FairReceiver<T> {
    fn drop(&mut self) {
        let mut lines = self.shared.lock();
        lines.reader = false;
        lines.lines.clear();
        lines.turns.clear();
        lines.total = 0;
    }
}

impl<T> FairSender<T> {
    /// Puts `request` of `peer` in its line, if there is room (see [`Pushed`]).
    pub fn push(&self, peer: PeerId, request: T) -> Pushed<T> {
        let mut lines = self.shared.lock();
        if !lines.reader {
            return Pushed::Closed(request);
        }
        let (max_total, max_per_peer) = (lines.max_total, lines.max_per_peer);
        let waiting = lines.lines.get(&peer).map_or(0, VecDeque::len);
        if waiting >= max_per_peer {
            return Pushed::Refused(request);
        }
        let mut displaced = None;
        if lines.total >= max_total {
            // The peer with the most waiting gives up its newest, if it has more than
            // this one would have.
            let longest = lines
                .lines
                .iter()
                .max_by_key(|(_, line)| line.len())
                .map(|(p, line)| (*p, line.len()));
            match longest {
                Some((longest, len)) if len > waiting + 1 => {
                    let line = lines.lines.get_mut(&longest).expect("found above");
                    displaced = line.pop_back();
                    if line.is_empty() {
                        lines.lines.remove(&longest);
                        lines.turns.retain(|p| *p != longest);
                    }
                    lines.total -= 1;
                }
                _ => return Pushed::Refused(request),
            }
        }
        let line = lines.lines.entry(peer).or_default();
        line.push_back(request);
        if line.len() == 1 {
            lines.turns.push_back(peer);
        }
        lines.total += 1;
        drop(lines);
        self.shared.ready.notify_one();
        match displaced {
            Some(old) => Pushed::Displaced(old),
            None => Pushed::Queued,
        }
    }
}

impl<T> FairReceiver<T> {
    /// The next request, taking each peer's first in turn; `None` once every sender has
    /// gone and nothing waits.
    pub async fn recv(&mut self) -> Option<T> {
        loop {
            {
                let mut lines = self.shared.lock();
                if let Some(peer) = lines.turns.pop_front() {
                    let line = lines.lines.get_mut(&peer).expect("a peer in turn waits");
                    let request = line.pop_front().expect("a line in turn is not empty");
                    if line.is_empty() {
                        lines.lines.remove(&peer);
                    } else {
                        lines.turns.push_back(peer);
                    }
                    lines.total -= 1;
                    return Some(request);
                }
                if lines.senders == 0 {
                    return None;
                }
            }
            self.shared.ready.notified().await;
        }
    }

    /// How many requests wait.
    pub fn len(&self) -> usize {
        self.shared.lock().total
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(rx: &mut FairReceiver<u32>) -> Vec<u32> {
        let mut out = Vec::new();
        while let Some(next) = futures::FutureExt::now_or_never(rx.recv()).flatten() {
            out.push(next);
        }
        out
    }

    #[tokio::test]
    async fn peers_are_served_in_turn_whatever_order_they_came_in() {
        let (tx, mut rx) = fair_queue(64, 16);
        let (flood, honest) = (PeerId::random(), PeerId::random());
        for n in 0..10 {
            assert!(matches!(tx.push(flood, n), Pushed::Queued));
        }
        assert!(matches!(tx.push(honest, 100), Pushed::Queued));
        assert!(matches!(tx.push(honest, 101), Pushed::Queued));
        let served = drain(&mut rx);
        // The honest peer's first comes second, not eleventh.
        assert_eq!(served, vec![0, 100, 1, 101, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert!(rx.is_empty());
    }

    #[tokio::test]
    async fn a_peer_at_its_share_is_refused() {
        let (tx, mut rx) = fair_queue(64, 3);
        let peer = PeerId::random();
        for n in 0..3 {
            assert!(matches!(tx.push(peer, n), Pushed::Queued));
        }
        assert!(matches!(tx.push(peer, 3), Pushed::Refused(3)));
        assert_eq!(drain(&mut rx).len(), 3);
        assert!(matches!(tx.push(peer, 4), Pushed::Queued));
    }

    #[tokio::test]
    async fn a_full_queue_makes_room_for_a_peer_with_fewer_waiting_at_the_floods_expense() {
        let (tx, mut rx) = fair_queue(8, 8);
        let flood = PeerId::random();
        for n in 0..8 {
            assert!(matches!(tx.push(flood, n), Pushed::Queued));
        }
        let honest = PeerId::random();
        // The flood's newest is pushed out, and comes back to be answered.
        assert!(matches!(tx.push(honest, 100), Pushed::Displaced(7)));
        assert!(matches!(tx.push(honest, 101), Pushed::Displaced(6)));
        // Two peers with as many each: neither pushes the other out.
        let (a, b) = (PeerId::random(), PeerId::random());
        let (tx2, _rx2) = fair_queue(2, 2);
        assert!(matches!(tx2.push(a, 1), Pushed::Queued));
        assert!(matches!(tx2.push(b, 2), Pushed::Queued));
        assert!(matches!(tx2.push(a, 3), Pushed::Refused(3)));
        let served = drain(&mut rx);
        assert_eq!(served, vec![0, 100, 1, 101, 2, 3, 4, 5]);
    }

    #[tokio::test]
    async fn the_reader_waits_for_requests_and_ends_when_every_sender_has_gone() {
        let (tx, mut rx) = fair_queue::<u32>(4, 4);
        let peer = PeerId::random();
        let other = tx.clone();
        let reading = tokio::spawn(async move {
            let first = rx.recv().await;
            let end = rx.recv().await;
            (first, end)
        });
        tokio::task::yield_now().await;
        assert!(matches!(other.push(peer, 9), Pushed::Queued));
        drop((tx, other));
        let (first, end) = reading.await.unwrap();
        assert_eq!(first, Some(9));
        assert_eq!(end, None);
    }

    #[tokio::test]
    async fn a_queue_without_its_reader_gives_requests_back() {
        let (tx, rx) = fair_queue::<u32>(4, 4);
        drop(rx);
        assert!(matches!(tx.push(PeerId::random(), 1), Pushed::Closed(1)));
    }
}
