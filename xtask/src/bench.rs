//! `cargo xtask bench`: what strait costs, against no mesh and against per-pod sidecars, on
//! a testbed on this machine, in one command.
//!
//! Two testbed nodes. node1 has a client pod and a server pod (nginx for HTTP/1.1 and HTTP/2,
//! iperf3 for bulk, a Python grpcio server, an HAProxy sidecar in each pod with TLS between
//! them); node2 has two server pods (nginx; one behind a STRICT mTLS listener, one with an
//! HAProxy sidecar). Both nodes run an agent (`--peer-node` for each other, certificates from
//! `strait ca`). Every scenario of [`scenario::all`] runs once per round and the rounds are
//! interleaved (A, B, C, A, B, C, ...), so that noise from other work on the machine spreads
//! over all of them; the tables report medians over rounds and ratios of medians from this one
//! run. node1's agent is the release build, restarted when a scenario needs other flags
//! (`--fast-path on|off`, `--telemetry on|off`).
//!
//! Tools: fixed-rate latency from our own open-loop load generator ([`load`], coordinated-
//! omission correct, HTTP/1.1, HTTP/2 and gRPC unary, run in the client pod as `xtask bench
//! load-gen`), maximum throughput from wrk (HTTP/1.1) and h2load (HTTP/2), bulk from iperf3;
//! CPU seconds and RSS from /proc of the agents (or of both sidecars). Writes
//! docs/benchmarks.md, docs/benchmarks/latency.svg and docs/benchmarks/results.json (`--out`
//! to put them elsewhere).

mod hold;
mod load;
mod report;
mod scale;
mod scenario;
mod soak;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use testbed::agent::{Agent, strait};
use testbed::{Node, Pod, PodSpec, Process, Testbed, addr, require_tool, run, run_ok};

use self::scenario::{Scenario, Topology, Way, Workload};
use crate::{cargo, ebpf, workspace_root};

const SERVICE: &str = "web.bench.svc.cluster.local";
const SERVICE_V4: &str = "10.96.0.30";
const SERVICE2: &str = "web2.bench.svc.cluster.local";
const SERVICE2_V4: &str = "10.96.0.31";
const SERVICE2_TLS: &str = "web2-tls.bench.svc.cluster.local";
const SERVICE2_TLS_V4: &str = "10.96.0.32";
/// nginx, HTTP/1.1, behind a `tcp` listener.
const HTTP_PORT: u16 = 8080;
/// nginx, HTTP/1.1, behind an `http` listener (also the port of node2's servers).
const HTTP_L7_PORT: u16 = 8081;
/// nginx, HTTP/2 with prior knowledge, behind an `http2` listener.
const H2_PORT: u16 = 8082;
/// Python grpcio, behind a `grpc` listener.
const GRPC_PORT: u16 = 50051;
const BULK_PORT: u16 = 5201;
/// The client's sidecar: to the same-node server's sidecar.
const SIDECAR_OUT_PORT: u16 = 15100;
/// The client's sidecar: to node2's server's sidecar.
const SIDECAR_OUT_XNODE_PORT: u16 = 15101;
const SIDECAR_IN_PORT: u16 = 8443;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// A smoke run: one short round (for CI); the numbers mean little.
    #[arg(long)]
    quick: bool,
    /// Rounds (each runs every scenario once); default 3, or 1 with --quick.
    #[arg(long)]
    rounds: Option<u32>,
    /// Run only these scenarios (comma-separated ids, see xtask/src/bench/scenario.rs). Such a
    /// partial run writes its own page and raw results (docs/benchmarks-partial.md,
    /// docs/benchmarks/partial.json) and leaves the full run's untouched. `scale` names the
    /// scale suite (xtask/src/bench/scale.rs), whose raw results always go to
    /// docs/benchmarks/scale.json and make the "Scale" section of docs/benchmarks.md; `soak`
    /// names the soak (xtask/src/bench/soak.rs: docs/benchmarks/soak.json and soak.svg, the
    /// "Soak" section).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Use the debug build of the agent and of this xtask (`scale` and `soak` only): for their
    /// countable figures where a release build is out of reach. The results and the page say
    /// which build ran.
    #[arg(long)]
    debug_build: bool,
    /// How long the soak runs, seconds (its target needs at least 600).
    #[arg(long, default_value_t = 600)]
    soak_seconds: u64,
    /// Where to write benchmarks.md, benchmarks/latency.svg and benchmarks/results.json.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Run nothing: regenerate the pages and plots under --out (default docs/) from the raw
    /// results already there.
    #[arg(long)]
    render: bool,
    #[command(subcommand)]
    internal: Option<Internal>,
}

