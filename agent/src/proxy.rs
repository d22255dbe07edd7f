//! The shared proxy: listeners the agent opens on behalf of local workloads, and forwarding.
//!
//! `outbound` handles connections a pod makes to a virtual service (captured by the eBPF
//! connect hooks and redirected to the pod's outbound listener): L4 forwarding for tcp ports,
//! and `http` for ports whose provider speaks http, http2 or grpc. `inbound` handles plaintext
//! arriving at a pod's captured listener ports from outside the mesh; `hbone` the mTLS tunnels
//! between nodes; `upstream` decides how each endpoint is reached. The proxy decides nothing
//! about which pods are enrolled; the app does, and hands it listeners.

pub mod hbone;
pub mod http;
pub mod inbound;
pub mod outbound;
pub mod upstream;

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use std::collections::BTreeMap;

use crate::mesh::ResourceId;
use crate::redirect::Redirect;
use crate::routing::Table;
use crate::telemetry::access_log::AccessLog;
use crate::telemetry::{Metrics, Telemetry};

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
    /// Access logs by source virtual node (`logging.accessLog`); replaced on mesh reload.
    pub access_logs: ArcSwap<BTreeMap<ResourceId, AccessLog>>,
    /// Local pods, peer nodes, identities and the mTLS tunnel pool (see `upstream`).
    pub transport: Arc<upstream::Transport>,
    /// The HTTP proxy's pools and endpoint states.
    pub http: http::Http,
    /// Per-request and per-connection telemetry (request metrics, TCP connection metrics,
    /// access logs, traces); None under `--telemetry off`.
    pub telemetry: Option<Arc<Telemetry>>,
}
