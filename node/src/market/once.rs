//! Runs keyed by an invocation id (with, on a volunteer, the peer that asked), at most
//! once each: what makes retries safe, and where their answers are remembered.
//!
//! A retry that arrives while the first run is under way waits for its answer; one that
//! arrives after gets the remembered answer. The most recent [`Once::capacity`] answers
//! are remembered; older ones are forgotten, oldest first.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::Hash;
use std::sync::Mutex;
use tokio::sync::watch;

/// Runs at most once per id.
pub struct Once<K, T> {
    capacity: usize,
    runs: Mutex<Runs<K, T>>,
}

struct Runs<K, T> {
    by_id: HashMap<K, watch::Receiver<Option<T>>>,
    finished: VecDeque<K>,
}

impl<K: Hash + Eq + Copy, T: Clone + Send + Sync + 'static> Once<K, T> {
    /// Remembers the answers of the last `capacity` finished runs.
    pub fn new(capacity: usize) -> Once<K, T> {
        Once {
            capacity,
            runs: Mutex::new(Runs {
                by_id: HashMap::new(),
                finished: VecDeque::new(),
            }),
        }
    }

    /// How many answers are remembered at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Whether run `id` was started (and is going, or its answer remembered).
    pub fn knows(&self, id: K) -> bool {
        super::lock(&self.runs).by_id.contains_key(&id)
    }

    /// The answer of run `id`: `run`'s, if no run of `id` was started before; otherwise
    /// the first run's (waiting for it if it is still going).
    pub async fn run<F: Future<Output = T>>(&self, id: K, run: F) -> T {
        let (sender, earlier) = {
            let mut runs = super::lock(&self.runs);
            match runs.by_id.get(&id) {
                Some(receiver) => (None, Some(receiver.clone())),
                None => {
                    let (sender, receiver) = watch::channel(None);
                    runs.by_id.insert(id, receiver);
                    (Some(sender), None)
                }
            }
        };
        if let Some(mut earlier) = earlier {
            match earlier.wait_for(Option::is_some).await {
                Ok(answer) => return answer.clone().expect("waited for an answer"),
                // The first run was dropped before answering: run it here instead.
                Err(_) => super::lock(&self.runs).by_id.remove(&id),
            };
            return Box::pin(self.run(id, run)).await;
        }
        let sender = sender.expect("a new run has a sender");
        let answer = run.await;
        sender.send_replace(Some(answer.clone()));
        let mut runs = super::lock(&self.runs);
        runs.finished.push_back(id);
        while runs.finished.len() > self.capacity {
            if let Some(old) = runs.finished.pop_front() {
                runs.by_id.remove(&old);
            }
        }
        answer
    }

    /// Remembers `answer` as that of run `id`, which finished before this node restarted
    /// (nothing if a run of `id` is known already).
    pub fn remember(&self, id: K, answer: T) {
        let mut runs = super::lock(&self.runs);
        if runs.by_id.contains_key(&id) {
            return;
        }
        let (_, receiver) = watch::channel(Some(answer));
        runs.by_id.insert(id, receiver);
        runs.finished.push_back(id);
        while runs.finished.len() > self.capacity {
            if let Some(old) = runs.finished.pop_front() {
                runs.by_id.remove(&old);
            }
        }
    }

    /// The answer of run `id`, if it finished and is remembered.
    pub fn answer(&self, id: K) -> Option<T> {
        super::lock(&self.runs)
            .by_id
            .get(&id)
            .and_then(|r| r.borrow().clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn a_repeated_id_runs_once_and_gets_the_first_answer() {
        let once = Arc::new(Once::new(8));
        let runs = Arc::new(AtomicU32::new(0));
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let first = {
            let (once, runs) = (once.clone(), runs.clone());
            tokio::spawn(async move {
                once.run(1, async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    let _ = released.await;
                    "first"
                })
                .await
            })
        };
        tokio::task::yield_now().await;
        while once.runs.lock().unwrap().by_id.is_empty() {
            tokio::task::yield_now().await;
        }
        let second = {
            let (once, runs) = (once.clone(), runs.clone());
            tokio::spawn(async move {
                once.run(1, async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    "second"
                })
                .await
            })
        };
        release.send(()).unwrap();
        assert_eq!(first.await.unwrap(), "first");
        assert_eq!(second.await.unwrap(), "first");
        assert_eq!(once.run(1, async { "third" }).await, "first");
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(once.answer(1), Some("first"));
        assert!(once.knows(1) && !once.knows(2));
    }

    #[tokio::test]
    async fn old_answers_are_forgotten_beyond_capacity() {
        let once = Once::new(2);
        for id in 0..3 {
            once.run(id, async move { id }).await;
        }
        assert_eq!(once.answer(0), None);
        assert_eq!(once.answer(1), Some(1));
        assert_eq!(once.answer(2), Some(2));
        assert_eq!(once.run(0, async { 99 }).await, 99);
    }
}
