//! The coordinator of local runs: counters and topics in this process's memory, shared
//! by every instance of the run (each a task of `flotilla-plan simulate`).
//!
//! A change bumps a version in a `watch` channel; waiters re-check after every bump, so a
//! barrier or subscriber never misses a change made between its check and its wait.

use super::{CoordError, Coordinator, Subscription};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::watch;

/// Most messages one topic keeps (a scenario publishes a few per instance).
pub const MAX_TOPIC_MESSAGES: usize = 100_000;

#[derive(Default)]
struct Shared {
    counters: HashMap<String, u64>,
    topics: HashMap<String, Vec<serde_json::Value>>,
}

/// In-memory signal, barrier, publish and subscribe; clones share the same state.
#[derive(Clone)]
pub struct LocalCoordinator {
    shared: Arc<Mutex<Shared>>,
    version: Arc<watch::Sender<u64>>,
}

impl Default for LocalCoordinator {
    fn default() -> Self {
        LocalCoordinator::new()
    }
}

impl LocalCoordinator {
    /// A coordinator with no counters and no topics.
    pub fn new() -> LocalCoordinator {
        LocalCoordinator {
            shared: Arc::new(Mutex::new(Shared::default())),
            version: Arc::new(watch::channel(0).0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn changed(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// Waits until `ready` says yes, re-checking after every change.
    async fn wait_for<T>(&self, mut ready: impl FnMut(&Shared) -> Option<T>) -> T {
        let mut version = self.version.subscribe();
        loop {
            version.borrow_and_update();
            if let Some(value) = ready(&self.lock()) {
                return value;
            }
            // The sender lives as long as `self`, so this only returns on a change.
            let _ = version.changed().await;
        }
    }
}

impl Coordinator for LocalCoordinator {
    async fn signal(&self, state: &str) -> Result<u64, CoordError> {
        let value = {
            let mut shared = self.lock();
            let counter = shared.counters.entry(state.to_string()).or_default();
            *counter += 1;
            *counter
        };
        self.changed();
        Ok(value)
    }

    async fn barrier(&self, state: &str, target: u64) -> Result<(), CoordError> {
        self.wait_for(|shared| {
            (shared.counters.get(state).copied().unwrap_or(0) >= target).then_some(())
        })
        .await;
        Ok(())
    }

    async fn publish(&self, topic: &str, message: serde_json::Value) -> Result<u64, CoordError> {
        let position = {
            let mut shared = self.lock();
            let messages = shared.topics.entry(topic.to_string()).or_default();
            if messages.len() >= MAX_TOPIC_MESSAGES {
                return Err(CoordError::Payload {
                    topic: topic.into(),
                    reason: format!("more than {MAX_TOPIC_MESSAGES} messages"),
                });
            }
            messages.push(message);
            messages.len() as u64
        };
        self.changed();
        Ok(position)
    }

    async fn subscribe(&self, topic: &str) -> Result<Subscription, CoordError> {
        let this = self.clone();
        let topic = topic.to_string();
        let stream = futures::stream::unfold(0usize, move |next| {
            let this = this.clone();
            let topic = topic.clone();
            async move {
                let message = this
                    .wait_for(|shared| shared.topics.get(&topic)?.get(next).cloned())
                    .await;
                Some((Ok(message), next + 1))
            }
        });
        Ok(Box::pin(stream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::{collect, publish_as, signal_and_wait};
    use std::time::Duration;

    const LIMIT: Duration = Duration::from_secs(10);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_barrier_opens_only_when_every_instance_has_signalled() {
        let coordinator = LocalCoordinator::new();
        let instances = 8u64;
        // Seven instances signal and wait; the barrier must not open for them.
        let mut waiting = Vec::new();
        for _ in 0..instances - 1 {
            let c = coordinator.clone();
            waiting.push(tokio::spawn(async move {
                signal_and_wait(&c, "ready", instances, LIMIT).await
            }));
        }
        let early = tokio::time::timeout(
            Duration::from_millis(100),
            coordinator.barrier("ready", instances),
        )
        .await;
        assert!(
            early.is_err(),
            "the barrier opened with one instance missing"
        );
        let last = signal_and_wait(&coordinator, "ready", instances, LIMIT)
            .await
            .expect("last instance passes");
        let mut positions = vec![last];
        for task in waiting {
            positions.push(task.await.expect("task").expect("barrier"));
        }
        positions.sort_unstable();
        assert_eq!(positions, (1..=instances).collect::<Vec<_>>());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_subscriber_sees_every_message_in_order_even_late_ones() {
        let coordinator = LocalCoordinator::new();
        let readers: Vec<_> = (0..4)
            .map(|_| {
                let c = coordinator.clone();
                tokio::spawn(async move { collect::<_, u32>(&c, "addrs", 30, LIMIT).await })
            })
            .collect();
        // Three publishers interleave ten messages each.
        let writers: Vec<_> = (0..3u32)
            .map(|w| {
                let c = coordinator.clone();
                tokio::spawn(async move {
                    for i in 0..10 {
                        publish_as(&c, "addrs", &(w * 100 + i))
                            .await
                            .expect("publish");
                        tokio::task::yield_now().await;
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.await.expect("writer");
        }
        let late: Vec<u32> = collect(&coordinator, "addrs", 30, LIMIT)
            .await
            .expect("late");
        for reader in readers {
            assert_eq!(reader.await.expect("reader").expect("collect"), late);
        }
        // Each publisher's messages keep their order.
        for w in 0..3 {
            let mine: Vec<u32> = late.iter().copied().filter(|m| m / 100 == w).collect();
            assert_eq!(mine, (0..10).map(|i| w * 100 + i).collect::<Vec<_>>());
        }
    }

    #[tokio::test]
    async fn a_barrier_with_target_zero_opens_at_once() {
        let coordinator = LocalCoordinator::new();
        tokio::time::timeout(Duration::from_millis(100), coordinator.barrier("never", 0))
            .await
            .expect("a target of 0 is reached before anyone signals")
            .expect("barrier");
    }

    #[tokio::test]
    async fn waiting_for_more_than_was_published_times_out() {
        let coordinator = LocalCoordinator::new();
        publish_as(&coordinator, "t", &1u8).await.expect("publish");
        let err = collect::<_, u8>(&coordinator, "t", 2, Duration::from_millis(50))
            .await
            .expect_err("only one message");
        assert!(matches!(err, CoordError::TimedOut { .. }), "{err}");
        let err = signal_and_wait(&coordinator, "s", 2, Duration::from_millis(50))
            .await
            .expect_err("one instance of two");
        assert!(err.to_string().contains("2 instances at 's'"), "{err}");
    }
}
