//! Detached jobs, for clients that go offline: a scheduler takes a call, answers with a
//! job id at once, and places it when an offer fits (waiting, up to a deadline, while
//! none does). Each change of the job's state is a new version of a record signed by
//! the scheduler, kept by the scheduler and copied to the peers closest to the job's key,
//! so anyone can read the state and result CIDs later — after the client restarted, and
//! after the scheduler left.
//!
//! A job's id is derived from the scheduler that took it and the client's nonce
//! ([`job_id`]), so a record under that id verifies only when signed by that scheduler:
//! no other peer can plant a record for someone else's job, even at a replica that has
//! none yet. Every node keeps the job records it is sent in a bounded [`JobBook`]
//! (`flotilla_scheduler::book`); a version replaces another only if it is newer.

use super::function::{FunctionCall, Invocation, MAX_INLINE_OUTPUT, OutputStream};
use super::protocol::{InvokeRequest, Request, Response};
use super::receipts::SignatureCheck;
use super::{Market, lock};
use crate::state_db::StateChange;
use flotilla_scheduler::book::{BookLimits, RecordBook, Refused, takeover_wait_ms};
use flotilla_scheduler::job::{JobAction, JobRun, Phase, Placed, Version};
use flotilla_scheduler::placement::Policy;
use libp2p::PeerId;
use rand::RngCore;
use std::collections::VecDeque;
use std::time::Duration;

pub use flotilla_api::job::{
    JobRecord, JobRecordError, JobState, SignedJob, job_id, job_id_of_call,
};

/// Jobs one scheduler holds (waiting or running) at once; more are refused.
pub const MAX_JOBS: usize = 256;
/// Job records one node keeps for others.
pub const MAX_JOB_RECORDS: usize = 4096;
/// Most job records a node keeps of one scheduler.
pub const MAX_JOB_RECORDS_PER_SCHEDULER: usize = 1024;
/// How long a job record is kept after its last change.
pub const JOB_RECORD_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long a job may wait for an offer when the client names no deadline.
pub const DEFAULT_JOB_WAIT: Duration = Duration::from_secs(600);
/// The longest a job may wait for an offer.
pub const MAX_JOB_WAIT: Duration = Duration::from_secs(3600);
/// Peers besides the scheduler that keep a copy of each job record.
pub const JOB_REPLICAS: usize = 3;
/// A node keeps a job record only if fewer than this many peers it knows are closer to
/// the job's key: the [`JOB_REPLICAS`] a scheduler's lookup finds, with room for peers the
/// lookup missed and this node knows (its routing table may be fuller).
pub const JOB_KEEPERS: usize = 8;
/// Most copies of job results' blocks a node fetches at once.
pub const MAX_RESULT_COPIES: usize = 8;
/// Most bytes of one job's results (stdout, stderr and output files stored as blocks)
/// that the scheduler and each peer keeping its record copy; a result past the rest of
/// this budget is not copied.
pub const MAX_COPIED_RESULT_BYTES: u64 = 64 * 1024 * 1024;
/// Most job records a node sends on in one republishing round.
pub const MAX_REPUBLISHED_PER_ROUND: usize = 32;
/// Stdout or stderr up to this size is kept in the record; larger ones by CID.
const MAX_RECORD_INLINE: usize = 4 * 1024;

/// The job records a node keeps: the rules are `flotilla_scheduler::book`'s.
pub type JobBook = RecordBook<SignedJob>;

/// How much a node's [`JobBook`] keeps, and for how long; a job silent for
/// `takeover_grace` may be taken over.
pub fn book_limits(takeover_grace: Duration) -> BookLimits {
    BookLimits {
        max_records: MAX_JOB_RECORDS,
        max_per_author: MAX_JOB_RECORDS_PER_SCHEDULER,
        ttl_ms: JOB_RECORD_TTL.as_millis() as u64,
        takeover_grace_ms: takeover_grace.as_millis() as u64,
    }
}

/// Least time between two commits of the job records kept for others.
pub const KEPT_COMMIT_EVERY: Duration = Duration::from_millis(100);
/// How long runs recorded alone gather before they are committed.
const RUNS_COMMIT_EVERY: Duration = Duration::from_secs(1);
/// Most changes one commit of kept job records and runs carries.
const MAX_KEPT_BATCH: usize = 4096;
/// Changes to the kept job records and runs waiting for the writer.
pub(super) const KEPT_QUEUE: usize = 4096;

/// Whether someone waits for `change` to be durable: a kept job record's (or a flush's),
/// not a run's.
fn waited_for(change: &StateChange) -> bool {
    !change.put.is_empty()
        || !change.dropped.is_empty()
        || (change.runs.is_empty() && change.runs_dropped.is_empty())
}

/// A change to the kept job records and who waits for it to be durable.
pub(super) type StateWrite = (
    StateChange,
    tokio::sync::oneshot::Sender<Result<(), String>>,
);

/// Largest call a job record carries (CBOR bytes); a job of a larger one cannot be taken
/// over, so records stay within a request's bound with their result.
pub const MAX_CARRIED_CALL_BYTES: usize = 8 * 1024;

/// How a keeper's refusal of a version begins when another scheduler holds the job.
pub const TAKEN_OVER: &str = "taken over";

/// What became of a job record sent to the peers near its key.
#[derive(Debug, Default, Clone, Copy)]
struct Sent {
    /// Peers that keep it.
    kept: usize,
    /// Peers that refused it because another scheduler holds the job.
    taken_over: usize,
}

/// Most abandoned jobs a node considers taking over per round.
pub const MAX_TAKEOVERS_PER_ROUND: usize = 4;

