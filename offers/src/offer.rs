//! The offer record: memory a volunteer lends in one tier, signed by the volunteer's key.
//!
//! An offer names its offerer (PeerId and addresses), its tier, the memory it lends and how
//! much of it is in use, an offer id, a sequence number and an expiry. The offerer signs
//! the CBOR encoding of all of it (after a domain-separation tag) with its libp2p key, and
//! the public key travels with the offer, so any holder can check that the offer is the
//! offerer's own and unaltered. A withdrawal is the same record, marked withdrawn, with a
//! newer sequence number: it is authenticated and replay-protected exactly like an offer.

use flotilla_overlay::regions::Tier;
use libp2p::identity::{Keypair, PublicKey};
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

/// The tag signed before the body, so an offer signature can never be mistaken for a
/// signature over anything else.
const SIGNING_TAG: &[u8] = b"flotilla/offer/v1\0";
/// Largest encoded offer accepted.
pub const MAX_OFFER_BYTES: usize = 2048;
/// Most addresses an offer may carry.
pub const MAX_ADDRESSES: usize = 8;

/// Why an offer is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OfferError {
    /// The signature does not verify, or the key is not the offerer's.
    #[error("offer signature does not verify for its offerer")]
    BadSignature,
    /// The fields contradict each other.
    #[error("invalid offer: {0}")]
    Invalid(String),
    /// The bytes are not an offer.
    #[error("malformed offer: {0}")]
    Malformed(String),
    /// Signing failed.
    #[error("cannot sign offer: {0}")]
    Signing(String),
}

/// The signed part of an offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferBody {
    /// The peer lending the memory.
    pub offerer: PeerId,
    /// Where the offerer can be reached.
    pub addresses: Vec<Multiaddr>,
    /// The tier whose region the offer is published in.
    pub tier: Tier,
    /// Memory this offer lends, in MiB (at least the tier's, less than the next tier's).
    pub memory_mib: u32,
    /// Of that, memory already reserved, in MiB.
    pub in_use_mib: u32,
    /// Identifies the offer among its offerer's offers.
    pub offer_id: u64,
    /// Grows with every new version of the offer; holders keep only the newest.
    pub seq: u64,
    /// Unix time in milliseconds after which the offer is void.
    pub expires_at_ms: u64,
    /// This version withdraws the offer.
    pub withdrawn: bool,
}

impl OfferBody {
    /// Memory still free in this offer, in MiB.
    pub fn free_mib(&self) -> u32 {
        self.memory_mib.saturating_sub(self.in_use_mib)
    }

    /// Checks the fields against each other.
    pub fn validate(&self) -> Result<(), OfferError> {
        let invalid = |s: String| Err(OfferError::Invalid(s));
        if Tier::largest_within(u64::from(self.memory_mib)) != Some(self.tier) {
            return invalid(format!(
                "{} MiB does not belong in tier {}",
                self.memory_mib, self.tier
            ));
        }
        if self.in_use_mib > self.memory_mib {
            return invalid(format!(
                "{} MiB in use of {} MiB",
                self.in_use_mib, self.memory_mib
            ));
        }
        if self.addresses.len() > MAX_ADDRESSES {
            return invalid(format!(
                "{} addresses (at most {MAX_ADDRESSES})",
                self.addresses.len()
            ));
        }
        Ok(())
    }

    fn signing_bytes(&self) -> Vec<u8> {
        let mut bytes = SIGNING_TAG.to_vec();
        cbor4ii::serde::to_writer(&mut bytes, self).expect("offer bodies always encode");
        bytes
    }
}

/// An offer with its offerer's public key and signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedOffer {
    /// What is offered.
    pub body: OfferBody,
    /// The offerer's public key, protobuf-encoded as libp2p does.
    #[serde(with = "cbor_bytes")]
    pub public_key: Vec<u8>,
    /// The signature over the tag and the CBOR body.
    #[serde(with = "cbor_bytes")]
    pub signature: Vec<u8>,
}

impl SignedOffer {
    /// Signs `body` with the offerer's key, which must be the key of `body.offerer`.
    pub fn sign(body: OfferBody, keypair: &Keypair) -> Result<SignedOffer, OfferError> {
        body.validate()?;
        if keypair.public().to_peer_id() != body.offerer {
            return Err(OfferError::Signing("the key is not the offerer's".into()));
        }
        let signature = keypair
            .sign(&body.signing_bytes())
            .map_err(|e| OfferError::Signing(e.to_string()))?;
        Ok(SignedOffer {
            public_key: keypair.public().encode_protobuf(),
            signature,
            body,
        })
    }

