//! `flotilla demo`: a local Flotilla network on loopback — one scheduler and volunteers
//! lending different amounts of memory — that adds an example function and its input as
//! blocks, invokes the function by CID, and prints its output and where the time went.
//!
//! The example modules are built into the binary from `examples/wasm`, so the demo needs
//! no toolchain and no files.

use crate::api::client::ApiClient;
use crate::api::types::{InvokeBody, InvokeReply};
use crate::cli::DemoArgs;
use crate::config::NodeConfig;
use crate::daemon::{self, RunningNode};
use crate::market::function::FunctionCall;
use crate::{invoke, output};
use bytes::Bytes;
use bytesize::ByteSize;
use sha2::{Digest, Sha256};
use std::time::{Duration, Instant};

/// The example function the demo runs: SHA-256 of stdin.
const SHA256_WASM: &[u8] = include_bytes!("../../../examples/wasm/sha256.wasm");
/// A second one, with an input file and an output file: word count.
const WORDCOUNT_WASM: &[u8] = include_bytes!("../../../examples/wasm/wordcount.wasm");
/// The text both read.
const WORDS: &[u8] = include_bytes!("../../../examples/data/words.txt");
/// Memory the volunteers lend, in MiB: one each of several sizes.
const LENT_MIB: [u64; 6] = [256, 512, 1024, 2048, 384, 768];

/// Config of a node for a local loopback network: ephemeral ports, no mDNS.
pub fn loopback_config(
    data_dir: &std::path::Path,
    bootstrap: Vec<libp2p::Multiaddr>,
) -> NodeConfig {
    NodeConfig {
        data_dir: data_dir.to_path_buf(),
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("valid multiaddr")],
        bootstrap,
        api: "127.0.0.1:0".parse().expect("valid address"),
        mdns: false,
        ..NodeConfig::default()
    }
}

/// Starts `n` nodes on loopback, all bootstrapped through the first.
pub async fn start_network(root: &std::path::Path, n: usize) -> anyhow::Result<Vec<RunningNode>> {
    start_network_with(root, n, |_, config| config).await
}

/// Starts `n` nodes on loopback, all bootstrapped through the first, with node `i`'s
/// loopback config adjusted by `adjust(i, config)` (to make it an offerer, say).
pub async fn start_network_with(
    root: &std::path::Path,
    n: usize,
    adjust: impl Fn(usize, NodeConfig) -> NodeConfig,
) -> anyhow::Result<Vec<RunningNode>> {
    let first = daemon::start(adjust(0, loopback_config(&root.join("node-0"), Vec::new()))).await?;
    let bootstrap = vec![first.bootstrap_addr()];
    let mut nodes = vec![first];
    for i in 1..n {
        let config = loopback_config(&root.join(format!("node-{i}")), bootstrap.clone());
        nodes.push(daemon::start(adjust(i, config)).await?);
    }
    Ok(nodes)
}

/// Runs the demo.
pub async fn run(args: DemoArgs, json: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        (2..=1 + LENT_MIB.len()).contains(&args.nodes),
        "the demo runs 2 to {} nodes (one scheduler, the rest volunteers)",
        1 + LENT_MIB.len()
    );
    let say = |text: String| {
        if !json {
            output::line(&text);
        }
    };
    let dir = tempfile::tempdir()?;
    let started = Instant::now();
    let nodes = start_network_with(dir.path(), args.nodes, |i, config| match i {
        0 => NodeConfig {
            scheduler: true,
            notify_interval: Duration::from_millis(500),
            // The demo's calls take a volunteer well under the 10 ms below which a run
            // is not worth memoizing; it shows a memoized answer all the same.
            memo_min_run: Duration::ZERO,
            ..config
        },
        i => NodeConfig {
            offer_memory: Some(ByteSize::mib(LENT_MIB[i - 1])),
            notify_interval: Duration::from_millis(500),
            ..config
        },
    })
    .await?;
    say(format!(
        "started {} nodes on loopback in {:.0?}:",
        nodes.len(),
        started.elapsed()
    ));
    for (i, node) in nodes.iter().enumerate() {
        let role = match i {
            0 => "scheduler and client".to_string(),
            i => format!("volunteer lending {} MiB", LENT_MIB[i - 1]),
        };
        say(format!("  node {i}: {} ({role})", node.peer_id()));
    }
    let result = invoke_examples(&nodes, json).await;
    for node in nodes {
        node.stop().await;
    }
    let report = result?;
    if json {
        output::json(&report);
    }
    Ok(())
}

#[derive(serde::Serialize)]
struct Report {
    nodes: usize,
    module: String,
    input: String,
    output: String,
    first: InvokeReply,
    again: InvokeReply,
    wordcount: InvokeReply,
}

