//! Fair shares of the inbound bitswap stream slots.
//!
//! The node serves at most `total` inbound streams at once, and at most `per_peer` from
//! one peer. That alone lets `total / per_peer` identities (PeerIds are free) take every
//! slot with silent streams. So when all slots are taken, a peer holding fewer than its
//! fair share (`total` divided among the peers holding slots, itself included) takes the
//! youngest slot of the peer holding the most; a peer at or above its share is refused.
//!
//! [`Slots`] is a deterministic state machine; each slot carries a value `T` (the
//! stream's stop signal) that is handed back when the slot is taken away, so the caller
//! can end that stream.

use libp2p::PeerId;
use std::collections::{HashMap, VecDeque};

/// A slot's number, unique within one [`Slots`].
pub type SlotId = u64;

/// What became of a request for a slot.
#[derive(Debug)]
pub enum Admit<T> {
    /// A free slot was given.
    Given(SlotId),
    /// The slot was taken from `victim`, whose stream should now end (its `T` is given
    /// back).
    Evicted {
        /// The slot given.
        slot: SlotId,
        /// The peer that lost a slot.
        victim: PeerId,
        /// The victim's stop signal.
        stop: T,
    },
    /// No slot: the peer is at its limit or its fair share.
    Refused,
}

/// The inbound stream slots, by peer.
#[derive(Debug)]
pub struct Slots<T> {
    total: usize,
    per_peer: usize,
    next: SlotId,
    used: usize,
    held: HashMap<PeerId, VecDeque<(SlotId, T)>>,
}

impl<T> Slots<T> {
    /// `total` slots in all, at most `per_peer` for one peer.
    pub fn new(total: usize, per_peer: usize) -> Slots<T> {
        Slots {
            total,
            per_peer,
            next: 0,
            used: 0,
            held: HashMap::new(),
        }
    }

    /// Slots in use.
    pub fn used(&self) -> usize {
        self.used
    }

    /// Slots `peer` holds.
    pub fn held_by(&self, peer: &PeerId) -> usize {
        self.held.get(peer).map_or(0, VecDeque::len)
    }

    /// Asks for a slot for `peer`, whose stream stops when `stop` is dropped or handed
    /// back.
    pub fn admit(&mut self, peer: PeerId, stop: T) -> Admit<T> {
        let mine = self.held_by(&peer);
        if mine >= self.per_peer || self.total == 0 {
            return Admit::Refused;
        }
        let mut evicted = None;
        if self.used >= self.total {
            let holders = self.held.len() + usize::from(mine == 0);
            let share = (self.total / holders.max(1)).max(1);
            if mine >= share {
                return Admit::Refused;
            }
            let Some((&victim, _)) = self
                .held
                .iter()
                .filter(|(p, _)| **p != peer)
                .max_by_key(|(_, slots)| slots.len())
            else {
                return Admit::Refused;
            };
            if self.held_by(&victim) <= mine + 1 {
                return Admit::Refused;
            }
            let (_, stop) = self.take_youngest(&victim).expect("the victim holds slots");
            evicted = Some((victim, stop));
        }
        let slot = self.next;
        self.next += 1;
        self.used += 1;
        self.held.entry(peer).or_default().push_back((slot, stop));
        match evicted {
            Some((victim, stop)) => Admit::Evicted { slot, victim, stop },
            None => Admit::Given(slot),
        }
    }

    fn take_youngest(&mut self, peer: &PeerId) -> Option<(SlotId, T)> {
        let slots = self.held.get_mut(peer)?;
        let taken = slots.pop_back();
        if slots.is_empty() {
            self.held.remove(peer);
        }
        if taken.is_some() {
            self.used -= 1;
        }
        taken
    }

    /// Gives back `peer`'s slot `slot` (a no-op if it was taken away already).
    pub fn release(&mut self, peer: &PeerId, slot: SlotId) {
        let Some(slots) = self.held.get_mut(peer) else {
            return;
        };
        if let Some(i) = slots.iter().position(|(id, _)| *id == slot) {
            slots.remove(i);
            self.used -= 1;
        }
        if slots.is_empty() {
            self.held.remove(peer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(slots: &mut Slots<()>, peers: usize, each: usize) -> Vec<PeerId> {
        let peers: Vec<PeerId> = (0..peers).map(|_| PeerId::random()).collect();
        for p in &peers {
            for _ in 0..each {
                assert!(matches!(slots.admit(*p, ()), Admit::Given(_)));
            }
        }
        peers
    }

    #[test]
    fn a_peer_gets_at_most_its_limit() {
        let mut slots = Slots::new(10, 3);
        let p = PeerId::random();
        for _ in 0..3 {
            assert!(matches!(slots.admit(p, ()), Admit::Given(_)));
        }
        assert!(matches!(slots.admit(p, ()), Admit::Refused));
        assert_eq!(slots.used(), 3);
    }

    #[test]
    fn a_newcomer_takes_a_slot_from_the_largest_holder_when_full() {
        // 64 identities × 16 streams fill 1024 slots.
        let mut slots = Slots::new(1024, 16);
        let hogs = fill(&mut slots, 64, 16);
        let honest = PeerId::random();
        match slots.admit(honest, ()) {
            Admit::Evicted { victim, .. } => assert!(hogs.contains(&victim)),
            other => panic!("the honest peer got no slot: {other:?}"),
        }
        assert_eq!(slots.used(), 1024);
        assert_eq!(slots.held_by(&honest), 1);
        // A hog at its share cannot take the slot back.
        let victim = hogs
            .iter()
            .find(|p| slots.held_by(p) == 15)
            .copied()
            .unwrap();
        assert!(matches!(slots.admit(victim, ()), Admit::Refused));
        // Nor can the others, who hold more than their share already.
        for hog in &hogs {
            assert!(matches!(slots.admit(*hog, ()), Admit::Refused));
        }
        // More honest peers keep getting slots while hogs hold more than they do.
        for _ in 0..64 {
            let p = PeerId::random();
            assert!(matches!(slots.admit(p, ()), Admit::Evicted { .. }));
        }
        assert_eq!(slots.used(), 1024);
    }

    #[test]
    fn releasing_frees_a_slot_once() {
        let mut slots = Slots::new(2, 2);
        let p = PeerId::random();
        let Admit::Given(a) = slots.admit(p, ()) else {
            panic!()
        };
        slots.release(&p, a);
        slots.release(&p, a);
        assert_eq!(slots.used(), 0);
        assert_eq!(slots.held_by(&p), 0);
    }

    #[test]
    fn an_evicted_slot_released_later_is_not_counted_twice() {
        let mut slots = Slots::new(2, 2);
        let hog = PeerId::random();
        let Admit::Given(first) = slots.admit(hog, ()) else {
            panic!()
        };
        let Admit::Given(second) = slots.admit(hog, ()) else {
            panic!()
        };
        let Admit::Evicted { victim, .. } = slots.admit(PeerId::random(), ()) else {
            panic!()
        };
        assert_eq!(victim, hog);
        slots.release(&hog, second);
        assert_eq!(slots.used(), 2);
        slots.release(&hog, first);
        assert_eq!(slots.used(), 1);
    }
}
