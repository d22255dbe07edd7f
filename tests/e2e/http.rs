//! End-to-end tests of the HTTP proxy: a real agent on a testbed node, pods calling virtual
//! services whose providers speak http, http2 and grpc, with real clients (curl, a keep-alive
//! hyper client, an HTTP/2 client, grpcio, a WebSocket client) and real servers (`strait-http`,
//! grpcio). What is checked is what a user would check: status codes and bodies, the observed
//! canary split, the success rate with retries, how long a timeout took, which endpoints got
//! traffic after a health check ejected one, and the agent's memory while a large body
//! streamed through it.
//!
//! Needs root (and Python's grpcio for the gRPC test: `cargo xtask setup` installs it); without
//! them these tests fail with the reason.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::Value;
use testbed::agent::{Agent, http_server};
use testbed::{Node, Pod, PodSpec, Process, Scenario, Testbed, run};

const COLOR: &str = "color.app.svc.cluster.local";
const COLOR_V4: &str = "10.96.0.20";
const COLOR_H2: &str = "color-h2.app.svc.cluster.local";
const COLOR_H2_V4: &str = "10.96.0.21";
const GRPC: &str = "grpc.app.svc.cluster.local";
const GRPC_V4: &str = "10.96.0.22";
const GRPC_PORT: u16 = 50051;
const HTTP_BIN: &str = env!("CARGO_BIN_EXE_strait-http");
const GRPC_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/grpc/color_grpc.py");

/// The listener health check used by the health-check test.
const HEALTH_INTERVAL: Duration = Duration::from_millis(5000);
const HEALTH_TIMEOUT: Duration = Duration::from_millis(2000);
const UNHEALTHY_THRESHOLD: u32 = 2;
const HEALTHY_THRESHOLD: u32 = 2;

