//! The node's local workloads (pods): who they are, where their network namespace and cgroup
//! live, and which VirtualNode each one is.
//!
//! The first source is a directory with one small JSON file per pod, the facts a CNI plugin or
//! the kubelet knows. The directory is watched; every change produces a fresh [`Snapshot`].
//! The Kubernetes source (`crate::kubernetes`, pods on this node from the API) produces the
//! same snapshots; [`start`] starts the one the agent was asked for.
//! Matching pods to VirtualNodes (`podSelector`) lives here too; what to do with an enrolled
//! pod is the proxy's and the redirect's business.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::Watcher;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::logging::Chain;
use crate::mesh::{MeshConfig, ResourceId};

/// Errors of the workload source.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "workloads directory {path} does not exist or is not readable (create it, or point --workloads at the directory your CNI plugin writes pod files to)"
    )]
    Directory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot watch workloads directory {path}")]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
    #[error(transparent)]
    Kubernetes(#[from] crate::kubernetes::Error),
}

/// One pod on this node, as its workload file describes it.
///
/// The field names are the file format (see docs/operations.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The pod's addresses (IPv4 and/or IPv6).
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// Path of the pod's network namespace (e.g. /var/run/netns/cni-1234 or /proc/PID/ns/net).
    pub netns: PathBuf,
    /// Path of the pod's cgroup v2 directory.
    pub cgroup: PathBuf,
    /// Labels of the pod's namespace, for `Mesh.spec.namespaceSelector`. Optional: when
    /// absent, the labels of a `Namespace` document in the mesh file count.
    #[serde(
        default,
        rename = "namespaceLabels",
        skip_serializing_if = "Option::is_none"
    )]
    pub namespace_labels: Option<BTreeMap<String, String>>,
    /// Why the source cannot hand this pod over for enrollment (host network, no IP yet, no
    /// sandbox yet); `None` when it can. Set by the Kubernetes source, never read from a file.
    #[serde(skip)]
    pub unavailable: Option<String>,
}

impl Workload {
    /// `namespace/name`, the key a pod is known by.
    pub fn key(&self) -> ResourceId {
        ResourceId {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }

    /// Whether the pod's namespace belongs to the mesh: `Mesh.spec.namespaceSelector` matches
    /// the namespace's labels (from the workload file, else from the mesh file's Namespace
    /// documents). A mesh without a namespaceSelector takes every namespace: the mesh file
    /// describes one mesh, so every resource in it is that mesh's (docs/mesh-file.md).
    pub fn in_mesh(&self, mesh: &MeshConfig) -> bool {
        mesh.namespace_in_mesh_with(&self.namespace, self.namespace_labels.as_ref())
    }

    /// The VirtualNode whose `podSelector` selects this pod: same namespace, labels match. A
    /// VirtualNode without a podSelector selects no pod (App Mesh semantics). When several
    /// match, the pod is none of them (the App Mesh controller refuses such a pod too); the
    /// caller is told which.
    pub fn virtual_node<'m>(&self, mesh: &'m MeshConfig) -> Selection<'m> {
        if !self.in_mesh(mesh) {
            return Selection::NotInMesh;
        }
        let mut matching = mesh.virtual_nodes.iter().filter(|vn| {
            vn.id.namespace == self.namespace
                && vn
                    .spec
                    .pod_selector
                    .as_ref()
                    .is_some_and(|selector| selector.matches(&self.labels))
        });
        let Some(first) = matching.next() else {
            return Selection::None;
        };
        let others: Vec<&ResourceId> = matching.map(|vn| &vn.id).collect();
        if others.is_empty() {
            Selection::One(&first.id)
        } else {
            Selection::Ambiguous {
                chosen: &first.id,
                others,
            }
        }
    }
}

/// Which VirtualNode a pod is.
#[derive(Debug, PartialEq)]
pub enum Selection<'m> {
    /// The pod's namespace is not selected by the Mesh's namespaceSelector.
    NotInMesh,
    None,
    One(&'m ResourceId),
    Ambiguous {
        chosen: &'m ResourceId,
        others: Vec<&'m ResourceId>,
    },
}

