//! End-to-end tests of the Kubernetes pod source (`strait run --kubernetes`): the agent's real
//! kube-rs client lists and watches Pods, Namespaces and Nodes on the test API server
//! (`testbed::kubeapi`, reached inside the node's network namespace), finds each pod's cgroup
//! and sandbox on the testbed node (laid out as kubelet does, with a `pause` process), and
//! enrolls what the App Mesh rules select. What a user would check: a pod created in the API
//! is captured, a deleted one released, a relabelled one moves, pods that must not be enrolled
//! say why, and neither a 410 Gone, watch restarts nor an API outage un-enroll anything.
//!
//! Needs root; without it these tests fail (never skip) with the reason.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::common::*;
use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use testbed::agent::{Agent, peer_binary, strait, strait_binary};
use testbed::kubeapi::{self, Kind, KubeApi};
use testbed::kubelet::CgroupDriver;
use testbed::{Node, Pod, PodSpec, Process, Testbed, eventually, run};

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

/// The mesh of the flat-range test: `client` calls `color`, whose listener is tls STRICT
/// (certificates from `strait ca issue`), and `legacy`, whose listener is PERMISSIVE (the
/// client's policy does not enforce TLS for it), both with endpoints from DNS.
fn flat_mesh_yaml(certs: &std::path::Path) -> String {
    let c = certs.display();
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
    - virtualService:
        virtualServiceRef: {{name: legacy}}
        clientPolicy:
          tls:
            enforce: false
            certificate: {{file: {{certificateChain: {c}/client.pem, privateKey: {c}/client-key.pem}}}}
            validation: {{trust: {{file: {{certificateChain: {c}/ca-bundle.pem}}}}}}
  backendDefaults:
    clientPolicy:
      tls:
        certificate: {{file: {{certificateChain: {c}/client.pem, privateKey: {c}/client-key.pem}}}}
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
        validation: {{trust: {{file: {{certificateChain: {c}/ca-bundle.pem}}}}}}
  serviceDiscovery: {{dns: {{hostname: color-pods.app.svc.cluster.local, responseType: ENDPOINTS}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {{name: color, namespace: app}}
spec:
  awsName: color.app.svc.cluster.local
  provider: {{virtualNode: {{virtualNodeRef: {{name: color}}}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: legacy, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: legacy}}}}
  listeners:
    - portMapping: {{port: 7070, protocol: tcp}}
      tls:
        mode: PERMISSIVE
        certificate: {{file: {{certificateChain: {c}/legacy.pem, privateKey: {c}/legacy-key.pem}}}}
        validation: {{trust: {{file: {{certificateChain: {c}/ca-bundle.pem}}}}}}
  serviceDiscovery: {{dns: {{hostname: legacy-pods.app.svc.cluster.local, responseType: ENDPOINTS}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {{name: legacy, namespace: app}}
spec:
  awsName: legacy.app.svc.cluster.local
  provider: {{virtualNode: {{virtualNodeRef: {{name: legacy}}}}}}
"#
    )
}

/// Calls color (9090) `count` times from `pod`; the report.
fn call_flat(pod: &Pod, count: u32) -> anyhow::Result<Value> {
    call(
        pod,
        "color.app.svc.cluster.local:9090",
        &["-4", "--count", &count.to_string()],
    )
}

/// Inbound (or outbound) tunnel streams an agent counted.
fn tunnel_streams(agent: &Agent, direction: &str) -> anyhow::Result<f64> {
    testbed::agent::metric(
        agent,
        "strait_tunnel_streams_total",
        &[&format!("direction=\"{direction}\"")],
    )
}

#[test]
fn pods_of_one_flat_range_are_reached_through_the_agent_of_the_node_the_api_names()
-> anyhow::Result<()> {
    use testbed::agent::{echo_server, issue_mesh_certs};
    let tb = Testbed::new("k8s-flat")?;
    let node1 = tb.add_node("node1")?;
    let node2 = tb.add_node("node2")?;
    // EKS-style: one range, the nodes' pods interleaved, no per-node CIDR (and no --peer-node).
    let ip = |last: u8| std::net::Ipv4Addr::new(10, 245, 0, last);
    let client = node1.add_pod_at(
        &PodSpec::new("client", "app").label("app", "client"),
        ip(10),
    )?;
    let color_b = node2.add_pod_at(
        &PodSpec::new("color-b", "app").label("app", "color"),
        ip(11),
    )?;
    let idle = node1.add_pod_at(&PodSpec::new("idle", "app").label("app", "idle"), ip(12))?;
    // color-c and legacy (node3, added later) will be 10.245.0.13 and .14; DNS lists them from
    // the start.
    tb.dns_record("color.app.svc.cluster.local", &["10.96.0.10".parse()?])?;
    tb.dns_record("legacy.app.svc.cluster.local", &["10.96.0.11".parse()?])?;
    tb.dns_record("legacy-pods.app.svc.cluster.local", &[IpAddr::V4(ip(14))])?;
    tb.dns_record(
        "color-pods.app.svc.cluster.local",
        &[IpAddr::V4(ip(11)), IpAddr::V4(ip(13))],
    )?;
    let mut processes = Vec::new();
    for pod in [&client, &color_b, &idle] {
        processes.push(tb.start_sandbox(pod)?);
    }
    processes.push(echo_server(&tb, &color_b, 9090, "color-b")?);

    let certs = tb.temp_dir().join("certs");
    let ca = tb.temp_dir().join("ca");
    let mesh = tb.temp_dir().join("mesh.yaml");
    std::fs::write(&mesh, flat_mesh_yaml(&certs))?;
    issue_mesh_certs(&node1, &mesh, &ca)?;

    let api = KubeApi::new()?;
    let kubeconfig = |node: &Node| -> anyhow::Result<PathBuf> {
        let addr = api.serve_in(node)?;
        api.kubeconfig(addr, tb.temp_dir())
    };
    let kubeconfig1 = kubeconfig(&node1)?;
    let kubeconfig2 = kubeconfig(&node2)?;
    api.apply(kubeapi::node_object(&node1))?;
    api.apply(kubeapi::node_object(&node2))?;
    api.apply(kubeapi::namespace_object("app", &[]))?;
    for pod in [&client, &color_b, &idle] {
        api.apply(kubeapi::pod_object(pod))?;
    }
    let agent1 = Agent::start_kubernetes(&tb, &node1, &mesh, &kubeconfig1, &[])?;
    api.apply(kubeapi::agent_pod_object(&node1, true))?;
    let agent2 = Agent::start_kubernetes(&tb, &node2, &mesh, &kubeconfig2, &[])?;
    api.apply(kubeapi::agent_pod_object(&node2, true))?;
    agent1.wait_enrolled("app/client", true, Duration::from_secs(15))?;
    agent2.wait_enrolled("app/color-b", true, Duration::from_secs(15))?;

    // color-b, on node2, through node2's agent over mTLS. 10.245.0.13 is no pod yet: with
    // a STRICT listener it is not tried in plain TCP, so every call lands on color-b.
    eventually(Duration::from_secs(15), "client reaches color-b", || {
        Ok(call_flat(&client, 1)?["ok"] == true)
    })?;
    let inbound2 = tunnel_streams(&agent2, "inbound")?;
    let report = call_flat(&client, 6)?;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["by_server"]["color-b"], 6, "{report}");
    assert!(
        tunnel_streams(&agent2, "inbound")? >= inbound2 + 6.0,
        "node2's agent did not take the calls through its tunnel:\n{}",
        agent1.process.stderr()
    );
    assert!(
        agent1
            .process
            .stderr()
            .contains("no Pod in the API has this address"),
        "{}",
        agent1.process.stderr()
    );

    // node3 joins: its Node and Pod objects, then its agent. Until that agent's pod is
    // ready, node3 is a node without an agent: color-c is not reached (STRICT), legacy is, in
    // plain TCP (PERMISSIVE).
    let node3 = tb.add_node("node3")?;
    let color_c = node3.add_pod_at(
        &PodSpec::new("color-c", "app").label("app", "color"),
        ip(13),
    )?;
    let legacy = node3.add_pod_at(
        &PodSpec::new("legacy", "app").label("app", "legacy"),
        ip(14),
    )?;
    processes.push(tb.start_sandbox(&color_c)?);
    processes.push(tb.start_sandbox(&legacy)?);
    processes.push(echo_server(&tb, &color_c, 9090, "color-c")?);
    processes.push(echo_server(&tb, &legacy, 7070, "legacy")?);
    let kubeconfig3 = kubeconfig(&node3)?;
    api.apply(kubeapi::node_object(&node3))?;
    api.apply(kubeapi::pod_object(&color_c))?;
    api.apply(kubeapi::pod_object(&legacy))?;
    let agent3 = Agent::start_kubernetes(&tb, &node3, &mesh, &kubeconfig3, &[])?;
    api.apply(kubeapi::agent_pod_object(&node3, false))?;
    agent3.wait_enrolled("app/color-c", true, Duration::from_secs(15))?;
    agent3.wait_enrolled("app/legacy", true, Duration::from_secs(15))?;
    eventually(
        Duration::from_secs(10),
        "agent1 sees node3 as a node without an agent",
        || {
            call_flat(&client, 1)?;
            Ok(agent1
                .process
                .stderr()
                .contains("is on node node3, where no ready strait agent pod runs there"))
        },
    )?;
    let report = call_flat(&client, 4)?;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["by_server"]["color-b"], 4, "{report}");
    let report = call(
        &client,
        "legacy.app.svc.cluster.local:7070",
        &["-4", "--count", "3"],
    )?;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["by_server"]["legacy"], 3, "{report}");
    // It arrived in plaintext: node3's agent counted it at legacy's PERMISSIVE listener.
    let plaintext = testbed::agent::metric(
        &agent3,
        "strait_inbound_plaintext_total",
        &["mode=\"permissive\"", "result=\"accepted\""],
    )?;
    assert_eq!(plaintext, 3.0, "{}", agent3.process.stderr());
    assert_eq!(tunnel_streams(&agent3, "inbound")?, 0.0);

    // Its agent is ready: color-c is reached through it, agent1 never restarted.
    let agent1_pid = agent1.process.pid();
    api.apply(kubeapi::agent_pod_object(&node3, true))?;
    eventually(Duration::from_secs(15), "client reaches color-c", || {
        let report = call_flat(&client, 2)?;
        Ok(report["by_server"]["color-c"].as_u64().unwrap_or(0) > 0)
    })?;
    let report = call_flat(&client, 6)?;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["by_server"]["color-b"], 3, "{report}");
    assert_eq!(report["by_server"]["color-c"], 3, "{report}");
    assert!(tunnel_streams(&agent3, "inbound")? >= 3.0);
    assert_eq!(agent1.process.pid(), agent1_pid);
    assert!(agent1.process.try_wait()?.is_none(), "agent1 exited");

    // color-b's Pod is deleted: node2 is no longer where 10.245.0.11 lives, and agent1 stops
    // sending it there: it refuses the address itself (no Pod has it; the listener is
    // STRICT) instead of asking node2's agent, which would answer "no such pod".
    let failures = |agent: &Agent, why: &str| {
        agent
            .log_lines()
            .iter()
            .filter(|l| {
                l["message"] == "connect to endpoint failed"
                    && l["endpoint"] == "10.245.0.11:9090"
                    && l["error"].as_str().is_some_and(|e| e.contains(why))
            })
            .count()
    };
    api.delete(Kind::Pod, "app", "color-b")?;
    agent2.wait_enrolled("app/color-b", false, Duration::from_secs(15))?;
    eventually(
        Duration::from_secs(10),
        "agent1 knows 10.245.0.11 is no pod's",
        || {
            call_flat(&client, 2)?;
            Ok(failures(&agent1, "no Pod in the API has this address") > 0)
        },
    )?;
    let asked_node2 = failures(&agent1, "no such pod");
    let inbound2 = tunnel_streams(&agent2, "inbound")?;
    let report = call_flat(&client, 6)?;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["by_server"]["color-c"], 6, "{report}");
    assert_eq!(failures(&agent1, "no such pod"), asked_node2);
    assert_eq!(tunnel_streams(&agent2, "inbound")?, inbound2);

    // The free address goes to a new pod on node3 (as the VPC CNI reuses addresses): it is
    // routed to node3's agent now.
    let color_b2 = node3.add_pod_at(
        &PodSpec::new("color-b2", "app").label("app", "color"),
        ip(11),
    )?;
    processes.push(tb.start_sandbox(&color_b2)?);
    processes.push(echo_server(&tb, &color_b2, 9090, "color-b2")?);
    api.apply(kubeapi::pod_object(&color_b2))?;
    agent3.wait_enrolled("app/color-b2", true, Duration::from_secs(15))?;
    eventually(Duration::from_secs(15), "client reaches color-b2", || {
        let report = call_flat(&client, 2)?;
        Ok(report["by_server"]["color-b2"].as_u64().unwrap_or(0) > 0)
    })?;
    let inbound3 = tunnel_streams(&agent3, "inbound")?;
    let report = call_flat(&client, 6)?;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["by_server"]["color-b2"], 3, "{report}");
    assert_eq!(report["by_server"]["color-c"], 3, "{report}");
    assert!(tunnel_streams(&agent3, "inbound")? >= inbound3 + 6.0);
    assert_eq!(tunnel_streams(&agent2, "inbound")?, inbound2);
    Ok(())
}
