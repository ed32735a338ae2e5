//! `flotilla-plan simulate`: a whole run on this machine. N instances of a case run as
//! tasks of this process, sharing a [`LocalCoordinator`], each driving its own real
//! `flotilla node` process — on loopback, or each in its own network namespace when the
//! case needs a partition or shaped links ([`Topology`]).
//!
//! With namespaces, this process builds them, runs itself again inside the control
//! namespace (so it reaches every node's API on both sides of a split), and removes them
//! when that run ends, fails or is interrupted. Records go to `OUT/instances/NNN/`, the
//! report (one CSV per metric, SVG plots, summary) and `params.json` to `OUT/`. The report
//! is written however the run ends; [`COMPLETE_FILE`] only when every instance finished.

use crate::coordinator::local::LocalCoordinator;
use crate::links::netns::{self, NetnsLinks, Topology};
use crate::links::{Links, Loopback};
use crate::params::Params;
use crate::records::{PARAMS_FILE, RunInfo};
use crate::report::{self, Summary};
use crate::scenario::{Case, Instance};
use anyhow::{Context, bail};
use serde::Serialize;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::signal::unix::{Signal, SignalKind, signal};

/// The file a run writes into its output directory once every instance has finished (not
/// when one failed or the run was interrupted): `{"complete": true, "finished_unix_ms": …}`.
pub const COMPLETE_FILE: &str = "complete.json";

/// Whether the run in `out` finished ([`COMPLETE_FILE`] is there and says so).
pub fn is_complete(out: &Path) -> bool {
    std::fs::read_to_string(out.join(COMPLETE_FILE))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v["complete"] == true)
}

/// The environment variable that tells the re-run inside the namespaces which topology
/// it is in.
pub const TOPOLOGY_ENV: &str = "FLOTILLA_SIM_TOPOLOGY";
pub use crate::links::netns::NAMESPACE_PREFIX;
/// The environment variable naming the process that owns a simulation (scripts/simulate
/// sets it to its own pid), so `flotilla-plan cleanup --owner` finds what it left.
pub const OWNER_ENV: &str = "FLOTILLA_SIM_OWNER";

/// Who owns this run: [`OWNER_ENV`], or this process.
pub fn owner() -> String {
    std::env::var(OWNER_ENV).unwrap_or_else(|_| std::process::id().to_string())
}

/// The prefix of the namespaces of runs owned by `owner`.
pub fn namespace_prefix(owner: &str) -> String {
    format!("{NAMESPACE_PREFIX}{owner}x")
}

/// The prefix of every simulation's scratch directory (node data), in the temporary
/// directory.
pub const SCRATCH_PREFIX: &str = "flotilla-sim-";

/// The prefix of the scratch directories (node data) of runs owned by `owner`.
pub fn scratch_prefix(owner: &str) -> String {
    format!("{SCRATCH_PREFIX}{owner}-")
}

/// Removes the directories in `parent` whose names start with `prefix` (the scratch
/// directories of killed runs, see [`scratch_prefix`]); returns how many went.
pub fn remove_dirs_starting_with(parent: &Path, prefix: &str) -> usize {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let named = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(prefix));
        // Not following links: only real directories go.
        if !named || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        match std::fs::remove_dir_all(entry.path()) {
            Ok(()) => removed += 1,
            Err(e) => {
                tracing::warn!(dir = %entry.path().display(), error = %e, "cannot remove a scratch directory");
            }
        }
    }
    removed
}

/// Kills every process whose command line mentions `marker` (nodes of a killed run).
pub fn kill_processes_mentioning(marker: &str) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut killed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(marker) {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            killed += 1;
        }
    }
    killed
}

/// When to use network namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NetnsMode {
    /// When the case needs them (a partition, latency or loss).
    Auto,
    /// Always.
    Always,
    /// Never (a case that needs them is refused).
    Never,
}

/// One local run.
#[derive(Debug, Clone)]
pub struct Simulation {
    /// The case.
    pub case: Case,
    /// Instances.
    pub nodes: u32,
    /// Its parameters.
    pub params: Params,
    /// Where records and the report go.
    pub out: PathBuf,
    /// When to use network namespaces.
    pub netns: NetnsMode,
    /// The `flotilla` binary.
    pub node_binary: PathBuf,
}

