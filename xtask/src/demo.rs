//! `cargo xtask demo`: the main job, end to end, explained as it goes.
//!
//! Builds everything, starts a one-node testbed (a front pod, two HTTP color servers behind the
//! `color` virtual service, a TCP echo server behind `echo`, and a pod outside the mesh), runs
//! the agent on examples/demo/mesh.yaml, drives traffic (a 90/10 HTTP canary, a header match,
//! HTTP/2 over IPv6, TCP at L4, the egress filter), prints what happened, then mutual TLS
//! between two more nodes ([`mtls`]), ingress through a VirtualGateway ([`ingress`]) and
//! resilience on another node (a spike rate limited, a failing canary ejected: [`resilience`]),
//! and tears everything down.
//! Ctrl-C tears down too.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use testbed::agent::{Agent, echo_server, http_binary, peer_binary};
use testbed::scenario::{Scenario, Servers};
use testbed::{Pod, PodSpec, Testbed, run};

use crate::{ebpf, setup, workspace_root};

mod ingress;
mod mtls;
mod resilience;

const SERVICE: &str = "color.demo.svc.cluster.local";
const ECHO: &str = "echo.demo.svc.cluster.local";
const REQUESTS: u32 = 1000;
const CONNECTIONS: u32 = 10;

pub fn run_demo() -> Result<()> {
    if !crate::is_root() {
        bail!(
            "the demo needs root (network namespaces, cgroups, eBPF): run `sudo -E cargo xtask demo`"
        );
    }
    setup::setup()?;
    ebpf::build_ebpf()?;
    crate::build_testbed_binaries()?;

    say(
        "Starting a testbed: one node, pods in their own network namespaces and cgroups, a DNS server.",
    );
    let tb = Testbed::new("demo")?;
    let cleanup = tb.cleanup_handle();
    ctrlc::set_handler(move || {
        eprintln!("\nInterrupted: tearing the testbed down.");
        if let Err(error) = cleanup.cleanup() {
            eprintln!("cleanup: {error:#}");
        }
        std::process::exit(130);
    })
    .context("cannot install the Ctrl-C handler")?;

    // The testbed's one-node scenario under the demo's names: front, color-v1 and color-v2 in
    // namespace demo (HTTP servers answering with their pod's name), then the echo pod, then
    // web outside the mesh (a TCP echo server).
    let service_addrs: [IpAddr; 2] = ["10.96.0.10".parse()?, "fd00:96::10".parse()?];
    let Scenario {
        tb,
        node,
        client: front,
        v1,
        v2,
        pods,
        outside,
        ..
    } = Scenario::builder("demo")
        .namespace("demo")
        .client("front")
        .server_names("color-v1", "color-v2")
        .every_address()
        .pod(PodSpec::new("echo", "demo").label("app", "echo"))
        .outside(
            PodSpec::new("web", "elsewhere").label("app", "web"),
            Some("web"),
        )
        .outside_servers(Servers::Peer)
        .service(SERVICE, &service_addrs)
        .service(ECHO, &["10.96.0.11".parse()?])
        .build_in(tb)?;
    let [echo] = pods.as_slice() else {
        bail!(
            "BUG: the scenario made {} extra pods, not one (echo)",
            pods.len()
        );
    };
    tb.dns_record("echo-v1.demo.svc.cluster.local", &echo.ips())?;
    echo_server(&tb, echo, 9000, "echo")?;
    node.write_workload(echo)?;
    let peer = peer_binary()?;
    let http = http_binary()?;
    println!();
    println!("  pod            namespace   address        in the mesh as                serves");
    for (pod, vn, serves) in [
        (&front, "VirtualNode front", "(calls color and echo)"),
        (&v1, "VirtualNode color-v1", "HTTP on 8080"),
        (&v2, "VirtualNode color-v2", "HTTP on 8080"),
        (echo, "VirtualNode echo", "TCP echo on 9000"),
        (&outside, "(not in the mesh)", "TCP echo on 8080"),
    ] {
        println!(
            "  {:<14} {:<11} {:<14} {vn:<29} {serves}",
            pod.name(),
            pod.namespace(),
            pod.ipv4()
        );
    }
    println!(
        "  DNS: {SERVICE} -> {}, {}; {ECHO} -> 10.96.0.11",
        service_addrs[0], service_addrs[1]
    );

    let mesh = workspace_root().join("examples/demo/mesh.yaml");
    say(&format!(
        "Starting the agent: strait run --mesh {}",
        mesh.strip_prefix(workspace_root())
            .unwrap_or(&mesh)
            .display()
    ));
    let agent = Agent::start(&tb, &node, &mesh, &[])?;
    let enrolled = agent.workloads()?;
    for workload in &enrolled {
        println!(
            "  enrolled {:<16} as {:<22} outbound listener {}",
            workload["pod"].as_str().unwrap_or("?"),
            workload["virtual_node"].as_str().unwrap_or("?"),
            workload["listeners"][0].as_str().unwrap_or("?")
        );
    }

    say(&format!(
        "The front pod calls http://{SERVICE}:8080/ {REQUESTS} times over 4 keep-alive HTTP/1.1 connections."
    ));
    let report = http_load(&front, &http, REQUESTS, &[])?;
    let requests = wait_for_requests(&agent, REQUESTS as usize);
    println!();
    println!(
        "  #   method path   route          virtual node        endpoint               status  ms"
    );
    for (i, line) in requests.iter().enumerate().take(8) {
        println!(
            "  {:<3} {:<6} {:<6} {:<14} {:<19} {:<22} {:<7} {}",
            i + 1,
            s(&line["method"]),
            s(&line["path"]),
            s(&line["route"]),
            s(&line["virtual_node"]),
            s(&line["endpoint"]),
            line["status"],
            line["duration_ms"]
        );
    }
    println!("  ... and {} more", requests.len().saturating_sub(8));
    println!();
    println!(
        "  The route color-split asks for 90/10, per request. Observed over {} requests ({} connections from the client):",
        report["completed"], report["connections"]
    );
    print_split(&report);

    say("Requests with the header x-canary: true match the route canary-header (priority 0):");
    let report = http_load(&front, &http, 100, &["-H", "x-canary: true"])?;
    print_split(&report);

    say("The same service over IPv6 and HTTP/2 (curl --http2-prior-knowledge -6):");
    let curl = run(
        front.command("curl").args([
            "--silent",
            "--http2-prior-knowledge",
            "-6",
            "--max-time",
            "10",
            "--write-out",
            "\n%{http_code} HTTP/%{http_version}",
            &format!("http://{SERVICE}:8080/hello"),
        ]),
        Duration::from_secs(20),
    )?;
    let out = String::from_utf8_lossy(&curl.stdout);
    let (body, status) = out.rsplit_once('\n').unwrap_or((&out, ""));
    let seen: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    println!(
        "  {status} from {} (it saw {} {} with x-forwarded-for {} and x-request-id {})",
        s(&seen["name"]),
        s(&seen["method"]),
        s(&seen["path"]),
        s(&seen["headers"]["x-forwarded-for"]),
        s(&seen["headers"]["x-request-id"])
    );

    say(&format!(
        "TCP stays L4: the front pod opens {CONNECTIONS} connections to {ECHO}:9000 (100 kB each way)."
    ));
    let report = call(
        &front,
        &format!("{ECHO}:9000"),
        &[
            "-4",
            "--count",
            &CONNECTIONS.to_string(),
            "--bytes",
            "100000",
        ],
    )?;
    if report["ok"] != true {
        bail!(
            "the TCP calls failed: {report}\nagent log:\n{}",
            agent.process.stderr()
        );
    }
    let connections = wait_for_logs(&agent, CONNECTIONS as usize);
    println!(
        "  {} connections, each forwarded intact: {} bytes sent, {} received in all; served by {}",
        connections.len(),
        connections
            .iter()
            .map(|l| l["bytes_sent"].as_u64().unwrap_or(0))
            .sum::<u64>(),
        connections
            .iter()
            .map(|l| l["bytes_received"].as_u64().unwrap_or(0))
            .sum::<u64>(),
        report["by_server"]
    );

    say(&format!(
        "The Mesh says egressFilter DROP_ALL: the client tries a pod outside the mesh ({}:8080).",
        outside.ipv4()
    ));
    let refused = run(
        front
            .command(&peer)
            .args(["call", &format!("{}:8080", outside.ipv4()), "-4"]),
        Duration::from_secs(30),
    )?;
    let refused: Value = serde_json::from_slice(&refused.stdout).unwrap_or(Value::Null);
    println!(
        "  refused before any packet left the pod: {}",
        s(&refused["errors"][0]["message"])
    );

    say("What the eBPF programs counted (admin API /stats):");
    let counters = agent.counters()?;
    for reason in [
        "captured",
        "rekeyed",
        "denied",
        "passed",
        "not_enrolled",
        "lookup_miss",
    ] {
        println!("  {reason:<13} {}", counters[reason]);
    }

    mtls::section(&tb)?;
    ingress::section(&tb)?;
    resilience::section(&tb)?;

    say("Stopping the agent and tearing the testbed down.");
    agent.stop()?;
    let bpffs = node.bpffs().to_path_buf();
    let output = testbed::agent::strait(
        &node,
        &["uninstall", "--bpffs", &bpffs.display().to_string()],
    )?;
    print!("  {}", String::from_utf8_lossy(&output.stdout));
    tb.cleanup()?;
    println!("Done.");
    Ok(())
}

