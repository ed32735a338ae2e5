//! The on-disk blockstore: one file per block, named by its multihash, with an index of
//! what is pinned, in use and cached ([`crate::cache`]) kept in a database
//! ([`crate::store_db`]).
//!
//! Layout: `<root>/blocks/<2 hex digits>/<hex multihash>`, `<root>/tmp/` for writes in
//! progress, and `<root>/index.redb`. A write goes to a fresh temporary file that is then
//! renamed to its final name, so a crash never leaves a partial block under a valid name;
//! writers of the same block are serialised by a striped lock, so a block is never
//! counted twice. (Renaming rather than linking and unlinking matters: ext4 slows inode
//! allocation down while many inodes were recently deleted.) Written blocks are made
//! durable in batches by [`Blockstore::sync`] (each file's data, then each directory it
//! was renamed into), which `add` and `fetch` call before they return or announce a root.
//! Every read is verified against the CID; a block that fails (a disk fault, a power cut
//! before the kernel flushed it) is deleted and reported missing, so it is fetched again
//! rather than served. Blocks are keyed by multihash, so a CIDv0 and a CIDv1 of the same
//! bytes share one file, as in IPFS. Blocks of identity CIDs (data inlined in the CID) are
//! always "held" and never written.
//!
//! The store never holds more than its capacity. A block that does not fit evicts cached
//! blocks, least recently used first; pinned blocks and blocks under a [`Lease`] are
//! never evicted, and if they leave no room the write fails with [`StoreError::Full`].

use crate::block::{Block, BlockError};
use crate::cache::{BlockKey, CacheIndex, CacheStats, Room};
use crate::store_db::{DbError, Pin, StoreDb};
use bytes::Bytes;
use cid::Cid;
use std::collections::{BTreeSet, HashSet, VecDeque};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Errors of the blockstore.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem operation failed.
    #[error("blockstore I/O error at {path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Storing the block would exceed the configured capacity, even after evicting every
    /// cached block not in use.
    #[error(
        "blockstore full: {used} of {capacity} bytes pinned, in use or being written, block needs {needed}"
    )]
    Full {
        /// Bytes held or reserved that could not be evicted.
        used: u64,
        /// The configured capacity.
        capacity: u64,
        /// Size of the refused block.
        needed: u64,
    },
    /// A block was invalid.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// The store's database failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The store was closed (its node stopped).
    #[error("the blockstore is closed")]
    Closed,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A handle to an on-disk blockstore; clones share the same store.
#[derive(Debug, Clone)]
pub struct Blockstore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    blocks_dir: PathBuf,
    tmp_dir: PathBuf,
    index: Mutex<CacheIndex>,
    /// The database, until [`Blockstore::close`].
    db: Mutex<Option<Arc<StoreDb>>>,
    /// Serialises writers of the same block (striped by the digest's first byte).
    write_locks: Vec<Mutex<()>>,
    /// Block files renamed into place and not yet made durable, and their directories.
    unsynced: Mutex<Unsynced>,
    /// Held by a running [`Blockstore::sync`], so a second one waits for the first.
    syncing: Mutex<()>,
    /// Whether a background sync is under way.
    syncing_early: std::sync::atomic::AtomicBool,
    /// Leases kept past their user, until a deadline (a call's inputs and outputs).
    /// Locked after `index`, never before.
    kept: Mutex<Kept>,
    /// Serialises pin and unpin, so the database and the index agree.
    pinning: Mutex<()>,
    /// Bytes of pinned blocks, for whoever must know when pins crowd out the rest.
    pinned: tokio::sync::watch::Sender<u64>,
}

/// Leases kept past their user, oldest first, and how many keys they hold in all.
#[derive(Debug, Default)]
struct Kept {
    leases: VecDeque<(Instant, Vec<BlockKey>)>,
    keys: usize,
}

impl Kept {
    /// Lets go of the lease at `i`, unprotecting its blocks; answers the bytes that
    /// became evictable.
    fn release(&mut self, i: usize, index: &mut CacheIndex) -> u64 {
        let Some((_, keys)) = self.leases.remove(i) else {
            return 0;
        };
        self.keys -= keys.len();
        keys.iter().map(|key| index.unprotect(key)).sum()
    }

    /// Lets go of the leases whose time is up.
    fn release_expired(&mut self, now: Instant, index: &mut CacheIndex) {
        // Deadlines are not in order (different keep times), so look at all of them.
        let mut i = 0;
        while i < self.leases.len() {
            if self.leases[i].0 <= now {
                self.release(i, index);
            } else {
                i += 1;
            }
        }
    }

