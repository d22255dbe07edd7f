//! A small OTLP/HTTP exporter for spans, JSON encoding
//! (<https://opentelemetry.io/docs/specs/otlp/#otlphttp>): the proxy hands finished spans to a
//! bounded queue and goes on; one background task sends them in batches (up to
//! [`BATCH`] spans, or what arrived within [`LINGER`]) as `POST {endpoint}/v1/traces`.
//!
//! Never in a request's way: a full queue drops the span, a collector that is down or slow
//! costs the batch (bounded by [`EXPORT_TIMEOUT`]), and both are counted in
//! `strait_trace_spans_total{result}`. No retries: a trace with a hole is better than an agent
//! that buffers without bound.
//!
//! Hand-written rather than the opentelemetry SDK: the JSON mapping of one message type is a
//! few dozen lines, the SDK brings its own runtime glue and many crates.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, Uri};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::trace::hex;

/// Spans waiting for the exporter before new ones are dropped.
pub const QUEUE: usize = 8192;
/// Spans per request to the collector.
pub const BATCH: usize = 512;
/// How long the exporter waits for a batch to fill.
pub const LINGER: Duration = Duration::from_millis(500);
/// How long one export may take.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "--otlp-endpoint {0}: expected an http:// URL of an OTLP/HTTP receiver, e.g. \
         http://127.0.0.1:4318 (the collector's default port; https is not supported yet, \
         run a collector on the node)"
    )]
    Endpoint(String),
}

/// An attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum Attr {
    Str(String),
    Int(i64),
}

/// A finished span.
#[derive(Debug, Clone)]
pub struct SpanData {
    /// `service.name` of the span's resource: the source virtual node.
    pub service: String,
    pub name: String,
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent: Option<[u8; 8]>,
    pub tracestate: Option<String>,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, Attr)>,
    /// The request failed (5xx, a gRPC error, or no response).
    pub error: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SpanLabels {
    /// `exported`, `queue_full` or `export_failed`.
    pub result: &'static str,
}

/// The proxy's handle on the exporter.
#[derive(Clone, Debug)]
pub struct Exporter {
    queue: mpsc::Sender<SpanData>,
    spans: Family<SpanLabels, Counter>,
}

impl Exporter {
    /// Queues a span; never waits.
    pub fn export(&self, span: SpanData) {
        if self.queue.try_send(span).is_err() {
            self.spans
                .get_or_create(&SpanLabels {
                    result: "queue_full",
                })
                .inc();
        }
    }
}

/// The traces URL for `--otlp-endpoint`: a base URL gets `/v1/traces` (as
/// `OTEL_EXPORTER_OTLP_ENDPOINT` does); a URL with a path is used as it is.
pub fn traces_url(endpoint: &str) -> Result<Uri, Error> {
    let bad = || Error::Endpoint(endpoint.to_owned());
    let uri: Uri = endpoint.parse().map_err(|_| bad())?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        return Err(bad());
    }
    if uri.path() == "/" || uri.path().is_empty() {
        return format!("{}/v1/traces", endpoint.trim_end_matches('/'))
            .parse()
            .map_err(|_| bad());
    }
    Ok(uri)
}

/// Starts the export task; it stops (after a last send) when `shutdown` is cancelled.
pub fn start(
    url: Uri,
    spans: Family<SpanLabels, Counter>,
    shutdown: CancellationToken,
) -> Exporter {
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(export_loop(url, rx, spans.clone(), shutdown));
    Exporter { queue: tx, spans }
}

async fn export_loop(
    url: Uri,
    mut rx: mpsc::Receiver<SpanData>,
    spans: Family<SpanLabels, Counter>,
    shutdown: CancellationToken,
) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut failures_logged = 0u32;
    loop {
        let first = tokio::select! {
            span = rx.recv() => span,
            _ = shutdown.cancelled() => None,
        };
        let Some(first) = first else {
            return;
        };
        let mut batch = vec![first];
        let linger = tokio::time::sleep(LINGER);
        tokio::pin!(linger);
        while batch.len() < BATCH {
            tokio::select! {
                span = rx.recv() => match span {
                    Some(span) => batch.push(span),
                    None => break,
                },
                _ = &mut linger => break,
            }
        }
        let count = batch.len() as u64;
        let body = encode(&batch).to_string();
        let request = Request::builder()
            .method(Method::POST)
            .uri(url.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)));
        let Ok(request) = request else {
            continue;
        };
        let sent = tokio::time::timeout(EXPORT_TIMEOUT, client.request(request)).await;
        let failure = match sent {
            Ok(Ok(response)) if response.status().is_success() => None,
            Ok(Ok(response)) => Some(format!("the collector answered {}", response.status())),
            Ok(Err(error)) => Some(error.to_string()),
            Err(_) => Some(format!("no answer within {EXPORT_TIMEOUT:?}")),
        };
        let result = match failure {
            None => "exported",
            Some(error) => {
                // Logged a few times, then only counted: a collector that is down for a day
                // must not fill the agent's log.
                if failures_logged < 5 {
                    failures_logged += 1;
                    tracing::warn!(%url, spans = count, %error, "trace export failed; the spans are dropped (see strait_trace_spans_total)");
                }
                "export_failed"
            }
        };
        spans.get_or_create(&SpanLabels { result }).inc_by(count);
    }
}

