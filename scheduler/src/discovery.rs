//! Discovery (Algorithm 2): finding offers that fit a request.
//!
//! A request for M MiB first probes the region of the smallest tier ≥ M: a random key
//! there, the peer closest to it (a Kademlia lookup, done by the caller), that peer's
//! offers of that tier. If none fits, as Algorithm 3 asks ("the necessary amount of
//! resources *or higher*"), it goes on to the regions of larger tiers, nearest first
//! ([`DiscoveryConfig::own_tier_probes`]): a small call is served from a large offer,
//! which is partly reserved. After `max_tries` probes in all, the scheduler's super-trader
//! list. A holder answers for the tier asked ([`Step::AskHolder::tier`]): it keeps only
//! offers sent under keys of that tier's region.
//!
//! Every discovery has a budget of time ([`DiscoveryConfig::budget_ms`]): the caller
//! bounds each lookup and question by [`Discovery::deadline_ms`] and reports a step that
//! ran out with [`Discovery::on_timeout`], which ends the probing (the local fallback list
//! is still asked). So a discovery ends within its budget whatever the peers do.
//!
//! Two settings make the research baseline Flotilla is compared to (Caravela's plain
//! random probing): [`KeySpace::Whole`] probes random keys anywhere in the key space
//! (holders then keep, and answer with, offers of every tier; there are no larger regions
//! to go on to), and `fallback: false` ends a discovery that probing did not satisfy as
//! failed instead of asking the super-trader list.
//!
//! Offers of peers the caller excludes (volunteers that already failed the call) never
//! count as found. When every offer found is refused at reservation (taken meanwhile, or
//! its offerer gone), [`Discovery::on_refused`] excludes those offerers and goes on with
//! the probes left, then the fallback: a stale offer costs a probe, not the request.
//!
//! The machine returns a [`Step`] after every input; the caller does what it says and
//! feeds the answer back.

use flotilla_offers::offer::SignedOffer;
use flotilla_overlay::regions::{KeySpace, RegionError, Tier};
use libp2p::PeerId;
use rand::RngCore;

/// Settings of a discovery.
#[derive(Debug, Clone, Copy)]
pub struct DiscoveryConfig {
    /// Region probes before the super-trader fallback, in all (default 3).
    pub max_tries: u32,
    /// How many of them probe the request's own tier first (default 1). The others go
    /// on to the larger tiers, one probe each, nearest first, and back to the own tier
    /// when no larger one is left. `max_tries` or more: only the own tier, as before
    /// (a request is then served from a larger tier only through the fallback).
    pub own_tier_probes: u32,
    /// Where probes draw their keys: tier regions (default [`KeySpace::Regions`]) or
    /// anywhere ([`KeySpace::Whole`], the baseline).
    pub key_space: KeySpace,
    /// Whether the super-trader list is asked once probing found nothing (default
    /// `true`); without it such a discovery fails.
    pub fallback: bool,
    /// Time the whole discovery may take, in ms (default [`DEFAULT_BUDGET_MS`]): past it
    /// no more probes are made.
    pub budget_ms: u64,
}

/// Default time budget of one discovery, in ms.
pub const DEFAULT_BUDGET_MS: u64 = 10_000;

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            max_tries: 2,
            own_tier_probes: 1,
            key_space: KeySpace::Regions,
            fallback: true,
            budget_ms: DEFAULT_BUDGET_MS,
        }
    }
}

impl DiscoveryConfig {
    /// Probing only the request's own tier (the behaviour before larger tiers were
    /// probed; the simulator's comparison).
    pub fn own_tier_only(self) -> DiscoveryConfig {
        DiscoveryConfig {
            own_tier_probes: self.max_tries,
            ..self
        }
    }

    /// The tiers probed for a request of `tier`, in order (see
    /// [`DiscoveryConfig::own_tier_probes`]).
    pub fn probe_plan(&self, tier: Tier) -> Vec<Tier> {
        let total = self.max_tries as usize;
        let mut plan = vec![tier; (self.own_tier_probes as usize).min(total)];
        if self.key_space == KeySpace::Regions {
            let larger = Tier::all().filter(|t| t.mib() > tier.mib());
            plan.extend(larger.take(total - plan.len()));
        }
        plan.resize(total, tier);
        plan
    }
}

