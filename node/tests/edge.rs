//! The node's edges against hostile neighbours, on loopback with real nodes and processes:
//! the local API (a non-loopback address refused without `--api-allow-remote`, then a
//! token in a 0600 file required; on loopback, `Host` headers that do not name loopback
//! refused), plans that name files outside their directory, closed networks (a peer
//! without the key, or with another key, cannot connect; holders run calls), and a
//! volunteer that runs calls only for the schedulers it lists.
#![allow(clippy::unwrap_used)]

mod common;

use common::example;

use bytesize::ByteSize;
use flotilla_node::config::NodeConfig;
use flotilla_node::daemon::{self, RunningNode};
use flotilla_node::demo;
use flotilla_node::market::function::FunctionCall;
use flotilla_node::market::protocol::{self, ExecuteRequest, Request, Response};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, Swarm};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends one raw HTTP/1.1 GET with these extra header lines; the status code.
async fn http_status(addr: SocketAddr, path: &str, headers: &[String]) -> u16 {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request = format!("GET {path} HTTP/1.1\r\nConnection: close\r\n");
    for h in headers {
        request.push_str(h);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&answer);
    text.split(' ').nth(1).unwrap().parse().unwrap()
}

fn flotilla() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flotilla"));
    cmd.env_remove("FLOTILLA_API")
        .env_remove("FLOTILLA_API_TOKEN_FILE")
        .env_remove("RUST_LOG");
    cmd
}

async fn run(mut cmd: Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

fn single(dir: &Path) -> NodeConfig {
    demo::loopback_config(dir, Vec::new())
}

#[tokio::test]
async fn a_second_node_on_a_data_dir_in_use_is_refused_naming_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let first = daemon::start(single(dir.path())).await.unwrap();
    let identity = std::fs::read_dir(dir.path()).unwrap().count();
    let refused = daemon::start(single(dir.path()))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        refused.contains("in use") && refused.contains(&format!("PID {}", std::process::id())),
        "{refused}"
    );
    // The refused node touched nothing: the first keeps serving its API.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), identity);
    flotilla_node::api::client::ApiClient::new(first.api_addr())
        .status()
        .await
        .unwrap();
    first.stop().await;
    let again = daemon::start(single(dir.path())).await.unwrap();
    again.stop().await;
}

#[tokio::test]
async fn a_remote_api_address_is_refused_without_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    for api in ["0.0.0.0:0", "[::]:0"] {
        let config = NodeConfig {
            api: api.parse().unwrap(),
            ..single(dir.path())
        };
        let refused = daemon::start(config).await.err().unwrap().to_string();
        assert!(refused.contains("--api-allow-remote"), "{refused}");
    }
    // The flag lets it through (and then a token is needed: the next test).
    let config = NodeConfig {
        api: "0.0.0.0:0".parse().unwrap(),
        api_allow_remote: true,
        ..single(dir.path())
    };
    let node = daemon::start(config).await.unwrap();
    node.stop().await;
}

#[tokio::test]
async fn a_remote_api_needs_the_token_from_its_0600_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = NodeConfig {
        api_allow_remote: true,
        ..single(dir.path())
    };
    let node = daemon::start(config).await.unwrap();
    let addr = node.api_addr();
    let path = dir.path().join("api.token");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the token file is its owner's only");
    }
    let token = std::fs::read_to_string(&path).unwrap();
    assert_eq!(token.len(), 64);
    let host = format!("Host: {addr}");
    let wrong: String = token
        .chars()
        .map(|c| if c == '0' { '1' } else { '0' })
        .collect();
    assert_eq!(
        http_status(addr, "/v0/status", std::slice::from_ref(&host)).await,
        401
    );
    for bad in [
        format!("Authorization: Bearer {wrong}"),
        format!("Authorization: Bearer {}", &token[..63]),
        format!("Authorization: Basic {token}"),
        "Authorization: Bearer ".to_string(),
    ] {
        assert_eq!(
            http_status(addr, "/v0/status", &[host.clone(), bad.clone()]).await,
            401,
            "{bad}"
        );
    }
    let good = format!("Authorization: Bearer {token}");
    assert_eq!(
        http_status(addr, "/v0/status", &[host.clone(), good.clone()]).await,
        200
    );
    // Any host name is fine with the token (others reach the node by their own name).
    let lan = "Host: node.lan:4180".to_string();
    assert_eq!(http_status(addr, "/v0/status", &[lan, good]).await, 200);
    // The CLI reads the token by itself; without it, it is refused.
    let mut status = flotilla();
    status
        .env("FLOTILLA_DATA", dir.path())
        .args(["status", "--api", &addr.to_string()]);
    let out = run(status).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let elsewhere = tempfile::tempdir().unwrap();
    let mut status = flotilla();
    status
        .env("FLOTILLA_DATA", elsewhere.path())
        .args(["status", "--api", &addr.to_string()]);
    let out = run(status).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("token"));
    node.stop().await;
}

