//! The benchmark's scenarios: what traffic (a [`Workload`]) takes which way (a [`Way`]) between
//! which pods (a [`Topology`]).
//!
//! Adding a scenario is one entry in [`all`]; the testbed in [`super::environment::Env`] builds what the
//! scenarios need once (both nodes, every server, both agents, the certificates), and
//! [`super::environment::Env::target`] says where each scenario's client connects.

/// What the client does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Workload {
    /// HTTP/1.1 keep-alive GETs of a small response (nginx): fixed-rate latency with our
    /// load generator, then maximum throughput with wrk.
    Http1,
    /// Maximum throughput only (wrk), for ratios between agent configurations.
    Http1Throughput,
    /// One TCP stream as fast as it goes (iperf3).
    TcpBulk,
    /// HTTP/2 (h2c, prior knowledge) GETs of a small response (nginx): fixed-rate latency with
    /// our HTTP/2 load generator, then maximum throughput with h2load.
    Http2,
    /// gRPC unary calls (Python grpcio server): fixed-rate latency with our HTTP/2 load
    /// generator speaking gRPC framing.
    GrpcUnary,
    /// As [`Workload::Http1`]'s fixed-rate runs (no throughput run), while one spinning
    /// process per CPU keeps the node busy, as other pods would (see `super::busy`).
    Http1BusyNode,
}

/// Which way the bytes go from the client pod to the server pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Way {
    /// To the server pod's address; no proxy.
    Direct,
    /// To a virtual service address; captured and forwarded by the strait agent(s).
    Strait {
        /// The client node's agent runs with `--fast-path on`.
        fast_path: bool,
        /// Protocol of the server's listener in the mesh file: `tcp` (L4) or `http`, `http2`,
        /// `grpc` (the L7 proxy).
        listener_protocol: &'static str,
        /// Cross node only: the listener is `tls` STRICT, so the agents carry the connection
        /// in their mTLS tunnel; otherwise the client's agent connects to the pod in plaintext.
        mtls: bool,
        /// `strait run --telemetry on|off` on the client's agent (`None`: the flag is not
        /// passed, the build's default).
        telemetry: Option<bool>,
        /// `strait run --worker-slice-us` on the client's agent (`None`: not passed).
        worker_slice_us: Option<u32>,
        /// The client's agent's threads run at this nice value (`None`: the default, 0): a
        /// larger CPU weight, as a larger CPU request gives a pod's cgroup.
        nice: Option<i32>,
    },
    /// Through two HAProxy processes, one per pod: per-pod sidecars.
    SidecarPair {
        /// TLS between the two sidecars. Without it, the pair is the fair comparator for
        /// same-node traffic, which strait does not encrypt.
        tls: bool,
    },
}

/// Where the client and server pods are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Topology {
    /// Both pods on node1.
    SameNode,
    /// The client on node1, the server on node2 (over the testbed's underlay).
    CrossNode,
}

#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Scenario {
    /// Stable id (JSON keys, file names).
    pub id: &'static str,
    /// Row label in its table of docs/benchmarks.md.
    pub label: &'static str,
    pub workload: Workload,
    pub way: Way,
    pub topology: Topology,
}

impl Scenario {
    /// The label in the latency plot, where every fixed-rate scenario shares one axis.
    pub fn plot_label(&self) -> String {
        let prefix = match (self.workload, self.topology) {
            (Workload::Http2, _) => "HTTP/2: ",
            (Workload::GrpcUnary, _) => "gRPC: ",
            (Workload::Http1BusyNode, _) => "busy node: ",
            (_, Topology::CrossNode) => "x-node: ",
            _ => "",
        };
        format!("{prefix}{}", self.label)
    }

