//! `flotilla-sim`: sweeps the discovery simulator over utilisation, `max_tries`, how many
//! of the probes stay in the request's own tier, and the fraction of schedulers, beside
//! the plain-random-probing baseline, and writes `results.csv` and SVG plots of success
//! rate, probes per request and fallback share.
//!
//! `flotilla-sim market` runs the whole market over time instead, on the virtual-time
//! harness (`flotilla_scheduler::market_sim`): calls at each of a list of rates, and
//! volunteers crashing, beside the baseline on the same machines; it prints a table
//! and writes `market.csv`.
#![allow(clippy::print_stdout)]

use anyhow::Context;
use clap::{Parser, Subcommand};
use flotilla_offers::offerer::Slicing;
use flotilla_scheduler::discovery::DiscoveryConfig;
use flotilla_scheduler::sim::{Network, Outcome};
use plotters::prelude::*;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Simulates discovery over virtual peers (no sockets) and writes CSV and SVG plots.
#[derive(Debug, Parser)]
#[command(name = "flotilla-sim", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    sweep: Args,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the whole market over time on the virtual-time harness (publishing,
    /// reports, probes, reserve-and-run, retries, crashes), beside the baseline.
    Market(MarketArgs),
}

/// The market over time.
#[derive(Debug, clap::Args)]
struct MarketArgs {
    /// Nodes
    #[arg(long, default_value_t = 10_000)]
    peers: usize,
    /// Fraction of nodes that are schedulers
    #[arg(long, default_value_t = 0.05)]
    schedulers: f64,
    /// Calls per second of virtual time, over the network, to sweep
    #[arg(long, value_delimiter = ',', default_value = "100,400,800")]
    rates: Vec<f64>,
    /// Virtual seconds of calls per run
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Shortest and longest run of a call, in ms
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    run_ms: Vec<u64>,
    /// Share of volunteers that crash per minute
    #[arg(long, default_value_t = 0.05)]
    churn: f64,
    /// Random seed (the same seed gives the same figures)
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Output directory
    #[arg(long, default_value = "sim-out")]
    out: PathBuf,
}

/// The discovery sweep.
#[derive(Debug, clap::Args)]
struct Args {
    /// Virtual peers
    #[arg(long, default_value_t = 10_000)]
    peers: usize,
    /// Requests per configuration
    #[arg(long, default_value_t = 1000)]
    requests: u32,
    /// Utilisations to sweep (share of lent memory reserved)
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0.1,0.3,0.5,0.7,0.9,0.95"
    )]
    utilisation: Vec<f64>,
    /// Values of max_tries to sweep
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,5")]
    max_tries: Vec<u32>,
    /// Probes of the request's own tier before going on to larger tiers: numbers, or
    /// `all` (never larger tiers, as before)
    #[arg(long, value_delimiter = ',', default_value = "1,all")]
    own_tier_probes: Vec<OwnProbes>,
    /// Fractions of peers that are schedulers
    #[arg(long, value_delimiter = ',', default_value = "0.01,0.05,0.1")]
    schedulers: Vec<f64>,
    /// Numbers of schedulers whose fallback lists each offerer's report is on at once, to
    /// sweep (default: the node's steady state, a list's TTL over the notify interval: 3)
    #[arg(long, value_delimiter = ',')]
    reports: Vec<usize>,
    /// How volunteers slice their memory into offers: largest or halving
    #[arg(long, default_value = "largest")]
    slicing: Slicing,
    /// Random seed (the same seed gives the same figures)
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Output directory
    #[arg(long, default_value = "sim-out")]
    out: PathBuf,
}

/// A value of `--own-tier-probes`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum OwnProbes {
    Count(u32),
    All,
}

impl std::str::FromStr for OwnProbes {
    type Err = String;

    fn from_str(s: &str) -> Result<OwnProbes, String> {
        match s {
            "all" => Ok(OwnProbes::All),
            n => n
                .parse()
                .map(OwnProbes::Count)
                .map_err(|_| format!("'{n}' is neither a number nor 'all'")),
        }
    }
}

