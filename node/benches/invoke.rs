//! Invocation latency and throughput on loopback networks of real nodes, and the
//! executor's instantiation time, measured in one run:
//!
//! * warm invoke of a no-op function on a 5-node network (a client, a scheduler, three
//!   volunteers): module blocks and compiled code already on the volunteers; p50, p99;
//!   then the same invoked on the scheduler, which places its own calls;
//! * instantiation of a cached module by the executor: p50, p99;
//! * cold invoke of a 1 MiB module that no volunteer has yet: total beside the fetch and
//!   compile it includes;
//! * memoized results: a cheap pure call (not memoized at all), and a costly one answered
//!   from its memo beside the same call run warm (`fresh`) and calls not memoized yet,
//!   which look for a memo first;
//! * invocations per second one volunteer sustains (a 4 GiB volunteer, 32 callers: as many as its memory holds).
//!
//! Prints a Markdown table; `scripts/bench invoke` records it in docs/benchmarks.md.
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use bytesize::ByteSize;
use flotilla_node::api::client::ApiClient;
use flotilla_node::config::NodeConfig;
use flotilla_node::daemon::RunningNode;
use flotilla_node::demo::start_network_with;
use flotilla_node::executor::{Executor, ExecutorConfig, Job};
use flotilla_node::market::function::{FunctionCall, Invocation};
use rand::RngCore;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const WARM_CALLS: usize = 300;
const MEMO_CALLS: usize = 30;
const INSTANTIATIONS: usize = 2000;
const COLD_CALLS: usize = 5;
const THROUGHPUT_CALLS: usize = 1000;
const CALLERS: usize = 32;

fn noop() -> Vec<u8> {
    std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/wasm/noop.wasm"
    ))
    .unwrap()
}

/// An example module's bytes.
fn example(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/../examples/wasm/{name}.wasm",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// A WASI command of about 1 MiB: a data segment of random bytes, and a `_start` that
/// returns.
fn one_mib_module() -> Vec<u8> {
    let mut data = vec![0u8; 1 << 20];
    rand::rng().fill_bytes(&mut data);
    let escaped: String = data.iter().map(|b| format!("\\{b:02x}")).collect();
    wat::parse_str(format!(
        r#"(module (memory (export "memory") 17) (data (i32.const 0) "{escaped}") (func (export "_start")))"#
    ))
    .unwrap()
}

/// Requests received by all of `nodes`, by protocol (Kademlia's lumped as "kad"), read
/// from each node's `/metrics`.
async fn requests_received(nodes: &[RunningNode]) -> BTreeMap<String, f64> {
    let mut totals = BTreeMap::new();
    for node in nodes {
        let text = ApiClient::new(node.api_addr()).metrics().await.unwrap();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let protocol = if name.starts_with("libp2p_kad_inbound_requests_total") {
                "kad".to_string()
            } else if let Some(labels) = name.strip_prefix("flotilla_requests_received_total{") {
                labels
                    .trim_start_matches("protocol=\"")
                    .trim_end_matches("\"}")
                    .to_string()
            } else {
                continue;
            };
            *totals.entry(protocol).or_default() += value.parse::<f64>().unwrap();
        }
    }
    totals
}