    /// Its place in the report's tables and the plot (they group by way: no mesh, strait L4,
    /// strait L7, sidecars), which is not the order a round runs them in.
    pub fn display_rank(&self) -> (u8, u8) {
        let section = match (self.workload, self.topology) {
            (Workload::Http1, Topology::SameNode) => 0,
            (Workload::TcpBulk, _) => 1,
            (Workload::Http1, Topology::CrossNode) => 2,
            (Workload::Http2, _) => 3,
            (Workload::GrpcUnary, _) => 4,
            (Workload::Http1Throughput, _) => 5,
            (Workload::Http1BusyNode, _) => 6,
        };
        let way = match self.way {
            Way::Direct => 0,
            Way::Strait {
                fast_path,
                listener_protocol,
                mtls,
                telemetry,
                worker_slice_us,
                nice,
            } => {
                1 + u8::from(listener_protocol != "tcp") * 2 + u8::from(fast_path) - u8::from(mtls)
                    + u8::from(telemetry == Some(false))
                    + u8::from(worker_slice_us.is_some()) * 4
                    + u8::from(nice.is_some()) * 8
            }
            Way::SidecarPair { tls } => 10 - u8::from(tls),
        };
        (section, way)
    }

    /// The rates of its fixed-rate runs, out of the plan's.
    pub fn rates(&self, plan_rates: &[u32]) -> Vec<u32> {
        match self.workload {
            Workload::Http1 | Workload::Http2 | Workload::Http1BusyNode => plan_rates.to_vec(),
            // One Python grpcio server process saturates near a few thousand calls/s on this
            // machine; above that the latency is its queue, for every way alike.
            Workload::GrpcUnary => plan_rates.iter().copied().filter(|r| *r <= 1000).collect(),
            Workload::Http1Throughput | Workload::TcpBulk => Vec::new(),
        }
    }
}

const fn strait(fast_path: bool, listener_protocol: &'static str) -> Way {
    Way::Strait {
        fast_path,
        listener_protocol,
        mtls: false,
        telemetry: None,
        worker_slice_us: None,
        nice: None,
    }
}

/// The L4 or L7 way with the fast path, node1's agent asking for a `worker_slice_us` slice.
const fn strait_sliced(listener_protocol: &'static str, worker_slice_us: u32) -> Way {
    Way::Strait {
        fast_path: true,
        listener_protocol,
        mtls: false,
        telemetry: None,
        worker_slice_us: Some(worker_slice_us),
        nice: None,
    }
}

const fn scenario(
    id: &'static str,
    label: &'static str,
    workload: Workload,
    way: Way,
    topology: Topology,
) -> Scenario {
    Scenario {
        id,
        label,
        workload,
        way,
        topology,
    }
}

