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
    let mut rng = instance.rng(3);
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
