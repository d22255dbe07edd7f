//! Positioned YAML tree → typed model, one document at a time.
//!
//! Every problem becomes a [`Diagnostic`] with the file, line, column and field path; decoding
//! goes on after an error so the user sees all of them at once. Checks that need more than one
//! document (references, duplicates, the single Mesh) are left to `validate.rs`: this module
//! records what it saw ([`PendingRef`], [`Seen`]) with positions for it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use super::model::*;
use super::yaml::{Document, Node, Pos, Value};
use super::{Diagnostic, Severity};

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

    fn duration(&mut self, n: &Node, path: &str) -> Option<Duration> {
        let o = self.obj(n, path, &["unit", "value"])?;
        let unit = self.req(&o, "unit", |cx, n, p| {
            cx.pick(n, p, &[("s", DurationUnit::S), ("ms", DurationUnit::Ms)])
        });
        // App Mesh sets no upper bound, but the data path adds durations to clocks: anything
        // past MAX_DURATION_SECONDS is a typo or an attack, not a timeout.
        let max = match unit {
            Some(DurationUnit::Ms) => MAX_DURATION_SECONDS * 1000,
            _ => MAX_DURATION_SECONDS,
        };
        let value = self.req(&o, "value", |cx, n, p| {
            let value = cx.int(n, p, 0, i64::MAX)?;
            if value > max {
                cx.err(
                    n.pos,
                    p,
                    format!("expected at most {max} (one year; 0 disables a timeout), got {value}"),
                );
                return None;
            }
            Some(value)
        });
        Some(Duration {
            unit: unit?,
            value: value? as u64,
        })
    }

    fn port_mapping(&mut self, n: &Node, path: &str, gateway: bool) -> Option<PortMapping> {
        let o = self.obj(n, path, &["port", "protocol"])?;
        let port = self.req(&o, "port", Cx::port);
        let protocol = self.req(&o, "protocol", |cx, n, p| {
            if gateway {
                cx.pick(n, p, GATEWAY_PROTOCOLS)
            } else {
                cx.pick(n, p, PROTOCOLS)
            }
        });
        Some(PortMapping {
            port: port?,
            protocol: protocol?,
        })
    }

    fn http_timeout(&mut self, n: &Node, path: &str) -> Option<HttpTimeout> {
        let o = self.obj(n, path, &["perRequest", "idle"])?;
        let per_request = self.opt(&o, "perRequest", Cx::duration);
        let idle = self.opt(&o, "idle", Cx::duration);
        let bad = (o.get("perRequest").is_some() && per_request.is_none())
            || (o.get("idle").is_some() && idle.is_none());
        (!bad).then_some(HttpTimeout { per_request, idle })
    }

    fn tcp_timeout(&mut self, n: &Node, path: &str) -> Option<TcpTimeout> {
        let o = self.obj(n, path, &["idle"])?;
        let idle = self.opt(&o, "idle", Cx::duration);
        if o.get("idle").is_some() && idle.is_none() {
            return None;
        }
        Some(TcpTimeout { idle })
    }

    fn health_check(&mut self, n: &Node, path: &str, gateway: bool) -> Option<HealthCheck> {
        let o = self.obj(
            n,
            path,
            &[
                "healthyThreshold",
                "intervalMillis",
                "path",
                "port",
                "protocol",
                "timeoutMillis",
                "unhealthyThreshold",
            ],
        )?;
        let healthy = self.req(&o, "healthyThreshold", |cx, n, p| cx.u32_in(n, p, 2, 10));
        let unhealthy = self.req(&o, "unhealthyThreshold", |cx, n, p| cx.u32_in(n, p, 2, 10));
        let interval = self.req(&o, "intervalMillis", |cx, n, p| {
            cx.u32_in(n, p, 5000, 300_000)
        });
        let timeout = self.req(&o, "timeoutMillis", |cx, n, p| {
            cx.u32_in(n, p, 2000, 60_000)
        });
        let protocol = self.req(&o, "protocol", |cx, n, p| {
            cx.pick(
                n,
                p,
                if gateway {
                    GATEWAY_PROTOCOLS
                } else {
                    PROTOCOLS
                },
            )
        });
        let port = self.opt(&o, "port", Cx::port);
        let hc_path = self.opt(&o, "path", Cx::nonempty);
        if let (Some(proto), Some(_)) = (protocol, &hc_path)
            && matches!(proto, Protocol::Tcp | Protocol::Grpc)
        {
            self.warn(
                o.key_pos("path"),
                &o.at("path"),
                format!("`path` is only used by http and http2 health checks; ignored for {proto}"),
            );
        }
        Some(HealthCheck {
            healthy_threshold: healthy?,
            unhealthy_threshold: unhealthy?,
            interval_millis: interval?,
            timeout_millis: timeout?,
            protocol: protocol?,
            port,
            path: hc_path,
        })
    }

    fn connection_pool(&mut self, n: &Node, path: &str, gateway: bool) -> Option<ConnectionPool> {
        let keys: &[&'static str] = if gateway {
            &["http", "http2", "grpc"]
        } else {
            &["tcp", "http", "http2", "grpc"]
        };
        let o = self.obj(n, path, keys)?;
        let (which, v) = self.one_of(&o, keys, true)?;
        let p = o.at(which);
        match which {
            "tcp" => {
                let o = self.obj(v, &p, &["maxConnections"])?;
                let max_connections = self.req(&o, "maxConnections", Cx::positive)?;
                Some(ConnectionPool::Tcp { max_connections })
            }
            "http" => {
                let o = self.obj(v, &p, &["maxConnections", "maxPendingRequests"])?;
                let max_connections = self.req(&o, "maxConnections", Cx::positive);
                let max_pending_requests = self.opt(&o, "maxPendingRequests", Cx::positive);
                Some(ConnectionPool::Http {
                    max_connections: max_connections?,
                    max_pending_requests,
                })
            }
            _ => {
                let o = self.obj(v, &p, &["maxRequests"])?;
                let max_requests = self.req(&o, "maxRequests", Cx::positive)?;
                Some(if which == "grpc" {
                    ConnectionPool::Grpc { max_requests }
                } else {
                    ConnectionPool::Http2 { max_requests }
                })
            }
        }
    }

    /// strait extension `rateLimit` (see docs/resilience.md).
    fn rate_limit(&mut self, n: &Node, path: &str) -> Option<RateLimit> {
        let o = self.obj(
            n,
            path,
            &[
                "requestsPerSecond",
                "burst",
                "perCaller",
                "overrides",
                "shadow",
            ],
        )?;
        let rps = self.opt(&o, "requestsPerSecond", Cx::positive);
        let burst = self.opt(&o, "burst", Cx::positive);
        let per_caller = self.opt(&o, "perCaller", Cx::bucket);
        let overrides = self.opt(&o, "overrides", |cx, n, p| {
            cx.each(n, p, 1, 100, Cx::rate_limit_override)
        });
        let shadow = self.opt(&o, "shadow", Cx::boolean);
        let failed = |key: &str, ok: bool| o.get(key).is_some() && !ok;
        if failed("requestsPerSecond", rps.is_some())
            || failed("burst", burst.is_some())
            || failed("perCaller", per_caller.is_some())
            || failed("overrides", overrides.is_some())
            || failed("shadow", shadow.is_some())
        {
            return None;
        }
        if rps.is_none() && burst.is_some() {
            self.err(
                o.key_pos("burst"),
                &o.at("burst"),
                "`burst` needs `requestsPerSecond` beside it (the bucket every caller shares)",
            );
            return None;
        }
        let overrides = overrides.unwrap_or_default();
        if rps.is_none() && per_caller.is_none() && overrides.is_empty() {
            self.err(
                o.pos,
                path,
                "a rate limit needs at least one of `requestsPerSecond` (every caller together), \
                 `perCaller` or `overrides`",
            );
            return None;
        }
        Some(RateLimit {
            total: rps.map(|requests_per_second| Bucket {
                requests_per_second,
                burst,
            }),
            per_caller,
            overrides,
            shadow: shadow.unwrap_or(false),
        })
    }

    /// `{requestsPerSecond, burst?}`.
    fn bucket(&mut self, n: &Node, path: &str) -> Option<Bucket> {
        let o = self.obj(n, path, &["requestsPerSecond", "burst"])?;
        let rps = self.req(&o, "requestsPerSecond", Cx::positive);
        let burst = self.opt(&o, "burst", Cx::positive);
        Some(Bucket {
            requests_per_second: rps?,
            burst,
        })
    }

    /// `{callers: [{virtualNodeRef | virtualNodeARN | identity}], requestsPerSecond, burst?}`.
    fn rate_limit_override(&mut self, n: &Node, path: &str) -> Option<RateLimitOverride> {
        let o = self.obj(n, path, &["callers", "requestsPerSecond", "burst"])?;
        let callers = self.req(&o, "callers", |cx, n, p| {
            cx.each(n, p, 1, 100, |cx, n, p| {
                let o = cx.obj(n, p, &["virtualNodeRef", "virtualNodeARN", "identity"])?;
                if o.get("identity").is_some() {
                    if o.get("virtualNodeRef").is_some() || o.get("virtualNodeARN").is_some() {
                        cx.err(
                            o.key_pos("identity"),
                            &o.at("identity"),
                            "give either `identity` or a virtual node, not both",
                        );
                        return None;
                    }
                    return cx
                        .req(&o, "identity", |cx, n, p| cx.string_len(n, p, 1, 2048))
                        .map(RateLimitCaller::Identity);
                }
                cx.reference(
                    &o,
                    RefKind::VirtualNode,
                    "virtualNodeRef",
                    "virtualNodeARN",
                    None,
                )
                .map(RateLimitCaller::VirtualNode)
            })
        });
        let rps = self.req(&o, "requestsPerSecond", Cx::positive);
        let burst = self.opt(&o, "burst", Cx::positive);
        Some(RateLimitOverride {
            callers: callers?,
            limit: Bucket {
                requests_per_second: rps?,
                burst,
            },
        })
    }

    /// A certificate: `acm` (listeners only), `file` or `sds`.
    fn certificate(&mut self, n: &Node, path: &str, allow_acm: bool) -> Option<TlsCertificate> {
        let keys: &[&'static str] = if allow_acm {
            &["acm", "file", "sds"]
        } else {
            &["file", "sds"]
        };
        let o = self.obj(n, path, keys)?;
        let (which, v) = self.one_of(&o, keys, true)?;
        let p = o.at(which);
        match which {
            "acm" => {
                let o = self.obj(v, &p, &["certificateARN"])?;
                let arn = self.req(&o, "certificateARN", Cx::nonempty)?;
                // Accepted with a warning, this broke every connection from another node to
                // the listener (no certificate to present): refused where it is written.
                self.err(
                    v.pos,
                    &p,
                    "ACM certificates never leave AWS, so strait cannot present this one; use \
                     `file` (a certificate and key on the nodes running this virtual node's \
                     pods, e.g. from cert-manager or `strait ca issue`; see docs/security.md)",
                );
                Some(TlsCertificate::Acm {
                    certificate_arn: arn,
                })
            }
            "file" => {
                let o = self.obj(v, &p, &["certificateChain", "privateKey"])?;
                let chain = self.req(&o, "certificateChain", |cx, n, p| {
                    cx.string_len(n, p, 1, 255)
                });
                let key = self.req(&o, "privateKey", |cx, n, p| cx.string_len(n, p, 1, 255));
                Some(TlsCertificate::File {
                    certificate_chain: chain?,
                    private_key: key?,
                })
            }
            _ => {
                let o = self.obj(v, &p, &["secretName"])?;
                let secret = self.req(&o, "secretName", Cx::nonempty)?;
                self.sds_warning(v.pos, &p);
                Some(TlsCertificate::Sds {
                    secret_name: secret,
                })
            }
        }
    }

    fn sds_warning(&mut self, pos: Pos, path: &str) {
        self.warn(
            pos,
            path,
            "SDS is served by the strait identity service (`strait run --identity-service`, \
             docs/identity.md; the secret name is the SPIFFE ID asked for): an agent started \
             without one refuses this certificate or trust; otherwise use `file`",
        );
    }

    fn validation(&mut self, n: &Node, path: &str, allow_acm: bool) -> Option<TlsValidation> {
        let o = self.obj(n, path, &["trust", "subjectAlternativeNames"])?;
        let trust = self.req(&o, "trust", |cx, n, p| {
            let keys: &[&'static str] = if allow_acm {
                &["acm", "file", "sds"]
            } else {
                &["file", "sds"]
            };
            let o = cx.obj(n, p, keys)?;
            let (which, v) = cx.one_of(&o, keys, true)?;
            let p = o.at(which);
            match which {
                "acm" => {
                    let o = cx.obj(v, &p, &["certificateAuthorityARNs"])?;
                    let arns = cx.req(&o, "certificateAuthorityARNs", |cx, n, p| {
                        cx.each(n, p, 1, 3, Cx::nonempty)
                    })?;
                    cx.err(
                        v.pos,
                        &p,
                        "ACM Private CA trust lives in AWS, so strait cannot verify peers with \
                         it; use `file` (a PEM bundle of the CA that issued the peers' \
                         certificates; see docs/security.md)",
                    );
                    Some(TlsTrust::Acm {
                        certificate_authority_arns: arns,
                    })
                }
                "file" => {
                    let o = cx.obj(v, &p, &["certificateChain"])?;
                    let chain = cx.req(&o, "certificateChain", |cx, n, p| {
                        cx.string_len(n, p, 1, 255)
                    })?;
                    Some(TlsTrust::File {
                        certificate_chain: chain,
                    })
                }
                _ => {
                    let o = cx.obj(v, &p, &["secretName"])?;
                    let secret = cx.req(&o, "secretName", Cx::nonempty)?;
                    cx.sds_warning(v.pos, &p);
                    Some(TlsTrust::Sds {
                        secret_name: secret,
                    })
                }
            }
        });
        let sans = self.opt(&o, "subjectAlternativeNames", |cx, n, p| {
            let o = cx.obj(n, p, &["match"])?;
            cx.req(&o, "match", |cx, n, p| {
                let o = cx.obj(n, p, &["exact"])?;
                cx.req(&o, "exact", |cx, n, p| {
                    cx.each(n, p, 1, usize::MAX, Cx::nonempty)
                })
            })
        });
        if o.get("subjectAlternativeNames").is_some() && sans.is_none() {
            return None;
        }
        Some(TlsValidation {
            trust: trust?,
            subject_alternative_names: sans.unwrap_or_default(),
        })
    }

    fn listener_tls(&mut self, n: &Node, path: &str, gateway: bool) -> Option<ListenerTls> {
        let o = self.obj(n, path, &["mode", "certificate", "validation"])?;
        let mode = self.req(&o, "mode", |cx, n, p| {
            cx.pick(
                n,
                p,
                &[
                    ("STRICT", TlsMode::Strict),
                    ("PERMISSIVE", TlsMode::Permissive),
                    ("DISABLED", TlsMode::Disabled),
                ],
            )
        });
        let certificate = self.req(&o, "certificate", |cx, n, p| cx.certificate(n, p, true));
        // Listener-side trust cannot be ACM on a VirtualNode; a VirtualGateway's may be.
        let validation = self.opt(&o, "validation", |cx, n, p| cx.validation(n, p, gateway));
        if o.get("validation").is_some() && validation.is_none() {
            return None;
        }
        Some(ListenerTls {
            mode: mode?,
            certificate: certificate?,
            validation,
        })
    }

    fn client_policy(&mut self, n: &Node, path: &str, extensions: bool) -> Option<ClientPolicy> {
        let known: &[&str] = if extensions {
            &["tls", "circuitBreaker"]
        } else {
            &["tls"]
        };
        let o = self.obj(n, path, known)?;
        let tls = self.opt(&o, "tls", |cx, n, p| {
            let o = cx.obj(n, p, &["enforce", "ports", "certificate", "validation"])?;
            let enforce = cx.opt(&o, "enforce", Cx::boolean);
            let ports = cx.opt(&o, "ports", |cx, n, p| {
                cx.each(n, p, 0, usize::MAX, Cx::port)
            });
            let certificate = cx.opt(&o, "certificate", |cx, n, p| cx.certificate(n, p, false));
            let validation = cx.req(&o, "validation", |cx, n, p| cx.validation(n, p, true));
            if (o.get("ports").is_some() && ports.is_none())
                || (o.get("certificate").is_some() && certificate.is_none())
                || (o.get("enforce").is_some() && enforce.is_none())
            {
                return None;
            }
            Some(ClientTls {
                enforce: enforce.unwrap_or(true),
                ports: ports.unwrap_or_default(),
                certificate,
                validation: validation?,
            })
        });
        let circuit_breaker = if extensions {
            self.opt(&o, "circuitBreaker", |cx, n, p| {
                let o = cx.obj(
                    n,
                    p,
                    &[
                        "maxConnections",
                        "maxPendingRequests",
                        "maxRequests",
                        "maxRetries",
                    ],
                )?;
                Some(CircuitBreaker {
                    max_connections: cx.opt(&o, "maxConnections", Cx::positive),
                    max_pending_requests: cx.opt(&o, "maxPendingRequests", Cx::positive),
                    max_requests: cx.opt(&o, "maxRequests", Cx::positive),
                    max_retries: cx.opt(&o, "maxRetries", Cx::positive),
                })
            })
        } else {
            None
        };
        Some(ClientPolicy {
            tls,
            circuit_breaker,
        })
    }

    fn backend_defaults(&mut self, n: &Node, path: &str) -> Option<BackendDefaults> {
        let o = self.obj(n, path, &["clientPolicy"])?;
        let client_policy = self.opt(&o, "clientPolicy", |cx, n, p| cx.client_policy(n, p, true));
        Some(BackendDefaults { client_policy })
    }

    fn logging(&mut self, n: &Node, path: &str) -> Option<Logging> {
        let o = self.obj(n, path, &["accessLog"])?;
        let access_log = self.opt(&o, "accessLog", |cx, n, p| {
            let o = cx.obj(n, p, &["file"])?;
            cx.opt(&o, "file", |cx, n, p| {
                let o = cx.obj(n, p, &["path", "format"])?;
                let path = cx.req(&o, "path", |cx, n, p| {
                    let path = cx.string_len(n, p, 1, 255)?;
                    // The agent writes as root: a path may not climb out of the access log
                    // directory (the rest is checked where the directory is known).
                    match crate::telemetry::access_log::check_components(&path) {
                        Ok(()) => Some(path),
                        Err(error) => {
                            cx.err(n.pos, p, error.to_string());
                            None
                        }
                    }
                });
                let format = cx.opt(&o, "format", |cx, n, p| {
                    let o = cx.obj(n, p, &["text", "json"])?;
                    let (which, v) = cx.one_of(&o, &["text", "json"], true)?;
                    let p = o.at(which);
                    if which == "text" {
                        cx.nonempty(v, &p).map(LogFormat::Text)
                    } else {
                        cx.each(v, &p, 1, usize::MAX, Cx::key_value)
                            .map(LogFormat::Json)
                    }
                });
                Some(FileAccessLog {
                    path: path?,
                    format,
                })
            })
        });
        Some(Logging { access_log })
    }

    fn key_value(&mut self, n: &Node, path: &str) -> Option<KeyValue> {
        let o = self.obj(n, path, &["key", "value"])?;
        let key = self.req(&o, "key", Cx::nonempty);
        let value = self.req(&o, "value", Cx::nonempty);
        Some(KeyValue {
            key: key?,
            value: value?,
        })
    }

    /// `{xRef: {name, namespace?}}` or `{xARN: "arn:..."}`, recorded for the reference check.
    fn reference(
        &mut self,
        o: &Obj<'_>,
        kind: RefKind,
        ref_key: &str,
        arn_key: &str,
        port: Option<(u16, Pos, String)>,
    ) -> Option<ResourceId> {
        let (r, a) = (o.get(ref_key), o.get(arn_key));
        let (id, pos, path) = match (r, a) {
            (Some(_), Some(_)) => {
                self.err(
                    o.key_pos(arn_key),
                    &o.at(arn_key),
                    format!("`{ref_key}` and `{arn_key}` are mutually exclusive"),
                );
                return None;
            }
            (None, None) => {
                self.err(
                    o.pos,
                    &o.path,
                    format!("expected exactly one of `{ref_key}` or `{arn_key}`"),
                );
                return None;
            }
            (Some(r), None) => {
                let p = o.at(ref_key);
                let ro = self.obj(r, &p, &["name", "namespace", "uid"])?;
                let name = self.req(&ro, "name", Cx::nonempty)?;
                let ns = match ro.get("namespace") {
                    Some(n) => self.nonempty(n, &ro.at("namespace"))?,
                    None => self.ns.clone(),
                };
                (ResourceId::new(ns, name), r.pos, p)
            }
            (None, Some(a)) => {
                let p = o.at(arn_key);
                let s = self.string(a, &p)?;
                let name = match parse_arn(&s, kind) {
                    Ok(name) => name,
                    Err(msg) => {
                        self.err(a.pos, &p, msg);
                        return None;
                    }
                };
                (ResourceId::new(self.ns.clone(), name), a.pos, p)
            }
        };
        let path = self.full_path(&path);
        self.out.refs.push(PendingRef {
            kind,
            id: id.clone(),
            pos,
            file: self.file.to_path_buf(),
            path,
            port,
        });
        Some(id)
    }

    // ---- Mesh ------------------------------------------------------------------------------

    fn mesh_spec(&mut self, n: &Node) -> Option<MeshSpec> {
        let o = self.obj(
            n,
            "spec",
            &[
                "awsName",
                "namespaceSelector",
                "egressFilter",
                "meshOwner",
                "meshServiceDiscovery",
            ],
        )?;
        let aws_name = self.opt(&o, "awsName", Cx::nonempty);
        let namespace_selector = self.opt(&o, "namespaceSelector", Cx::selector);
        if o.get("namespaceSelector").is_none() {
            self.warn(
                o.pos,
                &o.at("namespaceSelector"),
                "no namespaceSelector: strait puts every namespace in this mesh (the file \
                 describes one mesh; App Mesh itself would select none); add a namespaceSelector \
                 to restrict it",
            );
        }
        let egress = self.opt(&o, "egressFilter", |cx, n, p| {
            let o = cx.obj(n, p, &["type"])?;
            cx.req(&o, "type", |cx, n, p| {
                cx.pick(
                    n,
                    p,
                    &[
                        ("ALLOW_ALL", EgressFilter::AllowAll),
                        ("DROP_ALL", EgressFilter::DropAll),
                    ],
                )
            })
        });
        let mesh_owner = self.opt(&o, "meshOwner", Cx::nonempty);
        if mesh_owner.is_some() {
            self.warn(
                o.key_pos("meshOwner"),
                &o.at("meshOwner"),
                "AWS-only (meshes shared through AWS RAM): strait ignores it",
            );
        }
        let service_discovery = self.opt(&o, "meshServiceDiscovery", |cx, n, p| {
            let o = cx.obj(n, p, &["ipPreference"])?;
            let ip_preference = cx.opt(&o, "ipPreference", |cx, n, p| {
                cx.pick(
                    n,
                    p,
                    &[
                        ("IPv4_PREFERRED", IpPreference::Ipv4Preferred),
                        ("IPv6_PREFERRED", IpPreference::Ipv6Preferred),
                        ("IPv4_ONLY", IpPreference::Ipv4Only),
                        ("IPv6_ONLY", IpPreference::Ipv6Only),
                    ],
                )
            });
            Some(MeshServiceDiscovery { ip_preference })
        });
        if o.get("egressFilter").is_some() && egress.is_none() {
            return None;
        }
        Some(MeshSpec {
            aws_name,
            namespace_selector,
            egress_filter: egress.unwrap_or_default(),
            mesh_owner,
            service_discovery,
        })
    }

    // ---- VirtualNode -------------------------------------------------------------------------

    fn virtual_node_spec(&mut self, n: &Node) -> Option<VirtualNodeSpec> {
        let o = self.obj(
            n,
            "spec",
            &[
                "awsName",
                "podSelector",
                "listeners",
                "serviceDiscovery",
                "backends",
                "backendGroups",
                "backendDefaults",
                "logging",
                "meshRef",
            ],
        )?;
        let aws_name = self.opt(&o, "awsName", Cx::nonempty);
        let pod_selector = self.opt(&o, "podSelector", Cx::selector);
        let listeners = self.opt(&o, "listeners", |cx, n, p| {
            cx.each(n, p, 0, usize::MAX, Cx::node_listener)
        });
        if let Some(ls) = &listeners {
            self.duplicate_ports(
                ls.iter().map(|l| l.port_mapping.port),
                o.get("listeners"),
                &o.at("listeners"),
            );
        }
        let service_discovery = self.opt(&o, "serviceDiscovery", Cx::service_discovery);
        let backends = self.opt(&o, "backends", |cx, n, p| {
            cx.each(n, p, 0, usize::MAX, |cx, n, p| {
                let o = cx.obj(n, p, &["virtualService"])?;
                cx.req(&o, "virtualService", |cx, n, p| {
                    let o = cx.obj(
                        n,
                        p,
                        &["virtualServiceRef", "virtualServiceARN", "clientPolicy"],
                    )?;
                    let vs = cx.reference(
                        &o,
                        RefKind::VirtualService,
                        "virtualServiceRef",
                        "virtualServiceARN",
                        None,
                    );
                    let client_policy =
                        cx.opt(&o, "clientPolicy", |cx, n, p| cx.client_policy(n, p, true));
                    Some(Backend {
                        virtual_service: vs?,
                        client_policy,
                    })
                })
            })
        });
        if o.get("backendGroups").is_some() {
            self.warn(
                o.key_pos("backendGroups"),
                &o.at("backendGroups"),
                "backendGroups is an App Mesh controller convenience that strait does not read; \
                 list the backends explicitly",
            );
        }
        let backend_defaults = self.opt(&o, "backendDefaults", Cx::backend_defaults);
        let logging = self.opt(&o, "logging", Cx::logging);
        let has_listeners = listeners.as_ref().is_some_and(|l| !l.is_empty());
        if has_listeners && o.get("serviceDiscovery").is_none() {
            self.err(
                o.pos,
                &o.at("serviceDiscovery"),
                "required when the node has listeners (one of `dns`, `awsCloudMap` or the strait \
                 extension `static`)",
            );
            return None;
        }
        let bad = |key: &str, ok: bool| o.get(key).is_some() && !ok;
        if bad("listeners", listeners.is_some())
            || bad("serviceDiscovery", service_discovery.is_some())
            || bad("backends", backends.is_some())
            || bad("podSelector", pod_selector.is_some())
        {
            return None;
        }
        Some(VirtualNodeSpec {
            aws_name,
            pod_selector,
            listeners: listeners.unwrap_or_default(),
            service_discovery,
            backends: backends.unwrap_or_default(),
            backend_defaults,
            logging,
        })
    }

    fn duplicate_ports(
        &mut self,
        ports: impl Iterator<Item = u16>,
        list: Option<&Node>,
        path: &str,
    ) {
        let mut seen = BTreeSet::new();
        for (i, port) in ports.enumerate() {
            if !seen.insert(port) {
                let pos = match list.map(|n| &n.value) {
                    Some(Value::Seq(items)) => items.get(i).map_or(Pos::default(), |n| n.pos),
                    _ => Pos::default(),
                };
                self.err(
                    pos,
                    &join(&index(path, i), "portMapping.port"),
                    format!("another listener already uses port {port}"),
                );
            }
        }
    }

    fn node_listener(&mut self, n: &Node, path: &str) -> Option<Listener> {
        let o = self.obj(
            n,
            path,
            &[
                "portMapping",
                "healthCheck",
                "outlierDetection",
                "connectionPool",
                "tls",
                "timeout",
                "rateLimit",
            ],
        )?;
        let port_mapping = self.req(&o, "portMapping", |cx, n, p| cx.port_mapping(n, p, false));
        let health_check = self.opt(&o, "healthCheck", |cx, n, p| cx.health_check(n, p, false));
        let outlier_detection = self.opt(&o, "outlierDetection", |cx, n, p| {
            let o = cx.obj(
                n,
                p,
                &[
                    "maxServerErrors",
                    "interval",
                    "baseEjectionDuration",
                    "maxEjectionPercent",
                ],
            )?;
            let max_server_errors =
                cx.req(&o, "maxServerErrors", |cx, n, p| cx.int(n, p, 1, i64::MAX));
            let interval = cx.req(&o, "interval", Cx::duration);
            let base = cx.req(&o, "baseEjectionDuration", Cx::duration);
            let pct = cx.req(&o, "maxEjectionPercent", |cx, n, p| cx.u32_in(n, p, 0, 100));
            Some(OutlierDetection {
                max_server_errors: max_server_errors? as u64,
                interval: interval?,
                base_ejection_duration: base?,
                max_ejection_percent: pct?,
            })
        });
        let connection_pool = self.opt(&o, "connectionPool", |cx, n, p| {
            cx.connection_pool(n, p, false)
        });
        if let (Some(pm), Some(pool)) = (&port_mapping, &connection_pool) {
            let kind = match pool {
                ConnectionPool::Tcp { .. } => "tcp",
                ConnectionPool::Http { .. } => "http",
                ConnectionPool::Http2 { .. } => "http2",
                ConnectionPool::Grpc { .. } => "grpc",
            };
            if kind != pm.protocol.as_str() {
                let p = o.at("connectionPool");
                self.err(
                    o.key_pos("connectionPool"),
                    &join(&p, kind),
                    format!(
                        "a `{kind}` connection pool, but the listener's protocol is {}: give \
                         `connectionPool.{}` instead",
                        pm.protocol.as_str(),
                        pm.protocol.as_str()
                    ),
                );
                return None;
            }
        }
        let tls = self.opt(&o, "tls", |cx, n, p| cx.listener_tls(n, p, false));
        let timeout = self.opt(&o, "timeout", |cx, n, p| {
            let keys = &["tcp", "http", "http2", "grpc"];
            let o = cx.obj(n, p, keys)?;
            let (which, v) = cx.one_of(&o, keys, true)?;
            let p = o.at(which);
            if let Some(pm) = port_mapping
                && pm.protocol.as_str() != which
            {
                cx.warn(
                    o.key_pos(which),
                    &p,
                    format!(
                        "a `{which}` timeout on a {} listener is ignored",
                        pm.protocol
                    ),
                );
            }
            match which {
                "tcp" => cx.tcp_timeout(v, &p).map(ListenerTimeout::Tcp),
                "http" => cx.http_timeout(v, &p).map(ListenerTimeout::Http),
                "http2" => cx.http_timeout(v, &p).map(ListenerTimeout::Http2),
                _ => cx.http_timeout(v, &p).map(ListenerTimeout::Grpc),
            }
        });
        let rate_limit = self.opt(&o, "rateLimit", Cx::rate_limit);
        let bad = |key: &str, ok: bool| o.get(key).is_some() && !ok;
        if bad("healthCheck", health_check.is_some())
            || bad("outlierDetection", outlier_detection.is_some())
            || bad("connectionPool", connection_pool.is_some())
            || bad("tls", tls.is_some())
            || bad("timeout", timeout.is_some())
            || bad("rateLimit", rate_limit.is_some())
        {
            return None;
        }
        Some(Listener {
            port_mapping: port_mapping?,
            health_check,
            outlier_detection,
            connection_pool,
            tls,
            timeout,
            rate_limit,
        })
    }

    fn service_discovery(&mut self, n: &Node, path: &str) -> Option<ServiceDiscovery> {
        let keys = &["dns", "awsCloudMap", "static"];
        let o = self.obj(n, path, keys)?;
        let (which, v) = self.one_of(&o, keys, true)?;
        let p = o.at(which);
        match which {
            "dns" => {
                let o = self.obj(v, &p, &["hostname", "responseType"])?;
                let hostname = self.req(&o, "hostname", |cx, n, p| cx.string_len(n, p, 1, 253));
                let response_type = self.opt(&o, "responseType", |cx, n, p| {
                    cx.pick(
                        n,
                        p,
                        &[
                            ("ENDPOINTS", DnsResponseType::Endpoints),
                            ("LOADBALANCER", DnsResponseType::LoadBalancer),
                        ],
                    )
                });
                if o.get("responseType").is_some() && response_type.is_none() {
                    return None;
                }
                Some(ServiceDiscovery::Dns {
                    hostname: hostname?,
                    response_type: response_type.unwrap_or_default(),
                })
            }
            "awsCloudMap" => {
                let o = self.obj(v, &p, &["namespaceName", "serviceName", "attributes"])?;
                let ns = self.req(&o, "namespaceName", |cx, n, p| cx.string_len(n, p, 1, 1024));
                let svc = self.req(&o, "serviceName", |cx, n, p| cx.string_len(n, p, 1, 1024));
                let attributes = self
                    .opt(&o, "attributes", |cx, n, p| {
                        cx.each(n, p, 0, usize::MAX, Cx::key_value)
                    })
                    .unwrap_or_default();
                self.warn(
                    v.pos,
                    &p,
                    "AWS-only: strait cannot query AWS Cloud Map, so this node gets no endpoints \
                     from it; use `dns` or the strait extension `static`",
                );
                Some(ServiceDiscovery::AwsCloudMap {
                    namespace_name: ns?,
                    service_name: svc?,
                    attributes,
                })
            }
            _ => {
                let o = self.obj(v, &p, &["addresses"])?;
                let addresses = self.req(&o, "addresses", |cx, n, p| {
                    cx.each(n, p, 1, usize::MAX, Cx::ip)
                })?;
                Some(ServiceDiscovery::Static { addresses })
            }
        }
    }

    // ---- VirtualService ----------------------------------------------------------------------

    fn virtual_service_spec(&mut self, n: &Node) -> Option<VirtualServiceSpec> {
        let o = self.obj(n, "spec", &["awsName", "provider", "addresses", "meshRef"])?;
        let aws_name = self.opt(&o, "awsName", Cx::nonempty);
        let provider = self.opt(&o, "provider", |cx, n, p| {
            let keys = &["virtualNode", "virtualRouter"];
            let o = cx.obj(n, p, keys)?;
            let (which, v) = cx.one_of(&o, keys, true)?;
            let p = o.at(which);
            if which == "virtualNode" {
                let o = cx.obj(v, &p, &["virtualNodeRef", "virtualNodeARN"])?;
                cx.reference(
                    &o,
                    RefKind::VirtualNode,
                    "virtualNodeRef",
                    "virtualNodeARN",
                    None,
                )
                .map(Provider::VirtualNode)
            } else {
                let o = cx.obj(v, &p, &["virtualRouterRef", "virtualRouterARN"])?;
                cx.reference(
                    &o,
                    RefKind::VirtualRouter,
                    "virtualRouterRef",
                    "virtualRouterARN",
                    None,
                )
                .map(Provider::VirtualRouter)
            }
        });
        let addresses = self.opt(&o, "addresses", |cx, n, p| {
            cx.each(n, p, 1, usize::MAX, Cx::ip)
        });
        if o.get("provider").is_none() {
            self.warn(
                o.pos,
                &o.at("provider"),
                "no provider (virtualNode or virtualRouter): strait has nowhere to send this \
                 service's traffic, so connections to it are refused",
            );
        }
        let bad = |key: &str, ok: bool| o.get(key).is_some() && !ok;
        if bad("provider", provider.is_some()) || bad("addresses", addresses.is_some()) {
            return None;
        }
        Some(VirtualServiceSpec {
            aws_name,
            provider,
            addresses: addresses.unwrap_or_default(),
        })
    }

    // ---- VirtualRouter and routes ------------------------------------------------------------

    fn virtual_router_spec(&mut self, n: &Node) -> Option<VirtualRouterSpec> {
        let o = self.obj(n, "spec", &["awsName", "listeners", "routes", "meshRef"])?;
        let aws_name = self.opt(&o, "awsName", Cx::nonempty);
        let listeners = self.req(&o, "listeners", |cx, n, p| {
            cx.each(n, p, 1, usize::MAX, |cx, n, p| {
                let o = cx.obj(n, p, &["portMapping"])?;
                let port_mapping =
                    cx.req(&o, "portMapping", |cx, n, p| cx.port_mapping(n, p, false))?;
                Some(RouterListener { port_mapping })
            })
        });
        if let Some(ls) = &listeners {
            self.duplicate_ports(
                ls.iter().map(|l| l.port_mapping.port),
                o.get("listeners"),
                &o.at("listeners"),
            );
        }
        let mut routes = Vec::new();
        let mut routes_ok = true;
        if let Some(list) = o.get("routes") {
            let p = o.at("routes");
            match self.list(list, &p, 0, usize::MAX) {
                None => routes_ok = false,
                Some(items) => {
                    let mut names: BTreeMap<String, Pos> = BTreeMap::new();
                    for (i, item) in items.iter().enumerate() {
                        let rp = index(&p, i);
                        match self.route(item, &rp, listeners.as_deref()) {
                            Some((route, name_pos)) => {
                                if names.insert(route.name.clone(), name_pos).is_some() {
                                    self.err(
                                        name_pos,
                                        &join(&rp, "name"),
                                        format!(
                                            "duplicate route name `{}` in this router",
                                            route.name
                                        ),
                                    );
                                    routes_ok = false;
                                }
                                routes.push(route);
                            }
                            None => routes_ok = false,
                        }
                    }
                }
            }
        }
        if !routes_ok {
            return None;
        }
        Some(VirtualRouterSpec {
            aws_name,
            listeners: listeners?,
            routes,
        })
    }

    fn route(
        &mut self,
        n: &Node,
        path: &str,
        listeners: Option<&[RouterListener]>,
    ) -> Option<(Route, Pos)> {
        let keys = &["httpRoute", "http2Route", "grpcRoute", "tcpRoute"];
        let o = self.obj(
            n,
            path,
            &[
                "name",
                "priority",
                "httpRoute",
                "http2Route",
                "grpcRoute",
                "tcpRoute",
            ],
        )?;
        let name = self.req(&o, "name", |cx, n, p| cx.string_len(n, p, 1, 255));
        let name_pos = o.get("name").map_or(o.pos, |n| n.pos);
        let priority = self.opt(&o, "priority", |cx, n, p| cx.u32_in(n, p, 0, 1000));
        let (which, v) = self.one_of(&o, keys, true)?;
        let p = o.at(which);
        let kind = match which {
            "httpRoute" => self.http_route(v, &p).map(RouteKind::Http),
            "http2Route" => self.http_route(v, &p).map(RouteKind::Http2),
            "grpcRoute" => self.grpc_route(v, &p).map(RouteKind::Grpc),
            _ => self.tcp_route(v, &p).map(RouteKind::Tcp),
        }?;
        if o.get("priority").is_some() && priority.is_none() {
            return None;
        }
        // Checks against the router's listeners (local to this document).
        if let Some(listeners) = listeners {
            let ports: Vec<u16> = listeners.iter().map(|l| l.port_mapping.port).collect();
            let port_list = ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            let port_node = find(v, &["match", "port"]);
            match kind.match_port() {
                Some(port) if !ports.contains(&port) => {
                    self.err(
                        port_node.map_or(o.pos, |n| n.pos),
                        &join(&p, "match.port"),
                        format!(
                            "port {port} matches no listener of this router (listener ports: \
                             {port_list})"
                        ),
                    );
                    return None;
                }
                None if listeners.len() > 1 => {
                    self.err(
                        v.pos,
                        &join(&p, "match.port"),
                        format!(
                            "required: this router has {} listeners (ports {port_list}), so every \
                             route must say which one it serves",
                            listeners.len()
                        ),
                    );
                    return None;
                }
                _ => {}
            }
            let proto = kind.protocol();
            let relevant: Vec<&RouterListener> = listeners
                .iter()
                .filter(|l| kind.match_port().is_none_or(|p| p == l.port_mapping.port))
                .collect();
            if !relevant.iter().any(|l| l.port_mapping.protocol == proto) {
                self.warn(
                    v.pos,
                    &p,
                    format!(
                        "a {which} only matches traffic on a {proto} listener, and this router \
                         has none{}; the route never matches",
                        if kind.match_port().is_some() {
                            " on that port"
                        } else {
                            ""
                        }
                    ),
                );
            }
        }
        Some((
            Route {
                name: name?,
                priority,
                kind,
            },
            name_pos,
        ))
    }

    fn route_action(&mut self, n: &Node, path: &str) -> Option<RouteAction> {
        let o = self.obj(n, path, &["weightedTargets"])?;
        let targets = self.req(&o, "weightedTargets", |cx, n, p| {
            cx.each(n, p, 1, 10, |cx, n, p| {
                let o = cx.obj(
                    n,
                    p,
                    &["virtualNodeRef", "virtualNodeARN", "weight", "port"],
                )?;
                let weight = cx.req(&o, "weight", |cx, n, p| cx.u32_in(n, p, 0, 100));
                let port = cx.opt(&o, "port", Cx::port);
                let port_info = port.map(|port| {
                    (
                        port,
                        o.get("port").map_or(o.pos, |n| n.pos),
                        cx.full_path(&o.at("port")),
                    )
                });
                let node = cx.reference(
                    &o,
                    RefKind::VirtualNode,
                    "virtualNodeRef",
                    "virtualNodeARN",
                    port_info,
                );
                Some(WeightedTarget {
                    virtual_node: node?,
                    weight: weight?,
                    port,
                })
            })
        })?;
        if targets.iter().all(|t| t.weight == 0) {
            self.warn(
                o.pos,
                &o.at("weightedTargets"),
                "every weight is 0: traffic matching this route has nowhere to go",
            );
        }
        Some(RouteAction {
            weighted_targets: targets,
        })
    }

    fn header_match(&mut self, n: &Node, path: &str) -> Option<HeaderMatch> {
        let o = self.obj(n, path, &["name", "match", "invert"])?;
        let name = self.req(&o, "name", |cx, n, p| cx.string_len(n, p, 1, 50));
        let m = self.opt(&o, "match", Cx::match_method);
        let invert = self.opt(&o, "invert", Cx::boolean);
        if (o.get("match").is_some() && m.is_none())
            || (o.get("invert").is_some() && invert.is_none())
        {
            return None;
        }
        Some(HeaderMatch {
            name: name?,
            r#match: m,
            invert: invert.unwrap_or(false),
        })
    }

    fn match_method(&mut self, n: &Node, path: &str) -> Option<MatchMethod> {
        let keys = &["exact", "prefix", "suffix", "regex", "range"];
        let o = self.obj(n, path, keys)?;
        let (which, v) = self.one_of(&o, keys, true)?;
        let p = o.at(which);
        let text = |cx: &mut Self| cx.string_len(v, &p, 1, 255);
        match which {
            "exact" => text(self).map(MatchMethod::Exact),
            "prefix" => text(self).map(MatchMethod::Prefix),
            "suffix" => text(self).map(MatchMethod::Suffix),
            "regex" => self.regex(v, &p).map(MatchMethod::Regex),
            _ => {
                let o = self.obj(v, &p, &["start", "end"])?;
                let start = self.req(&o, "start", |cx, n, p| cx.int(n, p, i64::MIN, i64::MAX));
                let end = self.req(&o, "end", |cx, n, p| cx.int(n, p, i64::MIN, i64::MAX));
                let (start, end) = (start?, end?);
                if start >= end {
                    self.err(
                        o.pos,
                        &p,
                        format!("range start ({start}) must be below its end ({end}; exclusive)"),
                    );
                    return None;
                }
                Some(MatchMethod::Range { start, end })
            }
        }
    }

    fn path_match(&mut self, n: &Node, path: &str) -> Option<PathMatch> {
        let o = self.obj(n, path, &["exact", "regex"])?;
        let (which, v) = self.one_of(&o, &["exact", "regex"], true)?;
        let p = o.at(which);
        if which == "exact" {
            self.string_len(v, &p, 1, 255).map(PathMatch::Exact)
        } else {
            self.regex(v, &p).map(PathMatch::Regex)
        }
    }

    fn query_parameter(&mut self, n: &Node, path: &str) -> Option<QueryParameterMatch> {
        let o = self.obj(n, path, &["name", "match"])?;
        let name = self.req(&o, "name", Cx::nonempty);
        let exact = self.opt(&o, "match", |cx, n, p| {
            let o = cx.obj(n, p, &["exact"])?;
            cx.req(&o, "exact", Cx::string)
        });
        if o.get("match").is_some() && exact.is_none() {
            return None;
        }
        Some(QueryParameterMatch { name: name?, exact })
    }

    /// A path a gateway route matches or rewrites to: App Mesh reserves `/aws-appmesh*` for
    /// its own use and refuses it there.
    fn not_reserved(&mut self, n: &Node, path: &str, value: String) -> Option<String> {
        if value.starts_with("/aws-appmesh") {
            self.err(
                n.pos,
                path,
                format!(
                    "{value:?}: paths starting with `/aws-appmesh` are reserved by App Mesh; choose another"
                ),
            );
            return None;
        }
        Some(value)
    }

    fn gateway_prefix(&mut self, n: &Node, path: &str) -> Option<String> {
        let s = self.prefix(n, path)?;
        self.not_reserved(n, path, s)
    }

    fn gateway_path_match(&mut self, n: &Node, path: &str) -> Option<PathMatch> {
        match self.path_match(n, path)? {
            PathMatch::Exact(s) => self
                .not_reserved(n, &format!("{path}.exact"), s)
                .map(PathMatch::Exact),
            regex => Some(regex),
        }
    }

    fn prefix(&mut self, n: &Node, path: &str) -> Option<String> {
        let s = self.string_len(n, path, 1, 255)?;
        if !s.starts_with('/') {
            self.err(
                n.pos,
                path,
                format!("a prefix must start with `/`, got {s:?}"),
            );
            return None;
        }
        Some(s)
    }

    fn method(&mut self, n: &Node, path: &str) -> Option<HttpMethod> {
        self.pick(
            n,
            path,
            &[
                ("CONNECT", HttpMethod::Connect),
                ("DELETE", HttpMethod::Delete),
                ("GET", HttpMethod::Get),
                ("HEAD", HttpMethod::Head),
                ("OPTIONS", HttpMethod::Options),
                ("PATCH", HttpMethod::Patch),
                ("POST", HttpMethod::Post),
                ("PUT", HttpMethod::Put),
                ("TRACE", HttpMethod::Trace),
            ],
        )
    }

    fn http_route(&mut self, n: &Node, path: &str) -> Option<HttpRoute> {
        let o = self.obj(n, path, &["match", "action", "retryPolicy", "timeout"])?;
        let m = self.req(&o, "match", |cx, n, p| {
            let o = cx.obj(
                n,
                p,
                &[
                    "prefix",
                    "path",
                    "headers",
                    "method",
                    "scheme",
                    "queryParameters",
                    "port",
                ],
            )?;
            let prefix = cx.opt(&o, "prefix", Cx::prefix);
            let path = cx.opt(&o, "path", Cx::path_match);
            let headers = cx.opt(&o, "headers", |cx, n, p| {
                cx.each(n, p, 1, 10, Cx::header_match)
            });
            let method = cx.opt(&o, "method", Cx::method);
            let scheme = cx.opt(&o, "scheme", |cx, n, p| {
                cx.pick(
                    n,
                    p,
                    &[("http", HttpScheme::Http), ("https", HttpScheme::Https)],
                )
            });
            let qp = cx.opt(&o, "queryParameters", |cx, n, p| {
                cx.each(n, p, 1, 10, Cx::query_parameter)
            });
            let port = cx.opt(&o, "port", Cx::port);
            let bad = |key: &str, ok: bool| o.get(key).is_some() && !ok;
            if bad("prefix", prefix.is_some())
                || bad("path", path.is_some())
                || bad("headers", headers.is_some())
                || bad("method", method.is_some())
                || bad("scheme", scheme.is_some())
                || bad("queryParameters", qp.is_some())
                || bad("port", port.is_some())
            {
                return None;
            }
            Some(HttpRouteMatch {
                prefix,
                path,
                headers: headers.unwrap_or_default(),
                method,
                scheme,
                query_parameters: qp.unwrap_or_default(),
                port,
            })
        });
        let action = self.req(&o, "action", Cx::route_action);
        let retry = self.opt(&o, "retryPolicy", |cx, n, p| cx.retry_policy(n, p, false));
        let timeout = self.opt(&o, "timeout", Cx::http_timeout);
        if (o.get("retryPolicy").is_some() && retry.is_none())
            || (o.get("timeout").is_some() && timeout.is_none())
        {
            return None;
        }
        Some(HttpRoute {
            r#match: m?,
            action: action?,
            retry_policy: retry,
            timeout,
        })
    }

    fn retry_policy(&mut self, n: &Node, path: &str, grpc: bool) -> Option<RetryPolicy> {
        let keys: &[&str] = if grpc {
            &[
                "maxRetries",
                "perRetryTimeout",
                "httpRetryEvents",
                "tcpRetryEvents",
                "grpcRetryEvents",
            ]
        } else {
            &[
                "maxRetries",
                "perRetryTimeout",
                "httpRetryEvents",
                "tcpRetryEvents",
            ]
        };
        let o = self.obj(n, path, keys)?;
        let max_retries = self.req(&o, "maxRetries", |cx, n, p| {
            cx.u32_in(n, p, 0, i32::MAX as u32)
        });
        let per_retry_timeout = self.req(&o, "perRetryTimeout", Cx::duration);
        let http = self.opt(&o, "httpRetryEvents", |cx, n, p| {
            cx.each(n, p, 1, 25, |cx, n, p| {
                cx.pick(
                    n,
                    p,
                    &[
                        ("server-error", HttpRetryEvent::ServerError),
                        ("gateway-error", HttpRetryEvent::GatewayError),
                        ("client-error", HttpRetryEvent::ClientError),
                        ("stream-error", HttpRetryEvent::StreamError),
                    ],
                )
            })
        });
        let tcp = self.opt(&o, "tcpRetryEvents", |cx, n, p| {
            cx.each(n, p, 1, 1, |cx, n, p| {
                cx.pick(
                    n,
                    p,
                    &[("connection-error", TcpRetryEvent::ConnectionError)],
                )
            })
        });
        let grpc_events = if grpc {
            self.opt(&o, "grpcRetryEvents", |cx, n, p| {
                cx.each(n, p, 1, 5, |cx, n, p| {
                    cx.pick(
                        n,
                        p,
                        &[
                            ("cancelled", GrpcRetryEvent::Cancelled),
                            ("deadline-exceeded", GrpcRetryEvent::DeadlineExceeded),
                            ("internal", GrpcRetryEvent::Internal),
                            ("resource-exhausted", GrpcRetryEvent::ResourceExhausted),
                            ("unavailable", GrpcRetryEvent::Unavailable),
                        ],
                    )
                })
            })
        } else {
            None
        };
        let bad = |key: &str, ok: bool| o.get(key).is_some() && !ok;
        if bad("httpRetryEvents", http.is_some())
            || bad("tcpRetryEvents", tcp.is_some())
            || (grpc && bad("grpcRetryEvents", grpc_events.is_some()))
        {
            return None;
        }
        let none = http.is_none() && tcp.is_none() && grpc_events.is_none();
        if none {
            let names = if grpc {
                "`grpcRetryEvents`, `httpRetryEvents` or `tcpRetryEvents`"
            } else {
                "`httpRetryEvents` or `tcpRetryEvents`"
            };
            self.err(
                o.pos,
                path,
                format!("a retry policy needs at least one of {names}"),
            );
            return None;
        }
        Some(RetryPolicy {
            max_retries: max_retries?,
            per_retry_timeout: per_retry_timeout?,
            http_retry_events: http.unwrap_or_default(),
            tcp_retry_events: tcp.unwrap_or_default(),
            grpc_retry_events: grpc_events.unwrap_or_default(),
        })
    }

    fn grpc_route(&mut self, n: &Node, path: &str) -> Option<GrpcRoute> {
        let o = self.obj(n, path, &["match", "action", "retryPolicy", "timeout"])?;
        let m = self.req(&o, "match", |cx, n, p| {
            let o = cx.obj(n, p, &["serviceName", "methodName", "metadata", "port"])?;
            let service_name = cx.opt(&o, "serviceName", Cx::nonempty);
            let method_name = cx.opt(&o, "methodName", |cx, n, p| cx.string_len(n, p, 1, 50));
            let metadata = cx.opt(&o, "metadata", |cx, n, p| {
                cx.each(n, p, 1, 10, Cx::header_match)
            });
            let port = cx.opt(&o, "port", Cx::port);
            if o.get("methodName").is_some() && o.get("serviceName").is_none() {
                cx.err(
                    o.key_pos("methodName"),
                    &o.at("methodName"),
                    "`methodName` requires `serviceName`",
                );
                return None;
            }
            let bad = |key: &str, ok: bool| o.get(key).is_some() && !ok;
            if bad("serviceName", service_name.is_some())
                || bad("methodName", method_name.is_some())
                || bad("metadata", metadata.is_some())
                || bad("port", port.is_some())
            {
                return None;
            }
            Some(GrpcRouteMatch {
                service_name,
                method_name,
                metadata: metadata.unwrap_or_default(),
                port,
            })
        });
        let action = self.req(&o, "action", Cx::route_action);
        let retry = self.opt(&o, "retryPolicy", |cx, n, p| cx.retry_policy(n, p, true));
        let timeout = self.opt(&o, "timeout", Cx::http_timeout);
        if (o.get("retryPolicy").is_some() && retry.is_none())
            || (o.get("timeout").is_some() && timeout.is_none())
        {
            return None;
        }
        Some(GrpcRoute {
            r#match: m?,
            action: action?,
            retry_policy: retry,
            timeout,
        })
    }

    fn tcp_route(&mut self, n: &Node, path: &str) -> Option<TcpRoute> {
        let o = self.obj(n, path, &["match", "action", "timeout"])?;
        let m = self.opt(&o, "match", |cx, n, p| {
            let o = cx.obj(n, p, &["port"])?;
            let port = cx.opt(&o, "port", Cx::port);
            if o.get("port").is_some() && port.is_none() {
                return None;
            }
            Some(TcpRouteMatch { port })
        });
        let action = self.req(&o, "action", Cx::route_action);
        let timeout = self.opt(&o, "timeout", Cx::tcp_timeout);
        if (o.get("match").is_some() && m.is_none())
            || (o.get("timeout").is_some() && timeout.is_none())
        {
            return None;
        }
        Some(TcpRoute {
            r#match: m,
            action: action?,
            timeout,
        })
    }

    // ---- VirtualGateway and GatewayRoute ---------------------------------------------------

    fn virtual_gateway_spec(&mut self, n: &Node) -> Option<VirtualGatewaySpec> {
        let o = self.obj(
            n,
            "spec",
            &[
                "awsName",
                "namespaceSelector",
                "podSelector",
                "gatewayRouteSelector",
                "listeners",
                "logging",
                "backendDefaults",
                "meshRef",
            ],
        )?;
        let aws_name = self.opt(&o, "awsName", Cx::nonempty);
        let namespace_selector = self.opt(&o, "namespaceSelector", Cx::selector);
        let pod_selector = self.opt(&o, "podSelector", Cx::selector);
        let gateway_route_selector = self.opt(&o, "gatewayRouteSelector", Cx::selector);
        let listeners = self.opt(&o, "listeners", |cx, n, p| {
            cx.each(n, p, 0, usize::MAX, |cx, n, p| {
                let o = cx.obj(
                    n,
                    p,
                    &[
                        "portMapping",
                        "healthCheck",
                        "connectionPool",
                        "tls",
                        "rateLimit",
                    ],
                )?;
                let port_mapping =
                    cx.req(&o, "portMapping", |cx, n, p| cx.port_mapping(n, p, true));
                let health_check =
                    cx.opt(&o, "healthCheck", |cx, n, p| cx.health_check(n, p, true));
                let connection_pool = cx.opt(&o, "connectionPool", |cx, n, p| {
                    cx.connection_pool(n, p, true)
                });
                let tls = cx.opt(&o, "tls", |cx, n, p| cx.listener_tls(n, p, true));
                let rate_limit = cx.opt(&o, "rateLimit", Cx::rate_limit);
                let bad = |key: &str, ok: bool| o.get(key).is_some() && !ok;
                if bad("healthCheck", health_check.is_some())
                    || bad("connectionPool", connection_pool.is_some())
                    || bad("tls", tls.is_some())
                    || bad("rateLimit", rate_limit.is_some())
                {
                    return None;
                }
                // At the edge `overrides` name clients by their verified certificate
                // (gateway/limit.rs): a listener that asks for none could never apply them.
                if let Some(rate) = &rate_limit
                    && !rate.overrides.is_empty()
                    && tls
                        .as_ref()
                        .is_none_or(|t| t.validation.is_none() || t.mode == TlsMode::Disabled)
                {
                    let (pos, path) = match o.get("rateLimit").map(|n| &n.value) {
                        Some(Value::Map(entries)) => {
                            let rl = Obj {
                                pos: o.key_pos("rateLimit"),
                                path: o.at("rateLimit"),
                                entries,
                            };
                            (rl.key_pos("overrides"), rl.at("overrides"))
                        }
                        _ => (o.key_pos("rateLimit"), o.at("rateLimit")),
                    };
                    cx.err(
                        pos,
                        &path,
                        "a gateway listener's rate limit overrides name clients by their \
                         certificate: give the listener `tls` with `validation` (client \
                         certificates), or use `perCaller` (per client address) alone",
                    );
                    return None;
                }
                Some(GatewayListener {
                    port_mapping: port_mapping?,
                    health_check,
                    connection_pool,
                    tls,
                    rate_limit,
                })
            })
        });
        if let Some(ls) = &listeners {
            self.duplicate_ports(
                ls.iter().map(|l| l.port_mapping.port),
                o.get("listeners"),
                &o.at("listeners"),
            );
        }
        let logging = self.opt(&o, "logging", Cx::logging);
        let backend_defaults = self.opt(&o, "backendDefaults", |cx, n, p| {
            let o = cx.obj(n, p, &["clientPolicy"])?;
            let client_policy =
                cx.opt(&o, "clientPolicy", |cx, n, p| cx.client_policy(n, p, false));
            Some(BackendDefaults { client_policy })
        });
        let bad = |key: &str, ok: bool| o.get(key).is_some() && !ok;
        if bad("listeners", listeners.is_some())
            || bad("namespaceSelector", namespace_selector.is_some())
            || bad("podSelector", pod_selector.is_some())
            || bad("gatewayRouteSelector", gateway_route_selector.is_some())
        {
            return None;
        }
        Some(VirtualGatewaySpec {
            aws_name,
            namespace_selector,
            pod_selector,
            gateway_route_selector,
            listeners: listeners.unwrap_or_default(),
            logging,
            backend_defaults,
        })
    }

    fn gateway_route_spec(&mut self, n: &Node) -> Option<GatewayRouteSpec> {
        let keys = &["httpRoute", "http2Route", "grpcRoute"];
        let o = self.obj(
            n,
            "spec",
            &[
                "awsName",
                "priority",
                "httpRoute",
                "http2Route",
                "grpcRoute",
                "virtualGatewayRef",
                "meshRef",
            ],
        )?;
        let aws_name = self.opt(&o, "awsName", Cx::nonempty);
        let priority = self.opt(&o, "priority", |cx, n, p| cx.u32_in(n, p, 0, 1000));
        let virtual_gateway = self.opt(&o, "virtualGatewayRef", |cx, n, p| {
            let ro = cx.obj(n, p, &["name", "namespace", "uid"])?;
            let name = cx.req(&ro, "name", Cx::nonempty)?;
            let ns = match ro.get("namespace") {
                Some(n) => cx.nonempty(n, &ro.at("namespace"))?,
                None => cx.ns.clone(),
            };
            let id = ResourceId::new(ns, name);
            let path = cx.full_path(p);
            cx.out.refs.push(PendingRef {
                kind: RefKind::VirtualGateway,
                id: id.clone(),
                pos: n.pos,
                file: cx.file.to_path_buf(),
                path,
                port: None,
            });
            Some(id)
        });
        let kind = self.one_of(&o, keys, true).and_then(|(which, v)| {
            let p = o.at(which);
            match which {
                "grpcRoute" => self.grpc_gateway_route(v, &p).map(GatewayRouteKind::Grpc),
                "httpRoute" => self.http_gateway_route(v, &p).map(GatewayRouteKind::Http),
                _ => self.http_gateway_route(v, &p).map(GatewayRouteKind::Http2),
            }
        });
        if (o.get("priority").is_some() && priority.is_none())
            || (o.get("virtualGatewayRef").is_some() && virtual_gateway.is_none())
        {
            return None;
        }
        Some(GatewayRouteSpec {
            aws_name,
            priority,
            kind: kind?,
            virtual_gateway,
        })
    }

    fn hostname_match(&mut self, n: &Node, path: &str) -> Option<HostnameMatch> {
        let o = self.obj(n, path, &["exact", "suffix"])?;
        let (which, v) = self.one_of(&o, &["exact", "suffix"], true)?;
        let s = self.string_len(v, &o.at(which), 1, 253)?;
        Some(if which == "exact" {
            HostnameMatch::Exact(s)
        } else {
            HostnameMatch::Suffix(s)
        })
    }

    fn gateway_target(&mut self, n: &Node, path: &str) -> Option<GatewayRouteTarget> {
        let o = self.obj(n, path, &["virtualService", "port"])?;
        let port = self.opt(&o, "port", Cx::port);
        let vs = self.req(&o, "virtualService", |cx, n, p| {
            let o = cx.obj(n, p, &["virtualServiceRef", "virtualServiceARN"])?;
            cx.reference(
                &o,
                RefKind::VirtualService,
                "virtualServiceRef",
                "virtualServiceARN",
                None,
            )
        });
        if o.get("port").is_some() && port.is_none() {
            return None;
        }
        Some(GatewayRouteTarget {
            virtual_service: vs?,
            port,
        })
    }

    fn hostname_rewrite(&mut self, n: &Node, path: &str) -> Option<Toggle> {
        let o = self.obj(n, path, &["defaultTargetHostname"])?;
        self.req(&o, "defaultTargetHostname", Cx::toggle)
    }

    fn toggle(&mut self, n: &Node, path: &str) -> Option<Toggle> {
        self.pick(
            n,
            path,
            &[("ENABLED", Toggle::Enabled), ("DISABLED", Toggle::Disabled)],
        )
    }

    fn http_gateway_route(&mut self, n: &Node, path: &str) -> Option<HttpGatewayRoute> {
        let o = self.obj(n, path, &["match", "action"])?;
        let m = self.req(&o, "match", |cx, n, p| {
            let o = cx.obj(
                n,
                p,
                &[
                    "prefix",
                    "path",
                    "queryParameters",
                    "method",
                    "hostname",
                    "headers",
                    "port",
                ],
            )?;
            let prefix = cx.opt(&o, "prefix", Cx::gateway_prefix);
            let path = cx.opt(&o, "path", Cx::gateway_path_match);
            let qp = cx.opt(&o, "queryParameters", |cx, n, p| {
                cx.each(n, p, 1, 10, Cx::query_parameter)
            });
            let method = cx.opt(&o, "method", Cx::method);
            let hostname = cx.opt(&o, "hostname", Cx::hostname_match);
            let headers = cx.opt(&o, "headers", |cx, n, p| {
                cx.each(n, p, 1, 10, Cx::header_match)
            });
            let port = cx.opt(&o, "port", Cx::port);
            if ["prefix", "path", "hostname"]
                .iter()
                .all(|k| o.get(k).is_none())
            {
                cx.err(
                    o.pos,
                    p,
                    "a gateway route match needs at least one of `prefix`, `path` or `hostname`",
                );
                return None;
            }
            let bad = |key: &str, ok: bool| o.get(key).is_some() && !ok;
            if bad("prefix", prefix.is_some())
                || bad("path", path.is_some())
                || bad("queryParameters", qp.is_some())
                || bad("method", method.is_some())
                || bad("hostname", hostname.is_some())
                || bad("headers", headers.is_some())
                || bad("port", port.is_some())
            {
                return None;
            }
            Some(HttpGatewayRouteMatch {
                prefix,
                path,
                query_parameters: qp.unwrap_or_default(),
                method,
                hostname,
                headers: headers.unwrap_or_default(),
                port,
            })
        });
        let action = self.req(&o, "action", |cx, n, p| {
            let o = cx.obj(n, p, &["target", "rewrite"])?;
            let target = cx.req(&o, "target", Cx::gateway_target);
            let rewrite = cx.opt(&o, "rewrite", |cx, n, p| {
                let o = cx.obj(n, p, &["prefix", "path", "hostname"])?;
                let prefix = cx.opt(&o, "prefix", |cx, n, p| {
                    let o = cx.obj(n, p, &["defaultPrefix", "value"])?;
                    let default_prefix = cx.opt(&o, "defaultPrefix", Cx::toggle);
                    let value = cx.opt(&o, "value", |cx, n, p| {
                        let s = cx.string_len(n, p, 1, 255)?;
                        cx.not_reserved(n, p, s)
                    });
                    if o.get("defaultPrefix").is_some() && o.get("value").is_some() {
                        cx.err(
                            o.key_pos("value"),
                            &o.at("value"),
                            "`defaultPrefix` and `value` are mutually exclusive",
                        );
                        return None;
                    }
                    Some(PrefixRewrite {
                        default_prefix,
                        value,
                    })
                });
                let path = cx.opt(&o, "path", |cx, n, p| {
                    let o = cx.obj(n, p, &["exact"])?;
                    cx.req(&o, "exact", |cx, n, p| {
                        let s = cx.string_len(n, p, 1, 255)?;
                        cx.not_reserved(n, p, s)
                    })
                });
                let hostname = cx.opt(&o, "hostname", Cx::hostname_rewrite);
                let bad = |key: &str, ok: bool| o.get(key).is_some() && !ok;
                if bad("prefix", prefix.is_some())
                    || bad("path", path.is_some())
                    || bad("hostname", hostname.is_some())
                {
                    return None;
                }
                Some(HttpGatewayRouteRewrite {
                    prefix,
                    path,
                    hostname,
                })
            });
            if o.get("rewrite").is_some() && rewrite.is_none() {
                return None;
            }
            Some(HttpGatewayRouteAction {
                target: target?,
                rewrite,
            })
        });
        Some(HttpGatewayRoute {
            r#match: m?,
            action: action?,
        })
    }

    fn grpc_gateway_route(&mut self, n: &Node, path: &str) -> Option<GrpcGatewayRoute> {
        let o = self.obj(n, path, &["match", "action"])?;
        let m = self.req(&o, "match", |cx, n, p| {
            let o = cx.obj(n, p, &["serviceName", "hostname", "metadata", "port"])?;
            let service_name = cx.opt(&o, "serviceName", Cx::nonempty);
            let hostname = cx.opt(&o, "hostname", Cx::hostname_match);
            let metadata = cx.opt(&o, "metadata", |cx, n, p| {
                cx.each(n, p, 1, 10, Cx::header_match)
            });
            let port = cx.opt(&o, "port", Cx::port);
            if o.get("serviceName").is_none() && o.get("hostname").is_none() {
                cx.err(
                    o.pos,
                    p,
                    "a gRPC gateway route match needs `serviceName`, `hostname` or both",
                );
                return None;
            }
            let bad = |key: &str, ok: bool| o.get(key).is_some() && !ok;
            if bad("serviceName", service_name.is_some())
                || bad("hostname", hostname.is_some())
                || bad("metadata", metadata.is_some())
                || bad("port", port.is_some())
            {
                return None;
            }
            Some(GrpcGatewayRouteMatch {
                service_name,
                hostname,
                metadata: metadata.unwrap_or_default(),
                port,
            })
        });
        let action = self.req(&o, "action", |cx, n, p| {
            let o = cx.obj(n, p, &["target", "rewrite"])?;
            let target = cx.req(&o, "target", Cx::gateway_target);
            let rewrite = cx.opt(&o, "rewrite", |cx, n, p| {
                let o = cx.obj(n, p, &["hostname"])?;
                cx.req(&o, "hostname", Cx::hostname_rewrite)
            });
            if o.get("rewrite").is_some() && rewrite.is_none() {
                return None;
            }
            Some(GrpcGatewayRouteAction {
                target: target?,
                rewrite_hostname: rewrite,
            })
        });
        Some(GrpcGatewayRoute {
            r#match: m?,
            action: action?,
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
