//! HTTP, HTTP/2 and gRPC routing: the route table of one virtual service port, compiled from
//! the App Mesh model, and request matching with App Mesh's semantics.
//!
//! What App Mesh (through its Envoy) did, and this module reproduces:
//! - routes are tried by `priority` (0 is highest; routes without one come last), then in file
//!   order; the first match wins;
//! - `prefix` is a plain string prefix of the path, `path.exact` is equality, `path.regex` and
//!   header `regex` must match the whole value (Envoy `safe_regex`);
//! - headers: `exact`, `prefix`, `suffix`, `regex`, `range` (start inclusive, end exclusive, the
//!   value read as a signed integer), no match method = present, `invert` negates; a missing
//!   header matches nothing except an inverted presence check (Envoy `HeaderUtility`);
//! - `method`, `scheme` (`:scheme`, `http` for plaintext HTTP/1.1), `queryParameters`
//!   (`match.exact` or presence), and `match.port` (a route only serves the listener on that
//!   port);
//! - gRPC: `serviceName` is the `package.Service` part of `/package.Service/Method`,
//!   `methodName` the method, `metadata` the request headers;
//! - http and http2 paths are normalised before matching and forwarded normalised, as App
//!   Mesh turned on Envoy's `normalize_path` (RFC 3986 section 6: percent-encoded unreserved
//!   characters decoded, other escapes upper-cased, dot segments removed) and `merge_slashes`.
//!
//! Retry policies, timeouts and health checks are compiled here too (App Mesh defaults
//! filled in); the proxy (`proxy/http.rs`) applies them. Nothing here does I/O.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Method};
use regex::Regex;

use super::Target;
use crate::mesh::{
    self, GrpcRetryEvent, HealthCheck, HttpRetryEvent, HttpTimeout, ListenerTimeout, MatchMethod,
    MeshConfig, PathMatch, Protocol, Provider, ResourceId, RouteKind, TcpRetryEvent,
    VirtualService,
};

/// App Mesh's default per-request timeout.
pub const DEFAULT_PER_REQUEST: Duration = Duration::from_secs(15);
/// App Mesh's default idle (stream) timeout.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(300);

/// The routes of one virtual service port whose provider speaks http, http2 or grpc.
#[derive(Debug)]
pub struct HttpRoutes {
    pub virtual_service: ResourceId,
    pub port: u16,
    /// The listener's protocol: http and http2 normalise paths, grpc matches gRPC routes.
    pub protocol: Protocol,
    /// In the order they are tried.
    pub routes: Vec<Arc<HttpRoute>>,
}

/// One compiled route (or the implicit route of a virtual node provider).
#[derive(Debug)]
pub struct HttpRoute {
    /// The App Mesh route name; for a virtual node provider, `virtual-node:<name>`.
    pub name: String,
    pub matcher: RouteMatch,
    pub targets: Vec<HttpTarget>,
    pub retry: RetryPolicy,
    /// None: disabled (`perRequest: 0`).
    pub per_request: Option<Duration>,
    /// None: disabled (`idle: 0`).
    pub idle: Option<Duration>,
    /// The route's `rateLimit` (strait extension), applied by the calling agent.
    pub rate_limit: Option<RouteRateLimit>,
}

/// A virtual router route's `rateLimit` and the router it belongs to: its token buckets are
/// kept per (router, route name) by each calling agent (docs/resilience.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRateLimit {
    pub virtual_router: ResourceId,
    pub limit: mesh::RateLimit,
}

#[derive(Debug, Clone)]
pub struct HttpTarget {
    pub target: Target,
    /// What the target's listener on `target.port` speaks: http means HTTP/1.1 upstream,
    /// http2 and grpc HTTP/2 with prior knowledge.
    pub protocol: Protocol,
}

impl HttpTarget {
    pub fn weight(&self) -> u32 {
        self.target.weight
    }
}

#[derive(Debug)]
pub enum RouteMatch {
    /// A virtual node provider: everything.
    Any,
    Http(HttpMatch),
    Grpc(GrpcMatch),
}

#[derive(Debug, Default)]
pub struct HttpMatch {
    pub prefix: Option<String>,
    pub path: Option<PathRule>,
    pub headers: Vec<HeaderRule>,
    pub method: Option<Method>,
    pub scheme: Option<&'static str>,
    pub query: Vec<(String, Option<String>)>,
}

