//! Destination-side limits: a listener's `connectionPool` and `rateLimit` (see
//! docs/resilience.md), applied by the agent that delivers to the local pod, as App Mesh
//! applied `connectionPool` in the Envoy beside the pod. Two callers reach a local pod's
//! listener, and both come through here:
//!
//! - a pod of this node (same-node delivery, `upstream::dial`): the caller is its source
//!   virtual node, a kernel fact;
//! - another node's agent through the mTLS tunnel (`hbone`'s server side): the caller is the
//!   identity in its verified client certificate.
//!
//! On a `tcp` listener each new connection is admitted or refused here ([`Admission::admit`]):
//! `tcp.maxConnections` counts the connections open to the pod, `rateLimit` is a connection
//! rate. On an `http`, `http2` or `grpc` listener with a limit, the connection is served by a
//! [`Gate`]: a small HTTP server that admits each request (rate limit, then the connection
//! pool) and forwards it to the pod over connections it owns, so `http.maxConnections` bounds
//! the connections to the pod whoever the callers are. Listeners without limits are spliced as
//! before; the gate costs nothing where nothing is configured.
//!
//! Limits are per listener per node: each agent counts what it delivers to its own pods.
//! Their state (connection counts, token buckets) outlives mesh reloads that leave the
//! listener's limits as they were, and starts afresh when they change.

pub mod bucket;
pub mod routes;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use self::bucket::TokenBucket;
use super::Drain;
use super::http::body::{Guard, Guards, ReplayBody, ResponseBody};
use super::http::pool::{self, Pool, Proto};
use super::http::{BoxFuture, headers};
use super::streams::{Driven, Streams};
use super::upstream::{LocalPod, Stream};
use crate::identity::policy::Policy;
use crate::mesh::{
    CircuitBreaker, ConnectionPool, ListenerTimeout, MeshConfig, Protocol, RateLimit,
    RateLimitCaller, ResourceId, TcpTimeout,
};
use crate::state::State as Snapshot;
use crate::telemetry::access_log::AccessLog;
use crate::telemetry::request::Record;
use crate::telemetry::{SeriesCache, Telemetry};

/// Per-caller buckets kept per listener before full (forgettable) ones are dropped.
const MAX_CALLER_BUCKETS: usize = 10_000;
/// In-memory pipe between the calling proxy and the gate, same-node.
const PIPE_BUFFER: usize = 64 * 1024;

/// Envoy's header on a reply refused by a circuit breaker (`connectionPool` overflow); a
/// calling proxy does not retry such a reply.
pub const OVERLOADED: &str = "x-envoy-overloaded";
/// Envoy's header on a reply refused by a rate limit; not retried either.
pub const RATE_LIMITED: &str = "x-envoy-ratelimited";

/// The limits of one listener, from the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerLimits {
    pub mesh: String,
    pub virtual_node: ResourceId,
    pub port: u16,
    pub protocol: Protocol,
    pub pool: Option<ConnectionPool>,
    pub rate: Option<RateLimit>,
    /// The virtual node has `logging.accessLog`: its http, http2 and grpc listeners are served
    /// request by request at the receiving side, for the destination's access log lines and
    /// request metrics (`reporter="destination"`).
    pub logged: bool,
    /// The listener's own `timeout.http`/`http2`/`grpc`, applied at the receiving side when it
    /// gives one ([`ReceivingTimeouts`]).
    pub timeouts: Option<ReceivingTimeouts>,
}

/// A listener's http, http2 or grpc `timeout` as the receiving agent applies it (App Mesh's
/// defaults filled in, 0 disables; see docs/resilience.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceivingTimeouts {
    /// `perRequest`: until the pod's response has ended; over it, 504 (flag `UT`).
    pub per_request: Option<Duration>,
    /// `idle`: a connection into the agent with no request in flight for this long is closed;
    /// a response that stalls this long is cut (flag `SI`).
    pub idle: Option<Duration>,
}

/// Every listener with a `connectionPool` or a `rateLimit`, and every backend's
/// `clientPolicy.circuitBreaker` (see [`super::breaker`]), compiled with the mesh's [`Policy`].
#[derive(Debug, Clone, Default)]
pub struct Limits {
    listeners: BTreeMap<(ResourceId, u16), Arc<ListenerLimits>>,
    /// (calling virtual node, backend virtual service) -> its circuit breaker.
    breakers: BTreeMap<(ResourceId, ResourceId), CircuitBreaker>,
    /// tcp listeners' `timeout.tcp.idle` (not 0), applied where the pod's stream is
    /// delivered ([`super::idle`]).
    tcp_idle: BTreeMap<(ResourceId, u16), Duration>,
}

impl Limits {
    pub fn compile(mesh: &MeshConfig) -> Limits {
        let mut listeners = BTreeMap::new();
        let mut breakers = BTreeMap::new();
        let mut tcp_idle = BTreeMap::new();
        for vn in &mesh.virtual_nodes {
            // A backend's own circuitBreaker, else backendDefaults' (as for `tls`).
            let default = vn
                .spec
                .backend_defaults
                .as_ref()
                .and_then(|d| d.client_policy.as_ref())
                .and_then(|p| p.circuit_breaker.as_ref());
            for backend in &vn.spec.backends {
                let own = backend
                    .client_policy
                    .as_ref()
                    .and_then(|p| p.circuit_breaker.as_ref());
                if let Some(breaker) = own.or(default) {
                    breakers.insert(
                        (vn.id.clone(), backend.virtual_service.clone()),
                        breaker.clone(),
                    );
                }
            }
            for l in &vn.spec.listeners {
                if let Some(ListenerTimeout::Tcp(TcpTimeout { idle: Some(idle) })) = &l.timeout
                    && !idle.as_std().is_zero()
                {
                    tcp_idle.insert((vn.id.clone(), l.port_mapping.port), idle.as_std());
                }
                let logged = vn
                    .spec
                    .logging
                    .as_ref()
                    .is_some_and(|l| l.access_log.is_some());
                let timeouts = l.timeout.as_ref().and_then(receiving_timeouts);
                if l.connection_pool.is_none()
                    && l.rate_limit.is_none()
                    && !logged
                    && timeouts.is_none()
                {
                    continue;
                }
                let port = l.port_mapping.port;
                listeners.insert(
                    (vn.id.clone(), port),
                    Arc::new(ListenerLimits {
                        mesh: mesh.mesh.name.clone(),
                        virtual_node: vn.id.clone(),
                        port,
                        protocol: l.port_mapping.protocol,
                        pool: l.connection_pool.clone(),
                        rate: l.rate_limit.clone(),
                        logged,
                        timeouts,
                    }),
                );
            }
        }
        crate::gateway::connection_pools(mesh, &mut breakers);
        Limits {
            listeners,
            breakers,
            tcp_idle,
        }
    }

