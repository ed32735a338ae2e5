//! Strangers against the market, as real libp2p peers on loopback: a flood of fresh
//! identities reporting blackhole offers to a scheduler's fallback list. Each test checks
//! that honest calls still succeed, that what the node keeps stays bounded, and that the
//! attackers are refused or throttled.
#![allow(clippy::unwrap_used)]

mod common;

use bytesize::ByteSize;
use common::{RawPeer, signed_offer, wait_until};
use flotilla_node::config::NodeConfig;
use flotilla_node::daemon::RunningNode;
use flotilla_node::demo;
use flotilla_node::market::function::FunctionCall;
use flotilla_node::market::protocol::{Request, Response};
use futures::StreamExt;
use libp2p::Multiaddr;
use std::path::PathBuf;
use std::time::Duration;

/// Identities in a flood.
const SYBILS: usize = 256;

fn example(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/wasm")
        .join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Node 0 schedules (and is the client); node 1 lends 512 MiB.
async fn scheduler_and_volunteer() -> (tempfile::TempDir, Vec<RunningNode>) {
    let dir = tempfile::tempdir().unwrap();
    let nodes = demo::start_network_with(dir.path(), 2, |i, config| {
        let config = NodeConfig {
            answer_timeout: Duration::from_secs(1),
            notify_interval: Duration::from_millis(300),
            fetch_timeout: Duration::from_secs(3),
            ..config
        };
        match i {
            0 => NodeConfig {
                scheduler: true,
                ..config
            },
            _ => NodeConfig {
                offer_memory: Some(ByteSize::mib(512)),
                ..config
            },
        }
    })
    .await
    .unwrap();
    wait_until(
        "the volunteer's offer is on the scheduler's list",
        || async { nodes[0].market().offers().await.super_traders == 1 },
    )
    .await;
    (dir, nodes)
}

fn echo_call(module: &str, i: usize) -> FunctionCall {
    FunctionCall {
        module: module.to_string(),
        memory_mib: 128,
        timeout_ms: Some(20_000),
        args: vec!["call".into(), i.to_string()],
        env: Vec::new(),
        stdin: None,
        inputs: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_identities_flooding_the_fallback_list_cost_an_honest_call_a_few_tries_at_most() {
    let (_dir, nodes) = scheduler_and_volunteer().await;
    let scheduler = &nodes[0];
    let echo = scheduler
        .overlay()
        .add(&example("echo")[..])
        .await
        .unwrap()
        .cid;
    // The volunteer answers a call: it is proven from now on.
    let first = scheduler
        .market()
        .invoke(echo_call(&echo, 0), None, None)
        .await
        .unwrap();
    assert_eq!(first.execution.exit_code, 0);

    // 256 identities each report 16 offers that fit better than the honest one, at an
    // address where nobody answers: 4096 blackhole offers, the whole list.
    let nowhere: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().unwrap();
    let accepted: Vec<u32> = futures::stream::iter(0..SYBILS)
        .map(|_| {
            let nowhere = nowhere.clone();
            async move {
                let keypair = libp2p::identity::Keypair::generate_ed25519();
                let offers = (1..=16)
                    .map(|id| signed_offer(&keypair, id, 128, vec![nowhere.clone()]))
                    .collect();
                let mut sybil = RawPeer::connect_as(scheduler, keypair).await;
                match sybil.ask(scheduler, 1, Request::Notify { offers }).await {
                    Response::Notified { accepted } => accepted,
                    other => panic!("{other:?}"),
                }
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    assert_eq!(accepted.len(), SYBILS);
    let kept = scheduler.market().offers().await.super_traders;
    assert!(
        (1..=1 + 1024).contains(&kept),
        "unproven offers fill at most 1024 places: {kept}"
    );

    // Honest calls still succeed, on the volunteer that answered before (the list hands
    // out unproven offers only when no proven one fits, 4 a lookup).
    for i in 1..=5 {
        let invocation = scheduler
            .market()
            .invoke(echo_call(&echo, i), None, None)
            .await
            .unwrap_or_else(|e| panic!("call {i}: {e}"));
        assert_eq!(invocation.execution.exit_code, 0);
        assert_eq!(
            invocation.execution.volunteer,
            nodes[1].peer_id().to_string()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_from_one_address_prefix_fill_only_their_share_of_a_holder() {
    let dir = tempfile::tempdir().unwrap();
    // A holder of 512 offers at most, 32 of them from one prefix, listening on both
    // loopbacks: the attackers come over ::1, the honest offerer over 127.0.0.1.
    let nodes = demo::start_network_with(dir.path(), 1, |_, config| {
        let mut config = NodeConfig {
            listen: vec![
                "/ip4/127.0.0.1/tcp/0".parse().unwrap(),
                "/ip6/::1/tcp/0".parse().unwrap(),
            ],
            ..config
        };
        config.holder.max_total = 512;
        config.holder.max_per_prefix = 32;
        config
    })
    .await
    .unwrap();
    let holder = &nodes[0];
    let over_ipv6 = holder
        .listen_addrs()
        .iter()
        .find(|a| a.to_string().starts_with("/ip6/"))
        .unwrap()
        .clone()
        .with_p2p(holder.peer_id())
        .unwrap();
    let tier = flotilla_overlay::regions::Tier::largest_within(128).unwrap();
    let deliver = |keypair: libp2p::identity::Keypair, addr: Multiaddr, offers: u64| async move {
        let mut peer = RawPeer::connect_to(holder, addr, keypair.clone()).await;
        let mut outcomes = Vec::new();
        for id in 1..=offers {
            let (key, _) = tier.region().random_key(&mut rand::rng());
            let offer = signed_offer(&keypair, id, 128, Vec::new());
            outcomes.push(peer.ask(holder, id, Request::Offer { key, offer }).await);
        }
        outcomes
    };

    // 256 identities deliver 2 offers each: 512, enough to fill the holder.
    let outcomes: Vec<Response> = futures::stream::iter(0..SYBILS)
        .map(|_| {
            let keypair = libp2p::identity::Keypair::generate_ed25519();
            deliver(keypair, over_ipv6.clone(), 2)
        })
        .buffer_unordered(16)
        .flat_map(futures::stream::iter)
        .collect()
        .await;
    let held = |r: &Response| matches!(r, Response::Offer { .. });
    let kept = outcomes.iter().filter(|r| held(r)).count();
    assert_eq!(kept, 32, "one prefix keeps its share only");
    assert!(
        outcomes.iter().all(|r| held(r)
            || matches!(r, Response::Refused { reason } if reason.ends_with("prefix_full"))),
        "{outcomes:?}"
    );

    // An honest offerer from elsewhere is still held, and the holder keeps its bound.
    let honest = libp2p::identity::Keypair::generate_ed25519();
    let outcome = deliver(honest, holder.bootstrap_addr(), 1).await;
    assert!(held(&outcome[0]), "{outcome:?}");
    assert_eq!(holder.market().offers().await.held.len(), 33);
}
