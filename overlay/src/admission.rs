//! Admission of inbound connections: limits per address, slots kept for our own dials,
//! and eviction of the least useful inbound connection when full.
//!
//! PeerIds are free, so a limit per peer does not stop one host from filling every
//! connection slot with fresh identities, after which the node could not dial out to the
//! volunteers, holders and providers it needs. So:
//!
//! * inbound connections take at most [`AdmissionConfig::max_inbound`] of the slots; the
//!   rest of `max_connections` stays for outbound and bootstrap dials, which are never
//!   refused here;
//! * at most [`AdmissionConfig::max_per_ip`] inbound connections come from one IPv4
//!   address or one IPv6 /64 (loopback is exempt unless
//!   [`AdmissionConfig::exempt_loopback`] is off, so that local tests and demos work);
//! * at most [`AdmissionConfig::max_per_ipv6_site`] come from one global IPv6 /48: a
//!   single rented server is often given a /48, which holds 65,536 /64s, whereas IPv4
//!   addresses are scarce enough that one host has few (unique-local and link-local
//!   prefixes are exempt: a campus mesh on one ULA /48 is one site by design);
//! * when inbound is full, a connection from an address group holding fewer than the
//!   largest group takes the place of that group's youngest connection: the hosts that
//!   hold the most slots lose one first, and among them the connection that has proven
//!   least (the newest).
//!
//! [`Admission`] is the deterministic state machine; [`Behaviour`] puts it in the swarm.
//! It must come before `connection_limits` in the behaviour so that it can evict before
//! the total limit refuses.

use libp2p::PeerId;
use libp2p::core::transport::PortUse;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{
    CloseConnection, ConnectionClosed, ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour,
    THandler, THandlerInEvent, THandlerOutEvent, ToSwarm, dummy,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::task::{Context, Poll, Waker};

/// Limits on inbound connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionConfig {
    /// Most inbound connections; `None`: three quarters of the connection limit, the
    /// rest kept for our own dials.
    pub max_inbound: Option<u32>,
    /// Most inbound connections from one IPv4 address or IPv6 /64 (default 8).
    pub max_per_ip: u32,
    /// Most inbound connections from one global IPv6 /48 (default 32).
    pub max_per_ipv6_site: u32,
    /// Whether loopback addresses escape `max_per_ip` (default true: local tests and
    /// demos run many nodes on 127.0.0.1).
    pub exempt_loopback: bool,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            max_inbound: None,
            max_per_ip: 8,
            max_per_ipv6_site: 32,
            exempt_loopback: true,
        }
    }
}

impl AdmissionConfig {
    /// The inbound limit with `max_connections` in all.
    pub fn inbound_limit(&self, max_connections: u32) -> usize {
        let limit = self
            .max_inbound
            .unwrap_or(max_connections / 4 * 3)
            .min(max_connections);
        limit as usize
    }
}

/// The hosts whose connections are counted together: one IPv4 address, or one IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Group {
    /// An IPv4 address.
    V4([u8; 4]),
    /// The first 64 bits of an IPv6 address.
    V6([u8; 8]),
}

/// The global IPv6 /48 of a remote address, if it has one (not loopback, unique-local
/// or link-local).
pub fn ipv6_site_of(addr: &Multiaddr) -> Option<[u8; 6]> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip6(ip)
            if !(ip.is_loopback() || ip.is_unique_local() || ip.is_unicast_link_local()) =>
        {
            let mut site = [0u8; 6];
            site.copy_from_slice(&ip.octets()[..6]);
            Some(site)
        }
        _ => None,
    })
}

/// The address group of a remote address, and whether it is loopback; `None` for
/// addresses with no IP.
pub fn group_of(addr: &Multiaddr) -> Option<(Group, bool)> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some((Group::V4(ip.octets()), ip.is_loopback())),
        Protocol::Ip6(ip) => {
            let mut prefix = [0u8; 8];
            prefix.copy_from_slice(&ip.octets()[..8]);
            Some((Group::V6(prefix), ip.is_loopback()))
        }
        _ => None,
    })
}

/// Why an inbound connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Its address group holds its limit already.
    #[error("too many inbound connections from this address")]
    PerAddress,
    /// Inbound slots are all taken and no connection is less useful than this one.
    #[error("inbound connection slots are full")]
    Full,
}

