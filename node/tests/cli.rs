//! The `flotilla` binary as a user runs it: a node's life from start to SIGTERM, offers
//! and discovery, invoking functions (exit statuses, stdin, detached jobs read back after
//! the client node and the scheduler have gone), and bad input answered with a one-line
//! error and a non-zero exit.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

fn flotilla() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flotilla"));
    cmd.env_remove("FLOTILLA_API").env_remove("RUST_LOG");
    cmd
}

/// A port nothing listens on (bound, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Asserts the command failed with exactly one line on stderr, starting `error:` and
/// containing `expected`.
fn assert_one_line_error(output: &Output, expected: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "command succeeded; stderr: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{}", lines[0]);
    assert!(
        lines[0].contains(expected),
        "'{}' does not mention '{expected}'",
        lines[0]
    );
}

fn node_command(data_dir: &Path, api: &str) -> Command {
    let mut cmd = flotilla();
    // Only warnings, so stderr holds just the error line when start-up fails.
    cmd.env("RUST_LOG", "warn");
    cmd.args([
        "node",
        "--no-mdns",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--api",
        api,
    ])
    .arg("--data-dir")
    .arg(data_dir);
    cmd
}

/// A node started as a process; killed if the test fails before stopping it.
struct NodeProcess {
    child: Child,
    api: String,
    peer_id: String,
    /// Its first listen address, with /p2p/<PeerId>: what others bootstrap to.
    addr: String,
}

impl NodeProcess {
    fn start(data_dir: &Path) -> NodeProcess {
        NodeProcess::spawn(node_command(data_dir, "127.0.0.1:0"))
    }

    fn spawn(mut command: Command) -> NodeProcess {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().unwrap().unwrap();
        let peer_id = first.strip_prefix("flotilla node ").unwrap().to_string();
        let mut api = None;
        let mut addr = None;
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(found) = line.trim().strip_prefix("API on http://") {
                api = Some(found.to_string());
                break;
            }
            assert!(line.contains("listening on /ip4/127.0.0.1/tcp/"), "{line}");
            addr.get_or_insert_with(|| line.trim().trim_start_matches("listening on ").to_string());
        }
        NodeProcess {
            child,
            api: api.unwrap(),
            peer_id,
            addr: addr.unwrap(),
        }
    }

    fn cli(&self, args: &[&str]) -> Output {
        flotilla()
            .args(args)
            .args(["--api", &self.api])
            .output()
            .unwrap()
    }

    /// Sends SIGTERM and returns whether the node exited cleanly.
    fn terminate(mut self) -> bool {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        self.child.wait().unwrap().success()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

/// A raw `POST /v0/add` of five bytes with extra header lines, as a browser might send.
fn raw_http(api: &str, extra_headers: &str) -> String {
    raw_request(api, api, extra_headers)
}

fn raw_http_host(api: &str, host: &str) -> String {
    raw_request(api, host, "")
}

fn raw_request(api: &str, host: &str, extra_headers: &str) -> String {
    use std::io::{Read, Write};
    let mut socket = std::net::TcpStream::connect(api).unwrap();
    write!(
        socket,
        "POST /v0/add HTTP/1.1\r\nHost: {host}\r\n{extra_headers}Content-Length: 5\r\nConnection: close\r\n\r\nhello"
    )
    .unwrap();
    let mut response = String::new();
    socket.read_to_string(&mut response).unwrap();
    response
}

#[test]
fn a_node_serves_the_cli_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProcess::start(&dir.path().join("node"));

    let status = node.cli(&["status", "--json"]);
    assert!(status.status.success());
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["peer_id"], node.peer_id.as_str());
    assert_eq!(status["store"]["blocks"], 0);

    let file = dir.path().join("input.bin");
    let data: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&file, &data).unwrap();
    let added = node.cli(&["add", file.to_str().unwrap()]);
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    let cid = String::from_utf8(added.stdout).unwrap().trim().to_string();
    assert!(cid.starts_with("bafy"), "{cid}");

    let out = dir.path().join("output.bin");
    let got = node.cli(&["get", &cid, "-o", out.to_str().unwrap(), "--json"]);
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    assert!(std::fs::read(&out).unwrap() == data);
    let report: serde_json::Value = serde_json::from_slice(&got.stdout).unwrap();
    assert_eq!(report["cid"], cid.as_str());

    // A well-formed CID that no peer has.
    let missing = "bafkreihwsnuregceqh263vgdathcprnbvatyat6h6mu7ipjhhodcdbyhoy";
    let out_missing = dir.path().join("missing.bin");
    let output = node.cli(&["get", missing, "-o", out_missing.to_str().unwrap()]);
    assert_one_line_error(&output, &format!("no peer could provide {missing}"));
    assert!(!out_missing.exists(), "a failed get left a file behind");

    // Web pages cannot use the API: not cross-site, not by DNS rebinding.
    assert!(raw_http(&node.api, "Origin: http://attacker.example\r\n").starts_with("HTTP/1.1 403"));
    assert!(raw_http_host(&node.api, "attacker.example").starts_with("HTTP/1.1 403"));
    assert!(raw_http(&node.api, "").starts_with("HTTP/1.1 200"));

    let metrics = node.cli(&["status"]);
    // The 700 000-byte file's four blocks, and the five bytes the last raw request added.
    assert!(String::from_utf8_lossy(&metrics.stdout).contains("blocks held:     5"));
    assert!(node.terminate(), "the node did not exit cleanly on SIGTERM");
}

