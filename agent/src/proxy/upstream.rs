//! Connections from the agent to a virtual node's endpoints.
//!
//! Every path that leaves the agent towards a workload (L4 forwarding, the HTTP proxy's
//! connection pool) connects through here, so the choice of how to reach an endpoint (directly
//! on this node, or through a mutual-TLS tunnel to another node's agent) lives in one place.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::routing::{Endpoints, Target};

/// How long a connect to one endpoint may take before the next endpoint is tried.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// At most this many endpoints are tried for one connection (App Mesh's default retry policy
/// retries connect failures twice).
pub const CONNECT_ATTEMPTS: usize = 3;

/// Why no endpoint could be reached.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("virtual node {0} has no endpoints (check its serviceDiscovery)")]
    NoEndpoints(String),
    #[error(
        "no endpoint of virtual node {virtual_node} accepted a connection (tried {tried}); last error: {last}"
    )]
    Unreachable {
        virtual_node: String,
        tried: usize,
        last: String,
    },
}

/// Connects to one endpoint.
pub async fn connect(endpoint: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(endpoint)).await {
        Ok(result) => result?,
        Err(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connect to {endpoint} timed out after {CONNECT_TIMEOUT:?}"),
            ));
        }
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Connects to the target's endpoints in round-robin order, trying the next one when a
/// connect fails, up to [`CONNECT_ATTEMPTS`].
pub async fn connect_target(
    target: &Target,
    endpoints: &Endpoints,
) -> Result<(TcpStream, SocketAddr), Error> {
    let mut tried = 0;
    let mut last = String::new();
    for ip in endpoints.rotation().take(CONNECT_ATTEMPTS) {
        let endpoint = SocketAddr::new(ip, target.port);
        tried += 1;
        match connect(endpoint).await {
            Ok(stream) => return Ok((stream, endpoint)),
            Err(error) => {
                tracing::warn!(virtual_node = %target.virtual_node, %endpoint, %error, "connect to endpoint failed");
                last = error.to_string();
            }
        }
    }
    if tried == 0 {
        return Err(Error::NoEndpoints(target.virtual_node.to_string()));
    }
    Err(Error::Unreachable {
        virtual_node: target.virtual_node.to_string(),
        tried,
        last,
    })
}
