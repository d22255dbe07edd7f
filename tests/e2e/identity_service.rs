//! End-to-end tests of the identity service (`strait ca serve`, docs/identity.md): agents get
//! the certificates of their `sds` sources from it over HTTP/2 and mutual TLS, each node only
//! those of the virtual nodes it runs a pod of per the operator's node registry (or, in the
//! last test, per the test Kubernetes API server, tests/src/kubeapi.rs).
//!
//! Three testbed netns: node1 runs `client` (and, in the refusal test, `impostor`, a pod the
//! agent enrolls as `color` but the registry does not place on node1), node2 runs `color`, and
//! `ca` runs only the identity service. Needs root and curl; without them these tests fail
//! (never skip) with the reason.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use serde_json::{Value, json};
use testbed::agent::{Agent, metric, strait_ok};
use testbed::{Node, Pod, PodSpec, Process, Testbed, require_tool, run};

const HTTP_BIN: &str = env!("CARGO_BIN_EXE_strait-http");
const COLOR: &str = "color.app.svc.cluster.local";
const COLOR_V4: &str = "10.96.0.40";
const CA_PORT: u16 = 15012;
const CA_METRICS_PORT: u16 = 15013;

fn mesh_yaml() -> String {
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
        certificate: {{sds: {{secretName: "spiffe://test/ns/app/vn/client"}}}}
        validation:
          trust: {{sds: {{secretName: "spiffe://test"}}}}
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
        certificate: {{sds: {{secretName: "spiffe://test/ns/app/vn/color"}}}}
        validation:
          trust: {{sds: {{secretName: "spiffe://test"}}}}
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

fn peer_args(other: &Node) -> Vec<String> {
    let mut args = Vec::new();
    for (subnet, bits) in [
        (testbed::addr::pod_subnet_v4(other.index()).to_string(), 24),
        (testbed::addr::pod_subnet_v6(other.index()).to_string(), 64),
    ] {
        args.push("--peer-node".into());
        args.push(format!("{subnet}/{bits}={}", other.underlay_ip()));
    }
    args
}

struct Bed {
    tb: Testbed,
    ca_node: Node,
    client: Pod,
    agent1: Agent,
    agent2: Agent,
    service: Option<Process>,
    _server: Process,
}

impl Bed {
    /// The identity service's metric `name` with a label fragment.
    fn service_metric(&self, name: &str, fragment: &str) -> anyhow::Result<f64> {
        let output = run(
            self.ca_node.command("curl").args([
                "-sS",
                "--max-time",
                "5",
                &format!(
                    "http://{}:{CA_METRICS_PORT}/metrics",
                    self.ca_node.underlay_ip()
                ),
            ]),
            Duration::from_secs(10),
        )?;
        let text = String::from_utf8_lossy(&output.stdout);
        Ok(text
            .lines()
            .filter(|l| l.starts_with(name) && l.contains(fragment))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }
}

/// `impostor`: also start a pod on node1 labelled as color, which the registry does not list.
fn bed(test: &str, lifetime: &str, impostor: bool) -> anyhow::Result<Bed> {
    let tb = Testbed::new(test)?;
    require_tool("curl")?;
    let node1 = tb.add_node("node1")?;
    let node2 = tb.add_node("node2")?;
    let ca_node = tb.add_node("ca")?;
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

    let dir = tb.temp_dir().to_path_buf();
    let ca_dir = dir.join("ca").display().to_string();
    let mesh = dir.join("mesh.yaml");
    std::fs::write(&mesh, mesh_yaml())?;
    let mesh = mesh.display().to_string();
    // The operator's registry: which pods run where (never what agents report).
    let nodes_file = dir.join("nodes.json");
    std::fs::write(
        &nodes_file,
        serde_json::to_string(&json!({
            "node1": [{"name": "client", "namespace": "app", "labels": {"app": "client"}}],
            "node2": [{"name": "server", "namespace": "app", "labels": {"app": "color"}}],
        }))?,
    )?;
    strait_ok(&ca_node, &["ca", "init", "--dir", &ca_dir])?;
    for node in ["node1", "node2"] {
        let out = dir.join(format!("{node}-cert")).display().to_string();
        strait_ok(
            &ca_node,
            &[
                "ca",
                "issue-node",
                "--mesh",
                &mesh,
                "--ca-dir",
                &ca_dir,
                "--node",
                node,
                "--out",
                &out,
            ],
        )?;
    }
    let ca_url = format!("https://{}:{CA_PORT}", ca_node.underlay_ip());
    let service = Some(start_service(
        &tb,
        &ca_node,
        &ca_dir,
        &mesh,
        &["--nodes", &nodes_file.display().to_string()],
        lifetime,
    )?);
    if impostor {
        let pod = node1.add_pod(&PodSpec::new("impostor", "app").label("app", "color"))?;
        node1.write_workload(&pod)?;
    }
    node1.write_workload(&client)?;
    node2.write_workload(&server)?;
    let start = |node: &Node, other: &Node| -> anyhow::Result<Agent> {
        let mut args = peer_args(other);
        args.extend([
            "--identity-service".to_string(),
            ca_url.clone(),
            "--node-cert".into(),
            dir.join(format!("{}-cert", node.name()))
                .display()
                .to_string(),
            "--identity-dir".into(),
            dir.join(format!("{}-ids", node.name()))
                .display()
                .to_string(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Agent::start(&tb, node, Path::new(&mesh), &args)
    };
    let agent1 = start(&node1, &node2)?;
    let agent2 = start(&node2, &node1)?;
    agent1.wait_enrolled("app/client", true, Duration::from_secs(20))?;
    agent2.wait_enrolled("app/server", true, Duration::from_secs(20))?;
    Ok(Bed {
        ca_node,
        client,
        agent1,
        agent2,
        service,
        _server: http,
        tb,
    })
}

fn start_service(
    tb: &Testbed,
    ca_node: &Node,
    ca_dir: &str,
    mesh: &str,
    source: &[&str],
    lifetime: &str,
) -> anyhow::Result<Process> {
    let listen = format!("{}:{CA_PORT}", ca_node.underlay_ip());
    let metrics = format!("{}:{CA_METRICS_PORT}", ca_node.underlay_ip());
    let service = tb.spawn(
        "identity-service",
        ca_node
            .command(testbed::agent::strait_binary()?)
            .args([
                "ca",
                "serve",
                "--ca-dir",
                ca_dir,
                "--mesh",
                mesh,
                "--listen",
                &listen,
                "--metrics-listen",
                &metrics,
                "--lifetime",
                lifetime,
            ])
            .args(source),
    )?;
    service.wait_listening(CA_PORT, Duration::from_secs(10))?;
    Ok(service)
}

/// GET through the mesh from the client pod; the body on success.
fn get(pod: &Pod) -> anyhow::Result<String> {
    let output = run(
        pod.command("curl").args([
            "-sS",
            "--max-time",
            "5",
            &format!("http://{COLOR}:8080/color"),
        ]),
        Duration::from_secs(10),
    )?;
    ensure!(
        output.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The agent's log lines at `level` whose message contains `text`.
fn logged(agent: &Agent, level: &str, text: &str) -> Vec<Value> {
    agent
        .log_lines()
        .into_iter()
        .filter(|l| l["level"] == level && l["message"].as_str().is_some_and(|m| m.contains(text)))
        .collect()
}

/// Certificates the identity service issued to an agent, by its log.
fn issued(agent: &Agent) -> usize {
    logged(agent, "INFO", "issued by the identity service").len()
}

/// Posts an identity request to the service with `node`'s credentials (or none) using curl;
/// returns curl's success, the HTTP status and the body.
fn post_as(bed: &Bed, node: Option<&str>, identity: &str) -> anyhow::Result<(bool, u16, String)> {
    post(&bed.tb, &bed.ca_node, node, identity)
}

/// [`post_as`] to the service in `ca_node`.
fn post(
    tb: &Testbed,
    ca_node: &Node,
    node: Option<&str>,
    identity: &str,
) -> anyhow::Result<(bool, u16, String)> {
    let dir = tb.temp_dir();
    let body = json!({"identity": identity, "csr": "not read before the node is checked"});
    let mut command = ca_node.command("curl");
    command.args([
        "-sS",
        "--http2",
        "--max-time",
        "5",
        "--cacert",
        &dir.join("ca").join("ca.pem").display().to_string(),
        "-H",
        "content-type: application/json",
        "-d",
        &body.to_string(),
        "-w",
        "\n%{http_code}",
    ]);
    if let Some(node) = node {
        let certs = dir.join(format!("{node}-cert"));
        command.args([
            "--cert",
            &certs.join("node.pem").display().to_string(),
            "--key",
            &certs.join("node-key.pem").display().to_string(),
        ]);
    }
    command.arg(format!(
        "https://{}:{CA_PORT}/v1/identities",
        ca_node.underlay_ip()
    ));
    let output = run(&mut command, Duration::from_secs(10))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    Ok((
        output.status.success(),
        code.trim().parse().unwrap_or(0),
        body.to_owned(),
    ))
}

#[test]
fn a_node_gets_only_the_identities_of_its_own_pods_and_traffic_flows_across_nodes()
-> anyhow::Result<()> {
    let bed = bed("identity-service-scope", "24h", true)?;
    // Traffic across nodes with the certificates the service issued.
    testbed::eventually(
        Duration::from_secs(30),
        "client reaches color through the tunnel",
        || Ok(get(&bed.client).is_ok()),
    )?;
    let body = get(&bed.client)?;
    ensure!(body.contains("server"), "answer: {body}");
    let left = metric(
        &bed.agent1,
        "strait_identity_expires_in_seconds",
        &["app/client"],
    )?;
    ensure!(
        left > 86_000.0 && left <= 86_400.0,
        "client's service-issued certificate: {left} s left, expected about 24 h"
    );
    // node1's agent enrolled `impostor` as color and asked for color's identity: refused,
    // with the reason, and counted.
    testbed::eventually(
        Duration::from_secs(30),
        "node1's request for color's identity is refused",
        || {
            Ok(!logged(&bed.agent1, "WARN", "not_on_node").is_empty()
                && bed.service_metric("strait_ca_refused", "not_on_node")? >= 1.0)
        },
    )?;
    let refusal = &logged(&bed.agent1, "WARN", "not_on_node")[0];
    ensure!(
        refusal["identity"] == "spiffe://test/ns/app/vn/color"
            && refusal["message"]
                .as_str()
                .is_some_and(|m| m.contains("node node1 runs no pod selected by app/color")),
        "refusal: {refusal}"
    );
    // node1's credentials, used directly (a compromised node), do not get color either; no
    // credentials get no answer at all.
    let before = bed.service_metric("strait_ca_refused", "not_on_node")?;
    let (_, status, body) = post_as(&bed, Some("node1"), "spiffe://test/ns/app/vn/color")?;
    ensure!(status == 403, "node1 asking for color: {status} {body}");
    let refusal: Value = serde_json::from_str(&body).context("refusal body")?;
    ensure!(refusal["reason"] == "not_on_node", "{refusal}");
    ensure!(
        bed.service_metric("strait_ca_refused", "not_on_node")? >= before + 1.0,
        "the refusal was not counted"
    );
    let (ok, status, body) = post_as(&bed, None, "spiffe://test/ns/app/vn/color")?;
    ensure!(
        !ok && status != 200,
        "a client without a node certificate got an answer: {status} {body}"
    );
    // The service knows no such identity.
    let (_, status, _) = post_as(&bed, Some("node2"), "spiffe://test/ns/app/vn/nobody")?;
    ensure!(status == 404, "unknown identity: {status}");
    // node2 itself is granted color's identity (it runs the pod); issued counts it.
    ensure!(issued(&bed.agent2) >= 1, "node2 got no certificate");
    ensure!(
        bed.service_metric("strait_ca_issued", "")? >= 2.0,
        "issued certificates not counted"
    );
    Ok(())
}

#[test]
fn short_lived_certificates_renew_under_load_and_an_outage_keeps_traffic_flowing()
-> anyhow::Result<()> {
    const LIFETIME_S: u64 = 60;
    let mut bed = bed("identity-service-rotation", "60s", false)?;
    testbed::eventually(
        Duration::from_secs(30),
        "client reaches color through the tunnel",
        || Ok(get(&bed.client).is_ok()),
    )?;
    let stop = bed.tb.temp_dir().join("stop-load");
    let load = bed.tb.spawn(
        "load",
        bed.client.command(HTTP_BIN).args([
            "load",
            &format!("http://{COLOR}:8080/color"),
            "--concurrency",
            "8",
            "--rate",
            "200",
            "--duration-ms",
            "240000",
            "--timeout",
            "260",
            "--stop-file",
            &stop.display().to_string(),
        ]),
    )?;
    // Two renewals on each side under load (renewal at half-life: every 30 s).
    let (start1, start2) = (issued(&bed.agent1), issued(&bed.agent2));
    testbed::eventually(
        Duration::from_secs(LIFETIME_S + 20),
        "both agents renew twice",
        || Ok(issued(&bed.agent1) >= start1 + 2 && issued(&bed.agent2) >= start2 + 2),
    )?;
    // Stop the service just after both renewed, for longer than a renewal period.
    let (n1, n2) = (issued(&bed.agent1), issued(&bed.agent2));
    testbed::eventually(
        Duration::from_secs(LIFETIME_S),
        "both agents renew once more",
        || Ok(issued(&bed.agent1) > n1 && issued(&bed.agent2) > n2),
    )?;
    let service = bed.service.take().context("the service runs")?;
    service.kill()?;
    std::thread::sleep(Duration::from_secs(LIFETIME_S / 2 + 10));
    ensure!(
        !logged(&bed.agent1, "WARN", "cannot renew the certificate").is_empty(),
        "node1 did not warn that it cannot renew"
    );
    ensure!(
        load.try_wait()?.is_none(),
        "the load ended early: {} {}",
        load.stdout(),
        load.stderr()
    );
    let left = metric(
        &bed.agent1,
        "strait_identity_expires_in_seconds",
        &["app/client"],
    )?;
    ensure!(
        left > 0.0 && left < (LIFETIME_S / 2) as f64,
        "client's certificate left: {left} s (kept past its renewal time, still valid)"
    );
    get(&bed.client).context("traffic flows with the service down")?;
    std::fs::write(&stop, b"")?;
    load.wait_timeout(Duration::from_secs(30))?;
    let report: Value = serde_json::from_str(load.stdout().trim()).with_context(|| {
        format!(
            "the load client printed no JSON report: {} {}",
            load.stdout(),
            load.stderr()
        )
    })?;
    eprintln!(
        "rotation: report {report}, certificates issued to node1 {}, node2 {}",
        issued(&bed.agent1),
        issued(&bed.agent2)
    );
    ensure!(report["failed"] == 0, "requests failed: {report}");
    ensure!(
        report["completed"].as_u64().unwrap_or(0) > 10_000,
        "too few requests: {report}"
    );
    Ok(())
}

#[test]
fn with_the_kubernetes_api_a_node_is_given_only_the_identities_of_its_pods() -> anyhow::Result<()> {
    use testbed::kubeapi::{Kind, KubeApi, namespace_object, pod_object};
    let tb = Testbed::new("identity-service-kubernetes")?;
    require_tool("curl")?;
    let node1 = tb.add_node("node1")?;
    let node2 = tb.add_node("node2")?;
    let ca_node = tb.add_node("ca")?;
    let client = node1.add_pod(&PodSpec::new("client", "app").label("app", "client"))?;
    let server = node2.add_pod(&PodSpec::new("server", "app").label("app", "color"))?;
    let api = KubeApi::new()?;
    api.apply(namespace_object("app", &[]))?;
    api.apply(pod_object(&client))?;
    api.apply(pod_object(&server))?;
    let dir = tb.temp_dir().to_path_buf();
    let kubeconfig = api.kubeconfig(api.serve_in(&ca_node)?, &dir)?;
    let ca_dir = dir.join("ca").display().to_string();
    let mesh = dir.join("mesh.yaml");
    std::fs::write(&mesh, mesh_yaml())?;
    let mesh = mesh.display().to_string();
    strait_ok(&ca_node, &["ca", "init", "--dir", &ca_dir])?;
    for node in [&node1, &node2] {
        let out = dir
            .join(format!("{}-cert", node.name()))
            .display()
            .to_string();
        strait_ok(
            &ca_node,
            &[
                "ca",
                "issue-node",
                "--mesh",
                &mesh,
                "--ca-dir",
                &ca_dir,
                "--node",
                node.name(),
                "--out",
                &out,
            ],
        )?;
    }
    let _service = start_service(
        &tb,
        &ca_node,
        &ca_dir,
        &mesh,
        &[
            "--kubernetes",
            "--kubeconfig",
            &kubeconfig.display().to_string(),
        ],
        "24h",
    )?;
    let color = "spiffe://test/ns/app/vn/color";
    // node1 runs no color pod per the API: refused, naming the source.
    let (_, status, body) = post(&tb, &ca_node, Some(node1.name()), color)?;
    ensure!(status == 403, "node1 asking for color: {status} {body}");
    let refusal: Value = serde_json::from_str(&body)?;
    ensure!(
        refusal["reason"] == "not_on_node"
            && refusal["message"]
                .as_str()
                .is_some_and(|m| m.contains("per the Kubernetes API")),
        "{refusal}"
    );
    // node2 runs one: it passes the node check and reaches the CSR (this one is no CSR).
    let (_, status, body) = post(&tb, &ca_node, Some(node2.name()), color)?;
    let answer: Value = serde_json::from_str(&body)?;
    ensure!(
        status == 400 && answer["reason"] == "bad_csr",
        "node2 asking for color: {status} {body}"
    );
    // Once the pod is gone from the API, node2 is refused too.
    api.delete(Kind::Pod, "app", "server")?;
    let (_, status, body) = post(&tb, &ca_node, Some(node2.name()), color)?;
    ensure!(status == 403, "node2 without its pod: {status} {body}");
    let requests = api.requests();
    ensure!(
        requests.iter().any(|r| r.contains("spec.nodeName")),
        "the service did not ask the API for a node's pods: {requests:?}"
    );
    Ok(())
}
