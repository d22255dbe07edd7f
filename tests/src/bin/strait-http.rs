//! `strait-http`: a real HTTP server and clients for strait's HTTP tests and the demo.
//!
//! - `strait-http serve --listen ADDR[,ADDR...] --name NAME`: HTTP/1.1 and HTTP/2 (prior
//!   knowledge) on every address. Every response carries `x-server: NAME`. Paths:
//!   `/health` answers 200; `/echo...` streams the request body back as it arrives (nothing is
//!   buffered); `/ws...` with a WebSocket upgrade echoes WebSocket messages; anything else
//!   answers a JSON description of the request as the server saw it (name, method, path,
//!   version, headers). Query parameters change any answer: `delay_ms=N` waits first,
//!   `fail=P` answers 503 with probability P percent, `fail_on=NAME[,NAME...]` answers 500 from
//!   the servers named.
//! - `strait-http load URL --count N [--concurrency C] [--http2] [-H 'name: value']`: N GETs
//!   over C keep-alive connections (HTTP/1.1: one request at a time per connection; HTTP/2:
//!   one connection, C streams), then one JSON report: counts by status and by `x-server`,
//!   connections opened, latencies, errors. `--rate R` paces each worker to R requests per
//!   second; `--duration-ms D` runs for D ms instead of N requests, and `--stop-file F` ends
//!   the run early once F exists. `failed` counts every request that got no 2xx answer: a
//!   transport error or another status. Nothing is retried: an HTTP/1.1 request given to a
//!   connection that then fails is a failure. A new connection is opened only for a request
//!   not yet sent (the previous one was closed by the server), and, HTTP/2, a request the
//!   server's GOAWAY proves it never processed is sent again on a new connection, as HTTP/2
//!   clients do (counted as `resent_unsent`).
//! - `strait-http stream URL --bytes N`: POSTs N pseudo-random bytes generated on the fly,
//!   reads the echo, and reports bytes and SHA-256 of both directions.
//! - `strait-http ws URL --messages N`: a WebSocket client (RFC 6455) sending N messages and
//!   checking each echo.
//!
//! - `strait-http collect --listen ADDR --out FILE`: an OTLP/HTTP receiver for the telemetry
//!   tests: every POST body (OTLP JSON) is appended to FILE as one line
//!   `{"path": ..., "content_type": ..., "body": ...}` and answered 200 `{}`.
//!
//! Every client is bounded by `--timeout` and prints exactly one JSON line.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, anyhow, bail};
use base64::Engine as _;
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::{Value, json};
use sha1::Sha1;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
const MAX_ERRORS: usize = 20;
const CHUNK: usize = 64 * 1024;

#[derive(Parser)]
#[command(
    name = "strait-http",
    about = "HTTP test server and clients for strait"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Serve(ServeArgs),
    Load(LoadArgs),
    Stream(StreamArgs),
    Ws(WsArgs),
    Collect(CollectArgs),
}

#[derive(Args)]
struct CollectArgs {
    #[arg(long)]
    listen: SocketAddr,
    #[arg(long)]
    out: std::path::PathBuf,
}

#[derive(Args)]
struct ServeArgs {
    #[arg(long, value_delimiter = ',')]
    listen: Vec<SocketAddr>,
    #[arg(long)]
    name: String,
}

#[derive(Args)]
struct LoadArgs {
    url: String,
    #[arg(long, default_value_t = 1)]
    count: u32,
    #[arg(long, default_value_t = 1)]
    concurrency: u32,
    /// HTTP/2 with prior knowledge.
    #[arg(long)]
    http2: bool,
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// Seconds for the whole run.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Requests per second per worker (0: as fast as answers come).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Run for this long instead of `--count` requests.
    #[arg(long)]
    duration_ms: Option<u64>,
    /// End the run early once this file exists.
    #[arg(long)]
    stop_file: Option<std::path::PathBuf>,
}