#[derive(Debug, clap::Subcommand)]
enum Internal {
    /// (internal) the fixed-rate load generator, run inside the client pod.
    #[command(hide = true)]
    LoadGen(load::LoadArgs),
    /// (internal) many idle connections, or their echo server, run inside a pod.
    #[command(hide = true)]
    HoldConns(hold::HoldArgs),
}

/// Durations and rates of one run.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Plan {
    pub rounds: u32,
    pub rates: Vec<u32>,
    pub latency_seconds: f64,
    pub throughput_seconds: u32,
    pub bulk_seconds: u32,
    /// HTTP/1.1 keep-alive connections of the load generator.
    pub connections: u32,
    /// HTTP/2 connections of the load generator and of h2load.
    pub h2_connections: u32,
    /// Concurrent streams per connection of h2load.
    pub h2_streams: u32,
}

/// How node1's agent runs; it restarts when the next scenario wants another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AgentFlags {
    fast_path: bool,
    telemetry: Option<bool>,
}

pub fn run_bench(args: &BenchArgs) -> anyhow::Result<()> {
    match &args.internal {
        Some(Internal::LoadGen(load)) => return load::run(load),
        Some(Internal::HoldConns(hold)) => return hold::run(hold),
        None => {}
    }
    if args.render {
        let out = args
            .out
            .clone()
            .unwrap_or_else(|| workspace_root().join("docs"));
        return report::render(&out);
    }
    if !crate::is_root() {
        bail!("the benchmark needs root (network namespaces, cgroups, eBPF): run it as root");
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| workspace_root().join("docs"));
    let wants = |suite: &str| args.only.is_empty() || args.only.iter().any(|id| id == suite);
    let run_suites = |binaries: &Binaries| -> anyhow::Result<()> {
        if wants(SCALE) {
            run_scale(binaries, &out, args.quick)?;
        }
        if wants(SOAK) {
            run_soak(binaries, &out, args.soak_seconds)?;
        }
        Ok(())
    };
    if !args.only.is_empty() && args.only.iter().all(|id| id == SCALE || id == SOAK) {
        let binaries = if args.debug_build {
            debug_build()?
        } else {
            build()?
        };
        return run_suites(&binaries);
    } else if args.debug_build {
        bail!(
            "--debug-build is for `--only scale,soak`; the other scenarios need the release build"
        );
    }
    for tool in ["wrk", "iperf3", "nginx", "haproxy", "openssl"] {
        require_tool(tool)
            .with_context(|| format!("`{tool}` is missing: run `cargo xtask setup`"))?;
    }
    require_tool("h2load")
        .context("`h2load` is missing: apt-get install nghttp2-client (Debian)")?;
    let python = python_with_grpcio()?;
    let plan = if args.quick {
        Plan {
            rounds: args.rounds.unwrap_or(1),
            rates: vec![1000, 5000],
            latency_seconds: 1.0,
            throughput_seconds: 1,
            bulk_seconds: 1,
            connections: 16,
            h2_connections: 4,
            h2_streams: 16,
        }
    } else {
        Plan {
            rounds: args.rounds.unwrap_or(3),
            rates: vec![1000, 5000],
            latency_seconds: 5.0,
            throughput_seconds: 5,
            bulk_seconds: 5,
            connections: 16,
            h2_connections: 4,
            h2_streams: 16,
        }
    };
    let only: Vec<String> = args
        .only
        .iter()
        .filter(|id| *id != SCALE)
        .cloned()
        .collect();
    let binaries = build()?;
    let telemetry_switch = has_telemetry_switch(&binaries.strait);
    eprintln!(
        "bench: `strait run --telemetry` {}",
        if telemetry_switch {
            "is available"
        } else {
            "is not available in this build: the telemetry scenarios are skipped"
        }
    );
    let env = Env::start(&binaries, &python)?;
    let mut scenarios = scenario::all();
    if !only.is_empty() {
        scenarios.retain(|s| only.iter().any(|id| id == s.id));
        if scenarios.is_empty() {
            bail!("--only {:?} names no scenario", args.only);
        }
    }
    let mut samples: BTreeMap<&'static str, Vec<Value>> = BTreeMap::new();
    let mut agent: Option<(Agent, AgentFlags)> = None;
    for round in 0..plan.rounds {
        for s in round_order(&scenarios, round) {
            let mut proxy_pids = Vec::new();
            if let Way::Strait {
                fast_path,
                telemetry,
                ..
            } = s.way
            {
                if telemetry.is_some() && !telemetry_switch {
                    samples.entry(s.id).or_default().push(json!({
                        "unavailable": "`strait run --telemetry` is not available in this build"
                    }));
                    continue;
                }
                let flags = AgentFlags {
                    fast_path,
                    telemetry,
                };
                if agent.as_ref().map(|(_, f)| *f) != Some(flags) {
                    if let Some((old, _)) = agent.take() {
                        old.stop()?;
                    }
                    agent = Some((env.start_agent(flags)?, flags));
                }
                proxy_pids.push(agent.as_ref().context("BUG: no agent")?.0.process.pid());
                if s.topology == Topology::CrossNode {
                    proxy_pids.push(env.agent2.process.pid());
                }
            } else if s.way == Way::SidecarPair {
                proxy_pids = env.sidecar_pids(s.topology);
            }
            eprintln!(
                "bench: round {}/{} {} ({:?}, {:?})",
                round + 1,
                plan.rounds,
                s.id,
                s.workload,
                s.topology
            );
            let loadavg = loadavg();
            let mut sample = measure(&env, &plan, s, &proxy_pids)
                .with_context(|| format!("scenario {} in round {}", s.id, round + 1))?;
            sample["loadavg_1m"] = json!(loadavg);
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
        only,
        scenarios,
        samples,
        demo_mesh_agent_rss_kib: demo_rss,
        fast_path_counters: fast_counters,
        telemetry_switch,
    };
    report::write(&out, &results)?;
    println!("{}", report::summary(&results));
    drop(env);
    run_suites(&binaries)
}

/// The `--only` ids of the scale suite and of the soak.
const SCALE: &str = "scale";
const SOAK: &str = "soak";

/// Runs the soak, writes its raw results and regenerates the pages and plots.
fn run_soak(binaries: &Binaries, out: &Path, seconds: u64) -> anyhow::Result<()> {
    let mut raw = soak::run(&binaries.strait, &binaries.xtask, seconds)?;
    raw["agent_build"] = json!(binaries.profile);
    write_raw(&out.join(soak::RAW), &raw)?;
    report::render(out)
}

fn write_raw(path: &Path, raw: &Value) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    std::fs::write(path, serde_json::to_string_pretty(raw)? + "\n")
        .with_context(|| format!("write {}", path.display()))?;
    eprintln!("bench: wrote {}", path.display());
    Ok(())
}

