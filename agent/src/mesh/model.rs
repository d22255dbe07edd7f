//! The typed App Mesh (`appmesh.k8s.aws/v1beta2`) model, plus strait's extension fields.
//!
//! Field names follow the controller's Go types (`apis/appmesh/v1beta2/*.go`) in snake case.
//! References are already resolved to a [`ResourceId`] (namespace defaulted to the referrer's,
//! ARNs reduced to their resource name). Nothing here does I/O; parsing lives in
//! `mesh/decode.rs`, cross-resource checks in `mesh/validate.rs`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::Serialize;

/// A namespaced resource name. `Display` is `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ResourceId {
    pub namespace: String,
    pub name: String,
}

impl ResourceId {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

// ---------------------------------------------------------------------------------------------
// Common shapes (types.go)

/// `Duration {unit: s|ms, value >= 0}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Duration {
    pub unit: DurationUnit,
    pub value: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum DurationUnit {
    #[serde(rename = "s")]
    S,
    #[serde(rename = "ms")]
    Ms,
}

/// The longest duration a mesh file may give (one year), in seconds; validation refuses more.
pub const MAX_DURATION_SECONDS: i64 = 365 * 24 * 3600;

impl Duration {
    pub fn as_std(&self) -> std::time::Duration {
        match self.unit {
            DurationUnit::S => std::time::Duration::from_secs(self.value),
            DurationUnit::Ms => std::time::Duration::from_millis(self.value),
        }
    }
}

/// Listener / route protocol (`PortProtocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http,
    Http2,
    Grpc,
    Tcp,
}

impl Protocol {
    pub fn as_str(&self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Http2 => "http2",
            Protocol::Grpc => "grpc",
            Protocol::Tcp => "tcp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    pub port: u16,
    pub protocol: Protocol,
}

/// Kubernetes `metav1.LabelSelector`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    pub match_labels: BTreeMap<String, String>,
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelectorRequirement {
    pub key: String,
    pub operator: SelectorOperator,
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl LabelSelector {
    /// Kubernetes semantics: all `matchLabels` and all `matchExpressions` must hold; an empty
    /// selector matches everything. (An *absent* selector is the caller's business: App Mesh
    /// reads it as "selects nothing".)
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let got = labels.get(&r.key);
                match r.operator {
                    SelectorOperator::In => got.is_some_and(|v| r.values.contains(v)),
                    SelectorOperator::NotIn => !got.is_some_and(|v| r.values.contains(v)),
                    SelectorOperator::Exists => got.is_some(),
                    SelectorOperator::DoesNotExist => got.is_none(),
                }
            })
    }

    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }
}

