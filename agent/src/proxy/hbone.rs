//! Node-to-node tunnels: mutual TLS (TLS 1.3, rustls) carrying HTTP/2 CONNECT streams, one per
//! proxied connection, in the spirit of Istio's HBONE (port 15008). The CONNECT authority is the
//! target pod's address and listener port.
//!
//! Client ([`open`]): one TLS connection per (source virtual node, destination node,
//! destination listener), multiplexing every stream between them. The client presents the
//! certificate of the workload it acts for (the caller's `clientPolicy.tls.certificate`) and
//! verifies the server against that policy's trust and SANs. The TLS server name says which
//! listener is wanted ([`crate::identity::tunnel_sni`]), so the receiving agent can present
//! *that* workload's certificate: one TLS connection has one server certificate, which is why
//! the pool key includes the destination listener. A pooled connection made with certificate
//! material that has since changed on disk takes no new streams (it drains; nothing is cut).
//!
//! A key holds as many connections as its streams need, at most [`MAX_STREAMS_PER_CONNECTION`]
//! streams each (well under the receiving side's limit, so no stream ever queues for a slot
//! the peer will not grant). Every step has a bound: the TCP connect, the TLS handshake, and
//! the stream open (readiness, the CONNECT request, its answer and the upgrade). A peer node
//! that vanishes without a reset is found by HTTP/2 PINGs ([`Settings`]) and TCP keepalives:
//! its connections close, and its node is held down ([`NODE_HOLD_DOWN`]) so new streams to it
//! fail at once and the caller moves to another endpoint, until a probe reaches it again.
//!
//! Server ([`serve`]): reads the ClientHello, builds the destination listener's server config
//! (its `tls.certificate`; its `validation` trust and SANs, which make the client certificate
//! mandatory), then for each CONNECT stream checks that the target is that listener of a pod on
//! this node and that the verified peer's virtual node may reach it (the mesh's backend rules,
//! enforced again here so a compromised node cannot skip them), and splices the stream to the
//! pod's loopback. A tunnel connection's streams and their splices run on the connection's own
//! task (`super::streams`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use rustls::server::ResolvesServerCert;
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use super::coalesce::Coalesce;
use super::http::pool;
use super::streams::{self, Driven, Streams};
use super::upstream::{CONNECT_TIMEOUT, Caller, GoingAway, Transport};
use super::{Context, Drain, admission};
use crate::identity::policy::{Policy, trust_file};
use crate::identity::store::cert_facts;
use crate::identity::verify::{ClientVerifier, Report, ServerVerifier};
use crate::identity::{self, ALPN_H2, AuthzLabels, TunnelLabels, parse_tunnel_sni, tunnel_sni};
use crate::mesh::{ClientTls, ResourceId};

/// The tunnel port (Istio's HBONE port).
pub const PORT: u16 = 15008;
/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 flow-control windows: large enough that one stream can fill a fast link.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Streams one pooled tunnel connection carries at most; past it a key gets another
/// connection (ztunnel opens a new one past 100 streams too). Well under [`SERVER_MAX_STREAMS`]
/// and hyper's own default of 200, so a stream never waits for the peer to grant a slot.
pub const MAX_STREAMS_PER_CONNECTION: usize = 100;
/// Concurrent streams the receiving side grants one connection (HTTP/2 SETTINGS): generous,
/// for clients that do not cap themselves.
const SERVER_MAX_STREAMS: u32 = 1000;
/// How long opening one stream may take: readiness of the connection, the CONNECT request and
/// its answer (the peer connects to the pod first, within its own 5 s connect timeout), and
/// the upgrade. A connection on which a stream open times out takes no new stream.
pub const STREAM_OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a node whose agent stopped answering (keepalive timeout, connect or stream-open
/// timeout) is skipped: streams to it fail at once, so callers try another endpoint instead of
/// waiting out a connect timeout each. A probe ends it early once the node answers again.
pub const NODE_HOLD_DOWN: Duration = Duration::from_secs(15);
/// How often a held-down node is probed (a TCP connect to its tunnel port).
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// An extra connection of a key (not its first) with no stream for this long is let go.
const EXTRA_IDLE: Duration = Duration::from_secs(30);

/// How tunnels find out that a peer is gone (`--tunnel-keepalive-interval`,
/// `--tunnel-keepalive-timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// After this long without a frame from the peer, send an HTTP/2 PING (idle or not); also
    /// the TCP keepalive idle time and probe interval.
    pub keepalive_interval: Duration,
    /// A PING unanswered this long closes the connection and every stream on it; also bounds
    /// unacknowledged data (TCP_USER_TIMEOUT = interval + timeout).
    pub keepalive_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(10),
        }
    }
}