    /// The tcp listener's idle timeout, if it has one.
    pub fn tcp_idle(&self, vn: &ResourceId, port: u16) -> Option<Duration> {
        self.tcp_idle.get(&(vn.clone(), port)).copied()
    }

    /// The circuit breaker of `source`'s backend `service`, if it has one.
    pub fn circuit_breaker(
        &self,
        source: &ResourceId,
        service: &ResourceId,
    ) -> Option<&CircuitBreaker> {
        self.breakers.get(&(source.clone(), service.clone()))
    }

    pub fn get(&self, vn: &ResourceId, port: u16) -> Option<&Arc<ListenerLimits>> {
        self.listeners.get(&(vn.clone(), port))
    }
}

/// A listener's http, http2 or grpc `timeout`, as the receiving side applies it; None for a tcp
/// one (applied by [`super::idle`]).
fn receiving_timeouts(timeout: &ListenerTimeout) -> Option<ReceivingTimeouts> {
    match timeout {
        ListenerTimeout::Http(t) | ListenerTimeout::Http2(t) | ListenerTimeout::Grpc(t) => {
            let (per_request, idle) = crate::routing::http::timeouts(Some(t));
            Some(ReceivingTimeouts { per_request, idle })
        }
        ListenerTimeout::Tcp(_) => None,
    }
}

/// Who is calling a local pod's listener.
#[derive(Debug, Clone)]
pub enum Caller {
    /// A pod of this node, by its virtual node.
    Local(ResourceId),
    /// Another node's agent, by the SANs of its verified client certificate (none when the
    /// listener does not ask for one).
    Tunnel(Vec<String>),
}

/// A caller as the limits see it.
#[derive(Debug, Clone)]
pub(crate) struct Who {
    /// The key of its own bucket: its SPIFFE ID (a tunnel caller's certificate; for a
    /// same-node caller the one its virtual node has in this mesh); empty for a tunnel caller
    /// without a certificate (they share one bucket).
    key: String,
    virtual_nodes: BTreeSet<ResourceId>,
    identities: Vec<String>,
    /// Its virtual node, for metrics (empty when unknown).
    source: String,
}

impl Who {
    pub(crate) fn resolve(policy: &Policy, caller: &Caller) -> Who {
        match caller {
            Caller::Local(vn) => {
                let identities = policy
                    .nodes
                    .get(vn)
                    .map(|n| n.identities.clone())
                    .unwrap_or_default();
                Who {
                    key: identities
                        .first()
                        .cloned()
                        .unwrap_or_else(|| format!("virtual-node:{vn}")),
                    virtual_nodes: BTreeSet::from([vn.clone()]),
                    identities,
                    source: vn.to_string(),
                }
            }
            Caller::Tunnel(sans) => {
                let virtual_nodes = policy.peer_nodes(sans);
                Who {
                    key: sans
                        .iter()
                        .find(|s| s.starts_with("spiffe://"))
                        .or(sans.first())
                        .cloned()
                        .unwrap_or_default(),
                    source: virtual_nodes
                        .first()
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                    virtual_nodes,
                    identities: sans.clone(),
                }
            }
        }
    }

    fn matches(&self, named: &RateLimitCaller) -> bool {
        match named {
            RateLimitCaller::VirtualNode(vn) => self.virtual_nodes.contains(vn),
            RateLimitCaller::Identity(id) => self.identities.contains(id),
        }
    }
}

/// Labels of a request or connection refused (or, in shadow mode, counted) by a limit.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OverflowLabels {
    pub mesh: String,
    /// The local pod's virtual node (the listener's).
    pub virtual_node: String,
    /// The caller's virtual node, when known.
    pub source_virtual_node: String,
    /// `max_connections`, `max_pending_requests` or `max_requests`.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RateLimitLabels {
    pub mesh: String,
    pub virtual_node: String,
    pub source_virtual_node: String,
    /// Which bucket was empty: `total`, `caller` (`perCaller`) or `override`.
    pub scope: &'static str,
    /// `enforced` (refused) or `shadow` (counted, let through).
    pub mode: &'static str,
    /// `request` (http, http2, grpc listeners) or `connection` (tcp).
    pub unit: &'static str,
}

/// The limits' metrics.
#[derive(Clone, Default)]
pub struct Metrics {
    pub overflows: Family<OverflowLabels, Counter>,
    pub rate_limited: Family<RateLimitLabels, Counter>,
    /// Client-side circuit breaker overflows ([`super::breaker`]).
    pub breaker_overflows: Family<super::breaker::BreakerLabels, Counter>,
    /// Requests over a route's `rateLimit` ([`routes`]), counted by the calling agent.
    pub route_rate_limited: Family<routes::RouteRateLimitLabels, Counter>,
    /// Connections into a local pod's listener closed by its `idle` timeout at the receiving
    /// side.
    pub idle_closed: Family<IdleLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdleLabels {
    pub mesh: String,
    /// The local pod's virtual node (the listener's).
    pub virtual_node: String,
    pub source_virtual_node: String,
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "strait_overflows",
            "Requests and connections refused by a listener's connectionPool (Envoy's circuit breaker overflows), by reason",
            self.overflows.clone(),
        );
        registry.register(
            "strait_rate_limited",
            "Requests (or tcp connections) over a listener's rateLimit: refused (enforced) or only counted (shadow)",
            self.rate_limited.clone(),
        );
        registry.register(
            "strait_route_rate_limited",
            "Requests over a virtual router route's rateLimit, counted by the calling agent: refused (enforced) or only counted (shadow)",
            self.route_rate_limited.clone(),
        );
        registry.register(
            "strait_idle_connections_closed",
            "Connections into a local pod's http, http2 or grpc listener closed by the receiving agent after the listener's timeout idle with no request in flight",
            self.idle_closed.clone(),
        );
        registry.register(
            "strait_circuit_breaker_overflows",
            "Requests, connections and retries refused by a backend's clientPolicy.circuitBreaker, by reason",
            self.breaker_overflows.clone(),
        );
    }

    fn overflow(&self, limits: &ListenerLimits, who: &Who, reason: &'static str) {
        self.overflows
            .get_or_create(&OverflowLabels {
                mesh: limits.mesh.clone(),
                virtual_node: limits.virtual_node.to_string(),
                source_virtual_node: who.source.clone(),
                reason,
            })
            .inc();
    }

    fn limited(&self, limits: &ListenerLimits, who: &Who, scope: &'static str, shadow: bool) {
        self.rate_limited
            .get_or_create(&RateLimitLabels {
                mesh: limits.mesh.clone(),
                virtual_node: limits.virtual_node.to_string(),
                source_virtual_node: who.source.clone(),
                scope,
                mode: if shadow { "shadow" } else { "enforced" },
                unit: if limits.protocol == Protocol::Tcp {
                    "connection"
                } else {
                    "request"
                },
            })
            .inc();
    }
}