/// The blocks of a job's result worth copying: stdout and stderr stored by CID, then the
/// output files, in that order while they fit in [`MAX_COPIED_RESULT_BYTES`].
pub fn result_blocks(result: &Invocation) -> Vec<(cid::Cid, u64)> {
    let execution = &result.execution;
    let streams = [&execution.stdout, &execution.stderr]
        .into_iter()
        .filter_map(|s| Some((s.cid.as_deref()?, s.size)));
    let files = execution.outputs.iter().map(|o| (o.cid.as_str(), o.size));
    let mut budget = MAX_COPIED_RESULT_BYTES;
    let mut blocks = Vec::new();
    for (cid, size) in streams.chain(files) {
        let Ok(cid) = cid.parse::<cid::Cid>() else {
            continue;
        };
        if size <= budget {
            budget -= size;
            blocks.push((cid, size));
        }
    }
    blocks
}

/// The DHT key whose closest peers keep job `id`'s record.
pub fn job_key(id: u64) -> Vec<u8> {
    let mut key = b"/flotilla/job/".to_vec();
    key.extend_from_slice(&id.to_be_bytes());
    key
}

/// Why a job could not be submitted or read.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The submission failed.
    #[error(transparent)]
    Invoke(#[from] super::InvokeError),
    /// No peer has a record of the job.
    #[error("no record of job {0:016x} found (unknown id, or every peer that kept it left)")]
    Unknown(u64),
}

/// A detached job this node schedules, as its database keeps it until the job ends: who
/// asked, what, and the newest version of its record (`crate::state_db`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct ScheduledJob {
    client: PeerId,
    request: InvokeRequest,
    record: JobRecord,
}

/// The phase a record's state is in.
fn phase_of(state: JobState) -> Phase {
    match state {
        JobState::Waiting => Phase::Waiting,
        JobState::Running => Phase::Running,
        JobState::Done => Phase::Done,
        JobState::Failed => Phase::Failed,
    }
}

/// The record's state for a phase of the job's lifecycle.
fn state_of(phase: Phase) -> JobState {
    match phase {
        Phase::Waiting => JobState::Waiting,
        Phase::Running => JobState::Running,
        Phase::Done => JobState::Done,
        Phase::Failed => JobState::Failed,
    }
}

impl Market {
    /// Takes a job for later placement, if there is room for it, and answers with its
    /// id. A nonce this scheduler already took a job for (a client's retry) is answered
    /// with that job's id and not run again.
    /// `from`, the client, holds at most a share of the jobs this scheduler takes.
    pub(super) async fn take_job(
        &self,
        from: PeerId,
        request: InvokeRequest,
        wait: Duration,
    ) -> Response {
        // The record carries the call (bound into the job's id) so another peer can take
        // the job over — unless the call is too large for records to stay small.
        let carried = cbor4ii::serde::to_vec(Vec::new(), &request.call)
            .is_ok_and(|bytes| bytes.len() <= MAX_CARRIED_CALL_BYTES)
            .then(|| request.call.clone());
        let job_id = match &carried {
            Some(call) => job_id_of_call(&self.peer_id(), request.invocation_id, call),
            None => job_id(&self.peer_id(), request.invocation_id),
        };
        if let Some(refusal) = self.refuse_call(&request.call) {
            return refusal;
        }
        let now = self.now();
        let record = JobRecord {
            job_id,
            nonce: request.invocation_id,
            seq: 0,
            scheduler: self.peer_id().to_string(),
            taken_from: None,
            call: carried,
            state: JobState::Waiting,
            module: request.call.module.clone(),
            submitted_at_ms: now,
            wait_until_ms: now + wait.min(MAX_JOB_WAIT).as_millis() as u64,
            updated_at_ms: now,
            attempts: 0,
            error: None,
            result: None,
        };
        // Checked and kept in one command, so two copies of the same Submit arriving at
        // once start one job.
        let jobs_held = self.shared.jobs_held.clone();
        let first = SignedJob::sign(record.clone(), &self.shared.keypair);
        let taken = self
            .with(move |m, now| {
                if m.jobs.get(job_id).is_some() {
                    return Ok(None);
                }
                let slot = jobs_held.take(from).ok_or(())?;
                if let Err(e) = m.jobs.put(now, first) {
                    tracing::warn!(job = job_id, error = %e, "cannot keep a job record");
                }
                Ok(Some(slot))
            })
            .await;
        let slot = match taken {
            Ok(Ok(Some(slot))) => slot,
            Ok(Ok(None)) => return Response::Accepted { job_id },
            Ok(Err(())) => {
                return Response::Failed {
                    reason: format!(
                        "the scheduler holds {MAX_JOBS} jobs, or a quarter of them for this \
                         client, already; try later"
                    ),
                    retryable: true,
                };
            }
            Err(_) => return Response::stopping(),
        };
        // Durable before the client is told the id: a restart carries it on. A job that
        // cannot be recorded is not taken.
        if let Err(e) = self.remember_job(from, &request, &record).await {
            tracing::error!(job = job_id, error = %e, "cannot record a job: refused");
            let _ = self.with(move |m, _| m.jobs.remove(job_id)).await;
            return Response::Failed {
                reason: format!("the scheduler cannot record the job: {e}"),
                retryable: true,
            };
        }
        let market = self.clone();
        self.spawn(async move {
            market
                .run_job(from, request, record, slot, false, None)
                .await
        });
        Response::Accepted { job_id }
    }