impl Settings {
    /// TCP keepalive and user timeout on a tunnel socket: the kernel's own dead-peer check,
    /// for a peer gone while data waits for its acknowledgement.
    fn apply(&self, tcp: &TcpStream) {
        let socket = socket2::SockRef::from(tcp);
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(self.keepalive_interval)
            .with_interval(self.keepalive_interval)
            .with_retries(3);
        if let Err(error) = socket.set_tcp_keepalive(&keepalive).and_then(|()| {
            socket.set_tcp_user_timeout(Some(self.keepalive_interval + self.keepalive_timeout))
        }) {
            tracing::debug!(error = %crate::logging::Chain(&error), "cannot set TCP keepalive on a tunnel socket");
        }
    }
}

/// Why a tunnel stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Identity(#[from] identity::Error),
    #[error(
        "cannot reach the agent of node {node} on its tunnel port (is strait running there with \
         --tunnel-listen, and does a firewall let port {PORT} through?)"
    )]
    Connect {
        node: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "TLS handshake with the agent of node {node} for {sni} failed (the log of either agent \
         says which certificate was rejected and why)"
    )]
    Handshake {
        node: SocketAddr,
        sni: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP/2 on the tunnel to {node} failed")]
    Http2 {
        node: SocketAddr,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "the agent of node {node} stopped answering {ago:?} ago ({why}); streams to it fail at \
         once for up to {NODE_HOLD_DOWN:?} or until it answers again (is the node up, and its \
         link?)"
    )]
    NodeDown {
        node: SocketAddr,
        why: &'static str,
        ago: Duration,
    },
    #[error(
        "opening a stream on the tunnel to {node} took longer than {STREAM_OPEN_TIMEOUT:?} (the \
         connection takes no new stream; is the agent of that node overloaded or gone?)"
    )]
    StreamTimeout { node: SocketAddr },
    #[error("the agent of node {node} refused the stream to {target}: {status} {reason}")]
    Refused {
        node: SocketAddr,
        target: SocketAddr,
        status: StatusCode,
        reason: String,
    },
}

type Sender = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    source: ResourceId,
    node: SocketAddr,
    sni: String,
}

struct Pooled {
    sender: Sender,
    /// Set when the peer agent said GOAWAY (it drains): no new stream goes on this connection.
    going_away: Arc<AtomicBool>,
    /// Set when the connection ended, or a stream open on it timed out: no new stream.
    broken: Arc<AtomicBool>,
    /// Fingerprints of the client certificate and trust bundle the connection was made with.
    generation: String,
    /// Streams open (or being opened) on it.
    streams: Arc<AtomicUsize>,
    /// When a stream was last put on it.
    last_used: Instant,
}

impl Pooled {
    fn takes_streams(&self, generation: &str) -> bool {
        self.generation == generation
            && !self.sender.is_closed()
            && !self.going_away.load(Ordering::Acquire)
            && !self.broken.load(Ordering::Acquire)
    }
}

/// One stream's place on a pooled connection, given back when the stream is dropped.
struct StreamSlot(Arc<AtomicUsize>);

