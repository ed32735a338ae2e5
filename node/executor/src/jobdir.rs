//! A job's directory: the named inputs written in before the guest runs (preopened in
//! the guest as `.`), and the files the guest leaves there collected afterwards. A
//! directory a job leaves empty serves the next one ([`SpareDirs`]): most calls write no
//! file, and making and removing a directory per call cost more than the call itself.

use std::collections::BTreeMap;
use std::path::{Component, Path};
use std::sync::Mutex;
use tempfile::TempDir;

/// Most empty job directories kept for reuse.
pub const MAX_SPARE_DIRS: usize = 32;

/// Empty job directories kept for the next jobs (at most [`MAX_SPARE_DIRS`]); each is
/// removed when dropped.
#[derive(Debug, Default)]
pub struct SpareDirs {
    spare: Mutex<Vec<TempDir>>,
}

impl SpareDirs {
    /// An empty directory for a job: a spare one, or a new one made in `work_dir`.
    pub fn take(&self, work_dir: &Path) -> std::io::Result<TempDir> {
        let spare = self.spare.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match spare {
            Some(dir) => Ok(dir),
            None => tempfile::tempdir_in(work_dir),
        }
    }

    /// Takes `dir` back once its job is over (the guest's store dropped, so nothing
    /// writes to it any more): kept if it is empty and there is room, removed otherwise.
    pub fn give_back(&self, dir: TempDir) {
        let empty = std::fs::read_dir(dir.path()).is_ok_and(|mut entries| entries.next().is_none());
        if !empty {
            return;
        }
        let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
        if spare.len() < MAX_SPARE_DIRS {
            spare.push(dir);
        }
    }

