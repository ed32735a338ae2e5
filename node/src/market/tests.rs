//! The market's loop on a real node in paused tokio time: its timers (refreshes, hold
//! deadlines, the owner check) and its stop, across an hour of virtual time in
//! milliseconds of wall time.

#![allow(clippy::unwrap_used)]

use super::protocol::{Request, Response};
use super::{Clock, Market};
use crate::config::NodeConfig;
use crate::daemon::{self, RunningNode};
use bytesize::ByteSize;
use libp2p::PeerId;
use std::time::Duration;

/// One node alone on loopback (it holds its own offers), lending 1 GiB as one offer,
/// its market on tokio's (paused) clock.
async fn lone_volunteer(dir: &std::path::Path) -> RunningNode {
    let config = NodeConfig {
        offer_memory: Some(ByteSize::gib(1)),
        offer_ttl: Duration::from_secs(120),
        offer_refresh_margin: Duration::from_secs(30),
        ..crate::demo::loopback_config(dir, Vec::new())
    };
    daemon::start_with_clock(config, Clock::tokio())
        .await
        .unwrap()
}

/// Waits in virtual time (at most an hour of it) until `market` holds its own offer,
/// and answers that offer's id.
async fn published_offer(market: &Market) -> u64 {
    for _ in 0..3600 {
        let view = market.offers().await;
        if let Some(offer) = view.sent.iter().find(|o| o.state == "published")
            && !view.held.is_empty()
        {
            return offer.offer_id;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    panic!("the offer was never published");
}

async fn reserve(market: &Market, owner: PeerId, id: u64, offer_id: u64, hold: Duration) {
    let request = Request::Reserve {
        reservation_id: id,
        offer_id,
        mib: 128,
        hold_ms: hold.as_millis() as u64,
    };
    let answer = market.handle(owner, request).await;
    assert!(matches!(answer, Response::Reserved { .. }), "{answer:?}");
}

async fn reserved(market: &Market, id: u64) -> bool {
    let view = market.offers().await;
    view.reservations.iter().any(|r| r.reservation_id == id)
}

#[tokio::test(start_paused = true)]
async fn a_held_reservation_lapses_at_its_deadline_in_virtual_time() {
    let dir = tempfile::tempdir().unwrap();
    let node = lone_volunteer(dir.path()).await;
    let market = node.market().clone();
    let offer_id = published_offer(&market).await;
    // Held by this node itself (always connected): only its deadline ends it.
    reserve(
        &market,
        market.peer_id(),
        1,
        offer_id,
        Duration::from_secs(300),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(299)).await;
    assert!(reserved(&market, 1).await, "held until its deadline");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!reserved(&market, 1).await, "gone at its deadline");
    node.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_held_reservation_of_an_owner_not_connected_lapses_within_the_owner_check() {
    let dir = tempfile::tempdir().unwrap();
    let node = lone_volunteer(dir.path()).await;
    let market = node.market().clone();
    let offer_id = published_offer(&market).await;
    let stranger = PeerId::random();
    reserve(&market, stranger, 2, offer_id, Duration::from_secs(600)).await;
    assert!(reserved(&market, 2).await);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        !reserved(&market, 2).await,
        "its owner is not connected: it lapses long before its deadline"
    );
    node.stop().await;
}

#[tokio::test(start_paused = true)]
async fn offers_are_refreshed_before_they_expire_for_an_hour_of_virtual_time() {
    let dir = tempfile::tempdir().unwrap();
    let node = lone_volunteer(dir.path()).await;
    let market = node.market().clone();
    published_offer(&market).await;
    let first_seq = market.offers().await.sent[0].seq;
    // An hour: thirty TTLs of two minutes; at every check the offer is held, live.
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_secs(60)).await;
        let view = market.offers().await;
        assert_eq!(view.held.len(), 1, "the offer is held at every moment");
        assert!(view.held[0].expires_at_ms > market.now());
    }
    let seq = market.offers().await.sent[0].seq;
    assert!(
        seq >= first_seq + 30,
        "refreshed about every 90 s: seq {first_seq} → {seq}"
    );
    node.stop().await;
}

#[tokio::test(start_paused = true)]
async fn stopping_waits_for_every_task_of_the_market() {
    let dir = tempfile::tempdir().unwrap();
    let node = lone_volunteer(dir.path()).await;
    let market = node.market().clone();
    published_offer(&market).await;
    assert!(market.tasks_running() >= 2, "the loop and the server run");
    node.stop().await;
    assert_eq!(market.tasks_running(), 0, "nothing left running");
    let after = market.handle(market.peer_id(), Request::FindJob { job_id: 1 });
    assert!(
        matches!(after.await, Response::Refused { .. }),
        "a stopped market answers that it is stopping"
    );
}

#[tokio::test(start_paused = true)]
async fn a_call_dropped_while_it_is_admitted_leaves_no_running_reservation() {
    let dir = tempfile::tempdir().unwrap();
    let node = lone_volunteer(dir.path()).await;
    let market = node.market().clone();
    let offer_id = published_offer(&market).await;
    let module = node
        .overlay()
        .add(&b"\0asm\x01\0\0\0"[..])
        .await
        .unwrap()
        .cid;
    let execute = Request::Execute(Box::new(super::protocol::ExecuteRequest {
        invocation_id: 9,
        reservation_id: 9,
        offer_id: Some(offer_id),
        call: super::function::FunctionCall {
            module: module.to_string(),
            memory_mib: 128,
            timeout_ms: None,
            args: Vec::new(),
            env: Vec::new(),
            stdin: None,
            inputs: Vec::new(),
        },
    }));
    // Polled once: its admission is queued for the loop; then the caller goes away
    // before hearing the answer (a client hanging up, say).
    let mut call = Box::pin(market.handle(market.peer_id(), execute));
    assert!(futures::poll!(&mut call).is_pending());
    drop(call);
    // Whatever the loop admitted for it is undone: nothing stays running, although a
    // running reservation never lapses by itself.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let view = market.offers().await;
    assert!(view.reservations.is_empty(), "{:?}", view.reservations);
    assert_eq!(view.sent[0].in_use_mib, 0);
    node.stop().await;
}