impl StreamSlot {
    fn take(streams: &Arc<AtomicUsize>) -> StreamSlot {
        streams.fetch_add(1, Ordering::AcqRel);
        StreamSlot(streams.clone())
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A tunnel stream: the upgraded CONNECT stream, holding its place on its connection.
pub struct TunnelStream {
    io: TokioIo<hyper::upgrade::Upgraded>,
    _slot: StreamSlot,
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Nodes whose agent stopped answering, each with when and why.
#[derive(Default)]
struct HeldDown(Mutex<HashMap<SocketAddr, (Instant, &'static str)>>);

impl HeldDown {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, (Instant, &'static str)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Since when and why `node` is held down, if it is.
    fn get(&self, node: SocketAddr) -> Option<(Instant, &'static str)> {
        let mut held = self.lock();
        match held.get(&node) {
            Some(&(since, why)) if since.elapsed() < NODE_HOLD_DOWN => Some((since, why)),
            Some(_) => {
                held.remove(&node);
                None
            }
            None => None,
        }
    }

    fn clear(&self, node: SocketAddr) {
        if self.lock().remove(&node).is_some() {
            tracing::info!(%node, "the agent of node answers again: tunnels to it resume");
        }
    }

    /// Holds `node` down, and probes it until it answers or the hold-down ends.
    fn hold(self: &Arc<Self>, node: SocketAddr, why: &'static str) {
        let since = Instant::now();
        {
            let mut held = self.lock();
            if held
                .get(&node)
                .is_some_and(|(s, _)| s.elapsed() < NODE_HOLD_DOWN)
            {
                return;
            }
            held.insert(node, (since, why));
        }
        tracing::warn!(%node, why, hold_down = ?NODE_HOLD_DOWN, "the agent of node stopped answering: new streams to it fail at once until it answers again");
        let held = self.clone();
        tokio::spawn(async move {
            while since.elapsed() < NODE_HOLD_DOWN {
                tokio::time::sleep(PROBE_INTERVAL).await;
                let probe = tokio::time::timeout(PROBE_INTERVAL, TcpStream::connect(node)).await;
                if let Ok(Ok(tcp)) = probe {
                    // Nothing sent: the peer takes a connection closed before any byte for
                    // a probe.
                    drop(tcp);
                    let mut map = held.lock();
                    if map.get(&node).is_some_and(|(s, _)| *s == since) {
                        map.remove(&node);
                        drop(map);
                        tracing::info!(%node, "the agent of node answers again: tunnels to it resume");
                    }
                    return;
                }
            }
        });
    }
}

/// Whether a connection ended because the peer stopped answering (an unanswered keepalive
/// PING, or the kernel's TCP user timeout), rather than closing it.
fn peer_silent(error: &hyper::Error) -> bool {
    if error.is_timeout() {
        return true;
    }
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        source = e.source();
    }
    false
}

/// The read side of a tunnel connection, watched for the peer's GOAWAY. hyper does not tell
/// when its HTTP/2 client receives one, and the pooled HTTP connections over this tunnel's
/// streams must stop taking requests as soon as it arrives (the peer cuts those streams at
/// its drain timeout). This follows the frame boundaries of what the peer sends (9-byte
/// headers: 24-bit length, type, flags, stream id; RFC 9113 section 4.1) and reads nothing
/// else.
struct GoawayWatch<T> {
    inner: T,
    seen: Arc<AtomicBool>,
    header: [u8; 9],
    have: usize,
    skip: usize,
}

impl<T> GoawayWatch<T> {
    fn new(inner: T, seen: Arc<AtomicBool>) -> Self {
        GoawayWatch {
            inner,
            seen,
            header: [0; 9],
            have: 0,
            skip: 0,
        }
    }

    fn scan(&mut self, mut data: &[u8]) {
        const GOAWAY: u8 = 0x7;
        while !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                continue;
            }
            let n = (9 - self.have).min(data.len());
            self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == 9 {
                let [a, b, c, kind, ..] = self.header;
                if kind == GOAWAY {
                    self.seen.store(true, Ordering::Release);
                }
                self.skip = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
                self.have = 0;
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for GoawayWatch<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            self.scan(&buf.filled()[before..]);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GoawayWatch<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Tunnel connections, as many per key as its streams need.
#[derive(Default)]
pub struct Pool {
    slots: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<Vec<Pooled>>>>>,
    held_down: Arc<HeldDown>,
}

impl Pool {
    fn slot(&self, key: PoolKey) -> Arc<tokio::sync::Mutex<Vec<Pooled>>> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.entry(key).or_default().clone()
    }
}

/// A client certificate resolver that always presents one certificate.
#[derive(Debug)]
struct Presents(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for Presents {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for Presents {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Opens a tunnel stream to `endpoint` (a pod on the node whose agent is at `node`) on behalf
/// of `caller`, with `client_tls` (the caller's client policy for this backend, if any).
pub async fn open(
    transport: &Transport,
    policy: &Policy,
    caller: &Caller<'_>,
    target_node: &ResourceId,
    endpoint: SocketAddr,
    node: SocketAddr,
    client_tls: Option<&ClientTls>,
) -> Result<(TunnelStream, GoingAway), Error> {
    let field = format!("VirtualNode {} clientPolicy.tls", caller.virtual_node);
    let cert = match client_tls.and_then(|t| t.certificate.as_ref()) {
        Some(c) => Some(transport.certificate(
            policy,
            caller.virtual_node,
            c,
            &format!("{field}.certificate"),
        )?),
        None => None,
    };
    let trust = match client_tls {
        Some(t) => Some(
            transport
                .store
                .trust(&trust_file(&t.validation, &format!("{field}.validation"))?)?,
        ),
        None => None,
    };
    let generation = format!(
        "{}/{}",
        cert.as_ref().map_or("-", |c| c.fingerprint.as_str()),
        trust.as_ref().map_or("-", |t| t.fingerprint.as_str())
    );
    let sni = tunnel_sni(target_node, endpoint.port());
    let slot = transport.pool.slot(PoolKey {
        source: caller.virtual_node.clone(),
        node,
        sni: sni.clone(),
    });
    // A tunnel connection whose peer agent is draining says GOAWAY; a stream caught between
    // its GOAWAY and our seeing it was never processed there, and goes once more on a new
    // connection (to the agent that took the peer's listener over).
    let mut redialled = false;
    loop {
        let (sender, stream_slot, going_away, broken) = {
            let mut connections = slot.lock().await;
            connections.retain(|c| {
                let keep = c.takes_streams(&generation);
                if !keep
                    && c.generation != generation
                    && !c.going_away.load(Ordering::Acquire)
                    && !c.broken.load(Ordering::Acquire)
                {
                    tracing::info!(%node, %sni, source = %caller.virtual_node, "certificate material changed: new tunnel connection (the old one drains)");
                }
                keep
            });
            // Extra connections opened for a burst of streams go once idle for a while.
            let mut first = true;
            connections.retain(|c| {
                let keep = first
                    || c.streams.load(Ordering::Acquire) > 0
                    || c.last_used.elapsed() < EXTRA_IDLE;
                first = false;
                keep
            });
            let free = connections
                .iter_mut()
                .find(|c| c.streams.load(Ordering::Acquire) < MAX_STREAMS_PER_CONNECTION);
            let chosen = match free {
                Some(c) => c,
                None => {
                    if let Some((since, why)) = transport.pool.held_down.get(node) {
                        return Err(Error::NodeDown {
                            node,
                            why,
                            ago: since.elapsed(),
                        });
                    }
                    let expected_sans = client_tls
                        .map(|t| t.validation.subject_alternative_names.clone())
                        .unwrap_or_default();
                    let dialled = dial(
                        transport,
                        caller,
                        node,
                        &sni,
                        cert.clone(),
                        trust.clone(),
                        expected_sans,
                        generation.clone(),
                    )
                    .await?;
                    connections.push(dialled);
                    connections.last_mut().expect("BUG: just pushed")
                }
            };
            chosen.last_used = Instant::now();
            (
                chosen.sender.clone(),
                StreamSlot::take(&chosen.streams),
                chosen.going_away.clone(),
                chosen.broken.clone(),
            )
        };
        let opened = tokio::time::timeout(
            STREAM_OPEN_TIMEOUT,
            open_stream(sender, caller, endpoint, node),
        )
        .await;
        match opened {
            Ok(Ok(io)) => {
                transport
                    .metrics
                    .tunnel_streams
                    .get_or_create(&TunnelLabels {
                        direction: "outbound",
                    })
                    .inc();
                // The streams already open go on until the peer's drain timeout.
                let going_away: GoingAway = Arc::new(move || going_away.load(Ordering::Acquire));
                let stream = TunnelStream {
                    io,
                    _slot: stream_slot,
                };
                return Ok((stream, going_away));
            }
            Ok(Err(Opening::Unsent(e))) if !redialled => {
                tracing::debug!(%node, %sni, error = %crate::logging::Chain(&e), "tunnel connection going away; the stream goes on a new one");
                redialled = true;
                broken.store(true, Ordering::Release);
            }
            Ok(Err(Opening::Unsent(e))) => {
                return Err(Error::Http2 {
                    node,
                    source: e.into(),
                });
            }
            Ok(Err(Opening::Failed(error))) => return Err(error),
            Err(_) => {
                // Nothing came back on this connection for the whole bound: whatever it is
                // waiting for, new streams must not wait behind it.
                broken.store(true, Ordering::Release);
                transport
                    .pool
                    .held_down
                    .hold(node, "a stream open timed out");
                return Err(Error::StreamTimeout { node });
            }
        }
    }
}

/// Why a stream could not be opened on a connection.
enum Opening {
    /// The connection would not take the stream, or the peer never processed it (GOAWAY).
    Unsent(hyper::Error),
    Failed(Error),
}

/// Opens one CONNECT stream on `sender` and waits for it to be established.
async fn open_stream(
    mut sender: Sender,
    caller: &Caller<'_>,
    endpoint: SocketAddr,
    node: SocketAddr,
) -> Result<TokioIo<hyper::upgrade::Upgraded>, Opening> {
    sender.ready().await.map_err(Opening::Unsent)?;
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(endpoint.to_string())
        .header("x-strait-source-workload", caller.workload.to_string())
        .body(Empty::new())
        .map_err(|e| {
            Opening::Failed(Error::Http2 {
                node,
                source: e.into(),
            })
        })?;
    let response = match sender.try_send_request(request).await {
        Ok(response) => response,
        Err(mut e) => {
            let unsent = e.take_message().is_some();
            let e = e.into_error();
            if unsent || pool::never_processed(&e) {
                return Err(Opening::Unsent(e));
            }
            return Err(Opening::Failed(Error::Http2 {
                node,
                source: e.into(),
            }));
        }
    };
    if response.status() != StatusCode::OK {
        let reason = response
            .headers()
            .get("x-strait-reason")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        return Err(Opening::Failed(Error::Refused {
            node,
            target: endpoint,
            status: response.status(),
            reason,
        }));
    }
    let upgraded = hyper::upgrade::on(response).await.map_err(|e| {
        Opening::Failed(Error::Http2 {
            node,
            source: e.into(),
        })
    })?;
    Ok(TokioIo::new(upgraded))
}

#[allow(clippy::too_many_arguments)]
async fn dial(
    transport: &Transport,
    caller: &Caller<'_>,
    node: SocketAddr,
    sni: &str,
    cert: Option<Arc<identity::store::LoadedCert>>,
    trust: Option<Arc<identity::store::Trust>>,
    expected_sans: Vec<String>,
    generation: String,
) -> Result<Pooled, Error> {
    let held_down = &transport.pool.held_down;
    let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(node)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(source)) => return Err(Error::Connect { node, source }),
        Err(_) => {
            // No answer at all (not even a reset): the node or its link is gone.
            held_down.hold(node, "connect timed out");
            return Err(Error::Connect {
                node,
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connect timed out after {CONNECT_TIMEOUT:?}"),
                ),
            });
        }
    };
    let _ = tcp.set_nodelay(true);
    transport.tunnel.apply(&tcp);
    let report = Report {
        metrics: transport.metrics.clone(),
        context: format!("tunnel to {node} ({sni}) for {}", caller.virtual_node),
    };
    let verifier = Arc::new(ServerVerifier {
        roots: trust.map(|t| t.roots.clone()),
        expected_sans,
        provider: identity::provider(),
        report,
    });
    let builder = rustls::ClientConfig::builder_with_provider(identity::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| identity::Error::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match &cert {
        Some(cert) => builder.with_client_cert_resolver(Arc::new(Presents(cert.certified.clone()))),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    let name = ServerName::try_from(sni.to_owned())
        .map_err(|e| identity::Error::Config(format!("server name {sni}: {e}")))?;
    let handshake_error = |source: std::io::Error| Error::Handshake {
        node,
        sni: sni.to_owned(),
        source,
    };
    let tls = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .map_err(|_| {
        transport
            .metrics
            .handshake_failure("client", "handshake_timeout");
        held_down.hold(node, "TLS handshake timed out");
        handshake_error(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no handshake within {HANDSHAKE_TIMEOUT:?}"),
        ))
    })?
    .map_err(|e| {
        transport.metrics.handshake_failed("client", &e);
        handshake_error(e)
    })?;
    let (_, session) = tls.get_ref();
    let server_sans = session
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| cert_facts(c).ok())
        .map(|f| f.sans)
        .unwrap_or_default();
    tracing::info!(
        target: "strait::tunnel",
        direction = "outbound",
        %node,
        sni,
        source_virtual_node = %caller.virtual_node,
        local_identity = %cert.as_ref().map(|c| c.sans.join(",")).unwrap_or_default(),
        peer_identity = %server_sans.join(","),
        tls_version = tls_version(session.protocol_version()),
        "mTLS tunnel connected"
    );
    let going_away = Arc::new(AtomicBool::new(false));
    let settings = transport.tunnel;
    // The connection's I/O and its streams' sending sides run on its one task (see `streams`).
    let on_its_task = Streams::default();
    let (sender, connection) = hyper::client::conn::http2::Builder::new(on_its_task.clone())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .timer(TokioTimer::new())
        .keep_alive_interval(settings.keepalive_interval)
        .keep_alive_timeout(settings.keepalive_timeout)
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(GoawayWatch::new(
            Coalesce::new(tls),
            going_away.clone(),
        )))
        .await
        .map_err(|e| Error::Http2 {
            node,
            source: e.into(),
        })?;
    held_down.clear(node);
    let broken = Arc::new(AtomicBool::new(false));
    let streams = Arc::new(AtomicUsize::new(0));
    let (sni_owned, broken2, streams2, held_down2) = (
        sni.to_owned(),
        broken.clone(),
        streams.clone(),
        held_down.clone(),
    );
    // What follows the connection's end runs as it ends, not once its streams have too.
    let connection = async move {
        let ended = connection.await;
        broken2.store(true, Ordering::Release);
        match ended {
            Err(error) if peer_silent(&error) => {
                tracing::warn!(
                    target: "strait::tunnel",
                    %node,
                    sni = %sni_owned,
                    streams = streams2.load(Ordering::Acquire),
                    error = %crate::logging::Chain(&error),
                    "tunnel connection closed: the peer agent stopped answering (keepalive); its streams are closed"
                );
                held_down2.hold(node, "keepalive timed out");
            }
            Err(error) => {
                tracing::debug!(%node, sni = %sni_owned, error = %crate::logging::Chain(&error), "tunnel connection ended");
            }
            Ok(()) => {}
        }
    };
    tokio::spawn(streams::drive(on_its_task, connection));
    transport
        .metrics
        .tunnel_connections
        .get_or_create(&TunnelLabels {
            direction: "outbound",
        })
        .inc();
    Ok(Pooled {
        sender,
        going_away,
        broken,
        generation,
        streams,
        last_used: Instant::now(),
    })
}

/// Accepts tunnel connections on `listener` until shutdown.
pub fn serve(listener: TcpListener, ctx: Arc<Context>) {
    let (stop, connections) = (ctx.shutdown.clone(), ctx.connections.clone());
    super::spawn_accept_loop(
        listener,
        stop,
        &connections,
        "tunnel".into(),
        move |tcp, peer| {
            let ctx2 = ctx.clone();
            ctx.connections
                .spawn(async move { accept(tcp, peer, ctx2).await });
        },
    );
}

/// The server config for one destination listener, from the certificates on disk now.
fn server_config(
    transport: &Transport,
    policy: &Policy,
    vn: &ResourceId,
    port: u16,
    peer: SocketAddr,
) -> Result<(Arc<rustls::ServerConfig>, bool), String> {
    let tls = policy.listener_tls(vn, port).ok_or_else(|| {
        format!("virtual node {vn} has no listener with tls on port {port} in this agent's mesh")
    })?;
    // This node holds the identities of its own pods only: a server name asking for another
    // virtual node opens no file (identity::local).
    if !transport.runs(vn) {
        return Err(format!(
            "virtual node {vn} has no pod on this node, so this node does not hold its identity"
        ));
    }
    let field = format!("VirtualNode {vn} listener {port} tls");
    let cert = transport
        .certificate(
            policy,
            vn,
            &tls.certificate,
            &format!("{field}.certificate"),
        )
        .map_err(|e| crate::logging::Chain(&e).to_string())?;
    let builder = rustls::ServerConfig::builder_with_provider(identity::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| crate::logging::Chain(&e).to_string())?;
    let mutual = tls.validation.is_some();
    let builder = match &tls.validation {
        Some(validation) => {
            let trust_path = trust_file(validation, &format!("{field}.validation"))
                .map_err(|e| crate::logging::Chain(&e).to_string())?;
            let trust = transport
                .store
                .trust(&trust_path)
                .map_err(|e| crate::logging::Chain(&e).to_string())?;
            let report = Report {
                metrics: transport.metrics.clone(),
                context: format!("tunnel from {peer} to {vn} port {port}"),
            };
            let verifier = ClientVerifier::new(
                trust.roots.clone(),
                validation.subject_alternative_names.clone(),
                report,
            )
            .map_err(|e| crate::logging::Chain(&e).to_string())?;
            builder.with_client_cert_verifier(Arc::new(verifier))
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(Presents(cert.certified.clone())));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok((Arc::new(config), mutual))
}

async fn accept(tcp: TcpStream, peer: SocketAddr, ctx: Arc<Context>) {
    let _ = tcp.set_nodelay(true);
    let transport = &ctx.transport;
    transport.tunnel.apply(&tcp);
    let acceptor = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp);
    let start = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor).await {
        Ok(Ok(start)) => start,
        Ok(Err(error)) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
            // Another agent probing whether this node is back (see `HeldDown`).
            tracing::debug!(%peer, "connection closed before a ClientHello (a probe)");
            return;
        }
        Ok(Err(error)) => {
            tracing::warn!(%peer, error = %crate::logging::Chain(&error), "not a TLS client on the tunnel port; closed");
            transport.metrics.handshake_failure("server", "not_tls");
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, "no TLS ClientHello within {HANDSHAKE_TIMEOUT:?}; closed");
            transport
                .metrics
                .handshake_failure("server", "handshake_timeout");
            return;
        }
    };
    let sni = start.client_hello().server_name().map(str::to_owned);
    // The handshake reads one snapshot; each stream in the tunnel takes its own.
    let state = transport.state.snapshot();
    let Some((vn, port)) = sni
        .as_deref()
        .and_then(parse_tunnel_sni)
        .and_then(|(target, port)| Some((state.policy.tunnel_target(target)?, port)))
    else {
        tracing::warn!(%peer, ?sni, "tunnel client sent no strait server name; closed");
        transport
            .metrics
            .handshake_failure("server", "no_server_name");
        return;
    };
    let (config, mutual) = match server_config(transport, &state.policy, &vn, port, peer) {
        Ok(config) => config,
        Err(error) => {
            tracing::warn!(%peer, virtual_node = %vn, port, "cannot serve this tunnel: {error}");
            return;
        }
    };
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, start.into_stream(config)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            // Certificate rejections were logged and counted by the verifier with the reason.
            tracing::info!(%peer, virtual_node = %vn, port, error = %crate::logging::Chain(&error), "tunnel TLS handshake failed");
            transport.metrics.handshake_failed("server", &error);
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, "tunnel TLS handshake timed out");
            transport
                .metrics
                .handshake_failure("server", "handshake_timeout");
            return;
        }
    };
    let (_, session) = tls.get_ref();
    let peer_sans = session
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| cert_facts(c).ok())
        .map(|f| f.sans)
        .unwrap_or_default();
    tracing::info!(
        target: "strait::tunnel",
        direction = "inbound",
        %peer,
        virtual_node = %vn,
        port,
        peer_identity = %peer_sans.join(","),
        tls_version = tls_version(session.protocol_version()),
        "mTLS tunnel accepted"
    );
    transport
        .metrics
        .tunnel_connections
        .get_or_create(&TunnelLabels {
            direction: "inbound",
        })
        .inc();
    let peer_sans = Arc::new(peer_sans);
    let vn = Arc::new(vn);
    let ctx2 = ctx.clone();
    // The streams, and their copies to the pod, run on this connection's task (see
    // `super::streams`).
    let streams = Streams::default();
    let streams2 = streams.clone();
    let service = hyper::service::service_fn(move |request| {
        let (ctx, vn, peer_sans, streams) = (
            ctx2.clone(),
            vn.clone(),
            peer_sans.clone(),
            streams2.clone(),
        );
        async move {
            let peer = Peer {
                addr: peer,
                sans: &peer_sans,
                mutual,
            };
            Ok::<_, Infallible>(stream(request, ctx, &vn, port, &peer, &streams).await)
        }
    });
    // PINGs from this side too: a peer gone without a reset must not keep its streams' pod
    // connections open.
    let connection = hyper::server::conn::http2::Builder::new(streams.clone())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(SERVER_MAX_STREAMS)
        .timer(TokioTimer::new())
        .keep_alive_interval(transport.tunnel.keepalive_interval)
        .keep_alive_timeout(transport.tunnel.keepalive_timeout)
        .serve_connection(TokioIo::new(Coalesce::new(tls)), service);
    tokio::pin!(connection);
    let mut driven = Driven::new(streams);
    // Draining: GOAWAY, so the peer agent opens its next streams on a new tunnel (to the agent
    // that took the listener over); the streams open go on until they end or the drain
    // timeout.
    let served = tokio::select! {
        served = std::future::poll_fn(|cx| driven.poll(connection.as_mut(), cx)) => served,
        () = ctx.shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            tokio::select! {
                served = std::future::poll_fn(|cx| driven.poll(connection.as_mut(), cx)) => served,
                () = tokio::time::sleep(ctx.drain_timeout) => Ok(()),
            }
        }
    };
    if let Err(error) = served {
        tracing::debug!(%peer, error = %crate::logging::Chain(&error), "tunnel connection ended");
    }
}

