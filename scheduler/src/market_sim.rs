//! The market over time, on the [`harness`](crate::harness): thousands of nodes' real
//! machines (offerers and their ledgers, holders, super-trader lists, a placer per
//! call) in virtual time, calls arriving at a steady rate from random schedulers,
//! volunteers crashing at a steady rate, every invariant checked after every event.
//! Where [`sim`](crate::sim) takes a snapshot of discovery at a fixed utilisation, this
//! runs the whole protocol — publishing, reports, probes, reserve-and-run, answers,
//! retries, lapses — so utilisation is what the calls make it. The baseline runs the
//! same machines with offers and probes anywhere in the key space and no fallback list
//! ([`HarnessConfig::baseline`]).

use crate::harness::{Harness, HarnessConfig, Stats};
use crate::sim::{LENT_MEMORY, REQUESTED_MEMORY};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::Instant;

/// A load to run.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Nodes in all.
    pub nodes: usize,
    /// Share of them that are schedulers.
    pub schedulers: f64,
    /// Calls per second of virtual time, over the whole network.
    pub rate: f64,
    /// Virtual seconds of calls (offers are published for 3 s before, and calls under
    /// way are given 30 s after).
    pub seconds: u64,
    /// Shortest and longest run of a call, in ms (drawn uniformly).
    pub run_ms: (u64, u64),
    /// Share of the volunteers that crash per minute.
    pub churn: f64,
    /// The seed: the same seed, the same run.
    pub seed: u64,
    /// Whether to run the baseline instead.
    pub baseline: bool,
}

/// What a run came to.
#[derive(Debug, Clone)]
pub struct Run {
    /// Counts of the harness.
    pub stats: Stats,
    /// Memory asked for over time, as a share of all memory lent: the sum over calls of
    /// memory × run time, over lent memory × the time calls arrived in.
    pub offered_load: f64,
    /// Invariants broken (none, if the machines are right).
    pub violations: usize,
    /// The first one broken, if any.
    pub first_violation: Option<String>,
    /// Wall-clock time the run took, in ms.
    pub wall_ms: u128,
}

impl Run {
    /// Share of calls placed.
    pub fn success_rate(&self) -> f64 {
        f64::from(self.stats.placed) / f64::from(self.stats.calls.max(1))
    }

    /// Messages sent (lookups count one each) per placed call.
    pub fn messages_per_placement(&self) -> f64 {
        self.stats.messages as f64 / f64::from(self.stats.placed.max(1))
    }

    /// Region probes per call.
    pub fn probes_per_call(&self) -> f64 {
        self.stats.probes as f64 / f64::from(self.stats.calls.max(1))
    }

    /// Share of calls whose discovery ended in the fallback list.
    pub fn fallback_share(&self) -> f64 {
        f64::from(self.stats.fallbacks) / f64::from(self.stats.calls.max(1))
    }
}

/// `table`'s values, each repeated as many times as its weight.
fn expanded(table: &[(u64, u32)]) -> Vec<u64> {
    table
        .iter()
        .flat_map(|&(value, weight)| std::iter::repeat_n(value, weight as usize))
        .collect()
}

/// Runs `load` on a fresh harness.
pub fn run(load: Load) -> Run {
    let started = Instant::now();
    let schedulers = ((load.nodes as f64 * load.schedulers).round() as usize).clamp(1, load.nodes);
    let mut config = HarnessConfig::new(load.nodes, schedulers, load.seed);
    config.lent_mib = expanded(&LENT_MEMORY);
    if load.baseline {
        config = config.baseline();
    }
    let mut harness = Harness::new(config);
    let mut rng = StdRng::seed_from_u64(load.seed ^ 0x5eed);
    let requested = expanded(&REQUESTED_MEMORY);
    harness.run_until(harness.now_ms() + 3_000);
    let start = harness.now_ms();
    let end = start + load.seconds * 1000;
    let gap_ms = (1000.0 / load.rate.max(0.001)).max(0.001);
    let mut next_call = start as f64;
    let mut next_crash = start as f64;
    let volunteers = (0..harness.len())
        .filter(|&i| harness.is_volunteer(i))
        .count();
    let crash_gap_ms = 60_000.0 / (load.churn * volunteers as f64).max(1e-9);
    let mut asked_mib_ms: f64 = 0.0;
    while next_call < end as f64 {
        if load.churn > 0.0 && next_crash <= next_call {
            harness.run_until(next_crash as u64);
            let alive: Vec<usize> = (0..harness.len())
                .filter(|&i| harness.is_volunteer(i) && harness.is_alive(i))
                .collect();
            if !alive.is_empty() {
                harness.kill(alive[rng.random_range(0..alive.len())]);
            }
            next_crash += crash_gap_ms;
            continue;
        }
        harness.run_until(next_call as u64);
        let live: Vec<usize> = (0..schedulers).filter(|&i| harness.is_alive(i)).collect();
        let scheduler = live[rng.random_range(0..live.len())];
        let mib = requested[rng.random_range(0..requested.len())];
        let run_ms = rng.random_range(load.run_ms.0..=load.run_ms.1.max(load.run_ms.0));
        asked_mib_ms += (mib * run_ms) as f64;
        harness.call(scheduler, mib as u32, run_ms);
        next_call += gap_ms;
    }
    harness.run_until(end + 30_000);
    let lent_mib_ms = harness.lent_mib() as f64 * (load.seconds * 1000) as f64;
    Run {
        stats: harness.stats(),
        offered_load: asked_mib_ms / lent_mib_ms.max(1.0),
        violations: harness.violations().len(),
        first_violation: harness.violations().first().map(|v| v.what.clone()),
        wall_ms: started.elapsed().as_millis(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(baseline: bool) -> Load {
        Load {
            nodes: 300,
            schedulers: 0.05,
            rate: 20.0,
            seconds: 20,
            run_ms: (100, 2_000),
            churn: 0.05,
            seed: 3,
            baseline,
        }
    }

    #[test]
    fn a_run_keeps_every_invariant_and_beats_the_baseline_on_the_same_machines() {
        let ours = run(load(false));
        let baseline = run(load(true));
        assert_eq!(ours.violations, 0, "{:?}", ours.first_violation);
        assert_eq!(baseline.violations, 0, "{:?}", baseline.first_violation);
        assert_eq!(ours.stats.calls, 400);
        assert_eq!(baseline.stats.calls, 400);
        assert!(ours.offered_load > 0.0 && ours.offered_load < 1.0);
        assert!(ours.stats.fallbacks > 0 && baseline.stats.fallbacks == 0);
        assert!(
            ours.success_rate() > baseline.success_rate(),
            "{} vs {}",
            ours.success_rate(),
            baseline.success_rate()
        );
    }

    #[test]
    fn the_same_seed_gives_the_same_run() {
        let (a, b) = (run(load(false)), run(load(false)));
        assert_eq!(a.stats, b.stats);
    }
}
