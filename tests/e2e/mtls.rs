//! End-to-end tests of mutual TLS between nodes, inbound capture and backend authorization:
//! two testbed nodes, each with its own agent (own cgroup root, own bpffs folder), pods on
//! both, certificates minted by `strait ca`, and what a user would check: requests cross
//! nodes through both agents, the wire between the nodes carries only TLS 1.3, plaintext from
//! outside the mesh is refused by STRICT and accepted (and counted) by PERMISSIVE, the
//! backend rules hold at both enforcement points, bad certificates are rejected with the
//! reason, and a rotation under load fails nothing.
//!
//! Needs root, tcpdump and tshark; without them these tests fail (never skip) with the reason.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use serde_json::Value;
use testbed::agent::{Agent, echo_server, metric, peer_binary, strait_ok};
use testbed::scenario::peer_node_args;
use testbed::{Node, Pod, PodSpec, Process, Testbed, eventually, require_tool, run};

const COLOR: &str = "color.app.svc.cluster.local";
const WEB: &str = "web.app.svc.cluster.local";
const EPERM: i64 = 1;
/// What the HTTP server in the color pod serves: it must never show up on the wire.
const MARKER: &str = "strait-plaintext-marker-7f3a9c";

/// The mesh of these tests. `intruder_backends` doctors the intruder's backends (a compromised
/// node's view of the mesh).
fn mesh_yaml(certs: &Path, intruder_backends: bool) -> String {
    let c = certs.display();
    let intruder = if intruder_backends {
        "  backends:\n    - virtualService: {virtualServiceRef: {name: color}}\n"
    } else {
        ""
    };
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
    - virtualService: {{virtualServiceRef: {{name: web}}}}
  backendDefaults:
    clientPolicy:
      tls:
        enforce: true
        certificate: {{file: {{certificateChain: {c}/client.pem, privateKey: {c}/client-key.pem}}}}
        validation:
          trust: {{file: {{certificateChain: {c}/ca-bundle.pem}}}}
          subjectAlternativeNames: {{match: {{exact: [spiffe://test/ns/app/vn/color, spiffe://test/ns/app/vn/web]}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: intruder, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: intruder}}}}
{intruder}  backendDefaults:
    clientPolicy:
      tls:
        certificate: {{file: {{certificateChain: {c}/intruder.pem, privateKey: {c}/intruder-key.pem}}}}
        validation: {{trust: {{file: {{certificateChain: {c}/ca-bundle.pem}}}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: color, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: color}}}}
  listeners:
    - portMapping: {{port: 8080, protocol: tcp}}
      tls: &strict
        mode: STRICT
        certificate: {{file: {{certificateChain: {c}/color.pem, privateKey: {c}/color-key.pem}}}}
        validation:
          trust: {{file: {{certificateChain: {c}/ca-bundle.pem}}}}
          subjectAlternativeNames: {{match: {{exact: [spiffe://test/ns/app/vn/client, spiffe://test/ns/app/vn/intruder]}}}}
    - portMapping: {{port: 9090, protocol: tcp}}
      tls: *strict
  serviceDiscovery: {{dns: {{hostname: color-v1.app.svc.cluster.local, responseType: ENDPOINTS}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: web, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  listeners:
    - portMapping: {{port: 8080, protocol: tcp}}
      tls:
        mode: PERMISSIVE
        certificate: {{file: {{certificateChain: {c}/web.pem, privateKey: {c}/web-key.pem}}}}
        validation: {{trust: {{file: {{certificateChain: {c}/ca-bundle.pem}}}}}}
  serviceDiscovery: {{dns: {{hostname: web-v1.app.svc.cluster.local, responseType: ENDPOINTS}}}}
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
metadata: {{name: web, namespace: app}}
spec:
  awsName: {WEB}
  provider: {{virtualNode: {{virtualNodeRef: {{name: web}}}}}}
"#
    )
}

/// Two nodes: node1 runs the client, the intruder and a pod outside the mesh; node2 runs
/// color (STRICT; HTTP on 8080, echo on 9090) and web (PERMISSIVE; echo on 8080).
struct Bed {
    tb: Testbed,
    node1: Node,
    node2: Node,
    client: Pod,
    intruder: Pod,
    outside: Pod,
    /// A client on node2 (same node as color and web).
    local_client: Pod,
    color: Pod,
    web: Pod,
    certs: PathBuf,
    ca: PathBuf,
    mesh1: PathBuf,
    mesh2: PathBuf,
    agent1: Agent,
    agent2: Agent,
    _servers: Vec<Process>,
}

fn bed(test: &str) -> anyhow::Result<Bed> {
    let tb = Testbed::new(test)?;
    require_tool("tcpdump")?;
    require_tool("tshark")?;
    let node1 = tb.add_node("node1")?;
    let node2 = tb.add_node("node2")?;
    let client = node1.add_pod(&PodSpec::new("client", "app").label("app", "client"))?;
    let intruder = node1.add_pod(&PodSpec::new("intruder", "app").label("app", "intruder"))?;
    let outside = node1.add_pod(&PodSpec::new("stranger", "outside").label("app", "stranger"))?;
    let color = node2.add_pod(&PodSpec::new("color", "app").label("app", "color"))?;
    let web = node2.add_pod(&PodSpec::new("web", "app").label("app", "web"))?;
    // Pods must exist before the agents start: an agent lives in its own mount namespace
    // and does not see netns files mounted after it.
    let local_client =
        node2.add_pod(&PodSpec::new("client-local", "app").label("app", "client"))?;
    tb.dns_record(COLOR, &["10.96.0.10".parse()?])?;
    tb.dns_record(WEB, &["10.96.0.11".parse()?])?;
    tb.dns_record("color-v1.app.svc.cluster.local", &color.ips())?;
    tb.dns_record("web-v1.app.svc.cluster.local", &web.ips())?;

    let mut servers = Vec::new();
    let site = tb.temp_dir().join("site");
    std::fs::create_dir_all(&site)?;
    std::fs::write(site.join("secret.txt"), format!("{MARKER}\n"))?;
    let http = tb.spawn(
        "color-http",
        color
            .command("/usr/bin/python3")
            .args([
                "-m",
                "http.server",
                "8080",
                "--bind",
                "0.0.0.0",
                "--directory",
            ])
            .arg(&site),
    )?;
    http.wait_listening(8080, Duration::from_secs(20))?;
    servers.push(http);
    for (pod, port, name) in [(&color, 9090, "color"), (&web, 8080, "web")] {
        let server = echo_server(&tb, pod, port, name)?;
        servers.push(server);
    }

    let certs = tb.temp_dir().join("certs");
    let ca = tb.temp_dir().join("ca");
    let mesh1 = tb.temp_dir().join("node1-mesh").join("mesh.yaml");
    let mesh2 = tb.temp_dir().join("node2-mesh").join("mesh.yaml");
    for mesh in [&mesh1, &mesh2] {
        std::fs::create_dir_all(mesh.parent().context("mesh folder")?)?;
        std::fs::write(mesh, mesh_yaml(&certs, false))?;
    }
    strait_ok(&node1, &["ca", "init", "--dir", &ca.display().to_string()])?;
    issue(&node1, &mesh1, &ca, &[])?;

    for pod in [&client, &intruder] {
        node1.write_workload(pod)?;
    }
    for pod in [&color, &web, &local_client] {
        node2.write_workload(pod)?;
    }
    let args1 = peer_node_args([&node2], true);
    let args2 = peer_node_args([&node1], true);
    let agent1 = Agent::start(
        &tb,
        &node1,
        &mesh1,
        &args1.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    let agent2 = Agent::start(
        &tb,
        &node2,
        &mesh2,
        &args2.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    for pod in ["app/client", "app/intruder"] {
        agent1.wait_enrolled(pod, true, Duration::from_secs(20))?;
    }
    for pod in ["app/color", "app/web", "app/client-local"] {
        agent2.wait_enrolled(pod, true, Duration::from_secs(20))?;
    }
    Ok(Bed {
        tb,
        node1,
        node2,
        client,
        intruder,
        outside,
        local_client,
        color,
        web,
        certs,
        ca,
        mesh1,
        mesh2,
        agent1,
        agent2,
        _servers: servers,
    })
}

fn issue(node: &Node, mesh: &Path, ca: &Path, extra: &[&str]) -> anyhow::Result<String> {
    let mut args = vec![
        "ca".to_string(),
        "issue".into(),
        "--mesh".into(),
        mesh.display().to_string(),
        "--ca-dir".into(),
        ca.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    strait_ok(node, &args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// `strait-peer call` from a pod; returns its JSON report.
fn call(pod: &Pod, target: &str, args: &[&str]) -> anyhow::Result<Value> {
    let output = run(
        pod.command(peer_binary()?)
            .args(["call", target])
            .args(args),
        Duration::from_secs(120),
    )?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.trim()).with_context(|| {
        format!(
            "strait-peer call printed no JSON report: stdout {stdout:?}, stderr {:?}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

fn log_lines(agent: &Agent, target: &str, message: &str) -> Vec<Value> {
    agent
        .log_lines()
        .into_iter()
        .filter(|l| l["target"] == target && l["message"] == message)
        .collect()
}

#[test]
fn cross_node_http_and_tcp_cross_both_agents_and_the_wire_carries_only_tls13() -> anyhow::Result<()>
{
    let bed = bed("mtls-wire")?;
    let pcap = bed.tb.temp_dir().join("underlay.pcap");
    let tcpdump = bed.tb.spawn(
        "tcpdump",
        bed.node1
            .command("tcpdump")
            .args(["-i", testbed::NODE_UNDERLAY_IF, "-U", "-s", "0", "-w"])
            .arg(&pcap)
            .args(["tcp"]),
    )?;
    eventually(Duration::from_secs(10), "tcpdump listening", || {
        Ok(tcpdump.stderr().contains("listening on"))
    })?;

    // HTTP with curl, through both agents.
    let output = run(
        bed.client
            .command("curl")
            .args(["--silent", "--show-error", "--fail", "--max-time", "20"])
            .arg(format!("http://{COLOR}:8080/secret.txt")),
        Duration::from_secs(30),
    )?;
    ensure!(
        output.status.success(),
        "curl through the mesh failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), MARKER);

    // TCP with a checked echo, several connections (one pooled tunnel).
    let report = call(
        &bed.client,
        &format!("{COLOR}:9090"),
        &["-4", "--count", "5", "--bytes", "200000"],
    )?;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["by_server"]["color"], 5, "{report}");

    // Both agents saw it: node1 forwarded to color's endpoint on node2, node2 accepted the
    // tunnel streams from the client's verified identity.
    let sent = bed.agent1.connection_logs();
    assert!(
        sent.iter().any(|l| l["virtual_node"] == "app/color"
            && l["endpoint"] == format!("{}:9090", bed.color.ipv4())),
        "node1 logged no forwarded connection: {sent:?}"
    );
    eventually(
        Duration::from_secs(10),
        "node2 logs the tunnel streams",
        || Ok(log_lines(&bed.agent2, "strait::tunnel", "tunnel stream closed").len() >= 6),
    )?;
    let streams = log_lines(&bed.agent2, "strait::tunnel", "tunnel stream closed");
    for line in &streams {
        let identity = line["peer_identity"].as_str().unwrap_or("");
        assert!(
            identity.contains("spiffe://test/ns/app/vn/client"),
            "{line}"
        );
        assert_eq!(line["source_workload"], "app/client", "{line}");
    }
    let accepted = log_lines(&bed.agent2, "strait::tunnel", "mTLS tunnel accepted");
    ensure!(!accepted.is_empty(), "node2 logged no accepted tunnel");
    assert!(
        accepted.iter().all(|l| l["tls_version"] == "TLSv1.3"),
        "{accepted:?}"
    );
    // One TLS connection per destination listener, not one per request.
    assert_eq!(accepted.len(), 2, "{accepted:?}");
    assert_eq!(
        metric(&bed.agent2, "strait_tunnel_streams", &["inbound"])?,
        6.0
    );

    tcpdump.signal(libc::SIGINT)?;
    tcpdump.wait_timeout(Duration::from_secs(10))?;
    let bytes = std::fs::read(&pcap)?;
    ensure!(
        bytes.len() > 10_000,
        "the capture is nearly empty ({} bytes)",
        bytes.len()
    );
    // No payload in plaintext: neither the HTTP body nor the request line.
    for needle in [
        MARKER.as_bytes(),
        b"GET /secret.txt".as_slice(),
        b"strait-peer name=",
    ] {
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "{:?} appears in plaintext on the underlay",
            String::from_utf8_lossy(needle)
        );
    }
    let tshark = |filter: &str, fields: &[&str]| -> anyhow::Result<Vec<String>> {
        let mut cmd = std::process::Command::new("tshark");
        cmd.arg("-r")
            .arg(&pcap)
            .args(["-d", "tcp.port==15008,tls", "-Y", filter, "-T", "fields"]);
        for f in fields {
            cmd.args(["-e", f]);
        }
        let out = run(&mut cmd, Duration::from_secs(60))?;
        ensure!(
            out.status.success(),
            "tshark: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect())
    };
    // Every segment with payload is on the tunnel port...
    let elsewhere = tshark("tcp.len > 0 && tcp.port != 15008", &["frame.number"])?;
    assert!(
        elsewhere.is_empty(),
        "payload outside the tunnel: frames {elsewhere:?}"
    );
    // ...every stream with payload negotiated TLS 1.3...
    let streams: std::collections::BTreeSet<String> = tshark("tcp.len > 0", &["tcp.stream"])?
        .into_iter()
        .collect();
    let hellos = tshark(
        "tls.handshake.type == 2",
        &["tcp.stream", "tls.handshake.extensions.supported_version"],
    )?;
    let tls13: std::collections::BTreeSet<String> = hellos
        .iter()
        .filter(|l| l.ends_with("0x0304"))
        .map(|l| l.split('\t').next().unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        hellos.len(),
        tls13.len(),
        "a ServerHello that is not TLS 1.3: {hellos:?}"
    );
    assert_eq!(streams, tls13, "streams with payload vs TLS 1.3 handshakes");
    // ...and after the handshakes, only encrypted application data.
    // (TLS 1.3 hides the real type of encrypted records behind an opaque type 23.)
    let types = tshark(
        "tls.record",
        &["tls.record.content_type", "tls.record.opaque_type"],
    )?;
    let values: Vec<&str> = types
        .iter()
        .flat_map(|l| l.split(['\t', ',']))
        .filter(|v| !v.is_empty())
        .collect();
    let unexpected: Vec<&&str> = values
        .iter()
        .filter(|t| !matches!(**t, "22" | "20" | "23"))
        .collect();
    assert!(
        unexpected.is_empty(),
        "TLS records of unexpected types: {unexpected:?}"
    );
    assert!(
        values.iter().filter(|t| **t == "23").count() > 10,
        "too few application data records: {types:?}"
    );
    Ok(())
}

#[test]
fn plaintext_from_outside_the_mesh_strict_refuses_permissive_accepts() -> anyhow::Result<()> {
    let bed = bed("mtls-inbound")?;
    // STRICT: straight to the color pod's address from a pod outside the mesh.
    let report = call(&bed.outside, &format!("{}:9090", bed.color.ipv4()), &["-4"])?;
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(
        metric(
            &bed.agent2,
            "strait_inbound_plaintext",
            &["strict", "refused"]
        )?,
        1.0
    );
    let report = call(
        &bed.outside,
        &format!("[{}]:9090", bed.color.ipv6()),
        &["-6"],
    )?;
    assert_eq!(report["ok"], false, "IPv6 too: {report}");
    assert_eq!(
        metric(
            &bed.agent2,
            "strait_inbound_plaintext",
            &["strict", "refused"]
        )?,
        2.0
    );
    // PERMISSIVE: accepted, served by the pod, counted.
    let report = call(
        &bed.outside,
        &format!("{}:8080", bed.web.ipv4()),
        &["-4", "--bytes", "50000"],
    )?;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["by_server"]["web"], 1, "{report}");
    assert_eq!(
        metric(
            &bed.agent2,
            "strait_inbound_plaintext",
            &["permissive", "accepted"]
        )?,
        1.0
    );
    assert!(metric(&bed.agent2, "strait_inpod_events", &["inbound_steered"])? >= 3.0);
    // The mesh itself still reaches both, through the tunnel.
    let report = call(&bed.client, &format!("{COLOR}:9090"), &["-4"])?;
    assert_eq!(report["ok"], true, "{report}");
    let report = call(&bed.client, &format!("{WEB}:8080"), &["-4"])?;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(
        metric(&bed.agent2, "strait_inbound_plaintext", &["strict"])?,
        2.0
    );
    Ok(())
}

#[test]
fn a_virtual_node_without_the_backend_is_refused_at_both_enforcement_points() -> anyhow::Result<()>
{
    let bed = bed("mtls-authz")?;
    // Sending node: the connect hook refuses with EPERM before a packet leaves.
    let report = call(&bed.intruder, &format!("{COLOR}:9090"), &["-4"])?;
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(
        report["errors"][0]["errno"].as_i64(),
        Some(EPERM),
        "{report}"
    );
    assert_eq!(
        metric(&bed.agent1, "strait_inpod_events", &["not_a_backend"])?,
        1.0
    );

    // A compromised node1 whose mesh says otherwise: the receiving node still refuses, from
    // the intruder's verified certificate.
    std::fs::write(&bed.mesh1, mesh_yaml(&bed.certs, true))?;
    let mut last = Value::Null;
    eventually(
        Duration::from_secs(15),
        "node1 applies the doctored mesh",
        || {
            last = call(&bed.intruder, &format!("{COLOR}:9090"), &["-4"])?;
            Ok(last["errors"][0]["errno"].as_i64() != Some(EPERM))
        },
    )?;
    assert_eq!(
        last["ok"], false,
        "the receiving node let the intruder in: {last}"
    );
    assert!(metric(&bed.agent2, "strait_authz_denied", &["receiver"])? >= 1.0);
    let refused = bed
        .agent2
        .log_lines()
        .into_iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("tunnel stream refused"))
        })
        .collect::<Vec<_>>();
    ensure!(!refused.is_empty(), "node2 logged no refusal");
    assert!(
        refused[0]["peer_identity"]
            .as_str()
            .is_some_and(|s| s.contains("spiffe://test/ns/app/vn/intruder")),
        "{:?}",
        refused[0]
    );
    // The legitimate client is unaffected.
    let report = call(&bed.client, &format!("{COLOR}:9090"), &["-4"])?;
    assert_eq!(report["ok"], true, "{report}");
    let _ = (&bed.mesh2, &bed.node2);
    Ok(())
}

#[test]
fn a_wrong_san_and_an_expired_certificate_are_rejected_with_the_reason() -> anyhow::Result<()> {
    let bed = bed("mtls-badcert")?;
    let report = call(&bed.client, &format!("{COLOR}:9090"), &["-4"])?;
    assert_eq!(report["ok"], true, "{report}");

    issue(
        &bed.node1,
        &bed.mesh1,
        &bed.ca,
        &[
            "--virtual-node",
            "client",
            "--san",
            "spiffe://test/ns/app/vn/impostor",
        ],
    )?;
    let report = call(&bed.client, &format!("{COLOR}:9090"), &["-4"])?;
    assert_eq!(report["ok"], false, "a wrong SAN was accepted: {report}");
    // The client's own agent refuses to present a certificate that is not the client's
    // identity (a receiving agent's refusal of a wrong SAN: tests/e2e/identity.rs).
    assert!(metric(&bed.agent1, "strait_identity_refused", &["wrong_identity"])? >= 1.0);
    let rejected = bed
        .agent1
        .log_lines()
        .into_iter()
        .find(|l| l["reason"] == "wrong_identity");
    let rejected = rejected.context("node1 logged no wrong_identity refusal")?;
    assert!(
        rejected["message"]
            .as_str()
            .is_some_and(|m| m.contains("impostor")),
        "the log line should name the SAN found: {rejected}"
    );

    issue(
        &bed.node1,
        &bed.mesh1,
        &bed.ca,
        &["--virtual-node", "client", "--expired"],
    )?;
    let report = call(&bed.client, &format!("{COLOR}:9090"), &["-4"])?;
    assert_eq!(
        report["ok"], false,
        "an expired certificate was accepted: {report}"
    );
    assert!(metric(&bed.agent2, "strait_tls_failures", &["server", "expired"])? >= 1.0);

    // An expired server certificate is rejected by the client's agent.
    issue(
        &bed.node1,
        &bed.mesh1,
        &bed.ca,
        &["--virtual-node", "client"],
    )?;
    issue(
        &bed.node1,
        &bed.mesh1,
        &bed.ca,
        &["--virtual-node", "color", "--expired"],
    )?;
    let report = call(&bed.client, &format!("{COLOR}:9090"), &["-4"])?;
    assert_eq!(
        report["ok"], false,
        "an expired server certificate was accepted: {report}"
    );
    assert!(metric(&bed.agent1, "strait_tls_failures", &["client", "expired"])? >= 1.0);

    // Good certificates again: traffic resumes without restarting anything.
    issue(
        &bed.node1,
        &bed.mesh1,
        &bed.ca,
        &["--virtual-node", "color"],
    )?;
    let report = call(&bed.client, &format!("{COLOR}:9090"), &["-4"])?;
    assert_eq!(report["ok"], true, "{report}");
    Ok(())
}

#[test]
fn rotating_certificates_under_a_steady_stream_fails_no_request() -> anyhow::Result<()> {
    let bed = bed("mtls-rotate")?;
    let caller = bed.tb.spawn(
        "steady-client",
        bed.client.command(peer_binary()?).args([
            "call",
            &format!("{COLOR}:9090"),
            "-4",
            "--count",
            "400",
            "--bytes",
            "20000",
            "--timeout",
            "20",
        ]),
    )?;
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(700));
        issue(&bed.node1, &bed.mesh1, &bed.ca, &[])?;
    }
    let status = caller.wait_timeout(Duration::from_secs(240))?;
    let report: Value = serde_json::from_str(caller.stdout().trim())
        .with_context(|| format!("no report from the steady client: {}", caller.stderr()))?;
    assert!(status.success(), "{report}");
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["succeeded"], 400, "{report}");
    // The rotations were really picked up, on both sides.
    assert!(metric(&bed.agent1, "strait_certificate_reloads", &[])? >= 1.0);
    assert!(metric(&bed.agent2, "strait_certificate_reloads", &[])? >= 1.0);
    assert!(metric(&bed.agent2, "strait_tunnel_connections", &["inbound"])? >= 2.0);
    Ok(())
}

#[test]
fn same_node_traffic_stays_on_the_node() -> anyhow::Result<()> {
    let bed = bed("mtls-samenode")?;
    // A client on node2 calling color (also on node2): delivered on the node, no tunnel.
    let report = call(
        &bed.local_client,
        &format!("{COLOR}:9090"),
        &["-4", "--count", "3"],
    )?;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(metric(&bed.agent2, "strait_tunnel_streams", &[])?, 0.0);
    assert_eq!(metric(&bed.agent1, "strait_tunnel_streams", &[])?, 0.0);
    let _ = (&bed.intruder, &bed.web, &bed.outside);
    Ok(())
}

/// Virtual node names the loader accepts but that are not DNS labels (a dot, as in `color.v1`;
/// more than 63 characters) are reachable over mTLS across nodes: the tunnel's server name
/// carries them as a digest the receiving agent resolves.
#[test]
fn dotted_and_long_virtual_node_names_are_reached_across_nodes() -> anyhow::Result<()> {
    let long = format!("color-{}", "x".repeat(70));
    let tb = Testbed::new("sninames")?;
    let node1 = tb.add_node("node1")?;
    let node2 = tb.add_node("node2")?;
    let client = node1.add_pod(&PodSpec::new("client", "app").label("app", "client"))?;
    let dotted = node2.add_pod(&PodSpec::new("dotted", "app").label("app", "dotted"))?;
    let longpod = node2.add_pod(&PodSpec::new("long", "app").label("app", "long"))?;
    tb.dns_record("dotted.app.svc.cluster.local", &["10.96.0.20".parse()?])?;
    tb.dns_record("long.app.svc.cluster.local", &["10.96.0.21".parse()?])?;
    tb.dns_record("dotted-ep.app.svc.cluster.local", &dotted.ips())?;
    tb.dns_record("long-ep.app.svc.cluster.local", &longpod.ips())?;
    let peer = peer_binary()?;
    let mut servers = Vec::new();
    for (pod, name) in [(&dotted, "dotted"), (&longpod, "long")] {
        let server = tb.spawn(
            &format!("server-{name}"),
            pod.command(&peer).args([
                "serve",
                "--listen",
                "0.0.0.0:8080,[::]:8080",
                "--name",
                name,
            ]),
        )?;
        server.wait_listening(8080, Duration::from_secs(10))?;
        servers.push(server);
    }
    let certs = tb.temp_dir().join("certs");
    let c = certs.display();
    let server_node = |vn: &str, label: &str, file: &str, host: &str| {
        format!(
            r#"---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: {vn}, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: {label}}}}}
  listeners:
    - portMapping: {{port: 8080, protocol: tcp}}
      tls:
        mode: STRICT
        certificate: {{file: {{certificateChain: {c}/{file}.pem, privateKey: {c}/{file}-key.pem}}}}
        validation:
          trust: {{file: {{certificateChain: {c}/ca-bundle.pem}}}}
          subjectAlternativeNames: {{match: {{exact: [spiffe://test/ns/app/vn/client]}}}}
  serviceDiscovery: {{dns: {{hostname: {host}, responseType: ENDPOINTS}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {{name: {label}, namespace: app}}
spec:
  awsName: {label}.app.svc.cluster.local
  provider: {{virtualNode: {{virtualNodeRef: {{name: {vn}}}}}}}
"#
        )
    };
    let mesh = format!(
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
    - virtualService: {{virtualServiceRef: {{name: dotted}}}}
    - virtualService: {{virtualServiceRef: {{name: long}}}}
  backendDefaults:
    clientPolicy:
      tls:
        enforce: true
        certificate: {{file: {{certificateChain: {c}/client.pem, privateKey: {c}/client-key.pem}}}}
        validation:
          trust: {{file: {{certificateChain: {c}/ca-bundle.pem}}}}
{}{}"#,
        server_node(
            "color.v1",
            "dotted",
            "dotted",
            "dotted-ep.app.svc.cluster.local"
        ),
        server_node(&long, "long", "long", "long-ep.app.svc.cluster.local"),
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
    issue(&node1, &meshes[0], &ca, &[])?;
    node1.write_workload(&client)?;
    node2.write_workload(&dotted)?;
    node2.write_workload(&longpod)?;
    let args1 = peer_node_args([&node2], true);
    let args2 = peer_node_args([&node1], true);
    let agent1 = Agent::start(
        &tb,
        &node1,
        &meshes[0],
        &args1.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    let agent2 = Agent::start(
        &tb,
        &node2,
        &meshes[1],
        &args2.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    agent1.wait_enrolled("app/client", true, Duration::from_secs(20))?;
    for pod in ["app/dotted", "app/long"] {
        agent2.wait_enrolled(pod, true, Duration::from_secs(20))?;
    }

    for (service, server) in [("dotted", "dotted"), ("long", "long")] {
        let report = call(
            &client,
            &format!("{service}.app.svc.cluster.local:8080"),
            &["-4", "--count", "3"],
        )?;
        assert_eq!(report["ok"], true, "{service}: {report}");
        assert_eq!(report["by_server"][server], 3, "{service}: {report}");
    }
    // Both crossed as mTLS tunnels that node2 accepted for the right virtual node.
    let accepted = log_lines(&agent2, "strait::tunnel", "mTLS tunnel accepted");
    for vn in ["app/color.v1".to_string(), format!("app/{long}")] {
        assert!(
            accepted.iter().any(|l| l["virtual_node"] == vn.as_str()),
            "no tunnel accepted for {vn}: {accepted:?}"
        );
    }
    drop(servers);
    Ok(())
}
