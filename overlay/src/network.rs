//! The libp2p swarm and the one task that owns it.
//!
//! The behaviour combines connection limits, two Kademlias in server mode (IPFS's
//! `/ipfs/kad/1.0.0` for content, Flotilla's own for market keys: see [`crate::dht`]),
//! identify, ping, mDNS (optional), `libp2p-stream` (for bitswap) and request-response
//! (for the offer protocols, see [`crate::rpc`]). One event loop owns the swarm; the
//! cloneable [`Network`] handle sends it [`Command`]s that carry their reply channels, and
//! pending replies are kept by Kademlia query id or request id.

use crate::admission::{self, AdmissionConfig};
use crate::bitswap::Bitswap;
use crate::dht::{self, Dht};
use crate::fair::FairSender;
use crate::link::{self, LinkConfig, Links};
use crate::liveness::{self, Liveness};
use crate::presence::Presence;
use crate::record_store::{SplitStore, StoreLimits};
use crate::rpc::{BytesCodec, Concern, Inbound, InboundRequest, Outgoing, Reply, RpcError};
use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::kad::{self, GetClosestPeersError, GetProvidersOk, QueryId, QueryResult, RecordKey};
use libp2p::metrics::{Metrics, Recorder};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent, dial_opts::DialOpts};
use libp2p::{Multiaddr, PeerId, Swarm, connection_limits, identify, mdns, ping, yamux};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Most closer peers [`Network::closer_peers_known`] counts: more than any `k` asked.
pub const CLOSER_COUNTED: usize = 64;

/// The identify protocol version we announce.
const IDENTIFY_PROTOCOL: &str = "/flotilla/1.0.0";

/// Settings of the swarm.
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    /// Addresses to listen on (TCP and/or QUIC).
    pub listen: Vec<Multiaddr>,
    /// Peers to join through; each address must end in `/p2p/<PeerId>`.
    pub bootstrap: Vec<Multiaddr>,
    /// Whether to find peers on the local network with mDNS.
    pub mdns: bool,
    /// Most established connections in all.
    pub max_connections: u32,
    /// Limits on inbound connections within `max_connections` ([`crate::admission`]).
    pub admission: AdmissionConfig,
    /// Most provider records this node announces for itself.
    pub max_provided_keys: usize,
    /// Most keys of other peers' provider records this node keeps for the DHT.
    pub max_other_provider_keys: usize,
    /// Other bounds of other peers' provider records (its `max_keys` is ignored for
    /// `max_other_provider_keys`).
    pub provider_limits: StoreLimits,
    /// Time allowed for startup steps (listening, reaching a bootstrap peer) and for a
    /// Kademlia query.
    pub timeout: Duration,
    /// Longest a request-response request may wait for its answer.
    pub request_timeout: Duration,
    /// Longest a connection may take to be set up (TCP, the network key's nonces, noise,
    /// yamux); a pending connection is dropped then, and its slot freed (default 10 s,
    /// libp2p's own).
    pub handshake_timeout: Duration,
    /// Inbound requests queued for the application before more are dropped.
    pub inbound_queue: usize,
    /// Calls to a peer already reached go on a stream kept open to it ([`crate::link`]),
    /// with these timings; `None`: every call is a request-response exchange.
    pub call_links: Option<LinkConfig>,
    /// A closed network's key ([`crate::closed`]): TCP only, and only with its holders.
    pub network_key: Option<crate::closed::PreSharedKey>,
    /// Announce in identify that this node schedules calls
    /// ([`crate::presence::SCHEDULER_PROTOCOL`]).
    pub announce_scheduler: bool,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            listen: Vec::new(),
            bootstrap: Vec::new(),
            mdns: true,
            max_connections: 256,
            admission: AdmissionConfig::default(),
            max_provided_keys: 65_536,
            max_other_provider_keys: 65_536,
            provider_limits: StoreLimits::default(),
            timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            inbound_queue: 256,
            call_links: Some(LinkConfig::default()),
            network_key: None,
            announce_scheduler: false,
        }
    }
}

/// Errors of the network layer.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The transport could not be built.
    #[error("cannot build the libp2p transport: {0}")]
    Transport(String),
    /// Listening on an address failed (a port in use, say).
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
    /// A bootstrap address lacks its `/p2p/<PeerId>` part.
    #[error("bootstrap address {0} must end in /p2p/<PeerId>")]
    BootstrapWithoutPeerId(Multiaddr),
    /// None of the bootstrap peers could be reached.
    #[error("none of the bootstrap peers could be reached: {0}")]
    BootstrapUnreachable(String),
    /// Announcing a provider record failed.
    #[error("cannot announce provider record: {0}")]
    Provide(String),
    /// The network task has stopped.
    #[error("the network task has stopped")]
    Stopped,
}

