//! A VirtualGateway listener's `healthCheck`, answered by the agent for the load balancer in
//! front of the gateway pods.
//!
//! App Mesh's gateway was an Envoy in the pod; a load balancer checked that Envoy. Here the
//! agent serves the gateway's listeners, so it answers the checks while it does, in the pod's
//! network namespace, where the load balancer looks:
//!
//! - a check's port is its `port`, or the listener's own port when absent. On a port that is a
//!   listener of the gateway, the listener answers the check before routing (and before the
//!   rate limit: a busy gateway is not an unhealthy one), over the listener's `tls` if it has
//!   one. Any other port is a health port: the agent binds it in the pod beside the listeners
//!   and answers the checks there in plaintext (HTTP/1.1 and HTTP/2 prior knowledge, so gRPC
//!   too); it answers nothing else (404, gRPC UNIMPLEMENTED).
//! - `http`, `http2`: `GET` or `HEAD` of `path` (default `/`) gets 200 `healthy`.
//! - `grpc`: the gRPC Health Checking Protocol's `grpc.health.v1.Health/Check` gets `SERVING`
//!   for the empty service name (the server as a whole, what load balancers and Kubernetes
//!   probes ask by default); any other name gets `NOT_FOUND`, as the protocol says of a service
//!   the server does not know (the services behind the gateway are checked in the mesh, not
//!   through it). `Watch` is not answered.
//! - `tcp` is no gateway check in App Mesh (validation refuses it, as App Mesh did); a load
//!   balancer's own TCP check of a listener or health port sees it accept while it is served.
//!
//! Several checks on one port are all answered there (the union of their paths). Checks are
//! answered while the agent serves the gateway pod: a pod whose listeners cannot be opened, or
//! that is no longer a gateway's, has none (its ports refuse), so the load balancer takes it
//! out.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf as _, Bytes};
use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;

use crate::mesh::{MeshConfig, Protocol, ResourceId, VirtualGateway};
use crate::proxy::Drain;
use crate::proxy::http::body::ResponseBody;
use crate::state::Published;

/// The gRPC Health Checking Protocol's method.
pub const GRPC_CHECK: &str = "/grpc.health.v1.Health/Check";
/// A HealthCheckRequest is a service name; more than this is not a health check.
const MAX_GRPC_REQUEST: usize = 4096;
/// How long a client may take to send its HealthCheckRequest.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What the checks on one port of a gateway pod ask for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Answers {
    /// `http`/`http2` checks: the paths answered with 200.
    pub paths: BTreeSet<String>,
    /// A `grpc` check: `grpc.health.v1.Health/Check` is answered.
    pub grpc: bool,
}

/// Health answers by (gateway, port), replaced with the mesh.
pub type HealthTable = BTreeMap<(ResourceId, u16), Answers>;

/// The ports a gateway's checks are made on, with what each asks for.
pub fn answers(gateway: &VirtualGateway) -> BTreeMap<u16, Answers> {
    let mut ports: BTreeMap<u16, Answers> = BTreeMap::new();
    for listener in &gateway.spec.listeners {
        let Some(check) = &listener.health_check else {
            continue;
        };
        let port = check.port.unwrap_or(listener.port_mapping.port);
        let answers = ports.entry(port).or_default();
        match check.protocol {
            Protocol::Http | Protocol::Http2 => {
                answers
                    .paths
                    .insert(check.path.clone().unwrap_or_else(|| "/".to_owned()));
            }
            Protocol::Grpc => answers.grpc = true,
            // Not a gateway check (validation refuses it); its port still accepts.
            Protocol::Tcp => {}
        }
    }
    ports
}

/// Every gateway's answers, by (gateway, port).
pub fn table(mesh: &MeshConfig) -> HealthTable {
    mesh.virtual_gateways
        .iter()
        .flat_map(|gw| {
            answers(gw)
                .into_iter()
                .map(|(port, a)| ((gw.id.clone(), port), a))
        })
        .collect()
}