/// What the caller must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Find the peer closest to `key`; answer with [`Discovery::on_closest`].
    FindClosest {
        /// A random key in the probed tier's region (anywhere with [`KeySpace::Whole`]).
        key: Vec<u8>,
    },
    /// Ask `holder` for the offers of `tier` it holds with the request's memory free;
    /// answer with [`Discovery::on_offers`] or [`Discovery::on_holder_failed`].
    AskHolder {
        /// The peer closest to the probed key.
        holder: PeerId,
        /// The tier whose region was probed.
        tier: Tier,
    },
    /// Probing found nothing: answer with [`Discovery::on_fallback`] and the offers of
    /// the super-trader list that fit. Never with `fallback` off.
    Fallback,
    /// Finished; see [`Discovery::outcome`]. If reserving every offer found fails,
    /// [`Discovery::on_refused`] goes on.
    Done,
}

/// One probe of a region.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Probe {
    /// The tier whose region was probed, in MiB.
    #[serde(default)]
    pub tier_mib: u32,
    /// The peer found closest to the key, if any.
    pub holder: Option<String>,
    /// Offers it returned.
    pub offers_seen: usize,
    /// Of those, offers that fit the request.
    pub offers_fitting: usize,
}

/// How a discovery went.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// Memory requested, in MiB.
    pub request_mib: u32,
    /// The request's own tier (the first probed), in MiB.
    pub tier_mib: u32,
    /// The probes made, in order.
    pub probes: Vec<Probe>,
    /// Whether the super-trader list was used.
    pub used_fallback: bool,
    /// Messages sent: one per lookup and one per holder asked (a Kademlia lookup's own
    /// messages are counted by the caller).
    pub messages: u32,
    /// Time from start to the end, in ms.
    pub elapsed_ms: u64,
    /// Number of offers found that fit.
    pub found: usize,
    /// Whether the time budget ran out before the probes did.
    #[serde(default)]
    pub out_of_time: bool,
    /// Why nothing was found, when nothing was.
    pub failure: Option<String>,
}

/// One discovery in progress.
pub struct Discovery {
    request_mib: u32,
    tier: Tier,
    config: DiscoveryConfig,
    started_ms: u64,
    /// The tiers to probe, in order; `tries` of them are done.
    plan: Vec<Tier>,
    tries: usize,
    report: Report,
    found: Vec<SignedOffer>,
    excluded: Vec<PeerId>,
    done: bool,
}

/// Most offerers one discovery excludes (tried volunteers and refusals): beyond that the
/// oldest are forgotten.
pub const MAX_EXCLUDED: usize = 256;

impl Discovery {
    /// Starts a discovery for `request_bytes` of memory; fails if no tier is that large.
    pub fn start<R: RngCore + ?Sized>(
        now_ms: u64,
        request_bytes: u64,
        config: DiscoveryConfig,
        rng: &mut R,
    ) -> Result<(Discovery, Step), RegionError> {
        let tier = Tier::for_request(request_bytes)?;
        let request_mib =
            u32::try_from(request_bytes.div_ceil(1024 * 1024)).expect("at most the largest tier");
        let mut discovery = Discovery {
            request_mib,
            tier,
            config,
            started_ms: now_ms,
            plan: config.probe_plan(tier),
            tries: 0,
            report: Report {
                request_mib,
                tier_mib: tier.mib(),
                probes: Vec::new(),
                used_fallback: false,
                messages: 0,
                elapsed_ms: 0,
                found: 0,
                out_of_time: false,
                failure: None,
            },
            found: Vec::new(),
            excluded: Vec::new(),
            done: false,
        };
        let step = discovery.next_probe(now_ms, rng);
        Ok((discovery, step))
    }

