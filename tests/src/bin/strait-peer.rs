//! `strait-peer`: a small real TCP client and server for tests and the demo.
//!
//! - `strait-peer serve --listen ADDR[,ADDR...] --name NAME`: on each connection, writes the
//!   banner `strait-peer name=<NAME>\n`, echoes every byte until EOF, then shuts down its write
//!   side. Prints one JSON line `{"listening":[...],"name":...}` once every address is bound.
//! - `strait-peer call TARGET:PORT [--bytes N] [--count C] [--interval-ms MS] [--timeout SECS] [-4|-6]`: resolves
//!   TARGET with the system resolver (getaddrinfo, so the pod's resolv.conf decides), opens C
//!   connections one after another, and on each reads the banner, sends N pseudo-random bytes
//!   while reading the echo, half-closes, reads to EOF and compares SHA-256 of both directions.
//!   Prints one JSON line (see [`Report`]) and exits 0 only if every connection succeeded.
//! - `strait-peer hold TARGET:PORT --connections N [--seconds S] [--every-ms MS] [--open-within-ms MS] [--timeout SECS] [-4|-6]`:
//!   opens N connections concurrently (one thread each, started over `--open-within-ms`),
//!   reads each banner, waits until all are open, then on each echoes 16 bytes every MS for S
//!   seconds and closes. Prints one JSON line (see [`HoldReport`]): how many were open at
//!   once, each connection's server and, for a failed one, when (Unix milliseconds) and why.
//!
//! Blocking std sockets on threads, on purpose: the mesh must not break blocking applications
//! (docs/architecture.md, "The fast path"), and a spurious EAGAIN on a blocking socket is reported as its own
//! error kind, `eagain`.

use std::collections::BTreeMap;
use std::io::{self, Read as _, Write as _};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs as _};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use socket2::{Domain, Socket, Type};

/// The banner's prefix; the server's name follows.
const BANNER_PREFIX: &str = "strait-peer name=";
/// Longest banner line accepted.
const MAX_BANNER: usize = 256;
/// Concurrent connections a server serves; more are closed at once.
const MAX_CONNECTIONS: usize = 4096;
/// At most this many errors are listed in the report.
const MAX_ERRORS: usize = 20;
const BUF: usize = 64 * 1024;

#[derive(Parser)]
#[command(
    name = "strait-peer",
    about = "A TCP echo server and checking client for strait tests"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve banner + echo on every address.
    Serve(ServeArgs),
    /// Call a server and check the echo.
    Call(CallArgs),
    /// Hold many connections open at once, echoing on each.
    Hold(HoldArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Addresses to listen on, comma-separated (`0.0.0.0:8080,[::]:8080`).
    #[arg(long, value_delimiter = ',', required = true)]
    listen: Vec<SocketAddr>,
    /// Name sent in the banner (e.g. the version: v1).
    #[arg(long)]
    name: String,
    /// Close a connection idle for this many seconds.
    #[arg(long, default_value_t = 60)]
    idle_timeout: u64,
}

#[derive(Args)]
struct CallArgs {
    /// HOST:PORT, HOST a name or an address (`[v6]:port` for IPv6 literals).
    target: String,
    /// Bytes to send on each connection.
    #[arg(long, default_value_t = 1024)]
    bytes: u64,
    /// Connections, one after another.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Bound for each connection's whole exchange (connect, banner, transfer), seconds.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Pause between connections, milliseconds (to spread connections over time).
    #[arg(long, default_value_t = 0)]
    interval_ms: u64,
    /// Use IPv4 addresses only.
    #[arg(short = '4', conflicts_with = "ipv6")]
    ipv4: bool,
    /// Use IPv6 addresses only.
    #[arg(short = '6')]
    ipv6: bool,
}

