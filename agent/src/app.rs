//! Builds the running agent from its configuration and keeps it in step with its inputs.
//!
//! Inputs: the mesh file (watched, reloaded when it changes), the local workloads (watched),
//! and DNS answers (re-resolved on TTL). One reconcile loop turns them into the eBPF maps
//! (enrolled cgroups, service addresses), one outbound listener set per enrolled pod, and the
//! routing table the proxy reads. Shutdown: stop accepting, drain, exit; the pins stay so a
//! restarted agent adopts them.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, UNIX_EPOCH};

use arc_swap::ArcSwap;
use notify::Watcher;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, ConfigDump, WorkloadStatus};
use crate::mesh::{self, EgressFilter, MeshConfig, ResourceId};
use crate::proxy::{self, outbound};
use crate::redirect::{self, EnrolledPod, Redirect, RedirectConfig};
use crate::routing::Table;
use crate::telemetry::{Metrics, RedirectCollector};
use crate::workloads::{self, Selection, Workload};
use crate::{discovery, netns};

/// How `strait run` was asked to run.
#[derive(Debug, Clone)]
pub struct Config {
    pub mesh_file: PathBuf,
    pub workloads_dir: PathBuf,
    pub cgroup_root: PathBuf,
    pub bpffs: PathBuf,
    pub admin: SocketAddr,
    pub dns_server: Option<IpAddr>,
    pub outbound_port: u16,
    pub drain_timeout: Duration,
    pub cleanup_on_exit: bool,
    /// Sockmap fast path for the agent's local legs (see `redirect/fastpath.rs`).
    pub fast_path: bool,
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
    let missing = mesh::check_files(&loaded.config);
    if !missing.is_empty() {
        return Err(Error::MissingFiles(missing));
    }
    if !config.cgroup_root.join("cgroup.procs").exists() {
        return Err(Error::CgroupRoot(config.cgroup_root.clone()));
    }
    let workload_source = workloads::DirectorySource::start(&config.workloads_dir)?;
    let resolver = discovery::Resolver::new(config.dns_server)?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(Error::Signals)?;

    let redirect = Arc::new(Redirect::install(&RedirectConfig {
        cgroup_root: config.cgroup_root.clone(),
        bpffs: config.bpffs.clone(),
        fast_path: config.fast_path,
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

    let shutdown = CancellationToken::new();
    let ctx = Arc::new(proxy::Context {
        redirect: redirect.clone(),
        table: ArcSwap::from_pointee(Table::default()),
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
        connections: TaskTracker::new(),
    });
    let admin_state = Arc::new(admin::State {
        ready: false.into(),
        registry,
        redirect: redirect.clone(),
        workloads: ArcSwap::from_pointee(Vec::new()),
        config: ArcSwap::from_pointee(config_dump(&loaded.config)),
    });
    let admin_addr = admin::serve(config.admin, admin_state.clone(), shutdown.clone()).await?;
    tracing::info!(%admin_addr, "admin API listening");

    let mesh_updates = watch_mesh_file(&config.mesh_file);
    let (names_tx, names_rx) = watch::channel(Table::dns_names(&loaded.config));
    let mut answers = discovery::keep_resolved(resolver, names_rx);
    let mut workload_snapshots = workload_source.snapshots.clone();

    let mut node = Node {
        config: config.clone(),
        mesh: Arc::new(loaded.config),
        enrolled: BTreeMap::new(),
        failed: BTreeMap::new(),
        ctx: ctx.clone(),
        metrics: metrics.clone(),
    };
    node.apply_table(&answers.borrow_and_update());
    node.reconcile(&workload_snapshots.borrow_and_update());
    node.release_strays();
    node.publish(&admin_state);
    admin_state.ready.store(true, Ordering::Release);
    tracing::info!(mesh = %node.mesh.mesh.name, "agent ready");

    let mut mesh_updates = mesh_updates;
    let mut retry = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
            changed = workload_snapshots.changed() => {
                if changed.is_err() { break }
                node.reconcile(&workload_snapshots.borrow_and_update());
            }
            changed = answers.changed() => {
                if changed.is_err() { break }
                node.apply_table(&answers.borrow_and_update());
            }
            Some(()) = mesh_updates.recv() => {
                match reload(&config.mesh_file) {
                    Ok(new_mesh) => {
                        if new_mesh.source.sha256 == node.mesh.source.sha256 {
                            continue;
                        }
                        reloads.get_or_create(&ReloadLabels { result: "applied" }).inc();
                        tracing::info!(sha256 = %new_mesh.source.sha256, "mesh file reloaded");
                        admin_state.config.store(Arc::new(config_dump(&new_mesh)));
                        names_tx.send_replace(Table::dns_names(&new_mesh));
                        node.mesh = Arc::new(new_mesh);
                        node.apply_table(&answers.borrow());
                        node.reconcile(&workload_snapshots.borrow());
                    }
                    Err(error) => {
                        reloads.get_or_create(&ReloadLabels { result: "rejected" }).inc();
                        tracing::error!("mesh file rejected; the previous mesh stays in force:\n{error}");
                    }
                }
            }
            _ = retry.tick() => {
                if node.failed.is_empty() { continue }
                node.reconcile(&workload_snapshots.borrow());
            }
        }
        node.publish(&admin_state);
    }

    tracing::info!("shutting down: no new connections; draining the ones in flight");
    admin_state.ready.store(false, Ordering::Release);
    shutdown.cancel();
    node.enrolled.clear();
    ctx.connections.close();
    if tokio::time::timeout(config.drain_timeout, ctx.connections.wait())
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
    if config.cleanup_on_exit {
        let report = redirect::uninstall(&config.bpffs)?;
        tracing::info!(?report, "removed every pin and attachment");
    } else {
        tracing::info!(bpffs = %config.bpffs.display(), "pins kept: a restarted agent adopts them");
    }
    Ok(())
}

fn reload(path: &Path) -> Result<MeshConfig, Error> {
    let loaded = mesh::load_file(path)?;
    for warning in &loaded.warnings {
        tracing::warn!("{warning}");
    }
    let missing = mesh::check_files(&loaded.config);
    if !missing.is_empty() {
        return Err(Error::MissingFiles(missing));
    }
    Ok(loaded.config)
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
    }
}

