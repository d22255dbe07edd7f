//! End-to-end tests of the destination-side limits (docs/resilience.md): listeners'
//! `connectionPool` and `rateLimit`, applied by the agent that delivers to the local pod. A
//! real agent on a testbed node, client pods calling virtual services with curl, Python
//! sockets and grpcio, real servers (`strait-http`, `strait-peer`, grpcio). What is checked
//! is what a user would see: status codes, `retry-after`, how long a queued request waited,
//! a refused TCP connection, gRPC status codes, and the agent's metrics and access log.
//!
//! Needs root (and Python's grpcio for the gRPC test: `cargo xtask setup` installs it);
//! without them these tests fail with the reason.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::Value;
use testbed::agent::{Agent, peer_binary};
use testbed::scenario::peer_node_args;
use testbed::{Node, Pod, PodSpec, Process, Testbed, run};

const HTTP_BIN: &str = env!("CARGO_BIN_EXE_strait-http");
const GRPC_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/grpc/color_grpc.py");
const GRPC_PORT: u16 = 50051;
const TCP_PORT: u16 = 9000;

/// A server virtual node of these tests: its name (also its pod's `app` label and service
/// name), its listener and its limits.
struct Server {
    name: &'static str,
    address: &'static str,
    listener: &'static str,
    port: u16,
    limits: &'static str,
    /// The callers' `clientPolicy.circuitBreaker` for this backend, if any.
    breaker: &'static str,
}

const SLOW: Server = Server {
    name: "slow",
    address: "10.96.1.1",
    listener: "http",
    port: 8080,
    limits: "connectionPool: {http: {maxConnections: 2, maxPendingRequests: 1}}",
    breaker: "",
};
const H2: Server = Server {
    name: "h2",
    address: "10.96.1.2",
    listener: "http2",
    port: 8080,
    limits: "connectionPool: {http2: {maxRequests: 1}}",
    breaker: "",
};
const BURST: Server = Server {
    name: "burst",
    address: "10.96.1.3",
    listener: "http",
    port: 8080,
    limits: "rateLimit: {requestsPerSecond: 10, burst: 10}",
    breaker: "",
};
const SHADOW: Server = Server {
    name: "shadow",
    address: "10.96.1.4",
    listener: "http",
    port: 8080,
    limits: "rateLimit: {requestsPerSecond: 10, burst: 10, shadow: true}",
    breaker: "",
};
const FAIR: Server = Server {
    name: "fair",
    address: "10.96.1.5",
    listener: "http",
    port: 8080,
    limits: "rateLimit: {perCaller: {requestsPerSecond: 1, burst: 3}, overrides: [{callers: [{virtualNodeRef: {name: vip}}], requestsPerSecond: 1, burst: 6}]}",
    breaker: "",
};
const TCP: Server = Server {
    name: "tcp",
    address: "10.96.1.6",
    listener: "tcp",
    port: TCP_PORT,
    limits: "connectionPool: {tcp: {maxConnections: 1}}",
    breaker: "",
};
const GRPC: Server = Server {
    name: "grpc",
    address: "10.96.1.7",
    listener: "grpc",
    port: GRPC_PORT,
    limits: "rateLimit: {requestsPerSecond: 1, burst: 2}",
    breaker: "",
};
const TCP_RATE: Server = Server {
    name: "tcp-rate",
    address: "10.96.1.11",
    listener: "tcp",
    port: TCP_PORT,
    limits: "rateLimit: {requestsPerSecond: 1, burst: 2}",
    breaker: "",
};
const GUARDED: Server = Server {
    name: "guarded",
    address: "10.96.1.8",
    listener: "http",
    port: 8080,
    limits: "",
    breaker: "{maxConnections: 2, maxPendingRequests: 1}",
};
const GUARDED_REQUESTS: Server = Server {
    name: "guarded-requests",
    address: "10.96.1.9",
    listener: "http2",
    port: 8080,
    limits: "",
    breaker: "{maxRequests: 1}",
};
const GUARDED_TCP: Server = Server {
    name: "guarded-tcp",
    address: "10.96.1.10",
    listener: "tcp",
    port: TCP_PORT,
    limits: "",
    breaker: "{maxConnections: 1}",
};
const IDLE: Server = Server {
    name: "idle",
    address: "10.96.1.12",
    listener: "tcp",
    port: TCP_PORT,
    limits: "timeout: {tcp: {idle: {unit: ms, value: 1500}}}",
    breaker: "",
};
const SERVERS: [&Server; 12] = [
    &IDLE,
    &TCP_RATE,
    &SLOW,
    &H2,
    &BURST,
    &SHADOW,
    &FAIR,
    &TCP,
    &GRPC,
    &GUARDED,
    &GUARDED_REQUESTS,
    &GUARDED_TCP,
];

/// The calling virtual nodes: `client-a` (with an access log), `client-b`, `vip`.
const CLIENTS: [&str; 3] = ["client-a", "client-b", "vip"];

fn host(server: &Server) -> String {
    format!("{}.app.svc.cluster.local", server.name)
}

