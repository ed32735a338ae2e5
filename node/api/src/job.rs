//! Detached jobs' records, as the API hands them out and peers keep them: where a job
//! stands, one version of its record, that version signed by the scheduler that took the
//! job, and the job's id.
//!
//! A job's id is derived from the scheduler that took it and the client's nonce
//! ([`job_id`]), so a record under that id verifies only when signed by that scheduler,
//! or — a takeover — by another peer naming that scheduler in `taken_from`: a record
//! carries its call, so when its scheduler is gone the peer closest to the job's key can
//! carry the job on under the same id. Which records a node keeps (a takeover only of a
//! job unfinished and silent past a grace period) is decided by
//! `flotilla_scheduler::book`; running the jobs is flotilla-node's (`market::jobs`).

use crate::function::{FunctionCall, Invocation};
use libp2p::PeerId;
use libp2p::identity::{Keypair, PublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Taken, and waiting for an offer that fits.
    Waiting,
    /// Being placed or run.
    Running,
    /// It ran: see the result.
    Done,
    /// It could not run, or waited past its deadline.
    Failed,
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            JobState::Waiting => "waiting",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
        })
    }
}

/// One version of a job's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    /// The job's id: [`job_id`] of the scheduler and the nonce.
    pub job_id: u64,
    /// The client's nonce (the call's invocation id), from which the id is derived.
    pub nonce: u64,
    /// The version: higher is newer.
    pub seq: u64,
    /// The scheduler that holds the job (and signs this version).
    pub scheduler: String,
    /// When another peer took the job over: the scheduler that took it first, whose
    /// id the job's is.
    #[serde(default)]
    pub taken_from: Option<String>,
    /// The call, so that another peer can take the job over.
    #[serde(default)]
    pub call: Option<FunctionCall>,
    /// Where it stands.
    pub state: JobState,
    /// The module it runs.
    pub module: String,
    /// When it was taken (Unix ms).
    pub submitted_at_ms: u64,
    /// Until when it may wait for an offer (Unix ms).
    pub wait_until_ms: u64,
    /// When this version was made (Unix ms).
    pub updated_at_ms: u64,
    /// Placements tried.
    pub attempts: u32,
    /// The latest reason it is waiting, or why it failed.
    pub error: Option<String>,
    /// The result, once done.
    pub result: Option<Invocation>,
}

/// A job record signed by its scheduler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedJob {
    /// The scheduler's public key (protobuf encoding).
    #[serde(with = "flotilla_offers::offer::cbor_bytes")]
    pub public_key: Vec<u8>,
    /// Its signature over the record's CBOR encoding.
    #[serde(with = "flotilla_offers::offer::cbor_bytes")]
    pub signature: Vec<u8>,
    /// The record.
    pub record: JobRecord,
}

/// Why a job record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobRecordError {
    /// The signature or key does not match the record's scheduler.
    #[error("bad signature")]
    BadSignature,
    /// The job id is not derived from the record's scheduler and nonce.
    #[error("job {0:016x} is not an id of this record's scheduler")]
    ForeignId(u64),
}

/// The id of the job a scheduler takes for a client's nonce: 63 bits of
/// SHA-256(domain ‖ scheduler's peer id ‖ nonce). Finding another scheduler key that
/// yields a given id takes about 2^63 tries.
pub fn job_id(scheduler: &PeerId, nonce: u64) -> u64 {
    let digest = Sha256::new()
        .chain_update(b"flotilla/job-id/v1\0")
        .chain_update(scheduler.to_bytes())
        .chain_update(nonce.to_be_bytes())
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first) >> 1
}

/// The id of a job whose record carries its call: 63 bits of SHA-256(domain ‖
/// scheduler's peer id ‖ nonce ‖ the call's digest). A peer that takes the job over can
/// carry it on only with that very call.
pub fn job_id_of_call(scheduler: &PeerId, nonce: u64, call: &FunctionCall) -> u64 {
    let digest = Sha256::new()
        .chain_update(b"flotilla/job-id/v2\0")
        .chain_update(scheduler.to_bytes())
        .chain_update(nonce.to_be_bytes())
        .chain_update(call.digest())
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first) >> 1
}

/// The id a record's job must have, taken by `owner`: with its call in it when the record
/// carries one.
fn expected_id(owner: &PeerId, record: &JobRecord) -> u64 {
    match &record.call {
        Some(call) => job_id_of_call(owner, record.nonce, call),
        None => job_id(owner, record.nonce),
    }
}

fn record_bytes(record: &JobRecord) -> Vec<u8> {
    cbor4ii::serde::to_vec(Vec::new(), record).expect("records always encode")
}

impl SignedJob {
    /// Signs `record` with the scheduler's key.
    pub fn sign(record: JobRecord, keypair: &Keypair) -> SignedJob {
        let signature = keypair
            .sign(&record_bytes(&record))
            .expect("ed25519 signing cannot fail");
        SignedJob {
            public_key: keypair.public().encode_protobuf(),
            signature,
            record,
        }
    }

    /// Checks that the key is the scheduler's, signed the record, and that the job id
    /// is the scheduler's for the record's nonce.
    pub fn verify(&self) -> Result<(), JobRecordError> {
        self.signer().map(|_| ())
    }

