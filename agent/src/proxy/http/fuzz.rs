//! Property tests over the whole request path: bytes from a client go through a real hyper
//! server, the proxy's routing and forwarding, to a real upstream on 127.0.0.1, without eBPF.
//! The properties: nothing panics; the client gets a well-formed response (or a closed
//! connection for bytes that are not HTTP); the proxy itself never answers 5xx to a healthy
//! upstream; a forwarded path is normalised (no `//`, `.` or `..` segments). Mesh files with
//! durations at and past their bounds go through decode, compile and a request as well.
//!
//! The same harness checks how one client connection drains (`mod drain`): HTTP/1.1 answers
//! the next request with `Connection: close`, an idle connection is closed only at the drain
//! timeout, HTTP/2 gets GOAWAY; how its upstream connections are kept (`mod upstreams`); and
//! how its HTTP/2 streams run (`mod http2`).
//!
//! `cargo test -p strait fuzz` runs a few hundred cases; set `PROPTEST_CASES` for a long run
//! (docs/http.md says how the pre-release run is done).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

use super::{BoxFuture, Env, Http, serve};
use crate::mesh::ResourceId;
use crate::proxy::outbound::Source;
use crate::proxy::upstream;
use crate::routing::Table;
use crate::state::State;

const SERVICE: &str = "10.96.0.1:80";

struct TestEnv {
    table: Arc<Table>,
    http: Http,
}

impl Env for TestEnv {
    fn snapshot(&self) -> Arc<State> {
        Arc::new(State {
            table: self.table.clone(),
            ..State::default()
        })
    }

    fn http(&self) -> &Http {
        &self.http
    }

    fn authorize(
        &self,
        _snapshot: &State,
        _source: &Source,
        _service: &ResourceId,
        _target_node: &ResourceId,
    ) -> Result<(), String> {
        Ok(())
    }

    fn dial<'a>(
        &'a self,
        _snapshot: &'a State,
        _source: &'a Source,
        _service: &'a ResourceId,
        _target_node: &'a ResourceId,
        endpoint: SocketAddr,
    ) -> BoxFuture<'a, std::io::Result<upstream::Stream>> {
        Box::pin(async move {
            let stream = upstream::connect(endpoint).await?;
            Ok(upstream::Stream::new(stream))
        })
    }
}