/// Every scenario, in the order a round runs them. The order keeps agent restarts few (the
/// client node's agent restarts only when its flags change) and puts each scenario's
/// comparison partners next to each other in time.
pub fn all() -> Vec<Scenario> {
    use Topology::{CrossNode, SameNode};
    use Workload::{GrpcUnary, Http1, Http1BusyNode, Http1Throughput, Http2, TcpBulk};
    vec![
        // The agent without the fast path.
        scenario(
            "http_direct",
            "direct (no mesh)",
            Http1,
            Way::Direct,
            SameNode,
        ),
        scenario(
            "http_strait",
            "strait L4 (tcp listener)",
            Http1,
            strait(false, "tcp"),
            SameNode,
        ),
        scenario(
            "http_strait_l7",
            "strait L7 (http listener)",
            Http1,
            strait(false, "http"),
            SameNode,
        ),
        scenario(
            "http_sidecars",
            "sidecar pair (HAProxy, TLS)",
            Http1,
            Way::SidecarPair { tls: true },
            SameNode,
        ),
        scenario(
            "http_sidecars_plain",
            "sidecar pair (HAProxy, no TLS)",
            Http1,
            Way::SidecarPair { tls: false },
            SameNode,
        ),
        scenario(
            "bulk_direct",
            "direct (no mesh)",
            TcpBulk,
            Way::Direct,
            SameNode,
        ),
        scenario(
            "bulk_strait",
            "strait",
            TcpBulk,
            strait(false, "tcp"),
            SameNode,
        ),
        // The agent with the fast path (the default).
        scenario(
            "bulk_strait_fast",
            "strait + fast path",
            TcpBulk,
            strait(true, "tcp"),
            SameNode,
        ),
        scenario(
            "http_strait_fast",
            "strait L4 + fast path",
            Http1,
            strait(true, "tcp"),
            SameNode,
        ),
        scenario(
            "http_strait_l7_fast",
            "strait L7 + fast path",
            Http1,
            strait(true, "http"),
            SameNode,
        ),
        scenario(
            "xnode_direct",
            "direct plaintext (no mesh)",
            Http1,
            Way::Direct,
            CrossNode,
        ),
        scenario(
            "xnode_strait_mtls",
            "strait, mTLS tunnel",
            Http1,
            Way::Strait {
                fast_path: true,
                listener_protocol: "http",
                mtls: true,
                telemetry: None,
                worker_slice_us: None,
                nice: None,
            },
            CrossNode,
        ),
        scenario(
            "xnode_strait_plain",
            "strait, plaintext",
            Http1,
            strait(true, "http"),
            CrossNode,
        ),
        scenario(
            "xnode_strait_mtls_tcp",
            "strait L4 (tcp listener), mTLS tunnel",
            Http1,
            Way::Strait {
                fast_path: true,
                listener_protocol: "tcp",
                mtls: true,
                telemetry: None,
                worker_slice_us: None,
                nice: None,
            },
            CrossNode,
        ),
        scenario(
            "xnode_sidecars",
            "sidecar pair (HAProxy, TLS)",
            Http1,
            Way::SidecarPair { tls: true },
            CrossNode,
        ),
        scenario(
            "h2_direct",
            "direct (no mesh)",
            Http2,
            Way::Direct,
            SameNode,
        ),
        scenario(
            "h2_strait",
            "strait (http2 listener)",
            Http2,
            strait(true, "http2"),
            SameNode,
        ),
        scenario(
            "grpc_direct",
            "direct (no mesh)",
            GrpcUnary,
            Way::Direct,
            SameNode,
        ),
        scenario(
            "grpc_strait",
            "strait (grpc listener)",
            GrpcUnary,
            strait(true, "grpc"),
            SameNode,
        ),
        // Telemetry on and off, back to back (each an agent restart).
        scenario(
            "telemetry_on",
            "strait L7 + fast path, --telemetry on",
            Http1Throughput,
            Way::Strait {
                fast_path: true,
                listener_protocol: "http",
                mtls: false,
                telemetry: Some(true),
                worker_slice_us: None,
                nice: None,
            },
            SameNode,
        ),
        scenario(
            "telemetry_off",
            "strait L7 + fast path, --telemetry off",
            Http1Throughput,
            Way::Strait {
                fast_path: true,
                listener_protocol: "http",
                mtls: false,
                telemetry: Some(false),
                worker_slice_us: None,
                nice: None,
            },
            SameNode,
        ),
        // A busy node: the agent's wake-ups wait behind other work, with the kernel's slice,
        // with the shortest one the workers can ask for (docs/operations.md), and with a
        // larger CPU weight.
        scenario(
            "busy_direct",
            "direct (no mesh)",
            Http1BusyNode,
            Way::Direct,
            SameNode,
        ),
        scenario(
            "busy_strait",
            "strait L4 + fast path",
            Http1BusyNode,
            strait(true, "tcp"),
            SameNode,
        ),
        scenario(
            "busy_strait_l7",
            "strait L7 + fast path",
            Http1BusyNode,
            strait(true, "http"),
            SameNode,
        ),
        scenario(
            "busy_strait_slice",
            "strait L4 + fast path, --worker-slice-us 100",
            Http1BusyNode,
            strait_sliced("tcp", 100),
            SameNode,
        ),
        scenario(
            "busy_strait_l7_slice",
            "strait L7 + fast path, --worker-slice-us 100",
            Http1BusyNode,
            strait_sliced("http", 100),
            SameNode,
        ),
        scenario(
            "busy_strait_l7_nice",
            "strait L7 + fast path, agent at nice -5",
            Http1BusyNode,
            Way::Strait {
                fast_path: true,
                listener_protocol: "http",
                mtls: false,
                telemetry: None,
                worker_slice_us: None,
                nice: Some(-5),
            },
            SameNode,
        ),
    ]
}

