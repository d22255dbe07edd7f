//! The soak (`cargo xtask bench --only soak`, also part of a full run): does the agent's
//! memory stay flat under a long mixed load? One node, a client pod, an L4 echo server behind a
//! `tcp` listener and two HTTP servers (`strait-http`) behind an `http` listener. For
//! [`Plan::seconds`] (600 by default, `--soak-seconds`):
//! - the client opens new connections every second: 10 L4 echoes and 10 HTTP/1.1 requests,
//!   each on its own connection (`xtask bench hold-conns churn`);
//! - the mesh file changes every 30 s (a reload the agent applies);
//! - one of the two HTTP endpoints flaps: its DNS record is removed and put back every 10 s;
//! - every 5 s the agent's RSS, open descriptors (by kind, sockets by protocol, state and
//!   port), threads and runtime tasks (`strait_runtime_tasks`) are read.
//!
//! After the first minute each of them must stay within 10 %: the median of the last minute
//! against the median of the second ([`growth`]; a single reading can catch the connections
//! in flight at that instant).
//! Raw results: docs/benchmarks/soak.json; the curve: docs/benchmarks/soak.svg; the "Soak"
//! section of docs/benchmarks.md ([`markdown`]).

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::{Value, json};
use testbed::agent::{http_binary, metric};
use testbed::{PodSpec, Testbed};

pub const RAW: &str = "benchmarks/soak.json";
pub const PLOT: &str = "benchmarks/soak.svg";

const WEB: &str = "web.soak.svc.cluster.local";
const WEB_V4: &str = "10.96.0.50";
const WEB_PORT: u16 = 8081;
const ECHO: &str = "echo.soak.svc.cluster.local";
const ECHO_V4: &str = "10.96.0.51";
const ECHO_PORT: u16 = 9000;
const WEB_PODS: &str = "web-pods.soak.svc.cluster.local";
const RELOAD_EVERY: u64 = 30;
const FLAP_EVERY: u64 = 10;
const SAMPLE_EVERY: u64 = 5;
/// The figures after this are held against their value here.
const WARM_UP: f64 = 60.0;

