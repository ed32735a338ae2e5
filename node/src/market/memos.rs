//! Memoized results in the market: a pure call's answer, kept by the peers closest to a
//! digest of the call ([`flotilla_api::memo`]), answers a later identical call at once.
//!
//! * The client, after it checked an answer's receipt (and, under `--replicas`, took the
//!   majority), publishes the answers signed as pure to the [`MEMO_REPLICAS`] peers
//!   closest to the call's key, in the background. An outvoted answer is never
//!   published.
//! * A peer keeps a memo only if it is among the [`MEMO_KEEPERS`] closest to the key and
//!   the memo checks (signature, purity, the answer matching its receipt); its
//!   `MemoBook` (`flotilla_scheduler::memos`) decides the rest: agreeing volunteers kept,
//!   a disagreement contests the call, bounded and expiring.
//! * Before placing a call (unless `--fresh`, or `--replicas` above 1: a memo's signers
//!   cost nothing to make, so their agreement proves nothing a replicated call wants),
//!   the client asks those peers, each within [`MEMO_ANSWER_TIMEOUT`]. It takes a memo
//!   only if every memo found checks, none disagree and no peer reports the call
//!   contested, its run finished within the call's deadline, and the result's blocks
//!   (at most what a run leaves) are fetched within one `fetch_timeout`; otherwise it
//!   places the call as usual.
//! * A run worth memoizing is pure and takes its volunteer at least `memo_min_run`
//!   (10 ms): a cheaper one costs less to run again than to look up. Modules seen running
//!   impure or cheap are remembered by the client ([`SkippedModules`]) and neither looked
//!   up nor published again.

use super::Market;
use super::function::{FunctionCall, Invocation};
use super::protocol::{MemoAnswer, Request, Response};
pub use flotilla_api::memo::{
    CheckedMemo, MAX_MEMOS_ANSWERED, Memo, MemoError, call_digest, memo_key,
};
use flotilla_scheduler::memos::{Lookup, MemoRefused};
use libp2p::PeerId;
use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The memo book a node keeps: the rules are `flotilla_scheduler::memos`'.
pub type MemoBook = flotilla_scheduler::memos::MemoBook<CheckedMemo>;
/// Peers a memo is sent to: the closest to its key.
pub const MEMO_REPLICAS: usize = 3;
/// A node keeps a memo only if fewer than this many peers it knows are closer to its key.
pub const MEMO_KEEPERS: usize = 8;
/// Longest a client waits for the lookup of the peers near a call's digest, and then
/// for each of their answers, before it goes on without.
pub const MEMO_ANSWER_TIMEOUT: Duration = Duration::from_secs(1);
/// Modules remembered as not worth a memo.
const MAX_SKIPPED_MODULES: usize = 1024;

/// Module CIDs whose runs were signed impure (they read a clock or random numbers) or
/// took less than `memo_min_run`: a call of one is placed without looking for a memo. At
/// most [`MAX_SKIPPED_MODULES`], the oldest forgotten first.
#[derive(Default)]
pub struct SkippedModules(Mutex<(HashSet<String>, VecDeque<String>)>);

impl SkippedModules {
    fn contains(&self, module: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .contains(module)
    }

    fn insert(&self, module: &str) {
        let mut guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (set, order) = &mut *guard;
        if set.insert(module.to_string()) {
            order.push_back(module.to_string());
            if order.len() > MAX_SKIPPED_MODULES
                && let Some(oldest) = order.pop_front()
            {
                set.remove(&oldest);
            }
        }
    }
}

impl Market {
    /// The memoized answer to `call`, with its result's blocks fetched here; `None` to
    /// place the call.
    pub(super) async fn memoized(&self, call: &FunctionCall) -> Option<Invocation> {
        if self.shared.skipped_modules.contains(&call.module) {
            return None;
        }
        let started = Instant::now();
        let digest = call_digest(call);
        let (found, asked) = self.find_memos(digest).await;
        let deadline_us = call.timeout_ms.map(|ms| ms.saturating_mul(1000));
        let memo = found?
            .into_iter()
            .filter(|m| {
                let took = m.receipt().map_or(u64::MAX, |r| r.body.timings.execute_us);
                deadline_us.is_none_or(|deadline| took <= deadline)
            })
            .max_by_key(|m| m.receipt().map_or(0, |r| r.body.signed_at_ms))?;
        if !self.fetch_memo_result(&memo).await {
            return None;
        }
        tracing::info!(digest = %hex(&digest), volunteer = %memo.execution.volunteer, "answered from a memo");
        Some(Invocation {
            invocation_id: 0,
            scheduler: String::new(),
            execution: memo.execution,
            failed_attempts: Vec::new(),
            discover_us: started.elapsed().as_micros() as u64,
            scheduler_us: 0,
            messages: asked,
            probes: 0,
            exchanges: asked,
            memoized: true,
        })
    }

