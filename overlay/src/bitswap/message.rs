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
    /// A field of the message is malformed.
    #[error("malformed bitswap message: bad {0}")]
    Field(&'static str),
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

    /// Decodes a protobuf message, keeping at most `max_entries` wantlist entries, as
    /// many blocks and as many presences (as boxo does: a peer's wantlist beyond our
    /// limit is cut, not refused). The message is walked field by field and entries past
    /// a limit are skipped without being decoded, so a frame of millions of empty entries
    /// allocates no more than `max_entries` of each.
    pub fn decode(bytes: Bytes, max_entries: usize) -> Result<Message, MessageError> {
        let mut msg = Message::default();
        let mut buf = bytes;
        while let Some((tag, field)) = next_field(&mut buf)? {
            match (tag, field) {
                (1, Field::Len(wantlist)) => msg.decode_wantlist(wantlist, max_entries)?,
                (2, Field::Len(data)) if msg.blocks.len() < max_entries => {
                    // Bitswap 1.0.0 blocks are CIDv0: dag-pb, sha2-256.
                    let hash =
                        Multihash::wrap(SHA2_256, &Sha256::digest(&data)).expect("32 bytes fit");
                    let cid = Cid::new_v0(hash).map_err(|e| MessageError::Cid(e.to_string()))?;
                    msg.blocks.push(ReceivedBlock { cid, data });
                }
                (3, Field::Len(block)) if msg.blocks.len() < max_entries => {
                    let block = pb::Block::decode(block)?;
                    if let Some(cid) = cid_of(&block.prefix, &block.data)? {
                        msg.blocks.push(ReceivedBlock {
                            cid,
                            data: block.data,
                        });
                    }
                }
                (4, Field::Len(presence)) if msg.presences.len() < max_entries => {
                    let p = pb::BlockPresence::decode(presence)?;
                    let presence = if p.r#type == pb::PresenceType::DontHave as i32 {
                        Presence::DontHave
                    } else {
                        Presence::Have
                    };
                    msg.presences.push((parse_cid(&p.cid)?, presence));
                }
                // Protobuf's int32 is sign-extended to 64 bits; the cut keeps its value.
                (5, Field::Varint(n)) => msg.pending_bytes = n as i32,
                _ => {} // unknown fields, and entries past a limit
            }
        }
        Ok(msg)
    }

    fn decode_wantlist(&mut self, bytes: Bytes, max_entries: usize) -> Result<(), MessageError> {
        let mut buf = bytes;
        while let Some((tag, field)) = next_field(&mut buf)? {
            match (tag, field) {
                (1, Field::Len(entry)) if self.wants.len() < max_entries => {
                    let e = pb::Entry::decode(entry)?;
                    self.wants.push(WantEntry {
                        cid: parse_cid(&e.block)?,
                        priority: e.priority,
                        cancel: e.cancel,
                        want_type: if e.want_type == pb::WantType::Have as i32 {
                            WantType::Have
                        } else {
                            WantType::Block
                        },
                        send_dont_have: e.send_dont_have,
                    });
                }
                (2, Field::Varint(full)) => self.full = full != 0,
                _ => {}
            }
        }
        Ok(())
    }
}

/// One protobuf field's payload: a varint, or the bytes of a length-delimited field (a
/// slice of the input, not a copy). Fixed-size fields are skipped.
enum Field {
    Varint(u64),
    Len(Bytes),
    Fixed,
}

/// Reads the next field of a protobuf message from `buf`; `None` at its end.
fn next_field(buf: &mut Bytes) -> Result<Option<(u64, Field)>, MessageError> {
    if buf.is_empty() {
        return Ok(None);
    }
    let bad = MessageError::Field;
    let varint = |buf: &mut Bytes| -> Result<u64, MessageError> {
        let (n, rest) = unsigned_varint::decode::u64(buf).map_err(|_| bad("varint"))?;
        let used = buf.len() - rest.len();
        let _ = buf.split_to(used);
        Ok(n)
    };
    let key = varint(buf)?;
    let tag = key >> 3;
    let field = match key & 7 {
        0 => Field::Varint(varint(buf)?),
        1 | 5 => {
            let n = if key & 7 == 1 { 8 } else { 4 };
            if buf.len() < n {
                return Err(bad("truncated fixed-size field"));
            }
            let _ = buf.split_to(n);
            Field::Fixed
        }
        2 => {
            let len = usize::try_from(varint(buf)?).map_err(|_| bad("length"))?;
            if buf.len() < len {
                return Err(bad("truncated length-delimited field"));
            }
            Field::Len(buf.split_to(len))
        }
        _ => return Err(bad("unsupported wire type")),
    };
    if tag == 0 {
        return Err(bad("field number 0"));
    }
    Ok(Some((tag, field)))
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
    fn millions_of_empty_entries_decode_to_the_limits_only() {
        // A 4 MiB frame of empty entries, presences and blocks, the way a hostile peer
        // would send it: two bytes per entry. Only the first `max` of each are decoded.
        let entry = pb::Entry {
            block: raw_cid(b"x").to_bytes(),
            ..Default::default()
        };
        let mut wantlist = Vec::new();
        for _ in 0..1000 {
            prost::encoding::message::encode(1, &entry, &mut wantlist);
        }
        while wantlist.len() < 2 * 1024 * 1024 {
            wantlist.extend_from_slice(&[0x0a, 0x00]); // entry: field 1, empty
        }
        let mut frame = Vec::new();
        prost::encoding::bytes::encode(1, &wantlist, &mut frame);
        let presence = pb::BlockPresence {
            cid: raw_cid(b"y").to_bytes(),
            r#type: 0,
        };
        for _ in 0..16 {
            prost::encoding::message::encode(4, &presence, &mut frame);
        }
        while frame.len() < 3 * 1024 * 1024 {
            frame.extend_from_slice(&[0x22, 0x00]); // presence: field 4, empty
        }
        while frame.len() < 4 * 1024 * 1024 {
            frame.extend_from_slice(&[0x12, 0x00]); // 1.0.0 block: field 2, empty
        }
        let msg = Message::decode(Bytes::from(frame), 16).unwrap();
        assert_eq!(msg.wants.len(), 16);
        assert_eq!(msg.blocks.len(), 16);
        assert_eq!(msg.presences.len(), 16);
        let mut only_presences = Vec::new();
        for _ in 0..100_000 {
            prost::encoding::message::encode(4, &presence, &mut only_presences);
        }
        let msg = Message::decode(Bytes::from(only_presences), 16).unwrap();
        assert_eq!(msg.presences.len(), 16);
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
