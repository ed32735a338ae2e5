//! `flotilla run PLAN.toml`: runs an execution plan through the local node — its files
//! added as blocks first, then every job whose inputs are ready invoked at once, each
//! output CID handed to the jobs that read it — and prints each job's result CIDs.
//!
//! A job whose run fails (or exits non-zero) stops the jobs that wait for it; the others
//! go on. The command exits non-zero if any job did not complete.

use crate::api::client::ApiClient;
use crate::api::types::{InvokeBody, InvokeReply};
use crate::commands::parse_cid;
use crate::invoke::{exit_status, memory_mib, upload};
use crate::market::function::{FunctionCall, OutputStream};
use crate::output;
use crate::plan::{self, Plan, PlanJob, Source};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// How one job of the plan ended.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum JobOutcome {
    /// It ran and exited 0.
    Completed {
        /// Its result.
        result: Box<InvokeReply>,
        /// The CIDs of its stdout, stderr and output files, by name.
        cids: BTreeMap<String, String>,
    },
    /// It could not run, or ran and failed.
    Failed {
        /// Why.
        error: String,
    },
    /// It did not run, because a job it waits for did not complete.
    Skipped {
        /// Why.
        error: String,
    },
}

/// Runs the plan at `path`; its files must be inside its directory unless
/// `allow_outside` ([`crate::plan_paths`]).
pub async fn run(
    client: &ApiClient,
    path: &Path,
    allow_outside: bool,
    json: bool,
) -> anyhow::Result<()> {
    let plan = plan::load(path)?;
    crate::plan_paths::check(&plan, allow_outside)
        .map_err(|e| anyhow::anyhow!("plan {}: {e}", path.display()))?;
    let files = add_files(client, &plan).await?;
    let mut outcomes: BTreeMap<String, JobOutcome> = BTreeMap::new();
    let mut running = FuturesUnordered::new();
    let mut started: BTreeSet<String> = BTreeSet::new();
    loop {
        for name in &plan.order {
            if outcomes.contains_key(name) || started.contains(name) {
                continue;
            }
            let deps = &plan.waits_for[name];
            if let Some(failed) = deps.iter().find(|d| {
                matches!(
                    outcomes.get(*d),
                    Some(JobOutcome::Failed { .. } | JobOutcome::Skipped { .. })
                )
            }) {
                let error = format!("job {failed:?} did not complete");
                report(
                    json,
                    name,
                    &JobOutcome::Skipped {
                        error: error.clone(),
                    },
                );
                outcomes.insert(name.clone(), JobOutcome::Skipped { error });
                continue;
            }
            if !deps.iter().all(|d| outcomes.contains_key(d)) {
                continue;
            }
            match call_of(&plan.jobs[name], &plan.base, &files, &outcomes) {
                Ok(body) => {
                    started.insert(name.clone());
                    let client = client.clone();
                    let name = name.clone();
                    running.push(async move {
                        let reply = client.invoke(&body).await;
                        (name, reply)
                    });
                }
                Err(error) => {
                    let outcome = JobOutcome::Failed {
                        error: error.to_string(),
                    };
                    report(json, name, &outcome);
                    outcomes.insert(name.clone(), outcome);
                }
            }
        }
        let Some((name, reply)) = running.next().await else {
            break;
        };
        let outcome = match reply {
            Ok(reply) => settle(client, reply).await,
            Err(e) => JobOutcome::Failed {
                error: e.to_string(),
            },
        };
        report(json, &name, &outcome);
        outcomes.insert(name, outcome);
    }
    if json {
        output::json(&outcomes);
    }
    let unfinished: Vec<String> = outcomes
        .iter()
        .filter_map(|(name, o)| match o {
            JobOutcome::Completed { .. } => None,
            JobOutcome::Failed { error } | JobOutcome::Skipped { error } => {
                Some(format!("{name} ({error})"))
            }
        })
        .collect();
    anyhow::ensure!(
        unfinished.is_empty(),
        "{} of {} jobs did not complete: {}",
        unfinished.len(),
        outcomes.len(),
        unfinished.join("; ")
    );
    Ok(())
}

