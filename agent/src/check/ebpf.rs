//! The eBPF check: loads the agent's own eBPF object (every program in it, so every program
//! type and helper the agent uses is verified by this kernel) with its maps pinned in a scratch
//! bpffs folder, attaches each program where the agent would (cgroup programs to a scratch
//! cgroup below the cgroup root, the sk_msg program to its sockhash, the sk_lookup program to a
//! scratch network namespace), then removes all of it. Nothing the running agent uses is
//! touched.

use std::fs::{self, File};
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};

use aya::programs::{CgroupAttachMode, Program};
use aya::{Ebpf, EbpfLoader, maps::SockHash};
use strait_ebpf as abi;

use super::Outcome;
use crate::redirect;

const NAME: &str = "ebpf";

/// What the check made, removed on drop (also when a step failed).
struct Scratch {
    cgroup: PathBuf,
    pins: PathBuf,
    /// The agent's bpffs folder, when the check created it.
    created_bpffs: Option<PathBuf>,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Ok(entries) = fs::read_dir(&self.pins) {
            for entry in entries.flatten() {
                let _ = fs::remove_file(entry.path());
            }
        }
        let _ = fs::remove_dir(&self.pins);
        if let Some(folder) = &self.created_bpffs {
            let _ = fs::remove_dir(folder);
        }
        let _ = fs::remove_dir(&self.cgroup);
    }
}

pub(super) fn check(cgroup_root: &Path, bpffs: &Path) -> Outcome {
    let object = redirect::embedded_object();
    if object.is_empty() {
        return Outcome::fail(
            NAME,
            "this strait binary was built without its eBPF object",
            "build it after `cargo xtask build-ebpf` (not with STRAIT_EBPF_SKIP=1)",
        );
    }
    let pid = std::process::id();
    let mut scratch = Scratch {
        cgroup: cgroup_root.join(format!("strait-check-{pid}")),
        pins: bpffs.join(format!("check-{pid}")),
        created_bpffs: None,
    };
    match load_and_attach(object, &mut scratch) {
        Ok(Done {
            ebpf,
            _socks,
            programs,
        }) => {
            // Everything attached is detached as the links drop, before the scratch cgroup
            // and pins go.
            drop(ebpf);
            drop(_socks);
            drop(scratch);
            Outcome::ok(
                NAME,
                format!(
                    "loaded and attached {} programs ({}) in a scratch cgroup and network \
                     namespace, then removed them",
                    programs.len(),
                    programs.join(", ")
                ),
            )
        }
        Err((detail, fix)) => Outcome::fail(NAME, detail, fix),
    }
}

/// Fields drop in order: the programs (detaching their links) before the sockhash.
struct Done {
    ebpf: Ebpf,
    _socks: SockHash<aya::maps::MapData, abi::FastKey>,
    programs: Vec<String>,
}

