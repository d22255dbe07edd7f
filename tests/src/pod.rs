//! Pods: a network namespace on a node's bridge, with a pod cgroup (container cgroups below it,
//! as kubelet makes them) and a resolv.conf. A pod is
//! part of the mesh only once its workload file is written (`Node::write_workload`); a pod
//! without one is an "outside" host on the same bridge.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use anyhow::bail;

use crate::enter;
use crate::kubelet;
use crate::netns;
use crate::workload::WorkloadFile;

/// What a test asks for: a Kubernetes-like pod identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    /// The pod's name, a DNS-1123 label (`[a-z0-9-]`, at most 63 characters).
    pub name: String,
    /// The pod's namespace, a DNS-1123 label; also its DNS search domain.
    pub namespace: String,
    /// Labels, which the mesh uses to map the pod to a VirtualNode.
    pub labels: BTreeMap<String, String>,
}

impl PodSpec {
    /// A pod with no labels.
    pub fn new(name: &str, namespace: &str) -> Self {
        Self {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            labels: BTreeMap::new(),
        }
    }

    /// Adds a label.
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_owned(), value.to_owned());
        self
    }
}

/// Checks a DNS-1123 label (pod names, namespaces, node names).
pub(crate) fn validate_label(what: &str, value: &str) -> anyhow::Result<()> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if !ok {
        bail!("{what} `{value}` is not a DNS-1123 label ([a-z0-9-], at most 63 characters)");
    }
    Ok(())
}

pub(crate) struct PodInner {
    pub(crate) spec: PodSpec,
    pub(crate) node_name: String,
    pub(crate) index: u8,
    pub(crate) netns: String,
    /// The pod's UID (Kubernetes' `metadata.uid`), which names its cgroups.
    pub(crate) uid: String,
    /// The pod cgroup; no process runs in it directly.
    pub(crate) cgroup: PathBuf,
    /// The container cgroups below it, in [`kubelet::CONTAINERS`] order.
    pub(crate) containers: Vec<PathBuf>,
    pub(crate) resolv_conf: PathBuf,
    pub(crate) ipv4: Ipv4Addr,
    pub(crate) ipv6: Ipv6Addr,
}

/// A pod on a node. Cheap to clone; the testbed owns what it stands for and removes it on
/// cleanup.
#[derive(Clone)]
pub struct Pod {
    pub(crate) inner: Arc<PodInner>,
}

impl std::fmt::Debug for Pod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pod")
            .field("name", &self.inner.spec.name)
            .field("namespace", &self.inner.spec.namespace)
            .field("node", &self.inner.node_name)
            .field("netns", &self.inner.netns)
            .field("ipv4", &self.inner.ipv4)
            .finish()
    }
}

impl Pod {
    /// The pod's name.
    pub fn name(&self) -> &str {
        &self.inner.spec.name
    }

    /// The pod's namespace.
    pub fn namespace(&self) -> &str {
        &self.inner.spec.namespace
    }

    /// The pod's labels.
    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.inner.spec.labels
    }

    /// The name of the node the pod runs on.
    pub fn node_name(&self) -> &str {
        &self.inner.node_name
    }

    /// The pod's index on its node (the last byte of its IPv4 address).
    pub fn index(&self) -> u8 {
        self.inner.index
    }

    /// The pod's IPv4 address, `10.244.<node>.<index>`.
    pub fn ipv4(&self) -> Ipv4Addr {
        self.inner.ipv4
    }

    /// The pod's IPv6 address, `fd00:244:<node>::<index>`.
    pub fn ipv6(&self) -> Ipv6Addr {
        self.inner.ipv6
    }

    /// Both addresses, IPv4 first.
    pub fn ips(&self) -> Vec<IpAddr> {
        vec![IpAddr::V4(self.inner.ipv4), IpAddr::V6(self.inner.ipv6)]
    }

    /// The netns name (as in `ip netns list`).
    pub fn netns_name(&self) -> &str {
        &self.inner.netns
    }

    /// The netns file, `/run/netns/<name>`.
    pub fn netns_path(&self) -> PathBuf {
        netns::path(&self.inner.netns)
    }

    /// The pod's UID.
    pub fn uid(&self) -> &str {
        &self.inner.uid
    }

    /// The pod's QoS class, which places its pod cgroup (see [`kubelet`]).
    pub fn qos_class(&self) -> kubelet::QosClass {
        kubelet::QosClass::for_index(self.inner.index)
    }

    /// The pod's cgroup v2 directory (under its node's cgroup root): what the workload file
    /// names. Its processes live in the container cgroups below it.
    pub fn cgroup_path(&self) -> &Path {
        &self.inner.cgroup
    }

    /// The cgroup of one of the pod's containers (one of [`kubelet::CONTAINERS`]).
    ///
    /// # Panics
    /// If the pod has no such container: a bug in the test.
    pub fn container_cgroup(&self, container: &str) -> &Path {
        let index = kubelet::CONTAINERS
            .iter()
            .position(|c| *c == container)
            .unwrap_or_else(|| {
                panic!(
                    "BUG: pods have the containers {:?}, not {container}",
                    kubelet::CONTAINERS
                )
            });
        &self.inner.containers[index]
    }

    /// The pod's resolv.conf (node DNS, search path for its namespace).
    pub fn resolv_conf(&self) -> &Path {
        &self.inner.resolv_conf
    }

    /// The workload file the agent would read for this pod.
    pub fn workload(&self) -> WorkloadFile {
        WorkloadFile {
            name: self.inner.spec.name.clone(),
            namespace: self.inner.spec.namespace.clone(),
            labels: self.inner.spec.labels.clone(),
            ips: self.ips(),
            netns: self.netns_path(),
            cgroup: self.inner.cgroup.clone(),
        }
    }

    /// A `Command` that runs `program` as a process of this pod: in its `app` container's cgroup
    /// (joined first; a child of the pod cgroup, as on a Kubernetes node), in a private mount namespace where the pod's resolv.conf is /etc/resolv.conf, and
    /// in the pod's netns (via setns, so /sys and bpffs stay as they are). Add arguments as
    /// usual; run it with [`crate::run`], [`crate::run_ok`] or [`crate::Testbed::spawn`] (which
    /// bound and track it).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        self.container_command("app", program)
    }

    /// Like [`Pod::command`], in another of the pod's containers.
    pub fn container_command(&self, container: &str, program: impl AsRef<OsStr>) -> Command {
        enter::command(
            program,
            &self.netns_path(),
            Some(self.container_cgroup(container)),
            &self.inner.resolv_conf,
        )
    }
}
