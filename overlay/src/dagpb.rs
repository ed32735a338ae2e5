//! dag-pb nodes (and the UnixFS `Data` message they carry) decoded by counting first.
//!
//! A stranger's block is walked once over its protobuf fields without allocating: the
//! node must be within [`MAX_BLOCK_SIZE`], and its links are counted and refused past
//! [`MAX_NODE_LINKS`] before any `Vec` is made. Only then are the link CIDs decoded, into
//! a vector of exactly that many. Link names and `Tsize` are skipped, and so are the
//! UnixFS `blocksizes` (a 2 MiB block of them would otherwise decode to 16 MiB).

use crate::block::MAX_BLOCK_SIZE;
use bytes::Bytes;
use cid::Cid;

/// The most links one dag-pb node may have. Files we make have at most 174 (kubo's
/// default), HAMT directory shards 256, other builders ~1024; a 2 MiB node of 8-byte
/// links could otherwise carry 260 000.
pub const MAX_NODE_LINKS: usize = 8192;

/// Why a dag-pb node or its UnixFS data was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DagPbError {
    /// The node is larger than any block may be.
    #[error("node of {0} bytes is over the {MAX_BLOCK_SIZE}-byte block limit")]
    TooLarge(usize),
    /// The node has more links than allowed.
    #[error("node has {0} links or more, over the limit of {MAX_NODE_LINKS}")]
    TooManyLinks(usize),
    /// The bytes are not valid protobuf of the expected shape.
    #[error("{0}")]
    Malformed(&'static str),
    /// A link's hash is not a CID.
    #[error("bad link CID: {0}")]
    BadCid(String),
}

/// A decoded dag-pb node: its data field and its links' CIDs, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DagPbNode {
    /// The `Data` field, if present.
    pub data: Option<Bytes>,
    /// The links' CIDs, in order.
    pub links: Vec<Cid>,
}

/// The fields of a UnixFS `Data` message a reader needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixfsFields {
    /// The node type (0 raw, 1 directory, 2 file, ...).
    pub kind: i32,
    /// Content held in the node itself.
    pub data: Bytes,
    /// The size of the whole file under the node, as the node declares it.
    pub filesize: Option<u64>,
}

/// One protobuf field: its number and its value.
enum Value<'a> {
    Varint(u64),
    Len(&'a [u8]),
    Other,
}

/// Reads protobuf fields from a byte slice, without allocating.
struct Fields<'a> {
    rest: &'a [u8],
}

fn varint(buf: &mut &[u8]) -> Result<u64, DagPbError> {
    let mut value = 0u64;
    for i in 0..10 {
        let (&byte, rest) = buf
            .split_first()
            .ok_or(DagPbError::Malformed("truncated varint"))?;
        *buf = rest;
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(DagPbError::Malformed("varint over 10 bytes"))
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u64, Value<'a>), DagPbError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        Some(self.field())
    }
}

impl<'a> Fields<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Fields { rest: bytes }
    }

    fn field(&mut self) -> Result<(u64, Value<'a>), DagPbError> {
        let key = varint(&mut self.rest)?;
        let tag = key >> 3;
        let value = match key & 7 {
            0 => Value::Varint(varint(&mut self.rest)?),
            1 => self.skip(8)?,
            2 => {
                let len = varint(&mut self.rest)?;
                let len = usize::try_from(len)
                    .ok()
                    .filter(|&l| l <= self.rest.len())
                    .ok_or(DagPbError::Malformed("length past the end"))?;
                let (value, rest) = self.rest.split_at(len);
                self.rest = rest;
                Value::Len(value)
            }
            5 => self.skip(4)?,
            _ => return Err(DagPbError::Malformed("unsupported wire type")),
        };
        Ok((tag, value))
    }

    fn skip(&mut self, n: usize) -> Result<Value<'a>, DagPbError> {
        if self.rest.len() < n {
            return Err(DagPbError::Malformed("truncated field"));
        }
        self.rest = &self.rest[n..];
        Ok(Value::Other)
    }
}

/// Decodes a dag-pb node, counting its links before allocating for them.
pub fn decode(bytes: &Bytes) -> Result<DagPbNode, DagPbError> {
    if bytes.len() > MAX_BLOCK_SIZE {
        return Err(DagPbError::TooLarge(bytes.len()));
    }
    // First pass: check the framing and count the links; nothing is allocated.
    let mut count = 0usize;
    for field in Fields::new(bytes) {
        if let (2, value) = field? {
            if !matches!(value, Value::Len(_)) {
                return Err(DagPbError::Malformed("link is not a message"));
            }
            count += 1;
            if count > MAX_NODE_LINKS {
                return Err(DagPbError::TooManyLinks(count));
            }
        }
    }
    // Second pass: the links, into exactly as many places as counted.
    let mut links = Vec::with_capacity(count);
    let mut data = None;
    for field in Fields::new(bytes) {
        match field? {
            (1, Value::Len(d)) => data = Some(bytes.slice_ref(d)),
            (1, _) => return Err(DagPbError::Malformed("data is not bytes")),
            (2, Value::Len(link)) => links.push(link_cid(link)?),
            _ => {}
        }
    }
    Ok(DagPbNode { data, links })
}

