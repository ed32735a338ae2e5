//! Receipts a scheduler passed on to remote clients with their signatures unchecked (the
//! client checks each one): the last [`MAX_KEPT`] are kept, by client and invocation id.
//! When a client reports that it refused one, the scheduler checks the copy it passed on,
//! not the client's word, and forgets the volunteer if its signature does not verify. A
//! report costs one check, and only for a receipt this scheduler passed on to that very
//! client, so reports cannot frame an honest volunteer or make the scheduler work for
//! nothing.

use flotilla_api::receipt::Receipt;
use libp2p::PeerId;
use std::collections::{HashMap, VecDeque};

/// Most receipts kept (about 1 KiB each).
pub(super) const MAX_KEPT: usize = 1024;

/// A call: the client and its invocation id.
type Call = (PeerId, u64);

/// The receipts kept, oldest first out.
#[derive(Default)]
pub(super) struct Unchecked {
    /// Each kept receipt, with the number it was kept under.
    by_call: HashMap<Call, (u64, PeerId, Box<Receipt>)>,
    /// Calls in the order they were kept, with that number: an entry whose call was
    /// taken, or kept again since, no longer matches and removes nothing when it goes.
    order: VecDeque<(Call, u64)>,
    next: u64,
}

impl Unchecked {
    /// Keeps `receipt`, from `volunteer`, passed on to `client` for its invocation
    /// `invocation_id`; the oldest goes when [`MAX_KEPT`] are kept.
    pub(super) fn keep(
        &mut self,
        client: PeerId,
        invocation_id: u64,
        volunteer: PeerId,
        receipt: Box<Receipt>,
    ) {
        let call = (client, invocation_id);
        self.next += 1;
        self.by_call.insert(call, (self.next, volunteer, receipt));
        self.order.push_back((call, self.next));
        while self.order.len() > MAX_KEPT {
            if let Some((oldest, kept_as)) = self.order.pop_front()
                && self
                    .by_call
                    .get(&oldest)
                    .is_some_and(|(n, ..)| *n == kept_as)
            {
                self.by_call.remove(&oldest);
            }
        }
    }

    /// The volunteer and receipt passed on to `client` for `invocation_id`, if kept
    /// still; a receipt is handed out once.
    pub(super) fn take(
        &mut self,
        client: PeerId,
        invocation_id: u64,
    ) -> Option<(PeerId, Box<Receipt>)> {
        self.by_call
            .remove(&(client, invocation_id))
            .map(|(_, volunteer, receipt)| (volunteer, receipt))
    }

    /// How many are kept.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_call.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_api::function::ExecutionTimings;
    use flotilla_api::receipt::{ReceiptBody, StreamDigest};
    use libp2p::identity::Keypair;

    fn receipt(volunteer: &Keypair) -> Box<Receipt> {
        let digest = StreamDigest {
            size: 0,
            sha256: String::new(),
            cid: None,
        };
        let body = ReceiptBody {
            volunteer: volunteer.public().to_peer_id(),
            scheduler: PeerId::random(),
            invocation_id: 1,
            reservation_id: 2,
            module: String::new(),
            inputs: Vec::new(),
            args_digest: String::new(),
            memory_mib: 128,
            exit_code: 0,
            failure: None,
            stdout: digest.clone(),
            stderr: digest,
            outputs: Vec::new(),
            timings: ExecutionTimings::default(),
            pure: false,
            signed_at_ms: 0,
        };
        Box::new(Receipt::sign(body, volunteer))
    }

    #[test]
    fn a_receipt_is_handed_out_once_and_only_to_the_client_it_was_passed_on_to() {
        let volunteer = Keypair::generate_ed25519();
        let (client, stranger) = (PeerId::random(), PeerId::random());
        let mut kept = Unchecked::default();
        kept.keep(
            client,
            7,
            volunteer.public().to_peer_id(),
            receipt(&volunteer),
        );
        assert!(kept.take(stranger, 7).is_none());
        assert!(kept.take(client, 8).is_none());
        let (who, _) = kept.take(client, 7).expect("kept");
        assert_eq!(who, volunteer.public().to_peer_id());
        assert!(kept.take(client, 7).is_none());
    }

    #[test]
    fn no_more_than_the_bound_are_kept_and_the_oldest_go_first() {
        let volunteer = Keypair::generate_ed25519();
        let peer = volunteer.public().to_peer_id();
        let client = PeerId::random();
        let mut kept = Unchecked::default();
        let one = receipt(&volunteer);
        for id in 0..(MAX_KEPT as u64 * 3) {
            kept.keep(client, id, peer, one.clone());
            // Reports of every other call.
            if id % 2 == 0 {
                kept.take(client, id);
            }
            assert!(kept.len() <= MAX_KEPT);
            assert!(kept.order.len() <= MAX_KEPT);
        }
        assert!(kept.take(client, 1).is_none(), "the oldest went");
        assert!(kept.take(client, MAX_KEPT as u64 * 3 - 1).is_some());
    }

    #[test]
    fn a_call_kept_again_after_it_was_taken_stays_among_the_newest() {
        let volunteer = Keypair::generate_ed25519();
        let peer = volunteer.public().to_peer_id();
        let client = PeerId::random();
        let mut kept = Unchecked::default();
        let one = receipt(&volunteer);
        // A client may reuse an invocation id: its first entry in the order must not take
        // the newer receipt with it when it goes.
        kept.keep(client, 0, peer, one.clone());
        kept.take(client, 0);
        kept.keep(client, 0, peer, one.clone());
        for id in 1..MAX_KEPT as u64 {
            kept.keep(client, id, peer, one.clone());
        }
        assert_eq!(kept.len(), MAX_KEPT);
        assert!(kept.take(client, 0).is_some(), "kept among the newest");
    }
}
