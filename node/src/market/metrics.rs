//! Prometheus metrics of offers, discovery and invocations, under the `flotilla_offers_`,
//! `flotilla_discovery_` and `flotilla_invocations_` prefixes.
//!
//! The fallback share is `flotilla_discovery_fallback_total / flotilla_discovery_total`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets, linear_buckets};
use prometheus_client::registry::Registry;

/// A label with one reason or outcome.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReasonLabel {
    /// The reason.
    pub reason: String,
}

/// The market's metrics.
#[derive(Debug, Clone)]
pub struct MarketMetrics {
    /// Offer versions (new or refreshed) this node published that a holder accepted.
    pub published: Counter,
    /// Offer versions (new or refreshed) this node accepted as holder.
    pub received: Counter,
    /// Offers this node holds for others now.
    pub held: Gauge,
    /// Held offers that expired.
    pub expired: Counter,
    /// Offers this node refused to hold, by reason.
    pub rejected: Family<ReasonLabel, Counter>,
    /// Reservations granted on this node's offers.
    pub reservations: Counter,
    /// Reservations refused, by reason.
    pub reservations_refused: Family<ReasonLabel, Counter>,
    /// Discoveries this node ran as a scheduler.
    pub discoveries: Counter,
    /// Of those, discoveries that used the super-trader list.
    pub fallbacks: Counter,
    /// Of those, discoveries that found nothing.
    pub discoveries_failed: Counter,
    /// Region probes per discovery.
    pub probes: Histogram,
    /// Messages per discovery (lookup requests, holder questions, reservations).
    pub messages: Histogram,
    /// Time per discovery, in seconds.
    pub seconds: Histogram,
    /// Requests refused as malformed, or sent on another concern's protocol.
    pub malformed: Counter,
    /// Discoveries and calls dropped because the peer that asked for them left.
    pub abandoned: Counter,
    /// Job results not copied because their scheduler's quota had no room.
    pub copies_refused: Counter,
    /// Bytes of others' job results this node agreed to copy.
    pub copies_charged: Gauge,
    /// Commands of the market's loop that panicked (a bug; the loop goes on).
    pub command_panics: Counter,
    /// Calls this node placed as scheduler.
    pub invocations: Counter,
    /// Of those, calls that did not run (nothing fit, the call's fault, volunteers failed).
    pub invocations_failed: Counter,
    /// Calls placed again after a volunteer failed.
    pub invocation_retries: Counter,
    /// Receipts passed on unchecked that a client reported refusing, by what this node's
    /// check of them found (`forged`, `valid`).
    pub receipt_reports: Family<ReasonLabel, Counter>,
    /// Time from taking a call to its answer, as scheduler, in seconds.
    pub invocation_seconds: Histogram,
    /// Calls this node ran as volunteer.
    pub executions: Counter,
    /// Calls this node could not run as volunteer.
    pub executions_failed: Counter,
}

impl MarketMetrics {
    /// Creates the metrics and registers them under `registry`.
    pub fn new(registry: &mut Registry) -> MarketMetrics {
        let m = MarketMetrics {
            published: Counter::default(),
            received: Counter::default(),
            held: Gauge::default(),
            expired: Counter::default(),
            rejected: Family::default(),
            reservations: Counter::default(),
            reservations_refused: Family::default(),
            discoveries: Counter::default(),
            fallbacks: Counter::default(),
            discoveries_failed: Counter::default(),
            probes: Histogram::new(linear_buckets(1.0, 1.0, 10)),
            messages: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            malformed: Counter::default(),
            abandoned: Counter::default(),
            copies_refused: Counter::default(),
            copies_charged: Gauge::default(),
            command_panics: Counter::default(),
            invocations: Counter::default(),
            invocations_failed: Counter::default(),
            invocation_retries: Counter::default(),
            receipt_reports: Family::default(),
            invocation_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 20)),
            executions: Counter::default(),
            executions_failed: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("flotilla_offers");
        r.register(
            "published",
            "Offer versions this node published that a holder accepted",
            m.published.clone(),
        );
        r.register(
            "received",
            "Offer versions this node accepted as holder",
            m.received.clone(),
        );
        r.register("held", "Offers held for others now", m.held.clone());
        r.register("expired", "Held offers that expired", m.expired.clone());
        r.register(
            "rejected",
            "Offers refused by this node as holder, by reason",
            m.rejected.clone(),
        );
        r.register(
            "reservations",
            "Reservations granted on this node's offers",
            m.reservations.clone(),
        );
        r.register(
            "reservations_refused",
            "Reservations refused, by reason",
            m.reservations_refused.clone(),
        );
        r.register(
            "malformed_requests",
            "Requests refused as malformed",
            m.malformed.clone(),
        );
        r.register(
            "abandoned_requests",
            "Discoveries and calls dropped because the peer that asked left",
            m.abandoned.clone(),
        );
        r.register(
            "copies_refused",
            "Job results not copied because their scheduler's quota had no room",
            m.copies_refused.clone(),
        );
        r.register(
            "copies_charged_bytes",
            "Bytes of others' job results this node agreed to copy",
            m.copies_charged.clone(),
        );
        r.register(
            "command_panics",
            "Commands of the market's loop that panicked (a bug; the loop goes on)",
            m.command_panics.clone(),
        );
        let r = registry.sub_registry_with_prefix("flotilla_discovery");
        r.register(
            "discoveries",
            "Discoveries run as scheduler",
            m.discoveries.clone(),
        );
        r.register(
            "fallback",
            "Discoveries that used the super-trader list",
            m.fallbacks.clone(),
        );
        r.register(
            "failed",
            "Discoveries that found no fitting offer",
            m.discoveries_failed.clone(),
        );
        r.register("probes", "Region probes per discovery", m.probes.clone());
        r.register(
            "messages",
            "Messages sent per discovery",
            m.messages.clone(),
        );
        r.register("duration_seconds", "Time per discovery", m.seconds.clone());
        let r = registry.sub_registry_with_prefix("flotilla_invocations");
        r.register("placed", "Calls placed as scheduler", m.invocations.clone());
        r.register(
            "failed",
            "Calls placed as scheduler that did not run",
            m.invocations_failed.clone(),
        );
        r.register(
            "retries",
            "Calls placed again after a volunteer failed",
            m.invocation_retries.clone(),
        );
        r.register(
            "receipt_reports",
            "Receipts passed on unchecked that a client reported refusing, by what the check found",
            m.receipt_reports.clone(),
        );
        r.register(
            "duration_seconds",
            "Time from taking a call to its answer, as scheduler",
            m.invocation_seconds.clone(),
        );
        r.register("executed", "Calls run as volunteer", m.executions.clone());
        r.register(
            "execution_failures",
            "Calls that could not run here as volunteer",
            m.executions_failed.clone(),
        );
        m
    }

    /// Counts a refusal in `family` under `reason`.
    pub fn count(family: &Family<ReasonLabel, Counter>, reason: &str) {
        family
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }
}
