//! A network of namespaces for local runs that need shaped links or a partition.
//!
//! Layout (every name starts with the run's tag, so runs never collide):
//!
//! ```text
//!   <tag>-n0 (10.77.1.1)  <tag>-n2 (10.77.1.2) …      <tag>-n1 (10.77.2.1)  <tag>-n3 …
//!        eth0 ── v0 ─┐       eth0 ── v2 ─┐                eth0 ── v1 ─┐
//!   <tag>-ctl:       br-a ──── tr-a ═══ tr-b ──── br-b ───────────────┘
//!                (10.77.1.254/24)            (10.77.2.254/24)
//! ```
//!
//! Every node sits in its own namespace with one veth, `eth0`, in 10.77.0.0/16 (shaped
//! with `tc netem` when latency or loss is asked for). The other ends hang on bridge
//! `br-a` (even instances) or `br-b` (odd ones) in the control namespace, and a veth pair,
//! the trunk, joins the two bridges: taking it down splits the network, bringing it up
//! heals it. The control namespace has an address on each bridge (and no forwarding), so
//! the simulation, which runs there, reaches every node's API on either side of a split.
//!
//! [`Topology::remove`] (also on drop) kills whatever still runs in the namespaces and
//! deletes them; nothing is made outside them. One setting outside them may change: the
//! kernel keeps a single ARP table for all namespaces (1024 entries by default), and a DHT
//! of N nodes needs about N² entries, so [`Topology::create`] raises the table's limits
//! when they are too low for the run (never lowers them). Without this, a 50-node run
//! loses a random few nodes to "neighbour table overflow". The first run to raise them
//! saves the values it found ([`ArpLimits`]); they are put back when the last topology
//! (any namespace named [`NAMESPACE_PREFIX`]…) is removed, by [`Topology::remove`] or by
//! `flotilla-plan cleanup` after a run that was killed.

use super::{LinkError, Links, Side, run_blocking, run_command};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::Command;

/// The trunk's end on side A's bridge.
const TRUNK: &str = "tr-a";

/// The prefix every topology's tag starts with (simulations add their owner and process
/// id), so the last one removed knows it is the last.
pub const NAMESPACE_PREFIX: &str = "flsim";

/// Whether network namespaces can be made here (root, with `ip` and `tc`).
pub fn available() -> bool {
    let ok = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    root && ok("ip", &["netns", "list"]) && ok("tc", &["-V"])
}

/// The address of instance `seq` (0-based).
pub fn node_ip(seq: u32) -> Ipv4Addr {
    let side = match Side::of(seq) {
        Side::A => 1,
        Side::B => 2,
    };
    let host = seq / 2 + 1;
    Ipv4Addr::new(10, 77, side, host as u8)
}

/// Most instances one topology holds (253 per side).
pub const MAX_NODES: u32 = 506;

/// Namespaces, bridges and links of one run.
pub struct Topology {
    tag: String,
    nodes: u32,
    removed: bool,
}

fn sh(args: &[&str]) -> Result<(), LinkError> {
    run_blocking("ip", args)
}

/// Where the kernel's ARP table limits live (shared by every namespace).
const NEIGHBOUR_LIMITS: &str = "/proc/sys/net/ipv4/neigh/default";

/// The ARP entries a run of `nodes` needs at most: each namespace, the control one
/// included, may know every other.
pub fn neighbours_needed(nodes: u32) -> u64 {
    u64::from(nodes + 1).pow(2)
}

/// The ARP table limits (`gc_thresh2`, `gc_thresh3`: where the kernel starts pruning, and
/// the hard limit) a run of `nodes` asks for, with room for the host's own entries.
pub fn neighbour_limits_for(nodes: u32) -> (u64, u64) {
    let entries = neighbours_needed(nodes);
    (entries + 512, 2 * entries + 1024)
}

/// The shared ARP table's limits `gc_thresh2` and `gc_thresh3`, and the file that keeps
/// the values they had before a run raised them.
#[derive(Debug, Clone)]
pub struct ArpLimits {
    /// Where `gc_thresh2` and `gc_thresh3` are.
    pub dir: PathBuf,
    /// Where the values found before the first raise are kept.
    pub saved: PathBuf,
}

/// The limits as they were before any run raised them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct SavedLimits {
    gc_thresh2: u64,
    gc_thresh3: u64,
}

