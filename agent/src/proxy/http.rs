//! The HTTP proxy: HTTP/1.1, HTTP/2 and gRPC for virtual service ports whose provider speaks
//! http, http2 or grpc. The outbound listener hands it a captured client connection; it serves
//! HTTP on it (HTTP/1.1 or HTTP/2 prior knowledge, detected from the first bytes) and sends each
//! request on by the App Mesh route it matches ([`crate::routing::http`]).
//!
//! Per request: normalise the path, pick the route (404, or gRPC UNIMPLEMENTED, when none
//! matches), pick a weighted target (per request, so a 90/10 canary is 90/10 of requests),
//! pick an endpoint of the target's virtual node (power of two choices on requests in flight,
//! healthy endpoints only: [`balance`]), and send it over a pooled connection ([`pool`]),
//! retrying as the route's retry policy (or App Mesh's implicit one) says while the request
//! body can be replayed ([`body`]), within the per-request timeout. The response streams back
//! under the route's per-request and idle timeouts. Protocol upgrades (WebSocket) are passed
//! through as a byte tunnel once the upstream answers 101.
//!
//! Errors the client can act on: 503 when no endpoint could be reached or it reset, 504 when
//! the timeout expired, 400 for a request the proxy cannot forward; each with a short body that
//! names the virtual service and route. gRPC clients get the same as a gRPC status.
//!
//! Telemetry: each request gets a [`Record`] (metrics, access log line, client span) that rides
//! on the response body and is recorded when the response ends; the trace context is read and
//! the upstream request gets the proxy's span as its parent ([`crate::telemetry::trace`]).
//!
//! What it leaves to others: capturing the connection and finding its original destination
//! (`outbound`), reaching an endpoint (`upstream`), and health checking ([`health`]).

pub mod balance;
pub mod body;
#[cfg(test)]
mod fuzz;
pub mod headers;
pub mod health;
pub mod outlier;
pub mod pool;
mod route;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::uri::{InvalidUri, PathAndQuery};
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rand::Rng as _;
use smallvec::SmallVec;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use crate::mesh::ResourceId;
use crate::proxy::upstream;

use self::balance::InFlight;
use self::body::{Guard, Guards, ReplayBody, ResponseBody};
use self::pool::{Pool, Proto};
use self::route::{Routed, Way};
use super::breaker::{Breaker, RetryGuard};
use super::outbound::Source;
use super::{Context, Drain};
use crate::logging::Chain;
use crate::mesh::Protocol;
use crate::routing::ServicePort;
use crate::routing::http::{HttpRoute, HttpTarget, RouteRateLimit};
use crate::state::State as Snapshot;
use crate::telemetry::request::Record;
use crate::telemetry::trace;
use crate::telemetry::{SeriesCache, Telemetry};

/// Responses up to this length (`content-length`) are sent with their first bytes read ahead
/// ([`ResponseBody::prefetch`]); longer or open-ended ones (streams, gRPC) stream as they come.
const PREFETCH_LIMIT: u64 = 64 * 1024;

/// First retry backoff (Envoy's default base interval); doubles per retry, with full jitter.
const RETRY_BACKOFF: Duration = Duration::from_millis(25);

/// The HTTP proxy's state shared by every connection: pooled upstream connections and the
/// endpoints' load and health.
#[derive(Default)]
pub struct Http {
    pub pool: Arc<Pool>,
    pub endpoints: balance::Registry,
}

/// What request handling needs from the agent; the agent's [`Context`] in production, a small
/// stand-in in the request-path fuzz tests (which run without eBPF).
pub trait Env: Send + Sync + 'static {
    /// The state in force: a request takes it once and passes it to the calls below, so all
    /// it reads (route, backend rule, breaker, access log) is of one mesh version.
    fn snapshot(&self) -> Arc<Snapshot>;
    fn http(&self) -> &Http;
    /// The mesh's backend rule for this request (see `upstream::authorize`).
    fn authorize(
        &self,
        snapshot: &Snapshot,
        source: &Source,
        service: &ResourceId,
        target_node: &ResourceId,
    ) -> Result<(), String>;
    /// A new upstream stream on behalf of `source` (see `upstream::dial`): same-node, plain,
    /// or through the mTLS tunnel to the endpoint's node.
    fn dial<'a>(
        &'a self,
        snapshot: &'a Snapshot,
        source: &'a Source,
        service: &'a ResourceId,
        target_node: &'a ResourceId,
        endpoint: SocketAddr,
    ) -> BoxFuture<'a, std::io::Result<upstream::Stream>>;
    /// Per-request telemetry; None under `--telemetry off`.
    fn telemetry(&self) -> Option<&Arc<Telemetry>> {
        None
    }
    /// The circuit breaker of `source`'s backend `service` towards `target_node`, if any.
    fn breaker(
        &self,
        _snapshot: &Snapshot,
        _source: &ResourceId,
        _service: &ResourceId,
        _target_node: &ResourceId,
    ) -> Option<Arc<Breaker>> {
        None
    }
    /// One request of `source` through a route with a `rateLimit` (see
    /// [`super::admission::routes`]).
    fn route_rate_limit(
        &self,
        _snapshot: &Snapshot,
        _service: &ResourceId,
        _route: &str,
        _limit: &RouteRateLimit,
        _source: &ResourceId,
    ) -> Result<(), super::admission::routes::Limited> {
        Ok(())
    }
}

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

