//! The demo's mutual-TLS section: two more nodes in the same testbed, each with its own agent,
//! a client on one calling a STRICT service on the other through the agents' mTLS tunnel, the
//! peer identities each agent saw, and a plaintext call from outside the mesh being refused.
//! Kept apart from the main demo so both can change without stepping on each other.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use serde_json::Value;
use testbed::agent::{Agent, peer_binary, strait, strait_ok};
use testbed::scenario::peer_node_args;
use testbed::{Pod, PodSpec, Testbed, run};

use super::{s, say};

const SERVICE: &str = "color.secure.svc.cluster.local";

fn mesh(certs: &Path) -> String {
    let c = certs.display();
    format!(
        r#"apiVersion: appmesh.k8s.aws/v1beta2
kind: Mesh
metadata: {{name: demo}}
spec: {{egressFilter: {{type: DROP_ALL}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: client, namespace: secure}}
spec:
  podSelector: {{matchLabels: {{app: client}}}}
  backends: [{{virtualService: {{virtualServiceRef: {{name: color}}}}}}]
  backendDefaults:
    clientPolicy:
      tls:
        certificate: {{file: {{certificateChain: {c}/client.pem, privateKey: {c}/client-key.pem}}}}
        validation:
          trust: {{file: {{certificateChain: {c}/ca-bundle.pem}}}}
          subjectAlternativeNames: {{match: {{exact: [spiffe://demo/ns/secure/vn/color]}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: color, namespace: secure}}
spec:
  podSelector: {{matchLabels: {{app: color}}}}
  listeners:
    - portMapping: {{port: 8080, protocol: tcp}}
      tls:
        mode: STRICT
        certificate: {{file: {{certificateChain: {c}/color.pem, privateKey: {c}/color-key.pem}}}}
        validation:
          trust: {{file: {{certificateChain: {c}/ca-bundle.pem}}}}
          subjectAlternativeNames: {{match: {{exact: [spiffe://demo/ns/secure/vn/client]}}}}
  serviceDiscovery: {{dns: {{hostname: color-v1.secure.svc.cluster.local}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {{name: color, namespace: secure}}
spec:
  awsName: {SERVICE}
  provider: {{virtualNode: {{virtualNodeRef: {{name: color}}}}}}
"#
    )
}

/// `strait-peer call TARGET ARGS` from a pod; its JSON report.
fn call(pod: &Pod, args: &[&str]) -> Result<Value> {
    let output = run(
        pod.command(peer_binary()?).arg("call").args(args),
        Duration::from_secs(120),
    )?;
    Ok(serde_json::from_str(
        String::from_utf8_lossy(&output.stdout).trim(),
    )?)
}

pub fn section(tb: &Testbed) -> Result<()> {
    say(
        "Mutual TLS between nodes: two more nodes, each with its own agent. The client on nodeA calls \
         color on nodeB; color's listener is STRICT.",
    );
    let node_a = tb.add_node("node-a")?;
    let node_b = tb.add_node("node-b")?;
    let client = node_a.add_pod(&PodSpec::new("client", "secure").label("app", "client"))?;
    let outside = node_a.add_pod(&PodSpec::new("visitor", "elsewhere").label("app", "visitor"))?;
    let color = node_b.add_pod(&PodSpec::new("color", "secure").label("app", "color"))?;
    tb.dns_record(SERVICE, &["10.96.0.20".parse()?])?;
    tb.dns_record("color-v1.secure.svc.cluster.local", &color.ips())?;
    let server = tb.spawn(
        "secure-color",
        color.command(peer_binary()?).args([
            "serve",
            "--listen",
            "0.0.0.0:8080",
            "--name",
            "color",
        ]),
    )?;
    server.wait_listening(8080, Duration::from_secs(10))?;

    let certs = tb.temp_dir().join("secure-certs");
    let ca = tb.temp_dir().join("secure-ca");
    let mesh_path = tb.temp_dir().join("secure-mesh").join("mesh.yaml");
    std::fs::create_dir_all(mesh_path.parent().unwrap_or(tb.temp_dir()))?;
    std::fs::write(&mesh_path, mesh(&certs))?;
    let ca_s = ca.display().to_string();
    let mesh_s = mesh_path.display().to_string();
    say("`strait ca init`, then `strait ca issue --mesh FILE`: a certificate per virtual node.");
    strait_ok(&node_a, &["ca", "init", "--dir", &ca_s])?;
    let issued = strait_ok(
        &node_a,
        &["ca", "issue", "--mesh", &mesh_s, "--ca-dir", &ca_s],
    )?;
    for line in issued.lines() {
        println!("  {line}");
    }

    node_a.write_workload(&client)?;
    node_b.write_workload(&color)?;
    let args_a = peer_node_args([&node_b], false);
    let args_b = peer_node_args([&node_a], false);
    let agent_a = Agent::start(
        tb,
        &node_a,
        &mesh_path,
        &args_a.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    let agent_b = Agent::start(
        tb,
        &node_b,
        &mesh_path,
        &args_b.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    agent_a.wait_enrolled("secure/client", true, Duration::from_secs(20))?;
    agent_b.wait_enrolled("secure/color", true, Duration::from_secs(20))?;

    let report = call(
        &client,
        &[
            &format!("{SERVICE}:8080"),
            "-4",
            "--count",
            "10",
            "--bytes",
            "10000",
        ],
    )?;
    say(&format!(
        "The client made 10 connections to {SERVICE}:8080: ok={}, answered by {}.",
        report["ok"], report["by_server"]
    ));
    let tunnel = |agent: &Agent, message: &str| -> Vec<Value> {
        agent
            .log_lines()
            .into_iter()
            .filter(|l| l["target"] == "strait::tunnel" && l["message"] == message)
            .collect()
    };
    say("The peer identities the agents saw (one pooled TLS 1.3 connection carries all 10):");
    for line in tunnel(&agent_a, "mTLS tunnel connected") {
        println!(
            "  nodeA -> {}: presented {}, server proved {} ({})",
            s(&line["node"]),
            s(&line["local_identity"]),
            s(&line["peer_identity"]),
            s(&line["tls_version"])
        );
    }
    for line in tunnel(&agent_b, "mTLS tunnel accepted") {
        println!(
            "  nodeB <- {}: client proved {} ({}), for {} port {}",
            s(&line["peer"]),
            s(&line["peer_identity"]),
            s(&line["tls_version"]),
            s(&line["virtual_node"]),
            s(&line["port"])
        );
    }

    let report = call(&outside, &[&format!("{}:8080", color.ipv4()), "-4"])?;
    say(&format!(
        "A pod outside the mesh connecting straight to color's address in plaintext: ok={} \
         (STRICT: the agent in color's pod refused it).",
        report["ok"]
    ));
    agent_a.stop()?;
    agent_b.stop()?;
    for node in [&node_a, &node_b] {
        let bpffs = node.bpffs().display().to_string();
        strait(node, &["uninstall", "--bpffs", &bpffs])?;
    }
    Ok(())
}
