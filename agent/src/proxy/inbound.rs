//! Inbound: connections to a pod's listener ports from outside the mesh.
//!
//! The `strait_sk_lookup` program in the pod's network namespace hands every incoming TCP
//! connection to any local address of the pod (not only the ones in its workload file) on a
//! port whose listener has `tls` STRICT or PERMISSIVE to the agent's inbound socket in that
//! namespace (127.0.0.1 / [::1] on the inbound port; the bound address does not matter to
//! sk_lookup). The socket lives in the pod's namespace, so whatever arrives on it is for this
//! pod, whichever of its addresses it names. Meshed traffic never arrives this way: from another
//! node it comes through the mTLS tunnel, from this node straight to the pod's loopback. So
//! what arrives here is plaintext from outside the mesh:
//!
//! - STRICT: refused (reset at once), logged and counted;
//! - PERMISSIVE: accepted, counted, and delivered to the pod's loopback on the same port
//!   (App Mesh's migration mode);
//! - a port whose tls was removed since (mesh reload in flight): delivered.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::upstream::LocalPod;
use super::{Context, Drain};
use crate::identity::PlaintextLabels;
use crate::mesh::TlsMode;

/// Starts accepting on `listeners` (bound inside the pod's network namespace).
pub fn serve(
    listeners: Vec<std::net::TcpListener>,
    pod: Arc<LocalPod>,
    ctx: Arc<Context>,
) -> std::io::Result<super::Accepting> {
    let workload = pod.workload.clone();
    super::accept(
        listeners,
        &ctx.clone(),
        &workload,
        move |stream, peer, drain| {
            let (pod, ctx) = (pod.clone(), ctx.clone());
            async move { handle(stream, peer, &pod, &ctx, drain).await }
        },
    )
}

async fn handle(
    mut client: TcpStream,
    peer: SocketAddr,
    pod: &LocalPod,
    ctx: &Context,
    drain: Drain,
) {
    let Ok(local) = client.local_addr() else {
        return;
    };
    let transport = &ctx.transport;
    let state = ctx.state.snapshot();
    let mode = state
        .policy
        .listener_tls(&pod.virtual_node, local.port())
        .map(|t| t.mode);
    let count = |mode: &'static str, result: &'static str| {
        transport
            .metrics
            .inbound_plaintext
            .get_or_create(&PlaintextLabels { mode, result })
            .inc();
    };
    match mode {
        Some(TlsMode::Strict) => {
            count("strict", "refused");
            tracing::warn!(
                target: "strait::inbound",
                workload = %pod.workload,
                virtual_node = %pod.virtual_node,
                %peer,
                listener = %local,
                "plaintext connection from outside the mesh refused: the listener's tls mode is STRICT"
            );
            // A reset, not a FIN: the client learns at once that nobody will answer.
            let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
            return;
        }
        Some(TlsMode::Permissive) => {
            count("permissive", "accepted");
            tracing::info!(
                target: "strait::inbound",
                workload = %pod.workload,
                %peer,
                listener = %local,
                "plaintext connection from outside the mesh accepted (PERMISSIVE)"
            );
        }
        _ => {}
    }
    let started = Instant::now();
    // The listener's tcp idle timeout applies here too (`super::idle`).
    let idle = state
        .policy
        .limits
        .tcp_idle(&pod.virtual_node, local.port());
    let mut upstream = match pod.connect_loopback(local.ip(), local.port()).await {
        Ok(s) => super::idle::stream(s, idle),
        Err(error) => {
            tracing::warn!(workload = %pod.workload, %local, error = %crate::logging::Chain(&error), "delivery to the pod failed");
            return;
        }
    };
    // Plain TCP: kept until it ends, or until the drain timeout once the agent or pod goes.
    let copied = tokio::select! {
        copied = super::copy::bidirectional(&mut client, &mut upstream) => copied.ok(),
        () = drain.expired() => None,
    };
    let (received, sent) = copied.unwrap_or_default();
    tracing::info!(
        target: "strait::inbound",
        workload = %pod.workload,
        %peer,
        listener = %local,
        bytes_received = received,
        bytes_sent = sent,
        duration_ms = started.elapsed().as_millis() as u64,
        "plaintext inbound connection closed"
    );
}
