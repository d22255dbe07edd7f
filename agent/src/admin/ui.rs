//! `/ui` and `/ui/graph.json`: a live, read-only page of what this node's mesh is doing.
//!
//! The page (`ui.html`, one file with inline CSS and JavaScript, no external assets) polls
//! `/ui/graph.json` every second and draws the mesh as columns: source virtual nodes ->
//! virtual services -> routes (with their weights) -> target virtual nodes -> endpoints (the
//! local pods of each virtual node, else its DNS name), and a table of local pods with their
//! enrollment state and identity expiry.
//!
//! Each edge carries the request rate, error ratio (5xx and gRPC errors, as the dashboard
//! counts them) and p99 latency over the last few seconds. They come from the agent's own
//! counters (`strait_requests_total`, `strait_request_duration_seconds`, read from the same
//! registry `/metrics` encodes): each answer takes a snapshot, and rates are the difference to
//! the oldest snapshot of the last [`WINDOW`]. Until two polls are a second apart, rates are
//! `null`. Virtual nodes with endpoints ejected by health checks are marked.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use super::State;

/// The page.
pub const PAGE: &str = include_str!("ui.html");

/// How far back rates look.
const WINDOW: Duration = Duration::from_secs(10);
/// The shortest interval a rate is computed over.
const MIN_INTERVAL: Duration = Duration::from_millis(900);

/// Request counters of one (source, virtual service, route, target) combination.
#[derive(Clone, Debug, Default, PartialEq)]
struct Counts {
    requests: f64,
    errors: f64,
    /// Cumulative histogram buckets: upper bound (seconds) -> count.
    buckets: Vec<(f64, f64)>,
}

/// (source virtual node, target virtual service, route, target virtual node).
type EdgeKey = (String, String, String, String);
type Snapshot = BTreeMap<EdgeKey, Counts>;

static SNAPSHOTS: Mutex<VecDeque<(Instant, Snapshot)>> = Mutex::new(VecDeque::new());

/// One edge of the graph with its live numbers (`None` until a rate can be computed).
#[derive(Debug, Serialize, PartialEq)]
pub struct Edge {
    pub from: String,
    pub to: String,
    /// A route target's weight.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    pub requests_per_second: Option<f64>,
    pub error_ratio: Option<f64>,
    pub p99_ms: Option<f64>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Node {
    pub id: String,
    /// `source`, `virtual_service`, `route`, `virtual_node` or `endpoint`.
    pub kind: &'static str,
    pub label: String,
    /// A virtual node's endpoints out of load balancing now (failing their health check,
    /// `strait_endpoints_ejected`); absent when none are.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ejected: Option<u64>,
    /// A target virtual node whose circuit breaker (`clientPolicy.circuitBreaker`) is open for
    /// some caller now: the limits reached (`maxRequests`, ...); absent when none is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub breaker_open: Option<Vec<String>>,
}

/// `/ui/graph.json`.
pub fn graph_json(state: &State) -> Value {
    let mut text = String::new();
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &state.registry);
    let now = Instant::now();
    let current = parse_counts(&text);
    let previous = {
        let mut snapshots = SNAPSHOTS.lock().unwrap_or_else(|e| e.into_inner());
        while snapshots
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > WINDOW)
        {
            snapshots.pop_front();
        }
        let previous = snapshots
            .front()
            .filter(|(at, _)| now.duration_since(*at) >= MIN_INTERVAL)
            .cloned();
        snapshots.push_back((now, current.clone()));
        previous
    };
    let config = state.config.load();
    let workloads = state.workloads.load();
    let resilience = (state.resilience)();
    let (mut nodes, edges) = build(
        &config.mesh,
        &workloads,
        &parse_ejected(&text),
        &current,
        previous
            .as_ref()
            .map(|(at, s)| (now.duration_since(*at).as_secs_f64(), s)),
    );
    mark_open_breakers(&mut nodes, &resilience);
    let pods: Vec<Value> = workloads
        .iter()
        .map(|w| {
            let cert = w.identity.as_ref().and_then(|i| i.certificate.as_ref());
            serde_json::json!({
                "pod": w.pod,
                "virtual_node": w.virtual_node,
                "enrolled": w.enrolled,
                "identity": w.identity.as_ref().and_then(|i| i.identities.first()),
                "expires": cert.map(|c| c.not_after.clone()),
                "expires_in_seconds": cert.map(|c| c.expires_in_seconds),
                "problem": w.error.clone().or_else(|| w.reason.clone()),
            })
        })
        .collect();
    serde_json::json!({
        "mesh": config.mesh["mesh"]["name"],
        "window_seconds": previous.map(|(at, _)| now.duration_since(at).as_secs_f64()),
        "nodes": nodes,
        "edges": edges,
        "pods": pods,
        "resilience": resilience,
    })
}

