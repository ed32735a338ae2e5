//! The resource market a node takes part in: the I/O around the offer and scheduler state
//! machines of `flotilla-offers` and `flotilla-scheduler`.
//!
//! Every node holds offers for others (it may be the peer closest to an offer's key).
//! With `offer_memory` set it is also an offerer: it publishes its offers, answers
//! reservations, and tells a random scheduler what it has free as soon as that changes
//! (and every `notify_interval`).
//! With `scheduler` on it announces itself in the registry, keeps a super-trader list,
//! and runs discoveries for clients. The state machines are handed the time and return
//! what to send; this module sends it over [`protocol`] messages and feeds the answers
//! back. A request whose target is this node itself is served in-process by the same
//! handler the network uses.
//!
//! * `state`: the one owner of the shared machines (holder, offerer and ledger,
//!   super-trader list, job book): an event loop taking commands, and the tracked tasks
//!   that carry out their I/O; [`clock`]: the time it hands them;
//! * [`protocol`]: the messages and their bounds; `serving`: one protocol per concern
//!   (offers, calls, jobs), each with its own queue, task and handler;
//! * `holding`: the holder side (offers received, questions about them);
//! * `offering`: the offerer side (publishing, reservations, the super-trader feed);
//! * `scheduling`: the registry, the super-trader list, and discovery;
//! * [`function`]: what an invocation carries; `invoking`: placing a call (scheduler)
//!   and asking for one (client); `executing`: running one (volunteer); [`once`]: what
//!   makes retries safe;
//! * `receipts`: the volunteer's signed receipt for each run, and the checks of it;
//!   [`replicas`]: a call run on several volunteers and their answers compared;
//! * `copies`: the quota of job results copied for others;
//! * `slots`: pools of places with a share per peer;
//! * [`metrics`]: what it all counts.

pub mod clock;
/// What an invocation carries: the crate `flotilla-api`'s module, re-exported.
pub use flotilla_api::function;
/// A volunteer's signed receipt for a run: the crate `flotilla-api`'s module, re-exported.
pub use flotilla_api::receipt;
pub mod jobs;
pub mod memos;
pub mod metrics;
pub mod once;
pub mod protocol;

mod allowed;
mod copies;
mod executing;
mod failure;
mod holding;
mod invoking;
mod offering;
mod receipts;
pub mod replicas;
pub mod room;
mod run_log;
mod scheduling;
mod serving;
mod slots;
mod state;
#[cfg(test)]
mod tests;
mod unchecked;

use crate::executor::Executor;
use crate::market::metrics::MarketMetrics;
use crate::market::protocol::{ProtocolError, Request, Response, decode_response, encode_request};
use flotilla_offers::holder::{Holder, HolderConfig};
use flotilla_offers::ledger::LedgerConfig;
use flotilla_offers::offerer::{Offerer, OffererConfig, Slicing};
use flotilla_overlay::Overlay;
use flotilla_overlay::network::Network;
use flotilla_overlay::regions::KeySpace;
use flotilla_overlay::rpc::RpcError;
use flotilla_scheduler::placement::Policy;
use flotilla_scheduler::supertraders::{SuperTraderConfig, SuperTraders};
use futures::FutureExt;
use futures::future::BoxFuture;
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use prometheus_client::registry::Registry;
use rand::RngCore;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use clock::Clock;
pub use executing::MAX_INPUT_BYTES;
pub use flotilla_api::market::{HeldOffer, OffersView, SentOfferView};
pub use invoking::{InvokeError, MAX_ATTEMPTS};
pub use protocol::{DiscoverRequest, Discovered, OfferSummary, Placement, ReserveTerms};
pub use scheduling::{DiscoverError, MAX_TRIES_LIMIT};
pub use state::Stopped;

