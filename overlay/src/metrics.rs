//! Prometheus metrics of the overlay: block exchange, fetches and announcements.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The overlay's own metrics (libp2p's are registered by the swarm).
#[derive(Debug, Clone)]
pub struct OverlayMetrics {
    /// Blocks sent to peers over bitswap.
    pub blocks_sent: Counter,
    /// Bytes of blocks sent to peers.
    pub block_bytes_sent: Counter,
    /// Blocks received from peers and accepted.
    pub blocks_received: Counter,
    /// Bytes of blocks received and accepted.
    pub block_bytes_received: Counter,
    /// Blocks received that matched no CID we asked for (wrong hash or unsolicited).
    pub blocks_rejected: Counter,
    /// Blocks received that we already had.
    pub blocks_duplicate: Counter,
    /// Bitswap streams closed because of an oversize or malformed message.
    pub bad_messages: Counter,
    /// Wants dropped because a peer's wantlist was full.
    pub wants_dropped: Counter,
    /// Time to fetch a whole DAG that was not all held, in seconds.
    pub fetch_seconds: Histogram,
    /// Roots of fetched DAGs queued to be announced as provided.
    pub announcements_queued: Counter,
    /// Inbound bitswap streams refused (the peer at its limit or its fair share).
    pub bitswap_streams_refused: Counter,
    /// Inbound bitswap streams closed to give their slot to a peer below its share.
    pub bitswap_streams_evicted: Counter,
    /// Inbound bitswap streams closed because no message started within the idle timeout.
    pub bitswap_streams_idle: Counter,
}

impl OverlayMetrics {
    /// Creates the metrics and registers them under `registry`.
    pub fn new(registry: &mut Registry) -> OverlayMetrics {
        let m = OverlayMetrics {
            blocks_sent: Counter::default(),
            block_bytes_sent: Counter::default(),
            blocks_received: Counter::default(),
            block_bytes_received: Counter::default(),
            blocks_rejected: Counter::default(),
            blocks_duplicate: Counter::default(),
            bad_messages: Counter::default(),
            wants_dropped: Counter::default(),
            fetch_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 18)),
            announcements_queued: Counter::default(),
            bitswap_streams_refused: Counter::default(),
            bitswap_streams_evicted: Counter::default(),
            bitswap_streams_idle: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("flotilla_bitswap");
        r.register("blocks_sent", "Blocks sent to peers", m.blocks_sent.clone());
        r.register(
            "block_bytes_sent",
            "Bytes of blocks sent to peers",
            m.block_bytes_sent.clone(),
        );
        r.register(
            "blocks_received",
            "Blocks received and accepted",
            m.blocks_received.clone(),
        );
        r.register(
            "block_bytes_received",
            "Bytes of blocks received and accepted",
            m.block_bytes_received.clone(),
        );
        r.register(
            "blocks_rejected",
            "Blocks received whose bytes match no CID we asked for (wrong hash)",
            m.blocks_rejected.clone(),
        );
        r.register(
            "blocks_duplicate",
            "Blocks received that were already held",
            m.blocks_duplicate.clone(),
        );
        r.register(
            "bad_messages",
            "Streams closed for an oversize or malformed message",
            m.bad_messages.clone(),
        );
        r.register(
            "wants_dropped",
            "Wants dropped because a peer's wantlist was full",
            m.wants_dropped.clone(),
        );
        r.register(
            "streams_refused",
            "Inbound streams refused: the peer was at its limit or its fair share",
            m.bitswap_streams_refused.clone(),
        );
        r.register(
            "streams_evicted",
            "Inbound streams closed to give their slot to a peer below its fair share",
            m.bitswap_streams_evicted.clone(),
        );
        r.register(
            "streams_idle",
            "Inbound streams closed because no message started within the idle timeout",
            m.bitswap_streams_idle.clone(),
        );
        let flotilla = registry.sub_registry_with_prefix("flotilla");
        flotilla.register(
            "fetch_seconds",
            "Time to fetch a whole DAG that was not all held",
            m.fetch_seconds.clone(),
        );
        flotilla.register(
            "announcements_queued",
            "Roots of fetched DAGs queued to be announced in the DHT as provided",
            m.announcements_queued.clone(),
        );
        m
    }
}
