//! Builds the running agent from its configuration and keeps it in step with its inputs.
//!
//! Inputs: the mesh file or directory (watched, reloaded when it changes), the local workloads
//! (watched), and DNS answers (re-resolved on TTL). One reconcile loop turns them into the eBPF
//! maps (enrolled cgroups, service addresses), one outbound listener set per enrolled pod, and
//! the routing table the proxy reads. Shutdown: stop accepting, drain, exit; the pins stay so a
//! restarted agent adopts them.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, UNIX_EPOCH};

use arc_swap::ArcSwap;
use notify::Watcher;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, ConfigDump, Rejected, WorkloadStatus};
use crate::identity::{self, policy::Policy};
use crate::mesh::{self, EgressFilter, MeshConfig, ResourceId};
use crate::proxy::upstream::{LocalPod, PeerNode, Transport};
use crate::proxy::{self, outbound};
use crate::redirect::{self, EnrolledPod, Redirect, RedirectConfig};
use crate::routing::Table;
use crate::service_ids::ServiceIds;
use crate::telemetry::{Metrics, ProcessCollector, RedirectCollector, Telemetry, access_log, otlp};
use crate::workloads::{self, Selection, Workload};
use crate::{discovery, gateway, handover, netns};

/// How `strait run` was asked to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// A mesh file, or a directory of them (`mesh::load_file`).
    pub mesh_file: PathBuf,
    /// Where the local pods come from: a workloads directory or the Kubernetes API.
    pub pod_source: workloads::PodSource,
    pub cgroup_root: PathBuf,
    pub bpffs: PathBuf,
    pub admin: SocketAddr,
    pub dns_server: Option<IpAddr>,
    pub outbound_port: u16,
    pub drain_timeout: Duration,
    pub cleanup_on_exit: bool,
    /// Unix socket for handing listeners over to the next agent (see `handover`).
    pub handover_socket: PathBuf,
    /// Where other nodes' agents open mTLS tunnels to this one.
    pub tunnel_listen: SocketAddr,
    /// Tunnel keepalives (`--tunnel-keepalive-interval`, `--tunnel-keepalive-timeout`).
    pub tunnel: proxy::hbone::Settings,
    /// Other nodes: pod CIDR -> agent tunnel address.
    pub peer_nodes: Vec<PeerNode>,
    /// Port of the in-pod inbound socket (loopback) for plaintext from outside the mesh.
    pub inbound_port: u16,
    /// Sockmap fast path for the agent's local legs (see `redirect/fastpath.rs`).
    pub fast_path: bool,
    /// Open captured connections allowed per pod (see `RedirectConfig`).
    pub max_pod_connections: u32,
    /// Per-request telemetry (`--telemetry`).
    pub telemetry: bool,
    /// Probability of sampling a new trace (`--trace-sampling`).
    pub trace_sampling: f64,
    /// OTLP/HTTP receiver for spans (`--otlp-endpoint`).
    pub otlp_endpoint: Option<String>,
    /// The only folder access log files from the mesh may be written in (`--access-log-dir`).
    pub access_log_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Mesh(#[from] mesh::Error),
    #[error("{}", render_diagnostics(.0))]
    MissingFiles(Vec<mesh::Diagnostic>),
    #[error(transparent)]
    Workloads(#[from] workloads::Error),
    #[error(
        "cgroup root {0} does not exist or is not a cgroup v2 directory; pass --cgroup-root with the node's cgroup v2 mount (e.g. /sys/fs/cgroup or /sys/fs/cgroup/unified)"
    )]
    CgroupRoot(PathBuf),
    #[error(transparent)]
    Redirect(#[from] redirect::Error),
    #[error(transparent)]
    Discovery(#[from] discovery::Error),
    #[error(transparent)]
    Admin(#[from] admin::Error),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Handover(#[from] handover::Error),
    #[error(transparent)]
    Otlp(#[from] otlp::Error),
    #[error(
        "cannot listen for mTLS tunnels on {addr}: {source} (choose another --tunnel-listen, or stop what holds the port)"
    )]
    TunnelListen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

fn render_diagnostics(diagnostics: &[mesh::Diagnostic]) -> String {
    diagnostics
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    result: &'static str,
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), Error> {
    // Check every input before touching the kernel, so a bad input leaves nothing behind.
    let loaded = mesh::load_file(&config.mesh_file)?;
    for warning in &loaded.warnings {
        tracing::warn!("{warning}");
    }
    check_files(&loaded.config, &config.access_log_dir)?;
    if !config.cgroup_root.join("cgroup.procs").exists() {
        return Err(Error::CgroupRoot(config.cgroup_root.clone()));
    }
    let traces_url = config
        .otlp_endpoint
        .as_deref()
        .map(otlp::traces_url)
        .transpose()?;
    let workload_source = workloads::start(&config.pod_source).await?;
    let resolver = discovery::Resolver::new(config.dns_server)?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(Error::Signals)?;

    let redirect = Arc::new(Redirect::install(&RedirectConfig {
        cgroup_root: config.cgroup_root.clone(),
        bpffs: config.bpffs.clone(),
        fast_path: config.fast_path,
        max_pod_connections: config.max_pod_connections,
    })?);
    tracing::info!(cgroup_root = %config.cgroup_root.display(), bpffs = %config.bpffs.display(), fast_path = config.fast_path, "eBPF programs attached");

    let metrics = Metrics::default();
    let reloads = Family::<ReloadLabels, Counter>::default();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    registry.register(
        "strait_mesh_reloads",
        "Mesh file reloads, by result (applied or rejected)",
        reloads.clone(),
    );
    registry.register_collector(Box::new(RedirectCollector(redirect.clone())));
    registry.register_collector(Box::new(ProcessCollector::new()));
    let security = identity::Metrics::default();
    security.register(&mut registry);
    registry.register_collector(Box::new(identity::InPodCollector(redirect.clone())));
    let transport = Arc::new(
        Transport::new(config.peer_nodes.clone(), security)
            .with_tunnel(config.tunnel)
            .with_endpoints(workload_source.endpoints.clone()),
    );
    transport.admission.metrics.register(&mut registry);
    transport
        .policy
        .store(Arc::new(Policy::compile(&loaded.config)));
    let (names_tx, names_rx) = watch::channel(Table::dns_names(&loaded.config));
    let mut saved_answers = config.handover_socket.clone().into_os_string();
    saved_answers.push(".dns-answers.json");
    let mut answers = discovery::keep_resolved(resolver, names_rx, saved_answers.into()).await;

    // Take over the running agent's listeners, if one runs, before binding anything. From
    // here until the first reconcile, connects wait in the listeners' backlogs.
    let inherited = handover::receive(&config.handover_socket)?;
    if !inherited.is_empty() {
        tracing::info!(
            sockets = inherited.len(),
            "took over the listeners of the running agent"
        );
    }
    let handover_registry = handover::Registry::default();
    let tunnel_name = format!("tunnel/{}", config.tunnel_listen);
    let tunnel_listener = match inherited.take(&tunnel_name) {
        Some(listener) => Ok(listener),
        None => std::net::TcpListener::bind(config.tunnel_listen).and_then(|l| {
            l.set_nonblocking(true)?;
            Ok(l)
        }),
    }
    .and_then(|listener| {
        if let Err(error) = handover_registry.add(&tunnel_name, &listener) {
            tracing::warn!(%error, "the tunnel listener cannot be handed over on upgrade");
        }
        tokio::net::TcpListener::from_std(listener)
    })
    .map_err(|source| Error::TunnelListen {
        addr: config.tunnel_listen,
        source,
    })?;

    let shutdown = CancellationToken::new();
    let telemetry = config.telemetry.then(|| {
        Arc::new(Telemetry {
            metrics: metrics.clone(),
            sampling: config.trace_sampling,
            exporter: traces_url
                .map(|url| otlp::start(url, metrics.spans.clone(), shutdown.clone())),
        })
    });
    tracing::info!(
        telemetry = config.telemetry,
        trace_sampling = config.trace_sampling,
        otlp_endpoint = config.otlp_endpoint.as_deref().unwrap_or(""),
        "telemetry"
    );
    let ctx = Arc::new(proxy::Context {
        redirect: redirect.clone(),
        table: ArcSwap::from_pointee(Table::default()),
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
        drain_timeout: config.drain_timeout,
        connections: TaskTracker::new(),
        access_logs: ArcSwap::from_pointee(BTreeMap::new()),
        transport: transport.clone(),
        http: proxy::http::Http::default(),
        telemetry,
    });
    proxy::http::start(&ctx);
    if let Some(telemetry) = &ctx.telemetry {
        let _ = transport.admission.telemetry.set(telemetry.clone());
    }
    ctx.http.endpoints.outliers.register(&mut registry);
    let log_writers = access_log::Writers::default();
    registry.register(
        "strait_access_log_dropped_lines",
        "Access log lines dropped because the writer fell behind",
        log_writers.dropped.clone(),
    );
    let admin_state = Arc::new(admin::State {
        ready: false.into(),
        registry,
        redirect: redirect.clone(),
        workloads: ArcSwap::from_pointee(Vec::new()),
        config: ArcSwap::from_pointee(config_dump(&loaded.config)),
        resilience: {
            let ctx = ctx.clone();
            Box::new(move || proxy::resilience_status(&ctx))
        },
    });
    let admin_addr = admin::serve(config.admin, admin_state.clone(), shutdown.clone()).await?;
    tracing::info!(%admin_addr, "admin API listening");

    let mesh_updates = watch_mesh_file(&config.mesh_file);
    // Not ready (and nothing enrolled or released) before the pod source has seen every pod
    // once: the Kubernetes API may be unreachable at start; its source retries and says so.
    if !wait_synced(workload_source.synced.clone(), &mut sigterm).await {
        tracing::info!("stopped before the pod source had listed the pods");
        shutdown.cancel();
        drop(ctx);
        if config.cleanup_on_exit {
            redirect::uninstall(&config.bpffs)?;
        }
        return Ok(());
    }
    let mut workload_snapshots = workload_source.snapshots.clone();
    let mut node = Node {
        config: config.clone(),
        inherited,
        registry: handover_registry.clone(),
        mesh: Arc::new(loaded.config),
        enrolled: BTreeMap::new(),
        failed: BTreeMap::new(),
        retiring: Vec::new(),
        service_ids: ServiceIds::default(),
        skipped: BTreeMap::new(),
        ctx: ctx.clone(),
        metrics: metrics.clone(),
        gateways: gateway::Gateways::default(),
    };
    node.apply_access_logs(&log_writers);
    node.apply_table(&answers.borrow_and_update());
    node.reconcile(&workload_snapshots.borrow_and_update());
    node.release_strays();
    // Tunnels from other nodes deliver to local pods: accept them only once the pods are
    // enrolled (during an upgrade they wait in the inherited listener's backlog meanwhile,
    // instead of finding no local pod and failing).
    proxy::hbone::serve(tunnel_listener, ctx.clone());
    tracing::info!(tunnel_listen = %config.tunnel_listen, peer_nodes = ?config.peer_nodes, "accepting mTLS tunnels");
    // Sockets of pods that went away while the agents changed places.
    node.inherited = handover::Inherited::default();
    let (handed_over_tx, mut handed_over) = mpsc::unbounded_channel();
    // The CNI plugin's requests go to the new agent from the hand-over on.
    let cni_stop = workload_source.cni.as_ref().map(|cni| cni.stop.clone());
    handover::serve(&config.handover_socket, handover_registry, move |_| {
        if let Some(stop) = &cni_stop {
            stop.stop();
        }
        let _ = handed_over_tx.send(());
    })?;
    node.publish(&admin_state);
    admin_state.ready.store(true, Ordering::Release);
    // The CNI plugin's hand-off, once the pods are listed and reconciled: its answers are
    // read from the published state (see kubernetes/cni.rs).
    if let Some(cni) = &workload_source.cni {
        cni.serve(admin_state.clone())
            .map_err(|e| workloads::Error::from(crate::kubernetes::Error::from(e)))?;
    }
    tracing::info!(mesh = %node.mesh.mesh.name, "agent ready");

    let mut mesh_updates = mesh_updates;
    let mut retry = tokio::time::interval(Duration::from_secs(5));
    let mut successor_took_over = false;
    let mut last_seen = Some(node.mesh.source.sha256.clone());
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
            Some(()) = handed_over.recv() => {
                tracing::info!("a new agent took over the listeners; this one drains and exits");
                successor_took_over = true;
                break;
            }
            changed = workload_snapshots.changed() => {
                if changed.is_err() { break }
                node.reconcile(&workload_snapshots.borrow_and_update());
            }
            changed = answers.changed() => {
                if changed.is_err() { break }
                node.apply_table(&answers.borrow_and_update());
            }
            Some(()) = mesh_updates.recv() => {
                // The same bytes as last time (a touch, an unrelated event): nothing to do,
                // and an invalid file is not reported twice.
                let digest = mesh::digest(std::slice::from_ref(&config.mesh_file)).ok();
                if digest.is_some() && digest == last_seen {
                    continue;
                }
                last_seen = digest;
                match reload(&config.mesh_file, &config.access_log_dir) {
                    Ok(new_mesh) => {
                        if new_mesh.source.sha256 == node.mesh.source.sha256 {
                            continue;
                        }
                        reloads.get_or_create(&ReloadLabels { result: "applied" }).inc();
                        tracing::info!(sha256 = %new_mesh.source.sha256, "mesh file reloaded");
                        let last_rejected = admin_state.config.load().last_rejected.clone();
                        admin_state.config.store(Arc::new(ConfigDump {
                            last_rejected,
                            ..config_dump(&new_mesh)
                        }));
                        names_tx.send_replace(Table::dns_names(&new_mesh));
                        ctx.transport.policy.store(Arc::new(Policy::compile(&new_mesh)));
                        node.mesh = Arc::new(new_mesh);
                        node.apply_access_logs(&log_writers);
                        node.apply_table(&answers.borrow());
                        node.reconcile(&workload_snapshots.borrow());
                    }
                    Err(error) => {
                        reloads.get_or_create(&ReloadLabels { result: "rejected" }).inc();
                        tracing::error!("mesh file rejected; the previous mesh stays in force:\n{error}");
                        let mut dump = (**admin_state.config.load()).clone();
                        dump.last_rejected = Some(Rejected {
                            at_unix: unix_now(),
                            errors: error.to_string().lines().map(str::to_owned).collect(),
                        });
                        admin_state.config.store(Arc::new(dump));
                    }
                }
            }
            _ = retry.tick() => {
                node.retire_expired();
                // Also refreshes /workloads, so certificate rotations and expiry show.
                if !node.failed.is_empty() || node.gateways.has_failures() {
                    node.reconcile(&workload_snapshots.borrow());
                }
            }
        }
        node.publish(&admin_state);
    }

    tracing::info!("shutting down: no new connections; draining the ones in flight");
    admin_state.ready.store(false, Ordering::Release);
    shutdown.cancel();
    node.enrolled.clear();
    node.retiring.clear();
    ctx.connections.close();
    // Each connection closes itself at the drain timeout (see `proxy::Drain`); the margin lets
    // them do so before the process ends whatever is left.
    let margin = Duration::from_millis(500);
    if tokio::time::timeout(config.drain_timeout + margin, ctx.connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            remaining = ctx.connections.len(),
            "drain timeout reached; closing the remaining connections"
        );
    }
    drop(node);
    drop(ctx);
    if config.cleanup_on_exit && !successor_took_over {
        let report = redirect::uninstall(&config.bpffs)?;
        tracing::info!(?report, "removed every pin and attachment");
    } else {
        tracing::info!(bpffs = %config.bpffs.display(), "pins kept: a restarted agent adopts them");
    }
    Ok(())
}

