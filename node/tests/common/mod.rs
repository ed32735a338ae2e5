//! Helpers shared by the integration tests: loopback networks of real nodes, a bare
//! libp2p peer that speaks raw bitswap, and metric lookups.
#![allow(dead_code, clippy::unwrap_used)]

use bytes::Bytes;
use flotilla_node::daemon::RunningNode;
use flotilla_node::demo;
use flotilla_node::market::OffersView;
use flotilla_overlay::Cid;
use flotilla_overlay::fetch::FetchProgress;
use futures::{StreamExt, TryStreamExt};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, noise, tcp, yamux};
use rand::{RngCore, SeedableRng};
use std::future::Future;
use std::time::Duration;
use tokio::sync::watch;

/// What each of `nodes` offers, reserves and holds, in order.
pub async fn views(nodes: &[RunningNode]) -> Vec<OffersView> {
    let mut views = Vec::with_capacity(nodes.len());
    for node in nodes {
        views.push(node.market().offers().await);
    }
    views
}

/// Whether every offer each of `nodes` makes is published.
pub async fn all_published(nodes: &[RunningNode]) -> bool {
    views(nodes)
        .await
        .iter()
        .all(|v| v.sent.iter().all(|o| o.state == "published"))
}

/// Starts `n` nodes on loopback in a fresh temporary directory.
pub async fn network(n: usize) -> (tempfile::TempDir, Vec<RunningNode>) {
    let dir = tempfile::tempdir().unwrap();
    let nodes = demo::start_network(dir.path(), n).await.unwrap();
    (dir, nodes)
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    data
}

/// Adds bytes on a node, returning the root CID.
pub async fn add(node: &RunningNode, data: &[u8]) -> Cid {
    let added = node.overlay().add(data).await.unwrap();
    Cid::try_from(added.cid.as_str()).unwrap()
}

/// Fetches a DAG onto a node and reads the file back.
pub async fn fetch(node: &RunningNode, cid: Cid) -> (Vec<u8>, FetchProgress) {
    let (tx, rx) = watch::channel(FetchProgress::default());
    let lease = node.overlay().store().lease();
    node.overlay().fetch(cid, &tx, &lease).await.unwrap();
    (read(node, cid).await, *rx.borrow())
}

/// Reads a file held by a node.
pub async fn read(node: &RunningNode, cid: Cid) -> Vec<u8> {
    let chunks: Vec<Bytes> = node.overlay().read_file(cid).try_collect().await.unwrap();
    chunks.concat()
}

/// Polls `condition` until it holds, failing the test after 10 s.
pub async fn wait_until<F, Fut>(what: &str, condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_until_within(what, Duration::from_secs(10), condition).await;
}

