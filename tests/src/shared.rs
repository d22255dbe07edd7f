//! What a testbed owns and how it is taken down. Every resource is recorded *before* it is
//! created, so a failure or panic half-way through creation still removes it. Cleanup is
//! idempotent and callable from any thread (a Ctrl-C handler, `Drop`), and it only ever touches
//! what this testbed recorded: its own children by pid, its own cgroups, netns, bpffs folders and
//! temp dir. It never sweeps by name pattern.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::dns::Dns;
use crate::netns;
use crate::node::NodeInner;
use crate::process::Process;

/// State shared by the testbed and its node handles.
pub(crate) struct Shared {
    pub(crate) id: String,
    pub(crate) test_name: String,
    pub(crate) cgroup2: PathBuf,
    /// `<cgroup2>/strait-test-<id>`: every cgroup of this testbed is below it.
    pub(crate) cgroup_top: PathBuf,
    pub(crate) temp_dir: PathBuf,
    pub(crate) log_dir: PathBuf,
    pub(crate) fabric_netns: String,
    pub(crate) dns: Dns,
    /// Nodes in index order. Held while a node is added (lock order: after `dns.records`).
    pub(crate) topology: Mutex<Vec<Arc<NodeInner>>>,
    pub(crate) resources: Mutex<Resources>,
    /// Held for the whole of a teardown, so that a second caller waits until it has finished.
    pub(crate) teardown: Mutex<()>,
}

/// Everything to remove, in creation order.
#[derive(Default)]
pub(crate) struct Resources {
    cleaned: bool,
    processes: Vec<Process>,
    netns: Vec<String>,
    cgroups: Vec<PathBuf>,
    bpffs: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
}

/// Locks ignoring poison: a test that panicked while holding a lock must still be cleaned up.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    fn record(&self, f: impl FnOnce(&mut Resources)) -> anyhow::Result<()> {
        let mut res = lock(&self.resources);
        if res.cleaned {
            bail!(
                "testbed {} ({}) was already cleaned up; nothing new can be created",
                self.id,
                self.test_name
            );
        }
        f(&mut res);
        Ok(())
    }

    /// Records a netns, then creates it.
    pub(crate) fn create_netns(&self, name: &str) -> anyhow::Result<()> {
        self.record(|r| r.netns.push(name.to_owned()))?;
        netns::create(name)
    }

    /// Records a cgroup directory, then creates it.
    pub(crate) fn create_cgroup(&self, path: &Path) -> anyhow::Result<()> {
        self.record(|r| r.cgroups.push(path.to_owned()))?;
        std::fs::create_dir(path)
            .map_err(|e| anyhow::anyhow!("create cgroup {}: {e}", path.display()))
    }

    /// Records a directory, then creates it (and its parents; only the recorded one is removed,
    /// so record the top first).
    pub(crate) fn create_dir(&self, path: &Path) -> anyhow::Result<()> {
        self.record(|r| r.dirs.push(path.to_owned()))?;
        std::fs::create_dir_all(path)
            .map_err(|e| anyhow::anyhow!("create directory {}: {e}", path.display()))
    }

    /// Records a bpffs folder the agent will create; it is removed (pins and all) on cleanup.
    pub(crate) fn own_bpffs(&self, path: &Path) -> anyhow::Result<()> {
        self.record(|r| r.bpffs.push(path.to_owned()))
    }

    /// Tracks a process for cleanup. If the testbed is already cleaned up, kills it at once.
    pub(crate) fn track(&self, process: &Process) -> anyhow::Result<()> {
        let result = self.record(|r| r.processes.push(process.clone()));
        if result.is_err() {
            let _ = process.kill();
        }
        result
    }

    /// Tears everything down. Idempotent: a second call waits until the first has finished and
    /// then does nothing. Returns what could not be removed.
    ///
    /// The wait matters when a Ctrl-C handler tears down on its thread: the killed processes
    /// make the main thread's work fail, and its `Drop` must not return (and let the process
    /// exit) while the handler is still removing namespaces and directories.
    pub(crate) fn cleanup(&self) -> anyhow::Result<()> {
        let _teardown = lock(&self.teardown);
        let res = {
            let mut guard = lock(&self.resources);
            if guard.cleaned {
                return Ok(());
            }
            guard.cleaned = true;
            std::mem::take(&mut *guard)
        };
        let mut problems = Vec::new();

        // 1. Our own children, newest first (the agent before the servers it fronts).
        for process in res.processes.iter().rev() {
            if let Err(e) = process.kill() {
                problems.push(format!("{e:#}"));
            }
        }
        // 2. Anything left in our cgroups (processes a test spawned without tracking them, and
        //    their children): every process below our top cgroup is ours.
        if self.cgroup_top.is_dir()
            && let Err(e) = kill_cgroup(&self.cgroup_top)
        {
            problems.push(format!("{e:#}"));
        }
        for cgroup in res.cgroups.iter().rev() {
            if let Err(e) = rmdir_if_exists(cgroup) {
                problems.push(format!("remove cgroup {}: {e}", cgroup.display()));
            }
        }
        // 3. Namespaces, pods before nodes before the fabric; their links go with them.
        for name in res.netns.iter().rev() {
            if let Err(e) = netns::delete(name) {
                problems.push(format!("{e:#}"));
            }
        }
        // 4. bpffs folders: unlinking pins detaches the programs and frees the maps.
        for dir in &res.bpffs {
            if dir.exists()
                && let Err(e) = std::fs::remove_dir_all(dir)
            {
                problems.push(format!("remove bpffs folder {}: {e}", dir.display()));
            }
        }
        // 5. Temp dirs (logs, resolv.conf files, workload files).
        for dir in res.dirs.iter().rev() {
            if dir.exists()
                && let Err(e) = std::fs::remove_dir_all(dir)
            {
                problems.push(format!("remove {}: {e}", dir.display()));
            }
        }
        if !problems.is_empty() {
            bail!(
                "cleanup of testbed {} ({}) left things behind:\n  - {}",
                self.id,
                self.test_name,
                problems.join("\n  - ")
            );
        }
        Ok(())
    }

    /// Stderr tails of every tracked process, for a failing test's output.
    pub(crate) fn log_tails(&self) -> String {
        let res = lock(&self.resources);
        let mut out = String::new();
        for p in &res.processes {
            let err = p.stderr();
            let outp = p.stdout();
            out.push_str(&format!(
                "--- {} (pid {}) stdout:\n{}\n--- {} stderr:\n{}\n",
                p.label(),
                p.pid(),
                crate::process::tail(&outp, 2000),
                p.label(),
                crate::process::tail(&err, 2000)
            ));
        }
        out
    }
}

