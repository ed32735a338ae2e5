//! Placing one call: discovery, the ranked offers, reservations, the run, and retries on
//! another volunteer — every decision a scheduler makes for a call, in one machine.
//!
//! A [`Placer`] starts a [`Discovery`] and passes its steps through ([`Step::Discovery`]).
//! When it has found offers, they are ranked by the [`Policy`] and the first is tried
//! ([`Step::Run`]): the caller asks its offerer to reserve the call's memory and run the
//! call there, in one message. The offerer alone decides whether it has the memory, so a
//! stale offer is only refused ([`Placer::on_refused`]) and the next one is tried; when
//! none is left, the discovery goes on without their offerers. A volunteer that took the
//! call and failed it for its own reasons ([`Placer::on_failed`] with `retryable`) is
//! excluded and the call placed again with a fresh discovery, at most
//! [`PlacerConfig::max_attempts`] volunteers in all; a failure of the call itself (a
//! module that is not Wasm) ends the placement at once.
//!
//! A scheduler that heard a moment ago from an offerer that it has memory free (in the
//! answer to an earlier call, or its report) passes those offers to [`Placer::start`]:
//! they are tried before any discovery, so a warm call costs one exchange with the
//! volunteer. A refused one costs that exchange and the discovery goes on without it.
//!
//! Everything is bounded: offers asked to reserve ([`PlacerConfig::max_reservations`]),
//! volunteers tried, and time — the placement's own work (discoveries and reservation
//! attempts, not the runs themselves) must fit in [`PlacerConfig::budget_ms`], and each
//! discovery gets what is left of it.
//!
//! Time is passed in as Unix milliseconds; randomness as an `RngCore`.

use crate::discovery::{self, Discovery, DiscoveryConfig, Report};
use crate::placement::{Policy, rank};
use flotilla_offers::offer::SignedOffer;
use flotilla_overlay::regions::{RegionError, Tier};
use libp2p::PeerId;
use rand::RngCore;
use std::collections::VecDeque;

/// Settings of a placement.
#[derive(Debug, Clone, Copy)]
pub struct PlacerConfig {
    /// How each discovery probes.
    pub discovery: DiscoveryConfig,
    /// Which fitting offer is tried first.
    pub policy: Policy,
    /// Volunteers that may fail the call before the placement gives up (default 3).
    pub max_attempts: u32,
    /// Offers asked to reserve over the whole placement (default 16): stale or fake
    /// offers cost a message each, never an unbounded number.
    pub max_reservations: u32,
    /// Time the placement's own work may take in all, in ms (default 20 s); the runs on
    /// volunteers are bounded by the caller.
    pub budget_ms: u64,
}

impl Default for PlacerConfig {
    fn default() -> Self {
        PlacerConfig {
            discovery: DiscoveryConfig::default(),
            policy: Policy::BestFit,
            max_attempts: 3,
            max_reservations: 16,
            budget_ms: 20_000,
        }
    }
}

/// What the caller must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A step of the discovery under way (never [`discovery::Step::Done`]): answer with
    /// the matching `on_*` method of the placer.
    Discovery(discovery::Step),
    /// Ask the offerer of `offer` to reserve the call's memory on it and run the call
    /// there; answer with [`Placer::on_ran`], [`Placer::on_refused`] or
    /// [`Placer::on_failed`].
    Run {
        /// The offer to run on.
        offer: Box<SignedOffer>,
    },
    /// Finished; see [`Placer::outcome`].
    Done,
}

/// Why a call could not be placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlaceError {
    /// The request is impossible (more memory than the largest tier, say).
    #[error(transparent)]
    Request(#[from] RegionError),
    /// No offer fits now (retrying later may help).
    #[error("nothing fits: {0}")]
    NothingFits(String),
    /// The call itself failed (not retried elsewhere).
    #[error("{0}")]
    Call(String),
    /// Every volunteer tried failed.
    #[error("{0} volunteers failed to run the call")]
    VolunteersFailed(u32),
    /// The placement ran out of its time budget.
    #[error("no volunteer took the call within {0} ms")]
    OutOfTime(u64),
}

