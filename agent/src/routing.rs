//! The routing table the proxy uses: which virtual service a captured destination is, which
//! virtual node a connection goes to (provider, or a router's weighted targets), and the
//! endpoints of each virtual node.
//!
//! A table is compiled from one mesh and one set of DNS answers and never changes; a new mesh
//! or a new answer compiles a new table that replaces the old one atomically, so a connection
//! never sees half of either.
//!
//! Ports whose provider speaks http, http2 or grpc also get an HTTP route table ([`http`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rand::Rng;

pub mod http;

use crate::mesh::{
    DnsResponseType, MeshConfig, Protocol, Provider, ResourceId, RouteKind, ServiceDiscovery,
    VirtualRouter, VirtualService,
};

/// Where a virtual service sends a connection on one of its ports.
#[derive(Debug)]
pub struct ServicePort {
    pub service: ResourceId,
    pub hostname: String,
    pub port: u16,
    /// The provider's listener protocol on this port: `tcp` is forwarded at L4, the others
    /// go through the HTTP proxy.
    pub protocol: Protocol,
    pub action: Action,
    /// The HTTP routes when `protocol` is http, http2 or grpc.
    pub http: Option<Arc<http::HttpRoutes>>,
}

#[derive(Debug)]
pub enum Action {
    /// The provider is a virtual node: everything goes there.
    Node(Target),
    /// A router's TCP route: one target picked per connection by weight.
    Weighted {
        route: String,
        targets: Vec<Target>,
        /// The route's `timeout.idle` (not 0): the calling agent closes the connection after
        /// this long without a byte either way.
        idle: Option<std::time::Duration>,
    },
    /// The router has no TCP route for this port (an HTTP route needs the L7 proxy).
    NoRoute { reason: String },
}

#[derive(Debug, Clone)]
pub struct Target {
    pub virtual_node: ResourceId,
    pub weight: u32,
    /// The port to connect to on the node's endpoints.
    pub port: u16,
}

/// The endpoints of one virtual node.
#[derive(Debug, Default)]
pub struct Endpoints {
    pub addrs: Vec<IpAddr>,
    next: AtomicUsize,
}

impl Endpoints {
    fn new(addrs: Vec<IpAddr>) -> Endpoints {
        Endpoints {
            addrs,
            next: AtomicUsize::new(0),
        }
    }

    /// Round-robin order starting at the next endpoint, so a connect failure can try the others.
    pub fn rotation(&self) -> impl Iterator<Item = IpAddr> + '_ {
        let len = self.addrs.len();
        let start = if len == 0 {
            0
        } else {
            self.next.fetch_add(1, Ordering::Relaxed) % len
        };
        (0..len).map(move |i| self.addrs[(start + i) % len])
    }
}

/// One compiled mesh.
#[derive(Debug, Default)]
pub struct Table {
    pub mesh: String,
    /// Captured destination (service address and port) -> what to do.
    pub services: BTreeMap<SocketAddr, Arc<ServicePort>>,
    pub endpoints: BTreeMap<ResourceId, Arc<Endpoints>>,
    /// Every listener `healthCheck` in the mesh.
    pub health_checks: Vec<Arc<http::HealthCheckSpec>>,
    /// Listeners' `outlierDetection`, by virtual node and listener port.
    pub outliers: BTreeMap<(ResourceId, u16), crate::mesh::OutlierDetection>,
    /// Addresses of virtual services that answer on no port (no provider, or a provider
    /// without listeners): every connect to them is refused in eBPF, as validation warns,
    /// rather than left to go out of the mesh.
    pub refused: BTreeMap<IpAddr, ResourceId>,
    /// Every port of every virtual service, by service and port, whether or not it has
    /// addresses: how a gateway route reaches its target (`crate::gateway`).
    pub ports: BTreeMap<(ResourceId, u16), Arc<ServicePort>>,
}

