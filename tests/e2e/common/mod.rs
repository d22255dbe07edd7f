//! What the end-to-end test files share: a one-node bed with a client, two color servers
//! and a pod outside the mesh, the mesh those tests use, and a client call.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;
use testbed::agent::peer_binary;
use testbed::kubelet::CgroupDriver;
use testbed::{Pod, PodSpec, Scenario, Servers, run};

pub const SERVICE: &str = "color.app.svc.cluster.local";
pub const SERVICE_V4: &str = "10.96.0.10";
pub const SERVICE_V6: &str = "fd00:96::10";
pub const EPERM: i64 = 1;
pub const EHOSTUNREACH: i64 = 113;

/// A one-node testbed: a client pod, two color servers (v1, v2) and a pod outside the mesh
/// (`web` in namespace `outside`, with a server too).
pub type Bed = Scenario;

/// The mesh of these tests (tests/fixtures/color-tcp.yaml): `color` is a router splitting TCP
/// connections between color-v1 and color-v2 with the given weights; `client` calls it.
pub fn mesh_yaml(egress: &str, weight_v1: u32, weight_v2: u32) -> String {
    let (weight_v1, weight_v2) = (weight_v1.to_string(), weight_v2.to_string());
    testbed::fixture(
        "color-tcp.yaml",
        &[
            ("egress", egress),
            ("weight_v1", &weight_v1),
            ("weight_v2", &weight_v2),
            ("service", SERVICE),
        ],
    )
    .expect("BUG: the fixture and its values disagree")
}

pub fn bed(test: &str, mesh: &str) -> anyhow::Result<Bed> {
    bed_with_driver(test, mesh, CgroupDriver::Systemd)
}

/// [`bed`] on a node whose pod cgroups are named by `driver`. The servers are `strait-peer`s
/// on both families, and the color names answer both addresses of their pod.
pub fn bed_with_driver(test: &str, mesh: &str, driver: CgroupDriver) -> anyhow::Result<Bed> {
    Scenario::builder(test)
        .cgroup_driver(driver)
        .servers(Servers::Peer)
        .every_address()
        .outside(
            PodSpec::new("web", "outside").label("app", "web"),
            Some("web"),
        )
        .service(
            SERVICE,
            &[SERVICE_V4.parse()?, SERVICE_V6.parse::<IpAddr>()?],
        )
        .mesh(mesh)
        .build()
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
