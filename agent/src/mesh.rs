//! The mesh file: App Mesh (`appmesh.k8s.aws/v1beta2`) resources in multi-document YAML (or
//! JSON, which YAML 1.2 reads as it is), read into a typed, validated [`MeshConfig`].
//!
//! A mesh is one file, or a directory whose `*.yaml`, `*.yml` and `*.json` files together hold
//! one mesh, the way `kubectl apply -f DIR` reads a folder. A mounted ConfigMap is such a
//! directory: its files are read from the one version its `..data` link points at, so a reload
//! never mixes two versions. References, duplicates and the single Mesh are checked across all
//! the files, and every problem names the file it is in.
//!
//! App Mesh manifests load unchanged: field names, enums, defaults and limits follow the
//! controller's CRDs. Other Kubernetes documents are skipped (Namespace labels are kept for
//! `Mesh.spec.namespaceSelector`). Every problem is reported with file, line, column and field
//! path, all at once. strait's extensions (static addresses, rate limits, circuit breakers) are
//! optional fields documented in `docs/mesh-file.md`.
//!
//! This module only reads and checks. Turning the model into routing tables, watching the file
//! and keeping the last good mesh on a bad reload are the agent core's job.

mod decode;
mod files;
pub mod generate;
mod model;
mod validate;
mod yaml;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Serialize;
use sha2::{Digest, Sha256};

use decode::Decoded;

pub use files::{check_access_logs, check_files};
pub use model::*;

/// The whole mesh as read from its file or files. Resource lists are sorted by [`ResourceId`].
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshConfig {
    pub mesh: Mesh,
    pub virtual_nodes: Vec<VirtualNode>,
    pub virtual_services: Vec<VirtualService>,
    pub virtual_routers: Vec<VirtualRouter>,
    pub virtual_gateways: Vec<VirtualGateway>,
    pub gateway_routes: Vec<GatewayRoute>,
    /// Labels of the `kind: Namespace` documents in the file, by namespace name.
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    pub source: Source,
}

/// Where a [`MeshConfig`] came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    /// What was named: the mesh file, the mesh directory, or the first of several paths.
    pub path: PathBuf,
    /// Every file read, in order (a directory's in name order), as the operator names them.
    pub files: Vec<PathBuf>,
    /// Hex SHA-256 of the file's bytes when the mesh is one file; over every file's name and
    /// bytes when it is several. Tells a reload whether anything changed.
    pub sha256: String,
    pub loaded_at: SystemTime,
}

/// A parsed and validated mesh, with the warnings worth showing the operator.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: MeshConfig,
    pub warnings: Vec<Diagnostic>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read mesh file {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no mesh files in {}: a mesh directory holds *.yaml, *.yml or *.json files (names \
         starting with `.` are skipped); put the mesh there or name a file",
        dir.display()
    )]
    EmptyDir { dir: PathBuf },
    #[error("{}", display_invalid(diagnostics))]
    Invalid { diagnostics: Vec<Diagnostic> },
}

fn display_invalid(diagnostics: &[Diagnostic]) -> String {
    let errors = diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .count();
    let mut out = format!(
        "invalid mesh file ({errors} error{})",
        if errors == 1 { "" } else { "s" }
    );
    for d in diagnostics {
        out.push('\n');
        out.push_str(&d.to_string());
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        })
    }
}

/// One problem in a mesh file.
///
/// `line`/`column` are 1-based; 0 means "no position" (file checks, which run on the model).
/// `path` names the resource and field, e.g.
/// `VirtualRouter shop/cart: spec.routes[1].httpRoute.action.weightedTargets[0].weight`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub path: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        write!(f, ": {}: ", self.severity)?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// Extra checks on top of parsing and validation.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Also run [`check_files`] (TLS files must exist here); off for `strait validate` on a
    /// machine other than the node.
    pub check_files: bool,
}

/// Reads, parses and validates a mesh: a file, or a directory of files (see the module docs).
pub fn load_file(path: &Path) -> Result<Loaded, Error> {
    load_file_with(path, Options::default())
}

