//! Client-side circuit breakers: a backend's `clientPolicy.circuitBreaker` (strait extension;
//! see docs/resilience.md), Envoy's cluster circuit breakers as App Mesh would have set them on
//! the calling pod's Envoy. Each limit is unlimited when absent. The state is per (calling
//! virtual node, virtual service, target virtual node) on this node: every pod of the calling
//! virtual node on this node shares it.
//!
//! - `maxRequests`: requests in flight to the target virtual node (until the response's last
//!   byte), whatever the protocol;
//! - `maxConnections`: tcp connections open to it; for HTTP/1.1 targets, requests holding an
//!   upstream connection (one request per connection at a time);
//! - `maxPendingRequests`: HTTP/1.1 requests waiting for one of those connections;
//! - `maxRetries`: retries in flight at once (a retry budget): a retry over it is not made, and
//!   the attempt's own failure is the answer.
//!
//! Over `maxRequests`, `maxConnections` or `maxPendingRequests`: 503 with
//! `x-envoy-overloaded: true` (gRPC `UNAVAILABLE`), flag `UO`; a tcp connection is closed. Each
//! overflow is counted by reason.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::mesh::{CircuitBreaker, ResourceId};

/// Labels of a circuit breaker overflow (App Mesh's dimensions).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BreakerLabels {
    pub mesh: String,
    pub source_virtual_node: String,
    pub target_virtual_service: String,
    pub target_virtual_node: String,
    /// `max_requests`, `max_connections`, `max_pending_requests` or `max_retries`.
    pub reason: &'static str,
}

/// The breakers of every (caller, service, target) with a `circuitBreaker`.
#[derive(Default)]
pub struct Breakers {
    states: Mutex<HashMap<(ResourceId, ResourceId, ResourceId), Arc<Breaker>>>,
    overflows: Family<BreakerLabels, Counter>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Breakers {
    pub fn new(overflows: Family<BreakerLabels, Counter>) -> Breakers {
        Breakers {
            states: Mutex::default(),
            overflows,
        }
    }

    /// The breaker of `source` calling `target` through `service` with this `config`; its
    /// state survives reloads that leave the config as it was.
    pub fn get(
        &self,
        mesh: &str,
        config: &CircuitBreaker,
        source: &ResourceId,
        service: &ResourceId,
        target: &ResourceId,
    ) -> Arc<Breaker> {
        let key = (source.clone(), service.clone(), target.clone());
        let mut states = lock(&self.states);
        if let Some(breaker) = states.get(&key)
            && breaker.config == *config
            && breaker.mesh == mesh
        {
            return breaker.clone();
        }
        let breaker = Arc::new(Breaker::new(
            mesh,
            config.clone(),
            &key,
            self.overflows.clone(),
        ));
        states.insert(key, breaker.clone());
        breaker
    }
}

/// One limit of a breaker as `strait status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LimitUse {
    /// `max_requests`, `max_connections`, `max_pending_requests` or `max_retries`.
    pub limit: &'static str,
    pub in_use: u64,
    pub max: u32,
}

/// A breaker as `strait status` shows it; `open` names the limits reached now (the next
/// request, connection or retry overflows: Envoy's `*_open` gauges).
#[derive(Debug, Clone, serde::Serialize)]
pub struct BreakerStatus {
    pub source_virtual_node: String,
    pub virtual_service: String,
    pub target_virtual_node: String,
    pub limits: Vec<LimitUse>,
    pub open: Vec<&'static str>,
}

impl Breakers {
    /// Every breaker's use now, sorted by caller, service and target.
    pub fn status(&self) -> Vec<BreakerStatus> {
        let states = lock(&self.states);
        let mut out: Vec<BreakerStatus> = states.values().map(|b| b.status()).collect();
        out.sort_by(|a, b| {
            (
                &a.source_virtual_node,
                &a.virtual_service,
                &a.target_virtual_node,
            )
                .cmp(&(
                    &b.source_virtual_node,
                    &b.virtual_service,
                    &b.target_virtual_node,
                ))
        });
        out
    }
}

/// One breaker's live state.
pub struct Breaker {
    mesh: String,
    config: CircuitBreaker,
    requests: Option<Arc<Semaphore>>,
    connections: Option<Arc<Semaphore>>,
    pending: AtomicU32,
    retries: Arc<AtomicU32>,
    labels: (String, String, String),
    overflows: Family<BreakerLabels, Counter>,
}

/// Which limit overflowed (the metric's `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflow(pub &'static str);

/// A retry in flight, counted against `maxRetries` until dropped.
pub struct RetryGuard(Arc<AtomicU32>);