/// Marks the target virtual nodes of the open breakers in `/status/resilience`'s answer.
fn mark_open_breakers(nodes: &mut [Node], resilience: &Value) {
    let open = resilience["open_breakers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for breaker in &open {
        let Some(target) = breaker["target_virtual_node"].as_str() else {
            continue;
        };
        let limits = breaker["open"].as_array().into_iter().flatten();
        let limits: Vec<String> = limits
            .filter_map(|l| l.as_str().map(str::to_owned))
            .collect();
        for node in nodes
            .iter_mut()
            .filter(|n| n.kind == "virtual_node" && n.label == target)
        {
            let marked = node.breaker_open.get_or_insert_with(Vec::new);
            for limit in &limits {
                if !marked.contains(limit) {
                    marked.push(limit.clone());
                }
            }
        }
    }
}

/// Labels of one sample line of the text format.
fn parse_line(line: &str) -> Option<(&str, BTreeMap<&str, &str>, f64)> {
    let (name, rest) = line.split_once('{')?;
    let (labels, value) = rest.rsplit_once("} ")?;
    let mut map = BTreeMap::new();
    // Label values here are resource names, route names and classes: no quotes or commas.
    for pair in labels.split("\",") {
        let (k, v) = pair.split_once("=\"")?;
        map.insert(k, v.trim_end_matches('"'));
    }
    Some((name, map, value.trim().parse().ok()?))
}

/// Endpoints out of load balancing by virtual node: failing health checks
/// (`strait_endpoints_ejected`) or ejected by outlier detection (`strait_outlier_ejected`).
fn parse_ejected(text: &str) -> BTreeMap<String, u64> {
    let mut ejected = BTreeMap::new();
    for (name, labels, value) in text.lines().filter_map(parse_line) {
        if (name == "strait_endpoints_ejected" || name == "strait_outlier_ejected")
            && let Some(vn) = labels.get("virtual_node")
        {
            *ejected.entry((*vn).to_owned()).or_default() += value.max(0.0) as u64;
        }
    }
    ejected
}

fn is_error(class: &str) -> bool {
    !matches!(class, "1xx" | "2xx" | "3xx" | "4xx" | "OK" | "other")
}

