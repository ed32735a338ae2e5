//! Outbound messages: one task per peer owns our stream to it.
//!
//! Messages for a peer go through a bounded queue to its task, which opens the stream
//! lazily (dialling if needed), merges whatever else is queued into the message up to the
//! size budget, writes it, and retries once on a fresh stream if the write fails. Opening
//! and writing are bounded by the write timeout: a peer that stops reading fails its wants
//! and loses its queue instead of holding the task forever. A task with nothing to send
//! for the idle timeout closes its stream and ends.

use super::budget::Charge;
use super::message::Message;
use super::{Inner, PROTOCOL, WantError, client, lock, wire};
use libp2p::{PeerId, Stream};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::mpsc;

/// The queues of the running sender tasks, by peer.
pub(super) type Senders = HashMap<PeerId, mpsc::Sender<Queued>>;

/// A queued message and the reply bytes charged for it, given back once it is written
/// or dropped.
pub(super) struct Queued {
    msg: Message,
    charges: Vec<Charge>,
}

/// Queues `msg` for `peer`, starting its sender task if needed; waits while the queue is
/// full.
pub(super) async fn send(inner: &Arc<Inner>, peer: PeerId, msg: Message) {
    send_charged(inner, peer, msg, None).await;
}

/// [`send`], holding `charge` until the message is written or dropped.
pub(super) async fn send_charged(
    inner: &Arc<Inner>,
    peer: PeerId,
    msg: Message,
    charge: Option<Charge>,
) {
    let mut msg = Queued {
        msg,
        charges: charge.into_iter().collect(),
    };
    for _ in 0..3 {
        let tx = sender_for(inner, peer);
        match tx.send(msg).await {
            Ok(()) => return,
            // The task ended between our lookup and our send; start a new one.
            Err(mpsc::error::SendError(back)) => msg = back,
        }
    }
    tracing::debug!(%peer, "could not queue a bitswap message");
}

/// Queues `msg` for `peer` only if a sender to it is already running and has room: for
/// best-effort messages (cancels) that must neither wait nor dial a peer that is gone.
pub(super) fn try_send_existing(inner: &Arc<Inner>, peer: PeerId, msg: Message) {
    let tx = lock(&inner.senders).get(&peer).cloned();
    if let Some(tx) = tx {
        let _ = tx.try_send(Queued {
            msg,
            charges: Vec::new(),
        });
    }
}

fn sender_for(inner: &Arc<Inner>, peer: PeerId) -> mpsc::Sender<Queued> {
    let mut senders = lock(&inner.senders);
    if let Some(tx) = senders.get(&peer).filter(|tx| !tx.is_closed()) {
        return tx.clone();
    }
    let (tx, rx) = mpsc::channel(inner.config.outbound_queue);
    senders.insert(peer, tx.clone());
    tokio::spawn(run(Arc::downgrade(inner), peer, rx));
    tx
}

async fn run(inner: std::sync::Weak<Inner>, peer: PeerId, mut rx: mpsc::Receiver<Queued>) {
    let mut stream: Option<Stream> = None;
    let mut held: Option<Queued> = None;
    let mut closing = false;
    loop {
        let Some(strong) = inner.upgrade() else { break };
        let first = match held.take() {
            Some(msg) => msg,
            None if closing => match rx.recv().await {
                Some(msg) => msg,
                None => break,
            },
            None => {
                match tokio::time::timeout(strong.config.idle_stream_timeout, rx.recv()).await {
                    Ok(Some(msg)) => msg,
                    Ok(None) => break,
                    Err(_idle) => {
                        // Refuse new messages (senders then start a fresh task), and send
                        // what was queued before we closed.
                        rx.close();
                        closing = true;
                        continue;
                    }
                }
            }
        };
        let (msg, rest) = merge_queued(first, &mut rx, strong.config.response_budget);
        held = rest;
        // `msg.charges` are given back when it goes out of scope: written or not.
        if !write(&strong, peer, &mut stream, &msg.msg).await {
            // Unreachable: our wants to it fail, and its wantlist goes (a message that
            // arrived after it disconnected must not leave a ledger behind).
            client::fail_peer(&strong, &peer, WantError::Unreachable);
            super::server::forget_peer(&strong, &peer);
            // Whatever else is queued would meet the same fate; drop it and end.
            rx.close();
            closing = true;
            held = None;
            while rx.try_recv().is_ok() {}
        }
    }
    if let Some(inner) = inner.upgrade() {
        let mut senders = lock(&inner.senders);
        if senders.get(&peer).is_some_and(|tx| tx.is_closed()) {
            senders.remove(&peer);
        }
    }
}

/// Merges queued messages into `first` while the result stays within `budget` bytes of
/// blocks; returns the merged message and the first message that did not fit.
fn merge_queued(
    mut first: Queued,
    rx: &mut mpsc::Receiver<Queued>,
    budget: usize,
) -> (Queued, Option<Queued>) {
    while first.msg.size_estimate() < budget {
        let Ok(next) = rx.try_recv() else { break };
        if next.msg.full
            || first.msg.full
            || first.msg.size_estimate() + next.msg.size_estimate() > budget
        {
            return (first, Some(next));
        }
        first.msg.wants.extend(next.msg.wants);
        first.msg.blocks.extend(next.msg.blocks);
        first.msg.presences.extend(next.msg.presences);
        first.charges.extend(next.charges);
    }
    (first, None)
}

/// Writes one message on the peer's stream, opening one if needed; retries once on a
/// fresh stream. Returns whether it was sent.
async fn write(
    inner: &Arc<Inner>,
    peer: PeerId,
    stream: &mut Option<Stream>,
    msg: &Message,
) -> bool {
    let frame = msg.encode();
    if frame.len() > inner.config.max_message_size {
        tracing::error!(%peer, size = frame.len(), "refusing to send an oversize bitswap message");
        return false;
    }
    for _attempt in 0..2 {
        let timeout = inner.config.write_timeout;
        if stream.is_none() {
            let mut control = inner.control.clone();
            match tokio::time::timeout(timeout, control.open_stream(peer, PROTOCOL)).await {
                Ok(Ok(s)) => *stream = Some(s),
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "cannot open a bitswap stream");
                    return false;
                }
                Err(_) => {
                    tracing::debug!(%peer, "timed out opening a bitswap stream");
                    return false;
                }
            }
        }
        let s = stream.as_mut().expect("opened above");
        let written = tokio::time::timeout(timeout, wire::write_frame(s, &frame))
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "write timed out",
                ))
            });
        match written {
            Ok(()) => {
                for block in &msg.blocks {
                    inner.metrics.blocks_sent.inc();
                    inner
                        .metrics
                        .block_bytes_sent
                        .inc_by(block.data.len() as u64);
                }
                return true;
            }
            Err(e) => {
                tracing::debug!(%peer, error = %e, "bitswap write failed; reopening");
                *stream = None;
            }
        }
    }
    false
}
