//! Crash consistency of the store and the node's database: a real `flotilla node`
//! process (a scheduler) killed with SIGKILL at random points while it adds (pinned)
//! files, fetches others' and takes detached jobs, twenty times over on one data dir.
//! After each kill the store and both databases open cleanly, every block on disk hashes
//! to its CID, every pin acknowledged before the kill is there with its whole DAG, and
//! every job acknowledged before the kill is recorded, to be carried on.
#![allow(clippy::unwrap_used)]

mod common;

use bytes::Bytes;
use common::random_bytes;
use flotilla_api::client::ApiClient;
use flotilla_node::daemon;
use flotilla_overlay::Cid;
use flotilla_overlay::blockstore::Blockstore;
use flotilla_overlay::unixfs::links_of;
use rand::{Rng, SeedableRng};
use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const ROUNDS: u64 = 20;
const CAPACITY: u64 = 256 * 1024 * 1024;

/// Starts `flotilla node` on `data_dir`, joined to `bootstrap`; returns it and its API.
fn start_node(data_dir: &Path, bootstrap: &str) -> (Child, ApiClient) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .env_remove("FLOTILLA_API")
        .env("RUST_LOG", "error")
        .args(["node", "--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0"])
        .args([
            "--api",
            "127.0.0.1:0",
            "--store-capacity",
            "256MiB",
            "--scheduler",
        ])
        .args(["--bootstrap", bootstrap])
        .arg("--data-dir")
        .arg(data_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let api = lines
        .map(|l| l.unwrap())
        .find_map(|l| l.trim().strip_prefix("API on http://").map(str::to_string))
        .expect("the node prints its API address");
    (child, ApiClient::new(api.parse().unwrap()))
}

