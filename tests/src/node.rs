//! Nodes: a network namespace with a bridge for its pods, a DNS server, a cgroup root for its
//! pods, a bpffs folder and a workloads directory for its agent, and a veth into the underlay
//! fabric so that pods on different nodes reach each other by address.
//!
//! The agent for a node is started with [`Node::command`]; it finds the node's pods through
//! the workload files and attaches its cgroup programs at [`Node::cgroup_root`].

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{Context as _, bail};

use crate::addr;
use crate::dns;
use crate::enter;
use crate::kubelet::{self, CgroupDriver, QosClass};
use crate::netns::{self, ip_in};
use crate::pod::{Pod, PodInner, PodSpec, validate_label};
use crate::process::Process;
use crate::shared::{Shared, lock};
use crate::workload::WorkloadFile;

/// The pods' bridge in a node's netns.
pub const NODE_BRIDGE: &str = "br0";
/// The node's underlay interface in its netns.
pub const NODE_UNDERLAY_IF: &str = "ul0";
/// A pod's interface in its netns.
pub const POD_IF: &str = "eth0";

pub(crate) struct NodeInner {
    pub(crate) name: String,
    pub(crate) index: u8,
    pub(crate) netns: String,
    pub(crate) cgroup_root: PathBuf,
    /// How pod and container cgroups below `cgroup_root` are named (kubelet's driver).
    pub(crate) cgroup_driver: CgroupDriver,
    /// Where processes started with `Node::command` live: a sibling of the cgroup root, so the
    /// agent and dnsmasq are outside the hooks and cleanup still finds them.
    pub(crate) host_cgroup: PathBuf,
    pub(crate) bpffs: PathBuf,
    pub(crate) dir: PathBuf,
    pub(crate) workloads_dir: PathBuf,
    pub(crate) resolv_conf: PathBuf,
    pub(crate) dns: OnceLock<Process>,
    /// Held while a pod is added, so indexes stay unique.
    pub(crate) pods: Mutex<Vec<Pod>>,
}

/// A node of the testbed. Cheap to clone; the testbed owns what it stands for.
#[derive(Clone)]
pub struct Node {
    pub(crate) inner: Arc<NodeInner>,
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.inner.name)
            .field("index", &self.inner.index)
            .field("netns", &self.inner.netns)
            .finish()
    }
}

