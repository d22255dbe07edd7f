//! The Kubernetes pod source (`strait run --kubernetes`): the pods of this node, from the API.
//!
//! Three list-and-watch loops (kube-rs' `watcher`): the Pods with `spec.nodeName=<node>`, the
//! Namespaces (their labels are what `Mesh.spec.namespaceSelector` selects), and the Nodes
//! (their addresses). Each keeps its own copy of the objects; a relist (after `410 Gone`, a
//! watch that ended, or a reconnect) replaces the copy only once the new list is complete, and
//! an error (API unreachable, request refused) changes nothing: the pods stay as last seen,
//! so an API outage never un-enrolls a pod. Once pods and namespaces have been listed once,
//! every change produces a fresh [`Snapshot`] of [`Workload`]s, the same values the workloads
//! directory produces, for the same reconcile.
//!
//! For each pod the source finds the pod cgroup and the network namespace on this node
//! ([`sandbox`]). A pod it cannot hand over (host network, no IP yet, finished, no cgroup or
//! sandbox process yet) is still in the snapshot, with the reason in
//! [`Workload::unavailable`], so `/workloads` can say why it is not enrolled; such pods are
//! looked at again every second. Whether a pod belongs to a VirtualNode is the reconcile's
//! business, for both sources alike. See docs/kubernetes-pod-source.md.
//!
//! With `--cni-socket`, the `strait-cni` plugin hands new pods over as the runtime sets them
//! up ([`cni`]): such a pod's network namespace is the one the plugin sent and its addresses
//! those of the CNI result, so it is enrolled before its containers start, with no sandbox
//! process or `status.podIPs` needed. See docs/kubernetes.md.
//!
//! A fourth watch, of every Pod in the cluster, tells which node each pod address is on
//! ([`endpoints`]), so other nodes' endpoints are reached through their node's agent without
//! `--peer-node`.

pub mod cni;
pub mod endpoints;
pub mod sandbox;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource, ResourceExt as _};
use tokio::sync::watch;

use crate::mesh::ResourceId;
use crate::workloads::{Snapshot, Workload};
use sandbox::Sandbox;

