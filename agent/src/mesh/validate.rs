//! Checks that span documents, and files when a mesh is a directory: exactly one Mesh, no
//! duplicate names, every reference points at an existing resource (and a weighted target's
//! `port` at one of the node's listeners). Per-document checks happen while decoding
//! (`decode.rs`).

use std::collections::BTreeMap;
use std::path::Path;

use super::decode::{Decoded, RefKind, Seen, closest};
use super::model::ResourceId;
use super::yaml::Pos;
use super::{Diagnostic, MeshConfig, Severity, Source};

/// Where an earlier definition is, as seen from a later one: the line in the same file,
/// `file:line:column` in another.
fn place(first_file: &Path, first: Pos, this_file: &Path) -> String {
    if first_file == this_file {
        format!("line {}", first.line)
    } else {
        format!("{}:{}:{}", first_file.display(), first.line, first.col)
    }
}

/// `source.files` are the files read, in order; an error with no better place (no Mesh at
/// all) names the only file, or `source.path` when there are several.
pub(crate) fn validate(
    decoded: Decoded,
    source: Source,
    diags: &mut Vec<Diagnostic>,
) -> Option<MeshConfig> {
    let mut err = |file: &Path, pos: Pos, path: &str, message: String| {
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
        let (name, at) = mesh.as_ref().map_or_else(Default::default, |m| {
            (m.value.name.clone(), place(&m.file, m.pos, &extra.file))
        });
        err(
            &extra.file,
            extra.pos,
            &extra.label,
            format!(
                "a second Mesh: a mesh file describes exactly one mesh (Mesh {name} is defined \
                 at {at})"
            ),
        );
    }
    if mesh.is_none() && decoded.failed_meshes == 0 {
        let (file, pos, what) = match source.files.as_slice() {
            [only] => (only.as_path(), Pos { line: 1, col: 1 }, "document"),
            _ => (
                source.path.as_path(),
                Pos::default(),
                "document in any of the files",
            ),
        };
        err(
            file,
            pos,
            "",
            format!(
                "no Mesh {what}: exactly one `kind: Mesh` (apiVersion appmesh.k8s.aws/v1beta2) \
                 is required"
            ),
        );
    }

    // Duplicates: the first definition wins, later ones are errors.
    fn index<T>(
        items: &[Seen<T>],
        id: impl Fn(&T) -> &ResourceId,
        kind: &str,
        err: &mut impl FnMut(&Path, Pos, &str, String),
    ) -> BTreeMap<ResourceId, usize> {
        let mut map = BTreeMap::new();
        for (i, seen) in items.iter().enumerate() {
            let rid = id(&seen.value);
            if let Some(&first) = map.get(rid) {
                let first: &Seen<T> = &items[first];
                err(
                    &seen.file,
                    seen.pos,
                    &seen.label,
                    format!(
                        "duplicate {kind} {rid}: already defined at {}",
                        place(&first.file, first.pos, &seen.file)
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
                &r.file,
                r.pos,
                &r.path,
                format!(
                    "{} {} does not exist in this mesh{hint}",
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
                    &r.file,
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
