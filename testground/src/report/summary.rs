//! The run in one [`Summary`]: totals, means and percentiles, written as `summary.json` and
//! as `summary.csv` (`metric,value` rows, in field order).

use std::collections::BTreeSet;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::ReportError;
use super::load::Records;
use super::tables::{NodeBandwidth, ratio};
use crate::records::{InvocationRow, ResourceRow};

/// The summary as JSON.
pub(super) const SUMMARY_JSON: &str = "summary.json";
/// The summary as `metric,value` rows.
pub(super) const SUMMARY_CSV: &str = "summary.csv";

/// The run in numbers. Means and percentiles are 0 when there is nothing to take them over;
/// percentiles are nearest-rank.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Invocations sent.
    pub requests: u64,
    /// Of those, the ones that succeeded.
    pub succeeded: u64,
    /// `succeeded / requests`, from 0 to 1 (0 without requests).
    pub success_rate: f64,
    /// Invocations placed on a volunteer (`tries > 0`).
    pub placements: u64,
    /// Volunteers tried per placed invocation.
    pub mean_tries_per_placement: f64,
    /// Messages sent per placed invocation.
    pub mean_messages_per_placement: f64,
    /// Region probes per placed invocation.
    pub mean_probes_per_placement: f64,
    /// Median discovery time of the successful invocations, ms.
    pub p50_discover_ms: f64,
    /// 99th percentile discovery time of the successful invocations, ms.
    pub p99_discover_ms: f64,
    /// Median execution time of the successful invocations, ms.
    pub p50_execute_ms: f64,
    /// 99th percentile execution time of the successful invocations, ms.
    pub p99_execute_ms: f64,
    /// Median end-to-end time of the successful invocations, ms.
    pub p50_end_to_end_ms: f64,
    /// 99th percentile end-to-end time of the successful invocations, ms.
    pub p99_end_to_end_ms: f64,
    /// Distinct nodes sampled (instance and generation).
    pub nodes: u64,
    /// Mean over nodes of KiB/s received plus sent, over the nodes sampled over a time span
    /// (more than one sample time).
    pub mean_kib_per_s_per_node: f64,
    /// Mean CPU over all samples, % of one core.
    pub mean_cpu_percent: f64,
    /// Highest resident memory of any sample, MiB.
    pub peak_rss_mib: f64,
    /// Mean resident memory over all samples, MiB.
    pub mean_rss_mib: f64,
    /// Most bytes any node's blockstore held in any sample, MiB.
    #[serde(default)]
    pub peak_store_mib: f64,
    /// The largest store capacity of any node sampled, MiB.
    #[serde(default)]
    pub store_capacity_mib: f64,
    /// `join` events.
    pub joins: u64,
    /// `leave` (graceful) events.
    pub leaves: u64,
    /// `crash` events.
    pub crashes: u64,
    /// `split` events.
    pub splits: u64,
    /// `heal` events.
    pub heals: u64,
    /// `split-failed` and `heal-failed` events: a change of the network that did not
    /// happen (or not in time) on some instance.
    #[serde(default)]
    pub link_failures: u64,
    /// From the first row to the last of any kind, seconds.
    pub duration_s: f64,
}

