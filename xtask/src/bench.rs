//! `cargo xtask bench`: what strait costs, against no mesh and against per-pod sidecars, on
//! a testbed on this machine, in one command.
//!
//! One testbed node with a client pod and a server pod (nginx for HTTP, iperf3 for bulk, and
//! an HAProxy sidecar in each pod with TLS between them). Every scenario of
//! [`scenario::all`] runs once per round and the rounds are interleaved (A, B, C, A, B, C,
//! ...), so that noise from other work on the machine spreads over all of them; the tables
//! report medians over rounds and ratios of medians from this one run. The agent is the
//! release build, restarted with `--fast-path on|off` as the scenario needs.
//!
//! Tools: fixed-rate latency from our own open-loop load generator ([`load`], coordinated-
//! omission correct, run in the client pod as `xtask bench load-gen`), maximum throughput
//! from wrk, bulk from iperf3; CPU seconds and RSS from /proc of the agent (or of both
//! sidecars). Writes docs/benchmarks.md, docs/benchmarks/latency.svg and
//! docs/benchmarks/results.json (`--out` to put them elsewhere).

mod load;
mod report;
mod scenario;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use testbed::agent::Agent;
use testbed::{Node, Pod, PodSpec, Process, Testbed, require_tool, run, run_ok};

use self::scenario::{Scenario, Way, Workload};
use crate::{cargo, ebpf, workspace_root};

const SERVICE: &str = "web.bench.svc.cluster.local";
const SERVICE_V4: &str = "10.96.0.30";
const HTTP_PORT: u16 = 8080;
const BULK_PORT: u16 = 5201;
const SIDECAR_OUT_PORT: u16 = 15100;
const SIDECAR_IN_PORT: u16 = 8443;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// A smoke run: one short round (for CI); the numbers mean little.
    #[arg(long)]
    quick: bool,
    /// Rounds (each runs every scenario once); default 3, or 1 with --quick.
    #[arg(long)]
    rounds: Option<u32>,
    /// Where to write benchmarks.md, benchmarks/latency.svg and benchmarks/results.json.
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(subcommand)]
    internal: Option<Internal>,
}

#[derive(Debug, clap::Subcommand)]
enum Internal {
    /// (internal) the fixed-rate load generator, run inside the client pod.
    #[command(hide = true)]
    LoadGen(load::LoadArgs),
}

/// Durations and rates of one run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Plan {
    pub rounds: u32,
    pub rates: Vec<u32>,
    pub latency_seconds: f64,
    pub throughput_seconds: u32,
    pub bulk_seconds: u32,
    pub connections: u32,
}

pub fn run_bench(args: &BenchArgs) -> anyhow::Result<()> {
    if let Some(Internal::LoadGen(load)) = &args.internal {
        return load::run(load);
    }
    if !crate::is_root() {
        bail!("the benchmark needs root (network namespaces, cgroups, eBPF): run it as root");
    }
    for tool in ["wrk", "iperf3", "nginx", "haproxy", "openssl"] {
        require_tool(tool)
            .with_context(|| format!("`{tool}` is missing: run `cargo xtask setup`"))?;
    }
    let plan = if args.quick {
        Plan {
            rounds: args.rounds.unwrap_or(1),
            rates: vec![1000, 5000],
            latency_seconds: 1.0,
            throughput_seconds: 1,
            bulk_seconds: 1,
            connections: 16,
        }
    } else {
        Plan {
            rounds: args.rounds.unwrap_or(3),
            rates: vec![1000, 5000],
            latency_seconds: 5.0,
            throughput_seconds: 5,
            bulk_seconds: 5,
            connections: 16,
        }
    };
    let binaries = build()?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| workspace_root().join("docs"));

    let env = Env::start(&binaries)?;
    let scenarios = scenario::all();
    let mut samples: BTreeMap<&'static str, Vec<Value>> = BTreeMap::new();
    let mut agent: Option<(Agent, bool)> = None;
    for round in 0..plan.rounds {
        for s in &scenarios {
            if let Way::Strait { fast_path, .. } = s.way
                && agent.as_ref().map(|(_, on)| *on) != Some(fast_path)
            {
                if let Some((old, _)) = agent.take() {
                    old.stop()?;
                }
                agent = Some((env.start_agent(fast_path)?, fast_path));
            }
            let proxy_pids = match s.way {
                Way::Direct => Vec::new(),
                Way::Strait { .. } => {
                    vec![agent.as_ref().context("BUG: no agent")?.0.process.pid()]
                }
                Way::SidecarPair => env.sidecar_pids(),
            };
            eprintln!(
                "bench: round {}/{} {} ({:?})",
                round + 1,
                plan.rounds,
                s.id,
                s.workload
            );
            let sample = measure(&env, &plan, s, &proxy_pids)
                .with_context(|| format!("scenario {} in round {}", s.id, round + 1))?;
            eprintln!("bench:   {sample}");
            samples.entry(s.id).or_default().push(sample);
        }
    }
    let fast_counters = match &agent {
        Some((a, _)) => a.counters().unwrap_or(Value::Null),
        None => Value::Null,
    };
    if let Some((a, _)) = agent.take() {
        a.stop()?;
    }
    let demo_rss = env.demo_mesh_rss()?;
    let results = report::Results {
        plan,
        machine: machine(),
        scenarios,
        samples,
        demo_mesh_agent_rss_kib: demo_rss,
        fast_path_counters: fast_counters,
    };
    report::write(&out, &results)?;
    println!("{}", report::summary(&results));
    Ok(())
}

