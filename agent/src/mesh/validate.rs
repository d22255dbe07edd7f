//! Checks that span documents: exactly one Mesh, no duplicate names, every reference points at
//! an existing resource (and a weighted target's `port` at one of the node's listeners).
//! Per-document checks happen while decoding (`decode.rs`).

use std::collections::BTreeMap;
use std::path::Path;

use super::decode::{Decoded, RefKind, Seen, closest};
use super::model::ResourceId;
use super::yaml::Pos;
use super::{Diagnostic, MeshConfig, Severity, Source};

pub(crate) fn validate(
    file: &Path,
    decoded: Decoded,
    source: Source,
    diags: &mut Vec<Diagnostic>,
) -> Option<MeshConfig> {
    let mut err = |pos: Pos, path: &str, message: String| {
        diags.push(Diagnostic {
            severity: Severity::Error,
            file: file.to_path_buf(),
            line: pos.line,
            column: pos.col,
            path: path.to_string(),
            message,
        });
    };

    let mut meshes = decoded.meshes.into_iter();
    let mesh = meshes.next();
    for extra in meshes {
        let first = mesh.as_ref().map(|m| (m.value.name.clone(), m.pos.line));
        let (name, line) = first.unwrap_or_default();
        err(
            extra.pos,
            &extra.label,
            format!(
                "a second Mesh: a mesh file describes exactly one mesh (Mesh {name} is defined \
                 at line {line})"
            ),
        );
    }
    if mesh.is_none() && decoded.failed_meshes == 0 {
        err(
            Pos { line: 1, col: 1 },
            "",
            "no Mesh document: exactly one `kind: Mesh` (apiVersion appmesh.k8s.aws/v1beta2) is \
             required"
                .to_string(),
        );
    }

    // Duplicates: the first definition wins, later ones are errors.
    fn index<T>(
        items: &[Seen<T>],
        id: impl Fn(&T) -> &ResourceId,
        kind: &str,
        err: &mut impl FnMut(Pos, &str, String),
    ) -> BTreeMap<ResourceId, usize> {
        let mut map = BTreeMap::new();
        for (i, seen) in items.iter().enumerate() {
            let rid = id(&seen.value);
            if let Some(&first) = map.get(rid) {
                let first: &Seen<T> = &items[first];
                err(
                    seen.pos,
                    &seen.label,
                    format!(
                        "duplicate {kind} {rid}: already defined at line {}",
                        first.pos.line
                    ),
                );
            } else {
                map.insert(rid.clone(), i);
            }
        }
        map
    }
    let nodes = index(&decoded.virtual_nodes, |v| &v.id, "VirtualNode", &mut err);
    let services = index(
        &decoded.virtual_services,
        |v| &v.id,
        "VirtualService",
        &mut err,
    );
    let routers = index(
        &decoded.virtual_routers,
        |v| &v.id,
        "VirtualRouter",
        &mut err,
    );
    let gateways = index(
        &decoded.virtual_gateways,
        |v| &v.id,
        "VirtualGateway",
        &mut err,
    );
    let _ = index(&decoded.gateway_routes, |v| &v.id, "GatewayRoute", &mut err);

    for r in &decoded.refs {
        let known = match r.kind {
            RefKind::VirtualNode => &nodes,
            RefKind::VirtualService => &services,
            RefKind::VirtualRouter => &routers,
            RefKind::VirtualGateway => &gateways,
        };
        if decoded.failed.contains(&(r.kind, r.id.clone())) {
            continue;
        }
        if !known.contains_key(&r.id) {
            let same_ns = known
                .keys()
                .filter(|k| k.namespace == r.id.namespace)
                .map(|k| k.name.as_str());
            let hint = match closest(&r.id.name, same_ns) {
                Some(c) => format!(" (did you mean `{c}`?)"),
                None => {
                    let elsewhere: Vec<String> = known
                        .keys()
                        .filter(|k| k.name == r.id.name)
                        .map(|k| k.to_string())
                        .collect();
                    if elsewhere.is_empty() {
                        String::new()
                    } else {
                        format!(
                            " (a {} of that name exists as {}: set `namespace`)",
                            r.kind.name(),
                            elsewhere.join(", ")
                        )
                    }
                }
            };
            err(
                r.pos,
                &r.path,
                format!(
                    "{} {} does not exist in this mesh file{hint}",
                    r.kind.name(),
                    r.id
                ),
            );
            continue;
        }
        if let (RefKind::VirtualNode, Some((port, pos, path))) = (r.kind, &r.port) {
            let node = &decoded.virtual_nodes[nodes[&r.id]].value;
            let ports: Vec<u16> = node
                .spec
                .listeners
                .iter()
                .map(|l| l.port_mapping.port)
                .collect();
            if !ports.contains(port) {
                let list = if ports.is_empty() {
                    "it has no listeners".to_string()
                } else {
                    format!(
                        "its listener ports: {}",
                        ports
                            .iter()
                            .map(u16::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                };
                err(
                    *pos,
                    path,
                    format!(
                        "VirtualNode {} has no listener on port {port} ({list})",
                        r.id
                    ),
                );
            }
        }
    }

    let mesh = mesh?;
    if diags.iter().any(|d| d.severity == Severity::Error) {
        return None;
    }
    fn sorted<T>(items: Vec<Seen<T>>, key: impl Fn(&T) -> ResourceId) -> Vec<T> {
        let mut v: Vec<T> = items.into_iter().map(|s| s.value).collect();
        v.sort_by_key(|t| key(t));
        v
    }
    Some(MeshConfig {
        mesh: mesh.value,
        virtual_nodes: sorted(decoded.virtual_nodes, |v| v.id.clone()),
        virtual_services: sorted(decoded.virtual_services, |v| v.id.clone()),
        virtual_routers: sorted(decoded.virtual_routers, |v| v.id.clone()),
        virtual_gateways: sorted(decoded.virtual_gateways, |v| v.id.clone()),
        gateway_routes: sorted(decoded.gateway_routes, |v| v.id.clone()),
        namespaces: decoded.namespaces,
        source,
    })
}