/// The mesh file of the strait scenarios (both agents read the same file).
///
/// - `client` (node1) calls `web`, `web2` and `web2-tls`; its client policy for `web2-tls`
///   presents its certificate and checks the server's SPIFFE ID.
/// - `web` (node1, same node): one listener per way through the agent: L4 `tcp` and bulk,
///   `http`, `http2`, `grpc`.
/// - `web2` (node2): an `http` listener without tls: plaintext between the nodes.
/// - `web2-tls` (node2): an `http` and a `tcp` listener with `tls` STRICT and client
///   validation: mutual TLS in the agents' tunnel, plaintext from outside the mesh refused.
///
/// Certificates and trust bundles are under `certs` (`strait ca issue` writes them).
pub fn mesh_yaml(certs: &std::path::Path) -> String {
    use super::environment::{
        BULK_PORT, GRPC_PORT, H2_PORT, HTTP_L7_PORT, HTTP_PORT, SERVICE, SERVICE2, SERVICE2_TLS,
    };
    let c = certs.display();
    format!(
        r#"apiVersion: appmesh.k8s.aws/v1beta2
kind: Mesh
metadata: {{name: bench}}
spec: {{egressFilter: {{type: ALLOW_ALL}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: client, namespace: bench}}
spec:
  podSelector: {{matchLabels: {{app: client}}}}
  backends:
    - virtualService: {{virtualServiceRef: {{name: web}}}}
    - virtualService: {{virtualServiceRef: {{name: web2}}}}
    - virtualService:
        virtualServiceRef: {{name: web2-tls}}
        clientPolicy:
          tls:
            enforce: true
            certificate: {{file: {{certificateChain: {c}/client.pem, privateKey: {c}/client-key.pem}}}}
            validation:
              trust: {{file: {{certificateChain: {c}/ca-bundle.pem}}}}
              subjectAlternativeNames: {{match: {{exact: [spiffe://bench/ns/bench/vn/web2-tls]}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: web, namespace: bench}}
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  listeners:
    - portMapping: {{port: {HTTP_PORT}, protocol: tcp}}
    - portMapping: {{port: {BULK_PORT}, protocol: tcp}}
    - portMapping: {{port: {HTTP_L7_PORT}, protocol: http}}
    - portMapping: {{port: {H2_PORT}, protocol: http2}}
    - portMapping: {{port: {GRPC_PORT}, protocol: grpc}}
  serviceDiscovery: {{dns: {{hostname: web-pods.bench.svc.cluster.local}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: web2, namespace: bench}}
spec:
  podSelector: {{matchLabels: {{app: web2}}}}
  listeners:
    - portMapping: {{port: {HTTP_L7_PORT}, protocol: http}}
  serviceDiscovery: {{dns: {{hostname: web2-pods.bench.svc.cluster.local}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: web2-tls, namespace: bench}}
spec:
  podSelector: {{matchLabels: {{app: web2-tls}}}}
  listeners:
    - portMapping: {{port: {HTTP_L7_PORT}, protocol: http}}
      tls:
        mode: STRICT
        certificate: {{file: {{certificateChain: {c}/web2-tls.pem, privateKey: {c}/web2-tls-key.pem}}}}
        validation:
          trust: {{file: {{certificateChain: {c}/ca-bundle.pem}}}}
          subjectAlternativeNames: {{match: {{exact: [spiffe://bench/ns/bench/vn/client]}}}}
    - portMapping: {{port: {HTTP_PORT}, protocol: tcp}}
      tls:
        mode: STRICT
        certificate: {{file: {{certificateChain: {c}/web2-tls.pem, privateKey: {c}/web2-tls-key.pem}}}}
        validation:
          trust: {{file: {{certificateChain: {c}/ca-bundle.pem}}}}
          subjectAlternativeNames: {{match: {{exact: [spiffe://bench/ns/bench/vn/client]}}}}
  serviceDiscovery: {{dns: {{hostname: web2-tls-pods.bench.svc.cluster.local}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {{name: web, namespace: bench}}
spec:
  awsName: {SERVICE}
  provider: {{virtualNode: {{virtualNodeRef: {{name: web}}}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {{name: web2, namespace: bench}}
spec:
  awsName: {SERVICE2}
  provider: {{virtualNode: {{virtualNodeRef: {{name: web2}}}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {{name: web2-tls, namespace: bench}}
spec:
  awsName: {SERVICE2_TLS}
  provider: {{virtualNode: {{virtualNodeRef: {{name: web2-tls}}}}}}
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

    #[test]
    fn grpc_runs_only_at_rates_one_server_process_sustains() {
        let grpc = all().into_iter().find(|s| s.id == "grpc_strait").unwrap();
        assert_eq!(grpc.rates(&[1000, 5000]), vec![1000]);
    }
}
