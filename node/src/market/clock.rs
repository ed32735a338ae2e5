//! The time the market's machines are handed, from one injected source.
//!
//! A node reads the system clock ([`Clock::system`]): offers and records carry Unix
//! milliseconds that other peers compare with theirs. Tests use [`Clock::tokio`], which
//! starts at the system time and then follows tokio's clock, so a test that pauses tokio
//! time moves the whole market through hours of virtual time in milliseconds.

use std::time::{SystemTime, UNIX_EPOCH};

/// Where the market's `now` comes from.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    /// The system's wall clock.
    System,
    /// Tokio's clock (virtual when tokio time is paused), from a Unix time at its start.
    Tokio {
        /// The Unix time, in ms, that `started` stands for.
        unix_ms_at_start: u64,
        /// When it started, on tokio's clock.
        started: tokio::time::Instant,
    },
}

impl Clock {
    /// The system's wall clock: what a node runs on.
    pub fn system() -> Clock {
        Clock::System
    }

    /// Tokio's clock from now on, starting at the system time: paused tokio time pauses
    /// it, and advancing tokio time advances it. Call it inside a runtime.
    pub fn tokio() -> Clock {
        Clock::Tokio {
            unix_ms_at_start: system_now_ms(),
            started: tokio::time::Instant::now(),
        }
    }

    /// The time now, as Unix milliseconds.
    pub fn now_ms(&self) -> u64 {
        match self {
            Clock::System => system_now_ms(),
            Clock::Tokio {
                unix_ms_at_start,
                started,
            } => unix_ms_at_start + started.elapsed().as_millis() as u64,
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

/// The system time, as Unix milliseconds.
pub fn system_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_tokio_clock_follows_paused_time() {
        let clock = Clock::tokio();
        let start = clock.now_ms();
        assert!(start.abs_diff(system_now_ms()) < 60_000);
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(clock.now_ms(), start + 3_600_000);
    }

    #[test]
    fn the_system_clock_is_the_wall_clock() {
        let now = Clock::system().now_ms();
        assert!(now.abs_diff(system_now_ms()) < 60_000);
    }
}
