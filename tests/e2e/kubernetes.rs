//! End-to-end tests of the Kubernetes pod source (`strait run --kubernetes`): the agent's real
//! kube-rs client lists and watches Pods, Namespaces and Nodes on the test API server
//! (`testbed::kubeapi`, reached inside the node's network namespace), finds each pod's cgroup
//! and sandbox on the testbed node (laid out as kubelet does, with a `pause` process), and
//! enrolls what the App Mesh rules select. What a user would check: a pod created in the API
//! is captured, a deleted one released, a relabelled one moves, pods that must not be enrolled
//! say why, and neither a 410 Gone, watch restarts nor an API outage un-enroll anything.
//!
//! Needs root; without it these tests fail (never skip) with the reason.

mod common;

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use common::*;
use serde_json::{Value, json};
use testbed::agent::{Agent, peer_binary, strait, strait_binary};
use testbed::kubeapi::{self, Kind, KubeApi};
use testbed::kubelet::CgroupDriver;
use testbed::{Node, Pod, PodSpec, Process, Testbed, run};

/// The shared mesh, with a namespaceSelector (namespace labels come from the API) and two
/// VirtualNodes that both select `app: twin`.
fn mesh_text() -> String {
    let mesh = mesh_yaml("ALLOW_ALL", 100, 0).replace(
        "spec:\n  egressFilter:",
        "spec:\n  namespaceSelector:\n    matchLabels:\n      mesh: test\n  egressFilter:",
    );
    let twins = ["twin-a", "twin-b"]
        .iter()
        .map(|name| {
            format!(
                "---\napiVersion: appmesh.k8s.aws/v1beta2\nkind: VirtualNode\nmetadata:\n  name: {name}\n  namespace: app\nspec:\n  podSelector:\n    matchLabels:\n      app: twin\n"
            )
        })
        .collect::<String>();
    format!("{mesh}{twins}")
}

struct KubeBed {
    tb: Testbed,
    node: Node,
    api: KubeApi,
    kubeconfig: PathBuf,
    client: Pod,
    _v1: Pod,
    v2: Pod,
    mesh: PathBuf,
    /// The pause processes of client, color-v1, color-v2.
    sandboxes: Vec<Process>,
    _servers: Vec<Process>,
}

/// One node with a client and two color servers, each with its sandbox process; the API
/// holds the node, namespace `app` (in the mesh) and the two servers, not the client.
fn kube_bed(test: &str) -> anyhow::Result<KubeBed> {
    kube_bed_with_driver(test, CgroupDriver::Systemd)
}