/// Runs the scale suite, writes its raw results and regenerates the pages.
fn run_scale(binaries: &Binaries, out: &Path, quick: bool) -> anyhow::Result<()> {
    let mut raw = scale::run(&binaries.strait, &binaries.xtask, quick)?;
    raw["agent_build"] = json!(binaries.profile);
    write_raw(&out.join(scale::RAW), &raw)?;
    report::render(out)
}

/// The testbeds to tear down on Ctrl-C (one handler for the process, for every testbed the
/// run makes).
static ON_INTERRUPT: std::sync::Mutex<Vec<testbed::CleanupHandle>> =
    std::sync::Mutex::new(Vec::new());

/// Tears `tb` down if the run is interrupted.
fn on_interrupt_clean(tb: &Testbed) {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    ON_INTERRUPT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(tb.cleanup_handle());
    INSTALLED.call_once(|| {
        let installed = ctrlc::set_handler(|| {
            eprintln!("\nInterrupted: tearing the testbed down.");
            let handles = ON_INTERRUPT
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for cleanup in handles.iter() {
                if let Err(error) = cleanup.cleanup() {
                    eprintln!("cleanup: {error:#}");
                }
            }
            std::process::exit(130);
        });
        if let Err(error) = installed {
            eprintln!("bench: no Ctrl-C handler ({error}); an interrupted run leaves its testbed");
        }
    });
}

