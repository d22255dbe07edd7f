//! The strait testbed: Kubernetes-like nodes and pods built from network namespaces on one
//! machine, for end-to-end tests, `cargo xtask demo` and benchmarks.
//!
//! ```text
//!            fabric netns (st<id>fab): bridge br0, 192.0.2.0/24 + fd00:ff::/64
//!              |  vn1                               |  vn2
//!   node1 netns (st<id>n1)                node2 netns (st<id>n2)
//!     ul0 192.0.2.1                         ul0 192.0.2.2
//!     br0 10.244.1.1 fd00:244:1::1          br0 10.244.2.1 ...
//!     dnsmasq on br0:53                     dnsmasq on br0:53
//!      |  vp2           |  vp3               |  vp2
//!   pod netns         pod netns            pod netns (st<id>n2p2)
//!   eth0 10.244.1.2   eth0 10.244.1.3      eth0 10.244.2.2
//! ```
//!
//! What a test gets:
//! - [`Testbed::new`] checks the machine (root, cgroup v2, bpffs, `ip`, `dnsmasq`) and fails
//!   with a message naming what is missing. Every name carries a 6-hex-digit id unique per run.
//! - [`Testbed::add_node`] makes a [`Node`]: a netns with a bridge for its pods, a cgroup root
//!   (`<cgroup2>/strait-test-<id>/<node>`), a bpffs folder path for its agent
//!   (`/sys/fs/bpf/strait-test-<id>-<node>`), a workloads directory, a DNS server, and a veth into
//!   the underlay with routes to every other node's pods.
//! - [`Node::add_pod`] makes a [`Pod`]: a netns on the node's bridge with IPv4 and IPv6
//!   addresses, no default route, the service ranges routed `unreachable`, a pod cgroup with
//!   container cgroups below it as kubelet lays them out ([`kubelet`]; processes only in the
//!   containers' cgroups), and a resolv.conf pointing at the node's DNS. [`Node::write_workload`] enrolls it in the mesh by
//!   writing the [`WorkloadFile`] the agent reads.
//! - [`Pod::command`] and [`Node::command`] build a `std::process::Command` that runs inside the
//!   pod or node (cgroup, then mount namespace with resolv.conf, then netns; no wrapper
//!   process). [`Testbed::spawn`] tracks a long-running one; [`run`] and [`run_ok`] bound a short
//!   one with a timeout.
//! - [`Testbed::dns_record`] and [`Testbed::remove_dns_record`] change what every node's DNS
//!   answers; they return once every dnsmasq has reloaded.
//! - Dropping the [`Testbed`] (also during a panic) kills its processes and removes its
//!   namespaces, links, cgroups, bpffs folders and temp dir; [`Testbed::cleanup_handle`] does
//!   the same from a Ctrl-C handler. Only what the testbed recorded is touched.
//!
//! - [`Scenario::builder`] makes the one-node shape most tests start from (a client pod, two
//!   color backends with servers, a pod outside the mesh, their DNS records, the mesh file);
//!   [`fixture()`] fills the mesh files several tests share (`tests/fixtures/`).
//!
//! Addresses are in [`addr`]; traffic stays inside the testbed's namespaces (docs/architecture.md, "Testbed rules").
//! What the testbed leaves to others: loading eBPF and running the agent (tests start it with
//! [`Node::command`]), and reading the workload files.

pub mod addr;
pub mod agent;
pub mod cni;
mod dns;
mod enter;
pub mod fixture;
mod host;
pub mod kubeapi;
pub mod kubelet;
mod netns;
mod node;
mod pod;
mod process;
pub mod scenario;
mod shared;
mod workload;

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher as _, Hasher as _};
use std::net::IpAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};

pub use fixture::fixture;
pub use host::{python_with_grpcio, require_tool};
pub use node::{NODE_BRIDGE, NODE_UNDERLAY_IF, Node, POD_IF};
pub use pod::{Pod, PodSpec};
pub use process::{Process, run, run_ok};
pub use scenario::{Scenario, Servers};
pub use shared::CleanupHandle;
pub use workload::WorkloadFile;

use shared::{Resources, Shared, lock};

/// Testbed-wide settings.
#[derive(Debug, Clone)]
pub struct TestbedOptions {
    /// TTL of every DNS answer, seconds (dnsmasq `--local-ttl`).
    pub dns_ttl: u32,
}

impl Default for TestbedOptions {
    fn default() -> Self {
        Self { dns_ttl: 2 }
    }
}

/// A set of nodes and pods on this machine. Dropping it removes everything it made.
pub struct Testbed {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Testbed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Testbed")
            .field("id", &self.shared.id)
            .field("test_name", &self.shared.test_name)
            .finish()
    }
}

/// A short id, unique per test and per run: 6 hex digits from the clock, the pid, a counter and
/// a randomly seeded hasher.
fn new_id(test_name: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write(test_name.as_bytes());
    h.write_u32(std::process::id());
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    format!("{:06x}", h.finish() & 0xff_ffff)
}