#[test]
fn pins_gc_and_repo_stat_work_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProcess::start(&dir.path().join("node"));
    let write = |name: &str, seed: u32| {
        let path = dir.path().join(name);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * seed % 251) as u8).collect();
        std::fs::write(&path, data).unwrap();
        path
    };
    let ok = |output: Output| {
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap().trim().to_string()
    };
    let kept = write("kept.bin", 7);
    let pinned = ok(node.cli(&["add", kept.to_str().unwrap()]));
    let temporary = write("temporary.bin", 11);
    let cached = ok(node.cli(&["add", "--no-pin", temporary.to_str().unwrap()]));
    assert_ne!(pinned, cached);

    let pins: serde_json::Value =
        serde_json::from_str(&ok(node.cli(&["pin", "ls", "--json"]))).unwrap();
    assert_eq!(pins.as_array().unwrap().len(), 1);
    assert_eq!(pins[0]["cid"], pinned.as_str());
    let stat: serde_json::Value =
        serde_json::from_str(&ok(node.cli(&["repo", "stat", "--json"]))).unwrap();
    assert_eq!(stat["pins"], 1);
    assert!(stat["pinned_bytes"].as_u64().unwrap() >= 300_000, "{stat}");
    assert!(
        stat["evictable_bytes"].as_u64().unwrap() >= 300_000,
        "{stat}"
    );
    assert!(ok(node.cli(&["repo", "stat"])).contains("pinned:"));

    // gc removes the cache and keeps the pin.
    let gc: serde_json::Value = serde_json::from_str(&ok(node.cli(&["gc", "--json"]))).unwrap();
    assert!(gc["blocks"].as_u64().unwrap() >= 2, "{gc}");
    let stat: serde_json::Value =
        serde_json::from_str(&ok(node.cli(&["repo", "stat", "--json"]))).unwrap();
    assert_eq!(stat["evictable_bytes"], 0, "{stat}");
    let out = dir.path().join("back.bin");
    ok(node.cli(&["get", &pinned, "-o", out.to_str().unwrap()]));
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&kept).unwrap());

    // Unpinned, it is cache: the next gc takes it.
    assert!(ok(node.cli(&["pin", "rm", &pinned])).starts_with("unpinned"));
    assert_one_line_error(&node.cli(&["pin", "rm", &pinned]), "is not pinned");
    assert!(ok(node.cli(&["pin", "add", &pinned])).starts_with("pinned"));
    assert!(ok(node.cli(&["pin", "add", &pinned])).contains("pinned already"));
    assert_one_line_error(&node.cli(&["pin", "add", "bafynotacid"]), "invalid CID");
    assert!(ok(node.cli(&["pin", "rm", &pinned])).starts_with("unpinned"));
    ok(node.cli(&["gc"]));
    let stat: serde_json::Value =
        serde_json::from_str(&ok(node.cli(&["repo", "stat", "--json"]))).unwrap();
    assert_eq!(
        (stat["blocks"].as_u64(), stat["pins"].as_u64()),
        (Some(0), Some(0))
    );
    assert!(node.terminate());
}

