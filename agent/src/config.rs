//! `strait run`'s configuration: every flag parsed and checked before anything starts
//! ([`Config::try_from`] a parsed command line), and grouped into the settings the modules
//! take (`redirect`, telemetry, the tunnel, the identity service), so a bad flag is reported
//! on its own, before the agent touches the kernel or the network.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;

use crate::cli::{RunArgs, Switch};
use crate::identity::service::NodeProof;
use crate::kubernetes;
use crate::proxy::hbone;
use crate::proxy::upstream::PeerNode;
use crate::redirect::{self, RedirectConfig};
use crate::telemetry::otlp;
use crate::workloads::PodSource;

/// How `strait run` was asked to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// A mesh file, or a directory of them (`mesh::load_file`).
    pub mesh_file: PathBuf,
    /// Where the local pods come from: a workloads directory or the Kubernetes API.
    pub pod_source: PodSource,
    /// The eBPF side: cgroup root, pin folder, fast path, per-pod connection limit.
    pub redirect: RedirectConfig,
    pub admin: SocketAddr,
    pub dns_server: Option<IpAddr>,
    /// First port tried for a pod's outbound listener on its loopback.
    pub outbound_port: u16,
    /// First port tried for a pod's inbound socket on its loopback (plaintext from outside
    /// the mesh, STRICT refusals).
    pub inbound_port: u16,
    pub drain_timeout: Duration,
    pub cleanup_on_exit: bool,
    /// Unix socket for handing listeners over to the next agent (see `handover`).
    pub handover_socket: PathBuf,
    /// Where other nodes' agents open mTLS tunnels to this one.
    pub tunnel_listen: SocketAddr,
    /// Tunnel keepalives (`--tunnel-keepalive-interval`, `--tunnel-keepalive-timeout`).
    pub tunnel: hbone::Settings,
    /// Other nodes: pod CIDR -> agent tunnel address.
    pub peer_nodes: Vec<PeerNode>,
    pub telemetry: Telemetry,
    /// The only folder access log files from the mesh may be written in (`--access-log-dir`).
    pub access_log_dir: PathBuf,
    /// Where this node's workload certificates come from, when not from files.
    pub identity_service: Option<IdentityService>,
}

/// Per-request telemetry and tracing.
#[derive(Debug, Clone)]
pub struct Telemetry {
    /// `--telemetry`.
    pub enabled: bool,
    /// Probability of sampling a new trace (`--trace-sampling`).
    pub trace_sampling: f64,
    /// `--otlp-endpoint` as given (for the log) and the OTLP/HTTP traces URL made of it.
    pub otlp: Option<(String, Uri)>,
}

/// The strait identity service this agent asks for its workloads' certificates.
#[derive(Debug, Clone)]
pub struct IdentityService {
    pub url: String,
    /// How this agent proves its node.
    pub proof: NodeProof,
    /// Where the issued certificates are written for the proxy to read.
    pub dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Kubernetes(#[from] kubernetes::Error),
    #[error(transparent)]
    Redirect(#[from] redirect::Error),
    #[error(transparent)]
    Otlp(#[from] otlp::Error),
    #[error(
        "--identity-service needs --node-cert (`strait ca issue-node`) or, on Kubernetes, \
         --node-token and --identity-ca"
    )]
    NodeProof,
}

impl TryFrom<RunArgs> for Config {
    type Error = Error;