fn parse_counts(text: &str) -> Snapshot {
    let mut snapshot = Snapshot::new();
    for line in text.lines() {
        let Some((name, labels, value)) = parse_line(line) else {
            continue;
        };
        // The caller's agent counts each request once; the receiving agent's count of the same
        // request (`reporter="destination"`) would double the edge.
        if labels.get("reporter").is_some_and(|r| *r != "source") {
            continue;
        }
        let key = || -> EdgeKey {
            let get = |k: &str| labels.get(k).copied().unwrap_or_default().to_owned();
            (
                get("source_virtual_node"),
                get("target_virtual_service"),
                get("route"),
                get("target_virtual_node"),
            )
        };
        match name {
            "strait_requests_total" => {
                let counts = snapshot.entry(key()).or_default();
                counts.requests += value;
                if is_error(labels.get("response_code_class").copied().unwrap_or("")) {
                    counts.errors += value;
                }
            }
            "strait_request_duration_seconds_bucket" => {
                let le = match labels.get("le").copied() {
                    Some("+Inf") => f64::INFINITY,
                    Some(le) => match le.parse() {
                        Ok(le) => le,
                        Err(_) => continue,
                    },
                    None => continue,
                };
                let counts = snapshot.entry(key()).or_default();
                match counts.buckets.iter_mut().find(|(b, _)| *b == le) {
                    Some((_, c)) => *c += value,
                    None => counts.buckets.push((le, value)),
                }
            }
            _ => {}
        }
    }
    for counts in snapshot.values_mut() {
        counts.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    snapshot
}

/// Sum of `current - previous` over the keys `select` keeps, as live numbers.
fn live(
    current: &Snapshot,
    previous: Option<(f64, &Snapshot)>,
    select: impl Fn(&EdgeKey) -> bool,
) -> (Option<f64>, Option<f64>, Option<f64>) {
    let Some((seconds, previous)) = previous else {
        return (None, None, None);
    };
    let mut requests = 0.0;
    let mut errors = 0.0;
    let mut buckets: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for (key, now) in current.iter().filter(|(k, _)| select(k)) {
        let before = previous.get(key).cloned().unwrap_or_default();
        requests += now.requests - before.requests;
        errors += now.errors - before.errors;
        for &(le, count) in &now.buckets {
            let old = before
                .buckets
                .iter()
                .find(|(b, _)| *b == le)
                .map_or(0.0, |(_, c)| *c);
            buckets.entry(le.to_bits()).or_insert((le, 0.0)).1 += count - old;
        }
    }
    let rate = requests / seconds;
    if requests <= 0.0 {
        return (Some(rate.max(0.0)), None, None);
    }
    let mut sorted: Vec<(f64, f64)> = buckets.into_values().collect();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    (
        Some(rate),
        Some(errors / requests),
        quantile(0.99, &sorted).map(|s| s * 1000.0),
    )
}

/// The `q` quantile of cumulative buckets, interpolated inside the bucket as Prometheus'
/// `histogram_quantile` does.
fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let inside = count - lower.1;
            let fraction = if inside > 0.0 {
                (rank - lower.1) / inside
            } else {
                1.0
            };
            return Some(lower.0 + (le - lower.0) * fraction);
        }
        lower = (le, count);
    }
    Some(lower.0)
}

fn id_of(value: &Value) -> String {
    format!(
        "{}/{}",
        value["namespace"].as_str().unwrap_or_default(),
        value["name"].as_str().unwrap_or_default()
    )
}

/// The route's weighted targets, whatever its protocol.
fn route_targets(route: &Value) -> Vec<(String, u32)> {
    let kind = &route["kind"];
    let action = ["http", "http2", "grpc", "tcp"]
        .iter()
        .find_map(|k| kind.get(*k))
        .map(|r| &r["action"]);
    action
        .and_then(|a| a["weightedTargets"].as_array())
        .into_iter()
        .flatten()
        .map(|t| {
            (
                id_of(&t["virtualNode"]),
                t["weight"].as_u64().unwrap_or(0) as u32,
            )
        })
        .collect()
}

