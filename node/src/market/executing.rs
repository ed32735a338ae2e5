//! The volunteer side of an invocation: run a call on memory a scheduler reserved here.
//!
//! The call runs on a reservation of the peer that sends it, with at least the memory it
//! asks for, made before or in the same message: so the invocations running at once never
//! need more memory than this node lends, and nobody else's reservation can be used. The
//! ledger ([`flotilla_offers::ledger`]) decides; once the run has started the reservation
//! no longer lapses while the module, stdin and inputs are fetched by CID over bitswap,
//! the module runs in the sandboxed executor with the reserved memory as its hard limit,
//! and the outputs are stored as blocks; then it ends, whatever happened. Runs are keyed
//! by caller and invocation id, so a repeated request gets the first run's answer instead
//! of a second run.

use super::Market;
use super::failure::{Failure, Part, PartAt};
use super::function::{
    Execution, ExecutionTimings, MAX_INLINE_OUTPUT, MAX_OUTPUT_FILES, OutputFile, OutputStream,
    parse_cid,
};
use super::metrics::MarketMetrics;
use super::protocol::{ExecuteRequest, Response};
use crate::executor::Job;
use cid::Cid;
use flotilla_api::receipt::{ReceiptBody, sha256_hex};
use flotilla_offers::ledger::{RunKey, StartError};
use flotilla_overlay::OverlayError;
use flotilla_overlay::blockstore::Lease;
use flotilla_overlay::fetch::FetchProgress;
use flotilla_overlay::read::{ReadError, ReadLimits};
use libp2p::PeerId;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::Instrument;

/// Most bytes of stdin and inputs one call may bring (and never more than it reserved).
pub const MAX_INPUT_BYTES: u64 = 256 * 1024 * 1024;
const MIB: u64 = 1024 * 1024;

/// Why a bounded fetch stopped.
#[derive(Debug)]
pub(super) enum Fetched {
    /// Nobody provided it in time.
    TimedOut,
    /// More arrived than allowed.
    TooLarge,
    /// The fetch failed.
    Failed(flotilla_overlay::OverlayError),
}

/// How long a reservation made with an `Execute` is held before its run starts (it
/// starts at once: this only bounds a run that could not start).
const RUN_HOLD_MS: u64 = 1_000;

/// What admission decided.
enum Admitted {
    /// A new run, on a reservation of this many MiB.
    Start(u32),
    /// The run is under way or done: its answer is the one to give.
    Repeat,
}

/// The ledger's key of `request`'s run for `owner`.
fn run_key(owner: PeerId, request: &ExecuteRequest) -> RunKey {
    RunKey {
        owner,
        invocation_id: request.invocation_id,
        call_digest: request.call.digest(),
    }
}

/// What a call asks of the ledger.
struct AdmitTerms {
    owner: PeerId,
    mib: u32,
    reservation_id: u64,
    /// The offer to reserve on first, if the call did not reserve before.
    offer_id: Option<u64>,
}

/// The ledger's side of admission, in the market's loop: the run's check, the
/// reservation if the call brings none, and the start of its run. Also answers whether a
/// reservation was made here.
fn admit(
    m: &mut super::state::Machines,
    now: u64,
    run: RunKey,
    terms: AdmitTerms,
) -> Result<(Admitted, bool), Refusal> {
    let from = terms.owner;
    let Some(offerer) = m.offerer.as_mut() else {
        return Err(Refusal::Failed(Failure::NotLending));
    };
    match offerer.ledger().check_run(&run) {
        Ok(()) => {}
        Err(StartError::AlreadyRunning(..) | StartError::AlreadyRan(_)) => {
            // A repeat needs no memory: a reservation it came with (made earlier with
            // `Reserve`) goes back now rather than at its deadline; a running one, or
            // another peer's, is left alone by the ledger.
            if terms.offer_id.is_none() {
                let _ = offerer.release(now, from, terms.reservation_id);
            }
            return Ok((Admitted::Repeat, false));
        }
        Err(e) => return Err(Refusal::Failed(Failure::NotRunnable(e))),
    }
    let reserved_here = match terms.offer_id {
        Some(offer_id) => {
            let held = offerer.reserve(
                now,
                from,
                offer_id,
                terms.mib,
                terms.reservation_id,
                RUN_HOLD_MS,
            );
            match held {
                Ok(_) => true,
                Err(e) => return Err(Refusal::NotReserved(e)),
            }
        }
        None => false,
    };
    let started = offerer.start_run(now, terms.reservation_id, run, terms.mib);
    match started {
        Ok(reservation) => {
            tracing::debug!(
                reservation = terms.reservation_id,
                mib = reservation.mib,
                "running a call"
            );
            Ok((Admitted::Start(reservation.mib), reserved_here))
        }
        Err(e) => {
            // A reservation made for this request alone goes back at once.
            if reserved_here {
                let _ = offerer.release(now, from, terms.reservation_id);
            }
            Err(Refusal::Failed(Failure::NotStarted(e)))
        }
    }
}

