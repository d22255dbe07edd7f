//! Metrics (Prometheus / OpenMetrics), access logs, and traces.
//!
//! One registry for the whole agent, built here and passed down. Labels are bounded: mesh and
//! resource names, route names, response code classes, reasons; never addresses, ports or
//! paths. The eBPF counters are read from the kernel on each scrape (see
//! [`RedirectCollector`]). Per-request telemetry (metrics, access log line, client span) is
//! recorded once, when a response ends ([`request`]); `strait run --telemetry off` turns all of
//! it off, along with the TCP connection metrics and logs (see docs/metrics.md).

pub mod access_log;
pub mod otlp;
mod process;
pub mod request;
pub mod trace;

use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

pub use process::ProcessCollector;

use crate::redirect::Redirect;

/// Labels of a TCP connection through the agent.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub mesh: String,
    pub source_virtual_node: String,
    pub target_virtual_service: String,
    pub target_virtual_node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub mesh: String,
    pub source_virtual_node: String,
    pub target_virtual_service: String,
    pub target_virtual_node: String,
    /// `sent` (client to upstream) or `received` (upstream to client).
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub mesh: String,
    pub source_virtual_node: String,
    pub reason: &'static str,
}

/// Labels of an HTTP, HTTP/2 or gRPC request through the agent (App Mesh's dimensions).
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub mesh: String,
    pub source_virtual_node: String,
    pub target_virtual_service: String,
    /// Empty when no route matched (404) or no target could be picked.
    pub target_virtual_node: String,
    /// The App Mesh route's name; empty when none matched.
    pub route: String,
    /// `2xx`, `4xx`, ... for HTTP; for gRPC the status name (`OK`, `UNAVAILABLE`, ...).
    pub response_code_class: &'static str,
    /// Which side counted it (Istio's `reporter`): `source`, the caller's agent, or
    /// `destination`, the agent delivering to the server's pod (for listeners it serves
    /// request by request: docs/resilience.md).
    pub reporter: &'static str,
}

/// Labels of a request that entered the mesh through a VirtualGateway (`crate::gateway`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GatewayRequestLabels {
    pub mesh: String,
    pub virtual_gateway: String,
    /// The GatewayRoute (`namespace/name`).
    pub gateway_route: String,
    pub target_virtual_service: String,
    /// As in [`RequestLabels`].
    pub response_code_class: &'static str,
}

/// Labels of a retry or a timeout.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteEventLabels {
    pub mesh: String,
    pub source_virtual_node: String,
    pub target_virtual_service: String,
    pub target_virtual_node: String,
    pub route: String,
    /// Retries: what was retried (`connect_failure`, `reset`, `refused_stream`, `status`,
    /// `per_try_timeout`). Timeouts: which one expired (`per_request`, `per_try`, `idle`).
    pub reason: &'static str,
}

/// Labels of a health check probe result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HealthLabels {
    pub mesh: String,
    pub virtual_node: String,
    /// `success` or `failure`.
    pub result: &'static str,
}

/// Labels of endpoint ejections.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub mesh: String,
    pub virtual_node: String,
}

/// Histogram buckets of request durations, seconds: 0.5 ms to 30 s.
pub const DURATION_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0,
    30.0,
];

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// A family of request duration histograms.
pub type DurationFamily = Family<RequestLabels, Histogram, fn() -> Histogram>;

