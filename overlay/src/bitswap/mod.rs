//! Bitswap 1.2.0 (`/ipfs/bitswap/1.2.0`) on `libp2p-stream`, client and server.
//!
//! Bitswap is message based, not request/reply: each side sends length-prefixed messages
//! on streams it opens itself, and reads the other side's messages on inbound streams.
//! [`Bitswap`] therefore has three parts:
//!
//! * [`sender`]: one task per peer owning our outbound stream to it, fed by a bounded
//!   queue, merging queued messages into one up to the size budget;
//! * [`client`]: our wants (want-block / want-have, each awaited with a timeout); blocks
//!   are accepted only if their bytes hash to a CID we asked for;
//! * [`server`]: a bounded wantlist per peer and a worker that answers it from the
//!   blockstore with blocks and HAVE / DONT_HAVE presences.
//!
//! Every input is bounded: messages ≤ 4 MiB, blocks ≤ 2 MiB, ≤ 1024 wants per peer (and
//! as many blocks and presences per message, counted before they are decoded), a cap on
//! concurrent inbound streams shared fairly among peers ([`slots`]), an idle timeout on
//! inbound streams, and a byte budget for the replies queued to each peer ([`budget`]).
//! A malformed or oversize message closes its stream only.

pub mod message;
pub mod wire;

pub mod budget;
pub mod slots;

mod client;
mod sender;
mod server;

use crate::blockstore::Blockstore;
use crate::metrics::OverlayMetrics;
use bytes::Bytes;
use futures::StreamExt;
use libp2p::{PeerId, Stream, StreamProtocol};
use message::Message;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::oneshot;

pub use client::WantError;

/// The protocol we speak.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/ipfs/bitswap/1.2.0");

/// Limits of the bitswap engine.
#[derive(Debug, Clone)]
pub struct BitswapConfig {
    /// Largest message read or written (default 4 MiB).
    pub max_message_size: usize,
    /// Most entries we keep in one peer's wantlist, and most wants we have out to one peer
    /// (default 1024).
    pub max_wants_per_peer: usize,
    /// Bytes of blocks a peer's sender merges into one outgoing message (default 2 MiB; a
    /// larger block goes alone).
    pub response_budget: usize,
    /// Most inbound bitswap streams served at once, from all peers (default 1024).
    pub max_inbound_streams: usize,
    /// Messages queued for one peer before senders wait (default 64).
    pub outbound_queue: usize,
    /// How long an idle outbound stream is kept (default 60 s).
    pub idle_stream_timeout: Duration,
    /// Time allowed to open a stream or write one message (default 30 s), and to receive
    /// the rest of a message once its length has arrived.
    pub write_timeout: Duration,
    /// Most inbound bitswap streams one peer may have open at once (default 16). When
    /// all `max_inbound_streams` are taken, a peer below its fair share takes one from the
    /// peer holding the most ([`slots`]).
    pub max_inbound_streams_per_peer: usize,
    /// How long an inbound stream may wait for the next message to start (default 60 s);
    /// a silent stream is then closed and its slot freed.
    pub inbound_idle_timeout: Duration,
    /// Bytes of replies queued for one peer, blocks not yet written (default 8 MiB): the
    /// server waits for room before reading the next block from disk ([`budget`]).
    pub reply_bytes_per_peer: usize,
    /// Bytes of replies queued for all peers together (default 256 MiB).
    pub reply_bytes_total: usize,
}

impl Default for BitswapConfig {
    fn default() -> Self {
        BitswapConfig {
            max_message_size: wire::MAX_MESSAGE_SIZE,
            max_wants_per_peer: 1024,
            response_budget: 2 * 1024 * 1024,
            max_inbound_streams: 1024,
            outbound_queue: 64,
            idle_stream_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(30),
            max_inbound_streams_per_peer: 16,
            inbound_idle_timeout: Duration::from_secs(60),
            reply_bytes_per_peer: 8 * 1024 * 1024,
            reply_bytes_total: 256 * 1024 * 1024,
        }
    }
}

