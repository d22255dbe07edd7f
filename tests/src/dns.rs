//! A real DNS server per node: dnsmasq in the node's netns, listening on the bridge addresses
//! (port 53, v4 and v6), answering only from one hosts file that the testbed rewrites and
//! reloads with SIGHUP. It never forwards a query: `--no-resolv` and `--local=/#/` make every
//! name it does not hold NXDOMAIN, including everything under `*.svc.cluster.local`.
//!
//! Pods find it through their resolv.conf (bind-mounted over /etc/resolv.conf by
//! `Pod::command`), which also carries the Kubernetes search path.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::process::{Process, tail};

/// How long dnsmasq may take to start or to reload its hosts file.
const DNS_READY: Duration = Duration::from_secs(10);

/// The records every node's dnsmasq serves, and the file they are served from.
pub(crate) struct Dns {
    pub(crate) hosts_file: PathBuf,
    pub(crate) ttl: u32,
    /// Lock order: this before the testbed's topology lock.
    pub(crate) records: Mutex<BTreeMap<String, Vec<IpAddr>>>,
}

/// The hosts file text for `records`: one `ADDRESS NAME` line per address.
pub(crate) fn hosts_text(records: &BTreeMap<String, Vec<IpAddr>>) -> String {
    let mut text = String::from("# written by the strait testbed\n");
    for (name, addrs) in records {
        for addr in addrs {
            let _ = writeln!(text, "{addr} {name}");
        }
    }
    text
}

/// Writes `text` to `path` atomically (temp file + rename), so a reader never sees half a file.
pub(crate) fn write_atomic(path: &Path, text: &str) -> anyhow::Result<()> {
    let file_name = path
        .file_name()
        .with_context(|| format!("BUG: {} has no file name", path.display()))?;
    let tmp = path.with_file_name(format!(".{}.tmp", file_name.to_string_lossy()));
    std::fs::write(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("rename {} to {}", tmp.display(), path.display()))
}

/// Checks a DNS name the tests set: letters, digits, '-', '.', no empty label.
pub(crate) fn validate_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !ok {
        bail!("`{name}` is not a valid DNS name");
    }
    Ok(())
}

/// The arguments that start dnsmasq for a node whose bridge has `listen` addresses.
pub(crate) fn dnsmasq_args(dns: &Dns, listen: &[IpAddr], pid_file: &Path) -> Vec<String> {
    let mut args = vec![
        "--keep-in-foreground".to_owned(),
        // Log to stderr (the process's log file); the reload wait below reads it.
        "--log-facility=-".to_owned(),
        "--conf-file=/dev/null".to_owned(),
        "--no-resolv".to_owned(),
        "--no-hosts".to_owned(),
        "--no-poll".to_owned(),
        // Every domain is local: unknown names are NXDOMAIN, nothing is ever forwarded.
        "--local=/#/".to_owned(),
        format!("--addn-hosts={}", dns.hosts_file.display()),
        format!("--local-ttl={}", dns.ttl),
        "--port=53".to_owned(),
        "--bind-interfaces".to_owned(),
        // Stay root: the hosts file lives in the testbed's private temp dir.
        "--user=root".to_owned(),
        format!("--pid-file={}", pid_file.display()),
    ];
    for addr in listen {
        args.push(format!("--listen-address={addr}"));
    }
    args
}

/// How many times dnsmasq has logged reading the hosts file (once at start, once per SIGHUP).
fn reads(process: &Process, hosts_file: &Path) -> usize {
    let needle = format!("read {}", hosts_file.display());
    process.stderr().matches(&needle).count()
}

/// Waits until `process` has read the hosts file more than `before` times.
pub(crate) fn wait_read(process: &Process, hosts_file: &Path, before: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + DNS_READY;
    loop {
        if reads(process, hosts_file) > before {
            return Ok(());
        }
        if let Some(status) = process.try_wait()? {
            bail!(
                "dnsmasq ({}) exited with {status}: {}",
                process.label(),
                tail(&process.stderr(), 2000)
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "dnsmasq ({}) did not read {} within {DNS_READY:?}: {}",
                process.label(),
                hosts_file.display(),
                tail(&process.stderr(), 2000)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends SIGHUP and waits until dnsmasq has re-read the hosts file. Queries after this see the
/// new records (dnsmasq clears its cache on SIGHUP).
pub(crate) fn reload(process: &Process, hosts_file: &Path) -> anyhow::Result<()> {
    let before = reads(process, hosts_file);
    process.signal(libc::SIGHUP)?;
    wait_read(process, hosts_file, before)
}

/// A resolv.conf pointing at a node's DNS, with the Kubernetes search path for `namespace`
/// (none for the node itself).
pub(crate) fn resolv_conf(servers: &[IpAddr], namespace: Option<&str>) -> String {
    let mut text = String::new();
    for server in servers {
        let _ = writeln!(text, "nameserver {server}");
    }
    match namespace {
        Some(ns) => {
            let _ = writeln!(
                text,
                "search {ns}.svc.cluster.local svc.cluster.local cluster.local"
            );
        }
        None => text.push_str("search svc.cluster.local cluster.local\n"),
    }
    // As in Kubernetes; short timeouts keep a failing lookup bounded.
    text.push_str("options ndots:5 timeout:1 attempts:2\n");
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_file_lists_every_address() {
        let mut records = BTreeMap::new();
        records.insert(
            "color.app.svc.cluster.local".to_owned(),
            vec!["10.96.0.10".parse().unwrap(), "fd00:96::a".parse().unwrap()],
        );
        let text = hosts_text(&records);
        assert!(text.contains("10.96.0.10 color.app.svc.cluster.local\n"));
        assert!(text.contains("fd00:96::a color.app.svc.cluster.local\n"));
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("color.app.svc.cluster.local").is_ok());
        assert!(validate_name("bad..name").is_err());
        assert!(validate_name("has space").is_err());
        assert!(validate_name("").is_err());
    }

    #[test]
    fn resolv_conf_has_search_path() {
        let text = resolv_conf(&["10.244.1.1".parse().unwrap()], Some("app"));
        assert!(text.starts_with("nameserver 10.244.1.1\n"));
        assert!(text.contains("search app.svc.cluster.local svc.cluster.local cluster.local\n"));
    }
}