pub fn load_file_with(path: &Path, options: Options) -> Result<Loaded, Error> {
    load_paths(&[path.to_path_buf()], options)
}

/// Reads files and directories as one mesh (`strait validate a.yaml routes/`).
pub fn load_paths(paths: &[PathBuf], options: Options) -> Result<Loaded, Error> {
    let inputs = read_inputs(paths)?;
    let shown = paths.first().cloned().unwrap_or_default();
    parse_inputs(&shown, inputs, options)
}

/// The [`Source::sha256`] the mesh at `paths` would load with, without parsing it: lets a
/// reload skip content it has already seen.
pub fn digest(paths: &[PathBuf]) -> Result<String, Error> {
    Ok(digest_of(&read_inputs(paths)?))
}

/// Parses and validates mesh file text; `file` is only used in diagnostics and [`Source`].
pub fn parse_str(text: &str, file: &Path) -> Result<Loaded, Error> {
    parse_str_with(text, file, Options::default())
}

pub fn parse_str_with(text: &str, file: &Path, options: Options) -> Result<Loaded, Error> {
    let input = Input {
        file: file.to_path_buf(),
        bytes: text.as_bytes().to_vec(),
    };
    parse_inputs(file, vec![input], options)
}

/// One file of a mesh: the name diagnostics use, and its bytes.
struct Input {
    file: PathBuf,
    bytes: Vec<u8>,
}

const EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn read_inputs(paths: &[PathBuf]) -> Result<Vec<Input>, Error> {
    let mut inputs = Vec::new();
    for path in paths {
        if std::fs::metadata(path).map_err(io_error(path))?.is_dir() {
            inputs.extend(read_dir(path)?);
        } else {
            let bytes = std::fs::read(path).map_err(io_error(path))?;
            inputs.push(Input {
                file: path.clone(),
                bytes,
            });
        }
    }
    Ok(inputs)
}

/// The mesh files of a directory, by name. In a ConfigMap volume (`DIR/name.yaml ->
/// ..data/name.yaml`, `..data -> ..<timestamp>`) they are read from the directory `..data`
/// points at, resolved once, so all of them come from one version even if kubelet swaps
/// `..data` meanwhile; they are still reported as `DIR/name.yaml`. Names starting with `.`
/// (`..data`, the timestamped directories, editors' lock and swap files) are skipped.
fn read_dir(dir: &Path) -> Result<Vec<Input>, Error> {
    // kubelet deletes the old version right after the swap: a read that lost that race finds
    // its file gone and starts over from the new `..data`.
    const ATTEMPTS: usize = 3;
    let mut attempt = 1;
    loop {
        let base = match std::fs::read_link(dir.join("..data")) {
            Ok(target) => dir.join(target),
            Err(_) => dir.to_path_buf(),
        };
        match read_dir_once(dir, &base) {
            Err(Error::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound
                    && base != dir
                    && attempt < ATTEMPTS =>
            {
                attempt += 1;
            }
            result => return result,
        }
    }
}

fn read_dir_once(dir: &Path, base: &Path) -> Result<Vec<Input>, Error> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(base).map_err(io_error(base))? {
        let name = entry.map_err(io_error(base))?.file_name();
        let is_mesh_file = Path::new(&name)
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| EXTENSIONS.contains(&e));
        if name.as_encoded_bytes().starts_with(b".") || !is_mesh_file {
            continue;
        }
        let path = base.join(&name);
        // Follows symlinks: a directory that happens to be named `x.yaml` is not a mesh file.
        if std::fs::metadata(&path).map_err(io_error(&path))?.is_dir() {
            continue;
        }
        names.push(name);
    }
    if names.is_empty() {
        return Err(Error::EmptyDir {
            dir: dir.to_path_buf(),
        });
    }
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let path = base.join(&name);
            let bytes = std::fs::read(&path).map_err(io_error(&path))?;
            Ok(Input {
                file: dir.join(&name),
                bytes,
            })
        })
        .collect()
}

