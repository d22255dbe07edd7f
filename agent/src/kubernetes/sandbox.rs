//! Where a pod from the Kubernetes API lives on this node: its pod cgroup and its network
//! namespace.
//!
//! The pod cgroup follows from the pod's UID and QoS class, in the two layouts kubelet uses
//! (`--cgroup-driver`), below the agent's cgroup root:
//!
//! ```text
//! systemd:  kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<UID, - as _>.slice
//!           kubepods.slice/kubepods-pod<UID, - as _>.slice                (Guaranteed)
//! cgroupfs: kubepods/<qos>/pod<UID>
//!           kubepods/pod<UID>                                             (Guaranteed)
//! ```
//!
//! Both are probed: the node's cgroup driver is not known up front.
//!
//! The network namespace is the one of the pod's sandbox ("pause") process, which lives in a
//! container cgroup below the pod cgroup for as long as the pod does. The container runtime
//! names container cgroups by container ID, so the sandbox is told apart by being the pod's
//! oldest process (it is started before any container). Its namespace is opened and the file
//! descriptor kept: `/proc/self/fd/<fd>` then names the namespace for as long as the agent
//! holds it, even after the process exits (a fresh resolution replaces it when the sandbox
//! changes). See docs/kubernetes-pod-source.md.

use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};

/// kubelet's cgroup name for a QoS class (`None`: Guaranteed, directly below kubepods).
fn qos_dir(qos_class: &str) -> Option<Option<&'static str>> {
    match qos_class {
        "Guaranteed" => Some(None),
        "Burstable" => Some(Some("burstable")),
        "BestEffort" => Some(Some("besteffort")),
        _ => None,
    }
}

/// Every place kubelet may have put the pod cgroup of `uid` below `root`, for a QoS class
/// (all three when the pod does not say yet).
pub fn pod_cgroup_candidates(root: &Path, uid: &str, qos_class: Option<&str>) -> Vec<PathBuf> {
    let classes: Vec<Option<&str>> = match qos_class.and_then(qos_dir) {
        Some(class) => vec![class],
        None => vec![None, Some("burstable"), Some("besteffort")],
    };
    let escaped = uid.replace('-', "_");
    let mut candidates = Vec::new();
    for class in classes {
        let systemd = root.join("kubepods.slice");
        candidates.push(match class {
            None => systemd.join(format!("kubepods-pod{escaped}.slice")),
            Some(class) => systemd
                .join(format!("kubepods-{class}.slice"))
                .join(format!("kubepods-{class}-pod{escaped}.slice")),
        });
        let cgroupfs = root.join("kubepods");
        candidates.push(match class {
            None => cgroupfs.join(format!("pod{uid}")),
            Some(class) => cgroupfs.join(class).join(format!("pod{uid}")),
        });
    }
    candidates
}

/// The pod cgroup of `uid` if it exists.
pub fn find_pod_cgroup(root: &Path, uid: &str, qos_class: Option<&str>) -> Option<PathBuf> {
    pod_cgroup_candidates(root, uid, qos_class)
        .into_iter()
        .find(|path| path.join("cgroup.procs").exists())
}

/// The pod's processes (below the pod cgroup, at most three levels down), with the cgroup
/// each one is in.
fn pod_processes(pod_cgroup: &Path) -> Vec<(u32, PathBuf)> {
    let mut found = Vec::new();
    let mut dirs = vec![(pod_cgroup.to_path_buf(), 0)];
    while let Some((dir, depth)) = dirs.pop() {
        if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            found.extend(
                text.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .map(|pid| (pid, dir.clone())),
            );
        }
        if depth >= 3 {
            continue;
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs.push((entry.path(), depth + 1));
                }
            }
        }
    }
    found
}

/// A process's start time in clock ticks since boot (`/proc/<pid>/stat`, field 22).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Why a pod's sandbox cannot be opened yet (the pod waits, with this as its reason).
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("no process in pod cgroup {cgroup} yet (waiting for the pod's sandbox)")]
    NoProcess { cgroup: PathBuf },
    #[error("cannot open the network namespace of the pod's sandbox process {pid}")]
    Netns {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("the pod's sandbox process {pid} exited while its network namespace was opened")]
    Exited { pid: u32 },
}

/// The pod's network namespace, held open.
#[derive(Debug)]
pub struct Sandbox {
    /// The sandbox process the namespace was taken from.
    pub pid: u32,
    /// Its container cgroup.
    pub cgroup: PathBuf,
    netns: File,
}

impl Sandbox {
    /// Opens the network namespace of the pod's oldest process. `Err` says why not (no
    /// process yet, the process went away).
    pub fn open(pod_cgroup: &Path) -> Result<Sandbox, OpenError> {
        let mut processes: Vec<(u64, u32, PathBuf)> = pod_processes(pod_cgroup)
            .into_iter()
            .filter_map(|(pid, cgroup)| Some((start_time(pid)?, pid, cgroup)))
            .collect();
        processes.sort();
        let Some((_, pid, cgroup)) = processes.into_iter().next() else {
            return Err(OpenError::NoProcess {
                cgroup: pod_cgroup.to_owned(),
            });
        };
        let netns = File::open(format!("/proc/{pid}/ns/net"))
            .map_err(|source| OpenError::Netns { pid, source })?;
        // The pid could have exited and been reused between listing and opening: it must
        // still be in the pod's cgroup.
        let sandbox = Sandbox { pid, cgroup, netns };
        if !sandbox.alive() {
            return Err(OpenError::Exited { pid });
        }
        Ok(sandbox)
    }

