//! Outbound capture for enrolled pods.
//!
//! - `strait_connect4` / `strait_connect6` (cgroup/connect4, cgroup/connect6):
//!   for a TCP connect from an enrolled cgroup to a mesh service address, store
//!   the original destination under the socket cookie and rewrite the
//!   destination to the pod's outbound listener on loopback. Egress DROP_ALL is
//!   enforced here (return 0: the connect fails with EPERM).
//! - `strait_sockops` (sock_ops): at `TCP_CONNECT_CB` (local port assigned, SYN
//!   not sent yet) move the original destination from the socket cookie to
//!   (netns cookie, client address, client port), which the agent can compute
//!   from the socket it accepts. The socket is counted against its pod network
//!   namespace's connection limit and asks for state callbacks; when it closes, the
//!   count drops and an entry the agent never took (the connection never reached
//!   its accept) is removed, so no entry outlives its socket.
//! - `strait_sk_lookup` and the backend check of connect4/6 live in `src/inpod.rs` (inbound
//!   capture for STRICT/PERMISSIVE listeners, App Mesh backend authorization).
//!
//! - `strait_sockops_fastpath` / `strait_sk_msg_fastpath`: the fast path, see
//!   `src/fastpath.rs`.
//!
//! Hot paths count outcomes in `STRAIT_COUNTERS_V2` and never log. Every map is
//! pinned by name so a restarting agent adopts them. Loading, attaching and
//! pinning are the agent's `redirect` module.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_NOEXIST, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, bpf_sock_addr, bpf_sock_ops,
    },
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie,
    },
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{SockAddrContext, SockOpsContext},
};
use core::intrinsics::{AtomicOrdering, atomic_xadd};
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use strait_ebpf::*;

use crate::common::*;

/// cgroup/connect*: let the connect proceed.
const ALLOW: i32 = 1;
/// cgroup/connect*: refuse the connect (the caller sees EPERM).
const REFUSE: i32 = 0;

#[map(name = "STRAIT_ENROLLED_V1")]
static ENROLLED: HashMap<u64, EnrolledPod> = HashMap::pinned(MAX_ENROLLED, 0);
#[map(name = "STRAIT_SERVICES4_V1")]
static SERVICES4: HashMap<ServiceKey4, ServiceValue> = HashMap::pinned(MAX_SERVICES, 0);
#[map(name = "STRAIT_SERVICES6_V1")]
static SERVICES6: HashMap<ServiceKey6, ServiceValue> = HashMap::pinned(MAX_SERVICES, 0);
#[map(name = "STRAIT_COOKIEDST_V2")]
static COOKIE_ORIG_DST: LruHashMap<u64, OrigDst> = LruHashMap::pinned(MAX_PENDING_CONNECTIONS, 0);
#[map(name = "STRAIT_CONNDST_V2")]
static CONN_ORIG_DST: LruHashMap<ConnKey, OrigDst> = LruHashMap::pinned(MAX_PENDING_CONNECTIONS, 0);
#[map(name = "STRAIT_OUTPORTS_V1")]
pub(crate) static OUTBOUND_PORTS: HashMap<u16, u32> = HashMap::pinned(MAX_OUTBOUND_PORTS, 0);
#[map(name = "STRAIT_COUNTERS_V2")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTERS_LEN, 0);
#[map(name = "STRAIT_PODCONNS_V1")]
static POD_CONNECTIONS: LruHashMap<u64, i64> = LruHashMap::pinned(MAX_COUNTED_NETNS, 0);
#[map(name = "STRAIT_LIMITS_V1")]
static LIMITS: Array<u64> = Array::pinned(LIMITS_LEN, 0);

#[inline(always)]
fn count(reason: u32) {
    bump(&COUNTERS, reason);
}

/// Has the caller's pod network namespace as many captured connections open as it may?
/// A limit of 0 (the agent has not written one) means none.
#[inline(always)]
fn at_connection_limit(netns: u64) -> bool {
    let limit = LIMITS.get(LIMIT_POD_CONNECTIONS).copied().unwrap_or(0);
    if limit == 0 {
        return false;
    }
    // SAFETY: a plain i64 read; a concurrent update gives the old or the new count.
    let open = unsafe { POD_CONNECTIONS.get(netns).copied() }.unwrap_or(0);
    open >= limit as i64
}

