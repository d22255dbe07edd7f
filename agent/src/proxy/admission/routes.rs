//! A virtual router route's `rateLimit` (strait extension; see docs/resilience.md), applied
//! by the **calling** agent when a request matches the route, with the listener rate limit's
//! token buckets ([`super::Buckets`]).
//!
//! Why the calling side: App Mesh routes are matched by the caller (the Envoy beside the
//! calling pod), and only the calling agent knows which route a request took. A receiving
//! agent sees the target virtual node, not the route; a route's weighted targets can live on
//! several nodes, so no receiving agent sees all of a route's requests either, and a route name
//! sent along by the caller is not something it should trust. So the buckets of one route are
//! kept **per calling node**: a route limited to 10 requests a second lets each node whose pods
//! call it send 10 a second.
//!
//! Callers are the calling pods' virtual nodes (a kernel fact: the pod's cgroup), or the
//! virtual gateway whose route sent the request there; `perCaller` and `overrides` key their
//! buckets by them as the listener limit does for same-node callers.
//!
//! The buckets of a route live as long as its limit stays the same across mesh reloads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::{Buckets, Caller, Who, lock};
use crate::identity::policy::Policy;
use crate::mesh::{RateLimit, ResourceId};
use crate::routing::http::RouteRateLimit;

/// Labels of a request over a route's rate limit.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteRateLimitLabels {
    pub mesh: String,
    /// The virtual service called.
    pub virtual_service: String,
    pub virtual_router: String,
    pub route: String,
    /// The caller: the calling pod's virtual node (or the virtual gateway).
    pub source_virtual_node: String,
    /// Which bucket was empty: `total`, `caller` (`perCaller`) or `override`.
    pub scope: &'static str,
    /// `enforced` (refused) or `shadow` (counted, let through).
    pub mode: &'static str,
}

/// A request over its route's limit, to be answered 429 (gRPC: RESOURCE_EXHAUSTED).
#[derive(Debug, thiserror::Error)]
#[error("virtual router {virtual_router} route {route}: rate limited ({scope})")]
pub struct Limited {
    pub virtual_router: ResourceId,
    pub route: String,
    pub scope: &'static str,
    /// Until the bucket's next token (`retry-after`).
    pub wait: Duration,
}

struct RouteState {
    limit: RateLimit,
    buckets: Buckets,
}

/// Every route's buckets on this node, by (virtual router, route name).
pub struct RouteLimits {
    states: Mutex<HashMap<(ResourceId, String), Arc<RouteState>>>,
    metric: Family<RouteRateLimitLabels, Counter>,
}

impl RouteLimits {
    pub fn new(metric: Family<RouteRateLimitLabels, Counter>) -> RouteLimits {
        RouteLimits {
            states: Mutex::default(),
            metric,
        }
    }

    fn state(&self, limit: &RouteRateLimit, route: &str) -> Arc<RouteState> {
        let mut states = lock(&self.states);
        let key = (limit.virtual_router.clone(), route.to_owned());
        match states.get(&key) {
            Some(state) if state.limit == limit.limit => state.clone(),
            // New, or its limit changed: start afresh.
            _ => {
                let state = Arc::new(RouteState {
                    limit: limit.limit.clone(),
                    buckets: Buckets::default(),
                });
                states.insert(key, state.clone());
                state
            }
        }
    }

    /// One request of `source` through `route` of `service`: within its limit, counted in
    /// shadow mode, or refused.
    pub fn check(
        &self,
        policy: &Policy,
        service: &ResourceId,
        route: &str,
        limit: &RouteRateLimit,
        source: &ResourceId,
    ) -> Result<(), Limited> {
        self.check_at(policy, service, route, limit, source, Instant::now())
    }