impl Env for Context {
    fn snapshot(&self) -> Arc<Snapshot> {
        self.state.snapshot()
    }

    fn http(&self) -> &Http {
        &self.http
    }

    fn authorize(
        &self,
        snapshot: &Snapshot,
        source: &Source,
        service: &ResourceId,
        target_node: &ResourceId,
    ) -> Result<(), String> {
        let caller = upstream::Caller {
            workload: &source.workload,
            virtual_node: &source.virtual_node,
            service,
        };
        upstream::authorize(&self.transport, &snapshot.policy, &caller, target_node)
            .map_err(|e| e.to_string())
    }

    fn dial<'a>(
        &'a self,
        snapshot: &'a Snapshot,
        source: &'a Source,
        service: &'a ResourceId,
        target_node: &'a ResourceId,
        endpoint: SocketAddr,
    ) -> BoxFuture<'a, std::io::Result<upstream::Stream>> {
        Box::pin(async move {
            let caller = upstream::Caller {
                workload: &source.workload,
                virtual_node: &source.virtual_node,
                service,
            };
            upstream::dial(&self.transport, snapshot, &caller, target_node, endpoint)
                .await
                .map_err(std::io::Error::other)
        })
    }

    fn telemetry(&self) -> Option<&Arc<Telemetry>> {
        self.telemetry.as_ref()
    }

    fn breaker(
        &self,
        snapshot: &Snapshot,
        source: &ResourceId,
        service: &ResourceId,
        target_node: &ResourceId,
    ) -> Option<Arc<Breaker>> {
        self.transport
            .admission
            .breaker(&snapshot.policy, source, service, target_node)
    }

    fn route_rate_limit(
        &self,
        snapshot: &Snapshot,
        service: &ResourceId,
        route: &str,
        limit: &RouteRateLimit,
        source: &ResourceId,
    ) -> Result<(), super::admission::routes::Limited> {
        self.transport
            .admission
            .routes
            .check(&snapshot.policy, service, route, limit, source)
    }
}

/// Starts the agent-wide HTTP tasks (health checks).
pub fn start(ctx: &Arc<Context>) {
    health::spawn(ctx.clone());
}

/// Serves HTTP on a captured client connection until it closes, or drains it when its listener
/// stops (see [`Drain`]).
///
/// Draining loses no request: an HTTP/1.1 connection is not closed while the client may be
/// sending on it. Its next response says `Connection: close` and the connection closes after
/// that response; one that stays idle is closed only when the drain timeout runs out (a client
/// that sends its next request at that very moment can still meet the close: the timeout is the
/// bound). hyper's own graceful shutdown is not used for HTTP/1.1 because it closes an idle
/// connection at once, under a request the client may already have sent. An HTTP/2 connection
/// gets GOAWAY (hyper sends it twice: first with the highest stream id, then, after a PING
/// round trip, with the last stream it took), its streams finish, and it closes.
pub async fn serve<E: Env, I>(
    io: I,
    orig_dst: SocketAddr,
    source: Arc<Source>,
    env: Arc<E>,
    drain: Drain,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    serve_with(io, orig_dst, source, env, drain, None).await;
}

/// A gateway listener's choice of virtual service, per request (`crate::gateway`): a pod's
/// outbound connection is to one virtual service, a gateway's requests each name theirs.
pub trait Ingress: Send + Sync + 'static {
    /// Matches the request (rewriting it as its route says) and returns the virtual service
    /// port it goes to and the route's name; or what the edge answers itself.
    fn route(
        &self,
        state: &Snapshot,
        parts: &mut Parts,
    ) -> Result<(Arc<ServicePort>, String), EdgeReply>;
}

/// A gateway listener's own answer to a request it does not forward.
pub enum EdgeReply {
    /// No route, a malformed request, a listener gone: the status and message (flag `NR`).
    Refused(StatusCode, String),
    /// The listener's `rateLimit`: 429 with `retry-after` and `x-envoy-ratelimited` (gRPC:
    /// RESOURCE_EXHAUSTED), flag `RL`.
    RateLimited { message: String, wait: Duration },
    /// The edge answers the request itself (the listener's health check), out of the
    /// request metrics and access logs.
    Answer(EdgeAnswer),
}

/// How the edge answers a request it serves itself; it may read the request's body.
pub type EdgeAnswer =
    Box<dyn FnOnce(Request<Incoming>) -> BoxFuture<'static, Response<ResponseBody>> + Send>;

impl std::fmt::Debug for EdgeReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EdgeReply::Refused(status, message) => write!(f, "Refused({status}, {message:?})"),
            EdgeReply::RateLimited { message, wait } => {
                write!(f, "RateLimited({message:?}, {wait:?})")
            }
            EdgeReply::Answer(_) => f.write_str("Answer"),
        }
    }
}

impl From<(StatusCode, String)> for EdgeReply {
    fn from((status, message): (StatusCode, String)) -> Self {
        EdgeReply::Refused(status, message)
    }
}

