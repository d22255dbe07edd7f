//! The fast path's loader half (the programs are `ebpf/src/fastpath.rs`): attaches
//! `strait_sockops_fastpath` at the node's cgroup root and at the agent's own cgroup,
//! attaches `strait_sk_msg_fastpath` to the SOCKHASH, and keeps the two address maps the
//! programs key by: the local pods' addresses with their netns cookies, and the agent's own
//! addresses with its netns cookie.
//!
//! Why the agent's own cgroup: the agent's sockets (the ones accepted on its in-pod listeners
//! and the ones it opens to local pods) belong to the agent's cgroup, and a cgroup sock_ops
//! program only runs for sockets below the cgroup it is attached to. In Kubernetes the agent
//! runs below the node's root; on the testbed (and under systemd) it may not.
//!
//! Restart safety: the sock_ops links are pinned (`link_sockops_fastpath`,
//! `link_sockops_fastpath_self`) and replaced like the others. The sk_msg program is attached
//! to the pinned SOCKHASH itself (a map attachment, not a link); it stays with the map, and a
//! new agent's attach replaces it. Turning the fast path off removes the sock_ops pins, so no
//! new socket enters the map; sockets already in it keep their fast path until they close.
//!
//! Which pods are local and enrolled is decided by the app, which calls
//! [`super::Redirect::set_fast_path_pod`].

use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    fs::{self, File},
    io,
    net::IpAddr,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray, SockHash},
    programs::{CgroupAttachMode, ProgramError, SkMsg, SockOps, links::FdLink},
};
use strait_ebpf as abi;

use super::{CGROUP2_SUPER_MAGIC, Error as RedirectError, NEXT_SUFFIX, eperm_in, fs_magic};

/// Pin name of the sock_ops link at the cgroup root.
pub(super) const LINK_ROOT: &str = "link_sockops_fastpath";
/// Pin name of the sock_ops link at the agent's own cgroup (when it is not below the root).
pub(super) const LINK_SELF: &str = "link_sockops_fastpath_self";

/// What can go wrong that is the fast path's own business.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot find the agent's own cgroup in /proc/self/cgroup (is cgroup v2 mounted?)")]
    OwnCgroup(#[source] io::Error),
    #[error("cannot list the agent's network addresses (getifaddrs)")]
    Addresses(#[source] io::Error),
    #[error(
        "cannot read the agent's network namespace cookie (SO_NETNS_COOKIE needs Linux >= 5.14)"
    )]
    NetnsCookie(#[source] io::Error),
}

/// The fast path's maps, and whether it is on.
pub(super) struct Maps {
    enabled: bool,
    pods: HashMap<MapData, abi::AddrKey, u64>,
    agent: HashMap<MapData, abi::AddrKey, u64>,
    counters: PerCpuArray<MapData, u64>,
}

/// The fast path's counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastPathCounters {
    pub hit: u64,
    pub miss: u64,
    pub tainted: u64,
    pub inserted: u64,
    pub insert_failed: u64,
}

