//! The only agent code that talks to eBPF: loads strait's programs (embedded
//! from `strait-ebpf`), attaches them at the node's cgroup root, pins links and
//! maps under one bpffs folder, and reads and writes the maps.
//!
//! What the programs do (see `ebpf/src/capture.rs`): `strait_connect4`/`6` capture
//! TCP connects from enrolled cgroups to service addresses (rewriting them to
//! the pod's outbound listener on loopback, and remembering the original
//! destination) and enforce egress DROP_ALL; `strait_sockops` re-keys the
//! original destination to (netns cookie, client address) so that
//! [`Redirect::take_original_destination`] finds it from an accepted socket.
//!
//! Restart safety. Everything lives under [`RedirectConfig::bpffs`]: maps pinned
//! by name (`STRAIT_*_V<n>`) and one pinned link per program (`link_*`).
//! Dropping a [`Redirect`] leaves all of it in place, so connects stay captured
//! while the agent is down. [`Redirect::install`] adopts the pinned maps (their
//! contents survive) and **replaces** the links: it attaches the freshly loaded
//! programs next to the old ones, pins the new links under temporary names,
//! then `rename(2)`s them over the old pins. The rename is atomic and drops the
//! last reference to the old link, which detaches it; while both are attached
//! both run the same logic on the same maps, so no connect goes uncaptured.
//! (A connect in that instant may count one spurious `lookup_miss`.) Until the
//! renames, a failure detaches everything this call attached and leaves the
//! previous agent's links untouched. [`uninstall`] removes the folder, which
//! detaches the programs.
//!
//! Which cgroups are enrolled, which services exist and which ports the
//! outbound listeners use is decided elsewhere (`workloads`, `mesh`, `proxy`).

mod fastpath;
pub mod inpod;
mod keys;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap},
    fs::{self, File},
    io,
    net::{IpAddr, SocketAddr},
    os::{
        fd::{AsRawFd as _, BorrowedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, MapInfo, MapType, PerCpuArray},
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, SockOps,
        links::{FdLink, LinkError},
    },
};
use strait_ebpf as abi;

pub use self::fastpath::{Error as FastPathError, FastPathCounters};
use self::keys::ServiceKey;

/// The eBPF object built by `cargo xtask build-ebpf` (found by `build.rs`); empty in a build
/// made with `STRAIT_EBPF_SKIP=1`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("STRAIT_EBPF_OBJECT"));

/// The embedded eBPF object, for checks that read it without loading it.
pub fn embedded_object() -> &'static [u8] {
    OBJECT
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// `SO_NETNS_COOKIE` (not in every libc release).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Pin name of each program's link; `_next` is appended while replacing.
const LINKS: [(&str, &str); 3] = [
    (abi::PROG_CONNECT4, "link_connect4"),
    (abi::PROG_CONNECT6, "link_connect6"),
    (abi::PROG_SOCKOPS, "link_sockops"),
];
const NEXT_SUFFIX: &str = "_next";

/// Where to attach and where to pin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedirectConfig {
    /// The cgroup v2 directory whose descendants are steered (the node's root,
    /// e.g. `/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hybrid hosts).
    pub cgroup_root: PathBuf,
    /// The agent's folder on bpffs, e.g. `/sys/fs/bpf/strait`. Created if missing.
    pub bpffs: PathBuf,
    /// Attach the fast path (sockmap redirection of the agent's local legs, see
    /// `redirect/fastpath.rs`); off detaches a previous agent's.
    pub fast_path: bool,
    /// Most captured outbound connections one pod network namespace may have open at once;
    /// connects past it are refused (EPERM) and counted as `pod_connection_limit`. Bounds
    /// each pod's share of the node-wide original-destination maps.
    pub max_pod_connections: u32,
}

/// How an enrolled pod's connects are treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnrolledPod {
    /// The pod's outbound listener port on loopback (host order).
    pub outbound_port: u16,
    /// App Mesh `egressFilter.type: DROP_ALL`: refuse connects to non-mesh,
    /// non-loopback destinations (the caller sees EPERM).
    pub egress_drop_all: bool,
    /// The agent's id for the workload.
    pub workload_id: u32,
}

/// Where a captured connection was meant to go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OriginalDestination {
    pub addr: SocketAddr,
    pub service_id: u32,
}

/// What [`Redirect::take_original_destination`] found for an accepted connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Taken {
    /// The connection's original destination (the entry is deleted).
    Found(OriginalDestination),
    /// No entry for the connection: it was not captured, or the entry was lost.
    Missing,
    /// The entry was recorded for a connect steered to another outbound listener
    /// (`expected`): the connection reuses the client port of another workload's captured
    /// connect (SO_REUSEADDR / SO_REUSEPORT in a shared network namespace) to be taken for
    /// the workload whose listener it reached. Refused; the entry is left for its owner.
    OtherListener { expected: u16 },
}