/// What a new enrollment of a pod shares with the one it replaces, which releasing the old one
/// must leave alone.
#[derive(Clone, Default)]
struct Shared {
    /// The same pod cgroup (and network namespace): its eBPF entries were overwritten in place.
    cgroup: bool,
    /// Inbound ports the new enrollment captures too.
    captured: Vec<u16>,
    /// Addresses the new enrollment has too.
    ips: Vec<IpAddr>,
}

impl Shared {
    fn between(old: &Enrolled, new: &Enrolled) -> Shared {
        let cgroup = old.cgroup_id == new.cgroup_id;
        Shared {
            cgroup,
            captured: if cgroup {
                new.inbound.captured.clone()
            } else {
                Vec::new()
            },
            ips: new.workload.ips.clone(),
        }
    }
}

/// Makes a pod's captured inbound ports match its listeners' tls (a mesh reload or a new
/// virtual node can change them): the wanted ports are steered to the pod's inbound sockets
/// first, then ports no longer wanted are released, so a port captured before and after is
/// never uncaptured in between.
fn capture_inbound(
    ctx: &proxy::Context,
    policy: &Policy,
    key: &ResourceId,
    enrolled: &mut Enrolled,
) {
    use std::os::fd::AsFd as _;
    let inpod = ctx.redirect.inpod();
    let want: Vec<u16> = policy
        .captured_ports(&enrolled.virtual_node)
        .into_iter()
        .map(|(port, _)| port)
        .collect();
    let pod = enrolled.cgroup_id;
    let sockets: Vec<(u16, std::os::fd::BorrowedFd<'_>)> = enrolled
        .inbound
        .sockets
        .iter()
        .map(|(addr, fd)| {
            let family = if addr.is_ipv4() {
                strait_ebpf::FAMILY_V4
            } else {
                strait_ebpf::FAMILY_V6
            };
            (family, fd.as_fd())
        })
        .collect();
    let captured = match inpod.capture(pod, &want, &sockets) {
        Ok(()) => want,
        Err(error) => {
            tracing::error!(pod = %key, %error, "cannot capture inbound ports");
            Vec::new()
        }
    };
    let stale: Vec<u16> = enrolled
        .inbound
        .captured
        .iter()
        .filter(|p| !captured.contains(p))
        .copied()
        .collect();
    if let Err(error) = inpod.release(pod, &stale) {
        tracing::error!(pod = %key, %error, "cannot release inbound ports");
    }
    if captured != enrolled.inbound.captured {
        tracing::info!(pod = %key, ?captured, "inbound capture (listeners with tls STRICT or PERMISSIVE)");
    }
    enrolled.inbound.captured = captured;
}

/// Waits until the pod source is synced; false if a signal came first.
async fn wait_synced(
    mut synced: watch::Receiver<bool>,
    sigterm: &mut tokio::signal::unix::Signal,
) -> bool {
    if *synced.borrow_and_update() {
        return true;
    }
    tracing::info!(
        "waiting for the pod source's first complete list; /ready answers 503 until then"
    );
    tokio::select! {
        result = synced.wait_for(|done| *done) => result.is_ok(),
        _ = tokio::signal::ctrl_c() => false,
        _ = sigterm.recv() => false,
    }
}

fn reload(path: &Path, access_log_dir: &Path) -> Result<MeshConfig, Error> {
    let loaded = mesh::load_file(path)?;
    for warning in &loaded.warnings {
        tracing::warn!("{warning}");
    }
    check_files(&loaded.config, access_log_dir)?;
    Ok(loaded.config)
}

/// The checks that need this node's files: access log paths against the access log
/// directory (logs the warnings; any error refuses the mesh).
///
/// TLS files are not checked here: a node opens only the certificates of virtual nodes it
/// runs a pod of, when it needs them (identity::local), so files of other nodes' virtual
/// nodes need not exist here.
fn check_files(config: &MeshConfig, access_log_dir: &Path) -> Result<(), Error> {
    let mut errors = Vec::new();
    for diagnostic in mesh::check_access_logs(config, access_log_dir) {
        match diagnostic.severity {
            mesh::Severity::Error => errors.push(diagnostic),
            _ => tracing::warn!("{diagnostic}"),
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Error::MissingFiles(errors))
    }
}

fn config_dump(mesh: &MeshConfig) -> ConfigDump {
    ConfigDump {
        file: mesh.source.path.display().to_string(),
        sha256: mesh.source.sha256.clone(),
        loaded_at_unix: mesh
            .source
            .loaded_at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        mesh: serde_json::to_value(mesh).unwrap_or(serde_json::Value::Null),
        last_rejected: None,
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Watches the mesh file's directory (not the file: a ConfigMap update swaps a symlinked
/// directory, and editors replace files by rename), or the mesh directory itself, and signals
/// every change.
fn watch_mesh_file(path: &Path) -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel(1);
    let is_dir = path.is_dir();
    let dir = if is_dir {
        path
    } else {
        path.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
    }
    .to_path_buf();
    let (kick_tx, mut kick_rx) = mpsc::unbounded_channel::<()>();
    let file_name = path.file_name().map(|n| n.to_os_string());
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Only the mesh file (or, for a directory, its mesh files) and Kubernetes' `..data` /
        // `..<timestamp>` entries matter; other files come and go without a reload.
        let relevant = event.is_ok_and(|event| {
            workloads::is_change(&event)
                && event.paths.iter().any(|p| {
                    let mesh_file = if is_dir {
                        p.extension()
                            .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
                    } else {
                        p.file_name() == file_name.as_deref()
                    };
                    mesh_file
                        || p.file_name()
                            .is_some_and(|name| name.to_string_lossy().starts_with(".."))
                })
        });
        if relevant {
            let _ = kick_tx.send(());
        }
    });
    let mut watcher = match watcher {
        Ok(watcher) => watcher,
        Err(error) => {
            tracing::error!(%error, "cannot watch the mesh file; reload needs a restart");
            return rx;
        }
    };
    if let Err(error) = watcher.watch(&dir, notify::RecursiveMode::NonRecursive) {
        tracing::error!(dir = %dir.display(), %error, "cannot watch the mesh file's directory; reload needs a restart");
        return rx;
    }
    tokio::spawn(async move {
        let _watcher = watcher;
        while kick_rx.recv().await.is_some() {
            // Let a burst of writes settle before reading the file.
            tokio::time::sleep(Duration::from_millis(100)).await;
            while kick_rx.try_recv().is_ok() {}
            if tx.send(()).await.is_err() {
                return;
            }
        }
    });
    rx
}

