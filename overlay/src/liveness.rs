//! Dead-connection detection. libp2p's ping reports a failed ping but leaves the
//! connection open, so a connection a partition or a vanished peer cut stays "up" until
//! its idle timeout, and every request sent over it waits for its whole timeout. This
//! counts each connection's consecutive ping failures and says when to close it: after
//! three missed in a row ([`MISSED_PINGS_BEFORE_CLOSE`] reported), so one slow answer on
//! a loaded machine does not cut a healthy connection. A plain state machine; the event loop does the closing.

use libp2p::swarm::ConnectionId;
use std::collections::HashMap;
use std::time::Duration;

/// How often each connection is pinged.
pub const PING_INTERVAL: Duration = Duration::from_secs(5);
/// How long a ping may take before it counts as missed.
pub const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Consecutive reported ping failures after which a connection is closed. libp2p's ping
/// keeps each connection's first failure silent, so this is 3 missed pings in a row: a
/// dead connection is closed about 3 × (5 + 5) ≈ 30 s after it died.
pub const MISSED_PINGS_BEFORE_CLOSE: u32 = 2;

/// Consecutive ping failures of each open connection.
#[derive(Debug, Default)]
pub struct Liveness {
    missed: HashMap<ConnectionId, u32>,
}

impl Liveness {
    /// Takes one ping's outcome on `connection`; answers whether to close it now.
    pub fn on_ping(&mut self, connection: ConnectionId, answered: bool) -> bool {
        if answered {
            self.missed.remove(&connection);
            return false;
        }
        let missed = self.missed.entry(connection).or_default();
        *missed += 1;
        if *missed >= MISSED_PINGS_BEFORE_CLOSE {
            self.missed.remove(&connection);
            return true;
        }
        false
    }

    /// Forgets a connection that closed.
    pub fn on_closed(&mut self, connection: ConnectionId) {
        self.missed.remove(&connection);
    }

    /// How many connections have missed pings and are not closed yet.
    pub fn suspect(&self) -> usize {
        self.missed.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_closed_only_after_consecutive_missed_pings() {
        let mut liveness = Liveness::default();
        let a = ConnectionId::new_unchecked(1);
        let b = ConnectionId::new_unchecked(2);
        // Misses broken by an answer never add up.
        for _ in 0..5 {
            for _ in 1..MISSED_PINGS_BEFORE_CLOSE {
                assert!(!liveness.on_ping(a, false));
            }
            assert!(!liveness.on_ping(a, true));
        }
        assert_eq!(liveness.suspect(), 0);
        for _ in 1..MISSED_PINGS_BEFORE_CLOSE {
            assert!(!liveness.on_ping(b, false));
        }
        assert!(!liveness.on_ping(a, false), "connections count apart");
        assert!(
            liveness.on_ping(b, false),
            "the last miss in a row closes it"
        );
        assert_eq!(liveness.suspect(), 1);
        liveness.on_closed(a);
        assert_eq!(liveness.suspect(), 0);
    }
}
