//! The subcommands: each parses its input, talks to the node, and prints the result.

use crate::api::client::ApiClient;
use crate::api::types::DiscoverBody;
use crate::cli::{Cli, Command, DiscoverArgs, NetworkKeyCommand, NodeArgs, RepoCommand};
use crate::config::{DEFAULT_API, NodeConfig};
use crate::{daemon, demo, invoke, output, repo, run_plan};
use anyhow::Context;
use flotilla_overlay::Cid;
use futures::{StreamExt, TryStreamExt};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::AsyncWriteExt;

/// The file of the token to send to the API at `addr`: the one named, else the local
/// node's (in `data_dir`) but only to a loopback address, so that `--api` naming another
/// host never hands the local node's token to whoever listens there.
fn token_file_for(addr: SocketAddr, named: Option<PathBuf>, data_dir: &Path) -> Option<PathBuf> {
    named.or_else(|| {
        addr.ip()
            .is_loopback()
            .then(|| crate::api::guard::token_path(data_dir))
    })
}

/// Runs the command line's subcommand.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let addr = cli
        .api
        .unwrap_or_else(|| DEFAULT_API.parse().expect("valid default"));
    let default_data_dir = NodeConfig::default().data_dir;
    let token = token_file_for(addr, cli.api_token_file.clone(), &default_data_dir)
        .and_then(|file| crate::api::guard::read_token(&file));
    let api = || ApiClient::with_token(addr, token.clone());
    match cli.command {
        Command::Node(args) => daemon::run(node_config(args, cli.api)?, cli.json).await,
        Command::Add { file, no_pin } => add(&api(), &file, !no_pin, cli.json).await,
        Command::Pin(command) => repo::pin(&api(), command, cli.json).await,
        Command::Gc => repo::gc(&api(), cli.json).await,
        Command::Repo(RepoCommand::Stat) => repo::stat(&api(), cli.json).await,
        Command::Get { cid, output } => get(&api(), &cid, output, cli.json).await,
        Command::Status => {
            let status = api().status().await?;
            if cli.json {
                output::json(&status)
            } else {
                output::status(&status)
            }
            Ok(())
        }
        Command::Offers => {
            let view = api().offers().await?;
            if cli.json {
                output::json(&view)
            } else {
                output::offers(&view)
            }
            Ok(())
        }
        Command::Discover(args) => discover(&api(), args, cli.json).await,
        Command::Invoke(args) => invoke::run(&api(), args, cli.json).await,
        Command::Job(command) => invoke::job(&api(), command, cli.json).await,
        Command::Run {
            plan,
            allow_paths_outside,
        } => run_plan::run(&api(), &plan, allow_paths_outside, cli.json).await,
        Command::NetworkKey(NetworkKeyCommand::New { file }) => network_key_new(&file),
        Command::Demo(args) => demo::run(args, cli.json).await,
    }
}

/// Ends the command with this exit status, printing nothing more: how `invoke` passes
/// the function's own status on.
#[derive(Debug, thiserror::Error)]
#[error("exit status {0}")]
pub struct Exit(pub u8);

/// Builds the node's configuration: defaults, then the file, then the flags.
pub fn node_config(args: NodeArgs, api: Option<SocketAddr>) -> anyhow::Result<NodeConfig> {
    let mut config = match &args.config {
        Some(path) => NodeConfig::from_file(path)?,
        None => NodeConfig::default(),
    };
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    if !args.listen.is_empty() {
        config.listen = args.listen;
    }
    if !args.bootstrap.is_empty() {
        config.bootstrap = args.bootstrap;
    }
    if let Some(api) = api {
        config.api = api;
    }
    if args.api_allow_remote {
        config.api_allow_remote = true;
    }
    if let Some(key) = args.network_key {
        config.network_key = Some(key);
    }
    if !args.schedulers.is_empty() {
        config.schedulers = args.schedulers;
    }
    if args.no_mdns {
        config.mdns = false;
    }
    if let Some(n) = args.max_connections {
        config.max_connections = n;
    }
    if let Some(capacity) = args.store_capacity {
        config.store_capacity = capacity;
    }
    if let Some(memory) = args.offer_memory {
        config.offer_memory = Some(memory);
    }
    if let Some(slicing) = args.slicing {
        config.slicing = slicing;
    }
    if !args.trusted_schedulers.is_empty() {
        config.trusted_schedulers = args.trusted_schedulers;
    }
    if args.scheduler {
        config.scheduler = true;
    }
    if let Some(n) = args.max_tries {
        config.max_tries = n;
    }
    if let Some(key_space) = args.key_space {
        config.key_space = key_space;
    }
    if args.no_fallback {
        config.fallback = false;
    }
    if let Some(policy) = args.placement {
        config.placement = policy;
    }
    config.validate()?;
    Ok(config)
}

/// Writes a new network key to `file`, which must not exist (a key is never replaced
/// by accident), readable by its owner only.
fn network_key_new(file: &Path) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut out = options
        .open(file)
        .with_context(|| format!("cannot create {}", file.display()))?;
    out.write_all(flotilla_overlay::closed::new_key_file().as_bytes())?;
    out.sync_all()?;
    output::line(&format!(
        "wrote a new network key to {}; give it to the peers of your network (--network-key)",
        file.display()
    ));
    Ok(())
}