/// Why a connection was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error(
        "virtual node {virtual_node} listener {port}: connectionPool.tcp.maxConnections ({max}) \
         connections are open; connection refused"
    )]
    Overflow {
        virtual_node: ResourceId,
        port: u16,
        max: u32,
    },
    #[error(
        "virtual node {virtual_node} listener {port}: over its rateLimit ({scope}); connection \
         refused, the next in {wait:?}"
    )]
    RateLimited {
        virtual_node: ResourceId,
        port: u16,
        scope: &'static str,
        wait: Duration,
    },
}

/// A bucket was empty.
pub(crate) struct Refusal {
    /// Which: `total`, `caller` or `override`.
    pub scope: &'static str,
    /// Until its next token.
    pub wait: Duration,
}

#[derive(Default)]
struct RateState {
    total: Option<TokenBucket>,
    callers: HashMap<String, TokenBucket>,
}

/// The token buckets of one `rateLimit` (a listener's or a route's): the total one and one per
/// caller.
#[derive(Default)]
pub(crate) struct Buckets(Mutex<RateState>);

impl Buckets {
    /// Takes a token from the caller's bucket and the total one, or neither.
    pub(crate) fn take(&self, rate: &RateLimit, who: &Who, now: Instant) -> Result<(), Refusal> {
        let mut state = lock(&self.0);
        let RateState { total, callers } = &mut *state;
        let (scope, limit) = match rate
            .overrides
            .iter()
            .find(|o| o.callers.iter().any(|c| who.matches(c)))
        {
            Some(o) => ("override", Some(o.limit)),
            None => ("caller", rate.per_caller),
        };
        if callers.len() >= MAX_CALLER_BUCKETS {
            callers.retain(|_, b| !b.is_full(now));
        }
        let mut caller = limit.map(|l| {
            callers
                .entry(who.key.clone())
                .or_insert_with(|| TokenBucket::new(l, now))
        });
        if let Some(b) = caller.as_mut() {
            b.check(now).map_err(|wait| Refusal { scope, wait })?;
        }
        if let Some(t) = rate.total {
            let total = total.get_or_insert_with(|| TokenBucket::new(t, now));
            total.try_take(now).map_err(|wait| Refusal {
                scope: "total",
                wait,
            })?;
        }
        if let Some(b) = caller {
            b.take();
        }
        Ok(())
    }
}

