//! Request-response messaging for the protocols built on the overlay, on libp2p's
//! request-response behaviour: one protocol per [`Concern`] — offers (publishing,
//! probes, reports, reservations), calls (discovery, invocation, execution) and jobs
//! (detached jobs and their records) — each with its own inbound queue, so a flood of one
//! concern cannot crowd out another, and its own handler above.
//!
//! The overlay moves each request and response as one bounded byte string on its own
//! stream; the protocol above it encodes them (as CBOR) and decides what they mean. A
//! message over its bound is refused while it is read, so a peer cannot make us buffer
//! more. Requests that arrive while their inbound queue is full are dropped, which the
//! sender sees as a failed request; the node keeps serving.

use crate::fair::{FairReceiver, FairSender, Pushed};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::request_response::{self, OutboundFailure, ResponseChannel};
use libp2p::{PeerId, StreamProtocol};
use std::io;
use tokio::sync::mpsc;

/// What a request is about: each concern travels on its own protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Concern {
    /// Offers: publishing them to holders, probes, reports to schedulers, reservations.
    Offers,
    /// Calls: discoveries and invocations asked of a scheduler, executions of a volunteer.
    Calls,
    /// Detached jobs: submissions and the records peers keep.
    Jobs,
}

impl Concern {
    /// Every concern.
    pub const ALL: [Concern; 3] = [Concern::Offers, Concern::Calls, Concern::Jobs];

    /// Requests open at once on one connection, each way, on this concern's protocol:
    /// together [`MAX_STREAMS_PER_CONNECTION`]. A call holds its stream while its
    /// function runs, so calls get half.
    pub const fn max_streams(self) -> usize {
        match self {
            Concern::Offers | Concern::Jobs => MAX_STREAMS_PER_CONNECTION / 4,
            Concern::Calls => MAX_STREAMS_PER_CONNECTION / 2,
        }
    }

    /// The protocol its messages travel on.
    pub const fn protocol(self) -> StreamProtocol {
        match self {
            // 2.0.0: until 1.0.0 this protocol carried calls and jobs too.
            Concern::Offers => StreamProtocol::new("/flotilla/offers/2.0.0"),
            Concern::Calls => StreamProtocol::new("/flotilla/calls/1.0.0"),
            Concern::Jobs => StreamProtocol::new("/flotilla/jobs/1.0.0"),
        }
    }
}

impl std::fmt::Display for Concern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.protocol().as_ref())
    }
}
/// Largest request accepted, in bytes.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Largest response accepted, in bytes.
pub const MAX_RESPONSE_BYTES: usize = 512 * 1024;
/// Requests open at once on one connection, each way. A call holds its stream while its
/// function runs, so this bounds the calls one peer has in flight through another; it
/// matches what a scheduler takes at once (inbound: at most 512 × 64 KiB of requests).
pub const MAX_STREAMS_PER_CONNECTION: usize = 512;

/// Why a request got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RpcError {
    /// The peer could not be dialled.
    #[error("cannot reach {0}")]
    Unreachable(PeerId),
    /// No answer came in time.
    #[error("{0} did not answer in time")]
    Timeout(PeerId),
    /// The peer does not speak the protocol.
    #[error("{0} does not speak {1}")]
    Unsupported(PeerId, Concern),
    /// The stream failed (closed, reset, or a message over its bound).
    #[error("request to {peer} failed: {reason}")]
    Failed {
        /// The peer.
        peer: PeerId,
        /// Why.
        reason: String,
    },
    /// A request to ourselves, which the caller must serve locally.
    #[error("a request to ourselves")]
    ToSelf,
    /// The network task has stopped.
    #[error("the network task has stopped")]
    Stopped,
}

impl RpcError {
    pub(crate) fn from_failure(
        peer: PeerId,
        concern: Concern,
        failure: OutboundFailure,
    ) -> RpcError {
        match failure {
            OutboundFailure::DialFailure => RpcError::Unreachable(peer),
            OutboundFailure::Timeout => RpcError::Timeout(peer),
            OutboundFailure::UnsupportedProtocols => RpcError::Unsupported(peer, concern),
            // Streams are negotiated lazily (`V1Lazy`), so a peer's "no" to the protocol
            // arrives as the stream's first read failing.
            OutboundFailure::Io(e) if refused_protocol(&e) => RpcError::Unsupported(peer, concern),
            other => RpcError::Failed {
                peer,
                reason: other.to_string(),
            },
        }
    }
}

/// Whether `error` is multistream-select's "no protocol agreed upon".
pub(crate) fn refused_protocol(error: &io::Error) -> bool {
    use libp2p::core::upgrade::NegotiationError;
    error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<NegotiationError>())
        .is_some_and(|e| matches!(e, NegotiationError::Failed))
}

/// A response on its way back: its concern, the channel it answers, its bytes.
pub(crate) type Outgoing = (Concern, ResponseChannel<Vec<u8>>, Vec<u8>);

/// A request from another peer, waiting for its response.
pub struct InboundRequest {
    /// Who sent it.
    pub peer: PeerId,
    /// The protocol it came on.
    pub concern: Concern,
    /// Its bytes (at most [`MAX_REQUEST_BYTES`]).
    pub bytes: Vec<u8>,
    pub(crate) reply: Reply,
}