    /// The scheduler that signed the record, once [`SignedJob::verify`]'s checks pass.
    pub fn signer(&self) -> Result<PeerId, JobRecordError> {
        let key = PublicKey::try_decode_protobuf(&self.public_key)
            .map_err(|_| JobRecordError::BadSignature)?;
        let scheduler = key.to_peer_id();
        if scheduler.to_string() != self.record.scheduler
            || !key.verify(&record_bytes(&self.record), &self.signature)
        {
            return Err(JobRecordError::BadSignature);
        }
        let owner = match &self.record.taken_from {
            None => scheduler,
            Some(first) => first
                .parse::<PeerId>()
                .map_err(|_| JobRecordError::ForeignId(self.record.job_id))?,
        };
        if expected_id(&owner, &self.record) != self.record.job_id {
            return Err(JobRecordError::ForeignId(self.record.job_id));
        }
        Ok(scheduler)
    }

    /// Whether this version is a takeover's: signed by another peer than the scheduler
    /// that took the job.
    pub fn is_takeover(&self) -> bool {
        self.record.taken_from.is_some()
    }
}

/// Nodes keep job records in a [`flotilla_scheduler::book::RecordBook`], whose rules
/// decide which versions stay.
impl flotilla_scheduler::book::Versioned for SignedJob {
    type Invalid = JobRecordError;

    fn verify(&self) -> Result<PeerId, JobRecordError> {
        self.signer()
    }

    fn id(&self) -> u64 {
        self.record.job_id
    }

    fn seq(&self) -> u64 {
        self.record.seq
    }

    fn made_at_ms(&self) -> u64 {
        self.record.updated_at_ms
    }

    fn is_final(&self) -> bool {
        matches!(self.record.state, JobState::Done | JobState::Failed)
    }

    fn takes_over(&self) -> bool {
        self.is_takeover()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_depend_on_the_scheduler_and_the_nonce() {
        let a = Keypair::generate_ed25519().public().to_peer_id();
        let b = Keypair::generate_ed25519().public().to_peer_id();
        assert_eq!(job_id(&a, 1), job_id(&a, 1));
        assert_ne!(job_id(&a, 1), job_id(&a, 2));
        assert_ne!(job_id(&a, 1), job_id(&b, 1));
        assert!(job_id(&a, u64::MAX) <= i64::MAX as u64);
    }

    #[test]
    fn a_record_verifies_only_as_signed_by_the_scheduler_its_id_is_of() {
        let scheduler = Keypair::generate_ed25519();
        let other = Keypair::generate_ed25519();
        let peer = scheduler.public().to_peer_id();
        let record = JobRecord {
            job_id: job_id(&peer, 7),
            nonce: 7,
            seq: 1,
            scheduler: peer.to_string(),
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
        };
        let signed = SignedJob::sign(record.clone(), &scheduler);
        signed.verify().unwrap();
        let bytes = cbor4ii::serde::to_vec(Vec::new(), &signed).unwrap();
        let back: SignedJob = cbor4ii::serde::from_slice(&bytes).unwrap();
        assert_eq!(back, signed);
        let mut altered = signed.clone();
        altered.record.seq = 2;
        assert_eq!(altered.verify(), Err(JobRecordError::BadSignature));
        assert_eq!(
            SignedJob::sign(record.clone(), &other).verify(),
            Err(JobRecordError::BadSignature)
        );
        let mut foreign = record.clone();
        foreign.nonce = 8;
        assert_eq!(
            SignedJob::sign(foreign.clone(), &scheduler).verify(),
            Err(JobRecordError::ForeignId(foreign.job_id))
        );
        // A takeover: signed by another peer, naming the scheduler whose id it is.
        let taker = other.public().to_peer_id();
        let taken = JobRecord {
            scheduler: taker.to_string(),
            taken_from: Some(peer.to_string()),
            seq: 2,
            ..record.clone()
        };
        let signed = SignedJob::sign(taken.clone(), &other);
        assert_eq!(signed.signer(), Ok(taker));
        assert!(signed.is_takeover());
        // The call is bound to the id: another call under it fails.
        let call = FunctionCall {
            module: "bafk".into(),
            memory_mib: 128,
            timeout_ms: None,
            args: Vec::new(),
            env: Vec::new(),
            stdin: None,
            inputs: Vec::new(),
        };
        let with_call = JobRecord {
            job_id: job_id_of_call(&peer, 7, &call),
            call: Some(call.clone()),
            ..taken.clone()
        };
        assert!(SignedJob::sign(with_call.clone(), &other).verify().is_ok());
        let swapped = JobRecord {
            call: Some(FunctionCall {
                args: vec!["other".into()],
                ..call
            }),
            ..with_call
        };
        assert!(matches!(
            SignedJob::sign(swapped, &other).verify(),
            Err(JobRecordError::ForeignId(_))
        ));
        // Naming a scheduler whose id the job's is not fails.
        let elsewhere = JobRecord {
            taken_from: Some(taker.to_string()),
            ..taken
        };
        assert_eq!(
            SignedJob::sign(elsewhere, &other).verify(),
            Err(JobRecordError::ForeignId(record.job_id))
        );
    }
}