/// The binaries the bench runs: the agent (release) and this xtask (release, for the load
/// generator inside the client pod).
struct Binaries {
    strait: PathBuf,
    xtask: PathBuf,
}

fn build() -> anyhow::Result<Binaries> {
    ebpf::build_ebpf()?;
    let status = cargo()
        .args(["build", "--release", "-p", "strait", "-p", "xtask"])
        .current_dir(workspace_root())
        .status()
        .context("cannot run cargo build")?;
    if !status.success() {
        bail!("the release build failed");
    }
    let release = ebpf::target_dir().join("release");
    Ok(Binaries {
        strait: release.join("strait"),
        xtask: release.join("xtask"),
    })
}

/// The testbed and the long-running servers and sidecars.
struct Env {
    tb: Testbed,
    node: Node,
    client: Pod,
    server: Pod,
    mesh: PathBuf,
    xtask: PathBuf,
    strait: PathBuf,
    sidecars: Vec<Process>,
    _servers: Vec<Process>,
}

impl Env {
    fn start(bin: &Binaries) -> anyhow::Result<Env> {
        let tb = Testbed::new("bench")?;
        let cleanup = tb.cleanup_handle();
        ctrlc::set_handler(move || {
            eprintln!("\nInterrupted: tearing the testbed down.");
            if let Err(error) = cleanup.cleanup() {
                eprintln!("cleanup: {error:#}");
            }
            std::process::exit(130);
        })
        .context("cannot install the Ctrl-C handler")?;
        let node = tb.add_node("node1")?;
        let client = node.add_pod(&PodSpec::new("client", "bench").label("app", "client"))?;
        let server = node.add_pod(&PodSpec::new("web", "bench").label("app", "web"))?;
        tb.dns_record(SERVICE, &[SERVICE_V4.parse()?])?;
        tb.dns_record("web-pods.bench.svc.cluster.local", &[server.ipv4().into()])?;
        let dir = tb.temp_dir().join("bench");
        std::fs::create_dir_all(&dir)?;

        let mut servers = Vec::new();
        let nginx_conf = dir.join("nginx.conf");
        std::fs::write(&nginx_conf, nginx_conf_text(&dir))?;
        let nginx = tb.spawn("nginx", server.command("nginx").arg("-c").arg(&nginx_conf))?;
        nginx.wait_listening(HTTP_PORT, Duration::from_secs(10))?;
        servers.push(nginx);
        let iperf = tb.spawn(
            "iperf3",
            server
                .command("iperf3")
                .args(["-s", "-p", &BULK_PORT.to_string()]),
        )?;
        iperf.wait_listening(BULK_PORT, Duration::from_secs(10))?;
        servers.push(iperf);

        // The sidecar pair: a self-signed certificate, HAProxy in each pod.
        let key = dir.join("tls.key");
        let crt = dir.join("tls.crt");
        run_ok(
            Command::new("openssl")
                .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
                .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
                .args(["-subj", "/CN=web.bench.svc.cluster.local", "-keyout"])
                .arg(&key)
                .arg("-out")
                .arg(&crt),
            Duration::from_secs(30),
        )?;
        let pem = dir.join("tls.pem");
        std::fs::write(&pem, [std::fs::read(&crt)?, std::fs::read(&key)?].concat())?;
        let inbound = dir.join("haproxy-in.cfg");
        std::fs::write(&inbound, haproxy_inbound(&pem))?;
        let outbound = dir.join("haproxy-out.cfg");
        std::fs::write(&outbound, haproxy_outbound(server.ipv4().into()))?;
        let sidecar_in = tb.spawn(
            "sidecar-in",
            server.command("haproxy").args(["-db", "-f"]).arg(&inbound),
        )?;
        sidecar_in.wait_listening(SIDECAR_IN_PORT, Duration::from_secs(10))?;
        let sidecar_out = tb.spawn(
            "sidecar-out",
            client.command("haproxy").args(["-db", "-f"]).arg(&outbound),
        )?;
        sidecar_out.wait_listening(SIDECAR_OUT_PORT, Duration::from_secs(10))?;

        node.write_workload(&client)?;
        node.write_workload(&server)?;
        let mesh = dir.join("mesh.yaml");
        std::fs::write(
            &mesh,
            scenario::mesh_yaml(SERVICE, HTTP_PORT, BULK_PORT, "tcp"),
        )?;
        Ok(Env {
            tb,
            node,
            client,
            server,
            mesh,
            xtask: bin.xtask.clone(),
            strait: bin.strait.clone(),
            sidecars: vec![sidecar_out, sidecar_in],
            _servers: servers,
        })
    }

