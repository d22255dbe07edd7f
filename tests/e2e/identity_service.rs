//! End-to-end tests of the identity service (`strait ca serve`, docs/identity.md): agents get
//! the certificates of their `sds` sources from it over HTTP/2 and mutual TLS, each node only
//! those of the virtual nodes it runs a pod of per the operator's node registry (or, in the
//! last test, per the test Kubernetes API server, tests/src/kubeapi.rs).
//!
//! Three testbed netns: node1 runs `client` (and, in the refusal test, `impostor`, a pod the
//! agent enrolls as `color` but the registry does not place on node1), node2 runs `color`, and
//! `ca` runs only the identity service. The compromised-node test adds node3, which runs
//! `other` and whose agent is replaced by a tool (curl and openssl) holding node3's
//! credentials. The token test proves nodes with ServiceAccount tokens that the test API
//! server's TokenReview knows (a test double of kube-apiserver, tests/src/kubeapi.rs). Needs
//! root, curl and openssl; without them these tests fail (never skip) with the reason.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use serde_json::{Value, json};
use testbed::agent::{Agent, metric, strait_ok};
use testbed::scenario::{identity_service_args, peer_node_args};
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
kind: VirtualNode
metadata: {{name: other, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: other}}}}
  backends:
    - virtualService: {{virtualServiceRef: {{name: color}}}}
  backendDefaults:
    clientPolicy:
      tls:
        enforce: true
        certificate: {{sds: {{secretName: "spiffe://test/ns/app/vn/other"}}}}
        validation:
          trust: {{sds: {{secretName: "spiffe://test"}}}}
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

struct Bed {
    tb: Testbed,
    ca_node: Node,
    node2: Node,
    /// With `third`: node3, which runs `other` and no agent.
    node3: Option<Node>,
    client: Pod,
    agent1: Agent,
    agent2: Agent,
    service: Option<Process>,
    _server: Process,
}

impl Bed {
    /// The identity service's metric `name` with a label fragment.
    fn service_metric(&self, name: &str, fragment: &str) -> anyhow::Result<f64> {
        service_metric(&self.ca_node, name, fragment)
    }
}

