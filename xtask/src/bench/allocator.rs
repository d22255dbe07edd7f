//! The allocator comparison (`cargo xtask bench --only allocator`): the agent built with the
//! system allocator (the default) and with jemalloc (`--features jemalloc`, the
//! `tikv-jemallocator` crate), on the same testbed and in the same run.
//!
//! - L7 cost: the `http_strait_l7_fast` scenario (an `http` listener, the fast path on, the
//!   defaults of a deployed agent) with each build in every round, the two alternating which
//!   goes first; throughput (wrk), agent CPU per request and RSS after the run.
//! - Memory over time: the soak ([`super::soak`]) with the jemalloc build, for as long as the
//!   committed soak of the default build (docs/benchmarks/soak.json), which is the other side
//!   of the comparison.
//! - Memory per enrolled pod and per idle connection: the scale suite ([`super::scale`]) with
//!   the jemalloc build, against the committed scale run of the default build
//!   (docs/benchmarks/scale.json). Size classes differ between the allocators, and a node
//!   with many idle connections pays the difference on every one.
//!
//! Raw results: docs/benchmarks/allocator.json; the "Allocator" section of docs/benchmarks.md
//! ([`markdown`]).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use super::environment::Env;
use super::{AgentFlags, Binaries, Plan};
use crate::{cargo, ebpf, workspace_root};

pub const RAW: &str = "benchmarks/allocator.json";

/// The L7 scenario both builds run.
const SCENARIO: &str = "http_strait_l7_fast";

/// Builds the jemalloc agent next to the default one: target/release/strait-jemalloc. The
/// default build (target/release/strait) is rebuilt afterwards, and each binary is checked
/// for jemalloc's symbols (present in one, absent in the other).
fn build_jemalloc(default: &Path) -> anyhow::Result<PathBuf> {
    let release = ebpf::target_dir().join("release");
    let jemalloc = release.join("strait-jemalloc");
    for features in [Some("strait/jemalloc"), None] {
        let mut build = cargo();
        // The same packages as the default build, so that their dependencies keep their
        // features (and their compiled artifacts).
        build.args(["build", "--release", "-p", "strait", "-p", "xtask"]);
        if let Some(f) = features {
            build.args(["--features", f]);
        }
        let status = build
            .current_dir(workspace_root())
            .status()
            .context("cannot run cargo build")?;
        if !status.success() {
            bail!("the release build of the agent (features {features:?}) failed");
        }
        if features.is_some() {
            std::fs::copy(release.join("strait"), &jemalloc)
                .with_context(|| format!("copy the jemalloc build to {}", jemalloc.display()))?;
        }
    }
    for (path, wants) in [(default, false), (jemalloc.as_path(), true)] {
        if has_jemalloc(path)? != wants {
            bail!(
                "{} {} jemalloc, which its build should not give",
                path.display(),
                if wants { "lacks" } else { "has" }
            );
        }
    }
    Ok(jemalloc)
}

/// True if the binary links jemalloc (tikv-jemalloc-sys prefixes its symbols with `_rjem_`).
fn has_jemalloc(binary: &Path) -> anyhow::Result<bool> {
    let bytes = std::fs::read(binary).with_context(|| format!("read {}", binary.display()))?;
    Ok(bytes.windows(12).any(|w| w == b"_rjem_malloc"))
}

