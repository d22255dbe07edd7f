//! End-to-end tests of the data path: a real agent on a testbed node, real eBPF programs on
//! the node's cgroup root, pods calling a virtual service by its DNS name with an ordinary
//! client, and what a user would check: the bytes arrived intact, the split came out by
//! weight, the egress filter refused what it should, the counters and the log tell the story.
//!
//! Needs root; without it these tests fail (never skip) with the reason.

use std::time::Duration;

use crate::common::*;
use anyhow::Context as _;
use serde_json::Value;
use testbed::PodSpec;
use testbed::agent::{Agent, strait};
use testbed::kubelet::CgroupDriver;

#[test]
fn a_call_to_a_virtual_service_is_captured_and_forwarded_intact() -> anyhow::Result<()> {
    let bed = bed("capture4", &mesh_yaml("ALLOW_ALL", 100, 0))?;
    let agent = Agent::start(&bed.tb, &bed.node, &bed.mesh, &[])?;

    let report = call(
        &bed.client,
        &format!("{SERVICE}:8080"),
        &["-4", "--bytes", "6000000", "--timeout", "60"],
    )?;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["by_server"]["v1"], 1, "{report}");
    assert_eq!(report["bytes_sent"], 6_000_000, "{report}");
    assert_eq!(report["bytes_received"], 6_000_000, "{report}");

    let counters = agent.counters()?;
    assert_eq!(counters["captured"], 1, "{counters}");
    assert_eq!(counters["rekeyed"], 1, "{counters}");
    assert_eq!(counters["lookup_miss"], 0, "{counters}");

    let status = strait(&bed.node, &["status", "--admin", testbed::agent::ADMIN])?;
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains("ready") && status.contains("mesh       test"),
        "{status}"
    );
    assert!(
        status.contains("app/client") && status.contains("app/color-v1"),
        "{status}"
    );
    assert!(status.contains("captured         1"), "{status}");

    let logs = wait_for_connection_logs(&agent, 1)?;
    let line = &logs[0];
    assert_eq!(line["source_workload"], "app/client", "{line}");
    assert_eq!(line["virtual_service"], "app/color", "{line}");
    assert_eq!(line["virtual_node"], "app/color-v1", "{line}");
    assert_eq!(line["orig_dst"], format!("{SERVICE_V4}:8080"), "{line}");
    assert_eq!(
        line["endpoint"],
        format!("{}:8080", bed.v1.ipv4()),
        "{line}"
    );
    // The banner line comes on top of the echoed bytes.
    assert_eq!(line["bytes_sent"], 6_000_000, "{line}");
    assert!(line["bytes_received"].as_u64() > Some(6_000_000), "{line}");
    Ok(())
}

#[test]
fn an_ipv6_call_is_captured_by_connect6() -> anyhow::Result<()> {
    let bed = bed("capture6", &mesh_yaml("ALLOW_ALL", 100, 0))?;
    let agent = Agent::start(&bed.tb, &bed.node, &bed.mesh, &[])?;
    let report = call(
        &bed.client,
        &format!("{SERVICE}:8080"),
        &["-6", "--bytes", "3000000", "--timeout", "60"],
    )?;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["by_server"]["v1"], 1, "{report}");
    let logs = wait_for_connection_logs(&agent, 1)?;
    assert_eq!(logs[0]["orig_dst"], format!("[{SERVICE_V6}]:8080"));
    assert_eq!(agent.counter("captured")?, 1);
    Ok(())
}

#[test]
fn tcp_route_weights_spread_connections() -> anyhow::Result<()> {
    let bed = bed("weights", &mesh_yaml("ALLOW_ALL", 50, 50))?;
    let _agent = Agent::start(&bed.tb, &bed.node, &bed.mesh, &[])?;
    let report = call(
        &bed.client,
        &format!("{SERVICE}:8080"),
        &["-4", "--count", "200", "--bytes", "64"],
    )?;
    assert_eq!(report["ok"], true, "{report}");
    let v1 = report["by_server"]["v1"].as_u64().unwrap_or(0);
    let v2 = report["by_server"]["v2"].as_u64().unwrap_or(0);
    assert_eq!(v1 + v2, 200, "{report}");
    assert!(
        (70..=130).contains(&v1),
        "50/50 weights gave v1 {v1} of 200 connections (want 35-65 %): {report}"
    );
    Ok(())
}

