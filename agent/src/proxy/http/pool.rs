//! Pooled upstream connections for the HTTP proxy.
//!
//! HTTP/1.1: idle keep-alive connections per endpoint, one request at a time each; a connection
//! goes back to the pool when its response body has been read to the end. HTTP/2 (prior
//! knowledge, for http2 and grpc listeners): one multiplexed connection per endpoint. Every
//! connection is opened through [`upstream::connect`], the one seam for leaving the agent (it
//! decides between a direct connection and a tunnel to another node).
//!
//! A connection over a tunnel whose peer agent drains (it said GOAWAY) finishes what it carries
//! and takes no new request: the peer closes the tunnel stream at its drain timeout, and a
//! request sent on it just then would be lost.
//!
//! A request that a pooled connection could not even start to send (the upstream had closed the
//! idle connection) is sent again on a new connection; that is not a retry in App Mesh's sense.
//!
//! An HTTP/1.1 client connection keeps its own upstream connections ([`Local`]) and drives them
//! on its own task: the request, the upstream's answer and the response body then never cross
//! to another task, whose wake-up would often be on the other core (docs/benchmarks.md,
//! "Where an L7 request's time goes"). They are reused by that client connection's next
//! requests, and join the shared pool when it closes or has left them idle for
//! [`LOCAL_IDLE_KEEP`]. A connection in the shared pool is
//! driven by a task of its own while it waits there ([`Home`]); a client connection that takes
//! it takes its driver too, so its requests on it stay on the client connection's task.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};

use super::body::{Guard, ReplayBody};
use crate::mesh::ResourceId;
use crate::proxy::streams::{self, Streams};
use crate::proxy::upstream;

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An idle HTTP/1.1 connection older than this is closed rather than reused (upstreams commonly
/// close theirs after 60-120 s; reusing one they are closing costs a failed send).
const IDLE_MAX_AGE: Duration = Duration::from_secs(60);
/// Idle HTTP/1.1 connections kept per endpoint.
const IDLE_MAX_PER_ENDPOINT: usize = 64;
/// Times a request is re-sent on a fresh connection because a pooled one was found closed.
const STALE_RETRIES: usize = 3;

/// Which HTTP the endpoint speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Http1,
    Http2,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connect to {endpoint} failed")]
    Connect {
        endpoint: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP handshake with {endpoint} failed")]
    Handshake {
        endpoint: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("{endpoint} did not answer")]
    Request {
        endpoint: SocketAddr,
        #[source]
        source: hyper::Error,
    },
}

impl Error {
    /// Nothing reached the upstream application: App Mesh's `connection-error`.
    pub fn is_connect(&self) -> bool {
        matches!(self, Error::Connect { .. } | Error::Handshake { .. })
    }

    /// The HTTP/2 upstream did not process the stream: it refused it (REFUSED_STREAM), or it
    /// was draining and its GOAWAY left the stream out (see [`never_processed`]).
    pub fn is_refused_stream(&self) -> bool {
        let Error::Request { source, .. } = self else {
            return false;
        };
        never_processed(source)
    }
}

/// Whether an HTTP/2 request failed in a way that proves the server never processed it:
/// REFUSED_STREAM, or the stream fell above the last stream id of the server's graceful
/// GOAWAY (NO_ERROR; RFC 9113 section 6.8: such streams were not processed and may be sent
/// again on another connection). A peer agent that drains says GOAWAY; requests caught
/// between its GOAWAY and our seeing it are sent again instead of failing.
pub fn never_processed(error: &hyper::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = cause {
        if let Some(h2) = error.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away()
                    && h2.is_remote()
                    && h2.reason() == Some(h2::Reason::NO_ERROR));
        }
        cause = error.source();
    }
    false
}

/// An HTTP/1.1 connection, and whether the way under it is going away (a tunnel whose peer
/// agent drains: the connection finishes its request and is not reused, so no request is sent
/// on it just as the peer closes the tunnel stream at its drain timeout).
struct Http1 {
    sender: http1::SendRequest<ReplayBody>,
    going_away: Option<upstream::GoingAway>,
    /// Where its driver is while no client connection drives it.
    home: Arc<Home>,
}

