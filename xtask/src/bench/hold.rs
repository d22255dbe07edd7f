//! `xtask bench hold-conns` (internal): many idle TCP connections, for the scale bench, and a
//! steady churn of new ones, for the soak. Run inside a pod: `serve` accepts and echoes (or,
//! with `--http` or `--http2`, answers each HTTP/1.1 or HTTP/2 request with a short 200),
//! `connect` opens `--count` connections to an address (through the mesh when it is a virtual
//! service), checks each with a one-byte echo (or, with `--http-host`, one keep-alive GET; with
//! `--http2-host`, one GET on an HTTP/2 connection), prints `ready <n>` on stdout and keeps
//! them open, idle, until the bench stops it or `--hold-secs` pass. `churn` opens new connections
//! every second for `--seconds`: L4 ones (one-byte echo, close) and HTTP/1.1 requests, each
//! on a new connection, then prints one JSON line of counts.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

#[derive(Debug, Clone, clap::Args)]
pub struct HoldArgs {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Clone, clap::Subcommand)]
enum Mode {
    /// Accept connections on `--listen` and echo what they send.
    Serve {
        #[arg(long)]
        listen: SocketAddr,
        /// Answer HTTP/1.1 requests (without bodies) with a short 200 instead of echoing.
        #[arg(long)]
        http: bool,
        /// Speak HTTP/2 (prior knowledge) and answer every request with a short 200.
        #[arg(long, conflicts_with = "http")]
        http2: bool,
    },
    /// Open `--count` connections to `--to` and hold them.
    Connect {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: u32,
        /// Check each connection with a keep-alive HTTP/1.1 GET with this Host header instead
        /// of a one-byte echo (the connection then idles between requests, as a client's
        /// keep-alive connection does).
        #[arg(long)]
        http_host: Option<String>,
        /// Check each connection with one GET on an HTTP/2 connection (prior knowledge) with
        /// this authority; the connection then idles, as a client's HTTP/2 connection does.
        #[arg(long, conflicts_with = "http_host")]
        http2_host: Option<String>,
        /// How many connects are in flight at once.
        #[arg(long, default_value_t = 64)]
        parallel: u32,
        /// Give up opening after this long.
        #[arg(long, default_value_t = 300)]
        open_within_secs: u64,
        /// Close everything after this long at the latest.
        #[arg(long, default_value_t = 600)]
        hold_secs: u64,
    },
    /// New connections every second: `--per-second` L4 echoes to `--l4` and as many HTTP/1.1
    /// GETs (a connection each) to `--http`.
    Churn {
        #[arg(long)]
        l4: SocketAddr,
        #[arg(long)]
        http: SocketAddr,
        /// The Host header of the HTTP requests.
        #[arg(long)]
        host: String,
        #[arg(long, default_value_t = 10)]
        per_second: u32,
        #[arg(long)]
        seconds: u64,
    },
}

pub fn run(args: &HoldArgs) -> anyhow::Result<()> {
    raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match args.mode.clone() {
            Mode::Serve {
                listen,
                http,
                http2,
            } => serve(listen, http, http2).await,
            Mode::Connect {
                to,
                count,
                http_host,
                http2_host,
                parallel,
                open_within_secs,
                hold_secs,
            } => {
                let check = match (http_host, http2_host) {
                    (Some(host), _) => Check::Http(host),
                    (_, Some(host)) => Check::Http2(host),
                    (None, None) => Check::Echo,
                };
                connect(
                    to,
                    count,
                    check,
                    parallel,
                    Duration::from_secs(open_within_secs),
                    Duration::from_secs(hold_secs),
                )
                .await
            }
            Mode::Churn {
                l4,
                http,
                host,
                per_second,
                seconds,
            } => churn(l4, http, host, per_second, seconds).await,
        }
    })
}

/// Many sockets: the soft descriptor limit up to the hard one.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write/read the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

async fn serve(listen: SocketAddr, http: bool, http2: bool) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listen on {listen}"))?;
    loop {
        let (mut stream, _) = listener.accept().await?;
        if http2 {
            tokio::spawn(serve_http2(stream));
            continue;
        }
        if http {
            tokio::spawn(async move {
                while read_head(&mut stream).await.is_ok() {
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if stream.write_all(answer).await.is_err() {
                        break;
                    }
                }
            });
            continue;
        }
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// Answers every request on an HTTP/2 connection with a 200 and a short body, until it ends.
async fn serve_http2(stream: tokio::net::TcpStream) {
    let Ok(mut connection) = h2::server::handshake(stream).await else {
        return;
    };
    while let Some(Ok((_request, mut respond))) = connection.accept().await {
        let answer = http::Response::new(());
        if let Ok(mut body) = respond.send_response(answer, false) {
            let _ = body.send_data(bytes::Bytes::from_static(b"ok"), true);
        }
    }
}

/// Reads one message's head (up to its blank line) and returns it. Reads a byte at a time:
/// nothing after the head is taken from the stream, and the heads here are short.
async fn read_head(stream: &mut tokio::net::TcpStream) -> anyhow::Result<Vec<u8>> {
    const MOST: usize = 16 * 1024;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MOST {
            bail!("no end of the head within {MOST} bytes");
        }
        head.push(stream.read_u8().await?);
    }
    Ok(head)
}