/// Watches the mesh file's directory (not the file: a ConfigMap update swaps a symlinked
/// directory, and editors replace files by rename) and signals every change.
fn watch_mesh_file(path: &Path) -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel(1);
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let (kick_tx, mut kick_rx) = mpsc::unbounded_channel::<()>();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
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
    egress_drop_all: bool,
    listeners: Vec<SocketAddr>,
    _accepting: outbound::PodListeners,
}

/// The node's state, owned by the reconcile loop.
struct Node {
    config: Config,
    mesh: Arc<MeshConfig>,
    enrolled: BTreeMap<ResourceId, Enrolled>,
    /// Pods that should be enrolled but could not be, with why; retried periodically.
    failed: BTreeMap<ResourceId, (Workload, Option<ResourceId>, String)>,
    ctx: Arc<proxy::Context>,
    metrics: Metrics,
}

impl Node {
    fn apply_table(&mut self, answers: &BTreeMap<String, Vec<IpAddr>>) {
        let table = Table::compile(&self.mesh, answers);
        let services: Vec<(SocketAddr, u32)> = table
            .services
            .iter()
            .map(|(addr, port)| {
                let id = self
                    .mesh
                    .virtual_services
                    .iter()
                    .position(|vs| vs.id == port.service)
                    .map_or(0, |i| i as u32 + 1);
                (*addr, id)
            })
            .collect();
        // The proxy must know a service before the kernel starts capturing it.
        self.ctx.table.store(Arc::new(table));
        if let Err(error) = self.ctx.redirect.set_services(&services) {
            tracing::error!(%error, "cannot update the service addresses in the eBPF map");
        } else {
            tracing::debug!(services = services.len(), "service addresses updated");
        }
    }