#[derive(Args)]
struct StreamArgs {
    url: String,
    #[arg(long)]
    bytes: u64,
    #[arg(long, default_value_t = 120)]
    timeout: u64,
}

#[derive(Args)]
struct WsArgs {
    url: String,
    #[arg(long, default_value_t = 10)]
    messages: u32,
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("strait-http: cannot start a runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Cmd::Serve(args) => serve(args).await.map(|()| Value::Null),
            Cmd::Collect(args) => collect(args).await.map(|()| Value::Null),
            Cmd::Load(args) => {
                let limit = Duration::from_secs(args.timeout);
                tokio::time::timeout(limit, load(args))
                    .await
                    .map_err(|_| anyhow!("timed out after {limit:?}"))?
            }
            Cmd::Stream(args) => {
                let limit = Duration::from_secs(args.timeout);
                tokio::time::timeout(limit, stream(args))
                    .await
                    .map_err(|_| anyhow!("timed out after {limit:?}"))?
            }
            Cmd::Ws(args) => {
                let limit = Duration::from_secs(args.timeout);
                tokio::time::timeout(limit, ws(args))
                    .await
                    .map_err(|_| anyhow!("timed out after {limit:?}"))?
            }
        }
    });
    match result {
        Ok(Value::Null) => std::process::ExitCode::SUCCESS,
        Ok(report) => {
            println!("{report}");
            if report["ok"] == true {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            }
        }
        Err(error) => {
            println!("{}", json!({"ok": false, "error": format!("{error:#}")}));
            std::process::ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Server

type ServerBody = BoxBody<Bytes, hyper::Error>;

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let name: Arc<str> = args.name.into();
    let mut listeners = Vec::new();
    for addr in &args.listen {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(*addr),
            socket2::Type::STREAM,
            None,
        )?;
        if addr.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        socket.set_reuse_address(true)?;
        socket.bind(&(*addr).into())?;
        socket.listen(1024)?;
        socket.set_nonblocking(true)?;
        listeners.push(TcpListener::from_std(socket.into())?);
    }
    println!("{}", json!({"listening": args.listen, "name": &*name}));
    for listener in listeners {
        let name = name.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let name = name.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(name.clone(), req));
                    let mut builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    builder.http1().timer(TokioTimer::new());
                    let _ = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    }
    // Serve until killed.
    std::future::pending::<()>().await;
    Ok(())
}

async fn collect(args: CollectArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listen on {}", args.listen))?;
    let out = Arc::new(std::sync::Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&args.out)
            .with_context(|| format!("open {}", args.out.display()))?,
    ));
    println!(
        "{}",
        json!({"listening": [args.listen], "name": "collector"})
    );
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let out = out.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let out = out.clone();
                async move {
                    let path = req.uri().path().to_owned();
                    let content_type = req
                        .headers()
                        .get(header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    let body = req.into_body().collect().await.map(|b| b.to_bytes());
                    let body: Value = body
                        .ok()
                        .and_then(|b| serde_json::from_slice(&b).ok())
                        .unwrap_or(Value::Null);
                    let line = json!({"path": path, "content_type": content_type, "body": body});
                    if let Ok(mut file) = out.lock() {
                        use std::io::Write as _;
                        let _ = writeln!(file, "{line}");
                    }
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header(header::CONTENT_TYPE, "application/json")
                            .body(Full::new(Bytes::from_static(b"{}")))
                            .expect("static response"),
                    )
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| v.to_owned())
    })
}

/// A small random number generator (xorshift), enough to inject failures.
fn random_percent() -> u64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    let mut x = STATE.load(Ordering::Relaxed);
    if x == 0 {
        x = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
    }
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    STATE.store(x, Ordering::Relaxed);
    x % 100
}

fn full(bytes: impl Into<Bytes>) -> ServerBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

