//! Network conditions a scenario changes while it runs: splitting the network in two and
//! healing it. Testground's sidecar does it there ([`sdk::SidecarLinks`]); network
//! namespaces do it here ([`netns`]); on plain loopback ([`Loopback`]) it cannot be done.

pub mod netns;
pub mod sdk;

use std::future::Future;
use std::net::IpAddr;

/// Why links could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// This kind of run cannot shape links.
    #[error("{0}")]
    Unsupported(String),
    /// A command failed.
    #[error("{command}: {reason}")]
    Command {
        /// What was run.
        command: String,
        /// Why it failed.
        reason: String,
    },
}

/// Which half of a split network an instance is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Side {
    /// Even instances.
    A,
    /// Odd instances.
    B,
}

impl Side {
    /// The side of instance `seq` (0-based): they alternate, so each side gets a
    /// scheduler and a client.
    pub fn of(seq: u32) -> Side {
        if seq.is_multiple_of(2) {
            Side::A
        } else {
            Side::B
        }
    }
}

/// Splits and heals the network.
pub trait Links: Send + Sync + 'static {
    /// Cuts this instance (on `side`) off from `others`, the addresses of the other side.
    /// Every instance calls it; where the cut is global, later calls change nothing.
    fn split(
        &self,
        side: Side,
        others: &[IpAddr],
    ) -> impl Future<Output = Result<(), LinkError>> + Send;

    /// Undoes [`Links::split`].
    fn heal(&self) -> impl Future<Output = Result<(), LinkError>> + Send;
}

/// Loopback: every node on 127.0.0.1, nothing to shape.
#[derive(Debug, Clone, Copy, Default)]
pub struct Loopback;

impl Links for Loopback {
    async fn split(&self, _side: Side, _others: &[IpAddr]) -> Result<(), LinkError> {
        Err(LinkError::Unsupported(
            "a partition needs network namespaces (run as root with `ip` and `tc`)".into(),
        ))
    }

    async fn heal(&self) -> Result<(), LinkError> {
        Ok(())
    }
}

/// What running `program args…` came to: its failure to start, or a non-zero exit with
/// its stderr, as a [`LinkError`].
fn outcome(
    program: &str,
    args: &[&str],
    output: std::io::Result<std::process::Output>,
) -> Result<(), LinkError> {
    let failed = |reason: String| LinkError::Command {
        command: format!("{program} {}", args.join(" ")),
        reason,
    };
    let output = output.map_err(|e| failed(e.to_string()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(failed(
            String::from_utf8_lossy(&output.stderr).trim().to_string(),
        ))
    }
}

/// Runs `program args…` to the end (for setting namespaces up and tearing them down).
pub(crate) fn run_blocking(program: &str, args: &[&str]) -> Result<(), LinkError> {
    let output = std::process::Command::new(program).args(args).output();
    outcome(program, args, output)
}

/// Runs `program args…` without blocking the runtime (for changes during a run).
pub(crate) async fn run_command(program: &str, args: &[&str]) -> Result<(), LinkError> {
    let output = tokio::process::Command::new(program)
        .args(args)
        .output()
        .await;
    outcome(program, args, output)
}
