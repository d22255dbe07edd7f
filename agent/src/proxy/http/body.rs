//! Bodies the HTTP proxy sends and returns.
//!
//! [`ReplayBody`] streams a client's request body upstream and keeps a copy of the first
//! [`REPLAY_LIMIT`] bytes, so a failed attempt can be retried with the same body. A body longer
//! than that is streamed without being kept (it never sits whole in the agent's memory), and the
//! request is then no longer retried: a request whose body has already streamed and cannot be
//! replayed is never retried.
//!
//! [`ResponseBody`] carries a response back to the client and enforces the route's per-request
//! deadline and idle timeout on it; it also holds what must live as long as the response (the
//! endpoint's in-flight count, the pooled connection) and the request's telemetry record,
//! which it tells about every frame and how the response ended.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::BodyExt as _;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use smallvec::SmallVec;
use tokio::time::{Instant, Sleep};

use crate::telemetry::request::Record;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How much of a request body is kept for retries (Envoy keeps a similar per-request buffer).
pub const REPLAY_LIMIT: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the route's per-request timeout ({0:?}) expired while the response was streaming")]
    Deadline(Duration),
    #[error("the response stalled for longer than the route's idle timeout ({0:?})")]
    Idle(Duration),
}

#[derive(Default)]
struct Shared {
    /// Where the bytes come from; None once it ended (or for an empty body).
    source: Option<Incoming>,
    /// The bytes read so far, while they fit in [`REPLAY_LIMIT`].
    chunks: Vec<Bytes>,
    len: usize,
    trailers: Option<HeaderMap>,
    done: bool,
    /// More than [`REPLAY_LIMIT`] was read: the copy is dropped and no replay is possible.
    overflow: bool,
    /// The reader in use; an earlier attempt's reader that is still polled (a connection task
    /// finishing a send) gets an error instead of stealing bytes from the current one.
    generation: u64,
    /// Reading the client's body failed (it closed early, or sent a broken chunk): whatever
    /// the upstream then did is the client's doing, not the upstream's.
    client_failed: bool,
    /// Bytes read from the client (the access log's `BYTES_RECEIVED`).
    read: u64,
}

/// A request body that can be sent again (see the module docs).
pub struct ReplayBody {
    shared: Arc<Mutex<Shared>>,
    /// The next chunk of `shared.chunks` this reader returns.
    pos: usize,
    trailers_sent: bool,
    generation: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("BUG: a superseded request body was read after a retry started")]
