//! A fixed-rate HTTP/1.1, HTTP/2 and gRPC-unary load generator that reports true latency
//! (run inside a client pod as `xtask bench load-gen ...`). HTTP/2 and gRPC are in [`h2c`].
//!
//! Open-loop and coordinated-omission correct, like wrk2: request `i` of the run is *due* at
//! `start + i / rate`, connection `i % connections` sends it, and its latency is measured from
//! when it was due, not from when it was sent. A stalled server therefore shows up as the
//! latency of every request that should have gone out meanwhile, instead of quietly lowering
//! the rate. Keep-alive connections, one thread each, blocking sockets, small GETs; every
//! response is parsed (status line, Content-Length) and a malformed or failed one counts as
//! an error. The result is one JSON line on stdout.

mod h2c;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Address to send the GETs to (as the pod's client would connect).
    #[arg(long)]
    pub target: SocketAddr,
    /// Requests per second, all connections together.
    #[arg(long)]
    pub rate: u32,
    /// Length of the run.
    #[arg(long)]
    pub seconds: f64,
    /// Keep-alive connections (one thread each).
    #[arg(long, default_value_t = 16)]
    pub connections: u32,
    /// Host header (HTTP/2: `:authority`).
    #[arg(long, default_value = "web")]
    pub host: String,
    /// What to send: HTTP/1.1 GETs, HTTP/2 GETs (h2c, prior knowledge) or gRPC unary calls.
    #[arg(long, value_enum, default_value_t = Protocol::Http1)]
    pub protocol: Protocol,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    Http1,
    Http2,
    Grpc,
}

/// What one run measured.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LoadReport {
    pub rate: u32,
    pub seconds: f64,
    pub sent: u64,
    pub errors: u64,
    /// Latency percentiles in microseconds, measured from each request's due time.
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    /// Achieved rate (responses per second of wall time).
    pub achieved_rps: f64,
}

pub fn run(args: &LoadArgs) -> anyhow::Result<()> {
    if args.rate == 0 || args.connections == 0 || args.seconds.is_nan() || args.seconds <= 0.0 {
        bail!("rate, connections and seconds must be positive");
    }
    let report = match args.protocol {
        Protocol::Http1 => generate(args)?,
        Protocol::Http2 | Protocol::Grpc => h2c::generate(args)?,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn generate(args: &LoadArgs) -> anyhow::Result<LoadReport> {
    let total = (f64::from(args.rate) * args.seconds).round() as u64;
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.rate));
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {}\r\nUser-Agent: strait-bench\r\n\r\n",
        args.host
    );
    // Connect everything first, so set-up is not part of the measured run.
    let mut streams = Vec::new();
    for _ in 0..args.connections {
        let stream = TcpStream::connect_timeout(&args.target, Duration::from_secs(5))
            .with_context(|| format!("connect to {}", args.target))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        streams.push(stream);
    }
    let start = Instant::now() + Duration::from_millis(50);
    let conns = u64::from(args.connections);
    let threads: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(c, stream)| {
            let request = request.clone();
            std::thread::spawn(move || -> (Vec<u32>, u64) {
                let mut latencies = Vec::new();
                let mut errors = 0;
                let mut reader = BufReader::with_capacity(16 * 1024, stream);
                let mut i = c as u64;
                while i < total {
                    let due = start + interval.mul_f64(i as f64);
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    match exchange(&mut reader, request.as_bytes()) {
                        Ok(()) => {
                            let us = due.elapsed().as_micros().min(u128::from(u32::MAX));
                            latencies.push(us as u32);
                        }
                        Err(_) => {
                            errors += 1;
                            // The connection is unusable; count the rest of its share as lost.
                            errors += (total - i - 1) / conns;
                            break;
                        }
                    }
                    i += conns;
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut all = Vec::with_capacity(total as usize);
    let mut errors = 0;
    for t in threads {
        let (lat, err) = t
            .join()
            .map_err(|_| anyhow::anyhow!("a load thread panicked"))?;
        all.extend(lat);
        errors += err;
    }
    let wall = start.elapsed().as_secs_f64();
    Ok(LoadReport::new(args, all, errors, wall))
}

impl LoadReport {
    /// The report of a run: `latencies` in microseconds (any order), over `wall` seconds.
    fn new(args: &LoadArgs, mut latencies: Vec<u32>, errors: u64, wall: f64) -> LoadReport {
        latencies.sort_unstable();
        let pct = |p: f64| -> u64 {
            if latencies.is_empty() {
                return 0;
            }
            let idx = ((p / 100.0) * (latencies.len() - 1) as f64).round() as usize;
            u64::from(latencies[idx.min(latencies.len() - 1)])
        };
        LoadReport {
            rate: args.rate,
            seconds: args.seconds,
            sent: latencies.len() as u64 + errors,
            errors,
            p50_us: pct(50.0),
            p90_us: pct(90.0),
            p99_us: pct(99.0),
            max_us: latencies.last().copied().map_or(0, u64::from),
            achieved_rps: latencies.len() as f64 / wall,
        }
    }
}

/// Send one GET and read one full response (status 200, Content-Length body).
fn exchange(reader: &mut BufReader<TcpStream>, request: &[u8]) -> io::Result<()> {
    reader.get_mut().write_all(request)?;
    let mut line = String::new();
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    if reader.read_line(&mut line)? == 0 {
        return Err(bad("connection closed"));
    }
    if !line.starts_with("HTTP/1.1 200") {
        return Err(bad("status is not 200"));
    }
    let mut length = None;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(bad("connection closed in the headers"));
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse::<u64>().ok();
        }
    }
    let length = length.ok_or_else(|| bad("no Content-Length"))?;
    io::copy(&mut reader.take(length), &mut io::sink())?;
    Ok(())
}
