//! Key regions: the hashed Kademlia key space cut into one region per memory tier.
//!
//! rust-libp2p's Kademlia measures XOR distance between the SHA-256 hashes of keys (and
//! of PeerIds). We divide that hashed 256-bit space by its first six bits into 64 equal
//! *slots*; each tier owns a contiguous run of slots, smaller tiers owning more of them
//! because most volunteers lend little memory. Every run is the union of a few
//! prefix-aligned blocks ([`Region::blocks`]), so the peer closest to a key inside a block
//! lies inside that block whenever the block holds any peer.
//!
//! | tier (MiB) | slots     | share of the space |
//! |-----------:|-----------|-------------------:|
//! |        128 | `[0, 16)` |              25.0% |
//! |        256 | `[16, 28)`|             18.75% |
//! |        512 | `[28, 38)`|            15.625% |
//! |       1024 | `[38, 46)`|              12.5% |
//! |       2048 | `[46, 52)`|             9.375% |
//! |       4096 | `[52, 57)`|            7.8125% |
//! |       8192 | `[57, 61)`|              6.25% |
//! |      10240 | `[61, 64)`|            4.6875% |
//!
//! A random key in a region is found by drawing random preimages until the hash lands in
//! it: at most 64/3 ≈ 21 draws are expected, for the smallest region.
//!
//! [`KeySpace`] says whether offers and probes use these regions at all: `Regions` (what
//! Flotilla does) or `Whole`, the research baseline of plain random keys anywhere in the
//! space (what Caravela compared to). Every peer of one network must use the same.

use rand::RngCore;
use sha2::{Digest, Sha256};
use std::fmt;
use std::str::FromStr;

/// Number of leading bits of a hashed key that select its slot.
pub const SLOT_BITS: u32 = 6;
/// Number of slots the hashed key space is cut into.
pub const SLOTS: u8 = 1 << SLOT_BITS;

/// One memory tier: the amount of memory an offer in this tier provides, in MiB.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "u32", into = "u32")]
pub struct Tier(u32);

impl TryFrom<u32> for Tier {
    type Error = RegionError;

    fn try_from(mib: u32) -> Result<Tier, RegionError> {
        Tier::from_mib(u64::from(mib))
    }
}

impl From<Tier> for u32 {
    fn from(tier: Tier) -> u32 {
        tier.0
    }
}

/// The region table: for each tier (in MiB), the first slot it owns. Each tier's run ends
/// where the next one starts; the last ends at [`SLOTS`].
const TABLE: [(u32, u8); 8] = [
    (128, 0),
    (256, 16),
    (512, 28),
    (1024, 38),
    (2048, 46),
    (4096, 52),
    (8192, 57),
    (10240, 61),
];

/// Errors of the region functions.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RegionError {
    /// A request asked for more memory than the largest tier.
    #[error("{requested_mib} MiB is more than the largest tier ({} MiB)", Tier::LARGEST.mib())]
    TooLarge {
        /// The memory requested, in MiB.
        requested_mib: u64,
    },
    /// A request asked for no memory at all.
    #[error("a memory request must be larger than zero")]
    Zero,
    /// A number that is not one of the tiers.
    #[error("{0} MiB is not a tier (tiers: 128, 256, 512, 1024, 2048, 4096, 8192, 10240 MiB)")]
    NotATier(u64),
}

impl Tier {
    /// The smallest tier, 128 MiB.
    pub const SMALLEST: Tier = Tier(TABLE[0].0);
    /// The largest tier, 10240 MiB (10 GiB).
    pub const LARGEST: Tier = Tier(TABLE[TABLE.len() - 1].0);

    /// All tiers, smallest first.
    pub fn all() -> impl ExactSizeIterator<Item = Tier> + Clone {
        TABLE.iter().map(|&(mib, _)| Tier(mib))
    }

    /// The tier of exactly `mib` MiB.
    pub fn from_mib(mib: u64) -> Result<Tier, RegionError> {
        Tier::all()
            .find(|t| u64::from(t.0) == mib)
            .ok_or(RegionError::NotATier(mib))
    }

    /// The smallest tier that can serve a request for `bytes` bytes of memory.
    pub fn for_request(bytes: u64) -> Result<Tier, RegionError> {
        if bytes == 0 {
            return Err(RegionError::Zero);
        }
        let mib = bytes.div_ceil(1024 * 1024);
        Tier::all()
            .find(|t| u64::from(t.0) >= mib)
            .ok_or(RegionError::TooLarge { requested_mib: mib })
    }

