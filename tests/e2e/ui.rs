//! End-to-end test of the admin page (`/ui`) in a real browser: Debian's Chromium, headless,
//! in a testbed node, loads the page from the agent's admin port while a client pod sends a
//! 90/10 canary and requests to a route whose endpoint refuses connections (and fails its
//! health check). The test reads the DOM the page's script built: the graph's nodes (source
//! virtual node, virtual service, routes, virtual nodes, endpoints), the ejected endpoint's
//! mark, its edges with their weights, live request rates, error ratios and p99, and the table
//! of local pods with enrollment and identity expiry. It also
//! takes a screenshot (docs/ui.md shows one) into the target directory.
//!
//! Needs root and `cargo xtask setup` (chromium); without them it fails with the reason.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use testbed::agent::{ADMIN, Agent};
use testbed::{Node, Pod, Process, Scenario, Testbed, run};

const COLOR: &str = "color.app.svc.cluster.local";
const COLOR_V4: &str = "10.96.0.50";
const HTTP_BIN: &str = env!("CARGO_BIN_EXE_strait-http");

/// The canary mesh (tests/fixtures/color-canary.yaml) with a health check on `dead`, so the
/// page marks its endpoint ejected.
fn mesh_yaml(certs: &Path) -> String {
    testbed::fixture(
        "color-canary.yaml",
        &[
            ("mesh", "live"),
            ("client_logging", ""),
            ("certs", &certs.display().to_string()),
            (
                "dead_health_check",
                "      healthCheck: {protocol: tcp, healthyThreshold: 2, unhealthyThreshold: 2, \
                 intervalMillis: 5000, timeoutMillis: 2000}",
            ),
            ("service", COLOR),
        ],
    )
    .expect("BUG: the fixture and its values disagree")
}

/// Background load for up to a minute (the testbed stops it when the test ends).
fn load(tb: &Testbed, pod: &Pod, path: &str, rate: &str) -> anyhow::Result<Process> {
    tb.spawn(
        &format!("load{}", path.replace('/', "-")),
        pod.command(HTTP_BIN).args([
            "load",
            &format!("http://{COLOR}:8080{path}"),
            "--concurrency",
            "2",
            "--rate",
            rate,
            "--duration-ms",
            "60000",
        ]),
    )
}

