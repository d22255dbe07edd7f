//! Pod cgroups laid out the way kubelet lays them out, so the testbed's pods look to the eBPF
//! programs exactly like pods on a Kubernetes node: a pod cgroup below the QoS class cgroup, and
//! one child cgroup per container, with every process in a container cgroup and none in the pod
//! cgroup itself (kubelet's `pod_container_manager` and the container runtime's cgroup parent).
//!
//! Two drivers, as kubelet's `--cgroup-driver` has them (UIDs are escaped for systemd, `-`
//! becoming `_`, because systemd reads `-` in a slice name as nesting):
//!
//! ```text
//! systemd:  kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<UID_>.slice/cri-containerd-<ID>.scope
//!           kubepods.slice/kubepods-pod<UID_>.slice/cri-containerd-<ID>.scope        (Guaranteed)
//! cgroupfs: kubepods/burstable/pod<UID>/<ID>
//!           kubepods/pod<UID>/<ID>                                                   (Guaranteed)
//! ```
//!
//! The agent enrolls the pod cgroup; whatever decides per pod must find it from any process
//! below it.

use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

/// kubelet's `--cgroup-driver`: how pod and container cgroups are named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CgroupDriver {
    /// `kubepods.slice/...` (kubelet's default with systemd, and EKS's).
    #[default]
    Systemd,
    /// `kubepods/...`.
    Cgroupfs,
}

/// A pod's QoS class, which picks the cgroup its pod cgroup lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QosClass {
    /// Directly below `kubepods`.
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    /// The testbed varies the class by pod index, so pod cgroups sit at different depths.
    pub(crate) fn for_index(index: u8) -> Self {
        match index % 3 {
            0 => Self::Guaranteed,
            1 => Self::Burstable,
            _ => Self::BestEffort,
        }
    }

    /// The class as the Pod's `status.qosClass` names it.
    pub fn kubernetes_name(self) -> &'static str {
        match self {
            Self::Guaranteed => "Guaranteed",
            Self::Burstable => "Burstable",
            Self::BestEffort => "BestEffort",
        }
    }

    fn name(self) -> Option<&'static str> {
        match self {
            Self::Guaranteed => None,
            Self::Burstable => Some("burstable"),
            Self::BestEffort => Some("besteffort"),
        }
    }
}

/// The containers every testbed pod has: the sandbox (pause) container, the application
/// container that [`crate::Pod::command`] runs in, and a second one for tests that need another
/// container of the same pod.
pub const CONTAINERS: [&str; 3] = ["pause", "app", "sidecar"];

/// A pod's cgroups below the node's cgroup root.
#[derive(Debug, Clone)]
pub(crate) struct PodCgroups {
    /// The cgroups between the node root and the pod, outermost first (shared by the node's
    /// pods: created once, removed last).
    pub(crate) parents: Vec<PathBuf>,
    /// The pod cgroup: what the workload file names and the agent enrolls.
    pub(crate) pod: PathBuf,
    /// The container cgroups, in [`CONTAINERS`] order.
    pub(crate) containers: Vec<PathBuf>,
}

/// A stable UID for a pod (the shape of Kubernetes' UUIDs), from the testbed id and its name.
pub(crate) fn pod_uid(testbed_id: &str, namespace: &str, name: &str) -> String {
    let digest = hex(&Sha256::digest(format!("{testbed_id}/{namespace}/{name}")));
    format!(
        "{}-{}-{}-{}-{}",
        &digest[0..8],
        &digest[8..12],
        &digest[12..16],
        &digest[16..20],
        &digest[20..32]
    )
}

/// A container ID the way containerd makes them: 64 hex digits.
fn container_id(pod_uid: &str, container: &str) -> String {
    hex(&Sha256::digest(format!("{pod_uid}/{container}")))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where kubelet and containerd would put `pod_uid`'s cgroups below `root`.
pub(crate) fn layout(
    root: &Path,
    driver: CgroupDriver,
    qos: QosClass,
    pod_uid: &str,
) -> PodCgroups {
    let mut parents = Vec::new();
    let (pod, container_name): (PathBuf, fn(&str) -> String) = match driver {
        CgroupDriver::Systemd => {
            let top = root.join("kubepods.slice");
            parents.push(top.clone());
            let escaped = pod_uid.replace('-', "_");
            let pod = match qos.name() {
                None => top.join(format!("kubepods-pod{escaped}.slice")),
                Some(class) => {
                    let qos_dir = top.join(format!("kubepods-{class}.slice"));
                    parents.push(qos_dir.clone());
                    qos_dir.join(format!("kubepods-{class}-pod{escaped}.slice"))
                }
            };
            (pod, |id| format!("cri-containerd-{id}.scope"))
        }
        CgroupDriver::Cgroupfs => {
            let top = root.join("kubepods");
            parents.push(top.clone());
            let pod = match qos.name() {
                None => top.join(format!("pod{pod_uid}")),
                Some(class) => {
                    let qos_dir = top.join(class);
                    parents.push(qos_dir.clone());
                    qos_dir.join(format!("pod{pod_uid}"))
                }
            };
            (pod, str::to_owned)
        }
    };
    let containers = CONTAINERS
        .iter()
        .map(|c| pod.join(container_name(&container_id(pod_uid, c))))
        .collect();
    PodCgroups {
        parents,
        pod,
        containers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9";

    #[test]
    fn systemd_layout_matches_kubelet() {
        let l = layout(
            Path::new("/cg"),
            CgroupDriver::Systemd,
            QosClass::Burstable,
            UID,
        );
        let pod = "/cg/kubepods.slice/kubepods-burstable.slice/\
                   kubepods-burstable-pod0a1b2c3d_4e5f_6071_8293_a4b5c6d7e8f9.slice";
        assert_eq!(l.pod, Path::new(pod));
        assert_eq!(l.parents.len(), 2);
        let app = l.containers[1].to_str().unwrap();
        assert!(app.starts_with(&format!("{pod}/cri-containerd-")), "{app}");
        assert!(app.ends_with(".scope"));
        assert_eq!(
            app.len(),
            pod.len() + "/cri-containerd-".len() + 64 + ".scope".len()
        );
    }

    #[test]
    fn cgroupfs_layout_matches_kubelet() {
        let l = layout(
            Path::new("/cg"),
            CgroupDriver::Cgroupfs,
            QosClass::Guaranteed,
            UID,
        );
        assert_eq!(l.pod, Path::new(&format!("/cg/kubepods/pod{UID}")));
        assert_eq!(l.parents, [PathBuf::from("/cg/kubepods")]);
        assert_eq!(l.containers.len(), CONTAINERS.len());
        assert!(l.containers.iter().all(|c| c.parent() == Some(&*l.pod)));
    }

    #[test]
    fn uids_are_stable_and_distinct() {
        let a = pod_uid("abc123", "app", "client");
        assert_eq!(a, pod_uid("abc123", "app", "client"));
        assert_ne!(a, pod_uid("abc123", "app", "server"));
        assert_eq!(a.len(), 36);
        assert_eq!(a.matches('-').count(), 4);
    }
}
