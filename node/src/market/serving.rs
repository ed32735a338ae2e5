//! Answering other peers: one protocol per concern — offers, calls, jobs — each read from
//! its own queue by its own task and answered by its own handler, so a flood of one
//! concern cannot hold up another; each queue is a line per peer served round robin
//! (`flotilla_overlay::fair`), so a flood of one peer cannot hold up another. A request that arrives on another concern's protocol
//! is refused. Calls to this node itself come to the same handlers in-process
//! ([`Market::handle`]), without a wire round trip.

use super::Market;
use super::protocol::{
    Concern, Request, RequestEnvelope as Envelope, Response, decode_request, encode_response,
};
use flotilla_overlay::fair::FairReceiver;
use flotilla_overlay::rpc::{Inbound, InboundRequest};
use futures::FutureExt;
use futures::future::BoxFuture;
use libp2p::PeerId;
use std::time::Duration;

impl Market {
    /// Starts a task per concern answering its queue until the node stops.
    pub(super) fn serve_all(&self, inbound: Inbound) {
        self.spawn(self.clone().serve(Concern::Offers, inbound.offers));
        self.spawn(self.clone().serve(Concern::Calls, inbound.calls));
        self.spawn(self.clone().serve(Concern::Jobs, inbound.jobs));
    }

    /// Answers `concern`'s requests, one at a time; calls, which take many round trips
    /// or a whole run, go on beside it (as many as their bounds allow).
    async fn serve(self, concern: Concern, mut inbound: FairReceiver<InboundRequest>) {
        while let Some(request) = inbound.recv().await {
            let envelope = match decode_request(&request.bytes) {
                Ok(envelope) if envelope.request.concern() == concern => envelope,
                Ok(envelope) => {
                    let reason = format!(
                        "this request belongs on {}, not {concern}",
                        envelope.request.concern()
                    );
                    self.refuse(request, envelope.id, reason).await;
                    continue;
                }
                Err(e) => {
                    self.refuse(request, 0, e.to_string()).await;
                    continue;
                }
            };
            match concern {
                Concern::Offers => {
                    let response = self.handle_offers(request.peer, envelope.request).await;
                    let _ = request
                        .respond(encode_response(envelope.id, response))
                        .await;
                }
                Concern::Jobs => {
                    let response = self.handle_jobs(request.peer, envelope.request).await;
                    let _ = request
                        .respond(encode_response(envelope.id, response))
                        .await;
                }
                Concern::Calls => self.take_call(request, envelope).await,
            }
        }
    }

    /// Refuses a request that is malformed or on the wrong protocol.
    async fn refuse(&self, request: InboundRequest, id: u64, reason: String) {
        self.shared.metrics.malformed.inc();
        tracing::debug!(peer = %request.peer, %reason, "request refused");
        let refusal = Response::Refused { reason };
        let _ = request.respond(encode_response(id, refusal)).await;
    }

