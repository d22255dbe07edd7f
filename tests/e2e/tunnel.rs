//! End-to-end tests of the node-to-node mTLS tunnel's limits and of authorization at the
//! destination listener, on three testbed nodes with `strait ca` certificates:
//!
//! - a listener's `validation.subjectAlternativeNames` holds for callers on the same node as
//!   the listener's pod (no tunnel, no certificate) as it does for callers on another node
//!   (checked on the tunnel's client certificate), with the same reason counter;
//! - a thousand concurrent long-lived TCP connections from one pod to pods on other nodes are
//!   all open at once and all echo (the tunnel opens more connections past 100 streams each);
//! - a peer node whose underlay link is cut (no reset, no FIN: packets just vanish) is found
//!   by the tunnel keepalive within its timeout, the streams through it close, and new
//!   connections go to the other node at once.
//!
//! Needs root; without it these tests fail (never skip) with the reason.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;
use testbed::agent::{Agent, echo_server, issue_mesh_certs, metric, peer_binary};
use testbed::scenario::peer_node_args;
use testbed::{Node, Pod, PodSpec, Process, Testbed, eventually, run};

const COLOR: &str = "color.app.svc.cluster.local";
const ECHO: &str = "echo.app.svc.cluster.local";
const CALLER_ID: &str = "spiffe://test/ns/app/vn/caller";

/// The two load-bearing tests each push a 2-core machine hard; they do not run at once.
static HEAVY: Mutex<()> = Mutex::new(());

/// `caller` may call `color` (9090) and `echo` (7070); `denied` may call `color` too (it is a
/// backend: the backend rule lets it through) but the listener's SANs name only `caller`.
fn mesh_yaml(certs: &Path) -> String {
    let c = certs.display();
    format!(
        r#"apiVersion: appmesh.k8s.aws/v1beta2
kind: Mesh
metadata: {{name: test}}
spec: {{egressFilter: {{type: ALLOW_ALL}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: caller, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: caller}}}}
  backends:
    - virtualService: {{virtualServiceRef: {{name: color}}}}
    - virtualService: {{virtualServiceRef: {{name: echo}}}}
  backendDefaults:
    clientPolicy:
      tls:
        certificate: {{file: {{certificateChain: {c}/caller.pem, privateKey: {c}/caller-key.pem}}}}
        validation: {{trust: {{file: {{certificateChain: {c}/ca-bundle.pem}}}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: denied, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: denied}}}}
  backends:
    - virtualService: {{virtualServiceRef: {{name: color}}}}
  backendDefaults:
    clientPolicy:
      tls:
        certificate: {{file: {{certificateChain: {c}/denied.pem, privateKey: {c}/denied-key.pem}}}}
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
          subjectAlternativeNames: {{match: {{exact: [{CALLER_ID}]}}}}
  serviceDiscovery: {{dns: {{hostname: color-v1.app.svc.cluster.local, responseType: ENDPOINTS}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: echo, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: echo}}}}
  listeners:
    - portMapping: {{port: 7070, protocol: tcp}}
      tls:
        mode: STRICT
        certificate: {{file: {{certificateChain: {c}/echo.pem, privateKey: {c}/echo-key.pem}}}}
        validation:
          trust: {{file: {{certificateChain: {c}/ca-bundle.pem}}}}
          subjectAlternativeNames: {{match: {{exact: [{CALLER_ID}]}}}}
  serviceDiscovery: {{dns: {{hostname: echo-v1.app.svc.cluster.local, responseType: ENDPOINTS}}}}
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
metadata: {{name: echo, namespace: app}}
spec:
  awsName: {ECHO}
  provider: {{virtualNode: {{virtualNodeRef: {{name: echo}}}}}}
"#
    )
}

/// node1: `caller`, `denied`; node2: `color` (echo named `color` on 9090), `echo-a` (echo
/// named `echo-a` on 7070), `caller-local`, `denied-local`; node3: `echo-b`.
struct Bed {
    tb: Testbed,
    node3: Node,
    caller: Pod,
    denied: Pod,
    caller_local: Pod,
    denied_local: Pod,
    agent1: Agent,
    agent2: Agent,
    _agent3: Agent,
    _servers: Vec<Process>,
}

