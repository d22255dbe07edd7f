//! GatewayRoutes compiled per gateway listener, request matching, and App Mesh's rewrites.
//!
//! What App Mesh's gateway Envoy did, and this module reproduces:
//! - the routes a listener serves are the gateway's (`MeshConfig::gateway_routes_for`: the
//!   `virtualGatewayRef`, else `namespaceSelector` and `gatewayRouteSelector`) whose kind is
//!   the listener's protocol (`httpRoute` on `http`, `http2Route` on `http2`, `grpcRoute` on
//!   `grpc`) and whose `match.port`, if any, is the listener's port;
//! - they are tried by `priority` (0 first; absent is 1000, the lowest), then the most specific
//!   path first (an exact `path`, then the longest `prefix`), then by name; the first match wins;
//! - `prefix`, `path`, `headers`, `method`, `queryParameters` and gRPC `serviceName` and
//!   `metadata` mean what they mean on a VirtualRouter route (`routing::http`);
//! - `hostname` is matched against the request's host (`:authority`, else `Host`) without its
//!   port and without regard to case: `exact` is equality, `suffix` the end of the name;
//! - rewrites: a `prefix` match replaces the matched prefix by `/` unless
//!   `rewrite.prefix.defaultPrefix` is `DISABLED` (`value` replaces it by that value instead);
//!   `rewrite.path.exact` replaces the whole path; the host becomes the target virtual
//!   service's name unless `rewrite.hostname.defaultTargetHostname` is `DISABLED`.
//!
//! Nothing here does I/O; the listener (`gateway.rs`) and the HTTP proxy use it.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Method, StatusCode, Uri};

use crate::mesh::{
    GatewayRoute, GatewayRouteKind, HostnameMatch, MeshConfig, PathMatch, Protocol, ResourceId,
    Toggle, VirtualGateway,
};
use crate::routing::http::{
    GrpcMatch, HttpMatch, PathRule, RequestView, RouteMatch, compile_headers, full_regex,
    method_name, normalize_path,
};
use crate::routing::{ServicePort, Table};

/// App Mesh's default GatewayRoute priority (the lowest).
pub const DEFAULT_PRIORITY: u32 = 1000;

/// Every gateway listener of one mesh and the routes it serves.
#[derive(Debug, Default)]
pub struct GatewayTable {
    pub listeners: BTreeMap<(ResourceId, u16), Arc<ListenerRoutes>>,
}

/// The routes of one gateway listener, in the order they are tried.
#[derive(Debug)]
pub struct ListenerRoutes {
    pub gateway: ResourceId,
    pub port: u16,
    pub protocol: Protocol,
    pub routes: Vec<CompiledRoute>,
}

/// One GatewayRoute, ready to match.
#[derive(Debug)]
pub struct CompiledRoute {
    /// `namespace/name` of the GatewayRoute.
    pub name: String,
    matcher: RouteMatch,
    /// The matched prefix (for the default and `value` prefix rewrites).
    prefix: Option<String>,
    hostname: Option<HostnameMatch>,
    pub target: ResourceId,
    pub target_port: Option<u16>,
    rewrite: Rewrite,
}

#[derive(Debug, Default)]
struct Rewrite {
    /// None: the path's prefix is left alone.
    prefix: Option<String>,
    path: Option<String>,
    /// Host becomes the target virtual service's name.
    hostname: bool,
}

/// The sort key of a route: priority, then specificity (higher first), then name.
fn order(route: &GatewayRoute) -> (u32, std::cmp::Reverse<usize>, ResourceId) {
    let specificity = match &route.spec.kind {
        GatewayRouteKind::Http(r) | GatewayRouteKind::Http2(r) => {
            match (&r.r#match.path, &r.r#match.prefix) {
                (Some(PathMatch::Exact(_)), _) => usize::MAX,
                (_, Some(prefix)) => prefix.len(),
                _ => 0,
            }
        }
        GatewayRouteKind::Grpc(_) => 0,
    };
    (
        route.spec.priority.unwrap_or(DEFAULT_PRIORITY),
        std::cmp::Reverse(specificity),
        route.id.clone(),
    )
}