/// The scenarios in the order of one round: [`scenario::all`]'s, except that the telemetry
/// on/off pair swaps places every other round, so neither always runs second.
fn round_order(scenarios: &[Scenario], round: u32) -> Vec<&Scenario> {
    let mut order: Vec<&Scenario> = scenarios.iter().collect();
    if round % 2 == 1 {
        let pair: Vec<usize> = (0..order.len())
            .filter(|&i| {
                matches!(
                    order[i].way,
                    Way::Strait {
                        telemetry: Some(_),
                        ..
                    }
                )
            })
            .collect();
        if let [a, b] = pair[..] {
            order.swap(a, b);
        }
    }
    order
}

/// The binaries the bench runs: the agent (release) and this xtask (release, for the load
/// generator inside the client pod).
struct Binaries {
    strait: PathBuf,
    xtask: PathBuf,
    /// "release" or "debug", for the results.
    profile: &'static str,
}

/// [`build`], debug.
fn debug_build() -> anyhow::Result<Binaries> {
    ebpf::build_ebpf()?;
    let status = cargo()
        .args(["build", "-p", "strait", "-p", "xtask"])
        .current_dir(workspace_root())
        .status()
        .context("cannot run cargo build")?;
    if !status.success() {
        bail!("the debug build failed");
    }
    let debug = ebpf::target_dir().join("debug");
    Ok(Binaries {
        strait: debug.join("strait"),
        xtask: debug.join("xtask"),
        profile: "debug",
    })
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
        profile: "release",
    })
}

/// True if this agent build has the telemetry switch (`strait run --telemetry on|off`).
fn has_telemetry_switch(strait: &Path) -> bool {
    run(
        Command::new(strait).args(["run", "--help"]),
        Duration::from_secs(10),
    )
    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--telemetry"))
}

/// The Python interpreter that has grpcio (`cargo xtask setup` installs it).
fn python_with_grpcio() -> anyhow::Result<PathBuf> {
    let output = run(
        Command::new("python3").args(["-c", "import grpc, sys; print(sys.executable)"]),
        Duration::from_secs(30),
    )?;
    if !output.status.success() {
        bail!(
            "the gRPC scenarios need Python's grpcio (`cargo xtask setup` installs it): {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(PathBuf::from(
        String::from_utf8_lossy(&output.stdout).trim().to_owned(),
    ))
}

/// The 1-minute load average of the machine.
fn loadavg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The testbed and the long-running servers, sidecars and node2's agent.
struct Env {
    tb: Testbed,
    node1: Node,
    node2: Node,
    client: Pod,
    server: Pod,
    web2: Pod,
    _web2_tls: Pod,
    mesh: PathBuf,
    xtask: PathBuf,
    /// node2's agent (fast path on, the default), for the whole run.
    agent2: Agent,
    /// The client's sidecar, the same-node server's, node2's server's.
    sidecars: [Process; 3],
    _servers: Vec<Process>,
}