/// What the network looks like from here.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NetworkStatus {
    /// Our PeerId.
    pub peer_id: String,
    /// Addresses we listen on.
    pub listen_addrs: Vec<String>,
    /// Peers we have a connection to.
    pub connected_peers: Vec<String>,
    /// Peers in the content DHT's routing table (`/ipfs/kad/1.0.0`).
    pub routing_table_size: usize,
    /// Peers in the market DHT's routing table (Flotilla peers only).
    #[serde(default)]
    pub market_routing_table_size: usize,
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    // First: it may evict an inbound connection before the total limit refuses one.
    admission: admission::Behaviour,
    limits: connection_limits::Behaviour,
    kad: kad::Behaviour<SplitStore>,
    market: kad::Behaviour<SplitStore>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    stream: libp2p_stream::Behaviour,
    offers_rpc: request_response::Behaviour<BytesCodec>,
    calls_rpc: request_response::Behaviour<BytesCodec>,
    jobs_rpc: request_response::Behaviour<BytesCodec>,
}

impl Behaviour {
    /// The Kademlia behaviour of `dht`.
    fn dht(&mut self, dht: Dht) -> &mut kad::Behaviour<SplitStore> {
        match dht {
            Dht::Content => &mut self.kad,
            Dht::Market => &mut self.market,
        }
    }

    /// The request-response behaviour of `concern`'s protocol.
    fn rpc(&mut self, concern: Concern) -> &mut request_response::Behaviour<BytesCodec> {
        match concern {
            Concern::Offers => &mut self.offers_rpc,
            Concern::Calls => &mut self.calls_rpc,
            Concern::Jobs => &mut self.jobs_rpc,
        }
    }
}

/// The peers a Kademlia lookup found closest to a key.
#[derive(Debug, Clone, Default)]
pub struct ClosestPeers {
    /// Closest first; never ourselves.
    pub peers: Vec<PeerId>,
    /// Kademlia requests the lookup sent.
    pub requests: u32,
}

