//! The super-trader list: offers that offering peers report directly to a scheduler in
//! the background, used when probing the key regions finds nothing.
//!
//! Each entry is a signed offer (checked like a holder checks it, but without a key
//! region), kept until its TTL here or its own expiry, whichever comes first. The list is
//! bounded per offerer and in total; when full, the entry heard of longest ago goes.
//!
//! Reporting costs nothing and PeerIds are free, so an offer is only trusted once its
//! offerer has answered this scheduler (a reservation granted or refused): a **proven**
//! offerer. Offers of unproven offerers fill at most `max_unproven` places, so a flood
//! of fresh identities can only push out other unproven offers, never a proven one; a
//! lookup hands out the proven offers that fit, and only when there are none, at most
//! `unproven_tried` unproven ones picked at random, so blackhole offers cost a discovery
//! a bounded number of tries. An offerer
//! that did not answer is forgotten with all its offers, and its reports are ignored for
//! `failed_ms`.

use flotilla_offers::offer::SignedOffer;
use libp2p::PeerId;
use rand::Rng;
use rand::seq::IndexedRandom;
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
    /// Most offers kept of offerers that have not answered this scheduler yet (default
    /// 1024).
    pub max_unproven: usize,
    /// Most offers of unproven offerers handed out by one lookup (default 4).
    pub unproven_tried: usize,
    /// How long the reports of an offerer that failed to answer are ignored, in ms
    /// (default 60 s).
    pub failed_ms: u64,
}

impl SuperTraderConfig {
    /// A list that trusts every offerer as if it had answered: for simulations whose
    /// peers are all honest, where the limits on unproven offerers would only change the
    /// figures.
    pub fn trusting() -> SuperTraderConfig {
        SuperTraderConfig {
            max_unproven: usize::MAX,
            unproven_tried: usize::MAX,
            ..SuperTraderConfig::default()
        }
    }
}