    fn try_from(args: RunArgs) -> Result<Config, Error> {
        let cgroup_root = default_cgroup_root(args.cgroup_root);
        let pod_source = match args.workloads {
            Some(dir) => PodSource::Directory(dir),
            None => PodSource::Kubernetes(kubernetes::Options {
                node_name: args
                    .node_name
                    .or_else(|| std::env::var("NODE_NAME").ok())
                    .filter(|name| !name.trim().is_empty())
                    .ok_or(kubernetes::Error::MissingNodeName)?,
                kubeconfig: args.kubeconfig,
                cgroup_root: cgroup_root.clone(),
                cni_socket: Some(args.cni_socket).filter(|p| p.as_os_str() != "none"),
                tunnel_port: args.tunnel_listen.port(),
                agent_labels: args.agent_pod_labels,
            }),
        };
        if args.max_pod_connections == 0 || args.max_pod_connections > redirect::MAX_POD_CONNECTIONS
        {
            return Err(redirect::Error::PodConnectionLimit {
                limit: args.max_pod_connections,
            }
            .into());
        }
        let otlp = args
            .otlp_endpoint
            .map(|endpoint| otlp::traces_url(&endpoint).map(|url| (endpoint, url)))
            .transpose()?;
        let identity_service = args
            .identity_service
            .map(|url| {
                let proof = match (args.node_cert, args.node_token, args.identity_ca) {
                    (Some(dir), _, _) => NodeProof::Certificate(dir),
                    (None, Some(token), Some(ca)) => NodeProof::Token { token, ca },
                    _ => return Err(Error::NodeProof),
                };
                Ok(IdentityService {
                    url,
                    proof,
                    dir: args.identity_dir,
                })
            })
            .transpose()?;
        Ok(Config {
            mesh_file: args.mesh,
            pod_source,
            redirect: RedirectConfig {
                cgroup_root,
                bpffs: args.bpffs,
                fast_path: args.fast_path == Switch::On,
                max_pod_connections: args.max_pod_connections,
            },
            admin: args.admin,
            dns_server: args.dns_server,
            outbound_port: args.outbound_port,
            inbound_port: args.inbound_port,
            drain_timeout: Duration::from_secs(args.drain_timeout),
            cleanup_on_exit: args.cleanup_on_exit,
            handover_socket: args.handover_socket,
            tunnel_listen: args.tunnel_listen,
            tunnel: hbone::Settings {
                keepalive_interval: Duration::from_secs(args.tunnel_keepalive_interval),
                keepalive_timeout: Duration::from_secs(args.tunnel_keepalive_timeout),
            },
            peer_nodes: args.peer_nodes,
            telemetry: Telemetry {
                enabled: args.telemetry == Switch::On,
                trace_sampling: args.trace_sampling,
                otlp,
            },
            access_log_dir: args.access_log_dir,
            identity_service,
        })
    }
}

/// The cgroup v2 root: `/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on a hybrid host when
/// the default was asked for and only that one is cgroup v2.
pub(crate) fn default_cgroup_root(requested: PathBuf) -> PathBuf {
    let unified = requested.join("unified");
    if requested == Path::new("/sys/fs/cgroup")
        && !requested.join("cgroup.procs").exists()
        && unified.join("cgroup.procs").exists()
    {
        unified
    } else {
        requested
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(flags: &[&str]) -> RunArgs {
        crate::cli::tests::run(flags).expect("the flags parse")
    }

    #[test]
    fn flags_are_grouped_into_the_modules_settings() {
        let config = Config::try_from(run_args(&[
            "--fast-path",
            "off",
            "--otlp-endpoint",
            "http://127.0.0.1:4318",
            "--tunnel-keepalive-interval",
            "5",
        ]))
        .expect("a valid configuration");
        assert!(!config.redirect.fast_path);
        assert_eq!(config.redirect.max_pod_connections, 16_384);
        assert_eq!(config.tunnel.keepalive_interval, Duration::from_secs(5));
        let (endpoint, url) = config.telemetry.otlp.expect("an OTLP endpoint");
        assert_eq!(endpoint, "http://127.0.0.1:4318");
        assert_eq!(url.path(), "/v1/traces");
        assert!(config.identity_service.is_none());
    }

    #[test]
    fn bad_flags_are_refused_before_anything_starts() {
        let error = |flags: &[&str]| Config::try_from(run_args(flags)).unwrap_err().to_string();
        assert!(error(&["--max-pod-connections", "0"]).contains("--max-pod-connections 0"));
        assert!(error(&["--max-pod-connections", "40000"]).contains("out of range"));
        assert!(error(&["--otlp-endpoint", "https://collector:4318"]).contains("--otlp-endpoint"));
        assert!(error(&["--identity-service", "https://strait-ca:15012"]).contains("--node-cert"));
    }
}
