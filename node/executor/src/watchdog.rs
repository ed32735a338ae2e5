//! The guest's watchdog in wasm code: what stops a run at its deadline, and what stops
//! it from filling the host's disk.
//!
//! Every [`CHECK_EVERY`] epoch ticks the store's epoch callback compares the clock with
//! the run's deadline and interrupts the guest once it has passed; the same callback
//! measures the job directory and stops a guest that has written more than its quota
//! (bytes or entries) there, and one that is using more of the host's disk while less
//! than [`DISK_FLOOR`] of it is free — which also catches bytes the directory does not
//! show (a file the guest unlinked but keeps writing through its open descriptor).
//! Epochs are only checked in wasm code: a guest blocked in a host call (`poll_oneoff`
//! sleeping) is stopped by the executor's timeout around the whole asynchronous run.

use super::jobdir;
use std::path::PathBuf;
use std::time::Instant;
use wasmtime::UpdateDeadline;

/// Epoch ticks between two checks of the deadline and of the job directory.
pub const CHECK_EVERY: u64 = 10;
/// Free space below which a guest may not use more of the disk its directory is on.
pub const DISK_FLOOR: u64 = 256 * 1024 * 1024;

/// A guest wrote more than it may.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct QuotaExceeded(pub String);

/// What the watchdog knows of one run.
pub struct Watch {
    /// When the run must stop.
    pub deadline: Instant,
    /// The job directory.
    pub dir: PathBuf,
    /// Most bytes the directory may hold (inputs included).
    pub max_bytes: u64,
    /// Most files and directories it may hold.
    pub max_entries: usize,
    /// Free bytes on the directory's disk when the run started.
    pub free_at_start: Option<u64>,
}

impl Watch {
    /// The epoch callback's decision: interrupt at the deadline, fail over quota, or
    /// check again in [`CHECK_EVERY`] ticks.
    pub fn on_epoch(&self) -> wasmtime::Result<UpdateDeadline> {
        if Instant::now() >= self.deadline {
            return Ok(UpdateDeadline::Interrupt);
        }
        self.check_quota()?;
        Ok(UpdateDeadline::Continue(CHECK_EVERY))
    }

    /// Fails when the job directory holds more than allowed, or the guest is using more
    /// of a nearly full disk.
    pub fn check_quota(&self) -> Result<(), QuotaExceeded> {
        match jobdir::usage(&self.dir, self.max_entries) {
            Ok(usage) if usage.entries > self.max_entries => {
                return Err(QuotaExceeded(format!(
                    "the function wrote more than {} files and directories into its directory",
                    self.max_entries
                )));
            }
            Ok(usage) if usage.bytes > self.max_bytes => {
                return Err(QuotaExceeded(format!(
                    "the function wrote more than {} bytes into its directory",
                    self.max_bytes
                )));
            }
            // A directory the guest is changing as it is read: measured next time.
            Ok(_) | Err(_) => {}
        }
        if let (Some(start), Some(now)) = (self.free_at_start, free_disk(&self.dir))
            && disk_too_full(start, now)
        {
            return Err(QuotaExceeded(format!(
                "the host's disk is nearly full ({} MiB free) and the function was using more of it",
                now >> 20
            )));
        }
        Ok(())
    }
}

/// The bytes free for unprivileged use on the disk `path` is on.
pub fn free_disk(path: &std::path::Path) -> Option<u64> {
    let stat = rustix::fs::statvfs(path).ok()?;
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Whether a guest must stop: less than [`DISK_FLOOR`] is free and less than when it
/// started (a disk that was nearly full already does not stop a guest that adds nothing).
fn disk_too_full(free_at_start: u64, free_now: u64) -> bool {
    free_now < DISK_FLOOR && free_now < free_at_start
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_stops_only_when_the_disk_is_nearly_full_and_filling() {
        let gib = 1 << 30;
        assert!(!disk_too_full(10 * gib, 9 * gib), "plenty left");
        assert!(disk_too_full(10 * gib, DISK_FLOOR - 1), "below the floor");
        assert!(
            !disk_too_full(DISK_FLOOR / 2, DISK_FLOOR / 2),
            "full before, nothing added"
        );
        assert!(disk_too_full(DISK_FLOOR / 2, DISK_FLOOR / 2 - 4096));
        assert!(free_disk(std::path::Path::new(".")).is_some());
    }
}
