//! UnixFS files: chunking a byte stream into a DAG of blocks, and reading one back.
//!
//! We lay files out as kubo does with `--cid-version 1 --raw-leaves`: 256 KiB `raw`
//! leaves under a balanced tree of `dag-pb` nodes with at most 174 links each; a file that
//! fits in one chunk is a single `raw` block. dag-pb nodes are written in the canonical
//! order (links before data), so our CIDs match other IPFS implementations' for the same
//! layout. The reader accepts any UnixFS file DAG (raw or dag-pb leaves).

use crate::block::{Block, BlockError, DAG_PB, RAW};
use crate::dagpb;
use bytes::{Bytes, BytesMut};
use cid::Cid;
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint};

/// The default chunk size: 256 KiB.
pub const CHUNK_SIZE: usize = 256 * 1024;
/// The most links a dag-pb node of ours holds (kubo's default).
pub const MAX_LINKS: usize = 174;

/// Errors of decoding UnixFS DAGs.
#[derive(Debug, thiserror::Error)]
pub enum UnixfsError {
    /// The dag-pb bytes are not a valid protobuf node.
    #[error("malformed dag-pb node {cid}: {reason}")]
    Malformed {
        /// The node's CID.
        cid: Cid,
        /// What was wrong.
        reason: String,
    },
    /// The DAG is not a UnixFS file (a directory, say).
    #[error("{cid} is not a UnixFS file (type {kind})")]
    NotAFile {
        /// The node's CID.
        cid: Cid,
        /// The UnixFS type found.
        kind: i32,
    },
    /// A CID with a codec we cannot read.
    #[error("{cid} has codec 0x{codec:x}, which is neither raw nor dag-pb")]
    UnsupportedCodec {
        /// The CID.
        cid: Cid,
        /// Its codec.
        codec: u64,
    },
    /// A block could not be made.
    #[error(transparent)]
    Block(#[from] BlockError),
}

/// The protobuf `PBLink` of dag-pb.
#[derive(Clone, PartialEq, Message)]
struct PbLink {
    #[prost(bytes = "vec", optional, tag = "1")]
    hash: Option<Vec<u8>>,
    #[prost(string, optional, tag = "2")]
    name: Option<String>,
    #[prost(uint64, optional, tag = "3")]
    tsize: Option<u64>,
}

/// UnixFS node types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
enum DataType {
    Raw = 0,
    Directory = 1,
    File = 2,
}

/// The UnixFS `Data` message carried in a dag-pb node's data field.
#[derive(Clone, PartialEq, Message)]
struct UnixfsData {
    #[prost(enumeration = "DataType", required, tag = "1")]
    kind: i32,
    #[prost(bytes = "vec", optional, tag = "2")]
    data: Option<Vec<u8>>,
    #[prost(uint64, optional, tag = "3")]
    filesize: Option<u64>,
    #[prost(uint64, repeated, packed = "false", tag = "4")]
    blocksizes: Vec<u64>,
}

/// One child of a node under construction.
#[derive(Debug, Clone, Copy)]
struct Child {
    cid: Cid,
    /// Bytes of file content under this child.
    filesize: u64,
    /// Bytes of all blocks of the child's subtree (dag-pb `Tsize`).
    tsize: u64,
}

fn encode_node(children: &[Child]) -> Bytes {
    let data = UnixfsData {
        kind: DataType::File as i32,
        data: None,
        filesize: Some(children.iter().map(|c| c.filesize).sum()),
        blocksizes: children.iter().map(|c| c.filesize).collect(),
    }
    .encode_to_vec();
    let mut buf = BytesMut::with_capacity(children.len() * 48 + data.len() + 8);
    for child in children {
        let link = PbLink {
            hash: Some(child.cid.to_bytes()),
            name: Some(String::new()),
            tsize: Some(child.tsize),
        };
        encode_key(2, WireType::LengthDelimited, &mut buf);
        encode_varint(link.encoded_len() as u64, &mut buf);
        link.encode_raw(&mut buf);
    }
    prost::encoding::bytes::encode(1, &data, &mut buf);
    buf.freeze()
}

/// Builds a UnixFS file DAG from chunks, emitting blocks as soon as they are complete, in
/// memory bounded by the tree's depth × [`MAX_LINKS`].
#[derive(Debug, Default)]
pub struct FileBuilder {
    /// `levels[0]` holds leaves not yet under a node, `levels[1]` nodes of leaves, ...
    levels: Vec<Vec<Child>>,
}

impl FileBuilder {
    /// A builder for a new file.
    pub fn new() -> FileBuilder {
        FileBuilder::default()
    }

