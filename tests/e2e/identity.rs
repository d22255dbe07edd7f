//! End-to-end tests of node-scoped identity (docs/security.md, "Identities"): an agent opens
//! only the certificates of virtual nodes it runs a pod of, so another node's files need not
//! exist on it; a virtual node whose certificate file holds another identity is refused by its
//! own agent (naming the file and the SANs found) while the rest of the mesh serves; and a
//! receiving agent refuses a peer that presents an identity its listener does not admit, even
//! a genuine certificate of the mesh taken from another workload, and a certificate of an
//! admitted identity that the mesh's CA did not sign.
//!
//! Two testbed nodes: node1 runs `client` and `thief`, node2 runs `color`. Needs root and curl;
//! without them these tests fail (never skip) with the reason.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use serde_json::Value;
use testbed::agent::{Agent, echo_server, issue_mesh_certs, metric, peer_binary, strait_ok};
use testbed::scenario::peer_node_args;
use testbed::{Node, Pod, PodSpec, Process, Testbed, require_tool, run};

const COLOR: &str = "color.app.svc.cluster.local";

/// `thief` points its client certificate at `thief_files` (`thief`, or `color` to present
/// color's identity); `ghost` (no pod anywhere) at files that are removed once issued.
fn mesh_yaml(certs: &Path, ghost: &Path, thief_files: &str) -> String {
    let c = certs.display();
    let t = thief_files;
    let g = ghost.display();
    format!(
        r#"apiVersion: appmesh.k8s.aws/v1beta2
kind: Mesh
metadata: {{name: test}}
spec: {{egressFilter: {{type: ALLOW_ALL}}}}
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
        certificate: {{file: {{certificateChain: {c}/client.pem, privateKey: {c}/client-key.pem}}}}
        validation:
          trust: {{file: {{certificateChain: {c}/ca-bundle.pem}}}}
          subjectAlternativeNames: {{match: {{exact: [spiffe://test/ns/app/vn/color]}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: thief, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: thief}}}}
  backends:
    - virtualService: {{virtualServiceRef: {{name: color}}}}
  backendDefaults:
    clientPolicy:
      tls:
        certificate: {{file: {{certificateChain: {c}/{t}.pem, privateKey: {c}/{t}-key.pem}}}}
        validation: {{trust: {{file: {{certificateChain: {c}/ca-bundle.pem}}}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: color, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: color}}}}
  listeners:
    - portMapping: {{port: 9090, protocol: tcp}}
      tls:
        mode: STRICT
        certificate: {{file: {{certificateChain: {c}/color.pem, privateKey: {c}/color-key.pem}}}}
        validation:
          trust: {{file: {{certificateChain: {c}/ca-bundle.pem}}}}
          subjectAlternativeNames: {{match: {{exact: [spiffe://test/ns/app/vn/client, spiffe://test/ns/app/vn/thief]}}}}
  serviceDiscovery: {{dns: {{hostname: color-v1.app.svc.cluster.local, responseType: ENDPOINTS}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: ghost, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: ghost}}}}
  backends:
    - virtualService: {{virtualServiceRef: {{name: color}}}}
  listeners:
    - portMapping: {{port: 8080, protocol: tcp}}
      tls:
        mode: STRICT
        certificate: {{file: {{certificateChain: {g}/ghost.pem, privateKey: {g}/ghost-key.pem}}}}
        validation: {{trust: {{file: {{certificateChain: {g}/ghost-ca.pem}}}}}}
  serviceDiscovery: {{dns: {{hostname: ghost.app.svc.cluster.local, responseType: ENDPOINTS}}}}
  backendDefaults:
    clientPolicy:
      tls:
        certificate: {{file: {{certificateChain: {g}/ghost.pem, privateKey: {g}/ghost-key.pem}}}}
        validation: {{trust: {{file: {{certificateChain: {g}/ghost-ca.pem}}}}}}
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
    ca: PathBuf,
    ghost: PathBuf,
    node1: Node,
    node2: Node,
    client: Pod,
    thief: Pod,
    certs: PathBuf,
    agent1: Agent,
    agent2: Agent,
    _server: Process,
}

fn bed(test: &str) -> anyhow::Result<Bed> {
    let tb = Testbed::new(test)?;
    require_tool("curl")?;
    let node1 = tb.add_node("node1")?;
    let node2 = tb.add_node("node2")?;
    let client = node1.add_pod(&PodSpec::new("client", "app").label("app", "client"))?;
    let thief = node1.add_pod(&PodSpec::new("thief", "app").label("app", "thief"))?;
    let color = node2.add_pod(&PodSpec::new("color", "app").label("app", "color"))?;
    tb.dns_record(COLOR, &["10.96.0.10".parse()?])?;
    tb.dns_record("color-v1.app.svc.cluster.local", &color.ips())?;
    let server = echo_server(&tb, &color, 9090, "color")?;

    let certs = tb.temp_dir().join("certs");
    let ghost = tb.temp_dir().join("ghost");
    let ca = tb.temp_dir().join("ca");
    let mesh = tb.temp_dir().join("mesh").join("mesh.yaml");
    std::fs::create_dir_all(mesh.parent().context("mesh folder")?)?;
    std::fs::write(&mesh, mesh_yaml(&certs, &ghost, "thief"))?;
    issue_mesh_certs(&node1, &mesh, &ca)?;
    // The ghost's pods run on no node: its files exist on none either.
    std::fs::remove_dir_all(&ghost)?;
    // The mesh file then points thief at color's certificate and key (`strait ca issue`
    // refuses to mint one file for two virtual nodes, so the edit comes after).
    std::fs::write(&mesh, mesh_yaml(&certs, &ghost, "color"))?;

    node1.write_workload(&client)?;
    node1.write_workload(&thief)?;
    node2.write_workload(&color)?;
    let args1 = peer_node_args([&node2], false);
    let args2 = peer_node_args([&node1], false);
    let agent1 = Agent::start(
        &tb,
        &node1,
        &mesh,
        &args1.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    let agent2 = Agent::start(
        &tb,
        &node2,
        &mesh,
        &args2.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    for pod in ["app/client", "app/thief"] {
        agent1.wait_enrolled(pod, true, Duration::from_secs(20))?;
    }
    agent2.wait_enrolled("app/color", true, Duration::from_secs(20))?;
    Ok(Bed {
        tb,
        ca,
        ghost,
        node1,
        node2,
        client,
        thief,
        certs,
        agent1,
        agent2,
        _server: server,
    })
}

/// `strait-peer call` from a pod; returns its JSON report.
fn call(pod: &Pod, target: &str) -> anyhow::Result<Value> {
    let output = run(
        pod.command(peer_binary()?)
            .args(["call", target, "-4", "--timeout", "10"]),
        Duration::from_secs(60),
    )?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.trim()).with_context(|| {
        format!(
            "strait-peer call printed no JSON report: stdout {stdout:?}, stderr {:?}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// The `/workloads` entry of a pod.
fn workload(agent: &Agent, pod: &str) -> anyhow::Result<Value> {
    agent
        .workloads()?
        .into_iter()
        .find(|w| w["pod"] == pod)
        .with_context(|| format!("{pod} is not in /workloads"))
}

#[test]
fn another_nodes_missing_certificate_files_do_not_stop_this_node() -> anyhow::Result<()> {
    // Both agents started with a mesh naming files that exist on no node (the ghost's): the
    // bed would have failed otherwise. They serve.
    let bed = bed("identity-scoped")?;
    let report = call(&bed.client, &format!("{COLOR}:9090"))?;
    assert_eq!(report["ok"], true, "{report}");
    for agent in [&bed.agent1, &bed.agent2] {
        let refused = agent
            .log_lines()
            .into_iter()
            .filter(|l| {
                l["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("ghost.pem") || m.contains("ghost-key.pem"))
            })
            .collect::<Vec<_>>();
        ensure!(
            refused.is_empty(),
            "an agent looked at the files of a virtual node it runs no pod of: {refused:?}"
        );
        assert_eq!(
            metric(agent, "strait_identity_refused", &["unreadable"])?,
            0.0
        );
    }
    // A tunnel asking node2 for the ghost's listener opens nothing: node2 runs no ghost pod.
    let output = run(
        bed.node1.command("curl").args([
            "--silent",
            "--insecure",
            "--max-time",
            "10",
            "--resolve",
            &format!("p8080.ghost.app.strait:15008:{}", bed.node2.underlay_ip()),
            "https://p8080.ghost.app.strait:15008/",
        ]),
        Duration::from_secs(20),
    )?;
    ensure!(
        !output.status.success(),
        "node2 served a tunnel for a virtual node it runs no pod of"
    );
    let refusal = bed.agent2.log_lines().into_iter().find(|l| {
        l["message"]
            .as_str()
            .is_some_and(|m| m.contains("does not hold its identity"))
    });
    ensure!(
        refusal.is_some(),
        "node2 did not say why it refused the ghost's tunnel"
    );
    Ok(())
}

#[test]
fn a_virtual_node_pointing_at_another_identitys_key_is_refused_and_the_rest_serves()
-> anyhow::Result<()> {
    let bed = bed("identity-wrong-key")?;
    let report = call(&bed.thief, &format!("{COLOR}:9090"))?;
    assert_eq!(
        report["ok"], false,
        "thief presented color's identity: {report}"
    );
    assert!(metric(&bed.agent1, "strait_identity_refused", &["wrong_identity"])? >= 1.0);
    let color_pem = bed.certs.join("color.pem").display().to_string();
    let refusal = bed
        .agent1
        .log_lines()
        .into_iter()
        .find(|l| l["reason"] == "wrong_identity")
        .context("node1 logged no wrong_identity refusal")?;
    let message = refusal["message"].as_str().unwrap_or("");
    ensure!(
        message.contains(&color_pem)
            && message.contains("spiffe://test/ns/app/vn/color")
            && message.contains("spiffe://test/ns/app/vn/thief"),
        "the refusal should name the file, the SANs found and the identity expected: {refusal}"
    );
    // The status of the thief's pod says so too.
    let status = workload(&bed.agent1, "app/thief")?;
    let error = status["identity"]["certificate"]["error"]
        .as_str()
        .unwrap_or("");
    ensure!(error.contains(&color_pem), "/workloads: {status}");
    // The rest of the mesh serves: client, on the same node, still reaches color.
    let report = call(&bed.client, &format!("{COLOR}:9090"))?;
    assert_eq!(report["ok"], true, "{report}");
    // Node2 never saw thief present anything.
    assert_eq!(
        metric(
            &bed.agent2,
            "strait_tls_failures",
            &["server", "san_mismatch"]
        )?,
        0.0
    );
    Ok(())
}

#[test]
fn a_receiving_agent_refuses_a_stolen_or_forged_identity() -> anyhow::Result<()> {
    let bed = bed("identity-stolen")?;
    // A tool on node1 (as if it held node1's files) presents color's genuine certificate to
    // color's listener, which admits client and thief only.
    let before = metric(
        &bed.agent2,
        "strait_tls_failures",
        &["server", "san_mismatch"],
    )?;
    let output = run(
        bed.node1.command("curl").args([
            "--silent",
            "--show-error",
            "--insecure",
            "--http2",
            "--max-time",
            "10",
            "--cert",
            &bed.certs.join("color.pem").display().to_string(),
            "--key",
            &bed.certs.join("color-key.pem").display().to_string(),
            "--resolve",
            &format!("p9090.color.app.strait:15008:{}", bed.node2.underlay_ip()),
            "https://p9090.color.app.strait:15008/",
        ]),
        Duration::from_secs(20),
    )?;
    ensure!(
        !output.status.success(),
        "node2 accepted color's certificate from node1: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    let after = metric(
        &bed.agent2,
        "strait_tls_failures",
        &["server", "san_mismatch"],
    )?;
    ensure!(
        after > before,
        "node2 did not count the refusal (san_mismatch {before} -> {after})"
    );
    let rejected = bed
        .agent2
        .log_lines()
        .into_iter()
        .find(|l| l["reason"] == "san_mismatch")
        .context("node2 logged no san_mismatch rejection")?;
    ensure!(
        rejected["message"]
            .as_str()
            .is_some_and(|m| m.contains("spiffe://test/ns/app/vn/color")),
        "the log line should name the presented identity: {rejected}"
    );

    // A node without client's key cannot make it up: a certificate with client's SPIFFE ID
    // from a CA of its own is refused as untrusted.
    let forged = bed.tb.temp_dir().join("forged");
    let forged_ca = bed.tb.temp_dir().join("forged-ca");
    let forged_mesh = bed.tb.temp_dir().join("forged-mesh.yaml");
    std::fs::write(
        &forged_mesh,
        mesh_yaml(&forged, &bed.tb.temp_dir().join("forged-ghost"), "thief"),
    )?;
    strait_ok(
        &bed.node1,
        &["ca", "init", "--dir", &forged_ca.display().to_string()],
    )?;
    strait_ok(
        &bed.node1,
        &[
            "ca",
            "issue",
            "--mesh",
            &forged_mesh.display().to_string(),
            "--ca-dir",
            &forged_ca.display().to_string(),
            "--virtual-node",
            "client",
        ],
    )?;
    let before = metric(&bed.agent2, "strait_tls_failures", &["server", "untrusted"])?;
    let output = run(
        bed.node1.command("curl").args([
            "--silent",
            "--insecure",
            "--http2",
            "--max-time",
            "10",
            "--cert",
            &forged.join("client.pem").display().to_string(),
            "--key",
            &forged.join("client-key.pem").display().to_string(),
            "--resolve",
            &format!("p9090.color.app.strait:15008:{}", bed.node2.underlay_ip()),
            "https://p9090.color.app.strait:15008/",
        ]),
        Duration::from_secs(20),
    )?;
    ensure!(
        !output.status.success(),
        "node2 accepted a forged certificate of client"
    );
    let after = metric(&bed.agent2, "strait_tls_failures", &["server", "untrusted"])?;
    ensure!(
        after > before,
        "node2 did not count the forged certificate as untrusted ({before} -> {after})"
    );

    // Genuine traffic is unaffected.
    let report = call(&bed.client, &format!("{COLOR}:9090"))?;
    assert_eq!(report["ok"], true, "{report}");
    Ok(())
}

#[test]
fn a_certificate_nearing_expiry_is_measured_and_warned_about() -> anyhow::Result<()> {
    let bed = bed("identity-expiry")?;
    // Client gets a certificate with one minute left of six (issued five minutes back-dated):
    // past three quarters of its life, as if its renewal had not come.
    let issue_mesh = bed.tb.temp_dir().join("issue-mesh.yaml");
    std::fs::write(&issue_mesh, mesh_yaml(&bed.certs, &bed.ghost, "thief"))?;
    strait_ok(
        &bed.node1,
        &[
            "ca",
            "issue",
            "--mesh",
            &issue_mesh.display().to_string(),
            "--ca-dir",
            &bed.ca.display().to_string(),
            "--virtual-node",
            "client",
            "--minutes",
            "1",
        ],
    )?;
    // Traffic goes on with it while it is valid.
    let report = call(&bed.client, &format!("{COLOR}:9090"))?;
    assert_eq!(report["ok"], true, "{report}");
    let mut warned = Vec::new();
    testbed::eventually(
        Duration::from_secs(20),
        "node1 warns that client's certificate is nearing expiry",
        || {
            warned = bed
                .agent1
                .log_lines()
                .into_iter()
                .filter(|l| {
                    l["level"] == "WARN"
                        && l["virtual_node"] == "app/client"
                        && l["message"]
                            .as_str()
                            .is_some_and(|m| m.contains("three quarters of its life"))
                })
                .collect();
            Ok(!warned.is_empty())
        },
    )?;
    ensure!(warned.len() == 1, "warned more than once: {warned:?}");
    let left = metric(
        &bed.agent1,
        "strait_identity_expires_in_seconds",
        &["app/client"],
    )?;
    ensure!(
        left > 0.0 && left <= 60.0,
        "strait_identity_expires_in_seconds for app/client: {left}"
    );
    // A virtual node with a year left is not warned about.
    ensure!(
        !bed.agent2.log_lines().iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.contains("three quarters of its life"))),
        "node2 warned about a certificate with a year left"
    );
    let color_left = metric(
        &bed.agent2,
        "strait_identity_expires_in_seconds",
        &["app/color"],
    )?;
    ensure!(color_left > 300.0 * 86400.0, "color: {color_left}");
    Ok(())
}