/// The metric `name` with a label fragment of the identity service in `ca_node`.
fn service_metric(ca_node: &Node, name: &str, fragment: &str) -> anyhow::Result<f64> {
    let output = run(
        ca_node.command("curl").args([
            "-sS",
            "--max-time",
            "5",
            &format!("http://{}:{CA_METRICS_PORT}/metrics", ca_node.underlay_ip()),
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

/// `impostor`: also start a pod on node1 labelled as color, which the registry does not list.
/// `third`: also node3, running `other`, with a node certificate and no agent.
fn bed(test: &str, lifetime: &str, impostor: bool, third: bool) -> anyhow::Result<Bed> {
    let tb = Testbed::new(test)?;
    require_tool("curl")?;
    let node1 = tb.add_node("node1")?;
    let node2 = tb.add_node("node2")?;
    let ca_node = tb.add_node("ca")?;
    let node3 = if third {
        let node3 = tb.add_node("node3")?;
        node3.add_pod(&PodSpec::new("other", "app").label("app", "other"))?;
        Some(node3)
    } else {
        None
    };
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
            "node3": [{"name": "other", "namespace": "app", "labels": {"app": "other"}}],
        }))?,
    )?;
    strait_ok(&ca_node, &["ca", "init", "--dir", &ca_dir])?;
    for node in ["node1", "node2", "node3"] {
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
        let mut args = peer_node_args([other], true);
        args.extend(identity_service_args(
            &ca_url,
            &dir.join(format!("{}-cert", node.name())),
            &dir.join(format!("{}-ids", node.name())),
        ));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Agent::start(&tb, node, Path::new(&mesh), &args)
    };
    let agent1 = start(&node1, &node2)?;
    let agent2 = start(&node2, &node1)?;
    agent1.wait_enrolled("app/client", true, Duration::from_secs(20))?;
    agent2.wait_enrolled("app/server", true, Duration::from_secs(20))?;
    Ok(Bed {
        ca_node,
        node2,
        node3,
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
    let csr = "not read before the node is checked";
    post_with(tb, ca_node, ca_node, node, None, identity, csr)
}

/// Posts an identity request with `csr` from `from`'s netns to the service in `ca_node`, with
/// `node`'s node certificate and/or `token` as a bearer token.
fn post_with(
    tb: &Testbed,
    ca_node: &Node,
    from: &Node,
    node: Option<&str>,
    token: Option<&str>,
    identity: &str,
    csr: &str,
) -> anyhow::Result<(bool, u16, String)> {
    let dir = tb.temp_dir();
    let body = json!({"identity": identity, "csr": csr});
    let mut command = from.command("curl");
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
    if let Some(token) = token {
        command.args(["-H", &format!("authorization: Bearer {token}")]);
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
    let bed = bed("identity-service-scope", "24h", true, false)?;
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
    let mut bed = bed("identity-service-rotation", "60s", false, false)?;
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

/// A key and a CSR made with openssl, as a tool on a compromised node would: (key file, CSR
/// PEM).
fn openssl_csr(dir: &Path, name: &str) -> anyhow::Result<(std::path::PathBuf, String)> {
    require_tool("openssl")?;
    let key = dir.join(format!("{name}-key.pem"));
    let csr = dir.join(format!("{name}.csr"));
    let output = run(
        std::process::Command::new("openssl").args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=tool",
            "-keyout",
            &key.display().to_string(),
            "-out",
            &csr.display().to_string(),
        ]),
        Duration::from_secs(20),
    )?;
    ensure!(
        output.status.success(),
        "openssl req failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok((key, std::fs::read_to_string(&csr)?))
}

#[test]
fn a_compromised_node_obtains_and_presents_only_the_identities_it_runs() -> anyhow::Result<()> {
    let bed = bed("identity-service-compromised", "24h", false, true)?;
    testbed::eventually(
        Duration::from_secs(30),
        "client reaches color through the tunnel",
        || Ok(get(&bed.client).is_ok()),
    )?;
    let node3 = bed.node3.as_ref().context("the bed has node3")?;
    let dir = bed.tb.temp_dir().join("tool");
    std::fs::create_dir_all(&dir)?;
    // node3's agent is replaced by a tool holding node3's node certificate: it asks, from
    // node3, for every identity of the mesh with a real CSR. (a) and (c): only `other`, the
    // one node3 runs, is granted; client (node1's) and color (node2's) are refused and counted.
    let refused_before = bed.service_metric("strait_ca_refused", "not_on_node")?;
    let mut granted = Vec::new();
    for name in ["client", "color", "other"] {
        let identity = format!("spiffe://test/ns/app/vn/{name}");
        let (key, csr) = openssl_csr(&dir, name)?;
        let (_, status, body) = post_with(
            &bed.tb,
            &bed.ca_node,
            node3,
            Some("node3"),
            None,
            &identity,
            &csr,
        )?;
        if name == "other" {
            ensure!(
                status == 200,
                "node3 asking for its own pod's identity: {status} {body}"
            );
            let issued: Value = serde_json::from_str(&body)?;
            let chain = dir.join(format!("{name}.pem"));
            std::fs::write(
                &chain,
                issued["certificateChain"]
                    .as_str()
                    .context("no certificateChain")?,
            )?;
            granted.push((chain, key));
        } else {
            let refusal: Value = serde_json::from_str(&body).context("refusal body")?;
            ensure!(
                status == 403 && refusal["reason"] == "not_on_node",
                "node3 asking for {name}: {status} {body}"
            );
        }
    }
    ensure!(
        bed.service_metric("strait_ca_refused", "not_on_node")? >= refused_before + 2.0,
        "the two refusals were not counted"
    );
    // Without its node certificate the tool gets no answer at all.
    let (ok, status, _) = post_with(
        &bed.tb,
        &bed.ca_node,
        node3,
        None,
        None,
        "spiffe://test/ns/app/vn/client",
        "x",
    )?;
    ensure!(
        !ok && status != 200,
        "no certificate got an answer: {status}"
    );
    // (b) The tool presents node3's genuine `other` certificate to node2's agent at color's
    // listener, claiming to act for client's pod on node1 (the source header is what an
    // agent sends; the receiving agent trusts only the certificate): color admits client
    // only, so node2 refuses the handshake (SAN check) and counts it.
    let (chain, key) = granted.first().context("other was granted")?;
    let before = metric(
        &bed.agent2,
        "strait_tls_failures",
        &["server", "san_mismatch"],
    )?;
    let output = run(
        node3.command("curl").args([
            "--silent",
            "--show-error",
            "--insecure",
            "--http2",
            "--max-time",
            "10",
            "--cert",
            &chain.display().to_string(),
            "--key",
            &key.display().to_string(),
            "-H",
            "x-strait-source-workload: app/client",
            "--resolve",
            &format!("p8080.color.app.strait:15008:{}", bed.node2.underlay_ip()),
            "https://p8080.color.app.strait:15008/",
        ]),
        Duration::from_secs(20),
    )?;
    ensure!(
        !output.status.success(),
        "node2 accepted node3's `other` certificate at color's listener: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    testbed::eventually(Duration::from_secs(10), "node2 counts the refusal", || {
        Ok(metric(
            &bed.agent2,
            "strait_tls_failures",
            &["server", "san_mismatch"],
        )? > before)
    })?;
    let rejected = bed.agent2.log_lines().into_iter().find(|l| {
        l["reason"] == "san_mismatch"
            && l["message"]
                .as_str()
                .is_some_and(|m| m.contains("spiffe://test/ns/app/vn/other"))
    });
    ensure!(
        rejected.is_some(),
        "node2 logged no san_mismatch naming the presented identity other"
    );
    // Genuine traffic is unaffected.
    ensure!(get(&bed.client)?.contains("server"), "client lost color");
    Ok(())
}

#[test]
fn on_kubernetes_an_agent_proves_its_node_with_its_pods_token() -> anyhow::Result<()> {
    use testbed::kubeapi::{BoundToken, KubeApi, agent_pod_object, namespace_object, pod_object};
    const AUDIENCE: &str = "strait-ca";
    let tb = Testbed::new("identity-service-token")?;
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
    // The API: the workload pods, and each node's agent pod running as strait/strait.
    let api = KubeApi::new()?;
    api.apply(namespace_object("app", &[]))?;
    api.apply(pod_object(&client))?;
    api.apply(pod_object(&server))?;
    let agent_pod = |node: &Node| {
        let mut pod = agent_pod_object(node, true);
        pod["spec"]["serviceAccountName"] = json!("strait");
        pod
    };
    let (agent_pod1, agent_pod2) = (agent_pod(&node1), agent_pod(&node2));
    api.apply(agent_pod1.clone())?;
    api.apply(agent_pod2.clone())?;
    let dir = tb.temp_dir().to_path_buf();
    let token_file = |name: &str, token: &str| -> anyhow::Result<String> {
        let path = dir.join(format!("{name}-token"));
        std::fs::write(&path, token)?;
        Ok(path.display().to_string())
    };
    api.register_token(
        "node1-agent-v1",
        BoundToken::for_pod(&agent_pod1, &[AUDIENCE]),
    );
    api.register_token(
        "node2-agent-v1",
        BoundToken::for_pod(&agent_pod2, &[AUDIENCE]),
    );
    let kubeconfig = api.kubeconfig(api.serve_in(&ca_node)?, &dir)?;
    let ca_dir = dir.join("ca");
    let mesh = dir.join("mesh.yaml");
    std::fs::write(&mesh, mesh_yaml())?;
    let mesh = mesh.display().to_string();
    strait_ok(
        &ca_node,
        &["ca", "init", "--dir", &ca_dir.display().to_string()],
    )?;
    let _service = start_service(
        &tb,
        &ca_node,
        &ca_dir.display().to_string(),
        &mesh,
        &[
            "--kubernetes",
            "--kubeconfig",
            &kubeconfig.display().to_string(),
            "--agent-service-account",
            "strait/strait",
        ],
        "30s",
    )?;
    node1.write_workload(&client)?;
    node2.write_workload(&server)?;
    let ca_url = format!("https://{}:{CA_PORT}", ca_node.underlay_ip());
    let ca_pem = ca_dir.join("ca.pem").display().to_string();
    let start = |node: &Node, other: &Node, token: &str| -> anyhow::Result<Agent> {
        let mut args = peer_node_args([other], true);
        args.extend([
            "--identity-service".to_string(),
            ca_url.clone(),
            "--node-token".into(),
            token_file(node.name(), token)?,
            "--identity-ca".into(),
            ca_pem.clone(),
            "--identity-dir".into(),
            dir.join(format!("{}-ids", node.name()))
                .display()
                .to_string(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Agent::start(&tb, node, Path::new(&mesh), &args)
    };
    let agent1 = start(&node1, &node2, "node1-agent-v1")?;
    let agent2 = start(&node2, &node1, "node2-agent-v1")?;
    agent1.wait_enrolled("app/client", true, Duration::from_secs(20))?;
    agent2.wait_enrolled("app/server", true, Duration::from_secs(20))?;
    // Each agent proved its node with its token and got its pods' identities: traffic
    // crosses nodes with them.
    testbed::eventually(
        Duration::from_secs(30),
        "client reaches color through the tunnel",
        || Ok(get(&client).is_ok()),
    )?;
    ensure!(
        get(&client)?.contains("server"),
        "client did not reach color"
    );
    ensure!(
        issued(&agent1) >= 1 && issued(&agent2) >= 1,
        "an agent got no certificate"
    );
    let requests = api.requests();
    ensure!(
        requests
            .iter()
            .any(|r| r.starts_with("POST /apis/authentication.k8s.io/v1/tokenreviews"))
            && requests
                .iter()
                .any(|r| r.starts_with("GET /api/v1/namespaces/strait/pods/strait-node1")),
        "the service did not review the token and read the agent's pod: {requests:?}"
    );
    // The token rotates (kubelet rewrites the file; the old one stops being valid): the agent
    // reads the new one for its next renewal (every 15 s with 30 s certificates).
    api.register_token(
        "node1-agent-v2",
        BoundToken::for_pod(&agent_pod1, &[AUDIENCE]),
    );
    token_file("node1", "node1-agent-v2")?;
    api.revoke_token("node1-agent-v1");
    let renewed = issued(&agent1);
    testbed::eventually(
        Duration::from_secs(40),
        "node1 renews with the rotated token",
        || Ok(issued(&agent1) > renewed),
    )?;

    let refused = |reason: &str| service_metric(&ca_node, "strait_ca_refused", reason);
    let ask = |token: Option<&str>, identity: &str| {
        post_with(&tb, &ca_node, &ca_node, None, token, identity, "not a CSR")
    };
    let client_id = "spiffe://test/ns/app/vn/client";
    // node2's agent token asking for the identity of node1's pod: refused and counted.
    let before = refused("not_on_node")?;
    let (_, status, body) = ask(Some("node2-agent-v1"), client_id)?;
    ensure!(
        status == 403 && body.contains("not_on_node") && body.contains("node node2 runs no pod"),
        "node2's token asking for client: {status} {body}"
    );
    ensure!(refused("not_on_node")? >= before + 1.0, "not counted");
    // node1's own token passes the node check (and reaches the CSR, which this is not).
    let (_, status, body) = ask(Some("node1-agent-v2"), client_id)?;
    ensure!(
        status == 400 && body.contains("bad_csr"),
        "node1's token asking for client: {status} {body}"
    );
    // A token of node1's agent pod for another audience (the API server's): refused.
    api.register_token(
        "node1-agent-api",
        BoundToken::for_pod(&agent_pod1, &[testbed::kubeapi::API_AUDIENCE]),
    );
    let before = refused("bad_token")?;
    let (_, status, body) = ask(Some("node1-agent-api"), client_id)?;
    ensure!(
        status == 403 && body.contains("bad_token") && body.contains("token audiences"),
        "a token for another audience: {status} {body}"
    );
    // The revoked one and an unknown one: refused.
    for token in ["node1-agent-v1", "made-up"] {
        let (_, status, body) = ask(Some(token), client_id)?;
        ensure!(
            status == 403 && body.contains("bad_token"),
            "token {token}: {status} {body}"
        );
    }
    ensure!(refused("bad_token")? >= before + 3.0, "not counted");
    // A workload pod's token on node1, even for strait-ca: not the agents' ServiceAccount.
    api.register_token(
        "client-pod",
        BoundToken::for_pod(&pod_object(&client), &[AUDIENCE]),
    );
    let (_, status, body) = ask(Some("client-pod"), client_id)?;
    ensure!(
        status == 403 && body.contains("not_agent"),
        "a workload pod's token: {status} {body}"
    );
    // Neither token nor certificate: the handshake passes (agents on Kubernetes have no
    // certificate) but no node is proven.
    let (_, status, body) = ask(None, client_id)?;
    ensure!(
        status == 403 && body.contains("no_node"),
        "no credentials: {status} {body}"
    );
    drop(http);
    Ok(())
}
