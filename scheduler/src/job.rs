//! A detached job on the scheduler that took it: the phases it goes through, the
//! versions of its record, how many peers kept the latest one, and when to place it or
//! publish it again.
//!
//! The scheduler's node carries out the [`JobAction`]s — it signs each version and sends
//! it to the peers closest to the job's key, and places the call — and feeds back what
//! happened ([`JobRun::on_published`], [`JobRun::on_placed`]). A job waits for an offer
//! that fits, trying again every `retry_every_ms`, until its own deadline; a version
//! that no peer kept is sent again at the same pace, so a scheduler that took a job
//! before its routing table filled still gets the record out. Once the job has ended
//! nothing is due: the final version is republished with every other record the node
//! keeps. A job under way makes a new version at least every
//! [`JobRun::keep_alive_every`] (a heartbeat), so the peers keeping its record can tell
//! a live scheduler from one gone, whose jobs another peer takes over.

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Taken, and waiting for an offer that fits.
    Waiting,
    /// Being placed or run.
    Running,
    /// It ran.
    Done,
    /// It could not run, or waited past its deadline.
    Failed,
}

impl Phase {
    /// Whether the job has ended (nothing changes after).
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Done | Phase::Failed)
    }
}

/// What a job needs of its scheduler's node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobAction {
    /// Sign this version of the record and send it to the peers closest to the job's key.
    Publish(Version),
    /// Place the call and run it (one placement, with its own retries), then report with
    /// [`JobRun::on_placed`].
    Place,
}

/// One version of a job's record: what the machine decides of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// Its sequence number: higher is newer.
    pub seq: u64,
    /// The phase it records.
    pub phase: Phase,
    /// Placements tried so far.
    pub attempts: u32,
    /// Why it is waiting again, or why it failed.
    pub error: Option<String>,
}

/// How a placement of the job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placed {
    /// The call ran (whatever its exit status).
    Ran,
    /// It could not be placed or run.
    Failed {
        /// Why.
        reason: String,
        /// Whether trying again later might succeed (nothing fitted, say).
        retryable: bool,
    },
}

/// One job's lifecycle.
#[derive(Debug, Clone)]
pub struct JobRun {
    latest: Version,
    wait_until_ms: u64,
    retry_every_ms: u64,
    /// When the waiting job is placed again.
    retry_at_ms: Option<u64>,
    /// When the latest version, kept by no peer, is sent again.
    republish_at_ms: Option<u64>,
    /// Peers that kept the latest version.
    keepers: usize,
    placing: bool,
    /// How often a job under way makes a new version (0: never).
    alive_every_ms: u64,
    /// When the next heartbeat version is due.
    alive_at_ms: Option<u64>,
}

impl JobRun {
    /// Takes a job at `now_ms` that may wait for an offer until `wait_until_ms`, and
    /// tries again every `retry_every_ms` (at least 1): its first versions (waiting, then
    /// running) and its first placement.
    pub fn start(now_ms: u64, wait_until_ms: u64, retry_every_ms: u64) -> (JobRun, Vec<JobAction>) {
        let first = Version {
            seq: 0,
            phase: Phase::Waiting,
            attempts: 0,
            error: None,
        };
        let mut run = JobRun::at(first, wait_until_ms, retry_every_ms);
        let mut actions = vec![run.next_version(Phase::Waiting, None)];
        actions.extend(run.place(now_ms));
        (run, actions)
    }

    /// Carries on, at `now_ms`, a job whose scheduler restarted with `latest` as its
    /// newest version (not final): a new version says it waits again, then it is placed
    /// again (a placement under way when the scheduler stopped is asked again, under the
    /// same invocation id, so a volunteer that ran it answers with that run) — or, past
    /// its deadline, it ends.
    pub fn resume(
        now_ms: u64,
        latest: Version,
        wait_until_ms: u64,
        retry_every_ms: u64,
    ) -> (JobRun, Vec<JobAction>) {
        let run = JobRun::at(latest, wait_until_ms, retry_every_ms);
        if run.is_finished() {
            return (run, Vec::new());
        }
        run.carry_on(now_ms, "its scheduler restarted".to_string())
    }

