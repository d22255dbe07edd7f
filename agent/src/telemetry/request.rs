//! One HTTP request's telemetry: what the proxy learns about it as it goes, recorded once when
//! the response ends (its last byte went out, it failed mid-stream, or the client went away):
//! `strait_requests_total` and `strait_request_duration_seconds`, the retries and timeouts it
//! saw, the source virtual node's access log line, and its client span.
//!
//! The record rides on the response body ([`crate::proxy::http::body::ResponseBody`]), so a
//! streamed response is measured to its end and a gRPC status sent in trailers is seen.
//! Recording happens in `Drop`: it runs exactly once whichever way the response ends, and it
//! only touches lock-free counters and bounded queues (the access log and span exporters),
//! so it never blocks the connection's task.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::HeaderMap;

use super::access_log::{AccessLog, Entry};
use super::otlp::{Attr, SpanData};
use super::trace::Span;
use super::{GatewayRequestLabels, RequestLabels, RouteEventLabels, SeriesCache, Telemetry};
use crate::mesh::ResourceId;

/// gRPC status names by code (<https://grpc.github.io/grpc/core/md_doc_statuscodes.html>).
const GRPC_STATUS: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The bounded `response_code_class` label: `2xx` ... for HTTP, the status name for gRPC.
pub fn code_class(grpc: bool, status: u16, grpc_status: Option<i32>) -> &'static str {
    if grpc && let Some(code) = grpc_status {
        return usize::try_from(code)
            .ok()
            .and_then(|c| GRPC_STATUS.get(c))
            .copied()
            .unwrap_or("UNKNOWN");
    }
    match status / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        5 => "5xx",
        _ => "other",
    }
}

fn grpc_status(headers: &HeaderMap) -> Option<i32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

fn header_map(headers: &HeaderMap) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for (name, value) in headers {
        if let Ok(value) = value.to_str() {
            map.entry(name.as_str().to_owned())
                .or_insert_with(|| value.to_owned());
        }
    }
    map
}

/// What the proxy learned about one request (see the module docs).
pub struct Record {
    telemetry: Arc<Telemetry>,
    pub mesh: String,
    pub source_virtual_node: String,
    pub target_virtual_service: String,
    pub target_virtual_node: String,
    pub route: String,
    /// The GatewayRoute that took the request, at a gateway listener; else empty.
    pub gateway_route: String,
    started: Instant,
    grpc: bool,
    /// `HTTP/1.1` or `HTTP/2`.
    protocol: &'static str,
    status: u16,
    grpc_status: Option<i32>,
    /// Envoy response flags (`UF`, `UT`, `NR`, ...).
    pub flags: Vec<&'static str>,
    pub retries: Vec<&'static str>,
    pub timeouts: Vec<&'static str>,
    pub upstream_host: Option<SocketAddr>,
    /// Until the upstream's response headers (`x-envoy-upstream-service-time` in the log).
    pub upstream_service_time: Option<Duration>,
    pub attempts: u32,
    bytes_sent: u64,
    /// Bytes of the request body read from the client so far.
    pub bytes_received: Option<Box<dyn Fn() -> u64 + Send>>,
    pub log: Option<AccessLog>,
    /// Request headers as sent upstream, with `:method`, `:path`, `:authority` (kept only for
    /// the access log).
    pub request_headers: BTreeMap<String, String>,
    response_headers: BTreeMap<String, String>,
    pub span: Option<Span>,
    pub method: String,
    pub path: String,
    pub authority: String,
    ended: bool,
    /// `source` (the calling agent) or `destination` (the agent delivering to the server).
    pub reporter: &'static str,
    /// Not a request of the mesh (a gateway listener's health check): nothing is recorded.
    pub discarded: bool,
    /// The connection's last request series (its kept handles and spare label strings).
    series: SeriesCache,
}

impl Record {
    /// A record of one request on a connection that keeps `series`: its label strings are the
    /// spare ones of the connection's last request (see [`SeriesCache`]), which the caller
    /// overwrites ([`Record::set`], `String::clone_from`) instead of allocating new ones.
    pub fn new(
        telemetry: Arc<Telemetry>,
        series: &SeriesCache,
        source_virtual_node: &str,
        grpc: bool,
        protocol: &'static str,
    ) -> Record {
        let mut labels = series.spare();
        labels.source_virtual_node.push_str(source_virtual_node);
        Record {
            telemetry,
            mesh: labels.mesh,
            source_virtual_node: labels.source_virtual_node,
            target_virtual_service: labels.target_virtual_service,
            target_virtual_node: labels.target_virtual_node,
            route: labels.route,
            gateway_route: String::new(),
            started: Instant::now(),
            grpc,
            protocol,
            status: 0,
            grpc_status: None,
            flags: Vec::new(),
            retries: Vec::new(),
            timeouts: Vec::new(),
            upstream_host: None,
            upstream_service_time: None,
            attempts: 0,
            bytes_sent: 0,
            bytes_received: None,
            log: None,
            request_headers: BTreeMap::new(),
            response_headers: BTreeMap::new(),
            span: None,
            method: String::new(),
            path: String::new(),
            authority: String::new(),
            ended: false,
            reporter: "source",
            discarded: false,
            series: series.clone(),
        }
    }

