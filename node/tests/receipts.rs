//! Signed receipts and replicated calls end to end, on a loopback network of real nodes:
//! one scheduler (the client) and four volunteers, one of which lies — it is built from
//! the node's own code with the test-only `tamper_stdout` set, so it alters the stdout of
//! every call it runs and signs the altered answer. Every answer carries a receipt that
//! verifies; a call with `replicas = 3` runs on three, and the liar is outvoted and
//! named with its receipt. A fourth volunteer signs its receipts with another key than
//! its own: the scheduler refuses them, so no replica counts it. Last, a client that is
//! not the scheduler: the scheduler leaves the signature to it (checking it only after
//! it answered), the client refuses the forger's answer and asks again without it, and
//! the scheduler forgets the forger.
#![allow(clippy::unwrap_used)]

mod common;

use common::example;
use flotilla_node::api::client::ApiClient;
use flotilla_node::api::types::InvokeBody;
use flotilla_node::config::NodeConfig;
use flotilla_node::daemon::RunningNode;
use flotilla_node::market::function::FunctionCall;
use flotilla_node::market::protocol::{InvokeRequest, Request, Response};
use std::time::Duration;

const VOLUNTEERS: usize = 4;
/// The volunteer that lies (and signs its lie).
const LIAR: usize = 3;
/// The volunteer whose receipts do not verify.
const FORGER: usize = 4;

/// Node 0 schedules (and is the client); nodes 1..=4 lend 512 MiB each, node 3 lies,
/// node 4 answers with receipts that do not verify.
async fn network() -> (tempfile::TempDir, Vec<RunningNode>) {
    common::function_network(VOLUNTEERS, Duration::from_secs(3), |i, config| NodeConfig {
        tamper_stdout: i == LIAR,
        forge_receipts: i == FORGER,
        ..config
    })
    .await
}

