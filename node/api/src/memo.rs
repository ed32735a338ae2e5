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
//! ([`Memo::verify`]) when the receipt verifies for the volunteer the answer names,
//! matches the answer, says the run was pure (its guest read no clock and no random
//! numbers, as the volunteer's executor watched) and did not fail, is unexpired and not
//! signed ahead of the checker's clock by more than [`MAX_SKEW_MS`], and stays within a
//! run's bounds (inline streams only without a CID and at most
//! [`MAX_INLINE_OUTPUT`](crate::function::MAX_INLINE_OUTPUT), at most
//! [`MAX_OUTPUT_FILES`](crate::function::MAX_OUTPUT_FILES) output files, streams and
//! files no larger than an executor writes, the call's fields within a call's bounds).
//! A checked memo ([`CheckedMemo`]) carries what a keeper needs of it, computed once.
//! The rules of what a node keeps are `flotilla_scheduler::memos`.

use crate::function::{
    Execution, MAX_CALL_TEXT, MAX_INLINE_OUTPUT, MAX_INPUTS, MAX_OUTPUT_FILES, OutputStream,
};
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
/// How far ahead of the checker's clock a memo may be signed.
pub const MAX_SKEW_MS: u64 = 10 * 60 * 1000;
/// Largest stdout or stderr a run leaves (the executor's bound).
pub const MAX_STREAM_BYTES: u64 = 16 * 1024 * 1024;
/// Most bytes of a run's output files (the executor's bound).
pub const MAX_OUTPUT_BYTES: u64 = 256 * 1024 * 1024;

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
    /// It was signed further ahead of the checker's clock than allowed.
    #[error("the memo is signed in the future")]
    FromTheFuture,
    /// It names more than a run can leave, or a call beyond a call's bounds.
    #[error("the memo is outside a run's bounds: {0}")]
    OutOfBounds(&'static str),
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
        self.verify_sized(now_ms).map(|(signer, _)| signer)
    }

    /// [`Memo::verify`], answering its encoded size too (encoded once).
    fn verify_sized(&self, now_ms: u64) -> Result<(PeerId, usize), MemoError> {
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
        if body.signed_at_ms > now_ms.saturating_add(MAX_SKEW_MS) {
            return Err(MemoError::FromTheFuture);
        }
        self.within_bounds()?;
        receipt.verify_from(&self.execution.volunteer)?;
        receipt.matches_execution(&self.execution)?;
        Ok((body.volunteer, size))
    }

    /// Checks what the answer names against what a run can leave, and the call's fields
    /// against a call's bounds.
    fn within_bounds(&self) -> Result<(), MemoError> {
        let out = |what| Err(MemoError::OutOfBounds(what));
        let execution = &self.execution;
        for stream in [&execution.stdout, &execution.stderr] {
            if stream.size > MAX_STREAM_BYTES || stream.inline.len() > MAX_INLINE_OUTPUT {
                return out("stdout or stderr too large");
            }
            if stream.cid.is_some() && !stream.inline.is_empty() {
                return out("a stream both inline and by CID");
            }
        }
        if execution.outputs.len() > MAX_OUTPUT_FILES {
            return out("too many output files");
        }
        let files: u64 = execution
            .outputs
            .iter()
            .fold(0u64, |sum, o| sum.saturating_add(o.size));
        if files > MAX_OUTPUT_BYTES {
            return out("output files too large");
        }
        let body = &self.receipt()?.body;
        let text: usize = body.module.len()
            + body.args_digest.len()
            + body
                .inputs
                .iter()
                .map(|(n, c)| n.len() + c.len())
                .sum::<usize>();
        if body.inputs.len() > MAX_INPUTS || text > MAX_CALL_TEXT {
            return out("the call's fields");
        }
        Ok(())
    }

    /// Checks it at `now_ms` ([`Memo::verify`]) and computes, once, what a keeper needs.
    pub fn checked(self, now_ms: u64) -> Result<CheckedMemo, MemoError> {
        let (signer, bytes) = self.verify_sized(now_ms)?;
        let receipt = self.receipt()?;
        let signed_at_ms = receipt.body.signed_at_ms;
        Ok(CheckedMemo {
            signer,
            key: self.digest()?,
            result: self.result_digest(),
            bytes,
            signed_at_ms,
            memo: self,
        })
    }

    /// A digest of what the run gave: exit status, stdout, stderr (their SHA-256, size
    /// and CID) and output files, as signed. Memos agree when these are equal.
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
            (&body.stdout.sha256, body.stdout.size, &body.stdout.cid),
            (&body.stderr.sha256, body.stderr.size, &body.stderr.cid),
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

/// A memo checked once ([`Memo::checked`]), with what its keepers need of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedMemo {
    /// The memo.
    pub memo: Memo,
    signer: PeerId,
    key: [u8; 32],
    result: [u8; 32],
    bytes: usize,
    signed_at_ms: u64,
}

/// The book checks only that a checked memo has not expired since: its signature and
/// bounds were checked when it was made.
impl Memoized for CheckedMemo {
    type Invalid = MemoError;

    fn check(&self, now_ms: u64) -> Result<PeerId, MemoError> {
        if self.signed_at_ms.saturating_add(MEMO_TTL_MS) <= now_ms {
            return Err(MemoError::Expired);
        }
        Ok(self.signer)
    }

    fn key(&self) -> [u8; 32] {
        self.key
    }

    fn signed_at_ms(&self) -> u64 {
        self.signed_at_ms
    }

    fn result(&self) -> [u8; 32] {
        self.result
    }

    fn bytes(&self) -> usize {
        self.bytes
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
        // The same digest and size, but stored under another CID: another result.
        let mut elsewhere = memo.clone();
        if let Some(receipt) = elsewhere.execution.receipt.as_mut() {
            receipt.body.stdout.cid = Some(CID.into());
        }
        assert_ne!(elsewhere.result_digest(), memo.result_digest());
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
        let mut huge = good.clone();
        huge.execution.stdout.inline = vec![b'x'; MAX_MEMO_BYTES];
        assert!(matches!(
            huge.verify(1_000_001),
            Err(MemoError::TooLarge(_))
        ));
        // Signed far ahead of the checker's clock (to look newest, or never expire).
        assert_eq!(
            good.verify(1_000_000 - MAX_SKEW_MS - 1),
            Err(MemoError::FromTheFuture)
        );
        // Padding beside a CID, and more files than a run leaves.
        let mut padded = good.clone();
        padded.execution.stdout.cid = Some(CID.into());
        padded.execution.stdout.inline = vec![b'x'; 100];
        assert_eq!(
            padded.verify(1_000_001),
            Err(MemoError::OutOfBounds("a stream both inline and by CID"))
        );
        let mut many = good.clone();
        many.execution.outputs = vec![many.execution.outputs[0].clone(); MAX_OUTPUT_FILES + 1];
        assert_eq!(
            many.verify(1_000_001),
            Err(MemoError::OutOfBounds("too many output files"))
        );
        let checked = good.clone().checked(1_000_001).unwrap();
        assert_eq!(checked.key(), call_digest(&call));
        assert_eq!(checked.memo, good);
    }
}
