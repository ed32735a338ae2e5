//! A volunteer's signed receipt for one run: what it ran and what came out, signed with
//! its libp2p key, so a client can tell which volunteer produced an answer and that the
//! answer is the one for the call it made.
//!
//! The volunteer signs (after a domain tag, over the CBOR encoding of the body) the
//! invocation id, the reservation it ran on and the scheduler that asked, the module and
//! input CIDs, a SHA-256 digest of the arguments, environment and stdin CID, the memory it
//! gave, the exit status, digests of stdout and stderr, the output files and the timings.
//! [`Receipt::verify`] checks the signature and that the key is the named volunteer's;
//! [`Receipt::matches_call`] and [`Receipt::matches_execution`] check it against the call
//! that was made and the answer that came with it. A receipt proves who said what, not
//! that it is true: a volunteer can sign a lie, which replication outvotes.

use crate::function::{Execution, ExecutionTimings, FunctionCall, OutputFile, OutputStream};
use libp2p::PeerId;
use libp2p::identity::{Keypair, PublicKey};
use serde::{Deserialize, Serialize};
use sha2::Digest;

/// The tag signed before the body, so a receipt's signature can never be taken for a
/// signature over anything else (an offer, a job record).
const SIGNING_TAG: &[u8] = b"flotilla/receipt/v1\0";
/// Longest hex text of a public key or signature accepted (an ed25519 key is 36 bytes,
/// its signature 64).
const MAX_HEX: usize = 1024;

/// Why a receipt is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceiptError {
    /// The answer came without one.
    #[error("the volunteer's answer carries no receipt")]
    Missing,
    /// The signature does not verify, or the key is not the named volunteer's.
    #[error("the receipt's signature does not verify for its volunteer")]
    BadSignature,
    /// It was signed by another peer than the one the call ran on.
    #[error("the receipt is signed by {signer}, but the call ran on {expected}")]
    WrongSigner {
        /// The volunteer the call ran on.
        expected: String,
        /// The peer that signed.
        signer: String,
    },
    /// It does not match the call made, or the answer given.
    #[error("the receipt does not match the {0}")]
    Mismatch(&'static str),
}

/// A digest of stdout or stderr as the volunteer wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamDigest {
    /// Its size in bytes.
    pub size: u64,
    /// SHA-256 of all its bytes, in hex.
    pub sha256: String,
    /// The CID it was stored under, when it was too large to travel inline.
    #[serde(default)]
    pub cid: Option<String>,
}

impl StreamDigest {
    /// The digest of `bytes`, as answered in `stream`.
    pub fn of(bytes: &[u8], stream: &OutputStream) -> StreamDigest {
        StreamDigest {
            size: bytes.len() as u64,
            sha256: sha256_hex(bytes),
            cid: stream.cid.clone(),
        }
    }

    /// Whether `stream` is what this digest says: inline bytes with this SHA-256, or
    /// stored under this CID (or under the raw SHA-256 CID of these bytes, as a scheduler
    /// stores small streams for a job record).
    pub fn matches(&self, stream: &OutputStream) -> bool {
        if stream.size != self.size {
            return false;
        }
        match &stream.cid {
            None => sha256_hex(&stream.inline) == self.sha256,
            Some(cid) => {
                self.cid.as_ref() == Some(cid)
                    || cid.parse::<cid::Cid>().is_ok_and(|c| {
                        c.codec() == RAW_CODEC
                            && c.hash().code() == SHA2_256
                            && hex(c.hash().digest()) == self.sha256
                    })
            }
        }
    }
}

const RAW_CODEC: u64 = 0x55;
const SHA2_256: u64 = 0x12;