/// The live state of one listener's limits.
struct State {
    limits: Arc<ListenerLimits>,
    /// tcp: connections open to the pod.
    connections: AtomicU32,
    /// http: one permit per connection to the pod (each carries one request at a time).
    slots: Arc<Semaphore>,
    /// http: requests waiting for a connection.
    pending: AtomicU32,
    /// http: idle connections to the pod; with the ones in use, never more than the permits.
    idle: Mutex<Vec<http1::SendRequest<ReplayBody>>>,
    /// http2, grpc: requests in flight.
    requests: Arc<Semaphore>,
    rate: Buckets,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl State {
    fn new(limits: Arc<ListenerLimits>) -> State {
        let permits = |n: u32| Arc::new(Semaphore::new(n as usize));
        let (slots, requests) = match limits.pool {
            Some(ConnectionPool::Http {
                max_connections, ..
            }) => (permits(max_connections), permits(0)),
            Some(
                ConnectionPool::Http2 { max_requests } | ConnectionPool::Grpc { max_requests },
            ) => (permits(0), permits(max_requests)),
            _ => (permits(0), permits(0)),
        };
        State {
            limits,
            connections: AtomicU32::new(0),
            slots,
            pending: AtomicU32::new(0),
            idle: Mutex::new(Vec::new()),
            requests,
            rate: Buckets::default(),
        }
    }

    /// Takes a token from the caller's bucket and the total one, or neither.
    fn rate(&self, rate: &RateLimit, who: &Who, now: Instant) -> Result<(), Refusal> {
        self.rate.take(rate, who, now)
    }
}

/// What [`Admission::admit`] decided for a new connection.
pub enum Admitted {
    /// No limits: splice as usual.
    Plain,
    /// A tcp connection within its limits; keep the guard while it is open.
    Tcp(ConnectionGuard),
    /// An HTTP listener with limits: serve the connection with the gate.
    Http(Gate),
}

/// One open tcp connection, counted against `tcp.maxConnections` until dropped.
pub struct ConnectionGuard(Arc<State>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The node-wide state of the limits: the destination-side ones here, the client-side
/// circuit breakers in `breakers`.
pub struct Admission {
    states: Mutex<HashMap<(ResourceId, u16), Arc<State>>>,
    pub metrics: Metrics,
    /// Connections to local pods for gated listeners without `http.maxConnections`.
    pool: Arc<Pool>,
    pub breakers: super::breaker::Breakers,
    /// Routes' `rateLimit`, applied by this (calling) agent.
    pub routes: routes::RouteLimits,
    /// Per-request telemetry; unset under `--telemetry off`.
    pub telemetry: std::sync::OnceLock<Arc<Telemetry>>,
}

impl Default for Admission {
    fn default() -> Admission {
        let metrics = Metrics::default();
        Admission {
            states: Mutex::default(),
            breakers: super::breaker::Breakers::new(metrics.breaker_overflows.clone()),
            routes: routes::RouteLimits::new(metrics.route_rate_limited.clone()),
            metrics,
            pool: Arc::default(),
            telemetry: std::sync::OnceLock::new(),
        }
    }
}

impl Admission {
    /// The circuit breaker of `source` calling `target` through `service`, if the mesh gives
    /// that backend one.
    pub fn breaker(
        &self,
        policy: &Policy,
        source: &ResourceId,
        service: &ResourceId,
        target: &ResourceId,
    ) -> Option<Arc<super::breaker::Breaker>> {
        // Most meshes have none: no look-up, no lock on the request path.
        if policy.limits.breakers.is_empty() {
            return None;
        }
        let config = policy.limits.circuit_breaker(source, service)?;
        Some(
            self.breakers
                .get(&policy.mesh, config, source, service, target),
        )
    }

    fn state(&self, policy: &Policy, limits: &Arc<ListenerLimits>) -> Arc<State> {
        let mut states = lock(&self.states);
        let key = (limits.virtual_node.clone(), limits.port);
        match states.get(&key) {
            Some(state) if *state.limits == **limits => state.clone(),
            _ => {
                // New or changed limits start afresh; connections admitted under the old ones
                // keep their old state until they close. A new mesh is the time to forget
                // listeners it no longer limits.
                states.retain(|(vn, port), _| policy.limits.get(vn, *port).is_some());
                let state = Arc::new(State::new(limits.clone()));
                states.insert(key, state.clone());
                state
            }
        }
    }

    /// Admits (or refuses) a new connection from `caller` to the local pod listener `vn`
    /// `port`.
    pub fn admit(
        &self,
        snapshot: &Snapshot,
        vn: &ResourceId,
        port: u16,
        caller: &Caller,
    ) -> Result<Admitted, Refused> {
        let policy = &snapshot.policy;
        let Some(limits) = policy.limits.get(vn, port) else {
            return Ok(Admitted::Plain);
        };
        let state = self.state(policy, limits);
        let who = Who::resolve(policy, caller);
        if limits.protocol != Protocol::Tcp {
            let telemetry = self.telemetry.get().cloned();
            let log = telemetry
                .as_ref()
                .and_then(|_| snapshot.access_logs.get(vn).cloned());
            return Ok(Admitted::Http(Gate(Arc::new(GateInner {
                state,
                who,
                metrics: self.metrics.clone(),
                pool: self.pool.clone(),
                telemetry,
                log,
                series: SeriesCache::default(),
            }))));
        }
        if let Some(rate) = &limits.rate
            && let Err(refusal) = state.rate(rate, &who, Instant::now())
        {
            self.metrics
                .limited(limits, &who, refusal.scope, rate.shadow);
            tracing::debug!(target: "strait::admission", virtual_node = %vn, port, caller = %who.key, scope = refusal.scope, shadow = rate.shadow, "tcp connection over the rate limit");
            if !rate.shadow {
                return Err(Refused::RateLimited {
                    virtual_node: vn.clone(),
                    port,
                    scope: refusal.scope,
                    wait: refusal.wait,
                });
            }
        }
        if let Some(ConnectionPool::Tcp { max_connections }) = limits.pool {
            let open = state.connections.fetch_add(1, Ordering::AcqRel);
            if open >= max_connections {
                state.connections.fetch_sub(1, Ordering::AcqRel);
                self.metrics.overflow(limits, &who, "max_connections");
                tracing::debug!(target: "strait::admission", virtual_node = %vn, port, caller = %who.key, max_connections, "tcp connection over connectionPool.tcp.maxConnections refused");
                return Err(Refused::Overflow {
                    virtual_node: vn.clone(),
                    port,
                    max: max_connections,
                });
            }
            return Ok(Admitted::Tcp(ConnectionGuard(state)));
        }
        Ok(Admitted::Plain)
    }
}

/// Same-node delivery: a stream to `pod`'s listener at `endpoint` for a caller of virtual
/// node `source`, through the listener's limits.
pub async fn deliver_local(
    admission: &Admission,
    snapshot: &Snapshot,
    source: &ResourceId,
    pod: Arc<LocalPod>,
    endpoint: SocketAddr,
) -> Result<Stream, String> {
    let admitted = admission
        .admit(
            snapshot,
            &pod.virtual_node,
            endpoint.port(),
            &Caller::Local(source.clone()),
        )
        .map_err(|e| e.to_string())?;
    let connect = || async {
        pod.connect_loopback(endpoint.ip(), endpoint.port())
            .await
            .map_err(|e| format!("same-node delivery to {} failed: {e}", pod.workload))
    };
    // A tcp listener's idle timeout, at the receiving side as App Mesh applied it.
    let idle = snapshot
        .policy
        .limits
        .tcp_idle(&pod.virtual_node, endpoint.port());
    let stream = |io| {
        super::received::wrap(
            admission,
            &snapshot.access_logs,
            &pod.virtual_node,
            endpoint,
            None,
            super::idle::stream(io, idle),
        )
    };
    match admitted {
        Admitted::Plain => Ok(stream(connect().await?)),
        Admitted::Tcp(guard) => Ok(Stream::new(Guarded {
            io: stream(connect().await?),
            _guard: guard,
        })),
        Admitted::Http(gate) => {
            let (ours, theirs) = tokio::io::duplex(PIPE_BUFFER);
            // Its life is the caller's connection: it ends when the calling proxy drops it.
            tokio::spawn(gate.serve(theirs, pod, endpoint, None));
            Ok(Stream::new(ours))
        }
    }
}

/// A stream that holds a guard as long as it lives.
pub struct Guarded<T, G> {
    pub io: T,
    pub _guard: G,
}

impl<T: AsyncRead + Unpin, G: Unpin> AsyncRead for Guarded<T, G> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin, G: Unpin> AsyncWrite for Guarded<T, G> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Serves one caller's HTTP connection to a gated listener (see the module docs).
pub struct Gate(Arc<GateInner>);

struct GateInner {
    state: Arc<State>,
    who: Who,
    metrics: Metrics,
    pool: Arc<Pool>,
    /// Receiving-side request telemetry (`reporter="destination"`), None when off.
    telemetry: Option<Arc<Telemetry>>,
    /// The listener's virtual node's access log, if it has one.
    log: Option<AccessLog>,
    /// The request series this connection's requests last counted into.
    series: SeriesCache,
}

/// The requests in flight on one connection into the gate, for its idle timeout.
#[derive(Default)]
struct Activity {
    active: AtomicU32,
    changed: tokio::sync::Notify,
}

impl Activity {
    /// Resolves once no request has been in flight for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            // A request that starts or ends wakes this up; one that starts and ends while it
            // sleeps leaves a wake-up behind, so the wait starts over from then.
            let changed = self.changed.notified();
            if self.active.load(Ordering::Acquire) > 0 {
                changed.await;
                continue;
            }
            tokio::select! {
                () = tokio::time::sleep(idle) => {
                    if self.active.load(Ordering::Acquire) == 0 {
                        return;
                    }
                }
                () = changed => {}
            }
        }
    }
}