/// Polls `condition` until it holds, failing the test after `limit`.
pub async fn wait_until_within<F, Fut>(what: &str, limit: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The value of a metric in a node's `/metrics` text (0 if absent).
pub async fn metric(node: &RunningNode, name: &str) -> f64 {
    let client = flotilla_node::api::client::ApiClient::new(node.api_addr());
    let text = client.metrics().await.unwrap();
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// A bare libp2p peer (TCP + noise + yamux + libp2p-stream) connected to one node, for
/// speaking raw bitswap at it.
pub struct RawPeer {
    pub peer_id: PeerId,
    pub control: libp2p_stream::Control,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawPeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawPeer {
    /// Connects to `node` under a fresh identity and waits until the node has registered
    /// the connection.
    pub async fn connect(node: &RunningNode) -> RawPeer {
        RawPeer::connect_as(node, libp2p::identity::Keypair::generate_ed25519()).await
    }

    /// Connects to `node` as `keypair`'s peer and waits until the node has registered
    /// the connection.
    pub async fn connect_as(node: &RunningNode, keypair: libp2p::identity::Keypair) -> RawPeer {
        RawPeer::connect_to(node, node.bootstrap_addr(), keypair).await
    }

    /// Connects to `node` at `addr` (one of its listen addresses with its PeerId) as
    /// `keypair`'s peer and waits until the node has registered the connection.
    pub async fn connect_to(
        node: &RunningNode,
        addr: Multiaddr,
        keypair: libp2p::identity::Keypair,
    ) -> RawPeer {
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_tcp(
                tcp::Config::default(),
                noise::Config::new,
                yamux::Config::default,
            )
            .unwrap()
            .with_behaviour(|_| libp2p_stream::Behaviour::new())
            .unwrap()
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
            .build();
        swarm.dial(addr).unwrap();
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::ConnectionEstablished { .. } => break,
                SwarmEvent::OutgoingConnectionError { error, .. } => {
                    panic!("cannot connect: {error}")
                }
                _ => {}
            }
        }
        let peer_id = *swarm.local_peer_id();
        let control = swarm.behaviour().new_control();
        let task = tokio::spawn(async move {
            loop {
                swarm.select_next_some().await;
            }
        });
        let network = node.overlay().network().clone();
        wait_until("the node sees the raw peer", || {
            let network = network.clone();
            async move { network.connected_peers().await.unwrap().contains(&peer_id) }
        })
        .await;
        RawPeer {
            peer_id,
            control,
            task,
        }
    }
}

impl RawPeer {
    /// Sends `request` (as request `id`) to `node` over its concern's request-response
    /// protocol, as any libp2p peer can, and decodes the answer.
    pub async fn ask(
        &mut self,
        node: &RunningNode,
        id: u64,
        request: flotilla_node::market::protocol::Request,
    ) -> flotilla_node::market::protocol::Response {
        use flotilla_node::market::protocol;
        use futures::{AsyncReadExt, AsyncWriteExt};
        let mut stream = self
            .control
            .open_stream(node.peer_id(), request.concern().protocol())
            .await
            .unwrap();
        stream
            .write_all(&protocol::encode_request(id, request))
            .await
            .unwrap();
        stream.close().await.unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        protocol::decode_response(&answer, id).unwrap()
    }
}

/// An offer of `mib` MiB signed by `keypair`, at `addresses`, expiring in a minute.
pub fn signed_offer(
    keypair: &libp2p::identity::Keypair,
    offer_id: u64,
    mib: u32,
    addresses: Vec<Multiaddr>,
) -> flotilla_offers::offer::SignedOffer {
    let body = flotilla_offers::offer::OfferBody {
        offerer: keypair.public().to_peer_id(),
        addresses,
        tier: flotilla_overlay::regions::Tier::largest_within(u64::from(mib)).unwrap(),
        memory_mib: mib,
        in_use_mib: 0,
        offer_id,
        seq: 1,
        expires_at_ms: flotilla_node::market::now_ms() + 60_000,
        withdrawn: false,
    };
    flotilla_offers::offer::SignedOffer::sign(body, keypair).unwrap()
}

/// This process's resident memory in KiB (the nodes of a test run in it), for the
/// figures a flood test prints.
pub fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The bytes of a committed example module, `examples/wasm/<name>.wasm`.
pub fn example(name: &str) -> Vec<u8> {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/wasm")
        .join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Timings short enough for tests: offers live 6 s, answers wait 1 s, volunteers report
/// every 300 ms, and a call's parts are fetched within `fetch_timeout`.
pub fn quick(
    config: flotilla_node::config::NodeConfig,
    fetch_timeout: Duration,
) -> flotilla_node::config::NodeConfig {
    flotilla_node::config::NodeConfig {
        offer_ttl: Duration::from_secs(6),
        offer_refresh_margin: Duration::from_secs(3),
        answer_timeout: Duration::from_secs(1),
        notify_interval: Duration::from_millis(300),
        fetch_timeout,
        ..config
    }
}

/// Node 0 schedules (and is the client); nodes 1..=`volunteers` lend 512 MiB each, with
/// `adjust(i, config)` applied last; returns once every volunteer's offer is published
/// and on the scheduler's list.
pub async fn function_network(
    volunteers: usize,
    fetch_timeout: Duration,
    adjust: impl Fn(usize, flotilla_node::config::NodeConfig) -> flotilla_node::config::NodeConfig,
) -> (tempfile::TempDir, Vec<RunningNode>) {
    use flotilla_node::config::NodeConfig;
    let dir = tempfile::tempdir().unwrap();
    let nodes = demo::start_network_with(dir.path(), 1 + volunteers, |i, config| {
        let config = quick(config, fetch_timeout);
        let config = match i {
            0 => NodeConfig {
                scheduler: true,
                ..config
            },
            _ => NodeConfig {
                offer_memory: Some(bytesize::ByteSize::mib(512)),
                ..config
            },
        };
        adjust(i, config)
    })
    .await
    .unwrap();
    wait_until(
        "every volunteer's offer is on the scheduler's list",
        || async {
            all_published(&nodes[1..]).await
                && nodes[0].market().offers().await.super_traders == volunteers
        },
    )
    .await;
    (dir, nodes)
}