/// What a volunteer signs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptBody {
    /// The volunteer that ran the call (and signs).
    pub volunteer: PeerId,
    /// The peer that asked it to (the scheduler, which made the reservation).
    pub scheduler: PeerId,
    /// The invocation.
    pub invocation_id: u64,
    /// The reservation it ran on.
    pub reservation_id: u64,
    /// CID of the module run.
    pub module: String,
    /// The inputs given: name and CID.
    pub inputs: Vec<(String, String)>,
    /// SHA-256 (hex) of the arguments, environment and stdin CID ([`args_digest`]).
    pub args_digest: String,
    /// Memory it ran with, in MiB.
    pub memory_mib: u32,
    /// Its exit status.
    pub exit_code: i32,
    /// Why it failed, if it trapped or ran past its deadline.
    pub failure: Option<String>,
    /// Its stdout.
    pub stdout: StreamDigest,
    /// Its stderr.
    pub stderr: StreamDigest,
    /// The files it left: name, CID and size.
    pub outputs: Vec<OutputFile>,
    /// Where the volunteer's time went.
    pub timings: ExecutionTimings,
    /// Whether the outcome depends only on the call: the guest read no clock and no
    /// random numbers, as the volunteer's executor watched (so the answer may be
    /// memoized, `crate::memo`).
    #[serde(default)]
    pub pure: bool,
    /// When the volunteer signed it (Unix ms, by its clock).
    #[serde(default)]
    pub signed_at_ms: u64,
}

impl ReceiptBody {
    fn signing_bytes(&self) -> Vec<u8> {
        let mut bytes = SIGNING_TAG.to_vec();
        cbor4ii::serde::to_writer(&mut bytes, self).expect("receipt bodies always encode");
        bytes
    }
}

/// A receipt with the volunteer's public key and signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// What it ran and what came out.
    pub body: ReceiptBody,
    /// The volunteer's public key, protobuf-encoded as libp2p does, in hex.
    pub public_key: String,
    /// The signature over the tag and the CBOR body, in hex.
    pub signature: String,
}

impl Receipt {
    /// Signs `body` with `keypair` (the volunteer's).
    pub fn sign(body: ReceiptBody, keypair: &Keypair) -> Receipt {
        let signature = keypair
            .sign(&body.signing_bytes())
            .expect("ed25519 signing cannot fail");
        Receipt {
            public_key: hex(&keypair.public().encode_protobuf()),
            signature: hex(&signature),
            body,
        }
    }

    /// Checks that the key is the named volunteer's and signed the body.
    pub fn verify(&self) -> Result<(), ReceiptError> {
        if self.public_key.len() > MAX_HEX || self.signature.len() > MAX_HEX {
            return Err(ReceiptError::BadSignature);
        }
        let signature = unhex(&self.signature).ok_or(ReceiptError::BadSignature)?;
        let (key, signer) =
            known_keys::decode(&self.public_key).ok_or(ReceiptError::BadSignature)?;
        if signer != self.body.volunteer || !key.verify(&self.body.signing_bytes(), &signature) {
            return Err(ReceiptError::BadSignature);
        }
        known_keys::remember(&self.public_key, key, signer);
        Ok(())
    }

    /// Checks the signature and that the signer is `volunteer`, the peer the call ran on.
    pub fn verify_from(&self, volunteer: &str) -> Result<(), ReceiptError> {
        let expected = volunteer
            .parse::<PeerId>()
            .map_err(|_| ReceiptError::WrongSigner {
                expected: volunteer.to_string(),
                signer: self.body.volunteer.to_string(),
            })?;
        self.verify_by(&expected)
    }

    /// [`Receipt::verify_from`] with the volunteer as a [`PeerId`].
    pub fn verify_by(&self, volunteer: &PeerId) -> Result<(), ReceiptError> {
        self.signed_by(volunteer)?;
        self.verify()
    }

    /// Checks only that the receipt names `volunteer` as its signer, not the signature
    /// ([`Receipt::verify`] does that).
    pub fn signed_by(&self, volunteer: &PeerId) -> Result<(), ReceiptError> {
        if self.body.volunteer != *volunteer {
            return Err(ReceiptError::WrongSigner {
                expected: volunteer.to_string(),
                signer: self.body.volunteer.to_string(),
            });
        }
        Ok(())
    }

    /// Checks that it is the receipt of invocation `invocation_id` of `call`: the same
    /// module, inputs, arguments, environment, stdin and memory.
    pub fn matches_call(
        &self,
        invocation_id: u64,
        call: &FunctionCall,
    ) -> Result<(), ReceiptError> {
        let body = &self.body;
        let mismatch = |what| Err(ReceiptError::Mismatch(what));
        if body.invocation_id != invocation_id {
            return mismatch("invocation id");
        }
        if body.module != call.module {
            return mismatch("module");
        }
        if body.inputs != call.inputs {
            return mismatch("inputs");
        }
        if body.args_digest != args_digest(call) {
            return mismatch("arguments, environment or stdin");
        }
        if body.memory_mib < call.memory_mib {
            return mismatch("memory");
        }
        Ok(())
    }

