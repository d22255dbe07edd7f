//! The benchmark's testbed: two nodes, their pods and servers (nginx, iperf3, a Python grpcio
//! server), the HAProxy sidecars, the mesh file and its certificates, node2's agent and node1's
//! agent with the flags a scenario wants ([`Env`]); where each scenario's client connects
//! ([`Env::target`]); and the Ctrl-C handler that tears testbeds down.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;

use testbed::agent::{Agent, issue_mesh_certs};
use testbed::{Node, Pod, PodSpec, Process, Testbed, addr, run_ok};

use super::procfs::proc_status_kib;
use super::scenario::{self, Scenario, Topology, Way, Workload};
use super::tools::{haproxy_inbound, haproxy_outbound, nginx_conf_text};
use super::{AgentFlags, Binaries};
use crate::workspace_root;

pub(super) const SERVICE: &str = "web.bench.svc.cluster.local";
const SERVICE_V4: &str = "10.96.0.30";
pub(super) const SERVICE2: &str = "web2.bench.svc.cluster.local";
const SERVICE2_V4: &str = "10.96.0.31";
pub(super) const SERVICE2_TLS: &str = "web2-tls.bench.svc.cluster.local";
const SERVICE2_TLS_V4: &str = "10.96.0.32";
/// nginx, HTTP/1.1, behind a `tcp` listener.
pub(super) const HTTP_PORT: u16 = 8080;
/// nginx, HTTP/1.1, behind an `http` listener (also the port of node2's servers).
pub(super) const HTTP_L7_PORT: u16 = 8081;
/// nginx, HTTP/2 with prior knowledge, behind an `http2` listener.
pub(super) const H2_PORT: u16 = 8082;
/// Python grpcio, behind a `grpc` listener.
pub(super) const GRPC_PORT: u16 = 50051;
pub(super) const BULK_PORT: u16 = 5201;
/// The client's sidecar: to the same-node server's sidecar.
pub(super) const SIDECAR_OUT_PORT: u16 = 15100;
/// The client's sidecar: to node2's server's sidecar.
pub(super) const SIDECAR_OUT_XNODE_PORT: u16 = 15101;
pub(super) const SIDECAR_IN_PORT: u16 = 8443;
/// The client's sidecar: to the same-node server's sidecar, without TLS.
pub(super) const SIDECAR_OUT_PLAIN_PORT: u16 = 15102;
/// The same-node server's sidecar, without TLS.
pub(super) const SIDECAR_IN_PLAIN_PORT: u16 = 8444;

/// The testbed and the long-running servers, sidecars and node2's agent.
pub(super) struct Env {
    tb: Testbed,
    node1: Node,
    node2: Node,
    pub(super) client: Pod,
    server: Pod,
    web2: Pod,
    _web2_tls: Pod,
    mesh: PathBuf,
    pub(super) xtask: PathBuf,
    /// node2's agent (fast path on, the default), for the whole run.
    pub(super) agent2: Agent,
    /// The client's sidecar, the same-node server's, node2's server's.
    sidecars: [Process; 3],
    _servers: Vec<Process>,
}

