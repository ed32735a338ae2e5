//! What an invocation carries: the function call a client asks for, what the volunteer
//! that ran it reports, and what the client gets back; with the bounds every call is
//! checked against before anything is reserved.
//!
//! Everything a function reads or writes moves as content-addressed blocks: the module,
//! stdin and named inputs are CIDs the volunteer fetches; output files come back as CIDs,
//! and stdout or stderr too once they are larger than [`MAX_INLINE_OUTPUT`].

use cid::Cid;
use flotilla_overlay::regions::Tier;
use serde::{Deserialize, Serialize};

/// Stdout or stderr up to this size travels in the answer; larger ones are stored as
/// blocks and returned by CID.
pub const MAX_INLINE_OUTPUT: usize = 16 * 1024;
/// Most arguments one call may pass.
pub const MAX_ARGS: usize = 256;
/// Most environment variables one call may set.
pub const MAX_ENV: usize = 256;
/// Most named inputs one call may place in the job directory.
pub const MAX_INPUTS: usize = 64;
/// Most bytes of arguments, environment and input names together.
pub const MAX_CALL_TEXT: usize = 32 * 1024;
/// Longest deadline a call may ask for, in ms.
pub const MAX_TIMEOUT_MS: u64 = 10 * 60 * 1000;
/// Most output files an answer lists.
pub const MAX_OUTPUT_FILES: usize = 64;
const MIB: u64 = 1024 * 1024;

/// A function call: which module to run, with what, in how much memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCall {
    /// CID of the WebAssembly module.
    pub module: String,
    /// Memory to reserve, in MiB: the guest's hard limit.
    pub memory_mib: u32,
    /// Deadline, in ms (the volunteer's default if `None`).
    pub timeout_ms: Option<u64>,
    /// Arguments after the program name.
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment variables.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// CID of what to put on stdin.
    #[serde(default)]
    pub stdin: Option<String>,
    /// Files to place in the job directory: name and CID.
    #[serde(default)]
    pub inputs: Vec<(String, String)>,
}

/// Why a call is refused before anything is reserved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CallRejected(pub String);

impl FunctionCall {
    /// A digest of everything the call says (module, memory, deadline, arguments,
    /// environment, stdin, inputs), so a reused invocation id with another call is told
    /// apart.
    pub fn digest(&self) -> [u8; 32] {
        use sha2::Digest;
        let bytes = cbor4ii::serde::to_vec(Vec::new(), self).expect("calls always encode");
        sha2::Sha256::digest(&bytes).into()
    }

    /// Checks the call against the bounds: CIDs that parse, a memory size some tier
    /// holds, a deadline within [`MAX_TIMEOUT_MS`], plain input names, bounded lists.
    pub fn validate(&self) -> Result<(), CallRejected> {
        let reject = |why: String| Err(CallRejected(why));
        parse_cid("module", &self.module)?;
        if self.memory_mib == 0 {
            return reject("--memory must be more than 0".into());
        }
        Tier::for_request(u64::from(self.memory_mib) * MIB)
            .map_err(|e| CallRejected(e.to_string()))?;
        if let Some(ms) = self.timeout_ms
            && (ms == 0 || ms > MAX_TIMEOUT_MS)
        {
            return reject(format!(
                "a timeout of {ms} ms is outside (0, {MAX_TIMEOUT_MS}] ms"
            ));
        }
        if self.args.len() > MAX_ARGS {
            return reject(format!(
                "{} arguments (at most {MAX_ARGS})",
                self.args.len()
            ));
        }
        if self.env.len() > MAX_ENV {
            return reject(format!(
                "{} environment variables (at most {MAX_ENV})",
                self.env.len()
            ));
        }
        if self.inputs.len() > MAX_INPUTS {
            return reject(format!(
                "{} inputs (at most {MAX_INPUTS})",
                self.inputs.len()
            ));
        }
        for (key, _) in &self.env {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return reject(format!("bad environment variable name {key:?}"));
            }
        }
        if let Some(stdin) = &self.stdin {
            parse_cid("stdin", stdin)?;
        }
        let mut names = std::collections::BTreeSet::new();
        for (name, cid) in &self.inputs {
            check_input_name(name)?;
            if !names.insert(name) {
                return reject(format!("input {name:?} is named twice"));
            }
            parse_cid(&format!("input {name:?}"), cid)?;
        }
        let text: usize = self.args.iter().map(String::len).sum::<usize>()
            + self
                .env
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
            + self
                .inputs
                .iter()
                .map(|(n, c)| n.len() + c.len())
                .sum::<usize>();
        if text > MAX_CALL_TEXT {
            return reject(format!(
                "{text} bytes of arguments, environment and inputs (at most {MAX_CALL_TEXT})"
            ));
        }
        Ok(())
    }
}

