//! Finding every instance's record files (and the run's `params.json`) under a run's
//! directory and merging their rows.

use std::path::{Path, PathBuf};

use super::ReportError;
use crate::records::{
    EVENTS_FILE, EventRow, INVOCATIONS_FILE, InvocationRow, PARAMS_FILE, RESOURCES_FILE,
    ResourceRow, read_rows,
};

/// The rows of all instances, each kind sorted by time (then instance).
#[derive(Debug, Default)]
pub(super) struct Records {
    /// Every invocation.
    pub invocations: Vec<InvocationRow>,
    /// Every resource sample.
    pub resources: Vec<ResourceRow>,
    /// Every event.
    pub events: Vec<EventRow>,
    /// The first `params.json` found (in name order), if any.
    pub run_info: Option<PathBuf>,
}

impl Records {
    /// Reads every record file under `dir`, at any depth, except under `skip` (the report's
    /// own output directory, whose `events.csv` is not an instance's).
    pub fn load(dir: &Path, skip: &Path) -> Result<Records, ReportError> {
        let skip = skip.canonicalize().ok();
        let mut files = Vec::new();
        collect_files(dir, skip.as_deref(), &mut files)?;
        let mut records = Records::default();
        for file in &files {
            if file.file_name().is_some_and(|n| n == PARAMS_FILE) {
                records.run_info.get_or_insert_with(|| file.clone());
            } else {
                records.read_file(file)?;
            }
        }
        records.sort_by_time();
        Ok(records)
    }

    /// The earliest time of any row, ms since the Unix epoch (0 when there are none).
    pub fn t0(&self) -> u64 {
        self.times().min().unwrap_or(0)
    }

    /// The latest time of any row, ms since the Unix epoch (0 when there are none).
    pub fn last_ms(&self) -> u64 {
        self.times().max().unwrap_or(0)
    }

    /// The time of every row.
    fn times(&self) -> impl Iterator<Item = u64> + '_ {
        let invocations = self.invocations.iter().map(|r| r.unix_ms);
        let resources = self.resources.iter().map(|r| r.unix_ms);
        let events = self.events.iter().map(|r| r.unix_ms);
        invocations.chain(resources).chain(events)
    }

    /// Appends the rows of `file` to the kind its name says; ignores other files.
    fn read_file(&mut self, file: &Path) -> Result<(), ReportError> {
        let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
        match name {
            INVOCATIONS_FILE => self.invocations.extend(read_rows::<InvocationRow>(file)?),
            RESOURCES_FILE => self.resources.extend(read_rows::<ResourceRow>(file)?),
            EVENTS_FILE => self.events.extend(read_rows::<EventRow>(file)?),
            _ => {}
        }
        Ok(())
    }

    /// Sorts each kind by time, then instance (stable, so one instance's order is kept).
    fn sort_by_time(&mut self) {
        self.invocations.sort_by_key(|r| (r.unix_ms, r.instance));
        self.resources
            .sort_by_key(|r| (r.unix_ms, r.instance, r.generation));
        self.events.sort_by_key(|r| (r.unix_ms, r.instance));
    }
}

/// Whether `name` is one of the record files an instance writes.
fn is_record_file(name: &str) -> bool {
    [INVOCATIONS_FILE, RESOURCES_FILE, EVENTS_FILE, PARAMS_FILE].contains(&name)
}

/// Pushes every record file under `dir` onto `files`, in name order so merges are
/// reproducible; does not follow symbolic links to directories, nor enter `skip`.
fn collect_files(
    dir: &Path,
    skip: Option<&Path>,
    files: &mut Vec<PathBuf>,
) -> Result<(), ReportError> {
    if skip.is_some() && dir.canonicalize().ok().as_deref() == skip {
        return Ok(());
    }
    for entry in sorted_entries(dir)? {
        let path = entry.path();
        let kind = entry.file_type().map_err(ReportError::io(&path))?;
        if kind.is_dir() {
            collect_files(&path, skip, files)?;
        } else if entry.file_name().to_str().is_some_and(is_record_file) {
            files.push(path);
        }
    }
    Ok(())
}

/// The entries of `dir`, sorted by name.
fn sorted_entries(dir: &Path) -> Result<Vec<std::fs::DirEntry>, ReportError> {
    let entries = std::fs::read_dir(dir).map_err(ReportError::io(dir))?;
    let mut entries = entries
        .collect::<Result<Vec<_>, _>>()
        .map_err(ReportError::io(dir))?;
    entries.sort_by_key(|e| e.file_name());
    Ok(entries)
}
