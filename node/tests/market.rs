//! Offers and discovery on loopback networks of real nodes: a 20-node network with mixed
//! tiers and two schedulers, churn, and refused messages.
#![allow(clippy::unwrap_used)]

mod common;

use bytesize::ByteSize;
use common::{all_published, metric, views, wait_until, wait_until_within};
use flotilla_node::config::NodeConfig;
use flotilla_node::daemon::RunningNode;
use flotilla_node::demo;
use flotilla_node::market::protocol::{self, Concern, Request, Response};
use flotilla_node::market::{DiscoverError, DiscoverRequest, Discovered, ReserveTerms};
use flotilla_offers::offerer::Slicing;
use flotilla_overlay::regions::KeySpace;
use std::collections::HashMap;
use std::time::Duration;

/// Memory lent by nodes 2.. of the 20-node network, in MiB (nodes 0 and 1 schedule).
const LENT_MIB: [u64; 18] = [
    128, 256, 384, 512, 640, 1024, 1536, 2048, 4096, 128, 256, 512, 1024, 200, 300, 700, 3000, 128,
];

/// Timings short enough for tests.
fn quick(config: NodeConfig) -> NodeConfig {
    NodeConfig {
        offer_ttl: Duration::from_secs(6),
        offer_refresh_margin: Duration::from_secs(3),
        answer_timeout: Duration::from_secs(1),
        notify_interval: Duration::from_millis(300),
        ..config
    }
}

async fn market_network(
    n: usize,
    role: impl Fn(usize, NodeConfig) -> NodeConfig,
) -> (tempfile::TempDir, Vec<RunningNode>) {
    let dir = tempfile::tempdir().unwrap();
    let nodes = demo::start_network_with(dir.path(), n, |i, c| role(i, quick(c)))
        .await
        .unwrap();
    (dir, nodes)
}

fn offering(config: NodeConfig, mib: u64) -> NodeConfig {
    NodeConfig {
        offer_memory: Some(ByteSize::mib(mib)),
        ..config
    }
}

