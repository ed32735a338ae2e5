//! Strangers against the market, as real libp2p peers on loopback: a flood of fresh
//! identities reporting blackhole offers to a scheduler's fallback list, identities from
//! one address prefix filling a holder, blackhole offers in the holders a discovery
//! probes, and job records that would make a node store
//! blocks. Each test checks
//! that honest calls still succeed, that what the node keeps stays bounded, and that the
//! attackers are refused or throttled.
#![allow(clippy::unwrap_used)]

mod common;

use bytesize::ByteSize;
use common::{RawPeer, example, signed_offer, wait_until};
use flotilla_node::config::NodeConfig;
use flotilla_node::daemon::RunningNode;
use flotilla_node::demo;
use flotilla_node::market::function::{FunctionCall, Invocation};
use flotilla_node::market::jobs::{self, JobRecord, JobState, SignedJob, job_id};
use flotilla_node::market::protocol::{Request, Response};
use flotilla_node::market::{DiscoverRequest, ReserveTerms};
use futures::StreamExt;
use libp2p::{Multiaddr, PeerId};
use std::time::Duration;

/// Identities in a flood.
const SYBILS: usize = 256;

/// Node 0 schedules (and is the client); node 1 lends 512 MiB.
async fn scheduler_and_volunteer() -> (tempfile::TempDir, Vec<RunningNode>) {
    common::function_network(1, Duration::from_secs(3), |_, c| c).await
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
    let rss_before = common::rss_kib();
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
    eprintln!(
        "offers kept on the list after the flood: {kept}; RSS {} -> {} KiB",
        rss_before,
        common::rss_kib()
    );
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
        assert!(
            invocation.failed_attempts.is_empty(),
            "{:?}",
            invocation.failed_attempts
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
    let over = |family: &str| {
        holder
            .listen_addrs()
            .iter()
            .find(|a| a.to_string().starts_with(family))
            .unwrap()
            .clone()
            .with_p2p(holder.peer_id())
            .unwrap()
    };
    let (over_ipv6, over_ipv4) = (over("/ip6/"), over("/ip4/"));
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
    let outcome = deliver(honest, over_ipv4, 1).await;
    assert!(held(&outcome[0]), "{outcome:?}");
    assert_eq!(holder.market().offers().await.held.len(), 33);
}

/// The rank of `me` among `everyone` by distance to `key` (0: the closest).
fn rank(me: PeerId, everyone: &[PeerId], key: Vec<u8>) -> usize {
    let target = libp2p::kad::KBucketKey::new(key);
    let mine = libp2p::kad::KBucketKey::from(me).distance(&target);
    everyone
        .iter()
        .filter(|p| libp2p::kad::KBucketKey::from(**p).distance(&target) < mine)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strangers_job_records_make_a_node_keep_only_what_it_agreed_to() {
    let dir = tempfile::tempdir().unwrap();
    // Node 0 schedules, node 1 lends memory; the victim is node 2; 9 nodes in all.
    let nodes = demo::start_network_with(dir.path(), 9, |i, config| {
        let config = NodeConfig {
            fetch_timeout: Duration::from_secs(3),
            ..config
        };
        match i {
            0 => NodeConfig {
                scheduler: true,
                ..config
            },
            1 => NodeConfig {
                offer_memory: Some(ByteSize::mib(512)),
                ..config
            },
            _ => config,
        }
    })
    .await
    .unwrap();
    wait_until(
        "the volunteer's offer is on the scheduler's list",
        || async { nodes[0].market().offers().await.super_traders == 1 },
    )
    .await;
    // A real result, with an output file held by its volunteer.
    let client = &nodes[0];
    let mut count = echo_call(
        &client
            .overlay()
            .add(&example("wordcount")[..])
            .await
            .unwrap()
            .cid,
        0,
    );
    count.args = vec!["words.txt".into()];
    let words = client
        .overlay()
        .add(&b"one two three\n"[..])
        .await
        .unwrap()
        .cid;
    count.inputs = vec![("words.txt".into(), words)];
    let result = client.market().invoke(count, None, None).await.unwrap();
    let output: cid::Cid = result.execution.outputs[0].cid.parse().unwrap();

    let victim = &nodes[2];
    let mallory = libp2p::identity::Keypair::generate_ed25519();
    let mallory_id = mallory.public().to_peer_id();
    let mut everyone: Vec<PeerId> = nodes.iter().map(|n| n.peer_id()).collect();
    everyone.push(mallory_id);
    let job_key = |nonce| jobs::job_key(job_id(&mallory_id, nonce));
    let victim_rank = |nonce| rank(victim.peer_id(), &everyone, job_key(nonce));
    let record = |nonce: u64, seq: u64, result: Invocation| {
        let now = flotilla_node::market::now_ms();
        let record = JobRecord {
            job_id: job_id(&mallory_id, nonce),
            nonce,
            seq,
            scheduler: mallory_id.to_string(),
            taken_from: None,
            call: None,
            state: JobState::Done,
            module: result.execution.volunteer.clone(),
            submitted_at_ms: now,
            wait_until_ms: now + 60_000,
            updated_at_ms: now,
            attempts: 1,
            error: None,
            result: Some(result),
        };
        Request::StoreJob(Box::new(SignedJob::sign(record, &mallory)))
    };
    let mut peer = RawPeer::connect_as(victim, mallory.clone()).await;
    let metric = |name: &'static str| common::metric(victim, name);

    // A job whose key the victim is not near: refused, nothing copied.
    let far = (0..)
        .find(|n| victim_rank(*n) == everyone.len() - 1)
        .unwrap();
    wait_until(
        "the victim knows the peers closer to the far key",
        || async {
            victim
                .overlay()
                .network()
                .closer_peers_known(job_key(far))
                .await
                .unwrap()
                >= 8
        },
    )
    .await;
    let answer = peer.ask(victim, 1, record(far, 1, result.clone())).await;
    assert!(
        matches!(&answer, Response::Refused { reason } if reason.contains("not among")),
        "{answer:?}"
    );
    assert_eq!(metric("flotilla_offers_copies_charged_bytes").await, 0.0);

    // Near its key: the first version with a result is copied, and charged.
    let near = (0..).find(|n| victim_rank(*n) == 0).unwrap();
    let answer = peer.ask(victim, 2, record(near, 1, result.clone())).await;
    assert_eq!(answer, Response::JobStored);
    let charged = metric("flotilla_offers_copies_charged_bytes").await;
    assert!(charged > 0.0);
    wait_until("the victim copied the output", || async {
        victim.overlay().store().has(&output)
    })
    .await;
    // A newer version naming other blocks copies nothing more.
    let mut other = result.clone();
    other.execution.outputs[0].size = 1024 * 1024;
    other.execution.outputs[0].cid = words_cid_of(client).await.to_string();
    let answer = peer.ask(victim, 3, record(near, 2, other)).await;
    assert_eq!(answer, Response::JobStored);
    assert_eq!(
        metric("flotilla_offers_copies_charged_bytes").await,
        charged
    );

    // Records claiming 64 MiB each: with the first copy charged, three fit this
    // scheduler's quota of 256 MiB, and the other two are refused.
    let mut big = result.clone();
    big.execution.outputs[0].size = 64 * 1024 * 1024;
    let near_ones: Vec<u64> = (1_000..).filter(|n| victim_rank(*n) < 3).take(5).collect();
    for (i, nonce) in near_ones.into_iter().enumerate() {
        let answer = peer
            .ask(victim, 10 + i as u64, record(nonce, 1, big.clone()))
            .await;
        assert_eq!(answer, Response::JobStored);
    }
    assert_eq!(metric("flotilla_offers_copies_refused_total").await, 2.0);
    assert!(
        metric("flotilla_offers_copies_charged_bytes").await <= (256 * 1024 * 1024) as f64,
        "charged within the quota"
    );
}

/// The CID of a 1 MiB file added on `node` (not on the victim).
async fn words_cid_of(node: &RunningNode) -> cid::Cid {
    let data = vec![7u8; 1024 * 1024];
    node.overlay()
        .add(&data[..])
        .await
        .unwrap()
        .cid
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discovery_among_blackhole_offers_gives_up_after_a_few_attempts() {
    let dir = tempfile::tempdir().unwrap();
    // A scheduler and a plain node, both holders.
    let nodes = demo::start_network_with(dir.path(), 2, |i, config| NodeConfig {
        scheduler: i == 0,
        answer_timeout: Duration::from_secs(1),
        ..config
    })
    .await
    .unwrap();
    let tier = flotilla_overlay::regions::Tier::largest_within(128).unwrap();
    let nowhere: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().unwrap();
    // 256 identities place a blackhole offer on each holder.
    let held: usize = futures::stream::iter(0..SYBILS)
        .map(|_| {
            let nowhere = nowhere.clone();
            let nodes = &nodes;
            async move {
                let keypair = libp2p::identity::Keypair::generate_ed25519();
                let mut held = 0;
                for node in nodes {
                    let (key, _) = tier.region().random_key(&mut rand::rng());
                    let offer = signed_offer(&keypair, 1, 128, vec![nowhere.clone()]);
                    let mut peer = RawPeer::connect_as(node, keypair.clone()).await;
                    let answer = peer.ask(node, 1, Request::Offer { key, offer }).await;
                    held += usize::from(matches!(answer, Response::Offer { .. }));
                }
                held
            }
        })
        .buffer_unordered(16)
        .fold(0, |sum, held| async move { sum + held })
        .await;
    assert_eq!(held, 2 * SYBILS);

    let found = nodes[0]
        .market()
        .discover(DiscoverRequest {
            memory_mib: 128,
            max_tries: None,
            reserve: Some(ReserveTerms {
                reservation_id: 1,
                hold_ms: 60_000,
                policy: None,
            }),
        })
        .await
        .unwrap();
    assert!(found.placement.is_none());
    let failure = found.report.failure.unwrap_or_default();
    assert!(
        failure.contains("gave up after 8 reservation attempts"),
        "{failure}"
    );
    // Its place was given back: the next discovery runs (and gives up the same way).
    let again = nodes[0]
        .market()
        .discover(DiscoverRequest {
            memory_mib: 128,
            max_tries: None,
            reserve: None,
        })
        .await
        .unwrap();
    assert!(!again.offers.is_empty());
}