    /// When the discovery's time budget runs out: the caller bounds every lookup and
    /// question by it, and reports one that ran past it with [`Discovery::on_timeout`].
    pub fn deadline_ms(&self) -> u64 {
        self.started_ms.saturating_add(self.config.budget_ms)
    }

    /// The step under way did not finish in time (the caller's per-step limit, or
    /// [`Discovery::deadline_ms`]): the next probe, or, past the deadline, no more probes
    /// (the fallback list, which is local, is still asked).
    pub fn on_timeout<R: RngCore + ?Sized>(&mut self, now_ms: u64, rng: &mut R) -> Step {
        if self.done {
            return Step::Done;
        }
        self.next_probe(now_ms, rng)
    }
    /// Never counts offers of these peers as found (volunteers that already failed the
    /// call).
    pub fn exclude(&mut self, peers: impl IntoIterator<Item = PeerId>) {
        for peer in peers {
            if !self.excluded.contains(&peer) {
                if self.excluded.len() == MAX_EXCLUDED {
                    self.excluded.remove(0);
                }
                self.excluded.push(peer);
            }
        }
    }

    /// Every offer found was refused at reservation (by these offerers, or they could not
    /// be reached): excludes them and goes on probing with the tries left, then the
    /// fallback. A discovery whose fallback answer was refused ends without offers.
    pub fn on_refused<R: RngCore + ?Sized>(
        &mut self,
        now_ms: u64,
        offerers: impl IntoIterator<Item = PeerId>,
        rng: &mut R,
    ) -> Step {
        if !self.done || self.found.is_empty() {
            return Step::Done;
        }
        self.exclude(offerers);
        self.found.clear();
        self.report.found = 0;
        if self.report.used_fallback {
            let failure = format!(
                "every offer with {} MiB free was refused at reservation",
                self.request_mib
            );
            return self.finish(now_ms, Vec::new(), Some(failure));
        }
        self.done = false;
        self.next_probe(now_ms, rng)
    }

    fn next_probe<R: RngCore + ?Sized>(&mut self, now_ms: u64, rng: &mut R) -> Step {
        if now_ms >= self.deadline_ms() && self.tries < self.plan.len() {
            self.report.out_of_time = true;
            self.tries = self.plan.len();
        }
        let Some(&tier) = self.plan.get(self.tries) else {
            return self.end_of_probes(now_ms);
        };
        self.tries += 1;
        self.report.messages += 1;
        self.report.probes.push(Probe {
            tier_mib: tier.mib(),
            holder: None,
            offers_seen: 0,
            offers_fitting: 0,
        });
        let (key, _) = self.config.key_space.random_key(tier, rng);
        Step::FindClosest { key }
    }

    /// Probing is over: the fallback list, or the end.
    fn end_of_probes(&mut self, now_ms: u64) -> Step {
        if !self.config.fallback {
            let failure = format!(
                "no offer with {} MiB free after {} probe(s) of {}{} (fallback off)",
                self.request_mib,
                self.report.probes.len(),
                self.probed(),
                self.out_of_time_note(),
            );
            return self.finish(now_ms, Vec::new(), Some(failure));
        }
        self.report.used_fallback = true;
        self.report.elapsed_ms = now_ms - self.started_ms;
        Step::Fallback
    }

    fn out_of_time_note(&self) -> String {
        if self.report.out_of_time {
            format!(", out of its {} ms budget", self.config.budget_ms)
        } else {
            String::new()
        }
    }

    /// The tier of the probe under way (or the last one made).
    fn probing(&self) -> Tier {
        self.tries
            .checked_sub(1)
            .and_then(|i| self.plan.get(i).copied())
            .unwrap_or(self.tier)
    }

    /// What the probes covered, for failure reasons.
    fn probed(&self) -> String {
        match self.config.key_space {
            KeySpace::Regions => {
                let largest = self.plan.iter().map(|t| t.mib()).max();
                match largest {
                    Some(mib) if mib > self.tier.mib() => {
                        format!("the {} to {mib} MiB regions", self.tier)
                    }
                    _ => format!("the {} region", self.tier),
                }
            }
            KeySpace::Whole => "the whole key space".to_string(),
        }
    }