/// `TLSv1.3` for logs.
fn tls_version(version: Option<rustls::ProtocolVersion>) -> String {
    match version {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".into(),
        Some(other) => format!("{other:?}"),
        None => "none".into(),
    }
}

fn refuse(status: StatusCode, reason: &str) -> Response<Empty<Bytes>> {
    let mut response = Response::new(Empty::new());
    *response.status_mut() = status;
    if let Ok(value) = reason.parse() {
        response.headers_mut().insert("x-strait-reason", value);
    }
    response
}

/// The other end of a tunnel connection.
struct Peer<'a> {
    addr: SocketAddr,
    /// The identities (SANs) of its verified certificate.
    sans: &'a [String],
    /// Whether its certificate was required and verified (mutual TLS).
    mutual: bool,
}

/// One CONNECT stream: check it, connect to the pod, answer, and splice on `streams` (the
/// tunnel connection's task) once answered.
async fn stream(
    mut request: Request<Incoming>,
    ctx: Arc<Context>,
    vn: &ResourceId,
    port: u16,
    peer: &Peer<'_>,
    streams: &Streams,
) -> Response<Empty<Bytes>> {
    let (peer_sans, mutual, peer) = (peer.sans, peer.mutual, peer.addr);
    let transport = &ctx.transport;
    if request.method() != Method::CONNECT {
        return refuse(StatusCode::METHOD_NOT_ALLOWED, "only CONNECT");
    }
    let Some(target) = request
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
    else {
        return refuse(StatusCode::BAD_REQUEST, "authority must be address:port");
    };
    let Some(pod) = transport.local_pod(target.ip()) else {
        return refuse(StatusCode::NOT_FOUND, "no such pod on this node");
    };
    if pod.virtual_node != *vn || target.port() != port {
        return refuse(
            StatusCode::MISDIRECTED_REQUEST,
            "target is not the listener this connection was opened for",
        );
    }
    let source_workload = request
        .headers()
        .get("x-strait-source-workload")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    // The receiving half of the backend rule, from the verified certificate only. One
    // snapshot for the whole stream: the rule, the limits and the access log agree.
    let state = transport.state.snapshot();
    let policy = &state.policy;
    let peer_nodes = policy.peer_nodes(peer_sans);
    if mutual && !peer_nodes.iter().any(|p| policy.may_reach(p, vn)) {
        transport
            .metrics
            .authz_denied
            .get_or_create(&AuthzLabels { point: "receiver" })
            .inc();
        tracing::warn!(
            %peer,
            peer_identity = %peer_sans.join(","),
            peer_virtual_nodes = ?peer_nodes,
            target = %target,
            virtual_node = %vn,
            "tunnel stream refused: the peer's virtual node does not list a virtual service that leads to this one among its backends"
        );
        return refuse(
            StatusCode::FORBIDDEN,
            "not a backend of the peer's virtual node",
        );
    }
    // Destination-side limits (connectionPool, rateLimit), keyed by the verified identity: see
    // `super::admission`.
    let caller = admission::Caller::Tunnel(peer_sans.to_vec());
    let admitted = match transport.admission.admit(&state, vn, port, &caller) {
        Ok(admitted) => admitted,
        Err(refused) => return refuse(StatusCode::SERVICE_UNAVAILABLE, &refused.to_string()),
    };
    // A tcp listener's idle timeout, applied here at the receiving side (`super::idle`).
    let idle = policy.limits.tcp_idle(vn, port);
    if let admission::Admitted::Http(gate) = admitted {
        transport
            .metrics
            .tunnel_streams
            .get_or_create(&TunnelLabels {
                direction: "inbound",
            })
            .inc();
        let on_upgrade = hyper::upgrade::on(&mut request);
        let drain = Drain {
            signal: ctx.shutdown.clone(),
            timeout: ctx.drain_timeout,
        };
        streams.spawn(gate.serve_upgrade(on_upgrade, pod, target, drain));
        return Response::new(Empty::new());
    }
    // Connect before answering, so the caller sees a refused connection as a failure.
    let mut upstream = match pod.connect_loopback(target.ip(), target.port()).await {
        Ok(s) => super::received::wrap(
            &transport.admission,
            &state.access_logs,
            vn,
            target,
            Some(peer),
            super::idle::stream(s, idle),
        ),
        Err(error) => {
            tracing::warn!(target_pod = %pod.workload, %target, error = %crate::logging::Chain(&error), "delivery to the pod failed");
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "the pod refused the connection",
            );
        }
    };
    transport
        .metrics
        .tunnel_streams
        .get_or_create(&TunnelLabels {
            direction: "inbound",
        })
        .inc();
    let on_upgrade = hyper::upgrade::on(&mut request);
    let peer_sans = peer_sans.to_vec();
    let vn = vn.clone();
    let drain = Drain {
        signal: ctx.shutdown.clone(),
        timeout: ctx.drain_timeout,
    };
    streams.spawn(async move {
        // A tcp listener's connection counts against its connectionPool while it is open.
        let _admitted = admitted;
        let started = Instant::now();
        let mut tunnel = match on_upgrade.await {
            Ok(upgraded) => TokioIo::new(upgraded),
            Err(error) => {
                tracing::debug!(error = %crate::logging::Chain(&error), "tunnel stream ended before it was established");
                return;
            }
        };
        let copied = tokio::select! {
            copied = super::copy::bidirectional(&mut tunnel, &mut upstream) => copied,
            () = drain.expired() => Err(std::io::Error::other("closed at the drain timeout")),
        };
        let (received, sent, error) = match copied {
            Ok((a, b)) => (a, b, String::new()),
            Err(e) => (0, 0, e.to_string()),
        };
        tracing::info!(
            target: "strait::tunnel",
            direction = "inbound",
            %peer,
            peer_identity = %peer_sans.join(","),
            source_workload = %source_workload,
            target_pod = %pod.workload,
            virtual_node = %vn,
            target = %target,
            bytes_received = received,
            bytes_sent = sent,
            duration_ms = started.elapsed().as_millis() as u64,
            error,
            "tunnel stream closed"
        );
    });
    Response::new(Empty::new())
}

#[cfg(test)]
mod goaway_watch_tests {
    use super::*;

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut out = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            0,
            0,
            0,
            0,
            1,
        ];
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn sees_a_goaway_frame_however_the_reads_split_it_and_nothing_in_payloads() {
        // SETTINGS, then a DATA frame whose payload looks like a GOAWAY header, then GOAWAY.
        let mut wire = frame(0x4, &[0; 12]);
        wire.extend(frame(0x0, &frame(0x7, &[0; 8])));
        let before_goaway = wire.len();
        wire.extend(frame(0x7, &[0, 0, 0, 5, 0, 0, 0, 0]));
        for chunk in [1, 2, 5, 9, 64] {
            let seen = Arc::new(AtomicBool::new(false));
            let mut watch = GoawayWatch::new((), seen.clone());
            for (i, piece) in wire.chunks(chunk).enumerate() {
                watch.scan(piece);
                let end = (i + 1) * chunk;
                if end < before_goaway + 9 {
                    assert!(
                        !seen.load(Ordering::Acquire),
                        "chunk {chunk}: too early at {end}"
                    );
                }
            }
            assert!(seen.load(Ordering::Acquire), "chunk {chunk}: GOAWAY missed");
        }
    }
}
