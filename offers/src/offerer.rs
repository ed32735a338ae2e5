//! The offerer side (offers sent): Algorithm 1 of FaaS@Edge, with refresh, republish and
//! withdrawal.
//!
//! The volunteer's memory is sliced into offers ("virtual nodes"), largest tiers first.
//! For each offer the machine picks a random key in its tier's region (anywhere, with
//! [`KeySpace::Whole`], the research baseline) and asks the caller to find the closest peer ([`Action::FindHolder`]); it then signs the offer and asks the
//! caller to send it there ([`Action::Send`]). A delivered offer is refreshed — a new
//! version with a later expiry, to the same holder — before it expires. A holder that does
//! not confirm in time, or a failed delivery, sends the offer to a fresh random key, so a
//! holder that left is replaced within one refresh interval. [`Offerer::withdraw_all`]
//! sends signed withdrawals when the node stops.
//!
//! Reservations are kept in the machine's [`Ledger`] (owners, holds, runs at most once);
//! the offerer counts their memory per offer. A holder's copy is a hint for discovery,
//! not a promise (the offerer alone decides each reservation), so it is updated
//! [`OffererConfig::holder_update_delay_ms`] after the first change rather than at each:
//! a call that reserves and gives back within that time costs its holder nothing, and a
//! busy offer sends its holder at most one version per delay. A new version is signed
//! only when someone is to get it: the holder, a scheduler told what is free, or the
//! scheduler a reservation or a call answers ([`Offerer::current`]). Schedulers are told
//! what is free ([`Offerer::poll_report`]) as soon as an offer is published or its free
//! memory changes (at most every [`OffererConfig::report_gap_ms`]), and every
//! [`OffererConfig::notify_interval_ms`] otherwise.
//!
//! Time is passed in as Unix milliseconds; randomness as an `RngCore`.

use crate::ledger::{
    AdmitError, Ledger, LedgerConfig, ReleaseError, Reservation, RunKey, StartError,
};
use crate::offer::{OfferBody, OfferError, SignedOffer};
use flotilla_overlay::regions::{KeySpace, Tier};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use rand::RngCore;

/// Settings of an offerer.
#[derive(Debug, Clone)]
pub struct OffererConfig {
    /// Memory lent in all, in MiB.
    pub memory_mib: u64,
    /// Addresses put in the offers.
    pub addresses: Vec<Multiaddr>,
    /// How long a published offer lasts, in ms (default 60 s).
    pub ttl_ms: u64,
    /// How long before expiry an offer is refreshed, in ms (default 20 s).
    pub refresh_margin_ms: u64,
    /// How long a holder lookup or a delivery may take before trying elsewhere, in ms
    /// (default 5 s).
    pub answer_timeout_ms: u64,
    /// How the memory is cut into offers (default [`Slicing::Largest`]).
    pub slicing: Slicing,
    /// Where offers are published: a random key in their tier's region (default
    /// [`KeySpace::Regions`]) or anywhere ([`KeySpace::Whole`], the baseline). Holders
    /// must use the same.
    pub key_space: KeySpace,
    /// How often schedulers are told what is free when nothing changed, in ms (default
    /// 10 s).
    pub notify_interval_ms: u64,
    /// Shortest time between two reports, in ms (default 200 ms): changes in between
    /// are told together.
    pub report_gap_ms: u64,
    /// How long after its first change an offer's holder gets the new version (or a
    /// withdrawal, once nothing is free), in ms (default 250 ms): changes in between go
    /// together, and none if they cancel out. Until then probes may find memory that is
    /// taken; the offerer refuses such reservations and the scheduler tries elsewhere.
    pub holder_update_delay_ms: u64,
    /// Limits of the reservations.
    pub ledger: LedgerConfig,
}

/// How a volunteer's memory is cut into offers ("virtual nodes").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Slicing {
    /// The largest tier that fits, again and again: 3000 MiB → 2048, 512, 256, 128. Every
    /// volunteer can serve requests up to its whole memory, but small tiers get few offers.
    #[default]
    Largest,
    /// The largest tier within half of what is left (all of it below 256 MiB): 2048 MiB →
    /// 1024, 512, 256, 128, 128. Offers in every tier below a volunteer's memory, at the
    /// cost of its largest offer being at most half of it.
    Halving,
}

impl std::str::FromStr for Slicing {
    type Err = String;

    fn from_str(s: &str) -> Result<Slicing, String> {
        match s {
            "largest" => Ok(Slicing::Largest),
            "halving" => Ok(Slicing::Halving),
            other => Err(format!("unknown slicing '{other}' (largest, halving)")),
        }
    }
}

impl OffererConfig {
    /// Default timings for `memory_mib` MiB offered at `addresses`.
    pub fn new(memory_mib: u64, addresses: Vec<Multiaddr>) -> OffererConfig {
        OffererConfig {
            memory_mib,
            addresses,
            ttl_ms: 60_000,
            refresh_margin_ms: 20_000,
            answer_timeout_ms: 5_000,
            slicing: Slicing::Largest,
            key_space: KeySpace::Regions,
            notify_interval_ms: 10_000,
            report_gap_ms: 200,
            holder_update_delay_ms: 250,
            ledger: LedgerConfig::default(),
        }
    }
}

/// What the caller must do for the offerer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Find the peer closest to `key` (a Kademlia lookup) and report it with
    /// [`Event::HolderFound`] or [`Event::NoHolder`].
    FindHolder {
        /// The offer concerned.
        offer_id: u64,
        /// The key: inside the offer's tier region, or anywhere with [`KeySpace::Whole`].
        key: Vec<u8>,
    },
    /// Send `offer` to `holder` under `key` and report [`Event::Delivered`] or
    /// [`Event::DeliveryFailed`] (withdrawals need no report).
    Send {
        /// The offer concerned.
        offer_id: u64,
        /// The peer to send it to.
        holder: PeerId,
        /// The key it is published under.
        key: Vec<u8>,
        /// The signed offer (or withdrawal).
        offer: Box<SignedOffer>,
    },
}

/// What the caller reports back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The closest peer to the offer's key.
    HolderFound {
        /// The offer concerned.
        offer_id: u64,
        /// The closest peer.
        holder: PeerId,
    },
    /// No peer could be found.
    NoHolder {
        /// The offer concerned.
        offer_id: u64,
    },
    /// The holder accepted the offer.
    Delivered {
        /// The offer concerned.
        offer_id: u64,
        /// The holder.
        holder: PeerId,
    },
    /// The holder could not be reached or refused the offer.
    DeliveryFailed {
        /// The offer concerned.
        offer_id: u64,
        /// The holder.
        holder: PeerId,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Needs a new key and holder.
    Idle,
    Finding {
        key: Vec<u8>,
        since: u64,
    },
    Sending {
        key: Vec<u8>,
        holder: PeerId,
        since: u64,
        expires_at_ms: u64,
    },
    Published {
        key: Vec<u8>,
        holder: PeerId,
        expires_at_ms: u64,
    },
    /// All its memory is reserved: withdrawn from its holder until some is released, when
    /// a new version goes to the same holder under the same key (after the update delay).
    Full {
        key: Vec<u8>,
        holder: PeerId,
        expires_at_ms: u64,
    },
    Withdrawn,
}