/// Why a call was not admitted.
enum Refusal {
    /// The call cannot run here (or at all): answered `Failed`.
    Failed(Failure),
    /// The memory could not be reserved: answered `Refused`, so the scheduler tries
    /// another offer.
    NotReserved(flotilla_offers::offerer::ReserveError),
}

impl From<Refusal> for Response {
    fn from(refusal: Refusal) -> Response {
        match refusal {
            Refusal::Failed(failure) => failure.into(),
            Refusal::NotReserved(e) => Response::Refused {
                reason: e.to_string(),
            },
        }
    }
}

/// Ends a run's reservation if its call is dropped before it ends it.
struct RunGuard<'a> {
    market: &'a Market,
    reservation_id: u64,
    ended: bool,
}

impl RunGuard<'_> {
    /// Ends the run now; returns the offer's new version.
    async fn end(mut self) -> Option<Box<flotilla_offers::offer::SignedOffer>> {
        // Marked ended only once the loop has it: dropped while waiting, the drop ends it.
        let newer = self.market.finish_run(self.reservation_id).await;
        self.ended = true;
        newer
    }
}

impl Drop for RunGuard<'_> {
    fn drop(&mut self) {
        if !self.ended {
            self.market.finish_run_later(self.reservation_id);
        }
    }
}

impl Market {
    /// A place for one more execution taken from `from`, or `None` when as many are
    /// taken as allowed, or `from` holds its share.
    pub(super) fn execution_slot(&self, from: PeerId) -> Option<super::slots::Slot> {
        self.shared.executions_taken.take(from)
    }

    /// Runs a call for `from` (a scheduler, or this node), at most once per invocation
    /// id and caller: on a reservation `from` made before, or reserved here and now when
    /// the request names an offer. The ledger decides; this carries it out.
    pub(super) async fn serve_execution(&self, from: PeerId, request: ExecuteRequest) -> Response {
        let id = request.invocation_id;
        let reservation_id = request.reservation_id;
        let span = tracing::info_span!(
            "execute",
            invocation = id,
            reservation = reservation_id,
            scheduler = %from,
            module = %request.call.module
        );
        if !self.shared.allowed.allow(&from) {
            MarketMetrics::count(&self.shared.metrics.reservations_refused, "not_listed");
            return Response::Refused {
                reason: super::allowed::NOT_LISTED.into(),
            };
        }
        let started = match self.admit(from, &request).await {
            Ok(Admitted::Start(mib)) => {
                self.record_run(run_key(from, &request), None);
                mib
            }
            Ok(Admitted::Repeat) => {
                // A retry of a run started here: its answer (or a wait for it).
                let forgotten = async { Failure::AnswerForgotten(id).into() };
                return self
                    .shared
                    .executions
                    .run((from, id), forgotten)
                    .instrument(span)
                    .await;
            }
            Err(refusal) => {
                if let Refusal::NotReserved(e) = &refusal {
                    let label = super::offering::refusal_label(e);
                    MarketMetrics::count(&self.shared.metrics.reservations_refused, label);
                }
                self.shared.metrics.executions_failed.inc();
                return refusal.into();
            }
        };
        // The reservation is running now: it ends with this call, whatever happens (the
        // guard ends it if the call is dropped before).
        let guard = RunGuard {
            market: self,
            reservation_id,
            ended: false,
        };
        let market = self;
        let request = &request;
        let answer = self
            .shared
            .executions
            .run((from, id), async move {
                let outcome = market.run_call(from, request, started).await;
                // The offer's new version is signed by the market's owner task while this
                // one signs the receipt: two signatures at once, not one after the other.
                let (offer, outcome) = tokio::join!(guard.end(), async {
                    outcome.map(|(execution, body)| market.signed(execution, body))
                });
                match outcome {
                    Ok(execution) => {
                        market.shared.metrics.executions.inc();
                        Response::Executed {
                            execution: Box::new(execution),
                            offer,
                        }
                    }
                    Err(failure) => {
                        market.shared.metrics.executions_failed.inc();
                        failure.into()
                    }
                }
            })
            .instrument(span)
            .await;
        self.record_run(run_key(from, request), Some(&answer));
        answer
    }

