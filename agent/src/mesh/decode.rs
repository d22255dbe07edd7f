//! Positioned YAML tree → typed model, one document at a time.
//!
//! Every problem becomes a [`Diagnostic`] with the file, line, column and field path; decoding
//! goes on after an error so the user sees all of them at once. Checks that need more than one
//! document (references, duplicates, the single Mesh) are left to `validate.rs`: this module
//! records what it saw ([`PendingRef`], [`Seen`]) with positions for it.
//!
//! This file holds the decoding context ([`Cx`]: typed readers for scalars, objects and lists
//! that record diagnostics) and the document dispatch (kind, metadata, selectors). Each
//! resource's spec is decoded in a file of its own under `decode/`, as more `impl Cx` blocks:
//! `virtual_node.rs` (Mesh, VirtualNode, VirtualService), `router.rs` (VirtualRouter, Route),
//! `gateway.rs` (VirtualGateway, GatewayRoute), and the pieces they share: `common.rs`
//! (durations, ports, timeouts, references, logging), `tls.rs` (certificates, validation,
//! client policies) and `resilience.rs` (health checks, connection pools, rate limits).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use super::model::*;
use super::yaml::{Document, Node, Pos, Value};
use super::{Diagnostic, Severity};

mod common;
mod gateway;
mod resilience;
mod router;
mod tls;
mod virtual_node;

/// The App Mesh API group/version strait reads.
pub(crate) const API_VERSION: &str = "appmesh.k8s.aws/v1beta2";
const API_GROUP_PREFIX: &str = "appmesh.k8s.aws/";
const KINDS: &[&str] = &[
    "Mesh",
    "VirtualNode",
    "VirtualService",
    "VirtualRouter",
    "VirtualGateway",
    "GatewayRoute",
    "BackendGroup",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[expect(
    clippy::enum_variant_names,
    reason = "the App Mesh kind names, spelled as users write them"
)]
pub(crate) enum RefKind {
    VirtualNode,
    VirtualService,
    VirtualRouter,
    VirtualGateway,
}

impl RefKind {
    pub fn name(self) -> &'static str {
        match self {
            RefKind::VirtualNode => "VirtualNode",
            RefKind::VirtualService => "VirtualService",
            RefKind::VirtualRouter => "VirtualRouter",
            RefKind::VirtualGateway => "VirtualGateway",
        }
    }
}

/// A reference to check once every document is read.
#[derive(Debug, Clone)]
pub(crate) struct PendingRef {
    pub kind: RefKind,
    pub id: ResourceId,
    pub pos: Pos,
    /// The file the reference is in (a mesh may span several).
    pub file: PathBuf,
    /// Full diagnostic path ("VirtualRouter shop/cart: spec.routes[0]...").
    pub path: String,
    /// A weighted target's `port`, to check against the node's listeners.
    pub port: Option<(u16, Pos, String)>,
}

/// A resource as read, with where its name is (for duplicate reports).
#[derive(Debug)]
pub(crate) struct Seen<T> {
    pub value: T,
    pub pos: Pos,
    /// The file the resource is defined in (a mesh may span several).
    pub file: PathBuf,
    pub label: String,
}

#[derive(Debug, Default)]
pub(crate) struct Decoded {
    pub meshes: Vec<Seen<Mesh>>,
    pub virtual_nodes: Vec<Seen<VirtualNode>>,
    pub virtual_services: Vec<Seen<VirtualService>>,
    pub virtual_routers: Vec<Seen<VirtualRouter>>,
    pub virtual_gateways: Vec<Seen<VirtualGateway>>,
    pub gateway_routes: Vec<Seen<GatewayRoute>>,
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    pub refs: Vec<PendingRef>,
    /// Resources whose spec had errors: they exist (references to them are fine), they are
    /// just not usable. Keeps one bad value from cascading into "does not exist" reports.
    pub failed: BTreeSet<(RefKind, ResourceId)>,
    /// Mesh documents whose spec had errors (so "no Mesh" is not reported on top).
    pub failed_meshes: usize,
}

