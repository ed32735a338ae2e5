//! Invocations: the scheduler that places a call on a volunteer (retrying another when one
//! fails), and the client that picks a scheduler at random from the registry and asks it.
//!
//! A scheduler drives a [`Placer`] (in `flotilla-scheduler`), which decides everything:
//! offers confirmed free a moment ago first, else a discovery; the ranked offers, each
//! asked to reserve the call's memory and run it in one `Execute` message; a volunteer
//! that fails, times out or disappears is skipped and the call placed again, at most
//! [`MAX_ATTEMPTS`] times; a failure that is the call's own (a module that is not Wasm, an
//! input nobody has) is returned at once. This module carries out its steps and returns
//! the answer with where the time went and how many exchanges it cost. Every invocation has a random id: a
//! client that retries through another scheduler, or a scheduler that asks a volunteer
//! again, gets the one run's answer.

use super::function::{Execution, FailedAttempt, FunctionCall, Invocation, MAX_TIMEOUT_MS};
use super::metrics::MarketMetrics;
use super::protocol::{ExecuteRequest, InvokeRequest, MAX_EXCLUDED, Request, Response};
use super::receipts::{self, SignatureCheck};
use super::scheduling::{Exchanges, Heard};
use super::slots::Slot;
use super::{CallError, Market, lock};
use flotilla_api::receipt::ReceiptError;
use flotilla_offers::offer::SignedOffer;
use flotilla_scheduler::placement::Policy;
use flotilla_scheduler::placer::{self, Outcome, PlaceError, Placer, PlacerConfig};
use flotilla_scheduler::registry;
use libp2p::PeerId;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use std::time::{Duration, Instant};
use tracing::Instrument;

/// Volunteers a scheduler tries for one call.
pub const MAX_ATTEMPTS: usize = 3;
/// How long ago an offerer must have told of an offer for it to be tried before any
/// discovery (in the answer to an earlier call, or its report).
const RECENT_OFFER_MS: u64 = 2_000;
/// Time a placement's own work (discoveries, reservation attempts) may take in all.
const PLACEMENT_BUDGET: Duration = Duration::from_secs(20);
/// Offers one placement asks to reserve, at most.
const MAX_RESERVATIONS_PER_CALL: u32 = 16;
const MIB: u64 = 1024 * 1024;
/// Time allowed beyond the deadline and the fetches for storing outputs and answering.
const ANSWER_MARGIN: Duration = Duration::from_secs(30);
/// Time a client allows for discovery and placement on top of the run itself.
const PLACEMENT_ALLOWANCE: Duration = Duration::from_secs(60);
/// Schedulers a client tries before giving up.
const SCHEDULER_ATTEMPTS: usize = 3;
/// Times a client asks again after refusing an answer for its receipt.
const RECEIPT_RETRIES: usize = 2;

/// What one invocation through a scheduler came to.
enum Attempt {
    /// An answer whose receipt checks.
    Answered(Box<Invocation>),
    /// The answer to invocation `invocation_id`, refused for its receipt, from
    /// `volunteer`.
    Refused {
        /// The invocation answered.
        invocation_id: u64,
        /// The volunteer the answer names.
        volunteer: PeerId,
        /// What is wrong with its receipt.
        error: ReceiptError,
    },
}

/// Why an invocation did not run.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    /// The call is malformed or impossible.
    #[error("{0}")]
    Rejected(String),
    /// No scheduler is registered.
    #[error(
        "no scheduler found in the registry (start a node with --scheduler, or wait until one has joined)"
    )]
    NoScheduler,
    /// The call could not be placed or run.
    #[error("{reason}")]
    Failed {
        /// Why, in one line.
        reason: String,
        /// Whether trying again later might succeed (nothing fits now, volunteers
        /// failed), as opposed to a fault of the call itself.
        retryable: bool,
    },
    /// Every scheduler tried failed to answer.
    #[error("no scheduler answered ({0})")]
    Unanswered(String),
    /// The answer's receipt is missing, forged, or not for this call and answer.
    #[error("the answer was refused: {0}")]
    BadReceipt(ReceiptError),
    /// The replicas of a call disagreed with no majority.
    #[error("{0}")]
    NoMajority(String),
}