/// How long a watch request runs before the watcher starts the next one (the API server
/// ends it then; kube-rs' default).
const WATCH_TIMEOUT_SECONDS: u32 = 290;
/// How often pods that cannot be handed over yet, and sandboxes, are looked at again.
const RECHECK: Duration = Duration::from_secs(1);
/// How long a released namespace file descriptor stays open: a reconcile may still be
/// enrolling with the snapshot that named it, and the number must not be reused meanwhile.
const RETIRE_AFTER: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "--kubernetes needs the name of this node: pass --node-name, or set NODE_NAME from the downward API (env NODE_NAME, valueFrom.fieldRef.fieldPath: spec.nodeName)"
    )]
    MissingNodeName,
    #[error("cannot read the kubeconfig {path}; pass --kubeconfig with a readable kubeconfig file")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no Kubernetes API configuration found: run the agent in a pod with a service account (in-cluster), or pass --kubeconfig or set KUBECONFIG"
    )]
    Infer(#[source] kube::config::InferConfigError),
    #[error("cannot set up the Kubernetes client")]
    Client(#[source] kube::Error),
    #[error(transparent)]
    Cni(#[from] cni::Error),
}

/// How to reach the API and which node this is.
#[derive(Debug, Clone)]
pub struct Options {
    pub node_name: String,
    /// A kubeconfig file; without it: `KUBECONFIG`, `~/.kube/config`, else in-cluster.
    pub kubeconfig: Option<PathBuf>,
    /// The agent's cgroup root: pod cgroups are looked for below it.
    pub cgroup_root: PathBuf,
    /// Where `strait-cni` hands pods over (`--cni-socket`); `None`: no CNI hand-off.
    pub cni_socket: Option<PathBuf>,
    /// The port other nodes' agents accept tunnels on (this agent's `--tunnel-listen` port).
    pub tunnel_port: u16,
    /// The labels of the agent's pods (`--agent-pod-labels`): a node with such a pod, ready,
    /// runs an agent.
    pub agent_labels: endpoints::AgentLabels,
}

/// The running source.
pub struct KubernetesSource {
    pub snapshots: watch::Receiver<Snapshot>,
    /// Becomes true once pods and namespaces have been listed completely.
    pub synced: watch::Receiver<bool>,
    /// The CNI hand-off, served once the agent is ready ([`cni::Handle::serve`]).
    pub cni: Option<cni::Handle>,
    /// Which node each pod address of the cluster is on.
    pub endpoints: endpoints::Shared,
}

/// Builds the client (no request yet: an unreachable API is retried, not an error) and starts
/// the watches.
pub async fn start(options: Options) -> Result<KubernetesSource, Error> {
    if options.node_name.trim().is_empty() {
        return Err(Error::MissingNodeName);
    }
    let config = match &options.kubeconfig {
        Some(path) => {
            let kubeconfig =
                kube::config::Kubeconfig::read_from(path).map_err(|source| Error::Kubeconfig {
                    path: path.clone(),
                    source,
                })?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|source| Error::Kubeconfig {
                    path: path.clone(),
                    source,
                })?
        }
        None => kube::Config::infer().await.map_err(Error::Infer)?,
    };
    tracing::info!(api = %config.cluster_url, node = %options.node_name, "watching this node's pods in the Kubernetes API");
    let client = Client::try_from(config).map_err(Error::Client)?;
    let (snapshots_tx, snapshots) = watch::channel(Snapshot::default());
    let (synced_tx, synced) = watch::channel(false);
    // Saved hand-overs are opened again before the first snapshot, so a restarted agent
    // enrolls those pods in the namespaces the plugin gave.
    let (cni, registrations, commands) = match &options.cni_socket {
        Some(socket) => {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let registrations = cni::Registrations::load(cni::state_dir(socket));
            let handle = cni::Handle {
                socket: socket.clone(),
                commands: tx,
                stop: cni::Stop::default(),
            };
            (Some(handle), Some(registrations), Some(rx))
        }
        None => (None, None, None),
    };
    let directory = endpoints::Shared::default();
    tokio::spawn(run(
        client,
        options,
        Outputs {
            snapshots: snapshots_tx,
            synced: synced_tx,
            directory: directory.clone(),
        },
        registrations,
        commands,
    ));
    Ok(KubernetesSource {
        snapshots,
        synced,
        cni,
        endpoints: directory,
    })
}

/// One kind of object as last listed and watched.
struct Objects<K> {
    kind: &'static str,
    items: BTreeMap<(String, String), K>,
    /// The relist in progress, swapped in when complete.
    relist: Option<BTreeMap<(String, String), K>>,
    synced: bool,
    /// The last request failed (logged once per outage).
    failing: bool,
}

impl<K: Resource> Objects<K> {
    fn new(kind: &'static str) -> Self {
        Objects {
            kind,
            items: BTreeMap::new(),
            relist: None,
            synced: false,
            failing: false,
        }
    }

    fn key(object: &K) -> (String, String) {
        (
            object.meta().namespace.clone().unwrap_or_default(),
            object.meta().name.clone().unwrap_or_default(),
        )
    }

    /// Applies one watcher event; true if the objects changed.
    fn apply(&mut self, event: Result<Event<K>, watcher::Error>) -> bool {
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                if !self.failing {
                    tracing::warn!(
                        kind = self.kind,
                        error = %error_chain(&error),
                        "Kubernetes API: cannot list or watch; retrying with backoff; the {} stay as last seen",
                        self.kind
                    );
                }
                self.failing = true;
                return false;
            }
        };
        if self.failing {
            tracing::info!(kind = self.kind, "Kubernetes API: watching again");
            self.failing = false;
        }
        match event {
            Event::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            Event::InitApply(object) => {
                self.relist
                    .get_or_insert_default()
                    .insert(Self::key(&object), object);
                false
            }
            Event::InitDone => {
                self.items = self.relist.take().unwrap_or_default();
                if !self.synced {
                    tracing::info!(kind = self.kind, count = self.items.len(), "listed");
                }
                self.synced = true;
                true
            }
            Event::Apply(object) => {
                self.items.insert(Self::key(&object), object);
                true
            }
            Event::Delete(object) => {
                self.items.remove(&Self::key(&object));
                true
            }
        }
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn watch_all<K>(
    api: Api<K>,
    config: watcher::Config,
) -> impl Stream<Item = Result<Event<K>, watcher::Error>> + Send + Unpin
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher::watcher(api, config.timeout(WATCH_TIMEOUT_SECONDS))
        .default_backoff()
        .boxed()
}

