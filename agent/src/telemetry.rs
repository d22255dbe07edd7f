//! Metrics (Prometheus / OpenMetrics) and the per-connection log line.
//!
//! One registry for the whole agent, built here and passed down. Labels are bounded: mesh and
//! resource names, never addresses or ports. The eBPF counters are read from the kernel on
//! each scrape (see [`RedirectCollector`]).

pub mod access_log;
mod process;

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

pub use process::ProcessCollector;

use crate::redirect::Redirect;

/// Labels of a TCP connection through the agent.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub mesh: String,
    pub source_virtual_node: String,
    pub target_virtual_service: String,
    pub target_virtual_node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub mesh: String,
    pub source_virtual_node: String,
    pub target_virtual_service: String,
    pub target_virtual_node: String,
    /// `sent` (client to upstream) or `received` (upstream to client).
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub mesh: String,
    pub source_virtual_node: String,
    pub reason: &'static str,
}

/// The metrics the proxy updates.
#[derive(Clone, Default)]
pub struct Metrics {
    pub tcp_opened: Family<TcpLabels, Counter>,
    pub tcp_closed: Family<TcpLabels, Counter>,
    pub tcp_active: Family<TcpLabels, Gauge>,
    pub tcp_bytes: Family<BytesLabels, Counter>,
    /// Connections the agent accepted but could not forward, by reason.
    pub tcp_failures: Family<FailureLabels, Counter>,
    pub enrolled_workloads: Gauge,
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "strait_tcp_connections_opened",
            "TCP connections accepted from local workloads and forwarded",
            self.tcp_opened.clone(),
        );
        registry.register(
            "strait_tcp_connections_closed",
            "TCP connections finished",
            self.tcp_closed.clone(),
        );
        registry.register(
            "strait_tcp_connections_active",
            "TCP connections open now",
            self.tcp_active.clone(),
        );
        registry.register(
            "strait_tcp_bytes",
            "Bytes carried, by direction (sent: workload to upstream)",
            self.tcp_bytes.clone(),
        );
        registry.register(
            "strait_tcp_connection_failures",
            "Captured connections the agent could not forward, by reason",
            self.tcp_failures.clone(),
        );
        registry.register(
            "strait_enrolled_workloads",
            "Local workloads enrolled in the mesh",
            self.enrolled_workloads.clone(),
        );
    }
}

/// Exposes the eBPF programs' per-reason counters, read on each scrape.
pub struct RedirectCollector(pub Arc<Redirect>);

impl std::fmt::Debug for RedirectCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedirectCollector")
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

impl Collector for RedirectCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(counters) = self.0.counters() else {
            return Ok(());
        };
        let family = counters.by_reason();
        let mut metric = encoder.encode_descriptor(
            "strait_redirect_connects",
            "eBPF outcomes by reason: connects (captured, denied, ...) and fast-path sends and sockets (fastpath_*)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (reason, value) in family {
            let labels = ReasonLabel { reason };
            ConstCounter::new(value).encode(metric.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
