//! Memoized results end to end, on a loopback network of real nodes: node 0 schedules
//! and is the client, nodes 1..=3 lend memory. A pure call asked again is answered from
//! its memo — no volunteer runs anything (their execution counters stay put) and the
//! outputs are the same —, from the client's own book and, for another client, from the
//! peers closest to the call's digest. A call that reads the clock runs every time;
//! `fresh` runs again; a forged memo is refused by the keepers, and a lie signed by a
//! stranger contests the call so that it runs again. Under `--replicas` the outvoted
//! volunteer's answer is never served, even once it publishes it itself, and a
//! replicated call always runs.
#![allow(clippy::unwrap_used)]

mod common;

use common::{RawPeer, example, metric};
use flotilla_node::api::client::ApiClient;
use flotilla_node::api::types::{InvokeBody, InvokeReply};
use flotilla_node::config::NodeConfig;
use flotilla_node::daemon::RunningNode;
use flotilla_node::market::function::{Execution, FunctionCall, OutputStream};
use flotilla_node::market::memos::{Memo, call_digest};
use flotilla_node::market::protocol::{MemoAnswer, Request, Response};
use flotilla_node::market::receipt::{Receipt, StreamDigest, sha256_hex};
use std::time::Duration;

const VOLUNTEERS: usize = 3;

/// Reads the wall clock, then writes "tick\n".
const READS_THE_CLOCK: &str = r#"
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "tick\n")
  (func (export "_start")
    (drop (call $clock (i32.const 0) (i64.const 1) (i32.const 64)))
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 5))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
"#;

/// Memoizes every pure run, however short (the examples take well under the default
/// `memo_min_run`).
fn every_run(_: usize, config: NodeConfig) -> NodeConfig {
    NodeConfig {
        memo_min_run: Duration::ZERO,
        ..config
    }
}

/// Calls the volunteers ran, in all.
async fn executed(nodes: &[RunningNode]) -> f64 {
    let mut total = 0.0;
    for node in &nodes[1..] {
        total += metric(node, "flotilla_invocations_executed_total").await;
    }
    total
}

fn body(call: &FunctionCall, replicas: Option<u32>, fresh: bool) -> InvokeBody {
    InvokeBody {
        call: call.clone(),
        max_tries: None,
        placement: None,
        replicas,
        fresh,
    }
}

fn call(module: &str, args: &[&str]) -> FunctionCall {
    FunctionCall {
        module: module.to_string(),
        memory_mib: 128,
        timeout_ms: Some(20_000),
        args: args.iter().map(|a| a.to_string()).collect(),
        env: Vec::new(),
        stdin: None,
        inputs: Vec::new(),
    }
}

/// Whether any node but the client keeps memos of `call`.
async fn kept_by_a_keeper(
    nodes: &[RunningNode],
    asker: &mut [RawPeer],
    call: &FunctionCall,
) -> bool {
    let digest = call_digest(call);
    for (i, node) in nodes.iter().enumerate().skip(1) {
        let answer = asker[i].ask(node, 1, Request::FindMemo { digest }).await;
        if matches!(answer, Response::Memos(MemoAnswer::Agreed(ref m)) if !m.is_empty()) {
            return true;
        }
    }
    false
}

/// Sends `memo` to every node as a stranger would; answers what each said.
async fn store_everywhere(
    nodes: &[RunningNode],
    peers: &mut [RawPeer],
    memo: &Memo,
) -> Vec<Response> {
    let mut answers = Vec::new();
    for (node, peer) in nodes.iter().zip(peers.iter_mut()) {
        answers.push(
            peer.ask(node, 2, Request::StoreMemo(Box::new(memo.clone())))
                .await,
        );
    }
    answers
}