impl Http1 {
    fn reusable(&self) -> bool {
        self.sender.is_ready()
            && !self.sender.is_closed()
            && self.going_away.as_ref().is_none_or(|gone| !gone())
    }
}

/// An HTTP/2 connection (see [`Http1`] for `going_away`).
struct Http2 {
    sender: http2::SendRequest<ReplayBody>,
    going_away: Option<upstream::GoingAway>,
}

/// An idle HTTP/1.1 connection and when it became idle.
type Idle = (Instant, Http1);

/// Pooled connections belong to one caller identity and one endpoint: through an mTLS
/// tunnel the connection carries the calling workload's certificate, so it must never serve
/// another virtual node's requests.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    /// Shared: the key is cloned for every request and every connection given back.
    pub source: Arc<ResourceId>,
    pub endpoint: SocketAddr,
}

/// Opens a new upstream stream for the pool (see `upstream::dial`).
pub type Dial<'a> =
    &'a (dyn Fn() -> BoxFuture<'a, std::io::Result<upstream::Stream>> + Send + Sync);

#[derive(Default)]
pub struct Pool {
    idle: Mutex<HashMap<Key, Vec<Idle>>>,
    multiplexed: Mutex<HashMap<Key, Http2>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Pool {
    /// Sends `request` (URI in origin form for HTTP/1.1, absolute for HTTP/2) to `endpoint`.
    /// The guard returned must live until the response body is done (it gives an HTTP/1.1
    /// connection back to the pool). An HTTP/1.1 request of a client connection that has
    /// `local` connections uses one of those first, then one of the shared pool's; a new
    /// connection joins `local`.
    ///
    /// Every request builds this future and copies it whole into the box `Downstream::forward`
    /// (proxy/http.rs) keeps it in; a profile of the L7 path found such copies of futures a
    /// large part of the agent's memory copying. What only a new connection needs is boxed
    /// here, so the future is only as large as what every request needs.
    pub async fn send(
        self: &Arc<Self>,
        key: &Key,
        dial: Dial<'_>,
        proto: Proto,
        local: Option<&Arc<Local>>,
        mut request: Request<ReplayBody>,
    ) -> Result<(Response<Incoming>, Option<Guard>), Error> {
        let endpoint = key.endpoint;
        for _ in 0..STALE_RETRIES {
            match proto {
                Proto::Http1 => {
                    let taken = match local.and_then(|local| Some((local, local.take_idle(key)?))) {
                        Some((local, (connection, id))) => {
                            Some((connection, Some((local.clone(), id))))
                        }
                        // From the shared pool: this client connection drives it from now on.
                        None => self.take_idle(key).map(|connection| {
                            let owner = local
                                .and_then(|local| Some((local.clone(), local.adopt(&connection)?)));
                            (connection, owner)
                        }),
                    };
                    let (mut connection, owner, reused) = match taken {
                        Some((connection, owner)) => (connection, owner, true),
                        None => {
                            // Boxed, as the HTTP/2 connect below: a new connection is rare, and
                            // its future inline would grow every request's future (see `send`).
                            let (connection, driver) =
                                Box::pin(self.connect_http1(endpoint, dial)).await?;
                            let owner = match local {
                                Some(local) => match local.drive(driver, &connection.home) {
                                    Ok(id) => Some((local.clone(), id)),
                                    Err(driver) => {
                                        connection.home.park(driver);
                                        None
                                    }
                                },
                                None => {
                                    connection.home.park(driver);
                                    None
                                }
                            };
                            (connection, owner, false)
                        }
                    };
                    match connection.sender.try_send_request(request).await {
                        Ok(response) => {
                            let back = PoolReturn {
                                pool: self.clone(),
                                local: owner,
                                key: key.clone(),
                                connection: Some(connection),
                            };
                            return Ok((response, Some(Box::new(back))));
                        }
                        Err(mut error) => match error.take_message() {
                            Some(unsent) if reused => request = unsent,
                            _ => {
                                return Err(Error::Request {
                                    endpoint,
                                    source: error.into_error(),
                                });
                            }
                        },
                    }
                }
                Proto::Http2 => {
                    // One whose tunnel is going away keeps its streams but takes no new one.
                    let cached = lock(&self.multiplexed)
                        .get(key)
                        .filter(|c| {
                            !c.sender.is_closed() && c.going_away.as_ref().is_none_or(|g| !g())
                        })
                        .map(|c| c.sender.clone());
                    let (mut sender, reused) = match cached {
                        Some(sender) => (sender, true),
                        None => {
                            let connection = Box::pin(self.connect_http2(endpoint, dial)).await?;
                            let sender = connection.sender.clone();
                            lock(&self.multiplexed).insert(key.clone(), connection);
                            (sender, false)
                        }
                    };
                    if sender.ready().await.is_err() {
                        lock(&self.multiplexed).remove(key);
                        continue;
                    }
                    match sender.try_send_request(request).await {
                        Ok(response) => return Ok((response, None)),
                        Err(mut error) => match error.take_message() {
                            Some(unsent) if reused => {
                                lock(&self.multiplexed).remove(key);
                                request = unsent;
                            }
                            _ => {
                                return Err(Error::Request {
                                    endpoint,
                                    source: error.into_error(),
                                });
                            }
                        },
                    }
                }
            }
        }
        // Every pooled connection we found was closed; the last attempt used a new one, so
        // this is only reached when HTTP/2 readiness kept failing.
        Err(Error::Connect {
            endpoint,
            source: std::io::Error::other("the upstream kept closing new connections"),
        })
    }

    fn take_idle(&self, key: &Key) -> Option<Http1> {
        let mut idle = lock(&self.idle);
        let list = idle.get_mut(key)?;
        while let Some((since, connection)) = list.pop() {
            if since.elapsed() < IDLE_MAX_AGE && connection.reusable() {
                return Some(connection);
            }
        }
        None
    }

    /// Keeps `connection` for another request if it is ready for one now (a connection still
    /// finishing a response is dropped).
    fn give_back_if_ready(&self, key: Key, connection: Http1) {
        if connection.sender.is_ready() {
            self.give_back(key, connection);
        }
    }

    fn give_back(&self, key: Key, connection: Http1) {
        if connection.going_away.as_ref().is_some_and(|gone| gone()) {
            return;
        }
        let mut idle = lock(&self.idle);
        let list = idle.entry(key).or_default();
        if list.len() < IDLE_MAX_PER_ENDPOINT {
            list.push((Instant::now(), connection));
        }
    }

    /// Forgets the connections to endpoints that are no longer in the mesh.
    pub fn retain(&self, keep: impl Fn(&SocketAddr) -> bool) {
        lock(&self.idle).retain(|key, _| keep(&key.endpoint));
        lock(&self.multiplexed).retain(|key, _| keep(&key.endpoint));
    }

    /// Opens an HTTP/1.1 connection; the future returned drives it, and must be polled by a
    /// task (a [`Local`]'s client connection's, or its own at its [`Home`]).
    async fn connect_http1(
        &self,
        endpoint: SocketAddr,
        dial: Dial<'_>,
    ) -> Result<(Http1, Driver), Error> {
        let stream = dial()
            .await
            .map_err(|source| Error::Connect { endpoint, source })?;
        let going_away = stream.going_away.clone();
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| Error::Handshake { endpoint, source })?;
        let driver = Box::pin(async move {
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(%endpoint, error = %crate::logging::Chain(&error), "upstream HTTP/1.1 connection ended");
            }
        });
        let home = Arc::default();
        Ok((
            Http1 {
                sender,
                going_away,
                home,
            },
            driver,
        ))
    }

    async fn connect_http2(&self, endpoint: SocketAddr, dial: Dial<'_>) -> Result<Http2, Error> {
        let stream = dial()
            .await
            .map_err(|source| Error::Connect { endpoint, source })?;
        let going_away = stream.going_away.clone();
        // The connection's I/O and its requests' waits run on one task (see `streams`).
        let streams = Streams::default();
        let (sender, connection) = http2::Builder::new(streams.clone())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| Error::Handshake { endpoint, source })?;
        tokio::spawn(async move {
            if let Err(error) = streams::drive(streams, connection).await {
                tracing::debug!(%endpoint, error = %crate::logging::Chain(&error), "upstream HTTP/2 connection ended");
            }
        });
        Ok(Http2 { sender, going_away })
    }
}

