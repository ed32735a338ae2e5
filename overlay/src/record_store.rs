//! Kademlia's record store, with our own provider records kept apart from other peers'.
//!
//! libp2p's `MemoryStore` counts every provider key — ours and the ones other peers place
//! with us — against one limit, and other peers' records only expire when someone looks
//! them up; so a busy DHT could fill it and silently stop us announcing our own blocks.
//! Here our own records live in one store and other peers' in [`OthersStore`], each with
//! its own bound: others can fill only theirs.
//!
//! Other peers' records are bounded in count *and bytes*: at most
//! [`StoreLimits::max_addresses_per_provider`] addresses are kept per record, at most
//! [`StoreLimits::max_providers_per_key`] providers per key, and the whole store stays
//! within [`StoreLimits::max_bytes`] (expired records are swept when it fills). Value
//! records are refused: Flotilla never uses them.

use libp2p::PeerId;
use libp2p::kad::store::{Error, MemoryStore, MemoryStoreConfig, RecordStore, Result};
use libp2p::kad::{ProviderRecord, Record, RecordKey};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::borrow::Cow;
use std::collections::HashMap;
use std::time::Instant;

/// Bounds of other peers' provider records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreLimits {
    /// Most keys kept (default 65 536).
    pub max_keys: usize,
    /// Most providers kept per key (default 20, Kademlia's replication factor).
    pub max_providers_per_key: usize,
    /// Most addresses kept per provider record; more are cut (default 8).
    pub max_addresses_per_provider: usize,
    /// Most bytes kept in all, as counted by [`record_bytes`] (default 32 MiB).
    pub max_bytes: usize,
}

impl Default for StoreLimits {
    fn default() -> Self {
        StoreLimits {
            max_keys: 65_536,
            max_providers_per_key: 20,
            max_addresses_per_provider: 8,
            max_bytes: 32 * 1024 * 1024,
        }
    }
}

/// The bytes a provider record is counted for: its key, its provider, its addresses and
/// a fixed overhead for the containers holding it.
pub fn record_bytes(record: &ProviderRecord) -> usize {
    const OVERHEAD: usize = 96;
    OVERHEAD
        + record.key.as_ref().len()
        + record.provider.to_bytes().len()
        + record
            .addresses
            .iter()
            .map(|a| a.as_ref().len() + 24)
            .sum::<usize>()
}

/// Other peers' provider records, bounded in keys, providers per key, addresses per
/// provider and bytes. A deterministic structure: callers hand it the time.
#[derive(Debug, Default)]
pub struct OthersStore {
    limits: StoreLimits,
    by_key: HashMap<RecordKey, Vec<ProviderRecord>>,
    bytes: usize,
    /// When a full store last swept for expired records to make room: at most once per
    /// [`FULL_SWEEP_EVERY`], so a flood of refused records costs no scan each.
    last_full_sweep: Option<Instant>,
}

/// How often a full store may sweep for room.
const FULL_SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

impl OthersStore {
    /// An empty store with these limits.
    pub fn new(limits: StoreLimits) -> OthersStore {
        OthersStore {
            limits,
            by_key: HashMap::new(),
            bytes: 0,
            last_full_sweep: None,
        }
    }

    /// Bytes held now, as counted by [`record_bytes`].
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Keys held now.
    pub fn keys(&self) -> usize {
        self.by_key.len()
    }

    /// Provider records held now, over all keys.
    pub fn records(&self) -> usize {
        self.by_key.values().map(Vec::len).sum()
    }

    /// Adds or replaces `record` (its addresses cut to the limit); refuses it if a bound
    /// would be passed even after expired records are swept.
    pub fn add(&mut self, mut record: ProviderRecord, now: Instant) -> Result<()> {
        record
            .addresses
            .truncate(self.limits.max_addresses_per_provider);
        let size = record_bytes(&record);
        // Looked up each time: a sweep may have removed the record being replaced.
        let replaced = |s: &Self| {
            s.by_key
                .get(&record.key)
                .and_then(|list| list.iter().find(|r| r.provider == record.provider))
                .map(record_bytes)
        };
        let key_full = |s: &Self| {
            s.by_key
                .get(&record.key)
                .is_some_and(|l| l.len() >= s.limits.max_providers_per_key)
        };
        let over = |s: &Self| {
            let replaced = replaced(s);
            s.bytes - replaced.unwrap_or(0) + size > s.limits.max_bytes
                || (replaced.is_none() && key_full(s))
                || (!s.by_key.contains_key(&record.key) && s.by_key.len() >= s.limits.max_keys)
        };
        if over(self) {
            if self
                .last_full_sweep
                .is_none_or(|at| now.saturating_duration_since(at) >= FULL_SWEEP_EVERY)
            {
                self.last_full_sweep = Some(now);
                self.sweep(now);
            }
            if over(self) {
                return Err(Error::MaxProvidedKeys);
            }
        }
        let list = self.by_key.entry(record.key.clone()).or_default();
        if let Some(old) = list.iter_mut().find(|r| r.provider == record.provider) {
            self.bytes -= record_bytes(old);
            *old = record;
        } else {
            list.push(record);
        }
        self.bytes += size;
        Ok(())
    }