/// Adds every file the plan names to the local node, once each.
async fn add_files(client: &ApiClient, plan: &Plan) -> anyhow::Result<BTreeMap<PathBuf, String>> {
    let mut files = BTreeMap::new();
    for job in plan.jobs.values() {
        for source in job.sources() {
            match source {
                Source::File { file } => {
                    let path = plan.base.join(file);
                    if let std::collections::btree_map::Entry::Vacant(entry) = files.entry(path) {
                        let cid = upload(client, entry.key()).await?;
                        entry.insert(cid);
                    }
                }
                Source::Cid { cid } => {
                    parse_cid(cid)?;
                }
                Source::Job { .. } => {}
            }
        }
    }
    Ok(files)
}

/// The call a job makes, its sources resolved to CIDs.
fn call_of(
    job: &PlanJob,
    base: &Path,
    files: &BTreeMap<PathBuf, String>,
    outcomes: &BTreeMap<String, JobOutcome>,
) -> anyhow::Result<InvokeBody> {
    let resolve = |source: &Source| -> anyhow::Result<String> {
        match source {
            Source::File { file } => Ok(files[&base.join(file)].clone()),
            Source::Cid { cid } => Ok(cid.clone()),
            Source::Job { job, output } => match outcomes.get(job) {
                Some(JobOutcome::Completed { cids, .. }) => cids
                    .get(output)
                    .cloned()
                    .ok_or_else(|| anyhow::anyhow!("job {job:?} left no output {output:?}")),
                _ => anyhow::bail!("job {job:?} did not complete"),
            },
        }
    };
    let call = FunctionCall {
        module: resolve(&job.module)?,
        memory_mib: memory_mib(job.memory)?,
        timeout_ms: job.timeout.map(|t| t.as_millis() as u64),
        args: job.args.clone(),
        env: job.env.clone().into_iter().collect(),
        stdin: job.stdin.as_ref().map(resolve).transpose()?,
        inputs: job
            .inputs
            .iter()
            .map(|(name, source)| Ok((name.clone(), resolve(source)?)))
            .collect::<anyhow::Result<_>>()?,
    };
    call.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(InvokeBody {
        call,
        max_tries: None,
        placement: None,
        replicas: job.replicas,
        fresh: job.fresh,
    })
}

/// A finished run as an outcome: completed with every output's CID (stdout and stderr
/// that came back inline are added to the local node, so they have one too), or failed.
async fn settle(client: &ApiClient, reply: InvokeReply) -> JobOutcome {
    let execution = &reply.invocation.execution;
    if exit_status(&reply.invocation) != 0 {
        let why = execution
            .failure
            .clone()
            .unwrap_or_else(|| format!("exit status {}", execution.exit_code));
        return JobOutcome::Failed { error: why };
    }
    let mut cids = BTreeMap::new();
    for (name, stream) in [("stdout", &execution.stdout), ("stderr", &execution.stderr)] {
        match stream_cid(client, stream).await {
            Ok(cid) => {
                cids.insert(name.to_string(), cid);
            }
            Err(e) => {
                return JobOutcome::Failed {
                    error: format!("cannot keep its {name}: {e}"),
                };
            }
        }
    }
    for file in &execution.outputs {
        cids.insert(file.name.clone(), file.cid.clone());
    }
    JobOutcome::Completed {
        result: Box::new(reply),
        cids,
    }
}

async fn stream_cid(client: &ApiClient, stream: &OutputStream) -> anyhow::Result<String> {
    if let Some(cid) = &stream.cid {
        return Ok(cid.clone());
    }
    let body = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from(stream.inline.clone()))]);
    Ok(client.add_with(body, false).await?.cid)
}

/// Prints how a job ended (as the jobs finish, unless the report is JSON).
fn report(json: bool, name: &str, outcome: &JobOutcome) {
    if json {
        return;
    }
    match outcome {
        JobOutcome::Completed { result, cids } => {
            let execution = &result.invocation.execution;
            output::line(&format!(
                "{name}: exit 0 on {} in {:.1} ms",
                execution.volunteer,
                result.total_us as f64 / 1000.0
            ));
            for (output_name, cid) in cids {
                output::line(&format!("  {output_name:<12} {cid}"));
            }
        }
        JobOutcome::Failed { error } => output::line(&format!("{name}: failed: {error}")),
        JobOutcome::Skipped { error } => output::line(&format!("{name}: skipped: {error}")),
    }
}