/// The health ports of a gateway: its checks' ports that are none of its listeners'.
pub fn health_ports(gateway: &VirtualGateway) -> Vec<u16> {
    let listeners: BTreeSet<u16> = gateway
        .spec
        .listeners
        .iter()
        .map(|l| l.port_mapping.port)
        .collect();
    answers(gateway)
        .into_keys()
        .filter(|port| !listeners.contains(port))
        .collect()
}

impl Answers {
    /// Is this request one of the checks (answered by [`answer`], never routed)?
    pub fn wants(&self, parts: &Parts) -> bool {
        let path = parts.uri.path();
        let http = (parts.method == Method::GET || parts.method == Method::HEAD)
            && self.paths.contains(path);
        let grpc = self.grpc && parts.method == Method::POST && path == GRPC_CHECK;
        http || grpc
    }
}

/// The answer to a check [`Answers::wants`]: 200 for HTTP, `SERVING` (or `NOT_FOUND` for a
/// named service) for gRPC.
pub async fn answer(request: Request<Incoming>) -> Response<ResponseBody> {
    if request.uri().path() != GRPC_CHECK {
        return text(StatusCode::OK, "healthy");
    }
    let body = http_body_util::Limited::new(request.into_body(), MAX_GRPC_REQUEST).collect();
    let bytes = match tokio::time::timeout(REQUEST_TIMEOUT, body).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(_)) => return grpc_status(13, "cannot read the HealthCheckRequest"),
        Err(_) => return grpc_status(4, "no HealthCheckRequest in time"),
    };
    match check_service(&bytes) {
        Ok(service) if service.is_empty() => serving(),
        Ok(service) => grpc_status(
            5,
            &format!(
                "unknown service {service:?}: the gateway reports its own health (service \"\")"
            ),
        ),
        Err(error) => grpc_status(13, &format!("malformed HealthCheckRequest: {error}")),
    }
}

/// The `service` of a gRPC-framed HealthCheckRequest (`string service = 1`); no message at
/// all is the empty name.
fn check_service(framed: &[u8]) -> Result<String, &'static str> {
    if framed.is_empty() {
        return Ok(String::new());
    }
    let mut buf = framed;
    if buf.len() < 5 {
        return Err("short gRPC frame");
    }
    if buf.get_u8() != 0 {
        return Err("compressed message");
    }
    let len = buf.get_u32() as usize;
    if buf.len() != len {
        return Err("gRPC frame length");
    }
    let mut service = String::new();
    while buf.has_remaining() {
        let tag = varint(&mut buf)?;
        match (tag >> 3, tag & 7) {
            (1, 2) => {
                let n = usize::try_from(varint(&mut buf)?).map_err(|_| "length")?;
                if buf.len() < n {
                    return Err("truncated field");
                }
                service = std::str::from_utf8(&buf[..n])
                    .map_err(|_| "service is not UTF-8")?
                    .to_owned();
                buf.advance(n);
            }
            // Unknown fields are skipped, as protobuf readers do.
            (_, 0) => {
                varint(&mut buf)?;
            }
            (_, 1) if buf.len() >= 8 => buf.advance(8),
            (_, 2) => {
                let n = usize::try_from(varint(&mut buf)?).map_err(|_| "length")?;
                if buf.len() < n {
                    return Err("truncated field");
                }
                buf.advance(n);
            }
            (_, 5) if buf.len() >= 4 => buf.advance(4),
            _ => return Err("unknown wire type"),
        }
    }
    Ok(service)
}

fn varint(buf: &mut &[u8]) -> Result<u64, &'static str> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        if !buf.has_remaining() {
            return Err("truncated varint");
        }
        let byte = buf.get_u8();
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("varint too long")
}

