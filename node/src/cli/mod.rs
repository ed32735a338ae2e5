//! The command line, in one folder: the flags and subcommands (`args`, clap), what each
//! subcommand does against the local node's API (`commands`, `invoke`, `run_plan`,
//! `demo`, `repo`: pins, gc and the store's state), the plan format (`plan`) and where its files may be (`plan_paths`), and what the CLI prints (`output`). The daemon and
//! the market know nothing of it.

pub mod args;
pub mod commands;
pub mod demo;
pub mod invoke;
pub mod output;
pub mod plan;
pub mod plan_paths;
pub mod repo;
pub mod run_plan;

pub use args::*;
