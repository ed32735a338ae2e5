//! The discovery simulator: the real offer and scheduler state machines over thousands of
//! virtual peers in one process, with Kademlia closeness computed on the hashed key space
//! and no sockets.
//!
//! A [`Network`] is built once per utilisation: every peer slices the memory it lends into
//! offers ([`Offerer`]), publishes each to the peer closest to a random key in its tier's
//! region ([`Holder`]), then memory is reserved on random offers until the utilisation is
//! reached (holders get the updated offers or withdrawals). For each scheduler fraction,
//! every offerer reports its free offers to the [`SuperTraders`] lists of as many random
//! schedulers as its reports are live at once in a steady state ([`steady_state_reports`]:
//! a node reports to one random scheduler each notify interval, and a list keeps a report
//! for its TTL).
//! Requests then run [`Discovery`] at a random scheduler. The baseline is what Caravela
//! compared to: offers published to random keys anywhere, requests probing random keys
//! anywhere, no regions, no fallback — the same machines ([`Holder`] and [`Discovery`]
//! with [`KeySpace::Whole`] and the fallback off), not a model of them.

use crate::discovery::{Discovery, DiscoveryConfig, Step};
use crate::supertraders::{SuperTraderConfig, SuperTraders};
use flotilla_offers::holder::{Holder, HolderConfig};
use flotilla_offers::ledger::LedgerConfig;
use flotilla_offers::offer::SignedOffer;
use flotilla_offers::offerer::{Action, Event, Offerer, OffererConfig, Slicing};
use flotilla_overlay::regions::{KeySpace, Tier, hash_key};
use libp2p::PeerId;
use libp2p::identity::Keypair;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use std::collections::HashMap;

const MIB: u64 = 1024 * 1024;
/// The virtual clock during a simulation (offers live 60 s; everything happens at once).
const NOW: u64 = 1_000;

/// How much memory volunteers lend, as (MiB, weight): most lend little.
pub const LENT_MEMORY: [(u64, u32); 6] = [
    (256, 30),
    (512, 25),
    (1024, 20),
    (2048, 12),
    (4096, 8),
    (10240, 5),
];
/// How much memory requests ask for, as (MiB, weight).
pub const REQUESTED_MEMORY: [(u64, u32); 6] = [
    (128, 35),
    (256, 25),
    (512, 18),
    (1024, 12),
    (2048, 7),
    (4096, 3),
];

fn weighted(table: &[(u64, u32)], rng: &mut StdRng) -> u64 {
    let total: u32 = table.iter().map(|(_, w)| w).sum();
    let mut pick = rng.random_range(0..total);
    for &(value, weight) in table {
        if pick < weight {
            return value;
        }
        pick -= weight;
    }
    table[table.len() - 1].0
}

/// One virtual peer.
struct Peer {
    id: PeerId,
    hashed: [u8; 32],
    offerer: Offerer,
    holder: Holder,
    /// Baseline: offers held under keys anywhere ([`KeySpace::Whole`]).
    baseline: Holder,
}

/// A simulated network at one utilisation.
pub struct Network {
    peers: Vec<Peer>,
    index: HashMap<PeerId, usize>,
    /// Peer indices sorted by hashed id, for XOR-closest lookups.
    by_hash: Vec<usize>,
    /// Latest version of every offer, by (offerer index, offer id); withdrawn ones removed.
    live: HashMap<(usize, u64), SignedOffer>,
    /// Memory lent and reserved, in MiB.
    pub lent_mib: u64,
    /// Memory reserved, in MiB.
    pub reserved_mib: u64,
}

/// The outcome of a batch of requests.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Outcome {
    /// Requests made.
    pub requests: u32,
    /// Requests that found a fitting offer.
    pub successes: u32,
    /// Region probes, over all requests.
    pub probes: u32,
    /// Requests that used the fallback list.
    pub fallbacks: u32,
    /// Messages, over all requests (a lookup counts `lookup_messages`, a holder asked 2,
    /// the fallback 0 since the list is local).
    pub messages: u64,
}