/// What to do with an inbound connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Take it.
    Accept,
    /// Take it and close this inbound connection of `peer` to make room.
    AcceptEvicting(PeerId, ConnectionId),
    /// Refuse it.
    Refuse(Refusal),
}

#[derive(Debug)]
struct Entry {
    peer: PeerId,
    group: Option<Group>,
    site: Option<[u8; 6]>,
    seq: u64,
}

/// The inbound connections and their address groups.
#[derive(Debug)]
pub struct Admission {
    config: AdmissionConfig,
    max_inbound: usize,
    inbound: HashMap<ConnectionId, Entry>,
    per_group: HashMap<Group, usize>,
    per_site: HashMap<[u8; 6], usize>,
    next_seq: u64,
}

impl Admission {
    /// No connections yet; `max_connections` in all.
    pub fn new(config: AdmissionConfig, max_connections: u32) -> Admission {
        Admission {
            max_inbound: config.inbound_limit(max_connections),
            config,
            inbound: HashMap::new(),
            per_group: HashMap::new(),
            per_site: HashMap::new(),
            next_seq: 0,
        }
    }

    /// Inbound connections counted now.
    pub fn inbound(&self) -> usize {
        self.inbound.len()
    }

    /// Inbound connections counted now from `addr`'s group.
    pub fn from_group_of(&self, addr: &Multiaddr) -> usize {
        group_of(addr).map_or(0, |(g, _)| self.per_group.get(&g).copied().unwrap_or(0))
    }

    /// Whether the per-address limit refuses a connection from `remote` (checked before
    /// the handshake, to spare its cost, and again once it is done).
    pub fn check_address(&self, remote: &Multiaddr) -> Result<(), Refusal> {
        match group_of(remote) {
            Some((group, loopback)) if !(loopback && self.config.exempt_loopback) => {
                let held = self.per_group.get(&group).copied().unwrap_or(0);
                if held >= self.config.max_per_ip as usize {
                    return Err(Refusal::PerAddress);
                }
            }
            _ => {}
        }
        if let Some(site) = ipv6_site_of(remote) {
            let held = self.per_site.get(&site).copied().unwrap_or(0);
            if held >= self.config.max_per_ipv6_site as usize {
                return Err(Refusal::PerAddress);
            }
        }
        Ok(())
    }

    /// Decides on an inbound connection from `remote` whose handshake is done.
    pub fn decide(&self, remote: &Multiaddr) -> Decision {
        if let Err(refusal) = self.check_address(remote) {
            return Decision::Refuse(refusal);
        }
        if self.inbound.len() < self.max_inbound {
            return Decision::Accept;
        }
        let mine = self.from_group_of(remote);
        let largest = self
            .per_group
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(g, n)| (*g, *n));
        let Some((group, held)) = largest else {
            return Decision::Refuse(Refusal::Full);
        };
        if held <= mine + 1 {
            return Decision::Refuse(Refusal::Full);
        }
        let victim = self
            .inbound
            .iter()
            .filter(|(_, e)| e.group == Some(group))
            .max_by_key(|(_, e)| e.seq)
            .map(|(id, e)| (e.peer, *id));
        match victim {
            Some((peer, id)) => Decision::AcceptEvicting(peer, id),
            None => Decision::Refuse(Refusal::Full),
        }
    }

    /// Counts an inbound connection that was established.
    pub fn established(&mut self, id: ConnectionId, peer: PeerId, remote: &Multiaddr) {
        let group = group_of(remote).map(|(g, _)| g);
        if let Some(g) = group {
            *self.per_group.entry(g).or_default() += 1;
        }
        let site = ipv6_site_of(remote);
        if let Some(site) = site {
            *self.per_site.entry(site).or_default() += 1;
        }
        self.next_seq += 1;
        self.inbound.insert(
            id,
            Entry {
                peer,
                group,
                site,
                seq: self.next_seq,
            },
        );
    }

    /// Stops counting a connection (closed, or being evicted).
    pub fn closed(&mut self, id: ConnectionId) {
        let Some(entry) = self.inbound.remove(&id) else {
            return;
        };
        if let Some(g) = entry.group {
            uncount(&mut self.per_group, &g);
        }
        if let Some(site) = entry.site {
            uncount(&mut self.per_site, &site);
        }
    }
}