/// How long a run of `call` may take on a volunteer, fetches and answer included (a call
/// that names no deadline gets the volunteer's default, which is at most the longest).
fn execution_allowance(call: &FunctionCall, fetch_timeout: Duration) -> Duration {
    let run = call
        .timeout_ms
        .map_or(Duration::from_millis(MAX_TIMEOUT_MS), Duration::from_millis);
    let fetches = 2 + call.inputs.len() as u32;
    run + fetch_timeout * fetches + ANSWER_MARGIN
}

impl Market {
    /// A place for one more invocation of `from`'s, or `None` when as many run as
    /// allowed, or `from` holds its share.
    pub(super) fn invocation_slot(&self, from: PeerId) -> Option<Slot> {
        self.shared.invocations_taken.take(from)
    }

    /// The answer to a call this node cannot take as scheduler: it is none, or the call
    /// is out of bounds.
    pub(super) fn refuse_call(&self, call: &FunctionCall) -> Option<Response> {
        if !self.is_scheduler() {
            return Some(Response::Refused {
                reason: "this node is not a scheduler".into(),
            });
        }
        call.validate().err().map(|e| Response::Failed {
            reason: e.to_string(),
            retryable: false,
        })
    }

    /// Places and runs a client's call (once per invocation id) in the place `_slot`
    /// holds.
    pub(super) async fn serve_invocation(
        &self,
        from: PeerId,
        request: InvokeRequest,
        _slot: Slot,
    ) -> Response {
        if let Some(refusal) = self.refuse_call(&request.call) {
            return refusal;
        }
        if request.exclude.len() > MAX_EXCLUDED {
            return Response::Failed {
                reason: format!(
                    "{} volunteers excluded (at most {MAX_EXCLUDED})",
                    request.exclude.len()
                ),
                retryable: false,
            };
        }
        if let Some(refused) = request.refused {
            self.check_refused(from, refused);
        }
        let id = request.invocation_id;
        // A remote client checks the receipt's signature itself; this node's own calls
        // have only this check.
        let signature_check = if from == self.peer_id() {
            SignatureCheck::BeforeAnswering
        } else {
            SignatureCheck::ByTheClient
        };
        let span = tracing::info_span!(
            "place",
            invocation = id,
            mib = request.call.memory_mib,
            module = %request.call.module
        );
        self.shared
            .invocations
            .run(
                (from, id),
                self.place_and_run(from, request, signature_check)
                    .instrument(span),
            )
            .await
    }