/// Requests to the event loop.
enum Command {
    GetProviders {
        dht: Dht,
        key: RecordKey,
        found: mpsc::Sender<PeerId>,
    },
    StartProviding {
        dht: Dht,
        key: RecordKey,
        done: oneshot::Sender<Result<(), NetworkError>>,
    },
    GetClosestPeers {
        key: Vec<u8>,
        reply: oneshot::Sender<ClosestPeers>,
    },
    Request {
        concern: Concern,
        peer: PeerId,
        addresses: Vec<Multiaddr>,
        bytes: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<u8>, RpcError>>,
    },
    ConnectedPeers {
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    CloserKnown {
        key: Vec<u8>,
        reply: oneshot::Sender<usize>,
    },
    Status {
        reply: oneshot::Sender<NetworkStatus>,
    },
    Shutdown,
}

enum PendingQuery {
    Providers(mpsc::Sender<PeerId>),
    Provide(oneshot::Sender<Result<(), NetworkError>>),
    Closest(oneshot::Sender<ClosestPeers>),
}

/// A handle to the running swarm; clones share it.
#[derive(Clone)]
pub struct Network {
    commands: mpsc::Sender<Command>,
    local_peer_id: PeerId,
    /// Streams kept open for calls, unless [`NetworkConfig::call_links`] is `None`.
    links: Option<Links>,
    request_timeout: Duration,
    /// The peers connected now, and when each leaves.
    presence: Presence,
}

/// A swarm that is listening but whose event loop has not started yet.
pub struct StartingNetwork {
    event_loop: EventLoop,
    /// The stream-protocol control bitswap is built on.
    pub control: libp2p_stream::Control,
    commands: mpsc::Receiver<Command>,
    responses: mpsc::Receiver<Outgoing>,
    inbound: Option<Inbound>,
    /// Links other peers open to us, served once the network runs.
    link_server: Option<LinkServer>,
    handle: Network,
}

/// What serving other peers' links needs.
struct LinkServer {
    incoming: libp2p_stream::IncomingStreams,
    queue: FairSender<InboundRequest>,
    received: Counter,
    config: LinkConfig,
}

impl Network {
    /// Builds the swarm and starts listening on every configured address, waiting until
    /// each listener is up. Returns before bootstrapping; see [`StartingNetwork::run`].
    pub async fn listen(
        keypair: Keypair,
        config: NetworkConfig,
        registry: &mut Registry,
    ) -> Result<StartingNetwork, NetworkError> {
        let mut swarm = build_swarm(keypair, &config, registry)?;
        let metrics = Metrics::new(registry);
        let family = Family::<ProtocolLabel, Counter>::default();
        registry.sub_registry_with_prefix("flotilla").register(
            "requests_received",
            "Requests received from peers on Flotilla's protocols, by protocol (Kademlia's are libp2p_kad_inbound_requests)",
            family.clone(),
        );
        // One counter per protocol, made once: counting a request allocates nothing.
        let requests_received = Concern::ALL.map(|concern| {
            family
                .get_or_create(&ProtocolLabel {
                    protocol: concern.protocol().to_string(),
                })
                .clone()
        });
        let mut pending = HashMap::new();
        for addr in &config.listen {
            let id = swarm
                .listen_on(addr.clone())
                .map_err(|e| NetworkError::Listen {
                    addr: addr.clone(),
                    reason: transport_failure(&e),
                })?;
            pending.insert(id, addr.clone());
        }
        if config.announce_scheduler {
            // Supporting the protocol is the announcement: identify lists it. A stream
            // opened on it carries nothing and is closed at once.
            let mut control = swarm.behaviour().stream.new_control();
            let mut incoming = control
                .accept(crate::presence::SCHEDULER_PROTOCOL)
                .expect("the scheduler protocol is accepted once per swarm");
            tokio::spawn(async move {
                while let Some((_, stream)) = futures::StreamExt::next(&mut incoming).await {
                    drop(stream);
                }
            });
        }
        let control = swarm.behaviour().stream.new_control();
        let total = config.inbound_queue.max(1);
        let queue = || crate::fair::fair_queue(total, total.div_ceil(crate::rpc::QUEUE_SHARE));
        let ((offers_tx, offers), (calls_tx, calls), (jobs_tx, jobs)) = (queue(), queue(), queue());
        let (links, link_server) = if let Some(link_config) = config.call_links {
            let mut control = swarm.behaviour().stream.new_control();
            let incoming = control
                .accept(link::PROTOCOL)
                .expect("links are accepted once per swarm");
            let calls_received = Concern::ALL
                .iter()
                .position(|c| *c == Concern::Calls)
                .map(|i| requests_received[i].clone())
                .expect("calls are a concern");
            let server = LinkServer {
                incoming,
                queue: calls_tx.clone(),
                received: calls_received,
                config: link_config,
            };
            (Some(Links::new(control, link_config)), Some(server))
        } else {
            (None, None)
        };
        let (tx, commands) = mpsc::channel(256);
        let presence = Presence::default();
        let handle = Network {
            commands: tx,
            local_peer_id: *swarm.local_peer_id(),
            links: links.clone(),
            request_timeout: config.request_timeout,
            presence: presence.clone(),
        };
        let (respond, responses) = mpsc::channel(256);
        let mut event_loop = EventLoop {
            swarm,
            queries: HashMap::new(),
            requests: HashMap::new(),
            connected: HashSet::new(),
            liveness: Liveness::default(),
            bitswap: None,
            timeout: config.timeout,
            metrics,
            requests_received,
            inbound: InboundSenders {
                offers: offers_tx,
                calls: calls_tx,
                jobs: jobs_tx,
            },
            respond,
            links,
            link_server: None,
            presence,
        };
        let deadline = tokio::time::sleep(config.timeout);
        tokio::pin!(deadline);
        while !pending.is_empty() {
            tokio::select! {
                event = event_loop.swarm.select_next_some() => match event {
                    SwarmEvent::NewListenAddr { listener_id, .. } => { pending.remove(&listener_id); }
                    SwarmEvent::ListenerClosed { listener_id, reason, .. } => if let Some(addr) = pending.remove(&listener_id) {
                        let reason = reason.err().map_or("closed".to_string(), |e| root_cause(&e));
                        return Err(NetworkError::Listen { addr, reason });
                    },
                    SwarmEvent::ListenerError { listener_id, error } => if let Some(addr) = pending.remove(&listener_id) {
                        return Err(NetworkError::Listen { addr, reason: root_cause(&error) });
                    },
                    other => event_loop.handle_event(other),
                },
                _ = &mut deadline => {
                    let addr = pending.into_values().next().expect("non-empty");
                    return Err(NetworkError::Listen { addr, reason: "timed out".into() });
                }
            }
        }
        Ok(StartingNetwork {
            event_loop,
            control,
            commands,
            responses,
            inbound: Some(Inbound {
                offers,
                calls,
                jobs,
            }),
            link_server,
            handle,
        })
    }

