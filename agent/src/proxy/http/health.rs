//! Active health checks from App Mesh's listener `healthCheck`: every endpoint of a virtual
//! node whose listener has one is probed every `intervalMillis`, each probe bounded by
//! `timeoutMillis`; `unhealthyThreshold` consecutive failures take it out of load balancing,
//! `healthyThreshold` consecutive successes bring it back. As in Envoy, the first probe's
//! result counts at once (an endpoint that is dead when checks start is ejected after one
//! probe), and until then an endpoint counts as healthy, so an agent restart does not stop
//! traffic.
//!
//! Probes, by `healthCheck.protocol`: `tcp` connects; `http` and `http2` send `GET path` over
//! HTTP/1.1 or HTTP/2 (prior knowledge) and want 200 (Envoy's default expected status); `grpc`
//! calls `grpc.health.v1.Health/Check` (the gRPC Health Checking Protocol) and wants
//! `SERVING`. Probes go through [`upstream::connect`] like all traffic.
//!
//! Every probe is counted (`strait_health_checks_total{result}`), every ejection too
//! (`strait_endpoint_ejections_total`), and `strait_endpoints_ejected` says how many endpoints
//! are out now. These are not per-request metrics and stay on under `--telemetry off`.
//!
//! The checker follows the routing table: when the mesh or DNS answers change, checks of
//! endpoints that are gone stop and new endpoints get theirs.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf as _, Bytes};
use http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt as _;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio_util::sync::CancellationToken;

use super::body::ReplayBody;
use crate::mesh::{HealthCheck, Protocol, ResourceId};
use crate::proxy::{Context, upstream};
use crate::routing::Table;
use crate::routing::http::HealthCheckSpec;
use crate::telemetry::{EndpointLabels, HealthLabels};

/// How often the checker looks for a new routing table.
const TABLE_POLL: Duration = Duration::from_secs(1);