/// Serves HTTP on a gateway listener's connection as [`serve`] does, each request sent to the
/// virtual service `ingress` picks; `local` is the listener's address.
pub async fn serve_ingress<E: Env, I>(
    io: I,
    local: SocketAddr,
    source: Arc<Source>,
    env: Arc<E>,
    drain: Drain,
    ingress: Arc<dyn Ingress>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    serve_with(io, local, source, env, drain, Some(ingress)).await;
}

async fn serve_with<E: Env, I>(
    io: I,
    orig_dst: SocketAddr,
    source: Arc<Source>,
    env: Arc<E>,
    drain: Drain,
    ingress: Option<Arc<dyn Ingress>>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let downstream = Arc::new(Downstream {
        env,
        orig_dst,
        pool_source: Arc::new(source.virtual_node.clone()),
        source_name: source.virtual_node.to_string(),
        source,
        ingress,
        upstreams: Arc::default(),
        series: SeriesCache::default(),
    });
    let upstreams = downstream.upstreams.clone();
    let pool = downstream.env.http().pool.clone();
    // Which HTTP the connection speaks is known from its first request.
    let http2_seen = Arc::new(tokio::sync::Notify::new());
    let service = {
        let (drain, http2_seen) = (drain.clone(), http2_seen.clone());
        let http2_known = Arc::new(std::sync::atomic::AtomicBool::new(false));
        service_fn(move |request: Request<Incoming>| {
            let (downstream, drain) = (downstream.clone(), drain.clone());
            let version = request.version();
            if version == Version::HTTP_2
                && !http2_known.swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                http2_seen.notify_one();
            }
            async move {
                let mut response = downstream.handle(request).await;
                if version < Version::HTTP_2
                    && drain.started()
                    && response.status() != StatusCode::SWITCHING_PROTOCOLS
                {
                    // hyper closes the connection after a response that says so.
                    response
                        .headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                Ok::<_, Infallible>(response)
            }
        })
    };
    // HTTP/2 streams run on this task, like the upstream connections (see `streams`).
    let streams = super::streams::Streams::default();
    let mut builder = auto::Builder::new(streams.clone());
    // A client may shut down its sending side while it waits for the answer (`printf ... |
    // nc`); that is no reason to drop the answer.
    builder.http1().timer(TokioTimer::new()).half_close(true);
    builder.http2().timer(TokioTimer::new());
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(connection);
    let expired = drain.expired();
    tokio::pin!(expired);
    let (mut draining, mut http2, mut goaway) = (false, false, false);
    // The connection's own upstream connections are driven here, on its task (see `pool`),
    // as a part of their own (see `parts`): the upstream connections first, so that a response
    // one of them read is written to the client in the same poll, and again after the client's
    // connection if it handed one a request, instead of after a wake-up of this task by itself.
    const UPSTREAMS: usize = 0;
    const CLIENT: usize = 1;
    let parts = super::parts::Parts::<2>::default();
    let shut_down = std::sync::atomic::AtomicBool::new(false);
    let mut driven = super::streams::Driven::new(streams);
    let mut served = None;
    let mut serving = std::future::poll_fn(|cx| {
        if shut_down.swap(false, std::sync::atomic::Ordering::Relaxed) {
            connection.as_mut().graceful_shutdown();
            parts.mark_woken(CLIENT);
        }
        parts.poll(cx, |part, cx| {
            if part == UPSTREAMS {
                upstreams.poll_connections(cx);
                upstreams.poll_release_idle(&pool, cx);
            } else if served.is_none()
                && let std::task::Poll::Ready(result) = driven.poll(connection.as_mut(), cx)
            {
                served = Some(result);
            }
        });
        served
            .take()
            .map_or(std::task::Poll::Pending, std::task::Poll::Ready)
    });
    let result = loop {
        tokio::select! {
            result = &mut serving => break result,
            () = drain.signal.cancelled(), if !draining => draining = true,
            () = http2_seen.notified(), if !http2 => http2 = true,
            () = &mut expired => {
                tracing::debug!(%orig_dst, "client HTTP connection closed at the drain timeout");
                break Ok(());
            }
        }
        if draining && http2 && !goaway {
            shut_down.store(true, std::sync::atomic::Ordering::Relaxed);
            goaway = true;
        }
    };
    upstreams.hand_over(&pool);
    if let Err(error) = result {
        tracing::debug!(%orig_dst, error = %crate::logging::Chain(&*error), "client HTTP connection ended with an error");
    }
}

struct Downstream<E> {
    env: Arc<E>,
    orig_dst: SocketAddr,
    source: Arc<Source>,
    /// `source`'s virtual node as the pool's keys hold it (made once per connection).
    pool_source: Arc<ResourceId>,
    /// `source`'s virtual node as telemetry names it (formatted once per connection).
    source_name: String,
    /// A gateway listener's routes; None for a pod's outbound connection.
    ingress: Option<Arc<dyn Ingress>>,
    /// The HTTP/1.1 upstream connections this connection's task drives (see `pool`).
    upstreams: Arc<pool::Local>,
    /// The request series this connection's requests last counted into.
    series: SeriesCache,
}

