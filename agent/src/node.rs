//! The per-node reconcile: which local pods are enrolled, and everything that takes.
//!
//! [`Node`] turns the published [`State`] (the mesh, its policy and service ids) and the local
//! workloads into the node's kernel and listener state: a pod's cgroup in the eBPF maps, its
//! outbound and inbound listeners (inherited from the previous agent when it hands them over,
//! else bound in the pod's network namespace, on ports allocated per namespace), the inbound
//! ports captured for its listeners' tls, the backend pairs connect4 checks, and the fast
//! path. A changed pod is enrolled anew before its previous enrollment is released (make
//! before break). It also publishes what `/workloads` shows, with each virtual node's
//! certificate status.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd as _;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use crate::admin::{self, WorkloadStatus};
use crate::identity::policy::Policy;
use crate::logging::Chain;
use crate::mesh::{EgressFilter, MeshConfig, ResourceId};
use crate::proxy::upstream::LocalPod;
use crate::proxy::{self, outbound};
use crate::redirect::{self, EnrolledPod};
use crate::state::{AccessLogs, State};
use crate::telemetry::{Metrics, access_log};
use crate::workloads::{Selection, Workload};
use crate::{gateway, handover, netns};

/// What the node needs of the run configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The first port tried for a pod's outbound listener (`--outbound-port`).
    pub outbound_port: u16,
    /// The first port tried for a pod's inbound sockets (`--inbound-port`).
    pub inbound_port: u16,
    /// The only folder access log files may be written in (`--access-log-dir`).
    pub access_log_dir: PathBuf,
}

