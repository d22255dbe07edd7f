//! Running the strait agent on a testbed node, and reading what it says: its admin API (from
//! inside the node's network namespace, with curl) and its JSON log.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::{Node, Process, Testbed, run};

/// The admin address every test agent listens on, inside its node's network namespace.
pub const ADMIN: &str = "127.0.0.1:15000";

/// The agent binary: `$STRAIT_BIN`, else the workspace's debug build.
pub fn strait_binary() -> anyhow::Result<PathBuf> {
    let path = match std::env::var_os("STRAIT_BIN") {
        Some(path) => PathBuf::from(path),
        None => target_dir().join("debug").join("strait"),
    };
    if !path.exists() {
        bail!(
            "the agent binary {} does not exist: build it with `cargo build -p strait` (cargo xtask test does)",
            path.display()
        );
    }
    Ok(path)
}

/// The CNI plugin binary: `$STRAIT_CNI_BIN`, else the workspace's debug build.
pub fn cni_binary() -> anyhow::Result<PathBuf> {
    let path = match std::env::var_os("STRAIT_CNI_BIN") {
        Some(path) => PathBuf::from(path),
        None => target_dir().join("debug").join("strait-cni"),
    };
    if !path.exists() {
        bail!(
            "the CNI plugin binary {} does not exist: build it with `cargo build -p strait-cni` (cargo xtask test does)",
            path.display()
        );
    }
    Ok(path)
}

/// The peer tool binary: `$STRAIT_PEER_BIN`, else the workspace's debug build.
pub fn peer_binary() -> anyhow::Result<PathBuf> {
    let path = match std::env::var_os("STRAIT_PEER_BIN") {
        Some(path) => PathBuf::from(path),
        None => target_dir().join("debug").join("strait-peer"),
    };
    if !path.exists() {
        bail!(
            "the peer tool {} does not exist: build it with `cargo build -p strait-tests --bins`",
            path.display()
        );
    }
    Ok(path)
}

