//! [`Overlay`]: a running peer — swarm, blockstore, bitswap and provider announcements —
//! with the operations the node's API offers: add a file, fetch a DAG, read a file back.

use crate::bitswap::{Bitswap, BitswapConfig};
use crate::block::Block;
use crate::blockstore::{Blockstore, GcReport, Lease, StoreError, StoreStats};
use crate::fetch::{FetchConfig, FetchError, FetchProgress, fetch_dag};
use crate::metrics::OverlayMetrics;
use crate::network::{Network, NetworkConfig, NetworkError, NetworkStatus};
use crate::read::{ReadBudget, ReadError, ReadLimits};
use crate::rpc::Inbound;
use crate::store_db::Pin;
use crate::unixfs::{CHUNK_SIZE, FileBuilder, UnixfsError, decode_file_node, links_of};
use bytes::{Bytes, BytesMut};
use cid::Cid;
use futures::{Stream, StreamExt};
use libp2p::identity::Keypair;
use libp2p::kad::RecordKey;
use libp2p::{Multiaddr, PeerId};
use multihash::Multihash;
use prometheus_client::registry::Registry;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, watch};

/// Provider announcements queued before adders wait.
const ANNOUNCE_QUEUE: usize = 4096;
/// Provider announcements in flight at once.
const ANNOUNCE_PARALLEL: usize = 8;
/// How often the cache's order of use is saved to the store's database.
const SAVE_RECENCY_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// Everything an overlay peer needs to start.
#[derive(Debug, Clone)]
pub struct OverlayConfig {
    /// Where blocks are kept.
    pub store_dir: PathBuf,
    /// Most bytes of blocks kept.
    pub store_capacity: u64,
    /// The swarm's settings.
    pub network: NetworkConfig,
    /// Bitswap's limits.
    pub bitswap: BitswapConfig,
    /// How fetches proceed.
    pub fetch: FetchConfig,
}

/// Errors of the overlay.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// The network layer failed.
    #[error(transparent)]
    Network(#[from] NetworkError),
    /// The blockstore failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A fetch failed.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// A DAG could not be read.
    #[error(transparent)]
    Unixfs(#[from] UnixfsError),
    /// Reading the input failed.
    #[error("cannot read input: {0}")]
    Input(std::io::Error),
    /// Reading a DAG went past its limits (a DAG bomb, say).
    #[error("cannot read {root}: {source}")]
    Read {
        /// The file's root.
        root: Cid,
        /// Which limit.
        source: ReadError,
    },
    /// A block the DAG needs is not in the local store.
    #[error("block {0} is not held locally")]
    Missing(Cid),
}

/// What `add` produced.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Added {
    /// The root CID.
    pub cid: String,
    /// File size in bytes.
    pub size: u64,
    /// Blocks in the DAG.
    pub blocks: u64,
    /// Whether the DAG is pinned (kept until unpinned) rather than cache.
    #[serde(default)]
    pub pinned: bool,
}

/// The overlay's status.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct OverlayStatus {
    /// The network's view.
    #[serde(flatten)]
    pub network: NetworkStatus,
    /// What the blockstore holds.
    pub store: StoreStats,
}

/// A running overlay peer; clones share it.
#[derive(Clone)]
pub struct Overlay {
    network: Network,
    bitswap: Bitswap,
    store: Blockstore,
    announcer: mpsc::Sender<Multihash<64>>,
    metrics: OverlayMetrics,
    fetch: FetchConfig,
    listen_addrs: Vec<Multiaddr>,
    inbound: Arc<Mutex<Option<Inbound>>>,
}