    fn start_agent(&self, fast_path: bool) -> anyhow::Result<Agent> {
        // SAFETY (of the environment): the bench is single-threaded here; testbed::agent reads
        // STRAIT_BIN to find the agent binary.
        unsafe { std::env::set_var("STRAIT_BIN", &self.strait) };
        let switch = if fast_path { "on" } else { "off" };
        let agent = Agent::start(&self.tb, &self.node, &self.mesh, &["--fast-path", switch])?;
        for pod in ["bench/client", "bench/web"] {
            agent.wait_enrolled(pod, true, Duration::from_secs(10))?;
        }
        Ok(agent)
    }

    fn sidecar_pids(&self) -> Vec<u32> {
        self.sidecars.iter().map(Process::pid).collect()
    }

    /// The client's destination for a scenario.
    fn target(&self, s: &Scenario) -> SocketAddr {
        let port = match s.workload {
            Workload::Http1 => HTTP_PORT,
            Workload::TcpBulk => BULK_PORT,
        };
        match s.way {
            Way::Direct => SocketAddr::new(self.server.ipv4().into(), port),
            Way::Strait { .. } => {
                SocketAddr::new(SERVICE_V4.parse().expect("valid address literal"), port)
            }
            Way::SidecarPair => SocketAddr::from(([127, 0, 0, 1], SIDECAR_OUT_PORT)),
        }
    }

    /// RSS of an agent running the demo mesh (examples/demo/mesh.yaml), once ready and idle.
    fn demo_mesh_rss(&self) -> anyhow::Result<u64> {
        let demo = workspace_root().join("examples/demo/mesh.yaml");
        let agent = Agent::start(&self.tb, &self.node, &demo, &[])?;
        std::thread::sleep(Duration::from_secs(2));
        let rss = proc_status_kib(agent.process.pid(), "VmRSS")?;
        agent.stop()?;
        Ok(rss)
    }
}

fn nginx_conf_text(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/nginx-body;
    proxy_temp_path {d}/nginx-proxy;
    fastcgi_temp_path {d}/nginx-fastcgi;
    uwsgi_temp_path {d}/nginx-uwsgi;
    scgi_temp_path {d}/nginx-scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    server {{
        listen {HTTP_PORT};
        location / {{ return 200 "hello from the strait bench\n"; }}
    }}
}}
"#
    )
}

const HAPROXY_COMMON: &str = r#"global
    maxconn 4096
    nbthread 1
defaults
    mode http
    timeout connect 5s
    timeout client 120s
    timeout server 120s
"#;

fn haproxy_inbound(pem: &Path) -> String {
    format!(
        "{HAPROXY_COMMON}frontend inbound\n    bind :{SIDECAR_IN_PORT} ssl crt {}\n    default_backend app\nbackend app\n    http-reuse always\n    server app 127.0.0.1:{HTTP_PORT}\n",
        pem.display()
    )
}

fn haproxy_outbound(server: IpAddr) -> String {
    format!(
        "{HAPROXY_COMMON}frontend outbound\n    bind 127.0.0.1:{SIDECAR_OUT_PORT}\n    default_backend peer\nbackend peer\n    http-reuse always\n    server peer {server}:{SIDECAR_IN_PORT} ssl verify none\n"
    )
}