    /// Checks the fields, that the key is the offerer's, and the signature.
    pub fn verify(&self) -> Result<(), OfferError> {
        self.body.validate()?;
        let key = PublicKey::try_decode_protobuf(&self.public_key)
            .map_err(|_| OfferError::BadSignature)?;
        if key.to_peer_id() != self.body.offerer
            || !key.verify(&self.body.signing_bytes(), &self.signature)
        {
            return Err(OfferError::BadSignature);
        }
        Ok(())
    }

    /// The CBOR encoding of the signed offer.
    pub fn encode(&self) -> Vec<u8> {
        cbor4ii::serde::to_vec(Vec::new(), self).expect("offers always encode")
    }

    /// Decodes a signed offer (without verifying it), refusing oversize input.
    pub fn decode(bytes: &[u8]) -> Result<SignedOffer, OfferError> {
        if bytes.len() > MAX_OFFER_BYTES {
            return Err(OfferError::Malformed(format!(
                "{} bytes (at most {MAX_OFFER_BYTES})",
                bytes.len()
            )));
        }
        cbor4ii::serde::from_slice(bytes).map_err(|e| OfferError::Malformed(e.to_string()))
    }
}

/// Byte strings as CBOR byte strings rather than arrays of numbers: use with
/// `#[serde(with = "flotilla_offers::offer::cbor_bytes")]` on a `Vec<u8>`.
pub mod cbor_bytes {
    use serde::de::Visitor;
    use serde::{Deserializer, Serializer};

    /// Writes `bytes` as a byte string.
    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(bytes)
    }

    /// Reads a byte string.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(BytesVisitor)
    }

    struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a byte string")
        }

        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        /// Formats without byte strings (JSON) write bytes as a list of numbers.
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(byte) = seq.next_element()? {
                bytes.push(byte);
            }
            Ok(bytes)
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A valid body for `keypair` in the 512 MiB tier.
    pub(crate) fn body(
        keypair: &Keypair,
        offer_id: u64,
        seq: u64,
        expires_at_ms: u64,
    ) -> OfferBody {
        OfferBody {
            offerer: keypair.public().to_peer_id(),
            addresses: vec!["/ip4/127.0.0.1/tcp/4100".parse().unwrap()],
            tier: Tier::from_mib(512).unwrap(),
            memory_mib: 600,
            in_use_mib: 0,
            offer_id,
            seq,
            expires_at_ms,
            withdrawn: false,
        }
    }

    #[test]
    fn signed_offers_verify_and_round_trip() {
        let keypair = Keypair::generate_ed25519();
        let offer = SignedOffer::sign(body(&keypair, 1, 1, 10_000), &keypair).unwrap();
        offer.verify().unwrap();
        let decoded = SignedOffer::decode(&offer.encode()).unwrap();
        assert_eq!(decoded, offer);
        decoded.verify().unwrap();
        assert!(offer.encode().len() < MAX_OFFER_BYTES);
        // Also through JSON, as the node's API carries it.
        let json = serde_json::to_string(&offer).unwrap();
        assert_eq!(serde_json::from_str::<SignedOffer>(&json).unwrap(), offer);
    }

    #[test]
    fn altered_or_foreign_offers_do_not_verify() {
        let keypair = Keypair::generate_ed25519();
        let offer = SignedOffer::sign(body(&keypair, 1, 1, 10_000), &keypair).unwrap();
        let mut altered = offer.clone();
        altered.body.memory_mib = 1000;
        assert_eq!(altered.verify(), Err(OfferError::BadSignature));
        // Someone else signing an offer in our name.
        let mallory = Keypair::generate_ed25519();
        let mut forged = offer.clone();
        forged.public_key = mallory.public().encode_protobuf();
        forged.signature = mallory.sign(&forged.body.signing_bytes()).unwrap();
        assert_eq!(forged.verify(), Err(OfferError::BadSignature));
        assert!(SignedOffer::sign(body(&keypair, 1, 1, 1), &mallory).is_err());
    }

    #[test]
    fn inconsistent_bodies_and_bad_bytes_are_refused() {
        let keypair = Keypair::generate_ed25519();
        let mut wrong_tier = body(&keypair, 1, 1, 10);
        wrong_tier.memory_mib = 2000;
        assert!(matches!(
            SignedOffer::sign(wrong_tier, &keypair),
            Err(OfferError::Invalid(_))
        ));
        let mut overused = body(&keypair, 1, 1, 10);
        overused.in_use_mib = 601;
        assert!(matches!(
            SignedOffer::sign(overused, &keypair),
            Err(OfferError::Invalid(_))
        ));
        assert!(matches!(
            SignedOffer::decode(b"\xff\x00"),
            Err(OfferError::Malformed(_))
        ));
        assert!(matches!(
            SignedOffer::decode(&[0u8; MAX_OFFER_BYTES + 1]),
            Err(OfferError::Malformed(_))
        ));
    }
}