#[derive(Debug)]
pub enum PathRule {
    Exact(String),
    Regex(Regex),
}

#[derive(Debug)]
pub struct HeaderRule {
    /// Lower case, as HTTP/2 and `http::HeaderMap` carry names.
    pub name: String,
    pub rule: Option<ValueRule>,
    pub invert: bool,
}

#[derive(Debug)]
pub enum ValueRule {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Regex(Regex),
    Range { start: i64, end: i64 },
}

#[derive(Debug, Default)]
pub struct GrpcMatch {
    pub service: Option<String>,
    pub method: Option<String>,
    pub metadata: Vec<HeaderRule>,
}

/// What a retry may be triggered by, and how many. App Mesh names on the left, Envoy's
/// `retry_on` values they stand for on the right.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_retries: u32,
    /// None: each attempt may use what is left of the per-request timeout.
    pub per_try_timeout: Option<Duration>,
    /// `server-error`: 500, 501, 502, 503, 504, 505, 506, 507, 508, 510, 511 (Envoy `5xx`).
    pub server_error: bool,
    /// `gateway-error`: 502, 503, 504.
    pub gateway_error: bool,
    /// `client-error`: 409 (Envoy `retriable-4xx`).
    pub client_error: bool,
    /// The implicit default policy: 503 only (Envoy `retriable-status-codes: [503]`).
    pub status_503: bool,
    /// `stream-error` and the default policy: the upstream refused the stream (HTTP/2
    /// REFUSED_STREAM; nothing was processed).
    pub refused_stream: bool,
    /// `connection-error` and the default policy: the connect failed.
    pub connect_failure: bool,
    /// The upstream reset or closed before any response (both `server-error` and
    /// `gateway-error` include Envoy's `reset`).
    pub reset: bool,
    /// gRPC status codes (from `grpc-status` in the response headers) that are retried.
    pub grpc_statuses: Vec<u32>,
}

impl RetryPolicy {
    /// App Mesh's implicit policy for every HTTP, HTTP/2 and gRPC route that has no
    /// `retryPolicy` (user guide, "Envoy defaults set by App Mesh"): 2 retries on HTTP 503, gRPC
    /// UNAVAILABLE, connect failure and refused stream. An explicit `retryPolicy` replaces it;
    /// `maxRetries: 0` switches retries off.
    pub fn app_mesh_default() -> RetryPolicy {
        RetryPolicy {
            max_retries: 2,
            per_try_timeout: None,
            server_error: false,
            gateway_error: false,
            client_error: false,
            status_503: true,
            refused_stream: true,
            connect_failure: true,
            reset: false,
            grpc_statuses: vec![GRPC_UNAVAILABLE],
        }
    }

    pub fn from_model(policy: &mesh::RetryPolicy) -> RetryPolicy {
        let has = |e: HttpRetryEvent| policy.http_retry_events.contains(&e);
        let per_try = policy.per_retry_timeout.as_std();
        RetryPolicy {
            max_retries: policy.max_retries,
            per_try_timeout: (!per_try.is_zero()).then_some(per_try),
            server_error: has(HttpRetryEvent::ServerError),
            gateway_error: has(HttpRetryEvent::GatewayError),
            client_error: has(HttpRetryEvent::ClientError),
            status_503: false,
            refused_stream: has(HttpRetryEvent::StreamError),
            connect_failure: policy
                .tcp_retry_events
                .contains(&TcpRetryEvent::ConnectionError),
            reset: has(HttpRetryEvent::ServerError) || has(HttpRetryEvent::GatewayError),
            grpc_statuses: policy
                .grpc_retry_events
                .iter()
                .map(|e| match e {
                    GrpcRetryEvent::Cancelled => 1,
                    GrpcRetryEvent::DeadlineExceeded => 4,
                    GrpcRetryEvent::ResourceExhausted => 8,
                    GrpcRetryEvent::Internal => 13,
                    GrpcRetryEvent::Unavailable => GRPC_UNAVAILABLE,
                })
                .collect(),
        }
    }