type Failure = (String, &'static str);

const FIX_PERM: &str = "run as root with CAP_SYS_ADMIN (or CAP_BPF and CAP_NET_ADMIN), \
                        without a seccomp or AppArmor profile that blocks bpf(2)";
const FIX_KERNEL: &str = "use a kernel of 5.15 or later with BPF, BPF_SYSCALL, CGROUP_BPF, \
                          BPF_STREAM_PARSER and NET_SOCK_MSG enabled";

fn load_and_attach(object: &[u8], scratch: &mut Scratch) -> Result<Done, Failure> {
    if !scratch.pins.parent().is_some_and(Path::exists) {
        let folder = scratch.pins.parent().unwrap_or(Path::new("/")).to_owned();
        fs::create_dir(&folder).map_err(|e| {
            (
                format!("cannot create the bpffs folder {}: {e}", folder.display()),
                FIX_PERM,
            )
        })?;
        scratch.created_bpffs = Some(folder);
    }
    fs::create_dir(&scratch.pins).map_err(|e| {
        (
            format!("cannot create {}: {e}", scratch.pins.display()),
            FIX_PERM,
        )
    })?;
    fs::create_dir(&scratch.cgroup).map_err(|e| {
        (
            format!(
                "cannot create the scratch cgroup {}: {e}",
                scratch.cgroup.display()
            ),
            "run as root, with the cgroup root mounted read-write",
        )
    })?;
    let cgroup = File::open(&scratch.cgroup).map_err(|e| {
        (
            format!("cannot open {}: {e}", scratch.cgroup.display()),
            FIX_PERM,
        )
    })?;
    let netns = super::net::scratch_netns().map_err(|e| {
        (
            format!("cannot make a scratch network namespace: {e}"),
            FIX_PERM,
        )
    })?;
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(&scratch.pins)
        .load(object)
        .map_err(|e| {
            (
                format!("cannot load strait's eBPF maps and programs: {}", chain(&e)),
                fix_for(&e),
            )
        })?;
    let socks = ebpf
        .take_map(abi::MAP_FASTPATH_SOCKS)
        .ok_or_else(|| (format!("BUG: map {} missing", abi::MAP_FASTPATH_SOCKS), ""))?;
    let socks: SockHash<_, abi::FastKey> = SockHash::try_from(socks).map_err(|e| {
        (
            format!("cannot open {}: {}", abi::MAP_FASTPATH_SOCKS, chain(&e)),
            FIX_KERNEL,
        )
    })?;
    let mut names: Vec<String> = ebpf.programs().map(|(n, _)| n.to_owned()).collect();
    names.sort();
    let mut programs = Vec::with_capacity(names.len());
    for name in names {
        let program = ebpf
            .program_mut(&name)
            .ok_or_else(|| (format!("BUG: program {name} missing"), ""))?;
        let kind = attach_one(program, &cgroup, &netns, &socks)
            .map_err(|(e, fix)| (format!("{name}: {e}"), fix))?;
        programs.push(format!("{kind} {name}"));
    }
    Ok(Done {
        ebpf,
        _socks: socks,
        programs,
    })
}

/// Loads and attaches one program; its kind on success. Links stay owned by the program (they
/// detach when `Ebpf` drops).
fn attach_one(
    program: &mut Program,
    cgroup: &File,
    netns: &File,
    socks: &SockHash<aya::maps::MapData, abi::FastKey>,
) -> Result<&'static str, Failure> {
    let load = |e: aya::programs::ProgramError| (format!("load: {}", chain(&e)), fix_for(&e));
    let attach = |e: aya::programs::ProgramError| (format!("attach: {}", chain(&e)), fix_for(&e));
    match program {
        Program::CgroupSockAddr(p) => {
            p.load().map_err(load)?;
            p.attach(cgroup, CgroupAttachMode::Single).map_err(attach)?;
            Ok("cgroup_sock_addr")
        }
        Program::SockOps(p) => {
            p.load().map_err(load)?;
            p.attach(cgroup, CgroupAttachMode::Single).map_err(attach)?;
            Ok("sock_ops")
        }
        Program::SkMsg(p) => {
            p.load().map_err(load)?;
            p.attach(socks.fd()).map_err(attach)?;
            Ok("sk_msg")
        }
        Program::SkLookup(p) => {
            p.load().map_err(load)?;
            p.attach(netns.as_fd()).map_err(attach)?;
            Ok("sk_lookup")
        }
        other => Err((
            format!("BUG: program type {:?} is not checked", other.prog_type()),
            "",
        )),
    }
}

fn fix_for(error: &(dyn std::error::Error + 'static)) -> &'static str {
    let mut source = Some(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && matches!(io.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES))
        {
            return FIX_PERM;
        }
        source = e.source();
    }
    FIX_KERNEL
}

/// An error with its sources, on one line (the verifier log is cut to its last line).
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text.lines()
        .rfind(|l| !l.trim().is_empty())
        .map(|last| {
            let first = text.lines().next().unwrap_or_default();
            if first == last {
                first.to_owned()
            } else {
                format!("{first} ... {last}")
            }
        })
        .unwrap_or_default()
}