async fn handle(
    name: Arc<str>,
    req: Request<Incoming>,
) -> Result<Response<ServerBody>, Infallible> {
    let query = req.uri().query().unwrap_or("").to_owned();
    if let Some(ms) = query_param(&query, "delay_ms").and_then(|v| v.parse::<u64>().ok()) {
        tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
    }
    let mut response = if let Some(p) =
        query_param(&query, "fail").and_then(|v| v.parse::<u64>().ok())
        && random_percent() < p
    {
        let mut r = Response::new(full("injected failure\n"));
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        r
    } else if query_param(&query, "fail_on")
        .is_some_and(|names| names.split(',').any(|n| n == &*name))
    {
        let mut r = Response::new(full("injected server error\n"));
        *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        r
    } else {
        let path = req.uri().path().to_owned();
        if path == "/health" {
            Response::new(full("ok\n"))
        } else if path.starts_with("/ws") && req.headers().contains_key(header::UPGRADE) {
            websocket_accept(req)
        } else if path.starts_with("/echo") {
            Response::new(req.into_body().boxed())
        } else {
            let headers: BTreeMap<String, String> = req
                .headers()
                .keys()
                .map(|k| {
                    let joined = req
                        .headers()
                        .get_all(k)
                        .iter()
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                        .collect::<Vec<_>>()
                        .join(",");
                    (k.as_str().to_owned(), joined)
                })
                .collect();
            let body = json!({
                "name": &*name,
                "method": req.method().as_str(),
                "path": path,
                "query": query,
                "version": format!("{:?}", req.version()),
                "headers": headers,
            });
            let mut r = Response::new(full(format!("{body}\n")));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                "application/json"
                    .parse()
                    .unwrap_or(header::HeaderValue::from_static("text/plain")),
            );
            r
        }
    };
    if let Ok(value) = header::HeaderValue::from_str(&name) {
        response.headers_mut().insert("x-server", value);
    }
    Ok(response)
}

fn ws_accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(WS_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

fn websocket_accept(mut req: Request<Incoming>) -> Response<ServerBody> {
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        let mut r = Response::new(full("missing sec-websocket-key\n"));
        *r.status_mut() = StatusCode::BAD_REQUEST;
        return r;
    };
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(upgraded) = upgrade.await {
            let _ = ws_echo(TokioIo::new(upgraded)).await;
        }
    });
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(
        header::UPGRADE,
        header::HeaderValue::from_static("websocket"),
    );
    h.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("Upgrade"),
    );
    if let Ok(v) = header::HeaderValue::from_str(&ws_accept_key(key.as_bytes())) {
        h.insert("sec-websocket-accept", v);
    }
    r
}

struct WsFrame {
    opcode: u8,
    payload: Vec<u8>,
}

async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> anyhow::Result<WsFrame> {
    let mut head = [0u8; 2];
    r.read_exact(&mut head).await?;
    let opcode = head[0] & 0x0f;
    let masked = head[1] & 0x80 != 0;
    let len = match head[1] & 0x7f {
        126 => u64::from(r.read_u16().await?),
        127 => r.read_u64().await?,
        n => u64::from(n),
    };
    if len > 16 * 1024 * 1024 {
        bail!("WebSocket frame of {len} bytes is too large for this test tool");
    }
    let mut mask = [0u8; 4];
    if masked {
        r.read_exact(&mut mask).await?;
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).await?;
    if masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
    }
    Ok(WsFrame { opcode, payload })
}

