//! The bitswap 1.2.0 message: its protobuf form and our checked, typed form.
//!
//! The wire schema is the one in ipfs/specs (`BITSWAP.md`): a wantlist of entries
//! (want-block / want-have / cancel, each with `sendDontHave`), blocks as a CID prefix plus
//! data (1.1.0+; the 1.0.0 `blocks` field is read too), block presences (have / dont-have)
//! and `pendingBytes`. Received blocks get their CID from the prefix and the hash of their
//! bytes, so a block can never arrive under a CID its bytes do not match.

use bytes::Bytes;
use cid::{Cid, Version};
use multihash::Multihash;
use prost::Message as _;
use sha2::{Digest, Sha256};

use crate::block::{DAG_PB, MAX_BLOCK_SIZE, SHA2_256};

/// Errors of decoding a bitswap message.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    /// The bytes are not a valid protobuf message.
    #[error("malformed bitswap message: {0}")]
    Protobuf(#[from] prost::DecodeError),
    /// A CID or CID prefix in the message is invalid.
    #[error("malformed CID in bitswap message: {0}")]
    Cid(String),
}

/// Whether a want asks for the block or only whether the peer has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WantType {
    /// Send the block itself.
    Block,
    /// Say whether you have the block.
    Have,
}

/// One entry of a wantlist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantEntry {
    /// The CID wanted (or cancelled).
    pub cid: Cid,
    /// Higher is more urgent.
    pub priority: i32,
    /// This entry withdraws an earlier want for `cid`.
    pub cancel: bool,
    /// Block or have.
    pub want_type: WantType,
    /// Ask for an explicit DONT_HAVE when the peer lacks the block.
    pub send_dont_have: bool,
}

impl WantEntry {
    /// A want for the block itself, asking for DONT_HAVE if absent.
    pub fn block(cid: Cid) -> WantEntry {
        WantEntry {
            cid,
            priority: 1,
            cancel: false,
            want_type: WantType::Block,
            send_dont_have: true,
        }
    }

    /// A want for a HAVE/DONT_HAVE answer.
    pub fn have(cid: Cid) -> WantEntry {
        WantEntry {
            cid,
            priority: 1,
            cancel: false,
            want_type: WantType::Have,
            send_dont_have: true,
        }
    }

    /// A cancel of any earlier want for `cid`.
    pub fn cancel(cid: Cid) -> WantEntry {
        WantEntry {
            cid,
            priority: 0,
            cancel: true,
            want_type: WantType::Block,
            send_dont_have: false,
        }
    }
}

/// A block presence: whether the sender has a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// The sender has the block.
    Have,
    /// The sender does not have the block.
    DontHave,
}

/// A block as received: its CID computed from the prefix and the data's hash. Blocks whose
/// hash function we do not support are dropped at decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedBlock {
    /// The CID of `data`.
    pub cid: Cid,
    /// The block's bytes.
    pub data: Bytes,
}

/// A bitswap message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    /// Wantlist entries.
    pub wants: Vec<WantEntry>,
    /// Whether `wants` replaces the sender's whole earlier wantlist.
    pub full: bool,
    /// Blocks sent.
    pub blocks: Vec<ReceivedBlock>,
    /// Block presences sent.
    pub presences: Vec<(Cid, Presence)>,
    /// Bytes the sender still has queued for the receiver.
    pub pending_bytes: i32,
}

impl Message {
    /// A message withdrawing our want for `cid`.
    pub fn cancel(cid: Cid) -> Message {
        Message {
            wants: vec![WantEntry::cancel(cid)],
            ..Message::default()
        }
    }

    /// Whether the message carries nothing.
    pub fn is_empty(&self) -> bool {
        self.wants.is_empty() && self.blocks.is_empty() && self.presences.is_empty()
    }

    /// An upper bound on this message's encoded size.
    pub fn size_estimate(&self) -> usize {
        16 + self.wants.len() * 64
            + self.presences.len() * 48
            + self.blocks.iter().map(|b| b.data.len() + 32).sum::<usize>()
    }

