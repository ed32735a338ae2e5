//! The scheduler side: the registry, the super-trader list, and discoveries (Algorithm 2)
//! with placement (Algorithm 3) and reservation; and the client side that picks a
//! scheduler at random from the registry and asks it.

use super::protocol::{
    DiscoverRequest, Discovered, MAX_FOUND_OFFERS, OfferSummary, Placement, Request, ReserveTerms,
    Response,
};
use super::slots::Slot;
use super::{InvokeError, Market, lock};
use flotilla_offers::ledger::Reservation;
use flotilla_offers::offer::SignedOffer;
use flotilla_overlay::dht::Dht;
use flotilla_overlay::regions::{RegionError, Tier};
use flotilla_scheduler::discovery::{Discovery, DiscoveryConfig, Step};
use flotilla_scheduler::placement;
use flotilla_scheduler::placer::{self, Placer};
use flotilla_scheduler::registry::registry_keys;
use libp2p::PeerId;
use libp2p::kad::RecordKey;
use rand::RngCore;
use rand::SeedableRng;
use rand::rngs::StdRng;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a scheduler renews its registry record, so it outlives the peers that
/// stored it.
const REANNOUNCE_INTERVAL: Duration = Duration::from_secs(60);
/// How long a registry lookup's result is reused.
const REGISTRY_FRESH: Duration = Duration::from_secs(10);
/// Most schedulers remembered from one lookup.
const MAX_SCHEDULERS: usize = 64;
/// Most probes a client may ask a discovery to make.
pub const MAX_TRIES_LIMIT: u32 = 16;
/// Time a client allows a scheduler for one discovery.
const DISCOVER_TIMEOUT: Duration = Duration::from_secs(30);
const MIB: u64 = 1024 * 1024;
/// Most refusal reasons one discovery reports.
const MAX_REFUSALS_REPORTED: usize = 4;
/// Offers one discovery asks to reserve, in all: a list of stale or fake offers costs
/// this many messages, never one per offer.
pub const MAX_RESERVE_ATTEMPTS: u32 = 8;

/// Why a discovery could not be run.
#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    /// The request is impossible (more memory than the largest tier, say).
    #[error(transparent)]
    Request(#[from] RegionError),
    /// No scheduler is registered.
    #[error(
        "no scheduler found in the registry (start a node with --scheduler, or wait until one has joined)"
    )]
    NoScheduler,
    /// No scheduler tried gave an answer (each failed, was busy, or refused).
    #[error("{0}")]
    Unanswered(String),
}

/// The last registry lookup.
#[derive(Default)]
pub(super) struct SchedulerCache {
    found: Mutex<Option<(Instant, Vec<PeerId>)>>,
    refreshing: tokio::sync::Mutex<()>,
}

/// What an offerer's answer to a request says of it, for the super-trader list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Heard {
    /// It granted the reservation, or ran the call with a receipt that checks: proven.
    Served,
    /// It refused or was busy: nothing learnt (refusing costs a stranger nothing).
    Declined,
    /// No answer, or one with a bad receipt: forgotten for a while.
    Silent,
}

impl Market {
    /// Announces this scheduler in the registry, again every [`REANNOUNCE_INTERVAL`].
    pub(super) async fn announce_scheduler(self) {
        let mut ticks = tokio::time::interval(REANNOUNCE_INTERVAL);
        loop {
            ticks.tick().await;
            for key in registry_keys() {
                let key = RecordKey::new(&key);
                let provided = self.shared.network.start_providing_in(Dht::Market, key);
                if let Err(e) = provided.await {
                    tracing::warn!(error = %e, "cannot announce this scheduler");
                }
            }
        }
    }

