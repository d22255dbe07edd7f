//! The HTTP/2 and gRPC-unary side of the load generator: h2c with prior knowledge over a few
//! multiplexed connections, the same open-loop schedule as HTTP/1.1.
//!
//! A pacing thread (blocking sleeps, so the schedule is as precise as the HTTP/1.1 one's)
//! hands each request to a current-thread tokio runtime at its due time; the runtime sends it
//! on connection `i % connections` as a new stream, without waiting for earlier ones, so
//! nothing queues in the generator and the latency, measured from the due time to the end of
//! the response (gRPC: its trailers), is the server's and the path's. A response counts only
//! if it is complete and says success: status 200 and, for gRPC, a length-prefixed message and
//! `grpc-status: 0` in the trailers.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http::{Method, Request};

use super::{LoadArgs, LoadReport, Protocol};

/// The gRPC method the bench calls (tests/grpc/color_grpc.py: `Get` answers `<name>:<req>`).
pub const GRPC_METHOD: &str = "/color.Color/Get";

pub fn generate(args: &LoadArgs) -> anyhow::Result<LoadReport> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    runtime.block_on(run(args))
}

async fn run(args: &LoadArgs) -> anyhow::Result<LoadReport> {
    let total = (f64::from(args.rate) * args.seconds).round() as u64;
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.rate));
    let mut senders = Vec::new();
    for _ in 0..args.connections {
        senders.push(connect(args.target).await?);
    }
    let (due_tx, mut due_rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
    let start = Instant::now() + Duration::from_millis(50);
    let pacer = std::thread::spawn(move || {
        for i in 0..total {
            let due = start + interval.mul_f64(i as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if due_tx.send((i, due)).is_err() {
                break;
            }
        }
    });
    let mut handles = Vec::with_capacity(total as usize);
    while let Some((i, due)) = due_rx.recv().await {
        let sender = senders[(i % senders.len() as u64) as usize].clone();
        let (protocol, host) = (args.protocol, args.host.clone());
        handles.push(tokio::spawn(async move {
            let outcome =
                tokio::time::timeout(Duration::from_secs(10), exchange(sender, protocol, &host))
                    .await;
            match outcome {
                Ok(Ok(())) => Some(due.elapsed().as_micros().min(u128::from(u32::MAX)) as u32),
                _ => None,
            }
        }));
    }
    pacer
        .join()
        .map_err(|_| anyhow::anyhow!("the pacing thread panicked"))?;
    let mut latencies = Vec::with_capacity(handles.len());
    let mut errors = 0;
    for handle in handles {
        match handle.await.context("a request task panicked")? {
            Some(us) => latencies.push(us),
            None => errors += 1,
        }
    }
    let wall = start.elapsed().as_secs_f64();
    Ok(LoadReport::new(args, latencies, errors, wall))
}

async fn connect(target: SocketAddr) -> anyhow::Result<h2::client::SendRequest<Bytes>> {
    let tcp = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(target),
    )
    .await
    .with_context(|| format!("connect to {target}: timed out"))?
    .with_context(|| format!("connect to {target}"))?;
    tcp.set_nodelay(true)?;
    let (sender, connection) = h2::client::Builder::new()
        .initial_window_size(1 << 20)
        .initial_connection_window_size(1 << 24)
        .handshake::<_, Bytes>(tcp)
        .await
        .with_context(|| format!("HTTP/2 handshake with {target}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// One request and its whole response; an error unless it succeeded.
async fn exchange(
    sender: h2::client::SendRequest<Bytes>,
    protocol: Protocol,
    host: &str,
) -> anyhow::Result<()> {
    let mut sender = sender.ready().await?;
    let grpc = protocol == Protocol::Grpc;
    let request = if grpc {
        Request::builder()
            .method(Method::POST)
            .uri(format!("http://{host}{GRPC_METHOD}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())?
    } else {
        Request::builder()
            .uri(format!("http://{host}/"))
            .header("user-agent", "strait-bench")
            .body(())?
    };
    let (response, mut stream) = sender.send_request(request, !grpc)?;
    if grpc {
        stream.send_data(grpc_frame(b"ping"), true)?;
    }
    let response = response.await?;
    if response.status() != http::StatusCode::OK {
        bail!("status {}", response.status());
    }
    let mut body = response.into_body();
    let mut received = 0;
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        received += chunk.len();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    if grpc {
        let trailers = body.trailers().await?.context("no trailers")?;
        let status = trailers.get("grpc-status").context("no grpc-status")?;
        if status != "0" {
            bail!("grpc-status {status:?}");
        }
        if received < 5 {
            bail!("no gRPC message in the response");
        }
    }
    Ok(())
}

/// A gRPC length-prefixed message: not compressed, 4-byte big-endian length, the bytes.
fn grpc_frame(message: &[u8]) -> Bytes {
    let mut frame = Vec::with_capacity(5 + message.len());
    frame.push(0);
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(message);
    Bytes::from(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_frames_are_length_prefixed() {
        assert_eq!(&grpc_frame(b"ping")[..], b"\0\0\0\0\x04ping");
    }
}