/// One offer this node makes.
#[derive(Debug, Clone)]
struct Slot {
    offer_id: u64,
    tier: Tier,
    memory_mib: u32,
    in_use_mib: u32,
    seq: u64,
    state: State,
    /// The version last signed (for its holder, a scheduler, or a withdrawal).
    latest: Option<SignedOffer>,
    /// Memory in use in the version its holder last got (`None`: a withdrawal, or none).
    at_holder_in_use: Option<u32>,
    /// When its memory in use first changed since its holder last heard.
    changed_since: Option<u64>,
}

/// Why a reservation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReserveError {
    /// No such offer (or it was withdrawn).
    #[error("no offer {0} here")]
    UnknownOffer(u64),
    /// The offer has less memory free than asked for.
    #[error("offer {offer_id} has {free_mib} MiB free, {requested_mib} MiB asked")]
    NotEnoughMemory {
        /// The offer.
        offer_id: u64,
        /// Memory free on it.
        free_mib: u32,
        /// Memory asked for.
        requested_mib: u32,
    },
    /// The ledger did not admit it (full, or the id is taken).
    #[error(transparent)]
    Admit(#[from] AdmitError),
}

/// Where one offer stands, for `flotilla offers`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SentOffer {
    /// The offer's id.
    pub offer_id: u64,
    /// Its tier, in MiB.
    pub tier_mib: u32,
    /// Memory it lends, in MiB.
    pub memory_mib: u32,
    /// Its latest sequence number.
    pub seq: u64,
    /// Its holder, once known.
    pub holder: Option<String>,
    /// When it expires, once published.
    pub expires_at_ms: Option<u64>,
    /// Memory reserved on it, in MiB.
    pub in_use_mib: u32,
    /// `idle`, `finding`, `sending`, `published`, `full` or `withdrawn`.
    pub state: &'static str,
}

/// The offers a volunteer makes.
pub struct Offerer {
    keypair: Keypair,
    config: OffererConfig,
    slots: Vec<Slot>,
    ledger: Ledger,
    /// Something schedulers should hear of changed since the last report.
    report_due: bool,
    /// When the last report was handed out.
    last_report_ms: Option<u64>,
    /// The offers (id, sequence number) the last report told.
    last_reported: Vec<(u64, u64)>,
}

/// Cuts `memory_mib` into offers, largest first; what is left below the smallest tier is
/// not offered.
pub fn slice(memory_mib: u64, slicing: Slicing) -> Vec<Tier> {
    let mut left = memory_mib;
    let mut tiers = Vec::new();
    let budget = |left: u64| match slicing {
        Slicing::Halving if left >= 256 => left / 2,
        _ => left,
    };
    while let Some(tier) = Tier::largest_within(budget(left)) {
        tiers.push(tier);
        left -= u64::from(tier.mib());
    }
    tiers
}

impl Offerer {
    /// An offerer for `config.memory_mib` MiB; offer ids start at `first_offer_id` (pick
    /// it at random, so ids do not repeat across restarts).
    pub fn new(keypair: Keypair, config: OffererConfig, first_offer_id: u64) -> Offerer {
        let slots = slice(config.memory_mib, config.slicing)
            .into_iter()
            .enumerate()
            .map(|(i, tier)| Slot {
                offer_id: first_offer_id.wrapping_add(i as u64),
                tier,
                memory_mib: tier.mib(),
                in_use_mib: 0,
                seq: 0,
                state: State::Idle,
                latest: None,
                at_holder_in_use: None,
                changed_since: None,
            })
            .collect();
        Offerer {
            keypair,
            ledger: Ledger::new(config.ledger),
            config,
            slots,
            report_due: false,
            last_report_ms: None,
            last_reported: Vec::new(),
        }
    }

    /// Its settings.
    pub fn config(&self) -> &OffererConfig {
        &self.config
    }

    fn sign(
        &self,
        slot: &Slot,
        expires_at_ms: u64,
        withdrawn: bool,
    ) -> Result<SignedOffer, OfferError> {
        let body = OfferBody {
            offerer: self.keypair.public().to_peer_id(),
            addresses: self.config.addresses.clone(),
            tier: slot.tier,
            memory_mib: slot.memory_mib,
            in_use_mib: slot.in_use_mib,
            offer_id: slot.offer_id,
            seq: slot.seq,
            expires_at_ms,
            withdrawn,
        };
        SignedOffer::sign(body, &self.keypair)
    }

    /// Drives the timers: releases reservations not confirmed in time, starts publishing
    /// idle offers (and full ones that have memory again), gives up on holders that did
    /// not answer in time, refreshes offers about to expire. Call it at [`Offerer::next_wakeup`].
    pub fn poll<R: RngCore + ?Sized>(
        &mut self,
        now_ms: u64,
        rng: &mut R,
    ) -> Result<Vec<Action>, OfferError> {
        let mut actions = Vec::new();
        // Reservations no call started on in time give their memory back.
        for lapsed in self.ledger.lapse(now_ms) {
            self.give_back(now_ms, &lapsed);
        }
        for i in 0..self.slots.len() {
            let timeout = self.config.answer_timeout_ms;
            let slot = &self.slots[i];
            let restart = match &slot.state {
                State::Idle => true,
                State::Finding { since, .. } | State::Sending { since, .. } => {
                    now_ms >= since + timeout
                }
                State::Published { .. } | State::Full { .. } | State::Withdrawn => false,
            };
            if restart {
                let (key, _) = self.config.key_space.random_key(slot.tier, rng);
                let slot = &mut self.slots[i];
                slot.state = State::Finding {
                    key: key.clone(),
                    since: now_ms,
                };
                actions.push(Action::FindHolder {
                    offer_id: slot.offer_id,
                    key,
                });
                continue;
            }
            if let State::Published {
                key,
                holder,
                expires_at_ms,
            } = &slot.state
                && *expires_at_ms <= now_ms + self.config.refresh_margin_ms
            {
                let (key, holder) = (key.clone(), *holder);
                actions.push(self.send_new_version(i, key, holder, now_ms)?);
                continue;
            }
            if self.update_due(i).is_some_and(|at| at <= now_ms) {
                actions.extend(self.update_holder(i, now_ms)?);
            }
        }
        Ok(actions)
    }

    /// When slot `i`'s holder is due the changes it has not heard of, if any (an offer
    /// on its way to a holder waits for the delivery).
    fn update_due(&self, i: usize) -> Option<u64> {
        let slot = &self.slots[i];
        match slot.state {
            State::Published { .. } | State::Full { .. } => slot
                .changed_since
                .map(|t| t + self.config.holder_update_delay_ms),
            _ => None,
        }
    }

