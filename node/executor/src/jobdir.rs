//! A job's directory: the named inputs written in before the guest runs (preopened in
//! the guest as `.`), and the files the guest leaves there collected afterwards.

use std::collections::BTreeMap;
use std::path::{Component, Path};

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
