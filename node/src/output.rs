//! What the CLI prints on stdout: results for people, or JSON with `--json`, plus
//! progress bars on stderr for transfers that take more than a moment.
#![allow(clippy::print_stdout)]

use crate::daemon::RunningNode;
use bytesize::ByteSize;
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
        "routing table:   {} peers",
        status.network.routing_table_size
    );
    println!(
        "blocks held:     {} ({} of {})",
        status.store.blocks,
        ByteSize(status.store.bytes).display().iec(),
        ByteSize(status.store.capacity).display().iec()
    );
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
