//! Floods from many identities (PeerIds are free), each attacker a real libp2p peer on
//! loopback: silent bitswap streams, connection floods, and provider records. Each test
//! checks that an honest peer is still served, that the node's structures stay bounded,
//! and that the attackers were refused or throttled.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use flotilla_overlay::bitswap::{BitswapConfig, PROTOCOL};
use flotilla_overlay::fetch::FetchConfig;
use flotilla_overlay::network::NetworkConfig;
use flotilla_overlay::record_store::StoreLimits;
use flotilla_overlay::rpc::Concern;
use flotilla_overlay::service::{Overlay, OverlayConfig};
use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, kad, noise, tcp, yamux};
use prometheus_client::registry::Registry;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};

/// A node under attack, with its metrics.
struct Node {
    overlay: Overlay,
    registry: Registry,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn start(network: NetworkConfig) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let config = OverlayConfig {
            store_dir: dir.path().to_path_buf(),
            store_capacity: 64 << 20,
            network: NetworkConfig {
                mdns: false,
                call_links: None,
                ..network
            },
            bitswap: BitswapConfig::default(),
            fetch: FetchConfig::default(),
        };
        let mut registry = Registry::default();
        let (overlay, _task) = Overlay::start(config, Keypair::generate_ed25519(), &mut registry)
            .await
            .unwrap();
        Node {
            overlay,
            registry,
            _dir: dir,
        }
    }

    /// The value of a metric (0 if absent).
    fn metric(&self, name: &str) -> f64 {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    fn addr(&self, ip6: bool) -> Multiaddr {
        self.overlay
            .listen_addrs()
            .iter()
            .find(|a| matches!(a.iter().next(), Some(Protocol::Ip6(_))) == ip6)
            .cloned()
            .expect("listening on that family")
    }

    async fn connected(&self) -> usize {
        self.overlay
            .network()
            .connected_peers()
            .await
            .unwrap()
            .len()
    }
}

fn listen_both() -> Vec<Multiaddr> {
    vec![
        "/ip4/127.0.0.1/tcp/0".parse().unwrap(),
        "/ip6/::1/tcp/0".parse().unwrap(),
    ]
}

/// A bare libp2p peer (TCP + noise + yamux) running `behaviour`.
fn bare<B: NetworkBehaviour + Send + 'static>(behaviour: B) -> Swarm<B> {
    libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| behaviour)
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build()
}

