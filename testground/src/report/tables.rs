//! The report's CSV tables: one row type per metric file, computed from the merged
//! records, and the writer that puts each in its file (header included, even when empty).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use super::ReportError;
use super::load::Records;
use crate::records::{EventRow, InvocationRow, ResourceRow};

/// Success rate over time, per window of send time.
pub(super) const SUCCESS_RATE_CSV: &str = "success_rate.csv";
/// Success rate per scenario phase.
pub(super) const PHASES_CSV: &str = "phases.csv";
/// Deployment efficiency: what placing each invocation cost.
pub(super) const PLACEMENT_CSV: &str = "placement.csv";
/// Latencies of the successful invocations.
pub(super) const LATENCY_CSV: &str = "latency.csv";
/// Bandwidth per node.
pub(super) const BANDWIDTH_CSV: &str = "bandwidth.csv";
/// CPU samples of every node.
pub(super) const CPU_CSV: &str = "cpu.csv";
/// Memory samples of every node.
pub(super) const MEMORY_CSV: &str = "memory.csv";
/// The events of all instances, merged.
pub(super) const EVENTS_CSV: &str = "events.csv";

/// The width of a success-rate window, in seconds.
pub(super) const WINDOW_S: u64 = 10;

/// A row type of one of the report's CSV files.
pub(super) trait Table: Serialize {
    /// The header: the row's field names, in order.
    const COLUMNS: &'static [&'static str];
}

/// Seconds from `t0` to `unix_ms`.
fn seconds_since(t0: u64, unix_ms: u64) -> f64 {
    unix_ms.saturating_sub(t0) as f64 / 1000.0
}

/// `part / whole`, or 0 when `whole` is 0.
pub(super) fn ratio(part: f64, whole: f64) -> f64 {
    if whole == 0.0 { 0.0 } else { part / whole }
}

/// Requests and successes in one window of send time (only windows with requests appear).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(super) struct SuccessWindow {
    /// Where the window starts, seconds since t0.
    pub window_start_s: f64,
    /// Invocations sent in it.
    pub requests: u64,
    /// Of those, the ones that succeeded.
    pub succeeded: u64,
    /// `succeeded / requests`.
    pub success_rate: f64,
}

impl Table for SuccessWindow {
    const COLUMNS: &'static [&'static str] =
        &["window_start_s", "requests", "succeeded", "success_rate"];
}

/// Requests and successes in one phase of the scenario.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(super) struct PhaseRow {
    /// The phase (`steady`, `split`, …).
    pub phase: String,
    /// Invocations sent in it.
    pub requests: u64,
    /// Of those, the ones that succeeded.
    pub succeeded: u64,
    /// `succeeded / requests`.
    pub success_rate: f64,
}

impl Table for PhaseRow {
    const COLUMNS: &'static [&'static str] = &["phase", "requests", "succeeded", "success_rate"];
}

/// What placing one invocation cost (invocations that succeeded or were placed).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(super) struct Placement {
    /// When it was sent, seconds since t0.
    pub t_s: f64,
    /// The client instance.
    pub instance: u32,
    /// Volunteers tried.
    pub tries: u32,
    /// Region probes over all tries.
    pub probes: u32,
    /// Messages sent to place it.
    pub messages: u32,
    /// Discovering and reserving, in ms.
    pub discover_ms: f64,
}

impl Table for Placement {
    const COLUMNS: &'static [&'static str] = &[
        "t_s",
        "instance",
        "tries",
        "probes",
        "messages",
        "discover_ms",
    ];
}

/// The latencies of one successful invocation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(super) struct Latency {
    /// When it was sent, seconds since t0.
    pub t_s: f64,
    /// Running the function, in ms.
    pub execute_ms: f64,
    /// From sending to having the answer, in ms.
    pub end_to_end_ms: f64,
}

impl Table for Latency {
    const COLUMNS: &'static [&'static str] = &["t_s", "execute_ms", "end_to_end_ms"];
}

/// The traffic of one node (an instance's generation) between its first and last sample.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(super) struct NodeBandwidth {
    /// The instance running the node.
    pub instance: u32,
    /// Which of the instance's nodes.
    pub generation: u32,
    /// From its first to its last sample.
    pub seconds: f64,
    /// Bytes received in that time.
    pub bytes_in: u64,
    /// Bytes sent in that time.
    pub bytes_out: u64,
    /// `bytes_in` in KiB per second (0 when `seconds` is 0).
    pub kib_per_s_in: f64,
    /// `bytes_out` in KiB per second (0 when `seconds` is 0).
    pub kib_per_s_out: f64,
}

impl Table for NodeBandwidth {
    const COLUMNS: &'static [&'static str] = &[
        "instance",
        "generation",
        "seconds",
        "bytes_in",
        "bytes_out",
        "kib_per_s_in",
        "kib_per_s_out",
    ];
}

