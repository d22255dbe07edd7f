//! The agent's compiled view of its inputs, published whole.
//!
//! Every input change (a mesh reload, new DNS answers) compiles one immutable [`State`]: the
//! mesh, the routing table, the identity policy, the access logs, the gateway listeners'
//! routes and the eBPF service ids, all from the same mesh version. [`Published::publish`] swaps it in with one store, and
//! every reader (a captured connection, an HTTP request, a tunnel stream) takes one
//! [`Published::snapshot`] and reads only that. So a request never pairs the new policy with
//! the old table: it sees one mesh version from start to end.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use arc_swap::ArcSwap;

use crate::gateway;
use crate::identity::policy::Policy;
use crate::mesh::{Mesh, MeshConfig, MeshSpec, ResourceId, Source};
use crate::routing::Table;
use crate::service_ids::ServiceIds;
use crate::telemetry::access_log::AccessLog;

/// Access logs by virtual node (or virtual gateway): `logging.accessLog`.
pub type AccessLogs = BTreeMap<ResourceId, AccessLog>;

/// One consistent view of the mesh for the request path.
pub struct State {
    /// Counts the states published, from 1 (0: the empty state before the first).
    pub version: u64,
    pub mesh: Arc<MeshConfig>,
    /// Routes and endpoints, from the mesh and the DNS answers of this version.
    pub table: Arc<Table>,
    /// Identities, TLS, backend rules and limits of the same mesh.
    pub policy: Arc<Policy>,
    /// The access logs the mesh's virtual nodes and gateways ask for.
    pub access_logs: Arc<AccessLogs>,
    /// The eBPF id of each virtual service, stable across versions (see `service_ids`).
    pub service_ids: ServiceIds,
    /// The gateway listeners' routes, tls and health checks of the same mesh.
    pub gateways: Arc<gateway::Compiled>,
}

impl Default for State {
    /// Before the first mesh is published: an empty mesh, nothing routed, nothing allowed.
    fn default() -> State {
        let mesh = MeshConfig {
            mesh: Mesh {
                name: String::new(),
                spec: MeshSpec::default(),
            },
            virtual_nodes: Vec::new(),
            virtual_services: Vec::new(),
            virtual_routers: Vec::new(),
            virtual_gateways: Vec::new(),
            gateway_routes: Vec::new(),
            namespaces: BTreeMap::new(),
            source: Source {
                path: PathBuf::new(),
                files: Vec::new(),
                sha256: String::new(),
                loaded_at: UNIX_EPOCH,
            },
        };
        State {
            version: 0,
            mesh: Arc::new(mesh),
            table: Arc::default(),
            policy: Arc::default(),
            access_logs: Arc::default(),
            service_ids: ServiceIds::default(),
            gateways: Arc::default(),
        }
    }
}

impl State {
    /// The state for a new mesh: everything compiled from `mesh`, the table with `answers`;
    /// `previous` keeps the service ids of services that stay.
    pub fn compile(
        previous: &State,
        mesh: Arc<MeshConfig>,
        answers: &BTreeMap<String, Vec<IpAddr>>,
        access_logs: AccessLogs,
    ) -> State {
        let mut service_ids = previous.service_ids.clone();
        service_ids.update(mesh.virtual_services.iter().map(|vs| &vs.id));
        State {
            version: previous.version + 1,
            table: Arc::new(Table::compile(&mesh, answers)),
            policy: Arc::new(Policy::compile(&mesh)),
            gateways: Arc::new(gateway::Compiled::compile(&mesh)),
            access_logs: Arc::new(access_logs),
            mesh,
            service_ids,
        }
    }

    /// The same mesh with new DNS answers: only the table changes.
    pub fn with_answers(&self, answers: &BTreeMap<String, Vec<IpAddr>>) -> State {
        State {
            version: self.version + 1,
            mesh: self.mesh.clone(),
            table: Arc::new(Table::compile(&self.mesh, answers)),
            policy: self.policy.clone(),
            access_logs: self.access_logs.clone(),
            service_ids: self.service_ids.clone(),
            gateways: self.gateways.clone(),
        }
    }

    /// The virtual services `vn` may call, by eBPF id: what the backend map holds for its
    /// pods.
    pub fn backend_ids(&self, vn: &ResourceId) -> std::collections::BTreeSet<u32> {
        self.mesh
            .virtual_services
            .iter()
            .filter(|vs| self.policy.is_backend(vn, &vs.id))
            .filter_map(|vs| self.service_ids.get(&vs.id))
            .collect()
    }
}

/// The state in force, swapped whole. Shared by the proxy, the transport and the reconcile
/// loop, which alone publishes.
#[derive(Default)]
pub struct Published(ArcSwap<State>);