impl Decoded {
    /// Adds what another file of the same mesh held; `validate` checks the union.
    pub(crate) fn merge(&mut self, other: Decoded) {
        self.meshes.extend(other.meshes);
        self.virtual_nodes.extend(other.virtual_nodes);
        self.virtual_services.extend(other.virtual_services);
        self.virtual_routers.extend(other.virtual_routers);
        self.virtual_gateways.extend(other.virtual_gateways);
        self.gateway_routes.extend(other.gateway_routes);
        self.namespaces.extend(other.namespaces);
        self.refs.extend(other.refs);
        self.failed.extend(other.failed);
        self.failed_meshes += other.failed_meshes;
    }
}

pub(crate) fn decode(file: &Path, docs: &[Document]) -> (Decoded, Vec<Diagnostic>) {
    let mut cx = Cx {
        file,
        diags: Vec::new(),
        res: String::new(),
        ns: String::new(),
        out: Decoded::default(),
    };
    for (i, doc) in docs.iter().enumerate() {
        match &doc.root {
            None => {}
            Some(Node {
                value: Value::Null, ..
            }) => {}
            Some(root) => cx.object(root, i + 1, 0),
        }
    }
    (cx.out, cx.diags)
}

pub(crate) fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

/// Levenshtein distance, for "did you mean" hints.
pub(crate) fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(!ca.eq_ignore_ascii_case(cb));
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The closest candidate, if close enough to be a plausible typo.
pub(crate) fn closest<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(2);
    candidates
        .into_iter()
        .map(|c| (distance(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// A mapping being decoded.
struct Obj<'n> {
    pos: Pos,
    path: String,
    entries: &'n [(Node, Node)],
}

impl<'n> Obj<'n> {
    fn entry(&self, key: &str) -> Option<&'n (Node, Node)> {
        self.entries
            .iter()
            .find(|(k, _)| matches!(&k.value, Value::Str(s) if s == key))
    }

    /// The value of `key`; an explicit `null` counts as absent (as in Kubernetes).
    fn get(&self, key: &str) -> Option<&'n Node> {
        self.entry(key)
            .map(|(_, v)| v)
            .filter(|v| v.value != Value::Null)
    }

    fn key_pos(&self, key: &str) -> Pos {
        self.entry(key).map_or(self.pos, |(k, _)| k.pos)
    }

    fn at(&self, key: &str) -> String {
        join(&self.path, key)
    }
}

struct Cx<'f> {
    file: &'f Path,
    diags: Vec<Diagnostic>,
    /// "VirtualRouter shop/cart": prefixes every path.
    res: String,
    /// Namespace of the resource being decoded (references default to it).
    ns: String,
    out: Decoded,
}