    /// Whether a response with this HTTP status (and `grpc-status`, if the response carried
    /// one in its headers) is retried.
    pub fn retries_status(&self, status: u16, grpc_status: Option<u32>) -> bool {
        let server = matches!(status, 500..=508 | 510 | 511);
        let gateway = matches!(status, 502..=504);
        (self.server_error && server)
            || (self.gateway_error && gateway)
            || (self.client_error && status == 409)
            || (self.status_503 && status == 503)
            || grpc_status.is_some_and(|code| self.grpc_statuses.contains(&code))
    }
}

pub const GRPC_UNAVAILABLE: u32 = 14;

/// An active health check of one virtual node listener (`listeners[].healthCheck`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckSpec {
    pub virtual_node: ResourceId,
    /// The listener port: traffic endpoints on this port are the ones checked.
    pub listener_port: u16,
    pub policy: HealthCheck,
}

impl HealthCheckSpec {
    /// `healthCheck.port`, else the listener's port.
    pub fn check_port(&self) -> u16 {
        self.policy.port.unwrap_or(self.listener_port)
    }
}

/// Every listener health check in the mesh.
pub fn health_checks(mesh: &MeshConfig) -> Vec<Arc<HealthCheckSpec>> {
    mesh.virtual_nodes
        .iter()
        .flat_map(|vn| {
            vn.spec.listeners.iter().filter_map(|listener| {
                listener.health_check.as_ref().map(|policy| {
                    Arc::new(HealthCheckSpec {
                        virtual_node: vn.id.clone(),
                        listener_port: listener.port_mapping.port,
                        policy: policy.clone(),
                    })
                })
            })
        })
        .collect()
}

/// The routes of `vs` on `port` (a listener of its provider speaking `protocol`).
pub fn compile(
    mesh: &MeshConfig,
    vs: &VirtualService,
    port: u16,
    protocol: Protocol,
) -> HttpRoutes {
    let mut routes = Vec::new();
    match &vs.spec.provider {
        Some(Provider::VirtualNode(id)) => {
            let timeout = mesh.virtual_node(id).and_then(|vn| {
                vn.spec
                    .listeners
                    .iter()
                    .find(|l| l.port_mapping.port == port)
                    .and_then(|l| l.timeout.as_ref())
                    .and_then(listener_http_timeout)
            });
            let (per_request, idle) = timeouts(timeout.as_ref());
            routes.push(Arc::new(HttpRoute {
                name: format!("virtual-node:{}", id.name),
                matcher: RouteMatch::Any,
                targets: vec![http_target(mesh, id, 1, Some(port))],
                retry: RetryPolicy::app_mesh_default(),
                per_request,
                idle,
                rate_limit: None,
            }));
        }
        Some(Provider::VirtualRouter(id)) => {
            if let Some(router) = mesh.virtual_router(id) {
                let mut ordered: Vec<_> = router.spec.routes.iter().enumerate().collect();
                ordered.sort_by_key(|(index, route)| (route.priority.unwrap_or(u32::MAX), *index));
                for (_, route) in ordered {
                    if route.kind.protocol() != protocol
                        || route.kind.match_port().is_some_and(|p| p != port)
                    {
                        continue;
                    }
                    if let Some(compiled) = compile_route(mesh, id, route) {
                        routes.push(Arc::new(compiled));
                    }
                }
            }
        }
        None => {}
    }
    HttpRoutes {
        virtual_service: vs.id.clone(),
        port,
        protocol,
        routes,
    }
}

fn listener_http_timeout(timeout: &ListenerTimeout) -> Option<HttpTimeout> {
    match timeout {
        ListenerTimeout::Http(t) | ListenerTimeout::Http2(t) | ListenerTimeout::Grpc(t) => {
            Some(t.clone())
        }
        ListenerTimeout::Tcp(_) => None,
    }
}

/// App Mesh defaults (15 s, 300 s); a value of 0 disables.
pub(crate) fn timeouts(timeout: Option<&HttpTimeout>) -> (Option<Duration>, Option<Duration>) {
    let pick = |d: Option<&mesh::Duration>, default: Duration| match d {
        Some(d) if d.value == 0 => None,
        Some(d) => Some(d.as_std()),
        None => Some(default),
    };
    (
        pick(
            timeout.and_then(|t| t.per_request.as_ref()),
            DEFAULT_PER_REQUEST,
        ),
        pick(timeout.and_then(|t| t.idle.as_ref()), DEFAULT_IDLE),
    )
}

