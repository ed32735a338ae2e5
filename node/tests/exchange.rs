//! Moving files between real nodes on loopback: provider lookup, bitswap, restarts.
#![allow(clippy::unwrap_used)]

mod common;

use common::{add, fetch, metric, network, random_bytes, read};
use flotilla_node::daemon;
use flotilla_node::demo::loopback_config;
use flotilla_overlay::service::provider_key;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_mib_added_on_the_first_of_five_nodes_is_fetched_on_the_last() {
    let (_dir, nodes) = network(5).await;
    let (first, last) = (&nodes[0], &nodes[4]);
    let data = random_bytes(10 * 1024 * 1024, 1);
    let root = add(first, &data).await;

    // The DHT knows the first node provides the root.
    let mut providers = last
        .overlay()
        .network()
        .get_providers(provider_key(&root))
        .await
        .unwrap();
    let mut found = Vec::new();
    while let Some(peer) = providers.recv().await {
        found.push(peer);
    }
    assert!(
        found.contains(&first.peer_id()),
        "provider lookup found {found:?}"
    );

    let (fetched, progress) = fetch(last, root).await;
    assert!(fetched == data, "fetched file differs");
    // 40 leaves of 256 KiB and one root: every block came over bitswap.
    assert_eq!(progress.blocks, 41);
    assert_eq!(progress.fetched_blocks, 41);
    assert_eq!(
        metric(last, "flotilla_bitswap_blocks_received_total").await,
        41.0
    );
    assert!(metric(first, "flotilla_bitswap_blocks_sent_total").await >= 1.0);
    assert_eq!(
        metric(last, "flotilla_bitswap_blocks_rejected_total").await,
        0.0
    );
    // Its root is announced once: fetching what is held again (as each warm call checks
    // its module) fetches nothing and announces nothing.
    assert_eq!(
        metric(last, "flotilla_announcements_queued_total").await,
        1.0
    );
    let (again, progress) = fetch(last, root).await;
    assert!(again == data);
    assert_eq!(progress.fetched_blocks, 0);
    assert_eq!(
        metric(last, "flotilla_announcements_queued_total").await,
        1.0,
        "a DAG held already is not announced again"
    );
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dag_held_by_several_peers_is_fetched_from_several() {
    let (dir, nodes) = network(3).await;
    let data = random_bytes(3 * 1024 * 1024, 2);
    let root = add(&nodes[0], &data).await;
    // Two more nodes get the file first, so three peers hold it.
    for node in &nodes[1..3] {
        assert!(fetch(node, root).await.0 == data);
    }
    let holders: Vec<_> = nodes.iter().map(|n| n.bootstrap_addr()).collect();
    let fetcher = daemon::start(loopback_config(&dir.path().join("fetcher"), holders))
        .await
        .unwrap();
    let network = fetcher.overlay().network().clone();
    let expected: Vec<_> = nodes.iter().map(|n| n.peer_id()).collect();
    common::wait_until("the fetcher is connected to all three holders", || {
        let (network, expected) = (network.clone(), expected.clone());
        async move {
            let connected = network.connected_peers().await.unwrap();
            expected.iter().all(|p| connected.contains(p))
        }
    })
    .await;

    let mut sent_before = Vec::new();
    for node in &nodes {
        sent_before.push(metric(node, "flotilla_bitswap_blocks_sent_total").await);
    }
    let (fetched, progress) = fetch(&fetcher, root).await;
    assert!(fetched == data);
    assert_eq!(progress.peers, 3, "peers in the session");
    // The 13 blocks are spread over all three holders, each block started at another.
    for (node, before) in nodes.iter().zip(sent_before) {
        let sent = metric(node, "flotilla_bitswap_blocks_sent_total").await - before;
        assert!(
            sent >= 1.0,
            "holder {} sent no block to the fetcher",
            node.peer_id()
        );
    }
    fetcher.stop().await;
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_keeps_its_peer_id_and_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let data = random_bytes(600 * 1024, 3);
    let node = daemon::start(loopback_config(dir.path(), Vec::new()))
        .await
        .unwrap();
    let peer_id = node.peer_id();
    let root = add(&node, &data).await;
    let blocks = node.overlay().store().stats().blocks;
    node.stop().await;

    let node = daemon::start(loopback_config(dir.path(), Vec::new()))
        .await
        .unwrap();
    assert_eq!(node.peer_id(), peer_id);
    assert_eq!(node.overlay().store().stats().blocks, blocks);
    assert!(read(&node, root).await == data);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetching_a_cid_nobody_has_fails_with_a_reason() {
    let (_dir, nodes) = network(2).await;
    let root = flotilla_overlay::block::Block::encode(
        flotilla_overlay::block::RAW,
        bytes::Bytes::from_static(b"nobody"),
    )
    .unwrap()
    .cid()
    .to_owned();
    let (tx, _rx) = tokio::sync::watch::channel(Default::default());
    let lease = nodes[1].overlay().store().lease();
    let err = nodes[1]
        .overlay()
        .fetch(root, &tx, &lease)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no peer could provide"), "{err}");
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_speaking_only_quic_exchange_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let quic = |name: &str, bootstrap| flotilla_node::config::NodeConfig {
        listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()],
        ..loopback_config(&dir.path().join(name), bootstrap)
    };
    let first = daemon::start(quic("a", Vec::new())).await.unwrap();
    assert!(first.bootstrap_addr().to_string().contains("/quic-v1/p2p/"));
    let second = daemon::start(quic("b", vec![first.bootstrap_addr()]))
        .await
        .unwrap();
    let data = random_bytes(1024 * 1024 + 7, 5);
    let root = add(&first, &data).await;
    assert!(fetch(&second, root).await.0 == data);
    second.stop().await;
    first.stop().await;
}

/// Protobuf helpers to write a dag-pb node by hand.
fn varint(mut n: u64, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn field(tag: u64, bytes: &[u8], out: &mut Vec<u8>) {
    varint(tag << 3 | 2, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dag_with_an_inlined_identity_block_is_fetched_and_read() {
    use flotilla_overlay::block::{Block, DAG_PB, IDENTITY, RAW};
    let (_dir, nodes) = network(2).await;
    // A UnixFS file node over two leaves: an identity CID carrying "inline:" in itself,
    // and an ordinary raw block.
    let inline = flotilla_overlay::Cid::new_v1(
        RAW,
        multihash::Multihash::wrap(IDENTITY, b"inline:").unwrap(),
    );
    let leaf = Block::encode(RAW, bytes::Bytes::from_static(b" and fetched")).unwrap();
    let mut node = Vec::new();
    for (cid, size) in [(inline, 7u64), (*leaf.cid(), 12)] {
        let mut link = Vec::new();
        field(1, &cid.to_bytes(), &mut link);
        field(2, b"", &mut link);
        varint(3 << 3, &mut link);
        varint(size, &mut link);
        field(2, &link, &mut node);
    }
    let mut unixfs = vec![0x08, 0x02, 0x18, 19]; // Type = File, filesize = 19
    for size in [7u8, 12] {
        unixfs.extend_from_slice(&[0x20, size]); // blocksizes
    }
    field(1, &unixfs, &mut node);
    let root = Block::encode(DAG_PB, bytes::Bytes::from(node)).unwrap();
    nodes[0].overlay().store().put(&root).unwrap();
    nodes[0].overlay().store().put(&leaf).unwrap();

    let (fetched, progress) = fetch(&nodes[1], *root.cid()).await;
    assert_eq!(fetched, b"inline: and fetched");
    assert_eq!(
        progress.fetched_blocks, 2,
        "the inlined block is never wanted"
    );
    for node in nodes {
        node.stop().await;
    }
}
