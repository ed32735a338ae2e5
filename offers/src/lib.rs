//! Flotilla's resource offers, as deterministic state machines: they are handed the
//! current time and what arrived, and return what to send; no sockets, no clock, no tokio.
//!
//! * [`offer`]: the signed offer record;
//! * [`holder`]: offers received, validated and kept by the peer closest to their key;
//! * [`offerer`]: offers sent — a volunteer's memory sliced into offers, published to
//!   random keys in their tiers' regions (Algorithm 1), refreshed, republished when a
//!   holder stops answering, and withdrawn; it tells schedulers what is free;
//! * [`ledger`]: the volunteer's reservations — owners, holds, calls running on them, at
//!   most one run per owner and invocation.

pub mod holder;
pub mod ledger;
pub mod offer;
pub mod offerer;
