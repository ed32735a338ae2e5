//! The scenarios: what each instance of a run does, whatever runs it (Testground or
//! `flotilla-plan simulate`).
//!
//! Every instance starts one real `flotilla node` and plays the role its sequence number
//! gives it: the first `schedulers` are schedulers (the very first also the bootstrap
//! peer), the next `clients` invoke, the rest lend memory. The run goes
//! *start → ready → workload → done*, with a barrier between steps:
//!
//! * **discovery**: clients invoke the `sleep` function at the rate that keeps the chosen
//!   share of the lent memory reserved;
//! * **churn**: the same, while volunteers leave (gracefully or by crashing) after
//!   heavy-tailed sessions and are replaced by fresh peers ([`churn`]);
//! * **partition**: the same, while the network splits in two and heals ([`partition`]).

pub mod churn;
pub mod partition;
pub mod workload;

use crate::coordinator::{Coordinator, collect, publish_as, signal_and_wait};
use crate::links::Links;
use crate::node_process::{NodeProcess, NodeSpec};
use crate::params::Params;
use crate::records::{CsvLog, EVENTS_FILE, EventRow, RESOURCES_FILE, unix_ms};
use crate::sampler::Sampler;
use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// How long instances wait for each other at a barrier before giving up.
pub const BARRIER_LIMIT: Duration = Duration::from_secs(180);

/// A test case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Case {
    /// Offers from a tier mix, clients invoking at a rate.
    Discovery,
    /// The same while volunteers come and go.
    Churn,
    /// The same while the network splits and heals.
    Partition,
}

impl Case {
    /// Its name in the manifest.
    pub fn name(self) -> &'static str {
        match self {
            Case::Discovery => "discovery",
            Case::Churn => "churn",
            Case::Partition => "partition",
        }
    }

    /// The case named `name`.
    pub fn from_name(name: &str) -> Option<Case> {
        [Case::Discovery, Case::Churn, Case::Partition]
            .into_iter()
            .find(|c| c.name() == name)
    }
}

/// What an instance is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Runs discoveries for clients.
    Scheduler,
    /// Invokes the function.
    Client,
    /// Lends memory and runs functions.
    Volunteer,
}

impl Role {
    /// The role of instance `seq` (0-based).
    pub fn of(seq: u32, params: &Params) -> Role {
        if seq < params.schedulers {
            Role::Scheduler
        } else if seq < params.fixed_instances() {
            Role::Client
        } else {
            Role::Volunteer
        }
    }
}

/// Everything one instance needs to play its part.
pub struct Instance<C, L> {
    /// Its sequence number, 0-based.
    pub seq: u32,
    /// Instances in the run.
    pub count: u32,
    /// The case.
    pub case: Case,
    /// The run's parameters.
    pub params: Params,
    /// Signal, barrier, publish, subscribe.
    pub coordinator: C,
    /// Splitting and healing the network.
    pub links: Arc<L>,
    /// The `flotilla` binary.
    pub node_binary: PathBuf,
    /// The address its node listens on.
    pub ip: IpAddr,
    /// The network namespace its node runs in, if any.
    pub netns: Option<String>,
    /// Where it writes its records.
    pub outputs: PathBuf,
    /// Where its nodes keep their data.
    pub scratch: PathBuf,
}

/// What instances tell each other at the start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Announce {
    pub(crate) seq: u32,
    pub(crate) ip: IpAddr,
    pub(crate) lent_mib: u32,
}

/// The node an instance runs now (churn replaces it), for the sampler.
#[derive(Debug, Clone)]
struct Current {
    generation: u32,
    pid: u32,
    api: flotilla_api::client::ApiClient,
}

/// Shared by an instance's tasks: its event log and its current node.
pub(crate) struct Book {
    events: Mutex<CsvLog>,
    current: watch::Sender<Option<Current>>,
    seq: u32,
}