    /// Whether the sandbox process is still in its container cgroup.
    pub fn alive(&self) -> bool {
        std::fs::read_to_string(self.cgroup.join("cgroup.procs")).is_ok_and(|text| {
            text.lines()
                .any(|l| l.trim().parse::<u32>() == Ok(self.pid))
        })
    }

    /// The namespace's identity (device, inode).
    fn netns_id(&self) -> Option<(u64, u64)> {
        use std::os::unix::fs::MetadataExt as _;
        self.netns.metadata().ok().map(|m| (m.dev(), m.ino()))
    }

    /// Takes over `newer` (a sandbox found after this one's process went away) if it is in
    /// the same network namespace: the path stays the same, so the pod is not re-enrolled.
    /// Returns `newer` back when the namespace differs.
    pub fn adopt(&mut self, newer: Sandbox) -> Result<(), Sandbox> {
        if self.netns_id().is_some() && self.netns_id() == newer.netns_id() {
            self.pid = newer.pid;
            self.cgroup = newer.cgroup;
            Ok(())
        } else {
            Err(newer)
        }
    }

    /// A path that opens the namespace while this value lives.
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.netns.as_raw_fd()))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    const UID: &str = "0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9";

    #[test]
    fn candidates_cover_both_drivers_for_the_class() {
        let c = pod_cgroup_candidates(Path::new("/cg"), UID, Some("Burstable"));
        assert_eq!(
            c,
            [
                PathBuf::from(
                    "/cg/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0a1b2c3d_4e5f_6071_8293_a4b5c6d7e8f9.slice"
                ),
                PathBuf::from(format!("/cg/kubepods/burstable/pod{UID}")),
            ]
        );
        let g = pod_cgroup_candidates(Path::new("/cg"), UID, Some("Guaranteed"));
        assert_eq!(
            g[0],
            PathBuf::from(
                "/cg/kubepods.slice/kubepods-pod0a1b2c3d_4e5f_6071_8293_a4b5c6d7e8f9.slice"
            )
        );
        assert_eq!(g[1], PathBuf::from(format!("/cg/kubepods/pod{UID}")));
        // No class yet: every class, both drivers.
        assert_eq!(pod_cgroup_candidates(Path::new("/cg"), UID, None).len(), 6);
    }

    #[test]
    fn the_first_existing_candidate_is_the_pod_cgroup() {
        let root = tempfile::tempdir().unwrap();
        let pod = root.path().join(format!("kubepods/besteffort/pod{UID}"));
        std::fs::create_dir_all(&pod).unwrap();
        assert_eq!(find_pod_cgroup(root.path(), UID, Some("BestEffort")), None);
        std::fs::write(pod.join("cgroup.procs"), "").unwrap();
        assert_eq!(
            find_pod_cgroup(root.path(), UID, Some("BestEffort")),
            Some(pod.clone())
        );
        assert_eq!(find_pod_cgroup(root.path(), UID, None), Some(pod));
        assert_eq!(find_pod_cgroup(root.path(), UID, Some("Burstable")), None);
    }

    #[test]
    fn the_oldest_process_below_the_pod_cgroup_is_the_sandbox() {
        let root = tempfile::tempdir().unwrap();
        let pod = root.path().join("pod");
        let pause = pod.join("aaa");
        let app = pod.join("bbb");
        std::fs::create_dir_all(&pause).unwrap();
        std::fs::create_dir_all(&app).unwrap();
        std::fs::write(pod.join("cgroup.procs"), "").unwrap();
        assert!(matches!(
            Sandbox::open(&pod).unwrap_err(),
            OpenError::NoProcess { .. }
        ));
        // This test process is older than a child it starts: it plays the sandbox.
        let me = std::process::id();
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap();
        std::fs::write(app.join("cgroup.procs"), format!("{}\n", child.id())).unwrap();
        std::fs::write(pause.join("cgroup.procs"), format!("{me}\n")).unwrap();
        let sandbox = Sandbox::open(&pod);
        let _ = child.kill();
        let _ = child.wait();
        let sandbox = sandbox.unwrap();
        assert_eq!(sandbox.pid, me);
        assert_eq!(sandbox.cgroup, pause);
        assert_eq!(
            std::fs::metadata(sandbox.netns_path()).unwrap().ino(),
            std::fs::metadata("/proc/self/ns/net").unwrap().ino()
        );
        std::fs::write(pause.join("cgroup.procs"), "").unwrap();
        assert!(!sandbox.alive());
        // Another process of the same namespace takes over; the path stays.
        let mut sandbox = sandbox;
        let path = sandbox.netns_path();
        std::fs::write(app.join("cgroup.procs"), format!("{me}\n")).unwrap();
        let newer = Sandbox::open(&pod).unwrap();
        assert!(sandbox.adopt(newer).is_ok());
        assert_eq!(sandbox.netns_path(), path);
        assert_eq!(sandbox.cgroup, app);
        assert!(sandbox.alive());
    }
}