    /// Admits a call: checks it, reserves its memory if the request names an offer, and
    /// starts its run on the reservation (only `from`'s own, only once per run). A refusal
    /// is the answer to send.
    async fn admit(&self, from: PeerId, request: &ExecuteRequest) -> Result<Admitted, Refusal> {
        if !self.is_offering() || self.shared.executor.is_none() {
            return Err(Refusal::Failed(Failure::NotLending));
        }
        request
            .call
            .validate()
            .map_err(|e| Refusal::Failed(e.into()))?;
        let run = RunKey {
            owner: from,
            invocation_id: request.invocation_id,
            call_digest: request.call.digest(),
        };
        let terms = AdmitTerms {
            owner: from,
            mib: request.call.memory_mib,
            reservation_id: request.reservation_id,
            offer_id: request.offer_id,
        };
        let reservation_id = terms.reservation_id;
        // If this call is dropped before it hears it was admitted, the run it started
        // ends at once: no running reservation is left without its call.
        let admitted = self
            .with_undo(
                move |m, now| admit(m, now, run, terms),
                move |m, now, admitted| {
                    if let Ok((Admitted::Start(_), _)) = admitted {
                        super::offering::finish_run(m, now, reservation_id);
                    }
                },
            )
            .await;
        match admitted {
            Ok(Ok((admitted, reserved_here))) => {
                if reserved_here {
                    self.shared.metrics.reservations.inc();
                }
                Ok(admitted)
            }
            Ok(Err(refusal)) => Err(refusal),
            Err(stopped) => Err(Refusal::Failed(stopped.into())),
        }
    }

    /// Fetches what the call needs, runs it with `mib` MiB, stores its outputs, and
    /// writes the receipt (unsigned yet) for what `from` asked and what came out. The
    /// call's blocks (module, stdin, inputs, outputs) are safe from eviction while it runs
    /// and for `call_data_kept` after, however it ended.
    async fn run_call(
        &self,
        from: PeerId,
        request: &ExecuteRequest,
        mib: u32,
    ) -> Result<(Execution, ReceiptBody), Failure> {
        let lease = self.shared.overlay.store().lease();
        let ran = self.run_call_under(from, request, mib, &lease).await;
        lease.keep_until(Instant::now() + self.shared.config.call_data_kept);
        ran
    }