/// Takes one off `key`'s count, forgetting it at zero.
fn uncount<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = counts.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            counts.remove(key);
        }
    }
}

/// The swarm behaviour applying [`Admission`] to inbound connections.
pub struct Behaviour {
    admission: Admission,
    evict: VecDeque<(PeerId, ConnectionId)>,
    waker: Option<Waker>,
    metrics: AdmissionMetrics,
}

/// Counts of what admission did, registered as `flotilla_connections_refused` and
/// `flotilla_connections_evicted`.
#[derive(Debug, Clone, Default)]
pub struct AdmissionMetrics {
    /// Inbound connections refused.
    pub refused: Counter,
    /// Inbound connections closed to make room for another.
    pub evicted: Counter,
}

impl AdmissionMetrics {
    /// Creates the counters and registers them under `registry`.
    pub fn new(registry: &mut Registry) -> AdmissionMetrics {
        let m = AdmissionMetrics::default();
        let r = registry.sub_registry_with_prefix("flotilla");
        r.register(
            "connections_refused",
            "Inbound connections refused: too many from their address, or inbound slots full",
            m.refused.clone(),
        );
        r.register(
            "connections_evicted",
            "Inbound connections closed to make room for one from a less crowded address",
            m.evicted.clone(),
        );
        m
    }
}

impl Behaviour {
    /// A behaviour with these limits and `max_connections` in all.
    pub fn new(
        config: AdmissionConfig,
        max_connections: u32,
        metrics: AdmissionMetrics,
    ) -> Behaviour {
        Behaviour {
            admission: Admission::new(config, max_connections),
            evict: VecDeque::new(),
            waker: None,
            metrics,
        }
    }

    /// The state machine, to look at.
    pub fn admission(&self) -> &Admission {
        &self.admission
    }

