//! The outside tools the benchmark drives: which must be installed (`cargo xtask setup`
//! installs them), the nginx and HAProxy configurations, and the runs of wrk (HTTP/1.1
//! throughput), h2load (HTTP/2 throughput) and iperf3 (bulk) with their output parsed.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use testbed::{Pod, require_tool, run, run_ok};

use super::environment::{
    SIDECAR_IN_PLAIN_PORT, SIDECAR_IN_PORT, SIDECAR_OUT_PLAIN_PORT, SIDECAR_OUT_PORT,
    SIDECAR_OUT_XNODE_PORT,
};

/// Fails with what to install if a tool the full benchmark runs is missing.
pub(super) fn require_all() -> anyhow::Result<()> {
    for tool in ["wrk", "iperf3", "nginx", "haproxy", "openssl"] {
        require_tool(tool)
            .with_context(|| format!("`{tool}` is missing: run `cargo xtask setup`"))?;
    }
    require_tool("h2load")
        .context("`h2load` is missing: apt-get install nghttp2-client (Debian)")?;
    Ok(())
}

/// The Python interpreter that has grpcio (`cargo xtask setup` installs it).
pub(super) fn python_with_grpcio() -> anyhow::Result<PathBuf> {
    let output = run(
        Command::new("python3").args(["-c", "import grpc, sys; print(sys.executable)"]),
        Duration::from_secs(30),
    )?;
    if !output.status.success() {
        bail!(
            "the gRPC scenarios need Python's grpcio (`cargo xtask setup` installs it): {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(PathBuf::from(
        String::from_utf8_lossy(&output.stdout).trim().to_owned(),
    ))
}

/// wrk, one thread and 32 connections, for `seconds` from `client` to `target`: requests per
/// second and requests done (an error if any failed).
pub(super) fn wrk(client: &Pod, target: SocketAddr, seconds: u32) -> anyhow::Result<(f64, u64)> {
    let output = run_ok(
        client
            .command("wrk")
            .args(["-t1", "-c32", &format!("-d{seconds}s")])
            .arg(format!("http://{target}/")),
        Duration::from_secs(u64::from(seconds) + 60),
    )?;
    let text = String::from_utf8_lossy(&output.stdout);
    let (rps, requests) = parse_wrk(&text)?;
    if requests == 0 || text.contains("Non-2xx") || text.contains("Socket errors") {
        bail!("wrk saw errors:\n{text}");
    }
    Ok((rps, requests))
}

/// h2load with `connections` connections of `streams` concurrent streams for `seconds` from
/// `client` to `target`: requests per second and requests done (an error if any failed).
pub(super) fn h2load(
    client: &Pod,
    target: SocketAddr,
    connections: u32,
    streams: u32,
    seconds: u32,
) -> anyhow::Result<(f64, u64)> {
    let output = run_ok(
        client
            .command("h2load")
            .args(["-t1", "-c", &connections.to_string()])
            .args(["-m", &streams.to_string()])
            .args(["-D", &seconds.to_string()])
            .arg(format!("http://{target}/")),
        Duration::from_secs(u64::from(seconds) + 60),
    )?;
    let text = String::from_utf8_lossy(&output.stdout);
    let (rps, requests, failed) = parse_h2load(&text)?;
    if requests == 0 || failed > 0 {
        bail!("h2load saw {failed} failed or errored requests:\n{text}");
    }
    Ok((rps, requests))
}

/// One iperf3 stream for `seconds` from `client` to `target`: bits per second and bytes
/// received.
pub(super) fn iperf3(client: &Pod, target: SocketAddr, seconds: u32) -> anyhow::Result<(f64, f64)> {
    let output = run_ok(
        client
            .command("iperf3")
            .args([
                "-c",
                &target.ip().to_string(),
                "-p",
                &target.port().to_string(),
            ])
            .args(["-t", &seconds.to_string(), "-J"]),
        Duration::from_secs(u64::from(seconds) + 60),
    )?;
    let report: Value = serde_json::from_slice(&output.stdout).context("iperf3 JSON report")?;
    let bps = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 report without end.sum_received.bits_per_second")?;
    let bytes = report["end"]["sum_received"]["bytes"]
        .as_f64()
        .unwrap_or(0.0);
    Ok((bps, bytes))
}

/// Requests per second, requests done and requests failed or errored, from h2load's output.
fn parse_h2load(text: &str) -> anyhow::Result<(f64, u64, u64)> {
    // finished in 5.00s, 31034.20 req/s, 1.07MB/s
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|v| v.strip_suffix(" req/s"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("no req/s in h2load's output:\n{text}"))?;
    // requests: 155171 total, 155171 started, 155171 done, 155171 succeeded, 0 failed, 0 errored, 0 timeout
    let counts = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("requests: "))
        .with_context(|| format!("no request counts in h2load's output:\n{text}"))?;
    let count = |what: &str| -> u64 {
        counts
            .split(", ")
            .find_map(|c| c.strip_suffix(what)?.trim().parse().ok())
            .unwrap_or(0)
    };
    Ok((
        rps,
        count(" succeeded"),
        count(" failed") + count(" errored"),
    ))
}