/// Why no upstream response came back.
#[derive(Debug)]
enum Failure {
    /// The mesh's backend rules do not let the caller reach the target.
    Forbidden(String),
    Connect(String),
    Reset(String),
    Timeout(Duration),
    NoEndpoints,
    Unsupported(&'static str),
    BadRequest(String),
    /// The backend's circuit breaker is full (`max_requests`, `max_pending_requests`).
    Overflow(&'static str),
}

struct Upstream {
    response: Response<Incoming>,
    endpoint: SocketAddr,
    guards: Guards,
}

/// One request's facts, for the request log and telemetry.
struct Outcome<'a> {
    route: &'a str,
    virtual_node: &'a ResourceId,
    endpoint: Option<SocketAddr>,
    attempts: u32,
    /// What each retry retried (`connect_failure`, `status`, ...).
    retries: Vec<&'static str>,
    /// Route timeouts that expired while waiting for response headers.
    timeouts: Vec<&'static str>,
    /// A retry the policy asked for was not made: the circuit breaker's retry budget
    /// (`maxRetries`) was spent (Envoy's flag `UO`).
    retry_overflow: bool,
    /// The answer is one the policy would have retried, but the attempts were used up
    /// (Envoy's flag `URX`).
    retries_exhausted: bool,
}

/// Envoy's response flag for a failure, as App Mesh's access logs showed it.
fn failure_flag(failure: &Failure) -> &'static str {
    match failure {
        Failure::Forbidden(_) => "UAEX",
        Failure::Overflow(_) => "UO",
        Failure::Connect(_) => "UF",
        Failure::Reset(_) => "UC",
        Failure::Timeout(_) => "UT",
        Failure::NoEndpoints => "UH",
        Failure::Unsupported(_) | Failure::BadRequest(_) => "DPE",
    }
}

impl<E: Env> Downstream<E> {
    async fn handle(&self, request: Request<Incoming>) -> Response<ResponseBody> {
        // One snapshot per request (a connection outlives mesh reloads).
        let snapshot = self.env.snapshot();
        let grpc = headers::is_grpc(request.headers());
        let Some(telemetry) = self.env.telemetry() else {
            return self.proxy(&snapshot, request, grpc, None).await;
        };
        let mut record = Box::new(Record::new(
            telemetry.clone(),
            &self.series,
            &self.source_name,
            grpc,
            headers::protocol_name(request.version()),
        ));
        record.log = snapshot.access_logs.get(&self.source.virtual_node).cloned();
        let mut response = self
            .proxy(&snapshot, request, grpc, Some(&mut record))
            .await;
        record.response(response.status().as_u16(), response.headers());
        response.body_mut().attach(record);
        response
    }

