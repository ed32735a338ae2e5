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
//! | `mdns`           | `--no-mdns` (off)  | `true`                                                    |
//! | `max_connections`| `--max-connections`| `256`                                                     |
//! | `store_capacity` | `--store-capacity` | `10GiB`                                                   |

use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

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
    /// Whether to find peers on the local network with mDNS.
    pub mdns: bool,
    /// Most established connections in all.
    pub max_connections: u32,
    /// Most bytes of blocks stored.
    pub store_capacity: bytesize::ByteSize,
}

impl Default for NodeConfig {
    fn default() -> Self {
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
            mdns: true,
            max_connections: 256,
            store_capacity: bytesize::ByteSize::gib(10),
        }
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
        Ok(())
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
        config.listen = vec!["/ip4/127.0.0.1".parse().unwrap()];
        assert!(matches!(
            config.validate(),
            Err(ConfigError::Invalid { key: "listen", .. })
        ));
    }
}