/// Why a pod could not be enrolled (shown in `/workloads`; retried periodically).
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(transparent)]
    Redirect(#[from] redirect::Error),
    #[error("network namespace {}", path.display())]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no free port from {first} up in this network namespace")]
    NoFreePort { first: u16 },
    #[error(
        "{tried} {kind} ports from {first} up are held by other sockets in network namespace {}",
        netns.display()
    )]
    PortsHeld {
        kind: String,
        first: u16,
        tried: usize,
        netns: PathBuf,
    },
    #[error(transparent)]
    Listen(#[from] netns::Error),
    #[error("cannot duplicate the {kind} socket {addr}")]
    Duplicate {
        kind: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot register {what} with the runtime")]
    Runtime {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("BUG: no inbound listener for {0}")]
    NoInboundListener(ResourceId),
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
pub struct Node {
    settings: Settings,
    /// Listeners handed over by the previous agent, used instead of binding anew.
    inherited: handover::Inherited,
    /// Every listener this agent has, for handing over to the next one.
    registry: handover::Registry,
    /// The state this node last published (`ctx.state` holds the same): the mesh the pods
    /// are reconciled against, its policy and its service ids.
    state: Arc<State>,
    enrolled: BTreeMap<ResourceId, Enrolled>,
    /// Pods that should be enrolled but could not be, with why; retried periodically.
    failed: BTreeMap<ResourceId, (Workload, Option<ResourceId>, EnrollError)>,
    /// The listeners of pods changed in place, kept accepting until the deadline: a connect
    /// the kernel steered to them just before the switch waits in their backlog and must be
    /// served, not reset.
    retiring: Vec<(Instant, Enrolled)>,
    /// Pods that are not to be enrolled (no or several VirtualNodes, not in the mesh, host
    /// network, no IP yet), with why: `/workloads` shows them.
    skipped: BTreeMap<ResourceId, (Option<ResourceId>, String)>,
    ctx: Arc<proxy::Context>,
    metrics: Metrics,
    /// Gateway pods and the VirtualGateway listeners served in them.
    gateways: gateway::Gateways,
    /// Whether a reconcile has run: until then `enrolled` is empty while the pinned maps
    /// still hold the previous agent's pods, whose rules must stay (see `publish_state`).
    reconciled: bool,
}

/// How long a changed pod's previous listeners keep accepting after the eBPF maps point at the
/// new ones (see `Node::retiring`).
const RETIRE_AFTER: Duration = Duration::from_secs(2);

/// A listener bound in a pod: its address, the socket, and the duplicate registered for the
/// next hand-over.
type Bound = (SocketAddr, std::net::TcpListener, Arc<std::os::fd::OwnedFd>);

impl Node {
    /// A node with nothing enrolled yet and the empty state; `inherited` are the listeners
    /// the previous agent handed over, `registry` where this agent's are registered for the
    /// next one.
    pub fn new(
        settings: Settings,
        inherited: handover::Inherited,
        registry: handover::Registry,
        ctx: Arc<proxy::Context>,
        metrics: Metrics,
    ) -> Node {
        Node {
            settings,
            inherited,
            registry,
            state: Arc::new(State::default()),
            enrolled: BTreeMap::new(),
            reconciled: false,
            failed: BTreeMap::new(),
            retiring: Vec::new(),
            skipped: BTreeMap::new(),
            ctx,
            metrics,
            gateways: gateway::Gateways::default(),
        }
    }

    /// The state this node last published.
    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    /// Drops the handed-over listeners no pod claimed (pods that went away while the agents
    /// changed places): called once the first reconcile is done.
    pub fn forget_inherited(&mut self) {
        self.inherited = handover::Inherited::default();
    }

    /// Whether a pod or a gateway failed to enroll and waits for a retry.
    pub fn has_failures(&self) -> bool {
        !self.failed.is_empty() || self.gateways.has_failures()
    }

    /// Shutdown: every pod's listeners stop accepting (their connections drain).
    pub fn stop_accepting(&mut self) {
        self.enrolled.clear();
        self.retiring.clear();
    }

    /// Compiles a new mesh (with the DNS answers and its access logs) into one state and
    /// publishes it, then brings the eBPF service map in line.
    pub fn apply_mesh(
        &mut self,
        mesh: Arc<MeshConfig>,
        answers: &BTreeMap<String, Vec<IpAddr>>,
        writers: &access_log::Writers,
    ) {
        let logs = self.open_access_logs(&mesh, writers);
        let state = State::compile(&self.state, mesh, answers, logs);
        self.publish_state(state);
    }

    /// New DNS answers: the same mesh with a new table.
    pub fn apply_answers(&mut self, answers: &BTreeMap<String, Vec<IpAddr>>) {
        let state = self.state.with_answers(answers);
        self.publish_state(state);
    }

    /// Opens the access logs the virtual nodes ask for (`logging.accessLog.file`).
    fn open_access_logs(&self, mesh: &MeshConfig, writers: &access_log::Writers) -> AccessLogs {
        mesh.virtual_nodes
            .iter()
            .map(|vn| (&vn.id, &vn.spec.logging))
            // A gateway's requests carry its id as their source (crate::gateway).
            .chain(
                mesh.virtual_gateways
                    .iter()
                    .map(|gw| (&gw.id, &gw.spec.logging)),
            )
            .filter_map(|(id, logging)| {
                let file = logging.as_ref()?.access_log.as_ref()?;
                // Checked when the mesh was loaded; checked again, as the folder may have
                // changed since.
                let dir = &self.settings.access_log_dir;
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
            .collect()
    }

    /// Puts `state` in force for the proxy (one store), then the kernel's maps: the proxy
    /// must know a service before the kernel starts capturing it.
    fn publish_state(&mut self, state: State) {
        let state = Arc::new(state);
        self.state = state.clone();
        self.ctx.state.publish(state);
        let table = &self.state.table;
        let services: Vec<(SocketAddr, u32)> = table
            .services
            .iter()
            .filter_map(|(addr, port)| Some((*addr, self.state.service_ids.get(&port.service)?)))
            .chain(table.refused.keys().map(|ip| {
                (
                    SocketAddr::new(*ip, strait_ebpf::SERVICE_ANY_PORT),
                    strait_ebpf::SERVICE_ID_REFUSED,
                )
            }))
            .collect();
        // A new service's backend pairs go in before its addresses; a service that stays keeps
        // its id, so its entries in both maps stay as they are. Before this agent's first
        // reconcile it has enrolled nothing, and a full sync would remove the rules of every
        // pod the previous agent enrolled: during an upgrade their connects would be refused
        // (EPERM under DROP_ALL) until each is enrolled again. The first reconcile syncs.
        if self.reconciled {
            self.sync_backends();
        }
        if let Err(error) = self.ctx.redirect.set_services(&services) {
            tracing::error!(%error, "cannot update the service addresses in the eBPF map");
        } else {
            tracing::debug!(services = services.len(), "service addresses updated");
        }
    }

    pub fn reconcile(&mut self, pods: &BTreeMap<ResourceId, Workload>) {
        let mesh = self.state.mesh.clone();
        let drop_all = mesh.mesh.spec.egress_filter == EgressFilter::DropAll;
        let mut desired: BTreeMap<ResourceId, (Workload, ResourceId)> = BTreeMap::new();
        let mut skipped = BTreeMap::new();
        for (key, workload) in pods {
            let selection = workload.virtual_node(&mesh);
            match (selection.chosen(), &workload.unavailable) {
                (Some(vn), None) => {
                    desired.insert(key.clone(), (workload.clone(), vn.clone()));
                }
                (Some(vn), Some(reason)) => {
                    skipped.insert(key.clone(), (Some(vn.clone()), reason.clone()));
                }
                // A gateway's pod: its listeners are `gateway`'s (reconciled below).
                (None, _) if gateway::selects(&mesh, workload) => {}
                (None, _) => {
                    let reason = selection.reason(workload, &mesh).unwrap_or_default();
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
                    let text = Chain(&error).to_string();
                    if self
                        .failed
                        .get(&key)
                        .is_none_or(|(_, _, e)| Chain(e).to_string() != text)
                    {
                        tracing::error!(pod = %key, virtual_node = %vn, "cannot enroll pod: {text}");
                    }
                    // A changed pod that cannot be enrolled anew keeps its previous enrollment
                    // (still protected as before) until the next attempt succeeds.
                    self.failed.insert(key, (workload, Some(vn), error));
                }
            }
        }
        self.retire_expired();
        self.sync_inbound();
        self.reconciled = true;
        self.sync_backends();
        let ctx = self.ctx.clone();
        self.gateways
            .reconcile(pods, &mesh, &ctx, &self.inherited, &self.registry);
        self.metrics
            .enrolled_workloads
            .set(self.enrolled.len() as i64);
    }

    /// Stops the previous listeners of changed pods whose grace time is over.
    pub fn retire_expired(&mut self) {
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
        let policy = self.state.policy.clone();
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
        let backends_of = |vn: &ResourceId| self.state.backend_ids(vn);
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
    ) -> Result<Enrolled, EnrollError> {
        let cgroup_id = redirect::cgroup_id(&workload.cgroup)?;
        let netns = std::fs::metadata(&workload.netns)
            .map(|m| (m.dev(), m.ino()))
            .map_err(|source| EnrollError::Netns {
                path: workload.netns.clone(),
                source,
            })?;
        // Pods have a network namespace each; services on a plain host share the host's. Each
        // workload in a shared namespace gets its own ports, so the listener (and not
        // anything the workload could forge) still tells the agent who is calling.
        let (port, bound) = self.listen_at_free_port(
            workload,
            "outbound",
            netns,
            self.settings.outbound_port,
            |e| e.outbound_port,
        )?;
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
        let accepting = outbound::serve(listeners, source, self.ctx.clone()).map_err(|source| {
            EnrollError::Runtime {
                what: "listeners",
                source,
            }
        })?;
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
        capture_inbound(
            &self.ctx,
            &self.state.policy,
            &workload.key(),
            &mut enrolled,
        );
        self.sync_backends_with(Some((cgroup_id, vn)));
        self.ctx.redirect.enroll(
            cgroup_id,
            EnrolledPod {
                outbound_port: port,
                egress_drop_all: drop_all,
                workload_id: 0,
            },
        )?;
        Ok(enrolled)
    }

    /// The first port from `first` that no other enrolled workload in the same network
    /// namespace uses for the same purpose.
    fn free_port(
        &self,
        netns: (u64, u64),
        first: u16,
        used: impl Fn(&Enrolled) -> u16,
    ) -> Result<u16, EnrollError> {
        // Retiring listeners of a changed pod still hold their ports for a moment.
        (first..=u16::MAX)
            .find(|port| {
                !self
                    .enrolled
                    .values()
                    .chain(self.retiring.iter().map(|(_, e)| e))
                    .any(|e| e.netns == netns && used(e) == *port)
            })
            .ok_or(EnrollError::NoFreePort { first })
    }

    /// [`Node::listen`] at the first port from `first` that no enrollment in the namespace
    /// uses and nothing else holds. A port can be held without an enrollment knowing it: a
    /// retired listener whose accept task has not yet run to close it, or the pod's own
    /// program; such a port is passed over (a bounded number of times) instead of failing
    /// the enrollment on every retry.
    fn listen_at_free_port(
        &self,
        workload: &Workload,
        kind: &str,
        netns: (u64, u64),
        first: u16,
        used: impl Fn(&Enrolled) -> u16,
    ) -> Result<(u16, Vec<Bound>), EnrollError> {
        const PORTS_HELD_ELSEWHERE: usize = 1024;
        let mut from = first;
        for _ in 0..PORTS_HELD_ELSEWHERE {
            let port = self.free_port(netns, from, &used)?;
            match self.listen(workload, kind, port) {
                Ok(bound) => return Ok((port, bound)),
                Err(EnrollError::Listen(error)) if error.is_address_in_use() => {
                    tracing::info!(pod = %workload.key(), error = %Chain(&error), "port held by another socket in the pod's network namespace; trying the next one");
                    from = port
                        .checked_add(1)
                        .ok_or(EnrollError::NoFreePort { first })?;
                }
                Err(error) => return Err(error),
            }
        }
        Err(EnrollError::PortsHeld {
            kind: kind.to_owned(),
            first,
            tried: PORTS_HELD_ELSEWHERE,
            netns: workload.netns.clone(),
        })
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
    ) -> Result<Vec<Bound>, EnrollError> {
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
            let fresh = netns::listen_in(&workload.netns, &missing)?;
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
                        .map_err(|source| EnrollError::Duplicate {
                            kind: kind.to_owned(),
                            addr,
                            source,
                        })?;
                    listeners.push((addr, listener, shared));
                }
                // A pod without IPv6 (no ::1) has no IPv6 to capture or to bypass with; its
                // captured ports stay captured in IPv6 and are dropped there (see
                // redirect/inpod.rs). Any other failure is an enrollment failure, not a
                // warning: a missing listener would leave a family uncovered.
                Err(error) if addr.is_ipv6() && error.is_address_not_available() => {
                    tracing::info!(pod = %workload.key(), error = %Chain(&error), "the pod has no IPv6 loopback: no IPv6 {kind} listener")
                }
                Err(error) => return Err(error.into()),
            }
        }
        // Registered only once every family is bound: a failed attempt must not leave a
        // duplicate in the registry holding its port open.
        for (addr, _, shared) in &listeners {
            self.registry.add_shared(&name(addr), shared.clone());
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
    ) -> Result<PodInbound, EnrollError> {
        let (port, bound) = self.listen_at_free_port(
            workload,
            "inbound",
            netns,
            self.settings.inbound_port,
            |e| e.inbound_port,
        )?;
        let mut listeners = Vec::new();
        let mut sockets = Vec::new();
        for (addr, listener, shared) in bound {
            sockets.push((addr, shared));
            listeners.push(listener);
        }
        // Delivery sockets are created in the namespace the inbound listener lives in.
        let anchor = sockets
            .first()
            .map(|(_, fd)| fd.clone())
            .ok_or_else(|| EnrollError::NoInboundListener(workload.key()))?;
        let local = Arc::new(LocalPod {
            workload: workload.key(),
            virtual_node: vn.clone(),
            ips: workload.ips.clone(),
            connector: netns::Connector::new(&workload.netns, anchor),
        });
        let accepting = proxy::inbound::serve(listeners, local.clone(), self.ctx.clone()).map_err(
            |source| EnrollError::Runtime {
                what: "inbound sockets",
                source,
            },
        )?;
        self.ctx
            .redirect
            .inpod()
            .attach_pod(&workload.netns, cgroup_id)?;
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
    pub fn release_strays(&self) {
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
        let policy = &self.state.policy;
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
                let loaded = self.ctx.transport.certificate(policy, vn, cert, &field);
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
                    error: Some(Chain(&error).to_string()),
                },
            }
        });
        admin::IdentityStatus {
            identities: node.identities.clone(),
            certificate,
        }
    }

    pub fn publish(&self, admin: &admin::State) {
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
                    error: Some(Chain(error).to_string()),
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