impl Env {
    fn start(bin: &Binaries, python: &Path) -> anyhow::Result<Env> {
        // SAFETY (of the environment): the bench is single-threaded here; testbed::agent reads
        // STRAIT_BIN to find the agent binary.
        unsafe { std::env::set_var("STRAIT_BIN", &bin.strait) };
        let tb = Testbed::new("bench")?;
        on_interrupt_clean(&tb);
        let node1 = tb.add_node("node1")?;
        let node2 = tb.add_node("node2")?;
        // Pods must exist before the agents start: an agent lives in its own mount namespace
        // and does not see netns files mounted after it.
        let client = node1.add_pod(&PodSpec::new("client", "bench").label("app", "client"))?;
        let server = node1.add_pod(&PodSpec::new("web", "bench").label("app", "web"))?;
        let web2 = node2.add_pod(&PodSpec::new("web2", "bench").label("app", "web2"))?;
        let web2_tls =
            node2.add_pod(&PodSpec::new("web2-tls", "bench").label("app", "web2-tls"))?;
        tb.dns_record(SERVICE, &[SERVICE_V4.parse()?])?;
        tb.dns_record(SERVICE2, &[SERVICE2_V4.parse()?])?;
        tb.dns_record(SERVICE2_TLS, &[SERVICE2_TLS_V4.parse()?])?;
        tb.dns_record("web-pods.bench.svc.cluster.local", &[server.ipv4().into()])?;
        tb.dns_record("web2-pods.bench.svc.cluster.local", &[web2.ipv4().into()])?;
        tb.dns_record(
            "web2-tls-pods.bench.svc.cluster.local",
            &[web2_tls.ipv4().into()],
        )?;
        let dir = tb.temp_dir().join("bench");
        std::fs::create_dir_all(&dir)?;

        let mut servers = Vec::new();
        for (pod, ports, h2) in [
            (&server, &[HTTP_PORT, HTTP_L7_PORT][..], Some(H2_PORT)),
            (&web2, &[HTTP_L7_PORT][..], None),
            (&web2_tls, &[HTTP_L7_PORT][..], None),
        ] {
            let nginx_dir = dir.join(format!("nginx-{}", pod.name()));
            std::fs::create_dir_all(&nginx_dir)?;
            let conf = nginx_dir.join("nginx.conf");
            std::fs::write(&conf, nginx_conf_text(&nginx_dir, ports, h2))?;
            let nginx = tb.spawn(
                &format!("nginx-{}", pod.name()),
                pod.command("nginx").arg("-c").arg(&conf),
            )?;
            nginx.wait_listening(ports[0], Duration::from_secs(10))?;
            servers.push(nginx);
        }
        let iperf = tb.spawn(
            "iperf3",
            server
                .command("iperf3")
                .args(["-s", "-p", &BULK_PORT.to_string()]),
        )?;
        iperf.wait_listening(BULK_PORT, Duration::from_secs(10))?;
        servers.push(iperf);
        let grpc = tb.spawn(
            "grpc-server",
            server
                .command(python)
                .arg(workspace_root().join("tests/grpc/color_grpc.py"))
                .args(["serve", "--port", &GRPC_PORT.to_string(), "--name", "web"]),
        )?;
        grpc.wait_listening(GRPC_PORT, Duration::from_secs(20))?;
        servers.push(grpc);

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
        let mut sidecar_in = Vec::new();
        for (pod, app_port) in [(&server, HTTP_PORT), (&web2, HTTP_L7_PORT)] {
            let conf = dir.join(format!("haproxy-in-{}.cfg", pod.name()));
            std::fs::write(&conf, haproxy_inbound(&pem, app_port))?;
            let sidecar = tb.spawn(
                &format!("sidecar-in-{}", pod.name()),
                pod.command("haproxy").args(["-db", "-f"]).arg(&conf),
            )?;
            sidecar.wait_listening(SIDECAR_IN_PORT, Duration::from_secs(10))?;
            sidecar_in.push(sidecar);
        }
        let outbound = dir.join("haproxy-out.cfg");
        std::fs::write(
            &outbound,
            haproxy_outbound(server.ipv4().into(), web2.ipv4().into()),
        )?;
        let sidecar_out = tb.spawn(
            "sidecar-out",
            client.command("haproxy").args(["-db", "-f"]).arg(&outbound),
        )?;
        sidecar_out.wait_listening(SIDECAR_OUT_PORT, Duration::from_secs(10))?;
        let [sidecar_in_web, sidecar_in_web2]: [Process; 2] = sidecar_in
            .try_into()
            .map_err(|_| anyhow::anyhow!("BUG: two inbound sidecars"))?;

        // The mesh, its certificates (`strait ca`), the workloads, node2's agent.
        let mesh_dir = dir.join("mesh");
        let certs = dir.join("certs");
        let ca = dir.join("ca");
        std::fs::create_dir_all(&mesh_dir)?;
        let mesh = mesh_dir.join("mesh.yaml");
        std::fs::write(&mesh, scenario::mesh_yaml(&certs))?;
        strait_ok(&node1, &["ca", "init", "--dir", &ca.display().to_string()])?;
        strait_ok(
            &node1,
            &[
                "ca",
                "issue",
                "--mesh",
                &mesh.display().to_string(),
                "--ca-dir",
                &ca.display().to_string(),
            ],
        )?;
        node1.write_workload(&client)?;
        node1.write_workload(&server)?;
        node2.write_workload(&web2)?;
        node2.write_workload(&web2_tls)?;
        let agent2 = Agent::start(&tb, &node2, &mesh, &as_strs(&peer_args(&node1)))?;
        for pod in ["bench/web2", "bench/web2-tls"] {
            agent2.wait_enrolled(pod, true, Duration::from_secs(20))?;
        }
        Ok(Env {
            tb,
            node1,
            node2,
            client,
            server,
            web2,
            _web2_tls: web2_tls,
            mesh,
            xtask: bin.xtask.clone(),
            agent2,
            sidecars: [sidecar_out, sidecar_in_web, sidecar_in_web2],
            _servers: servers,
        })
    }

