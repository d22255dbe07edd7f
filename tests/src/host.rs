//! Preflight checks of the machine the testbed runs on: root, the cgroup v2 mount, bpffs, and the
//! tools the testbed shells out to. Every failure says what is missing and how to get it; nothing
//! here is skipped silently (a missing feature is a failed test; docs/architecture.md, "Testbed rules").

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::process::run_ok;

/// The preferred cgroup v2 mount on hybrid hosts (v1 controllers beside it).
const CGROUP2_HYBRID: &str = "/sys/fs/cgroup/unified";
/// Where bpffs lives; the agent pins under it.
pub(crate) const BPFFS: &str = "/sys/fs/bpf";

/// What the preflight found.
pub(crate) struct Host {
    pub(crate) cgroup2: PathBuf,
}

/// One line of /proc/self/mountinfo, the two fields we need.
struct Mount {
    mount_point: PathBuf,
    fs_type: String,
}

fn mounts() -> anyhow::Result<Vec<Mount>> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").context("read /proc/self/mountinfo")?;
    Ok(text.lines().filter_map(parse_mountinfo_line).collect())
}

/// `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue`:
/// field 5 is the mount point, the first field after ` - ` is the file system type
/// (see proc(5)).
fn parse_mountinfo_line(line: &str) -> Option<Mount> {
    let (left, right) = line.split_once(" - ")?;
    let mount_point = left.split(' ').nth(4)?;
    let fs_type = right.split(' ').next()?;
    Some(Mount {
        mount_point: PathBuf::from(unescape_mountinfo(mount_point)),
        fs_type: fs_type.to_owned(),
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Picks the cgroup v2 mount: /sys/fs/cgroup/unified if it is one, else the first cgroup2 mount.
fn find_cgroup2(mounts: &[Mount]) -> Option<PathBuf> {
    let cg2: Vec<&Mount> = mounts.iter().filter(|m| m.fs_type == "cgroup2").collect();
    cg2.iter()
        .find(|m| m.mount_point == Path::new(CGROUP2_HYBRID))
        .or_else(|| cg2.first())
        .map(|m| m.mount_point.clone())
}

fn on_path(program: &str) -> bool {
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| {
        let candidate = dir.join(program);
        candidate.is_file()
    })
}

/// Runs every check and reports all that failed at once.
pub(crate) fn preflight() -> anyhow::Result<Host> {
    let mut missing = Vec::new();

    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        missing.push(format!(
            "the testbed needs root (network namespaces, cgroups, bpffs); running as uid {euid}: \
             run the end-to-end tests as root (CI does)"
        ));
    }
    for tool in ["ip", "dnsmasq"] {
        if !on_path(tool) {
            missing.push(format!(
                "`{tool}` is not on PATH: `cargo xtask setup` installs it (iproute2, dnsmasq-base)"
            ));
        }
    }
    let mounts = mounts()?;
    let cgroup2 = find_cgroup2(&mounts);
    if cgroup2.is_none() {
        missing.push(format!(
            "no cgroup v2 (cgroup2) mount in /proc/self/mountinfo; expected {CGROUP2_HYBRID} or \
             /sys/fs/cgroup: the eBPF connect hooks attach to a cgroup v2 directory"
        ));
    }
    if !missing.is_empty() {
        bail!("testbed preflight failed:\n  - {}", missing.join("\n  - "));
    }

    let has_bpffs = mounts
        .iter()
        .any(|m| m.fs_type == "bpf" && m.mount_point == Path::new(BPFFS));
    if !has_bpffs {
        if !Path::new(BPFFS).is_dir() {
            bail!("{BPFFS} does not exist; the kernel needs sysfs mounted and CONFIG_BPF_SYSCALL");
        }
        // The agent pins under it; it stays mounted after the testbed is gone, as on a real node.
        run_ok(
            Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]),
            Duration::from_secs(10),
        )
        .with_context(|| format!("mount bpffs at {BPFFS}"))?;
    }

    Ok(Host {
        cgroup2: cgroup2.expect("BUG: checked above"),
    })
}

/// Checks that a program exists, for tools only some tests need (curl, python3).
pub fn require_tool(program: impl AsRef<OsStr>) -> anyhow::Result<()> {
    let program = program.as_ref().to_string_lossy();
    if on_path(&program) {
        Ok(())
    } else {
        bail!("`{program}` is not on PATH: `cargo xtask setup` installs it")
    }
}

/// The Python interpreter that has grpcio (the gRPC tests' client and server), or a clear
/// failure.
pub fn python_with_grpcio() -> anyhow::Result<String> {
    let output = Command::new("python3")
        .args(["-c", "import grpc, sys; print(sys.executable)"])
        .output()
        .context("cannot run python3 (the gRPC test needs Python 3 with grpcio)")?;
    if !output.status.success() {
        bail!(
            "the gRPC test needs Python's grpcio (`cargo xtask setup` installs it): {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_and_prefers_unified() {
        let text = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 23 0:40 / /other\\040dir rw shared:5 - cgroup2 cgroup2 rw";
        let mounts: Vec<Mount> = text.lines().filter_map(parse_mountinfo_line).collect();
        assert_eq!(mounts.len(), 4);
        assert_eq!(mounts[3].mount_point, PathBuf::from("/other dir"));
        assert_eq!(
            find_cgroup2(&mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            find_cgroup2(&mounts[3..]),
            Some(PathBuf::from("/other dir"))
        );
        assert_eq!(find_cgroup2(&mounts[..2]), None);
    }
}
