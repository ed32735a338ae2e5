//! The store's index: which blocks are held and how large they are, which are pinned,
//! which are in use, and the order in which the rest — the cache — is evicted, least
//! recently used first. A state machine with no I/O: [`crate::blockstore`] asks it what
//! to evict, then deletes the files and tells it.
//!
//! A block is in exactly one of three states:
//! * **pinned**: named by at least one pin (a refcount per block, since DAGs share
//!   blocks); never evicted;
//! * **in use**: protected by at least one [`crate::blockstore::Lease`] (a call, fetch,
//!   add or read under way, or a call's inputs and outputs kept a while after it);
//!   never evicted;
//! * **cache**: everything else, in the recency order, evicted oldest first when a new
//!   block needs room or by `gc`.
//!
//! Recency is a logical clock (a counter bumped on every use), so the order is exact and
//! independent of wall time; it is saved to the store's database and read back at start.

use multihash::Multihash;
use std::collections::{BTreeMap, HashMap};

/// A block's key: its multihash (a CIDv0 and a CIDv1 of the same bytes are one block).
pub type BlockKey = Multihash<64>;

/// One held block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    size: u64,
    /// Its place in the recency order (unique; larger is more recent).
    tick: u64,
}

/// What the store holds, by state.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CacheStats {
    /// Blocks held.
    pub blocks: u64,
    /// Bytes held.
    pub bytes: u64,
    /// Blocks named by a pin.
    pub pinned_blocks: u64,
    /// Bytes of the pinned blocks.
    pub pinned_bytes: u64,
    /// Bytes of blocks in use and not pinned.
    pub in_use_bytes: u64,
    /// Bytes that `gc` would free now: neither pinned nor in use.
    pub evictable_bytes: u64,
    /// Blocks that `gc` would remove now.
    pub evictable_blocks: u64,
    /// Bytes being written (reserved for blocks not yet in place).
    pub reserved_bytes: u64,
    /// The most bytes the store holds.
    pub capacity: u64,
}

/// The index of a store of at most `capacity` bytes.
#[derive(Debug)]
pub struct CacheIndex {
    capacity: u64,
    entries: HashMap<BlockKey, Entry>,
    /// Evictable-when-unused blocks by tick: every held block that is not pinned.
    recency: BTreeMap<u64, BlockKey>,
    /// Pins naming each block (held or not).
    pins: HashMap<BlockKey, u32>,
    /// Leases protecting each block (held or not).
    in_use: HashMap<BlockKey, u32>,
    next_tick: u64,
    bytes: u64,
    pinned_bytes: u64,
    pinned_blocks: u64,
    reserved: u64,
    /// Ticks changed since the last [`CacheIndex::take_dirty`] (for saving).
    dirty: HashMap<BlockKey, Option<u64>>,
}

/// Why room could not be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Room {
    /// Reserved: write the block, then [`CacheIndex::insert`] it (or
    /// [`CacheIndex::unreserve`] on failure).
    Reserved,
    /// Evict these first, then ask again.
    Evict(usize),
    /// Even evicting every evictable block would not make room.
    Full {
        /// Bytes held and reserved.
        used: u64,
    },
}

impl CacheIndex {
    /// An empty index for a store of `capacity` bytes.
    pub fn new(capacity: u64) -> CacheIndex {
        CacheIndex {
            capacity,
            entries: HashMap::new(),
            recency: BTreeMap::new(),
            pins: HashMap::new(),
            in_use: HashMap::new(),
            next_tick: 1,
            bytes: 0,
            pinned_bytes: 0,
            pinned_blocks: 0,
            reserved: 0,
            dirty: HashMap::new(),
        }
    }

    /// The most bytes held.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Records a block found on disk at start, last used at the saved `tick`, or `None`
    /// if none was saved (it was written after the last save, so it counts as the most
    /// recent). Load the blocks with a tick first.
    pub fn load(&mut self, key: BlockKey, size: u64, tick: Option<u64>) {
        match tick {
            Some(tick) if tick > 0 && !self.recency.contains_key(&tick) => {
                self.next_tick = self.next_tick.max(tick + 1);
                self.place(key, size, tick);
            }
            _ => self.insert_fresh(key, size),
        }
    }

    /// Sets the pins of a block (read back at start, before or after [`Self::load`]).
    pub fn load_pins(&mut self, key: BlockKey, pins: u32) {
        if pins == 0 {
            return;
        }
        let was = self.pins.insert(key, pins).unwrap_or(0);
        if was == 0 {
            self.pinned(key);
        }
    }

