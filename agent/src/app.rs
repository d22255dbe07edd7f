//! Builds the running agent from its configuration and keeps it in step with its inputs.
//!
//! Inputs: the mesh file or directory (watched, reloaded when it changes: `reload`), the local
//! workloads (watched), and DNS answers (re-resolved on TTL). Each mesh or DNS change is
//! compiled into one `state::State` and published at once; one reconcile loop (`node::Node`)
//! turns the state and the workloads into the eBPF maps (enrolled cgroups, service addresses),
//! one outbound listener set per enrolled pod, and the inbound capture. This module is the
//! wiring: check the inputs, build, bind, run until shutdown. Shutdown: stop accepting, drain,
//! exit; the pins stay so a restarted agent adopts them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::node::{self, Node};
use crate::proxy::upstream::Transport;
use crate::redirect::{self, Redirect};
use crate::routing::Table;
use crate::state::Published;
use crate::telemetry::{Metrics, ProcessCollector, RedirectCollector, Telemetry, access_log, otlp};
use crate::{admin, discovery, handover, heap, identity, proxy, reload, workloads};

pub use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Mesh(#[from] reload::Error),
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
    #[error(
        "cannot listen for mTLS tunnels on {addr} (choose another --tunnel-listen, or stop what holds the port)"
    )]
    TunnelListen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), Error> {
    // Check every input before touching the kernel, so a bad input leaves nothing behind.
    let mesh = reload::load(&config.mesh_file, &config.access_log_dir)?;
    if !config.redirect.cgroup_root.join("cgroup.procs").exists() {
        return Err(Error::CgroupRoot(config.redirect.cgroup_root.clone()));
    }
    let workload_source = workloads::start(&config.pod_source).await?;
    let resolver = discovery::Resolver::new(config.dns_server)?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(Error::Signals)?;

    heap::start_trimming();
    let redirect = Arc::new(Redirect::install(&config.redirect)?);
    tracing::info!(cgroup_root = %config.redirect.cgroup_root.display(), bpffs = %config.redirect.bpffs.display(), fast_path = config.redirect.fast_path, "eBPF programs attached");

    let metrics = Metrics::default();
    let reloads = reload::Metrics::default();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    reloads.register(&mut registry);
    registry.register_collector(Box::new(RedirectCollector(redirect.clone())));
    registry.register_collector(Box::new(ProcessCollector::new()));
    let security = identity::Metrics::default();
    security.register(&mut registry);
    registry.register_collector(Box::new(identity::InPodCollector(redirect.clone())));
    // Empty until the node's first reconcile publishes the mesh (nothing is captured before).
    let state = Arc::new(Published::default());
    let transport = Arc::new(
        Transport::new(config.peer_nodes.clone(), security, state.clone())
            .with_tunnel(config.tunnel)
            .with_endpoints(workload_source.endpoints.clone()),
    );
    transport.admission.metrics.register(&mut registry);
    let (names_tx, names_rx) = watch::channel(Table::dns_names(&mesh));
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
    let telemetry =
        config.telemetry.enabled.then(|| {
            Arc::new(Telemetry {
                metrics: metrics.clone(),
                sampling: config.telemetry.trace_sampling,
                exporter: config.telemetry.otlp.as_ref().map(|(_, url)| {
                    otlp::start(url.clone(), metrics.spans.clone(), shutdown.clone())
                }),
            })
        });
    tracing::info!(
        telemetry = config.telemetry.enabled,
        trace_sampling = config.telemetry.trace_sampling,
        otlp_endpoint = config
            .telemetry
            .otlp
            .as_ref()
            .map_or("", |(e, _)| e.as_str()),
        "telemetry"
    );
    let ctx = Arc::new(proxy::Context {
        redirect: redirect.clone(),
        state,
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
        drain_timeout: config.drain_timeout,
        connections: TaskTracker::new(),
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
        config: ArcSwap::from_pointee(reload::config_dump(&mesh)),
        resilience: {
            let ctx = ctx.clone();
            Box::new(move || proxy::resilience_status(&ctx))
        },
    });
    let admin_addr = admin::serve(config.admin, admin_state.clone(), shutdown.clone()).await?;
    tracing::info!(%admin_addr, "admin API listening");

    let mut mesh_watch = reload::Watch::start(
        &config.mesh_file,
        &config.access_log_dir,
        &mesh.source.sha256,
        reloads,
    );
    // Not ready (and nothing enrolled or released) before the pod source has seen every pod
    // once: the Kubernetes API may be unreachable at start; its source retries and says so.
    if !wait_synced(workload_source.synced.clone(), &mut sigterm).await {
        tracing::info!("stopped before the pod source had listed the pods");
        shutdown.cancel();
        drop(ctx);
        if config.cleanup_on_exit {
            redirect::uninstall(&config.redirect.bpffs)?;
        }
        return Ok(());
    }
    let mut workload_snapshots = workload_source.snapshots.clone();
    let mut node = Node::new(
        node::Settings {
            outbound_port: config.outbound_port,
            inbound_port: config.inbound_port,
            access_log_dir: config.access_log_dir.clone(),
        },
        inherited,
        handover_registry.clone(),
        ctx.clone(),
        metrics.clone(),
    );
    node.apply_mesh(Arc::new(mesh), &answers.borrow_and_update(), &log_writers);
    node.reconcile(&workload_snapshots.borrow_and_update());
    node.release_strays();
    // Tunnels from other nodes deliver to local pods: accept them only once the pods are
    // enrolled (during an upgrade they wait in the inherited listener's backlog meanwhile,
    // instead of finding no local pod and failing).
    proxy::hbone::serve(tunnel_listener, ctx.clone());
    tracing::info!(tunnel_listen = %config.tunnel_listen, peer_nodes = ?config.peer_nodes, "accepting mTLS tunnels");
    // Sockets of pods that went away while the agents changed places.
    node.forget_inherited();
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
    tracing::info!(mesh = %node.state().mesh.mesh.name, "agent ready");

    let mut retry = tokio::time::interval(Duration::from_secs(5));
    let mut successor_took_over = false;
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
                node.apply_answers(&answers.borrow_and_update());
            }
            Some(()) = mesh_watch.changed() => {
                match mesh_watch.reload(&node.state().mesh, &admin_state) {
                    reload::Reloaded::Unchanged => continue,
                    reload::Reloaded::Applied(new_mesh) => {
                        names_tx.send_replace(Table::dns_names(&new_mesh));
                        // The new mesh's table, policy and access logs, in force at once.
                        node.apply_mesh(new_mesh, &answers.borrow(), &log_writers);
                        node.reconcile(&workload_snapshots.borrow());
                    }
                    reload::Reloaded::Rejected => {}
                }
            }
            _ = retry.tick() => {
                node.retire_expired();
                // Also refreshes /workloads, so certificate rotations and expiry show.
                if node.has_failures() {
                    node.reconcile(&workload_snapshots.borrow());
                }
            }
        }
        node.publish(&admin_state);
    }

    tracing::info!("shutting down: no new connections; draining the ones in flight");
    admin_state.ready.store(false, Ordering::Release);
    shutdown.cancel();
    node.stop_accepting();
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
        let report = redirect::uninstall(&config.redirect.bpffs)?;
        tracing::info!(?report, "removed every pin and attachment");
    } else {
        tracing::info!(bpffs = %config.redirect.bpffs.display(), "pins kept: a restarted agent adopts them");
    }
    Ok(())
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