/// Discoveries one scheduler runs at once; more are refused as busy.
const MAX_CONCURRENT_DISCOVERIES: usize = 32;
/// Invocations one scheduler has taken at once, placing them or waiting for their
/// volunteer's answer; more are refused as busy. One that waits costs a task and its call
/// (at most 32 KiB of text), so a running call need not turn clients away.
const MAX_TAKEN_INVOCATIONS: usize = 512;
/// Invocations one scheduler places (discovers and reserves for) at once; others wait.
const MAX_CONCURRENT_PLACEMENTS: usize = 64;
/// Answers of finished runs remembered for retries, on each side.
const REMEMBERED_RUNS: usize = 1024;
/// How much longer the offerer waits for a lookup or delivery than the task doing it.
const OFFERER_SLACK: Duration = Duration::from_millis(250);
/// Executions one volunteer takes at once, admitted or waiting for admission; more are
/// answered busy. Twice the executor's pool: more could never run.
const MAX_TAKEN_EXECUTIONS: usize = 2 * crate::executor::POOL_SLOTS as usize;
/// How long stopping waits for the market's tasks to end.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// How a node takes part in the market.
#[derive(Debug, Clone)]
pub struct MarketConfig {
    /// Memory this node lends, in MiB (`None`: it offers nothing).
    pub offer_memory_mib: Option<u64>,
    /// How that memory is cut into offers.
    pub slicing: Slicing,
    /// How long a published offer lasts.
    pub offer_ttl: Duration,
    /// How long before expiry an offer is refreshed.
    pub refresh_margin: Duration,
    /// Time allowed for a lookup or a request to another peer.
    pub answer_timeout: Duration,
    /// How often an offerer tells a scheduler what it has free.
    pub notify_interval: Duration,
    /// How long a volunteer waits for a call's module or one of its inputs to arrive.
    pub fetch_timeout: Duration,
    /// How long a call's module, inputs and outputs stay safe from eviction after its
    /// answer.
    pub call_data_kept: Duration,
    /// A pure run shorter than this is not memoized (`memos`).
    pub memo_min_run: Duration,
    /// The only peers that may reserve and run calls here (empty: anyone).
    pub schedulers: Vec<PeerId>,
    /// How often a node sends the job records it keeps on to the peers now closest to
    /// their keys.
    pub job_republish_interval: Duration,
    /// How long an unfinished job's scheduler may be silent before the peer closest to
    /// the job's key takes it over.
    pub job_takeover_grace: Duration,
    /// Whether this node is a scheduler.
    pub scheduler: bool,
    /// The only schedulers this node asks, if any are named: the registry is not looked
    /// up then.
    pub trusted_schedulers: Vec<PeerId>,
    /// Region probes before the super-trader fallback, in all.
    pub max_tries: u32,
    /// Of those, probes of the request's own tier before going on to larger tiers.
    pub own_tier_probes: u32,
    /// Time one discovery may take.
    pub discovery_budget: Duration,
    /// Where offers are published and probes look: tier regions, or the whole key space
    /// (the research baseline). The same on every peer of a network; it replaces
    /// `holder.key_space`.
    pub key_space: KeySpace,
    /// Whether a scheduler asks its super-trader list when probing found nothing.
    pub fallback: bool,
    /// Which fitting offer a scheduler reserves.
    pub placement: Policy,
    /// Bounds of the offers held for others.
    pub holder: HolderConfig,
    /// Bounds of the super-trader list.
    pub super_traders: SuperTraderConfig,
    /// For tests only: this volunteer alters the stdout of every call it runs (and signs
    /// the altered answer), as a volunteer that lies would.
    #[doc(hidden)]
    pub tamper_stdout: bool,
    /// For tests only: this volunteer signs its receipts with another key than its own,
    /// so they do not verify.
    #[doc(hidden)]
    pub forge_receipts: bool,
}

impl Default for MarketConfig {
    /// The node's defaults ([`crate::config::NodeConfig::default`]): each is written once.
    fn default() -> Self {
        crate::config::NodeConfig::default().market()
    }
}

