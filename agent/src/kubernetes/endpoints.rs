//! Which node an endpoint is on, and how to reach that node's agent, from the API (`--kubernetes`).
//!
//! On EKS pod addresses come from the VPC (AWS VPC CNI): a node has no pod range of its own, so
//! `--peer-node CIDR=ADDR` cannot describe the cluster. Instead the agent watches every Pod of
//! the cluster (kept trimmed to what is needed here: `status.podIPs`, `spec.nodeName`, and
//! whether it is a ready strait agent) and every Node (its `InternalIP` addresses), and keeps a
//! [`Directory`] from pod address to node:
//!
//! - the pod's node runs a ready strait agent: the endpoint is reached through the mTLS tunnel
//!   to that node's `InternalIP` (of the endpoint's address family when it has one) on the
//!   tunnel port (this agent's own `--tunnel-listen` port: every agent of the DaemonSet is
//!   started with the same arguments);
//! - it runs none: [`Location::NoAgent`], reached the way the listener's TLS mode allows
//!   (`proxy::upstream`).
//!
//! "Runs a ready strait agent" means: a Pod on that node with the agent's labels
//! (`--agent-pod-labels`, the DaemonSet's pod template labels), on the host network, whose
//! `Ready` condition is `True` (kubelet sets it from the agent's `/ready` probe). This needs no
//! write access to the API (no node label or annotation set by the agent) and follows the
//! agent's life: a node whose agent is gone, not yet started or not ready is a node without
//! one. A node joining or leaving changes the directory as its Node and Pod objects come and
//! go; no agent is restarted. See docs/kubernetes.md, "Where endpoints live".

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt as _;
use kube::runtime::watcher::{self, Event};

/// The directory as last built, shared with the transport.
pub type Shared = Arc<ArcSwap<Directory>>;

/// The labels the DaemonSet's pod template gives the agent (deploy/daemonset.yaml).
pub const DEFAULT_AGENT_LABELS: &str = "app.kubernetes.io/name=strait";

/// Where a remote endpoint lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// On a node whose strait agent is ready: its tunnel address.
    Agent {
        pod: String,
        node: String,
        tunnel: SocketAddr,
    },
    /// On a node without a ready strait agent (or one whose Node object has no InternalIP).
    NoAgent {
        pod: String,
        node: String,
        why: &'static str,
    },
    /// On this node (but not a pod this agent enrolled).
    ThisNode { pod: String },
}

/// Pod address to node, and node to agent tunnel address.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Directory {
    pods: HashMap<IpAddr, (String, String)>,
    /// Node name to its InternalIP addresses, for nodes with a ready agent.
    agents: HashMap<String, Vec<IpAddr>>,
    /// Nodes whose Node object is known.
    nodes: HashMap<String, Vec<IpAddr>>,
    own_node: String,
    tunnel_port: u16,
}

impl Directory {
    /// Where the pod with address `ip` lives, if the API knows such a pod.
    pub fn locate(&self, ip: IpAddr) -> Option<Location> {
        let (pod, node) = self.pods.get(&ip.to_canonical())?;
        let pod = pod.clone();
        if *node == self.own_node {
            return Some(Location::ThisNode { pod });
        }
        let node = node.clone();
        let Some(addresses) = self.nodes.get(&node) else {
            return Some(Location::NoAgent {
                pod,
                node,
                why: "the API has no Node object of that name",
            });
        };
        if !self.agents.contains_key(&node) {
            return Some(Location::NoAgent {
                pod,
                node,
                why: "no ready strait agent pod runs there",
            });
        }
        let same_family = addresses
            .iter()
            .find(|a| a.is_ipv4() == ip.to_canonical().is_ipv4());
        match same_family.or(addresses.first()) {
            Some(address) => Some(Location::Agent {
                pod,
                node,
                tunnel: SocketAddr::new(*address, self.tunnel_port),
            }),
            None => Some(Location::NoAgent {
                pod,
                node,
                why: "its Node object has no InternalIP address",
            }),
        }
    }
}

/// What is kept of a Pod: its addresses and node, and whether it is a ready agent.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PodAt {
    node: String,
    ips: Vec<IpAddr>,
    /// Not terminating: wins over a terminating pod with the same address.
    current: bool,
    ready_agent: bool,
}

/// Which labels make a pod a strait agent: `key=value[,key=value...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentLabels(Vec<(String, String)>);