    fn reconcile(&mut self, pods: &BTreeMap<ResourceId, Workload>) {
        let drop_all = self.mesh.mesh.spec.egress_filter == EgressFilter::DropAll;
        let mut desired: BTreeMap<ResourceId, (Workload, ResourceId)> = BTreeMap::new();
        for (key, workload) in pods {
            match workload.virtual_node(&self.mesh) {
                Selection::None => {}
                Selection::One(vn) => {
                    desired.insert(key.clone(), (workload.clone(), vn.clone()));
                }
                Selection::Ambiguous { chosen, others } => {
                    tracing::warn!(pod = %key, virtual_node = %chosen, ?others, "several VirtualNodes select this pod; using the first");
                    desired.insert(key.clone(), (workload.clone(), chosen.clone()));
                }
            }
        }
        // Release pods that are gone or changed (kernel first, then listeners).
        let stale: Vec<ResourceId> = self
            .enrolled
            .iter()
            .filter(|(key, e)| {
                desired
                    .get(*key)
                    .is_none_or(|(w, vn)| *w != e.workload || *vn != e.virtual_node)
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            if let Some(enrolled) = self.enrolled.remove(&key) {
                if let Err(error) = self.ctx.redirect.release(enrolled.cgroup_id) {
                    tracing::error!(pod = %key, %error, "cannot release the pod's cgroup");
                }
                if let Err(error) = self
                    .ctx
                    .redirect
                    .set_fast_path_pod(&enrolled.workload.ips, None)
                {
                    tracing::warn!(pod = %key, %error, "cannot remove the pod from the fast path");
                }
                tracing::info!(pod = %key, virtual_node = %enrolled.virtual_node, "pod released");
            }
        }
        self.failed.retain(|key, _| desired.contains_key(key));
        for (key, (workload, vn)) in desired {
            if let Some(enrolled) = self.enrolled.get_mut(&key) {
                if enrolled.egress_drop_all != drop_all {
                    let update = EnrolledPod {
                        outbound_port: self.config.outbound_port,
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
            match self.enroll(&workload, &vn, drop_all) {
                Ok(enrolled) => {
                    tracing::info!(pod = %key, virtual_node = %vn, cgroup_id = enrolled.cgroup_id, listeners = ?enrolled.listeners, "pod enrolled");
                    self.failed.remove(&key);
                    self.enrolled.insert(key, enrolled);
                }
                Err(error) => {
                    if self.failed.get(&key).is_none_or(|(_, _, e)| *e != error) {
                        tracing::error!(pod = %key, virtual_node = %vn, "cannot enroll pod: {error}");
                    }
                    self.failed.insert(key, (workload, Some(vn), error));
                }
            }
        }
        self.metrics
            .enrolled_workloads
            .set(self.enrolled.len() as i64);
    }

    fn enroll(
        &self,
        workload: &Workload,
        vn: &ResourceId,
        drop_all: bool,
    ) -> Result<Enrolled, String> {
        let cgroup_id = redirect::cgroup_id(&workload.cgroup).map_err(|e| e.to_string())?;
        let port = self.config.outbound_port;
        let addrs = [
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port),
        ];
        let bound = netns::listen_in(&workload.netns, &addrs).map_err(|e| e.to_string())?;
        let mut listeners = Vec::new();
        let mut addrs_up = Vec::new();
        for (addr, result) in addrs.iter().zip(bound) {
            match result {
                Ok(listener) => {
                    listeners.push(listener);
                    addrs_up.push(*addr);
                }
                // A pod without IPv6 still gets its IPv4 listener.
                Err(error) if addr.is_ipv6() => {
                    tracing::warn!(pod = %workload.key(), %error, "no IPv6 outbound listener")
                }
                Err(error) => return Err(error.to_string()),
            }
        }
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
        });
        let accepting = outbound::serve(listeners, source, self.ctx.clone())
            .map_err(|e| format!("cannot register listeners with the runtime: {e}"))?;
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
        Ok(Enrolled {
            workload: workload.clone(),
            virtual_node: vn.clone(),
            cgroup_id,
            egress_drop_all: drop_all,
            listeners: addrs_up,
            _accepting: accepting,
        })
    }

    /// A restarted agent adopts the pinned maps, including pods enrolled by its predecessor
    /// that have since gone away: release those.
    fn release_strays(&self) {
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

    fn publish(&self, admin: &admin::State) {
        let mut statuses: Vec<WorkloadStatus> = self
            .enrolled
            .iter()
            .map(|(key, e)| WorkloadStatus {
                pod: key.to_string(),
                virtual_node: Some(e.virtual_node.to_string()),
                enrolled: true,
                cgroup_id: Some(e.cgroup_id),
                listeners: e.listeners.clone(),
                error: None,
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
                    listeners: Vec::new(),
                    error: Some(error.clone()),
                }),
        );
        admin.workloads.store(Arc::new(statuses));
    }
}
