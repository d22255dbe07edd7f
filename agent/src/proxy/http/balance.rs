//! Load balancing across a virtual node's endpoints: power of two choices on outstanding
//! requests (Envoy's `LEAST_REQUEST`, which App Mesh's Envoy offered as its least-request
//! policy): pick two healthy endpoints at random, send to the one with fewer requests in
//! flight. It needs no coordination, reacts to a slow endpoint within a few requests (its
//! requests pile up), and avoids the herd behaviour of always picking the global minimum.
//!
//! Each endpoint's state (requests in flight, health from active checks, outlier detection:
//! [`super::outlier`]) lives here, keyed by virtual node and address, so it outlives the
//! routing tables, which are rebuilt on every mesh or DNS change. An endpoint takes traffic
//! when it is healthy and not ejected.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use smallvec::SmallVec;

use super::outlier::{self, Verdict};
use crate::mesh::{OutlierDetection, ResourceId};
use crate::telemetry::EndpointLabels;

/// When fewer than this share of a node's endpoints is healthy (and not ejected), health is
/// ignored and every endpoint is used (Envoy's default panic threshold, 50 %): ejecting most
/// of a fleet would overload the rest.
const PANIC_THRESHOLD_PERCENT: usize = 50;

#[derive(Debug)]
pub struct EndpointState {
    pub addr: SocketAddr,
    outstanding: AtomicUsize,
    healthy: AtomicBool,
    /// Set when outlier detection ejects the endpoint, cleared when the ejection is over: a
    /// pick looks at the ejection (behind `outlier`'s lock) only when this is set, so the
    /// usual pick takes no lock per endpoint.
    maybe_ejected: AtomicBool,
    outlier: Mutex<outlier::State>,
}

impl EndpointState {
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    fn outlier(&self) -> std::sync::MutexGuard<'_, outlier::State> {
        self.outlier.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ejected by outlier detection now.
    pub fn ejected(&self, now: Instant) -> bool {
        self.outlier().ejected(now)
    }

    /// Takes traffic: passes its health checks and is not ejected.
    fn usable(&self, now: Instant) -> bool {
        self.healthy() && !(self.maybe_ejected.load(Ordering::Acquire) && self.ejected(now))
    }
}

/// Counts a request against its endpoint until dropped (when the response is done).
pub struct InFlight(Arc<EndpointState>);