/// Kills every process in the subtree (cgroup.kill, Linux 5.14+) and waits until it is empty.
fn kill_cgroup(cgroup: &Path) -> anyhow::Result<()> {
    let kill = cgroup.join("cgroup.kill");
    std::fs::write(&kill, "1")
        .map_err(|e| anyhow::anyhow!("write 1 to {}: {e}", kill.display()))?;
    let events = cgroup.join("cgroup.events");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(&events).unwrap_or_default();
        if text.lines().any(|l| l == "populated 0") {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "processes remain in {} 5s after cgroup.kill",
                cgroup.display()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn rmdir_if_exists(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// A handle that tears the testbed down from elsewhere, e.g. a Ctrl-C handler. Idempotent: the
/// testbed's own `Drop` then finds nothing left to do.
#[derive(Clone)]
pub struct CleanupHandle {
    pub(crate) shared: Arc<Shared>,
}

impl CleanupHandle {
    /// Removes everything the testbed created. Safe to call more than once, from any thread.
    pub fn cleanup(&self) -> anyhow::Result<()> {
        self.shared.cleanup()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    fn shared(dir: &Path) -> Arc<Shared> {
        Arc::new(Shared {
            id: "unit00".to_owned(),
            test_name: "unit".to_owned(),
            cgroup2: dir.join("no-cgroup2"),
            cgroup_top: dir.join("no-cgroup2/strait-test-unit00"),
            temp_dir: dir.to_owned(),
            log_dir: dir.join("logs"),
            fabric_netns: "stunit00fab".to_owned(),
            dns: Dns {
                hosts_file: dir.join("dns-hosts"),
                ttl: 0,
                records: Mutex::new(Default::default()),
            },
            topology: Mutex::new(Vec::new()),
            resources: Mutex::new(Resources::default()),
            teardown: Mutex::new(()),
        })
    }

    /// A cleanup called while another is under way (a Ctrl-C handler's, here held by the test)
    /// returns only once that one has finished.
    #[test]
    fn a_second_cleanup_waits_for_the_first_to_finish() {
        let dir = std::env::temp_dir().join(format!("strait-unit-cleanup-{}", std::process::id()));
        let shared = shared(&dir);
        shared.create_dir(&dir).unwrap();
        let first = lock(&shared.teardown);
        let (done_tx, done_rx) = mpsc::channel();
        let second = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                let result = shared.cleanup();
                done_tx.send(()).unwrap();
                result
            })
        };
        assert!(
            done_rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "the second cleanup returned while the first was under way"
        );
        drop(first);
        done_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the second cleanup finished once the first had");
        second.join().unwrap().unwrap();
        assert!(!dir.exists(), "the second cleanup removed the directory");
        shared.cleanup().unwrap();
    }
}
