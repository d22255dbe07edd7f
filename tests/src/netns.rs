//! Network namespace plumbing: `ip` invocations with clear errors, sysctls inside a namespace,
//! and the routes every namespace gets. Links are always created inside testbed namespaces
//! (`ip -n NS link add ... peer ... netns OTHER`), never in the host's namespace.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::addr;
use crate::process::run_ok;

/// Where `ip netns add` bind-mounts named namespaces.
const NETNS_RUN_DIR: &str = "/run/netns";
/// Bound for one `ip` invocation.
const IP_TIMEOUT: Duration = Duration::from_secs(10);

/// The path of a named netns.
pub(crate) fn path(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

/// Runs `ip ARGS...`; the error names the command and carries its stderr.
pub(crate) fn ip(args: &[&str]) -> anyhow::Result<()> {
    run_ok(Command::new("ip").args(args), IP_TIMEOUT)?;
    Ok(())
}

/// Runs `ip -n NS ARGS...`.
pub(crate) fn ip_in(netns: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut all = vec!["-n", netns];
    all.extend_from_slice(args);
    ip(&all)
}

/// Creates a named netns with lo up and DAD off (addresses are ours and unique, and tentative
/// IPv6 addresses would make the first connections fail).
pub(crate) fn create(name: &str) -> anyhow::Result<()> {
    ip(&["netns", "add", name])?;
    sysctls(
        name,
        &[
            ("net/ipv6/conf/all/accept_dad", "0"),
            ("net/ipv6/conf/default/accept_dad", "0"),
            ("net/ipv4/conf/all/rp_filter", "0"),
            ("net/ipv4/conf/default/rp_filter", "0"),
        ],
    )?;
    ip_in(name, &["link", "set", "lo", "up"])
}

/// Deletes a named netns; a netns that is already gone is fine.
pub(crate) fn delete(name: &str) -> anyhow::Result<()> {
    if !path(name).exists() {
        return Ok(());
    }
    ip(&["netns", "delete", name])
}

/// Routes the virtual-service ranges `unreachable`, so a connect that the mesh did not capture
/// fails locally (EHOSTUNREACH/ENETUNREACH) instead of leaving the namespace.
pub(crate) fn service_ranges_unreachable(netns: &str) -> anyhow::Result<()> {
    ip_in(
        netns,
        &["route", "add", "unreachable", addr::SERVICE_CIDR_V4],
    )?;
    ip_in(
        netns,
        &["-6", "route", "add", "unreachable", addr::SERVICE_CIDR_V6],
    )
}

/// Writes sysctls (paths under /proc/sys) inside the netns `name`.
///
/// /proc/sys/net resolves against the network namespace of the task that walks the path, so a
/// short-lived thread joins the netns and writes them; no `sysctl` binary needed.
pub(crate) fn sysctls(name: &str, values: &[(&str, &str)]) -> anyhow::Result<()> {
    let netns = path(name);
    let values: Vec<(String, String)> = values
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let name = name.to_owned();
    std::thread::spawn(move || -> anyhow::Result<()> {
        let file = std::fs::File::open(&netns)
            .with_context(|| format!("open netns {}", netns.display()))?;
        use std::os::fd::AsRawFd as _;
        // SAFETY: the fd is an open netns file kept alive by `file`. setns only changes this
        // thread's netns; the thread ends right after.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("setns into {}", netns.display()));
        }
        for (key, value) in &values {
            let p = Path::new("/proc/sys").join(key);
            std::fs::write(&p, value)
                .with_context(|| format!("set {} = {value} in netns {name}", p.display()))?;
        }
        Ok(())
    })
    .join()
    .unwrap_or_else(|_| bail!("BUG: sysctl thread panicked"))
}