fn mesh(port: u16) -> String {
    format!(
        r#"apiVersion: appmesh.k8s.aws/v1beta2
kind: Mesh
metadata: {{name: fuzz}}
spec: {{}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: up, namespace: app}}
spec:
  listeners: [{{portMapping: {{port: {port}, protocol: http}}}}]
  serviceDiscovery: {{static: {{addresses: [127.0.0.1]}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualRouter
metadata: {{name: r, namespace: app}}
spec:
  listeners: [{{portMapping: {{port: 80, protocol: http}}}}]
  routes:
    - name: headers
      priority: 1
      httpRoute:
        match:
          prefix: /h
          headers:
            - {{name: x-a, match: {{regex: "[a-z]+"}}}}
            - {{name: x-n, match: {{range: {{start: 0, end: 100}}}}, invert: true}}
        action: {{weightedTargets: [{{virtualNodeRef: {{name: up}}, weight: 1}}]}}
    - name: query
      priority: 2
      httpRoute:
        match: {{prefix: /q, queryParameters: [{{name: k, match: {{exact: v}}}}], method: GET}}
        action: {{weightedTargets: [{{virtualNodeRef: {{name: up}}, weight: 1}}]}}
    - name: regex
      priority: 3
      httpRoute:
        match: {{path: {{regex: "/r/[0-9]+"}}}}
        action: {{weightedTargets: [{{virtualNodeRef: {{name: up}}, weight: 1}}]}}
    - name: any
      priority: 4
      httpRoute:
        match: {{prefix: /a}}
        action: {{weightedTargets: [{{virtualNodeRef: {{name: up}}, weight: 1}}]}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {{name: s, namespace: app}}
spec:
  addresses: [10.96.0.1]
  provider: {{virtualRouter: {{virtualRouterRef: {{name: r}}}}}}
"#
    )
}

/// The upstream answers 200 with the path it received as the body.
async fn upstream() -> SocketAddr {
    upstream_with(UpstreamOptions::default()).await
}

/// An upstream on 127.0.0.1 that does what `options` say ([`serve_upstream`]); its address.
pub(super) async fn upstream_with(options: UpstreamOptions) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    serve_upstream(listener, options);
    addr
}

/// What a test upstream does besides answering each request 200 with its path as the body.
#[derive(Clone, Default)]
pub(super) struct UpstreamOptions {
    /// Close each connection after one response.
    pub(super) close_after_each: bool,
    /// Count the connections accepted.
    pub(super) accepted: Option<Arc<std::sync::atomic::AtomicUsize>>,
    /// Answer this path only after 300 ms.
    pub(super) slow_path: Option<&'static str>,
}

/// Serves `listener` (HTTP/1.1 or HTTP/2) as [`UpstreamOptions`] say.
pub(super) fn serve_upstream(listener: tokio::net::TcpListener, options: UpstreamOptions) {
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            if let Some(accepted) = &options.accepted {
                accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            let slow_path = options.slow_path;
            let service = hyper::service::service_fn(
                move |req: hyper::Request<hyper::body::Incoming>| async move {
                    let path = req.uri().path().to_owned();
                    if Some(path.as_str()) == slow_path {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(path))))
                },
            );
            let mut builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            builder.http1().keep_alive(!options.close_after_each);
            tokio::spawn(async move {
                let _ = builder
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

struct Harness {
    runtime: tokio::runtime::Runtime,
    env: Arc<TestEnv>,
    source: Arc<Source>,
}

impl Harness {
    fn new() -> Harness {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let port = runtime.block_on(upstream()).port();
        UPSTREAM_PORT.get_or_init(|| port);
        let mesh = crate::mesh::parse_str(&mesh(port), std::path::Path::new("fuzz.yaml"))
            .unwrap()
            .config;
        let table = Table::compile(&mesh, &BTreeMap::new());
        assert!(table.services.contains_key(&SERVICE.parse().unwrap()));
        Harness {
            runtime,
            env: Arc::new(TestEnv {
                table: Arc::new(table),
                http: Http::default(),
            }),
            source: Arc::new(Source {
                workload: ResourceId::new("app", "client"),
                virtual_node: ResourceId::new("app", "client"),
                ips: vec!["10.244.1.2".parse().unwrap()],
            }),
        }
    }

    /// Sends `bytes` as a client would (then half-closes) and returns what came back.
    fn exchange(&self, bytes: Vec<u8>) -> Vec<u8> {
        self.exchange_with(self.env.clone(), bytes)
    }

    /// [`Harness::exchange`] through another table.
    fn exchange_with(&self, env: Arc<TestEnv>, bytes: Vec<u8>) -> Vec<u8> {
        self.runtime.block_on(async {
            let (mut client, server) = tokio::io::duplex(1 << 20);
            let shutdown = CancellationToken::new();
            let task = tokio::spawn(serve(
                server,
                SERVICE.parse().unwrap(),
                self.source.clone(),
                env,
                crate::proxy::Drain {
                    signal: shutdown.clone(),
                    timeout: Duration::from_secs(1),
                },
            ));
            client.write_all(&bytes).await.unwrap();
            client.shutdown().await.unwrap();
            let mut out = Vec::new();
            let read =
                tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut out)).await;
            shutdown.cancel();
            let joined = tokio::time::timeout(Duration::from_secs(10), task).await;
            if let Ok(Err(error)) = &joined {
                assert!(!error.is_panic(), "the proxy panicked on {bytes:?}");
            }
            assert!(
                read.is_ok(),
                "no answer within 10 s to {:?}",
                String::from_utf8_lossy(&bytes)
            );
            out
        })
    }
}

fn status_of(response: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(response.get(..12)?).ok()?;
    let rest = text
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| text.strip_prefix("HTTP/1.0 "))?;
    rest.get(..3)?.parse().ok()
}

fn body_of(response: &[u8]) -> String {
    let text = String::from_utf8_lossy(response);
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

/// The upstream's port, for meshes built per case.
static UPSTREAM_PORT: std::sync::OnceLock<u16> = std::sync::OnceLock::new();

/// A mesh whose route, retry policy and listener carry the given durations (`unit` `s` or
/// `ms`), in the shape of [`mesh`]'s `/a` route.
fn timed_mesh(port: u16, unit: &str, per_request: i64, idle: i64, per_retry: i64) -> String {
    format!(
        r#"apiVersion: appmesh.k8s.aws/v1beta2
kind: Mesh
metadata: {{name: fuzz}}
spec: {{}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: up, namespace: app}}
spec:
  listeners:
    - portMapping: {{port: {port}, protocol: http}}
      timeout: {{http: {{perRequest: {{unit: {unit}, value: {per_request}}}, idle: {{unit: {unit}, value: {idle}}}}}}}
  serviceDiscovery: {{static: {{addresses: [127.0.0.1]}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualRouter
metadata: {{name: r, namespace: app}}
spec:
  listeners: [{{portMapping: {{port: 80, protocol: http}}}}]
  routes:
    - name: any
      httpRoute:
        match: {{prefix: /}}
        action: {{weightedTargets: [{{virtualNodeRef: {{name: up}}, weight: 1}}]}}
        timeout: {{perRequest: {{unit: {unit}, value: {per_request}}}, idle: {{unit: {unit}, value: {idle}}}}}
        retryPolicy:
          maxRetries: 1
          perRetryTimeout: {{unit: {unit}, value: {per_retry}}}
          httpRetryEvents: [server-error]
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {{name: s, namespace: app}}
spec:
  addresses: [10.96.0.1]
  provider: {{virtualRouter: {{virtualRouterRef: {{name: r}}}}}}
"#
    )
}

/// Durations around the edges: small, at and past the bound, the integer limits.
fn duration_value() -> impl Strategy<Value = i64> {
    let max = crate::mesh::MAX_DURATION_SECONDS;
    prop_oneof![
        0i64..=3,
        100i64..=20_000,
        Just(max),
        Just(max + 1),
        Just(max * 1000),
        Just(max * 1000 + 1),
        Just(i64::MAX),
        Just(i64::MAX / 1000),
        Just(u64::MAX as i64),
        any::<i64>(),
    ]
}

fn harness() -> &'static Harness {
    static HARNESS: std::sync::OnceLock<Harness> = std::sync::OnceLock::new();
    HARNESS.get_or_init(Harness::new)
}

fn method() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "GET", "POST", "PUT", "HEAD", "DELETE", "OPTIONS", "PATCH", "BREW", "CONNECT",
    ])
}

