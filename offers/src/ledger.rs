//! The volunteer's reservation ledger: who holds which memory, for how long, and which
//! calls ran on it.
//!
//! Each reservation has an **owner**, the peer that made it (a scheduler, or this node
//! itself). Only the owner may run a call on it or release it: a stranger who learns a
//! reservation's id can do nothing with it. A reservation is
//! [`ReservationState::Held`] until a deadline, then lapses unless a call starts on it;
//! [`ReservationState::Running`] while its call runs, when nothing but the end of the call
//! gives its memory back; and done once the call ended, when it is gone and only its run
//! is remembered.
//!
//! Runs are keyed by ([`RunKey`]) owner, invocation id and a digest of the call, and each
//! runs **at most once**: the same owner asking again with the same invocation id gets
//! [`StartError::AlreadyRunning`] or [`StartError::AlreadyRan`] (the caller returns the
//! first run's answer), and the same id with another call is refused. The most recent
//! [`LedgerConfig::remembered_runs`] finished runs are remembered.
//!
//! Admission is capped: in all (no more reservations than the node runs guests) and per
//! owner (one peer cannot take every place). Held reservations of an owner that vanished
//! lapse at once ([`Ledger::owner_gone`]).
//!
//! The ledger decides; it does not count memory (the [`crate::offerer::Offerer`] that
//! owns it does, per offer). Time is passed in as Unix milliseconds.

use libp2p::PeerId;
use std::collections::{BTreeMap, HashMap, VecDeque};

/// Limits of a ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerConfig {
    /// Most reservations at once, held or running (default 64).
    pub max_reservations: usize,
    /// Most reservations one owner has at once (default 32, half the default total: a
    /// busy scheduler may fill half a volunteer's places, never all of them).
    pub max_per_owner: usize,
    /// Longest a reservation may be held before a call starts on it, in ms (default
    /// 10 minutes; longer asks are cut to it).
    pub max_hold_ms: u64,
    /// Finished runs remembered for at-most-once (default 1024).
    pub remembered_runs: usize,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            max_reservations: 64,
            max_per_owner: 32,
            max_hold_ms: 10 * 60 * 1000,
            remembered_runs: 1024,
        }
    }
}

/// What makes one run: at most one per key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunKey {
    /// The peer that asked for it (the reservation's owner).
    pub owner: PeerId,
    /// The invocation's id, chosen by its client.
    pub invocation_id: u64,
    /// A digest of the call (module, inputs, arguments, memory…), so a reused id with
    /// another call is told apart.
    pub call_digest: [u8; 32],
}

/// Where a reservation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum ReservationState {
    /// Set aside until `until_ms`, when it lapses unless a call started on it.
    Held {
        /// When it lapses (Unix ms).
        until_ms: u64,
    },
    /// A call runs on it; it ends with the call.
    Running {
        /// The call's invocation id.
        invocation_id: u64,
        /// When the call started (Unix ms).
        since_ms: u64,
    },
}

/// Memory set aside on one offer for one owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reservation {
    /// The owner's id for it; reserving again with the same id returns it unchanged.
    pub reservation_id: u64,
    /// The offer it was taken from.
    pub offer_id: u64,
    /// Memory reserved, in MiB.
    pub mib: u32,
    /// The peer that made it: the only one that may run a call on it or release it.
    pub owner: PeerId,
    /// Where it stands.
    #[serde(flatten)]
    pub state: ReservationState,
}

impl Reservation {
    /// Whether a call runs on it.
    pub fn is_running(&self) -> bool {
        matches!(self.state, ReservationState::Running { .. })
    }
}

/// Why a reservation was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmitError {
    /// As many reservations are held as allowed.
    #[error("busy: {0} calls are reserved here")]
    Full(usize),
    /// The owner holds as many as one peer may.
    #[error("busy: {owner} holds {max} reservations here, the most one peer may")]
    OwnerFull {
        /// The owner.
        owner: PeerId,
        /// The bound.
        max: usize,
    },
    /// The id is taken, by another owner or for another request.
    #[error("reservation {0} already exists for another request")]
    Conflict(u64),
}