/// A pod the agent has enrolled: its cgroup is in the eBPF map and its listeners are up.
struct Enrolled {
    workload: Workload,
    virtual_node: ResourceId,
    cgroup_id: u64,
    /// The network namespace (device, inode) the listeners live in.
    netns: (u64, u64),
    outbound_port: u16,
    inbound_port: u16,
    egress_drop_all: bool,
    listeners: Vec<SocketAddr>,
    _accepting: proxy::Accepting,
    /// Inbound capture: the pod addresses and ports steered to the inbound sockets.
    inbound: PodInbound,
}

/// A pod's inbound capture state (`proxy::inbound`, `redirect::inpod`).
struct PodInbound {
    port: u16,
    /// Also registered in the transport (by address) until the pod is released.
    _local: Arc<LocalPod>,
    /// Listening sockets in the pod (IPv4, IPv6 if the pod has it), inserted into the map.
    sockets: Vec<(SocketAddr, Arc<std::os::fd::OwnedFd>)>,
    /// Listener ports captured (both families, every local address of the pod).
    captured: Vec<u16>,
    _accepting: proxy::Accepting,
}

/// The node's state, owned by the reconcile loop.
struct Node {
    config: Config,
    /// Listeners handed over by the previous agent, used instead of binding anew.
    inherited: handover::Inherited,
    /// Every listener this agent has, for handing over to the next one.
    registry: handover::Registry,
    mesh: Arc<MeshConfig>,
    enrolled: BTreeMap<ResourceId, Enrolled>,
    /// Pods that should be enrolled but could not be, with why; retried periodically.
    failed: BTreeMap<ResourceId, (Workload, Option<ResourceId>, String)>,
    /// The listeners of pods changed in place, kept accepting until the deadline: a connect
    /// the kernel steered to them just before the switch waits in their backlog and must be
    /// served, not reset.
    retiring: Vec<(Instant, Enrolled)>,
    /// The eBPF id of each virtual service, stable across reloads.
    service_ids: ServiceIds,
    /// Pods that are not to be enrolled (no or several VirtualNodes, not in the mesh, host
    /// network, no IP yet), with why: `/workloads` shows them.
    skipped: BTreeMap<ResourceId, (Option<ResourceId>, String)>,
    ctx: Arc<proxy::Context>,
    metrics: Metrics,
    /// Gateway pods and the VirtualGateway listeners served in them.
    gateways: gateway::Gateways,
}