impl Outcome {
    /// Share of requests that succeeded.
    pub fn success_rate(&self) -> f64 {
        f64::from(self.successes) / f64::from(self.requests.max(1))
    }

    /// Mean probes per request.
    pub fn probes_per_request(&self) -> f64 {
        f64::from(self.probes) / f64::from(self.requests.max(1))
    }

    /// Share of requests that used the fallback.
    pub fn fallback_share(&self) -> f64 {
        f64::from(self.fallbacks) / f64::from(self.requests.max(1))
    }

    /// Mean messages per successful placement.
    pub fn messages_per_placement(&self) -> f64 {
        self.messages as f64 / f64::from(self.successes.max(1))
    }
}

/// Messages a Kademlia lookup costs, roughly: log2(N) hops of α = 3 parallel requests and
/// their answers.
pub fn lookup_messages(peers: usize) -> u64 {
    let hops = (peers.max(2) as f64).log2().ceil() as u64;
    2 * 3 * hops.max(1)
}

impl Network {
    /// Builds `peers` peers lending memory drawn from [`LENT_MEMORY`], publishes their
    /// offers (region-keyed and baseline), and reserves memory until `utilisation`.
    pub fn build(peers: usize, utilisation: f64, slicing: Slicing, seed: u64) -> Network {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut list = Vec::with_capacity(peers);
        let mut lent_mib = 0;
        for i in 0..peers {
            let keypair =
                Keypair::ed25519_from_bytes(rand_bytes(&mut rng)).expect("32 bytes make a key");
            let id = keypair.public().to_peer_id();
            let memory = weighted(&LENT_MEMORY, &mut rng);
            lent_mib += memory;
            let offerer = Offerer::new(
                keypair,
                OffererConfig {
                    slicing,
                    // A snapshot of the steady state: holders have heard of every
                    // reservation (each is polled for at once below).
                    holder_update_delay_ms: 0,
                    // Admission caps are not what is studied.
                    ledger: LedgerConfig {
                        max_reservations: usize::MAX,
                        max_per_owner: usize::MAX,
                        ..LedgerConfig::default()
                    },
                    ..OffererConfig::new(memory, Vec::new())
                },
                (i as u64) << 16,
            );
            let holder_config = HolderConfig {
                max_total: 1 << 20,
                max_per_offerer: 1 << 10,
                ..HolderConfig::default()
            };
            list.push(Peer {
                hashed: hash_key(&id.to_bytes()),
                id,
                offerer,
                holder: Holder::new(holder_config.clone()),
                baseline: Holder::new(HolderConfig {
                    key_space: KeySpace::Whole,
                    ..holder_config
                }),
            });
        }
        let index = list.iter().enumerate().map(|(i, p)| (p.id, i)).collect();
        let mut by_hash: Vec<usize> = (0..list.len()).collect();
        by_hash.sort_by_key(|&i| list[i].hashed);
        let mut network = Network {
            peers: list,
            index,
            by_hash,
            live: HashMap::new(),
            lent_mib,
            reserved_mib: 0,
        };
        for i in 0..network.peers.len() {
            let actions = network.peers[i]
                .offerer
                .poll(0, &mut rng)
                .expect("offers sign");
            network.run_actions(i, actions);
        }
        network.reserve_until(utilisation, &mut rng);
        network.publish_baseline(&mut rng);
        network
    }

    /// Carries out an offerer's actions: lookups answered at once, offers delivered.
    fn run_actions(&mut self, from: usize, mut actions: Vec<Action>) {
        while let Some(action) = actions.pop() {
            let more = match action {
                Action::FindHolder { offer_id, key } => {
                    let holder = self.peers[self.closest(&hash_key(&key))].id;
                    self.peers[from]
                        .offerer
                        .on_event(NOW, Event::HolderFound { offer_id, holder })
                }
                Action::Send {
                    offer_id,
                    holder,
                    key,
                    offer,
                } => {
                    let h = self.index[&holder];
                    let accepted = self.peers[h]
                        .holder
                        .receive(NOW, &key, (*offer).clone())
                        .is_ok();
                    if offer.body.withdrawn {
                        self.live.remove(&(from, offer_id));
                    } else {
                        self.live.insert((from, offer_id), *offer);
                    }
                    let event = if accepted {
                        Event::Delivered { offer_id, holder }
                    } else {
                        Event::DeliveryFailed { offer_id, holder }
                    };
                    self.peers[from].offerer.on_event(NOW, event)
                }
            };
            actions.extend(more.expect("offers sign"));
        }
    }