impl PlaceError {
    /// Whether trying again later might succeed, as opposed to a fault of the call.
    pub fn retryable(&self) -> bool {
        !matches!(self, PlaceError::Request(_) | PlaceError::Call(_))
    }
}

/// A volunteer that took the call and failed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedAttempt {
    /// The volunteer.
    pub volunteer: PeerId,
    /// What it said, or what went wrong reaching it.
    pub error: String,
}

/// How a placement ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The call ran on `volunteer`.
    Placed {
        /// The volunteer.
        volunteer: PeerId,
    },
    /// It could not be placed.
    Failed(PlaceError),
}

/// What a placement did, for reports and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    /// Discoveries started.
    pub discoveries: u32,
    /// Region probes over all discoveries.
    pub probes: u32,
    /// Messages of the discoveries (lookups and questions, as they count them) and one
    /// per offer asked to run the call.
    pub messages: u32,
    /// Discoveries that used the fallback list.
    pub fallbacks: u32,
    /// Offers asked to reserve and run the call.
    pub reservations: u32,
    /// Why offerers refused (at most four kept).
    pub refusals: Vec<String>,
    /// Volunteers that took the call and failed it.
    pub failed_attempts: Vec<FailedAttempt>,
}

/// Most refusal reasons kept for the report.
const MAX_REFUSALS_KEPT: usize = 4;

/// One call being placed.
pub struct Placer {
    config: PlacerConfig,
    request_bytes: u64,
    request_mib: u32,
    /// When the placement's own time runs out; pushed back by the time runs took.
    deadline_ms: u64,
    discovery: Option<Discovery>,
    /// The last discovery's report, for failure reasons.
    last_report: Option<Report>,
    ranked: VecDeque<SignedOffer>,
    /// Offerers that refused during the current discovery's ranked walk.
    refused_by: Vec<PeerId>,
    /// Volunteers that failed the call: never tried again.
    excluded: Vec<PeerId>,
    /// Offerers that refused before the first discovery: not counted by it.
    excluded_for_now: Vec<PeerId>,
    /// The offer being run on, and since when.
    running: Option<(SignedOffer, u64)>,
    tally: Tally,
    outcome: Option<Outcome>,
}

impl Placer {
    /// Starts placing a call of `request_bytes` of memory. `recent` are offers their
    /// offerers confirmed free a moment ago (in answers to earlier calls, or reports), as
    /// a super-trader list keeps them — its signatures checked when they arrived, so not
    /// again on every call: those that fit are tried first, before any discovery; the
    /// offerer still decides.
    pub fn start<R: RngCore + ?Sized>(
        now_ms: u64,
        request_bytes: u64,
        config: PlacerConfig,
        recent: Vec<SignedOffer>,
        rng: &mut R,
    ) -> Result<(Placer, Step), PlaceError> {
        let tier = Tier::for_request(request_bytes)?;
        let request_mib = u32::try_from(request_bytes.div_ceil(1024 * 1024))
            .unwrap_or(tier.mib())
            .min(tier.mib());
        let mut placer = Placer {
            config,
            request_bytes,
            request_mib,
            deadline_ms: now_ms.saturating_add(config.budget_ms),
            discovery: None,
            last_report: None,
            ranked: VecDeque::new(),
            refused_by: Vec::new(),
            excluded: Vec::new(),
            excluded_for_now: Vec::new(),
            running: None,
            tally: Tally::default(),
            outcome: None,
        };
        placer.ranked = rank(&recent, request_mib, config.policy, rng)
            .into_iter()
            .filter(|o| !o.body.withdrawn && o.body.expires_at_ms > now_ms)
            .cloned()
            .collect();
        let step = match placer.ranked.is_empty() {
            true => placer.new_discovery(now_ms, rng),
            false => placer.next_offer(now_ms, rng),
        };
        Ok((placer, step))
    }