    async fn run_call_under(
        &self,
        from: PeerId,
        request: &ExecuteRequest,
        mib: u32,
        lease: &Lease,
    ) -> Result<(Execution, ReceiptBody), Failure> {
        let call = &request.call;
        let executor = self
            .shared
            .executor
            .clone()
            .expect("admitted calls run where there is an executor");
        let fetching = Instant::now();
        let max_module = executor.config().max_module_bytes as u64;
        let module = self
            .fetch_part(Part::Module, &call.module, max_module, lease)
            .await?;
        // Stdin and inputs are held in memory here: no more than the call reserved.
        let mut budget = MAX_INPUT_BYTES.min(u64::from(mib) * MIB);
        let stdin = match &call.stdin {
            Some(cid) => {
                let bytes = self.fetch_part(Part::Stdin, cid, budget, lease).await?;
                budget -= bytes.len() as u64;
                bytes
            }
            None => Vec::new(),
        };
        let mut inputs = Vec::with_capacity(call.inputs.len());
        for (name, cid) in &call.inputs {
            let bytes = self
                .fetch_part(Part::Input(name.clone()), cid, budget, lease)
                .await?;
            budget -= bytes.len() as u64;
            inputs.push((name.clone(), bytes));
        }
        let fetch_us = fetching.elapsed().as_micros() as u64;

        let job = Job {
            memory_bytes: u64::from(mib) * MIB,
            timeout: call.timeout_ms.map(Duration::from_millis),
            args: call.args.clone(),
            env: call.env.clone(),
            stdin,
            inputs,
        };
        // The run keeps the call's span (invocation, reservation, scheduler) on its thread.
        let span = tracing::Span::current();
        let outcome =
            tokio::task::spawn_blocking(move || span.in_scope(|| executor.run(&module, job)))
                .await??;

        let storing = Instant::now();
        let mut outcome = outcome;
        let pure = outcome.pure && outcome.failure.is_none();
        self.maybe_tamper(&mut outcome.stdout);
        let stdout_sha256 = sha256_hex(&outcome.stdout);
        let stderr_sha256 = sha256_hex(&outcome.stderr);
        let stdout = self.store_stream(outcome.stdout, lease).await?;
        let stderr = self.store_stream(outcome.stderr, lease).await?;
        let mut outputs = Vec::with_capacity(outcome.outputs.len().min(MAX_OUTPUT_FILES));
        if outcome.outputs.len() > MAX_OUTPUT_FILES {
            return Err(Failure::TooManyOutputs(outcome.outputs.len()));
        }
        for (name, bytes) in outcome.outputs {
            let size = bytes.len() as u64;
            let cid = self.store(&bytes, lease).await?;
            outputs.push(OutputFile { name, cid, size });
        }
        let timings = ExecutionTimings {
            fetch_us,
            load_us: outcome.timings.load_us,
            compiled: outcome.timings.compiled,
            instantiate_us: outcome.timings.instantiate_us,
            execute_us: outcome.timings.execute_us,
            store_us: storing.elapsed().as_micros() as u64,
        };
        let execution = Execution {
            volunteer: self.peer_id().to_string(),
            exit_code: outcome.exit_code,
            stdout,
            stderr,
            outputs,
            failure: outcome.failure,
            memory_mib: mib,
            timings,
            receipt: None,
        };
        let body = self.receipt_body_for(
            from,
            request,
            &execution,
            stdout_sha256,
            stderr_sha256,
            pure,
        );
        Ok((execution, body))
    }

    /// Fetches `part` of the call, the file under the CID `text` names (unless held
    /// already), and reads it, refusing one of more than `max` bytes. Fetch and read run
    /// under one deadline, `fetch_timeout` from now, and the read within
    /// [`ReadLimits`] (so a DAG bomb fails the call instead of holding its reservation).
    async fn fetch_part(
        &self,
        part: Part,
        text: &str,
        max: u64,
        lease: &Lease,
    ) -> Result<Vec<u8>, Failure> {
        let cid = parse_cid(&part.to_string(), text)?;
        let timeout = self.shared.config.fetch_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        match self.fetch_at_most_by(cid, max, deadline, lease).await {
            Err(Fetched::TimedOut) => {
                let at = PartAt::boxed(&part, cid);
                return Err(Failure::NotProvided { at, timeout });
            }
            Err(Fetched::TooLarge) => {
                let at = PartAt::boxed(&part, cid);
                return Err(Failure::TooLarge { at, max });
            }
            Err(Fetched::Failed(source)) => {
                let at = PartAt::boxed(&part, cid);
                return Err(Failure::FetchFailed {
                    at,
                    source: Box::new(source),
                });
            }
            Ok(()) => {}
        }
        let limits = ReadLimits::default()
            .at_most(max)
            .until(deadline.into_std());
        let read = tokio::time::timeout_at(deadline, self.read_part(cid, limits)).await;
        let failed = |source: OverlayError| Failure::ReadFailed {
            at: PartAt::boxed(&part, cid),
            source: Box::new(source),
        };
        match read {
            Ok(Ok(bytes)) => Ok(bytes),
            Ok(Err(OverlayError::Read {
                source: ReadError::TooLarge { .. },
                ..
            })) => Err(Failure::TooLarge {
                at: PartAt::boxed(&part, cid),
                max,
            }),
            Ok(Err(e)) => Err(failed(e)),
            Err(_) => Err(failed(OverlayError::Read {
                root: cid,
                source: ReadError::DeadlinePassed,
            })),
        }
    }

