//! The node's configuration: defaults, a TOML file, then command-line flags, in that order
//! of precedence (flags win).
//!
//! Every setting and its default:
//!
//! | key              | flag               | default                                                   |
//! |------------------|--------------------|-----------------------------------------------------------|
//! | `data_dir`       | `--data-dir`       | `$FLOTILLA_DATA`, else `$HOME/.flotilla`                  |
//! | `listen`         | `--listen` (many)  | `/ip4/0.0.0.0/tcp/4100`, `/ip4/0.0.0.0/udp/4100/quic-v1`  |
//! | `bootstrap`      | `--bootstrap` (many)| none                                                     |
//! | `api`            | `--api`            | `127.0.0.1:4180`                                          |
//! | `api_allow_remote`| `--api-allow-remote`| `false`: `api` must be loopback; when set, requests need the token in `<data_dir>/api.token` |
//! | `network_key`    | `--network-key`    | none: an open network; a swarm.key file closes it to its holders (TCP only, no QUIC) |
//! | `schedulers`     | `--schedulers`     | none: any peer may reserve and run calls here; else only these PeerIds (and this node) |
//! | `mdns`           | `--no-mdns` (off)  | `true`                                                    |
//! | `max_connections`| `--max-connections`| `256`                                                     |
//! | `store_capacity` | `--store-capacity` | `10GiB`                                                   |
//! | `offer_memory`   | `--offer-memory`   | none (lends nothing); at least `128MiB` when set          |
//! | `slicing`        | `--slicing`        | `largest` (or `halving`): how that memory is cut into offers |
//! | `offer_ttl`      |                    | `60s`: how long a published offer lasts                   |
//! | `offer_refresh_margin` |              | `20s`: how long before expiry an offer is refreshed       |
//! | `notify_interval`|                    | `10s`: how often an offerer tells a scheduler what is free|
//! | `answer_timeout` |                    | `5s`: time allowed for a lookup or a request to a peer    |
//! | `job_republish_interval` |            | `60s`: how often kept job records are sent to the peers now closest to their keys |
//! | `job_takeover_grace` |                | `5m`: how long an unfinished job's scheduler may be silent before the peer closest to the job's key takes it over (a scheduler makes a new version of each job at least every third of it) |
//! | `scheduler`      | `--scheduler`      | `false`                                                   |
//! | `trusted_schedulers` | `--trusted-schedulers` | none: the only schedulers asked (PeerIds), in place of the registry |
//! | `max_tries`      | `--max-tries`      | `2`: region probes before the super-trader fallback, in all |
//! | `own_tier_probes`|                    | `1`: of those, probes of the request's own tier before larger tiers' |
//! | `discovery_budget`|                   | `10s`: time one discovery may take                        |
//! | `key_space`      | `--key-space`      | `regions` (or `whole`: the random-probing baseline)       |
//! | `fallback`       | `--no-fallback` (off)| `true`: ask the super-trader list when probing fails    |
//! | `placement`      | `--placement`      | `best-fit` (or `worst-fit`, `random`)                     |
//! | `fetch_timeout`  |                    | `30s`: how long a volunteer waits for a module or input   |
//! | `call_data_kept` |                    | `10m`: how long a call's module, inputs and outputs stay unevictable after its answer |
//! | `memo_min_run`   |                    | `10ms`: a pure run shorter than this (on its volunteer) is not memoized, and its module not looked up again: running it costs less than a lookup |
//! | `default_deadline`|                   | `30s`: a function's deadline when the call names none     |
//! | `max_deadline`   |                    | `10m`: the longest deadline a call may ask for            |
//! | `max_module_size`|                    | `16MiB`: the largest module a volunteer runs              |
//!
//! Durations are written as `60s`, `1m 30s`, `500ms`.
//!
//! `key_space = "whole"` with `fallback = false` is the research baseline Flotilla is
//! compared to: offers published under, and probes drawn from, random keys anywhere in
//! the key space, and no super-trader list. Every peer of one network must use the same
//! `key_space` (holders of the other kind refuse or never find the offers).

use flotilla_offers::holder::HolderConfig;
use flotilla_offers::offerer::{OffererConfig, Slicing};
use flotilla_overlay::network::NetworkConfig;
use flotilla_overlay::regions::KeySpace;
use flotilla_scheduler::discovery::DiscoveryConfig;
use flotilla_scheduler::placement::Policy;
use flotilla_scheduler::supertraders::SuperTraderConfig;
use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The default address of the local HTTP API.
pub const DEFAULT_API: &str = "127.0.0.1:4180";