fn nanos(time: SystemTime) -> String {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
        .to_string()
}

fn attribute(key: &str, value: &Attr) -> Value {
    match value {
        Attr::Str(s) => json!({"key": key, "value": {"stringValue": s}}),
        // int64 is a string in proto3's JSON mapping.
        Attr::Int(i) => json!({"key": key, "value": {"intValue": i.to_string()}}),
    }
}

/// An `ExportTraceServiceRequest` in OTLP's JSON mapping: one resource per source virtual
/// node, one scope (`strait`).
pub fn encode(spans: &[SpanData]) -> Value {
    let mut by_service: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for span in spans {
        let mut s = json!({
            "traceId": hex(&span.trace_id),
            "spanId": hex(&span.span_id),
            "name": span.name,
            // SPAN_KIND_CLIENT: the proxy calls the upstream on the workload's behalf.
            "kind": 3,
            "startTimeUnixNano": nanos(span.start),
            "endTimeUnixNano": nanos(span.end),
            "attributes": span.attributes.iter().map(|(k, v)| attribute(k, v)).collect::<Vec<_>>(),
            // STATUS_CODE_ERROR = 2, UNSET = 0.
            "status": {"code": if span.error { 2 } else { 0 }},
        });
        if let Some(parent) = span.parent {
            s["parentSpanId"] = hex(&parent).into();
        }
        if let Some(state) = &span.tracestate {
            s["traceState"] = state.clone().into();
        }
        by_service.entry(&span.service).or_default().push(s);
    }
    let resource_spans: Vec<Value> = by_service
        .into_iter()
        .map(|(service, spans)| {
            json!({
                "resource": {"attributes": [
                    attribute("service.name", &Attr::Str(service.to_owned())),
                    attribute("telemetry.sdk.name", &Attr::Str("strait".into())),
                ]},
                "scopeSpans": [{
                    "scope": {"name": "strait", "version": env!("CARGO_PKG_VERSION")},
                    "spans": spans,
                }],
            })
        })
        .collect();
    json!({ "resourceSpans": resource_spans })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_get_the_traces_path() {
        assert_eq!(
            traces_url("http://127.0.0.1:4318").unwrap().to_string(),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://c:4318/").unwrap().to_string(),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://c:4318/custom/traces").unwrap().path(),
            "/custom/traces"
        );
        assert!(traces_url("https://c:4318").is_err());
        assert!(traces_url("c:4318").is_err());
    }

    #[test]
    fn spans_encode_as_otlp_json() {
        let start = UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
        let span = SpanData {
            service: "app/client".into(),
            name: "GET split".into(),
            trace_id: [0xab; 16],
            span_id: [0x01; 8],
            parent: Some([0x02; 8]),
            tracestate: Some("k=v".into()),
            start,
            end: start + Duration::from_millis(3),
            attributes: vec![
                ("http.response.status_code", Attr::Int(200)),
                ("appmesh.route", Attr::Str("split".into())),
            ],
            error: false,
        };
        let v = encode(&[
            span.clone(),
            SpanData {
                service: "app/other".into(),
                ..span
            },
        ]);
        let resources = v["resourceSpans"].as_array().unwrap();
        assert_eq!(resources.len(), 2);
        assert_eq!(
            resources[0]["resource"]["attributes"][0]["value"]["stringValue"],
            "app/client"
        );
        let s = &resources[0]["scopeSpans"][0]["spans"][0];
        assert_eq!(s["traceId"], "ab".repeat(16));
        assert_eq!(s["spanId"], "0101010101010101");
        assert_eq!(s["parentSpanId"], "0202020202020202");
        assert_eq!(s["kind"], 3);
        assert_eq!(s["startTimeUnixNano"], "1700000000123456789");
        assert_eq!(s["endTimeUnixNano"], "1700000000126456789");
        assert_eq!(s["attributes"][0]["value"]["intValue"], "200");
        assert_eq!(s["traceState"], "k=v");
    }
}