/// The HTTP test tool binary: `$STRAIT_HTTP_BIN`, else the workspace's debug build.
pub fn http_binary() -> anyhow::Result<PathBuf> {
    let path = match std::env::var_os("STRAIT_HTTP_BIN") {
        Some(path) => PathBuf::from(path),
        None => target_dir().join("debug").join("strait-http"),
    };
    if !path.exists() {
        bail!(
            "the HTTP test tool {} does not exist: build it with `cargo build -p strait-tests --bins`",
            path.display()
        );
    }
    Ok(path)
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

static STARTS: AtomicU32 = AtomicU32::new(0);

/// A running agent.
pub struct Agent {
    pub process: Process,
    node: Node,
}

impl Agent {
    /// Starts `strait run` in the node's network namespace with the node's cgroup root, bpffs
    /// folder and workloads directory, and waits until `/ready` answers 200.
    pub fn start(tb: &Testbed, node: &Node, mesh: &Path, extra: &[&str]) -> anyhow::Result<Agent> {
        Agent::start_with(tb, node, mesh, extra, |_| {})
    }

    /// [`Agent::start`], with `customize` applied to the command before it is spawned (for
    /// tests that need the agent started under particular process settings).
    pub fn start_with(
        tb: &Testbed,
        node: &Node,
        mesh: &Path,
        extra: &[&str],
        customize: impl FnOnce(&mut Command),
    ) -> anyhow::Result<Agent> {
        let workloads = node.workloads_dir().to_string_lossy().into_owned();
        let agent = Self::spawn_with(
            tb,
            node,
            mesh,
            &["--workloads", &workloads],
            extra,
            customize,
        )?;
        agent.wait_ready(Duration::from_secs(20))?;
        Ok(agent)
    }

    /// Starts `strait run --kubernetes` with the node's name and `kubeconfig` (the test API
    /// server's, see [`crate::kubeapi`]), and waits until `/ready` answers 200.
    pub fn start_kubernetes(
        tb: &Testbed,
        node: &Node,
        mesh: &Path,
        kubeconfig: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Agent> {
        let agent = Self::spawn_kubernetes(tb, node, mesh, kubeconfig, extra)?;
        agent.wait_ready(Duration::from_secs(30))?;
        Ok(agent)
    }

    /// Like [`Agent::start_kubernetes`], without waiting for `/ready`.
    pub fn spawn_kubernetes(
        tb: &Testbed,
        node: &Node,
        mesh: &Path,
        kubeconfig: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Agent> {
        let kubeconfig = kubeconfig.to_string_lossy().into_owned();
        let source = [
            "--kubernetes",
            "--node-name",
            node.name(),
            "--kubeconfig",
            &kubeconfig,
        ];
        Self::spawn(tb, node, mesh, &source, extra)
    }

    /// Starts `strait run` with the pod source arguments `source`, without waiting.
    pub fn spawn(
        tb: &Testbed,
        node: &Node,
        mesh: &Path,
        source: &[&str],
        extra: &[&str],
    ) -> anyhow::Result<Agent> {
        Self::spawn_with(tb, node, mesh, source, extra, |_| {})
    }

    fn spawn_with(
        tb: &Testbed,
        node: &Node,
        mesh: &Path,
        source: &[&str],
        extra: &[&str],
        customize: impl FnOnce(&mut Command),
    ) -> anyhow::Result<Agent> {
        let binary = strait_binary()?;
        let mut command = node.command(&binary);
        command
            .args(["--log-format", "json", "run", "--mesh"])
            .arg(mesh)
            .args(source)
            .arg("--cgroup-root")
            .arg(node.cgroup_root())
            .arg("--bpffs")
            .arg(node.bpffs())
            .args(["--admin", ADMIN])
            .arg("--handover-socket")
            .arg(tb.temp_dir().join(format!("{}-handover.sock", node.name())))
            .args(extra);
        // Tests that drain give their own timeout; the others get one long enough for a
        // debug build.
        if !extra.contains(&"--drain-timeout") {
            command.args(["--drain-timeout", "5"]);
        }
        command
            // The per-request line (`strait::request`) is DEBUG; tests and the demo read it.
            .env("RUST_LOG", "info,strait::request=debug");
        customize(&mut command);
        let label = format!(
            "agent-{}-{}",
            node.name(),
            STARTS.fetch_add(1, Ordering::Relaxed)
        );
        let process = tb.spawn(&label, &mut command)?;
        Ok(Agent {
            process,
            node: node.clone(),
        })
    }

    /// Waits until this agent's `/ready` answers 200.
    pub fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.process.try_wait()? {
                bail!(
                    "the agent exited ({status}) before it was ready; stderr:\n{}",
                    self.process.stderr()
                );
            }
            // During an upgrade two agents share the admin port: wait for this one's answer.
            let me = format!("(pid {})", self.process.pid());
            if self
                .admin_get("/ready")
                .is_ok_and(|body| body.contains(&me))
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the agent was not ready after {timeout:?}; stderr:\n{}",
                    self.process.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The HTTP status of an admin path (0 when nothing answers).
    pub fn admin_status(&self, path: &str) -> anyhow::Result<u16> {
        let url = format!("http://{ADMIN}{path}");
        let output = run(
            self.node
                .command("curl")
                .args([
                    "--silent",
                    "--output",
                    "/dev/null",
                    "--write-out",
                    "%{http_code}",
                    "--max-time",
                    "5",
                ])
                .arg(&url),
            Duration::from_secs(10),
        )?;
        Ok(String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .unwrap_or(0))
    }

    /// GET an admin path; an error unless the answer is 2xx.
    pub fn admin_get(&self, path: &str) -> anyhow::Result<String> {
        let url = format!("http://{ADMIN}{path}");
        let output = run(
            self.node
                .command("curl")
                .args(["--silent", "--show-error", "--fail", "--max-time", "5"])
                .arg(&url),
            Duration::from_secs(10),
        )?;
        if !output.status.success() {
            bail!(
                "GET {url}: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// The eBPF counters (`/stats` → `redirect`).
    pub fn counters(&self) -> anyhow::Result<Value> {
        let stats: Value = serde_json::from_str(&self.admin_get("/stats")?)?;
        Ok(stats["redirect"].clone())
    }

    pub fn counter(&self, reason: &str) -> anyhow::Result<u64> {
        self.counters()?[reason]
            .as_u64()
            .with_context(|| format!("no counter {reason} in /stats"))
    }

    /// The agent's `/workloads` answer.
    pub fn workloads(&self) -> anyhow::Result<Vec<Value>> {
        Ok(serde_json::from_str(&self.admin_get("/workloads")?)?)
    }

    /// Polls `/workloads` until `pod` (`namespace/name`) is enrolled (`true`) or absent and
    /// not enrolled (`false`).
    pub fn wait_enrolled(
        &self,
        pod: &str,
        enrolled: bool,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self
                .workloads()?
                .iter()
                .any(|w| w["pod"] == pod && w["enrolled"] == true);
            if now == enrolled {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "pod {pod} enrolled={now} after {timeout:?}, wanted {enrolled}; agent stderr:\n{}",
                    self.process.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every JSON log line the agent wrote so far.
    pub fn log_lines(&self) -> Vec<Value> {
        self.process
            .stderr()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// The per-connection log lines (`target` = `strait::connection`).
    pub fn connection_logs(&self) -> Vec<Value> {
        self.log_lines()
            .into_iter()
            .filter(|line| line["target"] == "strait::connection")
            .collect()
    }

    /// SIGTERM, then wait for the exit.
    pub fn stop(&self) -> anyhow::Result<ExitStatus> {
        self.process.signal(libc::SIGTERM)?;
        self.process.wait_timeout(Duration::from_secs(15))
    }
}

/// Runs `strait` with arguments in the node (for one-shot commands such as `uninstall` or
/// `validate`); returns its output, bounded by 30 s.
pub fn strait(node: &Node, args: &[&str]) -> anyhow::Result<std::process::Output> {
    let mut command: Command = node.command(strait_binary()?);
    command.args(args);
    run(&mut command, Duration::from_secs(30))
}

/// [`strait`] that must succeed; its stdout.
pub fn strait_ok(node: &Node, args: &[&str]) -> anyhow::Result<String> {
    let output = strait(node, args)?;
    anyhow::ensure!(
        output.status.success(),
        "strait {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A new CA in `ca_dir` (`strait ca init`) and the certificates `mesh` names, issued by it
/// (`strait ca issue`): what a test with mTLS needs before its agents start.
pub fn issue_mesh_certs(
    node: &Node,
    mesh: &std::path::Path,
    ca_dir: &std::path::Path,
) -> anyhow::Result<()> {
    let (mesh, ca_dir) = (mesh.display().to_string(), ca_dir.display().to_string());
    strait_ok(node, &["ca", "init", "--dir", &ca_dir])?;
    strait_ok(node, &["ca", "issue", "--mesh", &mesh, "--ca-dir", &ca_dir])?;
    Ok(())
}

/// The sum of the samples of an agent's metric whose labels include every `labels` fragment.
pub fn metric(agent: &Agent, name: &str, labels: &[&str]) -> anyhow::Result<f64> {
    let text = agent.admin_get("/metrics")?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// Starts `strait-peer serve` in `pod` on `port` (both families; it answers with `name`), and
/// waits until it listens.
pub fn echo_server(
    tb: &Testbed,
    pod: &crate::Pod,
    port: u16,
    name: &str,
) -> anyhow::Result<Process> {
    let server = tb.spawn(
        &format!("server-{name}"),
        pod.command(peer_binary()?).args([
            "serve",
            "--listen",
            &format!("0.0.0.0:{port},[::]:{port}"),
            "--name",
            name,
        ]),
    )?;
    server.wait_listening(port, Duration::from_secs(10))?;
    Ok(server)
}

/// Starts `strait-http serve` named `name` in `pod` on `port` (IPv4 and IPv6) and waits until
/// it listens.
pub fn http_server(
    tb: &Testbed,
    pod: &crate::Pod,
    port: u16,
    name: &str,
) -> anyhow::Result<Process> {
    let server = tb.spawn(
        &format!("http-{name}"),
        pod.command(http_binary()?).args([
            "serve",
            "--listen",
            &format!("0.0.0.0:{port},[::]:{port}"),
            "--name",
            name,
        ]),
    )?;
    server.wait_listening(port, Duration::from_secs(10))?;
    Ok(server)
}