    fn check_at(
        &self,
        policy: &Policy,
        service: &ResourceId,
        route: &str,
        limit: &RouteRateLimit,
        source: &ResourceId,
        now: Instant,
    ) -> Result<(), Limited> {
        let state = self.state(limit, route);
        let who = Who::resolve(policy, &Caller::Local(source.clone()));
        let Err(refusal) = state.buckets.take(&limit.limit, &who, now) else {
            return Ok(());
        };
        let shadow = limit.limit.shadow;
        self.metric
            .get_or_create(&RouteRateLimitLabels {
                mesh: policy.mesh.clone(),
                virtual_service: service.to_string(),
                virtual_router: limit.virtual_router.to_string(),
                route: route.to_owned(),
                source_virtual_node: source.to_string(),
                scope: refusal.scope,
                mode: if shadow { "shadow" } else { "enforced" },
            })
            .inc();
        tracing::debug!(target: "strait::admission", virtual_router = %limit.virtual_router, route, caller = %who.key, scope = refusal.scope, shadow, "request over the route's rate limit");
        if shadow {
            return Ok(());
        }
        Err(Limited {
            virtual_router: limit.virtual_router.clone(),
            route: route.to_owned(),
            scope: refusal.scope,
            wait: refusal.wait,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::{Bucket, RateLimitCaller, RateLimitOverride};

    fn limit(rate: RateLimit) -> RouteRateLimit {
        RouteRateLimit {
            virtual_router: ResourceId::new("app", "router"),
            limit: rate,
        }
    }

    fn total(requests_per_second: u32, burst: u32) -> RateLimit {
        RateLimit {
            total: Some(Bucket {
                requests_per_second,
                burst: Some(burst),
            }),
            ..RateLimit::default()
        }
    }

    #[test]
    fn a_route_serves_its_burst_then_refuses_and_counts_with_the_route() {
        let metric = Family::default();
        let routes = RouteLimits::new(metric.clone());
        let policy = Policy::default();
        let (service, source) = (ResourceId::new("app", "svc"), ResourceId::new("app", "a"));
        let limited = limit(total(10, 10));
        let now = Instant::now();
        let served = (0..15)
            .filter(|_| {
                routes
                    .check_at(&policy, &service, "r1", &limited, &source, now)
                    .is_ok()
            })
            .count();
        assert_eq!(served, 10);
        let refused = routes
            .check_at(&policy, &service, "r1", &limited, &source, now)
            .unwrap_err();
        assert_eq!(refused.scope, "total");
        assert_eq!(refused.wait, Duration::from_millis(100));
        // Another route of the same router has buckets of its own.
        assert!(
            routes
                .check_at(&policy, &service, "r2", &limited, &source, now)
                .is_ok()
        );
        let labels = RouteRateLimitLabels {
            mesh: String::new(),
            virtual_service: "app/svc".into(),
            virtual_router: "app/router".into(),
            route: "r1".into(),
            source_virtual_node: "app/a".into(),
            scope: "total",
            mode: "enforced",
        };
        assert_eq!(metric.get_or_create(&labels).get(), 6);
        // A second later the bucket has refilled.
        let later = now + Duration::from_secs(1);
        assert!(
            routes
                .check_at(&policy, &service, "r1", &limited, &source, later)
                .is_ok()
        );
    }

    #[test]
    fn shadow_mode_refuses_nothing_and_counts_and_a_changed_limit_starts_afresh() {
        let metric = Family::default();
        let routes = RouteLimits::new(metric.clone());
        let policy = Policy::default();
        let (service, source) = (ResourceId::new("app", "svc"), ResourceId::new("app", "a"));
        let shadow = limit(RateLimit {
            shadow: true,
            ..total(1, 2)
        });
        let now = Instant::now();
        for _ in 0..5 {
            assert!(
                routes
                    .check_at(&policy, &service, "r", &shadow, &source, now)
                    .is_ok()
            );
        }
        let counted: u64 = [("shadow", 3), ("enforced", 0)]
            .iter()
            .map(|(mode, want)| {
                let got = metric
                    .get_or_create(&RouteRateLimitLabels {
                        mesh: String::new(),
                        virtual_service: "app/svc".into(),
                        virtual_router: "app/router".into(),
                        route: "r".into(),
                        source_virtual_node: "app/a".into(),
                        scope: "total",
                        mode,
                    })
                    .get();
                assert_eq!(got, *want, "{mode}");
                got
            })
            .sum();
        assert_eq!(counted, 3);
        // Enforced now, with a new limit: a full bucket of 2.
        let enforced = limit(total(1, 2));
        let served = (0..4)
            .filter(|_| {
                routes
                    .check_at(&policy, &service, "r", &enforced, &source, now)
                    .is_ok()
            })
            .count();
        assert_eq!(served, 2);
    }

    #[test]
    fn per_caller_buckets_and_overrides_key_on_the_calling_virtual_node() {
        let routes = RouteLimits::new(Family::default());
        let policy = Policy::default();
        let service = ResourceId::new("app", "svc");
        let rate = limit(RateLimit {
            per_caller: Some(Bucket {
                requests_per_second: 1,
                burst: Some(2),
            }),
            overrides: vec![RateLimitOverride {
                callers: vec![RateLimitCaller::VirtualNode(ResourceId::new("app", "vip"))],
                limit: Bucket {
                    requests_per_second: 1,
                    burst: Some(4),
                },
            }],
            ..RateLimit::default()
        });
        let now = Instant::now();
        let served = |caller: &str| {
            let source = ResourceId::new("app", caller);
            (0..6)
                .filter(|_| {
                    routes
                        .check_at(&policy, &service, "r", &rate, &source, now)
                        .is_ok()
                })
                .count()
        };
        assert_eq!(served("a"), 2);
        assert_eq!(served("b"), 2);
        assert_eq!(served("vip"), 4);
    }
}