/// One CPU sample of a node.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(super) struct CpuSample {
    /// When, seconds since t0.
    pub t_s: f64,
    /// The instance running the node.
    pub instance: u32,
    /// Which of the instance's nodes.
    pub generation: u32,
    /// CPU since the previous sample, % of one core.
    pub cpu_percent: f64,
}

impl Table for CpuSample {
    const COLUMNS: &'static [&'static str] = &["t_s", "instance", "generation", "cpu_percent"];
}

/// One memory sample of a node.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(super) struct MemorySample {
    /// When, seconds since t0.
    pub t_s: f64,
    /// The instance running the node.
    pub instance: u32,
    /// Which of the instance's nodes.
    pub generation: u32,
    /// Resident memory, MiB.
    pub rss_mib: f64,
}

impl Table for MemorySample {
    const COLUMNS: &'static [&'static str] = &["t_s", "instance", "generation", "rss_mib"];
}

/// One event, on the report's time axis.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(super) struct Event {
    /// When, seconds since t0.
    pub t_s: f64,
    /// The instance it happened to.
    pub instance: u32,
    /// `join`, `leave`, `crash`, `split` or `heal`.
    pub event: String,
    /// More about it.
    pub detail: String,
}

impl Table for Event {
    const COLUMNS: &'static [&'static str] = &["t_s", "instance", "event", "detail"];
}

/// Every table of the report.
#[derive(Debug, Default)]
pub(super) struct Tables {
    /// Success rate per window.
    pub windows: Vec<SuccessWindow>,
    /// Success rate per phase.
    pub phases: Vec<PhaseRow>,
    /// Placement cost per invocation.
    pub placements: Vec<Placement>,
    /// Latencies per successful invocation.
    pub latencies: Vec<Latency>,
    /// Bandwidth per node, by instance then generation.
    pub bandwidth: Vec<NodeBandwidth>,
    /// CPU samples, by time.
    pub cpu: Vec<CpuSample>,
    /// Memory samples, by time.
    pub memory: Vec<MemorySample>,
    /// Events, by time.
    pub events: Vec<Event>,
}

impl Tables {
    /// Computes every table from the merged (time-sorted) records.
    pub fn from_records(records: &Records) -> Tables {
        let t0 = records.t0();
        Tables {
            windows: success_windows(t0, &records.invocations),
            phases: phases(&records.invocations),
            placements: placements(t0, &records.invocations),
            latencies: latencies(t0, &records.invocations),
            bandwidth: bandwidth(&records.resources),
            cpu: cpu_samples(t0, &records.resources),
            memory: memory_samples(t0, &records.resources),
            events: events(t0, &records.events),
        }
    }

    /// Writes each table to its file in `out_dir`.
    pub fn write(&self, out_dir: &Path) -> Result<(), ReportError> {
        write_table(&out_dir.join(SUCCESS_RATE_CSV), &self.windows)?;
        write_table(&out_dir.join(PHASES_CSV), &self.phases)?;
        write_table(&out_dir.join(PLACEMENT_CSV), &self.placements)?;
        write_table(&out_dir.join(LATENCY_CSV), &self.latencies)?;
        write_table(&out_dir.join(BANDWIDTH_CSV), &self.bandwidth)?;
        write_table(&out_dir.join(CPU_CSV), &self.cpu)?;
        write_table(&out_dir.join(MEMORY_CSV), &self.memory)?;
        write_table(&out_dir.join(EVENTS_CSV), &self.events)
    }
}

/// Writes the header of `R` and then `rows` to `path`.
pub(super) fn write_table<R: Table>(path: &Path, rows: &[R]) -> Result<(), ReportError> {
    let csv_error = |source| ReportError::Csv {
        path: path.to_path_buf(),
        source,
    };
    let mut writer = csv::WriterBuilder::new()
        .has_headers(false)
        .from_path(path)
        .map_err(csv_error)?;
    writer.write_record(R::COLUMNS).map_err(csv_error)?;
    for row in rows {
        writer.serialize(row).map_err(csv_error)?;
    }
    writer.flush().map_err(ReportError::io(path))
}

/// Requests and successes counted together.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    requests: u64,
    succeeded: u64,
}

impl Tally {
    /// Counts one invocation.
    fn add(&mut self, row: &InvocationRow) {
        self.requests += 1;
        self.succeeded += u64::from(row.ok);
    }

    /// `succeeded / requests`, 0 without requests.
    fn rate(self) -> f64 {
        ratio(self.succeeded as f64, self.requests as f64)
    }
}

