//! The partition case: at `split_after_s` into the workload the network splits in two
//! (even instances on one side, odd on the other), at `heal_after_s` it heals. Calls are
//! tagged with the phase they were sent in: `before`, `split` or `healed`.
//!
//! A split or heal that fails, or does not complete within [`LINK_CHANGE_LIMIT`] (under
//! Testground it waits for every instance's sidecar), is recorded as `split-failed` or
//! `heal-failed` and the run goes on; `flotilla-plan check` refuses such a run.

use super::{Announce, Book, Case, Instance};
use crate::coordinator::Coordinator;
use crate::links::{Links, Side};
use crate::params::Params;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How long a split or a heal may take before it counts as failed.
pub const LINK_CHANGE_LIMIT: Duration = Duration::from_secs(60);

/// `change` (a split or a heal), given at most [`LINK_CHANGE_LIMIT`].
async fn within_limit(
    change: impl std::future::Future<Output = Result<(), crate::links::LinkError>>,
) -> Result<(), String> {
    match tokio::time::timeout(LINK_CHANGE_LIMIT, change).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("not done within {LINK_CHANGE_LIMIT:?}")),
    }
}

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
        match within_limit(instance.links.split(side, &others)).await {
            Ok(()) if instance.seq == 0 => {
                book.event("split", format!("{} on the other side", others.len()))
            }
            Ok(()) => {}
            Err(e) => {
                tracing::error!(error = %e, "cannot split the network");
                book.event("split-failed", e);
            }
        }
    }
    tokio::time::sleep_until(heal.min(end)).await;
    match within_limit(instance.links.heal()).await {
        Ok(()) if instance.seq == 0 => book.event("heal", String::new()),
        Ok(()) => {}
        Err(e) => {
            tracing::error!(error = %e, "cannot heal the network");
            book.event("heal-failed", e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::local::LocalCoordinator;
    use crate::links::LinkError;
    use crate::records::{CsvLog, EVENTS_FILE, EventRow, read_rows};
    use std::path::Path;
    use std::sync::Mutex;

    /// Links whose changes never complete (a sidecar that never signals).
    struct Stuck;

    impl Links for Stuck {
        async fn split(&self, _side: Side, _others: &[IpAddr]) -> Result<(), LinkError> {
            std::future::pending().await
        }

        async fn heal(&self) -> Result<(), LinkError> {
            std::future::pending().await
        }
    }

    /// Links whose changes complete at once.
    struct Prompt;

    impl Links for Prompt {
        async fn split(&self, _side: Side, _others: &[IpAddr]) -> Result<(), LinkError> {
            Ok(())
        }

        async fn heal(&self) -> Result<(), LinkError> {
            Ok(())
        }
    }

    fn instance<L: Links>(links: L, dir: &Path) -> Instance<LocalCoordinator, L> {
        Instance {
            seq: 0,
            count: 2,
            case: Case::Partition,
            params: Params {
                split_after_s: 10,
                heal_after_s: 20,
                ..Params::default()
            },
            coordinator: LocalCoordinator::new(),
            links: Arc::new(links),
            node_binary: dir.join("flotilla"),
            ip: IpAddr::from([10, 77, 1, 1]),
            netns: None,
            outputs: dir.to_path_buf(),
            scratch: dir.to_path_buf(),
        }
    }

    /// Drives a partition with `links` over a 30 s workload; returns the events recorded.
    async fn drive_with<L: Links>(links: L) -> Vec<EventRow> {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join(EVENTS_FILE);
        let book = Arc::new(Book {
            events: Mutex::new(CsvLog::create(&path).expect("events")),
            current: tokio::sync::watch::channel(None).0,
            seq: 0,
        });
        let instance = instance(links, dir.path());
        let everyone = [
            Announce {
                seq: 0,
                ip: instance.ip,
                lent_mib: 0,
            },
            Announce {
                seq: 1,
                ip: IpAddr::from([10, 77, 2, 1]),
                lent_mib: 512,
            },
        ];
        let started = Instant::now();
        let phases = Phases::new(Case::Partition, &instance.params, started);
        let end = started + Duration::from_secs(30);
        drive(&instance, &everyone, phases, book, end).await;
        read_rows(&path).expect("events")
    }

    #[tokio::test(start_paused = true)]
    async fn a_split_and_heal_that_complete_are_recorded_once() {
        let events = drive_with(Prompt).await;
        let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
        assert_eq!(names, ["split", "heal"]);
        assert_eq!(events[0].detail, "1 on the other side");
    }

    #[tokio::test(start_paused = true)]
    async fn a_split_or_heal_that_never_completes_fails_within_the_limit() {
        let started = Instant::now();
        let events = drive_with(Stuck).await;
        let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
        assert_eq!(names, ["split-failed", "heal-failed"]);
        assert!(events[0].detail.contains("not done within"), "{events:?}");
        // The split gave up after the limit; the heal, due by then, was tried at once
        // and given the limit too.
        let took = started.elapsed();
        assert_eq!(took, Duration::from_secs(10) + 2 * LINK_CHANGE_LIMIT);
    }

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
