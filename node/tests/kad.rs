//! Market lookups in a DHT shared with IPFS peers: plain libp2p peers that speak only
//! `/ipfs/kad/1.0.0` (server mode) and identify sit beside Flotilla nodes, in every
//! Flotilla node's content routing table. Market keys — closest peers, the peer
//! responsible for a key, region probes of a discovery, the scheduler registry — must only
//! ever land on Flotilla peers, while content stays provided and found on the IPFS DHT
//! both ways.
#![allow(clippy::unwrap_used)]

mod common;

use bytesize::ByteSize;
use common::{all_published, random_bytes, wait_until};
use flotilla_node::config::NodeConfig;
use flotilla_node::daemon::{self, RunningNode};
use flotilla_node::demo;
use flotilla_node::market::DiscoverRequest;
use flotilla_overlay::dht::Dht;
use flotilla_overlay::service::provider_key;
use futures::StreamExt;
use libp2p::kad::{self, GetProvidersOk, QueryResult, RecordKey, store::MemoryStore};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, identify, noise, tcp, yamux};
use std::collections::HashSet;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// IPFS peers beside the Flotilla nodes.
const PLAIN_PEERS: usize = 6;
/// Flotilla nodes: a scheduler, two volunteers, and one that joins through an IPFS peer.
const FLOTILLA_NODES: usize = 4;

#[derive(NetworkBehaviour)]
struct IpfsBehaviour {
    kad: kad::Behaviour<MemoryStore>,
    identify: identify::Behaviour,
}

enum PlainCommand {
    Provide(RecordKey, oneshot::Sender<()>),
    Providers(RecordKey, oneshot::Sender<HashSet<PeerId>>),
}

/// A plain libp2p peer speaking IPFS's Kademlia only (no Flotilla protocol at all).
struct PlainPeer {
    peer_id: PeerId,
    addr: Multiaddr,
    commands: mpsc::Sender<PlainCommand>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PlainPeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PlainPeer {
    /// Listens on loopback and dials every node of `join`, putting each in its table.
    async fn start(join: &[&RunningNode]) -> PlainPeer {
        PlainPeer::speaking(kad::PROTOCOL_NAME, join).await
    }

    /// [`PlainPeer::start`] with Kademlia on `protocol`.
    async fn speaking(protocol: libp2p::StreamProtocol, join: &[&RunningNode]) -> PlainPeer {
        let mut swarm = libp2p::SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_tcp(
                tcp::Config::default(),
                noise::Config::new,
                yamux::Config::default,
            )
            .unwrap()
            .with_behaviour(|key| {
                let peer_id = key.public().to_peer_id();
                let mut kad = kad::Behaviour::with_config(
                    peer_id,
                    MemoryStore::new(peer_id),
                    kad::Config::new(protocol),
                );
                kad.set_mode(Some(kad::Mode::Server));
                IpfsBehaviour {
                    kad,
                    identify: identify::Behaviour::new(identify::Config::new(
                        "/ipfs/0.1.0".into(),
                        key.public(),
                    )),
                }
            })
            .unwrap()
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
            .build();
        swarm
            .listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap())
            .unwrap();
        let addr = loop {
            if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
                break address;
            }
        };
        for node in join {
            let node_addr = node.bootstrap_addr();
            swarm
                .behaviour_mut()
                .kad
                .add_address(&node.peer_id(), node_addr.clone());
            swarm.dial(node_addr).unwrap();
        }
        let peer_id = *swarm.local_peer_id();
        let (commands, mut rx) = mpsc::channel(8);
        let task = tokio::spawn(async move {
            let mut providing = std::collections::HashMap::new();
            let mut finding = std::collections::HashMap::new();
            loop {
                tokio::select! {
                    command = rx.recv() => match command {
                        Some(PlainCommand::Provide(key, done)) => {
                            let id = swarm.behaviour_mut().kad.start_providing(key).unwrap();
                            providing.insert(id, done);
                        }
                        Some(PlainCommand::Providers(key, reply)) => {
                            let id = swarm.behaviour_mut().kad.get_providers(key);
                            finding.insert(id, (HashSet::new(), reply));
                        }
                        None => break,
                    },
                    event = swarm.select_next_some() => {
                        let SwarmEvent::Behaviour(IpfsBehaviourEvent::Kad(
                            kad::Event::OutboundQueryProgressed { id, result, step, .. },
                        )) = event else { continue };
                        match result {
                            QueryResult::StartProviding(_) => {
                                if let Some(done) = providing.remove(&id) {
                                    let _ = done.send(());
                                }
                            }
                            QueryResult::GetProviders(found) => {
                                if let (Some((all, _)), Ok(GetProvidersOk::FoundProviders { providers, .. })) =
                                    (finding.get_mut(&id), found)
                                {
                                    all.extend(providers);
                                }
                                if step.last && let Some((all, reply)) = finding.remove(&id) {
                                    let _ = reply.send(all);
                                }
                            }
                            _ => {}
                        }
                    }
                }
            }
        });
        PlainPeer {
            addr: addr.with_p2p(peer_id).unwrap(),
            peer_id,
            commands,
            task,
        }
    }

    async fn provide(&self, key: RecordKey) {
        let (done, rx) = oneshot::channel();
        self.commands
            .send(PlainCommand::Provide(key, done))
            .await
            .unwrap();
        rx.await.unwrap();
    }

    async fn providers(&self, key: RecordKey) -> HashSet<PeerId> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(PlainCommand::Providers(key, reply))
            .await
            .unwrap();
        rx.await.unwrap()
    }
}