    /// Our PeerId.
    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    async fn send(&self, command: Command) -> Result<(), NetworkError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| NetworkError::Stopped)
    }

    /// Starts a provider lookup for `key`; providers arrive on the returned channel as
    /// they are found (and are dialled), and the channel closes when the lookup ends.
    /// Dropping the receiver ends the lookup early.
    /// The lookup runs in the content DHT; see [`Network::get_providers_in`].
    pub async fn get_providers(
        &self,
        key: RecordKey,
    ) -> Result<mpsc::Receiver<PeerId>, NetworkError> {
        self.get_providers_in(Dht::Content, key).await
    }

    /// [`Network::get_providers`] in `dht`.
    pub async fn get_providers_in(
        &self,
        dht: Dht,
        key: RecordKey,
    ) -> Result<mpsc::Receiver<PeerId>, NetworkError> {
        let (found, rx) = mpsc::channel(64);
        self.send(Command::GetProviders { dht, key, found }).await?;
        Ok(rx)
    }

    /// Announces in the content DHT that we provide `key`, waiting until the record is
    /// placed.
    pub async fn start_providing(&self, key: RecordKey) -> Result<(), NetworkError> {
        self.start_providing_in(Dht::Content, key).await
    }

    /// [`Network::start_providing`] in `dht`.
    pub async fn start_providing_in(&self, dht: Dht, key: RecordKey) -> Result<(), NetworkError> {
        let (done, rx) = oneshot::channel();
        self.send(Command::StartProviding { dht, key, done })
            .await?;
        rx.await.map_err(|_| NetworkError::Stopped)?
    }

    /// The peers a lookup in the market DHT finds closest to `key` (closest first, never
    /// ourselves, only Flotilla peers); an empty list if the lookup found nobody.
    pub async fn closest_peers(&self, key: Vec<u8>) -> Result<ClosestPeers, NetworkError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::GetClosestPeers { key, reply }).await?;
        rx.await.map_err(|_| NetworkError::Stopped)
    }

    /// The Flotilla peer closest to `key` by Kademlia's XOR distance (in the market
    /// DHT), ourselves included: the peer
    /// responsible for the key. Also returns how many Kademlia requests the lookup sent.
    pub async fn responsible_peer(&self, key: Vec<u8>) -> Result<(PeerId, u32), NetworkError> {
        let target = kad::KBucketKey::new(key.clone());
        let found = self.closest_peers(key).await?;
        let me = self.local_peer_id;
        let closest = found
            .peers
            .iter()
            .copied()
            .chain(std::iter::once(me))
            .min_by_key(|p| kad::KBucketKey::from(*p).distance(&target))
            .unwrap_or(me);
        Ok((closest, found.requests))
    }

    /// Sends a request on `concern`'s protocol to `peer`, dialling `addresses` if
    /// needed, and waits for the response (at most the configured request timeout).
    pub async fn request(
        &self,
        concern: Concern,
        peer: PeerId,
        addresses: Vec<Multiaddr>,
        bytes: Vec<u8>,
    ) -> Result<Vec<u8>, RpcError> {
        if peer == self.local_peer_id {
            return Err(RpcError::ToSelf);
        }
        let links = self.links.as_ref().filter(|_| concern == Concern::Calls);
        if let Some(links) = links {
            let on_link = tokio::time::timeout(self.request_timeout, links.request(peer, &bytes));
            match on_link.await {
                Ok(Some(answer)) => return answer,
                Ok(None) => {}
                Err(_) => return Err(RpcError::Timeout(peer)),
            }
        }
        let (reply, rx) = oneshot::channel();
        self.send(Command::Request {
            concern,
            peer,
            addresses,
            bytes,
            reply,
        })
        .await
        .map_err(|_| RpcError::Stopped)?;
        let answer = rx.await.map_err(|_| RpcError::Stopped)?;
        if let (Some(links), Ok(_)) = (links, &answer) {
            // The peer is reached and answers: its next calls go on a link.
            links.open(peer);
        }
        answer
    }

    /// The links this node opened (tests look inside).
    #[cfg(test)]
    pub(crate) fn links(&self) -> Option<&Links> {
        self.links.as_ref()
    }

    /// Whether calls to `peer` go on a link now.
    pub fn has_link(&self, peer: &PeerId) -> bool {
        self.links.as_ref().is_some_and(|l| l.is_open(peer))
    }

    /// How many peers this node's market routing table knows that are closer to `key` than this
    /// node is (counted up to [`CLOSER_COUNTED`]): 0 means this node is the closest it
    /// knows of. No message is sent.
    pub async fn closer_peers_known(&self, key: Vec<u8>) -> Result<usize, NetworkError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::CloserKnown { key, reply }).await?;
        rx.await.map_err(|_| NetworkError::Stopped)
    }

    /// Whether this node is among the `k` peers closest to `key` that its market routing
    /// table knows (itself included).
    pub async fn among_closest(&self, key: Vec<u8>, k: usize) -> Result<bool, NetworkError> {
        Ok(self.closer_peers_known(key).await? < k)
    }

    /// The peers connected now, from where, and when each leaves.
    pub fn presence(&self) -> &Presence {
        &self.presence
    }

    /// The peers we are connected to.
    pub async fn connected_peers(&self) -> Result<Vec<PeerId>, NetworkError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::ConnectedPeers { reply }).await?;
        rx.await.map_err(|_| NetworkError::Stopped)
    }

    /// A snapshot of the network's state.
    pub async fn status(&self) -> Result<NetworkStatus, NetworkError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Status { reply }).await?;
        rx.await.map_err(|_| NetworkError::Stopped)
    }

    /// Asks the event loop to close every connection and stop.
    pub async fn shutdown(&self) {
        let _ = self.send(Command::Shutdown).await;
    }
}