/// Where a request's response goes: back through the swarm, or onto the link it came
/// on.
pub(crate) enum Reply {
    /// Request-response: the swarm's task sends it on the request's own stream.
    Swarm {
        channel: ResponseChannel<Vec<u8>>,
        respond: mpsc::Sender<Outgoing>,
    },
    /// A link ([`crate::link`]): written straight onto it.
    Link(crate::link::Responder),
}

impl InboundRequest {
    /// Refuses it: a request-response sender sees its request fail, one on a link gets
    /// a refusal frame.
    pub(crate) fn refuse(self) {
        match self.reply {
            Reply::Swarm { .. } => {}
            Reply::Link(responder) => responder.refuse(),
        }
    }

    /// Whether it came on a link ([`crate::link`]) rather than by request-response.
    pub fn on_link(&self) -> bool {
        matches!(self.reply, Reply::Link(_))
    }

    /// Sends `bytes` back as the response. Fails only if the network has stopped; a
    /// requester that has gone away is not an error.
    pub async fn respond(self, bytes: Vec<u8>) -> Result<(), RpcError> {
        match self.reply {
            Reply::Swarm { channel, respond } => respond
                .send((self.concern, channel, bytes))
                .await
                .map_err(|_| RpcError::Stopped),
            Reply::Link(responder) => {
                responder.answer(bytes);
                Ok(())
            }
        }
    }
}

/// The queues of requests other peers send, one per concern, each a line per peer
/// served round robin ([`crate::fair`]).
pub struct Inbound {
    /// Requests on [`Concern::Offers`].
    pub offers: FairReceiver<InboundRequest>,
    /// Requests on [`Concern::Calls`].
    pub calls: FairReceiver<InboundRequest>,
    /// Requests on [`Concern::Jobs`].
    pub jobs: FairReceiver<InboundRequest>,
}

/// The share of a concern's queue one peer may fill: a quarter.
pub const QUEUE_SHARE: usize = 4;

/// Puts `request` in its concern's queue `queue`; one refused, or pushed out for
/// another peer's, is refused to its sender at once (a request-response sender sees a
/// failed request, one on a link a refusal frame). Answers whether it was queued.
pub(crate) fn enqueue(queue: &FairSender<InboundRequest>, request: InboundRequest) -> bool {
    let peer = request.peer;
    match queue.push(peer, request) {
        Pushed::Queued => true,
        Pushed::Displaced(other) => {
            tracing::debug!(peer = %other.peer, concern = %other.concern, "request pushed out of a full queue");
            other.refuse();
            true
        }
        Pushed::Refused(request) | Pushed::Closed(request) => {
            tracing::debug!(%peer, concern = %request.concern, "inbound queue full for this peer; request refused");
            request.refuse();
            false
        }
    }
}

/// Requests and responses as byte strings, each bounded, read until the writer closes.
#[derive(Debug, Clone, Copy, Default)]
pub struct BytesCodec;

async fn read_bounded<T: AsyncRead + Unpin + Send>(
    io: &mut T,
    limit: usize,
) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    io.take(limit as u64 + 1).read_to_end(&mut bytes).await?;
    if bytes.len() > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message over {limit} bytes"),
        ));
    }
    Ok(bytes)
}

async fn write_bounded<T: AsyncWrite + Unpin + Send>(
    io: &mut T,
    bytes: &[u8],
    limit: usize,
) -> io::Result<()> {
    if bytes.len() > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("message over {limit} bytes"),
        ));
    }
    io.write_all(bytes).await?;
    io.close().await
}

impl request_response::Codec for BytesCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        read_bounded(io, MAX_REQUEST_BYTES).await
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        read_bounded(io, MAX_RESPONSE_BYTES).await
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        request: Vec<u8>,
    ) -> io::Result<()> {
        write_bounded(io, &request, MAX_REQUEST_BYTES).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        response: Vec<u8>,
    ) -> io::Result<()> {
        write_bounded(io, &response, MAX_RESPONSE_BYTES).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;
    use request_response::Codec;

    #[tokio::test]
    async fn messages_round_trip_and_oversize_ones_are_refused() {
        let mut codec = BytesCodec;
        let mut wire = Cursor::new(Vec::new());
        codec
            .write_request(&Concern::Offers.protocol(), &mut wire, b"hello".to_vec())
            .await
            .unwrap();
        let mut read = Cursor::new(wire.into_inner());
        assert_eq!(
            codec
                .read_request(&Concern::Offers.protocol(), &mut read)
                .await
                .unwrap(),
            b"hello"
        );
        let mut big = Cursor::new(vec![0u8; MAX_REQUEST_BYTES + 1]);
        let err = codec
            .read_request(&Concern::Offers.protocol(), &mut big)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let mut sink = Cursor::new(Vec::new());
        assert!(
            codec
                .write_response(
                    &Concern::Offers.protocol(),
                    &mut sink,
                    vec![0u8; MAX_RESPONSE_BYTES + 1]
                )
                .await
                .is_err()
        );
    }
}
