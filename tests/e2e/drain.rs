//! End-to-end tests of draining: an agent that is replaced (upgrade: hand-over of the listeners
//! to a new agent) or stopped (SIGTERM) loses no request of keep-alive clients.
//!
//! The load is what a user's services send: keep-alive HTTP/1.1 clients (8 x 50 requests per
//! second, `strait-http load`), an HTTP/2 prior-knowledge client (8 streams x 50 per second on
//! one connection), and a gRPC client (grpcio, 4 threads x 50 calls per second on one channel),
//! each against a virtual service whose listener speaks http, http2 or grpc. While the load
//! runs the agent is upgraded 10 times in a row with a 1 s drain timeout; every request that
//! did not get its answer counts, and none may fail. Each of the 11 agent generations must
//! have served some of the requests (its own request log says so), so the load really crossed
//! every upgrade. Across nodes, the same HTTP/1.1 load goes through the mTLS tunnel while the
//! destination node's agent is upgraded 10 times. On SIGTERM and when a pod leaves, an idle
//! keep-alive connection's next request is answered (with `Connection: close`).
//!
//! Needs root (and Python's grpcio for the gRPC test: `cargo xtask setup` installs it); without
//! them these tests fail with the reason.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::Value;
use testbed::agent::Agent;
use testbed::scenario::peer_node_args;
use testbed::{Node, Pod, PodSpec, Process, Testbed, run};

const COLOR: &str = "color.app.svc.cluster.local";
const COLOR_V4: &str = "10.96.0.30";
const COLOR_H2: &str = "color-h2.app.svc.cluster.local";
const COLOR_H2_V4: &str = "10.96.0.31";
const GRPC: &str = "grpc.app.svc.cluster.local";
const GRPC_V4: &str = "10.96.0.32";
const GRPC_PORT: u16 = 50051;
const HTTP_BIN: &str = env!("CARGO_BIN_EXE_strait-http");
const GRPC_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/grpc/color_grpc.py");

/// Consecutive upgrades under load.
const UPGRADES: usize = 10;
/// The agents' `--drain-timeout`, in seconds.
const DRAIN_SECONDS: u64 = 1;
/// How long each new agent serves on its own before the next upgrade.
const BETWEEN_UPGRADES: Duration = Duration::from_millis(700);
/// Requests per second per client worker.
const RATE: u32 = 50;