/// Success rate per [`WINDOW_S`] window of send time, for the windows with requests.
fn success_windows(t0: u64, invocations: &[InvocationRow]) -> Vec<SuccessWindow> {
    let mut windows: BTreeMap<u64, Tally> = BTreeMap::new();
    for row in invocations {
        let window = row.unix_ms.saturating_sub(t0) / (WINDOW_S * 1000);
        windows.entry(window).or_default().add(row);
    }
    windows
        .into_iter()
        .map(|(window, tally)| SuccessWindow {
            window_start_s: (window * WINDOW_S) as f64,
            requests: tally.requests,
            succeeded: tally.succeeded,
            success_rate: tally.rate(),
        })
        .collect()
}

/// Success rate per phase, phases in order of first appearance.
fn phases(invocations: &[InvocationRow]) -> Vec<PhaseRow> {
    let mut order: Vec<&str> = Vec::new();
    let mut tallies: BTreeMap<&str, Tally> = BTreeMap::new();
    for row in invocations {
        let phase = row.phase.as_str();
        if !tallies.contains_key(phase) {
            order.push(phase);
        }
        tallies.entry(phase).or_default().add(row);
    }
    order
        .into_iter()
        .map(|phase| {
            let tally = tallies.get(phase).copied().unwrap_or_default();
            PhaseRow {
                phase: phase.to_string(),
                requests: tally.requests,
                succeeded: tally.succeeded,
                success_rate: tally.rate(),
            }
        })
        .collect()
}

/// The placement cost of each invocation that succeeded or was placed.
fn placements(t0: u64, invocations: &[InvocationRow]) -> Vec<Placement> {
    invocations
        .iter()
        .filter(|r| r.ok || r.tries > 0)
        .map(|r| Placement {
            t_s: seconds_since(t0, r.unix_ms),
            instance: r.instance,
            tries: r.tries,
            probes: r.probes,
            messages: r.messages,
            discover_ms: r.discover_ms,
        })
        .collect()
}

/// The latencies of each successful invocation.
fn latencies(t0: u64, invocations: &[InvocationRow]) -> Vec<Latency> {
    invocations
        .iter()
        .filter(|r| r.ok)
        .map(|r| Latency {
            t_s: seconds_since(t0, r.unix_ms),
            execute_ms: r.execute_ms,
            end_to_end_ms: r.end_to_end_ms,
        })
        .collect()
}

/// Bandwidth per node from its first and last (time-sorted) samples.
fn bandwidth(resources: &[ResourceRow]) -> Vec<NodeBandwidth> {
    let mut nodes: BTreeMap<(u32, u32), (&ResourceRow, &ResourceRow)> = BTreeMap::new();
    for row in resources {
        nodes
            .entry((row.instance, row.generation))
            .and_modify(|(_, last)| *last = row)
            .or_insert((row, row));
    }
    nodes
        .into_values()
        .map(|(first, last)| node_bandwidth(first, last))
        .collect()
}

/// The traffic of a node between two of its samples.
fn node_bandwidth(first: &ResourceRow, last: &ResourceRow) -> NodeBandwidth {
    let seconds = last.unix_ms.saturating_sub(first.unix_ms) as f64 / 1000.0;
    let bytes_in = last.bytes_in.saturating_sub(first.bytes_in);
    let bytes_out = last.bytes_out.saturating_sub(first.bytes_out);
    let kib_per_s = |bytes: u64| ratio(bytes as f64 / 1024.0, seconds);
    NodeBandwidth {
        instance: first.instance,
        generation: first.generation,
        seconds,
        bytes_in,
        bytes_out,
        kib_per_s_in: kib_per_s(bytes_in),
        kib_per_s_out: kib_per_s(bytes_out),
    }
}

/// Every CPU sample, in time order.
fn cpu_samples(t0: u64, resources: &[ResourceRow]) -> Vec<CpuSample> {
    resources
        .iter()
        .map(|r| CpuSample {
            t_s: seconds_since(t0, r.unix_ms),
            instance: r.instance,
            generation: r.generation,
            cpu_percent: r.cpu_percent,
        })
        .collect()
}

/// Every memory sample, in time order.
fn memory_samples(t0: u64, resources: &[ResourceRow]) -> Vec<MemorySample> {
    resources
        .iter()
        .map(|r| MemorySample {
            t_s: seconds_since(t0, r.unix_ms),
            instance: r.instance,
            generation: r.generation,
            rss_mib: r.rss_mib,
        })
        .collect()
}

/// Every event, in time order.
fn events(t0: u64, events: &[EventRow]) -> Vec<Event> {
    events
        .iter()
        .map(|r| Event {
            t_s: seconds_since(t0, r.unix_ms),
            instance: r.instance,
            event: r.event.clone(),
            detail: r.detail.clone(),
        })
        .collect()
}
