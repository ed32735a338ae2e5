//! The blockstore: `add` of 1 GiB on one node (chunking, hashing, writing, the batched
//! fsync, pinning), and a store of 100,000 blocks opened (the index rebuilt from the
//! files and the database) and garbage-collected. On /tmp (a real disk). Prints a Markdown
//! table; `scripts/bench` records it in docs/benchmarks.md.
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use bytes::Bytes;
use flotilla_node::daemon;
use flotilla_node::demo::loopback_config;
use flotilla_overlay::block::{Block, RAW};
use flotilla_overlay::blockstore::Blockstore;
use rand::{RngCore, SeedableRng};
use std::time::Instant;

const GIB: usize = 1 << 30;
const BLOCKS: u64 = 100_000;

/// A reader of `len` pseudo-random bytes, made as they are read (no 1 GiB buffer).
struct RandomReader {
    rng: rand::rngs::StdRng,
    left: usize,
}

impl tokio::io::AsyncRead for RandomReader {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let n = buf.remaining().min(self.left);
        let mut chunk = vec![0u8; n];
        self.rng.fill_bytes(&mut chunk);
        buf.put_slice(&chunk);
        self.left -= n;
        std::task::Poll::Ready(Ok(()))
    }
}

async fn add_gib(pin: bool) -> f64 {
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let node = daemon::start(loopback_config(dir.path(), Vec::new()))
        .await
        .unwrap();
    let input = RandomReader {
        rng: rand::rngs::StdRng::seed_from_u64(u64::from(pin)),
        left: GIB,
    };
    let lease = node.overlay().store().lease();
    let started = Instant::now();
    let added = node.overlay().add_to(input, &lease, pin).await.unwrap();
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(added.size, GIB as u64);
    drop(lease);
    node.stop().await;
    seconds
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("| what | time | rate |");
    println!("|---|---:|---:|");
    for pin in [false, true] {
        let seconds = runtime.block_on(add_gib(pin));
        println!(
            "| `add` of 1 GiB ({}), fsync included | {:.2} s | {:.0} MB/s |",
            if pin { "pinned" } else { "cache" },
            seconds,
            GIB as f64 / seconds / 1e6
        );
    }

    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let store = Blockstore::open(dir.path(), 1 << 40).unwrap();
    let started = Instant::now();
    for i in 0..BLOCKS {
        let mut data = vec![0u8; 1024];
        data[..8].copy_from_slice(&i.to_le_bytes());
        store
            .put(&Block::encode(RAW, Bytes::from(data)).unwrap())
            .unwrap();
    }
    store.sync().unwrap();
    let put = started.elapsed().as_secs_f64();
    store.close().unwrap();
    drop(store);
    println!(
        "| put 100,000 blocks of 1 KiB, then one sync | {put:.2} s | {:.0} blocks/s |",
        BLOCKS as f64 / put
    );
    let started = Instant::now();
    let store = Blockstore::open(dir.path(), 1 << 40).unwrap();
    let open = started.elapsed().as_secs_f64();
    assert_eq!(store.stats().blocks, BLOCKS);
    println!(
        "| open a store of 100,000 blocks (index rebuilt) | {:.0} ms | |",
        open * 1e3
    );
    let started = Instant::now();
    let report = store.gc().unwrap();
    let gc = started.elapsed().as_secs_f64();
    assert_eq!(report.blocks, BLOCKS);
    println!(
        "| `gc` of 100,000 blocks | {gc:.2} s | {:.0} blocks/s |",
        BLOCKS as f64 / gc
    );
}