fn call(client: &Pod, target: &str, args: &[&str]) -> Result<Value> {
    let output = run(
        client
            .command(peer_binary()?)
            .args(["call", target])
            .args(args),
        Duration::from_secs(120),
    )?;
    serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "strait-peer printed no report: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

fn http_load(front: &Pod, http: &std::path::Path, count: u32, args: &[&str]) -> Result<Value> {
    let count = count.to_string();
    let output = run(
        front
            .command(http)
            .args([
                "load",
                &format!("http://{SERVICE}:8080/"),
                "--concurrency",
                "4",
            ])
            .args(["--count", &count])
            .args(args),
        Duration::from_secs(120),
    )?;
    let report: Value = serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "strait-http printed no report: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    if report["ok"] != true {
        bail!("the HTTP requests failed: {report}");
    }
    Ok(report)
}

fn print_split(report: &Value) {
    let total = report["completed"].as_u64().unwrap_or(0).max(1) as f64;
    if let Some(by_server) = report["by_server"].as_object() {
        for (server, count) in by_server {
            let count = count.as_u64().unwrap_or(0);
            println!(
                "    {server:<10} {count:>5}  ({:.1} %)",
                count as f64 * 100.0 / total
            );
        }
    }
}

/// The agent's per-request log lines (`target` = `strait::request`), once `count` are there.
fn wait_for_requests(agent: &Agent, count: usize) -> Vec<Value> {
    let requests = || -> Vec<Value> {
        agent
            .log_lines()
            .into_iter()
            .filter(|l| l["target"] == "strait::request")
            .collect()
    };
    for _ in 0..50 {
        let lines = requests();
        if lines.len() >= count {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    requests()
}

fn wait_for_logs(agent: &Agent, count: usize) -> Vec<Value> {
    for _ in 0..50 {
        let logs = agent.connection_logs();
        if logs.len() >= count {
            return logs;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    agent.connection_logs()
}

fn s(value: &Value) -> String {
    value
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| value.to_string())
}

fn say(text: &str) {
    println!("\n== {text}");
}
