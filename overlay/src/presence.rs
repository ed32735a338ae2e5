//! Which peers are connected now, from where, and a signal for each that fires when it
//! leaves: what lets work done for a peer stop once nobody waits for it (a discovery for a
//! client that hung up), and what lets bounds be kept per address prefix rather than per
//! PeerId, which costs nothing to make.
//!
//! It also keeps which connected peers announce, in identify, that they schedule calls
//! ([`SCHEDULER_PROTOCOL`]): clients learn schedulers from the peers they are connected
//! to, not only from the DHT's registry, which strangers can fill.
//!
//! The swarm's task ([`crate::network`]) is the only writer: it reports each connection
//! opened and closed, and what identify told of each peer. Any task may read.

use libp2p::multiaddr::{Multiaddr, Protocol};
use libp2p::{PeerId, StreamProtocol};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

/// The protocol a scheduler supports (it accepts streams on it and closes them), so that
/// identify announces it to every peer it connects to.
pub const SCHEDULER_PROTOCOL: StreamProtocol = StreamProtocol::new("/flotilla/scheduler/1.0.0");

/// One connected peer.
struct Present {
    connections: usize,
    /// The remote IP of its first connection (the one its requests are charged to).
    ip: Option<IpAddr>,
    /// Cancelled when its last connection closes.
    left: CancellationToken,
    /// Whether identify told what it supports yet.
    identified: bool,
    /// Whether identify said it supports [`SCHEDULER_PROTOCOL`].
    schedules: bool,
    /// Whether we dialled it (a peer we chose: bootstrap, mDNS, a lookup's answer),
    /// rather than it us.
    dialled: bool,
}

/// The peers connected now. Cheap to clone; clones share the table.
#[derive(Clone, Default)]
pub struct Presence {
    peers: Arc<Mutex<HashMap<PeerId, Present>>>,
}

impl Presence {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, Present>> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection to `peer` opened, from or to `remote`; `dialled` if we opened it.
    pub(crate) fn connected(&self, peer: PeerId, remote: &Multiaddr, dialled: bool) {
        let mut table = self.table();
        let present = table.entry(peer).or_insert_with(|| Present {
            connections: 0,
            ip: None,
            left: CancellationToken::new(),
            identified: false,
            schedules: false,
            dialled: false,
        });
        present.dialled |= dialled;
        present.connections += 1;
        if present.ip.is_none() {
            present.ip = ip_of(remote);
        }
    }

    /// A connection to `peer` closed; `remaining` are still open.
    pub(crate) fn disconnected(&self, peer: &PeerId, remaining: usize) {
        let mut table = self.table();
        if remaining == 0 {
            if let Some(present) = table.remove(peer) {
                present.left.cancel();
            }
        } else if let Some(present) = table.get_mut(peer) {
            present.connections = remaining;
        }
    }

    /// Identify told what `peer` supports.
    pub(crate) fn identified(&self, peer: &PeerId, protocols: &[StreamProtocol]) {
        if let Some(present) = self.table().get_mut(peer) {
            present.identified = true;
            present.schedules = protocols.contains(&SCHEDULER_PROTOCOL);
        }
    }

    /// Whether `peer` is connected and identify told what it supports.
    pub fn is_identified(&self, peer: &PeerId) -> bool {
        self.table().get(peer).is_some_and(|p| p.identified)
    }

    /// The connected peers that announce they schedule calls, among those we dialled:
    /// any stranger can dial us and announce anything, so a peer that reached us on its
    /// own is not taken at its word.
    pub fn announced_schedulers(&self) -> Vec<PeerId> {
        self.table()
            .iter()
            .filter(|(_, p)| p.schedules && p.dialled)
            .map(|(peer, _)| *peer)
            .collect()
    }

    /// Every peer left (the swarm stopped).
    pub(crate) fn clear(&self) {
        for (_, present) in self.table().drain() {
            present.left.cancel();
        }
    }