#[derive(Args)]
struct HoldArgs {
    /// HOST:PORT, HOST a name or an address (`[v6]:port` for IPv6 literals).
    target: String,
    /// Connections held open at once.
    #[arg(long)]
    connections: u32,
    /// How long each connection is held (echoing) once all are open, seconds.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Pause between two echoes on one connection, milliseconds.
    #[arg(long, default_value_t = 500)]
    every_ms: u64,
    /// The connections are started evenly over this many milliseconds.
    #[arg(long, default_value_t = 1000)]
    open_within_ms: u64,
    /// Bound for a connect with its banner, and for each echo, seconds.
    #[arg(long, default_value_t = 20.0)]
    timeout: f64,
    /// Use IPv4 addresses only.
    #[arg(short = '4', conflicts_with = "ipv6")]
    ipv4: bool,
    /// Use IPv6 addresses only.
    #[arg(short = '6')]
    ipv6: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Serve(args) => match serve(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("strait-peer serve: {e}");
                ExitCode::from(2)
            }
        },
        Cmd::Hold(args) => {
            let report = hold(&args);
            println!(
                "{}",
                serde_json::to_string(&report).expect("BUG: report serializes")
            );
            if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Cmd::Call(args) => {
            let report = call(&args);
            println!(
                "{}",
                serde_json::to_string(&report).expect("BUG: report serializes")
            );
            if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

// ---- server ----

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // So `0.0.0.0:P,[::]:P` binds both instead of failing with EADDRINUSE.
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

fn serve(args: &ServeArgs) -> Result<(), String> {
    let mut listeners = Vec::new();
    for addr in &args.listen {
        let l = bind(*addr).map_err(|e| format!("listen on {addr}: {e}"))?;
        listeners.push(l);
    }
    let bound: Vec<String> = listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .map(|a| a.to_string())
        .collect();
    println!(
        "{}",
        serde_json::json!({ "listening": bound, "name": args.name })
    );
    let _ = io::stdout().flush();

    let banner: Arc<str> = format!("{BANNER_PREFIX}{}\n", args.name).into();
    let active = Arc::new(AtomicUsize::new(0));
    let idle = Duration::from_secs(args.idle_timeout.max(1));
    let handles: Vec<_> = listeners
        .into_iter()
        .map(|listener| {
            let banner = banner.clone();
            let active = active.clone();
            thread::spawn(move || accept_loop(&listener, &banner, &active, idle))
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

fn accept_loop(
    listener: &TcpListener,
    banner: &Arc<str>,
    active: &Arc<AtomicUsize>,
    idle: Duration,
) {
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("accept: {e}");
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            eprintln!("{peer}: over {MAX_CONNECTIONS} connections, closing");
            continue;
        }
        let banner = banner.clone();
        let active = active.clone();
        thread::spawn(move || {
            if let Err(e) = echo(stream, &banner, idle) {
                eprintln!("{peer}: {e}");
            }
            active.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

fn echo(mut stream: TcpStream, banner: &str, idle: Duration) -> io::Result<()> {
    stream.set_read_timeout(Some(idle))?;
    stream.set_write_timeout(Some(idle))?;
    stream.set_nodelay(true)?;
    stream.write_all(banner.as_bytes())?;
    let mut buf = vec![0u8; BUF];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        stream.write_all(&buf[..n])?;
    }
    stream.shutdown(Shutdown::Write)
}

// ---- client ----

/// What `call` prints.
#[derive(Serialize)]
struct Report {
    ok: bool,
    target: String,
    /// The address connected to (first of the resolved ones in the chosen family).
    address: Option<String>,
    connections: u32,
    succeeded: u32,
    /// Successful connections by the server name in their banner.
    by_server: BTreeMap<String, u32>,
    bytes_sent: u64,
    bytes_received: u64,
    elapsed_ms: u64,
    /// Failures in order, at most 20; the first one's errno says why (1 = EPERM, 111 =
    /// ECONNREFUSED, 113 = EHOSTUNREACH, ...).
    errors: Vec<PeerError>,
}

#[derive(Serialize, Clone)]
struct PeerError {
    /// resolve, connect, banner, write, read, timeout, eagain, mismatch.
    kind: &'static str,
    errno: Option<i32>,
    message: String,
    /// Which connection (0-based); absent for resolution.
    #[serde(skip_serializing_if = "Option::is_none")]
    connection: Option<u32>,
}

impl PeerError {
    fn io(kind: &'static str, e: &io::Error) -> Self {
        Self {
            kind,
            errno: e.raw_os_error(),
            message: e.to_string(),
            connection: None,
        }
    }

    fn other(kind: &'static str, message: String) -> Self {
        Self {
            kind,
            errno: None,
            message,
            connection: None,
        }
    }
}

/// Splits `host:port`, `[v6]:port`.
fn split_target(target: &str) -> Result<(String, u16), String> {
    let (host, port) = target
        .rsplit_once(':')
        .ok_or_else(|| format!("target `{target}` is not HOST:PORT"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("target `{target}`: bad port `{port}`"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("target `{target}` has no host"));
    }
    Ok((host.to_owned(), port))
}

fn resolve(args: &CallArgs) -> Result<SocketAddr, PeerError> {
    resolve_target(&args.target, args.ipv4, args.ipv6)
}

fn resolve_target(target: &str, ipv4: bool, ipv6: bool) -> Result<SocketAddr, PeerError> {
    let (host, port) = split_target(target).map_err(|m| PeerError::other("resolve", m))?;
    // An address literal needs no lookup; a name goes through getaddrinfo.
    let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => (host.as_str(), port)
            .to_socket_addrs()
            .map_err(|e| PeerError::io("resolve", &e))?
            .collect(),
    };
    addrs
        .iter()
        .find(|a| (!ipv4 || a.is_ipv4()) && (!ipv6 || a.is_ipv6()))
        .copied()
        .ok_or_else(|| {
            PeerError::other(
                "resolve",
                format!("{host} has no address of the requested family (got {addrs:?})"),
            )
        })
}

fn call(args: &CallArgs) -> Report {
    let start = Instant::now();
    let mut report = Report {
        ok: false,
        target: args.target.clone(),
        address: None,
        connections: args.count,
        succeeded: 0,
        by_server: BTreeMap::new(),
        bytes_sent: 0,
        bytes_received: 0,
        elapsed_ms: 0,
        errors: Vec::new(),
    };
    let timeout = Duration::from_secs_f64(args.timeout.clamp(0.001, 86_400.0));
    match resolve(args) {
        Err(e) => report.errors.push(e),
        Ok(addr) => {
            report.address = Some(addr.to_string());
            for i in 0..args.count {
                if i > 0 && args.interval_ms > 0 {
                    std::thread::sleep(Duration::from_millis(args.interval_ms));
                }
                match exchange(addr, args.bytes, timeout, u64::from(i)) {
                    Ok(done) => {
                        report.succeeded += 1;
                        *report.by_server.entry(done.server).or_default() += 1;
                        report.bytes_sent += done.sent;
                        report.bytes_received += done.received;
                    }
                    Err(failed) => {
                        report.bytes_sent += failed.sent;
                        report.bytes_received += failed.received;
                        if report.errors.len() < MAX_ERRORS {
                            let mut e = failed.error;
                            e.connection = Some(i);
                            report.errors.push(e);
                        }
                    }
                }
            }
        }
    }
    report.ok = report.errors.is_empty() && report.succeeded == args.count;
    report.elapsed_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
    report
}

struct Done {
    server: String,
    sent: u64,
    received: u64,
}

struct Failed {
    error: PeerError,
    sent: u64,
    received: u64,
}

impl From<PeerError> for Failed {
    fn from(error: PeerError) -> Self {
        Self {
            error,
            sent: 0,
            received: 0,
        }
    }
}

/// xorshift64*: fast, reproducible filler bytes (not for cryptography).
struct Filler(u64);

impl Filler {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

fn read_kind(e: &io::Error, waited: Duration, timeout: Duration) -> &'static str {
    match e.kind() {
        // SO_RCVTIMEO expiry also reads as EAGAIN; one well before the timeout is spurious.
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            if waited + Duration::from_millis(100) < timeout =>
        {
            "eagain"
        }
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "timeout",
        _ => "read",
    }
}

/// Reads the banner line, byte by byte so no echo byte is consumed with it; returns the
/// server's name.
fn read_banner(stream: &mut TcpStream, timeout: Duration) -> Result<String, PeerError> {
    let mut banner = Vec::new();

    let mut byte = [0u8; 1];
    while banner.len() < MAX_BANNER {
        let asked = Instant::now();
        match stream.read(&mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => banner.push(byte[0]),
            Err(e) => {
                let kind = match read_kind(&e, asked.elapsed(), timeout) {
                    "read" => "banner",
                    k => k,
                };
                return Err(PeerError::io(kind, &e));
            }
        }
    }
    let banner = String::from_utf8_lossy(&banner).into_owned();
    Ok(banner
        .strip_prefix(BANNER_PREFIX)
        .ok_or_else(|| PeerError::other("banner", format!("unexpected banner {banner:?}")))?
        .to_owned())
}

fn exchange(addr: SocketAddr, bytes: u64, timeout: Duration, seed: u64) -> Result<Done, Failed> {
    let deadline = Instant::now() + timeout;
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| {
        let kind = if e.kind() == io::ErrorKind::TimedOut {
            "timeout"
        } else {
            "connect"
        };
        PeerError::io(kind, &e)
    })?;
    let setup = |s: &TcpStream| -> io::Result<()> {
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        s.set_nodelay(true)
    };
    setup(&stream).map_err(|e| PeerError::io("connect", &e))?;
    let server = read_banner(&mut stream, timeout)?;

    // Writer on its own thread, so the echo is read while sending (no deadlock on full
    // buffers).
    let mut writer_stream = stream
        .try_clone()
        .map_err(|e| PeerError::io("connect", &e))?;
    let writer = thread::spawn(move || -> Result<([u8; 32], u64), (io::Error, u64)> {
        let mut filler = Filler::new(seed);
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; BUF];
        let mut left = bytes;
        let mut sent = 0u64;
        while left > 0 {
            if Instant::now() >= deadline {
                return Err((io::Error::from(io::ErrorKind::TimedOut), sent));
            }
            let n = usize::try_from(left.min(BUF as u64)).unwrap_or(BUF);
            filler.fill(&mut buf[..n]);
            writer_stream.write_all(&buf[..n]).map_err(|e| (e, sent))?;
            hasher.update(&buf[..n]);
            sent += n as u64;
            left -= n as u64;
        }
        writer_stream
            .shutdown(Shutdown::Write)
            .map_err(|e| (e, sent))?;
        Ok((hasher.finalize().into(), sent))
    });

    let mut hasher = Sha256::new();
    let mut received = 0u64;
    let mut buf = vec![0u8; BUF];
    let read_result: Result<(), PeerError> = loop {
        if Instant::now() >= deadline {
            break Err(PeerError::other(
                "timeout",
                format!("exchange not finished within {timeout:?} ({received} bytes echoed)"),
            ));
        }
        let asked = Instant::now();
        match stream.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                hasher.update(&buf[..n]);
                received += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(PeerError::io(read_kind(&e, asked.elapsed(), timeout), &e)),
        }
    };
    if read_result.is_err() {
        // Unblock the writer.
        let _ = stream.shutdown(Shutdown::Both);
    }
    let written = writer
        .join()
        .unwrap_or_else(|_| Err((io::Error::other("BUG: writer thread panicked"), 0)));
    let sent = match &written {
        Ok((_, sent)) | Err((_, sent)) => *sent,
    };
    let fail = |error| Failed {
        error,
        sent,
        received,
    };
    read_result.map_err(fail)?;
    let (sent_hash, _) = written.map_err(|(e, _)| {
        let kind = if e.kind() == io::ErrorKind::TimedOut || e.kind() == io::ErrorKind::WouldBlock {
            "timeout"
        } else {
            "write"
        };
        fail(PeerError::io(kind, &e))
    })?;
    let received_hash: [u8; 32] = hasher.finalize().into();
    if sent_hash != received_hash || sent != received {
        return Err(fail(PeerError::other(
            "mismatch",
            format!("sent {sent} bytes, got {received} back, SHA-256 differs"),
        )));
    }
    Ok(Done {
        server,
        sent,
        received,
    })
}

// ---- hold ----

/// What `hold` prints.
#[derive(Serialize)]
struct HoldReport {
    /// Every connection opened, all were open at once, and every echo came back.
    ok: bool,
    target: String,
    address: Option<String>,
    connections: u32,
    /// Connections whose banner arrived.
    opened: u32,
    /// Most connections open at the same time.
    peak_open: usize,
    /// Opened connections by the server name in their banner.
    by_server: BTreeMap<String, u32>,
    /// Echoes that came back, over all connections.
    echoes: u64,
    /// When the first connection was started, Unix milliseconds.
    started_unix_ms: u64,
    elapsed_ms: u64,
    /// Resolution failure, if any.
    error: Option<PeerError>,
    /// One entry per connection, in order.
    held: Vec<Held>,
}

#[derive(Serialize, Clone, Default)]
struct Held {
    server: Option<String>,
    echoes: u32,
    /// When it failed, Unix milliseconds.
    failed_unix_ms: Option<u64>,
    error: Option<PeerError>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Lifts the soft open-files limit to the hard one (a thousand sockets need it).
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Shared by the connection threads of `hold`.
struct Holding {
    addr: SocketAddr,
    total: usize,
    timeout: Duration,
    hold: Duration,
    every: Duration,
    /// Connections that finished opening (either way).
    settled: AtomicUsize,
    open_now: AtomicUsize,
    peak: AtomicUsize,
    /// The open phase ends at the latest then.
    open_deadline: Instant,
}

fn hold(args: &HoldArgs) -> HoldReport {
    raise_open_files_limit();
    let start = Instant::now();
    let mut report = HoldReport {
        ok: false,
        target: args.target.clone(),
        address: None,
        connections: args.connections,
        opened: 0,
        peak_open: 0,
        by_server: BTreeMap::new(),
        echoes: 0,
        started_unix_ms: unix_ms(),
        elapsed_ms: 0,
        error: None,
        held: Vec::new(),
    };
    let addr = match resolve_target(&args.target, args.ipv4, args.ipv6) {
        Ok(addr) => addr,
        Err(e) => {
            report.error = Some(e);
            return report;
        }
    };
    report.address = Some(addr.to_string());
    let total = args.connections as usize;
    let timeout = Duration::from_secs_f64(args.timeout.clamp(0.001, 3600.0));
    let spread = Duration::from_millis(args.open_within_ms);
    let shared = Arc::new(Holding {
        addr,
        total,
        timeout,
        hold: Duration::from_secs_f64(args.seconds.clamp(0.0, 3600.0)),
        every: Duration::from_millis(args.every_ms),
        settled: AtomicUsize::new(0),
        open_now: AtomicUsize::new(0),
        peak: AtomicUsize::new(0),
        open_deadline: start + spread + timeout,
    });
    let results = Arc::new(Mutex::new(vec![Held::default(); total]));
    let mut threads = Vec::with_capacity(total);
    for i in 0..total {
        let (shared2, results2) = (shared.clone(), results.clone());
        let begin = start + spread.mul_f64(i as f64 / total.max(1) as f64);
        let spawned = thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(move || {
                let held = hold_one(&shared2, begin, i as u64);
                results2.lock().unwrap_or_else(|e| e.into_inner())[i] = held;
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                // Counts as settled, so the others do not wait for it.
                shared.settled.fetch_add(1, Ordering::SeqCst);
                results.lock().unwrap_or_else(|e| e.into_inner())[i].error =
                    Some(PeerError::io("thread", &e));
            }
        }
    }
    for t in threads {
        let _ = t.join();
    }
    report.held = results.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for held in &report.held {
        if let Some(server) = &held.server {
            report.opened += 1;
            *report.by_server.entry(server.clone()).or_default() += 1;
        }
        report.echoes += u64::from(held.echoes);
    }
    report.peak_open = shared.peak.load(Ordering::SeqCst);
    report.ok = report.peak_open == total
        && report
            .held
            .iter()
            .all(|h| h.server.is_some() && h.error.is_none() && h.echoes > 0);
    report.elapsed_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
    report
}

fn hold_one(shared: &Holding, begin: Instant, seed: u64) -> Held {
    let mut held = Held::default();
    thread::sleep(begin.saturating_duration_since(Instant::now()));
    let opened = TcpStream::connect_timeout(&shared.addr, shared.timeout)
        .map_err(|e| PeerError::io("connect", &e))
        .and_then(|mut stream| {
            stream
                .set_read_timeout(Some(shared.timeout))
                .and_then(|()| stream.set_write_timeout(Some(shared.timeout)))
                .and_then(|()| stream.set_nodelay(true))
                .map_err(|e| PeerError::io("connect", &e))?;
            let server = read_banner(&mut stream, shared.timeout)?;
            Ok((stream, server))
        });
    let mut stream = match opened {
        Ok((stream, server)) => {
            held.server = Some(server);
            let now = shared.open_now.fetch_add(1, Ordering::SeqCst) + 1;
            shared.peak.fetch_max(now, Ordering::SeqCst);
            shared.settled.fetch_add(1, Ordering::SeqCst);
            stream
        }
        Err(e) => {
            shared.settled.fetch_add(1, Ordering::SeqCst);
            held.failed_unix_ms = Some(unix_ms());
            held.error = Some(e);
            return held;
        }
    };
    // Everyone open (or given up on) before the holding starts.
    while shared.settled.load(Ordering::SeqCst) < shared.total
        && Instant::now() < shared.open_deadline
    {
        thread::sleep(Duration::from_millis(20));
    }
    let end = Instant::now() + shared.hold;
    let mut filler = Filler::new(seed);
    let mut sent = [0u8; 16];
    let mut got = [0u8; 16];
    loop {
        filler.fill(&mut sent);
        let echoed = stream
            .write_all(&sent)
            .map_err(|e| PeerError::io("write", &e))
            .and_then(|()| {
                let asked = Instant::now();
                stream.read_exact(&mut got).map_err(|e| {
                    let kind = match e.kind() {
                        io::ErrorKind::UnexpectedEof => "eof",
                        _ => read_kind(&e, asked.elapsed(), shared.timeout),
                    };
                    PeerError::io(kind, &e)
                })
            })
            .and_then(|()| {
                (got == sent)
                    .then_some(())
                    .ok_or_else(|| PeerError::other("mismatch", "echo differs".into()))
            });
        if let Err(e) = echoed {
            held.failed_unix_ms = Some(unix_ms());
            held.error = Some(e);
            break;
        }
        held.echoes += 1;
        if Instant::now() + shared.every >= end {
            break;
        }
        thread::sleep(shared.every);
    }
    shared.open_now.fetch_sub(1, Ordering::SeqCst);
    let _ = stream.shutdown(Shutdown::Both);
    held
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_split() {
        assert_eq!(split_target("a.b:80").unwrap(), ("a.b".into(), 80));
        assert_eq!(
            split_target("[fd00::1]:8080").unwrap(),
            ("fd00::1".into(), 8080)
        );
        assert!(split_target("nohost").is_err());
        assert!(split_target(":80").is_err());
    }

    #[test]
    fn echo_over_loopback() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let banner: Arc<str> = "strait-peer name=t\n".into();
        let active = Arc::new(AtomicUsize::new(0));
        thread::spawn(move || accept_loop(&listener, &banner, &active, Duration::from_secs(5)));
        let done = exchange(addr, 300_000, Duration::from_secs(10), 7)
            .unwrap_or_else(|f| panic!("{}", f.error.message));
        assert_eq!(done.server, "t");
        assert_eq!((done.sent, done.received), (300_000, 300_000));
    }

    #[test]
    fn hold_keeps_connections_open_together_and_echoing() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let banner: Arc<str> = "strait-peer name=h\n".into();
        let active = Arc::new(AtomicUsize::new(0));
        thread::spawn(move || accept_loop(&listener, &banner, &active, Duration::from_secs(5)));
        let report = hold(&HoldArgs {
            target: addr.to_string(),
            connections: 20,
            seconds: 0.3,
            every_ms: 100,
            open_within_ms: 100,
            timeout: 5.0,
            ipv4: false,
            ipv6: false,
        });
        assert!(report.ok, "{}", serde_json::to_string(&report).unwrap());
        assert_eq!(report.peak_open, 20);
        assert_eq!(report.by_server.get("h"), Some(&20));
        assert!(report.held.iter().all(|h| h.echoes >= 2));
    }
}
