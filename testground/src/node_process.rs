//! One real `flotilla node` process: started with the flags a scenario role needs
//! (optionally inside a network namespace), read back for its peer id, address and API,
//! and stopped gracefully (SIGTERM: offers withdrawn) or crashed (SIGKILL).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long a node may take to print its addresses.
const START_LIMIT: Duration = Duration::from_secs(30);
/// How long a graceful stop may take before the process is killed.
const STOP_LIMIT: Duration = Duration::from_secs(15);

/// Why a node could not be started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The process could not be spawned.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// What was run.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// It exited or printed something unexpected before it was up.
    #[error("node did not start: {0}")]
    Start(String),
    /// Signalling or waiting for it failed.
    #[error("stopping node: {0}")]
    Stop(String),
}

/// What a node is started as.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// The `flotilla` binary.
    pub binary: PathBuf,
    /// Data directory (identity, blocks); a fresh one is a fresh peer.
    pub data_dir: PathBuf,
    /// Address to listen and serve the API on.
    pub ip: IpAddr,
    /// Network namespace to run in, if any.
    pub netns: Option<String>,
    /// Peers to join through (multiaddrs with /p2p/).
    pub bootstrap: Vec<String>,
    /// Memory to lend, in MiB.
    pub offer_mib: Option<u32>,
    /// Store capacity, in MiB (the node's default if `None`).
    pub store_mib: Option<u64>,
    /// Whether it is a scheduler.
    pub scheduler: bool,
    /// Region probes before the fallback.
    pub max_tries: u32,
    /// `regions` or `whole`.
    pub key_space: String,
    /// Whether schedulers use the super-trader fallback.
    pub fallback: bool,
    /// Offer lifetime, in seconds.
    pub offer_ttl_s: u64,
    /// How often it reports its free offers to a scheduler, in seconds.
    pub notify_interval_s: u64,
    /// Where its log (stderr) goes.
    pub log: PathBuf,
}

/// A running node process.
pub struct NodeProcess {
    child: Child,
    /// Its peer id.
    pub peer_id: String,
    /// Its first listen address, with /p2p/: what others bootstrap to.
    pub addr: String,
    /// Its API address.
    pub api: SocketAddr,
    /// The bearer token its API asks for: in a network namespace the API listens on the
    /// namespace's address, which a node serves only with a token (its `api.token`).
    pub api_token: Option<String>,
}

impl NodeProcess {
    /// A client of its API.
    pub fn api_client(&self) -> flotilla_api::client::ApiClient {
        flotilla_api::client::ApiClient::with_token(self.api, self.api_token.clone())
    }
}

impl NodeSpec {
    fn config_text(&self) -> String {
        // The node wants the margin at least min(answer timeout 5 s, ttl / 2).
        let ttl = self.offer_ttl_s;
        let margin = (ttl / 3).max(5.min(ttl / 2)).max(1);
        format!(
            "offer_ttl = \"{ttl}s\"\noffer_refresh_margin = \"{margin}s\"\nnotify_interval = \"{}s\"\n",
            self.notify_interval_s
        )
    }

    fn command(&self, config: &Path) -> Command {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(&self.binary);
                cmd
            }
            None => Command::new(&self.binary),
        };
        // Researchers may ask for more of the nodes' logs (FLOTILLA_NODE_LOG=debug).
        let log = std::env::var("FLOTILLA_NODE_LOG").unwrap_or_else(|_| "warn".to_string());
        cmd.env("RUST_LOG", log)
            .arg("node")
            .arg("--config")
            .arg(config)
            .arg("--no-mdns")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--listen", &format!("/ip4/{}/tcp/0", self.ip)])
            .args(["--api", &format!("{}:0", self.ip)]);
        if !self.ip.is_loopback() {
            cmd.arg("--api-allow-remote");
        }
        cmd.args(["--max-tries", &self.max_tries.to_string()])
            .args(["--key-space", &self.key_space]);
        if !self.fallback {
            cmd.arg("--no-fallback");
        }
        for peer in &self.bootstrap {
            cmd.args(["--bootstrap", peer]);
        }
        if let Some(mib) = self.offer_mib {
            cmd.args(["--offer-memory", &format!("{mib}MiB")]);
        }
        if let Some(mib) = self.store_mib {
            cmd.args(["--store-capacity", &format!("{mib}MiB")]);
        }
        if self.scheduler {
            cmd.arg("--scheduler");
        }
        cmd
    }
}

impl NodeProcess {
    /// Starts a node and waits until it prints its API address.
    pub async fn start(spec: &NodeSpec) -> Result<NodeProcess, NodeError> {
        std::fs::create_dir_all(&spec.data_dir).map_err(|e| NodeError::Start(e.to_string()))?;
        let config = spec.data_dir.join("flotilla.toml");
        std::fs::write(&config, spec.config_text()).map_err(|e| NodeError::Start(e.to_string()))?;
        let log = std::fs::File::create(&spec.log).map_err(|e| NodeError::Start(e.to_string()))?;
        let mut child = spec
            .command(&config)
            .stdout(Stdio::piped())
            .stderr(log)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| NodeError::Spawn {
                program: spec.binary.display().to_string(),
                source,
            })?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| NodeError::Start("no stdout".into()))?;
        let mut lines = BufReader::new(stdout).lines();
        let read = async {
            let (mut peer_id, mut addr) = (None, None);
            while let Some(line) = lines.next_line().await.map_err(|e| e.to_string())? {
                let line = line.trim();
                if let Some(id) = line.strip_prefix("flotilla node ") {
                    peer_id = Some(id.to_string());
                } else if let Some(a) = line.strip_prefix("listening on ") {
                    addr.get_or_insert_with(|| a.to_string());
                } else if let Some(api) = line.strip_prefix("API on http://") {
                    let api: SocketAddr =
                        api.parse().map_err(|_| format!("bad API line {line}"))?;
                    return match (peer_id, addr) {
                        (Some(p), Some(a)) => Ok((p, a, api)),
                        _ => Err("API printed before peer id and address".to_string()),
                    };
                }
            }
            Err(format!("it exited; see {}", spec.log.display()))
        };
        let (peer_id, addr, api) = tokio::time::timeout(START_LIMIT, read)
            .await
            .map_err(|_| NodeError::Start(format!("not up within {START_LIMIT:?}")))?
            .map_err(NodeError::Start)?;
        // Keep reading stdout so the node never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        // The node writes its token before it prints its API address.
        let api_token = if spec.ip.is_loopback() {
            None
        } else {
            let path = spec.data_dir.join("api.token");
            let token = std::fs::read_to_string(&path)
                .map_err(|e| NodeError::Start(format!("{}: {e}", path.display())))?;
            Some(token.trim().to_string())
        };
        Ok(NodeProcess {
            child,
            peer_id,
            addr,
            api,
            api_token,
        })
    }

    /// The process id, for sampling its CPU and memory.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Stops it with SIGTERM (it withdraws its offers and leaves), killing it if it
    /// takes longer than 15 s.
    pub async fn stop(mut self) -> Result<(), NodeError> {
        if let Some(pid) = self.child.id() {
            let status = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await
                .map_err(|e| NodeError::Stop(e.to_string()))?;
            if status.success()
                && tokio::time::timeout(STOP_LIMIT, self.child.wait())
                    .await
                    .is_ok()
            {
                return Ok(());
            }
        }
        self.crash().await
    }

    /// Kills it with SIGKILL: no goodbye, its offers linger until they expire.
    pub async fn crash(mut self) -> Result<(), NodeError> {
        self.child
            .kill()
            .await
            .map_err(|e| NodeError::Stop(e.to_string()))
    }
}