#[tokio::test]
async fn a_loopback_api_answers_only_loopback_host_names() {
    let dir = tempfile::tempdir().unwrap();
    let node = daemon::start(single(dir.path())).await.unwrap();
    let addr = node.api_addr();
    let port = addr.port();
    for host in [
        format!("10.1.2.3:{port}"),
        "10.1.2.3".into(),
        "192.168.0.7".into(),
        "[fe80::1]".into(),
        "0.0.0.0".into(),
        format!("evil.example:{port}"),
        "localhost.evil.example".into(),
    ] {
        assert_eq!(
            http_status(addr, "/v0/status", &[format!("Host: {host}")]).await,
            403,
            "{host}"
        );
    }
    for host in [
        format!("127.0.0.1:{port}"),
        "127.0.0.1".into(),
        "127.5.6.7".into(),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
    ] {
        assert_eq!(
            http_status(addr, "/v0/status", &[format!("Host: {host}")]).await,
            200,
            "{host}"
        );
    }
    // Web pages stay refused.
    let page = [
        format!("Host: 127.0.0.1:{port}"),
        "Origin: http://evil.example".into(),
    ];
    assert_eq!(http_status(addr, "/v0/status", &page).await, 403);
    node.stop().await;
}

/// Runs `flotilla run PLAN` (with `flags`) against an address where no node answers:
/// the paths are checked before the node is asked anything. Its stderr.
async fn run_plan(plan: &Path, flags: &[&str]) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nobody = listener.local_addr().unwrap();
    drop(listener);
    let mut cmd = flotilla();
    cmd.arg("run")
        .arg(plan)
        .args(flags)
        .args(["--api", &nobody.to_string()]);
    let out = run(cmd).await;
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn plans_cannot_name_files_outside_their_directory() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("plan");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("m.wasm"), b"\0asm").unwrap();
    let secret = root.path().join("secret.txt");
    std::fs::write(&secret, "secret").unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(&secret, dir.join("link.txt")).unwrap();
    let mut escapes = vec![
        ("dotdot", "../secret.txt".to_string()),
        ("absolute", secret.display().to_string()),
    ];
    if cfg!(unix) {
        escapes.push(("symlink", "link.txt".into()));
    }
    for (what, file) in escapes {
        let plan = dir.join(format!("{what}.toml"));
        std::fs::write(
            &plan,
            format!(
                "[jobs.a]\nmodule = {{ file = \"m.wasm\" }}\ninputs = {{ \"x\" = {{ file = {file:?} }} }}\n"
            ),
        )
        .unwrap();
        let refused = run_plan(&plan, &[]).await;
        assert!(
            refused.contains("outside the plan's directory") && refused.lines().count() == 1,
            "{what}: {refused}"
        );
        // With the flag, the plan goes on to the node (which is not there).
        let allowed = run_plan(&plan, &["--allow-paths-outside"]).await;
        assert!(
            !allowed.contains("outside") && allowed.contains("no Flotilla node"),
            "{what}: {allowed}"
        );
    }
    // Files inside pass the check.
    let plan = dir.join("inside.toml");
    std::fs::write(&plan, "[jobs.a]\nmodule = { file = \"./m.wasm\" }\n").unwrap();
    assert!(run_plan(&plan, &[]).await.contains("no Flotilla node"));
}

fn echo_call(module: String) -> FunctionCall {
    FunctionCall {
        module,
        memory_mib: 128,
        timeout_ms: Some(20_000),
        args: vec!["hello".into()],
        env: Vec::new(),
        stdin: None,
        inputs: Vec::new(),
    }
}

/// Starts a scheduler (0), a volunteer (1) and a client (2), each config adjusted by
/// `adjust`, and waits until the volunteer's offer is on the scheduler's list.
async fn market_network(
    dir: &Path,
    adjust: impl Fn(usize, NodeConfig) -> NodeConfig,
) -> Vec<RunningNode> {
    let nodes = demo::start_network_with(dir, 3, |i, config| {
        let config = NodeConfig {
            notify_interval: Duration::from_millis(300),
            answer_timeout: Duration::from_secs(1),
            fetch_timeout: Duration::from_secs(3),
            ..config
        };
        let config = match i {
            0 => NodeConfig {
                scheduler: true,
                ..config
            },
            1 => NodeConfig {
                offer_memory: Some(ByteSize::mib(512)),
                ..config
            },
            _ => config,
        };
        adjust(i, config)
    })
    .await
    .unwrap();
    common::wait_until("the volunteer's offer reaches the scheduler", || async {
        nodes[0].market().offers().await.super_traders == 1
    })
    .await;
    nodes
}

