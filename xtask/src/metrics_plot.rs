//! `cargo xtask metrics-plot`: the picture in docs/metrics.md, made from a real run.
//!
//! Starts a one-node testbed with the demo's pods and mesh (examples/demo/mesh.yaml: `front`
//! calls `color`, split 90/10 between color-v1 and color-v2), drives HTTP load from the front
//! pod, scrapes the agent's `/metrics` once a second, and halfway through promotes the canary
//! by editing the mesh file to 50/50 (the agent reloads it). From the scraped
//! `strait_requests_total` it computes requests per second by `target_virtual_node`, the way
//! the Grafana dashboard's canary panel does (`rate(...[1s])`), and writes
//! docs/metrics/canary.svg and the raw samples as docs/metrics/canary.csv.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use testbed::agent::{Agent, http_binary};
use testbed::run;
use testbed::scenario::Scenario;

use crate::{ebpf, workspace_root};

const SERVICE: &str = "color.demo.svc.cluster.local";
const SECONDS: u64 = 40;
const PROMOTE_AT: u64 = 20;
/// Requests per one-second round (keep-alive, 4 connections).
const PER_ROUND: u32 = 200;

pub fn run_plot() -> Result<()> {
    if !crate::is_root() {
        bail!("metrics-plot needs root (network namespaces, cgroups, eBPF)");
    }
    ebpf::build_ebpf()?;
    crate::build_testbed_binaries()?;
    // The testbed's one-node scenario under the demo's names (front, color-v1 and color-v2 in
    // namespace demo, HTTP servers answering with their pod's name) on the demo's mesh.
    let source = std::fs::read_to_string(workspace_root().join("examples/demo/mesh.yaml"))?;
    let Scenario {
        tb,
        node,
        client: front,
        mesh,
        servers,
        ..
    } = Scenario::builder("metrics-plot")
        .namespace("demo")
        .client("front")
        .server_names("color-v1", "color-v2")
        .every_address()
        .service(SERVICE, &["10.96.0.10".parse()?])
        .service("echo.demo.svc.cluster.local", &["10.96.0.11".parse()?])
        .mesh(source.as_str())
        .build()?;
    let http = http_binary()?;
    let agent = Agent::start(&tb, &node, &mesh, &[])?;
    agent.wait_enrolled("demo/front", true, Duration::from_secs(20))?;

    // (second, target virtual node) -> cumulative requests.
    let mut samples: Vec<(f64, BTreeMap<String, f64>)> = Vec::new();
    let started = Instant::now();
    let mut promoted = false;
    for second in 0..SECONDS {
        if second == PROMOTE_AT && !promoted {
            let promoted_mesh = source
                .replace("weight: 90", "weight: 50")
                .replace("weight: 10", "weight: 50");
            let tmp = mesh.with_extension("tmp");
            std::fs::write(&tmp, promoted_mesh)?;
            std::fs::rename(&tmp, &mesh)?;
            promoted = true;
        }
        let round = Instant::now();
        run(
            front.command(&http).args([
                "load",
                &format!("http://{SERVICE}:8080/"),
                "--count",
                &PER_ROUND.to_string(),
                "--concurrency",
                "4",
            ]),
            Duration::from_secs(30),
        )?;
        let text = agent.admin_get("/metrics")?;
        samples.push((started.elapsed().as_secs_f64(), by_target(&text)));
        if let Some(rest) = Duration::from_secs(1).checked_sub(round.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    agent.stop()?;
    drop(servers);

    let dir = workspace_root().join("docs/metrics");
    std::fs::create_dir_all(&dir)?;
    let mut csv = String::from("seconds,target_virtual_node,requests_total\n");
    for (t, counts) in &samples {
        for (node, count) in counts {
            let _ = writeln!(csv, "{t:.2},{node},{count}");
        }
    }
    std::fs::write(dir.join("canary.csv"), csv)?;
    let svg = plot(&samples, PROMOTE_AT as f64);
    std::fs::write(dir.join("canary.svg"), svg)?;
    println!("wrote docs/metrics/canary.svg and docs/metrics/canary.csv");
    Ok(())
}

/// `strait_requests_total` summed by `target_virtual_node` (the Prometheus text format).
fn by_target(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("strait_requests_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let node = labels
            .split("\",")
            .find_map(|p| p.strip_prefix("target_virtual_node=\""))
            .map(|v| v.trim_end_matches('"').to_owned())
            .unwrap_or_default();
        *out.entry(node).or_insert(0.0) += value.trim().parse::<f64>().unwrap_or(0.0);
    }
    out
}

/// 1, 2 or 5 times a power of ten, at least `raw`: round axis ticks.
fn nice_step(raw: f64) -> f64 {
    let power = 10f64.powf(raw.max(1e-9).log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * power)
}

/// Requests per second by target, as line series, in an SVG.
fn plot(samples: &[(f64, BTreeMap<String, f64>)], promote_at: f64) -> String {
    let nodes: Vec<String> = samples
        .iter()
        .flat_map(|(_, c)| c.keys().cloned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .filter(|n| !n.is_empty())
        .collect();
    let mut series: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    for pair in samples.windows(2) {
        let ((t0, c0), (t1, c1)) = (&pair[0], &pair[1]);
        for node in &nodes {
            let delta = c1.get(node).copied().unwrap_or(0.0) - c0.get(node).copied().unwrap_or(0.0);
            series
                .entry(node)
                .or_default()
                .push((*t1, delta / (t1 - t0).max(1e-3)));
        }
    }
    let t_max = samples.last().map_or(1.0, |s| s.0).max(1.0);
    let y_max = series
        .values()
        .flatten()
        .map(|p| p.1)
        .fold(1.0f64, f64::max)
        * 1.1;
    let (w, h, left, right, top, bottom) = (860.0, 380.0, 70.0, 200.0, 40.0, 50.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let x = |t: f64| left + t / t_max * pw;
    let y = |v: f64| top + ph - v / y_max * ph;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{left}" y="22" font-size="15" font-weight="bold">Requests/s by target_virtual_node: canary 90/10, promoted to 50/50 at 20 s</text>"#
    );
    let step = nice_step(y_max / 5.0);
    let mut v = 0.0;
    while v <= y_max {
        let yy = y(v);
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{v:.0}</text>"##,
            left + pw,
            left - 6.0,
            yy + 4.0
        );
        v += step;
    }
    let mut t = 0.0;
    while t <= t_max {
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{t:.0}</text>"#,
            x(t),
            top + ph + 18.0
        );
        t += 5.0;
    }
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">seconds since start</text>"#,
        left + pw / 2.0,
        h - 8.0
    );
    let _ = writeln!(
        svg,
        r#"<text x="18" y="{:.1}" transform="rotate(-90 18 {:.1})" text-anchor="middle">requests / s</text>"#,
        top + ph / 2.0,
        top + ph / 2.0
    );
    let _ = writeln!(
        svg,
        r##"<line x1="{0:.1}" y1="{top}" x2="{0:.1}" y2="{1:.1}" stroke="#888" stroke-dasharray="4 4"/><text x="{2:.1}" y="{3:.1}" fill="#555">mesh file edited: weights 50/50</text>"##,
        x(promote_at),
        top + ph,
        x(promote_at) + 6.0,
        top + 14.0
    );
    let colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"];
    for (i, (node, points)) in series.iter().enumerate() {
        let color = colors[i % colors.len()];
        let path: Vec<String> = points
            .iter()
            .map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v)))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        let ly = top + 20.0 + 22.0 * i as f64;
        let _ = writeln!(
            svg,
            r#"<line x1="{0:.1}" y1="{ly:.1}" x2="{1:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="3"/><text x="{2:.1}" y="{3:.1}">{node}</text>"#,
            left + pw + 15.0,
            left + pw + 40.0,
            left + pw + 46.0,
            ly + 4.0
        );
    }
    let _ = writeln!(
        svg,
        r##"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>"##
    );
    svg.push_str("</svg>\n");
    svg
}