impl ArpLimits {
    /// This machine's limits; the old values are kept in the temporary directory.
    pub fn system() -> ArpLimits {
        ArpLimits {
            dir: PathBuf::from(NEIGHBOUR_LIMITS),
            saved: std::env::temp_dir().join("flotilla-netns-arp-limits.json"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The current value of `name`.
    pub fn read(&self, name: &str) -> Result<u64, LinkError> {
        let path = self.path(name);
        std::fs::read_to_string(&path)
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .ok_or_else(|| LinkError::Unsupported(format!("cannot read {}", path.display())))
    }

    /// Keeps the current values, unless values are kept already (an earlier run raised
    /// them and has not put them back).
    fn save(&self) -> Result<(), LinkError> {
        let saved = SavedLimits {
            gc_thresh2: self.read("gc_thresh2")?,
            gc_thresh3: self.read("gc_thresh3")?,
        };
        let failed = |reason: String| LinkError::Command {
            command: format!("saving the ARP limits to {}", self.saved.display()),
            reason,
        };
        let text = serde_json::to_string(&saved).map_err(|e| failed(e.to_string()))?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&self.saved);
        match file {
            Ok(mut file) => std::io::Write::write_all(&mut file, text.as_bytes())
                .map_err(|e| failed(e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(failed(e.to_string())),
        }
    }

    /// Raises the limits to what `nodes` ask for, if they are lower, keeping the old
    /// values first. Where they cannot be written (a read-only `/proc/sys`), a hard limit
    /// that still holds every entry the run needs is enough; a smaller one is an error.
    pub fn raise(&self, nodes: u32) -> Result<(), LinkError> {
        let (soft, hard) = neighbour_limits_for(nodes);
        if self.read("gc_thresh3")? < hard || self.read("gc_thresh2")? < soft {
            self.save()?;
        }
        // The hard limit first, so the soft one never exceeds it.
        for (name, wanted) in [("gc_thresh3", hard), ("gc_thresh2", soft)] {
            let current = self.read(name)?;
            if current >= wanted {
                continue;
            }
            let path = self.path(name).display().to_string();
            match std::fs::write(self.path(name), wanted.to_string()) {
                Ok(()) => {
                    tracing::info!(%path, from = current, to = wanted, "raised the shared ARP table's limit");
                }
                Err(e) if name == "gc_thresh2" || current >= neighbours_needed(nodes) => {
                    tracing::warn!(%path, current, wanted, error = %e, "cannot raise the shared ARP table's limit");
                }
                Err(e) => {
                    return Err(LinkError::Unsupported(format!(
                        "{nodes} nodes need {} ARP entries and {path} is {current}: {e}",
                        neighbours_needed(nodes)
                    )));
                }
            }
        }
        Ok(())
    }

    /// Puts back the values kept by the first raise, if any, and forgets them; returns
    /// whether there were any.
    pub fn restore(&self) -> Result<bool, LinkError> {
        let text = match std::fs::read_to_string(&self.saved) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => {
                return Err(LinkError::Unsupported(format!(
                    "{}: {e}",
                    self.saved.display()
                )));
            }
        };
        let saved: SavedLimits = serde_json::from_str(&text)
            .map_err(|e| LinkError::Unsupported(format!("{}: {e}", self.saved.display())))?;
        // Lowering: the soft limit first, so it never exceeds the hard one.
        for (name, value) in [
            ("gc_thresh2", saved.gc_thresh2),
            ("gc_thresh3", saved.gc_thresh3),
        ] {
            std::fs::write(self.path(name), value.to_string()).map_err(|e| LinkError::Command {
                command: format!("restoring {}", self.path(name).display()),
                reason: e.to_string(),
            })?;
        }
        let _ = std::fs::remove_file(&self.saved);
        tracing::info!(
            gc_thresh2 = saved.gc_thresh2,
            gc_thresh3 = saved.gc_thresh3,
            "restored the shared ARP table's limits"
        );
        Ok(true)
    }
}

/// Puts the ARP limits back as they were before the first run raised them, once no
/// topology is left (no namespace named [`NAMESPACE_PREFIX`]…).
pub fn restore_limits_if_unused() {
    if !leftovers(NAMESPACE_PREFIX).is_empty() {
        return;
    }
    if let Err(e) = ArpLimits::system().restore() {
        tracing::warn!(error = %e, "cannot restore the shared ARP table's limits");
    }
}

impl Topology {
    /// Makes the namespaces of `nodes` instances; links get `latency_ms` of delay and
    /// `loss_percent` of loss each way. On any failure what was made is removed.
    pub fn create(
        tag: &str,
        nodes: u32,
        latency_ms: u32,
        loss_percent: f64,
    ) -> Result<Topology, LinkError> {
        if nodes > MAX_NODES {
            return Err(LinkError::Unsupported(format!(
                "at most {MAX_NODES} nodes in network namespaces"
            )));
        }
        if !tag.starts_with(NAMESPACE_PREFIX) {
            return Err(LinkError::Unsupported(format!(
                "a topology's tag starts with {NAMESPACE_PREFIX}, not {tag}"
            )));
        }
        let mut topology = Topology {
            tag: tag.to_string(),
            nodes: 0,
            removed: false,
        };
        // The control namespace first: while it exists, no other run's removal puts the
        // limits back under this one.
        topology.build_control()?;
        let limits = ArpLimits::system();
        limits.raise(nodes)?;
        for seq in 0..nodes {
            topology.nodes = seq + 1;
            topology.add_node(seq, latency_ms, loss_percent)?;
        }
        // Again, in case another run put them back while these namespaces were made.
        limits.raise(nodes)?;
        Ok(topology)
    }

    /// The control namespace, where the simulation runs.
    pub fn control(&self) -> String {
        format!("{}-ctl", self.tag)
    }

    /// Instance `seq`'s namespace.
    pub fn node_namespace(&self, seq: u32) -> String {
        format!("{}-n{seq}", self.tag)
    }

    fn build_control(&mut self) -> Result<(), LinkError> {
        let ctl = self.control();
        sh(&["netns", "add", &ctl])?;
        let steps: [&[&str]; 11] = [
            &["-n", &ctl, "link", "set", "lo", "up"],
            &[
                "-n",
                &ctl,
                "link",
                "add",
                "br-a",
                "type",
                "bridge",
                "forward_delay",
                "0",
            ],
            &[
                "-n",
                &ctl,
                "link",
                "add",
                "br-b",
                "type",
                "bridge",
                "forward_delay",
                "0",
            ],
            &[
                "-n", &ctl, "link", "add", TRUNK, "type", "veth", "peer", "name", "tr-b",
            ],
            &["-n", &ctl, "link", "set", TRUNK, "master", "br-a"],
            &["-n", &ctl, "link", "set", "tr-b", "master", "br-b"],
            &["-n", &ctl, "addr", "add", "10.77.1.254/24", "dev", "br-a"],
            &["-n", &ctl, "addr", "add", "10.77.2.254/24", "dev", "br-b"],
            &["-n", &ctl, "link", "set", "br-a", "up"],
            &["-n", &ctl, "link", "set", "br-b", "up"],
            &["-n", &ctl, "link", "set", TRUNK, "up"],
        ];
        for step in steps {
            sh(step)?;
        }
        sh(&["-n", &ctl, "link", "set", "tr-b", "up"])?;
        // No routing between the bridges: a split must be a split. And each bridge
        // answers ARP only for its own address: otherwise a node may learn the other
        // bridge's hardware address for its side's gateway, and lose the control
        // namespace (its API's client) when the network splits.
        sh(&[
            "netns",
            "exec",
            &ctl,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=0",
            "net.ipv4.conf.all.arp_ignore=1",
            "net.ipv4.conf.all.arp_announce=2",
        ])?;
        Ok(())
    }

    fn add_node(&self, seq: u32, latency_ms: u32, loss_percent: f64) -> Result<(), LinkError> {
        let ns = self.node_namespace(seq);
        let ctl = self.control();
        let port = format!("v{seq}");
        let bridge = match Side::of(seq) {
            Side::A => "br-a",
            Side::B => "br-b",
        };
        let address = format!("{}/16", node_ip(seq));
        sh(&["netns", "add", &ns])?;
        sh(&[
            "-n", &ctl, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        sh(&["-n", &ctl, "link", "set", &port, "master", bridge])?;
        sh(&["-n", &ctl, "link", "set", &port, "up"])?;
        sh(&["-n", &ns, "link", "set", "lo", "up"])?;
        sh(&["-n", &ns, "addr", "add", &address, "dev", "eth0"])?;
        sh(&["-n", &ns, "link", "set", "eth0", "up"])?;
        if latency_ms > 0 || loss_percent > 0.0 {
            let delay = format!("{latency_ms}ms");
            let loss = format!("{loss_percent}%");
            sh(&[
                "netns", "exec", &ns, "tc", "qdisc", "add", "dev", "eth0", "root", "netem",
                "delay", &delay, "loss", &loss,
            ])?;
        }
        Ok(())
    }

    /// The links handle of this topology, for the simulation inside it.
    pub fn links(&self) -> NetnsLinks {
        NetnsLinks {
            control: self.control(),
        }
    }

    /// Kills every process left in the namespaces and deletes them. Idempotent.
    pub fn remove(&mut self) {
        if self.removed {
            return;
        }
        self.removed = true;
        let mut namespaces: Vec<String> = (0..self.nodes).map(|s| self.node_namespace(s)).collect();
        namespaces.push(self.control());
        for ns in &namespaces {
            kill_everything_in(ns);
        }
        for ns in &namespaces {
            if let Err(e) = sh(&["netns", "del", ns]) {
                tracing::warn!(namespace = %ns, error = %e, "could not delete namespace");
            }
        }
        restore_limits_if_unused();
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.remove();
    }
}

/// SIGKILLs every process in namespace `ns`.
fn kill_everything_in(ns: &str) {
    let Ok(output) = Command::new("ip").args(["netns", "pids", ns]).output() else {
        return;
    };
    for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
        if pid.parse::<u32>().is_ok_and(|p| p != std::process::id()) {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
    }
}

/// Namespaces named `<prefix>…` that are left over from runs that could not clean up
/// (e.g. SIGKILLed), for `flotilla-plan cleanup`.
pub fn leftovers(prefix: &str) -> Vec<String> {
    let Ok(output) = Command::new("ip").args(["netns", "list"]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| name.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

/// Deletes namespaces by name, killing what runs in them first.
pub fn delete(namespaces: &[String]) {
    for ns in namespaces {
        kill_everything_in(ns);
        let _ = sh(&["netns", "del", ns]);
    }
}

/// Splits and heals by taking the trunk between the two bridges down and up.
#[derive(Debug, Clone)]
pub struct NetnsLinks {
    control: String,
}

impl NetnsLinks {
    /// The links of the topology whose control namespace is `control`.
    pub fn new(control: String) -> NetnsLinks {
        NetnsLinks { control }
    }
}

impl Links for NetnsLinks {
    async fn split(&self, _side: Side, _others: &[IpAddr]) -> Result<(), LinkError> {
        run_command("ip", &["-n", &self.control, "link", "set", TRUNK, "down"]).await
    }

    async fn heal(&self) -> Result<(), LinkError> {
        run_command("ip", &["-n", &self.control, "link", "set", TRUNK, "up"]).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_alternate_sides_with_distinct_addresses() {
        assert_eq!(node_ip(0), Ipv4Addr::new(10, 77, 1, 1));
        assert_eq!(node_ip(1), Ipv4Addr::new(10, 77, 2, 1));
        assert_eq!(node_ip(4), Ipv4Addr::new(10, 77, 1, 3));
        let all: std::collections::HashSet<_> = (0..MAX_NODES).map(node_ip).collect();
        assert_eq!(all.len(), MAX_NODES as usize);
    }

    #[test]
    fn the_arp_table_limits_grow_with_the_square_of_the_nodes() {
        // 50 nodes, each knowing the other 49 and the control namespace: 2550 entries,
        // more than the kernel's default hard limit of 1024.
        let (soft, hard) = neighbour_limits_for(50);
        assert!(
            soft >= 51 * 51 && hard > soft && hard >= 1024,
            "{soft} {hard}"
        );
        let (_, hard_at_most) = neighbour_limits_for(MAX_NODES);
        assert!(hard_at_most < 1 << 20, "bounded: {hard_at_most}");
    }

    /// Whether namespaces can be made here; says so on stderr when not (the test then
    /// passes without checking anything).
    fn namespaces_or_skip(test: &str) -> bool {
        let ok = available();
        if !ok {
            #[allow(clippy::print_stderr)]
            {
                eprintln!("{test}: skipped: needs root with `ip` and `tc` (network namespaces)");
            }
        }
        ok
    }

    /// Limits in a directory of their own, kept beside them.
    fn fake_limits(soft: u64, hard: u64) -> (tempfile::TempDir, ArpLimits) {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("gc_thresh2"), format!("{soft}\n")).expect("write");
        std::fs::write(dir.path().join("gc_thresh3"), format!("{hard}\n")).expect("write");
        let limits = ArpLimits {
            dir: dir.path().to_path_buf(),
            saved: dir.path().join("saved.json"),
        };
        (dir, limits)
    }

    #[test]
    fn raised_limits_are_put_back_as_the_first_raise_found_them() {
        let (_dir, limits) = fake_limits(512, 1024);
        limits.raise(50).expect("raise");
        let (soft, hard) = neighbour_limits_for(50);
        assert_eq!(
            (
                limits.read("gc_thresh2").unwrap(),
                limits.read("gc_thresh3").unwrap()
            ),
            (soft, hard)
        );
        // A second run, bigger: the values kept are still the first ones.
        limits.raise(100).expect("raise again");
        assert_eq!(
            limits.read("gc_thresh3").unwrap(),
            neighbour_limits_for(100).1
        );
        assert!(
            limits.restore().expect("restore"),
            "there was something to put back"
        );
        assert_eq!(
            (
                limits.read("gc_thresh2").unwrap(),
                limits.read("gc_thresh3").unwrap()
            ),
            (512, 1024)
        );
        assert!(!limits.saved.exists(), "forgotten once put back");
        assert!(
            !limits.restore().expect("restore again"),
            "nothing left to put back"
        );
    }

    #[test]
    fn limits_high_enough_are_neither_raised_nor_touched_on_restore() {
        let (_dir, limits) = fake_limits(1 << 20, 1 << 21);
        limits.raise(50).expect("raise");
        assert!(!limits.saved.exists(), "nothing raised, nothing kept");
        assert!(!limits.restore().expect("restore"));
        assert_eq!(limits.read("gc_thresh3").unwrap(), 1 << 21);
    }

    #[test]
    fn a_tag_outside_the_prefix_is_refused() {
        let err = Topology::create("other", 2, 0, 0.0).err().expect("refused");
        assert!(err.to_string().contains(NAMESPACE_PREFIX), "{err}");
    }

    /// Needs root and `ip`; skipped (passing, saying so) where namespaces cannot be made.
    #[test]
    fn a_split_cuts_the_two_sides_apart_and_a_heal_joins_them() {
        if !namespaces_or_skip("a_split_cuts_the_two_sides_apart_and_a_heal_joins_them") {
            return;
        }
        let tag = format!("{NAMESPACE_PREFIX}test{}p", std::process::id());
        let topology = Topology::create(&tag, 3, 0, 0.0).expect("topology");
        let hard: u64 = std::fs::read_to_string(format!("{NEIGHBOUR_LIMITS}/gc_thresh3"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(
            hard >= neighbour_limits_for(3).1,
            "the ARP table fits the run"
        );
        // A TCP connect to a closed port is refused when the peer is reachable and
        // times out when it is not (no ping needed).
        // A few attempts, as a busy machine may be slow to start `ip` and `bash`.
        let ping = |from: u32, to: u32| {
            let script = format!("exec 3<>/dev/tcp/{}/9", node_ip(to));
            (0..5).any(|_| {
                Command::new("ip")
                    .args(["netns", "exec", &topology.node_namespace(from)])
                    .args(["timeout", "2", "bash", "-c", &script])
                    .output()
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stderr).contains("refused"))
            })
        };
        assert!(ping(0, 1) && ping(0, 2), "all reachable before the split");
        let links = topology.links();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(links.split(Side::A, &[])).expect("split");
        assert!(!ping(0, 1), "across the split");
        assert!(ping(0, 2), "same side");
        runtime.block_on(links.heal()).expect("heal");
        assert!(ping(0, 1), "healed");
        drop(topology);
        assert!(leftovers(&tag).is_empty(), "namespaces removed");
    }

    /// Shaped links need the kernel's netem qdisc: with it a topology is made, without it
    /// the error names netem; either way nothing is left behind.
    #[test]
    fn shaped_links_are_made_or_refused_naming_netem() {
        if !namespaces_or_skip("shaped_links_are_made_or_refused_naming_netem") {
            return;
        }
        let tag = format!("{NAMESPACE_PREFIX}test{}s", std::process::id());
        match Topology::create(&tag, 2, 1, 0.5) {
            Ok(topology) => drop(topology),
            Err(e) => assert!(e.to_string().contains("netem"), "{e}"),
        }
        assert!(leftovers(&tag).is_empty(), "namespaces removed");
    }
}