/// The distinct blocks of the DAG under `root`, every one read and verified.
fn whole_dag(store: &Blockstore, root: Cid) -> Result<usize, String> {
    let mut seen = HashSet::from([root]);
    let mut queue = vec![root];
    while let Some(cid) = queue.pop() {
        let block = store
            .get(&cid)
            .map_err(|e| e.to_string())?
            .ok_or(format!("{cid} of {root} is missing"))?;
        for child in links_of(&block).map_err(|e| e.to_string())? {
            if seen.insert(child) {
                queue.push(child);
            }
        }
    }
    Ok(seen.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_at_random_points_keeps_a_whole_store_and_every_acknowledged_pin() {
    let dir = tempfile::tempdir().unwrap();
    // A peer holding files the crashing node fetches.
    let provider = daemon::start(flotilla_node::demo::loopback_config(
        &dir.path().join("provider"),
        Vec::new(),
    ))
    .await
    .unwrap();
    let mut shared = Vec::new();
    for seed in 0..6 {
        let data = random_bytes(3 * 1024 * 1024 / 2, 1000 + seed);
        shared.push(provider.overlay().add(&data[..]).await.unwrap().cid);
    }
    let bootstrap = format!(
        "{}/p2p/{}",
        provider.overlay().listen_addrs()[0],
        provider.peer_id()
    );
    let data_dir = dir.path().join("crashing");
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    let acknowledged: Arc<Mutex<Vec<Cid>>> = Arc::default();
    // Jobs no volunteer can take (nobody lends memory): they wait, recorded, for an hour.
    let jobs_taken: Arc<Mutex<Vec<u64>>> = Arc::default();
    let module = shared[0].to_string();
    let mut kills_during_work = 0;
    for round in 0..ROUNDS {
        let (mut child, client) = start_node(&data_dir, &bootstrap);
        // Adds and fetches run until the kill.
        let adder = {
            let client = client.clone();
            let acknowledged = acknowledged.clone();
            tokio::spawn(async move {
                for i in 0.. {
                    let size = 200_000 + (round * 7919 + i * 104_729) % 900_000;
                    let data = random_bytes(size as usize, round * 1000 + i);
                    let body = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from(data))]);
                    match client.add(body).await {
                        Ok(added) => acknowledged
                            .lock()
                            .unwrap()
                            .push(added.cid.parse().unwrap()),
                        Err(_) => return,
                    }
                }
            })
        };
        let fetcher = {
            let client = client.clone();
            let shared = shared.clone();
            tokio::spawn(async move {
                for cid in shared.iter().cycle().skip(round as usize) {
                    if client.fetch(&cid.parse().unwrap(), |_| {}).await.is_err() {
                        return;
                    }
                }
            })
        };
        let submitter = {
            let client = client.clone();
            let jobs_taken = jobs_taken.clone();
            let module = module.clone();
            tokio::spawn(async move {
                // Two a round at most: the node carries on at most a quarter of its
                // 256 jobs for one client (here itself).
                for i in 0..2u64 {
                    let body = flotilla_api::types::SubmitBody {
                        invoke: flotilla_api::types::InvokeBody {
                            call: flotilla_api::function::FunctionCall {
                                module: module.clone(),
                                memory_mib: 128,
                                timeout_ms: None,
                                args: vec![format!("{round}-{i}")],
                                env: Vec::new(),
                                stdin: None,
                                inputs: Vec::new(),
                            },
                            max_tries: None,
                            placement: None,
                            replicas: None,
                            fresh: false,
                        },
                        wait_ms: Some(3_600_000),
                    };
                    match client.submit(&body).await {
                        Ok(taken) => jobs_taken
                            .lock()
                            .unwrap()
                            .push(u64::from_str_radix(&taken.job_id, 16).unwrap()),
                        Err(_) => return,
                    }
                }
            })
        };
        let at = Duration::from_millis(rng.random_range(20..400));
        tokio::time::sleep(at).await;
        kills_during_work += usize::from(!adder.is_finished() && !fetcher.is_finished());
        child.kill().unwrap();
        child.wait().unwrap();
        let _ = adder.await;
        let _ = fetcher.await;
        let _ = submitter.await;

        // Every job acknowledged is recorded, to be carried on at the next start.
        let state = flotilla_node::state_db::StateDb::open(&data_dir.join("node.redb"))
            .unwrap_or_else(|e| panic!("round {round}: the node's database does not open: {e}"));
        let recorded: HashSet<u64> = state
            .jobs()
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        for id in jobs_taken.lock().unwrap().iter() {
            assert!(
                recorded.contains(id),
                "round {round}: job {id:016x} is lost"
            );
        }
        drop(state);

        // The store opens, every block verifies, every acknowledged pin is whole.
        let store = Blockstore::open(&data_dir.join("blockstore"), CAPACITY)
            .unwrap_or_else(|e| panic!("round {round}: the store does not open: {e}"));
        let held = store.list().unwrap();
        for key in &held {
            let cid = Cid::new_v1(flotilla_overlay::block::RAW, *key);
            // Read under its raw codec: the hash check is the same for every codec.
            assert!(
                store.get(&cid).unwrap().is_some(),
                "round {round}: block {key:?} on disk does not hash to its name"
            );
        }
        let pins: HashSet<Cid> = store.pins().unwrap().into_iter().map(|p| p.root).collect();
        for root in acknowledged.lock().unwrap().iter() {
            assert!(
                pins.contains(root),
                "round {round}: the pin on {root} is lost"
            );
            whole_dag(&store, *root).unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
        store.close().unwrap();
        assert!(store.stats().bytes <= CAPACITY);
    }
    assert!(
        acknowledged.lock().unwrap().len() >= ROUNDS as usize,
        "too few adds were acknowledged to test anything"
    );
    assert!(
        kills_during_work >= 10,
        "{kills_during_work} kills hit work under way"
    );
    assert!(
        jobs_taken.lock().unwrap().len() >= ROUNDS as usize / 2,
        "too few jobs were acknowledged to test anything"
    );
    // The node starts on the store the kills left, and serves what it pinned.
    let (mut child, client) = start_node(&data_dir, &bootstrap);
    let root = acknowledged.lock().unwrap()[0];
    let mut body = client.cat(&root).await.unwrap();
    while let Some(chunk) = futures::StreamExt::next(&mut body).await {
        chunk.unwrap();
    }
    child.kill().unwrap();
    child.wait().unwrap();
    provider.stop().await;
}
