//! Connections from the agent to a virtual node's endpoints.
//!
//! Every path that leaves the agent towards a workload (L4 forwarding, the HTTP proxy's
//! connection pool) connects through [`connect_target`], so the choice of how to reach an
//! endpoint lives in one place:
//!
//! - **A pod on this node** (its address is in [`Transport`]'s local pods): the agent connects
//!   from inside that pod's network namespace to its loopback, on the listener port. Nothing
//!   leaves the node, and no TLS is spoken: both ends are pods this agent enrolled, identified
//!   by kernel facts (the cgroup and netns the agent itself set up), not by anything a pod
//!   says, and the bytes never cross a wire an attacker could tap without already owning the
//!   node's kernel (see docs/security.md). The backend rule is still checked, and so is the
//!   target listener's `validation.subjectAlternativeNames`, against the caller's identities
//!   (what a tunnel checks on the caller's certificate).
//! - **A pod on another node, TLS in play** (the target listener has `tls` STRICT or
//!   PERMISSIVE, or the caller's client policy enforces TLS on that port): an HTTP/2 CONNECT
//!   stream through the mutual-TLS tunnel to that node's agent ([`super::hbone`]), pooled per
//!   (source identity, destination node, destination listener). The node's agent is found
//!   from the Pod and Node objects with `--kubernetes` ([`crate::kubernetes::endpoints`]),
//!   else from `--peer-node`. With no agent in front of the endpoint (a node without one, a
//!   pod of this node that is not enrolled, an address no Pod has), a PERMISSIVE listener is
//!   reached in plain TCP (it accepts plaintext) unless the caller's client policy enforces
//!   TLS; a STRICT one is refused, with the reason.
//! - **Otherwise** (no TLS configured on either side): a plain TCP connection to the endpoint,
//!   as App Mesh would.
//!
//! The stream type is boxed ([`Stream`]) because a tunnel stream is not a `TcpStream`; that is
//! the only change callers see besides passing the [`Caller`].

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::{Context, admission, hbone};
use crate::identity::policy::Policy;
use crate::identity::{self, AuthzLabels};
use crate::mesh::{ResourceId, TlsMode};
use crate::netns;
use crate::routing::{Endpoints, Target};
use crate::state::{Published, State};

/// How long a connect to one endpoint may take before the next endpoint is tried.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// At most this many endpoints are tried for one connection (App Mesh's default retry policy
/// retries connect failures twice).
pub const CONNECT_ATTEMPTS: usize = 3;

/// A byte stream to an endpoint: a TCP connection or a tunnel stream.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Whether the way to an endpoint is going away: a tunnel connection whose peer agent drains
/// (it said GOAWAY). The stream itself goes on until the peer's drain timeout.
pub type GoingAway = Arc<dyn Fn() -> bool + Send + Sync>;

/// A boxed [`Io`], and for a tunnel stream how to tell that its tunnel is going away (so a
/// pooled HTTP connection over it takes no new request: see `http::pool`).
pub struct Stream {
    io: Box<dyn Io>,
    pub going_away: Option<GoingAway>,
}

impl Stream {
    pub fn new(io: impl Io + 'static) -> Stream {
        Stream {
            io: Box::new(io),
            going_away: None,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut *self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut *self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Why no endpoint could be reached.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("virtual node {0} has no endpoints (check its serviceDiscovery)")]
    NoEndpoints(String),
    #[error(
        "no endpoint of virtual node {virtual_node} accepted a connection (tried {tried}); last error: {last}"
    )]
    Unreachable {
        virtual_node: String,
        tried: usize,
        last: String,
    },
    #[error(
        "virtual node {source_node} may not reach {target_node} through {service}: it is not \
         reachable through the backends the virtual node lists (App Mesh `backends`)"
    )]
    NotABackend {
        source_node: String,
        service: String,
        target_node: String,
    },
}

/// Who is calling, for identity and authorization.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    pub workload: &'a ResourceId,
    pub virtual_node: &'a ResourceId,
    /// The virtual service the workload called.
    pub service: &'a ResourceId,
}