/// One request in flight on a gated connection.
struct Active(Arc<Activity>);

impl Active {
    fn start(activity: &Arc<Activity>) -> Active {
        activity.active.fetch_add(1, Ordering::AcqRel);
        activity.changed.notify_one();
        Active(activity.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_one();
    }
}

/// What a request holds of the connection pool while it is in flight.
enum Permit {
    /// No `connectionPool`.
    None,
    /// http: a connection to the pod.
    Slot(OwnedSemaphorePermit),
    /// http2, grpc: a request in flight.
    Request(OwnedSemaphorePermit),
}

/// An http request waiting for a connection; counted in `pending` while it waits.
struct Pending<'a>(&'a AtomicU32);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Gate {
    /// Serves HTTP on `io` (a tunnel stream or the same-node pipe) until the caller closes it,
    /// the listener's `idle` timeout closes it, or, for a tunnel stream, the drain timeout runs
    /// out.
    pub async fn serve<I>(self, io: I, pod: Arc<LocalPod>, target: SocketAddr, drain: Option<Drain>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let gate = self.0;
        let idle = gate.state.limits.timeouts.and_then(|t| t.idle);
        let activity = Arc::new(Activity::default());
        let service = {
            let (gate, activity) = (gate.clone(), activity.clone());
            hyper::service::service_fn(move |request: Request<Incoming>| {
                let (gate, pod) = (gate.clone(), pod.clone());
                // In flight until its response has gone out (or was dropped).
                let active = Active::start(&activity);
                async move {
                    let mut response = gate.handle(request, &pod, target).await;
                    response.body_mut().hold(Box::new(active));
                    Ok::<_, Infallible>(response)
                }
            })
        };
        // HTTP/2 streams run on this task (see `super::streams`).
        let streams = Streams::default();
        let mut builder = auto::Builder::new(streams.clone());
        builder.http1().timer(TokioTimer::new()).half_close(true);
        builder.http2().timer(TokioTimer::new());
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(connection);
        let mut driven = Driven::new(streams);
        let expired = async {
            match &drain {
                Some(drain) => drain.expired().await,
                None => std::future::pending().await,
            }
        };
        let idle_out = async {
            match idle {
                Some(idle) => activity.idle_for(idle).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(expired, idle_out);
        let mut closing = false;
        let result = loop {
            tokio::select! {
                result = std::future::poll_fn(|cx| driven.poll(connection.as_mut(), cx)) => break result,
                () = &mut expired => break Ok(()),
                () = &mut idle_out, if !closing => {
                    // Envoy's connection idle timeout: no request in flight for that long.
                    // HTTP/1.1 closes at once (nothing is in flight), HTTP/2 says GOAWAY.
                    closing = true;
                    let limits = &gate.state.limits;
                    gate.metrics
                        .idle_closed
                        .get_or_create(&IdleLabels {
                            mesh: limits.mesh.clone(),
                            virtual_node: limits.virtual_node.to_string(),
                            source_virtual_node: gate.who.source.clone(),
                        })
                        .inc();
                    tracing::debug!(target: "strait::admission", virtual_node = %limits.virtual_node, port = limits.port, caller = %gate.who.key, ?idle, "idle connection closed (listener timeout idle)");
                    connection.as_mut().graceful_shutdown();
                }
            }
        };
        if let Err(error) = result {
            tracing::debug!(target: "strait::admission", %target, error = %crate::logging::Chain(&*error), "gated connection ended with an error");
        }
    }

    /// A tunnel stream: serves it once the CONNECT is answered.
    pub async fn serve_upgrade(
        self,
        on_upgrade: hyper::upgrade::OnUpgrade,
        pod: Arc<LocalPod>,
        target: SocketAddr,
        drain: Drain,
    ) {
        match on_upgrade.await {
            Ok(upgraded) => {
                self.serve(TokioIo::new(upgraded), pod, target, Some(drain))
                    .await
            }
            Err(error) => {
                tracing::debug!(error = %crate::logging::Chain(&error), "tunnel stream ended before it was established")
            }
        }
    }
}

impl GateInner {
    /// One request, with its receiving-side record (metrics, the server's access log line).
    async fn handle(
        &self,
        request: Request<Incoming>,
        pod: &Arc<LocalPod>,
        target: SocketAddr,
    ) -> Response<ResponseBody> {
        let grpc = headers::is_grpc(request.headers());
        let Some(telemetry) = &self.telemetry else {
            return self.admit_and_send(request, grpc, pod, target).await.0;
        };
        let limits = &self.state.limits;
        let mut record = Box::new(Record::new(
            telemetry.clone(),
            &self.series,
            &self.who.source,
            grpc,
            headers::protocol_name(request.version()),
        ));
        record.mesh.push_str(&limits.mesh);
        record.reporter = "destination";
        Record::set(&mut record.target_virtual_node, &limits.virtual_node);
        record.upstream_host = Some(target);
        record.log = self.log.clone();
        if record.log.is_some() {
            record.method = request.method().to_string();
            record.path = request
                .uri()
                .path_and_query()
                .map(ToString::to_string)
                .unwrap_or_default();
            record.authority = request
                .uri()
                .authority()
                .map(ToString::to_string)
                .or_else(|| {
                    request
                        .headers()
                        .get(header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .map(str::to_owned)
                })
                .unwrap_or_default();
            record.request_headers(request.headers());
        }
        let (mut response, flag) = self.admit_and_send(request, grpc, pod, target).await;
        if flag == Some("UT") {
            record.timeouts.push(
                if limits.timeouts.is_some_and(|t| t.per_request.is_some()) {
                    "per_request"
                } else {
                    "idle"
                },
            );
        }
        record.flags.extend(flag);
        record.response(response.status().as_u16(), response.headers());
        response.body_mut().attach(record);
        response
    }

    /// Admits one request under the listener's limits and delivers it to the pod within the
    /// listener's timeouts; the answer, and the Envoy response flag of a reply made here.
    async fn admit_and_send(
        &self,
        request: Request<Incoming>,
        grpc: bool,
        pod: &Arc<LocalPod>,
        target: SocketAddr,
    ) -> (Response<ResponseBody>, Option<&'static str>) {
        let limits = &self.state.limits;
        let timeouts = limits.timeouts.unwrap_or(ReceivingTimeouts {
            per_request: None,
            idle: None,
        });
        let now = tokio::time::Instant::now();
        // Checked: a deadline past what the clock can hold is no deadline.
        let deadline = timeouts
            .per_request
            .and_then(|d| Some((d, now.checked_add(d)?)));
        // Without a per-request timeout, the idle timeout bounds the wait for the response's
        // head (as the calling side does).
        let bound = deadline.or_else(|| timeouts.idle.and_then(|d| Some((d, now.checked_add(d)?))));
        let sent = self.admit_and_send_within(request, pod, target, grpc, deadline, timeouts.idle);
        let Some((limit, at)) = bound else {
            return sent.await;
        };
        match tokio::time::timeout_at(at, sent).await {
            Ok(answer) => answer,
            Err(_) => {
                tracing::debug!(target: "strait::admission", virtual_node = %limits.virtual_node, port = limits.port, %target, ?limit, "the pod did not answer within the listener's timeout");
                (
                    local(
                        grpc,
                        StatusCode::GATEWAY_TIMEOUT,
                        &format!(
                            "virtual node {}: upstream request timeout after {limit:?} (listener timeout)",
                            limits.virtual_node
                        ),
                        None,
                    ),
                    Some("UT"),
                )
            }
        }
    }

    async fn admit_and_send_within(
        &self,
        mut request: Request<Incoming>,
        pod: &Arc<LocalPod>,
        target: SocketAddr,
        grpc: bool,
        deadline: Option<(Duration, tokio::time::Instant)>,
        idle: Option<Duration>,
    ) -> (Response<ResponseBody>, Option<&'static str>) {
        let limits = &self.state.limits;
        if let Some(rate) = &limits.rate
            && let Err(refusal) = self.state.rate(rate, &self.who, Instant::now())
        {
            self.metrics
                .limited(limits, &self.who, refusal.scope, rate.shadow);
            tracing::debug!(target: "strait::admission", virtual_node = %limits.virtual_node, port = limits.port, caller = %self.who.key, scope = refusal.scope, shadow = rate.shadow, "request over the rate limit");
            if !rate.shadow {
                return (
                    rate_limited(grpc, &limits.virtual_node, refusal),
                    Some("RL"),
                );
            }
        }
        let permit = match self.permit().await {
            Ok(permit) => permit,
            Err(reason) => {
                self.metrics.overflow(limits, &self.who, reason);
                tracing::debug!(target: "strait::admission", virtual_node = %limits.virtual_node, port = limits.port, caller = %self.who.key, reason, "request over the connection pool refused");
                return (overloaded(grpc, &limits.virtual_node, reason), Some("UO"));
            }
        };
        let proto = match limits.protocol {
            Protocol::Http | Protocol::Tcp => Proto::Http1,
            Protocol::Http2 | Protocol::Grpc => Proto::Http2,
        };
        let upgrade = proto == Proto::Http1 && headers::is_upgrade(request.headers());
        let on_client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
        let request = match prepare(request, proto, target) {
            Ok(request) => request,
            Err(error) => {
                return (
                    local(
                        grpc,
                        StatusCode::BAD_REQUEST,
                        &format!("malformed request: {error}"),
                        None,
                    ),
                    Some("DPE"),
                );
            }
        };
        let sent = match permit {
            Permit::Slot(permit) => self.send_on_slot(pod, target, request, permit).await,
            Permit::Request(permit) => self
                .send_pooled(pod, target, proto, request)
                .await
                .map(|(r, g)| (r, [Some(Box::new(permit) as Guard), g])),
            Permit::None => self
                .send_pooled(pod, target, proto, request)
                .await
                .map(|(r, g)| (r, [None, g])),
        };
        let (mut response, guards) = match sent {
            Ok(sent) => sent,
            Err(error) => {
                tracing::debug!(target: "strait::admission", virtual_node = %limits.virtual_node, %target, %error, "delivery to the pod failed");
                return (
                    local(
                        grpc,
                        StatusCode::SERVICE_UNAVAILABLE,
                        &format!("delivery to {} failed: {error}", pod.workload),
                        None,
                    ),
                    Some("UF"),
                );
            }
        };
        let mut guards: Guards = guards.into_iter().flatten().collect();
        let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        if switching && let Some(client) = on_client_upgrade {
            // The upgraded connection keeps its connection-pool permit until it ends.
            let server = hyper::upgrade::on(&mut response);
            let held = std::mem::take(&mut guards);
            tokio::spawn(async move {
                if let Ok((client, server)) = tokio::try_join!(client, server) {
                    let (mut client, mut server) = (TokioIo::new(client), TokioIo::new(server));
                    let _ = super::copy::bidirectional(&mut client, &mut server).await;
                }
                drop(held);
            });
        }
        let (mut parts, body) = response.into_parts();
        headers::remove_hop_by_hop(&mut parts.headers, switching);
        (
            Response::from_parts(parts, ResponseBody::upstream(body, deadline, idle, guards)),
            None,
        )
    }

    /// The connection pool's word on one more request.
    async fn permit(&self) -> Result<Permit, &'static str> {
        match self.state.limits.pool {
            Some(ConnectionPool::Http {
                max_pending_requests,
                ..
            }) => {
                if let Ok(permit) = self.state.slots.clone().try_acquire_owned() {
                    return Ok(Permit::Slot(permit));
                }
                // App Mesh's default: 2^31-1, as good as unlimited.
                let max_pending = max_pending_requests.unwrap_or(i32::MAX as u32);
                if self.state.pending.fetch_add(1, Ordering::AcqRel) >= max_pending {
                    self.state.pending.fetch_sub(1, Ordering::AcqRel);
                    return Err("max_pending_requests");
                }
                let _pending = Pending(&self.state.pending);
                // The semaphore is never closed; the caller's own timeout bounds the wait.
                self.state
                    .slots
                    .clone()
                    .acquire_owned()
                    .await
                    .map(Permit::Slot)
                    .map_err(|_| "max_pending_requests")
            }
            Some(ConnectionPool::Http2 { .. } | ConnectionPool::Grpc { .. }) => self
                .state
                .requests
                .clone()
                .try_acquire_owned()
                .map(Permit::Request)
                .map_err(|_| "max_requests"),
            _ => Ok(Permit::None),
        }
    }

    /// http with `maxConnections`: one of at most that many connections to the pod.
    async fn send_on_slot(
        &self,
        pod: &Arc<LocalPod>,
        target: SocketAddr,
        mut request: Request<ReplayBody>,
        permit: OwnedSemaphorePermit,
    ) -> Result<(Response<Incoming>, [Option<Guard>; 2]), String> {
        loop {
            let idle = {
                let mut idle = lock(&self.state.idle);
                std::iter::from_fn(|| idle.pop()).find(|s| s.is_ready() && !s.is_closed())
            };
            let reused = idle.is_some();
            let mut sender = match idle {
                Some(sender) => sender,
                None => {
                    let stream = pod
                        .connect_loopback(target.ip(), target.port())
                        .await
                        .map_err(|e| format!("connect: {e}"))?;
                    let _ = stream.set_nodelay(true);
                    let (sender, connection) = http1::Builder::new()
                        .handshake(TokioIo::new(stream))
                        .await
                        .map_err(|e| format!("HTTP handshake: {e}"))?;
                    tokio::spawn(async move {
                        let _ = connection.with_upgrades().await;
                    });
                    sender
                }
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let back = SlotReturn {
                        state: self.state.clone(),
                        sender: Some(sender),
                        permit: Some(permit),
                    };
                    return Ok((response, [Some(Box::new(back)), None]));
                }
                // An idle connection the pod had closed: the request was not sent; again on
                // a new one (the permit still stands for at most one connection).
                Err(mut error) => match error.take_message() {
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(error.into_error().to_string()),
                },
            }
        }
    }

    async fn send_pooled(
        &self,
        pod: &Arc<LocalPod>,
        target: SocketAddr,
        proto: Proto,
        request: Request<ReplayBody>,
    ) -> Result<(Response<Incoming>, Option<Guard>), String> {
        let key = pool::Key {
            source: Arc::new(self.state.limits.virtual_node.clone()),
            endpoint: target,
        };
        let dial = || -> BoxFuture<'_, std::io::Result<Stream>> {
            let pod = pod.clone();
            Box::pin(async move {
                let stream = pod.connect_loopback(target.ip(), target.port()).await?;
                let _ = stream.set_nodelay(true);
                Ok(Stream::new(stream))
            })
        };
        self.pool
            .send(&key, &dial, proto, None, request)
            .await
            .map_err(|e| e.to_string())
    }
}

