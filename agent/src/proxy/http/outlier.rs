//! Outlier detection from App Mesh's listener `outlierDetection` (docs/resilience.md): the
//! calling agent watches every answer from each endpoint of the target virtual node, and
//! `maxServerErrors` consecutive server errors eject the endpoint from load balancing, as
//! Envoy's `consecutive_5xx` detector does.
//!
//! - A server error is a 5xx response, a gRPC status in the response headers that maps to one
//!   (Envoy's mapping: UNKNOWN, INTERNAL, DATA_LOSS 500, UNIMPLEMENTED 501, UNAVAILABLE 503,
//!   DEADLINE_EXCEEDED 504), a connect failure, a reset before the response, or a timeout
//!   waiting for it (Envoy counts those as local 5xx when it does not split local and
//!   external errors, App Mesh's setting). For tcp listeners: connect failures. Any other
//!   answer sets the count back to zero.
//! - The n-th ejection lasts `baseEjectionDuration` x n, at most 300 s (Envoy's default
//!   `max_ejection_time`). The endpoint comes back by itself when the time is up.
//! - n decays: for each full `interval` an endpoint spends back in service, n goes down by one
//!   (Envoy decrements it on every interval tick the host is not ejected). Computed when the
//!   next ejection happens, so no timer is needed.
//! - Never more than `maxEjectionPercent` of the virtual node's endpoints are ejected at once,
//!   except that one endpoint may always be (unless the percentage is 0). Envoy compares the
//!   share ejected *before* the new ejection with the percentage, so 1 of 3 (33 %) ejected
//!   under 50 % lets a second go (67 %); strait never goes over the percentage. A server error
//!   streak that cannot eject is counted as an overflow and starts over.
//! - Answers to requests sent before an ejection, arriving while the endpoint is ejected, are
//!   not counted.
//!
//! The state lives with the endpoint's load-balancing state ([`super::balance`]), per
//! (virtual node, endpoint address and port) on each node, shared by every caller on the node.
//! Active health checks and outlier detection are independent: an endpoint takes traffic when
//! its health checks pass and it is not ejected. (Envoy by default ends an ejection when an
//! active health check passes; strait does not, since a health path answering 200 while
//! requests fail is what outlier detection is there to catch.)

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::mesh::{OutlierDetection, ResourceId};
use crate::telemetry::EndpointLabels;

/// Envoy's default `max_ejection_time`: no ejection lasts longer (unless the base does).
pub const MAX_EJECTION: Duration = Duration::from_secs(300);

/// One endpoint's outlier detection state.
#[derive(Debug, Default)]
pub struct State {
    /// Server errors in a row.
    consecutive: u64,
    ejected_until: Option<Instant>,
    /// The ejection multiplier: how many times it was ejected, less the decay.
    times: u32,
    /// When it last came back (the multiplier decays from here).
    back_since: Option<Instant>,
    /// The gauge labels this ejection raised, lowered when it ends.
    gauge: Option<EndpointLabels>,
}

impl State {
    pub fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| now < until)
    }

    /// When the current ejection ends, if it has not yet.
    pub fn ejected_until(&self, now: Instant) -> Option<Instant> {
        self.ejected_until.filter(|until| now < *until)
    }

    /// The ejection multiplier the next ejection would start from, after the decay.
    fn decayed(&self, interval: Duration, now: Instant) -> u32 {
        let Some(since) = self.back_since else {
            return self.times;
        };
        if interval.is_zero() {
            return 0;
        }
        let intervals = now.saturating_duration_since(since).as_nanos() / interval.as_nanos();
        self.times
            .saturating_sub(u32::try_from(intervals).unwrap_or(u32::MAX))
    }

    /// Ends an ejection whose time is up; the gauge labels to lower, if it ended now.
    pub fn end_if_due(&mut self, now: Instant) -> Option<Option<EndpointLabels>> {
        let until = self.ejected_until?;
        if now < until {
            return None;
        }
        self.ejected_until = None;
        self.back_since = Some(until);
        self.consecutive = 0;
        Some(self.gauge.take())
    }

    /// The endpoint's ejection as `strait status` shows it, if it is ejected now.
    pub fn describe(
        &self,
        node: &ResourceId,
        endpoint: SocketAddr,
        now: Instant,
    ) -> Option<Ejected> {
        let until = self.ejected_until(now)?;
        Some(Ejected {
            virtual_node: node.to_string(),
            endpoint,
            remaining_ms: u64::try_from(until.duration_since(now).as_millis()).unwrap_or(u64::MAX),
            times: self.times,
        })
    }

    /// Remembers the gauge labels an ejection raised, to lower them when it ends.
    pub fn set_gauge(&mut self, labels: EndpointLabels) {
        self.gauge = Some(labels);
    }

    /// Forgets the gauge labels of an ejection (the endpoint is gone).
    pub fn take_gauge(&mut self) -> Option<EndpointLabels> {
        self.gauge.take()
    }
}