/// Why a call could not start on a reservation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    /// No such reservation (it lapsed, was released, or never was).
    #[error("no reservation {0} here (it lapsed or was released)")]
    Unknown(u64),
    /// The reservation is someone else's.
    #[error("reservation {0} belongs to another peer")]
    NotOwner(u64),
    /// Another call runs on it.
    #[error("reservation {0} is in use by another call")]
    InUse(u64),
    /// It holds less memory than the call asks for.
    #[error("reservation {reservation_id} holds {held_mib} MiB, the call asks for {asked_mib} MiB")]
    TooSmall {
        /// The reservation.
        reservation_id: u64,
        /// Memory it holds, in MiB.
        held_mib: u32,
        /// Memory the call asks for, in MiB.
        asked_mib: u32,
    },
    /// This run is under way (on reservation `0`): wait for its answer.
    #[error("invocation {1} is already running here")]
    AlreadyRunning(u64, u64),
    /// This run ended: its answer is the one to give.
    #[error("invocation {0} already ran here")]
    AlreadyRan(u64),
    /// The owner used this invocation id for another call.
    #[error("invocation {0} was used here for another call")]
    ReusedId(u64),
}

/// Why a reservation could not be released.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReleaseError {
    /// The reservation is someone else's.
    #[error("reservation {0} belongs to another peer")]
    NotOwner(u64),
    /// A call runs on it: it is released when the call ends, and only then.
    #[error("reservation {0} is running a call; it is released when the call ends")]
    Running(u64),
}

/// What is known of one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    Running {
        reservation_id: u64,
        digest: [u8; 32],
    },
    Done {
        digest: [u8; 32],
    },
}

/// The reservations of one volunteer.
#[derive(Debug, Clone)]
pub struct Ledger {
    config: LedgerConfig,
    reservations: BTreeMap<u64, Reservation>,
    /// Runs by (owner, invocation id).
    runs: HashMap<(PeerId, u64), Run>,
    /// Finished runs, oldest first, for forgetting.
    finished: VecDeque<(PeerId, u64)>,
}

impl Ledger {
    /// An empty ledger.
    pub fn new(config: LedgerConfig) -> Ledger {
        Ledger {
            config,
            reservations: BTreeMap::new(),
            runs: HashMap::new(),
            finished: VecDeque::new(),
        }
    }

    /// Its limits.
    pub fn config(&self) -> &LedgerConfig {
        &self.config
    }

    /// Reservation `id`, if held or running.
    pub fn get(&self, reservation_id: u64) -> Option<&Reservation> {
        self.reservations.get(&reservation_id)
    }

    /// Every reservation, held or running.
    pub fn iter(&self) -> impl Iterator<Item = &Reservation> {
        self.reservations.values()
    }

    /// Number of reservations, held or running.
    pub fn len(&self) -> usize {
        self.reservations.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.reservations.is_empty()
    }

    /// Checks that `owner` may hold one more reservation `reservation_id` of `mib` MiB on
    /// offer `offer_id`: `Ok(Some(existing))` when it already holds exactly that one (a
    /// retried request), `Ok(None)` when a new one may be made.
    pub fn check_admit(
        &self,
        owner: PeerId,
        reservation_id: u64,
        offer_id: u64,
        mib: u32,
    ) -> Result<Option<Reservation>, AdmitError> {
        if let Some(existing) = self.reservations.get(&reservation_id) {
            if existing.owner == owner && existing.offer_id == offer_id && existing.mib == mib {
                return Ok(Some(*existing));
            }
            return Err(AdmitError::Conflict(reservation_id));
        }
        if self.reservations.len() >= self.config.max_reservations {
            return Err(AdmitError::Full(self.config.max_reservations));
        }
        let owned = self
            .reservations
            .values()
            .filter(|r| r.owner == owner)
            .count();
        if owned >= self.config.max_per_owner {
            return Err(AdmitError::OwnerFull {
                owner,
                max: self.config.max_per_owner,
            });
        }
        Ok(None)
    }

    /// Records a new held reservation (after [`Ledger::check_admit`] said `Ok(None)`),
    /// held for `hold_ms` (at most [`LedgerConfig::max_hold_ms`], at least 1 ms).
    pub fn hold(
        &mut self,
        now_ms: u64,
        owner: PeerId,
        reservation_id: u64,
        offer_id: u64,
        mib: u32,
        hold_ms: u64,
    ) -> Reservation {
        let hold_ms = hold_ms.clamp(1, self.config.max_hold_ms);
        let reservation = Reservation {
            reservation_id,
            offer_id,
            mib,
            owner,
            state: ReservationState::Held {
                until_ms: now_ms.saturating_add(hold_ms),
            },
        };
        self.reservations.insert(reservation_id, reservation);
        reservation
    }

