//! `flotilla node`: starting a peer (overlay, market, local HTTP API) and stopping it
//! cleanly.
//!
//! [`start`] returns a [`RunningNode`] that tests drive in-process; the binary calls
//! [`run`], which also waits for SIGINT/SIGTERM.

use crate::api;
use crate::config::{ConfigError, NodeConfig};
use crate::executor::{ExecError, Executor};
use crate::identity::{self, IdentityError};
use crate::market::{Clock, Market};
use flotilla_overlay::bitswap::BitswapConfig;
use flotilla_overlay::fetch::FetchConfig;
use flotilla_overlay::network::NetworkConfig;
use flotilla_overlay::{Overlay, OverlayConfig, OverlayError};
use libp2p::{Multiaddr, PeerId};
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The data dir is another node's, or could not be locked.
    #[error(transparent)]
    DataDir(#[from] crate::lock::LockError),
    /// The identity could not be loaded.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The API address could not be bound.
    #[error("cannot serve the API on {addr}: {source}")]
    Api {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The API token could not be written.
    #[error("cannot write the API token {}: {source}", path.display())]
    Token {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The overlay could not start.
    #[error(transparent)]
    Overlay(#[from] OverlayError),
    /// The node's database could not be opened.
    #[error(transparent)]
    State(#[from] crate::state_db::StateDbError),
    /// The executor could not start.
    #[error("cannot start the executor: {0}")]
    Executor(#[from] ExecError),
}

/// A node running in this process.
pub struct RunningNode {
    overlay: Overlay,
    market: Market,
    api_addr: SocketAddr,
    network_task: JoinHandle<()>,
    api_task: JoinHandle<()>,
    stop_api: oneshot::Sender<()>,
    _data_dir_lock: crate::lock::DataDirLock,
}

/// Starts a node: identity, API listener, overlay, then the API.
pub async fn start(config: NodeConfig) -> Result<RunningNode, StartError> {
    start_with_clock(config, Clock::system()).await
}

/// Starts a node whose market is handed the time by `clock` (tests pass
/// [`Clock::tokio`] to run it in paused tokio time).
pub async fn start_with_clock(config: NodeConfig, clock: Clock) -> Result<RunningNode, StartError> {
    config.validate()?;
    // Before anything in the data dir is read or written: one daemon per data dir.
    let data_dir_lock = crate::lock::acquire(&config.data_dir)?;
    let keypair = identity::load_or_create(&config.data_dir)?;
    let access = if config.api_allow_remote {
        let token =
            api::guard::write_token(&config.data_dir).map_err(|source| StartError::Token {
                path: api::guard::token_path(&config.data_dir),
                source,
            })?;
        api::guard::Access::Token(token)
    } else {
        api::guard::Access::Loopback
    };
    let network_key = config.network_key()?;
    let listener = tokio::net::TcpListener::bind(config.api)
        .await
        .map_err(|source| StartError::Api {
            addr: config.api,
            source,
        })?;
    let api_addr = listener.local_addr().map_err(|source| StartError::Api {
        addr: config.api,
        source,
    })?;
    let mut registry = Registry::default();
    let overlay_config = OverlayConfig {
        store_dir: config.data_dir.join("blockstore"),
        store_capacity: config.store_capacity.as_u64(),
        network: NetworkConfig {
            listen: config.transport_listen(network_key.is_some()),
            network_key,
            bootstrap: config.bootstrap.clone(),
            mdns: config.mdns,
            max_connections: config.max_connections,
            call_links: config
                .call_links
                .then(|| NetworkConfig::default().call_links)
                .flatten(),
            // A call's answer can take as long as the function runs: each request is
            // bounded by its caller's own timeout instead.
            request_timeout: config.max_deadline * 2 + Duration::from_secs(300),
            announce_scheduler: config.scheduler,
            ..NetworkConfig::default()
        },
        bitswap: BitswapConfig::default(),
        fetch: FetchConfig::default(),
    };
    let (overlay, network_task) =
        Overlay::start(overlay_config, keypair.clone(), &mut registry).await?;
    let executor = match config.offer_memory {
        Some(_) => Some(Executor::new(config.executor())?),
        None => None,
    };
    let market = Market::start(
        &overlay,
        executor,
        keypair,
        offer_addresses(overlay.listen_addrs()),
        config.market(),
        clock,
        &mut registry,
    );
    let state = crate::state_db::StateDb::open(&config.data_dir.join("node.redb"))?;
    market.keep_state_in(Arc::new(state)).await;
    market.serve_peers();
    let (stop_api, stopped) = oneshot::channel();
    let app = api::server::router(overlay.clone(), market.clone(), Arc::new(registry), access);
    let api_task = tokio::spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(async {
            let _ = stopped.await;
        });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "API server failed");
        }
    });
    tracing::info!(
        peer_id = %overlay.peer_id(),
        api = %api_addr,
        offering = market.is_offering(),
        scheduler = market.is_scheduler(),
        "node started"
    );
    Ok(RunningNode {
        overlay,
        market,
        api_addr,
        network_task,
        api_task,
        stop_api,
        _data_dir_lock: data_dir_lock,
    })
}

impl RunningNode {
    /// The node's PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.overlay.peer_id()
    }

    /// The addresses the node listens on.
    pub fn listen_addrs(&self) -> &[Multiaddr] {
        self.overlay.listen_addrs()
    }

    /// Its first listen address with `/p2p/<PeerId>` appended: what others bootstrap to.
    pub fn bootstrap_addr(&self) -> Multiaddr {
        self.listen_addrs()[0]
            .clone()
            .with_p2p(self.peer_id())
            .expect("listen addresses have no /p2p part")
    }

    /// Where its HTTP API answers.
    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    /// The overlay, for in-process callers.
    pub fn overlay(&self) -> &Overlay {
        &self.overlay
    }

    /// Its part in the market, for in-process callers.
    pub fn market(&self) -> &Market {
        &self.market
    }

    /// Withdraws its offers, stops the API and the network, and waits for both (at most
    /// a few seconds).
    pub async fn stop(self) {
        self.market.stop().await;
        let _ = self.stop_api.send(());
        self.overlay.shutdown().await;
        let wait = async {
            let _ = self.network_task.await;
            let _ = self.api_task.await;
        };
        if tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .is_err()
        {
            tracing::warn!("node did not stop within 5 s");
        }
    }

    /// Stops at once, as a crash would: no withdrawals, connections dropped.
    pub async fn kill(self) {
        self.market.abort().await;
        self.api_task.abort();
        self.network_task.abort();
        let _ = self.network_task.await;
        self.overlay.store().abandon();
    }
}