fn body(module: &str, replicas: Option<u32>) -> InvokeBody {
    InvokeBody {
        call: FunctionCall {
            module: module.to_string(),
            memory_mib: 128,
            timeout_ms: Some(20_000),
            args: vec!["hello".into()],
            env: Vec::new(),
            stdin: None,
            inputs: Vec::new(),
        },
        max_tries: None,
        placement: None,
        replicas,
        fresh: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_carry_receipts_and_a_lying_volunteer_is_outvoted_and_named() {
    let (_dir, nodes) = network().await;
    let echo = nodes[0]
        .overlay()
        .add(&example("echo")[..])
        .await
        .unwrap()
        .cid;
    let api = ApiClient::new(nodes[0].api_addr());
    let liar = nodes[LIAR].peer_id().to_string();

    // A plain call: its answer carries the volunteer's receipt, which verifies, names the
    // volunteer that ran it, and matches the call; the API's JSON shows it.
    let reply = api.invoke(&body(&echo, None)).await.unwrap();
    let execution = &reply.invocation.execution;
    let receipt = execution.receipt.as_deref().expect("a receipt");
    receipt
        .check(
            reply.invocation.invocation_id,
            &body(&echo, None).call,
            execution,
        )
        .unwrap();
    assert_eq!(receipt.body.volunteer.to_string(), execution.volunteer);
    assert_eq!(receipt.body.scheduler, nodes[0].peer_id());
    assert!(reply.replicas.is_none());
    let json = serde_json::to_value(&reply).unwrap();
    assert!(
        json["execution"]["receipt"]["signature"].is_string(),
        "{json}"
    );

    // Three replicas: one on each volunteer; the two honest ones agree, the liar is
    // outvoted and named, with its receipt showing what it signed.
    let reply = api.invoke(&body(&echo, Some(3))).await.unwrap();
    let execution = &reply.invocation.execution;
    assert_eq!(execution.stdout.inline, b"hello\n");
    assert_ne!(execution.volunteer, liar);
    let report = reply.replicas.expect("a replica report");
    assert_eq!(report.replicas, 3);
    assert!(report.majority);
    assert_eq!(report.dissenters, vec![liar.clone()]);
    assert_eq!(report.sides.len(), 2);
    assert_eq!(report.sides[0].volunteers.len(), 2);
    let outvoted = &report.sides[1];
    assert_eq!(outvoted.volunteers, vec![liar.clone()]);
    let signed = &outvoted.receipts[0];
    signed.verify_from(&liar).unwrap();
    assert_ne!(
        signed.body.stdout.sha256,
        report.sides[0].answer.stdout_sha256
    );

    // A fourth replica can only go to the volunteer whose receipt does not verify: the
    // scheduler refuses the answer, names it, and finds nobody else — or,
    // if an earlier call met the forger already, the scheduler forgot it then (its
    // fallback list drops a volunteer whose receipt is bad) and finds nobody at all.
    let forger = nodes[FORGER].peer_id().to_string();
    let error = api.invoke(&body(&echo, Some(4))).await.unwrap_err();
    let error = error.to_string();
    assert!(error.contains("replica 4 of 4"), "{error}");
    if error.contains(&forger) {
        assert!(
            error.contains("the receipt's signature does not verify"),
            "{error}"
        );
    } else {
        assert!(error.contains("found none"), "{error}");
        assert_eq!(
            nodes[0].market().offers().await.super_traders,
            VOLUNTEERS - 1,
            "the forger is off the scheduler's list"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_client_refuses_a_forged_receipt_and_the_scheduler_forgets_its_volunteer() {
    // Node 0 schedules; node 1 forges its receipts and lends the least, so best fit
    // places on it first; nodes 2 and 3 are honest, and node 3 is the client.
    const FORGER: usize = 1;
    const CLIENT: usize = 3;
    let (_dir, nodes) =
        common::function_network(3, Duration::from_secs(3), |i, config| NodeConfig {
            forge_receipts: i == FORGER,
            offer_memory: match i {
                0 => None,
                FORGER => Some(bytesize::ByteSize::mib(256)),
                _ => Some(bytesize::ByteSize::mib(512)),
            },
            ..config
        })
        .await;
    let echo = nodes[CLIENT]
        .overlay()
        .add(&example("echo")[..])
        .await
        .unwrap()
        .cid;
    let forger = nodes[FORGER].peer_id().to_string();
    let api = ApiClient::new(nodes[CLIENT].api_addr());

    // The scheduler passes the forger's answer on unchecked; the client refuses it, asks
    // again without the forger, and gets an honest answer, with the refusal among the
    // failed attempts.
    let reply = api.invoke(&body(&echo, None)).await.unwrap();
    let invocation = &reply.invocation;
    assert_eq!(invocation.scheduler, nodes[0].peer_id().to_string());
    assert_eq!(invocation.execution.stdout.inline, b"hello\n");
    assert_ne!(invocation.execution.volunteer, forger);
    let refusal = invocation
        .failed_attempts
        .iter()
        .find(|a| a.volunteer == forger)
        .expect("the forger's answer was refused");
    assert!(
        refusal.error.contains("signature does not verify"),
        "{refusal:?}"
    );
    // The client reported the refusal; the scheduler checked the receipt it passed on
    // (not the client's word), found it forged, and forgot the forger.
    let forged = "flotilla_invocations_receipt_reports_total{reason=\"forged\"}";
    common::wait_until("the scheduler checks the refused receipt", || async {
        common::metric(&nodes[0], forged).await == 1.0
    })
    .await;
    assert_eq!(nodes[0].market().offers().await.super_traders, 2);

    // A client that reports an honest answer as refused frames nobody: the scheduler's
    // copy verifies, and the volunteer stays.
    let mut liar = common::RawPeer::connect(&nodes[0]).await;
    let invoke = |invocation_id, refused| {
        Request::Invoke(Box::new(InvokeRequest {
            invocation_id,
            call: body(&echo, None).call,
            max_tries: None,
            placement: None,
            exclude: Vec::new(),
            refused,
        }))
    };
    let answer = liar.ask(&nodes[0], 1, invoke(41, None)).await;
    assert!(matches!(answer, Response::Invoked(_)), "{answer:?}");
    let answer = liar.ask(&nodes[0], 2, invoke(42, Some(41))).await;
    assert!(matches!(answer, Response::Invoked(_)), "{answer:?}");
    let valid = "flotilla_invocations_receipt_reports_total{reason=\"valid\"}";
    common::wait_until(
        "the scheduler checks the falsely refused receipt",
        || async { common::metric(&nodes[0], valid).await == 1.0 },
    )
    .await;
    assert_eq!(nodes[0].market().offers().await.super_traders, 2);
    assert_eq!(common::metric(&nodes[0], forged).await, 1.0);
}