    /// Records a job this node schedules, with its newest record, in the node's database
    /// (nothing without one); durable when this returns.
    async fn remember_job(
        &self,
        client: PeerId,
        request: &InvokeRequest,
        record: &JobRecord,
    ) -> Result<(), String> {
        let Some(state) = self.state() else {
            return Ok(());
        };
        let id = record.job_id;
        let job = ScheduledJob {
            client,
            request: request.clone(),
            record: record.clone(),
        };
        tokio::task::spawn_blocking(move || {
            let bytes = cbor4ii::serde::to_vec(Vec::new(), &job).map_err(|e| e.to_string())?;
            state.put_job(id, &bytes).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// Records in the node's database the job records this node now keeps for others
    /// (`put`: id and encoded record) and forgets those its book dropped, through the
    /// batching writer ([`Market::write_state_changes`]); nothing without a database.
    async fn keep_records(
        &self,
        put: Vec<(u64, Vec<u8>)>,
        dropped: Vec<u64>,
    ) -> Result<(), String> {
        if put.is_empty() && dropped.is_empty() {
            return Ok(());
        }
        let Some(writer) = lock(&self.shared.state_writer).clone() else {
            return Ok(());
        };
        let (done, written) = tokio::sync::oneshot::channel();
        let change = StateChange {
            put,
            dropped,
            ..StateChange::default()
        };
        writer
            .send((change, done))
            .await
            .map_err(|_| "the node is stopping".to_string())?;
        written
            .await
            .map_err(|_| "the node is stopping".to_string())?
    }

    /// Writes the changes to the records kept for others and to the runs recorded
    /// (`super::run_log`) as they queue, all those queued at once in one transaction, and
    /// then waits [`KEPT_COMMIT_EVERY`] before the next: a flood of `StoreJob`s costs the
    /// disk at most one sync per interval, and each waits a little longer for its answer.
    pub(super) async fn write_state_changes(
        self,
        state: std::sync::Arc<crate::state_db::StateDb>,
        mut queue: tokio::sync::mpsc::Receiver<StateWrite>,
    ) {
        while let Some(first) = queue.recv().await {
            let mut batch = vec![first];
            // Runs recorded (nobody waits for them) gather for up to RUNS_COMMIT_EVERY,
            // so a busy volunteer commits them rarely; a change someone waits for ends
            // the gathering.
            let gather_until = tokio::time::Instant::now() + RUNS_COMMIT_EVERY;
            while batch.len() < MAX_KEPT_BATCH && !batch.iter().any(|(c, _)| waited_for(c)) {
                match tokio::time::timeout_at(gather_until, queue.recv()).await {
                    Ok(Some(next)) => batch.push(next),
                    _ => break,
                }
            }
            while batch.len() < MAX_KEPT_BATCH {
                match queue.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            let (changes, acks): (Vec<StateChange>, Vec<_>) = batch.into_iter().unzip();
            let state = state.clone();
            let written = tokio::task::spawn_blocking(move || state.keep_records(&changes))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
            for ack in acks {
                let _ = ack.send(written.clone());
            }
            tokio::time::sleep(KEPT_COMMIT_EVERY).await;
        }
    }

    /// Puts back in the book the job records this node kept for others before it
    /// restarted, as its database kept them (silence for a takeover counts from now), and
    /// forgets those the book no longer takes (expired, or no room).
    pub(super) async fn reload_kept_records(&self) {
        let Some(state) = self.state() else {
            return;
        };
        let rows = match tokio::task::spawn_blocking(move || state.kept_records()).await {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot read the job records kept for others");
                return;
            }
            Err(_) => return,
        };
        let count = rows.len();
        let dropped = self
            .with(move |m, now| {
                let mut dropped = Vec::new();
                for (id, bytes) in rows {
                    let kept = cbor4ii::serde::from_slice::<SignedJob>(&bytes)
                        .ok()
                        .filter(|job| job.record.job_id == id)
                        .is_some_and(|job| m.jobs.put(now, job).is_ok());
                    if !kept {
                        dropped.push(id);
                    }
                }
                dropped.extend(m.jobs.take_dropped());
                dropped
            })
            .await
            .unwrap_or_default();
        tracing::info!(
            records = count,
            dropped = dropped.len(),
            "job records kept for others reloaded"
        );
        if let Err(e) = self.keep_records(Vec::new(), dropped).await {
            tracing::warn!(error = %e, "cannot forget job records no longer kept");
        }
    }

    /// Forgets a job that ended.
    async fn forget_job(&self, id: u64) {
        let Some(state) = self.state() else {
            return;
        };
        let removed = tokio::task::spawn_blocking(move || state.remove_job(id)).await;
        if let Ok(Err(e)) = removed {
            tracing::warn!(job = id, error = %e, "cannot forget an ended job");
        }
    }

    /// Carries on the jobs this node scheduled before it restarted, as its database kept
    /// them.
    pub(super) async fn resume_jobs(&self) {
        let Some(state) = self.state() else {
            return;
        };
        let jobs = match tokio::task::spawn_blocking(move || state.jobs()).await {
            Ok(Ok(jobs)) => jobs,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot read the jobs this node scheduled");
                return;
            }
            Err(_) => return,
        };
        for (id, bytes) in jobs {
            let job: ScheduledJob = match cbor4ii::serde::from_slice(&bytes) {
                Ok(job) => job,
                Err(e) => {
                    tracing::warn!(job = id, error = %e, "dropping an unreadable scheduled job");
                    self.forget_job(id).await;
                    continue;
                }
            };
            // Back in the book before anyone can ask, so a client's retry of the same
            // submission finds the job instead of starting it twice.
            let signed = SignedJob::sign(job.record.clone(), &self.shared.keypair);
            let _ = self.with(move |m, now| m.jobs.put(now, signed)).await;
            if phase_of(job.record.state).is_final() {
                // Stopped between recording its final version and forgetting it: send
                // that version on, then forget it.
                let market = self.clone();
                self.spawn(async move {
                    let signed = SignedJob::sign(job.record, &market.shared.keypair);
                    let _ = market.send_job_record(signed).await;
                    market.forget_job(id).await;
                });
                continue;
            }
            let Some(slot) = self.shared.jobs_held.take(job.client) else {
                tracing::warn!(job = id, "no room to carry on a scheduled job");
                continue;
            };
            tracing::info!(job = id, state = %job.record.state, "carrying on a job scheduled before the restart");
            let market = self.clone();
            self.spawn(async move {
                market
                    .run_job(job.client, job.request, job.record, slot, true, None)
                    .await
            });
        }
    }

    /// Carries out a job's lifecycle ([`JobRun`] decides): publishes each version of its
    /// record, places it, and places it again while nothing fits and its deadline
    /// allows, until it has ended (or the node stops). `resumed`: the job was taken
    /// before this node restarted, and `record` is its newest version. Each version is
    /// recorded in the node's database before it is published, and the job forgotten
    /// there once its final version is out.
    async fn run_job(
        self,
        from: PeerId,
        request: InvokeRequest,
        mut record: JobRecord,
        _slot: super::slots::Slot,
        resumed: bool,
        takeover_reason: Option<String>,
    ) {
        let retry_every = self
            .shared
            .config
            .notify_interval
            .clamp(Duration::from_millis(200), Duration::from_secs(10))
            .as_millis() as u64;
        let (mut run, actions) = if resumed {
            let latest = Version {
                seq: record.seq,
                phase: phase_of(record.state),
                attempts: record.attempts,
                error: record.error.clone(),
            };
            match takeover_reason {
                Some(reason) => JobRun::take_over(
                    self.now(),
                    latest,
                    record.wait_until_ms,
                    retry_every,
                    reason,
                ),
                None => JobRun::resume(self.now(), latest, record.wait_until_ms, retry_every),
            }
        } else {
            JobRun::start(self.now(), record.wait_until_ms, retry_every)
        };
        // A version at least every third of the takeover grace, so keepers can tell
        // this scheduler is alive.
        let heartbeat = (self.shared.config.job_takeover_grace / 3).as_millis() as u64;
        run.keep_alive_every(self.now(), heartbeat.max(1));
        let mut due: VecDeque<JobAction> = actions.into();
        loop {
            while let Some(action) = due.pop_front() {
                match action {
                    JobAction::Publish(version) => {
                        let going_on = self
                            .publish_version(from, &request, &mut record, &mut run, version)
                            .await;
                        if !going_on {
                            return;
                        }
                    }
                    JobAction::Place => {
                        let check = SignatureCheck::BeforeAnswering;
                        let placing = self.place_and_run(from, request.clone(), check);
                        tokio::pin!(placing);
                        // A call may run longer than the takeover grace: heartbeats go
                        // out while it runs.
                        let answer = loop {
                            let wake = run.next_wakeup().unwrap_or(u64::MAX);
                            let pause = Duration::from_millis(wake.saturating_sub(self.now()))
                                .min(Duration::from_secs(3600));
                            tokio::select! {
                                answer = &mut placing => break answer,
                                () = tokio::time::sleep(pause) => {
                                    for beat in run.poll(self.now()) {
                                        if let JobAction::Publish(version) = beat {
                                            let going_on = self
                                                .publish_version(
                                                    from, &request, &mut record, &mut run, version,
                                                )
                                                .await;
                                            if !going_on {
                                                return;
                                            }
                                        }
                                    }
                                }
                            }
                        };
                        let placed = match answer {
                            Response::Invoked(invocation) => {
                                let invocation = self.recordable(*invocation).await;
                                // The volunteer may leave before the client reads it.
                                self.copy_result_blocks(result_blocks(&invocation));
                                record.result = Some(invocation);
                                Placed::Ran
                            }
                            Response::Failed { reason, retryable } => {
                                Placed::Failed { reason, retryable }
                            }
                            other => Placed::Failed {
                                reason: format!("unexpected answer {other:?}"),
                                retryable: false,
                            },
                        };
                        due.extend(run.on_placed(self.now(), placed));
                    }
                }
            }
            let Some(wake) = run.next_wakeup() else {
                return;
            };
            tokio::time::sleep(Duration::from_millis(wake.saturating_sub(self.now()))).await;
            due.extend(run.poll(self.now()));
        }
    }

    /// Records, signs and publishes `version` of the job; answers whether the job goes on
    /// here: not once it has ended, nor once the peers near its key refuse the version
    /// because another scheduler took the job over (this one was thought gone), which is
    /// then forgotten here rather than run twice.
    async fn publish_version(
        &self,
        from: PeerId,
        request: &InvokeRequest,
        record: &mut JobRecord,
        run: &mut JobRun,
        version: Version,
    ) -> bool {
        let seq = version.seq;
        record.seq = seq;
        record.state = state_of(version.phase);
        record.attempts = version.attempts;
        record.error = version.error;
        record.updated_at_ms = self.now();
        if let Err(e) = self.remember_job(from, request, record).await {
            tracing::warn!(job = record.job_id, error = %e, "cannot record the job's new version");
        }
        let sent = self.publish_job(record).await;
        run.on_published(self.now(), seq, sent.kept);
        if version.phase.is_final() {
            self.forget_job(record.job_id).await;
            return false;
        }
        if sent.kept == 0 && sent.taken_over > 0 {
            tracing::warn!(
                job = record.job_id,
                "another scheduler took the job over; letting it go"
            );
            self.forget_job(record.job_id).await;
            return false;
        }
        true
    }

    /// Considers taking over `job`, a record kept here of a job not ended whose scheduler
    /// has been silent past the grace period (the book picked it,
    /// `RecordBook::abandoned`). A scheduler takes it when the record carries its call
    /// and it has room, after the grace period plus half of it for each peer it knows
    /// closer to the job's key — so the closest keeper goes first, and the others find
    /// its takeover (kept by the peers near the key, which then refuse any other) before
    /// their turn. The takeover version, signed by this node and naming the scheduler
    /// that took the job first, must be kept by a peer near the key before the job is
    /// placed again; the job then runs here under the same id, and the client reads it
    /// as before.
    pub(super) async fn consider_takeover(self, job: SignedJob, silent_ms: u64) {
        let id = job.record.job_id;
        let Some(call) = job.record.call.clone() else {
            return;
        };
        if self.refuse_call(&call).is_some() {
            return;
        }
        let grace = self.shared.config.job_takeover_grace;
        let Ok(rank) = self.shared.network.closer_peers_known(job_key(id)).await else {
            return;
        };
        let wait = takeover_wait_ms(grace.as_millis() as u64, rank);
        if silent_ms < wait {
            return;
        }
        let silent = Duration::from_millis(silent_ms);
        let Some(seq) = job.record.seq.checked_add(1) else {
            return;
        };
        // A keeper holding a newer version (one this node missed, or another's takeover)
        // means this node's copy is not the job's last word: keep that version instead,
        // and consider the job again once it too has been silent long enough.
        let newest_near = self
            .versions_near(id)
            .await
            .1
            .into_iter()
            .max_by_key(|j| j.record.seq);
        if let Some(newer) = newest_near.filter(|j| j.record.seq > job.record.seq) {
            tracing::debug!(
                job = id,
                seq = newer.record.seq,
                "a keeper holds a newer version; not taking over yet"
            );
            let _ = self.with(move |m, now| m.jobs.put(now, newer)).await;
            return;
        }
        // Another keeper's takeover may have reached this node meanwhile.
        let held = self.with(move |m, _| m.jobs.get(id).cloned()).await;
        let Ok(Some(held)) = held else { return };
        if held.record.seq != job.record.seq || held.record.scheduler != job.record.scheduler {
            return;
        }
        let first = job
            .record
            .taken_from
            .clone()
            .unwrap_or_else(|| job.record.scheduler.clone());
        let Ok(first_peer) = first.parse::<PeerId>() else {
            return;
        };
        let Some(slot) = self.shared.jobs_held.take(first_peer) else {
            tracing::info!(job = id, "no room to take over an abandoned job");
            return;
        };
        let reason = format!(
            "taken over by {} from {}, silent for {}s",
            self.peer_id(),
            job.record.scheduler,
            silent.as_secs()
        );
        let mut record = job.record.clone();
        record.scheduler = self.peer_id().to_string();
        record.taken_from = Some(first);
        record.seq = seq;
        // A record's deadline is its scheduler's word: no longer than a job may wait.
        let longest = record
            .submitted_at_ms
            .saturating_add(MAX_JOB_WAIT.as_millis() as u64);
        record.wait_until_ms = record.wait_until_ms.min(longest);
        record.state = JobState::Waiting;
        record.error = Some(reason.clone());
        record.updated_at_ms = self.now();
        let signed = SignedJob::sign(record.clone(), &self.shared.keypair);
        let mine = signed.clone();
        match self.with(move |m, now| m.jobs.put(now, mine)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(job = id, error = %e, "not taking the job over");
                return;
            }
            Err(_) => return,
        }
        if self.send_job_record(signed).await.kept == 0 {
            tracing::info!(
                job = id,
                "no peer near the job's key kept the takeover; not running it"
            );
            // The version it took over back in place of its own, which nobody else keeps.
            let _ = self
                .with(move |m, now| {
                    m.jobs.remove(id);
                    m.jobs.put(now, job)
                })
                .await;
            return;
        }
        let request = InvokeRequest {
            invocation_id: record.nonce,
            call,
            max_tries: None,
            placement: None,
            exclude: Vec::new(),
            refused: None,
        };
        if let Err(e) = self.remember_job(first_peer, &request, &record).await {
            tracing::warn!(job = id, error = %e, "cannot record a job taken over");
        }
        tracing::info!(job = id, %reason, "took over a job whose scheduler went silent");
        self.run_job(first_peer, request, record, slot, true, Some(reason))
            .await;
    }

    /// The invocation as a record keeps it: stdout or stderr over a few KiB moved to
    /// blocks, so records stay small.
    async fn recordable(&self, mut invocation: Invocation) -> Invocation {
        for stream in [
            &mut invocation.execution.stdout,
            &mut invocation.execution.stderr,
        ] {
            if stream.inline.len() > MAX_RECORD_INLINE {
                debug_assert!(stream.inline.len() <= MAX_INLINE_OUTPUT);
                if let Ok(added) = self.shared.overlay.add(&stream.inline[..]).await {
                    *stream = OutputStream {
                        size: stream.size,
                        inline: Vec::new(),
                        cid: Some(added.cid),
                    };
                }
            }
        }
        invocation
    }

    /// Signs the next version of `record`, keeps it, and sends it to the peers closest to
    /// the job's key (waiting at most the answer timeout).
    async fn publish_job(&self, record: &mut JobRecord) -> Sent {
        record.updated_at_ms = self.now();
        let signed = SignedJob::sign(record.clone(), &self.shared.keypair);
        let kept = signed.clone();
        if let Ok(Err(e)) = self.with(move |m, now| m.jobs.put(now, kept)).await {
            tracing::warn!(job = record.job_id, error = %e, "cannot keep a job record");
        }
        let sent = self.send_job_record(signed).await;
        let stored = sent.kept;
        if stored == 0 {
            // Only this scheduler keeps it now: `job status` fails once it leaves.
            tracing::warn!(job = record.job_id, state = %record.state, "no peer kept the job record");
        } else {
            tracing::debug!(job = record.job_id, state = %record.state, replicas = stored, "job record published");
        }
        sent
    }

    /// Sends `job` to the peers closest to its key (waiting at most the answer timeout
    /// for each step); answers how many kept it.
    async fn send_job_record(&self, job: SignedJob) -> Sent {
        let timeout = self.shared.config.answer_timeout;
        let closest = tokio::time::timeout(
            timeout,
            self.shared
                .network
                .closest_peers(job_key(job.record.job_id)),
        )
        .await;
        let peers = match closest {
            Ok(Ok(found)) => found.peers,
            _ => Vec::new(),
        };
        let sends = peers.into_iter().take(JOB_REPLICAS).map(|peer| {
            let request = Request::StoreJob(Box::new(job.clone()));
            self.call(peer, Vec::new(), request, timeout)
        });
        let mut sent = Sent::default();
        for answer in futures::future::join_all(sends).await {
            match answer {
                Ok(Response::JobStored) => sent.kept += 1,
                Ok(Response::Refused { reason }) if reason.starts_with(TAKEN_OVER) => {
                    sent.taken_over += 1;
                }
                _ => {}
            }
        }
        sent
    }

    /// Sends records this node keeps (its own jobs' and others') on to the peers now
    /// closest to their keys, so a record survives the peers that kept it leaving — as
    /// Kademlia republishes its values. The loop picks them every
    /// `job_republish_interval`, a bounded number per round.
    pub(super) async fn republish(self, due: Vec<SignedJob>) {
        let count = due.len();
        let sends = due.into_iter().map(|job| self.send_job_record(job));
        let stored: usize = futures::future::join_all(sends)
            .await
            .into_iter()
            .map(|sent| sent.kept)
            .sum();
        tracing::debug!(records = count, stored, "job records republished");
    }

    /// Keeps a job record another peer sent, and a copy of its result's blocks (stdout,
    /// stderr and output files, [`MAX_COPIED_RESULT_BYTES`] at most): the record
    /// outlives the scheduler and the volunteer, so must what it points to.
    ///
    /// Only a node among the [`JOB_KEEPERS`] closest to the job's key keeps it (nobody
    /// would look for it anywhere else), and only the first version with a result starts
    /// a copy, charged to the job's scheduler's quota ([`super::copies`]): nothing a
    /// stranger sends makes this node keep bytes beyond what it agreed to.
    pub(super) async fn store_job(&self, from: PeerId, job: SignedJob) -> Response {
        let id = job.record.job_id;
        match self
            .shared
            .network
            .among_closest(job_key(id), JOB_KEEPERS)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                tracing::debug!(peer = %from, job = id, "job record refused: not near its key");
                return Response::Refused {
                    reason: format!(
                        "this node is not among the {JOB_KEEPERS} peers closest to job \
                         {id:016x}'s key"
                    ),
                };
            }
            Err(_) => return Response::stopping(),
        }
        let blocks = job.record.result.as_ref().map(result_blocks);
        let scheduler = job.record.scheduler.parse::<PeerId>().ok();
        let author = job.record.scheduler.clone();
        let encoded = cbor4ii::serde::to_vec(Vec::new(), &job).unwrap_or_default();
        let kept = self
            .with(move |m, now| {
                let held = m.jobs.get(id);
                let had_result = held.is_some_and(|j| j.record.result.is_some());
                let held_by = held.map(|j| j.record.scheduler.clone());
                let kept = m
                    .jobs
                    .put(now, job)
                    .map(|()| had_result)
                    .map_err(|e| (e, held_by));
                (kept, m.jobs.take_dropped())
            })
            .await;
        let Ok((kept, dropped)) = kept else {
            return Response::stopping();
        };
        // Durable before this node answers that it keeps the record.
        let put = if kept.is_ok() {
            vec![(id, encoded)]
        } else {
            Vec::new()
        };
        if let Err(e) = self.keep_records(put, dropped).await {
            tracing::warn!(job = id, error = %e, "cannot record a job record kept for others");
            if kept.is_ok() {
                return Response::Refused {
                    reason: format!("this node cannot record the job record: {e}"),
                };
            }
        }
        match kept {
            Ok(had_result) => {
                if let (false, Some(blocks), Some(scheduler)) = (had_result, blocks, scheduler) {
                    self.copy_charged(scheduler, id, blocks);
                }
                Response::JobStored
            }
            // As new a version of its own scheduler is held: nothing lost.
            Err((Refused::Stale(_), Some(held_by))) if held_by == author => Response::JobStored,
            // Another scheduler's version is held: the job was taken over.
            Err((Refused::Stale(_) | Refused::NotTakenOver(_), Some(held_by))) => {
                Response::Refused {
                    reason: format!("{TAKEN_OVER}: job {id:016x} is held by {held_by}"),
                }
            }
            Err((e, _)) => Response::Refused {
                reason: e.to_string(),
            },
        }
    }

    /// Copies a job's result blocks if its scheduler's quota has room for them all.
    fn copy_charged(&self, scheduler: PeerId, job: u64, blocks: Vec<(cid::Cid, u64)>) {
        let bytes: u64 = blocks.iter().map(|(_, size)| size).sum();
        let now = self.now();
        let (charged, total) = {
            let mut quota = self
                .shared
                .copy_quota
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            (quota.charge(now, scheduler, bytes), quota.total())
        };
        self.shared.metrics.copies_charged.set(total as i64);
        if charged {
            self.copy_result_blocks(blocks);
        } else {
            self.shared.metrics.copies_refused.inc();
            tracing::info!(%scheduler, job, bytes, "job result not copied: over its scheduler's quota");
        }
    }

    /// Fetches the files of `blocks` in the background, each given up once more than
    /// its size's worth arrived (a record's sizes are the scheduler's word); skipped
    /// when [`MAX_RESULT_COPIES`] fetches already run.
    fn copy_result_blocks(&self, blocks: Vec<(cid::Cid, u64)>) {
        for (cid, size) in blocks {
            if self.shared.overlay.store().has(&cid) && size <= MAX_INLINE_OUTPUT as u64 {
                continue;
            }
            let Ok(permit) = self.shared.result_copies.clone().try_acquire_owned() else {
                tracing::debug!(%cid, "too many result copies running; not copying");
                continue;
            };
            let market = self.clone();
            self.spawn(async move {
                // A copy is cache: safe from eviction only while it is fetched.
                let lease = market.shared.overlay.store().lease();
                let fetched = market.fetch_at_most(cid, size, &lease).await;
                tracing::debug!(%cid, ?fetched, "copied a job result's blocks");
                drop(permit);
            });
        }
    }

    /// How many detached jobs this node holds as scheduler (waiting or running).
    pub fn jobs_held(&self) -> usize {
        self.shared.jobs_held.in_use()
    }

    /// The newest record of job `id` this node keeps itself (not asking others).
    pub async fn job_kept_here(&self, id: u64) -> Option<JobRecord> {
        self.with(move |m, _| m.jobs.get(id).map(|j| j.record.clone()))
            .await
            .ok()
            .flatten()
    }

    /// The newest version of job `id` this node holds.
    pub(super) async fn held_job(&self, id: u64) -> Response {
        let held = self
            .with(move |m, _| m.jobs.get(id).cloned().map(Box::new))
            .await;
        match held {
            Ok(job) => Response::Job(job),
            Err(_) => Response::stopping(),
        }
    }

    /// Submits `call` as a detached job through a scheduler picked at random; returns
    /// its id once a scheduler has taken it.
    pub async fn submit(
        &self,
        call: FunctionCall,
        max_tries: Option<u32>,
        placement: Option<Policy>,
        wait: Duration,
    ) -> Result<u64, JobError> {
        call.validate()
            .map_err(|e| super::InvokeError::Rejected(e.to_string()))?;
        let nonce = rand::rng().next_u64() >> 1;
        let request = InvokeRequest {
            invocation_id: nonce,
            call,
            max_tries,
            placement,
            exclude: Vec::new(),
            refused: None,
        };
        let wait_ms = wait.min(MAX_JOB_WAIT).as_millis() as u64;
        self.ask_a_scheduler(
            || Request::Submit {
                request: Box::new(request.clone()),
                wait_ms,
            },
            self.shared.config.answer_timeout * 4,
        )
        .await
        .and_then(|response| match response {
            Response::Accepted { job_id } => Ok(job_id),
            Response::Failed { reason, retryable } => {
                Err(super::InvokeError::Failed { reason, retryable })
            }
            other => Err(super::InvokeError::Unanswered(format!(
                "unexpected answer {other:?}"
            ))),
        })
        .map_err(JobError::from)
    }

    /// The newest record of job `id`: held here, or asked of the peers closest to its key.
    /// A version signed by another scheduler than the newest one found (a takeover) is
    /// taken only if it is newer and its signer is this node or among the peers closest
    /// to the job's key that the lookup found: a takeover comes from there.
    pub async fn job(&self, id: u64) -> Result<JobRecord, JobError> {
        let kept: Option<JobRecord> = self.job_kept_here(id).await;
        let (peers, answers) = self.versions_near(id).await;
        let near: Vec<String> = peers
            .iter()
            .chain(std::iter::once(&self.peer_id()))
            .map(|p| p.to_string())
            .collect();
        newest_of(kept, answers, &near).ok_or(JobError::Unknown(id))
    }

    /// The peers closest to job `id`'s key, and the versions of the job those asked
    /// (the first few) hold, each verified.
    async fn versions_near(&self, id: u64) -> (Vec<PeerId>, Vec<SignedJob>) {
        let timeout = self.shared.config.answer_timeout;
        let closest =
            tokio::time::timeout(timeout, self.shared.network.closest_peers(job_key(id))).await;
        let peers: Vec<PeerId> = match closest {
            Ok(Ok(found)) => found.peers,
            _ => Vec::new(),
        };
        let asks = peers
            .iter()
            .take(JOB_REPLICAS + 2)
            .map(|peer| self.call(*peer, Vec::new(), Request::FindJob { job_id: id }, timeout));
        let versions = futures::future::join_all(asks)
            .await
            .into_iter()
            .filter_map(|answer| match answer {
                Ok(Response::Job(Some(job))) if job.record.job_id == id && job.verify().is_ok() => {
                    Some(*job)
                }
                _ => None,
            })
            .collect();
        (peers, versions)
    }
}

