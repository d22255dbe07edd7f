//! What the end-to-end test files share: a one-node bed with a client, two color servers
//! and a pod outside the mesh, the mesh those tests use, and a client call.
#![allow(dead_code, reason = "the test modules use different parts")]

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;
use testbed::agent::peer_binary;
use testbed::kubelet::CgroupDriver;
use testbed::{Node, Pod, PodSpec, Process, Testbed, run};

pub const SERVICE: &str = "color.app.svc.cluster.local";
pub const SERVICE_V4: &str = "10.96.0.10";
pub const SERVICE_V6: &str = "fd00:96::10";
pub const EPERM: i64 = 1;
pub const EHOSTUNREACH: i64 = 113;

/// A one-node testbed: a client pod, two color servers (v1, v2) and a pod outside the mesh.
pub struct Bed {
    pub tb: Testbed,
    pub node: Node,
    pub client: Pod,
    pub v1: Pod,
    pub v2: Pod,
    pub outside: Pod,
    pub mesh: PathBuf,
    pub servers: Vec<Process>,
}

/// The mesh of these tests: `color` is a router splitting TCP connections between color-v1 and
/// color-v2 with the given weights; `client` calls it.
pub fn mesh_yaml(egress: &str, weight_v1: u32, weight_v2: u32) -> String {
    format!(
        r#"apiVersion: appmesh.k8s.aws/v1beta2
kind: Mesh
metadata:
  name: test
spec:
  egressFilter:
    type: {egress}
---
apiVersion: v1
kind: Namespace
metadata:
  name: app
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
          name: color
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata:
  name: color-v1
  namespace: app
spec:
  podSelector:
    matchLabels:
      app: color
      version: v1
  listeners:
    - portMapping:
        port: 8080
        protocol: tcp
  serviceDiscovery:
    dns:
      hostname: color-v1.app.svc.cluster.local
      responseType: ENDPOINTS
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata:
  name: color-v2
  namespace: app
spec:
  podSelector:
    matchLabels:
      app: color
      version: v2
  listeners:
    - portMapping:
        port: 8080
        protocol: tcp
  serviceDiscovery:
    dns:
      hostname: color-v2.app.svc.cluster.local
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualRouter
metadata:
  name: color
  namespace: app
spec:
  listeners:
    - portMapping:
        port: 8080
        protocol: tcp
  routes:
    - name: split
      tcpRoute:
        action:
          weightedTargets:
            - virtualNodeRef:
                name: color-v1
              weight: {weight_v1}
            - virtualNodeRef:
                name: color-v2
              weight: {weight_v2}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata:
  name: color
  namespace: app
spec:
  awsName: {SERVICE}
  provider:
    virtualRouter:
      virtualRouterRef:
        name: color
"#
    )
}

pub fn bed(test: &str, mesh: &str) -> anyhow::Result<Bed> {
    bed_with_driver(test, mesh, CgroupDriver::Systemd)
}

/// [`bed`] on a node whose pod cgroups are named by `driver`.
pub fn bed_with_driver(test: &str, mesh: &str, driver: CgroupDriver) -> anyhow::Result<Bed> {
    let tb = Testbed::new(test)?;
    let node = tb.add_node_with_driver("node1", driver)?;
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
    let outside = node.add_pod(&PodSpec::new("web", "outside").label("app", "web"))?;
    tb.dns_record(
        SERVICE,
        &[SERVICE_V4.parse()?, SERVICE_V6.parse::<IpAddr>()?],
    )?;
    tb.dns_record("color-v1.app.svc.cluster.local", &v1.ips())?;
    tb.dns_record("color-v2.app.svc.cluster.local", &v2.ips())?;
    let peer = peer_binary()?;
    let mut servers = Vec::new();
    for (pod, name) in [(&v1, "v1"), (&v2, "v2"), (&outside, "web")] {
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
    for pod in [&client, &v1, &v2] {
        node.write_workload(pod)?;
    }
    let mesh_path = tb.temp_dir().join("mesh.yaml");
    std::fs::write(&mesh_path, mesh)?;
    Ok(Bed {
        tb,
        node,
        client,
        v1,
        v2,
        outside,
        mesh: mesh_path,
        servers,
    })
}

/// `strait-peer call` from a pod; returns its JSON report.
pub fn call(pod: &Pod, target: &str, args: &[&str]) -> anyhow::Result<Value> {
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

pub fn first_errno(report: &Value) -> Option<i64> {
    report["errors"][0]["errno"].as_i64()
}
