//! Flotilla's research harness: the Testground plan and the local simulations that run the
//! same scenarios.
//!
//! A scenario ([`scenario`]) is the code one *instance* runs: it starts a real `flotilla
//! node` process ([`node_process`]), plays a role (scheduler, client or volunteer), and
//! records what happens ([`records`], [`sampler`]). Instances agree on who does what and
//! when through a [`coordinator::Coordinator`] — signal, barrier, publish, subscribe —
//! implemented once over the Testground sync service ([`coordinator::sdk`]) and once in
//! memory for local runs ([`coordinator::local`]). Network conditions (latency, loss, a
//! partition) go through [`links::Links`]: Testground's sidecar there, network namespaces
//! here ([`links::netns`]). [`simulate`] runs N instances on this machine; [`report`]
//! turns the instances' records into one CSV per metric and SVG plots.

pub mod check;
pub mod coordinator;
pub mod links;
pub mod node_process;
pub mod params;
pub mod records;
pub mod report;
pub mod sampler;
pub mod scenario;
pub mod simulate;