async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    opcode: u8,
    payload: &[u8],
    mask: Option<[u8; 4]>,
) -> anyhow::Result<()> {
    let mut out = vec![0x80 | opcode];
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(mask) => {
            out.extend_from_slice(&mask);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    w.write_all(&out).await?;
    w.flush().await?;
    Ok(())
}

async fn ws_echo<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> anyhow::Result<()> {
    for _ in 0..100_000 {
        let frame = read_frame(&mut s).await?;
        match frame.opcode {
            0x8 => {
                write_frame(&mut s, 0x8, &frame.payload, None).await?;
                return Ok(());
            }
            0x9 => write_frame(&mut s, 0xA, &frame.payload, None).await?,
            op => write_frame(&mut s, op, &frame.payload, None).await?,
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Clients

struct Target {
    addr: SocketAddr,
    authority: String,
    path_and_query: String,
}

async fn resolve(url: &str) -> anyhow::Result<Target> {
    let uri: http::Uri = url.parse().with_context(|| format!("bad URL {url}"))?;
    let host = uri.host().context("URL without a host")?.to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
        .await
        .with_context(|| format!("resolve {host}"))?
        .collect();
    let addr = addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .with_context(|| format!("{host} has no address"))?;
    Ok(Target {
        addr,
        authority: uri
            .authority()
            .map(|a| a.to_string())
            .unwrap_or_else(|| host.clone()),
        path_and_query: uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_else(|| "/".into()),
    })
}

fn parse_headers(raw: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    raw.iter()
        .map(|h| {
            let (k, v) = h
                .split_once(':')
                .with_context(|| format!("header {h:?} is not `name: value`"))?;
            Ok((k.trim().to_owned(), v.trim().to_owned()))
        })
        .collect()
}

#[derive(Default)]
struct Tally {
    statuses: BTreeMap<u16, u64>,
    servers: BTreeMap<String, u64>,
    errors: Vec<String>,
    error_count: u64,
    latencies_ms: Vec<f64>,
    connections: u64,
    resent_unsent: u64,
}

impl Tally {
    fn error(&mut self, e: impl std::fmt::Display) {
        self.error_count += 1;
        if self.errors.len() < MAX_ERRORS {
            self.errors.push(e.to_string());
        }
    }
}

/// An error with its causes (hyper's own message alone says little: "http2 error").
fn with_causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(error) = cause {
        text.push_str(": ");
        text.push_str(&error.to_string());
        cause = error.source();
    }
    text
}

/// The stream failed with the server's graceful GOAWAY (NO_ERROR): the server did not process
/// it. Any other failure (a reset, a connection cut under a stream it took) is not this.
fn left_out_by_goaway(error: &hyper::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = cause {
        if let Some(h2) = error.downcast_ref::<h2::Error>() {
            return h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR);
        }
        cause = error.source();
    }
    false
}

fn lock_tally(tally: &std::sync::Mutex<Tally>) -> std::sync::MutexGuard<'_, Tally> {
    tally.lock().unwrap_or_else(|p| p.into_inner())
}

fn build_get(
    target: &Target,
    headers: &[(String, String)],
    http2: bool,
) -> anyhow::Result<Request<Full<Bytes>>> {
    let mut builder = if http2 {
        Request::get(format!(
            "http://{}{}",
            target.authority, target.path_and_query
        ))
    } else {
        Request::get(&target.path_and_query).header(header::HOST, &target.authority)
    };
    for (k, v) in headers {
        builder = builder.header(k, v);
    }
    Ok(builder.body(Full::new(Bytes::new()))?)
}

async fn record(tally: &std::sync::Mutex<Tally>, started: Instant, response: Response<Incoming>) {
    let status = response.status().as_u16();
    let server = response
        .headers()
        .get("x-server")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response.into_body().collect().await;
    let mut t = lock_tally(tally);
    match body {
        Ok(_) => {
            *t.statuses.entry(status).or_default() += 1;
            if let Some(server) = server {
                *t.servers.entry(server).or_default() += 1;
            }
            t.latencies_ms
                .push(started.elapsed().as_secs_f64() * 1000.0);
        }
        Err(e) => t.error(format!("body: {e}")),
    }
}

/// When a worker sends its requests: how many (or until when), at what pace.
struct Plan {
    count: Option<u32>,
    until: Option<Instant>,
    interval: Option<Duration>,
    stop_file: Option<std::path::PathBuf>,
}

/// One worker's turn: waits for the next slot of its pace and says whether to send request
/// number `sent` at all.
struct Pacer {
    plan: Arc<Plan>,
    next: Instant,
    sent: u32,
}

impl Pacer {
    fn new(plan: Arc<Plan>) -> Pacer {
        Pacer {
            plan,
            next: Instant::now(),
            sent: 0,
        }
    }

    async fn turn(&mut self) -> bool {
        if let Some(interval) = self.plan.interval {
            tokio::time::sleep_until(self.next.into()).await;
            // A late turn does not make the next ones come faster (no catching up in bursts).
            self.next = self.next.max(Instant::now() - interval) + interval;
        }
        let more = self.plan.count.is_none_or(|n| self.sent < n)
            && self.plan.until.is_none_or(|t| Instant::now() < t)
            && self.plan.stop_file.as_ref().is_none_or(|f| !f.exists());
        self.sent += u32::from(more);
        more
    }
}

/// The HTTP/2 connection the workers share (numbered), replaced when the server closes it
/// (GOAWAY).
type SharedHttp2 =
    tokio::sync::Mutex<Option<(u64, hyper::client::conn::http2::SendRequest<Full<Bytes>>)>>;

/// The shared connection, or a new one if it is closed or is the one numbered `stale`.
async fn http2_sender(
    shared: &SharedHttp2,
    addr: SocketAddr,
    tally: &std::sync::Mutex<Tally>,
    stale: Option<u64>,
) -> anyhow::Result<(u64, hyper::client::conn::http2::SendRequest<Full<Bytes>>)> {
    let mut current = shared.lock().await;
    if let Some((number, sender)) = current.as_ref()
        && !sender.is_closed()
        && Some(*number) != stale
    {
        return Ok((*number, sender.clone()));
    }
    let stream = TcpStream::connect(addr).await?;
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, Full<Bytes>>(TokioIo::new(stream))
        .await?;
    tokio::spawn(conn);
    let number = {
        let mut t = lock_tally(tally);
        t.connections += 1;
        t.connections
    };
    *current = Some((number, sender.clone()));
    Ok((number, sender))
}

async fn load(args: LoadArgs) -> anyhow::Result<Value> {
    let target = Arc::new(resolve(&args.url).await?);
    let headers = Arc::new(parse_headers(&args.headers)?);
    let tally = Arc::new(std::sync::Mutex::new(Tally::default()));
    let started = Instant::now();
    let concurrency = args.concurrency.clamp(1, 256);
    let by_time = args.duration_ms.is_some();
    let mut tasks = Vec::new();
    if args.http2 {
        let shared = Arc::new(SharedHttp2::default());
        // The first connection is opened before the workers start, so that a server that is
        // not there fails the run at once.
        http2_sender(&shared, target.addr, &tally, None).await?;
        for worker in 0..concurrency {
            let n = args.count / concurrency + u32::from(worker < args.count % concurrency);
            let plan = Arc::new(plan(&args, n));
            let (shared, target, headers, tally) = (
                shared.clone(),
                target.clone(),
                headers.clone(),
                tally.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut pacer = Pacer::new(plan);
                while pacer.turn().await {
                    let begun = Instant::now();
                    let mut request = match build_get(&target, &headers, true) {
                        Ok(r) => r,
                        Err(e) => return lock_tally(&tally).error(e),
                    };
                    // A request the server never processed goes on a new connection, at most
                    // twice: one the client library gives back unsent, or one the server's
                    // GOAWAY left out (RFC 9113 section 6.8: above its last stream id, or
                    // opened by the library after the GOAWAY arrived).
                    let mut stale = None;
                    for attempt in 0..3 {
                        let sender = http2_sender(&shared, target.addr, &tally, stale).await;
                        let (number, mut sender) = match sender {
                            Ok(s) => s,
                            Err(e) => {
                                lock_tally(&tally).error(format!("connect: {e}"));
                                break;
                            }
                        };
                        match sender.try_send_request(request).await {
                            Ok(response) => {
                                record(&tally, begun, response).await;
                                break;
                            }
                            Err(mut e) => match e.take_message() {
                                Some(unsent) if attempt < 2 => {
                                    lock_tally(&tally).resent_unsent += 1;
                                    request = unsent;
                                    stale = Some(number);
                                }
                                _ => {
                                    let e = e.into_error();
                                    if attempt < 2 && left_out_by_goaway(&e) {
                                        lock_tally(&tally).resent_unsent += 1;
                                        stale = Some(number);
                                        request = match build_get(&target, &headers, true) {
                                            Ok(r) => r,
                                            Err(e) => return lock_tally(&tally).error(e),
                                        };
                                        continue;
                                    }
                                    lock_tally(&tally).error(with_causes(&e));
                                    break;
                                }
                            },
                        }
                    }
                }
            }));
        }
    } else {
        for worker in 0..concurrency {
            let n = args.count / concurrency + u32::from(worker < args.count % concurrency);
            let plan = Arc::new(plan(&args, n));
            let (target, headers, tally) = (target.clone(), headers.clone(), tally.clone());
            tasks.push(tokio::spawn(async move {
                let mut sender: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>> = None;
                let mut pacer = Pacer::new(plan);
                while pacer.turn().await {
                    let begun = Instant::now();
                    if sender.as_ref().is_none_or(|s| s.is_closed()) {
                        match open_http1(target.addr).await {
                            Ok(s) => {
                                lock_tally(&tally).connections += 1;
                                sender = Some(s);
                            }
                            Err(e) => {
                                lock_tally(&tally).error(e);
                                continue;
                            }
                        }
                    }
                    let Some(s) = sender.as_mut() else { continue };
                    if s.ready().await.is_err() {
                        sender = None;
                        lock_tally(&tally).error("connection closed");
                        continue;
                    }
                    let request = match build_get(&target, &headers, false) {
                        Ok(r) => r,
                        Err(e) => return lock_tally(&tally).error(e),
                    };
                    match s.send_request(request).await {
                        Ok(response) => record(&tally, begun, response).await,
                        Err(e) => {
                            sender = None;
                            lock_tally(&tally).error(with_causes(&e));
                        }
                    }
                }
            }));
        }
    }
    for task in tasks {
        task.await?;
    }
    let mut t = std::mem::take(&mut *lock_tally(&tally));
    t.latencies_ms.sort_by(f64::total_cmp);
    let pct = |p: f64| -> f64 {
        if t.latencies_ms.is_empty() {
            return 0.0;
        }
        let i = ((t.latencies_ms.len() as f64 - 1.0) * p).round() as usize;
        t.latencies_ms[i]
    };
    let completed: u64 = t.statuses.values().sum();
    let not_2xx: u64 = t
        .statuses
        .iter()
        .filter(|(status, _)| !(200..300).contains(*status))
        .map(|(_, n)| n)
        .sum();
    let requests = if by_time {
        completed + t.error_count
    } else {
        u64::from(args.count)
    };
    Ok(json!({
        "ok": t.error_count == 0 && completed == requests,
        "requests": requests,
        "completed": completed,
        "failed": t.error_count + not_2xx,
        "statuses": t.statuses.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "by_server": t.servers,
        "connections": t.connections,
        "resent_unsent": t.resent_unsent,
        "errors": t.errors,
        "error_count": t.error_count,
        "p50_ms": pct(0.5),
        "max_ms": pct(1.0),
        "elapsed_ms": started.elapsed().as_millis() as u64,
    }))
}