fn path() -> impl Strategy<Value = String> {
    let segment = prop_oneof![
        Just(".".to_owned()),
        Just("..".to_owned()),
        Just(String::new()),
        Just("%2e%2E".to_owned()),
        Just("%2F".to_owned()),
        Just("%zz".to_owned()),
        "[a-z0-9]{1,4}",
        "[a-zA-Z0-9%._~!$&'()*+,;=:@-]{0,6}",
    ];
    (
        prop::sample::select(vec!["/h", "/q", "/r", "/a", "/x", ""]),
        prop::collection::vec(segment, 0..6),
        prop::option::of("[a-z=&%0-9]{0,12}"),
    )
        .prop_map(|(first, segments, query)| {
            let mut p = first.to_owned();
            for s in segments {
                p.push('/');
                p.push_str(&s);
            }
            if p.is_empty() {
                p.push('/');
            }
            if let Some(q) = query {
                p.push('?');
                p.push_str(&q);
            }
            p
        })
}

fn headers() -> impl Strategy<Value = Vec<(String, String)>> {
    let name = prop_oneof![
        Just("x-a".to_owned()),
        Just("x-n".to_owned()),
        Just("connection".to_owned()),
        Just("te".to_owned()),
        Just("upgrade".to_owned()),
        Just("content-length".to_owned()),
        Just("transfer-encoding".to_owned()),
        Just("x-forwarded-for".to_owned()),
        Just("host".to_owned()),
        "[a-z-]{1,10}",
    ];
    prop::collection::vec((name, "[ -~]{0,16}"), 0..6)
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    /// Well-formed-ish requests: an answer always comes, 5xx never (the upstream is healthy),
    /// and what reaches the upstream has a normalised path.
    #[test]
    fn structured_requests(method in method(), path in path(), headers in headers(), body in prop::option::of("[a-z]{0,64}")) {
        let mut request = format!("{method} {path} HTTP/1.1\r\nhost: color\r\n");
        for (name, value) in &headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        match &body {
            Some(body) if !headers.iter().any(|(n, _)| n == "content-length" || n == "transfer-encoding") => {
                request.push_str(&format!("content-length: {}\r\n\r\n{body}", body.len()));
            }
            _ => request.push_str("\r\n"),
        }
        let response = harness().exchange(request.into_bytes());
        prop_assert!(status_of(&response).is_some(), "no HTTP answer: {:?}", String::from_utf8_lossy(&response));
        if let Some(status) = status_of(&response) {
            prop_assert!(status < 500 || status == 501 || status == 505, "status {status}: {}", String::from_utf8_lossy(&response));
            if status == 200 && method != "HEAD" {
                let upstream_path = body_of(&response);
                let first_line = upstream_path.lines().next().unwrap_or("");
                prop_assert!(!first_line.contains("//") && !first_line.contains("/./") && !first_line.contains("/../") && !first_line.ends_with("/.") && !first_line.ends_with("/.."), "upstream saw {first_line:?}");
            }
        }
    }

    /// Arbitrary bytes, raw or after a valid request start or the HTTP/2 preface: no panic, and
    /// any answer is HTTP.
    #[test]
    fn arbitrary_bytes(prefix in prop::sample::select(vec!["", "GET /a HTTP/1.1\r\n", "POST /a HTTP/1.1\r\nhost: x\r\n", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]), bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut input = prefix.as_bytes().to_vec();
        input.extend(bytes);
        let response = harness().exchange(input);
        if !response.is_empty() && !prefix.starts_with("PRI") {
            prop_assert!(status_of(&response).is_some(), "not an HTTP answer: {:?}", String::from_utf8_lossy(&response));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    /// A mesh file's durations, decoded, compiled and used by a request: decoding either
    /// accepts the file or says where it is wrong, and a request through what it compiles to
    /// never panics and always gets an HTTP answer.
    #[test]
    fn mesh_durations_through_decode_compile_and_a_request(
        unit in prop::sample::select(vec!["s", "ms"]),
        per_request in duration_value(),
        idle in duration_value(),
        per_retry in duration_value(),
    ) {
        let h = harness();
        let port = *UPSTREAM_PORT.get().expect("the harness records the upstream");
        let text = timed_mesh(port, unit, per_request, idle, per_retry);
        let parsed = std::panic::catch_unwind(|| {
            crate::mesh::parse_str(&text, std::path::Path::new("fuzz.yaml"))
        });
        prop_assert!(parsed.is_ok(), "decoding panicked on:\n{text}");
        let config = match parsed.unwrap() {
            Ok(parsed) => parsed.config,
            Err(crate::mesh::Error::Invalid { diagnostics }) => {
                prop_assert!(
                    diagnostics.iter().all(|d| d.line > 0 && !d.path.is_empty()),
                    "an error without a location: {diagnostics:?}"
                );
                let max = crate::mesh::MAX_DURATION_SECONDS * if unit == "ms" { 1000 } else { 1 };
                prop_assert!(
                    [per_request, idle, per_retry].iter().any(|v| *v < 0 || *v > max),
                    "a file with durations in range was refused: {diagnostics:?}"
                );
                return Ok(());
            }
            Err(e) => return Err(TestCaseError::fail(format!("unexpected error {e}"))),
        };
        let table = std::panic::catch_unwind(|| Table::compile(&config, &BTreeMap::new()));
        prop_assert!(table.is_ok(), "compiling panicked on:\n{text}");
        let env = Arc::new(TestEnv {
            table: Arc::new(table.unwrap()),
            http: Http::default(),
        });
        let response = h.exchange_with(
            env,
            b"GET /a HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".to_vec(),
        );
        prop_assert!(status_of(&response).is_some(), "no HTTP answer: {:?}", String::from_utf8_lossy(&response));
    }
}

#[test]
fn routes_and_errors_through_the_whole_path() {
    let h = harness();
    let ok =
        h.exchange(b"GET /a/b/../c//d HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".to_vec());
    assert_eq!(
        status_of(&ok),
        Some(200),
        "{}",
        String::from_utf8_lossy(&ok)
    );
    assert_eq!(body_of(&ok), "/a/c/d");
    let none = h.exchange(b"GET /nope HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".to_vec());
    assert_eq!(status_of(&none), Some(404));
    let bad = h.exchange(b"GET /a%zz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".to_vec());
    assert_eq!(status_of(&bad), Some(400));
    let garbage = h.exchange(b"GET /a HTTP/1.1\r\nno colon here\r\n\r\n".to_vec());
    assert_eq!(
        status_of(&garbage),
        Some(400),
        "{}",
        String::from_utf8_lossy(&garbage)
    );
}

/// The drain of one client connection (`serve` with a [`crate::proxy::Drain`]): a hyper client
/// on the other end of an in-memory pipe.
mod drain {
    use super::*;
    use crate::proxy::Drain;
    use http_body_util::Empty;

    fn start(
        h: &'static Harness,
        timeout: Duration,
    ) -> (
        tokio::io::DuplexStream,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let (client, server) = tokio::io::duplex(1 << 20);
        let signal = CancellationToken::new();
        let task = tokio::spawn(serve(
            server,
            SERVICE.parse().unwrap(),
            h.source.clone(),
            h.env.clone(),
            Drain {
                signal: signal.clone(),
                timeout,
            },
        ));
        (client, signal, task)
    }

    fn get(version: http::Version) -> hyper::Request<Empty<Bytes>> {
        let uri = match version {
            http::Version::HTTP_2 => "http://color/a",
            _ => "/a",
        };
        hyper::Request::get(uri)
            .header("host", "color")
            .version(version)
            .body(Empty::new())
            .unwrap()
    }

    #[test]
    fn an_idle_http1_connection_answers_its_next_request_with_close_then_closes() {
        let h = harness();
        h.runtime.block_on(async {
            let (client, signal, task) = start(h, Duration::from_secs(10));
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(client))
                    .await
                    .unwrap();
            let connection = tokio::spawn(connection);
            let first = sender
                .send_request(get(http::Version::HTTP_11))
                .await
                .unwrap();
            assert_eq!(first.status(), 200);
            assert!(first.headers().get("connection").is_none());
            drop(first);
            // The drain begins while the connection is idle; it stays open.
            signal.cancel();
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert!(
                !task.is_finished(),
                "an idle connection is not closed at once"
            );
            sender.ready().await.unwrap();
            let second = sender
                .send_request(get(http::Version::HTTP_11))
                .await
                .unwrap();
            assert_eq!(second.status(), 200);
            assert_eq!(second.headers()["connection"], "close");
            drop(second);
            // And the connection closes right after that answer, long before the timeout.
            tokio::time::timeout(Duration::from_secs(2), task)
                .await
                .expect("the connection closed after its answer")
                .unwrap();
            let _ = tokio::time::timeout(Duration::from_secs(2), connection).await;
        });
    }

    #[test]
    fn an_http1_connection_that_stays_idle_is_closed_at_the_drain_timeout() {
        let h = harness();
        h.runtime.block_on(async {
            let (client, signal, task) = start(h, Duration::from_millis(400));
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(client))
                    .await
                    .unwrap();
            let connection = tokio::spawn(connection);
            let first = sender
                .send_request(get(http::Version::HTTP_11))
                .await
                .unwrap();
            assert_eq!(first.status(), 200);
            drop(first);
            let began = std::time::Instant::now();
            signal.cancel();
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("closed at the drain timeout")
                .unwrap();
            let took = began.elapsed();
            assert!(
                took >= Duration::from_millis(350),
                "closed after {took:?}, before the drain timeout"
            );
            let _ = tokio::time::timeout(Duration::from_secs(2), connection).await;
        });
    }

    #[test]
    fn a_draining_http2_connection_gets_goaway_and_closes_when_its_streams_are_done() {
        let h = harness();
        h.runtime.block_on(async {
            let (client, signal, task) = start(h, Duration::from_secs(10));
            let (mut sender, connection) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                hyper_util::rt::TokioIo::new(client),
            )
            .await
            .unwrap();
            let connection = tokio::spawn(connection);
            let first = sender
                .send_request(get(http::Version::HTTP_2))
                .await
                .unwrap();
            assert_eq!(first.status(), 200);
            drop(first);
            signal.cancel();
            // GOAWAY ends the client's connection without an error, and the server's with it.
            let ended = tokio::time::timeout(Duration::from_secs(2), connection)
                .await
                .expect("the client's connection ended after GOAWAY")
                .unwrap();
            assert!(ended.is_ok(), "a graceful GOAWAY: {ended:?}");
            assert!(sender.is_closed());
            tokio::time::timeout(Duration::from_secs(2), task)
                .await
                .expect("the server's connection ended")
                .unwrap();
        });
    }
}

