//! The store over a volunteer's months, on real nodes on loopback: a store smaller than
//! the data its calls bring evicts its cache and never exceeds its capacity, pins
//! survive `gc`, a running call's blocks are not evicted while it runs, and a volunteer whose pins
//! crowd out its calls withdraws its offers and publishes them again once unpinned.
#![allow(clippy::unwrap_used)]

mod common;

use bytesize::ByteSize;
use common::{example, random_bytes, wait_until};
use flotilla_node::config::NodeConfig;
use flotilla_node::daemon::RunningNode;
use flotilla_node::market::function::FunctionCall;
use flotilla_overlay::Cid;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use std::time::Duration;

const MIB: u64 = 1024 * 1024;

fn call(module: &str, stdin: &str, args: &[&str]) -> FunctionCall {
    FunctionCall {
        module: module.to_string(),
        memory_mib: 128,
        timeout_ms: Some(20_000),
        args: args.iter().map(|a| a.to_string()).collect(),
        env: Vec::new(),
        stdin: Some(stdin.to_string()),
        inputs: Vec::new(),
    }
}

/// One scheduler-client and one volunteer whose store holds `capacity` bytes, adjusted
/// by `adjust`.
async fn network(
    capacity: u64,
    adjust: impl Fn(NodeConfig) -> NodeConfig,
) -> (tempfile::TempDir, Vec<RunningNode>) {
    common::function_network(1, Duration::from_secs(30), |i, config| match i {
        0 => config,
        _ => adjust(NodeConfig {
            store_capacity: ByteSize::b(capacity),
            ..config
        }),
    })
    .await
}

/// The total size of the block files in the store of node `i` of a network in `dir`.
fn on_disk(dir: &std::path::Path, i: usize) -> u64 {
    let blocks = dir
        .join(format!("node-{i}"))
        .join("blockstore")
        .join("blocks");
    std::fs::read_dir(blocks)
        .unwrap()
        .flat_map(|shard| std::fs::read_dir(shard.unwrap().path()).unwrap())
        .map(|f| f.unwrap().metadata().unwrap().len())
        .sum()
}