/// Errors of loading or checking a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for this schema.
    #[error("invalid config file {path}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A setting has a value that cannot work.
    #[error("invalid setting {key}: {reason}")]
    Invalid {
        /// The setting.
        key: &'static str,
        /// Why.
        reason: String,
    },
}

/// A node's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Where the identity key and the blockstore live.
    pub data_dir: PathBuf,
    /// Addresses to listen on (TCP and QUIC multiaddrs).
    pub listen: Vec<Multiaddr>,
    /// Peers to join through (multiaddrs ending in `/p2p/<PeerId>`).
    pub bootstrap: Vec<Multiaddr>,
    /// Address of the local HTTP API.
    pub api: SocketAddr,
    /// Whether `api` may be an address other hosts reach (then a token is required).
    pub api_allow_remote: bool,
    /// A pre-shared key file (`/key/swarm/psk/1.0.0/`): only peers holding it connect.
    pub network_key: Option<PathBuf>,
    /// The only peers that may reserve memory and run calls here (empty: anyone).
    pub schedulers: Vec<libp2p::PeerId>,
    /// Whether to find peers on the local network with mDNS.
    pub mdns: bool,
    /// Most established connections in all.
    pub max_connections: u32,
    /// Whether calls to a peer already reached go on a stream kept open to it (a link)
    /// rather than a request-response exchange each.
    pub call_links: bool,
    /// Most bytes of blocks stored.
    pub store_capacity: bytesize::ByteSize,
    /// Memory lent to others' functions (`None`: this node lends nothing).
    pub offer_memory: Option<bytesize::ByteSize>,
    /// How the lent memory is cut into offers.
    pub slicing: Slicing,
    /// How long a published offer lasts.
    #[serde(with = "duration_text")]
    pub offer_ttl: Duration,
    /// How long before expiry an offer is refreshed.
    #[serde(with = "duration_text")]
    pub offer_refresh_margin: Duration,
    /// How often an offerer tells a random scheduler what it has free.
    #[serde(with = "duration_text")]
    pub notify_interval: Duration,
    /// Time allowed for a lookup or a request to another peer.
    #[serde(with = "duration_text")]
    pub answer_timeout: Duration,
    /// How often the job records this node keeps are sent to the peers now closest to
    /// their keys.
    #[serde(with = "duration_text")]
    pub job_republish_interval: Duration,
    /// How long an unfinished job's scheduler may be silent before the peer closest to
    /// the job's key takes the job over.
    #[serde(with = "duration_text")]
    pub job_takeover_grace: Duration,
    /// The limits of the offers this node holds for others (the defaults; set by tests,
    /// not read from config files).
    #[serde(skip)]
    pub holder: HolderConfig,
    /// Whether this node is a scheduler.
    pub scheduler: bool,
    /// The only schedulers this node asks, if any: the registry is not looked up then.
    pub trusted_schedulers: Vec<libp2p::PeerId>,
    /// Region probes before the super-trader fallback, in all.
    pub max_tries: u32,
    /// Of those, probes of the request's own tier before going on to larger tiers (a
    /// small call is served from a large offer).
    pub own_tier_probes: u32,
    /// Time one discovery may take, probes and lookups included.
    #[serde(with = "duration_text")]
    pub discovery_budget: Duration,
    /// Where offers are published and probes look: `regions` (each tier's own region)
    /// or `whole` (anywhere: the baseline). The same on every peer of a network.
    pub key_space: KeySpace,
    /// Whether a scheduler asks its super-trader list when probing found nothing.
    pub fallback: bool,
    /// Which fitting offer a scheduler reserves.
    pub placement: Policy,
    /// How long a volunteer waits for a call's module or one of its inputs.
    #[serde(with = "duration_text")]
    pub fetch_timeout: Duration,
    /// How long a call's module, inputs and outputs stay in the store, safe from
    /// eviction, after its answer (then they are cache like any other block).
    #[serde(with = "duration_text")]
    pub call_data_kept: Duration,
    /// A pure run shorter than this on its volunteer is not memoized, and calls of its
    /// module are not looked up again by this client: running them costs less than a
    /// lookup.
    #[serde(with = "duration_text")]
    pub memo_min_run: Duration,
    /// A function's deadline when its call names none.
    #[serde(with = "duration_text")]
    pub default_deadline: Duration,
    /// The longest deadline a call may ask for.
    #[serde(with = "duration_text")]
    pub max_deadline: Duration,
    /// The largest module a volunteer runs.
    pub max_module_size: bytesize::ByteSize,
    /// For tests only (never read from a file): this volunteer alters the stdout of every
    /// call it runs and signs the altered answer, as a volunteer that lies would.
    #[doc(hidden)]
    #[serde(skip)]
    pub tamper_stdout: bool,
    /// For tests only (never read from a file): this volunteer signs its receipts with
    /// another key than its own, so they do not verify.
    #[doc(hidden)]
    #[serde(skip)]
    pub forge_receipts: bool,
}