fn mesh_yaml(health_check: bool) -> String {
    let health = if health_check {
        format!(
            r#"
      healthCheck:
        protocol: http
        path: /health
        healthyThreshold: {HEALTHY_THRESHOLD}
        unhealthyThreshold: {UNHEALTHY_THRESHOLD}
        intervalMillis: {}
        timeoutMillis: {}"#,
            HEALTH_INTERVAL.as_millis(),
            HEALTH_TIMEOUT.as_millis()
        )
    } else {
        String::new()
    };
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
metadata: {{name: color-v1, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: color, version: v1}}}}
  listeners:
    - portMapping: {{port: 8080, protocol: http}}{health}
  serviceDiscovery: {{dns: {{hostname: color-v1.app.svc.cluster.local, responseType: ENDPOINTS}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: color-v2, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: color, version: v2}}}}
  listeners:
    - portMapping: {{port: 8080, protocol: http}}
  serviceDiscovery: {{dns: {{hostname: color-v2.app.svc.cluster.local, responseType: ENDPOINTS}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: dead, namespace: app}}
spec:
  listeners:
    - portMapping: {{port: 8080, protocol: http}}
  serviceDiscovery: {{dns: {{hostname: dead.app.svc.cluster.local, responseType: ENDPOINTS}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: color-h2, namespace: app}}
spec:
  listeners:
    - portMapping: {{port: 8080, protocol: http2}}
  serviceDiscovery: {{dns: {{hostname: color-v2.app.svc.cluster.local, responseType: ENDPOINTS}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: grpc-v1, namespace: app}}
spec:
  listeners:
    - portMapping: {{port: {GRPC_PORT}, protocol: grpc}}
  serviceDiscovery: {{dns: {{hostname: color-v1.app.svc.cluster.local, responseType: ENDPOINTS}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: grpc-v2, namespace: app}}
spec:
  listeners:
    - portMapping: {{port: {GRPC_PORT}, protocol: grpc}}
  serviceDiscovery: {{dns: {{hostname: color-v2.app.svc.cluster.local, responseType: ENDPOINTS}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualRouter
metadata: {{name: color, namespace: app}}
spec:
  listeners:
    - portMapping: {{port: 8080, protocol: http}}
  routes:
    - name: split
      priority: 100
      httpRoute:
        match: {{prefix: /color}}
        action:
          weightedTargets:
            - {{virtualNodeRef: {{name: color-v1}}, weight: 90}}
            - {{virtualNodeRef: {{name: color-v2}}, weight: 10}}
    - name: canary
      priority: 0
      httpRoute:
        match:
          prefix: /
          headers: [{{name: x-canary, match: {{exact: "true"}}}}]
        action: {{weightedTargets: [{{virtualNodeRef: {{name: color-v2}}, weight: 1}}]}}
    - name: retry
      priority: 10
      httpRoute:
        match: {{prefix: /retry}}
        action: {{weightedTargets: [{{virtualNodeRef: {{name: color-v1}}, weight: 1}}]}}
        retryPolicy:
          maxRetries: 5
          perRetryTimeout: {{unit: s, value: 2}}
          httpRetryEvents: [server-error]
    - name: noretry
      priority: 10
      httpRoute:
        match: {{prefix: /noretry}}
        action: {{weightedTargets: [{{virtualNodeRef: {{name: color-v1}}, weight: 1}}]}}
        retryPolicy:
          maxRetries: 0
          perRetryTimeout: {{unit: s, value: 2}}
          httpRetryEvents: [server-error]
    - name: slow
      priority: 10
      httpRoute:
        match: {{prefix: /slow}}
        action: {{weightedTargets: [{{virtualNodeRef: {{name: color-v1}}, weight: 1}}]}}
        timeout: {{perRequest: {{unit: ms, value: 1000}}}}
    - name: dead
      priority: 10
      httpRoute:
        match: {{prefix: /dead}}
        action: {{weightedTargets: [{{virtualNodeRef: {{name: dead}}, weight: 1}}]}}
    - name: streams
      priority: 10
      httpRoute:
        match: {{path: {{regex: "/(ws|echo)(/.*)?"}}}}
        action: {{weightedTargets: [{{virtualNodeRef: {{name: color-v1}}, weight: 1}}]}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualRouter
metadata: {{name: grpc, namespace: app}}
spec:
  listeners:
    - portMapping: {{port: {GRPC_PORT}, protocol: grpc}}
  routes:
    - name: get
      priority: 20
      grpcRoute:
        match: {{serviceName: color.Color}}
        action: {{weightedTargets: [{{virtualNodeRef: {{name: grpc-v1}}, weight: 1}}]}}
    - name: chat
      priority: 10
      grpcRoute:
        match: {{serviceName: color.Color, methodName: Chat}}
        action: {{weightedTargets: [{{virtualNodeRef: {{name: grpc-v2}}, weight: 1}}]}}
    - name: variant
      priority: 0
      grpcRoute:
        match:
          serviceName: color.Color
          metadata: [{{name: x-variant, match: {{exact: two}}}}]
        action: {{weightedTargets: [{{virtualNodeRef: {{name: grpc-v2}}, weight: 1}}]}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {{name: color, namespace: app}}
spec:
  awsName: {COLOR}
  provider: {{virtualRouter: {{virtualRouterRef: {{name: color}}}}}}
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
  provider: {{virtualRouter: {{virtualRouterRef: {{name: grpc}}}}}}
"#
    )
}

#[derive(Default)]
struct Options {
    /// color-v1 gets a listener health check and a second endpoint (pod v1b).
    health_check: bool,
    /// Start grpcio servers on v1 and v2.
    grpc: bool,
}

struct Bed {
    tb: Testbed,
    node: Node,
    client: Pod,
    v1b: Option<Pod>,
    mesh: PathBuf,
    servers: Vec<Process>,
}

fn bed(test: &str, options: Options) -> anyhow::Result<Bed> {
    let python = if options.grpc {
        Some(testbed::python_with_grpcio()?)
    } else {
        None
    };
    // `dead` names the outside pod, where nothing listens: connects to it are refused.
    let Scenario {
        tb,
        node,
        client,
        v1,
        v2,
        mesh,
        mut servers,
        ..
    } = Scenario::builder(test)
        .service(COLOR, &[COLOR_V4.parse()?])
        .service(COLOR_H2, &[COLOR_H2_V4.parse()?])
        .service(GRPC, &[GRPC_V4.parse()?])
        .refused("dead.app.svc.cluster.local")
        .mesh(mesh_yaml(options.health_check))
        .build()?;
    let v1b = if options.health_check {
        // A second endpoint of color-v1, reached at its address; no workload file, so the
        // agent does not enroll it.
        let v1b = node.add_pod(
            &PodSpec::new("color-v1b", "app")
                .label("app", "color")
                .label("version", "v1"),
        )?;
        tb.dns_record(
            "color-v1.app.svc.cluster.local",
            &[v1.ipv4().into(), v1b.ipv4().into()],
        )?;
        servers.push(http_server(&tb, &v1b, 8080, "v1b")?);
        Some(v1b)
    } else {
        None
    };
    if let Some(python) = python {
        for (pod, name) in [(&v1, "v1"), (&v2, "v2")] {
            let server = tb.spawn(
                &format!("grpc-{name}"),
                pod.command(&python).args([
                    GRPC_SCRIPT,
                    "serve",
                    "--port",
                    &GRPC_PORT.to_string(),
                    "--name",
                    name,
                ]),
            )?;
            server.wait_listening(GRPC_PORT, Duration::from_secs(20))?;
            servers.push(server);
        }
    }
    Ok(Bed {
        tb,
        node,
        client,
        v1b,
        mesh,
        servers,
    })
}

/// Runs a `strait-http` client in the pod; returns its JSON report.
fn http_tool(pod: &Pod, args: &[&str]) -> anyhow::Result<Value> {
    let output = run(pod.command(HTTP_BIN).args(args), Duration::from_secs(180))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.trim()).with_context(|| {
        format!(
            "strait-http {args:?} printed no JSON report: stdout {stdout:?}, stderr {:?}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

struct Curl {
    status: u16,
    http_version: String,
    seconds: f64,
    body: String,
}

/// curl in the pod; the status line is written after the body by `--write-out`.
fn curl(pod: &Pod, args: &[&str]) -> anyhow::Result<Curl> {
    let output = run(
        pod.command("curl")
            .args(["--silent", "--show-error", "--max-time", "20"])
            .args([
                "--write-out",
                "\n%{http_code} %{http_version} %{time_total}",
            ])
            .args(args),
        Duration::from_secs(30),
    )?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, tail) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    let mut fields = tail.split_whitespace();
    let parsed = (|| {
        Some(Curl {
            status: fields.next()?.parse().ok()?,
            http_version: fields.next()?.to_owned(),
            seconds: fields.next()?.parse().ok()?,
            body: body.to_owned(),
        })
    })();
    parsed.with_context(|| {
        format!(
            "curl {args:?}: unexpected output {stdout:?}, stderr {:?}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

fn share(report: &Value, server: &str) -> f64 {
    let count = report["by_server"][server].as_u64().unwrap_or(0) as f64;
    count / report["completed"].as_u64().unwrap_or(1).max(1) as f64
}

fn status_share(report: &Value, status: &str) -> f64 {
    let count = report["statuses"][status].as_u64().unwrap_or(0) as f64;
    count / report["requests"].as_u64().unwrap_or(1).max(1) as f64
}

fn url(path: &str) -> String {
    format!("http://{COLOR}:8080{path}")
}

#[test]
fn http1_and_http2_clients_are_routed_with_app_mesh_semantics() -> anyhow::Result<()> {
    let bed = bed("http-basics", Options::default())?;
    let agent = Agent::start(&bed.tb, &bed.node, &bed.mesh, &[])?;
    let client_ip = bed.client.ipv4().to_string();

    // curl, HTTP/1.1: the path is normalised, hop-by-hop headers are dropped, forwarding
    // headers and a request id are added.
    let reply = curl(
        &bed.client,
        &[
            "--path-as-is",
            "-H",
            "Connection: keep-alive, x-hop",
            "-H",
            "x-hop: secret",
            "-H",
            "x-canary: true",
            &url("/color/a/..//b/./c"),
        ],
    )?;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let seen: Value = serde_json::from_str(&reply.body)?;
    assert_eq!(seen["name"], "v2", "x-canary: true goes to v2: {seen}");
    assert_eq!(seen["path"], "/color/b/c", "{seen}");
    assert_eq!(seen["headers"]["x-forwarded-for"], client_ip, "{seen}");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "http", "{seen}");
    assert_eq!(
        seen["headers"]["x-request-id"].as_str().map(str::len),
        Some(36),
        "{seen}"
    );
    assert!(seen["headers"].get("x-hop").is_none(), "{seen}");
    assert_eq!(seen["headers"]["host"], format!("{COLOR}:8080"), "{seen}");

    // A keep-alive client: 300 requests over 3 connections.
    let report = http_tool(
        &bed.client,
        &[
            "load",
            &url("/color"),
            "--count",
            "300",
            "--concurrency",
            "3",
        ],
    )?;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["connections"], 3, "{report}");
    assert_eq!(report["statuses"]["200"], 300, "{report}");

    // HTTP/2 with prior knowledge, from curl and from a multiplexing client.
    let reply = curl(&bed.client, &["--http2-prior-knowledge", &url("/color")])?;
    assert_eq!(
        (reply.status, reply.http_version.as_str()),
        (200, "2"),
        "{}",
        reply.body
    );
    let report = http_tool(
        &bed.client,
        &[
            "load",
            &url("/color"),
            "--http2",
            "--count",
            "200",
            "--concurrency",
            "10",
        ],
    )?;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["connections"], 1, "{report}");
    // An http2 provider is spoken to with HTTP/2 upstream, whatever the client spoke.
    let reply = curl(&bed.client, &[&format!("http://{COLOR_H2}:8080/anything")])?;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let seen: Value = serde_json::from_str(&reply.body)?;
    assert_eq!(seen["version"], "HTTP/2.0", "{seen}");
    assert_eq!(seen["headers"]["host"], Value::Null, "{seen}");

    // Errors a user can act on.
    let reply = curl(&bed.client, &[&url("/nowhere")])?;
    assert_eq!(reply.status, 404, "{}", reply.body);
    assert!(reply.body.contains("app/color"), "{}", reply.body);
    let reply = curl(&bed.client, &["--path-as-is", &url("/color%zz")])?;
    assert_eq!(reply.status, 400, "{}", reply.body);
    let reply = curl(&bed.client, &[&url("/dead")])?;
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert!(
        reply.body.contains("virtual service app/color route dead"),
        "{}",
        reply.body
    );
    let malformed = run(
        bed.client.command("sh").args([
            "-c",
            &format!(
                "printf 'GET /color HTTP/1.1\\r\\nHost: x\\r\\nBad Header\\r\\n\\r\\n' | curl --silent --max-time 5 telnet://{COLOR}:8080"
            ),
        ]),
        Duration::from_secs(10),
    )?;
    let malformed = String::from_utf8_lossy(&malformed.stdout);
    assert!(malformed.starts_with("HTTP/1.1 400"), "{malformed:?}");

    // The agent logged every request with its route.
    let requests: Vec<Value> = agent
        .log_lines()
        .into_iter()
        .filter(|l| l["target"] == "strait::request")
        .collect();
    assert!(
        requests
            .iter()
            .any(|l| l["route"] == "split" && l["status"] == 200),
        "no access log line for route split"
    );
    assert!(
        !agent.process.stderr().contains("panicked"),
        "{}",
        agent.process.stderr()
    );
    Ok(())
}

#[test]
fn a_90_10_canary_splits_requests_and_a_header_picks_v2() -> anyhow::Result<()> {
    let bed = bed("http-canary", Options::default())?;
    let _agent = Agent::start(&bed.tb, &bed.node, &bed.mesh, &[])?;
    let report = http_tool(
        &bed.client,
        &[
            "load",
            &url("/color"),
            "--count",
            "2000",
            "--concurrency",
            "8",
        ],
    )?;
    assert_eq!(report["ok"], true, "{report}");
    let v2 = share(&report, "v2");
    eprintln!(
        "90/10 canary over 2000 requests: v2 got {:.1} %",
        v2 * 100.0
    );
    assert!(
        (0.07..=0.13).contains(&v2),
        "v2 got {:.1} % of 2000 requests, want 10 ± 3: {report}",
        v2 * 100.0
    );
    let report = http_tool(
        &bed.client,
        &[
            "load",
            &url("/color"),
            "--count",
            "200",
            "--concurrency",
            "4",
            "-H",
            "x-canary: true",
        ],
    )?;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["by_server"]["v2"], 200, "{report}");
    Ok(())
}

#[test]
fn retries_and_timeouts_follow_the_route() -> anyhow::Result<()> {
    let bed = bed("http-retries", Options::default())?;
    let _agent = Agent::start(&bed.tb, &bed.node, &bed.mesh, &[])?;
    let load = |path: &str| {
        http_tool(
            &bed.client,
            &["load", &url(path), "--count", "1000", "--concurrency", "8"],
        )
    };
    // The endpoint really fails 30 % of requests: with retries off, about 70 % succeed.
    let without = load("/noretry?fail=30")?;
    let ok_without = status_share(&without, "200");
    // With maxRetries 5 on server-error, more than 99 % succeed.
    let with = load("/retry?fail=30")?;
    let ok_with = status_share(&with, "200");
    // With no retryPolicy, App Mesh's implicit one (2 retries on 503) applies: ~97 %.
    let implicit = load("/color?fail=30")?;
    let ok_implicit = status_share(&implicit, "200");
    eprintln!(
        "30 % failing endpoint: {:.1} % success without retries, {:.1} % with the implicit policy, {:.1} % with maxRetries 5",
        ok_without * 100.0,
        ok_implicit * 100.0,
        ok_with * 100.0
    );
    assert!((0.6..0.8).contains(&ok_without), "{without}");
    assert!(ok_with > 0.99, "{with}");
    assert!((0.94..0.995).contains(&ok_implicit), "{implicit}");

    // perRequest 1000 ms cuts a 3 s answer at 1 s, with a 504 naming service and route.
    let reply = curl(&bed.client, &[&url("/slow?delay_ms=3000")])?;
    eprintln!(
        "perRequest 1000 ms: the client got {} after {:.3} s",
        reply.status, reply.seconds
    );
    assert_eq!(reply.status, 504, "{}", reply.body);
    assert!(
        (0.8..=1.2).contains(&reply.seconds),
        "the 1 s timeout took {:.3} s",
        reply.seconds
    );
    assert!(
        reply.body.contains("virtual service app/color route slow"),
        "{}",
        reply.body
    );
    // A fast answer on the same route is untouched.
    let reply = curl(&bed.client, &[&url("/slow?delay_ms=100")])?;
    assert_eq!(reply.status, 200, "{}", reply.body);
    Ok(())
}

#[test]
fn grpc_unary_and_bidirectional_streaming_are_routed_by_service_method_and_metadata()
-> anyhow::Result<()> {
    let python = testbed::python_with_grpcio()?;
    let bed = bed(
        "http-grpc",
        Options {
            grpc: true,
            ..Options::default()
        },
    )?;
    let _agent = Agent::start(&bed.tb, &bed.node, &bed.mesh, &[])?;
    let target = format!("{GRPC}:{GRPC_PORT}");
    let call = |args: &[&str]| -> anyhow::Result<Value> {
        let output = run(
            bed.client
                .command(&python)
                .args([GRPC_SCRIPT, "call", "--target", &target])
                .args(args),
            Duration::from_secs(60),
        )?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        serde_json::from_str(stdout.trim()).with_context(|| {
            format!(
                "gRPC client printed no report: {stdout:?}, stderr {:?}",
                String::from_utf8_lossy(&output.stderr)
            )
        })
    };
    let report = call(&["--unary", "20", "--bidi", "20"])?;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["unary"]["v1"], 20, "Get goes to grpc-v1: {report}");
    assert_eq!(report["bidi"]["v2"], 20, "Chat goes to grpc-v2: {report}");
    let report = call(&["--unary", "10", "--metadata", "x-variant=two"])?;
    assert_eq!(report["unary"]["v2"], 10, "metadata match: {report}");
    let report = call(&["--method", "/other.Service/Call"])?;
    assert_eq!(report["code"], "UNIMPLEMENTED", "{report}");
    Ok(())
}

/// Waits for an agent log line with `message` about `endpoint`; returns when it appeared.
fn wait_for_health_log(
    agent: &Agent,
    message: &str,
    endpoint: &str,
    limit: Duration,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit + Duration::from_secs(10) {
        let found = agent
            .log_lines()
            .iter()
            .any(|l| l["message"] == message && l["endpoint"] == endpoint);
        if found {
            return Ok(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "no {message:?} for {endpoint} within {:?}; agent log:\n{}",
        limit + Duration::from_secs(10),
        agent.process.stderr()
    )
}

#[test]
fn a_health_check_ejects_a_dead_endpoint_and_readmits_it() -> anyhow::Result<()> {
    let mut bed = bed(
        "http-health",
        Options {
            health_check: true,
            ..Options::default()
        },
    )?;
    let agent = Agent::start(&bed.tb, &bed.node, &bed.mesh, &[])?;
    let v1b = bed.v1b.take().context("v1b")?;
    let endpoint = format!("{}:8080", v1b.ipv4());
    // Both endpoints serve (the route has no retries: a request to a dead endpoint fails).
    let report = http_tool(
        &bed.client,
        &[
            "load",
            &url("/noretry"),
            "--count",
            "200",
            "--concurrency",
            "4",
        ],
    )?;
    assert_eq!(report["ok"], true, "{report}");
    assert!(report["by_server"]["v1b"].as_u64() > Some(0), "{report}");

    // Let the first probe pass (the first result counts at once, as in Envoy), so the
    // ejection below has to go through `unhealthyThreshold`.
    std::thread::sleep(Duration::from_secs(3));
    // Kill v1b's server: ejected after `unhealthyThreshold` failed probes.
    let server = bed.servers.pop().context("v1b server")?;
    server.kill()?;
    let limit = HEALTH_INTERVAL * UNHEALTHY_THRESHOLD + HEALTH_TIMEOUT;
    let took = wait_for_health_log(&agent, "health check: endpoint ejected", &endpoint, limit)?;
    eprintln!(
        "dead endpoint ejected {:.1} s after its server died (limit {limit:?})",
        took.as_secs_f64()
    );
    assert!(
        took <= limit + Duration::from_secs(1),
        "ejection took {took:?}, limit {limit:?}"
    );
    // Two failures a full interval apart: never sooner than one interval.
    assert!(
        took >= HEALTH_INTERVAL - Duration::from_secs(1),
        "ejected after {took:?}: thresholds ignored"
    );
    let report = http_tool(
        &bed.client,
        &[
            "load",
            &url("/noretry"),
            "--count",
            "200",
            "--concurrency",
            "4",
        ],
    )?;
    assert_eq!(
        report["ok"], true,
        "an ejected endpoint gets no traffic: {report}"
    );
    assert_eq!(report["by_server"]["v1"], 200, "{report}");

    // Bring it back: readmitted after `healthyThreshold` good probes.
    let _server = http_server(&bed.tb, &v1b, 8080, "v1b")?;
    let limit = HEALTH_INTERVAL * HEALTHY_THRESHOLD + HEALTH_TIMEOUT;
    let took = wait_for_health_log(
        &agent,
        "health check: endpoint readmitted",
        &endpoint,
        limit,
    )?;
    eprintln!(
        "endpoint readmitted {:.1} s after its server came back (limit {limit:?})",
        took.as_secs_f64()
    );
    assert!(
        took <= limit + Duration::from_secs(1),
        "readmission took {took:?}, limit {limit:?}"
    );
    assert!(
        took >= HEALTH_INTERVAL - Duration::from_secs(1),
        "readmitted after {took:?}: thresholds ignored"
    );
    let report = http_tool(
        &bed.client,
        &[
            "load",
            &url("/noretry"),
            "--count",
            "200",
            "--concurrency",
            "4",
        ],
    )?;
    assert_eq!(report["ok"], true, "{report}");
    assert!(
        report["by_server"]["v1b"].as_u64() > Some(0),
        "readmitted: {report}"
    );
    Ok(())
}

/// Peak resident memory of a process, in bytes (`VmHWM`).
fn peak_rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM")?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .context("VmHWM value")?
        .parse()?;
    Ok(kb * 1024)
}

#[test]
fn websockets_pass_through_and_large_bodies_stream() -> anyhow::Result<()> {
    let bed = bed("http-streams", Options::default())?;
    let agent = Agent::start(&bed.tb, &bed.node, &bed.mesh, &[])?;
    let report = http_tool(&bed.client, &["ws", &url("/ws"), "--messages", "50"])?;
    assert_eq!(report["ok"], true, "{report}");

    // Warm up (pool, buffers), then stream 48 MiB each way and watch the agent's peak RSS.
    let report = http_tool(
        &bed.client,
        &["stream", &url("/echo"), "--bytes", "1000000"],
    )?;
    assert_eq!(report["ok"], true, "{report}");
    let before = peak_rss(agent.process.pid())?;
    let size: u64 = 48 * 1024 * 1024;
    let report = http_tool(
        &bed.client,
        &["stream", &url("/echo"), "--bytes", &size.to_string()],
    )?;
    let after = peak_rss(agent.process.pid())?;
    assert_eq!(report["ok"], true, "{report}");
    let growth = after.saturating_sub(before);
    eprintln!(
        "48 MiB streamed each way in {} ms; agent peak RSS {} -> {} MiB",
        report["elapsed_ms"],
        before / (1 << 20),
        after / (1 << 20)
    );
    assert!(
        growth < size / 4,
        "the agent's peak RSS grew by {growth} bytes while a {size}-byte body streamed: it was buffered"
    );
    Ok(())
}