/// A handle to the bitswap engine; clones share it.
#[derive(Clone)]
pub struct Bitswap {
    inner: Arc<Inner>,
}

struct Inner {
    config: BitswapConfig,
    store: Blockstore,
    metrics: OverlayMetrics,
    control: libp2p_stream::Control,
    senders: Mutex<sender::Senders>,
    client: Mutex<client::ClientState>,
    server: Mutex<server::ServerState>,
    slots: Mutex<slots::Slots<oneshot::Sender<()>>>,
    budget: budget::ReplyBudget,
}

/// A place among the inbound streams we serve ([`slots::Slots`]); given back on drop.
struct InboundSlot {
    inner: Arc<Inner>,
    peer: PeerId,
    id: slots::SlotId,
}

impl InboundSlot {
    /// Takes a slot for `peer`, perhaps from a peer holding more than its share (whose
    /// stream then ends); the receiver resolves when this slot is taken away in turn.
    fn take(inner: &Arc<Inner>, peer: PeerId) -> Option<(InboundSlot, oneshot::Receiver<()>)> {
        let (stop, stopped) = oneshot::channel();
        let id = match lock(&inner.slots).admit(peer, stop) {
            slots::Admit::Given(id) => id,
            slots::Admit::Evicted { slot, victim, stop } => {
                tracing::debug!(%peer, %victim, "took an inbound bitswap slot from a peer over its share");
                inner.metrics.bitswap_streams_evicted.inc();
                drop(stop);
                slot
            }
            slots::Admit::Refused => return None,
        };
        let slot = InboundSlot {
            inner: inner.clone(),
            peer,
            id,
        };
        Some((slot, stopped))
    }
}

