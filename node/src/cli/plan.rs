//! Execution plans for `flotilla run PLAN.toml`: named jobs, where each one's module,
//! stdin and inputs come from (a file, a CID, or an output of another job), and what
//! each waits for. Parsing checks the whole plan — unknown keys, references to jobs that
//! do not exist, cycles — before anything runs.
//!
//! ```toml
//! [jobs.count]
//! module = { file = "wasm/wordcount.wasm" }   # relative to the plan, and inside its folder
//! args = ["words.txt"]
//! inputs = { "words.txt" = { file = "data/words.txt" } }
//!
//! [jobs.hash]
//! module = { file = "wasm/sha256.wasm" }
//! memory = "128MiB"
//! stdin = { job = "count", output = "counts.txt" }  # or "stdout" / "stderr"
//! replicas = 3   # run on 3 volunteers, take the majority's answer
//! fresh = true   # run it even if the same pure call was answered before (memoized)
//! ```

use crate::executor::jobdir;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Most jobs one plan may hold.
pub const MAX_JOBS: usize = 256;
/// Largest plan file read, in bytes.
pub const MAX_PLAN_BYTES: u64 = 1024 * 1024;

/// Why a plan cannot run.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The file could not be read.
    #[error("cannot read the plan {path}: {source}")]
    Read {
        /// The plan file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a valid plan.
    #[error("invalid plan {path}: {reason}")]
    Invalid {
        /// The plan file.
        path: PathBuf,
        /// What is wrong, in one line.
        reason: String,
    },
}

/// Where a module, stdin or input comes from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum Source {
    /// A local file, added to the node before the plan runs.
    File {
        /// Its path (relative to the plan file).
        file: PathBuf,
    },
    /// Blocks already on the network.
    Cid {
        /// Their root CID.
        cid: String,
    },
    /// An output of another job of the plan.
    Job {
        /// The job.
        job: String,
        /// `stdout`, `stderr`, or a file it leaves in its directory.
        output: String,
    },
}

/// One job of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanJob {
    /// The module.
    pub module: Source,
    /// Memory to reserve (128 MiB if absent).
    #[serde(default = "default_memory")]
    pub memory: bytesize::ByteSize,
    /// Deadline, e.g. "30s" (the volunteer's default if absent).
    #[serde(default, with = "humantime_serde_opt")]
    pub timeout: Option<std::time::Duration>,
    /// Arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// What goes on stdin.
    #[serde(default)]
    pub stdin: Option<Source>,
    /// Files for its directory, by name.
    #[serde(default)]
    pub inputs: BTreeMap<String, Source>,
    /// Jobs it waits for besides those whose outputs it reads.
    #[serde(default)]
    pub after: Vec<String>,
    /// Run it on this many distinct volunteers and take the majority's answer (1 if
    /// absent; at most 9).
    #[serde(default)]
    pub replicas: Option<u32>,
    /// Run it even if a memoized answer of the same pure call exists.
    #[serde(default)]
    pub fresh: bool,
}

fn default_memory() -> bytesize::ByteSize {
    bytesize::ByteSize::mib(128)
}

/// Durations written as text ("30s", "1m 30s").
mod humantime_serde_opt {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<std::time::Duration>, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("bad duration {text:?}: {e}")))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    jobs: BTreeMap<String, PlanJob>,
}

/// A checked plan: its jobs in an order where each comes after those it waits for.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Jobs by name.
    pub jobs: BTreeMap<String, PlanJob>,
    /// Each job's dependencies (from its sources and `after`).
    pub waits_for: BTreeMap<String, BTreeSet<String>>,
    /// Names in a dependency-respecting order.
    pub order: Vec<String>,
    /// The directory file paths are relative to.
    pub base: PathBuf,
}

impl Source {
    /// The job this source reads from, if any.
    pub fn job(&self) -> Option<&str> {
        match self {
            Source::Job { job, .. } => Some(job),
            _ => None,
        }
    }
}

impl PlanJob {
    /// Every source of the job: module, stdin and inputs.
    pub fn sources(&self) -> impl Iterator<Item = &Source> {
        std::iter::once(&self.module)
            .chain(self.stdin.iter())
            .chain(self.inputs.values())
    }
}

/// Reads and checks the plan at `path`.
pub fn load(path: &Path) -> Result<Plan, PlanError> {
    let invalid = |reason: String| PlanError::Invalid {
        path: path.to_path_buf(),
        reason: crate::one_line(&reason),
    };
    let read = |source| PlanError::Read {
        path: path.to_path_buf(),
        source,
    };
    let size = std::fs::metadata(path).map_err(read)?.len();
    if size > MAX_PLAN_BYTES {
        return Err(invalid(format!("{size} bytes (at most {MAX_PLAN_BYTES})")));
    }
    let text = std::fs::read_to_string(path).map_err(read)?;
    let file: PlanFile = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    let base = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    check(file.jobs, base).map_err(invalid)
}

