//! What the CLI prints on stdout: results for people, or JSON with `--json`, plus
//! progress bars on stderr for transfers that take more than a moment.
#![allow(clippy::print_stdout)]

use crate::api::types::{PinView, RepoStat};
use crate::daemon::RunningNode;
use crate::market::{Discovered, OffersView};
use bytesize::ByteSize;
use flotilla_offers::ledger::ReservationState;
use flotilla_overlay::OverlayStatus;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use std::time::{Duration, Instant};

/// Prints a value as one line of JSON.
pub fn json<T: Serialize>(value: &T) {
    println!(
        "{}",
        serde_json::to_string(value).expect("results serialize")
    );
}

/// Prints a line of human-readable output.
pub fn line(text: &str) {
    println!("{text}");
}

/// Announces a started node: its PeerId, listen addresses and API address.
pub fn node_started(node: &RunningNode, as_json: bool) {
    if as_json {
        let addrs: Vec<String> = node
            .listen_addrs()
            .iter()
            .map(|a| format!("{a}/p2p/{}", node.peer_id()))
            .collect();
        json(&serde_json::json!({
            "peer_id": node.peer_id().to_string(),
            "listen_addrs": addrs,
            "api": node.api_addr().to_string(),
        }));
        return;
    }
    println!("flotilla node {}", node.peer_id());
    for addr in node.listen_addrs() {
        println!("  listening on {addr}/p2p/{}", node.peer_id());
    }
    println!("  API on http://{}", node.api_addr());
}

/// Prints a node's status.
pub fn status(status: &OverlayStatus) {
    println!("peer id:         {}", status.network.peer_id);
    for addr in &status.network.listen_addrs {
        println!("listening on:    {addr}");
    }
    println!("connected peers: {}", status.network.connected_peers.len());
    println!(
        "routing tables:  {} peers (content), {} (market)",
        status.network.routing_table_size, status.network.market_routing_table_size
    );
    println!(
        "blocks held:     {} ({} of {})",
        status.store.blocks,
        ByteSize(status.store.bytes).display().iec(),
        ByteSize(status.store.capacity).display().iec()
    );
}

/// A byte count as people read it (`1.5 GiB`).
pub fn bytes(n: u64) -> String {
    ByteSize(n).display().iec().to_string()
}

/// `flotilla pin ls`: one pin a line, newest last.
pub fn pins(pins: &[PinView]) {
    if pins.is_empty() {
        println!("no pins");
        return;
    }
    let mut pins = pins.to_vec();
    pins.sort_by_key(|p| p.pinned_at_ms);
    for pin in &pins {
        println!(
            "{}  {:>10}  {} blocks",
            pin.cid,
            bytes(pin.bytes),
            pin.blocks
        );
    }
}

/// `flotilla repo stat`.
pub fn repo_stat(stat: &RepoStat) {
    let s = &stat.store;
    let cached = s.bytes - s.pinned_bytes;
    println!(
        "capacity:   {} ({} used, {} free)",
        bytes(s.capacity),
        bytes(s.bytes),
        bytes(s.capacity.saturating_sub(s.bytes))
    );
    println!(
        "pinned:     {} in {} blocks, {} pins",
        bytes(s.pinned_bytes),
        s.pinned_blocks,
        stat.pins
    );
    println!(
        "cached:     {} in {} blocks",
        bytes(cached),
        s.blocks - s.pinned_blocks
    );
    println!(
        "  in use:   {} (calls, fetches and reads under way, and calls' data kept after them)",
        bytes(s.in_use_bytes)
    );
    println!(
        "  evictable: {} in {} blocks (what gc frees now)",
        bytes(s.evictable_bytes),
        s.evictable_blocks
    );
    if s.pinned_bytes > s.capacity {
        println!(
            "warning: the pins alone exceed the capacity; this node lends no memory until pins are removed or the capacity raised"
        );
    }
}

/// A PeerId shortened for tables: its last eight characters.
fn short(peer: &str) -> &str {
    &peer[peer.len().saturating_sub(8)..]
}

/// Seconds from now until `at_ms` (Unix ms), for expiry columns.
fn in_seconds(at_ms: u64) -> String {
    let now = crate::market::now_ms();
    format!("{:.0}s", at_ms.saturating_sub(now) as f64 / 1000.0)
}

