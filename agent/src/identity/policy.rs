//! The mesh's security rules, compiled once per mesh: each virtual node's identities, the
//! `tls` of its listeners, the `clientPolicy.tls` of its backends, and which virtual nodes its
//! backends lead to (App Mesh: a virtual node may reach only the virtual services it lists as
//! backends, hence only the virtual nodes those services route to).
//!
//! Pure data, no I/O: the app compiles a new [`Policy`] on every mesh reload and swaps it in.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use crate::mesh::{
    ClientTls, ListenerTls, MeshConfig, Provider, ResourceId, ServiceDiscovery, TlsCertificate,
    TlsMode, TlsTrust, TlsValidation,
};

use super::{Error, spiffe_id};

/// One virtual node's rules.
#[derive(Debug, Clone, Default)]
pub struct NodePolicy {
    /// SPIFFE ID first, then the DNS name, if any.
    pub identities: Vec<String>,
    /// Listener port -> its tls (None: no tls or DISABLED).
    pub listeners: BTreeMap<u16, Option<ListenerTls>>,
    /// Backend virtual service -> its effective client policy tls (the backend's own, else
    /// `backendDefaults`).
    pub backends: BTreeMap<ResourceId, Option<ClientTls>>,
    /// Virtual nodes the backends route to.
    pub reachable: BTreeSet<ResourceId>,
}

/// The compiled rules of one mesh.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub mesh: String,
    pub nodes: BTreeMap<ResourceId, NodePolicy>,
    /// Identity (SPIFFE ID or DNS name) -> virtual nodes that carry it.
    by_identity: BTreeMap<String, BTreeSet<ResourceId>>,
    /// [`super::tunnel_label`] -> the virtual node, for hashed tunnel server names.
    by_tunnel_label: BTreeMap<String, ResourceId>,
    /// Listeners' `connectionPool` and `rateLimit` (applied by `proxy::admission`).
    pub limits: crate::proxy::admission::Limits,
}

/// The virtual nodes a virtual service sends traffic to (its provider, or every target of
/// every route of its router).
pub fn service_targets(mesh: &MeshConfig, service: &ResourceId) -> BTreeSet<ResourceId> {
    let Some(vs) = mesh.virtual_service(service) else {
        return BTreeSet::new();
    };
    match &vs.spec.provider {
        Some(Provider::VirtualNode(vn)) => BTreeSet::from([vn.clone()]),
        Some(Provider::VirtualRouter(router)) => mesh
            .virtual_router(router)
            .map(|r| {
                r.spec
                    .routes
                    .iter()
                    .flat_map(|route| route.kind.action().weighted_targets.iter())
                    .map(|t| t.virtual_node.clone())
                    .collect()
            })
            .unwrap_or_default(),
        None => BTreeSet::new(),
    }
}

impl Policy {
    pub fn compile(mesh: &MeshConfig) -> Policy {
        let mut policy = Policy {
            mesh: mesh.mesh.name.clone(),
            limits: crate::proxy::admission::Limits::compile(mesh),
            ..Policy::default()
        };
        for vn in &mesh.virtual_nodes {
            let mut identities = vec![spiffe_id(&mesh.mesh.name, &vn.id)];
            if let Some(ServiceDiscovery::Dns { hostname, .. }) = &vn.spec.service_discovery {
                identities.push(hostname.clone());
            }
            let listeners = vn
                .spec
                .listeners
                .iter()
                .map(|l| {
                    let tls = l.tls.clone().filter(|t| t.mode != TlsMode::Disabled);
                    (l.port_mapping.port, tls)
                })
                .collect();
            let default_tls = vn
                .spec
                .backend_defaults
                .as_ref()
                .and_then(|d| d.client_policy.as_ref())
                .and_then(|p| p.tls.clone());
            let mut backends = BTreeMap::new();
            let mut reachable = BTreeSet::new();
            for backend in &vn.spec.backends {
                let tls = backend
                    .client_policy
                    .as_ref()
                    .and_then(|p| p.tls.clone())
                    .or_else(|| default_tls.clone());
                backends.insert(backend.virtual_service.clone(), tls);
                reachable.extend(service_targets(mesh, &backend.virtual_service));
            }
            policy
                .by_tunnel_label
                .insert(super::tunnel_label(&vn.id), vn.id.clone());
            for identity in &identities {
                policy
                    .by_identity
                    .entry(identity.clone())
                    .or_default()
                    .insert(vn.id.clone());
            }
            policy.nodes.insert(
                vn.id.clone(),
                NodePolicy {
                    identities,
                    listeners,
                    backends,
                    reachable,
                },
            );
        }
        // A VirtualGateway calls the virtual services its routes target, as a virtual node
        // calls its backends, with its `backendDefaults.clientPolicy.tls` (crate::gateway).
        for gateway in &mesh.virtual_gateways {
            if policy.nodes.contains_key(&gateway.id) {
                tracing::warn!(gateway = %gateway.id, "a VirtualNode has the VirtualGateway's name and namespace; the gateway gets no identity of its own and may reach only that node's backends");
                continue;
            }
            let identity = super::gateway_spiffe_id(&mesh.mesh.name, &gateway.id);
            let tls = gateway
                .spec
                .backend_defaults
                .as_ref()
                .and_then(|d| d.client_policy.as_ref())
                .and_then(|p| p.tls.clone());
            let mut backends = BTreeMap::new();
            let mut reachable = BTreeSet::new();
            for route in mesh.gateway_routes_for(gateway) {
                let service = &route.spec.kind.target().virtual_service;
                backends.insert(service.clone(), tls.clone());
                reachable.extend(service_targets(mesh, service));
            }
            policy
                .by_identity
                .entry(identity.clone())
                .or_default()
                .insert(gateway.id.clone());
            policy.nodes.insert(
                gateway.id.clone(),
                NodePolicy {
                    identities: vec![identity],
                    listeners: BTreeMap::new(),
                    backends,
                    reachable,
                },
            );
        }
        policy
    }

