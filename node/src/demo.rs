//! `flotilla demo`: a local network on loopback that moves a file from one node to
//! another through provider lookup and bitswap, narrated step by step.

use crate::api::client::ApiClient;
use crate::cli::DemoArgs;
use crate::config::NodeConfig;
use crate::daemon::{self, RunningNode};
use crate::output;
use bytes::Bytes;
use bytesize::ByteSize;
use futures::StreamExt;
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use std::time::Instant;

/// Config of a node for a local loopback network: ephemeral ports, no mDNS.
pub fn loopback_config(
    data_dir: &std::path::Path,
    bootstrap: Vec<libp2p::Multiaddr>,
) -> NodeConfig {
    NodeConfig {
        data_dir: data_dir.to_path_buf(),
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("valid multiaddr")],
        bootstrap,
        api: "127.0.0.1:0".parse().expect("valid address"),
        mdns: false,
        ..NodeConfig::default()
    }
}

/// Starts `n` nodes on loopback, all bootstrapped through the first.
pub async fn start_network(root: &std::path::Path, n: usize) -> anyhow::Result<Vec<RunningNode>> {
    start_network_with(root, n, |_, config| config).await
}

/// Starts `n` nodes on loopback, all bootstrapped through the first, with node `i`'s
/// loopback config adjusted by `adjust(i, config)` (to make it an offerer, say).
pub async fn start_network_with(
    root: &std::path::Path,
    n: usize,
    adjust: impl Fn(usize, NodeConfig) -> NodeConfig,
) -> anyhow::Result<Vec<RunningNode>> {
    let first = daemon::start(adjust(0, loopback_config(&root.join("node-0"), Vec::new()))).await?;
    let bootstrap = vec![first.bootstrap_addr()];
    let mut nodes = vec![first];
    for i in 1..n {
        let config = loopback_config(&root.join(format!("node-{i}")), bootstrap.clone());
        nodes.push(daemon::start(adjust(i, config)).await?);
    }
    Ok(nodes)
}

/// Runs the demo.
pub async fn run(args: DemoArgs, json: bool) -> anyhow::Result<()> {
    anyhow::ensure!(args.nodes >= 2, "the demo needs at least 2 nodes");
    let say = |text: String| {
        if !json {
            output::line(&text);
        }
    };
    let dir = tempfile::tempdir()?;
    let started = Instant::now();
    let nodes = start_network(dir.path(), args.nodes).await?;
    say(format!(
        "started {} nodes on loopback in {:.0?}:",
        nodes.len(),
        started.elapsed()
    ));
    for (i, node) in nodes.iter().enumerate() {
        say(format!(
            "  node {i}: {} at {}",
            node.peer_id(),
            node.listen_addrs()[0]
        ));
    }
    let result = exchange(&nodes, args.size.as_u64(), json).await;
    for node in nodes {
        node.stop().await;
    }
    let report = result?;
    if json {
        output::json(&report);
    }
    Ok(())
}

#[derive(serde::Serialize)]
struct Report {
    nodes: usize,
    cid: String,
    bytes: u64,
    blocks: u64,
    add_seconds: f64,
    fetch_seconds: f64,
    fetch_mb_per_s: f64,
    providers_used: u64,
    identical: bool,
}

async fn exchange(nodes: &[RunningNode], size: u64, json: bool) -> anyhow::Result<Report> {
    let say = |text: String| {
        if !json {
            output::line(&text);
        }
    };
    let mut data = vec![0u8; usize::try_from(size)?];
    rand::rngs::StdRng::seed_from_u64(7).fill_bytes(&mut data);
    let data = Bytes::from(data);
    let first = ApiClient::new(nodes[0].api_addr());
    let last_index = nodes.len() - 1;
    let last = ApiClient::new(nodes[last_index].api_addr());

    let t = Instant::now();
    let body = futures::stream::iter(
        data.chunks(1 << 20)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect::<Vec<_>>(),
    );
    let added = first.add(body).await?;
    let add_seconds = t.elapsed().as_secs_f64();
    say(format!(
        "node 0 added {} as {} ({} blocks) in {:.0?} and announced it in the DHT",
        ByteSize(added.size).display().iec(),
        added.cid,
        added.blocks,
        t.elapsed()
    ));

    let cid = crate::commands::parse_cid(&added.cid)?;
    let done = last.fetch(&cid, |_| {}).await?;
    let mut hasher = Sha256::new();
    let mut body = last.cat(&cid).await?;
    while let Some(chunk) = body.next().await {
        hasher.update(&chunk?);
    }
    let identical = hasher.finalize() == Sha256::digest(&data);
    let mb_per_s = done.progress.bytes as f64 / done.seconds / 1e6;
    say(format!(
        "node {last_index} found providers and fetched {} blocks over bitswap from {} peer(s) in {:.3} s ({mb_per_s:.0} MB/s)",
        done.progress.fetched_blocks, done.progress.peers, done.seconds
    ));
    say(format!(
        "node {last_index}'s copy is {}",
        if identical {
            "byte-identical"
        } else {
            "DIFFERENT"
        }
    ));
    anyhow::ensure!(identical, "the fetched file differs from the one added");
    let status = last.status().await?;
    say(format!(
        "node {last_index} now holds {} blocks and knows {} peers",
        status.store.blocks, status.network.routing_table_size
    ));
    Ok(Report {
        nodes: nodes.len(),
        cid: added.cid,
        bytes: added.size,
        blocks: added.blocks,
        add_seconds,
        fetch_seconds: done.seconds,
        fetch_mb_per_s: mb_per_s,
        providers_used: done.progress.peers,
        identical,
    })
}
