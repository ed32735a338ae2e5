//! Discovery on a 20-node loopback network (2 schedulers, 18 volunteers lending 128 MiB to
//! 4 GiB) at 30%, 70% and 95% utilisation: probes per request, fallback share, success
//! and time to discover. Utilisation is made by reserving whole offers, chosen at random,
//! through the same `Reserve` message schedulers send; the requests then only discover,
//! so utilisation stays put. Prints a Markdown table; `scripts/bench` records it in
//! docs/benchmarks.md.
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use bytesize::ByteSize;
use flotilla_node::config::NodeConfig;
use flotilla_node::daemon::RunningNode;
use flotilla_node::demo::start_network_with;
use flotilla_node::market::protocol::{self, Request, Response};
use flotilla_node::market::{DiscoverRequest, SentOfferView};
use flotilla_offers::offerer::Slicing;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use std::time::{Duration, Instant};

/// Memory lent by nodes 2.., in MiB (nodes 0 and 1 are schedulers).
const LENT_MIB: [u64; 18] = [
    128, 256, 384, 512, 640, 1024, 1536, 2048, 4096, 128, 256, 512, 1024, 200, 300, 700, 3000, 128,
];
/// Request sizes, in MiB, each asked `ROUNDS` times per utilisation level.
const REQUESTS_MIB: [u32; 11] = [64, 128, 200, 256, 400, 512, 1000, 1024, 2048, 3000, 4096];
const ROUNDS: usize = 6;

async fn poll_until<F: Future<Output = bool>>(mut ready: impl FnMut() -> F) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready().await {
        assert!(Instant::now() < deadline, "the network did not settle");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn sent(nodes: &[RunningNode]) -> Vec<(usize, SentOfferView)> {
    let mut sent = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        sent.extend(n.market().offers().await.sent.into_iter().map(|o| (i, o)));
    }
    sent
}

/// Whether each of the schedulers' lists holds `count` offers.
async fn lists_hold(schedulers: &[RunningNode], count: usize) -> bool {
    for s in schedulers {
        if s.market().offers().await.super_traders != count {
            return false;
        }
    }
    true
}

/// Reserves whole offers, in random order, skipping those that would overshoot, until
/// `target` of all lent memory is reserved (or nothing more fits under it).
async fn reserve_until(nodes: &[RunningNode], target: f64, rng: &mut rand::rngs::StdRng) {
    let offers = sent(nodes).await;
    let total: u32 = offers.iter().map(|(_, o)| o.memory_mib).sum();
    let mut used: u32 = offers.iter().map(|(_, o)| o.in_use_mib).sum();
    let mut free: Vec<_> = offers
        .into_iter()
        .filter(|(_, o)| o.in_use_mib == 0)
        .collect();
    free.shuffle(rng);
    let goal = (target * f64::from(total)) as u32;
    let mut partial = None;
    for (i, offer) in free {
        if used + offer.memory_mib > goal {
            partial = partial.or(Some((i, offer)));
            continue;
        }
        reserve(nodes, i, &offer, offer.memory_mib).await;
        used += offer.memory_mib;
    }
    // The rest of the way on part of one offer.
    if let Some((i, offer)) = partial
        && used < goal
    {
        reserve(nodes, i, &offer, goal - used).await;
    }
    // Full offers are withdrawn from holders at once, and from the fallback lists with the
    // offerers' next reports; partly used ones are updated there.
    let free_offers = sent(nodes)
        .await
        .iter()
        .filter(|(_, o)| o.in_use_mib < o.memory_mib)
        .count();
    poll_until(|| lists_hold(&nodes[..2], free_offers)).await;
}