/// Add `delta` to the open-connection count of a pod network namespace. Atomic: the
/// connects and closes of one pod run on every CPU.
#[inline(always)]
fn add_pod_connections(netns: u64, delta: i64) {
    if POD_CONNECTIONS.get_ptr_mut(netns).is_none() {
        if delta < 0 {
            // Evicted (idle the longest) or counted by an older agent: nothing to undo.
            return;
        }
        // BPF_NOEXIST: another CPU may have created it meanwhile; either way it exists.
        let _ = POD_CONNECTIONS.insert(netns, 0, u64::from(BPF_NOEXIST));
    }
    if let Some(open) = POD_CONNECTIONS.get_ptr_mut(netns) {
        // SAFETY: the pointer is into the map's value, valid for the program's run and
        // 8-byte aligned; every writer uses atomic adds.
        unsafe { atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(open, delta) };
    }
}

/// The pod the caller belongs to: the deepest enrolled cgroup among the caller's own cgroup
/// and its ancestors, with its enrollment. The agent enrolls a pod's cgroup; on a
/// Kubernetes node every process of the pod runs in a container cgroup below it
/// (`kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<UID>.slice/
/// cri-containerd-<ID>.scope`, or `kubepods/burstable/pod<UID>/<ID>` with the cgroupfs
/// driver), so the caller's exact cgroup is almost never the enrolled one. Level 0 (the
/// hierarchy root) is never a pod. The walk stops at the caller's own level, where the
/// helper returns 0 (bpf-helpers(7), `bpf_get_current_ancestor_cgroup_id`).
#[inline(always)]
fn enrolled_caller() -> Option<(u64, EnrolledPod)> {
    // Plain initialised locals rather than an `Option` carried through the unrolled loop:
    // the verifier refuses a read of the uninitialised payload of a `None`.
    let mut found_cgroup: u64 = 0;
    let mut found = EnrolledPod {
        outbound_port: 0,
        flags: 0,
        workload_id: 0,
    };
    let mut level = 1;
    while level <= MAX_CGROUP_DEPTH {
        // SAFETY: helper with a plain integer argument, allowed in cgroup sock_addr
        // programs.
        let cgroup = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if cgroup == 0 {
            break;
        }
        // SAFETY: the value is Copy and read at once; a concurrent update by the agent
        // can at worst give us the previous or next enrollment.
        if let Some(pod) = unsafe { ENROLLED.get(cgroup) } {
            found_cgroup = cgroup;
            found = *pod;
        }
        level += 1;
    }
    if found_cgroup == 0 {
        None
    } else {
        Some((found_cgroup, found))
    }
}

#[inline(always)]
fn is_tcp(sa: *const bpf_sock_addr) -> bool {
    // SAFETY: `sa` is the program context; the verifier allows 4-byte reads.
    unsafe { read_volatile(addr_of!((*sa).protocol)) == IPPROTO_TCP }
}

/// Non-service destination of an enrolled pod: loopback always passes;
/// otherwise DROP_ALL refuses.
#[inline(always)]
fn not_a_service(pod: &EnrolledPod, loopback: bool) -> i32 {
    if !loopback && pod.flags & FLAG_EGRESS_DROP_ALL != 0 {
        count(COUNTER_DENIED);
        REFUSE
    } else {
        count(COUNTER_PASSED);
        ALLOW
    }
}

/// Is the whole address a virtual service without a provider (`SERVICE_ANY_PORT`)?
#[inline(always)]
fn refused_address4(addr: u32) -> bool {
    let key = ServiceKey4 {
        addr,
        port: SERVICE_ANY_PORT,
        _pad: 0,
    };
    // SAFETY: Copy value read at once (see enrolled_caller).
    unsafe { SERVICES4.get(key).copied() }.is_some_and(|s| s.service_id == SERVICE_ID_REFUSED)
}

/// IPv6 twin of [`refused_address4`].
#[inline(always)]
fn refused_address6(addr: [u32; 4]) -> bool {
    let key = ServiceKey6 {
        addr,
        port: SERVICE_ANY_PORT,
        _pad: 0,
    };
    // SAFETY: as above.
    unsafe { SERVICES6.get(key).copied() }.is_some_and(|s| s.service_id == SERVICE_ID_REFUSED)
}