impl Simulation {
    /// Whether this run needs network namespaces.
    pub fn wants_namespaces(&self) -> anyhow::Result<bool> {
        let needed = self.case == Case::Partition || self.params.shapes_links();
        match (self.netns, needed) {
            (NetnsMode::Never, true) => bail!(
                "the {} case{} needs network namespaces (drop --netns never)",
                self.case.name(),
                if self.params.shapes_links() {
                    " with latency or loss"
                } else {
                    ""
                }
            ),
            (NetnsMode::Never, false) => Ok(false),
            (NetnsMode::Always, _) | (NetnsMode::Auto, true) => {
                if !netns::available() {
                    bail!(
                        "the {} case needs network namespaces: run as root on Linux with `ip` (iproute2) and `tc`",
                        self.case.name()
                    );
                }
                Ok(true)
            }
            (NetnsMode::Auto, false) => Ok(false),
        }
    }

    fn check(&self) -> anyhow::Result<()> {
        let fixed = self.params.fixed_instances();
        if self.nodes <= fixed {
            bail!(
                "--nodes {} leaves no volunteer: {} schedulers and {} clients come first",
                self.nodes,
                self.params.schedulers,
                self.params.clients
            );
        }
        if self.case == Case::Partition && self.params.schedulers < 2 {
            bail!("the partition case needs a scheduler on each side: schedulers ≥ 2");
        }
        if !self.node_binary.exists() {
            bail!(
                "no flotilla binary at {} (build it with `cargo build --release -p flotilla-node`, or pass --flotilla)",
                self.node_binary.display()
            );
        }
        Ok(())
    }