impl Cx<'_> {
    fn full_path(&self, path: &str) -> String {
        match (self.res.is_empty(), path.is_empty()) {
            (true, _) => path.to_string(),
            (false, true) => self.res.clone(),
            (false, false) => format!("{}: {path}", self.res),
        }
    }

    fn diag(&mut self, severity: Severity, pos: Pos, path: &str, message: impl Into<String>) {
        self.diags.push(Diagnostic {
            severity,
            file: self.file.to_path_buf(),
            line: pos.line,
            column: pos.col,
            path: self.full_path(path),
            message: message.into(),
        });
    }

    fn err(&mut self, pos: Pos, path: &str, message: impl Into<String>) {
        self.diag(Severity::Error, pos, path, message);
    }

    fn warn(&mut self, pos: Pos, path: &str, message: impl Into<String>) {
        self.diag(Severity::Warning, pos, path, message);
    }

    // ---- generic accessors ------------------------------------------------------------------

    /// A mapping with the given known keys; unknown keys get a warning, duplicates an error.
    fn obj<'n>(&mut self, n: &'n Node, path: &str, known: &[&str]) -> Option<Obj<'n>> {
        let Value::Map(entries) = &n.value else {
            self.err(
                n.pos,
                path,
                format!("expected a mapping, got {}", n.value.describe()),
            );
            return None;
        };
        let mut seen = BTreeSet::new();
        for (k, _) in entries {
            let Some(key) = k.value.key_text() else {
                self.err(k.pos, path, "expected a string key, got a complex key");
                continue;
            };
            if !seen.insert(key.clone()) {
                self.err(k.pos, &join(path, &key), "duplicate key");
                continue;
            }
            if known.is_empty() || known.contains(&key.as_str()) {
                continue;
            }
            let hint = match closest(&key, known.iter().copied()) {
                Some(c) => format!("did you mean `{c}`?"),
                None => format!("known fields: {}", known.join(", ")),
            };
            self.warn(
                k.pos,
                &join(path, &key),
                format!("unknown field `{key}` is ignored; {hint}"),
            );
        }
        Some(Obj {
            pos: n.pos,
            path: path.to_string(),
            entries,
        })
    }

    fn missing(&mut self, o: &Obj<'_>, key: &str) {
        self.err(o.pos, &o.at(key), "required field is missing");
    }

    /// Optional field through a leaf decoder.
    fn opt<T>(
        &mut self,
        o: &Obj<'_>,
        key: &str,
        f: impl FnOnce(&mut Self, &Node, &str) -> Option<T>,
    ) -> Option<T> {
        let n = o.get(key)?;
        f(self, n, &o.at(key))
    }

    /// Required field through a leaf decoder.
    fn req<T>(
        &mut self,
        o: &Obj<'_>,
        key: &str,
        f: impl FnOnce(&mut Self, &Node, &str) -> Option<T>,
    ) -> Option<T> {
        match o.get(key) {
            Some(n) => f(self, n, &o.at(key)),
            None => {
                self.missing(o, key);
                None
            }
        }
    }

    /// Exactly one of `keys` (or at most one when `required` is false).
    fn one_of<'n>(
        &mut self,
        o: &Obj<'n>,
        keys: &[&'static str],
        required: bool,
    ) -> Option<(&'static str, &'n Node)> {
        let present: Vec<(&'static str, &'n Node)> = keys
            .iter()
            .filter_map(|k| o.get(k).map(|n| (*k, n)))
            .collect();
        match present.as_slice() {
            [] => {
                if required {
                    self.err(
                        o.pos,
                        &o.path,
                        format!("expected exactly one of {}", quoted(keys)),
                    );
                }
                None
            }
            [one] => Some(*one),
            [first, second, ..] => {
                self.err(
                    o.key_pos(second.0),
                    &o.at(second.0),
                    format!(
                        "`{}` and `{}` are mutually exclusive: give exactly one of {}",
                        first.0,
                        second.0,
                        quoted(keys)
                    ),
                );
                None
            }
        }
    }

    fn string(&mut self, n: &Node, path: &str) -> Option<String> {
        match &n.value {
            Value::Str(s) => Some(s.clone()),
            Value::Map(_) | Value::Seq(_) => {
                self.err(
                    n.pos,
                    path,
                    format!("expected a string, got {}", n.value.describe()),
                );
                None
            }
            other => {
                let text = other.key_text().unwrap_or_default();
                self.err(
                    n.pos,
                    path,
                    format!(
                        "expected a string, got {} (quote it: \"{text}\")",
                        other.describe()
                    ),
                );
                None
            }
        }
    }

    fn string_len(&mut self, n: &Node, path: &str, min: usize, max: usize) -> Option<String> {
        let s = self.string(n, path)?;
        let len = s.chars().count();
        if len < min || len > max {
            self.err(
                n.pos,
                path,
                format!("expected a string of {min}..={max} characters, got {len}"),
            );
            return None;
        }
        Some(s)
    }

    fn nonempty(&mut self, n: &Node, path: &str) -> Option<String> {
        self.string_len(n, path, 1, 4096)
    }

    fn int(&mut self, n: &Node, path: &str, min: i64, max: i64) -> Option<i64> {
        let range = if max == i64::MAX {
            format!("an integer >= {min}")
        } else {
            format!("an integer {min}..={max}")
        };
        match &n.value {
            Value::Int(i) if (min..=max).contains(i) => Some(*i),
            Value::Float(f) if f.fract() == 0.0 && *f >= min as f64 && *f <= max as f64 => {
                Some(*f as i64)
            }
            Value::Int(_) | Value::Float(_) => {
                self.err(
                    n.pos,
                    path,
                    format!(
                        "expected {range}, got {}",
                        n.value.key_text().unwrap_or_default()
                    ),
                );
                None
            }
            other => {
                self.err(
                    n.pos,
                    path,
                    format!("expected {range}, got {}", other.describe()),
                );
                None
            }
        }
    }

    fn u32_in(&mut self, n: &Node, path: &str, min: u32, max: u32) -> Option<u32> {
        self.int(n, path, min.into(), max.into()).map(|i| i as u32)
    }

    /// A positive count, capped at the value App Mesh uses for "unlimited" (2^31-1).
    fn positive(&mut self, n: &Node, path: &str) -> Option<u32> {
        self.u32_in(n, path, 1, i32::MAX as u32)
    }

    fn port(&mut self, n: &Node, path: &str) -> Option<u16> {
        self.int(n, path, 1, 65535).map(|p| p as u16)
    }

    fn boolean(&mut self, n: &Node, path: &str) -> Option<bool> {
        match n.value {
            Value::Bool(b) => Some(b),
            _ => {
                self.err(
                    n.pos,
                    path,
                    format!("expected true or false, got {}", n.value.describe()),
                );
                None
            }
        }
    }

    fn pick<T: Copy>(&mut self, n: &Node, path: &str, choices: &[(&str, T)]) -> Option<T> {
        let names: Vec<&str> = choices.iter().map(|(s, _)| *s).collect();
        let got = match &n.value {
            Value::Str(s) => s.clone(),
            other => other.key_text().unwrap_or_else(|| other.describe()),
        };
        if let Some((_, v)) = choices.iter().find(|(s, _)| *s == got) {
            return Some(*v);
        }
        let hint = closest(&got, names.iter().copied())
            .map(|c| format!(" (did you mean `{c}`?)"))
            .unwrap_or_default();
        self.err(
            n.pos,
            path,
            format!("expected one of {}, got `{got}`{hint}", quoted(&names)),
        );
        None
    }

    fn list<'n>(&mut self, n: &'n Node, path: &str, min: usize, max: usize) -> Option<&'n [Node]> {
        let Value::Seq(items) = &n.value else {
            self.err(
                n.pos,
                path,
                format!("expected a list, got {}", n.value.describe()),
            );
            return None;
        };
        if items.len() < min || items.len() > max {
            let want = if max == usize::MAX {
                format!("at least {min}")
            } else {
                format!("{min}..={max}")
            };
            self.err(
                n.pos,
                path,
                format!("expected {want} items, got {}", items.len()),
            );
            return None;
        }
        Some(items)
    }

    /// Every item through `f`; None if the list or any item is bad.
    fn each<T>(
        &mut self,
        n: &Node,
        path: &str,
        min: usize,
        max: usize,
        mut f: impl FnMut(&mut Self, &Node, &str) -> Option<T>,
    ) -> Option<Vec<T>> {
        let items = self.list(n, path, min, max)?;
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            match f(self, item, &index(path, i)) {
                Some(v) => out.push(v),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn string_map(&mut self, n: &Node, path: &str) -> Option<BTreeMap<String, String>> {
        let o = self.obj(n, path, &[])?;
        let mut out = BTreeMap::new();
        for (k, v) in o.entries {
            let key = k.value.key_text().unwrap_or_default();
            let p = join(path, &key);
            let value = if v.value == Value::Null {
                Some(String::new())
            } else {
                self.string(v, &p)
            };
            if let Some(value) = value {
                out.insert(key, value);
            }
        }
        Some(out)
    }

    fn ip(&mut self, n: &Node, path: &str) -> Option<IpAddr> {
        let s = self.string(n, path)?;
        match s.parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                self.err(
                    n.pos,
                    path,
                    format!("expected an IPv4 or IPv6 address, got {s:?}"),
                );
                None
            }
        }
    }

    fn regex(&mut self, n: &Node, path: &str) -> Option<String> {
        let s = self.string_len(n, path, 1, 255)?;
        match regex::Regex::new(&s) {
            Ok(_) => Some(s),
            Err(e) => {
                let first = e.to_string();
                let last = first.lines().last().unwrap_or("").trim();
                let last = last.strip_prefix("error: ").unwrap_or(last);
                self.err(n.pos, path, format!("invalid regex {s:?}: {last}"));
                None
            }
        }
    }

    // ---- documents ----------------------------------------------------------------------------

    fn object(&mut self, n: &Node, docno: usize, depth: usize) {
        self.res.clear();
        self.ns.clear();
        let Value::Map(entries) = &n.value else {
            self.err(
                n.pos,
                "",
                format!(
                    "document {docno} is not a Kubernetes object (a mapping with `apiVersion` \
                     and `kind`), got {}",
                    n.value.describe()
                ),
            );
            return;
        };
        // Not checked for unknown keys yet: only App Mesh documents are ours to check.
        let o = Obj {
            pos: n.pos,
            path: String::new(),
            entries,
        };
        let api = o.get("apiVersion");
        let kind = o.get("kind");
        let (Some(api), Some(kind)) = (api, kind) else {
            self.err(
                o.pos,
                "",
                format!(
                    "document {docno} is not a Kubernetes object: it needs `apiVersion` and `kind`"
                ),
            );
            return;
        };
        let (Some(api_s), Some(kind_s)) =
            (self.string(api, "apiVersion"), self.string(kind, "kind"))
        else {
            return;
        };
        if kind_s == "List" && api_s == "v1" && depth == 0 {
            if let Some(items) = o.get("items")
                && let Some(items) = self.list(items, "items", 0, usize::MAX)
            {
                for item in items {
                    self.object(item, docno, depth + 1);
                }
            }
            return;
        }
        if !api_s.starts_with(API_GROUP_PREFIX) {
            if api_s == "v1" && kind_s == "Namespace" {
                self.namespace(&o);
            }
            // Any other Kubernetes object (Service, Deployment...) is not ours: skip it.
            return;
        }
        if api_s != API_VERSION {
            self.err(
                api.pos,
                "apiVersion",
                format!("unsupported apiVersion `{api_s}`: strait reads `{API_VERSION}`"),
            );
            return;
        }
        if !KINDS.contains(&kind_s.as_str()) {
            let hint = closest(&kind_s, KINDS.iter().copied())
                .map(|c| format!(" (did you mean `{c}`?)"))
                .unwrap_or_default();
            self.err(
                kind.pos,
                "kind",
                format!(
                    "unknown App Mesh kind `{kind_s}`{hint}; expected one of {}",
                    quoted(&KINDS[..6])
                ),
            );
            return;
        }
        let _ = self.obj(n, "", &["apiVersion", "kind", "metadata", "spec", "status"]);
        let cluster_scoped = kind_s == "Mesh";
        let Some((name, ns, labels, name_pos)) = self.metadata(&o, &kind_s, docno, cluster_scoped)
        else {
            return;
        };
        let id = ResourceId::new(ns.clone(), name.clone());
        self.ns = ns;
        self.res = if cluster_scoped {
            format!("{kind_s} {name}")
        } else {
            format!("{kind_s} {id}")
        };
        let empty = Node {
            pos: o.pos,
            value: Value::Map(Vec::new()),
        };
        let spec = o.get("spec").unwrap_or(&empty);
        let label = self.res.clone();
        match kind_s.as_str() {
            "Mesh" => {
                let decoded = self.mesh_spec(spec);
                if decoded.is_none() {
                    self.out.failed_meshes += 1;
                }
                if let Some(spec) = decoded {
                    self.out.meshes.push(Seen {
                        value: Mesh { name, spec },
                        pos: name_pos,
                        file: self.file.to_path_buf(),
                        label,
                    });
                }
            }
            "VirtualNode" => {
                let decoded = self.virtual_node_spec(spec);
                if decoded.is_none() {
                    self.out.failed.insert((RefKind::VirtualNode, id.clone()));
                }
                if let Some(spec) = decoded {
                    self.out.virtual_nodes.push(Seen {
                        value: VirtualNode { id, labels, spec },
                        pos: name_pos,
                        file: self.file.to_path_buf(),
                        label,
                    });
                }
            }
            "VirtualService" => {
                let decoded = self.virtual_service_spec(spec);
                if decoded.is_none() {
                    self.out
                        .failed
                        .insert((RefKind::VirtualService, id.clone()));
                }
                if let Some(spec) = decoded {
                    self.out.virtual_services.push(Seen {
                        value: VirtualService { id, labels, spec },
                        pos: name_pos,
                        file: self.file.to_path_buf(),
                        label,
                    });
                }
            }
            "VirtualRouter" => {
                let decoded = self.virtual_router_spec(spec);
                if decoded.is_none() {
                    self.out.failed.insert((RefKind::VirtualRouter, id.clone()));
                }
                if let Some(spec) = decoded {
                    self.out.virtual_routers.push(Seen {
                        value: VirtualRouter { id, labels, spec },
                        pos: name_pos,
                        file: self.file.to_path_buf(),
                        label,
                    });
                }
            }
            "VirtualGateway" => {
                let decoded = self.virtual_gateway_spec(spec);
                if decoded.is_none() {
                    self.out
                        .failed
                        .insert((RefKind::VirtualGateway, id.clone()));
                }
                if let Some(spec) = decoded {
                    self.out.virtual_gateways.push(Seen {
                        value: VirtualGateway { id, labels, spec },
                        pos: name_pos,
                        file: self.file.to_path_buf(),
                        label,
                    });
                }
            }
            "GatewayRoute" => {
                if let Some(spec) = self.gateway_route_spec(spec) {
                    self.out.gateway_routes.push(Seen {
                        value: GatewayRoute { id, labels, spec },
                        pos: name_pos,
                        file: self.file.to_path_buf(),
                        label,
                    });
                }
            }
            _ => {
                // BackendGroup: a controller-side convenience.
                self.warn(
                    kind.pos,
                    "kind",
                    "BackendGroup is an App Mesh controller convenience that strait does not \
                     read; the document is skipped (list the backends on the VirtualNode)",
                );
            }
        }
    }

    /// (name, namespace, labels, position of the name).
    fn metadata(
        &mut self,
        o: &Obj<'_>,
        kind: &str,
        docno: usize,
        cluster_scoped: bool,
    ) -> Option<(String, String, BTreeMap<String, String>, Pos)> {
        self.res = format!("{kind} (document {docno})");
        let Some(meta) = o.get("metadata") else {
            self.missing(o, "metadata");
            return None;
        };
        // ObjectMeta has many server-side fields (uid, resourceVersion...): accept them all.
        let m = self.obj(meta, "metadata", &[])?;
        let name = self.req(&m, "name", Cx::nonempty);
        let ns = if cluster_scoped {
            Some(String::new())
        } else {
            match m.get("namespace") {
                Some(n) => self.nonempty(n, "metadata.namespace"),
                None => Some("default".to_string()),
            }
        };
        let labels = self.opt(&m, "labels", Cx::string_map).unwrap_or_default();
        let name = name?;
        let ns = ns?;
        let name_pos = m.get("name").map_or(m.pos, |n| n.pos);
        let bad = |s: &str| {
            s.len() > 253
                || !s
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        };
        // Reported, then decoding goes on so the spec's problems show up too.
        if bad(&name) {
            self.err(
                name_pos,
                "metadata.name",
                format!(
                    "{name:?} is not a valid Kubernetes name (lowercase letters, digits, `-` and \
                     `.`, at most 253 characters)"
                ),
            );
        }
        if bad(&ns) {
            self.err(
                m.get("namespace").map_or(m.pos, |n| n.pos),
                "metadata.namespace",
                format!("{ns:?} is not a valid Kubernetes namespace name"),
            );
        }
        Some((name, ns, labels, name_pos))
    }

    fn namespace(&mut self, o: &Obj<'_>) {
        self.res = "Namespace".to_string();
        let Some(meta) = o.get("metadata") else {
            self.missing(o, "metadata");
            return;
        };
        let Some(m) = self.obj(meta, "metadata", &[]) else {
            return;
        };
        let name = self.req(&m, "name", Cx::nonempty);
        let labels = self.opt(&m, "labels", Cx::string_map).unwrap_or_default();
        if let Some(name) = name {
            self.out.namespaces.insert(name, labels);
        }
    }

    // ---- shared shapes --------------------------------------------------------------------

    fn selector(&mut self, n: &Node, path: &str) -> Option<LabelSelector> {
        let o = self.obj(n, path, &["matchLabels", "matchExpressions"])?;
        let match_labels = self.opt(&o, "matchLabels", Cx::string_map);
        let exprs = self.opt(&o, "matchExpressions", |cx, n, p| {
            cx.each(n, p, 0, usize::MAX, |cx, n, p| {
                let o = cx.obj(n, p, &["key", "operator", "values"])?;
                let key = cx.req(&o, "key", Cx::nonempty);
                let operator = cx.req(&o, "operator", |cx, n, p| {
                    cx.pick(
                        n,
                        p,
                        &[
                            ("In", SelectorOperator::In),
                            ("NotIn", SelectorOperator::NotIn),
                            ("Exists", SelectorOperator::Exists),
                            ("DoesNotExist", SelectorOperator::DoesNotExist),
                        ],
                    )
                });
                let values = cx
                    .opt(&o, "values", |cx, n, p| {
                        cx.each(n, p, 0, usize::MAX, Cx::string)
                    })
                    .unwrap_or_default();
                let operator = operator?;
                let needs_values =
                    matches!(operator, SelectorOperator::In | SelectorOperator::NotIn);
                if needs_values == values.is_empty() {
                    let msg = if needs_values {
                        "operator In/NotIn needs a non-empty `values` list"
                    } else {
                        "operator Exists/DoesNotExist takes no `values`"
                    };
                    cx.err(o.pos, &o.at("values"), msg);
                    return None;
                }
                Some(LabelSelectorRequirement {
                    key: key?,
                    operator,
                    values,
                })
            })
        });
        let bad_exprs = o.get("matchExpressions").is_some() && exprs.is_none();
        let bad_labels = o.get("matchLabels").is_some() && match_labels.is_none();
        if bad_exprs || bad_labels {
            return None;
        }
        Some(LabelSelector {
            match_labels: match_labels.unwrap_or_default(),
            match_expressions: exprs.unwrap_or_default(),
        })
    }
}

