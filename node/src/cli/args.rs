//! The command line: every subcommand and flag of `flotilla`.

use clap::{Args, Parser, Subcommand};
use libp2p::Multiaddr;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Flotilla: a peer-to-peer Function-as-a-Service network.
#[derive(Debug, Parser)]
#[command(name = "flotilla", version, about, propagate_version = true)]
pub struct Cli {
    /// Address of the node's local HTTP API [default: 127.0.0.1:4180]
    #[arg(long, global = true, env = "FLOTILLA_API")]
    pub api: Option<SocketAddr>,
    /// File holding the API token, for a node started with --api-allow-remote
    /// [default: api.token in $FLOTILLA_DATA or ~/.flotilla, if there, sent only to a
    /// loopback --api: another address gets a token only from this option]
    #[arg(long, global = true, env = "FLOTILLA_API_TOKEN_FILE")]
    pub api_token_file: Option<PathBuf>,
    /// Print results as JSON
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a peer in the foreground (as a volunteer's background service)
    Node(NodeArgs),
    /// Add a file to the local node as content-addressed blocks, pinned; prints its CID
    Add {
        /// The file to add
        file: PathBuf,
        /// Add it as cache instead: evicted, least recently used first, once the store
        /// needs the room
        #[arg(long)]
        no_pin: bool,
    },
    /// Fetch the file under a CID from the network and write it out
    Get {
        /// The CID of the file
        cid: String,
        /// Where to write it ('-' for stdout) [default: ./<CID>]
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Show the node's status: PeerId, addresses, peers, routing table, blocks held
    Status,
    /// List the offers this node makes (and their reservations) and the offers it holds
    Offers,
    /// Find offers for a request through a scheduler picked from the registry
    Discover(DiscoverArgs),
    /// Run a WebAssembly function on the network by its CID; prints its stdout and exits
    /// with its exit status
    Invoke(InvokeArgs),
    /// Follow a detached job
    #[command(subcommand)]
    Job(JobCommand),
    /// Run an execution plan: named jobs, their inputs (files, CIDs or other jobs'
    /// outputs), in parallel where independent; prints each job's result CIDs
    Run {
        /// The plan (TOML; see examples/count-then-hash.toml)
        plan: PathBuf,
        /// Let the plan name files outside its own directory (absolute paths, '..',
        /// symlinks leading out); without it such a plan is refused
        #[arg(long)]
        allow_paths_outside: bool,
    },
    /// Keep DAGs in the local store until unpinned (what `add` adds is pinned already)
    #[command(subcommand)]
    Pin(PinCommand),
    /// Remove every cached block that is not pinned and not in use by a call, fetch or read
    Gc,
    /// The local store
    #[command(subcommand)]
    Repo(RepoCommand),
    /// Closed networks: make a key file for --network-key
    #[command(subcommand)]
    NetworkKey(NetworkKeyCommand),
    /// Start a local network on loopback, add an example function and invoke it by CID
    Demo(DemoArgs),
}

/// Flags of `flotilla node`; each overrides the config file.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// TOML config file (keys as in docs/ARCHITECTURE.md); flags override it
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Where the identity and blocks live [default: $FLOTILLA_DATA or ~/.flotilla]
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Address to listen on, TCP or QUIC, repeatable [default: /ip4/0.0.0.0/tcp/4100 and /ip4/0.0.0.0/udp/4100/quic-v1]
    #[arg(long)]
    pub listen: Vec<Multiaddr>,
    /// Peer to join through, as a multiaddr ending in /p2p/<PeerId>, repeatable
    #[arg(long)]
    pub bootstrap: Vec<Multiaddr>,
    /// Let --api be an address other hosts can reach; requests then need the token the
    /// node writes to <data dir>/api.token (0600)
    #[arg(long)]
    pub api_allow_remote: bool,
    /// Join a closed network: only peers holding this key file (go-ipfs swarm.key
    /// format; see `flotilla network-key new`) can connect. TCP only: QUIC is turned off
    #[arg(long, value_name = "FILE")]
    pub network_key: Option<PathBuf>,
    /// Run calls only for these schedulers (comma-separated PeerIds): others cannot
    /// reserve memory or run calls here [default: anyone]
    #[arg(long, value_name = "PEERID,...", value_delimiter = ',')]
    pub schedulers: Vec<libp2p::PeerId>,
    /// Do not discover peers on the local network with mDNS
    #[arg(long)]
    pub no_mdns: bool,
    /// Most established connections [default: 256]
    #[arg(long)]
    pub max_connections: Option<u32>,
    /// Most bytes of blocks to store, e.g. 10GiB [default: 10GiB]
    #[arg(long)]
    pub store_capacity: Option<bytesize::ByteSize>,
    /// Lend this much memory to others' functions, e.g. 2GiB (at least 128MiB) [default: none]
    #[arg(long)]
    pub offer_memory: Option<bytesize::ByteSize>,
    /// How lent memory is cut into offers: largest or halving [default: largest]
    #[arg(long)]
    pub slicing: Option<flotilla_offers::offerer::Slicing>,
    /// Be a scheduler too: run discoveries for clients
    #[arg(long)]
    pub scheduler: bool,
    /// Ask only these schedulers (PeerIds, comma-separated), never the registry's
    #[arg(long, value_delimiter = ',')]
    pub trusted_schedulers: Vec<libp2p::PeerId>,
    /// Region probes before the super-trader fallback [default: 2]
    #[arg(long)]
    pub max_tries: Option<u32>,
    /// Where offers are published and probes look: regions, or whole (the random-probing
    /// baseline, for research; every peer of a network must use the same) [default: regions]
    #[arg(long, value_name = "regions|whole")]
    pub key_space: Option<flotilla_overlay::regions::KeySpace>,
    /// As scheduler, do not ask the super-trader list when probing finds nothing (the
    /// discovery fails instead)
    #[arg(long)]
    pub no_fallback: bool,
    /// Which fitting offer to reserve: best-fit, worst-fit or random [default: best-fit]
    #[arg(long)]
    pub placement: Option<flotilla_scheduler::placement::Policy>,
}

/// Flags of `flotilla discover`.
#[derive(Debug, Args)]
pub struct DiscoverArgs {
    /// Memory wanted, e.g. 512MiB (at most 10GiB)
    #[arg(long)]
    pub memory: bytesize::ByteSize,
    /// Region probes before the fallback [default: the scheduler's]
    #[arg(long)]
    pub max_tries: Option<u32>,
    /// Also reserve the best offer found, held this long unless used (e.g. 30s)
    #[arg(long, value_parser = humantime::parse_duration)]
    pub reserve: Option<std::time::Duration>,
    /// Which fitting offer to reserve: best-fit, worst-fit or random [default: the scheduler's]
    #[arg(long)]
    pub placement: Option<flotilla_scheduler::placement::Policy>,
}

/// Flags of `flotilla invoke`.
#[derive(Debug, Args)]
pub struct InvokeArgs {
    /// CID of the WebAssembly module (a WASI command)
    pub cid: String,
    /// Memory to reserve: the function's hard limit (at most 10GiB)
    #[arg(long, default_value = "128MiB")]
    pub memory: bytesize::ByteSize,
    /// File whose bytes go to the function's stdin ('-' for this command's stdin)
    #[arg(long, conflicts_with = "stdin_cid")]
    pub stdin: Option<PathBuf>,
    /// CID of a file for the function's stdin
    #[arg(long)]
    pub stdin_cid: Option<String>,
    /// A file for the function's directory, as NAME=CID (repeatable)
    #[arg(long = "input", value_name = "NAME=CID")]
    pub inputs: Vec<String>,
    /// An argument for the function (repeatable)
    #[arg(long = "arg", value_name = "A", allow_hyphen_values = true)]
    pub args: Vec<String>,
    /// An environment variable for the function, as K=V (repeatable)
    #[arg(long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// Deadline of the run, e.g. 30s (at most 10m) [default: the volunteer's, 30s]
    #[arg(long, value_parser = humantime::parse_duration)]
    pub timeout: Option<std::time::Duration>,
    /// Region probes before the fallback [default: the scheduler's]
    #[arg(long)]
    pub max_tries: Option<u32>,
    /// Which fitting offer to reserve: best-fit, worst-fit or random [default: the scheduler's]
    #[arg(long)]
    pub placement: Option<flotilla_scheduler::placement::Policy>,
    /// Run on N distinct volunteers and take the majority's answer (output CIDs, exit
    /// status and stdout compared); a disagreement names the outvoted volunteers
    #[arg(long, value_name = "N", conflicts_with = "detach", value_parser = clap::value_parser!(u32).range(1..=9))]
    pub replicas: Option<u32>,
    /// Run the call even if the same pure call was answered before (by default such a
    /// call is answered from its memoized result, checked against its volunteer's
    /// signed receipt)
    #[arg(long)]
    pub fresh: bool,
    /// Return a job id at once; the job runs when an offer fits (see `flotilla job`)
    #[arg(long)]
    pub detach: bool,
    /// With --detach: how long the job may wait for an offer, e.g. 30m (at most 1h)
    #[arg(long, value_parser = humantime::parse_duration, requires = "detach")]
    pub wait: Option<std::time::Duration>,
}

/// `flotilla network-key` subcommands.
#[derive(Debug, Subcommand)]
pub enum NetworkKeyCommand {
    /// Write a new random key to FILE (which must not exist yet), readable by its owner only
    New {
        /// Where to write it
        file: PathBuf,
    },
}

/// `flotilla pin` subcommands.
#[derive(Debug, Subcommand)]
pub enum PinCommand {
    /// Fetch the DAG under a CID (unless held) and pin it
    Add {
        /// The DAG's root
        cid: String,
    },
    /// Remove a pin: its blocks become cache, evicted once the store needs the room
    Rm {
        /// The pinned root
        cid: String,
    },
    /// List the pins
    Ls,
}

/// `flotilla repo` subcommands.
#[derive(Debug, Subcommand)]
pub enum RepoCommand {
    /// What the store holds: pinned, cached and in-use bytes, blocks, what gc would free
    Stat,
}

/// `flotilla job` subcommands.
#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Show where a detached job stands
    Status {
        /// The job id `invoke --detach` printed
        id: String,
    },
    /// Print a finished job's stdout (and stderr) and exit with its exit status
    Result {
        /// The job id `invoke --detach` printed
        id: String,
    },
}

/// Flags of `flotilla demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Number of nodes to start: one scheduler, the rest volunteers (2 to 7)
    #[arg(long, default_value_t = 5)]
    pub nodes: usize,
}
