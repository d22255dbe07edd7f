//! Receiving-side access log lines for tcp connections: a connection delivered to a pod whose
//! virtual node has `logging.accessLog` gets a line in that log when it closes, written by the
//! agent that delivered it (same node, or the end of the tunnel), as App Mesh's Envoy beside
//! the server logged its inbound connections (docs/resilience.md). HTTP listeners get theirs
//! per request from the admission gate.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::admission::Admission;
use super::upstream::Stream;
use crate::mesh::ResourceId;
use crate::state::AccessLogs;
use crate::telemetry::access_log::{AccessLog, Entry};

/// A stream to a pod that writes its access log line when dropped.
struct Logged {
    inner: Stream,
    log: AccessLog,
    entry: Entry,
    started: Instant,
}

/// `stream` to the pod at `target` of virtual node `vn`, logged if `vn` has an access log
/// (and telemetry is on); `caller` is the peer's address when known.
pub fn wrap(
    admission: &Admission,
    logs: &AccessLogs,
    vn: &ResourceId,
    target: SocketAddr,
    caller: Option<SocketAddr>,
    stream: Stream,
) -> Stream {
    if admission.telemetry.get().is_none() {
        return stream;
    }
    let Some(log) = logs.get(vn).cloned() else {
        return stream;
    };
    Stream::new(Logged {
        inner: stream,
        log,
        entry: Entry {
            start: Some(SystemTime::now()),
            protocol: "TCP",
            upstream_host: Some(target),
            upstream_cluster: vn.to_string(),
            downstream_remote: caller,
            downstream_local: Some(target),
            reporter: "destination",
            ..Entry::default()
        },
        started: Instant::now(),
    })
}

impl Drop for Logged {
    fn drop(&mut self) {
        self.entry.duration = self.started.elapsed();
        self.log.log(&self.entry);
    }
}

impl AsyncRead for Logged {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        // From the pod: sent to the caller.
        self.entry.bytes_sent += (buf.filled().len() - before) as u64;
        result
    }
}

impl AsyncWrite for Logged {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = &result {
            // From the caller, to the pod.
            self.entry.bytes_received += *n as u64;
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