impl Drop for InboundSlot {
    fn drop(&mut self) {
        lock(&self.inner.slots).release(&self.peer, self.id);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The protected state stays consistent between statements; a panic elsewhere must
    // not take the whole engine down.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Bitswap {
    /// Starts the engine on a stream-protocol control; it serves inbound streams until
    /// the swarm stops.
    pub fn start(
        mut control: libp2p_stream::Control,
        store: Blockstore,
        metrics: OverlayMetrics,
        config: BitswapConfig,
    ) -> Bitswap {
        let incoming = control
            .accept(PROTOCOL)
            .expect("bitswap registers its protocol once");
        let inner = Arc::new(Inner {
            slots: Mutex::new(slots::Slots::new(
                config.max_inbound_streams,
                config.max_inbound_streams_per_peer,
            )),
            budget: budget::ReplyBudget::new(config.reply_bytes_per_peer, config.reply_bytes_total),
            config,
            store,
            metrics,
            control,
            senders: Mutex::default(),
            client: Mutex::default(),
            server: Mutex::default(),
        });
        let accept = Arc::downgrade(&inner);
        tokio::spawn(async move {
            let mut incoming = incoming;
            while let Some((peer, stream)) = incoming.next().await {
                let Some(inner) = accept.upgrade() else { break };
                let Some((slot, stopped)) = InboundSlot::take(&inner, peer) else {
                    tracing::debug!(%peer, "too many inbound bitswap streams; dropping one");
                    inner.metrics.bitswap_streams_refused.inc();
                    continue;
                };
                tokio::spawn(async move {
                    tokio::select! {
                        () = serve_inbound(&inner, peer, stream) => {}
                        _ = stopped => {} // its slot went to a peer below its share
                    }
                    drop(slot);
                });
            }
        });
        Bitswap { inner }
    }

    /// The blockstore the engine serves from and stores into.
    pub fn store(&self) -> &Blockstore {
        &self.inner.store
    }

    /// Asks `peer` for the block `cid`; resolves to the verified block, which is also
    /// stored. Fails if the peer says it does not have it, sends a block we did not ask
    /// for, cannot be reached, or does not answer within `timeout`.
    pub async fn want_block(
        &self,
        peer: PeerId,
        cid: cid::Cid,
        timeout: Duration,
    ) -> Result<crate::block::Block, WantError> {
        client::want_block(&self.inner, peer, cid, timeout).await
    }

    /// Asks `peer` whether it has `cid`.
    pub async fn want_have(
        &self,
        peer: PeerId,
        cid: cid::Cid,
        timeout: Duration,
    ) -> Result<bool, WantError> {
        client::want_have(&self.inner, peer, cid, timeout).await
    }

    /// Tells the engine we now hold `cid`, so peers that wanted it get it.
    pub fn block_added(&self, cid: &cid::Cid) {
        server::block_added(&self.inner, cid);
    }

    /// Inbound streams served now, from all peers.
    pub fn inbound_streams(&self) -> usize {
        lock(&self.inner.slots).used()
    }

    /// Inbound streams `peer` has open now.
    pub fn inbound_streams_of(&self, peer: &PeerId) -> usize {
        lock(&self.inner.slots).held_by(peer)
    }

    /// Bytes of replies queued and not yet written, to all peers.
    pub fn reply_bytes_queued(&self) -> usize {
        self.inner.budget.charged_total()
    }

    /// Forgets a peer that disconnected: its wantlist, and our wants from it.
    pub fn peer_disconnected(&self, peer: &PeerId) {
        server::forget_peer(&self.inner, peer);
        client::fail_peer(&self.inner, peer, WantError::Disconnected);
        self.inner.budget.forget(peer);
    }
}

/// Reads messages from one inbound stream until it ends or misbehaves. Reading and
/// decoding (which hashes every block) run side by side, so the next message keeps
/// arriving while the last one is checked; a bad message ends both and drops the stream.
async fn serve_inbound(inner: &Arc<Inner>, peer: PeerId, mut stream: Stream) {
    let (frames, mut to_decode) = tokio::sync::mpsc::channel::<Bytes>(2);
    let mut decoder = {
        let inner = inner.clone();
        tokio::spawn(async move {
            while let Some(frame) = to_decode.recv().await {
                match Message::decode(frame, inner.config.max_wants_per_peer) {
                    Ok(msg) => on_message(&inner, peer, msg),
                    Err(e) => {
                        inner.metrics.bad_messages.inc();
                        tracing::warn!(%peer, error = %e, "closing bitswap stream: bad message");
                        return;
                    }
                }
            }
        })
    };
    let max = inner.config.max_message_size;
    loop {
        let read = tokio::select! {
            read = wire::read_frame_timed(
                &mut stream,
                max,
                inner.config.inbound_idle_timeout,
                inner.config.write_timeout,
            ) => read,
            _ = &mut decoder => return, // the decoder refused a message
        };
        let frame = match read {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(e) if wire::is_idle(&e) => {
                inner.metrics.bitswap_streams_idle.inc();
                tracing::debug!(%peer, "closing an idle inbound bitswap stream");
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                inner.metrics.bad_messages.inc();
                tracing::warn!(%peer, error = %e, "closing bitswap stream: bad frame");
                break;
            }
            Err(e) => {
                tracing::debug!(%peer, error = %e, "bitswap stream ended");
                break;
            }
        };
        if frames.send(frame).await.is_err() {
            break; // the decoder refused a message
        }
    }
    drop(frames);
    let _ = decoder.await;
}

fn on_message(inner: &Arc<Inner>, peer: PeerId, msg: Message) {
    if !msg.wants.is_empty() || msg.full {
        server::on_wants(inner, peer, msg.wants, msg.full);
    }
    if !msg.presences.is_empty() {
        client::on_presences(inner, peer, &msg.presences);
    }
    if !msg.blocks.is_empty() {
        client::on_blocks(inner, peer, msg.blocks);
    }
}