// ---------------------------------------------------------------------------------------------
// Mesh

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Mesh {
    /// `metadata.name` (a Mesh is cluster scoped: no namespace).
    pub name: String,
    pub spec: MeshSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshSpec {
    pub aws_name: Option<String>,
    /// Present-but-empty selects every namespace, absent selects none (App Mesh semantics).
    pub namespace_selector: Option<LabelSelector>,
    pub egress_filter: EgressFilter,
    /// AWS-only (shared meshes through AWS RAM); kept, not used.
    pub mesh_owner: Option<String>,
    pub service_discovery: Option<MeshServiceDiscovery>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EgressFilter {
    #[default]
    AllowAll,
    DropAll,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshServiceDiscovery {
    pub ip_preference: Option<IpPreference>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum IpPreference {
    #[serde(rename = "IPv4_PREFERRED")]
    Ipv4Preferred,
    #[serde(rename = "IPv6_PREFERRED")]
    Ipv6Preferred,
    #[serde(rename = "IPv4_ONLY")]
    Ipv4Only,
    #[serde(rename = "IPv6_ONLY")]
    Ipv6Only,
}

// ---------------------------------------------------------------------------------------------
// VirtualNode

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualNode {
    pub id: ResourceId,
    pub labels: BTreeMap<String, String>,
    pub spec: VirtualNodeSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualNodeSpec {
    pub aws_name: Option<String>,
    /// Present-but-empty selects every pod of the namespace, absent selects none.
    pub pod_selector: Option<LabelSelector>,
    pub listeners: Vec<Listener>,
    pub service_discovery: Option<ServiceDiscovery>,
    pub backends: Vec<Backend>,
    pub backend_defaults: Option<BackendDefaults>,
    pub logging: Option<Logging>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    pub port_mapping: PortMapping,
    pub health_check: Option<HealthCheck>,
    pub outlier_detection: Option<OutlierDetection>,
    pub connection_pool: Option<ConnectionPool>,
    pub tls: Option<ListenerTls>,
    pub timeout: Option<ListenerTimeout>,
    /// strait extension: local (per listener, per agent) rate limit.
    pub rate_limit: Option<RateLimit>,
}

/// `HealthCheckPolicy` (VirtualNode) and `VirtualGatewayHealthCheckPolicy`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheck {
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    pub interval_millis: u32,
    pub timeout_millis: u32,
    pub protocol: Protocol,
    pub port: Option<u16>,
    /// Only used for http/http2.
    pub path: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    pub max_server_errors: u64,
    pub interval: Duration,
    pub base_ejection_duration: Duration,
    pub max_ejection_percent: u32,
}

/// `VirtualNodeConnectionPool` / `VirtualGatewayConnectionPool`: exactly one of these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ConnectionPool {
    Tcp {
        max_connections: u32,
    },
    Http {
        max_connections: u32,
        max_pending_requests: Option<u32>,
    },
    Http2 {
        max_requests: u32,
    },
    Grpc {
        max_requests: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListenerTls {
    pub mode: TlsMode,
    pub certificate: TlsCertificate,
    /// Listener validation means mutual TLS: clients must present a certificate.
    pub validation: Option<TlsValidation>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TlsMode {
    Strict,
    Permissive,
    Disabled,
}

/// A certificate (and key) to present. `Acm` only on listeners; AWS-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum TlsCertificate {
    Acm {
        certificate_arn: String,
    },
    File {
        certificate_chain: String,
        private_key: String,
    },
    Sds {
        secret_name: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TlsValidation {
    pub trust: TlsTrust,
    /// `subjectAlternativeNames.match.exact`; empty = no SAN check.
    pub subject_alternative_names: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum TlsTrust {
    Acm {
        certificate_authority_arns: Vec<String>,
    },
    File {
        certificate_chain: String,
    },
    Sds {
        secret_name: String,
    },
}

/// `ListenerTimeout`: exactly one protocol's timeouts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ListenerTimeout {
    Tcp(TcpTimeout),
    Http(HttpTimeout),
    Http2(HttpTimeout),
    Grpc(GrpcTimeout),
}

/// `HTTPTimeout`. App Mesh defaults: per request 15 s (0 disables), idle 300 s.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpTimeout {
    pub per_request: Option<Duration>,
    pub idle: Option<Duration>,
}

/// `GRPCTimeout` has the same shape as `HTTPTimeout`.
pub type GrpcTimeout = HttpTimeout;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpTimeout {
    pub idle: Option<Duration>,
}

/// strait extension `listeners[].rateLimit` (token buckets enforced by the agent that delivers
/// to the local pod) and `httpRoute`/`http2Route`/`grpcRoute` `rateLimit` (enforced by each
/// calling agent); see docs/resilience.md. At least one of `total`, `per_caller`, `overrides`
/// is set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// `requestsPerSecond` and `burst` at the top: one bucket for every caller together.
    pub total: Option<Bucket>,
    /// `perCaller`: one bucket per caller identity.
    pub per_caller: Option<Bucket>,
    /// `overrides[]`: named callers get their own limit instead of `per_caller`'s.
    pub overrides: Vec<RateLimitOverride>,
    /// `shadow: true`: count what would be refused, refuse nothing.
    pub shadow: bool,
}

/// A token bucket: `requests_per_second` refill, `burst` capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Bucket {
    pub requests_per_second: u32,
    /// Defaults to `requests_per_second` when absent.
    pub burst: Option<u32>,
}

impl Bucket {
    pub fn capacity(&self) -> u32 {
        self.burst.unwrap_or(self.requests_per_second)
    }
}

/// `rateLimit.overrides[]`: a limit for the callers it names, each caller its own bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitOverride {
    pub callers: Vec<RateLimitCaller>,
    pub limit: Bucket,
}

/// A caller named in a rate limit override.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum RateLimitCaller {
    /// Same-node callers of this virtual node, and tunnel callers whose certificate is one of
    /// its client certificates.
    VirtualNode(ResourceId),
    /// A tunnel caller whose verified certificate has this subject alternative name (a SPIFFE
    /// ID or DNS name).
    Identity(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ServiceDiscovery {
    Dns {
        hostname: String,
        response_type: DnsResponseType,
    },
    /// AWS-only: kept so manifests load; strait cannot query Cloud Map.
    AwsCloudMap {
        namespace_name: String,
        service_name: String,
        attributes: Vec<KeyValue>,
    },
    /// strait extension: fixed endpoint addresses; the port is the listener port.
    Static { addresses: Vec<IpAddr> },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DnsResponseType {
    Endpoints,
    #[default]
    #[serde(rename = "LOADBALANCER")]
    LoadBalancer,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyValue {
    pub key: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Backend {
    pub virtual_service: ResourceId,
    pub client_policy: Option<ClientPolicy>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendDefaults {
    pub client_policy: Option<ClientPolicy>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientPolicy {
    pub tls: Option<ClientTls>,
    /// strait extension: client-side circuit breaker (see `proxy::breaker`).
    pub circuit_breaker: Option<CircuitBreaker>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientTls {
    /// Defaults to true (App Mesh API default).
    pub enforce: bool,
    /// Empty = every port.
    pub ports: Vec<u16>,
    /// Client certificate for mutual TLS (`file` or `sds`).
    pub certificate: Option<TlsCertificate>,
    pub validation: TlsValidation,
}

/// strait extension `clientPolicy.circuitBreaker`; absent fields mean "no limit".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreaker {
    pub max_connections: Option<u32>,
    pub max_pending_requests: Option<u32>,
    pub max_requests: Option<u32>,
    pub max_retries: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Logging {
    /// `accessLog.file`.
    pub access_log: Option<FileAccessLog>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FileAccessLog {
    pub path: String,
    pub format: Option<LogFormat>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum LogFormat {
    /// An Envoy format string, e.g. `[%START_TIME%] %REQ(:METHOD)% %RESPONSE_CODE%\n`.
    Text(String),
    Json(Vec<KeyValue>),
}

// ---------------------------------------------------------------------------------------------
// VirtualService

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualService {
    pub id: ResourceId,
    pub labels: BTreeMap<String, String>,
    pub spec: VirtualServiceSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualServiceSpec {
    pub aws_name: Option<String>,
    pub provider: Option<Provider>,
    /// strait extension: static addresses clients use for this service (hosts without DNS).
    pub addresses: Vec<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Provider {
    VirtualNode(ResourceId),
    VirtualRouter(ResourceId),
}

impl VirtualService {
    /// The hostname clients call: `awsName` when set (App Mesh users set it to the FQDN, e.g.
    /// `cart.shop.svc.cluster.local`), else `{name}.{namespace}.svc.cluster.local`.
    pub fn hostname(&self) -> String {
        match &self.spec.aws_name {
            Some(n) if !n.is_empty() => n.clone(),
            _ => format!("{}.{}.svc.cluster.local", self.id.name, self.id.namespace),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// VirtualRouter and routes

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualRouter {
    pub id: ResourceId,
    pub labels: BTreeMap<String, String>,
    pub spec: VirtualRouterSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualRouterSpec {
    pub aws_name: Option<String>,
    pub listeners: Vec<RouterListener>,
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouterListener {
    pub port_mapping: PortMapping,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    pub name: String,
    /// 0 (highest) ..= 1000; routes without priority come after those with one.
    pub priority: Option<u32>,
    pub kind: RouteKind,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum RouteKind {
    Http(HttpRoute),
    Http2(HttpRoute),
    Grpc(GrpcRoute),
    Tcp(TcpRoute),
}

impl RouteKind {
    pub fn protocol(&self) -> Protocol {
        match self {
            RouteKind::Http(_) => Protocol::Http,
            RouteKind::Http2(_) => Protocol::Http2,
            RouteKind::Grpc(_) => Protocol::Grpc,
            RouteKind::Tcp(_) => Protocol::Tcp,
        }
    }

    pub fn action(&self) -> &RouteAction {
        match self {
            RouteKind::Http(r) | RouteKind::Http2(r) => &r.action,
            RouteKind::Grpc(r) => &r.action,
            RouteKind::Tcp(r) => &r.action,
        }
    }

    /// `match.port`, if any.
    pub fn match_port(&self) -> Option<u16> {
        match self {
            RouteKind::Http(r) | RouteKind::Http2(r) => r.r#match.port,
            RouteKind::Grpc(r) => r.r#match.port,
            RouteKind::Tcp(r) => r.r#match.as_ref().and_then(|m| m.port),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    pub r#match: HttpRouteMatch,
    pub action: RouteAction,
    pub retry_policy: Option<RetryPolicy>,
    pub timeout: Option<HttpTimeout>,
    /// strait extension: the route's token buckets, enforced by each calling agent (per
    /// node; see docs/resilience.md).
    pub rate_limit: Option<RateLimit>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteMatch {
    pub prefix: Option<String>,
    pub path: Option<PathMatch>,
    pub headers: Vec<HeaderMatch>,
    pub method: Option<HttpMethod>,
    pub scheme: Option<HttpScheme>,
    pub query_parameters: Vec<QueryParameterMatch>,
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum PathMatch {
    Exact(String),
    /// Checked to compile with the `regex` crate.
    Regex(String),
}

/// `HTTPRouteHeader` / `GRPCRouteMetadata` / gateway variants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderMatch {
    pub name: String,
    /// None: the header must be present.
    pub r#match: Option<MatchMethod>,
    pub invert: bool,
}

/// `HeaderMatchMethod` / `GRPCRouteMetadataMatchMethod`: exactly one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum MatchMethod {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Regex(String),
    /// Inclusive start, exclusive end (Envoy `range_match`).
    Range {
        start: i64,
        end: i64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct QueryParameterMatch {
    pub name: String,
    /// `match.exact`; None: the parameter must be present.
    pub exact: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum HttpMethod {
    Connect,
    Delete,
    Get,
    Head,
    Options,
    Patch,
    Post,
    Put,
    Trace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpScheme {
    Http,
    Https,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteAction {
    /// 1..=10 targets.
    pub weighted_targets: Vec<WeightedTarget>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WeightedTarget {
    pub virtual_node: ResourceId,
    /// 0..=100, relative to the other targets of the action.
    pub weight: u32,
    pub port: Option<u16>,
}

/// `HTTPRetryPolicy` / `GRPCRetryPolicy` (grpc events only on gRPC routes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    pub max_retries: u32,
    pub per_retry_timeout: Duration,
    pub http_retry_events: Vec<HttpRetryEvent>,
    pub tcp_retry_events: Vec<TcpRetryEvent>,
    pub grpc_retry_events: Vec<GrpcRetryEvent>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HttpRetryEvent {
    ServerError,
    GatewayError,
    ClientError,
    StreamError,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TcpRetryEvent {
    ConnectionError,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GrpcRetryEvent {
    Cancelled,
    DeadlineExceeded,
    Internal,
    ResourceExhausted,
    Unavailable,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRoute {
    pub r#match: GrpcRouteMatch,
    pub action: RouteAction,
    pub retry_policy: Option<RetryPolicy>,
    pub timeout: Option<GrpcTimeout>,
    /// strait extension, as on [`HttpRoute`].
    pub rate_limit: Option<RateLimit>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteMatch {
    pub service_name: Option<String>,
    /// Requires `service_name`.
    pub method_name: Option<String>,
    pub metadata: Vec<HeaderMatch>,
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpRoute {
    pub r#match: Option<TcpRouteMatch>,
    pub action: RouteAction,
    pub timeout: Option<TcpTimeout>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpRouteMatch {
    pub port: Option<u16>,
}

// ---------------------------------------------------------------------------------------------
// VirtualGateway and GatewayRoute

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualGateway {
    pub id: ResourceId,
    pub labels: BTreeMap<String, String>,
    pub spec: VirtualGatewaySpec,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualGatewaySpec {
    pub aws_name: Option<String>,
    /// Which namespaces' GatewayRoutes attach (absent: only the gateway's own namespace... see
    /// docs/mesh-file.md).
    pub namespace_selector: Option<LabelSelector>,
    pub pod_selector: Option<LabelSelector>,
    /// Which GatewayRoutes attach, by their labels (absent: all).
    pub gateway_route_selector: Option<LabelSelector>,
    pub listeners: Vec<GatewayListener>,
    pub logging: Option<Logging>,
    pub backend_defaults: Option<BackendDefaults>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayListener {
    /// Protocol is http, http2 or grpc (never tcp).
    pub port_mapping: PortMapping,
    pub health_check: Option<HealthCheck>,
    pub connection_pool: Option<ConnectionPool>,
    pub tls: Option<ListenerTls>,
    /// strait extension, as on VirtualNode listeners.
    pub rate_limit: Option<RateLimit>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayRoute {
    pub id: ResourceId,
    /// Matched by `VirtualGateway.spec.gatewayRouteSelector`.
    pub labels: BTreeMap<String, String>,
    pub spec: GatewayRouteSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayRouteSpec {
    pub aws_name: Option<String>,
    /// 0 (highest) ..= 1000; App Mesh default is 1000 (lowest).
    pub priority: Option<u32>,
    pub kind: GatewayRouteKind,
    /// `virtualGatewayRef` (normally filled in by the App Mesh webhook); when absent the route
    /// attaches by the gateways' selectors.
    pub virtual_gateway: Option<ResourceId>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum GatewayRouteKind {
    Http(HttpGatewayRoute),
    Http2(HttpGatewayRoute),
    Grpc(GrpcGatewayRoute),
}

impl GatewayRouteKind {
    pub fn target(&self) -> &GatewayRouteTarget {
        match self {
            GatewayRouteKind::Http(r) | GatewayRouteKind::Http2(r) => &r.action.target,
            GatewayRouteKind::Grpc(r) => &r.action.target,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpGatewayRoute {
    pub r#match: HttpGatewayRouteMatch,
    pub action: HttpGatewayRouteAction,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpGatewayRouteMatch {
    pub prefix: Option<String>,
    pub path: Option<PathMatch>,
    pub query_parameters: Vec<QueryParameterMatch>,
    pub method: Option<HttpMethod>,
    pub hostname: Option<HostnameMatch>,
    pub headers: Vec<HeaderMatch>,
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum HostnameMatch {
    Exact(String),
    Suffix(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpGatewayRouteAction {
    pub target: GatewayRouteTarget,
    pub rewrite: Option<HttpGatewayRouteRewrite>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayRouteTarget {
    pub virtual_service: ResourceId,
    pub port: Option<u16>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpGatewayRouteRewrite {
    pub prefix: Option<PrefixRewrite>,
    /// `path.exact`.
    pub path: Option<String>,
    /// `hostname.defaultTargetHostname`.
    pub hostname: Option<Toggle>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PrefixRewrite {
    pub default_prefix: Option<Toggle>,
    pub value: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Toggle {
    Enabled,
    Disabled,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GrpcGatewayRoute {
    pub r#match: GrpcGatewayRouteMatch,
    pub action: GrpcGatewayRouteAction,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GrpcGatewayRouteMatch {
    pub service_name: Option<String>,
    pub hostname: Option<HostnameMatch>,
    pub metadata: Vec<HeaderMatch>,
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GrpcGatewayRouteAction {
    pub target: GatewayRouteTarget,
    /// `rewrite.hostname.defaultTargetHostname`.
    pub rewrite_hostname: Option<Toggle>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn empty_selector_matches_everything() {
        assert!(LabelSelector::default().matches(&labels(&[])));
        assert!(LabelSelector::default().matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn selector_semantics() {
        let s = LabelSelector {
            match_labels: labels(&[("app", "cart")]),
            match_expressions: vec![
                LabelSelectorRequirement {
                    key: "version".into(),
                    operator: SelectorOperator::In,
                    values: vec!["v1".into(), "v2".into()],
                },
                LabelSelectorRequirement {
                    key: "canary".into(),
                    operator: SelectorOperator::DoesNotExist,
                    values: vec![],
                },
                LabelSelectorRequirement {
                    key: "tier".into(),
                    operator: SelectorOperator::NotIn,
                    values: vec!["db".into()],
                },
            ],
        };
        assert!(s.matches(&labels(&[("app", "cart"), ("version", "v1")])));
        assert!(!s.matches(&labels(&[("app", "cart"), ("version", "v3")])));
        assert!(!s.matches(&labels(&[("app", "cart")])));
        assert!(!s.matches(&labels(&[
            ("app", "cart"),
            ("version", "v1"),
            ("canary", "1")
        ])));
        assert!(!s.matches(&labels(&[
            ("app", "cart"),
            ("version", "v1"),
            ("tier", "db")
        ])));
        let exists = LabelSelector {
            match_labels: BTreeMap::new(),
            match_expressions: vec![LabelSelectorRequirement {
                key: "x".into(),
                operator: SelectorOperator::Exists,
                values: vec![],
            }],
        };
        assert!(exists.matches(&labels(&[("x", "")])));
        assert!(!exists.matches(&labels(&[])));
    }

    #[test]
    fn duration_and_hostname() {
        let d = Duration {
            unit: DurationUnit::Ms,
            value: 1500,
        };
        assert_eq!(d.as_std(), std::time::Duration::from_millis(1500));
        let mut vs = VirtualService {
            id: ResourceId::new("shop", "cart"),
            labels: BTreeMap::new(),
            spec: VirtualServiceSpec::default(),
        };
        assert_eq!(vs.hostname(), "cart.shop.svc.cluster.local");
        vs.spec.aws_name = Some("cart.example".into());
        assert_eq!(vs.hostname(), "cart.example");
        assert_eq!(ResourceId::new("a", "b").to_string(), "a/b");
    }
}
