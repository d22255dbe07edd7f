//! End-to-end tests of the CNI hand-off: pods are set up the way a container runtime sets them
//! up, with a real configuration list of Debian's reference plugins (`bridge` with `host-local`
//! addresses, `portmap`, and `loopback` on `lo`) followed by `strait-cni`, run per the CNI spec
//! with `prevResult` chaining (`testbed::cni`). The agent runs with the Kubernetes pod source
//! against the test API server, where each new pod is `Pending` with no IP, as it is while the
//! kubelet creates its sandbox; the pods run no sandbox process, so only the plugin can tell
//! the agent where they are. What a user would check: ADD returns once the pod is enrolled, so
//! the very first connect of the app is captured; a pod outside the mesh starts at once; DEL
//! releases; with no agent, ADD fails closed and the runtime's retry succeeds once the agent
//! runs; an agent killed with SIGKILL lets nothing escape and, restarted, enrolls the pods
//! again from the API and the plugin's saved state.
//!
//! Needs root; without it these tests fail (never skip) with the reason.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::*;
use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use testbed::agent::{Agent, cni_binary, peer_binary};
use testbed::cni::{Attachment, PLUGIN_DIR, PluginOutput, Runtime};
use testbed::kubeapi::{self, KubeApi};
use testbed::{Node, Pod, PodSpec, Process, Testbed, eventually};

/// The mesh of the Kubernetes tests: namespaces labelled `mesh: test` are in it.
fn mesh_text() -> String {
    mesh_yaml("ALLOW_ALL", 100, 0).replace(
        "spec:\n  egressFilter:",
        "spec:\n  namespaceSelector:\n    matchLabels:\n      mesh: test\n  egressFilter:",
    )
}

struct CniBed {
    tb: Testbed,
    node: Node,
    api: KubeApi,
    kubeconfig: PathBuf,
    mesh: PathBuf,
    /// The agent's CNI socket, in a 0700 folder.
    socket: PathBuf,
    /// `CNI_PATH`: Debian's plugins, and a folder holding strait-cni.
    cni_path: Vec<PathBuf>,
    _servers: Vec<Process>,
    _sandboxes: Vec<Process>,
}

/// One node with the two color servers (ordinary pods with sandboxes, in the API), namespace
/// `app` in the mesh and `other` not.
fn cni_bed(test: &str) -> anyhow::Result<CniBed> {
    for plugin in ["bridge", "host-local", "loopback", "portmap"] {
        if !Path::new(PLUGIN_DIR).join(plugin).exists() {
            bail!(
                "the reference CNI plugin {PLUGIN_DIR}/{plugin} is missing: `cargo xtask setup` installs Debian's containernetworking-plugins"
            );
        }
    }
    let tb = Testbed::new(test)?;
    let node = tb.add_node("node1")?;
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
    let sandboxes = vec![tb.start_sandbox(&v1)?, tb.start_sandbox(&v2)?];
    tb.dns_record(
        SERVICE,
        &[SERVICE_V4.parse()?, SERVICE_V6.parse::<IpAddr>()?],
    )?;
    tb.dns_record("color-v1.app.svc.cluster.local", &v1.ips())?;
    tb.dns_record("color-v2.app.svc.cluster.local", &v2.ips())?;
    let peer = peer_binary()?;
    let mut servers = Vec::new();
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

    let run_dir = tb.temp_dir().join("run-strait");
    std::fs::create_dir(&run_dir)?;
    std::fs::set_permissions(
        &run_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )?;
    let bin = tb.temp_dir().join("cni-bin");
    std::fs::create_dir(&bin)?;
    std::os::unix::fs::symlink(cni_binary()?, bin.join("strait-cni"))?;
    Ok(CniBed {
        socket: run_dir.join("cni.sock"),
        cni_path: vec![PathBuf::from(PLUGIN_DIR), bin],
        tb,
        node,
        api,
        kubeconfig,
        mesh,
        _servers: servers,
        _sandboxes: sandboxes,
    })
}

/// The pod addresses host-local hands out: far above the testbed's own pods.
const RANGE: (u8, u8) = (200, 250);

