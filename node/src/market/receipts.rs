//! Receipts in the market: the volunteer signs one for each run it answers
//! ([`Market::receipt_body_for`], [`Market::signed`]); the scheduler checks it before it answers a client or signs
//! a job record over it ([`check_from_volunteer`]); the client checks it against the call
//! it made and the answer it got ([`check_for_client`]). The record itself and its checks
//! are `flotilla_api::receipt`.

use super::Market;
use super::function::{Execution, FunctionCall, OutputStream};
use super::protocol::ExecuteRequest;
use flotilla_api::receipt::{Receipt, ReceiptBody, ReceiptError, StreamDigest, args_digest};
use libp2p::PeerId;

/// What a volunteer that lies adds to stdout (only with the test-only
/// `MarketConfig::tamper_stdout` set).
pub const TAMPERED: &[u8] = b"\n(altered by a lying volunteer)\n";

impl Market {
    /// What this node signs for the run of `request` it answers for `from` with
    /// `execution`, whose stdout and stderr had these SHA-256 digests; `pure` when the
    /// executor saw the guest read no clock and no random numbers.
    pub(super) fn receipt_body_for(
        &self,
        from: PeerId,
        request: &ExecuteRequest,
        execution: &Execution,
        stdout_sha256: String,
        stderr_sha256: String,
        pure: bool,
    ) -> ReceiptBody {
        let call = &request.call;
        let digest = |sha256: String, stream: &OutputStream| StreamDigest {
            size: stream.size,
            sha256,
            cid: stream.cid.clone(),
        };
        ReceiptBody {
            volunteer: self.peer_id(),
            scheduler: from,
            invocation_id: request.invocation_id,
            reservation_id: request.reservation_id,
            module: call.module.clone(),
            inputs: call.inputs.clone(),
            args_digest: args_digest(call),
            memory_mib: execution.memory_mib,
            exit_code: execution.exit_code,
            failure: execution.failure.clone(),
            stdout: digest(stdout_sha256, &execution.stdout),
            stderr: digest(stderr_sha256, &execution.stderr),
            outputs: execution.outputs.clone(),
            timings: execution.timings,
            pure,
            signed_at_ms: self.now(),
        }
    }

    /// `execution` with its receipt over `body`, signed by this node.
    pub(super) fn signed(&self, mut execution: Execution, body: ReceiptBody) -> Execution {
        execution.receipt = Some(Box::new(Receipt::sign(body, &self.shared.keypair)));
        self.maybe_forge(&mut execution);
        execution
    }

    /// For tests only: a volunteer that lies alters the stdout it is about to answer
    /// (and then signs its lie, as a hostile volunteer can).
    pub(super) fn maybe_tamper(&self, stdout: &mut Vec<u8>) {
        if self.shared.config.tamper_stdout {
            stdout.extend_from_slice(TAMPERED);
        }
    }

    /// For tests only: a volunteer whose receipts do not verify signs them with another
    /// key than its own (in its own name, the rest of the receipt true).
    fn maybe_forge(&self, execution: &mut Execution) {
        if !self.shared.config.forge_receipts {
            return;
        }
        if let Some(receipt) = execution.receipt.as_mut() {
            let other = libp2p::identity::Keypair::generate_ed25519();
            let forged = Receipt::sign(receipt.body.clone(), &other);
            receipt.signature = forged.signature;
        }
    }
}

/// The scheduler's check of a volunteer's answer to its `request`: signed by
/// `volunteer`, the peer it sent the call to, for this invocation and reservation, this
/// call and this answer.
pub(super) fn check_from_volunteer(
    volunteer: PeerId,
    request: &ExecuteRequest,
    execution: &Execution,
) -> Result<(), ReceiptError> {
    check_but_signature(volunteer, request, execution)?;
    check_signature(volunteer, execution)
}

/// [`check_from_volunteer`] but for the signature, which costs most: the receipt names
/// `volunteer`, this invocation and reservation, this call and this answer.
pub(super) fn check_but_signature(
    volunteer: PeerId,
    request: &ExecuteRequest,
    execution: &Execution,
) -> Result<(), ReceiptError> {
    let receipt = execution.receipt.as_deref().ok_or(ReceiptError::Missing)?;
    receipt.signed_by(&volunteer)?;
    if receipt.body.reservation_id != request.reservation_id {
        return Err(ReceiptError::Mismatch("reservation"));
    }
    receipt.matches_call(request.invocation_id, &request.call)?;
    receipt.matches_execution(execution)
}

/// The rest of [`check_from_volunteer`]: the receipt's signature is `volunteer`'s.
pub(super) fn check_signature(
    volunteer: PeerId,
    execution: &Execution,
) -> Result<(), ReceiptError> {
    let receipt = execution.receipt.as_deref().ok_or(ReceiptError::Missing)?;
    receipt.verify_by(&volunteer)
}

/// Where a scheduler checks the signature of the receipt that comes with an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SignatureCheck {
    /// Before it answers: for its own calls, and for jobs, whose records it signs over
    /// the receipt.
    BeforeAnswering,
    /// Not before answering a remote client, which checks the signature itself and asks
    /// again, without that volunteer, when it does not verify: the check (the costliest
    /// part of a warm call) is off the answer's path. The scheduler keeps the receipt and
    /// checks it if the client reports refusing it, and then forgets a volunteer whose
    /// signature is bad.
    ByTheClient,
}

/// The client's check of the answer to its invocation `invocation_id` of `call`.
pub(super) fn check_for_client(
    invocation_id: u64,
    call: &FunctionCall,
    execution: &Execution,
) -> Result<(), ReceiptError> {
    let receipt = execution.receipt.as_deref().ok_or(ReceiptError::Missing)?;
    receipt.check(invocation_id, call, execution)
}