#[test]
fn drop_all_refuses_a_non_mesh_destination_with_eperm() -> anyhow::Result<()> {
    let bed = bed("dropall", &mesh_yaml("DROP_ALL", 100, 0))?;
    let agent = Agent::start(&bed.tb, &bed.node, &bed.mesh, &[])?;
    let report = call(
        &bed.client,
        &format!("{}:8080", bed.outside.ipv4()),
        &["-4"],
    )?;
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["errors"][0]["kind"], "connect", "{report}");
    assert_eq!(first_errno(&report), Some(EPERM), "{report}");
    assert_eq!(agent.counter("denied")?, 1);
    // Mesh services still work under DROP_ALL.
    let report = call(&bed.client, &format!("{SERVICE}:8080"), &["-4"])?;
    assert_eq!(report["ok"], true, "{report}");
    Ok(())
}

#[test]
fn allow_all_lets_a_non_mesh_destination_through_uncaptured() -> anyhow::Result<()> {
    let bed = bed("allowall", &mesh_yaml("ALLOW_ALL", 100, 0))?;
    let agent = Agent::start(&bed.tb, &bed.node, &bed.mesh, &[])?;
    let report = call(
        &bed.client,
        &format!("{}:8080", bed.outside.ipv4()),
        &["-4", "--bytes", "100000"],
    )?;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["by_server"]["web"], 1, "{report}");
    let counters = agent.counters()?;
    assert_eq!(counters["captured"], 0, "{counters}");
    assert_eq!(counters["denied"], 0, "{counters}");
    assert!(counters["passed"].as_u64() >= Some(1), "{counters}");
    assert!(agent.connection_logs().is_empty());
    Ok(())
}

#[test]
fn a_pod_that_matches_no_virtual_node_is_not_captured() -> anyhow::Result<()> {
    let bed = bed("nomatch", &mesh_yaml("DROP_ALL", 100, 0))?;
    let stranger = bed
        .node
        .add_pod(&PodSpec::new("stranger", "app").label("app", "stranger"))?;
    bed.node.write_workload(&stranger)?;
    let agent = Agent::start(&bed.tb, &bed.node, &bed.mesh, &[])?;
    let workloads = agent.workloads()?;
    let listed = workloads.iter().find(|w| w["pod"] == "app/stranger");
    assert!(
        listed.is_some_and(|w| w["enrolled"] == false
            && w["reason"]
                .as_str()
                .is_some_and(|r| r.contains("no VirtualNode"))),
        "a pod no VirtualNode selects must not be enrolled, and /workloads says why: {workloads:?}"
    );
    // Not captured: the connect goes to the service range, which is unreachable.
    let report = call(&stranger, &format!("{SERVICE}:8080"), &["-4"])?;
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(first_errno(&report), Some(EHOSTUNREACH), "{report}");
    // And DROP_ALL does not apply to it: it still reaches a pod outside the mesh.
    let report = call(&stranger, &format!("{}:8080", bed.outside.ipv4()), &["-4"])?;
    assert_eq!(report["ok"], true, "{report}");
    let counters = agent.counters()?;
    assert_eq!(counters["captured"], 0, "{counters}");
    assert!(counters["not_enrolled"].as_u64() >= Some(2), "{counters}");
    Ok(())
}