    /// Checks that it says what `execution` says: exit status, failure, stdout and
    /// stderr, and output files.
    pub fn matches_execution(&self, execution: &Execution) -> Result<(), ReceiptError> {
        let body = &self.body;
        let mismatch = |what| Err(ReceiptError::Mismatch(what));
        if body.exit_code != execution.exit_code || body.failure != execution.failure {
            return mismatch("exit status");
        }
        if !body.stdout.matches(&execution.stdout) {
            return mismatch("stdout");
        }
        if !body.stderr.matches(&execution.stderr) {
            return mismatch("stderr");
        }
        if body.outputs != execution.outputs {
            return mismatch("output files");
        }
        Ok(())
    }

    /// All a client checks of the answer to its invocation `invocation_id` of `call`:
    /// the signature, that the signer is the volunteer the answer names, and that the
    /// receipt matches the call and the answer.
    pub fn check(
        &self,
        invocation_id: u64,
        call: &FunctionCall,
        execution: &Execution,
    ) -> Result<(), ReceiptError> {
        self.verify_from(&execution.volunteer)?;
        self.matches_call(invocation_id, call)?;
        self.matches_execution(execution)
    }
}

/// The digest of a call's arguments, environment and stdin CID: SHA-256 over their
/// CBOR encoding, in hex.
pub fn args_digest(call: &FunctionCall) -> String {
    let bytes = cbor4ii::serde::to_vec(Vec::new(), &(&call.args, &call.env, &call.stdin))
        .expect("calls always encode");
    sha256_hex(&bytes)
}