impl StartingNetwork {
    /// The addresses we listen on.
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.event_loop.swarm.listeners().cloned().collect()
    }

    /// Our PeerId.
    pub fn local_peer_id(&self) -> PeerId {
        *self.event_loop.swarm.local_peer_id()
    }

    /// The queues of requests other peers send us, one per concern; `None` after the
    /// first call. While nobody takes them, such requests are dropped.
    pub fn take_inbound_requests(&mut self) -> Option<Inbound> {
        self.inbound.take()
    }

    /// Joins the network through the bootstrap peers (failing if none can be reached),
    /// then spawns the event loop. `bitswap` hears of peers that disconnect.
    pub async fn run(
        mut self,
        bootstrap: &[Multiaddr],
        bitswap: Bitswap,
    ) -> Result<(Network, tokio::task::JoinHandle<()>), NetworkError> {
        self.event_loop.bitswap = Some(bitswap);
        if let Some(server) = self.link_server.take() {
            let serving = link::serve(
                server.incoming,
                server.queue,
                server.received,
                server.config,
            );
            self.event_loop.link_server = Some(tokio::spawn(serving).abort_handle());
        }
        if !bootstrap.is_empty() {
            self.event_loop.join(bootstrap).await?;
        }
        let task = tokio::spawn(self.event_loop.run(self.commands, self.responses));
        Ok((self.handle, task))
    }
}

fn build_swarm(
    keypair: Keypair,
    config: &NetworkConfig,
    registry: &mut Registry,
) -> Result<Swarm<Behaviour>, NetworkError> {
    let transport_err = |e: &dyn std::fmt::Display| NetworkError::Transport(e.to_string());
    let local_peer_id = keypair.public().to_peer_id();
    let limits = StoreLimits {
        max_keys: config.max_other_provider_keys,
        ..config.provider_limits
    };
    let store = |metrics: Option<crate::record_store::StoreMetrics>| {
        let store = SplitStore::with_limits(local_peer_id, config.max_provided_keys, limits);
        match metrics {
            Some(metrics) => store.with_metrics(metrics),
            None => store,
        }
    };
    let query_timeout = config.timeout.max(Duration::from_secs(5));
    // The content DHT's store is the one IPFS peers fill: its use is measured.
    let content_store = store(Some(crate::record_store::StoreMetrics::new(registry)));
    let (kad, market) = (
        Dht::Content.behaviour(local_peer_id, content_store, query_timeout),
        Dht::Market.behaviour(local_peer_id, store(None), query_timeout),
    );
    let mdns = config.mdns;
    let max_connections = config.max_connections;
    let admission = config.admission;
    let admission_metrics = admission::AdmissionMetrics::new(registry);
    let network_key = config.network_key;
    let handshake_timeout = config.handshake_timeout;
    let rpc_config =
        request_response::Config::default().with_request_timeout(config.request_timeout);
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_other_transport(
            |key| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
                Ok(crate::closed::transport(key, network_key, yamux_config())?)
            },
        )
        .map_err(|e| transport_err(&e))?
        .with_bandwidth_metrics(registry)
        .with_behaviour(
            |key| -> Result<Behaviour, Box<dyn std::error::Error + Send + Sync>> {
                let mdns = if mdns {
                    Some(mdns::tokio::Behaviour::new(
                        mdns::Config::default(),
                        local_peer_id,
                    )?)
                } else {
                    None
                };
                Ok(Behaviour {
                    admission: admission::Behaviour::new(
                        admission,
                        max_connections,
                        admission_metrics,
                    ),
                    limits: connection_limits::Behaviour::new(
                        connection_limits::ConnectionLimits::default()
                            .with_max_established(Some(max_connections))
                            .with_max_established_per_peer(Some(2))
                            .with_max_pending_incoming(Some(64))
                            .with_max_pending_outgoing(Some(64)),
                    ),
                    kad,
                    market,
                    identify: identify::Behaviour::new(identify::Config::new(
                        IDENTIFY_PROTOCOL.to_string(),
                        key.public(),
                    )),
                    ping: ping::Behaviour::new(
                        ping::Config::new()
                            .with_interval(liveness::PING_INTERVAL)
                            .with_timeout(liveness::PING_TIMEOUT),
                    ),
                    mdns: mdns.into(),
                    stream: libp2p_stream::Behaviour::new(),
                    offers_rpc: rpc_behaviour(Concern::Offers, rpc_config.clone()),
                    calls_rpc: rpc_behaviour(Concern::Calls, rpc_config.clone()),
                    jobs_rpc: rpc_behaviour(Concern::Jobs, rpc_config),
                })
            },
        )
        .map_err(|e| transport_err(&e))?
        .with_swarm_config(|c| {
            // Lazy negotiation: a new stream's protocol and its first message go out
            // together instead of a round trip apart, so a request on a fresh stream
            // costs one round trip, not two.
            c.with_idle_connection_timeout(Duration::from_secs(60))
                .with_substream_upgrade_protocol_override(libp2p::core::upgrade::Version::V1Lazy)
        })
        // A connection not set up in time (TCP, the network key's nonces, noise, yamux)
        // is dropped, and the pending slot it held freed.
        .with_connection_timeout(handshake_timeout)
        .build();
    Ok(swarm)
}

