//! `flotilla invoke`: run a function on the network by its CID through the local node,
//! print its stdout (and its stderr on stderr), and exit with its exit status; with
//! `--detach`, print a job id at once, which `flotilla job status|result ID` follow.
//!
//! A `--stdin FILE` is added to the local node first, so the volunteer fetches it by CID
//! like every other input; stdout or stderr that came back by CID is fetched and
//! streamed. A function stopped at its deadline exits 124 (as `timeout(1)` does), one
//! that trapped exits 134; errors of Flotilla itself exit 1 with a one-line message.
//! The local node has checked the volunteer's signed receipt (`--json` shows it); with
//! `--replicas N` the call ran on N volunteers and the majority's answer is printed,
//! with a warning naming any volunteer outvoted.

use crate::api::client::ApiClient;
use crate::api::types::{InvokeBody, InvokeReply, SubmitBody, parse_job_id};
use crate::cli::{InvokeArgs, JobCommand};
use crate::commands::{Exit, parse_cid};
use crate::market::function::{FunctionCall, Invocation, OutputStream};
use crate::market::jobs::JobState;
use crate::output;
use anyhow::Context;
use bytes::Bytes;
use futures::StreamExt;
use std::path::Path;
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Exit status of a function stopped at its deadline.
pub const EXIT_DEADLINE: u8 = 124;
/// Exit status of a function that trapped.
pub const EXIT_TRAP: u8 = 134;
const MIB: u64 = 1024 * 1024;

/// Runs `flotilla invoke`.
pub async fn run(client: &ApiClient, args: InvokeArgs, json: bool) -> anyhow::Result<()> {
    let stdin = match (&args.stdin, &args.stdin_cid) {
        (Some(path), _) => Some(upload(client, path).await?),
        (None, Some(cid)) => Some(parse_cid(cid)?.to_string()),
        (None, None) => None,
    };
    let body = InvokeBody {
        call: FunctionCall {
            module: parse_cid(&args.cid)?.to_string(),
            memory_mib: memory_mib(args.memory)?,
            timeout_ms: args.timeout.map(|t| t.as_millis() as u64),
            args: args.args,
            env: pairs("--env", "K=V", &args.env)?,
            stdin,
            inputs: pairs("--input", "NAME=CID", &args.inputs)?,
        },
        max_tries: args.max_tries,
        placement: args.placement,
        replicas: args.replicas,
        fresh: args.fresh,
    };
    body.call.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    if args.detach {
        let submitted = client
            .submit(&SubmitBody {
                invoke: body,
                wait_ms: args.wait.map(|w| w.as_millis() as u64),
            })
            .await?;
        if json {
            output::json(&submitted);
        } else {
            output::line(&submitted.job_id);
        }
        return Ok(());
    }
    let reply = client.invoke(&body).await?;
    if json {
        output::json(&reply);
        return exit_with(&reply.invocation, false);
    }
    if let Some(report) = reply.replicas.as_ref().filter(|r| !r.dissenters.is_empty()) {
        #[allow(clippy::print_stderr)]
        {
            eprintln!("warning: {}", report.describe());
        }
    }
    print_result(client, &reply.invocation).await
}

/// Writes a run's stdout and stderr out and ends with its exit status.
async fn print_result(client: &ApiClient, invocation: &Invocation) -> anyhow::Result<()> {
    write_stream(client, &invocation.execution.stdout, tokio::io::stdout()).await?;
    write_stream(client, &invocation.execution.stderr, tokio::io::stderr()).await?;
    exit_with(invocation, true)
}

/// Ends with the run's exit status (saying why it failed, if it did and `say`).
fn exit_with(invocation: &Invocation, say: bool) -> anyhow::Result<()> {
    if let Some(failure) = &invocation.execution.failure
        && say
    {
        #[allow(clippy::print_stderr)]
        {
            eprintln!("error: the function failed: {failure}");
        }
    }
    match exit_status(invocation) {
        0 => Ok(()),
        status => Err(Exit(status).into()),
    }
}

/// Runs `flotilla job status|result ID`.
pub async fn job(client: &ApiClient, command: JobCommand, json: bool) -> anyhow::Result<()> {
    let (id, want_result) = match command {
        JobCommand::Status { id } => (id, false),
        JobCommand::Result { id } => (id, true),
    };
    parse_job_id(&id).map_err(|e| anyhow::anyhow!(e))?;
    let record = client.job(&id).await?;
    if !want_result {
        if json {
            output::json(&record);
        } else {
            output::line(&format!(
                "job {id}: {} after {} attempt(s), scheduler {}",
                record.state, record.attempts, record.scheduler
            ));
            if let Some(error) = &record.error {
                output::line(&format!("  {error}"));
            }
            if let Some(result) = &record.result {
                let execution = &result.execution;
                output::line(&format!(
                    "  exit status {} on volunteer {}",
                    execution.exit_code, execution.volunteer
                ));
                for (name, stream) in [("stdout", &execution.stdout), ("stderr", &execution.stderr)]
                {
                    if let Some(cid) = &stream.cid {
                        output::line(&format!("  {name}: {cid} ({} bytes)", stream.size));
                    }
                }
                for file in &execution.outputs {
                    output::line(&format!(
                        "  {}: {} ({} bytes)",
                        file.name, file.cid, file.size
                    ));
                }
            }
        }
        return Ok(());
    }
    match (record.state, &record.result) {
        (JobState::Done, Some(result)) if json => {
            output::json(result);
            exit_with(result, false)
        }
        (JobState::Done, Some(result)) => print_result(client, result).await,
        (JobState::Failed, _) => anyhow::bail!(
            "job {id} failed: {}",
            record.error.as_deref().unwrap_or("no reason given")
        ),
        (state, _) => anyhow::bail!(
            "job {id} is {state}, not done yet{}",
            record
                .error
                .as_deref()
                .map_or(String::new(), |e| format!(" ({e})"))
        ),
    }
}

