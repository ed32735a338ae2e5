//! Fetching a whole DAG: from the peers we are connected to and from providers found in
//! the DHT, many blocks at a time, spread over every peer that has them.
//!
//! A fetch is a session: its peers are first the connected peers that answer HAVE for
//! the root (asked before any block is wanted), then providers of the root found by a
//! Kademlia lookup, added as they come. Blocks
//! are wanted in parallel (a bounded window), each from the session's peers in turn
//! starting at a different one per block, so load spreads over several providers. A peer
//! that fails a want is skipped for that block; one that sends a block matching no CID
//! we asked for is dropped from the session. Children are found by decoding each block.

use crate::bitswap::{Bitswap, WantError};
use crate::block::Block;
use crate::blockstore::Lease;
use crate::network::Network;
use crate::unixfs::links_of;
use cid::Cid;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use libp2p::PeerId;
use libp2p::kad::RecordKey;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, watch};

/// Settings of a fetch.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// Blocks wanted at once (default 64).
    pub window: usize,
    /// How long one peer gets to answer one want (default 30 s).
    pub want_timeout: Duration,
    /// Most wants out to one peer at a time (default 16): with the want timeout, the
    /// slowest link a fetch still works over (16 × 256 KiB per 30 s ≈ 1.1 Mbit/s).
    pub per_peer_window: usize,
    /// How long a connected peer gets to say whether it has the root (default 1 s).
    pub probe_timeout: Duration,
    /// How long to wait for the first peer that has the root (default 30 s).
    pub find_timeout: Duration,
    /// Most blocks one DAG may have (default 1 000 000, a 256 GB file in 256 KiB
    /// chunks), so a malicious DAG cannot make a fetch track blocks without end.
    pub max_blocks: usize,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            window: 64,
            want_timeout: Duration::from_secs(30),
            per_peer_window: 16,
            probe_timeout: Duration::from_secs(1),
            find_timeout: Duration::from_secs(30),
            max_blocks: 1_000_000,
        }
    }
}

/// How far a fetch has come.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FetchProgress {
    /// Blocks of the DAG seen so far (held before or fetched).
    pub blocks: u64,
    /// Bytes of those blocks.
    pub bytes: u64,
    /// Blocks fetched from peers.
    pub fetched_blocks: u64,
    /// Peers in the session.
    pub peers: u64,
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// No peer has the root, or none answered for a block.
    #[error("no peer could provide {cid}: {reason}")]
    NotFound {
        /// The block that could not be had.
        cid: Cid,
        /// What happened.
        reason: String,
    },
    /// A fetched block could not be stored (the store is full, say).
    #[error("cannot store fetched blocks: {0}")]
    Storing(String),
    /// The DAG has more blocks than a fetch may track.
    #[error("{root} has more than {limit} blocks")]
    TooManyBlocks {
        /// The DAG's root.
        root: Cid,
        /// The limit.
        limit: usize,
    },
    /// A block was not a valid node.
    #[error(transparent)]
    Unixfs(#[from] crate::unixfs::UnixfsError),
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] crate::blockstore::StoreError),
    /// The network task stopped.
    #[error(transparent)]
    Network(#[from] crate::network::NetworkError),
}

/// The peers of one fetch, and a signal for when new ones join or the search ends.
struct Session {
    peers: Mutex<Vec<PeerId>>,
    searching: AtomicBool,
    changed: watch::Sender<u64>,
    /// Wants out to each peer, at most `per_peer` at a time, so a want's timeout only
    /// runs while few others queue before it at that peer (a slow link still works).
    in_flight: Mutex<HashMap<PeerId, Arc<Semaphore>>>,
    per_peer: usize,
}

impl Session {
    fn add(&self, peer: PeerId) {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if !peers.contains(&peer) {
            peers.push(peer);
            self.changed.send_modify(|n| *n += 1);
        }
    }

    fn remove(&self, peer: &PeerId) {
        self.peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|p| p != peer);
    }

    fn snapshot(&self) -> Vec<PeerId> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn permits(&self, peer: PeerId) -> Arc<Semaphore> {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        in_flight
            .entry(peer)
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_peer)))
            .clone()
    }

    /// Untried peers, least busy first, rotating by `index` among equals.
    fn candidates(&self, index: usize, tried: &HashSet<PeerId>) -> Vec<PeerId> {
        let peers = self.snapshot();
        let mut order: Vec<(usize, usize, PeerId)> = (0..peers.len())
            .map(|i| peers[(index + i) % peers.len()])
            .filter(|p| !tried.contains(p))
            .enumerate()
            .map(|(rank, p)| (self.per_peer - self.permits(p).available_permits(), rank, p))
            .collect();
        order.sort();
        order.into_iter().map(|(_, _, p)| p).collect()
    }

    fn search_ended(&self) {
        self.searching.store(false, Ordering::SeqCst);
        self.changed.send_modify(|n| *n += 1);
    }
}

