//! The market's messages, each on its concern's protocol ([`Request::concern`]):
//! `/flotilla/offers/2.0.0`, `/flotilla/calls/1.0.0` and `/flotilla/jobs/1.0.0`.
//!
//! Each request is one CBOR-encoded [`RequestEnvelope`] carrying an id, answered by one
//! [`ResponseEnvelope`] with the same id. The overlay bounds every message's size while
//! it is read; here decoding checks what the types cannot say (key length, how many offers
//! a message carries), so a malformed message is refused before anything acts on it.
//!
//! | request        | sent by → to                  | answer                         |
//! |----------------|-------------------------------|--------------------------------|
//! | `Offer`        | offerer → holder              | `Offer` (stored, refreshed, withdrawn) or `Refused` |
//! | `FindOffers`   | scheduler → holder            | `Offers`                       |
//! | `Notify`       | offerer → scheduler           | `Notified`                     |
//! | `Reserve`      | scheduler → offerer           | `Reserved` or `Refused`        |
//! | `Release`      | scheduler → offerer           | `Released`                     |
//! | `Discover`     | client node → scheduler       | `Discovered`, `Busy` or `Refused` |
//! | `Invoke`       | client node → scheduler       | `Invoked`, `Failed`, `Busy` or `Refused` |
//! | `Execute`      | scheduler → volunteer         | `Executed`, `Failed`, or `Refused` (no reservation made) |
//! | `Submit`       | client node → scheduler       | `Accepted`, `Failed`, `Busy` or `Refused` |
//! | `StoreJob`     | scheduler → peers near the job's key | `JobStored` or `Refused` |
//! | `FindJob`      | any node → peers near the job's key  | `Job`                    |
//! | `StoreMemo`    | client node → peers near the call's digest | `MemoStored` or `Refused` |
//! | `FindMemo`     | client node → peers near the call's digest | `Memos`            |
//!
//! Creating, refreshing and withdrawing an offer are one message: a new signed version of
//! the offer, newer by sequence number, withdrawn when its `withdrawn` flag is set.

use super::function::{Execution, FunctionCall, Invocation};
use super::jobs::SignedJob;
use crate::one_line;
use flotilla_api::memo::Memo;
use flotilla_offers::ledger::Reservation;
use flotilla_offers::offer::{SignedOffer, cbor_bytes};
use flotilla_overlay::regions::Tier;
pub use flotilla_overlay::rpc::Concern;
use flotilla_scheduler::placement::Policy;
use serde::{Deserialize, Serialize};

pub use flotilla_api::market::{Discovered, OfferSummary, Placement};

/// Longest key an offer may be sent under, in bytes.
pub const MAX_KEY_BYTES: usize = 64;
/// Most offers one `Notify` may carry.
pub const MAX_NOTIFY_OFFERS: usize = 16;
/// Most offers one `Offers` answer carries.
pub const MAX_FOUND_OFFERS: usize = 64;

/// Why a message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The bytes are not a message of this protocol.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A response answers another request.
    #[error("response {got} does not answer request {expected}")]
    WrongId {
        /// The request's id.
        expected: u64,
        /// The id in the response.
        got: u64,
    },
}

/// A request and its id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestEnvelope {
    /// Chosen by the sender; the response carries it back.
    pub id: u64,
    /// The request.
    pub request: Request,
}

/// A response and the id of the request it answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseEnvelope {
    /// The request's id.
    pub id: u64,
    /// The response.
    pub response: Response,
}