    async fn proxy(
        &self,
        snapshot: &Snapshot,
        request: Request<Incoming>,
        grpc: bool,
        mut record: Option<&mut Record>,
    ) -> Response<ResponseBody> {
        let started = Instant::now();
        if let Some(r) = record.as_mut() {
            r.mesh.clone_from(&snapshot.table.mesh);
            if r.log.is_some() {
                r.method = request.method().to_string();
                r.path = request
                    .uri()
                    .path_and_query()
                    .map(ToString::to_string)
                    .unwrap_or_default();
                r.authority = request
                    .uri()
                    .authority()
                    .map(ToString::to_string)
                    .unwrap_or_default();
                r.request_headers(request.headers());
            }
        }
        let (mut parts, body) = request.into_parts();
        let mut way = Way::default();
        let routed = self.route(snapshot, &mut parts, &mut way);
        // What routing learned goes into the record here, once, whichever way it ended.
        if let Some(r) = record.as_mut() {
            if let Some(gateway_route) = way.gateway_route {
                r.gateway_route = gateway_route;
            }
            if let Some(service) = &way.service {
                Record::set(&mut r.target_virtual_service, &service.service);
            }
            if let Some(route) = &way.route {
                r.route.clone_from(&route.name);
            }
            if let Err(reject) = &routed {
                match reject.flag() {
                    Some(flag) => r.flags.push(flag),
                    None => r.discarded = true,
                }
            }
        }
        let routed: Routed = match routed {
            Ok(routed) => routed,
            Err(reject) => return reject.reply(grpc, Request::from_parts(parts, body)).await,
        };
        let (service, route, target) = (&routed.service, &routed.route, routed.target());
        let (path, query) = (&routed.path, &routed.query);
        let version = parts.version;
        let upgrade = version <= Version::HTTP_11 && headers::is_upgrade(&parts.headers);
        let (mut parts, body, on_client_upgrade) = if upgrade {
            let mut request = Request::from_parts(parts, body);
            let on_upgrade = hyper::upgrade::on(&mut request);
            let (parts, body) = request.into_parts();
            (parts, body, Some(on_upgrade))
        } else {
            (parts, body, None)
        };
        // The pod's address of the family it called with, as a sidecar would have seen it.
        let client_ip = self
            .source
            .ips
            .iter()
            .find(|ip| ip.is_ipv4() == self.orig_dst.is_ipv4())
            .or(self.source.ips.first())
            .copied();
        headers::prepare_request(&mut parts.headers, client_ip, upgrade);
        let path_and_query = upstream_path(&parts.uri, path, query.as_deref());
        let virtual_node = &target.target.virtual_node;
        if let Some(r) = record.as_mut() {
            Record::set(&mut r.target_virtual_node, virtual_node);
            let sampling = r.telemetry().sampling;
            r.span = trace::start(&mut parts.headers, sampling, &mut rand::rng());
            if r.wants_details() {
                r.method = parts.method.to_string();
                r.path = joined(path, query.as_deref());
                r.authority = authority(&parts.uri, &parts.headers, service).into_owned();
                r.request_headers(&parts.headers);
            }
        }
        // Checked: a deadline past what the clock can hold is no deadline (validation bounds
        // mesh durations, this keeps a bad value from panicking on every request).
        let deadline = route
            .per_request
            .and_then(|d| Some((d, started.checked_add(d)?)));
        let mut outcome = Outcome {
            route: &route.name,
            virtual_node,
            endpoint: None,
            attempts: 0,
            retries: Vec::new(),
            timeouts: Vec::new(),
            retry_overflow: false,
            retries_exhausted: false,
        };
        let body = ReplayBody::new(body);
        if let Some(r) = record.as_mut()
            && r.log.is_some()
        {
            r.bytes_received = Some(body.bytes_read());
        }
        // Read before `forward`, which may hand the headers on to the upstream request.
        let request_id = tracing::enabled!(target: "strait::request", tracing::Level::DEBUG)
            .then(|| headers::request_id(&parts.headers).to_owned());
        let result = self
            .forward(
                snapshot,
                &service.service,
                route,
                target,
                &mut parts,
                service,
                &path_and_query,
                body,
                upgrade,
                deadline.map(|(_, at)| at),
                &mut outcome,
            )
            .await;
        if let Some(r) = record.as_mut() {
            r.upstream_host = outcome.endpoint;
            r.attempts = outcome.attempts;
            r.retries = std::mem::take(&mut outcome.retries);
            r.timeouts = std::mem::take(&mut outcome.timeouts);
            if let Ok(upstream) = &result {
                r.upstream_service_time = Some(started.elapsed());
                // The destination agent refused it: overflow (UO) or rate limited (RL).
                if let Some(flag) = super::admission::response_flag(upstream.response.headers()) {
                    r.flags.push(flag);
                }
                if outcome.retries_exhausted {
                    r.flags.push("URX");
                }
            } else if let Err(failure) = &result {
                r.flags.push(failure_flag(failure));
                if !r.retries.is_empty() {
                    // Envoy: the upstream retry limit was exceeded.
                    r.flags.push("URX");
                }
            }
            if outcome.retry_overflow {
                // Envoy: a retry refused by the circuit breaker is an upstream overflow.
                r.flags.push("UO");
            }
        }
        let response = match result {
            Ok(upstream) => {
                outcome.endpoint = Some(upstream.endpoint);
                let mut response = upstream.response;
                let status = response.status();
                if status == StatusCode::SWITCHING_PROTOCOLS
                    && let Some(client) = on_client_upgrade
                {
                    let server = hyper::upgrade::on(&mut response);
                    tunnel(client, server, service.service.to_string());
                }
                let (mut rparts, rbody) = response.into_parts();
                headers::remove_hop_by_hop(
                    &mut rparts.headers,
                    status == StatusCode::SWITCHING_PROTOCOLS,
                );
                rparts.version = version;
                // A small body of known length: its first bytes go out with the head.
                let small = rparts
                    .headers
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .is_some_and(|len| len <= PREFETCH_LIMIT);
                let mut body = ResponseBody::upstream(rbody, deadline, route.idle, upstream.guards);
                if small && status != StatusCode::SWITCHING_PROTOCOLS {
                    body.prefetch().await;
                }
                Response::from_parts(rparts, body)
            }
            Err(failure) => failure_reply(grpc, &service.service, &route.name, failure),
        };
        // DEBUG, not INFO: a synchronous log line per request cost about 4 % of the box in the
        // benchmark; the access log (`logging.accessLog`) is the per-request record in
        // production. `RUST_LOG=info,strait::request=debug` turns this on.
        tracing::debug!(
            target: "strait::request",
            source_workload = %self.source.workload,
            virtual_service = %service.service,
            route = %outcome.route,
            virtual_node = %outcome.virtual_node,
            endpoint = %outcome.endpoint.map(|e| e.to_string()).unwrap_or_default(),
            method = %parts.method,
            path = %path,
            status = response.status().as_u16(),
            grpc_status = response.headers().get("grpc-status").and_then(|v| v.to_str().ok()).unwrap_or(""),
            attempts = outcome.attempts,
            request_id = %request_id.as_deref().unwrap_or(""),
            duration_ms = started.elapsed().as_millis() as u64,
            "request"
        );
        response
    }

