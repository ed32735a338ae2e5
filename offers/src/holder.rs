//! The holder side (offers received): the peer closest to an offer's key keeps it while it
//! is valid, and answers schedulers' questions about what it holds.
//!
//! An offer is accepted only if its signature verifies, the key it was sent under lies in
//! its tier's region (any key, with [`KeySpace::Whole`], the research baseline), it has
//! not expired (nor expires implausibly far ahead), and its
//! sequence number is newer than any version already seen. Every refusal is counted by
//! reason. Entries are bounded per offerer and in total; a withdrawn offer leaves a
//! tombstone (counted against its offerer) until its last expiry, so an older version
//! cannot be replayed to bring it back.
//!
//! Offers from the network ([`Holder::receive_from`]) must also come from their offerer
//! itself, so that each identity needs its own connection; under a key this holder is
//! among the [`HolderConfig::closest_k`] closest to (as far as its routing table knows),
//! since nobody probes for them elsewhere; and within a bound per address prefix of the
//! connection they came on, since identities are free but addresses are not.

use crate::offer::{OfferError, SignedOffer};
use flotilla_overlay::presence::Prefix;
use flotilla_overlay::regions::{KeySpace, Tier};
use libp2p::PeerId;
use std::collections::{BTreeMap, HashMap};

/// Limits of a holder.
#[derive(Debug, Clone, PartialEq)]
pub struct HolderConfig {
    /// Most offers (live or withdrawn) kept per offerer (default 16).
    pub max_per_offerer: usize,
    /// Most offers kept in all (default 10 000).
    pub max_total: usize,
    /// Furthest ahead an offer may expire, in ms (default 10 minutes).
    pub max_lifetime_ms: u64,
    /// Which keys offers may be held under (default [`KeySpace::Regions`]: only keys in
    /// their tier's region), and so which offers answer a probe ([`Holder::answer`]).
    /// Offerers and schedulers must use the same.
    pub key_space: KeySpace,
    /// An offer from the network is held only if fewer peers than this that the holder
    /// knows are closer to its key (default 20, Kademlia's replication factor: the
    /// offerer's lookup may have missed peers the holder knows).
    pub closest_k: usize,
    /// Most offers (live or withdrawn) kept that came from one address prefix
    /// ([`Prefix`]: a /24 or /48) (default 625, a sixteenth of the total).
    pub max_per_prefix: usize,
}

impl Default for HolderConfig {
    fn default() -> Self {
        HolderConfig {
            max_per_offerer: 16,
            max_total: 10_000,
            max_lifetime_ms: 10 * 60 * 1000,
            key_space: KeySpace::Regions,
            closest_k: 20,
            max_per_prefix: 625,
        }
    }
}

/// How an offer reached the holder, as the node saw it.
#[derive(Debug, Clone, Copy)]
pub struct Delivery {
    /// The peer that sent it.
    pub from: PeerId,
    /// The address prefix of its connection (`None` when not over IP, or in-process).
    pub prefix: Option<Prefix>,
    /// Peers the holder knows closer to the key than itself.
    pub closer_known: usize,
}

/// Why a holder refused an offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rejection {
    /// The signature does not verify for the offerer.
    BadSignature,
    /// The offer's fields contradict each other.
    Invalid,
    /// The key it was sent under is outside its tier's region (only with
    /// [`KeySpace::Regions`]).
    WrongRegion,
    /// It has expired.
    Expired,
    /// It expires further ahead than holders allow.
    TooLong,
    /// Its sequence number is not newer than one already seen.
    Replayed,
    /// Its offerer already has the most offers allowed here.
    OffererFull,
    /// It was sent by a peer other than its offerer.
    NotFromOfferer,
    /// This holder is not among the peers closest to the key it was sent under.
    NotClosest,
    /// Its sender's address prefix already has the most offers allowed here.
    PrefixFull,
    /// This holder holds the most offers allowed.
    HolderFull,
}

impl Rejection {
    /// A short name, for metric labels and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::BadSignature => "bad_signature",
            Rejection::Invalid => "invalid",
            Rejection::WrongRegion => "wrong_region",
            Rejection::Expired => "expired",
            Rejection::TooLong => "too_long",
            Rejection::Replayed => "replayed",
            Rejection::OffererFull => "offerer_full",
            Rejection::NotFromOfferer => "not_from_offerer",
            Rejection::NotClosest => "not_closest",
            Rejection::PrefixFull => "prefix_full",
            Rejection::HolderFull => "holder_full",
        }
    }
}

/// What an accepted offer did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// A new offer is held.
    Stored,
    /// A newer version replaced the one held.
    Refreshed,
    /// The offer was withdrawn.
    Withdrawn,
}