fn build(
    mesh: &Value,
    workloads: &[super::WorkloadStatus],
    ejected: &BTreeMap<String, u64>,
    current: &Snapshot,
    previous: Option<(f64, &Snapshot)>,
) -> (Vec<Node>, Vec<Edge>) {
    // In the order first met (the mesh file's), which keeps edges from crossing needlessly.
    let mut nodes: Vec<Node> = Vec::new();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut edges = Vec::new();
    let mut node = |id: String, kind: &'static str, label: String| {
        if seen.insert(id.clone()) {
            let ejected = (kind == "virtual_node")
                .then(|| ejected.get(&label).copied())
                .flatten()
                .filter(|n| *n > 0);
            nodes.push(Node {
                id,
                kind,
                label,
                ejected,
                breaker_open: None,
            });
        }
    };
    let list = |key: &str| mesh[key].as_array().cloned().unwrap_or_default();
    let routers: BTreeMap<String, Value> = list("virtualRouters")
        .into_iter()
        .map(|r| (id_of(&r["id"]), r))
        .collect();

    // Sources: virtual nodes with backends, and any the counters name.
    let mut sources: BTreeSet<(String, String)> = BTreeSet::new();
    for vn in list("virtualNodes") {
        for backend in vn["spec"]["backends"].as_array().into_iter().flatten() {
            sources.insert((id_of(&vn["id"]), id_of(&backend["virtualService"])));
        }
    }
    sources.extend(current.keys().map(|k| (k.0.clone(), k.1.clone())));
    for (source, vs) in &sources {
        node(format!("source:{source}"), "source", source.clone());
        node(format!("vs:{vs}"), "virtual_service", vs.clone());
        let (rps, err, p99) = live(current, previous, |k| &k.0 == source && &k.1 == vs);
        edges.push(Edge {
            from: format!("source:{source}"),
            to: format!("vs:{vs}"),
            weight: None,
            requests_per_second: rps,
            error_ratio: err,
            p99_ms: p99,
        });
    }

    let mut targets: BTreeSet<String> = BTreeSet::new();
    for vs in list("virtualServices") {
        let vs_id = id_of(&vs["id"]);
        node(format!("vs:{vs_id}"), "virtual_service", vs_id.clone());
        let provider = &vs["spec"]["provider"];
        if let Some(router) = provider.get("virtualRouter").map(id_of) {
            let routes = routers
                .get(&router)
                .and_then(|r| r["spec"]["routes"].as_array().cloned())
                .unwrap_or_default();
            for route in routes {
                let name = route["name"].as_str().unwrap_or_default().to_owned();
                let route_id = format!("route:{vs_id}/{name}");
                node(route_id.clone(), "route", name.clone());
                let (rps, err, p99) = live(current, previous, |k| k.1 == vs_id && k.2 == name);
                edges.push(Edge {
                    from: format!("vs:{vs_id}"),
                    to: route_id.clone(),
                    weight: None,
                    requests_per_second: rps,
                    error_ratio: err,
                    p99_ms: p99,
                });
                for (target, weight) in route_targets(&route) {
                    node(format!("vn:{target}"), "virtual_node", target.clone());
                    let (rps, err, p99) = live(current, previous, |k| {
                        k.1 == vs_id && k.2 == name && k.3 == target
                    });
                    edges.push(Edge {
                        from: route_id.clone(),
                        to: format!("vn:{target}"),
                        weight: Some(weight),
                        requests_per_second: rps,
                        error_ratio: err,
                        p99_ms: p99,
                    });
                    targets.insert(target);
                }
            }
        } else if let Some(target) = provider.get("virtualNode").map(id_of) {
            node(format!("vn:{target}"), "virtual_node", target.clone());
            let (rps, err, p99) = live(current, previous, |k| k.1 == vs_id && k.3 == target);
            edges.push(Edge {
                from: format!("vs:{vs_id}"),
                to: format!("vn:{target}"),
                weight: None,
                requests_per_second: rps,
                error_ratio: err,
                p99_ms: p99,
            });
            targets.insert(target);
        }
    }

    // Endpoints: the target's local pods, else the name it is discovered by.
    let virtual_nodes: BTreeMap<String, Value> = list("virtualNodes")
        .into_iter()
        .map(|vn| (id_of(&vn["id"]), vn))
        .collect();
    for target in &targets {
        let mut endpoints: Vec<String> = workloads
            .iter()
            .filter(|w| w.enrolled && w.virtual_node.as_deref() == Some(target.as_str()))
            .map(|w| w.pod.clone())
            .collect();
        if endpoints.is_empty()
            && let Some(hostname) = virtual_nodes
                .get(target)
                .and_then(|vn| vn["spec"]["serviceDiscovery"]["dns"]["hostname"].as_str())
        {
            endpoints.push(hostname.to_owned());
        }
        let single = endpoints.len() == 1;
        for endpoint in endpoints {
            let id = format!("ep:{endpoint}");
            node(id.clone(), "endpoint", endpoint);
            // The counters are per virtual node: exact for a single endpoint only.
            let (rps, err, p99) = if single {
                live(current, previous, |k| &k.3 == target)
            } else {
                (None, None, None)
            };
            edges.push(Edge {
                from: format!("vn:{target}"),
                to: id,
                weight: None,
                requests_per_second: rps,
                error_ratio: err,
                p99_ms: p99,
            });
        }
    }
    (nodes, edges)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_like_prometheus() {
        let buckets = [
            (0.01, 50.0),
            (0.1, 99.0),
            (1.0, 100.0),
            (f64::INFINITY, 100.0),
        ];
        assert_eq!(quantile(0.5, &buckets), Some(0.01));
        let p99 = quantile(0.99, &buckets).unwrap();
        assert!((p99 - 0.1).abs() < 1e-9, "{p99}");
        assert_eq!(quantile(0.99, &[(0.1, 0.0)]), None);
    }

    #[test]
    fn rates_are_differences_over_the_window() {
        let text = "strait_requests_total{mesh=\"m\",source_virtual_node=\"a/c\",target_virtual_service=\"a/s\",target_virtual_node=\"a/v1\",route=\"r\",response_code_class=\"2xx\"} 30\n\
                    strait_requests_total{mesh=\"m\",source_virtual_node=\"a/c\",target_virtual_service=\"a/s\",target_virtual_node=\"a/v1\",route=\"r\",response_code_class=\"5xx\"} 10\n";
        let before = parse_counts(
            "strait_requests_total{mesh=\"m\",source_virtual_node=\"a/c\",target_virtual_service=\"a/s\",target_virtual_node=\"a/v1\",route=\"r\",response_code_class=\"2xx\"} 10\n",
        );
        let now = parse_counts(text);
        let (rps, err, _) = live(&now, Some((2.0, &before)), |_| true);
        assert_eq!(rps, Some(15.0));
        assert_eq!(err, Some(10.0 / 30.0));
        assert_eq!(live(&now, None, |_| true), (None, None, None));
    }

    #[test]
    fn the_receiving_agents_counts_are_not_added_to_the_edge() {
        let text = "strait_requests_total{mesh=\"m\",source_virtual_node=\"a/c\",target_virtual_service=\"a/s\",target_virtual_node=\"a/v1\",route=\"r\",response_code_class=\"2xx\",reporter=\"source\"} 30\n\
                    strait_requests_total{mesh=\"m\",source_virtual_node=\"a/c\",target_virtual_service=\"a/s\",target_virtual_node=\"a/v1\",route=\"r\",response_code_class=\"2xx\",reporter=\"destination\"} 30\n";
        let counts = parse_counts(text);
        let total: f64 = counts.values().map(|c| c.requests).sum();
        assert_eq!(total, 30.0);
    }

    #[test]
    fn outlier_ejections_and_open_breakers_mark_their_virtual_node() {
        let text = "strait_endpoints_ejected{mesh=\"m\",virtual_node=\"a/v1\"} 1\n\
                    strait_outlier_ejected{mesh=\"m\",virtual_node=\"a/v1\"} 2\n\
                    strait_outlier_ejected{mesh=\"m\",virtual_node=\"a/v2\"} 0\n";
        let ejected = parse_ejected(text);
        assert_eq!(ejected.get("a/v1"), Some(&3));
        assert_eq!(ejected.get("a/v2"), Some(&0));
        let node = |label: &str| Node {
            id: format!("vn:{label}"),
            kind: "virtual_node",
            label: label.into(),
            ejected: None,
            breaker_open: None,
        };
        let mut nodes = vec![node("a/v1"), node("a/v2")];
        let resilience = serde_json::json!({"open_breakers": [
            {"source_virtual_node": "a/c", "virtual_service": "a/s", "target_virtual_node": "a/v2",
             "open": ["maxRequests"]},
            {"source_virtual_node": "a/d", "virtual_service": "a/s", "target_virtual_node": "a/v2",
             "open": ["maxRequests", "maxPendingRequests"]},
        ]});
        mark_open_breakers(&mut nodes, &resilience);
        assert_eq!(nodes[0].breaker_open, None);
        assert_eq!(
            nodes[1].breaker_open,
            Some(vec![
                "maxRequests".to_owned(),
                "maxPendingRequests".to_owned()
            ])
        );
    }
}