/// The metrics the proxy updates.
#[derive(Clone)]
pub struct Metrics {
    /// Requests answered, by App Mesh dimensions and response code class.
    pub requests: Family<RequestLabels, Counter>,
    /// Their durations, from the request's arrival to the response's last byte.
    pub request_duration: DurationFamily,
    pub retries: Family<RouteEventLabels, Counter>,
    pub timeouts: Family<RouteEventLabels, Counter>,
    pub health_checks: Family<HealthLabels, Counter>,
    /// Endpoints taken out of load balancing by active health checks.
    pub ejections: Family<EndpointLabels, Counter>,
    /// Endpoints out of load balancing now.
    pub ejected: Family<EndpointLabels, Gauge>,
    /// Spans handed to the OTLP exporter, by result.
    pub spans: Family<otlp::SpanLabels, Counter>,
    pub tcp_opened: Family<TcpLabels, Counter>,
    pub tcp_closed: Family<TcpLabels, Counter>,
    pub tcp_active: Family<TcpLabels, Gauge>,
    pub tcp_bytes: Family<BytesLabels, Counter>,
    /// Connections the agent accepted but could not forward, by reason.
    pub tcp_failures: Family<FailureLabels, Counter>,
    pub enrolled_workloads: Gauge,
    /// Requests answered at a gateway listener, by gateway route.
    pub gateway_requests: Family<GatewayRequestLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(duration_histogram),
            retries: Family::default(),
            timeouts: Family::default(),
            health_checks: Family::default(),
            ejections: Family::default(),
            ejected: Family::default(),
            spans: Family::default(),
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            tcp_active: Family::default(),
            tcp_bytes: Family::default(),
            tcp_failures: Family::default(),
            enrolled_workloads: Gauge::default(),
            gateway_requests: Family::default(),
        }
    }
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "strait_gateway_requests",
            "Requests answered at VirtualGateway listeners, by gateway, gateway route, target virtual service and response code class",
            self.gateway_requests.clone(),
        );
        registry.register(
            "strait_requests",
            "HTTP, HTTP/2 and gRPC requests answered, by mesh, source and target virtual node, target virtual service, route and response code class (gRPC: status name)",
            self.requests.clone(),
        );
        registry.register_with_unit(
            "strait_request_duration",
            "Request durations from arrival at the agent to the response's last byte",
            prometheus_client::registry::Unit::Seconds,
            self.request_duration.clone(),
        );
        registry.register(
            "strait_request_retries",
            "Request attempts retried under the route's retry policy (or App Mesh's implicit one), by what was retried",
            self.retries.clone(),
        );
        registry.register(
            "strait_request_timeouts",
            "Route timeouts that expired (per_request, per_try, idle)",
            self.timeouts.clone(),
        );
        registry.register(
            "strait_health_checks",
            "Active health check probes of endpoints, by virtual node and result",
            self.health_checks.clone(),
        );
        registry.register(
            "strait_endpoint_ejections",
            "Endpoints taken out of load balancing after failing health checks",
            self.ejections.clone(),
        );
        registry.register(
            "strait_endpoints_ejected",
            "Endpoints out of load balancing now (failing their health check)",
            self.ejected.clone(),
        );
        registry.register(
            "strait_trace_spans",
            "Spans handed to the OTLP exporter, by result (exported, queue_full, export_failed)",
            self.spans.clone(),
        );
        registry.register(
            "strait_tcp_connections_opened",
            "TCP connections accepted from local workloads and forwarded",
            self.tcp_opened.clone(),
        );
        registry.register(
            "strait_tcp_connections_closed",
            "TCP connections finished",
            self.tcp_closed.clone(),
        );
        registry.register(
            "strait_tcp_connections_active",
            "TCP connections open now",
            self.tcp_active.clone(),
        );
        registry.register(
            "strait_tcp_bytes",
            "Bytes carried, by direction (sent: workload to upstream)",
            self.tcp_bytes.clone(),
        );
        registry.register(
            "strait_tcp_connection_failures",
            "Captured connections the agent could not forward, by reason",
            self.tcp_failures.clone(),
        );
        registry.register(
            "strait_enrolled_workloads",
            "Local workloads enrolled in the mesh",
            self.enrolled_workloads.clone(),
        );
    }
}

/// The request counter and duration histogram a connection's requests last recorded into,
/// and the label strings of its last request, kept for the next one to write into.
///
/// A connection's requests nearly always share one label set (one caller, one virtual
/// service, one route). Without this, every request allocates its five label strings anew and
/// finds its series in the families by hashing them into a locked map, twice: work repeated
/// request after request. With it, a request takes the spare strings of the last one
/// ([`SeriesCache::spare`]) and overwrites them, which reuses their buffers, and a request
/// with the kept labels updates the kept handles after comparing them. A different label set
/// (another route, another code class, a gateway's next route) looks its series up as before
/// and is kept instead. The families are never cleared, so a kept handle is always the series
/// the registry exports.
#[derive(Clone, Default)]
pub struct SeriesCache(Arc<Mutex<Kept>>);

#[derive(Default)]
struct Kept {
    series: Option<RequestSeries>,
    spare: Option<RequestLabels>,
}

struct RequestSeries {
    labels: RequestLabels,
    requests: Counter,
    duration: Histogram,
}