fn quick(config: NodeConfig) -> NodeConfig {
    NodeConfig {
        offer_ttl: Duration::from_secs(6),
        offer_refresh_margin: Duration::from_secs(3),
        answer_timeout: Duration::from_secs(1),
        notify_interval: Duration::from_millis(300),
        ..config
    }
}

fn role(i: usize, config: NodeConfig) -> NodeConfig {
    let config = quick(config);
    match i {
        0 => NodeConfig {
            scheduler: true,
            ..config
        },
        _ => NodeConfig {
            offer_memory: Some(ByteSize::mib(512)),
            ..config
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn market_lookups_land_only_on_flotilla_peers_and_content_stays_on_ipfs() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = demo::start_network_with(dir.path(), FLOTILLA_NODES - 1, role)
        .await
        .unwrap();
    let mut plain = Vec::new();
    for _ in 0..PLAIN_PEERS {
        plain.push(PlainPeer::start(&nodes.iter().collect::<Vec<_>>()).await);
    }
    // The last Flotilla node joins through an IPFS peer only: it finds the others
    // through the content DHT, and the market DHT through them.
    let config = demo::loopback_config(
        &dir.path().join("through-ipfs"),
        vec![plain[0].addr.clone()],
    );
    nodes.push(
        daemon::start(role(FLOTILLA_NODES - 1, config))
            .await
            .unwrap(),
    );
    let flotilla: HashSet<PeerId> = nodes.iter().map(RunningNode::peer_id).collect();
    let ipfs: HashSet<PeerId> = plain.iter().map(|p| p.peer_id).collect();

    // The DHT is shared: IPFS peers are in every Flotilla node's content table.
    for node in &nodes {
        wait_until("the content tables hold the IPFS peers", || async {
            let status = node.overlay().network().status().await.unwrap();
            status.routing_table_size >= PLAIN_PEERS
                && status.market_routing_table_size >= FLOTILLA_NODES - 1
        })
        .await;
        let status = node.overlay().network().status().await.unwrap();
        assert!(
            status.market_routing_table_size < FLOTILLA_NODES,
            "only Flotilla peers in the market table: {status:?}"
        );
    }

    // Closest peers, the responsible peer and the local count, for many market keys.
    let mut looked_up = 0;
    for k in 0u32..24 {
        let key = format!("market key {k}").into_bytes();
        for node in &nodes {
            let network = node.overlay().network();
            let closest = network.closest_peers(key.clone()).await.unwrap();
            assert!(
                !closest.peers.is_empty(),
                "the market lookup finds Flotilla peers"
            );
            for peer in &closest.peers {
                assert!(
                    flotilla.contains(peer) && !ipfs.contains(peer),
                    "market lookup returned a non-Flotilla peer {peer}"
                );
            }
            let (responsible, _) = network.responsible_peer(key.clone()).await.unwrap();
            assert!(
                flotilla.contains(&responsible),
                "responsible: {responsible}"
            );
            assert!(network.closer_peers_known(key.clone()).await.unwrap() < FLOTILLA_NODES);
            looked_up += closest.peers.len();
        }
    }
    assert!(looked_up > 0);

    // Discoveries: every region probe asks a Flotilla peer, and offers are found.
    wait_until("offers are published", || all_published(&nodes)).await;
    let mut probes = 0;
    let mut seen = 0;
    // Random probes of a small network may all land on peers holding nothing: discover
    // until offers were seen (at most 40 times), checking every probe on the way.
    for _ in 0..40 {
        if probes >= 16 && seen > 0 {
            break;
        }
        let found = nodes[0]
            .market()
            .discover(DiscoverRequest {
                memory_mib: 256,
                max_tries: Some(4),
                reserve: None,
            })
            .await
            .unwrap();
        for probe in &found.report.probes {
            if let Some(holder) = &probe.holder {
                let holder: PeerId = holder.parse().unwrap();
                assert!(
                    flotilla.contains(&holder),
                    "a region probe landed on {holder}, not a Flotilla peer"
                );
                probes += 1;
                seen += probe.offers_seen;
            }
        }
    }
    assert!(probes > 0 && seen > 0, "{probes} probes saw {seen} offers");

    // Content stays on the IPFS DHT, both ways.
    let cid = common::add(&nodes[1], &random_bytes(100_000, 7)).await;
    let found = plain[1].providers(provider_key(&cid)).await;
    assert!(
        found.contains(&nodes[1].peer_id()),
        "an IPFS peer finds the Flotilla provider: {found:?}"
    );
    let key = RecordKey::new(&b"held by an IPFS peer".as_slice());
    plain[2].provide(key.clone()).await;
    let network = nodes[2].overlay().network();
    let mut found = network.get_providers(key.clone()).await.unwrap();
    let mut providers = HashSet::new();
    while let Some(peer) = found.recv().await {
        providers.insert(peer);
    }
    assert!(
        providers.contains(&plain[2].peer_id),
        "a Flotilla node finds the IPFS provider: {providers:?}"
    );
    // The market DHT does not carry it.
    let mut found = network.get_providers_in(Dht::Market, key).await.unwrap();
    assert!(found.recv().await.is_none(), "not in the market DHT");

    for node in nodes {
        node.stop().await;
    }
}

/// Honest schedulers and clients of the registry, after 24 ground identities filled every
/// registry key's 20 provider places at the peers keeping them and then left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_captured_by_ground_identities_does_not_stop_an_honest_client() {
    use flotilla_scheduler::registry::registry_keys;
    let dir = tempfile::tempdir().unwrap();
    // A keeper and a volunteer first; the scheduler and the clients come after the flood.
    let mut nodes = demo::start_network_with(dir.path(), 2, |i, c| role(i + 1, c))
        .await
        .unwrap();
    let mut fakes = Vec::new();
    for _ in 0..24 {
        fakes.push(
            PlainPeer::speaking(
                flotilla_overlay::dht::MARKET_PROTOCOL,
                &nodes.iter().collect::<Vec<_>>(),
            )
            .await,
        );
    }
    let provided = fakes.iter().flat_map(|fake| {
        registry_keys()
            .into_iter()
            .map(move |key| fake.provide(RecordKey::new(&key)))
    });
    futures::future::join_all(provided).await;
    // The registry is full of strangers (asked while they are still there, until a
    // lookup sees them all: their announcements travel unacknowledged).
    let network = nodes[0].overlay().network().clone();
    common::wait_until_within("the registry is captured", Duration::from_secs(30), || {
        let network = network.clone();
        async move {
            let mut found = network
                .get_providers_in(Dht::Market, RecordKey::new(&registry_keys()[0]))
                .await
                .unwrap();
            let mut providers = HashSet::new();
            while let Some(peer) = found.recv().await {
                providers.insert(peer);
            }
            providers.len() >= 20
        }
    })
    .await;
    // Ground identities: they provide, then are gone.
    drop(fakes);
    let bootstrap = vec![nodes[0].bootstrap_addr()];
    let scheduler = daemon::start(role(
        0,
        demo::loopback_config(&dir.path().join("scheduler"), bootstrap.clone()),
    ))
    .await
    .unwrap();
    let honest = scheduler.peer_id();
    nodes.push(scheduler);
    let client = daemon::start(role(
        1,
        demo::loopback_config(&dir.path().join("client"), bootstrap.clone()),
    ))
    .await
    .unwrap();
    let trusting = daemon::start(NodeConfig {
        trusted_schedulers: vec![honest],
        ..role(
            1,
            demo::loopback_config(&dir.path().join("trusting"), bootstrap),
        )
    })
    .await
    .unwrap();
    wait_until("offers are published", || all_published(&nodes)).await;
    for asker in [&client, &trusting] {
        for _ in 0..3 {
            let found = asker
                .market()
                .discover(DiscoverRequest {
                    memory_mib: 256,
                    max_tries: Some(4),
                    reserve: None,
                })
                .await
                .unwrap();
            assert_eq!(found.scheduler, honest.to_string());
        }
    }
    for node in nodes.into_iter().chain([client, trusting]) {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_learn_schedulers_from_the_peers_they_are_connected_to() {
    let dir = tempfile::tempdir().unwrap();
    // A scheduler (node 0) and a volunteer (node 1); a client joins through both.
    let nodes = demo::start_network_with(dir.path(), 2, role).await.unwrap();
    let (scheduler, volunteer) = (nodes[0].peer_id(), nodes[1].peer_id());
    let client = daemon::start(quick(demo::loopback_config(
        &dir.path().join("client"),
        nodes.iter().map(|n| n.bootstrap_addr()).collect(),
    )))
    .await
    .unwrap();
    // A scheduler that dials the client on its own is not taken at its word.
    let stranger = daemon::start(role(
        0,
        demo::loopback_config(&dir.path().join("stranger"), vec![client.bootstrap_addr()]),
    ))
    .await
    .unwrap();
    let presence = client.overlay().network().presence().clone();
    let everyone = [scheduler, volunteer, stranger.peer_id()];
    wait_until("identify told the client what each supports", || {
        let presence = presence.clone();
        async move { everyone.iter().all(|p| presence.is_identified(p)) }
    })
    .await;
    assert_eq!(presence.announced_schedulers(), vec![scheduler]);
    for node in nodes.into_iter().chain([client, stranger]) {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_list_of_trusted_schedulers_overrides_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    // A volunteer (node 0, which the others join through) and two schedulers.
    let nodes = demo::start_network_with(dir.path(), 3, |i, c| match i {
        0 => role(1, c),
        _ => role(0, c),
    })
    .await
    .unwrap();
    let trusted = nodes[2].peer_id();
    // The client knows where its trusted scheduler is (the list holds PeerIds: the peer
    // must be reachable by the DHT or, as here, among those it joins through).
    let client = daemon::start(NodeConfig {
        trusted_schedulers: vec![trusted],
        ..quick(demo::loopback_config(
            &dir.path().join("client"),
            nodes.iter().map(|n| n.bootstrap_addr()).collect(),
        ))
    })
    .await
    .unwrap();
    wait_until("offers are published", || all_published(&nodes[..1])).await;
    let presence = client.overlay().network().presence().clone();
    wait_until("the client is connected to both schedulers", || {
        let presence = presence.clone();
        let other = nodes[1].peer_id();
        async move { presence.is_connected(&trusted) && presence.is_connected(&other) }
    })
    .await;
    // Both schedulers are registered and announce themselves; only the trusted one is
    // asked.
    for _ in 0..8 {
        let found = client
            .market()
            .discover(DiscoverRequest {
                memory_mib: 256,
                max_tries: Some(4),
                reserve: None,
            })
            .await
            .unwrap();
        assert_eq!(found.scheduler, trusted.to_string());
    }
    for node in nodes.into_iter().chain([client]) {
        node.stop().await;
    }
}
