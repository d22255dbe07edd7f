//! Copying an L4 connection both ways (a `tcp` listener's connection, a plaintext inbound
//! connection, a tunnel stream) through buffers that start small and grow while traffic fills
//! them.
//!
//! A fixed 64 KiB buffer per direction made every idle connection cost about 30 KiB of
//! resident memory (docs/benchmarks.md, "Scale"). Here each direction reads into
//! [`SIZES`]`[0]` bytes first; a read that fills its buffer moves the buffer one step up
//! (16 KiB, then 64 KiB, the size every direction had before), so a bulk transfer reaches the
//! large buffer after two full reads and a chatty connection keeps the small one. A larger
//! buffer replaces an empty one, except the first step: a read that fills the small buffer
//! moves its bytes to the next size at once and reads what else is ready, so a message a
//! little longer than the small buffer (a 1 KiB response with its head) leaves in one write.
//!
//! A direction waiting for bytes holds no buffer when its buffer is the small one, or when its
//! last read was smaller than that (a burst ended): an idle connection costs its task and its
//! sockets only. The small buffer is taken again on the next read (one allocation per wait,
//! far cheaper than the read itself); a bulk transfer, whose reads are large, keeps its buffer.
//!
//! Behaviour is [`tokio::io::copy_bidirectional`]'s: a direction that reads end of stream
//! shuts down the other side's writing half (half-close) and the other direction goes on; the
//! copy returns the byte counts of both directions once both have ended, or the first error of
//! either (an idle timeout inside a stream ends it that way). Written bytes are flushed before
//! a direction waits for more to read.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A direction's buffer sizes, smallest first: the first is what an idle connection holds.
pub const SIZES: [usize; 3] = [1024, 16 * 1024, 64 * 1024];

/// Copies `a` to `b` and `b` to `a` until both directions have ended; returns the bytes copied
/// from `a` to `b` and from `b` to `a`.
pub async fn bidirectional<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut a_to_b = Transfer::Running(Direction::new());
    let mut b_to_a = Transfer::Running(Direction::new());
    std::future::poll_fn(|cx| {
        let forth = a_to_b.poll(cx, &mut *a, &mut *b)?;
        let back = b_to_a.poll(cx, &mut *b, &mut *a)?;
        let forth = ready!(forth);
        let back = ready!(back);
        Poll::Ready(Ok((forth, back)))
    })
    .await
}

/// One direction's progress.
enum Transfer {
    Running(Direction),
    /// The reader ended; the writer's shutdown is under way.
    ShuttingDown(u64),
    Done(u64),
}

impl Transfer {
    fn poll<R, W>(&mut self, cx: &mut Context<'_>, r: &mut R, w: &mut W) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        loop {
            match self {
                Transfer::Running(direction) => {
                    let copied = ready!(direction.poll_copy(cx, r, w))?;
                    // The buffer goes now: a half-closed connection holds nothing for it.
                    *self = Transfer::ShuttingDown(copied);
                }
                Transfer::ShuttingDown(copied) => {
                    ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                    *self = Transfer::Done(*copied);
                }
                Transfer::Done(copied) => return Poll::Ready(Ok(*copied)),
            }
        }
    }
}

/// A direction's buffer and counters.
struct Direction {
    /// Empty while the direction waits with nothing to hold (see the module's doc).
    buf: Box<[u8]>,
    /// Index into [`SIZES`] of the buffer's size.
    step: usize,
    /// `buf[pos..cap]` is read and not yet written.
    pos: usize,
    cap: usize,
    /// The last read filled the buffer: the next one gets a larger buffer.
    grow: bool,
    /// Bytes of the last read.
    last_read: usize,
    read_done: bool,
    need_flush: bool,
    copied: u64,
}

impl Direction {
    fn new() -> Direction {
        Direction {
            buf: Box::default(),
            step: 0,
            pos: 0,
            cap: 0,
            grow: false,
            last_read: 0,
            read_done: false,
            need_flush: false,
            copied: 0,
        }
    }