impl Env {
    pub(super) fn start(bin: &Binaries, python: &Path) -> anyhow::Result<Env> {
        // SAFETY (of the environment): the bench is single-threaded here; testbed::agent reads
        // STRAIT_BIN to find the agent binary.
        unsafe { std::env::set_var("STRAIT_BIN", &bin.strait) };
        let tb = Testbed::new("bench")?;
        on_interrupt_clean(&tb);
        let node1 = tb.add_node("node1")?;
        let node2 = tb.add_node("node2")?;
        // Pods must exist before the agents start: an agent lives in its own mount namespace
        // and does not see netns files mounted after it.
        let client = node1.add_pod(&PodSpec::new("client", "bench").label("app", "client"))?;
        let server = node1.add_pod(&PodSpec::new("web", "bench").label("app", "web"))?;
        let web2 = node2.add_pod(&PodSpec::new("web2", "bench").label("app", "web2"))?;
        let web2_tls =
            node2.add_pod(&PodSpec::new("web2-tls", "bench").label("app", "web2-tls"))?;
        tb.dns_record(SERVICE, &[SERVICE_V4.parse()?])?;
        tb.dns_record(SERVICE2, &[SERVICE2_V4.parse()?])?;
        tb.dns_record(SERVICE2_TLS, &[SERVICE2_TLS_V4.parse()?])?;
        tb.dns_record("web-pods.bench.svc.cluster.local", &[server.ipv4().into()])?;
        tb.dns_record("web2-pods.bench.svc.cluster.local", &[web2.ipv4().into()])?;
        tb.dns_record(
            "web2-tls-pods.bench.svc.cluster.local",
            &[web2_tls.ipv4().into()],
        )?;
        let dir = tb.temp_dir().join("bench");
        std::fs::create_dir_all(&dir)?;

        let mut servers = Vec::new();
        for (pod, ports, h2) in [
            (&server, &[HTTP_PORT, HTTP_L7_PORT][..], Some(H2_PORT)),
            (&web2, &[HTTP_L7_PORT][..], None),
            (&web2_tls, &[HTTP_L7_PORT, HTTP_PORT][..], None),
        ] {
            let nginx_dir = dir.join(format!("nginx-{}", pod.name()));
            std::fs::create_dir_all(&nginx_dir)?;
            let conf = nginx_dir.join("nginx.conf");
            std::fs::write(&conf, nginx_conf_text(&nginx_dir, ports, h2))?;
            let nginx = tb.spawn(
                &format!("nginx-{}", pod.name()),
                pod.command("nginx").arg("-c").arg(&conf),
            )?;
            nginx.wait_listening(ports[0], Duration::from_secs(10))?;
            servers.push(nginx);
        }
        let iperf = tb.spawn(
            "iperf3",
            server
                .command("iperf3")
                .args(["-s", "-p", &BULK_PORT.to_string()]),
        )?;
        iperf.wait_listening(BULK_PORT, Duration::from_secs(10))?;
        servers.push(iperf);
        let grpc = tb.spawn(
            "grpc-server",
            server
                .command(python)
                .arg(workspace_root().join("tests/grpc/color_grpc.py"))
                .args(["serve", "--port", &GRPC_PORT.to_string(), "--name", "web"]),
        )?;
        grpc.wait_listening(GRPC_PORT, Duration::from_secs(20))?;
        servers.push(grpc);

        // The sidecar pair: a self-signed certificate, HAProxy in each pod.
        let key = dir.join("tls.key");
        let crt = dir.join("tls.crt");
        run_ok(
            Command::new("openssl")
                .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
                .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
                .args(["-subj", "/CN=web.bench.svc.cluster.local", "-keyout"])
                .arg(&key)
                .arg("-out")
                .arg(&crt),
            Duration::from_secs(30),
        )?;
        let pem = dir.join("tls.pem");
        std::fs::write(&pem, [std::fs::read(&crt)?, std::fs::read(&key)?].concat())?;
        let mut sidecar_in = Vec::new();
        for (pod, app_port) in [(&server, HTTP_PORT), (&web2, HTTP_L7_PORT)] {
            let conf = dir.join(format!("haproxy-in-{}.cfg", pod.name()));
            std::fs::write(&conf, haproxy_inbound(&pem, app_port))?;
            let sidecar = tb.spawn(
                &format!("sidecar-in-{}", pod.name()),
                pod.command("haproxy").args(["-db", "-f"]).arg(&conf),
            )?;
            sidecar.wait_listening(SIDECAR_IN_PORT, Duration::from_secs(10))?;
            sidecar_in.push(sidecar);
        }
        let outbound = dir.join("haproxy-out.cfg");
        std::fs::write(
            &outbound,
            haproxy_outbound(server.ipv4().into(), web2.ipv4().into()),
        )?;
        let sidecar_out = tb.spawn(
            "sidecar-out",
            client.command("haproxy").args(["-db", "-f"]).arg(&outbound),
        )?;
        sidecar_out.wait_listening(SIDECAR_OUT_PORT, Duration::from_secs(10))?;
        let [sidecar_in_web, sidecar_in_web2]: [Process; 2] = sidecar_in
            .try_into()
            .map_err(|_| anyhow::anyhow!("BUG: two inbound sidecars"))?;

        // The mesh, its certificates (`strait ca`), the workloads, node2's agent.
        let mesh_dir = dir.join("mesh");
        let certs = dir.join("certs");
        let ca = dir.join("ca");
        std::fs::create_dir_all(&mesh_dir)?;
        let mesh = mesh_dir.join("mesh.yaml");
        std::fs::write(&mesh, scenario::mesh_yaml(&certs))?;
        issue_mesh_certs(&node1, &mesh, &ca)?;
        node1.write_workload(&client)?;
        node1.write_workload(&server)?;
        node2.write_workload(&web2)?;
        node2.write_workload(&web2_tls)?;
        let agent2 =
            start_agent_as_deployed(&tb, &node2, &mesh, &as_strs(&node_agent_args(&node1)))?;
        for pod in ["bench/web2", "bench/web2-tls"] {
            agent2.wait_enrolled(pod, true, Duration::from_secs(20))?;
        }
        Ok(Env {
            tb,
            node1,
            node2,
            client,
            server,
            web2,
            _web2_tls: web2_tls,
            mesh,
            xtask: bin.xtask.clone(),
            agent2,
            sidecars: [sidecar_out, sidecar_in_web, sidecar_in_web2],
            _servers: servers,
        })
    }

