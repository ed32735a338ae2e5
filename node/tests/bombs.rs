//! DAG bombs on real nodes on loopback: a few blocks that name billions of empty leaves,
//! passed as a call's stdin, input or module, and fetched with `flotilla get`. Each must
//! fail quickly with a clear error, release the volunteer's reservation, and leave the
//! node serving.
#![allow(clippy::unwrap_used)]

mod common;

use bytes::Bytes;
use common::{example, wait_until};
use flotilla_node::daemon::RunningNode;
use flotilla_node::market::function::FunctionCall;
use flotilla_overlay::Cid;
use flotilla_overlay::block::{Block, DAG_PB};
use std::process::Command;
use std::time::{Duration, Instant};

const VOLUNTEERS: usize = 2;

/// Node 0 schedules and holds the bomb; nodes 1..=2 lend 512 MiB each.
async fn bomb_network() -> (tempfile::TempDir, Vec<RunningNode>) {
    common::function_network(VOLUNTEERS, Duration::from_secs(10), |_, c| c).await
}

fn varint(mut n: u64, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// A UnixFS file node (dag-pb) linking `n` times to `child`, declaring no size.
fn repeat_node(child: &Cid, n: usize) -> Block {
    let hash = child.to_bytes();
    let mut link = vec![0x0a];
    varint(hash.len() as u64, &mut link);
    link.extend_from_slice(&hash);
    let mut buf = Vec::with_capacity(n * (link.len() + 3) + 4);
    for _ in 0..n {
        buf.push(0x12);
        varint(link.len() as u64, &mut buf);
        buf.extend_from_slice(&link);
    }
    // Data: UnixFS { Type: File }.
    buf.extend_from_slice(&[0x0a, 0x02, 0x08, 0x02]);
    Block::encode(DAG_PB, Bytes::from(buf)).unwrap()
}

/// The empty raw block inlined in an identity CID: held by everyone, without a file.
fn empty_leaf() -> Cid {
    Cid::try_from(&[0x01u8, 0x55, 0x00, 0x00][..]).unwrap()
}

/// Stores on `node` the levels of a bomb, bottom up (each node linking `width` times to
/// the one below, the lowest to the empty leaf), and returns its root.
async fn plant(node: &RunningNode, widths: &[usize]) -> Cid {
    let mut child = empty_leaf();
    for &width in widths {
        let block = repeat_node(&child, width);
        child = *block.cid();
        node.overlay().store().put_async(block).await.unwrap();
    }
    child
}

fn call(module: &str) -> FunctionCall {
    FunctionCall {
        module: module.to_string(),
        memory_mib: 128,
        timeout_ms: Some(20_000),
        args: Vec::new(),
        env: Vec::new(),
        stdin: None,
        inputs: Vec::new(),
    }
}

async fn nothing_reserved(nodes: &[RunningNode]) -> bool {
    for n in nodes {
        if !n.market().offers().await.reservations.is_empty() {
            return false;
        }
    }
    true
}

/// Runs `call` from node 0 and expects it to fail as a DAG bomb, quickly. Tried again
/// while no offer fits: the scheduler hears of an offer freed by the last call a little
/// after the volunteer frees it.
async fn expect_bomb(nodes: &[RunningNode], call: FunctionCall, what: &str) {
    let give_up = Instant::now() + Duration::from_secs(10);
    let (err, took) = loop {
        let started = Instant::now();
        let err = match nodes[0].market().invoke(call.clone(), None, None).await {
            Ok(invocation) => panic!("{what}: the call ran: {invocation:?}"),
            Err(e) => e.to_string(),
        };
        if !err.contains("nothing fits") || Instant::now() > give_up {
            break (err, started.elapsed());
        }
    };
    assert!(err.contains("DAG bomb"), "{what}: {err}");
    assert!(!err.contains('\n'), "{what}: one line: {err}");
    // Well within the 10 s fetch deadline: the read limits, not the deadline, stopped it.
    assert!(took < Duration::from_secs(8), "{what}: took {took:?}");
    eprintln!("{what}: failed in {took:?}: {err}");
    wait_until("the bomb's reservation is released", || {
        nothing_reserved(nodes)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dag_bombs_fail_calls_quickly_free_their_reservations_and_fail_get() {
    let (_dir, nodes) = bomb_network().await;
    // Three levels of 8192 links to one empty leaf: 5.5 × 10^11 leaves in 0.7 MB.
    let bomb = plant(&nodes[0], &[8192; 3]).await.to_string();
    let echo = nodes[0]
        .overlay()
        .add(&example("echo")[..])
        .await
        .unwrap()
        .cid;
    let hello = nodes[0].overlay().add(&b"hello"[..]).await.unwrap().cid;

    let mut as_stdin = call(&echo);
    as_stdin.stdin = Some(bomb.clone());
    expect_bomb(&nodes, as_stdin, "stdin").await;
    let mut as_input = call(&echo);
    as_input.inputs = vec![("in.txt".into(), bomb.clone())];
    expect_bomb(&nodes, as_input, "input").await;
    expect_bomb(&nodes, call(&bomb), "module").await;

    // The volunteers are free again: an honest call runs (once the scheduler has heard
    // that the offers are free).
    let mut honest = call(&echo);
    honest.stdin = Some(hello);
    wait_until("an honest call runs after the bombs", || {
        let honest = honest.clone();
        let market = nodes[0].market().clone();
        async move {
            match market.invoke(honest, None, None).await {
                Ok(done) => done.execution.exit_code == 0,
                Err(e) => {
                    assert!(e.to_string().contains("nothing fits"), "{e}");
                    false
                }
            }
        }
    })
    .await;

    // `flotilla get` (the API's fetch, then cat) fails with one line, non-zero.
    let api = nodes[0].api_addr().to_string();
    let out = tempfile::tempdir().unwrap();
    let get = |cid: &str| {
        let started = Instant::now();
        let output = Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args(["get", cid, "--api", &api, "-o"])
            .arg(out.path().join("file"))
            .output()
            .unwrap();
        (output, started.elapsed())
    };
    let (output, took) = tokio::task::block_in_place(|| get(&bomb));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("DAG bomb"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(took < Duration::from_secs(8), "get took {took:?}");
    eprintln!("get: failed in {took:?}: {}", stderr.trim());
    assert!(!out.path().join("file").exists());

    // The bomb as first reported (50 000 links to one node of 200 000 links, 3.6 MB) is
    // refused by the decoder.
    let wide = plant(&nodes[0], &[200_000, 50_000]).await.to_string();
    let (output, _) = tokio::task::block_in_place(|| get(&wide));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("over the limit of 8192"), "{stderr}");

    // The node keeps serving.
    let (output, _) = tokio::task::block_in_place(|| get(&echo));
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