/// How long a changed pod's previous listeners keep accepting after the eBPF maps point at the
/// new ones (see `Node::retiring`).
const RETIRE_AFTER: Duration = Duration::from_secs(2);

impl Node {
    /// Opens the access logs the virtual nodes ask for (`logging.accessLog.file`).
    fn apply_access_logs(&self, writers: &access_log::Writers) {
        let logs: BTreeMap<ResourceId, access_log::AccessLog> = self
            .mesh
            .virtual_nodes
            .iter()
            .map(|vn| (&vn.id, &vn.spec.logging))
            // A gateway's requests carry its id as their source (crate::gateway).
            .chain(
                self.mesh
                    .virtual_gateways
                    .iter()
                    .map(|gw| (&gw.id, &gw.spec.logging)),
            )
            .filter_map(|(id, logging)| {
                let file = logging.as_ref()?.access_log.as_ref()?;
                // Checked when the mesh was loaded; checked again, as the folder may have
                // changed since.
                let dir = &self.config.access_log_dir;
                let path = match access_log::resolve(dir, &file.path) {
                    Ok(path) => path,
                    Err(error) => {
                        tracing::error!(virtual_node = %id, %error, "access log refused");
                        return None;
                    }
                };
                if path.starts_with(dir)
                    && let Err(error) = std::fs::create_dir_all(dir)
                {
                    tracing::error!(dir = %dir.display(), %error, "cannot create the access log directory");
                }
                Some((id.clone(), writers.open(file, path)))
            })
            .collect();
        let logs = Arc::new(logs);
        // The receiving side writes the server's lines (docs/resilience.md).
        self.ctx.transport.admission.access_logs.store(logs.clone());
        self.ctx.access_logs.store(logs);
    }