/// eBPF outcome counters, summed over CPUs, since the maps were first created
/// (they survive agent restarts).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Connects rewritten to an outbound listener.
    pub captured: u64,
    /// Connects from enrolled pods to non-service destinations, let through.
    pub passed: u64,
    /// Connects refused by egress DROP_ALL.
    pub denied: u64,
    /// Connects from cgroups that are not enrolled.
    pub not_enrolled: u64,
    /// Original destinations re-keyed for the agent at TCP connect.
    pub rekeyed: u64,
    /// Connects to an outbound listener port without an original destination.
    pub lookup_miss: u64,
    /// Connects refused because the original destination could not be stored.
    pub capture_failed: u64,
    /// Original destinations lost because the re-keyed entry could not be stored.
    pub rekey_failed: u64,
    /// Connects refused because the pod had its limit of captured connections open.
    pub pod_connection_limit: u64,
    /// Connections refused because their original destination was recorded for another
    /// workload's outbound listener (see [`Taken::OtherListener`]); counted by the agent,
    /// since it started.
    pub other_listener: u64,
    /// Fast path: sends and sockets, see [`FastPathCounters`].
    pub fast_path: FastPathCounters,
}

impl Counters {
    /// (reason, value) pairs, for metrics with a bounded `reason` label.
    pub fn by_reason(&self) -> [(&'static str, u64); 15] {
        let ebpf = [
            self.captured,
            self.passed,
            self.denied,
            self.not_enrolled,
            self.rekeyed,
            self.lookup_miss,
            self.capture_failed,
            self.rekey_failed,
            self.pod_connection_limit,
        ];
        let fast = [
            self.fast_path.hit,
            self.fast_path.miss,
            self.fast_path.tainted,
            self.fast_path.inserted,
            self.fast_path.insert_failed,
        ];
        let mut all = [("", 0); 15];
        let names = abi::COUNTER_NAMES
            .into_iter()
            .zip(ebpf)
            .chain([("other_listener", self.other_listener)])
            .chain(abi::FASTPATH_COUNTER_NAMES.into_iter().zip(fast));
        for (slot, pair) in all.iter_mut().zip(names) {
            *slot = pair;
        }
        all
    }
}

/// What [`uninstall`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UninstallReport {
    /// Whether the folder existed at all.
    pub folder_existed: bool,
    /// Pins removed (links first), then the folder itself.
    pub removed: Vec<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{path} is not on a bpffs mount: mount one with `mount -t bpf bpf /sys/fs/bpf` \
         (in a container, mount the host's /sys/fs/bpf), or choose a folder under a bpffs"
    )]
    BpffsNotMounted { path: PathBuf },
    #[error(
        "refusing to remove {path}: it is not on a bpffs mount, so it is not strait's pin folder"
    )]
    NotBpffs { path: PathBuf },
    #[error("cannot create the pin folder {path}")]
    CreatePinFolder {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cgroup {path} not found: check the cgroup root setting (cgroup v2 is mounted at \
         /sys/fs/cgroup, or /sys/fs/cgroup/unified on hosts in hybrid mode)"
    )]
    CgroupNotFound {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} is not a cgroup v2 directory: strait needs the cgroup2 hierarchy \
         (/sys/fs/cgroup, or /sys/fs/cgroup/unified on hosts in hybrid mode)"
    )]
    NotCgroup2 { path: PathBuf },
    #[error(
        "cgroup {path} is at level {level} of the cgroup v2 hierarchy: a pod's cgroup must be \
         below the root and at most {max} levels deep (Kubernetes pod cgroups are at level 3)",
        max = abi::MAX_CGROUP_DEPTH
    )]
    CgroupLevel { path: PathBuf, level: usize },
    #[error(
        "permission denied while trying to {step}: run the agent as root, or with CAP_BPF, \
         CAP_NET_ADMIN and CAP_SYS_ADMIN"
    )]
    PermissionDenied {
        step: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "this strait binary was built without its eBPF programs (STRAIT_EBPF_SKIP=1): build it \
         with `cargo xtask build-ebpf` and then `cargo build`"
    )]
    NoObject,
    #[error(
        "--max-pod-connections {limit} is out of range: give 1 to {MAX_POD_CONNECTIONS} \
         (half the node's {} pending-connection entries, so no pod can fill them)",
        abi::MAX_PENDING_CONNECTIONS
    )]
    PodConnectionLimit { limit: u32 },
    #[error("the kernel refused strait's eBPF object (needs Linux >= 5.15 with BTF and cgroup v2)")]
    Load(#[source] aya::EbpfError),
    #[error("cannot load program {program} (the verifier's output follows)")]
    LoadProgram {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error(
        "the pinned map {path} does not have the layout this agent expects ({detail}); \
         it was left by an incompatible strait: run `strait uninstall` to remove the old pins, then restart"
    )]
    IncompatiblePin { path: PathBuf, detail: String },
    #[error("cannot attach {program} to cgroup {cgroup}")]
    Attach {
        program: &'static str,
        cgroup: PathBuf,
        #[source]
        source: ProgramError,
    },
    #[error("cannot pin the link of {program} at {path}")]
    PinLink {
        program: &'static str,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error(
        "cannot replace the pinned link {path} (the new programs are attached beside the old ones)"
    )]
    ReplaceLink {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot {op} map {map}")]
    Map {
        op: &'static str,
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("cannot remove {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    FastPath(#[from] fastpath::Error),
    #[error("BUG: {0}")]
    Bug(String),
}

impl Error {
    fn map(op: &'static str, map: &'static str, source: MapError) -> Self {
        match eperm_in(&source) {
            Some(source) => Error::PermissionDenied {
                step: format!("{op} map {map}"),
                source,
            },
            None => Error::Map { op, map, source },
        }
    }

    fn link(op: &str, source: LinkError) -> Self {
        Error::Bug(format!("{op}: {source}"))
    }
}

/// The EPERM in an error's chain, if any: the caller lacks privileges. (EACCES
/// is not it: the verifier uses EACCES for rejected programs.)
fn eperm_in(err: &(dyn std::error::Error + 'static)) -> Option<io::Error> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>()
            && io.raw_os_error() == Some(libc::EPERM)
        {
            return Some(io::Error::from_raw_os_error(libc::EPERM));
        }
        cur = e.source();
    }
    None
}

/// Highest `--max-pod-connections`: half the pending-connection map, so one pod can never
/// hold more than half of the entries every other pod's connects need.
pub const MAX_POD_CONNECTIONS: u32 = abi::MAX_PENDING_CONNECTIONS / 2;

/// strait's maps, opened from the pins.
struct Maps {
    enrolled: HashMap<MapData, u64, abi::EnrolledPod>,
    services4: HashMap<MapData, abi::ServiceKey4, abi::ServiceValue>,
    services6: HashMap<MapData, abi::ServiceKey6, abi::ServiceValue>,
    conn_orig_dst: HashMap<MapData, abi::ConnKey, abi::OrigDst>,
    outbound_ports: HashMap<MapData, u16, u32>,
    counters: PerCpuArray<MapData, u64>,
    limits: Array<MapData, u64>,
    /// Mirror of `enrolled` (this agent is its only writer): cgroup -> port,
    /// so that `outbound_ports` is kept without scanning the map.
    ports_by_cgroup: StdHashMap<u64, u16>,
    fast_path: fastpath::Maps,
}

/// strait's loaded and attached eBPF programs and their maps. Dropping it leaves
/// everything pinned and attached (see the module docs).
pub struct Redirect {
    bpffs: PathBuf,
    maps: Mutex<Maps>,
    /// Inbound capture and backend authorization (`redirect/inpod.rs`).
    inpod: inpod::InPod,
    /// See [`Counters::other_listener`].
    other_listener: AtomicU64,
}

impl std::fmt::Debug for Redirect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redirect")
            .field("bpffs", &self.bpffs)
            .finish_non_exhaustive()
    }
}

