//! Writes gathered across the streams of a shared connection: the writing side of a tunnel
//! connection, on both ends (`super::hbone`).
//!
//! Many client connections' requests share one tunnel connection, whose HTTP/2 connection
//! runs on a task of its own (with its streams, `super::streams`). A stream's data wakes that
//! task, and tokio runs a task woken by the running one next (its LIFO slot): so the tunnel's
//! task ran once per request, and each request left in a TLS write of its own, with every
//! other client connection ready to send queued behind it. [`Coalesce`] holds what the
//! connection writes until its flush, and its first flush of a batch yields once, as
//! `tokio::task::yield_now` does: tokio runs the task again once the tasks already queued have
//! run and the worker has polled for I/O. So the client connections queued add their streams'
//! data first, and so do those whose sockets turned readable meanwhile (on the receiving
//! agent, the pods' answers to other streams), and the batch leaves in one TLS write. While a
//! yield added to the batch, the flush yields again ([`MAX_YIELDS`] in all): what ran in the
//! last yield may have made other senders ready, and they join too. A yield that added
//! nothing ends the batch.
//! A worker with nothing else to do polls for I/O without waiting and comes back at once, so
//! an idle node adds one task poll and one `epoll_wait` to a request.

use std::future::Future as _;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, BufWriter, ReadBuf};

/// What is held at most: a larger write first sends what is held, and one this large goes on
/// at once. One TLS record's worth, so a batch is a record or a few.
const HOLD_LIMIT: usize = 16 * 1024;

/// Yields one batch's flush takes at most. After the first, it yields again only while the
/// batch grew in its last yield: more senders were ready then, and more may be.
const MAX_YIELDS: u8 = 3;

/// An I/O whose writes are held until a flush, which yields before it writes them.
pub struct Coalesce<T> {
    /// Holds the writes (up to [`HOLD_LIMIT`]) until a flush.
    inner: BufWriter<T>,
    /// Yields this batch's flush has taken.
    yields: u8,
    /// What was held at the last of them (0 before the first).
    held_at_yield: usize,
}

impl<T: AsyncWrite> Coalesce<T> {
    /// `inner`, with its writes held until a flush.
    pub fn new(inner: T) -> Coalesce<T> {
        Coalesce {
            inner: BufWriter::with_capacity(HOLD_LIMIT, inner),
            yields: 0,
            held_at_yield: 0,
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
        // The first yield needs something held; each further one, a batch that grew.
        let held = self.inner.buffer().len();
        if self.yields < MAX_YIELDS && held > self.held_at_yield {
            self.yields += 1;
            self.held_at_yield = held;
            // tokio's yield, not a wake-up of our own: it runs the task again only after the
            // worker has polled for I/O, so data that arrived meanwhile joins this batch.
            let mut yielding = std::pin::pin!(tokio::task::yield_now());
            if yielding.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
        self.yields = 0;
        self.held_at_yield = 0;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use futures::FutureExt as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// Writes are held until a flush, which lets the tasks ready to run go first and then
    /// writes them in one write; a shutdown sends what is held too.
    #[tokio::test]
    async fn writes_are_held_until_a_flush_which_lets_ready_tasks_run_first() {
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let mut writer = Coalesce::new(near);
        writer.write_all(b"one ").await.unwrap();
        writer.write_all(b"two").await.unwrap();
        let mut got = [0u8; 16];
        assert!(
            far.read(&mut got).now_or_never().is_none(),
            "written before the flush"
        );
        // On this one-thread runtime, a task spawned here runs only when this one yields.
        let ran = Arc::new(AtomicBool::new(false));
        let flag = ran.clone();
        tokio::spawn(async move { flag.store(true, Ordering::SeqCst) });
        writer.flush().await.unwrap();
        assert!(
            ran.load(Ordering::SeqCst),
            "the flush wrote before the task ready to run had run"
        );
        let n = far
            .read(&mut got)
            .now_or_never()
            .expect("written by the flush")
            .unwrap();
        assert_eq!(&got[..n], b"one two");
        writer.write_all(b"three").await.unwrap();
        writer.shutdown().await.unwrap();
        let mut rest = Vec::new();
        far.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"three");
    }

    /// A flush whose batch grew while it yielded yields again, so what a task woken meanwhile
    /// sends joins too; one whose batch did not grow writes.
    #[tokio::test(flavor = "current_thread")]
    async fn a_flush_yields_again_while_its_batch_grows() {
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let writer = Arc::new(tokio::sync::Mutex::new(Coalesce::new(near)));
        writer.lock().await.write_all(b"one").await.unwrap();
        // Runs at the flush's first yield and adds to the batch, then yields itself and adds
        // more only after the flush has come back: in time only if the flush yields again.
        let sender = writer.clone();
        tokio::spawn(async move {
            sender.lock().await.write_all(b" two").await.unwrap();
            tokio::task::yield_now().await;
            sender.lock().await.write_all(b" three").await.unwrap();
        });
        // The flush holds no lock while it yields.
        std::future::poll_fn(|cx| {
            let mut writer = writer.try_lock().expect("not held across a yield");
            Pin::new(&mut *writer).poll_flush(cx)
        })
        .await
        .unwrap();
        let mut got = [0u8; 32];
        let n = far
            .read(&mut got)
            .now_or_never()
            .expect("written by the flush")
            .unwrap();
        assert_eq!(&got[..n], b"one two three");
    }

    /// A write larger than the hold limit goes on at once, after what was held.
    #[tokio::test]
    async fn a_large_write_sends_what_is_held_first() {
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let mut writer = Coalesce::new(near);
        let large = vec![7u8; HOLD_LIMIT];
        writer.write_all(b"head").await.unwrap();
        writer.write_all(&large).await.unwrap();
        writer.flush().await.unwrap();
        let mut got = vec![0u8; 4 + HOLD_LIMIT];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..4], b"head");
        assert!(got[4..].iter().all(|&b| b == 7));
    }
}
