//! The bench's outputs: medians and ratios over rounds, docs/benchmarks.md (tables),
//! docs/benchmarks/latency.svg (drawn here, no plotting dependency) and
//! docs/benchmarks/results.json (every raw sample).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;
use serde_json::{Value, json};

use super::Plan;
use super::scenario::{Scenario, Workload};

pub struct Results {
    pub plan: Plan,
    pub machine: Value,
    pub scenarios: Vec<Scenario>,
    /// Scenario id -> one sample per round.
    pub samples: BTreeMap<&'static str, Vec<Value>>,
    pub demo_mesh_agent_rss_kib: u64,
    pub fast_path_counters: Value,
}

/// Median of the values at `pointer` in a scenario's samples.
fn median(results: &Results, id: &str, pointer: &str) -> Option<f64> {
    let mut values: Vec<f64> = results
        .samples
        .get(id)?
        .iter()
        .filter_map(|s| s.pointer(pointer)?.as_f64())
        .collect();
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    Some(if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    })
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => Some(a / b),
        _ => None,
    }
}

/// A target of the issue: name, measured ratio/value, goal, met.
struct Target {
    name: &'static str,
    value: Option<f64>,
    goal: &'static str,
    met: Option<bool>,
}

fn targets(r: &Results) -> Vec<Target> {
    let tput = ratio(
        median(r, "http_strait", "/rps"),
        median(r, "http_sidecars", "/rps"),
    );
    let tput_fast = ratio(
        median(r, "http_strait_fast", "/rps"),
        median(r, "http_sidecars", "/rps"),
    );
    let p99 = ratio(
        median(r, "http_strait", "/latency/1000/p99_us"),
        median(r, "http_direct", "/latency/1000/p99_us"),
    );
    let p99_fast = ratio(
        median(r, "http_strait_fast", "/latency/1000/p99_us"),
        median(r, "http_direct", "/latency/1000/p99_us"),
    );
    let bulk = ratio(
        median(r, "bulk_strait_fast", "/gbit_per_s"),
        median(r, "bulk_strait", "/gbit_per_s"),
    );
    let rss_mb = r.demo_mesh_agent_rss_kib as f64 / 1024.0;
    vec![
        Target {
            name: "HTTP throughput, strait / sidecar pair",
            value: tput,
            goal: ">= 2",
            met: tput.map(|v| v >= 2.0),
        },
        Target {
            name: "HTTP throughput, strait + fast path / sidecar pair",
            value: tput_fast,
            goal: ">= 2",
            met: tput_fast.map(|v| v >= 2.0),
        },
        Target {
            name: "p99 at 1,000 rps, strait / direct",
            value: p99,
            goal: "<= 1.5",
            met: p99.map(|v| v <= 1.5),
        },
        Target {
            name: "p99 at 1,000 rps, strait + fast path / direct",
            value: p99_fast,
            goal: "<= 1.5",
            met: p99_fast.map(|v| v <= 1.5),
        },
        Target {
            name: "TCP bulk, strait + fast path / strait",
            value: bulk,
            goal: ">= 2",
            met: bulk.map(|v| v >= 2.0),
        },
        Target {
            name: "agent RSS on the demo mesh, MB",
            value: Some(rss_mb),
            goal: "< 40",
            met: Some(rss_mb < 40.0),
        },
    ]
}

fn f(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "–".to_owned(), |v| format!("{v:.decimals$}"))
}

fn ms(us: Option<f64>) -> String {
    f(us.map(|u| u / 1000.0), 2)
}

/// The terminal summary: targets and ratios.
pub fn summary(r: &Results) -> String {
    let mut s = String::from("\nbench: targets (ratios of medians from this run)\n");
    for t in targets(r) {
        let _ = writeln!(
            s,
            "  {:<55} {:>8}  goal {:<6} {}",
            t.name,
            f(t.value, 2),
            t.goal,
            match t.met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "n/a",
            }
        );
    }
    s
}

pub fn write(out: &Path, r: &Results) -> anyhow::Result<()> {
    let dir = out.join("benchmarks");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let raw = json!({
        "plan": r.plan,
        "machine": r.machine,
        "scenarios": r.scenarios,
        "samples": r.samples,
        "demo_mesh_agent_rss_kib": r.demo_mesh_agent_rss_kib,
        "fast_path_counters_last_agent": r.fast_path_counters,
        "targets": targets(r).iter().map(|t| json!({
            "name": t.name, "value": t.value, "goal": t.goal, "met": t.met,
        })).collect::<Vec<_>>(),
    });
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&raw)? + "\n",
    )?;
    std::fs::write(dir.join("latency.svg"), svg(r))?;
    let md = markdown(r);
    let path = out.join("benchmarks.md");
    // The hand-written analysis below the marker survives a re-run.
    let notes = std::fs::read_to_string(&path)
        .ok()
        .and_then(|old| old.split_once(NOTES_MARKER).map(|(_, n)| n.to_owned()))
        .unwrap_or_else(|| "\n".to_owned());
    std::fs::write(&path, format!("{md}{NOTES_MARKER}{notes}"))?;
    eprintln!(
        "bench: wrote {}, {} and {}",
        path.display(),
        dir.join("latency.svg").display(),
        dir.join("results.json").display()
    );
    Ok(())
}

