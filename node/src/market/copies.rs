//! What a node agrees to keep of others' job results: a quota of bytes per scheduler and
//! in all. A job record makes its keepers copy the blocks its result names, so without a
//! quota any peer could make any node store whatever it likes, at the cost of signing a
//! record. A copy is charged to the job's scheduler (whose key signs the record) before it
//! starts; a charge the quota has no room for is refused, and that result is not copied.
//!
//! Charges stay: the copied blocks stay in the store, and giving them back is the store's
//! eviction (the issue "Storage that never fills"), which will release them here.

use libp2p::PeerId;
use std::collections::HashMap;

/// Most bytes of job results copied for one scheduler's records: four results of the
/// largest size copied ([`super::jobs::MAX_COPIED_RESULT_BYTES`]).
pub const PER_SCHEDULER_BYTES: u64 = 4 * super::jobs::MAX_COPIED_RESULT_BYTES;
/// Most bytes of job results copied for all schedulers together: 1 GiB, a tenth of the
/// default store.
pub const TOTAL_BYTES: u64 = 1024 * 1024 * 1024;
/// Most schedulers charged at once: so that many tiny charges from ground identities
/// cannot grow the table.
pub const MAX_SCHEDULERS: usize = 1024;

/// Bytes charged per scheduler and in all.
#[derive(Debug)]
pub struct CopyQuota {
    per_scheduler_bytes: u64,
    total_bytes: u64,
    charged: HashMap<PeerId, u64>,
    total: u64,
}

impl Default for CopyQuota {
    fn default() -> Self {
        CopyQuota::new(PER_SCHEDULER_BYTES, TOTAL_BYTES)
    }
}

impl CopyQuota {
    /// A quota of `per_scheduler_bytes` per scheduler and `total_bytes` in all.
    pub fn new(per_scheduler_bytes: u64, total_bytes: u64) -> CopyQuota {
        CopyQuota {
            per_scheduler_bytes,
            total_bytes,
            charged: HashMap::new(),
            total: 0,
        }
    }

    /// Charges `bytes` to `scheduler` if both its quota and the total have room; answers
    /// whether it did.
    pub fn charge(&mut self, scheduler: PeerId, bytes: u64) -> bool {
        let mine = self.charged.get(&scheduler).copied().unwrap_or(0);
        let fits = mine.saturating_add(bytes) <= self.per_scheduler_bytes
            && self.total.saturating_add(bytes) <= self.total_bytes
            && (mine > 0 || self.charged.len() < MAX_SCHEDULERS);
        if fits && bytes > 0 {
            *self.charged.entry(scheduler).or_default() += bytes;
            self.total += bytes;
        }
        fits
    }

    /// Bytes charged to `scheduler`.
    #[cfg(test)]
    pub fn charged(&self, scheduler: &PeerId) -> u64 {
        self.charged.get(scheduler).copied().unwrap_or(0)
    }

    /// Bytes charged in all.
    pub fn total(&self) -> u64 {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_scheduler_and_all_together_are_bounded() {
        let mut quota = CopyQuota::new(100, 250);
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        assert!(quota.charge(a, 60));
        assert!(!quota.charge(a, 41), "over a's own quota");
        assert!(quota.charge(a, 40));
        assert!(quota.charge(b, 100));
        assert!(!quota.charge(c, 51), "over the total");
        assert!(quota.charge(c, 50));
        assert_eq!(
            (quota.charged(&a), quota.charged(&c), quota.total()),
            (100, 50, 250)
        );
    }

    #[test]
    fn ground_identities_cannot_grow_the_table() {
        let mut quota = CopyQuota::new(u64::MAX, u64::MAX);
        for _ in 0..MAX_SCHEDULERS {
            assert!(quota.charge(PeerId::random(), 1));
        }
        assert!(!quota.charge(PeerId::random(), 1));
        assert_eq!(quota.charged.len(), MAX_SCHEDULERS);
    }
}
