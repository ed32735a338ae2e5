//! The command line, in one folder: the flags and subcommands (`args`, clap), what each
//! subcommand does against the local node's API (`commands`, `invoke`, `run_plan`,
//! `demo`), the plan format (`plan`), and what the CLI prints (`output`). The daemon and
//! the market know nothing of it.

pub mod args;
pub mod commands;
pub mod demo;
pub mod invoke;
pub mod output;
pub mod plan;
pub mod run_plan;

pub use args::*;