/// The future that drives one upstream HTTP/1.1 connection until it closes.
type Driver = Pin<Box<dyn Future<Output = ()> + Send>>;

/// An HTTP/1.1 connection's driver while no client connection drives it: a task of its own
/// polls it here ([`Home::park`]) until a client connection takes it ([`Local::adopt`]) or
/// the connection ends. Without this, a client connection that found a connection in the
/// shared pool would send every request on it through that other task (measured: half of a
/// benchmark's requests did, when its client connections found the pool stocked).
#[derive(Default)]
struct Home {
    parked: Mutex<Parked>,
}

#[derive(Default)]
struct Parked {
    driver: Option<Driver>,
    /// The parking task, woken when the driver is taken away so that it ends.
    waker: Option<Waker>,
    /// Counts parkings: a task whose driver was taken and parked again before it noticed
    /// ends rather than poll the driver beside the new one.
    parkings: u64,
}

impl Home {
    /// Keeps `driver` here, polled by a new task of its own.
    fn park(self: &Arc<Self>, driver: Driver) {
        let (parking, earlier) = {
            let mut parked = lock(&self.parked);
            parked.driver = Some(driver);
            parked.parkings += 1;
            (parked.parkings, parked.waker.take())
        };
        // A task of an earlier parking that has not noticed yet: it ends now.
        if let Some(earlier) = earlier {
            earlier.wake();
        }
        let home = self.clone();
        tokio::spawn(std::future::poll_fn(move |cx| {
            let mut parked = lock(&home.parked);
            if parked.parkings != parking {
                return Poll::Ready(());
            }
            let Some(driver) = parked.driver.as_mut() else {
                // Taken by a client connection.
                return Poll::Ready(());
            };
            if driver.as_mut().poll(cx).is_ready() {
                parked.driver = None;
                return Poll::Ready(());
            }
            if !parked
                .waker
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                parked.waker = Some(cx.waker().clone());
            }
            Poll::Pending
        }));
    }

    /// Takes the driver from its task, which then ends; None if the connection has ended.
    fn take(&self) -> Option<Driver> {
        let (driver, waker) = {
            let mut parked = lock(&self.parked);
            (parked.driver.take(), parked.waker.take())
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        driver
    }
}