/// Requests per call between two readings of [`requests_received`], as "kad 0.0, …".
fn per_call(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, calls: usize) -> String {
    after
        .iter()
        .map(|(protocol, n)| {
            let was = before.get(protocol).copied().unwrap_or(0.0);
            format!("{protocol} {:.2}", (n - was) / calls as f64)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn sorted(mut values: Vec<f64>) -> Vec<f64> {
    values.sort_by(f64::total_cmp);
    values
}

fn call(module: &str) -> FunctionCall {
    FunctionCall {
        module: module.to_string(),
        memory_mib: 128,
        timeout_ms: Some(10_000),
        args: Vec::new(),
        env: Vec::new(),
        stdin: None,
        inputs: Vec::new(),
    }
}

/// Node 0 is the client, node 1 the scheduler, the rest lend `lent` each; calls on
/// links if `links`.
async fn network(dir: &std::path::Path, n: usize, lent: ByteSize, links: bool) -> Vec<RunningNode> {
    let nodes = start_network_with(dir, n, |i, config| {
        let config = NodeConfig {
            notify_interval: Duration::from_millis(200),
            call_links: links,
            ..config
        };
        match i {
            0 => config,
            1 => NodeConfig {
                scheduler: true,
                ..config
            },
            _ => NodeConfig {
                offer_memory: Some(lent),
                ..config
            },
        }
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while nodes[1].market().offers().await.super_traders < n - 2 {
        assert!(
            Instant::now() < deadline,
            "offers did not reach the scheduler"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    nodes
}

async fn invoke(node: &RunningNode, c: FunctionCall) -> (Invocation, f64) {
    let started = Instant::now();
    let invocation = node.market().invoke(c, None, None).await.unwrap();
    assert_eq!(invocation.execution.exit_code, 0);
    (invocation, started.elapsed().as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    println!("| measurement | result |");
    println!("|---|---|");

    // Warm invoke on five nodes: first with every call a request-response exchange,
    // then (the default) with calls on links kept open.
    let without_links = network(&dir.path().join("warm-rr"), 5, ByteSize::gib(1), false).await;
    warm(&without_links, ", calls by request-response").await;
    for node in without_links {
        node.stop().await;
    }
    let nodes = network(&dir.path().join("warm"), 5, ByteSize::gib(1), true).await;
    warm(&nodes, "").await;
    memoized(&nodes).await;
    // Cold invoke of a 1 MiB module.
    let mut cold = Vec::new();
    for _ in 0..COLD_CALLS {
        let big = one_mib_module();
        let size = big.len();
        let cid = nodes[0].overlay().add(&big[..]).await.unwrap().cid;
        let (invocation, ms) = invoke(&nodes[0], call(&cid)).await;
        let t = invocation.execution.timings;
        assert!(t.compiled);
        cold.push((
            ms,
            t.fetch_us as f64 / 1000.0,
            t.load_us as f64 / 1000.0,
            size,
        ));
    }
    cold.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (total, fetch, compile, size) = cold[cold.len() / 2];
    println!(
        "| cold invoke of a {:.2} MiB module (median of {COLD_CALLS}) | total {total:.1} ms = fetch {fetch:.1} ms + compile {compile:.1} ms + {:.1} ms rest |",
        size as f64 / f64::from(1 << 20),
        total - fetch - compile
    );
    for node in nodes {
        node.stop().await;
    }

    // Instantiation of a cached module.
    let executor = Executor::new(ExecutorConfig::new(&dir.path().join("executor"))).unwrap();
    let wasm = noop();
    let job = Job {
        memory_bytes: 128 << 20,
        ..Job::default()
    };
    // The executor blocks its thread, as it does in the node's `spawn_blocking`.
    let run = |job: Job| tokio::task::block_in_place(|| executor.run(&wasm, job).unwrap());
    run(job.clone());
    let mut instantiate = Vec::new();
    for _ in 0..INSTANTIATIONS {
        let outcome = run(job.clone());
        assert!(!outcome.timings.compiled);
        instantiate.push(outcome.timings.instantiate_us as f64);
    }
    let instantiate = sorted(instantiate);
    println!(
        "| instantiation of a cached module ({INSTANTIATIONS} runs) | p50 {:.0} µs, p99 {:.0} µs |",
        percentile(&instantiate, 0.5),
        percentile(&instantiate, 0.99)
    );

    throughput(
        &dir.path().join("throughput-rr"),
        false,
        ", calls by request-response",
    )
    .await;
    throughput(&dir.path().join("throughput"), true, "").await;
}

/// Invocations per second through one volunteer, calls on links if `links`; `how` is
/// added to the row's name.
async fn throughput(dir: &std::path::Path, links: bool, how: &str) {
    // Throughput of one volunteer.
    let nodes = network(dir, 3, ByteSize::gib(4), links).await;
    let module = nodes[0].overlay().add(&noop()[..]).await.unwrap().cid;
    invoke(&nodes[0], call(&module)).await;
    let started = Instant::now();
    let calls = (0..THROUGHPUT_CALLS).map(|_| {
        let market = nodes[0].market().clone();
        let c = call(&module);
        async move { market.invoke(c, None, None).await }
    });
    let results: Vec<_> = futures::StreamExt::collect(futures::StreamExt::buffer_unordered(
        futures::stream::iter(calls),
        CALLERS,
    ))
    .await;
    let seconds = started.elapsed().as_secs_f64();
    let ok = results.iter().filter(|r| r.is_ok()).count();
    // Why the others failed, most common first (each reason cut at its first ':').
    let mut reasons = std::collections::BTreeMap::<String, usize>::new();
    for error in results.iter().filter_map(|r| r.as_ref().err()) {
        let text = error.to_string();
        let reason = text.split(':').next().unwrap_or_default().to_string();
        *reasons.entry(reason).or_default() += 1;
    }
    let mut reasons: Vec<_> = reasons.into_iter().collect();
    reasons.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    let failures: Vec<String> = reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
    let failures = if failures.is_empty() {
        String::new()
    } else {
        format!("; failed: {}", failures.join(", "))
    };
    println!(
        "| invocations per second, one 4 GiB volunteer, {CALLERS} callers{how} | {:.0} /s ({ok} of {THROUGHPUT_CALLS} succeeded{failures}) |",
        ok as f64 / seconds
    );
    for node in nodes {
        node.stop().await;
    }
}

/// Memoized results, through the path `flotilla invoke` takes (`Market::invoke_replicated`):
/// the pure no-op, cheaper to run than to look up (under `memo_min_run`), called warm
/// again and again, so that after its first run it is neither looked up nor published;
/// then a pure matrix product of about 40 ms (`matmul --bench 384`) run warm with
/// `fresh`, answered from its memo, and with a distinct environment each time, so that
/// each call looks for a memo, finds none, runs and publishes its own.
async fn memoized(nodes: &[RunningNode]) {
    let noop = nodes[0].overlay().add(&noop()[..]).await.unwrap().cid;
    let matmul = nodes[0]
        .overlay()
        .add(&example("matmul")[..])
        .await
        .unwrap()
        .cid;
    let market = nodes[0].market();
    let timed = |c: FunctionCall, fresh: bool| async move {
        let started = Instant::now();
        let (invocation, _) = market
            .invoke_replicated(c, None, None, 1, fresh)
            .await
            .unwrap();
        (
            invocation.memoized,
            started.elapsed().as_secs_f64() * 1000.0,
        )
    };
    let product = || FunctionCall {
        args: vec!["--bench".into(), "384".into()],
        ..call(&matmul)
    };
    for _ in 0..5 {
        timed(call(&noop), false).await;
    }
    timed(product(), true).await;
    let mut cases: Vec<(String, Vec<f64>)> = Vec::new();
    let mut cheap = Vec::new();
    for _ in 0..WARM_CALLS {
        let (memoized, ms) = timed(call(&noop), false).await;
        assert!(!memoized);
        cheap.push(ms);
    }
    cases.push((
        format!(
            "the no-op ({WARM_CALLS} calls), under `memo_min_run`: neither looked up nor published"
        ),
        cheap,
    ));
    let mut warm = Vec::new();
    for _ in 0..MEMO_CALLS {
        let (memoized, ms) = timed(product(), true).await;
        assert!(!memoized);
        warm.push(ms);
    }
    cases.push((
        format!("`matmul --bench 384` ({MEMO_CALLS} calls) run warm (`--fresh`)"),
        warm,
    ));
    let mut memo = Vec::new();
    for _ in 0..MEMO_CALLS {
        let (memoized, ms) = timed(product(), false).await;
        assert!(memoized);
        memo.push(ms);
    }
    cases.push((
        format!("`matmul --bench 384` ({MEMO_CALLS} calls) answered from its memo"),
        memo,
    ));
    let mut missed = Vec::new();
    for i in 0..MEMO_CALLS {
        let c = FunctionCall {
            env: vec![("DISTINCT".into(), i.to_string())],
            ..product()
        };
        let (memoized, ms) = timed(c, false).await;
        assert!(!memoized);
        missed.push(ms);
    }
    cases.push((
        format!(
            "`matmul --bench 384` ({MEMO_CALLS} calls) not memoized yet: looked up, run, published"
        ),
        missed,
    ));
    for (case, times) in cases {
        let times = sorted(times);
        println!(
            "| memoized results, 5 nodes, through `flotilla invoke`'s path: {case} | p50 {:.2} ms, p99 {:.2} ms |",
            percentile(&times, 0.5),
            percentile(&times, 0.99)
        );
    }
}

/// Warm calls of the no-op on a 5-node network, one table row each for three cases;
/// `how` is added to each case's name.
async fn warm(nodes: &[RunningNode], how: &str) {
    let module = nodes[0].overlay().add(&noop()[..]).await.unwrap().cid;
    for _ in 0..20 {
        invoke(&nodes[0], call(&module)).await;
    }
    // Volunteers lending 1 GiB each make one offer each, in the 1 GiB tier: a call of
    // 128 MiB finds no offer in its own tier's region, a call of 1 GiB does. Warm, both
    // are placed on an offer its volunteer confirmed free in the answer to the call
    // before, with no probe; the exchanges each cost are counted. Last, the scheduler
    // invokes: a client that is a scheduler places its own calls.
    for (client, memory_mib, case) in [
        (0, 128, "128 MiB: its tier has no offers"),
        (0, 1024, "1 GiB: in the offers' tier"),
        (1, 1024, "1 GiB, the client a scheduler itself"),
    ] {
        let client: &RunningNode = &nodes[client];
        for _ in 0..5 {
            invoke(
                client,
                FunctionCall {
                    memory_mib,
                    ..call(&module)
                },
            )
            .await;
        }
        let mut totals = Vec::new();
        let mut discovery = Vec::new();
        let mut volunteer = Vec::new();
        let mut probes = Vec::new();
        let mut exchanges = Vec::new();
        let before = requests_received(nodes).await;
        for _ in 0..WARM_CALLS {
            let c = FunctionCall {
                memory_mib,
                ..call(&module)
            };
            let (invocation, ms) = invoke(client, c).await;
            totals.push(ms);
            discovery.push(invocation.discover_us as f64 / 1000.0);
            probes.push(f64::from(invocation.probes));
            exchanges.push(f64::from(invocation.exchanges));
            let t = invocation.execution.timings;
            volunteer.push(
                (t.fetch_us + t.load_us + t.instantiate_us + t.execute_us + t.store_us) as f64
                    / 1000.0,
            );
        }
        let after = requests_received(nodes).await;
        let (totals, discovery, volunteer) = (sorted(totals), sorted(discovery), sorted(volunteer));
        println!(
            "| warm invoke of a no-op, 5 nodes ({WARM_CALLS} calls), {case}{how} | p50 {:.2} ms, p99 {:.2} ms (median {:.0} probes, {:.0} exchanges; max {:.0} exchanges) |",
            percentile(&totals, 0.5),
            percentile(&totals, 0.99),
            percentile(&sorted(probes), 0.5),
            percentile(&sorted(exchanges.clone()), 0.5),
            percentile(&sorted(exchanges), 1.0)
        );
        println!(
            "| … of which discovery (probes and lookups, when made) | p50 {:.2} ms, p99 {:.2} ms |",
            percentile(&discovery, 0.5),
            percentile(&discovery, 0.99)
        );
        println!(
            "| … of which the volunteer (fetch check, load, instantiate, run, store) | p50 {:.2} ms, p99 {:.2} ms |",
            percentile(&volunteer, 0.5),
            percentile(&volunteer, 0.99)
        );
        println!(
            "| … requests received per call, all nodes, by protocol | {} |",
            per_call(&before, &after, WARM_CALLS)
        );
    }
}
