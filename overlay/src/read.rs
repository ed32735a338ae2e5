//! Bounds on reading a file DAG back: nodes visited, bytes yielded, depth and time.
//!
//! A DAG is content-addressed, so one block can be linked many times: three blocks
//! (3.6 MB) can name 10^10 empty leaves. [`ReadBudget`] is handed each visit and each
//! chunk yielded, with the time, and refuses the read once
//! * a visit is not paid for: visits may not exceed [`ReadLimits::free_visits`] + 2 ×
//!   the distinct blocks seen + the bytes yielded / [`ReadLimits::bytes_per_visit`] (an
//!   honest tree visits each block once; a file of repeated chunks, all zeros say, pays
//!   for each repeat with the chunk's bytes; a bomb of empty leaves pays nothing);
//! * more bytes come out than the root declares, or than [`ReadLimits::max_bytes`];
//! * a link is deeper than [`ReadLimits::max_depth`];
//! * the deadline has passed.
//!
//! It is a plain state machine: the caller does the I/O and hands it the time.

use cid::Cid;
use std::collections::HashSet;
use std::hash::{BuildHasher, RandomState};
use std::time::Instant;

/// Visits any read may make before it must pay for them.
pub const FREE_VISITS: u64 = 1024;
/// Bytes yielded that pay for one repeated visit.
pub const BYTES_PER_VISIT: u64 = 64;
/// The deepest a link may be below the root (a 256 GB file of ours is 4 deep).
pub const MAX_DEPTH: u32 = 64;
/// Distinct blocks remembered (as 8-byte fingerprints: about 1 MiB per read at most);
/// past this, a block not seen before counts as a repeat, so a read of more distinct
/// blocks pays for its further visits with the bytes it yields (an honest file's leaves
/// do: a 256 KiB chunk pays for 4096 visits).
const MAX_REMEMBERED: usize = 1 << 16;

/// The limits of one read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLimits {
    /// Most bytes the read may yield.
    pub max_bytes: u64,
    /// Visits allowed before any is paid for.
    pub free_visits: u64,
    /// Bytes yielded that pay for one more visit.
    pub bytes_per_visit: u64,
    /// The deepest a block may be below the root.
    pub max_depth: u32,
    /// When the read must have ended, if ever.
    pub deadline: Option<Instant>,
}

impl Default for ReadLimits {
    fn default() -> Self {
        ReadLimits {
            max_bytes: u64::MAX,
            free_visits: FREE_VISITS,
            bytes_per_visit: BYTES_PER_VISIT,
            max_depth: MAX_DEPTH,
            deadline: None,
        }
    }
}

impl ReadLimits {
    /// These limits, yielding at most `max_bytes`.
    pub fn at_most(self, max_bytes: u64) -> Self {
        ReadLimits { max_bytes, ..self }
    }

    /// These limits, ending by `deadline`.
    pub fn until(self, deadline: Instant) -> Self {
        ReadLimits {
            deadline: Some(deadline),
            ..self
        }
    }
}

/// Why a read was stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// Visits outran the blocks and bytes that pay for them.
    #[error(
        "refused a DAG bomb: {visits} nodes visited for {distinct} distinct blocks and {yielded} bytes"
    )]
    TooManyVisits {
        /// Visits made.
        visits: u64,
        /// Distinct blocks seen.
        distinct: u64,
        /// Bytes yielded.
        yielded: u64,
    },
    /// More bytes than the root declares.
    #[error("the file yields more than the {declared} bytes its root declares")]
    MoreThanDeclared {
        /// The size the root declares.
        declared: u64,
    },
    /// More bytes than the reader takes.
    #[error("the file is larger than {max} bytes")]
    TooLarge {
        /// The limit.
        max: u64,
    },
    /// A link deeper than allowed.
    #[error("the DAG is deeper than {max} levels")]
    TooDeep {
        /// The limit.
        max: u64,
    },
    /// The deadline passed.
    #[error("reading did not end before its deadline")]
    DeadlinePassed,
}

/// What one read has spent, and the check of each step against its limits.
#[derive(Debug)]
pub struct ReadBudget {
    limits: ReadLimits,
    visits: u64,
    yielded: u64,
    declared: Option<u64>,
    seen: HashSet<u64>,
    hasher: RandomState,
}

impl ReadBudget {
    /// A budget for one read under `limits`.
    pub fn new(limits: ReadLimits) -> Self {
        ReadBudget {
            limits,
            visits: 0,
            yielded: 0,
            declared: None,
            seen: HashSet::new(),
            hasher: RandomState::new(),
        }
    }