async fn discover(node: &RunningNode, mib: u32, reserve: Option<u64>) -> Discovered {
    node.market()
        .discover(DiscoverRequest {
            memory_mib: mib,
            max_tries: None,
            reserve: reserve.map(|reservation_id| ReserveTerms {
                reservation_id,
                hold_ms: 60_000,
                policy: None,
            }),
        })
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_nodes_discover_what_fits_and_never_oversubscribe() {
    let (_dir, nodes) = market_network(20, |i, config| match i {
        0 | 1 => NodeConfig {
            scheduler: true,
            ..config
        },
        i => offering(config, LENT_MIB[i - 2]),
    })
    .await;
    let offerers = &nodes[2..];
    let total_offers: usize = views(offerers).await.iter().map(|v| v.sent.len()).sum();
    // Twenty nodes on 2 cores, beside other tests: the bound is generous, a pass is fast.
    wait_until_within(
        "every offer is published",
        Duration::from_secs(40),
        || async { all_published(offerers).await },
    )
    .await;
    let held: usize = views(&nodes).await.iter().map(|v| v.held.len()).sum();
    assert_eq!(held, total_offers, "each offer has exactly one holder");
    let mut published = 0.0;
    for node in offerers {
        published += metric(node, "flotilla_offers_published_total").await;
    }
    assert!(published >= total_offers as f64, "{published} published");
    wait_until("both super-trader lists know every offer", || async {
        views(&nodes[..2])
            .await
            .iter()
            .all(|v| v.super_traders == total_offers)
    })
    .await;

    // Every request some offer can serve is served, whatever tier it falls in.
    for (i, mib) in [100, 128, 256, 300, 512, 1000, 2048, 3000, 4096]
        .into_iter()
        .enumerate()
    {
        let client = &nodes[2 + i];
        let found = discover(client, mib, None).await;
        assert_eq!(found.report.failure, None, "{mib} MiB: {found:?}");
        assert!(found.report.found > 0 && !found.offers.is_empty());
        assert!(found.offers.iter().all(|o| o.free_mib >= mib));
        assert!(found.report.probes.len() <= 3);
    }

    // A scheduler runs its own requests: neither of the two ever sends one to the other
    // (picked at random, 16 requests would all stay home once in 65,536 runs).
    for scheduler in &nodes[..2] {
        for _ in 0..8 {
            let found = discover(scheduler, 256, None).await;
            assert_eq!(found.scheduler, scheduler.peer_id().to_string());
        }
    }

    // More than anyone offers: a clear reason, after the fallback.
    let none = discover(&nodes[5], 5000, None).await;
    assert!(none.report.used_fallback);
    let reason = none.report.failure.unwrap();
    assert!(
        reason.contains("no offer with 5000 MiB free") && reason.contains("fallback"),
        "{reason}"
    );
    let too_big = nodes[5]
        .market()
        .discover(DiscoverRequest {
            memory_mib: 11 * 1024,
            max_tries: None,
            reserve: None,
        })
        .await;
    assert!(
        matches!(too_big, Err(DiscoverError::Request(_))),
        "{too_big:?}"
    );

    // Twenty clients race through both schedulers for 64 MiB each (probing the 128 MiB
    // region, whose offers take two each, then the fallback list of every tier): no
    // offer ever gives out more than it has, and the offerers' books agree.
    let races = (0..20u64).map(|i| {
        let market = offerers[i as usize % offerers.len()].market().clone();
        tokio::spawn(async move {
            market
                .discover(DiscoverRequest {
                    memory_mib: 64,
                    max_tries: None,
                    reserve: Some(ReserveTerms {
                        reservation_id: 1000 + i,
                        hold_ms: 60_000,
                        policy: None,
                    }),
                })
                .await
        })
    });
    let outcomes = futures::future::join_all(races).await;
    let placements: Vec<_> = outcomes
        .into_iter()
        .map(|o| o.unwrap().unwrap())
        .filter_map(|d| d.placement)
        .collect();
    assert!(!placements.is_empty());
    let mut reserved: HashMap<(String, u64), u32> = HashMap::new();
    for p in &placements {
        *reserved
            .entry((p.offer.body.offerer.to_string(), p.offer.body.offer_id))
            .or_default() += p.reservation.mib;
    }
    for ((offerer, offer_id), mib) in &reserved {
        let node = nodes
            .iter()
            .find(|n| n.peer_id().to_string() == *offerer)
            .unwrap();
        let view = node.market().offers().await;
        let offer = view.sent.iter().find(|o| o.offer_id == *offer_id).unwrap();
        assert!(
            *mib <= offer.memory_mib,
            "offer {offer_id} gave out {mib} MiB"
        );
        assert_eq!(offer.in_use_mib, *mib, "the offerer's own count agrees");
    }
    for p in &placements {
        let node = nodes
            .iter()
            .find(|n| n.peer_id() == p.offer.body.offerer)
            .unwrap();
        assert!(
            node.market()
                .offers()
                .await
                .reservations
                .contains(&p.reservation)
        );
    }
    let discoveries = metric(&nodes[0], "flotilla_discovery_discoveries_total").await
        + metric(&nodes[1], "flotilla_discovery_discoveries_total").await;
    // 9 satisfiable, 16 asked of the schedulers themselves, 1 unsatisfiable, 20 races;
    // the impossible one never left its node.
    assert_eq!(discoveries, 46.0);
    let mut probed = 0.0;
    let mut fell_back = 0.0;
    for scheduler in &nodes[..2] {
        probed += metric(scheduler, "flotilla_discovery_probes_count").await;
        fell_back += metric(scheduler, "flotilla_discovery_fallback_total").await;
    }
    assert_eq!(probed, 46.0);
    assert!(fell_back >= 1.0, "the unsatisfiable request fell back");
    for node in nodes {
        node.stop().await;
    }
}

/// The research baseline on real nodes: offers published under, and probes drawn from,
/// random keys anywhere in the key space, and no super-trader fallback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_key_space_baseline_without_fallback_discovers_and_reserves() {
    // Node 0 schedules; nodes 1–7 each lend 1 GiB cut in halves: 512, 256, 128, 128 MiB.
    let (_dir, nodes) = market_network(8, |i, config| {
        let config = NodeConfig {
            key_space: KeySpace::Whole,
            fallback: false,
            ..config
        };
        if i == 0 {
            NodeConfig {
                scheduler: true,
                ..config
            }
        } else {
            NodeConfig {
                slicing: Slicing::Halving,
                ..offering(config, 1024)
            }
        }
    })
    .await;
    let offerers = &nodes[1..];
    wait_until("every offer is published", || async {
        all_published(offerers).await
    })
    .await;
    let total_offers: usize = views(offerers).await.iter().map(|v| v.sent.len()).sum();
    assert_eq!(total_offers, 7 * 4);
    let held: usize = views(&nodes).await.iter().map(|v| v.held.len()).sum();
    assert_eq!(held, total_offers, "each offer has exactly one holder");
    for node in &nodes {
        let wrong_region = metric(
            node,
            "flotilla_offers_rejected_total{reason=\"wrong_region\"}",
        )
        .await;
        assert_eq!(wrong_region, 0.0, "no holder checks regions");
    }

    // 200 MiB (the 256 MiB tier): probing anywhere finds a fitting offer of any tier ≥ it,
    // and the scheduler reserves it.
    for (i, client) in offerers.iter().take(4).enumerate() {
        let found = client
            .market()
            .discover(DiscoverRequest {
                memory_mib: 200,
                max_tries: Some(16),
                reserve: Some(ReserveTerms {
                    reservation_id: 500 + i as u64,
                    hold_ms: 60_000,
                    policy: None,
                }),
            })
            .await
            .unwrap();
        assert_eq!(found.report.failure, None, "{found:?}");
        assert!(!found.report.used_fallback);
        assert!((1..=16).contains(&found.report.probes.len()));
        assert!(found.offers.iter().all(|o| o.free_mib >= 200));
        let placement = found.placement.expect("a reservation");
        assert_eq!(placement.reservation.mib, 200);
        let offerer = nodes
            .iter()
            .find(|n| n.peer_id() == placement.offer.body.offerer)
            .unwrap();
        assert!(
            offerer
                .market()
                .offers()
                .await
                .reservations
                .contains(&placement.reservation)
        );
    }

    // More than any offer has free: probing runs out, and without the fallback the
    // discovery fails with that reason.
    let none = offerers[0]
        .market()
        .discover(DiscoverRequest {
            memory_mib: 2000,
            max_tries: Some(2),
            reserve: None,
        })
        .await
        .unwrap();
    assert!(!none.report.used_fallback);
    assert_eq!(none.report.probes.len(), 2);
    let reason = none.report.failure.unwrap();
    assert!(
        reason.contains("no offer with 2000 MiB free after 2 probe(s)")
            && reason.contains("fallback off"),
        "{reason}"
    );
    assert_eq!(
        metric(&nodes[0], "flotilla_discovery_fallback_total").await,
        0.0
    );
    assert_eq!(
        metric(&nodes[0], "flotilla_discovery_failed_total").await,
        1.0
    );
    for node in nodes {
        node.stop().await;
    }
}