/// [`kube_bed`] on a node whose pod cgroups kubelet's `driver` names.
fn kube_bed_with_driver(test: &str, driver: CgroupDriver) -> anyhow::Result<KubeBed> {
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
    // The sandbox first: it is the pod's oldest process, as on a real node.
    let sandboxes = [&client, &v1, &v2]
        .into_iter()
        .map(|pod| tb.start_sandbox(pod))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut servers = Vec::new();
    tb.dns_record(
        SERVICE,
        &[SERVICE_V4.parse()?, SERVICE_V6.parse::<IpAddr>()?],
    )?;
    tb.dns_record("color-v1.app.svc.cluster.local", &v1.ips())?;
    tb.dns_record("color-v2.app.svc.cluster.local", &v2.ips())?;
    let peer = peer_binary()?;
    for (pod, name) in [(&v1, "v1"), (&v2, "v2")] {
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
    let api = KubeApi::new()?;
    let addr = api.serve_in(&node)?;
    let kubeconfig = api.kubeconfig(addr, tb.temp_dir())?;
    api.apply(kubeapi::node_object(&node))?;
    api.apply(kubeapi::namespace_object("app", &[("mesh", "test")]))?;
    api.apply(kubeapi::namespace_object("other", &[]))?;
    api.apply(kubeapi::pod_object(&v1))?;
    api.apply(kubeapi::pod_object(&v2))?;
    let mesh = tb.temp_dir().join("mesh.yaml");
    std::fs::write(&mesh, mesh_text())?;
    Ok(KubeBed {
        tb,
        node,
        api,
        kubeconfig,
        client,
        _v1: v1,
        v2,
        mesh,
        sandboxes,
        _servers: servers,
    })
}

/// The `/workloads` entry of `pod`, if listed.
fn entry(agent: &Agent, pod: &str) -> anyhow::Result<Option<Value>> {
    Ok(agent.workloads()?.into_iter().find(|w| w["pod"] == pod))
}

/// Polls `/workloads` until `check` holds for `pod`'s entry (bounded).
fn wait_entry(
    agent: &Agent,
    pod: &str,
    timeout: Duration,
    check: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let found = entry(agent, pod)?;
        if let Some(found) = found.filter(|e| check(e)) {
            return Ok(found);
        }
        if Instant::now() >= deadline {
            bail!(
                "{pod} in /workloads did not reach the expected state after {timeout:?}: {:?}\nagent stderr:\n{}",
                entry(agent, pod)?,
                agent.process.stderr()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Calls the color service from `pod` once; returns the report.
fn call_color(pod: &Pod) -> anyhow::Result<Value> {
    call(pod, &format!("{SERVICE}:8080"), &["-4"])
}

#[test]
fn a_pod_created_in_the_api_is_enrolled_and_captured_and_released_when_deleted()
-> anyhow::Result<()> {
    let bed = kube_bed("k8s-enroll")?;
    let agent = Agent::start_kubernetes(&bed.tb, &bed.node, &bed.mesh, &bed.kubeconfig, &[])?;
    agent.wait_enrolled("app/color-v1", true, Duration::from_secs(10))?;
    // Not in the API yet: not captured.
    let report = call_color(&bed.client)?;
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(first_errno(&report), Some(EHOSTUNREACH), "{report}");

    bed.api.apply(kubeapi::pod_object(&bed.client))?;
    let client = wait_entry(&agent, "app/client", Duration::from_secs(10), |e| {
        e["enrolled"] == true
    })?;
    assert_eq!(client["virtual_node"], "app/client", "{client}");
    let report = call_color(&bed.client)?;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["by_server"]["v1"], 1, "{report}");
    assert_eq!(agent.counter("captured")?, 1);
    let logs = wait_connection_logs(&agent, 1)?;
    assert_eq!(logs[0]["source_workload"], "app/client", "{}", logs[0]);

    // The agent watched this node's pods only, with bookmarks.
    let requests = bed.api.requests();
    assert!(
        requests.iter().any(|r| r.starts_with("GET /api/v1/pods?")
            && r.contains("watch=true")
            && r.contains("fieldSelector=spec.nodeName%3Dnode1")
            && r.contains("allowWatchBookmarks=true")),
        "{requests:#?}"
    );

    // The sandbox process is replaced by another in the same network namespace: the pod
    // stays enrolled as it is (same listeners), and calls are still captured.
    let replacement = bed.tb.start_sandbox(&bed.client)?;
    bed.sandboxes[0].kill()?;
    std::thread::sleep(Duration::from_secs(2));
    let released = |agent: &Agent| {
        agent
            .log_lines()
            .iter()
            .filter(|l| l["message"] == "pod released")
            .count()
    };
    assert_eq!(released(&agent), 0, "{}", agent.process.stderr());
    assert!(
        agent.process.stderr().contains("sandbox process is gone"),
        "the agent did not notice the sandbox change:\n{}",
        agent.process.stderr()
    );
    let again = entry(&agent, "app/client")?.context("client listed")?;
    assert_eq!(again["enrolled"], true, "{again}");
    assert_eq!(again["listeners"], client["listeners"], "{again}");
    let report = call_color(&bed.client)?;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(agent.counter("captured")?, 2);
    replacement.kill()?;

    bed.api.delete(Kind::Pod, "app", "client")?;
    agent.wait_enrolled("app/client", false, Duration::from_secs(10))?;
    assert!(entry(&agent, "app/client")?.is_none());
    let report = call_color(&bed.client)?;
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(first_errno(&report), Some(EHOSTUNREACH), "{report}");
    assert_eq!(agent.counter("captured")?, 2);
    Ok(())
}

#[test]
fn only_pods_exactly_one_virtual_node_selects_are_enrolled_and_the_others_say_why()
-> anyhow::Result<()> {
    let bed = kube_bed("k8s-rules")?;
    let twin = bed
        .node
        .add_pod(&PodSpec::new("twin", "app").label("app", "twin"))?;
    let stranger = bed
        .node
        .add_pod(&PodSpec::new("stranger", "other").label("app", "client"))?;
    let _sandboxes = [
        bed.tb.start_sandbox(&twin)?,
        bed.tb.start_sandbox(&stranger)?,
    ];
    bed.api.apply(kubeapi::pod_object(&twin))?;
    bed.api.apply(kubeapi::pod_object(&stranger))?;
    let mut host = kubeapi::pod_object(&bed.client);
    host["metadata"]["name"] = json!("host");
    host["metadata"]["uid"] = json!("11111111-2222-4333-8444-555555555555");
    host["spec"]["hostNetwork"] = json!(true);
    host["status"]["podIP"] = json!(bed.node.underlay_ip().to_string());
    host["status"]["podIPs"] = json!([{"ip": bed.node.underlay_ip().to_string()}]);
    bed.api.apply(host)?;
    let mut pending = kubeapi::pod_object(&bed.client);
    pending["metadata"]["name"] = json!("pending");
    pending["metadata"]["uid"] = json!("66666666-7777-4888-8999-aaaaaaaaaaaa");
    pending["status"] = json!({"phase": "Pending"});
    bed.api.apply(pending)?;
    // A pod on another node is not this agent's.
    let mut elsewhere = kubeapi::pod_object(&bed.client);
    elsewhere["metadata"]["name"] = json!("elsewhere");
    elsewhere["spec"]["nodeName"] = json!("node2");
    bed.api.apply(elsewhere)?;

    let agent = Agent::start_kubernetes(&bed.tb, &bed.node, &bed.mesh, &bed.kubeconfig, &[])?;
    agent.wait_enrolled("app/color-v1", true, Duration::from_secs(10))?;
    let reason = |pod: &str, wanted: &str| -> anyhow::Result<()> {
        let e = wait_entry(&agent, pod, Duration::from_secs(10), |e| {
            e["reason"].as_str().is_some_and(|r| r.contains(wanted))
        })?;
        assert_eq!(e["enrolled"], false, "{e}");
        Ok(())
    };
    reason(
        "app/twin",
        "several VirtualNodes select the pod (app/twin-a, app/twin-b)",
    )?;
    reason(
        "other/stranger",
        "namespace other is not selected by Mesh test",
    )?;
    reason("app/host", "hostNetwork")?;
    reason("app/pending", "no IP yet")?;
    assert!(entry(&agent, "app/elsewhere")?.is_none());
    let status = strait(&bed.node, &["status", "--admin", testbed::agent::ADMIN])?;
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains("app/twin") && status.contains("not enrolled: several VirtualNodes"),
        "{status}"
    );
    // The twin is not captured: its connect goes to the unreachable service range.
    let report = call_color(&twin)?;
    assert_eq!(first_errno(&report), Some(EHOSTUNREACH), "{report}");

    // Relabelled: color-v2 becomes a v1 pod and moves to that VirtualNode.
    agent.wait_enrolled("app/color-v2", true, Duration::from_secs(10))?;
    let before = entry(&agent, "app/color-v2")?.context("color-v2 listed")?;
    assert_eq!(before["virtual_node"], "app/color-v2", "{before}");
    let mut moved = kubeapi::pod_object(&bed.v2);
    moved["metadata"]["labels"]["version"] = json!("v1");
    bed.api.apply(moved)?;
    let after = wait_entry(&agent, "app/color-v2", Duration::from_secs(10), |e| {
        e["virtual_node"] == "app/color-v1" && e["enrolled"] == true
    })?;
    assert_eq!(after["cgroup_id"], before["cgroup_id"], "{after}");
    // A label nothing selects: released, and /workloads says why.
    let mut unselected = kubeapi::pod_object(&bed.v2);
    unselected["metadata"]["labels"]["app"] = json!("nothing");
    bed.api.apply(unselected)?;
    let e = wait_entry(&agent, "app/color-v2", Duration::from_secs(10), |e| {
        e["enrolled"] == false
    })?;
    assert!(
        e["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no VirtualNode in namespace app selects")),
        "{e}"
    );
    // Namespace labels from the API count: `other` joins the mesh, but no VirtualNode there.
    bed.api
        .apply(kubeapi::namespace_object("other", &[("mesh", "test")]))?;
    reason(
        "other/stranger",
        "no VirtualNode in namespace other selects",
    )?;
    Ok(())
}

/// Polls `/workloads` for `duration`, failing if any of `pods` is ever not enrolled.
fn stays_enrolled(agent: &Agent, pods: &[&str], duration: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + duration;
    while Instant::now() < deadline {
        let workloads = agent.workloads()?;
        for pod in pods {
            if !workloads
                .iter()
                .any(|w| w["pod"] == *pod && w["enrolled"] == true)
            {
                bail!(
                    "{pod} was not enrolled at some point: {workloads:#?}\nagent stderr:\n{}",
                    agent.process.stderr()
                );
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

#[test]
fn expired_watches_watch_restarts_and_an_api_outage_keep_pods_enrolled() -> anyhow::Result<()> {
    let bed = kube_bed("k8s-outage")?;
    bed.api.apply(kubeapi::pod_object(&bed.client))?;
    // Watches end every 2 s (as when kube-apiserver or a load balancer closes them).
    bed.api.set_max_watch(Some(Duration::from_secs(2)));
    let agent = Agent::start_kubernetes(&bed.tb, &bed.node, &bed.mesh, &bed.kubeconfig, &[])?;
    for pod in ["app/client", "app/color-v1", "app/color-v2"] {
        agent.wait_enrolled(pod, true, Duration::from_secs(10))?;
    }
    let watches = |api: &KubeApi| {
        api.requests()
            .iter()
            .filter(|r| r.starts_with("GET /api/v1/pods?") && r.contains("watch=true"))
            .count()
    };
    let lists = |api: &KubeApi| {
        api.requests()
            .iter()
            .filter(|r| r.starts_with("GET /api/v1/pods?") && !r.contains("watch=true"))
            .count()
    };
    let watches_before = watches(&bed.api);
    stays_enrolled(
        &agent,
        &["app/client", "app/color-v1", "app/color-v2"],
        Duration::from_secs(5),
    )?;
    assert!(
        watches(&bed.api) >= watches_before + 2,
        "the watch was not restarted after it ended: {:#?}",
        bed.api.requests()
    );

    // 410 Gone: the watch ends, color-v2 is deleted and the history compacted, so the agent
    // only learns it by listing again. Nothing else moves meanwhile.
    let lists_before = lists(&bed.api);
    bed.api
        .change_behind_expired_watches(Vec::new(), &[(Kind::Pod, "app", "color-v2")])?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while entry(&agent, "app/color-v2")?.is_some() {
        stays_enrolled(&agent, &["app/client", "app/color-v1"], Duration::ZERO)?;
        if Instant::now() >= deadline {
            bail!(
                "color-v2 still listed after the relist; agent stderr:\n{}",
                agent.process.stderr()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        lists(&bed.api) > lists_before,
        "no relist after 410: {:#?}",
        bed.api.requests()
    );
    stays_enrolled(
        &agent,
        &["app/client", "app/color-v1"],
        Duration::from_secs(1),
    )?;

    // An outage: nothing answers for 4 s. Pods stay enrolled and calls are still captured.
    bed.api.stop();
    stays_enrolled(
        &agent,
        &["app/client", "app/color-v1"],
        Duration::from_secs(4),
    )?;
    let report = call_color(&bed.client)?;
    assert_eq!(report["ok"], true, "{report}");
    assert!(
        agent.log_lines().iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.contains("cannot list or watch"))),
        "the agent did not say the API is unreachable:\n{}",
        agent.process.stderr()
    );
    // Changes made while the API was away, and after it returns, are applied.
    bed.api.apply(kubeapi::pod_object(&bed.v2))?;
    bed.api.restart()?;
    agent.wait_enrolled("app/color-v2", true, Duration::from_secs(40))?;
    bed.api.delete(Kind::Pod, "app", "client")?;
    agent.wait_enrolled("app/client", false, Duration::from_secs(10))?;
    stays_enrolled(
        &agent,
        &["app/color-v1", "app/color-v2"],
        Duration::from_secs(1),
    )?;
    let released: Vec<Value> = agent
        .log_lines()
        .into_iter()
        .filter(|l| l["message"] == "pod released")
        .collect();
    assert_eq!(
        released.len(),
        2,
        "only color-v2 (410) and client (deleted): {released:#?}"
    );
    Ok(())
}

#[test]
fn the_agent_is_not_ready_until_the_api_lists_and_needs_a_node_name() -> anyhow::Result<()> {
    // This node's kubelet uses the cgroupfs driver: the agent finds pods in either layout.
    let bed = kube_bed_with_driver("k8s-ready", CgroupDriver::Cgroupfs)?;
    bed.api.apply(kubeapi::pod_object(&bed.client))?;
    // The API is down when the agent starts.
    bed.api.stop();
    let agent = Agent::spawn_kubernetes(&bed.tb, &bed.node, &bed.mesh, &bed.kubeconfig, &[])?;
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut answers = 0;
    while Instant::now() < deadline {
        let code = agent.admin_status("/ready")?;
        assert!(
            code == 503 || code == 0,
            "/ready answered {code} before the API was reachable"
        );
        answers += usize::from(code == 503);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        answers > 0,
        "/ready never answered 503; stderr:\n{}",
        agent.process.stderr()
    );
    assert!(agent.workloads()?.is_empty());
    assert!(
        agent.process.stderr().contains("cannot list or watch"),
        "{}",
        agent.process.stderr()
    );
    bed.api.restart()?;
    agent.wait_ready(Duration::from_secs(40))?;
    agent.wait_enrolled("app/client", true, Duration::from_secs(10))?;
    let report = call_color(&bed.client)?;
    assert_eq!(report["ok"], true, "{report}");

    // Without a node name the agent refuses to start, saying what to set.
    let mut command = bed.node.command(strait_binary()?);
    command
        .args(["run", "--kubernetes", "--mesh"])
        .arg(&bed.mesh)
        .arg("--kubeconfig")
        .arg(&bed.kubeconfig)
        .env_remove("NODE_NAME");
    let output = run(&mut command, Duration::from_secs(30))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--node-name") && stderr.contains("NODE_NAME"),
        "{stderr}"
    );
    Ok(())
}

/// Waits for `n` per-connection log lines (bounded).
fn wait_connection_logs(agent: &Agent, n: usize) -> anyhow::Result<Vec<Value>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let logs = agent.connection_logs();
        if logs.len() >= n {
            return Ok(logs);
        }
        if Instant::now() >= deadline {
            bail!("{} connection log lines, wanted {n}", logs.len());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