/// The upstream connections of one HTTP/1.1 client connection (`pool::Local`): reused by its
/// requests, handed to the shared pool when it closes, and never a lost request when the
/// upstream closes them.
mod upstreams {
    use super::*;
    use crate::proxy::Drain;
    use http_body_util::{BodyExt as _, Empty};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An upstream on 127.0.0.1 that counts the connections it accepted; with `keep_alive`
    /// false it closes each after one response.
    async fn counting_upstream(keep_alive: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        serve_counted(listener, keep_alive, accepted.clone());
        (addr, accepted)
    }

    fn serve_counted(
        listener: tokio::net::TcpListener,
        keep_alive: bool,
        counter: Arc<AtomicUsize>,
    ) {
        serve_upstream(
            listener,
            UpstreamOptions {
                close_after_each: !keep_alive,
                accepted: Some(counter),
                ..UpstreamOptions::default()
            },
        );
    }

    /// An env of its own (an empty shared pool) whose mesh sends to `upstream`.
    pub(super) fn env_for(upstream: SocketAddr) -> Arc<TestEnv> {
        env_with_mesh(&mesh(upstream.port()))
    }

    fn env_with_mesh(mesh: &str) -> Arc<TestEnv> {
        let mesh = crate::mesh::parse_str(mesh, std::path::Path::new("upstreams.yaml"))
            .unwrap()
            .config;
        Arc::new(TestEnv {
            table: Arc::new(Table::compile(&mesh, &BTreeMap::new())),
            http: Http::default(),
        })
    }

