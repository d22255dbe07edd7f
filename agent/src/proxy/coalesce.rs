//! Writes gathered across the streams of a shared connection: the writing side of a tunnel
//! connection's client (`super::hbone`).
//!
//! Many client connections' requests share one tunnel connection, whose HTTP/2 connection
//! runs on a task of its own. A stream's data wakes that task, and tokio runs a task woken by
//! the running one next (its LIFO slot): so the tunnel's task ran once per request, and each
//! request left in a TLS write of its own, with every other client connection ready to send
//! queued behind it. [`Coalesce`] holds what the connection writes until its flush, and its
//! first flush of a batch yields once (the task wakes itself, so it goes to the back of the
//! run queue): the client connections already queued add their streams' data first, and the
//! batch leaves in one TLS write. A task with nothing queued behind it comes back at once, so
//! an idle node adds only one task poll to a request.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Above this much held, a write first sends what is held: a batch stays a few TLS records.
const HOLD_LIMIT: usize = 64 * 1024;

/// An I/O whose writes are held until a flush, which yields once before it writes them.
pub struct Coalesce<T> {
    inner: T,
    held: Vec<u8>,
    /// How much of `held` has been written.
    sent: usize,
    /// Whether this batch's flush has already yielded once.
    yielded: bool,
}

impl<T> Coalesce<T> {
    pub fn new(inner: T) -> Coalesce<T> {
        Coalesce {
            inner,
            held: Vec::new(),
            sent: 0,
            yielded: false,
        }
    }
}

impl<T: AsyncWrite + Unpin> Coalesce<T> {
    /// Writes everything held.
    fn poll_send_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.held.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.held.clear();
        self.sent = 0;
        // A burst's buffer is not kept for an idle connection.
        if self.held.capacity() > HOLD_LIMIT {
            self.held = Vec::new();
        }
        Poll::Ready(Ok(()))
    }

    /// Makes room for `len` more bytes: sends what is held if they would not fit.
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<()>> {
        if !self.held.is_empty() && self.held.len() + len > HOLD_LIMIT {
            ready!(self.poll_send_held(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        ready!(this.poll_room(cx, len))?;
        if this.held.is_empty() && len >= HOLD_LIMIT {
            // Too large to be worth holding: it is a batch of its own.
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        for buf in bufs {
            this.held.extend_from_slice(buf);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.held.is_empty() && !this.yielded {
            this.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(this.poll_send_held(cx))?;
        this.yielded = false;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_held(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// Writes are held until a flush, which yields once and then sends them in one write; a
    /// shutdown sends what is held too.
    #[tokio::test]
    async fn writes_are_held_until_a_flush_and_leave_together() {
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let mut writer = Coalesce::new(near);
        writer.write_all(b"one ").await.unwrap();
        writer.write_all(b"two").await.unwrap();
        let mut got = [0u8; 16];
        let nothing_yet =
            tokio::time::timeout(std::time::Duration::from_millis(50), far.read(&mut got)).await;
        assert!(
            nothing_yet.is_err(),
            "a write reached the peer before a flush"
        );
        let yielded = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut writer).poll_flush(cx)))
            .await
            .is_pending();
        assert!(yielded, "the first flush of a batch yields");
        writer.flush().await.unwrap();
        let n = far.read(&mut got).await.unwrap();
        assert_eq!(&got[..n], b"one two");
        writer.write_all(b"three").await.unwrap();
        writer.shutdown().await.unwrap();
        let mut rest = Vec::new();
        far.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"three");
    }

    /// A write larger than the hold limit goes on at once, after what was held.
    #[tokio::test]
    async fn a_large_write_sends_what_is_held_first() {
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let mut writer = Coalesce::new(near);
        writer.write_all(b"head").await.unwrap();
        let large = vec![7u8; HOLD_LIMIT];
        writer.write_all(&large).await.unwrap();
        writer.flush().await.unwrap();
        let mut got = vec![0u8; 4 + HOLD_LIMIT];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..4], b"head");
        assert!(got[4..].iter().all(|&b| b == 7));
    }
}
