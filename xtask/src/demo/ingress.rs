//! The demo's ingress section: a VirtualGateway (examples/ingress) served by the node agent
//! inside the gateway's pod, called with curl from a pod outside the mesh as a load balancer
//! would, showing which GatewayRoute took each request and App Mesh's default rewrites.
//! Kept apart from the main demo so both can change without stepping on each other.

use std::time::Duration;

use anyhow::{Result, ensure};
use serde_json::Value;
use testbed::agent::{Agent, http_server, metric};
use testbed::{Pod, PodSpec, Testbed, run};

use super::{s, say};
use crate::workspace_root;

/// curl from `pod`; the body, then the status.
fn curl(pod: &Pod, args: &[&str]) -> Result<(u16, String)> {
    let output = run(
        pod.command("curl")
            .args([
                "--silent",
                "--max-time",
                "10",
                "--write-out",
                "\n%{http_code}",
            ])
            .args(args),
        Duration::from_secs(20),
    )?;
    let out = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, status) = out.rsplit_once('\n').unwrap_or(("", &out));
    Ok((status.trim().parse().unwrap_or(0), body.to_owned()))
}

pub fn section(tb: &Testbed) -> Result<()> {
    say(
        "Ingress: a VirtualGateway with no proxy of its own. One more node; its gateway pod (app: ingress-gw) runs nothing, the agent serves the gateway's listener inside it.",
    );
    let node = tb.add_node("node-gw")?;
    let gateway =
        node.add_pod(&PodSpec::new("ingress-gw-1", "howto-ingress").label("app", "ingress-gw"))?;
    let red = node.add_pod(
        &PodSpec::new("red", "howto-ingress")
            .label("app", "color")
            .label("version", "red"),
    )?;
    let blue = node.add_pod(
        &PodSpec::new("blue", "howto-ingress")
            .label("app", "color")
            .label("version", "blue"),
    )?;
    let lb = node.add_pod(&PodSpec::new("load-balancer", "outside"))?;
    let mut servers = Vec::new();
    for (pod, name) in [(&red, "red"), (&blue, "blue")] {
        tb.dns_record(
            &format!("{name}.howto-ingress.svc.cluster.local"),
            &pod.ips(),
        )?;
        let server = http_server(tb, pod, 8080, name)?;
        servers.push(server);
    }
    for pod in [&gateway, &red, &blue] {
        node.write_workload(pod)?;
    }
    let mesh = workspace_root().join("examples/ingress");
    say(
        "Starting the agent on node-gw: strait run --mesh examples/ingress (mesh.yaml, gateway.yaml, routes.yaml)",
    );
    let agent = Agent::start(tb, &node, &mesh, &[])?;
    agent.wait_enrolled("howto-ingress/ingress-gw-1", true, Duration::from_secs(20))?;
    for workload in agent.workloads()? {
        if workload["pod"] == "howto-ingress/ingress-gw-1" {
            println!(
                "  {}: {} (listening on {})",
                s(&workload["pod"]),
                s(&workload["reason"]),
                workload["listeners"]
            );
        }
    }
    let gw = gateway.ipv4();
    say(&format!(
        "The load balancer (a pod outside the mesh) calls the gateway pod at {gw}:8088:"
    ));
    println!("  request                               status  answered by  path seen  host seen");
    for (path, extra) in [
        ("/paths/red/hello", vec![]),
        ("/paths/blue", vec![]),
        ("/headers", vec!["-H", "color_header: blue"]),
        ("/headers", vec![]),
        ("/nothing/here", vec![]),
    ] {
        let url = format!("http://{gw}:8088{path}");
        let mut args = extra.clone();
        args.push(&url);
        let (status, body) = curl(&lb, &args)?;
        let seen: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        let request = format!("{path} {}", extra.get(1).copied().unwrap_or(""));
        if seen.is_null() {
            println!("  {request:<37} {status:<7} (the gateway: {})", body.trim());
        } else {
            println!(
                "  {request:<37} {status:<7} {:<12} {:<10} {}",
                s(&seen["name"]),
                s(&seen["path"]),
                s(&seen["headers"]["host"])
            );
        }
    }
    println!(
        "  (App Mesh's defaults: the matched prefix becomes `/`, the host the target virtual service's name.)"
    );
    let (_, body) = curl(&lb, &[&format!("http://{gw}:8088/paths/red")])?;
    let seen: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    println!(
        "  The service saw x-forwarded-for {} (the load balancer), x-forwarded-proto {}.",
        s(&seen["headers"]["x-forwarded-for"]),
        s(&seen["headers"]["x-forwarded-proto"])
    );
    let red_count = metric(
        &agent,
        "strait_gateway_requests_total",
        &["gateway_route=\"howto-ingress/gateway-route-red\""],
    )?;
    ensure!(
        red_count >= 2.0,
        "the gateway's metrics counted {red_count} requests on gateway-route-red"
    );
    println!(
        "  strait_gateway_requests_total{{gateway_route=\"howto-ingress/gateway-route-red\"}} {red_count}"
    );
    agent.stop()?;
    drop(servers);
    Ok(())
}