    /// The small buffer was filled: the message read may be longer than it (a 1 KiB response
    /// and its head are). Moves to the next size at once and reads what else is ready, so the
    /// message leaves in one write rather than two (each write is a segment, or a tunnel DATA
    /// frame, and a wake-up of the reader on the other side). What the read finds is counted as
    /// the last read; when nothing more is ready the direction goes on as before.
    fn read_rest_of_message<R>(&mut self, cx: &mut Context<'_>, r: &mut R) -> io::Result<()>
    where
        R: AsyncRead + Unpin + ?Sized,
    {
        self.grow = false;
        self.step += 1;
        let mut bigger = vec![0; SIZES[self.step]].into_boxed_slice();
        bigger[..self.cap].copy_from_slice(&self.buf[..self.cap]);
        self.buf = bigger;
        let mut read = ReadBuf::new(&mut self.buf[self.cap..]);
        match Pin::new(&mut *r).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) => {
                let n = read.filled().len();
                if n == 0 {
                    // End of stream: what was read is written, then the direction ends.
                    self.read_done = true;
                } else {
                    self.last_read = n;
                    self.cap += n;
                    self.grow = self.cap == self.buf.len() && self.step + 1 < SIZES.len();
                }
                Ok(())
            }
            Poll::Ready(Err(error)) => Err(error),
            Poll::Pending => Ok(()),
        }
    }

    /// Copies until `r` ends and everything read is written and flushed; returns the count.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        loop {
            if self.pos == self.cap && !self.read_done {
                if self.grow {
                    self.grow = false;
                    self.step += 1;
                    self.buf = Box::default();
                }
                if self.buf.is_empty() {
                    self.buf = vec![0; SIZES[self.step]].into_boxed_slice();
                }
                let mut read = ReadBuf::new(&mut self.buf);
                match Pin::new(&mut *r).poll_read(cx, &mut read) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                    Poll::Pending => {
                        // Nothing more to read for now: what was written must not wait in
                        // the writer (a TLS stream's record, for one) until more comes.
                        if self.step == 0 || self.last_read < SIZES[0] {
                            self.step = 0;
                            self.buf = Box::default();
                        }
                        if self.need_flush {
                            ready!(Pin::new(&mut *w).poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
                let n = read.filled().len();
                self.last_read = n;
                if n == 0 {
                    self.read_done = true;
                } else {
                    self.pos = 0;
                    self.cap = n;
                    self.grow = n == self.buf.len() && self.step + 1 < SIZES.len();
                    if self.grow && self.step == 0 {
                        self.read_rest_of_message(cx, r)?;
                    }
                }
            }
            while self.pos < self.cap {
                let n = ready!(Pin::new(&mut *w).poll_write(cx, &self.buf[self.pos..self.cap]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "the other side accepted no more bytes",
                    )));
                }
                self.pos += n;
                self.copied += n as u64;
                self.need_flush = true;
            }
            if self.read_done {
                ready!(Pin::new(&mut *w).poll_flush(cx))?;
                return Poll::Ready(Ok(self.copied));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// Both directions, with a half-close each way: the counts are the bytes sent.
    #[tokio::test]
    async fn copies_both_ways_and_half_closes() {
        let (mut client, mut near) = tokio::io::duplex(8 * 1024);
        let (mut far, mut server) = tokio::io::duplex(8 * 1024);
        let copy = tokio::spawn(async move { bidirectional(&mut near, &mut far).await });
        let up: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let down: Vec<u8> = (0..70_001u32).map(|i| (i * 7) as u8).collect();
        let down2 = down.clone();
        let server_side = tokio::spawn(async move {
            let mut got = Vec::new();
            // The client's shutdown reaches the server as end of stream (half-close) ...
            server.read_to_end(&mut got).await.unwrap();
            // ... and the server can still answer.
            server.write_all(&down2).await.unwrap();
            server.shutdown().await.unwrap();
            got
        });
        client.write_all(&up).await.unwrap();
        client.shutdown().await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(server_side.await.unwrap(), up);
        assert_eq!(answer, down);
        let counts = copy.await.unwrap().unwrap();
        assert_eq!(counts, (up.len() as u64, down.len() as u64));
    }

    /// An error on either side ends the copy with it.
    #[tokio::test]
    async fn an_error_ends_the_copy() {
        let (_client, mut near) = tokio::io::duplex(1024);
        let (far, _server) = tokio::io::duplex(1024);
        let mut far = Failing(far);
        let error = bidirectional(&mut near, &mut far).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
    }

    /// A stream whose reads fail.
    struct Failing(tokio::io::DuplexStream);

    impl AsyncRead for Failing {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
        }
    }

    impl AsyncWrite for Failing {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    /// Copies `data` in reads of at most `max` bytes; returns the buffer sizes seen between
    /// reads (0: no buffer held while waiting).
    fn sizes_while_copying(data: &[u8], max: usize) -> Vec<usize> {
        let mut cx = Context::from_waker(Waker::noop());
        let mut direction = Direction::new();
        let mut reader = Messages {
            messages: data.chunks(max).map(<[u8]>::to_vec).collect(),
            pause_after_every_read: true,
            pause: false,
        };
        let mut sink = Vec::new();
        let mut sizes = vec![];
        for _ in 0..100_000 {
            match direction.poll_copy(&mut cx, &mut reader, &mut sink) {
                Poll::Pending if sizes.last() != Some(&direction.buf.len()) => {
                    sizes.push(direction.buf.len());
                }
                Poll::Pending => {}
                Poll::Ready(copied) => {
                    assert_eq!(copied.unwrap(), data.len() as u64);
                    assert_eq!(sink, data);
                    return sizes;
                }
            }
        }
        panic!("the copy did not end");
    }

    /// Small reads keep the small buffer, and none is held while waiting; reads that fill it
    /// grow it step by step to the largest size and no further, and a bulk transfer keeps its
    /// buffer while it waits.
    #[test]
    fn the_buffer_grows_only_when_reads_fill_it() {
        let chatty = vec![1u8; 10_000];
        assert_eq!(sizes_while_copying(&chatty, 100), vec![0]);
        assert_eq!(sizes_while_copying(&chatty, SIZES[0] - 1), vec![0]);
        // (This reader pauses after every read: the read that fills the small buffer finds
        // nothing more at once, and the next fills the middle one.)
        let bulk: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(sizes_while_copying(&bulk, usize::MAX), vec![SIZES[2]]);
        // A burst that ends with a short read: the large buffer goes while the reader waits.
        let burst = vec![3u8; SIZES[0] + SIZES[1] + SIZES[2] + 10];
        assert_eq!(sizes_while_copying(&burst, usize::MAX), vec![SIZES[2], 0]);
    }

    /// Messages that arrive whole (each readable at once, a `Pending` between them); or, with
    /// `pause_after_every_read`, a `Pending` after every read (so a test sees the buffer
    /// between reads).
    struct Messages {
        messages: std::collections::VecDeque<Vec<u8>>,
        pause_after_every_read: bool,
        pause: bool,
    }

    impl AsyncRead for Messages {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if std::mem::take(&mut self.pause) {
                return Poll::Pending;
            }
            let Some(message) = self.messages.front_mut() else {
                return Poll::Ready(Ok(()));
            };
            let n = message.len().min(buf.remaining());
            buf.put_slice(&message[..n]);
            message.drain(..n);
            if message.is_empty() {
                self.messages.pop_front();
                self.pause = true;
            }
            self.pause |= self.pause_after_every_read;
            Poll::Ready(Ok(()))
        }
    }

    /// A writer that records the length of every write.
    #[derive(Default)]
    struct Writes(Vec<usize>);

    impl AsyncWrite for Writes {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.0.push(buf.len());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A message a little longer than the small buffer (a 1 KiB response and its head) leaves
    /// in one write, and no buffer is held after it.
    #[test]
    fn a_message_longer_than_the_small_buffer_leaves_in_one_write() {
        let lengths = [1260, 1260, 100, SIZES[0], SIZES[0] + 1, 5000];
        let mut reader = Messages {
            messages: lengths.iter().map(|&n| vec![7u8; n]).collect(),
            pause_after_every_read: false,
            pause: false,
        };
        let mut writer = Writes::default();
        let mut direction = Direction::new();
        let mut cx = Context::from_waker(Waker::noop());
        let mut waiting_with = Vec::new();
        for _ in 0..1_000 {
            match direction.poll_copy(&mut cx, &mut reader, &mut writer) {
                Poll::Pending => waiting_with.push(direction.buf.len()),
                Poll::Ready(copied) => {
                    assert_eq!(copied.unwrap(), lengths.iter().sum::<usize>() as u64);
                    break;
                }
            }
        }
        assert_eq!(writer.0, lengths, "one write per message");
        // After each of the first three messages (whose last read was short) the direction
        // waits holding nothing; after a read that ended on a full buffer it keeps the next
        // size, as a bulk transfer does.
        assert_eq!(
            waiting_with[..3],
            [0, 0, 0],
            "no buffer held after short messages: {waiting_with:?}"
        );
    }
}