/// Runs one scenario once; returns its sample (a JSON object of numbers).
fn measure(env: &Env, plan: &Plan, s: &Scenario, proxy_pids: &[u32]) -> anyhow::Result<Value> {
    let target = env.target(s);
    match s.workload {
        Workload::Http1 => {
            let mut latency = serde_json::Map::new();
            for &rate in &plan.rates {
                let output = run_ok(
                    env.client
                        .command(&env.xtask)
                        .args(["bench", "load-gen", "--target", &target.to_string()])
                        .args(["--rate", &rate.to_string()])
                        .args(["--seconds", &plan.latency_seconds.to_string()])
                        .args(["--connections", &plan.connections.to_string()]),
                    Duration::from_secs_f64(plan.latency_seconds + 60.0),
                )?;
                let report: load::LoadReport =
                    serde_json::from_slice(&output.stdout).context("load generator report")?;
                latency.insert(rate.to_string(), serde_json::to_value(report)?);
            }
            let cpu_before = cpu_ticks(proxy_pids)?;
            let output = run_ok(
                env.client
                    .command("wrk")
                    .args(["-t1", "-c32", &format!("-d{}s", plan.throughput_seconds)])
                    .arg(format!("http://{target}/")),
                Duration::from_secs(u64::from(plan.throughput_seconds) + 60),
            )?;
            let cpu_after = cpu_ticks(proxy_pids)?;
            let text = String::from_utf8_lossy(&output.stdout);
            let (rps, requests) = parse_wrk(&text)?;
            if text.contains("Non-2xx") || text.contains("Socket errors") {
                bail!("wrk saw errors:\n{text}");
            }
            let cpu_seconds = (cpu_after - cpu_before) as f64 / clock_ticks();
            Ok(json!({
                "latency": latency,
                "rps": rps,
                "requests": requests,
                "proxy_cpu_seconds_per_1000": (!proxy_pids.is_empty())
                    .then(|| cpu_seconds / requests as f64 * 1000.0),
                "proxy_rss_kib": rss_sum(proxy_pids)?,
            }))
        }
        Workload::TcpBulk => {
            let cpu_before = cpu_ticks(proxy_pids)?;
            let output = run_ok(
                env.client
                    .command("iperf3")
                    .args([
                        "-c",
                        &target.ip().to_string(),
                        "-p",
                        &target.port().to_string(),
                    ])
                    .args(["-t", &plan.bulk_seconds.to_string(), "-J"]),
                Duration::from_secs(u64::from(plan.bulk_seconds) + 60),
            )?;
            let cpu_after = cpu_ticks(proxy_pids)?;
            let report: Value =
                serde_json::from_slice(&output.stdout).context("iperf3 JSON report")?;
            let bps = report["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .context("iperf3 report without end.sum_received.bits_per_second")?;
            let bytes = report["end"]["sum_received"]["bytes"]
                .as_f64()
                .unwrap_or(0.0);
            let cpu_seconds = (cpu_after - cpu_before) as f64 / clock_ticks();
            Ok(json!({
                "gbit_per_s": bps / 1e9,
                "proxy_cpu_seconds_per_gib": (!proxy_pids.is_empty() && bytes > 0.0)
                    .then(|| cpu_seconds / (bytes / (1u64 << 30) as f64)),
                "proxy_rss_kib": rss_sum(proxy_pids)?,
            }))
        }
    }
}

/// `Requests/sec` and the request count from wrk's output.
fn parse_wrk(text: &str) -> anyhow::Result<(f64, u64)> {
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("no Requests/sec in wrk's output:\n{text}"))?;
    let requests = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .with_context(|| format!("no request count in wrk's output:\n{text}"))?;
    Ok((rps, requests))
}

/// utime + stime of the processes, in clock ticks (all threads).
fn cpu_ticks(pids: &[u32]) -> anyhow::Result<u64> {
    let mut total = 0;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("read /proc/{pid}/stat"))?;
        // Fields after the command name (which may contain spaces) start after ") ".
        let rest = stat
            .rsplit_once(") ")
            .map(|(_, r)| r)
            .context("malformed /proc/PID/stat")?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of stat; 12 and 13 of `rest` (0-based 11, 12).
        let utime: u64 = fields.get(11).context("no utime")?.parse()?;
        let stime: u64 = fields.get(12).context("no stime")?.parse()?;
        total += utime + stime;
    }
    Ok(total)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

fn proc_status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

fn rss_sum(pids: &[u32]) -> anyhow::Result<Option<u64>> {
    if pids.is_empty() {
        return Ok(None);
    }
    let mut total = 0;
    for pid in pids {
        total += proc_status_kib(*pid, "VmRSS")?;
    }
    Ok(Some(total))
}

fn machine() -> Value {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let tool = |cmd: &str, arg: &str| {
        run(Command::new(cmd).arg(arg), Duration::from_secs(5))
            .map(|o| {
                let text = [o.stdout, o.stderr].concat();
                String::from_utf8_lossy(&text)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_owned()
            })
            .unwrap_or_default()
    };
    json!({
        "kernel": kernel.trim(),
        "cpu": model,
        "cpus": cpus,
        "wrk": tool("wrk", "--version"),
        "iperf3": tool("iperf3", "--version"),
        "nginx": tool("nginx", "-v"),
        "haproxy": tool("haproxy", "-v"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_is_parsed() {
        let text = "Running 5s test @ http://10.0.0.1:8080/\n  1 threads and 32 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency   1.00ms  0.20ms   3.00ms   90.00%\n  50000 requests in 5.00s, 9.00MB read\nRequests/sec:  10000.50\nTransfer/sec:      1.80MB\n";
        assert_eq!(parse_wrk(text).unwrap(), (10000.5, 50000));
    }
}