    /// node1's agent with `flags`.
    fn start_agent(&self, flags: AgentFlags) -> anyhow::Result<Agent> {
        let mut args = vec![
            "--fast-path".to_owned(),
            if flags.fast_path { "on" } else { "off" }.to_owned(),
        ];
        if let Some(on) = flags.telemetry {
            args.extend([
                "--telemetry".to_owned(),
                if on { "on" } else { "off" }.to_owned(),
            ]);
        }
        args.extend(peer_args(&self.node2));
        let agent = Agent::start(&self.tb, &self.node1, &self.mesh, &as_strs(&args))?;
        for pod in ["bench/client", "bench/web"] {
            agent.wait_enrolled(pod, true, Duration::from_secs(10))?;
        }
        Ok(agent)
    }

    /// The two sidecars a request passes on its way.
    fn sidecar_pids(&self, topology: Topology) -> Vec<u32> {
        let [out, in_web, in_web2] = &self.sidecars;
        let inbound = match topology {
            Topology::SameNode => in_web,
            Topology::CrossNode => in_web2,
        };
        vec![out.pid(), inbound.pid()]
    }

    /// The client's destination for a scenario.
    fn target(&self, s: &Scenario) -> SocketAddr {
        let vip = |v: &str| -> IpAddr { v.parse().expect("valid address literal") };
        let workload_port = match s.workload {
            Workload::Http1 | Workload::Http1Throughput => HTTP_PORT,
            Workload::TcpBulk => BULK_PORT,
            Workload::Http2 => H2_PORT,
            Workload::GrpcUnary => GRPC_PORT,
        };
        match (s.topology, s.way) {
            (Topology::SameNode, Way::Direct) => {
                SocketAddr::new(self.server.ipv4().into(), workload_port)
            }
            (
                Topology::SameNode,
                Way::Strait {
                    listener_protocol, ..
                },
            ) => {
                let port = match listener_protocol {
                    "http" => HTTP_L7_PORT,
                    _ => workload_port,
                };
                SocketAddr::new(vip(SERVICE_V4), port)
            }
            (Topology::SameNode, Way::SidecarPair) => {
                SocketAddr::from(([127, 0, 0, 1], SIDECAR_OUT_PORT))
            }
            (Topology::CrossNode, Way::Direct) => {
                SocketAddr::new(self.web2.ipv4().into(), HTTP_L7_PORT)
            }
            (Topology::CrossNode, Way::Strait { mtls, .. }) => SocketAddr::new(
                vip(if mtls { SERVICE2_TLS_V4 } else { SERVICE2_V4 }),
                HTTP_L7_PORT,
            ),
            (Topology::CrossNode, Way::SidecarPair) => {
                SocketAddr::from(([127, 0, 0, 1], SIDECAR_OUT_XNODE_PORT))
            }
        }
    }