/// Creates node `index` and links it into the underlay with routes to and from `others`.
pub(crate) fn create(
    shared: &Arc<Shared>,
    name: &str,
    index: u8,
    cgroup_driver: CgroupDriver,
    others: &[Arc<NodeInner>],
) -> anyhow::Result<Node> {
    let netns_name = format!("st{}n{index}", shared.id);
    let dir = shared.temp_dir.join(name);
    let inner = Arc::new(NodeInner {
        name: name.to_owned(),
        index,
        netns: netns_name.clone(),
        cgroup_root: shared.cgroup_top.join(name),
        cgroup_driver,
        host_cgroup: shared.cgroup_top.join(format!("{name}-host")),
        // bpffs names may not contain '.' (docs/architecture.md, "Platform facts"); ours never do.
        bpffs: Path::new(crate::host::BPFFS).join(format!("strait-test-{}-{name}", shared.id)),
        workloads_dir: dir.join("workloads"),
        resolv_conf: dir.join("resolv.conf"),
        dir,
        dns: OnceLock::new(),
        pods: Mutex::new(Vec::new()),
    });
    let node = Node {
        inner: inner.clone(),
        shared: shared.clone(),
    };
    let ns = netns_name.as_str();
    let ctx = || format!("create node {name} (netns {ns})");

    shared.create_netns(ns).with_context(ctx)?;
    netns::sysctls(
        ns,
        &[
            ("net/ipv4/ip_forward", "1"),
            ("net/ipv6/conf/all/forwarding", "1"),
        ],
    )
    .with_context(ctx)?;
    let br_v4 = format!("{}/24", addr::bridge_v4(index));
    let br_v6 = format!("{}/64", addr::bridge_v6(index));
    ip_in(
        ns,
        &[
            "link",
            "add",
            NODE_BRIDGE,
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ],
    )
    .with_context(ctx)?;
    ip_in(ns, &["addr", "add", &br_v4, "dev", NODE_BRIDGE]).with_context(ctx)?;
    ip_in(ns, &["addr", "add", &br_v6, "dev", NODE_BRIDGE, "nodad"]).with_context(ctx)?;
    ip_in(ns, &["link", "set", NODE_BRIDGE, "up"]).with_context(ctx)?;
    netns::service_ranges_unreachable(ns).with_context(ctx)?;

    // Underlay: a veth from the fabric's bridge into the node.
    let fabric_port = format!("vn{index}");
    let ul_v4 = format!("{}/{}", addr::underlay_v4(index), addr::UNDERLAY_PREFIX_V4);
    let ul_v6 = format!("{}/{}", addr::underlay_v6(index), addr::UNDERLAY_PREFIX_V6);
    let fab = shared.fabric_netns.as_str();
    ip_in(
        fab,
        &[
            "link",
            "add",
            &fabric_port,
            "type",
            "veth",
            "peer",
            "name",
            NODE_UNDERLAY_IF,
            "netns",
            ns,
        ],
    )
    .with_context(ctx)?;
    ip_in(fab, &["link", "set", &fabric_port, "master", "br0", "up"]).with_context(ctx)?;
    ip_in(ns, &["addr", "add", &ul_v4, "dev", NODE_UNDERLAY_IF]).with_context(ctx)?;
    ip_in(
        ns,
        &["addr", "add", &ul_v6, "dev", NODE_UNDERLAY_IF, "nodad"],
    )
    .with_context(ctx)?;
    ip_in(ns, &["link", "set", NODE_UNDERLAY_IF, "up"]).with_context(ctx)?;
    for other in others {
        route_pods_via_underlay(ns, other.index).with_context(ctx)?;
        route_pods_via_underlay(&other.netns, index).with_context(ctx)?;
    }

    // Cgroups, directories, the bpffs folder (created by the agent, removed by us).
    shared.create_cgroup(&inner.cgroup_root).with_context(ctx)?;
    shared.create_cgroup(&inner.host_cgroup).with_context(ctx)?;
    shared.own_bpffs(&inner.bpffs)?;
    std::fs::create_dir_all(&inner.workloads_dir)
        .with_context(|| format!("create {}", inner.workloads_dir.display()))?;
    std::fs::create_dir_all(inner.dir.join("pods"))
        .with_context(|| format!("create {}", inner.dir.join("pods").display()))?;
    dns::write_atomic(
        &inner.resolv_conf,
        &dns::resolv_conf(&node.dns_servers(), None),
    )?;

    // DNS.
    let args = dns::dnsmasq_args(
        &shared.dns,
        &node.dns_servers(),
        &inner.dir.join("dnsmasq.pid"),
    );
    let process = Process::spawn(
        &format!("dnsmasq-{name}"),
        node.command("dnsmasq").args(&args),
        &shared.log_dir,
    )?;
    shared.track(&process)?;
    dns::wait_read(&process, &shared.dns.hosts_file, 0)
        .with_context(|| format!("start DNS for node {name}"))?;
    let _ = inner.dns.set(process);
    Ok(node)
}

/// In `netns`, routes node `to`'s pod subnets via its underlay address.
fn route_pods_via_underlay(netns: &str, to: u8) -> anyhow::Result<()> {
    let v4 = format!("{}/24", addr::pod_subnet_v4(to));
    let v6 = format!("{}/64", addr::pod_subnet_v6(to));
    ip_in(
        netns,
        &[
            "route",
            "add",
            &v4,
            "via",
            &addr::underlay_v4(to).to_string(),
        ],
    )?;
    ip_in(
        netns,
        &[
            "-6",
            "route",
            "add",
            &v6,
            "via",
            &addr::underlay_v6(to).to_string(),
        ],
    )
}

impl Node {
    /// The node's name, as given to `Testbed::add_node`.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The node's index (1-based, in the order nodes were added); see [`crate::addr`].
    pub fn index(&self) -> u8 {
        self.inner.index
    }

    /// The netns name (as in `ip netns list`).
    pub fn netns_name(&self) -> &str {
        &self.inner.netns
    }

    /// The netns file, `/run/netns/<name>`.
    pub fn netns_path(&self) -> PathBuf {
        netns::path(&self.inner.netns)
    }

    /// The cgroup v2 directory under which this node's pods live: where the agent attaches its
    /// connect4/connect6/sock_ops programs.
    pub fn cgroup_root(&self) -> &Path {
        &self.inner.cgroup_root
    }

    /// How this node names its pods' cgroups.
    pub fn cgroup_driver(&self) -> CgroupDriver {
        self.inner.cgroup_driver
    }

    /// The cgroup of processes started with [`Node::command`] (a sibling of the cgroup root).
    pub fn host_cgroup(&self) -> &Path {
        &self.inner.host_cgroup
    }

