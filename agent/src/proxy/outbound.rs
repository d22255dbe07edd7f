//! Outbound: a pod called a virtual service, the connect hook redirected it to the pod's
//! outbound listener (127.0.0.1/[::1] on the outbound port, inside the pod's network
//! namespace), and the agent forwards it to an endpoint of the virtual node the route picks.
//!
//! The original destination comes from the eBPF map, keyed by the accepted socket's network
//! namespace cookie and peer address (the sock_ops program re-keyed it at connect time).

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio::net::TcpStream;

use super::{Context, Drain, http, upstream};
use crate::mesh::ResourceId;
use crate::redirect::{self, Taken};
use crate::routing::{Action, pick_weighted};
use crate::telemetry::access_log;
use crate::telemetry::{BytesLabels, FailureLabels, TcpLabels};

/// The workload a listener accepts connections for.
#[derive(Debug)]
pub struct Source {
    pub workload: ResourceId,
    pub virtual_node: ResourceId,
    /// The pod's addresses (the HTTP proxy's `x-forwarded-for`).
    pub ips: Vec<IpAddr>,
}

/// Starts accepting on `listeners` (already bound inside the pod's network namespace).
pub fn serve(
    listeners: Vec<std::net::TcpListener>,
    source: Arc<Source>,
    ctx: Arc<Context>,
) -> std::io::Result<super::Accepting> {
    let workload = source.workload.clone();
    super::accept(
        listeners,
        &ctx.clone(),
        &workload,
        move |stream, peer, drain| {
            let (source, ctx) = (source.clone(), ctx.clone());
            async move { forward(stream, peer, &source, &ctx, drain).await }
        },
    )
}