/// A pod enrolled on this node.
#[derive(Debug)]
pub struct LocalPod {
    pub workload: ResourceId,
    pub virtual_node: ResourceId,
    pub ips: Vec<IpAddr>,
    /// Opens connections from inside the pod's network namespace.
    pub connector: netns::Connector,
}

impl LocalPod {
    /// Connects to the pod's own loopback on `port` (the address family of `like`).
    pub async fn connect_loopback(&self, like: IpAddr, port: u16) -> std::io::Result<TcpStream> {
        let lo = match like.to_canonical() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        };
        self.connector
            .connect(SocketAddr::new(lo, port), CONNECT_TIMEOUT)
            .await
    }
}

/// Another node's agent: the pod addresses it hosts and its tunnel address
/// (`--peer-node CIDR=ADDR[:PORT]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerNode {
    pub network: IpAddr,
    pub prefix: u8,
    pub tunnel: SocketAddr,
}

impl PeerNode {
    fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let bits = u32::from(self.prefix.min(32));
                let mask = if bits == 0 {
                    0
                } else {
                    u32::MAX << (32 - bits)
                };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let bits = u32::from(self.prefix.min(128));
                let mask = if bits == 0 {
                    0
                } else {
                    u128::MAX << (128 - bits)
                };
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for PeerNode {
    type Err = String;

    /// `10.244.2.0/24=192.0.2.2` or `10.244.2.0/24=192.0.2.2:15008`.
    fn from_str(s: &str) -> Result<Self, String> {
        let usage = || format!("`{s}`: expected CIDR=ADDRESS[:PORT], e.g. 10.244.2.0/24=192.0.2.2");
        let (cidr, addr) = s.split_once('=').ok_or_else(usage)?;
        let (network, prefix) = cidr.split_once('/').ok_or_else(usage)?;
        let network: IpAddr = network.parse().map_err(|_| usage())?;
        let prefix: u8 = prefix.parse().map_err(|_| usage())?;
        let tunnel = match addr.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => SocketAddr::new(addr.parse().map_err(|_| usage())?, hbone::PORT),
        };
        Ok(PeerNode {
            network,
            prefix,
            tunnel,
        })
    }
}

/// The node-wide transport state: local pods, peer nodes, the security policy, certificates
/// and the tunnel pool.
pub struct Transport {
    /// The state in force (policy, table, access logs): readers take one snapshot each.
    pub state: Arc<Published>,
    pub store: identity::store::Store,
    pub metrics: identity::Metrics,
    pub pool: hbone::Pool,
    /// Tunnel keepalive settings.
    pub tunnel: hbone::Settings,
    /// Destination-side limits of local pods' listeners (`connectionPool`, `rateLimit`).
    pub admission: admission::Admission,
    /// Local virtual nodes whose certificate was refused, reported once per cause.
    pub refusals: identity::local::Refusals,
    local: RwLock<HashMap<IpAddr, Arc<LocalPod>>>,
    peers: Vec<PeerNode>,
    /// Which node each pod address is on, from the Kubernetes API (`--kubernetes`).
    endpoints: Option<crate::kubernetes::endpoints::Shared>,
}

/// How a remote endpoint is reached when TLS is in play.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Remote {
    /// Through the tunnel to this agent address.
    Agent(SocketAddr),
    /// No strait agent is in front of it: why not.
    NoAgent(String),
}

impl Transport {
    pub fn new(
        peers: Vec<PeerNode>,
        metrics: identity::Metrics,
        state: Arc<Published>,
    ) -> Transport {
        Transport {
            state,
            store: identity::store::Store::new(metrics.clone()),
            metrics,
            pool: hbone::Pool::default(),
            tunnel: hbone::Settings::default(),
            admission: admission::Admission::default(),
            refusals: identity::local::Refusals::default(),
            local: RwLock::new(HashMap::new()),
            peers,
            endpoints: None,
        }
    }

    /// Finding other nodes' agents from the Kubernetes API, when it is the pod source.
    pub fn with_endpoints(
        mut self,
        endpoints: Option<crate::kubernetes::endpoints::Shared>,
    ) -> Transport {
        self.endpoints = endpoints;
        self
    }