/// Gives an http connection back (idle) before its permit, so that connections never
/// outnumber permits.
struct SlotReturn {
    state: Arc<State>,
    sender: Option<http1::SendRequest<ReplayBody>>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Drop for SlotReturn {
    fn drop(&mut self) {
        let (Some(mut sender), permit) = (self.sender.take(), self.permit.take()) else {
            return;
        };
        if sender.is_ready() {
            lock(&self.state.idle).push(sender);
            drop(permit);
            return;
        }
        if sender.is_closed() || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        // The connection turns ready a moment after the response's last byte is read.
        let state = self.state.clone();
        tokio::spawn(async move {
            let ready = tokio::time::timeout(Duration::from_secs(1), sender.ready());
            if let Ok(Ok(())) = ready.await {
                lock(&state.idle).push(sender);
            }
            drop(permit);
        });
    }
}

/// The caller's request as the pod's listener protocol wants it.
fn prepare(
    request: Request<Incoming>,
    proto: Proto,
    target: SocketAddr,
) -> Result<Request<ReplayBody>, http::Error> {
    let (mut parts, body) = request.into_parts();
    let authority = parts
        .uri
        .authority()
        .map(ToString::to_string)
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| target.to_string());
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    match proto {
        Proto::Http1 => {
            parts.version = Version::HTTP_11;
            parts.uri = path.parse()?;
            if !parts.headers.contains_key(header::HOST) {
                parts.headers.insert(header::HOST, authority.parse()?);
            }
        }
        Proto::Http2 => {
            parts.version = Version::HTTP_2;
            parts.uri = format!("http://{authority}{path}").parse()?;
            parts.headers.remove(header::HOST);
        }
    }
    Ok(Request::from_parts(parts, ReplayBody::new(body)))
}