/// `size` in whole MiB, rounded up, refused above the largest tier.
pub fn memory_mib(size: bytesize::ByteSize) -> anyhow::Result<u32> {
    flotilla_overlay::regions::Tier::for_request(size.as_u64())?;
    Ok(u32::try_from(size.as_u64().div_ceil(MIB))?)
}

/// Splits `NAME=VALUE` items of `flag`.
pub fn pairs(flag: &str, form: &str, items: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    items
        .iter()
        .map(|item| match item.split_once('=') {
            Some((name, value)) if !name.is_empty() => Ok((name.to_string(), value.to_string())),
            _ => anyhow::bail!("{flag} takes {form}, not {item:?}"),
        })
        .collect()
}

/// Adds a file (or this process's stdin, for `-`) to the local node as cache, not pinned
/// (a call's data: evicted once the store needs the room); returns its CID.
pub async fn upload(client: &ApiClient, path: &Path) -> anyhow::Result<String> {
    let added = if path == Path::new("-") {
        let mut bytes = Vec::new();
        let limit = crate::market::MAX_INPUT_BYTES;
        let mut stdin = tokio::io::AsyncReadExt::take(tokio::io::stdin(), limit + 1);
        tokio::io::AsyncReadExt::read_to_end(&mut stdin, &mut bytes)
            .await
            .context("cannot read stdin")?;
        anyhow::ensure!(
            bytes.len() as u64 <= limit,
            "stdin is larger than the {limit}-byte input limit"
        );
        let body = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from(bytes))]);
        client.add_with(body, false).await?
    } else {
        let file = tokio::fs::File::open(path)
            .await
            .with_context(|| format!("cannot open {}", path.display()))?;
        let meta = file.metadata().await?;
        anyhow::ensure!(meta.is_file(), "{} is not a regular file", path.display());
        client
            .add_with(tokio_util::io::ReaderStream::new(file), false)
            .await?
    };
    Ok(added.cid)
}

/// Writes stdout or stderr out: inline bytes as they are, a CID fetched and streamed.
pub async fn write_stream<W: AsyncWrite + Unpin>(
    client: &ApiClient,
    stream: &OutputStream,
    mut out: W,
) -> anyhow::Result<()> {
    match &stream.cid {
        None => out.write_all(&stream.inline).await?,
        Some(cid) => {
            let cid = parse_cid(cid)?;
            client.fetch(&cid, |_| {}).await?;
            let mut body = client.cat(&cid).await?;
            while let Some(chunk) = body.next().await {
                out.write_all(&chunk?).await?;
            }
        }
    }
    out.flush().await?;
    Ok(())
}

/// The status `invoke` exits with for this run.
pub fn exit_status(invocation: &Invocation) -> u8 {
    let execution = &invocation.execution;
    match &execution.failure {
        Some(failure) if failure.starts_with(crate::executor::DEADLINE_FAILURE) => EXIT_DEADLINE,
        Some(_) => EXIT_TRAP,
        // WASI exit statuses are 0..=255 on every host that runs them.
        None => (execution.exit_code & 0xff) as u8,
    }
}

/// Where the time of an invocation went, one line per step.
pub fn timing_lines(reply: &InvokeReply) -> Vec<String> {
    let inv = &reply.invocation;
    let t = &inv.execution.timings;
    let ms = |us: u64| us as f64 / 1000.0;
    let volunteer_us = t.fetch_us + t.load_us + t.instantiate_us + t.execute_us + t.store_us;
    if inv.memoized {
        return vec![
            format!(
                "memo found         {:>9.3} ms  ({} exchanges; nothing ran: the answer of an earlier run, signed by its volunteer)",
                ms(inv.discover_us),
                inv.exchanges
            ),
            format!(
                "the run it saved   {:>9.3} ms  (instantiate and execute, on its volunteer)",
                ms(t.instantiate_us + t.execute_us)
            ),
            format!("total              {:>9.3} ms", ms(reply.total_us)),
        ];
    }
    vec![
        format!(
            "discover           {:>9.3} ms  ({} exchanges, {} probes{})",
            ms(inv.discover_us),
            inv.exchanges,
            inv.probes,
            if inv.failed_attempts.is_empty() {
                String::new()
            } else {
                format!(", {} volunteer(s) failed first", inv.failed_attempts.len())
            }
        ),
        format!("fetch inputs       {:>9.3} ms", ms(t.fetch_us)),
        format!(
            "{}    {:>9.3} ms",
            if t.compiled {
                "compile module"
            } else {
                "load from cache"
            },
            ms(t.load_us)
        ),
        format!("instantiate        {:>9.3} ms", ms(t.instantiate_us)),
        format!("execute            {:>9.3} ms", ms(t.execute_us)),
        format!("store outputs      {:>9.3} ms", ms(t.store_us)),
        format!(
            "messages + rest    {:>9.3} ms",
            ms(reply
                .total_us
                .saturating_sub(inv.discover_us + volunteer_us))
        ),
        format!("total              {:>9.3} ms", ms(reply.total_us)),
    ]
}
