//! TCP idle timeouts: a listener's `timeout.tcp.idle` at the receiving side, and a
//! `tcpRoute.timeout.idle` at the calling side. The stream ends with an error when no byte has
//! gone either way for that long, so whatever copies it (the caller's agent for a same-node
//! call, the tunnel server for a call from another node) closes both sides, as Envoy's
//! `tcp_proxy` `idle_timeout` did in App Mesh (on the server's listener, or the caller's
//! route).
//!
//! The timer is inside the stream: a read that waits is woken when the idle time is up, and
//! every byte read or written pushes the deadline back.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::upstream::Stream;

/// `io` as a [`Stream`], behind an [`IdleTimeout`] if `idle` is given.
pub fn stream(io: tokio::net::TcpStream, idle: Option<Duration>) -> Stream {
    match idle {
        Some(idle) => Stream::new(IdleTimeout::new(io, idle)),
        None => Stream::new(io),
    }
}

/// A stream that fails with `TimedOut` after `idle` without traffic.
pub struct IdleTimeout<T> {
    inner: T,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
}

impl<T> IdleTimeout<T> {
    pub fn new(inner: T, idle: Duration) -> IdleTimeout<T> {
        IdleTimeout {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
        }
    }

    fn touch(&mut self) {
        let next = Instant::now() + self.idle;
        self.timer.as_mut().reset(next);
    }

    fn expired(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        match self.timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no traffic for {:?} (the listener's tcp idle timeout)",
                    self.idle
                ),
            )),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleTimeout<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    self.touch();
                }
                Poll::Ready(result)
            }
            Poll::Pending => self.expired(cx).map(Err),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleTimeout<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = &result
            && *n > 0
        {
            self.touch();
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn an_idle_stream_times_out_and_traffic_keeps_it_open() {
        let idle = Duration::from_millis(300);
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let mut stream = IdleTimeout::new(ours, idle);
        let mut buf = [0u8; 16];
        // A byte one way or the other every 200 ms for 1.2 s: never idle for 300 ms.
        let started = Instant::now();
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            theirs.write_all(b"x").await.unwrap();
            assert_eq!(stream.read(&mut buf).await.unwrap(), 1);
            tokio::time::sleep(Duration::from_millis(200)).await;
            stream.write_all(b"y").await.unwrap();
        }
        assert!(started.elapsed() >= Duration::from_millis(1200));
        let quiet = Instant::now();
        let error = stream.read(&mut buf).await.unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
        let waited = quiet.elapsed();
        assert!(
            waited >= Duration::from_millis(290) && waited < Duration::from_millis(1000),
            "{waited:?}"
        );
    }
}