    /// The agent's bpffs folder, `/sys/fs/bpf/strait-test-<id>-<node>`. The testbed does not
    /// create it (the agent does) but removes it, pins and all, on cleanup.
    pub fn bpffs(&self) -> &Path {
        &self.inner.bpffs
    }

    /// The directory of workload files the agent watches.
    pub fn workloads_dir(&self) -> &Path {
        &self.inner.workloads_dir
    }

    /// The node's resolv.conf (its own DNS).
    pub fn resolv_conf(&self) -> &Path {
        &self.inner.resolv_conf
    }

    /// The bridge's IPv4 address: the pods' gateway and DNS server, `10.244.<n>.1`.
    pub fn bridge_ipv4(&self) -> Ipv4Addr {
        addr::bridge_v4(self.inner.index)
    }

    /// The bridge's IPv6 address, `fd00:244:<n>::1`.
    pub fn bridge_ipv6(&self) -> Ipv6Addr {
        addr::bridge_v6(self.inner.index)
    }

    /// The node's underlay address, `192.0.2.<n>`.
    pub fn underlay_ip(&self) -> Ipv4Addr {
        addr::underlay_v4(self.inner.index)
    }

    /// The node's underlay address, IPv6, `fd00:ff::<n>`.
    pub fn underlay_ipv6(&self) -> Ipv6Addr {
        addr::underlay_v6(self.inner.index)
    }

    /// The addresses the node's DNS server listens on (port 53).
    pub fn dns_servers(&self) -> Vec<IpAddr> {
        vec![
            IpAddr::V4(self.bridge_ipv4()),
            IpAddr::V6(self.bridge_ipv6()),
        ]
    }

    /// The pid of the node's dnsmasq.
    pub fn dns_pid(&self) -> Option<u32> {
        self.inner.dns.get().map(Process::pid)
    }

    /// The pods added to this node so far.
    pub fn pods(&self) -> Vec<Pod> {
        lock(&self.inner.pods).clone()
    }