impl Drop for RetryGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A waiting request, counted against `maxPendingRequests` until dropped.
struct Pending<'a>(&'a AtomicU32);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Breaker {
    fn new(
        mesh: &str,
        config: CircuitBreaker,
        key: &(ResourceId, ResourceId, ResourceId),
        overflows: Family<BreakerLabels, Counter>,
    ) -> Breaker {
        let permits = |n: Option<u32>| n.map(|n| Arc::new(Semaphore::new(n as usize)));
        Breaker {
            mesh: mesh.to_owned(),
            requests: permits(config.max_requests),
            connections: permits(config.max_connections),
            pending: AtomicU32::new(0),
            retries: Arc::new(AtomicU32::new(0)),
            labels: (key.0.to_string(), key.1.to_string(), key.2.to_string()),
            config,
            overflows,
        }
    }

    fn status(&self) -> BreakerStatus {
        let held = |semaphore: &Option<Arc<Semaphore>>, max: Option<u32>| {
            let max = max?;
            let free = semaphore.as_ref()?.available_permits() as u64;
            Some(u64::from(max).saturating_sub(free))
        };
        let c = &self.config;
        let limits: Vec<LimitUse> = [
            (
                "max_requests",
                held(&self.requests, c.max_requests),
                c.max_requests,
            ),
            (
                "max_connections",
                held(&self.connections, c.max_connections),
                c.max_connections,
            ),
            (
                "max_pending_requests",
                Some(u64::from(self.pending.load(Ordering::Acquire))),
                c.max_pending_requests
                    .filter(|_| c.max_connections.is_some()),
            ),
            (
                "max_retries",
                Some(u64::from(self.retries.load(Ordering::Acquire))),
                c.max_retries,
            ),
        ]
        .into_iter()
        .filter_map(|(limit, in_use, max)| {
            Some(LimitUse {
                limit,
                in_use: in_use?,
                max: max?,
            })
        })
        .collect();
        BreakerStatus {
            source_virtual_node: self.labels.0.clone(),
            virtual_service: self.labels.1.clone(),
            target_virtual_node: self.labels.2.clone(),
            open: limits
                .iter()
                .filter(|l| l.in_use >= u64::from(l.max))
                .map(|l| l.limit)
                .collect(),
            limits,
        }
    }

    fn count(&self, reason: &'static str) {
        self.overflows
            .get_or_create(&BreakerLabels {
                mesh: self.mesh.clone(),
                source_virtual_node: self.labels.0.clone(),
                target_virtual_service: self.labels.1.clone(),
                target_virtual_node: self.labels.2.clone(),
                reason,
            })
            .inc();
    }

    /// One more request in flight (`maxRequests`).
    pub fn request(&self) -> Result<Option<OwnedSemaphorePermit>, Overflow> {
        let Some(requests) = &self.requests else {
            return Ok(None);
        };
        requests.clone().try_acquire_owned().map(Some).map_err(|_| {
            self.count("max_requests");
            Overflow("max_requests")
        })
    }

    /// One more tcp connection (`maxConnections`), refused at once when none is free.
    pub fn connection(&self) -> Result<Option<OwnedSemaphorePermit>, Overflow> {
        let Some(connections) = &self.connections else {
            return Ok(None);
        };
        connections
            .clone()
            .try_acquire_owned()
            .map(Some)
            .map_err(|_| {
                self.count("max_connections");
                Overflow("max_connections")
            })
    }

    /// An HTTP/1.1 upstream connection for one request (`maxConnections`), waiting for one
    /// when all are busy if fewer than `maxPendingRequests` already wait (absent: no bound).
    pub async fn http1_connection(&self) -> Result<Option<OwnedSemaphorePermit>, Overflow> {
        let Some(connections) = &self.connections else {
            return Ok(None);
        };
        if let Ok(permit) = connections.clone().try_acquire_owned() {
            return Ok(Some(permit));
        }
        let max_pending = self.config.max_pending_requests.unwrap_or(u32::MAX);
        if self.pending.fetch_add(1, Ordering::AcqRel) >= max_pending {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            self.count("max_pending_requests");
            return Err(Overflow("max_pending_requests"));
        }
        let _pending = Pending(&self.pending);
        // Never closed: the route's timeouts bound the wait.
        connections
            .clone()
            .acquire_owned()
            .await
            .map(Some)
            .map_err(|_| Overflow("max_pending_requests"))
    }

