//! The market's one owner: an event loop that owns the machines the rest of the node
//! shares — the holder, the offerer and its reservation ledger, the super-trader list, the
//! job book and the memo book — and carries out what they ask.
//!
//! No other task touches them. A task that needs one sends a command over a bounded
//! channel and awaits its oneshot reply ([`Market::with`]); commands run one at a time,
//! each handed `now` from the market's [`Clock`](super::clock::Clock). Between commands
//! the loop wakes for the machines' own timers (offer refreshes and moves, reports to a
//! scheduler, hold deadlines, expiries), checks that the owners of held reservations are
//! still connected, and republishes job records. The I/O their actions need — holder
//! lookups, deliveries, reports — runs as tracked tasks ([`Market::spawn`]) that report
//! back as commands, and [`Market::shutdown`] waits for them.
//!
//! Each call's own machines (a [`Placer`](flotilla_scheduler::placer::Placer), a
//! [`Discovery`](flotilla_scheduler::discovery::Discovery)) are not shared: the one task
//! that carries out a call owns them.

use super::Market;
use super::jobs::{JobBook, MAX_REPUBLISHED_PER_ROUND, MAX_TAKEOVERS_PER_ROUND, book_limits};
use super::memos::MemoBook;
use flotilla_offers::holder::Holder;
use flotilla_offers::offerer::{Action, Offerer};
use flotilla_scheduler::supertraders::SuperTraders;
use libp2p::PeerId;
use rand::SeedableRng;
use rand::rngs::StdRng;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Commands queued for the loop before senders wait.
pub(super) const COMMAND_QUEUE: usize = 1024;
/// Longest the loop sleeps with nothing due, so gauges follow expiries closely.
const IDLE_TICK: Duration = Duration::from_secs(1);
/// How often the owners of held reservations are checked for still being connected.
const OWNER_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// Pause before reporting a holder lookup that failed at once (the network stopping, say),
/// so a failing lookup is not retried in a tight loop.
pub(super) const LOOKUP_RETRY_PAUSE: Duration = Duration::from_secs(1);

/// The machines the loop owns.
pub(super) struct Machines {
    /// Offers held here for others.
    pub holder: Holder,
    /// This node's offers and reservations (an offering node only).
    pub offerer: Option<Offerer>,
    /// The super-trader list (a scheduler only).
    pub super_traders: Option<SuperTraders>,
    /// Job records kept here: this scheduler's jobs and copies of others'.
    pub jobs: JobBook,
    /// Memoized results kept here for others (and this node's own calls').
    pub memos: MemoBook,
    /// Offerer actions a command produced, carried out by the loop once it returns.
    outbox: Vec<Action>,
}

impl Machines {
    /// The machines of node `me`, none of them started yet.
    pub fn new(
        me: PeerId,
        holder: Holder,
        offerer: Option<Offerer>,
        super_traders: Option<SuperTraders>,
        takeover_grace: Duration,
    ) -> Machines {
        Machines {
            holder,
            offerer,
            super_traders,
            jobs: JobBook::keeping_own(book_limits(takeover_grace), me),
            memos: MemoBook::new(Default::default()),
            outbox: Vec::new(),
        }
    }

    /// Queues offerer actions for the loop to carry out (a signing failure is logged:
    /// the offer stays as it was and is tried again at its next timer).
    pub fn carry_out<E: std::fmt::Display>(&mut self, actions: Result<Vec<Action>, E>) {
        match actions {
            Ok(actions) => self.outbox.extend(actions),
            Err(e) => tracing::warn!(error = %e, "cannot sign an offer"),
        }
    }
}

/// What a command does: runs on the machines at `now`, and answers its sender.
type Work = Box<dyn FnOnce(&mut Machines, u64) + Send>;

/// Work for the loop.
pub(super) struct Command(Work);

/// The market has stopped: its loop no longer takes commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the node is stopping")]
pub struct Stopped;