    /// The closest peer to the last key (`None` if the lookup found nobody).
    pub fn on_closest<R: RngCore + ?Sized>(
        &mut self,
        now_ms: u64,
        holder: Option<PeerId>,
        rng: &mut R,
    ) -> Step {
        if self.done {
            return Step::Done;
        }
        if now_ms >= self.deadline_ms() {
            self.report.out_of_time = true;
            self.tries = self.plan.len();
            return self.end_of_probes(now_ms);
        }
        match holder {
            Some(holder) => {
                if let Some(probe) = self.report.probes.last_mut() {
                    probe.holder = Some(holder.to_string());
                }
                self.report.messages += 1;
                Step::AskHolder {
                    holder,
                    tier: self.probing(),
                }
            }
            None => self.next_probe(now_ms, rng),
        }
    }

    /// The offers the holder returned.
    pub fn on_offers<R: RngCore + ?Sized>(
        &mut self,
        now_ms: u64,
        offers: Vec<SignedOffer>,
        rng: &mut R,
    ) -> Step {
        if self.done {
            return Step::Done;
        }
        let seen = offers.len();
        let fitting = self.keep_fitting(now_ms, offers);
        if let Some(probe) = self.report.probes.last_mut() {
            probe.offers_seen = seen;
            probe.offers_fitting = fitting.len();
        }
        if fitting.is_empty() {
            return self.next_probe(now_ms, rng);
        }
        self.finish(now_ms, fitting, None)
    }

    /// The holder could not be asked (unreachable, timed out): counts as a probe.
    pub fn on_holder_failed<R: RngCore + ?Sized>(&mut self, now_ms: u64, rng: &mut R) -> Step {
        if self.done {
            return Step::Done;
        }
        self.next_probe(now_ms, rng)
    }

    /// The super-trader list's offers that fit.
    pub fn on_fallback(&mut self, now_ms: u64, offers: Vec<SignedOffer>) -> Step {
        if self.done {
            return Step::Done;
        }
        let fitting = self.keep_fitting(now_ms, offers);
        let failure = fitting.is_empty().then(|| {
            format!(
                "no offer with {} MiB free: {} probe(s) of {}{} and the fallback list found none",
                self.request_mib,
                self.report.probes.len(),
                self.probed(),
                self.out_of_time_note(),
            )
        });
        self.finish(now_ms, fitting, failure)
    }

    fn keep_fitting(&self, now_ms: u64, offers: Vec<SignedOffer>) -> Vec<SignedOffer> {
        offers
            .into_iter()
            .filter(|o| {
                !self.excluded.contains(&o.body.offerer)
                    && o.verify().is_ok()
                    && !o.body.withdrawn
                    && o.body.expires_at_ms > now_ms
                    && o.body.free_mib() >= self.request_mib
            })
            .collect()
    }

    fn finish(&mut self, now_ms: u64, found: Vec<SignedOffer>, failure: Option<String>) -> Step {
        self.done = true;
        self.report.elapsed_ms = now_ms - self.started_ms;
        self.report.found = found.len();
        self.report.failure = failure;
        self.found = found;
        Step::Done
    }

    /// The request's own tier, whose region is probed first.
    pub fn tier(&self) -> Tier {
        self.tier
    }

    /// The offerers this discovery leaves out (volunteers that failed the call, offers
    /// found stale).
    pub fn excluded(&self) -> &[PeerId] {
        &self.excluded
    }

    /// Memory requested, in MiB.
    pub fn request_mib(&self) -> u32 {
        self.request_mib
    }

    /// The report so far.
    pub fn report(&self) -> &Report {
        &self.report
    }