fn http_target(mesh: &MeshConfig, node: &ResourceId, weight: u32, port: Option<u16>) -> HttpTarget {
    let listeners = mesh
        .virtual_node(node)
        .map(|vn| vn.spec.listeners.as_slice())
        .unwrap_or_default();
    let listener = port
        .and_then(|p| listeners.iter().find(|l| l.port_mapping.port == p))
        .or_else(|| listeners.first());
    let port = port
        .or_else(|| listener.map(|l| l.port_mapping.port))
        .unwrap_or(80);
    HttpTarget {
        target: Target {
            virtual_node: node.clone(),
            weight,
            port,
        },
        protocol: listener.map_or(Protocol::Http, |l| l.port_mapping.protocol),
    }
}

fn compile_route(mesh: &MeshConfig, router: &ResourceId, route: &mesh::Route) -> Option<HttpRoute> {
    let (matcher, action, retry, timeout, rate_limit) = match &route.kind {
        RouteKind::Http(r) | RouteKind::Http2(r) => (
            RouteMatch::Http(compile_http_match(&r.r#match)?),
            &r.action,
            r.retry_policy.as_ref(),
            r.timeout.as_ref(),
            r.rate_limit.as_ref(),
        ),
        RouteKind::Grpc(r) => (
            RouteMatch::Grpc(GrpcMatch {
                service: r.r#match.service_name.clone(),
                method: r.r#match.method_name.clone(),
                metadata: compile_headers(&r.r#match.metadata)?,
            }),
            &r.action,
            r.retry_policy.as_ref(),
            r.timeout.as_ref(),
            r.rate_limit.as_ref(),
        ),
        RouteKind::Tcp(_) => return None,
    };
    let (per_request, idle) = timeouts(timeout);
    Some(HttpRoute {
        name: route.name.clone(),
        matcher,
        targets: action
            .weighted_targets
            .iter()
            .map(|t| http_target(mesh, &t.virtual_node, t.weight, t.port))
            .collect(),
        retry: retry.map_or_else(RetryPolicy::app_mesh_default, RetryPolicy::from_model),
        per_request,
        idle,
        rate_limit: rate_limit.map(|limit| RouteRateLimit {
            virtual_router: router.clone(),
            limit: limit.clone(),
        }),
    })
}

/// A regex that must match the whole value, as Envoy's `safe_regex` does.
pub(crate) fn full_regex(pattern: &str) -> Option<Regex> {
    match Regex::new(&format!("^(?:{pattern})$")) {
        Ok(regex) => Some(regex),
        Err(error) => {
            // The mesh validator compiled it already; this is only reachable through a bug.
            tracing::error!(%pattern, %error, "BUG: a validated regex does not compile; the route is skipped");
            None
        }
    }
}

fn compile_http_match(m: &mesh::HttpRouteMatch) -> Option<HttpMatch> {
    Some(HttpMatch {
        prefix: m.prefix.clone(),
        path: match &m.path {
            Some(PathMatch::Exact(p)) => Some(PathRule::Exact(p.clone())),
            Some(PathMatch::Regex(r)) => Some(PathRule::Regex(full_regex(r)?)),
            None => None,
        },
        headers: compile_headers(&m.headers)?,
        method: m
            .method
            .map(|method| Method::from_bytes(method_name(method).as_bytes()))
            .transpose()
            .ok()?,
        scheme: m.scheme.map(|s| match s {
            mesh::HttpScheme::Http => "http",
            mesh::HttpScheme::Https => "https",
        }),
        query: m
            .query_parameters
            .iter()
            .map(|q| (q.name.clone(), q.exact.clone()))
            .collect(),
    })
}

pub(crate) fn method_name(method: mesh::HttpMethod) -> &'static str {
    use mesh::HttpMethod::*;
    match method {
        Connect => "CONNECT",
        Delete => "DELETE",
        Get => "GET",
        Head => "HEAD",
        Options => "OPTIONS",
        Patch => "PATCH",
        Post => "POST",
        Put => "PUT",
        Trace => "TRACE",
    }
}

pub(crate) fn compile_headers(headers: &[mesh::HeaderMatch]) -> Option<Vec<HeaderRule>> {
    headers
        .iter()
        .map(|h| {
            Some(HeaderRule {
                name: h.name.to_ascii_lowercase(),
                rule: match &h.r#match {
                    None => None,
                    Some(MatchMethod::Exact(v)) => Some(ValueRule::Exact(v.clone())),
                    Some(MatchMethod::Prefix(v)) => Some(ValueRule::Prefix(v.clone())),
                    Some(MatchMethod::Suffix(v)) => Some(ValueRule::Suffix(v.clone())),
                    Some(MatchMethod::Regex(r)) => Some(ValueRule::Regex(full_regex(r)?)),
                    Some(MatchMethod::Range { start, end }) => Some(ValueRule::Range {
                        start: *start,
                        end: *end,
                    }),
                },
                invert: h.invert,
            })
        })
        .collect()
}

/// What matching looks at in a request.
#[derive(Debug)]
pub struct RequestView<'a> {
    pub method: &'a Method,
    /// Normalised for http/http2 listeners; without the query.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub scheme: &'a str,
    pub headers: &'a HeaderMap,
}