/// Everything above this line in docs/benchmarks.md is generated; below it is analysis.
const NOTES_MARKER: &str = "<!-- end of generated tables: analysis below is kept across runs -->\n";

fn markdown(r: &Results) -> String {
    let mut s = String::new();
    let m = &r.machine;
    let _ = writeln!(s, "# Benchmarks\n");
    let _ = writeln!(
        s,
        "Generated by `cargo xtask bench`{} on kernel {}, {} × {}. {} rounds, scenarios \
         interleaved in every round; every number is the **median over rounds**, every ratio a \
         ratio of medians from this one run. Raw samples: [benchmarks/results.json](benchmarks/results.json).\n",
        if r.plan.rounds == 1 { " (quick)" } else { "" },
        m["kernel"].as_str().unwrap_or("?"),
        m["cpus"],
        m["cpu"].as_str().unwrap_or("?"),
        r.plan.rounds,
    );
    let _ = writeln!(
        s,
        "Same node: a client pod and a server pod (nginx {}, one worker) on one testbed node. \
         *direct*: the client connects to the server pod. *strait*: to the virtual service \
         address, captured by the agent (release build, L4 `tcp` listener) and forwarded. \
         *fast path*: the same with `--fast-path on`. *sidecar pair*: HAProxy in each pod \
         (`mode http`, one thread each), TLS between them, standing in for per-pod sidecars. \
         Latency from our open-loop load generator (`xtask bench load-gen`: {} keep-alive \
         connections, requests due at a fixed rate, latency measured from when each was due, \
         so coordinated omission is accounted for), {} s per rate; throughput from wrk (1 \
         thread, 32 connections, {} s); bulk from iperf3 (one stream, {} s). Proxy CPU is \
         utime+stime of the agent (or of both sidecars) from /proc during the wrk or iperf3 \
         run.\n",
        m["nginx"]
            .as_str()
            .unwrap_or("")
            .trim_start_matches("nginx version: "),
        r.plan.connections,
        r.plan.latency_seconds,
        r.plan.throughput_seconds,
        r.plan.bulk_seconds,
    );
    let _ = writeln!(s, "## Targets\n");
    let _ = writeln!(s, "| target | measured | goal | |\n|---|---:|---|---|");
    for t in targets(r) {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            t.name,
            f(t.value, 2),
            t.goal,
            match t.met {
                Some(true) => "met",
                Some(false) => "**missed**",
                None => "n/a",
            }
        );
    }
    let _ = writeln!(s, "\n## Same node, HTTP/1.1 keep-alive, small responses\n");
    let _ = writeln!(
        s,
        "![latency percentiles by scenario and rate](benchmarks/latency.svg)\n"
    );
    let http: Vec<&Scenario> = r
        .scenarios
        .iter()
        .filter(|s| s.workload == Workload::Http1)
        .collect();
    for &rate in &r.plan.rates {
        let _ = writeln!(
            s,
            "Fixed rate {rate} requests/s (latency in ms):\n\n| scenario | p50 | p90 | p99 | max | achieved rps | errors |\n|---|---:|---:|---:|---:|---:|---:|"
        );
        for sc in &http {
            let p = |k: &str| median(r, sc.id, &format!("/latency/{rate}/{k}"));
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} |",
                sc.label,
                ms(p("p50_us")),
                ms(p("p90_us")),
                ms(p("p99_us")),
                ms(p("max_us")),
                f(p("achieved_rps"), 0),
                f(p("errors"), 0),
            );
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(
        s,
        "Maximum throughput (wrk):\n\n| scenario | requests/s | vs direct | proxy CPU s per 1,000 requests | proxy RSS MB |\n|---|---:|---:|---:|---:|"
    );
    let direct = median(r, "http_direct", "/rps");
    for sc in &http {
        let rps = median(r, sc.id, "/rps");
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            sc.label,
            f(rps, 0),
            f(ratio(rps, direct), 2),
            f(median(r, sc.id, "/proxy_cpu_seconds_per_1000"), 4),
            f(median(r, sc.id, "/proxy_rss_kib").map(|k| k / 1024.0), 1),
        );
    }
    let _ = writeln!(s, "\n## Same node, TCP bulk (iperf3)\n");
    let _ = writeln!(
        s,
        "| scenario | Gbit/s | vs direct | proxy CPU s per GiB | proxy RSS MB |\n|---|---:|---:|---:|---:|"
    );
    let direct = median(r, "bulk_direct", "/gbit_per_s");
    for sc in r
        .scenarios
        .iter()
        .filter(|s| s.workload == Workload::TcpBulk)
    {
        let g = median(r, sc.id, "/gbit_per_s");
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            sc.label,
            f(g, 2),
            f(ratio(g, direct), 2),
            f(median(r, sc.id, "/proxy_cpu_seconds_per_gib"), 3),
            f(median(r, sc.id, "/proxy_rss_kib").map(|k| k / 1024.0), 1),
        );
    }
    let _ = writeln!(
        s,
        "\nAgent RSS with the demo mesh (examples/demo/mesh.yaml), ready and idle: {:.1} MB.\n",
        r.demo_mesh_agent_rss_kib as f64 / 1024.0
    );
    let _ = writeln!(
        s,
        "Fast-path counters of the last agent (cumulative since the maps were created): `{}`\n",
        r.fast_path_counters
    );
    s
}

