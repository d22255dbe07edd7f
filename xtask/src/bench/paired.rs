//! The paired A/B (`cargo xtask bench --only paired --baseline-agent PATH`): this build's agent
//! and a baseline agent, each on a node of its own in one testbed, take turns in short wrk
//! bursts through the same-node L7 path (client pod → `http` listener → nginx pod, fast path
//! on), so the two builds are compared seconds apart rather than minutes apart.
//!
//! Why: on this shared two-core host the direct baseline itself moved by a third between two
//! turns of an ordinary `--baseline-agent` run, minutes apart (docs/benchmarks.md, "A/B runs in
//! alternating bursts"), which hides any change of a few percent. Here each pair of bursts is
//! one comparison; halfway the two builds swap nodes (both agents restarted), so a difference
//! between the nodes cancels out. Raw samples: docs/benchmarks/paired.json; page:
//! docs/benchmarks-paired.md, generated from them.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use testbed::agent::Agent;
use testbed::{Node, Pod, PodSpec, Process, Testbed};

use super::Cpu;
use super::environment::{
    HTTP_L7_PORT, NODE_WORKER_THREADS, on_interrupt_clean, start_agent_as_deployed, worker_args,
};
use super::procfs::{clock_ticks, loadavg};
use super::report::median_of;
use super::tools::{machine, nginx_conf_text, wrk};

pub(super) const RAW: &str = "benchmarks/paired.json";
pub(super) const PAGE: &str = "benchmarks-paired.md";
/// One wrk burst: long enough for wrk's 32 connections to settle, short enough that the host
/// hardly changes speed between the two bursts of a pair.
const BURST_SECONDS: u32 = 2;
/// The virtual services, one per node, each to the nginx pod on the same node.
const SERVICES: [(&str, &str); 2] = [
    ("web1.paired.svc.cluster.local", "10.96.0.41"),
    ("web2.paired.svc.cluster.local", "10.96.0.42"),
];

/// One node of the paired testbed: its client pod and the address its client calls.
struct Side {
    node: Node,
    client: Pod,
    target: std::net::SocketAddr,
}