/// What the source publishes.
struct Outputs {
    snapshots: watch::Sender<Snapshot>,
    synced: watch::Sender<bool>,
    directory: endpoints::Shared,
}

async fn run(
    client: Client,
    options: Options,
    outputs: Outputs,
    registrations: Option<cni::Registrations>,
    mut commands: Option<tokio::sync::mpsc::UnboundedReceiver<cni::Command>>,
) {
    let selector = format!("spec.nodeName={}", options.node_name);
    let mut pod_events = watch_all(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().fields(&selector),
    );
    let mut namespace_events = watch_all(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
    );
    let mut cluster_pod_events =
        watch_all(Api::<Pod>::all(client.clone()), watcher::Config::default());
    let mut node_events = watch_all(Api::<Node>::all(client), watcher::Config::default());
    let mut cluster_pods = endpoints::Pods::new(options.agent_labels.clone());
    let mut pods = Objects::<Pod>::new("pods");
    let mut namespaces = Objects::<Namespace>::new("namespaces");
    let mut nodes = Objects::<Node>::new("nodes");
    let mut resolver = Resolver::new(options.cgroup_root.clone());
    resolver.cni = registrations;
    let mut answers: Vec<cni::Done> = Vec::new();
    let mut recheck = tokio::time::interval(RECHECK);
    let mut announced_own_node = false;
    let Outputs {
        snapshots,
        synced,
        directory,
    } = outputs;
    loop {
        let mut endpoints_changed = false;
        tokio::select! {
            Some(event) = pod_events.next() => { pods.apply(event); }
            Some(event) = namespace_events.next() => { namespaces.apply(event); }
            Some(event) = cluster_pod_events.next() => {
                endpoints_changed = cluster_pods.apply(event);
            }
            Some(event) = node_events.next() => {
                let changed = nodes.apply(event);
                endpoints_changed = changed;
                if changed && !announced_own_node {
                    let own = nodes.items.get(&(String::new(), options.node_name.clone()));
                    if own.is_none() {
                        tracing::warn!(node = %options.node_name, "no Node object of this name in the API: check --node-name / NODE_NAME");
                    }
                    announced_own_node = true;
                }
            }
            _ = recheck.tick() => {}
            Some(command) = next_command(&mut commands) => {
                if let Some(registrations) = resolver.cni.as_mut() {
                    answers.push(registrations.apply(command));
                }
            }
            _ = snapshots.closed() => return,
        }
        if endpoints_changed && cluster_pods.synced && nodes.synced {
            directory.store(Arc::new(endpoints::build(
                &cluster_pods,
                endpoints::node_addresses(&nodes.items),
                &options.node_name,
                options.tunnel_port,
            )));
        }
        if !(pods.synced && namespaces.synced) {
            continue;
        }
        let workloads = build(&pods.items, &namespaces.items, &mut resolver);
        resolver.retire_missing(&pods.items);
        snapshots.send_if_modified(|current| {
            if **current == workloads {
                false
            } else {
                *current = Arc::new(workloads);
                true
            }
        });
        synced.send_if_modified(|done| !std::mem::replace(done, true));
        // The snapshot with the plugin's changes is out: its requests may now wait for the
        // reconcile.
        for answer in answers.drain(..) {
            answer.send();
        }
    }
}

/// The next CNI command, or never when there is no CNI hand-off.
async fn next_command(
    commands: &mut Option<tokio::sync::mpsc::UnboundedReceiver<cni::Command>>,
) -> Option<cni::Command> {
    match commands {
        Some(commands) => commands.recv().await,
        None => std::future::pending().await,
    }
}

/// The workloads of the listed pods: every pod, with `unavailable` set when it cannot be
/// handed over.
fn build(
    pods: &BTreeMap<(String, String), Pod>,
    namespaces: &BTreeMap<(String, String), Namespace>,
    resolver: &mut impl Resolve,
) -> BTreeMap<ResourceId, Workload> {
    pods.values()
        .map(|pod| {
            let workload = workload(pod, namespaces, resolver);
            (workload.key(), workload)
        })
        .collect()
}