    /// Whether the block is held.
    pub fn contains(&self, key: &BlockKey) -> bool {
        self.entries.contains_key(key)
    }

    /// The size of a held block.
    pub fn size_of(&self, key: &BlockKey) -> Option<u64> {
        self.entries.get(key).map(|e| e.size)
    }

    /// Marks a block used now (it moves to the back of the eviction line).
    pub fn touch(&mut self, key: &BlockKey) {
        let Some(entry) = self.entries.get(key).copied() else {
            return;
        };
        if entry.tick + 1 == self.next_tick {
            return;
        }
        let tick = self.bump();
        if self.recency.remove(&entry.tick).is_some() {
            self.recency.insert(tick, *key);
        }
        if let Some(e) = self.entries.get_mut(key) {
            e.tick = tick;
        }
        self.dirty.insert(*key, Some(tick));
    }

    /// Reserves `size` bytes for a block about to be written, or says what to evict
    /// first: `Evict(n)`, the `n` oldest evictable blocks, which [`Self::victims`] lists.
    pub fn reserve(&mut self, size: u64) -> Room {
        let used = self.bytes + self.reserved;
        if used.saturating_add(size) <= self.capacity {
            self.reserved += size;
            return Room::Reserved;
        }
        let mut need = used.saturating_add(size) - self.capacity;
        let mut count = 0;
        for key in self.recency.values() {
            if self.in_use.contains_key(key) {
                continue;
            }
            let size = self.entries.get(key).map_or(0, |e| e.size);
            count += 1;
            need = need.saturating_sub(size);
            if need == 0 {
                return Room::Evict(count);
            }
        }
        Room::Full { used }
    }

    /// The `n` oldest evictable blocks (neither pinned nor in use), oldest first.
    pub fn victims(&self, n: usize) -> Vec<BlockKey> {
        self.recency
            .values()
            .filter(|key| !self.in_use.contains_key(*key))
            .take(n)
            .copied()
            .collect()
    }

    /// Whether a held block may be evicted now.
    pub fn evictable(&self, key: &BlockKey) -> bool {
        self.entries.contains_key(key)
            && !self.in_use.contains_key(key)
            && !self.pins.contains_key(key)
    }

    /// Gives back a reservation whose block was not written (or was there already).
    pub fn unreserve(&mut self, size: u64) {
        self.reserved = self.reserved.saturating_sub(size);
    }

    /// Records a block written in place of its reservation of `size` bytes. A block
    /// held already with another size (a damaged copy rewritten) is replaced.
    pub fn insert(&mut self, key: BlockKey, size: u64) {
        self.unreserve(size);
        self.remove(&key);
        self.insert_fresh(key, size);
    }

    /// Forgets a block (its file was deleted); answers its size.
    pub fn remove(&mut self, key: &BlockKey) -> Option<u64> {
        let entry = self.entries.remove(key)?;
        self.bytes -= entry.size;
        if self.pins.contains_key(key) {
            self.pinned_bytes -= entry.size;
            self.pinned_blocks -= 1;
        } else {
            self.recency.remove(&entry.tick);
        }
        self.dirty.insert(*key, None);
        Some(entry.size)
    }

    /// Protects a block from eviction (held or not yet).
    pub fn protect(&mut self, key: BlockKey) {
        *self.in_use.entry(key).or_default() += 1;
    }

    /// Ends one protection of a block; answers the bytes that became evictable (the
    /// block's size if this was its last protection and it is held and not pinned).
    pub fn unprotect(&mut self, key: &BlockKey) -> u64 {
        let Some(count) = self.in_use.get_mut(key) else {
            return 0;
        };
        *count -= 1;
        if *count > 0 {
            return 0;
        }
        self.in_use.remove(key);
        if self.pins.contains_key(key) {
            return 0;
        }
        self.entries.get(key).map_or(0, |e| e.size)
    }