/// The node's configuration list: bridge (host-local) -> portmap -> strait-cni.
fn conflist(bed: &CniBed, timeout_seconds: u64) -> Value {
    let subnet = testbed::addr::pod_subnet_v4(bed.node.index());
    let octets = subnet.octets();
    let at = |last: u8| format!("{}.{}.{}.{last}", octets[0], octets[1], octets[2]);
    let gateway = bed.node.bridge_ipv4().to_string();
    json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "plugins": [
            {
                "type": "bridge",
                "bridge": testbed::NODE_BRIDGE,
                "isGateway": false,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "dataDir": bed.tb.temp_dir().join("ipam"),
                    "ranges": [[{
                        "subnet": format!("{subnet}/24"),
                        "rangeStart": at(RANGE.0),
                        "rangeEnd": at(RANGE.1),
                        "gateway": gateway,
                    }]],
                    // The pod and underlay ranges only: deliberately no default route. The
                    // gateway is spelled out: bridge's CHECK compares routes with it.
                    "routes": [
                        {"dst": testbed::addr::POD_CIDR_V4, "gw": gateway},
                        {"dst": testbed::addr::UNDERLAY_CIDR_V4, "gw": gateway},
                    ],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": true}},
            {
                "type": "strait-cni",
                "agentSocket": bed.socket,
                "timeoutSeconds": timeout_seconds,
            },
        ],
    })
}

fn start_agent(bed: &CniBed) -> anyhow::Result<Agent> {
    let socket = bed.socket.to_string_lossy().into_owned();
    Agent::start_kubernetes(
        &bed.tb,
        &bed.node,
        &bed.mesh,
        &bed.kubeconfig,
        &["--cni-socket", &socket],
    )
}

/// The Pod object as the kubelet's API server has it before the sandbox exists: `Pending`,
/// no IP.
fn pending_pod(pod: &Pod) -> Value {
    let mut object = kubeapi::pod_object(pod);
    object["status"] = json!({
        "phase": "Pending",
        "qosClass": pod.qos_class().kubernetes_name(),
    });
    object
}

/// The attachment of a pod's sandbox `n`.
fn attachment(pod: &Pod, n: u32) -> Attachment {
    let container = format!("{:0>56}{n:08x}", pod.uid().replace('-', ""))
        .chars()
        .rev()
        .take(64)
        .collect::<String>();
    Attachment::kubernetes(
        &container,
        &pod.netns_path(),
        pod.namespace(),
        pod.name(),
        pod.uid(),
    )
}

/// What a runtime does for a new sandbox: `lo` first, then the pod network. Returns the
/// chain's outputs (the last one failed if any did).
fn setup(bed: &CniBed, list: &Value, att: &Attachment) -> anyhow::Result<Vec<PluginOutput>> {
    let loopback = Runtime::loopback(&bed.node, "1.0.0")?;
    let lo = Attachment {
        ifname: "lo".into(),
        ..att.clone()
    };
    let outputs = loopback.add(&lo)?;
    if !outputs.iter().all(|o| o.success) {
        bail!("loopback ADD failed: {outputs:#?}");
    }
    Runtime::new(&bed.node, list.clone(), bed.cni_path.clone())?.add(att)
}

/// The chain's final result, after checking every plugin succeeded and strait-cni printed its
/// prevResult unchanged.
fn result_of(outputs: &[PluginOutput]) -> anyhow::Result<Value> {
    let plugins: Vec<&str> = outputs.iter().map(|o| o.plugin.as_str()).collect();
    if plugins != ["bridge", "portmap", "strait-cni"] || !outputs.iter().all(|o| o.success) {
        bail!("the chain did not succeed: {outputs:#?}");
    }
    let strait = &outputs[2];
    let stdin: Value = serde_json::from_str(&strait.stdin)?;
    // Byte for byte: the runtime serialized prevResult compactly; strait-cni echoes it.
    assert_eq!(strait.stdout, stdin["prevResult"].to_string());
    assert_eq!(
        serde_json::from_str::<Value>(&strait.stdout)?,
        serde_json::from_str::<Value>(&outputs[1].stdout)?
    );
    Ok(serde_json::from_str(&strait.stdout)?)
}

/// The container's IPv4 address in a result.
fn result_ipv4(result: &Value) -> anyhow::Result<String> {
    let ip = result["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .with_context(|| format!("no address in {result}"))?;
    Ok(ip.to_string())
}

fn entry(agent: &Agent, pod: &str) -> anyhow::Result<Option<Value>> {
    Ok(agent.workloads()?.into_iter().find(|w| w["pod"] == pod))
}

fn netns_inode(pod: &Pod) -> anyhow::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    Ok(std::fs::metadata(pod.netns_path())?.ino())
}