    /// The schedulers in the registry (ourselves included if we are one), looked up at
    /// most every [`REGISTRY_FRESH`].
    pub(super) async fn schedulers(&self) -> Vec<PeerId> {
        let cache = &self.shared.schedulers;
        let fresh = |found: &Option<(Instant, Vec<PeerId>)>| {
            found
                .as_ref()
                .filter(|(at, peers)| at.elapsed() < REGISTRY_FRESH && !peers.is_empty())
                .map(|(_, peers)| peers.clone())
        };
        if let Some(peers) = fresh(&lock(&cache.found)) {
            return peers;
        }
        let _one_lookup_at_a_time = cache.refreshing.lock().await;
        if let Some(peers) = fresh(&lock(&cache.found)) {
            return peers;
        }
        let mut peers = Vec::new();
        if self.is_scheduler() {
            peers.push(self.peer_id());
        }
        let trusted = &self.shared.config.trusted_schedulers;
        if !trusted.is_empty() {
            // Configured schedulers override the registry, which strangers can fill.
            peers.extend(trusted.iter().filter(|p| **p != self.peer_id()));
            *lock(&cache.found) = Some((Instant::now(), peers.clone()));
            return peers;
        }
        // Every registry key, looked up at once, within one answer timeout.
        let mut lookups = Vec::new();
        for key in registry_keys() {
            let key = RecordKey::new(&key);
            if let Ok(found) = self.shared.network.get_providers_in(Dht::Market, key).await {
                lookups.push(stream_of(found));
            }
        }
        let mut found = futures::stream::select_all(lookups);
        let deadline = tokio::time::sleep(self.shared.config.answer_timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                peer = futures::StreamExt::next(&mut found) => match peer {
                    Some(peer) if !peers.contains(&peer) && peers.len() < MAX_SCHEDULERS => peers.push(peer),
                    Some(_) => {}
                    None => break,
                },
                _ = &mut deadline => break,
            }
        }
        *lock(&cache.found) = Some((Instant::now(), peers.clone()));
        peers
    }

    pub(super) fn forget_scheduler(&self, scheduler: &PeerId) {
        if let Some((_, peers)) = lock(&self.shared.schedulers.found).as_mut() {
            peers.retain(|p| p != scheduler);
        }
    }

    /// Takes an offerer's report for the super-trader list.
    pub(super) async fn take_notification(
        &self,
        from: PeerId,
        offers: Vec<SignedOffer>,
    ) -> Response {
        if !self.is_scheduler() {
            return Response::Refused {
                reason: "this node is not a scheduler".into(),
            };
        }
        // Only an offerer's own offers, which its connection authenticates: nobody
        // reports for someone else.
        let accepted = self
            .with(move |m, now| {
                m.super_traders
                    .as_mut()
                    .map_or(0, |l| l.notify_from_offerer(now, from, offers))
            })
            .await;
        match accepted {
            Ok(accepted) => Response::Notified {
                accepted: accepted as u32,
            },
            Err(_) => Response::stopping(),
        }
    }

    /// A place for one more discovery of `from`'s, or `None` when as many run as
    /// allowed, or `from` holds its share.
    pub(super) fn discovery_slot(&self, from: PeerId) -> Option<Slot> {
        self.shared.discoveries.take(from)
    }

    /// Runs one discovery for a client (and a reservation if it asks for one) in the
    /// place `_slot` holds.
    pub(super) async fn serve_discovery(&self, request: DiscoverRequest, _slot: Slot) -> Response {
        if !self.is_scheduler() {
            return Response::Refused {
                reason: "this node is not a scheduler".into(),
            };
        }
        match self.run_discovery(request, &[]).await {
            Ok(discovered) => Response::Discovered(Box::new(discovered)),
            Err(e) => Response::Refused {
                reason: e.to_string(),
            },
        }
    }

    /// The settings of a discovery this scheduler runs (`max_tries` as the client asks,
    /// within bounds).
    pub(super) fn discovery_config(&self, max_tries: Option<u32>) -> DiscoveryConfig {
        let config = &self.shared.config;
        DiscoveryConfig {
            max_tries: max_tries.unwrap_or(config.max_tries).min(MAX_TRIES_LIMIT),
            own_tier_probes: config.own_tier_probes,
            key_space: config.key_space,
            fallback: config.fallback,
            budget_ms: config.discovery_budget.as_millis() as u64,
        }
    }

    /// Does one step of a discovery (a lookup, a question to a holder, or the fallback
    /// list), bounded by the answer timeout and by `deadline_ms`, the discovery's own.
    pub(super) async fn probe(
        &self,
        step: Step,
        deadline_ms: u64,
        request_mib: u32,
        excluded: Vec<PeerId>,
        exchanges: &mut Exchanges,
    ) -> Probed {
        let left = Duration::from_millis(deadline_ms.saturating_sub(self.now()));
        let timeout = self.shared.config.answer_timeout.min(left);
        match step {
            Step::FindClosest { key } => {
                let lookup = self.shared.network.responsible_peer(key);
                match tokio::time::timeout(timeout, lookup).await {
                    Ok(Ok((holder, requests))) => {
                        exchanges.lookups += requests;
                        Probed::Closest(Some(holder))
                    }
                    Ok(Err(_)) => Probed::Closest(None),
                    Err(_) => Probed::TimedOut,
                }
            }
            Step::AskHolder { holder, tier } => {
                let ask = Request::FindOffers {
                    tier,
                    min_free_mib: request_mib,
                };
                exchanges.count(self, holder);
                match self.call(holder, Vec::new(), ask, timeout).await {
                    Ok(Response::Offers { offers, .. }) => Probed::Offers(offers),
                    Err(super::CallError::Timeout(_)) => Probed::TimedOut,
                    _ => Probed::HolderFailed,
                }
            }
            Step::Fallback => Probed::Fallback(
                self.with(move |m, now| {
                    m.super_traders.as_ref().map_or(Vec::new(), |l| {
                        l.fitting(now, request_mib, &excluded, &mut rand::rng())
                    })
                })
                .await
                .unwrap_or_default(),
            ),
            Step::Done => Probed::Fallback(Vec::new()),
        }
    }

    /// Runs one discovery, and the reservation it asks for on an offer of a peer not in
    /// `exclude`.
    pub(super) async fn run_discovery(
        &self,
        request: DiscoverRequest,
        exclude: &[PeerId],
    ) -> Result<Discovered, RegionError> {
        let started = Instant::now();
        let mut rng = StdRng::from_os_rng();
        let config = self.discovery_config(request.max_tries);
        let bytes = u64::from(request.memory_mib) * MIB;
        let (mut discovery, mut step) = Discovery::start(self.now(), bytes, config, &mut rng)?;
        discovery.exclude(exclude.iter().copied());
        let timeout = self.shared.config.answer_timeout;
        let mut exchanges = Exchanges::default();
        let mut reserve_messages = 0;
        let mut placement = None;
        let mut refusals = Vec::new();
        let mut out_of_attempts = false;
        loop {
            step = match step {
                Step::Done => {
                    let (found, _) = discovery.outcome().expect("the discovery is done");
                    let Some(terms) = &request.reserve else { break };
                    if found.is_empty() {
                        break;
                    }
                    let policy = terms.policy.unwrap_or(self.shared.config.placement);
                    let request_mib = discovery.request_mib();
                    let ranked = placement::rank(found, request_mib, policy, &mut rng);
                    let mut refused_by = Vec::new();
                    for offer in ranked {
                        // Within the discovery's budget and its cap on attempts.
                        let left = discovery.deadline_ms().saturating_sub(self.now());
                        if reserve_messages >= MAX_RESERVE_ATTEMPTS || left == 0 {
                            out_of_attempts = true;
                            break;
                        }
                        reserve_messages += 1;
                        let timeout = timeout.min(Duration::from_millis(left));
                        match self.reserve_offer(offer, terms, request_mib, timeout).await {
                            Ok(reservation) => {
                                placement = Some(Placement {
                                    offer: offer.clone(),
                                    reservation,
                                });
                                break;
                            }
                            Err(reason) => {
                                if refusals.len() < MAX_REFUSALS_REPORTED {
                                    refusals.push(reason.to_string());
                                }
                                refused_by.push(offer.body.offerer);
                            }
                        }
                    }
                    if placement.is_some() || out_of_attempts {
                        break;
                    }
                    // Every offer found was stale: probe on without their offerers.
                    discovery.on_refused(self.now(), refused_by, &mut rng)
                }
                step => {
                    let (deadline, mib) = (discovery.deadline_ms(), discovery.request_mib());
                    let excluded = discovery.excluded().to_vec();
                    let probed = self
                        .probe(step, deadline, mib, excluded, &mut exchanges)
                        .await;
                    probed.feed_discovery(self.now(), &mut discovery, &mut rng)
                }
            };
        }
        let lookup_requests = exchanges.lookups;
        let (found, report) = discovery.outcome().expect("the discovery is done");
        let mut report = report.clone();
        if request.reserve.is_some() && placement.is_none() && !refusals.is_empty() {
            let why = report.failure.take().unwrap_or_default();
            report.failure = Some(format!(
                "{why}; reservations refused: {}",
                refusals.join("; ")
            ));
        }
        if out_of_attempts && placement.is_none() {
            let why = report.failure.take().unwrap_or_default();
            report.failure = Some(format!(
                "{why}; gave up after {reserve_messages} reservation attempts or the \
                 discovery's time budget"
            ));
        }
        report.messages += lookup_requests + reserve_messages;
        report.elapsed_ms = started.elapsed().as_millis() as u64;
        let metrics = &self.shared.metrics;
        metrics.discoveries.inc();
        if report.used_fallback {
            metrics.fallbacks.inc();
        }
        if report.failure.is_some() {
            metrics.discoveries_failed.inc();
        }
        metrics.probes.observe(report.probes.len() as f64);
        metrics.messages.observe(f64::from(report.messages));
        metrics.seconds.observe(started.elapsed().as_secs_f64());
        Ok(Discovered {
            scheduler: self.peer_id().to_string(),
            offers: found
                .iter()
                .take(MAX_FOUND_OFFERS)
                .map(OfferSummary::from)
                .collect(),
            report,
            lookup_requests,
            placement,
        })
    }

    /// Reserves `mib` on `offer` for the terms asked; why not otherwise.
    async fn reserve_offer(
        &self,
        offer: &SignedOffer,
        terms: &ReserveTerms,
        mib: u32,
        timeout: Duration,
    ) -> Result<Reservation, NotReserved> {
        let reserve = Request::Reserve {
            reservation_id: terms.reservation_id,
            offer_id: offer.body.offer_id,
            mib,
            hold_ms: terms.hold_ms,
        };
        let offerer = offer.body.offerer;
        let addresses = offer.body.addresses.clone();
        let answer = self.call(offerer, addresses, reserve, timeout).await;
        // Whatever the answer, the version reserved on is out of date now: the offerer's
        // new version replaces it, or its next report brings it back. A newer version that
        // arrived meanwhile (with another call's answer) stays.
        let newer = match &answer {
            Ok(Response::Reserved {
                offer: Some(newer), ..
            }) => Some(&**newer),
            _ => None,
        };
        // Only a reservation granted proves an offerer: a refusal is free to send.
        let heard = match &answer {
            Ok(Response::Reserved { .. }) => Heard::Served,
            Ok(_) => Heard::Declined,
            Err(_) => Heard::Silent,
        };
        self.learn_version(offer, newer, heard).await;
        match answer {
            Ok(Response::Reserved { reservation, .. }) => Ok(reservation),
            Ok(Response::Refused { reason }) => Err(NotReserved::Refused(reason)),
            Ok(other) => Err(NotReserved::Unexpected(Box::new(other))),
            Err(e) => Err(NotReserved::Unanswered(e)),
        }
    }

    /// Keeps the super-trader list current after asking `tried`'s offerer for something:
    /// the offer's `newer` version when the answer brought one (of the same offerer),
    /// else the version tried is out of date and goes (unless a newer one arrived
    /// meanwhile, with another call's answer). An offerer that served the request is
    /// proven from now on; one that did not answer (or answered with a bad receipt) is
    /// forgotten, with all its offers. `newer` must have come in the offerer's own answer
    /// (its connection authenticates it, so its signature is not checked again).
    pub(super) async fn learn_version(
        &self,
        tried: &SignedOffer,
        newer: Option<&SignedOffer>,
        heard: Heard,
    ) {
        if !self.is_scheduler() {
            return;
        }
        let offerer = tried.body.offerer;
        let (offer_id, seq) = (tried.body.offer_id, tried.body.seq);
        let newer = newer.filter(|n| n.body.offerer == offerer).cloned();
        let _ = self
            .with(move |m, now| {
                let Some(list) = m.super_traders.as_mut() else {
                    return;
                };
                match heard {
                    Heard::Silent => {
                        list.failed(now, offerer);
                        return;
                    }
                    Heard::Served => list.answered(now, offerer),
                    Heard::Declined => {}
                }
                match newer {
                    Some(newer) => {
                        // It came with the offerer's own answer, over its connection.
                        list.notify_from_offerer(now, offerer, vec![newer]);
                    }
                    None => list.remove(&offerer, offer_id, seq),
                }
            })
            .await;
    }

    /// Forgets `offerer` and its offers, as one that failed (for the list's failure
    /// time).
    pub(super) async fn forget_offerer(&self, offerer: PeerId) {
        let _ = self
            .with(move |m, now| {
                if let Some(list) = m.super_traders.as_mut() {
                    list.failed(now, offerer);
                }
            })
            .await;
    }

    /// Runs one discovery through a scheduler picked at random from the registry, trying
    /// another if it does not answer, is busy or refuses.
    pub async fn discover(&self, request: DiscoverRequest) -> Result<Discovered, DiscoverError> {
        Tier::for_request(u64::from(request.memory_mib) * MIB)?;
        let ask = || Request::Discover(request.clone());
        match self.ask_a_scheduler(ask, DISCOVER_TIMEOUT).await {
            Ok(Response::Discovered(discovered)) => Ok(*discovered),
            Ok(other) => Err(DiscoverError::Unanswered(format!(
                "unexpected answer {other:?}"
            ))),
            Err(InvokeError::NoScheduler) => Err(DiscoverError::NoScheduler),
            Err(e) => Err(DiscoverError::Unanswered(e.to_string())),
        }
    }
}

