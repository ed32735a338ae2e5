//! The runs this volunteer started and their answers, recorded in the node's database
//! (table `runs` of `crate::state_db`), so that a call asked again after a restart — on
//! a new offer, under the same invocation id — is answered as a repeat, never run twice
//! here (`Ledger::remember_ran`): with the first run's answer when it was recorded (at
//! most [`MAX_RECORDED_ANSWER`] bytes), else as forgotten. Rows are written off the call's
//! path — at the start of a run, and again with its answer — through the batching writer
//! of `super::jobs` (runs alone gather for up to a second per commit), and the newest
//! [`MAX_RECORDED_RUNS`] kept: a crash within a second of a run's start can lose its row.

use super::protocol::Response;
use super::{Market, lock};
use crate::state_db::StateChange;
use flotilla_offers::ledger::RunKey;
use libp2p::PeerId;
use std::collections::VecDeque;
use std::sync::Mutex;

/// Most runs recorded (the ledger remembers as many finished runs).
pub const MAX_RECORDED_RUNS: usize = 1024;
/// Largest answer recorded with its run (CBOR bytes); a larger one is not, and a repeat
/// after a restart is told it is forgotten.
pub const MAX_RECORDED_ANSWER: usize = 16 * 1024;

/// The keys of the rows written, oldest first, for pruning.
#[derive(Default)]
pub struct RunLog(Mutex<VecDeque<Vec<u8>>>);

/// The row key of `run`: its owner's PeerId bytes, then its invocation id.
fn row_key(run: &RunKey) -> Vec<u8> {
    let mut key = run.owner.to_bytes();
    key.extend_from_slice(&run.invocation_id.to_be_bytes());
    key
}

/// The row value of `run`, started at `now_ms`: its call's digest, the time, then its
/// answer (CBOR), once it has one.
fn row_value(run: &RunKey, now_ms: u64, answer: &[u8]) -> Vec<u8> {
    let mut value = run.call_digest.to_vec();
    value.extend_from_slice(&now_ms.to_be_bytes());
    value.extend_from_slice(answer);
    value
}

/// The answer a row records, if any.
fn answer_of(value: &[u8]) -> Option<Response> {
    let answer = value.get(40..).filter(|a| !a.is_empty())?;
    cbor4ii::serde::from_slice(answer).ok()
}

/// The run a row records, and when it started.
fn decode(key: &[u8], value: &[u8]) -> Option<(RunKey, u64)> {
    let split = key.len().checked_sub(8)?;
    let owner = PeerId::from_bytes(&key[..split]).ok()?;
    let invocation_id = u64::from_be_bytes(key[split..].try_into().ok()?);
    if value.len() < 40 {
        return None;
    }
    let call_digest: [u8; 32] = value[..32].try_into().ok()?;
    let started = u64::from_be_bytes(value[32..40].try_into().ok()?);
    Some((
        RunKey {
            owner,
            invocation_id,
            call_digest,
        },
        started,
    ))
}

impl Market {
    /// Records that `run` started, or (`answer`) how it ended (in the background;
    /// dropped, with a log line, when the writer's queue is full).
    pub(super) fn record_run(&self, run: RunKey, answer: Option<&Response>) {
        let Some(writer) = lock(&self.shared.state_writer).clone() else {
            return;
        };
        let key = row_key(&run);
        let encoded = answer
            .map(recordable)
            .and_then(|a| cbor4ii::serde::to_vec(Vec::new(), &a).ok())
            .filter(|a| a.len() <= MAX_RECORDED_ANSWER)
            .unwrap_or_default();
        let runs_dropped = {
            let mut log = lock(&self.shared.run_log.0);
            if answer.is_none() {
                log.push_back(key.clone());
            }
            let excess = log.len().saturating_sub(MAX_RECORDED_RUNS);
            log.drain(..excess).collect()
        };
        let change = StateChange {
            runs: vec![(key, row_value(&run, self.now(), &encoded))],
            runs_dropped,
            ..StateChange::default()
        };
        // Nobody waits for this write.
        let (done, _) = tokio::sync::oneshot::channel();
        if writer.try_send((change, done)).is_err() {
            tracing::debug!(
                invocation = run.invocation_id,
                "run not recorded: the writer is busy"
            );
        }
    }