/// Errors of a request to another peer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The request failed in transit.
    #[error(transparent)]
    Rpc(#[from] RpcError),
    /// The answer was not a valid response.
    #[error("{peer} answered with a bad message: {error}")]
    Protocol {
        /// The peer.
        peer: PeerId,
        /// What was wrong.
        error: ProtocolError,
    },
    /// No answer in time.
    #[error("{0} did not answer in time")]
    Timeout(PeerId),
}

/// This node's part in the market; clones share it.
#[derive(Clone)]
pub struct Market {
    shared: Arc<Shared>,
}

struct Shared {
    network: Network,
    overlay: Overlay,
    executor: Option<Arc<Executor>>,
    clock: Clock,
    /// Commands for the loop that owns the shared machines (see `state`).
    commands: mpsc::Sender<state::Command>,
    /// The loop and every task the market started; stopping waits for them.
    tasks: TaskTracker,
    cancel: CancellationToken,
    /// Answers of calls run here, by the peer that asked and its invocation id.
    executions: once::Once<(PeerId, u64), Response>,
    /// Answers of calls placed here, by the peer that asked and its invocation id (never
    /// replayed to another peer).
    invocations: once::Once<(PeerId, u64), Response>,
    invocations_taken: slots::Pool,
    executions_taken: slots::Pool,
    placements: slots::Pool,
    keypair: Keypair,
    jobs_held: slots::Pool,
    /// Copies of job results' stdout and stderr being fetched (see `jobs`).
    result_copies: Arc<Semaphore>,
    /// Modules not worth looking up as memos (impure, or cheaper to run).
    skipped_modules: memos::SkippedModules,
    /// What this node agreed to keep of others' job results.
    copy_quota: Mutex<copies::CopyQuota>,
    /// The node's database, from [`Market::keep_state_in`] until the market stops: the
    /// jobs it schedules.
    state: Mutex<Option<Arc<crate::state_db::StateDb>>>,
    /// Where changes to the job records kept for others and to the runs recorded queue
    /// for the database's batching writer (`jobs`), from [`Market::keep_state_in`] on.
    state_writer: Mutex<Option<tokio::sync::mpsc::Sender<jobs::StateWrite>>>,
    /// The runs recorded in the database, oldest first (`run_log`).
    run_log: run_log::RunLog,
    peer_id: PeerId,
    /// Who may reserve and run calls here.
    allowed: allowed::Schedulers,
    config: MarketConfig,
    metrics: MarketMetrics,
    offering: bool,
    schedulers: scheduling::SchedulerCache,
    /// Receipts passed on to remote clients unchecked, until they report a refusal.
    unchecked: Mutex<unchecked::Unchecked>,
    discoveries: slots::Pool,
    next_request_id: AtomicU64,
}

