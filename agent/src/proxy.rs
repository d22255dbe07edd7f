//! The shared proxy: listeners the agent opens on behalf of local workloads, and forwarding.
//!
//! `outbound` handles connections a pod makes to a virtual service (captured by the eBPF
//! connect hooks and redirected to the pod's outbound listener): L4 forwarding for tcp ports,
//! and `http` for ports whose provider speaks http, http2 or grpc. The proxy decides nothing
//! about which pods are enrolled; the app does, and hands it listeners.

pub mod http;
pub mod outbound;
pub mod upstream;

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::redirect::Redirect;
use crate::routing::Table;
use crate::telemetry::Metrics;

/// What every connection handler needs.
pub struct Context {
    pub redirect: Arc<Redirect>,
    /// The routing table in force; replaced whole on every mesh or DNS change.
    pub table: ArcSwap<Table>,
    pub metrics: Metrics,
    /// Cancelled when the agent shuts down: listeners stop accepting.
    pub shutdown: CancellationToken,
    /// Every connection in flight, so shutdown can wait for them to drain.
    pub connections: TaskTracker,
    /// The HTTP proxy's pools and endpoint states.
    pub http: http::Http,
}