impl Overlay {
    /// Opens the store, starts listening, joins through the bootstrap peers and starts
    /// serving. Fails if a listen address cannot be used or no bootstrap peer answers.
    pub async fn start(
        config: OverlayConfig,
        keypair: Keypair,
        registry: &mut Registry,
    ) -> Result<(Overlay, tokio::task::JoinHandle<()>), OverlayError> {
        let store = Blockstore::open(&config.store_dir, config.store_capacity)?;
        let metrics = OverlayMetrics::new(registry);
        let mut starting = Network::listen(keypair, config.network.clone(), registry).await?;
        let inbound = starting.take_inbound_requests();
        let listen_addrs = starting.listen_addrs();
        let bitswap = Bitswap::start(
            starting.control.clone(),
            store.clone(),
            metrics.clone(),
            config.bitswap,
        );
        let (network, task) = starting
            .run(&config.network.bootstrap, bitswap.clone())
            .await?;
        let (announcer, queue) = mpsc::channel(ANNOUNCE_QUEUE);
        tokio::spawn(announce(network.clone(), queue));
        let overlay = Overlay {
            network,
            bitswap,
            store,
            announcer,
            metrics,
            fetch: config.fetch,
            listen_addrs,
            inbound: Arc::new(Mutex::new(inbound)),
        };
        overlay.reannounce_stored();
        tokio::spawn(save_recency_now_and_then(overlay.store.clone()));
        Ok((overlay, task))
    }