/// `Requests/sec` and the request count from wrk's output.
fn parse_wrk(text: &str) -> anyhow::Result<(f64, u64)> {
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("no Requests/sec in wrk's output:\n{text}"))?;
    let requests = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .with_context(|| format!("no request count in wrk's output:\n{text}"))?;
    Ok((rps, requests))
}

pub(super) fn nginx_conf_text(dir: &Path, http1_ports: &[u16], h2_port: Option<u16>) -> String {
    let d = dir.display();
    let mut listen: String = http1_ports
        .iter()
        .map(|p| format!("        listen {p};\n"))
        .collect();
    if let Some(p) = h2_port {
        // Plaintext `http2` on a listen line is HTTP/2 with prior knowledge (h2c).
        listen.push_str(&format!("        listen {p} http2;\n"));
    }
    format!(
        r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/nginx-body;
    proxy_temp_path {d}/nginx-proxy;
    fastcgi_temp_path {d}/nginx-fastcgi;
    uwsgi_temp_path {d}/nginx-uwsgi;
    scgi_temp_path {d}/nginx-scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    http2_max_requests 10000000;
    server {{
{listen}        location / {{ return 200 "hello from the strait bench\n"; }}
    }}
}}
"#
    )
}

const HAPROXY_COMMON: &str = r#"global
    maxconn 4096
    nbthread 1
defaults
    mode http
    timeout connect 5s
    timeout client 120s
    timeout server 120s
"#;

/// The server pod's sidecar: TLS on [`SIDECAR_IN_PORT`], plaintext on
/// [`SIDECAR_IN_PLAIN_PORT`], both to the app on `app_port`.
pub(super) fn haproxy_inbound(pem: &Path, app_port: u16) -> String {
    format!(
        "{HAPROXY_COMMON}frontend inbound\n    bind :{SIDECAR_IN_PORT} ssl crt {}\n    default_backend app\nbackend app\n    http-reuse always\n    server app 127.0.0.1:{app_port}\n\
         frontend inbound-plain\n    bind :{SIDECAR_IN_PLAIN_PORT}\n    default_backend app\n",
        pem.display()
    )
}

/// The client pod's sidecar: to the same-node server's sidecar with TLS and without, and to
/// node2's server's sidecar with TLS.
pub(super) fn haproxy_outbound(server: IpAddr, xnode_server: IpAddr) -> String {
    format!(
        "{HAPROXY_COMMON}frontend outbound\n    bind 127.0.0.1:{SIDECAR_OUT_PORT}\n    default_backend peer\nbackend peer\n    http-reuse always\n    server peer {server}:{SIDECAR_IN_PORT} ssl verify none\n\
         frontend outbound-xnode\n    bind 127.0.0.1:{SIDECAR_OUT_XNODE_PORT}\n    default_backend peer-xnode\nbackend peer-xnode\n    http-reuse always\n    server peer {xnode_server}:{SIDECAR_IN_PORT} ssl verify none\n\
         frontend outbound-plain\n    bind 127.0.0.1:{SIDECAR_OUT_PLAIN_PORT}\n    default_backend peer-plain\nbackend peer-plain\n    http-reuse always\n    server peer {server}:{SIDECAR_IN_PLAIN_PORT}\n"
    )
}

pub(super) fn machine() -> Value {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let tool = |cmd: &str, arg: &str| {
        run(Command::new(cmd).arg(arg), Duration::from_secs(5))
            .map(|o| {
                let text = [o.stdout, o.stderr].concat();
                String::from_utf8_lossy(&text)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_owned()
            })
            .unwrap_or_default()
    };
    json!({
        "kernel": kernel.trim(),
        "cpu": model,
        "cpus": cpus,
        "wrk": tool("wrk", "--version"),
        "iperf3": tool("iperf3", "--version"),
        "nginx": tool("nginx", "-v"),
        "haproxy": tool("haproxy", "-v"),
        "h2load": tool("h2load", "--version"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h2load_output_is_parsed() {
        let text = "finished in 5.00s, 31034.20 req/s, 1.07MB/s\nrequests: 155171 total, 155171 started, 155171 done, 155100 succeeded, 71 failed, 0 errored, 0 timeout\n";
        assert_eq!(parse_h2load(text).unwrap(), (31034.2, 155100, 71));
    }

    #[test]
    fn wrk_output_is_parsed() {
        let text = "Running 5s test @ http://10.0.0.1:8080/\n  1 threads and 32 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency   1.00ms  0.20ms   3.00ms   90.00%\n  50000 requests in 5.00s, 9.00MB read\nRequests/sec:  10000.50\nTransfer/sec:      1.80MB\n";
        assert_eq!(parse_wrk(text).unwrap(), (10000.5, 50000));
    }
}