impl Default for NodeConfig {
    /// The defaults; those of the market's machines are theirs ([`OffererConfig::new`],
    /// [`DiscoveryConfig::default`]), written nowhere else.
    fn default() -> Self {
        let offerer = OffererConfig::new(0, Vec::new());
        let discovery = DiscoveryConfig::default();
        NodeConfig {
            data_dir: default_data_dir(),
            listen: vec![
                "/ip4/0.0.0.0/tcp/4100".parse().expect("valid multiaddr"),
                "/ip4/0.0.0.0/udp/4100/quic-v1"
                    .parse()
                    .expect("valid multiaddr"),
            ],
            bootstrap: Vec::new(),
            api: DEFAULT_API.parse().expect("valid socket address"),
            api_allow_remote: false,
            network_key: None,
            schedulers: Vec::new(),
            mdns: true,
            max_connections: 256,
            call_links: NetworkConfig::default().call_links.is_some(),
            store_capacity: bytesize::ByteSize::gib(10),
            offer_memory: None,
            slicing: offerer.slicing,
            offer_ttl: Duration::from_millis(offerer.ttl_ms),
            offer_refresh_margin: Duration::from_millis(offerer.refresh_margin_ms),
            notify_interval: Duration::from_millis(offerer.notify_interval_ms),
            answer_timeout: Duration::from_millis(offerer.answer_timeout_ms),
            job_republish_interval: Duration::from_secs(60),
            job_takeover_grace: Duration::from_secs(300),
            holder: HolderConfig::default(),
            scheduler: false,
            trusted_schedulers: Vec::new(),
            max_tries: discovery.max_tries,
            own_tier_probes: discovery.own_tier_probes,
            discovery_budget: Duration::from_millis(discovery.budget_ms),
            key_space: discovery.key_space,
            fallback: discovery.fallback,
            placement: Policy::BestFit,
            fetch_timeout: Duration::from_secs(30),
            call_data_kept: Duration::from_secs(600),
            memo_min_run: Duration::from_millis(10),
            default_deadline: Duration::from_secs(30),
            max_deadline: Duration::from_secs(600),
            max_module_size: bytesize::ByteSize::mib(16),
            tamper_stdout: false,
            forge_receipts: false,
        }
    }
}

/// Durations as human-readable text (`60s`, `1m 30s`) in the config file.
mod duration_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FLOTILLA_DATA") {
        return PathBuf::from(dir);
    }
    std::env::var_os("HOME").map_or_else(
        || PathBuf::from(".flotilla"),
        |home| Path::new(&home).join(".flotilla"),
    )
}

