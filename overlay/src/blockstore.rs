//! The on-disk blockstore: one file per block, named by its multihash.
//!
//! Layout: `<root>/blocks/<2 hex digits>/<hex multihash>` plus `<root>/tmp/` for writes in
//! progress. A write goes to a fresh temporary file that is then renamed to its final
//! name, so a crash never leaves a partial block under a valid name; writers of the same
//! block are serialised by a striped lock, so a block is never counted twice. (Renaming
//! rather than linking and unlinking matters: ext4 slows inode allocation down while many
//! inodes were recently deleted.) Every read is verified against the CID; a block
//! that fails (a disk fault, a power cut before the kernel flushed it) is deleted and
//! reported missing, so it is fetched again rather than served. Blocks are keyed by
//! multihash, so a CIDv0 and a CIDv1 of the same bytes share one file, as in IPFS. Blocks
//! of identity CIDs (data inlined in the CID) are always "held" and never written.

use crate::block::{Block, BlockError};
use bytes::Bytes;
use cid::Cid;
use multihash::Multihash;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

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
    /// Storing the block would exceed the configured capacity.
    #[error("blockstore full: {used} of {capacity} bytes used, block needs {needed}")]
    Full {
        /// Bytes in use.
        used: u64,
        /// The configured capacity.
        capacity: u64,
        /// Size of the refused block.
        needed: u64,
    },
    /// A block was invalid.
    #[error(transparent)]
    Block(#[from] BlockError),
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
    capacity: u64,
    blocks: AtomicU64,
    bytes: AtomicU64,
    /// Serialises writers of the same block (striped by the digest's first byte).
    write_locks: Vec<Mutex<()>>,
}

/// Number of write-lock stripes.
const WRITE_STRIPES: usize = 64;

/// Counts of what the store holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoreStats {
    /// Number of blocks held.
    pub blocks: u64,
    /// Total size of the blocks held, in bytes.
    pub bytes: u64,
    /// The configured capacity in bytes.
    pub capacity: u64,
}