/// SHA-256 of `bytes`, in hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&sha2::Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        text.push(char::from(DIGITS[usize::from(b >> 4)]));
        text.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    text
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let text = text.as_bytes();
    if !text.len().is_multiple_of(2) {
        return None;
    }
    text.chunks_exact(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

/// Public keys already decoded, with their PeerIds: decoding an ed25519 key decompresses
/// a curve point, which costs as much as a fifth of the check. Only keys that signed a
/// receipt that verified are kept, at most [`known_keys::MAX_KEYS`]; the table is emptied
/// when full, so a flood of keys costs a stranger a valid signature each and the node at
/// most the table.
mod known_keys {
    use super::{PeerId, PublicKey, unhex};
    use std::collections::HashMap;
    use std::sync::{LazyLock, Mutex};

    /// Most keys kept.
    pub(super) const MAX_KEYS: usize = 1024;

    type Table = HashMap<String, (PublicKey, PeerId)>;
    static KEYS: LazyLock<Mutex<Table>> = LazyLock::new(|| Mutex::new(HashMap::new()));

    /// The key `hex` encodes (protobuf, as libp2p does), and its PeerId.
    pub(super) fn decode(hex: &str) -> Option<(PublicKey, PeerId)> {
        if let Some(known) = KEYS.lock().ok()?.get(hex) {
            return Some(known.clone());
        }
        let key = PublicKey::try_decode_protobuf(&unhex(hex)?).ok()?;
        let peer = key.to_peer_id();
        Some((key, peer))
    }

    /// Keeps `key`, encoded as `hex`, which just verified a receipt.
    pub(super) fn remember(hex: &str, key: PublicKey, peer: PeerId) {
        let Ok(mut keys) = KEYS.lock() else { return };
        if keys.contains_key(hex) {
            return;
        }
        if keys.len() >= MAX_KEYS {
            keys.clear();
        }
        keys.insert(hex.to_string(), (key, peer));
    }

    /// How many keys are kept.
    #[cfg(test)]
    pub(super) fn len() -> usize {
        KEYS.lock().map_or(0, |k| k.len())
    }

    /// Whether the key `hex` encodes is kept.
    #[cfg(test)]
    pub(super) fn knows(hex: &str) -> bool {
        KEYS.lock().is_ok_and(|k| k.contains_key(hex))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: &str = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku";
    const OTHER: &str = "bafkreie7q3iidccmpvszul7kudcvvuavuo7u6gzlbobczuk5nqk3b4akba";

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

    fn execution(volunteer: PeerId) -> Execution {
        Execution {
            volunteer: volunteer.to_string(),
            exit_code: 0,
            stdout: OutputStream {
                size: 3,
                inline: b"hi\n".to_vec(),
                cid: None,
            },
            stderr: OutputStream::default(),
            outputs: vec![OutputFile {
                name: "out".into(),
                cid: CID.into(),
                size: 9,
            }],
            failure: None,
            memory_mib: 128,
            timings: ExecutionTimings::default(),
            receipt: None,
        }
    }

    fn signed(keypair: &Keypair, call: &FunctionCall, execution: &Execution) -> Receipt {
        let body = ReceiptBody {
            volunteer: keypair.public().to_peer_id(),
            scheduler: PeerId::random(),
            invocation_id: 7,
            reservation_id: 9,
            module: call.module.clone(),
            inputs: call.inputs.clone(),
            args_digest: args_digest(call),
            memory_mib: execution.memory_mib,
            exit_code: execution.exit_code,
            failure: execution.failure.clone(),
            stdout: StreamDigest::of(&execution.stdout.inline, &execution.stdout),
            stderr: StreamDigest::of(&execution.stderr.inline, &execution.stderr),
            outputs: execution.outputs.clone(),
            timings: execution.timings,
            pure: false,
            signed_at_ms: 0,
        };
        Receipt::sign(body, keypair)
    }

    #[test]
    fn an_honest_receipt_checks_and_round_trips() {
        let volunteer = Keypair::generate_ed25519();
        let execution = execution(volunteer.public().to_peer_id());
        let receipt = signed(&volunteer, &call(), &execution);
        receipt.check(7, &call(), &execution).unwrap();
        let cbor = cbor4ii::serde::to_vec(Vec::new(), &receipt).unwrap();
        let back: Receipt = cbor4ii::serde::from_slice(&cbor).unwrap();
        assert_eq!(back, receipt);
        let json = serde_json::to_string(&receipt).unwrap();
        assert_eq!(serde_json::from_str::<Receipt>(&json).unwrap(), receipt);
    }

    #[test]
    fn a_forged_signature_is_refused() {
        let volunteer = Keypair::generate_ed25519();
        let execution = execution(volunteer.public().to_peer_id());
        let mut forged = signed(&volunteer, &call(), &execution);
        // Altered after signing: the signature no longer covers it.
        forged.body.exit_code = 1;
        let mut altered = execution.clone();
        altered.exit_code = 1;
        assert_eq!(
            forged.check(7, &call(), &altered),
            Err(ReceiptError::BadSignature)
        );
        // Signed by another key in the volunteer's name.
        let mallory = Keypair::generate_ed25519();
        let mut forged = signed(&volunteer, &call(), &execution);
        forged.public_key = hex(&mallory.public().encode_protobuf());
        forged.signature = hex(&mallory.sign(&forged.body.signing_bytes()).unwrap());
        assert_eq!(
            forged.check(7, &call(), &execution),
            Err(ReceiptError::BadSignature)
        );
        let mut garbage = signed(&volunteer, &call(), &execution);
        garbage.signature = "zz".into();
        assert_eq!(garbage.verify(), Err(ReceiptError::BadSignature));
    }

    #[test]
    fn a_receipt_signed_by_another_peer_than_the_volunteer_is_refused() {
        let volunteer = Keypair::generate_ed25519();
        let other = Keypair::generate_ed25519();
        // A valid receipt of another peer's, passed off as the volunteer's answer.
        let execution = execution(volunteer.public().to_peer_id());
        let receipt = signed(&other, &call(), &execution);
        receipt.verify().unwrap();
        assert!(matches!(
            receipt.check(7, &call(), &execution),
            Err(ReceiptError::WrongSigner { .. })
        ));
    }

    #[test]
    fn a_receipt_of_another_call_is_refused() {
        let volunteer = Keypair::generate_ed25519();
        let execution = execution(volunteer.public().to_peer_id());
        let receipt = signed(&volunteer, &call(), &execution);
        type Spoil = fn(&mut FunctionCall);
        let cases: [(Spoil, &str); 5] = [
            (|c| c.module = OTHER.into(), "module"),
            (|c| c.stdin = Some(OTHER.into()), "stdin"),
            (|c| c.args.push("b".into()), "arguments"),
            (|c| c.env[0].1 = "W".into(), "environment"),
            (|c| c.inputs[0].1 = OTHER.into(), "inputs"),
        ];
        for (spoil, what) in cases {
            let mut other = call();
            spoil(&mut other);
            let error = receipt.check(7, &other, &execution).unwrap_err();
            assert!(
                matches!(error, ReceiptError::Mismatch(_)),
                "{what}: {error}"
            );
        }
        assert_eq!(
            receipt.check(8, &call(), &execution),
            Err(ReceiptError::Mismatch("invocation id"))
        );
    }

    #[test]
    fn a_receipt_of_other_outputs_is_refused() {
        let volunteer = Keypair::generate_ed25519();
        let execution = execution(volunteer.public().to_peer_id());
        let receipt = signed(&volunteer, &call(), &execution);
        type Spoil = fn(&mut Execution);
        let cases: [(Spoil, &str); 5] = [
            (|e| e.stdout.inline = b"ho\n".to_vec(), "stdout"),
            (|e| e.stderr.size = 1, "stderr"),
            (|e| e.exit_code = 3, "exit status"),
            (|e| e.outputs[0].cid = OTHER.into(), "output files"),
            (
                |e| {
                    e.stdout.cid = Some(OTHER.into());
                    e.stdout.inline.clear();
                },
                "stdout",
            ),
        ];
        for (spoil, what) in cases {
            let mut other = execution.clone();
            spoil(&mut other);
            assert_eq!(
                receipt.check(7, &call(), &other),
                Err(ReceiptError::Mismatch(what))
            );
        }
    }

    #[test]
    fn a_stream_moved_to_its_raw_block_still_matches() {
        let bytes = b"hello\n";
        let digest = StreamDigest::of(bytes, &OutputStream::default());
        let hash =
            cid::multihash::Multihash::<64>::wrap(SHA2_256, &sha2::Sha256::digest(bytes)).unwrap();
        let cid = cid::Cid::new_v1(RAW_CODEC, hash);
        let moved = OutputStream {
            size: 6,
            inline: Vec::new(),
            cid: Some(cid.to_string()),
        };
        assert!(digest.matches(&moved));
        let wrong = cid::multihash::Multihash::<64>::wrap(SHA2_256, &[0; 32]).unwrap();
        let moved = OutputStream {
            cid: Some(cid::Cid::new_v1(RAW_CODEC, wrong).to_string()),
            ..moved
        };
        assert!(!digest.matches(&moved));
    }

    #[test]
    fn hex_round_trips_and_refuses_what_is_not_hex() {
        let bytes: Vec<u8> = (0..=255).collect();
        let text = hex(&bytes);
        assert_eq!(&text[..8], "00010203");
        assert_eq!(&text[text.len() - 4..], "feff");
        assert_eq!(unhex(&text), Some(bytes));
        assert_eq!(unhex("0A"), Some(vec![10]));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex("+1"), None);
    }

    #[test]
    fn only_keys_that_verified_are_remembered_and_never_more_than_the_bound() {
        let volunteer = Keypair::generate_ed25519();
        let execution = execution(volunteer.public().to_peer_id());
        // Mallory's key, over a body that names the volunteer: refused, not kept.
        let mallory = Keypair::generate_ed25519();
        let mut forged = signed(&volunteer, &call(), &execution);
        forged.public_key = hex(&mallory.public().encode_protobuf());
        forged.signature = hex(&mallory.sign(&forged.body.signing_bytes()).unwrap());
        assert_eq!(forged.verify(), Err(ReceiptError::BadSignature));
        assert!(!known_keys::knows(&forged.public_key));
        // A remembered key still refuses a signature that does not verify.
        let honest = signed(&volunteer, &call(), &execution);
        honest.verify().unwrap();
        assert!(known_keys::knows(&honest.public_key));
        let mut altered = honest.clone();
        altered.body.exit_code = 3;
        assert_eq!(altered.verify(), Err(ReceiptError::BadSignature));
        // A flood of valid keys: the table stays within its bound.
        for _ in 0..known_keys::MAX_KEYS + 64 {
            let key = Keypair::generate_ed25519();
            let ran = super::tests::execution(key.public().to_peer_id());
            signed(&key, &call(), &ran).verify().unwrap();
            assert!(known_keys::len() <= known_keys::MAX_KEYS);
        }
    }
}
