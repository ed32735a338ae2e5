//! The rows each instance writes while a scenario runs, one CSV file per kind, and
//! [`CsvLog`], the writer that appends them.
//!
//! Every row carries `unix_ms` (wall-clock time) and the `instance` that wrote it, so the
//! report can merge the files of all instances — from one local run or collected from a
//! Testground run — onto one time axis.

use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

/// The file an instance writes its invocations to.
pub const INVOCATIONS_FILE: &str = "invocations.csv";
/// The file an instance writes its node's resource samples to.
pub const RESOURCES_FILE: &str = "resources.csv";
/// The file an instance writes membership and network events to.
pub const EVENTS_FILE: &str = "events.csv";

/// The file holding a run's [`RunInfo`]: `flotilla-plan simulate` writes it into its output
/// directory, instance 0 of a Testground run into its outputs (and `flotilla-plan report`
/// copies it into the report).
pub const PARAMS_FILE: &str = "params.json";

/// What a run was: its case, size and parameters, and the command that ran it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    /// The case.
    pub case: crate::scenario::Case,
    /// Instances in the run.
    pub nodes: u32,
    /// Whether its nodes ran in network namespaces.
    pub netns: bool,
    /// When it started, ms since the Unix epoch.
    pub started_unix_ms: u64,
    /// The command line that ran it.
    pub command: Vec<String>,
    /// Its parameters.
    pub params: crate::params::Params,
}

impl RunInfo {
    /// Writes it as pretty JSON to `path`.
    pub fn write(&self, path: &Path) -> Result<(), RecordError> {
        let io = |source| RecordError::Io {
            path: path.display().to_string(),
            source,
        };
        let text = serde_json::to_string_pretty(self).map_err(|e| io(e.into()))?;
        std::fs::write(path, text + "\n").map_err(io)
    }

    /// Reads what [`RunInfo::write`] wrote.
    pub fn read(path: &Path) -> Result<RunInfo, RecordError> {
        let io = |source| RecordError::Io {
            path: path.display().to_string(),
            source,
        };
        let text = std::fs::read_to_string(path).map_err(io)?;
        serde_json::from_str(&text).map_err(|e| io(e.into()))
    }
}

/// One invocation made by a client instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InvocationRow {
    /// When it was sent, ms since the Unix epoch.
    pub unix_ms: u64,
    /// The client instance.
    pub instance: u32,
    /// Whether it ran and gave the expected output.
    pub ok: bool,
    /// Why not, when it did not (empty otherwise).
    pub error: String,
    /// Volunteers tried (1 when the first one ran it; 0 when none was placed).
    pub tries: u32,
    /// Region probes (holders asked) over all tries: the hops until placement.
    pub probes: u32,
    /// Messages the scheduler sent to place it (lookups, holder asks, reservations).
    pub messages: u32,
    /// Discovering and reserving, in ms.
    pub discover_ms: f64,
    /// Running the function on the volunteer, in ms.
    pub execute_ms: f64,
    /// From sending the call to having the answer, in ms.
    pub end_to_end_ms: f64,
    /// The scenario's phase when it was sent (e.g. `steady`, `split`, `healed`).
    pub phase: String,
}

/// One sample of a node's resource use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResourceRow {
    /// When it was taken, ms since the Unix epoch.
    pub unix_ms: u64,
    /// The instance running the node.
    pub instance: u32,
    /// Which of the instance's nodes (0 first; churn starts new ones).
    pub generation: u32,
    /// CPU used since the previous sample, in % of one core.
    pub cpu_percent: f64,
    /// Resident memory, in MiB.
    pub rss_mib: f64,
    /// Bytes received by the node's libp2p transports so far.
    pub bytes_in: u64,
    /// Bytes sent by the node's libp2p transports so far.
    pub bytes_out: u64,
    /// Bytes its blockstore holds, in MiB.
    #[serde(default)]
    pub store_mib: f64,
    /// Its blockstore's capacity, in MiB.
    #[serde(default)]
    pub store_capacity_mib: f64,
}

/// Something that happened to an instance or the network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRow {
    /// When, ms since the Unix epoch.
    pub unix_ms: u64,
    /// The instance it happened to.
    pub instance: u32,
    /// `join`, `leave` (graceful), `crash`, `split` or `heal`.
    pub event: String,
    /// More about it (e.g. the node's peer id or the session length).
    pub detail: String,
}

/// Why a record file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Opening or creating the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A row could not be encoded or decoded.
    #[error("{path}: {source}")]
    Csv {
        /// The file.
        path: String,
        /// Why.
        source: csv::Error,
    },
}

/// Appends rows of one kind to a CSV file, flushing after each so a crash loses nothing.
pub struct CsvLog {
    path: String,
    writer: csv::Writer<BufWriter<File>>,
}

impl CsvLog {
    /// Creates (or truncates) `path` and writes the header on the first row.
    pub fn create(path: &Path) -> Result<CsvLog, RecordError> {
        let shown = path.display().to_string();
        let file = File::create(path).map_err(|source| RecordError::Io {
            path: shown.clone(),
            source,
        })?;
        Ok(CsvLog {
            path: shown,
            writer: csv::Writer::from_writer(BufWriter::new(file)),
        })
    }

    /// Appends one row.
    pub fn append<R: Serialize>(&mut self, row: &R) -> Result<(), RecordError> {
        let csv_error = |source| RecordError::Csv {
            path: self.path.clone(),
            source,
        };
        self.writer.serialize(row).map_err(csv_error)?;
        self.writer.flush().map_err(|source| RecordError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

/// Reads every row of `path`.
pub fn read_rows<R: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<R>, RecordError> {
    let shown = path.display().to_string();
    let mut reader = csv::Reader::from_path(path).map_err(|source| RecordError::Csv {
        path: shown.clone(),
        source,
    })?;
    reader
        .deserialize()
        .collect::<Result<Vec<R>, _>>()
        .map_err(|source| RecordError::Csv {
            path: shown,
            source,
        })
}

/// Milliseconds since the Unix epoch, now.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_info_written_is_read_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join(PARAMS_FILE);
        let info = RunInfo {
            case: crate::scenario::Case::Churn,
            nodes: 6,
            netns: false,
            started_unix_ms: 5,
            command: vec!["flotilla-plan".into(), "simulate".into()],
            params: crate::params::Params::default(),
        };
        info.write(&path).expect("write");
        assert_eq!(RunInfo::read(&path).expect("read"), info);
        std::fs::write(&path, "{}").expect("overwrite");
        let err = RunInfo::read(&path).expect_err("not a run");
        assert!(err.to_string().contains(PARAMS_FILE), "{err}");
    }

    #[test]
    fn rows_written_are_read_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join(INVOCATIONS_FILE);
        let row = InvocationRow {
            unix_ms: 1,
            instance: 2,
            ok: false,
            error: "nothing fits, \"quoted\"".into(),
            tries: 0,
            probes: 3,
            messages: 9,
            discover_ms: 1.5,
            execute_ms: 0.0,
            end_to_end_ms: 2.5,
            phase: "split".into(),
        };
        let mut log = CsvLog::create(&path).expect("create");
        log.append(&row).expect("append");
        log.append(&row).expect("append");
        let back: Vec<InvocationRow> = read_rows(&path).expect("read");
        assert_eq!(back, vec![row.clone(), row]);
    }
}
