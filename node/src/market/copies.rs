//! What a node agrees to keep of others' job results: a quota of bytes per scheduler and
//! in all. A job record makes its keepers copy the blocks its result names, so without a
//! quota any peer could make any node store whatever it likes, at the cost of signing a
//! record. A copy is charged to the job's scheduler (whose key signs the record) before it
//! starts; a charge the quota has no room for is refused, and that result is not copied.
//!
//! Copies are cache in the store (evicted least recently used, like anything fetched), so
//! the quota bounds what one scheduler makes a node fetch and keep at a time, not the
//! disk. A charge lasts as long as the record that caused it may ([`CHARGE_LIFETIME_MS`],
//! a job record's 24 h), then is given back.

use libp2p::PeerId;
use std::collections::{HashMap, VecDeque};

/// Most bytes of job results copied for one scheduler's records: four results of the
/// largest size copied ([`super::jobs::MAX_COPIED_RESULT_BYTES`]).
pub const PER_SCHEDULER_BYTES: u64 = 4 * super::jobs::MAX_COPIED_RESULT_BYTES;
/// Most bytes of job results copied for all schedulers together: 1 GiB, a tenth of the
/// default store.
pub const TOTAL_BYTES: u64 = 1024 * 1024 * 1024;
/// Most schedulers charged at once: so that many tiny charges from ground identities
/// cannot grow the table.
pub const MAX_SCHEDULERS: usize = 1024;
/// How long a charge lasts: a job record's lifetime.
pub const CHARGE_LIFETIME_MS: u64 = 24 * 60 * 60 * 1000;
/// Most charges outstanding at once (tiny charges cannot grow the list either).
pub const MAX_CHARGES: usize = 65_536;

/// Bytes charged per scheduler and in all.
#[derive(Debug)]
pub struct CopyQuota {
    per_scheduler_bytes: u64,
    total_bytes: u64,
    charged: HashMap<PeerId, u64>,
    total: u64,
    /// Each charge, oldest first: when, to whom, how much.
    charges: VecDeque<(u64, PeerId, u64)>,
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
            charges: VecDeque::new(),
        }
    }

    /// Gives back the charges made more than [`CHARGE_LIFETIME_MS`] before `now_ms`.
    fn expire(&mut self, now_ms: u64) {
        while let Some(&(at, scheduler, bytes)) = self.charges.front() {
            if at.saturating_add(CHARGE_LIFETIME_MS) > now_ms {
                break;
            }
            self.charges.pop_front();
            self.total -= bytes;
            if let Some(mine) = self.charged.get_mut(&scheduler) {
                *mine -= bytes;
                if *mine == 0 {
                    self.charged.remove(&scheduler);
                }
            }
        }
    }

    /// Charges `bytes` to `scheduler` at `now_ms` if both its quota and the total have
    /// room; answers whether it did.
    pub fn charge(&mut self, now_ms: u64, scheduler: PeerId, bytes: u64) -> bool {
        self.expire(now_ms);
        if self.charges.len() >= MAX_CHARGES {
            return false;
        }
        let mine = self.charged.get(&scheduler).copied().unwrap_or(0);
        let fits = mine.saturating_add(bytes) <= self.per_scheduler_bytes
            && self.total.saturating_add(bytes) <= self.total_bytes
            && (mine > 0 || self.charged.len() < MAX_SCHEDULERS);
        if fits && bytes > 0 {
            *self.charged.entry(scheduler).or_default() += bytes;
            self.total += bytes;
            self.charges.push_back((now_ms, scheduler, bytes));
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
        assert!(quota.charge(0, a, 60));
        assert!(!quota.charge(0, a, 41), "over a's own quota");
        assert!(quota.charge(1, a, 40));
        assert!(quota.charge(1, b, 100));
        assert!(!quota.charge(1, c, 51), "over the total");
        assert!(quota.charge(1, c, 50));
        assert_eq!(
            (quota.charged(&a), quota.charged(&c), quota.total()),
            (100, 50, 250)
        );
        // A day later the first charge is given back, then the rest.
        assert!(quota.charge(CHARGE_LIFETIME_MS, a, 60));
        assert!(!quota.charge(CHARGE_LIFETIME_MS, a, 1));
        assert!(quota.charge(CHARGE_LIFETIME_MS + 1, a, 40));
        assert_eq!((quota.total(), quota.charged(&a)), (100, 100));
        assert_eq!(quota.charged(&b), 0);
    }

    #[test]
    fn ground_identities_cannot_grow_the_table() {
        let mut quota = CopyQuota::new(u64::MAX, u64::MAX);
        for _ in 0..MAX_SCHEDULERS {
            assert!(quota.charge(0, PeerId::random(), 1));
        }
        assert!(!quota.charge(0, PeerId::random(), 1));
        assert_eq!(quota.charged.len(), MAX_SCHEDULERS);
        let one = PeerId::random();
        let mut quota = CopyQuota::new(u64::MAX, u64::MAX);
        for _ in 0..MAX_CHARGES {
            assert!(quota.charge(0, one, 1));
        }
        assert!(!quota.charge(0, one, 1), "the list of charges is bounded");
    }
}
