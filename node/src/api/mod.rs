//! The local HTTP API: the node serves it ([`server`]), the CLI calls it ([`client`]),
//! and both share the message types in [`types`].
//!
//! | method | path            | what                                                        |
//! |--------|-----------------|-------------------------------------------------------------|
//! | GET    | `/v0/status`    | PeerId, addresses, connected peers, routing table, blocks    |
//! | POST   | `/v0/add`       | body = file bytes → root CID, size, blocks                   |
//! | POST   | `/v0/fetch?cid=`| fetch a DAG; NDJSON progress lines, then `done` or `error`   |
//! | GET    | `/v0/cat?cid=`  | the file under a CID held locally, as bytes                  |
//! | GET    | `/metrics`      | Prometheus text: libp2p's metrics and ours                   |

pub mod client;
pub mod server;
pub mod types;
