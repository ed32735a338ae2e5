//! Samples a node process's resource use: CPU time and resident memory from `/proc`, and
//! the bytes its libp2p transports moved from its `/metrics`.

use crate::records::{ResourceRow, unix_ms};

/// Clock ticks per second of `/proc/<pid>/stat` times (USER_HZ, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU ticks (user + system) and resident MiB of `pid`, if it still runs.
pub fn proc_usage(pid: u32) -> Option<(u64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; fields resume after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 of `rest`.
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some((ticks, rss_kib / 1024.0))
}

/// Bytes in and out summed over the `libp2p_bandwidth_bytes_total` series of a
/// Prometheus text page.
pub fn bandwidth(metrics: &str) -> (u64, u64) {
    let (mut inbound, mut outbound) = (0u64, 0u64);
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("libp2p_bandwidth_bytes_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once('}') else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        if labels.contains("direction=\"Inbound\"") {
            inbound += value as u64;
        } else if labels.contains("direction=\"Outbound\"") {
            outbound += value as u64;
        }
    }
    (inbound, outbound)
}

/// Samples one node, remembering the last CPU reading to turn ticks into a rate.
pub struct Sampler {
    instance: u32,
    generation: u32,
    pid: u32,
    api: flotilla_api::client::ApiClient,
    last: Option<(u64, u64)>,
}

impl Sampler {
    /// A sampler of the node `pid` whose API `api` reaches.
    pub fn new(
        instance: u32,
        generation: u32,
        pid: u32,
        api: flotilla_api::client::ApiClient,
    ) -> Sampler {
        Sampler {
            instance,
            generation,
            pid,
            api,
            last: None,
        }
    }

    /// One sample, or `None` once the process is gone. The first sample's CPU is 0.
    pub async fn sample(&mut self) -> Option<ResourceRow> {
        let now = unix_ms();
        let (ticks, rss_mib) = proc_usage(self.pid)?;
        let cpu_percent = match self.last {
            Some((at, before)) if now > at => {
                let seconds = (now - at) as f64 / 1000.0;
                (ticks.saturating_sub(before) as f64 / TICKS_PER_SECOND) / seconds * 100.0
            }
            _ => 0.0,
        };
        self.last = Some((now, ticks));
        let (bytes_in, bytes_out) = match self.api.metrics().await {
            Ok(text) => bandwidth(&text),
            Err(_) => (0, 0),
        };
        let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
        let (store_mib, store_capacity_mib) = match self.api.status().await {
            Ok(status) => (mib(status.store.bytes), mib(status.store.capacity)),
            Err(_) => (0.0, 0.0),
        };
        Some(ResourceRow {
            unix_ms: now,
            instance: self.instance,
            generation: self.generation,
            cpu_percent,
            rss_mib,
            bytes_in,
            bytes_out,
            store_mib,
            store_capacity_mib,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidth_sums_directions_over_transports() {
        let text = "# HELP libp2p_bandwidth_bytes Bandwidth usage\n\
            libp2p_bandwidth_bytes_total{protocols=\"/ip4/tcp\",direction=\"Inbound\"} 100\n\
            libp2p_bandwidth_bytes_total{protocols=\"/ip4/tcp\",direction=\"Outbound\"} 40\n\
            libp2p_bandwidth_bytes_total{protocols=\"/ip4/udp/quic-v1\",direction=\"Inbound\"} 5\n\
            flotilla_other_total 7\n";
        assert_eq!(bandwidth(text), (105, 40));
        assert_eq!(bandwidth(""), (0, 0));
    }

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let (_, rss) = proc_usage(std::process::id()).expect("our own /proc entry");
        assert!(rss > 1.0, "{rss} MiB");
        assert!(proc_usage(u32::MAX).is_none());
    }
}
