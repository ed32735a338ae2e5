//! Replicated calls: the same call run on several distinct volunteers, their answers
//! compared, the majority's taken. What is compared is what each volunteer signed in its
//! receipt (exit status, stdout digest, output files and their CIDs), so a volunteer
//! outvoted is named with the receipt that shows what it said.

use crate::function::Invocation;
use crate::receipt::Receipt;
use serde::{Deserialize, Serialize};

/// Most replicas one call may ask for.
pub const MAX_REPLICAS: u32 = 9;

/// What a run came to, as replicas are compared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    /// Its exit status.
    pub exit_code: i32,
    /// Why it failed, if it did.
    pub failure: Option<String>,
    /// SHA-256 of its stdout, in hex.
    pub stdout_sha256: String,
    /// The CID its stdout was stored under, when too large to travel inline: voted on
    /// too, since a receipt's digest of stdout stored by CID is only the volunteer's word
    /// until the bytes are fetched, and the CID is what the client reads.
    #[serde(default)]
    pub stdout_cid: Option<String>,
    /// Its output files: name and CID.
    pub outputs: Vec<(String, String)>,
}

impl Answer {
    /// What `receipt` says came out.
    pub fn of(receipt: &Receipt) -> Answer {
        let body = &receipt.body;
        Answer {
            exit_code: body.exit_code,
            failure: body.failure.clone(),
            stdout_sha256: body.stdout.sha256.clone(),
            stdout_cid: body.stdout.cid.clone(),
            outputs: body
                .outputs
                .iter()
                .map(|o| (o.name.clone(), o.cid.clone()))
                .collect(),
        }
    }
}

/// The replicas that gave one answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Side {
    /// The answer.
    pub answer: Answer,
    /// The volunteers that gave it.
    pub volunteers: Vec<String>,
    /// Their receipts, in the same order.
    pub receipts: Vec<Receipt>,
}

/// How the replicas of a call compared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaReport {
    /// Replicas run (each on another volunteer).
    pub replicas: u32,
    /// Whether more than half gave one answer (the first side's).
    pub majority: bool,
    /// Each answer given, most replicas first.
    pub sides: Vec<Side>,
    /// The volunteers outside the majority (all, when there is none).
    pub dissenters: Vec<String>,
}

impl ReplicaReport {
    /// The disagreement in one line: each side's volunteers and answer.
    pub fn describe(&self) -> String {
        let sides: Vec<String> = self
            .sides
            .iter()
            .map(|s| {
                format!(
                    "[{}] exit {} stdout sha256 {}…",
                    s.volunteers.join(", "),
                    s.answer.exit_code,
                    &s.answer.stdout_sha256[..s.answer.stdout_sha256.len().min(12)]
                )
            })
            .collect();
        match self.majority {
            true => format!(
                "{} of {} replicas agreed; outvoted: {}",
                self.sides.first().map_or(0, |s| s.volunteers.len()),
                self.replicas,
                sides[1..].join("; ")
            ),
            false => format!(
                "the {} replicas disagreed with no majority: {}",
                self.replicas,
                sides.join("; ")
            ),
        }
    }
}