/// The CID of one `PBLink` message.
fn link_cid(link: &[u8]) -> Result<Cid, DagPbError> {
    let mut hash = None;
    for field in Fields::new(link) {
        if let (1, value) = field? {
            match value {
                Value::Len(h) => hash = Some(h),
                _ => return Err(DagPbError::Malformed("link hash is not bytes")),
            }
        }
    }
    let hash = hash.ok_or(DagPbError::Malformed("link without hash"))?;
    Cid::try_from(hash).map_err(|e| DagPbError::BadCid(e.to_string()))
}

/// Decodes the fields of a UnixFS `Data` message a reader needs, skipping `blocksizes`.
pub fn decode_unixfs(bytes: &Bytes) -> Result<UnixfsFields, DagPbError> {
    let mut kind = None;
    let mut data = Bytes::new();
    let mut filesize = None;
    for field in Fields::new(bytes) {
        match field? {
            (1, Value::Varint(k)) => kind = Some(k as i32),
            (2, Value::Len(d)) => data = bytes.slice_ref(d),
            (3, Value::Varint(s)) => filesize = Some(s),
            (1..=3, _) => return Err(DagPbError::Malformed("UnixFS field of a wrong type")),
            _ => {}
        }
    }
    let kind = kind.ok_or(DagPbError::Malformed("UnixFS data without a type"))?;
    Ok(UnixfsFields {
        kind,
        data,
        filesize,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::encoding::{WireType, encode_key, encode_varint};

    /// `n` links to `cid`, and the data field, encoded as dag-pb.
    fn node(cid: &Cid, n: usize, data: &[u8]) -> Bytes {
        let hash = cid.to_bytes();
        let mut buf = Vec::new();
        for _ in 0..n {
            encode_key(2, WireType::LengthDelimited, &mut buf);
            encode_varint(hash.len() as u64 + 2, &mut buf);
            encode_key(1, WireType::LengthDelimited, &mut buf);
            encode_varint(hash.len() as u64, &mut buf);
            buf.extend_from_slice(&hash);
        }
        encode_key(1, WireType::LengthDelimited, &mut buf);
        encode_varint(data.len() as u64, &mut buf);
        buf.extend_from_slice(data);
        Bytes::from(buf)
    }

    fn empty_identity() -> Cid {
        Cid::try_from(&[0x01u8, 0x55, 0x00, 0x00][..]).unwrap()
    }

    #[test]
    fn links_and_data_decode_in_order() {
        let cid = empty_identity();
        let decoded = decode(&node(&cid, 3, b"\x08\x02")).unwrap();
        assert_eq!(decoded.links, vec![cid; 3]);
        assert_eq!(decoded.data.as_deref(), Some(&b"\x08\x02"[..]));
        let unixfs = decode_unixfs(&decoded.data.unwrap()).unwrap();
        assert_eq!(unixfs.kind, 2);
        assert_eq!(unixfs.filesize, None);
    }

    #[test]
    fn a_node_over_the_link_limit_is_refused_before_its_links_are_decoded() {
        let cid = empty_identity();
        assert!(decode(&node(&cid, MAX_NODE_LINKS, b"")).is_ok());
        // The bomb's second block: 200 000 links to an empty identity block, 1.6 MB.
        let bomb = node(&cid, 200_000, b"");
        assert!(bomb.len() <= MAX_BLOCK_SIZE);
        assert_eq!(
            decode(&bomb),
            Err(DagPbError::TooManyLinks(MAX_NODE_LINKS + 1))
        );
    }

    #[test]
    fn a_node_over_the_block_size_is_refused_unread() {
        let big = Bytes::from(vec![0u8; MAX_BLOCK_SIZE + 1]);
        assert_eq!(decode(&big), Err(DagPbError::TooLarge(MAX_BLOCK_SIZE + 1)));
    }

    #[test]
    fn truncated_and_overlong_fields_are_malformed() {
        for junk in [&b"\xff\xff\xff"[..], b"\x12\x05ab", b"\x12", b"\x0f"] {
            assert!(
                matches!(
                    decode(&Bytes::copy_from_slice(junk)),
                    Err(DagPbError::Malformed(_))
                ),
                "{junk:?}"
            );
        }
        assert!(matches!(
            decode(&Bytes::from_static(b"\x12\x00")),
            Err(DagPbError::Malformed("link without hash"))
        ));
    }

    #[test]
    fn unixfs_blocksizes_are_skipped_not_collected() {
        // type file, filesize 5, then many blocksizes.
        let mut buf = vec![0x08, 0x02, 0x18, 0x05];
        for _ in 0..1000 {
            buf.extend_from_slice(&[0x20, 0x01]);
        }
        let fields = decode_unixfs(&Bytes::from(buf)).unwrap();
        assert_eq!(fields.filesize, Some(5));
    }
}