/// What one peer asks another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// Hold this version of an offer (create, refresh or withdraw), sent under `key`.
    Offer {
        /// The key the offer was published under, inside its tier's region.
        #[serde(with = "cbor_bytes")]
        key: Vec<u8>,
        /// The signed offer.
        offer: SignedOffer,
    },
    /// Which offers of `tier` with at least `min_free_mib` free do you hold? (In the
    /// whole-key-space baseline: of any tier.)
    FindOffers {
        /// The tier asked about.
        tier: Tier,
        /// Least free memory wanted, in MiB.
        min_free_mib: u32,
    },
    /// An offerer's report of what it has free, for a scheduler's super-trader list.
    Notify {
        /// Its current offers (at most [`MAX_NOTIFY_OFFERS`]).
        offers: Vec<SignedOffer>,
    },
    /// Set memory of one of your offers aside.
    Reserve {
        /// The scheduler's id for the reservation; repeating it is harmless.
        reservation_id: u64,
        /// The offer.
        offer_id: u64,
        /// Memory, in MiB.
        mib: u32,
        /// How long to hold it unless it is used, in ms.
        hold_ms: u64,
    },
    /// Give a reservation's memory back.
    Release {
        /// The reservation.
        reservation_id: u64,
    },
    /// Run one discovery (and possibly a reservation) for a client.
    Discover(DiscoverRequest),
    /// Place a client's call on a volunteer and run it.
    Invoke(Box<InvokeRequest>),
    /// Run a call on memory reserved here.
    Execute(Box<ExecuteRequest>),
    /// Take a call as a detached job, placed when an offer fits.
    Submit {
        /// The call; its invocation id is the client's nonce, from which the scheduler
        /// derives the job's id.
        request: Box<InvokeRequest>,
        /// How long it may wait for an offer, in ms.
        wait_ms: u64,
    },
    /// Keep this version of a job's record.
    StoreJob(Box<SignedJob>),
    /// Which version of this job's record do you hold?
    FindJob {
        /// The job.
        job_id: u64,
    },
    /// Keep this memoized result of a pure call.
    StoreMemo(Box<Memo>),
    /// Which memoized results of the call with this digest do you hold?
    FindMemo {
        /// The call's digest (`flotilla_api::memo::call_digest`).
        digest: [u8; 32],
    },
}

impl Request {
    /// The concern it belongs to: the protocol it travels on and the handler that
    /// answers it.
    pub fn concern(&self) -> Concern {
        match self {
            Request::Offer { .. }
            | Request::FindOffers { .. }
            | Request::Notify { .. }
            | Request::Reserve { .. }
            | Request::Release { .. } => Concern::Offers,
            Request::Discover(_) | Request::Invoke(_) | Request::Execute(_) => Concern::Calls,
            Request::Submit { .. }
            | Request::StoreJob(_)
            | Request::FindJob { .. }
            | Request::StoreMemo(_)
            | Request::FindMemo { .. } => Concern::Jobs,
        }
    }
}

/// What a node holds of a call's memoized results.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoAnswer {
    /// Nothing.
    Unknown,
    /// Volunteers disagreed on its result: it is not memoized.
    Contested,
    /// The memos of volunteers that agree, newest first (at most
    /// `flotilla_api::memo::MAX_MEMOS_ANSWERED`).
    Agreed(Vec<Memo>),
}

/// A client's call, for a scheduler to place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvokeRequest {
    /// The client's id for it; asking again with the same id gets the one run's answer.
    pub invocation_id: u64,
    /// The call.
    pub call: FunctionCall,
    /// Region probes before the fallback (the scheduler's setting if `None`).
    pub max_tries: Option<u32>,
    /// Which fitting offer to prefer (the scheduler's setting if `None`).
    pub placement: Option<Policy>,
    /// Volunteers not to run it on (those that ran its other replicas), at most
    /// [`MAX_EXCLUDED`].
    #[serde(default)]
    pub exclude: Vec<libp2p::PeerId>,
    /// The invocation id of an earlier answer, from this scheduler to this client, whose
    /// receipt the client refused: the scheduler checks the receipt it passed on.
    #[serde(default)]
    pub refused: Option<u64>,
}

/// Most volunteers one call may exclude.
pub const MAX_EXCLUDED: usize = 16;

/// A call for a volunteer to run on memory reserved there: reserved before (with
/// `Reserve`), or in the same message (`offer_id`), which saves an exchange. Either way
/// only the peer that made the reservation may run a call on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecuteRequest {
    /// The invocation; asking again with the same id gets the one run's answer.
    pub invocation_id: u64,
    /// The reservation it runs on.
    pub reservation_id: u64,
    /// Reserve the call's memory on this offer first, as reservation `reservation_id`
    /// (the offerer alone decides; a refusal is answered `Refused`).
    #[serde(default)]
    pub offer_id: Option<u64>,
    /// The call.
    pub call: FunctionCall,
}