async fn invoke_examples(nodes: &[RunningNode], json: bool) -> anyhow::Result<Report> {
    let say = |text: String| {
        if !json {
            output::line(&text);
        }
    };
    let client = ApiClient::new(nodes[0].api_addr());
    let market = nodes[0].market();
    let waiting = Instant::now();
    while market.offers().await.super_traders < nodes.len() - 1 {
        anyhow::ensure!(
            waiting.elapsed() < Duration::from_secs(30),
            "the volunteers' offers did not reach the scheduler within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    say(format!(
        "every volunteer published its offers ({:.0?})",
        waiting.elapsed()
    ));

    let add = |bytes: &'static [u8]| {
        let client = client.clone();
        async move {
            let body = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(bytes))]);
            anyhow::Ok(client.add(body).await?.cid)
        }
    };
    let module = add(SHA256_WASM).await?;
    let input = add(WORDS).await?;
    say(format!(
        "node 0 added examples/wasm/sha256.wasm as {module} ({} bytes)",
        SHA256_WASM.len()
    ));
    say(format!(
        "node 0 added examples/data/words.txt as {input} ({} bytes)",
        WORDS.len()
    ));

    let call = InvokeBody {
        call: FunctionCall {
            module: module.clone(),
            memory_mib: 128,
            timeout_ms: Some(10_000),
            args: Vec::new(),
            env: Vec::new(),
            stdin: Some(input.clone()),
            inputs: Vec::new(),
        },
        max_tries: None,
        placement: None,
        replicas: None,
        fresh: false,
    };
    say(format!(
        "\n$ flotilla invoke {module} --memory 128MiB --stdin-cid {input}"
    ));
    let first = client.invoke(&call).await?;
    let output = String::from_utf8_lossy(&first.invocation.execution.stdout.inline).to_string();
    let expected = format!("{:x}  -\n", Sha256::digest(WORDS));
    anyhow::ensure!(
        output == expected,
        "the function printed {output:?}, expected {expected:?}"
    );
    narrate(&say, &first, &output);
    say("(matches the SHA-256 computed here)".into());

    say(format!(
        "\n$ flotilla invoke {module} --memory 128MiB --stdin-cid {input} --fresh"
    ));
    say("the same call run again: the volunteer has the blocks and the compiled module".into());
    let fresh = InvokeBody {
        fresh: true,
        ..call.clone()
    };
    let again = client.invoke(&fresh).await?;
    narrate(
        &say,
        &again,
        &String::from_utf8_lossy(&again.invocation.execution.stdout.inline),
    );

    say(format!(
        "\n$ flotilla invoke {module} --memory 128MiB --stdin-cid {input}"
    ));
    say(
        "without --fresh: sha256 read no clock and no random numbers, so its answer is memoized \
         (this demo memoizes even runs under memo_min_run, 10 ms)"
            .into(),
    );
    let memoized = client.invoke(&call).await?;
    anyhow::ensure!(
        memoized.invocation.memoized
            && memoized.invocation.execution.stdout.inline
                == first.invocation.execution.stdout.inline,
        "the same pure call was not answered from its memo"
    );
    narrate(
        &say,
        &memoized,
        &String::from_utf8_lossy(&memoized.invocation.execution.stdout.inline),
    );

    let counter = add(WORDCOUNT_WASM).await?;
    say(format!(
        "\n$ flotilla invoke {counter} --memory 128MiB --input words.txt={input} --arg words.txt"
    ));
    let count_call = InvokeBody {
        call: FunctionCall {
            module: counter,
            args: vec!["words.txt".into()],
            stdin: None,
            inputs: vec![("words.txt".into(), input.clone())],
            ..call.call.clone()
        },
        ..call.clone()
    };
    let wordcount = client.invoke(&count_call).await?;
    narrate(
        &say,
        &wordcount,
        &String::from_utf8_lossy(&wordcount.invocation.execution.stdout.inline),
    );
    for file in &wordcount.invocation.execution.outputs {
        say(format!(
            "output file {} ({} bytes) is {} — `flotilla get` fetches it",
            file.name, file.size, file.cid
        ));
    }
    Ok(Report {
        nodes: nodes.len(),
        module,
        input,
        output,
        first,
        again,
        wordcount,
    })
}

/// Prints what a run wrote and where its time went.
fn narrate(say: &impl Fn(String), reply: &InvokeReply, stdout: &str) {
    let execution = &reply.invocation.execution;
    say(stdout.trim_end().to_string());
    let how = if reply.invocation.memoized {
        "answered from the memo of a run on volunteer"
    } else {
        "ran on volunteer"
    };
    say(format!(
        "{how} {} with {} MiB, exit status {}",
        execution.volunteer, execution.memory_mib, execution.exit_code
    ));
    for line in invoke::timing_lines(reply) {
        say(format!("  {line}"));
    }
}