/// Runs `bursts` pairs of bursts in each of two phases (this build on node1, then on node2)
/// and returns the raw results.
pub(super) fn run(this_build: &Path, baseline: &Path, bursts: u32) -> anyhow::Result<Value> {
    let tb = Testbed::new("bench-paired")?;
    on_interrupt_clean(&tb);
    let dir = tb.temp_dir().join("paired");
    std::fs::create_dir_all(&dir)?;
    let mut sides = Vec::new();
    let mut servers: Vec<Process> = Vec::new();
    for (n, (service, vip)) in SERVICES.iter().enumerate() {
        let i = n + 1;
        let node = tb.add_node(&format!("node{i}"))?;
        // Pods before agents: an agent does not see netns files mounted after it starts.
        let client =
            node.add_pod(&PodSpec::new(&format!("client{i}"), "bench").label("app", "client"))?;
        let web_app = format!("web{i}");
        let web = node.add_pod(&PodSpec::new(&web_app, "bench").label("app", &web_app))?;
        tb.dns_record(service, &[vip.parse()?])?;
        tb.dns_record(
            &format!("web{i}-pods.paired.svc.cluster.local"),
            &[web.ipv4().into()],
        )?;
        let nginx_dir = dir.join(format!("nginx-{i}"));
        std::fs::create_dir_all(&nginx_dir)?;
        let conf = nginx_dir.join("nginx.conf");
        std::fs::write(&conf, nginx_conf_text(&nginx_dir, &[HTTP_L7_PORT], None))?;
        let nginx = tb.spawn(
            &format!("nginx-{i}"),
            web.command("nginx").arg("-c").arg(&conf),
        )?;
        nginx.wait_listening(HTTP_L7_PORT, Duration::from_secs(10))?;
        servers.push(nginx);
        node.write_workload(&client)?;
        node.write_workload(&web)?;
        sides.push(Side {
            node,
            client,
            target: std::net::SocketAddr::new(vip.parse()?, HTTP_L7_PORT),
        });
    }
    let mesh = dir.join("mesh.yaml");
    std::fs::write(&mesh, mesh_yaml())?;

    let builds = [("this", this_build), ("baseline", baseline)];
    let mut samples = Vec::new();
    let mut loads = Vec::new();
    for phase in 0..2usize {
        // Phase 0: this build on node1; phase 1: on node2.
        let mut agents: Vec<(&str, Agent)> = Vec::new();
        for (n, side) in sides.iter().enumerate() {
            let (build, binary) = builds[(n + phase) % 2];
            // SAFETY (of the environment): single-threaded here; testbed::agent reads
            // STRAIT_BIN when it starts an agent.
            unsafe { std::env::set_var("STRAIT_BIN", binary) };
            let mut args = vec!["--fast-path".to_owned(), "on".to_owned()];
            args.extend(worker_args(binary));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let agent = start_agent_as_deployed(&tb, &side.node, &mesh, &args)?;
            for pod in [side.client.name(), &format!("web{}", n + 1)] {
                agent.wait_enrolled(&format!("bench/{pod}"), true, Duration::from_secs(20))?;
            }
            agents.push((build, agent));
        }
        // A first burst on each side that is not counted: connections and pools warm up.
        for side in &sides {
            wrk(&side.client, side.target, 1)?;
        }
        for burst in 0..bursts {
            let mut order = [0usize, 1];
            if burst % 2 == 1 {
                order.reverse();
            }
            for (position, &n) in order.iter().enumerate() {
                let (build, agent) = &agents[n];
                let side = &sides[n];
                let pid = agent.process.pid();
                let ((rps, requests), cpu) =
                    Cpu::during(&[pid], || wrk(&side.client, side.target, BURST_SECONDS))?;
                let per_request = |ticks: u64| {
                    (requests > 0).then(|| ticks as f64 / clock_ticks() / requests as f64 * 1e6)
                };
                samples.push(json!({
                    "phase": phase,
                    "burst": burst,
                    "build": build,
                    "node": side.node.name(),
                    "first": position == 0,
                    "rps": rps,
                    "requests": requests,
                    "agent_cpu_us_per_request": per_request(cpu.proxies.total()),
                    "agent_user_us_per_request": per_request(cpu.proxies.user),
                }));
            }
            if let Some(load) = loadavg() {
                loads.push(load);
            }
            eprintln!(
                "bench: paired: phase {}/2, burst {}/{bursts}",
                phase + 1,
                burst + 1
            );
        }
        for (_, agent) in agents {
            agent.stop()?;
        }
    }
    drop(servers);
    Ok(json!({
        "machine": machine(),
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

fn mesh_yaml() -> String {
    let mut yaml = String::from(
        "apiVersion: appmesh.k8s.aws/v1beta2\nkind: Mesh\nmetadata: {name: paired}\n\
         spec: {egressFilter: {type: ALLOW_ALL}}\n---\n\
         apiVersion: appmesh.k8s.aws/v1beta2\nkind: VirtualNode\n\
         metadata: {name: client, namespace: bench}\nspec:\n  \
         podSelector: {matchLabels: {app: client}}\n  backends:\n",
    );
    for n in 1..=SERVICES.len() {
        let _ = writeln!(
            yaml,
            "    - virtualService: {{virtualServiceRef: {{name: web{n}}}}}"
        );
    }
    for (n, (service, _)) in SERVICES.iter().enumerate() {
        let i = n + 1;
        let _ = write!(
            yaml,
            "---\napiVersion: appmesh.k8s.aws/v1beta2\nkind: VirtualNode\n\
             metadata: {{name: web{i}, namespace: bench}}\nspec:\n  \
             podSelector: {{matchLabels: {{app: web{i}}}}}\n  \
             listeners: [{{portMapping: {{port: {HTTP_L7_PORT}, protocol: http}}}}]\n  \
             serviceDiscovery: {{dns: {{hostname: web{i}-pods.paired.svc.cluster.local}}}}\n\
             ---\napiVersion: appmesh.k8s.aws/v1beta2\nkind: VirtualService\n\
             metadata: {{name: web{i}, namespace: bench}}\nspec:\n  awsName: {service}\n  \
             provider: {{virtualNode: {{virtualNodeRef: {{name: web{i}}}}}}}\n"
        );
    }
    yaml
}

/// The two bursts of one pair: (this build's sample, the baseline's).
fn pairs(raw: &Value) -> Vec<(&Value, &Value)> {
    let samples = raw["samples"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let of = |build: &str, phase: &Value, burst: &Value| {
        samples
            .iter()
            .find(|s| s["build"] == build && &s["phase"] == phase && &s["burst"] == burst)
    };
    samples
        .iter()
        .filter(|s| s["build"] == "this")
        .filter_map(|s| Some((s, of("baseline", &s["phase"], &s["burst"])?)))
        .collect()
}

/// The generated page.
pub(super) fn markdown(raw: &Value) -> String {
    let mut s = String::new();
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
    let _ = writeln!(s, "# Benchmarks: an A/B in alternating bursts\n");
    let _ = writeln!(
        s,
        "Generated by `cargo xtask bench --only paired --baseline-agent PATH` from \
         [benchmarks/paired.json](benchmarks/paired.json) (`--render` regenerates it; `cargo \
         xtask test` checks that it still is). Kernel {}, {} CPUs. Two nodes of one testbed, \
         each with a client pod, an nginx pod and its own agent ({threads}, fast path on): \
         one runs this build, the other the baseline. wrk (1 thread, 32 connections) runs \
         {seconds} s bursts through the node's `http` listener to the nginx pod on the same \
         node, the two nodes taking turns (which goes first alternates), {bursts} pairs of \
         bursts; then the builds swap nodes (both agents restarted) for {bursts} pairs more, \
         so a difference between the nodes cancels out. Agent CPU is the agent's utime + \
         stime during its burst. 1-minute load average after each pair: {}.\n",
        raw["machine"]["kernel"].as_str().unwrap_or("?").trim(),
        raw["machine"]["cpus"],
        range(&loads),
    );
    let pairs = pairs(raw);
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
        "| figure | median ratio, all pairs | this build on node1 | on node2 | pairs where after is better |"
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
    s
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
}
