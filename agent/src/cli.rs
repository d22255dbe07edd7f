//! The `strait` command line: `run`, `validate`, `status`, `check`, `uninstall`, `ca`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::proxy::upstream::PeerNode;
use crate::{app, ca, check, identity, mesh, redirect, scheduling, status};

#[derive(Debug, Parser)]
#[command(
    name = "strait",
    version,
    about = "A sidecarless service mesh agent for App Mesh resources"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format: `text` for people, `json` for log pipelines.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

#[derive(Debug, Subcommand)]
#[allow(
    clippy::large_enum_variant,
    reason = "parsed once per process; boxing would only complicate the derive"
)]
pub enum Command {
    /// Run the node agent: capture local pods' traffic and apply the mesh.
    Run(RunArgs),
    /// Check a mesh; exit 0 when valid, 1 with every error when not.
    Validate {
        /// Mesh files (multi-document YAML or JSON of App Mesh resources) and directories of
        /// them (every *.yaml, *.yml, *.json), validated together as one mesh.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Show a running agent's state (readiness, mesh, workloads, eBPF counters) as tables.
    Status {
        /// The agent's admin address.
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: SocketAddr,
    },
    /// Pre-flight: test what the agent needs on this node (kernel, BTF, cgroup v2, bpffs,
    /// capabilities, its eBPF programs, ports, DNS, the mesh); exit 1 if anything fails.
    Check(check::Args),
    /// Remove every eBPF pin and attachment an agent left under a bpffs folder.
    Uninstall {
        #[arg(long, default_value = "/sys/fs/bpf/strait")]
        bpffs: PathBuf,
    },
    /// A development certificate authority (for demos and tests, not production).
    #[command(subcommand)]
    Ca(CaCommand),
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a CA (ca.pem, ca-key.pem) in a folder.
    Init {
        #[arg(long, default_value = "strait-ca")]
        dir: PathBuf,
    },
    /// Write a certificate per virtual node to the certificate paths the mesh file names, and
    /// the CA to its trust paths.
    Issue {
        /// The mesh file.
        #[arg(long)]
        mesh: PathBuf,
        /// The CA folder (`strait ca init`).
        #[arg(long, default_value = "strait-ca")]
        ca_dir: PathBuf,
        /// Only this virtual node (`name` or `namespace/name`); repeatable.
        #[arg(long = "virtual-node")]
        only: Vec<String>,
        /// Validity in days.
        #[arg(long)]
        days: Option<u32>,
        /// Validity in minutes, instead of days (short-lived certificates).
        #[arg(long, conflicts_with = "days")]
        minutes: Option<u32>,
        /// Issue certificates that already expired (to test rejection).
        #[arg(long)]
        expired: bool,
        /// Use these SANs instead of the virtual node's identities (to test SAN mismatch).
        #[arg(long = "san")]
        sans: Vec<String>,
    },
    /// Write a node certificate (URI SAN `spiffe://<mesh>/node/<name>`) with which a node's
    /// agent authenticates to the identity service: node.pem, node-key.pem, ca.pem.
    IssueNode {
        /// The mesh file (its mesh name is the trust domain).
        #[arg(long)]
        mesh: PathBuf,
        #[arg(long, default_value = "strait-ca")]
        ca_dir: PathBuf,
        /// The node's name.
        #[arg(long)]
        node: String,
        /// The folder to write into.
        #[arg(long)]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Run the identity service: sign virtual node certificates for the nodes that run their
    /// pods (docs/identity.md).
    Serve {
        #[arg(long, default_value = "strait-ca")]
        ca_dir: PathBuf,
        /// The mesh file (which virtual node selects which pod).
        #[arg(long)]
        mesh: PathBuf,
        /// The node registry: JSON mapping each node name to the pods it runs (plain hosts).
        #[arg(
            long,
            required_unless_present = "kubernetes",
            conflicts_with = "kubernetes"
        )]
        nodes: Option<PathBuf>,
        /// Take each node's pods from the Kubernetes API (Pods by spec.nodeName) instead.
        #[arg(long)]
        kubernetes: bool,
        /// The kubeconfig for --kubernetes (default: in-cluster, then ~/.kube/config).
        #[arg(long, requires = "kubernetes")]
        kubeconfig: Option<PathBuf>,
        #[arg(long, default_value = "0.0.0.0:15012")]
        listen: std::net::SocketAddr,
        /// Plain HTTP Prometheus metrics (`/metrics`).
        #[arg(long)]
        metrics_listen: Option<std::net::SocketAddr>,
        /// Lifetime of the certificates it signs (`60s`, `30m`, `24h`, `7d`).
        #[arg(long, default_value = "24h", value_parser = ca::serve::parse_lifetime)]
        lifetime: Duration,
        /// DNS names of the service's own certificate, which agents check; repeatable.
        #[arg(long = "server-name", default_value = "strait-ca")]
        server_names: Vec<String>,
        /// With --kubernetes: the ServiceAccount (NAMESPACE/NAME) of the agent pods whose
        /// tokens prove a node.
        #[arg(long, default_value = "strait-system/strait", value_parser = ca::token::parse_service_account)]
        agent_service_account: String,
        /// With --kubernetes: the labels of the agent pods whose tokens prove a node.
        #[arg(long, default_value = crate::kubernetes::endpoints::DEFAULT_AGENT_LABELS)]
        agent_pod_labels: crate::kubernetes::endpoints::AgentLabels,
    },
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The mesh: a file of App Mesh resources (multi-document YAML or JSON), or a directory
    /// whose *.yaml, *.yml and *.json files together are one mesh (a mounted ConfigMap).
    /// Watched and reloaded.
    #[arg(long)]
    pub mesh: PathBuf,
    /// Directory with one JSON file per local pod. Watched. For plain hosts; on Kubernetes
    /// use --kubernetes instead.
    #[arg(
        long,
        required_unless_present = "kubernetes",
        conflicts_with = "kubernetes"
    )]
    pub workloads: Option<PathBuf>,
    /// Take this node's pods from the Kubernetes API (pods with spec.nodeName = --node-name,
    /// their namespaces' labels) instead of a workloads directory.
    #[arg(long)]
    pub kubernetes: bool,
    /// This node's name, as the API knows it (default: the NODE_NAME environment variable,
    /// which a DaemonSet sets from the downward API's spec.nodeName).
    #[arg(long, requires = "kubernetes")]
    pub node_name: Option<String>,
    /// Kubeconfig for --kubernetes (default: KUBECONFIG, ~/.kube/config, else the pod's
    /// service account).
    #[arg(long, requires = "kubernetes")]
    pub kubeconfig: Option<PathBuf>,
    /// Unix socket on which `strait-cni` hands new pods to the agent (--kubernetes only; made
    /// 0600 in a folder only root may write to). `none` turns the hand-off off: pods are then
    /// found through their sandbox process once the kubelet reports their IP.
    #[arg(long, default_value = "/run/strait/cni.sock", requires = "kubernetes")]
    pub cni_socket: PathBuf,
    /// The labels of the agent's own pods (--kubernetes only): a node with a ready host-network
    /// pod carrying them runs an agent, and its pods are reached through the tunnel to that
    /// node's InternalIP on this agent's --tunnel-listen port. See docs/kubernetes.md.
    #[arg(
        long,
        default_value = crate::kubernetes::endpoints::DEFAULT_AGENT_LABELS,
        requires = "kubernetes"
    )]
    pub agent_pod_labels: crate::kubernetes::endpoints::AgentLabels,
    /// cgroup v2 directory the eBPF programs attach to; only pods below it are seen.
    #[arg(long, default_value = "/sys/fs/cgroup")]
    pub cgroup_root: PathBuf,
    /// bpffs folder for this agent's pinned maps and links.
    #[arg(long, default_value = "/sys/fs/bpf/strait")]
    pub bpffs: PathBuf,
    /// Admin API address (/ready, /metrics, /stats, /workloads, /config_dump).
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    /// DNS server for virtual service and virtual node names (default: /etc/resolv.conf).
    #[arg(long)]
    pub dns_server: Option<IpAddr>,
    /// Port of the outbound listener the agent opens inside each pod's network namespace.
    #[arg(long, default_value_t = 15001)]
    pub outbound_port: u16,
    /// How long a draining connection may go on (SIGTERM, hand-over to a new agent, a pod
    /// leaving), in seconds. Idle HTTP/1.1 keep-alive connections are kept this long for their
    /// next request, answered with `Connection: close` (see docs/operations.md, Draining).
    #[arg(long, default_value_t = 30)]
    pub drain_timeout: u64,
    /// Remove every pin and attachment on exit (default: keep them for a restarting agent).
    #[arg(long)]
    pub cleanup_on_exit: bool,
    /// Unix socket over which a new agent takes this one's listeners on upgrade.
    #[arg(long, default_value = "/run/strait/handover.sock")]
    pub handover_socket: PathBuf,
    /// Where this agent accepts mTLS tunnels from other nodes' agents (HTTP/2 CONNECT).
    #[arg(long, default_value = "0.0.0.0:15008")]
    pub tunnel_listen: SocketAddr,
    /// Seconds without a frame from a peer agent after which a tunnel connection sends an
    /// HTTP/2 PING (also the TCP keepalive idle time). See docs/operations.md, Tunnels.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub tunnel_keepalive_interval: u64,
    /// Seconds a PING may go unanswered before the tunnel connection, and every stream on it,
    /// is closed and the peer node is held down (new streams go to other endpoints).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub tunnel_keepalive_timeout: u64,
    /// Another node: its pod CIDR and agent address, `10.244.2.0/24=192.0.2.2[:15008]`.
    /// Repeatable. Endpoints in these ranges are reached through that node's agent.
    #[arg(long = "peer-node")]
    pub peer_nodes: Vec<PeerNode>,
    /// Port of the inbound socket the agent opens inside each pod (loopback) for connections
    /// from outside the mesh to listeners with tls STRICT or PERMISSIVE.
    #[arg(long, default_value_t = 15006)]
    pub inbound_port: u16,
    /// eBPF fast path: sockets of the agent's local legs (pod to agent, agent to a local pod)
    /// exchange bytes through a sockmap instead of the TCP stack. See docs/benchmarks.md.
    #[arg(long, value_enum, default_value_t = Switch::On)]
    pub fast_path: Switch,
    /// Most captured outbound connections one pod may have open at once (at most half of the
    /// node's 65,536 pending-connection entries). Past it the pod's connects fail with EPERM
    /// and `strait_redirect_connects_total{reason="pod_connection_limit"}` counts them, so a
    /// pod flooding connects cannot make other pods' connections fail.
    #[arg(long, default_value_t = 16_384)]
    pub max_pod_connections: u32,
    /// Worker threads of the runtime that carries all proxied traffic. Default: the CPUs this
    /// process may use (its CPU affinity and its cgroup's CPU quota, so a container CPU limit
    /// of 2 gives 2). Every worker beyond what the traffic needs costs wake-ups on every
    /// request where the agent shares the node's cores with busy pods: see docs/operations.md.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
    /// Time slice, in microseconds, the worker threads ask the kernel's fair scheduler for
    /// (Linux 6.12 or later; 100 to 100,000), or 0 (the default) for the kernel's own (1.4 ms
    /// on a two-CPU machine). A short slice lets a worker woken on a busy CPU run sooner instead
    /// of waiting behind the pod running there, without a larger share of the CPU, but also
    /// ends its turn sooner; measured on the bench machine it was no clear gain: see
    /// docs/operations.md.
    #[arg(long, default_value_t = 0, value_parser = parse_worker_slice)]
    pub worker_slice_us: u32,
    /// Per-request telemetry: request and TCP connection metrics, access logs, traces.
    /// `off` leaves only the agent's own metrics (eBPF counters, reloads, health checks,
    /// process); the benchmark compares the two.
    #[arg(long, value_enum, default_value_t = Switch::On)]
    pub telemetry: Switch,
    /// Share of requests arriving without a trace context that start a sampled trace,
    /// 0.0 to 1.0. A sampling decision that comes with the request is always followed.
    #[arg(long, default_value_t = 0.01, value_parser = parse_sampling)]
    pub trace_sampling: f64,
    /// OTLP/HTTP receiver for spans (JSON), e.g. http://127.0.0.1:4318 (`/v1/traces` is
    /// appended to a URL without a path). Without it, trace headers are still propagated.
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
    /// The folder access logs named by the mesh (`logging.accessLog.file.path`) are written
    /// in: a relative path is taken under it, an absolute one must lie under it, symlinks are
    /// not followed. `/dev/stdout` and `/dev/stderr` are always allowed.
    #[arg(long, default_value = "/var/log/strait")]
    pub access_log_dir: PathBuf,
    /// The identity service (`strait ca serve`), e.g. https://10.0.0.5:15012: the agent asks
    /// it for the certificates App Mesh `sds` sources name (docs/identity.md).
    #[arg(long)]
    pub identity_service: Option<String>,
    /// This node's certificate folder (`strait ca issue-node`), to prove the node to the
    /// identity service (plain hosts).
    #[arg(long, conflicts_with = "node_token")]
    pub node_cert: Option<PathBuf>,
    /// Instead of --node-cert, on Kubernetes: the projected ServiceAccount token of the
    /// agent's pod (audience strait-ca), re-read for every request.
    #[arg(long, requires = "identity_ca")]
    pub node_token: Option<PathBuf>,
    /// With --node-token: the CA certificate the identity service's certificate chains to.
    #[arg(long, requires = "node_token")]
    pub identity_ca: Option<PathBuf>,
    /// Where the agent keeps the keys and certificates the identity service issued it.
    #[arg(long, default_value = "/run/strait/identities")]
    pub identity_dir: PathBuf,
}