    /// Adds a pin to each of `keys` (a pinned DAG's distinct blocks).
    pub fn pin<'a>(&mut self, keys: impl IntoIterator<Item = &'a BlockKey>) {
        for key in keys {
            let count = self.pins.entry(*key).or_default();
            *count += 1;
            if *count == 1 {
                self.pinned(*key);
            }
        }
    }

    /// Takes a pin off each of `keys`; blocks left with none become cache, as recent as
    /// they were.
    pub fn unpin<'a>(&mut self, keys: impl IntoIterator<Item = &'a BlockKey>) {
        for key in keys {
            let Some(count) = self.pins.get_mut(key) else {
                continue;
            };
            *count -= 1;
            if *count > 0 {
                continue;
            }
            self.pins.remove(key);
            if let Some(entry) = self.entries.get(key).copied() {
                self.pinned_bytes -= entry.size;
                self.pinned_blocks -= 1;
                self.recency.insert(entry.tick, *key);
            }
        }
    }

    /// How many pins name a block.
    pub fn pins_of(&self, key: &BlockKey) -> u32 {
        self.pins.get(key).copied().unwrap_or(0)
    }

    /// Every block held.
    pub fn keys(&self) -> Vec<BlockKey> {
        self.entries.keys().copied().collect()
    }

    /// Every evictable block, oldest first (what `gc` removes).
    pub fn all_evictable(&self) -> Vec<BlockKey> {
        self.victims(usize::MAX)
    }

    /// Bytes of pinned blocks held.
    pub fn pinned_bytes(&self) -> u64 {
        self.pinned_bytes
    }

    /// What is held, by state.
    pub fn stats(&self) -> CacheStats {
        let mut in_use_bytes = 0;
        for key in self.in_use.keys() {
            if !self.pins.contains_key(key) {
                in_use_bytes += self.entries.get(key).map_or(0, |e| e.size);
            }
        }
        let cache_bytes = self.bytes - self.pinned_bytes;
        let cache_blocks = self.entries.len() as u64 - self.pinned_blocks;
        let in_use_blocks = self
            .in_use
            .keys()
            .filter(|k| self.entries.contains_key(*k) && !self.pins.contains_key(*k))
            .count() as u64;
        CacheStats {
            blocks: self.entries.len() as u64,
            bytes: self.bytes,
            pinned_blocks: self.pinned_blocks,
            pinned_bytes: self.pinned_bytes,
            in_use_bytes,
            evictable_bytes: cache_bytes - in_use_bytes,
            evictable_blocks: cache_blocks - in_use_blocks,
            reserved_bytes: self.reserved,
            capacity: self.capacity,
        }
    }

    /// The recency changes since the last call: a block's new tick, or `None` once it is
    /// gone (for saving).
    pub fn take_dirty(&mut self) -> HashMap<BlockKey, Option<u64>> {
        std::mem::take(&mut self.dirty)
    }

    fn bump(&mut self) -> u64 {
        let tick = self.next_tick;
        self.next_tick += 1;
        tick
    }

    fn insert_fresh(&mut self, key: BlockKey, size: u64) {
        let tick = self.bump();
        self.place(key, size, tick);
        self.dirty.insert(key, Some(tick));
    }

    fn place(&mut self, key: BlockKey, size: u64, tick: u64) {
        self.entries.insert(key, Entry { size, tick });
        self.bytes += size;
        if self.pins.contains_key(&key) {
            self.pinned_bytes += size;
            self.pinned_blocks += 1;
        } else {
            self.recency.insert(tick, key);
        }
    }

    /// A block's first pin: out of the eviction line.
    fn pinned(&mut self, key: BlockKey) {
        if let Some(entry) = self.entries.get(&key).copied() {
            self.recency.remove(&entry.tick);
            self.pinned_bytes += entry.size;
            self.pinned_blocks += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(n: u8) -> BlockKey {
        Multihash::wrap(0x12, &[n; 32]).unwrap()
    }

    fn fill(index: &mut CacheIndex, n: u8, size: u64) {
        assert_eq!(index.reserve(size), Room::Reserved);
        index.insert(key(n), size);
    }

    #[test]
    fn the_least_recently_used_block_goes_first() {
        let mut index = CacheIndex::new(30);
        fill(&mut index, 1, 10);
        fill(&mut index, 2, 10);
        fill(&mut index, 3, 10);
        index.touch(&key(1));
        assert_eq!(index.reserve(10), Room::Evict(1));
        assert_eq!(index.victims(1), vec![key(2)]);
        assert_eq!(index.reserve(15), Room::Evict(2));
        assert_eq!(index.victims(2), vec![key(2), key(3)]);
    }

    #[test]
    fn pinned_and_in_use_blocks_are_never_victims() {
        let mut index = CacheIndex::new(30);
        fill(&mut index, 1, 10);
        fill(&mut index, 2, 10);
        fill(&mut index, 3, 10);
        index.pin([&key(1)]);
        index.protect(key(2));
        assert_eq!(index.reserve(10), Room::Evict(1));
        assert_eq!(index.victims(5), vec![key(3)]);
        assert!(!index.evictable(&key(1)) && !index.evictable(&key(2)));
        assert_eq!(index.reserve(20), Room::Full { used: 30 });
        index.unprotect(&key(2));
        assert_eq!(index.victims(5), vec![key(2), key(3)]);
        index.unpin([&key(1)]);
        assert_eq!(index.victims(5), vec![key(1), key(2), key(3)]);
    }

    #[test]
    fn pins_are_counted_per_block_shared_by_dags() {
        let mut index = CacheIndex::new(100);
        fill(&mut index, 1, 10);
        index.pin([&key(1)]);
        index.pin([&key(1)]);
        index.unpin([&key(1)]);
        assert!(!index.evictable(&key(1)));
        assert_eq!(index.stats().pinned_bytes, 10);
        index.unpin([&key(1)]);
        assert!(index.evictable(&key(1)));
        assert_eq!(index.stats().pinned_bytes, 0);
    }

    #[test]
    fn a_pin_on_a_block_not_yet_held_takes_hold_when_it_arrives() {
        let mut index = CacheIndex::new(100);
        index.load_pins(key(1), 1);
        fill(&mut index, 1, 10);
        assert_eq!(index.stats().pinned_bytes, 10);
        assert!(index.all_evictable().is_empty());
    }

    #[test]
    fn reservations_count_against_capacity_until_given_back() {
        let mut index = CacheIndex::new(20);
        assert_eq!(index.reserve(15), Room::Reserved);
        assert_eq!(index.reserve(10), Room::Full { used: 15 });
        index.unreserve(15);
        assert_eq!(index.reserve(10), Room::Reserved);
    }

    #[test]
    fn loading_keeps_the_saved_order_and_puts_unsaved_blocks_last() {
        let mut index = CacheIndex::new(100);
        index.load(key(1), 10, Some(50));
        index.load(key(2), 10, Some(40));
        index.load(key(3), 10, None);
        assert_eq!(index.victims(3), vec![key(2), key(1), key(3)]);
        fill(&mut index, 4, 10);
        assert_eq!(index.victims(4).last(), Some(&key(4)));
    }

    #[test]
    fn changes_are_reported_for_saving() {
        let mut index = CacheIndex::new(100);
        fill(&mut index, 1, 10);
        fill(&mut index, 2, 10);
        index.take_dirty();
        index.touch(&key(1));
        index.remove(&key(2));
        let dirty = index.take_dirty();
        assert!(matches!(dirty.get(&key(1)), Some(Some(_))));
        assert_eq!(dirty.get(&key(2)), Some(&None));
    }

    proptest! {
        /// Whatever the operations, the counters agree with the entries, nothing pinned
        /// or in use is a victim, and victims come oldest first.
        #[test]
        fn counters_and_order_stay_consistent(ops in prop::collection::vec((0u8..6, 0u8..8, 1u64..20), 1..200)) {
            let mut index = CacheIndex::new(60);
            for (op, n, size) in ops {
                match op {
                    0 => match index.reserve(size) {
                        Room::Reserved => index.insert(key(n), size),
                        Room::Evict(k) => {
                            for v in index.victims(k) { index.remove(&v); }
                        }
                        Room::Full { .. } => {}
                    },
                    1 => index.touch(&key(n)),
                    2 => index.pin([&key(n)]),
                    3 => if index.pins_of(&key(n)) > 0 { index.unpin([&key(n)]) },
                    4 => index.protect(key(n)),
                    _ => {
                        index.unprotect(&key(n));
                    }
                }
                let stats = index.stats();
                let held: u64 = index.entries.values().map(|e| e.size).sum();
                prop_assert_eq!(stats.bytes, held);
                prop_assert!(stats.bytes <= index.capacity());
                let pinned: u64 = index.entries.iter().filter(|(k, _)| index.pins.contains_key(*k)).map(|(_, e)| e.size).sum();
                prop_assert_eq!(stats.pinned_bytes, pinned);
                let victims = index.all_evictable();
                for v in &victims { prop_assert!(index.evictable(v)); }
                let ticks: Vec<u64> = victims.iter().map(|v| index.entries[v].tick).collect();
                prop_assert!(ticks.windows(2).all(|w| w[0] < w[1]));
                prop_assert_eq!(index.recency.len() as u64, stats.blocks - stats.pinned_blocks);
            }
        }
    }
}