impl Redirect {
    /// Load the embedded object, create `bpffs` if needed, adopt the maps
    /// pinned there, attach the three programs at `cgroup_root` and pin their
    /// links, replacing the links of a previous agent (see the module docs).
    pub fn install(cfg: &RedirectConfig) -> Result<Redirect, Error> {
        if OBJECT.is_empty() {
            return Err(Error::NoObject);
        }
        if cfg.max_pod_connections == 0 || cfg.max_pod_connections > MAX_POD_CONNECTIONS {
            return Err(Error::PodConnectionLimit {
                limit: cfg.max_pod_connections,
            });
        }
        let cgroup = open_cgroup(&cfg.cgroup_root)?;
        prepare_pin_folder(&cfg.bpffs)?;
        check_pinned_maps(&cfg.bpffs)?;
        inpod::check_pinned_maps(&cfg.bpffs)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&cfg.bpffs)
            .load(OBJECT)
            .map_err(|e| match eperm_in(&e) {
                Some(source) => Error::PermissionDenied {
                    step: "load strait's eBPF maps and programs".into(),
                    source,
                },
                None => Error::Load(e),
            })?;

        // Attach all three before pinning any: on error the FdLinks drop and
        // detach, and the previous agent's pins are untouched.
        let mut attached = Vec::with_capacity(LINKS.len());
        for (program, _) in LINKS {
            attached.push((program, attach(&mut ebpf, program, &cgroup, cfg)?));
        }
        let fast = if cfg.fast_path {
            Some(fastpath::attach(&mut ebpf, &cgroup, &cfg.cgroup_root)?)
        } else {
            None
        };
        let mut maps = take_maps(&mut ebpf, cfg.fast_path)?;
        maps.limits
            .set(
                abi::LIMIT_POD_CONNECTIONS,
                u64::from(cfg.max_pod_connections),
                0,
            )
            .map_err(|e| Error::map("write", abi::MAP_LIMITS, e))?;
        let inpod = inpod::InPod::new(ebpf, &cfg.bpffs)?;