    /// Places a call on a volunteer and runs it, as the [`Placer`] decides.
    /// Its discoveries take places among the placements within `from`'s share. The
    /// answer's receipt is checked in full, but for its signature when `signature_check`
    /// leaves that to the client.
    pub(super) async fn place_and_run(
        &self,
        from: PeerId,
        request: InvokeRequest,
        signature_check: SignatureCheck,
    ) -> Response {
        let started = Instant::now();
        let metrics = &self.shared.metrics;
        metrics.invocations.inc();
        let mut rng = StdRng::from_os_rng();
        let call = &request.call;
        let config = PlacerConfig {
            discovery: self.discovery_config(request.max_tries),
            policy: request.placement.unwrap_or(self.shared.config.placement),
            max_attempts: MAX_ATTEMPTS as u32,
            max_reservations: MAX_RESERVATIONS_PER_CALL,
            budget_ms: PLACEMENT_BUDGET.as_millis() as u64,
        };
        let bytes = u64::from(call.memory_mib) * MIB;
        let mib = call.memory_mib;
        // Volunteers that ran another replica of this call are left out from the start.
        let replicas_ran = request.exclude.clone();
        let recent = self
            .with(move |m, now| {
                m.super_traders.as_ref().map_or(Vec::new(), |l| {
                    l.recent(now, mib, RECENT_OFFER_MS, &replicas_ran, &mut rand::rng())
                })
            })
            .await
            .unwrap_or_default();
        let (mut placer, mut step) =
            match Placer::start(self.now(), bytes, config, recent, &mut rng) {
                Ok(started) => started,
                Err(e) => {
                    metrics.invocations_failed.inc();
                    return Response::Failed {
                        reason: e.to_string(),
                        retryable: e.retryable(),
                    };
                }
            };
        let allowance = execution_allowance(call, self.shared.config.fetch_timeout);
        let mut exchanges = Exchanges::default();
        let mut discover_us = 0;
        let mut execution = None;
        // The offer that served and its newer version, learnt once the answer has gone
        // (the newer version's signature, checked then, is off the answer's path).
        let mut served = None;
        // Discoveries take a place among the placements; runs do not.
        let mut placing = None;
        loop {
            step = match step {
                placer::Step::Discovery(discovery_step) => {
                    if placing.is_none() {
                        placing = Some(self.shared.placements.acquire(from).await);
                    }
                    let discovering = Instant::now();
                    let (deadline, mib, mut excluded) = placer
                        .discovery()
                        .map_or((self.now(), call.memory_mib, Vec::new()), |d| {
                            (d.deadline_ms(), d.request_mib(), d.excluded().to_vec())
                        });
                    excluded.extend(request.exclude.iter().copied());
                    let probed = self
                        .probe(discovery_step, deadline, mib, excluded, &mut exchanges)
                        .await;
                    discover_us += discovering.elapsed().as_micros() as u64;
                    probed.feed_placer(self.now(), &mut placer, &mut rng)
                }
                placer::Step::Run { offer } => {
                    placing = None;
                    let volunteer = offer.body.offerer;
                    if request.exclude.contains(&volunteer) {
                        // It ran another replica of this call: the next offer.
                        let reason = format!("{volunteer} ran another replica");
                        step = placer.on_refused(self.now(), reason, &mut rng);
                        continue;
                    }
                    let sent = ExecuteRequest {
                        invocation_id: request.invocation_id,
                        reservation_id: rng.next_u64() >> 1,
                        offer_id: Some(offer.body.offer_id),
                        call: call.clone(),
                    };
                    let execute = Request::Execute(Box::new(sent.clone()));
                    exchanges.count(self, volunteer);
                    let addresses = offer.body.addresses.clone();
                    let answer = self.call(volunteer, addresses, execute, allowance).await;
                    let newer = match &answer {
                        Ok(Response::Executed {
                            offer: Some(newer), ..
                        }) => Some(&**newer),
                        _ => None,
                    };
                    // An answer counts only with a receipt the volunteer signed for this
                    // very call and reservation; a volunteer that signs what it did not
                    // answer is forgotten like one that did not answer.
                    let receipt = match (&answer, signature_check) {
                        (
                            Ok(Response::Executed { execution: ran, .. }),
                            SignatureCheck::BeforeAnswering,
                        ) => Some(receipts::check_from_volunteer(volunteer, &sent, ran)),
                        (
                            Ok(Response::Executed { execution: ran, .. }),
                            SignatureCheck::ByTheClient,
                        ) => Some(receipts::check_but_signature(volunteer, &sent, ran)),
                        _ => None,
                    };
                    let heard = match (&answer, &receipt) {
                        (Ok(_), Some(Ok(()))) => Heard::Served,
                        (Ok(_), Some(Err(_))) | (Err(_), _) => Heard::Silent,
                        (Ok(_), None) => Heard::Declined,
                    };
                    if heard == Heard::Served {
                        served = Some((offer.clone(), newer.cloned()));
                    } else {
                        self.learn_version(&offer, newer, heard).await;
                    }
                    let now = self.now();
                    match answer {
                        Ok(Response::Executed { execution: ran, .. }) => {
                            // Only an answer with a receipt the volunteer signed for this
                            // very call and reservation is passed on (or recorded).
                            match receipt.unwrap_or(Err(ReceiptError::Missing)) {
                                Ok(()) => {
                                    execution = Some(ran);
                                    placer.on_ran(now)
                                }
                                Err(e) => {
                                    tracing::warn!(%volunteer, error = %e, "bad receipt; placing the call again");
                                    metrics.invocation_retries.inc();
                                    placer.on_failed(now, e.to_string(), true, &mut rng)
                                }
                            }
                        }
                        Ok(Response::Refused { reason }) => {
                            placer.on_refused(now, reason, &mut rng)
                        }
                        Ok(Response::Busy) => placer.on_refused(now, "busy".into(), &mut rng),
                        Ok(Response::Failed { reason, retryable }) => {
                            if retryable {
                                tracing::info!(%volunteer, %reason, "volunteer failed; placing the call again");
                                metrics.invocation_retries.inc();
                            }
                            placer.on_failed(now, reason, retryable, &mut rng)
                        }
                        Ok(other) => {
                            let reason = format!("unexpected answer {other:?}");
                            placer.on_failed(now, reason, true, &mut rng)
                        }
                        Err(e) => {
                            metrics.invocation_retries.inc();
                            placer.on_failed(now, e.to_string(), true, &mut rng)
                        }
                    }
                }
                placer::Step::Done => break,
            };
        }
        let tally = placer.tally().clone();
        let failed_attempts: Vec<FailedAttempt> = tally
            .failed_attempts
            .iter()
            .map(|a| FailedAttempt {
                volunteer: a.volunteer.to_string(),
                error: a.error.clone(),
            })
            .collect();
        match (placer.outcome(), execution) {
            (Some(Outcome::Placed { volunteer }), Some(ran)) => {
                metrics
                    .invocation_seconds
                    .observe(started.elapsed().as_secs_f64());
                // The peer that answered ran it, whatever its answer claims.
                let execution = Execution {
                    volunteer: volunteer.to_string(),
                    ..*ran
                };
                if let Some((offer, newer)) = served {
                    self.learn_after_answering(
                        from,
                        request.invocation_id,
                        offer,
                        newer,
                        &execution,
                        signature_check,
                    );
                }
                Response::Invoked(Box::new(Invocation {
                    invocation_id: request.invocation_id,
                    scheduler: self.peer_id().to_string(),
                    execution,
                    failed_attempts,
                    discover_us,
                    scheduler_us: started.elapsed().as_micros() as u64,
                    messages: tally.messages + exchanges.lookups,
                    memoized: false,
                    probes: tally.probes,
                    exchanges: exchanges.total(),
                }))
            }
            (Some(Outcome::Failed(e)), _) => {
                metrics.invocations_failed.inc();
                let reason = match e {
                    PlaceError::Call(reason) => reason.clone(),
                    other => with_attempts(other.to_string(), &failed_attempts),
                };
                Response::Failed {
                    reason,
                    retryable: e.retryable(),
                }
            }
            _ => {
                metrics.invocations_failed.inc();
                Response::Failed {
                    reason: "the placement ended without an answer".into(),
                    retryable: true,
                }
            }
        }
    }