    /// Sends the request to an endpoint of `target`, retrying as the route says.
    #[expect(
        clippy::too_many_arguments,
        reason = "one request's pieces, kept apart on purpose"
    )]
    async fn forward(
        &self,
        snapshot: &Snapshot,
        service: &ResourceId,
        route: &HttpRoute,
        target: &HttpTarget,
        parts: &mut Parts,
        service_port: &ServicePort,
        path_and_query: &Result<PathAndQuery, InvalidUri>,
        body: ReplayBody,
        upgrade: bool,
        deadline: Option<Instant>,
        outcome: &mut Outcome<'_>,
    ) -> Result<Upstream, Failure> {
        let http = self.env.http();
        let table = &snapshot.table;
        let node = &target.target.virtual_node;
        self.env
            .authorize(snapshot, &self.source, service, node)
            .map_err(Failure::Forbidden)?;
        // Inline vectors here and below: this runs for every request.
        let addrs: SmallVec<[SocketAddr; 8]> = table
            .endpoints
            .get(node)
            .map(|e| {
                e.addrs
                    .iter()
                    .map(|ip| SocketAddr::new(*ip, target.target.port))
                    .collect()
            })
            .unwrap_or_default();
        let proto = match target.protocol {
            Protocol::Http | Protocol::Tcp => Proto::Http1,
            Protocol::Http2 | Protocol::Grpc => Proto::Http2,
        };
        if upgrade && proto == Proto::Http2 {
            return Err(Failure::Unsupported(
                "the target speaks HTTP/2; protocol upgrades need an HTTP/1.1 (http) listener",
            ));
        }
        let policy = &route.retry;
        let attempts = 1 + policy.max_retries;
        let mut tried: SmallVec<[SocketAddr; 4]> = SmallVec::new();
        let mut last = Failure::NoEndpoints;
        // The backend's circuit breaker, if it has one (docs/resilience.md).
        let breaker = self
            .env
            .breaker(snapshot, &self.source.virtual_node, service, node);
        let mut request_permit = match &breaker {
            Some(b) => b.request().map_err(|o| Failure::Overflow(o.0))?,
            None => None,
        };
        let mut retry_guard = None;
        // The target listener's outlierDetection judges every attempt's answer.
        // (Most meshes have none: no key is built then.)
        let outliers = if table.outliers.is_empty() {
            None
        } else {
            table.outliers.get(&(node.clone(), target.target.port))
        };
        let judge = |state: &balance::EndpointState, server_error: bool| {
            if let Some(policy) = outliers {
                http.endpoints
                    .observe(&table.mesh, node, &addrs, state, policy, server_error);
            }
        };
        for attempt in 1..=attempts {
            let retries_left = attempt < attempts;
            let Some(attempt_body) = body.replay() else {
                // The body streamed past what is kept: it cannot be sent again.
                break;
            };
            let Some(state) = http.endpoints.pick(node, &addrs, &tried) else {
                return Err(Failure::NoEndpoints);
            };
            let endpoint = state.addr;
            tried.push(endpoint);
            outcome.attempts = attempt;
            outcome.endpoint = Some(endpoint);
            let in_flight = InFlight::new(state.clone());
            let path_and_query = path_and_query
                .as_ref()
                .map_err(|e| Failure::BadRequest(e.to_string()))?
                .clone();
            // The last attempt takes the headers; earlier ones copy them for the next.
            let headers = if retries_left {
                parts.headers.clone()
            } else {
                std::mem::take(&mut parts.headers)
            };
            let request = build_request(
                parts,
                headers,
                service_port,
                path_and_query,
                proto,
                attempt_body,
            )
            .map_err(|e| Failure::BadRequest(e.to_string()))?;
            let now = Instant::now();
            let per_try = policy.per_try_timeout.and_then(|d| now.checked_add(d));
            // Without any per-request timeout, the idle timeout bounds the wait for headers.
            let idle = route
                .idle
                .filter(|_| deadline.is_none())
                .and_then(|d| now.checked_add(d));
            let bound = [deadline, per_try, idle].into_iter().flatten().min();
            // HTTP/1.1: the request holds one of the breaker's maxConnections while it is in
            // flight, waiting for one if fewer than maxPendingRequests already wait.
            let slot = match (&breaker, proto) {
                (Some(b), Proto::Http1) => {
                    let wait = b.http1_connection();
                    let got = match bound {
                        Some(at) => match tokio::time::timeout_at(at, wait).await {
                            Ok(got) => got,
                            Err(_) => return Err(Failure::Timeout(at.duration_since(now))),
                        },
                        None => wait.await,
                    };
                    got.map_err(|o| Failure::Overflow(o.0))?
                }
                _ => None,
            };
            let key = pool::Key {
                source: self.pool_source.clone(),
                endpoint,
            };
            let env = &self.env;
            let (source, service_ref) = (&self.source, service);
            let dial = move || env.dial(snapshot, source, service_ref, node, endpoint);
            // An HTTP/2 client may have many requests in flight, each on an HTTP/1.1 upstream
            // connection of its own; `pool::Local` polls all it drives on every wake-up, which
            // suits one request at a time. HTTP/2 clients use the shared pool's connections.
            let local = (parts.version < Version::HTTP_2).then_some(&self.upstreams);
            // Boxed: the request's future (this one inside hyper's) is moved by value several
            // times per request, and a send future inline would be moved with it each time, as
            // it is here into the timeout (see `pool::Pool::send`).
            let sent = Box::pin(http.pool.send(&key, &dial, proto, local, request));
            let result = match bound {
                Some(at) => match tokio::time::timeout_at(at, sent).await {
                    Ok(result) => result,
                    Err(_) => {
                        judge(&state, true);
                        let overall = deadline.is_some_and(|d| Instant::now() >= d);
                        outcome.timeouts.push(if overall || Some(at) == deadline {
                            "per_request"
                        } else if Some(at) == per_try {
                            "per_try"
                        } else {
                            "idle"
                        });
                        last = Failure::Timeout(at.duration_since(now));
                        // A per-try timeout counts as a 504 (Envoy), retried under
                        // server-error and gateway-error.
                        if !overall
                            && retries_left
                            && (policy.server_error || policy.gateway_error)
                            && body.replayable()
                            && retry_budget(
                                breaker.as_deref(),
                                &mut retry_guard,
                                &mut outcome.retry_overflow,
                            )
                        {
                            outcome.retries.push("per_try_timeout");
                            backoff(attempt, deadline).await;
                            continue;
                        }
                        return Err(last);
                    }
                },
                None => sent.await,
            };
            match result {
                Err(error) if body.client_failed() => {
                    return Err(Failure::BadRequest(format!(
                        "the request body ended early or was malformed ({error})"
                    )));
                }
                Err(error) => {
                    judge(&state, true);
                    let (retry, reason) = if error.is_connect() {
                        (policy.connect_failure, "connect_failure")
                    } else if error.is_refused_stream() {
                        (policy.refused_stream, "refused_stream")
                    } else {
                        (policy.reset, "reset")
                    };
                    tracing::debug!(%endpoint, error = %Chain(&error), attempt, retry, "upstream attempt failed");
                    last = if error.is_connect() {
                        Failure::Connect(Chain(&error).to_string())
                    } else {
                        Failure::Reset(Chain(&error).to_string())
                    };
                    if retry
                        && retries_left
                        && body.replayable()
                        && retry_budget(
                            breaker.as_deref(),
                            &mut retry_guard,
                            &mut outcome.retry_overflow,
                        )
                    {
                        outcome.retries.push(reason);
                        backoff(attempt, deadline).await;
                        continue;
                    }
                    return Err(last);
                }
                Ok((response, pool_guard)) => {
                    let grpc_status = response
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok());
                    judge(
                        &state,
                        outlier::server_error_status(response.status().as_u16(), grpc_status),
                    );
                    // A destination agent's connectionPool or rateLimit refusal is not retried
                    // (Envoy does not retry `x-envoy-overloaded` either).
                    if retries_left
                        && super::admission::response_flag(response.headers()).is_none()
                        && policy.retries_status(response.status().as_u16(), grpc_status)
                        && body.replayable()
                        && deadline.is_none_or(|d| Instant::now() < d)
                        && retry_budget(
                            breaker.as_deref(),
                            &mut retry_guard,
                            &mut outcome.retry_overflow,
                        )
                    {
                        tracing::debug!(%endpoint, status = %response.status(), attempt, "retrying on the response status");
                        drop(response);
                        outcome.retries.push("status");
                        backoff(attempt, deadline).await;
                        continue;
                    }
                    outcome.retries_exhausted = !retries_left
                        && attempts > 1
                        && super::admission::response_flag(response.headers()).is_none()
                        && policy.retries_status(response.status().as_u16(), grpc_status);
                    let mut guards: Guards = smallvec::smallvec![Box::new(in_flight) as Guard];
                    guards.extend(pool_guard);
                    guards.extend(slot.map(|p| Box::new(p) as Guard));
                    guards.extend(request_permit.take().map(|p| Box::new(p) as Guard));
                    return Ok(Upstream {
                        response,
                        endpoint,
                        guards,
                    });
                }
            }
        }
        Err(last)
    }
}