/// One HTTP/1.1 client connection's own upstream connections (see the module's doc): the
/// client connection's task polls them ([`Local::poll_connections`]) beside its own, and hands
/// them to the shared pool when it ends ([`Local::hand_over`]). It keeps at most
/// [`LOCAL_IDLE_MAX`] idle ones: a client whose requests go to many endpoints passes the others
/// on to the shared pool at once rather than holding a connection to each. And it keeps an
/// idle one for [`LOCAL_IDLE_KEEP`] only ([`Local::poll_release_idle`]): a client connection
/// that idles then holds no upstream connection, whose buffers and descriptor would otherwise
/// double what it costs the agent, and the shared pool's cap on idle connections per endpoint
/// holds for the node's idle clients together.
#[derive(Default)]
pub struct Local {
    state: Mutex<LocalState>,
}

/// Idle connections one client connection keeps for itself.
const LOCAL_IDLE_MAX: usize = 2;
/// How long a client connection keeps an idle connection for itself. A client sending its
/// requests back to back finds its connection here; one that pauses longer takes one from the
/// shared pool (and its driver onto its task) when it resumes.
pub const LOCAL_IDLE_KEEP: Duration = Duration::from_secs(2);

#[derive(Default)]
struct LocalState {
    /// Connections whose response is done, oldest first, with the id of their driver and when
    /// they became idle; one may still be finishing its response (not yet ready).
    idle: Vec<(Key, Http1, u64, tokio::time::Instant)>,
    /// The drivers of this client connection's upstream connections, with their homes (where
    /// they go when it lets a connection go).
    driving: Vec<(u64, Driver, Arc<Home>)>,
    next_id: u64,
    handed_over: bool,
    /// When to look for connections idle longer than [`LOCAL_IDLE_KEEP`]; armed while this
    /// client connection drives any (boxed: most client connections never have one).
    release_idle_at: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The waker [`Local::poll_connections`] was last polled with, woken when a connection
    /// starts being driven here: its driver's wakers are not this task's until it is polled
    /// here, and the client connection's task polls its upstream connections only when they
    /// were woken (`proxy::parts`).
    waker: Option<Waker>,
}