    /// Reads the file under `cid` into memory, within `limits`.
    async fn read_part(&self, cid: Cid, limits: ReadLimits) -> Result<Vec<u8>, OverlayError> {
        let mut bytes = Vec::new();
        let mut file = std::pin::pin!(self.shared.overlay.read_file_within(cid, limits));
        while let Some(chunk) = futures::StreamExt::next(&mut file).await {
            bytes.extend_from_slice(&chunk?);
        }
        Ok(bytes)
    }

    /// Fetches the file under `cid` (unless held already) within `fetch_timeout`, under
    /// `lease`, giving up once more than a file of `max` bytes would take has arrived.
    pub(super) async fn fetch_at_most(
        &self,
        cid: Cid,
        max: u64,
        lease: &Lease,
    ) -> Result<(), Fetched> {
        let deadline = tokio::time::Instant::now() + self.shared.config.fetch_timeout;
        self.fetch_at_most_by(cid, max, deadline, lease).await
    }

    /// Fetches the file under `cid` (unless held already) by `deadline`, giving up once
    /// more than a file of `max` bytes would take has arrived.
    pub(super) async fn fetch_at_most_by(
        &self,
        cid: Cid,
        max: u64,
        deadline: tokio::time::Instant,
        lease: &Lease,
    ) -> Result<(), Fetched> {
        let (progress, mut watching) = watch::channel(FetchProgress::default());
        // Blocks carry a little framing beyond the file's bytes.
        let max_fetched = max.saturating_add(max / 8).saturating_add(MIB);
        let fetched = tokio::time::timeout_at(deadline, async {
            let fetch = self.shared.overlay.fetch(cid, &progress, lease);
            tokio::pin!(fetch);
            loop {
                tokio::select! {
                    done = &mut fetch => return Some(done),
                    Ok(()) = watching.changed() => {
                        if watching.borrow().bytes > max_fetched {
                            return None;
                        }
                    }
                }
            }
        })
        .await;
        match fetched {
            Err(_) => Err(Fetched::TimedOut),
            Ok(None) => Err(Fetched::TooLarge),
            Ok(Some(Err(e))) => Err(Fetched::Failed(e)),
            Ok(Some(Ok(()))) => Ok(()),
        }
    }

    /// Stdout or stderr as the answer carries it: inline when small, by CID when large.
    async fn store_stream(&self, bytes: Vec<u8>, lease: &Lease) -> Result<OutputStream, Failure> {
        let size = bytes.len() as u64;
        if bytes.len() <= MAX_INLINE_OUTPUT {
            return Ok(OutputStream {
                size,
                inline: bytes,
                cid: None,
            });
        }
        Ok(OutputStream {
            size,
            inline: Vec::new(),
            cid: Some(self.store(&bytes, lease).await?),
        })
    }

    /// Adds `bytes` as a file of blocks under `lease`, announced in the DHT; returns its
    /// CID.
    async fn store(&self, bytes: &[u8], lease: &Lease) -> Result<String, Failure> {
        self.shared
            .overlay
            .add_to(bytes, lease, false)
            .await
            .map(|added| added.cid)
            .map_err(|e| Failure::Store(Box::new(e)))
    }
}