/// The addresses put in offers: the concrete ones we listen on, routable ones first.
fn offer_addresses(listening: &[Multiaddr]) -> Vec<Multiaddr> {
    use libp2p::multiaddr::Protocol;
    let mut addresses: Vec<Multiaddr> = listening
        .iter()
        .filter(|a| {
            !a.iter().any(|p| match p {
                Protocol::Ip4(ip) => ip.is_unspecified(),
                Protocol::Ip6(ip) => ip.is_unspecified(),
                _ => false,
            })
        })
        .cloned()
        .collect();
    addresses.sort_by_key(|a| {
        a.iter().any(|p| match p {
            Protocol::Ip4(ip) => ip.is_loopback(),
            Protocol::Ip6(ip) => ip.is_loopback(),
            _ => false,
        })
    });
    addresses.truncate(flotilla_offers::offer::MAX_ADDRESSES);
    addresses
}

/// Runs a node until SIGINT or SIGTERM; prints its PeerId and addresses once it is up
/// (as one JSON line with `as_json`).
pub async fn run(config: NodeConfig, as_json: bool) -> anyhow::Result<()> {
    let node = start(config).await?;
    crate::output::node_started(&node, as_json);
    shutdown_signal().await;
    tracing::info!("shutting down");
    node.stop().await;
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("can install a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
