//! End-to-end test of the shipped dashboard (deploy/grafana/strait.json) and rules
//! (deploy/prometheus/) against a real Prometheus: Debian's `prometheus` runs in a testbed
//! node, scraping the agent's admin port every second, while pods send a known traffic mix (a
//! 90/10 canary, a route whose only endpoint refuses connections and is health-checked, a route
//! whose requests time out, TLS clients that
//! name no server at the node's tunnel port, TCP connections held open, and for the resilience
//! row a listener's rate limit, a route's rate limit, a connection pool and a caller's circuit
//! breaker overflowing, and the dead endpoint ejected by outlier detection again each time it comes back). Then every PromQL expression
//! of the dashboard and of the rules is evaluated through Prometheus' HTTP API and must return
//! what the traffic implies; a query that returns nothing fails the test. `promtool check
//! metrics` on the agent's /metrics and `promtool check rules` on the shipped rules must pass.
//!
//! Needs root and `cargo xtask setup` (prometheus, promtool); without them it fails with the
//! reason.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;
use testbed::agent::{Agent, echo_server, http_server, issue_mesh_certs, peer_binary};
use testbed::{Node, Pod, PodSpec, Testbed, run};

const COLOR: &str = "color.app.svc.cluster.local";
const COLOR_V4: &str = "10.96.0.40";
const ECHO: &str = "echo.app.svc.cluster.local";
const ECHO_V4: &str = "10.96.0.41";
const LIMITED: &str = "limited.app.svc.cluster.local";
const LIMITED_V4: &str = "10.96.0.42";
/// A virtual service whose router's one route has a `rateLimit` of 1 a second.
const ROUTED: &str = "routed.app.svc.cluster.local";
const ROUTED_V4: &str = "10.96.0.43";
/// TCP connections held open through the echo virtual service while the dashboard is read.
const HELD: u32 = 3;
const HTTP_BIN: &str = env!("CARGO_BIN_EXE_strait-http");
const PROMETHEUS: &str = "127.0.0.1:9090";
/// What the dashboard's `$__rate_interval` becomes: longer than the whole traffic phase, so
/// every rate covers all of it.
const RATE_INTERVAL: &str = "1m";
const TRAFFIC: Duration = Duration::from_secs(20);

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn mesh_yaml(certs: &Path) -> String {
    let c = certs.display();
    format!(
        r#"apiVersion: appmesh.k8s.aws/v1beta2
kind: Mesh
metadata: {{name: dash}}
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
    - virtualService: {{virtualServiceRef: {{name: echo}}}}
    - virtualService: {{virtualServiceRef: {{name: limited}}}}
    - virtualService: {{virtualServiceRef: {{name: routed}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: client2, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: client2}}}}
  backends:
    - virtualService:
        virtualServiceRef: {{name: limited}}
        clientPolicy: {{circuitBreaker: {{maxRequests: 1}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: limited, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: limited}}}}
  listeners:
    - portMapping: {{port: 8080, protocol: http}}
      rateLimit: {{requestsPerSecond: 2, burst: 2}}
    - portMapping: {{port: 8081, protocol: http}}
      connectionPool: {{http: {{maxConnections: 1, maxPendingRequests: 1}}}}
  serviceDiscovery: {{dns: {{hostname: limited-v1.app.svc.cluster.local, responseType: ENDPOINTS}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {{name: limited, namespace: app}}
spec:
  awsName: {LIMITED}
  provider: {{virtualNode: {{virtualNodeRef: {{name: limited}}}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: echo, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: echo}}}}
  listeners:
    - portMapping: {{port: 9000, protocol: tcp}}
  serviceDiscovery: {{dns: {{hostname: echo-v1.app.svc.cluster.local, responseType: ENDPOINTS}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {{name: echo, namespace: app}}
spec:
  awsName: {ECHO}
  provider: {{virtualNode: {{virtualNodeRef: {{name: echo}}}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: color-v1, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: color, version: v1}}}}
  listeners:
    - portMapping: {{port: 8080, protocol: http}}
      tls:
        mode: PERMISSIVE
        certificate: {{file: {{certificateChain: {c}/color-v1.pem, privateKey: {c}/color-v1-key.pem}}}}
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
metadata: {{name: slow, namespace: app}}
spec:
  listeners:
    - portMapping: {{port: 8080, protocol: http}}
  serviceDiscovery: {{dns: {{hostname: slow.app.svc.cluster.local, responseType: ENDPOINTS}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: dead, namespace: app}}
spec:
  listeners:
    - portMapping: {{port: 8080, protocol: http}}
      healthCheck:
        protocol: http
        path: /
        healthyThreshold: 2
        unhealthyThreshold: 2
        intervalMillis: 5000
        timeoutMillis: 2000
      outlierDetection:
        maxServerErrors: 2
        interval: {{unit: s, value: 10}}
        baseEjectionDuration: {{unit: s, value: 2}}
        maxEjectionPercent: 100
  serviceDiscovery: {{dns: {{hostname: dead.app.svc.cluster.local, responseType: ENDPOINTS}}}}
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
    - name: slow
      priority: 20
      httpRoute:
        match: {{prefix: /slow}}
        action: {{weightedTargets: [{{virtualNodeRef: {{name: slow}}, weight: 1}}]}}
        timeout: {{perRequest: {{unit: ms, value: 200}}}}
    - name: dead
      priority: 10
      httpRoute:
        match: {{prefix: /dead}}
        action: {{weightedTargets: [{{virtualNodeRef: {{name: dead}}, weight: 1}}]}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {{name: color, namespace: app}}
spec:
  awsName: {COLOR}
  provider: {{virtualRouter: {{virtualRouterRef: {{name: color}}}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: routed-v1, namespace: app}}
spec:
  listeners:
    - portMapping: {{port: 8080, protocol: http}}
  serviceDiscovery: {{dns: {{hostname: routed-v1.app.svc.cluster.local, responseType: ENDPOINTS}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualRouter
metadata: {{name: routed, namespace: app}}
spec:
  listeners:
    - portMapping: {{port: 8080, protocol: http}}
  routes:
    - name: capped
      httpRoute:
        match: {{prefix: /}}
        action: {{weightedTargets: [{{virtualNodeRef: {{name: routed-v1}}, weight: 1}}]}}
        rateLimit: {{requestsPerSecond: 1, burst: 1}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {{name: routed, namespace: app}}
spec:
  awsName: {ROUTED}
  provider: {{virtualRouter: {{virtualRouterRef: {{name: routed}}}}}}
"#
    )
}

/// `strait-http load` for `TRAFFIC` at `rate` requests per second per worker (two workers).
fn load(pod: &Pod, path: &str, rate: f64) -> anyhow::Result<Value> {
    load_url(pod, &format!("http://{COLOR}:8080{path}"), rate, 2)
}

/// `strait-http load` of `url` for `TRAFFIC` at `rate` requests per second per worker.
fn load_url(pod: &Pod, url: &str, rate: f64, workers: u32) -> anyhow::Result<Value> {
    let output = run(
        pod.command(HTTP_BIN).args([
            "load",
            url,
            "--concurrency",
            &workers.to_string(),
            "--rate",
            &rate.to_string(),
            "--duration-ms",
            &TRAFFIC.as_millis().to_string(),
            "--timeout",
            "60",
        ]),
        TRAFFIC + Duration::from_secs(60),
    )?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.trim()).with_context(|| {
        format!(
            "strait-http load {url}: no JSON report: {stdout:?} {:?}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

fn statuses(report: &Value) -> BTreeMap<String, u64> {
    report["statuses"]
        .as_object()
        .map(|s| {
            s.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

/// One result of an instant query: labels and value.
type Series = (BTreeMap<String, String>, f64);

/// GET a Prometheus API path from inside the node (where it listens on loopback).
fn api(node: &Node, path: &str, params: &[(&str, &str)]) -> anyhow::Result<Value> {
    let mut command = node.command("curl");
    command.args(["--silent", "--show-error", "--max-time", "10", "--get"]);
    for (k, v) in params {
        command.arg("--data-urlencode").arg(format!("{k}={v}"));
    }
    command.arg(format!("http://{PROMETHEUS}{path}"));
    let output = run(&mut command, Duration::from_secs(15))?;
    let body = String::from_utf8_lossy(&output.stdout);
    let json: Value = serde_json::from_str(&body).with_context(|| {
        format!(
            "GET {path} {params:?}: not JSON: {body} {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    ensure!(json["status"] == "success", "GET {path} {params:?}: {json}");
    Ok(json["data"].clone())
}

fn query(node: &Node, expr: &str, time: f64) -> anyhow::Result<Vec<Series>> {
    let data = api(
        node,
        "/api/v1/query",
        &[("query", expr), ("time", &format!("{time:.3}"))],
    )?;
    ensure!(data["resultType"] == "vector", "{expr}: {data}");
    data["result"]
        .as_array()
        .context("result")?
        .iter()
        .map(|r| {
            let labels = r["metric"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                        .collect()
                })
                .unwrap_or_default();
            let value: f64 = r["value"][1]
                .as_str()
                .context("value")?
                .parse()
                .context("value")?;
            Ok((labels, value))
        })
        .collect()
}

/// The value of the series whose `label` is `value` (exactly one).
fn value_of(series: &[Series], label: &str, value: &str) -> anyhow::Result<f64> {
    let found: Vec<f64> = series
        .iter()
        .filter(|(l, _)| l.get(label).map(String::as_str) == Some(value))
        .map(|(_, v)| *v)
        .collect();
    match found[..] {
        [v] => Ok(v),
        _ => bail!("expected one series with {label}={value:?}, got {series:?}"),
    }
}

fn near(what: &str, got: f64, want: f64, tolerance: f64) -> anyhow::Result<()> {
    ensure!(
        got.is_finite() && (got - want).abs() <= tolerance,
        "{what}: got {got}, want {want} ± {tolerance}"
    );
    Ok(())
}

/// Every PromQL target of the dashboard, with its panel's title.
fn dashboard_queries() -> anyhow::Result<Vec<(String, String)>> {
    fn walk(panel: &Value, out: &mut Vec<(String, String)>) {
        let title = panel["title"].as_str().unwrap_or_default().to_owned();
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                out.push((title.clone(), expr.to_owned()));
            }
        }
        for child in panel["panels"].as_array().into_iter().flatten() {
            walk(child, out);
        }
    }
    let path = repo_file("deploy/grafana/strait.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let mut out = Vec::new();
    walk(&dashboard, &mut out);
    ensure!(!out.is_empty(), "no queries in {}", path.display());
    Ok(out)
}

#[test]
fn dashboard_and_rules_show_the_traffic_in_a_real_prometheus() -> anyhow::Result<()> {
    for tool in ["prometheus", "promtool"] {
        ensure!(
            Command::new(tool)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
            "{tool} is missing: `cargo xtask setup` installs Debian's prometheus package"
        );
    }
    let rules_file = repo_file("deploy/prometheus/strait-rules.yaml");
    let check_rules = run(
        Command::new("promtool")
            .arg("check")
            .arg("rules")
            .arg(&rules_file),
        Duration::from_secs(30),
    )?;
    ensure!(
        check_rules.status.success(),
        "promtool check rules {}: {}{}",
        rules_file.display(),
        String::from_utf8_lossy(&check_rules.stdout),
        String::from_utf8_lossy(&check_rules.stderr)
    );

    let tb = Testbed::new("prometheus")?;
    let node = tb.add_node("node1")?;
    let client = node.add_pod(&PodSpec::new("client", "app").label("app", "client"))?;
    let v1 = node.add_pod(
        &PodSpec::new("color-v1", "app")
            .label("app", "color")
            .label("version", "v1"),
    )?;
    let v2 = node.add_pod(
        &PodSpec::new("color-v2", "app")
            .label("app", "color")
            .label("version", "v2"),
    )?;
    // Not enrolled: nothing listens in it (the dead route), and it is the TLS client that
    // names no server (an IP address, so no SNI) at the node's tunnel port.
    let outside = node.add_pod(&PodSpec::new("nothing", "elsewhere"))?;
    let echo = node.add_pod(&PodSpec::new("echo", "app").label("app", "echo"))?;
    let limited = node.add_pod(&PodSpec::new("limited", "app").label("app", "limited"))?;
    let client2 = node.add_pod(&PodSpec::new("client2", "app").label("app", "client2"))?;
    tb.dns_record(LIMITED, &[LIMITED_V4.parse()?])?;
    tb.dns_record("limited-v1.app.svc.cluster.local", &[limited.ipv4().into()])?;
    tb.dns_record(ECHO, &[ECHO_V4.parse()?])?;
    tb.dns_record("echo-v1.app.svc.cluster.local", &[echo.ipv4().into()])?;
    let _echo_server = echo_server(&tb, &echo, 9000, "echo")?;
    tb.dns_record(COLOR, &[COLOR_V4.parse()?])?;
    tb.dns_record("color-v1.app.svc.cluster.local", &[v1.ipv4().into()])?;
    tb.dns_record("color-v2.app.svc.cluster.local", &[v2.ipv4().into()])?;
    tb.dns_record("slow.app.svc.cluster.local", &[v2.ipv4().into()])?;
    tb.dns_record("dead.app.svc.cluster.local", &[outside.ipv4().into()])?;
    // The rate-limited route's target is served by color-v2's server, under a virtual node of
    // its own so that the canary's series stay the canary's.
    tb.dns_record(ROUTED, &[ROUTED_V4.parse()?])?;
    tb.dns_record("routed-v1.app.svc.cluster.local", &[v2.ipv4().into()])?;
    let limited_server = tb.spawn(
        "http-limited",
        limited.command(HTTP_BIN).args([
            "serve",
            "--listen",
            "0.0.0.0:8080,[::]:8080,0.0.0.0:8081,[::]:8081",
            "--name",
            "limited",
        ]),
    )?;
    limited_server.wait_listening(8081, Duration::from_secs(10))?;
    let _servers = [
        http_server(&tb, &v1, 8080, "v1")?,
        http_server(&tb, &v2, 8080, "v2")?,
        limited_server,
    ];
    for pod in [&client, &v1, &v2, &echo, &limited, &client2] {
        node.write_workload(pod)?;
    }
    let certs = tb.temp_dir().join("certs");
    let ca = tb.temp_dir().join("ca");
    let mesh = tb.temp_dir().join("mesh.yaml");
    std::fs::write(&mesh, mesh_yaml(&certs))?;
    issue_mesh_certs(&node, &mesh, &ca)?;
    let agent = Agent::start(&tb, &node, &mesh, &[])?;
    for pod in [
        "app/client",
        "app/color-v1",
        "app/color-v2",
        "app/echo",
        "app/limited",
        "app/client2",
    ] {
        agent.wait_enrolled(pod, true, Duration::from_secs(20))?;
    }

    // promtool's linter on what the agent exposes.
    let metrics = agent.admin_get("/metrics")?;
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    lint.stdin
        .take()
        .context("stdin")?
        .write_all(metrics.as_bytes())?;
    let linted = lint.wait_with_output()?;
    ensure!(
        linted.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&linted.stdout),
        String::from_utf8_lossy(&linted.stderr)
    );

    // A real Prometheus in the node, scraping the agent's admin port every second.
    let config = tb.temp_dir().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             rule_files: [{}]\n\
             scrape_configs:\n  - job_name: strait\n    static_configs: [{{targets: ['{}']}}]\n",
            rules_file.display(),
            testbed::agent::ADMIN
        ),
    )?;
    let prometheus = tb.spawn(
        "prometheus",
        node.command("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                tb.temp_dir().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={PROMETHEUS}")),
    )?;
    wait_for(
        Duration::from_secs(30),
        "Prometheus scraping the agent",
        || {
            let up = query(&node, "up{job=\"strait\"}", now())?;
            Ok(up.len() == 1 && up[0].1 == 1.0)
        },
    )
    .with_context(|| format!("Prometheus log: {}", tail(&prometheus.stderr())))?;

    // The traffic mix, all at once for TRAFFIC: the canary, a route that times out, a route
    // whose endpoint refuses connections (and fails its health check), TLS without a
    // server name.
    let started = now();
    let _held = tb.spawn(
        "hold",
        client.command(peer_binary()?).args([
            "hold",
            &format!("{ECHO}:9000"),
            "--connections",
            &HELD.to_string(),
            "--seconds",
            "60",
        ]),
    )?;
    let (canary, slow, dead, routed) = std::thread::scope(|s| {
        let canary = s.spawn(|| load(&client, "/color", 15.0));
        let slow = s.spawn(|| load(&client, "/slow?delay_ms=1000", 1.0));
        let dead = s.spawn(|| load(&client, "/dead", 1.0));
        // The resilience row: 8 a second against a rate limit of 2 (port 8080), four callers
        // of slow answers against a connection pool of 1 + 1 pending (8081), and three of
        // them from a caller whose circuit breaker allows 1 request at a time.
        let limited = s.spawn(|| load_url(&client, &format!("http://{LIMITED}:8080/"), 2.0, 4));
        // 3 a second against a route's rate limit of 1 (burst 1): about 2 of 3 refused by
        // the calling agent.
        let routed = s.spawn(|| load_url(&client, &format!("http://{ROUTED}:8080/"), 3.0, 1));
        let pooled = s.spawn(|| {
            load_url(
                &client,
                &format!("http://{LIMITED}:8081/?delay_ms=300"),
                2.0,
                4,
            )
        });
        let broken = s.spawn(|| {
            load_url(
                &client2,
                &format!("http://{LIMITED}:8081/?delay_ms=300"),
                2.0,
                3,
            )
        });
        let tls = s.spawn(|| -> anyhow::Result<()> {
            for _ in 0..5 {
                run(
                    outside.command("curl").args([
                        "--silent",
                        "--insecure",
                        "--max-time",
                        "3",
                        &format!("https://{}:15008/", node.bridge_ipv4()),
                    ]),
                    Duration::from_secs(10),
                )?;
                std::thread::sleep(Duration::from_secs(1));
            }
            Ok(())
        });
        let join = |h: std::thread::ScopedJoinHandle<'_, anyhow::Result<Value>>| {
            h.join()
                .map_err(|_| anyhow::anyhow!("a load thread panicked"))?
        };
        tls.join()
            .map_err(|_| anyhow::anyhow!("the TLS thread panicked"))??;
        for (what, report, status) in [
            ("rate limited", join(limited)?, "429"),
            ("connection pool", join(pooled)?, "503"),
            ("circuit breaker", join(broken)?, "503"),
        ] {
            ensure!(
                statuses(&report).contains_key(status),
                "the {what} load got no {status}: {report}"
            );
        }
        anyhow::Ok((join(canary)?, join(slow)?, join(dead)?, join(routed)?))
    })?;
    // The route's limit lets about one request a second through and refuses the rest.
    let route_refused = statuses(&routed).get("429").copied().unwrap_or(0);
    let route_served = statuses(&routed).get("200").copied().unwrap_or(0);
    ensure!(
        route_refused > 0
            && route_served > 0
            && route_served as f64 <= TRAFFIC.as_secs_f64() + 2.0
            && statuses(&routed).len() == 2,
        "the rate-limited route: {routed}"
    );
    let canary_ok = statuses(&canary);
    let (v1_count, v2_count) = (
        canary["by_server"]["v1"].as_u64().unwrap_or(0),
        canary["by_server"]["v2"].as_u64().unwrap_or(0),
    );
    ensure!(
        canary_ok.get("200").copied() == Some(v1_count + v2_count) && v2_count > 0,
        "the canary load: {canary}"
    );
    let slow_count = statuses(&slow).get("504").copied().unwrap_or(0);
    let dead_count = statuses(&dead).get("503").copied().unwrap_or(0);
    ensure!(
        slow_count > 0 && statuses(&slow).len() == 1,
        "the slow route: {slow}"
    );
    ensure!(
        dead_count > 0 && statuses(&dead).len() == 1,
        "the dead route: {dead}"
    );
    let total = (v1_count + v2_count + slow_count + dead_count) as f64;
    // Wait for two more scrapes and rule evaluations, then evaluate at one instant.
    std::thread::sleep(Duration::from_secs(3));
    let at = now();
    ensure!(
        at - started < 60.0,
        "the traffic phase overran the rate window"
    );
    let window = 60.0;

    // The dashboard's variables, as Grafana would fill them from its templating queries.
    let meshes = label_values(&node, "mesh", "strait_requests_total")?;
    ensure!(meshes == ["dash"], "label_values(mesh): {meshes:?}");
    let services = label_values(&node, "target_virtual_service", "strait_requests_total")?;
    ensure!(
        services == ["app/color", "app/limited", "app/routed"],
        "virtual services: {services:?}"
    );
    // The per-service panels are read for `color`, as a user picks it in the dashboard.
    let services = ["app/color".to_owned()];

    let expected_error_ratio = (slow_count + dead_count) as f64 / total;
    let observed_share = v2_count as f64 / (v1_count + v2_count) as f64;
    let mut checked = 0;
    for (title, expr) in dashboard_queries()? {
        let expr = expr
            .replace("$__rate_interval", RATE_INTERVAL)
            .replace("$mesh", &meshes.join("|"))
            .replace("$virtual_service", &services.join("|"));
        let series = query(&node, &expr, at)?;
        ensure!(
            !series.is_empty(),
            "the dashboard panel {title:?} shows nothing: {expr}"
        );
        let context = || format!("panel {title:?}: {expr} = {series:?}");
        match title.as_str() {
            "Request rate" => {
                let rate = value_of(&series, "target_virtual_service", "app/color")?;
                near(&context(), rate * window, total, total * 0.2)?;
            }
            "Error ratio (5xx and gRPC errors)" => {
                let ratio = value_of(&series, "target_virtual_service", "app/color")?;
                near(&context(), ratio, expected_error_ratio, 0.03)?;
            }
            "Latency p50 / p99" if expr.starts_with("histogram_quantile(0.5,") => {
                let p50 = value_of(&series, "target_virtual_service", "app/color")?;
                ensure!(p50 > 0.0 && p50 < 0.1, "{}", context());
            }
            "Latency p50 / p99" => {
                // The timed-out requests (200 ms) and the dead route's (retried) are well over
                // 1 % of all; none takes a second.
                let p99 = value_of(&series, "target_virtual_service", "app/color")?;
                ensure!((0.1..1.0).contains(&p99), "{}", context());
            }
            "Responses by code class" => {
                let of = |class: &str| {
                    series
                        .iter()
                        .filter(|(l, _)| {
                            l.get("response_code_class").map(String::as_str) == Some(class)
                        })
                        .map(|(_, v)| *v)
                        .sum::<f64>()
                };
                let all: f64 = series.iter().map(|(_, v)| v).sum();
                near(&context(), of("5xx") / all, expected_error_ratio, 0.03)?;
                near(
                    &context(),
                    of("2xx") / all,
                    1.0 - expected_error_ratio,
                    0.03,
                )?;
            }
            "Retries and timeouts" if expr.contains("retries") => {
                // App Mesh's implicit policy retries a connect failure twice.
                let dead_rate = dead_count as f64 / window;
                let retries = series
                    .iter()
                    .find(|(l, _)| {
                        l.get("route").map(String::as_str) == Some("dead")
                            && l.get("reason").map(String::as_str) == Some("connect_failure")
                    })
                    .map(|(_, v)| *v)
                    .with_context(context)?;
                ensure!(
                    retries > 0.0 && retries <= 2.0 * dead_rate * 1.25,
                    "{}",
                    context()
                );
            }
            "Retries and timeouts" => {
                let timeouts = value_of(&series, "route", "slow")?;
                near(
                    &context(),
                    timeouts * window,
                    slow_count as f64,
                    slow_count as f64 * 0.25 + 1.0,
                )?;
            }
            "Requests per target virtual node" => {
                let v1_rate = value_of(&series, "target_virtual_node", "app/color-v1")?;
                let v2_rate = value_of(&series, "target_virtual_node", "app/color-v2")?;
                near(
                    &context(),
                    v2_rate / (v1_rate + v2_rate),
                    observed_share,
                    0.03,
                )?;
                // And near the route's weight (10 %): about 600 requests make one standard
                // deviation 1.2 points, so 5 points keeps this from failing by chance.
                near(&context(), v2_rate / (v1_rate + v2_rate), 0.10, 0.05)?;
            }
            "Error ratio and p99 per target virtual node" if expr.contains("quantile") => {
                let slow_p99 = value_of(&series, "target_virtual_node", "app/slow")?;
                ensure!((0.1..=0.5).contains(&slow_p99), "{}", context());
                let v1_p99 = value_of(&series, "target_virtual_node", "app/color-v1")?;
                ensure!(v1_p99 > 0.0 && v1_p99 < 0.1, "{}", context());
            }
            "Error ratio and p99 per target virtual node" => {
                near(
                    &context(),
                    value_of(&series, "target_virtual_node", "app/color-v1")?,
                    0.0,
                    0.0,
                )?;
                near(
                    &context(),
                    value_of(&series, "target_virtual_node", "app/color-v2")?,
                    0.0,
                    0.0,
                )?;
                near(
                    &context(),
                    value_of(&series, "target_virtual_node", "app/slow")?,
                    1.0,
                    0.0,
                )?;
                near(
                    &context(),
                    value_of(&series, "target_virtual_node", "app/dead")?,
                    1.0,
                    0.0,
                )?;
            }
            "Health checks failing / endpoints ejected" if expr.contains("ejected") => {
                near(
                    &context(),
                    value_of(&series, "virtual_node", "app/dead")?,
                    1.0,
                    0.0,
                )?;
            }
            "Health checks failing / endpoints ejected" => {
                // One probe every 5 s.
                let failing = value_of(&series, "virtual_node", "app/dead")?;
                ensure!(failing > 0.0 && failing <= 0.25, "{}", context());
            }
            "TLS failures and eBPF outcomes" if expr.contains("tls") => {
                let no_sni = series
                    .iter()
                    .find(|(l, _)| {
                        l.get("side").map(String::as_str) == Some("server")
                            && l.get("reason").map(String::as_str) == Some("no_server_name")
                    })
                    .map(|(_, v)| *v)
                    .with_context(context)?;
                near(&context(), no_sni * window, 5.0, 1.5)?;
            }
            "TLS failures and eBPF outcomes" => {
                // Every reason is exported, at zero when nothing happened: nothing was denied.
                ensure!(series.len() == 3, "{}", context());
            }
            "TCP connections active" => {
                near(
                    &context(),
                    value_of(&series, "target_virtual_service", "app/echo")?,
                    f64::from(HELD),
                    0.0,
                )?;
            }
            "Refused at the receiving side" if expr.contains("rate_limited") => {
                ensure!(
                    value_of(&series, "virtual_node", "app/limited")? > 0.0,
                    "{}",
                    context()
                );
            }
            "Refused at the receiving side" => {
                ensure!(
                    value_of(&series, "virtual_node", "app/limited")? > 0.0,
                    "{}",
                    context()
                );
            }
            "Rate limited by route (calling side)" => {
                let enforced = series
                    .iter()
                    .find(|(l, _)| {
                        l.get("virtual_router").map(String::as_str) == Some("app/routed")
                            && l.get("route").map(String::as_str) == Some("capped")
                            && l.get("mode").map(String::as_str) == Some("enforced")
                    })
                    .map(|(_, v)| *v)
                    .with_context(context)?;
                near(
                    &context(),
                    enforced * window,
                    route_refused as f64,
                    route_refused as f64 * 0.25 + 1.0,
                )?;
                // Only this route has a limit, and it is enforced.
                ensure!(series.len() == 1, "{}", context());
            }
            "Circuit breakers (calling side)" => {
                ensure!(
                    value_of(&series, "target_virtual_node", "app/limited")? > 0.0,
                    "{}",
                    context()
                );
            }
            "Outlier detection: endpoints ejected" if expr.contains("ejections_total") => {
                let enforced = series
                    .iter()
                    .find(|(l, _)| {
                        l.get("virtual_node").map(String::as_str) == Some("app/dead")
                            && l.get("result").map(String::as_str) == Some("enforced")
                    })
                    .map(|(_, v)| *v)
                    .with_context(context)?;
                // Ejected again each time it comes back: several ejections in the window.
                ensure!(enforced > 0.0, "{}", context());
            }
            "Outlier detection: endpoints ejected" => {
                // Ejected after two failures for 2, 4, 6 ... s: in or out at this instant.
                let ejected = value_of(&series, "virtual_node", "app/dead")?;
                ensure!(ejected == 0.0 || ejected == 1.0, "{}", context());
            }
            other => bail!("the dashboard has a panel this test does not check: {other:?}"),
        }
        checked += 1;
    }
    ensure!(checked >= 16, "only {checked} dashboard queries checked");

    check_rules_in_prometheus(&node, at, expected_error_ratio, observed_share)?;
    drop(prometheus);
    Ok(())
}

fn check_rules_in_prometheus(
    node: &Node,
    at: f64,
    expected_error_ratio: f64,
    observed_share: f64,
) -> anyhow::Result<()> {
    let data = api(node, "/api/v1/rules", &[])?;
    let mut seen = 0;
    for group in data["groups"].as_array().context("groups")? {
        for rule in group["rules"].as_array().context("rules")? {
            let name = rule["name"].as_str().unwrap_or_default();
            let expr = rule["query"].as_str().unwrap_or_default();
            ensure!(
                rule["health"] == "ok",
                "rule {name} is not healthy in Prometheus: {rule}"
            );
            let series = query(node, expr, at)?;
            let context = || format!("rule {name}: {expr} = {series:?}");
            match name {
                "strait:requests:rate1m" => {
                    ensure!(
                        value_of(&series, "target_virtual_service", "app/color")? > 0.0,
                        "{}",
                        context()
                    );
                }
                "strait:target_requests:rate1m" => {
                    let v1 = value_of(&series, "target_virtual_node", "app/color-v1")?;
                    let v2 = value_of(&series, "target_virtual_node", "app/color-v2")?;
                    near(&context(), v2 / (v1 + v2), observed_share, 0.03)?;
                }
                "strait:request_errors:ratio_rate1m" | "StraitHighErrorRate" => {
                    let ratio = value_of(&series, "target_virtual_service", "app/color")?;
                    near(&context(), ratio, expected_error_ratio, 0.03)?;
                }
                "strait:request_duration_seconds:p99_1m" => {
                    let p99 = value_of(&series, "target_virtual_service", "app/color")?;
                    ensure!((0.1..1.0).contains(&p99), "{}", context());
                }
                // p99 is well under a second: the latency alert must not be about to fire.
                "StraitHighLatencyP99" => ensure!(series.is_empty(), "{}", context()),
                "StraitTLSFailures" => ensure!(!series.is_empty(), "{}", context()),
                other => bail!("a shipped rule this test does not check: {other}"),
            }
            // The recorded series exist under their names, computed by Prometheus itself.
            if rule["type"] == "recording" {
                ensure!(
                    !query(node, name, at)?.is_empty(),
                    "Prometheus recorded nothing for {name}"
                );
            }
            seen += 1;
        }
    }
    ensure!(
        seen == 7,
        "expected the 7 shipped rules in Prometheus, saw {seen}"
    );
    // The error-rate alert's expression holds: Prometheus has it pending (its `for` is 5 m).
    let alerts = api(node, "/api/v1/alerts", &[])?;
    let states: Vec<(String, String)> = alerts["alerts"]
        .as_array()
        .context("alerts")?
        .iter()
        .map(|a| {
            (
                a["labels"]["alertname"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                a["state"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    ensure!(
        states.contains(&("StraitHighErrorRate".to_owned(), "pending".to_owned())),
        "alerts: {states:?}"
    );
    ensure!(
        !states
            .iter()
            .any(|(name, _)| name == "StraitHighLatencyP99"),
        "alerts: {states:?}"
    );
    Ok(())
}

fn label_values(node: &Node, label: &str, metric: &str) -> anyhow::Result<Vec<String>> {
    let data = api(
        node,
        &format!("/api/v1/label/{label}/values"),
        &[("match[]", metric)],
    )?;
    Ok(data
        .as_array()
        .context("values")?
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect())
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn wait_for(
    timeout: Duration,
    what: &str,
    mut ready: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        match ready() {
            Ok(true) => return Ok(()),
            Ok(false) => last = "not yet".into(),
            Err(e) => last = format!("{e:#}"),
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    bail!("{what}: not within {timeout:?} ({last})")
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