    /// Once done: the offers found (empty if none) and the report.
    pub fn outcome(&self) -> Option<(&[SignedOffer], &Report)> {
        self.done.then_some((self.found.as_slice(), &self.report))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::tests::offer;
    use crate::supertraders::{SuperTraderConfig, SuperTraders};
    use libp2p::identity::Keypair;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    const MIB: u64 = 1024 * 1024;

    fn key_of(step: &Step) -> Vec<u8> {
        match step {
            Step::FindClosest { key } => key.clone(),
            other => panic!("expected FindClosest, got {other:?}"),
        }
    }

    #[test]
    fn a_probe_that_finds_a_fitting_offer_ends_discovery() {
        let mut rng = StdRng::seed_from_u64(1);
        let (mut d, step) =
            Discovery::start(0, 300 * MIB, DiscoveryConfig::default(), &mut rng).unwrap();
        let key = key_of(&step);
        assert!(
            Tier::from_mib(512).unwrap().region().contains_key(&key),
            "smallest tier that fits"
        );
        let holder = PeerId::random();
        assert_eq!(
            d.on_closest(1, Some(holder), &mut rng),
            Step::AskHolder {
                holder,
                tier: Tier::from_mib(512).unwrap()
            }
        );
        let k = Keypair::generate_ed25519();
        let step = d.on_offers(
            2,
            vec![offer(&k, 1, 512, 300), offer(&k, 2, 512, 0)],
            &mut rng,
        );
        assert_eq!(step, Step::Done);
        let (found, report) = d.outcome().unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].body.offer_id, 2);
        assert_eq!(
            (report.probes.len(), report.used_fallback, report.messages),
            (1, false, 2)
        );
        assert_eq!(report.probes[0].offers_seen, 2);
        assert_eq!(report.elapsed_ms, 2);
    }

    #[test]
    fn after_max_tries_the_fallback_list_is_used() {
        let mut rng = StdRng::seed_from_u64(2);
        let config = DiscoveryConfig {
            max_tries: 3,
            own_tier_probes: u32::MAX,
            ..DiscoveryConfig::default()
        };
        let (mut d, mut step) = Discovery::start(0, 128 * MIB, config, &mut rng).unwrap();
        let mut keys = Vec::new();
        for t in 0..3 {
            keys.push(key_of(&step));
            // An empty holder, an unreachable one, then no holder at all.
            step = match t {
                0 => {
                    d.on_closest(t, Some(PeerId::random()), &mut rng);
                    d.on_offers(t, Vec::new(), &mut rng)
                }
                1 => {
                    d.on_closest(t, Some(PeerId::random()), &mut rng);
                    d.on_holder_failed(t, &mut rng)
                }
                _ => d.on_closest(t, None, &mut rng),
            };
        }
        assert_eq!(step, Step::Fallback);
        keys.dedup();
        assert_eq!(keys.len(), 3, "each probe draws a new key");

        // The fallback holds a larger tier's offer: served from a larger tier.
        let mut list = SuperTraders::new(SuperTraderConfig::default());
        let k = Keypair::generate_ed25519();
        list.notify(3, vec![offer(&k, 7, 2048, 0), offer(&k, 8, 256, 200)]);
        assert_eq!(
            d.on_fallback(
                4,
                list.fitting(4, d.request_mib(), &[], &mut StdRng::seed_from_u64(1))
            ),
            Step::Done
        );
        let (found, report) = d.outcome().unwrap();
        assert_eq!(
            found.iter().map(|o| o.body.offer_id).collect::<Vec<_>>(),
            [7]
        );
        assert!(report.used_fallback);
        assert_eq!(report.probes.len(), 3);
    }

    #[test]
    fn without_the_fallback_exhausted_probing_fails_with_a_reason() {
        let mut rng = StdRng::seed_from_u64(5);
        let config = DiscoveryConfig {
            max_tries: 2,
            key_space: KeySpace::Whole,
            fallback: false,
            ..DiscoveryConfig::default()
        };
        let (mut d, step) = Discovery::start(0, 200 * MIB, config, &mut rng).unwrap();
        let mut keys = vec![key_of(&step)];
        d.on_closest(1, Some(PeerId::random()), &mut rng);
        // A holder with only a smaller offer: nothing fits, so another key.
        let k = Keypair::generate_ed25519();
        let step = d.on_offers(2, vec![offer(&k, 1, 128, 0)], &mut rng);
        keys.push(key_of(&step));
        d.on_closest(3, Some(PeerId::random()), &mut rng);
        // The second holder fails: probing is exhausted and there is no Fallback step.
        assert_eq!(d.on_holder_failed(4, &mut rng), Step::Done);
        let (found, report) = d.outcome().unwrap();
        assert!(found.is_empty());
        assert!(!report.used_fallback);
        assert_eq!(report.probes.len(), 2);
        assert_eq!(report.elapsed_ms, 4);
        let failure = report.failure.as_deref().unwrap();
        assert_eq!(
            failure,
            "no offer with 200 MiB free after 2 probe(s) of the whole key space (fallback off)"
        );
        // Later answers change nothing.
        assert_eq!(d.on_fallback(5, vec![offer(&k, 2, 512, 0)]), Step::Done);
        assert!(d.outcome().unwrap().0.is_empty());

        // Whole-space probes land outside the request's region (in 40 draws, almost surely).
        let tier = Tier::from_mib(256).unwrap();
        for _ in 0..38 {
            keys.push(config.key_space.random_key(tier, &mut rng).0);
        }
        assert!(keys.iter().any(|key| !tier.region().contains_key(key)));
    }

    #[test]
    fn whole_space_probes_accept_larger_tiers_and_region_probes_keep_their_tier() {
        let mut rng = StdRng::seed_from_u64(6);
        let whole = DiscoveryConfig {
            key_space: KeySpace::Whole,
            fallback: false,
            ..DiscoveryConfig::default()
        };
        let (mut d, _) = Discovery::start(0, 200 * MIB, whole, &mut rng).unwrap();
        d.on_closest(0, Some(PeerId::random()), &mut rng);
        let k = Keypair::generate_ed25519();
        assert_eq!(
            d.on_offers(1, vec![offer(&k, 1, 1024, 0)], &mut rng),
            Step::Done
        );
        let (found, report) = d.outcome().unwrap();
        assert_eq!((found.len(), report.failure.as_deref()), (1, None));

        // Region probes draw keys only in the request's tier region.
        let (_, step) =
            Discovery::start(0, 200 * MIB, DiscoveryConfig::default(), &mut rng).unwrap();
        assert!(
            Tier::from_mib(256)
                .unwrap()
                .region()
                .contains_key(&key_of(&step))
        );
    }

    #[test]
    fn an_unsatisfiable_request_fails_with_a_reason() {
        let mut rng = StdRng::seed_from_u64(3);
        let config = DiscoveryConfig {
            max_tries: 1,
            own_tier_probes: u32::MAX,
            ..DiscoveryConfig::default()
        };
        let (mut d, _) = Discovery::start(0, 4000 * MIB, config, &mut rng).unwrap();
        assert_eq!(d.on_closest(0, None, &mut rng), Step::Fallback);
        d.on_fallback(1, Vec::new());
        let (found, report) = d.outcome().unwrap();
        assert!(found.is_empty());
        let failure = report.failure.as_deref().unwrap();
        assert!(failure.contains("no offer with 4000 MiB free"), "{failure}");
        assert!(Discovery::start(0, 10241 * MIB, config, &mut rng).is_err());
    }

    #[test]
    fn forged_and_expired_offers_do_not_count() {
        let mut rng = StdRng::seed_from_u64(4);
        let config = DiscoveryConfig {
            max_tries: 1,
            own_tier_probes: u32::MAX,
            ..DiscoveryConfig::default()
        };
        let (mut d, _) = Discovery::start(0, 128 * MIB, config, &mut rng).unwrap();
        d.on_closest(0, Some(PeerId::random()), &mut rng);
        let k = Keypair::generate_ed25519();
        let mut forged = offer(&k, 1, 128, 0);
        forged.body.offer_id = 2;
        let expired = offer(&k, 3, 128, 0);
        assert_eq!(
            d.on_offers(2_000_000, vec![forged, expired], &mut rng),
            Step::Fallback
        );
    }

    #[test]
    fn refused_offers_send_the_discovery_on_without_their_offerers() {
        let mut rng = StdRng::seed_from_u64(7);
        let config = DiscoveryConfig {
            max_tries: 2,
            own_tier_probes: u32::MAX,
            ..DiscoveryConfig::default()
        };
        let (mut d, _) = Discovery::start(0, 128 * MIB, config, &mut rng).unwrap();
        let taken = Keypair::generate_ed25519();
        let tried = Keypair::generate_ed25519();
        let free = Keypair::generate_ed25519();
        d.exclude([tried.public().to_peer_id()]);
        d.on_closest(1, Some(PeerId::random()), &mut rng);
        // The tried volunteer's offer does not count; the other one is found.
        let step = d.on_offers(
            2,
            vec![offer(&tried, 1, 128, 0), offer(&taken, 2, 128, 0)],
            &mut rng,
        );
        assert_eq!(step, Step::Done);
        assert_eq!(d.outcome().unwrap().0.len(), 1);

        // Its reservation is refused: the second probe goes on, and the same stale offer
        // met again no longer counts.
        let step = d.on_refused(3, [taken.public().to_peer_id()], &mut rng);
        assert!(matches!(step, Step::FindClosest { .. }), "{step:?}");
        assert!(d.outcome().is_none(), "not done while probing");
        d.on_closest(4, Some(PeerId::random()), &mut rng);
        assert_eq!(
            d.on_offers(5, vec![offer(&taken, 2, 128, 0)], &mut rng),
            Step::Fallback
        );
        // The fallback list still holds both stale offers and a free one.
        let fallback = vec![
            offer(&taken, 2, 128, 0),
            offer(&tried, 1, 128, 0),
            offer(&free, 3, 256, 0),
        ];
        assert_eq!(d.on_fallback(6, fallback), Step::Done);
        let (found, report) = d.outcome().unwrap();
        assert_eq!(
            found.iter().map(|o| o.body.offer_id).collect::<Vec<_>>(),
            [3]
        );
        assert_eq!((report.probes.len(), report.found), (2, 1));

        // Refused too: nothing is left to ask, and the failure says why.
        assert_eq!(
            d.on_refused(7, [free.public().to_peer_id()], &mut rng),
            Step::Done
        );
        let (found, report) = d.outcome().unwrap();
        assert!(found.is_empty());
        assert_eq!(
            report.failure.as_deref(),
            Some("every offer with 128 MiB free was refused at reservation")
        );
        // A refusal after the end changes nothing.
        assert_eq!(d.on_refused(8, [], &mut rng), Step::Done);
    }

    #[test]
    fn exclusions_are_bounded() {
        let mut rng = StdRng::seed_from_u64(8);
        let (mut d, _) =
            Discovery::start(0, 128 * MIB, DiscoveryConfig::default(), &mut rng).unwrap();
        let first = PeerId::random();
        d.exclude([first]);
        d.exclude((0..MAX_EXCLUDED).map(|_| PeerId::random()));
        assert_eq!(d.excluded.len(), MAX_EXCLUDED);
        assert!(!d.excluded.contains(&first), "the oldest is forgotten");
    }

    fn probe_keys_and_tiers(
        d: &mut Discovery,
        mut step: Step,
        rng: &mut StdRng,
        probes: usize,
    ) -> (Vec<Tier>, Step) {
        let mut asked = Vec::new();
        for t in 0..probes as u64 {
            let key = key_of(&step);
            let Step::AskHolder { tier, .. } = d.on_closest(t, Some(PeerId::random()), rng) else {
                panic!("a holder was found, so it is asked");
            };
            assert!(
                tier.region().contains_key(&key),
                "probe {t} drew its key in {tier}"
            );
            asked.push(tier);
            step = d.on_offers(t, Vec::new(), rng);
        }
        (asked, step)
    }

    #[test]
    fn a_small_request_goes_on_to_larger_tiers_nearest_first_before_the_fallback() {
        let mut rng = StdRng::seed_from_u64(9);
        let config = DiscoveryConfig {
            max_tries: 4,
            own_tier_probes: 2,
            ..DiscoveryConfig::default()
        };
        let tier = |mib| Tier::from_mib(mib).unwrap();
        assert_eq!(
            config.probe_plan(tier(128)),
            [tier(128), tier(128), tier(256), tier(512)]
        );
        // Past the largest tier, the probes left go back to the own tier.
        assert_eq!(
            config.probe_plan(tier(8192)),
            [tier(8192), tier(8192), Tier::LARGEST, tier(8192)]
        );
        assert_eq!(config.own_tier_only().probe_plan(tier(256)), [tier(256); 4]);
        let (mut d, step) = Discovery::start(0, 100 * MIB, config, &mut rng).unwrap();
        let (asked, step) = probe_keys_and_tiers(&mut d, step, &mut rng, 3);
        assert_eq!(asked, [tier(128), tier(128), tier(256)]);
        // The 512 MiB region's holder has a large offer, partly used: it serves 100 MiB.
        d.on_closest(3, Some(PeerId::random()), &mut rng);
        let _ = step;
        let k = Keypair::generate_ed25519();
        assert_eq!(
            d.on_offers(4, vec![offer(&k, 1, 512, 400)], &mut rng),
            Step::Done
        );
        let (found, report) = d.outcome().unwrap();
        assert_eq!(found.len(), 1);
        assert!(!report.used_fallback);
        let tiers: Vec<u32> = report.probes.iter().map(|p| p.tier_mib).collect();
        assert_eq!(tiers, [128, 128, 256, 512]);
        assert_eq!(report.tier_mib, 128);

        // With every region empty, the fallback comes after the larger tiers, and the
        // failure names what was probed.
        let (mut d, step) = Discovery::start(0, 100 * MIB, config, &mut rng).unwrap();
        let (_, step) = probe_keys_and_tiers(&mut d, step, &mut rng, 4);
        assert_eq!(step, Step::Fallback);
        d.on_fallback(5, Vec::new());
        let failure = d.outcome().unwrap().1.failure.clone().unwrap();
        assert!(
            failure.contains("4 probe(s) of the 128 MiB to 512 MiB regions"),
            "{failure}"
        );
    }

    #[test]
    fn the_time_budget_ends_probing_but_still_asks_the_fallback() {
        let mut rng = StdRng::seed_from_u64(10);
        let config = DiscoveryConfig {
            max_tries: 6,
            budget_ms: 1_000,
            ..DiscoveryConfig::default()
        };
        let (mut d, _) = Discovery::start(500, 128 * MIB, config, &mut rng).unwrap();
        assert_eq!(d.deadline_ms(), 1_500);
        // A slow first probe: its holder times out within the budget, so a second one.
        d.on_closest(900, Some(PeerId::random()), &mut rng);
        let step = d.on_timeout(1_400, &mut rng);
        assert!(matches!(step, Step::FindClosest { .. }), "{step:?}");
        // The lookup answers past the deadline: probing stops, the local list is asked.
        assert_eq!(
            d.on_closest(1_500, Some(PeerId::random()), &mut rng),
            Step::Fallback
        );
        assert_eq!(d.on_fallback(1_501, Vec::new()), Step::Done);
        let (_, report) = d.outcome().unwrap();
        assert!(report.out_of_time);
        assert_eq!(report.probes.len(), 2, "of the 6 planned");
        let failure = report.failure.as_deref().unwrap();
        assert!(failure.contains("out of its 1000 ms budget"), "{failure}");

        // Without the fallback, running out of time fails at once.
        let config = DiscoveryConfig {
            fallback: false,
            ..config
        };
        let (mut d, _) = Discovery::start(0, 128 * MIB, config, &mut rng).unwrap();
        assert_eq!(d.on_timeout(1_000, &mut rng), Step::Done);
        assert!(d.outcome().unwrap().0.is_empty());
    }
}
