//! The partition case: at `split_after_s` into the workload the network splits in two
//! (even instances on one side, odd on the other), at `heal_after_s` it heals. Calls are
//! tagged with the phase they were sent in: `before`, `split` or `healed`.

use super::{Announce, Book, Case, Instance};
use crate::coordinator::Coordinator;
use crate::links::{Links, Side};
use crate::params::Params;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// When each phase of a run begins.
#[derive(Debug, Clone)]
pub struct Phases {
    split: Option<(Instant, Instant)>,
}

impl Phases {
    /// The phases of `case` for a workload that started at `started`.
    pub fn new(case: Case, params: &Params, started: Instant) -> Phases {
        let split = (case == Case::Partition).then(|| {
            (
                started + Duration::from_secs(params.split_after_s),
                started + Duration::from_secs(params.heal_after_s),
            )
        });
        Phases { split }
    }

    /// The phase at `now`.
    pub fn at(&self, now: Instant) -> &'static str {
        match self.split {
            None => "steady",
            Some((split, _)) if now < split => "before",
            Some((_, heal)) if now < heal => "split",
            Some(_) => "healed",
        }
    }
}

/// Splits and heals on schedule (nothing outside the partition case). Every instance
/// applies the cut for itself (Testground's sidecars are per instance); the first one
/// records the events.
pub(crate) async fn drive<C: Coordinator, L: Links>(
    instance: &Instance<C, L>,
    everyone: &[Announce],
    phases: Phases,
    book: Arc<Book>,
    end: Instant,
) {
    let Some((split, heal)) = phases.split else {
        return;
    };
    let side = Side::of(instance.seq);
    let others: Vec<IpAddr> = everyone
        .iter()
        .filter(|a| Side::of(a.seq) != side)
        .map(|a| a.ip)
        .collect();
    if split < end {
        tokio::time::sleep_until(split).await;
        match instance.links.split(side, &others).await {
            Ok(()) if instance.seq == 0 => {
                book.event("split", format!("{} on the other side", others.len()))
            }
            Ok(()) => {}
            Err(e) => {
                tracing::error!(error = %e, "cannot split the network");
                book.event("split-failed", e.to_string());
            }
        }
    }
    tokio::time::sleep_until(heal.min(end)).await;
    match instance.links.heal().await {
        Ok(()) if instance.seq == 0 => book.event("heal", String::new()),
        Ok(()) => {}
        Err(e) => {
            tracing::error!(error = %e, "cannot heal the network");
            book.event("heal-failed", e.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_follow_the_schedule() {
        let params = Params {
            split_after_s: 10,
            heal_after_s: 20,
            ..Params::default()
        };
        let t0 = Instant::now();
        let p = Phases::new(Case::Partition, &params, t0);
        assert_eq!(p.at(t0), "before");
        assert_eq!(p.at(t0 + Duration::from_secs(10)), "split");
        assert_eq!(p.at(t0 + Duration::from_secs(25)), "healed");
        let steady = Phases::new(Case::Churn, &params, t0);
        assert_eq!(steady.at(t0 + Duration::from_secs(15)), "steady");
    }
}