/// Checks that `name` can name a file in the job directory: a plain relative file name
/// of at most 255 bytes, no `/`, `..` or leading `.`. The executor checks the same rule
/// (`flotilla_executor::jobdir::check_name`) when it writes the inputs; a test in
/// flotilla-node keeps the two in step.
pub fn check_input_name(name: &str) -> Result<(), CallRejected> {
    let path = std::path::Path::new(name);
    let plain = !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && path.components().count() == 1
        && matches!(
            path.components().next(),
            Some(std::path::Component::Normal(_))
        );
    if plain {
        Ok(())
    } else {
        Err(CallRejected(format!(
            "input name '{name}' must be a plain file name (no '/', '..' or leading '.')"
        )))
    }
}

/// Parses the CID `what` names, or says which one is wrong.
pub fn parse_cid(what: &str, text: &str) -> Result<Cid, CallRejected> {
    text.parse::<Cid>()
        .map_err(|e| CallRejected(format!("the {what} CID {text:?} is not a CID: {e}")))
}

/// Stdout or stderr: inline when small, by CID when large.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputStream {
    /// Its size in bytes.
    pub size: u64,
    /// Its bytes, when at most [`MAX_INLINE_OUTPUT`] (text in JSON when it is UTF-8).
    #[serde(with = "text_or_bytes", default)]
    pub inline: Vec<u8>,
    /// The CID of its blocks, when larger.
    #[serde(default)]
    pub cid: Option<String>,
}

/// Bytes as a byte string in CBOR, and as text in JSON when they are UTF-8 (a list of
/// numbers otherwise), so `--json` output stays readable.
mod text_or_bytes {
    use serde::de::{SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(bytes) {
            Ok(text) if s.is_human_readable() => s.serialize_str(text),
            _ => s.serialize_bytes(bytes),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_any(BytesOrText)
    }

    struct BytesOrText;

    impl<'de> Visitor<'de> for BytesOrText {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a byte string or text")
        }

        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Vec<u8>, E> {
            Ok(v.as_bytes().to_vec())
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(byte) = seq.next_element()? {
                bytes.push(byte);
            }
            Ok(bytes)
        }
    }
}

/// One file the function left in its directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFile {
    /// Its path in the job directory.
    pub name: String,
    /// The CID of its blocks.
    pub cid: String,
    /// Its size in bytes.
    pub size: u64,
}

/// Where a volunteer's time went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutionTimings {
    /// Fetching the module, stdin and inputs, in µs.
    pub fetch_us: u64,
    /// Compiling the module, or loading it from the cache, in µs.
    pub load_us: u64,
    /// Whether it was compiled now.
    pub compiled: bool,
    /// Instantiating it, in µs.
    pub instantiate_us: u64,
    /// Running it, in µs.
    pub execute_us: u64,
    /// Storing its outputs as blocks, in µs.
    pub store_us: u64,
}

/// How a run on a volunteer ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Execution {
    /// The volunteer that ran it.
    pub volunteer: String,
    /// Its exit status (-1 after a trap or at its deadline).
    pub exit_code: i32,
    /// What it wrote on stdout.
    pub stdout: OutputStream,
    /// What it wrote on stderr.
    pub stderr: OutputStream,
    /// Files it left in its directory.
    pub outputs: Vec<OutputFile>,
    /// Why it failed, when it trapped or ran past its deadline.
    pub failure: Option<String>,
    /// Memory it was given, in MiB.
    pub memory_mib: u32,
    /// Where the volunteer's time went.
    pub timings: ExecutionTimings,
    /// The volunteer's signed receipt for this run (answers of older volunteers lack it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt: Option<Box<crate::receipt::Receipt>>,
}

/// A volunteer that could not run a call, as the scheduler saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedAttempt {
    /// The volunteer.
    pub volunteer: String,
    /// What went wrong.
    pub error: String,
}

