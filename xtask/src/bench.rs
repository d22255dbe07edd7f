//! `cargo xtask bench`: what strait costs, against no mesh and against per-pod sidecars, on
//! a testbed on this machine, in one command.
//!
//! Two testbed nodes. node1 has a client pod and a server pod (nginx for HTTP/1.1 and HTTP/2,
//! iperf3 for bulk, a Python grpcio server, an HAProxy sidecar in each pod, with TLS between
//! them and without); node2 has two server pods (nginx; one behind STRICT mTLS `http` and
//! `tcp` listeners, one with an HAProxy sidecar). Both nodes run an agent (`--peer-node` for each other, certificates from
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

//!
//! This file is the orchestration (arguments, plan, rounds, the samples of one scenario); the
//! testbed is [`environment`], the outside tools [`tools`], the /proc readings [`procfs`].

mod allocator;
mod busy;
mod environment;
mod hold;
mod load;
mod paired;
mod procfs;
mod report;
mod scale;
mod scenario;
mod soak;
mod tools;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use testbed::agent::Agent;
use testbed::{run, run_ok};

use self::environment::Env;
use self::procfs::{CpuTicks, clock_ticks, cpu_ticks, loadavg, machine_busy_ticks, rss_sum};
use self::scenario::{Scenario, Topology, Way, Workload};
use self::tools::{machine, python_with_grpcio};
use crate::{cargo, ebpf, workspace_root};

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
    /// "Soak" section); `allocator` the system allocator against jemalloc
    /// (xtask/src/bench/allocator.rs: docs/benchmarks/allocator.json, the "Allocator" section);
    /// `paired` this build against `--baseline-agent` in alternating wrk bursts on a testbed of
    /// its own, same node (xtask/src/bench/paired.rs: docs/benchmarks/paired.json and
    /// docs/benchmarks-paired.md); `paired-xnode` the same across nodes through the mTLS
    /// tunnel (docs/benchmarks/paired-xnode.json and docs/benchmarks-paired-xnode.md).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Use the debug build of the agent and of this xtask (`scale` and `soak` only): for their
    /// countable figures where a release build is out of reach. The results and the page say
    /// which build ran.
    #[arg(long)]
    debug_build: bool,
    /// A full run of the scenarios (docs/benchmarks.md and results.json) without the scale,
    /// soak and allocator suites, which take longer than the scenarios together: their sections
    /// keep the raw results of their last runs, and each says when that was.
    #[arg(long, conflicts_with = "only")]
    no_suites: bool,
    /// With `--only` (scenarios, not suites): also run every scenario with this agent binary
    /// (the code before a change, built beforehand), alternating with this build's agent in
    /// every round (both halves of a round run every scenario, in turns). Its samples go to
    /// docs/benchmarks/partial-before.json, and the partial page compares the two.
    #[arg(long)]
    baseline_agent: Option<PathBuf>,
    /// `--only paired` or `paired-xnode`: pairs of wrk bursts per phase (two phases; the builds
    /// swap nodes between them).
    #[arg(long, default_value_t = 15)]
    bursts: u32,
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
    /// (internal) keeps one CPU busy: a busy node's other pods.
    #[command(hide = true)]
    Spin(busy::SpinArgs),
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
    worker_slice_us: Option<u32>,
    nice: Option<i32>,
}