/// True if anything with this id exists already (another run picked the same id).
fn id_taken(id: &str, cgroup2: &Path) -> bool {
    let netns_prefix = format!("st{id}");
    let netns_taken = std::fs::read_dir("/run/netns")
        .map(|dir| {
            dir.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(&netns_prefix))
        })
        .unwrap_or(false);
    netns_taken || cgroup2.join(format!("strait-test-{id}")).exists()
}

/// A file-name-safe, short form of the test name.
fn slug(test_name: &str) -> String {
    let s: String = test_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    s.trim_matches('-').to_owned()
}

impl Testbed {
    /// A testbed with default options. Fails, saying what is missing, if the machine cannot
    /// host it (not root, no cgroup v2 mount, no `ip` or `dnsmasq`).
    pub fn new(test_name: &str) -> anyhow::Result<Self> {
        Self::with_options(test_name, TestbedOptions::default())
    }

    /// A testbed with `options`.
    pub fn with_options(test_name: &str, options: TestbedOptions) -> anyhow::Result<Self> {
        let host = host::preflight()?;
        let mut id = new_id(test_name);
        for _ in 0..16 {
            if !id_taken(&id, &host.cgroup2) {
                break;
            }
            id = new_id(test_name);
        }
        if id_taken(&id, &host.cgroup2) {
            bail!("BUG: could not find an unused testbed id after 16 tries");
        }
        let temp_dir = std::env::temp_dir().join(format!("strait-test-{id}-{}", slug(test_name)));
        let shared = Arc::new(Shared {
            test_name: test_name.to_owned(),
            cgroup_top: host.cgroup2.join(format!("strait-test-{id}")),
            cgroup2: host.cgroup2,
            log_dir: temp_dir.join("logs"),
            fabric_netns: format!("st{id}fab"),
            dns: dns::Dns {
                hosts_file: temp_dir.join("dns-hosts"),
                ttl: options.dns_ttl,
                records: Mutex::new(Default::default()),
            },
            temp_dir,
            id,
            topology: Mutex::new(Vec::new()),
            resources: Mutex::new(Resources::default()),
            teardown: Mutex::new(()),
        });
        // From here on, an error drops `tb`, which removes what was made so far.
        let tb = Testbed { shared };
        let s = &tb.shared;
        s.create_dir(&s.temp_dir)?;
        std::fs::create_dir_all(&s.log_dir)
            .with_context(|| format!("create {}", s.log_dir.display()))?;
        std::fs::write(
            s.temp_dir.join("TESTBED"),
            format!("id={}\ntest={}\n", s.id, s.test_name),
        )
        .context("write TESTBED note")?;
        dns::write_atomic(&s.dns.hosts_file, &dns::hosts_text(&Default::default()))?;
        s.create_cgroup(&s.cgroup_top)?;
        s.create_netns(&s.fabric_netns)?;
        netns::ip_in(&s.fabric_netns, &["link", "add", "br0", "type", "bridge"])?;
        netns::ip_in(&s.fabric_netns, &["link", "set", "br0", "up"])?;
        Ok(tb)
    }

    /// The id in every name this testbed makes (6 hex digits).
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// The test name given to `new`.
    pub fn test_name(&self) -> &str {
        &self.shared.test_name
    }

    /// The testbed's temp dir (logs, resolv.conf files, workload dirs, the DNS hosts file).
    pub fn temp_dir(&self) -> &Path {
        &self.shared.temp_dir
    }

    /// The directory of process logs (`<label>.out`, `<label>.err`).
    pub fn log_dir(&self) -> &Path {
        &self.shared.log_dir
    }

    /// The cgroup v2 mount in use (e.g. /sys/fs/cgroup/unified).
    pub fn cgroup2_mount(&self) -> &Path {
        &self.shared.cgroup2
    }

    /// `<cgroup2>/strait-test-<id>`, the parent of every node's cgroups.
    pub fn cgroup_dir(&self) -> &Path {
        &self.shared.cgroup_top
    }

    /// The underlay fabric's netns name.
    pub fn fabric_netns_name(&self) -> &str {
        &self.shared.fabric_netns
    }

    /// Adds a node (`name` is a DNS-1123 label; it names the node's cgroup and bpffs folder).
    pub fn add_node(&self, name: &str) -> anyhow::Result<Node> {
        self.add_node_with_driver(name, kubelet::CgroupDriver::Systemd)
    }