    fn apply_table(&mut self, answers: &BTreeMap<String, Vec<IpAddr>>) {
        let table = Table::compile(&self.mesh, answers);
        self.service_ids
            .update(self.mesh.virtual_services.iter().map(|vs| &vs.id));
        let services: Vec<(SocketAddr, u32)> = table
            .services
            .iter()
            .filter_map(|(addr, port)| Some((*addr, self.service_ids.get(&port.service)?)))
            .chain(table.refused.keys().map(|ip| {
                (
                    SocketAddr::new(*ip, strait_ebpf::SERVICE_ANY_PORT),
                    strait_ebpf::SERVICE_ID_REFUSED,
                )
            }))
            .collect();
        // The proxy must know a service before the kernel starts capturing it.
        self.ctx.table.store(Arc::new(table));
        // A new service's backend pairs go in before its addresses; a service that stays keeps
        // its id, so its entries in both maps stay as they are.
        self.sync_backends();
        if let Err(error) = self.ctx.redirect.set_services(&services) {
            tracing::error!(%error, "cannot update the service addresses in the eBPF map");
        } else {
            tracing::debug!(services = services.len(), "service addresses updated");
        }
    }

    fn reconcile(&mut self, pods: &BTreeMap<ResourceId, Workload>) {
        let drop_all = self.mesh.mesh.spec.egress_filter == EgressFilter::DropAll;
        let mut desired: BTreeMap<ResourceId, (Workload, ResourceId)> = BTreeMap::new();
        let mut skipped = BTreeMap::new();
        for (key, workload) in pods {
            let selection = workload.virtual_node(&self.mesh);
            match (selection.chosen(), &workload.unavailable) {
                (Some(vn), None) => {
                    desired.insert(key.clone(), (workload.clone(), vn.clone()));
                }
                (Some(vn), Some(reason)) => {
                    skipped.insert(key.clone(), (Some(vn.clone()), reason.clone()));
                }
                // A gateway's pod: its listeners are `gateway`'s (reconciled below).
                (None, _) if gateway::selects(&self.mesh, workload) => {}
                (None, _) => {
                    let reason = selection.reason(workload, &self.mesh).unwrap_or_default();
                    if let Selection::Ambiguous { .. } = selection
                        && self.skipped.get(key).is_none_or(|(_, r)| *r != reason)
                    {
                        tracing::warn!(pod = %key, "{reason}");
                    }
                    skipped.insert(key.clone(), (None, reason));
                }
            }
        }
        self.skipped = skipped;
        // Release pods that are gone (kernel first, then listeners). A pod that changed (its
        // labels, and so its virtual node, or its addresses) is replaced below, make before
        // break: it is never less protected during the change than before or after it.
        let gone: Vec<ResourceId> = self
            .enrolled
            .keys()
            .filter(|key| !desired.contains_key(*key))
            .cloned()
            .collect();
        for key in gone {
            if let Some(enrolled) = self.enrolled.remove(&key) {
                self.release(&key, enrolled, None);
            }
        }
        self.failed.retain(|key, _| desired.contains_key(key));
        for (key, (workload, vn)) in desired {
            if let Some(enrolled) = self.enrolled.get_mut(&key)
                && enrolled.workload == workload
                && enrolled.virtual_node == vn
            {
                if enrolled.egress_drop_all != drop_all {
                    let update = EnrolledPod {
                        outbound_port: enrolled.outbound_port,
                        egress_drop_all: drop_all,
                        workload_id: 0,
                    };
                    match self.ctx.redirect.enroll(enrolled.cgroup_id, update) {
                        Ok(()) => enrolled.egress_drop_all = drop_all,
                        Err(error) => {
                            tracing::error!(pod = %key, %error, "cannot update the egress filter")
                        }
                    }
                }
                continue;
            }
            // New, or changed: the new enrollment is complete (listeners, inbound capture,
            // backend rules, then the cgroup) before anything of the old one goes.
            match self.enroll(&workload, &vn, drop_all) {
                Ok(enrolled) => {
                    tracing::info!(pod = %key, virtual_node = %vn, cgroup_id = enrolled.cgroup_id, listeners = ?enrolled.listeners, "pod enrolled");
                    self.failed.remove(&key);
                    if let Some(previous) = self.enrolled.insert(key.clone(), enrolled) {
                        let current = &self.enrolled[&key];
                        let shared = Shared::between(&previous, current);
                        self.release(&key, previous, Some(shared));
                    }
                }
                Err(error) => {
                    if self.failed.get(&key).is_none_or(|(_, _, e)| *e != error) {
                        tracing::error!(pod = %key, virtual_node = %vn, "cannot enroll pod: {error}");
                    }
                    // A changed pod that cannot be enrolled anew keeps its previous enrollment
                    // (still protected as before) until the next attempt succeeds.
                    self.failed.insert(key, (workload, Some(vn), error));
                }
            }
        }
        self.retire_expired();
        self.sync_inbound();
        self.sync_backends();
        let (mesh, ctx) = (self.mesh.clone(), self.ctx.clone());
        self.gateways
            .reconcile(pods, &mesh, &ctx, &self.inherited, &self.registry);
        self.metrics
            .enrolled_workloads
            .set(self.enrolled.len() as i64);
    }