impl Blockstore {
    /// Opens (creating if needed) the store under `root`, holding at most `capacity` bytes.
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
        let (mut blocks, mut bytes) = (0, 0);
        for shard in fs::read_dir(&blocks_dir).map_err(io_err(&blocks_dir))? {
            let shard = shard.map_err(io_err(&blocks_dir))?.path();
            for file in fs::read_dir(&shard).map_err(io_err(&shard))? {
                let meta = file.and_then(|f| f.metadata()).map_err(io_err(&shard))?;
                blocks += 1;
                bytes += meta.len();
            }
        }
        Ok(Blockstore {
            inner: Arc::new(Inner {
                blocks_dir,
                tmp_dir,
                capacity,
                blocks: AtomicU64::new(blocks),
                bytes: AtomicU64::new(bytes),
                write_locks: (0..WRITE_STRIPES).map(|_| Mutex::new(())).collect(),
            }),
        })
    }

    fn path_of(&self, cid: &Cid) -> PathBuf {
        let name = hex(&cid.hash().to_bytes());
        // Shard on the first digest byte (after the 2-byte multihash header).
        let shard = format!("{:02x}", cid.hash().digest().first().copied().unwrap_or(0));
        self.inner.blocks_dir.join(shard).join(name)
    }

    /// Whether the store holds a block with this CID's multihash.
    pub fn has(&self, cid: &Cid) -> bool {
        Block::inlined(cid).is_some() || self.path_of(cid).exists()
    }

    /// Stores a verified block. Storing a block that is already there is a no-op, and so is
    /// storing a block an identity CID carries inline.
    pub fn put(&self, block: &Block) -> Result<(), StoreError> {
        if Block::inlined(block.cid()).is_some() {
            return Ok(());
        }
        let path = self.path_of(block.cid());
        let stripe = stripe_of(block.cid());
        let _writing = self.inner.write_locks[stripe]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let size = block.data().len() as u64;
        let mut replacing = None;
        match fs::metadata(&path) {
            // Same name and size: the block is already here (reads still verify it).
            Ok(meta) if meta.len() == size => return Ok(()),
            // A damaged copy (cut short by a crash, say): write the block over it.
            Ok(meta) => replacing = Some(meta.len()),
            Err(_) => {}
        }
        let used = self.inner.bytes.load(Ordering::Relaxed);
        if used + size > self.inner.capacity {
            return Err(StoreError::Full {
                used,
                capacity: self.inner.capacity,
                needed: size,
            });
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
            return Err(StoreError::Io { path, source });
        }
        match replacing {
            Some(old_size) => {
                self.inner.bytes.fetch_sub(old_size, Ordering::Relaxed);
            }
            None => {
                self.inner.blocks.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.inner.bytes.fetch_add(size, Ordering::Relaxed);
        Ok(())
    }

    /// Reads and verifies a block; `Ok(None)` if it is absent (or was found corrupt and
    /// has been removed).
    pub fn get(&self, cid: &Cid) -> Result<Option<Block>, StoreError> {
        if let Some(block) = Block::inlined(cid) {
            return Ok(Some(block));
        }
        let path = self.path_of(cid);
        let data = match fs::read(&path) {
            Ok(data) => Bytes::from(data),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::Io { path, source: e }),
        };
        match Block::verified(*cid, data) {
            Ok(block) => Ok(Some(block)),
            Err(BlockError::HashMismatch(_)) => {
                tracing::warn!(%cid, "removing corrupt block from the store");
                self.remove(cid)?;
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Removes a block if present.
    pub fn remove(&self, cid: &Cid) -> Result<(), StoreError> {
        let path = self.path_of(cid);
        let _writing = self.inner.write_locks[stripe_of(cid)]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let size = match fs::metadata(&path) {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(StoreError::Io { path, source: e }),
        };
        match fs::remove_file(&path) {
            Ok(()) => {
                self.inner.blocks.fetch_sub(1, Ordering::Relaxed);
                self.inner.bytes.fetch_sub(size, Ordering::Relaxed);
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::Io { path, source: e }),
        }
    }

    /// Counts of what the store holds.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            blocks: self.inner.blocks.load(Ordering::Relaxed),
            bytes: self.inner.bytes.load(Ordering::Relaxed),
            capacity: self.inner.capacity,
        }
    }

    /// The multihashes of every block held (for re-announcing them at start).
    pub fn list(&self) -> Result<Vec<Multihash<64>>, StoreError> {
        let dir = &self.inner.blocks_dir;
        let mut out = Vec::new();
        for shard in fs::read_dir(dir).map_err(io_err(dir))? {
            let shard = shard.map_err(io_err(dir))?.path();
            for file in fs::read_dir(&shard).map_err(io_err(&shard))? {
                let name = file.map_err(io_err(&shard))?.file_name();
                if let Some(hash) = name
                    .to_str()
                    .and_then(unhex)
                    .and_then(|b| Multihash::from_bytes(&b).ok())
                {
                    out.push(hash);
                }
            }
        }
        Ok(out)
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

fn stripe_of(cid: &Cid) -> usize {
    cid.hash().digest().first().copied().unwrap_or(0) as usize % WRITE_STRIPES
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
            Multihash::wrap(crate::block::IDENTITY, b"tiny").unwrap(),
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
    fn a_damaged_copy_is_replaced_when_the_block_is_put_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = Blockstore::open(dir.path(), 1 << 20).unwrap();
        let block = raw(b"a block cut short by a crash");
        store.put(&block).unwrap();
        fs::write(store.path_of(block.cid()), b"a block cut").unwrap();
        store.put(&block).unwrap();
        assert_eq!(store.get(block.cid()).unwrap(), Some(block.clone()));
        assert_eq!(store.stats().blocks, 1);
    }

    #[test]
    fn capacity_is_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let store = Blockstore::open(dir.path(), 10).unwrap();
        store.put(&raw(b"12345")).unwrap();
        assert!(matches!(
            store.put(&raw(b"abcdefgh")),
            Err(StoreError::Full { .. })
        ));
        assert_eq!(store.stats().blocks, 1);
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