async fn echo_runs(client: &RunningNode) {
    let module = client
        .overlay()
        .add(&example("echo")[..])
        .await
        .unwrap()
        .cid;
    let invocation = client
        .market()
        .invoke(echo_call(module), None, None)
        .await
        .unwrap();
    assert_eq!(invocation.execution.exit_code, 0);
    assert_eq!(invocation.execution.stdout.inline, b"hello\n");
}

/// Dials `addr` from a bare libp2p peer with `key` (or none); whether it connected.
async fn bare_peer_connects(addr: Multiaddr, key: Option<libp2p::pnet::PreSharedKey>) -> bool {
    let mut swarm: Swarm<libp2p::swarm::dummy::Behaviour> =
        libp2p::SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_other_transport(|k| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
                Ok(flotilla_overlay::closed::transport(
                    k,
                    key,
                    libp2p::yamux::Config::default(),
                )?)
            })
            .unwrap()
            .with_behaviour(|_| libp2p::swarm::dummy::Behaviour)
            .unwrap()
            .build();
    swarm.dial(addr).unwrap();
    tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match futures::StreamExt::select_next_some(&mut swarm).await {
                SwarmEvent::ConnectionEstablished { .. } => return true,
                SwarmEvent::OutgoingConnectionError { .. } => return false,
                _ => {}
            }
        }
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_network_admits_only_holders_of_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("swarm.key");
    let mut make = flotilla();
    make.args(["network-key", "new"]).arg(&key_file);
    let out = run(make).await;
    assert!(out.status.success());
    // Never overwritten by accident.
    let mut again = flotilla();
    again.args(["network-key", "new"]).arg(&key_file);
    assert!(!run(again).await.status.success());
    let key = flotilla_overlay::closed::read_key(&key_file).unwrap();
    let nodes = market_network(dir.path(), |_, config| NodeConfig {
        network_key: Some(key_file.clone()),
        listen: vec![
            "/ip4/127.0.0.1/tcp/0".parse().unwrap(),
            "/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap(),
        ],
        ..config
    })
    .await;
    // QUIC is off on a closed network.
    assert!(
        nodes[0]
            .listen_addrs()
            .iter()
            .all(|a| !a.to_string().contains("quic"))
    );
    echo_runs(&nodes[2]).await;
    let addr = nodes[0].bootstrap_addr();
    assert!(!bare_peer_connects(addr.clone(), None).await, "no key");
    let other = libp2p::pnet::PreSharedKey::new([7; 32]);
    assert!(
        !bare_peer_connects(addr.clone(), Some(other)).await,
        "wrong key"
    );
    assert!(bare_peer_connects(addr, Some(key)).await, "the key");
    for node in nodes {
        node.stop().await;
    }
}

async fn ask(from: &RunningNode, to: &RunningNode, id: u64, request: Request) -> Response {
    let answer = from
        .overlay()
        .network()
        .request(
            request.concern(),
            to.peer_id(),
            to.listen_addrs().to_vec(),
            protocol::encode_request(id, request),
        )
        .await
        .unwrap();
    protocol::decode_response(&answer, id).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volunteer_runs_calls_only_for_the_schedulers_it_lists() {
    let dir = tempfile::tempdir().unwrap();
    let scheduler = flotilla_node::identity::load_or_create(&dir.path().join("node-0"))
        .unwrap()
        .public()
        .to_peer_id();
    let nodes = market_network(dir.path(), |i, config| match i {
        1 => NodeConfig {
            schedulers: vec![scheduler],
            ..config
        },
        _ => config,
    })
    .await;
    assert_eq!(nodes[0].peer_id(), scheduler);
    let offer_id = nodes[1].market().offers().await.sent[0].offer_id;
    // The client (not listed) asks the volunteer itself: refused.
    let reserve = Request::Reserve {
        reservation_id: 5,
        offer_id,
        mib: 128,
        hold_ms: 10_000,
    };
    let refused = ask(&nodes[2], &nodes[1], 1, reserve).await;
    assert!(
        matches!(&refused, Response::Refused { reason } if reason.contains("schedulers it lists")),
        "{refused:?}"
    );
    let module = nodes[2]
        .overlay()
        .add(&example("echo")[..])
        .await
        .unwrap()
        .cid;
    let execute = Request::Execute(Box::new(ExecuteRequest {
        invocation_id: 9,
        reservation_id: 6,
        offer_id: Some(offer_id),
        call: echo_call(module),
    }));
    let refused = ask(&nodes[2], &nodes[1], 2, execute).await;
    assert!(
        matches!(&refused, Response::Refused { reason } if reason.contains("schedulers it lists")),
        "{refused:?}"
    );
    assert!(nodes[1].market().offers().await.reservations.is_empty());
    // Through the listed scheduler, the call runs.
    echo_runs(&nodes[2]).await;
    for node in nodes {
        node.stop().await;
    }
}