async fn forward(
    mut client: TcpStream,
    peer: SocketAddr,
    source: &Arc<Source>,
    ctx: &Arc<Context>,
    drain: Drain,
) {
    let started = Instant::now();
    let started_at = SystemTime::now();
    // One snapshot for the whole connection: its route, backend rule, breaker and access
    // log all come from one mesh version.
    let state = ctx.state.snapshot();
    let table = &state.table;
    let fail = |reason: &'static str| {
        ctx.metrics
            .tcp_failures
            .get_or_create(&FailureLabels {
                mesh: table.mesh.clone(),
                source_virtual_node: source.virtual_node.to_string(),
                reason,
            })
            .inc();
    };
    let original = match original_destination(&client, peer, ctx) {
        Ok(Taken::Found(original)) => original,
        Ok(Taken::OtherListener { expected }) => {
            fail("other_listener");
            tracing::warn!(workload = %source.workload, %peer, expected_listener = expected, "this connection's client port was captured for another outbound listener (a workload sharing the network namespace reusing another's port?); refusing it");
            return;
        }
        Ok(Taken::Missing) => {
            fail("lookup_miss");
            tracing::warn!(workload = %source.workload, %peer, "no original destination recorded for this connection; closing it");
            return;
        }
        Err(error) => {
            fail("lookup_error");
            tracing::error!(workload = %source.workload, %peer, %error, "cannot read the original destination");
            return;
        }
    };
    let Some(service) = table.services.get(&original.addr).cloned() else {
        fail("unknown_service");
        tracing::warn!(workload = %source.workload, orig_dst = %original.addr, "captured destination is no longer a mesh service; closing");
        return;
    };
    if service.http.is_some() {
        let _ = client.set_nodelay(true);
        // Boxed, like the connect below: this task's future is as large as the largest of its
        // branches, and an L4 connection keeps its future for as long as it is open.
        Box::pin(http::serve(
            client,
            original.addr,
            source.clone(),
            ctx.clone(),
            drain,
        ))
        .await;
        return;
    }
    let target = match &service.action {
        Action::Node(target) => Some(target.clone()),
        Action::Weighted { targets, .. } => pick_weighted(targets, &mut rand::rng()).cloned(),
        Action::NoRoute { reason } => {
            fail("no_route");
            tracing::warn!(workload = %source.workload, orig_dst = %original.addr, virtual_service = %service.service, "{reason}");
            return;
        }
    };
    let Some(target) = target else {
        fail("no_target");
        tracing::warn!(virtual_service = %service.service, "every weighted target has weight 0");
        return;
    };
    let labels = TcpLabels {
        mesh: table.mesh.clone(),
        source_virtual_node: source.virtual_node.to_string(),
        target_virtual_service: service.service.to_string(),
        target_virtual_node: target.virtual_node.to_string(),
    };
    let Some(endpoints) = table.endpoints.get(&target.virtual_node).cloned() else {
        fail("no_endpoints");
        return;
    };
    // The access log line of a connection closed before it was forwarded, with Envoy's flags.
    let log_refused = |flags: &str| {
        if let Some(log) = state
            .access_logs
            .get(&source.virtual_node)
            .filter(|_| ctx.telemetry.is_some())
        {
            log.log(&access_log::Entry {
                start: Some(started_at),
                duration: started.elapsed(),
                protocol: "TCP",
                upstream_cluster: target.virtual_node.to_string(),
                downstream_remote: Some(peer),
                downstream_local: Some(original.addr),
                route_name: route_name(&service.action),
                response_flags: flags.into(),
                ..access_log::Entry::default()
            });
        }
    };
    // The backend's circuit breaker: maxConnections bounds the connections open to the target.
    let breaker = {
        ctx.transport.admission.breaker(
            &state.policy,
            &source.virtual_node,
            &service.service,
            &target.virtual_node,
        )
    };
    let _connection_permit = match breaker.as_ref().map(|b| b.connection()) {
        Some(Err(overflow)) => {
            fail("circuit_breaker");
            tracing::info!(
                workload = %source.workload,
                virtual_service = %service.service,
                virtual_node = %target.virtual_node,
                reason = overflow.0,
                "circuit breaker overflow (clientPolicy.circuitBreaker); closing the client's connection"
            );
            // Envoy's flag for a circuit breaker overflow.
            log_refused("UO");
            return;
        }
        Some(Ok(permit)) => permit,
        None => None,
    };
    let caller = upstream::Caller {
        workload: &source.workload,
        virtual_node: &source.virtual_node,
        service: &service.service,
    };
    // The connect's future (a new tunnel's TLS and HTTP/2 handshakes among its states) is
    // several times larger than the rest of this one, and is done with once connected: boxed,
    // it is freed then, instead of being carried by every open connection, idle or not.
    let connect = Box::pin(upstream::connect_target(
        ctx, &state, &caller, &target, &endpoints,
    ));
    let (upstream, endpoint) = match connect.await {
        Ok(connected) => connected,
        Err(error) => {
            fail("upstream_connect");
            tracing::warn!(
                workload = %source.workload,
                virtual_service = %service.service,
                "{error}; closing the client's connection"
            );
            // Envoy's flags: no endpoints (UH), the mesh's backend rule (UAEX), a failed
            // connect (UF), after several endpoints were tried (URX, max connect attempts).
            let flags = match &error {
                upstream::Error::NoEndpoints(_) => "UH",
                upstream::Error::NotABackend { .. } => "UAEX",
                upstream::Error::Unreachable { tried, .. } if *tried > 1 => "UF,URX",
                upstream::Error::Unreachable { .. } => "UF",
            };
            log_refused(flags);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    // A tcpRoute's idle timeout, at the calling side (where App Mesh's caller Envoy had it).
    let mut upstream: upstream::Stream = match &service.action {
        Action::Weighted {
            idle: Some(idle), ..
        } => upstream::Stream::new(super::idle::IdleTimeout::new(upstream, *idle)),
        _ => upstream,
    };
    // `--telemetry off` skips the connection metrics and the access log line.
    let telemetry = ctx.telemetry.is_some();
    let active = telemetry.then(|| {
        ctx.metrics.tcp_opened.get_or_create(&labels).inc();
        let active = ctx.metrics.tcp_active.get_or_create(&labels).clone();
        active.inc();
        active
    });
    // An L4 connection has no way to be told to end: it goes on until one side closes it, or
    // until the drain timeout once the agent (or the pod) is going away.
    let copied = tokio::select! {
        copied = super::copy::bidirectional(&mut client, &mut upstream) => copied,
        () = drain.expired() => Err(std::io::Error::other("closed at the drain timeout")),
    };
    let (sent, received, error) = match copied {
        Ok((sent, received)) => (sent, received, None),
        Err(error) => (0, 0, Some(error.to_string())),
    };
    if let Some(active) = active {
        active.dec();
        ctx.metrics.tcp_closed.get_or_create(&labels).inc();
    }
    for (direction, bytes) in [("sent", sent), ("received", received)]
        .into_iter()
        .filter(|_| telemetry)
    {
        ctx.metrics
            .tcp_bytes
            .get_or_create(&BytesLabels {
                mesh: labels.mesh.clone(),
                source_virtual_node: labels.source_virtual_node.clone(),
                target_virtual_service: labels.target_virtual_service.clone(),
                target_virtual_node: labels.target_virtual_node.clone(),
                direction,
            })
            .inc_by(bytes);
    }
    if let Some(log) = state
        .access_logs
        .get(&source.virtual_node)
        .filter(|_| telemetry)
    {
        log.log(&access_log::Entry {
            start: Some(started_at),
            duration: started.elapsed(),
            protocol: "TCP",
            bytes_received: sent,
            bytes_sent: received,
            upstream_host: Some(endpoint),
            upstream_cluster: target.virtual_node.to_string(),
            downstream_remote: Some(peer),
            downstream_local: Some(original.addr),
            route_name: route_name(&service.action),
            response_flags: if error.is_some() {
                "UC".into()
            } else {
                String::new()
            },
            ..access_log::Entry::default()
        });
    }
    tracing::info!(
        target: "strait::connection",
        source_workload = %source.workload,
        source_virtual_node = %source.virtual_node,
        orig_dst = %original.addr,
        virtual_service = %service.service,
        virtual_node = %target.virtual_node,
        endpoint = %endpoint,
        bytes_sent = sent,
        bytes_received = received,
        duration_ms = started.elapsed().as_millis() as u64,
        error = error.as_deref().unwrap_or(""),
        "connection closed"
    );
}

fn route_name(action: &Action) -> String {
    match action {
        Action::Weighted { route, .. } => route.clone(),
        _ => String::new(),
    }
}

fn original_destination(
    client: &TcpStream,
    peer: SocketAddr,
    ctx: &Context,
) -> Result<Taken, String> {
    let cookie = redirect::socket_netns_cookie(client.as_fd())
        .map_err(|e| format!("SO_NETNS_COOKIE: {e}"))?;
    let listener = client
        .local_addr()
        .map_err(|e| format!("local address of the accepted socket: {e}"))?;
    ctx.redirect
        .take_original_destination(cookie, peer, listener.port())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{Endpoints, Target};
    use crate::state::State;

    // The sizes of the futures the async fns return, read from their types (no call needed).

    fn forward_size<'a, Fut: Future>(
        _: fn(TcpStream, SocketAddr, &'a Arc<Source>, &'a Arc<Context>, Drain) -> Fut,
    ) -> usize {
        size_of::<Fut>()
    }

    fn serve_size<Fut: Future>(
        _: fn(TcpStream, SocketAddr, Arc<Source>, Arc<Context>, Drain) -> Fut,
    ) -> usize {
        size_of::<Fut>()
    }

    fn connect_size<'a, Fut: Future>(
        _: fn(&'a Context, &'a State, &'a upstream::Caller<'a>, &'a Target, &'a Endpoints) -> Fut,
    ) -> usize {
        size_of::<Fut>()
    }

    /// An open L4 connection keeps its handler's future for as long as it is open, idle or
    /// not: the future must not hold the connect's states or the HTTP proxy's, each larger
    /// than everything else it holds (docs/benchmarks.md, "Scale": memory per idle connection).
    #[test]
    fn an_open_connection_does_not_carry_the_connect_or_the_http_proxy() {
        let connection = forward_size(forward);
        let connect = connect_size(upstream::connect_target);
        let http = serve_size(http::serve::<Context, TcpStream>);
        assert!(
            connection < connect && connection < http,
            "the L4 connection's future is {connection} bytes; the connect's is {connect}, the \
             HTTP proxy's {http}: one of them is inline again"
        );
    }
}