async fn discover(client: &ApiClient, args: DiscoverArgs, json: bool) -> anyhow::Result<()> {
    flotilla_overlay::regions::Tier::for_request(args.memory.as_u64())?;
    if args
        .max_tries
        .is_some_and(|n| n > crate::market::MAX_TRIES_LIMIT)
    {
        anyhow::bail!("--max-tries is at most {}", crate::market::MAX_TRIES_LIMIT);
    }
    let body = DiscoverBody {
        memory: args.memory.as_u64(),
        max_tries: args.max_tries,
        reserve_ms: args.reserve.map(|d| d.as_millis() as u64),
        placement: args.placement,
    };
    let discovered = client.discover(&body).await?;
    if json {
        output::json(&discovered);
    } else {
        output::discovered(&discovered);
    }
    match &discovered.report.failure {
        Some(failure) => anyhow::bail!("{failure}"),
        None => Ok(()),
    }
}

/// Parses a CID given on the command line.
pub fn parse_cid(s: &str) -> anyhow::Result<Cid> {
    Cid::try_from(s).map_err(|e| anyhow::anyhow!("invalid CID '{s}': {e}"))
}

async fn add(client: &ApiClient, file: &Path, pin: bool, json: bool) -> anyhow::Result<()> {
    let handle = tokio::fs::File::open(file)
        .await
        .with_context(|| format!("cannot open {}", file.display()))?;
    let meta = handle
        .metadata()
        .await
        .with_context(|| format!("cannot read {}", file.display()))?;
    if !meta.is_file() {
        anyhow::bail!("{} is not a regular file", file.display());
    }
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    let body = tokio_util::io::ReaderStream::new(handle).inspect_ok(move |chunk| {
        counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
    });
    let mut progress = output::Progress::new("adding", Some(meta.len()));
    let upload = client.add_with(body, pin);
    tokio::pin!(upload);
    let mut ticker = tokio::time::interval(std::time::Duration::from_millis(100));
    let added = loop {
        tokio::select! {
            result = &mut upload => break result?,
            _ = ticker.tick() => progress.set(sent.load(Ordering::Relaxed)),
        }
    };
    progress.finish();
    if json {
        output::json(&added);
    } else {
        output::line(&added.cid);
    }
    Ok(())
}

async fn get(
    client: &ApiClient,
    cid: &str,
    out: Option<PathBuf>,
    json: bool,
) -> anyhow::Result<()> {
    let cid = parse_cid(cid)?;
    if json && out.as_deref() == Some(Path::new("-")) {
        anyhow::bail!("--json prints a report on stdout, so it needs -o FILE rather than -o -");
    }
    let mut progress = output::Progress::new("fetching", None);
    let done = client.fetch(&cid, |p| progress.set(p.bytes)).await?;
    progress.finish();
    let out = out.unwrap_or_else(|| PathBuf::from(cid.to_string()));
    let mut body = client.cat(&cid).await?;
    if out == Path::new("-") {
        let mut stdout = tokio::io::stdout();
        while let Some(chunk) = body.next().await {
            stdout.write_all(&chunk?).await?;
        }
        stdout.flush().await?;
    } else {
        // Write beside the target and rename, so a failed get never leaves half a file.
        let dir = out
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let tmp = tempfile::NamedTempFile::new_in(dir)
            .with_context(|| format!("cannot write in {}", dir.display()))?;
        let mut file = tokio::fs::File::from_std(tmp.reopen()?);
        while let Some(chunk) = body.next().await {
            file.write_all(&chunk?).await?;
        }
        file.flush().await?;
        file.sync_all().await?;
        tmp.persist(&out)
            .with_context(|| format!("cannot write {}", out.display()))?;
    }
    if json {
        output::json(&serde_json::json!({
            "cid": cid.to_string(),
            "path": out,
            "blocks": done.progress.blocks,
            "bytes": done.progress.bytes,
            "fetched_blocks": done.progress.fetched_blocks,
            "peers": done.progress.peers,
            "seconds": done.seconds,
        }));
    } else if out != Path::new("-") {
        output::line(&format!("{} -> {}", cid, out.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use flotilla_overlay::regions::KeySpace;

    fn node_args(flags: &[&str]) -> NodeArgs {
        let argv = ["flotilla", "node"].iter().chain(flags);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Node(args) => args,
            other => panic!("not a node command: {other:?}"),
        }
    }

    #[test]
    fn baseline_flags_reach_the_config() {
        let config = node_config(node_args(&[]), None).unwrap();
        assert_eq!(
            (config.key_space, config.fallback),
            (KeySpace::Regions, true)
        );
        let flags = ["--key-space", "whole", "--no-fallback"];
        let config = node_config(node_args(&flags), None).unwrap();
        assert_eq!(
            (config.key_space, config.fallback),
            (KeySpace::Whole, false)
        );
        let market = config.market();
        assert_eq!(
            (market.key_space, market.fallback),
            (KeySpace::Whole, false)
        );
        let argv = ["flotilla", "node", "--key-space", "everywhere"];
        assert!(Cli::try_parse_from(argv).is_err());
        let never = node_args(&["--no-fallback", "--max-tries", "0"]);
        assert!(node_config(never, None).is_err());
    }
}

#[cfg(test)]
mod token_tests {
    use super::*;

    #[test]
    fn the_local_token_goes_only_to_a_loopback_api_unless_one_is_named() {
        let dir = Path::new("/data");
        let local = crate::api::guard::token_path(dir);
        let loopback: SocketAddr = "127.0.0.1:4180".parse().unwrap();
        let elsewhere: SocketAddr = "192.0.2.7:4180".parse().unwrap();
        assert_eq!(token_file_for(loopback, None, dir), Some(local));
        assert_eq!(token_file_for(elsewhere, None, dir), None);
        let named = PathBuf::from("/keys/remote.token");
        assert_eq!(
            token_file_for(elsewhere, Some(named.clone()), dir),
            Some(named)
        );
    }
}