struct Entry {
    seq: u64,
    expires_at_ms: u64,
    /// `None` once withdrawn.
    offer: Option<SignedOffer>,
    /// The prefix its first version came from, which it is counted against.
    prefix: Option<Prefix>,
}

/// The offers a peer holds for others.
pub struct Holder {
    config: HolderConfig,
    entries: HashMap<(PeerId, u64), Entry>,
    per_offerer: HashMap<PeerId, usize>,
    per_prefix: HashMap<Prefix, usize>,
    rejected: BTreeMap<Rejection, u64>,
    expired: u64,
}

impl Holder {
    /// An empty holder.
    pub fn new(config: HolderConfig) -> Holder {
        Holder {
            config,
            entries: HashMap::new(),
            per_offerer: HashMap::new(),
            per_prefix: HashMap::new(),
            rejected: BTreeMap::new(),
            expired: 0,
        }
    }

    /// Takes an offer sent under `key` at time `now_ms` by its offerer, from no address
    /// prefix, to the holder closest to the key: a trusted delivery (simulations).
    pub fn receive(
        &mut self,
        now_ms: u64,
        key: &[u8],
        offer: SignedOffer,
    ) -> Result<Accepted, Rejection> {
        let delivery = Delivery {
            from: offer.body.offerer,
            prefix: None,
            closer_known: 0,
        };
        self.receive_from(now_ms, key, offer, delivery)
    }

    /// Takes an offer sent under `key` at time `now_ms` over the network, as `delivery`
    /// says.
    pub fn receive_from(
        &mut self,
        now_ms: u64,
        key: &[u8],
        offer: SignedOffer,
        delivery: Delivery,
    ) -> Result<Accepted, Rejection> {
        let outcome = self.check_and_store(now_ms, key, offer, delivery);
        if let Err(reason) = outcome {
            *self.rejected.entry(reason).or_default() += 1;
        }
        outcome
    }

    fn check_and_store(
        &mut self,
        now_ms: u64,
        key: &[u8],
        offer: SignedOffer,
        delivery: Delivery,
    ) -> Result<Accepted, Rejection> {
        // The cheap checks first, before the signature's.
        if delivery.from != offer.body.offerer {
            return Err(Rejection::NotFromOfferer);
        }
        if delivery.closer_known >= self.config.closest_k {
            return Err(Rejection::NotClosest);
        }
        offer.verify().map_err(|e| match e {
            OfferError::Invalid(_) => Rejection::Invalid,
            _ => Rejection::BadSignature,
        })?;
        let body = &offer.body;
        if body.expires_at_ms <= now_ms {
            return Err(Rejection::Expired);
        }
        if body.expires_at_ms > now_ms.saturating_add(self.config.max_lifetime_ms) {
            return Err(Rejection::TooLong);
        }
        if !self.config.key_space.admits(body.tier, key) {
            return Err(Rejection::WrongRegion);
        }
        let id = (body.offerer, body.offer_id);
        if let Some(entry) = self.entries.get_mut(&id) {
            if body.seq <= entry.seq {
                return Err(Rejection::Replayed);
            }
            entry.seq = body.seq;
            entry.expires_at_ms = entry.expires_at_ms.max(body.expires_at_ms);
            if body.withdrawn {
                entry.offer = None;
                return Ok(Accepted::Withdrawn);
            }
            let was_live = entry.offer.replace(offer).is_some();
            return Ok(if was_live {
                Accepted::Refreshed
            } else {
                Accepted::Stored
            });
        }
        if body.withdrawn {
            // Nothing held to withdraw, and no reason to remember it.
            return Ok(Accepted::Withdrawn);
        }
        if self.per_offerer.get(&body.offerer).copied().unwrap_or(0) >= self.config.max_per_offerer
        {
            return Err(Rejection::OffererFull);
        }
        if let Some(prefix) = delivery.prefix
            && self.per_prefix.get(&prefix).copied().unwrap_or(0) >= self.config.max_per_prefix
        {
            return Err(Rejection::PrefixFull);
        }
        if self.entries.len() >= self.config.max_total {
            return Err(Rejection::HolderFull);
        }
        *self.per_offerer.entry(body.offerer).or_default() += 1;
        if let Some(prefix) = delivery.prefix {
            *self.per_prefix.entry(prefix).or_default() += 1;
        }
        let entry = Entry {
            seq: body.seq,
            expires_at_ms: body.expires_at_ms,
            offer: Some(offer),
            prefix: delivery.prefix,
        };
        self.entries.insert(id, entry);
        Ok(Accepted::Stored)
    }

