//! The clients' side of a scenario: calls of the `sleep` function, each holding some memory
//! for `call_ms`, sent as a Poisson process at the rate that keeps the asked share of the
//! lent memory reserved (Little's law: rate = utilisation × lent ÷ (mean memory × time)).
//!
//! Each call becomes one [`InvocationRow`]: ok or why not, tries, probes and messages to
//! place it, execution and end-to-end time.

use super::partition::Phases;
use super::{Announce, Instance};
use crate::coordinator::Coordinator;
use crate::links::Links;
use crate::node_process::NodeProcess;
use crate::records::{CsvLog, INVOCATIONS_FILE, InvocationRow, unix_ms};
use anyhow::Context;
use bytes::Bytes;
use flotilla_api::client::{ApiClient, ClientError};
use flotilla_api::function::FunctionCall;
use flotilla_api::types::{DiscoverBody, InvokeBody};
use rand::rngs::StdRng;
use rand::{Rng, RngCore};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// The function every call runs (examples/src/sleep.c).
pub const SLEEP_WASM: &[u8] = include_bytes!("../../../examples/wasm/sleep.wasm");

/// How long a client waits for its first scheduler.
const FIRST_SCHEDULER_LIMIT: Duration = Duration::from_secs(60);
/// What a call may take beyond its own run before the client counts it as failed.
const ANSWER_SLACK: Duration = Duration::from_secs(60);
/// Memory each call asks for: MiB and weight (the request mix of docs/discovery-sim.md,
/// cut at 1 GiB).
pub const CALL_TIERS: &[(u32, u32)] = &[(128, 35), (256, 25), (512, 22), (1024, 18)];

/// Waits until every offer of a volunteer's node is published.
pub async fn wait_until_offering(node: &NodeProcess) -> anyhow::Result<()> {
    let api = node.api_client();
    let deadline = Instant::now() + super::BARRIER_LIMIT;
    loop {
        // A busy machine may drop a connection; only the deadline ends the wait.
        match api.offers().await {
            Ok(view)
                if !view.sent.is_empty() && view.sent.iter().all(|o| o.state == "published") =>
            {
                return Ok(());
            }
            Ok(_) => {}
            Err(e) => anyhow::ensure!(
                Instant::now() < deadline,
                "asking the node for its offers: {e}"
            ),
        }
        anyhow::ensure!(Instant::now() < deadline, "offers not published in time");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Adds the sleep function, trying again for a while: on a machine running 50 nodes a
/// connection to the node's API may be refused while it is busy.
async fn add_with_retries(api: &ApiClient) -> anyhow::Result<flotilla_overlay::Added> {
    let deadline = Instant::now() + FIRST_SCHEDULER_LIMIT;
    loop {
        let bytes = bytes::Bytes::from_static(SLEEP_WASM);
        match api.add(futures::stream::iter([Ok(bytes)])).await {
            Ok(added) => return Ok(added),
            Err(e) if Instant::now() < deadline => {
                tracing::warn!(error = %e, "adding the sleep function; trying again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e).context("adding the sleep function"),
        }
    }
}

/// A client instance, ready to invoke.
pub struct Client {
    api: ApiClient,
    module: String,
    calls_per_second: f64,
    call_ms: u64,
    max_tries: u32,
    in_flight: Arc<Semaphore>,
    log: Arc<Mutex<CsvLog>>,
    seq: u32,
    rng: StdRng,
    input_bytes: usize,
}

/// The mean of `value:weight` pairs.
pub fn weighted_mean(pairs: &[(u32, u32)]) -> f64 {
    let total: f64 = pairs.iter().map(|&(_, w)| f64::from(w)).sum();
    pairs
        .iter()
        .map(|&(v, w)| f64::from(v) * f64::from(w))
        .sum::<f64>()
        / total.max(1.0)
}

/// Calls per second, over all clients, that keep `utilisation` of `lent_mib` reserved
/// when each call holds the mean call memory for `call_ms`.
pub fn calls_per_second(utilisation: f64, lent_mib: f64, call_ms: u64) -> f64 {
    let held_seconds = (call_ms as f64 / 1000.0).max(0.001);
    utilisation * lent_mib / (weighted_mean(CALL_TIERS) * held_seconds)
}

impl Client {
    /// Adds the function to the client's node, works out its share of the call rate, and
    /// waits until a scheduler answers.
    pub(crate) async fn prepare<C: Coordinator, L: Links>(
        instance: &Instance<C, L>,
        node: &NodeProcess,
        everyone: &[Announce],
    ) -> anyhow::Result<Client> {
        let api = node.api_client();
        let added = add_with_retries(&api).await?;
        let lent: f64 = everyone.iter().map(|a| f64::from(a.lent_mib)).sum();
        let p = &instance.params;
        let rate = calls_per_second(p.utilisation, lent, p.call_ms) / f64::from(p.clients.max(1));
        let deadline = Instant::now() + FIRST_SCHEDULER_LIMIT;
        let probe = DiscoverBody {
            memory: 128 << 20,
            max_tries: Some(1),
            reserve_ms: None,
            placement: None,
        };
        while let Err(e) = api.discover(&probe).await {
            anyhow::ensure!(Instant::now() < deadline, "no scheduler answers: {e}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(Client {
            api,
            module: added.cid,
            calls_per_second: rate,
            call_ms: p.call_ms,
            max_tries: p.max_tries,
            in_flight: Arc::new(Semaphore::new(p.max_in_flight as usize)),
            log: Arc::new(Mutex::new(CsvLog::create(
                &instance.outputs.join(INVOCATIONS_FILE),
            )?)),
            seq: instance.seq,
            rng: instance.rng(2),
            input_bytes: (p.input_kib * 1024) as usize,
        })
    }

    /// Sends calls until `end`, then waits for the ones in flight.
    pub async fn run(mut self, end: Instant, phases: Phases) -> anyhow::Result<()> {
        let mut tasks = tokio::task::JoinSet::new();
        let mut next = Instant::now();
        loop {
            // Exponential gaps: a Poisson process of the client's rate.
            let u: f64 = self.rng.random_range(f64::EPSILON..1.0);
            next += Duration::from_secs_f64(-u.ln() / self.calls_per_second.max(1e-6));
            if next >= end {
                break;
            }
            tokio::time::sleep_until(next).await;
            let memory_mib = super::weighted(CALL_TIERS, &mut self.rng);
            let phase = phases.at(Instant::now());
            let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
                self.record(failed(
                    self.seq,
                    phase,
                    "client has too many calls in flight",
                ));
                continue;
            };
            let mut call = self.call(memory_mib);
            if self.input_bytes > 0 {
                // Distinct stdin for every call, added as cache on the client's node.
                let mut input = vec![0u8; self.input_bytes];
                self.rng.fill_bytes(&mut input);
                let body = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from(input))]);
                match self.api.add_with(body, false).await {
                    Ok(added) => call.call.stdin = Some(added.cid),
                    Err(e) => {
                        self.record(failed(self.seq, phase, &format!("cannot add stdin: {e}")));
                        continue;
                    }
                }
            }
            let (api, log, seq) = (self.api.clone(), self.log.clone(), self.seq);
            let expected = format!("slept {} ms\n", self.call_ms);
            let limit = Duration::from_millis(self.call_ms) + ANSWER_SLACK;
            tasks.spawn(async move {
                let row = invoke_once(&api, call, &expected, limit, seq, phase).await;
                append(&log, &row);
                drop(permit);
            });
            while tasks.try_join_next().is_some() {}
        }
        while tasks.join_next().await.is_some() {}
        Ok(())
    }

    fn call(&self, memory_mib: u32) -> InvokeBody {
        InvokeBody {
            call: FunctionCall {
                module: self.module.clone(),
                memory_mib,
                timeout_ms: Some(self.call_ms + 30_000),
                args: vec![self.call_ms.to_string()],
                env: Vec::new(),
                stdin: None,
                inputs: Vec::new(),
            },
            max_tries: Some(self.max_tries),
            placement: None,
            replicas: None,
            // Placement is what is measured: never answered from a memo.
            fresh: true,
        }
    }

    fn record(&self, row: InvocationRow) {
        append(&self.log, &row);
    }
}