    /// Tells slot `i`'s holder of its memory in use: a new version, a withdrawal once
    /// none is free, or nothing if the changes cancelled out.
    fn update_holder(&mut self, i: usize, now_ms: u64) -> Result<Vec<Action>, OfferError> {
        self.slots[i].changed_since = None;
        let slot = &self.slots[i];
        let (key, holder, expires_at_ms, published) = match &slot.state {
            State::Published {
                key,
                holder,
                expires_at_ms,
            } => (key.clone(), *holder, *expires_at_ms, true),
            State::Full {
                key,
                holder,
                expires_at_ms,
            } => (key.clone(), *holder, *expires_at_ms, false),
            _ => return Ok(Vec::new()),
        };
        if slot.in_use_mib < slot.memory_mib {
            if published && slot.at_holder_in_use == Some(slot.in_use_mib) {
                return Ok(Vec::new());
            }
            return Ok(vec![self.send_new_version(i, key, holder, now_ms)?]);
        }
        if !published {
            return Ok(Vec::new());
        }
        // Nothing free: withdraw it from its holder until memory comes back.
        self.slots[i].seq += 1;
        let expires_at_ms = expires_at_ms.max(now_ms + 1);
        let withdrawal = self.sign(&self.slots[i], expires_at_ms, true)?;
        let slot = &mut self.slots[i];
        slot.state = State::Full {
            key: key.clone(),
            holder,
            expires_at_ms,
        };
        slot.latest = Some(withdrawal.clone());
        slot.at_holder_in_use = None;
        Ok(vec![Action::Send {
            offer_id: slot.offer_id,
            holder,
            key,
            offer: Box::new(withdrawal),
        }])
    }

    /// Signs the next version of slot `i`'s offer and sends it to `holder`.
    fn send_new_version(
        &mut self,
        i: usize,
        key: Vec<u8>,
        holder: PeerId,
        now_ms: u64,
    ) -> Result<Action, OfferError> {
        let expires_at_ms = now_ms + self.config.ttl_ms;
        self.slots[i].seq += 1;
        let offer = self.sign(&self.slots[i], expires_at_ms, false)?;
        let slot = &mut self.slots[i];
        slot.latest = Some(offer.clone());
        slot.at_holder_in_use = Some(slot.in_use_mib);
        slot.changed_since = None;
        slot.state = State::Sending {
            key: key.clone(),
            holder,
            since: now_ms,
            expires_at_ms,
        };
        Ok(Action::Send {
            offer_id: slot.offer_id,
            holder,
            key,
            offer: Box::new(offer),
        })
    }

    /// Takes a report from the caller.
    pub fn on_event(&mut self, now_ms: u64, event: Event) -> Result<Vec<Action>, OfferError> {
        let offer_id = match &event {
            Event::HolderFound { offer_id, .. }
            | Event::NoHolder { offer_id }
            | Event::Delivered { offer_id, .. }
            | Event::DeliveryFailed { offer_id, .. } => *offer_id,
        };
        let Some(i) = self.slots.iter().position(|s| s.offer_id == offer_id) else {
            return Ok(Vec::new());
        };
        match (event, self.slots[i].state.clone()) {
            (Event::HolderFound { holder, .. }, State::Finding { key, .. }) => {
                Ok(vec![self.send_new_version(i, key, holder, now_ms)?])
            }
            (Event::NoHolder { .. }, State::Finding { .. }) => {
                self.slots[i].state = State::Idle;
                Ok(Vec::new())
            }
            (
                Event::Delivered { holder, .. },
                State::Sending {
                    key,
                    holder: to,
                    expires_at_ms,
                    ..
                },
            ) if holder == to => {
                self.slots[i].state = State::Published {
                    key,
                    holder,
                    expires_at_ms,
                };
                // A newly published offer is told to schedulers at once (refreshes wait
                // for the interval).
                if self.slots[i].seq == 1 || self.last_report_ms.is_none() {
                    self.report_due = true;
                }
                Ok(Vec::new())
            }
            (Event::DeliveryFailed { holder, .. }, State::Sending { holder: to, .. })
                if holder == to =>
            {
                // Republish at a new random key, hence (most likely) to another holder.
                self.slots[i].state = State::Idle;
                Ok(Vec::new())
            }
            // Late or stray reports change nothing.
            _ => Ok(Vec::new()),
        }
    }

    /// Withdraws every offer that has a holder (when the node stops, say): returns the
    /// signed withdrawals to send; the offers are not published again.
    pub fn withdraw_all(&mut self, now_ms: u64) -> Result<Vec<Action>, OfferError> {
        let mut actions = Vec::new();
        for i in 0..self.slots.len() {
            let target = match &self.slots[i].state {
                State::Sending {
                    key,
                    holder,
                    expires_at_ms,
                    ..
                }
                | State::Published {
                    key,
                    holder,
                    expires_at_ms,
                } => Some((key.clone(), *holder, (*expires_at_ms).max(now_ms + 1))),
                _ => None,
            };
            self.slots[i].seq += 1;
            if let Some((key, holder, expires_at_ms)) = target {
                let offer = self.sign(&self.slots[i], expires_at_ms, true)?;
                actions.push(Action::Send {
                    offer_id: self.slots[i].offer_id,
                    holder,
                    key,
                    offer: Box::new(offer),
                });
            }
            self.slots[i].state = State::Withdrawn;
        }
        Ok(actions)
    }

    /// Publishes again the offers [`Offerer::withdraw_all`] withdrew (with newer sequence
    /// numbers, at fresh keys), from the next [`Offerer::poll`]: lending resumes.
    pub fn resume(&mut self) {
        for slot in &mut self.slots {
            if slot.state == State::Withdrawn {
                slot.state = State::Idle;
            }
        }
    }

    /// Whether every offer is withdrawn (the node stopped lending).
    pub fn is_withdrawn(&self) -> bool {
        self.slots.iter().all(|s| s.state == State::Withdrawn)
    }

    /// Sets `mib` MiB of offer `offer_id` aside for `owner`'s reservation
    /// `reservation_id`, held for `hold_ms` unless a call starts on it. The offerer is
    /// the only authority on its memory, so two schedulers racing for one offer can never
    /// oversubscribe it: whichever comes second sees the reduced free memory. Its holder
    /// gets the updated offer (or, once no memory is left, a withdrawal) from
    /// [`Offerer::poll`] after the update delay. The same request again returns the same
    /// reservation.
    pub fn reserve(
        &mut self,
        now_ms: u64,
        owner: PeerId,
        offer_id: u64,
        mib: u32,
        reservation_id: u64,
        hold_ms: u64,
    ) -> Result<Reservation, ReserveError> {
        if let Some(existing) = self
            .ledger
            .check_admit(owner, reservation_id, offer_id, mib)?
        {
            return Ok(existing);
        }
        let i = self
            .slots
            .iter()
            .position(|s| s.offer_id == offer_id && s.state != State::Withdrawn)
            .ok_or(ReserveError::UnknownOffer(offer_id))?;
        let free_mib = self.slots[i].memory_mib - self.slots[i].in_use_mib;
        if mib == 0 || mib > free_mib {
            return Err(ReserveError::NotEnoughMemory {
                offer_id,
                free_mib,
                requested_mib: mib,
            });
        }
        self.slots[i].in_use_mib += mib;
        let reservation = self
            .ledger
            .hold(now_ms, owner, reservation_id, offer_id, mib, hold_ms);
        self.mark_changed(now_ms, i);
        Ok(reservation)
    }

    /// Starts `run` on reservation `reservation_id` for a call of `mib` MiB: see
    /// [`Ledger::start`]. The memory stays reserved until [`Offerer::finish_run`].
    pub fn start_run(
        &mut self,
        now_ms: u64,
        reservation_id: u64,
        run: RunKey,
        mib: u32,
    ) -> Result<Reservation, StartError> {
        self.ledger.start(now_ms, reservation_id, run, mib)
    }

