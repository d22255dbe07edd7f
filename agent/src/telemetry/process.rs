//! The standard Prometheus process metrics (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, ...), read from /proc/self on each scrape.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

#[derive(Debug)]
pub struct ProcessCollector {
    ticks_per_second: f64,
    page_size: f64,
    boot_time: f64,
    /// The runtime the collector was made in, for its task count.
    runtime: Option<tokio::runtime::Handle>,
}

impl ProcessCollector {
    pub fn new() -> ProcessCollector {
        use nix::unistd::{SysconfVar, sysconf};
        let constant = |var| sysconf(var).ok().flatten().unwrap_or(0);
        let ticks = constant(SysconfVar::CLK_TCK);
        let page = constant(SysconfVar::PAGE_SIZE);
        let boot_time = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|stat| {
                stat.lines()
                    .find_map(|l| l.strip_prefix("btime "))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0.0);
        ProcessCollector {
            ticks_per_second: if ticks > 0 { ticks as f64 } else { 100.0 },
            page_size: if page > 0 { page as f64 } else { 4096.0 },
            boot_time,
            runtime: tokio::runtime::Handle::try_current().ok(),
        }
    }
}

impl Default for ProcessCollector {
    fn default() -> Self {
        ProcessCollector::new()
    }
}

/// Fields of /proc/self/stat after the command name (field 3 onwards, 0-based here).
fn stat_fields() -> Option<Vec<String>> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name is in parentheses and may contain spaces: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(fields) = stat_fields() else {
            return Ok(());
        };
        let field = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        // /proc/[pid]/stat: utime is field 14, stime 15, starttime 22, vsize 23, rss 24
        // (1-based); `fields` starts at field 3.
        let cpu = (field(11) + field(12)) / self.ticks_per_second;
        let start = self.boot_time + field(19) / self.ticks_per_second;
        let virtual_bytes = field(20);
        let resident = field(21) * self.page_size;
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .map(|d| d.count() as f64)
            .unwrap_or(0.0);

        let counter = ConstCounter::new(cpu);
        counter.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            counter.metric_type(),
        )?)?;
        for (name, help, value) in [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                resident,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                virtual_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                open_fds,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch in seconds",
                start,
            ),
        ] {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        if let Some(runtime) = &self.runtime {
            // Tasks that never end (a leak of connections or timers) show here first.
            let gauge = ConstGauge::new(runtime.metrics().num_alive_tasks() as i64);
            gauge.encode(encoder.encode_descriptor(
                "strait_runtime_tasks",
                "Tasks alive in the agent's async runtime",
                None,
                gauge.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_metrics_have_plausible_values() {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(ProcessCollector::new()));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let value = |name: &str| -> f64 {
            text.lines()
                .find(|l| l.starts_with(name) && !l.starts_with('#'))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} missing in {text}"))
        };
        let rss = value("process_resident_memory_bytes");
        assert!(rss > 1_000_000.0 && rss < 10_000_000_000.0, "{rss}");
        assert!(value("process_open_fds") >= 3.0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let start = value("process_start_time_seconds");
        assert!(
            start <= now + 1.0 && start > now - 3600.0,
            "{start} vs {now}"
        );
        assert!(text.contains("process_cpu_seconds_total"));
    }
}
