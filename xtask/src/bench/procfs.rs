//! What the benchmark reads from /proc: CPU time and resident memory of the proxies, the load
//! average of the machine, what an agent's sockets are.

use std::collections::{BTreeMap, HashMap};

use anyhow::Context as _;

/// CPU time of processes in clock ticks (all threads), split as /proc/PID/stat splits it: in
/// user space (utime) and in the kernel on their behalf (stime; with tick accounting, as on
/// the bench machine, that includes the softirq work a write runs inline: delivering the
/// segment to the reader on the same machine and waking it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct CpuTicks {
    pub user: u64,
    pub kernel: u64,
}

impl CpuTicks {
    pub fn total(self) -> u64 {
        self.user + self.kernel
    }
}

impl std::ops::Add for CpuTicks {
    type Output = CpuTicks;

    fn add(self, other: CpuTicks) -> CpuTicks {
        CpuTicks {
            user: self.user + other.user,
            kernel: self.kernel + other.kernel,
        }
    }
}

impl std::ops::Sub for CpuTicks {
    type Output = CpuTicks;

    fn sub(self, earlier: CpuTicks) -> CpuTicks {
        CpuTicks {
            user: self.user.saturating_sub(earlier.user),
            kernel: self.kernel.saturating_sub(earlier.kernel),
        }
    }
}

/// utime and stime of the processes, in clock ticks (all threads).
pub(super) fn cpu_ticks(pids: &[u32]) -> anyhow::Result<CpuTicks> {
    let mut total = CpuTicks::default();
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("read /proc/{pid}/stat"))?;
        // Fields after the command name (which may contain spaces) start after ") ".
        let rest = stat
            .rsplit_once(") ")
            .map(|(_, r)| r)
            .context("malformed /proc/PID/stat")?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of stat; 12 and 13 of `rest` (0-based 11, 12).
        total.user += fields.get(11).context("no utime")?.parse::<u64>()?;
        total.kernel += fields.get(12).context("no stime")?.parse::<u64>()?;
    }
    Ok(total)
}

/// The machine's busy CPU time in clock ticks, all CPUs: user, nice, system, irq and softirq
/// of /proc/stat (not idle, iowait or steal; guest time is already inside user).
pub(super) fn machine_busy_ticks() -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .context("no cpu line in /proc/stat")?
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("malformed cpu line in /proc/stat")?;
    let [user, nice, system, _idle, _iowait, irq, softirq, ..] = fields[..] else {
        anyhow::bail!("short cpu line in /proc/stat");
    };
    Ok(user + nice + system + irq + softirq)
}

/// Clock ticks per second (the unit of /proc/PID/stat's times).
pub(super) fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// A field of /proc/PID/status in its unit (kB for memory, a count for `Threads`).
pub(super) fn proc_status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// The processes' resident memory together, KiB (`None` for no process).
pub(super) fn rss_sum(pids: &[u32]) -> anyhow::Result<Option<u64>> {
    if pids.is_empty() {
        return Ok(None);
    }
    let mut total = 0;
    for pid in pids {
        total += proc_status_kib(*pid, "VmRSS")?;
    }
    Ok(Some(total))
}

/// The 1-minute load average of the machine.
pub(super) fn loadavg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The agent's socket descriptors by what they are: protocol, TCP state and the port that
/// says which side they serve (the local port of a listener or of a connection accepted on a
/// low port, otherwise the remote one), e.g. `tcp ESTABLISHED remote 8081` or `unix`. The
/// socket tables of every network namespace one of the agent's threads is in
/// (/proc/PID/task/TID/net/) and of the namespaces of `pod_pids` (processes in the pods: the
/// agent makes sockets in pods' namespaces) are read; a socket found in none is
/// `socket (not listed)`.
pub(super) fn socket_kinds(pid: u32, pod_pids: &[u32]) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut names: HashMap<u64, String> = HashMap::new();
    let tasks = format!("/proc/{pid}/task");
    let mut nets = Vec::new();
    for task in std::fs::read_dir(&tasks).with_context(|| format!("read {tasks}"))? {
        nets.push(task?.path().join("net"));
    }
    nets.extend(
        pod_pids
            .iter()
            .map(|p| std::path::PathBuf::from(format!("/proc/{p}/net"))),
    );
    for net in nets {
        for proto in ["tcp", "tcp6", "udp", "udp6"] {
            let Ok(table) = std::fs::read_to_string(net.join(proto)) else {
                continue; // the thread ended meanwhile
            };
            for line in table.lines().skip(1) {
                if let Some((inode, name)) = inet_socket(proto, line) {
                    names.entry(inode).or_insert(name);
                }
            }
        }
        for (table, inode_field, kind) in [("unix", 6, "unix"), ("netlink", 9, "netlink")] {
            let Ok(table) = std::fs::read_to_string(net.join(table)) else {
                continue;
            };
            for line in table.lines().skip(1) {
                if let Some(inode) = line.split_whitespace().nth(inode_field)
                    && let Ok(inode) = inode.parse()
                {
                    names.entry(inode).or_insert_with(|| kind.to_owned());
                }
            }
        }
    }
    let mut kinds = BTreeMap::new();
    let dir = format!("/proc/{pid}/fd");
    for entry in std::fs::read_dir(&dir).with_context(|| format!("read {dir}"))? {
        let Ok(target) = std::fs::read_link(entry?.path()) else {
            continue; // closed meanwhile
        };
        let target = target.to_string_lossy();
        let Some(inode) = target
            .strip_prefix("socket:[")
            .and_then(|t| t.strip_suffix(']'))
            .and_then(|t| t.parse::<u64>().ok())
        else {
            continue;
        };
        let name = names
            .get(&inode)
            .cloned()
            .unwrap_or_else(|| "socket (not listed)".to_owned());
        *kinds.entry(name).or_default() += 1;
    }
    Ok(kinds)
}

/// The inode and name of one line of /proc/net/{tcp,tcp6,udp,udp6}.
fn inet_socket(proto: &str, line: &str) -> Option<(u64, String)> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let port = |field: &str| u16::from_str_radix(field.rsplit_once(':')?.1, 16).ok();
    let local = port(fields.get(1)?)?;
    let remote = port(fields.get(2)?)?;
    let inode = fields.get(9)?.parse().ok()?;
    let state = match *fields.get(3)? {
        "01" => "ESTABLISHED",
        "02" => "SYN_SENT",
        "03" => "SYN_RECV",
        "04" => "FIN_WAIT1",
        "05" => "FIN_WAIT2",
        "06" => "TIME_WAIT",
        "07" if proto.starts_with("udp") => "unconnected",
        "07" => "CLOSE",
        "08" => "CLOSE_WAIT",
        "09" => "LAST_ACK",
        "0A" => "LISTEN",
        "0B" => "CLOSING",
        other => other,
    };
    let side = if state == "LISTEN" || state == "unconnected" || local < 32768 {
        format!("local {local}")
    } else {
        format!("remote {remote}")
    };
    Some((inode, format!("{proto} {state} {side}")))
}