    /// The call on reservation `reservation_id` ended: its memory goes back to its offer.
    /// Returns the reservation, or `None` if no call ran on it.
    pub fn finish_run(&mut self, now_ms: u64, reservation_id: u64) -> Option<Reservation> {
        let done = self.ledger.finish(reservation_id)?;
        self.give_back(now_ms, &done);
        Some(done)
    }

    /// Gives `owner`'s held reservation back to its offer; unknown ids are ignored (it was
    /// released or lapsed already). Only its owner may, and not while a call runs on it.
    pub fn release(
        &mut self,
        now_ms: u64,
        owner: PeerId,
        reservation_id: u64,
    ) -> Result<(), ReleaseError> {
        if let Some(released) = self.ledger.release(owner, reservation_id)? {
            self.give_back(now_ms, &released);
        }
        Ok(())
    }

    /// `owner` is gone: its held reservations lapse now. Returns how many did.
    pub fn owner_gone(&mut self, now_ms: u64, owner: PeerId) -> usize {
        let lapsed = self.ledger.owner_gone(owner);
        for reservation in &lapsed {
            self.give_back(now_ms, reservation);
        }
        lapsed.len()
    }

    /// Returns a reservation's memory to its offer.
    fn give_back(&mut self, now_ms: u64, reservation: &Reservation) {
        if let Some(i) = self
            .slots
            .iter()
            .position(|s| s.offer_id == reservation.offer_id)
        {
            self.slots[i].in_use_mib -= reservation.mib;
            self.mark_changed(now_ms, i);
        }
    }

    /// The current version of offer `offer_id`, signed anew if its memory in use changed
    /// since the last (a withdrawal if nothing is free): what a scheduler that just
    /// reserved on it, or whose call released it, should list; the withdrawal, once the
    /// offer is withdrawn. `None` if the offer is unknown, or was never signed and
    /// nothing changed.
    pub fn current(
        &mut self,
        now_ms: u64,
        offer_id: u64,
    ) -> Result<Option<SignedOffer>, OfferError> {
        let Some(i) = self.slots.iter().position(|s| s.offer_id == offer_id) else {
            return Ok(None);
        };
        self.refresh_latest(i, now_ms)?;
        Ok(self.slots[i].latest.clone())
    }

    /// Signs a new version of slot `i` if its last one no longer tells its memory in use
    /// (or none was signed but some is in use). Withdrawn slots keep their withdrawal.
    fn refresh_latest(&mut self, i: usize, now_ms: u64) -> Result<(), OfferError> {
        let slot = &self.slots[i];
        if slot.state == State::Withdrawn {
            return Ok(());
        }
        let full = slot.in_use_mib >= slot.memory_mib;
        let stale = match &slot.latest {
            None => slot.in_use_mib > 0,
            Some(latest) => {
                latest.body.in_use_mib != slot.in_use_mib || latest.body.withdrawn != full
            }
        };
        if !stale {
            return Ok(());
        }
        self.slots[i].seq += 1;
        let offer = self.sign(&self.slots[i], now_ms + self.config.ttl_ms, full)?;
        self.slots[i].latest = Some(offer);
        Ok(())
    }

    /// The reservations held or running now.
    pub fn reservations(&self) -> impl Iterator<Item = &Reservation> {
        self.ledger.iter()
    }

    /// The reservation ledger.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Remembers runs made here before a restart, so that none starts again
    /// ([`Ledger::remember_ran`]).
    pub fn remember_runs(&mut self, runs: impl IntoIterator<Item = RunKey>) {
        for run in runs {
            self.ledger.remember_ran(run);
        }
    }

    /// What to tell a scheduler now, if anything: the offers of
    /// [`Offerer::current_offers`], after a change (at most every
    /// [`OffererConfig::report_gap_ms`]) or once the notify interval passed. Call it at
    /// [`Offerer::next_report`].
    pub fn poll_report(&mut self, now_ms: u64) -> Result<Option<Vec<SignedOffer>>, OfferError> {
        if self.next_report().is_none_or(|at| at > now_ms) {
            return Ok(None);
        }
        for i in 0..self.slots.len() {
            if self.has_holder(i) {
                self.refresh_latest(i, now_ms)?;
            }
        }
        let offers = self.current_offers(now_ms);
        let versions: Vec<(u64, u64)> = offers
            .iter()
            .map(|o| (o.body.offer_id, o.body.seq))
            .collect();
        let interval_passed = self
            .last_report_ms
            .is_none_or(|last| now_ms >= last + self.config.notify_interval_ms);
        // Changes that cancelled out (a call that reserved and gave back) are not told.
        if !interval_passed && versions == self.last_reported {
            self.report_due = false;
            return Ok(None);
        }
        self.report_due = false;
        self.last_report_ms = Some(now_ms);
        self.last_reported = versions;
        Ok((!offers.is_empty()).then_some(offers))
    }

    /// Whether slot `i` is with a holder (or on its way to one).
    fn has_holder(&self, i: usize) -> bool {
        matches!(
            self.slots[i].state,
            State::Sending { .. } | State::Published { .. } | State::Full { .. }
        )
    }

    /// The report could not be delivered (no scheduler known yet, say): it is tried
    /// again after the report gap.
    pub fn report_failed(&mut self, now_ms: u64) {
        self.report_due = true;
        self.last_report_ms = Some(now_ms);
        self.last_reported.clear();
    }

    /// When [`Offerer::poll_report`] next has something to tell.
    pub fn next_report(&self) -> Option<u64> {
        let has_offers = self.slots.iter().any(|s| s.latest.is_some());
        match self.last_report_ms {
            _ if !has_offers => None,
            None => Some(0),
            Some(last) if self.report_due => Some(last + self.config.report_gap_ms),
            Some(last) => Some(last + self.config.notify_interval_ms),
        }
    }

    /// Slot `i`'s memory in use changed: schedulers are to hear of it, and its holder
    /// after the update delay.
    fn mark_changed(&mut self, now_ms: u64, i: usize) {
        self.report_due = true;
        let slot = &mut self.slots[i];
        if slot.changed_since.is_none() {
            slot.changed_since = Some(now_ms);
        }
    }

    /// When [`Offerer::poll`] next has something to do.
    pub fn next_wakeup(&self) -> Option<u64> {
        let timeout = self.config.answer_timeout_ms;
        self.slots
            .iter()
            .filter_map(|s| match &s.state {
                State::Idle => Some(0),
                State::Finding { since, .. } | State::Sending { since, .. } => {
                    Some(since + timeout)
                }
                State::Published { expires_at_ms, .. } => {
                    Some(expires_at_ms.saturating_sub(self.config.refresh_margin_ms))
                }
                State::Full { .. } | State::Withdrawn => None,
            })
            .chain((0..self.slots.len()).filter_map(|i| self.update_due(i)))
            .chain(self.ledger.next_lapse())
            .min()
    }

    /// What this volunteer tells a scheduler's super-trader list: the latest signed
    /// version of each offer with a holder (or on its way to one): those with memory
    /// free, and the withdrawals of those now full, so lists drop them.
    /// [`Offerer::poll_report`] signs them anew first where memory in use changed.
    pub fn current_offers(&self, now_ms: u64) -> Vec<SignedOffer> {
        self.slots
            .iter()
            .filter_map(|s| {
                let latest = s.latest.clone()?;
                let current = matches!(
                    s.state,
                    State::Sending { .. } | State::Published { .. } | State::Full { .. }
                );
                (current && latest.body.expires_at_ms > now_ms).then_some(latest)
            })
            .collect()
    }