    /// Starts `run` on reservation `reservation_id` for a call of `mib` MiB: only its
    /// owner, only on a held reservation large enough, and only once per run.
    pub fn start(
        &mut self,
        now_ms: u64,
        reservation_id: u64,
        run: RunKey,
        mib: u32,
    ) -> Result<Reservation, StartError> {
        self.check_run(&run)?;
        let reservation = self
            .reservations
            .get_mut(&reservation_id)
            .ok_or(StartError::Unknown(reservation_id))?;
        if reservation.owner != run.owner {
            return Err(StartError::NotOwner(reservation_id));
        }
        if reservation.is_running() {
            return Err(StartError::InUse(reservation_id));
        }
        if reservation.mib < mib {
            return Err(StartError::TooSmall {
                reservation_id,
                held_mib: reservation.mib,
                asked_mib: mib,
            });
        }
        reservation.state = ReservationState::Running {
            invocation_id: run.invocation_id,
            since_ms: now_ms,
        };
        self.runs.insert(
            (run.owner, run.invocation_id),
            Run::Running {
                reservation_id,
                digest: run.call_digest,
            },
        );
        Ok(*reservation)
    }

    /// Whether `run` may start: `Ok` if it never ran here, otherwise whether it is
    /// running, ran, or its id was used for another call.
    pub fn check_run(&self, run: &RunKey) -> Result<(), StartError> {
        match self.runs.get(&(run.owner, run.invocation_id)) {
            Some(Run::Running { digest, .. } | Run::Done { digest })
                if *digest != run.call_digest =>
            {
                Err(StartError::ReusedId(run.invocation_id))
            }
            Some(Run::Running {
                reservation_id: on, ..
            }) => Err(StartError::AlreadyRunning(*on, run.invocation_id)),
            Some(Run::Done { .. }) => Err(StartError::AlreadyRan(run.invocation_id)),
            None => Ok(()),
        }
    }

    /// The call on reservation `reservation_id` ended: the reservation is done and gone
    /// (its memory goes back), its run is remembered. `None` if it was not running.
    pub fn finish(&mut self, reservation_id: u64) -> Option<Reservation> {
        let reservation = *self.reservations.get(&reservation_id)?;
        let ReservationState::Running { invocation_id, .. } = reservation.state else {
            return None;
        };
        self.reservations.remove(&reservation_id);
        let key = (reservation.owner, invocation_id);
        if let Some(Run::Running { digest, .. }) = self.runs.get(&key).copied() {
            self.runs.insert(key, Run::Done { digest });
            self.finished.push_back(key);
            while self.finished.len() > self.config.remembered_runs {
                if let Some(old) = self.finished.pop_front() {
                    self.runs.remove(&old);
                }
            }
        }
        Some(reservation)
    }

    /// Remembers `run` as one that ran here before this node restarted (its record kept
    /// across the restart): a repeat is answered as a repeat, never run again. Bounded
    /// like finished runs.
    pub fn remember_ran(&mut self, run: RunKey) {
        let key = (run.owner, run.invocation_id);
        if self.runs.contains_key(&key) {
            return;
        }
        self.runs.insert(
            key,
            Run::Done {
                digest: run.call_digest,
            },
        );
        self.finished.push_back(key);
        while self.finished.len() > self.config.remembered_runs {
            if let Some(old) = self.finished.pop_front() {
                self.runs.remove(&old);
            }
        }
    }

    /// Releases held reservation `reservation_id` for `owner`: `Ok(Some(_))` with what
    /// was released, `Ok(None)` if there is no such reservation (released already).
    pub fn release(
        &mut self,
        owner: PeerId,
        reservation_id: u64,
    ) -> Result<Option<Reservation>, ReleaseError> {
        let Some(reservation) = self.reservations.get(&reservation_id) else {
            return Ok(None);
        };
        if reservation.owner != owner {
            return Err(ReleaseError::NotOwner(reservation_id));
        }
        if reservation.is_running() {
            return Err(ReleaseError::Running(reservation_id));
        }
        Ok(self.reservations.remove(&reservation_id))
    }

    /// Held reservations whose time ran out by `now_ms`, removed.
    pub fn lapse(&mut self, now_ms: u64) -> Vec<Reservation> {
        self.remove_held(
            |r| matches!(r.state, ReservationState::Held { until_ms } if until_ms <= now_ms),
        )
    }