    /// Serves one client connection with `env` and sends `requests` GETs on it, one after the
    /// other, waiting `pause` before each; returns the bodies and waits for the connection's
    /// task to end after the client closes.
    async fn client_connection(
        h: &Harness,
        env: &Arc<TestEnv>,
        requests: usize,
        pause: Duration,
    ) -> Vec<String> {
        client_connection_polled(h, env, requests, pause).await.0
    }

    /// [`client_connection`], and how many times the client connection's task was polled.
    async fn client_connection_polled(
        h: &Harness,
        env: &Arc<TestEnv>,
        requests: usize,
        pause: Duration,
    ) -> (Vec<String>, usize) {
        let (client, server) = tokio::io::duplex(1 << 20);
        let polls = Arc::new(AtomicUsize::new(0));
        let mut serving = Box::pin(serve(
            server,
            SERVICE.parse().unwrap(),
            h.source.clone(),
            env.clone(),
            Drain {
                signal: CancellationToken::new(),
                timeout: Duration::from_secs(10),
            },
        ));
        let counter = polls.clone();
        let task = tokio::spawn(std::future::poll_fn(move |cx| {
            counter.fetch_add(1, Ordering::SeqCst);
            serving.as_mut().poll(cx)
        }));
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(client))
                .await
                .unwrap();
        let connection = tokio::spawn(connection);
        let mut bodies = Vec::new();
        for i in 0..requests {
            tokio::time::sleep(pause).await;
            sender.ready().await.unwrap();
            let request = hyper::Request::get(format!("/a/{i}"))
                .header("host", "color")
                .body(Empty::<Bytes>::new())
                .unwrap();
            let response = sender.send_request(request).await.unwrap();
            assert_eq!(response.status(), 200, "request {i}");
            let body = response.into_body().collect().await.unwrap().to_bytes();
            bodies.push(String::from_utf8_lossy(&body).into_owned());
        }
        drop(sender);
        let _ = tokio::time::timeout(Duration::from_secs(5), connection).await;
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the client connection's task ended after the client closed")
            .unwrap();
        (bodies, polls.load(Ordering::SeqCst))
    }

    /// A request costs its client connection's task two polls: one when it arrives and one
    /// when its answer does. Its hand-over to the upstream connection the task drives, and
    /// the answer's back to it, wake no more polls (`proxy::parts`).
    #[test]
    fn a_request_wakes_its_client_connections_task_for_its_arrival_and_its_answer_only() {
        let h = harness();
        h.runtime.block_on(async {
            let (upstream, _) = counting_upstream(true).await;
            let env = env_for(upstream);
            // The difference between two connections takes out the connection's start and end.
            let (_, few) = client_connection_polled(h, &env, 2, Duration::ZERO).await;
            let (bodies, many) = client_connection_polled(h, &env, 42, Duration::ZERO).await;
            assert_eq!(bodies.len(), 42);
            let per_request = many.saturating_sub(few) as f64 / 40.0;
            assert!(
                per_request <= 2.25,
                "the client connection's task was polled {per_request:.2} times per request \
                 ({few} for 2 requests, {many} for 42)"
            );
        });
    }

    #[test]
    fn a_client_connection_reuses_its_upstream_connection_and_the_next_one_inherits_it() {
        let h = harness();
        h.runtime.block_on(async {
            let (upstream, accepted) = counting_upstream(true).await;
            let env = env_for(upstream);
            let first = client_connection(h, &env, 5, Duration::ZERO).await;
            assert_eq!(first, ["/a/0", "/a/1", "/a/2", "/a/3", "/a/4"]);
            assert_eq!(
                accepted.load(Ordering::SeqCst),
                1,
                "one client connection's requests share one upstream connection"
            );
            // The closed client connection handed its upstream connection to the shared pool.
            let second = client_connection(h, &env, 3, Duration::ZERO).await;
            assert_eq!(second, ["/a/0", "/a/1", "/a/2"]);
            assert_eq!(
                accepted.load(Ordering::SeqCst),
                1,
                "the next client connection reused the handed-over upstream connection"
            );
        });
    }

    #[test]
    fn an_upstream_that_closes_after_each_response_loses_no_request() {
        let h = harness();
        h.runtime.block_on(async {
            let (upstream, accepted) = counting_upstream(false).await;
            let env = env_for(upstream);
            // Back to back, and with pauses in which the closed connection's end is seen.
            let quick = client_connection(h, &env, 20, Duration::ZERO).await;
            assert_eq!(quick.len(), 20);
            let paused = client_connection(h, &env, 5, Duration::from_millis(50)).await;
            assert_eq!(paused.len(), 5);
            assert_eq!(
                accepted.load(Ordering::SeqCst),
                25,
                "a connection the upstream closed is never used again"
            );
        });
    }

    #[test]
    fn a_client_connection_calling_three_endpoints_reuses_one_upstream_connection_each() {
        let h = harness();
        h.runtime.block_on(async {
            // Three upstreams on one port of three loopback addresses.
            let first = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = first.local_addr().unwrap().port();
            let accepted: Vec<Arc<AtomicUsize>> = (0..3).map(|_| Arc::default()).collect();
            serve_counted(first, true, accepted[0].clone());
            for (ip, counter) in ["127.0.0.2", "127.0.0.3"].into_iter().zip(&accepted[1..]) {
                let listener = tokio::net::TcpListener::bind((ip, port)).await.unwrap();
                serve_counted(listener, true, counter.clone());
            }
            let env = env_with_mesh(&mesh(port).replace(
                "addresses: [127.0.0.1]",
                "addresses: [127.0.0.1, 127.0.0.2, 127.0.0.3]",
            ));
            // The client connection keeps two idle connections and passes the third to the
            // shared pool, where its next request to that endpoint finds it.
            let bodies = client_connection(h, &env, 60, Duration::ZERO).await;
            assert_eq!(bodies.len(), 60);
            // 60 requests over three endpoints miss one with a chance under 1e-9.
            let accepted: Vec<usize> = accepted.iter().map(|a| a.load(Ordering::SeqCst)).collect();
            assert_eq!(
                accepted,
                [1, 1, 1],
                "one upstream connection per endpoint, none dropped and dialled again"
            );
        });
    }
}

