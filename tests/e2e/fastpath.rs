//! End-to-end tests of the eBPF fast path (sockmap redirection of the agent's local legs):
//! blocking-socket applications (Python's http.client and http.server, whose `recv()` calls
//! block) exchange 10,000 requests through the agent without one error, the bytes arrive
//! intact, and the counters show which sends took the fast path.
//!
//! Needs root and python3; without them these tests fail (never skip) with the reason.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;
use testbed::agent::{Agent, peer_binary};
use testbed::{Node, Pod, PodSpec, Process, Testbed, require_tool, run};

const SERVICE: &str = "web.app.svc.cluster.local";
const SERVICE_V4: &str = "10.96.0.20";
const PORT: u16 = 8000;
const REQUESTS: u32 = 10_000;

fn mesh_yaml() -> String {
    format!(
        r#"apiVersion: appmesh.k8s.aws/v1beta2
kind: Mesh
metadata:
  name: fast
spec:
  egressFilter:
    type: ALLOW_ALL
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata:
  name: client
  namespace: app
spec:
  podSelector:
    matchLabels:
      app: client
  backends:
    - virtualService:
        virtualServiceRef:
          name: web
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata:
  name: web
  namespace: app
spec:
  podSelector:
    matchLabels:
      app: web
  listeners:
    - portMapping:
        port: {PORT}
        protocol: tcp
  serviceDiscovery:
    dns:
      hostname: web-v1.app.svc.cluster.local
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata:
  name: web
  namespace: app
spec:
  awsName: {SERVICE}
  provider:
    virtualNode:
      virtualNodeRef:
        name: web
"#
    )
}

struct Bed {
    tb: Testbed,
    node: Node,
    client: Pod,
    mesh: PathBuf,
    _server: Process,
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("e2e/fastpath")
        .join(name)
}

fn bed(test: &str) -> anyhow::Result<Bed> {
    require_tool("python3")?;
    let tb = Testbed::new(test)?;
    let node = tb.add_node("node1")?;
    let client = node.add_pod(&PodSpec::new("client", "app").label("app", "client"))?;
    let web = node.add_pod(&PodSpec::new("web", "app").label("app", "web"))?;
    tb.dns_record(SERVICE, &[SERVICE_V4.parse()?])?;
    tb.dns_record("web-v1.app.svc.cluster.local", &web.ips())?;
    let server = tb.spawn(
        "python-server",
        web.command("python3")
            .arg(script("server.py"))
            .arg(PORT.to_string()),
    )?;
    server.wait_listening(PORT, Duration::from_secs(20))?;
    node.write_workload(&client)?;
    node.write_workload(&web)?;
    let mesh = tb.temp_dir().join("mesh.yaml");
    std::fs::write(&mesh, mesh_yaml())?;
    Ok(Bed {
        tb,
        node,
        client,
        mesh,
        _server: server,
    })
}

/// Runs the blocking client in the client pod: `total` requests, `per_conn` per connection.
fn blocking_client(bed: &Bed, total: u32, per_conn: u32) -> anyhow::Result<Value> {
    let output = run(
        bed.client
            .command("python3")
            .arg(script("client.py"))
            .args([
                SERVICE,
                &PORT.to_string(),
                &total.to_string(),
                &per_conn.to_string(),
            ]),
        Duration::from_secs(600),
    )?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.trim()).with_context(|| {
        format!(
            "the Python client printed no report: stdout {stdout:?}, stderr {:?}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

#[test]
fn blocking_python_client_and_server_exchange_10000_requests_over_the_fast_path()
-> anyhow::Result<()> {
    let bed = bed("fastpath-blocking")?;
    let agent = Agent::start(&bed.tb, &bed.node, &bed.mesh, &["--fast-path", "on"])?;
    let before = agent.counters()?;

    // 100 keep-alive connections of 100 requests: both connection set-up and long exchanges.
    let report = blocking_client(&bed, REQUESTS, 100)?;
    let counters = agent.counters()?;
    assert_eq!(report["errors"], 0, "{report}; counters {counters}");
    assert_eq!(report["ok"], REQUESTS, "{report}");

    let delta = |reason: &str| {
        counters[reason].as_u64().unwrap_or(0) - before[reason].as_u64().unwrap_or(0)
    };
    assert_eq!(delta("captured"), 100, "{counters}");
    // Every request and every answer crosses two local legs; the fast path carried them.
    assert!(
        delta("fastpath_hit") >= u64::from(REQUESTS),
        "the fast path was not used: {counters}"
    );
    assert_eq!(delta("fastpath_insert_failed"), 0, "{counters}");
    Ok(())
}

#[test]
fn with_the_fast_path_off_no_socket_enters_it() -> anyhow::Result<()> {
    let bed = bed("fastpath-off")?;
    let agent = Agent::start(&bed.tb, &bed.node, &bed.mesh, &["--fast-path", "off"])?;
    let report = blocking_client(&bed, 500, 50)?;
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["ok"], 500, "{report}");
    let counters = agent.counters()?;
    assert_eq!(counters["fastpath_sockets"], 0, "{counters}");
    assert_eq!(counters["fastpath_hit"], 0, "{counters}");
    Ok(())
}

/// strait-peer sets `SO_RCVTIMEO` and tells a spurious EAGAIN (long before the timeout) from a
/// real timeout: the hazard that keeps the pod's connecting socket out of the fast path.
#[test]
fn a_client_with_a_receive_timeout_sees_no_spurious_eagain() -> anyhow::Result<()> {
    let bed = bed("fastpath-rcvtimeo")?;
    let agent = Agent::start(&bed.tb, &bed.node, &bed.mesh, &["--fast-path", "on"])?;
    let web = bed
        .node
        .pods()
        .into_iter()
        .find(|p| p.name() == "web")
        .context("web pod")?;
    bed._server.kill()?;
    let peer = peer_binary()?;
    let server = bed.tb.spawn(
        "peer-serve",
        web.command(&peer).args([
            "serve",
            "--listen",
            &format!("0.0.0.0:{PORT}"),
            "--name",
            "w",
        ]),
    )?;
    server.wait_listening(PORT, Duration::from_secs(10))?;
    let target = format!("{SERVICE}:{PORT}");
    for args in [
        &["--count", "200", "--bytes", "64"][..],
        &["--count", "3", "--bytes", "20000000"][..],
    ] {
        let output = run(
            bed.client
                .command(&peer)
                .args(["call", &target, "-4", "--timeout", "60"])
                .args(args),
            Duration::from_secs(120),
        )?;
        let report: Value = serde_json::from_slice(&output.stdout).with_context(|| {
            format!(
                "strait-peer printed no report: {}",
                String::from_utf8_lossy(&output.stderr)
            )
        })?;
        assert_eq!(report["ok"], true, "{args:?}: {report}");
    }
    let counters = agent.counters()?;
    assert!(
        counters["fastpath_hit"].as_u64() > Some(600),
        "the fast path was not used: {counters}"
    );
    Ok(())
}
