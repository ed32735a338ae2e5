//! Content-addressed blocks: a CID and the bytes it names, verified to match.
//!
//! Flotilla produces CIDv1 blocks hashed with sha2-256, with codec `raw` (file chunks) or
//! `dag-pb` (UnixFS nodes), so IPFS implementations can read them. Every block is checked
//! against its CID before it is stored or used.

use bytes::Bytes;
use cid::Cid;
use multihash::Multihash;
use sha2::{Digest, Sha256};

/// Multicodec of raw binary blocks.
pub const RAW: u64 = 0x55;
/// Multicodec of dag-pb (UnixFS) blocks.
pub const DAG_PB: u64 = 0x70;
/// Multihash code of sha2-256.
pub const SHA2_256: u64 = 0x12;
/// Multihash code of the identity "hash": the data itself, inlined in the CID.
pub const IDENTITY: u64 = 0x00;
/// The largest block we accept from anyone (the IPFS convention).
pub const MAX_BLOCK_SIZE: usize = 2 * 1024 * 1024;

/// Why a block was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlockError {
    /// The bytes do not hash to the CID.
    #[error("block bytes do not match CID {0}")]
    HashMismatch(Cid),
    /// The CID uses a hash function we do not verify.
    #[error("CID {0} uses an unsupported hash function (only sha2-256)")]
    UnsupportedHash(Cid),
    /// The block is larger than [`MAX_BLOCK_SIZE`].
    #[error("block of {size} bytes is larger than the {MAX_BLOCK_SIZE}-byte limit")]
    TooLarge {
        /// The size of the refused block.
        size: usize,
    },
}

/// A block whose bytes have been verified against its CID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    cid: Cid,
    data: Bytes,
}

impl Block {
    /// Makes a CIDv1 sha2-256 block of the given codec from the bytes.
    pub fn encode(codec: u64, data: Bytes) -> Result<Block, BlockError> {
        if data.len() > MAX_BLOCK_SIZE {
            return Err(BlockError::TooLarge { size: data.len() });
        }
        let cid = Cid::new_v1(codec, sha256_multihash(&data));
        Ok(Block { cid, data })
    }

    /// Checks that `data` is what `cid` names, and wraps them as a block.
    pub fn verified(cid: Cid, data: Bytes) -> Result<Block, BlockError> {
        if data.len() > MAX_BLOCK_SIZE {
            return Err(BlockError::TooLarge { size: data.len() });
        }
        if cid.hash().code() == IDENTITY {
            if cid.hash().digest() != data.as_ref() {
                return Err(BlockError::HashMismatch(cid));
            }
            return Ok(Block { cid, data });
        }
        if cid.hash().code() != SHA2_256 || cid.hash().size() != 32 {
            return Err(BlockError::UnsupportedHash(cid));
        }
        if cid.hash().digest() != Sha256::digest(&data).as_slice() {
            return Err(BlockError::HashMismatch(cid));
        }
        Ok(Block { cid, data })
    }

    /// The block an identity CID names: its data is inlined in the CID itself (as
    /// `ipfs add --inline` makes), so it never needs fetching. `None` for other CIDs.
    pub fn inlined(cid: &Cid) -> Option<Block> {
        (cid.hash().code() == IDENTITY).then(|| Block {
            cid: *cid,
            data: Bytes::copy_from_slice(cid.hash().digest()),
        })
    }

    /// Wraps bytes whose CID was computed from their hash by the caller (the bitswap
    /// decoder), so hashing them again would be wasted work.
    pub(crate) fn from_hashed(cid: Cid, data: Bytes) -> Block {
        Block { cid, data }
    }

    /// The block's CID.
    pub fn cid(&self) -> &Cid {
        &self.cid
    }

    /// The block's bytes.
    pub fn data(&self) -> &Bytes {
        &self.data
    }

    /// Splits the block into its CID and bytes.
    pub fn into_parts(self) -> (Cid, Bytes) {
        (self.cid, self.data)
    }
}

fn sha256_multihash(data: &[u8]) -> Multihash<64> {
    Multihash::wrap(SHA2_256, &Sha256::digest(data)).expect("a 32-byte digest fits")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_cid_of_hello_world() {
        // `ipfs add --cid-version 1 --raw-leaves` of "hello world\n"... and of "hello world":
        let block = Block::encode(RAW, Bytes::from_static(b"hello world")).unwrap();
        assert_eq!(
            block.cid().to_string(),
            "bafkreifzjut3te2nhyekklss27nh3k72ysco7y32koao5eei66wof36n5e"
        );
    }

    #[test]
    fn cidv0_blocks_verify() {
        let v1 = Block::encode(DAG_PB, Bytes::from_static(b"\x0a\x02\x08\x01")).unwrap();
        let v0 = Cid::new_v0(*v1.cid().hash()).unwrap();
        assert!(Block::verified(v0, v1.data().clone()).is_ok());
    }

    #[test]
    fn identity_cids_carry_their_block() {
        let cid = Cid::new_v1(RAW, Multihash::wrap(IDENTITY, b"inline").unwrap());
        let block = Block::inlined(&cid).unwrap();
        assert_eq!(block.data(), &Bytes::from_static(b"inline"));
        assert!(Block::verified(cid, Bytes::from_static(b"inline")).is_ok());
        assert!(Block::verified(cid, Bytes::from_static(b"other")).is_err());
        let sha = Block::encode(RAW, Bytes::from_static(b"x")).unwrap();
        assert!(Block::inlined(sha.cid()).is_none());
    }

    #[test]
    fn oversize_and_foreign_hashes_are_refused() {
        let big = Bytes::from(vec![0u8; MAX_BLOCK_SIZE + 1]);
        assert_eq!(
            Block::encode(RAW, big).unwrap_err(),
            BlockError::TooLarge {
                size: MAX_BLOCK_SIZE + 1
            }
        );
        let blake3 = Cid::new_v1(RAW, Multihash::wrap(0x1e, &[0u8; 32]).unwrap());
        assert_eq!(
            Block::verified(blake3, Bytes::from_static(b"abc")).unwrap_err(),
            BlockError::UnsupportedHash(blake3)
        );
    }

    proptest! {
        #[test]
        fn cids_round_trip_and_tampering_is_caught(data: Vec<u8>, flip in any::<prop::sample::Index>()) {
            let block = Block::encode(RAW, Bytes::from(data.clone())).unwrap();
            let parsed = Cid::try_from(block.cid().to_string().as_str()).unwrap();
            prop_assert_eq!(&parsed, block.cid());
            prop_assert_eq!(Cid::try_from(block.cid().to_bytes()).unwrap(), parsed);
            prop_assert!(Block::verified(parsed, Bytes::from(data.clone())).is_ok());
            if !data.is_empty() {
                let mut bad = data;
                let i = flip.index(bad.len());
                bad[i] ^= 1;
                prop_assert_eq!(Block::verified(parsed, Bytes::from(bad)).unwrap_err(), BlockError::HashMismatch(parsed));
            }
        }
    }
}
