//! The store's database (redb: an embedded, transactional, crash-safe B-tree file) at
//! `<store dir>/index.redb`. Blocks stay files; this holds what must survive a restart
//! about them:
//!
//! | table | key → value | what |
//! |---|---|---|
//! | `pins` | root CID bytes → (pinned at, Unix ms; bytes; blocks) | the pins |
//! | `pin_members` | root CID bytes →→ block multihash bytes (multimap) | each pin's distinct blocks, so unpinning needs no walk of a DAG |
//! | `recency` | block multihash bytes → tick | the cache's least-recently-used order |
//!
//! A pin is added or removed in one transaction, committed durably before the call
//! returns. Recency is saved in batches; a crash loses at most the order of the blocks
//! used since the last save, which then count as the most recent.

use crate::cache::BlockKey;
use cid::Cid;
use redb::{
    Database, MultimapTableDefinition, ReadableDatabase, ReadableMultimapTable, ReadableTable,
    TableDefinition,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const PINS: TableDefinition<&[u8], (u64, u64, u64)> = TableDefinition::new("pins");
const PIN_MEMBERS: MultimapTableDefinition<&[u8], &[u8]> =
    MultimapTableDefinition::new("pin_members");
const RECENCY: TableDefinition<&[u8], u64> = TableDefinition::new("recency");

/// A database error, with the file's path.
#[derive(Debug, thiserror::Error)]
#[error("store database {path}: {source}")]
pub struct DbError {
    path: PathBuf,
    source: Box<redb::Error>,
}

/// A pin as `pin ls` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pin {
    /// The pinned DAG's root.
    pub root: Cid,
    /// When it was pinned, Unix ms.
    pub pinned_at_ms: u64,
    /// Bytes of its distinct blocks.
    pub bytes: u64,
    /// Its distinct blocks.
    pub blocks: u64,
}

/// What the database held at start.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Each block's last-use tick.
    pub recency: HashMap<BlockKey, u64>,
    /// Pins naming each block.
    pub pins: HashMap<BlockKey, u32>,
}

/// The open database.
#[derive(Debug)]
pub struct StoreDb {
    db: Database,
    path: PathBuf,
}

impl StoreDb {
    /// Opens (creating if needed) the database at `path`; redb recovers a file a crash
    /// left mid-transaction to its last commit.
    pub fn open(path: &Path) -> Result<StoreDb, DbError> {
        let failed = |e: redb::Error| DbError {
            path: path.to_owned(),
            source: Box::new(e),
        };
        let db = Database::create(path).map_err(|e| failed(e.into()))?;
        let store = StoreDb {
            db,
            path: path.to_owned(),
        };
        // Create the tables, so that readers find them.
        store.write(|txn| {
            txn.open_table(PINS)?;
            txn.open_multimap_table(PIN_MEMBERS)?;
            txn.open_table(RECENCY)?;
            Ok(())
        })?;
        Ok(store)
    }

    fn failed(&self, e: impl Into<redb::Error>) -> DbError {
        DbError {
            path: self.path.clone(),
            source: Box::new(e.into()),
        }
    }

