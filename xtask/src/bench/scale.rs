//! The scale suite (`cargo xtask bench --only scale`, also part of a full run): what an agent
//! costs per enrolled pod and per idle connection, counted rather than timed, so that a busy
//! machine changes little of it.
//!
//! One node. Three ordinary pods (a client, an echo server behind a `tcp` listener and an HTTP
//! server behind an `http` listener, each reached through a virtual service) and
//! [`Plan::pods`]'s largest step of bare pods
//! (`Node::add_bare_pod`: a network namespace with its loopback and a cgroup; the agent sets
//! them up in full: listeners, inbound capture, sk_lookup, cgroup), all created before the
//! agent starts. Then:
//! 1. pods: workload files are written step by step up to 10, 250 and 1,000 enrolled pods;
//!    the time until the agent reports the step's pods enrolled, and then (after a settling
//!    pause) its RSS, descriptors (by kind) and threads;
//! 2. idle CPU with every pod enrolled: the agent's CPU time over [`Plan::idle_seconds`];
//! 3. idle connections, on a fresh agent with the bare pods gone: the client opens as many
//!    idle L4 connections through the agent as the descriptor limit lets the agent hold (two
//!    descriptors each), up to 10,000; agent RSS and descriptors before and with them open;
//! 4. idle HTTP/1.1 keep-alive connections, the same way on another fresh agent: each carries
//!    one GET through the `http` listener, then idles (for a moment the agent keeps the
//!    upstream connection that carried it with the client's connection, so it makes room for
//!    two descriptors each here too).
//!
//! Idle connections are read [`Plan::idle_settle_seconds`] after they are all open.
//!
//! Raw results go to docs/benchmarks/scale.json; docs/benchmarks.md's "Scale" section is
//! generated from it ([`markdown`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use testbed::{PodSpec, Testbed};

/// The raw results' file, under the output folder.
pub const RAW: &str = "benchmarks/scale.json";

const SERVICE: &str = "echo.scale.svc.cluster.local";
const SERVICE_V4: &str = "10.96.0.40";
const ECHO_PORT: u16 = 9000;
/// The bare pods' listener (captured inbound, as a pod with a `tcp` listener has).
const BARE_PORT: u16 = 8080;
const WEB_SERVICE: &str = "web.scale.svc.cluster.local";
const WEB_SERVICE_V4: &str = "10.96.0.41";
const WEB_PORT: u16 = 9080;
const WEB2_SERVICE: &str = "web2.scale.svc.cluster.local";
const WEB2_SERVICE_V4: &str = "10.96.0.42";
const WEB2_PORT: u16 = 9082;
/// The pods besides the bare ones: a client, and a server behind a `tcp` listener, one behind
/// an `http` listener and one behind an `http2` listener.
const ORDINARY: [&str; 4] = ["scale/client", "scale/echo", "scale/web", "scale/web2"];

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Plan {
    /// Enrolled pods (the two ordinary ones included) at each step.
    pub pods: Vec<u32>,
    /// Idle connections wanted (fewer if the descriptor limit does not allow them).
    pub connections: u32,
    pub idle_seconds: u64,
    /// Pause after a step before reading the agent's figures.
    pub settle_seconds: u64,
    /// Pause after the idle connections are open before reading the agent's figures: long
    /// enough for the agent to give idle upstream connections to its shared pool (after 2 s)
    /// and to return freed heap to the kernel (at the first of its 10 s periods that was
    /// quiet, so up to 20 s after the opening's work), so that the reading is of connections
    /// that stay idle, not of the moment they opened.
    pub idle_settle_seconds: u64,
}

impl Plan {
    pub fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                pods: vec![10, 50],
                connections: 1000,
                idle_seconds: 5,
                settle_seconds: 2,
                idle_settle_seconds: 25,
            }
        } else {
            Plan {
                pods: vec![10, 250, 1000],
                connections: 10_000,
                idle_seconds: 30,
                settle_seconds: 5,
                idle_settle_seconds: 25,
            }
        }
    }
}