    /// One more retry in flight (`maxRetries`); None (counted) when the budget is spent.
    pub fn retry(&self) -> Option<RetryGuard> {
        let Some(max) = self.config.max_retries else {
            self.retries.fetch_add(1, Ordering::AcqRel);
            return Some(RetryGuard(self.retries.clone()));
        };
        if self.retries.fetch_add(1, Ordering::AcqRel) >= max {
            self.retries.fetch_sub(1, Ordering::AcqRel);
            self.count("max_retries");
            return None;
        }
        Some(RetryGuard(self.retries.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(config: CircuitBreaker) -> (Breakers, Arc<Breaker>) {
        let breakers = Breakers::default();
        let id = |n: &str| ResourceId::new("app", n);
        let b = breakers.get("m", &config, &id("client"), &id("svc"), &id("server"));
        (breakers, b)
    }

    fn overflows(breakers: &Breakers, reason: &'static str) -> u64 {
        breakers
            .overflows
            .get_or_create(&BreakerLabels {
                mesh: "m".into(),
                source_virtual_node: "app/client".into(),
                target_virtual_service: "app/svc".into(),
                target_virtual_node: "app/server".into(),
                reason,
            })
            .get()
    }

    #[test]
    fn absent_limits_are_unlimited() {
        let (_, b) = breaker(CircuitBreaker::default());
        let held: Vec<_> = (0..1000).map(|_| b.request().unwrap()).collect();
        assert!(held.iter().all(Option::is_none));
        assert!(b.connection().unwrap().is_none());
        let retries: Vec<_> = (0..1000).map(|_| b.retry()).collect();
        assert!(retries.iter().all(Option::is_some));
    }

    #[test]
    fn requests_and_retries_over_their_limit_overflow_and_are_counted() {
        let (breakers, b) = breaker(CircuitBreaker {
            max_requests: Some(2),
            max_retries: Some(1),
            ..CircuitBreaker::default()
        });
        let first = b.request().unwrap();
        let _second = b.request().unwrap();
        assert_eq!(b.request().err(), Some(Overflow("max_requests")));
        drop(first);
        assert!(b.request().is_ok());
        let retry = b.retry().unwrap();
        assert!(b.retry().is_none());
        drop(retry);
        assert!(b.retry().is_some());
        assert_eq!(overflows(&breakers, "max_requests"), 1);
        assert_eq!(overflows(&breakers, "max_retries"), 1);
    }

    #[tokio::test]
    async fn http1_requests_queue_up_to_max_pending_then_overflow() {
        let (breakers, b) = breaker(CircuitBreaker {
            max_connections: Some(1),
            max_pending_requests: Some(1),
            ..CircuitBreaker::default()
        });
        let held = b.http1_connection().await.unwrap();
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { b.http1_connection().await.map(|p| p.is_some()) })
        };
        // Let the waiter queue up.
        while b.pending.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            b.http1_connection().await.err(),
            Some(Overflow("max_pending_requests"))
        );
        drop(held);
        assert_eq!(waiter.await.unwrap(), Ok(true));
        assert_eq!(overflows(&breakers, "max_pending_requests"), 1);
        // A tcp connection is refused at once, never queued.
        let _tcp = b.connection().unwrap();
        assert_eq!(b.connection().err(), Some(Overflow("max_connections")));
    }

    #[test]
    fn a_changed_config_starts_afresh() {
        let (breakers, b) = breaker(CircuitBreaker {
            max_requests: Some(1),
            ..CircuitBreaker::default()
        });
        let _held = b.request().unwrap();
        let id = |n: &str| ResourceId::new("app", n);
        let wider = CircuitBreaker {
            max_requests: Some(2),
            ..CircuitBreaker::default()
        };
        let b2 = breakers.get("m", &wider, &id("client"), &id("svc"), &id("server"));
        // Fresh: two permits, whatever the old state holds.
        let _one = b2.request().unwrap();
        let _two = b2.request().unwrap();
        assert!(b2.request().is_err());
        // The same config again: the same state.
        let b3 = breakers.get("m", &wider, &id("client"), &id("svc"), &id("server"));
        assert!(b3.request().is_err());
    }

    #[test]
    fn status_shows_each_limits_use_and_the_ones_reached() {
        let (breakers, b) = breaker(CircuitBreaker {
            max_requests: Some(1),
            max_retries: Some(2),
            ..CircuitBreaker::default()
        });
        let status = |breakers: &Breakers| breakers.status().remove(0);
        let before = status(&breakers);
        assert!(before.open.is_empty(), "{before:?}");
        assert_eq!(
            before.limits.len(),
            2,
            "only the limits configured: {before:?}"
        );
        let _permit = b.request().expect("one request fits");
        let _retry = b.retry().expect("one retry fits");
        let during = status(&breakers);
        assert_eq!(during.open, vec!["max_requests"], "{during:?}");
        assert_eq!(
            (during.limits[0].in_use, during.limits[1].in_use),
            (1, 1),
            "{during:?}"
        );
        assert_eq!(during.source_virtual_node, "app/client");
    }
}
