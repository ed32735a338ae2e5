//! Our side as a client: wants out to peers, and the answers that resolve them.
//!
//! Each want is a waiter keyed by the multihash it asks for. A received block resolves
//! every waiter for its multihash, because its CID was computed from its own bytes; a
//! block that resolves none, was not recently wanted, and is not already held matches no
//! CID we asked for: it is counted as rejected and the sender's other wants fail at once,
//! so the fetch moves on to an honest provider instead of waiting for a timeout.

use super::message::{Message, Presence, ReceivedBlock, WantEntry, WantType};
use super::{Inner, lock, sender};
use crate::block::Block;
use bytes::Bytes;
use cid::Cid;
use libp2p::PeerId;
use multihash::Multihash;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// How many recently wanted multihashes we remember, so late duplicates are not taken for
/// forgeries.
const RECENT: usize = 4096;

/// Why a want failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum WantError {
    /// The peer said it does not have the block.
    #[error("peer does not have the block")]
    DontHave,
    /// The peer did not answer in time.
    #[error("peer did not answer in time")]
    Timeout,
    /// The peer sent a block whose bytes match no CID we asked for.
    #[error("peer sent a block that matches no CID we asked for")]
    BadBlock,
    /// We could not open a stream to the peer.
    #[error("peer unreachable")]
    Unreachable,
    /// The peer disconnected.
    #[error("peer disconnected")]
    Disconnected,
    /// We already have the most wants allowed out to this peer.
    #[error("too many wants outstanding to this peer")]
    TooManyWants,
    /// The block arrived but could not be stored.
    #[error("could not store the block: {0}")]
    Store(String),
}

enum Answer {
    /// The block's bytes, verified to hash to the multihash asked for.
    Block(Bytes),
    Have,
    DontHave,
}

struct Waiter {
    id: u64,
    peer: PeerId,
    /// The CID asked for; a block answering it gets this CID, whatever codec the sender
    /// claimed, since only the multihash is what the bytes prove.
    cid: Cid,
    kind: WantType,
    tx: oneshot::Sender<Result<Answer, WantError>>,
}

/// Our outstanding wants.
#[derive(Default)]
pub(super) struct ClientState {
    next_id: u64,
    waiters: HashMap<Multihash<64>, Vec<Waiter>>,
    per_peer: HashMap<PeerId, usize>,
    recent: VecDeque<Multihash<64>>,
    recent_set: HashSet<Multihash<64>>,
}

impl ClientState {
    fn remember(&mut self, mh: Multihash<64>) {
        if self.recent_set.insert(mh) {
            self.recent.push_back(mh);
            if self.recent.len() > RECENT
                && let Some(old) = self.recent.pop_front()
            {
                self.recent_set.remove(&old);
            }
        }
    }

    fn take(&mut self, mh: &Multihash<64>, pred: impl Fn(&Waiter) -> bool) -> Vec<Waiter> {
        let Some(list) = self.waiters.get_mut(mh) else {
            return Vec::new();
        };
        let (taken, kept): (Vec<_>, Vec<_>) = list.drain(..).partition(|w| pred(w));
        if kept.is_empty() {
            self.waiters.remove(mh);
        } else {
            *list = kept;
        }
        for w in &taken {
            self.release(&w.peer);
        }
        taken
    }

    fn release(&mut self, peer: &PeerId) {
        if let Some(n) = self.per_peer.get_mut(peer) {
            *n -= 1;
            if *n == 0 {
                self.per_peer.remove(peer);
            }
        }
    }
}

/// Removes its waiter when the want is dropped (answered, timed out or abandoned), and
/// withdraws the want from the peer if it was still unanswered.
struct WaiterGuard<'a> {
    inner: &'a Arc<Inner>,
    mh: Multihash<64>,
    id: u64,
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        let pending = {
            let mut state = lock(&self.inner.client);
            let pending = state.take(&self.mh, |w| w.id == self.id);
            state.remember(self.mh);
            pending
        };
        for waiter in pending {
            sender::try_send_existing(self.inner, waiter.peer, Message::cancel(waiter.cid));
        }
    }
}

async fn want(
    inner: &Arc<Inner>,
    peer: PeerId,
    cid: Cid,
    kind: WantType,
    timeout: Duration,
) -> Result<Answer, WantError> {
    let mh = *cid.hash();
    let (tx, rx) = oneshot::channel();
    let id = {
        let mut state = lock(&inner.client);
        let count = state.per_peer.entry(peer).or_default();
        if *count >= inner.config.max_wants_per_peer {
            return Err(WantError::TooManyWants);
        }
        *count += 1;
        state.next_id += 1;
        let id = state.next_id;
        state.waiters.entry(mh).or_default().push(Waiter {
            id,
            peer,
            cid,
            kind,
            tx,
        });
        id
    };
    let _guard = WaiterGuard { inner, mh, id };
    let entry = match kind {
        WantType::Block => WantEntry::block(cid),
        WantType::Have => WantEntry::have(cid),
    };
    let answer = tokio::time::timeout(timeout, async {
        sender::send(
            inner,
            peer,
            Message {
                wants: vec![entry],
                ..Message::default()
            },
        )
        .await;
        rx.await.unwrap_or(Err(WantError::Disconnected))
    })
    .await
    .unwrap_or(Err(WantError::Timeout));
    if matches!(answer, Ok(Answer::DontHave)) {
        // The peer keeps a want it could not serve; withdraw it, so the block does not
        // arrive later unasked.
        sender::try_send_existing(inner, peer, Message::cancel(cid));
    }
    answer
}

