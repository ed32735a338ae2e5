//! Two Kademlia DHTs side by side: IPFS's for content, Flotilla's own for market keys.
//!
//! Provider records of blocks live in the DHT every IPFS peer speaks
//! (`/ipfs/kad/1.0.0`), so that Helia or kubo peers find Flotilla's content and Flotilla
//! finds theirs. Market keys — the regions offers are held under, the probes of a
//! discovery, the closest peers that keep a job record, the scheduler registry — are
//! looked up in a second Kademlia speaking [`MARKET_PROTOCOL`]. An IPFS peer in the shared
//! DHT knows nothing of offers, so a probe that landed on one would find nothing; in the
//! market DHT it cannot land on one, because:
//!
//! * only peers that announce [`MARKET_PROTOCOL`] in identify are put into the market
//!   DHT's routing table (its bucket inserts are manual, see [`learn`]); a bootstrap peer,
//!   put in before it is identified, is taken out if it does not announce it;
//! * a lookup only returns peers that answered it on [`MARKET_PROTOCOL`], and a peer that
//!   does not speak it cannot answer, whoever named it as a closer peer.

use crate::record_store::SplitStore;
use libp2p::identify;
use libp2p::kad;
use libp2p::{PeerId, StreamProtocol};
use std::time::Duration;

/// Flotilla's own Kademlia protocol, for market keys.
pub const MARKET_PROTOCOL: StreamProtocol = StreamProtocol::new("/flotilla/kad/1.0.0");

/// Most listen addresses of one peer's identify taken into a routing table.
pub const MAX_LEARNED_ADDRESSES: usize = 16;

/// One of the two DHTs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dht {
    /// IPFS's DHT (`/ipfs/kad/1.0.0`): provider records of blocks.
    Content,
    /// Flotilla's DHT ([`MARKET_PROTOCOL`]): every market key.
    Market,
}

impl Dht {
    /// Both, content first.
    pub const ALL: [Dht; 2] = [Dht::Content, Dht::Market];

    /// The Kademlia protocol this DHT speaks.
    pub fn protocol(self) -> StreamProtocol {
        match self {
            Dht::Content => kad::PROTOCOL_NAME,
            Dht::Market => MARKET_PROTOCOL,
        }
    }

    /// Whether a peer announcing `protocols` in identify may enter this DHT's routing
    /// table: it must speak the DHT's protocol (in server mode, as identify only lists
    /// the protocols a peer accepts).
    pub fn admits(self, protocols: &[StreamProtocol]) -> bool {
        protocols.contains(&self.protocol())
    }

    /// This DHT's Kademlia behaviour, in server mode, with `store` and queries bounded
    /// by `query_timeout`.
    pub(crate) fn behaviour(
        self,
        local: PeerId,
        store: SplitStore,
        query_timeout: Duration,
    ) -> kad::Behaviour<SplitStore> {
        let mut config = kad::Config::new(self.protocol());
        config.set_query_timeout(query_timeout);
        if self == Dht::Market {
            // Peers enter only through `learn`, once identify says they speak it.
            config.set_kbucket_inserts(kad::BucketInserts::Manual);
        }
        let mut behaviour = kad::Behaviour::with_config(local, store, config);
        behaviour.set_mode(Some(kad::Mode::Server));
        behaviour
    }
}

/// Puts `peer`'s listen addresses (at most [`MAX_LEARNED_ADDRESSES`]) into the routing
/// table of `dht` if `info` says the peer speaks its protocol, and otherwise takes the
/// peer out of that table (a bootstrap peer is put in both before it is identified);
/// returns whether the peer is admitted.
pub(crate) fn learn(
    dht: Dht,
    behaviour: &mut kad::Behaviour<SplitStore>,
    peer: &PeerId,
    info: &identify::Info,
) -> bool {
    if !dht.admits(&info.protocols) {
        behaviour.remove_peer(peer);
        return false;
    }
    for addr in info.listen_addrs.iter().take(MAX_LEARNED_ADDRESSES) {
        behaviour.add_address(peer, addr.clone());
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_dht_admits_only_peers_speaking_its_protocol() {
        let ipfs = [
            kad::PROTOCOL_NAME,
            StreamProtocol::new("/ipfs/bitswap/1.2.0"),
        ];
        let flotilla = [kad::PROTOCOL_NAME, MARKET_PROTOCOL];
        assert!(Dht::Content.admits(&ipfs));
        assert!(!Dht::Market.admits(&ipfs), "an IPFS peer is kept out");
        assert!(Dht::Content.admits(&flotilla));
        assert!(Dht::Market.admits(&flotilla));
        assert!(!Dht::Market.admits(&[]));
        assert_ne!(Dht::Content.protocol(), Dht::Market.protocol());
    }
}