/// A client's discovery request to a scheduler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiscoverRequest {
    /// Memory wanted, in MiB.
    pub memory_mib: u32,
    /// Region probes before the fallback (the scheduler's setting if `None`).
    pub max_tries: Option<u32>,
    /// Reserve the best offer found, on these terms.
    pub reserve: Option<ReserveTerms>,
}

/// How a scheduler should reserve what it finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReserveTerms {
    /// The reservation's id.
    pub reservation_id: u64,
    /// How long the offerer holds it unless used, in ms.
    pub hold_ms: u64,
    /// Which fitting offer to prefer (the scheduler's setting if `None`).
    pub policy: Option<Policy>,
}

/// What a peer answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    /// The offer was taken: `stored`, `refreshed` or `withdrawn`.
    Offer {
        /// What it did.
        outcome: String,
    },
    /// The request was refused, and why.
    Refused {
        /// Why, in one line.
        reason: String,
    },
    /// Offers held that match a `FindOffers`.
    Offers {
        /// At most [`MAX_FOUND_OFFERS`] of them.
        offers: Vec<SignedOffer>,
        /// How many matched in all.
        matched: u32,
    },
    /// A `Notify` was taken.
    Notified {
        /// Offers the list accepted.
        accepted: u32,
    },
    /// Memory was reserved.
    Reserved {
        /// The reservation.
        reservation: Reservation,
        /// The offer's new version, signed by its offerer, with the reserved memory in
        /// use (withdrawn when none is left), so a scheduler's list stays current.
        #[serde(default)]
        offer: Option<Box<SignedOffer>>,
    },
    /// A reservation was released (or was not held).
    Released,
    /// A discovery's outcome.
    Discovered(Box<Discovered>),
    /// The scheduler runs as many discoveries or invocations as it allows; ask another.
    Busy,
    /// A call ran on a volunteer (successfully or not: see its exit status).
    Executed {
        /// How it ran.
        execution: Box<Execution>,
        /// The offer's new version once the call's memory is back, signed by the
        /// volunteer, so the scheduler's list stays current.
        #[serde(default)]
        offer: Option<Box<SignedOffer>>,
    },
    /// A client's call was placed and ran.
    Invoked(Box<Invocation>),
    /// A job was taken, under this id.
    Accepted {
        /// The job's id ([`super::jobs::job_id`] of the scheduler and the nonce).
        job_id: u64,
    },
    /// A job record was kept (or a newer one is held).
    JobStored,
    /// The newest version of a job's record held, if any.
    Job(Option<Box<SignedJob>>),
    /// A memo was kept (or an as new one is held).
    MemoStored,
    /// What is held of a call's memoized results.
    Memos(MemoAnswer),
    /// A call could not be placed or run.
    Failed {
        /// Why, in one line.
        reason: String,
        /// Whether trying again (elsewhere, or later) might succeed.
        retryable: bool,
    },
}

impl Response {
    /// The answer of a node that is stopping: refused, so the asker goes elsewhere.
    pub fn stopping() -> Response {
        Response::Refused {
            reason: super::Stopped.to_string(),
        }
    }
}

/// Encodes a request.
pub fn encode_request(id: u64, request: Request) -> Vec<u8> {
    cbor4ii::serde::to_vec(Vec::new(), &RequestEnvelope { id, request })
        .expect("requests always encode")
}

/// Encodes a response.
pub fn encode_response(id: u64, response: Response) -> Vec<u8> {
    cbor4ii::serde::to_vec(Vec::new(), &ResponseEnvelope { id, response })
        .expect("responses always encode")
}