/// Polls `condition` until it holds, failing after `limit`.
async fn wait_until<F, Fut>(what: &str, limit: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Dials `addr` from `n` fresh identities, at most 32 handshakes at a time (below the
/// node's limit on pending connections), and keeps every swarm running until the
/// returned tasks are dropped. Returns how many saw their connection established.
async fn flood_connections(addr: &Multiaddr, n: usize) -> (Vec<AbortOnDrop>, usize) {
    let gate = Arc::new(Semaphore::new(32));
    let (done, mut results) = mpsc::channel(n);
    let mut tasks = Vec::new();
    for _ in 0..n {
        let permit = gate.clone().acquire_owned().await.unwrap();
        let mut swarm = bare(libp2p::swarm::dummy::Behaviour);
        swarm.dial(addr.clone()).unwrap();
        let done = done.clone();
        tasks.push(AbortOnDrop(tokio::spawn(async move {
            let mut permit = Some(permit);
            let mut done = Some(done);
            loop {
                let event = swarm.select_next_some().await;
                let outcome = match event {
                    SwarmEvent::ConnectionEstablished { .. } => Some(true),
                    SwarmEvent::OutgoingConnectionError { .. } => Some(false),
                    _ => None,
                };
                if let Some(ok) = outcome
                    && let Some(done) = done.take()
                {
                    drop(permit.take());
                    let _ = done.send(ok).await;
                }
            }
        })));
    }
    drop(done);
    let mut established = 0;
    for _ in 0..n {
        if results.recv().await.unwrap() {
            established += 1;
        }
    }
    (tasks, established)
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Connects one honest peer to `addr`; whether the node keeps the connection.
async fn honest_connects(node: &Node, addr: &Multiaddr) -> (AbortOnDrop, bool) {
    let mut swarm = bare(libp2p::swarm::dummy::Behaviour);
    let me = *swarm.local_peer_id();
    swarm.dial(addr.clone()).unwrap();
    let task = AbortOnDrop(tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    }));
    let network = node.overlay.network().clone();
    let mut kept = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < deadline {
        if network.connected_peers().await.unwrap().contains(&me) {
            kept = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (task, kept)
}

/// Starts a peer the node can dial, answering every offers request with its bytes.
async fn echo_peer() -> Node {
    let peer = Node::start(NetworkConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        ..NetworkConfig::default()
    })
    .await;
    let mut inbound = peer.overlay.take_inbound_requests().unwrap();
    tokio::spawn(async move {
        while let Some(request) = inbound.offers.recv().await {
            let bytes = request.bytes.clone();
            let _ = request.respond(bytes).await;
        }
    });
    peer
}

async fn dial_out(node: &Node, to: &Node) -> bool {
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        node.overlay.network().request(
            Concern::Offers,
            to.overlay.peer_id(),
            to.overlay.listen_addrs().to_vec(),
            b"ping".to_vec(),
        ),
    )
    .await;
    matches!(answer, Ok(Ok(bytes)) if bytes == b"ping")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_from_256_identities_leaves_room_to_dial_out_and_for_others() {
    // Loopback is exempt from the per-address limit by default: all 256 come from
    // 127.0.0.1 as if from 256 hosts.
    let node = Node::start(NetworkConfig {
        listen: listen_both(),
        ..NetworkConfig::default()
    })
    .await;
    let elsewhere = echo_peer().await;
    let (_attackers, _) = flood_connections(&node.addr(false), 256).await;
    let settled = || async {
        node.connected().await as f64 + node.metric("flotilla_connections_refused_total") >= 256.0
    };
    wait_until(
        "the node has decided on every attacker",
        Duration::from_secs(10),
        settled,
    )
    .await;
    let inbound = node.connected().await;
    assert!(
        inbound <= 192,
        "{inbound} inbound connections: over the inbound share"
    );
    assert!(node.metric("flotilla_connections_refused_total") >= 64.0);

    // The node still dials out: slots are kept for its own connections.
    assert!(
        dial_out(&node, &elsewhere).await,
        "the node could not dial out"
    );
    // A peer from another address still gets in, in place of an attacker.
    let (_honest, kept) = honest_connects(&node, &node.addr(true)).await;
    assert!(kept, "the honest peer was refused");
    assert_eq!(node.metric("flotilla_connections_evicted_total"), 1.0);
    // The evicted connection closes on its own task: under load, a moment after.
    wait_until(
        "the evicted attacker's connection is gone",
        Duration::from_secs(10),
        || async { node.connected().await <= 192 + 1 },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_gets_at_most_its_share_of_inbound_connections() {
    let node = Node::start(NetworkConfig {
        listen: listen_both(),
        admission: flotilla_overlay::admission::AdmissionConfig {
            exempt_loopback: false,
            ..Default::default()
        },
        ..NetworkConfig::default()
    })
    .await;
    let (_attackers, _) = flood_connections(&node.addr(false), 256).await;
    let settled = || async {
        node.connected().await as f64 + node.metric("flotilla_connections_refused_total") >= 256.0
    };
    wait_until(
        "the node has decided on every attacker",
        Duration::from_secs(10),
        settled,
    )
    .await;
    assert_eq!(node.connected().await, 8, "one address over its share");
    assert_eq!(node.metric("flotilla_connections_refused_total"), 248.0);
    let (_honest, kept) = honest_connects(&node, &node.addr(true)).await;
    assert!(kept, "a peer from another address was refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_dropped_at_the_handshake_timeout_and_new_peers_get_in() {
    // 256 TCP connections that never say a word: the first 64 fill every pending slot,
    // and until the handshake's deadline the node takes no new peer. The deadline is a
    // setting (here 0.5 s; libp2p's 10 s by default).
    let node = Node::start(NetworkConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        handshake_timeout: Duration::from_millis(500),
        ..NetworkConfig::default()
    })
    .await;
    let Some(Protocol::Tcp(port)) = node.addr(false).iter().nth(1) else {
        panic!("not a TCP address");
    };
    let mut silent = Vec::new();
    for _ in 0..256 {
        silent.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap(),
        );
    }
    // Every one of them is closed by the node, without the attacker doing anything.
    let closed = futures::future::join_all(silent.iter_mut().map(|socket| async move {
        use tokio::io::AsyncReadExt;
        let mut byte = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(5), socket.read(&mut byte))
            .await
            .is_ok()
    }))
    .await;
    let open = closed.iter().filter(|closed| !**closed).count();
    assert_eq!(open, 0, "{open} silent connections still held after 5 s");
    // The pending slots are free again: an honest peer connects.
    let (_honest, kept) = honest_connects(&node, &node.addr(false)).await;
    assert!(kept, "the honest peer was refused");
}

/// A peer speaking raw streams, for holding silent bitswap streams.
async fn stream_peer(addr: &Multiaddr) -> (AbortOnDrop, PeerId, libp2p_stream::Control) {
    let mut swarm = bare(libp2p_stream::Behaviour::new());
    let id = *swarm.local_peer_id();
    let control = swarm.behaviour().new_control();
    swarm.dial(addr.clone()).unwrap();
    loop {
        match swarm.select_next_some().await {
            SwarmEvent::ConnectionEstablished { .. } => break,
            SwarmEvent::OutgoingConnectionError { error, .. } => panic!("cannot connect: {error}"),
            _ => {}
        }
    }
    let task = AbortOnDrop(tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    }));
    (task, id, control)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_bitswap_streams_from_64_identities_do_not_stop_the_node_serving() {
    let node = Node::start(NetworkConfig {
        listen: listen_both(),
        ..NetworkConfig::default()
    })
    .await;
    let added = node.overlay.add(&[7u8; 10_000][..]).await.unwrap();
    let cid = flotilla_overlay::Cid::try_from(added.cid.as_str()).unwrap();
    // 64 identities × 16 silent streams: every one of the node's 1024 slots.
    let mut attackers = Vec::new();
    let mut streams = Vec::new();
    for _ in 0..64 {
        let (task, id, mut control) = stream_peer(&node.addr(false)).await;
        for _ in 0..16 {
            streams.push(
                control
                    .open_stream(node.overlay.peer_id(), PROTOCOL)
                    .await
                    .unwrap(),
            );
        }
        attackers.push((task, id, control));
    }
    let bitswap = node.overlay.bitswap().clone();
    // libp2p-stream may drop a stream the node has not taken yet: top up until the
    // attackers hold every slot.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while bitswap.inbound_streams() < 1024 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the attackers hold only {} slots",
            bitswap.inbound_streams()
        );
        for (_, id, control) in attackers.iter_mut() {
            for _ in bitswap.inbound_streams_of(id)..16 {
                if let Ok(s) = control.open_stream(node.overlay.peer_id(), PROTOCOL).await {
                    streams.push(s);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // An honest peer still gets its block.
    let honest = Node::start(NetworkConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        bootstrap: vec![node.addr(true).with(Protocol::P2p(node.overlay.peer_id()))],
        ..NetworkConfig::default()
    })
    .await;
    let block = honest
        .overlay
        .bitswap()
        .want_block(node.overlay.peer_id(), cid, Duration::from_secs(5))
        .await;
    assert!(block.is_ok(), "the node stopped serving: {block:?}");

    // Bounded: still at most 1024 streams, at most 16 per attacker, and the attacker
    // that lost a slot cannot take it back.
    assert!(bitswap.inbound_streams() <= 1024);
    assert!(
        attackers
            .iter()
            .all(|(_, id, _)| bitswap.inbound_streams_of(id) <= 16)
    );
    assert!(node.metric("flotilla_bitswap_streams_evicted_total") >= 1.0);
    let (_, victim, control) = attackers
        .iter_mut()
        .find(|(_, id, _)| bitswap.inbound_streams_of(id) < 16)
        .expect("one attacker lost a slot");
    let refused = node.metric("flotilla_bitswap_streams_refused_total");
    streams.push(
        control
            .open_stream(node.overlay.peer_id(), PROTOCOL)
            .await
            .unwrap(),
    );
    wait_until(
        "the node refuses the victim's new stream",
        Duration::from_secs(5),
        || {
            let now = node.metric("flotilla_bitswap_streams_refused_total");
            async move { now > refused }
        },
    )
    .await;
    assert_eq!(bitswap.inbound_streams_of(victim), 15);
    drop(streams);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_record_flood_from_256_identities_stays_bounded_in_bytes() {
    let max_bytes = 1 << 20;
    let node = Node::start(NetworkConfig {
        listen: listen_both(),
        provider_limits: StoreLimits {
            max_bytes,
            ..StoreLimits::default()
        },
        ..NetworkConfig::default()
    })
    .await;
    let target = node.overlay.peer_id();
    let addr = node.addr(false);
    // Each attacker claims 50 long addresses (close to Kademlia's 16 KiB message limit)
    // and provides 8 keys.
    let keys_each = 4;
    let fake: Vec<Multiaddr> = (0..50)
        .map(|i| {
            format!("/dns4/{}{i}.example/tcp/1", "a".repeat(200))
                .parse()
                .unwrap()
        })
        .collect();
    let (done, mut finished) = mpsc::channel(256);
    let mut tasks = Vec::new();
    let gate = Arc::new(Semaphore::new(32));
    for a in 0..256u32 {
        let permit = gate.clone().acquire_owned().await.unwrap();
        let mut swarm = bare_kad();
        for f in &fake {
            swarm.add_external_address(f.clone());
        }
        swarm.behaviour_mut().add_address(&target, addr.clone());
        swarm.dial(addr.clone()).unwrap();
        let done = done.clone();
        tasks.push(AbortOnDrop(tokio::spawn(async move {
            let mut left = keys_each;
            let mut permit = Some(permit);
            loop {
                let event = swarm.select_next_some().await;
                if let SwarmEvent::ConnectionEstablished { .. } = event {
                    for k in 0..keys_each {
                        let key = kad::RecordKey::new(&format!("attacker {a} key {k}"));
                        swarm.behaviour_mut().start_providing(key).unwrap();
                    }
                }
                if let SwarmEvent::Behaviour(kad::Event::OutboundQueryProgressed {
                    result: kad::QueryResult::StartProviding(r),
                    step,
                    ..
                }) = event
                    && step.last
                {
                    assert!(r.is_ok(), "attacker {a}: {r:?}");
                    left -= 1;
                    if left == 0 {
                        drop(permit.take());
                        let _ = done.send(()).await;
                    }
                }
            }
        })));
    }
    drop(done);
    for _ in 0..256 {
        finished.recv().await.unwrap();
    }
    let total = 256.0 * keys_each as f64;
    // The node has filled its budget and refuses the rest. (Kademlia's ADD_PROVIDER is
    // not acknowledged, so the test waits for the node's own counts.)
    wait_until(
        "the node has stored or refused most records",
        Duration::from_secs(10),
        || async {
            node.metric("flotilla_dht_provider_records")
                + node.metric("flotilla_dht_records_refused_total")
                >= total / 2.0
                && node.metric("flotilla_dht_records_refused_total") >= total / 4.0
        },
    )
    .await;
    let bytes = node.metric("flotilla_dht_provider_bytes");
    let records = node.metric("flotilla_dht_provider_records");
    assert!(bytes <= max_bytes as f64, "{bytes} bytes kept");
    assert!(records > 0.0);
    // 8 addresses kept per record, not 50: about 2 KiB each.
    assert!(
        bytes / records < 2.5 * 1024.0,
        "{} bytes per record",
        bytes / records
    );
    assert!(node.metric("flotilla_dht_records_refused_total") > 0.0);
    drop(tasks);
}

fn bare_kad() -> Swarm<kad::Behaviour<kad::store::MemoryStore>> {
    libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|key| {
            let id = key.public().to_peer_id();
            let mut kad = kad::Behaviour::new(id, kad::store::MemoryStore::new(id));
            // Clients: the node does not add them to its routing table, so each record
            // goes to the node, not to other attackers it would name as closer.
            kad.set_mode(Some(kad::Mode::Client));
            kad
        })
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build()
}