/// The system time, as Unix milliseconds (what a node's market runs on).
pub fn now_ms() -> u64 {
    clock::system_now_ms()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves the state machine consistent enough to go on.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Market {
    /// Starts this node's part in the market on `overlay`: offering and scheduling as
    /// configured; [`Market::serve_peers`] then answers other peers. An offering node runs
    /// calls on its reservations with `executor`. Its machines are handed the time from
    /// `clock`.
    pub fn start(
        overlay: &Overlay,
        executor: Option<Arc<Executor>>,
        keypair: Keypair,
        addresses: Vec<Multiaddr>,
        config: MarketConfig,
        clock: Clock,
        registry: &mut Registry,
    ) -> Market {
        let offerer = config.offer_memory_mib.map(|memory_mib| {
            let offerer_config = OffererConfig {
                ttl_ms: config.offer_ttl.as_millis() as u64,
                refresh_margin_ms: config.refresh_margin.as_millis() as u64,
                // A little longer than the I/O it waits for is given, so an answer that
                // waited in the loop's queue still counts.
                answer_timeout_ms: (config.answer_timeout + OFFERER_SLACK).as_millis() as u64,
                slicing: config.slicing,
                key_space: config.key_space,
                notify_interval_ms: config.notify_interval.as_millis() as u64,
                // Every reservation may become a running guest: no more than the
                // executor runs.
                ledger: LedgerConfig {
                    max_reservations: crate::executor::POOL_SLOTS as usize,
                    max_per_owner: (crate::executor::POOL_SLOTS as usize / 2).max(1),
                    ..LedgerConfig::default()
                },
                ..OffererConfig::new(memory_mib, addresses)
            };
            Offerer::new(keypair.clone(), offerer_config, rand::rng().next_u64() >> 1)
        });
        // A store whose pins leave no room for calls lends nothing until they do.
        let store = overlay.store();
        let lending = room::pins_leave_room(store.stats().pinned_bytes, store.capacity());
        let mut offerer = offerer;
        if let Some(offerer) = offerer.as_mut().filter(|_| !lending) {
            tracing::error!(
                capacity = store.capacity(),
                "pins leave the store no room for calls: this node lends nothing until pins are removed or the capacity raised"
            );
            // Nothing is published yet: this only marks the offers withdrawn.
            let _ = offerer.withdraw_all(clock.now_ms());
        }
        let offering = offerer.is_some();
        let super_traders = config
            .scheduler
            .then(|| SuperTraders::new(config.super_traders.clone()));
        let holder = Holder::new(HolderConfig {
            key_space: config.key_space,
            ..config.holder.clone()
        });
        let (commands, commands_in) = mpsc::channel(state::COMMAND_QUEUE);
        let market = Market {
            shared: Arc::new(Shared {
                network: overlay.network().clone(),
                overlay: overlay.clone(),
                executor,
                clock,
                commands,
                tasks: TaskTracker::new(),
                cancel: CancellationToken::new(),
                executions: once::Once::new(REMEMBERED_RUNS),
                invocations: once::Once::new(REMEMBERED_RUNS),
                invocations_taken: slots::Pool::new(MAX_TAKEN_INVOCATIONS),
                executions_taken: slots::Pool::new(MAX_TAKEN_EXECUTIONS),
                placements: slots::Pool::new(MAX_CONCURRENT_PLACEMENTS),
                keypair: keypair.clone(),
                jobs_held: slots::Pool::new(jobs::MAX_JOBS),
                result_copies: Arc::new(Semaphore::new(jobs::MAX_RESULT_COPIES)),
                skipped_modules: Default::default(),
                copy_quota: Mutex::default(),
                state: Mutex::new(None),
                state_writer: Mutex::new(None),
                run_log: Default::default(),
                peer_id: overlay.peer_id(),
                allowed: allowed::Schedulers::new(overlay.peer_id(), &config.schedulers),
                offering: offerer.is_some(),
                schedulers: scheduling::SchedulerCache::default(),
                unchecked: Mutex::default(),
                discoveries: slots::Pool::new(MAX_CONCURRENT_DISCOVERIES),
                next_request_id: AtomicU64::new(rand::rng().next_u64() >> 1),
                metrics: MarketMetrics::new(registry),
                config,
            }),
        };
        let machines = state::Machines::new(
            overlay.peer_id(),
            holder,
            offerer,
            super_traders,
            market.shared.config.job_takeover_grace,
        );
        market.spawn(market.clone().run_machines(machines, commands_in));
        if market.shared.config.scheduler {
            market.spawn(market.clone().announce_scheduler());
        }
        if offering {
            market.spawn(market.clone().lend_while_pins_leave_room(lending));
        }
        market
    }

    /// Keeps the state that must outlive a restart (the jobs this node schedules, the job
    /// records it keeps for others) in `state`, puts the kept records back in its book and
    /// carries on the jobs recorded there before the restart. Call it before
    /// [`Market::serve_peers`], so no job is taken before the recorded ones are back.
    pub async fn keep_state_in(&self, state: Arc<crate::state_db::StateDb>) {
        *lock(&self.shared.state) = Some(state.clone());
        let (writer, queue) = tokio::sync::mpsc::channel(jobs::KEPT_QUEUE);
        *lock(&self.shared.state_writer) = Some(writer);
        self.spawn(self.clone().write_state_changes(state, queue));
        self.reload_kept_records().await;
        self.reload_runs().await;
        self.resume_jobs().await;
    }

    /// Starts answering other peers' requests (offers, calls, jobs).
    pub fn serve_peers(&self) {
        if let Some(inbound) = self.shared.overlay.take_inbound_requests() {
            self.serve_all(inbound);
        }
    }

    /// The node's database, unless the market stopped.
    pub(super) fn state(&self) -> Option<Arc<crate::state_db::StateDb>> {
        lock(&self.shared.state).clone()
    }

    /// The time now, as the market's clock tells it (Unix ms).
    pub fn now(&self) -> u64 {
        self.shared.clock.now_ms()
    }

    /// Our PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.shared.peer_id
    }

    /// Whether this node lends memory.
    pub fn is_offering(&self) -> bool {
        self.shared.offering
    }

    /// Whether this node is a scheduler.
    pub fn is_scheduler(&self) -> bool {
        self.shared.config.scheduler
    }

    /// What this node offers, reserves and holds (nothing once it has stopped).
    pub async fn offers(&self) -> OffersView {
        let view = self
            .with(|m, now| {
                let (sent, reservations) = match &m.offerer {
                    Some(offerer) => (
                        offerer.sent().into_iter().map(Into::into).collect(),
                        offerer.reservations().copied().collect(),
                    ),
                    None => (Vec::new(), Vec::new()),
                };
                let held = m
                    .holder
                    .live(now)
                    .map(|o| HeldOffer {
                        offer: o.into(),
                        expires_at_ms: o.body.expires_at_ms,
                    })
                    .collect();
                let super_traders = m.super_traders.as_ref().map_or(0, |l| l.len());
                (sent, reservations, held, super_traders)
            })
            .await;
        let (sent, reservations, held, super_traders) = view.unwrap_or_default();
        OffersView {
            offer_memory_mib: self.shared.config.offer_memory_mib.unwrap_or(0),
            scheduler: self.shared.config.scheduler,
            sent,
            reservations,
            held,
            super_traders,
        }
    }

    /// Stops taking part: withdraws this node's offers from their holders (waiting at
    /// most the answer timeout), then stops the market's loop and tasks and waits for
    /// them (at most [`STOP_GRACE`]).
    pub async fn stop(&self) {
        self.withdraw_all().await;
        self.shutdown(STOP_GRACE).await;
        // Closed once the last write in progress lets go: a node restarted in this
        // process opens it again.
        lock(&self.shared.state).take();
    }

    /// Stops the market's loop and tasks without withdrawing anything, as a crash would.
    pub async fn abort(&self) {
        self.shutdown(STOP_GRACE).await;
        lock(&self.shared.state).take();
    }

    /// Sends `request` to `peer` (dialling `addresses` if needed) and waits for its
    /// answer; a request to ourselves is answered in-process.
    fn call(
        &self,
        peer: PeerId,
        addresses: Vec<Multiaddr>,
        request: Request,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<Response, CallError>> {
        let market = self.clone();
        async move {
            if peer == market.shared.peer_id {
                return Ok(market.handle(peer, request).await);
            }
            let id = market
                .shared
                .next_request_id
                .fetch_add(1, Ordering::Relaxed);
            let concern = request.concern();
            let bytes = encode_request(id, request);
            let answer = tokio::time::timeout(
                timeout,
                market
                    .shared
                    .network
                    .request(concern, peer, addresses, bytes),
            )
            .await
            .map_err(|_| CallError::Timeout(peer))??;
            decode_response(&answer, id).map_err(|error| CallError::Protocol { peer, error })
        }
        .boxed()
    }
}