const PROTOCOLS: &[(&str, Protocol)] = &[
    ("http", Protocol::Http),
    ("http2", Protocol::Http2),
    ("grpc", Protocol::Grpc),
    ("tcp", Protocol::Tcp),
];
const GATEWAY_PROTOCOLS: &[(&str, Protocol)] = &[
    ("http", Protocol::Http),
    ("http2", Protocol::Http2),
    ("grpc", Protocol::Grpc),
];

fn quoted(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Follows a key path through nested mappings.
fn find<'n>(n: &'n Node, keys: &[&str]) -> Option<&'n Node> {
    let mut cur = n;
    for key in keys {
        let Value::Map(entries) = &cur.value else {
            return None;
        };
        cur = &entries
            .iter()
            .find(|(k, _)| matches!(&k.value, Value::Str(s) if s == key))?
            .1;
    }
    Some(cur)
}

/// `arn:PARTITION:appmesh:REGION:ACCOUNT:mesh/MESH/TYPE/NAME` → NAME, checking TYPE.
pub(crate) fn parse_arn(arn: &str, kind: RefKind) -> Result<String, String> {
    let want = match kind {
        RefKind::VirtualNode => "virtualNode",
        RefKind::VirtualService => "virtualService",
        RefKind::VirtualRouter => "virtualRouter",
        RefKind::VirtualGateway => "virtualGateway",
    };
    let expected = format!(
        "expected an App Mesh ARN like `arn:aws:appmesh:REGION:ACCOUNT:mesh/MESH/{want}/NAME`, \
         got {arn:?}"
    );
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    let [prefix, _partition, service, _region, _account, resource] = parts.as_slice() else {
        return Err(expected);
    };
    if *prefix != "arn" || *service != "appmesh" {
        return Err(expected);
    }
    let segs: Vec<&str> = resource.split('/').collect();
    let [mesh, _mesh_name, ty, name] = segs.as_slice() else {
        return Err(expected);
    };
    if *mesh != "mesh" || name.is_empty() {
        return Err(expected);
    }
    if *ty != want {
        return Err(format!("expected a {want} ARN, got a {ty} ARN: {arn:?}"));
    }
    Ok((*name).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions() {
        assert_eq!(
            closest("weightedTarget", ["weightedTargets", "weight"]),
            Some("weightedTargets")
        );
        assert_eq!(closest("zzz", ["weightedTargets"]), None);
        assert_eq!(
            closest("drop_all", ["ALLOW_ALL", "DROP_ALL"]),
            Some("DROP_ALL")
        );
    }

    #[test]
    fn arns() {
        assert_eq!(
            parse_arn(
                "arn:aws:appmesh:eu-west-1:123456789012:mesh/shop/virtualNode/cart-v1",
                RefKind::VirtualNode
            ),
            Ok("cart-v1".to_string())
        );
        assert!(
            parse_arn(
                "arn:aws:appmesh:eu-west-1:1:mesh/shop/virtualService/cart",
                RefKind::VirtualNode
            )
            .unwrap_err()
            .contains("got a virtualService ARN")
        );
        assert!(parse_arn("cart", RefKind::VirtualNode).is_err());
    }
}