/// Runs the comparison; returns its raw results.
pub fn run(
    binaries: &Binaries,
    python: &Path,
    plan: &Plan,
    soak_seconds: u64,
) -> anyhow::Result<Value> {
    let jemalloc = build_jemalloc(&binaries.strait)?;
    let scenario = super::scenario::all()
        .into_iter()
        .find(|s| s.id == SCENARIO)
        .context("BUG: the allocator scenario is not in scenario::all")?;
    let builds = [("system", binaries.strait.clone()), ("jemalloc", jemalloc)];
    let mut l7 = serde_json::Map::new();
    {
        let env = Env::start(binaries, python)?;
        let flags = AgentFlags {
            fast_path: true,
            telemetry: None,
            worker_slice_us: None,
            nice: None,
        };
        for round in 0..plan.rounds {
            let mut order: Vec<&(&str, PathBuf)> = builds.iter().collect();
            if round % 2 == 1 {
                order.reverse();
            }
            for (name, path) in order {
                // SAFETY (of the environment): single-threaded here; testbed::agent reads
                // STRAIT_BIN when it starts an agent.
                unsafe { std::env::set_var("STRAIT_BIN", path) };
                eprintln!(
                    "bench: allocator round {}/{} {name} ({SCENARIO})",
                    round + 1,
                    plan.rounds
                );
                let agent = env.start_agent(flags)?;
                let loadavg = super::procfs::loadavg();
                let mut sample = super::measure(&env, plan, &scenario, &[agent.process.pid()])
                    .with_context(|| format!("{SCENARIO} with {name} in round {}", round + 1))?;
                sample["loadavg_1m"] = json!(loadavg);
                eprintln!("bench:   {sample}");
                agent.stop()?;
                l7.entry((*name).to_owned())
                    .or_insert_with(|| json!([]))
                    .as_array_mut()
                    .context("BUG: samples are a list")?
                    .push(sample);
            }
        }
    }
    // Let the testbed's teardown finish before the soak makes its own.
    std::thread::sleep(Duration::from_secs(1));
    let mut soak = super::soak::run(&builds[1].1, &binaries.xtask, soak_seconds)?;
    soak["agent_build"] = json!(binaries.profile);
    soak["allocator"] = json!("jemalloc");
    std::thread::sleep(Duration::from_secs(1));
    let mut scale = super::scale::run(&builds[1].1, &binaries.xtask, false)?;
    scale["agent_build"] = json!(binaries.profile);
    scale["allocator"] = json!("jemalloc");
    Ok(json!({
        "date": super::scale::today(),
        "machine": super::tools::machine(),
        "plan": plan,
        "scenario": SCENARIO,
        "l7": l7,
        "soak_jemalloc": soak,
        "scale_jemalloc": scale,
    }))
}

/// Median over rounds of a figure of one build's L7 samples.
fn l7_median(raw: &Value, build: &str, pointer: &str) -> Option<f64> {
    let samples = raw["l7"][build].as_array()?;
    super::report::median_of(
        samples
            .iter()
            .filter_map(|s| s.pointer(pointer)?.as_f64())
            .collect(),
    )
}

/// RSS figures of a soak, MB: at one minute, at the end, the peak, and the largest change
/// after one minute as a fraction.
fn soak_rss(soak: &Value) -> Option<(f64, f64, f64, f64)> {
    let samples = soak["samples"].as_array()?;
    let (base, worst) = super::soak::drift(samples, "rss_kib")?;
    let last = samples.last()?["rss_kib"].as_f64()?;
    let peak = samples
        .iter()
        .filter_map(|s| s["rss_kib"].as_f64())
        .fold(0.0, f64::max);
    Some((base / 1024.0, last / 1024.0, peak / 1024.0, worst))
}