fn mesh_yaml() -> String {
    let header = r#"apiVersion: appmesh.k8s.aws/v1beta2
kind: Mesh
metadata: {name: scale}
spec: {egressFilter: {type: ALLOW_ALL}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {name: client, namespace: scale}
spec:
  podSelector: {matchLabels: {app: client}}
  backends:
    - virtualService: {virtualServiceRef: {name: echo}}
    - virtualService: {virtualServiceRef: {name: web}}
    - virtualService: {virtualServiceRef: {name: web2}}
"#;
    [
        header.to_owned(),
        server("echo", "scale", ECHO_PORT, "tcp"),
        server("web", "scale", WEB_PORT, "http"),
        server("web2", "scale", WEB2_PORT, "http2"),
        server("bare", "bare", BARE_PORT, "tcp"),
        service("echo", SERVICE),
        service("web", WEB_SERVICE),
        service("web2", WEB2_SERVICE),
    ]
    .join("---\n")
}

/// A virtual node for the pods labelled `app: <name>`, with one listener, whose endpoints
/// are `<name>-pods.<namespace>.svc.cluster.local`.
fn server(name: &str, namespace: &str, port: u16, protocol: &str) -> String {
    format!(
        r#"apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  podSelector: {{matchLabels: {{app: {name}}}}}
  listeners:
    - portMapping: {{port: {port}, protocol: {protocol}}}
  serviceDiscovery: {{dns: {{hostname: {name}-pods.{namespace}.svc.cluster.local}}}}
"#
    )
}

/// The virtual service `aws_name` of the `scale` namespace's virtual node `name`.
fn service(name: &str, aws_name: &str) -> String {
    format!(
        r#"apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {{name: {name}, namespace: scale}}
spec:
  awsName: {aws_name}
  provider: {{virtualNode: {{virtualNodeRef: {{name: {name}}}}}}}
"#
    )
}

/// Runs the suite and returns its raw results.
pub fn run(strait: &Path, xtask: &Path, quick: bool) -> anyhow::Result<Value> {
    let plan = Plan::new(quick);
    // SAFETY (of the environment): single-threaded here; testbed::agent reads STRAIT_BIN.
    unsafe { std::env::set_var("STRAIT_BIN", strait) };
    let tb = Testbed::new("scale")?;
    super::environment::on_interrupt_clean(&tb);
    let node = tb.add_node("node1")?;
    let client = node.add_pod(&PodSpec::new("client", "scale").label("app", "client"))?;
    let echo = node.add_pod(&PodSpec::new("echo", "scale").label("app", "echo"))?;
    let web = node.add_pod(&PodSpec::new("web", "scale").label("app", "web"))?;
    let web2 = node.add_pod(&PodSpec::new("web2", "scale").label("app", "web2"))?;
    tb.dns_record(SERVICE, &[SERVICE_V4.parse()?])?;
    tb.dns_record("echo-pods.scale.svc.cluster.local", &[echo.ipv4().into()])?;
    tb.dns_record(WEB_SERVICE, &[WEB_SERVICE_V4.parse()?])?;
    tb.dns_record("web-pods.scale.svc.cluster.local", &[web.ipv4().into()])?;
    tb.dns_record(WEB2_SERVICE, &[WEB2_SERVICE_V4.parse()?])?;
    tb.dns_record("web2-pods.scale.svc.cluster.local", &[web2.ipv4().into()])?;
    // The bare pods' addresses exist nowhere; one of them stands for their endpoints.
    tb.dns_record("bare-pods.bare.svc.cluster.local", &["10.250.0.0".parse()?])?;
    let most = plan.pods.iter().copied().max().unwrap_or(2);
    let labels = BTreeMap::from([("app".to_owned(), "bare".to_owned())]);
    let created = Instant::now();
    let bare = (0..most.saturating_sub(ORDINARY.len() as u32))
        .map(|n| node.add_bare_pod(u16::try_from(n)?, &labels))
        .collect::<anyhow::Result<Vec<_>>>()?;
    eprintln!(
        "bench: scale: {} bare pods created in {:.0?}",
        bare.len(),
        created.elapsed()
    );
    let dir = tb.temp_dir().join("scale");
    std::fs::create_dir_all(&dir)?;
    let mesh = dir.join("mesh.yaml");
    std::fs::write(&mesh, mesh_yaml())?;
    for pod in [&client, &echo, &web, &web2] {
        node.write_workload(pod)?;
    }
    let agent = super::environment::start_agent_as_deployed(&tb, &node, &mesh, &[])?;
    for pod in ORDINARY {
        agent.wait_enrolled(pod, true, Duration::from_secs(30))?;
    }
    let pid = agent.process.pid();
    std::thread::sleep(Duration::from_secs(plan.settle_seconds));

    // 1. Pods, step by step.
    let mut steps = Vec::new();
    let mut written = 0usize;
    for &target in &plan.pods {
        let want = (target as usize)
            .saturating_sub(ORDINARY.len())
            .min(bare.len());
        let started = Instant::now();
        let batch = want - written;
        for workload in &bare[written..want] {
            node.write_workload_file(workload)?;
        }
        written = want;
        let deadline = started + Duration::from_secs(600);
        loop {
            let enrolled = agent
                .workloads()?
                .iter()
                .filter(|w| w["enrolled"] == true)
                .count();
            if enrolled >= target as usize {
                break;
            }
            if Instant::now() > deadline {
                bail!("only {enrolled} of {target} pods enrolled after 600 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let enroll_seconds = started.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_secs(plan.settle_seconds));
        let step = json!({
            "pods": target,
            "enrolled_now": batch,
            "enroll_seconds": enroll_seconds,
            "agent": figures(pid)?,
        });
        eprintln!("bench: scale: {step}");
        steps.push(step);
    }

    // 2. Idle CPU with every pod enrolled.
    let ticks = super::procfs::cpu_ticks(&[pid])?;
    let idle_started = Instant::now();
    std::thread::sleep(Duration::from_secs(plan.idle_seconds));
    let cpu_seconds =
        (super::procfs::cpu_ticks(&[pid])? - ticks).total() as f64 / super::procfs::clock_ticks();
    let idle = json!({
        "pods": plan.pods.iter().max(),
        "seconds": idle_started.elapsed().as_secs_f64(),
        "cpu_seconds": cpu_seconds,
    });
    eprintln!("bench: scale: idle {idle}");
    agent.stop()?;
    for workload in &bare {
        std::fs::remove_file(node.workloads_dir().join(workload.file_name()))?;
    }
    // 3 and 4. Idle connections, each kind on a fresh agent with only the ordinary pods
    // enrolled: the most descriptors left, and no memory freed by the pods or by the other
    // kind's connections that a connection could reuse.
    let idle_run = |kind: Idle| -> anyhow::Result<Value> {
        let agent = super::environment::start_agent_as_deployed(&tb, &node, &mesh, &[])?;
        for pod in ORDINARY {
            agent.wait_enrolled(pod, true, Duration::from_secs(30))?;
        }
        std::thread::sleep(Duration::from_secs(plan.settle_seconds));
        let (server_pod, port, service) = match kind {
            Idle::Tcp => (&echo, ECHO_PORT, SERVICE_V4),
            Idle::Http => (&web, WEB_PORT, WEB_SERVICE_V4),
            Idle::Http2 => (&web2, WEB2_PORT, WEB2_SERVICE_V4),
        };
        let mut serve = vec![
            "bench".to_owned(),
            "hold-conns".to_owned(),
            "serve".to_owned(),
            "--listen".to_owned(),
            format!("0.0.0.0:{port}"),
        ];
        let mut connect = vec![
            "bench".to_owned(),
            "hold-conns".to_owned(),
            "connect".to_owned(),
            "--to".to_owned(),
            format!("{service}:{port}"),
        ];
        match kind {
            Idle::Tcp => {}
            Idle::Http => {
                serve.push("--http".to_owned());
                connect.extend(["--http-host".to_owned(), WEB_SERVICE.to_owned()]);
            }
            Idle::Http2 => {
                serve.push("--http2".to_owned());
                connect.extend(["--http2-host".to_owned(), WEB2_SERVICE.to_owned()]);
            }
        }
        let result = hold_idle(
            &tb,
            agent.process.pid(),
            server_pod,
            port,
            &client,
            xtask,
            &plan,
            &serve,
            &connect,
        );
        agent.stop()?;
        result
    };
    let connections = idle_run(Idle::Tcp)?;
    eprintln!("bench: scale: {connections}");
    let http_connections = idle_run(Idle::Http)?;
    eprintln!("bench: scale: http {http_connections}");
    let http2_connections = idle_run(Idle::Http2)?;
    eprintln!("bench: scale: http2 {http2_connections}");

    Ok(json!({
        "plan": plan,
        "machine": super::tools::machine(),
        "date": today(),
        "loadavg_1m": super::procfs::loadavg(),
        "connections": connections,
        "http_connections": http_connections,
        "http2_connections": http2_connections,
        "steps": steps,
        "idle": idle,
    }))
}

/// The kind of idle connection the client holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Idle {
    /// To a `tcp` listener, checked with a one-byte echo.
    Tcp,
    /// To an `http` listener, after one keep-alive GET.
    Http,
    /// To an `http2` listener, after one GET on the HTTP/2 connection.
    Http2,
}

/// Starts the server (`serve`, in its pod), opens as many idle connections as the agent's
/// descriptors allow from the client pod (`connect`, with `--count` added), and returns the agent's
/// figures before and with them open.
#[allow(clippy::too_many_arguments)]
fn hold_idle(
    tb: &Testbed,
    pid: u32,
    server_pod: &testbed::Pod,
    port: u16,
    client: &testbed::Pod,
    xtask: &Path,
    plan: &Plan,
    serve: &[String],
    connect: &[String],
) -> anyhow::Result<Value> {
    let server = tb.spawn("idle-server", server_pod.command(xtask).args(serve))?;
    server.wait_listening(port, Duration::from_secs(10))?;
    let before = figures(pid)?;
    let limit = fd_limit(pid)?;
    // Two descriptors a connection in the agent (the client's and the one it delivers on),
    // and room for what it has besides.
    let fit = limit.saturating_sub(before["fds"].as_u64().unwrap_or(0) + 500) / 2;
    let count = u64::from(plan.connections).min(fit);
    let holder = tb.spawn(
        "idle-connections",
        client
            .command(xtask)
            .args(connect)
            .args(["--count", &count.to_string()]),
    )?;
    let opened = Instant::now();
    let deadline = opened + Duration::from_secs(330);
    while !holder.stdout().contains("ready ") {
        if let Some(status) = holder.try_wait()? {
            bail!(
                "the connection holder exited ({status}) before its connections were open:\n{}",
                holder.stderr()
            );
        }
        if Instant::now() > deadline {
            bail!("the idle connections were not all open within 330 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let open_seconds = opened.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(plan.idle_settle_seconds));
    let with = figures(pid)?;
    holder.kill()?;
    server.kill()?;
    Ok(json!({
        "wanted": plan.connections,
        "count": count,
        "agent_fd_limit": limit,
        "open_seconds": open_seconds,
        "before": before,
        "open": with,
    }))
}

/// Today's date (UTC), for the page.
pub(super) fn today() -> String {
    testbed::run(
        std::process::Command::new("date").args(["-u", "+%Y-%m-%d"]),
        Duration::from_secs(5),
    )
    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    .unwrap_or_default()
}

/// The agent's resident memory, descriptors (by kind) and threads.
pub(super) fn figures(pid: u32) -> anyhow::Result<Value> {
    let rss = super::procfs::proc_status_kib(pid, "VmRSS")?;
    let threads = super::procfs::proc_status_kib(pid, "Threads")?;
    let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
    let dir = format!("/proc/{pid}/fd");
    for entry in std::fs::read_dir(&dir).with_context(|| format!("read {dir}"))? {
        let Ok(target) = std::fs::read_link(entry?.path()) else {
            continue; // closed meanwhile
        };
        *kinds.entry(fd_kind(&target.to_string_lossy())).or_default() += 1;
    }
    let fds: u64 = kinds.values().sum();
    Ok(json!({ "rss_kib": rss, "fds": fds, "fd_kinds": kinds, "threads": threads }))
}

/// What a descriptor is, without what differs between descriptors of one kind:
/// `socket`, `net` (a network namespace), `anon_inode:bpf-map`, a file's folder.
fn fd_kind(target: &str) -> String {
    if target.starts_with("socket:") {
        "socket".to_owned()
    } else if target.starts_with("net:") {
        "net namespace".to_owned()
    } else if let Some(anon) = target.strip_prefix("anon_inode:") {
        format!(
            "anon_inode:{}",
            anon.trim_start_matches('[').trim_end_matches(']')
        )
    } else if target.starts_with("pipe:") {
        "pipe".to_owned()
    } else {
        Path::new(target)
            .parent()
            .map_or_else(|| target.to_owned(), |p| format!("file in {}", p.display()))
    }
}

/// The agent's descriptor limit (it raises its soft limit to the hard one at start).
fn fd_limit(pid: u32) -> anyhow::Result<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        .context("no `Max open files` in /proc/PID/limits")
}

/// Kibibytes per unit between two readings, if there are units.
fn per(a: &Value, b: &Value, field: &str, units: f64) -> Option<f64> {
    let (a, b) = (a[field].as_f64()?, b[field].as_f64()?);
    (units > 0.0).then(|| (b - a) / units)
}

/// Agent RSS per enrolled pod, KiB, from the fewest pods to the most.
pub fn rss_per_pod(raw: &Value) -> Option<f64> {
    let steps = raw["steps"].as_array()?;
    let (first, last) = (steps.first()?, steps.last()?);
    let n = last["pods"].as_f64()? - first["pods"].as_f64()?;
    per(&first["agent"], &last["agent"], "rss_kib", n)
}

/// Agent RSS per idle connection of the kind `held` names in a scale run ("connections",
/// "http_connections", "http2_connections"), KiB.
pub fn rss_per_idle(raw: &Value, held: &str) -> Option<f64> {
    rss_per_held(&raw[held])
}

fn rss_per_held(c: &Value) -> Option<f64> {
    per(&c["before"], &c["open"], "rss_kib", c["count"].as_f64()?)
}

/// The "Scale" section of docs/benchmarks.md, from the raw results alone.
pub fn markdown(raw: &Value) -> String {
    let mut s = String::new();
    let load = raw["loadavg_1m"].as_f64().unwrap_or(f64::NAN);
    let _ = writeln!(
        s,
        "## Scale: pods and idle connections\n\n\
         From [benchmarks/scale.json](benchmarks/scale.json) (`cargo xtask bench --only scale{}`, \
         run on {}; {} agent build; load average {load:.1} at the start). These figures are \
         counts and memory, not times, and hold on a busy machine; the enroll times do not. \
         Pods are bare pods (their own network namespace and cgroup, set up in full by the \
         agent: listeners, inbound capture, sk_lookup, cgroup) beside a client and {} \
         server pods.\n",
        debug_flag(raw),
        raw["date"].as_str().unwrap_or("an unknown date"),
        raw["agent_build"].as_str().unwrap_or("an unknown"),
        if raw["http2_connections"].is_null() {
            "two"
        } else {
            "three"
        },
    );
    let steps = raw["steps"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(
        s,
        "| pods enrolled | enroll time per pod | agent RSS | RSS per pod since the previous step | open fds | fds per pod since the previous step | threads |\n|---|---|---|---|---|---|---|"
    );
    let mut previous: Option<&Value> = None;
    for step in &steps {
        let agent = &step["agent"];
        let pods = step["pods"].as_f64().unwrap_or(0.0);
        let added = step["enrolled_now"].as_f64().unwrap_or(0.0);
        let enroll = step["enroll_seconds"].as_f64().unwrap_or(f64::NAN);
        let (rss_per, fds_per) = match previous {
            Some(p) => {
                let n = pods - p["pods"].as_f64().unwrap_or(0.0);
                (
                    per(&p["agent"], agent, "rss_kib", n),
                    per(&p["agent"], agent, "fds", n),
                )
            }
            None => (None, None),
        };
        let _ = writeln!(
            s,
            "| {pods:.0} | {:.1} ms | {:.1} MB | {} | {} | {} | {} |",
            enroll * 1000.0 / added.max(1.0),
            agent["rss_kib"].as_f64().unwrap_or(f64::NAN) / 1024.0,
            rss_per.map_or("-".to_owned(), |v| format!("{v:.1} KiB")),
            agent["fds"],
            fds_per.map_or("-".to_owned(), |v| format!("{v:.2}")),
            agent["threads"],
        );
        previous = Some(step);
    }
    if let (Some(first), Some(last)) = (steps.first(), steps.last()) {
        let n = last["pods"].as_f64().unwrap_or(0.0) - first["pods"].as_f64().unwrap_or(0.0);
        let rss = rss_per_pod(raw);
        let fds = per(&first["agent"], &last["agent"], "fds", n);
        let threads = last["agent"]["threads"].as_i64().unwrap_or(0)
            - first["agent"]["threads"].as_i64().unwrap_or(0);
        let kinds = |step: &Value| -> BTreeMap<String, i64> {
            step["agent"]["fd_kinds"]
                .as_object()
                .map(|o| {
                    o.iter()
                        .map(|(k, v)| (k.clone(), v.as_i64().unwrap_or(0)))
                        .collect()
                })
                .unwrap_or_default()
        };
        let (a, b) = (kinds(first), kinds(last));
        let grew: Vec<String> = b
            .iter()
            .filter_map(|(k, v)| {
                let d = v - a.get(k).copied().unwrap_or(0);
                (d != 0).then(|| format!("{k} {:+.2}", d as f64 / n.max(1.0)))
            })
            .collect();
        let _ = writeln!(
            s,
            "\nFrom {} to {} pods: **{} of RSS per pod** (target <= 20 KiB: {}), **{} fds per \
             pod** (target <= 8: {}), **{threads:+} threads** (target: independent of the pod \
             count: {}). Descriptors added per pod, by kind: {}.\n",
            first["pods"],
            last["pods"],
            rss.map_or("-".to_owned(), |v| format!("{v:.1} KiB")),
            verdict(rss.map(|v| v <= 20.0)),
            fds.map_or("-".to_owned(), |v| format!("{v:.2}")),
            verdict(fds.map(|v| v <= 8.0)),
            verdict(Some(threads <= 2)),
            if grew.is_empty() {
                "none".to_owned()
            } else {
                grew.join(", ")
            },
        );
    }
    let idle = &raw["idle"];
    if let (Some(cpu), Some(secs)) = (idle["cpu_seconds"].as_f64(), idle["seconds"].as_f64()) {
        let percent = 100.0 * cpu / secs;
        let _ = writeln!(
            s,
            "Idle agent CPU with {} pods enrolled: **{percent:.2} % of a core** over {secs:.0} s \
             (target < 1 %: {}).\n",
            idle["pods"],
            verdict(Some(percent < 1.0)),
        );
    }
    let c = &raw["connections"];
    if let Some(count) = c["count"].as_f64() {
        let rss = rss_per_idle(raw, "connections");
        let fds = per(&c["before"], &c["open"], "fds", count);
        let _ = writeln!(
            s,
            "Idle L4 connections (client pod to a virtual service with a `tcp` listener, \
             delivered to a pod on the same node): **{count:.0} open at once** ({} wanted; the \
             agent's descriptor limit here is {}, two per connection), opened in {:.1} s; agent \
             RSS {:.1} MB before, {:.1} MB with them open: **{} per idle connection** (target \
             < 10 KiB: {}), {} fds per connection. Idle connections are read {} s after they \
             are open.\n",
            c["wanted"],
            c["agent_fd_limit"],
            c["open_seconds"].as_f64().unwrap_or(f64::NAN),
            c["before"]["rss_kib"].as_f64().unwrap_or(f64::NAN) / 1024.0,
            c["open"]["rss_kib"].as_f64().unwrap_or(f64::NAN) / 1024.0,
            kib(rss),
            verdict(rss.map(|v| v < 10.0)),
            fds.map_or("-".to_owned(), |v| format!("{v:.2}")),
            raw["plan"]["idle_settle_seconds"]
                .as_u64()
                .unwrap_or_else(|| raw["plan"]["settle_seconds"].as_u64().unwrap_or(0)),
        );
    }
    idle_http(
        &mut s,
        &raw["http_connections"],
        "Idle HTTP/1.1 keep-alive connections (client pod to a virtual service with an `http` \
         listener",
        "(no target; the L4 target is < 10 KiB)",
        "The upstream connections that carried the GETs are not counted in them: a client \
         connection keeps its upstream connection for 2 s of idleness, then gives it to the \
         agent's shared pool, which keeps at most 64 idle ones per endpoint.",
    );
    idle_http(
        &mut s,
        &raw["http2_connections"],
        "Idle HTTP/2 client connections (client pod to a virtual service with an `http2` \
         listener",
        "(no target)",
        "Their GETs went upstream on the one HTTP/2 connection the agent keeps to the \
         endpoint, shared by every client connection.",
    );
    s
}

/// The paragraph of one kind of idle HTTP connection (`c`: what `hold_idle` returned), if the
/// run held them: `what` names them and their listener, `target` follows their memory per
/// connection, `after` closes the paragraph.
fn idle_http(s: &mut String, c: &Value, what: &str, target: &str, after: &str) {
    let Some(count) = c["count"].as_f64() else {
        return;
    };
    let fds = per(&c["before"], &c["open"], "fds", count);
    let _ = writeln!(
        s,
        "{what}, one GET each, then idle; on a fresh agent): **{count:.0} open at once**, \
         opened in {:.1} s; agent RSS {:.1} MB before, {:.1} MB with them open: **{} per idle \
         connection** {target}, {} fds per connection. {after}\n",
        c["open_seconds"].as_f64().unwrap_or(f64::NAN),
        c["before"]["rss_kib"].as_f64().unwrap_or(f64::NAN) / 1024.0,
        c["open"]["rss_kib"].as_f64().unwrap_or(f64::NAN) / 1024.0,
        kib(rss_per_held(c)),
        fds.map_or("-".to_owned(), |v| format!("{v:.2}")),
    );
}

/// The flag a debug-build run was made with, for the command line on the page.
pub(super) fn debug_flag(raw: &Value) -> &'static str {
    if raw["agent_build"] == "debug" {
        " --debug-build"
    } else {
        ""
    }
}

fn kib(v: Option<f64>) -> String {
    v.map_or("-".to_owned(), |v| format!("{v:.2} KiB"))
}

fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "**missed**",
        None => "not measured",
    }
}