pub(super) async fn want_block(
    inner: &Arc<Inner>,
    peer: PeerId,
    cid: Cid,
    timeout: Duration,
) -> Result<Block, WantError> {
    match want(inner, peer, cid, WantType::Block, timeout).await? {
        Answer::Block(data) => Ok(Block::from_hashed(cid, data)),
        Answer::Have | Answer::DontHave => Err(WantError::DontHave),
    }
}

pub(super) async fn want_have(
    inner: &Arc<Inner>,
    peer: PeerId,
    cid: Cid,
    timeout: Duration,
) -> Result<bool, WantError> {
    match want(inner, peer, cid, WantType::Have, timeout).await {
        Ok(Answer::Block(_) | Answer::Have) => Ok(true),
        Ok(Answer::DontHave) | Err(WantError::DontHave) => Ok(false),
        Err(e) => Err(e),
    }
}

pub(super) fn on_presences(inner: &Arc<Inner>, peer: PeerId, presences: &[(Cid, Presence)]) {
    let mut state = lock(&inner.client);
    for (cid, presence) in presences {
        let mh = cid.hash();
        match presence {
            Presence::Have => {
                for w in state.take(mh, |w| w.peer == peer && w.kind == WantType::Have) {
                    let _ = w.tx.send(Ok(Answer::Have));
                }
            }
            Presence::DontHave => {
                for w in state.take(mh, |w| w.peer == peer) {
                    let _ = w.tx.send(Ok(Answer::DontHave));
                }
            }
        }
    }
}

pub(super) fn on_blocks(inner: &Arc<Inner>, peer: PeerId, blocks: Vec<ReceivedBlock>) {
    for ReceivedBlock { cid, data } in blocks {
        let mh = *cid.hash();
        let (waiters, recently_wanted) = {
            let mut state = lock(&inner.client);
            let waiters = state.take(&mh, |_| true);
            let recent = state.recent_set.contains(&mh);
            state.remember(mh);
            (waiters, recent)
        };
        if waiters.is_empty() && inner.store.has(&cid) {
            inner.metrics.blocks_duplicate.inc();
            continue;
        }
        if waiters.is_empty() && !recently_wanted {
            inner.metrics.blocks_rejected.inc();
            tracing::warn!(%peer, %cid, "rejecting a block that matches no CID we asked for");
            fail_peer(inner, &peer, WantError::BadBlock);
            continue;
        }
        // Wanted now, or wanted a moment ago (its want timed out while it was on the
        // way): keep it. Store and hand over off the stream's task, so reading the next
        // message overlaps writing this block; only wanted blocks get here, so this is
        // bounded by the wants we have out.
        tokio::spawn(deliver(
            inner.clone(),
            peer,
            Block::from_hashed(cid, data),
            waiters,
        ));
    }
}

/// Stores a wanted block, resolves its waiters, and withdraws the want from other peers.
async fn deliver(inner: Arc<Inner>, peer: PeerId, block: Block, waiters: Vec<Waiter>) {
    let cid = *block.cid();
    let size = block.data().len() as u64;
    let stored = inner
        .store
        .put_async(block.clone())
        .await
        .map_err(|e| WantError::Store(e.to_string()));
    if stored.is_ok() {
        inner.metrics.blocks_received.inc();
        inner.metrics.block_bytes_received.inc_by(size);
        super::server::block_added(&inner, &cid);
    }
    for w in waiters {
        if w.peer != peer {
            sender::try_send_existing(&inner, w.peer, Message::cancel(w.cid));
        }
        let _ =
            w.tx.send(stored.clone().map(|()| Answer::Block(block.data().clone())));
    }
}

/// Fails every want we have out to `peer`.
pub(super) fn fail_peer(inner: &Arc<Inner>, peer: &PeerId, error: WantError) {
    let mut state = lock(&inner.client);
    let keys: Vec<Multihash<64>> = state
        .waiters
        .iter()
        .filter(|(_, ws)| ws.iter().any(|w| w.peer == *peer))
        .map(|(k, _)| *k)
        .collect();
    for mh in keys {
        for w in state.take(&mh, |w| w.peer == *peer) {
            let _ = w.tx.send(Err(error.clone()));
        }
    }
}