/// What one answer did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing changed state (below the threshold, or a success).
    Counted,
    /// The endpoint was ejected for this long; its `times`-th ejection (after decay).
    Ejected { duration: Duration, times: u32 },
    /// The threshold was reached but `maxEjectionPercent` allows no more ejections.
    Overflow,
}

/// Whether one more endpoint of `total` may be ejected when `ejected` already are.
pub fn may_eject(ejected: usize, total: usize, max_percent: u32) -> bool {
    if max_percent == 0 || total == 0 {
        return false;
    }
    ejected == 0 || (ejected + 1) * 100 <= total * max_percent as usize
}

/// How long the `times`-th ejection lasts.
pub fn ejection_time(base: Duration, times: u32) -> Duration {
    base.saturating_mul(times).min(MAX_EJECTION.max(base))
}

/// Counts an answer from the endpoint whose state is `state`. `ejected_others` is asked, only
/// when the threshold is reached, how many of the virtual node's other endpoints are ejected
/// now, and `total` is how many it has; the caller holds the registry's ejection lock then so
/// two endpoints cannot both take the last place.
pub fn judge(
    state: &mut State,
    policy: &OutlierDetection,
    server_error: bool,
    now: Instant,
    ejected_others: impl FnOnce() -> usize,
    total: usize,
) -> Verdict {
    if state.ejected(now) {
        return Verdict::Counted;
    }
    if !server_error {
        state.consecutive = 0;
        return Verdict::Counted;
    }
    state.consecutive += 1;
    if state.consecutive < policy.max_server_errors {
        return Verdict::Counted;
    }
    state.consecutive = 0;
    if !may_eject(ejected_others(), total, policy.max_ejection_percent) {
        return Verdict::Overflow;
    }
    let times = state
        .decayed(policy.interval.as_std(), now)
        .saturating_add(1);
    let duration = ejection_time(policy.base_ejection_duration.as_std(), times);
    state.times = times;
    state.ejected_until = Some(now + duration);
    Verdict::Ejected { duration, times }
}

/// Whether a response is a server error for outlier detection: a 5xx status, or a gRPC
/// status in the headers that Envoy maps to one.
pub fn server_error_status(status: u16, grpc_status: Option<u32>) -> bool {
    if status >= 500 {
        return true;
    }
    // UNKNOWN 2, DEADLINE_EXCEEDED 4, UNIMPLEMENTED 12, INTERNAL 13, UNAVAILABLE 14,
    // DATA_LOSS 15.
    matches!(grpc_status, Some(2 | 4 | 12 | 13 | 14 | 15))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EjectionLabels {
    pub mesh: String,
    pub virtual_node: String,
    /// `enforced` (ejected) or `overflow` (not ejected: `maxEjectionPercent` reached).
    pub result: &'static str,
}

/// Outlier detection's metrics (not per-request: kept under `--telemetry off`).
#[derive(Clone, Default)]
pub struct Metrics {
    pub ejections: Family<EjectionLabels, Counter>,
    pub ejected: Family<EndpointLabels, Gauge>,
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "strait_outlier_ejections",
            "Endpoints ejected by a listener's outlierDetection (enforced), or not ejected because maxEjectionPercent was reached (overflow)",
            self.ejections.clone(),
        );
        registry.register(
            "strait_outlier_ejected",
            "Endpoints ejected by outlierDetection now",
            self.ejected.clone(),
        );
    }
}