/// Whether the breaker's retry budget (`maxRetries`, retries in flight at once) allows one
/// more retry; the guard of this request's previous retry is given back first.
fn retry_budget(
    breaker: Option<&Breaker>,
    guard: &mut Option<RetryGuard>,
    overflowed: &mut bool,
) -> bool {
    let Some(breaker) = breaker else {
        return true;
    };
    *guard = None;
    *guard = breaker.retry();
    *overflowed |= guard.is_none();
    guard.is_some()
}

/// Envoy-style backoff before a retry: full jitter over 25 ms, 50 ms, ..., never past the
/// deadline.
async fn backoff(attempt: u32, deadline: Option<Instant>) {
    let ceiling = RETRY_BACKOFF * 2u32.saturating_pow(attempt.saturating_sub(1).min(8));
    let pause = rand::rng().random_range(Duration::ZERO..=ceiling);
    let until = Instant::now() + pause;
    tokio::time::sleep_until(deadline.map_or(until, |d| d.min(until))).await;
}

/// The index of a target picked by weight.
fn pick_target(targets: &[HttpTarget]) -> Option<usize> {
    let total: u64 = targets.iter().map(|t| u64::from(t.weight())).sum();
    if total == 0 {
        return None;
    }
    let mut ticket = rand::rng().random_range(0..total);
    targets.iter().position(|t| {
        let weight = u64::from(t.weight());
        if ticket < weight {
            return true;
        }
        ticket -= weight;
        false
    })
}

/// The authority the client asked for: its URI's, else its `Host`, else the virtual
/// service's name and port. Built only where needed (most HTTP/1.1 requests carry a `Host`
/// that is passed on as it is).
fn authority<'a>(
    uri: &'a http::Uri,
    headers: &'a http::HeaderMap,
    service: &ServicePort,
) -> std::borrow::Cow<'a, str> {
    uri.authority()
        .map(|a| a.as_str())
        .or_else(|| headers.get(header::HOST).and_then(|h| h.to_str().ok()))
        .map_or_else(
            || format!("{}:{}", service.hostname, service.port).into(),
            Into::into,
        )
}

