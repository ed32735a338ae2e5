//! Our side as a server: each peer's wantlist, answered from the blockstore.
//!
//! A peer's wants go into its ledger (at most `max_wants_per_peer`; more are dropped and
//! counted) and a queue of work; one worker per peer drains the queue in order, answering
//! want-block with the block (or DONT_HAVE if asked) and want-have with HAVE / DONT_HAVE.
//! Each block goes to the peer's sender as soon as it is read; presences go together at
//! the end of a batch. Wants we could not serve stay
//! in the ledger until cancelled, so a block we obtain later goes to the peers waiting
//! for it, as bitswap peers expect.

use super::message::{Message, Presence, ReceivedBlock, WantEntry, WantType};
use super::{Inner, lock, sender};
use crate::block::MAX_BLOCK_SIZE;
use cid::Cid;
use libp2p::PeerId;
use multihash::Multihash;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

/// Most queued entries a worker takes per round.
const BATCH: usize = 64;

#[derive(Default)]
struct Ledger {
    wants: HashMap<Multihash<64>, WantEntry>,
    /// Wants waiting for the worker, each at most once, so never more than `wants`.
    queue: VecDeque<Multihash<64>>,
    queued: HashSet<Multihash<64>>,
    worker_running: bool,
}

impl Ledger {
    fn enqueue(&mut self, mh: Multihash<64>) {
        if self.queued.insert(mh) {
            self.queue.push_back(mh);
        }
    }
}

/// All peers' ledgers.
#[derive(Default)]
pub(super) struct ServerState {
    ledgers: HashMap<PeerId, Ledger>,
}

pub(super) fn on_wants(inner: &Arc<Inner>, peer: PeerId, entries: Vec<WantEntry>, full: bool) {
    let mut state = lock(&inner.server);
    let ledger = state.ledgers.entry(peer).or_default();
    if full {
        ledger.wants.clear();
        ledger.queue.clear();
        ledger.queued.clear();
    }
    for entry in entries {
        let mh = *entry.cid.hash();
        if entry.cancel {
            ledger.wants.remove(&mh);
            continue;
        }
        if !ledger.wants.contains_key(&mh) && ledger.wants.len() >= inner.config.max_wants_per_peer
        {
            inner.metrics.wants_dropped.inc();
            continue;
        }
        ledger.wants.insert(mh, entry);
        ledger.enqueue(mh);
    }
    start_worker(inner, peer, ledger);
    if ledger.wants.is_empty() && !ledger.worker_running {
        state.ledgers.remove(&peer);
    }
}

fn start_worker(inner: &Arc<Inner>, peer: PeerId, ledger: &mut Ledger) {
    if !ledger.worker_running && !ledger.queue.is_empty() {
        ledger.worker_running = true;
        tokio::spawn(work(inner.clone(), peer));
    }
}

/// Queues every peer that wants `cid` for another look at it.
pub(super) fn block_added(inner: &Arc<Inner>, cid: &Cid) {
    let mh = cid.hash();
    let mut state = lock(&inner.server);
    for (peer, ledger) in state.ledgers.iter_mut() {
        if ledger.wants.contains_key(mh) {
            ledger.enqueue(*mh);
            start_worker(inner, *peer, ledger);
        }
    }
}

pub(super) fn forget_peer(inner: &Arc<Inner>, peer: &PeerId) {
    let mut state = lock(&inner.server);
    if let Some(ledger) = state.ledgers.get_mut(peer) {
        ledger.wants.clear();
        ledger.queue.clear();
        ledger.queued.clear();
        if !ledger.worker_running {
            state.ledgers.remove(peer);
        }
    }
}

/// Takes the next batch of still-wanted entries, or stops the worker if there are none.
fn next_batch(inner: &Arc<Inner>, peer: &PeerId) -> Option<Vec<WantEntry>> {
    let mut state = lock(&inner.server);
    let ledger = state.ledgers.get_mut(peer)?;
    let mut batch = Vec::new();
    while batch.len() < BATCH {
        let Some(mh) = ledger.queue.pop_front() else {
            break;
        };
        ledger.queued.remove(&mh);
        if let Some(entry) = ledger.wants.get(&mh) {
            batch.push(entry.clone());
        }
    }
    if batch.is_empty() {
        ledger.worker_running = false;
        if ledger.wants.is_empty() {
            state.ledgers.remove(peer);
        }
        return None;
    }
    Some(batch)
}

fn served(inner: &Arc<Inner>, peer: &PeerId, mh: &Multihash<64>) {
    if let Some(ledger) = lock(&inner.server).ledgers.get_mut(peer) {
        ledger.wants.remove(mh);
    }
}

async fn work(inner: Arc<Inner>, peer: PeerId) {
    while let Some(batch) = next_batch(&inner, &peer) {
        let mut msg = Message::default();
        for entry in batch {
            let mh = *entry.cid.hash();
            let (block, charge) = match entry.want_type {
                // A block we do not hold costs no charge (and waits for none).
                WantType::Block if !inner.store.has(&entry.cid) => (None, None),
                WantType::Block => {
                    // Room in the peer's reply budget first, then the read: a peer that
                    // does not read its replies cannot make us hold more than its budget.
                    let mut charge = inner.budget.charge(peer, MAX_BLOCK_SIZE).await;
                    match inner.store.get_async(entry.cid).await {
                        Ok(Some(block)) => {
                            charge.shrink_to(block.data().len());
                            (Some(block), Some(charge))
                        }
                        Ok(None) => (None, None),
                        Err(e) => {
                            tracing::warn!(cid = %entry.cid, error = %e, "cannot read a wanted block");
                            (None, None)
                        }
                    }
                }
                WantType::Have => (None, None),
            };
            match (entry.want_type, block) {
                (WantType::Block, Some(block)) => {
                    // Hand each block to the sender at once, so reading the next block
                    // overlaps writing this one; the sender merges what queues up.
                    let (cid, data) = block.into_parts();
                    let reply = Message {
                        blocks: vec![ReceivedBlock { cid, data }],
                        ..Message::default()
                    };
                    sender::send_charged(&inner, peer, reply, charge).await;
                    served(&inner, &peer, &mh);
                }
                (WantType::Have, _) if inner.store.has(&entry.cid) => {
                    msg.presences.push((entry.cid, Presence::Have));
                    served(&inner, &peer, &mh);
                }
                _ if entry.send_dont_have => msg.presences.push((entry.cid, Presence::DontHave)),
                _ => {}
            }
        }
        if !msg.is_empty() {
            sender::send(&inner, peer, msg).await;
        }
    }
}