    /// Drops offers (and tombstones) that have expired by `now_ms`; returns how many live
    /// offers expired.
    pub fn evict_expired(&mut self, now_ms: u64) -> usize {
        let mut expired_live = 0;
        let (per_offerer, per_prefix) = (&mut self.per_offerer, &mut self.per_prefix);
        self.entries.retain(|(offerer, _), entry| {
            if entry.expires_at_ms > now_ms {
                return true;
            }
            if entry.offer.is_some() {
                expired_live += 1;
            }
            uncount(per_offerer, offerer);
            if let Some(prefix) = &entry.prefix {
                uncount(per_prefix, prefix);
            }
            false
        });
        self.expired += expired_live as u64;
        expired_live
    }

    /// Live offers with at least `mib` MiB free, not expired at `now_ms`.
    pub fn matching(&self, now_ms: u64, mib: u32) -> Vec<&SignedOffer> {
        self.live(now_ms)
            .filter(|o| o.body.free_mib() >= mib)
            .collect()
    }

    /// The offers that answer a scheduler probing for `min_free_mib` MiB in `tier`'s
    /// region: live ones with that much free, of that tier only with
    /// [`KeySpace::Regions`] (offers of other tiers here came from keys of other regions),
    /// of any tier with [`KeySpace::Whole`], where every holder keeps every tier.
    pub fn answer(&self, now_ms: u64, tier: Tier, min_free_mib: u32) -> Vec<&SignedOffer> {
        let any_tier = self.config.key_space == KeySpace::Whole;
        self.matching(now_ms, min_free_mib)
            .into_iter()
            .filter(|o| any_tier || o.body.tier == tier)
            .collect()
    }

    /// Every live offer, not expired at `now_ms`.
    pub fn live(&self, now_ms: u64) -> impl Iterator<Item = &SignedOffer> {
        self.entries
            .values()
            .filter_map(move |e| e.offer.as_ref().filter(|o| o.body.expires_at_ms > now_ms))
    }

    /// When the next held offer or tombstone expires: the time to call
    /// [`Holder::evict_expired`] again.
    pub fn next_expiry(&self) -> Option<u64> {
        self.entries.values().map(|e| e.expires_at_ms).min()
    }

    /// Offers refused for `reason` so far.
    pub fn rejected(&self, reason: Rejection) -> u64 {
        self.rejected.get(&reason).copied().unwrap_or(0)
    }

    /// Live offers that expired so far.
    pub fn expired(&self) -> u64 {
        self.expired
    }
}