impl HttpRoutes {
    /// The first route (in priority, then file order) that matches.
    pub fn select(&self, request: &RequestView<'_>) -> Option<&Arc<HttpRoute>> {
        self.routes
            .iter()
            .find(|route| route.matcher.matches(request))
    }
}

impl RouteMatch {
    pub fn matches(&self, r: &RequestView<'_>) -> bool {
        match self {
            RouteMatch::Any => true,
            RouteMatch::Http(m) => m.matches(r),
            RouteMatch::Grpc(m) => m.matches(r),
        }
    }
}

impl HttpMatch {
    fn matches(&self, r: &RequestView<'_>) -> bool {
        self.prefix
            .as_ref()
            .is_none_or(|p| r.path.starts_with(p.as_str()))
            && self.path.as_ref().is_none_or(|rule| match rule {
                PathRule::Exact(p) => r.path == p,
                PathRule::Regex(re) => re.is_match(r.path),
            })
            && self.method.as_ref().is_none_or(|m| m == r.method)
            && self.scheme.is_none_or(|s| s.eq_ignore_ascii_case(r.scheme))
            && self.headers.iter().all(|h| h.matches(r.headers))
            && self.query.iter().all(|(name, exact)| {
                match query_value(r.query.unwrap_or(""), name) {
                    None => false,
                    Some(value) => exact.as_ref().is_none_or(|e| *e == value),
                }
            })
    }
}

impl GrpcMatch {
    fn matches(&self, r: &RequestView<'_>) -> bool {
        // `/package.Service/Method`
        let (service, method) = match r.path.strip_prefix('/').and_then(|p| p.rsplit_once('/')) {
            Some((service, method)) => (service, method),
            None => ("", ""),
        };
        self.service.as_ref().is_none_or(|s| s == service)
            && self.method.as_ref().is_none_or(|m| m == method)
            && self.metadata.iter().all(|h| h.matches(r.headers))
    }
}

impl HeaderRule {
    pub fn matches(&self, headers: &HeaderMap) -> bool {
        let mut values = headers.get_all(self.name.as_str()).iter().peekable();
        if values.peek().is_none() {
            // Envoy: a missing header only satisfies an inverted presence match.
            return self.rule.is_none() && self.invert;
        }
        let Some(rule) = &self.rule else {
            return !self.invert;
        };
        // Several values are matched as one, joined with "," (Envoy does the same).
        let joined = values
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(",");
        let hit = match rule {
            ValueRule::Exact(v) => joined == *v,
            ValueRule::Prefix(v) => joined.starts_with(v.as_str()),
            ValueRule::Suffix(v) => joined.ends_with(v.as_str()),
            ValueRule::Regex(re) => re.is_match(&joined),
            ValueRule::Range { start, end } => {
                joined.parse::<i64>().is_ok_and(|n| *start <= n && n < *end)
            }
        };
        hit != self.invert
    }
}