    /// The virtual node a tunnel server name asks for, if this mesh has it.
    pub fn tunnel_target(&self, target: super::TunnelTarget) -> Option<ResourceId> {
        match target {
            super::TunnelTarget::Named(vn) => Some(vn),
            super::TunnelTarget::Hashed(label) => self.by_tunnel_label.get(&label).cloned(),
        }
    }

    /// The tls of a listener, if it has one that is not DISABLED.
    pub fn listener_tls(&self, vn: &ResourceId, port: u16) -> Option<&ListenerTls> {
        self.nodes.get(vn)?.listeners.get(&port)?.as_ref()
    }

    /// The client policy tls `source` applies when calling `service` on `port`, if any
    /// (`ports` empty means every port).
    pub fn client_tls(
        &self,
        source: &ResourceId,
        service: &ResourceId,
        port: u16,
    ) -> Option<&ClientTls> {
        let tls = self.nodes.get(source)?.backends.get(service)?.as_ref()?;
        (tls.ports.is_empty() || tls.ports.contains(&port)).then_some(tls)
    }

    /// Is `service` a backend of `source`?
    pub fn is_backend(&self, source: &ResourceId, service: &ResourceId) -> bool {
        self.nodes
            .get(source)
            .is_some_and(|n| n.backends.contains_key(service))
    }

    /// May `source` reach `target` through one of its backends?
    pub fn may_reach(&self, source: &ResourceId, target: &ResourceId) -> bool {
        self.nodes
            .get(source)
            .is_some_and(|n| n.reachable.contains(target))
    }

    /// App Mesh's authorization at a listener, for a caller known by its virtual node rather
    /// than by a certificate (a pod on this node): admitted when the listener has no tls, no
    /// `validation`, or no `subjectAlternativeNames`, or when one of the caller's identities
    /// is among them (the same exact match the tunnel's client verifier applies to a peer
    /// certificate). Refused: the caller's identities and the names expected.
    pub fn listener_admits(
        &self,
        caller: &ResourceId,
        target: &ResourceId,
        port: u16,
    ) -> Result<(), (Vec<String>, Vec<String>)> {
        let Some(expected) = self
            .listener_tls(target, port)
            .and_then(|tls| tls.validation.as_ref())
            .map(|v| &v.subject_alternative_names)
            .filter(|sans| !sans.is_empty())
        else {
            return Ok(());
        };
        let identities = self
            .nodes
            .get(caller)
            .map(|n| n.identities.clone())
            .unwrap_or_default();
        if identities.iter().any(|i| expected.contains(i)) {
            Ok(())
        } else {
            Err((identities, expected.clone()))
        }
    }

    /// The virtual nodes a verified certificate with these SANs stands for.
    pub fn peer_nodes(&self, sans: &[String]) -> BTreeSet<ResourceId> {
        sans.iter()
            .filter_map(|san| self.by_identity.get(san))
            .flatten()
            .cloned()
            .collect()
    }

