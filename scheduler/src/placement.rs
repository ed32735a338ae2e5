//! Placement (Algorithm 3): which of the offers that fit a request to use.
//!
//! Best fit (the default) takes the offer with the least memory free that still serves
//! the request, keeping large offers for large requests; worst fit takes the most free;
//! random picks uniformly, as a baseline for studying fragmentation.

use flotilla_offers::offer::SignedOffer;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// How to choose among fitting offers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// The offer with the least memory free that still fits.
    #[default]
    BestFit,
    /// The offer with the most memory free.
    WorstFit,
    /// Any fitting offer, uniformly.
    Random,
}

impl std::str::FromStr for Policy {
    type Err = String;

    fn from_str(s: &str) -> Result<Policy, String> {
        match s {
            "best-fit" => Ok(Policy::BestFit),
            "worst-fit" => Ok(Policy::WorstFit),
            "random" => Ok(Policy::Random),
            other => Err(format!(
                "unknown placement policy '{other}' (best-fit, worst-fit, random)"
            )),
        }
    }
}

/// The offers that fit a request of `mib` MiB, ordered by the policy's preference (for
/// random, shuffled): the caller reserves the first and falls back to the next if the
/// offerer refuses.
pub fn rank<'a, R: Rng + ?Sized>(
    offers: impl IntoIterator<Item = &'a SignedOffer>,
    mib: u32,
    policy: Policy,
    rng: &mut R,
) -> Vec<&'a SignedOffer> {
    let mut fitting: Vec<&SignedOffer> = offers
        .into_iter()
        .filter(|o| o.body.free_mib() >= mib)
        .collect();
    // A stable order first, so equal offers rank the same way everywhere.
    fitting.sort_by_key(|o| {
        (
            o.body.free_mib(),
            o.body.offerer.to_bytes(),
            o.body.offer_id,
        )
    });
    match policy {
        Policy::BestFit => {}
        Policy::WorstFit => fitting.reverse(),
        Policy::Random => {
            for i in (1..fitting.len()).rev() {
                fitting.swap(i, rng.random_range(0..=i));
            }
        }
    }
    fitting
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use flotilla_offers::offer::OfferBody;
    use flotilla_overlay::regions::Tier;
    use libp2p::identity::Keypair;
    use rand::SeedableRng;

    /// A signed offer of `memory_mib` (in its largest tier) with `in_use_mib` taken.
    pub(crate) fn offer(
        keypair: &Keypair,
        offer_id: u64,
        memory_mib: u32,
        in_use_mib: u32,
    ) -> SignedOffer {
        let body = OfferBody {
            offerer: keypair.public().to_peer_id(),
            addresses: Vec::new(),
            tier: Tier::largest_within(u64::from(memory_mib)).unwrap(),
            memory_mib,
            in_use_mib,
            offer_id,
            seq: 1,
            expires_at_ms: 1_000_000,
            withdrawn: false,
        };
        SignedOffer::sign(body, keypair).unwrap()
    }

    #[test]
    fn policies_order_the_fitting_offers() {
        let k = Keypair::generate_ed25519();
        let offers = [
            offer(&k, 1, 1024, 0),
            offer(&k, 2, 512, 0),
            offer(&k, 3, 2048, 1900),
            offer(&k, 4, 256, 0),
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let ids = |v: Vec<&SignedOffer>| v.iter().map(|o| o.body.offer_id).collect::<Vec<_>>();
        assert_eq!(ids(rank(&offers, 300, Policy::BestFit, &mut rng)), [2, 1]);
        assert_eq!(ids(rank(&offers, 300, Policy::WorstFit, &mut rng)), [1, 2]);
        let mut random = ids(rank(&offers, 100, Policy::Random, &mut rng));
        random.sort();
        assert_eq!(random, [1, 2, 3, 4]);
        assert!(rank(&offers, 4096, Policy::BestFit, &mut rng).is_empty());
        assert_eq!("worst-fit".parse::<Policy>(), Ok(Policy::WorstFit));
        assert!("first-fit".parse::<Policy>().is_err());
    }
}