    /// Carries on, at `now_ms`, a job taken over from its scheduler, which went silent,
    /// with `latest` as its newest version: as [`JobRun::resume`], saying why.
    pub fn take_over(
        now_ms: u64,
        latest: Version,
        wait_until_ms: u64,
        retry_every_ms: u64,
        reason: String,
    ) -> (JobRun, Vec<JobAction>) {
        let run = JobRun::at(latest, wait_until_ms, retry_every_ms);
        if run.is_finished() {
            return (run, Vec::new());
        }
        run.carry_on(now_ms, reason)
    }

    /// A new version says the job waits again (for `reason`), then it is placed — or,
    /// past its deadline, it ends.
    fn carry_on(self, now_ms: u64, reason: String) -> (JobRun, Vec<JobAction>) {
        let mut run = self;
        if now_ms > run.wait_until_ms {
            let reason = format!("gave up waiting at its deadline: {reason}");
            let ended = run.next_version(Phase::Failed, Some(reason));
            return (run, vec![ended]);
        }
        let mut actions = vec![run.next_version(Phase::Waiting, Some(reason))];
        actions.extend(run.place(now_ms));
        (run, actions)
    }

    /// A job whose latest version is `latest`, nothing under way or due.
    fn at(latest: Version, wait_until_ms: u64, retry_every_ms: u64) -> JobRun {
        JobRun {
            latest,
            wait_until_ms,
            retry_every_ms: retry_every_ms.max(1),
            retry_at_ms: None,
            republish_at_ms: None,
            keepers: 0,
            placing: false,
            alive_every_ms: 0,
            alive_at_ms: None,
        }
    }

    /// Makes a new version of a job under way every `every_ms` from `now_ms` on, even
    /// when nothing changed (0: never).
    pub fn keep_alive_every(&mut self, now_ms: u64, every_ms: u64) {
        self.alive_every_ms = every_ms;
        self.alive_at_ms = (every_ms > 0).then(|| now_ms.saturating_add(every_ms));
    }

    /// The latest version.
    pub fn latest(&self) -> &Version {
        &self.latest
    }

    /// Peers that kept the latest version.
    pub fn keepers(&self) -> usize {
        self.keepers
    }

    /// Whether the job has ended.
    pub fn is_finished(&self) -> bool {
        self.latest.phase.is_final()
    }

    /// When [`JobRun::poll`] has something to do next.
    pub fn next_wakeup(&self) -> Option<u64> {
        let alive = self.alive_at_ms.filter(|_| !self.is_finished());
        [self.retry_at_ms, self.republish_at_ms, alive]
            .into_iter()
            .flatten()
            .min()
    }

    /// What is due at `now_ms`: a waiting job's next placement (or, woken past its
    /// deadline, its end), or sending again a version nobody kept.
    pub fn poll(&mut self, now_ms: u64) -> Vec<JobAction> {
        let mut actions = Vec::new();
        if self.retry_at_ms.is_some_and(|t| t <= now_ms) {
            self.retry_at_ms = None;
            if now_ms <= self.wait_until_ms {
                actions.extend(self.place(now_ms));
            } else {
                let reason = self.latest.error.clone().unwrap_or_default();
                let reason = format!("gave up waiting at its deadline: {reason}");
                actions.push(self.next_version(Phase::Failed, Some(reason)));
            }
        }
        if self.republish_at_ms.is_some_and(|t| t <= now_ms) {
            self.republish_at_ms = None;
            actions.push(JobAction::Publish(self.latest.clone()));
        }
        if !self.is_finished() && self.alive_at_ms.is_some_and(|t| t <= now_ms) {
            self.alive_at_ms = Some(now_ms.saturating_add(self.alive_every_ms));
            if actions.is_empty() {
                let (phase, error) = (self.latest.phase, self.latest.error.clone());
                actions.push(self.next_version(phase, error));
            }
        }
        actions
    }