        pin_links(&cfg.bpffs, attached)?;
        match fast {
            Some(fast) => fastpath::pin(&cfg.bpffs, fast)?,
            None => fastpath::unpin(&cfg.bpffs),
        }
        remove_stale_map_pins(&cfg.bpffs);
        Ok(Redirect {
            bpffs: cfg.bpffs.clone(),
            maps: Mutex::new(maps),
            inpod,
            other_listener: AtomicU64::new(0),
        })
    }

    /// Inbound capture and backend authorization.
    pub fn inpod(&self) -> &inpod::InPod {
        &self.inpod
    }

    /// The pin folder this instance uses.
    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }

    fn maps(&self) -> MutexGuard<'_, Maps> {
        // The maps live in the kernel; a panic elsewhere cannot leave them half
        // updated in a way the next caller could not handle.
        self.maps.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Enroll a cgroup (insert or update).
    pub fn enroll(&self, cgroup_id: u64, pod: EnrolledPod) -> Result<(), Error> {
        let mut maps = self.maps();
        maps.enrolled
            .insert(cgroup_id, keys::enrolled_value(pod), 0)
            .map_err(|e| Error::map("insert into", abi::MAP_ENROLLED, e))?;
        maps.ports_by_cgroup.insert(cgroup_id, pod.outbound_port);
        sync_outbound_ports(&mut maps)
    }

    /// Stop steering a cgroup. Releasing a cgroup that is not enrolled is fine.
    pub fn release(&self, cgroup_id: u64) -> Result<(), Error> {
        let mut maps = self.maps();
        remove_entry(&mut maps.enrolled, &cgroup_id, abi::MAP_ENROLLED)?;
        maps.ports_by_cgroup.remove(&cgroup_id);
        sync_outbound_ports(&mut maps)
    }

    /// The enrolled cgroups (a restarting agent reconciles them with the pods
    /// it finds).
    pub fn enrolled(&self) -> Result<Vec<(u64, EnrolledPod)>, Error> {
        let maps = self.maps();
        maps.enrolled
            .iter()
            .map(|r| {
                r.map(|(id, v)| (id, keys::enrolled_pod(v)))
                    .map_err(|e| Error::map("read", abi::MAP_ENROLLED, e))
            })
            .collect()
    }

    /// Make the service maps hold exactly this set (insert new, update changed,
    /// then delete stale, so a service that stays is never missing). IPv4 and
    /// IPv6 may be mixed; IPv4-mapped IPv6 addresses count as IPv4.
    pub fn set_services(&self, services: &[(SocketAddr, u32)]) -> Result<(), Error> {
        let mut want4 = BTreeMap::new();
        let mut want6 = BTreeMap::new();
        for &(addr, service_id) in services {
            let value = abi::ServiceValue { service_id };
            match keys::service_key(addr) {
                ServiceKey::V4(k) => {
                    want4.insert(ord4(&k), (k, value));
                }
                ServiceKey::V6(k) => {
                    want6.insert(ord6(&k), (k, value));
                }
            }
        }
        let mut maps = self.maps();
        sync_map(&mut maps.services4, abi::MAP_SERVICES4, &want4, ord4)?;
        sync_map(&mut maps.services6, abi::MAP_SERVICES6, &want6, ord6)
    }

    /// Look up and delete the original destination of a connection accepted on
    /// an outbound listener: `netns_cookie` of the accepted socket
    /// ([`socket_netns_cookie`]), its peer address, and the port of the listener it was
    /// accepted on (its local port). The entry is the connection's only if connect4/6
    /// steered that connect to this very listener: the key (netns, client address, client
    /// port) alone can be presented by another socket of the namespace bound to the same
    /// port.
    pub fn take_original_destination(
        &self,
        netns_cookie: u64,
        peer: SocketAddr,
        listener_port: u16,
    ) -> Result<Taken, Error> {
        let key = keys::conn_key(netns_cookie, peer);
        let mut maps = self.maps();
        let dst = match maps.conn_orig_dst.get(&key, 0) {
            Ok(dst) => dst,
            Err(e) if is_not_found(&e) => return Ok(Taken::Missing),
            Err(e) => return Err(Error::map("read", abi::MAP_CONN_ORIG_DST, e)),
        };
        if dst.listener_port != listener_port {
            self.other_listener.fetch_add(1, Ordering::Relaxed);
            return Ok(Taken::OtherListener {
                expected: dst.listener_port,
            });
        }
        // The LRU may have evicted it in between; we have the value anyway.
        remove_entry(&mut maps.conn_orig_dst, &key, abi::MAP_CONN_ORIG_DST)?;
        let addr = keys::orig_dst_addr(&dst).ok_or_else(|| {
            Error::Bug(format!(
                "original destination with unknown family {}",
                dst.family
            ))
        })?;
        Ok(Taken::Found(OriginalDestination {
            addr,
            service_id: dst.service_id,
        }))
    }

    /// The counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters, Error> {
        let maps = self.maps();
        let read = |index| sum_counter(&maps.counters, abi::MAP_COUNTERS, index);
        Ok(Counters {
            captured: read(abi::COUNTER_CAPTURED)?,
            passed: read(abi::COUNTER_PASSED)?,
            denied: read(abi::COUNTER_DENIED)?,
            not_enrolled: read(abi::COUNTER_NOT_ENROLLED)?,
            rekeyed: read(abi::COUNTER_REKEYED)?,
            lookup_miss: read(abi::COUNTER_LOOKUP_MISS)?,
            capture_failed: read(abi::COUNTER_CAPTURE_FAILED)?,
            rekey_failed: read(abi::COUNTER_REKEY_FAILED)?,
            pod_connection_limit: read(abi::COUNTER_POD_CONNECTION_LIMIT)?,
            other_listener: self.other_listener.load(Ordering::Relaxed),
            fast_path: maps.fast_path.counters()?,
        })
    }

    /// Whether the fast path is on.
    pub fn fast_path(&self) -> bool {
        self.maps().fast_path.enabled()
    }

    /// Tell the fast path about a local pod (`Some(netns cookie)`, the cookie of the pod's
    /// network namespace) or that it is gone (`None`). A no-op when the fast path is off.
    pub fn set_fast_path_pod(
        &self,
        ips: &[IpAddr],
        netns_cookie: Option<u64>,
    ) -> Result<(), Error> {
        self.maps().fast_path.set_pod(ips, netns_cookie)
    }
}

/// Delete `key`; a missing key is fine.
fn remove_entry<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    key: &K,
    name: &'static str,
) -> Result<(), Error> {
    match map.remove(key) {
        Ok(()) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(Error::map("delete from", name, e)),
    }
}