/// Remember where the socket meant to go; false if the map refused it.
#[inline(always)]
fn remember(ctx: &SockAddrContext, dst: &OrigDst) -> bool {
    // SAFETY: the context pointer is valid for the program's run.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    COOKIE_ORIG_DST.insert(cookie, dst, 0).is_ok()
}

/// connect4/6: refuse (and count) a capture past the pod's connection limit.
#[inline(always)]
fn over_limit(ctx: &SockAddrContext) -> bool {
    // SAFETY: the context pointer is valid for the program's run.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if at_connection_limit(netns) {
        count(COUNTER_POD_CONNECTION_LIMIT);
        return true;
    }
    false
}

#[cgroup_sock_addr(connect4)]
pub fn strait_connect4(ctx: SockAddrContext) -> i32 {
    match try_connect4(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

fn try_connect4(ctx: &SockAddrContext) -> Result<i32, i32> {
    let sa = ctx.sock_addr;
    if !is_tcp(sa) {
        return Ok(ALLOW);
    }
    let Some((pod_cgroup, pod)) = enrolled_caller() else {
        count(COUNTER_NOT_ENROLLED);
        return Ok(ALLOW);
    };
    // SAFETY: context fields, 4-byte reads as the verifier requires.
    let (addr, port_be) = unsafe {
        (
            read_volatile(addr_of!((*sa).user_ip4)),
            read_volatile(addr_of!((*sa).user_port)),
        )
    };
    let port = u16::from_be(port_be as u16);
    let key = ServiceKey4 {
        addr,
        port,
        _pad: 0,
    };
    // SAFETY: Copy value read at once (see enrolled_caller).
    let Some(service) = (unsafe { SERVICES4.get(key).copied() }) else {
        if refused_address4(addr) {
            count(COUNTER_DENIED);
            return Err(REFUSE);
        }
        return Ok(not_a_service(&pod, ipv4_is_loopback(addr)));
    };
    if !crate::inpod::backend_allowed(pod_cgroup, service.service_id) {
        return Err(REFUSE);
    }
    if over_limit(ctx) {
        return Err(REFUSE);
    }
    let dst = OrigDst {
        addr: [addr, 0, 0, 0],
        family: FAMILY_V4,
        port,
        service_id: service.service_id,
        listener_port: pod.outbound_port,
        _pad: 0,
    };
    if !remember(ctx, &dst) {
        count(COUNTER_CAPTURE_FAILED);
        return Err(REFUSE);
    }
    // SAFETY: context fields the verifier lets connect4 write, 4 bytes each.
    unsafe {
        write_volatile(addr_of_mut!((*sa).user_ip4), IPV4_LOOPBACK_RAW);
        write_volatile(
            addr_of_mut!((*sa).user_port),
            u32::from(pod.outbound_port.to_be()),
        );
    }
    count(COUNTER_CAPTURED);
    Ok(ALLOW)
}

#[cgroup_sock_addr(connect6)]
pub fn strait_connect6(ctx: SockAddrContext) -> i32 {
    match try_connect6(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

fn try_connect6(ctx: &SockAddrContext) -> Result<i32, i32> {
    let sa = ctx.sock_addr;
    if !is_tcp(sa) {
        return Ok(ALLOW);
    }
    let Some((pod_cgroup, pod)) = enrolled_caller() else {
        count(COUNTER_NOT_ENROLLED);
        return Ok(ALLOW);
    };
    // SAFETY: context fields, 4-byte reads as the verifier requires.
    let (addr, port_be) = unsafe {
        (
            [
                read_volatile(addr_of!((*sa).user_ip6[0])),
                read_volatile(addr_of!((*sa).user_ip6[1])),
                read_volatile(addr_of!((*sa).user_ip6[2])),
                read_volatile(addr_of!((*sa).user_ip6[3])),
            ],
            read_volatile(addr_of!((*sa).user_port)),
        )
    };
    let port = u16::from_be(port_be as u16);
    // A dual-stack socket connecting to ::ffff:a.b.c.d takes the IPv4 path
    // inside the kernel without running connect4, so IPv4 services are
    // matched here too (Java and Python clients do this).
    let mapped = ipv6_mapped_v4(addr);
    let service = match mapped {
        // SAFETY: Copy value read at once (see enrolled_caller).
        Some(v4) => unsafe {
            SERVICES4
                .get(ServiceKey4 {
                    addr: v4,
                    port,
                    _pad: 0,
                })
                .copied()
        },
        // SAFETY: as above.
        None => unsafe {
            SERVICES6
                .get(ServiceKey6 {
                    addr,
                    port,
                    _pad: 0,
                })
                .copied()
        },
    };
    let Some(service) = service else {
        let refused = match mapped {
            Some(v4) => refused_address4(v4),
            None => refused_address6(addr),
        };
        if refused {
            count(COUNTER_DENIED);
            return Err(REFUSE);
        }
        return Ok(not_a_service(&pod, ipv6_is_loopback(addr)));
    };
    if !crate::inpod::backend_allowed(pod_cgroup, service.service_id) {
        return Err(REFUSE);
    }
    if over_limit(ctx) {
        return Err(REFUSE);
    }
    let (dst, listener) = match mapped {
        Some(v4) => (
            OrigDst {
                addr: [v4, 0, 0, 0],
                family: FAMILY_V4,
                port,
                service_id: service.service_id,
                listener_port: pod.outbound_port,
                _pad: 0,
            },
            [0, 0, IPV4_MAPPED_WORD2, IPV4_LOOPBACK_RAW],
        ),
        None => (
            OrigDst {
                addr,
                family: FAMILY_V6,
                port,
                service_id: service.service_id,
                listener_port: pod.outbound_port,
                _pad: 0,
            },
            IPV6_LOOPBACK_RAW,
        ),
    };
    if !remember(ctx, &dst) {
        count(COUNTER_CAPTURE_FAILED);
        return Err(REFUSE);
    }
    // SAFETY: context fields the verifier lets connect6 write, 4 bytes each.
    unsafe {
        write_volatile(addr_of_mut!((*sa).user_ip6[0]), listener[0]);
        write_volatile(addr_of_mut!((*sa).user_ip6[1]), listener[1]);
        write_volatile(addr_of_mut!((*sa).user_ip6[2]), listener[2]);
        write_volatile(addr_of_mut!((*sa).user_ip6[3]), listener[3]);
        write_volatile(
            addr_of_mut!((*sa).user_port),
            u32::from(pod.outbound_port.to_be()),
        );
    }
    count(COUNTER_CAPTURED);
    Ok(ALLOW)
}

#[sock_ops]
pub fn strait_sockops(ctx: SockOpsContext) -> u32 {
    match try_sockops(&ctx) {
        Ok(()) | Err(()) => 1,
    }
}

/// A sock_ops socket's family (`AF_INET`/`AF_INET6`), its local address words and whether its
/// peer is on loopback; None for another family.
#[inline(always)]
fn ends(ops: *const bpf_sock_ops) -> Option<(u32, [u32; 4], bool)> {
    // SAFETY: context fields, 4-byte reads as the verifier requires.
    let family = unsafe { read_volatile(addr_of!((*ops).family)) };
    if family == AF_INET {
        // SAFETY: as above.
        let (remote, local) = unsafe {
            (
                read_volatile(addr_of!((*ops).remote_ip4)),
                read_volatile(addr_of!((*ops).local_ip4)),
            )
        };
        Some((family, [local, 0, 0, 0], ipv4_is_loopback(remote)))
    } else if family == AF_INET6 {
        // SAFETY: as above.
        let (remote, local) = unsafe {
            (
                [
                    read_volatile(addr_of!((*ops).remote_ip6[0])),
                    read_volatile(addr_of!((*ops).remote_ip6[1])),
                    read_volatile(addr_of!((*ops).remote_ip6[2])),
                    read_volatile(addr_of!((*ops).remote_ip6[3])),
                ],
                [
                    read_volatile(addr_of!((*ops).local_ip6[0])),
                    read_volatile(addr_of!((*ops).local_ip6[1])),
                    read_volatile(addr_of!((*ops).local_ip6[2])),
                    read_volatile(addr_of!((*ops).local_ip6[3])),
                ],
            )
        };
        Some((family, local, ipv6_is_loopback(remote)))
    } else {
        None
    }
}

/// The key the agent computes for this client socket (see `ConnKey`).
#[inline(always)]
fn conn_key(ops: *const bpf_sock_ops, netns: u64, family: u32, local: [u32; 4]) -> ConnKey {
    // SAFETY: context field, 4-byte read; local_port is host order.
    let local_port = unsafe { read_volatile(addr_of!((*ops).local_port)) } as u16;
    if family == AF_INET {
        ConnKey::v4(netns, local[0], local_port)
    } else {
        ConnKey::v6(netns, local, local_port)
    }
}

/// The peer's port, host order.
#[inline(always)]
fn remote_port(ops: *const bpf_sock_ops) -> u16 {
    // SAFETY: context field, 4-byte read; remote_port is the big-endian port shifted left by
    // 16 (docs/architecture.md, "Platform facts").
    let port = unsafe { read_volatile(addr_of!((*ops).remote_port)) };
    u16::from_be((port >> 16) as u16)
}

fn try_sockops(ctx: &SockOpsContext) -> Result<(), ()> {
    let ops = ctx.ops;
    // SAFETY: context fields, 4-byte reads as the verifier requires.
    let op = unsafe { read_volatile(addr_of!((*ops).op)) };
    if op == BPF_SOCK_OPS_STATE_CB {
        return closed(ctx);
    }
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB {
        return Ok(());
    }
    // Captured connects always go to loopback: filter before the map lookup.
    let Some((family, local, loopback)) = ends(ops) else {
        return Ok(());
    };
    if !loopback {
        return Ok(());
    }
    // SAFETY: the context pointer is valid for the program's run.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: Copy value read at once; the entry is ours (one socket).
    let Some(dst) = (unsafe { COOKIE_ORIG_DST.get(cookie).copied() }) else {
        // SAFETY: plain u32 read.
        if unsafe { OUTBOUND_PORTS.get(remote_port(ops)).is_some() } {
            count(COUNTER_LOOKUP_MISS);
        }
        return Ok(());
    };
    // SAFETY: the context pointer is valid for the program's run.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let key = conn_key(ops, netns, family, local);
    let stored = CONN_ORIG_DST.insert(key, dst, 0);
    let _ = COOKIE_ORIG_DST.remove(cookie);
    if stored.is_ok() {
        count(COUNTER_REKEYED);
    } else {
        count(COUNTER_REKEY_FAILED);
    }
    // Counted from here until the socket closes: ask for its state changes. The flags
    // are replaced, not or-ed, by the helper, so keep any already set.
    // SAFETY: context field, 4-byte read.
    let flags = unsafe { read_volatile(addr_of!((*ops).bpf_sock_ops_cb_flags)) };
    if ctx
        .set_cb_flags((flags | BPF_SOCK_OPS_STATE_CB_FLAG) as i32)
        .is_ok()
    {
        add_pod_connections(netns, 1);
    }
    Ok(())
}

/// A counted socket changed state: on close, uncount it and remove its original
/// destination if the agent never took it (the connection never reached its accept:
/// refused, timed out, or closed by the client first).
///
/// During an upgrade's link swap the old and the new agent's programs are both attached, and
/// the kernel runs both on this one close. The connect was counted once (only the program
/// that found the cookie entry counts it), so it must be uncounted once: the first program to
/// see the close clears the socket's state-callback flag, and the second, reading the flag
/// live from the socket, finds it clear and leaves the count alone.
fn closed(ctx: &SockOpsContext) -> Result<(), ()> {
    if ctx.arg(1) != BPF_TCP_CLOSE {
        return Ok(());
    }
    let ops = ctx.ops;
    // SAFETY: context field, 4-byte read; it reads the socket's flags as they are now.
    let flags = unsafe { read_volatile(addr_of!((*ops).bpf_sock_ops_cb_flags)) };
    if flags & BPF_SOCK_OPS_STATE_CB_FLAG == 0 {
        return Ok(());
    }
    let _ = ctx.set_cb_flags((flags & !BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    // SAFETY: the context pointer is valid for the program's run.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    add_pod_connections(netns, -1);
    let Some((family, local, _)) = ends(ops) else {
        return Ok(());
    };
    let key = conn_key(ops, netns, family, local);
    // Only this socket's entry: on a shared network namespace another socket may use the
    // same local port towards another workload's listener.
    // SAFETY: Copy value read at once.
    if let Some(dst) = unsafe { CONN_ORIG_DST.get(key).copied() }
        && dst.listener_port == remote_port(ops)
    {
        let _ = CONN_ORIG_DST.remove(key);
    }
    Ok(())
}
