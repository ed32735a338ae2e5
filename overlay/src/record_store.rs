//! Kademlia's record store, with our own provider records kept apart from other peers'.
//!
//! libp2p's `MemoryStore` counts every provider key — ours and the ones other peers place
//! with us — against one limit, and other peers' records only expire when someone looks
//! them up; so a busy DHT could fill it and silently stop us announcing our own blocks.
//! Here our own records live in one store and other peers' in another, each with its own
//! bound: others can fill only theirs.

use libp2p::PeerId;
use libp2p::kad::store::{MemoryStore, MemoryStoreConfig, RecordStore, Result};
use libp2p::kad::{ProviderRecord, Record, RecordKey};
use std::borrow::Cow;

/// Value records and other peers' provider records in one bounded store; our own
/// provider records in another.
pub struct SplitStore {
    local: PeerId,
    own: MemoryStore,
    others: MemoryStore,
}

impl SplitStore {
    /// A store announcing at most `max_own_keys` keys of our own and keeping at most
    /// `max_other_keys` keys of other peers' provider records.
    pub fn new(local: PeerId, max_own_keys: usize, max_other_keys: usize) -> SplitStore {
        let config = |max| MemoryStoreConfig {
            max_provided_keys: max,
            ..MemoryStoreConfig::default()
        };
        SplitStore {
            local,
            own: MemoryStore::with_config(local, config(max_own_keys)),
            others: MemoryStore::with_config(local, config(max_other_keys)),
        }
    }
}

impl RecordStore for SplitStore {
    type RecordsIter<'a> = <MemoryStore as RecordStore>::RecordsIter<'a>;
    type ProvidedIter<'a> = <MemoryStore as RecordStore>::ProvidedIter<'a>;

    fn get(&self, k: &RecordKey) -> Option<Cow<'_, Record>> {
        self.others.get(k)
    }

    fn put(&mut self, r: Record) -> Result<()> {
        self.others.put(r)
    }

    fn remove(&mut self, k: &RecordKey) {
        self.others.remove(k)
    }

    fn records(&self) -> Self::RecordsIter<'_> {
        self.others.records()
    }

    fn add_provider(&mut self, record: ProviderRecord) -> Result<()> {
        if record.provider == self.local {
            self.own.add_provider(record)
        } else {
            self.others.add_provider(record)
        }
    }

    fn providers(&self, key: &RecordKey) -> Vec<ProviderRecord> {
        let mut providers = self.own.providers(key);
        providers.extend(self.others.providers(key));
        providers
    }

    fn provided(&self) -> Self::ProvidedIter<'_> {
        self.own.provided()
    }

    fn remove_provider(&mut self, k: &RecordKey, p: &PeerId) {
        if *p == self.local {
            self.own.remove_provider(k, p)
        } else {
            self.others.remove_provider(k, p)
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
}
