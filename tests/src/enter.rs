//! Building a `Command` that runs inside a pod or node: in its cgroup, in a private mount
//! namespace with its resolv.conf bind-mounted over /etc/resolv.conf, and in its network
//! namespace. The child does this itself between fork and exec (`pre_exec`), so the pid the
//! caller sees is the program's own and nothing else is in between.
//!
//! Why not `ip netns exec`: it remounts /sys for the new netns, which hides the cgroup v2 and
//! bpffs mounts under /sys from the program (docs/architecture.md, "Platform facts"). Entering the netns with
//! setns(2) keeps every mount as it is.

use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::Command;

/// Where getaddrinfo reads its resolver configuration.
const ETC_RESOLV_CONF: &std::ffi::CStr = c"/etc/resolv.conf";

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes())
        .expect("BUG: testbed paths are built by the testbed and contain no NUL byte")
}

/// What a child does before exec. All strings are prepared before fork: after fork only
/// async-signal-safe system calls are allowed (no allocation, no locks).
struct Enter {
    netns: CString,
    cgroup_procs: Option<CString>,
    resolv_conf: CString,
}

impl Enter {
    /// Runs in the forked child, before exec.
    fn apply(&self) -> std::io::Result<()> {
        // 1. Join the cgroup first: the eBPF connect hooks key on it, and it must be in place
        //    before the program makes its first connection.
        if let Some(procs) = &self.cgroup_procs {
            // SAFETY: `procs` is a valid NUL-terminated path that outlives the call.
            let fd = unsafe { libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Writing "0" moves the writing process itself (cgroup-v2.rst, "cgroup.procs").
            // SAFETY: fd is open; the buffer is a 1-byte static.
            let written = unsafe { libc::write(fd, c"0".as_ptr().cast(), 1) };
            let err = std::io::Error::last_os_error();
            // SAFETY: fd is ours and open.
            unsafe { libc::close(fd) };
            if written != 1 {
                return Err(err);
            }
        }
        // 2. A private mount namespace, so the bind mount below is invisible to the host.
        // SAFETY: unshare has no memory-safety preconditions.
        if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: all pointers are valid NUL-terminated strings or null where allowed.
        let rc = unsafe {
            libc::mount(
                c"none".as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: as above.
        let rc = unsafe {
            libc::mount(
                self.resolv_conf.as_ptr(),
                ETC_RESOLV_CONF.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // 3. The network namespace, last.
        // SAFETY: `netns` is a valid NUL-terminated path.
        let fd = unsafe { libc::open(self.netns.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is an open netns file.
        let rc = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
        let err = std::io::Error::last_os_error();
        // SAFETY: fd is ours and open.
        unsafe { libc::close(fd) };
        if rc != 0 {
            return Err(err);
        }
        Ok(())
    }
}

/// A `Command` for `program` that enters `netns` (a /run/netns path), optionally joins the cgroup
/// directory `cgroup`, and sees `resolv_conf` as /etc/resolv.conf.
///
/// A failure in the child (say the netns is gone) surfaces as the `spawn()` error.
pub(crate) fn command(
    program: impl AsRef<OsStr>,
    netns: &Path,
    cgroup: Option<&Path>,
    resolv_conf: &Path,
) -> Command {
    let enter = Enter {
        netns: c_path(netns),
        cgroup_procs: cgroup.map(|c| c_path(&c.join("cgroup.procs"))),
        resolv_conf: c_path(resolv_conf),
    };
    let mut cmd = Command::new(program);
    // SAFETY: the closure runs between fork and exec; it only makes async-signal-safe system
    // calls (open, write, close, unshare, mount, setns) on strings allocated before the fork,
    // and builds io::Error from errno without allocating.
    unsafe {
        cmd.pre_exec(move || enter.apply());
    }
    cmd
}