/// Compares the replicas' answers (each with its receipt checked already; one without
/// counts for nobody). Returns the report and, when more than half agree, the index of
/// one invocation of the majority.
pub fn vote(invocations: &[Invocation]) -> (ReplicaReport, Option<usize>) {
    let mut sides: Vec<(Side, usize)> = Vec::new();
    for (i, invocation) in invocations.iter().enumerate() {
        let Some(receipt) = invocation.execution.receipt.as_deref() else {
            continue;
        };
        let answer = Answer::of(receipt);
        let volunteer = invocation.execution.volunteer.clone();
        match sides.iter_mut().find(|(s, _)| s.answer == answer) {
            Some((side, _)) => {
                side.volunteers.push(volunteer);
                side.receipts.push(receipt.clone());
            }
            None => sides.push((
                Side {
                    answer,
                    volunteers: vec![volunteer],
                    receipts: vec![receipt.clone()],
                },
                i,
            )),
        }
    }
    // Most replicas first; ties in the order the answers came.
    sides.sort_by_key(|(s, _)| std::cmp::Reverse(s.volunteers.len()));
    let replicas = invocations.len();
    let winner = sides
        .first()
        .filter(|(s, _)| 2 * s.volunteers.len() > replicas)
        .map(|(_, i)| *i);
    let skip = usize::from(winner.is_some());
    let dissenters = sides
        .iter()
        .skip(skip)
        .flat_map(|(s, _)| s.volunteers.iter().cloned())
        .collect();
    let report = ReplicaReport {
        replicas: replicas as u32,
        majority: winner.is_some(),
        sides: sides.into_iter().map(|(s, _)| s).collect(),
        dissenters,
    };
    (report, winner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::function::{Execution, ExecutionTimings, OutputStream};
    use crate::receipt::{ReceiptBody, StreamDigest, sha256_hex};
    use libp2p::PeerId;
    use libp2p::identity::Keypair;

    fn run(stdout: &[u8]) -> Invocation {
        run_stored(stdout, None)
    }

    /// A run whose receipt signs `stdout`'s digest, its stdout inline or stored by `cid`.
    fn run_stored(stdout: &[u8], cid: Option<&str>) -> Invocation {
        let keypair = Keypair::generate_ed25519();
        let volunteer = keypair.public().to_peer_id();
        let stream = OutputStream {
            size: stdout.len() as u64,
            inline: if cid.is_some() {
                Vec::new()
            } else {
                stdout.to_vec()
            },
            cid: cid.map(str::to_string),
        };
        let body = ReceiptBody {
            volunteer,
            scheduler: PeerId::random(),
            invocation_id: 1,
            reservation_id: 2,
            module: "m".into(),
            inputs: Vec::new(),
            args_digest: String::new(),
            memory_mib: 128,
            exit_code: 0,
            failure: None,
            stdout: StreamDigest {
                size: stream.size,
                sha256: sha256_hex(stdout),
                cid: cid.map(str::to_string),
            },
            stderr: StreamDigest::of(&[], &OutputStream::default()),
            outputs: Vec::new(),
            timings: ExecutionTimings::default(),
            pure: false,
            signed_at_ms: 0,
        };
        Invocation {
            invocation_id: 1,
            scheduler: "s".into(),
            execution: Execution {
                volunteer: volunteer.to_string(),
                exit_code: 0,
                stdout: stream,
                stderr: OutputStream::default(),
                outputs: Vec::new(),
                failure: None,
                memory_mib: 128,
                timings: ExecutionTimings::default(),
                receipt: Some(Box::new(Receipt::sign(body, &keypair))),
            },
            failed_attempts: Vec::new(),
            discover_us: 0,
            scheduler_us: 0,
            messages: 0,
            probes: 0,
            exchanges: 0,
            memoized: false,
        }
    }

    #[test]
    fn the_majority_wins_and_the_liar_is_named() {
        let runs = [run(b"42\n"), run(b"lie\n"), run(b"42\n")];
        let (report, winner) = vote(&runs);
        assert!(report.majority);
        assert_eq!(runs[winner.unwrap()].execution.stdout.inline, b"42\n");
        assert_eq!(report.dissenters, vec![runs[1].execution.volunteer.clone()]);
        assert_eq!(report.sides.len(), 2);
        assert_eq!(report.sides[1].receipts.len(), 1);
        assert!(report.describe().contains(&runs[1].execution.volunteer));
    }

    #[test]
    fn a_replica_signing_the_true_digest_over_another_stored_stdout_is_outvoted() {
        // The liar signs the honest bytes' digest but answers other blocks under its own
        // CID: the digest alone would put it with the majority.
        let runs = [
            run_stored(b"42\n", Some("bafyliar")),
            run_stored(b"42\n", Some("bafyhonest")),
            run_stored(b"42\n", Some("bafyhonest")),
        ];
        let (report, winner) = vote(&runs);
        assert_eq!(winner, Some(1));
        assert_eq!(report.dissenters, vec![runs[0].execution.volunteer.clone()]);
    }

    #[test]
    fn no_majority_is_no_winner() {
        let runs = [run(b"a"), run(b"b"), run(b"c")];
        let (report, winner) = vote(&runs);
        assert_eq!(winner, None);
        assert!(!report.majority);
        assert_eq!(report.dissenters.len(), 3);
        // Two of four is no majority either.
        let runs = [run(b"a"), run(b"a"), run(b"b"), run(b"b")];
        assert_eq!(vote(&runs).1, None);
        let runs = [run(b"a"), run(b"a"), run(b"a")];
        let (report, winner) = vote(&runs);
        assert_eq!(winner, Some(0));
        assert!(report.dissenters.is_empty());
    }
}
