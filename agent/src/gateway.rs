//! Ingress: VirtualGateway listeners served by the node agent inside the gateway pods.
//!
//! App Mesh ran an Envoy deployment per VirtualGateway behind a load balancer. strait keeps the
//! deployment (the pods the gateway's `podSelector` selects, usually a small Deployment behind
//! a Kubernetes Service) but not the proxy in it: for each such pod on its node, the agent
//! binds the gateway's listener ports (`0.0.0.0` and `[::]`) inside the pod's network
//! namespace, the way it binds a pod's outbound listener there (`netns::listen_in`). A client
//! outside the mesh (a load balancer) connects to the pod's address as it would to Envoy.
//!
//! Each request is matched against the gateway's GatewayRoutes and rewritten
//! ([`routes`]), then handed to the HTTP proxy as if the gateway had called the target virtual
//! service (`proxy::http::serve_ingress`): the same routing, retries, endpoints, mTLS tunnel
//! to other nodes, backend rules (a gateway may reach the virtual services its routes target)
//! and telemetry, with the gateway as the source. The listener's `tls` (STRICT, PERMISSIVE,
//! DISABLED; a `file` certificate; `validation` for client certificates) is terminated here.
//! A listener's `healthCheck` is answered on its port or on a health port bound beside the
//! listeners ([`health`]); its `rateLimit` counts per listener and per client ([`limit`]).
//!
//! What it leaves to others: pods and their labels (`workloads`), the eBPF side (a gateway pod
//! is not enrolled as a VirtualNode; its own connects are not captured), the request path
//! (`proxy::http`), listener hand-over on upgrade (`handover`, under the names
//! `gateway/<pod>/<addr>`).

pub mod health;
pub mod limit;
pub mod routes;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::MetadataExt as _;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use http::header::{HeaderName, HeaderValue};
use http::request::Parts;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::net::TcpStream;

use crate::admin::WorkloadStatus;
use crate::handover;
use crate::identity::policy::{certificate_files, trust_file};
use crate::identity::store::cert_facts;
use crate::identity::{self, verify};
use crate::logging::Chain;
use crate::mesh::{CircuitBreaker, ConnectionPool, ListenerTls, MeshConfig, ResourceId, TlsMode};
use crate::netns;
use crate::proxy::admission::RateLimitLabels;
use crate::proxy::http::{EdgeReply, Ingress};
use crate::proxy::outbound::Source;
use crate::proxy::{self, Context, Drain};
use crate::routing::{ServicePort, Table};
use crate::state::State;
use crate::workloads::Workload;

use self::health::HealthTable;
use self::limit::{Client, Limits};
use self::routes::{GatewayTable, ListenerRoutes};