fn digest_of(inputs: &[Input]) -> String {
    let digest = match inputs {
        [one] => Sha256::digest(&one.bytes),
        _ => {
            let mut hasher = Sha256::new();
            for input in inputs {
                let name = input.file.as_os_str().as_encoded_bytes();
                hasher.update((name.len() as u64).to_le_bytes());
                hasher.update(name);
                hasher.update((input.bytes.len() as u64).to_le_bytes());
                hasher.update(&input.bytes);
            }
            hasher.finalize()
        }
    };
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The error for a file that is not UTF-8, at the first bad byte.
fn not_utf8(file: &Path, bytes: &[u8], error: std::str::Utf8Error) -> Diagnostic {
    let offset = error.valid_up_to();
    let before = &bytes[..offset];
    let line = before.iter().filter(|b| **b == b'\n').count() + 1;
    let column = offset
        - before
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |p| p + 1)
        + 1;
    Diagnostic {
        severity: Severity::Error,
        file: file.to_path_buf(),
        line,
        column,
        path: String::new(),
        message: "the mesh file is not valid UTF-8".to_string(),
    }
}

fn parse_inputs(path: &Path, inputs: Vec<Input>, options: Options) -> Result<Loaded, Error> {
    let source = Source {
        path: path.to_path_buf(),
        files: inputs.iter().map(|i| i.file.clone()).collect(),
        sha256: digest_of(&inputs),
        loaded_at: SystemTime::now(),
    };
    let mut decoded = Decoded::default();
    let mut diags = Vec::new();
    let mut unreadable = false;
    for input in &inputs {
        let text = match std::str::from_utf8(&input.bytes) {
            Ok(text) => text,
            Err(e) => {
                diags.push(not_utf8(&input.file, &input.bytes, e));
                unreadable = true;
                continue;
            }
        };
        let (docs, syntax) = yaml::parse_stream(text);
        if let Some(e) = syntax {
            diags.push(Diagnostic {
                severity: Severity::Error,
                file: input.file.clone(),
                line: e.pos.line,
                column: e.pos.col,
                path: String::new(),
                message: e.message,
            });
            unreadable = true;
            continue;
        }
        let (one, found) = decode::decode(&input.file, &docs);
        decoded.merge(one);
        diags.extend(found);
    }
    // A file that could not be read hides its resources: checking references against the
    // rest would only add noise to the one error that matters.
    let config = if unreadable {
        None
    } else {
        validate::validate(decoded, source, &mut diags)
    };
    if let Some(config) = &config
        && options.check_files
    {
        diags.extend(check_files(config));
    }
    let rank: BTreeMap<&Path, usize> = inputs
        .iter()
        .enumerate()
        .map(|(i, input)| (input.file.as_path(), i))
        .collect();
    diags.sort_by_key(|d| {
        let file = rank.get(d.file.as_path()).copied().unwrap_or(0);
        (file, d.line, d.column, d.severity)
    });
    match config {
        Some(config) if !diags.iter().any(|d| d.severity == Severity::Error) => Ok(Loaded {
            config,
            warnings: diags,
        }),
        _ => Err(Error::Invalid { diagnostics: diags }),
    }
}

impl MeshConfig {
    pub fn virtual_node(&self, id: &ResourceId) -> Option<&VirtualNode> {
        find(&self.virtual_nodes, id, |v| &v.id)
    }

    pub fn virtual_service(&self, id: &ResourceId) -> Option<&VirtualService> {
        find(&self.virtual_services, id, |v| &v.id)
    }

    pub fn virtual_router(&self, id: &ResourceId) -> Option<&VirtualRouter> {
        find(&self.virtual_routers, id, |v| &v.id)
    }

    pub fn virtual_gateway(&self, id: &ResourceId) -> Option<&VirtualGateway> {
        find(&self.virtual_gateways, id, |v| &v.id)
    }

    pub fn gateway_route(&self, id: &ResourceId) -> Option<&GatewayRoute> {
        find(&self.gateway_routes, id, |v| &v.id)
    }

    /// Whether pods of `namespace` belong to the mesh (`Mesh.spec.namespaceSelector`, evaluated
    /// on the labels of the file's Namespace documents; an undeclared namespace has no labels).
    /// An absent selector takes every namespace (the file describes one mesh; App Mesh would
    /// select none, which in a single-mesh file would only mean "nothing works").
    pub fn namespace_in_mesh(&self, namespace: &str) -> bool {
        self.namespace_in_mesh_with(namespace, None)
    }