fn mesh_yaml(reload: u64) -> String {
    format!(
        r#"# reload {reload}
apiVersion: appmesh.k8s.aws/v1beta2
kind: Mesh
metadata: {{name: soak}}
spec: {{egressFilter: {{type: ALLOW_ALL}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: client, namespace: soak}}
spec:
  podSelector: {{matchLabels: {{app: client}}}}
  backends:
    - virtualService: {{virtualServiceRef: {{name: web}}}}
    - virtualService: {{virtualServiceRef: {{name: echo}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: web, namespace: soak}}
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  listeners:
    - portMapping: {{port: {WEB_PORT}, protocol: http}}
  serviceDiscovery: {{dns: {{hostname: {WEB_PODS}}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: echo, namespace: soak}}
spec:
  podSelector: {{matchLabels: {{app: echo}}}}
  listeners:
    - portMapping: {{port: {ECHO_PORT}, protocol: tcp}}
  serviceDiscovery: {{dns: {{hostname: echo-pods.soak.svc.cluster.local}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {{name: web, namespace: soak}}
spec:
  awsName: {WEB}
  provider: {{virtualNode: {{virtualNodeRef: {{name: web}}}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {{name: echo, namespace: soak}}
spec:
  awsName: {ECHO}
  provider: {{virtualNode: {{virtualNodeRef: {{name: echo}}}}}}
"#
    )
}

/// Runs the soak for `seconds` and returns its raw results.
pub fn run(strait: &Path, xtask: &Path, seconds: u64) -> anyhow::Result<Value> {
    // SAFETY (of the environment): single-threaded here; testbed::agent reads STRAIT_BIN.
    unsafe { std::env::set_var("STRAIT_BIN", strait) };
    let tb = Testbed::new("soak")?;
    super::environment::on_interrupt_clean(&tb);
    let node = tb.add_node("node1")?;
    let client = node.add_pod(&PodSpec::new("client", "soak").label("app", "client"))?;
    let web_a = node.add_pod(&PodSpec::new("web-a", "soak").label("app", "web"))?;
    let web_b = node.add_pod(&PodSpec::new("web-b", "soak").label("app", "web"))?;
    let echo = node.add_pod(&PodSpec::new("echo", "soak").label("app", "echo"))?;
    tb.dns_record(WEB, &[WEB_V4.parse()?])?;
    tb.dns_record(ECHO, &[ECHO_V4.parse()?])?;
    let both = [web_a.ipv4().into(), web_b.ipv4().into()];
    tb.dns_record(WEB_PODS, &both)?;
    tb.dns_record("echo-pods.soak.svc.cluster.local", &[echo.ipv4().into()])?;
    let mut servers = Vec::new();
    for pod in [&web_a, &web_b] {
        let server = tb.spawn(
            &format!("http-{}", pod.name()),
            pod.command(http_binary()?).args([
                "serve",
                "--listen",
                &format!("0.0.0.0:{WEB_PORT}"),
                "--name",
                pod.name(),
            ]),
        )?;
        server.wait_listening(WEB_PORT, Duration::from_secs(10))?;
        servers.push(server);
    }
    let server = tb.spawn(
        "echo-server",
        echo.command(xtask).args([
            "bench",
            "hold-conns",
            "serve",
            "--listen",
            &format!("0.0.0.0:{ECHO_PORT}"),
        ]),
    )?;
    server.wait_listening(ECHO_PORT, Duration::from_secs(10))?;
    servers.push(server);
    let dir = tb.temp_dir().join("soak");
    std::fs::create_dir_all(&dir)?;
    let mesh = dir.join("mesh.yaml");
    std::fs::write(&mesh, mesh_yaml(0))?;
    for pod in [&client, &web_a, &web_b, &echo] {
        node.write_workload(pod)?;
    }
    let agent = super::environment::start_agent_as_deployed(&tb, &node, &mesh, &[])?;
    for pod in ["soak/client", "soak/web-a", "soak/web-b", "soak/echo"] {
        agent.wait_enrolled(pod, true, Duration::from_secs(30))?;
    }
    let pid = agent.process.pid();
    let churn = tb.spawn(
        "churn",
        client.command(xtask).args([
            "bench",
            "hold-conns",
            "churn",
            "--l4",
            &format!("{ECHO_V4}:{ECHO_PORT}"),
            "--http",
            &format!("{WEB_V4}:{WEB_PORT}"),
            "--host",
            WEB,
            "--per-second",
            "10",
            // A little longer than the sampling, so it is still running when that ends.
            "--seconds",
            &(seconds + 5).to_string(),
        ]),
    )?;
    // Processes in the pods' network namespaces, to name the agent's sockets made there.
    let pod_pids: Vec<u32> = servers
        .iter()
        .chain([&churn])
        .map(testbed::Process::pid)
        .collect();
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut reloads = 0;
    let mut flaps = 0;
    let mut next_reload = RELOAD_EVERY;
    let mut next_flap = FLAP_EVERY;
    let mut next_sample = 0;
    while started.elapsed().as_secs() < seconds {
        let now = started.elapsed().as_secs();
        if now >= next_sample {
            let mut sample = super::scale::figures(pid)?;
            sample["t"] = json!(started.elapsed().as_secs_f64());
            sample["tcp_active"] = json!(metric(&agent, "strait_tcp_connections_active", &[])?);
            sample["tasks"] = json!(metric(&agent, "strait_runtime_tasks", &[])?);
            sample["sockets"] = json!(super::procfs::socket_kinds(pid, &pod_pids)?);
            samples.push(sample);
            next_sample += SAMPLE_EVERY;
        }
        if now >= next_reload {
            reloads += 1;
            std::fs::write(&mesh, mesh_yaml(reloads))?;
            next_reload += RELOAD_EVERY;
        }
        if now >= next_flap {
            flaps += 1;
            if flaps % 2 == 1 {
                tb.dns_record(WEB_PODS, &both[..1])?;
            } else {
                tb.dns_record(WEB_PODS, &both)?;
            }
            next_flap += FLAP_EVERY;
        }
        if let Some(status) = churn.try_wait()? {
            bail!("the client stopped early ({status}):\n{}", churn.stderr());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    churn.wait_timeout(Duration::from_secs(30))?;
    let outcomes: Value = serde_json::from_str(churn.stdout().trim()).unwrap_or(Value::Null);
    let applied = metric(&agent, "strait_mesh_reloads", &["applied"])?;
    agent.stop()?;
    Ok(json!({
        "seconds": seconds,
        "machine": super::tools::machine(),
        "date": super::scale::today(),
        "loadavg_1m": super::procfs::loadavg(),
        "per_second": {"l4": 10, "http": 10},
        "reloads_written": reloads,
        "reloads_applied": applied,
        "flaps": flaps,
        "outcomes": outcomes,
        "samples": samples,
    }))
}

/// Largest deviation after [`WARM_UP`] from the value at [`WARM_UP`], as a fraction.
pub(super) fn drift(samples: &[Value], field: &str) -> Option<(f64, f64)> {
    let at = |s: &Value| s["t"].as_f64().unwrap_or(0.0);
    let base = samples.iter().find(|s| at(s) >= WARM_UP)?[field].as_f64()?;
    let worst = samples
        .iter()
        .filter(|s| at(s) >= WARM_UP)
        .filter_map(|s| s[field].as_f64())
        .map(|v| (v - base) / base)
        .fold(0.0f64, |a, d| if d.abs() > a.abs() { d } else { a });
    Some((base, worst))
}

/// Growth over the run: the median of the last minute's readings against the median of the
/// second minute's, as a fraction. A single reading can catch connections in flight (each
/// second's new connections hold descriptors and tasks for a moment); a leak moves the
/// median, those do not.
fn growth(samples: &[Value], field: &str) -> Option<f64> {
    let at = |s: &Value| s["t"].as_f64().unwrap_or(0.0);
    let end = samples.iter().map(at).fold(0.0, f64::max);
    let median = |from: f64, to: f64| -> Option<f64> {
        let mut v: Vec<f64> = samples
            .iter()
            .filter(|s| (from..to).contains(&at(s)))
            .filter_map(|s| s[field].as_f64())
            .collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    if end < 2.0 * WARM_UP {
        return None;
    }
    let first = median(WARM_UP, 2.0 * WARM_UP)?;
    let last = median(end - WARM_UP, end + 1.0)?;
    Some((last - first) / first)
}

/// The "Soak" section of docs/benchmarks.md, from the raw results alone.
pub fn markdown(raw: &Value) -> String {
    let mut s = String::new();
    let seconds = raw["seconds"].as_f64().unwrap_or(0.0);
    let samples = raw["samples"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(
        s,
        "## Soak: memory under a long mixed load\n\n\
         From [benchmarks/soak.json](benchmarks/soak.json) (`cargo xtask bench --only soak{}`, \
         run on {} for {seconds:.0} s; {} agent build{}; load average {:.1} at the start). Each \
         second 10 new L4 connections and 10 HTTP/1.1 requests on new connections; the mesh \
         file rewritten every {RELOAD_EVERY} s ({} reloads applied); one of the two HTTP \
         endpoints removed from and put back into DNS every {FLAP_EVERY} s ({} changes). \
         Outcomes: {}.\n",
        super::scale::debug_flag(raw),
        raw["date"].as_str().unwrap_or("an unknown date"),
        raw["agent_build"].as_str().unwrap_or("an unknown"),
        raw["allocator"]
            .as_str()
            .map_or_else(String::new, |a| format!(", {a} allocator")),
        raw["loadavg_1m"].as_f64().unwrap_or(f64::NAN),
        raw["reloads_applied"],
        raw["flaps"],
        raw["outcomes"],
    );
    if seconds < 600.0 {
        let _ = writeln!(
            s,
            "**This run is shorter than the 10 minutes the target asks for**: it shows that \
             the soak works, not that memory stays flat.\n"
        );
    }
    let _ = writeln!(
        s,
        "![agent RSS, fds, threads and tasks over the soak](benchmarks/soak.svg)\n\n\
         *Growth* is the median of the last minute's readings against the median of the second \
         minute's: the target (within 10 %) is held against it. *Largest single reading* is the \
         reading after the first minute farthest from the one at 1 minute; descriptors and \
         tasks of the connections in flight at that instant count in it.\n\n\
         | figure | at 1 minute | largest single reading after | growth | within 10 % |\n\
         |---|---|---|---|---|"
    );
    for (field, name) in [
        ("rss_kib", "agent RSS (KiB)"),
        ("fds", "open fds"),
        ("threads", "threads"),
        ("tasks", "runtime tasks"),
    ] {
        match (drift(&samples, field), growth(&samples, field)) {
            (Some((base, worst)), Some(growth)) => {
                let _ = writeln!(
                    s,
                    "| {name} | {base:.0} | {:+.1} % | {:+.1} % | {} |",
                    worst * 100.0,
                    growth * 100.0,
                    if growth.abs() <= 0.10 {
                        "yes"
                    } else {
                        "**no**"
                    }
                );
            }
            (Some((base, worst)), None) => {
                let _ = writeln!(
                    s,
                    "| {name} | {base:.0} | {:+.1} % | - | run shorter than 2 minutes |",
                    worst * 100.0,
                );
            }
            _ => {
                let _ = writeln!(s, "| {name} | - | - | - | no sample after 1 minute |");
            }
        }
    }
    s.push('\n');
    s
}

/// The curve: RSS, fds and threads over time, each relative to its value at one minute.
pub fn svg(raw: &Value) -> String {
    let samples = raw["samples"].as_array().cloned().unwrap_or_default();
    let (w, h, left, top, pw, ph) = (640.0, 300.0, 60.0, 30.0, 540.0, 220.0);
    let tmax = samples
        .iter()
        .filter_map(|s| s["t"].as_f64())
        .fold(1.0f64, f64::max);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="16">agent figures over the soak, relative to their value at 1 minute (band: ±10 %)</text>"#
    );
    // y: 0.8 .. 1.2 of the value at one minute.
    let y = |r: f64| top + ph * (1.2 - r.clamp(0.8, 1.2)) / 0.4;
    let x = |t: f64| left + pw * t / tmax;
    let _ = writeln!(
        s,
        r##"<rect x="{left}" y="{:.1}" width="{pw}" height="{:.1}" fill="#eee"/>"##,
        y(1.1),
        y(0.9) - y(1.1)
    );
    for r in [0.8, 0.9, 1.0, 1.1, 1.2] {
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{:.1}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ccc"/><text x="{:.1}" y="{:.1}" text-anchor="end">{:+.0} %</text>"##,
            left + pw,
            left - 4.0,
            y(r) + 4.0,
            (r - 1.0) * 100.0,
            yy = y(r)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">seconds (0 to {tmax:.0})</text>"#,
        left + pw / 2.0,
        top + ph + 30.0
    );
    let _ = writeln!(
        s,
        r##"<line x1="{:.1}" x2="{:.1}" y1="{top}" y2="{:.1}" stroke="#999" stroke-dasharray="3,3"/>"##,
        x(WARM_UP),
        x(WARM_UP),
        top + ph
    );
    for (i, (field, name, color)) in [
        ("rss_kib", "RSS", "#1f77b4"),
        ("fds", "fds", "#d62728"),
        ("threads", "threads", "#2ca02c"),
        ("tasks", "tasks", "#9467bd"),
    ]
    .into_iter()
    .enumerate()
    {
        let Some((base, _)) = drift(&samples, field) else {
            continue;
        };
        let points: Vec<String> = samples
            .iter()
            .filter_map(|p| Some((p["t"].as_f64()?, p[field].as_f64()? / base)))
            .map(|(t, r)| format!("{:.1},{:.1}", x(t), y(r)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
            points.join(" ")
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" fill="{color}">{name}</text>"#,
            left + 10.0 + 80.0 * i as f64,
            top + ph + 16.0
        );
    }
    s.push_str("</svg>\n");
    s
}