/// Checks jobs: some, not too many, references to jobs that exist, plain input names,
/// no cycles.
fn check(jobs: BTreeMap<String, PlanJob>, base: PathBuf) -> Result<Plan, String> {
    if jobs.is_empty() {
        return Err("it has no jobs (add a [jobs.NAME] table)".into());
    }
    if jobs.len() > MAX_JOBS {
        return Err(format!("{} jobs (at most {MAX_JOBS})", jobs.len()));
    }
    let mut waits_for = BTreeMap::new();
    for (name, job) in &jobs {
        let mut deps = BTreeSet::new();
        for dep in job
            .sources()
            .filter_map(Source::job)
            .chain(job.after.iter().map(String::as_str))
        {
            if !jobs.contains_key(dep) {
                return Err(format!(
                    "job {name:?} refers to job {dep:?}, which the plan does not have"
                ));
            }
            if dep == name {
                return Err(format!("job {name:?} waits for itself"));
            }
            deps.insert(dep.to_string());
        }
        for input in job.inputs.keys() {
            jobdir::check_name(input).map_err(|e| format!("job {name:?}: {e}"))?;
        }
        if let Source::Job { output, .. } = &job.module
            && (output == "stdout" || output == "stderr")
        {
            return Err(format!("job {name:?}: a module cannot be a job's {output}"));
        }
        waits_for.insert(name.clone(), deps);
    }
    let order = topological_order(&waits_for)?;
    Ok(Plan {
        jobs,
        waits_for,
        order,
        base,
    })
}

/// Names ordered so each comes after what it waits for, or the cycle's members.
fn topological_order(
    waits_for: &BTreeMap<String, BTreeSet<String>>,
) -> Result<Vec<String>, String> {
    let mut order = Vec::with_capacity(waits_for.len());
    let mut placed = BTreeSet::new();
    while order.len() < waits_for.len() {
        let ready: Vec<&String> = waits_for
            .iter()
            .filter(|(name, deps)| {
                !placed.contains(*name) && deps.iter().all(|d| placed.contains(d))
            })
            .map(|(name, _)| name)
            .collect();
        if ready.is_empty() {
            let stuck: Vec<&str> = waits_for
                .keys()
                .filter(|n| !placed.contains(*n))
                .map(String::as_str)
                .collect();
            return Err(format!(
                "its jobs wait for each other in a cycle ({})",
                stuck.join(", ")
            ));
        }
        for name in ready {
            placed.insert(name.clone());
            order.push(name.clone());
        }
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Plan, String> {
        let file: PlanFile = toml::from_str(text).map_err(|e| e.to_string())?;
        check(file.jobs, PathBuf::from("."))
    }

    #[test]
    fn a_plan_is_ordered_by_what_each_job_reads() {
        let plan = parse(
            r#"
            [jobs.hash]
            module = { cid = "bafk" }
            stdin = { job = "count", output = "counts.txt" }
            [jobs.count]
            module = { file = "wc.wasm" }
            args = ["words.txt"]
            timeout = "5s"
            inputs = { "words.txt" = { file = "words.txt" } }
            [jobs.last]
            module = { cid = "bafk" }
            after = ["hash"]
            "#,
        )
        .unwrap();
        assert_eq!(plan.order, ["count", "hash", "last"]);
        assert_eq!(plan.jobs["count"].memory, bytesize::ByteSize::mib(128));
        assert_eq!(
            plan.jobs["count"].timeout,
            Some(std::time::Duration::from_secs(5))
        );
        assert!(plan.waits_for["hash"].contains("count"));
    }

    #[test]
    fn bad_plans_are_refused_with_the_reason() {
        for (text, expected) in [
            ("", "missing field `jobs`"),
            ("[jobs]", "no jobs"),
            (
                "[jobs.a]\nmodule = { cid = \"x\" }\nbogus = 1",
                "unknown field",
            ),
            (
                "[jobs.a]\nmodule = { cid = \"x\" }\nafter = [\"b\"]",
                "does not have",
            ),
            (
                "[jobs.a]\nmodule = { cid = \"x\" }\nafter = [\"a\"]",
                "itself",
            ),
            (
                "[jobs.a]\nmodule = { cid = \"x\" }\nafter = [\"b\"]\n[jobs.b]\nmodule = { cid = \"x\" }\nafter = [\"a\"]",
                "cycle (a, b)",
            ),
            (
                "[jobs.a]\nmodule = { cid = \"x\" }\ninputs = { \"../x\" = { cid = \"x\" } }",
                "plain file name",
            ),
            ("[jobs.a]\nmodule = { nothing = \"x\" }", "did not match"),
            (
                "[jobs.a]\nmodule = { cid = \"x\" }\ntimeout = \"soon\"",
                "bad duration",
            ),
        ] {
            let error = parse(text).unwrap_err();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
    }
}