impl LocalState {
    /// Drives `driver` from now on; returns its id.
    fn drive(&mut self, driver: Driver, home: Arc<Home>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.driving.push((id, driver, home));
        if let Some(waker) = &self.waker {
            waker.wake_by_ref();
        }
        id
    }

    /// Takes connection `id` out of this client connection: its driver goes home (a task of
    /// its own), and the connection to the shared pool if it is ready for another request.
    fn release(&mut self, pool: &Pool, key: Key, connection: Http1, id: u64) {
        match self.driving.iter().position(|(driving, ..)| *driving == id) {
            Some(at) => {
                let (_, driver, home) = self.driving.swap_remove(at);
                home.park(driver);
                pool.give_back_if_ready(key, connection);
            }
            // Its connection ended (or is being polled just now): nothing to pass on.
            None => drop(connection),
        }
    }
}

impl Local {
    /// Polls the connections with the client connection task's context, so their I/O wakes
    /// that task; the ones that ended are dropped.
    pub fn poll_connections(&self, cx: &mut Context<'_>) {
        let mut driving = {
            let mut state = lock(&self.state);
            if !state
                .waker
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                state.waker = Some(cx.waker().clone());
            }
            std::mem::take(&mut state.driving)
        };
        if driving.is_empty() {
            return;
        }
        // Polled outside the lock, in case a connection's poll ends a response whose guard
        // gives a connection back here.
        driving.retain_mut(|(_, driver, _)| driver.as_mut().poll(cx).is_pending());
        let mut state = lock(&self.state);
        driving.append(&mut state.driving);
        state.driving = driving;
    }

    /// Sends the connections' drivers home (tasks of their own), and gives the idle ones to
    /// `pool`: the client connection has ended.
    pub fn hand_over(&self, pool: &Pool) {
        let state = {
            let mut state = lock(&self.state);
            let taken = std::mem::take(&mut *state);
            // On what stays behind: a request still holding this `Local` later passes its
            // connection on to the shared pool rather than to a client connection that ended.
            state.handed_over = true;
            taken
        };
        for (_, driver, home) in state.driving {
            home.park(driver);
        }
        for (key, connection, ..) in state.idle {
            pool.give_back_if_ready(key, connection);
        }
    }

    /// Gives the connections idle for [`LOCAL_IDLE_KEEP`] to `pool` (their drivers go home),
    /// when the timer it keeps with the client connection task's context says it is time.
    /// The timer is armed while this client connection drives a connection and re-armed
    /// only when it fires, not on every request.
    pub fn poll_release_idle(&self, pool: &Pool, cx: &mut Context<'_>) {
        let mut state = lock(&self.state);
        if state.driving.is_empty() {
            state.release_idle_at = None;
            return;
        }
        let timer = state
            .release_idle_at
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(LOCAL_IDLE_KEEP)));
        if timer.as_mut().poll(cx).is_pending() {
            return;
        }
        let now = tokio::time::Instant::now();
        let (idle, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut state.idle)
            .into_iter()
            .partition(|(.., since)| now.duration_since(*since) >= LOCAL_IDLE_KEEP);
        state.idle = kept;
        for (key, connection, id, _) in idle {
            state.release(pool, key, connection, id);
        }
        if state.driving.is_empty() {
            state.release_idle_at = None;
            return;
        }
        let next = state
            .idle
            .iter()
            .map(|(.., since)| *since + LOCAL_IDLE_KEEP)
            .min()
            .unwrap_or(now + LOCAL_IDLE_KEEP);
        if let Some(timer) = state.release_idle_at.as_mut() {
            timer.as_mut().reset(next);
            // Registers this task's waker for the new deadline (which is in the future).
            let _ = timer.as_mut().poll(cx);
        }
    }

    /// Drives a new connection on the client connection's task; returns its id, or the
    /// driver back if the client connection has ended.
    fn drive(&self, driver: Driver, home: &Arc<Home>) -> Result<u64, Driver> {
        let mut state = lock(&self.state);
        if state.handed_over {
            return Err(driver);
        }
        Ok(state.drive(driver, home.clone()))
    }

    /// Takes `connection`'s driver from its home onto the client connection's task; returns
    /// its id, or None if the client connection has ended or the connection itself has. The
    /// driver's wakers are still its parking task's until it is polled here: the client
    /// connection's task polls its connections right after the request that took it
    /// (`serve_with` in proxy/http.rs).
    fn adopt(&self, connection: &Http1) -> Option<u64> {
        let mut state = lock(&self.state);
        if state.handed_over {
            return None;
        }
        let driver = connection.home.take()?;
        Some(state.drive(driver, connection.home.clone()))
    }

    /// A ready connection to `key`'s endpoint, and its id; closed ones are dropped, one still
    /// finishing its last response is left.
    fn take_idle(&self, key: &Key) -> Option<(Http1, u64)> {
        let mut state = lock(&self.state);
        state.idle.retain(|(_, connection, ..)| {
            !connection.sender.is_closed()
                && connection.going_away.as_ref().is_none_or(|gone| !gone())
        });
        let at = state
            .idle
            .iter()
            .position(|(k, connection, ..)| k == key && connection.sender.is_ready())?;
        let (_, connection, id, _) = state.idle.remove(at);
        Some((connection, id))
    }

    /// Keeps `connection` for the client connection's next request; the oldest idle one goes
    /// to the shared pool past [`LOCAL_IDLE_MAX`], and every one once the client connection
    /// has ended.
    fn give_back(&self, pool: &Pool, key: Key, connection: Http1, id: u64) {
        let mut state = lock(&self.state);
        if state.handed_over {
            drop(state);
            pool.give_back_if_ready(key, connection);
            return;
        }
        state
            .idle
            .push((key, connection, id, tokio::time::Instant::now()));
        if state.idle.len() > LOCAL_IDLE_MAX {
            let (key, connection, id, _) = state.idle.remove(0);
            state.release(pool, key, connection, id);
        }
    }
}