    /// Memory asked for, in MiB.
    pub fn request_mib(&self) -> u32 {
        self.request_mib
    }

    /// When the placement's own time runs out (the caller bounds each discovery step
    /// by it, through the discovery's own deadline).
    pub fn deadline_ms(&self) -> u64 {
        self.deadline_ms
    }

    /// The discovery under way, for its deadline and request.
    pub fn discovery(&self) -> Option<&Discovery> {
        self.discovery.as_ref()
    }

    /// What the placement did so far.
    pub fn tally(&self) -> &Tally {
        &self.tally
    }

    /// The outcome, once done.
    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }

    fn finish(&mut self, outcome: Outcome) -> Step {
        if let Some(discovery) = self.discovery.take() {
            self.count(&discovery);
        }
        self.outcome = Some(outcome);
        Step::Done
    }

    fn fail(&mut self, error: PlaceError) -> Step {
        self.finish(Outcome::Failed(error))
    }

    fn count(&mut self, discovery: &Discovery) {
        let report = discovery.report();
        self.tally.discoveries += 1;
        self.tally.probes += report.probes.len() as u32;
        self.tally.messages += report.messages;
        self.tally.fallbacks += u32::from(report.used_fallback);
        self.last_report = Some(report.clone());
    }

    fn new_discovery<R: RngCore + ?Sized>(&mut self, now_ms: u64, rng: &mut R) -> Step {
        if let Some(old) = self.discovery.take() {
            self.count(&old);
        }
        let left = self.deadline_ms.saturating_sub(now_ms);
        if left == 0 {
            return self.fail(PlaceError::OutOfTime(self.config.budget_ms));
        }
        let config = DiscoveryConfig {
            budget_ms: self.config.discovery.budget_ms.min(left),
            ..self.config.discovery
        };
        let (mut discovery, step) = match Discovery::start(now_ms, self.request_bytes, config, rng)
        {
            Ok(started) => started,
            Err(e) => return self.fail(e.into()),
        };
        discovery.exclude(self.excluded.iter().copied());
        discovery.exclude(std::mem::take(&mut self.excluded_for_now));
        self.refused_by.clear();
        self.discovery = Some(discovery);
        self.after_discovery_step(now_ms, step, rng)
    }

    /// Turns a discovery step into the placement's.
    fn after_discovery_step<R: RngCore + ?Sized>(
        &mut self,
        now_ms: u64,
        step: discovery::Step,
        rng: &mut R,
    ) -> Step {
        if step != discovery::Step::Done {
            return Step::Discovery(step);
        }
        let Some(discovery) = &self.discovery else {
            return Step::Done;
        };
        let (found, report) = discovery.outcome().expect("the discovery is done");
        if found.is_empty() {
            let why = report
                .failure
                .clone()
                .unwrap_or_else(|| format!("no offer with {} MiB free", self.request_mib));
            let why = match self.tally.refusals.is_empty() {
                true => why,
                false => format!(
                    "{why}; reservations refused: {}",
                    self.tally.refusals.join("; ")
                ),
            };
            return self.fail(PlaceError::NothingFits(why));
        }
        self.ranked = rank(found, self.request_mib, self.config.policy, rng)
            .into_iter()
            .cloned()
            .collect();
        self.next_offer(now_ms, rng)
    }

    /// Tries the next ranked offer, or, with none left, sends the discovery on without
    /// the offerers that refused.
    fn next_offer<R: RngCore + ?Sized>(&mut self, now_ms: u64, rng: &mut R) -> Step {
        if now_ms >= self.deadline_ms {
            return self.fail(PlaceError::OutOfTime(self.config.budget_ms));
        }
        if self.tally.reservations >= self.config.max_reservations {
            return self.fail(PlaceError::NothingFits(format!(
                "{} offers asked, every one refused: {}",
                self.tally.reservations,
                self.tally.refusals.join("; ")
            )));
        }
        if let Some(offer) = self.ranked.pop_front() {
            self.tally.reservations += 1;
            self.tally.messages += 1;
            self.running = Some((offer.clone(), now_ms));
            return Step::Run {
                offer: Box::new(offer),
            };
        }
        let refused = std::mem::take(&mut self.refused_by);
        let Some(discovery) = self.discovery.as_mut() else {
            // The recent offers were all refused: discover, without their offerers.
            self.excluded_for_now = refused;
            return self.new_discovery(now_ms, rng);
        };
        let step = discovery.on_refused(now_ms, refused, rng);
        self.after_discovery_step(now_ms, step, rng)
    }

    fn with_discovery<R: RngCore + ?Sized>(
        &mut self,
        now_ms: u64,
        rng: &mut R,
        feed: impl FnOnce(&mut Discovery, &mut R) -> discovery::Step,
    ) -> Step {
        if self.outcome.is_some() || self.running.is_some() {
            return self.current();
        }
        let Some(discovery) = self.discovery.as_mut() else {
            return Step::Done;
        };
        let step = feed(discovery, rng);
        self.after_discovery_step(now_ms, step, rng)
    }

    /// What is awaited now (for stray answers, which change nothing).
    fn current(&self) -> Step {
        match (&self.outcome, &self.running) {
            (Some(_), _) => Step::Done,
            (None, Some((offer, _))) => Step::Run {
                offer: Box::new(offer.clone()),
            },
            (None, None) => Step::Done,
        }
    }

    /// See [`Discovery::on_closest`].
    pub fn on_closest<R: RngCore + ?Sized>(
        &mut self,
        now_ms: u64,
        holder: Option<PeerId>,
        rng: &mut R,
    ) -> Step {
        self.with_discovery(now_ms, rng, |d, rng| d.on_closest(now_ms, holder, rng))
    }

    /// See [`Discovery::on_offers`].
    pub fn on_offers<R: RngCore + ?Sized>(
        &mut self,
        now_ms: u64,
        offers: Vec<SignedOffer>,
        rng: &mut R,
    ) -> Step {
        self.with_discovery(now_ms, rng, |d, rng| d.on_offers(now_ms, offers, rng))
    }

    /// See [`Discovery::on_holder_failed`].
    pub fn on_holder_failed<R: RngCore + ?Sized>(&mut self, now_ms: u64, rng: &mut R) -> Step {
        self.with_discovery(now_ms, rng, |d, rng| d.on_holder_failed(now_ms, rng))
    }

    /// See [`Discovery::on_timeout`].
    pub fn on_timeout<R: RngCore + ?Sized>(&mut self, now_ms: u64, rng: &mut R) -> Step {
        self.with_discovery(now_ms, rng, |d, rng| d.on_timeout(now_ms, rng))
    }

    /// See [`Discovery::on_fallback`].
    pub fn on_fallback<R: RngCore + ?Sized>(
        &mut self,
        now_ms: u64,
        offers: Vec<SignedOffer>,
        rng: &mut R,
    ) -> Step {
        self.with_discovery(now_ms, rng, |d, _| d.on_fallback(now_ms, offers))
    }

    /// Ends the run under way; returns the offer it was on. The time of a call the
    /// volunteer took (`took_it`) does not count against the placement's budget; that of
    /// a refusal does.
    fn end_run(&mut self, now_ms: u64, took_it: bool) -> Option<SignedOffer> {
        let (offer, since) = self.running.take()?;
        if took_it {
            self.deadline_ms = self
                .deadline_ms
                .saturating_add(now_ms.saturating_sub(since));
        }
        Some(offer)
    }

    /// The call ran on the offer asked (whatever its exit status): placed.
    pub fn on_ran(&mut self, now_ms: u64) -> Step {
        let Some(offer) = self.end_run(now_ms, true) else {
            return self.current();
        };
        self.finish(Outcome::Placed {
            volunteer: offer.body.offerer,
        })
    }

    /// The offerer did not reserve (its offer was stale, it is busy, or it could not be
    /// reached before it took the call): the next offer.
    pub fn on_refused<R: RngCore + ?Sized>(
        &mut self,
        now_ms: u64,
        reason: String,
        rng: &mut R,
    ) -> Step {
        let Some(offer) = self.end_run(now_ms, false) else {
            return self.current();
        };
        if self.tally.refusals.len() < MAX_REFUSALS_KEPT {
            self.tally.refusals.push(reason);
        }
        self.refused_by.push(offer.body.offerer);
        self.next_offer(now_ms, rng)
    }

    /// The volunteer took the call and it failed: a fault of the call (`retryable`
    /// false) ends the placement; the volunteer's own (it crashed, timed out, vanished)
    /// excludes it and places the call again, while attempts are left.
    pub fn on_failed<R: RngCore + ?Sized>(
        &mut self,
        now_ms: u64,
        reason: String,
        retryable: bool,
        rng: &mut R,
    ) -> Step {
        let Some(offer) = self.end_run(now_ms, true) else {
            return self.current();
        };
        if !retryable {
            return self.fail(PlaceError::Call(reason));
        }
        let volunteer = offer.body.offerer;
        self.tally.failed_attempts.push(FailedAttempt {
            volunteer,
            error: reason,
        });
        if !self.excluded.contains(&volunteer) {
            self.excluded.push(volunteer);
        }
        let attempts = self.tally.failed_attempts.len() as u32;
        if attempts >= self.config.max_attempts {
            return self.fail(PlaceError::VolunteersFailed(attempts));
        }
        self.new_discovery(now_ms, rng)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::tests::offer;
    use libp2p::identity::Keypair;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    const MIB: u64 = 1024 * 1024;

    /// Answers every discovery step: lookups find a holder, holders hold `held`, the
    /// fallback list holds `fallback`; returns the first non-discovery step.
    fn discover(
        p: &mut Placer,
        mut step: Step,
        now: &mut u64,
        held: &[SignedOffer],
        fallback: &[SignedOffer],
        rng: &mut StdRng,
    ) -> Step {
        while let Step::Discovery(d) = step {
            *now += 1;
            step = match d {
                discovery::Step::FindClosest { .. } => {
                    p.on_closest(*now, Some(PeerId::random()), rng)
                }
                discovery::Step::AskHolder { .. } => p.on_offers(*now, held.to_vec(), rng),
                discovery::Step::Fallback => p.on_fallback(*now, fallback.to_vec(), rng),
                discovery::Step::Done => unreachable!("never passed through"),
            };
        }
        step
    }

    fn run_offer(step: &Step) -> &SignedOffer {
        match step {
            Step::Run { offer } => offer,
            other => panic!("expected Run, got {other:?}"),
        }
    }

    #[test]
    fn the_best_fit_is_run_and_a_stale_one_passes_to_the_next() {
        let mut rng = StdRng::seed_from_u64(1);
        let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let held = [offer(&a, 1, 256, 0), offer(&b, 2, 256, 100)];
        let (mut p, step) =
            Placer::start(0, 128 * MIB, PlacerConfig::default(), Vec::new(), &mut rng).unwrap();
        let mut now = 0;
        let step = discover(&mut p, step, &mut now, &held, &[], &mut rng);
        // Best fit: the one with less free first.
        assert_eq!(run_offer(&step).body.offer_id, 2);
        let step = p.on_refused(now + 1, "offer 2 has 0 MiB free".into(), &mut rng);
        assert_eq!(run_offer(&step).body.offer_id, 1);
        assert_eq!(p.on_ran(now + 50), Step::Done);
        assert_eq!(
            p.outcome(),
            Some(&Outcome::Placed {
                volunteer: a.public().to_peer_id()
            })
        );
        let tally = p.tally();
        assert_eq!((tally.discoveries, tally.reservations), (1, 2));
        assert_eq!(tally.refusals, ["offer 2 has 0 MiB free"]);
    }

    #[test]
    fn a_failing_volunteer_is_excluded_and_the_call_placed_again_up_to_the_limit() {
        let mut rng = StdRng::seed_from_u64(2);
        let keys: Vec<Keypair> = (0..3).map(|_| Keypair::generate_ed25519()).collect();
        let held: Vec<SignedOffer> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| offer(k, i as u64, 512, 0))
            .collect();
        let config = PlacerConfig {
            max_attempts: 2,
            ..PlacerConfig::default()
        };
        let (mut p, step) = Placer::start(0, 300 * MIB, config, Vec::new(), &mut rng).unwrap();
        let mut now = 0;
        let step = discover(&mut p, step, &mut now, &held, &[], &mut rng);
        let first = run_offer(&step).body.offerer;
        let step = p.on_failed(now, "the volunteer vanished".into(), true, &mut rng);
        let step = discover(&mut p, step, &mut now, &held, &[], &mut rng);
        let second = run_offer(&step).body.offerer;
        assert_ne!(first, second, "a failed volunteer is not tried again");
        assert_eq!(p.tally().discoveries, 1, "the second is under way");
        assert_eq!(
            p.on_failed(now, "crashed".into(), true, &mut rng),
            Step::Done
        );
        assert_eq!(
            p.outcome(),
            Some(&Outcome::Failed(PlaceError::VolunteersFailed(2)))
        );
        assert_eq!(p.tally().failed_attempts.len(), 2);
        assert!(PlaceError::VolunteersFailed(2).retryable());
    }

    #[test]
    fn a_fault_of_the_call_ends_the_placement_at_once() {
        let mut rng = StdRng::seed_from_u64(3);
        let k = Keypair::generate_ed25519();
        let (mut p, step) =
            Placer::start(0, 128 * MIB, PlacerConfig::default(), Vec::new(), &mut rng).unwrap();
        let mut now = 0;
        let step = discover(
            &mut p,
            step,
            &mut now,
            &[offer(&k, 1, 128, 0)],
            &[],
            &mut rng,
        );
        run_offer(&step);
        let step = p.on_failed(now, "the module is not Wasm".into(), false, &mut rng);
        assert_eq!(step, Step::Done);
        let Some(Outcome::Failed(e)) = p.outcome() else {
            panic!("failed")
        };
        assert_eq!(e, &PlaceError::Call("the module is not Wasm".into()));
        assert!(!e.retryable());
    }

    #[test]
    fn nothing_found_fails_with_the_discoverys_reason_and_the_refusals() {
        let mut rng = StdRng::seed_from_u64(4);
        let k = Keypair::generate_ed25519();
        let (mut p, step) =
            Placer::start(0, 128 * MIB, PlacerConfig::default(), Vec::new(), &mut rng).unwrap();
        let mut now = 0;
        // Only the fallback has an offer, and its offerer refuses: nothing is left.
        let fallback = [offer(&k, 1, 128, 0)];
        let step = discover(&mut p, step, &mut now, &[], &fallback, &mut rng);
        run_offer(&step);
        let step = p.on_refused(now, "busy".into(), &mut rng);
        assert_eq!(step, Step::Done);
        let Some(Outcome::Failed(PlaceError::NothingFits(why))) = p.outcome() else {
            panic!("nothing fits")
        };
        assert!(why.contains("reservations refused: busy"), "{why}");
        let max_tries = crate::discovery::DiscoveryConfig::default().max_tries;
        assert_eq!(p.tally().probes, max_tries);
    }

    #[test]
    fn reservations_and_time_are_bounded() {
        let mut rng = StdRng::seed_from_u64(5);
        // Sixty stale offers, every one refused: at most max_reservations are asked.
        let stale: Vec<SignedOffer> = (0..60)
            .map(|i| offer(&Keypair::generate_ed25519(), i, 128, 0))
            .collect();
        let config = PlacerConfig {
            max_reservations: 5,
            ..PlacerConfig::default()
        };
        let (mut p, step) = Placer::start(0, 128 * MIB, config, Vec::new(), &mut rng).unwrap();
        let mut now = 0;
        let mut step = discover(&mut p, step, &mut now, &stale, &stale, &mut rng);
        let mut asked = 0;
        while let Step::Run { .. } = step {
            asked += 1;
            step = p.on_refused(now, "stale".into(), &mut rng);
            step = discover(&mut p, step, &mut now, &stale, &stale, &mut rng);
        }
        assert_eq!(asked, 5);
        assert!(matches!(
            p.outcome(),
            Some(Outcome::Failed(PlaceError::NothingFits(_)))
        ));

        // A placement whose offerers answer slowly runs out of its budget; the time a
        // run takes does not count.
        let config = PlacerConfig {
            budget_ms: 1_000,
            ..PlacerConfig::default()
        };
        let held: Vec<SignedOffer> = (0..4)
            .map(|i| offer(&Keypair::generate_ed25519(), i, 128, 0))
            .collect();
        let (mut p, step) = Placer::start(0, 128 * MIB, config, Vec::new(), &mut rng).unwrap();
        let mut now = 0;
        let step = discover(&mut p, step, &mut now, &held, &[], &mut rng);
        run_offer(&step);
        // A run of a minute that fails for the volunteer: the budget is pushed back.
        now += 60_000;
        let step = p.on_failed(now, "vanished".into(), true, &mut rng);
        assert!(matches!(step, Step::Discovery(_)), "{step:?}");
        assert_eq!(p.deadline_ms(), 61_000);
        // A refusal that took 2 s exceeds what is left.
        let step = discover(&mut p, step, &mut now, &held, &[], &mut rng);
        run_offer(&step);
        assert!(p.on_refused(now + 2_000, "slow".into(), &mut rng) == Step::Done);
        assert_eq!(
            p.outcome(),
            Some(&Outcome::Failed(PlaceError::OutOfTime(1_000)))
        );
    }

    #[test]
    fn an_impossible_request_is_refused_at_the_start() {
        let mut rng = StdRng::seed_from_u64(6);
        assert!(matches!(
            Placer::start(
                0,
                20_000 * MIB,
                PlacerConfig::default(),
                Vec::new(),
                &mut rng
            ),
            Err(PlaceError::Request(_))
        ));
    }

    #[test]
    fn offers_confirmed_a_moment_ago_are_tried_before_any_discovery() {
        let mut rng = StdRng::seed_from_u64(7);
        let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let recent = vec![offer(&a, 1, 512, 0), offer(&b, 2, 128, 100)];
        let (mut p, step) = Placer::start(
            0,
            200 * MIB,
            PlacerConfig::default(),
            recent.clone(),
            &mut rng,
        )
        .unwrap();
        // b's has too little free; a's is run at once, with no probe.
        assert_eq!(run_offer(&step).body.offer_id, 1);
        assert_eq!(p.on_ran(5), Step::Done);
        assert_eq!((p.tally().discoveries, p.tally().probes), (0, 0));

        // Refused: a discovery follows, which no longer counts a's offer.
        let (mut p, step) = Placer::start(
            0,
            200 * MIB,
            PlacerConfig::default(),
            recent.clone(),
            &mut rng,
        )
        .unwrap();
        run_offer(&step);
        let step = p.on_refused(1, "taken meanwhile".into(), &mut rng);
        assert!(matches!(step, Step::Discovery(_)), "{step:?}");
        let mut now = 1;
        let step = discover(&mut p, step, &mut now, &recent, &[], &mut rng);
        assert_eq!(step, Step::Done, "a's offer, refused, is not asked again");
        assert_eq!(p.tally().reservations, 1);
    }
}