/// The "Allocator" section of docs/benchmarks.md, from the comparison's raw results and the
/// default build's soak and scale runs.
pub fn markdown(raw: &Value, soak_system: Option<&Value>, scale_system: Option<&Value>) -> String {
    let mut s = String::new();
    let rounds = raw["l7"]["system"].as_array().map_or(0, Vec::len);
    let soak_jemalloc = &raw["soak_jemalloc"];
    let _ = writeln!(
        s,
        "## Allocator: system vs jemalloc\n\n\
         From [benchmarks/allocator.json](benchmarks/allocator.json) (`cargo xtask bench \
         --only allocator`, run on {}): the agent built with the system allocator and with \
         jemalloc (`--features jemalloc`). L7: the scenario `{}` with each build in each of \
         {rounds} rounds (medians). Soak: the jemalloc build's soak ({:.0} s) in that file \
         against the default build's soak in [benchmarks/soak.json](benchmarks/soak.json) \
         ({:.0} s, {}).{}\n",
        raw["date"].as_str().unwrap_or("an unknown date"),
        raw["scenario"].as_str().unwrap_or("?"),
        soak_jemalloc["seconds"].as_f64().unwrap_or(f64::NAN),
        soak_system
            .and_then(|v| v["seconds"].as_f64())
            .unwrap_or(f64::NAN),
        soak_system
            .and_then(|v| v["allocator"].as_str())
            .unwrap_or("allocator not recorded"),
        match (raw.get("scale_jemalloc"), scale_system) {
            (Some(_), Some(system)) => format!(
                " Scale: the jemalloc build's scale suite in that file against the default \
                 build's in [benchmarks/scale.json](benchmarks/scale.json) (run on {}).",
                system["date"].as_str().unwrap_or("an unknown date")
            ),
            _ => String::new(),
        },
    );
    let _ = writeln!(
        s,
        "| figure | system | jemalloc | jemalloc / system |\n|---|---:|---:|---:|"
    );
    let row = |s: &mut String, name: &str, a: Option<f64>, b: Option<f64>, decimals: usize| {
        let show = |v: Option<f64>| v.map_or_else(|| "–".to_owned(), |v| format!("{v:.decimals$}"));
        let ratio = match (a, b) {
            (Some(a), Some(b)) if a != 0.0 => format!("{:.2}", b / a),
            _ => "–".to_owned(),
        };
        let _ = writeln!(s, "| {name} | {} | {} | {ratio} |", show(a), show(b));
    };
    for (name, pointer, scale, decimals) in [
        ("L7 throughput, requests/s", "/rps", 1.0, 0),
        (
            "agent CPU per 1,000 L7 requests, ms",
            "/proxy_cpu_seconds_per_1000",
            1000.0,
            1,
        ),
        (
            "agent RSS after the L7 run, MB",
            "/proxy_rss_kib",
            1.0 / 1024.0,
            1,
        ),
    ] {
        row(
            &mut s,
            name,
            l7_median(raw, "system", pointer).map(|v| v * scale),
            l7_median(raw, "jemalloc", pointer).map(|v| v * scale),
            decimals,
        );
    }
    let sys = soak_system.and_then(soak_rss);
    let je = soak_rss(soak_jemalloc);
    row(
        &mut s,
        "soak: RSS at 1 minute, MB",
        sys.map(|v| v.0),
        je.map(|v| v.0),
        1,
    );
    row(
        &mut s,
        "soak: RSS at the end, MB",
        sys.map(|v| v.1),
        je.map(|v| v.1),
        1,
    );
    row(
        &mut s,
        "soak: peak RSS, MB",
        sys.map(|v| v.2),
        je.map(|v| v.2),
        1,
    );
    let _ = writeln!(
        s,
        "| soak: largest RSS change after 1 minute | {} | {} | |",
        sys.map_or_else(|| "–".to_owned(), |v| format!("{:+.1} %", v.3 * 100.0)),
        je.map_or_else(|| "–".to_owned(), |v| format!("{:+.1} %", v.3 * 100.0)),
    );
    // Runs before the scale suite joined the comparison have no scale figures.
    if let Some(scale_jemalloc) = raw.get("scale_jemalloc") {
        row(
            &mut s,
            "scale: RSS per enrolled pod, KiB",
            scale_system.and_then(super::scale::rss_per_pod),
            super::scale::rss_per_pod(scale_jemalloc),
            1,
        );
        row(
            &mut s,
            "scale: RSS per idle L4 connection, KiB",
            scale_system.and_then(|raw| super::scale::rss_per_idle(raw, "connections")),
            super::scale::rss_per_idle(scale_jemalloc, "connections"),
            2,
        );
        // Scale runs before the suite held idle HTTP/1.1 (or HTTP/2) connections have no such
        // figure, so a row appears only where the jemalloc build's run has it.
        for (held, label) in [
            (
                "http_connections",
                "scale: RSS per idle HTTP/1.1 keep-alive connection, KiB",
            ),
            (
                "http2_connections",
                "scale: RSS per idle HTTP/2 client connection, KiB",
            ),
        ] {
            if scale_jemalloc.get(held).is_some() {
                row(
                    &mut s,
                    label,
                    scale_system.and_then(|raw| super::scale::rss_per_idle(raw, held)),
                    super::scale::rss_per_idle(scale_jemalloc, held),
                    2,
                );
            }
        }
    }
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scale(per_connection_kib: f64, per_pod_kib: f64) -> Value {
        json!({
            "date": "2026-12-04",
            "steps": [
                {"pods": 10, "agent": {"rss_kib": 1000.0}},
                {"pods": 1000, "agent": {"rss_kib": 1000.0 + 990.0 * per_pod_kib}},
            ],
            "connections": {
                "count": 100,
                "before": {"rss_kib": 2000.0},
                "open": {"rss_kib": 2000.0 + 100.0 * per_connection_kib},
            },
        })
    }

    /// Each build's memory per pod and per idle connection comes from its own scale run.
    #[test]
    fn the_scale_rows_compare_each_builds_own_run() {
        let raw = json!({"scale_jemalloc": scale(3.0, 16.0)});
        let page = markdown(&raw, None, Some(&scale(2.0, 12.0)));
        assert!(
            page.contains("| scale: RSS per idle L4 connection, KiB | 2.00 | 3.00 | 1.50 |"),
            "{page}"
        );
        assert!(
            page.contains("| scale: RSS per enrolled pod, KiB | 12.0 | 16.0 | 1.33 |"),
            "{page}"
        );
        assert!(
            page.contains("Scale: the jemalloc build's scale suite"),
            "{page}"
        );
    }

    /// Each idle HTTP connection row appears once the jemalloc build's run has its figure.
    #[test]
    fn the_idle_http_row_needs_the_jemalloc_builds_figure() {
        let mut system = scale(2.0, 12.0);
        system["http_connections"] = json!({
            "count": 100,
            "before": {"rss_kib": 2000.0},
            "open": {"rss_kib": 4000.0},
        });
        let page = markdown(
            &json!({"scale_jemalloc": scale(3.0, 16.0)}),
            None,
            Some(&system),
        );
        assert!(!page.contains("HTTP/1.1 keep-alive"), "{page}");
        let mut jemalloc = scale(3.0, 16.0);
        jemalloc["http_connections"] = json!({
            "count": 100,
            "before": {"rss_kib": 2000.0},
            "open": {"rss_kib": 5000.0},
        });
        let page = markdown(
            &json!({"scale_jemalloc": jemalloc.clone()}),
            None,
            Some(&system),
        );
        assert!(
            page.contains(
                "| scale: RSS per idle HTTP/1.1 keep-alive connection, KiB | 20.00 | 30.00 | 1.50 |"
            ),
            "{page}"
        );
        assert!(!page.contains("HTTP/2"), "{page}");
        system["http2_connections"] = json!({
            "count": 100,
            "before": {"rss_kib": 2000.0},
            "open": {"rss_kib": 3000.0},
        });
        jemalloc["http2_connections"] = json!({
            "count": 100,
            "before": {"rss_kib": 2000.0},
            "open": {"rss_kib": 4000.0},
        });
        let page = markdown(&json!({"scale_jemalloc": jemalloc}), None, Some(&system));
        assert!(
            page.contains(
                "| scale: RSS per idle HTTP/2 client connection, KiB | 10.00 | 20.00 | 2.00 |"
            ),
            "{page}"
        );
    }

    /// A comparison run before the scale suite joined it says nothing about scale.
    #[test]
    fn a_run_without_the_scale_suite_has_no_scale_rows() {
        let page = markdown(&json!({}), None, Some(&scale(2.0, 12.0)));
        assert!(!page.contains("scale:"), "{page}");
        assert!(!page.contains("Scale:"), "{page}");
    }
}