#[test]
fn a_malformed_cid_is_refused() {
    let output = flotilla()
        .args([
            "get",
            "bafynotacid",
            "--api",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .output()
        .unwrap();
    assert_one_line_error(&output, "invalid CID 'bafynotacid'");
}

#[test]
fn a_missing_file_is_refused() {
    let output = flotilla()
        .args(["add", "/nonexistent/flotilla-input"])
        .output()
        .unwrap();
    assert_one_line_error(&output, "cannot open /nonexistent/flotilla-input");
}

#[test]
fn no_running_node_is_reported() {
    let api = format!("127.0.0.1:{}", free_port());
    let output = flotilla().args(["status", "--api", &api]).output().unwrap();
    assert_one_line_error(&output, &format!("no Flotilla node answering at {api}"));
    // The environment variable is honoured when --api is absent.
    let output = flotilla()
        .arg("status")
        .env("FLOTILLA_API", &api)
        .output()
        .unwrap();
    assert_one_line_error(&output, &format!("no Flotilla node answering at {api}"));
}

#[test]
fn an_unreachable_bootstrap_peer_stops_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let peer = libp2p::identity::Keypair::generate_ed25519()
        .public()
        .to_peer_id();
    let addr = format!("/ip4/127.0.0.1/tcp/{}/p2p/{peer}", free_port());
    let output = node_command(dir.path(), "127.0.0.1:0")
        .args(["--bootstrap", &addr])
        .output()
        .unwrap();
    assert_one_line_error(
        &output,
        &format!("none of the bootstrap peers could be reached: {addr}: Connection refused"),
    );
}

#[test]
fn a_port_in_use_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let output = flotilla()
        .env("RUST_LOG", "warn")
        .args([
            "node",
            "--no-mdns",
            "--api",
            "127.0.0.1:0",
            "--listen",
            &format!("/ip4/127.0.0.1/tcp/{port}"),
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_one_line_error(
        &output,
        &format!("cannot listen on /ip4/127.0.0.1/tcp/{port}: Address already in use"),
    );
    let output = node_command(dir.path(), &format!("127.0.0.1:{port}"))
        .output()
        .unwrap();
    assert_one_line_error(
        &output,
        &format!("cannot serve the API on 127.0.0.1:{port}"),
    );
}

#[test]
fn a_bad_config_file_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("flotilla.toml");
    std::fs::write(
        &config,
        "listen = [\"/ip4/127.0.0.1/tcp/0\"]\nmax_conections = 3\n",
    )
    .unwrap();
    let output = node_command(dir.path(), "127.0.0.1:0")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_one_line_error(&output, "invalid config file");
}

/// Polls a CLI command's JSON output until `ready` holds (at most 10 s).
fn poll_json(node: &NodeProcess, args: &[&str], ready: impl Fn(&serde_json::Value) -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let output = node.cli(args);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        if ready(&serde_json::from_slice(&output.stdout).unwrap()) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out polling {args:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn an_offering_scheduler_lists_its_offers_and_discovers_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("flotilla.toml");
    std::fs::write(&config, "notify_interval = \"200ms\"\n").unwrap();
    let mut cmd = node_command(&dir.path().join("node"), "127.0.0.1:0");
    cmd.args(["--offer-memory", "2GiB", "--scheduler", "--config"])
        .arg(&config);
    let node = NodeProcess::spawn(cmd);

    // One 2 GiB offer, published (to itself: it is the only peer) and on its own
    // super-trader list.
    poll_json(&node, &["offers", "--json"], |v| {
        v["sent"][0]["state"] == "published" && v["super_traders"] == 1
    });
    let offers = node.cli(&["offers"]);
    let text = String::from_utf8_lossy(&offers.stdout);
    assert!(text.contains("role: offerer and scheduler"), "{text}");
    assert!(text.contains("lends 2048 MiB in 1 offer(s)"), "{text}");
    assert!(text.contains("holds 1 offer(s) for others"), "{text}");

    // 512 MiB with 3 probes: nothing in the 512 or 1024 MiB regions; probing goes on to
    // the 2048 MiB region, which has the 2 GiB offer (a small call served from a large
    // offer).
    let found = node.cli(&["discover", "--memory", "512MiB", "--max-tries", "3"]);
    let text = String::from_utf8_lossy(&found.stdout);
    assert!(
        found.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&found.stderr)
    );
    for expected in [
        "probes:     3",
        "1. 512 MiB region",
        "2. 1024 MiB region",
        "3. 2048 MiB region",
        "1 offer(s), 1 fit",
        "fallback:   not used",
        "found:      1 offer(s)",
        "time:",
    ] {
        assert!(text.contains(expected), "no '{expected}' in {text}");
    }
    // 2 GiB, reserved: probing its own region finds it at once.
    let reserved = node.cli(&["discover", "--memory", "2GiB", "--reserve", "30s", "--json"]);
    assert!(
        reserved.status.success(),
        "{}",
        String::from_utf8_lossy(&reserved.stderr)
    );
    let reserved: serde_json::Value = serde_json::from_slice(&reserved.stdout).unwrap();
    assert_eq!(reserved["report"]["probes"].as_array().unwrap().len(), 1);
    assert_eq!(reserved["report"]["used_fallback"], false);
    assert_eq!(reserved["placement"]["reservation"]["mib"], 2048);
    poll_json(&node, &["offers", "--json"], |v| {
        v["reservations"].as_array().unwrap().len() == 1 && v["sent"][0]["in_use_mib"] == 2048
    });

    // Nothing is left (once the fallback list and, after the update delay, the holder
    // have heard): a clear reason and a failing exit.
    poll_json(&node, &["offers", "--json"], |v| {
        v["super_traders"] == 0 && v["held"].as_array().unwrap().is_empty()
    });
    let none = node.cli(&["discover", "--memory", "1GiB"]);
    assert_one_line_error(&none, "no offer with 1024 MiB free");
    assert!(String::from_utf8_lossy(&none.stdout).contains("fallback:   used"));
    let too_big = node.cli(&["discover", "--memory", "20GiB"]);
    assert_one_line_error(
        &too_big,
        "20480 MiB is more than the largest tier (10240 MiB)",
    );
    assert!(node.terminate());
}

#[test]
fn offering_less_than_the_smallest_tier_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let output = node_command(dir.path(), "127.0.0.1:0")
        .args(["--offer-memory", "100MiB"])
        .output()
        .unwrap();
    assert_one_line_error(
        &output,
        "invalid setting offer_memory: 100.0 MiB is less than the smallest tier",
    );
}

