//! Memoized results: the answer to a pure call, kept by the peers closest to a digest of
//! the call, so that a later identical call is answered without placing anything.
//!
//! A call is named by [`call_digest`]: SHA-256, after a domain tag, of the CBOR encoding
//! of its module CID, input names and CIDs, the digest of its arguments, environment and
//! stdin CID ([`crate::receipt::args_digest`]) and its memory — all fields a receipt
//! signs, so a keeper computes the digest a memo answers from the memo alone. The
//! deadline is left out: a run that finished within one deadline answers any call.
//!
//! A [`Memo`] is a volunteer's answer with its signed receipt. It checks
//! ([`Memo::check`]) when the receipt verifies for the volunteer the answer names, matches
//! the answer, says the run was pure (its guest read no clock and no random numbers,
//! as the volunteer's executor watched) and did not fail, and is unexpired. The rules of
//! what a node keeps are `flotilla_scheduler::memos`.

use crate::function::{Execution, OutputStream};
use crate::receipt::{Receipt, ReceiptError};
use flotilla_scheduler::memos::Memoized;
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use sha2::Digest;

/// The tag hashed before a call's fields, so a call digest is never another digest.
const DIGEST_TAG: &[u8] = b"flotilla/memo/v1\0";
/// How long a memo lives after its volunteer signed it.
pub const MEMO_TTL_MS: u64 = 24 * 3600 * 1000;
/// Most bytes of a memo, CBOR-encoded: it travels in one request. Larger answers (many
/// output files) are not memoized.
pub const MAX_MEMO_BYTES: usize = 48 * 1024;
/// Most memos one keeper answers for one call.
pub const MAX_MEMOS_ANSWERED: usize = 4;

/// Why a memo is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemoError {
    /// The answer carries no receipt.
    #[error("the memo carries no receipt")]
    NoReceipt,
    /// The receipt does not verify or does not match the answer.
    #[error(transparent)]
    Receipt(#[from] ReceiptError),
    /// The volunteer did not sign the run as pure.
    #[error("the run is not signed as pure (its guest read a clock or random numbers)")]
    NotPure,
    /// The run failed (a trap, its deadline): nothing worth keeping.
    #[error("the run failed")]
    Failed,
    /// It is past its lifetime.
    #[error("the memo has expired")]
    Expired,
    /// It is too large to travel.
    #[error("the memo is {0} bytes (at most {MAX_MEMO_BYTES})")]
    TooLarge(usize),
}

/// The digest that names a call for memoization (see the module's documentation).
pub fn call_digest(call: &crate::function::FunctionCall) -> [u8; 32] {
    digest_of(
        &call.module,
        &call.inputs,
        &crate::receipt::args_digest(call),
        call.memory_mib,
    )
}

fn digest_of(
    module: &str,
    inputs: &[(String, String)],
    args_digest: &str,
    memory_mib: u32,
) -> [u8; 32] {
    let fields = (module, inputs, args_digest, memory_mib);
    let mut bytes = DIGEST_TAG.to_vec();
    cbor4ii::serde::to_writer(&mut bytes, &fields).expect("call fields always encode");
    sha2::Sha256::digest(&bytes).into()
}

/// The DHT key whose closest peers keep the memos of the call with `digest`.
pub fn memo_key(digest: &[u8; 32]) -> Vec<u8> {
    let mut key = b"/flotilla/memo/".to_vec();
    key.extend_from_slice(digest);
    key
}

/// A volunteer's answer to a pure call, with its signed receipt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Memo {
    /// The answer, its receipt in it.
    pub execution: Execution,
}

impl Memo {
    /// The memo of `execution`, if its receipt says the run was pure and it did not fail
    /// (checked again by whoever keeps it).
    pub fn of(execution: &Execution) -> Option<Memo> {
        let receipt = execution.receipt.as_deref()?;
        (receipt.body.pure && execution.failure.is_none()).then(|| Memo {
            execution: execution.clone(),
        })
    }

    /// Its receipt.
    pub fn receipt(&self) -> Result<&Receipt, MemoError> {
        self.execution
            .receipt
            .as_deref()
            .ok_or(MemoError::NoReceipt)
    }

    /// The digest of the call it answers, from its receipt.
    pub fn digest(&self) -> Result<[u8; 32], MemoError> {
        let body = &self.receipt()?.body;
        Ok(digest_of(
            &body.module,
            &body.inputs,
            &body.args_digest,
            body.memory_mib,
        ))
    }