impl Published {
    /// The state in force now; a reader takes it once per connection or request and keeps
    /// it, so all it reads is of one version.
    pub fn snapshot(&self) -> Arc<State> {
        self.0.load_full()
    }

    /// Puts `state` in force, in one store.
    pub fn publish(&self, state: Arc<State>) {
        self.0.store(state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESH: &str = r#"apiVersion: appmesh.k8s.aws/v1beta2
kind: Mesh
metadata: {name: m}
spec: {}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {name: client, namespace: app}
spec:
  backends: [{virtualService: {virtualServiceRef: {name: a}}}]
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {name: up, namespace: app}
spec:
  listeners: [{portMapping: {port: 80, protocol: tcp}}]
  serviceDiscovery: {static: {addresses: [10.0.0.9]}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {name: a, namespace: app}
spec:
  addresses: [10.96.0.1]
  provider: {virtualNode: {virtualNodeRef: {name: up}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {name: b, namespace: app}
spec:
  addresses: [10.96.0.2]
  provider: {virtualNode: {virtualNodeRef: {name: up}}}
"#;

    fn mesh() -> Arc<MeshConfig> {
        Arc::new(
            crate::mesh::parse_str(MESH, std::path::Path::new("mesh.yaml"))
                .expect("test mesh")
                .config,
        )
    }

    #[test]
    fn one_version_holds_table_policy_and_ids_of_one_mesh() {
        let first = State::compile(
            &State::default(),
            mesh(),
            &BTreeMap::new(),
            AccessLogs::new(),
        );
        assert_eq!(first.version, 1);
        let client = ResourceId::new("app", "client");
        let a = first.service_ids.get(&ResourceId::new("app", "a")).unwrap();
        assert_eq!(first.backend_ids(&client), [a].into());
        assert_eq!(first.table.services.len(), 2);
        // New answers: a new table, the same policy, the same ids.
        let second = first.with_answers(&BTreeMap::new());
        assert_eq!(second.version, 2);
        assert!(Arc::ptr_eq(&first.policy, &second.policy));
        assert!(!Arc::ptr_eq(&first.table, &second.table));
        assert_eq!(
            second.service_ids.get(&ResourceId::new("app", "a")),
            Some(a)
        );
    }

    /// The gateway's routes are part of the version: a route that moves from `a` to `b` in
    /// the next mesh leads to `a` in every reader of the first version, and new DNS answers
    /// keep them.
    #[test]
    fn a_version_holds_the_gateway_routes_of_its_mesh() {
        let gateway_mesh = |target: &str| {
            let text = format!(
                r#"{MESH}---
apiVersion: v1
kind: Namespace
metadata: {{name: app, labels: {{gateway: "yes"}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualGateway
metadata: {{name: gw, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: gw}}}}
  namespaceSelector: {{matchLabels: {{gateway: "yes"}}}}
  listeners: [{{portMapping: {{port: 8088, protocol: http}}}}]
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: GatewayRoute
metadata: {{name: r, namespace: app}}
spec:
  httpRoute:
    match: {{prefix: /}}
    action: {{target: {{virtualService: {{virtualServiceRef: {{name: {target}}}}}}}}}
"#
            );
            Arc::new(
                crate::mesh::parse_str(&text, std::path::Path::new("mesh.yaml"))
                    .expect("test mesh")
                    .config,
            )
        };
        let gw = ResourceId::new("app", "gw");
        let target = |state: &State| {
            let routes = state.gateways.routes(&gw, 8088).expect("listener");
            routes.routes[0].target.clone()
        };
        let first = State::compile(
            &State::default(),
            gateway_mesh("a"),
            &BTreeMap::new(),
            AccessLogs::new(),
        );
        let second = State::compile(
            &first,
            gateway_mesh("b"),
            &BTreeMap::new(),
            AccessLogs::new(),
        );
        assert_eq!(target(&first), ResourceId::new("app", "a"));
        assert_eq!(target(&second), ResourceId::new("app", "b"));
        let answered = second.with_answers(&BTreeMap::new());
        assert!(Arc::ptr_eq(&second.gateways, &answered.gateways));
    }

    #[test]
    fn a_reader_keeps_its_snapshot_across_a_publish() {
        let published = Published::default();
        let first = Arc::new(State::compile(
            &State::default(),
            mesh(),
            &BTreeMap::new(),
            AccessLogs::new(),
        ));
        published.publish(first.clone());
        let held = published.snapshot();
        published.publish(Arc::new(first.with_answers(&BTreeMap::new())));
        assert_eq!(held.version, 1);
        assert_eq!(published.snapshot().version, 2);
    }
}
