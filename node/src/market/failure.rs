//! Why a call could not run on this volunteer, as a typed value: which step failed and
//! on what, and whether another volunteer might succeed where this one did not. Its text
//! is made only at the edge, in the `Failed` answer to the scheduler (one line).

use super::function::{CallRejected, MAX_OUTPUT_FILES};
use super::protocol::Response;
use super::state::Stopped;
use crate::executor::ExecError;
use crate::one_line;
use cid::Cid;
use flotilla_offers::ledger::StartError;
use flotilla_overlay::OverlayError;
use std::fmt;
use std::time::Duration;

/// Which of a call's parts a fetch or read was for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Part {
    /// The module.
    Module,
    /// Its stdin.
    Stdin,
    /// The input file of this name.
    Input(String),
}

impl Part {
    /// The bound this part counts against.
    fn limit(&self) -> &'static str {
        match self {
            Part::Module => "the module limit",
            Part::Stdin | Part::Input(_) => "the input limit",
        }
    }
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Part::Module => f.write_str("module"),
            Part::Stdin => f.write_str("stdin"),
            Part::Input(name) => write!(f, "input {name:?}"),
        }
    }
}

/// A part of a call and its CID, as a failure names them ("the module (bafy…)"); boxed in
/// [`Failure`], since a CID is large and failures are rare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PartAt {
    /// Which part.
    pub part: Part,
    /// Its CID.
    pub cid: Cid,
}

impl PartAt {
    /// `part` at `cid`, boxed for a [`Failure`].
    pub(super) fn boxed(part: &Part, cid: Cid) -> Box<PartAt> {
        Box::new(PartAt {
            part: part.clone(),
            cid,
        })
    }
}

impl fmt::Display for PartAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.part, self.cid)
    }
}

/// Why a call could not run here.
#[derive(Debug, thiserror::Error)]
pub(super) enum Failure {
    /// This node lends nothing, or has no executor.
    #[error("this node lends no memory and runs no functions")]
    NotLending,
    /// The call itself is malformed.
    #[error("{0}")]
    Rejected(#[from] CallRejected),
    /// The ledger will not run this call (its invocation id was used for another call).
    #[error("{0}")]
    NotRunnable(StartError),
    /// The ledger could not start the run on the reservation.
    #[error("{0}")]
    NotStarted(StartError),
    /// A part is over its bound.
    #[error("the {at} is larger than {} ({max} bytes)", at.part.limit())]
    TooLarge {
        /// Which part.
        at: Box<PartAt>,
        /// The bound, in bytes.
        max: u64,
    },
    /// Nobody provided a part within the fetch timeout.
    #[error("cannot fetch the {at}: no peer provided it within {timeout:?}")]
    NotProvided {
        /// Which part.
        at: Box<PartAt>,
        /// How long the fetch waited.
        timeout: Duration,
    },
    /// Fetching a part failed.
    #[error("cannot fetch the {at}: {source}")]
    FetchFailed {
        /// Which part.
        at: Box<PartAt>,
        /// Why.
        source: Box<OverlayError>,
    },
    /// Reading a fetched part failed (a block that is not a file, say).
    #[error("cannot read the {at}: {source}")]
    ReadFailed {
        /// Which part.
        at: Box<PartAt>,
        /// Why.
        source: Box<OverlayError>,
    },
    /// The task running the executor was lost (it panicked).
    #[error("the executor failed: {0}")]
    ExecutorLost(#[from] tokio::task::JoinError),
    /// The executor refused or failed the module.
    #[error("{0}")]
    Executor(#[from] ExecError),
    /// The function left more output files than an answer carries.
    #[error("the function left {0} files (at most {MAX_OUTPUT_FILES})")]
    TooManyOutputs(usize),
    /// An output could not be stored.
    #[error("cannot store an output: {0}")]
    Store(Box<OverlayError>),
    /// A repeat of a run whose answer is no longer kept.
    #[error("invocation {0} already ran here and its answer is forgotten")]
    AnswerForgotten(u64),
    /// The node is stopping.
    #[error(transparent)]
    Stopped(#[from] Stopped),
}

impl Failure {
    /// Whether another volunteer might succeed: this one's trouble, not the call's.
    pub(super) fn retryable(&self) -> bool {
        match self {
            Failure::NotLending
            | Failure::NotStarted(_)
            | Failure::ExecutorLost(_)
            | Failure::Store(_)
            | Failure::AnswerForgotten(_)
            | Failure::Stopped(_) => true,
            Failure::Executor(e) => matches!(e, ExecError::Internal(_)),
            Failure::Rejected(_)
            | Failure::NotRunnable(_)
            | Failure::TooLarge { .. }
            | Failure::NotProvided { .. }
            | Failure::FetchFailed { .. }
            | Failure::ReadFailed { .. }
            | Failure::TooManyOutputs(_) => false,
        }
    }
}

impl From<Failure> for Response {
    fn from(failure: Failure) -> Response {
        Response::Failed {
            reason: one_line(&failure.to_string()),
            retryable: failure.retryable(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cid() -> Cid {
        let block = flotilla_overlay::block::Block::encode(0x55, b"x".to_vec().into());
        *block.expect("a small block").cid()
    }

    #[test]
    fn the_volunteers_trouble_is_retryable_and_the_calls_is_not() {
        assert!(Failure::NotLending.retryable());
        assert!(Failure::Executor(ExecError::Internal("engine".into())).retryable());
        assert!(Failure::Store(Box::new(OverlayError::Missing(cid()))).retryable());
        assert!(!Failure::Executor(ExecError::NotWasm("junk".into())).retryable());
        assert!(!Failure::NotRunnable(StartError::ReusedId(7)).retryable());
        assert!(
            !Failure::TooLarge {
                at: PartAt::boxed(&Part::Module, cid()),
                max: 10
            }
            .retryable()
        );
    }

    #[test]
    fn the_answer_names_the_part_and_its_bound_on_one_line() {
        let failure = Failure::TooLarge {
            at: PartAt::boxed(&Part::Input("data.csv".into()), cid()),
            max: 1024,
        };
        let Response::Failed { reason, retryable } = failure.into() else {
            panic!("a failure is answered Failed");
        };
        assert!(!retryable);
        assert_eq!(
            reason,
            format!(
                "the input \"data.csv\" ({}) is larger than the input limit (1024 bytes)",
                cid()
            )
        );
        let Response::Failed { reason, .. } =
            Failure::Executor(ExecError::Refused("no _start\nexport".into())).into()
        else {
            panic!("a failure is answered Failed");
        };
        assert_eq!(reason, "module refused: no _start export");
    }
}