impl GatewayTable {
    pub fn compile(mesh: &MeshConfig) -> GatewayTable {
        let mut table = GatewayTable::default();
        for gateway in &mesh.virtual_gateways {
            let mut routes = mesh.gateway_routes_for(gateway);
            routes.sort_by_key(|r| order(r));
            for listener in &gateway.spec.listeners {
                let port = listener.port_mapping.port;
                let protocol = listener.port_mapping.protocol;
                let compiled = routes
                    .iter()
                    .filter_map(|route| compile_route(route, protocol, port))
                    .collect();
                table.listeners.insert(
                    (gateway.id.clone(), port),
                    Arc::new(ListenerRoutes {
                        gateway: gateway.id.clone(),
                        port,
                        protocol,
                        routes: compiled,
                    }),
                );
            }
        }
        table
    }
}

/// The route for this listener, or None when its kind or `match.port` is another listener's.
fn compile_route(route: &GatewayRoute, protocol: Protocol, port: u16) -> Option<CompiledRoute> {
    let name = route.id.to_string();
    match (&route.spec.kind, protocol) {
        (GatewayRouteKind::Http(r), Protocol::Http)
        | (GatewayRouteKind::Http2(r), Protocol::Http2) => {
            let m = &r.r#match;
            if m.port.is_some_and(|p| p != port) {
                return None;
            }
            let matcher = HttpMatch {
                prefix: m.prefix.clone(),
                path: match &m.path {
                    Some(PathMatch::Exact(p)) => Some(PathRule::Exact(p.clone())),
                    Some(PathMatch::Regex(re)) => Some(PathRule::Regex(full_regex(re)?)),
                    None => None,
                },
                headers: compile_headers(&m.headers)?,
                method: m
                    .method
                    .map(|method| Method::from_bytes(method_name(method).as_bytes()))
                    .transpose()
                    .ok()?,
                scheme: None,
                query: m
                    .query_parameters
                    .iter()
                    .map(|q| (q.name.clone(), q.exact.clone()))
                    .collect(),
            };
            let rw = r.action.rewrite.clone().unwrap_or_default();
            let prefix = match (&m.prefix, &rw.prefix) {
                (None, _) => None,
                (Some(_), Some(p)) if p.value.is_some() => p.value.clone(),
                (Some(_), Some(p)) if p.default_prefix == Some(Toggle::Disabled) => None,
                (Some(_), _) => Some("/".to_owned()),
            };
            Some(CompiledRoute {
                name,
                matcher: RouteMatch::Http(matcher),
                prefix: m.prefix.clone(),
                hostname: m.hostname.clone(),
                target: r.action.target.virtual_service.clone(),
                target_port: r.action.target.port,
                rewrite: Rewrite {
                    prefix,
                    path: rw.path.clone(),
                    hostname: rw.hostname != Some(Toggle::Disabled),
                },
            })
        }
        (GatewayRouteKind::Grpc(r), Protocol::Grpc) => {
            let m = &r.r#match;
            if m.port.is_some_and(|p| p != port) {
                return None;
            }
            Some(CompiledRoute {
                name,
                matcher: RouteMatch::Grpc(GrpcMatch {
                    service: m.service_name.clone(),
                    method: None,
                    metadata: compile_headers(&m.metadata)?,
                }),
                prefix: None,
                hostname: m.hostname.clone(),
                target: r.action.target.virtual_service.clone(),
                target_port: r.action.target.port,
                rewrite: Rewrite {
                    prefix: None,
                    path: None,
                    hostname: r.action.rewrite_hostname != Some(Toggle::Disabled),
                },
            })
        }
        _ => None,
    }
}

/// The request's host without its port, lower case: `:authority` (HTTP/2, absolute-form),
/// else the `Host` header.
pub fn request_host(parts: &Parts) -> Option<String> {
    let raw = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })?;
    Some(strip_port(&raw).to_ascii_lowercase())
}

/// `example.com:8080` -> `example.com`, `[::1]:80` -> `[::1]`; a name without a port as is.
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