impl Book {
    pub(crate) fn event(&self, event: &str, detail: String) {
        let row = EventRow {
            unix_ms: unix_ms(),
            instance: self.seq,
            event: event.into(),
            detail,
        };
        let mut log = self.events.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = log.append(&row) {
            tracing::warn!(error = %e, "cannot record an event");
        }
    }

    pub(crate) fn now_running(&self, generation: u32, node: &NodeProcess) {
        let current = node.pid().map(|pid| Current {
            generation,
            pid,
            api: node.api_client(),
        });
        self.current.send_replace(current);
    }
}

impl<C: Coordinator, L: Links> Instance<C, L> {
    fn role(&self) -> Role {
        Role::of(self.seq, &self.params)
    }

    fn rng(&self, stream: u64) -> StdRng {
        rng_for(self.params.seed, self.seq, stream)
    }

    /// Memory this instance lends (0 unless a volunteer): drawn from the tier mix.
    fn lent_mib(&self) -> u32 {
        if self.role() != Role::Volunteer {
            return 0;
        }
        weighted(&self.params.offer_tiers, &mut self.rng(1))
    }

    pub(crate) fn node_spec(
        &self,
        generation: u32,
        bootstrap: &[String],
        lent_mib: u32,
    ) -> NodeSpec {
        NodeSpec {
            binary: self.node_binary.clone(),
            data_dir: self.scratch.join(format!("node-{}-{generation}", self.seq)),
            ip: self.ip,
            netns: self.netns.clone(),
            bootstrap: bootstrap.to_vec(),
            offer_mib: (lent_mib > 0).then_some(lent_mib),
            store_mib: (self.params.store_mib > 0).then_some(self.params.store_mib),
            scheduler: self.role() == Role::Scheduler,
            max_tries: self.params.max_tries,
            key_space: self.params.key_space.clone(),
            fallback: self.params.fallback,
            offer_ttl_s: self.params.offer_ttl_s,
            notify_interval_s: self.params.notify_interval_s,
            log: self.outputs.join(format!("node-{generation}.log")),
        }
    }

    /// Plays the instance's part from start to end; its records are in `outputs`.
    pub async fn run(self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.outputs)
            .with_context(|| format!("creating {}", self.outputs.display()))?;
        std::fs::create_dir_all(&self.scratch)
            .with_context(|| format!("creating {}", self.scratch.display()))?;
        let book = Arc::new(Book {
            events: Mutex::new(CsvLog::create(&self.outputs.join(EVENTS_FILE))?),
            current: watch::channel(None).0,
            seq: self.seq,
        });
        let sampling = tokio::spawn(sample_forever(
            self.seq,
            book.current.subscribe(),
            CsvLog::create(&self.outputs.join(RESOURCES_FILE))?,
        ));
        let result = self.play(&book).await;
        sampling.abort();
        result
    }

    async fn play(&self, book: &Arc<Book>) -> anyhow::Result<()> {
        let lent_mib = self.lent_mib();
        // Start: the first instance bootstraps everyone else.
        let bootstrap = if self.seq == 0 {
            Vec::new()
        } else {
            collect::<_, String>(&self.coordinator, "bootstrap", 1, BARRIER_LIMIT).await?
        };
        let node = NodeProcess::start(&self.node_spec(0, &bootstrap, lent_mib))
            .await
            .context("starting the node")?;
        book.now_running(0, &node);
        book.event("join", node.peer_id.clone());
        if self.seq == 0 {
            publish_as(&self.coordinator, "bootstrap", &node.addr).await?;
        }
        let me = Announce {
            seq: self.seq,
            ip: self.ip,
            lent_mib,
        };
        publish_as(&self.coordinator, "instances", &me).await?;
        let everyone: Vec<Announce> = collect(
            &self.coordinator,
            "instances",
            self.count as usize,
            BARRIER_LIMIT,
        )
        .await?;
        signal_and_wait(
            &self.coordinator,
            "started",
            self.count.into(),
            BARRIER_LIMIT,
        )
        .await?;

        // Ready: offers published, clients see a scheduler and have the function.
        let client = match self.role() {
            Role::Volunteer => {
                workload::wait_until_offering(&node).await?;
                None
            }
            Role::Client => Some(workload::Client::prepare(self, &node, &everyone).await?),
            Role::Scheduler => None,
        };
        signal_and_wait(&self.coordinator, "ready", self.count.into(), BARRIER_LIMIT).await?;
        tokio::time::sleep(Duration::from_secs(self.params.warmup_s)).await;

        // The workload, with churn or a partition alongside.
        let started = tokio::time::Instant::now();
        let end = started + Duration::from_secs(self.params.duration_s);
        let phases = partition::Phases::new(self.case, &self.params, started);
        let network = partition::drive(self, &everyone, phases.clone(), book.clone(), end);
        let node = match (self.role(), client) {
            (Role::Client, Some(client)) => {
                let (_, ran) = tokio::join!(network, client.run(end, phases));
                ran?;
                node
            }
            (Role::Volunteer, _) if self.case == Case::Churn && self.params.churn_per_min > 0.0 => {
                let (_, node) = tokio::join!(
                    network,
                    churn::churn(self, node, bootstrap, lent_mib, book.clone(), end)
                );
                node?
            }
            _ => {
                let ((), ()) = tokio::join!(network, tokio::time::sleep_until(end));
                node
            }
        };

        // Done: everyone finishes before anyone's node goes away.
        signal_and_wait(&self.coordinator, "done", self.count.into(), BARRIER_LIMIT).await?;
        book.event("leave", node.peer_id.clone());
        book.current.send_replace(None);
        node.stop().await?;
        Ok(())
    }
}