/// HealthCheckResponse{status: SERVING}, gRPC-framed, then `grpc-status: 0`.
fn serving() -> Response<ResponseBody> {
    // Uncompressed, 2 bytes: field 1 (varint) = 1 (SERVING).
    let message = Bytes::from_static(&[0, 0, 0, 0, 2, 0x08, 0x01]);
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let mut response = Response::new(ResponseBody::local_with_trailers(message, trailers));
    grpc_headers(response.headers_mut());
    response
}

/// A trailers-only gRPC reply with this status.
fn grpc_status(code: u32, message: &str) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::local(Bytes::new()));
    let headers = response.headers_mut();
    grpc_headers(headers);
    headers.insert("grpc-status", HeaderValue::from(code));
    // Printable ASCII needs no percent-encoding; anything else is left out.
    let printable: String = message
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .filter(|c| *c != '%')
        .collect();
    if let Ok(value) = HeaderValue::from_str(&printable) {
        headers.insert("grpc-message", value);
    }
    response
}

fn grpc_headers(headers: &mut HeaderMap) {
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(header::SERVER, HeaderValue::from_static("strait"));
}

fn text(status: StatusCode, message: &str) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::local(Bytes::from(format!("{message}\n"))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::SERVER, HeaderValue::from_static("strait"));
    response
}

/// Serves one connection to a health port: its checks, nothing else. The answers are read
/// from the published state per request, so a mesh reload that changes a path applies at
/// once.
pub async fn serve_port(
    stream: TcpStream,
    gateway: ResourceId,
    port: u16,
    state: Arc<Published>,
    drain: Drain,
) {
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |request: Request<Incoming>| {
        let answers = state
            .snapshot()
            .gateways
            .health
            .get(&(gateway.clone(), port))
            .cloned()
            .unwrap_or_default();
        async move {
            let (parts, body) = request.into_parts();
            let response = if answers.wants(&parts) {
                answer(Request::from_parts(parts, body)).await
            } else if parts
                .headers
                .get(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
            {
                grpc_status(12, "this port answers only the gateway's health checks")
            } else {
                text(
                    StatusCode::NOT_FOUND,
                    "this port answers only the gateway's health checks",
                )
            };
            Ok::<_, Infallible>(response)
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).half_close(true);
    builder.http2().timer(TokioTimer::new());
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        () = drain.signal.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(drain.timeout, connection).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(message: &[u8]) -> Vec<u8> {
        let mut framed = vec![0];
        framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
        framed.extend_from_slice(message);
        framed
    }

    #[test]
    fn the_service_name_is_read_from_a_health_check_request() {
        assert_eq!(check_service(&frame(b"")).unwrap(), "");
        assert_eq!(check_service(&[]).unwrap(), "");
        assert_eq!(
            check_service(&frame(b"\x0a\x0bcolor.Color")).unwrap(),
            "color.Color"
        );
        // An unknown varint field before the name is skipped.
        assert_eq!(check_service(&frame(b"\x10\x05\x0a\x01x")).unwrap(), "x");
        assert!(check_service(&frame(b"\x0a\x05ab")).is_err());
        assert!(check_service(&[1, 0, 0, 0, 0]).is_err());
        assert!(check_service(&[0, 0, 0, 0, 9, 1]).is_err());
    }

    #[test]
    fn checks_on_a_port_are_answered_together_and_nothing_else() {
        let answers = Answers {
            paths: BTreeSet::from(["/ready".to_owned()]),
            grpc: true,
        };
        let parts = |method: Method, path: &str| {
            Request::builder()
                .method(method)
                .uri(path)
                .body(())
                .unwrap()
                .into_parts()
                .0
        };
        assert!(answers.wants(&parts(Method::GET, "/ready")));
        assert!(answers.wants(&parts(Method::HEAD, "/ready")));
        assert!(!answers.wants(&parts(Method::POST, "/ready")));
        assert!(!answers.wants(&parts(Method::GET, "/ready/more")));
        assert!(answers.wants(&parts(Method::POST, GRPC_CHECK)));
        assert!(!Answers::default().wants(&parts(Method::POST, GRPC_CHECK)));
    }
}
