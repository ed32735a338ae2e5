//! Flotilla's schedulers, as deterministic state machines handed the time and what
//! arrived (no sockets, clock or tokio), so the same code runs in the node and in the
//! discovery simulator.
//!
//! * [`discovery`]: Algorithm 2 — random keys in the region of the smallest tier that
//!   fits a request, then larger tiers', the closest peer's offers, up to `max_tries`
//!   probes within a time budget, then the fallback;
//! * [`supertraders`]: the super-trader list that offering peers feed, bounded, with a TTL;
//! * [`placement`]: Algorithm 3 — best fit by default, worst fit and random selectable;
//! * [`placer`]: placing one call — discovery, the ranked offers, reserve-and-run on
//!   each, retries on another volunteer, bounded in attempts, reservations and time;
//! * [`job`]: a detached job on its scheduler — phases, record versions, keepers of
//!   the latest version, retries until its deadline;
//! * [`book`]: the detached jobs' records a node keeps for others — newest version per
//!   job, bounded in all and per scheduler, expiring, republished a few at a time;
//! * [`memos`]: the memoized results of pure calls a node keeps for others — agreeing
//!   volunteers per call, a disagreement contests the call, bounded, expiring;
//! * [`registry`]: the well-known key schedulers announce themselves under;
//! * [`harness`]: N nodes' machines wired through a simulated network (delay, loss,
//!   duplicates, cuts, isolation, crashes) in virtual time, checking the market's
//!   invariants at every step;
//! * [`sim`]: the discovery simulator over thousands of virtual peers (`flotilla-sim`);
//! * [`market_sim`]: the whole market over time on the harness, calls at a rate and
//!   volunteers crashing, beside the baseline (`flotilla-sim market`).

pub mod book;
pub mod discovery;
pub mod harness;
pub mod job;
pub mod market_sim;
pub mod memos;
pub mod placement;
pub mod placer;
pub mod registry;
pub mod sim;
pub mod supertraders;
