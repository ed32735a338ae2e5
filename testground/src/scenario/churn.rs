//! Churn: a volunteer's node lives for a heavy-tailed session, then leaves — gracefully
//! (SIGTERM: its offers are withdrawn) or by crashing (SIGKILL: they linger until they
//! expire) — and a fresh peer (new identity, empty store, same lent memory) takes its place.
//!
//! Session lengths are Pareto-distributed with shape α (most sessions short, a few very
//! long) and mean 1 ÷ `churn_per_min` minutes, so that share of the volunteers is replaced
//! each minute. The first session of each volunteer is drawn from the *residual* life of
//! that distribution, so the replacement rate holds from the first minute instead of
//! nobody leaving before the shortest possible session has passed.

use super::{Book, Instance};
use crate::coordinator::Coordinator;
use crate::links::Links;
use crate::node_process::NodeProcess;
use rand::Rng;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Session lengths of a churn rate.
#[derive(Debug, Clone, Copy)]
pub struct Sessions {
    /// Pareto scale (the shortest session), in seconds.
    scale_s: f64,
    /// Pareto shape α (> 1).
    shape: f64,
}

impl Sessions {
    /// Sessions whose mean makes `per_min` of the peers leave each minute.
    pub fn new(per_min: f64, shape: f64) -> Sessions {
        let mean_s = 60.0 / per_min.max(1e-9);
        Sessions {
            scale_s: mean_s * (shape - 1.0) / shape,
            shape,
        }
    }

    /// The mean session, in seconds.
    pub fn mean_s(&self) -> f64 {
        self.scale_s * self.shape / (self.shape - 1.0)
    }

    /// A full session: Pareto(scale, shape) by inversion.
    pub fn draw<R: Rng>(&self, rng: &mut R) -> Duration {
        let u: f64 = rng.random_range(f64::EPSILON..1.0);
        Duration::from_secs_f64(self.scale_s / u.powf(1.0 / self.shape))
    }

    /// What is left of a session in progress at a random moment (the equilibrium residual
    /// life, with density S(x) ÷ mean), by inversion.
    pub fn draw_residual<R: Rng>(&self, rng: &mut R) -> Duration {
        let (xm, a, mean) = (self.scale_s, self.shape, self.mean_s());
        let u: f64 = rng.random_range(0.0..1.0 - f64::EPSILON);
        let x = if u * mean <= xm {
            u * mean
        } else {
            xm / (1.0 - (u * mean - xm) * (a - 1.0) / xm).powf(1.0 / (a - 1.0))
        };
        Duration::from_secs_f64(x)
    }
}

/// The random numbers of volunteer `seq`'s sessions.
fn session_rng(params: &crate::params::Params, seq: u32) -> rand::rngs::StdRng {
    super::rng_for(params.seed, seq, 3)
}

/// How long volunteer `seq`'s first node stays in a run of `params` (from the start of
/// the workload): fixed by the seed, like every later session.
pub fn first_session(params: &crate::params::Params, seq: u32) -> Duration {
    let sessions = Sessions::new(params.churn_per_min, params.session_shape);
    sessions.draw_residual(&mut session_rng(params, seq))
}

/// Runs a volunteer's sessions until `end`; returns the node running then.
pub(crate) async fn churn<C: Coordinator, L: Links>(
    instance: &Instance<C, L>,
    mut node: NodeProcess,
    bootstrap: Vec<String>,
    lent_mib: u32,
    book: Arc<Book>,
    end: Instant,
) -> anyhow::Result<NodeProcess> {
    let p = &instance.params;
    let sessions = Sessions::new(p.churn_per_min, p.session_shape);
    let mut rng = session_rng(p, instance.seq);
    let mut session = sessions.draw_residual(&mut rng);
    let mut generation = 0;
    loop {
        let leave_at = Instant::now() + session;
        if leave_at >= end {
            tokio::time::sleep_until(end).await;
            return Ok(node);
        }
        tokio::time::sleep_until(leave_at).await;
        let graceful = rng.random_bool(p.graceful);
        let peer = node.peer_id.clone();
        if graceful {
            book.event(
                "leave",
                format!("{peer} after {:.0} s", session.as_secs_f64()),
            );
            node.stop().await?;
        } else {
            book.event(
                "crash",
                format!("{peer} after {:.0} s", session.as_secs_f64()),
            );
            node.crash().await?;
        }
        generation += 1;
        node = NodeProcess::start(&instance.node_spec(generation, &bootstrap, lent_mib)).await?;
        book.now_running(generation, &node);
        book.event("join", node.peer_id.clone());
        session = sessions.draw(&mut rng);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn sessions_have_the_asked_mean_and_a_heavy_tail() {
        let sessions = Sessions::new(0.2, 1.5);
        assert!((sessions.mean_s() - 300.0).abs() < 1e-9);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut draws: Vec<f64> = (0..200_000)
            .map(|_| sessions.draw(&mut rng).as_secs_f64())
            .collect();
        draws.sort_by(f64::total_cmp);
        let median = draws[draws.len() / 2];
        // Pareto(100 s, 1.5): median 100·2^(2/3) ≈ 158.7 s, far below the 300 s mean.
        assert!((median - 158.7).abs() < 3.0, "{median}");
        assert!(draws[0] >= 100.0 - 1e-9);
        assert!(
            *draws.last().expect("draws") > 20.0 * 300.0,
            "a few very long sessions"
        );
    }

    /// The volunteers of a run of `nodes` (2 schedulers and 2 clients first) whose first
    /// node leaves within `window` at `per_min`, with the default seed and session shape.
    fn leaving_within(nodes: u32, per_min: f64, window: Duration) -> Vec<u32> {
        let params = crate::params::Params {
            churn_per_min: per_min,
            ..crate::params::Params::default()
        };
        (params.fixed_instances()..nodes)
            .filter(|&seq| first_session(&params, seq) < window)
            .collect()
    }

    #[test]
    fn the_seeded_smoke_and_test_runs_are_sure_to_churn() {
        // scripts/smoke and the plan test: 8 nodes at 6 a minute, 8–10 s of workload.
        // Sessions are heavy-tailed, so a short run may well see no departure at all; with
        // the default seed two volunteers leave within 5 s.
        assert_eq!(leaving_within(8, 6.0, Duration::from_secs(5)), [6, 7]);
        // The plan test of 20 nodes at 20% a minute for 60 s: three leave in time.
        assert_eq!(
            leaving_within(20, 0.2, Duration::from_secs(30)),
            [7, 14, 17]
        );
        // Other seeds draw other sessions.
        let reseeded = crate::params::Params {
            churn_per_min: 6.0,
            seed: 2,
            ..crate::params::Params::default()
        };
        let default = crate::params::Params {
            churn_per_min: 6.0,
            ..crate::params::Params::default()
        };
        assert_ne!(first_session(&reseeded, 6), first_session(&default, 6));
    }

    #[test]
    fn residual_sessions_make_peers_leave_from_the_first_minute_at_the_asked_rate() {
        // 20% per minute: of many fresh volunteers, ~20% leave within the first minute.
        let sessions = Sessions::new(0.2, 1.5);
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let n = 200_000;
        let first_minute = (0..n)
            .filter(|_| sessions.draw_residual(&mut rng) < Duration::from_secs(60))
            .count();
        let share = first_minute as f64 / n as f64;
        assert!((share - 0.2).abs() < 0.01, "{share}");
    }
}