/// An HTTP/2 client connection's streams, run on the connection's own task (`streams`): many
/// at once are all answered, and one in flight when the drain begins is answered before the
/// connection closes.
mod http2 {
    use super::*;
    use crate::proxy::Drain;
    use http_body_util::{BodyExt as _, Empty};

    /// An upstream on 127.0.0.1 that answers with the path it received, after 300 ms for
    /// `/a/slow` and at once otherwise.
    async fn slow_upstream() -> SocketAddr {
        upstream_with(UpstreamOptions {
            slow_path: Some("/a/slow"),
            ..UpstreamOptions::default()
        })
        .await
    }

    async fn get(
        mut sender: hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
        path: String,
    ) -> String {
        let request = hyper::Request::get(format!("http://color{path}"))
            .version(http::Version::HTTP_2)
            .body(Empty::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8_lossy(&body).into_owned()
    }

    #[test]
    fn concurrent_streams_are_answered_and_one_in_flight_outlives_the_drain() {
        let h = harness();
        h.runtime.block_on(async {
            let env = super::upstreams::env_for(slow_upstream().await);
            let (client, server) = tokio::io::duplex(1 << 20);
            let signal = CancellationToken::new();
            let task = tokio::spawn(serve(
                server,
                SERVICE.parse().unwrap(),
                h.source.clone(),
                env,
                Drain {
                    signal: signal.clone(),
                    timeout: Duration::from_secs(10),
                },
            ));
            let (sender, connection) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                hyper_util::rt::TokioIo::new(client),
            )
            .await
            .unwrap();
            let connection = tokio::spawn(connection);
            let at_once: Vec<_> = (0..50)
                .map(|i| tokio::spawn(get(sender.clone(), format!("/a/{i}"))))
                .collect();
            for (i, answer) in at_once.into_iter().enumerate() {
                let body = tokio::time::timeout(Duration::from_secs(5), answer)
                    .await
                    .expect("every stream is answered")
                    .unwrap();
                assert_eq!(body, format!("/a/{i}"));
            }
            let slow = tokio::spawn(get(sender.clone(), "/a/slow".to_owned()));
            tokio::time::sleep(Duration::from_millis(100)).await;
            signal.cancel();
            let body = tokio::time::timeout(Duration::from_secs(5), slow)
                .await
                .expect("the stream in flight is answered during the drain")
                .unwrap();
            assert_eq!(body, "/a/slow");
            drop(sender);
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("the connection's task ends once its streams are done")
                .unwrap();
            let _ = tokio::time::timeout(Duration::from_secs(2), connection).await;
        });
    }
}