impl Market {
    /// Runs `work` on the machines, in the loop, and answers what it returns.
    pub(super) async fn with<R: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Machines, u64) -> R + Send + 'static,
    ) -> Result<R, Stopped> {
        self.with_undo(work, |_, _, _| {}).await
    }

    /// Runs `work` like [`Market::with`]; if its answer cannot be delivered because the
    /// asker is gone (its future dropped), `undo` runs on it in the same command, so what
    /// `work` did for the asker is not left behind.
    pub(super) async fn with_undo<R: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Machines, u64) -> R + Send + 'static,
        undo: impl FnOnce(&mut Machines, u64, R) + Send + 'static,
    ) -> Result<R, Stopped> {
        let (reply, answer) = oneshot::channel();
        let command = Command(Box::new(move |machines, now| {
            if let Err(unread) = reply.send(work(machines, now)) {
                undo(machines, now, unread);
            }
        }));
        self.shared
            .commands
            .send(command)
            .await
            .map_err(|_| Stopped)?;
        answer.await.map_err(|_| Stopped)
    }

    /// Queues `work` for the loop without waiting for it, from code that cannot wait (a
    /// drop); if the queue is full, a tracked task waits for room.
    pub(super) fn later(&self, work: impl FnOnce(&mut Machines, u64) + Send + 'static) {
        let command = Command(Box::new(work));
        if let Err(mpsc::error::TrySendError::Full(command)) =
            self.shared.commands.try_send(command)
        {
            let commands = self.shared.commands.clone();
            self.spawn(async move {
                let _ = commands.send(command).await;
            });
        }
    }

    /// Runs `task` beside the loop, tracked: [`Market::shutdown`] cancels it and waits
    /// for it to end.
    pub(super) fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let cancel = self.shared.cancel.clone();
        self.shared.tasks.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = task => {}
            }
        });
    }

    /// Tasks of the market still running (the loop included), for tests and `stop`.
    pub fn tasks_running(&self) -> usize {
        self.shared.tasks.len()
    }

    /// Stops the loop and every tracked task, and waits (at most `grace`) for them to end.
    pub(super) async fn shutdown(&self, grace: Duration) {
        self.shared.cancel.cancel();
        self.shared.tasks.close();
        if tokio::time::timeout(grace, self.shared.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                running = self.shared.tasks.len(),
                "market tasks did not stop in time"
            );
        }
    }

    /// The loop: takes commands, wakes for the machines' timers, and starts the I/O
    /// their actions need, until the market stops.
    pub(super) async fn run_machines(
        self,
        mut machines: Machines,
        mut commands: mpsc::Receiver<Command>,
    ) {
        let mut rng = StdRng::from_os_rng();
        let mut owner_checks = tokio::time::interval(OWNER_CHECK_INTERVAL);
        owner_checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let republish_every = self.shared.config.job_republish_interval;
        let mut republishing = tokio::time::interval(republish_every);
        republishing.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Jobs whose scheduler went silent are looked for a few times per grace period.
        let takeover_every =
            (self.shared.config.job_takeover_grace / 4).max(Duration::from_millis(100));
        let mut takeover_checks = tokio::time::interval(takeover_every);
        takeover_checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The holder's next expiry, looked up at most every `IDLE_TICK` (a scan of what
        // it holds): answers filter expired offers anyway, eviction only frees room.
        let mut holder_check = 0;
        loop {
            let now = self.now();
            self.poll_timers(&mut machines, now, &mut rng, &mut holder_check);
            for action in std::mem::take(&mut machines.outbox) {
                self.spawn(self.clone().perform(action));
            }
            let wake = self.next_wakeup(&machines, now, holder_check);
            // Not biased: under a steady stream of commands the timers still get their turn.
            tokio::select! {
                _ = self.shared.cancel.cancelled() => return,
                command = commands.recv() => match command {
                    Some(Command(work)) => self.run_command(work, &mut machines),
                    None => return,
                },
                _ = tokio::time::sleep(wake) => {}
                _ = owner_checks.tick() => self.check_owners(&machines),
                _ = republishing.tick() => {
                    let due = machines.jobs.due_for_republishing(
                        self.now(),
                        republish_every.as_millis() as u64,
                        MAX_REPUBLISHED_PER_ROUND,
                    );
                    if !due.is_empty() {
                        self.spawn(self.clone().republish(due));
                    }
                }
                _ = takeover_checks.tick(), if self.is_scheduler() => {
                    let abandoned = machines.jobs.abandoned(
                        self.now(),
                        self.peer_id(),
                        takeover_every.as_millis() as u64,
                        MAX_TAKEOVERS_PER_ROUND,
                    );
                    for (job, silent_ms) in abandoned {
                        self.spawn(self.clone().consider_takeover(job, silent_ms));
                    }
                }
            }
        }
    }

    /// Runs one command. A panic in it (a bug of ours) is logged and counted, and the
    /// loop goes on with the machines as the command left them — as a poisoned lock was
    /// taken over before — rather than every later command failing.
    fn run_command(&self, work: Work, machines: &mut Machines) {
        let now = self.now();
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(machines, now)));
        if ran.is_err() {
            self.shared.metrics.command_panics.inc();
            tracing::error!("a market command panicked; the loop goes on");
        }
    }

    /// Gives each machine its due timers: offers to publish, refresh or move, a report to
    /// send, expired offers to drop (looked for once `holder_check` is due).
    fn poll_timers(
        &self,
        machines: &mut Machines,
        now: u64,
        rng: &mut StdRng,
        holder_check: &mut u64,
    ) {
        if let Some(offerer) = machines.offerer.as_mut() {
            let actions = offerer.poll(now, rng);
            let report = offerer.poll_report(now).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot sign the offers to report");
                None
            });
            machines.carry_out(actions);
            if let Some(offers) = report {
                self.spawn(self.clone().report_free(offers));
            }
        }
        if *holder_check <= now {
            if machines.holder.next_expiry().is_some_and(|t| t <= now) {
                let expired = machines.holder.evict_expired(now);
                let metrics = &self.shared.metrics;
                metrics.expired.inc_by(expired as u64);
                metrics.held.set(machines.holder.live(now).count() as i64);
            }
            let tick = IDLE_TICK.as_millis() as u64;
            *holder_check = machines
                .holder
                .next_expiry()
                .map_or(now + tick, |t| t.clamp(now + 1, now + tick));
        }
    }

    /// How long until a machine's next timer.
    fn next_wakeup(&self, machines: &Machines, now: u64, holder_check: u64) -> Duration {
        let offerer = machines
            .offerer
            .as_ref()
            .map(|o| [o.next_wakeup(), o.next_report()]);
        offerer
            .into_iter()
            .flatten()
            .chain([Some(holder_check)])
            .flatten()
            .min()
            .map_or(IDLE_TICK, |t| {
                Duration::from_millis(t.saturating_sub(now)).min(IDLE_TICK)
            })
    }

    /// Starts a check that the owners of held reservations are still connected: those
    /// that are not lose them.
    fn check_owners(&self, machines: &Machines) {
        let Some(offerer) = &machines.offerer else {
            return;
        };
        let me = self.peer_id();
        let owners: Vec<PeerId> = offerer
            .ledger()
            .holding_owners()
            .into_iter()
            .filter(|o| *o != me)
            .collect();
        if owners.is_empty() {
            return;
        }
        let market = self.clone();
        let timeout = self.shared.config.answer_timeout;
        self.spawn(async move {
            let connected = market.shared.network.connected_peers();
            let Ok(Ok(connected)) = tokio::time::timeout(timeout, connected).await else {
                return;
            };
            let gone: Vec<PeerId> = owners
                .into_iter()
                .filter(|o| !connected.contains(o))
                .collect();
            if gone.is_empty() {
                return;
            }
            let _ = market
                .with(move |m, now| {
                    for owner in gone {
                        tracing::debug!(%owner, "owner of held reservations left; they lapse");
                        if let Some(offerer) = m.offerer.as_mut() {
                            offerer.owner_gone(now, owner);
                        }
                    }
                })
                .await;
        });
    }
}