#[test]
fn a_pod_set_up_by_the_cni_chain_is_captured_from_its_first_connect() -> anyhow::Result<()> {
    let bed = cni_bed("cni-add")?;
    let agent = start_agent(&bed)?;
    let list = conflist(&bed, 20);
    let client = bed
        .node
        .add_pod_for_cni(&PodSpec::new("client", "app").label("app", "client"))?;
    // The kubelet has created the Pod object; the runtime now creates the sandbox.
    bed.api.apply(pending_pod(&client))?;
    let att = attachment(&client, 1);
    let started = Instant::now();
    let outputs = setup(&bed, &list, &att)?;
    let took = started.elapsed();
    let result = result_of(&outputs)?;
    let ip = result_ipv4(&result)?;
    assert!(
        ip.ends_with(&format!(".{}", RANGE.0)),
        "host-local gave {ip}"
    );

    // No sleep, no sandbox process: the app's first connect is captured.
    let report = call(&client, &format!("{SERVICE}:8080"), &["-4"])?;
    assert_eq!(report["ok"], true, "{report}\n{}", agent.process.stderr());
    assert_eq!(report["by_server"]["v1"], 1, "{report}");
    assert_eq!(agent.counter("captured")?, 1);
    let status = entry(&agent, "app/client")?.context("app/client in /workloads")?;
    assert_eq!(status["enrolled"], true, "{status}");
    assert_eq!(status["virtual_node"], "app/client", "{status}");
    assert_eq!(status["netns_inode"], netns_inode(&client)?, "{status}");
    eprintln!("ADD through the chain took {took:?}");

    // The kubelet then reports the sandbox's address: the pod stays enrolled as it is (same
    // listeners, never released in between).
    let mut running = kubeapi::pod_object(&client);
    running["status"]["podIP"] = json!(ip);
    running["status"]["podIPs"] = json!([{"ip": ip}]);
    bed.api.apply(running)?;
    std::thread::sleep(Duration::from_secs(2));
    let after = entry(&agent, "app/client")?.context("app/client in /workloads")?;
    assert_eq!(after["enrolled"], true, "{after}");
    assert_eq!(after["cgroup_id"], status["cgroup_id"], "{after}");
    let released = agent
        .log_lines()
        .into_iter()
        .filter(|l| l["message"] == "pod released" && l["pod"] == "app/client")
        .count();
    assert_eq!(released, 0, "{}", agent.process.stderr());

    // CHECK through the whole chain (bridge, host-local, portmap and strait-cni).
    let runtime = Runtime::new(&bed.node, list.clone(), bed.cni_path.clone())?;
    let checked = runtime.check(&att, &result)?;
    assert!(checked.iter().all(|o| o.success), "{checked:#?}");

    // A pod whose namespace is not in the mesh starts at once and is not captured.
    let web = bed
        .node
        .add_pod_for_cni(&PodSpec::new("web", "other").label("app", "web"))?;
    bed.api.apply(pending_pod(&web))?;
    let web_att = attachment(&web, 1);
    let started = Instant::now();
    let web_result = result_of(&setup(&bed, &list, &web_att)?)?;
    assert!(started.elapsed() < Duration::from_secs(10));
    let reason = entry(&agent, "other/web")?.context("other/web in /workloads")?;
    assert_eq!(reason["enrolled"], false, "{reason}");
    assert!(
        reason["reason"]
            .as_str()
            .is_some_and(|r| r.contains("namespaceSelector")),
        "{reason}"
    );
    let report = call(&web, &format!("{SERVICE}:8080"), &["-4"])?;
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(first_errno(&report), Some(EHOSTUNREACH), "{report}");

    // DEL releases the pod (every plugin, in reverse), and DEL again is fine.
    for _ in 0..2 {
        let deleted = runtime.del(&att, Some(&result))?;
        assert!(deleted.iter().all(|o| o.success), "{deleted:#?}");
        let status = entry(&agent, "app/client")?.context("app/client in /workloads")?;
        assert_eq!(status["enrolled"], false, "{status}");
        assert!(
            status["reason"]
                .as_str()
                .is_some_and(|r| r.contains("CNI DEL")),
            "{status}"
        );
    }
    let deleted = runtime.del(&web_att, Some(&web_result))?;
    assert!(deleted.iter().all(|o| o.success), "{deleted:#?}");
    // The bridge plugin removed the pod's interface.
    let links = testbed::run(
        client.command("ip").args(["-o", "link", "show", "eth0"]),
        Duration::from_secs(10),
    )?;
    assert!(!links.status.success(), "eth0 is still there");
    Ok(())
}

