//! Fetch throughput: a 64 MiB file between two nodes on loopback, beside raw TCP loopback
//! throughput measured in the same run. Prints a Markdown table; `scripts/bench` records it
//! in docs/benchmarks.md.
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use flotilla_node::demo::start_network;
use flotilla_overlay::Cid;
use flotilla_overlay::fetch::FetchProgress;
use rand::{RngCore, SeedableRng};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

const SIZE: usize = 64 * 1024 * 1024;
const RUNS: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn mb_per_s(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64() / 1e6
}

/// Raw TCP on loopback: one connection, 256 KiB writes, the reader counting bytes.
async fn raw_tcp() -> f64 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let reader = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0;
        while total < SIZE {
            total += socket.read(&mut buf).await.unwrap();
        }
    });
    let chunk = vec![7u8; 256 * 1024];
    let started = Instant::now();
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    for _ in 0..SIZE / chunk.len() {
        socket.write_all(&chunk).await.unwrap();
    }
    reader.await.unwrap();
    mb_per_s(SIZE, started.elapsed())
}

/// A fresh pair of nodes; a fresh random file added on the first, fetched on the second.
/// Returns the throughput, the blocks fetched, and the CPU time both nodes used.
async fn bitswap_fetch(seed: u64) -> (f64, u64, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let nodes = start_network(dir.path(), 2).await.unwrap();
    let mut data = vec![0u8; SIZE];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    let added = nodes[0].overlay().add(&data[..]).await.unwrap();
    let root = Cid::try_from(added.cid.as_str()).unwrap();
    let (tx, rx) = watch::channel(FetchProgress::default());
    let cpu0 = cpu();
    let started = Instant::now();
    nodes[1].overlay().fetch(root, &tx).await.unwrap();
    let elapsed = started.elapsed();
    let cpu_used = cpu() - cpu0;
    let blocks = rx.borrow().fetched_blocks;
    for node in nodes {
        node.stop().await;
    }
    (mb_per_s(SIZE, elapsed), blocks, cpu_used)
}

/// CPU time (user + system) this process has used so far: both nodes run in it.
fn cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut tcp = Vec::new();
        let mut fetch = Vec::new();
        let mut cpu_ms = Vec::new();
        let mut blocks = 0;
        for run in 0..RUNS {
            tcp.push(raw_tcp().await);
            let (rate, b, cpu_used) = bitswap_fetch(run as u64).await;
            fetch.push(rate);
            cpu_ms.push(cpu_used.as_secs_f64() * 1e3);
            blocks = b;
        }
        let (tcp, fetch, cpu_ms) = (median(tcp), median(fetch), median(cpu_ms));
        println!("| what (median of {RUNS} runs, 64 MiB) | MB/s |");
        println!("|---|---:|");
        println!("| raw TCP loopback, one connection | {tcp:.0} |");
        println!("| bitswap fetch between two nodes ({blocks} blocks) | {fetch:.0} |");
        println!("| ratio fetch / raw TCP | {:.3} |", fetch / tcp);
        println!("| CPU time of both nodes per 64 MiB fetch (ms) | {cpu_ms:.0} |");
    });
}
