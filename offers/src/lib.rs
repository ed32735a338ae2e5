//! Flotilla's resource offers, as deterministic state machines: they are handed the
//! current time and what arrived, and return what to send; no sockets, no clock, no tokio.
//!
//! * [`offer`]: the signed offer record;
//! * [`holder`]: offers received, validated and kept by the peer closest to their key;
//! * [`offerer`]: offers sent — a volunteer's memory sliced into offers, published to
//!   random keys in their tiers' regions (Algorithm 1), refreshed, republished when a
//!   holder stops answering, and withdrawn.

pub mod holder;
pub mod offer;
pub mod offerer;