    /// A token cancelled when `peer` has no connection left: already cancelled if it has
    /// none now.
    pub fn until_left(&self, peer: &PeerId) -> CancellationToken {
        match self.table().get(peer) {
            Some(present) => present.left.clone(),
            None => {
                let gone = CancellationToken::new();
                gone.cancel();
                gone
            }
        }
    }

    /// The remote IP `peer` is connected from (or was dialled at), if it is connected
    /// over IP.
    pub fn ip(&self, peer: &PeerId) -> Option<IpAddr> {
        self.table().get(peer).and_then(|p| p.ip)
    }

    /// Whether `peer` is connected.
    pub fn is_connected(&self, peer: &PeerId) -> bool {
        self.table().contains_key(peer)
    }
}

/// The IP address at the start of `addr`, if any.
pub fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

/// The address prefix a bound per network is kept by: the /24 of an IPv4 address, the /48
/// of an IPv6 one (what one site is usually given), so that one machine or site cannot
/// pass for many peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Prefix {
    /// The first three bytes of an IPv4 address.
    V4([u8; 3]),
    /// The first six bytes of an IPv6 address.
    V6([u8; 6]),
}

impl Prefix {
    /// The prefix `ip` belongs to (an IPv4-mapped IPv6 address as its IPv4 one).
    pub fn of(ip: IpAddr) -> Prefix {
        match ip {
            IpAddr::V4(v4) => {
                let o = v4.octets();
                Prefix::V4([o[0], o[1], o[2]])
            }
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Prefix::of(IpAddr::V4(v4)),
                None => {
                    let o = v6.octets();
                    Prefix::V6([o[0], o[1], o[2], o[3], o[4], o[5]])
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_leaves_when_its_last_connection_closes() {
        let presence = Presence::default();
        let peer = PeerId::random();
        assert!(presence.until_left(&peer).is_cancelled(), "not connected");
        let addr: Multiaddr = "/ip4/10.1.2.3/tcp/4001".parse().unwrap();
        presence.connected(peer, &addr, false);
        presence.connected(peer, &"/ip4/10.9.9.9/tcp/1".parse().unwrap(), true);
        let left = presence.until_left(&peer);
        assert_eq!(presence.ip(&peer), Some("10.1.2.3".parse().unwrap()));
        presence.disconnected(&peer, 1);
        assert!(!left.is_cancelled());
        presence.disconnected(&peer, 0);
        assert!(left.is_cancelled());
        assert_eq!(presence.ip(&peer), None);
        assert!(!presence.is_connected(&peer));
    }

    #[test]
    fn only_schedulers_we_dialled_are_taken_at_their_word() {
        let presence = Presence::default();
        let addr: Multiaddr = "/ip4/10.1.2.3/tcp/4001".parse().unwrap();
        let (chosen, stranger, plain) = (PeerId::random(), PeerId::random(), PeerId::random());
        presence.connected(chosen, &addr, true);
        presence.connected(stranger, &addr, false);
        presence.connected(plain, &addr, true);
        let announcing = [SCHEDULER_PROTOCOL];
        presence.identified(&chosen, &announcing);
        presence.identified(&stranger, &announcing);
        presence.identified(&plain, &[]);
        assert_eq!(presence.announced_schedulers(), vec![chosen]);
        assert!(presence.is_identified(&plain));
    }

    #[test]
    fn prefixes_group_a_site() {
        let a = Prefix::of("192.0.2.1".parse().unwrap());
        assert_eq!(a, Prefix::of("192.0.2.250".parse().unwrap()));
        assert_ne!(a, Prefix::of("192.0.3.1".parse().unwrap()));
        assert_eq!(a, Prefix::of("::ffff:192.0.2.9".parse().unwrap()));
        let b = Prefix::of("2001:db8:1::1".parse().unwrap());
        assert_eq!(b, Prefix::of("2001:db8:1:ffff::2".parse().unwrap()));
        assert_ne!(b, Prefix::of("2001:db8:2::1".parse().unwrap()));
    }
}