    /// The memos of the call with `digest` held here and by the peers closest to its key,
    /// each checked: `None` when the call is contested or the memos disagree; and how
    /// many peers were asked.
    async fn find_memos(&self, digest: [u8; 32]) -> (Option<Vec<Memo>>, u32) {
        let now = self.now();
        let mut answers = Vec::new();
        match self.with(move |m, now| m.memos.get(now, &digest)).await {
            Ok(Lookup::Contested) => return (None, 0),
            Ok(Lookup::Agreed(memos)) => {
                answers.push(MemoAnswer::Agreed(
                    memos.into_iter().map(|c| c.memo).collect(),
                ));
            }
            _ => {}
        }
        let timeout = self.shared.config.answer_timeout.min(MEMO_ANSWER_TIMEOUT);
        let closest = tokio::time::timeout(
            timeout,
            self.shared.network.closest_peers(memo_key(&digest)),
        )
        .await;
        let peers: Vec<PeerId> = match closest {
            Ok(Ok(found)) => found.peers,
            _ => Vec::new(),
        };
        let peers: Vec<PeerId> = peers
            .into_iter()
            .filter(|p| *p != self.peer_id())
            .take(MEMO_REPLICAS + 2)
            .collect();
        let asked = peers.len() as u32;
        let asks = peers
            .into_iter()
            .map(|peer| self.call(peer, Vec::new(), Request::FindMemo { digest }, timeout));
        for answer in futures::future::join_all(asks).await {
            if let Ok(Response::Memos(answer)) = answer {
                answers.push(answer);
            }
        }
        let mut found: Vec<Memo> = Vec::new();
        for answer in answers {
            match answer {
                MemoAnswer::Unknown => {}
                MemoAnswer::Contested => return (None, asked),
                MemoAnswer::Agreed(memos) => {
                    for memo in memos.into_iter().take(MAX_MEMOS_ANSWERED) {
                        if memo.verify(now).is_ok() && memo.digest() == Ok(digest) {
                            found.push(memo);
                        } else {
                            tracing::debug!("a peer answered a memo that does not check");
                        }
                    }
                }
            }
        }
        let results: HashSet<[u8; 32]> = found.iter().map(Memo::result_digest).collect();
        if results.len() > 1 {
            tracing::info!(digest = %hex(&digest), "memos disagree; placing the call");
            return (None, asked);
        }
        (Some(found).filter(|f| !f.is_empty()), asked)
    }

    /// Fetches the blocks of `memo`'s result (each at most its size, all within one
    /// `fetch_timeout`; the memo's bounds were checked), under a lease kept for
    /// `call_data_kept` like a call's.
    async fn fetch_memo_result(&self, memo: &Memo) -> bool {
        let lease = self.shared.overlay.store().lease();
        let deadline = tokio::time::Instant::now() + self.shared.config.fetch_timeout;
        for (cid, size) in memo.result_blocks() {
            let Ok(cid) = cid.parse::<cid::Cid>() else {
                return false;
            };
            if let Err(e) = self.fetch_at_most_by(cid, size, deadline, &lease).await {
                tracing::info!(%cid, error = ?e, "a memo's result could not be fetched; placing the call");
                return false;
            }
        }
        lease.keep_until(std::time::Instant::now() + self.shared.config.call_data_kept);
        true
    }

