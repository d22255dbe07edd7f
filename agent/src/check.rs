//! `strait check`: a pre-flight run on a node (and in the DaemonSet's init container) that
//! tests each thing the agent needs rather than reading documentation about it: the kernel and
//! its BTF, a cgroup v2 hierarchy (also in hybrid layouts), bpffs, the agent's capabilities, the
//! eBPF programs themselves (loaded and attached in a scratch cgroup, then removed,
//! [`ebpf`]), the ports the agent listens on inside a pod's network namespace and the DNS
//! resolver ([`net`]), and the mesh file.
//!
//! Each check gives one line, `OK` or `FAIL` (or `SKIP` when the operator did not ask for it),
//! and every `FAIL` says what to do. docs/operations.md ("First five minutes") lists them.

mod ebpf;
mod net;

use std::fmt::Write as _;
use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::mesh;

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const CGROUP_SUPER_MAGIC: i64 = 0x0027_e0eb;
/// The oldest kernel strait supports (BPF links for cgroup programs, sk_lookup, sockmap
/// redirection with the helpers the programs call).
const MIN_KERNEL: (u32, u32) = (5, 15);
/// `CAP_SYS_ADMIN`: setns(2) into pods' network namespaces, and (kernel 5.8 and later) in place
/// of CAP_BPF and CAP_NET_ADMIN for loading and attaching the programs (deploy/daemonset.yaml).
const CAP_SYS_ADMIN: u32 = 21;
const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";

/// What to check, from the command line.
#[derive(Clone, Debug)]
pub struct Options {
    /// The cgroup v2 directory the agent will attach to (as given to `strait run`).
    pub cgroup_root: PathBuf,
    /// The agent's bpffs folder (as given to `strait run`).
    pub bpffs: PathBuf,
    /// The mesh file or folder; `None` skips that check.
    pub mesh: Option<PathBuf>,
    /// The resolver to query; `None` takes the first `nameserver` of `resolv_conf`.
    pub dns_server: Option<SocketAddr>,
    /// Where the resolver is found when `dns_server` is `None`.
    pub resolv_conf: PathBuf,
    /// The name queried (any answer, even NXDOMAIN, shows the resolver is reachable).
    pub dns_name: String,
    /// A pod's network namespace to test the ports in; `None` tests in a scratch one.
    pub pod_netns: Option<PathBuf>,
    /// The agent's outbound and inbound ports (`strait run --outbound-port/--inbound-port`).
    pub ports: Vec<u16>,
}

/// `strait check`'s command line.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// cgroup v2 directory the agent attaches to (`strait run --cgroup-root`); on hybrid
    /// hosts the default finds the v2 mount at /sys/fs/cgroup/unified.
    #[arg(long, default_value = "/sys/fs/cgroup")]
    pub cgroup_root: PathBuf,
    /// The agent's bpffs folder (`strait run --bpffs`).
    #[arg(long, default_value = "/sys/fs/bpf/strait")]
    pub bpffs: PathBuf,
    /// The mesh file or folder to read and validate (skipped without it).
    #[arg(long)]
    pub mesh: Option<PathBuf>,
    /// DNS server to query, `IP` or `IP:PORT` (default: the first nameserver of
    /// /etc/resolv.conf, as `strait run` uses).
    #[arg(long, value_parser = parse_dns_server)]
    pub dns_server: Option<SocketAddr>,
    /// The name queried; any answer, NXDOMAIN included, shows the resolver is reachable.
    #[arg(long, default_value = "kubernetes.default.svc.cluster.local")]
    pub dns_name: String,
    /// A pod's network namespace (e.g. /var/run/netns/NAME) to test the agent's ports in
    /// (default: a scratch one).
    #[arg(long)]
    pub pod_netns: Option<PathBuf>,
    /// The ports the agent listens on in each pod (`strait run --outbound-port` and
    /// `--inbound-port`).
    #[arg(long, value_delimiter = ',', default_values_t = [15001, 15006])]
    pub ports: Vec<u16>,
    /// One JSON object instead of lines, for automation.
    #[arg(long)]
    pub json: bool,
}

fn parse_dns_server(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| {
            s.parse::<std::net::IpAddr>()
                .map(|ip| SocketAddr::new(ip, 53))
        })
        .map_err(|_| format!("`{s}`: expected an IP address or IP:PORT"))
}

/// Runs `strait check`: prints the report; exit code 1 when a check failed.
pub fn main(args: Args) -> std::process::ExitCode {
    let options = Options {
        cgroup_root: args.cgroup_root,
        bpffs: args.bpffs,
        mesh: args.mesh,
        dns_server: args.dns_server,
        resolv_conf: PathBuf::from("/etc/resolv.conf"),
        dns_name: args.dns_name,
        pod_netns: args.pod_netns,
        ports: args.ports,
    };
    let outcomes = run(&options);
    if args.json {
        println!("{}", render_json(&outcomes));
    } else {
        print!("{}", render_text(&outcomes));
    }
    if passed(&outcomes) {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(1)
    }
}