    /// Learns, once the answer has gone, what the run on `offer` says of its offerer (it
    /// served) and of its offers (its `newer` version). With
    /// [`SignatureCheck::ByTheClient`] the receipt `execution` carries, its signature
    /// unchecked here, is kept until the client reports refusing it or the
    /// [`unchecked`](super::unchecked) table lets it go.
    fn learn_after_answering(
        &self,
        client: PeerId,
        invocation_id: u64,
        offer: Box<SignedOffer>,
        newer: Option<SignedOffer>,
        execution: &Execution,
        signature_check: SignatureCheck,
    ) {
        let volunteer = offer.body.offerer;
        if signature_check == SignatureCheck::ByTheClient
            && let Some(receipt) = execution.receipt.clone()
        {
            lock(&self.shared.unchecked).keep(client, invocation_id, volunteer, receipt);
        }
        let market = self.clone();
        self.spawn(async move {
            market
                .learn_version(&offer, newer.as_ref(), Heard::Served)
                .await;
        });
    }

    /// Checks the receipt this node passed on unchecked to `client` for its invocation
    /// `invocation_id`, which the client says it refused: if the signature does not
    /// verify, its volunteer is forgotten as one that failed.
    fn check_refused(&self, client: PeerId, invocation_id: u64) {
        let Some((volunteer, receipt)) = lock(&self.shared.unchecked).take(client, invocation_id)
        else {
            return;
        };
        let market = self.clone();
        self.spawn(async move {
            let verdict = match receipt.verify_by(&volunteer) {
                Ok(()) => "valid",
                Err(e) => {
                    tracing::warn!(%volunteer, %client, error = %e, "a client refused a receipt that does not verify; forgetting the volunteer");
                    market.forget_offerer(volunteer).await;
                    "forged"
                }
            };
            MarketMetrics::count(&market.shared.metrics.receipt_reports, verdict);
        });
    }

