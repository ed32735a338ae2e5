//! The scheduler registry: schedulers announce themselves as providers of
//! [`REGISTRY_KEYS`] well-known DHT keys, spread over the key space so that capturing one
//! (its closest peers, or its 20 provider places) does not capture the registry; clients
//! look all of them up and pick one, preferring schedulers they can reach.

use libp2p::PeerId;
use rand::Rng;
use sha2::{Digest, Sha256};

/// The name whose hash is the registry's Kademlia key.
pub const REGISTRY_NAME: &str = "flotilla/schedulers/v1";

/// How many keys the registry is spread over.
pub const REGISTRY_KEYS: usize = 4;

/// The Kademlia key schedulers provide: SHA-256 of [`REGISTRY_NAME`].
pub fn registry_key() -> Vec<u8> {
    Sha256::digest(REGISTRY_NAME.as_bytes()).to_vec()
}

/// Every key of the registry: [`registry_key`], then SHA-256 of `REGISTRY_NAME/i` for
/// `i` in `1..REGISTRY_KEYS`.
pub fn registry_keys() -> Vec<Vec<u8>> {
    let mut keys = vec![registry_key()];
    keys.extend(
        (1..REGISTRY_KEYS)
            .map(|i| Sha256::digest(format!("{REGISTRY_NAME}/{i}").as_bytes()).to_vec()),
    );
    keys
}

/// [`pick`] among the schedulers `reachable` says yes to, if there are any besides
/// `exclude`; else among all.
pub fn pick_reachable<R: Rng + ?Sized>(
    schedulers: &[PeerId],
    reachable: impl Fn(&PeerId) -> bool,
    exclude: Option<&PeerId>,
    rng: &mut R,
) -> Option<PeerId> {
    let near: Vec<PeerId> = schedulers
        .iter()
        .filter(|p| reachable(p) && Some(*p) != exclude)
        .copied()
        .collect();
    if near.is_empty() {
        pick(schedulers, exclude, rng)
    } else {
        pick(&near, None, rng)
    }
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

    #[test]
    fn the_registry_has_distinct_keys_and_reachable_schedulers_come_first() {
        let keys = registry_keys();
        assert_eq!(keys.len(), REGISTRY_KEYS);
        assert_eq!(keys[0], registry_key());
        let distinct: std::collections::HashSet<_> = keys.iter().collect();
        assert_eq!(distinct.len(), REGISTRY_KEYS);
        let peers: Vec<PeerId> = (0..30).map(|_| PeerId::random()).collect();
        let honest = peers[17];
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        for _ in 0..50 {
            let p = pick_reachable(&peers, |p| *p == honest, None, &mut rng);
            assert_eq!(p, Some(honest));
        }
        // The reachable one failed: the others are tried.
        let p = pick_reachable(&peers, |p| *p == honest, Some(&honest), &mut rng).unwrap();
        assert_ne!(p, honest);
    }
}