/// An ejected endpoint, for `strait status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Ejected {
    pub virtual_node: String,
    pub endpoint: SocketAddr,
    /// Milliseconds until it comes back.
    pub remaining_ms: u64,
    /// Its ejection multiplier (how long this ejection is, in `baseEjectionDuration`s).
    pub times: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max: u64, pct: u32) -> OutlierDetection {
        OutlierDetection {
            max_server_errors: max,
            interval: crate::mesh::Duration {
                unit: crate::mesh::DurationUnit::S,
                value: 10,
            },
            base_ejection_duration: crate::mesh::Duration {
                unit: crate::mesh::DurationUnit::S,
                value: 30,
            },
            max_ejection_percent: pct,
        }
    }

    #[test]
    fn consecutive_errors_eject_and_a_success_starts_over() {
        let p = policy(5, 100);
        let (mut s, t0) = (State::default(), Instant::now());
        for _ in 0..4 {
            assert_eq!(judge(&mut s, &p, true, t0, || 0, 3), Verdict::Counted);
        }
        // A success in between: the count starts over.
        assert_eq!(judge(&mut s, &p, false, t0, || 0, 3), Verdict::Counted);
        for _ in 0..4 {
            assert_eq!(judge(&mut s, &p, true, t0, || 0, 3), Verdict::Counted);
        }
        let fifth = judge(&mut s, &p, true, t0, || 0, 3);
        assert_eq!(
            fifth,
            Verdict::Ejected {
                duration: Duration::from_secs(30),
                times: 1
            }
        );
        assert!(s.ejected(t0 + Duration::from_secs(29)));
        // Answers while ejected do not count.
        for _ in 0..10 {
            assert_eq!(
                judge(&mut s, &p, true, t0 + Duration::from_secs(1), || 0, 3),
                Verdict::Counted
            );
        }
        assert!(!s.ejected(t0 + Duration::from_secs(30)));
    }

    #[test]
    fn the_second_ejection_is_twice_as_long_and_the_multiplier_decays_per_interval() {
        let p = policy(1, 100);
        let (mut s, t0) = (State::default(), Instant::now());
        judge(&mut s, &p, true, t0, || 0, 3);
        let back = t0 + Duration::from_secs(30);
        assert!(s.end_if_due(back).is_some());
        let second = judge(&mut s, &p, true, back + Duration::from_secs(1), || 0, 3);
        assert_eq!(
            second,
            Verdict::Ejected {
                duration: Duration::from_secs(60),
                times: 2
            }
        );
        // Back at t0+91 s; 25 s later (two full 10 s intervals) the multiplier has decayed
        // from 2 to 0, so the next ejection is the base again.
        let back = back + Duration::from_secs(61);
        assert!(s.end_if_due(back).is_some());
        let third = judge(&mut s, &p, true, back + Duration::from_secs(25), || 0, 3);
        assert_eq!(
            third,
            Verdict::Ejected {
                duration: Duration::from_secs(30),
                times: 1
            }
        );
        // Capped at 300 s.
        assert_eq!(
            ejection_time(Duration::from_secs(30), 20),
            Duration::from_secs(300)
        );
        assert_eq!(
            ejection_time(Duration::from_secs(400), 2),
            Duration::from_secs(400)
        );
    }

    #[test]
    fn max_ejection_percent_is_never_exceeded_but_one_may_always_go() {
        // 50 % of 3: one, not two (Envoy's check would allow 2 of 3).
        assert!(may_eject(0, 3, 50));
        assert!(!may_eject(1, 3, 50));
        // 10 % of 3 is less than one endpoint: one may still go.
        assert!(may_eject(0, 3, 10));
        assert!(!may_eject(1, 3, 10));
        assert!(may_eject(1, 4, 50));
        assert!(!may_eject(2, 4, 50));
        assert!(may_eject(2, 3, 100));
        assert!(!may_eject(0, 3, 0));
        let p = policy(2, 50);
        let (mut s, t0) = (State::default(), Instant::now());
        judge(&mut s, &p, true, t0, || 1, 3);
        assert_eq!(judge(&mut s, &p, true, t0, || 1, 3), Verdict::Overflow);
        assert!(!s.ejected(t0));
        // The streak starts over after an overflow.
        assert_eq!(judge(&mut s, &p, true, t0, || 0, 3), Verdict::Counted);
        assert!(matches!(
            judge(&mut s, &p, true, t0, || 0, 3),
            Verdict::Ejected { .. }
        ));
    }

    #[test]
    fn server_errors_are_5xx_and_grpc_statuses_envoy_maps_to_5xx() {
        assert!(server_error_status(500, None));
        assert!(server_error_status(503, None));
        assert!(!server_error_status(404, None));
        assert!(!server_error_status(429, None));
        assert!(server_error_status(200, Some(14)));
        assert!(server_error_status(200, Some(13)));
        assert!(!server_error_status(200, Some(0)));
        assert!(!server_error_status(200, Some(5)));
    }
}