    /// The largest tier of at most `mib` MiB: the tier an offer of that much memory goes
    /// in, so that every request routed to the tier fits it. `None` below 128 MiB.
    pub fn largest_within(mib: u64) -> Option<Tier> {
        Tier::all().take_while(|t| u64::from(t.0) <= mib).last()
    }

    /// The memory of this tier in MiB.
    pub fn mib(self) -> u32 {
        self.0
    }

    /// The memory of this tier in bytes.
    pub fn bytes(self) -> u64 {
        u64::from(self.0) * 1024 * 1024
    }

    fn index(self) -> usize {
        TABLE
            .iter()
            .position(|&(mib, _)| mib == self.0)
            .expect("a Tier is always one of TABLE's")
    }

    /// The region of the hashed key space this tier owns.
    pub fn region(self) -> Region {
        let i = self.index();
        let start = TABLE[i].1;
        let end = TABLE.get(i + 1).map_or(SLOTS, |&(_, s)| s);
        Region {
            tier: self,
            start,
            end,
        }
    }

    /// The tier whose region holds the given hashed key.
    pub fn of_hashed_key(hashed: &[u8; 32]) -> Tier {
        let slot = slot_of(hashed);
        let i = TABLE
            .iter()
            .rposition(|&(_, start)| start <= slot)
            .expect("slot 0 belongs to the first tier");
        Tier(TABLE[i].0)
    }

    /// The tier whose region holds the hash of the given (unhashed) Kademlia key.
    pub fn of_key(key: &[u8]) -> Tier {
        Tier::of_hashed_key(&hash_key(key))
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} MiB", self.0)
    }
}

/// A contiguous run of slots `[start, end)` of the hashed key space, owned by one tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    tier: Tier,
    start: u8,
    end: u8,
}

/// A prefix-aligned block of the hashed key space: all keys whose first `len` bits equal
/// those of `prefix` (the remaining bits of `prefix` are zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixBlock {
    /// The prefix, left-aligned in a byte.
    pub prefix: u8,
    /// The number of significant bits of `prefix`.
    pub len: u32,
}

impl PrefixBlock {
    /// Whether the hashed key lies in this block.
    pub fn contains(&self, hashed: &[u8; 32]) -> bool {
        if self.len == 0 {
            return true;
        }
        let mask = u8::MAX << (8 - self.len);
        hashed[0] & mask == self.prefix
    }
}

impl fmt::Display for PrefixBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for bit in 0..self.len {
            let b = (self.prefix >> (7 - bit)) & 1;
            write!(f, "{b}")?;
        }
        write!(f, "*")
    }
}

impl Region {
    /// The tier owning this region.
    pub fn tier(&self) -> Tier {
        self.tier
    }

    /// The slots `[start, end)` of this region.
    pub fn slots(&self) -> std::ops::Range<u8> {
        self.start..self.end
    }

    /// The share of the whole key space this region covers, in `(0, 1]`.
    pub fn share(&self) -> f64 {
        f64::from(self.end - self.start) / f64::from(SLOTS)
    }

    /// Whether the hashed key lies in this region.
    pub fn contains_hashed(&self, hashed: &[u8; 32]) -> bool {
        self.slots().contains(&slot_of(hashed))
    }

    /// Whether the hash of the (unhashed) Kademlia key lies in this region.
    pub fn contains_key(&self, key: &[u8]) -> bool {
        self.contains_hashed(&hash_key(key))
    }

    /// The region as the fewest prefix-aligned blocks, in key order.
    pub fn blocks(&self) -> Vec<PrefixBlock> {
        let mut blocks = Vec::new();
        let mut at = u32::from(self.start);
        let end = u32::from(self.end);
        while at < end {
            // The largest aligned power-of-two run starting at `at` that fits before `end`.
            let mut size = if at == 0 {
                u32::from(SLOTS)
            } else {
                1 << at.trailing_zeros()
            };
            while at + size > end {
                size /= 2;
            }
            let len = SLOT_BITS - size.trailing_zeros();
            let prefix = u8::try_from(at << (8 - SLOT_BITS)).expect("slot fits in a byte");
            blocks.push(PrefixBlock { prefix, len });
            at += size;
        }
        blocks
    }

    /// A random Kademlia key (the preimage) whose hash lies in this region, and its hash.
    pub fn random_key<R: RngCore + ?Sized>(&self, rng: &mut R) -> (Vec<u8>, [u8; 32]) {
        loop {
            let mut preimage = vec![0u8; 32];
            rng.fill_bytes(&mut preimage);
            let hashed = hash_key(&preimage);
            if self.contains_hashed(&hashed) {
                return (preimage, hashed);
            }
        }
    }
}