/// The request-response behaviour of one concern's protocol, with its share of the
/// streams a connection may hold.
fn rpc_behaviour(
    concern: Concern,
    config: request_response::Config,
) -> request_response::Behaviour<BytesCodec> {
    request_response::Behaviour::with_codec(
        BytesCodec,
        [(concern.protocol(), request_response::ProtocolSupport::Full)],
        config.with_max_concurrent_streams(concern.max_streams()),
    )
}

/// Where requests of each concern go.
struct InboundSenders {
    offers: FairSender<InboundRequest>,
    calls: FairSender<InboundRequest>,
    jobs: FairSender<InboundRequest>,
}

impl InboundSenders {
    fn of(&self, concern: Concern) -> &FairSender<InboundRequest> {
        match concern {
            Concern::Offers => &self.offers,
            Concern::Calls => &self.calls,
            Concern::Jobs => &self.jobs,
        }
    }
}

/// Yamux with stream windows capped at its own 1 MiB frame limit.
///
/// rust-yamux grows a busy stream's receive window up to its share of the 1 GiB connection
/// window, but refuses frames over 1 MiB; js-libp2p peers (Helia) send a whole window in
/// one frame, so a window over 1 MiB lets them kill the connection with one large bitswap
/// message. With 4093 streams the share stays under 1 MiB (found by the Helia interop
/// check, `scripts/interop/run`).
fn yamux_config() -> yamux::Config {
    let mut config = yamux::Config::default();
    config.set_max_num_streams(4093);
    config
}

/// Where the answer to one outbound request goes.
type ReplySender = oneshot::Sender<Result<Vec<u8>, RpcError>>;

/// A label naming one protocol.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ProtocolLabel {
    protocol: String,
}

struct EventLoop {
    swarm: Swarm<Behaviour>,
    queries: HashMap<(Dht, QueryId), PendingQuery>,
    /// Outbound requests by concern and id (each behaviour numbers its own).
    requests: HashMap<(Concern, OutboundRequestId), (PeerId, ReplySender)>,
    connected: HashSet<PeerId>,
    liveness: Liveness,
    bitswap: Option<Bitswap>,
    timeout: Duration,
    metrics: Metrics,
    /// Requests received on each of Flotilla's protocols, in the order of [`Concern::ALL`].
    requests_received: [Counter; Concern::ALL.len()],
    inbound: InboundSenders,
    respond: mpsc::Sender<Outgoing>,
    /// The links we opened, closed when the loop stops.
    links: Option<Links>,
    /// The task serving others' links, stopped with the loop.
    link_server: Option<tokio::task::AbortHandle>,
    /// The peers connected now, for the handles to read.
    presence: Presence,
}