    /// Checks it at `now_ms`; answers the volunteer that signed it.
    pub fn verify(&self, now_ms: u64) -> Result<PeerId, MemoError> {
        let size = self.encoded_len();
        if size > MAX_MEMO_BYTES {
            return Err(MemoError::TooLarge(size));
        }
        let receipt = self.receipt()?;
        let body = &receipt.body;
        if !body.pure {
            return Err(MemoError::NotPure);
        }
        if body.failure.is_some() || self.execution.failure.is_some() {
            return Err(MemoError::Failed);
        }
        if body.signed_at_ms.saturating_add(MEMO_TTL_MS) <= now_ms {
            return Err(MemoError::Expired);
        }
        receipt.verify_from(&self.execution.volunteer)?;
        receipt.matches_execution(&self.execution)?;
        Ok(body.volunteer)
    }

    /// A digest of what the run gave: exit status, stdout, stderr and output files, as
    /// signed. Memos agree when these are equal.
    pub fn result_digest(&self) -> [u8; 32] {
        let Ok(receipt) = self.receipt() else {
            return [0; 32];
        };
        let body = &receipt.body;
        let outputs: Vec<(&str, &str, u64)> = body
            .outputs
            .iter()
            .map(|o| (o.name.as_str(), o.cid.as_str(), o.size))
            .collect();
        let fields = (
            body.exit_code,
            (&body.stdout.sha256, body.stdout.size),
            (&body.stderr.sha256, body.stderr.size),
            outputs,
        );
        let bytes = cbor4ii::serde::to_vec(Vec::new(), &fields).expect("results always encode");
        sha2::Sha256::digest(&bytes).into()
    }

    /// Its size, CBOR-encoded.
    pub fn encoded_len(&self) -> usize {
        cbor4ii::serde::to_vec(Vec::new(), self).map_or(usize::MAX, |b| b.len())
    }

    /// The CIDs its answer stores its result under (stdout and stderr when too large to
    /// travel inline, and the output files), with their sizes: what a client fetches
    /// before it takes the memo as its answer.
    pub fn result_blocks(&self) -> Vec<(String, u64)> {
        let streams = [&self.execution.stdout, &self.execution.stderr]
            .into_iter()
            .filter_map(|s: &OutputStream| Some((s.cid.clone()?, s.size)));
        let files = self
            .execution
            .outputs
            .iter()
            .map(|o| (o.cid.clone(), o.size));
        streams.chain(files).collect()
    }
}

impl Memoized for Memo {
    type Invalid = MemoError;

    fn check(&self, now_ms: u64) -> Result<PeerId, MemoError> {
        self.verify(now_ms)
    }

    fn key(&self) -> [u8; 32] {
        // Only checked memos are kept, and every checked memo has a receipt.
        self.digest().unwrap_or([0; 32])
    }

    fn signed_at_ms(&self) -> u64 {
        self.receipt().map_or(0, |r| r.body.signed_at_ms)
    }

    fn result(&self) -> [u8; 32] {
        self.result_digest()
    }