    /// Encodes the message as protobuf (without the length prefix).
    pub fn encode(&self) -> Vec<u8> {
        let wantlist = (!self.wants.is_empty() || self.full).then(|| pb::Wantlist {
            entries: self
                .wants
                .iter()
                .map(|w| pb::Entry {
                    block: w.cid.to_bytes(),
                    priority: w.priority,
                    cancel: w.cancel,
                    want_type: match w.want_type {
                        WantType::Block => pb::WantType::Block as i32,
                        WantType::Have => pb::WantType::Have as i32,
                    },
                    send_dont_have: w.send_dont_have,
                })
                .collect(),
            full: self.full,
        });
        pb::Message {
            wantlist,
            blocks: Vec::new(),
            payload: self
                .blocks
                .iter()
                .map(|b| pb::Block {
                    prefix: cid_prefix(&b.cid),
                    data: b.data.clone(),
                })
                .collect(),
            block_presences: self
                .presences
                .iter()
                .map(|(cid, p)| pb::BlockPresence {
                    cid: cid.to_bytes(),
                    r#type: match p {
                        Presence::Have => pb::PresenceType::Have as i32,
                        Presence::DontHave => pb::PresenceType::DontHave as i32,
                    },
                })
                .collect(),
            pending_bytes: self.pending_bytes,
        }
        .encode_to_vec()
    }

    /// Decodes a protobuf message, keeping at most `max_entries` wantlist entries (as
    /// boxo does: a peer's wantlist beyond our limit is cut, not refused).
    pub fn decode(bytes: Bytes, max_entries: usize) -> Result<Message, MessageError> {
        let pb = pb::Message::decode(bytes)?;
        let (mut entries, full) = pb.wantlist.map(|w| (w.entries, w.full)).unwrap_or_default();
        entries.truncate(max_entries);
        let wants = entries
            .into_iter()
            .map(|e| {
                Ok(WantEntry {
                    cid: parse_cid(&e.block)?,
                    priority: e.priority,
                    cancel: e.cancel,
                    want_type: if e.want_type == pb::WantType::Have as i32 {
                        WantType::Have
                    } else {
                        WantType::Block
                    },
                    send_dont_have: e.send_dont_have,
                })
            })
            .collect::<Result<Vec<_>, MessageError>>()?;
        let mut blocks = Vec::with_capacity(pb.payload.len() + pb.blocks.len());
        for block in pb.payload {
            if let Some(cid) = cid_of(&block.prefix, &block.data)? {
                blocks.push(ReceivedBlock {
                    cid,
                    data: block.data,
                });
            }
        }
        for data in pb.blocks {
            // Bitswap 1.0.0 blocks are CIDv0: dag-pb, sha2-256.
            let hash = Multihash::wrap(SHA2_256, &Sha256::digest(&data)).expect("32 bytes fit");
            let cid = Cid::new_v0(hash).map_err(|e| MessageError::Cid(e.to_string()))?;
            blocks.push(ReceivedBlock { cid, data });
        }
        let presences = pb
            .block_presences
            .into_iter()
            .map(|p| {
                let presence = if p.r#type == pb::PresenceType::DontHave as i32 {
                    Presence::DontHave
                } else {
                    Presence::Have
                };
                Ok((parse_cid(&p.cid)?, presence))
            })
            .collect::<Result<Vec<_>, MessageError>>()?;
        Ok(Message {
            wants,
            full,
            blocks,
            presences,
            pending_bytes: pb.pending_bytes,
        })
    }
}

fn parse_cid(bytes: &[u8]) -> Result<Cid, MessageError> {
    Cid::try_from(bytes).map_err(|e| MessageError::Cid(e.to_string()))
}

/// The CID prefix of bitswap 1.1.0+: version, codec, multihash code, digest length.
fn cid_prefix(cid: &Cid) -> Vec<u8> {
    let mut out = Vec::with_capacity(8);
    let mut buf = unsigned_varint::encode::u64_buffer();
    let version: u64 = match cid.version() {
        Version::V0 => 0,
        Version::V1 => 1,
    };
    for n in [
        version,
        cid.codec(),
        cid.hash().code(),
        u64::from(cid.hash().size()),
    ] {
        out.extend_from_slice(unsigned_varint::encode::u64(n, &mut buf));
    }
    out
}

/// The CID of a received block, from its prefix and bytes; `None` if the block is over
/// the size limit or its hash function is one we do not support.
fn cid_of(prefix: &[u8], data: &[u8]) -> Result<Option<Cid>, MessageError> {
    let bad = |e: unsigned_varint::decode::Error| MessageError::Cid(format!("bad CID prefix: {e}"));
    let (version, rest) = unsigned_varint::decode::u64(prefix).map_err(bad)?;
    let (codec, rest) = unsigned_varint::decode::u64(rest).map_err(bad)?;
    let (code, rest) = unsigned_varint::decode::u64(rest).map_err(bad)?;
    let (_len, _) = unsigned_varint::decode::u64(rest).map_err(bad)?;
    if code != SHA2_256 || data.len() > MAX_BLOCK_SIZE {
        return Ok(None);
    }
    let hash = Multihash::wrap(SHA2_256, &Sha256::digest(data)).expect("32 bytes fit");
    let cid = match version {
        0 if codec == DAG_PB => Cid::new_v0(hash).map_err(|e| MessageError::Cid(e.to_string()))?,
        1 => Cid::new_v1(codec, hash),
        v => return Err(MessageError::Cid(format!("unknown CID version {v}"))),
    };
    Ok(Some(cid))
}