    /// Runs `call` on the network: through a scheduler picked at random from the registry,
    /// trying another (with the same invocation id) if it does not answer. The answer
    /// comes with the volunteer's receipt, checked against the call and the answer.
    pub async fn invoke(
        &self,
        call: FunctionCall,
        max_tries: Option<u32>,
        placement: Option<Policy>,
    ) -> Result<Invocation, InvokeError> {
        self.invoke_excluding(call, max_tries, placement, Vec::new())
            .await
    }

    /// [`Market::invoke`], on none of the volunteers `exclude` names. An answer whose
    /// receipt does not check is refused, and the call asked again without its
    /// volunteer, at most [`RECEIPT_RETRIES`] times; the refusals show among the
    /// invocation's failed attempts.
    pub(super) async fn invoke_excluding(
        &self,
        call: FunctionCall,
        max_tries: Option<u32>,
        placement: Option<Policy>,
        mut exclude: Vec<PeerId>,
    ) -> Result<Invocation, InvokeError> {
        call.validate()
            .map_err(|e| InvokeError::Rejected(e.to_string()))?;
        let mut refused = Vec::new();
        let mut last_refused = None;
        loop {
            let attempt = self
                .invoke_once(
                    call.clone(),
                    max_tries,
                    placement,
                    exclude.clone(),
                    last_refused,
                )
                .await?;
            match attempt {
                Attempt::Answered(mut invocation) => {
                    invocation.failed_attempts.splice(0..0, refused);
                    return Ok(*invocation);
                }
                Attempt::Refused {
                    invocation_id,
                    volunteer,
                    error,
                } => {
                    tracing::warn!(%volunteer, %error, "refused an answer for its receipt");
                    if refused.len() >= RECEIPT_RETRIES || exclude.len() >= MAX_EXCLUDED {
                        return Err(InvokeError::BadReceipt(error));
                    }
                    refused.push(FailedAttempt {
                        volunteer: volunteer.to_string(),
                        error: format!("the answer was refused: {error}"),
                    });
                    exclude.push(volunteer);
                    // The scheduler that answered checks what it passed on.
                    last_refused = Some(invocation_id);
                }
            }
        }
    }

    /// One invocation of `call` through a scheduler, with a fresh invocation id, telling
    /// it of the answer to invocation `refused` if its receipt was refused.
    async fn invoke_once(
        &self,
        call: FunctionCall,
        max_tries: Option<u32>,
        placement: Option<Policy>,
        exclude: Vec<PeerId>,
        refused: Option<u64>,
    ) -> Result<Attempt, InvokeError> {
        let mut rng = StdRng::from_os_rng();
        let request = InvokeRequest {
            invocation_id: rng.next_u64() >> 1,
            call,
            max_tries,
            placement,
            exclude,
            refused,
        };
        let timeout = execution_allowance(&request.call, self.shared.config.fetch_timeout)
            * MAX_ATTEMPTS as u32
            + PLACEMENT_ALLOWANCE;
        let ask = || Request::Invoke(Box::new(request.clone()));
        let span = tracing::info_span!("invoke", invocation = request.invocation_id);
        let (scheduler, answer) = self
            .ask_a_scheduler_who(ask, timeout)
            .instrument(span)
            .await?;
        match answer {
            Response::Invoked(mut invocation) => {
                // The exchange with the scheduler, unless this node placed it itself.
                if invocation.scheduler != self.peer_id().to_string() {
                    invocation.exchanges += 1;
                }
                if invocation.invocation_id != request.invocation_id {
                    return Err(InvokeError::BadReceipt(ReceiptError::Mismatch(
                        "invocation id",
                    )));
                }
                // This node's own scheduler checked the receipt before answering
                // (`place_and_run`); another's answer is checked here, since a scheduler
                // is a stranger too (and an honest one leaves the signature to the
                // client, checking it only if the client reports refusing it).
                if scheduler != self.peer_id() {
                    let checked = receipts::check_for_client(
                        request.invocation_id,
                        &request.call,
                        &invocation.execution,
                    );
                    if let Err(error) = checked {
                        // An answer that names no volunteer is the scheduler's fault.
                        let volunteer = invocation
                            .execution
                            .volunteer
                            .parse::<PeerId>()
                            .map_err(|_| InvokeError::BadReceipt(error.clone()))?;
                        return Ok(Attempt::Refused {
                            invocation_id: request.invocation_id,
                            volunteer,
                            error,
                        });
                    }
                }
                Ok(Attempt::Answered(invocation))
            }
            Response::Failed { reason, retryable } => {
                Err(InvokeError::Failed { reason, retryable })
            }
            other => Err(InvokeError::Unanswered(format!(
                "unexpected answer {other:?}"
            ))),
        }
    }