/// 503 with `x-envoy-overloaded` (gRPC: UNAVAILABLE), as Envoy answers a circuit breaker
/// overflow.
fn overloaded(grpc: bool, vn: &ResourceId, reason: &str) -> Response<ResponseBody> {
    let mut response = local(
        grpc,
        StatusCode::SERVICE_UNAVAILABLE,
        &format!("virtual node {vn}: connectionPool overflow ({reason})"),
        Some(14),
    );
    response
        .headers_mut()
        .insert(OVERLOADED, HeaderValue::from_static("true"));
    response
}

/// 429 with `retry-after` and `x-envoy-ratelimited` (gRPC: RESOURCE_EXHAUSTED).
fn rate_limited(grpc: bool, vn: &ResourceId, refusal: Refusal) -> Response<ResponseBody> {
    rate_limited_reply(
        grpc,
        &format!("virtual node {vn}: rate limited ({})", refusal.scope),
        refusal.wait,
    )
}

/// A rate limit's refusal: 429 with `retry-after` (whole seconds until a token is back, at
/// least 1) and `x-envoy-ratelimited` (gRPC: RESOURCE_EXHAUSTED). Listeners and gateways.
pub(crate) fn rate_limited_reply(
    grpc: bool,
    message: &str,
    wait: Duration,
) -> Response<ResponseBody> {
    let mut response = local(grpc, StatusCode::TOO_MANY_REQUESTS, message, Some(8));
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let headers = response.headers_mut();
    headers.insert(RATE_LIMITED, HeaderValue::from_static("true"));
    headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
    response
}

/// A reply made by the gate: text for HTTP, a trailers-only gRPC status for gRPC.
fn local(
    grpc: bool,
    status: StatusCode,
    message: &str,
    grpc_code: Option<u32>,
) -> Response<ResponseBody> {
    let mut response = if grpc {
        let mut response = Response::new(ResponseBody::local(Bytes::new()));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", HeaderValue::from(grpc_code.unwrap_or(14)));
        if let Ok(value) = HeaderValue::from_str(message) {
            headers.insert("grpc-message", value);
        }
        response
    } else {
        let text = format!("strait: {message}\n");
        let mut response = Response::new(ResponseBody::local(Bytes::from(text)));
        *response.status_mut() = status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    };
    response
        .headers_mut()
        .insert(header::SERVER, HeaderValue::from_static("strait"));
    response
}

