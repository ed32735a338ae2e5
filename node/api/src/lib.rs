//! A Flotilla node's local HTTP API without the node: the messages the API exchanges
//! ([`types`]), the client the CLI and the research harness talk to a node with
//! ([`client`]), and the records those messages carry — a function call and its answer
//! ([`function`]), a detached job's record ([`job`]), a volunteer's signed receipt for a run
//! ([`receipt`]) and how replicas of a call compared ([`replicas`]), a node's offers and a discovery's
//! outcome ([`market`]).
//!
//! The server, the market and the Wasm executor live in `flotilla-node`, which re-exports
//! these modules at their old paths (`api::{client, types}`, `market::function`, and the
//! types of `market::jobs` and `market::protocol`). This crate does not depend on it, so
//! a client of the API (`flotilla-testground`) builds without wasmtime.

pub mod client;
pub mod function;
pub mod job;
pub mod market;
pub mod memo;
pub mod receipt;
pub mod replicas;
pub mod types;

/// `text` on one line, runs of whitespace (newlines included) made single spaces: how
/// errors from deeper layers are shown.
pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