    /// Adds the next chunk of the file; returns the blocks completed by it (the leaf first).
    pub fn push_chunk(&mut self, chunk: Bytes) -> Result<Vec<Block>, UnixfsError> {
        let len = chunk.len() as u64;
        let leaf = Block::encode(RAW, chunk)?;
        let child = Child {
            cid: *leaf.cid(),
            filesize: len,
            tsize: len,
        };
        let mut out = vec![leaf];
        self.push(0, child, &mut out)?;
        Ok(out)
    }

    fn push(
        &mut self,
        level: usize,
        child: Child,
        out: &mut Vec<Block>,
    ) -> Result<(), UnixfsError> {
        if self.levels.len() <= level {
            self.levels.push(Vec::with_capacity(MAX_LINKS));
        }
        self.levels[level].push(child);
        if self.levels[level].len() == MAX_LINKS {
            let children = std::mem::take(&mut self.levels[level]);
            let parent = make_node(&children, out)?;
            self.push(level + 1, parent, out)?;
        }
        Ok(())
    }

    /// Completes the file; returns the remaining blocks, the root last, and the root CID.
    pub fn finish(mut self) -> Result<(Vec<Block>, Cid), UnixfsError> {
        let mut out = Vec::new();
        if self.levels.is_empty() {
            self.levels.push(Vec::new());
        }
        let mut level = 0;
        loop {
            let higher_levels_empty = self.levels[level + 1..].iter().all(Vec::is_empty);
            let here = std::mem::take(&mut self.levels[level]);
            if higher_levels_empty && here.len() <= 1 {
                let root = match here.first() {
                    Some(child) => child.cid,
                    None => {
                        // An empty file: one empty raw block, as kubo makes.
                        let empty = Block::encode(RAW, Bytes::new())?;
                        let cid = *empty.cid();
                        out.push(empty);
                        cid
                    }
                };
                return Ok((out, root));
            }
            if !here.is_empty() {
                let parent = make_node(&here, &mut out)?;
                if self.levels.len() <= level + 1 {
                    self.levels.push(Vec::new());
                }
                self.levels[level + 1].push(parent);
            }
            level += 1;
        }
    }
}

fn make_node(children: &[Child], out: &mut Vec<Block>) -> Result<Child, UnixfsError> {
    let bytes = encode_node(children);
    let size = bytes.len() as u64;
    let block = Block::encode(DAG_PB, bytes)?;
    let child = Child {
        cid: *block.cid(),
        filesize: children.iter().map(|c| c.filesize).sum(),
        tsize: size + children.iter().map(|c| c.tsize).sum::<u64>(),
    };
    out.push(block);
    Ok(child)
}

/// What a block of a file DAG contributes: its own bytes of content, then its children.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileNode {
    /// Content held in this block itself (comes before the children's content).
    pub data: Bytes,
    /// Children, in file order.
    pub links: Vec<Cid>,
    /// The size of the file under this block, as it declares it (a raw block's length).
    pub filesize: Option<u64>,
}

/// Decodes one block of a UnixFS file DAG (dag-pb by [`crate::dagpb`], which counts
/// links before it allocates).
pub fn decode_file_node(block: &Block) -> Result<FileNode, UnixfsError> {
    let cid = *block.cid();
    match cid.codec() {
        RAW => Ok(FileNode {
            data: block.data().clone(),
            links: Vec::new(),
            filesize: Some(block.data().len() as u64),
        }),
        DAG_PB => {
            let malformed = |e: dagpb::DagPbError| UnixfsError::Malformed {
                cid,
                reason: e.to_string(),
            };
            let node = dagpb::decode(block.data()).map_err(malformed)?;
            let data = node.data.ok_or_else(|| UnixfsError::Malformed {
                cid,
                reason: "node without data".into(),
            })?;
            let unixfs = dagpb::decode_unixfs(&data).map_err(malformed)?;
            if unixfs.kind != DataType::File as i32 && unixfs.kind != DataType::Raw as i32 {
                return Err(UnixfsError::NotAFile {
                    cid,
                    kind: unixfs.kind,
                });
            }
            Ok(FileNode {
                data: unixfs.data,
                links: node.links,
                filesize: unixfs.filesize,
            })
        }
        codec => Err(UnixfsError::UnsupportedCodec { cid, codec }),
    }
}