/// Sock_ops links attached by [`attach`], to be pinned once everything else worked.
pub(super) struct Attached {
    links: Vec<(&'static str, FdLink)>,
}

/// Load and attach the fast path's programs (nothing is pinned yet).
pub(super) fn attach(
    ebpf: &mut Ebpf,
    cgroup_root_file: &File,
    cgroup_root: &Path,
) -> Result<Attached, RedirectError> {
    let mut links = Vec::with_capacity(2);
    let own = own_cgroup(cgroup_root)?;
    {
        let prog: &mut SockOps = program(ebpf, abi::PROG_SOCKOPS_FASTPATH)?
            .try_into()
            .map_err(|e| load_err(abi::PROG_SOCKOPS_FASTPATH, e))?;
        prog.load()
            .map_err(|e| load_err(abi::PROG_SOCKOPS_FASTPATH, e))?;
        let mut targets = vec![(LINK_ROOT, cgroup_root_file, cgroup_root.to_owned())];
        let own_file;
        if let Some(own) = &own {
            own_file = File::open(own).map_err(|source| RedirectError::CgroupNotFound {
                path: own.clone(),
                source,
            })?;
            targets.push((LINK_SELF, &own_file, own.clone()));
        }
        for (name, file, path) in targets {
            let id = prog
                .attach(file, CgroupAttachMode::Single)
                .map_err(|e| attach_err(abi::PROG_SOCKOPS_FASTPATH, &path, e))?;
            let link = prog
                .take_link(id)
                .map_err(|e| attach_err(abi::PROG_SOCKOPS_FASTPATH, &path, e))?;
            let link = FdLink::try_from(link).map_err(|e| {
                RedirectError::Bug(format!("BPF links are not supported by this kernel: {e}"))
            })?;
            links.push((name, link));
        }
    }
    let socks = ebpf
        .take_map(abi::MAP_FASTPATH_SOCKS)
        .ok_or_else(|| RedirectError::Bug("the fast path's SOCKHASH is missing".into()))?;
    let socks: SockHash<MapData, abi::FastKey> = SockHash::try_from(socks)
        .map_err(|e| RedirectError::map("open", abi::MAP_FASTPATH_SOCKS, e))?;
    let prog: &mut SkMsg = program(ebpf, abi::PROG_SK_MSG_FASTPATH)?
        .try_into()
        .map_err(|e| load_err(abi::PROG_SK_MSG_FASTPATH, e))?;
    prog.load()
        .map_err(|e| load_err(abi::PROG_SK_MSG_FASTPATH, e))?;
    let id = prog.attach(socks.fd()).map_err(|e| {
        attach_err(
            abi::PROG_SK_MSG_FASTPATH,
            Path::new(abi::MAP_FASTPATH_SOCKS),
            e,
        )
    })?;
    let link = prog.take_link(id).map_err(|e| {
        attach_err(
            abi::PROG_SK_MSG_FASTPATH,
            Path::new(abi::MAP_FASTPATH_SOCKS),
            e,
        )
    })?;
    // A map attachment lives as long as the (pinned) map, unless the link object detaches it
    // on drop (aya 0.14 does): keep it attached past this process (module docs).
    std::mem::forget(link);
    Ok(Attached { links })
}

fn program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::programs::Program, RedirectError> {
    ebpf.program_mut(name)
        .ok_or_else(|| RedirectError::Bug(format!("program {name} missing from the eBPF object")))
}

fn load_err(program: &'static str, source: ProgramError) -> RedirectError {
    match eperm_in(&source) {
        Some(io) => RedirectError::PermissionDenied {
            step: format!("load program {program}"),
            source: io,
        },
        None => RedirectError::LoadProgram { program, source },
    }
}

fn attach_err(program: &'static str, target: &Path, source: ProgramError) -> RedirectError {
    match eperm_in(&source) {
        Some(io) => RedirectError::PermissionDenied {
            step: format!("attach {program} to {}", target.display()),
            source: io,
        },
        None => RedirectError::Attach {
            program,
            cgroup: target.to_owned(),
            source,
        },
    }
}

/// Pin the sock_ops links (replacing a previous agent's) and remove a stale `_self` pin.
pub(super) fn pin(folder: &Path, attached: Attached) -> Result<(), RedirectError> {
    let mut pinned = Vec::new();
    for (name, link) in attached.links {
        let last = folder.join(name);
        let next = folder.join(format!("{name}{NEXT_SUFFIX}"));
        let _ = fs::remove_file(&next);
        link.pin(&next).map_err(|source| RedirectError::PinLink {
            program: abi::PROG_SOCKOPS_FASTPATH,
            path: next.clone(),
            source,
        })?;
        fs::rename(&next, &last).map_err(|source| {
            let _ = fs::remove_file(&next);
            RedirectError::ReplaceLink {
                path: last.clone(),
                source,
            }
        })?;
        pinned.push(name);
    }
    for name in [LINK_ROOT, LINK_SELF] {
        if !pinned.contains(&name) {
            let _ = fs::remove_file(folder.join(name));
        }
    }
    Ok(())
}

/// Fast path off: detach a previous agent's sock_ops programs by removing their pins.
pub(super) fn unpin(folder: &Path) {
    for name in [LINK_ROOT, LINK_SELF] {
        let path = folder.join(name);
        if fs::remove_file(&path).is_ok() {
            tracing::info!(pin = %path.display(), "fast path off: detached the fast path's sock_ops program");
        }
    }
}

/// The agent's own cgroup v2 directory, if it is not below `cgroup_root` (then the root's
/// attachment already covers it).
fn own_cgroup(cgroup_root: &Path) -> Result<Option<PathBuf>, Error> {
    let text = fs::read_to_string("/proc/self/cgroup").map_err(Error::OwnCgroup)?;
    let relative = text
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .ok_or_else(|| Error::OwnCgroup(io::Error::other("no cgroup v2 line")))?;
    // The cgroup2 mount: the topmost ancestor of the root that is still on cgroup2.
    let mount = cgroup_root
        .ancestors()
        .take_while(|p| fs_magic(p).ok() == Some(CGROUP2_SUPER_MAGIC))
        .last()
        .ok_or_else(|| Error::OwnCgroup(io::Error::other("the cgroup root is not on cgroup2")))?;
    let own = mount.join(relative.trim_start_matches('/'));
    if own.starts_with(cgroup_root) || !own.is_dir() {
        return Ok(None);
    }
    Ok(Some(own))
}

/// Open the fast path's maps and, when it is on, publish the agent's addresses.
pub(super) fn take_maps(ebpf: &mut Ebpf, enabled: bool) -> Result<Maps, RedirectError> {
    fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
        ebpf: &mut Ebpf,
        name: &'static str,
    ) -> Result<T, RedirectError> {
        let map = ebpf.take_map(name).ok_or_else(|| {
            RedirectError::Bug(format!("map {name} missing from the eBPF object"))
        })?;
        T::try_from(map).map_err(|e| RedirectError::map("open", name, e))
    }
    let mut maps = Maps {
        enabled,
        pods: take(ebpf, abi::MAP_FASTPATH_PODS)?,
        agent: take(ebpf, abi::MAP_FASTPATH_AGENT)?,
        counters: take(ebpf, abi::MAP_FASTPATH_COUNTERS)?,
    };
    let want = if enabled {
        agent_addresses()?
    } else {
        BTreeMap::new()
    };
    sync(&mut maps.agent, abi::MAP_FASTPATH_AGENT, &want)?;
    if !enabled {
        sync(&mut maps.pods, abi::MAP_FASTPATH_PODS, &BTreeMap::new())?;
    }
    Ok(maps)
}