struct Superseded;

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ReplayBody {
    pub fn new(incoming: Incoming) -> ReplayBody {
        let done = incoming.is_end_stream();
        ReplayBody::with(Shared {
            source: (!done).then_some(incoming),
            done,
            ..Shared::default()
        })
    }

    pub fn empty() -> ReplayBody {
        ReplayBody::with(Shared {
            done: true,
            ..Shared::default()
        })
    }

    /// A body of known bytes (health-check requests).
    pub fn from_bytes(bytes: Bytes) -> ReplayBody {
        ReplayBody::with(Shared {
            len: bytes.len(),
            chunks: vec![bytes],
            done: true,
            ..Shared::default()
        })
    }

    fn with(shared: Shared) -> ReplayBody {
        ReplayBody {
            shared: Arc::new(Mutex::new(shared)),
            pos: 0,
            trailers_sent: false,
            generation: 0,
        }
    }

    /// A new reader from the first byte, unless the body was too long to keep.
    pub fn replay(&self) -> Option<ReplayBody> {
        let mut shared = lock(&self.shared);
        if shared.overflow {
            return None;
        }
        shared.generation += 1;
        Some(ReplayBody {
            shared: self.shared.clone(),
            pos: 0,
            trailers_sent: false,
            generation: shared.generation,
        })
    }

    /// Reading the client's body failed.
    pub fn client_failed(&self) -> bool {
        lock(&self.shared).client_failed
    }

    /// Bytes of the body read from the client so far were all kept (a retry is possible).
    pub fn replayable(&self) -> bool {
        !lock(&self.shared).overflow
    }

    /// A reader of how many body bytes came from the client so far.
    pub fn bytes_read(&self) -> Box<dyn Fn() -> u64 + Send> {
        let shared = self.shared.clone();
        Box::new(move || lock(&shared).read)
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let mut shared = lock(&this.shared);
        if this.generation != shared.generation {
            return Poll::Ready(Some(Err(Superseded.into())));
        }
        if this.pos < shared.chunks.len() {
            let chunk = shared.chunks[this.pos].clone();
            this.pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if shared.done {
            if !this.trailers_sent {
                this.trailers_sent = true;
                if let Some(trailers) = shared.trailers.clone() {
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
            }
            return Poll::Ready(None);
        }
        let Some(source) = shared.source.as_mut() else {
            shared.done = true;
            return Poll::Ready(None);
        };
        match Pin::new(source).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                shared.done = true;
                shared.source = None;
                this.trailers_sent = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(error))) => {
                shared.client_failed = true;
                Poll::Ready(Some(Err(error.into())))
            }
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    shared.read += data.len() as u64;
                    if !shared.overflow {
                        if shared.len + data.len() <= REPLAY_LIMIT {
                            shared.len += data.len();
                            shared.chunks.push(data.clone());
                            this.pos = shared.chunks.len();
                        } else {
                            // Stop keeping a copy: a long body streams through, unbuffered.
                            shared.overflow = true;
                            shared.chunks = Vec::new();
                            this.pos = 0;
                        }
                    }
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Err(frame) => match frame.into_trailers() {
                    Ok(trailers) => {
                        shared.trailers = Some(trailers.clone());
                        shared.done = true;
                        shared.source = None;
                        this.trailers_sent = true;
                        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                    }
                    // Neither data nor trailers: hyper has no such frame today; end the body.
                    Err(_) => Poll::Ready(None),
                },
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        let shared = lock(&self.shared);
        shared.done
            && self.pos >= shared.chunks.len()
            && (self.trailers_sent || shared.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        let shared = lock(&self.shared);
        if shared.done {
            let kept: usize = shared.chunks[self.pos.min(shared.chunks.len())..]
                .iter()
                .map(Bytes::len)
                .sum();
            return SizeHint::with_exact(kept as u64);
        }
        match (&shared.source, self.pos, shared.len) {
            (Some(source), 0, 0) => source.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

/// Something that must live until the response is done (dropped when it ends).
pub type Guard = Box<dyn Send>;

/// A response's guards: inline, since every proxied response has a few and this runs for
/// every request.
pub type Guards = SmallVec<[Guard; 4]>;

/// A frame read ahead by [`ResponseBody::prefetch`], not yet given out.
type Stashed = Option<Result<Frame<Bytes>, BoxError>>;

/// A response on its way to the client (see the module docs).
pub struct ResponseBody {
    inner: UnsyncBoxBody<Bytes, BoxError>,
    /// What [`ResponseBody::prefetch`] read; given out (and counted) by the next poll.
    stash: Option<Stashed>,
    /// The route's per-request deadline.
    deadline: Option<Timeout>,
    /// The route's idle timeout: how long the body may wait for its next frame.
    idle: Option<Timeout>,
    guards: Guards,
    record: Option<Box<Record>>,
}

/// One of a response body's timeouts. Its timer is made only when the body first has to wait
/// for its upstream: most bodies are ready with their head (a small response arrives in the
/// same read), and then no timer is made at all. A timer costs an allocation, a clock read,
/// and a locked insert into the runtime's timer wheel and a locked removal from it, per
/// response.
struct Timeout {
    /// How long; what the error says.
    limit: Duration,
    /// When it fires. Known from the start for a deadline; for an idle timeout, set from the
    /// clock when the body starts to wait after a frame (`None` until then).
    at: Option<Instant>,
    timer: Option<Pin<Box<Sleep>>>,
}

impl Timeout {
    fn deadline(limit: Duration, at: Instant) -> Timeout {
        Timeout {
            limit,
            at: Some(at),
            timer: None,
        }
    }

    fn idle(limit: Duration) -> Timeout {
        Timeout {
            limit,
            at: None,
            timer: None,
        }
    }

    /// A frame arrived: an idle timeout counts again from the body's next wait.
    fn restart(&mut self) {
        self.at = None;
    }

    /// Whether the timeout is due, arming its timer for `cx` if it is not.
    fn poll_due(&mut self, cx: &mut Context<'_>) -> bool {
        let at = match self.at {
            Some(at) => at,
            // Checked: an idle timeout past the clock's range never fires.
            None => match Instant::now().checked_add(self.limit) {
                Some(at) => *self.at.insert(at),
                None => return false,
            },
        };
        let timer = match &mut self.timer {
            Some(timer) => {
                if timer.deadline() != at {
                    timer.as_mut().reset(at);
                }
                timer
            }
            None => self.timer.insert(Box::pin(tokio::time::sleep_until(at))),
        };
        timer.as_mut().poll(cx).is_ready()
    }
}

impl ResponseBody {
    pub fn upstream(
        incoming: Incoming,
        deadline: Option<(Duration, Instant)>,
        idle: Option<Duration>,
        guards: Guards,
    ) -> ResponseBody {
        ResponseBody::streaming(
            incoming.map_err(BoxError::from).boxed_unsync(),
            deadline,
            idle,
            guards,
        )
    }

    fn streaming(
        inner: UnsyncBoxBody<Bytes, BoxError>,
        deadline: Option<(Duration, Instant)>,
        idle: Option<Duration>,
        guards: Guards,
    ) -> ResponseBody {
        ResponseBody {
            inner,
            deadline: deadline.map(|(limit, at)| Timeout::deadline(limit, at)),
            idle: idle.map(Timeout::idle),
            guards,
            record: None,
            stash: None,
        }
    }

    /// Reads the body's first frame ahead, so the response's head and its first bytes are
    /// written to the client together: hyper flushes the head alone when the body has no
    /// frame ready yet, which costs a write (and a wake-up of the client) per response. The
    /// frame is only kept: it is given out, counted and timed by the next poll like any
    /// other. The read ahead stops, keeping nothing, when the route's deadline or idle
    /// timeout is due (the next poll reports it).
    pub async fn prefetch(&mut self) {
        if self.stash.is_some() || self.inner.is_end_stream() {
            return;
        }
        let polled = std::future::poll_fn(|cx| {
            if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
                return Poll::Ready(Some(frame));
            }
            for timeout in [&mut self.deadline, &mut self.idle].into_iter().flatten() {
                if timeout.poll_due(cx) {
                    return Poll::Ready(None);
                }
            }
            Poll::Pending
        })
        .await;
        self.stash = polled;
    }

    /// Hands the request's telemetry record to the body: it is recorded when the body ends or
    /// is dropped.
    pub fn attach(&mut self, record: Box<Record>) {
        self.record = Some(record);
    }

    /// Keeps `guard` until the response is done.
    pub fn hold(&mut self, guard: Guard) {
        self.guards.push(guard);
    }

    /// A reply the agent makes itself.
    pub fn local(bytes: Bytes) -> ResponseBody {
        ResponseBody {
            inner: http_body_util::Full::new(bytes)
                .map_err(|never| match never {})
                .boxed_unsync(),
            deadline: None,
            idle: None,
            guards: Guards::new(),
            record: None,
            stash: None,
        }
    }

    /// A reply the agent makes itself that ends with trailers (a gRPC answer's `grpc-status`).
    pub fn local_with_trailers(bytes: Bytes, trailers: HeaderMap) -> ResponseBody {
        let body = http_body_util::Full::new(bytes)
            .map_err(|never| match never {})
            .with_trailers(async move { Some(Ok(trailers)) });
        ResponseBody {
            inner: body.boxed_unsync(),
            deadline: None,
            idle: None,
            guards: Guards::new(),
            record: None,
            stash: None,
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // hyper may drop a body it knows is complete without polling it to the end (a
        // content-length reached, an empty reply): that is an end, not a client going away.
        let ended = self.is_end_stream();
        if let Some(record) = self.record.as_mut()
            && ended
        {
            record.end();
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = match this.stash.take() {
            Some(stashed) => Poll::Ready(stashed),
            None => Pin::new(&mut this.inner).poll_frame(cx),
        };
        match polled {
            Poll::Ready(None) => {
                this.guards.clear();
                if let Some(mut record) = this.record.take() {
                    record.end();
                }
                Poll::Ready(None)
            }
            Poll::Ready(Some(frame)) => {
                if let Some(idle) = &mut this.idle {
                    idle.restart();
                }
                if let Some(record) = this.record.as_mut() {
                    match &frame {
                        Ok(frame) => {
                            if let Some(data) = frame.data_ref() {
                                record.data(data.len());
                            } else if let Some(trailers) = frame.trailers_ref() {
                                record.trailers(trailers);
                            }
                        }
                        Err(_) => {
                            record.upstream_failed();
                            this.record = None;
                        }
                    }
                }
                Poll::Ready(Some(frame))
            }
            Poll::Pending => {
                if let Some(deadline) = &mut this.deadline
                    && deadline.poll_due(cx)
                {
                    this.guards.clear();
                    if let Some(mut record) = this.record.take() {
                        record.timed_out("per_request", "UT");
                    }
                    return Poll::Ready(Some(Err(Error::Deadline(deadline.limit).into())));
                }
                if let Some(idle) = &mut this.idle
                    && idle.poll_due(cx)
                {
                    this.guards.clear();
                    if let Some(mut record) = this.record.take() {
                        // Envoy's stream idle timeout flag.
                        record.timed_out("idle", "SI");
                    }
                    return Poll::Ready(Some(Err(Error::Idle(idle.limit).into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.stash {
            Some(stashed) => stashed.is_none(),
            None => self.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.inner.size_hint();
        // A stashed frame's bytes are still to come.
        if let Some(Some(Ok(frame))) = &self.stash
            && let Some(data) = frame.data_ref()
        {
            let len = data.len() as u64;
            if let Some(upper) = hint.upper() {
                hint.set_upper(upper.saturating_add(len));
            }
            hint.set_lower(hint.lower().saturating_add(len));
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::StreamBody;

    use super::*;

    /// A body fed by a task that sends `frames` data frames, `every` apart, and then stalls
    /// (keeps the body open without sending) until the test ends.
    fn trickle(
        frames: usize,
        every: Duration,
    ) -> (UnsyncBoxBody<Bytes, BoxError>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        let sender = tokio::spawn(async move {
            for _ in 0..frames {
                tokio::time::sleep(every).await;
                if tx
                    .send(Ok(Frame::data(Bytes::from_static(b"x"))))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            std::future::pending::<()>().await;
        });
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|frame| (frame, rx))
        });
        (StreamBody::new(stream).boxed_unsync(), sender)
    }

    /// Reads `body` to its first error: the data frames before it, when each arrived, and
    /// the error.
    async fn read_to_error(body: &mut ResponseBody) -> (Vec<Instant>, BoxError) {
        let mut arrivals = Vec::new();
        loop {
            match body.frame().await {
                Some(Ok(_)) => arrivals.push(Instant::now()),
                Some(Err(error)) => return (arrivals, error),
                None => panic!("the body ended without an error"),
            }
        }
    }

    /// A timer for `limit` fired `elapsed` after it was set: not early, and late by no more
    /// than the runtime's timer resolution (1 ms ticks) allows.
    fn assert_fired_after(elapsed: Duration, limit: Duration) {
        assert!(
            elapsed >= limit && elapsed < limit + Duration::from_millis(5),
            "fired {elapsed:?} after it was set, for a limit of {limit:?}"
        );
    }

    /// Frames 600 ms apart keep a body with a 1 s idle timeout going for 3 s; once they stop,
    /// the body fails 1 s after the last one, and not before.
    #[tokio::test(start_paused = true)]
    async fn the_idle_timeout_counts_from_the_last_frame() {
        let (inner, sender) = trickle(5, Duration::from_millis(600));
        let idle = Duration::from_secs(1);
        let mut body = ResponseBody::streaming(inner, None, Some(idle), Guards::new());
        let (arrivals, error) = read_to_error(&mut body).await;
        assert_eq!(arrivals.len(), 5, "no frame was cut off");
        let last = *arrivals.last().unwrap();
        assert_fired_after(Instant::now() - last, idle);
        assert!(
            matches!(error.downcast_ref::<Error>(), Some(Error::Idle(d)) if *d == idle),
            "{error}"
        );
        sender.abort();
    }

    /// A body still streaming at the route's deadline is cut there, frames or not.
    #[tokio::test(start_paused = true)]
    async fn a_streaming_body_is_cut_at_the_deadline() {
        let (inner, sender) = trickle(10, Duration::from_millis(600));
        let started = Instant::now();
        let limit = Duration::from_secs(2);
        let deadline = Some((limit, started + limit));
        let mut body = ResponseBody::streaming(inner, deadline, None, Guards::new());
        let (arrivals, error) = read_to_error(&mut body).await;
        assert_eq!(
            arrivals.len(),
            3,
            "the frames before the deadline came through"
        );
        assert_fired_after(Instant::now() - started, limit);
        assert!(
            matches!(error.downcast_ref::<Error>(), Some(Error::Deadline(d)) if *d == limit),
            "{error}"
        );
        sender.abort();
    }

    /// A body that never waits makes no timer: the point of arming them lazily.
    #[tokio::test]
    async fn a_body_ready_with_its_head_makes_no_timer() {
        let inner = http_body_util::Full::new(Bytes::from_static(b"hello"))
            .map_err(|never| match never {})
            .boxed_unsync();
        let deadline = Some((
            Duration::from_secs(15),
            Instant::now() + Duration::from_secs(15),
        ));
        let mut body =
            ResponseBody::streaming(inner, deadline, Some(Duration::from_secs(5)), Guards::new());
        body.prefetch().await;
        let mut read = Vec::new();
        while let Some(frame) = body.frame().await {
            read.extend_from_slice(frame.expect("a frame").data_ref().expect("data"));
        }
        assert_eq!(read, b"hello");
        assert!(body.deadline.as_ref().is_some_and(|t| t.timer.is_none()));
        assert!(body.idle.as_ref().is_some_and(|t| t.timer.is_none()));
    }
}
