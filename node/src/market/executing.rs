//! The volunteer side of an invocation: run a call on memory a scheduler reserved here.
//!
//! The call must name a reservation this node granted, with at least the memory it asks
//! for: so the invocations running at once never need more memory than this node lends.
//! The reservation is confirmed (it no longer lapses) while the module, stdin and inputs
//! are fetched by CID over bitswap, the module runs in the sandboxed executor with the
//! reserved memory as its hard limit, and the outputs are stored as blocks; then it is
//! released, whatever happened. Runs are keyed by invocation id, so a repeated request
//! gets the first run's answer instead of a second run.

use super::function::{
    Execution, ExecutionTimings, FunctionCall, MAX_INLINE_OUTPUT, MAX_OUTPUT_FILES, OutputFile,
    OutputStream, parse_cid,
};
use super::protocol::{ExecuteRequest, Response};
use super::{Market, lock, now_ms};
use crate::executor::{ExecError, Job};
use crate::one_line;
use cid::Cid;
use flotilla_overlay::fetch::FetchProgress;
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

/// Why a call could not run here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Failure {
    pub reason: String,
    /// Whether another volunteer might succeed (this one's trouble, not the call's).
    pub retryable: bool,
}

impl Failure {
    fn of_call(reason: String) -> Failure {
        Failure {
            reason,
            retryable: false,
        }
    }

    fn of_volunteer(reason: String) -> Failure {
        Failure {
            reason,
            retryable: true,
        }
    }
}

impl From<Failure> for Response {
    fn from(f: Failure) -> Response {
        Response::Failed {
            reason: f.reason,
            retryable: f.retryable,
        }
    }
}

impl Market {
    /// Runs a call for a scheduler, once per invocation id.
    pub(super) async fn serve_execution(&self, request: ExecuteRequest) -> Response {
        let id = request.invocation_id;
        let reservation_id = request.reservation_id;
        let span = tracing::info_span!("execute", invocation = id, module = %request.call.module);
        // A call on no reservation of ours is refused without a place among the
        // remembered answers, so made-up calls cannot push out real ones; a retry of a
        // known run still gets its answer.
        if !self.shared.executions.knows(id) && !self.holds_reservation(reservation_id) {
            self.shared.metrics.executions_failed.inc();
            return Failure::of_volunteer(format!(
                "no reservation {reservation_id} here (it lapsed or was released)"
            ))
            .into();
        }
        let response = self
            .shared
            .executions
            .run(
                id,
                async move {
                    // Only an admitted call releases its reservation: one refused (for
                    // a reservation another call runs on, say) leaves it alone.
                    let (outcome, offer) = match self.admit(&request) {
                        Ok(mib) => {
                            let outcome = self.run_call(&request.call, mib).await;
                            (outcome, self.release_and_tell(reservation_id))
                        }
                        Err(failure) => (Err(failure), None),
                    };
                    match outcome {
                        Ok(execution) => {
                            self.shared.metrics.executions.inc();
                            Response::Executed {
                                execution: Box::new(execution),
                                offer,
                            }
                        }
                        Err(failure) => {
                            self.shared.metrics.executions_failed.inc();
                            failure.into()
                        }
                    }
                }
                .instrument(span),
            )
            .await;
        // A repeated call answered from memory does not need the reservation it came
        // with (after a first run, its own is already released: this changes nothing),
        // unless another call runs on it.
        self.release_unless_running(reservation_id);
        response
    }

    /// Whether this node holds reservation `id`.
    fn holds_reservation(&self, id: u64) -> bool {
        self.shared
            .offerer
            .as_ref()
            .is_some_and(|o| lock(o).reservations().any(|r| r.reservation_id == id))
    }

    /// Checks that the call runs on a reservation granted here, big enough for it, and
    /// confirms the reservation; returns the memory reserved, in MiB.
    fn admit(&self, request: &ExecuteRequest) -> Result<u32, Failure> {
        let (Some(offerer), Some(_)) = (&self.shared.offerer, &self.shared.executor) else {
            return Err(Failure::of_volunteer(
                "this node lends no memory and runs no functions".into(),
            ));
        };
        request
            .call
            .validate()
            .map_err(|e| Failure::of_call(e.to_string()))?;
        let mut offerer = lock(offerer);
        let reservation = offerer
            .reservations()
            .find(|r| r.reservation_id == request.reservation_id)
            .copied()
            .ok_or_else(|| {
                Failure::of_volunteer(format!(
                    "no reservation {} here (it lapsed or was released)",
                    request.reservation_id
                ))
            })?;
        if reservation.hold_until_ms.is_none() {
            return Err(Failure::of_volunteer(format!(
                "reservation {} is in use by another call",
                request.reservation_id
            )));
        }
        if reservation.mib < request.call.memory_mib {
            return Err(Failure::of_volunteer(format!(
                "reservation {} holds {} MiB, the call asks for {} MiB",
                request.reservation_id, reservation.mib, request.call.memory_mib
            )));
        }
        offerer.confirm(request.reservation_id);
        tracing::debug!(
            reservation = request.reservation_id,
            mib = reservation.mib,
            at_ms = now_ms(),
            "running a call"
        );
        Ok(reservation.mib)
    }

