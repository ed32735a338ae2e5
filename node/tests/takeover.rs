//! A detached job whose scheduler is gone for good, on real nodes on loopback: the
//! scheduler is killed while its job waits for an offer and never comes back; once it
//! has been silent past the grace period, a scheduler near the job's key takes the job
//! over with a signed takeover version, and the job runs under the same id when a
//! volunteer joins. The client reads it by that id throughout.
#![allow(clippy::unwrap_used)]

mod common;

use bytesize::ByteSize;
use common::{example, quick, wait_until_within};
use flotilla_node::config::NodeConfig;
use flotilla_node::daemon;
use flotilla_node::demo;
use flotilla_node::market::function::FunctionCall;
use flotilla_node::market::jobs::JobState;
use std::time::Duration;

const GRACE: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_scheduler_is_gone_is_taken_over_and_completes_under_the_same_id() {
    let dir = tempfile::tempdir().unwrap();
    let fetch = Duration::from_secs(5);
    // Node 0 takes the job; nodes 1..=3 schedule too (and keep job records); node 4 is
    // the client. Nothing lends memory yet, so the job waits.
    let mut nodes = demo::start_network_with(dir.path(), 5, |i, config| NodeConfig {
        scheduler: i < 4,
        job_takeover_grace: GRACE,
        ..quick(config, fetch)
    })
    .await
    .unwrap();
    let echo = nodes[4]
        .overlay()
        .add(&example("echo")[..])
        .await
        .unwrap()
        .cid;
    let call = FunctionCall {
        module: echo.to_string(),
        memory_mib: 256,
        timeout_ms: Some(10_000),
        args: vec!["taken".into(), "over".into()],
        env: Vec::new(),
        stdin: None,
        inputs: Vec::new(),
    };
    // Submitted through node 0 (a scheduler places its own calls: it takes the job).
    let id = nodes[0]
        .market()
        .submit(call, None, None, Duration::from_secs(300))
        .await
        .unwrap();
    let client = nodes[4].market().clone();
    wait_until_within(
        "the client reads the job waiting",
        Duration::from_secs(30),
        || {
            let client = client.clone();
            async move {
                client
                    .job(id)
                    .await
                    .is_ok_and(|r| r.state == JobState::Waiting && r.seq > 0)
            }
        },
    )
    .await;
    let first = client.job(id).await.unwrap();
    assert_eq!(first.scheduler, nodes[0].peer_id().to_string());
    assert!(first.call.is_some(), "the record carries its call");

    // The scheduler dies and never comes back.
    let gone = nodes.remove(0);
    let gone_id = gone.peer_id().to_string();
    gone.kill().await;

    // Past the grace period a scheduler near the job's key takes it over.
    wait_until_within("the job is taken over", Duration::from_secs(60), || {
        let client = client.clone();
        let gone_id = gone_id.clone();
        async move {
            client.job(id).await.is_ok_and(|r| {
                r.scheduler != gone_id && r.taken_from.as_deref() == Some(gone_id.as_str())
            })
        }
    })
    .await;
    let taken = client.job(id).await.unwrap();
    assert_eq!(taken.job_id, id);
    assert!(taken.seq > first.seq);
    assert!(
        taken
            .error
            .as_deref()
            .is_some_and(|e| e.contains("taken over")),
        "{:?}",
        taken.error
    );
    let taker = taken.scheduler.clone();

    // A volunteer joins: the job runs there, under the same id, scheduled by the taker.
    let late = daemon::start(NodeConfig {
        offer_memory: Some(ByteSize::mib(256)),
        ..quick(
            demo::loopback_config(&dir.path().join("late"), vec![nodes[0].bootstrap_addr()]),
            fetch,
        )
    })
    .await
    .unwrap();
    wait_until_within("the job ran", Duration::from_secs(90), || {
        let client = client.clone();
        async move {
            client
                .job(id)
                .await
                .is_ok_and(|r| r.state == JobState::Done)
        }
    })
    .await;
    let done = client.job(id).await.unwrap();
    assert_eq!(done.scheduler, taker);
    assert_eq!(done.taken_from.as_deref(), Some(gone_id.as_str()));
    let result = done.result.unwrap();
    assert_eq!(result.execution.stdout.inline, b"taken over\n");
    assert_eq!(result.execution.volunteer, late.peer_id().to_string());
    late.stop().await;
    for node in nodes {
        node.stop().await;
    }
}