fn append(log: &Mutex<CsvLog>, row: &InvocationRow) {
    let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
    if let Err(e) = log.append(row) {
        tracing::warn!(error = %e, "cannot record an invocation");
    }
}

fn failed(seq: u32, phase: &str, why: &str) -> InvocationRow {
    InvocationRow {
        unix_ms: unix_ms(),
        instance: seq,
        ok: false,
        error: why.into(),
        tries: 0,
        probes: 0,
        messages: 0,
        discover_ms: 0.0,
        execute_ms: 0.0,
        end_to_end_ms: 0.0,
        phase: phase.into(),
    }
}

/// One call, timed, as a row.
async fn invoke_once(
    api: &ApiClient,
    call: InvokeBody,
    expected: &str,
    limit: Duration,
    seq: u32,
    phase: &str,
) -> InvocationRow {
    let mut row = failed(seq, phase, "");
    let sent = Instant::now();
    let answer = tokio::time::timeout(limit, api.invoke(&call)).await;
    row.end_to_end_ms = sent.elapsed().as_secs_f64() * 1000.0;
    match answer {
        Err(_) => row.error = format!("no answer within {limit:?}"),
        Ok(Err(ClientError::Node(why))) => row.error = why,
        Ok(Err(e)) => row.error = e.to_string(),
        Ok(Ok(reply)) => {
            let inv = &reply.invocation;
            let ex = &inv.execution;
            row.tries = inv.failed_attempts.len() as u32 + 1;
            row.probes = inv.probes;
            row.messages = inv.messages;
            row.discover_ms = inv.discover_us as f64 / 1000.0;
            row.execute_ms = ex.timings.execute_us as f64 / 1000.0;
            row.ok = ex.exit_code == 0 && ex.stdout.inline == expected.as_bytes();
            if !row.ok {
                row.error = format!(
                    "exit {} with {:?}",
                    ex.exit_code,
                    String::from_utf8_lossy(&ex.stderr.inline)
                );
            }
        }
    }
    // One line per error, so the CSV stays easy to read.
    row.error = flotilla_api::one_line(&row.error);
    row
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_call_rate_follows_littles_law() {
        let mean = weighted_mean(CALL_TIERS);
        assert!((mean - 405.76).abs() < 0.01, "{mean}");
        // 30% of 40,576 MiB lent, each call holding ~406 MiB for 2 s: 15 calls/s.
        let rate = calls_per_second(0.3, 40_576.0, 2000);
        assert!((rate - 15.0).abs() < 1e-9, "{rate}");
        assert_eq!(calls_per_second(0.0, 1000.0, 2000), 0.0);
    }
}