impl Default for SuperTraderConfig {
    fn default() -> Self {
        SuperTraderConfig {
            max_offers: 4096,
            max_per_offerer: 16,
            ttl_ms: 30_000,
            max_unproven: 1024,
            unproven_tried: 4,
            failed_ms: 60_000,
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
    /// Offerers that answered, and when they last did (at most `max_offers`).
    proven: HashMap<PeerId, u64>,
    /// Offerers that failed to answer, and until when their reports are ignored (at
    /// most `max_offers`).
    failed: HashMap<PeerId, u64>,
}

impl SuperTraders {
    /// An empty list.
    pub fn new(config: SuperTraderConfig) -> SuperTraders {
        SuperTraders {
            config,
            entries: HashMap::new(),
            proven: HashMap::new(),
            failed: HashMap::new(),
        }
    }

    /// Whether `offerer` has answered this scheduler (or the list trusts everyone).
    pub fn is_proven(&self, offerer: &PeerId) -> bool {
        self.config.unproven_tried == usize::MAX || self.proven.contains_key(offerer)
    }

    /// Records that `offerer` answered a request (granted or refused it): its offers are
    /// trusted from now on.
    pub fn answered(&mut self, now_ms: u64, offerer: PeerId) {
        self.failed.remove(&offerer);
        if !self.proven.contains_key(&offerer)
            && self.proven.len() >= self.config.max_offers
            && let Some(stalest) = self.proven.iter().min_by_key(|(_, at)| **at)
        {
            let stalest = *stalest.0;
            self.proven.remove(&stalest);
        }
        self.proven.insert(offerer, now_ms);
    }

    /// Records that `offerer` did not answer: its offers are forgotten and its reports
    /// ignored for `failed_ms`.
    pub fn failed(&mut self, now_ms: u64, offerer: PeerId) {
        self.entries.retain(|(p, _), _| *p != offerer);
        self.proven.remove(&offerer);
        self.failed.retain(|_, until| *until > now_ms);
        if self.failed.len() >= self.config.max_offers
            && let Some(soonest) = self.failed.iter().min_by_key(|(_, until)| **until)
        {
            let soonest = *soonest.0;
            self.failed.remove(&soonest);
        }
        self.failed
            .insert(offerer, now_ms.saturating_add(self.config.failed_ms));
    }

    fn unproven_len(&self) -> usize {
        self.entries
            .keys()
            .filter(|(p, _)| !self.is_proven(p))
            .count()
    }

    /// Removes the entry heard of longest ago among those `eligible`.
    fn evict_oldest(&mut self, eligible: impl Fn(&Self, &PeerId) -> bool) {
        if let Some(oldest) = self
            .entries
            .iter()
            .filter(|((p, _), _)| eligible(self, p))
            .min_by_key(|(_, e)| e.heard_at_ms)
            .map(|(k, _)| *k)
        {
            self.entries.remove(&oldest);
        }
    }

    fn valid_until(&self, entry: &Entry) -> u64 {
        (entry.heard_at_ms + self.config.ttl_ms).min(entry.offer.body.expires_at_ms)
    }

    /// Takes an offerer's report of what it has free; returns how many offers were
    /// accepted. Forged, expired and outdated offers are ignored; a withdrawal removes
    /// its offer.
    pub fn notify(&mut self, now_ms: u64, offers: Vec<SignedOffer>) -> usize {
        let signed = offers.into_iter().filter(|o| o.verify().is_ok()).collect();
        self.accept(now_ms, signed)
    }

    /// [`SuperTraders::notify`] for offers that `from` sent itself, over a connection
    /// that authenticates it: only its own offers are taken, and their signatures are
    /// not checked again (the list hands its offers to nobody; it places calls on them
    /// with their offerer, which knows its own offers). This saves an ed25519 check on
    /// every call's answer, which brings the offer's new version.
    pub fn notify_from_offerer(
        &mut self,
        now_ms: u64,
        from: PeerId,
        offers: Vec<SignedOffer>,
    ) -> usize {
        let own = offers
            .into_iter()
            .filter(|o| o.body.offerer == from)
            .collect();
        self.accept(now_ms, own)
    }

    fn accept(&mut self, now_ms: u64, offers: Vec<SignedOffer>) -> usize {
        let mut accepted = 0;
        for offer in offers {
            if offer.body.expires_at_ms <= now_ms {
                continue;
            }
            if self
                .failed
                .get(&offer.body.offerer)
                .is_some_and(|until| *until > now_ms)
            {
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
                let proven = self.is_proven(&id.0);
                if self.entries.len() >= self.config.max_offers
                    || (!proven && self.unproven_len() >= self.config.max_unproven)
                {
                    self.evict(now_ms);
                }
                if !proven && self.unproven_len() >= self.config.max_unproven {
                    // An unproven offer only ever displaces another unproven one.
                    self.evict_oldest(|list, p| !list.is_proven(p));
                }
                if self.entries.len() >= self.config.max_offers {
                    // Unproven offers go first; a proven one only for another proven.
                    if self.unproven_len() > 0 {
                        self.evict_oldest(|list, p| !list.is_proven(p));
                    } else if proven {
                        self.evict_oldest(|_, _| true);
                    } else {
                        continue;
                    }
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
    /// The proven ones, or if none, at most `unproven_tried` others picked at random;
    /// none of `excluded`'s.
    pub fn recent(
        &self,
        now_ms: u64,
        mib: u32,
        within_ms: u64,
        excluded: &[PeerId],
        rng: &mut impl Rng,
    ) -> Vec<SignedOffer> {
        self.pick(
            |e| {
                !excluded.contains(&e.offer.body.offerer)
                    && e.heard_at_ms + within_ms > now_ms
                    && self.valid_until(e) > now_ms
                    && e.offer.body.free_mib() >= mib
            },
            rng,
        )
    }

    /// Valid offers with at least `mib` MiB free, of offerers not `excluded` (those that
    /// failed the call already): the proven ones, or if none, at most `unproven_tried`
    /// others picked at random.
    pub fn fitting(
        &self,
        now_ms: u64,
        mib: u32,
        excluded: &[PeerId],
        rng: &mut impl Rng,
    ) -> Vec<SignedOffer> {
        self.pick(
            |e| {
                !excluded.contains(&e.offer.body.offerer)
                    && self.valid_until(e) > now_ms
                    && e.offer.body.free_mib() >= mib
            },
            rng,
        )
    }

    fn pick(&self, wanted: impl Fn(&Entry) -> bool, rng: &mut impl Rng) -> Vec<SignedOffer> {
        let (proven, unproven): (Vec<&Entry>, Vec<&Entry>) = self
            .entries
            .values()
            .filter(|e| wanted(e))
            .partition(|e| self.is_proven(&e.offer.body.offerer));
        if !proven.is_empty() {
            return proven.into_iter().map(|e| e.offer.clone()).collect();
        }
        let tried = self.config.unproven_tried.min(unproven.len());
        unproven
            .choose_multiple(rng, tried)
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
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn reports_are_checked_kept_for_their_ttl_and_bounded() {
        let config = SuperTraderConfig {
            max_offers: 3,
            max_per_offerer: 2,
            ttl_ms: 1_000,
            ..SuperTraderConfig::trusting()
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
        assert_eq!(
            list.fitting(10, 300, &[], &mut StdRng::seed_from_u64(1))
                .len(),
            1
        );
        assert_eq!(
            list.fitting(10, 200, &[], &mut StdRng::seed_from_u64(1))
                .len(),
            2
        );
        // Full: the entry heard of longest ago makes room.
        assert_eq!(
            list.notify(100, vec![offer(&b, 1, 128, 0), offer(&b, 2, 128, 0)]),
            2
        );
        assert_eq!(list.len(), 3);
        // Past the TTL nothing is offered, and eviction empties the list.
        assert!(
            list.fitting(1_100, 100, &[], &mut StdRng::seed_from_u64(1))
                .is_empty()
        );
        list.evict(1_100);
        assert!(list.is_empty());
    }

    #[test]
    fn an_offerer_reports_only_its_own_offers() {
        let mut list = SuperTraders::new(SuperTraderConfig::trusting());
        let a = Keypair::generate_ed25519();
        let b = Keypair::generate_ed25519();
        let from = a.public().to_peer_id();
        // b's offer, brought by a, is not a's to report, signed or not.
        assert_eq!(
            list.notify_from_offerer(0, from, vec![offer(&b, 1, 512, 0)]),
            0
        );
        assert_eq!(
            list.notify_from_offerer(0, from, vec![offer(&a, 1, 512, 0)]),
            1
        );
        assert_eq!(list.len(), 1);
        // The rest of the rules hold as for any report: an older version is ignored, a
        // withdrawal removes its offer.
        let mut gone = offer(&a, 1, 512, 0).body;
        gone.seq = 2;
        gone.withdrawn = true;
        let gone = SignedOffer::sign(gone, &a).unwrap();
        assert_eq!(list.notify_from_offerer(1, from, vec![gone]), 0);
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

    #[test]
    fn a_flood_of_fresh_identities_never_displaces_offerers_that_answered() {
        let mut list = SuperTraders::new(SuperTraderConfig::default());
        let mut rng = StdRng::seed_from_u64(7);
        let honest = Keypair::generate_ed25519();
        list.notify(0, vec![offer(&honest, 1, 512, 0)]);
        list.answered(0, honest.public().to_peer_id());
        // 256 identities report 16 blackhole offers each: 4096, the whole list.
        for _ in 0..256 {
            let sybil = Keypair::generate_ed25519();
            let offers = (1..=16).map(|id| offer(&sybil, id, 512, 0)).collect();
            list.notify(1, offers);
        }
        assert!(
            list.len() <= 1 + 1024,
            "unproven offers fill a quarter at most"
        );
        let fitting = list.fitting(2, 256, &[], &mut rng);
        assert_eq!(fitting.len(), 1, "only the proven offer while one fits");
        assert_eq!(fitting[0].body.offerer, honest.public().to_peer_id());
        assert_eq!(
            list.fitting(2, 1024, &[], &mut rng).len(),
            0,
            "nothing proven fits, and none of the rest does"
        );
        let excluded = [honest.public().to_peer_id()];
        assert_eq!(
            list.fitting(2, 256, &excluded, &mut rng).len(),
            4,
            "the proven offerer failed this call: 4 unproven"
        );
        list.failed(3, honest.public().to_peer_id());
        assert_eq!(
            list.fitting(3, 256, &[], &mut rng).len(),
            4,
            "nothing proven fits: 4 unproven"
        );
    }

    #[test]
    fn an_offerer_that_failed_to_answer_is_forgotten_and_ignored_for_a_while() {
        let mut list = SuperTraders::new(SuperTraderConfig::default());
        let liar = Keypair::generate_ed25519();
        let peer = liar.public().to_peer_id();
        list.notify(0, vec![offer(&liar, 1, 512, 0), offer(&liar, 2, 512, 0)]);
        list.answered(0, peer);
        assert!(list.is_proven(&peer));
        list.failed(10, peer);
        assert!(list.is_empty());
        assert!(!list.is_proven(&peer));
        assert_eq!(list.notify(20, vec![offer(&liar, 3, 512, 0)]), 0);
        assert_eq!(list.notify(60_010, vec![offer(&liar, 3, 512, 0)]), 1);
    }
}