/// What the client gets back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invocation {
    /// The id that made retries safe.
    pub invocation_id: u64,
    /// The scheduler that placed it.
    pub scheduler: String,
    /// The run.
    pub execution: Execution,
    /// Volunteers tried before, and why they failed.
    pub failed_attempts: Vec<FailedAttempt>,
    /// Discovering and reserving, over all attempts, in µs.
    pub discover_us: u64,
    /// From the scheduler taking the call to the answer, in µs.
    pub scheduler_us: u64,
    /// Offers probed and messages sent to place it.
    pub messages: u32,
    /// Region probes over all its attempts (random keys looked up and their holders
    /// asked): the hops until placement. Answers of older schedulers lack it (read as 0).
    #[serde(default)]
    pub probes: u32,
    /// Request-response exchanges the call cost, the client's with its scheduler
    /// included: Kademlia requests, questions to holders, and calls to volunteers (a
    /// request a node sends itself is none). Answers of older schedulers lack it.
    #[serde(default)]
    pub exchanges: u32,
    /// Answered from a memoized result of the same pure call (`crate::memo`): nothing
    /// ran, and `execution` is the earlier run's, with its volunteer's receipt.
    #[serde(default)]
    pub memoized: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: &str = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku";

    fn call() -> FunctionCall {
        FunctionCall {
            module: CID.into(),
            memory_mib: 256,
            timeout_ms: Some(1000),
            args: vec!["a".into()],
            env: vec![("K".into(), "V".into())],
            stdin: Some(CID.into()),
            inputs: vec![("in.txt".into(), CID.into())],
        }
    }

    #[test]
    fn streams_are_text_in_json_and_bytes_in_cbor() {
        for inline in [b"hello\n".to_vec(), vec![0xff, 0x00, 0x80]] {
            let stream = OutputStream {
                size: inline.len() as u64,
                inline,
                cid: None,
            };
            let json = serde_json::to_string(&stream).unwrap();
            assert_eq!(serde_json::from_str::<OutputStream>(&json).unwrap(), stream);
            let cbor = cbor4ii::serde::to_vec(Vec::new(), &stream).unwrap();
            let back: OutputStream = cbor4ii::serde::from_slice(&cbor).unwrap();
            assert_eq!(back, stream);
        }
        let json = serde_json::to_string(&OutputStream {
            size: 2,
            inline: b"hi".to_vec(),
            cid: None,
        })
        .unwrap();
        assert!(json.contains(r#""inline":"hi""#), "{json}");
    }

    #[test]
    fn invocations_without_probes_still_decode() {
        let stream = OutputStream {
            size: 0,
            inline: Vec::new(),
            cid: None,
        };
        let invocation = Invocation {
            invocation_id: 1,
            scheduler: "s".into(),
            execution: Execution {
                volunteer: "v".into(),
                exit_code: 0,
                stdout: stream.clone(),
                stderr: stream,
                outputs: Vec::new(),
                failure: None,
                memory_mib: 128,
                timings: ExecutionTimings::default(),
                receipt: None,
            },
            failed_attempts: Vec::new(),
            discover_us: 5,
            scheduler_us: 9,
            messages: 12,
            probes: 2,
            exchanges: 4,
            memoized: false,
        };
        let mut json = serde_json::to_value(&invocation).unwrap();
        assert_eq!(json["probes"], 2);
        json.as_object_mut().unwrap().remove("probes");
        json.as_object_mut().unwrap().remove("exchanges");
        let old: Invocation = serde_json::from_value(json).unwrap();
        assert_eq!(
            old,
            Invocation {
                probes: 0,
                exchanges: 0,
                memoized: false,
                ..invocation
            }
        );
    }

    #[test]
    fn input_names_must_be_plain() {
        for bad in ["", "../x", "a/b", ".hidden", "/etc/passwd", "..", "."] {
            assert!(check_input_name(bad).is_err(), "{bad}");
        }
        assert!(check_input_name(&"x".repeat(256)).is_err());
        check_input_name("input.txt").unwrap();
        check_input_name(&"x".repeat(255)).unwrap();
    }

    #[test]
    fn a_good_call_passes() {
        call().validate().unwrap();
    }

    #[test]
    fn bad_calls_are_refused_with_the_reason() {
        type Spoil = Box<dyn Fn(&mut FunctionCall)>;
        let cases: Vec<(Spoil, &str)> = vec![
            (Box::new(|c| c.module = "nope".into()), "module CID"),
            (Box::new(|c| c.memory_mib = 11 * 1024), "largest"),
            (Box::new(|c| c.memory_mib = 0), "more than 0"),
            (Box::new(|c| c.timeout_ms = Some(0)), "timeout"),
            (
                Box::new(|c| c.timeout_ms = Some(MAX_TIMEOUT_MS + 1)),
                "timeout",
            ),
            (Box::new(|c| c.inputs[0].0 = "../x".into()), "name"),
            (
                Box::new(|c| c.inputs.push(("in.txt".into(), CID.into()))),
                "twice",
            ),
            (Box::new(|c| c.stdin = Some("x".into())), "stdin CID"),
            (Box::new(|c| c.env[0].0 = "A=B".into()), "environment"),
            (
                Box::new(|c| c.args = vec!["x".into(); MAX_ARGS + 1]),
                "arguments",
            ),
            (
                Box::new(|c| c.args = vec!["x".repeat(MAX_CALL_TEXT)]),
                "bytes of arguments",
            ),
        ];
        for (spoil, expected) in cases {
            let mut c = call();
            spoil(&mut c);
            let error = c.validate().unwrap_err().to_string();
            assert!(error.contains(expected), "{error:?} lacks {expected:?}");
        }
    }
}