    /// How many are kept.
    pub fn len(&self) -> usize {
        self.spare.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a job directory could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum JobDirError {
    /// An input name that is not a plain relative file name.
    #[error("input name '{0}' must be a plain file name (no '/', '..' or leading '.')")]
    BadName(String),
    /// The guest left more output than allowed.
    #[error("the function wrote more than {0} bytes of output files")]
    TooMuchOutput(u64),
    /// The guest left more files than allowed.
    #[error("the function left more than {0} files and directories")]
    TooManyFiles(usize),
    /// The disk failed.
    #[error("job directory: {0}")]
    Io(#[from] std::io::Error),
}

/// Checks that `name` can name a file in the job directory.
pub fn check_name(name: &str) -> Result<(), JobDirError> {
    let path = Path::new(name);
    let plain = !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && path.components().count() == 1
        && matches!(path.components().next(), Some(Component::Normal(_)));
    if plain {
        Ok(())
    } else {
        Err(JobDirError::BadName(name.to_string()))
    }
}

/// Writes the inputs into `dir`.
pub fn write_inputs(dir: &Path, inputs: &[(String, Vec<u8>)]) -> Result<(), JobDirError> {
    for (name, bytes) in inputs {
        check_name(name)?;
        std::fs::write(dir.join(name), bytes)?;
    }
    Ok(())
}

/// What a job directory holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes of its regular files.
    pub bytes: u64,
    /// Files, directories and other entries.
    pub entries: usize,
}

/// Measures `dir` (recursively, not following links), stopping once more than
/// `max_entries` entries have been seen.
pub fn usage(dir: &Path, max_entries: usize) -> std::io::Result<Usage> {
    let mut usage = Usage::default();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        for entry in std::fs::read_dir(&current)? {
            let entry = entry?;
            usage.entries += 1;
            if usage.entries > max_entries {
                return Ok(usage);
            }
            let kind = entry.file_type()?;
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() {
                usage.bytes += entry.metadata()?.len();
            }
        }
    }
    Ok(usage)
}

/// The regular files in `dir` (recursively, by relative path) that are not the inputs as
/// written, when the directory holds at most `max_bytes` in all and at most
/// `max_entries` entries. Symbolic links are not followed.
pub fn collect_outputs(
    dir: &Path,
    inputs: &[(String, Vec<u8>)],
    max_bytes: u64,
    max_entries: usize,
) -> Result<BTreeMap<String, Vec<u8>>, JobDirError> {
    let mut outputs = BTreeMap::new();
    let mut total = 0u64;
    let mut entries = 0usize;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        for entry in std::fs::read_dir(&current)? {
            let entry = entry?;
            entries += 1;
            if entries > max_entries {
                return Err(JobDirError::TooManyFiles(max_entries));
            }
            let kind = entry.file_type()?;
            if kind.is_dir() {
                pending.push(entry.path());
                continue;
            }
            if !kind.is_file() {
                continue;
            }
            let path = entry.path();
            let name = path
                .strip_prefix(dir)
                .map_err(std::io::Error::other)?
                .to_string_lossy()
                .into_owned();
            total += entry.metadata()?.len();
            if total > max_bytes {
                return Err(JobDirError::TooMuchOutput(max_bytes));
            }
            let bytes = std::fs::read(&path)?;
            let unchanged_input = inputs.iter().any(|(n, b)| *n == name && *b == bytes);
            if !unchanged_input {
                outputs.insert(name, bytes);
            }
        }
    }
    Ok(outputs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_directory_left_empty_serves_the_next_job() {
        let work = tempfile::tempdir().unwrap();
        let spare = SpareDirs::default();
        let first = spare.take(work.path()).unwrap();
        let path = first.path().to_path_buf();
        spare.give_back(first);
        assert_eq!(spare.len(), 1);
        // The next job gets the same, empty, directory.
        let again = spare.take(work.path()).unwrap();
        assert_eq!(again.path(), path);
        assert!(spare.is_empty());
        // A job that leaves anything behind (a file, a directory) does not pass it on:
        // its directory is removed, and the next job gets a new one.
        std::fs::create_dir(again.path().join("left")).unwrap();
        spare.give_back(again);
        assert!(spare.is_empty());
        assert!(!path.exists(), "a used directory is removed");
        let fresh = spare.take(work.path()).unwrap();
        assert_ne!(fresh.path(), path);
        assert_eq!(std::fs::read_dir(fresh.path()).unwrap().count(), 0);
        // At most MAX_SPARE_DIRS are kept; the rest are removed.
        let many: Vec<TempDir> = (0..MAX_SPARE_DIRS + 2)
            .map(|_| spare.take(work.path()).unwrap())
            .collect();
        for dir in many {
            spare.give_back(dir);
        }
        assert_eq!(spare.len(), MAX_SPARE_DIRS);
        assert_eq!(
            std::fs::read_dir(work.path()).unwrap().count(),
            MAX_SPARE_DIRS + 1,
            "the spares and the one still taken"
        );
        drop(fresh);
    }

    #[test]
    fn names_must_be_plain_and_outputs_exclude_unchanged_inputs() {
        for bad in ["", "../x", "a/b", ".hidden", "/etc/passwd", ".."] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        check_name("input.txt").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let inputs = vec![
            ("a.txt".to_string(), b"same".to_vec()),
            ("b.txt".to_string(), b"old".to_vec()),
        ];
        write_inputs(dir.path(), &inputs).unwrap();
        std::fs::write(dir.path().join("b.txt"), b"new").unwrap();
        std::fs::create_dir(dir.path().join("out")).unwrap();
        std::fs::write(dir.path().join("out/c.txt"), b"made").unwrap();
        let outputs = collect_outputs(dir.path(), &inputs, 1024, 100).unwrap();
        let names: Vec<&str> = outputs.keys().map(String::as_str).collect();
        assert_eq!(names, ["b.txt", "out/c.txt"]);
        assert!(matches!(
            collect_outputs(dir.path(), &inputs, 5, 100),
            Err(JobDirError::TooMuchOutput(5))
        ));
        assert!(matches!(
            collect_outputs(dir.path(), &inputs, 1024, 3),
            Err(JobDirError::TooManyFiles(3))
        ));
        let measured = usage(dir.path(), 100).unwrap();
        assert_eq!(
            measured,
            Usage {
                bytes: 4 + 3 + 4,
                entries: 4
            }
        );
        assert_eq!(
            usage(dir.path(), 2).unwrap().entries,
            3,
            "stops past the bound"
        );
    }
}
