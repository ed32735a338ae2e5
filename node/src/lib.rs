//! The `flotilla` binary's library: the volunteer daemon, its part in the resource market
//! (offers, holders, schedulers), its local HTTP API, the CLI commands that talk to it,
//! and the loopback demo; the sandboxed Wasm executor is the crate `flotilla-executor`
//! (`node/executor`), re-exported as [`executor`].
//!
//! `main.rs` only parses the command line and calls [`commands::run`]; tests start nodes
//! in-process with [`daemon::start`].

pub mod api;
pub mod cli;
pub use cli::{commands, demo, invoke, output, plan, run_plan};
pub mod config;
pub mod daemon;
/// The sandboxed Wasm executor, its own crate (`node/executor`).
pub use flotilla_executor as executor;
pub mod identity;
pub mod market;

/// `text` on one line, runs of whitespace (newlines included) made single spaces: how
/// errors from deeper layers are shown.
pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