/// Samples whatever node the instance runs, once a second, until aborted.
async fn sample_forever(seq: u32, mut current: watch::Receiver<Option<Current>>, mut log: CsvLog) {
    let mut sampler: Option<Sampler> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        if current.has_changed().unwrap_or(false) {
            sampler = current
                .borrow_and_update()
                .clone()
                .map(|c| Sampler::new(seq, c.generation, c.pid, c.api));
        }
        let Some(s) = sampler.as_mut() else { continue };
        if let Some(row) = s.sample().await
            && let Err(e) = log.append(&row)
        {
            tracing::warn!(error = %e, "cannot record a sample");
        }
    }
}

/// The random numbers of instance `seq` for one purpose (`stream`) in a run of `seed`.
pub(crate) fn rng_for(seed: u64, seq: u32, stream: u64) -> StdRng {
    StdRng::seed_from_u64(
        seed.wrapping_mul(1_000_003)
            .wrapping_add(u64::from(seq) * 7919 + stream),
    )
}

/// A value drawn from `value:weight` pairs.
pub fn weighted<R: Rng>(pairs: &[(u32, u32)], rng: &mut R) -> u32 {
    let total: u32 = pairs.iter().map(|(_, w)| w).sum();
    let mut pick = rng.random_range(0..total.max(1));
    for &(value, weight) in pairs {
        if pick < weight {
            return value;
        }
        pick -= weight;
    }
    pairs.last().map_or(0, |p| p.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_follow_the_sequence_numbers() {
        let params = Params {
            schedulers: 2,
            clients: 1,
            ..Params::default()
        };
        let roles: Vec<Role> = (0..5).map(|s| Role::of(s, &params)).collect();
        assert_eq!(
            roles,
            [
                Role::Scheduler,
                Role::Scheduler,
                Role::Client,
                Role::Volunteer,
                Role::Volunteer
            ]
        );
    }

    #[test]
    fn weighted_draws_follow_the_weights() {
        let mut rng = StdRng::seed_from_u64(7);
        let pairs = [(512, 3), (1024, 1)];
        let n = 20_000;
        let small = (0..n).filter(|_| weighted(&pairs, &mut rng) == 512).count();
        let share = small as f64 / n as f64;
        assert!((share - 0.75).abs() < 0.02, "{share}");
    }
}
