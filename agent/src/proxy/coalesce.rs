//! Writes gathered across the streams of a shared connection: the writing side of a tunnel
//! connection's client (`super::hbone`).
//!
//! Many client connections' requests share one tunnel connection, whose HTTP/2 connection
//! runs on a task of its own (with its streams, `super::streams`). A stream's data wakes that
//! task, and tokio runs a task woken by the running one next (its LIFO slot): so the tunnel's
//! task ran once per request, and each request left in a TLS write of its own, with every
//! other client connection ready to send queued behind it. [`Coalesce`] holds what the
//! connection writes until its flush, and its first flush of a batch yields once (the task
//! goes to the back of the run queue, [`Streams::yield_now`]): the client connections already
//! queued add their streams' data first, and the batch leaves in one TLS write. A task with
//! nothing queued behind it comes back at once, so an idle node adds only one task poll to a
//! request.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, BufWriter, ReadBuf};

use super::streams::Streams;

/// What is held at most: a larger write first sends what is held, and one this large goes on
/// at once. One TLS record's worth, so a batch is a record or a few.
const HOLD_LIMIT: usize = 16 * 1024;

/// An I/O whose writes are held until a flush, which yields once before it writes them.
pub struct Coalesce<T> {
    /// Holds the writes (up to [`HOLD_LIMIT`]) until a flush.
    inner: BufWriter<T>,
    /// The streams whose owner drives the connection: its task is the one that yields.
    owner: Streams,
    /// Whether this batch's flush has already yielded once.
    yielded: bool,
}

impl<T: AsyncWrite> Coalesce<T> {
    /// `inner` written by a connection that `owner`'s owner drives as one of its streams.
    pub fn new(inner: T, owner: Streams) -> Coalesce<T> {
        Coalesce {
            inner: BufWriter::with_capacity(HOLD_LIMIT, inner),
            owner,
            yielded: false,
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Coalesce<T> {
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
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.inner.buffer().is_empty() && !self.yielded {
            self.yielded = true;
            self.owner.yield_now(cx);
            return Poll::Pending;
        }
        ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
        self.yielded = false;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::super::streams::{self, Driven};
    use super::*;

    /// Writes are held until a flush, which yields once: they leave in the owner's next poll
    /// (not in the poll that flushed, though the owner's other streams are polled in it), in
    /// one write; a shutdown sends what is held too.
    #[tokio::test]
    async fn writes_are_held_until_a_flush_and_leave_in_the_owners_next_poll() {
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let owner = Streams::default();
        let mut writer = Coalesce::new(near, owner.clone());
        let (flushed_tx, flushed) = tokio::sync::oneshot::channel();
        owner.spawn(async move {
            writer.write_all(b"one ").await.unwrap();
            writer.write_all(b"two").await.unwrap();
            writer.flush().await.unwrap();
            let _ = flushed_tx.send(writer);
        });
        // Other streams of the same owner, waiting: the owner polls them beside the writer.
        let (end_tx, end) = tokio::sync::watch::channel(());
        for _ in 0..4 {
            let mut end = end.clone();
            owner.spawn(async move {
                let _ = end.changed().await;
            });
        }
        let mut driven = Driven::<()>::new(owner);
        let mut connection = std::pin::pin!(std::future::pending::<()>());
        let mut poll_owner = || {
            std::future::poll_fn(|cx| Poll::Ready(driven.poll(connection.as_mut(), cx)))
                .now_or_never()
                .expect("a poll_fn that is ready")
        };
        let mut got = [0u8; 16];
        assert!(poll_owner().is_pending());
        assert!(
            far.read(&mut got).now_or_never().is_none(),
            "the flush wrote in the owner's poll that began it"
        );
        assert!(poll_owner().is_pending());
        let n = far
            .read(&mut got)
            .now_or_never()
            .expect("written in the owner's next poll")
            .unwrap();
        assert_eq!(&got[..n], b"one two");
        let mut writer = flushed.now_or_never().expect("the flush ended").unwrap();
        end_tx.send(()).unwrap();
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
        let owner = Streams::default();
        let mut writer = Coalesce::new(near, owner.clone());
        let large = vec![7u8; HOLD_LIMIT];
        owner.spawn(async move {
            writer.write_all(b"head").await.unwrap();
            writer.write_all(&large).await.unwrap();
            writer.flush().await.unwrap();
        });
        streams::drive(owner, async {}).await;
        let mut got = vec![0u8; 4 + HOLD_LIMIT];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..4], b"head");
        assert!(got[4..].iter().all(|&b| b == 7));
    }
}