impl Summary {
    /// Summarises the merged records and the per-node bandwidth table.
    pub(super) fn from_records(records: &Records, bandwidth: &[NodeBandwidth]) -> Summary {
        let invocations = &records.invocations;
        let succeeded: Vec<&InvocationRow> = invocations.iter().filter(|r| r.ok).collect();
        let placed: Vec<&InvocationRow> = invocations.iter().filter(|r| r.tries > 0).collect();
        let success_ms =
            |field: fn(&InvocationRow) -> f64| sorted(succeeded.iter().map(|r| field(r)));
        let discover = success_ms(|r| r.discover_ms);
        let execute = success_ms(|r| r.execute_ms);
        let end_to_end = success_ms(|r| r.end_to_end_ms);
        let placed_mean =
            |field: fn(&InvocationRow) -> u32| mean(placed.iter().map(|r| f64::from(field(r))));
        let resources = &records.resources;
        let event_count = |name: &str| records.events.iter().filter(|e| e.event == name).count();
        Summary {
            requests: invocations.len() as u64,
            succeeded: succeeded.len() as u64,
            success_rate: ratio(succeeded.len() as f64, invocations.len() as f64),
            placements: placed.len() as u64,
            mean_tries_per_placement: placed_mean(|r| r.tries),
            mean_messages_per_placement: placed_mean(|r| r.messages),
            mean_probes_per_placement: placed_mean(|r| r.probes),
            p50_discover_ms: percentile(&discover, 50),
            p99_discover_ms: percentile(&discover, 99),
            p50_execute_ms: percentile(&execute, 50),
            p99_execute_ms: percentile(&execute, 99),
            p50_end_to_end_ms: percentile(&end_to_end, 50),
            p99_end_to_end_ms: percentile(&end_to_end, 99),
            nodes: distinct_nodes(resources),
            mean_kib_per_s_per_node: mean_node_rate(bandwidth),
            mean_cpu_percent: mean(resources.iter().map(|r| r.cpu_percent)),
            peak_rss_mib: resources.iter().map(|r| r.rss_mib).fold(0.0, f64::max),
            mean_rss_mib: mean(resources.iter().map(|r| r.rss_mib)),
            peak_store_mib: resources.iter().map(|r| r.store_mib).fold(0.0, f64::max),
            store_capacity_mib: resources
                .iter()
                .map(|r| r.store_capacity_mib)
                .fold(0.0, f64::max),
            joins: event_count("join") as u64,
            leaves: event_count("leave") as u64,
            crashes: event_count("crash") as u64,
            splits: event_count("split") as u64,
            heals: event_count("heal") as u64,
            link_failures: (event_count("split-failed") + event_count("heal-failed")) as u64,
            duration_s: records.last_ms().saturating_sub(records.t0()) as f64 / 1000.0,
        }
    }

    /// Writes `summary.json` and `summary.csv` into `out_dir`.
    pub(super) fn write(&self, out_dir: &Path) -> Result<(), ReportError> {
        let json_path = out_dir.join(SUMMARY_JSON);
        let json = serde_json::to_string_pretty(self).map_err(|source| ReportError::Json {
            path: json_path.clone(),
            source,
        })?;
        std::fs::write(&json_path, json + "\n").map_err(ReportError::io(&json_path))?;
        let csv_path = out_dir.join(SUMMARY_CSV);
        let rows = self.metric_rows().map_err(|source| ReportError::Csv {
            path: csv_path.clone(),
            source,
        })?;
        std::fs::write(&csv_path, rows).map_err(ReportError::io(&csv_path))
    }

    /// The summary as a `metric,value` CSV, one row per field in declaration order: it is
    /// serialized as one CSV record with a header, and the header zipped with the record.
    fn metric_rows(&self) -> Result<Vec<u8>, csv::Error> {
        let mut wide = csv::Writer::from_writer(Vec::new());
        wide.serialize(self)?;
        let wide = wide
            .into_inner()
            .map_err(|e| csv::Error::from(e.into_error()))?;
        let mut reader = csv::Reader::from_reader(wide.as_slice());
        let names = reader.headers()?.clone();
        let values = reader.records().next().transpose()?.unwrap_or_default();
        let mut tall = csv::Writer::from_writer(Vec::new());
        tall.write_record(["metric", "value"])?;
        for (name, value) in names.iter().zip(values.iter()) {
            tall.write_record([name, value])?;
        }
        tall.into_inner()
            .map_err(|e| csv::Error::from(e.into_error()))
    }
}

/// The values, sorted ascending.
fn sorted(values: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    values
}

/// The nearest-rank `percent`th percentile of ascending `sorted` values (0 when empty): the
/// smallest value with at least `percent`% of the values at or below it.
pub(super) fn percentile(sorted: &[f64], percent: usize) -> f64 {
    let rank = (percent * sorted.len()).div_ceil(100).max(1);
    sorted.get(rank - 1).copied().unwrap_or(0.0)
}

/// The mean of the values, 0 when there are none.
fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, count) = values.fold((0.0, 0usize), |(sum, count), v| (sum + v, count + 1));
    ratio(sum, count as f64)
}

/// How many distinct nodes (instance, generation) were sampled.
fn distinct_nodes(resources: &[ResourceRow]) -> u64 {
    let nodes: BTreeSet<(u32, u32)> = resources
        .iter()
        .map(|r| (r.instance, r.generation))
        .collect();
    nodes.len() as u64
}

/// The mean KiB/s in plus out over the nodes sampled over a time span.
fn mean_node_rate(bandwidth: &[NodeBandwidth]) -> f64 {
    let rates = bandwidth
        .iter()
        .filter(|n| n.seconds > 0.0)
        .map(|n| n.kib_per_s_in + n.kib_per_s_out);
    mean(rates)
}
