//! `cargo xtask demo`: the main job, end to end, explained as it goes.
//!
//! Builds everything, starts a one-node testbed (a client pod and two color servers behind the
//! `color` virtual service, plus a pod outside the mesh), runs the agent on
//! examples/demo/mesh.yaml, drives traffic, prints what happened, and tears everything down.
//! Ctrl-C tears down too.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use testbed::agent::{Agent, peer_binary};
use testbed::{Pod, PodSpec, Testbed, run};

use crate::{cargo, ebpf, setup, workspace_root};

mod mtls;

const SERVICE: &str = "color.demo.svc.cluster.local";
const CONNECTIONS: u32 = 40;

pub fn run_demo() -> Result<()> {
    if !crate::is_root() {
        bail!(
            "the demo needs root (network namespaces, cgroups, eBPF): run `sudo -E cargo xtask demo`"
        );
    }
    setup::setup()?;
    ebpf::build_ebpf()?;
    let status = cargo()
        .args(["build", "-p", "strait", "-p", "strait-tests", "--bins"])
        .current_dir(workspace_root())
        .status()
        .context("cannot run cargo build")?;
    if !status.success() {
        bail!("the build failed");
    }

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

    let node = tb.add_node("node1")?;
    let client = node.add_pod(&PodSpec::new("client", "demo").label("app", "client"))?;
    let v1 = node.add_pod(
        &PodSpec::new("color-v1", "demo")
            .label("app", "color")
            .label("version", "v1"),
    )?;
    let v2 = node.add_pod(
        &PodSpec::new("color-v2", "demo")
            .label("app", "color")
            .label("version", "v2"),
    )?;
    let outside = node.add_pod(&PodSpec::new("web", "elsewhere").label("app", "web"))?;
    let service_addrs: [IpAddr; 2] = ["10.96.0.10".parse()?, "fd00:96::10".parse()?];
    tb.dns_record(SERVICE, &service_addrs)?;
    tb.dns_record("color-v1.demo.svc.cluster.local", &v1.ips())?;
    tb.dns_record("color-v2.demo.svc.cluster.local", &v2.ips())?;
    let peer = peer_binary()?;
    for (pod, name) in [(&v1, "color-v1"), (&v2, "color-v2"), (&outside, "web")] {
        let server = tb.spawn(
            name,
            pod.command(&peer).args([
                "serve",
                "--listen",
                "0.0.0.0:8080,[::]:8080",
                "--name",
                name,
            ]),
        )?;
        server.wait_listening(8080, Duration::from_secs(10))?;
    }
    for pod in [&client, &v1, &v2] {
        node.write_workload(pod)?;
    }
    println!();
    println!("  pod            namespace   address        in the mesh as");
    for (pod, vn) in [
        (&client, "VirtualNode client"),
        (&v1, "VirtualNode color-v1"),
        (&v2, "VirtualNode color-v2"),
        (&outside, "(not in the mesh)"),
    ] {
        println!(
            "  {:<14} {:<11} {:<14} {vn}",
            pod.name(),
            pod.namespace(),
            pod.ipv4()
        );
    }
    println!(
        "  DNS: {SERVICE} -> {}, {}",
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
        "The client calls {SERVICE}:8080 {CONNECTIONS} times with an ordinary TCP client (100 kB each way per connection)."
    ));
    let report = call(
        &client,
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
            "the calls failed: {report}\nagent log:\n{}",
            agent.process.stderr()
        );
    }
    let connections = wait_for_logs(&agent, CONNECTIONS as usize);
    println!();
    println!(
        "  #   captured destination   virtual service   virtual node        endpoint               sent      received"
    );
    for (i, line) in connections.iter().enumerate().take(8) {
        println!(
            "  {:<3} {:<22} {:<17} {:<19} {:<22} {:<9} {}",
            i + 1,
            s(&line["orig_dst"]),
            s(&line["virtual_service"]),
            s(&line["virtual_node"]),
            s(&line["endpoint"]),
            line["bytes_sent"],
            line["bytes_received"]
        );
    }
    if connections.len() > 8 {
        println!("  ... and {} more", connections.len() - 8);
    }
    let mut split: BTreeMap<String, u64> = BTreeMap::new();
    for line in &connections {
        *split.entry(s(&line["virtual_node"])).or_default() += 1;
    }
    println!();
    println!(
        "  The router asked for 75/25. Observed over {} connections:",
        connections.len()
    );
    for (node_name, count) in &split {
        println!(
            "    {node_name:<20} {count:>3}  ({:.0} %)",
            *count as f64 * 100.0 / connections.len().max(1) as f64
        );
    }

    say("The same over IPv6 (connect6):");
    let report6 = call(&client, &["-6", "--count", "4", "--bytes", "1000"])?;
    println!(
        "  {} of 4 connections to [{}]:8080 succeeded: {}",
        report6["succeeded"], service_addrs[1], report6["by_server"]
    );

    say(&format!(
        "The Mesh says egressFilter DROP_ALL: the client tries a pod outside the mesh ({}:8080).",
        outside.ipv4()
    ));
    let refused = run(
        client
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

fn call(client: &Pod, args: &[&str]) -> Result<Value> {
    let output = run(
        client
            .command(peer_binary()?)
            .args(["call", &format!("{SERVICE}:8080")])
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