/// Reserves `mib` of `offer` on node `i`, as a scheduler would.
async fn reserve(nodes: &[RunningNode], i: usize, offer: &SentOfferView, mib: u32) {
    let scheduler = nodes[0].overlay().network();
    {
        let id = rand::random::<u64>() >> 1;
        let request = protocol::encode_request(
            id,
            Request::Reserve {
                reservation_id: id,
                offer_id: offer.offer_id,
                mib,
                hold_ms: 600_000,
            },
        );
        let answer = scheduler
            .request(
                protocol::Concern::Offers,
                nodes[i].peer_id(),
                Vec::new(),
                request,
            )
            .await
            .unwrap();
        assert!(matches!(
            protocol::decode_response(&answer, id).unwrap(),
            Response::Reserved { .. }
        ));
    }
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    println!(
        "| slicing | utilisation | requests | satisfiable | found (of satisfiable) | probes p50 | probes mean | fallback share | from a larger tier | time p50 | time p99 | messages mean |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for slicing in [Slicing::Largest, Slicing::Halving] {
        run(slicing).await;
    }
}

async fn run(slicing: Slicing) {
    let dir = tempfile::tempdir().unwrap();
    let nodes = start_network_with(dir.path(), 20, |i, config| {
        let config = NodeConfig {
            notify_interval: Duration::from_millis(300),
            slicing,
            ..config
        };
        match i {
            0 | 1 => NodeConfig {
                scheduler: true,
                ..config
            },
            i => NodeConfig {
                offer_memory: Some(ByteSize::mib(LENT_MIB[i - 2])),
                ..config
            },
        }
    })
    .await
    .unwrap();
    let total_offers = sent(&nodes).await.len();
    poll_until(|| async {
        sent(&nodes)
            .await
            .iter()
            .all(|(_, o)| o.state == "published")
            && lists_hold(&nodes[..2], total_offers).await
    })
    .await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for target in [0.30, 0.70, 0.95] {
        reserve_until(&nodes, target, &mut rng).await;
        let offers = sent(&nodes).await;
        let total: u32 = offers.iter().map(|(_, o)| o.memory_mib).sum();
        let used: u32 = offers.iter().map(|(_, o)| o.in_use_mib).sum();
        let mut requests: Vec<u32> = (0..ROUNDS).flat_map(|_| REQUESTS_MIB).collect();
        requests.shuffle(&mut rng);
        let (mut satisfiable, mut found, mut fallbacks, mut larger) = (0, 0, 0, 0);
        let (mut probes, mut times, mut messages) = (Vec::new(), Vec::new(), Vec::new());
        for (k, mib) in requests.iter().enumerate() {
            let fits = offers
                .iter()
                .any(|(_, o)| o.memory_mib - o.in_use_mib >= *mib);
            let client = &nodes[2 + k % LENT_MIB.len()];
            let started = Instant::now();
            let outcome = client
                .market()
                .discover(DiscoverRequest {
                    memory_mib: *mib,
                    max_tries: None,
                    reserve: None,
                })
                .await
                .unwrap();
            times.push(started.elapsed().as_secs_f64() * 1000.0);

            probes.push(outcome.report.probes.len() as f64);
            messages.push(f64::from(outcome.report.messages));
            fallbacks += usize::from(outcome.report.used_fallback);
            let tier = outcome.report.tier_mib;
            larger += usize::from(
                !outcome.offers.is_empty() && outcome.offers.iter().all(|o| o.tier_mib > tier),
            );
            if fits {
                satisfiable += 1;
                found += usize::from(outcome.report.failure.is_none());
            } else {
                assert!(outcome.report.failure.is_some(), "found what is not there");
            }
        }
        let n = requests.len();
        println!(
            "| {slicing:?} | {:.0}% | {n} | {satisfiable} | {:.1}% | {} | {:.2} | {:.0}% | {:.0}% | {:.1} ms | {:.1} ms | {:.1} |",
            100.0 * f64::from(used) / f64::from(total),
            100.0 * found as f64 / satisfiable.max(1) as f64,
            percentile(probes.clone(), 0.5),
            probes.iter().sum::<f64>() / n as f64,
            100.0 * fallbacks as f64 / n as f64,
            100.0 * larger as f64 / found.max(1) as f64,
            percentile(times.clone(), 0.5),
            percentile(times, 0.99),
            messages.iter().sum::<f64>() / n as f64,
        );
    }
    for node in nodes {
        node.stop().await;
    }
}
