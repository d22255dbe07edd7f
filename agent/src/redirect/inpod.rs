//! The in-pod half of the eBPF programs: the `strait_sk_lookup` program attached to each
//! enrolled pod's network namespace (inbound capture for STRICT and PERMISSIVE listeners), its
//! maps, and the backend-authorization maps connect4/connect6 consult.
//!
//! Capture is keyed by (pod, family, port), never by address, so a connection to any local
//! address of the pod is captured (a secondary IP the workload file does not list, the IPv6
//! link-local address). The program cannot tell which network namespace it runs for, so each
//! pod gets its own copy, loaded with the pod's id in its `STRAIT_INBOUND_POD` global.
//!
//! Links are pinned per pod as `link_inbound_<cgroup id>` beside the node-wide links, so the
//! steering survives an agent restart (with no agent socket in the map the program drops,
//! never bypasses; see `ebpf/src/inpod.rs`), and `strait uninstall` removes them with the
//! rest (every `link_*` pin). What to capture and which services a pod may reach is decided by
//! the app from the mesh; this file only writes the maps.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use aya::maps::{HashMap, MapData, MapInfo, MapType, PerCpuArray, SockHash};
use aya::programs::SkLookup;
use aya::programs::links::FdLink;
use aya::{Ebpf, EbpfLoader};
use strait_ebpf as abi;

use super::{Error, eperm_in, remove_entry};

const LINK_PREFIX: &str = "link_inbound_";

/// In-pod eBPF outcome counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InPodCounters {
    /// Connects to a mesh service that is not a backend of the caller's virtual node (EPERM).
    pub not_a_backend: u64,
    /// Incoming connections steered to the agent's inbound socket.
    pub inbound_steered: u64,
    /// Incoming connections to a captured port while no agent socket was there (dropped).
    pub inbound_no_socket: u64,
    /// A pod's connections to its own address, left alone.
    pub inbound_self: u64,
}

impl InPodCounters {
    /// (reason, value) pairs for a metric with a bounded `reason` label.
    pub fn by_reason(&self) -> [(&'static str, u64); 4] {
        let values = [
            self.not_a_backend,
            self.inbound_steered,
            self.inbound_no_socket,
            self.inbound_self,
        ];
        let mut all = [("", 0); 4];
        for (slot, pair) in all
            .iter_mut()
            .zip(abi::INPOD_COUNTER_NAMES.into_iter().zip(values))
        {
            *slot = pair;
        }
        all
    }
}

struct Maps {
    ports: HashMap<MapData, abi::InboundKey, u32>,
    socks: SockHash<MapData, abi::InboundKey>,
    authz_pods: HashMap<MapData, u64, u32>,
    backends: HashMap<MapData, abi::BackendKey, u32>,
    counters: PerCpuArray<MapData, u64>,
}

/// The in-pod maps, and where each pod's copy of the sk_lookup program is pinned.
pub struct InPod {
    bpffs: PathBuf,
    // The node-wide object stays alive as before (its programs are attached through pinned
    // links); its sk_lookup copy was loaded only to check the program at start.
    _ebpf: Mutex<Ebpf>,
    maps: Mutex<Maps>,
}

/// Expected (type, key size, value size, max entries) of each in-pod map.
pub(super) fn expected_layout(name: &str) -> Option<(MapType, usize, usize, u32)> {
    use std::mem::size_of;
    Some(match name {
        abi::MAP_INBOUND_PORTS => (
            MapType::Hash,
            size_of::<abi::InboundKey>(),
            4,
            abi::MAX_INBOUND_PORTS,
        ),
        abi::MAP_INBOUND_SOCKS => (
            MapType::SockHash,
            size_of::<abi::InboundKey>(),
            4,
            abi::MAX_INBOUND_PORTS,
        ),
        abi::MAP_AUTHZ_PODS => (MapType::Hash, 8, 4, abi::MAX_ENROLLED),
        abi::MAP_BACKENDS => (
            MapType::Hash,
            size_of::<abi::BackendKey>(),
            4,
            abi::MAX_BACKENDS,
        ),
        abi::MAP_INPOD_COUNTERS => (MapType::PerCpuArray, 4, 8, abi::INPOD_COUNTERS_LEN),
        _ => return None,
    })
}

/// aya adopts a pinned map by name without comparing layouts; do it first.
pub(super) fn check_pinned_maps(folder: &Path) -> Result<(), Error> {
    for name in abi::INPOD_MAPS {
        let path = folder.join(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|e| Error::map("open pinned", name, e))?;
        let want = expected_layout(name)
            .ok_or_else(|| Error::Bug(format!("no expected layout for map {name}")))?;
        let found = (
            info.map_type().ok(),
            info.key_size() as usize,
            info.value_size() as usize,
            info.max_entries(),
        );
        if found != (Some(want.0), want.1, want.2, want.3) {
            return Err(Error::IncompatiblePin {
                path,
                detail: format!("found type/key/value/max {found:?}, want {want:?}"),
            });
        }
    }
    Ok(())
}

/// The map key of a pod's listener port in one family (`abi::FAMILY_V4` or `FAMILY_V6`).
pub fn inbound_key(pod: u64, family: u16, port: u16) -> abi::InboundKey {
    abi::InboundKey {
        pod,
        family,
        port,
        _pad: 0,
    }
}

/// Both families: a port is captured in each, whatever sockets the agent has.
const FAMILIES: [u16; 2] = [abi::FAMILY_V4, abi::FAMILY_V6];

impl InPod {
    /// Takes the in-pod maps out of the freshly loaded object, loads the sk_lookup program,
    /// and keeps the object.
    pub(super) fn new(mut ebpf: Ebpf, bpffs: &Path) -> Result<InPod, Error> {
        fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
            ebpf: &mut Ebpf,
            name: &'static str,
        ) -> Result<T, Error> {
            let map = ebpf
                .take_map(name)
                .ok_or_else(|| Error::Bug(format!("map {name} missing from the eBPF object")))?;
            T::try_from(map).map_err(|e| Error::map("open", name, e))
        }
        let maps = Maps {
            ports: take(&mut ebpf, abi::MAP_INBOUND_PORTS)?,
            socks: take(&mut ebpf, abi::MAP_INBOUND_SOCKS)?,
            authz_pods: take(&mut ebpf, abi::MAP_AUTHZ_PODS)?,
            backends: take(&mut ebpf, abi::MAP_BACKENDS)?,
            counters: take(&mut ebpf, abi::MAP_INPOD_COUNTERS)?,
        };
        let program = abi::PROG_SK_LOOKUP;
        let prog: &mut SkLookup = ebpf
            .program_mut(program)
            .ok_or_else(|| Error::Bug(format!("program {program} missing from the eBPF object")))?
            .try_into()
            .map_err(|source| Error::LoadProgram { program, source })?;
        prog.load().map_err(|source| match eperm_in(&source) {
            Some(io) => Error::PermissionDenied {
                step: format!("load program {program}"),
                source: io,
            },
            None => Error::LoadProgram { program, source },
        })?;
        Ok(InPod {
            bpffs: bpffs.to_owned(),
            _ebpf: Mutex::new(ebpf),
            maps: Mutex::new(maps),
        })
    }

