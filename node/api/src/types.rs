//! Messages of the local HTTP API, shared by the node's server and [`crate::client`].

use flotilla_overlay::fetch::FetchProgress;
use serde::{Deserialize, Serialize};

/// The body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, in one line.
    pub error: String,
}

/// How a fetch ended.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct FetchDone {
    /// Final counts.
    #[serde(flatten)]
    pub progress: FetchProgress,
    /// Time the fetch took, in seconds.
    pub seconds: f64,
}

/// One line of the `/v0/fetch` NDJSON stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FetchEvent {
    /// Counts so far.
    Progress(FetchProgress),
    /// The fetch completed.
    Done(FetchDone),
    /// The fetch failed.
    Error(String),
}

/// The query of `/v0/add`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct AddQuery {
    /// Whether to pin what is added (the default); `false` adds it as cache, evicted
    /// once the store needs the room.
    #[serde(default = "pin_by_default")]
    pub pin: bool,
}

fn pin_by_default() -> bool {
    true
}

/// A pin, as `/v0/pin/ls` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinView {
    /// The pinned DAG's root.
    pub cid: String,
    /// When it was pinned, Unix ms.
    pub pinned_at_ms: u64,
    /// Bytes of its distinct blocks.
    pub bytes: u64,
    /// Its distinct blocks.
    pub blocks: u64,
}

/// The answer of `/v0/pin/add` and `/v0/pin/rm`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinChange {
    /// The root.
    pub cid: String,
    /// Whether this changed anything (false: it was pinned, or not pinned, already).
    pub changed: bool,
}

/// The answer of `/v0/repo/stat`: what the store holds, by state, and its pins.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RepoStat {
    /// Bytes and blocks, pinned, in use, evictable.
    #[serde(flatten)]
    pub store: flotilla_overlay::blockstore::StoreStats,
    /// Pins.
    pub pins: u64,
}

/// The `cid` query parameter.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CidQuery {
    /// A CID string.
    pub cid: String,
}

/// The body of `/v0/discover`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiscoverBody {
    /// Memory wanted, in bytes.
    pub memory: u64,
    /// Region probes before the fallback (the scheduler's setting if absent).
    #[serde(default)]
    pub max_tries: Option<u32>,
    /// Reserve the best offer found, held this long (ms) unless used.
    #[serde(default)]
    pub reserve_ms: Option<u64>,
    /// Which fitting offer to reserve (the scheduler's setting if absent).
    #[serde(default)]
    pub placement: Option<flotilla_scheduler::placement::Policy>,
}

/// The body of `/v0/invoke`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InvokeBody {
    /// The call.
    #[serde(flatten)]
    pub call: crate::function::FunctionCall,
    /// Region probes before the fallback (the scheduler's setting if absent).
    #[serde(default)]
    pub max_tries: Option<u32>,
    /// Which fitting offer to reserve (the scheduler's setting if absent).
    #[serde(default)]
    pub placement: Option<flotilla_scheduler::placement::Policy>,
    /// Run it on this many distinct volunteers and take the majority's answer (1 if
    /// absent).
    #[serde(default)]
    pub replicas: Option<u32>,
    /// Run it even if a memoized answer of the same pure call exists
    /// (`crate::memo`).
    #[serde(default)]
    pub fresh: bool,
}

/// The answer of `/v0/invoke`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InvokeReply {
    /// The invocation.
    #[serde(flatten)]
    pub invocation: crate::function::Invocation,
    /// From the local node taking the call to the answer, in µs.
    pub total_us: u64,
    /// How the replicas compared, when the call asked for more than one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<crate::replicas::ReplicaReport>,
}

/// The body of `POST /v0/jobs`: a call to run as a detached job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubmitBody {
    /// The call and how to place it.
    #[serde(flatten)]
    pub invoke: InvokeBody,
    /// How long it may wait for an offer that fits, in ms (10 minutes if absent).
    #[serde(default)]
    pub wait_ms: Option<u64>,
}

/// The answer of `POST /v0/jobs`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Submitted {
    /// The job's id, 16 hex digits.
    pub job_id: String,
}

/// A job id as the API and CLI write it: 16 hex digits.
pub fn job_id_text(id: u64) -> String {
    format!("{id:016x}")
}

/// Parses a job id written by [`job_id_text`].
pub fn parse_job_id(text: &str) -> Result<u64, String> {
    u64::from_str_radix(text, 16)
        .ok()
        .filter(|_| !text.is_empty() && text.len() <= 16)
        .ok_or_else(|| format!("{text:?} is not a job id (16 hex digits)"))
}