fn host_matches(rule: &HostnameMatch, host: Option<&str>) -> bool {
    let Some(host) = host else {
        return false;
    };
    match rule {
        HostnameMatch::Exact(name) => host == name.to_ascii_lowercase(),
        HostnameMatch::Suffix(suffix) => host.ends_with(&suffix.to_ascii_lowercase()),
    }
}

/// A request the listener sends on: the target's port, and the route's name.
#[derive(Debug)]
pub struct Routed {
    pub service: Arc<ServicePort>,
    pub route: String,
}

impl ListenerRoutes {
    /// Matches the request, rewrites it as the route says (path, host) and finds the target
    /// virtual service's port in `table`. The error is the status and message the client gets.
    pub fn route(&self, table: &Table, parts: &mut Parts) -> Result<Routed, (StatusCode, String)> {
        let raw_path = parts.uri.path().to_owned();
        let path = if self.protocol == Protocol::Grpc {
            raw_path
        } else {
            normalize_path(&raw_path, true).map_err(|error| {
                (
                    StatusCode::BAD_REQUEST,
                    format!("malformed request path: {error}"),
                )
            })?
        };
        let query = parts.uri.query().map(str::to_owned);
        let host = request_host(parts);
        let view = RequestView {
            method: &parts.method,
            path: &path,
            query: query.as_deref(),
            scheme: "http",
            headers: &parts.headers,
        };
        let Some(route) = self.routes.iter().find(|route| {
            route
                .hostname
                .as_ref()
                .is_none_or(|h| host_matches(h, host.as_deref()))
                && route.matcher.matches(&view)
        }) else {
            return Err((
                StatusCode::NOT_FOUND,
                format!(
                    "virtual gateway {} port {}: no gateway route matches {} {path}",
                    self.gateway,
                    self.port,
                    host.as_deref().unwrap_or("(no host)")
                ),
            ));
        };
        let service = target_port(table, &route.target, route.target_port).ok_or_else(|| {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "gateway route {}: virtual service {}{} has no such port (check its provider's listeners)",
                    route.name,
                    route.target,
                    route.target_port.map(|p| format!(" port {p}")).unwrap_or_default()
                ),
            )
        })?;
        let new_path = route.rewrite_path(&path);
        let path_and_query = match &query {
            Some(q) => format!("{new_path}?{q}"),
            None => new_path,
        };
        let host = if route.rewrite.hostname {
            Some(service.hostname.clone())
        } else {
            None
        };
        set_uri(parts, &path_and_query, host.as_deref())
            .map_err(|e| (StatusCode::BAD_REQUEST, e))?;
        Ok(Routed {
            service,
            route: route.name.clone(),
        })
    }
}

impl CompiledRoute {
    /// The path after the route's rewrites: `path.exact`, else the prefix rewrite.
    fn rewrite_path(&self, path: &str) -> String {
        if let Some(exact) = &self.rewrite.path {
            return exact.clone();
        }
        match (&self.prefix, &self.rewrite.prefix) {
            (Some(matched), Some(replacement)) => match path.strip_prefix(matched.as_str()) {
                Some(rest) => {
                    // `/chapter` + `/1` under `/` is `/1`, not `//1`.
                    if replacement.ends_with('/') && rest.starts_with('/') {
                        format!("{replacement}{}", &rest[1..])
                    } else {
                        format!("{replacement}{rest}")
                    }
                }
                None => path.to_owned(),
            },
            _ => path.to_owned(),
        }
    }
}

/// The virtual service's port the route targets: `port`, else its only (first) port.
fn target_port(table: &Table, service: &ResourceId, port: Option<u16>) -> Option<Arc<ServicePort>> {
    match port {
        Some(port) => table.ports.get(&(service.clone(), port)).cloned(),
        None => table
            .ports
            .range((service.clone(), 0)..=(service.clone(), u16::MAX))
            .next()
            .map(|(_, p)| p.clone()),
    }
}