    /// With these tunnel keepalive settings.
    pub fn with_tunnel(mut self, tunnel: hbone::Settings) -> Transport {
        self.tunnel = tunnel;
        self
    }

    /// Registers a pod of this node (by each of its addresses).
    pub fn add_local(&self, pod: Arc<LocalPod>) {
        let mut local = self.local.write().unwrap_or_else(|e| e.into_inner());
        for ip in &pod.ips {
            local.insert(ip.to_canonical(), pod.clone());
        }
    }

    /// Forgets a pod of this node.
    pub fn remove_local(&self, workload: &ResourceId) {
        let mut local = self.local.write().unwrap_or_else(|e| e.into_inner());
        local.retain(|_, pod| pod.workload != *workload);
    }

    /// Forgets some addresses of a pod of this node (it changed, and no longer has them).
    pub fn remove_local_ips(&self, workload: &ResourceId, ips: &[IpAddr]) {
        let mut local = self.local.write().unwrap_or_else(|e| e.into_inner());
        for ip in ips {
            if local
                .get(&ip.to_canonical())
                .is_some_and(|pod| pod.workload == *workload)
            {
                local.remove(&ip.to_canonical());
            }
        }
    }

    /// The local pod with this address, if any.
    pub fn local_pod(&self, ip: IpAddr) -> Option<Arc<LocalPod>> {
        let local = self.local.read().unwrap_or_else(|e| e.into_inner());
        local.get(&ip.to_canonical()).cloned()
    }

    /// Whether a pod of `vn` is enrolled on this node: only then does this node hold (open
    /// the files of) `vn`'s identity ([`identity::local`]).
    pub fn runs(&self, vn: &ResourceId) -> bool {
        let local = self.local.read().unwrap_or_else(|e| e.into_inner());
        local.values().any(|pod| pod.virtual_node == *vn)
    }

    /// The certificate `vn` presents, checked to carry `vn`'s identity; a refusal is logged
    /// and counted once per cause ([`identity::local`]).
    pub fn certificate(
        &self,
        policy: &Policy,
        vn: &ResourceId,
        cert: &crate::mesh::TlsCertificate,
        field: &str,
    ) -> Result<Arc<identity::store::LoadedCert>, identity::Error> {
        let result = identity::local::certificate(&self.store, policy, vn, cert, field);
        self.refusals.note(&self.metrics, vn, &result);
        result
    }

    /// The tunnel address of the node hosting `ip`, if a peer node covers it.
    pub fn peer_node(&self, ip: IpAddr) -> Option<SocketAddr> {
        self.peers
            .iter()
            .filter(|p| p.contains(ip))
            .max_by_key(|p| p.prefix)
            .map(|p| p.tunnel)
    }

    /// How to reach `ip`, not a pod of this node that this agent enrolled, with TLS: the Pod
    /// and Node objects first (`--kubernetes`), then `--peer-node`.
    pub fn locate(&self, ip: IpAddr) -> Remote {
        use crate::kubernetes::endpoints::Location;
        let located = self
            .endpoints
            .as_ref()
            .and_then(|directory| directory.load().locate(ip));
        match located {
            Some(Location::Agent { tunnel, .. }) => Remote::Agent(tunnel),
            Some(Location::NoAgent { pod, node, why }) => {
                Remote::NoAgent(format!("pod {pod} is on node {node}, where {why}"))
            }
            Some(Location::ThisNode { pod }) => Remote::NoAgent(format!(
                "pod {pod} is on this node but not enrolled (see /workloads)"
            )),
            None => match self.peer_node(ip) {
                Some(tunnel) => Remote::Agent(tunnel),
                None if self.endpoints.is_some() => Remote::NoAgent(
                    "no Pod in the API has this address and no --peer-node covers it".to_string(),
                ),
                None => Remote::NoAgent(
                    "it is not a pod of this node and no --peer-node covers it (add --peer-node <pod CIDR>=<node address>)"
                        .to_string(),
                ),
            },
        }
    }
}