    /// Runs it to the end and writes the report; returns the summary. SIGINT and SIGTERM
    /// are caught from the start, so an interrupted run stops its nodes and removes its
    /// namespaces.
    pub async fn run(self) -> anyhow::Result<Summary> {
        let mut interrupts = Interrupts::new().context("listening for SIGINT and SIGTERM")?;
        self.check()?;
        let marker = self.out.join(COMPLETE_FILE);
        match std::fs::remove_file(&marker) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", marker.display())),
        }
        if let Ok(tag) = std::env::var(TOPOLOGY_ENV) {
            let links = NetnsLinks::new(format!("{tag}-ctl"));
            let namespace = move |seq: u32| Some(format!("{tag}-n{seq}"));
            return self
                .run_instances(
                    Arc::new(links),
                    |seq| IpAddr::V4(netns::node_ip(seq)),
                    namespace,
                    &mut interrupts,
                )
                .await;
        }
        if self.wants_namespaces()? {
            return self.run_in_namespaces(&mut interrupts).await;
        }
        let loopback = |_| IpAddr::V4(Ipv4Addr::LOCALHOST);
        self.run_instances(Arc::new(Loopback), loopback, |_| None, &mut interrupts)
            .await
    }

    /// Builds the namespaces, runs this command again inside the control one, removes
    /// them whatever happens.
    async fn run_in_namespaces(self, interrupts: &mut Interrupts) -> anyhow::Result<Summary> {
        let tag = format!("{}{}", namespace_prefix(&owner()), std::process::id());
        let p = &self.params;
        // Building takes a while at 50 nodes; a signal meanwhile waits in `interrupts`
        // and ends the run here, or at the latest once the run inside has started.
        let mut topology = Topology::create(&tag, self.nodes, p.latency_ms, p.loss_percent)
            .context("building the network namespaces")?;
        if interrupts.take() {
            topology.remove();
            bail!("interrupted; namespaces removed");
        }
        let exe = std::env::current_exe().context("finding this program")?;
        let mut child = tokio::process::Command::new("ip")
            .args(["netns", "exec", &topology.control()])
            .arg(exe)
            .args(std::env::args_os().skip(1))
            .env(TOPOLOGY_ENV, &tag)
            .kill_on_drop(true)
            .spawn()
            .context("running the simulation inside the namespaces")?;
        let status = tokio::select! {
            status = child.wait() => Some(status?),
            () = interrupts.recv() => {
                // Let the inner run stop its nodes; the namespaces go either way.
                if let Some(pid) = child.id() {
                    let _ = std::process::Command::new("kill").args(["-INT", &pid.to_string()]).status();
                }
                let _ = tokio::time::timeout(std::time::Duration::from_secs(20), child.wait()).await;
                None
            }
        };
        topology.remove();
        match status {
            Some(s) if s.success() => read_summary(&self.out),
            Some(s) => bail!("the simulation inside the namespaces failed ({s})"),
            None => bail!("interrupted; namespaces removed"),
        }
    }

    async fn run_instances<L: Links>(
        &self,
        links: Arc<L>,
        ip_of: impl Fn(u32) -> IpAddr,
        namespace_of: impl Fn(u32) -> Option<String>,
        interrupts: &mut Interrupts,
    ) -> anyhow::Result<Summary> {
        let records = self.out.join("instances");
        std::fs::create_dir_all(&records)
            .with_context(|| format!("creating {}", records.display()))?;
        let info = RunInfo {
            case: self.case,
            nodes: self.nodes,
            netns: namespace_of(0).is_some(),
            started_unix_ms: crate::records::unix_ms(),
            command: std::env::args().collect(),
            params: self.params.clone(),
        };
        info.write(&self.out.join(PARAMS_FILE))?;
        let scratch = tempfile::Builder::new()
            .prefix(&scratch_prefix(&owner()))
            .tempdir()
            .context("making a scratch directory")?;
        let coordinator = LocalCoordinator::new();
        let mut instances = tokio::task::JoinSet::new();
        for seq in 0..self.nodes {
            let instance = Instance {
                seq,
                count: self.nodes,
                case: self.case,
                params: self.params.clone(),
                coordinator: coordinator.clone(),
                links: links.clone(),
                node_binary: self.node_binary.clone(),
                ip: ip_of(seq),
                netns: namespace_of(seq),
                outputs: records.join(format!("{seq:03}")),
                scratch: scratch.path().to_path_buf(),
            };
            instances.spawn(async move { (seq, instance.run().await) });
        }
        let outcome = tokio::select! {
            outcome = wait_all(&mut instances) => outcome,
            () = interrupts.recv() => Err(anyhow::anyhow!("interrupted")),
        };
        // Dropping the instances kills any node still running.
        instances.shutdown().await;
        let summary = report::write_report(&records, &self.out).context("writing the report")?;
        outcome?;
        write_json(
            &self.out.join(COMPLETE_FILE),
            &serde_json::json!({ "complete": true, "finished_unix_ms": crate::records::unix_ms() }),
        )?;
        Ok(summary)
    }
}

/// Waits for every instance; the first failure stops the run.
async fn wait_all(
    instances: &mut tokio::task::JoinSet<(u32, anyhow::Result<()>)>,
) -> anyhow::Result<()> {
    while let Some(joined) = instances.join_next().await {
        let (seq, result) = joined.context("an instance panicked")?;
        result.with_context(|| format!("instance {seq}"))?;
    }
    Ok(())
}

/// SIGINT and SIGTERM, caught from when it is made: one that comes before anyone waits
/// is kept until [`Interrupts::recv`] or [`Interrupts::take`].
pub struct Interrupts {
    int: Signal,
    term: Signal,
}

impl Interrupts {
    /// Starts catching both signals (they no longer end the process).
    pub fn new() -> std::io::Result<Interrupts> {
        Ok(Interrupts {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }

    /// Resolves on the next SIGINT or SIGTERM (at once for one already caught).
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }

    /// Whether a signal caught so far has been noticed and not yet waited for; takes it.
    /// Best effort: one that came a moment ago may only be seen by the next `recv`.
    pub fn take(&mut self) -> bool {
        use futures::FutureExt;
        self.recv().now_or_never().is_some()
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The summary a finished run wrote.
pub fn read_summary(out: &Path) -> anyhow::Result<Summary> {
    let path = out.join("summary.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))
}
