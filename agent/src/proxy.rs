//! The shared proxy: listeners the agent opens on behalf of local workloads, and forwarding.
//!
//! `outbound` handles connections a pod makes to a virtual service (captured by the eBPF
//! connect hooks and redirected to the pod's outbound listener): L4 forwarding for tcp ports,
//! and `http` for ports whose provider speaks http, http2 or grpc. `inbound` handles plaintext
//! arriving at a pod's captured listener ports from outside the mesh; `hbone` the mTLS tunnels
//! between nodes (`coalesce` gathers a tunnel client's writes); `upstream` decides how each
//! endpoint is reached; `streams` runs a connection's HTTP/2 streams on the connection's own
//! task. The proxy decides nothing about which pods are enrolled; the app does, and hands it
//! listeners.

pub mod admission;
pub mod breaker;
pub mod coalesce;
pub mod copy;
pub mod hbone;
pub mod http;
pub mod idle;
pub mod inbound;
pub mod outbound;
pub mod parts;
pub mod received;
pub mod streams;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::mesh::ResourceId;
use crate::redirect::Redirect;
use crate::state::Published;
use crate::telemetry::{Metrics, Telemetry};

/// What every connection handler needs.
pub struct Context {
    pub redirect: Arc<Redirect>,
    /// The state in force (table, policy, access logs), replaced whole on every mesh or DNS
    /// change: a connection or request takes one snapshot and reads only that.
    pub state: Arc<Published>,
    pub metrics: Metrics,
    /// Cancelled when the agent shuts down (SIGTERM, or a new agent took the listeners over):
    /// listeners stop accepting and every connection drains (see [`Drain`]).
    pub shutdown: CancellationToken,
    /// How long a draining connection may go on (`--drain-timeout`).
    pub drain_timeout: Duration,
    /// Every connection in flight and every accept loop, so shutdown can wait for them to
    /// drain (see [`spawn_accept_loop`]).
    pub connections: TaskTracker,
    /// Local pods, peer nodes, identities and the mTLS tunnel pool (see `upstream`).
    pub transport: Arc<upstream::Transport>,
    /// The HTTP proxy's pools and endpoint states.
    pub http: http::Http,
    /// Per-request and per-connection telemetry (request metrics, TCP connection metrics,
    /// access logs, traces); None under `--telemetry off`.
    pub telemetry: Option<Arc<Telemetry>>,
}

/// What `strait status` shows of resilience (`/status/resilience`): endpoints ejected by
/// outlier detection, and the client circuit breakers with the limits they have reached.
pub fn resilience_status(ctx: &Context) -> serde_json::Value {
    let breakers = ctx.transport.admission.breakers.status();
    serde_json::json!({
        "ejected_endpoints": ctx.http.endpoints.ejected(),
        "open_breakers": breakers.iter().filter(|b| !b.open.is_empty()).collect::<Vec<_>>(),
        "breakers": breakers,
    })
}

/// The drain signal of one connection: cancelled when its listener stops for good (the agent
/// shuts down or hands its listeners over, or the pod leaves). A draining connection takes no
/// new work where its protocol can say so (HTTP/1.1 `Connection: close` on the next response,
/// HTTP/2 GOAWAY) and is closed at the latest `timeout` after the signal.
#[derive(Clone)]
pub struct Drain {
    pub signal: CancellationToken,
    pub timeout: Duration,
}

impl Drain {
    /// Whether the drain has begun.
    pub fn started(&self) -> bool {
        self.signal.is_cancelled()
    }

    /// Resolves when the drain timeout has run out (never before the drain began).
    pub async fn expired(&self) {
        self.signal.cancelled().await;
        tokio::time::sleep(self.timeout).await;
    }
}

/// Sockets the agent accepts on for one pod. Dropping it stops accepting; connections in
/// flight drain (see [`Drain`]) and the agent's connection tracker waits for them.
pub struct Accepting {
    stop: CancellationToken,
}

impl Drop for Accepting {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Accepts on every listener (already bound inside the pod's network namespace) and runs
/// `handle` for each connection, tracked for draining; its [`Drain`] starts when the
/// [`Accepting`] is dropped or the agent shuts down. `workload` names the pod in logs.
pub fn accept<F, Fut>(
    listeners: Vec<std::net::TcpListener>,
    ctx: &Arc<Context>,
    workload: &ResourceId,
    handle: F,
) -> std::io::Result<Accepting>
where
    F: Fn(TcpStream, SocketAddr, Drain) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let stop = ctx.shutdown.child_token();
    for listener in listeners {
        let listener = TcpListener::from_std(listener)?;
        let (connections, drain_timeout, handle) =
            (ctx.connections.clone(), ctx.drain_timeout, handle.clone());
        let signal = stop.clone();
        spawn_accept_loop(
            listener,
            stop.clone(),
            &ctx.connections,
            workload.to_string(),
            move |stream, peer| {
                let drain = Drain {
                    signal: signal.clone(),
                    timeout: drain_timeout,
                };
                connections.spawn(handle(stream, peer, drain));
            },
        );
    }
    Ok(Accepting { stop })
}

/// Runs `listener`'s accept loop until `stop`, passing each connection to `accepted` (which
/// spawns its handler on `connections`).
///
/// The loop itself is a task of `connections`, so the agent's drain (which closes the tracker
/// and waits for it to empty) cannot end between an accept and the spawn of its handler: a
/// connection accepted in that instant would be dropped with the process, closed before a
/// byte was sent (an upgrade did that to one connect in a few hundred). Once `stop` is
/// cancelled no further connect is taken: during an upgrade it waits in the shared backlog
/// for the new agent. `name` says whose listener it is in logs.
pub fn spawn_accept_loop<F>(
    listener: TcpListener,
    stop: CancellationToken,
    connections: &TaskTracker,
    name: String,
    mut accepted: F,
) where
    F: FnMut(TcpStream, SocketAddr) + Send + 'static,
{
    connections.spawn(async move {
        loop {
            let result = tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                result = listener.accept() => result,
            };
            match result {
                Ok((stream, peer)) => accepted(stream, peer),
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(listener = %name, error = %crate::logging::Chain(&error), "accept failed");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The drain cannot finish while an accept loop runs: a connection it has accepted and not
    /// yet handed to its handler would be lost with the process.
    #[tokio::test]
    async fn the_drain_waits_for_the_accept_loop_to_stop() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stop = CancellationToken::new();
        let connections = TaskTracker::new();
        spawn_accept_loop(
            listener,
            stop.clone(),
            &connections,
            "test".into(),
            |_, _| {},
        );
        connections.close();
        let early = tokio::time::timeout(Duration::from_millis(200), connections.wait()).await;
        assert!(
            early.is_err(),
            "the drain ended with the accept loop running"
        );
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), connections.wait())
            .await
            .expect("the accept loop ends at the stop");
    }
}
