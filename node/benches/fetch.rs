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
async fn bitswap_fetch(seed: u64, base: &std::path::Path) -> (f64, u64, Duration) {
    let dir = tempfile::tempdir_in(base).unwrap();
    let nodes = start_network(dir.path(), 2).await.unwrap();
    let mut data = vec![0u8; SIZE];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    let added = nodes[0].overlay().add(&data[..]).await.unwrap();
    let root = Cid::try_from(added.cid.as_str()).unwrap();
    let (tx, rx) = watch::channel(FetchProgress::default());
    let cpu0 = cpu();
    let started = Instant::now();
    nodes[1]
        .overlay()
        .fetch(root, &tx, &nodes[1].overlay().store().lease())
        .await
        .unwrap();
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
        let disk = std::env::temp_dir();
        let memory = std::path::Path::new("/dev/shm");
        let mut tcp = Vec::new();
        let (mut on_disk, mut on_disk_cpu) = (Vec::new(), Vec::new());
        let (mut in_memory, mut in_memory_cpu) = (Vec::new(), Vec::new());
        let mut blocks = 0;
        for run in 0..RUNS {
            tcp.push(raw_tcp().await);
            let (rate, b, cpu_used) = bitswap_fetch(run as u64, &disk).await;
            on_disk.push(rate);
            on_disk_cpu.push(cpu_used.as_secs_f64() * 1e3);
            blocks = b;
            if memory.is_dir() {
                let (rate, _, cpu_used) = bitswap_fetch(run as u64, memory).await;
                in_memory.push(rate);
                in_memory_cpu.push(cpu_used.as_secs_f64() * 1e3);
            }
        }
        let tcp = median(tcp);
        println!("| what (median of {RUNS} runs, 64 MiB, {blocks} blocks) | MB/s | ratio to raw TCP | CPU ms per fetch (both nodes) |");
        println!("|---|---:|---:|---:|");
        println!("| raw TCP loopback, one connection | {tcp:.0} | 1 | |");
        let (rate, cpu) = (median(on_disk), median(on_disk_cpu));
        println!(
            "| bitswap fetch, blockstores in {} | {rate:.0} | {:.3} | {cpu:.0} |",
            disk.display(),
            rate / tcp
        );
        if !in_memory.is_empty() {
            let (rate, cpu) = (median(in_memory), median(in_memory_cpu));
            println!("| bitswap fetch, blockstores in /dev/shm (tmpfs) | {rate:.0} | {:.3} | {cpu:.0} |", rate / tcp);
        }
    });
}
