//! `flotilla-plan`: Flotilla's Testground plan binary, and the same scenarios on one
//! machine.
//!
//! * With no command (as Testground starts it), it is one instance of the run that the
//!   `TEST_*` environment variables describe.
//! * `flotilla-plan simulate CASE [--nodes N] [--duration D] …` runs a whole case locally.
//! * `flotilla-plan report DIR` turns collected records into metrics and plots.
//! * `flotilla-plan cleanup` removes namespaces a killed simulation left behind.

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use flotilla_testground::coordinator::sdk::SdkCoordinator;
use flotilla_testground::links::netns;
use flotilla_testground::links::sdk::{SHAPED_STATE, Shapes, SidecarLinks};
use flotilla_testground::params::Params;
use flotilla_testground::records::{PARAMS_FILE, RunInfo, unix_ms};
use flotilla_testground::report::{self, Summary};
use flotilla_testground::scenario::{Case, Instance};
use flotilla_testground::simulate::{self, NAMESPACE_PREFIX, NetnsMode, Simulation};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "flotilla-plan",
    version,
    about = "Flotilla's Testground plan and local simulations"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a case locally with real `flotilla node` processes
    Simulate(SimulateArgs),
    /// Turn the records under DIR into one CSV per metric, SVG plots and a summary
    Report {
        /// Where the instances' records are (searched recursively)
        dir: PathBuf,
        /// Where the report goes (not DIR itself) [default: DIR/report]
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Check that the run in DIR wrote every metric file with plausible figures
    Check {
        /// The run's output directory
        dir: PathBuf,
        /// Nodes the run had
        #[arg(long)]
        nodes: u64,
    },
    /// Remove network namespaces, node processes and scratch directories left by
    /// simulations that were killed, and put the ARP limits back once no run is left
    Cleanup {
        /// Only those of runs started by this process id (scripts/simulate's)
        #[arg(long)]
        owner: Option<String>,
    },
}

#[derive(Debug, clap::Args)]
struct SimulateArgs {
    /// discovery, churn or partition
    case: Case,
    /// Instances (schedulers + clients + volunteers)
    #[arg(long, default_value_t = 10)]
    nodes: u32,
    /// How long clients invoke, e.g. 2m [default: the case's, 120s]
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Share of lent memory kept reserved, 0–1
    #[arg(long)]
    utilisation: Option<f64>,
    /// Share of volunteers replaced per minute, 0–60 (churn case; above 1, each volunteer
    /// more than once a minute on average)
    #[arg(long)]
    churn: Option<f64>,
    /// Plain random probing over the whole key space, without regions or fallback
    #[arg(long)]
    baseline: bool,
    /// Any parameter of the manifest, repeatable: --param max_tries=5
    #[arg(long = "param", value_name = "KEY=VALUE")]
    params: Vec<String>,
    /// Where records and the report go [default: sim-out/CASE]
    #[arg(long)]
    out: Option<PathBuf>,
    /// When to use network namespaces
    #[arg(long, value_enum, default_value_t = NetnsMode::Auto)]
    netns: NetnsMode,
    /// The flotilla binary [default: beside this one]
    #[arg(long, env = "FLOTILLA_BIN")]
    flotilla: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&e.into()),
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(error: &anyhow::Error) -> ExitCode {
    let message = flotilla_api::one_line(&format!("{error:#}"));
    #[allow(clippy::print_stderr)]
    {
        eprintln!("error: {message}");
    }
    ExitCode::FAILURE
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        None => testground_instance().await,
        Some(Command::Simulate(args)) => {
            let summary = simulation(args)?.run().await?;
            // The run inside namespaces leaves the printing to the one that started it.
            if std::env::var_os(flotilla_testground::simulate::TOPOLOGY_ENV).is_none() {
                print_summary(&summary);
            }
            Ok(())
        }
        Some(Command::Report { dir, out }) => {
            let out = out.unwrap_or_else(|| dir.join("report"));
            let summary = report::write_report(&dir, &out)?;
            print_summary(&summary);
            Ok(())
        }
        Some(Command::Check { dir, nodes }) => {
            let problems = flotilla_testground::check::problems(&dir, nodes);
            if !problems.is_empty() {
                bail!("{}: {}", dir.display(), problems.join("; "));
            }
            Ok(())
        }
        Some(Command::Cleanup { owner }) => {
            let (namespaces, scratch) = match &owner {
                Some(o) => (simulate::namespace_prefix(o), simulate::scratch_prefix(o)),
                None => (
                    NAMESPACE_PREFIX.to_string(),
                    simulate::SCRATCH_PREFIX.to_string(),
                ),
            };
            let killed = simulate::kill_processes_mentioning(&scratch);
            let left = netns::leftovers(&namespaces);
            netns::delete(&left);
            netns::restore_limits_if_unused();
            let dirs = simulate::remove_dirs_starting_with(&std::env::temp_dir(), &scratch);
            tracing::info!(killed, namespaces = left.len(), dirs, "cleaned up");
            Ok(())
        }
    }
}