/// `reply`'s answer re-signed by `keypair` in its own name with `stdout` in place of the
/// true one: a lie any stranger can sign.
fn lie_signed_by(reply: &InvokeReply, keypair: &libp2p::identity::Keypair, stdout: &[u8]) -> Memo {
    let mut execution: Execution = reply.invocation.execution.clone();
    let mut body = execution.receipt.as_ref().unwrap().body.clone();
    execution.volunteer = keypair.public().to_peer_id().to_string();
    execution.stdout = OutputStream {
        size: stdout.len() as u64,
        inline: stdout.to_vec(),
        cid: None,
    };
    body.volunteer = keypair.public().to_peer_id();
    body.stdout = StreamDigest::of(stdout, &execution.stdout);
    execution.receipt = Some(Box::new(Receipt::sign(body, keypair)));
    Memo { execution }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pure_call_is_answered_from_its_memo_and_a_clock_reading_one_runs_again() {
    let (_dir, nodes) =
        common::function_network(VOLUNTEERS, Duration::from_secs(5), every_run).await;
    let api = ApiClient::new(nodes[0].api_addr());
    let wordcount = nodes[0]
        .overlay()
        .add(&example("wordcount")[..])
        .await
        .unwrap()
        .cid;
    let words = nodes[0]
        .overlay()
        .add(&b"one two two three three three\n"[..])
        .await
        .unwrap()
        .cid;
    let mut count = call(&wordcount.to_string(), &["words.txt"]);
    count.inputs = vec![("words.txt".into(), words.to_string())];

    let first = api.invoke(&body(&count, None, false)).await.unwrap();
    assert!(!first.invocation.memoized);
    assert_eq!(first.invocation.execution.outputs.len(), 1, "counts.txt");
    assert!(
        first
            .invocation
            .execution
            .receipt
            .as_ref()
            .unwrap()
            .body
            .pure
    );
    assert_eq!(executed(&nodes).await, 1.0);

    // Asked again: answered from the memo, nothing runs, the same outputs.
    let again = api.invoke(&body(&count, None, false)).await.unwrap();
    assert!(again.invocation.memoized);
    assert_eq!(again.invocation.execution, first.invocation.execution);
    assert_eq!(executed(&nodes).await, 1.0, "a memoized call runs nothing");

    // --fresh runs it again.
    let fresh = api.invoke(&body(&count, None, true)).await.unwrap();
    assert!(!fresh.invocation.memoized);
    assert_eq!(
        fresh.invocation.execution.stdout,
        first.invocation.execution.stdout
    );
    assert_eq!(executed(&nodes).await, 2.0);

    // Another client finds it at the peers closest to the call's digest, and fetches
    // the output file before it takes the answer.
    let mut askers = Vec::new();
    for node in &nodes {
        askers.push(RawPeer::connect(node).await);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !kept_by_a_keeper(&nodes, &mut askers, &count).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no keeper took the memo"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let other = ApiClient::new(nodes[3].api_addr());
    let elsewhere = other.invoke(&body(&count, None, false)).await.unwrap();
    assert!(elsewhere.invocation.memoized);
    assert_eq!(
        elsewhere.invocation.execution.outputs,
        first.invocation.execution.outputs
    );
    let counts: cid::Cid = first.invocation.execution.outputs[0].cid.parse().unwrap();
    assert!(
        nodes[3].overlay().store().has(&counts),
        "the output was fetched"
    );
    assert_eq!(executed(&nodes).await, 2.0);

    // A call that reads the clock runs every time, although it prints the same.
    let clock = nodes[0]
        .overlay()
        .add(&wat::parse_str(READS_THE_CLOCK).unwrap()[..])
        .await
        .unwrap()
        .cid;
    let tick = call(&clock.to_string(), &[]);
    for _ in 0..2 {
        let reply = api.invoke(&body(&tick, None, false)).await.unwrap();
        assert_eq!(reply.invocation.execution.stdout.inline, b"tick\n");
        assert!(!reply.invocation.memoized);
        let receipt = reply.invocation.execution.receipt.as_ref().unwrap();
        assert!(!receipt.body.pure);
    }
    assert_eq!(executed(&nodes).await, 4.0);

    // A forged memo (its volunteer's name, another key's signature) is refused by the
    // keepers.
    let volunteer_name = first.invocation.execution.volunteer.clone();
    let mut forged = lie_signed_by(
        &first,
        &libp2p::identity::Keypair::generate_ed25519(),
        b"forged\n",
    );
    forged.execution.volunteer = volunteer_name.clone();
    forged.execution.receipt.as_mut().unwrap().body.volunteer = volunteer_name.parse().unwrap();
    for answer in store_everywhere(&nodes, &mut askers, &forged).await {
        match answer {
            Response::Refused { reason } => assert!(reason.contains("signature"), "{reason}"),
            other => panic!("a forged memo was taken: {other:?}"),
        }
    }
    let still = api.invoke(&body(&count, None, false)).await.unwrap();
    assert!(still.invocation.memoized);
    assert_eq!(
        still.invocation.execution.stdout,
        first.invocation.execution.stdout
    );

    // A lie validly signed by a stranger contests the call: nobody serves either answer,
    // and the call runs again, truthfully.
    let stranger = libp2p::identity::Keypair::generate_ed25519();
    let lie = lie_signed_by(&first, &stranger, b"lie\n");
    for answer in store_everywhere(&nodes, &mut askers, &lie).await {
        assert!(matches!(answer, Response::MemoStored), "{answer:?}");
    }
    let contested = api.invoke(&body(&count, None, false)).await.unwrap();
    assert!(!contested.invocation.memoized);
    assert_eq!(
        contested.invocation.execution.stdout,
        first.invocation.execution.stdout
    );
    assert_eq!(executed(&nodes).await, 5.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_outvoted_under_replicas_is_never_served() {
    // Node 3 lies (and signs its lie as pure).
    const LIAR: usize = 3;
    let (_dir, nodes) =
        common::function_network(VOLUNTEERS, Duration::from_secs(5), |i, config| NodeConfig {
            tamper_stdout: i == LIAR,
            ..every_run(i, config)
        })
        .await;
    let api = ApiClient::new(nodes[0].api_addr());
    let echo = nodes[0]
        .overlay()
        .add(&example("echo")[..])
        .await
        .unwrap()
        .cid;
    let hello = call(&echo.to_string(), &["hello"]);
    let liar = nodes[LIAR].peer_id().to_string();

    let voted = api.invoke(&body(&hello, Some(3), false)).await.unwrap();
    let report = voted.replicas.clone().unwrap();
    assert_eq!(report.dissenters, vec![liar.clone()]);
    assert_eq!(executed(&nodes).await, 3.0);

    // The majority's answer is memoized: a plain call is answered from it.
    let reply = api.invoke(&body(&hello, None, false)).await.unwrap();
    assert!(reply.invocation.memoized);
    assert_eq!(reply.invocation.execution.stdout.inline, b"hello\n");
    assert_ne!(reply.invocation.execution.volunteer, liar);
    assert_eq!(executed(&nodes).await, 3.0);
    // A replicated call always runs: memos' signers cost nothing to make, so their
    // agreement proves nothing to it.
    let again = api.invoke(&body(&hello, Some(3), false)).await.unwrap();
    assert!(!again.invocation.memoized);
    assert_eq!(executed(&nodes).await, 6.0);

    // The liar publishes its own answer: the call is contested, and runs again rather
    // than be answered by it.
    let signed = report.sides[1].receipts[0].clone();
    let mut lied = b"hello\n".to_vec();
    lied.extend_from_slice(b"\n(altered by a lying volunteer)\n");
    assert_eq!(signed.body.stdout.sha256, sha256_hex(&lied));
    let mut execution = voted.invocation.execution.clone();
    execution.volunteer = liar.clone();
    execution.stdout = OutputStream {
        size: lied.len() as u64,
        inline: lied,
        cid: None,
    };
    execution.timings = signed.body.timings;
    execution.receipt = Some(Box::new(signed));
    let memo = Memo { execution };
    let mut peers = Vec::new();
    for node in &nodes {
        peers.push(RawPeer::connect(node).await);
    }
    for answer in store_everywhere(&nodes, &mut peers, &memo).await {
        assert!(matches!(answer, Response::MemoStored), "{answer:?}");
    }
    let reply = api.invoke(&body(&hello, None, false)).await.unwrap();
    assert!(!reply.invocation.memoized);
    assert_eq!(executed(&nodes).await, 7.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_cheaper_than_a_lookup_is_not_memoized() {
    // The default `memo_min_run` (10 ms): echo runs in well under it.
    let (_dir, nodes) =
        common::function_network(VOLUNTEERS, Duration::from_secs(5), |_, c| c).await;
    let api = ApiClient::new(nodes[0].api_addr());
    let echo = nodes[0]
        .overlay()
        .add(&example("echo")[..])
        .await
        .unwrap()
        .cid;
    let hello = call(&echo.to_string(), &["hello"]);
    for _ in 0..2 {
        let reply = api.invoke(&body(&hello, None, false)).await.unwrap();
        assert!(!reply.invocation.memoized);
        let timings = reply
            .invocation
            .execution
            .receipt
            .as_ref()
            .unwrap()
            .body
            .timings;
        assert!(timings.instantiate_us + timings.execute_us < 10_000);
    }
    assert_eq!(executed(&nodes).await, 2.0);
}