fn examples(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn stdout_text(output: &Output) -> String {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone())
        .unwrap()
        .trim()
        .to_string()
}

/// A node process joining through `bootstrap`, with quick market timings and `extra` flags.
fn joining(
    root: &Path,
    name: &str,
    bootstrap: Option<&NodeProcess>,
    extra: &[&str],
) -> NodeProcess {
    let config = root.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        "notify_interval = \"200ms\"\nanswer_timeout = \"1s\"\nfetch_timeout = \"3s\"\n",
    )
    .unwrap();
    let mut cmd = node_command(&root.join(name), "127.0.0.1:0");
    cmd.arg("--config").arg(&config).args(extra);
    if let Some(peer) = bootstrap {
        cmd.args(["--bootstrap", &peer.addr]);
    }
    NodeProcess::spawn(cmd)
}

#[test]
fn functions_are_invoked_by_cid_and_detached_jobs_outlive_their_client_and_scheduler() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let scheduler = joining(root, "scheduler", None, &["--scheduler"]);
    let volunteers: Vec<NodeProcess> = ["512MiB", "1GiB"]
        .iter()
        .enumerate()
        .map(|(i, memory)| {
            joining(
                root,
                &format!("volunteer-{i}"),
                Some(&scheduler),
                &["--offer-memory", memory],
            )
        })
        .collect();
    let client = joining(root, "client", Some(&scheduler), &[]);
    poll_json(&scheduler, &["offers", "--json"], |v| {
        v["super_traders"] == 2
    });

    let add =
        |node: &NodeProcess, path: &Path| stdout_text(&node.cli(&["add", path.to_str().unwrap()]));
    let echo = add(&client, &examples("examples/wasm/echo.wasm"));
    let sha256 = add(&client, &examples("examples/wasm/sha256.wasm"));
    let exit = add(&client, &examples("examples/wasm/exit.wasm"));

    // stdout printed, exit status 0.
    let said = client.cli(&["invoke", &echo, "--arg", "hello", "--arg", "--world"]);
    assert_eq!(stdout_text(&said), "hello --world");
    // --stdin FILE goes in as a CID; the digest is sha256sum's.
    let words = examples("examples/data/words.txt");
    let hashed = client.cli(&[
        "invoke",
        &sha256,
        "--memory",
        "256MiB",
        "--stdin",
        words.to_str().unwrap(),
    ]);
    let expected = format!(
        "{:x}  -",
        sha2::Digest::finalize(sha2::Digest::chain_update(
            <sha2::Sha256 as sha2::Digest>::new(),
            std::fs::read(&words).unwrap(),
        ))
    );
    assert_eq!(stdout_text(&hashed), expected);
    // The function's exit status and stderr come through.
    let exited = client.cli(&["invoke", &exit, "--arg", "3"]);
    assert_eq!(exited.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&exited.stderr).contains("exiting with 3"));
    // --json: the whole result.
    let json = client.cli(&["invoke", &echo, "--arg", "x", "--json"]);
    let result: serde_json::Value = serde_json::from_str(&stdout_text(&json)).unwrap();
    assert_eq!(result["execution"]["stdout"]["inline"], "x\n");
    assert_eq!(result["execution"]["exit_code"], 0);
    assert!(result["total_us"].as_u64().unwrap() > 0);
    // With the volunteer's signed receipt, checked by the local node.
    let receipt: flotilla_node::market::receipt::Receipt =
        serde_json::from_value(result["execution"]["receipt"].clone()).unwrap();
    receipt.verify().unwrap();
    assert_eq!(
        receipt.body.volunteer.to_string(),
        result["execution"]["volunteer"]
    );
    assert_eq!(receipt.body.exit_code, 0);
    // Stdout over 16 KiB comes back by CID, and invoke prints all of it.
    let lines = |n: usize| -> String { (0..n).map(|i| format!("line {i}\n")).collect() };
    let big = root.join("big.txt");
    std::fs::write(&big, lines(5000)).unwrap();
    let copied = client.cli(&["invoke", &echo, "--stdin", big.to_str().unwrap(), "--json"]);
    let result: serde_json::Value = serde_json::from_str(&stdout_text(&copied)).unwrap();
    assert!(result["execution"]["stdout"]["cid"].is_string(), "{result}");
    let printed = client.cli(&["invoke", &echo, "--stdin", big.to_str().unwrap()]);
    assert_eq!(String::from_utf8(printed.stdout).unwrap(), lines(5000));

    // Bad input: one line, non-zero exit, nothing left reserved.
    let not_wasm = add(&client, &words);
    assert_one_line_error(
        &client.cli(&["invoke", &not_wasm]),
        "not a WebAssembly module",
    );
    assert_one_line_error(
        &client.cli(&["invoke", &echo, "--memory", "11GiB"]),
        "more than the largest tier",
    );
    assert_one_line_error(
        &client.cli(&[
            "invoke",
            &echo,
            "--input",
            "data=bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy",
        ]),
        "cannot fetch the input \"data\"",
    );
    assert_one_line_error(
        &client.cli(&["invoke", &echo, "--input", "noequals"]),
        "--input takes NAME=CID",
    );
    assert_one_line_error(&client.cli(&["invoke", "not-a-cid"]), "invalid CID");
    for volunteer in &volunteers {
        poll_json(volunteer, &["offers", "--json"], |v| {
            v["reservations"].as_array().unwrap().is_empty()
        });
    }

    // A detached job: its id at once; its result read after the client node and the
    // scheduler have both gone, through a new node.
    let job = stdout_text(&client.cli(&["invoke", &echo, "--detach", "--arg", "later"]));
    assert_eq!(job.len(), 16, "{job}");
    poll_json(&client, &["job", "status", &job, "--json"], |v| {
        v["state"] == "done"
    });
    // One whose stdout (10 KiB) is too large for its record: the scheduler keeps it as a
    // block, and the peers that keep the record take a copy of it.
    let blocks = |node: &NodeProcess| {
        let status = stdout_text(&node.cli(&["status", "--json"]));
        serde_json::from_str::<serde_json::Value>(&status).unwrap()["store"]["blocks"]
            .as_u64()
            .unwrap()
    };
    let before: Vec<u64> = volunteers.iter().map(blocks).collect();
    let medium = root.join("medium.txt");
    std::fs::write(&medium, lines(1200)).unwrap();
    let long_job = stdout_text(&client.cli(&[
        "invoke",
        &echo,
        "--detach",
        "--stdin",
        medium.to_str().unwrap(),
    ]));
    poll_json(&client, &["job", "status", &long_job, "--json"], |v| {
        v["state"] == "done" && v["result"]["execution"]["stdout"]["cid"].is_string()
    });
    for (volunteer, before) in volunteers.iter().zip(before) {
        poll_json(volunteer, &["status", "--json"], |v| {
            v["store"]["blocks"].as_u64().unwrap() > before
        });
    }
    assert!(client.terminate());
    assert!(scheduler.terminate());
    let returning = joining(root, "returning-client", Some(&volunteers[0]), &[]);
    let status = stdout_text(&returning.cli(&["job", "status", &job]));
    assert!(status.contains(&format!("job {job}: done")), "{status}");
    assert_eq!(
        stdout_text(&returning.cli(&["job", "result", &job])),
        "later"
    );
    let long_result = returning.cli(&["job", "result", &long_job]);
    assert_eq!(String::from_utf8(long_result.stdout).unwrap(), lines(1200));
    assert_one_line_error(&returning.cli(&["job", "result", "zz"]), "not a job id");
    assert_one_line_error(
        &returning.cli(&["job", "status", "0000000000000001"]),
        "no record of job",
    );
    assert!(returning.terminate());
    for volunteer in volunteers {
        assert!(volunteer.terminate());
    }
}