    /// The captured listener ports of a virtual node (tls STRICT or PERMISSIVE) and their mode.
    pub fn captured_ports(&self, vn: &ResourceId) -> Vec<(u16, TlsMode)> {
        self.nodes
            .get(vn)
            .map(|n| {
                n.listeners
                    .iter()
                    .filter_map(|(port, tls)| tls.as_ref().map(|t| (*port, t.mode)))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The chain and key files of a `file` certificate.
pub fn certificate_files(cert: &TlsCertificate, field: &str) -> Result<(PathBuf, PathBuf), Error> {
    match cert {
        TlsCertificate::File {
            certificate_chain,
            private_key,
        } => Ok((certificate_chain.into(), private_key.into())),
        TlsCertificate::Acm { .. } => Err(Error::Unsupported {
            field: field.to_owned(),
            source_kind: "an ACM certificate (AWS only)",
        }),
        TlsCertificate::Sds { secret_name } => super::service::sds_certificate(secret_name)
            .ok_or_else(|| Error::Unsupported {
                field: field.to_owned(),
                source_kind: "SDS without an identity service (`strait run --identity-service`)",
            }),
    }
}

/// The trust bundle file of a validation.
pub fn trust_file(validation: &TlsValidation, field: &str) -> Result<PathBuf, Error> {
    match &validation.trust {
        TlsTrust::File { certificate_chain } => Ok(certificate_chain.into()),
        TlsTrust::Acm { .. } => Err(Error::Unsupported {
            field: field.to_owned(),
            source_kind: "ACM private CA trust (AWS only)",
        }),
        TlsTrust::Sds { .. } => super::service::sds_trust().ok_or_else(|| Error::Unsupported {
            field: field.to_owned(),
            source_kind: "SDS without an identity service (`strait run --identity-service`)",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const MESH: &str = r#"
apiVersion: appmesh.k8s.aws/v1beta2
kind: Mesh
metadata: {name: test}
spec: {}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {name: client, namespace: app}
spec:
  podSelector: {matchLabels: {app: client}}
  backends:
    - virtualService: {virtualServiceRef: {name: color}}
  backendDefaults:
    clientPolicy:
      tls:
        ports: [8080]
        certificate: {file: {certificateChain: /c.pem, privateKey: /c.key}}
        validation: {trust: {file: {certificateChain: /ca.pem}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {name: color, namespace: app}
spec:
  podSelector: {matchLabels: {app: color}}
  listeners:
    - portMapping: {port: 8080, protocol: tcp}
      tls:
        mode: STRICT
        certificate: {file: {certificateChain: /s.pem, privateKey: /s.key}}
    - portMapping: {port: 7070, protocol: tcp}
      tls:
        mode: STRICT
        certificate: {file: {certificateChain: /s.pem, privateKey: /s.key}}
        validation:
          trust: {file: {certificateChain: /ca.pem}}
          subjectAlternativeNames: {match: {exact: [spiffe://test/ns/app/vn/client]}}
    - portMapping: {port: 9090, protocol: tcp}
      tls:
        mode: DISABLED
        certificate: {file: {certificateChain: /s.pem, privateKey: /s.key}}
  serviceDiscovery: {dns: {hostname: color.app.svc.cluster.local}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {name: stranger, namespace: app}
spec:
  podSelector: {matchLabels: {app: stranger}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {name: color, namespace: app}
spec:
  provider: {virtualNode: {virtualNodeRef: {name: color}}}
"#;

    fn policy() -> Policy {
        let loaded = crate::mesh::parse_str(MESH, Path::new("mesh.yaml")).unwrap();
        Policy::compile(&loaded.config)
    }

    #[test]
    fn backends_decide_who_reaches_whom() {
        let p = policy();
        let client = ResourceId::new("app", "client");
        let color = ResourceId::new("app", "color");
        let stranger = ResourceId::new("app", "stranger");
        assert!(p.may_reach(&client, &color));
        assert!(!p.may_reach(&stranger, &color));
        assert!(p.is_backend(&client, &color));
    }

    #[test]
    fn identities_map_back_to_virtual_nodes() {
        let p = policy();
        let color = ResourceId::new("app", "color");
        assert_eq!(
            p.peer_nodes(&["spiffe://test/ns/app/vn/color".into()]),
            BTreeSet::from([color.clone()])
        );
        assert_eq!(
            p.peer_nodes(&["color.app.svc.cluster.local".into()]),
            BTreeSet::from([color])
        );
        assert!(
            p.peer_nodes(&["spiffe://test/ns/app/vn/nobody".into()])
                .is_empty()
        );
    }

    #[test]
    fn listener_sans_admit_callers_by_their_identities() {
        let p = policy();
        let color = ResourceId::new("app", "color");
        let client = ResourceId::new("app", "client");
        let stranger = ResourceId::new("app", "stranger");
        assert_eq!(p.listener_admits(&client, &color, 7070), Ok(()));
        let (presented, expected) = p.listener_admits(&stranger, &color, 7070).unwrap_err();
        assert_eq!(
            presented,
            vec!["spiffe://test/ns/app/vn/stranger".to_string()]
        );
        assert_eq!(expected, vec!["spiffe://test/ns/app/vn/client".to_string()]);
        // No validation, or no tls at all: nothing to match.
        assert_eq!(p.listener_admits(&stranger, &color, 8080), Ok(()));
        assert_eq!(p.listener_admits(&stranger, &color, 9090), Ok(()));
        assert_eq!(p.listener_admits(&stranger, &color, 1234), Ok(()));
    }

    #[test]
    fn disabled_listeners_are_not_captured_and_client_ports_apply() {
        let p = policy();
        let color = ResourceId::new("app", "color");
        let client = ResourceId::new("app", "client");
        assert_eq!(
            p.captured_ports(&color),
            vec![(7070, TlsMode::Strict), (8080, TlsMode::Strict)]
        );
        assert!(p.listener_tls(&color, 9090).is_none());
        assert!(p.client_tls(&client, &color, 8080).is_some());
        assert!(p.client_tls(&client, &color, 9090).is_none());
    }
}