    /// The unexpired providers of `key`.
    pub fn providers(&self, key: &RecordKey, now: Instant) -> Vec<ProviderRecord> {
        self.by_key
            .get(key)
            .map(|list| {
                list.iter()
                    .filter(|r| !r.is_expired(now))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Forgets `provider`'s record for `key`.
    pub fn remove(&mut self, key: &RecordKey, provider: &PeerId) {
        if let Some(list) = self.by_key.get_mut(key) {
            if let Some(i) = list.iter().position(|r| r.provider == *provider) {
                self.bytes -= record_bytes(&list.swap_remove(i));
            }
            if list.is_empty() {
                self.by_key.remove(key);
            }
        }
    }

    /// Drops every expired record.
    pub fn sweep(&mut self, now: Instant) {
        let mut freed = 0;
        self.by_key.retain(|_, list| {
            list.retain(|r| {
                let expired = r.is_expired(now);
                if expired {
                    freed += record_bytes(r);
                }
                !expired
            });
            !list.is_empty()
        });
        self.bytes -= freed;
    }
}

/// Gauges of other peers' records, and a count of records refused.
#[derive(Debug, Clone, Default)]
pub struct StoreMetrics {
    /// Bytes of other peers' provider records held.
    pub bytes: Gauge,
    /// Other peers' provider records held.
    pub records: Gauge,
    /// Records refused: value records, and provider records past a bound.
    pub refused: Counter,
}

impl StoreMetrics {
    /// Creates the metrics and registers them under `registry`.
    pub fn new(registry: &mut Registry) -> StoreMetrics {
        let m = StoreMetrics::default();
        let r = registry.sub_registry_with_prefix("flotilla_dht");
        r.register(
            "provider_bytes",
            "Bytes of other peers' provider records kept for the DHT",
            m.bytes.clone(),
        );
        r.register(
            "provider_records",
            "Other peers' provider records kept for the DHT",
            m.records.clone(),
        );
        r.register(
            "records_refused",
            "DHT records refused: value records, and provider records past a bound",
            m.refused.clone(),
        );
        m
    }
}

/// Our own provider records in one bounded store, other peers' in an [`OthersStore`];
/// value records are refused.
pub struct SplitStore {
    local: PeerId,
    own: MemoryStore,
    others: OthersStore,
    metrics: StoreMetrics,
}

impl SplitStore {
    /// A store announcing at most `max_own_keys` keys of our own and keeping at most
    /// `max_other_keys` keys of other peers' provider records (other bounds default).
    pub fn new(local: PeerId, max_own_keys: usize, max_other_keys: usize) -> SplitStore {
        SplitStore::with_limits(
            local,
            max_own_keys,
            StoreLimits {
                max_keys: max_other_keys,
                ..StoreLimits::default()
            },
        )
    }

    /// A store announcing at most `max_own_keys` keys of our own and keeping other
    /// peers' records within `limits`.
    pub fn with_limits(local: PeerId, max_own_keys: usize, limits: StoreLimits) -> SplitStore {
        let config = MemoryStoreConfig {
            max_provided_keys: max_own_keys,
            max_records: 0,
            ..MemoryStoreConfig::default()
        };
        SplitStore {
            local,
            own: MemoryStore::with_config(local, config),
            others: OthersStore::new(limits),
            metrics: StoreMetrics::default(),
        }
    }

    /// The same store, reporting to `metrics`.
    pub fn with_metrics(mut self, metrics: StoreMetrics) -> SplitStore {
        self.metrics = metrics;
        self.report();
        self
    }

    fn report(&self) {
        self.metrics
            .bytes
            .set(i64::try_from(self.others.bytes()).unwrap_or(i64::MAX));
        self.metrics
            .records
            .set(i64::try_from(self.others.records()).unwrap_or(i64::MAX));
    }

    /// Other peers' records.
    pub fn others(&self) -> &OthersStore {
        &self.others
    }
}

impl RecordStore for SplitStore {
    type RecordsIter<'a> = std::iter::Empty<Cow<'a, Record>>;
    type ProvidedIter<'a> = <MemoryStore as RecordStore>::ProvidedIter<'a>;

    fn get(&self, _: &RecordKey) -> Option<Cow<'_, Record>> {
        None
    }

    fn put(&mut self, _: Record) -> Result<()> {
        // Flotilla stores no value records; a stranger's would only take memory.
        self.metrics.refused.inc();
        Err(Error::MaxRecords)
    }

    fn remove(&mut self, _: &RecordKey) {}

    fn records(&self) -> Self::RecordsIter<'_> {
        std::iter::empty()
    }

    fn add_provider(&mut self, record: ProviderRecord) -> Result<()> {
        if record.provider == self.local {
            self.own.add_provider(record)
        } else {
            let added = self.others.add(record, Instant::now());
            if added.is_err() {
                self.metrics.refused.inc();
            }
            self.report();
            added
        }
    }

    fn providers(&self, key: &RecordKey) -> Vec<ProviderRecord> {
        let mut providers = self.own.providers(key);
        providers.extend(self.others.providers(key, Instant::now()));
        providers
    }

    fn provided(&self) -> Self::ProvidedIter<'_> {
        self.own.provided()
    }