fn bed(test: &str, agent_args: &[&str]) -> anyhow::Result<Bed> {
    let tb = Testbed::new(test)?;
    let node1 = tb.add_node("node1")?;
    let node2 = tb.add_node("node2")?;
    let node3 = tb.add_node("node3")?;
    let caller = node1.add_pod(&PodSpec::new("caller", "app").label("app", "caller"))?;
    let denied = node1.add_pod(&PodSpec::new("denied", "app").label("app", "denied"))?;
    let color = node2.add_pod(&PodSpec::new("color", "app").label("app", "color"))?;
    let echo_a = node2.add_pod(&PodSpec::new("echo-a", "app").label("app", "echo"))?;
    let caller_local =
        node2.add_pod(&PodSpec::new("caller-local", "app").label("app", "caller"))?;
    let denied_local =
        node2.add_pod(&PodSpec::new("denied-local", "app").label("app", "denied"))?;
    let echo_b = node3.add_pod(&PodSpec::new("echo-b", "app").label("app", "echo"))?;
    tb.dns_record(COLOR, &["10.96.0.10".parse()?])?;
    tb.dns_record(ECHO, &["10.96.0.11".parse()?])?;
    tb.dns_record("color-v1.app.svc.cluster.local", &color.ips())?;
    let mut echoes = echo_a.ips();
    echoes.extend(echo_b.ips());
    tb.dns_record("echo-v1.app.svc.cluster.local", &echoes)?;

    let mut servers = Vec::new();
    for (pod, port, name) in [
        (&color, 9090, "color"),
        (&echo_a, 7070, "echo-a"),
        (&echo_b, 7070, "echo-b"),
    ] {
        let server = echo_server(&tb, pod, port, name)?;
        servers.push(server);
    }

    let certs = tb.temp_dir().join("certs");
    let ca = tb.temp_dir().join("ca");
    let mesh = tb.temp_dir().join("mesh").join("mesh.yaml");
    std::fs::create_dir_all(mesh.parent().context("mesh folder")?)?;
    std::fs::write(&mesh, mesh_yaml(&certs))?;
    issue_mesh_certs(&node1, &mesh, &ca)?;
    for pod in [&caller, &denied] {
        node1.write_workload(pod)?;
    }
    for pod in [&color, &echo_a, &caller_local, &denied_local] {
        node2.write_workload(pod)?;
    }
    node3.write_workload(&echo_b)?;
    let nodes = [&node1, &node2, &node3];
    let start = |node: &Node, pods: &[&str]| -> anyhow::Result<Agent> {
        let mut args = peer_node_args(
            nodes.iter().copied().filter(|n| n.index() != node.index()),
            true,
        );
        args.extend(agent_args.iter().map(|a| a.to_string()));
        let agent = Agent::start(
            &tb,
            node,
            &mesh,
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        )?;
        for pod in pods {
            agent.wait_enrolled(pod, true, Duration::from_secs(20))?;
        }
        Ok(agent)
    };
    let agent1 = start(&node1, &["app/caller", "app/denied"])?;
    let agent2 = start(
        &node2,
        &[
            "app/color",
            "app/echo-a",
            "app/caller-local",
            "app/denied-local",
        ],
    )?;
    let agent3 = start(&node3, &["app/echo-b"])?;
    Ok(Bed {
        tb,
        node3,
        caller,
        denied,
        caller_local,
        denied_local,
        agent1,
        agent2,
        _agent3: agent3,
        _servers: servers,
    })
}

