//! What the API reports of the resource market: a node's offers, reservations and the
//! offers it holds for others (`flotilla offers`), and the outcome of a discovery a
//! scheduler ran (`flotilla discover`) — the offers found and the reservation made.
//!
//! [`Discovered`] also travels between nodes, as a scheduler's answer on the offer
//! protocol (flotilla-node's `market::protocol`, which re-exports these types).

use flotilla_offers::ledger::Reservation;
use flotilla_offers::offer::SignedOffer;
use flotilla_offers::offerer::SentOffer;
use flotilla_scheduler::discovery::Report;
use serde::{Deserialize, Serialize};

/// Offers this node holds for another peer, as `flotilla offers` lists them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeldOffer {
    /// The offer.
    #[serde(flatten)]
    pub offer: OfferSummary,
    /// When it expires (Unix ms).
    pub expires_at_ms: u64,
}

/// What `flotilla offers` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OffersView {
    /// Memory this node lends, in MiB (0 if none).
    pub offer_memory_mib: u64,
    /// Whether this node is a scheduler.
    pub scheduler: bool,
    /// The offers this node makes.
    pub sent: Vec<SentOfferView>,
    /// Reservations on them.
    pub reservations: Vec<Reservation>,
    /// The offers it holds for others.
    pub held: Vec<HeldOffer>,
    /// Offers on its super-trader list (schedulers only).
    pub super_traders: usize,
}

/// One offer this node makes (a [`SentOffer`] that can be read back).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SentOfferView {
    /// The offer's id.
    pub offer_id: u64,
    /// Its tier, in MiB.
    pub tier_mib: u32,
    /// Memory it lends, in MiB.
    pub memory_mib: u32,
    /// Memory reserved on it, in MiB.
    pub in_use_mib: u32,
    /// Its latest sequence number.
    pub seq: u64,
    /// Its holder, once known.
    pub holder: Option<String>,
    /// When it expires, once published.
    pub expires_at_ms: Option<u64>,
    /// Where it stands.
    pub state: String,
}

impl From<SentOffer> for SentOfferView {
    fn from(s: SentOffer) -> Self {
        SentOfferView {
            offer_id: s.offer_id,
            tier_mib: s.tier_mib,
            memory_mib: s.memory_mib,
            in_use_mib: s.in_use_mib,
            seq: s.seq,
            holder: s.holder,
            expires_at_ms: s.expires_at_ms,
            state: s.state.to_string(),
        }
    }
}

/// The outcome of a discovery run by a scheduler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Discovered {
    /// The scheduler that ran it.
    pub scheduler: String,
    /// The probes, fallback, messages and time.
    pub report: Report,
    /// Kademlia requests the probes' lookups sent.
    pub lookup_requests: u32,
    /// The fitting offers found (at most the offer protocol's `MAX_FOUND_OFFERS`).
    pub offers: Vec<OfferSummary>,
    /// The reservation made, when one was asked for and succeeded.
    pub placement: Option<Placement>,
}

/// One offer, as a discovery reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferSummary {
    /// The offering peer.
    pub offerer: String,
    /// The offer's id.
    pub offer_id: u64,
    /// Its tier, in MiB.
    pub tier_mib: u32,
    /// Memory it lends, in MiB.
    pub memory_mib: u32,
    /// Memory free on it, in MiB.
    pub free_mib: u32,
}

impl From<&SignedOffer> for OfferSummary {
    fn from(offer: &SignedOffer) -> Self {
        OfferSummary {
            offerer: offer.body.offerer.to_string(),
            offer_id: offer.body.offer_id,
            tier_mib: offer.body.tier.mib(),
            memory_mib: offer.body.memory_mib,
            free_mib: offer.body.free_mib(),
        }
    }
}

/// A reservation made for a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The offer it was taken from, as signed by its offerer (with its addresses).
    pub offer: SignedOffer,
    /// The reservation.
    pub reservation: Reservation,
}
