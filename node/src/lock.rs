//! One daemon per data dir: an exclusive advisory lock (`flock`) on `<data dir>/lock`,
//! held for as long as the node runs, with the holder's PID written in the file so a
//! second daemon can say who holds it. The kernel releases the lock when the holder
//! exits, however it exits (a `kill -9` included), so a stale file never blocks a
//! restart.

use rustix::fs::{FlockOperation, flock};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The lock file's name in the data dir.
pub const LOCK_FILE: &str = "lock";

/// Most bytes read from a lock file for the holder's PID.
const MAX_PID_TEXT: u64 = 32;

/// Why the data dir could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error("data dir {} is in use by another flotilla node ({})", dir.display(), holder_text(*pid))]
    InUse {
        /// The data dir.
        dir: PathBuf,
        /// The holder's PID, if its lock file names one.
        pid: Option<u32>,
    },
    /// The lock file could not be opened, locked or written.
    #[error("cannot lock {}: {source}", path.display())]
    Io {
        /// The lock file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

fn holder_text(pid: Option<u32>) -> String {
    pid.map_or_else(|| "PID unknown".to_string(), |pid| format!("PID {pid}"))
}

/// The data dir's lock, held until dropped.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

/// Takes `dir`'s lock (creating `dir` if need be), or says which process holds it.
pub fn acquire(dir: &Path) -> Result<DataDirLock, LockError> {
    let path = dir.join(LOCK_FILE);
    let io = |source| LockError::Io {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    match flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => {
            return Err(LockError::InUse {
                dir: dir.to_path_buf(),
                pid: holder_pid(&mut file),
            });
        }
        Err(errno) => return Err(io(errno.into())),
    }
    file.set_len(0).map_err(io)?;
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    writeln!(file, "{}", std::process::id()).map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(DataDirLock { _file: file })
}

/// The PID a lock file names, if it names one.
fn holder_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.take(MAX_PID_TEXT).read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid_until_it_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let first = acquire(&data).unwrap();
        let refused = acquire(&data).unwrap_err();
        assert!(
            matches!(refused, LockError::InUse { pid: Some(pid), .. } if pid == std::process::id()),
            "{refused:?}"
        );
        let message = refused.to_string();
        assert!(
            message.contains(&format!("PID {}", std::process::id())),
            "{message}"
        );
        assert!(!message.contains('\n'));
        drop(first);
        let _again = acquire(&data).unwrap();
    }

    #[test]
    fn a_lock_file_left_by_a_dead_holder_does_not_block() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(LOCK_FILE), "999999999\n").unwrap();
        let _lock = acquire(dir.path()).unwrap();
        let written = std::fs::read_to_string(dir.path().join(LOCK_FILE)).unwrap();
        assert_eq!(written.trim(), std::process::id().to_string());
    }
}