/// Prints what a node offers, reserves and holds.
pub fn offers(view: &OffersView) {
    let role = match (view.offer_memory_mib > 0, view.scheduler) {
        (true, true) => "offerer and scheduler",
        (true, false) => "offerer",
        (false, true) => "scheduler",
        (false, false) => "holder only",
    };
    println!("role: {role}");
    if view.offer_memory_mib > 0 {
        println!(
            "lends {} MiB in {} offer(s):",
            view.offer_memory_mib,
            view.sent.len()
        );
        println!(
            "  {:>20}  {:>6}  {:>6}  {:>6}  {:>4}  {:<10}  {:>8}  expires",
            "offer", "tier", "MiB", "in use", "seq", "state", "holder"
        );
        for o in &view.sent {
            println!(
                "  {:>20}  {:>6}  {:>6}  {:>6}  {:>4}  {:<10}  {:>8}  {}",
                o.offer_id,
                o.tier_mib,
                o.memory_mib,
                o.in_use_mib,
                o.seq,
                o.state,
                o.holder.as_deref().map_or("-", short),
                o.expires_at_ms.map_or("-".into(), in_seconds),
            );
        }
        for r in &view.reservations {
            let hold = match r.state {
                ReservationState::Held { until_ms } => format!("held {}", in_seconds(until_ms)),
                ReservationState::Running { invocation_id, .. } => {
                    format!("running invocation {invocation_id}")
                }
            };
            println!(
                "  reservation {} on offer {}: {} MiB for {}, {hold}",
                r.reservation_id,
                r.offer_id,
                r.mib,
                short(&r.owner.to_string())
            );
        }
    }
    println!("holds {} offer(s) for others:", view.held.len());
    for h in &view.held {
        println!(
            "  {:>8}  offer {:>20}  tier {:>6}  {:>6} MiB  {:>6} free  expires {}",
            short(&h.offer.offerer),
            h.offer.offer_id,
            h.offer.tier_mib,
            h.offer.memory_mib,
            h.offer.free_mib,
            in_seconds(h.expires_at_ms),
        );
    }
    if view.scheduler {
        println!("super-trader list: {} offer(s)", view.super_traders);
    }
}

/// Prints the outcome of a discovery.
pub fn discovered(d: &Discovered) {
    let r = &d.report;
    println!("scheduler:  {}", d.scheduler);
    println!(
        "request:    {} MiB, probing the {} MiB region first, then larger ones",
        r.request_mib, r.tier_mib
    );
    println!("probes:     {}", r.probes.len());
    for (i, p) in r.probes.iter().enumerate() {
        match &p.holder {
            Some(holder) => println!(
                "  {}. {} MiB region: asked {holder}: {} offer(s), {} fit",
                i + 1,
                p.tier_mib,
                p.offers_seen,
                p.offers_fitting
            ),
            None => println!(
                "  {}. {} MiB region: no peer found for the key",
                i + 1,
                p.tier_mib
            ),
        }
    }
    if r.out_of_time {
        println!("            (the discovery's time budget ran out)");
    }
    println!(
        "fallback:   {}",
        if r.used_fallback { "used" } else { "not used" }
    );
    println!("found:      {} offer(s)", r.found);
    for o in &d.offers {
        println!(
            "  {} offer {} (tier {} MiB): {} of {} MiB free",
            o.offerer, o.offer_id, o.tier_mib, o.free_mib, o.memory_mib
        );
    }
    if let Some(p) = &d.placement {
        println!(
            "reserved:   {} MiB of offer {} on {} (reservation {})",
            p.reservation.mib,
            p.reservation.offer_id,
            p.offer.body.offerer,
            p.reservation.reservation_id
        );
    }
    println!(
        "messages:   {} ({} of them Kademlia lookup requests)",
        r.messages, d.lookup_requests
    );
    println!("time:       {} ms", r.elapsed_ms);
}

/// A progress bar that shows itself on a terminal only once a transfer has taken more
/// than half a second.
pub struct Progress {
    bar: ProgressBar,
    started: Instant,
    shown: bool,
}

impl Progress {
    /// A bar for a transfer of `total` bytes (unknown if `None`).
    pub fn new(label: &str, total: Option<u64>) -> Progress {
        let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::hidden());
        let template = if total.is_some() {
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
        } else {
            "{msg} {bytes} {bytes_per_sec}"
        };
        bar.set_style(
            ProgressStyle::with_template(template)
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_message(label.to_string());
        Progress {
            bar,
            started: Instant::now(),
            shown: false,
        }
    }

    /// Sets the bytes done so far.
    pub fn set(&mut self, done: u64) {
        if !self.shown && self.started.elapsed() > Duration::from_millis(500) {
            self.bar.set_draw_target(ProgressDrawTarget::stderr());
            self.shown = true;
        }
        self.bar.set_position(done);
    }

    /// Removes the bar.
    pub fn finish(self) {
        self.bar.finish_and_clear();
    }
}
