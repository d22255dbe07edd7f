//! Futures of one connection run on that connection's own task: an HTTP/2 connection's
//! streams, and what each stream goes on to do.
//!
//! hyper's HTTP/2 server hands every stream (the request's service future and the writing of
//! its response) to an executor. With tokio's, each stream is a task of its own, so a request
//! crosses from the connection's task to its stream's task and the response crosses back: two
//! wake-ups per request, often of the other core. [`Streams`] is the executor instead: it
//! keeps the streams, and the connection's task polls them beside the connection itself
//! ([`Driven::poll`]). A stream that waits for its upstream wakes the connection's task,
//! which polls only the streams that were woken (`FuturesUnordered`).
//!
//! Three server connections use it: a client's HTTP connection (`proxy::http`, where the task
//! also drives its own upstream HTTP/1.1 connections); a tunnel connection from another node's
//! agent (`proxy::hbone`), whose streams' copies to the pod ([`Streams::spawn`]) run there too,
//! so bytes go from the tunnel's TLS connection to the pod and back without a hand-off; and a
//! connection served by a listener's admission gate (`proxy::admission`).
//!
//! Two client connections use it too ([`drive`]): an upstream HTTP/2 connection
//! (`proxy::http::pool`) and a tunnel connection to another node's agent (`proxy::hbone`).
//! hyper's HTTP/2 client runs the connection's I/O, each request's wait for its response and
//! each CONNECT stream's sending side as futures of their own; with tokio's executor each was
//! a task, so a request crossed from the task that handed it over to the dispatching task, to
//! the I/O task, and its response to a waiting task before it reached the caller. Driven here,
//! they all run on the connection's one task: a request crosses once each way.
//!
//! One connection's streams then share one core, as in Envoy, where a connection and all its
//! streams live on one worker thread; connections still spread over the runtime's threads.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures::StreamExt as _;
use futures::stream::FuturesUnordered;

type Stream = Pin<Box<dyn Future<Output = ()> + Send>>;

/// hyper's executor for one connection's streams, and the streams it was given.
#[derive(Clone, Default)]
pub struct Streams {
    /// Futures handed over since they were last taken. They are only handed over while the
    /// owner polls (hyper starts a stream while the connection is polled; a stream spawns
    /// while it is polled), and [`Streams::poll`] takes them until none is left.
    new: Arc<Mutex<Vec<Stream>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<F> hyper::rt::Executor<F> for Streams
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, stream: F) {
        self.spawn(stream);
    }
}

/// The futures being run, owned by the connection's task.
#[derive(Default)]
struct Running(FuturesUnordered<Stream>);

/// A connection driven together with its streams on its task: what a connection's poll calls
/// ([`Driven::poll`]). Its end waits for its streams, so a stream still answering is not cut.
pub struct Driven<T> {
    streams: Streams,
    running: Running,
    /// The connection's result, once it has ended, until its streams have too.
    served: Option<T>,
}

impl<T> Driven<T> {
    /// Drives the streams `streams` (the connection's executor) is given.
    pub fn new(streams: Streams) -> Driven<T> {
        Driven {
            streams,
            running: Running::default(),
            served: None,
        }
    }

    /// Polls the streams, the connection (until it has ended) and the streams again: bytes a
    /// stream wrote leave in the connection's poll that follows, and what the connection read
    /// reaches its stream in the same poll. Ready with the connection's result once it and
    /// every stream have ended.
    pub fn poll<C>(&mut self, connection: Pin<&mut C>, cx: &mut Context<'_>) -> Poll<T>
    where
        C: Future<Output = T>,
    {
        let _ = self.streams.poll(&mut self.running, cx);
        if self.served.is_none()
            && let Poll::Ready(result) = connection.poll(cx)
        {
            self.served = Some(result);
        }
        let streams_done = self.streams.poll(&mut self.running, cx).is_ready();
        match self.served.take() {
            Some(result) if streams_done => Poll::Ready(result),
            pending => {
                self.served = pending;
                Poll::Pending
            }
        }
    }
}

/// Drives `connection` and the futures `streams` (its executor) is given on the calling task,
/// until the connection and every one of them have ended.
pub async fn drive<C: Future>(streams: Streams, connection: C) -> C::Output {
    let mut driven = Driven::new(streams);
    let mut connection = std::pin::pin!(connection);
    std::future::poll_fn(|cx| driven.poll(connection.as_mut(), cx)).await
}

impl Streams {
    /// Runs `future` on the owner's task. Call it only from code the owner polls (see `new`).
    pub fn spawn(&self, future: impl Future<Output = ()> + Send + 'static) {
        lock(&self.new).push(Box::pin(future));
    }

    /// Takes the futures handed over into `running` and polls every one that is new or was
    /// woken, with the owner task's context, until none is new. Ready when none is left.
    fn poll(&self, running: &mut Running, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let new = std::mem::take(&mut *lock(&self.new));
            let none_new = new.is_empty();
            running.0.extend(new);
            // `FuturesUnordered` polls the woken ones only, and yields to the runtime (a
            // wake-up of this task) after polling many in one go.
            while let Poll::Ready(Some(())) = running.0.poll_next_unpin(cx) {}
            if none_new && lock(&self.new).is_empty() {
                break;
            }
        }
        if running.0.is_empty() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use hyper::rt::Executor as _;

    use super::*;

    /// A stream handed over is polled by the owner's poll, and a woken one again, on the
    /// owner's task; the poll is ready once every stream has ended.
    #[tokio::test]
    async fn streams_run_on_the_polling_task_until_they_end() {
        let streams = Streams::default();
        let mut running = Running::default();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let polled = Arc::new(AtomicUsize::new(0));
        let counter = polled.clone();
        streams.execute(async move {
            counter.fetch_add(1, Ordering::SeqCst);
            let _ = rx.await;
            counter.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(polled.load(Ordering::SeqCst), 0, "nothing runs on its own");
        let pending = std::future::poll_fn(|cx| Poll::Ready(streams.poll(&mut running, cx))).await;
        assert!(pending.is_pending());
        assert_eq!(polled.load(Ordering::SeqCst), 1);
        tx.send(()).unwrap();
        // The stream's wake-up wakes this task: the poll below finishes it.
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            std::future::poll_fn(|cx| streams.poll(&mut running, cx)),
        )
        .await
        .expect("the woken stream ran to its end");
        assert_eq!(polled.load(Ordering::SeqCst), 2);
    }

    /// A future a stream spawns while it is polled runs in that same poll, not at some later
    /// wake-up that may never come.
    #[tokio::test]
    async fn a_future_spawned_by_a_stream_runs_in_the_same_poll() {
        let streams = Streams::default();
        let mut running = Running::default();
        let ran = Arc::new(AtomicUsize::new(0));
        let (spawner, counter) = (streams.clone(), ran.clone());
        streams.spawn(async move {
            spawner.spawn(async move {
                counter.fetch_add(1, Ordering::SeqCst);
            });
        });
        let done = std::future::poll_fn(|cx| Poll::Ready(streams.poll(&mut running, cx))).await;
        assert!(done.is_ready(), "both ended in one poll");
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }
}