    /// Our PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.network.local_peer_id()
    }

    /// The addresses we listen on, as bound at start.
    pub fn listen_addrs(&self) -> &[Multiaddr] {
        &self.listen_addrs
    }

    /// The blockstore.
    pub fn store(&self) -> &Blockstore {
        &self.store
    }

    /// The network handle.
    pub fn network(&self) -> &Network {
        &self.network
    }

    /// The queues of requests other peers send, one per [`crate::rpc::Concern`]; `None`
    /// after the first call (one service answers them).
    pub fn take_inbound_requests(&self) -> Option<Inbound> {
        self.inbound.lock().ok()?.take()
    }

    /// The bitswap engine.
    pub fn bitswap(&self) -> &Bitswap {
        &self.bitswap
    }

    /// Chunks `input` into a UnixFS DAG, stores its blocks as cache (evictable once
    /// unused), and announces them: the root before returning, the rest in the background.
    pub async fn add<R: AsyncRead + Unpin>(&self, input: R) -> Result<Added, OverlayError> {
        self.add_to(input, &self.store.lease(), false).await
    }

    /// Chunks `input` into a UnixFS DAG and stores its blocks under `lease`, pinned if
    /// `pin`; makes them durable, then announces them: the root before returning, the rest
    /// in the background.
    pub async fn add_to<R: AsyncRead + Unpin>(
        &self,
        mut input: R,
        lease: &Lease,
        pin: bool,
    ) -> Result<Added, OverlayError> {
        let mut builder = FileBuilder::new();
        let mut cids = Vec::new();
        let mut size = 0u64;
        loop {
            let chunk = read_chunk(&mut input).await.map_err(OverlayError::Input)?;
            if chunk.is_empty() {
                break;
            }
            size += chunk.len() as u64;
            for block in builder.push_chunk(chunk)? {
                cids.push(self.put(block, lease).await?);
            }
        }
        let (rest, root) = builder.finish()?;
        for block in rest {
            cids.push(self.put(block, lease).await?);
        }
        // Durable before anyone is told the root.
        self.store.blocking(|store| store.sync()).await?;
        if pin {
            let members = cids.clone();
            self.store
                .blocking(move |store| store.pin(&root, &members))
                .await?;
        }
        if let Err(e) = self.network.start_providing(provider_key(&root)).await {
            tracing::warn!(%root, error = %e, "cannot announce the root");
        }
        let blocks = cids.len() as u64;
        let announcer = self.announcer.clone();
        tokio::spawn(async move {
            for cid in cids.into_iter().filter(|c| *c != root) {
                if announcer.send(*cid.hash()).await.is_err() {
                    break;
                }
            }
        });
        Ok(Added {
            cid: root.to_string(),
            size,
            blocks,
            pinned: pin,
        })
    }

    /// Pins the DAG under `root`, every block of which must be held (fetch it first):
    /// answers the pin, or `None` if it was pinned already.
    pub async fn pin(&self, root: Cid) -> Result<Option<Pin>, OverlayError> {
        let limit = self.fetch.max_blocks;
        let store = self.store.clone();
        let (members, _lease) =
            tokio::task::spawn_blocking(move || dag_blocks(&store, root, limit))
                .await
                .expect("walking a DAG does not panic")
                .map_err(|e| *e)?;
        let pinned = self
            .store
            .blocking(move |store| {
                if !store.pin(&root, &members)? {
                    return Ok::<_, StoreError>(None);
                }
                Ok(store.pins()?.into_iter().find(|p| p.root == root))
            })
            .await?;
        Ok(pinned)
    }

    /// Removes the pin on `root`; answers whether there was one.
    pub async fn unpin(&self, root: Cid) -> Result<bool, OverlayError> {
        Ok(self.store.blocking(move |store| store.unpin(&root)).await?)
    }

    /// Every pin.
    pub async fn pins(&self) -> Result<Vec<Pin>, OverlayError> {
        Ok(self.store.blocking(|store| store.pins()).await?)
    }

    /// Removes every cached block not in use.
    pub async fn gc(&self) -> Result<GcReport, OverlayError> {
        Ok(self.store.blocking(|store| store.gc()).await?)
    }

    async fn put(&self, block: Block, lease: &Lease) -> Result<Cid, OverlayError> {
        let cid = *block.cid();
        lease.protect(&cid);
        self.store.put_async(block).await?;
        self.bitswap.block_added(&cid);
        Ok(cid)
    }

    /// Fetches every missing block of the DAG under `root` under `lease` (which then
    /// protects every block of the DAG from eviction), reporting progress; then, if any
    /// block had to be fetched, makes the blocks durable and announces that we hold it. A DAG held already was
    /// announced when it was added or fetched (Kademlia republishes the record), so
    /// checking it again — as every warm call does for its module — costs the DHT nothing.
    pub async fn fetch(
        &self,
        root: Cid,
        progress: &watch::Sender<FetchProgress>,
        lease: &Lease,
    ) -> Result<(), OverlayError> {
        let started = Instant::now();
        fetch_dag(
            &self.network,
            &self.bitswap,
            root,
            &self.fetch,
            progress,
            lease,
        )
        .await?;
        if progress.borrow().fetched_blocks > 0 {
            self.store.blocking(|store| store.sync()).await?;
            self.metrics
                .fetch_seconds
                .observe(started.elapsed().as_secs_f64());
            if self.announcer.try_send(*root.hash()).is_ok() {
                self.metrics.announcements_queued.inc();
            }
        }
        Ok(())
    }

    /// Checks that `root` is held and is a UnixFS file (or a raw block), before streaming it.
    pub async fn check_file(&self, root: Cid) -> Result<(), OverlayError> {
        match self.store.get_async(root).await? {
            Some(block) => decode_file_node(&block)
                .map(|_| ())
                .map_err(OverlayError::from),
            None => Err(OverlayError::Missing(root)),
        }
    }

    /// Reads the file under `root` from the local store, in order, as a stream of chunks,
    /// under the default [`ReadLimits`] (no deadline). Every block must be held; a missing
    /// one ends the stream with an error.
    pub fn read_file(
        &self,
        root: Cid,
    ) -> impl Stream<Item = Result<Bytes, OverlayError>> + Send + 'static {
        self.read_file_within(root, ReadLimits::default())
    }

    /// Reads the file under `root` as [`Overlay::read_file`] does, within `limits`: a DAG
    /// that visits more nodes than its blocks and bytes pay for, yields more than its root
    /// declares or `limits` allow, is too deep, or outlasts the deadline ends the stream
    /// with [`OverlayError::Read`].
    pub fn read_file_within(
        &self,
        root: Cid,
        limits: ReadLimits,
    ) -> impl Stream<Item = Result<Bytes, OverlayError>> + Send + 'static {
        let store = self.store.clone();
        // The blocks read stay protected from eviction until the stream is dropped.
        let lease = Arc::new(store.lease());
        let start = (vec![(root, 0u32)], ReadBudget::new(limits));
        futures::stream::unfold(Some(start), move |state| {
            let store = store.clone();
            let lease = lease.clone();
            async move {
                let (mut stack, mut budget) = state?;
                let fail = |e: OverlayError| Some((Err(e), None));
                while let Some((cid, depth)) = stack.pop() {
                    if let Err(e) = budget.visit(&cid, depth, Instant::now()) {
                        return fail(OverlayError::Read { root, source: e });
                    }
                    lease.protect(&cid);
                    let node = match store.get_async(cid).await {
                        Ok(Some(block)) => decode_file_node(&block),
                        Ok(None) => return fail(OverlayError::Missing(cid)),
                        Err(e) => return fail(e.into()),
                    };
                    let node = match node {
                        Ok(node) => node,
                        Err(e) => return fail(e.into()),
                    };
                    if let (0, Some(size)) = (depth, node.filesize) {
                        budget.declare(size);
                    }
                    stack.extend(node.links.iter().rev().map(|c| (*c, depth + 1)));
                    if !node.data.is_empty() {
                        if let Err(e) = budget.yielding(node.data.len() as u64) {
                            return fail(OverlayError::Read { root, source: e });
                        }
                        return Some((Ok(node.data), Some((stack, budget))));
                    }
                }
                None
            }
        })
    }

    /// The overlay's status.
    pub async fn status(&self) -> Result<OverlayStatus, OverlayError> {
        Ok(OverlayStatus {
            network: self.network.status().await?,
            store: self.store.stats(),
        })
    }

    /// Stops the network, saves the cache's order of use and closes the store's database.
    pub async fn shutdown(&self) {
        self.network.shutdown().await;
        if let Err(e) = self.store.blocking(|store| store.close()).await {
            tracing::warn!(error = %e, "cannot save the cache's order of use");
        }
    }

    fn reannounce_stored(&self) {
        let store = self.store.clone();
        let announcer = self.announcer.clone();
        tokio::spawn(async move {
            let held = tokio::task::spawn_blocking(move || store.list()).await;
            for hash in held.into_iter().flatten().flatten() {
                if announcer.send(hash).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// The distinct blocks of the DAG under `root`, all held (under a lease, so none is
/// evicted while they are counted), at most `limit`.
fn dag_blocks(
    store: &Blockstore,
    root: Cid,
    limit: usize,
) -> Result<(Vec<Cid>, Lease), Box<OverlayError>> {
    let lease = store.lease();
    let mut seen = std::collections::HashSet::from([root]);
    let mut queue = vec![root];
    while let Some(cid) = queue.pop() {
        lease.protect(&cid);
        let block = store
            .get(&cid)
            .map_err(|e| Box::new(e.into()))?
            .ok_or(OverlayError::Missing(cid))?;
        for child in links_of(&block).map_err(|e| Box::new(e.into()))? {
            if seen.insert(child) {
                if seen.len() > limit {
                    let e = FetchError::TooManyBlocks { root, limit };
                    return Err(Box::new(e.into()));
                }
                queue.push(child);
            }
        }
    }
    Ok((seen.into_iter().collect(), lease))
}

/// Saves the cache's order of use every [`SAVE_RECENCY_EVERY`], for as long as the store
/// is used elsewhere.
async fn save_recency_now_and_then(store: Blockstore) {
    let mut every = tokio::time::interval(SAVE_RECENCY_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        every.tick().await;
        match store.blocking(|store| store.save_recency()).await {
            Ok(()) => {}
            Err(StoreError::Closed) => return,
            Err(e) => tracing::warn!(error = %e, "cannot save the cache's order of use"),
        }
    }
}

/// The Kademlia key of a provider record: the multihash, as IPFS does.
pub fn provider_key(cid: &Cid) -> RecordKey {
    RecordKey::new(&cid.hash().to_bytes())
}

/// Reads up to one chunk, filling it unless the input ends.
async fn read_chunk<R: AsyncRead + Unpin>(input: &mut R) -> std::io::Result<Bytes> {
    let mut buf = BytesMut::zeroed(CHUNK_SIZE);
    let mut filled = 0;
    while filled < CHUNK_SIZE {
        let n = input.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    buf.truncate(filled);
    Ok(buf.freeze())
}

/// Announces provider records from the queue, a few at a time.
async fn announce(network: Network, queue: mpsc::Receiver<Multihash<64>>) {
    let announcements = tokio_stream_from(queue).map(|hash| {
        let network = network.clone();
        async move {
            if let Err(e) = network
                .start_providing(RecordKey::new(&hash.to_bytes()))
                .await
            {
                tracing::debug!(error = %e, "provider announcement failed");
            }
        }
    });
    announcements
        .buffer_unordered(ANNOUNCE_PARALLEL)
        .for_each(|()| async {})
        .await;
}

fn tokio_stream_from<T: Send + 'static>(mut rx: mpsc::Receiver<T>) -> impl Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