#[test]
fn a_plan_runs_its_jobs_in_dependency_order_and_bad_plans_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let node = joining(
        dir.path(),
        "node",
        None,
        &["--scheduler", "--offer-memory", "1GiB"],
    );
    poll_json(&node, &["offers", "--json"], |v| v["super_traders"] == 1);
    let plan = examples("examples/count-then-hash.toml");
    let ran = node.cli(&["run", plan.to_str().unwrap(), "--json"]);
    let outcomes: serde_json::Value = serde_json::from_str(&stdout_text(&ran)).unwrap();
    for job in ["count", "hash", "shout"] {
        assert_eq!(outcomes[job]["state"], "completed", "{outcomes}");
    }
    // hash read count's counts.txt by CID: its stdout is that file's digest.
    let get = |cid: &serde_json::Value| {
        let output = node.cli(&["get", cid.as_str().unwrap(), "-o", "-"]);
        assert!(output.status.success());
        output.stdout
    };
    let counts = get(&outcomes["count"]["cids"]["counts.txt"]);
    assert!(String::from_utf8_lossy(&counts).starts_with("5 71 377"));
    let digest = get(&outcomes["hash"]["cids"]["stdout"]);
    let expected = format!(
        "{:x}  -\n",
        sha2::Digest::finalize(sha2::Digest::chain_update(
            <sha2::Sha256 as sha2::Digest>::new(),
            &counts
        ))
    );
    assert_eq!(String::from_utf8_lossy(&digest), expected);
    let text = stdout_text(&node.cli(&["run", plan.to_str().unwrap()]));
    assert!(text.contains("count: exit 0 on"), "{text}");
    assert!(text.contains("counts.txt"), "{text}");

    // A failing job stops the job that waits for it, and the run fails.
    let failing = dir.path().join("failing.toml");
    let exit = examples("examples/wasm/exit.wasm");
    std::fs::write(
        &failing,
        format!(
            "[jobs.fail]\nmodule = {{ file = {exit:?} }}\nargs = [\"2\"]\n[jobs.next]\nmodule = {{ file = {exit:?} }}\nafter = [\"fail\"]\n"
        ),
    )
    .unwrap();
    // (Its module is outside the plan's directory: allowed by the flag.)
    let output = node.cli(&["run", failing.to_str().unwrap(), "--allow-paths-outside"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("fail: failed: exit status 2"), "{stdout}");
    assert!(stdout.contains("next: skipped"), "{stdout}");
    assert_one_line_error(&output, "2 of 2 jobs did not complete");

    // Malformed plans: one line each, nothing run.
    let bad = dir.path().join("bad.toml");
    for (text, expected) in [
        ("[jobs.a]\nmodule = 5\n", "invalid plan"),
        ("[jobs.a\n", "invalid plan"),
        (
            "[jobs.a]\nmodule = { cid = \"x\" }\nafter = [\"ghost\"]\n",
            "refers to job \"ghost\"",
        ),
    ] {
        std::fs::write(&bad, text).unwrap();
        assert_one_line_error(&node.cli(&["run", bad.to_str().unwrap()]), expected);
    }
    assert_one_line_error(
        &node.cli(&["run", "/no/such/plan.toml"]),
        "cannot read the plan",
    );
    poll_json(&node, &["offers", "--json"], |v| {
        v["reservations"].as_array().unwrap().is_empty()
    });
    assert!(node.terminate());
}