/// Connects to one endpoint directly (plain TCP from the node's network namespace).
pub async fn connect(endpoint: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(endpoint)).await {
        Ok(result) => result?,
        Err(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connect to {endpoint} timed out after {CONNECT_TIMEOUT:?}"),
            ));
        }
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Connects `caller` to the target's endpoints in round-robin order, trying the next one when
/// a connect fails, up to [`CONNECT_ATTEMPTS`]. Local pods are reached on the node, remote ones
/// through the mTLS tunnel when TLS is configured (see the module docs).
pub async fn connect_target(
    ctx: &Context,
    state: &State,
    caller: &Caller<'_>,
    target: &Target,
    endpoints: &Endpoints,
) -> Result<(Stream, SocketAddr), Error> {
    let transport = &ctx.transport;
    authorize(transport, &state.policy, caller, &target.virtual_node)?;
    let mut tried = 0;
    let mut last = String::new();
    // Endpoints ejected by the listener's outlierDetection are tried last; connect failures
    // are its server errors (proxy::http::outlier).
    let table = &state.table;
    let outliers = table
        .outliers
        .get(&(target.virtual_node.clone(), target.port));
    let order: Vec<SocketAddr> = endpoints
        .rotation()
        .map(|ip| SocketAddr::new(ip, target.port))
        .collect();
    let registry = &ctx.http.endpoints;
    let judge = |endpoint: SocketAddr, failed: bool| {
        if let Some(policy) = outliers {
            let state = registry.state(&target.virtual_node, endpoint);
            registry.observe(
                &table.mesh,
                &target.virtual_node,
                &order,
                &state,
                policy,
                failed,
            );
        }
    };
    let attempts = if outliers.is_some() {
        registry.connect_order(&target.virtual_node, order.clone())
    } else {
        order.clone()
    };
    for endpoint in attempts.into_iter().take(CONNECT_ATTEMPTS) {
        tried += 1;
        match dial(transport, state, caller, &target.virtual_node, endpoint).await {
            Ok(stream) => {
                judge(endpoint, false);
                return Ok((stream, endpoint));
            }
            Err(error) => {
                tracing::warn!(virtual_node = %target.virtual_node, %endpoint, %error, "connect to endpoint failed");
                judge(endpoint, true);
                last = error;
            }
        }
    }
    if tried == 0 {
        return Err(Error::NoEndpoints(target.virtual_node.to_string()));
    }
    Err(Error::Unreachable {
        virtual_node: target.virtual_node.to_string(),
        tried,
        last,
    })
}

/// The sender half of the backend rule: `caller` may reach `target_node` only through a
/// virtual service its virtual node lists as a backend. (The connect hook already refused
/// services that are not backends; this also covers the virtual node a route picked.)
pub fn authorize(
    transport: &Transport,
    policy: &Policy,
    caller: &Caller<'_>,
    target_node: &ResourceId,
) -> Result<(), Error> {
    if policy.is_backend(caller.virtual_node, caller.service)
        && policy.may_reach(caller.virtual_node, target_node)
    {
        return Ok(());
    }
    transport
        .metrics
        .authz_denied
        .get_or_create(&AuthzLabels { point: "sender" })
        .inc();
    Err(Error::NotABackend {
        source_node: caller.virtual_node.to_string(),
        service: caller.service.to_string(),
        target_node: target_node.to_string(),
    })
}

/// The listener's `validation.subjectAlternativeNames` for a caller on this node: what a
/// tunnel's client verifier checks on another node's caller certificate, checked here on the
/// caller's identities (its virtual node is known from the pod it called from, a kernel fact;
/// no certificate is involved, so trust and expiry have nothing to apply to). A refusal is
/// counted and logged as the verifier does: `strait_tls_failures{side="server",
/// reason="san_mismatch"}`.
fn admit_same_node(
    transport: &Transport,
    policy: &Policy,
    caller: &Caller<'_>,
    pod: &LocalPod,
    port: u16,
) -> Result<(), String> {
    let Err((presented, expected)) =
        policy.listener_admits(caller.virtual_node, &pod.virtual_node, port)
    else {
        return Ok(());
    };
    let context = format!(
        "same-node call from {} ({}) to {} port {port}",
        caller.workload, caller.virtual_node, pod.virtual_node
    );
    let mismatch = identity::verify::SanMismatch {
        presented,
        expected,
    };
    transport.metrics.san_refused(&context, &mismatch);
    Err(format!(
        "{}'s listener {port} refuses {}: {mismatch} (its validation.subjectAlternativeNames)",
        pod.virtual_node, caller.virtual_node
    ))
}