fn parse_worker_slice(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(us) if us == 0 || (100..=100_000).contains(&us) => Ok(us),
        _ => Err(format!(
            "`{s}`: expected microseconds from 100 to 100000, or 0 for the kernel's default"
        )),
    }
}

fn parse_sampling(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "`{s}`: expected a probability from 0.0 to 1.0 (0.01 = 1 % of new traces)"
        )),
    }
}

/// Lifts the soft limit on open files to the hard one: the agent holds two sockets per proxied
/// connection of every pod on the node, and a soft limit of 1024 (a common default) would cap
/// the node at a few hundred connections.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            let before = limit.rlim_cur;
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                tracing::warn!(soft = before, "cannot raise the open files limit");
            }
        }
    }
}

/// `--worker-threads`, or the CPUs this process may use.
fn worker_threads(args: &RunArgs) -> usize {
    args.worker_threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, usize::from),
        usize::from,
    )
}

/// The runtime that carries all proxied traffic: `worker_threads` threads, each asking the
/// kernel for `worker_slice` (zero: the kernel's default).
fn runtime(
    worker_threads: usize,
    worker_slice: Duration,
) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads)
        .on_thread_start(move || {
            if !worker_slice.is_zero()
                && let Err(error) = scheduling::request_slice(worker_slice)
            {
                tracing::warn!(%error, "cannot ask for a shorter scheduler slice");
            }
        })
        .enable_all()
        .build()
}