/// The newest record of a job among the one kept here (`kept`) and the `answers` of the
/// peers near its key (each verified, one per peer), `near` naming those peers and this
/// node. A scheduler's versions replace older ones of the same scheduler. A takeover
/// (another peer's version) is taken only if it is newer, its signer is near the key,
/// at least two peers answered with that very version (or this node keeps it), and a
/// result in it carries a receipt that verifies, names the taker as scheduler and
/// matches the record's call — so one peer near the key cannot show the client a result
/// of its own making.
fn newest_of(
    kept: Option<JobRecord>,
    mut answers: Vec<SignedJob>,
    near: &[String],
) -> Option<JobRecord> {
    let mut newest = kept.clone();
    // The scheduler's own versions first, then takeovers, each oldest first, so a
    // takeover is weighed against the newest version of the job before it.
    answers.sort_by_key(|j| (j.is_takeover(), j.record.seq));
    let held_by: Vec<usize> = answers
        .iter()
        .map(|job| answers.iter().filter(|j| j.record == job.record).count())
        .collect();
    for (job, held_by) in answers.into_iter().zip(held_by) {
        let newer = if job.is_takeover() {
            let vouched = held_by >= 2 || kept.as_ref() == Some(&job.record);
            near.contains(&job.record.scheduler)
                && vouched
                && takeover_result_checks(&job.record)
                && newest.as_ref().is_none_or(|n| n.seq < job.record.seq)
        } else {
            newest
                .as_ref()
                .is_none_or(|n| n.seq < job.record.seq && n.scheduler == job.record.scheduler)
        };
        if newer {
            newest = Some(job.record);
        }
    }
    newest
}