/// Opens a stream to one endpoint of `target_node` on behalf of `caller`: a local pod through
/// its own loopback, a remote one directly or through the mTLS tunnel to its node's agent
/// when TLS applies. Authorization is the caller's business ([`authorize`]).
pub async fn dial(
    transport: &Transport,
    state: &State,
    caller: &Caller<'_>,
    target_node: &ResourceId,
    endpoint: SocketAddr,
) -> Result<Stream, String> {
    let policy = &state.policy;
    if let Some(pod) = transport.local_pod(endpoint.ip()) {
        admit_same_node(transport, policy, caller, &pod, endpoint.port())?;
        // Through the listener's connectionPool and rateLimit, if it has any.
        return admission::deliver_local(
            &transport.admission,
            state,
            caller.virtual_node,
            pod,
            endpoint,
        )
        .await;
    }
    let listener_tls = policy.listener_tls(target_node, endpoint.port());
    let client_tls = policy.client_tls(caller.virtual_node, caller.service, endpoint.port());
    let tls = listener_tls.is_some() || client_tls.is_some_and(|t| t.enforce);
    if !tls {
        let stream = connect(endpoint).await.map_err(|e| e.to_string())?;
        return Ok(Stream::new(stream));
    }
    let node = match transport.locate(endpoint.ip()) {
        Remote::Agent(node) => node,
        Remote::NoAgent(why) => {
            let enforced = client_tls.is_some_and(|t| t.enforce);
            let permissive = listener_tls.is_some_and(|t| t.mode == TlsMode::Permissive);
            if permissive && !enforced {
                // The listener takes plaintext too: as App Mesh would, without an agent
                // in front of the endpoint to speak mutual TLS for it.
                tracing::debug!(%endpoint, %why, "no strait agent in front of the endpoint; its listener is PERMISSIVE: plain TCP");
                let stream = connect(endpoint).await.map_err(|e| e.to_string())?;
                return Ok(Stream::new(stream));
            }
            let needs = if enforced {
                format!(
                    "the client policy of {} enforces TLS on port {}",
                    caller.virtual_node,
                    endpoint.port()
                )
            } else {
                format!(
                    "{}'s listener on port {} is tls STRICT",
                    target_node,
                    endpoint.port()
                )
            };
            return Err(format!(
                "{endpoint}: {why}; {needs}, and mutual TLS needs the destination node's strait agent"
            ));
        }
    };
    if listener_tls.is_none() {
        return Err(format!(
            "the client policy of {} enforces TLS on port {}, but {}'s listener has no tls",
            caller.virtual_node,
            endpoint.port(),
            target_node
        ));
    }
    let (stream, going_away) = hbone::open(
        transport,
        policy,
        caller,
        target_node,
        endpoint,
        node,
        client_tls,
    )
    .await
    .map_err(|e| crate::logging::Chain(&e).to_string())?;
    Ok(Stream {
        io: Box::new(stream),
        going_away: Some(going_away),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_nodes_parse_and_match() {
        let p: PeerNode = "10.244.2.0/24=192.0.2.2".parse().unwrap();
        assert_eq!(p.tunnel, "192.0.2.2:15008".parse().unwrap());
        assert!(p.contains("10.244.2.7".parse().unwrap()));
        assert!(!p.contains("10.244.3.7".parse().unwrap()));
        let p6: PeerNode = "fd00:244:2::/64=[fd00:ff::2]:15008".parse().unwrap();
        assert!(p6.contains("fd00:244:2::2".parse().unwrap()));
        assert!("10.244.2.0=192.0.2.2".parse::<PeerNode>().is_err());
    }
}