impl EventLoop {
    /// Dials every bootstrap peer and waits until one connection is up (or all failed),
    /// then starts a Kademlia bootstrap.
    async fn join(&mut self, bootstrap: &[Multiaddr]) -> Result<(), NetworkError> {
        let mut waiting = HashMap::new();
        for addr in bootstrap {
            let Some(Protocol::P2p(peer)) = addr.iter().last() else {
                return Err(NetworkError::BootstrapWithoutPeerId(addr.clone()));
            };
            // Into both DHTs: identify takes it out of a DHT whose protocol it lacks.
            for which in Dht::ALL {
                self.swarm
                    .behaviour_mut()
                    .dht(which)
                    .add_address(&peer, addr.clone());
            }
            let opts = DialOpts::peer_id(peer)
                .addresses(vec![addr.clone()])
                .build();
            if let Err(e) = self.swarm.dial(opts) {
                tracing::warn!(%addr, error = %e, "cannot dial bootstrap peer");
                continue;
            }
            waiting.insert(peer, addr.clone());
        }
        let mut failures = Vec::new();
        let deadline = tokio::time::sleep(self.timeout);
        tokio::pin!(deadline);
        loop {
            if waiting.is_empty() {
                return Err(NetworkError::BootstrapUnreachable(failures.join("; ")));
            }
            tokio::select! {
                event = self.swarm.select_next_some() => {
                    match &event {
                        SwarmEvent::ConnectionEstablished { peer_id, .. } if waiting.contains_key(peer_id) => {
                            self.handle_event(event);
                            break;
                        }
                        SwarmEvent::OutgoingConnectionError { peer_id: Some(peer), error, .. } => {
                            if let Some(addr) = waiting.remove(peer) {
                                failures.push(format!("{addr}: {}", dial_failure(error)));
                            }
                        }
                        _ => {}
                    }
                    self.handle_event(event);
                }
                _ = &mut deadline => {
                    failures.extend(waiting.values().map(|a| format!("{a}: timed out")));
                    return Err(NetworkError::BootstrapUnreachable(failures.join("; ")));
                }
            }
        }
        for which in Dht::ALL {
            if let Err(e) = self.swarm.behaviour_mut().dht(which).bootstrap() {
                tracing::debug!(error = %e, dht = ?which, "kademlia bootstrap not started");
            }
        }
        Ok(())
    }

    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut responses: mpsc::Receiver<Outgoing>,
    ) {
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.handle_event(event),
                command = commands.recv() => match command {
                    Some(Command::Shutdown) | None => break,
                    Some(command) => self.handle_command(command),
                },
                Some((concern, channel, bytes)) = responses.recv() => {
                    // Fails only if the requester has gone or timed out.
                    let _ = self.swarm.behaviour_mut().rpc(concern).send_response(channel, bytes);
                }
            }
        }
        if let Some(server) = self.link_server.take() {
            server.abort();
        }
        if let Some(links) = &self.links {
            links.close_all();
        }
        self.presence.clear();
        tracing::info!("network stopped");
    }

    fn handle_command(&mut self, command: Command) {
        if let Command::Request {
            concern,
            peer,
            addresses,
            bytes,
            reply,
        } = command
        {
            let id = self
                .swarm
                .behaviour_mut()
                .rpc(concern)
                .send_request_with_addresses(&peer, bytes, addresses);
            self.requests.insert((concern, id), (peer, reply));
            return;
        }
        if let Command::CloserKnown { key, reply } = command {
            let target = kad::KBucketKey::new(key);
            let me = kad::KBucketKey::from(*self.swarm.local_peer_id());
            let mine = me.distance(&target);
            let closer = self
                .swarm
                .behaviour_mut()
                .market
                .get_closest_local_peers(&target)
                .take_while(|p| p.distance(&target) < mine)
                .take(CLOSER_COUNTED)
                .count();
            let _ = reply.send(closer);
            return;
        }
        let behaviour = self.swarm.behaviour_mut();
        match command {
            Command::GetClosestPeers { key, reply } => {
                let id = behaviour.market.get_closest_peers(key);
                self.queries
                    .insert((Dht::Market, id), PendingQuery::Closest(reply));
            }
            Command::Request { .. } => {}
            Command::GetProviders { dht, key, found } => {
                let id = behaviour.dht(dht).get_providers(key);
                self.queries
                    .insert((dht, id), PendingQuery::Providers(found));
            }
            Command::StartProviding { dht, key, done } => {
                match behaviour.dht(dht).start_providing(key) {
                    Ok(id) => {
                        self.queries.insert((dht, id), PendingQuery::Provide(done));
                    }
                    Err(e) => {
                        let _ = done.send(Err(NetworkError::Provide(e.to_string())));
                    }
                }
            }
            Command::ConnectedPeers { reply } => {
                let _ = reply.send(self.connected.iter().copied().collect());
            }
            Command::CloserKnown { .. } => {}
            Command::Status { reply } => {
                let size = |kad: &mut kad::Behaviour<SplitStore>| {
                    kad.kbuckets().map(|b| b.num_entries()).sum()
                };
                let routing_table_size = size(&mut behaviour.kad);
                let market_routing_table_size = size(&mut behaviour.market);
                let _ = reply.send(NetworkStatus {
                    peer_id: self.swarm.local_peer_id().to_string(),
                    listen_addrs: self.swarm.listeners().map(ToString::to_string).collect(),
                    connected_peers: self.connected.iter().map(ToString::to_string).collect(),
                    routing_table_size,
                    market_routing_table_size,
                });
            }
            Command::Shutdown => {}
        }
    }

    fn handle_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        self.metrics.record(&event);
        match &event {
            SwarmEvent::Behaviour(BehaviourEvent::Kad(e)) => self.metrics.record(e),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(e)) => self.metrics.record(e),
            SwarmEvent::ConnectionClosed { connection_id, .. } => {
                self.liveness.on_closed(*connection_id);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(e)) => {
                if self.liveness.on_ping(e.connection, e.result.is_ok()) {
                    tracing::info!(peer = %e.peer, "closing a connection that stopped answering pings");
                    self.swarm.close_connection(e.connection);
                }
                self.metrics.record(e)
            }
            _ => {}
        }
        match event {
            SwarmEvent::NewListenAddr { address, .. } => tracing::info!(%address, "listening"),
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                self.connected.insert(peer_id);
                self.presence.connected(
                    peer_id,
                    endpoint.get_remote_address(),
                    endpoint.is_dialer(),
                );
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                ..
            } if num_established > 0 => {
                self.presence
                    .disconnected(&peer_id, num_established as usize);
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                self.connected.remove(&peer_id);
                self.presence.disconnected(&peer_id, 0);
                if let Some(bitswap) = &self.bitswap {
                    bitswap.peer_disconnected(&peer_id);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                self.presence.identified(&peer_id, &info.protocols);
                for which in Dht::ALL {
                    dht::learn(
                        which,
                        self.swarm.behaviour_mut().dht(which),
                        &peer_id,
                        &info,
                    );
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                for (peer, addr) in found {
                    tracing::debug!(%peer, %addr, "found by mDNS");
                    self.swarm.behaviour_mut().kad.add_address(&peer, addr);
                    let _ = self.swarm.dial(DialOpts::peer_id(peer).build());
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(event)) => {
                self.handle_kad(Dht::Content, event)
            }
            SwarmEvent::Behaviour(BehaviourEvent::Market(event)) => {
                self.handle_kad(Dht::Market, event)
            }
            SwarmEvent::Behaviour(BehaviourEvent::OffersRpc(event)) => {
                self.handle_rpc(Concern::Offers, event)
            }
            SwarmEvent::Behaviour(BehaviourEvent::CallsRpc(event)) => {
                self.handle_rpc(Concern::Calls, event)
            }
            SwarmEvent::Behaviour(BehaviourEvent::JobsRpc(event)) => {
                self.handle_rpc(Concern::Jobs, event)
            }
            _ => {}
        }
    }

    fn handle_rpc(&mut self, concern: Concern, event: request_response::Event<Vec<u8>, Vec<u8>>) {
        match event {
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                if let Some(i) = Concern::ALL.iter().position(|c| *c == concern) {
                    self.requests_received[i].inc();
                }
                let inbound = InboundRequest {
                    peer,
                    concern,
                    bytes: request,
                    reply: Reply::Swarm {
                        channel,
                        respond: self.respond.clone(),
                    },
                };
                // A request refused is dropped: its sender sees it fail.
                crate::rpc::enqueue(self.inbound.of(concern), inbound);
            }
            request_response::Event::Message {
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some((_, reply)) = self.requests.remove(&(concern, request_id)) {
                    let _ = reply.send(Ok(response));
                }
            }
            request_response::Event::OutboundFailure {
                request_id, error, ..
            } => {
                if let Some((peer, reply)) = self.requests.remove(&(concern, request_id)) {
                    let _ = reply.send(Err(RpcError::from_failure(peer, concern, error)));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "inbound request failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    fn handle_kad(&mut self, dht: Dht, event: kad::Event) {
        let kad::Event::OutboundQueryProgressed {
            id,
            result,
            step,
            stats,
        } = event
        else {
            return;
        };
        match result {
            QueryResult::GetProviders(result) => {
                let Some(PendingQuery::Providers(found)) = self.queries.get(&(dht, id)) else {
                    return;
                };
                let mut finished = step.last;
                if let Ok(GetProvidersOk::FoundProviders { providers, .. }) = result {
                    let me = *self.swarm.local_peer_id();
                    for peer in providers.into_iter().filter(|p| *p != me) {
                        // Dial now, while the query still knows the provider's addresses.
                        if !self.connected.contains(&peer) {
                            let _ = self.swarm.dial(DialOpts::peer_id(peer).build());
                        }
                        if found.try_send(peer).is_err() && found.is_closed() {
                            finished = true;
                        }
                    }
                }
                if found.is_closed() && !finished {
                    if let Some(mut query) = self.swarm.behaviour_mut().dht(dht).query_mut(&id) {
                        query.finish();
                    }
                    finished = true;
                }
                if finished {
                    self.queries.remove(&(dht, id));
                }
            }
            QueryResult::GetClosestPeers(result) => {
                if let Some(PendingQuery::Closest(reply)) = self.queries.remove(&(dht, id)) {
                    let peers = match result {
                        Ok(ok) => ok.peers,
                        Err(GetClosestPeersError::Timeout { peers, .. }) => peers,
                    };
                    let _ = reply.send(ClosestPeers {
                        peers: peers.into_iter().map(|p| p.peer_id).collect(),
                        requests: stats.num_requests(),
                    });
                }
            }
            QueryResult::StartProviding(result) => {
                if let Some(PendingQuery::Provide(done)) = self.queries.remove(&(dht, id)) {
                    // Too few peers to replicate to is not a failure: the record is in our
                    // own store, and peers that look it up through us find it.
                    let outcome = match result {
                        Ok(_) | Err(kad::AddProviderError::Timeout { .. }) => Ok(()),
                    };
                    let _ = done.send(outcome);
                }
            }
            _ => {}
        }
    }
}

/// Why a dial failed, in one line.
fn dial_failure(error: &libp2p::swarm::DialError) -> String {
    match error {
        libp2p::swarm::DialError::Transport(attempts) => attempts
            .iter()
            .map(|(_, e)| transport_failure(e))
            .collect::<Vec<_>>()
            .join("; "),
        other => root_cause(other),
    }
}

/// Why a transport operation failed, in one line.
fn transport_failure(error: &libp2p::TransportError<std::io::Error>) -> String {
    match error {
        libp2p::TransportError::Other(e) => root_cause(e),
        libp2p::TransportError::MultiaddrNotSupported(addr) => {
            format!("{addr} is not a supported address")
        }
    }
}

/// The innermost cause of an error, in one line: "Connection refused (os error 111)"
/// rather than the layers of transport errors wrapped around it.
fn root_cause(error: &dyn std::error::Error) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    let text = cause.to_string();
    let text = if text.trim().is_empty() {
        error.to_string()
    } else {
        text
    };
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
