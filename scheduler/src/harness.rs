//! A multi-node harness in virtual time: the real market machines of N nodes — every
//! node's [`Holder`], the volunteers' [`Offerer`] with its reservation ledger, the
//! schedulers' [`SuperTraders`] list and a [`Placer`] per call — wired through a simulated
//! network that delays, drops, duplicates, cuts and isolates, deterministic from a seed.
//!
//! It is to the market what raft-rs's `harness` is to Raft: no sockets, no tokio, no
//! clock. Time is a number the harness advances from event to event, so a minute of a
//! thousand-node network runs in a second or two. Kademlia is reduced to its answer — a
//! lookup reaches the live peer XOR-closest to the key among those the asker can reach,
//! after [`NetConfig::lookup_ms`] — the rest are the messages the node sends: `Offer`
//! to holders, `Notify` to schedulers, `FindOffers`, `Reserve` and `Execute` (reserve and
//! run in one message) to offerers, and their answers.
//!
//! Every step checks the invariants ([`Violation`]): an offer is never oversubscribed, a
//! running reservation ends only with its own call, offer versions only grow at holders
//! and offerers, a placement's own work ends within its budget, a call runs at most once
//! per volunteer and invocation, and a held reservation lapses once its owner has gone.

use crate::discovery::{self, DiscoveryConfig};
use crate::placer::{Outcome, Placer, PlacerConfig, Step};
use crate::supertraders::{SuperTraderConfig, SuperTraders};
use flotilla_offers::holder::{Holder, HolderConfig};
use flotilla_offers::ledger::{ReservationState, RunKey};
use flotilla_offers::offer::SignedOffer;
use flotilla_offers::offerer::{Action, Event as OffererEvent, Offerer, OffererConfig};
use flotilla_overlay::regions::{KeySpace, Tier, hash_key};
use libp2p::PeerId;
use libp2p::identity::Keypair;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};

const MIB: u64 = 1024 * 1024;

/// How the simulated network behaves.
#[derive(Debug, Clone, Copy)]
pub struct NetConfig {
    /// Shortest one-way delay of a message, in ms.
    pub min_delay_ms: u64,
    /// Longest one-way delay, in ms.
    pub max_delay_ms: u64,
    /// Share of messages lost.
    pub drop_rate: f64,
    /// Share of messages delivered twice (the second copy later).
    pub duplicate_rate: f64,
    /// Time a Kademlia lookup takes, in ms.
    pub lookup_ms: u64,
    /// Time a request waits for its answer, in ms.
    pub answer_timeout_ms: u64,
    /// Time after a peer vanishes until the peers connected to it notice, in ms.
    pub detect_gone_ms: u64,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            min_delay_ms: 1,
            max_delay_ms: 20,
            drop_rate: 0.0,
            duplicate_rate: 0.0,
            lookup_ms: 30,
            answer_timeout_ms: 1_000,
            detect_gone_ms: 3_000,
        }
    }
}

/// A network to build.
#[derive(Debug, Clone)]
pub struct HarnessConfig {
    /// Nodes in all.
    pub nodes: usize,
    /// How many of them are schedulers (the first ones); the others lend memory.
    pub schedulers: usize,
    /// Memory each volunteer lends, in MiB, drawn from these.
    pub lent_mib: Vec<u64>,
    /// The network's behaviour.
    pub net: NetConfig,
    /// How schedulers place calls.
    pub placer: PlacerConfig,
    /// How long a reservation made by `Reserve` alone (a client's `discover --reserve`)
    /// is held, in ms.
    pub hold_ms: u64,
    /// The seed: the same seed, the same run.
    pub seed: u64,
}

impl HarnessConfig {
    /// The baseline Caravela compared to, on the same machines: offers published to
    /// random keys anywhere, probes of random keys anywhere, no fallback list (nor the
    /// offers it saw free a moment ago).
    pub fn baseline(self) -> HarnessConfig {
        let mut config = self;
        config.placer.discovery.key_space = KeySpace::Whole;
        config.placer.discovery.fallback = false;
        config
    }

    /// Whether this is the [`HarnessConfig::baseline`].
    pub fn is_baseline(&self) -> bool {
        !self.placer.discovery.fallback
    }
}

impl HarnessConfig {
    /// `nodes` nodes, `schedulers` of them schedulers, volunteers lending 512 MiB to
    /// 2 GiB, default timings.
    pub fn new(nodes: usize, schedulers: usize, seed: u64) -> HarnessConfig {
        HarnessConfig {
            nodes,
            schedulers: schedulers.clamp(1, nodes),
            lent_mib: vec![512, 1024, 2048],
            net: NetConfig::default(),
            placer: PlacerConfig {
                discovery: DiscoveryConfig {
                    budget_ms: 5_000,
                    ..DiscoveryConfig::default()
                },
                budget_ms: 8_000,
                ..PlacerConfig::default()
            },
            hold_ms: 5_000,
            seed,
        }
    }
}

/// An invariant broken, with when and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Virtual time, in ms.
    pub at_ms: u64,
    /// What was broken.
    pub what: String,
}