    /// Fetches what the call needs, runs it with `mib` MiB, and stores its outputs.
    async fn run_call(&self, call: &FunctionCall, mib: u32) -> Result<Execution, Failure> {
        let executor = self
            .shared
            .executor
            .clone()
            .expect("admitted calls run where there is an executor");
        let fetching = Instant::now();
        let invalid = |e: super::function::CallRejected| Failure::of_call(e.to_string());
        let module_cid = parse_cid("module", &call.module).map_err(invalid)?;
        let max_module = executor.config().max_module_bytes as u64;
        let module = self
            .fetch_bytes("module", module_cid, max_module, "the module limit")
            .await?;
        // Stdin and inputs are held in memory here: no more than the call reserved.
        let mut budget = MAX_INPUT_BYTES.min(u64::from(mib) * MIB);
        let stdin = match &call.stdin {
            Some(cid) => {
                let cid = parse_cid("stdin", cid).map_err(invalid)?;
                let bytes = self
                    .fetch_bytes("stdin", cid, budget, "the input limit")
                    .await?;
                budget -= bytes.len() as u64;
                bytes
            }
            None => Vec::new(),
        };
        let mut inputs = Vec::with_capacity(call.inputs.len());
        for (name, cid) in &call.inputs {
            let what = format!("input {name:?}");
            let cid = parse_cid(&what, cid).map_err(invalid)?;
            let bytes = self
                .fetch_bytes(&what, cid, budget, "the input limit")
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
        let outcome = tokio::task::spawn_blocking(move || executor.run(&module, job))
            .await
            .map_err(|e| Failure::of_volunteer(format!("the executor failed: {e}")))?
            .map_err(|e| match e {
                ExecError::Internal(_) => Failure::of_volunteer(e.to_string()),
                other => Failure::of_call(one_line(&other.to_string())),
            })?;

        let storing = Instant::now();
        let stdout = self.store_stream(outcome.stdout).await?;
        let stderr = self.store_stream(outcome.stderr).await?;
        let mut outputs = Vec::with_capacity(outcome.outputs.len().min(MAX_OUTPUT_FILES));
        if outcome.outputs.len() > MAX_OUTPUT_FILES {
            return Err(Failure::of_call(format!(
                "the function left {} files (at most {MAX_OUTPUT_FILES})",
                outcome.outputs.len()
            )));
        }
        for (name, bytes) in outcome.outputs {
            let size = bytes.len() as u64;
            let cid = self.store(&bytes).await?;
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
        Ok(Execution {
            volunteer: self.peer_id().to_string(),
            exit_code: outcome.exit_code,
            stdout,
            stderr,
            outputs,
            failure: outcome.failure,
            memory_mib: mib,
            timings,
        })
    }

    /// Fetches the file under `cid` (unless held already) and reads it, refusing one of
    /// more than `max` bytes (`limit` names the bound in the error).
    async fn fetch_bytes(
        &self,
        what: &str,
        cid: Cid,
        max: u64,
        limit: &str,
    ) -> Result<Vec<u8>, Failure> {
        let too_large = || {
            Failure::of_call(format!(
                "the {what} ({cid}) is larger than {limit} ({max} bytes)"
            ))
        };
        let timeout = self.shared.config.fetch_timeout;
        match self.fetch_at_most(cid, max).await {
            Err(Fetched::TimedOut) => {
                return Err(Failure::of_call(format!(
                    "cannot fetch the {what} ({cid}): no peer provided it within {timeout:?}"
                )));
            }
            Err(Fetched::TooLarge) => return Err(too_large()),
            Err(Fetched::Failed(e)) => {
                return Err(Failure::of_call(format!(
                    "cannot fetch the {what} ({cid}): {}",
                    one_line(&e.to_string())
                )));
            }
            Ok(()) => {}
        }
        let overlay = &self.shared.overlay;
        let mut bytes = Vec::new();
        let mut file = std::pin::pin!(overlay.read_file(cid));
        while let Some(chunk) = futures::StreamExt::next(&mut file).await {
            let chunk = chunk.map_err(|e| {
                Failure::of_call(format!(
                    "cannot read the {what} ({cid}): {}",
                    one_line(&e.to_string())
                ))
            })?;
            if bytes.len() as u64 + chunk.len() as u64 > max {
                return Err(too_large());
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    }

    /// Fetches the file under `cid` (unless held already) within `fetch_timeout`, giving
    /// up once more than a file of `max` bytes would take has arrived.
    pub(super) async fn fetch_at_most(&self, cid: Cid, max: u64) -> Result<(), Fetched> {
        let (progress, mut watching) = watch::channel(FetchProgress::default());
        // Blocks carry a little framing beyond the file's bytes.
        let max_fetched = max + max / 8 + MIB;
        let fetched = tokio::time::timeout(self.shared.config.fetch_timeout, async {
            let fetch = self.shared.overlay.fetch(cid, &progress);
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
    async fn store_stream(&self, bytes: Vec<u8>) -> Result<OutputStream, Failure> {
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
            cid: Some(self.store(&bytes).await?),
        })
    }

    /// Adds `bytes` as a file of blocks, announced in the DHT; returns its CID.
    async fn store(&self, bytes: &[u8]) -> Result<String, Failure> {
        self.shared
            .overlay
            .add(bytes)
            .await
            .map(|added| added.cid)
            .map_err(|e| Failure::of_volunteer(format!("cannot store an output: {e}")))
    }
}