fn simulation(args: SimulateArgs) -> anyhow::Result<Simulation> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    if let Some(d) = args.duration {
        pairs.push(("duration_s".into(), d.as_secs().max(1).to_string()));
    }
    if let Some(u) = args.utilisation {
        pairs.push(("utilisation".into(), u.to_string()));
    }
    if let Some(c) = args.churn {
        pairs.push(("churn_per_min".into(), c.to_string()));
    }
    if args.baseline {
        pairs.push(("key_space".into(), "whole".into()));
        pairs.push(("fallback".into(), "false".into()));
    }
    for kv in &args.params {
        let Some((k, v)) = kv.split_once('=') else {
            bail!("--param wants KEY=VALUE, got '{kv}'");
        };
        pairs.push((k.trim().into(), v.trim().into()));
    }
    let params = Params::from_pairs(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))?;
    let node_binary = match args.flotilla {
        Some(path) => path,
        None => beside_this_program("flotilla")?,
    };
    Ok(Simulation {
        case: args.case,
        nodes: args.nodes,
        params,
        out: args
            .out
            .unwrap_or_else(|| PathBuf::from("sim-out").join(args.case.name())),
        netns: args.netns,
        node_binary,
    })
}

fn beside_this_program(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("finding this program")?;
    Ok(exe.with_file_name(name))
}

/// One instance of a Testground run.
async fn testground_instance() -> anyhow::Result<()> {
    if std::env::var_os("TEST_PLAN").is_none() {
        bail!(
            "no TEST_* environment: run under Testground, or use `flotilla-plan simulate` (see --help)"
        );
    }
    let client = testground::client::Client::new_and_init()
        .await
        .map_err(|e| anyhow::anyhow!("joining the Testground run: {e}"))?;
    let run = client.run_parameters();
    let outcome = play_testground(&client, &run).await;
    match &outcome {
        Ok(()) => client.clone().record_success().await?,
        Err(e) => client.clone().record_failure(format!("{e:#}")).await?,
    }
    outcome
}

async fn play_testground(
    client: &testground::client::Client,
    run: &testground::RunParameters,
) -> anyhow::Result<()> {
    let case = Case::from_name(&run.test_case)
        .with_context(|| format!("unknown test case '{}'", run.test_case))?;
    let params = Params::from_map(&run.test_instance_params)?;
    let ip = run
        .data_network_ip()?
        .context("no address on the test's data network")?;
    let shapes = Shapes {
        latency_ms: params.latency_ms,
        loss_percent: params.loss_percent,
        instances: run.test_instance_count,
    };
    let links = SidecarLinks::new(client.clone(), shapes);
    if params.shapes_links() {
        links
            .configure(SHAPED_STATE, &[])
            .await
            .context("shaping the links")?;
    }
    let node_binary = std::env::var_os("FLOTILLA_BIN")
        .map(PathBuf::from)
        .map_or_else(|| beside_this_program("flotilla"), Ok)?;
    let seq = u32::try_from(client.global_seq().saturating_sub(1))?;
    let count = u32::try_from(run.test_instance_count)?;
    if seq == 0 {
        // The run's parameters, for `flotilla-plan report` to carry into the report.
        std::fs::create_dir_all(&run.test_outputs_path)?;
        RunInfo {
            case,
            nodes: count,
            netns: false,
            started_unix_ms: unix_ms(),
            command: std::env::args().collect(),
            params: params.clone(),
        }
        .write(&run.test_outputs_path.join(PARAMS_FILE))?;
    }
    let instance = Instance {
        seq,
        count,
        case,
        params,
        coordinator: SdkCoordinator::new(client.clone()),
        links: Arc::new(links),
        node_binary,
        ip,
        netns: None,
        outputs: run.test_outputs_path.clone(),
        scratch: PathBuf::from(&run.test_temp_path),
    };
    instance.run().await
}

#[allow(clippy::print_stdout)]
fn print_summary(summary: &Summary) {
    let text = serde_json::to_string_pretty(summary).unwrap_or_default();
    println!("{text}");
}
