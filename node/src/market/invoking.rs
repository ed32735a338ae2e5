//! Invocations: the scheduler that places a call on a volunteer (retrying another when one
//! fails), and the client that picks a scheduler at random from the registry and asks it.
//!
//! A scheduler discovers offers and reserves one in a single discovery, sends the call to
//! the offerer with the reservation's id, and returns its answer with where the time went.
//! A volunteer that fails, times out or disappears is skipped and the call placed again,
//! at most [`MAX_ATTEMPTS`] times; a failure that is the call's own (a module that is not
//! Wasm, an input nobody has) is returned at once. Every invocation has a random id: a
//! client that retries through another scheduler, or a scheduler that asks a volunteer
//! again, gets the one run's answer.

use super::function::{Execution, FailedAttempt, FunctionCall, Invocation, MAX_TIMEOUT_MS};
use super::protocol::{
    DiscoverRequest, ExecuteRequest, InvokeRequest, Request, ReserveTerms, Response,
};
use super::{CallError, Market, lock, now_ms};
use flotilla_scheduler::placement::Policy;
use flotilla_scheduler::registry;
use libp2p::PeerId;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use std::time::{Duration, Instant};
use tokio::sync::OwnedSemaphorePermit;

/// Volunteers a scheduler tries for one call.
pub const MAX_ATTEMPTS: usize = 3;
/// How long a reservation is held for a call before the volunteer runs it.
const RESERVATION_HOLD: Duration = Duration::from_secs(30);
/// Time allowed beyond the deadline and the fetches for storing outputs and answering.
const ANSWER_MARGIN: Duration = Duration::from_secs(30);
/// Time a client allows for discovery and placement on top of the run itself.
const PLACEMENT_ALLOWANCE: Duration = Duration::from_secs(60);
/// Schedulers a client tries before giving up.
const SCHEDULER_ATTEMPTS: usize = 3;

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
    /// A place for one more invocation, or `None` when as many run as allowed.
    pub(super) fn invocation_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.shared
            .invocations_taken
            .clone()
            .try_acquire_owned()
            .ok()
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
        request: InvokeRequest,
        _slot: OwnedSemaphorePermit,
    ) -> Response {
        if let Some(refusal) = self.refuse_call(&request.call) {
            return refusal;
        }
        let id = request.invocation_id;
        self.shared
            .invocations
            .run(id, self.place_and_run(request))
            .await
    }

    /// Places a call on a volunteer and runs it, trying another volunteer when one fails.
    pub(super) async fn place_and_run(&self, request: InvokeRequest) -> Response {
        let started = Instant::now();
        let metrics = &self.shared.metrics;
        metrics.invocations.inc();
        let mut rng = StdRng::from_os_rng();
        let mut failed_attempts: Vec<FailedAttempt> = Vec::new();
        let mut tried: Vec<PeerId> = Vec::new();
        let mut discover_us = 0;
        let mut messages = 0;
        let mut probes = 0;
        let allowance = execution_allowance(&request.call, self.shared.config.fetch_timeout);
        for _ in 0..MAX_ATTEMPTS {
            let reservation_id = rng.next_u64() >> 1;
            let discover = DiscoverRequest {
                memory_mib: request.call.memory_mib,
                max_tries: request.max_tries,
                reserve: Some(ReserveTerms {
                    reservation_id,
                    hold_ms: RESERVATION_HOLD.as_millis() as u64,
                    policy: request.placement,
                }),
            };
            let discovering = Instant::now();
            let discovered = {
                let _placing = self
                    .shared
                    .placements
                    .acquire()
                    .await
                    .expect("the placement bound is never closed");
                self.run_discovery(discover, &tried).await
            };
            discover_us += discovering.elapsed().as_micros() as u64;
            let discovered = match discovered {
                Ok(discovered) => discovered,
                Err(e) => {
                    metrics.invocations_failed.inc();
                    return Response::Failed {
                        reason: e.to_string(),
                        retryable: false,
                    };
                }
            };
            messages += discovered.report.messages;
            probes += discovered.report.probes.len() as u32;
            let Some(placement) = discovered.placement else {
                metrics.invocations_failed.inc();
                let why = discovered.report.failure.unwrap_or_else(|| {
                    format!("no offer with {} MiB free", request.call.memory_mib)
                });
                return Response::Failed {
                    reason: with_attempts(format!("nothing fits: {why}"), &failed_attempts),
                    retryable: true,
                };
            };
            let volunteer = placement.offer.body.offerer;
            let execute = Request::Execute(Box::new(ExecuteRequest {
                invocation_id: request.invocation_id,
                reservation_id,
                call: request.call.clone(),
            }));
            let addresses = placement.offer.body.addresses.clone();
            let answer = self.call(volunteer, addresses, execute, allowance).await;
            let error = match answer {
                Ok(Response::Executed { execution, offer }) => {
                    // The volunteer's memory is back: its offer's new version replaces
                    // the list's copy.
                    if let (Some(list), Some(offer)) = (&self.shared.super_traders, offer)
                        && offer.body.offerer == volunteer
                    {
                        lock(list).notify(now_ms(), vec![*offer]);
                    }
                    metrics
                        .invocation_seconds
                        .observe(started.elapsed().as_secs_f64());
                    // The peer that answered ran it, whatever its answer claims.
                    let execution = Execution {
                        volunteer: volunteer.to_string(),
                        ..*execution
                    };
                    return Response::Invoked(Box::new(Invocation {
                        invocation_id: request.invocation_id,
                        scheduler: self.peer_id().to_string(),
                        execution,
                        failed_attempts,
                        discover_us,
                        scheduler_us: started.elapsed().as_micros() as u64,
                        messages: messages + 1,
                        probes,
                    }));
                }
                Ok(Response::Failed {
                    reason,
                    retryable: false,
                }) => {
                    metrics.invocations_failed.inc();
                    return Response::Failed {
                        reason,
                        retryable: false,
                    };
                }
                Ok(Response::Failed { reason, .. }) | Ok(Response::Refused { reason }) => reason,
                Ok(other) => format!("unexpected answer {other:?}"),
                Err(e) => e.to_string(),
            };
            tracing::info!(%volunteer, %error, "volunteer failed; placing the call again");
            metrics.invocation_retries.inc();
            failed_attempts.push(FailedAttempt {
                volunteer: volunteer.to_string(),
                error,
            });
            tried.push(volunteer);
            // Give the memory back if the volunteer is still there to take it.
            let market = self.clone();
            let addresses = placement.offer.body.addresses.clone();
            let timeout = self.shared.config.answer_timeout;
            tokio::spawn(async move {
                let release = Request::Release { reservation_id };
                let _ = market.call(volunteer, addresses, release, timeout).await;
            });
        }
        metrics.invocations_failed.inc();
        Response::Failed {
            reason: with_attempts(
                format!("{MAX_ATTEMPTS} volunteers failed to run the call"),
                &failed_attempts,
            ),
            retryable: true,
        }
    }

    /// Runs `call` on the network: through a scheduler picked at random from the registry,
    /// trying another (with the same invocation id) if it does not answer.
    pub async fn invoke(
        &self,
        call: FunctionCall,
        max_tries: Option<u32>,
        placement: Option<Policy>,
    ) -> Result<Invocation, InvokeError> {
        call.validate()
            .map_err(|e| InvokeError::Rejected(e.to_string()))?;
        let mut rng = StdRng::from_os_rng();
        let request = InvokeRequest {
            invocation_id: rng.next_u64() >> 1,
            call,
            max_tries,
            placement,
        };
        let timeout = execution_allowance(&request.call, self.shared.config.fetch_timeout)
            * MAX_ATTEMPTS as u32
            + PLACEMENT_ALLOWANCE;
        let ask = || Request::Invoke(Box::new(request.clone()));
        match self.ask_a_scheduler(ask, timeout).await? {
            Response::Invoked(invocation) => Ok(*invocation),
            Response::Failed { reason, retryable } => {
                Err(InvokeError::Failed { reason, retryable })
            }
            other => Err(InvokeError::Unanswered(format!(
                "unexpected answer {other:?}"
            ))),
        }
    }

    /// Sends a request to a scheduler picked at random from the registry, and to another
    /// (at most [`SCHEDULER_ATTEMPTS`] in all) while the one asked is busy, refuses, or
    /// does not answer; returns the first other answer.
    pub(super) async fn ask_a_scheduler(
        &self,
        request: impl Fn() -> Request,
        timeout: Duration,
    ) -> Result<Response, InvokeError> {
        let mut rng = StdRng::from_os_rng();
        let mut failures = Vec::new();
        let mut failed: Option<PeerId> = None;
        for _ in 0..SCHEDULER_ATTEMPTS {
            let schedulers = self.schedulers().await;
            let Some(scheduler) = registry::pick(&schedulers, failed.as_ref(), &mut rng) else {
                return Err(InvokeError::NoScheduler);
            };
            match self.call(scheduler, Vec::new(), request(), timeout).await {
                Ok(Response::Refused { reason }) => {
                    failures.push(format!("{scheduler} refused: {reason}"));
                }
                Ok(Response::Busy) => failures.push(format!("{scheduler} is busy")),
                Ok(answer) => return Ok(answer),
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