impl std::fmt::Display for OwnProbes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OwnProbes::Count(n) => write!(f, "{n}"),
            OwnProbes::All => f.write_str("all"),
        }
    }
}

impl OwnProbes {
    fn config(self, max_tries: u32) -> DiscoveryConfig {
        let config = DiscoveryConfig {
            max_tries,
            ..DiscoveryConfig::default()
        };
        match self {
            OwnProbes::Count(own_tier_probes) => DiscoveryConfig {
                own_tier_probes,
                ..config
            },
            OwnProbes::All => config.own_tier_only(),
        }
    }
}

struct Row {
    utilisation: f64,
    max_tries: u32,
    own: OwnProbes,
    schedulers: f64,
    /// Lists each offerer's report is on (0 for the baseline, which has none).
    reports: usize,
    mode: &'static str,
    outcome: Outcome,
}

/// Runs the command; an error is one line on stderr and exit status 1, whatever
/// `RUST_BACKTRACE` says.
fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let ran = match cli.command {
        Some(Command::Market(market)) => run_market(&market),
        None => run_sweep(cli.sweep),
    };
    match ran {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The discovery sweep.
fn run_sweep(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.peers >= 2, "--peers must be at least 2");
    anyhow::ensure!(
        args.utilisation.iter().all(|u| (0.0..=1.0).contains(u)),
        "utilisations lie in [0, 1]"
    );
    anyhow::ensure!(
        args.max_tries.iter().all(|&t| t >= 1),
        "max_tries must be at least 1"
    );
    anyhow::ensure!(
        args.schedulers.iter().all(|f| *f > 0.0 && *f <= 1.0),
        "scheduler fractions lie in (0, 1]"
    );
    anyhow::ensure!(
        args.reports.iter().all(|&r| r >= 1),
        "reports must be at least 1"
    );
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let started = Instant::now();
    // One network per utilisation, built and swept on its own thread.
    let mut rows: Vec<Row> = std::thread::scope(|scope| {
        let workers: Vec<_> = args
            .utilisation
            .iter()
            .enumerate()
            .map(|(u, &utilisation)| {
                let args = &args;
                scope.spawn(move || sweep(args, u, utilisation, started))
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("sweeps do not panic"))
            .collect()
    });
    rows.sort_by(|a, b| a.utilisation.total_cmp(&b.utilisation));
    write_csv(&args, &rows)?;
    let fraction = args.schedulers[args.schedulers.len() / 2];
    plot(
        &args.out.join("success.svg"),
        "request success rate",
        &args,
        &rows,
        fraction,
        Outcome::success_rate,
    )?;
    plot(
        &args.out.join("probes.svg"),
        "probes per request",
        &args,
        &rows,
        fraction,
        Outcome::probes_per_request,
    )?;
    plot(
        &args.out.join("fallback.svg"),
        "fallback share",
        &args,
        &rows,
        fraction,
        Outcome::fallback_share,
    )?;
    println!("wrote {} in {:.1?}", args.out.display(), started.elapsed());
    Ok(())
}

/// Builds the network at one utilisation and runs every configuration on it.
fn sweep(args: &Args, u: usize, utilisation: f64, started: Instant) -> Vec<Row> {
    let seed = args.seed.wrapping_mul(1000).wrapping_add(u as u64);
    let reports = if args.reports.is_empty() {
        vec![flotilla_scheduler::sim::steady_state_reports()]
    } else {
        args.reports.clone()
    };
    let network = Network::build(args.peers, utilisation, args.slicing, seed);
    let mut rows = Vec::new();
    for &max_tries in &args.max_tries {
        let outcome = network.run_baseline(args.requests, max_tries, seed + 1);
        rows.push(Row {
            utilisation,
            max_tries,
            own: OwnProbes::All,
            schedulers: 0.0,
            reports: 0,
            mode: "baseline",
            outcome,
        });
        for (&fraction, &reports) in args
            .schedulers
            .iter()
            .flat_map(|f| reports.iter().map(move |r| (f, r)))
        {
            let schedulers = network.schedulers(fraction, reports, seed + 2);
            for &own in &args.own_tier_probes {
                if matches!(own, OwnProbes::Count(n) if n >= max_tries) {
                    continue;
                }
                let config = own.config(max_tries);
                let outcome = network.run_requests(&schedulers, args.requests, config, seed + 3);
                rows.push(Row {
                    utilisation,
                    max_tries,
                    own,
                    schedulers: fraction,
                    reports,
                    mode: "regions",
                    outcome,
                });
            }
        }
    }
    println!(
        "utilisation {utilisation:.2}: {} peers, {} live offers, {:.1}% reserved ({:.1?} so far)",
        network.len(),
        network.live_offers(),
        100.0 * network.reserved_mib as f64 / network.lent_mib as f64,
        started.elapsed()
    );
    rows
}

fn write_csv(args: &Args, rows: &[Row]) -> anyhow::Result<()> {
    let mut csv = String::from(
        "peers,requests,seed,reports,slicing,utilisation,max_tries,own_tier_probes,scheduler_fraction,mode,success_rate,probes_per_request,fallback_share,messages_per_placement\n",
    );
    for r in rows {
        let o = &r.outcome;
        writeln!(
            csv,
            "{},{},{},{},{:?},{},{},{},{},{},{:.4},{:.3},{:.4},{:.1}",
            args.peers,
            args.requests,
            args.seed,
            r.reports,
            args.slicing,
            r.utilisation,
            r.max_tries,
            r.own,
            r.schedulers,
            r.mode,
            o.success_rate(),
            o.probes_per_request(),
            o.fallback_share(),
            o.messages_per_placement()
        )?;
    }
    let path = args.out.join("results.csv");
    std::fs::write(&path, csv).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// One chart against utilisation: a line per max_tries with regions and fallback (at
/// scheduler fraction `fraction`), dashed-colour lines for the baseline.
fn plot(
    path: &Path,
    title: &str,
    args: &Args,
    rows: &[Row],
    fraction: f64,
    metric: fn(&Outcome) -> f64,
) -> anyhow::Result<()> {
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::new(path, (760, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let y_max = rows
            .iter()
            .map(|r| metric(&r.outcome))
            .fold(1.0f64, f64::max)
            * 1.05;
        let caption = format!(
            "{title} — {} peers, {:.0}% schedulers",
            args.peers,
            fraction * 100.0
        );
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(0f64..1f64, 0f64..y_max)?;
        chart
            .configure_mesh()
            .x_desc("utilisation")
            .y_desc(title)
            .draw()?;
        // A line per (max_tries, own-tier probes) with regions (at the first number of
        // reports swept), and the baseline's.
        let reports = rows
            .iter()
            .find(|r| r.mode == "regions")
            .map_or(0, |r| r.reports);
        // A line per (max_tries, own-tier probes) with regions, and the baseline's.
        let mut lines: Vec<(&str, u32, OwnProbes)> = Vec::new();
        for r in rows {
            if !lines.contains(&(r.mode, r.max_tries, r.own)) {
                lines.push((r.mode, r.max_tries, r.own));
            }
        }
        for (i, &(mode, max_tries, own)) in lines.iter().enumerate() {
            let filled = mode == "regions";
            let points: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| {
                    (r.mode, r.max_tries, r.own) == (mode, max_tries, own)
                        && (mode == "baseline"
                            || (r.schedulers == fraction && r.reports == reports))
                })
                .map(|r| (r.utilisation, metric(&r.outcome)))
                .collect();
            let style = ShapeStyle {
                color: Palette99::pick(i).to_rgba(),
                filled,
                stroke_width: if filled { 2 } else { 1 },
            };
            let label = match mode {
                "regions" => format!("regions, max_tries {max_tries}, own tier {own}"),
                _ => format!("{mode}, max_tries {max_tries}"),
            };
            chart
                .draw_series(LineSeries::new(points, style).point_size(3))?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE)
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("cannot draw {}: {e}", path.display()))
}

/// `flotilla-sim market`: each rate, ours and the baseline, on threads of their own.
fn run_market(args: &MarketArgs) -> anyhow::Result<()> {
    use flotilla_scheduler::market_sim::{self, Load};
    anyhow::ensure!(args.peers >= 2, "--peers must be at least 2");
    anyhow::ensure!(
        args.schedulers > 0.0 && args.schedulers <= 1.0,
        "--schedulers lies in (0, 1]"
    );
    anyhow::ensure!(args.rates.iter().all(|r| *r > 0.0), "rates must be above 0");
    anyhow::ensure!((0.0..=1.0).contains(&args.churn), "--churn lies in [0, 1]");
    let [shortest, longest] = args.run_ms[..] else {
        anyhow::bail!("--run-ms takes two numbers: shortest,longest");
    };
    anyhow::ensure!(shortest <= longest, "--run-ms: shortest first");
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let started = Instant::now();
    let loads: Vec<Load> = args
        .rates
        .iter()
        .flat_map(|&rate| {
            [false, true].map(|baseline| Load {
                nodes: args.peers,
                schedulers: args.schedulers,
                rate,
                seconds: args.seconds,
                run_ms: (shortest, longest),
                churn: args.churn,
                seed: args.seed,
                baseline,
            })
        })
        .collect();
    let runs: Vec<(Load, market_sim::Run)> = std::thread::scope(|scope| {
        let workers: Vec<_> = loads
            .iter()
            .map(|&load| scope.spawn(move || (load, market_sim::run(load))))
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("runs do not panic"))
            .collect()
    });
    let mut csv = String::from(
        "mode,peers,schedulers,rate,seconds,churn,offered_load,calls,placed,success,probes_per_call,fallback_share,messages_per_placement,violations,wall_ms\n",
    );
    println!(
        "| mode | calls/s | offered load | calls | success | probes / call | fallback share | messages / placement | invariants broken | wall |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (load, run) in &runs {
        let mode = if load.baseline {
            "baseline"
        } else {
            "regions + fallback"
        };
        println!(
            "| {mode} | {} | {:.0}% | {} | {:.1}% | {:.2} | {:.0}% | {:.1} | {} | {:.1} s |",
            load.rate,
            run.offered_load * 100.0,
            run.stats.calls,
            run.success_rate() * 100.0,
            run.probes_per_call(),
            run.fallback_share() * 100.0,
            run.messages_per_placement(),
            run.violations,
            run.wall_ms as f64 / 1000.0
        );
        let _ = writeln!(
            csv,
            "{mode},{},{},{},{},{},{:.4},{},{},{:.4},{:.4},{:.4},{:.2},{},{}",
            load.nodes,
            load.schedulers,
            load.rate,
            load.seconds,
            load.churn,
            run.offered_load,
            run.stats.calls,
            run.stats.placed,
            run.success_rate(),
            run.probes_per_call(),
            run.fallback_share(),
            run.messages_per_placement(),
            run.violations,
            run.wall_ms
        );
        if let Some(first) = &run.first_violation {
            eprintln!(
                "{mode} at {} calls/s broke an invariant: {first}",
                load.rate
            );
        }
    }
    let path = args.out.join("market.csv");
    std::fs::write(&path, csv).with_context(|| format!("cannot write {}", path.display()))?;
    println!("wrote {} in {:.1?}", path.display(), started.elapsed());
    let broken: usize = runs.iter().map(|(_, run)| run.violations).sum();
    anyhow::ensure!(broken == 0, "{broken} invariant(s) broken");
    Ok(())
}
