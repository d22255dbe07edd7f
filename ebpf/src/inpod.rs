//! In-pod security programs and helpers.
//!
//! - `strait_sk_lookup` (sk_lookup, loaded once per enrolled pod with the pod's id in the
//!   `STRAIT_INBOUND_POD` global and attached to that pod's network namespace): an incoming
//!   TCP connection to *any* local address of the pod (its own, a secondary one, the IPv6
//!   link-local one) on a listener port whose App Mesh `tls` mode is STRICT or PERMISSIVE is
//!   handed to the agent's inbound socket in that namespace, so plaintext from outside the
//!   mesh passes the agent (which refuses it under STRICT and counts it under PERMISSIVE).
//!   Ports without tls (or DISABLED) are not in the map and reach the application untouched. A
//!   captured port with no agent socket for the connection's family (agent restarting, or a
//!   pod without an IPv6 loopback) is dropped: never a bypass. Connections to loopback (how
//!   the agent itself delivers to the pod) and a pod's connections to its own address pass.
//! - [`backend_allowed`], called by connect4/connect6 for a connect to a mesh service: an
//!   enrolled pod may reach only the virtual services its virtual node lists as backends
//!   (App Mesh semantics); anything else fails with EPERM before a packet is sent.
//!
//! Outcomes are counted in `STRAIT_INPODCOUNT_V1`; nothing here logs.

use aya_ebpf::{
    Global,
    bindings::{bpf_sk_lookup, sk_action},
    macros::{map, sk_lookup},
    maps::{HashMap, PerCpuArray, SockHash},
    programs::SkLookupContext,
};
use core::ptr::{addr_of, read_volatile};
use strait_ebpf::*;

use crate::common::*;

#[map(name = "STRAIT_INPORTS_V2")]
static INBOUND_PORTS: HashMap<InboundKey, u32> = HashMap::pinned(MAX_INBOUND_PORTS, 0);
#[map(name = "STRAIT_INSOCKS_V2")]
static INBOUND_SOCKS: SockHash<InboundKey> = SockHash::pinned(MAX_INBOUND_PORTS, 0);
#[map(name = "STRAIT_AUTHZPODS_V1")]
static AUTHZ_PODS: HashMap<u64, u32> = HashMap::pinned(MAX_ENROLLED, 0);
#[map(name = "STRAIT_BACKENDS_V1")]
static BACKENDS: HashMap<BackendKey, u32> = HashMap::pinned(MAX_BACKENDS, 0);
#[map(name = "STRAIT_INPODCOUNT_V1")]
static INPOD_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(INPOD_COUNTERS_LEN, 0);

/// The pod whose network namespace this copy of the program is attached to (set by the agent
/// at load; 0 in the copy loaded only to check the program, which never matches a key).
#[unsafe(no_mangle)]
static STRAIT_INBOUND_POD: Global<u64> = Global::new(0);

#[inline(always)]
fn count(reason: u32) {
    bump(&INPOD_COUNTERS, reason);
}

/// May the calling pod, enrolled as cgroup `cgroup_id` (the pod's cgroup, an ancestor of the
/// caller's), connect to mesh service `service_id`? Pods the agent has not put under backend
/// authorization are let through (an older agent's pods).
#[inline(always)]
pub fn backend_allowed(cgroup_id: u64, service_id: u32) -> bool {
    // SAFETY: plain u32 read of a value the agent writes whole.
    if unsafe { AUTHZ_PODS.get(cgroup_id).is_none() } {
        return true;
    }
    let key = BackendKey {
        cgroup_id,
        service_id,
        _pad: 0,
    };
    // SAFETY: as above.
    if unsafe { BACKENDS.get(key).is_some() } {
        true
    } else {
        count(INPOD_COUNTER_NOT_A_BACKEND);
        false
    }
}

#[sk_lookup]
pub fn strait_sk_lookup(ctx: SkLookupContext) -> u32 {
    match try_sk_lookup(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

fn try_sk_lookup(ctx: &SkLookupContext) -> Result<u32, u32> {
    let l: *const bpf_sk_lookup = ctx.lookup;
    // SAFETY: context fields, 4-byte reads as the verifier requires.
    let (protocol, family) = unsafe {
        (
            read_volatile(addr_of!((*l).protocol)),
            read_volatile(addr_of!((*l).family)),
        )
    };
    if protocol != IPPROTO_TCP {
        return Ok(sk_action::SK_PASS);
    }
    // SAFETY: as above; local_port is host order (uapi bpf.h).
    let port = unsafe { read_volatile(addr_of!((*l).local_port)) } as u16;
    let (key_family, loopback, from_self) = if family == AF_INET {
        // SAFETY: as above.
        let (local, remote) = unsafe {
            (
                read_volatile(addr_of!((*l).local_ip4)),
                read_volatile(addr_of!((*l).remote_ip4)),
            )
        };
        (FAMILY_V4, ipv4_is_loopback(local), local == remote)
    } else if family == AF_INET6 {
        // SAFETY: as above.
        let (local, remote) = unsafe {
            (
                [
                    read_volatile(addr_of!((*l).local_ip6[0])),
                    read_volatile(addr_of!((*l).local_ip6[1])),
                    read_volatile(addr_of!((*l).local_ip6[2])),
                    read_volatile(addr_of!((*l).local_ip6[3])),
                ],
                [
                    read_volatile(addr_of!((*l).remote_ip6[0])),
                    read_volatile(addr_of!((*l).remote_ip6[1])),
                    read_volatile(addr_of!((*l).remote_ip6[2])),
                    read_volatile(addr_of!((*l).remote_ip6[3])),
                ],
            )
        };
        (
            FAMILY_V6,
            ipv6_is_loopback(local),
            local[0] == remote[0]
                && local[1] == remote[1]
                && local[2] == remote[2]
                && local[3] == remote[3],
        )
    } else {
        return Ok(sk_action::SK_PASS);
    };
    // The agent delivers to the pod over loopback; nothing from outside arrives there.
    if loopback {
        return Ok(sk_action::SK_PASS);
    }
    // Keyed by pod, not by address: every local address of the pod is covered.
    let key = InboundKey {
        pod: STRAIT_INBOUND_POD.load(),
        family: key_family,
        port,
        _pad: 0,
    };
    // SAFETY: plain u32 read.
    if unsafe { INBOUND_PORTS.get(key).is_none() } {
        return Ok(sk_action::SK_PASS);
    }
    // A pod calling its own address is not "from outside"; leave it to the application.
    if from_self {
        count(INPOD_COUNTER_INBOUND_SELF);
        return Ok(sk_action::SK_PASS);
    }
    match INBOUND_SOCKS.redirect_sk_lookup(ctx, key, 0) {
        Ok(()) => {
            count(INPOD_COUNTER_INBOUND_STEERED);
            Ok(sk_action::SK_PASS)
        }
        Err(_) => {
            // Fail closed: a STRICT port must never fall through to the application.
            count(INPOD_COUNTER_INBOUND_NO_SOCKET);
            Err(sk_action::SK_DROP)
        }
    }
}