    /// `keepers` peers kept version `seq`; a version of a job still under way kept by
    /// none is sent again after `retry_every_ms` (a final one is left to the book that
    /// republishes every record it keeps). Reports of older versions are ignored.
    pub fn on_published(&mut self, now_ms: u64, seq: u64, keepers: usize) {
        if seq != self.latest.seq {
            return;
        }
        self.keepers = keepers;
        self.republish_at_ms = (keepers == 0 && !self.is_finished())
            .then(|| now_ms.saturating_add(self.retry_every_ms));
    }

    /// The placement ended: done, failed, or waiting to try again while its deadline
    /// allows.
    pub fn on_placed(&mut self, now_ms: u64, placed: Placed) -> Vec<JobAction> {
        if !self.placing {
            return Vec::new();
        }
        self.placing = false;
        let version = match placed {
            Placed::Ran => self.next_version(Phase::Done, None),
            Placed::Failed {
                reason,
                retryable: true,
            } if now_ms.saturating_add(self.retry_every_ms) <= self.wait_until_ms => {
                self.retry_at_ms = Some(now_ms + self.retry_every_ms);
                self.next_version(Phase::Waiting, Some(reason))
            }
            Placed::Failed { reason, retryable } => {
                let reason = if retryable {
                    format!("gave up waiting at its deadline: {reason}")
                } else {
                    reason
                };
                self.next_version(Phase::Failed, Some(reason))
            }
        };
        vec![version]
    }

    /// A placement now, unless the job has ended or one is under way.
    fn place(&mut self, _now_ms: u64) -> Vec<JobAction> {
        if self.is_finished() || self.placing {
            return Vec::new();
        }
        self.placing = true;
        self.latest.attempts += 1;
        let error = self.latest.error.clone();
        vec![self.next_version(Phase::Running, error), JobAction::Place]
    }