/// Takes one off `key`'s count, forgetting it at zero.
fn uncount<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = counts.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            counts.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offer::tests::body;
    use libp2p::identity::Keypair;
    use rand::SeedableRng;

    fn key_in(tier: Tier, seed: u64) -> Vec<u8> {
        tier.region()
            .random_key(&mut rand::rngs::StdRng::seed_from_u64(seed))
            .0
    }

    fn tier512() -> Tier {
        Tier::from_mib(512).unwrap()
    }

    #[test]
    fn offers_are_stored_refreshed_withdrawn_and_expire() {
        let keypair = Keypair::generate_ed25519();
        let mut holder = Holder::new(HolderConfig::default());
        let key = key_in(tier512(), 1);
        let v1 = SignedOffer::sign(body(&keypair, 7, 1, 10_000), &keypair).unwrap();
        assert_eq!(holder.receive(0, &key, v1), Ok(Accepted::Stored));
        assert_eq!(holder.matching(0, 512).len(), 1);
        assert_eq!(holder.matching(0, 601).len(), 0);
        let v2 = SignedOffer::sign(body(&keypair, 7, 2, 20_000), &keypair).unwrap();
        assert_eq!(holder.receive(5_000, &key, v2), Ok(Accepted::Refreshed));
        assert_eq!(holder.next_expiry(), Some(20_000));
        assert_eq!(holder.evict_expired(15_000), 0);
        assert_eq!(holder.live(15_000).count(), 1);
        let mut gone = body(&keypair, 7, 3, 20_000);
        gone.withdrawn = true;
        let gone = SignedOffer::sign(gone, &keypair).unwrap();
        assert_eq!(holder.receive(6_000, &key, gone), Ok(Accepted::Withdrawn));
        assert_eq!(holder.live(6_000).count(), 0);
        // Another offer expires on its own.
        let other = SignedOffer::sign(body(&keypair, 8, 1, 30_000), &keypair).unwrap();
        holder.receive(6_000, &key, other).unwrap();
        assert_eq!(holder.evict_expired(30_000), 1);
        assert_eq!(holder.expired(), 1);
        assert_eq!(holder.next_expiry(), None);
    }

    #[test]
    fn forged_wrong_region_expired_and_replayed_offers_are_refused_and_counted() {
        let keypair = Keypair::generate_ed25519();
        let mut holder = Holder::new(HolderConfig::default());
        let key = key_in(tier512(), 2);

        let mut forged = SignedOffer::sign(body(&keypair, 1, 1, 10_000), &keypair).unwrap();
        forged.body.in_use_mib = 100;
        assert_eq!(
            holder.receive(0, &key, forged),
            Err(Rejection::BadSignature)
        );

        let good = SignedOffer::sign(body(&keypair, 1, 5, 10_000), &keypair).unwrap();
        let wrong_key = key_in(Tier::from_mib(128).unwrap(), 3);
        assert_eq!(
            holder.receive(0, &wrong_key, good.clone()),
            Err(Rejection::WrongRegion)
        );
        assert_eq!(
            holder.receive(10_000, &key, good.clone()),
            Err(Rejection::Expired)
        );
        let far = SignedOffer::sign(body(&keypair, 1, 6, 11 * 60 * 1000), &keypair).unwrap();
        assert_eq!(holder.receive(0, &key, far), Err(Rejection::TooLong));

        assert_eq!(holder.receive(0, &key, good.clone()), Ok(Accepted::Stored));
        assert_eq!(holder.receive(1, &key, good), Err(Rejection::Replayed));
        let older = SignedOffer::sign(body(&keypair, 1, 4, 10_000), &keypair).unwrap();
        assert_eq!(holder.receive(1, &key, older), Err(Rejection::Replayed));

        for reason in [
            Rejection::BadSignature,
            Rejection::WrongRegion,
            Rejection::Expired,
            Rejection::TooLong,
        ] {
            assert_eq!(holder.rejected(reason), 1, "{}", reason.as_str());
        }
        assert_eq!(holder.rejected(Rejection::Replayed), 2);
    }

    #[test]
    fn the_whole_key_space_holds_offers_under_any_key_and_answers_any_tier() {
        let keypair = Keypair::generate_ed25519();
        let config = HolderConfig {
            key_space: KeySpace::Whole,
            ..HolderConfig::default()
        };
        let mut holder = Holder::new(config);
        let mut region_holder = Holder::new(HolderConfig::default());
        // A 512 MiB offer under a key of the 128 MiB region: refused by a region holder,
        // held by a whole-space one.
        let outside = key_in(Tier::SMALLEST, 6);
        assert!(!tier512().region().contains_key(&outside));
        let offer = SignedOffer::sign(body(&keypair, 1, 1, 10_000), &keypair).unwrap();
        assert_eq!(
            region_holder.receive(0, &outside, offer.clone()),
            Err(Rejection::WrongRegion)
        );
        assert_eq!(holder.receive(0, &outside, offer), Ok(Accepted::Stored));
        assert_eq!(holder.rejected(Rejection::WrongRegion), 0);
        // A probe for 200 MiB (the 256 MiB tier) finds it: it fits, whatever its tier.
        let tier256 = Tier::from_mib(256).unwrap();
        assert_eq!(holder.answer(0, tier256, 200).len(), 1);
        assert_eq!(holder.answer(0, tier256, 601).len(), 0);

        // A region holder answers only the tier asked about.
        let inside = key_in(tier512(), 7);
        let offer = SignedOffer::sign(body(&keypair, 2, 1, 10_000), &keypair).unwrap();
        region_holder.receive(0, &inside, offer).unwrap();
        assert_eq!(region_holder.answer(0, tier256, 200).len(), 0);
        assert_eq!(region_holder.answer(0, tier512(), 200).len(), 1);
    }

    #[test]
    fn a_withdrawn_offer_cannot_be_replayed_back() {
        let keypair = Keypair::generate_ed25519();
        let mut holder = Holder::new(HolderConfig::default());
        let key = key_in(tier512(), 4);
        let live = SignedOffer::sign(body(&keypair, 1, 1, 10_000), &keypair).unwrap();
        holder.receive(0, &key, live.clone()).unwrap();
        let mut gone = body(&keypair, 1, 2, 10_000);
        gone.withdrawn = true;
        holder
            .receive(0, &key, SignedOffer::sign(gone, &keypair).unwrap())
            .unwrap();
        assert_eq!(holder.receive(1, &key, live), Err(Rejection::Replayed));
        assert_eq!(holder.live(1).count(), 0);
    }

    #[test]
    fn holders_are_bounded_per_offerer_and_in_total() {
        let config = HolderConfig {
            max_per_offerer: 2,
            max_total: 3,
            ..HolderConfig::default()
        };
        let mut holder = Holder::new(config);
        let key = key_in(tier512(), 5);
        let a = Keypair::generate_ed25519();
        let b = Keypair::generate_ed25519();
        for id in 0..2 {
            holder
                .receive(
                    0,
                    &key,
                    SignedOffer::sign(body(&a, id, 1, 10_000), &a).unwrap(),
                )
                .unwrap();
        }
        let third = SignedOffer::sign(body(&a, 2, 1, 10_000), &a).unwrap();
        assert_eq!(holder.receive(0, &key, third), Err(Rejection::OffererFull));
        holder
            .receive(
                0,
                &key,
                SignedOffer::sign(body(&b, 0, 1, 10_000), &b).unwrap(),
            )
            .unwrap();
        let over = SignedOffer::sign(body(&b, 1, 1, 10_000), &b).unwrap();
        assert_eq!(holder.receive(0, &key, over), Err(Rejection::HolderFull));
        // Expiry frees room.
        holder.evict_expired(10_000);
        let again = SignedOffer::sign(body(&a, 2, 1, 20_000), &a).unwrap();
        assert_eq!(holder.receive(10_000, &key, again), Ok(Accepted::Stored));
    }

    fn delivery(from: &Keypair, prefix: &str, closer_known: usize) -> Delivery {
        Delivery {
            from: from.public().to_peer_id(),
            prefix: Some(Prefix::of(prefix.parse().unwrap())),
            closer_known,
        }
    }

    #[test]
    fn offers_from_the_network_come_from_their_offerer_near_their_key() {
        let mut holder = Holder::new(HolderConfig::default());
        let key = key_in(tier512(), 8);
        let (a, relay) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let offer = SignedOffer::sign(body(&a, 1, 1, 10_000), &a).unwrap();
        // One connection cannot bring many identities' offers.
        assert_eq!(
            holder.receive_from(0, &key, offer.clone(), delivery(&relay, "10.0.0.1", 0)),
            Err(Rejection::NotFromOfferer)
        );
        // Nobody probes for it here when 20 peers are closer to its key.
        assert_eq!(
            holder.receive_from(0, &key, offer.clone(), delivery(&a, "10.0.0.1", 20)),
            Err(Rejection::NotClosest)
        );
        assert_eq!(
            holder.receive_from(0, &key, offer, delivery(&a, "10.0.0.1", 19)),
            Ok(Accepted::Stored)
        );
        assert_eq!(holder.rejected(Rejection::NotFromOfferer), 1);
        assert_eq!(holder.rejected(Rejection::NotClosest), 1);
    }

    #[test]
    fn one_address_prefix_holds_a_bounded_share_however_many_identities_it_has() {
        let config = HolderConfig {
            max_per_prefix: 40,
            ..HolderConfig::default()
        };
        let mut holder = Holder::new(config);
        let key = key_in(tier512(), 9);
        // 256 identities on one /24, 16 offers each: 40 are held.
        let mut held = 0;
        let mut sybils = Vec::new();
        for i in 0..256u32 {
            let sybil = Keypair::generate_ed25519();
            let from = delivery(&sybil, &format!("192.0.2.{}", i % 250), 0);
            for id in 0..16 {
                let offer = SignedOffer::sign(body(&sybil, id, 1, 10_000), &sybil).unwrap();
                held += usize::from(holder.receive_from(0, &key, offer, from).is_ok());
            }
            sybils.push(sybil);
        }
        assert_eq!(held, 40);
        assert_eq!(holder.rejected(Rejection::PrefixFull), 256 * 16 - 40);
        // An offerer elsewhere is still held, and the sybils' refreshes still pass.
        let honest = Keypair::generate_ed25519();
        let offer = SignedOffer::sign(body(&honest, 1, 1, 10_000), &honest).unwrap();
        assert_eq!(
            holder.receive_from(0, &key, offer, delivery(&honest, "198.51.100.7", 0)),
            Ok(Accepted::Stored)
        );
        let first = &sybils[0];
        let refresh = SignedOffer::sign(body(first, 0, 2, 20_000), first).unwrap();
        assert_eq!(
            holder.receive_from(1, &key, refresh, delivery(first, "192.0.2.0", 0)),
            Ok(Accepted::Refreshed)
        );
        // Expiry gives the prefix its room back.
        holder.evict_expired(10_000);
        let late = Keypair::generate_ed25519();
        let offer = SignedOffer::sign(body(&late, 1, 1, 30_000), &late).unwrap();
        assert_eq!(
            holder.receive_from(10_000, &key, offer, delivery(&late, "192.0.2.99", 0)),
            Ok(Accepted::Stored)
        );
    }
}