impl Table {
    /// The DNS names whose answers the table needs: virtual service hostnames (unless they
    /// have static addresses) and the `serviceDiscovery.dns` hostnames of virtual nodes.
    pub fn dns_names(mesh: &MeshConfig) -> BTreeSet<String> {
        let services = mesh
            .virtual_services
            .iter()
            .filter(|vs| vs.spec.addresses.is_empty())
            .map(VirtualService::hostname);
        let nodes = mesh.virtual_nodes.iter().filter_map(|vn| {
            match vn.spec.service_discovery.as_ref()? {
                ServiceDiscovery::Dns { hostname, .. } => Some(hostname.clone()),
                _ => None,
            }
        });
        services.chain(nodes).collect()
    }

    pub fn compile(mesh: &MeshConfig, answers: &BTreeMap<String, Vec<IpAddr>>) -> Table {
        let mut table = Table {
            mesh: mesh.mesh.name.clone(),
            health_checks: http::health_checks(mesh),
            ..Table::default()
        };
        for vn in &mesh.virtual_nodes {
            let addrs = match &vn.spec.service_discovery {
                Some(ServiceDiscovery::Dns {
                    hostname,
                    response_type,
                }) => {
                    let mut addrs = answers.get(hostname).cloned().unwrap_or_default();
                    // LOADBALANCER: the name points at a load balancer; use one address, as
                    // App Mesh's Envoy did (it resolved with "strict DNS, first answer").
                    if *response_type == DnsResponseType::LoadBalancer {
                        addrs.truncate(1);
                    }
                    addrs
                }
                Some(ServiceDiscovery::Static { addresses }) => addresses.clone(),
                _ => Vec::new(),
            };
            table
                .endpoints
                .insert(vn.id.clone(), Arc::new(Endpoints::new(addrs)));
            for listener in &vn.spec.listeners {
                if let Some(policy) = &listener.outlier_detection {
                    table
                        .outliers
                        .insert((vn.id.clone(), listener.port_mapping.port), policy.clone());
                }
            }
        }
        for vs in &mesh.virtual_services {
            let hostname = vs.hostname();
            let addrs: Vec<IpAddr> = if vs.spec.addresses.is_empty() {
                answers.get(&hostname).cloned().unwrap_or_default()
            } else {
                vs.spec.addresses.clone()
            };
            let ports = service_ports(mesh, vs);
            if ports.is_empty() {
                for addr in &addrs {
                    table.refused.insert(*addr, vs.id.clone());
                }
            }
            for (port, protocol, action) in ports {
                let http = (protocol != Protocol::Tcp)
                    .then(|| Arc::new(http::compile(mesh, vs, port, protocol)));
                let entry = Arc::new(ServicePort {
                    service: vs.id.clone(),
                    hostname: hostname.clone(),
                    port,
                    protocol,
                    action,
                    http,
                });
                for addr in &addrs {
                    table
                        .services
                        .insert(SocketAddr::new(*addr, port), entry.clone());
                }
                table.ports.insert((vs.id.clone(), port), entry);
            }
        }
        table
    }
}

/// The ports a virtual service answers on (its provider's listeners) and the action for each.
fn service_ports(mesh: &MeshConfig, vs: &VirtualService) -> Vec<(u16, Protocol, Action)> {
    match &vs.spec.provider {
        Some(Provider::VirtualNode(id)) => mesh
            .virtual_node(id)
            .map(|vn| {
                vn.spec
                    .listeners
                    .iter()
                    .map(|listener| {
                        let port = listener.port_mapping.port;
                        let target = Target {
                            virtual_node: id.clone(),
                            weight: 1,
                            port,
                        };
                        (port, listener.port_mapping.protocol, Action::Node(target))
                    })
                    .collect()
            })
            .unwrap_or_default(),
        Some(Provider::VirtualRouter(id)) => mesh
            .virtual_router(id)
            .map(|router| router_ports(mesh, router))
            .unwrap_or_default(),
        None => Vec::new(),
    }
}