/// A `strait-peer` JSON report from its stdout.
fn report(output: &std::process::Output) -> anyhow::Result<Value> {
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.trim()).with_context(|| {
        format!(
            "strait-peer printed no JSON report: stdout {stdout:?}, stderr {:?}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// `strait-peer call` from a pod.
fn call(pod: &Pod, target: &str, args: &[&str]) -> anyhow::Result<Value> {
    let output = run(
        pod.command(peer_binary()?)
            .args(["call", target])
            .args(args),
        Duration::from_secs(120),
    )?;
    report(&output)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

const SAN_MISMATCH: [&str; 2] = ["side=\"server\"", "reason=\"san_mismatch\""];

#[test]
fn a_listeners_subject_alternative_names_hold_for_callers_on_the_same_node_and_on_another()
-> anyhow::Result<()> {
    let bed = bed("tunnel-sans", &[])?;
    let tls_failures = || metric(&bed.agent2, "strait_tls_failures_total", &SAN_MISMATCH);
    let denials = || metric(&bed.agent2, "strait_authz_denied_total", &[]);
    let target = format!("{COLOR}:9090");

    // Named in the SANs: admitted from another node (through the tunnel) and from the same
    // node (straight to the pod's loopback).
    for (pod, placement) in [
        (&bed.caller, "another node"),
        (&bed.caller_local, "same node"),
    ] {
        let report = call(pod, &target, &["-4", "--count", "2"])?;
        ensure!(
            report["ok"] == true && report["by_server"]["color"] == 2,
            "the caller named in the listener's SANs, on {placement}, was not served: {report}"
        );
    }
    ensure!(
        tls_failures()? == 0.0,
        "admitted callers were counted as SAN mismatches"
    );

    // Not named: refused from another node by the tunnel's client verifier ...
    let denials_before = denials()?;
    let report = call(&bed.denied, &target, &["-4", "--timeout", "10"])?;
    ensure!(
        report["ok"] == false && report["by_server"].get("color").is_none(),
        "a caller not in the listener's SANs on another node reached the pod: {report}"
    );
    eventually(
        Duration::from_secs(10),
        "node2 counts the cross-node SAN mismatch",
        || Ok(tls_failures()? >= 1.0),
    )?;
    let cross_node = tls_failures()?;

    // ... and from the same node, where no certificate is involved, with the same counter.
    let report = call(&bed.denied_local, &target, &["-4", "--timeout", "10"])?;
    ensure!(
        report["ok"] == false && report["by_server"].get("color").is_none(),
        "a caller not in the listener's SANs on the same node reached the pod: {report}"
    );
    eventually(
        Duration::from_secs(10),
        "node2 counts the same-node SAN mismatch",
        || Ok(tls_failures()? > cross_node),
    )?;
    let logged = bed.agent2.log_lines().into_iter().any(|l| {
        l["reason"] == "san_mismatch"
            && l["side"] == "server"
            && l["context"]
                .as_str()
                .is_some_and(|c| c.contains("app/denied-local") && c.contains("app/color"))
            && l["message"].as_str().is_some_and(|m| {
                m.contains(CALLER_ID) && m.contains("spiffe://test/ns/app/vn/denied")
            })
    });
    ensure!(
        logged,
        "node2 logged no san_mismatch line naming the same-node caller, its identity and the expected SAN"
    );
    // The backend rule let both through (color is a backend of denied): the SANs refused them.
    ensure!(
        denials()? == denials_before,
        "the refusals were counted as backend-rule denials, not SAN mismatches"
    );
    // The admitted caller still gets through afterwards on both placements.
    for pod in [&bed.caller, &bed.caller_local] {
        let report = call(pod, &target, &["-4"])?;
        ensure!(report["ok"] == true, "{report}");
    }
    Ok(())
}

#[test]
fn a_thousand_concurrent_connections_across_nodes_are_all_open_and_echo() -> anyhow::Result<()> {
    let _heavy = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let bed = bed("tunnel-thousand", &[])?;
    let connections: u32 = 1000;
    let output = run(
        bed.caller.command(peer_binary()?).args([
            "hold",
            &format!("{ECHO}:7070"),
            "-4",
            "--connections",
            &connections.to_string(),
            "--open-within-ms",
            "3000",
            "--seconds",
            "3",
            "--every-ms",
            "1000",
            "--timeout",
            "30",
        ]),
        Duration::from_secs(180),
    )?;
    let report = report(&output)?;
    let failed: Vec<&Value> = report["held"]
        .as_array()
        .map(|h| h.iter().filter(|c| !c["error"].is_null()).take(5).collect())
        .unwrap_or_default();
    ensure!(
        report["ok"] == true,
        "not all {connections} connections were open at once and echoing: opened {}, peak {}, by server {}, first failures {failed:?}",
        report["opened"],
        report["peak_open"],
        report["by_server"]
    );
    assert_eq!(report["peak_open"], connections);
    let a = report["by_server"]["echo-a"].as_u64().unwrap_or(0);
    let b = report["by_server"]["echo-b"].as_u64().unwrap_or(0);
    assert_eq!(a + b, u64::from(connections), "{}", report["by_server"]);
    ensure!(
        a > 100 && b > 100,
        "both nodes should carry well over one connection's 100 streams: {a} and {b}"
    );
    // Streams past 100 on one (caller, node, listener) went on more tunnel connections.
    let tunnels = metric(
        &bed.agent1,
        "strait_tunnel_connections_total",
        &["direction=\"outbound\""],
    )?;
    let least = a.div_ceil(100) + b.div_ceil(100);
    ensure!(
        tunnels >= least as f64,
        "{connections} streams ran on {tunnels} tunnel connections; at 100 streams each they need at least {least}"
    );
    let streams = metric(
        &bed.agent1,
        "strait_tunnel_streams_total",
        &["direction=\"outbound\""],
    )?;
    ensure!(
        streams >= f64::from(connections),
        "node1 opened {streams} tunnel streams for {connections} connections"
    );
    Ok(())
}

#[test]
fn a_peer_node_cut_off_without_a_reset_is_detected_within_the_keepalive_timeout_and_avoided()
-> anyhow::Result<()> {
    let _heavy = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    const INTERVAL_S: u64 = 1;
    const TIMEOUT_S: u64 = 2;
    let bed = bed(
        "tunnel-cut",
        &[
            "--tunnel-keepalive-interval",
            &INTERVAL_S.to_string(),
            "--tunnel-keepalive-timeout",
            &TIMEOUT_S.to_string(),
        ],
    )?;
    // Long-lived connections through both echo nodes, echoing every 200 ms; a read waits up to
    // 60 s, far longer than the test: only the agent closing a connection ends one early.
    let holder = bed.tb.spawn(
        "holder",
        bed.caller.command(peer_binary()?).args([
            "hold",
            &format!("{ECHO}:7070"),
            "-4",
            "--connections",
            "20",
            "--open-within-ms",
            "500",
            "--seconds",
            "14",
            "--every-ms",
            "200",
            "--timeout",
            "60",
        ]),
    )?;
    eventually(
        Duration::from_secs(20),
        "node1 opens the 20 tunnel streams",
        || {
            Ok(metric(
                &bed.agent1,
                "strait_tunnel_streams_total",
                &["direction=\"outbound\""],
            )? >= 20.0)
        },
    )?;
    std::thread::sleep(Duration::from_secs(1));

    // Cut node3's underlay link at the fabric's bridge: packets to and from it vanish, nobody
    // sends a reset.
    let port = format!("vn{}", bed.node3.index());
    let fabric = bed.tb.fabric_netns_name().to_owned();
    let link = |state: &str| -> anyhow::Result<()> {
        let output = run(
            std::process::Command::new("ip").args(["-n", &fabric, "link", "set", &port, state]),
            Duration::from_secs(10),
        )?;
        ensure!(
            output.status.success(),
            "ip link set {port} {state} in {fabric}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(())
    };
    let cut_ms = unix_ms();
    link("down")?;
    let cut = Instant::now();
    let bound = Duration::from_secs(INTERVAL_S + TIMEOUT_S);
    let slack = Duration::from_millis(2500);

    // node1's agent finds out within the keepalive interval and timeout.
    let result = (|| -> anyhow::Result<()> {
        eventually(
            bound + slack,
            "node1 closes the tunnel to the cut node for an unanswered keepalive",
            || {
                Ok(bed.agent1.log_lines().iter().any(|l| {
                    l["target"] == "strait::tunnel"
                        && l["message"]
                            .as_str()
                            .is_some_and(|m| m.contains("stopped answering (keepalive)"))
                }))
            },
        )?;
        let detected = cut.elapsed();

        // New connections go to the node that is still there, without waiting for connect
        // timeouts on the cut one.
        let started = Instant::now();
        let report = call(
            &bed.caller,
            &format!("{ECHO}:7070"),
            &["-4", "--count", "10", "--timeout", "20"],
        )?;
        let took = started.elapsed();
        ensure!(
            report["ok"] == true && report["by_server"]["echo-a"] == 10,
            "new connections after the cut did not all reach echo-a: {report}"
        );
        ensure!(
            took < Duration::from_secs(4),
            "10 new connections took {took:?} after the cut was detected (in {detected:?}): the cut node was not avoided at once"
        );
        Ok(())
    })();

    let status = holder.wait_timeout(Duration::from_secs(60))?;
    link("up")?;
    result?;
    let report: Value = serde_json::from_str(holder.stdout().trim())
        .with_context(|| format!("holder printed no report ({status}): {}", holder.stderr()))?;
    let held = report["held"].as_array().context("held")?;
    ensure!(
        report["peak_open"] == 20,
        "not all 20 connections were open before the cut: {report}"
    );
    let (mut through_cut, mut through_live) = (0, 0);
    for c in held {
        match c["server"].as_str() {
            Some("echo-b") => {
                through_cut += 1;
                let failed = c["failed_unix_ms"].as_u64().with_context(|| {
                    format!("a connection through the cut node never ended: {c}")
                })?;
                let after = Duration::from_millis(failed.saturating_sub(cut_ms));
                ensure!(
                    after <= bound + slack,
                    "a connection through the cut node ended {after:?} after the cut, past the keepalive bound {bound:?} (+{slack:?}): {c}"
                );
            }
            Some("echo-a") => {
                through_live += 1;
                ensure!(
                    c["error"].is_null(),
                    "a connection through the live node failed: {c}"
                );
            }
            _ => bail!("a connection did not open: {c}"),
        }
    }
    ensure!(
        through_cut > 0 && through_live > 0,
        "the 20 connections did not spread over both nodes: {}",
        report["by_server"]
    );
    Ok(())
}