    fn refuse(&mut self, refusal: Refusal) -> ConnectionDenied {
        self.metrics.refused.inc();
        ConnectionDenied::new(refusal)
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.admission
            .check_address(remote)
            .map_err(|r| self.refuse(r))
    }

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        match self.admission.decide(remote) {
            Decision::Accept => {}
            Decision::AcceptEvicting(peer, id) => {
                self.admission.closed(id);
                self.metrics.evicted.inc();
                tracing::debug!(%peer, "evicting an inbound connection to make room");
                self.evict.push_back((peer, id));
                if let Some(w) = self.waker.take() {
                    w.wake();
                }
            }
            Decision::Refuse(r) => return Err(self.refuse(r)),
        }
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(e) if e.endpoint.is_listener() => {
                self.admission.established(
                    e.connection_id,
                    e.peer_id,
                    e.endpoint.get_remote_address(),
                );
            }
            FromSwarm::ConnectionClosed(ConnectionClosed { connection_id, .. }) => {
                self.admission.closed(connection_id);
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<ToSwarm<Infallible, THandlerInEvent<Self>>> {
        if let Some((peer_id, id)) = self.evict.pop_front() {
            return Poll::Ready(ToSwarm::CloseConnection {
                peer_id,
                connection: CloseConnection::One(id),
            });
        }
        self.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    /// Admits one connection from `remote` as `id`.
    fn admit(a: &mut Admission, id: usize, remote: &str) {
        let remote = addr(remote);
        assert_eq!(a.decide(&remote), Decision::Accept, "{remote}");
        a.established(ConnectionId::new_unchecked(id), PeerId::random(), &remote);
    }

    fn fill(a: &mut Admission, n: usize, from: &str) {
        for _ in 0..n {
            let remote = addr(from);
            assert_eq!(a.decide(&remote), Decision::Accept);
            a.established(
                ConnectionId::new_unchecked(rand::random::<u32>() as usize),
                PeerId::random(),
                &remote,
            );
        }
    }

    #[test]
    fn inbound_takes_three_quarters_of_the_slots_by_default() {
        assert_eq!(AdmissionConfig::default().inbound_limit(256), 192);
        assert_eq!(
            AdmissionConfig {
                max_inbound: Some(300),
                ..AdmissionConfig::default()
            }
            .inbound_limit(256),
            256
        );
    }

    #[test]
    fn one_address_gets_at_most_its_share_and_ipv6_counts_by_64() {
        let mut a = Admission::new(AdmissionConfig::default(), 256);
        fill(&mut a, 8, "/ip4/203.0.113.7/tcp/4001");
        assert_eq!(
            a.decide(&addr("/ip4/203.0.113.7/tcp/5000")),
            Decision::Refuse(Refusal::PerAddress)
        );
        assert_eq!(
            a.decide(&addr("/ip4/203.0.113.8/tcp/4001")),
            Decision::Accept
        );
        for i in 0..8 {
            let remote = addr(&format!("/ip6/2001:db8:0:1::{i:x}/tcp/4001"));
            assert_eq!(a.decide(&remote), Decision::Accept);
            a.established(
                ConnectionId::new_unchecked(1000 + i),
                PeerId::random(),
                &remote,
            );
        }
        assert_eq!(
            a.decide(&addr("/ip6/2001:db8:0:1:ffff::1/tcp/1")),
            Decision::Refuse(Refusal::PerAddress),
            "the same /64"
        );
        assert_eq!(
            a.decide(&addr("/ip6/2001:db8:0:2::1/tcp/1")),
            Decision::Accept
        );
    }

    #[test]
    fn one_global_ipv6_site_gets_at_most_its_share_however_many_64s_it_uses() {
        let mut a = Admission::new(AdmissionConfig::default(), 256);
        // 32 connections from 32 different /64s of one /48.
        for i in 0..32 {
            admit(&mut a, i, &format!("/ip6/2001:db8:7:{i:x}::1/tcp/4001"));
        }
        let another_64 = addr("/ip6/2001:db8:7:ffff::1/tcp/1");
        assert_eq!(a.decide(&another_64), Decision::Refuse(Refusal::PerAddress));
        assert_eq!(
            a.decide(&addr("/ip6/2001:db8:8::1/tcp/1")),
            Decision::Accept,
            "another /48"
        );
        // One closes: the site has room again.
        a.closed(ConnectionId::new_unchecked(0));
        assert_eq!(a.decide(&another_64), Decision::Accept);
        // A campus mesh on one unique-local /48 is not held to the site's share.
        let mut a = Admission::new(AdmissionConfig::default(), 256);
        for i in 0..64 {
            admit(&mut a, i, &format!("/ip6/fd00:1:2:{i:x}::1/tcp/4001"));
        }
    }

    #[test]
    fn loopback_is_exempt_unless_configured() {
        let mut a = Admission::new(AdmissionConfig::default(), 256);
        fill(&mut a, 20, "/ip4/127.0.0.1/tcp/1");
        let strict = AdmissionConfig {
            exempt_loopback: false,
            ..AdmissionConfig::default()
        };
        let mut a = Admission::new(strict, 256);
        fill(&mut a, 8, "/ip4/127.0.0.1/tcp/1");
        assert_eq!(
            a.decide(&addr("/ip4/127.0.0.1/tcp/2")),
            Decision::Refuse(Refusal::PerAddress)
        );
        assert_eq!(a.decide(&addr("/ip6/::1/tcp/2")), Decision::Accept);
    }

    #[test]
    fn when_full_the_largest_group_loses_its_youngest_connection() {
        let mut a = Admission::new(AdmissionConfig::default(), 256);
        fill(&mut a, 192, "/ip4/127.0.0.1/tcp/1");
        assert_eq!(a.inbound(), 192);
        // Another connection from the same crowded address: refused, not swapped.
        assert_eq!(
            a.decide(&addr("/ip4/127.0.0.1/tcp/9")),
            Decision::Refuse(Refusal::Full)
        );
        let youngest = a
            .inbound
            .iter()
            .max_by_key(|(_, e)| e.seq)
            .map(|(id, _)| *id);
        match a.decide(&addr("/ip6/::1/tcp/2")) {
            Decision::AcceptEvicting(_, id) => assert_eq!(Some(id), youngest),
            other => panic!("the newcomer was not let in: {other:?}"),
        }
    }
}