/// Decodes and checks a request.
pub fn decode_request(bytes: &[u8]) -> Result<RequestEnvelope, ProtocolError> {
    let envelope: RequestEnvelope = cbor4ii::serde::from_slice(bytes)
        .map_err(|e| ProtocolError::Malformed(one_line(&e.to_string())))?;
    match &envelope.request {
        Request::Offer { key, .. } if key.len() > MAX_KEY_BYTES => Err(ProtocolError::Malformed(
            format!("key of {} bytes (at most {MAX_KEY_BYTES})", key.len()),
        )),
        Request::Notify { offers } if offers.len() > MAX_NOTIFY_OFFERS => {
            Err(ProtocolError::Malformed(format!(
                "{} offers in one notification (at most {MAX_NOTIFY_OFFERS})",
                offers.len()
            )))
        }
        _ => Ok(envelope),
    }
}

/// Decodes a response and checks that it answers request `expected_id`.
pub fn decode_response(bytes: &[u8], expected_id: u64) -> Result<Response, ProtocolError> {
    let envelope: ResponseEnvelope = cbor4ii::serde::from_slice(bytes)
        .map_err(|e| ProtocolError::Malformed(one_line(&e.to_string())))?;
    if envelope.id != expected_id {
        return Err(ProtocolError::WrongId {
            expected: expected_id,
            got: envelope.id,
        });
    }
    match &envelope.response {
        Response::Offers { offers, .. } if offers.len() > MAX_FOUND_OFFERS => {
            Err(ProtocolError::Malformed(format!(
                "{} offers in one answer (at most {MAX_FOUND_OFFERS})",
                offers.len()
            )))
        }
        _ => Ok(envelope.response),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_responses_round_trip() {
        let request = Request::Reserve {
            reservation_id: 7,
            offer_id: 9,
            mib: 300,
            hold_ms: 1000,
        };
        let decoded = decode_request(&encode_request(42, request.clone())).unwrap();
        assert_eq!(decoded.id, 42);
        assert_eq!(decoded.request, request);
        let bytes = encode_response(42, Response::Released);
        assert_eq!(decode_response(&bytes, 42).unwrap(), Response::Released);
        assert!(matches!(
            decode_response(&bytes, 43),
            Err(ProtocolError::WrongId { .. })
        ));
    }

    #[test]
    fn malformed_and_overlong_requests_are_refused() {
        assert!(matches!(
            decode_request(b"\xa1\x00"),
            Err(ProtocolError::Malformed(_))
        ));
        assert!(decode_request(&[]).is_err());
        // A tier that does not exist is refused by the type itself.
        let bytes = encode_request(
            1,
            Request::FindOffers {
                tier: Tier::from_mib(512).unwrap(),
                min_free_mib: 1,
            },
        );
        let mut unknown = bytes.clone();
        let at = unknown
            .windows(11)
            .position(|w| w == b"find_offers")
            .unwrap();
        unknown[at + 10] = b'z';
        assert!(decode_request(&unknown).is_err());
        let mut bad_tier = bytes.clone();
        let at = bad_tier
            .windows(3)
            .position(|w| w == [0x19, 0x02, 0x00])
            .unwrap();
        bad_tier[at + 2] = 0x01; // 513 MiB is no tier
        assert!(decode_request(&bad_tier).is_err());
        let key = vec![0u8; MAX_KEY_BYTES + 1];
        let keypair = libp2p::identity::Keypair::generate_ed25519();
        let offer = SignedOffer::sign(
            flotilla_offers::offer::OfferBody {
                offerer: keypair.public().to_peer_id(),
                addresses: Vec::new(),
                tier: Tier::from_mib(128).unwrap(),
                memory_mib: 128,
                in_use_mib: 0,
                offer_id: 1,
                seq: 1,
                expires_at_ms: 1,
                withdrawn: false,
            },
            &keypair,
        )
        .unwrap();
        let long_key = encode_request(
            2,
            Request::Offer {
                key,
                offer: offer.clone(),
            },
        );
        assert!(matches!(
            decode_request(&long_key),
            Err(ProtocolError::Malformed(_))
        ));
        let crowded = encode_request(
            3,
            Request::Notify {
                offers: vec![offer; MAX_NOTIFY_OFFERS + 1],
            },
        );
        assert!(matches!(
            decode_request(&crowded),
            Err(ProtocolError::Malformed(_))
        ));
    }
}
