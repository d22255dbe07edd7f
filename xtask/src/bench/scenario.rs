//! The benchmark's scenarios: what traffic (a [`Workload`]) takes which way (a [`Way`]).
//!
//! Adding a scenario is one entry in [`all`]:
//! - the L7 proxy: a `Way::Strait` whose `listener_protocol` is `http` (the mesh file switches
//!   the web listener's protocol; nothing else changes);
//! - cross node: a [`Topology::CrossNode`] (the client pod on a second node; `Way::Strait`
//!   then goes over the agents' mTLS tunnel, `Way::SidecarPair` over TLS between the nodes);
//! - HTTP/2 and gRPC: a new [`Workload`] whose measurement calls h2load or a gRPC client in
//!   [`super::measure`].
//!
//! The testbed in [`super::Env`] builds what the scenarios need once.

/// What the client does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Workload {
    /// HTTP/1.1 keep-alive GETs of a small response (nginx): fixed-rate latency with our
    /// load generator, then maximum throughput with wrk.
    Http1,
    /// One TCP stream as fast as it goes (iperf3).
    TcpBulk,
}

/// Which way the bytes go from the client pod to the server pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Way {
    /// To the server pod's address; no proxy.
    Direct,
    /// To the virtual service address; captured and forwarded by the strait agent.
    Strait {
        fast_path: bool,
        /// Protocol of the server's listeners in the mesh file (`tcp` today: L4).
        listener_protocol: &'static str,
    },
    /// Through two HAProxy processes, one per pod, TLS between them: per-pod sidecars.
    SidecarPair,
}

/// Where the client and server pods are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Topology {
    SameNode,
}

#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Scenario {
    /// Stable id (JSON keys, file names).
    pub id: &'static str,
    /// Column/row label in docs/benchmarks.md.
    pub label: &'static str,
    pub workload: Workload,
    pub way: Way,
    pub topology: Topology,
}

const STRAIT_L4: Way = Way::Strait {
    fast_path: false,
    listener_protocol: "tcp",
};
const STRAIT_L4_FAST: Way = Way::Strait {
    fast_path: true,
    listener_protocol: "tcp",
};

/// Every scenario, in the order a round runs them.
pub fn all() -> Vec<Scenario> {
    use Topology::SameNode;
    use Workload::{Http1, TcpBulk};
    vec![
        Scenario {
            id: "http_direct",
            label: "direct (no mesh)",
            workload: Http1,
            way: Way::Direct,
            topology: SameNode,
        },
        Scenario {
            id: "http_strait",
            label: "strait",
            workload: Http1,
            way: STRAIT_L4,
            topology: SameNode,
        },
        Scenario {
            id: "http_strait_fast",
            label: "strait + fast path",
            workload: Http1,
            way: STRAIT_L4_FAST,
            topology: SameNode,
        },
        Scenario {
            id: "http_sidecars",
            label: "sidecar pair (HAProxy, TLS)",
            workload: Http1,
            way: Way::SidecarPair,
            topology: SameNode,
        },
        Scenario {
            id: "bulk_direct",
            label: "direct (no mesh)",
            workload: TcpBulk,
            way: Way::Direct,
            topology: SameNode,
        },
        Scenario {
            id: "bulk_strait",
            label: "strait",
            workload: TcpBulk,
            way: STRAIT_L4,
            topology: SameNode,
        },
        Scenario {
            id: "bulk_strait_fast",
            label: "strait + fast path",
            workload: TcpBulk,
            way: STRAIT_L4_FAST,
            topology: SameNode,
        },
    ]
}

/// The mesh file of the strait scenarios: `client` calls the `web` virtual service, whose
/// virtual node listens on the HTTP port (with `http_protocol`) and the bulk port (tcp).
pub fn mesh_yaml(service: &str, http_port: u16, bulk_port: u16, http_protocol: &str) -> String {
    format!(
        r#"apiVersion: appmesh.k8s.aws/v1beta2
kind: Mesh
metadata:
  name: bench
spec:
  egressFilter:
    type: ALLOW_ALL
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata:
  name: client
  namespace: bench
spec:
  podSelector:
    matchLabels:
      app: client
  backends:
    - virtualService:
        virtualServiceRef:
          name: web
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata:
  name: web
  namespace: bench
spec:
  podSelector:
    matchLabels:
      app: web
  listeners:
    - portMapping:
        port: {http_port}
        protocol: {http_protocol}
    - portMapping:
        port: {bulk_port}
        protocol: tcp
  serviceDiscovery:
    dns:
      hostname: web-pods.bench.svc.cluster.local
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata:
  name: web
  namespace: bench
spec:
  awsName: {service}
  provider:
    virtualNode:
      virtualNodeRef:
        name: web
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique() {
        let all = all();
        let mut ids: Vec<_> = all.iter().map(|s| s.id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), all.len());
    }
}