    /// Baseline: every live offer, as it stands once memory is reserved, also goes to the
    /// peer closest to a random key anywhere.
    fn publish_baseline(&mut self, rng: &mut StdRng) {
        let mut ids: Vec<(usize, u64)> = self.live.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let offer = self.live[&id].clone();
            let key = rand_bytes(rng);
            let h = self.closest(&hash_key(&key));
            // Holders accept every live, signed offer under any key here.
            let _ = self.peers[h].baseline.receive(NOW, &key, offer);
        }
    }

    /// Reserves memory on random offers until `utilisation` of all lent memory is taken.
    fn reserve_until(&mut self, utilisation: f64, rng: &mut StdRng) {
        let target = (self.lent_mib as f64 * utilisation) as u64;
        let mut keys: Vec<(usize, u64)> = self.live.keys().copied().collect();
        keys.sort_unstable();
        let mut reservation_id = 0;
        // The schedulers' reservations are not what is studied: one owner makes them all.
        let owner = PeerId::from_bytes(&self.peers[0].id.to_bytes()).expect("a peer id");
        while self.reserved_mib < target && !keys.is_empty() {
            let k = rng.random_range(0..keys.len());
            let (peer, offer_id) = keys[k];
            let Some(free) = self.live.get(&(peer, offer_id)).map(|o| o.body.free_mib()) else {
                keys.swap_remove(k);
                continue;
            };
            let want = (weighted(&REQUESTED_MEMORY, rng) as u32).min(free);
            reservation_id += 1;
            let offerer = &mut self.peers[peer].offerer;
            if offerer
                .reserve(NOW, owner, offer_id, want, reservation_id, 60_000)
                .is_err()
            {
                keys.swap_remove(k);
                continue;
            }
            let actions = offerer.poll(NOW, rng).expect("offers sign");
            self.reserved_mib += u64::from(want);
            self.run_actions(peer, actions);
            if free == want {
                keys.swap_remove(k);
            }
        }
    }

    /// The peer whose hashed id is XOR-closest to `hashed`: a walk down the binary trie
    /// that the sorted ids form, preferring at each bit the side that matches the key
    /// (which is what XOR distance rewards), falling to the other side when it is empty.
    fn closest(&self, hashed: &[u8; 32]) -> usize {
        let bit = |id: &[u8; 32], i: usize| (id[i / 8] >> (7 - i % 8)) & 1;
        let (mut lo, mut hi) = (0, self.by_hash.len());
        for i in 0..256 {
            if hi - lo <= 1 {
                break;
            }
            let ones =
                lo + self.by_hash[lo..hi].partition_point(|&p| bit(&self.peers[p].hashed, i) == 0);
            let (zeros_side, ones_side) = ((lo, ones), (ones, hi));
            let (same, other) = if bit(hashed, i) == 0 {
                (zeros_side, ones_side)
            } else {
                (ones_side, zeros_side)
            };
            (lo, hi) = if same.0 < same.1 { same } else { other };
        }
        self.by_hash[lo]
    }

    /// Schedulers for `fraction` of the peers, each with the super-trader list fed by the
    /// offerers that picked it: each offerer picks `reports` different schedulers at
    /// random (all of them if there are fewer).
    pub fn schedulers(&self, fraction: f64, reports: usize, seed: u64) -> Vec<SuperTraders> {
        let mut rng = StdRng::seed_from_u64(seed);
        let count = ((self.peers.len() as f64 * fraction).round() as usize).max(1);
        let mut lists: Vec<SuperTraders> = (0..count)
            .map(|_| {
                SuperTraders::new(SuperTraderConfig {
                    max_offers: 1 << 20,
                    ..SuperTraderConfig::trusting()
                })
            })
            .collect();
        let mut by_offerer: HashMap<usize, Vec<SignedOffer>> = HashMap::new();
        let mut ids: Vec<&(usize, u64)> = self.live.keys().collect();
        ids.sort_unstable();
        for id in ids {
            by_offerer
                .entry(id.0)
                .or_default()
                .push(self.live[id].clone());
        }
        let mut offerers: Vec<usize> = by_offerer.keys().copied().collect();
        offerers.sort_unstable();
        for offerer in offerers {
            let free: Vec<SignedOffer> = by_offerer
                .remove(&offerer)
                .unwrap_or_default()
                .into_iter()
                .filter(|o| o.body.free_mib() > 0)
                .collect();
            let count = lists.len();
            for to in rand::seq::index::sample(&mut rng, count, reports.min(count)) {
                lists[to].notify(NOW, free.clone());
            }
        }
        lists
    }

    /// Runs `requests` discoveries with region probing and the fallback, as `config`
    /// says, each at a random scheduler of `schedulers`.
    pub fn run_requests(
        &self,
        schedulers: &[SuperTraders],
        requests: u32,
        config: DiscoveryConfig,
        seed: u64,
    ) -> Outcome {
        self.run(Some(schedulers), requests, config, seed)
    }

    /// Runs `requests` discoveries the baseline way: random keys anywhere, no fallback.
    pub fn run_baseline(&self, requests: u32, max_tries: u32, seed: u64) -> Outcome {
        let config = DiscoveryConfig {
            max_tries,
            key_space: KeySpace::Whole,
            fallback: false,
            ..DiscoveryConfig::default()
        };
        self.run(None, requests, config, seed)
    }

    /// Runs `requests` discoveries through the [`Discovery`] machine: against the region
    /// holders and `schedulers`' lists, or, without schedulers, against the baseline
    /// holders.
    fn run(
        &self,
        schedulers: Option<&[SuperTraders]>,
        requests: u32,
        config: DiscoveryConfig,
        seed: u64,
    ) -> Outcome {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut outcome = Outcome::default();
        let lookup = lookup_messages(self.peers.len());
        for _ in 0..requests {
            let mib = request_mib(&mut rng);
            let scheduler = schedulers.map(|list| &list[rng.random_range(0..list.len())]);
            let (mut discovery, mut step) =
                Discovery::start(NOW, mib * MIB, config, &mut rng).expect("requests fit a tier");
            loop {
                step = match step {
                    Step::FindClosest { key } => {
                        outcome.messages += lookup;
                        let holder = self.peers[self.closest(&hash_key(&key))].id;
                        discovery.on_closest(NOW, Some(holder), &mut rng)
                    }
                    Step::AskHolder { holder, tier } => {
                        outcome.messages += 2;
                        outcome.probes += 1;
                        let peer = &self.peers[self.index[&holder]];
                        let held = match scheduler {
                            Some(_) => &peer.holder,
                            None => &peer.baseline,
                        };
                        let answer = held
                            .answer(NOW, tier, discovery.request_mib())
                            .into_iter()
                            .cloned()
                            .collect();
                        discovery.on_offers(NOW, answer, &mut rng)
                    }
                    Step::Fallback => {
                        outcome.fallbacks += 1;
                        let fitting = scheduler.map_or(Vec::new(), |list| {
                            list.fitting(NOW, discovery.request_mib(), &[], &mut rng)
                        });
                        discovery.on_fallback(NOW, fitting)
                    }
                    Step::Done => break,
                };
            }
            outcome.requests += 1;
            let (found, _) = discovery.outcome().expect("done");
            outcome.successes += u32::from(!found.is_empty());
        }
        outcome
    }

    /// Number of peers.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether there are no peers.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Offers live now.
    pub fn live_offers(&self) -> usize {
        self.live.len()
    }
}