/// How long a client at the edge may take to start its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a gateway pod's listeners could not be opened (the agent retries on the next change).
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Listen(#[from] netns::Error),
    #[error("cannot register the gateway's listeners with the runtime")]
    Register(#[source] std::io::Error),
}

/// What one mesh asks of every gateway listener, compiled with the rest of the mesh into
/// the one published [`State`]: a connection and each request read the gateway's routes,
/// tls and health checks from the same version as the services those routes lead to.
#[derive(Debug, Default)]
pub struct Compiled {
    /// The routes of each listener, by (gateway, port).
    table: GatewayTable,
    /// Listener `tls` by (gateway, port).
    tls: BTreeMap<(ResourceId, u16), ListenerTls>,
    /// What the listeners' `healthCheck`s ask for, by (gateway, port).
    health: HealthTable,
}

impl Compiled {
    /// The routes of `gateway`'s listener on `port`, if the mesh has that listener.
    pub fn routes(&self, gateway: &ResourceId, port: u16) -> Option<&Arc<ListenerRoutes>> {
        self.table.listeners.get(&(gateway.clone(), port))
    }

    pub fn compile(mesh: &MeshConfig) -> Compiled {
        Compiled {
            table: GatewayTable::compile(mesh),
            tls: mesh
                .virtual_gateways
                .iter()
                .flat_map(|gw| {
                    gw.spec.listeners.iter().filter_map(|l| {
                        let tls = l.tls.clone()?;
                        Some(((gw.id.clone(), l.port_mapping.port), tls))
                    })
                })
                .collect(),
            health: health::table(mesh),
        }
    }
}

/// The gateway pods of this node and their listeners.
#[derive(Default)]
pub struct Gateways {
    pods: BTreeMap<ResourceId, GatewayPod>,
    /// Pods a gateway selects whose listeners could not be opened, with why (the error with
    /// its causes, as logged and shown in the status).
    failed: BTreeMap<ResourceId, String>,
    /// Listener `rateLimit` buckets, by (gateway, port): state that outlives a mesh version
    /// (a reload must not refill every bucket), updated in place.
    limits: Arc<Limits>,
}

/// A gateway pod whose listeners the agent serves.
struct GatewayPod {
    workload: Workload,
    gateway: ResourceId,
    /// Its listener ports, then its health ports (checks on ports no listener has).
    ports: (Vec<u16>, Vec<u16>),
    addrs: Vec<SocketAddr>,
    /// Inode of the network namespace the listeners live in (the CNI hand-off compares it).
    netns_inode: Option<u64>,
    /// Hand-over names of its sockets.
    names: Vec<String>,
    _accepting: Vec<proxy::Accepting>,
}

/// A gateway listener's `connectionPool` bounds what the gateway sends to the services its
/// routes on that listener target, as App Mesh's gateway Envoy bounded its upstream clusters:
/// it becomes the gateway's circuit breaker toward each of them (`proxy::breaker`; `http`:
/// `maxConnections`, `maxPendingRequests`; `http2`, `grpc`: `maxRequests`). Overflow is a 503
/// with `x-envoy-overloaded`. A service several listeners route to takes the first
/// listener's pool.
pub fn connection_pools(
    mesh: &MeshConfig,
    breakers: &mut BTreeMap<(ResourceId, ResourceId), CircuitBreaker>,
) {
    let table = GatewayTable::compile(mesh);
    for gw in &mesh.virtual_gateways {
        for listener in &gw.spec.listeners {
            let Some(pool) = &listener.connection_pool else {
                continue;
            };
            let breaker = match *pool {
                ConnectionPool::Http {
                    max_connections,
                    max_pending_requests,
                } => CircuitBreaker {
                    max_connections: Some(max_connections),
                    max_pending_requests,
                    ..CircuitBreaker::default()
                },
                ConnectionPool::Http2 { max_requests } | ConnectionPool::Grpc { max_requests } => {
                    CircuitBreaker {
                        max_requests: Some(max_requests),
                        ..CircuitBreaker::default()
                    }
                }
                ConnectionPool::Tcp { .. } => continue,
            };
            let Some(routes) = table
                .listeners
                .get(&(gw.id.clone(), listener.port_mapping.port))
            else {
                continue;
            };
            for route in &routes.routes {
                breakers
                    .entry((gw.id.clone(), route.target.clone()))
                    .or_insert_with(|| breaker.clone());
            }
        }
    }
}

/// Is this pod a gateway's (its labels match a VirtualGateway's `podSelector`)?
pub fn selects(mesh: &MeshConfig, workload: &Workload) -> bool {
    workload.in_mesh(mesh)
        && routes::gateway_of(mesh, &workload.namespace, &workload.labels).is_some()
}

impl Gateways {
    /// Brings the gateway pods' listeners in line with the pods and the mesh: new gateway pods
    /// get theirs, gone ones lose them. Changed routes and tls apply to the next request and
    /// connection through the published state ([`Compiled`]). A pod whose ports change is
    /// closed and opened again.
    pub fn reconcile(
        &mut self,
        pods: &BTreeMap<ResourceId, Workload>,
        mesh: &MeshConfig,
        ctx: &Arc<Context>,
        inherited: &handover::Inherited,
        registry: &handover::Registry,
    ) {
        self.limits.update(mesh);
        let mut desired = BTreeMap::new();
        for (key, workload) in pods {
            if workload.unavailable.is_some() || !workload.in_mesh(mesh) {
                continue;
            }
            if let Some(gw) = routes::gateway_of(mesh, &workload.namespace, &workload.labels) {
                let listeners: Vec<u16> = gw
                    .spec
                    .listeners
                    .iter()
                    .map(|l| l.port_mapping.port)
                    .collect();
                let ports = (listeners, health::health_ports(gw));
                desired.insert(key.clone(), (workload, gw.id.clone(), ports));
            }
        }
        let stale: Vec<ResourceId> = self
            .pods
            .iter()
            .filter(|(key, pod)| {
                desired.get(*key).is_none_or(|(w, gw, ports)| {
                    **w != pod.workload || *gw != pod.gateway || *ports != pod.ports
                })
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            if let Some(pod) = self.pods.remove(&key) {
                for name in &pod.names {
                    registry.remove(name);
                }
                tracing::info!(pod = %key, gateway = %pod.gateway, "gateway pod released");
            }
        }
        self.failed.retain(|key, _| desired.contains_key(key));
        for (key, (workload, gateway, ports)) in desired {
            if self.pods.contains_key(&key) {
                continue;
            }
            match self.open(workload, &gateway, &ports, ctx, inherited, registry) {
                Ok(pod) => {
                    tracing::info!(pod = %key, %gateway, listeners = ?pod.addrs, "gateway pod enrolled: its listeners are served by the agent");
                    self.failed.remove(&key);
                    self.pods.insert(key, pod);
                }
                Err(error) => {
                    let error = Chain(&error).to_string();
                    if self.failed.get(&key) != Some(&error) {
                        tracing::error!(pod = %key, %gateway, "cannot open the gateway's listeners in the pod: {error}");
                    }
                    self.failed.insert(key, error);
                }
            }
        }
    }

    /// Whether some gateway pod could not be served (the agent retries).
    pub fn has_failures(&self) -> bool {
        !self.failed.is_empty()
    }

    fn open(
        &self,
        workload: &Workload,
        gateway: &ResourceId,
        ports: &(Vec<u16>, Vec<u16>),
        ctx: &Arc<Context>,
        inherited: &handover::Inherited,
        registry: &handover::Registry,
    ) -> Result<GatewayPod, OpenError> {
        let mut bound: Vec<(SocketAddr, std::net::TcpListener)> = Vec::new();
        let mut names = Vec::new();
        let name = |addr: &SocketAddr| format!("gateway/{}/{addr}", workload.key());
        for &port in ports.0.iter().chain(&ports.1) {
            let addrs = [
                SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
                SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
            ];
            let mut missing = Vec::new();
            for addr in addrs {
                match inherited.take(&name(&addr)) {
                    Some(listener) => bound.push((addr, listener)),
                    None => missing.push(addr),
                }
            }
            if missing.is_empty() {
                continue;
            }
            let fresh = netns::listen_in(&workload.netns, &missing)?;
            for (addr, result) in missing.into_iter().zip(fresh) {
                match result {
                    Ok(listener) => bound.push((addr, listener)),
                    // A pod without IPv6 has no [::] to listen on; IPv4 clients still reach it.
                    Err(error) if addr.is_ipv6() => {
                        tracing::info!(pod = %workload.key(), error = %Chain(&error), "no IPv6 gateway listener")
                    }
                    Err(error) => return Err(error.into()),
                }
            }
        }
        let mut by_port: BTreeMap<u16, Vec<std::net::TcpListener>> = BTreeMap::new();
        let mut addrs = Vec::new();
        for (addr, listener) in bound {
            if let Err(error) = registry.add(&name(&addr), &listener) {
                tracing::warn!(%addr, error = %Chain(&error), "gateway listener cannot be handed over on upgrade");
            }
            names.push(name(&addr));
            addrs.push(addr);
            by_port.entry(addr.port()).or_default().push(listener);
        }
        let mut accepting = Vec::new();
        for (port, listeners) in by_port {
            if ports.1.contains(&port) {
                let (gateway, state) = (gateway.clone(), ctx.state.clone());
                let handle = move |stream: TcpStream, _peer: SocketAddr, drain: Drain| {
                    let (gateway, state) = (gateway.clone(), state.clone());
                    health::serve_port(stream, gateway, port, state, drain)
                };
                accepting.push(
                    proxy::accept(listeners, ctx, &workload.key(), handle)
                        .map_err(OpenError::Register)?,
                );
                continue;
            }
            let listener = Arc::new(Listener {
                workload: workload.key(),
                gateway: gateway.clone(),
                port,
                limits: self.limits.clone(),
                ctx: ctx.clone(),
            });
            let handle = move |stream: TcpStream, peer: SocketAddr, drain: Drain| {
                let listener = listener.clone();
                async move { listener.serve(stream, peer, drain).await }
            };
            accepting.push(
                proxy::accept(listeners, ctx, &workload.key(), handle)
                    .map_err(OpenError::Register)?,
            );
        }
        let netns_inode = std::fs::metadata(&workload.netns).ok().map(|m| m.ino());
        Ok(GatewayPod {
            netns_inode,
            workload: workload.clone(),
            gateway: gateway.clone(),
            ports: ports.clone(),
            addrs,
            names,
            _accepting: accepting,
        })
    }

    /// `/workloads` lines for the gateway pods.
    pub fn statuses(&self) -> Vec<WorkloadStatus> {
        let served = self.pods.iter().map(|(key, pod)| WorkloadStatus {
            pod: key.to_string(),
            virtual_node: None,
            enrolled: true,
            cgroup_id: None,
            netns_inode: pod.netns_inode,
            listeners: pod.addrs.clone(),
            error: None,
            reason: Some(format!(
                "gateway pod of VirtualGateway {}: the agent serves its listeners",
                pod.gateway
            )),
            identity: None,
        });
        let failed = self.failed.iter().map(|(key, error)| WorkloadStatus {
            pod: key.to_string(),
            virtual_node: None,
            enrolled: false,
            cgroup_id: None,
            netns_inode: None,
            listeners: Vec::new(),
            error: Some(error.clone()),
            reason: None,
            identity: None,
        });
        served.chain(failed).collect()
    }
}

/// One gateway listener port of one pod.
struct Listener {
    workload: ResourceId,
    gateway: ResourceId,
    port: u16,
    limits: Arc<Limits>,
    ctx: Arc<Context>,
}

impl Listener {
    async fn serve(&self, stream: TcpStream, peer: SocketAddr, drain: Drain) {
        let _ = stream.set_nodelay(true);
        let local = stream
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), self.port));
        let source = Arc::new(Source {
            workload: self.workload.clone(),
            virtual_node: self.gateway.clone(),
            // The client's address: `x-forwarded-for` names who called the gateway.
            ips: vec![peer.ip().to_canonical()],
        });
        let tls = self
            .ctx
            .state
            .snapshot()
            .gateways
            .tls
            .get(&(self.gateway.clone(), self.port))
            .filter(|t| t.mode != TlsMode::Disabled)
            .cloned();
        let client = Client {
            ip: Some(peer.ip()),
            ..Client::default()
        };
        let Some(tls) = tls else {
            let ingress = self.ingress(false, client);
            proxy::http::serve_ingress(stream, local, source, self.ctx.clone(), drain, ingress)
                .await;
            return;
        };
        if tls.mode == TlsMode::Permissive && !starts_with_tls(&stream).await {
            let ingress = self.ingress(false, client);
            proxy::http::serve_ingress(stream, local, source, self.ctx.clone(), drain, ingress)
                .await;
            return;
        }
        let config = match self.server_config(&tls, peer) {
            Ok(config) => config,
            Err(error) => {
                tracing::error!(gateway = %self.gateway, port = self.port, %peer, "cannot serve TLS: {error}");
                return;
            }
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                tracing::info!(gateway = %self.gateway, port = self.port, %peer, error = %Chain(&error), "TLS handshake with a client failed");
                return;
            }
            Err(_) => {
                tracing::info!(gateway = %self.gateway, port = self.port, %peer, "no TLS handshake within {HANDSHAKE_TIMEOUT:?}");
                return;
            }
        };
        // A verified client certificate names the client for the rate limit.
        let sans = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| cert_facts(c).ok())
            .map(|f| f.sans)
            .unwrap_or_default();
        let virtual_nodes = self.ctx.transport.state.snapshot().policy.peer_nodes(&sans);
        let client = Client {
            sans,
            virtual_nodes,
            ..client
        };
        let ingress = self.ingress(true, client);
        proxy::http::serve_ingress(stream, local, source, self.ctx.clone(), drain, ingress).await;
    }

    fn ingress(&self, tls: bool, client: Client) -> Arc<dyn Ingress> {
        Arc::new(Edge {
            gateway: self.gateway.clone(),
            port: self.port,
            limits: self.limits.clone(),
            client,
            rate_limited: self.ctx.transport.admission.metrics.rate_limited.clone(),
            tls,
        })
    }

    /// The listener's certificate (read through the certificate store, so a rotated file is
    /// presented from the next connection on) and, with `validation`, the client check.
    fn server_config(
        &self,
        tls: &ListenerTls,
        peer: SocketAddr,
    ) -> Result<Arc<rustls::ServerConfig>, String> {
        let transport = &self.ctx.transport;
        let field = format!("VirtualGateway {} listener {} tls", self.gateway, self.port);
        let (chain, key) = certificate_files(&tls.certificate, &format!("{field}.certificate"))
            .map_err(|e| Chain(&e).to_string())?;
        let cert = transport
            .store
            .cert(&chain, &key)
            .map_err(|e| Chain(&e).to_string())?;
        let builder = rustls::ServerConfig::builder_with_provider(identity::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Chain(&e).to_string())?;
        let builder = match &tls.validation {
            Some(validation) => {
                let trust_path = trust_file(validation, &format!("{field}.validation"))
                    .map_err(|e| Chain(&e).to_string())?;
                let trust = transport
                    .store
                    .trust(&trust_path)
                    .map_err(|e| Chain(&e).to_string())?;
                let report = verify::Report {
                    metrics: transport.metrics.clone(),
                    context: format!(
                        "client {peer} of gateway {} port {}",
                        self.gateway, self.port
                    ),
                };
                let verifier = verify::ClientVerifier::new(
                    trust.roots.clone(),
                    validation.subject_alternative_names.clone(),
                    report,
                )
                .map_err(|e| Chain(&e).to_string())?;
                builder.with_client_cert_verifier(Arc::new(verifier))
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(Arc::new(Presents(cert.certified.clone())));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// Presents one certificate whatever the client asks for.
#[derive(Debug)]
struct Presents(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for Presents {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// PERMISSIVE: does the client start with a TLS handshake record? Waits for its first byte.
async fn starts_with_tls(stream: &TcpStream) -> bool {
    let mut first = [0u8; 1];
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.peek(&mut first)).await {
        // 22: a TLS handshake record (RFC 8446 section 5.1); no HTTP request starts with it.
        Ok(Ok(1)) => first[0] == 22,
        _ => false,
    }
}

/// A gateway listener's per-request routing, as the HTTP proxy asks for it.
struct Edge {
    gateway: ResourceId,
    port: u16,
    limits: Arc<Limits>,
    /// Who is calling, for the rate limit.
    client: Client,
    /// `strait_rate_limited` (shared with the listeners' rate limits).
    rate_limited: Family<RateLimitLabels, Counter>,
    tls: bool,
}

impl Ingress for Edge {
    fn route(
        &self,
        state: &State,
        parts: &mut Parts,
    ) -> Result<(Arc<ServicePort>, String), EdgeReply> {
        let table = &state.table;
        let Some(routes) = state.gateways.routes(&self.gateway, self.port) else {
            return Err(EdgeReply::Refused(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "virtual gateway {} no longer has a listener on port {}",
                    self.gateway, self.port
                ),
            ));
        };
        // The load balancer's check is answered before the rate limit: a busy gateway is not
        // an unhealthy one.
        if state
            .gateways
            .health
            .get(&(self.gateway.clone(), self.port))
            .is_some_and(|answers| answers.wants(parts))
        {
            return Err(EdgeReply::Answer(Box::new(|request| {
                Box::pin(health::answer(request))
            })));
        }
        let admitted = self.limits.admit(&self.gateway, self.port, &self.client);
        if let Err(refusal) | Ok(Some(refusal)) = &admitted {
            self.count_limited(table, refusal, admitted.is_ok());
        }
        if let Err(refusal) = admitted {
            return Err(EdgeReply::RateLimited {
                message: format!(
                    "virtual gateway {} port {}: rate limited (rateLimit, {})",
                    self.gateway, self.port, refusal.scope
                ),
                wait: refusal.wait,
            });
        }
        edge_headers(parts, self.tls);
        let routed = routes.route(table, parts)?;
        Ok((routed.service, routed.route))
    }
}

impl Edge {
    /// Counts a refusal (or, in shadow mode, what would have been one) in
    /// `strait_rate_limited`, with the gateway as the listener's `virtual_node` and the
    /// client's virtual node, when its certificate names one, as the source.
    fn count_limited(&self, table: &Table, refusal: &limit::Refusal, shadow: bool) {
        let labels = RateLimitLabels {
            mesh: table.mesh.clone(),
            virtual_node: self.gateway.to_string(),
            source_virtual_node: self
                .client
                .virtual_nodes
                .first()
                .map(ToString::to_string)
                .unwrap_or_default(),
            scope: refusal.scope,
            mode: if shadow { "shadow" } else { "enforced" },
            unit: "request",
        };
        self.rate_limited.get_or_create(&labels).inc();
    }
}

/// What the edge owns: `x-forwarded-proto` is how the client reached the gateway, and a
/// request id from outside the mesh is not trusted (a fresh one is made downstream).
/// `x-forwarded-for` gets the client's address appended by the proxy.
fn edge_headers(parts: &mut Parts, tls: bool) {
    let proto = HeaderName::from_static("x-forwarded-proto");
    let scheme = if tls { "https" } else { "http" };
    parts
        .headers
        .insert(proto, HeaderValue::from_static(scheme));
    parts
        .headers
        .remove(HeaderName::from_static("x-request-id"));
}
