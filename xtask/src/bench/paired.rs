//! The paired A/B (`cargo xtask bench --only paired|paired-xnode --baseline-agent PATH`): this
//! build's agents and a baseline build's take turns in short wrk bursts on one testbed, so the
//! two builds are compared seconds apart rather than minutes apart.
//!
//! - `paired` ([`Layout::SameNode`]): two nodes, each with a client pod, an nginx pod and its own
//!   agent; the bursts go through the node's `http` listener to its local nginx (fast path on).
//! - `paired-xnode` ([`Layout::CrossNode`]): four nodes, two per build; each build's pair has
//!   its client pod on one node and its nginx pod on the other, behind `tcp` and `http`
//!   listeners with `tls` STRICT, so every request crosses that pair's mTLS tunnel. The bursts
//!   alternate between the two listeners.
//!
//! Why: on this shared two-core host the direct baseline itself moved by a third between two
//! turns of an ordinary `--baseline-agent` run, minutes apart (docs/benchmarks.md, "A/B runs in
//! alternating bursts"), which hides any change of a few percent. Here each pair of bursts is
//! one comparison; halfway the two builds swap sides (all agents restarted), so a difference
//! between the sides cancels out. Raw samples: docs/benchmarks/paired.json
//! (paired-xnode.json); pages: docs/benchmarks-paired.md (-paired-xnode.md), generated from
//! them.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use testbed::agent::{Agent, issue_mesh_certs};
use testbed::{Node, Pod, PodSpec, Process, Testbed};

use super::Cpu;
use super::environment::{
    HTTP_L7_PORT, HTTP_PORT, NODE_WORKER_THREADS, on_interrupt_clean, peer_node_args,
    start_agent_as_deployed, worker_args,
};
use super::procfs::{clock_ticks, loadavg};
use super::report::median_of;
use super::tools::{machine, nginx_conf_text, wrk};

/// One wrk burst: long enough for wrk's 32 connections to settle, short enough that the host
/// hardly changes speed between the two bursts of a pair.
const BURST_SECONDS: u32 = 2;
/// The virtual services, one per side, each to that side's nginx pod.
const SERVICES: [(&str, &str); 2] = [
    ("web1.paired.svc.cluster.local", "10.96.0.41"),
    ("web2.paired.svc.cluster.local", "10.96.0.42"),
];

/// The path a paired run measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Layout {
    /// Client pod → the node's `http` listener → nginx pod on the same node, fast path on.
    SameNode,
    /// Client pod on one node → its agent → mTLS tunnel → the other node's agent → nginx pod,
    /// through a `tcp` and an `http` listener with `tls` STRICT.
    CrossNode,
}

pub(super) const LAYOUTS: [Layout; 2] = [Layout::SameNode, Layout::CrossNode];

impl Layout {
    /// The `--only` id that runs it.
    pub(super) fn id(self) -> &'static str {
        match self {
            Layout::SameNode => "paired",
            Layout::CrossNode => "paired-xnode",
        }
    }

    /// Its raw results, under the output directory.
    pub(super) fn raw(self) -> &'static str {
        match self {
            Layout::SameNode => "benchmarks/paired.json",
            Layout::CrossNode => "benchmarks/paired-xnode.json",
        }
    }

    /// Its generated page, under the output directory.
    pub(super) fn page(self) -> &'static str {
        match self {
            Layout::SameNode => "benchmarks-paired.md",
            Layout::CrossNode => "benchmarks-paired-xnode.md",
        }
    }

    /// Its name in the raw results.
    fn name(self) -> &'static str {
        match self {
            Layout::SameNode => "same-node",
            Layout::CrossNode => "cross-node",
        }
    }

    /// The layout of a run's raw results (runs from before the cross-node layout name none).
    fn of(raw: &Value) -> Layout {
        if raw["path"] == Layout::CrossNode.name() {
            Layout::CrossNode
        } else {
            Layout::SameNode
        }
    }
}