    /// Keeps the memos of `answers` signed as pure and worth keeping (all of the same
    /// call, already checked by this client) here, and publishes them in the background
    /// to the peers closest to the call's key; remembers a module whose run was impure or
    /// cheaper than `memo_min_run`.
    pub(super) async fn publish_memos(&self, call: &FunctionCall, answers: &[Invocation]) {
        let min_run = self.shared.config.memo_min_run.as_micros() as u64;
        let mut memos = Vec::new();
        for answer in answers {
            let Some(receipt) = answer.execution.receipt.as_deref() else {
                continue;
            };
            let ran = receipt.body.timings.instantiate_us + receipt.body.timings.execute_us;
            if !receipt.body.pure || ran < min_run {
                self.shared.skipped_modules.insert(&call.module);
                continue;
            }
            memos.extend(Memo::of(&answer.execution));
        }
        if memos.is_empty() {
            return;
        }
        let digest = call_digest(call);
        let now = self.now();
        for memo in &memos {
            let kept = match memo.clone().checked(now) {
                Ok(kept) => kept,
                Err(e) => {
                    tracing::debug!(error = %e, "own memo not kept");
                    continue;
                }
            };
            if let Ok(Err(e)) = self.with(move |m, now| m.memos.put(now, kept)).await {
                tracing::debug!(error = %e, "own memo not kept");
            }
        }
        let market = self.clone();
        self.spawn(async move {
            let timeout = market.shared.config.answer_timeout;
            let closest = tokio::time::timeout(
                timeout,
                market.shared.network.closest_peers(memo_key(&digest)),
            )
            .await;
            let peers: Vec<PeerId> = match closest {
                Ok(Ok(found)) => found.peers,
                _ => Vec::new(),
            };
            for memo in memos {
                let sends = peers
                    .iter()
                    .filter(|p| **p != market.peer_id())
                    .take(MEMO_REPLICAS)
                    .map(|peer| {
                        let request = Request::StoreMemo(Box::new(memo.clone()));
                        market.call(*peer, Vec::new(), request, timeout)
                    });
                let stored = futures::future::join_all(sends)
                    .await
                    .into_iter()
                    .filter(|r| matches!(r, Ok(Response::MemoStored)))
                    .count();
                tracing::debug!(digest = %hex(&digest), stored, "memo published");
            }
        });
    }

    /// Keeps a memo another peer sent, if this node is among the [`MEMO_KEEPERS`] closest
    /// to its key and the memo book takes it.
    pub(super) async fn store_memo(&self, from: PeerId, memo: Memo) -> Response {
        let digest = match memo.digest() {
            Ok(digest) => digest,
            Err(e) => {
                return Response::Refused {
                    reason: e.to_string(),
                };
            }
        };
        match self
            .shared
            .network
            .among_closest(memo_key(&digest), MEMO_KEEPERS)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                return Response::Refused {
                    reason: format!(
                        "this node is not among the {MEMO_KEEPERS} peers closest to the memo's key"
                    ),
                };
            }
            Err(_) => return Response::stopping(),
        }
        // Checked here, off the market's loop: the loop only files it.
        let memo = match memo.checked(self.now()) {
            Ok(memo) => memo,
            Err(e) => {
                return Response::Refused {
                    reason: e.to_string(),
                };
            }
        };
        let kept = self.with(move |m, now| m.memos.put(now, memo)).await;
        match kept {
            Err(_) => Response::stopping(),
            Ok(Ok(stored)) => {
                tracing::debug!(peer = %from, digest = %hex(&digest), ?stored, "memo kept");
                Response::MemoStored
            }
            Ok(Err(MemoRefused::Stale)) => Response::MemoStored,
            Ok(Err(e)) => {
                tracing::debug!(peer = %from, error = %e, "memo refused");
                Response::Refused {
                    reason: e.to_string(),
                }
            }
        }
    }

    /// What this node holds of the memos of the call with `digest`.
    pub(super) async fn held_memos(&self, digest: [u8; 32]) -> Response {
        match self.with(move |m, now| m.memos.get(now, &digest)).await {
            Ok(Lookup::Unknown) => Response::Memos(MemoAnswer::Unknown),
            Ok(Lookup::Contested) => Response::Memos(MemoAnswer::Contested),
            Ok(Lookup::Agreed(memos)) => Response::Memos(MemoAnswer::Agreed(
                memos
                    .into_iter()
                    .take(MAX_MEMOS_ANSWERED)
                    .map(|c| c.memo)
                    .collect(),
            )),
            Err(_) => Response::stopping(),
        }
    }
}

/// The first 8 bytes of a digest in hex, for logs.
fn hex(digest: &[u8; 32]) -> String {
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}