/// Fetches every block of the DAG under `root` that the store lacks; reports progress on
/// `progress`. Every block of the DAG, held or fetched, is protected by `lease` before it
/// is looked at, so none is evicted between the fetch and its use.
pub async fn fetch_dag(
    network: &Network,
    bitswap: &Bitswap,
    root: Cid,
    config: &FetchConfig,
    progress: &watch::Sender<FetchProgress>,
    lease: &Lease,
) -> Result<(), FetchError> {
    let store = bitswap.store().clone();
    let (changed, _) = watch::channel(0);
    let session = Arc::new(Session {
        peers: Mutex::new(Vec::new()),
        searching: AtomicBool::new(true),
        changed,
        in_flight: Mutex::new(HashMap::new()),
        per_peer: config.per_peer_window.max(1),
    });
    // The provider search runs beside the fetch and stops with it, however it ends.
    let mut finder: Option<AbortOnDrop> = None;

    let mut queue = VecDeque::from([root]);
    let mut seen = HashSet::from([root]);
    let mut in_flight = FuturesUnordered::new();
    let mut index = 0usize;
    let result = loop {
        while in_flight.len() < config.window {
            let Some(cid) = queue.pop_front() else { break };
            lease.protect(&cid);
            if let Some(block) = store.get_async(cid).await? {
                account(progress, &block, false);
                enqueue_children(&block, &mut seen, &mut queue, root, config.max_blocks)?;
                continue;
            }
            if finder.is_none() {
                probe_connected(network, bitswap, root, &session, config.probe_timeout).await;
                finder = Some(AbortOnDrop(tokio::spawn(find_providers(
                    network.clone(),
                    root,
                    session.clone(),
                ))));
            }
            index += 1;
            in_flight.push(fetch_block(bitswap, &session, cid, index, config));
        }
        let Some(fetched) = in_flight.next().await else {
            break Ok(());
        };
        let block = match fetched {
            Ok(block) => block,
            Err(e) => break Err(e),
        };
        account(progress, &block, true);
        progress.send_modify(|p| p.peers = session.snapshot().len() as u64);
        if let Err(e) = enqueue_children(&block, &mut seen, &mut queue, root, config.max_blocks) {
            break Err(e);
        }
    };
    drop(finder);
    result
}

/// A task that is stopped when this handle is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Queues the children of `block` not seen before, refusing DAGs over the block limit.
fn enqueue_children(
    block: &Block,
    seen: &mut HashSet<Cid>,
    queue: &mut VecDeque<Cid>,
    root: Cid,
    limit: usize,
) -> Result<(), FetchError> {
    for child in links_of(block)? {
        if seen.insert(child) {
            if seen.len() > limit {
                return Err(FetchError::TooManyBlocks { root, limit });
            }
            queue.push_back(child);
        }
    }
    Ok(())
}

fn account(progress: &watch::Sender<FetchProgress>, block: &Block, fetched: bool) {
    progress.send_modify(|p| {
        p.blocks += 1;
        p.bytes += block.data().len() as u64;
        p.fetched_blocks += u64::from(fetched);
    });
}

/// Adds to the session the connected peers that say they have the root, as IPFS peers
/// do before they search the DHT. Waits for every answer (each bounded by the probe
/// timeout), so blocks are then spread over all of them.
async fn probe_connected(
    network: &Network,
    bitswap: &Bitswap,
    root: Cid,
    session: &Session,
    timeout: Duration,
) {
    let Ok(peers) = network.connected_peers().await else {
        return;
    };
    let mut asks: FuturesUnordered<_> = peers
        .into_iter()
        .map(|peer| async move { (peer, bitswap.want_have(peer, root, timeout).await) })
        .collect();
    while let Some((peer, answer)) = asks.next().await {
        if let Ok(true) = answer {
            session.add(peer);
        }
    }
}

/// Adds the root's providers to the session as the DHT lookup finds them.
async fn find_providers(network: Network, root: Cid, session: Arc<Session>) {
    if let Ok(mut providers) = network
        .get_providers(RecordKey::new(&root.hash().to_bytes()))
        .await
    {
        while let Some(peer) = providers.recv().await {
            session.add(peer);
        }
    }
    session.search_ended();
}

/// Fetches one block from the session's peers, starting with the `index`-th.
async fn fetch_block(
    bitswap: &Bitswap,
    session: &Session,
    cid: Cid,
    index: usize,
    config: &FetchConfig,
) -> Result<Block, FetchError> {
    let started = Instant::now();
    let mut tried = HashSet::new();
    let mut timed_out = HashSet::new();
    let mut second_chance = true;
    let mut changes = session.changed.subscribe();
    let mut last_error = String::from("no peer has it");
    loop {
        for peer in session.candidates(index, &tried) {
            tried.insert(peer);
            let permits = session.permits(peer);
            let _permit = permits
                .acquire()
                .await
                .expect("session semaphores are never closed");
            match bitswap.want_block(peer, cid, config.want_timeout).await {
                Ok(block) => return Ok(block),
                Err(WantError::Store(reason)) => return Err(FetchError::Storing(reason)),
                Err(e) => {
                    tracing::debug!(%peer, %cid, error = %e, "want failed");
                    match e {
                        WantError::BadBlock => session.remove(&peer),
                        WantError::Timeout => {
                            timed_out.insert(peer);
                        }
                        _ => {}
                    }
                    last_error = format!("last peer tried: {e}");
                }
            }
        }
        // Peers that were only slow get one more chance before we give up on them.
        if second_chance && !timed_out.is_empty() {
            second_chance = false;
            for peer in timed_out.drain() {
                tried.remove(&peer);
            }
            continue;
        }
        // Every known peer failed: wait for new ones while the search goes on.
        changes.borrow_and_update();
        let remaining = config.find_timeout.saturating_sub(started.elapsed());
        let has_untried = || session.snapshot().iter().any(|p| !tried.contains(p));
        if !has_untried() {
            if !session.searching.load(Ordering::SeqCst) || remaining.is_zero() {
                return Err(FetchError::NotFound {
                    cid,
                    reason: last_error,
                });
            }
            if tokio::time::timeout(remaining, changes.changed())
                .await
                .is_err()
            {
                return Err(FetchError::NotFound {
                    cid,
                    reason: format!("{last_error}; timed out"),
                });
            }
        }
    }
}
