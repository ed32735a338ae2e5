//! The cost of verified results, on a loopback network of real nodes (a client, a
//! scheduler, three volunteers): a warm invoke of a no-op with one replica beside the
//! same call with three (run one after another on three distinct volunteers, their
//! receipts compared), and the ratio; and the cost of one receipt alone — signing it on
//! the volunteer and checking it (the scheduler and the client each check it once).
//!
//! Prints a Markdown table; `scripts/bench replicas` records it in docs/benchmarks.md.
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use bytesize::ByteSize;
use flotilla_node::config::NodeConfig;
use flotilla_node::daemon::RunningNode;
use flotilla_node::demo::start_network_with;
use flotilla_node::market::function::{
    Execution, ExecutionTimings, FunctionCall, OutputFile, OutputStream,
};
use flotilla_node::market::receipt::{Receipt, ReceiptBody, StreamDigest, args_digest};
use libp2p::identity::Keypair;
use std::time::{Duration, Instant};

const CALLS: usize = 100;
const RECEIPTS: usize = 2000;

fn noop() -> Vec<u8> {
    std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/wasm/noop.wasm"
    ))
    .unwrap()
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

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn sorted(mut values: Vec<f64>) -> Vec<f64> {
    values.sort_by(f64::total_cmp);
    values
}

/// Node 0 is the client, node 1 the scheduler, nodes 2..5 lend 1 GiB each.
async fn network(dir: &std::path::Path) -> Vec<RunningNode> {
    let nodes = start_network_with(dir, 5, |i, config| {
        let config = NodeConfig {
            notify_interval: Duration::from_millis(200),
            ..config
        };
        match i {
            0 => config,
            1 => NodeConfig {
                scheduler: true,
                ..config
            },
            _ => NodeConfig {
                offer_memory: Some(ByteSize::gib(1)),
                ..config
            },
        }
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while nodes[1].market().offers().await.super_traders < 3 {
        assert!(
            Instant::now() < deadline,
            "offers did not reach the scheduler"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    nodes
}

/// Milliseconds each of `CALLS` warm calls with `replicas` took, sorted.
async fn warm(client: &RunningNode, module: &str, replicas: u32) -> Vec<f64> {
    let market = client.market();
    for _ in 0..5 {
        market
            .invoke_replicated(call(module), None, None, replicas, true)
            .await
            .unwrap();
    }
    let mut ms = Vec::with_capacity(CALLS);
    for _ in 0..CALLS {
        let started = Instant::now();
        let (invocation, report) = market
            .invoke_replicated(call(module), None, None, replicas, true)
            .await
            .unwrap();
        ms.push(started.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(invocation.execution.exit_code, 0);
        if replicas > 1 {
            assert!(report.unwrap().dissenters.is_empty());
        }
    }
    sorted(ms)
}

/// Microseconds to sign a receipt, and to check one, each sorted.
fn receipt_costs() -> (Vec<f64>, Vec<f64>) {
    let keypair = Keypair::generate_ed25519();
    let cid = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku";
    let c = call(cid);
    let stdout = OutputStream {
        size: 6,
        inline: b"hello\n".to_vec(),
        cid: None,
    };
    let mut execution = Execution {
        volunteer: keypair.public().to_peer_id().to_string(),
        exit_code: 0,
        stdout: stdout.clone(),
        stderr: OutputStream::default(),
        outputs: vec![OutputFile {
            name: "out".into(),
            cid: cid.into(),
            size: 1,
        }],
        failure: None,
        memory_mib: 128,
        timings: ExecutionTimings::default(),
        receipt: None,
    };
    let (mut sign, mut check) = (Vec::new(), Vec::new());
    for i in 0..RECEIPTS {
        let started = Instant::now();
        let body = ReceiptBody {
            volunteer: keypair.public().to_peer_id(),
            scheduler: keypair.public().to_peer_id(),
            invocation_id: i as u64,
            reservation_id: 1,
            module: c.module.clone(),
            inputs: c.inputs.clone(),
            args_digest: args_digest(&c),
            memory_mib: 128,
            exit_code: 0,
            failure: None,
            stdout: StreamDigest::of(&stdout.inline, &stdout),
            stderr: StreamDigest::of(&[], &OutputStream::default()),
            outputs: execution.outputs.clone(),
            timings: ExecutionTimings::default(),
            pure: false,
            signed_at_ms: 0,
        };
        let receipt = Receipt::sign(body, &keypair);
        sign.push(started.elapsed().as_secs_f64() * 1e6);
        let started = Instant::now();
        receipt.check(i as u64, &c, &execution).unwrap();
        check.push(started.elapsed().as_secs_f64() * 1e6);
        execution.receipt = Some(Box::new(receipt));
    }
    (sorted(sign), sorted(check))
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    println!("| measurement | result |");
    println!("|---|---|");
    let (sign, check) = receipt_costs();
    println!(
        "| a receipt: signing it (volunteer), checking it (the client, once a call), {RECEIPTS} each | sign p50 {:.0} µs, check p50 {:.0} µs (p99 {:.0} / {:.0} µs) |",
        percentile(&sign, 0.5),
        percentile(&check, 0.5),
        percentile(&sign, 0.99),
        percentile(&check, 0.99)
    );
    let nodes = network(dir.path()).await;
    let module = nodes[0].overlay().add(&noop()[..]).await.unwrap().cid;
    let one = warm(&nodes[0], &module, 1).await;
    let three = warm(&nodes[0], &module, 3).await;
    let (p1, p3) = (percentile(&one, 0.5), percentile(&three, 0.5));
    println!(
        "| warm invoke of a no-op, 5 nodes ({CALLS} calls), replicas = 1 | p50 {p1:.2} ms, p99 {:.2} ms |",
        percentile(&one, 0.99)
    );
    println!(
        "| … replicas = 3 (three volunteers, one after another, receipts compared) | p50 {p3:.2} ms, p99 {:.2} ms: {:.2}× replicas = 1 |",
        percentile(&three, 0.99),
        p3 / p1
    );
    for node in nodes {
        node.stop().await;
    }
}