/// The peers `node`'s status lists as connected.
fn connected_peers(node: &NodeProcess) -> Vec<String> {
    let output = node.cli(&["status", "--json"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    serde_json::from_value(status["connected_peers"].clone()).unwrap()
}

#[test]
fn a_connection_to_a_frozen_peer_is_closed_after_missed_pings() {
    let dir = tempfile::tempdir().unwrap();
    let a = joining(dir.path(), "a", None, &[]);
    let b = joining(dir.path(), "b", Some(&a), &[]);
    let wait_for = |what: &str, limit: u64, done: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(limit);
        while !done() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting until {what}"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    };
    wait_for("a is connected to b", 10, &|| {
        connected_peers(&a).contains(&b.peer_id)
    });
    // Frozen, b keeps its TCP connection open (the kernel still acknowledges) but
    // answers nothing: only missed pings tell. Three in a row close it in about 30 s,
    // before the 60 s idle timeout would.
    let pid = b.child.id().to_string();
    Command::new("kill").args(["-STOP", &pid]).status().unwrap();
    wait_for("a closes its connection to the frozen b", 55, &|| {
        !connected_peers(&a).contains(&b.peer_id)
    });
    Command::new("kill").args(["-CONT", &pid]).status().unwrap();
    assert!(b.terminate());
    assert!(a.terminate());
}

/// The fresh network of the issue: one scheduler and four volunteers lending 1 GiB each,
/// every one with the default settings (a 10 s notify interval). A 128 MiB call made as
/// soon as the volunteers' offers are published succeeds at the first try, from a large
/// offer: probing goes on from the empty 128 MiB region to larger ones, and the offerers
/// told the scheduler of their new offers at once. (Before, probes looked only in the
/// 128 MiB region and the fallback list stayed empty until the first interval: the call
/// failed with "nothing fits" for 10 s.)
#[test]
fn a_small_call_on_a_fresh_network_is_served_from_large_offers_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let scheduler = NodeProcess::spawn({
        let mut cmd = node_command(&root.join("scheduler"), "127.0.0.1:0");
        cmd.arg("--scheduler");
        cmd
    });
    let volunteers: Vec<NodeProcess> = (0..4)
        .map(|i| {
            let mut cmd = node_command(&root.join(format!("volunteer-{i}")), "127.0.0.1:0");
            cmd.args(["--offer-memory", "1GiB", "--bootstrap", &scheduler.addr]);
            NodeProcess::spawn(cmd)
        })
        .collect();
    let joined = std::time::Instant::now();
    let client = &volunteers[0];
    let echo =
        stdout_text(&client.cli(&["add", examples("examples/wasm/echo.wasm").to_str().unwrap()]));
    for volunteer in &volunteers {
        poll_json(volunteer, &["offers", "--json"], |v| {
            v["sent"][0]["state"] == "published"
        });
    }
    let published = joined.elapsed();
    // One try, no retry loop: it must succeed now.
    let called = client.cli(&[
        "invoke", &echo, "--memory", "128MiB", "--arg", "fresh", "--json",
    ]);
    let served = joined.elapsed();
    assert!(
        called.status.success(),
        "published after {published:?}; the call failed: {}",
        String::from_utf8_lossy(&called.stderr)
    );
    let result: serde_json::Value = serde_json::from_str(&stdout_text(&called)).unwrap();
    assert_eq!(result["execution"]["stdout"]["inline"], "fresh\n");
    assert_eq!(result["execution"]["memory_mib"], 128);
    assert!(result["exchanges"].as_u64().unwrap() >= 2, "{result}");
    // Every lender offers 1 GiB in one offer: the call ran on one of them.
    let volunteer = result["execution"]["volunteer"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        volunteers.iter().any(|v| v.peer_id == volunteer),
        "{volunteer}"
    );
    eprintln!(
        "volunteers joined; offers published after {published:?}, the call answered after {served:?}"
    );
    drop(scheduler);
}