    fn bytes(&self) -> usize {
        self.encoded_len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::function::{ExecutionTimings, FunctionCall, OutputFile};
    use crate::receipt::{ReceiptBody, StreamDigest, args_digest, sha256_hex};
    use libp2p::identity::Keypair;

    const CID: &str = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku";

    fn call() -> FunctionCall {
        FunctionCall {
            module: CID.into(),
            memory_mib: 128,
            timeout_ms: Some(1000),
            args: vec!["a".into()],
            env: vec![("K".into(), "V".into())],
            stdin: Some(CID.into()),
            inputs: vec![("in.txt".into(), CID.into())],
        }
    }

    fn answered(keypair: &Keypair, call: &FunctionCall, stdout: &[u8], pure: bool) -> Execution {
        let mut execution = Execution {
            volunteer: keypair.public().to_peer_id().to_string(),
            exit_code: 0,
            stdout: OutputStream {
                size: stdout.len() as u64,
                inline: stdout.to_vec(),
                cid: None,
            },
            stderr: OutputStream::default(),
            outputs: vec![OutputFile {
                name: "out".into(),
                cid: CID.into(),
                size: 9,
            }],
            failure: None,
            memory_mib: call.memory_mib,
            timings: ExecutionTimings::default(),
            receipt: None,
        };
        let body = ReceiptBody {
            volunteer: keypair.public().to_peer_id(),
            scheduler: PeerId::random(),
            invocation_id: 7,
            reservation_id: 9,
            module: call.module.clone(),
            inputs: call.inputs.clone(),
            args_digest: args_digest(call),
            memory_mib: call.memory_mib,
            exit_code: 0,
            failure: None,
            stdout: StreamDigest::of(stdout, &execution.stdout),
            stderr: StreamDigest::of(b"", &execution.stderr),
            outputs: execution.outputs.clone(),
            timings: execution.timings,
            pure,
            signed_at_ms: 1_000_000,
        };
        execution.receipt = Some(Box::new(Receipt::sign(body, keypair)));
        execution
    }

    #[test]
    fn a_pure_answer_makes_a_memo_under_its_calls_digest() {
        let keypair = Keypair::generate_ed25519();
        let call = call();
        let memo = Memo::of(&answered(&keypair, &call, b"hi\n", true)).unwrap();
        assert_eq!(memo.verify(1_000_001), Ok(keypair.public().to_peer_id()));
        assert_eq!(memo.digest(), Ok(call_digest(&call)));
        // The deadline does not name the call; everything else does.
        let longer = FunctionCall {
            timeout_ms: Some(9000),
            ..call.clone()
        };
        assert_eq!(call_digest(&longer), call_digest(&call));
        for other in [
            FunctionCall {
                memory_mib: 256,
                ..call.clone()
            },
            FunctionCall {
                args: vec!["b".into()],
                ..call.clone()
            },
            FunctionCall {
                stdin: None,
                ..call.clone()
            },
            FunctionCall {
                inputs: vec![("other.txt".into(), CID.into())],
                ..call.clone()
            },
        ] {
            assert_ne!(call_digest(&other), call_digest(&call));
        }
        // Same result, same digest; another stdout, another.
        let again = Memo::of(&answered(
            &Keypair::generate_ed25519(),
            &call,
            b"hi\n",
            true,
        ));
        assert_eq!(again.unwrap().result_digest(), memo.result_digest());
        let lie = Memo::of(&answered(&keypair, &call, b"lie\n", true)).unwrap();
        assert_ne!(lie.result_digest(), memo.result_digest());
    }

    #[test]
    fn impure_forged_altered_or_expired_memos_are_refused() {
        let keypair = Keypair::generate_ed25519();
        let call = call();
        assert!(Memo::of(&answered(&keypair, &call, b"hi\n", false)).is_none());
        let good = Memo::of(&answered(&keypair, &call, b"hi\n", true)).unwrap();
        // Claimed pure by someone else than its signer: the signature no longer holds.
        let mut claimed = good.clone();
        if let Some(receipt) = claimed.execution.receipt.as_mut() {
            receipt.body.pure = false;
        }
        assert_eq!(claimed.verify(1_000_001), Err(MemoError::NotPure));
        let mut forged = good.clone();
        if let Some(receipt) = forged.execution.receipt.as_mut() {
            receipt.body.stdout.sha256 = sha256_hex(b"lie\n");
        }
        forged.execution.stdout.inline = b"lie\n".to_vec();
        assert_eq!(
            forged.verify(1_000_001),
            Err(MemoError::Receipt(ReceiptError::BadSignature))
        );
        // The answer altered under a true receipt.
        let mut altered = good.clone();
        altered.execution.stdout.inline = b"ho\n".to_vec();
        assert_eq!(
            altered.verify(1_000_001),
            Err(MemoError::Receipt(ReceiptError::Mismatch("stdout")))
        );
        // Signed in another volunteer's name.
        let mut renamed = good.clone();
        renamed.execution.volunteer = PeerId::random().to_string();
        assert!(matches!(
            renamed.verify(1_000_001),
            Err(MemoError::Receipt(ReceiptError::WrongSigner { .. }))
        ));
        assert_eq!(
            good.verify(1_000_000 + MEMO_TTL_MS),
            Err(MemoError::Expired)
        );
        let mut failed = good.clone();
        failed.execution.failure = Some("trapped".into());
        assert_eq!(failed.verify(1_000_001), Err(MemoError::Failed));
        let mut huge = good;
        huge.execution.stdout.inline = vec![b'x'; MAX_MEMO_BYTES];
        assert!(matches!(
            huge.verify(1_000_001),
            Err(MemoError::TooLarge(_))
        ));
    }
}