/// The Envoy response flag of a reply the gate refused (`UO` overflow, `RL` rate limited), for
/// the calling proxy's access log; None for anything else.
pub fn response_flag(headers: &http::HeaderMap) -> Option<&'static str> {
    if headers.contains_key(OVERLOADED) {
        Some("UO")
    } else if headers.contains_key(RATE_LIMITED) {
        Some("RL")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::{Bucket, RateLimitOverride};

    fn limits(rate: RateLimit) -> Arc<ListenerLimits> {
        Arc::new(ListenerLimits {
            mesh: "m".into(),
            virtual_node: ResourceId::new("ns", "server"),
            port: 8080,
            protocol: Protocol::Http,
            pool: None,
            rate: Some(rate),
            logged: false,
            timeouts: None,
        })
    }

    fn who(key: &str, vn: &str) -> Who {
        Who {
            key: key.into(),
            virtual_nodes: BTreeSet::from([ResourceId::new("ns", vn)]),
            identities: vec![key.into()],
            source: format!("ns/{vn}"),
        }
    }

    fn bucket(requests_per_second: u32) -> Bucket {
        Bucket {
            requests_per_second,
            burst: None,
        }
    }

    #[test]
    fn per_caller_buckets_are_separate_and_overrides_win() {
        let rate = RateLimit {
            per_caller: Some(bucket(2)),
            overrides: vec![RateLimitOverride {
                callers: vec![RateLimitCaller::VirtualNode(ResourceId::new("ns", "vip"))],
                limit: bucket(5),
            }],
            ..RateLimit::default()
        };
        let state = State::new(limits(rate.clone()));
        let now = Instant::now();
        let (a, b, vip) = (who("id-a", "a"), who("id-b", "b"), who("id-vip", "vip"));
        let served = |w: &Who| {
            (0..10)
                .filter(|_| state.rate(&rate, w, now).is_ok())
                .count()
        };
        assert_eq!(served(&a), 2);
        assert_eq!(served(&b), 2);
        assert_eq!(served(&vip), 5);
        let refusal = state.rate(&rate, &vip, now).err().unwrap();
        assert_eq!(refusal.scope, "override");
        assert_eq!(refusal.wait, Duration::from_millis(200));
        assert_eq!(state.rate(&rate, &a, now).err().unwrap().scope, "caller");
    }

    #[test]
    fn a_caller_refused_by_its_own_bucket_takes_nothing_from_the_total() {
        let rate = RateLimit {
            total: Some(bucket(3)),
            per_caller: Some(bucket(1)),
            ..RateLimit::default()
        };
        let state = State::new(limits(rate.clone()));
        let now = Instant::now();
        let a = who("id-a", "a");
        assert!(state.rate(&rate, &a, now).is_ok());
        for _ in 0..5 {
            assert_eq!(state.rate(&rate, &a, now).err().unwrap().scope, "caller");
        }
        // The total still has two tokens for others.
        assert!(state.rate(&rate, &who("id-b", "b"), now).is_ok());
        assert!(state.rate(&rate, &who("id-c", "c"), now).is_ok());
        assert_eq!(
            state
                .rate(&rate, &who("id-d", "d"), now)
                .err()
                .unwrap()
                .scope,
            "total"
        );
    }

    #[test]
    fn identity_overrides_match_tunnel_and_same_node_callers() {
        let named = RateLimitCaller::Identity("spiffe://m/ns/ns/vn/vip".into());
        let tunnel = Who::resolve(
            &Policy::default(),
            &Caller::Tunnel(vec!["vip.ns.svc".into(), "spiffe://m/ns/ns/vn/vip".into()]),
        );
        assert_eq!(tunnel.key, "spiffe://m/ns/ns/vn/vip");
        assert!(tunnel.matches(&named));
        let anonymous = Who::resolve(&Policy::default(), &Caller::Tunnel(Vec::new()));
        assert_eq!(anonymous.key, "");
        assert!(!anonymous.matches(&named));
        let local = Who::resolve(
            &Policy::default(),
            &Caller::Local(ResourceId::new("ns", "vip")),
        );
        assert!(local.matches(&RateLimitCaller::VirtualNode(ResourceId::new("ns", "vip"))));
        assert_eq!(local.source, "ns/vip");
    }

    #[test]
    fn limits_compile_listeners_and_breakers_with_a_backends_own_over_the_defaults() {
        let yaml = r#"
apiVersion: appmesh.k8s.aws/v1beta2
kind: Mesh
metadata: {name: m}
spec: {namespaceSelector: {}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {name: client, namespace: app}
spec:
  backends:
    - virtualService:
        virtualServiceRef: {name: a}
        clientPolicy: {circuitBreaker: {maxRequests: 5}}
    - virtualService: {virtualServiceRef: {name: b}}
  backendDefaults: {clientPolicy: {circuitBreaker: {maxRetries: 2}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {name: server, namespace: app}
spec:
  listeners:
    - portMapping: {port: 8080, protocol: http}
      rateLimit: {requestsPerSecond: 10}
    - portMapping: {port: 9090, protocol: tcp}
  serviceDiscovery: {static: {addresses: [10.0.0.9]}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {name: a, namespace: app}
spec: {provider: {virtualNode: {virtualNodeRef: {name: server}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {name: b, namespace: app}
spec: {provider: {virtualNode: {virtualNodeRef: {name: server}}}}
"#;
        let mesh = crate::mesh::parse_str(yaml, std::path::Path::new("limits.yaml"))
            .expect("valid mesh")
            .config;
        let limits = Limits::compile(&mesh);
        let (client, server) = (
            ResourceId::new("app", "client"),
            ResourceId::new("app", "server"),
        );
        let http = limits
            .get(&server, 8080)
            .expect("the rate-limited listener");
        assert_eq!(http.protocol, Protocol::Http);
        assert_eq!(http.mesh, "m");
        assert!(limits.get(&server, 9090).is_none(), "no limits: not gated");
        let a = limits.circuit_breaker(&client, &ResourceId::new("app", "a"));
        assert_eq!(a.and_then(|b| b.max_requests), Some(5));
        assert_eq!(a.and_then(|b| b.max_retries), None, "its own, not merged");
        let b = limits.circuit_breaker(&client, &ResourceId::new("app", "b"));
        assert_eq!(b.and_then(|b| b.max_retries), Some(2));
        assert!(
            limits
                .circuit_breaker(&server, &ResourceId::new("app", "a"))
                .is_none()
        );
    }

    #[test]
    fn response_flags_name_the_refusal() {
        let vn = ResourceId::new("ns", "server");
        let r = overloaded(false, &vn, "max_pending_requests");
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response_flag(r.headers()), Some("UO"));
        let r = rate_limited(
            true,
            &vn,
            Refusal {
                scope: "total",
                wait: Duration::from_millis(1500),
            },
        );
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "8");
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        assert_eq!(response_flag(r.headers()), Some("RL"));
        assert_eq!(response_flag(&http::HeaderMap::new()), None);
    }
}
