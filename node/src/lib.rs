//! The `flotilla` binary's library: the volunteer daemon, its part in the resource market
//! (offers, holders, schedulers), its local HTTP API, the CLI commands that talk to it,
//! and the loopback demo; the sandboxed Wasm executor is the crate `flotilla-executor`
//! (`node/executor`), re-exported as [`executor`], and the API's client and types with the
//! records they carry are the crate `flotilla-api` (`node/api`), re-exported where they
//! were (`api::{client, types}`, `market::function`, ...).
//!
//! `main.rs` only parses the command line and calls [`commands::run`]; tests start nodes
//! in-process with [`daemon::start`].

pub mod api;
pub mod cli;
pub use cli::{commands, demo, invoke, output, plan, plan_paths, repo, run_plan};
pub mod config;
pub mod daemon;
/// The sandboxed Wasm executor, its own crate (`node/executor`).
pub use flotilla_executor as executor;
pub mod identity;
pub mod lock;
pub mod market;
pub mod state_db;

pub use flotilla_api::one_line;