/// aya reports a missing key as `KeyNotFound` on lookup but as ENOENT on delete.
fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

fn ord4(k: &abi::ServiceKey4) -> (u32, u16) {
    (k.addr, k.port)
}

fn ord6(k: &abi::ServiceKey6) -> ([u32; 4], u16) {
    (k.addr, k.port)
}

/// Make `map` hold exactly `want` (keyed by `ord` of the map key).
fn sync_map<K: aya::Pod, O: Ord>(
    map: &mut HashMap<MapData, K, abi::ServiceValue>,
    name: &'static str,
    want: &BTreeMap<O, (K, abi::ServiceValue)>,
    ord: fn(&K) -> O,
) -> Result<(), Error> {
    let mut have = BTreeMap::new();
    for entry in map.iter() {
        let (k, v) = entry.map_err(|e| Error::map("read", name, e))?;
        have.insert(ord(&k), (k, v));
    }
    for (o, (k, v)) in want {
        if have.get(o).is_none_or(|(_, old)| old != v) {
            map.insert(k, v, 0)
                .map_err(|e| Error::map("insert into", name, e))?;
        }
    }
    for (o, (k, _)) in &have {
        if !want.contains_key(o) {
            remove_entry(map, k, name)?;
        }
    }
    Ok(())
}

/// Make the outbound-ports map hold the ports of the enrolled cgroups, with
/// the number of cgroups using each.
fn sync_outbound_ports(maps: &mut Maps) -> Result<(), Error> {
    let mut want: BTreeMap<u16, u32> = BTreeMap::new();
    for &port in maps.ports_by_cgroup.values() {
        *want.entry(port).or_default() += 1;
    }
    let mut have = BTreeMap::new();
    for entry in maps.outbound_ports.iter() {
        let (port, n) = entry.map_err(|e| Error::map("read", abi::MAP_OUTBOUND_PORTS, e))?;
        have.insert(port, n);
    }
    for (&port, &n) in &want {
        if have.get(&port) != Some(&n) {
            maps.outbound_ports
                .insert(port, n, 0)
                .map_err(|e| Error::map("insert into", abi::MAP_OUTBOUND_PORTS, e))?;
        }
    }
    for port in have.keys().filter(|p| !want.contains_key(p)) {
        remove_entry(&mut maps.outbound_ports, port, abi::MAP_OUTBOUND_PORTS)?;
    }
    Ok(())
}

fn open_cgroup(path: &Path) -> Result<File, Error> {
    let magic = fs_magic(path).map_err(|source| Error::CgroupNotFound {
        path: path.to_owned(),
        source,
    })?;
    if magic != CGROUP2_SUPER_MAGIC {
        return Err(Error::NotCgroup2 {
            path: path.to_owned(),
        });
    }
    File::open(path).map_err(|source| Error::CgroupNotFound {
        path: path.to_owned(),
        source,
    })
}

/// Check that `folder` is (or would be) on bpffs, then create it.
fn prepare_pin_folder(folder: &Path) -> Result<(), Error> {
    let existing = folder
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if fs_magic(existing).ok() != Some(BPF_FS_MAGIC) {
        return Err(Error::BpffsNotMounted {
            path: folder.to_owned(),
        });
    }
    fs::create_dir_all(folder).map_err(|source| match source.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => Error::PermissionDenied {
            step: format!("create the pin folder {}", folder.display()),
            source,
        },
        _ => Error::CreatePinFolder {
            path: folder.to_owned(),
            source,
        },
    })
}

/// Expected (type, key size, value size, max entries) of each map.
fn expected_layout(name: &str) -> Option<(MapType, usize, usize, u32)> {
    use std::mem::size_of;
    Some(match name {
        abi::MAP_ENROLLED => (
            MapType::Hash,
            size_of::<u64>(),
            size_of::<abi::EnrolledPod>(),
            abi::MAX_ENROLLED,
        ),
        abi::MAP_SERVICES4 => (
            MapType::Hash,
            size_of::<abi::ServiceKey4>(),
            size_of::<abi::ServiceValue>(),
            abi::MAX_SERVICES,
        ),
        abi::MAP_SERVICES6 => (
            MapType::Hash,
            size_of::<abi::ServiceKey6>(),
            size_of::<abi::ServiceValue>(),
            abi::MAX_SERVICES,
        ),
        abi::MAP_COOKIE_ORIG_DST => (
            MapType::LruHash,
            size_of::<u64>(),
            size_of::<abi::OrigDst>(),
            abi::MAX_PENDING_CONNECTIONS,
        ),
        abi::MAP_CONN_ORIG_DST => (
            MapType::LruHash,
            size_of::<abi::ConnKey>(),
            size_of::<abi::OrigDst>(),
            abi::MAX_PENDING_CONNECTIONS,
        ),
        abi::MAP_OUTBOUND_PORTS => (
            MapType::Hash,
            size_of::<u16>(),
            size_of::<u32>(),
            abi::MAX_OUTBOUND_PORTS,
        ),
        abi::MAP_COUNTERS => (
            MapType::PerCpuArray,
            size_of::<u32>(),
            size_of::<u64>(),
            abi::COUNTERS_LEN,
        ),
        abi::MAP_POD_CONNECTIONS => (
            MapType::LruHash,
            size_of::<u64>(),
            size_of::<i64>(),
            abi::MAX_COUNTED_NETNS,
        ),
        abi::MAP_LIMITS => (
            MapType::Array,
            size_of::<u32>(),
            size_of::<u64>(),
            abi::LIMITS_LEN,
        ),
        abi::MAP_FASTPATH_SOCKS => (
            MapType::SockHash,
            size_of::<abi::FastKey>(),
            size_of::<u32>(),
            abi::MAX_FASTPATH_SOCKETS,
        ),
        abi::MAP_FASTPATH_PODS | abi::MAP_FASTPATH_AGENT => (
            MapType::Hash,
            size_of::<abi::AddrKey>(),
            size_of::<u64>(),
            abi::MAX_FASTPATH_ADDRS,
        ),
        abi::MAP_FASTPATH_TAINTED => (
            MapType::LruHash,
            size_of::<abi::FastKey>(),
            size_of::<u8>(),
            abi::MAX_FASTPATH_SOCKETS,
        ),
        abi::MAP_FASTPATH_COUNTERS => (
            MapType::PerCpuArray,
            size_of::<u32>(),
            size_of::<u64>(),
            abi::FASTPATH_COUNTERS_LEN,
        ),
        _ => return None,
    })
}