/// The first value of query parameter `name`, percent-decoded (`+` stays `+`).
fn query_value(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(key).as_deref() == Some(name))
            .then(|| percent_decode(value).unwrap_or_else(|| value.to_owned()))
    })
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Why a path cannot be normalised (the request gets a 400).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("the path does not start with '/'")]
    NotAbsolute,
    #[error("the path has an invalid percent-encoding")]
    BadEscape,
}

/// Envoy's `normalize_path` (RFC 3986 section 6.2.2: decode percent-encoded unreserved
/// characters, upper-case the hex of other escapes, remove dot segments) and, with
/// `merge_slashes`, runs of `/` collapsed to one.
pub fn normalize_path(path: &str, merge_slashes: bool) -> Result<String, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if is_normal(path, merge_slashes) {
        // Most paths are already normal: one copy instead of the passes below.
        return Ok(path.to_owned());
    }
    normalize_fully(path, merge_slashes)
}

/// [`normalize_path`]'s passes, for an absolute path.
fn normalize_fully(path: &str, merge_slashes: bool) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(PathError::BadEscape)?;
            let hex = std::str::from_utf8(hex).map_err(|_| PathError::BadEscape)?;
            let value = u8::from_str_radix(hex, 16).map_err(|_| PathError::BadEscape)?;
            if value.is_ascii_alphanumeric() || matches!(value, b'-' | b'.' | b'_' | b'~') {
                decoded.push(value as char);
            } else {
                decoded.push('%');
                decoded.push_str(&hex.to_ascii_uppercase());
            }
            i += 3;
        } else {
            // Non-ASCII bytes are kept as they came (hyper has already rejected what a URI may
            // not carry); push the whole UTF-8 character.
            let ch = path[i..].chars().next().ok_or(PathError::BadEscape)?;
            decoded.push(ch);
            i += ch.len_utf8();
        }
    }
    let merged;
    let path = if merge_slashes {
        let mut out = String::with_capacity(decoded.len());
        for ch in decoded.chars() {
            if !(ch == '/' && out.ends_with('/')) {
                out.push(ch);
            }
        }
        merged = out;
        &merged
    } else {
        &decoded
    };
    Ok(remove_dot_segments(path))
}

/// True when [`normalize_path`] would return `path` unchanged: no escapes, no dot segments
/// and, with `merge_slashes`, no run of `/`.
fn is_normal(path: &str, merge_slashes: bool) -> bool {
    let escaped = path.contains('%');
    let doubled = merge_slashes && path.contains("//");
    !escaped
        && !doubled
        && path[1..]
            .split('/')
            .all(|segment| segment != "." && segment != "..")
}