/// How many schedulers' lists hold an offerer's report at once with the node's defaults:
/// it reports to one random scheduler every notify interval, and each list keeps a report
/// for its TTL (30 s / 10 s = 3).
pub fn steady_state_reports() -> usize {
    let ttl = SuperTraderConfig::default().ttl_ms;
    let interval = OffererConfig::new(0, Vec::new()).notify_interval_ms;
    ttl.div_ceil(interval).max(1) as usize
}

fn request_mib(rng: &mut StdRng) -> u64 {
    // A size within the drawn tier, above the tier below it.
    let tier = weighted(&REQUESTED_MEMORY, rng);
    let below = Tier::all()
        .take_while(|t| u64::from(t.mib()) < tier)
        .last()
        .map_or(1, |t| u64::from(t.mib()) + 1);
    rng.random_range(below..=tier)
}

fn rand_bytes(rng: &mut StdRng) -> [u8; 32] {
    let mut bytes = [0u8; 32];
    rng.fill_bytes(&mut bytes);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max_tries: u32) -> DiscoveryConfig {
        DiscoveryConfig {
            max_tries,
            ..DiscoveryConfig::default()
        }
    }

    #[test]
    fn the_trie_walk_finds_the_xor_closest_peer() {
        let network = Network::build(200, 0.0, Slicing::Largest, 11);
        let mut rng = StdRng::seed_from_u64(12);
        for _ in 0..500 {
            let key = hash_key(&rand_bytes(&mut rng));
            let xor = |p: &Peer| -> [u8; 32] { std::array::from_fn(|i| p.hashed[i] ^ key[i]) };
            let brute = (0..network.peers.len())
                .min_by_key(|&i| xor(&network.peers[i]))
                .unwrap();
            assert_eq!(network.closest(&key), brute);
        }
    }

    #[test]
    fn a_lightly_used_network_serves_every_request_and_a_full_one_none() {
        let network = Network::build(300, 0.3, Slicing::Largest, 1);
        assert!(
            network.live_offers() >= 150,
            "{} offers live",
            network.live_offers()
        );
        let used = network.reserved_mib as f64 / network.lent_mib as f64;
        assert!((0.29..0.35).contains(&used), "utilisation {used}");
        let schedulers = network.schedulers(0.05, 1, 2);
        let outcome = network.run_requests(&schedulers, 200, config(3), 3);
        assert_eq!(outcome.requests, 200);
        assert_eq!(outcome.successes, 200, "{outcome:?}");
        assert!(outcome.probes_per_request() <= 3.0);

        let full = Network::build(100, 1.0, Slicing::Largest, 4);
        let schedulers = full.schedulers(0.05, 1, 5);
        let outcome = full.run_requests(&schedulers, 50, config(3), 6);
        assert!(outcome.success_rate() < 0.5, "{outcome:?}");
        assert!(
            outcome.fallbacks >= outcome.requests - outcome.successes,
            "every failure tried the fallback"
        );
    }

    #[test]
    fn each_offerer_reports_to_as_many_schedulers_as_asked() {
        let network = Network::build(200, 0.3, Slicing::Largest, 21);
        for reports in [1, 3] {
            let lists = network.schedulers(0.05, reports, 22);
            let mut lists_of = HashMap::<PeerId, usize>::new();
            for list in &lists {
                let offerers: std::collections::HashSet<PeerId> = list
                    .fitting(NOW, 1, &[], &mut rand::rng())
                    .iter()
                    .map(|o| o.body.offerer)
                    .collect();
                for offerer in offerers {
                    *lists_of.entry(offerer).or_default() += 1;
                }
            }
            assert!(lists_of.len() > 50, "{} offerers reported", lists_of.len());
            assert!(
                lists_of.values().all(|&n| n == reports),
                "each offerer is on {reports} lists"
            );
        }
        assert_eq!(steady_state_reports(), 3);
    }

    #[test]
    fn the_same_seed_gives_the_same_figures() {
        let run = || {
            let network = Network::build(120, 0.5, Slicing::Halving, 7);
            let schedulers = network.schedulers(0.1, 3, 8);
            (
                network.run_requests(&schedulers, 100, config(2), 9),
                network.run_baseline(100, 2, 9),
            )
        };
        assert_eq!(run(), run());
    }
}