    /// Waits until every change queued for the node's database before this call (runs
    /// recorded, job records kept) is durable.
    pub async fn flush_records(&self) {
        let writer = lock(&self.shared.state_writer).clone();
        if let Some(writer) = writer {
            let (done, written) = tokio::sync::oneshot::channel();
            if writer.send((StateChange::default(), done)).await.is_ok() {
                let _ = written.await;
            }
        }
    }

    /// Puts the runs recorded before the restart back in the ledger (the newest
    /// [`MAX_RECORDED_RUNS`]; older rows and unreadable ones are removed).
    pub(super) async fn reload_runs(&self) {
        let Some(state) = self.state() else {
            return;
        };
        let rows = match tokio::task::spawn_blocking(move || state.runs()).await {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot read the runs recorded");
                return;
            }
            Err(_) => return,
        };
        let mut runs = Vec::new();
        let mut runs_dropped = Vec::new();
        for (key, value) in rows {
            match decode(&key, &value) {
                Some((run, started)) => runs.push((started, key, run, answer_of(&value))),
                None => runs_dropped.push(key),
            }
        }
        runs.sort_by_key(|(started, ..)| *started);
        let excess = runs.len().saturating_sub(MAX_RECORDED_RUNS);
        runs_dropped.extend(runs.drain(..excess).map(|(_, key, ..)| key));
        let count = runs.len();
        {
            let mut log = lock(&self.shared.run_log.0);
            log.clear();
            log.extend(runs.iter().map(|(_, key, ..)| key.clone()));
        }
        let mut keys = Vec::with_capacity(runs.len());
        for (_, _, run, answer) in runs {
            if let Some(answer) = answer {
                self.shared
                    .executions
                    .remember((run.owner, run.invocation_id), answer);
            }
            keys.push(run);
        }
        let _ = self
            .with(move |m, _| {
                if let Some(offerer) = m.offerer.as_mut() {
                    offerer.remember_runs(keys);
                }
            })
            .await;
        tracing::info!(runs = count, "runs recorded before the restart remembered");
        let writer = lock(&self.shared.state_writer).clone();
        if !runs_dropped.is_empty()
            && let Some(writer) = writer
        {
            let (done, _) = tokio::sync::oneshot::channel();
            let change = StateChange {
                runs_dropped,
                ..StateChange::default()
            };
            let _ = writer.send((change, done)).await;
        }
    }
}

/// An answer as it is recorded: an offer's version in it is stale by the time a repeat
/// asks again, so it is left out.
fn recordable(answer: &Response) -> Response {
    match answer {
        Response::Executed { execution, .. } => Response::Executed {
            execution: execution.clone(),
            offer: None,
        },
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_round_trips_through_its_row() {
        let run = RunKey {
            owner: PeerId::random(),
            invocation_id: 42,
            call_digest: [7; 32],
        };
        let (back, started) = decode(&row_key(&run), &row_value(&run, 1234, b"")).unwrap();
        assert_eq!((back, started), (run, 1234));
        assert!(answer_of(&row_value(&run, 1234, b"")).is_none());
        let answer = Response::Failed {
            reason: "no".into(),
            retryable: false,
        };
        let encoded = cbor4ii::serde::to_vec(Vec::new(), &answer).unwrap();
        let value = row_value(&run, 5, &encoded);
        assert_eq!(decode(&row_key(&run), &value).unwrap().1, 5);
        assert_eq!(answer_of(&value), Some(answer));
        assert!(decode(b"short", &row_value(&run, 1, b"")).is_none());
        assert!(decode(&row_key(&run), b"bad").is_none());
    }
}