/// The path and query to send upstream: the client's own (shared, not copied) when routing
/// left its path as it was, which is the common case.
fn upstream_path(
    uri: &http::Uri,
    path: &str,
    query: Option<&str>,
) -> Result<PathAndQuery, InvalidUri> {
    if let Some(original) = uri.path_and_query()
        && original.path() == path
        && original.query() == query
    {
        return Ok(original.clone());
    }
    PathAndQuery::try_from(joined(path, query))
}

/// A path and its query as one string.
fn joined(path: &str, query: Option<&str>) -> String {
    match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    }
}

/// An attempt's request: `parts`' method, `headers` (the request's, or a copy of them),
/// the upstream path, and the authority (see [`authority`]) where the request needs one.
fn build_request(
    parts: &Parts,
    mut headers: http::HeaderMap,
    service: &ServicePort,
    path_and_query: PathAndQuery,
    proto: Proto,
    body: ReplayBody,
) -> Result<Request<ReplayBody>, http::Error> {
    let builder = Request::builder().method(parts.method.clone());
    let builder = match proto {
        Proto::Http1 => {
            if !headers.contains_key(header::HOST) {
                let value = HeaderValue::from_str(&authority(&parts.uri, &headers, service))?;
                headers.insert(header::HOST, value);
            }
            builder.version(Version::HTTP_11).uri(path_and_query)
        }
        Proto::Http2 => {
            // HTTP/2 carries the authority in `:authority` (RFC 9113 section 8.3.1).
            let uri = format!(
                "http://{}{path_and_query}",
                authority(&parts.uri, &headers, service)
            );
            headers.remove(header::HOST);
            builder.version(Version::HTTP_2).uri(uri)
        }
    };
    let mut request = builder.body(body)?;
    *request.headers_mut() = headers;
    Ok(request)
}

/// Joins the client's and the upstream's upgraded connections (WebSocket and friends).
fn tunnel(client: hyper::upgrade::OnUpgrade, server: hyper::upgrade::OnUpgrade, vs: String) {
    tokio::spawn(async move {
        match tokio::try_join!(client, server) {
            Ok((client, server)) => {
                let mut client = TokioIo::new(client);
                let mut server = TokioIo::new(server);
                match super::copy::bidirectional(&mut client, &mut server).await {
                    Ok((sent, received)) => {
                        tracing::debug!(virtual_service = %vs, sent, received, "upgraded connection closed")
                    }
                    Err(error) => {
                        tracing::debug!(virtual_service = %vs, error = %crate::logging::Chain(&error), "upgraded connection ended with an error")
                    }
                }
            }
            Err(error) => {
                tracing::warn!(virtual_service = %vs, error = %crate::logging::Chain(&error), "protocol upgrade failed")
            }
        }
    });
}

fn failure_reply(
    grpc: bool,
    vs: &ResourceId,
    route: &str,
    failure: Failure,
) -> Response<ResponseBody> {
    if let Failure::Overflow(reason) = failure {
        let mut response = local(
            grpc,
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("virtual service {vs} route {route}: circuit breaker overflow ({reason})"),
        );
        response.headers_mut().insert(
            super::admission::OVERLOADED,
            HeaderValue::from_static("true"),
        );
        return response;
    }
    let (status, what) = match failure {
        Failure::Forbidden(e) => (StatusCode::FORBIDDEN, e),
        Failure::Connect(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("upstream connect error: {e}"),
        ),
        Failure::Reset(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("upstream reset before responding: {e}"),
        ),
        Failure::Timeout(d) => (
            StatusCode::GATEWAY_TIMEOUT,
            format!("upstream request timeout after {d:?}"),
        ),
        Failure::NoEndpoints => (
            StatusCode::SERVICE_UNAVAILABLE,
            "no endpoints (check the target virtual node's serviceDiscovery)".to_owned(),
        ),
        Failure::Unsupported(e) => (StatusCode::BAD_GATEWAY, e.to_owned()),
        Failure::BadRequest(e) => (StatusCode::BAD_REQUEST, format!("malformed request: {e}")),
        Failure::Overflow(reason) => (StatusCode::SERVICE_UNAVAILABLE, reason.to_owned()),
    };
    local(
        grpc,
        status,
        &format!("virtual service {vs} route {route}: {what}"),
    )
}

/// A reply made by the agent: text for HTTP clients, a trailers-only gRPC status for gRPC
/// clients (mapped from the HTTP status as Envoy maps it).
fn local(grpc: bool, status: StatusCode, message: &str) -> Response<ResponseBody> {
    let text = format!("strait: {message}\n");
    let mut response = if grpc {
        let code = match status.as_u16() {
            400 => 13,
            401 => 16,
            403 => 7,
            404 => 12,
            429 | 502 | 503 | 504 => 14,
            _ => 2,
        };
        let mut response = Response::new(ResponseBody::local(Bytes::new()));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", HeaderValue::from(code));
        if let Ok(value) = HeaderValue::from_str(&grpc_percent_encode(message)) {
            headers.insert("grpc-message", value);
        }
        response
    } else {
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

/// gRPC's `grpc-message` encoding: printable ASCII except `%` as is, the rest percent-encoded.
fn grpc_percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