fn workload(
    pod: &Pod,
    namespaces: &BTreeMap<(String, String), Namespace>,
    resolver: &mut impl Resolve,
) -> Workload {
    let namespace = pod.namespace().unwrap_or_default();
    // The API is the truth about namespaces: one not (yet) seen has no labels, so no
    // namespaceSelector selects it.
    let namespace_labels = namespaces
        .get(&(String::new(), namespace.clone()))
        .map(|ns| ns.labels().clone())
        .unwrap_or_default();
    let mut workload = Workload {
        name: pod.name_any(),
        namespace,
        labels: pod.labels().clone(),
        ips: pod_ips(pod),
        netns: PathBuf::new(),
        cgroup: PathBuf::new(),
        namespace_labels: Some(namespace_labels),
        unavailable: None,
    };
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    // The plugin's addresses are the pod's from its ADD on; the kubelet later reports the
    // same ones (the runtime takes them from the same CNI result). Keeping them, rather than
    // switching to `status.podIPs` when it appears, leaves the workload unchanged, so the
    // pod is not enrolled a second time.
    let released = match resolver.cni_view(pod) {
        cni::View::Registered(registration) => {
            if !registration.saved.ips.is_empty() {
                workload.ips = registration.saved.ips.clone();
            }
            false
        }
        cni::View::Released => true,
        cni::View::None => false,
    };
    let reason = if matches!(phase, "Succeeded" | "Failed") {
        Some(format!("the pod has finished (phase {phase})"))
    } else if released {
        Some("the pod's network was torn down (CNI DEL)".to_string())
    } else if spec.and_then(|s| s.host_network) == Some(true) {
        Some(
            "hostNetwork pod: it shares the node's network namespace, which strait does not capture"
                .to_string(),
        )
    } else if workload.ips.is_empty() {
        Some("the pod has no IP yet (status.podIPs is empty)".to_string())
    } else {
        match resolver.resolve(pod) {
            Ok((cgroup, netns)) => {
                workload.cgroup = cgroup;
                workload.netns = netns;
                None
            }
            Err(reason) => Some(crate::logging::Chain(&reason).to_string()),
        }
    };
    workload.unavailable = reason;
    workload
}

/// `status.podIPs`, else `status.podIP`; unparsable entries are left out.
fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    let mut ips: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|ip| ip.ip.parse().ok())
        .collect();
    if ips.is_empty()
        && let Some(ip) = status.pod_ip.as_deref().and_then(|ip| ip.parse().ok())
    {
        ips.push(ip);
    }
    ips
}

/// Why a pod's cgroup or network namespace is not found (yet): the pod's reason for not
/// being enrolled.
#[derive(Debug, thiserror::Error)]
enum Unresolved {
    #[error("the pod has no metadata.uid")]
    NoUid,
    #[error(
        "no pod cgroup for UID {uid} below {} (looked for kubelet's systemd and cgroupfs \
         layouts{}); is --cgroup-root the node's cgroup v2 mount?",
        root.display(),
        qos.as_ref().map(|q| format!(", QoS class {q}")).unwrap_or_default()
    )]
    NoPodCgroup {
        uid: String,
        root: PathBuf,
        qos: Option<String>,
    },
    #[error(transparent)]
    Sandbox(#[from] sandbox::OpenError),
}

/// Finds a pod's cgroup and network namespace on this node.
trait Resolve {
    fn resolve(&mut self, pod: &Pod) -> Result<(PathBuf, PathBuf), Unresolved>;

    /// What the CNI plugin handed over for the pod.
    fn cni_view(&self, _pod: &Pod) -> cni::View<'_> {
        cni::View::None
    }
}

/// The pod cgroups and sandboxes found so far, by pod UID.
struct Resolver {
    cgroup_root: PathBuf,
    found: HashMap<String, (PathBuf, Sandbox)>,
    retired: Vec<(Instant, Sandbox)>,
    /// The CNI plugin's hand-overs, when it is in use.
    cni: Option<cni::Registrations>,
}