    /// Stops the previous listeners of changed pods whose grace time is over.
    fn retire_expired(&mut self) {
        let now = Instant::now();
        self.retiring.retain(|(deadline, _)| *deadline > now);
    }

    /// Undoes an enrollment: the pod is gone (`replaced_by` is `None`), or a new enrollment
    /// of the same pod has just taken over (`Some`: what the two share stays, and the old
    /// listeners keep accepting for [`RETIRE_AFTER`] so nothing steered to them is reset).
    fn release(&mut self, key: &ResourceId, enrolled: Enrolled, replaced_by: Option<Shared>) {
        for addr in &enrolled.listeners {
            self.registry.remove(&format!("outbound/{key}/{addr}"));
        }
        for (addr, _) in &enrolled.inbound.sockets {
            self.registry.remove(&format!("inbound/{key}/{addr}"));
        }
        let shared = replaced_by.clone().unwrap_or_default();
        if !shared.cgroup
            && let Err(error) = self.ctx.redirect.release(enrolled.cgroup_id)
        {
            tracing::error!(pod = %key, %error, "cannot release the pod's cgroup");
        }
        let inpod = self.ctx.redirect.inpod();
        let stale: Vec<u16> = enrolled
            .inbound
            .captured
            .iter()
            .filter(|port| !shared.cgroup || !shared.captured.contains(port))
            .copied()
            .collect();
        if let Err(error) = inpod.release(enrolled.cgroup_id, &stale) {
            tracing::error!(pod = %key, %error, "cannot release the pod's inbound ports");
        }
        if !shared.cgroup {
            inpod.detach_pod(enrolled.cgroup_id);
        }
        let gone_ips: Vec<IpAddr> = enrolled
            .workload
            .ips
            .iter()
            .filter(|ip| !shared.ips.contains(ip))
            .copied()
            .collect();
        if replaced_by.is_none() {
            self.ctx.transport.remove_local(key);
        } else {
            self.ctx.transport.remove_local_ips(key, &gone_ips);
        }
        if let Err(error) = self.ctx.redirect.set_fast_path_pod(&gone_ips, None) {
            tracing::warn!(pod = %key, %error, "cannot remove the pod from the fast path");
        }
        match replaced_by {
            None => {
                tracing::info!(pod = %key, virtual_node = %enrolled.virtual_node, "pod released")
            }
            Some(_) => {
                tracing::info!(pod = %key, virtual_node = %enrolled.virtual_node, "previous enrollment retired");
                self.retiring
                    .push((Instant::now() + RETIRE_AFTER, enrolled));
            }
        }
    }

    /// Makes each pod's captured ports match its listeners' tls (a mesh reload can change them).
    fn sync_inbound(&mut self) {
        let policy = self.ctx.transport.policy.load_full();
        for (key, enrolled) in &mut self.enrolled {
            capture_inbound(&self.ctx, &policy, key, enrolled);
        }
    }

    /// Puts every enrolled pod under backend authorization in eBPF: it may connect only to
    /// the services its virtual node lists as backends.
    fn sync_backends(&self) {
        self.sync_backends_with(None);
    }

    /// [`Node::sync_backends`], with a pod about to be enrolled (`extra`: its cgroup and
    /// virtual node), so its rules are in force before its connects are captured.
    fn sync_backends_with(&self, extra: Option<(u64, &ResourceId)>) {
        let policy = self.ctx.transport.policy.load_full();
        let backends_of = |vn: &ResourceId| -> std::collections::BTreeSet<u32> {
            self.mesh
                .virtual_services
                .iter()
                .filter(|vs| policy.is_backend(vn, &vs.id))
                .filter_map(|vs| self.service_ids.get(&vs.id))
                .collect()
        };
        let result = match extra {
            // One pod about to be enrolled: only its own pairs change. Pods a previous agent
            // enrolled and this one has not reached yet keep theirs (during an upgrade their
            // connects go on).
            Some((cgroup_id, vn)) => self
                .ctx
                .redirect
                .inpod()
                .set_pod_backends(cgroup_id, &backends_of(vn)),
            None => {
                let allowed: BTreeMap<u64, std::collections::BTreeSet<u32>> = self
                    .enrolled
                    .values()
                    .map(|e| (e.cgroup_id, backends_of(&e.virtual_node)))
                    .collect();
                self.ctx.redirect.inpod().set_backends(&allowed)
            }
        };
        if let Err(error) = result {
            tracing::error!(%error, "cannot update the backend authorization maps");
        }
    }