/// `on` or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    On,
    Off,
}

/// Runs a parsed command line; returns the process exit code.
pub fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) => {
            let worker_threads = worker_threads(&args);
            let worker_slice = Duration::from_micros(args.worker_slice_us.into());
            let config = Config::try_from(args)?;
            raise_open_files_limit();
            let runtime = runtime(worker_threads, worker_slice)?;
            tracing::info!(
                worker_threads,
                worker_slice_us = worker_slice.as_micros() as u64,
                "runtime started"
            );
            if let Some(service) = &config.identity_service {
                let client =
                    identity::service::Client::new(&service.url, &service.proof, &service.dir)?;
                runtime.spawn(client.run());
            }
            runtime.block_on(app::run(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate { files } => match mesh::load_paths(&files, mesh::Options::default()) {
            Ok(loaded) => {
                for warning in &loaded.warnings {
                    println!("{warning}");
                }
                let read: Vec<String> = loaded
                    .config
                    .source
                    .files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect();
                println!("{}: valid", read.join(", "));
                println!("{}", mesh::summary(&loaded.config));
                Ok(ExitCode::SUCCESS)
            }
            Err(error) => {
                eprintln!("{}", crate::logging::Chain(&error));
                Ok(ExitCode::from(1))
            }
        },
        Command::Status { admin } => {
            print!("{}", status::render(admin)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Check(args) => Ok(check::main(args)),
        Command::Uninstall { bpffs } => {
            let report = redirect::uninstall(&bpffs)?;
            if report.folder_existed {
                println!(
                    "removed {} pins and {}: no strait programs remain attached from it",
                    report.removed.len().saturating_sub(1),
                    bpffs.display()
                );
            } else {
                println!("{} does not exist: nothing to remove", bpffs.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca(CaCommand::IssueNode {
            mesh,
            ca_dir,
            node,
            out,
            days,
        }) => {
            let id = ca::serve::issue_node(&mesh, &ca_dir, &node, &out, days)?;
            println!("{id}: {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca(CaCommand::Serve {
            ca_dir,
            mesh,
            nodes,
            kubernetes: _,
            kubeconfig,
            listen,
            metrics_listen,
            lifetime,
            server_names,
            agent_service_account,
            agent_pod_labels,
        }) => {
            let pods = match nodes {
                Some(path) => ca::serve::PodSourceOptions::Registry(path),
                None => ca::serve::PodSourceOptions::Kubernetes { kubeconfig },
            };
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(ca::serve::serve(ca::serve::ServeOptions {
                ca_dir,
                mesh,
                pods,
                listen,
                metrics_listen,
                lifetime,
                server_names,
                agents: ca::token::AgentPods {
                    service_account: agent_service_account,
                    labels: agent_pod_labels,
                },
            }))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca(CaCommand::Init { dir }) => {
            let cert = ca::init(&dir)?;
            println!(
                "created a development CA: {} (key beside it; keep it private)",
                cert.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca(CaCommand::Issue {
            mesh,
            ca_dir,
            only,
            days,
            minutes,
            expired,
            sans,
        }) => {
            let options = ca::IssueOptions {
                only,
                days,
                minutes,
                expired,
                sans,
            };
            for issued in ca::issue(&mesh, &ca_dir, &options)? {
                println!(
                    "{}: {} (SANs {})",
                    issued.virtual_node,
                    issued.chain.display(),
                    issued.sans.join(", ")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use clap::Parser as _;

    use super::*;

    /// `strait run` with the required flags and `flags`, parsed.
    pub(crate) fn run(flags: &[&str]) -> Result<RunArgs, clap::Error> {
        let argv = ["strait", "run", "--mesh", "/m.yaml", "--workloads", "/w"]
            .into_iter()
            .chain(flags.iter().copied());
        match Cli::try_parse_from(argv)?.command {
            Command::Run(args) => Ok(args),
            _ => unreachable!("a run command line"),
        }
    }

    #[test]
    fn the_worker_slice_is_off_by_default_and_in_the_kernels_range_when_set() {
        assert_eq!(run(&[]).unwrap().worker_slice_us, 0);
        assert_eq!(
            run(&["--worker-slice-us", "100"]).unwrap().worker_slice_us,
            100
        );
        for out_of_range in ["99", "100001", "-1"] {
            assert!(
                run(&["--worker-slice-us", out_of_range]).is_err(),
                "--worker-slice-us {out_of_range} was accepted"
            );
        }
    }

    #[test]
    fn the_runtimes_workers_ask_for_the_slice_given_and_only_then() {
        let sliced = runtime(1, Duration::from_micros(150)).unwrap();
        let slice = sliced.block_on(async {
            tokio::spawn(async { scheduling::current_slice().unwrap() })
                .await
                .unwrap()
        });
        assert_eq!(
            slice,
            Duration::from_micros(150),
            "needs Linux 6.12 or later (custom EEVDF slices)"
        );
        let default = runtime(1, Duration::ZERO).unwrap();
        let slice = default.block_on(async {
            tokio::spawn(async { scheduling::current_slice().unwrap() })
                .await
                .unwrap()
        });
        let kernels_default = std::thread::spawn(|| scheduling::current_slice().unwrap())
            .join()
            .unwrap();
        assert_eq!(
            slice, kernels_default,
            "a zero slice leaves the kernel's default"
        );
    }

    #[test]
    fn worker_threads_default_to_the_cpus_the_process_may_use() {
        let cpus = std::thread::available_parallelism().unwrap().get();
        assert_eq!(worker_threads(&run(&[]).unwrap()), cpus);
        assert_eq!(worker_threads(&run(&["--worker-threads", "3"]).unwrap()), 3);
        let zero = run(&["--worker-threads", "0"]).unwrap_err().to_string();
        assert!(zero.contains("--worker-threads"), "{zero}");
    }
}