    /// Lets go of the lease due soonest; answers the bytes that became evictable, or
    /// `None` if none is kept.
    fn release_soonest(&mut self, index: &mut CacheIndex) -> Option<u64> {
        let soonest = self
            .leases
            .iter()
            .enumerate()
            .min_by_key(|(_, (until, _))| *until)
            .map(|(i, _)| i)?;
        Some(self.release(soonest, index))
    }
}

#[derive(Debug, Default)]
struct Unsynced {
    files: Vec<PathBuf>,
    shards: BTreeSet<u8>,
}

/// Number of write-lock stripes.
const WRITE_STRIPES: usize = 64;
/// Most rounds of eviction one write tries before it reports the store full.
const MAX_ROOM_ROUNDS: usize = 1024;
/// Most leases kept past their user at once; the oldest is let go early beyond it.
const MAX_KEPT_LEASES: usize = 4096;
/// Most block keys the kept leases hold in all (about 20 MiB), whatever their number:
/// calls re-reading one large held DAG each keep all its keys.
const MAX_KEPT_KEYS: usize = 262_144;
/// Once this many written files wait to be made durable, a sync starts in the background,
/// so a large add or fetch has little left to flush when it ends.
const SYNC_EARLY_AT: usize = 32;
/// Above this many files to make durable, one `syncfs` of the store's filesystem does it:
/// one journal commit instead of one per file and directory (64 MiB fetched: 35 ms
/// against 125 ms on ext4 here), at the price of flushing others' dirty data too.
const SYNCFS_ABOVE: usize = 8;

/// Counts of what the store holds, by state.
pub type StoreStats = CacheStats;

/// What [`Blockstore::gc`] removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GcReport {
    /// Blocks removed.
    pub blocks: u64,
    /// Bytes freed.
    pub bytes: u64,
}

/// Blocks protected from eviction while a call, fetch, add or read uses them. Dropping
/// the lease ends the protection; [`Lease::keep_until`] extends it past its user.
#[derive(Debug)]
pub struct Lease {
    store: Blockstore,
    keys: Mutex<HashSet<BlockKey>>,
}

impl Lease {
    /// Protects the block `cid` names (held or not yet) for as long as this lease lives.
    pub fn protect(&self, cid: &Cid) {
        if Block::inlined(cid).is_some() {
            return;
        }
        let key = *cid.hash();
        if lock(&self.keys).insert(key) {
            self.store.index().protect(key);
        }
    }

    /// How many blocks this lease protects.
    pub fn len(&self) -> usize {
        lock(&self.keys).len()
    }

