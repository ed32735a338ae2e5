//! `flotilla`: parses the command line, sets up logging, and runs the command. Errors are
//! printed as one line on stderr with a non-zero exit status.

use clap::Parser;
use flotilla_node::cli::{Cli, Command};
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Daemons log what they do; one-shot commands only warnings, unless RUST_LOG says.
    let default = match cli.command {
        Command::Node(_) => "info,libp2p_swarm=warn",
        _ => "warn",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&anyhow::Error::from(e)),
    };
    match runtime.block_on(flotilla_node::commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(error: &anyhow::Error) -> ExitCode {
    if let Some(exit) = error.downcast_ref::<flotilla_node::commands::Exit>() {
        return ExitCode::from(exit.0);
    }
    let message = flotilla_node::one_line(&format!("{error:#}"));
    #[allow(clippy::print_stderr)]
    {
        eprintln!("error: {message}");
    }
    ExitCode::FAILURE
}