#[test]
fn pods_added_later_are_captured_and_removed_pods_released() -> anyhow::Result<()> {
    let bed = bed("podlife", &mesh_yaml("ALLOW_ALL", 100, 0))?;
    bed.node.remove_workload(&bed.client)?;
    // A malformed workload file beside the good ones is skipped; the rest keeps working.
    std::fs::write(bed.node.workloads_dir().join("broken.json"), "{\"name\": ")?;
    let agent = Agent::start(&bed.tb, &bed.node, &bed.mesh, &[])?;
    agent.wait_enrolled("app/color-v1", true, Duration::from_secs(5))?;
    let report = call(&bed.client, &format!("{SERVICE}:8080"), &["-4"])?;
    assert_eq!(first_errno(&report), Some(EHOSTUNREACH), "{report}");

    bed.node.write_workload(&bed.client)?;
    agent.wait_enrolled("app/client", true, Duration::from_secs(10))?;
    let report = call(&bed.client, &format!("{SERVICE}:8080"), &["-4"])?;
    assert_eq!(report["ok"], true, "{report}");

    bed.node.remove_workload(&bed.client)?;
    agent.wait_enrolled("app/client", false, Duration::from_secs(10))?;
    let report = call(&bed.client, &format!("{SERVICE}:8080"), &["-4"])?;
    assert_eq!(first_errno(&report), Some(EHOSTUNREACH), "{report}");
    assert!(
        agent.process.stderr().contains("broken.json"),
        "the malformed workload file is reported"
    );
    Ok(())
}

/// On a Kubernetes node the agent enrolls the pod's cgroup, and every process of the pod runs in
/// a container cgroup below it (or deeper, when a container makes cgroups of its own). Each
/// must be that pod for every per-pod decision: capture, DROP_ALL, backend rules; with both of
/// kubelet's cgroup drivers.
#[test]
fn every_process_below_a_pods_cgroup_is_that_pod() -> anyhow::Result<()> {
    for (name, driver) in [
        ("podcg-systemd", CgroupDriver::Systemd),
        ("podcg-cgroupfs", CgroupDriver::Cgroupfs),
    ] {
        every_process_below_a_pods_cgroup_is_that_pod_with(name, driver)
            .with_context(|| format!("cgroup driver {driver:?}"))?;
    }
    Ok(())
}

