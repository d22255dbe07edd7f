//! Load balancing across a virtual node's endpoints: power of two choices on outstanding
//! requests (Envoy's `LEAST_REQUEST`, which App Mesh's Envoy offered as its least-request
//! policy): pick two healthy endpoints at random, send to the one with fewer requests in
//! flight. It needs no coordination, reacts to a slow endpoint within a few requests (its
//! requests pile up), and avoids the herd behaviour of always picking the global minimum.
//!
//! Each endpoint's state (requests in flight, health from active checks) lives here, keyed by
//! virtual node and address, so it outlives the routing tables, which are rebuilt on every mesh
//! or DNS change.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::mesh::ResourceId;

/// When fewer than this share of a node's endpoints is healthy, health is ignored and every
/// endpoint is used (Envoy's default panic threshold, 50 %): ejecting most of a fleet would
/// overload the rest.
const PANIC_THRESHOLD_PERCENT: usize = 50;

#[derive(Debug)]
pub struct EndpointState {
    pub addr: SocketAddr,
    outstanding: AtomicUsize,
    healthy: AtomicBool,
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

type Key = (ResourceId, SocketAddr);

#[derive(Default)]
pub struct Registry {
    states: Mutex<HashMap<Key, Arc<EndpointState>>>,
}

impl Registry {
    pub fn state(&self, node: &ResourceId, addr: SocketAddr) -> Arc<EndpointState> {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        states
            .entry((node.clone(), addr))
            .or_insert_with(|| {
                Arc::new(EndpointState {
                    addr,
                    outstanding: AtomicUsize::new(0),
                    healthy: AtomicBool::new(true),
                })
            })
            .clone()
    }

    /// Drops the state of endpoints no longer in the mesh.
    pub fn retain(&self, keep: impl Fn(&ResourceId, &SocketAddr) -> bool) {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        states.retain(|(node, addr), _| keep(node, addr));
    }

    /// Picks an endpoint of `node` among `addrs`, avoiding those already tried for this request
    /// when others are left.
    pub fn pick(
        &self,
        node: &ResourceId,
        addrs: &[SocketAddr],
        tried: &[SocketAddr],
    ) -> Option<Arc<EndpointState>> {
        let all: Vec<Arc<EndpointState>> = addrs.iter().map(|a| self.state(node, *a)).collect();
        let healthy: Vec<Arc<EndpointState>> =
            all.iter().filter(|s| s.healthy()).cloned().collect();
        let mut candidates = if healthy.len() * 100 < all.len() * PANIC_THRESHOLD_PERCENT {
            all
        } else {
            healthy
        };
        if candidates.iter().any(|s| !tried.contains(&s.addr)) {
            candidates.retain(|s| !tried.contains(&s.addr));
        }
        Some(p2c(&candidates, &mut rand::rng())?.clone())
    }
}

fn p2c<'a>(
    candidates: &'a [Arc<EndpointState>],
    rng: &mut impl rand::Rng,
) -> Option<&'a Arc<EndpointState>> {
    match candidates.len() {
        0 => None,
        1 => candidates.first(),
        n => {
            let a = rng.random_range(0..n);
            let mut b = rng.random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            let (a, b) = (&candidates[a], &candidates[b]);
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