    fn remove_provider(&mut self, k: &RecordKey, p: &PeerId) {
        if *p == self.local {
            self.own.remove_provider(k, p)
        } else {
            self.others.remove(k, p);
            self.report();
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: u32, provider: PeerId) -> ProviderRecord {
        ProviderRecord::new(RecordKey::new(&key.to_be_bytes()), provider, Vec::new())
    }

    #[test]
    fn other_peers_cannot_crowd_out_our_own_records() {
        let me = PeerId::random();
        let mut store = SplitStore::new(me, 4, 2);
        let stranger = PeerId::random();
        store.add_provider(record(1, stranger)).unwrap();
        store.add_provider(record(2, stranger)).unwrap();
        assert!(
            store.add_provider(record(3, stranger)).is_err(),
            "others' space is bounded"
        );
        for key in 10..14 {
            store.add_provider(record(key, me)).unwrap();
        }
        assert!(
            store.add_provider(record(14, me)).is_err(),
            "our own space is bounded too"
        );
        assert_eq!(store.provided().count(), 4);
        store.add_provider(record(1, me)).unwrap_err();
        assert_eq!(
            store.providers(&RecordKey::new(&1u32.to_be_bytes())).len(),
            1
        );
        assert_eq!(
            store.providers(&RecordKey::new(&10u32.to_be_bytes()))[0].provider,
            me
        );
    }

    fn with_addresses(key: u32, provider: PeerId, n: usize) -> ProviderRecord {
        let addresses = (0..n)
            .map(|i| format!("/ip4/10.0.0.1/tcp/{}", 1000 + i).parse().unwrap())
            .collect();
        ProviderRecord::new(RecordKey::new(&key.to_be_bytes()), provider, addresses)
    }

    #[test]
    fn value_records_are_refused() {
        let mut store = SplitStore::new(PeerId::random(), 4, 4);
        let record = Record::new(RecordKey::new(b"k"), vec![0u8; 60_000]);
        assert!(store.put(record).is_err());
        assert!(store.get(&RecordKey::new(b"k")).is_none());
        assert_eq!(store.records().count(), 0);
    }

    #[test]
    fn addresses_per_provider_are_capped() {
        let mut store = SplitStore::new(PeerId::random(), 4, 4);
        store
            .add_provider(with_addresses(1, PeerId::random(), 500))
            .unwrap();
        let kept = store.providers(&RecordKey::new(&1u32.to_be_bytes()));
        assert_eq!(kept[0].addresses.len(), 8);
    }

    #[test]
    fn providers_per_key_are_capped() {
        let mut store = SplitStore::new(PeerId::random(), 4, 4);
        for _ in 0..20 {
            store.add_provider(record(1, PeerId::random())).unwrap();
        }
        assert!(store.add_provider(record(1, PeerId::random())).is_err());
        assert_eq!(store.others().records(), 20);
    }

    #[test]
    fn the_store_stays_within_its_bytes_and_replacing_does_not_leak() {
        let limits = StoreLimits {
            max_bytes: 64 * 1024,
            ..StoreLimits::default()
        };
        let mut store = SplitStore::with_limits(PeerId::random(), 4, limits);
        let mut refused = 0;
        for key in 0..10_000u32 {
            if store
                .add_provider(with_addresses(key, PeerId::random(), 8))
                .is_err()
            {
                refused += 1;
            }
            assert!(store.others().bytes() <= limits.max_bytes);
        }
        assert!(refused > 9_000, "only {refused} refused");
        // Replacing a provider's record counts its bytes once.
        let provider = PeerId::random();
        let mut small = SplitStore::with_limits(PeerId::random(), 4, limits);
        for _ in 0..100 {
            small.add_provider(with_addresses(7, provider, 8)).unwrap();
        }
        assert_eq!(small.others().records(), 1);
        assert_eq!(
            small.others().bytes(),
            record_bytes(&with_addresses(7, provider, 8))
        );
        small.remove_provider(&RecordKey::new(&7u32.to_be_bytes()), &provider);
        assert_eq!(small.others().bytes(), 0);
    }

    #[test]
    fn expired_records_are_swept_to_make_room() {
        let limits = StoreLimits {
            max_keys: 2,
            ..StoreLimits::default()
        };
        let mut store = OthersStore::new(limits);
        let now = Instant::now();
        let mut old = record(1, PeerId::random());
        old.expires = Some(now);
        store.add(old, now).unwrap();
        store.add(record(2, PeerId::random()), now).unwrap();
        store.add(record(3, PeerId::random()), now).unwrap();
        assert_eq!(store.keys(), 2);
        assert!(
            store
                .providers(&RecordKey::new(&1u32.to_be_bytes()), now)
                .is_empty()
        );
    }
}