/// Whether a taken-over job's result, if any, carries a receipt that verifies for the
/// volunteer it names, was made for the taker, and matches the record's call.
fn takeover_result_checks(record: &JobRecord) -> bool {
    let Some(result) = &record.result else {
        return true;
    };
    let (Some(receipt), Some(call)) = (result.execution.receipt.as_deref(), &record.call) else {
        return false;
    };
    receipt.verify_from(&result.execution.volunteer).is_ok()
        && receipt.body.scheduler.to_string() == record.scheduler
        && receipt.matches_call(record.nonce, call).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::identity::Keypair;

    fn record(keypair: &Keypair, nonce: u64, seq: u64) -> JobRecord {
        let scheduler = keypair.public().to_peer_id();
        JobRecord {
            job_id: job_id(&scheduler, nonce),
            nonce,
            seq,
            scheduler: scheduler.to_string(),
            taken_from: None,
            call: None,
            state: JobState::Waiting,
            module: "bafk".into(),
            submitted_at_ms: 1,
            wait_until_ms: 2,
            updated_at_ms: 1,
            attempts: 0,
            error: None,
            result: None,
        }
    }

    #[test]
    fn result_blocks_are_copied_in_order_within_the_budget() {
        use super::super::function::{Execution, OutputFile};
        let cid = |n: u8| {
            let hash = cid::multihash::Multihash::<64>::wrap(0x12, &[n; 32]).unwrap();
            cid::Cid::new_v1(0x55, hash)
        };
        let file = |n: u8, size: u64| OutputFile {
            name: format!("out{n}"),
            cid: cid(n).to_string(),
            size,
        };
        let mib = 1024 * 1024;
        let invocation = Invocation {
            invocation_id: 1,
            scheduler: String::new(),
            execution: Execution {
                volunteer: String::new(),
                exit_code: 0,
                stdout: OutputStream {
                    size: 40 * mib,
                    inline: Vec::new(),
                    cid: Some(cid(1).to_string()),
                },
                stderr: OutputStream {
                    size: 5,
                    inline: b"hello".to_vec(),
                    cid: None,
                },
                outputs: vec![
                    file(2, 30 * mib),
                    file(3, 20 * mib),
                    OutputFile {
                        name: "bad".into(),
                        cid: "not a cid".into(),
                        size: 1,
                    },
                    file(4, 4 * mib),
                ],
                failure: None,
                memory_mib: 128,
                timings: Default::default(),
                receipt: None,
            },
            failed_attempts: Vec::new(),
            discover_us: 0,
            scheduler_us: 0,
            messages: 0,
            probes: 0,
            exchanges: 0,
            memoized: false,
        };
        // 40 MiB of stdout, then 30 MiB does not fit the 64 MiB, 20 and 4 do; inline
        // stderr and a malformed CID are skipped.
        assert_eq!(
            result_blocks(&invocation),
            vec![(cid(1), 40 * mib), (cid(3), 20 * mib), (cid(4), 4 * mib)]
        );
    }

    #[test]
    fn a_nodes_book_keeps_only_records_signed_by_the_jobs_scheduler() {
        let scheduler = Keypair::generate_ed25519();
        let other = Keypair::generate_ed25519();
        let mut book = JobBook::new(book_limits(Duration::from_secs(300)));
        let id = job_id(&scheduler.public().to_peer_id(), 7);
        book.put(1, SignedJob::sign(record(&scheduler, 7, 2), &scheduler))
            .unwrap();
        assert_eq!(
            book.put(1, SignedJob::sign(record(&scheduler, 7, 1), &scheduler)),
            Err(Refused::Stale(id))
        );
        // Another peer's record under this job's id, even newer and validly signed, is
        // refused: the id is not one of its own.
        let mut planted = record(&other, 7, 9);
        planted.job_id = id;
        assert_eq!(
            book.put(1, SignedJob::sign(planted.clone(), &other)),
            Err(Refused::Invalid(JobRecordError::ForeignId(id)))
        );
        // Even at a node that holds no record of the job yet.
        assert_eq!(
            JobBook::new(book_limits(Duration::from_secs(300)))
                .put(1, SignedJob::sign(planted, &other)),
            Err(Refused::Invalid(JobRecordError::ForeignId(id)))
        );
        // A record claiming a scheduler whose key did not sign it is refused.
        let mut forged = SignedJob::sign(record(&other, 7, 9), &other);
        forged.record.scheduler = scheduler.public().to_peer_id().to_string();
        assert_eq!(
            book.put(1, forged),
            Err(Refused::Invalid(JobRecordError::BadSignature))
        );
        let mut newer = record(&scheduler, 7, 3);
        newer.state = JobState::Done;
        book.put(1, SignedJob::sign(newer, &scheduler)).unwrap();
        assert_eq!(book.get(id).unwrap().record.state, JobState::Done);
        assert_eq!(book.len(), 1);
    }

    #[test]
    fn a_client_takes_a_takeover_only_when_vouched_for_near_the_key_and_its_result_checks() {
        let scheduler = Keypair::generate_ed25519();
        let taker = Keypair::generate_ed25519();
        let stranger = Keypair::generate_ed25519();
        let first = record(&scheduler, 7, 3);
        let own = SignedJob::sign(first.clone(), &scheduler);
        let taken = |by: &Keypair, seq: u64| {
            let record = JobRecord {
                scheduler: by.public().to_peer_id().to_string(),
                taken_from: Some(first.scheduler.clone()),
                seq,
                ..first.clone()
            };
            SignedJob::sign(record, by)
        };
        let near = vec![
            taker.public().to_peer_id().to_string(),
            stranger.public().to_peer_id().to_string(),
        ];
        let pick = |answers: Vec<SignedJob>, near: &[String]| {
            newest_of(None, answers, near).map(|r| (r.scheduler, r.seq))
        };
        let by = |k: &Keypair| k.public().to_peer_id().to_string();
        // One peer's word for a takeover is not enough; two that hold it are.
        assert_eq!(
            pick(vec![own.clone(), taken(&taker, 4)], &near),
            Some((by(&scheduler), 3))
        );
        assert_eq!(
            pick(vec![own.clone(), taken(&taker, 4), taken(&taker, 4)], &near),
            Some((by(&taker), 4))
        );
        // Nor from a peer the lookup did not find near the key.
        assert_eq!(
            pick(
                vec![own.clone(), taken(&taker, 4), taken(&taker, 4)],
                &near[1..]
            ),
            Some((by(&scheduler), 3))
        );
        // A takeover alone, with nothing of the scheduler's: still vouched for by two.
        assert_eq!(pick(vec![taken(&stranger, 9)], &near), None);
        // A "done" result without a receipt that checks is never taken.
        let mut faked = taken(&stranger, 5).record;
        faked.state = JobState::Done;
        faked.result = Some(Invocation {
            invocation_id: 7,
            scheduler: by(&stranger),
            execution: super::super::function::Execution {
                volunteer: by(&stranger),
                exit_code: 0,
                stdout: OutputStream::default(),
                stderr: OutputStream::default(),
                outputs: Vec::new(),
                failure: None,
                memory_mib: 128,
                timings: Default::default(),
                receipt: None,
            },
            failed_attempts: Vec::new(),
            discover_us: 0,
            scheduler_us: 0,
            messages: 0,
            probes: 0,
            exchanges: 0,
            memoized: false,
        });
        let faked = SignedJob::sign(faked, &stranger);
        assert_eq!(
            pick(vec![own.clone(), faked.clone(), faked], &near),
            Some((by(&scheduler), 3))
        );
    }
}