    /// Adds a node whose pods' cgroups are named by `driver` (kubelet's `--cgroup-driver`).
    pub fn add_node_with_driver(
        &self,
        name: &str,
        driver: kubelet::CgroupDriver,
    ) -> anyhow::Result<Node> {
        pod::validate_label("node name", name)?;
        if name.ends_with("-host") {
            bail!("node name `{name}` may not end in -host (reserved for the node's own cgroup)");
        }
        let mut topology = lock(&self.shared.topology);
        if topology.iter().any(|n| n.name == name) {
            bail!("node {name} already exists");
        }
        let index = u8::try_from(topology.len() + 1)
            .ok()
            .filter(|i| *i <= addr::MAX_NODES)
            .with_context(|| format!("a testbed holds at most {} nodes", addr::MAX_NODES))?;
        let node = node::create(&self.shared, name, index, driver, &topology)?;
        topology.push(node.inner.clone());
        Ok(node)
    }

    /// The nodes added so far, in index order.
    pub fn nodes(&self) -> Vec<Node> {
        lock(&self.shared.topology)
            .iter()
            .map(|inner| Node {
                inner: inner.clone(),
                shared: self.shared.clone(),
            })
            .collect()
    }

    /// Sets the addresses `name` resolves to on every node's DNS (replacing earlier ones), and
    /// returns once every node's dnsmasq has reloaded.
    pub fn dns_record(&self, name: &str, addrs: &[IpAddr]) -> anyhow::Result<()> {
        dns::validate_name(name)?;
        if addrs.is_empty() {
            bail!("a DNS record for {name} needs at least one address (use remove_dns_record)");
        }
        let mut records = lock(&self.shared.dns.records);
        records.insert(name.to_owned(), addrs.to_vec());
        self.publish_dns(&records)
            .with_context(|| format!("set DNS record {name} -> {addrs:?}"))
    }

    /// Removes `name` from every node's DNS (it then answers NXDOMAIN), and returns once every
    /// node's dnsmasq has reloaded.
    pub fn remove_dns_record(&self, name: &str) -> anyhow::Result<()> {
        let mut records = lock(&self.shared.dns.records);
        records.remove(name);
        self.publish_dns(&records)
            .with_context(|| format!("remove DNS record {name}"))
    }

    fn publish_dns(
        &self,
        records: &std::collections::BTreeMap<String, Vec<IpAddr>>,
    ) -> anyhow::Result<()> {
        dns::write_atomic(&self.shared.dns.hosts_file, &dns::hosts_text(records))?;
        let nodes = lock(&self.shared.topology).clone();
        for node in nodes {
            if let Some(process) = node.dns.get() {
                dns::reload(process, &self.shared.dns.hosts_file)
                    .with_context(|| format!("reload DNS on node {}", node.name))?;
            }
        }
        Ok(())
    }

    /// Spawns `cmd` (usually from [`Pod::command`] or [`Node::command`]) as a tracked process:
    /// stdin is null, stdout and stderr go to `<log_dir>/<label>.{out,err}`, and cleanup kills
    /// it. `label` names the logs; a repeated label gets a numeric suffix.
    pub fn spawn(&self, label: &str, cmd: &mut Command) -> anyhow::Result<Process> {
        let mut unique = slug(label);
        let mut n = 1;
        while self.shared.log_dir.join(format!("{unique}.err")).exists() && n < 10_000 {
            n += 1;
            unique = format!("{}-{n}", slug(label));
        }
        let process = Process::spawn(&unique, cmd, &self.shared.log_dir)?;
        self.shared.track(&process)?;
        Ok(process)
    }

    /// Starts the pod's sandbox: a long-lived process (`sleep infinity`) in its `pause`
    /// container cgroup and network namespace, as the container runtime's pause process is on
    /// a Kubernetes node. The Kubernetes pod source finds the pod's network namespace through
    /// it. Cleanup kills it.
    pub fn start_sandbox(&self, pod: &Pod) -> anyhow::Result<Process> {
        let label = format!("pause-{}-{}", pod.namespace(), pod.name());
        self.spawn(
            &label,
            pod.container_command("pause", "sleep").arg("infinity"),
        )
    }

    /// A handle that removes everything from another thread (a Ctrl-C handler). Idempotent.
    pub fn cleanup_handle(&self) -> CleanupHandle {
        CleanupHandle {
            shared: self.shared.clone(),
        }
    }

    /// Removes everything now and reports what could not be removed. Dropping the testbed does
    /// the same but can only print problems.
    pub fn cleanup(self) -> anyhow::Result<()> {
        self.shared.cleanup()
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The test failed: show what the processes said before their logs are removed.
            eprintln!(
                "testbed {} ({}) torn down after a panic; process output:\n{}",
                self.shared.id,
                self.shared.test_name,
                self.shared.log_tails()
            );
        }
        if let Err(e) = self.shared.cleanup() {
            eprintln!("{e:#}");
        }
    }
}

/// Polls `check` every 200 ms until it holds, for at most `timeout`; an error naming `what`
/// otherwise.
pub fn eventually(
    timeout: std::time::Duration,
    what: &str,
    mut check: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if check()? {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            bail!("{what}: not true after {timeout:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