    /// A `Command` that runs `program` on the node: in the node's netns (via setns), with the
    /// node's resolv.conf as /etc/resolv.conf, in the node's host cgroup (outside the cgroup
    /// root, so the mesh's hooks do not apply to it). Start the agent with this.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        enter::command(
            program,
            &self.netns_path(),
            Some(&self.inner.host_cgroup),
            &self.inner.resolv_conf,
        )
    }

    /// Adds a pod: a netns with a veth to the node's bridge, the next free addresses, no default
    /// route (only the pod subnets and the unreachable service ranges), a pod cgroup with
    /// container cgroups below the node's cgroup root, laid out as kubelet does with the node's
    /// cgroup driver (see [`crate::kubelet`]), and a resolv.conf pointing at the node's DNS. The pod is not in the mesh
    /// until [`Node::write_workload`].
    pub fn add_pod(&self, spec: &PodSpec) -> anyhow::Result<Pod> {
        self.add_pod_with(spec, true, None)
    }

    /// Adds a pod with IPv4 address `ipv4` from [`addr::FLAT_POD_CIDR_V4`], the way EKS's VPC
    /// CNI places pods: no per-node range, so pods of different nodes interleave in one range,
    /// and the fabric (here a router on the underlay, as the VPC's) routes each address to its
    /// node. The pod's IPv6 address stays in its node's range.
    pub fn add_pod_at(&self, spec: &PodSpec, ipv4: Ipv4Addr) -> anyhow::Result<Pod> {
        let in_range = ipv4.octets()[..2] == [10, 245];
        if !in_range {
            bail!("{ipv4} is not in {}", addr::FLAT_POD_CIDR_V4);
        }
        let pod = self.add_pod_with(spec, true, Some(ipv4))?;
        let host = format!("{ipv4}/32");
        let fab = self.shared.fabric_netns.as_str();
        let router = format!("{}/{}", addr::FABRIC_ROUTER_V4, addr::UNDERLAY_PREFIX_V4);
        ip_in(fab, &["addr", "replace", &router, "dev", "br0"])?;
        netns::sysctls(fab, &[("net/ipv4/ip_forward", "1")])?;
        ip_in(
            fab,
            &[
                "route",
                "replace",
                &host,
                "via",
                &self.underlay_ip().to_string(),
            ],
        )?;
        ip_in(
            &self.inner.netns,
            &["route", "replace", &host, "dev", NODE_BRIDGE],
        )?;
        let router = addr::FABRIC_ROUTER_V4.to_string();
        for node in lock(&self.shared.topology).iter() {
            ip_in(
                &node.netns,
                &["route", "replace", addr::FLAT_POD_CIDR_V4, "via", &router],
            )?;
        }
        Ok(pod)
    }

    /// Adds a pod as the kubelet has it before the container runtime calls CNI: the network
    /// namespace (loopback up, the unreachable service ranges) and the cgroups, but no
    /// interface, address or route: a CNI chain gives it those (see [`crate::cni`]). The pod's
    /// addresses ([`Pod::ipv4`]) are the ones the chain is to assign.
    pub fn add_pod_for_cni(&self, spec: &PodSpec) -> anyhow::Result<Pod> {
        self.add_pod_with(spec, false, None)
    }

    fn add_pod_with(
        &self,
        spec: &PodSpec,
        network: bool,
        ipv4: Option<Ipv4Addr>,
    ) -> anyhow::Result<Pod> {
        validate_label("pod name", &spec.name)?;
        validate_label("namespace", &spec.namespace)?;
        let mut pods = lock(&self.inner.pods);
        if pods
            .iter()
            .any(|p| p.name() == spec.name && p.namespace() == spec.namespace)
        {
            bail!(
                "pod {}/{} already exists on node {}",
                spec.namespace,
                spec.name,
                self.inner.name
            );
        }
        let index = u8::try_from(pods.len())
            .ok()
            .and_then(|n| n.checked_add(addr::FIRST_POD))
            .filter(|i| *i <= addr::LAST_POD)
            .with_context(|| format!("node {} is full", self.inner.name))?;
        let node_index = self.inner.index;
        let key = format!("{}_{}", spec.namespace, spec.name);
        let uid = kubelet::pod_uid(&self.shared.id, &spec.namespace, &spec.name);
        let cgroups = kubelet::layout(
            &self.inner.cgroup_root,
            self.inner.cgroup_driver,
            QosClass::for_index(index),
            &uid,
        );
        let inner = PodInner {
            spec: spec.clone(),
            node_name: self.inner.name.clone(),
            index,
            netns: format!("{}p{index}", self.inner.netns),
            uid,
            cgroup: cgroups.pod.clone(),
            containers: cgroups.containers.clone(),
            resolv_conf: self
                .inner
                .dir
                .join("pods")
                .join(format!("{key}.resolv.conf")),
            ipv4: ipv4.unwrap_or_else(|| addr::pod_v4(node_index, index)),
            ipv6: addr::pod_v6(node_index, index),
        };
        let pod_ns = inner.netns.as_str();
        let ctx = || {
            format!(
                "create pod {}/{} on node {} (netns {pod_ns})",
                spec.namespace, spec.name, self.inner.name
            )
        };

        self.shared.create_netns(pod_ns).with_context(ctx)?;
        if network {
            self.connect_pod(&inner).with_context(ctx)?;
        }
        netns::service_ranges_unreachable(pod_ns).with_context(ctx)?;

        // The QoS cgroups are shared by the node's pods: the first pod that needs one makes it
        // (the pods lock is held, so no two pods race), and cleanup removes it after them.
        for parent in &cgroups.parents {
            if !parent.exists() {
                self.shared.create_cgroup(parent).with_context(ctx)?;
            }
        }
        self.shared.create_cgroup(&inner.cgroup).with_context(ctx)?;
        for container in &inner.containers {
            self.shared.create_cgroup(container).with_context(ctx)?;
        }
        dns::write_atomic(
            &inner.resolv_conf,
            &dns::resolv_conf(&self.dns_servers(), Some(&spec.namespace)),
        )
        .with_context(ctx)?;

        let pod = Pod {
            inner: Arc::new(inner),
        };
        pods.push(pod.clone());
        Ok(pod)
    }

    /// Adds a bare pod, for scale benchmarks that need more pods than a node's subnet holds: a
    /// network namespace with its loopback only (no interface, no route) and a pod cgroup,
    /// and the workload file to enroll it with ([`Node::write_workload_file`]), whose
    /// addresses (`10.250.0.0/16`, `fd00:250::/64`, by `n`) exist nowhere, so nothing can reach
    /// the pod from outside; the agent still sets it up in full (listeners in its namespace,
    /// inbound capture, cgroup). `n` must be unique on the node. Like every pod, create it
    /// before the agent starts (the agent does not see netns files mounted after it). Cleaned
    /// up with the testbed.
    pub fn add_bare_pod(
        &self,
        n: u16,
        labels: &BTreeMap<String, String>,
    ) -> anyhow::Result<WorkloadFile> {
        let name = format!("bare{n}");
        let pod_ns = format!("{}b{n}", self.inner.netns);
        let ctx = || format!("create bare pod {name} on node {}", self.inner.name);
        self.shared.create_netns(&pod_ns).with_context(ctx)?;
        let cgroup = self.inner.cgroup_root.join(format!("bare_{name}"));
        self.shared.create_cgroup(&cgroup).with_context(ctx)?;
        let [hi, lo] = n.to_be_bytes();
        let workload = WorkloadFile {
            name,
            namespace: "bare".to_owned(),
            labels: labels.clone(),
            ips: vec![
                IpAddr::V4(Ipv4Addr::new(10, 250, hi, lo)),
                IpAddr::V6(Ipv6Addr::new(0xfd00, 0x250, 0, 0, 0, 0, 0, n)),
            ],
            netns: netns::path(&pod_ns),
            cgroup,
        };
        Ok(workload)
    }

    /// Writes a workload file (atomically) into this node's workloads directory.
    pub fn write_workload_file(&self, workload: &WorkloadFile) -> anyhow::Result<PathBuf> {
        let path = self.inner.workloads_dir.join(workload.file_name());
        dns::write_atomic(&path, &serde_json::to_string_pretty(workload)?)?;
        Ok(path)
    }

    /// A veth from the node's bridge into the pod, the pod's addresses and its routes.
    fn connect_pod(&self, inner: &PodInner) -> anyhow::Result<()> {
        let pod_ns = inner.netns.as_str();
        let node_ns = self.inner.netns.as_str();
        let index = inner.index;
        let port = format!("vp{index}");
        ip_in(
            node_ns,
            &[
                "link", "add", &port, "type", "veth", "peer", "name", POD_IF, "netns", pod_ns,
            ],
        )?;
        ip_in(
            node_ns,
            &["link", "set", &port, "master", NODE_BRIDGE, "up"],
        )?;
        let gw4 = self.bridge_ipv4().to_string();
        let gw6 = self.bridge_ipv6().to_string();
        // A flat-range pod (add_pod_at) has only its own address; its gateway is on-link.
        let flat = inner.ipv4.octets()[..3] != addr::pod_subnet_v4(self.inner.index).octets()[..3];
        let v4 = format!("{}/{}", inner.ipv4, if flat { 32 } else { 24 });
        let v6 = format!("{}/64", inner.ipv6);
        ip_in(pod_ns, &["addr", "add", &v4, "dev", POD_IF])?;
        ip_in(pod_ns, &["addr", "add", &v6, "dev", POD_IF, "nodad"])?;
        ip_in(pod_ns, &["link", "set", POD_IF, "up"])?;
        if flat {
            ip_in(pod_ns, &["route", "add", &gw4, "dev", POD_IF])?;
        }
        // Other nodes' pods and the nodes' underlay addresses via our bridge (a Kubernetes pod
        // reaches both through its default route; an agent's plaintext cross-node connection
        // comes from its node's underlay address); deliberately no default route.
        for cidr in [
            addr::POD_CIDR_V4,
            addr::FLAT_POD_CIDR_V4,
            addr::UNDERLAY_CIDR_V4,
        ] {
            ip_in(pod_ns, &["route", "add", cidr, "via", &gw4])?;
        }
        for cidr in [addr::POD_CIDR_V6, addr::UNDERLAY_CIDR_V6] {
            ip_in(pod_ns, &["-6", "route", "add", cidr, "via", &gw6])?;
        }
        Ok(())
    }

    /// Where `pod`'s workload file lives.
    pub fn workload_path(&self, pod: &Pod) -> PathBuf {
        self.inner.workloads_dir.join(pod.workload().file_name())
    }

    /// Writes `pod`'s workload file (atomically), enrolling it in the mesh.
    pub fn write_workload(&self, pod: &Pod) -> anyhow::Result<PathBuf> {
        if pod.node_name() != self.inner.name {
            bail!(
                "pod {} is on node {}, not {}",
                pod.name(),
                pod.node_name(),
                self.inner.name
            );
        }
        let path = self.workload_path(pod);
        let json = serde_json::to_string_pretty(&pod.workload())?;
        dns::write_atomic(&path, &json)?;
        Ok(path)
    }

    /// Removes `pod`'s workload file; a missing file is fine.
    pub fn remove_workload(&self, pod: &Pod) -> anyhow::Result<()> {
        let path = self.workload_path(pod);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("remove {}", path.display()))
            }
            _ => Ok(()),
        }
    }
}