    fn maps(&self) -> MutexGuard<'_, Maps> {
        // Kernel maps: a panic elsewhere cannot leave them half-updated for the next caller.
        self.maps.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn link_pin(&self, cgroup_id: u64) -> PathBuf {
        self.bpffs.join(format!("{LINK_PREFIX}{cgroup_id}"))
    }

    /// Loads the pod's copy of the sk_lookup program (its `cgroup_id` as the program's pod
    /// id), attaches it to the pod's network namespace and pins the link (replacing the link a
    /// previous agent pinned for the same pod, atomically by rename).
    pub fn attach_pod(&self, netns: &Path, cgroup_id: u64) -> Result<(), Error> {
        let program = abi::PROG_SK_LOOKUP;
        let file = File::open(netns).map_err(|source| Error::Attach {
            program,
            cgroup: netns.to_owned(),
            source: aya::programs::ProgramError::IOError(source),
        })?;
        // The maps are the node's pinned ones; only the program's read-only data differs.
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&self.bpffs)
            .override_global(abi::GLOBAL_INBOUND_POD, &cgroup_id, true)
            .load(super::OBJECT)
            .map_err(|e| match eperm_in(&e) {
                Some(source) => Error::PermissionDenied {
                    step: format!("load the sk_lookup program for cgroup {cgroup_id}"),
                    source,
                },
                None => Error::Load(e),
            })?;
        let prog: &mut SkLookup = ebpf
            .program_mut(program)
            .ok_or_else(|| Error::Bug(format!("program {program} missing")))?
            .try_into()
            .map_err(|source| Error::LoadProgram { program, source })?;
        prog.load().map_err(|source| match eperm_in(&source) {
            Some(io) => Error::PermissionDenied {
                step: format!("load program {program}"),
                source: io,
            },
            None => Error::LoadProgram { program, source },
        })?;
        let id = prog.attach(&file).map_err(|source| Error::Attach {
            program,
            cgroup: netns.to_owned(),
            source,
        })?;
        let link: FdLink = prog
            .take_link(id)
            .map_err(|source| Error::Attach {
                program,
                cgroup: netns.to_owned(),
                source,
            })?
            .into();
        let last = self.link_pin(cgroup_id);
        let next = self.bpffs.join(format!("{LINK_PREFIX}{cgroup_id}_next"));
        let _ = fs::remove_file(&next);
        link.pin(&next).map_err(|source| Error::PinLink {
            program,
            path: next.clone(),
            source,
        })?;
        fs::rename(&next, &last).map_err(|source| {
            let _ = fs::remove_file(&next);
            Error::ReplaceLink { path: last, source }
        })
    }

    /// Detaches the pod's sk_lookup program (removes its pin). A missing pin is fine.
    pub fn detach_pod(&self, cgroup_id: u64) {
        let pin = self.link_pin(cgroup_id);
        if let Err(error) = fs::remove_file(&pin)
            && error.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(pin = %pin.display(), %error, "cannot remove the pod's inbound link pin");
        }
    }

    /// Removes the inbound link pins of pods not in `keep` (left by a previous agent).
    pub fn detach_strays(&self, keep: &BTreeSet<u64>) {
        let Ok(entries) = fs::read_dir(&self.bpffs) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_prefix(LINK_PREFIX)) else {
                continue;
            };
            if id.parse::<u64>().is_ok_and(|id| !keep.contains(&id)) {
                tracing::info!(pin = %entry.path().display(), "removing the inbound link of a pod that is gone");
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    /// Steers the pod's `ports`, in both families, to its inbound `sockets` (family, listening
    /// socket in the pod's netns). A family without a socket stays captured: the program drops
    /// its connections rather than let them reach the application. Sockets go in before the
    /// ports, so a captured port finds its socket.
    pub fn capture(
        &self,
        pod: u64,
        ports: &[u16],
        sockets: &[(u16, BorrowedFd<'_>)],
    ) -> Result<(), Error> {
        let mut maps = self.maps();
        for &port in ports {
            for (family, socket) in sockets {
                maps.socks
                    .insert(inbound_key(pod, *family, port), socket.as_raw_fd(), 0)
                    .map_err(|e| Error::map("insert into", abi::MAP_INBOUND_SOCKS, e))?;
            }
            for family in FAMILIES {
                maps.ports
                    .insert(inbound_key(pod, family, port), 1, 0)
                    .map_err(|e| Error::map("insert into", abi::MAP_INBOUND_PORTS, e))?;
            }
        }
        Ok(())
    }

    /// Stops steering the pod's `ports` (the port first, so nothing is dropped for a missing
    /// socket).
    pub fn release(&self, pod: u64, ports: &[u16]) -> Result<(), Error> {
        let mut maps = self.maps();
        for &port in ports {
            for family in FAMILIES {
                let key = inbound_key(pod, family, port);
                remove_entry(&mut maps.ports, &key, abi::MAP_INBOUND_PORTS)?;
                match maps.socks.remove(&key) {
                    Ok(()) => {}
                    // Closing the socket already took it out of the map.
                    Err(e) if super::is_not_found(&e) => {}
                    Err(e) => return Err(Error::map("delete from", abi::MAP_INBOUND_SOCKS, e)),
                }
            }
        }
        Ok(())
    }

    /// The keys of a pod's captured ports (both families), for [`InPod::release_strays`].
    pub fn keys(pod: u64, ports: &[u16]) -> impl Iterator<Item = abi::InboundKey> + '_ {
        ports
            .iter()
            .flat_map(move |&port| FAMILIES.map(|family| inbound_key(pod, family, port)))
    }

    /// Removes captured ports that no pod of this agent claims (left by a previous agent).
    pub fn release_strays(&self, keep: &BTreeSet<abi::InboundKey>) -> Result<(), Error> {
        let mut maps = self.maps();
        let mut stale = Vec::new();
        for entry in maps.ports.iter() {
            let (key, _) = entry.map_err(|e| Error::map("read", abi::MAP_INBOUND_PORTS, e))?;
            if !keep.contains(&key) {
                stale.push(key);
            }
        }
        for key in stale {
            remove_entry(&mut maps.ports, &key, abi::MAP_INBOUND_PORTS)?;
            let _ = maps.socks.remove(&key);
        }
        Ok(())
    }

    /// Makes one pod's backend pairs exactly `ids` (stale pairs first, then new ones), then
    /// puts the pod under authorization; other pods' entries are left as they are.
    pub fn set_pod_backends(&self, cgroup_id: u64, ids: &BTreeSet<u32>) -> Result<(), Error> {
        let mut maps = self.maps();
        let mut have = BTreeSet::new();
        for entry in maps.backends.iter() {
            let (k, _) = entry.map_err(|e| Error::map("read", abi::MAP_BACKENDS, e))?;
            if k.cgroup_id == cgroup_id {
                have.insert(k);
            }
        }
        let want: BTreeSet<abi::BackendKey> = ids
            .iter()
            .map(|&service_id| abi::BackendKey {
                cgroup_id,
                service_id,
                _pad: 0,
            })
            .collect();
        for k in have.difference(&want) {
            remove_entry(&mut maps.backends, k, abi::MAP_BACKENDS)?;
        }
        for k in want.difference(&have) {
            maps.backends
                .insert(k, 1, 0)
                .map_err(|e| Error::map("insert into", abi::MAP_BACKENDS, e))?;
        }
        maps.authz_pods
            .insert(cgroup_id, 1, 0)
            .map_err(|e| Error::map("insert into", abi::MAP_AUTHZ_PODS, e))?;
        Ok(())
    }

    /// Makes the backend maps hold exactly `allowed`: cgroup id -> service ids its pod may
    /// connect to. Every cgroup in `allowed` is under authorization, even with no services.
    pub fn set_backends(&self, allowed: &BTreeMap<u64, BTreeSet<u32>>) -> Result<(), Error> {
        let mut maps = self.maps();
        let want: BTreeSet<abi::BackendKey> = allowed
            .iter()
            .flat_map(|(&cgroup_id, ids)| {
                ids.iter().map(move |&service_id| abi::BackendKey {
                    cgroup_id,
                    service_id,
                    _pad: 0,
                })
            })
            .collect();
        // Stale pairs first, then new pairs, then the pods: during a change a pod may reach
        // only what it may reach both before and after it (a service it keeps is never
        // missing, one it loses is gone before anything is added), and a pod comes under
        // authorization only once its pairs are in.
        let mut have = BTreeSet::new();
        for entry in maps.backends.iter() {
            let (k, _) = entry.map_err(|e| Error::map("read", abi::MAP_BACKENDS, e))?;
            have.insert(k);
        }
        for k in have.difference(&want) {
            remove_entry(&mut maps.backends, k, abi::MAP_BACKENDS)?;
        }
        for k in want.difference(&have) {
            maps.backends
                .insert(k, 1, 0)
                .map_err(|e| Error::map("insert into", abi::MAP_BACKENDS, e))?;
        }
        let mut pods_have = BTreeSet::new();
        for entry in maps.authz_pods.iter() {
            let (k, _) = entry.map_err(|e| Error::map("read", abi::MAP_AUTHZ_PODS, e))?;
            pods_have.insert(k);
        }
        for id in allowed.keys() {
            if !pods_have.contains(id) {
                maps.authz_pods
                    .insert(id, 1, 0)
                    .map_err(|e| Error::map("insert into", abi::MAP_AUTHZ_PODS, e))?;
            }
        }
        for id in pods_have.iter().filter(|id| !allowed.contains_key(id)) {
            remove_entry(&mut maps.authz_pods, id, abi::MAP_AUTHZ_PODS)?;
        }
        Ok(())
    }

    /// The counters, summed over CPUs.
    pub fn counters(&self) -> Result<InPodCounters, Error> {
        let maps = self.maps();
        let read = |index| super::sum_counter(&maps.counters, abi::MAP_INPOD_COUNTERS, index);
        Ok(InPodCounters {
            not_a_backend: read(abi::INPOD_COUNTER_NOT_A_BACKEND)?,
            inbound_steered: read(abi::INPOD_COUNTER_INBOUND_STEERED)?,
            inbound_no_socket: read(abi::INPOD_COUNTER_INBOUND_NO_SOCKET)?,
            inbound_self: read(abi::INPOD_COUNTER_INBOUND_SELF)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_inpod_map_has_a_layout_and_a_valid_pin_name() {
        for name in abi::INPOD_MAPS {
            assert!(expected_layout(name).is_some(), "{name}");
            assert!(!name.contains('.'), "{name}");
        }
    }

    #[test]
    fn a_port_is_keyed_by_pod_in_both_families() {
        let keys: Vec<_> = InPod::keys(7, &[8080]).collect();
        assert_eq!(keys.len(), 2);
        assert!(keys.iter().all(|k| k.pod == 7 && k.port == 8080));
        assert_eq!(keys[0].family, abi::FAMILY_V4);
        assert_eq!(keys[1].family, abi::FAMILY_V6);
    }
}
