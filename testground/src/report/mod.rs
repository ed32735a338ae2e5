//! The report of a run: every instance's records merged onto one time axis, one CSV per
//! metric, a [`Summary`] (JSON and CSV) and an SVG plot per metric.
//!
//! [`write_report`] finds every `invocations.csv`, `resources.csv` and `events.csv` under a
//! run's directory, at any depth (`instances/007/…` from a local run, or
//! `<run>/<group>/<instance>/…` collected from Testground), merges them, and writes the
//! files named in [`METRIC_FILES`]. Times in the outputs are seconds since `t0`, the
//! earliest `unix_ms` of any row.

mod load;
mod plots;
mod summary;
mod tables;
#[cfg(test)]
mod tests;

pub use summary::Summary;

use std::path::{Path, PathBuf};

use crate::records::{PARAMS_FILE, RecordError};

/// Every file [`write_report`] writes into its output directory.
pub const METRIC_FILES: &[&str] = &[
    tables::SUCCESS_RATE_CSV,
    tables::PHASES_CSV,
    tables::PLACEMENT_CSV,
    tables::LATENCY_CSV,
    tables::BANDWIDTH_CSV,
    tables::CPU_CSV,
    tables::MEMORY_CSV,
    tables::EVENTS_CSV,
    summary::SUMMARY_JSON,
    summary::SUMMARY_CSV,
    plots::SUCCESS_RATE_SVG,
    plots::PLACEMENT_SVG,
    plots::LATENCY_SVG,
    plots::BANDWIDTH_SVG,
    plots::CPU_SVG,
    plots::MEMORY_SVG,
];

/// Why a report could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// An instance's record file could not be read or parsed.
    #[error(transparent)]
    Records(#[from] RecordError),
    /// A directory could not be listed or created, or an output file not written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// An output CSV row could not be written.
    #[error("{}: {source}", path.display())]
    Csv {
        /// The output file.
        path: PathBuf,
        /// Why.
        source: csv::Error,
    },
    /// The summary could not be encoded as JSON.
    #[error("{}: {source}", path.display())]
    Json {
        /// The output file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// The report was to go into the records' own directory, where its `events.csv`
    /// would stand for an instance's.
    #[error("{}: a report cannot go into the directory of the records it reads; write it elsewhere (e.g. DIR/report)", .0.display())]
    SameDir(PathBuf),
    /// A plot could not be drawn.
    #[error("{}: cannot draw: {message}", path.display())]
    Plot {
        /// The SVG file.
        path: PathBuf,
        /// The plotting library's error.
        message: String,
    },
}

impl ReportError {
    /// Wraps an I/O error about `path` in a [`ReportError::Io`].
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ReportError + '_ {
        move |source| ReportError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Merges the records of every instance found under `records_dir` (at any depth) and writes
/// the [`METRIC_FILES`] into `out_dir`, creating it if needed; returns the summary. The
/// run's `params.json` (written by instance 0 of a Testground run), if one is found among
/// the records, is copied beside them.
///
/// Kinds of record missing altogether are fine (no invocations: zero requests). When
/// `out_dir` is inside `records_dir` it is skipped, so a report can be written again;
/// `out_dir` being `records_dir` itself is refused ([`ReportError::SameDir`]).
pub fn write_report(records_dir: &Path, out_dir: &Path) -> Result<Summary, ReportError> {
    let records_at = records_dir
        .canonicalize()
        .map_err(ReportError::io(records_dir))?;
    if out_dir.canonicalize().is_ok_and(|out| out == records_at) {
        return Err(ReportError::SameDir(out_dir.to_path_buf()));
    }
    std::fs::create_dir_all(out_dir).map_err(ReportError::io(out_dir))?;
    let records = load::Records::load(records_dir, out_dir)?;
    if let Some(info) = &records.run_info {
        let to = out_dir.join(PARAMS_FILE);
        std::fs::copy(info, &to).map_err(ReportError::io(&to))?;
    }
    let tables = tables::Tables::from_records(&records);
    tables.write(out_dir)?;
    let summary = Summary::from_records(&records, &tables.bandwidth);
    summary.write(out_dir)?;
    plots::draw_all(&tables, out_dir)?;
    Ok(summary)
}