async fn read_all(node: &RunningNode, cid: Cid) -> Vec<u8> {
    let mut out = Vec::new();
    let mut file = std::pin::pin!(node.overlay().read_file(cid));
    while let Some(chunk) = file.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_calls_of_16_mib_run_on_a_256_mib_store_that_never_overflows_and_keeps_its_pins() {
    const CAPACITY: u64 = 256 * MIB;
    // The default keeps a call's data ten minutes: under this load it must give way.
    let (dir, nodes) = network(CAPACITY, |c| c).await;
    let (client, volunteer) = (&nodes[0], &nodes[1]);
    let module = client
        .overlay()
        .add(&example("sha256")[..])
        .await
        .unwrap()
        .cid;
    // What the volunteer's owner pinned.
    let precious = random_bytes((32 * MIB) as usize, 99);
    let lease = volunteer.overlay().store().lease();
    let pinned = volunteer
        .overlay()
        .add_to(&precious[..], &lease, true)
        .await
        .unwrap();
    drop(lease);
    let pinned: Cid = pinned.cid.parse().unwrap();

    let mut first_input = None;
    for i in 0..50u64 {
        let input = random_bytes((16 * MIB) as usize, i);
        let cid = client.overlay().add(&input[..]).await.unwrap().cid;
        first_input.get_or_insert(cid.parse::<Cid>().unwrap());
        let invocation = client
            .market()
            .invoke(call(&module, &cid, &[]), None, None)
            .await
            .unwrap_or_else(|e| panic!("call {i}: {e}"));
        assert_eq!(invocation.execution.exit_code, 0, "call {i}");
        let digest = hex(&Sha256::digest(&input));
        let stdout = String::from_utf8_lossy(&invocation.execution.stdout.inline).to_string();
        assert!(stdout.contains(&digest), "call {i}: {stdout}");
        let stats = volunteer.overlay().store().stats();
        assert!(stats.bytes <= CAPACITY, "call {i}: {stats:?}");
        assert!(on_disk(dir.path(), 1) <= CAPACITY, "call {i}");
    }
    // The cache was evicted, oldest first.
    let first_input = first_input.unwrap();
    assert!(!volunteer.overlay().store().has(&first_input));

    let report = volunteer.overlay().gc().await.unwrap();
    assert!(report.blocks > 0, "{report:?}");
    let stats = volunteer.overlay().store().stats();
    assert_eq!(stats.pinned_bytes, 32 * MIB + stats.pinned_bytes % MIB);
    assert!(read_all(volunteer, pinned).await == precious);
    assert_eq!(volunteer.overlay().pins().await.unwrap()[0].root, pinned);
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_calls_blocks_are_not_evicted_while_it_runs() {
    const CAPACITY: u64 = 128 * MIB;
    // Nothing is kept after a call: only the run itself protects its blocks.
    let (dir, nodes) = network(CAPACITY, |c| NodeConfig {
        call_data_kept: Duration::ZERO,
        ..c
    })
    .await;
    let (client, volunteer) = (&nodes[0], &nodes[1]);
    let module = client
        .overlay()
        .add(&example("sleep")[..])
        .await
        .unwrap()
        .cid;
    let stdin_bytes = random_bytes((16 * MIB) as usize, 1);
    let stdin = client.overlay().add(&stdin_bytes[..]).await.unwrap().cid;
    let stdin_cid: Cid = stdin.parse().unwrap();
    let market = client.market().clone();
    let mut sleeping = call(&module, &stdin, &["600000"]);
    // Far longer than filling the store takes, even on a slow machine: the test ends it.
    sleeping.timeout_ms = Some(300_000);
    let running = tokio::spawn(async move { market.invoke(sleeping, None, None).await });
    let is_running = || async {
        let view = volunteer.market().offers().await;
        view.reservations.iter().any(|r| r.is_running())
    };
    // Running, with its stdin fetched: the guest sleeps now.
    wait_until("the call runs on the volunteer", || async {
        is_running().await && volunteer.overlay().store().has(&stdin_cid)
    })
    .await;

    // Three 48 MiB files: more than the store has room for beside the call's 16 MiB.
    for seed in 10..13 {
        let other = client
            .overlay()
            .add(&random_bytes((48 * MIB) as usize, seed)[..])
            .await
            .unwrap()
            .cid;
        common::fetch(volunteer, other.parse().unwrap()).await;
    }
    assert!(
        is_running().await,
        "the call ended before the store was filled"
    );
    assert!(read_all(volunteer, stdin_cid).await == stdin_bytes);
    let stats = volunteer.overlay().store().stats();
    assert!(stats.bytes <= CAPACITY);
    assert!(stats.in_use_bytes >= 16 * MIB, "{stats:?}");

    // Nothing but the run protected them: with the node gone, they are cache like any
    // other.
    running.abort();
    let mut nodes = nodes;
    nodes.pop().unwrap().kill().await;
    let store_dir = dir.path().join("node-1").join("blockstore");
    let store = flotilla_overlay::blockstore::Blockstore::open(&store_dir, CAPACITY).unwrap();
    assert!(store.has(&stdin_cid));
    store.gc().unwrap();
    assert!(!store.has(&stdin_cid));
    nodes.pop().unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volunteer_whose_pins_crowd_out_calls_withdraws_its_offers_until_unpinned() {
    const CAPACITY: u64 = 64 * MIB;
    let (_dir, nodes) = network(CAPACITY, |c| c).await;
    let volunteer = &nodes[1];
    let all_withdrawn = || async {
        let view = volunteer.market().offers().await;
        !view.sent.is_empty() && view.sent.iter().all(|o| o.state == "withdrawn")
    };
    assert!(!all_withdrawn().await);
    // 56 MiB of 64 leaves less than a quarter for calls.
    let big = volunteer
        .overlay()
        .add_to(
            &random_bytes((56 * MIB) as usize, 5)[..],
            &volunteer.overlay().store().lease(),
            true,
        )
        .await
        .unwrap();
    wait_until("the volunteer withdraws its offers", all_withdrawn).await;
    let scheduler_lists = || async { nodes[0].market().offers().await.super_traders };
    assert!(
        volunteer
            .overlay()
            .unpin(big.cid.parse().unwrap())
            .await
            .unwrap(),
        "it was pinned"
    );
    wait_until("the volunteer lends again", || async {
        let view = volunteer.market().offers().await;
        view.sent.iter().any(|o| o.state == "published")
    })
    .await;
    wait_until("the scheduler lists it again", || async {
        scheduler_lists().await == 1
    })
    .await;
    for node in nodes {
        node.stop().await;
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
