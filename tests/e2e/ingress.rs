//! End-to-end tests of ingress: a VirtualGateway whose listeners the node agent serves inside
//! the gateway's pod, and its GatewayRoutes, with App Mesh's matching and rewrite defaults.
//!
//! The client is curl in a network namespace that is not enrolled (it stands for the load
//! balancer in front of the gateway pods) calling the gateway pod's address. The backends are
//! `strait-http` servers that answer with what they received (path, headers), so each test
//! checks what the service saw: which color answered, its path and its host.
//!
//! The manifests are `tests/e2e/ingress/*.yaml`, written like App Mesh's ingress walkthroughs;
//! one test checks that `strait validate` accepts them as one mesh.
//!
//! Needs root (and curl); without them these tests fail with the reason.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use serde_json::Value;
use testbed::agent::{Agent, http_server, metric, strait_binary, strait_ok};
use testbed::scenario::{identity_service_args, peer_node_args};
use testbed::{Node, Pod, PodSpec, Process, Testbed, run};

const HTTP_BIN: &str = env!("CARGO_BIN_EXE_strait-http");
const GATEWAY: &str = "ingress/ingress-gw-1";

/// The walkthrough's manifests: mesh, gateway, routes.
fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e/ingress")
}

struct Reply {
    status: u16,
    body: String,
}

impl Reply {
    /// What the backend saw (its JSON echo).
    fn seen(&self) -> anyhow::Result<Value> {
        serde_json::from_str(&self.body).with_context(|| {
            format!(
                "status {}: not a backend's echo: {:?}",
                self.status, self.body
            )
        })
    }
}