impl Resolver {
    fn new(cgroup_root: PathBuf) -> Self {
        Resolver {
            cgroup_root,
            found: HashMap::new(),
            retired: Vec::new(),
            cni: None,
        }
    }

    /// Lets go of the sandboxes of pods no longer listed (after a delay, see
    /// [`RETIRE_AFTER`]).
    fn retire_missing(&mut self, pods: &BTreeMap<(String, String), Pod>) {
        let listed: std::collections::HashSet<&str> = pods
            .values()
            .filter_map(|p| p.meta().uid.as_deref())
            .collect();
        let gone: Vec<String> = self
            .found
            .keys()
            .filter(|uid| !listed.contains(uid.as_str()))
            .cloned()
            .collect();
        for uid in gone {
            if let Some((_, sandbox)) = self.found.remove(&uid) {
                self.retired.push((Instant::now(), sandbox));
            }
        }
        if let Some(registrations) = self.cni.as_mut() {
            let listed = pods
                .values()
                .flat_map(|p| {
                    let name = format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any());
                    [p.meta().uid.clone().unwrap_or_default(), name]
                })
                .collect();
            registrations.prune_released(&listed);
        }
        self.retired.retain(|(at, _)| at.elapsed() < RETIRE_AFTER);
    }
}

impl Resolve for Resolver {
    fn cni_view(&self, pod: &Pod) -> cni::View<'_> {
        match &self.cni {
            Some(registrations) => registrations.view(pod),
            None => cni::View::None,
        }
    }

    fn resolve(&mut self, pod: &Pod) -> Result<(PathBuf, PathBuf), Unresolved> {
        let uid = pod.meta().uid.clone().ok_or(Unresolved::NoUid)?;
        let qos = pod.status.as_ref().and_then(|s| s.qos_class.as_deref());
        // Handed over by the plugin: its namespace, and the pod cgroup kubelet made before
        // asking the runtime for the sandbox (no sandbox process needed).
        if let cni::View::Registered(registration) = self.cni_view(pod) {
            let cgroup =
                sandbox::find_pod_cgroup(&self.cgroup_root, &uid, qos).ok_or_else(|| {
                    Unresolved::NoPodCgroup {
                        uid: uid.clone(),
                        root: self.cgroup_root.clone(),
                        qos: qos.map(str::to_owned),
                    }
                })?;
            return Ok((cgroup, registration.netns_path()));
        }
        let mut previous = None;
        if let Some((cgroup, sandbox)) = self.found.get(&uid) {
            if sandbox.alive() {
                return Ok((cgroup.clone(), sandbox.netns_path()));
            }
            tracing::info!(pod = %pod.name_any(), pid = sandbox.pid, "the pod's sandbox process is gone; looking for it again");
            previous = self.found.remove(&uid).map(|(_, sandbox)| sandbox);
        }
        let cgroup = sandbox::find_pod_cgroup(&self.cgroup_root, &uid, qos).ok_or_else(|| {
            Unresolved::NoPodCgroup {
                uid: uid.clone(),
                root: self.cgroup_root.clone(),
                qos: qos.map(str::to_owned),
            }
        })?;
        let opened = Sandbox::open(&cgroup);
        let sandbox = match (previous, opened) {
            // Another process of the same namespace: keep the descriptor (and the path), so
            // the pod stays enrolled as it is.
            (Some(mut previous), Ok(newer)) => match previous.adopt(newer) {
                Ok(()) => previous,
                Err(newer) => {
                    self.retired.push((Instant::now(), previous));
                    newer
                }
            },
            (Some(previous), Err(reason)) => {
                self.retired.push((Instant::now(), previous));
                return Err(reason.into());
            }
            (None, opened) => opened?,
        };
        let netns = sandbox.netns_path();
        tracing::debug!(pod = %pod.name_any(), cgroup = %cgroup.display(), pid = sandbox.pid, "found the pod's cgroup and sandbox");
        self.found.insert(uid, (cgroup.clone(), sandbox));
        Ok((cgroup, netns))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Found;

    impl Resolve for Found {
        fn resolve(&mut self, pod: &Pod) -> Result<(PathBuf, PathBuf), Unresolved> {
            Ok((
                PathBuf::from(format!("/cg/{}", pod.name_any())),
                PathBuf::from("/proc/self/fd/9"),
            ))
        }
    }

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    fn namespaces() -> BTreeMap<(String, String), Namespace> {
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "shop", "labels": {"mesh": "m"}}
        }))
        .unwrap();
        [((String::new(), "shop".to_string()), ns)].into()
    }

    fn one(json: serde_json::Value) -> Workload {
        workload(&pod(json), &namespaces(), &mut Found)
    }

    #[test]
    fn a_running_pod_becomes_a_workload_with_its_namespace_labels() {
        let w = one(serde_json::json!({
            "metadata": {"name": "cart-1", "namespace": "shop", "uid": "u1", "labels": {"app": "cart"}},
            "spec": {"nodeName": "n1", "containers": []},
            "status": {"phase": "Running", "podIP": "10.0.0.2",
                       "podIPs": [{"ip": "10.0.0.2"}, {"ip": "fd00::2"}], "qosClass": "Burstable"}
        }));
        assert_eq!(w.unavailable, None);
        assert_eq!(w.key().to_string(), "shop/cart-1");
        assert_eq!(w.labels["app"], "cart");
        assert_eq!(
            w.ips,
            vec![
                "10.0.0.2".parse::<IpAddr>().unwrap(),
                "fd00::2".parse().unwrap()
            ]
        );
        assert_eq!(w.cgroup, PathBuf::from("/cg/cart-1"));
        assert_eq!(w.namespace_labels.unwrap()["mesh"], "m");
    }

    #[test]
    fn pods_that_cannot_be_captured_say_why() {
        let host = one(serde_json::json!({
            "metadata": {"name": "h", "namespace": "shop", "uid": "u2"},
            "spec": {"hostNetwork": true, "containers": []},
            "status": {"phase": "Running", "podIP": "192.0.2.1"}
        }));
        assert!(host.unavailable.unwrap().contains("hostNetwork"));
        let pending = one(serde_json::json!({
            "metadata": {"name": "p", "namespace": "shop", "uid": "u3"},
            "spec": {"containers": []},
            "status": {"phase": "Pending"}
        }));
        assert!(pending.unavailable.unwrap().contains("no IP yet"));
        let done = one(serde_json::json!({
            "metadata": {"name": "d", "namespace": "shop", "uid": "u4"},
            "spec": {"containers": []},
            "status": {"phase": "Succeeded", "podIP": "10.0.0.3"}
        }));
        assert!(done.unavailable.unwrap().contains("finished"));
        // A namespace the API has not shown: no labels, not an absent selector.
        let stranger = one(serde_json::json!({
            "metadata": {"name": "s", "namespace": "elsewhere", "uid": "u5"},
            "spec": {"containers": []},
            "status": {"phase": "Running", "podIP": "10.0.0.4"}
        }));
        assert_eq!(stranger.namespace_labels, Some(BTreeMap::new()));
    }

    #[test]
    fn a_relist_replaces_the_objects_only_when_complete_and_errors_keep_them() {
        let mut objects = Objects::<Pod>::new("pods");
        let p =
            |name: &str| pod(serde_json::json!({"metadata": {"name": name, "namespace": "shop"}}));
        assert!(!objects.apply(Ok(Event::Init)));
        assert!(!objects.apply(Ok(Event::InitApply(p("a")))));
        assert!(!objects.synced);
        assert!(objects.apply(Ok(Event::InitDone)));
        assert!(objects.synced);
        assert!(objects.apply(Ok(Event::Apply(p("b")))));
        assert_eq!(objects.items.len(), 2);
        // An outage: nothing changes.
        let error = watcher::Error::WatchError(Box::new(kube::core::Status::failure(
            "too old resource version",
            "Expired",
        )));
        assert!(!objects.apply(Err(error)));
        assert_eq!(objects.items.len(), 2);
        // The relist after it: both still there until the list is complete.
        assert!(!objects.apply(Ok(Event::Init)));
        assert!(!objects.apply(Ok(Event::InitApply(p("b")))));
        assert_eq!(objects.items.len(), 2);
        assert!(objects.apply(Ok(Event::InitDone)));
        let names: Vec<&str> = objects.items.keys().map(|(_, n)| n.as_str()).collect();
        assert_eq!(names, ["b"]);
    }
}
