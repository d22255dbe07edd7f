//! The admin HTTP API: readiness, metrics, the mesh in force, local workloads, eBPF counters,
//! ejected endpoints and circuit breakers (`/status/resilience`), and a live page of the
//! node's mesh (`/ui`, [`ui`]).
//!
//! Plain HTTP/1.1 on the `--admin` address (default 127.0.0.1:15000, like Envoy's admin port
//! in App Mesh). Every answer is computed from shared state on request; nothing here is on
//! the data path.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::redirect::Redirect;

pub mod ui;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on admin address {addr} (pick another with --admin)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// One local workload as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadStatus {
    pub pod: String,
    pub virtual_node: Option<String>,
    pub enrolled: bool,
    pub cgroup_id: Option<u64>,
    /// Inode of the network namespace the pod is enrolled in (as `ls -Li /proc/PID/ns/net`
    /// shows it); the CNI hand-off answers an ADD once it is the namespace it was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns_inode: Option<u64>,
    pub listeners: Vec<SocketAddr>,
    /// Why the pod is not enrolled, when it should be.
    pub error: Option<String>,
    /// Why the pod is not enrolled and is not meant to be (no VirtualNode or several select
    /// it, its namespace is not in the mesh, host network, no IP yet).
    pub reason: Option<String>,
    /// The virtual node's identity and certificate (enrolled pods).
    pub identity: Option<IdentityStatus>,
}

/// Who a workload is to its peers: the identities strait accepts for its virtual node and
/// the certificate the mesh file names for it.
#[derive(Debug, Clone, Serialize)]
pub struct IdentityStatus {
    /// SPIFFE ID, then the DNS name (`serviceDiscovery.dns.hostname`), if any.
    pub identities: Vec<String>,
    /// None when the virtual node has no certificate (no listener or client policy `tls`).
    pub certificate: Option<CertificateStatus>,
}

/// One certificate as read from its file now.
#[derive(Debug, Clone, Serialize)]
pub struct CertificateStatus {
    /// Where the mesh file says it is (`...tls.certificate.file.certificateChain`).
    pub path: String,
    /// URI and DNS SANs of the leaf.
    pub sans: Vec<String>,
    pub serial: String,
    pub not_after_unix: i64,
    /// The same as an RFC 3339 UTC time.
    pub not_after: String,
    /// Seconds left when this answer was made (negative: expired).
    pub expires_in_seconds: i64,
    /// Why the certificate could not be read, if it could not.
    pub error: Option<String>,
}

/// The mesh in force, as `/config_dump` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigDump {
    pub file: String,
    pub sha256: String,
    pub loaded_at_unix: u64,
    pub mesh: serde_json::Value,
    /// The last mesh file the agent refused (kept after later successful reloads, so an
    /// operator can see what went wrong; compare `at_unix` with `loaded_at_unix`).
    pub last_rejected: Option<Rejected>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Rejected {
    pub at_unix: u64,
    pub errors: Vec<String>,
}

/// Shared state the admin API reads.
pub struct State {
    pub ready: AtomicBool,
    pub registry: Registry,
    pub redirect: Arc<Redirect>,
    pub workloads: ArcSwap<Vec<WorkloadStatus>>,
    pub config: ArcSwap<ConfigDump>,
    /// Endpoints ejected by outlier detection and client circuit breakers now
    /// (`/status/resilience`).
    pub resilience: Box<dyn Fn() -> serde_json::Value + Send + Sync>,
}

/// Binds the admin address now (so a conflict is a start-up error) and serves it until
/// `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    state: Arc<State>,
    shutdown: CancellationToken,
) -> Result<SocketAddr, Error> {
    let listener = bind(addr).map_err(|source| Error::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| Error::Bind { addr, source })?;
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(_) => continue,
                },
            };
            let state = state.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(answer(&request, &state)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(local)
}

/// SO_REUSEPORT: during an upgrade the old and the new agent both hold the admin port for
/// a moment (the old one stops serving once it has handed its listeners over).
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(128)?;
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}

fn answer<B>(request: &Request<B>, state: &State) -> Response<Full<Bytes>> {
    match request.uri().path() {
        "/ready" => {
            if state.ready.load(Ordering::Acquire) {
                // The pid tells an operator (and the tests) which agent answered while two
                // share the port during an upgrade.
                text(
                    StatusCode::OK,
                    format!("ready (pid {})\n", std::process::id()),
                )
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: mesh, programs or listeners not set up yet\n".to_string(),
                )
            }
        }
        "/metrics" => {
            let openmetrics = request
                .headers()
                .get(hyper::header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("application/openmetrics-text"));
            let mut body = String::new();
            // Prometheus asks for OpenMetrics first when it can parse it; anything else
            // (curl, older scrapers, the CloudWatch agent) gets the 0.0.4 text format.
            let encoded = if openmetrics {
                prometheus_client::encoding::text::encode(&mut body, &state.registry)
            } else {
                prometheus_client::encoding::prometheus_text::encode(&mut body, &state.registry)
            };
            if encoded.is_err() {
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "BUG: metrics encoding failed\n".into(),
                );
            }
            let content_type = if openmetrics {
                "application/openmetrics-text; version=1.0.0; charset=utf-8"
            } else {
                "text/plain; version=0.0.4; charset=utf-8"
            };
            Response::builder()
                .header(hyper::header::CONTENT_TYPE, content_type)
                .body(Full::new(Bytes::from(body)))
                .expect("static response parts are valid")
        }
        "/stats" => match state.redirect.counters() {
            Ok(counters) => {
                let redirect: serde_json::Map<String, serde_json::Value> = counters
                    .by_reason()
                    .into_iter()
                    .map(|(reason, value)| (reason.to_string(), value.into()))
                    .collect();
                json(&serde_json::json!({ "redirect": redirect }))
            }
            Err(error) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")),
        },
        "/workloads" => json(&**state.workloads.load()),
        "/config_dump" => json(&**state.config.load()),
        "/ui" => Response::builder()
            .header(hyper::header::CONTENT_TYPE, "text/html; charset=utf-8")
            .body(Full::new(Bytes::from_static(ui::PAGE.as_bytes())))
            .expect("static response parts are valid"),
        "/ui/graph.json" => json(&ui::graph_json(state)),
        "/status/resilience" => json(&(state.resilience)()),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /ready /metrics /stats /workloads /config_dump /status/resilience /ui\n"
                .into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

fn json(value: &impl Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => Response::builder()
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts are valid"),
        Err(error) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("BUG: JSON encoding failed: {error}\n"),
        ),
    }
}