    /// Starts serving a call beside the queue, if there is room; else answers busy, so
    /// the client asks another scheduler.
    async fn take_call(&self, request: InboundRequest, envelope: Envelope) {
        let from = request.peer;
        let serving: Option<BoxFuture<'static, Response>> = match envelope.request {
            Request::Discover(discover) => self.discovery_slot(from).map(|slot| {
                let market = self.clone();
                let serving = async move { market.serve_discovery(discover, slot).await };
                self.until_asker_leaves(from, serving)
            }),
            Request::Invoke(invoke) => self.invocation_slot(from).map(|slot| {
                let market = self.clone();
                let serving = async move { market.serve_invocation(from, *invoke, slot).await };
                self.until_asker_leaves(from, serving)
            }),
            // Bounded before admission (which then bounds runs by the memory lent).
            Request::Execute(execute) => self.execution_slot(from).map(|slot| {
                let market = self.clone();
                async move {
                    let answer = market.serve_execution(from, *execute).await;
                    drop(slot);
                    answer
                }
                .boxed()
            }),
            other => Some(futures::future::ready(not_of(Concern::Calls, &other)).boxed()),
        };
        match serving {
            Some(serving) => self.spawn(async move {
                let response = serving.await;
                let _ = request
                    .respond(encode_response(envelope.id, response))
                    .await;
            }),
            None => {
                let _ = request
                    .respond(encode_response(envelope.id, Response::Busy))
                    .await;
            }
        }
    }

    /// Runs `serving` for `from` until it ends or `from` has no connection left: then it
    /// is dropped, and with it the probes, reservations and places it held, since nobody
    /// waits for its answer any more.
    fn until_asker_leaves(
        &self,
        from: PeerId,
        serving: impl std::future::Future<Output = Response> + Send + 'static,
    ) -> BoxFuture<'static, Response> {
        let left = self.shared.network.presence().until_left(&from);
        let metrics = self.shared.metrics.clone();
        async move {
            tokio::select! {
                response = serving => response,
                _ = left.cancelled() => {
                    metrics.abandoned.inc();
                    tracing::debug!(peer = %from, "the asker left; its request is dropped");
                    Response::Refused { reason: "the asker left".into() }
                }
            }
        }
        .boxed()
    }

    /// Answers one request from `from` (this node itself for in-process calls) with its
    /// concern's handler.
    pub(super) async fn handle(&self, from: PeerId, request: Request) -> Response {
        match request.concern() {
            Concern::Offers => self.handle_offers(from, request).await,
            Concern::Calls => self.handle_calls(from, request).await,
            Concern::Jobs => self.handle_jobs(from, request).await,
        }
    }

    /// The offers protocol: holding offers, probes, reports, reservations.
    async fn handle_offers(&self, from: PeerId, request: Request) -> Response {
        match request {
            Request::Offer { key, offer } => self.hold_offer(from, key, offer).await,
            Request::FindOffers { tier, min_free_mib } => {
                self.find_offers(tier, min_free_mib).await
            }
            Request::Notify { offers } => self.take_notification(from, offers).await,
            Request::Reserve {
                reservation_id,
                offer_id,
                mib,
                hold_ms,
            } => {
                self.reserve(from, reservation_id, offer_id, mib, hold_ms)
                    .await
            }
            Request::Release { reservation_id } => self.release(from, reservation_id).await,
            other => not_of(Concern::Offers, &other),
        }
    }

    /// The calls protocol, for a call to this node itself (from the network, calls are
    /// taken by `take_call`).
    async fn handle_calls(&self, from: PeerId, request: Request) -> Response {
        match request {
            Request::Discover(request) => match self.discovery_slot(from) {
                Some(slot) => self.serve_discovery(request, slot).await,
                None => Response::Busy,
            },
            Request::Invoke(request) => match self.invocation_slot(from) {
                Some(slot) => self.serve_invocation(from, *request, slot).await,
                None => Response::Busy,
            },
            Request::Execute(request) => self.serve_execution(from, *request).await,
            other => not_of(Concern::Calls, &other),
        }
    }

    /// The jobs protocol: submissions, and the records peers keep.
    async fn handle_jobs(&self, from: PeerId, request: Request) -> Response {
        match request {
            Request::Submit { request, wait_ms } => {
                self.take_job(from, *request, Duration::from_millis(wait_ms))
                    .await
            }
            Request::StoreJob(job) => self.store_job(from, *job).await,
            Request::FindJob { job_id } => self.held_job(job_id).await,
            Request::StoreMemo(memo) => self.store_memo(from, *memo).await,
            Request::FindMemo { digest } => self.held_memos(digest).await,
            other => not_of(Concern::Jobs, &other),
        }
    }
}

/// The answer to a request handed to another concern's handler (a bug of ours, never
/// the peer's: `serve` sorts requests by concern first).
fn not_of(concern: Concern, request: &Request) -> Response {
    Response::Refused {
        reason: format!("a {} request is not one of {concern}", request.concern()),
    }
}