impl SeriesCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Empty label strings for the next request: the last request's, cleared, when no other
    /// request holds them (an HTTP/2 connection's concurrent streams), so writing into them
    /// allocates nothing.
    pub fn spare(&self) -> RequestLabels {
        let mut labels = self.lock().spare.take().unwrap_or_default();
        for label in [
            &mut labels.mesh,
            &mut labels.source_virtual_node,
            &mut labels.target_virtual_service,
            &mut labels.target_virtual_node,
            &mut labels.route,
        ] {
            label.clear();
        }
        labels
    }

    /// Counts one request with `labels` that took `seconds`.
    pub fn record(&self, metrics: &Metrics, labels: RequestLabels, seconds: f64) {
        let mut kept = self.lock();
        if let Some(series) = &kept.series
            && series.labels == labels
        {
            series.duration.observe(seconds);
            series.requests.inc();
            kept.spare = Some(labels);
            return;
        }
        let series = RequestSeries {
            duration: metrics.request_duration.get_or_create(&labels).clone(),
            requests: metrics.requests.get_or_create(&labels).clone(),
            labels,
        };
        series.duration.observe(seconds);
        series.requests.inc();
        kept.spare = kept.series.replace(series).map(|old| old.labels);
    }
}

/// The per-request telemetry switch and its sinks; absent under `--telemetry off`.
pub struct Telemetry {
    pub metrics: Metrics,
    /// Probability that a request arriving without a trace context starts a sampled trace.
    pub sampling: f64,
    /// None without `--otlp-endpoint`: contexts are still propagated, spans are not recorded.
    pub exporter: Option<otlp::Exporter>,
}

/// Exposes the eBPF programs' per-reason counters, read on each scrape.
pub struct RedirectCollector(pub Arc<Redirect>);

impl std::fmt::Debug for RedirectCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedirectCollector")
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

impl Collector for RedirectCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(counters) = self.0.counters() else {
            return Ok(());
        };
        let family = counters.by_reason();
        let mut metric = encoder.encode_descriptor(
            "strait_redirect_connects",
            "eBPF outcomes by reason: connects (captured, denied, ...) and fast-path sends and sockets (fastpath_*)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (reason, value) in family {
            let labels = ReasonLabel { reason };
            ConstCounter::new(value).encode(metric.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;

    use super::*;

    fn labels(route: &str, class: &'static str) -> RequestLabels {
        RequestLabels {
            mesh: "m".into(),
            source_virtual_node: "ns/client".into(),
            target_virtual_service: "ns/web".into(),
            target_virtual_node: "ns/web-v1".into(),
            route: route.into(),
            response_code_class: class,
            reporter: "source",
        }
    }

    #[test]
    fn a_connections_kept_series_counts_into_the_families_the_registry_exports() {
        let metrics = Metrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let series = SeriesCache::default();
        // Kept, kept, another route, another class, back to the first.
        for (route, class) in [
            ("r1", "2xx"),
            ("r1", "2xx"),
            ("r2", "2xx"),
            ("r1", "5xx"),
            ("r1", "2xx"),
        ] {
            series.record(&metrics, labels(route, class), 0.002);
        }
        // The last request's label strings come back empty, their buffers kept; a second
        // taker (a concurrent stream) gets fresh ones.
        let spare = series.spare();
        assert!(spare.route.is_empty() && spare.mesh.is_empty());
        assert!(spare.route.capacity() >= 2 && spare.target_virtual_node.capacity() > 0);
        assert_eq!(series.spare().route.capacity(), 0);
        // Another connection's requests with the same labels land in the same series.
        SeriesCache::default().record(&metrics, labels("r1", "2xx"), 0.002);
        let count = |route, class| metrics.requests.get_or_create(&labels(route, class)).get();
        assert_eq!(count("r1", "2xx"), 4);
        assert_eq!(count("r2", "2xx"), 1);
        assert_eq!(count("r1", "5xx"), 1);
        let mut text = String::new();
        encode(&mut text, &registry).expect("encode");
        let line = |name: &str, route: &str, class: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with(name)
                        && l.contains(&format!("route=\"{route}\""))
                        && l.contains(&format!("response_code_class=\"{class}\""))
                })
                .unwrap_or_else(|| panic!("no {name} line for {route} {class} in:\n{text}"))
                .rsplit(' ')
                .next()
                .expect("a value")
                .to_owned()
        };
        assert_eq!(line("strait_requests_total{", "r1", "2xx"), "4");
        assert_eq!(
            line("strait_request_duration_seconds_count{", "r1", "2xx"),
            "4"
        );
        assert_eq!(
            line("strait_request_duration_seconds_count{", "r2", "2xx"),
            "1"
        );
        assert_eq!(
            line("strait_request_duration_seconds_count{", "r1", "5xx"),
            "1"
        );
    }
}