/// Headless Chromium in the node (where the admin port is), with `mode` (`--dump-dom` or
/// `--screenshot=FILE`); its stdout.
fn chromium(tb: &Testbed, node: &Node, mode: &str) -> anyhow::Result<String> {
    let profile = tb.temp_dir().join(format!(
        "chromium-{}",
        mode.len() + mode.matches('/').count()
    ));
    let output = run(
        node.command("chromium")
            .env("HOME", tb.temp_dir())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--window-size=1360,720",
                // Long enough for a few of the page's one-second polls.
                "--virtual-time-budget=3500",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(mode)
            .arg(format!("http://{ADMIN}/ui")),
        Duration::from_secs(90),
    )?;
    ensure!(
        output.status.success(),
        "chromium {mode}: {:?}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The attributes of every element `<tag class="class" ...>` in a serialized DOM.
fn elements(dom: &str, tag: &str, class: &str) -> Vec<BTreeMap<String, String>> {
    let mut out = Vec::new();
    let open = format!("<{tag} ");
    for chunk in dom.split(&open).skip(1) {
        let Some(end) = chunk.find('>') else { continue };
        let attrs = parse_attrs(&chunk[..end]);
        let classes = attrs.get("class").cloned().unwrap_or_default();
        if classes.split(' ').any(|c| c == class) {
            out.push(attrs);
        }
    }
    out
}

fn parse_attrs(text: &str) -> BTreeMap<String, String> {
    let mut attrs = BTreeMap::new();
    let mut rest = text.trim();
    while let Some(eq) = rest.find("=\"") {
        let name = rest[..eq].trim().to_owned();
        let after = &rest[eq + 2..];
        let Some(close) = after.find('"') else { break };
        attrs.insert(name, after[..close].replace("&amp;", "&"));
        rest = after[close + 1..].trim_start();
    }
    attrs
}

fn number(attrs: &BTreeMap<String, String>, key: &str) -> anyhow::Result<f64> {
    attrs
        .get(key)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("{key} is not a number in {attrs:?}"))
}

#[test]
fn admin_page_shows_the_mesh_graph_with_live_rates_in_a_real_browser() -> anyhow::Result<()> {
    ensure!(
        Command::new("chromium")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "chromium is missing: `cargo xtask setup` installs Debian's chromium"
    );
    // `dead` names the outside pod, where nothing listens: connects to it are refused.
    let scenario = Scenario::builder("ui")
        .service(COLOR, &[COLOR_V4.parse()?])
        .refused("dead.app.svc.cluster.local")
        .build()?;
    scenario.write_mesh(&mesh_yaml(&scenario.certs()))?;
    scenario.issue_certs(30)?;
    let Scenario {
        tb,
        node,
        client,
        mesh,
        servers: _servers,
        ..
    } = scenario;
    let agent = Agent::start(&tb, &node, &mesh, &[])?;
    for pod in ["app/client", "app/color-v1", "app/color-v2"] {
        agent.wait_enrolled(pod, true, Duration::from_secs(20))?;
    }

    // Traffic: about 40 requests per second split 90/10, and 4 per second to the dead route.
    let _canary = load(&tb, &client, "/color", "20")?;
    let _dead = load(&tb, &client, "/dead", "2")?;
    std::thread::sleep(Duration::from_secs(2));
    // The page's first poll then has a sample two seconds old to take rates from, as it
    // would after its own earlier polls.
    agent.admin_get("/ui/graph.json")?;
    std::thread::sleep(Duration::from_secs(2));

    let dom = chromium(&tb, &node, "--dump-dom")?;
    // The page counts its successful polls on the status line.
    let polls = dom
        .split("id=\"status\" data-polls=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|n| n.parse::<u32>().ok());
    ensure!(
        polls.is_some_and(|n| n >= 1),
        "the page did not load its data:\n{dom}"
    );

    let nodes: Vec<(String, String)> = elements(&dom, "g", "node")
        .into_iter()
        .map(|a| {
            (
                a.get("data-id").cloned().unwrap_or_default(),
                a.get("data-kind").cloned().unwrap_or_default(),
            )
        })
        .collect();
    for (id, kind) in [
        ("source:app/client", "source"),
        ("vs:app/color", "virtual_service"),
        ("route:app/color/split", "route"),
        ("route:app/color/dead", "route"),
        ("vn:app/color-v1", "virtual_node"),
        ("vn:app/color-v2", "virtual_node"),
        ("vn:app/dead", "virtual_node"),
        ("ep:app/color-v1", "endpoint"),
        ("ep:app/color-v2", "endpoint"),
        ("ep:dead.app.svc.cluster.local", "endpoint"),
    ] {
        ensure!(
            nodes.contains(&(id.to_owned(), kind.to_owned())),
            "no {kind} node {id} in the page's graph: {nodes:?}"
        );
    }

    // The dead endpoint fails its health check: its virtual node is marked, and only it.
    let ejected: Vec<String> = elements(&dom, "g", "ejected")
        .into_iter()
        .map(|a| format!("{}={}", a["data-id"], a["data-ejected"]))
        .collect();
    ensure!(
        ejected == ["vn:app/dead=1"] && dom.contains("1 endpoint ejected"),
        "ejected marks: {ejected:?}"
    );

    let edges = elements(&dom, "g", "edge");
    let edge = |from: &str, to: &str| -> anyhow::Result<BTreeMap<String, String>> {
        edges
            .iter()
            .find(|a| {
                a.get("data-from").map(String::as_str) == Some(from)
                    && a.get("data-to").map(String::as_str) == Some(to)
            })
            .cloned()
            .with_context(|| format!("no edge {from} -> {to} in {edges:?}"))
    };
    let to_v1 = edge("route:app/color/split", "vn:app/color-v1")?;
    let to_v2 = edge("route:app/color/split", "vn:app/color-v2")?;
    ensure!(number(&to_v1, "data-weight")? == 90.0, "{to_v1:?}");
    ensure!(number(&to_v2, "data-weight")? == 10.0, "{to_v2:?}");
    let (v1_rps, v2_rps) = (number(&to_v1, "data-rps")?, number(&to_v2, "data-rps")?);
    ensure!(
        v1_rps > 5.0 && v2_rps > 0.0 && v1_rps > 3.0 * v2_rps,
        "the canary split on the page: v1 {v1_rps} rps, v2 {v2_rps} rps"
    );
    for e in [&to_v1, &to_v2] {
        ensure!(number(e, "data-error-ratio")? == 0.0, "{e:?}");
        let p99 = number(e, "data-p99-ms")?;
        ensure!(p99 > 0.0 && p99 < 1000.0, "{e:?}");
    }
    let to_dead = edge("route:app/color/dead", "vn:app/dead")?;
    ensure!(number(&to_dead, "data-error-ratio")? == 1.0, "{to_dead:?}");
    ensure!(
        to_dead
            .get("class")
            .is_some_and(|c| c.split(' ').any(|c| c == "errors")),
        "the failing edge is not marked: {to_dead:?}"
    );
    let dead_rps = number(&to_dead, "data-rps")?;
    ensure!(dead_rps > 0.0 && dead_rps < v1_rps, "{to_dead:?}");
    // The source's edge carries everything it sends: the sum of the routes' targets.
    let from_client = edge("source:app/client", "vs:app/color")?;
    let all = number(&from_client, "data-rps")?;
    ensure!(
        (all - (v1_rps + v2_rps + dead_rps)).abs() <= 0.01 * all + 0.01,
        "source edge {all} rps, targets {v1_rps} + {v2_rps} + {dead_rps}"
    );
    let expected_errors = dead_rps / all;
    let ratio = number(&from_client, "data-error-ratio")?;
    ensure!(
        (ratio - expected_errors).abs() < 0.01,
        "source edge error ratio {ratio}, expected {expected_errors}"
    );
    // An endpoint edge of a virtual node with one local pod carries that node's numbers.
    let v1_pod = edge("vn:app/color-v1", "ep:app/color-v1")?;
    ensure!(
        (number(&v1_pod, "data-rps")? - v1_rps).abs() < 1e-6,
        "{v1_pod:?}"
    );
    // The labels a person reads say the same.
    ensure!(
        dom.contains("w 90 · ") && dom.contains("% err") && dom.contains("p99 "),
        "edge labels missing:\n{dom}"
    );

    // The pods table: enrollment and identity expiry.
    let rows: Vec<BTreeMap<String, String>> = dom
        .split("<tr ")
        .skip(1)
        .filter_map(|chunk| chunk.find('>').map(|end| parse_attrs(&chunk[..end])))
        .collect();
    for pod in ["app/client", "app/color-v1", "app/color-v2"] {
        ensure!(
            rows.iter().any(|r| {
                r.get("data-pod").map(String::as_str) == Some(pod)
                    && r.get("data-enrolled").map(String::as_str) == Some("true")
            }),
            "{pod} not shown as enrolled: {rows:?}"
        );
    }
    ensure!(
        // 30 days from issue, in whole seconds: 29 d, or 30 d when the page is read within
        // the second the certificate was issued in.
        dom.contains("spiffe://") && (dom.contains(" (29 d)") || dom.contains(" (30 d)")),
        "color-v1's identity and its expiry in 29-30 days are not shown:\n{dom}"
    );

    // A screenshot for docs/ui.md.
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ui.png");
    let _ = std::fs::remove_file(&shot);
    chromium(&tb, &node, &format!("--screenshot={}", shot.display()))?;
    let png =
        std::fs::read(&shot).with_context(|| format!("no screenshot at {}", shot.display()))?;
    if !png.starts_with(b"\x89PNG") {
        bail!("{} is not a PNG", shot.display());
    }
    println!("screenshot: {}", shot.display());
    Ok(())
}