fn mesh_yaml(access_log: &std::path::Path) -> String {
    let mut yaml = String::from(
        "apiVersion: appmesh.k8s.aws/v1beta2\nkind: Mesh\nmetadata: {name: test}\nspec: {egressFilter: {type: DROP_ALL}}\n",
    );
    let backends: String = SERVERS
        .iter()
        .map(|s| {
            let policy = if s.breaker.is_empty() {
                String::new()
            } else {
                format!(", clientPolicy: {{circuitBreaker: {}}}", s.breaker)
            };
            format!(
                "    - virtualService: {{virtualServiceRef: {{name: {}}}{policy}}}\n",
                s.name
            )
        })
        .collect();
    for client in CLIENTS {
        let logging = if client == "client-a" {
            format!(
                r#"  logging:
    accessLog:
      file:
        path: {}
        format:
          json:
            - {{key: path, value: "%REQ(:PATH)%"}}
            - {{key: code, value: "%RESPONSE_CODE%"}}
            - {{key: flags, value: "%RESPONSE_FLAGS%"}}
"#,
                access_log.display()
            )
        } else {
            String::new()
        };
        yaml.push_str(&format!(
            "---\napiVersion: appmesh.k8s.aws/v1beta2\nkind: VirtualNode\nmetadata: {{name: {client}, namespace: app}}\nspec:\n  podSelector: {{matchLabels: {{app: {client}}}}}\n  backends:\n{backends}{logging}"
        ));
    }
    for s in SERVERS {
        yaml.push_str(&format!(
            r#"---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: {name}, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: {name}}}}}
  listeners:
    - portMapping: {{port: {port}, protocol: {listener}}}
      {limits}
  serviceDiscovery: {{dns: {{hostname: {name}-pods.app.svc.cluster.local, responseType: ENDPOINTS}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {{name: {name}, namespace: app}}
spec:
  awsName: {host}
  provider: {{virtualNode: {{virtualNodeRef: {{name: {name}}}}}}}
"#,
            name = s.name,
            port = s.port,
            listener = s.listener,
            limits = s.limits,
            host = host(s),
        ));
    }
    yaml
}

/// Dropped in this order: the agent, the servers, then the pods, node and testbed.
struct Bed {
    agent: Agent,
    _servers: Vec<Process>,
    clients: Vec<Pod>,
    access_log: PathBuf,
    _node: Node,
    _tb: Testbed,
}

impl Bed {
    fn client(&self, name: &str) -> &Pod {
        self.clients
            .iter()
            .find(|p| p.name() == name)
            .expect("BUG: no such client pod")
    }
}

/// Four unary gRPC calls in a row from `client` (the gRPC client script under a Python with
/// grpcio) to `target`: the first two answered by the `service` server, the last two
/// RESOURCE_EXHAUSTED (a limit of burst 2 at 1 per second).
fn four_calls_two_exhausted(
    mut client: std::process::Command,
    target: &str,
    service: &str,
) -> anyhow::Result<()> {
    let output = run(
        client.args([GRPC_SCRIPT, "call", "--target", target, "--unary", "4"]),
        Duration::from_secs(60),
    )?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: Value = serde_json::from_str(stdout.trim()).with_context(|| {
        format!(
            "the gRPC client printed no JSON: {stdout:?}, stderr {:?}",
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    assert_eq!(report["unary"][service], 2, "{report}");
    let errors: Vec<&str> = report["errors"]
        .as_array()
        .map(|e| e.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert_eq!(errors.len(), 2, "{report}");
    assert!(
        errors.iter().all(|e| e.starts_with("RESOURCE_EXHAUSTED")),
        "{report}"
    );
    Ok(())
}

/// One node: the given client pods and server pods, each server running its real server, and
/// an agent with the mesh of these tests.
fn bed(test: &str, clients: &[&str], servers: &[&Server]) -> anyhow::Result<Bed> {
    let python = if servers.iter().any(|s| s.listener == "grpc") {
        Some(testbed::python_with_grpcio()?)
    } else {
        None
    };
    let tb = Testbed::new(test)?;
    let node = tb.add_node("node1")?;
    let mut client_pods = Vec::new();
    for name in clients {
        client_pods.push(node.add_pod(&PodSpec::new(name, "app").label("app", name))?);
    }
    let mut processes = Vec::new();
    let mut server_pods = Vec::new();
    for s in servers {
        let pod = node.add_pod(&PodSpec::new(s.name, "app").label("app", s.name))?;
        tb.dns_record(&host(s), &[s.address.parse()?])?;
        tb.dns_record(
            &format!("{}-pods.app.svc.cluster.local", s.name),
            &pod.ips(),
        )?;
        let listen = format!("0.0.0.0:{p},[::]:{p}", p = s.port);
        let process = match s.listener {
            "tcp" => tb.spawn(
                &format!("server-{}", s.name),
                pod.command(peer_binary()?)
                    .args(["serve", "--listen", &listen, "--name", s.name]),
            )?,
            "grpc" => tb.spawn(
                &format!("server-{}", s.name),
                pod.command(python.as_deref().unwrap_or("python3")).args([
                    GRPC_SCRIPT,
                    "serve",
                    "--port",
                    &s.port.to_string(),
                    "--name",
                    s.name,
                ]),
            )?,
            _ => tb.spawn(
                &format!("server-{}", s.name),
                pod.command(HTTP_BIN)
                    .args(["serve", "--listen", &listen, "--name", s.name]),
            )?,
        };
        process.wait_listening(s.port, Duration::from_secs(20))?;
        processes.push(process);
        server_pods.push(pod);
    }
    for pod in client_pods.iter().chain(&server_pods) {
        node.write_workload(pod)?;
    }
    let access_log = tb.temp_dir().join("client-a-access.log");
    let mesh = tb.temp_dir().join("mesh.yaml");
    std::fs::write(&mesh, mesh_yaml(&access_log))?;
    let logs = tb.temp_dir().display().to_string();
    let agent = Agent::start(&tb, &node, &mesh, &["--access-log-dir", &logs])?;
    for pod in client_pods.iter().chain(&server_pods) {
        agent.wait_enrolled(
            &format!("app/{}", pod.name()),
            true,
            Duration::from_secs(20),
        )?;
    }
    Ok(Bed {
        agent,
        _servers: processes,
        clients: client_pods,
        access_log,
        _node: node,
        _tb: tb,
    })
}

/// What curl saw of one request.
#[derive(Debug)]
struct Reply {
    status: u16,
    seconds: f64,
    retry_after: String,
    overloaded: String,
}

/// curl in the pod, one line per URL (`--parallel` if asked); the status and headers of
/// interest are written by `--write-out`.
fn curl(pod: &Pod, args: &[&str], urls: &[String]) -> anyhow::Result<Vec<Reply>> {
    let output = run(
        pod.command("curl")
            .args(["--silent", "--show-error", "--max-time", "30"])
            .args([
                "--write-out",
                "%{http_code} %{time_total} [%header{retry-after}] [%header{x-envoy-overloaded}]\\n",
            ])
            .args(args)
            // `--output` applies to one URL each.
            .args(urls.iter().flat_map(|u| ["--output", "/dev/null", u.as_str()])),
        Duration::from_secs(40),
    )?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let replies: Option<Vec<Reply>> = stdout
        .lines()
        .map(|line| {
            let mut f = line.split_whitespace();
            Some(Reply {
                status: f.next()?.parse().ok()?,
                seconds: f.next()?.parse().ok()?,
                retry_after: f.next()?.trim_matches(['[', ']']).to_owned(),
                overloaded: f.next()?.trim_matches(['[', ']']).to_owned(),
            })
        })
        .collect();
    match replies {
        Some(r) if r.len() == urls.len() => Ok(r),
        _ => bail!(
            "curl {args:?} {urls:?}: unexpected output {stdout:?}, stderr {:?}",
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}

fn statuses(replies: &[Reply], status: u16) -> usize {
    replies.iter().filter(|r| r.status == status).count()
}

/// The sum of the samples of a metric whose labels include every `labels` fragment.
fn metric(agent: &Agent, name: &str, labels: &[&str]) -> anyhow::Result<f64> {
    let text = agent.admin_get("/metrics")?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// The access log's lines, once there are at least `want` (bounded wait).
fn access_log_lines(path: &std::path::Path, want: usize) -> anyhow::Result<Vec<Value>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines: Vec<Value> = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()
            .context("an access log line is not JSON")?;
        if lines.len() >= want || Instant::now() >= deadline {
            return Ok(lines);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_full_connection_pool_queues_up_to_max_pending_and_refuses_the_rest_with_503()
-> anyhow::Result<()> {
    let bed = bed("resilience-pool", &["client-a"], &[&SLOW, &H2])?;
    let client = bed.client("client-a");
    // http: maxConnections 2, maxPendingRequests 1.
    three_slow_then_one(client, &SLOW)?;
    assert_eq!(
        metric(
            &bed.agent,
            "strait_overflows_total",
            &[
                r#"virtual_node="app/slow""#,
                r#"reason="max_pending_requests""#,
                r#"source_virtual_node="app/client-a""#
            ]
        )?,
        1.0
    );
    // The caller's access log says why: UO (upstream overflow).
    let lines = access_log_lines(&bed.access_log, 4)?;
    let refused: Vec<&Value> = lines.iter().filter(|l| l["path"] == "/fast").collect();
    assert_eq!(refused.len(), 1, "{lines:?}");
    assert_eq!(refused[0]["code"], 503, "{lines:?}");
    assert_eq!(refused[0]["flags"], "UO", "{lines:?}");

    // A WebSocket and a 1 MB body each way pass through the limited listener.
    let base = format!("http://{}:8080", host(&SLOW));
    for args in [
        ["ws", &format!("{base}/ws"), "--messages", "20"],
        ["stream", &format!("{base}/echo"), "--bytes", "1000000"],
    ] {
        let output = run(client.command(HTTP_BIN).args(args), Duration::from_secs(60))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let report: Value = serde_json::from_str(stdout.trim())
            .with_context(|| format!("strait-http {args:?} printed no JSON report: {stdout:?}"))?;
        assert_eq!(report["ok"], true, "{args:?}: {report}");
    }

    // http2: maxRequests 1. One slow request in flight, the next is refused at once.
    one_slow_then_one(client, &H2, &["--http2-prior-knowledge"])?;
    assert_eq!(
        metric(
            &bed.agent,
            "strait_overflows_total",
            &[r#"virtual_node="app/h2""#, r#"reason="max_requests""#]
        )?,
        1.0
    );
    assert!(
        !bed.agent.process.stderr().contains("panicked"),
        "{}",
        bed.agent.process.stderr()
    );
    Ok(())
}

/// With two connections and one pending request allowed: three requests answered in 3 s, then
/// a fourth. The first two are served at once, the third waits for a connection, the fourth is
/// refused at once with 503 `x-envoy-overloaded`.
fn three_slow_then_one(client: &Pod, server: &Server) -> anyhow::Result<()> {
    let slow = |n: u32| format!("http://{}:8080/slow{n}?delay_ms=3000", host(server));
    let (background, fourth) = std::thread::scope(|scope| {
        let background: Vec<_> = (1..=3)
            .map(|n| {
                let url = slow(n);
                let handle = scope.spawn(move || curl(client, &[], &[url]));
                // In this order: the third is the one that waits.
                std::thread::sleep(Duration::from_millis(300));
                handle
            })
            .collect();
        std::thread::sleep(Duration::from_millis(700));
        let fourth = curl(client, &[], &[format!("http://{}:8080/fast", host(server))]);
        let background: Vec<_> = background
            .into_iter()
            .map(|h| h.join().expect("curl thread panicked"))
            .collect();
        (background, fourth)
    });
    let fourth = &fourth?[0];
    assert_eq!(fourth.status, 503, "{fourth:?}");
    assert_eq!(fourth.overloaded, "true", "{fourth:?}");
    assert!(
        fourth.seconds < 1.0,
        "refused at once, not queued: {fourth:?}"
    );
    let background: Vec<Reply> = background
        .into_iter()
        .map(|r| r.map(|mut v| v.remove(0)))
        .collect::<anyhow::Result<_>>()?;
    for reply in &background {
        assert_eq!(reply.status, 200, "{background:?}");
    }
    // Served at once: about the server's 3 s. Queued: about 6 s, after a connection freed up.
    assert!(background[0].seconds < 5.0, "{background:?}");
    assert!(background[1].seconds < 5.0, "{background:?}");
    assert!(
        background[2].seconds >= 5.0,
        "the third request waited for a connection: {background:?}"
    );
    Ok(())
}

/// With one request allowed in flight: a second while one is slow is refused at once with 503
/// `x-envoy-overloaded`; once the first is done, the next is served.
fn one_slow_then_one(client: &Pod, server: &Server, args: &[&str]) -> anyhow::Result<()> {
    let base = format!("http://{}:8080", host(server));
    let (first, second) = std::thread::scope(|scope| {
        let url = format!("{base}/slow?delay_ms=2000");
        let first = scope.spawn(move || curl(client, args, &[url]));
        std::thread::sleep(Duration::from_millis(700));
        let second = curl(client, args, &[format!("{base}/fast")]);
        (first.join().expect("curl thread panicked"), second)
    });
    let (first, second) = (&first?[0], &second?[0]);
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(second.status, 503, "{second:?}");
    assert_eq!(second.overloaded, "true", "{second:?}");
    assert!(second.seconds < 1.0, "refused at once: {second:?}");
    let after = curl(client, args, &[format!("{base}/fast")])?;
    assert_eq!(after[0].status, 200, "{after:?}");
    Ok(())
}

/// Runs [`TCP_PROBE`] from `client` against `host`; returns what each connection got.
fn tcp_probe(client: &Pod, host: &str) -> anyhow::Result<Value> {
    let output = run(
        client
            .command("python3")
            .args(["-c", TCP_PROBE, host, &TCP_PORT.to_string()]),
        Duration::from_secs(60),
    )?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.trim()).with_context(|| {
        format!(
            "the probe printed no JSON: {stdout:?}, stderr {:?}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

#[test]
fn client_circuit_breakers_queue_refuse_with_503_and_close_tcp_connections() -> anyhow::Result<()> {
    let bed = bed(
        "resilience-breaker",
        &["client-a"],
        &[&GUARDED, &GUARDED_REQUESTS, &GUARDED_TCP],
    )?;
    let client = bed.client("client-a");
    let overflows = |target: &str, reason: &str| {
        metric(
            &bed.agent,
            "strait_circuit_breaker_overflows_total",
            &[
                r#"source_virtual_node="app/client-a""#,
                &format!(r#"target_virtual_node="app/{target}""#),
                &format!(r#"reason="{reason}""#),
            ],
        )
    };
    // maxConnections 2, maxPendingRequests 1, on the caller's side.
    three_slow_then_one(client, &GUARDED)?;
    assert_eq!(overflows("guarded", "max_pending_requests")?, 1.0);
    let lines = access_log_lines(&bed.access_log, 4)?;
    let refused: Vec<&Value> = lines.iter().filter(|l| l["path"] == "/fast").collect();
    assert_eq!(refused.len(), 1, "{lines:?}");
    assert_eq!(refused[0]["code"], 503, "{lines:?}");
    assert_eq!(refused[0]["flags"], "UO", "{lines:?}");
    // The destination has no limits: nothing counted there.
    assert_eq!(metric(&bed.agent, "strait_overflows_total", &[])?, 0.0);

    // maxRequests 1 (an http2 target; the client speaks HTTP/1.1 to the agent).
    one_slow_then_one(client, &GUARDED_REQUESTS, &[])?;
    assert_eq!(overflows("guarded-requests", "max_requests")?, 1.0);

    // maxConnections 1 on a tcp backend: the second connection is closed.
    let seen = tcp_probe(client, &host(&GUARDED_TCP))?;
    let got = |k: &str| seen[k].as_str().unwrap_or_default().to_owned();
    assert!(got("first").contains("guarded-tcp"), "{seen}");
    assert!(
        got("second").is_empty() || got("second").starts_with("error: ConnectionReset"),
        "{seen}"
    );
    assert!(got("third").contains("guarded-tcp"), "{seen}");
    assert_eq!(overflows("guarded-tcp", "max_connections")?, 1.0);
    // The refused connection has its access log line, flag UO (requests: 4 + 3; connections:
    // the two served and the refused one).
    let lines = access_log_lines(&bed.access_log, 10)?;
    let refused_tcp = lines
        .iter()
        .filter(|l| l["flags"] == "UO" && l["code"] != 503)
        .count();
    assert_eq!(refused_tcp, 1, "{lines:?}");
    Ok(())
}

#[test]
fn a_burst_of_15_against_10_per_second_serves_10_and_shadow_mode_refuses_none() -> anyhow::Result<()>
{
    let bed = bed("resilience-burst", &["client-a"], &[&BURST, &SHADOW])?;
    let client = bed.client("client-a");
    let burst = |server: &Server| -> Vec<String> {
        (0..15)
            .map(|i| format!("http://{}:8080/b{i}", host(server)))
            .collect()
    };
    let parallel = ["--parallel", "--parallel-immediate", "--parallel-max", "15"];
    let replies = curl(client, &parallel, &burst(&BURST))?;
    assert_eq!(statuses(&replies, 200), 10, "{replies:?}");
    assert_eq!(statuses(&replies, 429), 5, "{replies:?}");
    for r in replies.iter().filter(|r| r.status == 429) {
        // 10 per second: the next token is at most 100 ms away; whole seconds, rounded up.
        assert_eq!(r.retry_after, "1", "{replies:?}");
    }
    assert_eq!(
        metric(
            &bed.agent,
            "strait_rate_limited_total",
            &[
                r#"virtual_node="app/burst""#,
                r#"scope="total""#,
                r#"mode="enforced""#
            ]
        )?,
        5.0
    );
    let lines = access_log_lines(&bed.access_log, 15)?;
    let limited = lines
        .iter()
        .filter(|l| l["code"] == 429 && l["flags"] == "RL")
        .count();
    assert_eq!(limited, 5, "{lines:?}");
    // The bucket refills: a second later a request is served again.
    std::thread::sleep(Duration::from_millis(1100));
    let again = curl(
        client,
        &[],
        &[format!("http://{}:8080/again", host(&BURST))],
    )?;
    assert_eq!(again[0].status, 200, "{again:?}");

    // Shadow mode: the same burst is served whole, and what would have been refused counted.
    let replies = curl(client, &parallel, &burst(&SHADOW))?;
    assert_eq!(statuses(&replies, 200), 15, "{replies:?}");
    assert_eq!(
        metric(
            &bed.agent,
            "strait_rate_limited_total",
            &[r#"virtual_node="app/shadow""#, r#"mode="shadow""#]
        )?,
        5.0
    );
    assert_eq!(
        metric(
            &bed.agent,
            "strait_rate_limited_total",
            &[r#"virtual_node="app/shadow""#, r#"mode="enforced""#]
        )?,
        0.0
    );
    Ok(())
}

#[test]
fn per_caller_limits_count_each_caller_apart_and_an_override_is_honoured() -> anyhow::Result<()> {
    let bed = bed("resilience-callers", &CLIENTS, &[&FAIR])?;
    // Eight requests each on one keep-alive connection (well under a second: at 1 per second
    // the buckets gain nothing meanwhile). perCaller: burst 3; vip's override: burst 6.
    let urls: Vec<String> = (0..8)
        .map(|i| format!("http://{}:8080/f{i}", host(&FAIR)))
        .collect();
    let mut served = Vec::new();
    for name in CLIENTS {
        let replies = curl(bed.client(name), &[], &urls)?;
        served.push((name, statuses(&replies, 200), statuses(&replies, 429)));
    }
    assert_eq!(
        served,
        vec![("client-a", 3, 5), ("client-b", 3, 5), ("vip", 6, 2)],
        "each caller has its own bucket; vip's is the override's"
    );
    for (source, scope, want) in [
        ("app/client-a", "caller", 5.0),
        ("app/client-b", "caller", 5.0),
        ("app/vip", "override", 2.0),
    ] {
        let got = metric(
            &bed.agent,
            "strait_rate_limited_total",
            &[
                r#"virtual_node="app/fair""#,
                &format!(r#"source_virtual_node="{source}""#),
                &format!(r#"scope="{scope}""#),
            ],
        )?;
        assert_eq!(got, want, "{source} {scope}");
    }
    Ok(())
}

/// Python in the client pod: holds one connection to the tcp service (reads its banner), then
/// tries a second while the first is open, then a third after closing the first. Prints what
/// each got.
const TCP_PROBE: &str = r#"
import json, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
def first_bytes(s):
    s.settimeout(5)
    try:
        return s.recv(100).decode(errors="replace")
    except (ConnectionResetError, socket.timeout) as e:
        return "error: " + type(e).__name__
out = {}
a = socket.create_connection((host, port), timeout=5)
out["first"] = first_bytes(a)
b = socket.create_connection((host, port), timeout=5)
out["second"] = first_bytes(b)
b.close()
a.close()
time.sleep(0.5)
c = socket.create_connection((host, port), timeout=5)
out["third"] = first_bytes(c)
c.close()
print(json.dumps(out))
"#;

/// Keeps a connection busy (a line echoed every 0.5 s for 3 s), then quiet: how long until
/// the server side closes it.
const IDLE_PROBE: &str = r#"
import json, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((host, port), timeout=5)
s.settimeout(5)
out = {"banner": s.recv(100).decode(errors="replace"), "echoes": 0}
for i in range(6):
    time.sleep(0.5)
    s.sendall(b"ping\n")
    if s.recv(100):
        out["echoes"] += 1
quiet = time.monotonic()
s.settimeout(10)
try:
    data = s.recv(100)
    out["end"] = "closed" if not data else "data: " + data.decode(errors="replace")
except ConnectionResetError:
    out["end"] = "reset"
except socket.timeout:
    out["end"] = "still open after 10 s"
out["quiet_s"] = time.monotonic() - quiet
print(json.dumps(out))
"#;

#[test]
fn tcp_idle_closes_an_idle_connection_at_the_receiving_side() -> anyhow::Result<()> {
    let bed = bed("resilience-idle", &["client-a"], &[&IDLE])?;
    let output = run(
        bed.client("client-a").command("python3").args([
            "-c",
            IDLE_PROBE,
            &host(&IDLE),
            &TCP_PORT.to_string(),
        ]),
        Duration::from_secs(60),
    )?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let seen: Value = serde_json::from_str(stdout.trim()).with_context(|| {
        format!(
            "the probe printed no JSON: {stdout:?}, stderr {:?}",
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    assert!(
        seen["banner"].as_str().is_some_and(|b| b.contains("idle")),
        "{seen}"
    );
    // 3 s of traffic every 0.5 s: longer than the 1.5 s idle timeout, and never cut.
    assert_eq!(seen["echoes"], 6, "{seen}");
    assert!(
        seen["end"] == "closed" || seen["end"] == "reset",
        "closed when idle: {seen}"
    );
    let quiet = seen["quiet_s"].as_f64().unwrap_or(f64::MAX);
    assert!(
        (1.3..3.5).contains(&quiet),
        "closed about 1.5 s after the last byte: {seen}"
    );
    Ok(())
}

#[test]
fn tcp_max_connections_and_connection_rate_refuse_connections_over_the_limit() -> anyhow::Result<()>
{
    let bed = bed("resilience-tcp", &["client-a"], &[&TCP, &TCP_RATE])?;
    let seen = tcp_probe(bed.client("client-a"), &host(&TCP))?;
    let got = |k: &str| seen[k].as_str().unwrap_or_default().to_owned();
    assert!(
        got("first").contains("tcp"),
        "the banner names the server: {seen}"
    );
    // Over maxConnections 1: closed without a byte from the server (or reset).
    assert!(
        got("second").is_empty() || got("second").starts_with("error: ConnectionReset"),
        "{seen}"
    );
    assert!(
        got("third").contains("tcp"),
        "a connection freed up: {seen}"
    );
    assert!(
        metric(
            &bed.agent,
            "strait_overflows_total",
            &[r#"virtual_node="app/tcp""#, r#"reason="max_connections""#]
        )? >= 1.0
    );

    // A tcp listener's rateLimit is a connection rate: burst 2, then 1 a second. The probe's
    // third connection comes half a second after the first two: refused.
    let seen = tcp_probe(bed.client("client-a"), &host(&TCP_RATE))?;
    let got = |k: &str| seen[k].as_str().unwrap_or_default().to_owned();
    assert!(got("first").contains("tcp-rate"), "{seen}");
    assert!(got("second").contains("tcp-rate"), "{seen}");
    assert!(
        got("third").is_empty() || got("third").starts_with("error: ConnectionReset"),
        "{seen}"
    );
    assert!(
        metric(
            &bed.agent,
            "strait_rate_limited_total",
            &[
                r#"virtual_node="app/tcp-rate""#,
                r#"unit="connection""#,
                r#"mode="enforced""#
            ]
        )? >= 1.0
    );
    Ok(())
}

#[test]
fn grpc_callers_over_the_rate_limit_get_resource_exhausted() -> anyhow::Result<()> {
    let python = testbed::python_with_grpcio()?;
    let bed = bed("resilience-grpc", &["client-a"], &[&GRPC])?;
    // Burst 2 at 1 per second: the first two calls are answered, the next two (within the
    // same second) get RESOURCE_EXHAUSTED.
    four_calls_two_exhausted(
        bed.client("client-a").command(&python),
        &format!("{}:{GRPC_PORT}", host(&GRPC)),
        "grpc",
    )?;
    assert_eq!(
        metric(
            &bed.agent,
            "strait_rate_limited_total",
            &[r#"virtual_node="app/grpc""#, r#"mode="enforced""#]
        )?,
        2.0
    );
    Ok(())
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

/// Across nodes, through the mTLS tunnel: the receiving agent keys per-caller buckets by the
/// SPIFFE ID in the verified client certificate (an override names one by `identity`), and a
/// tcp listener's maxConnections refuses the tunnel stream over the limit.
#[test]
fn tunnel_callers_are_limited_by_their_certificate_identity() -> anyhow::Result<()> {
    let tb = Testbed::new("resilience-tunnel")?;
    let node1 = tb.add_node("node1")?;
    let node2 = tb.add_node("node2")?;
    let clients: Vec<Pod> = ["client-a", "client-b"]
        .iter()
        .map(|name| node1.add_pod(&PodSpec::new(name, "app").label("app", name)))
        .collect::<anyhow::Result<_>>()?;
    let server = node2.add_pod(&PodSpec::new("server", "app").label("app", "server"))?;
    tb.dns_record("server.app.svc.cluster.local", &["10.96.2.1".parse()?])?;
    tb.dns_record("server-pods.app.svc.cluster.local", &server.ips())?;
    let http = tb.spawn(
        "server-http",
        server.command(HTTP_BIN).args([
            "serve",
            "--listen",
            "0.0.0.0:8080,[::]:8080",
            "--name",
            "server",
        ]),
    )?;
    http.wait_listening(8080, Duration::from_secs(20))?;
    let listen = format!("0.0.0.0:{TCP_PORT},[::]:{TCP_PORT}");
    let tcp = tb.spawn(
        "server-tcp",
        server
            .command(peer_binary()?)
            .args(["serve", "--listen", &listen, "--name", "server"]),
    )?;
    tcp.wait_listening(TCP_PORT, Duration::from_secs(20))?;

    let certs = tb.temp_dir().join("certs");
    let c = certs.display();
    let client_node = |name: &str| {
        format!(
            r#"---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: {name}, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: {name}}}}}
  backends:
    - virtualService: {{virtualServiceRef: {{name: server}}}}
  backendDefaults:
    clientPolicy:
      tls:
        certificate: {{file: {{certificateChain: {c}/{name}.pem, privateKey: {c}/{name}-key.pem}}}}
        validation: {{trust: {{file: {{certificateChain: {c}/ca-bundle.pem}}}}}}
"#
        )
    };
    let mesh = format!(
        r#"apiVersion: appmesh.k8s.aws/v1beta2
kind: Mesh
metadata: {{name: test}}
spec: {{egressFilter: {{type: DROP_ALL}}}}
{}{}---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: server, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: server}}}}
  listeners:
    - portMapping: {{port: 8080, protocol: http}}
      tls: &strict
        mode: STRICT
        certificate: {{file: {{certificateChain: {c}/server.pem, privateKey: {c}/server-key.pem}}}}
        validation:
          trust: {{file: {{certificateChain: {c}/ca-bundle.pem}}}}
          subjectAlternativeNames: {{match: {{exact: [spiffe://test/ns/app/vn/client-a, spiffe://test/ns/app/vn/client-b]}}}}
      rateLimit:
        perCaller: {{requestsPerSecond: 1, burst: 3}}
        overrides:
          - callers: [{{identity: spiffe://test/ns/app/vn/client-b}}]
            requestsPerSecond: 1
            burst: 5
    - portMapping: {{port: {TCP_PORT}, protocol: tcp}}
      tls: *strict
      connectionPool: {{tcp: {{maxConnections: 1}}}}
  serviceDiscovery: {{dns: {{hostname: server-pods.app.svc.cluster.local, responseType: ENDPOINTS}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {{name: server, namespace: app}}
spec:
  awsName: server.app.svc.cluster.local
  provider: {{virtualNode: {{virtualNodeRef: {{name: server}}}}}}
"#,
        client_node("client-a"),
        client_node("client-b"),
    );
    let ca = tb.temp_dir().join("ca");
    let mut meshes = Vec::new();
    for node in ["node1", "node2"] {
        let path = tb.temp_dir().join(format!("{node}-mesh")).join("mesh.yaml");
        std::fs::create_dir_all(path.parent().context("mesh folder")?)?;
        std::fs::write(&path, &mesh)?;
        meshes.push(path);
    }
    strait_ok(&node1, &["ca", "init", "--dir", &ca.display().to_string()])?;
    let (mesh1, ca_dir) = (meshes[0].display().to_string(), ca.display().to_string());
    strait_ok(
        &node1,
        &["ca", "issue", "--mesh", &mesh1, "--ca-dir", &ca_dir],
    )?;
    for pod in &clients {
        node1.write_workload(pod)?;
    }
    node2.write_workload(&server)?;
    let start = |node: &Node, other: &Node, mesh: &PathBuf| {
        let args = peer_node_args([other], true);
        Agent::start(
            &tb,
            node,
            mesh,
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        )
    };
    let agent1 = start(&node1, &node2, &meshes[0])?;
    let agent2 = start(&node2, &node1, &meshes[1])?;
    for pod in ["app/client-a", "app/client-b"] {
        agent1.wait_enrolled(pod, true, Duration::from_secs(20))?;
    }
    agent2.wait_enrolled("app/server", true, Duration::from_secs(20))?;

    let urls: Vec<String> = (0..8)
        .map(|i| format!("http://server.app.svc.cluster.local:8080/t{i}"))
        .collect();
    let a = curl(&clients[0], &[], &urls)?;
    let b = curl(&clients[1], &[], &urls)?;
    assert_eq!(
        (statuses(&a, 200), statuses(&a, 429)),
        (3, 5),
        "client-a: perCaller burst 3: {a:?}"
    );
    assert_eq!(
        (statuses(&b, 200), statuses(&b, 429)),
        (5, 3),
        "client-b: its override, burst 5: {b:?}"
    );
    // Counted by the receiving agent, against the callers its certificates name.
    for (source, scope, want) in [
        ("app/client-a", "caller", 5.0),
        ("app/client-b", "override", 3.0),
    ] {
        let got = metric(
            &agent2,
            "strait_rate_limited_total",
            &[
                r#"virtual_node="app/server""#,
                &format!(r#"source_virtual_node="{source}""#),
                &format!(r#"scope="{scope}""#),
            ],
        )?;
        assert_eq!(got, want, "{source} {scope}");
    }
    assert!(metric(&agent2, "strait_tunnel_streams_total", &[])? > 0.0);

    // tcp maxConnections 1 across the tunnel: the second connection is refused.
    let seen = tcp_probe(&clients[0], "server.app.svc.cluster.local")?;
    let got = |k: &str| seen[k].as_str().unwrap_or_default().to_owned();
    assert!(got("first").contains("server"), "{seen}");
    assert!(
        got("second").is_empty() || got("second").starts_with("error: ConnectionReset"),
        "{seen}"
    );
    assert!(got("third").contains("server"), "{seen}");
    assert!(
        metric(
            &agent2,
            "strait_overflows_total",
            &[
                r#"virtual_node="app/server""#,
                r#"reason="max_connections""#,
                r#"source_virtual_node="app/client-a""#
            ]
        )? >= 1.0
    );
    drop((agent1, agent2, http, tcp));
    Ok(())
}

/// The outlier detection test's virtual node: three pods, one listener.
const POOL: [&str; 3] = ["pool-1", "pool-2", "pool-3"];
const EJECTION_BASE: Duration = Duration::from_secs(4);

/// A `strait-http load` run in the pod; its JSON report.
fn load(pod: &Pod, url: &str, args: &[&str]) -> anyhow::Result<Value> {
    let output = run(
        pod.command(HTTP_BIN).args(["load", url]).args(args),
        Duration::from_secs(60),
    )?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.trim())
        .with_context(|| format!("strait-http load {url} printed no JSON report: {stdout:?}"))
}

fn served_by(report: &Value, server: &str) -> u64 {
    report["by_server"][server].as_u64().unwrap_or(0)
}

#[test]
fn outlier_detection_ejects_after_max_server_errors_for_longer_each_time_within_the_percentage()
-> anyhow::Result<()> {
    let tb = Testbed::new("resilience-outlier")?;
    let node = tb.add_node("node1")?;
    let client = node.add_pod(&PodSpec::new("client-a", "app").label("app", "client-a"))?;
    let mut servers = Vec::new();
    let mut pods = Vec::new();
    for name in POOL {
        let pod = node.add_pod(&PodSpec::new(name, "app").label("app", "pool"))?;
        let server = tb.spawn(
            &format!("server-{name}"),
            pod.command(HTTP_BIN)
                .args(["serve", "--listen", "0.0.0.0:8080", "--name", name]),
        )?;
        server.wait_listening(8080, Duration::from_secs(20))?;
        servers.push(server);
        pods.push(pod);
    }
    tb.dns_record("pool.app.svc.cluster.local", &["10.96.3.1".parse()?])?;
    // IPv4 only: each pod is one endpoint.
    let ips: Vec<std::net::IpAddr> = pods.iter().map(|p| p.ipv4().into()).collect();
    tb.dns_record("pool-pods.app.svc.cluster.local", &ips)?;
    let base = EJECTION_BASE.as_secs();
    let mesh = format!(
        r#"apiVersion: appmesh.k8s.aws/v1beta2
kind: Mesh
metadata: {{name: test}}
spec: {{egressFilter: {{type: DROP_ALL}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: client-a, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: client-a}}}}
  backends:
    - virtualService: {{virtualServiceRef: {{name: pool}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: pool, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: pool}}}}
  listeners:
    - portMapping: {{port: 8080, protocol: http}}
      outlierDetection:
        maxServerErrors: 5
        interval: {{unit: s, value: 60}}
        baseEjectionDuration: {{unit: s, value: {base}}}
        maxEjectionPercent: 50
  serviceDiscovery: {{dns: {{hostname: pool-pods.app.svc.cluster.local, responseType: ENDPOINTS}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {{name: pool, namespace: app}}
spec:
  awsName: pool.app.svc.cluster.local
  provider: {{virtualNode: {{virtualNodeRef: {{name: pool}}}}}}
"#
    );
    let mesh_path = tb.temp_dir().join("mesh.yaml");
    std::fs::write(&mesh_path, mesh)?;
    for pod in pods.iter().chain([&client]) {
        node.write_workload(pod)?;
    }
    let agent = Agent::start(&tb, &node, &mesh_path, &[])?;
    for pod in pods.iter().chain([&client]) {
        agent.wait_enrolled(
            &format!("app/{}", pod.name()),
            true,
            Duration::from_secs(20),
        )?;
    }
    let url = |fail_on: &str| format!("http://pool.app.svc.cluster.local:8080/?fail_on={fail_on}");
    let ejections = |result: &str| {
        metric(
            &agent,
            "strait_outlier_ejections_total",
            &[
                r#"virtual_node="app/pool""#,
                &format!(r#"result="{result}""#),
            ],
        )
    };

    // One request at a time, pool-1 answering 500: exactly 5 reach it, then it is ejected.
    let sequential = ["--count", "60", "--concurrency", "1"];
    // When the agent says pool-1 comes back (from /status/resilience, `strait status`'s
    // source): the windows below are timed from it, so a slow machine does not matter.
    let ejection_left = || -> anyhow::Result<(Instant, Duration)> {
        let asked = Instant::now();
        let status: Value = serde_json::from_str(&agent.admin_get("/status/resilience")?)
            .context("/status/resilience")?;
        let ejected = status["ejected_endpoints"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(ejected.len(), 1, "{status}");
        assert_eq!(
            ejected[0]["endpoint"],
            format!("{}:8080", pods[0].ipv4()),
            "{status}"
        );
        let left = Duration::from_millis(ejected[0]["remaining_ms"].as_u64().unwrap_or(0));
        Ok((asked, left))
    };
    let quiet_run = |window: Duration| {
        load(
            &client,
            &url("pool-1"),
            &[
                "--concurrency",
                "1",
                "--rate",
                "20",
                "--duration-ms",
                &window.as_millis().to_string(),
            ],
        )
    };
    let outlier_log = || {
        agent
            .log_lines()
            .iter()
            .filter(|l| {
                l["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("outlier"))
            })
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    };
    let margin = Duration::from_millis(500);

    let first = load(&client, &url("pool-1"), &sequential)?;
    assert_eq!(served_by(&first, "pool-1"), 5, "{first}");
    assert_eq!(first["statuses"]["500"], 5, "{first}");
    assert_eq!(ejections("enforced")?, 1.0);
    let (asked, left) = ejection_left()?;
    assert!(
        left <= EJECTION_BASE,
        "the first ejection lasts the base: {left:?}"
    );
    // No traffic to it for the rest of the ejection.
    let during = quiet_run(left.saturating_sub(margin))?;
    assert_eq!(served_by(&during, "pool-1"), 0, "ejected: {during}");
    assert!(
        served_by(&during, "pool-2") + served_by(&during, "pool-3") > 0,
        "{during}"
    );

    // Back by itself when the time is up; still failing: ejected again after 5, for twice as
    // long.
    std::thread::sleep(
        (asked + left + Duration::from_millis(300)).saturating_duration_since(Instant::now()),
    );
    let second = load(&client, &url("pool-1"), &sequential)?;
    assert_eq!(
        served_by(&second, "pool-1"),
        5,
        "back after {base} s: {second}\n{}",
        outlier_log()
    );
    assert_eq!(ejections("enforced")?, 2.0);
    let (asked, left) = ejection_left()?;
    // Still out for longer than a whole first ejection from now on, and it gets nothing.
    assert!(
        left > EJECTION_BASE + margin && left <= EJECTION_BASE * 2,
        "the second ejection lasts 2 x {base} s: {left:?} left\n{}",
        outlier_log()
    );
    let during = quiet_run(left.saturating_sub(margin))?;
    assert_eq!(
        served_by(&during, "pool-1"),
        0,
        "the second ejection lasts 2 x {base} s: {during}"
    );
    // And back after it.
    std::thread::sleep(
        (asked + left + Duration::from_millis(300)).saturating_duration_since(Instant::now()),
    );
    let healthy = load(
        &client,
        &url("none"),
        &["--count", "30", "--concurrency", "1"],
    )?;
    assert_eq!(healthy["ok"], true, "{healthy}");
    assert!(
        served_by(&healthy, "pool-1") > 0,
        "back after 2 x {base} s: {healthy}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(
        &agent,
        "strait_outlier_ejected",
        &[r#"virtual_node="app/pool""#],
    )? != 0.0
    {
        assert!(
            Instant::now() < deadline,
            "the ejected gauge did not go back to 0"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Two of three failing under maxEjectionPercent 50: only one is ejected; the other keeps
    // getting traffic (and failing), counted as an overflow.
    let both = load(&client, &url("pool-1,pool-2"), &sequential)?;
    let (one, two) = (served_by(&both, "pool-1"), served_by(&both, "pool-2"));
    assert!(
        (one == 5 && two > 5) || (two == 5 && one > 5),
        "exactly one of the two ejected after 5 errors: {both}"
    );
    assert_eq!(ejections("enforced")?, 3.0);
    assert!(ejections("overflow")? >= 1.0);
    assert_eq!(
        metric(
            &agent,
            "strait_outlier_ejected",
            &[r#"virtual_node="app/pool""#]
        )?,
        1.0
    );
    assert!(
        !agent.process.stderr().contains("panicked"),
        "{}",
        agent.process.stderr()
    );
    drop(agent);
    drop(servers);
    Ok(())
}

/// The server's own `logging.accessLog` gets a line for each request it receives, written by
/// the agent that delivers it: from a pod of its node, and from another node through the
/// tunnel; the request metrics count it with `reporter="destination"`.
#[test]
fn the_receiving_agent_logs_what_the_server_receives_from_its_node_and_another()
-> anyhow::Result<()> {
    let tb = Testbed::new("resilience-received")?;
    let node1 = tb.add_node("node1")?;
    let node2 = tb.add_node("node2")?;
    let client = node1.add_pod(&PodSpec::new("client-a", "app").label("app", "client-a"))?;
    let near = node1.add_pod(&PodSpec::new("near", "app").label("app", "near"))?;
    let far = node2.add_pod(&PodSpec::new("far", "app").label("app", "far"))?;
    let mut servers = Vec::new();
    for (pod, address) in [(&near, "10.96.4.1"), (&far, "10.96.4.2")] {
        let name = pod.name().to_owned();
        tb.dns_record(
            &format!("{name}.app.svc.cluster.local"),
            &[address.parse()?],
        )?;
        tb.dns_record(&format!("{name}-pods.app.svc.cluster.local"), &pod.ips())?;
        let server = tb.spawn(
            &format!("server-{name}"),
            pod.command(HTTP_BIN).args([
                "serve",
                "--listen",
                "0.0.0.0:8080,[::]:8080",
                "--name",
                &name,
            ]),
        )?;
        server.wait_listening(8080, Duration::from_secs(20))?;
        servers.push(server);
    }
    let certs = tb.temp_dir().join("certs");
    let c = certs.display();
    let server_node = |name: &str| {
        format!(
            r#"---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: {name}, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: {name}}}}}
  listeners:
    - portMapping: {{port: 8080, protocol: http}}
      tls:
        mode: STRICT
        certificate: {{file: {{certificateChain: {c}/{name}.pem, privateKey: {c}/{name}-key.pem}}}}
        validation: {{trust: {{file: {{certificateChain: {c}/ca-bundle.pem}}}}}}
  serviceDiscovery: {{dns: {{hostname: {name}-pods.app.svc.cluster.local, responseType: ENDPOINTS}}}}
  logging:
    accessLog:
      file:
        path: received.log
        format:
          json:
            - {{key: path, value: "%REQ(:PATH)%"}}
            - {{key: code, value: "%RESPONSE_CODE%"}}
            - {{key: reporter, value: "%STRAIT_REPORTER%"}}
            - {{key: cluster, value: "%UPSTREAM_CLUSTER%"}}
            - {{key: bytes_sent, value: "%BYTES_SENT%"}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {{name: {name}, namespace: app}}
spec:
  awsName: {name}.app.svc.cluster.local
  provider: {{virtualNode: {{virtualNodeRef: {{name: {name}}}}}}}
"#
        )
    };
    let mesh = format!(
        r#"apiVersion: appmesh.k8s.aws/v1beta2
kind: Mesh
metadata: {{name: test}}
spec: {{egressFilter: {{type: DROP_ALL}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: client-a, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: client-a}}}}
  backends:
    - virtualService: {{virtualServiceRef: {{name: near}}}}
    - virtualService: {{virtualServiceRef: {{name: far}}}}
  backendDefaults:
    clientPolicy:
      tls:
        certificate: {{file: {{certificateChain: {c}/client-a.pem, privateKey: {c}/client-a-key.pem}}}}
        validation: {{trust: {{file: {{certificateChain: {c}/ca-bundle.pem}}}}}}
{}{}"#,
        server_node("near"),
        server_node("far"),
    );
    let ca = tb.temp_dir().join("ca");
    let mut meshes = Vec::new();
    let mut log_dirs = Vec::new();
    for node in ["node1", "node2"] {
        let dir = tb.temp_dir().join(format!("{node}-mesh"));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("mesh.yaml");
        std::fs::write(&path, &mesh)?;
        meshes.push(path);
        log_dirs.push(tb.temp_dir().join(format!("{node}-logs")));
    }
    strait_ok(&node1, &["ca", "init", "--dir", &ca.display().to_string()])?;
    let (mesh1, ca_dir) = (meshes[0].display().to_string(), ca.display().to_string());
    strait_ok(
        &node1,
        &["ca", "issue", "--mesh", &mesh1, "--ca-dir", &ca_dir],
    )?;
    node1.write_workload(&client)?;
    node1.write_workload(&near)?;
    node2.write_workload(&far)?;
    let start = |node: &Node, other: &Node, mesh: &PathBuf, logs: &PathBuf| {
        let mut args = peer_node_args([other], true);
        args.extend(["--access-log-dir".into(), logs.display().to_string()]);
        Agent::start(
            &tb,
            node,
            mesh,
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        )
    };
    let agent1 = start(&node1, &node2, &meshes[0], &log_dirs[0])?;
    let agent2 = start(&node2, &node1, &meshes[1], &log_dirs[1])?;
    for pod in ["app/client-a", "app/near"] {
        agent1.wait_enrolled(pod, true, Duration::from_secs(20))?;
    }
    agent2.wait_enrolled("app/far", true, Duration::from_secs(20))?;

    for name in ["near", "far"] {
        let urls: Vec<String> = (0..3)
            .map(|i| format!("http://{name}.app.svc.cluster.local:8080/{name}{i}"))
            .collect();
        let replies = curl(&client, &[], &urls)?;
        assert_eq!(statuses(&replies, 200), 3, "{name}: {replies:?}");
    }
    // near: written by node1's agent (same node); far: by node2's (through the tunnel).
    for (name, agent, dir) in [
        ("near", &agent1, &log_dirs[0]),
        ("far", &agent2, &log_dirs[1]),
    ] {
        let lines = access_log_lines(&dir.join("received.log"), 3)?;
        assert_eq!(lines.len(), 3, "{name}: {lines:?}");
        for (i, line) in lines.iter().enumerate() {
            assert_eq!(line["path"], format!("/{name}{i}"), "{lines:?}");
            assert_eq!(line["code"], 200, "{lines:?}");
            assert_eq!(line["reporter"], "destination", "{lines:?}");
            assert_eq!(line["cluster"], format!("app/{name}"), "{lines:?}");
            assert!(line["bytes_sent"].as_u64() > Some(0), "{lines:?}");
        }
        assert_eq!(
            metric(
                agent,
                "strait_requests_total",
                &[
                    r#"reporter="destination""#,
                    &format!(r#"target_virtual_node="app/{name}""#),
                    r#"source_virtual_node="app/client-a""#,
                    r#"response_code_class="2xx""#,
                ]
            )?,
            3.0,
            "{name}"
        );
    }
    // The caller's agent counted them too, as the source.
    assert_eq!(
        metric(
            &agent1,
            "strait_requests_total",
            &[
                r#"reporter="source""#,
                r#"source_virtual_node="app/client-a""#
            ]
        )?,
        6.0
    );
    drop((agent1, agent2, servers));
    Ok(())
}

/// A virtual router's `tcpRoute.timeout.idle` closes an idle connection at the calling side.
#[test]
fn a_tcp_routes_idle_timeout_closes_an_idle_connection() -> anyhow::Result<()> {
    let tb = Testbed::new("resilience-route-idle")?;
    let node = tb.add_node("node1")?;
    let client = node.add_pod(&PodSpec::new("client-a", "app").label("app", "client-a"))?;
    let server = node.add_pod(&PodSpec::new("echo", "app").label("app", "echo"))?;
    tb.dns_record("echo.app.svc.cluster.local", &["10.96.5.1".parse()?])?;
    tb.dns_record("echo-pods.app.svc.cluster.local", &server.ips())?;
    let listen = format!("0.0.0.0:{TCP_PORT},[::]:{TCP_PORT}");
    let process = tb.spawn(
        "server-echo",
        server
            .command(peer_binary()?)
            .args(["serve", "--listen", &listen, "--name", "echo-idle"]),
    )?;
    process.wait_listening(TCP_PORT, Duration::from_secs(20))?;
    let mesh = format!(
        r#"apiVersion: appmesh.k8s.aws/v1beta2
kind: Mesh
metadata: {{name: test}}
spec: {{egressFilter: {{type: DROP_ALL}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: client-a, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: client-a}}}}
  backends: [{{virtualService: {{virtualServiceRef: {{name: echo}}}}}}]
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: echo, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: echo}}}}
  listeners: [{{portMapping: {{port: {TCP_PORT}, protocol: tcp}}}}]
  serviceDiscovery: {{dns: {{hostname: echo-pods.app.svc.cluster.local}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualRouter
metadata: {{name: echo, namespace: app}}
spec:
  listeners: [{{portMapping: {{port: {TCP_PORT}, protocol: tcp}}}}]
  routes:
    - name: echo-route
      tcpRoute:
        action: {{weightedTargets: [{{virtualNodeRef: {{name: echo}}, weight: 1}}]}}
        timeout: {{idle: {{unit: ms, value: 1500}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {{name: echo, namespace: app}}
spec:
  awsName: echo.app.svc.cluster.local
  provider: {{virtualRouter: {{virtualRouterRef: {{name: echo}}}}}}
"#
    );
    let mesh_path = tb.temp_dir().join("mesh.yaml");
    std::fs::write(&mesh_path, mesh)?;
    node.write_workload(&client)?;
    node.write_workload(&server)?;
    let agent = Agent::start(&tb, &node, &mesh_path, &[])?;
    agent.wait_enrolled("app/client-a", true, Duration::from_secs(20))?;
    agent.wait_enrolled("app/echo", true, Duration::from_secs(20))?;
    let output = run(
        client.command("python3").args([
            "-c",
            IDLE_PROBE,
            "echo.app.svc.cluster.local",
            &TCP_PORT.to_string(),
        ]),
        Duration::from_secs(60),
    )?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let seen: Value = serde_json::from_str(stdout.trim())
        .with_context(|| format!("the probe printed no JSON: {stdout:?}"))?;
    assert!(
        seen["banner"]
            .as_str()
            .is_some_and(|b| b.contains("echo-idle")),
        "{seen}"
    );
    assert_eq!(seen["echoes"], 6, "traffic keeps it open: {seen}");
    assert!(
        seen["end"] == "closed" || seen["end"] == "reset",
        "closed when idle: {seen}"
    );
    let quiet = seen["quiet_s"].as_f64().unwrap_or(f64::MAX);
    assert!((1.3..3.5).contains(&quiet), "about 1.5 s: {seen}");
    drop(agent);
    drop(process);
    Ok(())
}

/// One node with `client-a` and servers named as their pods (`strait-http` on 8080, or with
/// `grpc` the gRPC server on [`GRPC_PORT`]) behind the given mesh documents (after the Mesh
/// and `client-a`, whose access log is `client.log` in the returned directory). Each server
/// `name` answers `name.app.svc.cluster.local` at `address`, its pods at
/// `name-pods.app.svc.cluster.local`.
fn routed_bed(
    test: &str,
    servers: &[(&str, &str)],
    grpc: bool,
    documents: &str,
) -> anyhow::Result<(Agent, Pod, PathBuf, Vec<Process>, Node, Testbed)> {
    let python = if grpc {
        Some(testbed::python_with_grpcio()?)
    } else {
        None
    };
    let tb = Testbed::new(test)?;
    let node = tb.add_node("node1")?;
    let client = node.add_pod(&PodSpec::new("client-a", "app").label("app", "client-a"))?;
    let mut processes = Vec::new();
    let mut pods = Vec::new();
    for (name, address) in servers {
        let pod = node.add_pod(&PodSpec::new(name, "app").label("app", name))?;
        tb.dns_record(
            &format!("{name}.app.svc.cluster.local"),
            &[address.parse()?],
        )?;
        // One endpoint (its IPv4 address): the calling agent keeps one connection to it.
        let ipv4: Vec<_> = pod.ips().into_iter().filter(|ip| ip.is_ipv4()).collect();
        tb.dns_record(&format!("{name}-pods.app.svc.cluster.local"), &ipv4)?;
        let (process, port) = match &python {
            Some(python) => (
                tb.spawn(
                    &format!("server-{name}"),
                    pod.command(python).args([
                        GRPC_SCRIPT,
                        "serve",
                        "--port",
                        &GRPC_PORT.to_string(),
                        "--name",
                        name,
                    ]),
                )?,
                GRPC_PORT,
            ),
            None => (
                tb.spawn(
                    &format!("server-{name}"),
                    pod.command(HTTP_BIN).args([
                        "serve",
                        "--listen",
                        "0.0.0.0:8080,[::]:8080",
                        "--name",
                        name,
                    ]),
                )?,
                8080,
            ),
        };
        process.wait_listening(port, Duration::from_secs(20))?;
        processes.push(process);
        pods.push(pod);
    }
    let backends: String = servers
        .iter()
        .map(|(name, _)| format!("    - virtualService: {{virtualServiceRef: {{name: {name}}}}}\n"))
        .collect();
    let mesh = format!(
        r#"apiVersion: appmesh.k8s.aws/v1beta2
kind: Mesh
metadata: {{name: test}}
spec: {{egressFilter: {{type: DROP_ALL}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: client-a, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: client-a}}}}
  backends:
{backends}  logging:
    accessLog:
      file:
        path: client.log
        format:
          json:
            - {{key: path, value: "%REQ(:PATH)%"}}
            - {{key: code, value: "%RESPONSE_CODE%"}}
            - {{key: flags, value: "%RESPONSE_FLAGS%"}}
            - {{key: route, value: "%ROUTE_NAME%"}}
{documents}"#
    );
    let mesh_path = tb.temp_dir().join("mesh.yaml");
    std::fs::write(&mesh_path, mesh)?;
    let logs = tb.temp_dir().join("logs");
    node.write_workload(&client)?;
    for pod in &pods {
        node.write_workload(pod)?;
    }
    let agent = Agent::start(
        &tb,
        &node,
        &mesh_path,
        &["--access-log-dir", &logs.display().to_string()],
    )?;
    agent.wait_enrolled("app/client-a", true, Duration::from_secs(20))?;
    for (name, _) in servers {
        agent.wait_enrolled(&format!("app/{name}"), true, Duration::from_secs(20))?;
    }
    drop(pods);
    Ok((agent, client, logs, processes, node, tb))
}

/// A virtual router route's `rateLimit`, applied by the calling agent: a burst of 15 against
/// 10 a second with a burst of 10 serves exactly 10 and answers 5 with 429, counted with the
/// route; another route's limit in shadow mode refuses nothing and counts.
#[test]
fn a_routes_rate_limit_serves_10_of_15_and_its_shadow_mode_refuses_none() -> anyhow::Result<()> {
    let documents = r#"---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {name: routed, namespace: app}
spec:
  podSelector: {matchLabels: {app: routed}}
  listeners: [{portMapping: {port: 8080, protocol: http}}]
  serviceDiscovery: {dns: {hostname: routed-pods.app.svc.cluster.local, responseType: ENDPOINTS}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualRouter
metadata: {name: routed, namespace: app}
spec:
  listeners: [{portMapping: {port: 8080, protocol: http}}]
  routes:
    - name: limited
      httpRoute:
        match: {prefix: /limited}
        action: {weightedTargets: [{virtualNodeRef: {name: routed}, weight: 1}]}
        rateLimit: {requestsPerSecond: 10, burst: 10}
    - name: shadowed
      httpRoute:
        match: {prefix: /shadowed}
        action: {weightedTargets: [{virtualNodeRef: {name: routed}, weight: 1}]}
        rateLimit: {requestsPerSecond: 10, burst: 10, shadow: true}
    - name: open
      httpRoute:
        match: {prefix: /}
        action: {weightedTargets: [{virtualNodeRef: {name: routed}, weight: 1}]}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {name: routed, namespace: app}
spec:
  awsName: routed.app.svc.cluster.local
  provider: {virtualRouter: {virtualRouterRef: {name: routed}}}
"#;
    let (agent, client, logs, servers, _node, _tb) = routed_bed(
        "resilience-route-rate",
        &[("routed", "10.96.6.1")],
        false,
        documents,
    )?;
    let burst = |prefix: &str| -> Vec<String> {
        (0..15)
            .map(|i| format!("http://routed.app.svc.cluster.local:8080/{prefix}/b{i}"))
            .collect()
    };
    let parallel = ["--parallel", "--parallel-immediate", "--parallel-max", "15"];
    let replies = curl(&client, &parallel, &burst("limited"))?;
    assert_eq!(statuses(&replies, 200), 10, "{replies:?}");
    assert_eq!(statuses(&replies, 429), 5, "{replies:?}");
    for r in replies.iter().filter(|r| r.status == 429) {
        assert_eq!(r.retry_after, "1", "{replies:?}");
    }
    let route_metric = |route: &str, mode: &str| {
        metric(
            &agent,
            "strait_route_rate_limited_total",
            &[
                &format!(r#"route="{route}""#),
                r#"virtual_router="app/routed""#,
                r#"virtual_service="app/routed""#,
                r#"source_virtual_node="app/client-a""#,
                r#"scope="total""#,
                &format!(r#"mode="{mode}""#),
            ],
        )
    };
    assert_eq!(route_metric("limited", "enforced")?, 5.0);
    // The request metrics say which route answered 429 (the calling agent is the reporter).
    assert_eq!(
        metric(
            &agent,
            "strait_requests_total",
            &[
                r#"route="limited""#,
                r#"reporter="source""#,
                r#"response_code_class="4xx""#
            ]
        )?,
        5.0
    );
    let lines = access_log_lines(&logs.join("client.log"), 15)?;
    let limited = lines
        .iter()
        .filter(|l| l["code"] == 429 && l["flags"] == "RL" && l["route"] == "limited")
        .count();
    assert_eq!(limited, 5, "{lines:?}");
    // Other routes are not limited by it, and a second later the bucket has refilled.
    let open = curl(
        &client,
        &parallel,
        &burst("open").into_iter().take(12).collect::<Vec<_>>(),
    )?;
    assert_eq!(statuses(&open, 200), 12, "{open:?}");
    std::thread::sleep(Duration::from_millis(1100));
    let again = curl(
        &client,
        &[],
        &["http://routed.app.svc.cluster.local:8080/limited/again".to_owned()],
    )?;
    assert_eq!(again[0].status, 200, "{again:?}");

    // Shadow mode: all 15 served, the 5 that would have been refused counted.
    let replies = curl(&client, &parallel, &burst("shadowed"))?;
    assert_eq!(statuses(&replies, 200), 15, "{replies:?}");
    assert_eq!(route_metric("shadowed", "shadow")?, 5.0);
    assert_eq!(route_metric("shadowed", "enforced")?, 0.0);
    assert!(
        !agent.process.stderr().contains("panicked"),
        "{}",
        agent.process.stderr()
    );
    drop(agent);
    drop(servers);
    Ok(())
}

/// A server virtual node's listener `timeout.http` at the receiving side: `perRequest` 1 s
/// answers a 3 s request 504 (flag `UT` in the server's access log, written by the receiving
/// agent as `destination`) although the caller's route allows 10 s; `idle` 1.5 s closes the
/// connection into the receiving side once no request has been in flight for that long.
#[test]
fn a_listeners_timeouts_apply_at_the_receiving_side() -> anyhow::Result<()> {
    let documents = r#"---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {name: timed, namespace: app}
spec:
  podSelector: {matchLabels: {app: timed}}
  listeners:
    - portMapping: {port: 8080, protocol: http}
      timeout: {http: {perRequest: {unit: s, value: 1}, idle: {unit: ms, value: 1500}}}
  serviceDiscovery: {dns: {hostname: timed-pods.app.svc.cluster.local, responseType: ENDPOINTS}}
  logging:
    accessLog:
      file:
        path: received.log
        format:
          json:
            - {key: path, value: "%REQ(:PATH)%"}
            - {key: code, value: "%RESPONSE_CODE%"}
            - {key: flags, value: "%RESPONSE_FLAGS%"}
            - {key: reporter, value: "%STRAIT_REPORTER%"}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualRouter
metadata: {name: timed, namespace: app}
spec:
  listeners: [{portMapping: {port: 8080, protocol: http}}]
  routes:
    - name: patient
      httpRoute:
        match: {prefix: /}
        action: {weightedTargets: [{virtualNodeRef: {name: timed}, weight: 1}]}
        timeout: {perRequest: {unit: s, value: 10}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {name: timed, namespace: app}
spec:
  awsName: timed.app.svc.cluster.local
  provider: {virtualRouter: {virtualRouterRef: {name: timed}}}
"#;
    let (agent, client, logs, servers, _node, _tb) = routed_bed(
        "resilience-received-timeouts",
        &[("timed", "10.96.6.2")],
        false,
        documents,
    )?;
    let url = |path: &str| format!("http://timed.app.svc.cluster.local:8080{path}");
    let idle_closed = || {
        metric(
            &agent,
            "strait_idle_connections_closed_total",
            &[r#"virtual_node="app/timed""#],
        )
    };

    // idle: two requests 0.7 s apart share the calling agent's connection into the receiving
    // side; 1.7 s after the first (1 s after the second) it is still open, 1.5 s after the
    // second it is closed; the next request simply gets a new one.
    let start = Instant::now();
    assert_eq!(curl(&client, &[], &[url("/a")])?[0].status, 200);
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(curl(&client, &[], &[url("/b")])?[0].status, 200);
    let second = Instant::now();
    std::thread::sleep(Duration::from_millis(1700).saturating_sub(start.elapsed()));
    assert!(
        second.elapsed() < Duration::from_millis(1300),
        "the test machine is too slow for this timing"
    );
    assert_eq!(idle_closed()?, 0.0, "idle counts from the last request");
    std::thread::sleep(Duration::from_millis(2500).saturating_sub(second.elapsed()));
    assert_eq!(idle_closed()?, 1.0, "closed 1.5 s after the last request");
    assert_eq!(curl(&client, &[], &[url("/c")])?[0].status, 200);

    // perRequest: the server takes 3 s, the receiving agent answers 504 after 1 s.
    let slow = curl(&client, &[], &[url("/slow?delay_ms=3000")])?;
    assert_eq!(slow[0].status, 504, "{slow:?}");
    assert!((0.9..2.5).contains(&slow[0].seconds), "about 1 s: {slow:?}");
    let quick = curl(&client, &[], &[url("/quick?delay_ms=200")])?;
    assert_eq!(quick[0].status, 200, "{quick:?}");

    let received = access_log_lines(&logs.join("received.log"), 5)?;
    assert_eq!(received.len(), 5, "{received:?}");
    let slow_line = received
        .iter()
        .find(|l| l["path"] == "/slow?delay_ms=3000")
        .with_context(|| format!("no line for the slow request: {received:?}"))?;
    assert_eq!(slow_line["code"], 504, "{received:?}");
    assert_eq!(slow_line["flags"], "UT", "{received:?}");
    assert_eq!(slow_line["reporter"], "destination", "{received:?}");
    assert!(
        received
            .iter()
            .filter(|l| l["path"] != "/slow?delay_ms=3000")
            .all(|l| l["code"] == 200 && l["flags"] == "-"),
        "{received:?}"
    );
    assert_eq!(
        metric(
            &agent,
            "strait_requests_total",
            &[
                r#"reporter="destination""#,
                r#"target_virtual_node="app/timed""#,
                r#"response_code_class="5xx""#
            ]
        )?,
        1.0
    );
    assert_eq!(
        metric(
            &agent,
            "strait_request_timeouts_total",
            &[
                r#"target_virtual_node="app/timed""#,
                r#"reason="per_request""#
            ]
        )?,
        1.0
    );
    // The caller's agent got the 504 from the receiving side: not its own timeout.
    let client_lines = access_log_lines(&logs.join("client.log"), 5)?;
    let caller_slow = client_lines
        .iter()
        .find(|l| l["path"] == "/slow?delay_ms=3000")
        .with_context(|| format!("no caller line for the slow request: {client_lines:?}"))?;
    assert_eq!(caller_slow["code"], 504, "{client_lines:?}");
    assert_eq!(caller_slow["flags"], "-", "{client_lines:?}");
    drop(agent);
    drop(servers);
    Ok(())
}

/// A grpcRoute's `rateLimit`: calls over it get `RESOURCE_EXHAUSTED` from the calling agent.
#[test]
fn grpc_calls_over_a_routes_rate_limit_get_resource_exhausted() -> anyhow::Result<()> {
    let documents = format!(
        r#"---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: rgrpc, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: rgrpc}}}}
  listeners: [{{portMapping: {{port: {GRPC_PORT}, protocol: grpc}}}}]
  serviceDiscovery: {{dns: {{hostname: rgrpc-pods.app.svc.cluster.local, responseType: ENDPOINTS}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualRouter
metadata: {{name: rgrpc, namespace: app}}
spec:
  listeners: [{{portMapping: {{port: {GRPC_PORT}, protocol: grpc}}}}]
  routes:
    - name: colors
      grpcRoute:
        match: {{serviceName: color.Color}}
        action: {{weightedTargets: [{{virtualNodeRef: {{name: rgrpc}}, weight: 1}}]}}
        rateLimit: {{requestsPerSecond: 1, burst: 2}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {{name: rgrpc, namespace: app}}
spec:
  awsName: rgrpc.app.svc.cluster.local
  provider: {{virtualRouter: {{virtualRouterRef: {{name: rgrpc}}}}}}
"#
    );
    let (agent, client, _logs, servers, _node, _tb) = routed_bed(
        "resilience-route-grpc",
        &[("rgrpc", "10.96.6.3")],
        true,
        &documents,
    )?;
    // Burst 2 at 1 per second: two calls answered, the next two (within the second) refused.
    four_calls_two_exhausted(
        client.command(testbed::python_with_grpcio()?),
        &format!("rgrpc.app.svc.cluster.local:{GRPC_PORT}"),
        "rgrpc",
    )?;
    assert_eq!(
        metric(
            &agent,
            "strait_route_rate_limited_total",
            &[r#"route="colors""#, r#"mode="enforced""#]
        )?,
        2.0
    );
    drop(agent);
    drop(servers);
    Ok(())
}