    /// Restarts node2's agent from the binary `STRAIT_BIN` names now (`--baseline-agent`
    /// alternates binaries between the halves of a round).
    pub(super) fn restart_agent2(&mut self) -> anyhow::Result<()> {
        self.agent2.stop()?;
        self.agent2 = start_agent_as_deployed(
            &self.tb,
            &self.node2,
            &self.mesh,
            &as_strs(&node_agent_args(&self.node1)),
        )?;
        for pod in ["bench/web2", "bench/web2-tls"] {
            self.agent2
                .wait_enrolled(pod, true, Duration::from_secs(20))?;
        }
        Ok(())
    }

    /// node1's agent with `flags`.
    pub(super) fn start_agent(&self, flags: AgentFlags) -> anyhow::Result<Agent> {
        let mut args = vec![
            "--fast-path".to_owned(),
            if flags.fast_path { "on" } else { "off" }.to_owned(),
        ];
        if let Some(on) = flags.telemetry {
            args.extend([
                "--telemetry".to_owned(),
                if on { "on" } else { "off" }.to_owned(),
            ]);
        }
        if let Some(us) = flags.worker_slice_us {
            args.extend(["--worker-slice-us".to_owned(), us.to_string()]);
        }
        args.extend(node_agent_args(&self.node2));
        let agent = start_agent_as_deployed(&self.tb, &self.node1, &self.mesh, &as_strs(&args))?;
        for pod in ["bench/client", "bench/web"] {
            agent.wait_enrolled(pod, true, Duration::from_secs(10))?;
        }
        if let Some(nice) = flags.nice {
            renice_threads(agent.process.pid(), nice)?;
        }
        Ok(agent)
    }

    /// The two sidecars a request passes on its way.
    pub(super) fn sidecar_pids(&self, topology: Topology) -> Vec<u32> {
        let [out, in_web, in_web2] = &self.sidecars;
        let inbound = match topology {
            Topology::SameNode => in_web,
            Topology::CrossNode => in_web2,
        };
        vec![out.pid(), inbound.pid()]
    }

    /// The client's destination for a scenario.
    pub(super) fn target(&self, s: &Scenario) -> SocketAddr {
        let vip = |v: &str| -> IpAddr { v.parse().expect("valid address literal") };
        let workload_port = match s.workload {
            Workload::Http1 | Workload::Http1Throughput | Workload::Http1BusyNode => HTTP_PORT,
            Workload::TcpBulk => BULK_PORT,
            Workload::Http2 => H2_PORT,
            Workload::GrpcUnary => GRPC_PORT,
        };
        match (s.topology, s.way) {
            (Topology::SameNode, Way::Direct) => {
                SocketAddr::new(self.server.ipv4().into(), workload_port)
            }
            (
                Topology::SameNode,
                Way::Strait {
                    listener_protocol, ..
                },
            ) => {
                let port = match listener_protocol {
                    "http" => HTTP_L7_PORT,
                    _ => workload_port,
                };
                SocketAddr::new(vip(SERVICE_V4), port)
            }
            (Topology::SameNode, Way::SidecarPair { tls }) => SocketAddr::from((
                [127, 0, 0, 1],
                if tls {
                    SIDECAR_OUT_PORT
                } else {
                    SIDECAR_OUT_PLAIN_PORT
                },
            )),
            (Topology::CrossNode, Way::Direct) => {
                SocketAddr::new(self.web2.ipv4().into(), HTTP_L7_PORT)
            }
            (
                Topology::CrossNode,
                Way::Strait {
                    mtls,
                    listener_protocol,
                    ..
                },
            ) => SocketAddr::new(
                vip(if mtls { SERVICE2_TLS_V4 } else { SERVICE2_V4 }),
                if listener_protocol == "tcp" {
                    HTTP_PORT
                } else {
                    HTTP_L7_PORT
                },
            ),
            (Topology::CrossNode, Way::SidecarPair { .. }) => {
                SocketAddr::from(([127, 0, 0, 1], SIDECAR_OUT_XNODE_PORT))
            }
        }
    }