/// The outcome of one check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Outcome {
    pub name: &'static str,
    pub status: Status,
    /// What was found (OK) or what went wrong (FAIL).
    pub detail: String,
    /// What to do about a FAIL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    Ok,
    Fail,
    Skip,
}

impl Outcome {
    fn ok(name: &'static str, detail: impl Into<String>) -> Self {
        Outcome {
            name,
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Outcome {
            name,
            status: Status::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn skip(name: &'static str, detail: impl Into<String>) -> Self {
        Outcome {
            name,
            status: Status::Skip,
            detail: detail.into(),
            fix: None,
        }
    }

    /// The line `strait check` prints: `OK   name: detail` or `FAIL name: detail; fix`.
    pub fn line(&self) -> String {
        let status = match self.status {
            Status::Ok => "OK  ",
            Status::Fail => "FAIL",
            Status::Skip => "SKIP",
        };
        match &self.fix {
            Some(fix) => format!("{status} {}: {}; {fix}", self.name, self.detail),
            None => format!("{status} {}: {}", self.name, self.detail),
        }
    }
}

/// Runs every check, in the order an operator fixes them.
pub fn run(options: &Options) -> Vec<Outcome> {
    let cgroup = check_cgroup(&options.cgroup_root);
    let bpffs = check_bpffs(&options.bpffs);
    let mut outcomes = vec![check_kernel(), check_btf()];
    let ebpf = match (&cgroup, &bpffs) {
        (Ok(root), Ok(())) => ebpf::check(root, &options.bpffs),
        _ => Outcome::fail(
            "ebpf",
            "not tried: it needs the cgroup and bpffs checks to pass",
            "fix those first",
        ),
    };
    outcomes.push(match cgroup {
        Ok(root) => {
            let hybrid = if root != options.cgroup_root {
                format!(
                    " (hybrid layout: cgroup v1 controllers at {})",
                    options.cgroup_root.display()
                )
            } else {
                String::new()
            };
            Outcome::ok("cgroup", format!("cgroup v2 at {}{hybrid}", root.display()))
        }
        Err(outcome) => outcome,
    });
    outcomes.push(match bpffs {
        Ok(()) => Outcome::ok("bpffs", format!("{} is on bpffs", options.bpffs.display())),
        Err(outcome) => outcome,
    });
    outcomes.push(check_capabilities());
    outcomes.push(ebpf);
    outcomes.push(net::check_ports(
        options.pod_netns.as_deref(),
        &options.ports,
    ));
    outcomes.push(net::check_dns(
        options.dns_server,
        &options.resolv_conf,
        &options.dns_name,
    ));
    outcomes.push(check_mesh(options.mesh.as_deref()));
    outcomes
}

/// The text report: one line per check.
pub fn render_text(outcomes: &[Outcome]) -> String {
    let mut text = String::new();
    for outcome in outcomes {
        let _ = writeln!(text, "{}", outcome.line());
    }
    text
}

/// The JSON report (`--json`): `{"ok": bool, "checks": [...]}`.
pub fn render_json(outcomes: &[Outcome]) -> String {
    serde_json::json!({ "ok": passed(outcomes), "checks": outcomes }).to_string()
}

/// No check failed.
pub fn passed(outcomes: &[Outcome]) -> bool {
    outcomes.iter().all(|o| o.status != Status::Fail)
}

fn check_kernel() -> Outcome {
    let release = kernel_release();
    let fix = "run strait on Linux 5.15 or later";
    match parse_version(&release) {
        Some(version) if version >= MIN_KERNEL => Ok(()),
        Some(_) => Err(format!("kernel {release} is older than 5.15")),
        None => Err(format!("cannot read the kernel version from `{release}`")),
    }
    .map_or_else(
        |detail| Outcome::fail("kernel", detail, fix),
        |()| Outcome::ok("kernel", format!("{release} (5.15 or later)")),
    )
}

fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|uts| uts.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn parse_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// BTF lets the kernel check the programs' types; strait's object is built against it.
fn check_btf() -> Outcome {
    let fix = "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (every major distribution's is)";
    let mut magic = [0u8; 2];
    match std::fs::File::open(BTF_PATH).and_then(|mut f| f.read_exact(&mut magic)) {
        // The BTF header starts with 0xeB9F in the kernel's byte order.
        Ok(()) if u16::from_ne_bytes(magic) == 0xeb9f => {
            Outcome::ok("btf", format!("{BTF_PATH} is the kernel's BTF"))
        }
        Ok(()) => Outcome::fail("btf", format!("{BTF_PATH} is not BTF"), fix),
        Err(e) => Outcome::fail("btf", format!("cannot read {BTF_PATH}: {e}"), fix),
    }
}

/// The cgroup v2 directory the agent would use: `root`, or `root/unified` on hybrid hosts.
fn check_cgroup(requested: &Path) -> Result<PathBuf, Outcome> {
    let root = crate::config::default_cgroup_root(requested.to_owned());
    let fix_v2 = "pass --cgroup-root the cgroup2 mount (`findmnt -t cgroup2`), or boot with \
                  systemd.unified_cgroup_hierarchy=1";
    match fs_magic(&root) {
        Ok(CGROUP2_SUPER_MAGIC) => Ok(root),
        Ok(CGROUP_SUPER_MAGIC) => Err(Outcome::fail(
            "cgroup",
            format!("{} is a cgroup v1 hierarchy", root.display()),
            fix_v2,
        )),
        Ok(_) if fs_magic(&root.join("unified")).ok() == Some(CGROUP2_SUPER_MAGIC) => {
            Err(Outcome::fail(
                "cgroup",
                format!(
                    "{} is not a cgroup v2 hierarchy (a hybrid layout)",
                    root.display()
                ),
                format!(
                    "pass --cgroup-root {} (its cgroup v2 mount)",
                    root.join("unified").display()
                ),
            ))
        }
        Ok(_) => Err(Outcome::fail(
            "cgroup",
            format!("{} is not a cgroup v2 hierarchy", root.display()),
            fix_v2,
        )),
        Err(e) => Err(Outcome::fail(
            "cgroup",
            format!("cannot read {}: {e}", root.display()),
            fix_v2,
        )),
    }
}

/// The bpffs folder, or its nearest existing parent, must be on bpffs (the agent creates it).
fn check_bpffs(folder: &Path) -> Result<(), Outcome> {
    let existing = folder
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    match fs_magic(existing) {
        Ok(BPF_FS_MAGIC) => Ok(()),
        _ => Err(Outcome::fail(
            "bpffs",
            format!("{} is not on a bpf filesystem", folder.display()),
            "mount one (`mount -t bpf bpf /sys/fs/bpf`) or pass --bpffs a folder on it",
        )),
    }
}

fn check_capabilities() -> Outcome {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok());
    match effective {
        Some(caps) if caps & (1 << CAP_SYS_ADMIN) != 0 => {
            Outcome::ok("capabilities", "CAP_SYS_ADMIN is effective")
        }
        Some(_) => Outcome::fail(
            "capabilities",
            "CAP_SYS_ADMIN is not effective (setns into pods' network namespaces, loading and \
             attaching the eBPF programs)",
            "run as root with CAP_SYS_ADMIN (in a container: securityContext.capabilities.add: \
             [SYS_ADMIN])",
        ),
        None => Outcome::fail(
            "capabilities",
            "cannot read CapEff from /proc/self/status",
            "mount /proc",
        ),
    }
}

fn check_mesh(path: Option<&Path>) -> Outcome {
    let Some(path) = path else {
        return Outcome::skip("mesh", "no --mesh given");
    };
    match mesh::load_paths(&[path.to_owned()], mesh::Options { check_files: true }) {
        Ok(loaded) => Outcome::ok(
            "mesh",
            format!(
                "{} is valid: {}",
                path.display(),
                mesh::summary(&loaded.config).replace('\n', "; ")
            ),
        ),
        Err(e) => Outcome::fail(
            "mesh",
            format!(
                "{}: {}",
                path.display(),
                crate::logging::Chain(&e).to_string().replace('\n', "; ")
            ),
            "fix the mesh (`strait validate` shows every error with its line)",
        ),
    }
}

/// `f_type` of the filesystem holding `path`.
fn fs_magic(path: &Path) -> std::io::Result<i64> {
    let stat = nix::sys::statfs::statfs(path).map_err(std::io::Error::from)?;
    Ok(stat.filesystem_type().0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(parse_version("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(parse_version("5.15.0-91-generic"), Some((5, 15)));
        assert_eq!(parse_version("garbage"), None);
        assert!(parse_version("5.4.0").unwrap() < MIN_KERNEL);
    }

    #[test]
    fn a_fail_line_says_what_to_do() {
        let outcome = Outcome::fail("bpffs", "/tmp is not on a bpf filesystem", "mount one");
        assert_eq!(
            outcome.line(),
            "FAIL bpffs: /tmp is not on a bpf filesystem; mount one"
        );
        assert!(!passed(&[outcome]));
        assert!(passed(&[Outcome::skip("mesh", "no --mesh given")]));
    }
}