impl std::str::FromStr for AgentLabels {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let pairs = s
            .split(',')
            .map(|pair| {
                let (key, value) = pair.split_once('=').ok_or_else(|| {
                    format!("`{pair}`: expected LABEL=VALUE[,LABEL=VALUE...], e.g. {DEFAULT_AGENT_LABELS}")
                })?;
                let (key, value) = (key.trim(), value.trim());
                if key.is_empty() {
                    return Err(format!("`{pair}`: the label name is empty"));
                }
                Ok((key.to_string(), value.to_string()))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(AgentLabels(pairs))
    }
}

impl AgentLabels {
    pub fn select(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// Every Pod of the cluster, trimmed, as last listed and watched (a relist replaces them only
/// once complete; an error changes nothing, as for the node's own pods).
pub struct Pods {
    items: BTreeMap<(String, String), PodAt>,
    relist: Option<BTreeMap<(String, String), PodAt>>,
    pub synced: bool,
    failing: bool,
    agent_labels: AgentLabels,
}

impl Pods {
    pub fn new(agent_labels: AgentLabels) -> Pods {
        Pods {
            items: BTreeMap::new(),
            relist: None,
            synced: false,
            failing: false,
            agent_labels,
        }
    }

    fn trim(&self, pod: &Pod) -> Option<((String, String), PodAt)> {
        let key = (pod.namespace().unwrap_or_default(), pod.name_any());
        let spec = pod.spec.as_ref()?;
        let node = spec.node_name.clone()?;
        let status = pod.status.as_ref();
        let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
        if matches!(phase, "Succeeded" | "Failed") {
            // Its address may already be another pod's.
            return None;
        }
        let host_network = spec.host_network == Some(true);
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let ready_agent = host_network && ready && self.agent_labels.select(pod.labels());
        // A host-network pod's address is its node's, not an endpoint of its own.
        let ips = if host_network {
            Vec::new()
        } else {
            super::pod_ips(pod)
                .into_iter()
                .map(|ip| ip.to_canonical())
                .collect()
        };
        if ips.is_empty() && !ready_agent {
            return None;
        }
        Some((
            key,
            PodAt {
                node,
                ips,
                current: pod.metadata.deletion_timestamp.is_none(),
                ready_agent,
            },
        ))
    }

    /// Applies one watcher event; true if what is kept changed.
    pub fn apply(&mut self, event: Result<Event<Pod>, watcher::Error>) -> bool {
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                if !self.failing {
                    tracing::warn!(error = %super::error_chain(&error), "Kubernetes API: cannot list or watch the cluster's pods (where endpoints live); retrying with backoff; they stay as last seen");
                }
                self.failing = true;
                return false;
            }
        };
        self.failing = false;
        match event {
            Event::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            Event::InitApply(pod) => {
                if let Some((key, at)) = self.trim(&pod) {
                    self.relist.get_or_insert_default().insert(key, at);
                }
                false
            }
            Event::InitDone => {
                let items = self.relist.take().unwrap_or_default();
                let changed = items != self.items || !self.synced;
                self.items = items;
                self.synced = true;
                changed
            }
            Event::Apply(pod) => {
                let key = (pod.namespace().unwrap_or_default(), pod.name_any());
                match self.trim(&pod) {
                    Some((key, at)) => self.items.insert(key, at.clone()) != Some(at),
                    None => self.items.remove(&key).is_some(),
                }
            }
            Event::Delete(pod) => self
                .items
                .remove(&(pod.namespace().unwrap_or_default(), pod.name_any()))
                .is_some(),
        }
    }
}

/// The InternalIP addresses of each node.
pub fn node_addresses(nodes: &BTreeMap<(String, String), Node>) -> HashMap<String, Vec<IpAddr>> {
    nodes
        .values()
        .map(|node| {
            let addresses = node
                .status
                .as_ref()
                .and_then(|s| s.addresses.as_ref())
                .into_iter()
                .flatten()
                .filter(|a| a.type_ == "InternalIP")
                .filter_map(|a| a.address.parse::<IpAddr>().ok())
                .collect();
            (node.name_any(), addresses)
        })
        .collect()
}

/// Builds the directory from the cluster's pods and the nodes' addresses.
pub fn build(
    pods: &Pods,
    nodes: HashMap<String, Vec<IpAddr>>,
    own_node: &str,
    tunnel_port: u16,
) -> Directory {
    let mut by_ip: HashMap<IpAddr, (String, String, bool)> = HashMap::new();
    let mut agents = HashMap::new();
    for ((namespace, name), at) in &pods.items {
        if at.ready_agent {
            agents.insert(at.node.clone(), Vec::new());
        }
        for ip in &at.ips {
            // Two pods with one address: a terminating pod and its address's next owner.
            // The current one wins; between equals, the first by name (stable).
            if by_ip
                .get(ip)
                .is_some_and(|(_, _, current)| *current || !at.current)
            {
                continue;
            }
            by_ip.insert(
                *ip,
                (format!("{namespace}/{name}"), at.node.clone(), at.current),
            );
        }
    }
    Directory {
        pods: by_ip
            .into_iter()
            .map(|(ip, (pod, node, _))| (ip, (pod, node)))
            .collect(),
        agents,
        nodes,
        own_node: own_node.to_string(),
        tunnel_port,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    fn app(name: &str, node: &str, ip: &str) -> Pod {
        pod(serde_json::json!({
            "metadata": {"name": name, "namespace": "shop", "labels": {"app": "cart"}},
            "spec": {"nodeName": node, "containers": []},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
        }))
    }

    fn agent(node: &str, ready: bool) -> Pod {
        pod(serde_json::json!({
            "metadata": {"name": format!("strait-{node}"), "namespace": "strait",
                         "labels": {"app.kubernetes.io/name": "strait"}},
            "spec": {"nodeName": node, "hostNetwork": true, "containers": []},
            "status": {"phase": "Running", "podIP": "192.0.2.9",
                       "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}
        }))
    }

    fn nodes() -> HashMap<String, Vec<IpAddr>> {
        [
            ("n1".to_string(), vec!["192.0.2.1".parse().unwrap()]),
            (
                "n2".to_string(),
                vec!["fd00:ff::2".parse().unwrap(), "192.0.2.2".parse().unwrap()],
            ),
            ("n3".to_string(), vec!["192.0.2.3".parse().unwrap()]),
        ]
        .into()
    }

    fn listed(objects: Vec<Pod>) -> Pods {
        let mut pods = Pods::new(DEFAULT_AGENT_LABELS.parse().unwrap());
        pods.apply(Ok(Event::Init));
        for object in objects {
            pods.apply(Ok(Event::InitApply(object)));
        }
        assert!(pods.apply(Ok(Event::InitDone)));
        pods
    }

    #[test]
    fn a_flat_range_is_located_by_pod_and_node_objects() {
        // EKS-style: interleaved addresses of one range on three nodes.
        let pods = listed(vec![
            app("a", "n1", "10.0.0.10"),
            app("b", "n2", "10.0.0.11"),
            app("c", "n3", "10.0.0.12"),
            agent("n1", true),
            agent("n2", true),
            agent("n3", false),
        ]);
        let directory = build(&pods, nodes(), "n1", 15008);
        assert_eq!(
            directory.locate("10.0.0.11".parse().unwrap()),
            Some(Location::Agent {
                pod: "shop/b".into(),
                node: "n2".into(),
                // The endpoint's family, though IPv6 is listed first.
                tunnel: "192.0.2.2:15008".parse().unwrap(),
            })
        );
        assert_eq!(
            directory.locate("10.0.0.10".parse().unwrap()),
            Some(Location::ThisNode {
                pod: "shop/a".into()
            })
        );
        // n3's agent is not ready: a node without an agent.
        assert!(matches!(
            directory.locate("10.0.0.12".parse().unwrap()),
            Some(Location::NoAgent { node, .. }) if node == "n3"
        ));
        // Not a pod: the agent's host-network address is not an endpoint.
        assert_eq!(directory.locate("192.0.2.9".parse().unwrap()), None);
        assert_eq!(directory.locate("10.0.0.99".parse().unwrap()), None);
    }

    #[test]
    fn a_moved_or_deleted_pod_and_a_reused_address_follow_the_api() {
        let mut pods = listed(vec![
            app("b", "n2", "10.0.0.11"),
            agent("n2", true),
            agent("n3", true),
        ]);
        // Deleted, its address now another pod's on n3.
        assert!(pods.apply(Ok(Event::Delete(app("b", "n2", "10.0.0.11")))));
        assert_eq!(
            build(&pods, nodes(), "n1", 15008).locate("10.0.0.11".parse().unwrap()),
            None
        );
        assert!(pods.apply(Ok(Event::Apply(app("b2", "n3", "10.0.0.11")))));
        let at = build(&pods, nodes(), "n1", 15008).locate("10.0.0.11".parse().unwrap());
        assert!(matches!(at, Some(Location::Agent { node, .. }) if node == "n3"));
        // A terminating pod with the same address loses to the current one.
        let old = pod(serde_json::json!({
            "metadata": {"name": "a-old", "namespace": "shop",
                         "deletionTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"nodeName": "n2", "containers": []},
            "status": {"phase": "Running", "podIP": "10.0.0.11"}
        }));
        assert!(pods.apply(Ok(Event::Apply(old))));
        let at = build(&pods, nodes(), "n1", 15008).locate("10.0.0.11".parse().unwrap());
        assert!(matches!(at, Some(Location::Agent { node, .. }) if node == "n3"));
        // A finished pod's address is not its own any more.
        let mut done = app("b2", "n3", "10.0.0.11");
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        assert!(pods.apply(Ok(Event::Apply(done))));
        let at = build(&pods, nodes(), "n1", 15008).locate("10.0.0.11".parse().unwrap());
        assert!(matches!(at, Some(Location::Agent { node, .. }) if node == "n2"));
        // The agent of n2 leaves: a node without an agent.
        assert!(pods.apply(Ok(Event::Delete(agent("n2", true)))));
        let at = build(&pods, nodes(), "n1", 15008).locate("10.0.0.11".parse().unwrap());
        assert!(matches!(at, Some(Location::NoAgent { node, .. }) if node == "n2"));
    }

    #[test]
    fn agent_labels_parse() {
        let labels: AgentLabels = "a=b, c=d".parse().unwrap();
        assert!(labels.select(&[("a".into(), "b".into()), ("c".into(), "d".into())].into()));
        assert!(!labels.select(&[("a".into(), "b".into())].into()));
        assert!("a".parse::<AgentLabels>().is_err());
        assert!("=b".parse::<AgentLabels>().is_err());
    }
}