/// RFC 3986 section 5.2.4 for an absolute path.
fn remove_dot_segments(path: &str) -> String {
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len() - 1;
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, segment) in segments.into_iter().enumerate() {
        match segment {
            "." => {
                if i == last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    let mut result = String::with_capacity(path.len());
    result.push('/');
    result.push_str(&out.join("/"));
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    fn view<'a>(
        method: &'a Method,
        path: &'a str,
        query: Option<&'a str>,
        h: &'a HeaderMap,
    ) -> RequestView<'a> {
        RequestView {
            method,
            path,
            query,
            scheme: "http",
            headers: h,
        }
    }

    fn rule(name: &str, rule: Option<ValueRule>, invert: bool) -> HeaderRule {
        HeaderRule {
            name: name.into(),
            rule,
            invert,
        }
    }

    #[test]
    fn normalisation_follows_rfc_3986_and_merges_slashes() {
        let n = |p| normalize_path(p, true);
        assert_eq!(n("/a/b/../c").unwrap(), "/a/c");
        assert_eq!(n("/a/./b/.").unwrap(), "/a/b/");
        assert_eq!(n("/..").unwrap(), "/");
        assert_eq!(n("/../../x").unwrap(), "/x");
        assert_eq!(n("//a///b").unwrap(), "/a/b");
        assert_eq!(n("/%7euser/%2e%2e/x").unwrap(), "/x");
        assert_eq!(n("/a%2fb").unwrap(), "/a%2Fb");
        assert_eq!(n("/").unwrap(), "/");
        assert_eq!(normalize_path("//a", false).unwrap(), "//a");
        assert_eq!(n("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(n("/a%2"), Err(PathError::BadEscape));
        assert_eq!(n("a"), Err(PathError::NotAbsolute));
    }

    #[test]
    fn a_path_taken_as_normal_is_one_the_full_passes_leave_alone() {
        let paths = [
            "/", "//", "/a", "/a/", "/a//b", "/.a", "/a./b", "/..a/b..", "/a/.../b", "/%41",
            "/a/.", "/a/..", "/./a", "/../a", "/a/./b", "/a/../b", "/é/ü", "/a b", "/~x-_",
        ];
        for path in paths {
            for merge in [true, false] {
                if is_normal(path, merge) {
                    assert_eq!(
                        normalize_fully(path, merge).unwrap(),
                        path,
                        "{path} {merge}"
                    );
                }
            }
        }
        for (path, merge) in [
            ("/a/..", true),
            ("//a", true),
            ("/%41", false),
            ("/./a", false),
        ] {
            assert!(!is_normal(path, merge), "{path} {merge}");
        }
    }

    #[test]
    fn header_rules_follow_envoy() {
        let h = headers(&[
            ("x-canary", "true"),
            ("x-n", "42"),
            ("x-multi", "a"),
            ("x-multi", "b"),
        ]);
        assert!(rule("x-canary", Some(ValueRule::Exact("true".into())), false).matches(&h));
        assert!(!rule("x-canary", Some(ValueRule::Exact("true".into())), true).matches(&h));
        assert!(rule("x-canary", Some(ValueRule::Prefix("tr".into())), false).matches(&h));
        assert!(rule("x-canary", Some(ValueRule::Suffix("ue".into())), false).matches(&h));
        let re = Some(ValueRule::Regex(full_regex("t.u").unwrap()));
        assert!(
            !rule("x-canary", re, false).matches(&h),
            "regex must match the whole value"
        );
        assert!(rule("x-n", Some(ValueRule::Range { start: 42, end: 43 }), false).matches(&h));
        assert!(!rule("x-n", Some(ValueRule::Range { start: 0, end: 42 }), false).matches(&h));
        assert!(rule("x-multi", Some(ValueRule::Exact("a,b".into())), false).matches(&h));
        // Missing headers.
        assert!(!rule("x-gone", Some(ValueRule::Exact("1".into())), false).matches(&h));
        assert!(!rule("x-gone", Some(ValueRule::Exact("1".into())), true).matches(&h));
        assert!(!rule("x-gone", None, false).matches(&h));
        assert!(rule("x-gone", None, true).matches(&h));
        assert!(rule("x-canary", None, false).matches(&h));
    }

    #[test]
    fn http_match_combines_every_condition() {
        let m = HttpMatch {
            prefix: Some("/api".into()),
            method: Some(Method::POST),
            query: vec![("v".into(), Some("2 x".into())), ("debug".into(), None)],
            headers: vec![rule("x-a", None, false)],
            ..HttpMatch::default()
        };
        let h = headers(&[("x-a", "1")]);
        let post = Method::POST;
        assert!(m.matches(&view(&post, "/apiv2/x", Some("debug&v=2%20x"), &h)));
        assert!(!m.matches(&view(&Method::GET, "/api", Some("debug&v=2%20x"), &h)));
        assert!(!m.matches(&view(&post, "/api", Some("v=2%20x"), &h)));
        assert!(!m.matches(&view(&post, "/ap", Some("debug&v=2%20x"), &h)));
        let exact = HttpMatch {
            path: Some(PathRule::Exact("/a".into())),
            scheme: Some("https"),
            ..HttpMatch::default()
        };
        let get = Method::GET;
        assert!(
            !exact.matches(&view(&get, "/a", None, &h)),
            "scheme https vs plaintext"
        );
    }

    #[test]
    fn grpc_match_splits_service_and_method() {
        let m = GrpcMatch {
            service: Some("color.Color".into()),
            method: Some("Get".into()),
            metadata: vec![],
        };
        let h = headers(&[]);
        let post = Method::POST;
        assert!(m.matches(&view(&post, "/color.Color/Get", None, &h)));
        assert!(!m.matches(&view(&post, "/color.Color/Chat", None, &h)));
        assert!(!m.matches(&view(&post, "/other.Color/Get", None, &h)));
        assert!(!m.matches(&view(&post, "/", None, &h)));
    }

    #[test]
    fn retry_statuses() {
        let default = RetryPolicy::app_mesh_default();
        assert!(default.retries_status(503, None));
        assert!(!default.retries_status(500, None));
        assert!(default.retries_status(200, Some(14)));
        assert!(!default.retries_status(200, Some(13)));
        let explicit = RetryPolicy::from_model(&mesh::RetryPolicy {
            max_retries: 3,
            per_retry_timeout: mesh::Duration {
                unit: mesh::DurationUnit::Ms,
                value: 500,
            },
            http_retry_events: vec![HttpRetryEvent::ServerError, HttpRetryEvent::ClientError],
            tcp_retry_events: vec![],
            grpc_retry_events: vec![GrpcRetryEvent::Internal],
        });
        assert!(explicit.retries_status(500, None));
        assert!(explicit.retries_status(511, None));
        assert!(!explicit.retries_status(509, None));
        assert!(explicit.retries_status(409, None));
        assert!(!explicit.retries_status(404, None));
        assert!(explicit.retries_status(200, Some(13)));
        assert!(!explicit.connect_failure);
        assert!(explicit.reset);
        assert_eq!(explicit.per_try_timeout, Some(Duration::from_millis(500)));
    }

    #[test]
    fn routes_compile_in_priority_then_file_order_with_defaults() {
        let text = r#"
apiVersion: appmesh.k8s.aws/v1beta2
kind: Mesh
metadata: {name: m}
spec: {}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {name: v1, namespace: app}
spec:
  listeners: [{portMapping: {port: 8080, protocol: http}}]
  serviceDiscovery: {dns: {hostname: v1.app}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {name: v2, namespace: app}
spec:
  listeners: [{portMapping: {port: 9090, protocol: http2}}]
  serviceDiscovery: {dns: {hostname: v2.app}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualRouter
metadata: {name: r, namespace: app}
spec:
  listeners: [{portMapping: {port: 80, protocol: http}}]
  routes:
    - name: late
      httpRoute:
        match: {prefix: /}
        action: {weightedTargets: [{virtualNodeRef: {name: v1}, weight: 1}]}
    - name: canary
      priority: 5
      httpRoute:
        match:
          prefix: /
          headers: [{name: X-Canary, match: {exact: "true"}}]
        action: {weightedTargets: [{virtualNodeRef: {name: v2}, weight: 1}]}
        timeout: {perRequest: {unit: s, value: 0}, idle: {unit: ms, value: 1500}}
        retryPolicy: {maxRetries: 0, perRetryTimeout: {unit: s, value: 1}, httpRetryEvents: [server-error]}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {name: s, namespace: app}
spec:
  provider: {virtualRouter: {virtualRouterRef: {name: r}}}
"#;
        let mesh = crate::mesh::parse_str(text, std::path::Path::new("t.yaml"))
            .unwrap()
            .config;
        let vs = &mesh.virtual_services[0];
        let routes = compile(&mesh, vs, 80, Protocol::Http);
        let names: Vec<_> = routes.routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["canary", "late"]);
        let canary = &routes.routes[0];
        assert_eq!(canary.per_request, None);
        assert_eq!(canary.idle, Some(Duration::from_millis(1500)));
        assert_eq!(canary.retry.max_retries, 0);
        assert_eq!(canary.targets[0].protocol, Protocol::Http2);
        assert_eq!(canary.targets[0].target.port, 9090);
        let late = &routes.routes[1];
        assert_eq!(late.per_request, Some(DEFAULT_PER_REQUEST));
        assert_eq!(late.idle, Some(DEFAULT_IDLE));
        assert_eq!(late.retry, RetryPolicy::app_mesh_default());
        let h = headers(&[("x-canary", "true")]);
        let get = Method::GET;
        assert_eq!(
            routes.select(&view(&get, "/x", None, &h)).unwrap().name,
            "canary"
        );
        let none = headers(&[]);
        assert_eq!(
            routes.select(&view(&get, "/x", None, &none)).unwrap().name,
            "late"
        );
        // An http2 listener on the same router would not serve httpRoutes.
        assert!(compile(&mesh, vs, 80, Protocol::Http2).routes.is_empty());
    }
}
