//! Route selection for one request: the virtual service port (the captured destination, or a
//! gateway listener's pick), the request path, the App Mesh route, the route's `rateLimit` and
//! the weighted target. It either returns where the request goes ([`Routed`]) or why the proxy
//! answers it itself ([`Reject`]); the caller records telemetry once from the result and from
//! [`Way`], how far routing got.

use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::body::ResponseBody;
use super::{Downstream, EdgeAnswer, EdgeReply, Env, local, pick_target};
use crate::mesh::Protocol;
use crate::routing::ServicePort;
use crate::routing::http::{HttpRoute, HttpTarget, RequestView, normalize_path};
use crate::state::State as Snapshot;

/// Where a request goes: the virtual service port, its route and the weighted target picked
/// for this request, and the normalised path it matched on.
pub(super) struct Routed {
    pub service: Arc<ServicePort>,
    pub route: Arc<HttpRoute>,
    /// Index of the picked target in `route.targets`.
    target: usize,
    pub path: String,
    pub query: Option<String>,
}

impl Routed {
    pub fn target(&self) -> &HttpTarget {
        &self.route.targets[self.target]
    }
}

/// How far routing got, whether it routed the request or not: what the request's telemetry
/// names (gateway route, target virtual service, route).
#[derive(Default)]
pub(super) struct Way {
    pub gateway_route: Option<String>,
    pub service: Option<Arc<ServicePort>>,
    pub route: Option<Arc<HttpRoute>>,
}

/// A request the proxy answers itself instead of forwarding it.
pub(super) enum Reject {
    /// An answer with `status` (gRPC clients get the status mapped as Envoy maps it) and
    /// Envoy's response flag: `NR` (no route, no longer a mesh service), `DPE` (a request the
    /// proxy cannot forward).
    Local {
        status: StatusCode,
        message: String,
        flag: &'static str,
    },
    /// A rate limit's refusal: 429 with `retry-after` (gRPC: RESOURCE_EXHAUSTED), flag `RL`.
    RateLimited { message: String, wait: Duration },
    /// The gateway answers the request itself (its listener's health check): not a request
    /// of the mesh, so out of the request metrics and access logs.
    Answer(EdgeAnswer),
}

impl Reject {
    fn no_route(status: StatusCode, message: String) -> Reject {
        Reject::Local {
            status,
            message,
            flag: "NR",
        }
    }

    fn malformed(message: String) -> Reject {
        Reject::Local {
            status: StatusCode::BAD_REQUEST,
            message,
            flag: "DPE",
        }
    }

    /// Envoy's response flag; None for a request the telemetry does not count.
    pub fn flag(&self) -> Option<&'static str> {
        match self {
            Reject::Local { flag, .. } => Some(*flag),
            Reject::RateLimited { .. } => Some("RL"),
            Reject::Answer(_) => None,
        }
    }

    /// The answer to the client.
    pub async fn reply(self, grpc: bool, request: Request<Incoming>) -> Response<ResponseBody> {
        match self {
            Reject::Local {
                status, message, ..
            } => local(grpc, status, &message),
            Reject::RateLimited { message, wait } => {
                crate::proxy::admission::rate_limited_reply(grpc, &message, wait)
            }
            Reject::Answer(answer) => answer(request).await,
        }
    }
}

impl<E: Env> Downstream<E> {
    /// Routes a request (a gateway's route may rewrite it), noting in `way` how far it got.
    pub(super) fn route(
        &self,
        snapshot: &Snapshot,
        parts: &mut Parts,
        way: &mut Way,
    ) -> Result<Routed, Reject> {
        let table = &snapshot.table;
        let service = match &self.ingress {
            Some(ingress) => match ingress.route(snapshot, parts) {
                Ok((service, route)) => {
                    way.gateway_route = Some(route);
                    service
                }
                Err(EdgeReply::Refused(status, message)) => {
                    return Err(Reject::no_route(status, message));
                }
                Err(EdgeReply::RateLimited { message, wait }) => {
                    return Err(Reject::RateLimited { message, wait });
                }
                Err(EdgeReply::Answer(answer)) => return Err(Reject::Answer(answer)),
            },
            None => match table.services.get(&self.orig_dst) {
                Some(service) => service.clone(),
                None => {
                    return Err(Reject::no_route(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("{} is no longer a mesh service", self.orig_dst),
                    ));
                }
            },
        };
        way.service = Some(service.clone());
        let vs = &service.service;
        let Some(routes) = &service.http else {
            return Err(Reject::no_route(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("virtual service {vs} no longer speaks HTTP on this port"),
            ));
        };
        if parts.method == Method::CONNECT {
            return Err(Reject::malformed(format!(
                "virtual service {vs}: CONNECT is not supported"
            )));
        }
        let raw_path = parts.uri.path();
        let path = if routes.protocol == Protocol::Grpc {
            if !raw_path.starts_with('/') {
                return Err(Reject::malformed("malformed request path".to_owned()));
            }
            raw_path.to_owned()
        } else {
            normalize_path(raw_path, true)
                .map_err(|error| Reject::malformed(format!("malformed request path: {error}")))?
        };
        let query = parts.uri.query().map(str::to_owned);
        let Some(route) = routes
            .select(&RequestView {
                method: &parts.method,
                path: &path,
                query: query.as_deref(),
                scheme: parts.uri.scheme_str().unwrap_or("http"),
                headers: &parts.headers,
            })
            .cloned()
        else {
            tracing::debug!(target: "strait::request", source_workload = %self.source.workload, virtual_service = %vs, method = %parts.method, path = %path, status = 404u16, "no route matched");
            return Err(Reject::no_route(
                StatusCode::NOT_FOUND,
                format!("virtual service {vs}: no route matches {path}"),
            ));
        };
        way.route = Some(route.clone());
        // The route's own rateLimit, applied here where the route is known (per calling node).
        if let Some(limit) = &route.rate_limit
            && let Err(limited) = self.env.route_rate_limit(
                snapshot,
                vs,
                &route.name,
                limit,
                &self.source.virtual_node,
            )
        {
            return Err(Reject::RateLimited {
                message: format!("virtual service {vs}: {limited}"),
                wait: limited.wait,
            });
        }
        let Some(target) = pick_target(&route.targets) else {
            return Err(Reject::no_route(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "virtual service {vs} route {}: every weighted target has weight 0",
                    route.name
                ),
            ));
        };
        Ok(Routed {
            service,
            route,
            target,
            path,
            query,
        })
    }
}
