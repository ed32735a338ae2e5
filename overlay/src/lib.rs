//! Flotilla's overlay: the libp2p swarm every Flotilla peer runs, the Kademlia key
//! regions that memory offers live in, and content-addressed blocks moved over bitswap.
//!
//! * [`regions`]: the hashed key space cut into one region per memory tier;
//! * [`block`], [`blockstore`], [`unixfs`]: CIDv1 blocks, their on-disk store, and files
//!   as UnixFS DAGs;
//! * [`bitswap`]: bitswap 1.2.0, client and server, on `libp2p-stream`;
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

pub mod bitswap;
pub mod block;
pub mod blockstore;
pub mod closed;
pub mod fair;
pub mod fetch;
pub mod link;
pub mod liveness;
pub mod metrics;
pub mod network;
pub mod presence;
pub mod record_store;
pub mod regions;
pub mod rpc;
pub mod service;
pub mod unixfs;

pub use cid::Cid;
pub use service::{Added, Overlay, OverlayConfig, OverlayError, OverlayStatus};
