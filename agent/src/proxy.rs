//! The shared proxy: listeners the agent opens on behalf of local workloads, and forwarding.
//!
//! `outbound` handles connections a pod makes to a virtual service (captured by the eBPF
//! connect hooks and redirected to the pod's outbound listener): L4 forwarding for tcp ports,
//! and `http` for ports whose provider speaks http, http2 or grpc. `inbound` handles plaintext
//! arriving at a pod's captured listener ports from outside the mesh; `hbone` the mTLS tunnels
//! between nodes; `upstream` decides how each endpoint is reached. The proxy decides nothing
//! about which pods are enrolled; the app does, and hands it listeners.

pub mod admission;
pub mod breaker;
pub mod copy;
pub mod hbone;
pub mod http;
pub mod idle;
pub mod inbound;
pub mod outbound;
pub mod received;
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
    /// Every connection in flight, so shutdown can wait for them to drain.
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
        let (ctx, stop, handle, workload) =
            (ctx.clone(), stop.clone(), handle.clone(), workload.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                match accepted {
                    Ok((stream, peer)) => {
                        let drain = Drain {
                            signal: stop.clone(),
                            timeout: ctx.drain_timeout,
                        };
                        ctx.connections.spawn(handle(stream, peer, drain));
                    }
                    Err(error) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(%workload, error = %crate::logging::Chain(&error), "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
    }
    Ok(Accepting { stop })
}
