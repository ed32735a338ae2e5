//! Lending only while the store has room for calls. A call's module, inputs and outputs
//! live in the store while it runs; pins are never evicted, so a store whose pins leave
//! less than [`room_for_calls`] would take calls only to fail them. The volunteer then
//! withdraws its offers (signed withdrawals, as when it stops) and publishes them again
//! once pins are removed, or at the next start with a larger capacity.

use super::Market;

/// The least room pins must leave in a store of `capacity` bytes for this node to lend:
/// a quarter of it, at most 1 GiB.
pub fn room_for_calls(capacity: u64) -> u64 {
    (capacity / 4).min(1 << 30)
}

/// Whether pins of `pinned` bytes leave a store of `capacity` bytes room for calls.
pub fn pins_leave_room(pinned: u64, capacity: u64) -> bool {
    capacity.saturating_sub(pinned) >= room_for_calls(capacity)
}

impl Market {
    /// Withdraws this node's offers while its pins leave the store no room for calls,
    /// and publishes them again when they do; runs until the market stops.
    pub(super) async fn lend_while_pins_leave_room(self, mut lending: bool) {
        let store = self.shared.overlay.store().clone();
        let capacity = store.capacity();
        let mut pinned = store.watch_pinned();
        loop {
            let now_pinned = *pinned.borrow_and_update();
            let room = pins_leave_room(now_pinned, capacity);
            if room != lending {
                lending = room;
                if room {
                    tracing::info!(
                        pinned = now_pinned,
                        capacity,
                        "pins leave room for calls again: lending"
                    );
                    self.resume_lending().await;
                } else {
                    tracing::error!(
                        pinned = now_pinned,
                        capacity,
                        "pins leave the store no room for calls: offers withdrawn until pins are removed or the capacity raised"
                    );
                    self.withdraw_all().await;
                }
            }
            tokio::select! {
                changed = pinned.changed() => if changed.is_err() { return },
                _ = self.shared.cancel.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_must_leave_a_quarter_of_the_store_or_a_gib() {
        const GIB: u64 = 1 << 30;
        assert!(pins_leave_room(0, 256 << 20));
        assert!(pins_leave_room(192 << 20, 256 << 20));
        assert!(!pins_leave_room((192 << 20) + 1, 256 << 20));
        assert!(pins_leave_room(9 * GIB, 10 * GIB));
        assert!(!pins_leave_room(9 * GIB + 1, 10 * GIB));
        assert!(!pins_leave_room(11 * GIB, 10 * GIB));
    }
}
