//! The scheduler registry: schedulers announce themselves as providers of one well-known
//! DHT key; clients look its providers up and pick one at random.

use libp2p::PeerId;
use rand::Rng;
use sha2::{Digest, Sha256};

/// The name whose hash is the registry's Kademlia key.
pub const REGISTRY_NAME: &str = "flotilla/schedulers/v1";

/// The Kademlia key schedulers provide: SHA-256 of [`REGISTRY_NAME`].
pub fn registry_key() -> Vec<u8> {
    Sha256::digest(REGISTRY_NAME.as_bytes()).to_vec()
}

/// A scheduler chosen uniformly from those found, never `exclude` (say, one that just
/// failed) unless it is the only one.
pub fn pick<R: Rng + ?Sized>(
    schedulers: &[PeerId],
    exclude: Option<&PeerId>,
    rng: &mut R,
) -> Option<PeerId> {
    let others: Vec<PeerId> = schedulers
        .iter()
        .filter(|p| Some(*p) != exclude)
        .copied()
        .collect();
    let pool = if others.is_empty() {
        schedulers
    } else {
        &others
    };
    (!pool.is_empty()).then(|| pool[rng.random_range(0..pool.len())])
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn picks_spread_over_schedulers_and_avoid_the_excluded_one() {
        let peers: Vec<PeerId> = (0..4).map(|_| PeerId::random()).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let p = pick(&peers, Some(&peers[0]), &mut rng).unwrap();
            assert_ne!(p, peers[0]);
            seen.insert(p);
        }
        assert_eq!(seen.len(), 3);
        assert_eq!(pick(&peers[..1], Some(&peers[0]), &mut rng), Some(peers[0]));
        assert_eq!(pick(&[], None, &mut rng), None);
        assert_eq!(registry_key().len(), 32);
    }
}