    /// Accounts a visit of `cid`, `depth` links below the root, at `now`.
    pub fn visit(&mut self, cid: &Cid, depth: u32, now: Instant) -> Result<(), ReadError> {
        if self.limits.deadline.is_some_and(|d| now >= d) {
            return Err(ReadError::DeadlinePassed);
        }
        if depth > self.limits.max_depth {
            return Err(ReadError::TooDeep {
                max: u64::from(self.limits.max_depth),
            });
        }
        if self.seen.len() < MAX_REMEMBERED {
            self.seen.insert(self.hasher.hash_one(cid));
        }
        self.visits += 1;
        let distinct = self.seen.len() as u64;
        let paid = self
            .limits
            .free_visits
            .saturating_add(distinct.saturating_mul(2))
            .saturating_add(self.yielded / self.limits.bytes_per_visit.max(1));
        if self.visits > paid {
            return Err(ReadError::TooManyVisits {
                visits: self.visits,
                distinct,
                yielded: self.yielded,
            });
        }
        Ok(())
    }

    /// Takes the size the root declares: no more may come out.
    pub fn declare(&mut self, filesize: u64) {
        self.declared = Some(filesize);
    }

    /// Accounts `n` bytes about to be yielded.
    pub fn yielding(&mut self, n: u64) -> Result<(), ReadError> {
        let total = self.yielded.saturating_add(n);
        if total > self.limits.max_bytes {
            return Err(ReadError::TooLarge {
                max: self.limits.max_bytes,
            });
        }
        if let Some(declared) = self.declared.filter(|&d| total > d) {
            return Err(ReadError::MoreThanDeclared { declared });
        }
        self.yielded = total;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{Block, RAW};
    use bytes::Bytes;
    use std::time::Duration;

    fn cid(n: u32) -> Cid {
        *Block::encode(RAW, Bytes::from(n.to_le_bytes().to_vec()))
            .unwrap()
            .cid()
    }

    #[test]
    fn the_blocks_remembered_are_bounded_and_a_large_honest_read_still_passes() {
        let mut budget = ReadBudget::new(ReadLimits::default());
        let now = Instant::now();
        let leaves = MAX_REMEMBERED as u32 * 2;
        for n in 0..leaves {
            budget.visit(&cid(n), 1, now).unwrap();
            budget.yielding(BYTES_PER_VISIT).unwrap();
        }
        assert_eq!(budget.seen.len(), MAX_REMEMBERED);
        // Past the bound, leaves that yield nothing are repeats to pay for.
        let mut unpaid = 0u32;
        while budget.visit(&cid(leaves + unpaid), 1, now).is_ok() {
            unpaid += 1;
            assert!(unpaid < 1 << 20, "never refused");
        }
        assert!(unpaid > 0);
    }

    #[test]
    fn repeated_empty_leaves_are_refused_after_the_free_visits() {
        let mut budget = ReadBudget::new(ReadLimits::default());
        let now = Instant::now();
        let (root, middle, leaf) = (cid(0), cid(1), cid(2));
        budget.visit(&root, 0, now).unwrap();
        budget.visit(&middle, 1, now).unwrap();
        let mut visits = 2;
        let err = loop {
            visits += 1;
            if let Err(e) = budget.visit(&leaf, 2, now) {
                break e;
            }
            assert!(visits < 10_000, "never refused");
        };
        assert_eq!(visits, FREE_VISITS + 2 * 3 + 1);
        assert!(matches!(err, ReadError::TooManyVisits { distinct: 3, .. }));
    }

    #[test]
    fn an_honest_tree_and_a_file_of_repeated_chunks_read_in_full() {
        let now = Instant::now();
        // 100 000 distinct blocks, each visited once.
        let mut tree = ReadBudget::new(ReadLimits::default());
        for n in 0..100_000 {
            tree.visit(&cid(n), 2, now).unwrap();
        }
        // 100 000 visits of one 256 KiB chunk (a file of zeros).
        let mut zeros = ReadBudget::new(ReadLimits::default());
        let chunk = cid(7);
        for _ in 0..100_000 {
            zeros.visit(&chunk, 2, now).unwrap();
            zeros.yielding(256 * 1024).unwrap();
        }
    }

    #[test]
    fn bytes_past_the_declared_size_or_the_cap_are_refused() {
        let mut budget = ReadBudget::new(ReadLimits::default().at_most(100));
        budget.declare(10);
        budget.yielding(10).unwrap();
        assert_eq!(
            budget.yielding(1),
            Err(ReadError::MoreThanDeclared { declared: 10 })
        );
        let mut budget = ReadBudget::new(ReadLimits::default().at_most(100));
        budget.yielding(100).unwrap();
        assert_eq!(budget.yielding(1), Err(ReadError::TooLarge { max: 100 }));
    }

    #[test]
    fn depth_and_deadline_are_enforced() {
        let now = Instant::now();
        let mut budget = ReadBudget::new(ReadLimits::default().until(now + Duration::from_secs(1)));
        budget.visit(&cid(0), MAX_DEPTH, now).unwrap();
        assert_eq!(
            budget.visit(&cid(1), MAX_DEPTH + 1, now),
            Err(ReadError::TooDeep {
                max: u64::from(MAX_DEPTH)
            })
        );
        assert_eq!(
            budget.visit(&cid(2), 0, now + Duration::from_secs(1)),
            Err(ReadError::DeadlinePassed)
        );
    }
}