/// Which keys offers are published under and requests probe.
///
/// Every peer of one network must use the same: a `Regions` holder refuses offers sent
/// under keys outside their tier's region, and a `Whole` scheduler's probes land on
/// holders of any tier.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum KeySpace {
    /// Each tier's offers live in, and are probed in, that tier's region (Flotilla).
    #[default]
    Regions,
    /// The baseline: random keys anywhere in the space, whatever the tier; holders keep
    /// offers of every tier.
    Whole,
}

impl KeySpace {
    /// A random Kademlia key (the preimage) for an offer of, or a probe for, `tier`, and
    /// its hash: inside the tier's region, or anywhere with [`KeySpace::Whole`].
    pub fn random_key<R: RngCore + ?Sized>(self, tier: Tier, rng: &mut R) -> (Vec<u8>, [u8; 32]) {
        match self {
            KeySpace::Regions => tier.region().random_key(rng),
            KeySpace::Whole => {
                let mut preimage = vec![0u8; 32];
                rng.fill_bytes(&mut preimage);
                let hashed = hash_key(&preimage);
                (preimage, hashed)
            }
        }
    }

    /// Whether an offer of `tier` may be held under the (unhashed) Kademlia `key`: only in
    /// the tier's region, or anywhere with [`KeySpace::Whole`].
    pub fn admits(self, tier: Tier, key: &[u8]) -> bool {
        match self {
            KeySpace::Regions => tier.region().contains_key(key),
            KeySpace::Whole => true,
        }
    }

    /// The name used in config files and flags: `regions` or `whole`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeySpace::Regions => "regions",
            KeySpace::Whole => "whole",
        }
    }
}

impl FromStr for KeySpace {
    type Err = String;

    fn from_str(s: &str) -> Result<KeySpace, String> {
        match s {
            "regions" => Ok(KeySpace::Regions),
            "whole" => Ok(KeySpace::Whole),
            other => Err(format!("unknown key space '{other}' (regions, whole)")),
        }
    }
}