    /// Makes the next version, in `phase`, and asks for it to be published.
    fn next_version(&mut self, phase: Phase, error: Option<String>) -> JobAction {
        self.latest = Version {
            seq: self.latest.seq.saturating_add(1),
            phase,
            attempts: self.latest.attempts,
            error,
        };
        self.keepers = 0;
        self.republish_at_ms = None;
        if phase.is_final() {
            self.retry_at_ms = None;
        }
        JobAction::Publish(self.latest.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn phases(actions: &[JobAction]) -> Vec<Phase> {
        actions
            .iter()
            .filter_map(|a| match a {
                JobAction::Publish(v) => Some(v.phase),
                JobAction::Place => None,
            })
            .collect()
    }

    #[test]
    fn a_resumed_job_waits_again_with_newer_versions_and_is_placed_or_ends_past_its_deadline() {
        let running = Version {
            seq: 2,
            phase: Phase::Running,
            attempts: 1,
            error: None,
        };
        let (mut run, actions) = JobRun::resume(1_000, running.clone(), 60_000, 1_000);
        assert_eq!(phases(&actions), [Phase::Waiting, Phase::Running]);
        assert_eq!(actions.last(), Some(&JobAction::Place));
        assert_eq!((run.latest().seq, run.latest().attempts), (4, 2));
        assert_eq!(phases(&run.on_placed(2_000, Placed::Ran)), [Phase::Done]);
        let (run, actions) = JobRun::resume(70_000, running, 60_000, 1_000);
        assert_eq!(phases(&actions), [Phase::Failed]);
        assert!(run.is_finished() && run.latest().seq == 3);
        let done = Version {
            seq: 3,
            phase: Phase::Done,
            attempts: 1,
            error: None,
        };
        assert!(JobRun::resume(0, done, 60_000, 1_000).1.is_empty());
    }

    #[test]
    fn a_job_that_fits_at_once_is_published_waiting_running_done() {
        let (mut run, actions) = JobRun::start(0, 60_000, 1_000);
        assert_eq!(phases(&actions), [Phase::Waiting, Phase::Running]);
        assert_eq!(actions.last(), Some(&JobAction::Place));
        let done = run.on_placed(500, Placed::Ran);
        assert_eq!(phases(&done), [Phase::Done]);
        assert_eq!(run.latest().seq, 3);
        assert_eq!(run.latest().attempts, 1);
        assert!(run.is_finished());
        assert_eq!(run.next_wakeup(), None);
    }

    #[test]
    fn a_job_waits_and_tries_again_until_its_deadline_then_gives_up() {
        let (mut run, _) = JobRun::start(0, 3_500, 1_000);
        let nothing = || Placed::Failed {
            reason: "nothing fits".into(),
            retryable: true,
        };
        let waiting = run.on_placed(100, nothing());
        assert_eq!(phases(&waiting), [Phase::Waiting]);
        assert_eq!(run.latest().error.as_deref(), Some("nothing fits"));
        assert_eq!(run.next_wakeup(), Some(1_100));
        assert!(run.poll(1_099).is_empty(), "not before its time");
        let again = run.poll(1_100);
        assert_eq!(phases(&again), [Phase::Running]);
        assert_eq!(again.last(), Some(&JobAction::Place));
        assert_eq!(run.latest().attempts, 2);
        run.on_placed(1_200, nothing());
        run.poll(2_200);
        // 2 600 + 1 000 is past the deadline: no more waiting.
        let gave_up = run.on_placed(2_600, nothing());
        assert_eq!(phases(&gave_up), [Phase::Failed]);
        let error = run.latest().error.clone().unwrap();
        assert!(
            error.starts_with("gave up waiting at its deadline"),
            "{error}"
        );
        assert_eq!(run.latest().attempts, 3);
        assert!(run.poll(10_000).is_empty());
    }

    #[test]
    fn a_job_woken_past_its_deadline_ends_instead_of_starting() {
        let (mut run, _) = JobRun::start(0, 1_500, 1_000);
        run.on_placed(
            100,
            Placed::Failed {
                reason: "nothing fits".into(),
                retryable: true,
            },
        );
        let late = run.poll(9_000);
        assert_eq!(phases(&late), [Phase::Failed]);
        assert!(!late.contains(&JobAction::Place));
        let error = run.latest().error.clone().unwrap();
        assert_eq!(error, "gave up waiting at its deadline: nothing fits");
    }

    #[test]
    fn a_call_that_cannot_run_fails_at_once() {
        let (mut run, _) = JobRun::start(0, 600_000, 1_000);
        let failed = run.on_placed(
            10,
            Placed::Failed {
                reason: "the module does not validate".into(),
                retryable: false,
            },
        );
        assert_eq!(phases(&failed), [Phase::Failed]);
        assert_eq!(
            run.latest().error.as_deref(),
            Some("the module does not validate")
        );
    }

    #[test]
    fn a_version_no_peer_kept_is_sent_again_and_one_kept_is_not() {
        let (mut run, _) = JobRun::start(0, 600_000, 1_000);
        let seq = run.latest().seq;
        run.on_published(50, seq - 1, 3);
        assert_eq!(run.keepers(), 0, "a report of an older version is ignored");
        run.on_published(50, seq, 0);
        assert_eq!(run.next_wakeup(), Some(1_050));
        assert_eq!(
            run.poll(1_050),
            [JobAction::Publish(run.latest().clone())],
            "the same version, again"
        );
        run.on_published(1_100, seq, 2);
        assert_eq!(run.keepers(), 2);
        assert_eq!(run.next_wakeup(), None);
    }

    #[derive(Debug, Clone)]
    enum Event {
        Placed { ran: bool, retryable: bool },
        Published { keepers: usize },
        Wait(u64),
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            (any::<bool>(), any::<bool>())
                .prop_map(|(ran, retryable)| Event::Placed { ran, retryable }),
            (0usize..4).prop_map(|keepers| Event::Published { keepers }),
            (0u64..5_000).prop_map(Event::Wait),
        ]
    }

    proptest! {
        /// Over any sequence of answers and delays: versions only grow by one; a final
        /// phase is final; a placement is asked for only while running, one at a time;
        /// attempts count the placements; none starts past the job's deadline.
        #[test]
        fn a_job_run_keeps_its_invariants(
            wait in 0u64..20_000,
            retry in 1u64..3_000,
            events in proptest::collection::vec(event(), 0..60),
        ) {
            let mut now = 0;
            let (mut run, actions) = JobRun::start(now, wait, retry);
            let mut seq = 0;
            let mut placing = 0u32;
            let mut places = 0u32;
            let mut finished = false;
            let mut check = |actions: &[JobAction], run: &JobRun, now: u64, placing: &mut u32| {
                for action in actions {
                    match action {
                        JobAction::Publish(v) => {
                            prop_assert!(v.seq == seq + 1 || v.seq == seq, "seq {} after {}", v.seq, seq);
                            prop_assert!(!finished || v.seq == seq, "a change after a final phase");
                            seq = v.seq;
                            finished |= v.phase.is_final();
                        }
                        JobAction::Place => {
                            prop_assert_eq!(run.latest().phase, Phase::Running);
                            prop_assert!(now == 0 || now <= wait, "placed past the deadline");
                            *placing += 1;
                            places += 1;
                            prop_assert!(*placing <= 1, "two placements at once");
                        }
                    }
                }
                prop_assert_eq!(run.latest().attempts, places);
                Ok(())
            };
            check(&actions, &run, now, &mut placing)?;
            for event in events {
                let actions = match event {
                    Event::Placed { ran, retryable } => {
                        let was_placing = placing > 0;
                        let placed = if ran {
                            Placed::Ran
                        } else {
                            Placed::Failed { reason: "no".into(), retryable }
                        };
                        let actions = run.on_placed(now, placed);
                        if was_placing {
                            placing -= 1;
                        } else {
                            prop_assert!(actions.is_empty(), "an answer nobody asked for changed the job");
                        }
                        actions
                    }
                    Event::Published { keepers } => {
                        run.on_published(now, run.latest().seq, keepers);
                        Vec::new()
                    }
                    Event::Wait(ms) => {
                        now += ms;
                        run.poll(now)
                    }
                };
                check(&actions, &run, now, &mut placing)?;
                if run.is_finished() {
                    // Nothing is due once it has ended.
                    prop_assert_eq!(run.next_wakeup(), None);
                    prop_assert!(run.clone().poll(now + 1_000_000_000).is_empty());
                }
            }
        }
    }

    #[test]
    fn a_job_under_way_makes_a_version_every_heartbeat_and_an_ended_one_does_not() {
        let (mut run, _) = JobRun::start(0, 1_000_000, 100);
        run.keep_alive_every(0, 500);
        // Placed and running: nothing changes, yet a version is made every 500 ms.
        assert_eq!(run.next_wakeup(), Some(500));
        let seq = run.latest().seq;
        let beat = run.poll(500);
        assert_eq!(phases(&beat), vec![Phase::Running]);
        assert_eq!(run.latest().seq, seq + 1);
        assert_eq!(run.next_wakeup(), Some(1000));
        assert!(run.poll(999).is_empty());
        run.on_placed(1200, Placed::Ran);
        assert!(run.is_finished());
        assert_eq!(run.next_wakeup(), None);
        assert!(run.poll(5000).is_empty());
    }

    #[test]
    fn a_job_taken_over_says_so_and_is_placed_again() {
        let latest = Version {
            seq: 4,
            phase: Phase::Running,
            attempts: 2,
            error: None,
        };
        let (run, actions) =
            JobRun::take_over(10, latest, 1000, 100, "taken over by p".to_string());
        assert_eq!(phases(&actions), vec![Phase::Waiting, Phase::Running]);
        assert!(actions.contains(&JobAction::Place));
        assert_eq!(run.latest().seq, 6);
        assert_eq!(run.latest().attempts, 3);
    }
}