impl NodeConfig {
    /// Reads a TOML config file; keys it leaves out keep their defaults.
    pub fn from_file(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| {
            let line = e
                .span()
                .map(|span| text[..span.start].matches('\n').count() + 1);
            let reason = match line {
                Some(line) => format!("line {line}: {}", e.message()),
                None => e.message().to_string(),
            };
            ConfigError::Parse {
                path: path.into(),
                reason,
            }
        })
    }

    /// Checks that the settings can work together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.listen.is_empty() {
            return Err(ConfigError::Invalid {
                key: "listen",
                reason: "at least one address is needed".into(),
            });
        }
        for addr in &self.listen {
            let transport_ok = addr
                .iter()
                .any(|p| matches!(p, Protocol::Tcp(_) | Protocol::QuicV1));
            if !transport_ok {
                return Err(ConfigError::Invalid {
                    key: "listen",
                    reason: format!("{addr} is neither a TCP nor a QUIC (quic-v1) address"),
                });
            }
        }
        if !self.api.ip().is_loopback() && !self.api_allow_remote {
            return Err(ConfigError::Invalid {
                key: "api",
                reason: format!(
                    "{} is not a loopback address: other hosts could use the node; pass --api-allow-remote (requests then need the token the node writes to <data_dir>/api.token)",
                    self.api
                ),
            });
        }
        if self.network_key.is_some() && self.transport_listen(true).is_empty() {
            return Err(ConfigError::Invalid {
                key: "listen",
                reason: "a closed network (network_key) runs on TCP only: give a TCP address"
                    .into(),
            });
        }
        for addr in &self.bootstrap {
            if !matches!(addr.iter().last(), Some(Protocol::P2p(_))) {
                return Err(ConfigError::Invalid {
                    key: "bootstrap",
                    reason: format!("{addr} must end in /p2p/<PeerId>"),
                });
            }
        }
        if self.max_connections == 0 {
            return Err(ConfigError::Invalid {
                key: "max_connections",
                reason: "must be at least 1".into(),
            });
        }
        if let Some(memory) = self.offer_memory
            && memory.as_u64() < 128 * 1024 * 1024
        {
            return Err(ConfigError::Invalid {
                key: "offer_memory",
                reason: format!(
                    "{} is less than the smallest tier (128 MiB)",
                    memory.display().iec()
                ),
            });
        }
        if self.offer_ttl < Duration::from_secs(2) {
            return Err(ConfigError::Invalid {
                key: "offer_ttl",
                reason: "must be at least 2s".into(),
            });
        }
        if self.offer_refresh_margin >= self.offer_ttl
            || self.offer_refresh_margin < self.answer_timeout.min(self.offer_ttl / 2)
        {
            return Err(ConfigError::Invalid {
                key: "offer_refresh_margin",
                reason:
                    "must be shorter than offer_ttl and at least answer_timeout (or half offer_ttl)"
                        .into(),
            });
        }
        let positive = [
            ("notify_interval", self.notify_interval),
            ("answer_timeout", self.answer_timeout),
            ("job_republish_interval", self.job_republish_interval),
            ("job_takeover_grace", self.job_takeover_grace),
            ("fetch_timeout", self.fetch_timeout),
            ("default_deadline", self.default_deadline),
        ];
        for (key, value) in positive {
            if value < Duration::from_millis(100) {
                return Err(ConfigError::Invalid {
                    key,
                    reason: "must be at least 100ms".into(),
                });
            }
        }
        let longest = Duration::from_millis(crate::market::function::MAX_TIMEOUT_MS);
        if self.max_deadline < self.default_deadline || self.max_deadline > longest {
            return Err(ConfigError::Invalid {
                key: "max_deadline",
                reason: format!(
                    "must be at least default_deadline and at most {}",
                    humantime::format_duration(longest)
                ),
            });
        }
        if self.max_module_size.as_u64() < 1024 || self.max_module_size.as_u64() > 1 << 30 {
            return Err(ConfigError::Invalid {
                key: "max_module_size",
                reason: "must be between 1KiB and 1GiB".into(),
            });
        }
        if self.max_tries > crate::market::MAX_TRIES_LIMIT {
            return Err(ConfigError::Invalid {
                key: "max_tries",
                reason: format!("at most {}", crate::market::MAX_TRIES_LIMIT),
            });
        }
        if self.max_tries == 0 && !self.fallback {
            return Err(ConfigError::Invalid {
                key: "max_tries",
                reason: "must be at least 1 when fallback is off (nothing would ever be found)"
                    .into(),
            });
        }
        Ok(())
    }

    /// The addresses the transport listens on: all of `listen`, or on a closed network
    /// only the TCP ones (QUIC cannot carry libp2p's pre-shared-key protection).
    pub fn transport_listen(&self, closed: bool) -> Vec<Multiaddr> {
        self.listen
            .iter()
            .filter(|addr| !closed || !addr.iter().any(|p| matches!(p, Protocol::QuicV1)))
            .cloned()
            .collect()
    }

    /// The network key, read from its file (`None`: an open network).
    pub fn network_key(
        &self,
    ) -> Result<Option<flotilla_overlay::closed::PreSharedKey>, ConfigError> {
        let Some(path) = &self.network_key else {
            return Ok(None);
        };
        flotilla_overlay::closed::read_key(path)
            .map(Some)
            .map_err(|e| ConfigError::Invalid {
                key: "network_key",
                reason: e.to_string(),
            })
    }

    /// The market settings these make.
    pub fn market(&self) -> crate::market::MarketConfig {
        crate::market::MarketConfig {
            offer_memory_mib: self.offer_memory.map(|m| m.as_u64() / (1024 * 1024)),
            slicing: self.slicing,
            offer_ttl: self.offer_ttl,
            refresh_margin: self.offer_refresh_margin,
            answer_timeout: self.answer_timeout,
            notify_interval: self.notify_interval,
            scheduler: self.scheduler,
            trusted_schedulers: self.trusted_schedulers.clone(),
            max_tries: self.max_tries,
            own_tier_probes: self.own_tier_probes,
            discovery_budget: self.discovery_budget,
            key_space: self.key_space,
            fallback: self.fallback,
            placement: self.placement,
            fetch_timeout: self.fetch_timeout,
            call_data_kept: self.call_data_kept,
            memo_min_run: self.memo_min_run,
            schedulers: self.schedulers.clone(),
            job_republish_interval: self.job_republish_interval,
            job_takeover_grace: self.job_takeover_grace,
            holder: self.holder.clone(),
            super_traders: SuperTraderConfig::default(),
            tamper_stdout: self.tamper_stdout,
            forge_receipts: self.forge_receipts,
        }
    }

    /// The executor settings these make (only offering nodes run one).
    pub fn executor(&self) -> crate::executor::ExecutorConfig {
        crate::executor::ExecutorConfig {
            max_module_bytes: self.max_module_size.as_u64() as usize,
            default_timeout: self.default_deadline,
            max_timeout: self.max_deadline,
            ..crate::executor::ExecutorConfig::new(&self.data_dir)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        NodeConfig::default().validate().unwrap();
    }

    #[test]
    fn file_overrides_only_what_it_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flotilla.toml");
        std::fs::write(
            &path,
            "api = \"127.0.0.1:9999\"\nmdns = false\nstore_capacity = \"1 GiB\"\n",
        )
        .unwrap();
        let config = NodeConfig::from_file(&path).unwrap();
        assert_eq!(config.api.port(), 9999);
        assert!(!config.mdns);
        assert_eq!(config.store_capacity, bytesize::ByteSize::gib(1));
        assert_eq!(config.listen, NodeConfig::default().listen);
        std::fs::write(
            &path,
            "offer_memory = \"2 GiB\"\nscheduler = true\noffer_ttl = \"1m 30s\"\nslicing = \"halving\"\nplacement = \"worst-fit\"\n",
        )
        .unwrap();
        let config = NodeConfig::from_file(&path).unwrap();
        config.validate().unwrap();
        let market = config.market();
        assert_eq!(market.offer_memory_mib, Some(2048));
        assert!(market.scheduler);
        assert_eq!(market.offer_ttl, Duration::from_secs(90));
        assert_eq!(market.slicing, Slicing::Halving);
        assert_eq!(market.placement, Policy::WorstFit);
        assert_eq!(market.key_space, KeySpace::Regions);
        assert!(market.fallback);
        std::fs::write(&path, "key_space = \"whole\"\nfallback = false\n").unwrap();
        let config = NodeConfig::from_file(&path).unwrap();
        config.validate().unwrap();
        let market = config.market();
        assert_eq!(market.key_space, KeySpace::Whole);
        assert!(!market.fallback);
    }

    #[test]
    fn bad_files_and_values_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "listen = 3\n").unwrap();
        assert!(matches!(
            NodeConfig::from_file(&path),
            Err(ConfigError::Parse { .. })
        ));
        std::fs::write(&path, "colour = \"blue\"\n").unwrap();
        assert!(matches!(
            NodeConfig::from_file(&path),
            Err(ConfigError::Parse { .. })
        ));
        let mut config = NodeConfig {
            bootstrap: vec!["/ip4/127.0.0.1/tcp/1".parse().unwrap()],
            ..NodeConfig::default()
        };
        assert!(matches!(
            config.validate(),
            Err(ConfigError::Invalid {
                key: "bootstrap",
                ..
            })
        ));
        config.bootstrap.clear();
        let small = NodeConfig {
            offer_memory: Some(bytesize::ByteSize::mib(100)),
            ..NodeConfig::default()
        };
        assert!(matches!(
            small.validate(),
            Err(ConfigError::Invalid {
                key: "offer_memory",
                ..
            })
        ));
        let upside_down = NodeConfig {
            offer_ttl: Duration::from_secs(10),
            offer_refresh_margin: Duration::from_secs(20),
            ..NodeConfig::default()
        };
        assert!(matches!(
            upside_down.validate(),
            Err(ConfigError::Invalid {
                key: "offer_refresh_margin",
                ..
            })
        ));
        std::fs::write(&path, "key_space = \"everywhere\"\n").unwrap();
        assert!(matches!(
            NodeConfig::from_file(&path),
            Err(ConfigError::Parse { .. })
        ));
        let never = NodeConfig {
            max_tries: 0,
            fallback: false,
            ..NodeConfig::default()
        };
        assert!(matches!(
            never.validate(),
            Err(ConfigError::Invalid {
                key: "max_tries",
                ..
            })
        ));
        std::fs::write(&path, "offer_ttl = \"soon\"\n").unwrap();
        assert!(matches!(
            NodeConfig::from_file(&path),
            Err(ConfigError::Parse { .. })
        ));
        config.listen = vec!["/ip4/127.0.0.1".parse().unwrap()];
        assert!(matches!(
            config.validate(),
            Err(ConfigError::Invalid { key: "listen", .. })
        ));
    }
}