    /// Where every offer stands.
    pub fn sent(&self) -> Vec<SentOffer> {
        self.slots
            .iter()
            .map(|s| {
                let (holder, expires, state) = match &s.state {
                    State::Idle => (None, None, "idle"),
                    State::Finding { .. } => (None, None, "finding"),
                    State::Sending { holder, .. } => (Some(holder.to_string()), None, "sending"),
                    State::Published {
                        holder,
                        expires_at_ms,
                        ..
                    } => (Some(holder.to_string()), Some(*expires_at_ms), "published"),
                    State::Full { .. } => (None, None, "full"),
                    State::Withdrawn => (None, None, "withdrawn"),
                };
                SentOffer {
                    offer_id: s.offer_id,
                    tier_mib: s.tier.mib(),
                    memory_mib: s.memory_mib,
                    seq: s.seq,
                    in_use_mib: s.in_use_mib,
                    holder,
                    expires_at_ms: expires,
                    state,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::holder::{Accepted, Holder, HolderConfig, Rejection};
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    /// The scheduler that makes the tests' reservations.
    fn owner() -> PeerId {
        Keypair::ed25519_from_bytes([7; 32])
            .expect("32 bytes make a key")
            .public()
            .to_peer_id()
    }

    fn offerer(memory_mib: u64) -> Offerer {
        let config =
            OffererConfig::new(memory_mib, vec!["/ip4/127.0.0.1/tcp/4100".parse().unwrap()]);
        Offerer::new(Keypair::generate_ed25519(), config, 100)
    }

    fn find_key(actions: &[Action]) -> (u64, Vec<u8>) {
        match &actions[0] {
            Action::FindHolder { offer_id, key } => (*offer_id, key.clone()),
            other => panic!("expected FindHolder, got {other:?}"),
        }
    }

    fn sent(actions: &[Action]) -> (PeerId, Vec<u8>, SignedOffer) {
        match &actions[0] {
            Action::Send {
                holder, key, offer, ..
            } => (*holder, key.clone(), (**offer).clone()),
            other => panic!("expected Send, got {other:?}"),
        }
    }

    #[test]
    fn memory_is_sliced_largest_tier_first() {
        let mibs = |m| {
            slice(m, Slicing::Largest)
                .iter()
                .map(|t| t.mib())
                .collect::<Vec<_>>()
        };
        assert_eq!(mibs(2048), [2048]);
        assert_eq!(mibs(3000), [2048, 512, 256, 128]);
        assert_eq!(mibs(100), Vec::<u32>::new());
        assert_eq!(mibs(25_000), [10240, 10240, 4096, 256, 128]);
        let halves = |m| {
            slice(m, Slicing::Halving)
                .iter()
                .map(|t| t.mib())
                .collect::<Vec<_>>()
        };
        assert_eq!(halves(2048), [1024, 512, 256, 128, 128]);
        assert_eq!(halves(256), [128, 128]);
        assert_eq!(halves(200), [128]);
        assert_eq!(halves(10240), [4096, 2048, 2048, 1024, 512, 256, 128, 128]);
    }

    #[test]
    fn an_offer_is_published_to_a_key_in_its_region_and_refreshed_before_expiry() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut offerer = offerer(512);
        let mut holder = Holder::new(HolderConfig::default());
        let holder_id = PeerId::random();

        let (offer_id, key) = find_key(&offerer.poll(0, &mut rng).unwrap());
        assert!(Tier::from_mib(512).unwrap().region().contains_key(&key));
        let actions = offerer
            .on_event(
                10,
                Event::HolderFound {
                    offer_id,
                    holder: holder_id,
                },
            )
            .unwrap();
        let (to, sent_key, offer) = sent(&actions);
        assert_eq!((to, &sent_key), (holder_id, &key));
        assert_eq!(
            holder.receive(10, &sent_key, offer.clone()),
            Ok(Accepted::Stored)
        );
        offerer
            .on_event(
                20,
                Event::Delivered {
                    offer_id,
                    holder: holder_id,
                },
            )
            .unwrap();
        assert_eq!(offerer.sent()[0].state, "published");
        // What the super-trader feed reports: the version the holder has.
        assert_eq!(offerer.current_offers(20), vec![offer.clone()]);
        assert!(offerer.current_offers(offer.body.expires_at_ms).is_empty());

        // Nothing to do until the refresh margin; then a newer version to the same holder.
        let wakeup = offerer.next_wakeup().unwrap();
        assert_eq!(wakeup, 10 + 60_000 - 20_000);
        assert!(offerer.poll(wakeup - 1, &mut rng).unwrap().is_empty());
        let (to, refresh_key, refreshed) = sent(&offerer.poll(wakeup, &mut rng).unwrap());
        assert_eq!((to, &refresh_key), (holder_id, &key));
        assert!(
            refreshed.body.seq > offer.body.seq
                && refreshed.body.expires_at_ms > offer.body.expires_at_ms
        );
        assert_eq!(
            holder.receive(wakeup, &refresh_key, refreshed),
            Ok(Accepted::Refreshed)
        );
    }

    #[test]
    fn the_whole_key_space_publishes_offers_under_keys_outside_their_region() {
        let mut rng = StdRng::seed_from_u64(12);
        let config = OffererConfig {
            key_space: KeySpace::Whole,
            ..OffererConfig::new(512, Vec::new())
        };
        let mut offerer = Offerer::new(Keypair::generate_ed25519(), config, 100);
        let tier = Tier::from_mib(512).unwrap();
        let whole_holder = HolderConfig {
            key_space: KeySpace::Whole,
            ..HolderConfig::default()
        };
        let mut holder = Holder::new(whole_holder);
        let mut region_holder = Holder::new(HolderConfig::default());
        let mut outside = 0;
        for round in 0..40u64 {
            let now = round * 6_000;
            // Each round the holder stays silent, so the offer goes to a fresh key.
            let (offer_id, key) = find_key(&offerer.poll(now, &mut rng).unwrap());
            let holder_id = PeerId::random();
            let (_, sent_key, offer) = sent(
                &offerer
                    .on_event(
                        now,
                        Event::HolderFound {
                            offer_id,
                            holder: holder_id,
                        },
                    )
                    .unwrap(),
            );
            assert_eq!(sent_key, key);
            if !tier.region().contains_key(&key) {
                outside += 1;
                assert_eq!(
                    region_holder.receive(now, &key, offer.clone()),
                    Err(Rejection::WrongRegion)
                );
            }
            assert!(holder.receive(now, &key, offer).is_ok());
        }
        // The 512 MiB region is 10/64 of the space.
        assert!(outside >= 20, "{outside} of 40 keys outside the region");
    }

    #[test]
    fn a_silent_holder_is_replaced_within_the_answer_timeout() {
        let mut rng = StdRng::seed_from_u64(2);
        let mut offerer = offerer(128);
        let (offer_id, first_key) = find_key(&offerer.poll(0, &mut rng).unwrap());
        let gone = PeerId::random();
        offerer
            .on_event(
                0,
                Event::HolderFound {
                    offer_id,
                    holder: gone,
                },
            )
            .unwrap();
        // No Delivered: after the timeout the offer goes to a fresh key.
        assert!(offerer.poll(4_999, &mut rng).unwrap().is_empty());
        let (again, second_key) = find_key(&offerer.poll(5_000, &mut rng).unwrap());
        assert_eq!(again, offer_id);
        assert_ne!(second_key, first_key);
        assert!(Tier::SMALLEST.region().contains_key(&second_key));
        // A late confirmation from the old holder changes nothing.
        assert!(
            offerer
                .on_event(
                    5_001,
                    Event::Delivered {
                        offer_id,
                        holder: gone
                    }
                )
                .unwrap()
                .is_empty()
        );
        assert_eq!(offerer.sent()[0].state, "finding");
        // A failed delivery republishes at once.
        let other = PeerId::random();
        offerer
            .on_event(
                5_002,
                Event::HolderFound {
                    offer_id,
                    holder: other,
                },
            )
            .unwrap();
        offerer
            .on_event(
                5_003,
                Event::DeliveryFailed {
                    offer_id,
                    holder: other,
                },
            )
            .unwrap();
        assert!(matches!(
            offerer.poll(5_003, &mut rng).unwrap()[0],
            Action::FindHolder { .. }
        ));
    }

    /// Publishes every offer of `offerer` to `holder`, returning each offer's key and
    /// signed offer by offer id.
    fn publish_all(
        offerer: &mut Offerer,
        holder: &mut Holder,
        holder_id: PeerId,
        rng: &mut StdRng,
    ) -> std::collections::HashMap<u64, (Vec<u8>, SignedOffer)> {
        let mut published = std::collections::HashMap::new();
        for action in offerer.poll(0, rng).unwrap() {
            let Action::FindHolder { offer_id, .. } = action else {
                panic!()
            };
            let (_, key, offer) = sent(
                &offerer
                    .on_event(
                        0,
                        Event::HolderFound {
                            offer_id,
                            holder: holder_id,
                        },
                    )
                    .unwrap(),
            );
            holder.receive(0, &key, offer.clone()).unwrap();
            offerer
                .on_event(
                    0,
                    Event::Delivered {
                        offer_id,
                        holder: holder_id,
                    },
                )
                .unwrap();
            published.insert(offer_id, (key, offer));
        }
        published
    }

    /// An offerer of `memory_mib` (one offer) published to a holder: the rng, the
    /// offerer, the holder, its id and the offer's id.
    fn one_published(memory_mib: u64, seed: u64) -> (StdRng, Offerer, Holder, PeerId, u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut offerer = offerer(memory_mib);
        let mut holder = Holder::new(HolderConfig::default());
        let holder_id = PeerId::random();
        publish_all(&mut offerer, &mut holder, holder_id, &mut rng);
        let offer_id = offerer.sent()[0].offer_id;
        (rng, offerer, holder, holder_id, offer_id)
    }

    /// The key of run `invocation_id` by [`owner`].
    fn run_key(invocation_id: u64) -> RunKey {
        RunKey {
            owner: owner(),
            invocation_id,
            call_digest: [0; 32],
        }
    }

    #[test]
    fn racing_reservations_never_oversubscribe_an_offer() {
        let (mut rng, mut offerer, mut holder, _, offer_id) = one_published(512, 4);
        // Two schedulers each want 300 MiB of the same 512 MiB offer.
        let first = offerer
            .reserve(10, owner(), offer_id, 300, 1, 5_000)
            .unwrap();
        assert_eq!(first.mib, 300);
        let delay = offerer.config.holder_update_delay_ms;
        assert!(offerer.poll(10 + delay - 1, &mut rng).unwrap().is_empty());
        let updates = offerer.poll(10 + delay, &mut rng).unwrap();
        let (_, key, updated) = sent(&updates);
        assert_eq!(updated.body.in_use_mib, 300);
        holder.receive(10, &key, updated).unwrap();
        assert_eq!(
            holder.matching(10, 300).len(),
            0,
            "holders learn the memory is taken"
        );
        assert_eq!(
            offerer
                .reserve(11, owner(), offer_id, 300, 2, 5_000)
                .unwrap_err(),
            ReserveError::NotEnoughMemory {
                offer_id,
                free_mib: 212,
                requested_mib: 300
            }
        );
        // Retrying the first reservation is harmless; reusing its id for another is not.
        assert_eq!(
            offerer
                .reserve(12, owner(), offer_id, 300, 1, 5_000)
                .unwrap(),
            first
        );
        assert_eq!(
            offerer
                .reserve(12, owner(), offer_id, 100, 1, 5_000)
                .unwrap_err(),
            ReserveError::Admit(AdmitError::Conflict(1))
        );
        assert!(offerer.reservations().map(|r| r.mib).sum::<u32>() <= 512);
    }

    #[test]
    fn an_unconfirmed_reservation_lapses_and_a_full_offer_comes_back() {
        let mut rng = StdRng::seed_from_u64(5);
        let mut offerer = offerer(128);
        let mut holder = Holder::new(HolderConfig::default());
        let holder_id = PeerId::random();
        publish_all(&mut offerer, &mut holder, holder_id, &mut rng);
        let offer_id = offerer.sent()[0].offer_id;
        // Taking all of it withdraws it from its holder, after the update delay.
        offerer
            .reserve(100, owner(), offer_id, 128, 9, 1_000)
            .unwrap();
        let delay = offerer.config.holder_update_delay_ms;
        assert_eq!(offerer.next_wakeup(), Some(100 + delay));
        let actions = offerer.poll(100 + delay, &mut rng).unwrap();
        let (_, key, withdrawal) = sent(&actions);
        assert!(withdrawal.body.withdrawn);
        holder.receive(100, &key, withdrawal.clone()).unwrap();
        assert_eq!(holder.live(100).count(), 0);
        assert_eq!(offerer.sent()[0].state, "full");
        // Schedulers hear of the withdrawal too, so their fallback lists drop the offer.
        assert_eq!(offerer.current_offers(100), vec![withdrawal.clone()]);
        // No call started within its hold: released, and after the delay a new version
        // goes to the same holder under the same key (no new lookup), which takes it back.
        assert_eq!(offerer.next_wakeup(), Some(1_100));
        assert!(offerer.poll(1_100, &mut rng).unwrap().is_empty());
        assert_eq!(offerer.reservations().count(), 0);
        assert_eq!(offerer.next_wakeup(), Some(1_100 + delay));
        let actions = offerer.poll(1_100 + delay, &mut rng).unwrap();
        let (to, again, back) = sent(&actions);
        assert_eq!((to, &again), (holder_id, &key));
        assert!(!back.body.withdrawn && back.body.free_mib() == 128);
        assert!(back.body.seq > withdrawal.body.seq);
        holder.receive(1_100 + delay, &key, back.clone()).unwrap();
        assert_eq!(holder.live(1_100 + delay).count(), 1);
        assert_eq!(offerer.current_offers(1_100 + delay), vec![back]);
        // A reservation a call runs on does not lapse, and ends with the call.
        let mut offerer = self::offerer(256);
        publish_all(
            &mut offerer,
            &mut Holder::new(HolderConfig::default()),
            holder_id,
            &mut rng,
        );
        let offer_id = offerer.sent()[0].offer_id;
        offerer
            .reserve(0, owner(), offer_id, 100, 1, 1_000)
            .unwrap();
        let run = RunKey {
            owner: owner(),
            invocation_id: 5,
            call_digest: [0; 32],
        };
        offerer.start_run(1, 1, run, 100).unwrap();
        offerer.poll(10_000, &mut rng).unwrap();
        assert_eq!(offerer.reservations().count(), 1);
        assert_eq!(
            offerer.release(10_001, owner(), 1),
            Err(ReleaseError::Running(1))
        );
        assert_eq!(offerer.sent()[0].in_use_mib, 100);
        assert_eq!(offerer.finish_run(10_002, 1).unwrap().mib, 100);
        assert_eq!(offerer.sent()[0].in_use_mib, 0);
        assert!(offerer.finish_run(10_003, 1).is_none());
    }

    #[test]
    fn the_current_version_follows_reservations_even_before_an_offer_has_a_holder() {
        let mut offerer = offerer(512);
        let offer_id = offerer.sent()[0].offer_id;
        assert!(
            offerer.current(0, offer_id).unwrap().is_none(),
            "nothing signed yet"
        );
        // Not yet with a holder: a version is signed for whoever asks.
        offerer
            .reserve(10, owner(), offer_id, 128, 1, 1_000)
            .unwrap();
        let reserved = offerer.current(10, offer_id).unwrap().unwrap();
        reserved.verify().unwrap();
        assert_eq!(reserved.body.in_use_mib, 128);
        offerer.release(20, owner(), 1).unwrap();
        let released = offerer.current(20, offer_id).unwrap().unwrap();
        assert_eq!(released.body.in_use_mib, 0);
        assert!(released.body.seq > reserved.body.seq);
        // Asking again signs nothing new.
        assert_eq!(offerer.current(30, offer_id).unwrap().unwrap(), released);
    }

    /// Reserves `mib` of `offer_id` as reservation `id`, runs a call on it, and ends it.
    fn one_call(offerer: &mut Offerer, now: u64, offer_id: u64, id: u64, mib: u32) {
        offerer
            .reserve(now, owner(), offer_id, mib, id, 1_000)
            .unwrap();
        let run = run_key(id);
        offerer.start_run(now, id, run, mib).unwrap();
        offerer.finish_run(now + 1, id).unwrap();
    }

    #[test]
    fn a_call_within_the_update_delay_costs_its_holder_nothing_and_signs_nothing() {
        for mib in [128, 1024] {
            // Part of the offer, and all of it (which would withdraw it).
            let (mut rng, mut offerer, _, _, offer_id) = one_published(1024, 8);
            let published = offerer.current(0, offer_id).unwrap().unwrap();
            assert!(offerer.poll_report(0).unwrap().is_some());
            one_call(&mut offerer, 50, offer_id, 1, mib);
            // The version the call's answer carries is the one published: unchanged.
            assert_eq!(offerer.current(51, offer_id).unwrap().unwrap(), published);
            let delay = offerer.config.holder_update_delay_ms;
            for at in [50 + delay, 200, 10_000] {
                assert!(offerer.poll(at, &mut rng).unwrap().is_empty(), "at {at} ms");
            }
            // Schedulers are not told of a change that cancelled out, only with the
            // interval.
            assert!(offerer.poll_report(200).unwrap().is_none());
            assert_eq!(offerer.next_report(), Some(10_000));
            assert_eq!(offerer.sent()[0].seq, published.body.seq, "nothing signed");
        }
    }

    #[test]
    fn a_busy_offer_sends_its_holder_one_version_per_update_delay() {
        let (mut rng, mut offerer, mut holder, holder_id, offer_id) = one_published(1024, 9);
        let delay = offerer.config.holder_update_delay_ms;
        // A call starts every 10 ms, of 1 to 5 MiB in turn, and each runs 20 ms: memory
        // in use changes at every step and takes five values in turn.
        let mut sends = 0;
        for step in 0..100u64 {
            let now = step * 10;
            let mib = (step % 5 + 1) as u32;
            let run = run_key(step);
            offerer
                .reserve(now, owner(), offer_id, mib, step, 1_000)
                .unwrap();
            offerer.start_run(now, step, run, mib).unwrap();
            if step >= 2 {
                offerer.finish_run(now, step - 2).unwrap();
            }
            for action in offerer.poll(now, &mut rng).unwrap() {
                let Action::Send { key, offer, .. } = action else {
                    panic!("only sends");
                };
                sends += 1;
                // The holder gets memory in use as it is at the update.
                assert_eq!(offer.body.in_use_mib, offerer.sent()[0].in_use_mib);
                holder.receive(now, &key, (*offer).clone()).unwrap();
                let event = Event::Delivered {
                    offer_id,
                    holder: holder_id,
                };
                assert!(offerer.on_event(now, event).unwrap().is_empty());
            }
        }
        // 1 s of calls: at most one version per delay, not one per change (200).
        assert!(
            sends <= (1_000 / delay + 1) as usize,
            "{sends} versions sent"
        );
        assert!(sends >= 2, "{sends} versions sent");
    }

    #[test]
    fn offers_are_withdrawn_with_signed_newer_versions() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut offerer = offerer(256 + 128);
        let mut holder = Holder::new(HolderConfig::default());
        let holder_id = PeerId::random();
        let offers: Vec<(Vec<u8>, SignedOffer)> =
            publish_all(&mut offerer, &mut holder, holder_id, &mut rng)
                .into_values()
                .collect();
        assert_eq!(holder.live(1).count(), 2);
        let withdrawals = offerer.withdraw_all(1).unwrap();
        assert_eq!(withdrawals.len(), 2);
        for action in withdrawals {
            let Action::Send { key, offer, .. } = action else {
                panic!()
            };
            assert!(offer.body.withdrawn);
            assert_eq!(holder.receive(1, &key, *offer), Ok(Accepted::Withdrawn));
        }
        assert_eq!(holder.live(1).count(), 0);
        // The old versions cannot bring them back, and nothing is republished.
        for (key, offer) in offers {
            assert_eq!(holder.receive(2, &key, offer), Err(Rejection::Replayed));
        }
        assert!(offerer.poll(100_000, &mut rng).unwrap().is_empty());
        assert_eq!(offerer.next_wakeup(), None);
    }

    #[test]
    fn withdrawn_offers_are_published_again_with_newer_versions_on_resume() {
        let mut rng = StdRng::seed_from_u64(4);
        let mut offerer = offerer(256 + 128);
        let mut holder = Holder::new(HolderConfig::default());
        let holder_id = PeerId::random();
        publish_all(&mut offerer, &mut holder, holder_id, &mut rng);
        for action in offerer.withdraw_all(1).unwrap() {
            let Action::Send { key, offer, .. } = action else {
                panic!()
            };
            holder.receive(1, &key, *offer).unwrap();
        }
        assert!(offerer.is_withdrawn());
        let reserved = offerer.reserve(2, PeerId::random(), 100, 128, 1, 1000);
        assert!(reserved.is_err(), "a withdrawn offer reserves nothing");
        offerer.resume();
        assert!(!offerer.is_withdrawn());
        let actions = offerer.poll(3, &mut rng).unwrap();
        assert_eq!(actions.len(), 2);
        let (offer_id, _) = find_key(&actions);
        let found = Event::HolderFound {
            offer_id,
            holder: holder_id,
        };
        let (_, key, offer) = sent(&offerer.on_event(3, found).unwrap());
        assert!(!offer.body.withdrawn);
        let accepted = holder.receive(3, &key, offer);
        assert!(matches!(
            accepted,
            Ok(Accepted::Stored | Accepted::Refreshed)
        ));
    }

    #[test]
    fn schedulers_hear_of_a_new_offer_and_of_every_change_at_once_then_every_interval() {
        let mut rng = StdRng::seed_from_u64(21);
        let mut offerer = offerer(512);
        assert_eq!(
            offerer.next_report(),
            None,
            "nothing to tell before an offer exists"
        );
        let mut holder = Holder::new(HolderConfig::default());
        publish_all(&mut offerer, &mut holder, PeerId::random(), &mut rng);
        // Published at 0: told at once.
        assert_eq!(offerer.next_report(), Some(0));
        let told = offerer.poll_report(0).unwrap().unwrap();
        assert_eq!(told.len(), 1);
        assert!(offerer.poll_report(1).unwrap().is_none(), "nothing new");
        // A reservation changes it: told after the report gap, not the interval.
        let offer_id = told[0].body.offer_id;
        offerer
            .reserve(50, owner(), offer_id, 128, 1, 60_000)
            .unwrap();
        assert_eq!(offerer.next_report(), Some(200));
        assert!(offerer.poll_report(199).unwrap().is_none());
        let told = offerer.poll_report(200).unwrap().unwrap();
        assert_eq!(told[0].body.free_mib(), 384);
        // Nothing changes: the next report comes with the interval.
        assert_eq!(offerer.next_report(), Some(10_200));
        // A report that found no scheduler is tried again after the gap.
        offerer.report_failed(10_200);
        assert_eq!(offerer.next_report(), Some(10_400));
        assert!(offerer.poll_report(10_400).unwrap().is_some());
    }
}

#[cfg(test)]
mod properties {
    //! Invariants of the offerer and its ledger over random sequences of requests.

    use super::*;
    use crate::ledger::ReservationState;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[derive(Debug, Clone)]
    enum Op {
        Reserve {
            owner: usize,
            offer: usize,
            mib: u32,
            id: u64,
            hold_ms: u64,
        },
        Start {
            owner: usize,
            id: u64,
            invocation: u64,
            mib: u32,
        },
        Finish {
            id: u64,
        },
        Release {
            owner: usize,
            id: u64,
        },
        Gone {
            owner: usize,
        },
        Advance {
            ms: u64,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..3usize, 0..4usize, 1..700u32, 0..12u64, 1..5_000u64).prop_map(
                |(owner, offer, mib, id, hold_ms)| Op::Reserve {
                    owner,
                    offer,
                    mib,
                    id,
                    hold_ms
                }
            ),
            (0..3usize, 0..12u64, 0..6u64, 1..700u32).prop_map(|(owner, id, invocation, mib)| {
                Op::Start {
                    owner,
                    id,
                    invocation,
                    mib,
                }
            }),
            (0..12u64).prop_map(|id| Op::Finish { id }),
            (0..3usize, 0..12u64).prop_map(|(owner, id)| Op::Release { owner, id }),
            (0..3usize).prop_map(|owner| Op::Gone { owner }),
            (0..3_000u64).prop_map(|ms| Op::Advance { ms }),
        ]
    }

    fn peer(i: usize) -> PeerId {
        Keypair::ed25519_from_bytes([i as u8 + 1; 32])
            .expect("32 bytes make a key")
            .public()
            .to_peer_id()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever the owners ask, in any order and at any time: no offer is ever
        /// oversubscribed, a running reservation ends only with its own call, a call
        /// runs at most once per owner and invocation, held reservations lapse in time
        /// or when their owner goes, and offer versions only grow.
        #[test]
        fn the_ledger_keeps_its_invariants(ops in proptest::collection::vec(op(), 1..120)) {
            let mut rng = StdRng::seed_from_u64(1);
            let keypair = Keypair::ed25519_from_bytes([99; 32]).expect("a key");
            let mut offerer = Offerer::new(keypair, OffererConfig::new(1024 + 512 + 256, Vec::new()), 1);
            let offer_ids: Vec<u64> = offerer.sent().iter().map(|s| s.offer_id).collect();
            let mut now = 0u64;
            let mut started = std::collections::HashSet::new();
            let mut seqs: std::collections::HashMap<u64, u64> = Default::default();
            for op in ops {
                let before: Vec<Reservation> = offerer.reservations().copied().collect();
                match op {
                    Op::Reserve { owner, offer, mib, id, hold_ms } => {
                        let offer_id = offer_ids[offer % offer_ids.len()];
                        let _ = offerer.reserve(now, peer(owner), offer_id, mib, id, hold_ms);
                    }
                    Op::Start { owner, id, invocation, mib } => {
                        let run = RunKey { owner: peer(owner), invocation_id: invocation, call_digest: [0; 32] };
                        if offerer.start_run(now, id, run, mib).is_ok() {
                            prop_assert!(started.insert((owner, invocation)), "ran twice");
                            let r = offerer.ledger().get(id).copied().expect("running");
                            prop_assert_eq!(r.owner, peer(owner));
                            prop_assert!(r.mib >= mib);
                        }
                    }
                    Op::Finish { id } => { let _ = offerer.finish_run(now, id); }
                    Op::Release { owner, id } => {
                        let was = before.iter().find(|r| r.reservation_id == id).copied();
                        let released = offerer.release(now, peer(owner), id).is_ok();
                        if let Some(was) = was {
                            let allowed = was.owner == peer(owner) && !was.is_running();
                            prop_assert_eq!(released, allowed);
                        }
                    }
                    Op::Gone { owner } => { offerer.owner_gone(now, peer(owner)); }
                    Op::Advance { ms } => { now += ms; offerer.poll(now, &mut rng).expect("signs"); }
                }
                // Running reservations end only by their own call's Finish.
                for r in before.iter().filter(|r| r.is_running()) {
                    let still = offerer.ledger().get(r.reservation_id).copied();
                    if !matches!(&op, Op::Finish { id } if *id == r.reservation_id) {
                        prop_assert_eq!(still, Some(*r), "a running reservation went");
                    }
                }
                for r in offerer.reservations() {
                    if let ReservationState::Held { until_ms } = r.state {
                        prop_assert!(until_ms > now || !matches!(op, Op::Advance { .. }), "lapsed late");
                    }
                }
                if let Op::Gone { owner } = op {
                    prop_assert!(offerer.reservations().all(|r| r.owner != peer(owner) || r.is_running()));
                }
                for sent in offerer.sent() {
                    prop_assert!(sent.in_use_mib <= sent.memory_mib, "oversubscribed");
                    let reserved: u32 = offerer.reservations().filter(|r| r.offer_id == sent.offer_id).map(|r| r.mib).sum();
                    prop_assert_eq!(reserved, sent.in_use_mib);
                    let last = seqs.entry(sent.offer_id).or_insert(0);
                    prop_assert!(sent.seq >= *last, "sequence went back");
                    *last = sent.seq;
                }
            }
        }
    }
}