/// A worker's plan: `n` requests, or (with `--duration-ms`) as many as fit in the time.
fn plan(args: &LoadArgs, n: u32) -> Plan {
    let until = args
        .duration_ms
        .map(|ms| Instant::now() + Duration::from_millis(ms));
    Plan {
        count: until.is_none().then_some(n),
        until,
        interval: (args.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / args.rate)),
        stop_file: args.stop_file.clone(),
    }
}

async fn open_http1(
    addr: SocketAddr,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(addr).await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// A request body of `remaining` pseudo-random bytes, generated chunk by chunk.
struct Generated {
    remaining: u64,
    state: u64,
    sha: Arc<std::sync::Mutex<Sha256>>,
}

impl Body for Generated {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = (self.remaining as usize).min(CHUNK);
        let mut chunk = Vec::with_capacity(n);
        let mut x = self.state;
        while chunk.len() < n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let word = x.to_le_bytes();
            let take = (n - chunk.len()).min(8);
            chunk.extend_from_slice(&word[..take]);
        }
        self.state = x;
        self.remaining -= n as u64;
        self.sha
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .update(&chunk);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }
}

async fn stream(args: StreamArgs) -> anyhow::Result<Value> {
    let target = resolve(&args.url).await?;
    let started = Instant::now();
    let stream = TcpStream::connect(target.addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let sent_sha = Arc::new(std::sync::Mutex::new(Sha256::new()));
    let body = Generated {
        remaining: args.bytes,
        state: 0x9e37_79b9_7f4a_7c15,
        sha: sent_sha.clone(),
    };
    // No content-length: the body goes chunked, as a streaming client would send it.
    let request = Request::post(&target.path_and_query)
        .header(header::HOST, &target.authority)
        .body(body)?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let mut received = 0u64;
    let mut received_sha = Sha256::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            received += data.len() as u64;
            received_sha.update(&data);
        }
    }
    let sent_sha = hex(&sent_sha
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .finalize());
    let received_sha = hex(&received_sha.finalize());
    Ok(json!({
        "ok": status == 200 && received == args.bytes && sent_sha == received_sha,
        "status": status,
        "sent": args.bytes,
        "received": received,
        "sent_sha256": sent_sha,
        "received_sha256": received_sha,
        "elapsed_ms": started.elapsed().as_millis() as u64,
    }))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn ws(args: WsArgs) -> anyhow::Result<Value> {
    let target = resolve(&args.url).await?;
    let mut stream = TcpStream::connect(target.addr).await?;
    let key_bytes: [u8; 16] = SystemTime::now()
        .duration_since(UNIX_EPOCH)?
        .as_nanos()
        .to_le_bytes();
    let key = base64::engine::general_purpose::STANDARD.encode(key_bytes);
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n",
        target.path_and_query, target.authority
    );
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 * 1024 {
            bail!("response head too long");
        }
        let b = stream
            .read_u8()
            .await
            .context("reading the upgrade response")?;
        head.push(b);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status_ok = head.starts_with("HTTP/1.1 101");
    let accept_ok = head.lines().any(|line| {
        line.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("sec-websocket-accept")
                && v.trim() == ws_accept_key(key.as_bytes())
        })
    });
    if !status_ok {
        return Ok(json!({"ok": false, "response": head}));
    }
    let mut echoed = 0u32;
    let mut mismatches = Vec::new();
    for i in 0..args.messages {
        let message = format!("message {i} through the mesh");
        write_frame(
            &mut stream,
            0x1,
            message.as_bytes(),
            Some([1, 2, 3, (i % 250) as u8]),
        )
        .await?;
        let frame = read_frame(&mut stream).await?;
        if frame.opcode == 0x1 && frame.payload == message.as_bytes() {
            echoed += 1;
        } else if mismatches.len() < MAX_ERRORS {
            mismatches.push(String::from_utf8_lossy(&frame.payload).into_owned());
        }
    }
    write_frame(&mut stream, 0x8, &[0x03, 0xe8], Some([9, 9, 9, 9])).await?;
    let closed = read_frame(&mut stream).await.is_ok_and(|f| f.opcode == 0x8);
    Ok(json!({
        "ok": accept_ok && echoed == args.messages && closed,
        "accept_ok": accept_ok,
        "echoed": echoed,
        "messages": args.messages,
        "close_echoed": closed,
        "mismatches": mismatches,
    }))
}
