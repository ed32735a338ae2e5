//! State that outlives a restart, on real nodes on loopback: a scheduler killed while
//! its detached job waits for an offer, and started again on its data dir, carries the
//! job on under the same id until it runs; a peer keeping another scheduler's job record,
//! killed and started again, still keeps it.
#![allow(clippy::unwrap_used)]

mod common;

use bytesize::ByteSize;
use common::{example, quick, wait_until, wait_until_within};
use flotilla_node::config::NodeConfig;
use flotilla_node::daemon;
use flotilla_node::demo;
use flotilla_node::market::Market;
use flotilla_node::market::function::FunctionCall;
use flotilla_node::market::jobs::JobState;
use std::time::Duration;

async fn job_is(market: &Market, id: u64, state: JobState) -> bool {
    market.job(id).await.is_ok_and(|r| r.state == state)
}

/// Starts the scheduler, node 0 of the network in `dir`, again on its data dir, joined
/// through `peer`.
async fn restart_scheduler(
    dir: &std::path::Path,
    peer: &daemon::RunningNode,
) -> daemon::RunningNode {
    let config = demo::loopback_config(&dir.join("node-0"), vec![peer.bootstrap_addr()]);
    daemon::start(NodeConfig {
        scheduler: true,
        ..quick(config, Duration::from_secs(5))
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_restarted_mid_job_carries_it_on_under_the_same_id() {
    let dir = tempfile::tempdir().unwrap();
    let fetch = Duration::from_secs(5);
    let mut nodes = demo::start_network_with(dir.path(), 3, |i, config| match i {
        0 => NodeConfig {
            scheduler: true,
            ..quick(config, fetch)
        },
        _ => NodeConfig {
            offer_memory: Some(ByteSize::mib(256)),
            ..quick(config, fetch)
        },
    })
    .await
    .unwrap();
    let echo = nodes[0]
        .overlay()
        .add(&example("echo")[..])
        .await
        .unwrap()
        .cid;
    // Nothing lends 1 GiB yet: the job waits.
    let call = FunctionCall {
        module: echo,
        memory_mib: 1024,
        timeout_ms: Some(10_000),
        args: vec!["after".into(), "a".into(), "restart".into()],
        env: Vec::new(),
        stdin: None,
        inputs: Vec::new(),
    };
    let id = nodes[0]
        .market()
        .submit(call, None, None, Duration::from_secs(300))
        .await
        .unwrap();
    wait_until("the job waits for an offer", || {
        job_is(nodes[0].market(), id, JobState::Waiting)
    })
    .await;
    let before = nodes[0].market().job(id).await.unwrap();

    // The scheduler crashes (its job still waiting) and starts again on its data dir.
    let scheduler = nodes.remove(0);
    let peer_id = scheduler.peer_id();
    scheduler.kill().await;
    let scheduler = restart_scheduler(dir.path(), &nodes[0]).await;
    assert_eq!(scheduler.peer_id(), peer_id);
    assert_eq!(scheduler.market().jobs_held(), 1, "the job is carried on");
    wait_until("the carried-on job publishes newer versions", || async {
        let record = scheduler.market().job(id).await.unwrap();
        record.seq > before.seq
            && record
                .error
                .as_deref()
                .is_some_and(|e| e.contains("restarted") || e.contains("nothing fits"))
    })
    .await;

    // A volunteer lending 2 GiB joins: the job runs there, under the same id.
    let late = daemon::start(NodeConfig {
        offer_memory: Some(ByteSize::gib(2)),
        ..quick(
            demo::loopback_config(&dir.path().join("late"), vec![scheduler.bootstrap_addr()]),
            fetch,
        )
    })
    .await
    .unwrap();
    wait_until_within("the job ran", Duration::from_secs(60), || {
        job_is(scheduler.market(), id, JobState::Done)
    })
    .await;
    let done = scheduler.market().job(id).await.unwrap();
    let result = done.result.unwrap();
    assert_eq!(result.execution.volunteer, late.peer_id().to_string());
    assert_eq!(result.execution.stdout.inline, b"after a restart\n");
    // Another node reads the same record, and the ended job is no longer carried.
    assert_eq!(
        nodes[0].market().job(id).await.unwrap().state,
        JobState::Done
    );
    wait_until("the ended job is let go", || async {
        scheduler.market().jobs_held() == 0
    })
    .await;
    scheduler.stop().await;
    // Started again, it has nothing left to carry on.
    let scheduler = restart_scheduler(dir.path(), &nodes[0]).await;
    assert_eq!(scheduler.market().jobs_held(), 0);
    scheduler.stop().await;
    late.stop().await;
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keeper_restarted_on_its_data_dir_still_keeps_the_job_records_it_held() {
    let dir = tempfile::tempdir().unwrap();
    let fetch = Duration::from_secs(5);
    // Node 0 schedules; nodes 1 and 2 keep its job records; nothing lends memory.
    let mut nodes = demo::start_network_with(dir.path(), 3, |i, config| NodeConfig {
        scheduler: i == 0,
        ..quick(config, fetch)
    })
    .await
    .unwrap();
    let call = FunctionCall {
        module: "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku".into(),
        memory_mib: 128,
        timeout_ms: None,
        args: Vec::new(),
        env: Vec::new(),
        stdin: None,
        inputs: Vec::new(),
    };
    let id = nodes[0]
        .market()
        .submit(call, None, None, Duration::from_secs(300))
        .await
        .unwrap();
    let keeper = nodes.remove(1);
    wait_until("the keeper holds the job's record", || {
        let market = keeper.market().clone();
        async move { market.job_kept_here(id).await.is_some() }
    })
    .await;
    let held = keeper.market().job_kept_here(id).await.unwrap();
    // The record is in the book before it is durable (the keeper answers the scheduler
    // only after): wait for the write, as the scheduler's answer would.
    keeper.market().flush_records().await;

    // The keeper crashes and starts again on its data dir: the record is back in its
    // book before it serves anyone (at least the version it held).
    keeper.kill().await;
    let config = demo::loopback_config(&dir.path().join("node-1"), vec![nodes[0].bootstrap_addr()]);
    let keeper = daemon::start(quick(config, fetch)).await.unwrap();
    let back = keeper
        .market()
        .job_kept_here(id)
        .await
        .expect("the record is kept");
    assert_eq!(back.job_id, id);
    assert!(back.seq >= held.seq);
    keeper.stop().await;
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_ran_before_a_volunteer_restarted_gets_its_answer_and_never_runs_again() {
    use common::{RawPeer, metric};
    use flotilla_node::market::protocol::{ExecuteRequest, Request, Response};
    let dir = tempfile::tempdir().unwrap();
    let fetch = Duration::from_secs(5);
    let volunteer_config = |config| NodeConfig {
        offer_memory: Some(ByteSize::mib(256)),
        ..quick(config, fetch)
    };
    let mut nodes = demo::start_network_with(dir.path(), 2, |i, config| match i {
        0 => quick(config, fetch),
        _ => volunteer_config(config),
    })
    .await
    .unwrap();
    let echo = nodes[0]
        .overlay()
        .add(&example("echo")[..])
        .await
        .unwrap()
        .cid;
    let call = FunctionCall {
        module: echo.to_string(),
        memory_mib: 128,
        timeout_ms: Some(10_000),
        args: vec!["once".into()],
        env: Vec::new(),
        stdin: None,
        inputs: Vec::new(),
    };
    // A peer (as a scheduler would) reserves on the volunteer's offer and runs the call
    // in one message, as invocation 7.
    let owner = libp2p::identity::Keypair::generate_ed25519();
    let execute = |offer_id: u64, reservation_id: u64| {
        Request::Execute(Box::new(ExecuteRequest {
            invocation_id: 7,
            reservation_id,
            offer_id: Some(offer_id),
            call: call.clone(),
        }))
    };
    let offer_of = |node: &daemon::RunningNode| {
        let market = node.market().clone();
        async move { market.offers().await.sent.first().map(|o| o.offer_id) }
    };
    let volunteer = nodes.remove(1);
    let offer = offer_of(&volunteer).await.unwrap();
    let mut peer = RawPeer::connect_as(&volunteer, owner.clone()).await;
    let answer = peer.ask(&volunteer, 1, execute(offer, 1)).await;
    assert!(matches!(answer, Response::Executed { .. }), "{answer:?}");
    assert_eq!(
        metric(&volunteer, "flotilla_invocations_executed_total").await,
        1.0
    );
    // The volunteer crashes once its run is recorded, and starts again on its data dir:
    // new offers, no reservations, but the run remembered.
    volunteer.market().flush_records().await;
    drop(peer);
    volunteer.kill().await;
    let config = demo::loopback_config(&dir.path().join("node-1"), vec![nodes[0].bootstrap_addr()]);
    let volunteer = daemon::start(volunteer_config(config)).await.unwrap();
    let offer = offer_of(&volunteer).await.unwrap();
    let mut peer = RawPeer::connect_as(&volunteer, owner).await;
    // The same invocation asked again, on the new offer: answered with the first run's
    // answer, recorded across the restart, not run a second time.
    let again = peer.ask(&volunteer, 2, execute(offer, 2)).await;
    match (&answer, &again) {
        (
            Response::Executed {
                execution: first, ..
            },
            Response::Executed { execution, .. },
        ) => {
            assert_eq!(execution.stdout, first.stdout);
            assert_eq!(execution.receipt, first.receipt);
        }
        other => panic!("not the first run's answer: {other:?}"),
    }
    assert_eq!(
        metric(&volunteer, "flotilla_invocations_executed_total").await,
        0.0
    );
    volunteer.stop().await;
    for node in nodes {
        node.stop().await;
    }
}