/// aya adopts a pinned map by name without comparing layouts; do it first.
fn check_pinned_maps(folder: &Path) -> Result<(), Error> {
    for name in abi::ALL_MAPS.into_iter().chain(abi::FASTPATH_MAPS) {
        let path = folder.join(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|e| Error::map("open pinned", name, e))?;
        let (ty, key, value, max) = expected_layout(name)
            .ok_or_else(|| Error::Bug(format!("no expected layout for map {name}")))?;
        let found = (
            info.map_type().ok(),
            info.key_size() as usize,
            info.value_size() as usize,
            info.max_entries(),
        );
        if found != (Some(ty), key, value, max) {
            return Err(Error::IncompatiblePin {
                path,
                detail: format!(
                    "found type/key/value/max {found:?}, want {:?}",
                    (ty, key, value, max)
                ),
            });
        }
    }
    Ok(())
}

fn attach(
    ebpf: &mut Ebpf,
    program: &'static str,
    cgroup: &File,
    cfg: &RedirectConfig,
) -> Result<FdLink, Error> {
    let prog = ebpf
        .program_mut(program)
        .ok_or_else(|| Error::Bug(format!("program {program} missing from the eBPF object")))?;
    let load_err = |source: ProgramError| match eperm_in(&source) {
        Some(io) => Error::PermissionDenied {
            step: format!("load program {program}"),
            source: io,
        },
        None => Error::LoadProgram { program, source },
    };
    let attach_err = |source: ProgramError| match eperm_in(&source) {
        Some(io) => Error::PermissionDenied {
            step: format!("attach {program} to cgroup {}", cfg.cgroup_root.display()),
            source: io,
        },
        None => Error::Attach {
            program,
            cgroup: cfg.cgroup_root.clone(),
            source,
        },
    };
    let link = if program == abi::PROG_SOCKOPS {
        let prog: &mut SockOps = prog.try_into().map_err(load_err)?;
        prog.load().map_err(load_err)?;
        let id = prog
            .attach(cgroup, CgroupAttachMode::Single)
            .map_err(attach_err)?;
        FdLink::try_from(prog.take_link(id).map_err(attach_err)?)
    } else {
        let prog: &mut CgroupSockAddr = prog.try_into().map_err(load_err)?;
        prog.load().map_err(load_err)?;
        let id = prog
            .attach(cgroup, CgroupAttachMode::Single)
            .map_err(attach_err)?;
        FdLink::try_from(prog.take_link(id).map_err(attach_err)?)
    };
    // Kernels before 5.7 attach without links; strait needs 5.15 anyway.
    link.map_err(|e| Error::link("BPF links are not supported by this kernel", e))
}

fn take_maps(ebpf: &mut Ebpf, fast_path: bool) -> Result<Maps, Error> {
    fn take<T: TryFrom<aya::maps::Map, Error = MapError>>(
        ebpf: &mut Ebpf,
        name: &'static str,
    ) -> Result<T, Error> {
        let map = ebpf
            .take_map(name)
            .ok_or_else(|| Error::Bug(format!("map {name} missing from the eBPF object")))?;
        T::try_from(map).map_err(|e| Error::map("open", name, e))
    }
    let enrolled: HashMap<MapData, u64, abi::EnrolledPod> = take(ebpf, abi::MAP_ENROLLED)?;
    let mut ports_by_cgroup = StdHashMap::new();
    for entry in enrolled.iter() {
        let (id, pod) = entry.map_err(|e| Error::map("read", abi::MAP_ENROLLED, e))?;
        ports_by_cgroup.insert(id, pod.outbound_port);
    }
    let mut maps = Maps {
        enrolled,
        services4: take(ebpf, abi::MAP_SERVICES4)?,
        services6: take(ebpf, abi::MAP_SERVICES6)?,
        conn_orig_dst: take(ebpf, abi::MAP_CONN_ORIG_DST)?,
        outbound_ports: take(ebpf, abi::MAP_OUTBOUND_PORTS)?,
        counters: take(ebpf, abi::MAP_COUNTERS)?,
        limits: take(ebpf, abi::MAP_LIMITS)?,
        ports_by_cgroup,
        fast_path: fastpath::take_maps(ebpf, fast_path)?,
    };
    // Repairs the ports map if a previous agent died between two updates.
    sync_outbound_ports(&mut maps)?;
    Ok(maps)
}