/// Gives an HTTP/1.1 connection back to the pool once its response is done: to the client
/// connection's own ([`Local`]) if it came from there.
struct PoolReturn {
    pool: Arc<Pool>,
    /// The client connection's own pool and the connection's id there.
    local: Option<(Arc<Local>, u64)>,
    key: Key,
    connection: Option<Http1>,
}

impl Drop for PoolReturn {
    fn drop(&mut self) {
        let Some(mut connection) = self.connection.take() else {
            return;
        };
        if connection.going_away.as_ref().is_some_and(|gone| gone()) {
            return;
        }
        if let Some((local, id)) = &self.local {
            // Driven by the client connection's task, it turns ready at that task's next poll
            // of it; a closed one is dropped when the next request looks.
            local.give_back(&self.pool, self.key.clone(), connection, *id);
            return;
        }
        if connection.sender.is_ready() {
            self.pool.give_back(self.key.clone(), connection);
            return;
        }
        if connection.sender.is_closed() || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        // The connection turns ready a moment after the last byte of the body is read.
        let (pool, key) = (self.pool.clone(), self.key.clone());
        tokio::spawn(async move {
            let ready = tokio::time::timeout(Duration::from_secs(1), connection.sender.ready());
            if let Ok(Ok(())) = ready.await {
                pool.give_back(key, connection);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt as _;

    use super::super::fuzz::{UpstreamOptions, upstream_with};
    use super::*;

    /// An upstream on 127.0.0.1 that answers every request with its path on keep-alive
    /// connections, and counts the connections it accepted.
    async fn upstream() -> (SocketAddr, Arc<AtomicUsize>) {
        let accepted = Arc::new(AtomicUsize::new(0));
        let addr = upstream_with(UpstreamOptions {
            accepted: Some(accepted.clone()),
            ..UpstreamOptions::default()
        })
        .await;
        (addr, accepted)
    }

    /// The key of a client virtual node's connections to `endpoint`.
    fn client_key(endpoint: SocketAddr) -> Key {
        Key {
            source: Arc::new(ResourceId::new("app", "client")),
            endpoint,
        }
    }

    /// A plain TCP connection to `endpoint`, as `upstream::dial` opens one for an endpoint
    /// reached without a tunnel: what the tests' dials return.
    fn connect_direct(
        endpoint: SocketAddr,
    ) -> BoxFuture<'static, std::io::Result<upstream::Stream>> {
        Box::pin(async move {
            Ok(upstream::Stream::new(
                tokio::net::TcpStream::connect(endpoint).await?,
            ))
        })
    }

    /// One GET through `pool` for a client connection whose own connections are `local`,
    /// which are polled before and after it as the client connection's task polls them
    /// (`serve_with` in proxy/http.rs); the answer is read to its end.
    async fn get(pool: &Arc<Pool>, key: &Key, local: &Arc<Local>) {
        let endpoint = key.endpoint;
        let dial = move || -> BoxFuture<'_, _> { connect_direct(endpoint) };
        let exchange = async {
            let request = Request::get("/").body(ReplayBody::empty()).unwrap();
            let (response, guard) = pool
                .send(key, &dial, Proto::Http1, Some(local), request)
                .await
                .unwrap();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, "/");
            drop(guard);
        };
        let mut exchange = std::pin::pin!(exchange);
        std::future::poll_fn(|cx| {
            local.poll_connections(cx);
            let done = exchange.as_mut().poll(cx);
            local.poll_connections(cx);
            local.poll_release_idle(pool, cx);
            done
        })
        .await;
    }

    /// Polls `local`'s connections and its idle timer once, as its client connection's task
    /// does when woken.
    async fn poll_once(pool: &Pool, local: &Local) {
        std::future::poll_fn(|cx| {
            local.poll_connections(cx);
            local.poll_release_idle(pool, cx);
            Poll::Ready(())
        })
        .await;
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// An empty pool, the key of a client virtual node's connections to an upstream on
    /// 127.0.0.1 ([`upstream`]), and the count of connections the upstream accepted.
    async fn pool_to_an_upstream() -> (Arc<Pool>, Key, Arc<AtomicUsize>) {
        let (endpoint, accepted) = upstream().await;
        (Arc::new(Pool::default()), client_key(endpoint), accepted)
    }

    /// Yields until `home` is held only by the connection and the client connection driving
    /// it: the task it was parked on has ended.
    async fn parking_task_ended(home: &Arc<Home>) -> bool {
        for _ in 0..100 {
            // The test's own handle, the connection's, and the driving client connection's.
            if Arc::strong_count(home) == 3 {
                return true;
            }
            tokio::task::yield_now().await;
        }
        false
    }

    #[test]
    fn a_connection_taken_from_the_shared_pool_is_driven_by_the_client_connection_that_took_it() {
        runtime().block_on(async {
            let (pool, key, accepted) = pool_to_an_upstream().await;
            let first = Arc::new(Local::default());
            get(&pool, &key, &first).await;
            get(&pool, &key, &first).await;
            assert_eq!(lock(&first.state).driving.len(), 1);
            first.hand_over(&pool);
            let home = lock(&pool.idle)[&key][0].1.home.clone();
            assert!(
                lock(&home.parked).driver.is_some(),
                "in the shared pool, the connection's driver is parked at its home"
            );

            for _ in 0..2 {
                let next = Arc::new(Local::default());
                get(&pool, &key, &next).await;
                assert_eq!(
                    lock(&next.state).driving.len(),
                    1,
                    "the client connection that took the pooled connection drives it"
                );
                assert!(lock(&home.parked).driver.is_none());
                assert!(
                    parking_task_ended(&home).await,
                    "the task that drove it in the pool has ended"
                );
                get(&pool, &key, &next).await;
                next.hand_over(&pool);
            }
            assert_eq!(
                accepted.load(Ordering::SeqCst),
                1,
                "every request went over the one connection"
            );
        });
    }

    #[test]
    fn a_client_connection_that_idles_gives_its_connection_to_the_shared_pool() {
        runtime().block_on(async {
            let (pool, key, accepted) = pool_to_an_upstream().await;
            let local = Arc::new(Local::default());
            get(&pool, &key, &local).await;
            // From here the clock moves only when the test says; the connection is idle.
            tokio::time::pause();
            tokio::time::advance(LOCAL_IDLE_KEEP / 2).await;
            poll_once(&pool, &local).await;
            assert_eq!(
                lock(&local.state).driving.len(),
                1,
                "an idle connection is kept for the client connection's next request a while"
            );
            assert!(!lock(&pool.idle).contains_key(&key));

            tokio::time::advance(LOCAL_IDLE_KEEP).await;
            poll_once(&pool, &local).await;
            {
                let state = lock(&local.state);
                assert!(state.driving.is_empty() && state.idle.is_empty());
                assert!(
                    state.release_idle_at.is_none(),
                    "no timer while the client connection drives no connection"
                );
            }
            let home = lock(&pool.idle)[&key][0].1.home.clone();
            assert!(
                lock(&home.parked).driver.is_some(),
                "the idle connection is in the shared pool, its driver parked at its home"
            );

            tokio::time::resume();
            get(&pool, &key, &local).await;
            assert_eq!(
                lock(&local.state).driving.len(),
                1,
                "the client connection's next request takes the connection back and drives it"
            );
            assert_eq!(
                accepted.load(Ordering::SeqCst),
                1,
                "one connection throughout"
            );
        });
    }

    /// A request of a client connection that has ended (its connections handed over, the
    /// request still running) leaves its upstream connection to the shared pool, not to the
    /// client connection, which nothing polls any more.
    #[test]
    fn a_request_after_its_client_connection_ended_leaves_its_connection_to_the_shared_pool() {
        runtime().block_on(async {
            let (pool, key, accepted) = pool_to_an_upstream().await;
            let local = Arc::new(Local::default());
            local.hand_over(&pool);
            get(&pool, &key, &local).await;
            {
                let state = lock(&local.state);
                assert!(
                    state.driving.is_empty() && state.idle.is_empty(),
                    "the ended client connection took the connection"
                );
            }
            get(&pool, &key, &Arc::new(Local::default())).await;
            assert_eq!(
                accepted.load(Ordering::SeqCst),
                1,
                "the next client connection found the connection in the shared pool"
            );
        });
    }

    /// An upstream HTTP/2 connection runs on one task: its I/O, its dispatch and every
    /// request's wait for its answer (hyper's client hands them to its executor; with tokio's,
    /// each was a task, and a request crossed three of them before its answer reached the
    /// caller).
    #[test]
    fn an_http2_connection_and_its_requests_in_flight_run_on_one_task() {
        // The upstream runs on a runtime of its own, so that only the pool's tasks are counted.
        let upstream_runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let endpoint = upstream_runtime.block_on(upstream_with(UpstreamOptions {
            slow_path: Some("/slow"),
            ..UpstreamOptions::default()
        }));
        runtime().block_on(async {
            let pool = Arc::new(Pool::default());
            let key = client_key(endpoint);
            let dial = move || -> BoxFuture<'_, _> { connect_direct(endpoint) };
            let get = |path: &'static str| {
                let (pool, key, dial) = (&pool, &key, &dial);
                async move {
                    let request = Request::get(format!("http://{endpoint}{path}"))
                        .body(ReplayBody::empty())
                        .unwrap();
                    let (response, _) = pool
                        .send(key, dial, Proto::Http2, None, request)
                        .await
                        .unwrap();
                    response.into_body().collect().await.unwrap().to_bytes()
                }
            };
            let alive_tasks = || {
                tokio::runtime::Handle::current()
                    .metrics()
                    .num_alive_tasks()
            };
            assert_eq!(get("/").await, "/");
            assert_eq!(alive_tasks(), 1, "the connection's task");
            let in_flight = futures::future::join_all((0..3).map(|_| get("/slow")));
            let counted = async {
                // The upstream answers /slow after 300 ms.
                tokio::time::sleep(Duration::from_millis(100)).await;
                alive_tasks()
            };
            let (answers, tasks_in_flight) = tokio::join!(in_flight, counted);
            assert!(answers.iter().all(|answer| answer == "/slow"));
            assert_eq!(
                tasks_in_flight, 1,
                "three requests in flight, no task of their own"
            );
        });
    }
}