/// Why a probe failed (logged at debug level; the ejection is logged at warn).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("connect failed: {0}")]
    Connect(std::io::Error),
    #[error("HTTP failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("bad request: {0}")]
    Request(#[from] http::Error),
    #[error("status {0}, want 200")]
    Status(StatusCode),
    #[error("gRPC status {0}, want 0 (OK)")]
    GrpcStatus(String),
    #[error("the service is not SERVING")]
    NotServing,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

type Key = (ResourceId, SocketAddr);

/// Starts the checker; it stops when the agent shuts down.
pub fn spawn(ctx: Arc<Context>) {
    tokio::spawn(async move {
        let mut running: HashMap<Key, (Arc<HealthCheckSpec>, CancellationToken)> = HashMap::new();
        let mut last: Option<Arc<Table>> = None;
        let mut poll = tokio::time::interval(TABLE_POLL);
        loop {
            tokio::select! {
                _ = ctx.shutdown.cancelled() => return,
                _ = poll.tick() => {}
            }
            // Outlier ejections whose time is up (they take traffic again already).
            ctx.http.endpoints.sweep();
            let state = ctx.state.snapshot();
            let (table, policy) = (&state.table, &state.policy);
            if last.as_ref().is_some_and(|l| Arc::ptr_eq(l, table)) {
                continue;
            }
            last = Some(table.clone());
            let mut desired: HashMap<Key, Arc<HealthCheckSpec>> = HashMap::new();
            for spec in &table.health_checks {
                if let Some(endpoints) = table.endpoints.get(&spec.virtual_node) {
                    for ip in &endpoints.addrs {
                        let addr = SocketAddr::new(*ip, spec.listener_port);
                        // A plaintext probe to another node's pod behind a tls listener would
                        // be refused by that pod's capture (STRICT) and eject a healthy
                        // endpoint. Such endpoints are not probed; connect failures and
                        // retries still steer around them (docs/http.md).
                        if ctx.transport.local_pod(*ip).is_none()
                            && policy
                                .listener_tls(&spec.virtual_node, spec.listener_port)
                                .is_some()
                        {
                            tracing::debug!(virtual_node = %spec.virtual_node, %addr, "not probing a remote endpoint behind a tls listener");
                            continue;
                        }
                        desired.insert((spec.virtual_node.clone(), addr), spec.clone());
                    }
                }
            }
            running.retain(|key, (spec, stop)| {
                let keep = desired.get(key).is_some_and(|d| d == spec);
                if !keep {
                    stop.cancel();
                }
                keep
            });
            for (key, spec) in desired {
                if running.contains_key(&key) {
                    continue;
                }
                let stop = ctx.shutdown.child_token();
                tokio::spawn(check_loop(ctx.clone(), spec.clone(), key.1, stop.clone()));
                running.insert(key, (spec, stop));
            }
            // Forget endpoints that left the mesh.
            let live: HashSet<(ResourceId, std::net::IpAddr)> = table
                .endpoints
                .iter()
                .flat_map(|(node, e)| e.addrs.iter().map(|ip| (node.clone(), *ip)))
                .collect();
            ctx.http
                .endpoints
                .retain(|node, addr| live.contains(&(node.clone(), addr.ip())));
            let ips: HashSet<std::net::IpAddr> = live.iter().map(|(_, ip)| *ip).collect();
            ctx.http.pool.retain(|addr| ips.contains(&addr.ip()));
        }
    });
}

async fn check_loop(
    ctx: Arc<Context>,
    spec: Arc<HealthCheckSpec>,
    endpoint: SocketAddr,
    stop: CancellationToken,
) {
    let state = ctx.http.endpoints.state(&spec.virtual_node, endpoint);
    let target = SocketAddr::new(endpoint.ip(), spec.check_port());
    let policy = &spec.policy;
    let interval = Duration::from_millis(u64::from(policy.interval_millis));
    let timeout = Duration::from_millis(u64::from(policy.timeout_millis));
    let (mut successes, mut failures, mut first) = (0u32, 0u32, true);
    let metrics = &ctx.metrics;
    // Taken once, so an ejection and its readmission move the same gauge.
    let labels = EndpointLabels {
        mesh: ctx.state.snapshot().table.mesh.clone(),
        virtual_node: spec.virtual_node.to_string(),
    };
    let node_labels = || labels.clone();
    let count = |result: &'static str| {
        let EndpointLabels { mesh, virtual_node } = node_labels();
        metrics
            .health_checks
            .get_or_create(&HealthLabels {
                mesh,
                virtual_node,
                result,
            })
            .inc();
    };
    loop {
        let result = match tokio::time::timeout(timeout, probe(&ctx, policy, target)).await {
            Ok(result) => result,
            Err(_) => Err(ProbeError::Timeout(timeout)),
        };
        match result {
            Ok(()) => {
                count("success");
                successes += 1;
                failures = 0;
                if !state.healthy() && (first || successes >= policy.healthy_threshold) {
                    state.set_healthy(true);
                    metrics.ejected.get_or_create(&node_labels()).dec();
                    tracing::info!(
                        virtual_node = %spec.virtual_node,
                        endpoint = %endpoint,
                        successes,
                        "health check: endpoint readmitted"
                    );
                }
            }
            Err(error) => {
                count("failure");
                failures += 1;
                successes = 0;
                tracing::debug!(virtual_node = %spec.virtual_node, %endpoint, error = %crate::logging::Chain(&error), "health check failed");
                if state.healthy() && (first || failures >= policy.unhealthy_threshold) {
                    state.set_healthy(false);
                    metrics.ejections.get_or_create(&node_labels()).inc();
                    metrics.ejected.get_or_create(&node_labels()).inc();
                    tracing::warn!(
                        virtual_node = %spec.virtual_node,
                        endpoint = %endpoint,
                        failures,
                        error = %crate::logging::Chain(&error),
                        "health check: endpoint ejected"
                    );
                }
            }
        }
        first = false;
        tokio::select! {
            _ = stop.cancelled() => {
                // The check is gone from the mesh: the endpoint is no longer judged by it.
                if !state.healthy() {
                    metrics.ejected.get_or_create(&node_labels()).dec();
                }
                state.set_healthy(true);
                return;
            }
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

async fn probe(ctx: &Context, policy: &HealthCheck, target: SocketAddr) -> Result<(), ProbeError> {
    // A pod on this node is probed from inside its own network namespace, like its traffic is
    // delivered (so a STRICT listener's capture does not mistake the probe for an outsider).
    let stream: upstream::Stream = match ctx.transport.local_pod(target.ip()) {
        Some(pod) => upstream::Stream::new(
            pod.connect_loopback(target.ip(), target.port())
                .await
                .map_err(ProbeError::Connect)?,
        ),
        None => upstream::Stream::new(
            upstream::connect(target)
                .await
                .map_err(ProbeError::Connect)?,
        ),
    };
    let io = TokioIo::new(stream);
    let path = policy.path.clone().unwrap_or_else(|| "/".to_owned());
    match policy.protocol {
        Protocol::Tcp => Ok(()),
        Protocol::Http => {
            let (mut sender, conn) = http1::handshake::<_, ReplayBody>(io).await?;
            tokio::spawn(conn);
            let request = Request::builder()
                .method(Method::GET)
                .uri(path)
                .header(header::HOST, target.to_string())
                .header(header::USER_AGENT, "strait-health-check")
                .body(ReplayBody::empty())?;
            let response = sender.send_request(request).await?;
            if response.status() != StatusCode::OK {
                return Err(ProbeError::Status(response.status()));
            }
            Ok(())
        }
        Protocol::Http2 => {
            let (mut sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake::<_, ReplayBody>(io)
                .await?;
            tokio::spawn(conn);
            let request = Request::builder()
                .method(Method::GET)
                .uri(format!("http://{target}{path}"))
                .header(header::USER_AGENT, "strait-health-check")
                .body(ReplayBody::empty())?;
            let response = sender.send_request(request).await?;
            if response.status() != StatusCode::OK {
                return Err(ProbeError::Status(response.status()));
            }
            Ok(())
        }
        Protocol::Grpc => {
            let (mut sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake::<_, ReplayBody>(io)
                .await?;
            tokio::spawn(conn);
            // An empty HealthCheckRequest (service ""): the server's overall health. gRPC
            // framing: compressed flag 0, length 0.
            let request = Request::builder()
                .method(Method::POST)
                .uri(format!("http://{target}/grpc.health.v1.Health/Check"))
                .header(header::CONTENT_TYPE, "application/grpc")
                .header(header::TE, "trailers")
                .header(header::USER_AGENT, "strait-health-check")
                .body(ReplayBody::from_bytes(Bytes::from_static(&[0, 0, 0, 0, 0])))?;
            let response = sender.send_request(request).await?;
            if response.status() != StatusCode::OK {
                return Err(ProbeError::Status(response.status()));
            }
            let header_status = response.headers().get("grpc-status").cloned();
            let collected = response.into_body().collect().await?;
            let status = collected
                .trailers()
                .and_then(|t| t.get("grpc-status").cloned())
                .or(header_status);
            let status = status
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .unwrap_or("missing");
            if status != "0" {
                return Err(ProbeError::GrpcStatus(status.to_owned()));
            }
            if serving(collected.to_bytes()) {
                Ok(())
            } else {
                Err(ProbeError::NotServing)
            }
        }
    }
}

/// Reads a framed `HealthCheckResponse`: field 1 (`status`, varint) must be 1 (`SERVING`).
fn serving(mut body: Bytes) -> bool {
    if body.len() < 5 {
        return false;
    }
    body.advance(5);
    // The message is tiny: `08 01` when SERVING. Walk its fields to be robust to extras.
    let mut i = 0;
    while i < body.len() {
        let key = body[i];
        i += 1;
        let (field, wire) = (key >> 3, key & 7);
        if wire != 0 {
            return false;
        }
        let mut value: u64 = 0;
        let mut shift = 0;
        loop {
            let Some(&b) = body.get(i) else { return false };
            i += 1;
            value |= u64::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 || shift > 63 {
                break;
            }
        }
        if field == 1 {
            return value == 1;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_health_response_parsing() {
        assert!(serving(Bytes::from_static(&[0, 0, 0, 0, 2, 8, 1])));
        assert!(!serving(Bytes::from_static(&[0, 0, 0, 0, 2, 8, 2])));
        assert!(!serving(Bytes::from_static(&[0, 0, 0, 0, 0])));
        assert!(!serving(Bytes::from_static(&[0, 0])));
    }
}