/// Pin the new links as `<name>_next`, then rename them over `<name>`.
fn pin_links(folder: &Path, attached: Vec<(&'static str, FdLink)>) -> Result<(), Error> {
    let mut staged = Vec::with_capacity(attached.len());
    let unstage = |staged: &[(PathBuf, PathBuf)]| {
        for (next, _) in staged {
            let _ = fs::remove_file(next);
        }
    };
    for (program, link) in attached {
        let name = LINKS
            .iter()
            .find(|(p, _)| *p == program)
            .map(|(_, n)| *n)
            .ok_or_else(|| Error::Bug(format!("no pin name for {program}")))?;
        let last = folder.join(name);
        let next = folder.join(format!("{name}{NEXT_SUFFIX}"));
        // Left over by an install that died before renaming.
        let _ = fs::remove_file(&next);
        match link.pin(&next) {
            // Dropping the PinnedLink closes our fd; the pin keeps it attached.
            Ok(_pinned) => staged.push((next, last)),
            Err(source) => {
                unstage(&staged);
                return Err(Error::PinLink {
                    program,
                    path: next,
                    source,
                });
            }
        }
    }
    for (i, (next, last)) in staged.iter().enumerate() {
        if let Err(source) = fs::rename(next, last) {
            // The links renamed so far are new and work with the same maps; the
            // rest are detached again by removing their staged pins.
            unstage(&staged[i..]);
            return Err(Error::ReplaceLink {
                path: last.clone(),
                source,
            });
        }
    }
    Ok(())
}

/// Remove pins of older map versions (`STRAIT_*` not in use): the programs
/// that used them were just detached.
fn remove_stale_map_pins(folder: &Path) {
    let Ok(entries) = fs::read_dir(folder) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let in_use = abi::ALL_MAPS.contains(&name.as_ref())
            || abi::INPOD_MAPS.contains(&name.as_ref())
            || abi::FASTPATH_MAPS.contains(&name.as_ref());
        if name.starts_with("STRAIT_") && !in_use {
            tracing::info!(pin = %entry.path().display(), "removing the pin of an older map version");
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Remove every pin (links first, which detaches the programs; then maps and
/// anything else) under `bpffs`, and the folder. Idempotent: a missing folder
/// is not an error. Refuses to touch a folder that is not on bpffs.
pub fn uninstall(bpffs: &Path) -> Result<UninstallReport, Error> {
    let mut report = UninstallReport::default();
    if !bpffs.exists() {
        return Ok(report);
    }
    report.folder_existed = true;
    if fs_magic(bpffs).ok() != Some(BPF_FS_MAGIC) {
        return Err(Error::NotBpffs {
            path: bpffs.to_owned(),
        });
    }
    let remove_err = |path: &Path, source: io::Error| match source.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => Error::PermissionDenied {
            step: format!("remove {}", path.display()),
            source,
        },
        _ => Error::Remove {
            path: path.to_owned(),
            source,
        },
    };
    let mut links = BTreeSet::new();
    let mut others = BTreeSet::new();
    for entry in fs::read_dir(bpffs).map_err(|e| remove_err(bpffs, e))? {
        let entry = entry.map_err(|e| remove_err(bpffs, e))?;
        if entry.file_name().to_string_lossy().starts_with("link_") {
            links.insert(entry.path());
        } else {
            others.insert(entry.path());
        }
    }
    for path in links.into_iter().chain(others) {
        let removed = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match removed {
            Ok(()) => report.removed.push(path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(remove_err(&path, e)),
        }
    }
    match fs::remove_dir(bpffs) {
        Ok(()) => report.removed.push(bpffs.to_owned()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(remove_err(bpffs, e)),
    }
    Ok(report)
}

/// The cgroup v2 id of a pod's cgroup directory (its inode number), as
/// `bpf_get_current_ancestor_cgroup_id` reports it for processes anywhere below it.
///
/// The eBPF programs find a caller's pod among the caller's ancestors down to level
/// [`abi::MAX_CGROUP_DEPTH`], so a deeper cgroup is refused here rather than enrolled and
/// silently never matched.
pub fn cgroup_id(path: &Path) -> Result<u64, Error> {
    let not_found = |source| Error::CgroupNotFound {
        path: path.to_owned(),
        source,
    };
    if fs_magic(path).map_err(not_found)? != CGROUP2_SUPER_MAGIC {
        return Err(Error::NotCgroup2 {
            path: path.to_owned(),
        });
    }
    let level = cgroup_level(path);
    if level == 0 || level > abi::MAX_CGROUP_DEPTH as usize {
        return Err(Error::CgroupLevel {
            path: path.to_owned(),
            level,
        });
    }
    Ok(fs::metadata(path).map_err(not_found)?.ino())
}

/// How far below its hierarchy's root a cgroup v2 directory is (the root is level 0): the
/// number of its ancestors that are on the same cgroup2 mount.
fn cgroup_level(path: &Path) -> usize {
    // Lexical ancestors of the resolved path: `..` or a symlink in a workload file must not
    // change the count.
    let Ok(path) = fs::canonicalize(path) else {
        return 0;
    };
    path.ancestors()
        .skip(1)
        .take_while(|dir| fs_magic(dir).is_ok_and(|magic| magic == CGROUP2_SUPER_MAGIC))
        .count()
}

/// `SO_NETNS_COOKIE` of a socket: the netns cookie the eBPF programs key by.
pub fn socket_netns_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `fd` is a live descriptor for the call; `cookie` and `len` are
    // valid for writes and `len` holds the size of `cookie`.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// `f_type` of the filesystem holding `path`.
fn fs_magic(path: &Path) -> io::Result<i64> {
    let stat = nix::sys::statfs::statfs(path).map_err(io::Error::from)?;
    Ok(stat.filesystem_type().0)
}

/// One counter of a per-CPU counters map, summed over CPUs.
fn sum_counter(
    map: &PerCpuArray<MapData, u64>,
    name: &'static str,
    index: u32,
) -> Result<u64, Error> {
    let values = map
        .get(&index, 0)
        .map_err(|e| Error::map("read", name, e))?;
    Ok(values.iter().copied().sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Redirect>();
    }

    /// Each field reads the slot of its index constant, and `by_reason` names it as the
    /// library's table names that index.
    #[test]
    fn counters_are_named_by_the_shared_table() {
        let at = |index: u32| 100 + u64::from(index);
        let counters = Counters {
            captured: at(abi::COUNTER_CAPTURED),
            passed: at(abi::COUNTER_PASSED),
            denied: at(abi::COUNTER_DENIED),
            not_enrolled: at(abi::COUNTER_NOT_ENROLLED),
            rekeyed: at(abi::COUNTER_REKEYED),
            lookup_miss: at(abi::COUNTER_LOOKUP_MISS),
            capture_failed: at(abi::COUNTER_CAPTURE_FAILED),
            rekey_failed: at(abi::COUNTER_REKEY_FAILED),
            pod_connection_limit: at(abi::COUNTER_POD_CONNECTION_LIMIT),
            other_listener: 7,
            fast_path: FastPathCounters {
                hit: 200 + u64::from(abi::FASTPATH_COUNTER_HIT),
                miss: 200 + u64::from(abi::FASTPATH_COUNTER_MISS),
                tainted: 200 + u64::from(abi::FASTPATH_COUNTER_TAINTED),
                inserted: 200 + u64::from(abi::FASTPATH_COUNTER_INSERTED),
                insert_failed: 200 + u64::from(abi::FASTPATH_COUNTER_INSERT_FAILED),
            },
        };
        let named: std::collections::HashMap<_, _> = counters.by_reason().into_iter().collect();
        assert_eq!(named.len(), 15, "{named:?}");
        for (index, name) in abi::COUNTER_NAMES.into_iter().enumerate() {
            assert_eq!(named[name], 100 + index as u64, "{name}");
        }
        for (index, name) in abi::FASTPATH_COUNTER_NAMES.into_iter().enumerate() {
            assert_eq!(named[name], 200 + index as u64, "{name}");
        }
        assert_eq!(named["other_listener"], 7);
    }

    #[test]
    fn every_map_has_an_expected_layout() {
        for name in abi::ALL_MAPS.into_iter().chain(abi::FASTPATH_MAPS) {
            assert!(expected_layout(name).is_some(), "{name}");
        }
    }

    #[test]
    fn pin_names_are_valid_on_bpffs() {
        for name in abi::ALL_MAPS
            .into_iter()
            .chain(abi::FASTPATH_MAPS)
            .chain(LINKS.iter().map(|(_, n)| *n))
            .chain([fastpath::LINK_ROOT, fastpath::LINK_SELF])
        {
            assert!(!name.contains('.'), "{name}");
        }
    }

    #[test]
    fn eperm_is_found_in_the_chain() {
        let err = MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_update_elem",
            io_error: io::Error::from_raw_os_error(libc::EPERM),
        });
        assert!(eperm_in(&err).is_some());
        let err = MapError::KeyNotFound;
        assert!(eperm_in(&err).is_none());
    }

    #[test]
    fn a_pin_folder_off_bpffs_is_refused_before_creating_it() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("strait");
        let err = prepare_pin_folder(&folder).unwrap_err();
        assert!(matches!(err, Error::BpffsNotMounted { .. }), "{err:?}");
        assert!(err.to_string().contains("mount -t bpf bpf /sys/fs/bpf"));
        assert!(!folder.exists());
    }

    #[test]
    fn cgroup_paths_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            cgroup_id(dir.path()),
            Err(Error::NotCgroup2 { .. })
        ));
        assert!(matches!(
            cgroup_id(&dir.path().join("missing")),
            Err(Error::CgroupNotFound { .. })
        ));
        let cfg = RedirectConfig {
            cgroup_root: dir.path().to_owned(),
            bpffs: dir.path().join("pins"),
            fast_path: true,
            max_pod_connections: 16_384,
        };
        assert!(matches!(
            Redirect::install(&cfg),
            Err(Error::NotCgroup2 { .. })
        ));
    }

    #[test]
    fn uninstall_of_a_missing_folder_is_a_no_op() {
        let report = uninstall(Path::new("/nonexistent/strait-test")).unwrap();
        assert!(!report.folder_existed);
    }

    #[test]
    fn uninstall_refuses_non_bpffs_folders() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(uninstall(dir.path()), Err(Error::NotBpffs { .. })));
        assert!(dir.path().exists());
    }
}