/// The CIDs a block links to, whatever the block is (none for raw blocks and for blocks
/// that are not dag-pb).
pub fn links_of(block: &Block) -> Result<Vec<Cid>, UnixfsError> {
    if block.cid().codec() != DAG_PB {
        return Ok(Vec::new());
    }
    let cid = *block.cid();
    dagpb::decode(block.data())
        .map(|node| node.links)
        .map_err(|e| UnixfsError::Malformed {
            cid,
            reason: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    /// Builds a file from `data` in chunks of `chunk` bytes; returns all blocks and the root.
    fn build(data: &[u8], chunk: usize) -> (HashMap<Cid, Block>, Cid) {
        let mut builder = FileBuilder::new();
        let mut blocks = HashMap::new();
        for piece in data.chunks(chunk) {
            for b in builder.push_chunk(Bytes::copy_from_slice(piece)).unwrap() {
                blocks.insert(*b.cid(), b);
            }
        }
        let (rest, root) = builder.finish().unwrap();
        for b in rest {
            blocks.insert(*b.cid(), b);
        }
        (blocks, root)
    }

    /// Reads a file back, depth first, without recursion.
    fn read(blocks: &HashMap<Cid, Block>, root: Cid) -> Vec<u8> {
        let mut out = Vec::new();
        let mut stack = vec![root];
        while let Some(cid) = stack.pop() {
            let node = decode_file_node(&blocks[&cid]).unwrap();
            out.extend_from_slice(&node.data);
            stack.extend(node.links.iter().rev());
        }
        out
    }

    #[test]
    fn small_file_is_one_raw_block() {
        let (blocks, root) = build(b"hello world", CHUNK_SIZE);
        assert_eq!(blocks.len(), 1);
        assert_eq!(root.codec(), RAW);
        assert_eq!(
            root.to_string(),
            "bafkreifzjut3te2nhyekklss27nh3k72ysco7y32koao5eei66wof36n5e"
        );
    }

    #[test]
    fn empty_file_is_the_empty_raw_block() {
        let (_, root) = build(b"", CHUNK_SIZE);
        assert_eq!(
            root.to_string(),
            "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
        );
    }

    #[test]
    fn two_chunk_file_has_a_dag_pb_root() {
        let (blocks, root) = build(&vec![0u8; CHUNK_SIZE + 1], CHUNK_SIZE);
        assert_eq!(blocks.len(), 3);
        assert_eq!(root.codec(), DAG_PB);
        assert_eq!(read(&blocks, root).len(), CHUNK_SIZE + 1);
    }

    #[test]
    fn wide_files_grow_a_balanced_tree() {
        // 175 leaves need a second level: root -> [node(174 leaves), node(1 leaf)].
        let data: Vec<u8> = (0..175u32 * 4)
            .flat_map(|i| (i as u8).to_le_bytes())
            .collect();
        let (blocks, root) = build(&data, 4);
        let top = decode_file_node(&blocks[&root]).unwrap();
        assert_eq!(top.links.len(), 2);
        let first = decode_file_node(&blocks[&top.links[0]]).unwrap();
        assert_eq!(first.links.len(), MAX_LINKS);
        assert_eq!(read(&blocks, root), data);
    }

    #[test]
    fn malformed_nodes_are_errors() {
        let junk = Block::encode(DAG_PB, Bytes::from_static(b"\xff\xff\xff")).unwrap();
        assert!(matches!(
            decode_file_node(&junk),
            Err(UnixfsError::Malformed { .. })
        ));
        assert!(links_of(&junk).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn chunked_files_read_back_identically(data in prop::collection::vec(any::<u8>(), 0..4000), chunk in 1usize..64) {
            let (blocks, root) = build(&data, chunk);
            prop_assert_eq!(read(&blocks, root), data.clone());
            // Every node's links resolve, and every block is reachable from the root.
            let mut seen = std::collections::HashSet::new();
            let mut stack = vec![root];
            while let Some(cid) = stack.pop() {
                prop_assert!(seen.insert(cid) || blocks[&cid].data().len() <= chunk);
                stack.extend(links_of(&blocks[&cid]).unwrap());
            }
            prop_assert!(blocks.keys().all(|c| seen.contains(c)));
        }
    }
}