    /// RSS of an agent running the demo mesh (examples/demo/mesh.yaml), once ready and idle.
    pub(super) fn demo_mesh_rss(&self) -> anyhow::Result<u64> {
        let demo = workspace_root().join("examples/demo/mesh.yaml");
        let agent = start_agent_as_deployed(&self.tb, &self.node1, &demo, &[])?;
        std::thread::sleep(Duration::from_secs(2));
        let rss = proc_status_kib(agent.process.pid(), "VmRSS")?;
        agent.stop()?;
        Ok(rss)
    }
}

/// `--worker-threads` of each simulated node's agent (see [`node_agent_args`]).
pub(super) const NODE_WORKER_THREADS: u64 = 1;

/// The arguments of a simulated node's agent: `--peer-node` naming `other`'s pod subnets and
/// underlay address, and one worker thread. The two simulated nodes share this machine's two
/// cores, so each node has one, as each sidecar HAProxy (`nbthread 1`), nginx (one worker)
/// and wrk (one thread) has; an agent built before `--worker-threads` (a `--baseline-agent`)
/// runs with its default instead.
fn node_agent_args(other: &Node) -> Vec<String> {
    let mut args = std::env::var_os("STRAIT_BIN")
        .map(|strait| worker_args(Path::new(&strait)))
        .unwrap_or_default();
    args.extend(peer_node_args(other));
    args
}

/// `--peer-node` naming `other`'s pod subnets (both families) and underlay address.
pub(super) fn peer_node_args(other: &Node) -> Vec<String> {
    vec![
        "--peer-node".into(),
        format!(
            "{}/24={}",
            addr::pod_subnet_v4(other.index()),
            other.underlay_ip()
        ),
        "--peer-node".into(),
        format!(
            "{}/64={}",
            addr::pod_subnet_v6(other.index()),
            other.underlay_ip()
        ),
    ]
}

/// `--worker-threads` as every bench node's agent runs, for the agent binary `strait` (one
/// built before the flag runs with its default).
pub(super) fn worker_args(strait: &Path) -> Vec<String> {
    if super::agent_takes(strait, "--worker-threads") {
        vec![
            "--worker-threads".to_owned(),
            NODE_WORKER_THREADS.to_string(),
        ]
    } else {
        Vec::new()
    }
}

fn as_strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// run makes).
static ON_INTERRUPT: std::sync::Mutex<Vec<testbed::CleanupHandle>> =
    std::sync::Mutex::new(Vec::new());

/// Tears `tb` down if the run is interrupted.
pub(super) fn on_interrupt_clean(tb: &Testbed) {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    ON_INTERRUPT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(tb.cleanup_handle());
    INSTALLED.call_once(|| {
        let installed = ctrlc::set_handler(|| {
            eprintln!("\nInterrupted: tearing the testbed down.");
            let handles = ON_INTERRUPT
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for cleanup in handles.iter() {
                if let Err(error) = cleanup.cleanup() {
                    eprintln!("cleanup: {error:#}");
                }
            }
            std::process::exit(130);
        });
        if let Err(error) = installed {
            eprintln!("bench: no Ctrl-C handler ({error}); an interrupted run leaves its testbed");
        }
    });
}

/// Starts an agent logging as a deployed agent does (`RUST_LOG=info`). The testbed's agents
/// also write the per-request DEBUG line the tests read, a cost of its own on every request
/// that a benchmark must not count against the proxy.
pub(super) fn start_agent_as_deployed(
    tb: &Testbed,
    node: &Node,
    mesh: &Path,
    extra: &[&str],
) -> anyhow::Result<Agent> {
    Agent::start_with(tb, node, mesh, extra, |command| {
        command.env("RUST_LOG", "info");
    })
}

/// Sets the nice value of every thread of process `pid` (Linux keeps it per thread; threads
/// started later inherit their creator's).
fn renice_threads(pid: u32, nice: i32) -> anyhow::Result<()> {
    let tasks = format!("/proc/{pid}/task");
    for task in std::fs::read_dir(&tasks).with_context(|| format!("reading {tasks}"))? {
        let tid: u32 = task?
            .file_name()
            .to_string_lossy()
            .parse()
            .context("a task id")?;
        // SAFETY: setpriority only reads its arguments.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("setpriority({tid}, {nice})"));
        }
    }
    Ok(())
}