    /// RSS of an agent running the demo mesh (examples/demo/mesh.yaml), once ready and idle.
    fn demo_mesh_rss(&self) -> anyhow::Result<u64> {
        let demo = workspace_root().join("examples/demo/mesh.yaml");
        let agent = Agent::start(&self.tb, &self.node1, &demo, &[])?;
        std::thread::sleep(Duration::from_secs(2));
        let rss = proc_status_kib(agent.process.pid(), "VmRSS")?;
        agent.stop()?;
        Ok(rss)
    }
}

/// `--peer-node` arguments naming `other`'s pod subnets and underlay address.
fn peer_args(other: &Node) -> Vec<String> {
    vec![
        "--peer-node".into(),
        format!(
            "{}/24={}",
            addr::pod_subnet_v4(other.index()),
            other.underlay_ip()
        ),
        "--peer-node".into(),
        format!(
            "{}/64={}",
            addr::pod_subnet_v6(other.index()),
            other.underlay_ip()
        ),
    ]
}

fn as_strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn strait_ok(node: &Node, args: &[&str]) -> anyhow::Result<()> {
    let output = strait(node, args)?;
    if !output.status.success() {
        bail!(
            "strait {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

fn nginx_conf_text(dir: &Path, http1_ports: &[u16], h2_port: Option<u16>) -> String {
    let d = dir.display();
    let mut listen: String = http1_ports
        .iter()
        .map(|p| format!("        listen {p};\n"))
        .collect();
    if let Some(p) = h2_port {
        // Plaintext `http2` on a listen line is HTTP/2 with prior knowledge (h2c).
        listen.push_str(&format!("        listen {p} http2;\n"));
    }
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
    http2_max_requests 10000000;
    server {{
{listen}        location / {{ return 200 "hello from the strait bench\n"; }}
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

fn haproxy_inbound(pem: &Path, app_port: u16) -> String {
    format!(
        "{HAPROXY_COMMON}frontend inbound\n    bind :{SIDECAR_IN_PORT} ssl crt {}\n    default_backend app\nbackend app\n    http-reuse always\n    server app 127.0.0.1:{app_port}\n",
        pem.display()
    )
}

fn haproxy_outbound(server: IpAddr, xnode_server: IpAddr) -> String {
    format!(
        "{HAPROXY_COMMON}frontend outbound\n    bind 127.0.0.1:{SIDECAR_OUT_PORT}\n    default_backend peer\nbackend peer\n    http-reuse always\n    server peer {server}:{SIDECAR_IN_PORT} ssl verify none\n\
         frontend outbound-xnode\n    bind 127.0.0.1:{SIDECAR_OUT_XNODE_PORT}\n    default_backend peer-xnode\nbackend peer-xnode\n    http-reuse always\n    server peer {xnode_server}:{SIDECAR_IN_PORT} ssl verify none\n"
    )
}

/// Runs one scenario once; returns its sample (a JSON object of numbers).
fn measure(env: &Env, plan: &Plan, s: &Scenario, proxy_pids: &[u32]) -> anyhow::Result<Value> {
    let target = env.target(s);
    let rates = s.rates(&plan.rates);
    match s.workload {
        Workload::Http1 | Workload::Http1Throughput => {
            let latency = fixed_rate(env, plan, target, "http1", &rates, plan.connections)?;
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
            if requests == 0 || text.contains("Non-2xx") || text.contains("Socket errors") {
                bail!("wrk saw errors:\n{text}");
            }
            throughput_sample(latency, rps, requests, cpu_after - cpu_before, proxy_pids)
        }
        Workload::Http2 => {
            let latency = fixed_rate(env, plan, target, "http2", &rates, plan.h2_connections)?;
            let cpu_before = cpu_ticks(proxy_pids)?;
            let output = run_ok(
                env.client
                    .command("h2load")
                    .args(["-t1", "-c", &plan.h2_connections.to_string()])
                    .args(["-m", &plan.h2_streams.to_string()])
                    .args(["-D", &plan.throughput_seconds.to_string()])
                    .arg(format!("http://{target}/")),
                Duration::from_secs(u64::from(plan.throughput_seconds) + 60),
            )?;
            let cpu_after = cpu_ticks(proxy_pids)?;
            let text = String::from_utf8_lossy(&output.stdout);
            let (rps, requests, failed) = parse_h2load(&text)?;
            if requests == 0 || failed > 0 {
                bail!("h2load saw {failed} failed or errored requests:\n{text}");
            }
            throughput_sample(latency, rps, requests, cpu_after - cpu_before, proxy_pids)
        }
        Workload::GrpcUnary => {
            let latency = fixed_rate(env, plan, target, "grpc", &rates, plan.h2_connections)?;
            Ok(json!({ "latency": latency, "proxy_rss_kib": rss_sum(proxy_pids)? }))
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

/// The load generator in the client pod at each rate; rate -> its report.
fn fixed_rate(
    env: &Env,
    plan: &Plan,
    target: SocketAddr,
    protocol: &str,
    rates: &[u32],
    connections: u32,
) -> anyhow::Result<serde_json::Map<String, Value>> {
    let mut latency = serde_json::Map::new();
    for &rate in rates {
        let output = run_ok(
            env.client
                .command(&env.xtask)
                .args(["bench", "load-gen", "--target", &target.to_string()])
                .args(["--protocol", protocol])
                .args(["--rate", &rate.to_string()])
                .args(["--seconds", &plan.latency_seconds.to_string()])
                .args(["--connections", &connections.to_string()]),
            Duration::from_secs_f64(plan.latency_seconds + 60.0),
        )?;
        let report: load::LoadReport =
            serde_json::from_slice(&output.stdout).context("load generator report")?;
        latency.insert(rate.to_string(), serde_json::to_value(report)?);
    }
    Ok(latency)
}

fn throughput_sample(
    latency: serde_json::Map<String, Value>,
    rps: f64,
    requests: u64,
    cpu_ticks: u64,
    proxy_pids: &[u32],
) -> anyhow::Result<Value> {
    let cpu_seconds = cpu_ticks as f64 / clock_ticks();
    Ok(json!({
        "latency": latency,
        "rps": rps,
        "requests": requests,
        "proxy_cpu_seconds_per_1000": (!proxy_pids.is_empty() && requests > 0)
            .then(|| cpu_seconds / requests as f64 * 1000.0),
        "proxy_rss_kib": rss_sum(proxy_pids)?,
    }))
}

/// Requests per second, requests done and requests failed or errored, from h2load's output.
fn parse_h2load(text: &str) -> anyhow::Result<(f64, u64, u64)> {
    // finished in 5.00s, 31034.20 req/s, 1.07MB/s
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|v| v.strip_suffix(" req/s"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("no req/s in h2load's output:\n{text}"))?;
    // requests: 155171 total, 155171 started, 155171 done, 155171 succeeded, 0 failed, 0 errored, 0 timeout
    let counts = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("requests: "))
        .with_context(|| format!("no request counts in h2load's output:\n{text}"))?;
    let count = |what: &str| -> u64 {
        counts
            .split(", ")
            .find_map(|c| c.strip_suffix(what)?.trim().parse().ok())
            .unwrap_or(0)
    };
    Ok((
        rps,
        count(" succeeded"),
        count(" failed") + count(" errored"),
    ))
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
        "h2load": tool("h2load", "--version"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h2load_output_is_parsed() {
        let text = "finished in 5.00s, 31034.20 req/s, 1.07MB/s\nrequests: 155171 total, 155171 started, 155171 done, 155100 succeeded, 71 failed, 0 errored, 0 timeout\n";
        assert_eq!(parse_h2load(text).unwrap(), (31034.2, 155100, 71));
    }

    #[test]
    fn wrk_output_is_parsed() {
        let text = "Running 5s test @ http://10.0.0.1:8080/\n  1 threads and 32 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency   1.00ms  0.20ms   3.00ms   90.00%\n  50000 requests in 5.00s, 9.00MB read\nRequests/sec:  10000.50\nTransfer/sec:      1.80MB\n";
        assert_eq!(parse_wrk(text).unwrap(), (10000.5, 50000));
    }
}