fn router_ports(mesh: &MeshConfig, router: &VirtualRouter) -> Vec<(u16, Protocol, Action)> {
    router
        .spec
        .listeners
        .iter()
        .map(|listener| {
            let port = listener.port_mapping.port;
            // Routes are tried in priority order (0 is highest; no priority sorts last), then
            // in file order, as App Mesh does.
            let mut routes: Vec<_> = router.spec.routes.iter().enumerate().collect();
            routes.sort_by_key(|(index, route)| (route.priority.unwrap_or(u32::MAX), *index));
            let tcp = routes.into_iter().find_map(|(_, route)| match &route.kind {
                RouteKind::Tcp(tcp) => {
                    let match_port = tcp.r#match.as_ref().and_then(|m| m.port);
                    (match_port.is_none() || match_port == Some(port)).then_some((route, tcp))
                }
                _ => None,
            });
            let action = match tcp {
                Some((route, tcp)) => Action::Weighted {
                    route: route.name.clone(),
                    idle: tcp
                        .timeout
                        .as_ref()
                        .and_then(|t| t.idle.as_ref())
                        .map(|d| d.as_std())
                        .filter(|d| !d.is_zero()),
                    targets: tcp
                        .action
                        .weighted_targets
                        .iter()
                        .map(|t| Target {
                            virtual_node: t.virtual_node.clone(),
                            weight: t.weight,
                            port: t
                                .port
                                .or_else(|| first_listener_port(mesh, &t.virtual_node))
                                .unwrap_or(port),
                        })
                        .collect(),
                },
                None => Action::NoRoute {
                    reason: format!(
                        "virtual router {} has no tcpRoute for port {port}",
                        router.id
                    ),
                },
            };
            (port, listener.port_mapping.protocol, action)
        })
        .collect()
}

fn first_listener_port(mesh: &MeshConfig, node: &ResourceId) -> Option<u16> {
    mesh.virtual_node(node)?
        .spec
        .listeners
        .first()
        .map(|l| l.port_mapping.port)
}

/// Picks a target by weight. Targets of weight 0 are never picked; if all weights are 0,
/// there is nothing to pick.
pub fn pick_weighted<'t>(targets: &'t [Target], rng: &mut impl Rng) -> Option<&'t Target> {
    let total: u64 = targets.iter().map(|t| u64::from(t.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut ticket = rng.random_range(0..total);
    for target in targets {
        let weight = u64::from(target.weight);
        if ticket < weight {
            return Some(target);
        }
        ticket -= weight;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn target(name: &str, weight: u32) -> Target {
        Target {
            virtual_node: ResourceId {
                namespace: "app".into(),
                name: name.into(),
            },
            weight,
            port: 8080,
        }
    }

    #[test]
    fn weights_are_honoured() {
        let targets = [target("v1", 90), target("v2", 10), target("v3", 0)];
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut counts = BTreeMap::new();
        for _ in 0..10_000 {
            let t = pick_weighted(&targets, &mut rng).unwrap();
            *counts.entry(t.virtual_node.name.as_str()).or_insert(0) += 1;
        }
        assert!((8_800..=9_200).contains(&counts["v1"]), "{counts:?}");
        assert!(!counts.contains_key("v3"));
    }

    #[test]
    fn all_zero_weights_pick_nothing() {
        let targets = [target("v1", 0)];
        assert!(pick_weighted(&targets, &mut rand::rng()).is_none());
    }

    #[test]
    fn rotation_visits_every_endpoint_once() {
        let endpoints = Endpoints::new(vec![
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            "10.0.0.3".parse().unwrap(),
        ]);
        let first: Vec<_> = endpoints.rotation().collect();
        let second: Vec<_> = endpoints.rotation().collect();
        assert_eq!(first.len(), 3);
        assert_ne!(first[0], second[0]);
        let mut sorted = second.clone();
        sorted.sort();
        assert_eq!(sorted, endpoints.addrs);
    }
}