/// Puts the rewritten path (and host, if any) into the request: the URI, and the `Host` header
/// for HTTP/1.1 (HTTP/2 carries the host in `:authority`).
fn set_uri(parts: &mut Parts, path_and_query: &str, host: Option<&str>) -> Result<(), String> {
    let mut uri = parts.uri.clone().into_parts();
    uri.path_and_query = Some(
        path_and_query
            .parse()
            .map_err(|e| format!("rewritten path {path_and_query:?} is not valid: {e}"))?,
    );
    if let Some(host) = host {
        if uri.authority.is_some() {
            uri.authority = Some(
                host.parse()
                    .map_err(|e| format!("target host {host:?} is not valid: {e}"))?,
            );
        }
        let value = HeaderValue::from_str(host)
            .map_err(|e| format!("target host {host:?} is not valid: {e}"))?;
        parts.headers.insert(header::HOST, value);
    }
    parts.uri = Uri::from_parts(uri).map_err(|e| format!("rewritten URI is not valid: {e}"))?;
    Ok(())
}

/// The VirtualGateway whose `podSelector` selects the pod (same namespace, labels match), if
/// one does; several: the first by id.
pub fn gateway_of<'m>(
    mesh: &'m MeshConfig,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> Option<&'m VirtualGateway> {
    mesh.virtual_gateways.iter().find(|gw| {
        gw.id.namespace == namespace
            && gw
                .spec
                .pod_selector
                .as_ref()
                .is_some_and(|s| s.matches(labels))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh;

    const MESH: &str = r#"
apiVersion: appmesh.k8s.aws/v1beta2
kind: Mesh
metadata: {name: m}
spec: {}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualGateway
metadata: {name: gw, namespace: edge}
spec:
  podSelector: {matchLabels: {app: gw}}
  namespaceSelector: {matchLabels: {gateway: "yes"}}
  gatewayRouteSelector: {matchLabels: {gateway: gw}}
  listeners:
    - portMapping: {port: 8088, protocol: http}
    - portMapping: {port: 8443, protocol: http}
    - portMapping: {port: 9090, protocol: grpc}
---
apiVersion: v1
kind: Namespace
metadata: {name: books, labels: {gateway: "yes"}}
---
apiVersion: v1
kind: Namespace
metadata: {name: other}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {name: books, namespace: books}
spec:
  listeners: [{portMapping: {port: 8080, protocol: http}}]
  serviceDiscovery: {static: {addresses: [10.0.0.1]}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {name: rpc, namespace: books}
spec:
  listeners: [{portMapping: {port: 50051, protocol: grpc}}]
  serviceDiscovery: {static: {addresses: [10.0.0.2]}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {name: books, namespace: books}
spec:
  awsName: books.books.svc.cluster.local
  provider: {virtualNode: {virtualNodeRef: {name: books}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {name: rpc, namespace: books}
spec:
  provider: {virtualNode: {virtualNodeRef: {name: rpc}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: GatewayRoute
metadata: {name: chapter, namespace: books, labels: {gateway: gw}}
spec:
  httpRoute:
    match: {prefix: /chapter}
    action: {target: {virtualService: {virtualServiceRef: {name: books}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: GatewayRoute
metadata: {name: chapter-one, namespace: books, labels: {gateway: gw}}
spec:
  httpRoute:
    match: {prefix: /chapter/1}
    action:
      target: {virtualService: {virtualServiceRef: {name: books}}}
      rewrite: {prefix: {defaultPrefix: DISABLED}, hostname: {defaultTargetHostname: DISABLED}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: GatewayRoute
metadata: {name: first, namespace: books, labels: {gateway: gw}}
spec:
  priority: 5
  httpRoute:
    match: {prefix: /, headers: [{name: x-first, match: {exact: "1"}}]}
    action:
      target: {virtualService: {virtualServiceRef: {name: books}}, port: 8080}
      rewrite: {prefix: {value: /first/}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: GatewayRoute
metadata: {name: host, namespace: books, labels: {gateway: gw}}
spec:
  httpRoute:
    match: {hostname: {suffix: .example.com}, port: 8443}
    action: {target: {virtualService: {virtualServiceRef: {name: books}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: GatewayRoute
metadata: {name: exact, namespace: books, labels: {gateway: gw}}
spec:
  httpRoute:
    match: {path: {exact: /chapter/x}}
    action:
      target: {virtualService: {virtualServiceRef: {name: books}}}
      rewrite: {path: {exact: /x}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: GatewayRoute
metadata: {name: rpc, namespace: books, labels: {gateway: gw}}
spec:
  grpcRoute:
    match: {serviceName: color.Color}
    action: {target: {virtualService: {virtualServiceRef: {name: rpc}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: GatewayRoute
metadata: {name: unlabelled, namespace: books}
spec:
  httpRoute:
    match: {prefix: /}
    action: {target: {virtualService: {virtualServiceRef: {name: books}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: GatewayRoute
metadata: {name: elsewhere, namespace: other, labels: {gateway: gw}}
spec:
  httpRoute:
    match: {prefix: /}
    action: {target: {virtualService: {virtualServiceRef: {name: books, namespace: books}}}}
"#;

    fn setup() -> (GatewayTable, Table) {
        let config = mesh::parse_str(MESH, std::path::Path::new("mesh.yaml"))
            .expect("mesh")
            .config;
        let mut answers = BTreeMap::new();
        answers.insert(
            "rpc.books.svc.cluster.local".to_owned(),
            vec!["10.96.0.9".parse().unwrap()],
        );
        (
            GatewayTable::compile(&config),
            Table::compile(&config, &answers),
        )
    }

    fn request(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut builder = http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        builder.body(()).unwrap().into_parts().0
    }

    fn listener(t: &GatewayTable, port: u16) -> Arc<ListenerRoutes> {
        t.listeners[&(ResourceId::new("edge", "gw"), port)].clone()
    }

    fn names(t: &GatewayTable, port: u16) -> Vec<String> {
        listener(t, port)
            .routes
            .iter()
            .map(|r| r.name.clone())
            .collect()
    }

    #[test]
    fn selectors_and_namespaces_pick_the_routes_in_order() {
        let (gateways, _) = setup();
        let names = names(&gateways, 8088);
        // Priority 5 first; then the exact path, then the longest prefix. Unlabelled routes
        // and routes of namespaces the gateway does not select are not the gateway's.
        assert_eq!(
            names,
            [
                "books/first",
                "books/exact",
                "books/chapter-one",
                "books/chapter"
            ]
        );
        let on_8443 = super::tests::names(&gateways, 8443);
        assert!(on_8443.contains(&"books/host".to_owned()), "{on_8443:?}");
        assert!(
            !listener(&gateways, 8088)
                .routes
                .iter()
                .any(|r| r.name == "books/host")
        );
        assert_eq!(super::tests::names(&gateways, 9090), ["books/rpc"]);
    }

    #[test]
    fn default_rewrites_replace_the_prefix_and_the_host() {
        let (gateways, table) = setup();
        let l = listener(&gateways, 8088);
        let mut parts = request(
            "GET",
            "/chapter/2?x=1",
            &[("host", "books.example.com:8088")],
        );
        let routed = l.route(&table, &mut parts).unwrap();
        assert_eq!(routed.route, "books/chapter");
        assert_eq!(parts.uri.path_and_query().unwrap().as_str(), "/2?x=1");
        assert_eq!(parts.headers["host"], "books.books.svc.cluster.local");

        // defaultPrefix and defaultTargetHostname DISABLED: both kept.
        let mut parts = request("GET", "/chapter/1/a", &[("host", "books.example.com")]);
        let routed = l.route(&table, &mut parts).unwrap();
        assert_eq!(routed.route, "books/chapter-one");
        assert_eq!(parts.uri.path(), "/chapter/1/a");
        assert_eq!(parts.headers["host"], "books.example.com");

        // An explicit value; priority beats the longer prefix.
        let mut parts = request("GET", "/chapter/1", &[("x-first", "1")]);
        let routed = l.route(&table, &mut parts).unwrap();
        assert_eq!(routed.route, "books/first");
        assert_eq!(parts.uri.path(), "/first/chapter/1");

        // path.exact.
        let mut parts = request("GET", "/chapter/x", &[]);
        assert_eq!(l.route(&table, &mut parts).unwrap().route, "books/exact");
        assert_eq!(parts.uri.path(), "/x");

        // Nothing matches.
        let mut parts = request("GET", "/other", &[]);
        assert_eq!(
            l.route(&table, &mut parts).unwrap_err().0,
            StatusCode::NOT_FOUND
        );
    }

    #[test]
    fn hostnames_match_with_and_without_port_and_ignore_case() {
        let (gateways, table) = setup();
        let l = listener(&gateways, 8443);
        for host in ["www.example.com", "WWW.Example.com:8443"] {
            let mut parts = request("GET", "/a", &[("host", host)]);
            assert_eq!(
                l.route(&table, &mut parts).unwrap().route,
                "books/host",
                "{host}"
            );
            assert_eq!(parts.uri.path(), "/a", "a hostname match rewrites no path");
        }
        let mut parts = request("GET", "/a", &[("host", "www.example.org")]);
        assert!(l.route(&table, &mut parts).is_err());
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("a.b"), "a.b");
    }

    #[test]
    fn grpc_routes_match_the_service_and_keep_the_path() {
        let (gateways, table) = setup();
        let l = listener(&gateways, 9090);
        let mut parts = request("POST", "http://gw.example.com/color.Color/Get", &[]);
        let routed = l.route(&table, &mut parts).unwrap();
        assert_eq!(routed.service.port, 50051);
        assert_eq!(parts.uri.path(), "/color.Color/Get");
        assert_eq!(
            parts.uri.authority().unwrap().as_str(),
            "rpc.books.svc.cluster.local"
        );
        let mut parts = request("POST", "/other.Svc/Get", &[]);
        assert!(l.route(&table, &mut parts).is_err());
    }

    #[test]
    fn reserved_paths_are_refused_where_they_are_written() {
        for (field, yaml) in [
            (
                "spec.httpRoute.match.prefix",
                "match: {prefix: /aws-appmesh/x}\n    action: {target: {virtualService: {virtualServiceRef: {name: books}}}}",
            ),
            (
                "spec.httpRoute.match.path.exact",
                "match: {path: {exact: /aws-appmesh}}\n    action: {target: {virtualService: {virtualServiceRef: {name: books}}}}",
            ),
            (
                "spec.httpRoute.action.rewrite.prefix.value",
                "match: {prefix: /a}\n    action:\n      target: {virtualService: {virtualServiceRef: {name: books}}}\n      rewrite: {prefix: {value: /aws-appmesh-x/}}",
            ),
            (
                "spec.httpRoute.action.rewrite.path.exact",
                "match: {path: {exact: /a}}\n    action:\n      target: {virtualService: {virtualServiceRef: {name: books}}}\n      rewrite: {path: {exact: /aws-appmesh}}",
            ),
        ] {
            let text = format!(
                "{MESH}---\napiVersion: appmesh.k8s.aws/v1beta2\nkind: GatewayRoute\nmetadata: {{name: bad, namespace: books}}\nspec:\n  httpRoute:\n    {yaml}\n"
            );
            let error = mesh::parse_str(&text, std::path::Path::new("gw.yaml"))
                .err()
                .unwrap_or_else(|| panic!("{field}: a reserved path was accepted"))
                .to_string();
            assert!(error.contains("gw.yaml:"), "{field}: {error}");
            assert!(error.contains(field), "{field}: {error}");
            assert!(error.contains("reserved by App Mesh"), "{field}: {error}");
        }
    }

    #[test]
    fn prefix_rewrites_join_without_double_slashes() {
        let route = CompiledRoute {
            name: "r".into(),
            matcher: RouteMatch::Any,
            prefix: Some("/chapter/".into()),
            hostname: None,
            target: ResourceId::new("a", "b"),
            target_port: None,
            rewrite: Rewrite {
                prefix: Some("/".into()),
                ..Rewrite::default()
            },
        };
        assert_eq!(route.rewrite_path("/chapter/1"), "/1");
        assert_eq!(route.rewrite_path("/chapter/"), "/");
    }
}