    /// Like [`namespace_in_mesh`](Self::namespace_in_mesh), with the namespace's labels from
    /// the live source (a workload file, the cluster) taking precedence over the file's.
    pub fn namespace_in_mesh_with(
        &self,
        namespace: &str,
        live_labels: Option<&BTreeMap<String, String>>,
    ) -> bool {
        let Some(selector) = &self.mesh.spec.namespace_selector else {
            return true;
        };
        let empty = BTreeMap::new();
        let labels = live_labels
            .or_else(|| self.namespaces.get(namespace))
            .unwrap_or(&empty);
        selector.matches(labels)
    }

    /// The GatewayRoutes a VirtualGateway serves: those naming it in `virtualGatewayRef`, plus
    /// those without one whose namespace matches the gateway's `namespaceSelector` (absent:
    /// the gateway's own namespace) and whose labels match `gatewayRouteSelector` (absent:
    /// all). Sorted by priority (absent = 1000, App Mesh's default), then id.
    pub fn gateway_routes_for(&self, gateway: &VirtualGateway) -> Vec<&GatewayRoute> {
        let empty = BTreeMap::new();
        let mut out: Vec<&GatewayRoute> = self
            .gateway_routes
            .iter()
            .filter(|r| match &r.spec.virtual_gateway {
                Some(g) => *g == gateway.id,
                None => {
                    let ns_ok = match &gateway.spec.namespace_selector {
                        None => r.id.namespace == gateway.id.namespace,
                        Some(sel) => {
                            sel.matches(self.namespaces.get(&r.id.namespace).unwrap_or(&empty))
                        }
                    };
                    let labels_ok = gateway
                        .spec
                        .gateway_route_selector
                        .as_ref()
                        .is_none_or(|s| s.matches(&r.labels));
                    ns_ok && labels_ok
                }
            })
            .collect();
        out.sort_by_key(|r| (r.spec.priority.unwrap_or(1000), r.id.clone()));
        out
    }
}

fn find<'a, T>(items: &'a [T], id: &ResourceId, key: impl Fn(&T) -> &ResourceId) -> Option<&'a T> {
    items
        .binary_search_by(|t| key(t).cmp(id))
        .ok()
        .map(|i| &items[i])
}