/// One node of a side, the pods its agent serves and its agent's own arguments.
struct SideNode {
    node: Node,
    pods: Vec<String>,
    peer_args: Vec<String>,
}

/// One build's side of the testbed: its nodes, its client pod and what the bursts call, by
/// listener protocol.
struct Side {
    nodes: Vec<SideNode>,
    client: Pod,
    _web: Pod,
    targets: Vec<(&'static str, SocketAddr)>,
}

/// Runs `bursts` pairs of bursts per listener in each of two phases (this build on the first
/// side, then on the second) and returns the raw results.
pub(super) fn run(
    layout: Layout,
    this_build: &Path,
    baseline: &Path,
    bursts: u32,
) -> anyhow::Result<Value> {
    let tb = Testbed::new(&format!("bench-{}", layout.id()))?;
    on_interrupt_clean(&tb);
    let dir = tb.temp_dir().join("paired");
    std::fs::create_dir_all(&dir)?;
    let mesh = dir.join("mesh.yaml");
    std::fs::write(&mesh, mesh_yaml(layout, &dir.join("certs")))?;
    let mut servers: Vec<Process> = Vec::new();
    let mut sides = Vec::new();
    for i in 1..=SERVICES.len() {
        sides.push(side(&tb, layout, i, &dir, &mut servers)?);
    }
    if layout == Layout::CrossNode {
        issue_mesh_certs(&sides[0].nodes[0].node, &mesh, &dir.join("ca"))?;
    }

    let builds = [("this", this_build), ("baseline", baseline)];
    let mut samples = Vec::new();
    let mut loads = Vec::new();
    for phase in 0..2usize {
        // Phase 0: this build on the first side; phase 1: on the second.
        let mut agents: Vec<(&str, Vec<Agent>)> = Vec::new();
        for (n, side) in sides.iter().enumerate() {
            let (build, binary) = builds[(n + phase) % 2];
            // SAFETY (of the environment): single-threaded here; testbed::agent reads
            // STRAIT_BIN when it starts an agent.
            unsafe { std::env::set_var("STRAIT_BIN", binary) };
            let mut side_agents = Vec::new();
            for node in &side.nodes {
                let mut args = vec!["--fast-path".to_owned(), "on".to_owned()];
                args.extend(worker_args(binary));
                args.extend(node.peer_args.iter().cloned());
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let agent = start_agent_as_deployed(&tb, &node.node, &mesh, &args)?;
                for pod in &node.pods {
                    agent.wait_enrolled(&format!("bench/{pod}"), true, Duration::from_secs(20))?;
                }
                side_agents.push(agent);
            }
            agents.push((build, side_agents));
        }
        // A first burst on each side and listener that is not counted: connections, pools and
        // tunnels warm up.
        for side in &sides {
            for &(_, target) in &side.targets {
                with_agent_logs(wrk(&side.client, target, 1), &agents)?;
            }
        }
        for burst in 0..bursts {
            for listener in 0..sides[0].targets.len() {
                let mut order = [0usize, 1];
                if burst % 2 == 1 {
                    order.reverse();
                }
                for (position, &n) in order.iter().enumerate() {
                    let (build, side_agents) = &agents[n];
                    let side = &sides[n];
                    let (protocol, target) = side.targets[listener];
                    let pids: Vec<u32> = side_agents.iter().map(|a| a.process.pid()).collect();
                    let ((rps, requests), cpu) = with_agent_logs(
                        Cpu::during(&pids, || wrk(&side.client, target, BURST_SECONDS)),
                        &agents,
                    )?;
                    let per_request = |ticks: u64| {
                        (requests > 0).then(|| ticks as f64 / clock_ticks() / requests as f64 * 1e6)
                    };
                    samples.push(json!({
                        "phase": phase,
                        "burst": burst,
                        "listener": protocol,
                        "build": build,
                        "node": side.nodes[0].node.name(),
                        "first": position == 0,
                        "rps": rps,
                        "requests": requests,
                        "agent_cpu_us_per_request": per_request(cpu.proxies.total()),
                        "agent_user_us_per_request": per_request(cpu.proxies.user),
                    }));
                }
            }
            if let Some(load) = loadavg() {
                loads.push(load);
            }
            eprintln!(
                "bench: {}: phase {}/2, burst {}/{bursts}",
                layout.id(),
                phase + 1,
                burst + 1
            );
        }
        for (_, side_agents) in agents {
            for agent in side_agents {
                agent.stop()?;
            }
        }
    }
    drop(servers);
    Ok(json!({
        "machine": machine(),
        "path": layout.name(),
        "this_build": this_build.display().to_string(),
        "baseline": baseline.display().to_string(),
        "bursts_per_phase": bursts,
        "burst_seconds": BURST_SECONDS,
        // A build from before `--worker-threads` runs with its default.
        "agent_worker_threads": builds
            .iter()
            .all(|(_, binary)| super::agent_takes(binary, "--worker-threads"))
            .then_some(NODE_WORKER_THREADS),
        "loadavg_1m": loads,
        "samples": samples,
    }))
}

/// `result`, with the last lines each agent logged if it failed: a burst that fails is most
/// often the mesh or the tunnel refusing, which only the agents' logs say.
fn with_agent_logs<T>(
    result: anyhow::Result<T>,
    agents: &[(&str, Vec<Agent>)],
) -> anyhow::Result<T> {
    result.map_err(|error| {
        let mut logs = String::new();
        for agent in agents.iter().flat_map(|(_, side)| side) {
            let stderr = agent.process.stderr();
            let lines: Vec<&str> = stderr.lines().collect();
            let _ = writeln!(
                logs,
                "--- agent (pid {}):\n{}",
                agent.process.pid(),
                lines[lines.len().saturating_sub(20)..].join("\n")
            );
        }
        error.context(format!(
            "a burst failed; the agents' last log lines:\n{logs}"
        ))
    })
}

/// Side `i` (from 1): its node or nodes, pods, nginx (pushed to `servers`), DNS records and
/// workload files.
fn side(
    tb: &Testbed,
    layout: Layout,
    i: usize,
    dir: &Path,
    servers: &mut Vec<Process>,
) -> anyhow::Result<Side> {
    let (service, vip) = SERVICES[i - 1];
    let vip: IpAddr = vip.parse()?;
    let (client_node, server_node) = match layout {
        Layout::SameNode => (tb.add_node(&format!("node{i}"))?, None),
        Layout::CrossNode => (
            tb.add_node(&format!("node{}", 2 * i - 1))?,
            Some(tb.add_node(&format!("node{}", 2 * i))?),
        ),
    };
    // Pods before agents: an agent does not see netns files mounted after it starts.
    let client = client_node
        .add_pod(&PodSpec::new(&format!("client{i}"), "bench").label("app", "client"))?;
    let web_app = format!("web{i}");
    let web = server_node
        .as_ref()
        .unwrap_or(&client_node)
        .add_pod(&PodSpec::new(&web_app, "bench").label("app", &web_app))?;
    tb.dns_record(service, &[vip])?;
    tb.dns_record(
        &format!("web{i}-pods.paired.svc.cluster.local"),
        &[web.ipv4().into()],
    )?;
    let (ports, targets) = match layout {
        Layout::SameNode => (
            vec![HTTP_L7_PORT],
            vec![("http", SocketAddr::new(vip, HTTP_L7_PORT))],
        ),
        Layout::CrossNode => (
            vec![HTTP_L7_PORT, HTTP_PORT],
            vec![
                ("tcp", SocketAddr::new(vip, HTTP_PORT)),
                ("http", SocketAddr::new(vip, HTTP_L7_PORT)),
            ],
        ),
    };
    let nginx_dir = dir.join(format!("nginx-{i}"));
    std::fs::create_dir_all(&nginx_dir)?;
    let conf = nginx_dir.join("nginx.conf");
    std::fs::write(&conf, nginx_conf_text(&nginx_dir, &ports, None))?;
    let nginx = tb.spawn(
        &format!("nginx-{i}"),
        web.command("nginx").arg("-c").arg(&conf),
    )?;
    nginx.wait_listening(HTTP_L7_PORT, Duration::from_secs(10))?;
    servers.push(nginx);
    let nodes = match server_node {
        None => {
            client_node.write_workload(&client)?;
            client_node.write_workload(&web)?;
            vec![SideNode {
                node: client_node,
                pods: vec![client.name().to_owned(), web_app],
                peer_args: Vec::new(),
            }]
        }
        Some(server_node) => {
            client_node.write_workload(&client)?;
            server_node.write_workload(&web)?;
            let (to_server, to_client) =
                (peer_node_args(&server_node), peer_node_args(&client_node));
            vec![
                SideNode {
                    node: client_node,
                    pods: vec![client.name().to_owned()],
                    peer_args: to_server,
                },
                SideNode {
                    node: server_node,
                    pods: vec![web_app],
                    peer_args: to_client,
                },
            ]
        }
    };
    Ok(Side {
        nodes,
        client,
        _web: web,
        targets,
    })
}

/// The mesh: a `client` virtual node calling one virtual service per side, each to that side's
/// nginx; across nodes both listeners take only mTLS from `client`, and `client` validates each
/// server's identity.
fn mesh_yaml(layout: Layout, certs: &Path) -> String {
    let c = certs.display();
    let mut yaml = String::from(
        "apiVersion: appmesh.k8s.aws/v1beta2\nkind: Mesh\nmetadata: {name: paired}\n\
         spec: {egressFilter: {type: ALLOW_ALL}}\n---\n\
         apiVersion: appmesh.k8s.aws/v1beta2\nkind: VirtualNode\n\
         metadata: {name: client, namespace: bench}\nspec:\n  \
         podSelector: {matchLabels: {app: client}}\n  backends:\n",
    );
    for n in 1..=SERVICES.len() {
        match layout {
            Layout::SameNode => {
                let _ = writeln!(
                    yaml,
                    "    - virtualService: {{virtualServiceRef: {{name: web{n}}}}}"
                );
            }
            Layout::CrossNode => {
                let _ = write!(
                    yaml,
                    "    - virtualService:\n        virtualServiceRef: {{name: web{n}}}\n        \
                     clientPolicy:\n          tls:\n            enforce: true\n            \
                     certificate: {{file: {{certificateChain: {c}/client.pem, privateKey: {c}/client-key.pem}}}}\n            \
                     validation:\n              trust: {{file: {{certificateChain: {c}/ca-bundle.pem}}}}\n              \
                     subjectAlternativeNames: {{match: {{exact: [spiffe://paired/ns/bench/vn/web{n}]}}}}\n"
                );
            }
        }
    }
    for (n, (service, _)) in SERVICES.iter().enumerate() {
        let i = n + 1;
        let listeners = match layout {
            Layout::SameNode => {
                format!(
                    "  listeners: [{{portMapping: {{port: {HTTP_L7_PORT}, protocol: http}}}}]\n"
                )
            }
            Layout::CrossNode => {
                let mut listeners = String::from("  listeners:\n");
                for (port, protocol) in [(HTTP_L7_PORT, "http"), (HTTP_PORT, "tcp")] {
                    let _ = write!(
                        listeners,
                        "    - portMapping: {{port: {port}, protocol: {protocol}}}\n      \
                         tls:\n        mode: STRICT\n        \
                         certificate: {{file: {{certificateChain: {c}/web{i}.pem, privateKey: {c}/web{i}-key.pem}}}}\n        \
                         validation:\n          trust: {{file: {{certificateChain: {c}/ca-bundle.pem}}}}\n          \
                         subjectAlternativeNames: {{match: {{exact: [spiffe://paired/ns/bench/vn/client]}}}}\n"
                    );
                }
                listeners
            }
        };
        let _ = write!(
            yaml,
            "---\napiVersion: appmesh.k8s.aws/v1beta2\nkind: VirtualNode\n\
             metadata: {{name: web{i}, namespace: bench}}\nspec:\n  \
             podSelector: {{matchLabels: {{app: web{i}}}}}\n{listeners}  \
             serviceDiscovery: {{dns: {{hostname: web{i}-pods.paired.svc.cluster.local}}}}\n\
             ---\napiVersion: appmesh.k8s.aws/v1beta2\nkind: VirtualService\n\
             metadata: {{name: web{i}, namespace: bench}}\nspec:\n  awsName: {service}\n  \
             provider: {{virtualNode: {{virtualNodeRef: {{name: web{i}}}}}}}\n"
        );
    }
    yaml
}

/// The two bursts of one pair: (this build's sample, the baseline's), of one listener.
fn pairs(raw: &Value) -> Vec<(&Value, &Value)> {
    let samples = raw["samples"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let of = |this: &Value| {
        samples.iter().find(|s| {
            s["build"] == "baseline"
                && s["phase"] == this["phase"]
                && s["burst"] == this["burst"]
                && s["listener"] == this["listener"]
        })
    };
    samples
        .iter()
        .filter(|s| s["build"] == "this")
        .filter_map(|s| Some((s, of(s)?)))
        .collect()
}

/// The generated page.
pub(super) fn markdown(raw: &Value) -> String {
    let mut s = String::new();
    let layout = Layout::of(raw);
    let bursts = raw["bursts_per_phase"].as_u64().unwrap_or(0);
    let seconds = raw["burst_seconds"].as_u64().unwrap_or(0);
    let loads: Vec<f64> = raw["loadavg_1m"]
        .as_array()
        .map(|l| l.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    // Runs before the suite passed `--worker-threads` recorded no count: their agents ran
    // with their default, one worker thread per CPU.
    let threads = match raw["agent_worker_threads"].as_u64() {
        Some(1) => "one worker thread".to_owned(),
        Some(n) => format!("{n} worker threads"),
        None => "its default worker threads, one per CPU".to_owned(),
    };
    let kernel = raw["machine"]["kernel"].as_str().unwrap_or("?").trim();
    let cpus = &raw["machine"]["cpus"];
    let raw_file = layout.raw();
    // Where this build ran in each phase, as the second table names them.
    let sides = match layout {
        Layout::SameNode => {
            let _ = writeln!(s, "# Benchmarks: an A/B in alternating bursts\n");
            let _ = writeln!(
                s,
                "Generated by `cargo xtask bench --only paired --baseline-agent PATH` from \
                 [{raw_file}]({raw_file}) (`--render` regenerates it; `cargo \
                 xtask test` checks that it still is). Kernel {kernel}, {cpus} CPUs. Two nodes of one testbed, \
                 each with a client pod, an nginx pod and its own agent ({threads}, fast path on): \
                 one runs this build, the other the baseline. wrk (1 thread, 32 connections) runs \
                 {seconds} s bursts through the node's `http` listener to the nginx pod on the same \
                 node, the two nodes taking turns (which goes first alternates), {bursts} pairs of \
                 bursts; then the builds swap nodes (both agents restarted) for {bursts} pairs more, \
                 so a difference between the nodes cancels out. Agent CPU is the agent's utime + \
                 stime during its burst. 1-minute load average after each pair: {}.\n",
                range(&loads),
            );
            ["node1", "node2"]
        }
        Layout::CrossNode => {
            let _ = writeln!(
                s,
                "# Benchmarks: an A/B in alternating bursts, across nodes\n"
            );
            let _ = writeln!(
                s,
                "Generated by `cargo xtask bench --only paired-xnode --baseline-agent PATH` from \
                 [{raw_file}]({raw_file}) (`--render` regenerates it; `cargo xtask test` checks \
                 that it still is). Kernel {kernel}, {cpus} CPUs. Four nodes of one testbed, two \
                 per build, each with its own agent ({threads}, fast path on): one node of each \
                 pair holds a client pod, the other an nginx pod behind a `tcp` and an `http` \
                 listener, both with `tls` STRICT, so every request crosses the mTLS tunnel \
                 between the pair's two agents. wrk (1 thread, 32 connections) runs {seconds} s \
                 bursts through each listener in turn, the two builds taking turns (which goes \
                 first alternates), {bursts} pairs of bursts per listener; then the builds swap \
                 pairs of nodes (all agents restarted) for {bursts} pairs more, so a difference \
                 between the pairs cancels out. Agent CPU is the utime + stime of both agents of \
                 the pair during its burst. 1-minute load average after each round of bursts: \
                 {}.\n",
                range(&loads),
            );
            ["nodes 1 and 2", "nodes 3 and 4"]
        }
    };
    let all_pairs = pairs(raw);
    let mut listeners: Vec<&Value> = Vec::new();
    for (this, _) in &all_pairs {
        if !listeners.contains(&&this["listener"]) {
            listeners.push(&this["listener"]);
        }
    }
    for listener in listeners {
        let pairs: Vec<_> = all_pairs
            .iter()
            .filter(|(a, _)| &a["listener"] == listener)
            .collect();
        if layout == Layout::CrossNode {
            let _ = writeln!(
                s,
                "## The `{}` listener, mTLS tunnel\n",
                listener.as_str().unwrap_or("?")
            );
        }
        tables(&mut s, &pairs, sides);
    }
    s
}

/// The medians of each build and the ratios of each pair, of one listener's `pairs`.
fn tables(s: &mut String, pairs: &[&(&Value, &Value)], sides: [&str; 2]) {
    let field = |v: &Value, name: &str| v[name].as_f64();
    let ratios = |name: &str, phase: Option<u64>| -> Vec<f64> {
        pairs
            .iter()
            .filter(|(a, _)| phase.is_none_or(|p| a["phase"].as_u64() == Some(p)))
            .filter_map(|(a, b)| Some(field(a, name)? / field(b, name)?))
            .collect()
    };
    let build_median = |build: &str, name: &str| {
        median_of(
            pairs
                .iter()
                .filter_map(|(a, b)| field(if build == "this" { a } else { b }, name))
                .collect(),
        )
    };
    let _ = writeln!(
        s,
        "| build | requests/s, median of bursts | agent CPU µs per request | of it in user space |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|");
    for (build, label) in [
        ("baseline", "baseline (before)"),
        ("this", "this build (after)"),
    ] {
        let _ = writeln!(
            s,
            "| {label} | {} | {} | {} |",
            fmt(build_median(build, "rps"), 0),
            fmt(build_median(build, "agent_cpu_us_per_request"), 1),
            fmt(build_median(build, "agent_user_us_per_request"), 1),
        );
    }
    let _ = writeln!(
        s,
        "\nEach pair's two bursts compared with each other (after / before), {} pairs:\n",
        pairs.len()
    );
    let _ = writeln!(
        s,
        "| figure | median ratio, all pairs | this build on {} | on {} | pairs where after is better |",
        sides[0], sides[1]
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|");
    for (name, label, higher_is_better) in [
        ("rps", "requests/s", true),
        ("agent_cpu_us_per_request", "agent CPU per request", false),
        ("agent_user_us_per_request", "of it in user space", false),
    ] {
        let all = ratios(name, None);
        let better = all
            .iter()
            .filter(|&&r| if higher_is_better { r > 1.0 } else { r < 1.0 })
            .count();
        let _ = writeln!(
            s,
            "| {label} | {} | {} | {} | {better} of {} |",
            fmt(median_of(all.clone()), 3),
            fmt(median_of(ratios(name, Some(0))), 3),
            fmt(median_of(ratios(name, Some(1))), 3),
            all.len(),
        );
    }
    s.push('\n');
}

fn fmt(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "–".to_owned(), |v| format!("{v:.decimals$}"))
}

fn range(values: &[f64]) -> String {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if values.is_empty() {
        "–".to_owned()
    } else {
        format!("{min:.1} to {max:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(phase: u64, burst: u64, build: &str, rps: f64, cpu: f64) -> Value {
        json!({"phase": phase, "burst": burst, "build": build, "rps": rps,
               "agent_cpu_us_per_request": cpu, "agent_user_us_per_request": cpu / 2.0})
    }

    fn listener_sample(listener: &str, phase: u64, build: &str, rps: f64) -> Value {
        let mut sample = sample(phase, 0, build, rps, 10.0);
        sample["listener"] = json!(listener);
        sample
    }

    #[test]
    fn each_pair_compares_the_two_bursts_of_one_phase_and_burst() {
        let raw = json!({
            "bursts_per_phase": 2, "burst_seconds": 2, "loadavg_1m": [1.0, 1.5],
            "machine": {"kernel": "6.18", "cpus": 2},
            "samples": [
                // Host speed moves a lot between pairs, little within one: after is 10 %
                // faster in every pair.
                sample(0, 0, "this", 110.0, 9.0), sample(0, 0, "baseline", 100.0, 10.0),
                sample(0, 1, "baseline", 50.0, 20.0), sample(0, 1, "this", 55.0, 18.0),
                sample(1, 0, "this", 88.0, 9.0), sample(1, 0, "baseline", 80.0, 10.0),
                sample(1, 1, "this", 44.0, 10.0), sample(1, 1, "baseline", 40.0, 10.0),
            ],
        });
        assert_eq!(pairs(&raw).len(), 4);
        let page = markdown(&raw);
        assert!(
            page.contains("| requests/s | 1.100 | 1.100 | 1.100 | 4 of 4 |"),
            "{page}"
        );
        assert!(
            page.contains("| agent CPU per request | 0.900 | 0.900 | 0.950 | 3 of 4 |"),
            "{page}"
        );
    }

    #[test]
    fn a_cross_node_run_compares_each_listeners_bursts_with_the_same_listeners() {
        let raw = json!({
            "path": "cross-node", "bursts_per_phase": 1, "burst_seconds": 2,
            "loadavg_1m": [1.0], "machine": {"kernel": "6.18", "cpus": 2},
            "samples": [
                // The tcp listener does twice what the http listener does; after is 10 %
                // faster on tcp and 20 % slower on http.
                listener_sample("tcp", 0, "this", 110.0), listener_sample("tcp", 0, "baseline", 100.0),
                listener_sample("http", 0, "baseline", 50.0), listener_sample("http", 0, "this", 40.0),
                listener_sample("tcp", 1, "baseline", 100.0), listener_sample("tcp", 1, "this", 110.0),
                listener_sample("http", 1, "this", 40.0), listener_sample("http", 1, "baseline", 50.0),
            ],
        });
        assert_eq!(pairs(&raw).len(), 4);
        let page = markdown(&raw);
        let (tcp, http) = page
            .split_once("## The `http` listener, mTLS tunnel")
            .expect("a section per listener");
        assert!(tcp.contains("## The `tcp` listener, mTLS tunnel"), "{page}");
        assert!(
            tcp.contains("| requests/s | 1.100 | 1.100 | 1.100 | 2 of 2 |"),
            "{page}"
        );
        assert!(
            http.contains("| requests/s | 0.800 | 0.800 | 0.800 | 0 of 2 |"),
            "{page}"
        );
        assert!(page.contains("this build on nodes 1 and 2"), "{page}");
    }
}