fn mesh_yaml() -> String {
    format!(
        r#"apiVersion: appmesh.k8s.aws/v1beta2
kind: Mesh
metadata: {{name: test}}
spec:
  egressFilter: {{type: DROP_ALL}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: client, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: client}}}}
  backends:
    - virtualService: {{virtualServiceRef: {{name: color}}}}
    - virtualService: {{virtualServiceRef: {{name: color-h2}}}}
    - virtualService: {{virtualServiceRef: {{name: grpc}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: color, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: color}}}}
  listeners:
    - portMapping: {{port: 8080, protocol: http}}
  serviceDiscovery: {{dns: {{hostname: server.app.svc.cluster.local, responseType: ENDPOINTS}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: color-h2, namespace: app}}
spec:
  listeners:
    - portMapping: {{port: 8080, protocol: http2}}
  serviceDiscovery: {{dns: {{hostname: server.app.svc.cluster.local, responseType: ENDPOINTS}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: grpc, namespace: app}}
spec:
  listeners:
    - portMapping: {{port: {GRPC_PORT}, protocol: grpc}}
  serviceDiscovery: {{dns: {{hostname: server.app.svc.cluster.local, responseType: ENDPOINTS}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {{name: color, namespace: app}}
spec:
  awsName: {COLOR}
  provider: {{virtualNode: {{virtualNodeRef: {{name: color}}}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {{name: color-h2, namespace: app}}
spec:
  awsName: {COLOR_H2}
  provider: {{virtualNode: {{virtualNodeRef: {{name: color-h2}}}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {{name: grpc, namespace: app}}
spec:
  awsName: {GRPC}
  provider: {{virtualNode: {{virtualNodeRef: {{name: grpc}}}}}}
"#
    )
}

struct Bed {
    tb: Testbed,
    node: Node,
    client: Pod,
    mesh: PathBuf,
    _servers: Vec<Process>,
}

/// One node: a client pod and a server pod (`strait-http` on 8080, HTTP/1.1 and HTTP/2; with
/// `grpc`, grpcio on 50051).
fn bed(test: &str, grpc: bool) -> anyhow::Result<Bed> {
    let python = grpc.then(testbed::python_with_grpcio).transpose()?;
    let tb = Testbed::new(test)?;
    let node = tb.add_node("node1")?;
    let client = node.add_pod(&PodSpec::new("client", "app").label("app", "client"))?;
    let server = node.add_pod(&PodSpec::new("server", "app").label("app", "color"))?;
    tb.dns_record(COLOR, &[COLOR_V4.parse()?])?;
    tb.dns_record(COLOR_H2, &[COLOR_H2_V4.parse()?])?;
    tb.dns_record(GRPC, &[GRPC_V4.parse()?])?;
    tb.dns_record("server.app.svc.cluster.local", &[server.ipv4().into()])?;
    let http = tb.spawn(
        "http-server",
        server.command(HTTP_BIN).args([
            "serve",
            "--listen",
            "0.0.0.0:8080,[::]:8080",
            "--name",
            "server",
        ]),
    )?;
    http.wait_listening(8080, Duration::from_secs(10))?;
    let mut servers = vec![http];
    if let Some(python) = python {
        let grpc = tb.spawn(
            "grpc-server",
            server.command(&python).args([
                GRPC_SCRIPT,
                "serve",
                "--port",
                &GRPC_PORT.to_string(),
                "--name",
                "server",
            ]),
        )?;
        grpc.wait_listening(GRPC_PORT, Duration::from_secs(20))?;
        servers.push(grpc);
    }
    for pod in [&client, &server] {
        node.write_workload(pod)?;
    }
    let mesh = tb.temp_dir().join("mesh.yaml");
    std::fs::write(&mesh, mesh_yaml())?;
    Ok(Bed {
        tb,
        node,
        client,
        mesh,
        _servers: servers,
    })
}

#[derive(Clone, Copy, Debug)]
enum Load {
    Http1,
    Http2,
    Grpc,
}

/// Starts the load in the client pod; it runs until `stop` exists (at most 180 s) and then
/// prints one JSON report with `completed` and `failed`.
fn start_load(bed: &Bed, load: Load, stop: &Path) -> anyhow::Result<Process> {
    let stop = stop.to_str().context("stop file path")?;
    let rate = RATE.to_string();
    let mut command = match load {
        Load::Http1 | Load::Http2 => {
            let mut command = bed.client.command(HTTP_BIN);
            let url = match load {
                Load::Http1 => format!("http://{COLOR}:8080/color"),
                _ => format!("http://{COLOR_H2}:8080/color"),
            };
            command.args([
                "load",
                &url,
                "--concurrency",
                "8",
                "--rate",
                &rate,
                "--duration-ms",
                "180000",
                "--timeout",
                "200",
                "--stop-file",
                stop,
            ]);
            if matches!(load, Load::Http2) {
                command.arg("--http2");
            }
            command
        }
        Load::Grpc => {
            let mut command = bed.client.command(testbed::python_with_grpcio()?);
            command.args([
                GRPC_SCRIPT,
                "load",
                "--target",
                &format!("{GRPC}:{GRPC_PORT}"),
                "--workers",
                "4",
                "--rate",
                &rate,
                "--duration",
                "180",
                "--stop-file",
                stop,
            ]);
            command
        }
    };
    bed.tb.spawn(&format!("load-{load:?}"), &mut command)
}

/// Requests an agent answered, by its own request log (`strait::request`).
fn served(agent: &Agent) -> usize {
    agent
        .log_lines()
        .iter()
        .filter(|line| line["target"] == "strait::request")
        .count()
}

fn drain_args() -> Vec<String> {
    vec!["--drain-timeout".into(), DRAIN_SECONDS.to_string()]
}

/// Runs `load`, upgrades the agent [`UPGRADES`] times under it, stops the load and checks that
/// no request failed and that every agent generation served requests.
fn upgrades_lose_no_request(test: &str, load: Load) -> anyhow::Result<()> {
    let bed = bed(test, matches!(load, Load::Grpc))?;
    let args = drain_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = Agent::start(&bed.tb, &bed.node, &bed.mesh, &args)?;
    agent.wait_enrolled("app/client", true, Duration::from_secs(10))?;
    let stop = bed.tb.temp_dir().join(format!("stop-{test}"));
    let client = start_load(&bed, load, &stop)?;
    let started = Instant::now();
    std::thread::sleep(BETWEEN_UPGRADES);
    let mut generations = Vec::new();
    for upgrade in 1..=UPGRADES {
        if let Some(status) = client.try_wait()? {
            bail!(
                "the load ended ({status}) before upgrade {upgrade}: {} {}",
                client.stdout(),
                client.stderr()
            );
        }
        let new = Agent::start(&bed.tb, &bed.node, &bed.mesh, &args)?;
        let status = agent
            .process
            .wait_timeout(Duration::from_secs(DRAIN_SECONDS + 10))
            .with_context(|| format!("upgrade {upgrade}: the old agent did not drain and exit"))?;
        assert!(
            status.success(),
            "upgrade {upgrade}: the old agent exits cleanly after draining: {status}"
        );
        assert!(
            agent
                .process
                .stderr()
                .contains("listeners handed over to a new agent"),
            "upgrade {upgrade}: the old agent handed its listeners over"
        );
        generations.push(agent);
        agent = new;
        std::thread::sleep(BETWEEN_UPGRADES);
    }
    std::fs::write(&stop, b"")?;
    client.wait_timeout(Duration::from_secs(30))?;
    let elapsed = started.elapsed();
    generations.push(agent);
    let report: Value = serde_json::from_str(client.stdout().trim()).with_context(|| {
        format!(
            "the load client printed no JSON report: stdout {:?}, stderr {:?}",
            client.stdout(),
            client.stderr()
        )
    })?;
    let by_generation: Vec<usize> = generations.iter().map(served).collect();
    eprintln!(
        "{load:?}: {UPGRADES} upgrades in {:.1} s, report {report}, requests served per agent generation {by_generation:?}",
        elapsed.as_secs_f64()
    );
    let completed = report["completed"].as_u64().context("completed")?;
    assert_eq!(
        report["failed"], 0,
        "{load:?}: no request may fail across {UPGRADES} upgrades: {report}"
    );
    assert!(completed > 0, "{report}");
    for (generation, count) in by_generation.iter().enumerate() {
        assert!(
            *count > 0,
            "{load:?}: agent generation {generation} served no request ({by_generation:?}): the load did not cross that upgrade"
        );
    }
    Ok(())
}

#[test]
fn http1_keep_alive_clients_lose_no_request_across_ten_upgrades() -> anyhow::Result<()> {
    upgrades_lose_no_request("drain-h1", Load::Http1)
}

#[test]
fn http2_clients_lose_no_request_across_ten_upgrades() -> anyhow::Result<()> {
    upgrades_lose_no_request("drain-h2", Load::Http2)
}

#[test]
fn grpc_clients_lose_no_request_across_ten_upgrades() -> anyhow::Result<()> {
    upgrades_lose_no_request("drain-grpc", Load::Grpc)
}

struct Curl {
    status: u16,
    headers: String,
}

/// curl in the pod, in the background (bounded by `--max-time`): response headers to a file.
fn spawn_curl(bed: &Bed, label: &str, args: &[&str]) -> anyhow::Result<(Process, PathBuf)> {
    let headers = bed.tb.temp_dir().join(format!("{label}.headers"));
    let process = bed.tb.spawn(
        label,
        bed.client
            .command("curl")
            .args(["--silent", "--show-error", "--max-time", "20"])
            .args(["--write-out", "%{http_code}", "--output", "/dev/null"])
            .arg("--dump-header")
            .arg(&headers)
            .args(args),
    )?;
    Ok((process, headers))
}

fn curl_result(process: &Process, headers: &Path) -> anyhow::Result<Curl> {
    process.wait_timeout(Duration::from_secs(30))?;
    let status = process.stdout().trim().parse().with_context(|| {
        format!(
            "curl printed no status: stdout {:?}, stderr {:?}",
            process.stdout(),
            process.stderr()
        )
    })?;
    Ok(Curl {
        status,
        headers: std::fs::read_to_string(headers)
            .unwrap_or_default()
            .to_ascii_lowercase(),
    })
}

#[test]
fn sigterm_finishes_requests_in_flight_and_closes_http1_connections_after_their_answer()
-> anyhow::Result<()> {
    let bed = bed("drain-sigterm", false)?;
    let agent = Agent::start(&bed.tb, &bed.node, &bed.mesh, &["--drain-timeout", "5"])?;
    agent.wait_enrolled("app/client", true, Duration::from_secs(10))?;
    // Sanity: the service answers at all.
    let output = run(
        bed.client
            .command("curl")
            .args([
                "--silent",
                "--max-time",
                "10",
                "--write-out",
                "%{http_code}",
            ])
            .args(["--output", "/dev/null"])
            .arg(format!("http://{COLOR}:8080/color")),
        Duration::from_secs(15),
    )?;
    assert_eq!(String::from_utf8_lossy(&output.stdout), "200");

    // Two requests that take 1.5 s each are in flight when the agent is told to stop.
    let (h1, h1_headers) = spawn_curl(
        &bed,
        "curl-h1",
        &[&format!("http://{COLOR}:8080/color?delay_ms=1500")],
    )?;
    let (h2, h2_headers) = spawn_curl(
        &bed,
        "curl-h2",
        &[
            "--http2-prior-knowledge",
            &format!("http://{COLOR_H2}:8080/color?delay_ms=1500"),
        ],
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let stopping = Instant::now();
    agent.process.signal(libc::SIGTERM)?;
    let h1 = curl_result(&h1, &h1_headers)?;
    let h2 = curl_result(&h2, &h2_headers)?;
    let status = agent.process.wait_timeout(Duration::from_secs(15))?;
    let took = stopping.elapsed();
    assert!(status.success(), "the agent drains and exits: {status}");
    assert_eq!(h1.status, 200, "HTTP/1.1 request in flight: {}", h1.headers);
    assert!(
        h1.headers.contains("connection: close"),
        "the answer to an HTTP/1.1 request during the drain says Connection: close: {}",
        h1.headers
    );
    assert_eq!(h2.status, 200, "HTTP/2 request in flight: {}", h2.headers);
    // Both ended well before the 5 s drain timeout: the agent exits as soon as nothing is in
    // flight.
    assert!(
        took < Duration::from_secs(4),
        "the agent exited {took:?} after SIGTERM; its connections had ended after ~1 s"
    );
    Ok(())
}

/// A keep-alive client (Python's http.client, which never re-sends a request) asks once, stays
/// idle while the agent gets SIGTERM, then asks again on the same connection.
const IDLE_CLIENT: &str = r#"
import http.client, json, os, sys, time
host, ready, go = sys.argv[1], sys.argv[2], sys.argv[3]
c = http.client.HTTPConnection(host, 8080, timeout=10)
c.request("GET", "/color")
first = c.getresponse()
first.read()
open(ready, "w").close()
deadline = time.monotonic() + 20
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.01)
try:
    c.request("GET", "/color")
    second = c.getresponse()
    second.read()
    out = {"first": first.status, "second": second.status, "connection": second.getheader("connection")}
except Exception as e:
    out = {"first": first.status, "second": None, "error": repr(e)}
print(json.dumps(out), flush=True)
"#;

/// Runs [`IDLE_CLIENT`]: one request, then `drain` while its connection is idle, then the next
/// request 300 ms later; returns the client's report.
fn next_request_on_an_idle_connection(
    bed: &Bed,
    drain: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<Value> {
    let ready = bed.tb.temp_dir().join("idle-ready");
    let go = bed.tb.temp_dir().join("idle-go");
    let client = bed.tb.spawn(
        "idle-client",
        bed.client
            .command("python3")
            .args(["-c", IDLE_CLIENT, COLOR])
            .arg(&ready)
            .arg(&go),
    )?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready.exists() {
        if Instant::now() >= deadline || client.try_wait()?.is_some() {
            bail!(
                "the client's first request did not complete: {} {}",
                client.stdout(),
                client.stderr()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The connection is idle now. The drain starts; the client asks again a moment later, as a
    // keep-alive client whose next request comes while the agent drains.
    drain()?;
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(&go, b"")?;
    client.wait_timeout(Duration::from_secs(30))?;
    let report: Value = serde_json::from_str(client.stdout().trim()).with_context(|| {
        format!(
            "the client printed no report: {} {}",
            client.stdout(),
            client.stderr()
        )
    })?;
    assert_eq!(report["first"], 200, "{report}");
    assert_eq!(
        report["second"], 200,
        "the next request on an idle keep-alive connection is answered during the drain: {report}"
    );
    assert_eq!(
        report["connection"], "close",
        "and the answer closes the connection: {report}"
    );
    Ok(report)
}

#[test]
fn sigterm_answers_the_next_request_on_an_idle_keep_alive_connection_then_closes_it()
-> anyhow::Result<()> {
    let bed = bed("drain-idle", false)?;
    let agent = Agent::start(&bed.tb, &bed.node, &bed.mesh, &["--drain-timeout", "5"])?;
    agent.wait_enrolled("app/client", true, Duration::from_secs(10))?;
    next_request_on_an_idle_connection(&bed, || agent.process.signal(libc::SIGTERM))?;
    // Its connection closed after the answer: nothing keeps the agent to the drain timeout.
    let status = agent.process.wait_timeout(Duration::from_secs(4))?;
    assert!(status.success(), "the agent drains and exits: {status}");
    Ok(())
}

#[test]
fn a_leaving_pod_s_idle_keep_alive_connection_gets_its_next_answer_then_closes()
-> anyhow::Result<()> {
    let bed = bed("drain-pod", false)?;
    let agent = Agent::start(&bed.tb, &bed.node, &bed.mesh, &["--drain-timeout", "5"])?;
    agent.wait_enrolled("app/client", true, Duration::from_secs(10))?;
    next_request_on_an_idle_connection(&bed, || {
        bed.node.remove_workload(&bed.client)?;
        agent.wait_enrolled("app/client", false, Duration::from_secs(10))
    })?;
    // The agent itself goes on serving the other pods.
    assert!(agent.process.try_wait()?.is_none(), "the agent still runs");
    Ok(())
}

/// The cross-node mesh: `color` on node2 takes only mTLS (STRICT), the client on node1 calls
/// it with its own certificate, so every request crosses the agents' tunnel.
fn tunnel_mesh_yaml(certs: &Path) -> String {
    let c = certs.display();
    format!(
        r#"apiVersion: appmesh.k8s.aws/v1beta2
kind: Mesh
metadata: {{name: test}}
spec: {{egressFilter: {{type: DROP_ALL}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: client, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: client}}}}
  backends:
    - virtualService: {{virtualServiceRef: {{name: color}}}}
  backendDefaults:
    clientPolicy:
      tls:
        enforce: true
        certificate: {{file: {{certificateChain: {c}/client.pem, privateKey: {c}/client-key.pem}}}}
        validation:
          trust: {{file: {{certificateChain: {c}/ca-bundle.pem}}}}
          subjectAlternativeNames: {{match: {{exact: [spiffe://test/ns/app/vn/color]}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: color, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: color}}}}
  listeners:
    - portMapping: {{port: 8080, protocol: http}}
      tls:
        mode: STRICT
        certificate: {{file: {{certificateChain: {c}/color.pem, privateKey: {c}/color-key.pem}}}}
        validation:
          trust: {{file: {{certificateChain: {c}/ca-bundle.pem}}}}
          subjectAlternativeNames: {{match: {{exact: [spiffe://test/ns/app/vn/client]}}}}
  serviceDiscovery: {{dns: {{hostname: server.app.svc.cluster.local, responseType: ENDPOINTS}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {{name: color, namespace: app}}
spec:
  awsName: {COLOR}
  provider: {{virtualNode: {{virtualNodeRef: {{name: color}}}}}}
"#
    )
}

/// `--peer-node` arguments naming `other`, and the drain timeout.
fn node_args(other: &Node) -> Vec<String> {
    let mut args = drain_args();
    args.extend(peer_node_args([other], true));
    args
}

fn strait_ok(node: &Node, args: &[&str]) -> anyhow::Result<()> {
    let output = testbed::agent::strait(node, args)?;
    if !output.status.success() {
        bail!(
            "strait {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

#[test]
fn http1_clients_on_another_node_lose_no_request_across_ten_upgrades_of_the_server_s_agent()
-> anyhow::Result<()> {
    let tb = Testbed::new("drain-tunnel")?;
    let node1 = tb.add_node("node1")?;
    let node2 = tb.add_node("node2")?;
    let client = node1.add_pod(&PodSpec::new("client", "app").label("app", "client"))?;
    let server = node2.add_pod(&PodSpec::new("server", "app").label("app", "color"))?;
    tb.dns_record(COLOR, &[COLOR_V4.parse()?])?;
    tb.dns_record("server.app.svc.cluster.local", &server.ips())?;
    let http = tb.spawn(
        "http-server",
        server.command(HTTP_BIN).args([
            "serve",
            "--listen",
            "0.0.0.0:8080,[::]:8080",
            "--name",
            "server",
        ]),
    )?;
    http.wait_listening(8080, Duration::from_secs(10))?;
    let certs = tb.temp_dir().join("certs");
    let ca = tb.temp_dir().join("ca");
    let mesh = tb.temp_dir().join("mesh.yaml");
    std::fs::write(&mesh, tunnel_mesh_yaml(&certs))?;
    let (ca_arg, mesh_arg) = (ca.display().to_string(), mesh.display().to_string());
    strait_ok(&node1, &["ca", "init", "--dir", &ca_arg])?;
    strait_ok(
        &node1,
        &["ca", "issue", "--mesh", &mesh_arg, "--ca-dir", &ca_arg],
    )?;
    node1.write_workload(&client)?;
    node2.write_workload(&server)?;
    let (args1, args2) = (node_args(&node2), node_args(&node1));
    let args1: Vec<&str> = args1.iter().map(String::as_str).collect();
    let args2: Vec<&str> = args2.iter().map(String::as_str).collect();
    let agent1 = Agent::start(&tb, &node1, &mesh, &args1)?;
    let mut agent2 = Agent::start(&tb, &node2, &mesh, &args2)?;
    agent1.wait_enrolled("app/client", true, Duration::from_secs(20))?;
    agent2.wait_enrolled("app/server", true, Duration::from_secs(20))?;

    let stop = tb.temp_dir().join("stop-tunnel");
    let stop_arg = stop.display().to_string();
    let rate = RATE.to_string();
    let load = tb.spawn(
        "load-tunnel",
        client.command(HTTP_BIN).args([
            "load",
            &format!("http://{COLOR}:8080/color"),
            "--concurrency",
            "8",
            "--rate",
            &rate,
            "--duration-ms",
            "180000",
            "--timeout",
            "200",
            "--stop-file",
            &stop_arg,
        ]),
    )?;
    std::thread::sleep(BETWEEN_UPGRADES);
    let mut generations = Vec::new();
    for upgrade in 1..=UPGRADES {
        if let Some(status) = load.try_wait()? {
            bail!(
                "the load ended ({status}) before upgrade {upgrade}: {} {}",
                load.stdout(),
                load.stderr()
            );
        }
        let new = Agent::start(&tb, &node2, &mesh, &args2)?;
        let status = agent2
            .process
            .wait_timeout(Duration::from_secs(DRAIN_SECONDS + 10))
            .with_context(|| format!("upgrade {upgrade}: the old agent did not drain and exit"))?;
        assert!(status.success(), "upgrade {upgrade}: {status}");
        generations.push(agent2);
        agent2 = new;
        std::thread::sleep(BETWEEN_UPGRADES);
    }
    std::fs::write(&stop, b"")?;
    load.wait_timeout(Duration::from_secs(30))?;
    generations.push(agent2);
    let report: Value = serde_json::from_str(load.stdout().trim()).with_context(|| {
        format!(
            "the load client printed no JSON report: stdout {:?}, stderr {:?}",
            load.stdout(),
            load.stderr()
        )
    })?;
    // Each generation of the server's agent took tunnels from the client's agent.
    let tunnels: Vec<usize> = generations
        .iter()
        .map(|agent| {
            agent
                .log_lines()
                .iter()
                .filter(|l| l["message"] == "mTLS tunnel accepted")
                .count()
        })
        .collect();
    eprintln!(
        "tunnel: {UPGRADES} upgrades of node2's agent, report {report}, tunnels accepted per generation {tunnels:?}"
    );
    let failures: Vec<String> = agent1
        .log_lines()
        .into_iter()
        .filter(|l| l["target"] == "strait::request" && l["status"].as_u64() != Some(200))
        .take(5)
        .map(|l| l.to_string())
        .collect();
    assert_eq!(
        report["failed"], 0,
        "no request may fail while the server's agent is upgraded: {report}; the client's agent logged {failures:#?}"
    );
    assert!(report["completed"].as_u64().unwrap_or(0) > 0, "{report}");
    for (generation, count) in tunnels.iter().enumerate() {
        assert!(
            *count > 0,
            "generation {generation} of node2's agent took no tunnel ({tunnels:?})"
        );
    }
    Ok(())
}