/// Grouped bars: one group per (rate, scenario), bars p50/p90/p99, log-scale milliseconds.
fn svg(r: &Results) -> String {
    let http: Vec<&Scenario> = r
        .scenarios
        .iter()
        .filter(|s| s.workload == Workload::Http1)
        .collect();
    let pcts = [
        ("p50_us", "#4e79a7"),
        ("p90_us", "#f28e2b"),
        ("p99_us", "#e15759"),
    ];
    let (left, top, bar, gap, group_gap) = (60.0, 40.0, 14.0, 2.0, 18.0);
    let height = 300.0;
    let groups = r.plan.rates.len() * http.len();
    let group_w = pcts.len() as f64 * (bar + gap) + group_gap;
    let width = left + groups as f64 * group_w + 20.0 + (r.plan.rates.len() as f64 * 20.0);
    // Log scale from 0.01 ms to the next power of ten above the largest p99.
    let max_us = r
        .plan
        .rates
        .iter()
        .flat_map(|rate| {
            http.iter()
                .filter_map(move |s| median(r, s.id, &format!("/latency/{rate}/p99_us")))
        })
        .fold(100.0_f64, f64::max);
    let (lo, hi) = (1e-2_f64.log10(), (max_us / 1000.0).log10().ceil().max(0.0));
    let y = |ms: f64| top + height - ((ms.max(0.01).log10() - lo) / (hi - lo)) * height;
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">
<rect width="100%" height="100%" fill="white"/>
<text x="{left}" y="20" font-size="14">Same node HTTP/1.1 latency (median of rounds), log scale, ms</text>
"#,
        w = width.ceil(),
        h = top + height + 110.0,
    );
    let mut decade = lo;
    while decade <= hi + 1e-9 {
        let v = 10f64.powf(decade);
        let yy = y(v);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{x2}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{tx}" y="{ty:.1}" text-anchor="end">{v}</text>"##,
            x2 = width - 10.0,
            tx = left - 5.0,
            ty = yy + 4.0,
        );
        decade += 1.0;
    }
    let mut x = left + 10.0;
    for &rate in &r.plan.rates {
        let start = x;
        for sc in &http {
            for (k, color) in pcts {
                if let Some(us) = median(r, sc.id, &format!("/latency/{rate}/{k}")) {
                    let yy = y(us / 1000.0);
                    let _ = writeln!(
                        s,
                        r#"<rect x="{x:.1}" y="{yy:.1}" width="{bar}" height="{hh:.1}" fill="{color}"><title>{} {rate} rps {k}: {:.3} ms</title></rect>"#,
                        sc.label,
                        us / 1000.0,
                        hh = top + height - yy,
                    );
                }
                x += bar + gap;
            }
            let _ = writeln!(
                s,
                r#"<text transform="translate({tx:.1},{ty:.1}) rotate(35)">{}</text>"#,
                sc.label,
                tx = x - 2.0 * (bar + gap),
                ty = top + height + 12.0,
            );
            x += group_gap;
        }
        let _ = writeln!(
            s,
            r#"<text x="{cx:.1}" y="{cy}" text-anchor="middle" font-size="12">{rate} requests/s</text>"#,
            cx = (start + x) / 2.0,
            cy = top + height + 100.0,
        );
        x += 20.0;
    }
    let mut lx = width - 170.0;
    for (k, color) in pcts {
        let _ = writeln!(
            s,
            r#"<rect x="{lx}" y="28" width="10" height="10" fill="{color}"/><text x="{tx}" y="37">{}</text>"#,
            k.trim_end_matches("_us"),
            tx = lx + 13.0,
        );
        lx += 50.0;
    }
    s.push_str("</svg>\n");
    s
}