/// The node holding an offer of `offerer`, if any holds one now.
async fn holders_of(nodes: &[RunningNode], offerer: &RunningNode) -> Vec<usize> {
    let id = offerer.peer_id().to_string();
    let views = views(nodes).await;
    (0..nodes.len())
        .filter(|&i| views[i].held.iter().any(|h| h.offer.offerer == id))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offers_expire_after_a_crash_vanish_on_a_stop_and_move_when_a_holder_leaves() {
    // Nodes 0–2 hold only; nodes 3–8 each lend two offers (384 MiB → 256 + 128).
    let (_dir, mut nodes) = market_network(9, |i, config| {
        if i >= 3 {
            offering(config, 384)
        } else {
            config
        }
    })
    .await;
    wait_until("every offer is published", || async {
        all_published(&nodes[3..]).await
    })
    .await;

    // A holder leaves: the offerer publishes to another within one refresh interval.
    let (offerer, offer_id, holder) = nodes[3..]
        .iter()
        .zip(views(&nodes[3..]).await)
        .find_map(|(n, view)| {
            view.sent.iter().find_map(|o| {
                let holder = o.holder.clone()?;
                (holder != n.peer_id().to_string()).then(|| (n.peer_id(), o.offer_id, holder))
            })
        })
        .expect("some offer is held by another peer");
    let holder_index = nodes
        .iter()
        .position(|n| n.peer_id().to_string() == holder)
        .unwrap();
    let offerer_index = nodes.iter().position(|n| n.peer_id() == offerer).unwrap();
    let left = nodes.remove(holder_index);
    left.stop().await;
    let offerer_index = if holder_index < offerer_index {
        offerer_index - 1
    } else {
        offerer_index
    };
    // One refresh interval (ttl − margin = 3 s), plus the answer timeout and slack.
    wait_until_within(
        "the offer has a new holder",
        Duration::from_secs(3 + 1 + 2),
        || async {
            nodes[offerer_index]
                .market()
                .offers()
                .await
                .sent
                .iter()
                .any(|o| {
                    o.offer_id == offer_id
                        && o.state == "published"
                        && o.holder.as_ref().is_some_and(|h| *h != holder)
                })
        },
    )
    .await;

    // An offerer crashes: its offers stay with their holders until they expire.
    // Offers may be between holders for a moment (the one that left had others'
    // offers too), so wait until some offerer's offer sits with another peer.
    async fn held_elsewhere(nodes: &[RunningNode], offerer_index: usize) -> Option<usize> {
        for i in 0..nodes.len() {
            if i != offerer_index
                && nodes[i].market().is_offering()
                && holders_of(nodes, &nodes[i]).await.iter().any(|&h| h != i)
            {
                return Some(i);
            }
        }
        None
    }
    let give_up = tokio::time::Instant::now() + Duration::from_secs(10);
    // An offer of the chosen offerer may be between holders at any moment (being sent
    // to a new key): look again until every offer it made has an expiry.
    let (crashed, expiries) = loop {
        if let Some(found) = held_elsewhere(&nodes, offerer_index).await {
            let sent = nodes[found].market().offers().await.sent;
            let expiries: Vec<u64> = sent.iter().filter_map(|o| o.expires_at_ms).collect();
            if !expiries.is_empty() && expiries.len() == sent.len() {
                break (found, expiries);
            }
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "some offerer's offer is held by another peer"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let crashed_id = nodes[crashed].peer_id().to_string();
    let (first_expiry, last_expiry) = (
        *expiries.iter().min().unwrap(),
        *expiries.iter().max().unwrap(),
    );
    let victim = nodes.remove(crashed);
    victim.kill().await;
    let held_by_others = async |nodes: &[RunningNode]| {
        views(nodes)
            .await
            .iter()
            .any(|v| v.held.iter().any(|h| h.offer.offerer == crashed_id))
    };
    if flotilla_node::market::now_ms() < first_expiry {
        assert!(held_by_others(&nodes).await, "a crash withdraws nothing");
    }
    wait_until("the crashed offerer's offers expire", || async {
        !held_by_others(&nodes).await
    })
    .await;
    // Holders sweep expired offers on their next timer; under a full test run on two
    // cores that can lag the expiry by a second or two.
    assert!(
        flotilla_node::market::now_ms() <= last_expiry + 3_000,
        "gone within the TTL"
    );
    wait_until("holders count the expiry", || async {
        let mut expired = 0.0;
        for node in &nodes {
            expired += metric(node, "flotilla_offers_expired_total").await;
        }
        expired >= 1.0
    })
    .await;

    // An offerer stops cleanly: its withdrawals reach the holders before it is gone.
    let stopping = nodes.iter().position(|n| n.market().is_offering()).unwrap();
    let stopping = nodes.remove(stopping);
    let stopping_id = stopping.peer_id().to_string();
    stopping.stop().await;
    assert!(
        !views(&nodes)
            .await
            .iter()
            .any(|v| { v.held.iter().any(|h| h.offer.offerer == stopping_id) })
    );
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_forged_messages_are_refused_and_counted() {
    let (_dir, nodes) = market_network(2, |i, config| {
        if i == 1 {
            NodeConfig {
                scheduler: true,
                ..offering(config, 256)
            }
        } else {
            config
        }
    })
    .await;
    let network = nodes[0].overlay().network();
    let target = nodes[1].peer_id();
    wait_until("the nodes are connected both ways", || async {
        network.connected_peers().await.unwrap().contains(&target)
    })
    .await;

    let answer = network
        .request(
            Concern::Offers,
            target,
            Vec::new(),
            b"\xffnot cbor".to_vec(),
        )
        .await
        .unwrap();
    let refused = protocol::decode_response(&answer, 0).unwrap();
    assert!(matches!(refused, Response::Refused { .. }), "{refused:?}");
    assert_eq!(
        metric(&nodes[1], "flotilla_offers_malformed_requests_total").await,
        1.0
    );

    // A request on another concern's protocol: an offers request sent as a job.
    let release = protocol::encode_request(3, Request::Release { reservation_id: 1 });
    let answer = network
        .request(Concern::Jobs, target, Vec::new(), release)
        .await
        .unwrap();
    let refused = protocol::decode_response(&answer, 3).unwrap();
    assert!(
        matches!(&refused, Response::Refused { reason } if reason.contains("belongs on /flotilla/offers/2.0.0")),
        "{refused:?}"
    );
    assert_eq!(
        metric(&nodes[1], "flotilla_offers_malformed_requests_total").await,
        2.0
    );

    // An offer signed by someone other than its offerer.
    let mallory = libp2p::identity::Keypair::generate_ed25519();
    let honest = libp2p::identity::Keypair::generate_ed25519();
    let tier = flotilla_overlay::regions::Tier::from_mib(128).unwrap();
    let body = flotilla_offers::offer::OfferBody {
        offerer: honest.public().to_peer_id(),
        addresses: Vec::new(),
        tier,
        memory_mib: 128,
        in_use_mib: 0,
        offer_id: 1,
        seq: 1,
        expires_at_ms: flotilla_node::market::now_ms() + 10_000,
        withdrawn: false,
    };
    let mut forged = flotilla_offers::offer::SignedOffer::sign(body, &honest).unwrap();
    forged.signature = mallory.sign(b"something else").unwrap();
    let (key, _) = tier.region().random_key(&mut rand::rng());
    // Sent by another peer than its offerer: refused at once.
    let relayed = protocol::encode_request(
        6,
        Request::Offer {
            key: key.clone(),
            offer: forged.clone(),
        },
    );
    let answer = network
        .request(Concern::Offers, target, Vec::new(), relayed)
        .await
        .unwrap();
    assert_eq!(
        protocol::decode_response(&answer, 6).unwrap(),
        Response::Refused {
            reason: "offer refused: not_from_offerer".into()
        }
    );
    // Sent by its offerer's peer.
    let mut sender = common::RawPeer::connect_as(&nodes[1], honest.clone()).await;
    let refused = sender
        .ask(&nodes[1], 7, Request::Offer { key, offer: forged })
        .await;
    assert_eq!(
        refused,
        Response::Refused {
            reason: "offer refused: bad_signature".into()
        }
    );
    assert_eq!(
        metric(
            &nodes[1],
            "flotilla_offers_rejected_total{reason=\"bad_signature\"}"
        )
        .await,
        1.0
    );

    // The node keeps serving: a discovery through it still works (its probes may miss
    // the offer's holder, so the offer must be on its list for the fallback too).
    wait_until(
        "the offer is published and on the scheduler's list",
        || async {
            all_published(&nodes[1..2]).await && nodes[1].market().offers().await.super_traders == 1
        },
    )
    .await;
    let found = discover(&nodes[0], 200, None).await;
    assert_eq!(found.report.failure, None, "{found:?}");
    for node in nodes {
        node.stop().await;
    }
}
