//! Flotilla's overlay: the libp2p swarm every Flotilla peer runs, the Kademlia key
//! regions that memory offers live in, and content-addressed blocks moved over bitswap.
//!
//! * [`regions`]: the hashed key space cut into one region per memory tier;
//! * [`block`], [`blockstore`], [`unixfs`]: CIDv1 blocks, their on-disk store, and files
//!   as UnixFS DAGs;
//! * [`cache`], [`store_db`]: the store's index (pinned, in use, cached in recency order)
//!   and the database that keeps it across restarts;
//! * [`dagpb`]: dag-pb nodes decoded by counting links before allocating;
//! * [`read`]: the limits of reading a DAG back (visits, bytes, depth, deadline);
//! * [`bitswap`]: bitswap 1.2.0, client and server, on `libp2p-stream`;
//! * [`dht`]: two Kademlias, IPFS's for content and Flotilla's own for market keys;
//! * [`network`]: the swarm (Kademlia, identify, ping, mDNS, connection limits) and its
//!   event loop;
//! * [`liveness`]: closing connections that stopped answering pings;
//! * [`presence`]: the peers connected now, from where, and when each leaves;
//! * [`rpc`]: bounded request-response messages for the protocols built on the overlay;
//! * [`link`]: calls on streams kept open per peer, beside request-response;
//! * [`fair`]: the queue per peer, served round robin, that requests wait in;
//! * [`record_store`]: Kademlia's store, our provider records apart from others';
//! * [`fetch`]: fetching a whole DAG from connected peers and DHT providers;
//! * [`service`]: [`Overlay`], all of the above as one running peer.

pub mod admission;
pub mod bitswap;
pub mod block;
pub mod blockstore;
pub mod cache;
pub mod closed;
pub mod dagpb;
pub mod dht;
pub mod fair;
pub mod fetch;
pub mod link;
pub mod liveness;
pub mod metrics;
pub mod network;
pub mod presence;
pub mod read;
pub mod record_store;
pub mod regions;
pub mod rpc;
pub mod service;
pub mod store_db;
pub mod unixfs;

pub use cid::Cid;
pub use service::{Added, Overlay, OverlayConfig, OverlayError, OverlayStatus};