pub fn run_bench(args: &BenchArgs) -> anyhow::Result<()> {
    match &args.internal {
        Some(Internal::LoadGen(load)) => return load::run(load),
        Some(Internal::HoldConns(hold)) => return hold::run(hold),
        Some(Internal::Spin(spin)) => return busy::spin(spin),
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
    // Like `cargo xtask demo` and `test`: the load generators, servers and sidecars first
    // (only what is missing is installed).
    crate::setup::setup()?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| workspace_root().join("docs"));
    let wants = |suite: &str| {
        !args.no_suites && (args.only.is_empty() || args.only.iter().any(|id| id == suite))
    };
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
    let run_suites = |binaries: &Binaries| -> anyhow::Result<()> {
        if wants(SOAK) || wants(ALLOCATOR) {
            // The soak's HTTP servers are the testbed's strait-http, from the debug build.
            crate::build_testbed_binaries()?;
        }
        if wants(SCALE) {
            run_scale(binaries, &out, args.quick)?;
        }
        if wants(SOAK) {
            run_soak(binaries, &out, args.soak_seconds)?;
        }
        if wants(ALLOCATOR) {
            run_allocator(binaries, &out, &plan, args.soak_seconds)?;
        }
        Ok(())
    };
    if let Some(layout) = paired::LAYOUTS
        .into_iter()
        .find(|layout| args.only.iter().any(|id| id == layout.id()))
    {
        let id = layout.id();
        anyhow::ensure!(
            args.only.len() == 1,
            "--only {id} runs on a testbed of its own: name nothing else with it"
        );
        let baseline = baseline_agent(args)?.with_context(|| {
            format!("--only {id} compares two builds: name the other with --baseline-agent")
        })?;
        anyhow::ensure!(args.bursts > 0, "--bursts must be at least 1");
        let binaries = build()?;
        let raw = paired::run(layout, &binaries.strait, baseline, args.bursts)?;
        write_raw(&out.join(layout.raw()), &raw)?;
        return report::render(&out);
    }
    if !args.only.is_empty() && args.only.iter().all(|id| SUITES.contains(&id.as_str())) {
        if args.debug_build && wants(ALLOCATOR) {
            bail!(
                "--debug-build is for `--only scale,soak`; the allocator comparison needs the \
                 release build"
            );
        }
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
    tools::require_all()?;
    let python = python_with_grpcio()?;
    let only: Vec<String> = args
        .only
        .iter()
        .filter(|id| !SUITES.contains(&id.as_str()))
        .cloned()
        .collect();
    let binaries = build()?;
    let this_build = AgentBuild::of(&binaries.strait);
    let telemetry_switch = this_build.takes_telemetry;
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
    if args.baseline_agent.is_some() && only.is_empty() {
        bail!("--baseline-agent compares a partial run: name its scenarios with --only");
    }
    // The halves of a round: this build's agent, and the baseline's if there is one.
    let worker_threads = |strait: &Path| {
        agent_takes(strait, "--worker-threads").then_some(environment::NODE_WORKER_THREADS)
    };
    let mut builds = vec![this_build];
    if let Some(baseline) = baseline_agent(args)? {
        builds.push(AgentBuild::of(baseline));
    }
    let mut samples: BTreeMap<&'static str, Vec<Value>> = BTreeMap::new();
    let mut before: BTreeMap<&'static str, Vec<Value>> = BTreeMap::new();
    let mut env = env;
    let mut agent: Option<(Agent, AgentFlags)> = None;
    for round in 0..plan.rounds {
        // Which build goes first alternates between rounds, so neither is always the one that
        // runs on a machine still busy from the other.
        let mut halves: Vec<usize> = (0..builds.len()).collect();
        if round % 2 == 1 {
            halves.reverse();
        }
        for half in halves {
            let AgentBuild {
                binary,
                takes_telemetry,
                takes_worker_slice,
            } = &builds[half];
            let is_baseline = half == 1;
            if builds.len() > 1 {
                // SAFETY (of the environment): single-threaded here; testbed::agent reads
                // STRAIT_BIN when it starts an agent.
                unsafe { std::env::set_var("STRAIT_BIN", binary) };
                if let Some((old, _)) = agent.take() {
                    old.stop()?;
                }
                env.restart_agent2()?;
                eprintln!(
                    "bench: round {}/{}: the {} agent ({})",
                    round + 1,
                    plan.rounds,
                    if is_baseline { "baseline" } else { "built" },
                    binary.display()
                );
            }
            let samples = if is_baseline {
                &mut before
            } else {
                &mut samples
            };
            for s in round_order(&scenarios, round) {
                let mut proxy_pids = Vec::new();
                if let Way::Strait {
                    fast_path,
                    telemetry,
                    worker_slice_us,
                    nice,
                    ..
                } = s.way
                {
                    let unavailable = if telemetry.is_some() && !takes_telemetry {
                        Some("`strait run --telemetry` is not available in this build")
                    } else if worker_slice_us.is_some() && !takes_worker_slice {
                        Some("`strait run --worker-slice-us` is not available in this build")
                    } else {
                        None
                    };
                    if let Some(unavailable) = unavailable {
                        samples
                            .entry(s.id)
                            .or_default()
                            .push(json!({ "unavailable": unavailable }));
                        continue;
                    }
                    let flags = AgentFlags {
                        fast_path,
                        telemetry,
                        worker_slice_us,
                        nice,
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
                } else if matches!(s.way, Way::SidecarPair { .. }) {
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
    }
    // With a baseline the last agent may be the baseline's: its counters would mislead.
    let fast_counters = match &agent {
        Some((a, _)) if builds.len() == 1 => a.counters().unwrap_or(Value::Null),
        _ => Value::Null,
    };
    if let Some((a, _)) = agent.take() {
        a.stop()?;
    }
    // The demo mesh's RSS is this build's.
    // SAFETY (of the environment): single-threaded here, as above.
    unsafe { std::env::set_var("STRAIT_BIN", &binaries.strait) };
    let demo_rss = env.demo_mesh_rss()?;
    if let Some(baseline) = builds.get(1) {
        report::write_before(
            &out,
            &report::Results {
                plan: plan.clone(),
                machine: machine(),
                only: only.clone(),
                scenarios: scenarios.clone(),
                samples: before,
                demo_mesh_agent_rss_kib: demo_rss,
                fast_path_counters: Value::Null,
                telemetry_switch: baseline.takes_telemetry,
                agent_worker_threads: args.baseline_agent.as_deref().and_then(worker_threads),
            },
        )?;
    }
    let results = report::Results {
        plan: plan.clone(),
        machine: machine(),
        only,
        scenarios,
        samples,
        demo_mesh_agent_rss_kib: demo_rss,
        fast_path_counters: fast_counters,
        telemetry_switch,
        agent_worker_threads: worker_threads(&binaries.strait),
    };
    if builds.len() == 1 && !results.only.is_empty() {
        report::forget_before(&out)?;
    }
    report::write(&out, &results)?;
    println!("{}", report::summary(&results));
    drop(env);
    run_suites(&binaries)
}

/// `--baseline-agent`, checked to be a file.
fn baseline_agent(args: &BenchArgs) -> anyhow::Result<Option<&Path>> {
    let Some(baseline) = &args.baseline_agent else {
        return Ok(None);
    };
    anyhow::ensure!(
        baseline.is_file(),
        "--baseline-agent {}: no such file",
        baseline.display()
    );
    Ok(Some(baseline))
}

/// The `--only` ids of the scale suite, of the soak and of the allocator comparison.
const SCALE: &str = "scale";
const SOAK: &str = "soak";
const ALLOCATOR: &str = "allocator";
const SUITES: [&str; 3] = [SCALE, SOAK, ALLOCATOR];

/// Runs the soak, writes its raw results and regenerates the pages and plots.
fn run_soak(binaries: &Binaries, out: &Path, seconds: u64) -> anyhow::Result<()> {
    let mut raw = soak::run(&binaries.strait, &binaries.xtask, seconds)?;
    raw["agent_build"] = json!(binaries.profile);
    raw["allocator"] = json!("system");
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

/// Runs the allocator comparison (its soak as long as the soak), writes its raw results and
/// regenerates the pages.
fn run_allocator(
    binaries: &Binaries,
    out: &Path,
    plan: &Plan,
    soak_seconds: u64,
) -> anyhow::Result<()> {
    tools::require_all()?;
    let python = python_with_grpcio()?;
    let raw = allocator::run(binaries, &python, plan, soak_seconds)?;
    write_raw(&out.join(allocator::RAW), &raw)?;
    report::render(out)
}

/// Runs the scale suite, writes its raw results and regenerates the pages.
fn run_scale(binaries: &Binaries, out: &Path, quick: bool) -> anyhow::Result<()> {
    let mut raw = scale::run(&binaries.strait, &binaries.xtask, quick)?;
    raw["agent_build"] = json!(binaries.profile);
    write_raw(&out.join(scale::RAW), &raw)?;
    report::render(out)
}

/// The testbeds to tear down on Ctrl-C (one handler for the process, for every testbed the
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

/// One agent binary the bench runs, and which of the flags that came later it takes.
struct AgentBuild {
    binary: PathBuf,
    takes_telemetry: bool,
    takes_worker_slice: bool,
}

impl AgentBuild {
    fn of(binary: &Path) -> Self {
        Self {
            binary: binary.to_path_buf(),
            takes_telemetry: agent_takes(binary, "--telemetry"),
            takes_worker_slice: agent_takes(binary, "--worker-slice-us"),
        }
    }
}

/// Does the agent binary `strait` take `flag` (`strait run --telemetry`, ...)? An agent from
/// before a flag (a `--baseline-agent`) runs without it.
pub(super) fn agent_takes(strait: &Path, flag: &str) -> bool {
    run(
        Command::new(strait).args(["run", "--help"]),
        Duration::from_secs(10),
    )
    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(flag))
}

/// Runs one scenario once; returns its sample (a JSON object of numbers).
fn measure(env: &Env, plan: &Plan, s: &Scenario, proxy_pids: &[u32]) -> anyhow::Result<Value> {
    let target = env.target(s);
    let rates = s.rates(&plan.rates);
    match s.workload {
        Workload::Http1 | Workload::Http1Throughput => {
            let latency = fixed_rate(env, plan, target, "http1", &rates, plan.connections)?;
            let ((rps, requests), cpu) = Cpu::during(proxy_pids, || {
                tools::wrk(&env.client, target, plan.throughput_seconds)
            })?;
            throughput_sample(latency, rps, requests, cpu, proxy_pids)
        }
        Workload::Http2 => {
            let latency = fixed_rate(env, plan, target, "http2", &rates, plan.h2_connections)?;
            let ((rps, requests), cpu) = Cpu::during(proxy_pids, || {
                tools::h2load(
                    &env.client,
                    target,
                    plan.h2_connections,
                    plan.h2_streams,
                    plan.throughput_seconds,
                )
            })?;
            throughput_sample(latency, rps, requests, cpu, proxy_pids)
        }
        Workload::Http1BusyNode => {
            let runs = plan.latency_seconds * rates.len() as f64;
            let _neighbours =
                busy::Neighbours::start(&env.xtask, Duration::from_secs_f64(runs + 120.0))?;
            let latency = fixed_rate(env, plan, target, "http1", &rates, plan.connections)?;
            Ok(json!({ "latency": latency, "proxy_rss_kib": rss_sum(proxy_pids)? }))
        }
        Workload::GrpcUnary => {
            let latency = fixed_rate(env, plan, target, "grpc", &rates, plan.h2_connections)?;
            Ok(json!({ "latency": latency, "proxy_rss_kib": rss_sum(proxy_pids)? }))
        }
        Workload::TcpBulk => {
            let ((bps, bytes), cpu) = Cpu::during(proxy_pids, || {
                tools::iperf3(&env.client, target, plan.bulk_seconds)
            })?;
            let cpu_seconds = cpu.proxies.total() as f64 / clock_ticks();
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

/// CPU used during a throughput run, in clock ticks.
struct Cpu {
    /// By the proxies on the path, together.
    proxies: CpuTicks,
    /// By the busiest of them (an agent's worker threads cap its own share).
    busiest: u64,
    /// By the whole machine (every process, and softirq work charged to none).
    machine: u64,
}

impl Cpu {
    /// What `run` returns, and the CPU used while it ran.
    fn during<T>(
        proxy_pids: &[u32],
        run: impl FnOnce() -> anyhow::Result<T>,
    ) -> anyhow::Result<(T, Cpu)> {
        let each = || -> anyhow::Result<Vec<CpuTicks>> {
            proxy_pids.iter().map(|&pid| cpu_ticks(&[pid])).collect()
        };
        let (before, busy_before) = (each()?, machine_busy_ticks()?);
        let out = run()?;
        let used: Vec<CpuTicks> = each()?
            .into_iter()
            .zip(before)
            .map(|(after, before)| after - before)
            .collect();
        let cpu = Cpu {
            proxies: used.iter().fold(CpuTicks::default(), |sum, &u| sum + u),
            busiest: used.iter().map(|u| u.total()).max().unwrap_or(0),
            machine: machine_busy_ticks()?.saturating_sub(busy_before),
        };
        Ok((out, cpu))
    }
}

fn throughput_sample(
    latency: serde_json::Map<String, Value>,
    rps: f64,
    requests: u64,
    cpu: Cpu,
    proxy_pids: &[u32],
) -> anyhow::Result<Value> {
    let per_1000 = |ticks: u64| {
        (requests > 0).then(|| ticks as f64 / clock_ticks() / requests as f64 * 1000.0)
    };
    let proxies_per_1000 = |ticks: u64| per_1000(ticks).filter(|_| !proxy_pids.is_empty());
    Ok(json!({
        "latency": latency,
        "rps": rps,
        "requests": requests,
        "proxy_cpu_seconds_per_1000": proxies_per_1000(cpu.proxies.total()),
        // Its parts in user space and in the kernel (see `CpuTicks`).
        "proxy_user_cpu_seconds_per_1000": proxies_per_1000(cpu.proxies.user),
        "proxy_kernel_cpu_seconds_per_1000": proxies_per_1000(cpu.proxies.kernel),
        "busiest_proxy_cpu_seconds_per_1000": proxies_per_1000(cpu.busiest),
        "machine_cpu_seconds_per_1000": per_1000(cpu.machine),
        "proxy_rss_kib": rss_sum(proxy_pids)?,
    }))
}