impl InFlight {
    pub fn new(state: Arc<EndpointState>) -> InFlight {
        state.outstanding.fetch_add(1, Ordering::Relaxed);
        InFlight(state)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Endpoint states by virtual node, then address (looked up by a borrowed node name: no key is
/// built per request).
type States = HashMap<ResourceId, HashMap<SocketAddr, Arc<EndpointState>>>;

fn new_state(addr: SocketAddr) -> Arc<EndpointState> {
    Arc::new(EndpointState {
        addr,
        outstanding: AtomicUsize::new(0),
        healthy: AtomicBool::new(true),
        maybe_ejected: AtomicBool::new(false),
        outlier: Mutex::default(),
    })
}

/// The state of `node`'s endpoint `addr`, made on first use.
fn state_in(states: &mut States, node: &ResourceId, addr: SocketAddr) -> Arc<EndpointState> {
    if let Some(state) = states.get(node).and_then(|by_addr| by_addr.get(&addr)) {
        return state.clone();
    }
    states
        .entry(node.clone())
        .or_default()
        .entry(addr)
        .or_insert_with(|| new_state(addr))
        .clone()
}

#[derive(Default)]
pub struct Registry {
    states: Mutex<States>,
    /// Held while an ejection is decided, so two endpoints cannot both take the last place
    /// under `maxEjectionPercent`.
    ejecting: Mutex<()>,
    pub outliers: outlier::Metrics,
}

impl Registry {
    fn lock_states(&self) -> std::sync::MutexGuard<'_, States> {
        self.states.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self, node: &ResourceId, addr: SocketAddr) -> Arc<EndpointState> {
        state_in(&mut self.lock_states(), node, addr)
    }

    /// Drops the state of endpoints no longer in the mesh.
    pub fn retain(&self, keep: impl Fn(&ResourceId, &SocketAddr) -> bool) {
        let mut states = self.lock_states();
        states.retain(|node, by_addr| {
            by_addr.retain(|addr, state| {
                let kept = keep(node, addr);
                if !kept && let Some(labels) = state.outlier().take_gauge() {
                    self.outliers.ejected.get_or_create(&labels).dec();
                }
                kept
            });
            !by_addr.is_empty()
        });
    }

    /// Counts an answer (or a failure to get one) from `state`'s endpoint under the target
    /// listener's `outlierDetection`; `addrs` are the virtual node's endpoints on that port.
    /// Ejections are logged and counted here.
    pub fn observe(
        &self,
        mesh: &str,
        node: &ResourceId,
        addrs: &[SocketAddr],
        state: &EndpointState,
        policy: &OutlierDetection,
        server_error: bool,
    ) -> Verdict {
        let now = Instant::now();
        // Lock order: the ejection lock, then endpoint states one at a time with this one's
        // held; the states map is never locked while an endpoint state is. Only an error can
        // eject, so a success takes no shared lock.
        let (_deciding, others) = if server_error {
            let others: Vec<Arc<EndpointState>> = addrs
                .iter()
                .filter(|a| **a != state.addr)
                .map(|a| self.state(node, *a))
                .collect();
            (
                Some(self.ejecting.lock().unwrap_or_else(|p| p.into_inner())),
                others,
            )
        } else {
            (None, Vec::new())
        };
        let mut own = state.outlier();
        // An ejection whose time is up but that the sweep has not ended yet ends here, so its
        // gauge and log are not lost when a new ejection follows.
        self.returned(node, state, &mut own, now);
        let verdict = outlier::judge(
            &mut own,
            policy,
            server_error,
            now,
            || others.iter().filter(|o| o.ejected(now)).count(),
            addrs.len(),
        );
        let result = match verdict {
            Verdict::Counted => return verdict,
            Verdict::Ejected { duration, times } => {
                state.maybe_ejected.store(true, Ordering::Release);
                let labels = EndpointLabels {
                    mesh: mesh.to_owned(),
                    virtual_node: node.to_string(),
                };
                self.outliers.ejected.get_or_create(&labels).inc();
                own.set_gauge(labels);
                tracing::warn!(
                    virtual_node = %node,
                    endpoint = %state.addr,
                    max_server_errors = policy.max_server_errors,
                    ejection_ms = duration.as_millis() as u64,
                    times,
                    "outlier detection: endpoint ejected"
                );
                "enforced"
            }
            Verdict::Overflow => {
                tracing::warn!(
                    virtual_node = %node,
                    endpoint = %state.addr,
                    max_server_errors = policy.max_server_errors,
                    max_ejection_percent = policy.max_ejection_percent,
                    "outlier detection: endpoint not ejected, maxEjectionPercent reached"
                );
                "overflow"
            }
        };
        self.outliers
            .ejections
            .get_or_create(&outlier::EjectionLabels {
                mesh: mesh.to_owned(),
                virtual_node: node.to_string(),
                result,
            })
            .inc();
        verdict
    }

    /// Ends the ejections whose time is up (they already take traffic again: [`pick`] looks
    /// at the time; this keeps the gauge and the log true).
    pub fn sweep(&self) {
        let now = Instant::now();
        let states: Vec<(ResourceId, Arc<EndpointState>)> = {
            let states = self.lock_states();
            states
                .iter()
                .flat_map(|(node, by_addr)| by_addr.values().map(|s| (node.clone(), s.clone())))
                .collect()
        };
        for (node, state) in states {
            self.returned(&node, &state, &mut state.outlier(), now);
        }
    }

    /// Ends `state`'s ejection if its time is up: the gauge goes down, the return is logged.
    fn returned(
        &self,
        node: &ResourceId,
        state: &EndpointState,
        own: &mut outlier::State,
        now: Instant,
    ) {
        let Some(gauge) = own.end_if_due(now) else {
            return;
        };
        state.maybe_ejected.store(false, Ordering::Release);
        if let Some(labels) = gauge {
            self.outliers.ejected.get_or_create(&labels).dec();
        }
        tracing::info!(virtual_node = %node, endpoint = %state.addr, "outlier detection: endpoint returned");
    }

    /// The endpoints ejected now, for `strait status`.
    pub fn ejected(&self) -> Vec<outlier::Ejected> {
        let now = Instant::now();
        let states = self.lock_states();
        let mut out: Vec<outlier::Ejected> = states
            .iter()
            .flat_map(|(node, by_addr)| by_addr.iter().map(move |(addr, s)| (node, addr, s)))
            .filter_map(|(node, addr, s)| s.outlier().describe(node, *addr, now))
            .collect();
        out.sort_by(|a, b| (&a.virtual_node, a.endpoint).cmp(&(&b.virtual_node, b.endpoint)));
        out
    }

    /// `addrs` in the order a connection should try them: those not ejected first.
    pub fn connect_order(&self, node: &ResourceId, addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
        let now = Instant::now();
        let (mut usable, ejected): (Vec<SocketAddr>, Vec<SocketAddr>) = addrs
            .into_iter()
            .partition(|a| !self.state(node, *a).ejected(now));
        usable.extend(ejected);
        usable
    }

    /// Picks an endpoint of `node` among `addrs`, avoiding those already tried for this request
    /// when others are left.
    pub fn pick(
        &self,
        node: &ResourceId,
        addrs: &[SocketAddr],
        tried: &[SocketAddr],
    ) -> Option<Arc<EndpointState>> {
        let now = Instant::now();
        // Inline vectors: a pick runs for every request and most backends have a few
        // endpoints, so this keeps it off the allocator. Each endpoint's usability is read
        // once, so the count and the candidates agree.
        let all: SmallVec<[(Arc<EndpointState>, bool); 8]> = {
            let mut states = self.lock_states();
            addrs
                .iter()
                .map(|a| {
                    let state = state_in(&mut states, node, *a);
                    let usable = state.usable(now);
                    (state, usable)
                })
                .collect()
        };
        let healthy = all.iter().filter(|(_, usable)| *usable).count();
        let panic = healthy * 100 < all.len() * PANIC_THRESHOLD_PERCENT;
        let mut candidates: SmallVec<[&Arc<EndpointState>; 8]> = all
            .iter()
            .filter(|(_, usable)| panic || *usable)
            .map(|(state, _)| state)
            .collect();
        if candidates.iter().any(|s| !tried.contains(&s.addr)) {
            candidates.retain(|s| !tried.contains(&s.addr));
        }
        p2c(&candidates, &mut rand::rng()).map(Arc::clone)
    }
}

fn p2c<'a>(
    candidates: &[&'a Arc<EndpointState>],
    rng: &mut impl rand::Rng,
) -> Option<&'a Arc<EndpointState>> {
    match candidates.len() {
        0 => None,
        1 => candidates.first().copied(),
        n => {
            let a = rng.random_range(0..n);
            let mut b = rng.random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            let (a, b) = (candidates[a], candidates[b]);
            Some(if b.outstanding() < a.outstanding() {
                b
            } else {
                a
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> ResourceId {
        ResourceId::new("app", "color")
    }

    fn addrs(n: u8) -> Vec<SocketAddr> {
        (1..=n)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 8080)))
            .collect()
    }

    #[test]
    fn busy_endpoints_get_fewer_requests() {
        let registry = Registry::default();
        let addrs = addrs(3);
        let busy = registry.state(&node(), addrs[0]);
        let _held: Vec<_> = (0..5).map(|_| InFlight::new(busy.clone())).collect();
        let picks = (0..300)
            .filter(|_| registry.pick(&node(), &addrs, &[]).unwrap().addr == addrs[0])
            .count();
        assert_eq!(
            picks, 0,
            "an endpoint with 5 requests in flight loses every comparison"
        );
    }

    #[test]
    fn unhealthy_endpoints_are_skipped_until_the_panic_threshold() {
        let registry = Registry::default();
        let addrs = addrs(2);
        registry.state(&node(), addrs[0]).set_healthy(false);
        for _ in 0..50 {
            assert_eq!(registry.pick(&node(), &addrs, &[]).unwrap().addr, addrs[1]);
        }
        registry.state(&node(), addrs[1]).set_healthy(false);
        // Nobody healthy: below the threshold, every endpoint is used again.
        let seen: std::collections::HashSet<_> = (0..100)
            .map(|_| registry.pick(&node(), &addrs, &[]).unwrap().addr)
            .collect();
        assert_eq!(seen.len(), 2);
    }

    #[test]
    fn ejected_endpoints_get_no_traffic_and_max_ejection_percent_holds() {
        let registry = Registry::default();
        let addrs = addrs(3);
        let seconds = |value| crate::mesh::Duration {
            unit: crate::mesh::DurationUnit::S,
            value,
        };
        let policy = OutlierDetection {
            max_server_errors: 2,
            interval: seconds(10),
            base_ejection_duration: seconds(30),
            max_ejection_percent: 50,
        };
        let mut verdicts = Vec::new();
        for addr in &addrs[..2] {
            let state = registry.state(&node(), *addr);
            for _ in 0..2 {
                verdicts.push(registry.observe("m", &node(), &addrs, &state, &policy, true));
            }
        }
        assert!(matches!(verdicts[1], Verdict::Ejected { times: 1, .. }));
        assert_eq!(verdicts[3], Verdict::Overflow, "2 of 3 is over 50 %");
        for _ in 0..100 {
            assert_ne!(registry.pick(&node(), &addrs, &[]).unwrap().addr, addrs[0]);
        }
        // A retry after the second endpoint failed goes to the third, never the ejected one.
        for _ in 0..50 {
            assert_eq!(
                registry.pick(&node(), &addrs, &[addrs[1]]).unwrap().addr,
                addrs[2]
            );
        }
        let ejected = registry.ejected();
        assert_eq!(ejected.len(), 1);
        assert_eq!(ejected[0].endpoint, addrs[0]);
        assert!(ejected[0].remaining_ms > 29_000);
        assert_eq!(
            registry.connect_order(&node(), addrs.clone()).last(),
            Some(&addrs[0])
        );
        let count = |result| {
            registry
                .outliers
                .ejections
                .get_or_create(&outlier::EjectionLabels {
                    mesh: "m".into(),
                    virtual_node: node().to_string(),
                    result,
                })
                .get()
        };
        assert_eq!((count("enforced"), count("overflow")), (1, 1));
        // The endpoint leaves the mesh: its ejection leaves the gauge.
        registry.retain(|_, a| *a != addrs[0]);
        let labels = EndpointLabels {
            mesh: "m".into(),
            virtual_node: node().to_string(),
        };
        assert_eq!(registry.outliers.ejected.get_or_create(&labels).get(), 0);
    }

    #[test]
    fn errors_after_an_ejection_ends_count_even_before_the_sweep_runs() {
        let registry = Registry::default();
        let addrs = addrs(3);
        let policy = OutlierDetection {
            max_server_errors: 2,
            interval: crate::mesh::Duration {
                unit: crate::mesh::DurationUnit::S,
                value: 60,
            },
            base_ejection_duration: crate::mesh::Duration {
                unit: crate::mesh::DurationUnit::Ms,
                value: 50,
            },
            max_ejection_percent: 50,
        };
        let state = registry.state(&node(), addrs[0]);
        let error = || registry.observe("m", &node(), &addrs, &state, &policy, true);
        error();
        assert!(matches!(error(), Verdict::Ejected { times: 1, .. }));
        std::thread::sleep(std::time::Duration::from_millis(60));
        // Back by time; one error, then the sweep runs: the count is not lost.
        assert_eq!(error(), Verdict::Counted);
        registry.sweep();
        assert!(matches!(error(), Verdict::Ejected { times: 2, .. }));
        let labels = EndpointLabels {
            mesh: "m".into(),
            virtual_node: node().to_string(),
        };
        assert_eq!(
            registry.outliers.ejected.get_or_create(&labels).get(),
            1,
            "the first ejection's gauge went down when it ended"
        );
    }

    #[test]
    fn a_retry_avoids_the_endpoint_already_tried() {
        let registry = Registry::default();
        let addrs = addrs(2);
        for _ in 0..50 {
            assert_eq!(
                registry.pick(&node(), &addrs, &[addrs[0]]).unwrap().addr,
                addrs[1]
            );
        }
        // With one endpoint, a retry goes back to it.
        assert!(registry.pick(&node(), &addrs[..1], &[addrs[0]]).is_some());
        assert!(registry.pick(&node(), &[], &[]).is_none());
    }
}