impl Maps {
    pub(super) fn enabled(&self) -> bool {
        self.enabled
    }

    /// Add (`Some(netns cookie)`) or remove (`None`) a local pod's addresses.
    pub(super) fn set_pod(
        &mut self,
        ips: &[IpAddr],
        netns_cookie: Option<u64>,
    ) -> Result<(), RedirectError> {
        if !self.enabled {
            return Ok(());
        }
        for ip in ips {
            let key = addr_key(*ip);
            match netns_cookie {
                Some(cookie) => self
                    .pods
                    .insert(key, cookie, 0)
                    .map_err(|e| RedirectError::map("insert into", abi::MAP_FASTPATH_PODS, e))?,
                None => {
                    super::remove_entry(&mut self.pods, &key, abi::MAP_FASTPATH_PODS)?;
                }
            }
        }
        Ok(())
    }

    pub(super) fn counters(&self) -> Result<FastPathCounters, RedirectError> {
        let read = |index| super::sum_counter(&self.counters, abi::MAP_FASTPATH_COUNTERS, index);
        Ok(FastPathCounters {
            hit: read(abi::FASTPATH_COUNTER_HIT)?,
            miss: read(abi::FASTPATH_COUNTER_MISS)?,
            tainted: read(abi::FASTPATH_COUNTER_TAINTED)?,
            inserted: read(abi::FASTPATH_COUNTER_INSERTED)?,
            insert_failed: read(abi::FASTPATH_COUNTER_INSERT_FAILED)?,
        })
    }
}

/// Address map contents, ordered by (family, address words).
type AddrSet = BTreeMap<(u16, [u32; 4]), (abi::AddrKey, u64)>;

/// Make an address map hold exactly `want`.
fn sync(
    map: &mut HashMap<MapData, abi::AddrKey, u64>,
    name: &'static str,
    want: &AddrSet,
) -> Result<(), RedirectError> {
    let mut have = StdHashMap::new();
    for entry in map.iter() {
        let (k, v) = entry.map_err(|e| RedirectError::map("read", name, e))?;
        have.insert((k.family, k.addr), (k, v));
    }
    for (o, (k, v)) in want {
        if have.get(o).is_none_or(|(_, old)| old != v) {
            map.insert(k, v, 0)
                .map_err(|e| RedirectError::map("insert into", name, e))?;
        }
    }
    for (o, (k, _)) in &have {
        if !want.contains_key(o) {
            super::remove_entry(map, k, name)?;
        }
    }
    Ok(())
}

pub(super) fn addr_key(ip: IpAddr) -> abi::AddrKey {
    match ip.to_canonical() {
        IpAddr::V4(ip) => abi::AddrKey::v4(abi::ipv4_raw(ip.octets())),
        IpAddr::V6(ip) => abi::AddrKey::v6(abi::ipv6_raw(ip.octets())),
    }
}

/// The agent's non-loopback addresses, each with the agent's netns cookie.
fn agent_addresses() -> Result<AddrSet, RedirectError> {
    let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)
        .map_err(Error::NetnsCookie)?;
    let cookie = super::socket_netns_cookie(probe.as_fd()).map_err(Error::NetnsCookie)?;
    let mut out = BTreeMap::new();
    for ip in interface_addresses().map_err(Error::Addresses)? {
        if ip.is_loopback() {
            continue;
        }
        let key = addr_key(ip);
        out.insert((key.family, key.addr), (key, cookie));
    }
    Ok(out)
}

/// Every address of every interface in this network namespace.
fn interface_addresses() -> io::Result<Vec<IpAddr>> {
    let addresses = nix::ifaddrs::getifaddrs().map_err(io::Error::from)?;
    Ok(addresses
        .filter_map(|interface| interface.address)
        .filter_map(|addr| {
            addr.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_addresses_key_as_ipv4() {
        let v4: IpAddr = "10.244.1.3".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.244.1.3".parse().unwrap();
        assert_eq!(addr_key(v4), addr_key(mapped));
        assert_eq!(addr_key(v4).family, abi::FAMILY_V4);
        let v6: IpAddr = "fd00:244:1::3".parse().unwrap();
        assert_eq!(addr_key(v6).family, abi::FAMILY_V6);
    }

    #[test]
    fn this_namespace_has_addresses() {
        let addrs = interface_addresses().unwrap();
        assert!(addrs.iter().any(|a| a.is_loopback()), "{addrs:?}");
    }
}