/// What the runs of the harness came to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Calls asked for.
    pub calls: u32,
    /// Calls that ran.
    pub placed: u32,
    /// Calls that could not be placed.
    pub failed: u32,
    /// Messages sent (lookups count one each).
    pub messages: u64,
    /// Messages the network lost.
    pub dropped: u64,
    /// Runs started on volunteers.
    pub runs: u32,
    /// Region probes made (Kademlia lookups of a random key in a region).
    pub probes: u64,
    /// Discoveries that went to the fallback list.
    pub fallbacks: u32,
}

/// One message between nodes.
#[derive(Debug, Clone)]
enum Message {
    Offer {
        key: Vec<u8>,
        offer: Box<SignedOffer>,
        offer_id: u64,
    },
    OfferTaken {
        offer_id: u64,
        accepted: bool,
    },
    Notify(Vec<SignedOffer>),
    FindOffers {
        call: u64,
        waiting: u64,
        tier: Tier,
        mib: u32,
    },
    Offers {
        call: u64,
        waiting: u64,
        offers: Vec<SignedOffer>,
    },
    /// Reserve only (a client's `discover --reserve`): held, never run.
    Reserve {
        offer_id: u64,
        mib: u32,
        reservation_id: u64,
    },
    Execute {
        call: u64,
        waiting: u64,
        offer_id: u64,
        reservation_id: u64,
        mib: u32,
        run_ms: u64,
    },
    Executed {
        call: u64,
        waiting: u64,
        /// `Err((reason, retryable))`: refused (not reserved) when `retryable` is `None`.
        outcome: Result<Option<Box<SignedOffer>>, (String, Option<bool>)>,
    },
}

#[derive(Debug, Clone)]
enum Event {
    Deliver {
        from: usize,
        to: usize,
        message: Message,
    },
    OffererDue(usize),
    LookupDone {
        node: usize,
        purpose: Lookup,
        key: Vec<u8>,
    },
    AnswerTimeout {
        call: u64,
        waiting: u64,
    },
    RunDone {
        node: usize,
        from: usize,
        call: u64,
        waiting: u64,
        reservation_id: u64,
    },
    PeerGoneNoticed {
        gone: usize,
    },
}

#[derive(Debug, Clone, Copy)]
enum Lookup {
    Holder { offer_id: u64 },
    Probe { call: u64, waiting: u64 },
}

struct Node {
    id: PeerId,
    hashed: [u8; 32],
    alive: bool,
    isolated: bool,
    holder: Holder,
    offerer: Option<Offerer>,
    schedule: Option<SuperTraders>,
    /// When its offerer was last asked to be polled (so one timer is queued at a time).
    offerer_due: Option<u64>,
    /// Highest offer version seen held here, per offer.
    held_seq: HashMap<(PeerId, u64), u64>,
}

/// One call being placed.
struct Call {
    scheduler: usize,
    placer: Placer,
    invocation_id: u64,
    run_ms: u64,
    started_ms: u64,
    /// Time spent in runs (does not count against the budget).
    run_time_ms: u64,
    run_started_ms: Option<u64>,
    /// What the placer waits for: an answer or lookup with this number.
    waiting: u64,
}

/// A virtual network of market nodes.
pub struct Harness {
    config: HarnessConfig,
    rng: StdRng,
    now_ms: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: HashMap<u64, Event>,
    nodes: Vec<Node>,
    index: HashMap<PeerId, usize>,
    cut: HashSet<(usize, usize)>,
    calls: BTreeMap<u64, Call>,
    next_call: u64,
    next_wait: u64,
    /// Runs started, per (volunteer, invocation id).
    runs: HashMap<(usize, u64), u32>,
    /// When each dead node died.
    died_at: HashMap<PeerId, u64>,
    /// Running reservations and the call each belongs to, per volunteer.
    running: HashMap<(usize, u64), u64>,
    violations: Vec<Violation>,
    stats: Stats,
}

impl Harness {
    /// Builds the network; nothing has happened yet (offers publish once it runs).
    pub fn new(config: HarnessConfig) -> Harness {
        let mut rng = StdRng::seed_from_u64(config.seed);
        let mut nodes = Vec::with_capacity(config.nodes);
        for i in 0..config.nodes {
            let mut secret = [0u8; 32];
            rng.fill_bytes(&mut secret);
            let keypair = Keypair::ed25519_from_bytes(secret).expect("32 bytes make a key");
            let id = keypair.public().to_peer_id();
            let scheduler = i < config.schedulers;
            let offerer = (!scheduler).then(|| {
                let lent = config.lent_mib[rng.random_range(0..config.lent_mib.len())];
                Offerer::new(
                    keypair.clone(),
                    OffererConfig {
                        answer_timeout_ms: config.net.answer_timeout_ms,
                        key_space: config.placer.discovery.key_space,
                        ..OffererConfig::new(lent, Vec::new())
                    },
                    rng.next_u64() >> 1,
                )
            });
            nodes.push(Node {
                hashed: hash_key(&id.to_bytes()),
                id,
                alive: true,
                isolated: false,
                holder: Holder::new(HolderConfig {
                    key_space: config.placer.discovery.key_space,
                    ..HolderConfig::default()
                }),
                offerer,
                schedule: scheduler.then(|| SuperTraders::new(SuperTraderConfig::trusting())),
                offerer_due: None,
                held_seq: HashMap::new(),
            });
        }
        let index = nodes.iter().enumerate().map(|(i, n)| (n.id, i)).collect();
        let mut harness = Harness {
            config,
            rng,
            now_ms: 1_000,
            seq: 0,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            nodes,
            index,
            cut: HashSet::new(),
            calls: BTreeMap::new(),
            next_call: 1,
            next_wait: 1,
            runs: HashMap::new(),
            died_at: HashMap::new(),
            running: HashMap::new(),
            violations: Vec::new(),
            stats: Stats::default(),
        };
        for i in 0..harness.nodes.len() {
            if harness.nodes[i].offerer.is_some() {
                harness.at(harness.now_ms, Event::OffererDue(i));
            }
        }
        harness
    }