    /// Sends a request to this node if it is a scheduler, else to a scheduler picked at
    /// random from the registry, and to another (at most [`SCHEDULER_ATTEMPTS`] in all)
    /// while the one asked is busy, refuses, or does not answer; returns the first other
    /// answer.
    pub(super) async fn ask_a_scheduler(
        &self,
        request: impl Fn() -> Request,
        timeout: Duration,
    ) -> Result<Response, InvokeError> {
        Ok(self.ask_a_scheduler_who(request, timeout).await?.1)
    }

    /// [`Market::ask_a_scheduler`], with the scheduler that answered.
    async fn ask_a_scheduler_who(
        &self,
        request: impl Fn() -> Request,
        timeout: Duration,
    ) -> Result<(PeerId, Response), InvokeError> {
        let mut rng = StdRng::from_os_rng();
        let mut failures = Vec::new();
        let mut failed: Option<PeerId> = None;
        for attempt in 0..SCHEDULER_ATTEMPTS {
            // A scheduler places its own calls first: no exchange with another, and no
            // stranger to trust with the answer.
            let scheduler = if attempt == 0 && self.is_scheduler() {
                self.peer_id()
            } else {
                let mut schedulers = self.schedulers().await;
                let presence = self.shared.network.presence();
                // Schedulers the peers we are connected to announced in identify too,
                // unless a configured list of trusted schedulers overrides the rest.
                if self.shared.config.trusted_schedulers.is_empty() {
                    for peer in presence.announced_schedulers() {
                        if !schedulers.contains(&peer) && peer != self.peer_id() {
                            schedulers.push(peer);
                        }
                    }
                }
                // Connected schedulers first: a registry filled with PeerIds nobody
                // can reach (or that left) does not hide the ones that answer.
                let reachable = |p: &PeerId| presence.is_connected(p);
                let picked =
                    registry::pick_reachable(&schedulers, reachable, failed.as_ref(), &mut rng);
                let Some(picked) = picked else {
                    return Err(InvokeError::NoScheduler);
                };
                picked
            };
            match self.call(scheduler, Vec::new(), request(), timeout).await {
                Ok(Response::Refused { reason }) => {
                    failures.push(format!("{scheduler} refused: {reason}"));
                }
                Ok(Response::Busy) => failures.push(format!("{scheduler} is busy")),
                Ok(answer) => return Ok((scheduler, answer)),
                Err(e) => {
                    if matches!(e, CallError::Rpc(_) | CallError::Timeout(_)) {
                        self.forget_scheduler(&scheduler);
                    }
                    failures.push(e.to_string());
                }
            }
            failed = Some(scheduler);
        }
        Err(InvokeError::Unanswered(failures.join("; ")))
    }
}

/// `reason`, followed by what the volunteers tried before said.
fn with_attempts(reason: String, attempts: &[FailedAttempt]) -> String {
    if attempts.is_empty() {
        return reason;
    }
    let tried: Vec<String> = attempts
        .iter()
        .map(|a| format!("{}: {}", a.volunteer, a.error))
        .collect();
    format!("{reason} (tried {})", tried.join("; "))
}