/// Why a reservation asked of an offerer was not made.
#[derive(Debug, thiserror::Error)]
pub(super) enum NotReserved {
    /// The offerer refused, for this reason (its words, from the wire).
    #[error("{0}")]
    Refused(String),
    /// It answered something else.
    #[error("unexpected answer {0:?}")]
    Unexpected(Box<Response>),
    /// No answer.
    #[error(transparent)]
    Unanswered(#[from] super::CallError),
}

/// The request-response exchanges a discovery or a call cost: what every answer reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Exchanges {
    /// Kademlia requests of the lookups.
    pub lookups: u32,
    /// Requests to other peers (a request to this node itself is no exchange).
    pub requests: u32,
}

impl Exchanges {
    /// Counts a request to `peer` (none if it is this node).
    pub fn count(&mut self, market: &Market, peer: PeerId) {
        if peer != market.peer_id() {
            self.requests += 1;
        }
    }

    /// All of them.
    pub fn total(&self) -> u32 {
        self.lookups + self.requests
    }
}

/// What one discovery step found, for the machine that asked.
pub(super) enum Probed {
    /// The peer closest to the key, if the lookup found one.
    Closest(Option<PeerId>),
    /// The holder's offers.
    Offers(Vec<SignedOffer>),
    /// The holder could not be asked.
    HolderFailed,
    /// The step ran out of time.
    TimedOut,
    /// The fallback list's fitting offers.
    Fallback(Vec<SignedOffer>),
}

impl Probed {
    /// Feeds it to a discovery.
    pub fn feed_discovery(self, now: u64, d: &mut Discovery, rng: &mut dyn RngCore) -> Step {
        match self {
            Probed::Closest(holder) => d.on_closest(now, holder, rng),
            Probed::Offers(offers) => d.on_offers(now, offers, rng),
            Probed::HolderFailed => d.on_holder_failed(now, rng),
            Probed::TimedOut => d.on_timeout(now, rng),
            Probed::Fallback(offers) => d.on_fallback(now, offers),
        }
    }

    /// Feeds it to a placement.
    pub fn feed_placer(self, now: u64, p: &mut Placer, rng: &mut dyn RngCore) -> placer::Step {
        match self {
            Probed::Closest(holder) => p.on_closest(now, holder, rng),
            Probed::Offers(offers) => p.on_offers(now, offers, rng),
            Probed::HolderFailed => p.on_holder_failed(now, rng),
            Probed::TimedOut => p.on_timeout(now, rng),
            Probed::Fallback(offers) => p.on_fallback(now, offers, rng),
        }
    }
}

/// A receiver as a stream.
fn stream_of<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Unpin {
    Box::pin(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)))
}