/// `strait validate`'s summary: one line per kind.
pub fn summary(config: &MeshConfig) -> String {
    fn plural(n: usize, word: &str) -> String {
        format!("{n} {word}{}", if n == 1 { "" } else { "s" })
    }
    let routes: usize = config
        .virtual_routers
        .iter()
        .map(|r| r.spec.routes.len())
        .sum();
    let egress = match config.mesh.spec.egress_filter {
        EgressFilter::AllowAll => "ALLOW_ALL",
        EgressFilter::DropAll => "DROP_ALL",
    };
    let listeners: usize = config
        .virtual_nodes
        .iter()
        .map(|n| n.spec.listeners.len())
        .sum();
    let backends: usize = config
        .virtual_nodes
        .iter()
        .map(|n| n.spec.backends.len())
        .sum();
    [
        format!("Mesh {} (egress {egress})", config.mesh.name),
        format!(
            "{} ({}, {})",
            plural(config.virtual_nodes.len(), "VirtualNode"),
            plural(listeners, "listener"),
            plural(backends, "backend")
        ),
        plural(config.virtual_services.len(), "VirtualService"),
        format!(
            "{} ({})",
            plural(config.virtual_routers.len(), "VirtualRouter"),
            plural(routes, "route")
        ),
        plural(config.virtual_gateways.len(), "VirtualGateway"),
        plural(config.gateway_routes.len(), "GatewayRoute"),
    ]
    .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "\
apiVersion: appmesh.k8s.aws/v1beta2
kind: Mesh
metadata:
  name: shop
spec:
  namespaceSelector:
    matchLabels:
      mesh: shop
  egressFilter:
    type: DROP_ALL
---
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    mesh: shop
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata:
  name: color-blue
  namespace: shop
spec:
  podSelector:
    matchLabels:
      app: color
      version: blue
  listeners:
    - portMapping:
        port: 9000
        protocol: tcp
  serviceDiscovery:
    static:
      addresses: [10.0.0.7, \"fd00::7\"]
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata:
  name: client
  namespace: shop
spec:
  backends:
    - virtualService:
        virtualServiceRef:
          name: color
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualRouter
metadata:
  name: color
  namespace: shop
spec:
  listeners:
    - portMapping:
        port: 9000
        protocol: tcp
  routes:
    - name: all
      tcpRoute:
        action:
          weightedTargets:
            - virtualNodeRef:
                name: color-blue
              weight: 150
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata:
  name: color
  namespace: shop
spec:
  addresses: [10.96.0.10]
  provider:
    virtualRouter:
      virtualRouterRef:
        name: color
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: whatever
spec:
  anything: [goes, here]
";

    #[test]
    fn reports_weight_with_position_and_path() {
        let err = parse_str(MINIMAL, Path::new("mesh.yaml")).unwrap_err();
        let Error::Invalid { diagnostics } = &err else {
            panic!("{err}")
        };
        let errors: Vec<String> = diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .map(|d| d.to_string())
            .collect();
        assert_eq!(
            errors,
            vec![
                "mesh.yaml:65:23: error: VirtualRouter shop/color: \
                 spec.routes[0].tcpRoute.action.weightedTargets[0].weight: expected an integer \
                 0..=100, got 150"
            ]
        );
        assert!(err.to_string().starts_with("invalid mesh file (1 error)\n"));
    }

    #[test]
    fn loads_the_issue_2_subset() {
        let text = MINIMAL.replace("weight: 150", "weight: 100");
        let loaded = parse_str(&text, Path::new("mesh.yaml")).unwrap();
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        let c = &loaded.config;
        assert_eq!(c.mesh.name, "shop");
        assert_eq!(c.mesh.spec.egress_filter, EgressFilter::DropAll);
        assert!(c.namespace_in_mesh("shop"));
        assert!(!c.namespace_in_mesh("other"));
        let blue = c
            .virtual_node(&ResourceId::new("shop", "color-blue"))
            .unwrap();
        assert_eq!(
            blue.spec.listeners[0].port_mapping,
            PortMapping {
                port: 9000,
                protocol: Protocol::Tcp
            }
        );
        assert_eq!(
            blue.spec.service_discovery,
            Some(ServiceDiscovery::Static {
                addresses: vec!["10.0.0.7".parse().unwrap(), "fd00::7".parse().unwrap()]
            })
        );
        let client = c.virtual_node(&ResourceId::new("shop", "client")).unwrap();
        assert_eq!(
            client.spec.backends[0].virtual_service,
            ResourceId::new("shop", "color")
        );
        let vs = c
            .virtual_service(&ResourceId::new("shop", "color"))
            .unwrap();
        assert_eq!(
            vs.spec.provider,
            Some(Provider::VirtualRouter(ResourceId::new("shop", "color")))
        );
        assert_eq!(vs.hostname(), "color.shop.svc.cluster.local");
        let router = c.virtual_router(&ResourceId::new("shop", "color")).unwrap();
        let RouteKind::Tcp(tcp) = &router.spec.routes[0].kind else {
            panic!()
        };
        assert_eq!(
            tcp.action.weighted_targets,
            vec![WeightedTarget {
                virtual_node: ResourceId::new("shop", "color-blue"),
                weight: 100,
                port: None
            }]
        );
        assert_eq!(c.source.sha256.len(), 64);
        assert_eq!(
            summary(c),
            "Mesh shop (egress DROP_ALL)\n2 VirtualNodes (1 listener, 1 backend)\n1 \
             VirtualService\n1 VirtualRouter (1 route)\n0 VirtualGateways\n0 GatewayRoutes"
        );
        let json = serde_json::to_value(c).unwrap();
        assert_eq!(json["mesh"]["spec"]["egressFilter"], "DROP_ALL");
    }
}