impl<'m> Selection<'m> {
    /// The VirtualNode the pod is enrolled as: exactly one must select it.
    pub fn chosen(&self) -> Option<&'m ResourceId> {
        match self {
            Selection::NotInMesh | Selection::None | Selection::Ambiguous { .. } => None,
            Selection::One(id) => Some(id),
        }
    }

    /// Why a pod with this selection is not enrolled (`None` when it is one VirtualNode's).
    pub fn reason(&self, workload: &Workload, mesh: &MeshConfig) -> Option<String> {
        match self {
            Selection::One(_) => None,
            Selection::NotInMesh => Some(format!(
                "namespace {} is not selected by Mesh {}'s namespaceSelector",
                workload.namespace, mesh.mesh.name
            )),
            Selection::None => Some(format!(
                "no VirtualNode in namespace {} selects the pod's labels",
                workload.namespace
            )),
            Selection::Ambiguous { chosen, others } => Some(format!(
                "several VirtualNodes select the pod ({}); exactly one must, so it is not enrolled",
                std::iter::once(*chosen)
                    .chain(others.iter().copied())
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
}

/// Where the agent learns about its pods.
#[derive(Debug, Clone)]
pub enum PodSource {
    /// A directory of workload files (plain hosts, or a CNI plugin that writes them).
    Directory(PathBuf),
    /// This node's pods in the Kubernetes API.
    Kubernetes(crate::kubernetes::Options),
}

/// A running pod source.
pub struct Source {
    pub snapshots: watch::Receiver<Snapshot>,
    /// True once the source has seen every pod once (at once for a directory; after the
    /// first complete list for the Kubernetes API). The agent is not ready before.
    pub synced: watch::Receiver<bool>,
    /// The CNI plugin's hand-off (Kubernetes with `--cni-socket`), served once the agent is
    /// ready.
    pub cni: Option<crate::kubernetes::cni::Handle>,
    /// Which node each pod address is on (Kubernetes), for reaching other nodes' pods.
    pub endpoints: Option<crate::kubernetes::endpoints::Shared>,
    _directory: Option<DirectorySource>,
}

/// Starts the pod source. A directory is read once now (an unreadable one is an error); the
/// Kubernetes API is only configured now and retried until it answers.
pub async fn start(source: &PodSource) -> Result<Source, Error> {
    match source {
        PodSource::Directory(dir) => {
            let directory = DirectorySource::start(dir)?;
            Ok(Source {
                snapshots: directory.snapshots.clone(),
                synced: watch::channel(true).1,
                cni: None,
                endpoints: None,
                _directory: Some(directory),
            })
        }
        PodSource::Kubernetes(options) => {
            let kubernetes = crate::kubernetes::start(options.clone()).await?;
            Ok(Source {
                snapshots: kubernetes.snapshots,
                synced: kubernetes.synced,
                cni: kubernetes.cni,
                endpoints: Some(kubernetes.endpoints),
                _directory: None,
            })
        }
    }
}

/// All pods the source knows, keyed by `namespace/name`.
pub type Snapshot = Arc<BTreeMap<ResourceId, Workload>>;

/// Reads every `*.json` file of the directory. A malformed file is reported and skipped; the
/// others still count.
pub fn read_dir(dir: &Path) -> Result<BTreeMap<ResourceId, Workload>, Error> {
    let entries = std::fs::read_dir(dir).map_err(|source| Error::Directory {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut pods = BTreeMap::new();
    let mut files: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    files.sort();
    for path in files {
        match read_file(&path) {
            Ok(workload) => {
                if let Some(previous) = pods.insert(workload.key(), workload) {
                    tracing::error!(
                        file = %path.display(),
                        pod = %previous.key(),
                        "two workload files describe the same pod; using the later file"
                    );
                }
            }
            Err(error) => {
                let error = Chain(&error);
                tracing::error!(file = %path.display(), "skipping workload file: {error}")
            }
        }
    }
    Ok(pods)
}

/// Why one workload file is skipped (the others still count).
#[derive(Debug, thiserror::Error)]
enum FileError {
    #[error("cannot read it")]
    Read(#[source] std::io::Error),
    #[error(
        "line {line}, column {column}: not a workload (an object with name, namespace, labels, \
         ips, netns, cgroup)"
    )]
    Parse {
        line: usize,
        column: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("name and namespace must not be empty")]
    Unnamed,
}

fn read_file(path: &Path) -> Result<Workload, FileError> {
    let text = std::fs::read_to_string(path).map_err(FileError::Read)?;
    let workload: Workload = serde_json::from_str(&text).map_err(|source| FileError::Parse {
        line: source.line(),
        column: source.column(),
        source,
    })?;
    if workload.name.is_empty() || workload.namespace.is_empty() {
        return Err(FileError::Unnamed);
    }
    Ok(workload)
}

/// Watches a workloads directory and publishes a snapshot whenever it changes.
pub struct DirectorySource {
    // Kept alive: dropping the watcher stops the events.
    _watcher: notify::RecommendedWatcher,
    pub snapshots: watch::Receiver<Snapshot>,
}

/// Whether a watched file's event can mean new content: everything but opening or reading it.
/// The watcher reports opens (inotify's IN_OPEN) too, and the rescan that follows an event
/// opens every file: counted as changes, one rescan would call the next, forever, at a cost
/// that grows with the number of pods (it was most of an idle agent's CPU with 1,000 pods).
pub fn is_change(event: &notify::Event) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

impl DirectorySource {
    /// Reads the directory once (an unreadable directory is an error) and keeps watching it.
    pub fn start(dir: &Path) -> Result<DirectorySource, Error> {
        let initial = read_dir(dir)?;
        let (tx, rx) = watch::channel(Arc::new(initial));
        let (kick_tx, mut kick_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if event.is_ok_and(|event| is_change(&event)) {
                    let _ = kick_tx.send(());
                }
            })
            .map_err(|source| Error::Watch {
                path: dir.to_path_buf(),
                source,
            })?;
        watcher
            .watch(dir, notify::RecursiveMode::NonRecursive)
            .map_err(|source| Error::Watch {
                path: dir.to_path_buf(),
                source,
            })?;
        let dir = dir.to_path_buf();
        tokio::spawn(async move {
            while kick_rx.recv().await.is_some() {
                // Files are written in bursts (create, write, rename): settle, then rescan once.
                tokio::time::sleep(Duration::from_millis(50)).await;
                while kick_rx.try_recv().is_ok() {}
                match read_dir(&dir) {
                    Ok(pods) => {
                        tx.send_if_modified(|current| {
                            if **current == pods {
                                false
                            } else {
                                *current = Arc::new(pods);
                                true
                            }
                        });
                    }
                    Err(error) => tracing::error!("{}", Chain(&error)),
                }
            }
        });
        Ok(DirectorySource {
            _watcher: watcher,
            snapshots: rx,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With a real watcher: reading the files (as a rescan does) is no change; writing one is.
    #[test]
    fn reading_a_watched_file_is_not_a_change() {
        use notify::Watcher as _;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pod.json"), "{}").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let event = event.unwrap();
                let _ = tx.send((is_change(&event), event.kind));
            })
            .unwrap();
        watcher
            .watch(dir.path(), notify::RecursiveMode::NonRecursive)
            .unwrap();
        std::fs::read(dir.path().join("pod.json")).unwrap();
        let mut seen = Vec::new();
        while let Ok((change, kind)) = rx.recv_timeout(Duration::from_millis(300)) {
            assert!(!change, "reading the file counted as a change: {kind:?}");
            seen.push(kind);
        }
        assert!(
            !seen.is_empty(),
            "the watcher reported no open: the test proves nothing"
        );
        std::fs::write(dir.path().join("pod.json"), "{\"a\": 1}").unwrap();
        let change = (0..50)
            .filter_map(|_| rx.recv_timeout(Duration::from_millis(100)).ok())
            .any(|(change, _)| change);
        assert!(change, "writing the file was not a change");
    }

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn malformed_file_is_skipped_others_kept() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "a.json",
            r#"{"name":"a","namespace":"app","labels":{"app":"a"},"ips":["10.0.0.2"],"netns":"/run/netns/a","cgroup":"/sys/fs/cgroup/a"}"#,
        );
        write(dir.path(), "b.json", r#"{"name":"b","namespace":"#);
        write(dir.path(), "ignored.txt", "not a workload");
        let pods = read_dir(dir.path()).unwrap();
        assert_eq!(pods.len(), 1);
        let a = &pods[&ResourceId {
            namespace: "app".into(),
            name: "a".into(),
        }];
        assert_eq!(a.labels["app"], "a");
        assert_eq!(a.ips, vec!["10.0.0.2".parse::<IpAddr>().unwrap()]);
    }

    fn mesh(text: &str) -> MeshConfig {
        crate::mesh::parse_str(text, Path::new("mesh.yaml"))
            .unwrap()
            .config
    }

    const MESH: &str = r#"
apiVersion: appmesh.k8s.aws/v1beta2
kind: Mesh
metadata: {name: m}
spec:
  namespaceSelector: {matchLabels: {mesh: m}}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {mesh: m}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {name: cart, namespace: shop}
spec:
  podSelector: {matchLabels: {app: cart}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {name: cart, namespace: other}
spec:
  podSelector: {matchLabels: {app: cart}}
"#;

    fn pod(namespace: &str, app: &str) -> Workload {
        Workload {
            name: "p".into(),
            namespace: namespace.into(),
            labels: [("app".to_string(), app.to_string())].into(),
            ips: vec![],
            netns: "/n".into(),
            cgroup: "/c".into(),
            namespace_labels: None,
            unavailable: None,
        }
    }

    #[test]
    fn pods_are_matched_by_namespace_and_pod_selector() {
        let mesh = mesh(MESH);
        let chosen = pod("shop", "cart").virtual_node(&mesh).chosen().cloned();
        assert_eq!(
            chosen.map(|id| id.to_string()).as_deref(),
            Some("shop/cart")
        );
        assert_eq!(pod("shop", "web").virtual_node(&mesh), Selection::None);
        // `other` has no labels in the file: the namespaceSelector leaves it out.
        assert_eq!(
            pod("other", "cart").virtual_node(&mesh),
            Selection::NotInMesh
        );
        // Namespace labels in the workload file count.
        let mut labelled = pod("other", "cart");
        labelled.namespace_labels = Some([("mesh".to_string(), "m".to_string())].into());
        assert!(labelled.virtual_node(&mesh).chosen().is_some());
    }

    #[test]
    fn missing_directory_is_an_error_naming_it() {
        let err = read_dir(Path::new("/nonexistent/strait-workloads")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/strait-workloads"));
    }

    #[test]
    fn unknown_field_is_rejected_with_position() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.json");
        std::fs::write(
            &path,
            r#"{"name":"a","namespace":"app","netns":"/n","cgroup":"/c","label":{}}"#,
        )
        .unwrap();
        let err = Chain(&read_file(&path).unwrap_err()).to_string();
        assert!(err.contains("unknown field `label`"), "{err}");
    }
}