impl fmt::Display for KeySpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The SHA-256 hash Kademlia computes of a key before measuring XOR distance.
pub fn hash_key(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

fn slot_of(hashed: &[u8; 32]) -> u8 {
    hashed[0] >> (8 - SLOT_BITS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::kad::KBucketKey;
    use proptest::prelude::*;
    use rand::{SeedableRng, rngs::StdRng};

    #[test]
    fn hash_matches_kademlia_key_hash() {
        let key = b"flotilla".to_vec();
        let kad_key = KBucketKey::new(key.clone());
        assert_eq!(kad_key.hashed_bytes(), &hash_key(&key)[..]);
    }

    #[test]
    fn region_sizes_match_the_table() {
        let expected = [16u8, 12, 10, 8, 6, 5, 4, 3];
        let sizes: Vec<u8> = Tier::all()
            .map(|t| t.region().slots().len() as u8)
            .collect();
        assert_eq!(sizes, expected);
        // Smaller tiers own strictly larger regions.
        assert!(expected.windows(2).all(|w| w[0] > w[1]));
    }

    #[test]
    fn regions_cover_the_space_without_overlap() {
        let mut owner = [None; SLOTS as usize];
        for tier in Tier::all() {
            for slot in tier.region().slots() {
                assert!(owner[slot as usize].is_none(), "slot {slot} owned twice");
                owner[slot as usize] = Some(tier);
            }
        }
        assert!(owner.iter().all(Option::is_some));
    }

    #[test]
    fn blocks_are_prefix_aligned_and_tile_their_region() {
        for tier in Tier::all() {
            let region = tier.region();
            let mut covered = 0u32;
            for block in region.blocks() {
                assert!(block.len >= 1 && block.len <= SLOT_BITS);
                let low_bits = 8 - block.len;
                assert_eq!(
                    block.prefix & ((1u8 << low_bits) - 1),
                    0,
                    "{block} not aligned"
                );
                covered += 1 << (SLOT_BITS - block.len);
            }
            assert_eq!(covered as usize, region.slots().len());
        }
        // The table in docs/ARCHITECTURE.md.
        let table: Vec<String> = Tier::all()
            .map(|t| {
                t.region()
                    .blocks()
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        assert_eq!(
            table,
            [
                "00*",
                "010* 0110*",
                "0111* 1000* 10010*",
                "10011* 1010* 10110*",
                "10111* 1100*",
                "1101* 111000*",
                "111001* 11101* 111100*",
                "111101* 11111*",
            ]
        );
    }

    #[test]
    fn tier_for_request_picks_the_smallest_that_fits() {
        const MIB: u64 = 1024 * 1024;
        assert_eq!(Tier::for_request(1).unwrap().mib(), 128);
        assert_eq!(Tier::for_request(128 * MIB).unwrap().mib(), 128);
        assert_eq!(Tier::for_request(128 * MIB + 1).unwrap().mib(), 256);
        assert_eq!(Tier::for_request(9000 * MIB).unwrap().mib(), 10240);
        assert_eq!(Tier::for_request(10240 * MIB).unwrap().mib(), 10240);
        assert_eq!(
            Tier::for_request(10241 * MIB),
            Err(RegionError::TooLarge {
                requested_mib: 10241
            })
        );
        assert_eq!(Tier::for_request(0), Err(RegionError::Zero));
        assert!(Tier::from_mib(300).is_err());
        assert_eq!(Tier::largest_within(127), None);
        assert_eq!(Tier::largest_within(700).unwrap().mib(), 512);
        assert_eq!(Tier::largest_within(1 << 20).unwrap(), Tier::LARGEST);
    }

    #[test]
    fn whole_key_space_keys_land_anywhere_and_are_admitted_anywhere() {
        let mut rng = StdRng::seed_from_u64(11);
        let tier = Tier::from_mib(512).unwrap();
        let mut owners = std::collections::BTreeSet::new();
        for _ in 0..400 {
            let (preimage, hashed) = KeySpace::Whole.random_key(tier, &mut rng);
            assert_eq!(hash_key(&preimage), hashed);
            owners.insert(Tier::of_hashed_key(&hashed));
            for other in Tier::all() {
                assert!(KeySpace::Whole.admits(other, &preimage));
            }
        }
        // 400 uniform keys miss a region of share ≥ 3/64 with probability < 1e-8.
        assert_eq!(owners.len(), Tier::all().len(), "{owners:?}");
    }

    #[test]
    fn key_space_names_round_trip() {
        for space in [KeySpace::Regions, KeySpace::Whole] {
            assert_eq!(space.as_str().parse::<KeySpace>(), Ok(space));
            assert_eq!(space.to_string(), space.as_str());
        }
        assert_eq!(KeySpace::default(), KeySpace::Regions);
        assert!("everywhere".parse::<KeySpace>().is_err());
    }

    proptest! {
        #[test]
        fn region_key_space_keys_stay_in_their_tier(seed: u64, tier_index in 0usize..8) {
            let tier = Tier::all().nth(tier_index).unwrap();
            let mut rng = StdRng::seed_from_u64(seed);
            let (preimage, hashed) = KeySpace::Regions.random_key(tier, &mut rng);
            prop_assert_eq!(hash_key(&preimage), hashed);
            prop_assert_eq!(Tier::of_key(&preimage), tier);
            prop_assert!(KeySpace::Regions.admits(tier, &preimage));
            for other in Tier::all().filter(|t| *t != tier) {
                prop_assert!(!KeySpace::Regions.admits(other, &preimage));
            }
        }

        #[test]
        fn random_keys_land_in_their_region(seed: u64, tier_index in 0usize..8) {
            let tier = Tier::all().nth(tier_index).unwrap();
            let mut rng = StdRng::seed_from_u64(seed);
            let (preimage, hashed) = tier.region().random_key(&mut rng);
            prop_assert_eq!(hash_key(&preimage), hashed);
            prop_assert!(tier.region().contains_key(&preimage));
            prop_assert_eq!(Tier::of_key(&preimage), tier);
            prop_assert!(tier.region().blocks().iter().any(|b| b.contains(&hashed)));
        }

        #[test]
        fn every_hashed_key_has_exactly_one_tier(hashed: [u8; 32]) {
            let owners: Vec<Tier> =
                Tier::all().filter(|t| t.region().contains_hashed(&hashed)).collect();
            prop_assert_eq!(owners.len(), 1);
            prop_assert_eq!(owners[0], Tier::of_hashed_key(&hashed));
            let in_blocks = owners[0].region().blocks().iter().filter(|b| b.contains(&hashed)).count();
            prop_assert_eq!(in_blocks, 1);
        }

        #[test]
        fn requests_fit_their_tier(bytes in 1u64..=10240 * 1024 * 1024) {
            let tier = Tier::for_request(bytes).unwrap();
            prop_assert!(tier.bytes() >= bytes);
            if let Some(smaller) = Tier::all().take_while(|t| *t < tier).last() {
                prop_assert!(smaller.bytes() < bytes);
            }
        }
    }
}