    /// `owner` is gone (no longer connected): its held reservations lapse at once and are
    /// returned. Running ones end with their calls.
    pub fn owner_gone(&mut self, owner: PeerId) -> Vec<Reservation> {
        self.remove_held(|r| r.owner == owner)
    }

    fn remove_held(&mut self, mut matches: impl FnMut(&Reservation) -> bool) -> Vec<Reservation> {
        let ids: Vec<u64> = self
            .reservations
            .values()
            .filter(|r| !r.is_running() && matches(r))
            .map(|r| r.reservation_id)
            .collect();
        ids.iter()
            .filter_map(|id| self.reservations.remove(id))
            .collect()
    }

    /// The owners of held reservations, for checking that they are still there.
    pub fn holding_owners(&self) -> Vec<PeerId> {
        let mut owners: Vec<PeerId> = self
            .reservations
            .values()
            .filter(|r| !r.is_running())
            .map(|r| r.owner)
            .collect();
        owners.sort_unstable();
        owners.dedup();
        owners
    }

    /// When the next held reservation lapses.
    pub fn next_lapse(&self) -> Option<u64> {
        self.reservations
            .values()
            .filter_map(|r| match r.state {
                ReservationState::Held { until_ms } => Some(until_ms),
                ReservationState::Running { .. } => None,
            })
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(owner: PeerId, invocation_id: u64, digest: u8) -> RunKey {
        RunKey {
            owner,
            invocation_id,
            call_digest: [digest; 32],
        }
    }

    fn held(ledger: &mut Ledger, now: u64, owner: PeerId, id: u64, mib: u32) -> Reservation {
        assert_eq!(ledger.check_admit(owner, id, 1, mib), Ok(None));
        ledger.hold(now, owner, id, 1, mib, 1_000)
    }

    #[test]
    fn only_the_owner_runs_on_or_releases_a_reservation() {
        let mut ledger = Ledger::new(LedgerConfig::default());
        let (owner, stranger) = (PeerId::random(), PeerId::random());
        held(&mut ledger, 0, owner, 7, 256);
        assert_eq!(ledger.release(stranger, 7), Err(ReleaseError::NotOwner(7)));
        assert_eq!(
            ledger.start(1, 7, run(stranger, 1, 0), 128),
            Err(StartError::NotOwner(7))
        );
        // A stranger cannot take the id either.
        assert_eq!(
            ledger.check_admit(stranger, 7, 1, 256),
            Err(AdmitError::Conflict(7))
        );
        assert!(ledger.get(7).is_some_and(|r| !r.is_running()));
        assert_eq!(ledger.release(owner, 7).unwrap().map(|r| r.mib), Some(256));
        assert_eq!(ledger.release(owner, 7), Ok(None), "released once");
    }

    #[test]
    fn a_running_reservation_ends_only_with_its_call() {
        let mut ledger = Ledger::new(LedgerConfig::default());
        let owner = PeerId::random();
        held(&mut ledger, 0, owner, 7, 256);
        assert_eq!(
            ledger.start(1, 7, run(owner, 1, 0), 512),
            Err(StartError::TooSmall {
                reservation_id: 7,
                held_mib: 256,
                asked_mib: 512
            })
        );
        let running = ledger.start(2, 7, run(owner, 1, 0), 200).unwrap();
        assert!(running.is_running());
        // Neither its owner's release nor its deadline ends it.
        assert_eq!(ledger.release(owner, 7), Err(ReleaseError::Running(7)));
        assert!(ledger.lapse(1_000_000).is_empty());
        assert!(ledger.owner_gone(owner).is_empty());
        assert_eq!(ledger.next_lapse(), None);
        // A second call on it is refused.
        assert_eq!(
            ledger.start(3, 7, run(owner, 2, 0), 100),
            Err(StartError::InUse(7))
        );
        assert_eq!(ledger.finish(7).map(|r| r.reservation_id), Some(7));
        assert!(ledger.is_empty());
        assert_eq!(ledger.finish(7), None);
    }

    #[test]
    fn a_run_happens_at_most_once_per_owner_and_invocation() {
        let mut ledger = Ledger::new(LedgerConfig::default());
        let (owner, other) = (PeerId::random(), PeerId::random());
        held(&mut ledger, 0, owner, 1, 128);
        held(&mut ledger, 0, owner, 2, 128);
        ledger.start(1, 1, run(owner, 42, 9), 128).unwrap();
        assert_eq!(
            ledger.start(1, 2, run(owner, 42, 9), 128),
            Err(StartError::AlreadyRunning(1, 42))
        );
        ledger.finish(1);
        assert_eq!(
            ledger.start(2, 2, run(owner, 42, 9), 128),
            Err(StartError::AlreadyRan(42))
        );
        // The same id for another call is refused; another owner's id is its own.
        assert_eq!(
            ledger.start(2, 2, run(owner, 42, 8), 128),
            Err(StartError::ReusedId(42))
        );
        held(&mut ledger, 0, other, 3, 128);
        assert!(ledger.start(3, 3, run(other, 42, 9), 128).is_ok());
    }

    #[test]
    fn finished_runs_are_forgotten_oldest_first_past_the_bound() {
        let mut ledger = Ledger::new(LedgerConfig {
            remembered_runs: 2,
            ..LedgerConfig::default()
        });
        let owner = PeerId::random();
        for id in 1..=3 {
            held(&mut ledger, 0, owner, id, 128);
            ledger.start(1, id, run(owner, id, 0), 128).unwrap();
            ledger.finish(id);
        }
        assert_eq!(ledger.runs.len(), 2);
        held(&mut ledger, 0, owner, 9, 128);
        assert!(
            ledger.start(1, 9, run(owner, 1, 0), 128).is_ok(),
            "forgotten"
        );
    }

    #[test]
    fn admission_is_capped_in_all_and_per_owner() {
        let mut ledger = Ledger::new(LedgerConfig {
            max_reservations: 3,
            max_per_owner: 2,
            ..LedgerConfig::default()
        });
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        held(&mut ledger, 0, a, 1, 128);
        held(&mut ledger, 0, a, 2, 128);
        assert_eq!(
            ledger.check_admit(a, 3, 1, 128),
            Err(AdmitError::OwnerFull { owner: a, max: 2 })
        );
        // A retry of a held one is no new admission.
        assert!(matches!(ledger.check_admit(a, 2, 1, 128), Ok(Some(_))));
        held(&mut ledger, 0, b, 3, 128);
        assert_eq!(ledger.check_admit(c, 4, 1, 128), Err(AdmitError::Full(3)));
    }

    #[test]
    fn held_reservations_lapse_in_time_or_when_their_owner_goes() {
        let mut ledger = Ledger::new(LedgerConfig::default());
        let (a, b) = (PeerId::random(), PeerId::random());
        held(&mut ledger, 0, a, 1, 128);
        held(&mut ledger, 500, b, 2, 128);
        held(&mut ledger, 0, b, 3, 128);
        ledger.start(10, 3, run(b, 1, 0), 128).unwrap();
        assert_eq!(ledger.next_lapse(), Some(1_000));
        assert_eq!(ledger.holding_owners().len(), 2);
        assert!(ledger.lapse(999).is_empty());
        assert_eq!(
            ledger
                .lapse(1_000)
                .iter()
                .map(|r| r.reservation_id)
                .collect::<Vec<_>>(),
            [1]
        );
        // b leaves: its held one lapses, its running one goes on.
        assert_eq!(
            ledger
                .owner_gone(b)
                .iter()
                .map(|r| r.reservation_id)
                .collect::<Vec<_>>(),
            [2]
        );
        assert!(ledger.get(3).is_some_and(Reservation::is_running));
        // Holds are cut to the longest allowed.
        let r = ledger.hold(0, a, 9, 1, 128, u64::MAX);
        assert_eq!(
            r.state,
            ReservationState::Held {
                until_ms: LedgerConfig::default().max_hold_ms
            }
        );
    }

    #[test]
    fn a_run_remembered_from_before_a_restart_is_never_started_again() {
        let mut ledger = Ledger::new(LedgerConfig::default());
        let owner = PeerId::random();
        let run = RunKey {
            owner,
            invocation_id: 7,
            call_digest: [1; 32],
        };
        ledger.remember_ran(run);
        assert_eq!(ledger.check_run(&run), Err(StartError::AlreadyRan(7)));
        let other_call = RunKey {
            call_digest: [2; 32],
            ..run
        };
        assert_eq!(ledger.check_run(&other_call), Err(StartError::ReusedId(7)));
        let other_id = RunKey {
            invocation_id: 8,
            ..run
        };
        assert_eq!(ledger.check_run(&other_id), Ok(()));
    }
}
