//! The HTTP/2 streams of one client connection, run on that connection's task.
//!
//! hyper's HTTP/2 server hands every stream (the request's service future and the writing of
//! its response) to an executor. With tokio's, each stream is a task of its own, so a request
//! crosses from the connection's task to its stream's task and the response crosses back: two
//! wake-ups per request, often of the other core. [`Streams`] is the executor instead: it
//! keeps the streams, and the connection's task polls them beside the connection itself
//! ([`Streams::poll`]), as it polls its own upstream HTTP/1.1 connections (`pool::Local`).
//! A stream that waits for its upstream wakes the connection's task, which polls only the
//! streams that were woken (`FuturesUnordered`).
//!
//! One connection's streams then share one core, as in Envoy, where a connection and all its
//! streams live on one worker thread; connections still spread over the runtime's threads.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::StreamExt as _;
use futures::stream::FuturesUnordered;

type Stream = Pin<Box<dyn Future<Output = ()> + Send>>;

/// hyper's executor for one connection's streams, and the streams it was given.
#[derive(Clone, Default)]
pub struct Streams {
    /// Streams handed over since the last poll. hyper only starts one while the connection
    /// is polled, which [`Streams::poll`]'s caller does between two of its polls.
    new: Arc<Mutex<Vec<Stream>>>,
}

impl<F> hyper::rt::Executor<F> for Streams
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, stream: F) {
        self.new
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::pin(stream));
    }
}

/// The streams being run, owned by the connection's task.
#[derive(Default)]
pub struct Running(FuturesUnordered<Stream>);

impl Streams {
    /// Takes the streams started since the last call into `running` and polls every stream
    /// that is new or was woken, with the connection task's context. Ready when none is left.
    pub fn poll(&self, running: &mut Running, cx: &mut Context<'_>) -> Poll<()> {
        let new = std::mem::take(&mut *self.new.lock().unwrap_or_else(|e| e.into_inner()));
        running.0.extend(new);
        // Each stream runs to its end; `FuturesUnordered` polls the woken ones only, and
        // yields to the runtime (a wake-up of this task) after polling many in one go.
        while let Poll::Ready(Some(())) = running.0.poll_next_unpin(cx) {}
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
}