    fn write<T>(
        &self,
        body: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, DbError> {
        let txn = self.db.begin_write().map_err(|e| self.failed(e))?;
        let out = body(&txn).map_err(|e| self.failed(e))?;
        txn.commit().map_err(|e| self.failed(e))?;
        Ok(out)
    }

    /// Reads back recency and the pins' blocks.
    pub fn load(&self) -> Result<Loaded, DbError> {
        let read = || -> Result<Loaded, redb::Error> {
            let txn = self.db.begin_read()?;
            let mut loaded = Loaded::default();
            for row in txn.open_table(RECENCY)?.iter()? {
                let (key, tick) = row?;
                if let Ok(key) = BlockKey::from_bytes(key.value()) {
                    loaded.recency.insert(key, tick.value());
                }
            }
            for row in txn.open_multimap_table(PIN_MEMBERS)?.iter()? {
                let (_, members) = row?;
                for member in members {
                    if let Ok(key) = BlockKey::from_bytes(member?.value()) {
                        *loaded.pins.entry(key).or_default() += 1;
                    }
                }
            }
            Ok(loaded)
        };
        read().map_err(|e| self.failed(e))
    }

    /// Records a pin on `pin.root` naming `members` (distinct); durable when this returns.
    /// Answers false, changing nothing, if the root was pinned already.
    pub fn add_pin(&self, pin: &Pin, members: &[BlockKey]) -> Result<bool, DbError> {
        let root = pin.root.to_bytes();
        self.write(|txn| {
            let mut pins = txn.open_table(PINS)?;
            if pins.get(root.as_slice())?.is_some() {
                return Ok(false);
            }
            pins.insert(root.as_slice(), (pin.pinned_at_ms, pin.bytes, pin.blocks))?;
            let mut table = txn.open_multimap_table(PIN_MEMBERS)?;
            for member in members {
                table.insert(root.as_slice(), member.to_bytes().as_slice())?;
            }
            Ok(true)
        })
    }

    /// Removes the pin on `root`; answers the blocks it named, or `None` if there was none.
    pub fn remove_pin(&self, root: &Cid) -> Result<Option<Vec<BlockKey>>, DbError> {
        let root = root.to_bytes();
        self.write(|txn| {
            let mut pins = txn.open_table(PINS)?;
            if pins.remove(root.as_slice())?.is_none() {
                return Ok(None);
            }
            let mut table = txn.open_multimap_table(PIN_MEMBERS)?;
            let mut members = Vec::new();
            for member in table.remove_all(root.as_slice())? {
                if let Ok(key) = BlockKey::from_bytes(member?.value()) {
                    members.push(key);
                }
            }
            Ok(Some(members))
        })
    }

    /// Every pin.
    pub fn pins(&self) -> Result<Vec<Pin>, DbError> {
        let read = || -> Result<Vec<Pin>, redb::Error> {
            let txn = self.db.begin_read()?;
            let mut pins = Vec::new();
            for row in txn.open_table(PINS)?.iter()? {
                let (root, value) = row?;
                let (pinned_at_ms, bytes, blocks) = value.value();
                if let Ok(root) = Cid::try_from(root.value()) {
                    pins.push(Pin {
                        root,
                        pinned_at_ms,
                        bytes,
                        blocks,
                    });
                }
            }
            Ok(pins)
        };
        read().map_err(|e| self.failed(e))
    }

    /// Saves recency changes: a block's new tick, or `None` to forget it.
    pub fn save_recency(&self, changes: &HashMap<BlockKey, Option<u64>>) -> Result<(), DbError> {
        if changes.is_empty() {
            return Ok(());
        }
        self.write(|txn| {
            let mut table = txn.open_table(RECENCY)?;
            for (key, tick) in changes {
                let key = key.to_bytes();
                match tick {
                    Some(tick) => {
                        table.insert(key.as_slice(), tick)?;
                    }
                    None => {
                        table.remove(key.as_slice())?;
                    }
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use multihash::Multihash;

    fn key(n: u8) -> BlockKey {
        Multihash::wrap(0x12, &[n; 32]).unwrap()
    }

    fn pin(n: u8) -> Pin {
        Pin {
            root: Cid::new_v1(0x55, key(n)),
            pinned_at_ms: 7,
            bytes: 20,
            blocks: 2,
        }
    }

    #[test]
    fn pins_and_recency_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.redb");
        {
            let db = StoreDb::open(&path).unwrap();
            assert!(db.add_pin(&pin(1), &[key(1), key(2)]).unwrap());
            assert!(!db.add_pin(&pin(1), &[key(1), key(2)]).unwrap());
            assert!(db.add_pin(&pin(3), &[key(3), key(2)]).unwrap());
            let changes = HashMap::from([(key(1), Some(5)), (key(9), Some(6))]);
            db.save_recency(&changes).unwrap();
            db.save_recency(&HashMap::from([(key(9), None)])).unwrap();
        }
        let db = StoreDb::open(&path).unwrap();
        let loaded = db.load().unwrap();
        assert_eq!(loaded.recency, HashMap::from([(key(1), 5)]));
        assert_eq!(loaded.pins.get(&key(2)), Some(&2));
        assert_eq!(loaded.pins.get(&key(1)), Some(&1));
        assert_eq!(db.pins().unwrap().len(), 2);
        let mut members = db.remove_pin(&pin(1).root).unwrap().unwrap();
        members.sort();
        assert_eq!(members, vec![key(1), key(2)]);
        assert_eq!(db.remove_pin(&pin(1).root).unwrap(), None);
        assert_eq!(db.load().unwrap().pins.get(&key(2)), Some(&1));
    }
}
