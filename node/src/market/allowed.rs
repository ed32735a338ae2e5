//! Who may schedule on this volunteer: with `--schedulers`, only the listed PeerIds
//! (and this node itself) may reserve its memory or run calls on it; without, anyone.

use libp2p::PeerId;
use std::collections::HashSet;

/// The peers allowed to reserve and run calls here.
#[derive(Debug, Clone)]
pub(super) struct Schedulers {
    /// `None`: anyone.
    listed: Option<HashSet<PeerId>>,
    local: PeerId,
}

impl Schedulers {
    /// Anyone when `listed` is empty, else only those peers and `local`.
    pub(super) fn new(local: PeerId, listed: &[PeerId]) -> Schedulers {
        Schedulers {
            listed: (!listed.is_empty()).then(|| listed.iter().copied().collect()),
            local,
        }
    }

    /// Whether `peer` may reserve and run calls here.
    pub(super) fn allow(&self, peer: &PeerId) -> bool {
        *peer == self.local || self.listed.as_ref().is_none_or(|l| l.contains(peer))
    }
}

/// The answer to a peer that is not listed.
pub(super) const NOT_LISTED: &str = "this volunteer runs calls only for the schedulers it lists";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listed_peers_and_this_node_are_allowed() {
        let (me, listed, other) = (PeerId::random(), PeerId::random(), PeerId::random());
        let open = Schedulers::new(me, &[]);
        assert!(open.allow(&other) && open.allow(&me));
        let closed = Schedulers::new(me, &[listed]);
        assert!(closed.allow(&listed) && closed.allow(&me));
        assert!(!closed.allow(&other));
    }
}