/// curl in `pod`; the status is written after the body by `--write-out`.
fn curl(pod: &Pod, args: &[&str]) -> anyhow::Result<Reply> {
    let output = run(
        pod.command("curl")
            .args(["--silent", "--show-error", "--max-time", "20"])
            .args(["--write-out", "\n%{http_code}"])
            .args(args),
        Duration::from_secs(30),
    )?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, status) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    let status = status.trim().parse().with_context(|| {
        format!(
            "curl {args:?}: unexpected output {stdout:?}, stderr {:?}",
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    Ok(Reply {
        status,
        body: body.to_owned(),
    })
}

/// The backends behind the gateway: one pod per color, each its VirtualNode's.
struct Backends {
    _servers: Vec<Process>,
}

fn backends(tb: &Testbed, node: &Node) -> anyhow::Result<(Backends, Vec<Pod>)> {
    let mut servers = Vec::new();
    let mut pods = Vec::new();
    for (name, namespace) in [
        ("red", "ingress"),
        ("blue", "ingress"),
        ("green", "ingress"),
        ("yellow", "shop"),
    ] {
        let pod = node.add_pod(&PodSpec::new(name, namespace).label("app", name))?;
        tb.dns_record(
            &format!("{name}-v1.{namespace}.svc.cluster.local"),
            &[pod.ipv4().into()],
        )?;
        servers.push(http_server(tb, &pod, 8080, name)?);
        if name == "green" {
            servers.push(http_server(tb, &pod, 8081, "green-8081")?);
        }
        node.write_workload(&pod)?;
        pods.push(pod);
    }
    Ok((Backends { _servers: servers }, pods))
}

struct Bed {
    tb: Testbed,
    _backends: Backends,
    agent: Agent,
    lb: Pod,
    gateway: Pod,
}

/// One node: the gateway pod, the four backends, and `lb` (not enrolled) as the client.
fn bed(test: &str) -> anyhow::Result<Bed> {
    let tb = Testbed::new(test)?;
    let node = tb.add_node("node1")?;
    let gateway =
        node.add_pod(&PodSpec::new("ingress-gw-1", "ingress").label("app", "ingress-gw"))?;
    let lb = node.add_pod(&PodSpec::new("lb", "outside"))?;
    let (backends, _) = backends(&tb, &node)?;
    node.write_workload(&gateway)?;
    let agent = Agent::start(&tb, &node, &fixtures(), &[])?;
    agent.wait_enrolled(GATEWAY, true, Duration::from_secs(20))?;
    for pod in [
        "ingress/red",
        "ingress/blue",
        "ingress/green",
        "shop/yellow",
    ] {
        agent.wait_enrolled(pod, true, Duration::from_secs(20))?;
    }
    Ok(Bed {
        tb,
        _backends: backends,
        agent,
        lb,
        gateway,
    })
}

impl Bed {
    fn url(&self, port: u16, path: &str) -> String {
        format!("http://{}:{port}{path}", self.gateway.ipv4())
    }

    fn get(&self, path: &str, extra: &[&str]) -> anyhow::Result<Reply> {
        let url = self.url(8088, path);
        let mut args: Vec<&str> = extra.to_vec();
        args.push(&url);
        curl(&self.lb, &args)
    }

    /// The request reached `color`; returns what the backend saw.
    fn expect(&self, color: &str, path: &str, extra: &[&str]) -> anyhow::Result<Value> {
        let reply = self.get(path, extra)?;
        ensure!(
            reply.status == 200,
            "{path} {extra:?}: status {} (wanted 200 from {color}): {}; agent log:\n{}",
            reply.status,
            reply.body,
            self.agent.process.stderr()
        );
        let seen = reply.seen()?;
        ensure!(
            seen["name"] == color,
            "{path} {extra:?}: answered by {} (wanted {color}): {seen}",
            seen["name"]
        );
        Ok(seen)
    }

    /// No gateway route matches: the gateway answers 404 itself.
    fn expect_no_route(&self, path: &str, extra: &[&str]) -> anyhow::Result<()> {
        let reply = self.get(path, extra)?;
        ensure!(
            reply.status == 404 && reply.body.contains("no gateway route matches"),
            "{path} {extra:?}: wanted the gateway's 404, got {}: {}",
            reply.status,
            reply.body
        );
        Ok(())
    }
}

#[test]
fn the_walkthrough_manifests_validate_as_one_mesh() -> anyhow::Result<()> {
    let output = std::process::Command::new(strait_binary()?)
        .arg("validate")
        .arg(fixtures())
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(output.status.success(), "strait validate refused: {text}");
    ensure!(
        text.contains("1 VirtualGateway") && text.contains("24 GatewayRoutes"),
        "{text}"
    );
    // A reserved prefix is refused where it is written.
    let tb = Testbed::new("ingress-validate")?;
    let dir = tb.temp_dir().join("mesh");
    std::fs::create_dir_all(&dir)?;
    for file in ["mesh.yaml", "gateway.yaml", "routes.yaml"] {
        std::fs::copy(fixtures().join(file), dir.join(file))?;
    }
    std::fs::write(
        dir.join("reserved.yaml"),
        "apiVersion: appmesh.k8s.aws/v1beta2\nkind: GatewayRoute\nmetadata: {name: reserved, namespace: ingress}\nspec:\n  httpRoute:\n    match: {prefix: /aws-appmesh/stats}\n    action: {target: {virtualService: {virtualServiceRef: {name: red}}}}\n",
    )?;
    let output = std::process::Command::new(strait_binary()?)
        .arg("validate")
        .arg(&dir)
        .output()?;
    let text = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    ensure!(
        !output.status.success(),
        "a reserved prefix was accepted: {text}"
    );
    ensure!(
        text.contains("reserved.yaml:6") && text.contains("spec.httpRoute.match.prefix"),
        "the error does not say where: {text}"
    );
    // Rate limit overrides name clients by their certificate: on a listener that asks for none
    // they could never apply, and are refused where they are written.
    std::fs::remove_file(dir.join("reserved.yaml"))?;
    std::fs::write(
        dir.join("overrides.yaml"),
        "apiVersion: appmesh.k8s.aws/v1beta2\nkind: VirtualGateway\nmetadata: {name: plain-gw, namespace: ingress}\nspec:\n  listeners:\n    - portMapping: {port: 7088, protocol: http}\n      rateLimit:\n        perCaller: {requestsPerSecond: 5}\n        overrides:\n          - callers: [{identity: \"spiffe://ingress-demo/ns/ingress/vn/red\"}]\n            requestsPerSecond: 50\n",
    )?;
    let output = std::process::Command::new(strait_binary()?)
        .arg("validate")
        .arg(&dir)
        .output()?;
    let text = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    ensure!(
        !output.status.success(),
        "overrides without client certificates were accepted: {text}"
    );
    ensure!(
        text.contains("overrides.yaml:9")
            && text.contains("rateLimit.overrides")
            && text.contains("validation"),
        "the error does not say where or what to do: {text}"
    );
    Ok(())
}

#[test]
fn every_gateway_route_match_kind_selects_and_its_negative_does_not() -> anyhow::Result<()> {
    let bed = bed("ingress-match")?;

    // prefix
    bed.expect("red", "/red", &[])?;
    bed.expect_no_route("/rouge", &[])?;
    // path: exact and regex
    bed.expect("green", "/exact", &[])?;
    bed.expect_no_route("/exact/more", &[])?;
    bed.expect("green", "/regex/42", &[])?;
    bed.expect_no_route("/regex/abc", &[])?;
    // headers: exact, prefix, suffix, regex, range, invert; each with a value that fails it
    for (path, good, bad) in [
        ("/h/exact", "x-color: blue", "x-color: blue2"),
        ("/h/prefix", "x-color: blurple", "x-color: red"),
        ("/h/suffix", "x-color: true-blue", "x-color: blues"),
        ("/h/regex", "x-color: blue", "x-color: bblue"),
        ("/h/range", "x-version: 4", "x-version: 5"),
        ("/h/invert", "x-color: blue", "x-color: red"),
    ] {
        bed.expect("blue", path, &["-H", good])?;
        bed.expect_no_route(path, &["-H", bad])?;
    }
    // A missing header matches no value rule, inverted or not (Envoy, as on router routes).
    bed.expect_no_route("/h/exact", &[])?;
    bed.expect_no_route("/h/invert", &[])?;
    // queryParameters
    let seen = bed.expect("green", "/q?color=green&x=1", &[])?;
    ensure!(seen["query"] == "color=green&x=1", "{seen}");
    bed.expect_no_route("/q?color=red", &[])?;
    bed.expect_no_route("/q", &[])?;
    // method
    bed.expect("green", "/m", &["-X", "POST"])?;
    bed.expect_no_route("/m", &[])?;
    // hostname: exact and suffix, with and without the port, case aside
    for host in ["www.example.com", "www.example.com:8088", "WWW.Example.COM"] {
        bed.expect("blue", "/anything", &["-H", &format!("Host: {host}")])?;
    }
    bed.expect_no_route("/anything", &["-H", "Host: api.example.com"])?;
    for host in ["shop.example.org", "a.b.example.org:8088"] {
        bed.expect("green", "/anything", &["-H", &format!("Host: {host}")])?;
    }
    bed.expect_no_route("/anything", &["-H", "Host: example.org.evil"])?;
    // port: the route serves the 9088 listener only
    let reply = curl(&bed.lb, &[&bed.url(9088, "/port/a")])?;
    ensure!(reply.status == 200, "{}: {}", reply.status, reply.body);
    ensure!(reply.seen()?["name"] == "red", "{}", reply.body);
    bed.expect_no_route("/port/a", &[])?;
    // The 9088 listener's rateLimit (1 a second, bursts of 3): a quick run of 8 is cut short
    // with 429; the 8088 listener has no limit (every request above passed).
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(curl(&bed.lb, &[&bed.url(9088, "/port/a")])?.status);
    }
    let limited = statuses.iter().filter(|s| **s == 429).count();
    ensure!(
        limited >= 3 && statuses.iter().all(|s| *s == 200 || *s == 429),
        "rate limit on 9088: {statuses:?}"
    );
    // A refusal says when to come back, as the listeners' rate limits do.
    let reply = curl(&bed.lb, &["--include", &bed.url(9088, "/port/a")])?;
    let head = reply.body.to_ascii_lowercase();
    ensure!(
        reply.status == 429
            && head.contains("retry-after: ")
            && head.contains("x-envoy-ratelimited: true"),
        "a rate-limited request at the gateway: {} {}",
        reply.status,
        reply.body
    );
    // The listeners' healthCheck is answered by the agent, on the limited listener too (a busy
    // gateway is not an unhealthy one).
    for port in [8088, 9088] {
        let reply = curl(&bed.lb, &[&bed.url(port, "/healthz")])?;
        ensure!(
            reply.status == 200 && reply.body.contains("healthy"),
            "health check on {port}: {} {}",
            reply.status,
            reply.body
        );
    }
    // the target's port
    bed.expect("green-8081", "/alt", &[])?;
    // ordering: the longest prefix without priority; a lower priority number over a longer prefix
    bed.expect("blue", "/lp/longer/x", &[])?;
    bed.expect("red", "/lp/x", &[])?;
    bed.expect("red", "/pp/longer/x", &[])?;
    // gatewayRouteSelector and namespaceSelector
    bed.expect("yellow", "/shop", &[])?;
    bed.expect_no_route("/unlabelled", &[])?;
    bed.expect_no_route("/elsewhere", &[])?;
    Ok(())
}

#[test]
fn app_mesh_default_rewrites_apply_unless_disabled_and_explicit_ones_replace_them()
-> anyhow::Result<()> {
    let bed = bed("ingress-rewrite")?;
    let lb_ip = bed.lb.ipv4().to_string();

    // Default: the matched prefix becomes `/`, the host the target virtual service's name.
    let seen = bed.expect(
        "red",
        "/red/chapter/1?x=y",
        &[
            "-H",
            "Host: shop.example.net",
            "-H",
            "x-request-id: outside",
        ],
    )?;
    ensure!(seen["path"] == "/chapter/1", "{seen}");
    ensure!(seen["query"] == "x=y", "{seen}");
    ensure!(
        seen["headers"]["host"] == "red.ingress.svc.cluster.local",
        "{seen}"
    );
    // The edge's forwarding headers: the client's address, http, and a fresh request id.
    ensure!(
        seen["headers"]["x-forwarded-for"] == lb_ip.as_str(),
        "{seen}"
    );
    ensure!(seen["headers"]["x-forwarded-proto"] == "http", "{seen}");
    let id = seen["headers"]["x-request-id"].as_str().unwrap_or("");
    ensure!(id.len() == 36 && id != "outside", "{seen}");
    let seen = bed.expect("red", "/red", &[])?;
    ensure!(seen["path"] == "/", "{seen}");
    // defaultPrefix and defaultTargetHostname DISABLED: path and host as the client sent them.
    let seen = bed.expect("red", "/keep/a/b", &["-H", "Host: shop.example.net:8088"])?;
    ensure!(seen["path"] == "/keep/a/b", "{seen}");
    ensure!(seen["headers"]["host"] == "shop.example.net:8088", "{seen}");
    // prefix.value
    let seen = bed.expect("blue", "/v1/items/7", &[])?;
    ensure!(seen["path"] == "/api/v1/items/7", "{seen}");
    ensure!(
        seen["headers"]["host"] == "blue.ingress.svc.cluster.local",
        "{seen}"
    );
    // path.exact
    let seen = bed.expect("green", "/exact", &[])?;
    ensure!(seen["path"] == "/rewritten", "{seen}");
    // A path match has no prefix to rewrite.
    let seen = bed.expect("green", "/regex/7", &[])?;
    ensure!(seen["path"] == "/regex/7", "{seen}");
    // HTTP/2 (prior knowledge) from the client: the same routes and rewrites.
    let seen = bed.expect("red", "/red/h2", &["--http2-prior-knowledge"])?;
    ensure!(seen["path"] == "/h2", "{seen}");
    Ok(())
}

/// Requests the gateway answered, by an agent's own request log (`strait::request`).
fn served(agent: &Agent) -> usize {
    agent
        .log_lines()
        .iter()
        .filter(|line| line["target"] == "strait::request")
        .count()
}

#[test]
fn gateway_listeners_lose_no_request_across_agent_upgrades() -> anyhow::Result<()> {
    const UPGRADES: usize = 3;
    let bed = bed("ingress-upgrade")?;
    let tb = &bed.tb;
    let node = tb.nodes().into_iter().next().context("node1")?;
    let args = ["--drain-timeout", "1"];
    let stop = tb.temp_dir().join("stop-load");
    let url = bed.url(8088, "/red/load");
    let client = tb.spawn(
        "load",
        bed.lb.command(HTTP_BIN).args([
            "load",
            &url,
            "--concurrency",
            "4",
            "--rate",
            "50",
            "--duration-ms",
            "120000",
            "--timeout",
            "200",
            "--stop-file",
            stop.to_str().context("stop file path")?,
        ]),
    )?;
    std::thread::sleep(Duration::from_millis(700));
    let mut generations = Vec::new();
    let mut agent = bed.agent;
    for upgrade in 1..=UPGRADES {
        ensure!(
            client.try_wait()?.is_none(),
            "the load ended before upgrade {upgrade}: {} {}",
            client.stdout(),
            client.stderr()
        );
        let new = Agent::start(tb, &node, &fixtures(), &args)?;
        let status = agent
            .process
            .wait_timeout(Duration::from_secs(15))
            .with_context(|| format!("upgrade {upgrade}: the old agent did not drain and exit"))?;
        ensure!(status.success(), "upgrade {upgrade}: {status}");
        generations.push(agent);
        agent = new;
        std::thread::sleep(Duration::from_millis(700));
    }
    std::fs::write(&stop, b"")?;
    client.wait_timeout(Duration::from_secs(30))?;
    generations.push(agent);
    let report: Value = serde_json::from_str(client.stdout().trim()).with_context(|| {
        format!(
            "the load client printed no JSON report: {:?} {:?}",
            client.stdout(),
            client.stderr()
        )
    })?;
    let by_generation: Vec<usize> = generations.iter().map(served).collect();
    ensure!(
        report["failed"] == 0 && report["completed"].as_u64().unwrap_or(0) > 0,
        "no request may fail across {UPGRADES} upgrades: {report}"
    );
    ensure!(
        report["statuses"]["200"] == report["completed"],
        "every request was routed: {report}"
    );
    ensure!(
        by_generation.iter().all(|n| *n > 0),
        "every agent generation served the gateway ({by_generation:?}): the load crossed each upgrade"
    );
    Ok(())
}

const GRPC_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/grpc/color_grpc.py");

/// A gateway whose listeners terminate TLS at the edge (STRICT, PERMISSIVE, STRICT with client
/// certificates), speak http2 and gRPC, and log each request, in front of services on another
/// node whose listeners take only mutual TLS from the gateway's identity.
fn tls_mesh(certs: &Path, logs: &Path) -> String {
    let c = certs.display();
    let logs = logs.display();
    let gw_id = "spiffe://ingress-tls/ns/ingress/vg/ingress-gw";
    let upstream_tls = |name: &str| {
        format!(
            r#"      tls:
        mode: STRICT
        certificate: {{file: {{certificateChain: {c}/{name}.pem, privateKey: {c}/{name}-key.pem}}}}
        validation:
          trust: {{file: {{certificateChain: {c}/ca-bundle.pem}}}}
          subjectAlternativeNames: {{match: {{exact: [{gw_id}]}}}}"#
        )
    };
    let edge_cert = format!(
        "certificate: {{file: {{certificateChain: {c}/gw.pem, privateKey: {c}/gw-key.pem}}}}"
    );
    format!(
        r#"apiVersion: appmesh.k8s.aws/v1beta2
kind: Mesh
metadata: {{name: ingress-tls}}
spec: {{egressFilter: {{type: DROP_ALL}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: red, namespace: ingress}}
spec:
  podSelector: {{matchLabels: {{app: red}}}}
  listeners:
    - portMapping: {{port: 8080, protocol: http}}
{red_tls}
  serviceDiscovery: {{dns: {{hostname: red-v1.ingress.svc.cluster.local, responseType: ENDPOINTS}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: rpc, namespace: ingress}}
spec:
  podSelector: {{matchLabels: {{app: rpc}}}}
  listeners:
    - portMapping: {{port: 50051, protocol: grpc}}
{rpc_tls}
  serviceDiscovery: {{dns: {{hostname: rpc-v1.ingress.svc.cluster.local, responseType: ENDPOINTS}}}}
---
# No pods: `strait ca issue` mints the certificate an outside client presents at the edge.
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: edge-client, namespace: ingress}}
spec:
  backendDefaults:
    clientPolicy:
      tls:
        certificate: {{file: {{certificateChain: {c}/edge-client.pem, privateKey: {c}/edge-client-key.pem}}}}
        validation: {{trust: {{file: {{certificateChain: {c}/ca-bundle.pem}}}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: edge-other, namespace: ingress}}
spec:
  backendDefaults:
    clientPolicy:
      tls:
        certificate: {{file: {{certificateChain: {c}/edge-other.pem, privateKey: {c}/edge-other-key.pem}}}}
        validation: {{trust: {{file: {{certificateChain: {c}/ca-bundle.pem}}}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {{name: red, namespace: ingress}}
spec:
  awsName: red.ingress.svc.cluster.local
  provider: {{virtualNode: {{virtualNodeRef: {{name: red}}}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {{name: rpc, namespace: ingress}}
spec:
  awsName: rpc.ingress.svc.cluster.local
  provider: {{virtualNode: {{virtualNodeRef: {{name: rpc}}}}}}
---
# The same pods as red, for the connectionPool check alone.
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {{name: slow, namespace: ingress}}
spec:
  awsName: slow.ingress.svc.cluster.local
  provider: {{virtualNode: {{virtualNodeRef: {{name: red}}}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualGateway
metadata: {{name: ingress-gw, namespace: ingress}}
spec:
  podSelector: {{matchLabels: {{app: ingress-gw}}}}
  listeners:
    - portMapping: {{port: 8443, protocol: http}}
      tls: {{mode: STRICT, {edge_cert}}}
    - portMapping: {{port: 8444, protocol: http}}
      tls: {{mode: PERMISSIVE, {edge_cert}}}
    - portMapping: {{port: 8445, protocol: http}}
      tls:
        mode: STRICT
        {edge_cert}
        validation: {{trust: {{file: {{certificateChain: {c}/ca-bundle.pem}}}}}}
    # Clients with certificates, limited each by its own (strait extension): edge-client may
    # send 4 at once, any other client 1.
    - portMapping: {{port: 8446, protocol: http}}
      tls:
        mode: STRICT
        {edge_cert}
        validation: {{trust: {{file: {{certificateChain: {c}/ca-bundle.pem}}}}}}
      rateLimit:
        perCaller: {{requestsPerSecond: 1, burst: 1}}
        overrides:
          - callers: [{{virtualNodeRef: {{name: edge-client}}}}]
            requestsPerSecond: 1
            burst: 4
    - portMapping: {{port: 9090, protocol: grpc}}
    - portMapping: {{port: 8090, protocol: http2}}
      connectionPool: {{http2: {{maxRequests: 1}}}}
  logging:
    accessLog:
      file:
        path: {logs}/gateway.log
        format: {{text: "%ROUTE_NAME% %RESPONSE_CODE% %UPSTREAM_CLUSTER%\n"}}
  backendDefaults:
    clientPolicy:
      tls:
        certificate: {{file: {{certificateChain: {c}/gw-client.pem, privateKey: {c}/gw-client-key.pem}}}}
        validation: {{trust: {{file: {{certificateChain: {c}/ca-bundle.pem}}}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: GatewayRoute
metadata: {{name: red, namespace: ingress}}
spec:
  httpRoute:
    match: {{prefix: /red, hostname: {{exact: www.example.com}}}}
    action: {{target: {{virtualService: {{virtualServiceRef: {{name: red}}}}}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: GatewayRoute
metadata: {{name: slow, namespace: ingress}}
spec:
  http2Route:
    match: {{prefix: /slow/}}
    action: {{target: {{virtualService: {{virtualServiceRef: {{name: slow}}}}}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: GatewayRoute
metadata: {{name: red-h2, namespace: ingress}}
spec:
  http2Route:
    match: {{prefix: /h2/}}
    action: {{target: {{virtualService: {{virtualServiceRef: {{name: red}}}}}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: GatewayRoute
metadata: {{name: color, namespace: ingress}}
spec:
  grpcRoute:
    match: {{serviceName: color.Color}}
    action: {{target: {{virtualService: {{virtualServiceRef: {{name: rpc}}}}}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: GatewayRoute
metadata: {{name: rpc-host, namespace: ingress}}
spec:
  grpcRoute:
    match:
      hostname: {{exact: rpc.example.com}}
      metadata: [{{name: x-pass, match: {{exact: "yes"}}}}]
    action: {{target: {{virtualService: {{virtualServiceRef: {{name: rpc}}}}}}}}
"#,
        red_tls = upstream_tls("red"),
        rpc_tls = upstream_tls("rpc"),
    )
}

#[test]
fn tls_at_the_edge_and_grpc_reach_services_on_another_node_over_mutual_tls() -> anyhow::Result<()> {
    let python = testbed::python_with_grpcio()?;
    let tb = Testbed::new("ingress-tls")?;
    let node1 = tb.add_node("node1")?;
    let node2 = tb.add_node("node2")?;
    let gateway =
        node1.add_pod(&PodSpec::new("ingress-gw-1", "ingress").label("app", "ingress-gw"))?;
    let lb = node1.add_pod(&PodSpec::new("lb", "outside"))?;
    let red = node2.add_pod(&PodSpec::new("red", "ingress").label("app", "red"))?;
    let rpc = node2.add_pod(&PodSpec::new("rpc", "ingress").label("app", "rpc"))?;
    tb.dns_record("red-v1.ingress.svc.cluster.local", &[red.ipv4().into()])?;
    tb.dns_record("rpc-v1.ingress.svc.cluster.local", &[rpc.ipv4().into()])?;
    let _red_server = http_server(&tb, &red, 8080, "red")?;
    let _rpc_server = tb.spawn(
        "grpc-rpc",
        rpc.command(&python)
            .args([GRPC_SCRIPT, "serve", "--port", "50051", "--name", "rpc"]),
    )?;
    _rpc_server.wait_listening(50051, Duration::from_secs(20))?;

    let certs = tb.temp_dir().join("certs");
    let ca = tb.temp_dir().join("ca");
    let mesh = tb.temp_dir().join("mesh").join("mesh.yaml");
    std::fs::create_dir_all(mesh.parent().context("mesh folder")?)?;
    let logs = tb.temp_dir().join("logs");
    std::fs::write(&mesh, tls_mesh(&certs, &logs))?;
    strait_ok(&node1, &["ca", "init", "--dir", &ca.display().to_string()])?;
    let issued = strait_ok(
        &node1,
        &[
            "ca",
            "issue",
            "--mesh",
            &mesh.display().to_string(),
            "--ca-dir",
            &ca.display().to_string(),
        ],
    )?;
    ensure!(
        issued.contains("www.example.com") && issued.contains("rpc.example.com"),
        "the gateway's certificate names the hosts its routes match: {issued}"
    );
    node1.write_workload(&gateway)?;
    node2.write_workload(&red)?;
    node2.write_workload(&rpc)?;
    let nodes = [&node1, &node2];
    let start = |node: &Node| -> anyhow::Result<Agent> {
        let mut args = peer_node_args(
            nodes.iter().copied().filter(|n| n.index() != node.index()),
            false,
        );
        args.push("--access-log-dir".into());
        args.push(logs.display().to_string());
        Agent::start(
            &tb,
            node,
            &mesh,
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        )
    };
    let agent1 = start(&node1)?;
    let agent2 = start(&node2)?;
    agent1.wait_enrolled(GATEWAY, true, Duration::from_secs(20))?;
    agent2.wait_enrolled("ingress/red", true, Duration::from_secs(20))?;
    agent2.wait_enrolled("ingress/rpc", true, Duration::from_secs(20))?;

    let gw = gateway.ipv4().to_string();
    let ca_pem = ca.join("ca.pem").display().to_string();
    let https = |port: u16, path: &str, extra: &[&str]| -> anyhow::Result<Reply> {
        let resolve = format!("www.example.com:{port}:{gw}");
        let url = format!("https://www.example.com:{port}{path}");
        let mut args = vec!["--cacert", ca_pem.as_str(), "--resolve", resolve.as_str()];
        args.extend_from_slice(extra);
        args.push(&url);
        curl(&lb, &args)
    };
    let expect_red = |reply: Reply, what: &str, proto: &str| -> anyhow::Result<()> {
        ensure!(
            reply.status == 200,
            "{what}: status {}: {}; gateway agent:\n{}\nservice agent:\n{}",
            reply.status,
            reply.body,
            agent1.process.stderr(),
            agent2.process.stderr()
        );
        let seen = reply.seen()?;
        ensure!(
            seen["name"] == "red" && seen["path"] == "/x",
            "{what}: {seen}"
        );
        ensure!(
            seen["headers"]["x-forwarded-proto"] == proto,
            "{what}: {seen}"
        );
        Ok(())
    };

    // STRICT: the certificate is checked by curl against the CA; to red on node2, whose
    // listener takes only mutual TLS from the gateway's identity (the tunnel).
    expect_red(https(8443, "/red/x", &[])?, "https on STRICT", "https")?;
    let streams = metric(&agent2, "strait_tunnel_streams", &["direction=\"inbound\""])?;
    ensure!(
        streams >= 1.0,
        "the request did not arrive through the tunnel ({streams} streams)"
    );
    let plain = curl(
        &lb,
        &[
            "-H",
            "Host: www.example.com",
            &format!("http://{gw}:8443/red/x"),
        ],
    )?;
    ensure!(
        plain.status != 200,
        "plaintext on a STRICT listener: {}",
        plain.body
    );
    // HTTP/2 over TLS (ALPN h2).
    expect_red(
        https(8443, "/red/x", &["--http2"])?,
        "h2 on STRICT",
        "https",
    )?;
    // PERMISSIVE: both.
    expect_red(https(8444, "/red/x", &[])?, "https on PERMISSIVE", "https")?;
    let plain = curl(
        &lb,
        &[
            "-H",
            "Host: www.example.com",
            &format!("http://{gw}:8444/red/x"),
        ],
    )?;
    expect_red(plain, "http on PERMISSIVE", "http")?;
    // Client certificate validation: refused without one, served with one from the CA.
    let refused = https(8445, "/red/x", &[])?;
    ensure!(
        refused.status != 200,
        "no client certificate: {}",
        refused.body
    );
    let cert = certs.join("edge-client.pem").display().to_string();
    let key = certs.join("edge-client-key.pem").display().to_string();
    expect_red(
        https(8445, "/red/x", &["--cert", &cert, "--key", &key])?,
        "https with a client certificate",
        "https",
    )?;
    // The wrong host for the route: no route, and the certificate does not name it either.
    let other = curl(
        &lb,
        &[
            "--cacert",
            &ca_pem,
            "--resolve",
            &format!("api.example.com:8443:{gw}"),
            "https://api.example.com:8443/red/x",
        ],
    )?;
    ensure!(other.status != 200, "{}", other.body);
    // Per-route metrics and access log lines, with the gateway as the reporter.
    let routed = metric(
        &agent1,
        "strait_gateway_requests_total",
        &[
            "virtual_gateway=\"ingress/ingress-gw\"",
            "gateway_route=\"ingress/red\"",
            "response_code_class=\"2xx\"",
        ],
    )?;
    // Five served: STRICT (HTTP/1.1 and h2), PERMISSIVE (both), with a client certificate.
    ensure!(
        routed == 5.0,
        "gateway route ingress/red answered {routed} requests, not 5"
    );
    testbed::eventually(Duration::from_secs(10), "the gateway's access log", || {
        let log = std::fs::read_to_string(logs.join("gateway.log")).unwrap_or_default();
        Ok(log
            .lines()
            .filter(|l| *l == "ingress/red 200 ingress/red")
            .count()
            == 5)
    })?;

    // The rate limit of a listener that validates client certificates: each certificate is a
    // client, and edge-client's override (burst 4) is its own; edge-other has perCaller's
    // (burst 1). One a second refills at most one more within each run.
    let limited = |name: &str, n: usize| -> anyhow::Result<Vec<u16>> {
        let cert = certs.join(format!("{name}.pem")).display().to_string();
        let key = certs.join(format!("{name}-key.pem")).display().to_string();
        (0..n)
            .map(|_| Ok(https(8446, "/red/x", &["--cert", &cert, "--key", &key])?.status))
            .collect()
    };
    let vip = limited("edge-client", 6)?;
    let other = limited("edge-other", 3)?;
    let count = |got: &[u16], status: u16| got.iter().filter(|s| **s == status).count();
    ensure!(
        (4..=5).contains(&count(&vip, 200)) && count(&vip, 200) + count(&vip, 429) == 6,
        "edge-client's override (burst 4): {vip:?}; gateway agent:\n{}",
        agent1.process.stderr()
    );
    ensure!(
        (1..=2).contains(&count(&other, 200)) && count(&other, 200) + count(&other, 429) == 3,
        "edge-other's own bucket (burst 1), apart from edge-client's: {other:?}"
    );
    // Counted by the client's virtual node (its certificate's) and the bucket it ran out of.
    for (source, scope, seen) in [
        ("ingress/edge-client", "override", count(&vip, 429)),
        ("ingress/edge-other", "caller", count(&other, 429)),
    ] {
        let counted = metric(
            &agent1,
            "strait_rate_limited_total",
            &[
                "virtual_node=\"ingress/ingress-gw\"",
                &format!("source_virtual_node=\"{source}\""),
                &format!("scope=\"{scope}\""),
            ],
        )?;
        ensure!(
            counted == seen as f64,
            "{source}: strait_rate_limited counted {counted}, the client saw {seen} refusals"
        );
    }

    // An http2 listener serves http2Routes (the httpRoute above is not its), to an http
    // service: HTTP/2 from the client, HTTP/1.1 to red.
    let h2 = curl(
        &lb,
        &["--http2-prior-knowledge", &format!("http://{gw}:8090/h2/x")],
    )?;
    ensure!(
        h2.status == 200,
        "http2 listener: {}: {}",
        h2.status,
        h2.body
    );
    let seen = h2.seen()?;
    ensure!(seen["name"] == "red" && seen["path"] == "/x", "{seen}");
    let h2 = curl(
        &lb,
        &[
            "--http2-prior-knowledge",
            "-H",
            "Host: www.example.com",
            &format!("http://{gw}:8090/red/x"),
        ],
    )?;
    ensure!(
        h2.status == 404,
        "an httpRoute on an http2 listener: {}",
        h2.body
    );

    // The http2 listener's connectionPool (maxRequests: 1) bounds what the gateway sends on:
    // of 3 concurrent slow requests, the ones past the first overflow with 503 (UO).
    let report = run(
        lb.command(HTTP_BIN).args([
            "load",
            &format!("http://{gw}:8090/slow/x?delay_ms=1500"),
            "--http2",
            "--count",
            "3",
            "--concurrency",
            "3",
        ]),
        Duration::from_secs(60),
    )?;
    let report: Value = serde_json::from_slice(&report.stdout)
        .with_context(|| format!("load report: {:?}", String::from_utf8_lossy(&report.stdout)))?;
    let ok = report["statuses"]["200"].as_u64().unwrap_or(0);
    let overflow = report["statuses"]["503"].as_u64().unwrap_or(0);
    ensure!(
        ok >= 1 && overflow >= 1 && ok + overflow == 3,
        "connectionPool maxRequests 1: {report}"
    );
    let overflows = metric(
        &agent1,
        "strait_circuit_breaker_overflows_total",
        &["source_virtual_node=\"ingress/ingress-gw\""],
    )?;
    ensure!(
        overflows == overflow as f64,
        "the 503s were the gateway's connectionPool: {overflows} overflows counted, {report}"
    );

    // gRPC: serviceName, and hostname + metadata.
    let grpc = |args: &[&str]| -> anyhow::Result<Value> {
        let target = format!("{gw}:9090");
        let output = run(
            lb.command(&python)
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
    let report = grpc(&["--unary", "10", "--bidi", "10"])?;
    ensure!(
        report["ok"] == true && report["unary"]["rpc"] == 10 && report["bidi"]["rpc"] == 10,
        "{report}; gateway agent:\n{}",
        agent1.process.stderr()
    );
    // Another service: no gateway route (the gateway answers UNIMPLEMENTED itself)...
    let report = grpc(&["--method", "/other.Service/Call"])?;
    ensure!(
        report["code"] == "UNIMPLEMENTED"
            && report["details"]
                .as_str()
                .is_some_and(|d| d.contains("no gateway route")),
        "{report}"
    );
    // ...unless the hostname and metadata route takes it: then the server answers (it has
    // no such method).
    let report = grpc(&[
        "--method",
        "/other.Service/Call",
        "--authority",
        "rpc.example.com",
        "--metadata",
        "x-pass=yes",
    ])?;
    ensure!(
        report["code"] == "UNIMPLEMENTED"
            && !report["details"]
                .as_str()
                .unwrap_or("")
                .contains("no gateway route"),
        "{report}"
    );
    let report = grpc(&[
        "--method",
        "/other.Service/Call",
        "--authority",
        "rpc.example.com",
        "--metadata",
        "x-pass=no",
    ])?;
    ensure!(
        report["details"]
            .as_str()
            .is_some_and(|d| d.contains("no gateway route")),
        "{report}"
    );
    Ok(())
}

/// A gateway with a listener for each `healthCheck` form (`http`, `http2`, `grpc`; App Mesh
/// has no `tcp` check on gateways) on its own port, another listener's and a health port, and
/// a listener limited per client.
const HEALTH_MESH: &str = r#"apiVersion: appmesh.k8s.aws/v1beta2
kind: Mesh
metadata: {name: ingress-health}
spec: {egressFilter: {type: DROP_ALL}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {name: red, namespace: ingress}
spec:
  podSelector: {matchLabels: {app: red}}
  listeners:
    - portMapping: {port: 8080, protocol: http}
  serviceDiscovery: {dns: {hostname: red-v1.ingress.svc.cluster.local, responseType: ENDPOINTS}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {name: red, namespace: ingress}
spec:
  awsName: red.ingress.svc.cluster.local
  provider: {virtualNode: {virtualNodeRef: {name: red}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualGateway
metadata: {name: ingress-gw, namespace: ingress}
spec:
  podSelector: {matchLabels: {app: ingress-gw}}
  listeners:
    - portMapping: {port: 8088, protocol: http}
      healthCheck: {protocol: http, port: 8089, path: /ready, healthyThreshold: 2, unhealthyThreshold: 2, intervalMillis: 5000, timeoutMillis: 2000}
    - portMapping: {port: 8090, protocol: http2}
      healthCheck: {protocol: http2, port: 8091, path: /h2ready, healthyThreshold: 2, unhealthyThreshold: 2, intervalMillis: 5000, timeoutMillis: 2000}
    - portMapping: {port: 8092, protocol: http}
      # Checked on another listener's port: that listener answers it.
      healthCheck: {protocol: http, port: 8088, path: /ready-8092, healthyThreshold: 2, unhealthyThreshold: 2, intervalMillis: 5000, timeoutMillis: 2000}
    - portMapping: {port: 9090, protocol: grpc}
      healthCheck: {protocol: grpc, healthyThreshold: 2, unhealthyThreshold: 2, intervalMillis: 5000, timeoutMillis: 2000}
    - portMapping: {port: 9092, protocol: grpc}
      healthCheck: {protocol: grpc, port: 9093, healthyThreshold: 2, unhealthyThreshold: 2, intervalMillis: 5000, timeoutMillis: 2000}
    - portMapping: {port: 8094, protocol: http}
      healthCheck: {protocol: http, path: /live, healthyThreshold: 2, unhealthyThreshold: 2, intervalMillis: 5000, timeoutMillis: 2000}
      # strait extension: each client address 2 requests at once, then 1 a second.
      rateLimit: {perCaller: {requestsPerSecond: 1, burst: 2}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: GatewayRoute
metadata: {name: red, namespace: ingress}
spec:
  httpRoute:
    match: {prefix: /red}
    action: {target: {virtualService: {virtualServiceRef: {name: red}}}}
"#;

/// Does a TCP connect from `pod` to `addr:port` succeed (what a load balancer's tcp check
/// does)? Python's socket module: a real connect, nothing sent.
fn tcp_connects(pod: &Pod, addr: &str, port: u16) -> anyhow::Result<bool> {
    let script = format!(
        "import socket\ntry:\n    socket.create_connection(('{addr}', {port}), timeout=5).close()\n    print('open')\nexcept OSError as e:\n    print('closed', e)\n"
    );
    let output = run(
        pod.command("python3").args(["-c", &script]),
        Duration::from_secs(20),
    )?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        stdout.starts_with("open") || stdout.starts_with("closed"),
        "tcp check of {addr}:{port}: {stdout:?} {:?}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(stdout.starts_with("open"))
}

#[test]
fn every_health_check_form_is_answered_and_clients_are_limited_each_by_its_address()
-> anyhow::Result<()> {
    let python = testbed::python_with_grpcio()?;
    let tb = Testbed::new("ingress-health")?;
    let node = tb.add_node("node1")?;
    let gateway =
        node.add_pod(&PodSpec::new("ingress-gw-1", "ingress").label("app", "ingress-gw"))?;
    let lb = node.add_pod(&PodSpec::new("lb", "outside"))?;
    let lb2 = node.add_pod(&PodSpec::new("lb2", "outside"))?;
    let red = node.add_pod(&PodSpec::new("red", "ingress").label("app", "red"))?;
    tb.dns_record("red-v1.ingress.svc.cluster.local", &[red.ipv4().into()])?;
    let _red_server = http_server(&tb, &red, 8080, "red")?;
    let mesh = tb.temp_dir().join("mesh").join("mesh.yaml");
    std::fs::create_dir_all(mesh.parent().context("mesh folder")?)?;
    std::fs::write(&mesh, HEALTH_MESH)?;
    node.write_workload(&gateway)?;
    node.write_workload(&red)?;
    let agent = Agent::start(&tb, &node, &mesh, &[])?;
    agent.wait_enrolled(GATEWAY, true, Duration::from_secs(20))?;
    agent.wait_enrolled("ingress/red", true, Duration::from_secs(20))?;
    let gw = gateway.ipv4().to_string();
    let url = |port: u16, path: &str| format!("http://{gw}:{port}{path}");
    let healthy = |reply: &Reply, what: &str| -> anyhow::Result<()> {
        ensure!(
            reply.status == 200 && reply.body.trim() == "healthy",
            "{what}: {} {:?}; agent log:\n{}",
            reply.status,
            reply.body,
            agent.process.stderr()
        );
        Ok(())
    };

    // http on a health port: GET and HEAD of the path; nothing else is answered there.
    healthy(&curl(&lb, &[&url(8089, "/ready")])?, "http check on 8089")?;
    let head = curl(&lb, &["--head", &url(8089, "/ready")])?;
    ensure!(head.status == 200, "HEAD /ready: {}", head.status);
    let other = curl(&lb, &[&url(8089, "/red")])?;
    ensure!(
        other.status == 404,
        "a health port routes nothing: {} {}",
        other.status,
        other.body
    );
    // ...while the listener itself routes (and does not answer the check's path).
    let routed = curl(&lb, &[&url(8088, "/red/x")])?;
    ensure!(
        routed.status == 200 && routed.seen()?["name"] == "red",
        "the listener beside its health port: {} {}",
        routed.status,
        routed.body
    );
    // http2 on a health port, HTTP/2 with prior knowledge as a load balancer's h2 check.
    healthy(
        &curl(&lb, &["--http2-prior-knowledge", &url(8091, "/h2ready")])?,
        "http2 check on 8091",
    )?;
    // A check on another listener's port is answered by that listener.
    healthy(
        &curl(&lb, &[&url(8088, "/ready-8092")])?,
        "8092's check on 8088",
    )?;
    // The health ports are the checks' only: a port with neither a listener nor a check
    // refuses connections.
    ensure!(tcp_connects(&lb, &gw, 8089)?, "health port 8089");
    ensure!(
        !tcp_connects(&lb, &gw, 8095)?,
        "a port with no listener and no check accepted a connection"
    );
    // grpc: grpc.health.v1.Health/Check on the listener's port and on a health port: SERVING
    // for the server ("" service); another service name is unknown to the gateway.
    let grpc_health = |port: u16, service: &str| -> anyhow::Result<Value> {
        let output = run(
            lb.command(&python).args([
                GRPC_SCRIPT,
                "health",
                "--target",
                &format!("{gw}:{port}"),
                "--service",
                service,
            ]),
            Duration::from_secs(30),
        )?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        serde_json::from_str(stdout.trim()).with_context(|| {
            format!(
                "gRPC health client printed no report: {stdout:?}, stderr {:?}",
                String::from_utf8_lossy(&output.stderr)
            )
        })
    };
    for port in [9090, 9093] {
        let report = grpc_health(port, "")?;
        ensure!(
            report["code"] == "OK" && report["status"] == "SERVING",
            "grpc check on {port}: {report}; agent log:\n{}",
            agent.process.stderr()
        );
        let report = grpc_health(port, "color.Color")?;
        ensure!(
            report["code"] == "NOT_FOUND",
            "grpc check of a named service on {port}: {report}"
        );
    }
    // A grpc listener with no grpc check of its own (9092's is on 9093) routes the call: no
    // gateway route for it.
    let report = grpc_health(9092, "")?;
    ensure!(
        report["code"] == "UNIMPLEMENTED",
        "grpc check on 9092 (its check is on 9093): {report}"
    );

    // perCaller at the edge: each client address has its own bucket (burst 2).
    let statuses = |pod: &Pod, n: usize| -> anyhow::Result<Vec<u16>> {
        (0..n)
            .map(|_| Ok(curl(pod, &[&url(8094, "/red/x")])?.status))
            .collect()
    };
    let first = statuses(&lb, 4)?;
    let second = statuses(&lb2, 4)?;
    for (who, got) in [("lb", &first), ("lb2", &second)] {
        let ok = got.iter().filter(|s| **s == 200).count();
        let limited = got.iter().filter(|s| **s == 429).count();
        // 1 a second refills at most one more within the run.
        ensure!(
            (2..=3).contains(&ok) && ok + limited == 4,
            "client {who} on the per-client limited listener: {got:?} (lb: {first:?})"
        );
    }
    let reply = curl(&lb, &["--include", &url(8094, "/red/x")])?;
    ensure!(
        reply.status == 429 && reply.body.contains("rateLimit, caller"),
        "a client over its own bucket: {} {}",
        reply.status,
        reply.body
    );
    // The limited listener's own check is still answered: a busy gateway is not unhealthy.
    healthy(&curl(&lb, &[&url(8094, "/live")])?, "8094's check")?;
    // Each refusal is counted, with the gateway as the limited listener's owner.
    let refused = first.iter().chain(&second).filter(|s| **s == 429).count() + 1;
    let counted = metric(
        &agent,
        "strait_rate_limited_total",
        &[
            "virtual_node=\"ingress/ingress-gw\"",
            "scope=\"caller\"",
            "mode=\"enforced\"",
        ],
    )?;
    ensure!(
        counted == refused as f64,
        "strait_rate_limited counted {counted} refusals at the gateway, the clients saw {refused}"
    );

    // Checks are answered while the agent serves the gateway pod: a pod that is no longer the
    // gateway's has none, so the load balancer takes it out.
    node.remove_workload(&gateway)?;
    testbed::eventually(
        Duration::from_secs(20),
        "the released gateway pod's health ports close",
        || Ok(!tcp_connects(&lb, &gw, 8089)? && curl(&lb, &[&url(9090, "/")])?.status == 0),
    )?;
    Ok(())
}

/// On Kubernetes the gateway pods come from the API server like any pod (`strait run
/// --kubernetes`; here the test API server, `testbed::kubeapi`, the one test double): a pod
/// the VirtualGateway's `podSelector` selects gets the gateway's listeners and health port
/// once the API lists it on this node, and loses them when it is deleted.
#[test]
fn a_gateway_pod_from_the_kubernetes_api_is_served_and_released_when_deleted() -> anyhow::Result<()>
{
    let tb = Testbed::new("ingress-k8s")?;
    let node = tb.add_node("node1")?;
    let gateway =
        node.add_pod(&PodSpec::new("ingress-gw-1", "ingress").label("app", "ingress-gw"))?;
    let red = node.add_pod(&PodSpec::new("red", "ingress").label("app", "red"))?;
    let lb = node.add_pod(&PodSpec::new("lb", "outside"))?;
    // The sandboxes first: each pod's oldest process, as on a real node.
    let _sandboxes = [&gateway, &red]
        .into_iter()
        .map(|pod| tb.start_sandbox(pod))
        .collect::<anyhow::Result<Vec<_>>>()?;
    tb.dns_record("red-v1.ingress.svc.cluster.local", &[red.ipv4().into()])?;
    let _red_server = http_server(&tb, &red, 8080, "red")?;
    let api = testbed::kubeapi::KubeApi::new()?;
    let addr = api.serve_in(&node)?;
    let kubeconfig = api.kubeconfig(addr, tb.temp_dir())?;
    api.apply(testbed::kubeapi::node_object(&node))?;
    api.apply(testbed::kubeapi::namespace_object("ingress", &[]))?;
    api.apply(testbed::kubeapi::pod_object(&red))?;
    let mesh = tb.temp_dir().join("mesh.yaml");
    std::fs::write(&mesh, HEALTH_MESH)?;
    let agent = Agent::start_kubernetes(&tb, &node, &mesh, &kubeconfig, &[])?;
    agent.wait_enrolled("ingress/red", true, Duration::from_secs(20))?;
    let gw = gateway.ipv4().to_string();
    let url = |port: u16, path: &str| format!("http://{gw}:{port}{path}");

    // Not in the API yet: nothing listens in the gateway pod.
    let before = curl(&lb, &[&url(8088, "/red/x")])?;
    ensure!(
        before.status == 0,
        "a gateway pod the API does not list was served: {} {}",
        before.status,
        before.body
    );

    api.apply(testbed::kubeapi::pod_object(&gateway))?;
    agent.wait_enrolled(GATEWAY, true, Duration::from_secs(20))?;
    let reply = curl(&lb, &[&url(8088, "/red/x")])?;
    ensure!(
        reply.status == 200 && reply.seen()?["name"] == "red",
        "the gateway pod from the API: {} {}; agent log:\n{}",
        reply.status,
        reply.body,
        agent.process.stderr()
    );
    let health = curl(&lb, &[&url(8089, "/ready")])?;
    ensure!(
        health.status == 200,
        "its health port: {} {}",
        health.status,
        health.body
    );

    api.delete(testbed::kubeapi::Kind::Pod, "ingress", "ingress-gw-1")?;
    agent.wait_enrolled(GATEWAY, false, Duration::from_secs(20))?;
    testbed::eventually(
        Duration::from_secs(20),
        "the deleted gateway pod's listeners close",
        || Ok(curl(&lb, &[&url(8088, "/red/x")])?.status == 0),
    )?;
    Ok(())
}

const SDS_MESH: &str = r#"apiVersion: appmesh.k8s.aws/v1beta2
kind: Mesh
metadata: {name: ingress-sds}
spec: {egressFilter: {type: DROP_ALL}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {name: red, namespace: ingress}
spec:
  podSelector: {matchLabels: {app: red}}
  listeners:
    - portMapping: {port: 8080, protocol: http}
  serviceDiscovery: {dns: {hostname: red-v1.ingress.svc.cluster.local, responseType: ENDPOINTS}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {name: red, namespace: ingress}
spec:
  awsName: red.ingress.svc.cluster.local
  provider: {virtualNode: {virtualNodeRef: {name: red}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualGateway
metadata: {name: ingress-gw, namespace: ingress}
spec:
  podSelector: {matchLabels: {app: ingress-gw}}
  listeners:
    - portMapping: {port: 8443, protocol: http}
      tls:
        mode: STRICT
        certificate: {sds: {secretName: "spiffe://ingress-sds/ns/ingress/vg/ingress-gw"}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: GatewayRoute
metadata: {name: red, namespace: ingress}
spec:
  httpRoute:
    match: {prefix: /red, hostname: {exact: www.example.com}}
    action: {target: {virtualService: {virtualServiceRef: {name: red}}}}
"#;

/// A gateway listener's `sds` certificate comes from the identity service (`strait ca serve`,
/// docs/identity.md), issued to the node because the operator's registry places the gateway
/// pod there, with the gateway's SPIFFE ID and the host names its routes match: curl checks
/// it against the CA and the host it asked for.
#[test]
fn an_sds_certificate_at_the_edge_comes_from_the_identity_service() -> anyhow::Result<()> {
    const CA_PORT: u16 = 15012;
    let tb = Testbed::new("ingress-sds")?;
    let node = tb.add_node("node1")?;
    let ca_node = tb.add_node("ca")?;
    let gateway =
        node.add_pod(&PodSpec::new("ingress-gw-1", "ingress").label("app", "ingress-gw"))?;
    let red = node.add_pod(&PodSpec::new("red", "ingress").label("app", "red"))?;
    let lb = node.add_pod(&PodSpec::new("lb", "outside"))?;
    tb.dns_record("red-v1.ingress.svc.cluster.local", &[red.ipv4().into()])?;
    let _red_server = http_server(&tb, &red, 8080, "red")?;
    let dir = tb.temp_dir().to_path_buf();
    let ca_dir = dir.join("ca").display().to_string();
    let mesh = dir.join("mesh.yaml");
    std::fs::write(&mesh, SDS_MESH)?;
    let mesh_arg = mesh.display().to_string();
    // The operator's registry: which pods run where.
    let nodes_file = dir.join("nodes.json");
    std::fs::write(
        &nodes_file,
        serde_json::json!({"node1": [
            {"name": "ingress-gw-1", "namespace": "ingress", "labels": {"app": "ingress-gw"}},
            {"name": "red", "namespace": "ingress", "labels": {"app": "red"}},
        ]})
        .to_string(),
    )?;
    strait_ok(&ca_node, &["ca", "init", "--dir", &ca_dir])?;
    let node_cert = dir.join("node1-cert").display().to_string();
    strait_ok(
        &ca_node,
        &[
            "ca",
            "issue-node",
            "--mesh",
            &mesh_arg,
            "--ca-dir",
            &ca_dir,
            "--node",
            "node1",
            "--out",
            &node_cert,
        ],
    )?;
    let listen = format!("{}:{CA_PORT}", ca_node.underlay_ip());
    let service = tb.spawn(
        "identity-service",
        ca_node.command(strait_binary()?).args([
            "ca",
            "serve",
            "--ca-dir",
            &ca_dir,
            "--mesh",
            &mesh_arg,
            "--listen",
            &listen,
            "--nodes",
            &nodes_file.display().to_string(),
        ]),
    )?;
    service.wait_listening(CA_PORT, Duration::from_secs(10))?;
    node.write_workload(&gateway)?;
    node.write_workload(&red)?;
    let ca_url = format!("https://{listen}");
    let args = identity_service_args(&ca_url, Path::new(&node_cert), &dir.join("node1-ids"));
    let agent = Agent::start(
        &tb,
        &node,
        &mesh,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    agent.wait_enrolled(GATEWAY, true, Duration::from_secs(20))?;
    agent.wait_enrolled("ingress/red", true, Duration::from_secs(20))?;

    let gw = gateway.ipv4().to_string();
    let ca_pem = Path::new(&ca_dir).join("ca.pem").display().to_string();
    let https = |host: &str| -> anyhow::Result<Reply> {
        curl(
            &lb,
            &[
                "--cacert",
                &ca_pem,
                "--resolve",
                &format!("{host}:8443:{gw}"),
                &format!("https://{host}:8443/red/x"),
            ],
        )
    };
    // The first connection asks for the certificate; it is there within moments.
    testbed::eventually(
        Duration::from_secs(20),
        "the gateway presents its sds certificate",
        || Ok(https("www.example.com")?.status == 200),
    )
    .with_context(|| {
        format!(
            "gateway agent:\n{}\nidentity service:\n{}",
            agent.process.stderr(),
            service.stderr()
        )
    })?;
    let reply = https("www.example.com")?;
    ensure!(
        reply.status == 200 && reply.seen()?["name"] == "red",
        "{} {}",
        reply.status,
        reply.body
    );
    // A host the gateway's routes do not match is not in the certificate: curl refuses it.
    let other = https("api.example.com")?;
    ensure!(
        other.status == 0,
        "a host the certificate does not name: {} {}",
        other.status,
        other.body
    );
    Ok(())
}

/// The gateway's client certificate toward the mesh from the identity service: red's listener
/// (on another node) admits only the gateway's SPIFFE ID, blue's only red's. Every certificate
/// and trust bundle is `sds`: nothing is issued to the nodes by hand.
const SDS_CLIENT_MESH: &str = r#"apiVersion: appmesh.k8s.aws/v1beta2
kind: Mesh
metadata: {name: ingress-gwsds}
spec: {egressFilter: {type: DROP_ALL}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {name: red, namespace: ingress}
spec:
  podSelector: {matchLabels: {app: red}}
  listeners:
    - portMapping: {port: 8080, protocol: http}
      tls:
        mode: STRICT
        certificate: {sds: {secretName: "spiffe://ingress-gwsds/ns/ingress/vn/red"}}
        validation:
          trust: {sds: {secretName: "spiffe://ingress-gwsds"}}
          subjectAlternativeNames: {match: {exact: ["spiffe://ingress-gwsds/ns/ingress/vg/ingress-gw"]}}
  serviceDiscovery: {dns: {hostname: red-v1.ingress.svc.cluster.local, responseType: ENDPOINTS}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {name: blue, namespace: ingress}
spec:
  podSelector: {matchLabels: {app: blue}}
  listeners:
    - portMapping: {port: 8080, protocol: http}
      tls:
        mode: STRICT
        certificate: {sds: {secretName: "spiffe://ingress-gwsds/ns/ingress/vn/blue"}}
        validation:
          trust: {sds: {secretName: "spiffe://ingress-gwsds"}}
          # Not the gateway: its calls are refused at the handshake.
          subjectAlternativeNames: {match: {exact: ["spiffe://ingress-gwsds/ns/ingress/vn/red"]}}
  serviceDiscovery: {dns: {hostname: blue-v1.ingress.svc.cluster.local, responseType: ENDPOINTS}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {name: red, namespace: ingress}
spec:
  awsName: red.ingress.svc.cluster.local
  provider: {virtualNode: {virtualNodeRef: {name: red}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {name: blue, namespace: ingress}
spec:
  awsName: blue.ingress.svc.cluster.local
  provider: {virtualNode: {virtualNodeRef: {name: blue}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualGateway
metadata: {name: ingress-gw, namespace: ingress}
spec:
  podSelector: {matchLabels: {app: ingress-gw}}
  listeners:
    - portMapping: {port: 8088, protocol: http}
  backendDefaults:
    clientPolicy:
      tls:
        certificate: {sds: {secretName: "spiffe://ingress-gwsds/ns/ingress/vg/ingress-gw"}}
        validation: {trust: {sds: {secretName: "spiffe://ingress-gwsds"}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: GatewayRoute
metadata: {name: red, namespace: ingress}
spec:
  httpRoute:
    match: {prefix: /red}
    action: {target: {virtualService: {virtualServiceRef: {name: red}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: GatewayRoute
metadata: {name: blue, namespace: ingress}
spec:
  httpRoute:
    match: {prefix: /blue}
    action: {target: {virtualService: {virtualServiceRef: {name: blue}}}}
"#;

/// The gateway's client certificate toward the mesh (`backendDefaults.clientPolicy.tls`, `sds`)
/// comes from the identity service (`strait ca serve`), issued to node1 because the registry
/// places the gateway pod there. Through the gateway, curl reaches red on node2 over mutual
/// TLS, and node2's agent admits and records the gateway's identity from the certificate it
/// verified; blue on node2, whose listener admits only red's SPIFFE ID, refuses the gateway at
/// the handshake, and node2 counts the refusal (`strait_tls_failures`, `san_mismatch`).
#[test]
fn the_gateways_sds_client_certificate_toward_the_mesh_comes_from_the_identity_service()
-> anyhow::Result<()> {
    const CA_PORT: u16 = 15012;
    const CA_METRICS_PORT: u16 = 15013;
    const GW_ID: &str = "spiffe://ingress-gwsds/ns/ingress/vg/ingress-gw";
    let tb = Testbed::new("ingress-gwsds")?;
    let node1 = tb.add_node("node1")?;
    let node2 = tb.add_node("node2")?;
    let ca_node = tb.add_node("ca")?;
    let gateway =
        node1.add_pod(&PodSpec::new("ingress-gw-1", "ingress").label("app", "ingress-gw"))?;
    let lb = node1.add_pod(&PodSpec::new("lb", "outside"))?;
    let red = node2.add_pod(&PodSpec::new("red", "ingress").label("app", "red"))?;
    let blue = node2.add_pod(&PodSpec::new("blue", "ingress").label("app", "blue"))?;
    tb.dns_record("red-v1.ingress.svc.cluster.local", &[red.ipv4().into()])?;
    tb.dns_record("blue-v1.ingress.svc.cluster.local", &[blue.ipv4().into()])?;
    let _red_server = http_server(&tb, &red, 8080, "red")?;
    let _blue_server = http_server(&tb, &blue, 8080, "blue")?;
    let dir = tb.temp_dir().to_path_buf();
    let ca_dir = dir.join("ca").display().to_string();
    let mesh = dir.join("mesh.yaml");
    std::fs::write(&mesh, SDS_CLIENT_MESH)?;
    let mesh_arg = mesh.display().to_string();
    // The operator's registry: which pods run where.
    let nodes_file = dir.join("nodes.json");
    std::fs::write(
        &nodes_file,
        serde_json::json!({
            "node1": [{"name": "ingress-gw-1", "namespace": "ingress", "labels": {"app": "ingress-gw"}}],
            "node2": [
                {"name": "red", "namespace": "ingress", "labels": {"app": "red"}},
                {"name": "blue", "namespace": "ingress", "labels": {"app": "blue"}},
            ],
        })
        .to_string(),
    )?;
    strait_ok(&ca_node, &["ca", "init", "--dir", &ca_dir])?;
    for name in ["node1", "node2"] {
        let out = dir.join(format!("{name}-cert")).display().to_string();
        strait_ok(
            &ca_node,
            &[
                "ca",
                "issue-node",
                "--mesh",
                &mesh_arg,
                "--ca-dir",
                &ca_dir,
                "--node",
                name,
                "--out",
                &out,
            ],
        )?;
    }
    let listen = format!("{}:{CA_PORT}", ca_node.underlay_ip());
    let metrics_listen = format!("{}:{CA_METRICS_PORT}", ca_node.underlay_ip());
    // One hour: a certificate of that life can only be the service's.
    let service = tb.spawn(
        "identity-service",
        ca_node.command(strait_binary()?).args([
            "ca",
            "serve",
            "--ca-dir",
            &ca_dir,
            "--mesh",
            &mesh_arg,
            "--listen",
            &listen,
            "--metrics-listen",
            &metrics_listen,
            "--lifetime",
            "1h",
            "--nodes",
            &nodes_file.display().to_string(),
        ]),
    )?;
    service.wait_listening(CA_PORT, Duration::from_secs(10))?;
    node1.write_workload(&gateway)?;
    node2.write_workload(&red)?;
    node2.write_workload(&blue)?;
    let ca_url = format!("https://{listen}");
    let nodes = [&node1, &node2];
    let start = |node: &Node| -> anyhow::Result<Agent> {
        let mut args = peer_node_args(
            nodes.iter().copied().filter(|n| n.index() != node.index()),
            false,
        );
        args.extend(identity_service_args(
            &ca_url,
            &dir.join(format!("{}-cert", node.name())),
            &dir.join(format!("{}-ids", node.name())),
        ));
        Agent::start(
            &tb,
            node,
            &mesh,
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        )
    };
    let agent1 = start(&node1)?;
    let agent2 = start(&node2)?;
    agent1.wait_enrolled(GATEWAY, true, Duration::from_secs(20))?;
    agent2.wait_enrolled("ingress/red", true, Duration::from_secs(20))?;
    agent2.wait_enrolled("ingress/blue", true, Duration::from_secs(20))?;
    let logs = || {
        format!(
            "gateway agent:\n{}\nservice agent:\n{}\nidentity service:\n{}",
            agent1.process.stderr(),
            agent2.process.stderr(),
            service.stderr()
        )
    };

    let gw = gateway.ipv4().to_string();
    let get = |path: &str| curl(&lb, &[&format!("http://{gw}:8088{path}")]);
    // The first call through the gateway asks for its certificate (and the first to red for
    // red's); they are there within moments.
    testbed::eventually(
        Duration::from_secs(30),
        "the gateway reaches red with its sds client certificate",
        || Ok(get("/red/x")?.status == 200),
    )
    .with_context(logs)?;
    let reply = get("/red/x")?;
    ensure!(
        reply.status == 200 && reply.seen()?["name"] == "red" && reply.seen()?["path"] == "/x",
        "{} {}",
        reply.status,
        reply.body
    );
    // The gateway's certificate is the service's (its one-hour life), used for the gateway.
    let expires = metric(
        &agent1,
        "strait_identity_expires_in_seconds",
        &["virtual_node=\"ingress/ingress-gw\""],
    )?;
    ensure!(
        expires > 3000.0 && expires <= 3600.0,
        "the gateway's certificate expires in {expires} s, not within the service's hour\n{}",
        logs()
    );
    let output = run(
        ca_node.command("curl").args([
            "-sS",
            "--max-time",
            "5",
            &format!("http://{metrics_listen}/metrics"),
        ]),
        Duration::from_secs(10),
    )?;
    let issued: f64 = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| l.starts_with("strait_ca_issued"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    // The gateway's, red's and blue's (blue's is asked for when node2 serves its listener).
    ensure!(
        issued >= 3.0,
        "the identity service issued {issued} certificates\n{}",
        logs()
    );
    // node2 verified the gateway's certificate: its tunnel carries the gateway's SPIFFE ID,
    // and the requests it delivered to red are the gateway's.
    let accepted: Vec<Value> = agent2
        .log_lines()
        .into_iter()
        .filter(|l| {
            l["target"] == "strait::tunnel"
                && l["message"] == "mTLS tunnel accepted"
                && l["virtual_node"] == "ingress/red"
        })
        .collect();
    ensure!(
        !accepted.is_empty()
            && accepted.iter().all(|l| l["peer_identity"]
                .as_str()
                .is_some_and(|p| p.contains(GW_ID))),
        "node2's tunnels to red are not the gateway's identity: {accepted:?}"
    );
    // ...and it admitted the gateway's virtual node by that identity (the receiving half of
    // the backend rule): the streams were delivered to red, none refused.
    let streams = metric(
        &agent2,
        "strait_tunnel_streams_total",
        &["direction=\"inbound\""],
    )?;
    ensure!(
        streams >= 1.0,
        "node2 delivered {streams} tunnel streams\n{}",
        logs()
    );
    let denied = metric(&agent2, "strait_authz_denied_total", &[])?;
    ensure!(denied == 0.0, "node2 refused {denied} streams\n{}", logs());

    // blue admits only red's identity: the gateway's certificate is refused at the handshake,
    // blue's server sees nothing, and node2 counts the refusal.
    let san_mismatch = || {
        metric(
            &agent2,
            "strait_tls_failures_total",
            &["side=\"server\"", "reason=\"san_mismatch\""],
        )
    };
    let before = san_mismatch()?;
    for _ in 0..3 {
        let refused = get("/blue/x")?;
        ensure!(
            refused.status != 200 && refused.seen().is_err(),
            "blue answered the gateway: {} {}",
            refused.status,
            refused.body
        );
    }
    testbed::eventually(Duration::from_secs(10), "node2 counts the refusal", || {
        Ok(san_mismatch()? > before)
    })
    .with_context(logs)?;
    ensure!(
        agent2
            .log_lines()
            .iter()
            .any(|l| l["reason"] == "san_mismatch"
                && l["message"].as_str().is_some_and(|m| m.contains(GW_ID))),
        "node2 logged no san_mismatch naming the gateway's identity\n{}",
        logs()
    );
    // No stream reached blue: the handshake failed before any.
    let streams_after = metric(
        &agent2,
        "strait_tunnel_streams_total",
        &["direction=\"inbound\""],
    )?;
    ensure!(
        streams_after == streams,
        "node2 delivered {} streams while blue refused the gateway",
        streams_after - streams
    );
    // red still takes the gateway's calls.
    ensure!(get("/red/x")?.status == 200, "red lost the gateway");
    Ok(())
}
