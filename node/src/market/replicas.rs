//! Replicated calls on the client's side: the call run on N distinct volunteers one
//! after another, each run excluding the volunteers of the runs before, each answer's
//! receipt checked like any invocation's, then the majority taken
//! ([`flotilla_api::replicas::vote`]). A disagreement is logged naming the outvoted
//! volunteers; with no majority the call fails with both sides.

use super::Market;
use super::function::{FunctionCall, Invocation};
use super::invoking::InvokeError;
pub use flotilla_api::replicas::{MAX_REPLICAS, ReplicaReport, vote};
use flotilla_scheduler::placement::Policy;
use libp2p::PeerId;

impl Market {
    /// Runs `call` on `replicas` distinct volunteers and returns the majority's answer
    /// with the report of how they compared (none for a single replica).
    ///
    /// Unless `fresh` or replicated, a memoized answer answers at once (`super::memos`);
    /// the answers signed as pure are published as memos, the outvoted ones never.
    pub async fn invoke_replicated(
        &self,
        call: FunctionCall,
        max_tries: Option<u32>,
        placement: Option<Policy>,
        replicas: u32,
        fresh: bool,
    ) -> Result<(Invocation, Option<ReplicaReport>), InvokeError> {
        if replicas > MAX_REPLICAS {
            return Err(InvokeError::Rejected(format!(
                "{replicas} replicas (at most {MAX_REPLICAS})"
            )));
        }
        call.validate()
            .map_err(|e| InvokeError::Rejected(e.to_string()))?;
        if !fresh
            && replicas <= 1
            && let Some(memoized) = self.memoized(&call).await
        {
            return Ok((memoized, None));
        }
        if replicas <= 1 {
            let invocation = self.invoke(call.clone(), max_tries, placement).await?;
            self.publish_memos(&call, std::slice::from_ref(&invocation))
                .await;
            return Ok((invocation, None));
        }
        let mut runs: Vec<Invocation> = Vec::with_capacity(replicas as usize);
        let mut exclude: Vec<PeerId> = Vec::with_capacity(replicas as usize);
        for n in 1..=replicas {
            let run = self
                .invoke_excluding(call.clone(), max_tries, placement, exclude.clone())
                .await
                .map_err(|e| replica_failed(n, replicas, e))?;
            let volunteer: PeerId = run.execution.volunteer.parse().map_err(|_| {
                InvokeError::Unanswered(format!(
                    "replica {n} names no volunteer ({:?})",
                    run.execution.volunteer
                ))
            })?;
            if exclude.contains(&volunteer) {
                return Err(InvokeError::Failed {
                    reason: format!("replica {n} ran on {volunteer}, which ran another replica"),
                    retryable: true,
                });
            }
            exclude.push(volunteer);
            runs.push(run);
        }
        let (report, winner) = vote(&runs);
        match winner {
            Some(i) => {
                let agreeing: Vec<Invocation> = runs
                    .iter()
                    .filter(|run| !report.dissenters.contains(&run.execution.volunteer))
                    .cloned()
                    .collect();
                self.publish_memos(&call, &agreeing).await;
                if !report.dissenters.is_empty() {
                    tracing::warn!(
                        dissenters = ?report.dissenters,
                        "replicas disagreed: {}",
                        report.describe()
                    );
                }
                Ok((runs.swap_remove(i), Some(report)))
            }
            None => Err(InvokeError::NoMajority(report.describe())),
        }
    }
}

/// A replica's failure, saying which.
fn replica_failed(n: u32, of: u32, e: InvokeError) -> InvokeError {
    match e {
        InvokeError::Failed { reason, retryable } => InvokeError::Failed {
            reason: format!("replica {n} of {of}: {reason}"),
            retryable,
        },
        InvokeError::Unanswered(why) => {
            InvokeError::Unanswered(format!("replica {n} of {of}: {why}"))
        }
        other => other,
    }
}