/// One keep-alive GET on `stream`, its answer read to the end of its body: Ok if it was a 200.
async fn get(stream: &mut tokio::net::TcpStream, host: &str) -> anyhow::Result<()> {
    let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let head = String::from_utf8_lossy(&read_head(stream).await?).into_owned();
    if !head.starts_with("HTTP/1.1 200") {
        bail!("answer {:?}", head.lines().next().unwrap_or_default());
    }
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .context("an answer without content-length")?;
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await?;
    Ok(())
}

/// How `connect` checks a connection before it holds it.
#[derive(Debug, Clone)]
enum Check {
    /// A one-byte echo.
    Echo,
    /// One keep-alive HTTP/1.1 GET with this Host.
    Http(String),
    /// One HTTP/2 GET with this authority.
    Http2(String),
}

/// A connection held open, and only held: the socket, or an HTTP/2 connection's handle (its
/// connection runs on a task of its own until the handle is dropped).
type Held = Box<dyn std::any::Any + Send>;

/// One GET on a new HTTP/2 connection over `stream`, its answer read to the end: the
/// connection's handle if it was a 200.
async fn get_http2(
    stream: tokio::net::TcpStream,
    host: &str,
) -> anyhow::Result<h2::client::SendRequest<bytes::Bytes>> {
    let (sender, connection) = h2::client::handshake(stream).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut ready = sender.clone().ready().await?;
    let request = http::Request::get(format!("http://{host}/")).body(())?;
    let (response, _) = ready.send_request(request, true)?;
    let response = response.await?;
    if response.status() != http::StatusCode::OK {
        bail!("answer {}", response.status());
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    Ok(sender)
}

async fn connect(
    to: SocketAddr,
    count: u32,
    check: Check,
    parallel: u32,
    open_within: Duration,
    hold: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + open_within;
    let mut open = Vec::with_capacity(count as usize);
    let mut pending = tokio::task::JoinSet::new();
    let mut started = 0u32;
    while open.len() < count as usize {
        while started < count && pending.len() < parallel as usize {
            started += 1;
            let check = check.clone();
            pending.spawn(async move {
                let mut stream = tokio::net::TcpStream::connect(to).await?;
                match check {
                    Check::Echo => {
                        stream.write_all(b"x").await?;
                        let mut byte = [0u8; 1];
                        stream.read_exact(&mut byte).await?;
                    }
                    Check::Http(host) => get(&mut stream, &host).await?,
                    Check::Http2(host) => {
                        let held: Held = Box::new(get_http2(stream, &host).await?);
                        return Ok(held);
                    }
                }
                anyhow::Ok(Box::new(stream) as Held)
            });
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, pending.join_next()).await {
            Ok(Some(joined)) => open
                .push(joined?.with_context(|| format!("connection {} to {to}", open.len() + 1))?),
            Ok(None) => break,
            Err(_) => bail!(
                "only {} of {count} connections to {to} within {open_within:?}",
                open.len()
            ),
        }
    }
    println!("ready {}", open.len());
    // Idle until the bench stops this process or the hold time is over.
    tokio::time::sleep(hold).await;
    drop(open);
    Ok(())
}

async fn churn(
    l4: SocketAddr,
    http: SocketAddr,
    host: String,
    per_second: u32,
    seconds: u64,
) -> anyhow::Result<()> {
    const EACH: Duration = Duration::from_secs(5);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut rounds = tokio::task::JoinSet::new();
    let mut totals = std::collections::BTreeMap::new();
    for _ in 0..seconds {
        tick.tick().await;
        for _ in 0..per_second {
            rounds.spawn(async move {
                let echo = async {
                    let mut stream = tokio::net::TcpStream::connect(l4).await?;
                    stream.write_all(b"x").await?;
                    let mut byte = [0u8; 1];
                    stream.read_exact(&mut byte).await?;
                    anyhow::Ok(())
                };
                (
                    "l4",
                    tokio::time::timeout(EACH, echo)
                        .await
                        .is_ok_and(|r| r.is_ok()),
                )
            });
            let host = host.clone();
            rounds.spawn(async move {
                let get = async {
                    let mut stream = tokio::net::TcpStream::connect(http).await?;
                    let request =
                        format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
                    stream.write_all(request.as_bytes()).await?;
                    let mut answer = Vec::new();
                    stream.read_to_end(&mut answer).await?;
                    anyhow::Ok(answer.starts_with(b"HTTP/1.1 200"))
                };
                (
                    "http",
                    tokio::time::timeout(EACH, get)
                        .await
                        .is_ok_and(|r| r.is_ok_and(|ok| ok)),
                )
            });
        }
        // Collect what finished, so the set stays small.
        while let Some(done) = rounds.try_join_next() {
            tally(&mut totals, done?);
        }
    }
    while let Some(done) = rounds.join_next().await {
        tally(&mut totals, done?);
    }
    println!("{}", serde_json::to_string(&totals)?);
    Ok(())
}

/// Counts one outcome as `<kind>_ok` or `<kind>_failed`.
fn tally(totals: &mut std::collections::BTreeMap<String, u64>, (kind, ok): (&str, bool)) {
    let key = format!("{kind}_{}", if ok { "ok" } else { "failed" });
    *totals.entry(key).or_default() += 1;
}