#[test]
fn with_no_agent_add_fails_closed_and_the_retry_succeeds_once_it_runs() -> anyhow::Result<()> {
    let bed = cni_bed("cni-closed")?;
    let list = conflist(&bed, 2);
    let client = bed
        .node
        .add_pod_for_cni(&PodSpec::new("client", "app").label("app", "client"))?;
    bed.api.apply(pending_pod(&client))?;
    let runtime = Runtime::new(&bed.node, list.clone(), bed.cni_path.clone())?;
    let att = attachment(&client, 1);
    let outputs = setup(&bed, &list, &att)?;
    let last = outputs.last().context("no plugin ran")?;
    assert_eq!(last.plugin, "strait-cni");
    assert!(!last.success, "{last:#?}");
    let error: Value = serde_json::from_str(&last.stdout)?;
    assert_eq!(error["code"], 11, "{error}");
    assert_eq!(error["cniVersion"], "1.0.0", "{error}");
    assert!(
        error["msg"]
            .as_str()
            .is_some_and(|m| m.contains("no strait agent answers")),
        "{error}"
    );
    // The runtime tears the failed sandbox down (DEL without a result) and retries.
    let deleted = runtime.del(&att, None)?;
    assert!(deleted.iter().all(|o| o.success), "{deleted:#?}");

    let agent = start_agent(&bed)?;
    let att = attachment(&client, 2);
    result_of(&setup(&bed, &list, &att)?)?;
    let report = call(&client, &format!("{SERVICE}:8080"), &["-4"])?;
    assert_eq!(report["ok"], true, "{report}\n{}", agent.process.stderr());
    assert_eq!(agent.counter("captured")?, 1);
    Ok(())
}

#[test]
fn an_agent_killed_and_restarted_lets_nothing_escape_and_enrolls_every_pod_again()
-> anyhow::Result<()> {
    let bed = cni_bed("cni-sigkill")?;
    let agent = start_agent(&bed)?;
    let list = conflist(&bed, 20);
    let client = bed
        .node
        .add_pod_for_cni(&PodSpec::new("client", "app").label("app", "client"))?;
    bed.api.apply(pending_pod(&client))?;
    result_of(&setup(&bed, &list, &attachment(&client, 1))?)?;
    let report = call(&client, &format!("{SERVICE}:8080"), &["-4"])?;
    assert_eq!(report["ok"], true, "{report}");

    agent.process.signal(libc::SIGKILL)?;
    agent.process.wait_timeout(Duration::from_secs(10))?;
    // Meanwhile the pod stays captured (the pins outlive the agent): its connects to the
    // service fail instead of reaching a server uncaptured.
    for _ in 0..3 {
        let report = call(&client, &format!("{SERVICE}:8080"), &["-4"])?;
        assert_eq!(report["ok"], false, "{report}");
        assert!(
            report["by_server"].as_object().is_none_or(|m| m.is_empty()),
            "{report}"
        );
    }

    // The pod has no sandbox process and no IP in the API: only the plugin's saved state
    // says where it is.
    let agent = start_agent(&bed)?;
    for pod in ["app/client", "app/color-v1", "app/color-v2"] {
        agent.wait_enrolled(pod, true, Duration::from_secs(20))?;
    }
    let status = entry(&agent, "app/client")?.context("app/client in /workloads")?;
    assert_eq!(status["netns_inode"], netns_inode(&client)?, "{status}");
    let report = call(&client, &format!("{SERVICE}:8080"), &["-4"])?;
    assert_eq!(report["ok"], true, "{report}\n{}", agent.process.stderr());
    // The counters live in the pinned maps: one call before the kill, the three while the
    // agent was away (captured by eBPF and refused, not sent around the mesh), one after.
    assert_eq!(agent.counter("captured")?, 5);
    Ok(())
}