    /// Writes a resource's `namespace/name` into a label string, reusing its buffer (as its
    /// `Display` does, without the formatter's cost).
    pub fn set(label: &mut String, id: &ResourceId) {
        label.clear();
        label.push_str(&id.namespace);
        label.push('/');
        label.push_str(&id.name);
    }

    /// Telemetry this request records into.
    pub fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }

    /// True when the request's headers and details are worth keeping (an access log or a
    /// recorded span will use them).
    pub fn wants_details(&self) -> bool {
        self.log.is_some() || self.recorded_span()
    }

    fn recorded_span(&self) -> bool {
        self.telemetry.exporter.is_some() && self.span.as_ref().is_some_and(|s| s.sampled)
    }

    /// Keeps the request's headers for the access log.
    pub fn request_headers(&mut self, headers: &HeaderMap) {
        if self.log.is_none() {
            return;
        }
        let mut map = header_map(headers);
        map.insert(":method".into(), self.method.clone());
        map.insert(":path".into(), self.path.clone());
        map.insert(":authority".into(), self.authority.clone());
        self.request_headers = map;
    }

    /// The response's head is known (status, and a trailers-only gRPC status).
    pub fn response(&mut self, status: u16, headers: &HeaderMap) {
        self.status = status;
        // Only a gRPC request's status is a label; the access log shows any.
        if self.grpc || self.log.is_some() {
            self.grpc_status = grpc_status(headers);
        }
        if self.log.is_some() {
            self.response_headers = header_map(headers);
            if let Some(t) = self.upstream_service_time {
                self.response_headers.insert(
                    "x-envoy-upstream-service-time".into(),
                    t.as_millis().to_string(),
                );
            }
        }
    }

    pub fn data(&mut self, len: usize) {
        self.bytes_sent += len as u64;
    }

    pub fn trailers(&mut self, trailers: &HeaderMap) {
        if let Some(status) = grpc_status(trailers) {
            self.grpc_status = Some(status);
        }
    }

    /// The response's last byte went out.
    pub fn end(&mut self) {
        self.ended = true;
    }

    /// The response stopped because a route timeout expired while it streamed.
    pub fn timed_out(&mut self, kind: &'static str, flag: &'static str) {
        self.timeouts.push(kind);
        self.flags.push(flag);
        self.ended = true;
    }

    /// The upstream broke off the response.
    pub fn upstream_failed(&mut self) {
        self.flags.push("UC");
        self.ended = true;
    }

    fn event_labels(&self, reason: &'static str) -> RouteEventLabels {
        RouteEventLabels {
            mesh: self.mesh.clone(),
            source_virtual_node: self.source_virtual_node.clone(),
            target_virtual_service: self.target_virtual_service.clone(),
            target_virtual_node: self.target_virtual_node.clone(),
            route: self.route.clone(),
            reason,
        }
    }

    fn finish(&mut self) {
        if self.discarded {
            return;
        }
        let duration = self.started.elapsed();
        if !self.ended {
            // The client went away before the response's end (Envoy: downstream connection
            // termination).
            self.flags.push("DC");
        }
        let class = code_class(self.grpc, self.status, self.grpc_status);
        let metrics = &self.telemetry.metrics;
        for reason in &self.retries {
            metrics
                .retries
                .get_or_create(&self.event_labels(reason))
                .inc();
        }
        for reason in &self.timeouts {
            metrics
                .timeouts
                .get_or_create(&self.event_labels(reason))
                .inc();
        }
        let flags = self.flags.join(",");
        // The wall clock is read only when a log line or a span needs it.
        let started_at = (self.log.is_some() || self.recorded_span()).then(|| {
            SystemTime::now()
                .checked_sub(duration)
                .unwrap_or(SystemTime::UNIX_EPOCH)
        });
        if let Some(log) = &self.log {
            log.log(&Entry {
                start: started_at,
                duration,
                protocol: self.protocol,
                request_headers: std::mem::take(&mut self.request_headers),
                response_headers: std::mem::take(&mut self.response_headers),
                response_code: Some(self.status),
                response_flags: flags.clone(),
                grpc_status: self.grpc_status,
                bytes_received: self.bytes_received.as_ref().map_or(0, |read| read()),
                bytes_sent: self.bytes_sent,
                upstream_host: self.upstream_host,
                upstream_cluster: self.target_virtual_node.clone(),
                downstream_remote: None,
                downstream_local: None,
                // At a gateway, the GatewayRoute that took the request.
                route_name: if self.gateway_route.is_empty() {
                    self.route.clone()
                } else {
                    self.gateway_route.clone()
                },
                reporter: self.reporter,
            });
        }
        if self.recorded_span()
            && let (Some(span), Some(exporter)) = (self.span.take(), &self.telemetry.exporter)
        {
            let started_at = started_at.unwrap_or(SystemTime::UNIX_EPOCH);
            exporter.export(self.span_data(span, started_at, duration, class, &flags));
        }
        if !self.gateway_route.is_empty() {
            metrics
                .gateway_requests
                .get_or_create(&GatewayRequestLabels {
                    mesh: self.mesh.clone(),
                    virtual_gateway: self.source_virtual_node.clone(),
                    gateway_route: std::mem::take(&mut self.gateway_route),
                    target_virtual_service: self.target_virtual_service.clone(),
                    response_code_class: class,
                })
                .inc();
        }
        let labels = RequestLabels {
            mesh: std::mem::take(&mut self.mesh),
            source_virtual_node: std::mem::take(&mut self.source_virtual_node),
            target_virtual_service: std::mem::take(&mut self.target_virtual_service),
            target_virtual_node: std::mem::take(&mut self.target_virtual_node),
            route: std::mem::take(&mut self.route),
            response_code_class: class,
            reporter: self.reporter,
        };
        self.series.record(metrics, labels, duration.as_secs_f64());
    }

    fn span_data(
        &self,
        span: Span,
        started_at: SystemTime,
        duration: Duration,
        class: &str,
        flags: &str,
    ) -> SpanData {
        let mut attributes = vec![
            ("http.request.method", Attr::Str(self.method.clone())),
            ("url.path", Attr::Str(self.path.clone())),
            ("server.address", Attr::Str(self.authority.clone())),
            (
                "http.response.status_code",
                Attr::Int(i64::from(self.status)),
            ),
            ("appmesh.mesh", Attr::Str(self.mesh.clone())),
            (
                "appmesh.virtual_node",
                Attr::Str(self.source_virtual_node.clone()),
            ),
            (
                "appmesh.target_virtual_service",
                Attr::Str(self.target_virtual_service.clone()),
            ),
            (
                "appmesh.target_virtual_node",
                Attr::Str(self.target_virtual_node.clone()),
            ),
            ("appmesh.route", Attr::Str(self.route.clone())),
            ("strait.response_code_class", Attr::Str(class.to_owned())),
            ("strait.attempts", Attr::Int(i64::from(self.attempts))),
        ];
        if let Some(host) = self.upstream_host {
            attributes.push(("network.peer.address", Attr::Str(host.ip().to_string())));
            attributes.push(("network.peer.port", Attr::Int(i64::from(host.port()))));
        }
        if self.grpc {
            attributes.push(("rpc.system", Attr::Str("grpc".into())));
            if let Some(code) = self.grpc_status {
                attributes.push(("rpc.grpc.status_code", Attr::Int(i64::from(code))));
            }
        }
        if !flags.is_empty() {
            attributes.push(("strait.response_flags", Attr::Str(flags.to_owned())));
        }
        let error = self.status >= 500
            || self.status == 0
            || (self.grpc && self.grpc_status.is_some_and(|c| c != 0));
        let name = if self.grpc {
            self.path.trim_start_matches('/').to_owned()
        } else if self.route.is_empty() {
            self.method.clone()
        } else {
            format!("{} {}", self.method, self.route)
        };
        SpanData {
            service: self.source_virtual_node.clone(),
            name,
            trace_id: span.trace_id,
            span_id: span.span_id,
            parent: span.parent,
            tracestate: span.tracestate,
            start: span.start,
            // The span began when the route was picked; it ends with the response.
            end: started_at + duration,
            attributes,
            error,
        }
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_classes() {
        assert_eq!(code_class(false, 200, None), "2xx");
        assert_eq!(code_class(false, 503, Some(14)), "5xx");
        assert_eq!(code_class(true, 200, Some(0)), "OK");
        assert_eq!(code_class(true, 200, Some(14)), "UNAVAILABLE");
        assert_eq!(code_class(true, 200, Some(99)), "UNKNOWN");
        assert_eq!(code_class(true, 503, None), "5xx");
        assert_eq!(code_class(false, 0, None), "other");
    }
}
