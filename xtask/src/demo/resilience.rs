//! The demo's resilience section (docs/resilience.md): one more node with its own agent, a
//! `shop` virtual node of three pods whose listener has a `rateLimit` and `outlierDetection`.
//! A spike of requests is rate limited (429), and `shop-3`, a canary build that answers 500,
//! is ejected after 5 errors in a row and comes back by itself. Kept apart from the main demo
//! so both can change without stepping on each other.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use testbed::agent::{Agent, http_binary, metric};
use testbed::{Pod, PodSpec, Testbed, run};

use super::{s, say};

const SERVICE: &str = "shop.store.svc.cluster.local";
const PODS: [&str; 3] = ["shop-1", "shop-2", "shop-3"];
const EJECTION_SECONDS: u64 = 5;

fn mesh() -> String {
    format!(
        r#"apiVersion: appmesh.k8s.aws/v1beta2
kind: Mesh
metadata: {{name: demo}}
spec: {{egressFilter: {{type: DROP_ALL}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: buyer, namespace: store}}
spec:
  podSelector: {{matchLabels: {{app: buyer}}}}
  backends: [{{virtualService: {{virtualServiceRef: {{name: shop}}}}}}]
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: shop, namespace: store}}
spec:
  podSelector: {{matchLabels: {{app: shop}}}}
  listeners:
    - portMapping: {{port: 8080, protocol: http}}
      rateLimit: {{requestsPerSecond: 20, burst: 20}}
      outlierDetection:
        maxServerErrors: 5
        interval: {{unit: s, value: 30}}
        baseEjectionDuration: {{unit: s, value: {EJECTION_SECONDS}}}
        maxEjectionPercent: 50
  serviceDiscovery: {{dns: {{hostname: shop-pods.store.svc.cluster.local, responseType: ENDPOINTS}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {{name: shop, namespace: store}}
spec:
  awsName: {SERVICE}
  provider: {{virtualNode: {{virtualNodeRef: {{name: shop}}}}}}
"#
    )
}

/// `strait-http load` from the buyer pod; its JSON report.
fn load(buyer: &Pod, query: &str, args: &[&str]) -> Result<Value> {
    let output = run(
        buyer
            .command(http_binary()?)
            .args(["load", &format!("http://{SERVICE}:8080/{query}")])
            .args(args),
        Duration::from_secs(120),
    )?;
    serde_json::from_str(String::from_utf8_lossy(&output.stdout).trim()).with_context(|| {
        format!(
            "strait-http printed no report: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

fn by_server(report: &Value) -> String {
    PODS.iter()
        .map(|p| format!("{p}: {}", report["by_server"][p].as_u64().unwrap_or(0)))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn section(tb: &Testbed) -> Result<()> {
    say(
        "Resilience: one more node. The buyer pod calls shop, three pods behind one listener with \
         rateLimit {requestsPerSecond: 20, burst: 20} and outlierDetection {maxServerErrors: 5, \
         baseEjectionDuration: 5 s, maxEjectionPercent: 50}.",
    );
    let node = tb.add_node("node-r")?;
    let buyer = node.add_pod(&PodSpec::new("buyer", "store").label("app", "buyer"))?;
    let mut shops = Vec::new();
    let mut ips: Vec<std::net::IpAddr> = Vec::new();
    for name in PODS {
        let pod = node.add_pod(&PodSpec::new(name, "store").label("app", "shop"))?;
        let server = tb.spawn(
            &format!("store-{name}"),
            pod.command(http_binary()?)
                .args(["serve", "--listen", "0.0.0.0:8080", "--name", name]),
        )?;
        server.wait_listening(8080, Duration::from_secs(10))?;
        ips.push(pod.ipv4().into());
        shops.push(pod);
    }
    tb.dns_record(SERVICE, &["10.96.0.30".parse()?])?;
    tb.dns_record("shop-pods.store.svc.cluster.local", &ips)?;
    let mesh_path = tb.temp_dir().join("store-mesh").join("mesh.yaml");
    std::fs::create_dir_all(mesh_path.parent().unwrap_or(tb.temp_dir()))?;
    std::fs::write(&mesh_path, mesh())?;
    for pod in shops.iter().chain([&buyer]) {
        node.write_workload(pod)?;
    }
    let agent = Agent::start(tb, &node, &mesh_path, &[])?;
    for pod in shops.iter().chain([&buyer]) {
        agent.wait_enrolled(
            &format!("store/{}", pod.name()),
            true,
            Duration::from_secs(20),
        )?;
    }

    say("A spike: 100 requests at once over 20 connections.");
    let spike = load(&buyer, "", &["--count", "100", "--concurrency", "20"])?;
    println!(
        "  statuses {}: the bucket's 20 (and what refilled meanwhile) served, the rest 429 with retry-after",
        spike["statuses"]
    );
    println!(
        "  strait_rate_limited_total at shop's agent: {}",
        metric(&agent, "strait_rate_limited_total", &[])?
    );
    // Let the bucket fill up again.
    std::thread::sleep(Duration::from_secs(1));

    say(
        "A failing canary: shop-3 answers 500 (the buyer asks with ?fail_on=shop-3). 40 requests, \
         one at a time, 10 a second:",
    );
    let started = Instant::now();
    let report = load(
        &buyer,
        "?fail_on=shop-3",
        &["--count", "40", "--concurrency", "1", "--rate", "10"],
    )?;
    println!("  answered by {}", by_server(&report));
    println!("  statuses {}", report["statuses"]);
    ensure!(
        report["by_server"]["shop-3"].as_u64() == Some(5),
        "shop-3 should have had exactly 5 requests before its ejection: {report}"
    );
    let status: Value = serde_json::from_str(&agent.admin_get("/status/resilience")?)
        .context("/status/resilience")?;
    say("`strait status` (the admin API's /status/resilience) lists the ejected endpoint:");
    for e in status["ejected_endpoints"].as_array().into_iter().flatten() {
        println!(
            "  {} of {}: back in {:.1} s (ejection #{} x {EJECTION_SECONDS} s)",
            s(&e["endpoint"]),
            s(&e["virtual_node"]),
            e["remaining_ms"].as_u64().unwrap_or(0) as f64 / 1000.0,
            e["times"]
        );
    }
    let back = Duration::from_secs(EJECTION_SECONDS + 1).saturating_sub(started.elapsed());
    say(&format!(
        "Waiting {:.1} s: the ejection ends by itself. shop-3 fixed (no more fail_on), 30 requests:",
        back.as_secs_f64()
    ));
    std::thread::sleep(back);
    let report = load(
        &buyer,
        "",
        &["--count", "30", "--concurrency", "1", "--rate", "10"],
    )?;
    println!("  answered by {}", by_server(&report));
    println!(
        "  strait_outlier_ejections_total: {}",
        metric(&agent, "strait_outlier_ejections_total", &[])?
    );
    agent.stop()?;
    Ok(())
}