fn every_process_below_a_pods_cgroup_is_that_pod_with(
    name: &str,
    driver: CgroupDriver,
) -> anyhow::Result<()> {
    // A virtual node with no backends: the eBPF backend rules refuse its calls to `color`.
    let mesh = format!(
        "{}---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata:
  name: lonely
  namespace: app
spec:
  podSelector:
    matchLabels:
      app: lonely
",
        mesh_yaml("DROP_ALL", 100, 0)
    );
    let bed = bed_with_driver(name, &mesh, driver)?;
    let lonely = bed
        .node
        .add_pod(&PodSpec::new("lonely", "app").label("app", "lonely"))?;
    bed.node.write_workload(&lonely)?;
    let agent = Agent::start(&bed.tb, &bed.node, &bed.mesh, &[])?;
    agent.wait_enrolled("app/lonely", true, Duration::from_secs(10))?;

    // The pod's processes are in its container cgroups, never in the pod cgroup itself.
    let out = testbed::run_ok(
        bed.client.command("cat").arg("/proc/self/cgroup"),
        Duration::from_secs(10),
    )?;
    let own = String::from_utf8_lossy(&out.stdout);
    let app = bed.client.container_cgroup("app");
    let app_rel = app.strip_prefix(bed.tb.cgroup2_mount())?;
    assert_eq!(
        own.lines().find(|l| l.starts_with("0::")),
        Some(format!("0::/{}", app_rel.display()).as_str()),
        "{own}"
    );
    assert_eq!(app.parent(), Some(bed.client.cgroup_path()));

    // A cgroup a container made below its own (systemd in a container does), as deep as it gets.
    let nested = OwnCgroup(app.join("nested"));
    std::fs::create_dir(&nested.0)?;
    let peer = testbed::agent::peer_binary()?;
    let in_nested = |target: String| -> anyhow::Result<Value> {
        let out = testbed::run(
            bed.client.command("sh").arg("-c").arg(format!(
                "echo $$ > {}/cgroup.procs && exec {} call {target} -4",
                nested.0.display(),
                peer.display()
            )),
            Duration::from_secs(60),
        )?;
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let in_sidecar = |pod: &testbed::Pod, target: String| -> anyhow::Result<Value> {
        let out = testbed::run(
            pod.container_command("sidecar", &peer)
                .args(["call", &target, "-4"]),
            Duration::from_secs(60),
        )?;
        Ok(serde_json::from_slice(&out.stdout)?)
    };

    // Captured and routed, from every container and from below a container.
    let service = format!("{SERVICE}:8080");
    let report = call(&bed.client, &service, &["-4"])?;
    assert_eq!(report["by_server"]["v1"], 1, "app container: {report}");
    let report = in_sidecar(&bed.client, service.clone())?;
    assert_eq!(report["by_server"]["v1"], 1, "sidecar container: {report}");
    let report = in_nested(service.clone())?;
    assert_eq!(report["by_server"]["v1"], 1, "nested cgroup: {report}");
    assert_eq!(agent.counter("captured")?, 3);
    let logs = wait_for_connection_logs(&agent, 3)?;
    assert!(
        logs.iter().all(|l| l["source_workload"] == "app/client"),
        "{logs:?}"
    );

    // DROP_ALL holds for them: a destination outside the mesh is refused before a packet goes.
    let outside = format!("{}:8080", bed.outside.ipv4());
    let report = in_sidecar(&bed.client, outside.clone())?;
    assert_eq!(
        first_errno(&report),
        Some(EPERM),
        "sidecar container: {report}"
    );
    let report = in_nested(outside)?;
    assert_eq!(first_errno(&report), Some(EPERM), "nested cgroup: {report}");
    assert_eq!(agent.counter("denied")?, 2);

    // The backend rules too: `lonely` lists no backends, from any of its containers.
    for container in ["app", "sidecar"] {
        let out = testbed::run(
            lonely
                .container_command(container, &peer)
                .args(["call", &service, "-4"]),
            Duration::from_secs(60),
        )?;
        let report: Value = serde_json::from_slice(&out.stdout)?;
        assert_eq!(first_errno(&report), Some(EPERM), "{container}: {report}");
    }
    assert_eq!(
        agent.counter("captured")?,
        3,
        "refused calls are not captured"
    );
    Ok(())
}

/// Removes a cgroup directory the test made itself, even when the test fails.
struct OwnCgroup(std::path::PathBuf);

impl Drop for OwnCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() || !self.0.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn services_sharing_a_network_namespace_get_their_own_listeners() -> anyhow::Result<()> {
    // A plain host: two services, each in its own cgroup, share one network namespace (here
    // the client pod's). Each must be captured and known by its own name.
    let bed = bed("sharedns", &mesh_yaml("ALLOW_ALL", 100, 0))?;
    let second = OwnCgroup(bed.node.cgroup_root().join("app_batch"));
    std::fs::create_dir(&second.0)?;
    let mut workload = bed.client.workload();
    workload.name = "batch".into();
    workload.cgroup = second.0.clone();
    std::fs::write(
        bed.node.workloads_dir().join(workload.file_name()),
        serde_json::to_vec(&workload)?,
    )?;
    let agent = Agent::start(&bed.tb, &bed.node, &bed.mesh, &[])?;
    agent.wait_enrolled("app/batch", true, Duration::from_secs(5))?;
    let workloads = agent.workloads()?;
    let listeners = |pod: &str| -> Vec<String> {
        workloads
            .iter()
            .find(|w| w["pod"] == pod)
            .and_then(|w| w["listeners"].as_array())
            .map(|l| {
                l.iter()
                    .filter_map(|a| a.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut ports = [listeners("app/client"), listeners("app/batch")].concat();
    ports.retain(|a| a.starts_with("127.0.0.1:"));
    ports.sort();
    assert_eq!(
        ports,
        ["127.0.0.1:15001", "127.0.0.1:15002"],
        "{workloads:?}"
    );

    let peer = testbed::agent::peer_binary()?;
    let from_batch = testbed::run(
        bed.client.command("sh").arg("-c").arg(format!(
            "echo $$ > {}/cgroup.procs && exec {} call {SERVICE}:8080 -4",
            second.0.display(),
            peer.display()
        )),
        Duration::from_secs(60),
    )?;
    let report: Value = serde_json::from_slice(&from_batch.stdout)?;
    assert_eq!(report["ok"], true, "{report}");
    let report = call(&bed.client, &format!("{SERVICE}:8080"), &["-4"])?;
    assert_eq!(report["ok"], true, "{report}");

    let logs = wait_for_connection_logs(&agent, 2)?;
    let mut sources: Vec<&str> = logs
        .iter()
        .filter_map(|l| l["source_workload"].as_str())
        .collect();
    sources.sort();
    assert_eq!(sources, ["app/batch", "app/client"]);
    // `second` was declared after `bed`, so it is removed first, before the testbed removes
    // the node's cgroup root around it.
    Ok(())
}

#[test]
fn access_logs_go_where_the_virtual_node_says_in_its_format() -> anyhow::Result<()> {
    let bed = bed("accesslog", &mesh_yaml("ALLOW_ALL", 100, 0))?;
    let text_log = bed.tb.temp_dir().join("client-access.log");
    let json_log = bed.tb.temp_dir().join("v1-access.log");
    // The client logs in Envoy's default text format; color-v1 (a server) in JSON: a line per
    // connection it received, written by the agent that delivered it.
    let mesh = mesh_yaml("ALLOW_ALL", 100, 0)
        .replacen(
            "  backends:\n",
            &format!(
                "  logging:\n    accessLog:\n      file:\n        path: {}\n  backends:\n",
                text_log.display()
            ),
            1,
        )
        .replacen(
            "      hostname: color-v1.app.svc.cluster.local\n",
            &format!(
                "      hostname: color-v1.app.svc.cluster.local\n  logging:\n    accessLog:\n      file:\n        path: {}\n        format:\n          json:\n            - key: upstream\n              value: \"%UPSTREAM_HOST%\"\n",
                json_log.display()
            ),
            1,
        );
    std::fs::write(&bed.mesh, mesh)?;
    // Access logs go only under the operator's access log directory.
    let logs = bed.tb.temp_dir().display().to_string();
    let _agent = Agent::start(&bed.tb, &bed.node, &bed.mesh, &["--access-log-dir", &logs])?;
    let report = call(
        &bed.client,
        &format!("{SERVICE}:8080"),
        &["-4", "--count", "3", "--bytes", "5000"],
    )?;
    assert_eq!(report["ok"], true, "{report}");
    let mut lines = Vec::new();
    for _ in 0..50 {
        lines = std::fs::read_to_string(&text_log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect();
        if lines.len() >= 3 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(lines.len(), 3, "one line per connection: {lines:?}");
    for line in &lines {
        // Envoy's default format for a TCP connection: no method or path, the byte counts,
        // the upstream host last.
        assert!(
            line.starts_with('[') && line.contains("] \"- - TCP\" 0 - 5000 "),
            "{line}"
        );
        let v4 = format!("\"{}:8080\"", bed.v1.ipv4());
        let v6 = format!("\"[{}]:8080\"", bed.v1.ipv6());
        assert!(line.ends_with(&v4) || line.ends_with(&v6), "{line}");
    }
    let mut received: Vec<Value> = Vec::new();
    for _ in 0..50 {
        received = std::fs::read_to_string(&json_log)
            .unwrap_or_default()
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
        if received.len() >= 3 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        received.len(),
        3,
        "one line per connection received: {received:?}"
    );
    for line in &received {
        let upstream = line["upstream"].as_str().unwrap_or_default();
        assert!(
            upstream == format!("{}:8080", bed.v1.ipv4())
                || upstream == format!("[{}]:8080", bed.v1.ipv6()),
            "the pod's address: {line}"
        );
    }
    Ok(())
}

#[test]
fn a_restarted_agent_adopts_the_pinned_maps() -> anyhow::Result<()> {
    let bed = bed("restart", &mesh_yaml("ALLOW_ALL", 100, 0))?;
    let first = Agent::start(&bed.tb, &bed.node, &bed.mesh, &[])?;
    let report = call(&bed.client, &format!("{SERVICE}:8080"), &["-4"])?;
    assert_eq!(report["ok"], true, "{report}");
    let status = first.stop()?;
    assert!(
        status.success(),
        "SIGTERM: the agent exits cleanly, got {status}"
    );
    assert!(
        std::fs::read_dir(bed.node.bpffs())?.next().is_some(),
        "pins stay after the agent exits"
    );

    let second = Agent::start(&bed.tb, &bed.node, &bed.mesh, &[])?;
    let report = call(&bed.client, &format!("{SERVICE}:8080"), &["-4"])?;
    assert_eq!(report["ok"], true, "{report}");
    // The counters map was adopted, not recreated: it still holds the first agent's capture.
    assert_eq!(second.counter("captured")?, 2);
    Ok(())
}

#[test]
fn an_upgrade_hands_the_listeners_over_and_refuses_no_connect() -> anyhow::Result<()> {
    let bed = bed("upgrade", &mesh_yaml("ALLOW_ALL", 100, 0))?;
    let old = Agent::start(&bed.tb, &bed.node, &bed.mesh, &[])?;
    let client = bed.tb.spawn(
        "client-steady",
        bed.client.command(testbed::agent::peer_binary()?).args([
            "call",
            &format!("{SERVICE}:8080"),
            "-4",
            "--count",
            "400",
            "--interval-ms",
            "10",
        ]),
    )?;
    std::thread::sleep(Duration::from_millis(800));
    let new = Agent::start(&bed.tb, &bed.node, &bed.mesh, &[])?;
    let status = old.process.wait_timeout(Duration::from_secs(15))?;
    assert!(status.success(), "the old agent drains and exits: {status}");
    assert!(
        old.process
            .stderr()
            .contains("listeners handed over to a new agent"),
        "{}",
        old.process.stderr()
    );
    assert!(
        client.try_wait()?.is_none(),
        "the client finished before the upgrade did; raise --count"
    );
    client.wait_timeout(Duration::from_secs(60))?;
    let report: Value = serde_json::from_str(client.stdout().trim())?;
    assert_eq!(
        report["succeeded"],
        400,
        "no connect refused during the upgrade: {report}\nold agent:\n{}\nnew agent:\n{}",
        not_connection_lines(&old.process.stderr()),
        not_connection_lines(&new.process.stderr()),
    );
    // The new agent serves on its own.
    let report = call(&bed.client, &format!("{SERVICE}:8080"), &["-4"])?;
    assert_eq!(report["ok"], true, "{report}");
    assert!(!new.connection_logs().is_empty());
    Ok(())
}

/// An upgrade while DNS does not answer: the new agent starts after its 2 s bound on the first
/// DNS round and keeps the old agent's addresses for the names it has no answer for, so a
/// DROP_ALL pod's connects to the service keep working (a service missing from the map would
/// make them fail with EPERM).
#[test]
fn an_upgrade_without_dns_answers_keeps_the_previous_addresses() -> anyhow::Result<()> {
    let bed = bed("upgradedns", &mesh_yaml("DROP_ALL", 100, 0))?;
    let old = Agent::start(&bed.tb, &bed.node, &bed.mesh, &[])?;
    let report = call(&bed.client, &format!("{SERVICE}:8080"), &["-4"])?;
    assert_eq!(report["ok"], true, "{report}");
    // A DNS server in the node's namespace that takes queries (UDP and TCP) and never answers.
    let silent = "127.0.0.53";
    let dns = bed.tb.spawn(
        "silent-dns",
        bed.node.command("/usr/bin/python3").args([
            "-c",
            &format!(
                "import socket,time\n\
                 u=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); u.bind(('{silent}',53))\n\
                 t=socket.socket(); t.bind(('{silent}',53)); t.listen(64)\n\
                 print('listening', flush=True)\n\
                 time.sleep(300)\n"
            ),
        ]),
    )?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !dns.stdout().contains("listening") {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the silent DNS server did not start: {}",
            dns.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let client = bed.tb.spawn(
        "client-steady",
        bed.client.command(testbed::agent::peer_binary()?).args([
            "call",
            &format!("{SERVICE}:8080"),
            "-4",
            "--count",
            "600",
            "--interval-ms",
            "10",
        ]),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let started = std::time::Instant::now();
    let new = Agent::start(&bed.tb, &bed.node, &bed.mesh, &["--dns-server", silent])?;
    let took = started.elapsed();
    let status = old.process.wait_timeout(Duration::from_secs(15))?;
    assert!(status.success(), "the old agent drains and exits: {status}");
    assert!(
        new.process
            .stderr()
            .contains("no DNS answer yet; keeping the previous agent's addresses"),
        "{}",
        new.process.stderr()
    );
    assert!(
        client.try_wait()?.is_none(),
        "the client finished before the upgrade did; raise --count"
    );
    client.wait_timeout(Duration::from_secs(60))?;
    let report: Value = serde_json::from_str(client.stdout().trim())?;
    assert_eq!(
        report["succeeded"], 600,
        "no connect refused during the upgrade (ready after {took:?}): {report}"
    );
    // The new agent serves on its own, with the kept addresses.
    let report = call(&bed.client, &format!("{SERVICE}:8080"), &["-4"])?;
    assert_eq!(report["ok"], true, "{report}");
    assert!(!new.connection_logs().is_empty());
    dns.kill()?;
    Ok(())
}

#[test]
fn uninstall_removes_every_pin_and_attachment() -> anyhow::Result<()> {
    let bed = bed("uninstall", &mesh_yaml("ALLOW_ALL", 100, 0))?;
    let agent = Agent::start(&bed.tb, &bed.node, &bed.mesh, &[])?;
    let report = call(&bed.client, &format!("{SERVICE}:8080"), &["-4"])?;
    assert_eq!(report["ok"], true, "{report}");
    agent.stop()?;

    let bpffs = bed.node.bpffs().to_str().context("bpffs path")?.to_owned();
    let output = strait(&bed.node, &["uninstall", "--bpffs", &bpffs])?;
    assert!(
        output.status.success(),
        "strait uninstall: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!bed.node.bpffs().exists(), "the bpffs folder is gone");
    // Detached: the client's connect is no longer rewritten; it meets the unreachable route.
    let report = call(&bed.client, &format!("{SERVICE}:8080"), &["-4"])?;
    assert_eq!(first_errno(&report), Some(EHOSTUNREACH), "{report}");
    // Running it again is fine.
    let output = strait(&bed.node, &["uninstall", "--bpffs", &bpffs])?;
    assert!(output.status.success());
    Ok(())
}

#[test]
fn bad_input_gets_one_clear_error_and_leaves_nothing_attached() -> anyhow::Result<()> {
    let bed = bed("badinput", &mesh_yaml("ALLOW_ALL", 100, 0))?;
    let node = &bed.node;
    let bpffs = node.bpffs().to_str().context("bpffs")?.to_owned();
    let mesh = bed.mesh.to_str().context("mesh")?.to_owned();
    let workloads = node
        .workloads_dir()
        .to_str()
        .context("workloads")?
        .to_owned();
    let cgroup = node.cgroup_root().to_str().context("cgroup")?.to_owned();
    let broken_mesh = bed.tb.temp_dir().join("broken.yaml");
    std::fs::write(
        &broken_mesh,
        "apiVersion: appmesh.k8s.aws/v1beta2\nkind: Mesh\nmetadata: {name: [unclosed\n",
    )?;
    let broken_mesh = broken_mesh.to_str().context("path")?.to_owned();
    let not_bpffs = bed.tb.temp_dir().join("not-bpffs");
    let not_bpffs = not_bpffs.to_str().context("path")?.to_owned();

    let cases: [(&str, Vec<&str>, &str); 4] = [
        (
            "mesh file that does not parse",
            vec![
                "--mesh",
                &broken_mesh,
                "--workloads",
                &workloads,
                "--cgroup-root",
                &cgroup,
                "--bpffs",
                &bpffs,
            ],
            "broken.yaml:",
        ),
        (
            "missing workloads directory",
            vec![
                "--mesh",
                &mesh,
                "--workloads",
                "/nonexistent/strait-workloads",
                "--cgroup-root",
                &cgroup,
                "--bpffs",
                &bpffs,
            ],
            "/nonexistent/strait-workloads",
        ),
        (
            "cgroup path that does not exist",
            vec![
                "--mesh",
                &mesh,
                "--workloads",
                &workloads,
                "--cgroup-root",
                "/sys/fs/cgroup/unified/strait-no-such-cgroup",
                "--bpffs",
                &bpffs,
            ],
            "strait-no-such-cgroup",
        ),
        (
            "bpffs folder not on a bpf filesystem",
            vec![
                "--mesh",
                &mesh,
                "--workloads",
                &workloads,
                "--cgroup-root",
                &cgroup,
                "--bpffs",
                &not_bpffs,
            ],
            "bpf",
        ),
    ];
    for (what, args, expected) in cases {
        let mut full = vec!["run", "--admin", "127.0.0.1:0"];
        full.extend(args);
        let output = strait(node, &full)?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{what}: must fail");
        assert!(!stderr.contains("panicked"), "{what}: no panic: {stderr}");
        assert!(
            stderr.contains(expected),
            "{what}: the error names {expected:?}: {stderr}"
        );
        assert!(
            !node.bpffs().exists() || std::fs::read_dir(node.bpffs())?.next().is_none(),
            "{what}: nothing pinned"
        );
    }
    // Missing privileges: root without capabilities cannot load eBPF programs.
    let binary = testbed::agent::strait_binary()?;
    let output = testbed::run(
        node.command("setpriv")
            .args(["--inh-caps=-all", "--bounding-set=-all", "--"])
            .arg(&binary)
            .args([
                "run",
                "--admin",
                "127.0.0.1:0",
                "--mesh",
                &mesh,
                "--workloads",
                &workloads,
            ])
            .args(["--cgroup-root", &cgroup, "--bpffs", &bpffs]),
        Duration::from_secs(30),
    )?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "without capabilities: must fail");
    assert!(
        stderr.contains("CAP_BPF") && !stderr.contains("panicked"),
        "without capabilities: the error says what is needed: {stderr}"
    );
    // Nothing was attached: a client pod's connect is not captured.
    let report = call(&bed.client, &format!("{SERVICE}:8080"), &["-4"])?;
    assert_eq!(first_errno(&report), Some(EHOSTUNREACH), "{report}");
    Ok(())
}

/// Connection log lines are written when a connection closes, which can be a moment after
/// the client is done.
fn wait_for_connection_logs(agent: &Agent, count: usize) -> anyhow::Result<Vec<Value>> {
    for _ in 0..50 {
        let logs = agent.connection_logs();
        if logs.len() >= count {
            return Ok(logs);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!(
        "expected {count} connection log lines; agent stderr:\n{}",
        agent.process.stderr()
    )
}

/// An agent's log without its per-connection lines: what a failure message needs.
fn not_connection_lines(stderr: &str) -> String {
    stderr
        .lines()
        .filter(|line| !line.contains(r#""message":"connection closed""#))
        .collect::<Vec<_>>()
        .join("\n")
}