    /// Whether this lease protects nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps the protection until `until`, after this lease is gone (a call's inputs and
    /// outputs stay a while after its answer). Let go early when a write finds no other
    /// room, and when more than [`MAX_KEPT_LEASES`] are kept (the oldest first).
    pub fn keep_until(self, until: Instant) {
        let keys: Vec<BlockKey> = std::mem::take(&mut *lock(&self.keys)).into_iter().collect();
        if keys.is_empty() {
            return;
        }
        let mut index = self.store.index();
        let mut kept = lock(&self.store.inner.kept);
        kept.keys += keys.len();
        kept.leases.push_back((until, keys));
        while kept.leases.len() > MAX_KEPT_LEASES || kept.keys > MAX_KEPT_KEYS {
            kept.release(0, &mut index);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let keys = std::mem::take(&mut *lock(&self.keys));
        if keys.is_empty() {
            return;
        }
        let mut index = self.store.index();
        for key in &keys {
            index.unprotect(key);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Blockstore {
    /// Opens (creating if needed) the store under `root`, holding at most `capacity` bytes.
    /// Reads back the pins and the cache's order from the database; a block file the
    /// database has no order for (written after its last save) counts as the most recent.
    pub fn open(root: &Path, capacity: u64) -> Result<Blockstore, StoreError> {
        let blocks_dir = root.join("blocks");
        let tmp_dir = root.join("tmp");
        fs::create_dir_all(&blocks_dir).map_err(io_err(&blocks_dir))?;
        // Anything left in tmp/ is from a write that never finished.
        if tmp_dir.exists() {
            fs::remove_dir_all(&tmp_dir).map_err(io_err(&tmp_dir))?;
        }
        fs::create_dir_all(&tmp_dir).map_err(io_err(&tmp_dir))?;
        for shard in 0..=255u8 {
            let dir = blocks_dir.join(format!("{shard:02x}"));
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        let db = StoreDb::open(&root.join("index.redb"))?;
        let mut saved = db.load()?;
        let mut found = Vec::new();
        for shard in fs::read_dir(&blocks_dir).map_err(io_err(&blocks_dir))? {
            let shard = shard.map_err(io_err(&blocks_dir))?.path();
            for file in fs::read_dir(&shard).map_err(io_err(&shard))? {
                let file = file.map_err(io_err(&shard))?;
                let meta = file.metadata().map_err(io_err(&shard))?;
                let key = file
                    .file_name()
                    .to_str()
                    .and_then(unhex)
                    .and_then(|b| BlockKey::from_bytes(&b).ok());
                match key {
                    Some(key) => {
                        let tick = saved.recency.remove(&key);
                        found.push((key, meta.len(), tick));
                    }
                    // Not a block's name: nothing this store wrote.
                    None => {
                        tracing::warn!(path = %file.path().display(), "ignoring a stray file in the blockstore")
                    }
                }
            }
        }
        // Saved order first, then blocks written since the last save.
        found.sort_by_key(|(_, _, tick)| (tick.is_none(), *tick));
        let mut index = CacheIndex::new(capacity);
        for (key, size, tick) in found {
            index.load(key, size, tick);
        }
        for (key, pins) in saved.pins {
            index.load_pins(key, pins);
        }
        // Forget the order of blocks no longer on disk.
        let gone = saved.recency.into_keys().map(|k| (k, None)).collect();
        db.save_recency(&gone)?;
        // Blocks a killed process wrote but had not made durable: make them so now.
        fs::File::open(&blocks_dir)
            .and_then(|d| rustix::fs::syncfs(&d).map_err(io::Error::from))
            .map_err(io_err(&blocks_dir))?;
        let pinned = index.pinned_bytes();
        if pinned > capacity {
            tracing::error!(
                pinned,
                capacity,
                "the pinned blocks alone exceed the store's capacity: raise --store-capacity or unpin"
            );
        }
        Ok(Blockstore {
            inner: Arc::new(Inner {
                blocks_dir,
                tmp_dir,
                index: Mutex::new(index),
                db: Mutex::new(Some(Arc::new(db))),
                write_locks: (0..WRITE_STRIPES).map(|_| Mutex::new(())).collect(),
                unsynced: Mutex::new(Unsynced::default()),
                syncing: Mutex::new(()),
                syncing_early: std::sync::atomic::AtomicBool::new(false),
                kept: Mutex::new(Kept::default()),
                pinning: Mutex::new(()),
                pinned: tokio::sync::watch::Sender::new(pinned),
            }),
        })
    }

    /// The most bytes the store holds.
    pub fn capacity(&self) -> u64 {
        self.index().capacity()
    }

    /// The bytes of pinned blocks held, now and as pins change.
    pub fn watch_pinned(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.pinned.subscribe()
    }

    fn pins_changed(&self) {
        let pinned = self.index().pinned_bytes();
        self.inner.pinned.send_replace(pinned);
    }

    fn index(&self) -> MutexGuard<'_, CacheIndex> {
        lock(&self.inner.index)
    }

    fn db(&self) -> Result<Arc<StoreDb>, StoreError> {
        lock(&self.inner.db).clone().ok_or(StoreError::Closed)
    }

    /// Closes the database without saving anything, as a crash would leave it (for tests
    /// that kill a node and start it again in the same process).
    pub fn abandon(&self) {
        drop(lock(&self.inner.db).take());
    }

    /// Saves the cache's order of use and closes the database, so that the store can be
    /// opened again (by a node restarted in the same process, say) while handles to this
    /// one remain. Blocks can still be read; pins can no longer change.
    pub fn close(&self) -> Result<(), StoreError> {
        let saved = self.save_recency();
        let db = lock(&self.inner.db).take();
        // Closed once the last user of the database (a pin in progress, say) lets go.
        drop(db);
        saved
    }

    fn shard_of(key: &BlockKey) -> u8 {
        // Shard on the first digest byte (after the multihash header).
        key.digest().first().copied().unwrap_or(0)
    }

    fn path_of_key(&self, key: &BlockKey) -> PathBuf {
        let name = hex(&key.to_bytes());
        let shard = format!("{:02x}", Self::shard_of(key));
        self.inner.blocks_dir.join(shard).join(name)
    }

    fn path_of(&self, cid: &Cid) -> PathBuf {
        self.path_of_key(cid.hash())
    }

    fn stripe(&self, key: &BlockKey) -> MutexGuard<'_, ()> {
        lock(&self.inner.write_locks[Self::shard_of(key) as usize % WRITE_STRIPES])
    }

    /// A new, empty lease on this store's blocks.
    pub fn lease(&self) -> Lease {
        Lease {
            store: self.clone(),
            keys: Mutex::new(HashSet::new()),
        }
    }

    /// Whether the store holds a block with this CID's multihash.
    pub fn has(&self, cid: &Cid) -> bool {
        Block::inlined(cid).is_some() || self.index().contains(cid.hash())
    }

    /// Stores a verified block, evicting cached blocks if it does not fit. Storing a block
    /// that is already there is a no-op (it counts as used now), and so is storing a block
    /// an identity CID carries inline. The block is durable after the next [`Self::sync`].
    pub fn put(&self, block: &Block) -> Result<(), StoreError> {
        if Block::inlined(block.cid()).is_some() {
            return Ok(());
        }
        let key = *block.cid().hash();
        let size = block.data().len() as u64;
        {
            let mut index = self.index();
            if index.size_of(&key) == Some(size) {
                index.touch(&key);
                return Ok(());
            }
        }
        self.make_room(size)?;
        let path = self.path_of_key(&key);
        let _writing = self.stripe(&key);
        {
            // Another writer may have put it meanwhile.
            let mut index = self.index();
            if index.size_of(&key) == Some(size) {
                index.unreserve(size);
                index.touch(&key);
                return Ok(());
            }
        }
        let tmp = self
            .inner
            .tmp_dir
            .join(format!("{:016x}", rand::random::<u64>()));
        let written = fs::File::create(&tmp)
            .and_then(|mut file| file.write_all(block.data()))
            .and_then(|()| fs::rename(&tmp, &path));
        if let Err(source) = written {
            let _ = fs::remove_file(&tmp);
            self.index().unreserve(size);
            return Err(StoreError::Io { path, source });
        }
        // Listed to be made durable before anyone can find it: a writer racing for the
        // same block returns at once, and its sync must cover this file.
        let waiting = {
            let mut unsynced = lock(&self.inner.unsynced);
            unsynced.files.push(path);
            unsynced.shards.insert(Self::shard_of(&key));
            unsynced.files.len()
        };
        self.index().insert(key, size);
        if waiting >= SYNC_EARLY_AT {
            self.sync_in_background();
        }
        Ok(())
    }

    /// Starts a sync on a thread of its own unless one is under way (one at a time).
    fn sync_in_background(&self) {
        use std::sync::atomic::Ordering;
        if self.inner.syncing_early.swap(true, Ordering::AcqRel) {
            return;
        }
        let store = self.clone();
        let started = std::thread::Builder::new()
            .name("blockstore-sync".into())
            .spawn(move || {
                if let Err(e) = store.sync() {
                    tracing::warn!(error = %e, "background sync of the blockstore failed");
                }
                store.inner.syncing_early.store(false, Ordering::Release);
            });
        if started.is_err() {
            self.inner.syncing_early.store(false, Ordering::Release);
        }
    }

    /// Reserves `size` bytes, evicting cached blocks, least recently used first, until
    /// they fit. When pinned, in-use and reserved blocks leave no room, calls' data kept
    /// past their answer ([`Lease::keep_until`]) is let go, the soonest due first: a call
    /// running now comes before one that has answered. Fails if that is not enough.
    fn make_room(&self, size: u64) -> Result<(), StoreError> {
        // Each round evicts what was evictable a moment ago. Writers racing for room pick
        // the same oldest blocks and take the room others freed, so a round may win
        // nothing; every round frees something for someone, so this ends, and the bound
        // only stops a pathological spin.
        for _ in 0..MAX_ROOM_ROUNDS {
            let victims = {
                let mut index = self.index();
                let mut kept = lock(&self.inner.kept);
                kept.release_expired(Instant::now(), &mut index);
                match index.reserve(size) {
                    Room::Reserved => return Ok(()),
                    Room::Evict(n) => index.victims(n),
                    Room::Full { .. } => {
                        // What is missing is at most `size` (the store never holds more
                        // than its capacity): let kept data go until that much is free.
                        let mut freed = 0;
                        while freed < size {
                            match kept.release_soonest(&mut index) {
                                Some(bytes) => freed += bytes,
                                None => break,
                            }
                        }
                        if freed == 0 {
                            drop(kept);
                            return Err(Self::full(&index, size));
                        }
                        continue;
                    }
                }
            };
            for key in victims {
                self.evict(&key)?;
            }
        }
        let index = self.index();
        Err(Self::full(&index, size))
    }

    fn full(index: &CacheIndex, size: u64) -> StoreError {
        let stats = index.stats();
        StoreError::Full {
            used: stats.bytes + stats.reserved_bytes - stats.evictable_bytes,
            capacity: index.capacity(),
            needed: size,
        }
    }

    /// Removes a block if it is still evictable; answers the bytes freed, or `None` if
    /// it was not evicted. The index stays locked from the check to the end, so no lease
    /// can protect the block in between (a lease protects, then looks); the file goes
    /// first, so a block whose file could not be deleted stays counted.
    fn evict(&self, key: &BlockKey) -> Result<Option<u64>, StoreError> {
        let _writing = self.stripe(key);
        let mut index = self.index();
        if !index.evictable(key) {
            return Ok(None);
        }
        let path = self.path_of_key(key);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(StoreError::Io { path, source }),
        }
        Ok(index.remove(key))
    }

    /// Lets go of kept leases whose time is up.
    fn release_expired(&self, index: &mut CacheIndex) {
        lock(&self.inner.kept).release_expired(Instant::now(), index);
    }

    /// Reads and verifies a block; `Ok(None)` if it is absent (or was found corrupt and
    /// has been removed). A block read counts as used now.
    pub fn get(&self, cid: &Cid) -> Result<Option<Block>, StoreError> {
        if let Some(block) = Block::inlined(cid) {
            return Ok(Some(block));
        }
        let path = self.path_of(cid);
        let data = match fs::read(&path) {
            Ok(data) => Bytes::from(data),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Deleted behind our back: forget it.
                let _writing = self.stripe(cid.hash());
                if !path.exists() {
                    self.index().remove(cid.hash());
                }
                return Ok(None);
            }
            Err(e) => return Err(StoreError::Io { path, source: e }),
        };
        match Block::verified(*cid, data) {
            Ok(block) => {
                self.index().touch(cid.hash());
                Ok(Some(block))
            }
            Err(BlockError::HashMismatch(_)) => {
                tracing::warn!(%cid, "removing corrupt block from the store");
                self.remove(cid)?;
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Removes a block if present, pinned or not (a corrupt copy, say: a pinned block
    /// fetched again is pinned again).
    pub fn remove(&self, cid: &Cid) -> Result<(), StoreError> {
        let key = cid.hash();
        let path = self.path_of(cid);
        let _writing = self.stripe(key);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::Io { path, source: e }),
        }
        self.index().remove(key);
        Ok(())
    }

    /// Makes every block written so far durable: each file's data, then each directory a
    /// file was renamed into (or, for more than [`SYNCFS_ABOVE`] files, the whole
    /// filesystem at once). Batched: one call covers every write before it, and a call
    /// made while another runs waits for it and then syncs what is left.
    pub fn sync(&self) -> Result<(), StoreError> {
        let _one_at_a_time = lock(&self.inner.syncing);
        let pending = std::mem::take(&mut *lock(&self.inner.unsynced));
        let synced = self.sync_now(&pending);
        if synced.is_err() {
            // Not durable: the next sync tries these again.
            let mut unsynced = lock(&self.inner.unsynced);
            unsynced.files.extend(pending.files);
            unsynced.shards.extend(pending.shards);
        }
        synced
    }

    fn sync_now(&self, pending: &Unsynced) -> Result<(), StoreError> {
        if pending.files.len() > SYNCFS_ABOVE {
            let dir = &self.inner.blocks_dir;
            return fs::File::open(dir)
                .and_then(|d| rustix::fs::syncfs(&d).map_err(io::Error::from))
                .map_err(io_err(dir));
        }
        for path in &pending.files {
            match fs::File::open(path).and_then(|f| f.sync_data()) {
                Ok(()) => {}
                // Evicted since: nothing to make durable.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(StoreError::Io {
                        path: path.clone(),
                        source,
                    });
                }
            }
        }
        for shard in &pending.shards {
            let dir = self.inner.blocks_dir.join(format!("{shard:02x}"));
            fs::File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err(&dir))?;
        }
        Ok(())
    }

    /// Pins the DAG under `root`, whose distinct blocks are `members` (all held): they are
    /// never evicted until it is unpinned. Durable when this returns. Answers false if
    /// `root` was pinned already.
    pub fn pin(&self, root: &Cid, members: &[Cid]) -> Result<bool, StoreError> {
        let keys: Vec<BlockKey> = members
            .iter()
            .filter(|c| Block::inlined(c).is_none())
            .map(|c| *c.hash())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let bytes = {
            let index = self.index();
            keys.iter().filter_map(|k| index.size_of(k)).sum()
        };
        let pin = Pin {
            root: *root,
            pinned_at_ms: now_ms(),
            bytes,
            blocks: keys.len() as u64,
        };
        // The blocks first, then the pin that names them.
        self.sync()?;
        let _one_at_a_time = lock(&self.inner.pinning);
        if !self.db()?.add_pin(&pin, &keys)? {
            return Ok(false);
        }
        self.index().pin(&keys);
        self.pins_changed();
        Ok(true)
    }

    /// Removes the pin on `root`; its blocks become cache (evictable, as recent as they
    /// were) unless another pin names them. Answers false if `root` was not pinned.
    pub fn unpin(&self, root: &Cid) -> Result<bool, StoreError> {
        let _one_at_a_time = lock(&self.inner.pinning);
        match self.db()?.remove_pin(root)? {
            Some(keys) => {
                self.index().unpin(&keys);
                self.pins_changed();
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Every pin.
    pub fn pins(&self) -> Result<Vec<Pin>, StoreError> {
        Ok(self.db()?.pins()?)
    }

    /// Removes every cached block that is not in use, as `ipfs repo gc` does.
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        let victims = {
            let mut index = self.index();
            self.release_expired(&mut index);
            index.all_evictable()
        };
        let mut report = GcReport::default();
        let mut failed = None;
        for key in victims {
            match self.evict(&key) {
                Ok(Some(freed)) => {
                    report.blocks += 1;
                    report.bytes += freed;
                }
                Ok(None) => {}
                // One file that cannot be deleted does not stop the rest.
                Err(e) => {
                    tracing::warn!(error = %e, "gc could not remove a block");
                    failed.get_or_insert(e);
                }
            }
        }
        self.save_recency()?;
        match failed {
            Some(e) if report.blocks == 0 => Err(e),
            _ => Ok(report),
        }
    }

    /// Saves the cache's order of use to the database.
    pub fn save_recency(&self) -> Result<(), StoreError> {
        let db = self.db()?;
        let dirty = self.index().take_dirty();
        Ok(db.save_recency(&dirty)?)
    }

    /// What the store holds, by state.
    pub fn stats(&self) -> StoreStats {
        let mut index = self.index();
        self.release_expired(&mut index);
        index.stats()
    }

    /// The multihashes of every block held (for re-announcing them at start).
    pub fn list(&self) -> Result<Vec<BlockKey>, StoreError> {
        Ok(self.index().keys())
    }

    /// Reads a block on the blocking thread pool.
    pub async fn get_async(&self, cid: Cid) -> Result<Option<Block>, StoreError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.get(&cid))
            .await
            .expect("blockstore reads do not panic")
    }

    /// Writes a block on the blocking thread pool.
    pub async fn put_async(&self, block: Block) -> Result<(), StoreError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.put(&block))
            .await
            .expect("blockstore writes do not panic")
    }

    /// Runs `work` on this store on the blocking thread pool.
    pub async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Blockstore) -> T + Send + 'static,
    ) -> T {
        let store = self.clone();
        tokio::task::spawn_blocking(move || work(&store))
            .await
            .expect("blockstore work does not panic")
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::RAW;
    use proptest::prelude::*;

    fn raw(data: &[u8]) -> Block {
        Block::encode(RAW, Bytes::copy_from_slice(data)).unwrap()
    }

    #[test]
    fn put_get_has_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = Blockstore::open(dir.path(), 1 << 20).unwrap();
        let block = raw(b"some bytes");
        assert!(!store.has(block.cid()));
        assert_eq!(store.get(block.cid()).unwrap(), None);
        store.put(&block).unwrap();
        store.put(&block).unwrap();
        assert!(store.has(block.cid()));
        assert_eq!(store.get(block.cid()).unwrap(), Some(block.clone()));
        assert_eq!(store.stats().blocks, 1);
        assert_eq!(store.stats().bytes, 10);
        assert_eq!(store.list().unwrap(), vec![*block.cid().hash()]);
        store.remove(block.cid()).unwrap();
        assert!(!store.has(block.cid()));
        assert_eq!(store.stats().blocks, 0);
    }

    #[test]
    fn identity_blocks_are_held_without_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = Blockstore::open(dir.path(), 1 << 20).unwrap();
        let cid = Cid::new_v1(
            RAW,
            multihash::Multihash::wrap(crate::block::IDENTITY, b"tiny").unwrap(),
        );
        assert!(store.has(&cid));
        let block = store.get(&cid).unwrap().unwrap();
        store.put(&block).unwrap();
        assert_eq!(store.stats().blocks, 0);
    }

    #[test]
    fn corrupt_block_on_disk_is_dropped_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = Blockstore::open(dir.path(), 1 << 20).unwrap();
        let block = raw(b"precious");
        store.put(&block).unwrap();
        fs::write(store.path_of(block.cid()), b"precioUs").unwrap();
        assert_eq!(store.get(block.cid()).unwrap(), None);
        assert!(!store.has(block.cid()));
    }

    #[test]
    fn a_damaged_copy_is_dropped_when_read_and_put_again_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = Blockstore::open(dir.path(), 1 << 20).unwrap();
        let block = raw(b"a block cut short by a crash");
        store.put(&block).unwrap();
        fs::write(store.path_of(block.cid()), b"a block cut").unwrap();
        assert_eq!(store.get(block.cid()).unwrap(), None);
        store.put(&block).unwrap();
        assert_eq!(store.get(block.cid()).unwrap(), Some(block.clone()));
        assert_eq!(store.stats().blocks, 1);
        assert_eq!(store.stats().bytes, block.data().len() as u64);
    }

    #[test]
    fn a_full_store_evicts_the_least_recently_used_block() {
        let dir = tempfile::tempdir().unwrap();
        let store = Blockstore::open(dir.path(), 30).unwrap();
        let blocks: Vec<Block> = (0..4u8).map(|i| raw(&[i; 10])).collect();
        for block in &blocks[..3] {
            store.put(block).unwrap();
        }
        // Reading the first makes the second the least recently used.
        store.get(blocks[0].cid()).unwrap();
        store.put(&blocks[3]).unwrap();
        assert!(store.has(blocks[0].cid()));
        assert!(!store.has(blocks[1].cid()));
        assert!(!store.path_of(blocks[1].cid()).exists());
        assert!(store.has(blocks[2].cid()) && store.has(blocks[3].cid()));
        assert_eq!(store.stats().bytes, 30);
    }

    #[test]
    fn pinned_and_leased_blocks_are_never_evicted_and_full_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let store = Blockstore::open(dir.path(), 20).unwrap();
        let (pinned, leased, new) = (raw(&[1; 10]), raw(&[2; 10]), raw(&[3; 10]));
        store.put(&pinned).unwrap();
        store.pin(pinned.cid(), &[*pinned.cid()]).unwrap();
        let lease = store.lease();
        lease.protect(leased.cid());
        store.put(&leased).unwrap();
        assert!(matches!(
            store.put(&new),
            Err(StoreError::Full {
                used: 20,
                capacity: 20,
                needed: 10
            })
        ));
        drop(lease);
        store.put(&new).unwrap();
        assert!(store.has(pinned.cid()) && !store.has(leased.cid()));
    }

    #[test]
    fn a_kept_lease_protects_until_its_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let store = Blockstore::open(dir.path(), 20).unwrap();
        let (a, b) = (raw(&[1; 10]), raw(&[2; 10]));
        let lease = store.lease();
        lease.protect(a.cid());
        store.put(&a).unwrap();
        lease.keep_until(Instant::now() + std::time::Duration::from_secs(3600));
        let lease = store.lease();
        lease.protect(b.cid());
        store.put(&b).unwrap();
        lease.keep_until(Instant::now());
        assert_eq!(store.stats().evictable_bytes, 10);
        assert_eq!(
            store.gc().unwrap(),
            GcReport {
                blocks: 1,
                bytes: 10
            }
        );
        assert!(store.has(a.cid()) && !store.has(b.cid()));
    }

    #[test]
    fn kept_data_gives_way_to_a_write_that_finds_no_other_room_soonest_due_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = Blockstore::open(dir.path(), 20).unwrap();
        let (later, sooner) = (raw(&[1; 10]), raw(&[2; 10]));
        let hour = std::time::Duration::from_secs(3600);
        for (block, keep) in [(&later, 2 * hour), (&sooner, hour)] {
            let lease = store.lease();
            lease.protect(block.cid());
            store.put(block).unwrap();
            lease.keep_until(Instant::now() + keep);
        }
        store.put(&raw(&[3; 10])).unwrap();
        assert!(store.has(later.cid()) && !store.has(sooner.cid()));
        // Blocks in use are never let go.
        let running = store.lease();
        running.protect(raw(&[3; 10]).cid());
        running.protect(raw(&[4; 10]).cid());
        store.put(&raw(&[4; 10])).unwrap();
        assert!(!store.has(later.cid()));
        assert!(matches!(
            store.put(&raw(&[5; 10])),
            Err(StoreError::Full { .. })
        ));
    }

    #[test]
    fn kept_leases_are_bounded_in_keys_as_well_as_in_number() {
        let dir = tempfile::tempdir().unwrap();
        let store = Blockstore::open(dir.path(), 1 << 20).unwrap();
        let block = raw(b"held");
        store.put(&block).unwrap();
        let first = store.lease();
        first.protect(block.cid());
        first.keep_until(Instant::now() + std::time::Duration::from_secs(3600));
        assert_eq!(store.stats().evictable_bytes, 0);
        // One lease with more keys than all kept leases may hold pushes the first out.
        let big = store.lease();
        for i in 0..=MAX_KEPT_KEYS as u64 {
            let hash = multihash::Multihash::wrap(0x12, &[&i.to_le_bytes()[..], &[0; 24]].concat());
            big.protect(&Cid::new_v1(crate::block::RAW, hash.unwrap()));
        }
        big.keep_until(Instant::now() + std::time::Duration::from_secs(3600));
        assert_eq!(store.stats().evictable_bytes, 4);
        let kept = lock(&store.inner.kept);
        assert!(kept.keys <= MAX_KEPT_KEYS && kept.leases.is_empty());
    }

    #[test]
    fn gc_removes_the_cache_and_keeps_pins_across_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let (kept, cached) = (raw(b"pinned"), raw(b"cached"));
        {
            let store = Blockstore::open(dir.path(), 1 << 20).unwrap();
            store.put(&kept).unwrap();
            store.put(&cached).unwrap();
            assert!(store.pin(kept.cid(), &[*kept.cid()]).unwrap());
            assert!(!store.pin(kept.cid(), &[*kept.cid()]).unwrap());
            store.save_recency().unwrap();
        }
        let store = Blockstore::open(dir.path(), 1 << 20).unwrap();
        let stats = store.stats();
        assert_eq!((stats.pinned_blocks, stats.pinned_bytes), (1, 6));
        assert_eq!(
            store.gc().unwrap(),
            GcReport {
                blocks: 1,
                bytes: 6
            }
        );
        assert!(store.has(kept.cid()) && !store.has(cached.cid()));
        assert_eq!(store.pins().unwrap()[0].root, *kept.cid());
        assert!(store.unpin(kept.cid()).unwrap());
        assert!(!store.unpin(kept.cid()).unwrap());
        assert_eq!(store.gc().unwrap().blocks, 1);
        assert_eq!(store.stats().blocks, 0);
    }

    #[test]
    fn the_order_of_use_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let blocks: Vec<Block> = (0..3u8).map(|i| raw(&[i; 10])).collect();
        {
            let store = Blockstore::open(dir.path(), 30).unwrap();
            for block in &blocks {
                store.put(block).unwrap();
            }
            store.get(blocks[0].cid()).unwrap();
            store.save_recency().unwrap();
        }
        let store = Blockstore::open(dir.path(), 30).unwrap();
        store.put(&raw(&[9; 10])).unwrap();
        assert!(store.has(blocks[0].cid()));
        assert!(!store.has(blocks[1].cid()));
    }

    #[test]
    fn sync_makes_written_blocks_durable_and_skips_evicted_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = Blockstore::open(dir.path(), 10).unwrap();
        store.put(&raw(&[1; 10])).unwrap();
        store.put(&raw(&[2; 10])).unwrap();
        store.sync().unwrap();
        assert!(lock(&store.inner.unsynced).files.is_empty());
        // Many files: the whole filesystem at once.
        let dir = tempfile::tempdir().unwrap();
        let store = Blockstore::open(dir.path(), 1 << 20).unwrap();
        for i in 0..=SYNCFS_ABOVE as u8 {
            store.put(&raw(&[i; 10])).unwrap();
        }
        store.sync().unwrap();
        assert!(lock(&store.inner.unsynced).files.is_empty());
    }

    #[test]
    fn writers_racing_for_room_never_exceed_the_capacity() {
        let dir = tempfile::tempdir().unwrap();
        let store = Blockstore::open(dir.path(), 4096).unwrap();
        std::thread::scope(|scope| {
            for t in 0..4u8 {
                let store = store.clone();
                scope.spawn(move || {
                    for i in 0..200u16 {
                        let mut data = vec![t; 100 + usize::from(i % 7) * 50];
                        data.extend_from_slice(&i.to_be_bytes());
                        let block = raw(&data);
                        store.put(&block).unwrap();
                        assert!(store.stats().bytes <= 4096);
                        let _ = store.get(block.cid()).unwrap();
                    }
                });
            }
        });
        let on_disk: u64 = fs::read_dir(dir.path().join("blocks"))
            .unwrap()
            .flat_map(|shard| fs::read_dir(shard.unwrap().path()).unwrap())
            .map(|f| f.unwrap().metadata().unwrap().len())
            .sum();
        let stats = store.stats();
        assert_eq!(stats.bytes, on_disk);
        assert!(on_disk <= 4096);
        assert_eq!(stats.reserved_bytes, 0);
    }

    #[test]
    fn reopening_keeps_blocks_and_clears_unfinished_writes() {
        let dir = tempfile::tempdir().unwrap();
        let block = raw(b"kept");
        {
            let store = Blockstore::open(dir.path(), 1 << 20).unwrap();
            store.put(&block).unwrap();
            fs::write(dir.path().join("tmp").join("half"), b"half a blo").unwrap();
        }
        let store = Blockstore::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(store.stats().blocks, 1);
        assert_eq!(store.get(block.cid()).unwrap(), Some(block));
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn what_goes_in_comes_out(blobs in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..512), 1..20)) {
            let dir = tempfile::tempdir().unwrap();
            let store = Blockstore::open(dir.path(), 1 << 20).unwrap();
            let blocks: Vec<Block> = blobs.iter().map(|b| raw(b)).collect();
            for b in &blocks { store.put(b).unwrap(); }
            for b in &blocks { let got = store.get(b.cid()).unwrap(); prop_assert_eq!(got.as_ref(), Some(b)); }
            let distinct: std::collections::HashSet<_> = blocks.iter().map(|b| *b.cid()).collect();
            prop_assert_eq!(store.stats().blocks as usize, distinct.len());
        }
    }
}
