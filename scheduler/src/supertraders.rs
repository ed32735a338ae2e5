//! The super-trader list: offers that offering peers report directly to a scheduler in
//! the background, used when probing the key regions finds nothing.
//!
//! Each entry is a signed offer (checked like a holder checks it, but without a key
//! region), kept until its TTL here or its own expiry, whichever comes first. The list is
//! bounded per offerer and in total; when full, the entry heard of longest ago goes.

use flotilla_offers::offer::SignedOffer;
use libp2p::PeerId;
use std::collections::HashMap;

/// Limits of the list.
#[derive(Debug, Clone)]
pub struct SuperTraderConfig {
    /// Most offers kept (default 4096).
    pub max_offers: usize,
    /// Most offers kept per offerer (default 16).
    pub max_per_offerer: usize,
    /// How long an entry lasts after its last report, in ms (default 30 s).
    pub ttl_ms: u64,
}

impl Default for SuperTraderConfig {
    fn default() -> Self {
        SuperTraderConfig {
            max_offers: 4096,
            max_per_offerer: 16,
            ttl_ms: 30_000,
        }
    }
}

struct Entry {
    offer: SignedOffer,
    heard_at_ms: u64,
}

/// A scheduler's fallback list.
pub struct SuperTraders {
    config: SuperTraderConfig,
    entries: HashMap<(PeerId, u64), Entry>,
}

impl SuperTraders {
    /// An empty list.
    pub fn new(config: SuperTraderConfig) -> SuperTraders {
        SuperTraders {
            config,
            entries: HashMap::new(),
        }
    }

    fn valid_until(&self, entry: &Entry) -> u64 {
        (entry.heard_at_ms + self.config.ttl_ms).min(entry.offer.body.expires_at_ms)
    }

    /// Takes an offerer's report of what it has free; returns how many offers were
    /// accepted. Forged, expired and outdated offers are ignored; a withdrawal removes
    /// its offer.
    pub fn notify(&mut self, now_ms: u64, offers: Vec<SignedOffer>) -> usize {
        let mut accepted = 0;
        for offer in offers {
            if offer.verify().is_err() || offer.body.expires_at_ms <= now_ms {
                continue;
            }
            let id = (offer.body.offerer, offer.body.offer_id);
            if let Some(old) = self.entries.get(&id)
                && old.offer.body.seq > offer.body.seq
            {
                continue;
            }
            if offer.body.withdrawn {
                self.entries.remove(&id);
                continue;
            }
            if !self.entries.contains_key(&id) {
                let from_offerer = self.entries.keys().filter(|(p, _)| *p == id.0).count();
                if from_offerer >= self.config.max_per_offerer {
                    continue;
                }
                if self.entries.len() >= self.config.max_offers {
                    self.evict(now_ms);
                }
                if self.entries.len() >= self.config.max_offers
                    && let Some(oldest) = self
                        .entries
                        .iter()
                        .min_by_key(|(_, e)| e.heard_at_ms)
                        .map(|(k, _)| *k)
                {
                    self.entries.remove(&oldest);
                }
            }
            self.entries.insert(
                id,
                Entry {
                    offer,
                    heard_at_ms: now_ms,
                },
            );
            accepted += 1;
        }
        accepted
    }

    /// Drops entries past their TTL or expiry.
    pub fn evict(&mut self, now_ms: u64) {
        let ttl = self.config.ttl_ms;
        self.entries
            .retain(|_, e| (e.heard_at_ms + ttl).min(e.offer.body.expires_at_ms) > now_ms);
    }

    /// Valid offers with at least `mib` MiB free whose offerer told of them within the
    /// last `within_ms`: offers confirmed free a moment ago, tried before any discovery.
    pub fn recent(&self, now_ms: u64, mib: u32, within_ms: u64) -> Vec<SignedOffer> {
        self.entries
            .values()
            .filter(|e| {
                e.heard_at_ms + within_ms > now_ms
                    && self.valid_until(e) > now_ms
                    && e.offer.body.free_mib() >= mib
            })
            .map(|e| e.offer.clone())
            .collect()
    }

    /// Valid offers with at least `mib` MiB free.
    pub fn fitting(&self, now_ms: u64, mib: u32) -> Vec<SignedOffer> {
        self.entries
            .values()
            .filter(|e| self.valid_until(e) > now_ms && e.offer.body.free_mib() >= mib)
            .map(|e| e.offer.clone())
            .collect()
    }

    /// Forgets an offer's version `seq` (its offerer refused a reservation on it, say),
    /// keeping a newer one that arrived meanwhile.
    pub fn remove(&mut self, offerer: &PeerId, offer_id: u64, seq: u64) {
        let id = (*offerer, offer_id);
        if self
            .entries
            .get(&id)
            .is_some_and(|e| e.offer.body.seq <= seq)
        {
            self.entries.remove(&id);
        }
    }

    /// Offers in the list (valid or not yet evicted).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::tests::offer;
    use libp2p::identity::Keypair;

    #[test]
    fn reports_are_checked_kept_for_their_ttl_and_bounded() {
        let config = SuperTraderConfig {
            max_offers: 3,
            max_per_offerer: 2,
            ttl_ms: 1_000,
        };
        let mut list = SuperTraders::new(config);
        let a = Keypair::generate_ed25519();
        let b = Keypair::generate_ed25519();
        let mut forged = offer(&a, 9, 512, 0);
        forged.body.memory_mib = 1000;
        assert_eq!(
            list.notify(0, vec![offer(&a, 1, 512, 0), offer(&a, 2, 256, 0), forged]),
            2
        );
        assert_eq!(
            list.notify(0, vec![offer(&a, 3, 256, 0)]),
            0,
            "two per offerer"
        );
        assert_eq!(list.fitting(10, 300).len(), 1);
        assert_eq!(list.fitting(10, 200).len(), 2);
        // Full: the entry heard of longest ago makes room.
        assert_eq!(
            list.notify(100, vec![offer(&b, 1, 128, 0), offer(&b, 2, 128, 0)]),
            2
        );
        assert_eq!(list.len(), 3);
        // Past the TTL nothing is offered, and eviction empties the list.
        assert!(list.fitting(1_100, 100).is_empty());
        list.evict(1_100);
        assert!(list.is_empty());
    }

    #[test]
    fn withdrawals_and_refusals_remove_offers() {
        let mut list = SuperTraders::new(SuperTraderConfig::default());
        let a = Keypair::generate_ed25519();
        list.notify(0, vec![offer(&a, 1, 512, 0), offer(&a, 2, 512, 0)]);
        let mut gone = offer(&a, 1, 512, 0).body;
        gone.seq = 2;
        gone.withdrawn = true;
        list.notify(1, vec![SignedOffer::sign(gone, &a).unwrap()]);
        let offerer = a.public().to_peer_id();
        // A refusal of version 1 of offer 2 forgets it, unless a newer version arrived
        // meanwhile (with another call's answer).
        let mut newer = offer(&a, 2, 512, 128).body;
        newer.seq = 2;
        list.notify(2, vec![SignedOffer::sign(newer, &a).unwrap()]);
        list.remove(&offerer, 2, 1);
        assert_eq!(list.len(), 1, "the newer version stays");
        list.remove(&offerer, 2, 2);
        assert!(list.is_empty());
    }
}