    fn enroll(
        &self,
        workload: &Workload,
        vn: &ResourceId,
        drop_all: bool,
    ) -> Result<Enrolled, String> {
        let cgroup_id = redirect::cgroup_id(&workload.cgroup).map_err(|e| e.to_string())?;
        let netns = std::fs::metadata(&workload.netns)
            .map(|m| (m.dev(), m.ino()))
            .map_err(|e| format!("network namespace {}: {e}", workload.netns.display()))?;
        // Pods have a network namespace each; services on a plain host share the host's. Each
        // workload in a shared namespace gets its own ports, so the listener (and not
        // anything the workload could forge) still tells the agent who is calling.
        let port = self.free_port(netns, self.config.outbound_port, |e| e.outbound_port)?;
        let bound = self.listen(workload, "outbound", port)?;
        let (addrs_up, listeners): (Vec<SocketAddr>, Vec<std::net::TcpListener>) =
            bound.into_iter().map(|(addr, l, _)| (addr, l)).unzip();
        // The fast path needs the pod's netns cookie; the listener lives in that netns.
        if let Some(listener) = listeners.first() {
            let registered = redirect::socket_netns_cookie(listener.as_fd())
                .map_err(|e| e.to_string())
                .and_then(|cookie| {
                    self.ctx
                        .redirect
                        .set_fast_path_pod(&workload.ips, Some(cookie))
                        .map_err(|e| e.to_string())
                });
            if let Err(error) = registered {
                tracing::warn!(pod = %workload.key(), %error, "pod not in the fast path; its traffic takes the normal stack");
            }
        }
        let source = Arc::new(outbound::Source {
            workload: workload.key(),
            virtual_node: vn.clone(),
            ips: workload.ips.clone(),
        });
        let accepting = outbound::serve(listeners, source, self.ctx.clone())
            .map_err(|e| format!("cannot register listeners with the runtime: {e}"))?;
        let inbound = self.enroll_inbound(workload, vn, cgroup_id, netns)?;
        let mut enrolled = Enrolled {
            workload: workload.clone(),
            virtual_node: vn.clone(),
            cgroup_id,
            netns,
            outbound_port: port,
            inbound_port: inbound.port,
            egress_drop_all: drop_all,
            listeners: addrs_up,
            _accepting: accepting,
            inbound,
        };
        // Protection before capture: STRICT ports steered to the agent and the backend rules
        // in force, then the cgroup (whose connects are captured from that moment on). For a
        // pod changed in place this switches its inbound ports and outbound listener to the
        // new sockets, each by one map update.
        let policy = self.ctx.transport.policy.load_full();
        capture_inbound(&self.ctx, &policy, &workload.key(), &mut enrolled);
        self.sync_backends_with(Some((cgroup_id, vn)));
        self.ctx
            .redirect
            .enroll(
                cgroup_id,
                EnrolledPod {
                    outbound_port: port,
                    egress_drop_all: drop_all,
                    workload_id: 0,
                },
            )
            .map_err(|e| e.to_string())?;
        Ok(enrolled)
    }

    /// The first port from `first` that no other enrolled workload in the same network
    /// namespace uses for the same purpose.
    fn free_port(
        &self,
        netns: (u64, u64),
        first: u16,
        used: impl Fn(&Enrolled) -> u16,
    ) -> Result<u16, String> {
        // Retiring listeners of a changed pod still hold their ports for a moment.
        (first..=u16::MAX)
            .find(|port| {
                !self
                    .enrolled
                    .values()
                    .chain(self.retiring.iter().map(|(_, e)| e))
                    .any(|e| e.netns == netns && used(e) == *port)
            })
            .ok_or_else(|| format!("no free port from {first} up in this network namespace"))
    }