/// A surge upgrade as the DaemonSet does it (`maxSurge: 1`): a new agent started beside the
/// running one, on the same hand-over and CNI sockets. Under a steady stream of connects none
/// is refused, and a CNI ADD in progress at the old agent when the new one takes over (its Pod
/// object comes only after the hand-over, so the old agent is still waiting for it) is closed
/// by the old agent, asked again by the plugin, and enrolled by the new agent: the sandbox
/// starts captured, with no kubelet retry.
#[test]
fn a_surge_upgrade_refuses_no_connect_and_an_add_during_the_overlap_is_enrolled()
-> anyhow::Result<()> {
    let bed = cni_bed("cni-surge")?;
    let socket = bed.socket.to_string_lossy().into_owned();
    // The DaemonSet's drain timeout: the old agent lives on while connections drain.
    let args = ["--cni-socket", &socket, "--drain-timeout", "30"];
    let old = Agent::start_kubernetes(&bed.tb, &bed.node, &bed.mesh, &bed.kubeconfig, &args)?;
    let list = conflist(&bed, 20);
    let client = bed
        .node
        .add_pod_for_cni(&PodSpec::new("client", "app").label("app", "client"))?;
    bed.api.apply(pending_pod(&client))?;
    result_of(&setup(&bed, &list, &attachment(&client, 1))?)?;

    // 300 connects, one every 20 ms, across the upgrade.
    let load = bed.tb.spawn(
        "load",
        client.command(peer_binary()?).args([
            "call",
            &format!("{SERVICE}:8080"),
            "-4",
            "--count",
            "300",
            "--interval-ms",
            "20",
        ]),
    )?;
    // A long connection keeps the old agent draining (alive) well past the hand-over.
    let hold = bed.tb.spawn(
        "hold",
        client.command(peer_binary()?).args([
            "hold",
            &format!("{SERVICE}:8080"),
            "-4",
            "--connections",
            "1",
            "--seconds",
            "15",
        ]),
    )?;
    let late = bed
        .node
        .add_pod_for_cni(&PodSpec::new("late", "app").label("app", "client"))?;
    let late_att = attachment(&late, 1);
    let (outputs, new) = std::thread::scope(|scope| -> anyhow::Result<_> {
        // The runtime sets the sandbox up before the kubelet's Pod object is there: the old
        // agent takes the ADD and waits for the Pod.
        let add = scope.spawn(|| setup(&bed, &list, &late_att));
        std::thread::sleep(Duration::from_secs(1));
        anyhow::ensure!(
            !add.is_finished(),
            "the ADD did not wait for the Pod object"
        );
        let new = Agent::spawn_kubernetes(&bed.tb, &bed.node, &bed.mesh, &bed.kubeconfig, &args)?;
        eventually(Duration::from_secs(20), "the old agent hands over", || {
            Ok(old
                .process
                .stderr()
                .contains("listeners handed over to a new agent"))
        })?;
        bed.api.apply(pending_pod(&late))?;
        let outputs = add
            .join()
            .map_err(|_| anyhow::anyhow!("the ADD thread panicked"))??;
        // Answered while both agents run: during the overlap.
        anyhow::ensure!(
            old.process.try_wait()?.is_none(),
            "the old agent exited before the ADD was answered"
        );
        Ok((outputs, new))
    })?;
    result_of(&outputs).with_context(|| {
        format!(
            "old agent:\n{}\nnew agent:\n{}",
            old.process.stderr(),
            new.process.stderr()
        )
    })?;
    new.wait_ready(Duration::from_secs(30))?;
    // The ADD was in progress at the old agent, which left it to the new one.
    assert!(
        old.process
            .stderr()
            .contains("CNI socket: a request in progress is left to the new agent"),
        "{}",
        old.process.stderr()
    );
    let status = entry(&new, "app/late")?.context("app/late in the new agent's /workloads")?;
    assert_eq!(status["enrolled"], true, "{status}");
    assert_eq!(status["netns_inode"], netns_inode(&late)?, "{status}");
    // The late pod's first connect is captured, by the new agent.
    let report = call(&late, &format!("{SERVICE}:8080"), &["-4"])?;
    assert_eq!(report["ok"], true, "{report}");
    assert!(
        new.connection_logs()
            .iter()
            .any(|l| l["source_workload"] == "app/late"),
        "{}",
        new.process.stderr()
    );
    let status = old
        .process
        .wait_timeout(Duration::from_secs(60))
        .context("the old agent did not drain and exit")?;
    assert!(status.success(), "the old agent exits cleanly: {status}");

    hold.wait_timeout(Duration::from_secs(30))?;
    let held: Value = serde_json::from_str(hold.stdout().trim())
        .with_context(|| format!("no report from hold: {}", hold.stderr()))?;
    assert_eq!(
        held["ok"], true,
        "the held connection lived through the upgrade: {held}"
    );
    load.wait_timeout(Duration::from_secs(60))?;
    let report: Value = serde_json::from_str(load.stdout().trim())
        .with_context(|| format!("no report from the load: {}", load.stderr()))?;
    assert_eq!(
        report["ok"], true,
        "a connect failed across the upgrade: {report}"
    );
    let served: u64 = report["by_server"]
        .as_object()
        .context("by_server")?
        .values()
        .filter_map(Value::as_u64)
        .sum();
    assert_eq!(served, 300, "{report}");
    // Both agents carried part of it.
    let by = |agent: &Agent| {
        agent
            .connection_logs()
            .iter()
            .filter(|l| l["source_workload"] == "app/client")
            .count()
    };
    assert!(
        by(&old) > 0 && by(&new) > 0,
        "old {}, new {}",
        by(&old),
        by(&new)
    );
    Ok(())
}