/// The protobuf schema of `/ipfs/bitswap/1.2.0`.
mod pb {
    use bytes::Bytes;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Message {
        #[prost(message, optional, tag = "1")]
        pub wantlist: Option<Wantlist>,
        #[prost(bytes = "bytes", repeated, tag = "2")]
        pub blocks: Vec<Bytes>,
        #[prost(message, repeated, tag = "3")]
        pub payload: Vec<Block>,
        #[prost(message, repeated, tag = "4")]
        pub block_presences: Vec<BlockPresence>,
        #[prost(int32, tag = "5")]
        pub pending_bytes: i32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Wantlist {
        #[prost(message, repeated, tag = "1")]
        pub entries: Vec<Entry>,
        #[prost(bool, tag = "2")]
        pub full: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Entry {
        #[prost(bytes = "vec", tag = "1")]
        pub block: Vec<u8>,
        #[prost(int32, tag = "2")]
        pub priority: i32,
        #[prost(bool, tag = "3")]
        pub cancel: bool,
        #[prost(enumeration = "WantType", tag = "4")]
        pub want_type: i32,
        #[prost(bool, tag = "5")]
        pub send_dont_have: bool,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
    #[repr(i32)]
    pub enum WantType {
        Block = 0,
        Have = 1,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Block {
        #[prost(bytes = "vec", tag = "1")]
        pub prefix: Vec<u8>,
        #[prost(bytes = "bytes", tag = "2")]
        pub data: Bytes,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
    #[repr(i32)]
    pub enum PresenceType {
        Have = 0,
        DontHave = 1,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct BlockPresence {
        #[prost(bytes = "vec", tag = "1")]
        pub cid: Vec<u8>,
        #[prost(enumeration = "PresenceType", tag = "2")]
        pub r#type: i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{Block, RAW};
    use proptest::prelude::*;

    fn raw_cid(data: &[u8]) -> Cid {
        *Block::encode(RAW, Bytes::copy_from_slice(data))
            .unwrap()
            .cid()
    }

    fn arb_entry() -> impl Strategy<Value = WantEntry> {
        (
            any::<Vec<u8>>(),
            any::<i32>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(seed, priority, cancel, have, sdh)| WantEntry {
                cid: raw_cid(&seed),
                priority,
                cancel,
                want_type: if have {
                    WantType::Have
                } else {
                    WantType::Block
                },
                send_dont_have: sdh,
            })
    }

    proptest! {
        #[test]
        fn messages_round_trip(
            wants in prop::collection::vec(arb_entry(), 0..8),
            full: bool,
            blocks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..4),
            presences in prop::collection::vec((any::<Vec<u8>>(), any::<bool>()), 0..4),
            pending_bytes: i32,
        ) {
            let msg = Message {
                wants,
                full,
                blocks: blocks.iter().map(|d| ReceivedBlock { cid: raw_cid(d), data: Bytes::from(d.clone()) }).collect(),
                presences: presences.iter().map(|(s, h)| (raw_cid(s), if *h { Presence::Have } else { Presence::DontHave })).collect(),
                pending_bytes,
            };
            let bytes = msg.encode();
            prop_assert!(bytes.len() <= msg.size_estimate());
            prop_assert_eq!(Message::decode(Bytes::from(bytes), 1024).unwrap(), msg);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes: Vec<u8>) {
            let _ = Message::decode(Bytes::from(bytes), 1024);
        }
    }

    #[test]
    fn block_cid_comes_from_the_bytes_not_the_sender() {
        // A prefix claiming raw/sha2-256 with bytes of our choosing: the CID is whatever
        // those bytes hash to, never a CID the sender names.
        let wanted = raw_cid(b"the real block");
        let forged = Message {
            blocks: vec![ReceivedBlock {
                cid: wanted,
                data: Bytes::from_static(b"forged bytes"),
            }],
            ..Message::default()
        };
        let decoded = Message::decode(Bytes::from(forged.encode()), 1024).unwrap();
        assert_eq!(decoded.blocks[0].cid, raw_cid(b"forged bytes"));
        assert_ne!(decoded.blocks[0].cid, wanted);
    }

    #[test]
    fn entries_over_the_limit_are_cut() {
        let msg = Message {
            wants: (0..5u8).map(|i| WantEntry::block(raw_cid(&[i]))).collect(),
            ..Message::default()
        };
        let decoded = Message::decode(Bytes::from(msg.encode()), 4).unwrap();
        assert_eq!(decoded.wants, msg.wants[..4]);
    }

    #[test]
    fn bitswap_1_0_blocks_are_read_as_cidv0() {
        let pb = pb::Message {
            blocks: vec![Bytes::from_static(b"old")],
            ..Default::default()
        };
        let msg = Message::decode(Bytes::from(pb.encode_to_vec()), 16).unwrap();
        assert_eq!(msg.blocks[0].cid.version(), Version::V0);
    }
}