    /// Listeners on 127.0.0.1 and ::1 at `port` in the workload's network namespace: the ones
    /// the previous agent handed over, else new ones. Each is registered for the next hand-over
    /// as `<kind>/<namespace>/<name>/<addr>` by a duplicate, returned beside it. A pod without
    /// IPv6 gets its IPv4 listener only.
    fn listen(
        &self,
        workload: &Workload,
        kind: &str,
        port: u16,
    ) -> Result<Vec<(SocketAddr, std::net::TcpListener, Arc<std::os::fd::OwnedFd>)>, String> {
        let addrs = [
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port),
        ];
        let name = |addr: &SocketAddr| format!("{kind}/{}/{addr}", workload.key());
        let mut bound = Vec::new();
        let mut missing = Vec::new();
        for addr in addrs {
            match self.inherited.take(&name(&addr)) {
                Some(listener) => bound.push((addr, Ok(listener))),
                None => missing.push(addr),
            }
        }
        if !missing.is_empty() {
            let fresh = netns::listen_in(&workload.netns, &missing).map_err(|e| e.to_string())?;
            bound.extend(missing.into_iter().zip(fresh));
        }
        let mut listeners = Vec::new();
        for (addr, result) in bound {
            match result {
                Ok(listener) => {
                    // One duplicate per listener, shared by the hand-over registry and
                    // whoever else needs the socket later (the inbound capture maps).
                    let shared = std::os::fd::AsFd::as_fd(&listener)
                        .try_clone_to_owned()
                        .map(Arc::new)
                        .map_err(|e| format!("cannot duplicate the {kind} socket {addr}: {e}"))?;
                    self.registry.add_shared(&name(&addr), shared.clone());
                    listeners.push((addr, listener, shared));
                }
                // A pod without IPv6 (no ::1) has no IPv6 to capture or to bypass with; its
                // captured ports stay captured in IPv6 and are dropped there (see
                // redirect/inpod.rs). Any other failure is an enrollment failure, not a
                // warning: a missing listener would leave a family uncovered.
                Err(error) if addr.is_ipv6() && error.is_address_not_available() => {
                    tracing::info!(pod = %workload.key(), %error, "the pod has no IPv6 loopback: no IPv6 {kind} listener")
                }
                Err(error) => return Err(error.to_string()),
            }
        }
        listeners.sort_by_key(|(addr, _, _)| addr.is_ipv6());
        Ok(listeners)
    }

    /// Registers the pod as local (same-node and tunnel delivery reach it through its own
    /// network namespace), opens its inbound sockets and attaches the sk_lookup program. Which
    /// ports are captured is `sync_inbound`'s business.
    fn enroll_inbound(
        &self,
        workload: &Workload,
        vn: &ResourceId,
        cgroup_id: u64,
        netns: (u64, u64),
    ) -> Result<PodInbound, String> {
        let port = self.free_port(netns, self.config.inbound_port, |e| e.inbound_port)?;
        let mut listeners = Vec::new();
        let mut sockets = Vec::new();
        for (addr, listener, shared) in self.listen(workload, "inbound", port)? {
            sockets.push((addr, shared));
            listeners.push(listener);
        }
        // Delivery sockets are created in the namespace the inbound listener lives in.
        let anchor = sockets
            .first()
            .map(|(_, fd)| fd.clone())
            .ok_or_else(|| format!("BUG: no inbound listener for {}", workload.key()))?;
        let local = Arc::new(LocalPod {
            workload: workload.key(),
            virtual_node: vn.clone(),
            ips: workload.ips.clone(),
            connector: netns::Connector::new(&workload.netns, anchor),
        });
        let accepting = proxy::inbound::serve(listeners, local.clone(), self.ctx.clone())
            .map_err(|e| format!("cannot register inbound sockets with the runtime: {e}"))?;
        self.ctx
            .redirect
            .inpod()
            .attach_pod(&workload.netns, cgroup_id)
            .map_err(|e| e.to_string())?;
        self.ctx.transport.add_local(local.clone());
        Ok(PodInbound {
            port,
            _local: local,
            sockets,
            captured: Vec::new(),
            _accepting: accepting,
        })
    }

    /// A restarted agent adopts the pinned maps, including pods enrolled by its predecessor
    /// that have since gone away: release those.
    fn release_strays(&self) {
        let inpod = self.ctx.redirect.inpod();
        inpod.detach_strays(&self.enrolled.values().map(|e| e.cgroup_id).collect());
        let keep = self
            .enrolled
            .values()
            .flat_map(|e| redirect::inpod::InPod::keys(e.cgroup_id, &e.inbound.captured))
            .collect();
        if let Err(error) = inpod.release_strays(&keep) {
            tracing::error!(%error, "cannot clean the inbound ports a previous agent captured");
        }
        let enrolled = match self.ctx.redirect.enrolled() {
            Ok(enrolled) => enrolled,
            Err(error) => {
                tracing::error!(%error, "cannot list the enrolled cgroups");
                return;
            }
        };
        for (cgroup_id, _) in enrolled {
            if !self.enrolled.values().any(|e| e.cgroup_id == cgroup_id) {
                match self.ctx.redirect.release(cgroup_id) {
                    Ok(()) => {
                        tracing::info!(cgroup_id, "released a cgroup a previous agent enrolled")
                    }
                    Err(error) => {
                        tracing::error!(cgroup_id, %error, "cannot release a stale cgroup")
                    }
                }
            }
        }
    }

    /// The virtual node's identities and its certificate: a listener's `tls.certificate`,
    /// else a client policy's, read through the certificate store (so a rotated file shows).
    fn identity_status(&self, vn: &ResourceId) -> admin::IdentityStatus {
        use crate::identity::policy::certificate_files;
        let policy = self.ctx.transport.policy.load();
        let Some(node) = policy.nodes.get(vn) else {
            return admin::IdentityStatus {
                identities: Vec::new(),
                certificate: None,
            };
        };
        let listener_cert = node
            .listeners
            .values()
            .flatten()
            .map(|tls| &tls.certificate)
            .next();
        let client_cert = || {
            node.backends
                .values()
                .flatten()
                .find_map(|tls| tls.certificate.as_ref())
        };
        let certificate = listener_cert.or_else(client_cert).map(|cert| {
            let field = format!("VirtualNode {vn} tls.certificate");
            let loaded = certificate_files(cert, &field).and_then(|(chain, _)| {
                let loaded = self.ctx.transport.certificate(vn, cert, &field);
                loaded.map(|l| (chain, l))
            });
            match loaded {
                Ok((chain, cert)) => {
                    let now = std::time::SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_secs() as i64)
                        .unwrap_or(0);
                    admin::CertificateStatus {
                        path: chain.display().to_string(),
                        sans: cert.sans.clone(),
                        serial: cert.serial.clone(),
                        not_after_unix: cert.not_after,
                        not_after: access_log::iso8601(
                            UNIX_EPOCH + Duration::from_secs(cert.not_after.max(0) as u64),
                        ),
                        expires_in_seconds: cert.not_after - now,
                        error: None,
                    }
                }
                Err(error) => admin::CertificateStatus {
                    path: String::new(),
                    sans: Vec::new(),
                    serial: String::new(),
                    not_after_unix: 0,
                    not_after: String::new(),
                    expires_in_seconds: 0,
                    error: Some(error.to_string()),
                },
            }
        });
        admin::IdentityStatus {
            identities: node.identities.clone(),
            certificate,
        }
    }

    fn publish(&self, admin: &admin::State) {
        let mut statuses: Vec<WorkloadStatus> = self
            .enrolled
            .iter()
            .map(|(key, e)| WorkloadStatus {
                pod: key.to_string(),
                virtual_node: Some(e.virtual_node.to_string()),
                enrolled: true,
                cgroup_id: Some(e.cgroup_id),
                netns_inode: Some(e.netns.1),
                listeners: e.listeners.clone(),
                error: None,
                reason: None,
                identity: Some(self.identity_status(&e.virtual_node)),
            })
            .collect();
        statuses.extend(
            self.failed
                .iter()
                .map(|(key, (_, vn, error))| WorkloadStatus {
                    pod: key.to_string(),
                    virtual_node: vn.as_ref().map(ToString::to_string),
                    enrolled: false,
                    cgroup_id: None,
                    netns_inode: None,
                    listeners: Vec::new(),
                    error: Some(error.clone()),
                    reason: None,
                    identity: None,
                }),
        );
        statuses.extend(
            self.skipped
                .iter()
                .map(|(key, (vn, reason))| WorkloadStatus {
                    pod: key.to_string(),
                    virtual_node: vn.as_ref().map(ToString::to_string),
                    enrolled: false,
                    cgroup_id: None,
                    netns_inode: None,
                    listeners: Vec::new(),
                    error: None,
                    reason: Some(reason.clone()),
                    identity: None,
                }),
        );
        statuses.extend(self.gateways.statuses());
        admin.workloads.store(Arc::new(statuses));
    }
}