    /// The virtual time, in ms.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// What happened so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Invariants broken so far (none, if the machines are right).
    pub fn violations(&self) -> &[Violation] {
        &self.violations
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Memory lent by all volunteers, alive or not, in MiB.
    pub fn lent_mib(&self) -> u64 {
        self.nodes
            .iter()
            .filter_map(|n| n.offerer.as_ref())
            .map(|o| o.config().memory_mib)
            .sum()
    }

    /// Whether node `i` lends memory.
    pub fn is_volunteer(&self, i: usize) -> bool {
        self.nodes[i].offerer.is_some()
    }

    /// Whether node `i` is alive.
    pub fn is_alive(&self, i: usize) -> bool {
        self.nodes[i].alive
    }

    /// Cuts the link between `a` and `b` both ways.
    pub fn cut(&mut self, a: usize, b: usize) {
        self.cut.insert((a.min(b), a.max(b)));
    }

    /// Heals every cut and isolation.
    pub fn recover(&mut self) {
        self.cut.clear();
        for node in &mut self.nodes {
            node.isolated = false;
        }
    }

    /// Cuts `node` from every other.
    pub fn isolate(&mut self, node: usize) {
        self.nodes[node].isolated = true;
    }

    /// Node `i` vanishes (a crash): it sends and answers nothing from now on; the peers
    /// that held connections to it notice after [`NetConfig::detect_gone_ms`].
    pub fn kill(&mut self, i: usize) {
        if !self.nodes[i].alive {
            return;
        }
        self.nodes[i].alive = false;
        self.died_at.insert(self.nodes[i].id, self.now_ms);
        // Its calls die with it.
        let before = self.calls.len();
        self.calls.retain(|_, c| c.scheduler != i);
        self.stats.failed += (before - self.calls.len()) as u32;
        let at = self.now_ms + self.config.net.detect_gone_ms;
        self.at(at, Event::PeerGoneNoticed { gone: i });
    }

    fn at(&mut self, time: u64, event: Event) {
        self.seq += 1;
        self.queue.push(Reverse((time, self.seq)));
        self.events.insert(self.seq, event);
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        a == b
            || (self.nodes[a].alive
                && self.nodes[b].alive
                && !self.nodes[a].isolated
                && !self.nodes[b].isolated
                && !self.cut.contains(&(a.min(b), a.max(b))))
    }

    /// Sends `message`: after a random delay, unless the link is down or it is lost;
    /// sometimes twice.
    fn send(&mut self, from: usize, to: usize, message: Message) {
        self.stats.messages += 1;
        let net = self.config.net;
        if from != to && (!self.reachable(from, to) || self.rng.random_bool(net.drop_rate)) {
            self.stats.dropped += 1;
            return;
        }
        let delay = |rng: &mut StdRng| rng.random_range(net.min_delay_ms..=net.max_delay_ms);
        let first = self.now_ms + if from == to { 0 } else { delay(&mut self.rng) };
        if from != to && self.rng.random_bool(net.duplicate_rate) {
            let again = first + delay(&mut self.rng);
            let copy = message.clone();
            self.at(
                again,
                Event::Deliver {
                    from,
                    to,
                    message: copy,
                },
            );
        }
        self.at(first, Event::Deliver { from, to, message });
    }

    /// The live node XOR-closest to `key` that `from` can reach (itself included).
    fn closest(&self, from: usize, key: &[u8]) -> Option<usize> {
        let hashed = hash_key(key);
        (0..self.nodes.len())
            .filter(|&i| self.reachable(from, i))
            .min_by_key(|&i| {
                let id = &self.nodes[i].hashed;
                std::array::from_fn::<u8, 32, _>(|b| id[b] ^ hashed[b])
            })
    }

    /// A scheduler asks for a call of `mib` MiB that runs `run_ms`: placed from now on.
    /// Returns its number.
    pub fn call(&mut self, scheduler: usize, mib: u32, run_ms: u64) -> u64 {
        self.stats.calls += 1;
        let call = self.next_call;
        self.next_call += 1;
        let recent = match &self.nodes[scheduler].schedule {
            Some(list) if !self.config.is_baseline() => {
                list.recent(self.now_ms, mib, 2_000, &[], &mut self.rng)
            }
            _ => Vec::new(),
        };
        let started = Placer::start(
            self.now_ms,
            u64::from(mib) * MIB,
            self.config.placer,
            recent,
            &mut self.rng,
        );
        let Ok((placer, step)) = started else {
            self.stats.failed += 1;
            return call;
        };
        self.calls.insert(
            call,
            Call {
                scheduler,
                placer,
                invocation_id: self.rng.next_u64() >> 1,
                run_ms,
                started_ms: self.now_ms,
                run_time_ms: 0,
                run_started_ms: None,
                waiting: 0,
            },
        );
        self.follow(call, step);
        call
    }

    /// A scheduler reserves `mib` MiB on some offer of its list and never uses it (a
    /// client's `discover --reserve` that went away): held until it lapses.
    pub fn reserve_only(&mut self, scheduler: usize, mib: u32) {
        let Some(list) = &self.nodes[scheduler].schedule else {
            return;
        };
        let fitting = list.fitting(self.now_ms, mib, &[], &mut self.rng);
        if fitting.is_empty() {
            return;
        }
        let offer = &fitting[self.rng.random_range(0..fitting.len())];
        let Some(&to) = self.index.get(&offer.body.offerer) else {
            return;
        };
        let message = Message::Reserve {
            offer_id: offer.body.offer_id,
            mib,
            reservation_id: self.rng.next_u64() >> 1,
        };
        self.send(scheduler, to, message);
    }

    /// Carries out a placer's step for `call`.
    fn follow(&mut self, call: u64, step: Step) {
        let Some(deadline) = self
            .calls
            .get(&call)
            .map(|c| c.placer.discovery().map(|d| d.deadline_ms()))
        else {
            return;
        };
        if let (Step::Discovery(d), Some(deadline)) = (&step, deadline)
            && *d != discovery::Step::Fallback
            && self.now_ms >= deadline
        {
            let what = format!("call {call}'s discovery went on past its budget: {d:?}");
            self.violate(what);
        }
        self.next_wait += 1;
        let waiting = self.next_wait;
        let Some(c) = self.calls.get_mut(&call) else {
            return;
        };
        let scheduler = c.scheduler;
        c.waiting = waiting;
        match step {
            Step::Discovery(discovery::Step::FindClosest { key }) => {
                self.stats.messages += 1;
                self.stats.probes += 1;
                let done = self.now_ms + self.config.net.lookup_ms;
                match deadline {
                    // A lookup is cut at the discovery's deadline, as the node cuts it.
                    Some(deadline) if done > deadline => {
                        self.at(deadline, Event::AnswerTimeout { call, waiting });
                    }
                    _ => {
                        let purpose = Lookup::Probe { call, waiting };
                        self.at(
                            done,
                            Event::LookupDone {
                                node: scheduler,
                                purpose,
                                key,
                            },
                        );
                    }
                }
            }
            Step::Discovery(discovery::Step::AskHolder { holder, tier }) => {
                let mib = c.placer.request_mib();
                let to = self.index[&holder];
                let message = Message::FindOffers {
                    call,
                    waiting,
                    tier,
                    mib,
                };
                self.send(scheduler, to, message);
                self.timeout(call, waiting);
            }
            Step::Discovery(discovery::Step::Fallback) => {
                self.stats.fallbacks += 1;
                let mib = c.placer.request_mib();
                let offers = self.nodes[scheduler]
                    .schedule
                    .as_ref()
                    .map_or(Vec::new(), |l| {
                        l.fitting(self.now_ms, mib, &[], &mut self.rng)
                    });
                let now = self.now_ms;
                let step = self
                    .calls
                    .get_mut(&call)
                    .map(|c| c.placer.on_fallback(now, offers, &mut self.rng));
                if let Some(step) = step {
                    self.follow(call, step);
                }
            }
            Step::Discovery(discovery::Step::Done) => {}
            Step::Run { offer } => {
                c.run_started_ms = Some(self.now_ms);
                let (mib, run_ms) = (c.placer.request_mib(), c.run_ms);
                let to = self.index[&offer.body.offerer];
                let message = Message::Execute {
                    call,
                    waiting,
                    offer_id: offer.body.offer_id,
                    reservation_id: self.rng.next_u64() >> 1,
                    mib,
                    run_ms,
                };
                self.send(scheduler, to, message);
                // A run's answer may take the run's time and the network's.
                let wait = run_ms + 2 * self.config.net.answer_timeout_ms;
                self.at(self.now_ms + wait, Event::AnswerTimeout { call, waiting });
            }
            Step::Done => self.finish(call),
        }
    }

    fn timeout(&mut self, call: u64, waiting: u64) {
        let mut at = self.now_ms + self.config.net.answer_timeout_ms;
        if let Some(d) = self.calls.get(&call).and_then(|c| c.placer.discovery()) {
            at = at.min(d.deadline_ms().max(self.now_ms));
        }
        self.at(at, Event::AnswerTimeout { call, waiting });
    }

    fn finish(&mut self, call: u64) {
        let Some(c) = self.calls.remove(&call) else {
            return;
        };
        match c.placer.outcome() {
            Some(Outcome::Placed { .. }) => self.stats.placed += 1,
            _ => self.stats.failed += 1,
        }
        // The placement's own work within its budget (a run's time excluded), give or
        // take the one exchange under way when it ran out, bounded by the answer timeout.
        let own = self.now_ms - c.started_ms - c.run_time_ms;
        if own > self.config.placer.budget_ms + self.config.net.answer_timeout_ms {
            self.violate(format!("call {call} placed in {own} ms, over its budget"));
        }
    }

    fn violate(&mut self, what: String) {
        if self.violations.len() < 64 {
            self.violations.push(Violation {
                at_ms: self.now_ms,
                what,
            });
        }
    }

    /// Runs events until `until_ms` of virtual time.
    pub fn run_until(&mut self, until_ms: u64) {
        while let Some(&Reverse((time, seq))) = self.queue.peek() {
            if time > until_ms {
                break;
            }
            self.queue.pop();
            self.now_ms = self.now_ms.max(time);
            if let Some(event) = self.events.remove(&seq) {
                self.handle(event);
            }
        }
        self.now_ms = self.now_ms.max(until_ms);
        self.check_lapses();
    }

    fn handle(&mut self, event: Event) {
        // The nodes whose machines the event may change: the ones checked after it.
        let touched: Vec<usize> = match &event {
            Event::Deliver { to, .. } => vec![*to],
            Event::OffererDue(i) => vec![*i],
            Event::LookupDone { node, .. } | Event::RunDone { node, .. } => vec![*node],
            Event::AnswerTimeout { .. } => Vec::new(),
            Event::PeerGoneNoticed { .. } => (0..self.nodes.len()).collect(),
        };
        match event {
            Event::Deliver { from, to, message } => {
                if self.nodes[to].alive {
                    self.deliver(from, to, message);
                }
            }
            Event::OffererDue(i) => {
                self.nodes[i].offerer_due = None;
                self.drive_offerer(i);
            }
            Event::LookupDone { node, purpose, key } => self.lookup_done(node, purpose, &key),
            Event::AnswerTimeout { call, waiting } => {
                let now = self.now_ms;
                let Some(c) = self.calls.get_mut(&call) else {
                    return;
                };
                if c.waiting != waiting {
                    return;
                }
                let step = if let Some(since) = c.run_started_ms.take() {
                    c.run_time_ms += now - since;
                    c.placer
                        .on_failed(now, "no answer".into(), true, &mut self.rng)
                } else {
                    c.placer.on_timeout(now, &mut self.rng)
                };
                self.follow(call, step);
            }
            Event::RunDone {
                node,
                from,
                call,
                waiting,
                reservation_id,
            } => {
                if !self.nodes[node].alive {
                    return;
                }
                self.running.remove(&(node, reservation_id));
                let now = self.now_ms;
                let Some(offerer) = self.nodes[node].offerer.as_mut() else {
                    return;
                };
                let newer = offerer
                    .finish_run(now, reservation_id)
                    .and_then(|done| offerer.current(now, done.offer_id).ok().flatten());
                self.schedule_offerer(node);
                let outcome = Ok(newer.map(Box::new));
                let message = Message::Executed {
                    call,
                    waiting,
                    outcome,
                };
                self.send(node, from, message);
            }
            Event::PeerGoneNoticed { gone } => {
                let id = self.nodes[gone].id;
                for i in 0..self.nodes.len() {
                    if !self.nodes[i].alive {
                        continue;
                    }
                    let now = self.now_ms;
                    if let Some(offerer) = self.nodes[i].offerer.as_mut() {
                        offerer.owner_gone(now, id);
                        self.schedule_offerer(i);
                    }
                }
            }
        }
        self.check_node_invariants(&touched);
    }

    fn lookup_done(&mut self, node: usize, purpose: Lookup, key: &[u8]) {
        if !self.nodes[node].alive {
            return;
        }
        let found = self.closest(node, key);
        let now = self.now_ms;
        match purpose {
            Lookup::Holder { offer_id } => {
                let event = match found {
                    Some(h) => OffererEvent::HolderFound {
                        offer_id,
                        holder: self.nodes[h].id,
                    },
                    None => OffererEvent::NoHolder { offer_id },
                };
                self.offerer_event(node, event);
            }
            Lookup::Probe { call, waiting } => {
                let Some(c) = self.calls.get_mut(&call) else {
                    return;
                };
                if c.waiting != waiting {
                    return;
                }
                let holder = found.map(|h| self.nodes[h].id);
                let step = c.placer.on_closest(now, holder, &mut self.rng);
                self.follow(call, step);
            }
        }
    }

    fn offerer_event(&mut self, node: usize, event: OffererEvent) {
        let now = self.now_ms;
        if let Some(offerer) = self.nodes[node].offerer.as_mut()
            && let Ok(actions) = offerer.on_event(now, event)
        {
            self.perform(node, actions);
        }
        self.schedule_offerer(node);
    }

    fn drive_offerer(&mut self, i: usize) {
        if !self.nodes[i].alive {
            return;
        }
        let now = self.now_ms;
        let Some(offerer) = self.nodes[i].offerer.as_mut() else {
            return;
        };
        let actions = offerer.poll(now, &mut self.rng).unwrap_or_default();
        let report = offerer.poll_report(now).unwrap_or_default();
        self.perform(i, actions);
        if let Some(offers) = report {
            let schedulers = self.config.schedulers;
            let to = self.rng.random_range(0..schedulers);
            self.send(i, to, Message::Notify(offers));
        }
        self.schedule_offerer(i);
    }

    fn schedule_offerer(&mut self, i: usize) {
        let Some(offerer) = &self.nodes[i].offerer else {
            return;
        };
        let next = [offerer.next_wakeup(), offerer.next_report()]
            .into_iter()
            .flatten()
            .min();
        if let Some(at) = next {
            let at = at.max(self.now_ms);
            if self.nodes[i].offerer_due.is_none_or(|due| at < due) {
                self.nodes[i].offerer_due = Some(at);
                self.at(at, Event::OffererDue(i));
            }
        }
    }

    fn perform(&mut self, from: usize, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::FindHolder { offer_id, key } => {
                    self.stats.messages += 1;
                    let at = self.now_ms + self.config.net.lookup_ms;
                    let purpose = Lookup::Holder { offer_id };
                    self.at(
                        at,
                        Event::LookupDone {
                            node: from,
                            purpose,
                            key,
                        },
                    );
                }
                Action::Send {
                    offer_id,
                    holder,
                    key,
                    offer,
                } => {
                    let to = self.index[&holder];
                    self.send(
                        from,
                        to,
                        Message::Offer {
                            key,
                            offer,
                            offer_id,
                        },
                    );
                }
            }
        }
    }

    fn deliver(&mut self, from: usize, to: usize, message: Message) {
        let now = self.now_ms;
        match message {
            Message::Offer {
                key,
                offer,
                offer_id,
            } => {
                let id = (offer.body.offerer, offer.body.offer_id);
                let seq = offer.body.seq;
                let accepted = self.nodes[to].holder.receive(now, &key, *offer).is_ok();
                if accepted {
                    let last = self.nodes[to].held_seq.insert(id, seq).unwrap_or(0);
                    if seq < last {
                        self.nodes[to].held_seq.insert(id, last);
                        self.violate(format!("holder {to} took version {seq} after {last}"));
                    }
                }
                self.send(to, from, Message::OfferTaken { offer_id, accepted });
            }
            Message::OfferTaken { offer_id, accepted } => {
                let holder = self.nodes[from].id;
                let event = match accepted {
                    true => OffererEvent::Delivered { offer_id, holder },
                    false => OffererEvent::DeliveryFailed { offer_id, holder },
                };
                self.offerer_event(to, event);
            }
            Message::Notify(offers) => {
                let sender = self.nodes[from].id;
                if let Some(list) = self.nodes[to].schedule.as_mut() {
                    let own = offers.into_iter().filter(|o| o.body.offerer == sender);
                    list.notify(now, own.collect());
                }
            }
            Message::FindOffers {
                call,
                waiting,
                tier,
                mib,
            } => {
                let offers = self.nodes[to]
                    .holder
                    .answer(now, tier, mib)
                    .into_iter()
                    .take(64)
                    .cloned()
                    .collect();
                let answer = Message::Offers {
                    call,
                    waiting,
                    offers,
                };
                self.send(to, from, answer);
            }
            Message::Offers {
                call,
                waiting,
                offers,
            } => {
                let Some(c) = self.calls.get_mut(&call) else {
                    return;
                };
                // Only the answer to the question under way counts.
                if c.waiting != waiting {
                    return;
                }
                let step = c.placer.on_offers(now, offers, &mut self.rng);
                self.follow(call, step);
            }
            Message::Reserve {
                offer_id,
                mib,
                reservation_id,
            } => {
                let owner = self.nodes[from].id;
                let hold = self.config.hold_ms;
                if let Some(offerer) = self.nodes[to].offerer.as_mut()
                    && offerer
                        .reserve(now, owner, offer_id, mib, reservation_id, hold)
                        .is_ok()
                {
                    self.schedule_offerer(to);
                }
            }
            Message::Execute {
                call,
                waiting,
                offer_id,
                reservation_id,
                mib,
                run_ms,
            } => {
                let run = (call, waiting, run_ms);
                self.execute(from, to, run, offer_id, reservation_id, mib)
            }
            Message::Executed {
                call,
                waiting,
                outcome,
            } => {
                let Some(c) = self.calls.get_mut(&call) else {
                    return;
                };
                if c.waiting != waiting {
                    return;
                }
                let Some(since) = c.run_started_ms.take() else {
                    return;
                };
                let step = match outcome {
                    Ok(newer) => {
                        c.run_time_ms += now - since;
                        if let (Some(list), Some(newer)) = (self.nodes[to].schedule.as_mut(), newer)
                        {
                            list.notify(now, vec![*newer]);
                        }
                        c.placer.on_ran(now)
                    }
                    Err((reason, None)) => c.placer.on_refused(now, reason, &mut self.rng),
                    Err((reason, Some(retryable))) => {
                        c.run_time_ms += now - since;
                        c.placer.on_failed(now, reason, retryable, &mut self.rng)
                    }
                };
                self.follow(call, step);
            }
        }
    }

    /// A volunteer takes an `Execute`: reserves and starts the run (the ledger decides),
    /// or refuses.
    fn execute(
        &mut self,
        from: usize,
        to: usize,
        (call, waiting, run_ms): (u64, u64, u64),
        offer_id: u64,
        reservation_id: u64,
        mib: u32,
    ) {
        let now = self.now_ms;
        let owner = self.nodes[from].id;
        let invocation_id = self.calls.get(&call).map_or(call, |c| c.invocation_id);
        let run = RunKey {
            owner,
            invocation_id,
            call_digest: [0; 32],
        };
        let Some(offerer) = self.nodes[to].offerer.as_mut() else {
            return;
        };
        if offerer.ledger().check_run(&run).is_err() {
            // A duplicate: the first run answers.
            return;
        }
        let reserved = offerer.reserve(now, owner, offer_id, mib, reservation_id, 1_000);
        let outcome = match reserved {
            Err(e) => Err((e.to_string(), None)),
            Ok(_) => match offerer.start_run(now, reservation_id, run, mib) {
                Ok(_) => {
                    *self.runs.entry((to, invocation_id)).or_default() += 1;
                    if self.runs[&(to, invocation_id)] > 1 {
                        self.violate(format!("invocation {invocation_id} ran twice on {to}"));
                    }
                    self.stats.runs += 1;
                    self.running.insert((to, reservation_id), call);
                    let done = Event::RunDone {
                        node: to,
                        from,
                        call,
                        waiting,
                        reservation_id,
                    };
                    self.at(now + run_ms, done);
                    self.schedule_offerer(to);
                    return;
                }
                Err(e) => Err((e.to_string(), Some(true))),
            },
        };
        self.schedule_offerer(to);
        let answer = Message::Executed {
            call,
            waiting,
            outcome,
        };
        self.send(to, from, answer);
    }

    /// The invariants that hold at every moment, on the nodes an event touched.
    fn check_node_invariants(&mut self, touched: &[usize]) {
        let mut broken = Vec::new();
        for &i in touched {
            let node = &self.nodes[i];
            let Some(offerer) = &node.offerer else {
                continue;
            };
            for sent in offerer.sent() {
                if sent.in_use_mib > sent.memory_mib {
                    broken.push(format!("offer {} of {i} oversubscribed", sent.offer_id));
                }
            }
            if !node.alive {
                continue;
            }
            // Every running reservation is one a run of ours started and has not ended.
            for r in offerer.reservations() {
                if r.is_running() && !self.running.contains_key(&(i, r.reservation_id)) {
                    broken.push(format!(
                        "reservation {} of {i} runs no call",
                        r.reservation_id
                    ));
                }
            }
        }
        for ((i, reservation_id), _) in self.running.iter() {
            let node = &self.nodes[*i];
            if !node.alive || !touched.contains(i) {
                continue;
            }
            let still = node
                .offerer
                .as_ref()
                .and_then(|o| o.ledger().get(*reservation_id))
                .is_some_and(|r| r.is_running());
            if !still {
                broken.push(format!(
                    "running reservation {reservation_id} of {i} ended before its call"
                ));
            }
        }
        for what in broken {
            self.violate(what);
        }
    }

    /// Held reservations whose owner died long enough ago (noticed, plus slack for the
    /// network) must be gone.
    fn check_lapses(&mut self) {
        let grace = self.config.net.detect_gone_ms + self.config.net.max_delay_ms;
        let mut broken = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let Some(offerer) = &node.offerer else {
                continue;
            };
            if !node.alive {
                continue;
            }
            for r in offerer.reservations() {
                let ReservationState::Held { .. } = r.state else {
                    continue;
                };
                if let Some(&died) = self.died_at.get(&r.owner)
                    && self.now_ms > died + grace
                {
                    broken.push(format!(
                        "reservation {} on {i} still held {} ms after its owner died",
                        r.reservation_id,
                        self.now_ms - died
                    ));
                }
            }
        }
        for what in broken {
            self.violate(what);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{
        Just, ProptestConfig, Strategy, prop_assert, prop_assert_eq, prop_oneof, proptest,
    };

    fn warm(h: &mut Harness) {
        h.run_until(h.now_ms() + 3_000);
    }

    #[test]
    fn calls_on_a_calm_network_are_placed_and_the_same_seed_gives_the_same_run() {
        let run = |seed| {
            let mut h = Harness::new(HarnessConfig::new(40, 3, seed));
            warm(&mut h);
            for i in 0..60u64 {
                let at = h.now_ms() + 50;
                h.run_until(at);
                h.call((i % 3) as usize, [100, 300, 900][i as usize % 3], 200);
            }
            h.run_until(h.now_ms() + 20_000);
            assert!(h.violations().is_empty(), "{:?}", h.violations());
            h.stats()
        };
        let stats = run(1);
        assert_eq!(stats.calls, 60);
        assert_eq!(stats.placed, 60, "{stats:?}");
        assert_eq!(run(1), stats, "deterministic from the seed");
    }

    #[test]
    fn a_held_reservation_lapses_soon_after_its_owner_dies() {
        let mut config = HarnessConfig::new(20, 2, 3);
        config.hold_ms = 600_000;
        let mut h = Harness::new(config);
        warm(&mut h);
        for _ in 0..5 {
            h.reserve_only(0, 128);
        }
        h.run_until(h.now_ms() + 500);
        let held = |h: &Harness| {
            (0..h.len())
                .filter_map(|i| h.nodes[i].offerer.as_ref())
                .map(|o| o.reservations().count())
                .sum::<usize>()
        };
        assert_eq!(held(&h), 5);
        h.kill(0);
        h.run_until(h.now_ms() + 10_000);
        assert_eq!(held(&h), 0, "each lapsed when its owner was found gone");
        assert!(h.violations().is_empty(), "{:?}", h.violations());
    }

    #[test]
    fn a_thousand_nodes_run_a_minute_of_calls() {
        let mut h = Harness::new(HarnessConfig::new(1_000, 50, 11));
        warm(&mut h);
        let mut rng = StdRng::seed_from_u64(12);
        let start = h.now_ms();
        // Twenty calls a second for a minute, from every scheduler.
        while h.now_ms() < start + 60_000 {
            let at = h.now_ms() + 50;
            h.run_until(at);
            let scheduler = rng.random_range(0..50);
            h.call(
                scheduler,
                rng.random_range(1..=1024),
                rng.random_range(10..2_000),
            );
        }
        h.run_until(h.now_ms() + 30_000);
        let stats = h.stats();
        assert!(h.violations().is_empty(), "{:?}", h.violations());
        assert_eq!(stats.calls, 1_200);
        assert!(stats.placed >= 1_150, "{stats:?}");
    }

    #[derive(Debug, Clone)]
    enum Chaos {
        Call {
            scheduler: usize,
            mib: u32,
            run_ms: u64,
        },
        ReserveOnly {
            scheduler: usize,
        },
        Wait {
            ms: u64,
        },
        Kill {
            node: usize,
        },
        Cut {
            a: usize,
            b: usize,
        },
        Isolate {
            node: usize,
        },
        Recover,
    }

    fn chaos() -> impl Strategy<Value = Chaos> {
        prop_oneof![
            6 => (0..3usize, 1..2048u32, 1..3_000u64)
                .prop_map(|(scheduler, mib, run_ms)| Chaos::Call { scheduler, mib, run_ms }),
            1 => (0..3usize).prop_map(|scheduler| Chaos::ReserveOnly { scheduler }),
            4 => (1..2_000u64).prop_map(|ms| Chaos::Wait { ms }),
            1 => (0..24usize).prop_map(|node| Chaos::Kill { node }),
            1 => (0..24usize, 0..24usize).prop_map(|(a, b)| Chaos::Cut { a, b }),
            1 => (0..24usize).prop_map(|node| Chaos::Isolate { node }),
            1 => Just(Chaos::Recover),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Over random schedules of calls, kills, cuts, isolations, lost and duplicated
        /// messages and delays, no invariant of the market is ever broken.
        #[test]
        fn no_schedule_breaks_an_invariant(
            seed in 0..1_000u64,
            drop_rate in 0.0..0.2f64,
            duplicate_rate in 0.0..0.2f64,
            max_delay_ms in 1..400u64,
            ops in proptest::collection::vec(chaos(), 1..60),
        ) {
            let mut config = HarnessConfig::new(24, 3, seed);
            config.net.drop_rate = drop_rate;
            config.net.duplicate_rate = duplicate_rate;
            config.net.max_delay_ms = max_delay_ms;
            let mut h = Harness::new(config);
            warm(&mut h);
            for op in ops {
                match op {
                    Chaos::Call { scheduler, mib, run_ms } => {
                        if h.is_alive(scheduler) {
                            h.call(scheduler, mib, run_ms);
                        }
                    }
                    Chaos::ReserveOnly { scheduler } => h.reserve_only(scheduler, 128),
                    Chaos::Wait { ms } => h.run_until(h.now_ms() + ms),
                    Chaos::Kill { node } => h.kill(node),
                    Chaos::Cut { a, b } => h.cut(a, b),
                    Chaos::Isolate { node } => h.isolate(node),
                    Chaos::Recover => h.recover(),
                }
                prop_assert!(h.violations().is_empty(), "{:?}", h.violations());
            }
            h.run_until(h.now_ms() + 60_000);
            prop_assert!(h.violations().is_empty(), "{:?}", h.violations());
            // Every call ended, one way or the other.
            let stats = h.stats();
            prop_assert_eq!(stats.placed + stats.failed, stats.calls);
        }
    }
}
