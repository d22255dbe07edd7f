//! The fast path: local legs of the agent's proxy skip the TCP stack.
//!
//! - `strait_sockops_fastpath` (sock_ops, attached at the node's cgroup root and at the
//!   agent's own cgroup): at `ACTIVE_ESTABLISHED` / `PASSIVE_ESTABLISHED` (before either end
//!   can send a byte) puts the socket in `STRAIT_FASTPATH_SOCKS_V1` if it is one end of a local
//!   leg of the agent:
//!   - leg A, in a pod's netns on loopback: a client connected to an outbound listener port,
//!     or the agent's socket accepted on it; the peer is in the same netns;
//!   - leg B, over the node bridge: the agent (in its netns, from one of its addresses)
//!     connected to a local pod's address, or that pod's accepted socket; the peer's netns
//!     comes from `STRAIT_FASTPATH_PODS_V1` / `STRAIT_FASTPATH_AGENT_V1`.
//!   The key is the one the peer will compute (see `strait_ebpf::FastKey`).
//! - `strait_sk_msg_fastpath` (sk_msg, attached to the SOCKHASH, so it runs on every send of
//!   a socket in it): redirects the message into the peer socket's receive queue
//!   (`bpf_msg_redirect_hash` with `BPF_F_INGRESS`). If the peer is not there, the message
//!   takes the normal stack and the sender is *tainted*: all its later sends take the normal
//!   stack too, so the receiver never gets one direction's bytes from two queues (the kernel
//!   reads the redirected queue first, which would reorder them).
//!
//! Nothing here decides what is meshed; a socket only ever meets the other end of its own
//! connection. Outcomes are counted in `STRAIT_FASTPATH_COUNTERS_V1`.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_ANY, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, bpf_sock_ops, sk_action::SK_PASS, sk_msg_md,
    },
    helpers::generated::bpf_get_netns_cookie,
    macros::{map, sk_msg, sock_ops},
    maps::{HashMap, LruHashMap, PerCpuArray, SockHash},
    programs::{SkMsgContext, SockOpsContext},
};
use core::ptr::{addr_of, read_volatile};
use strait_ebpf::*;

use crate::common::*;

use crate::capture::OUTBOUND_PORTS;

/// Leg A (a pod's client socket <-> the agent's in-pod listener) stays on the normal stack.
///
/// Measured on kernel 6.18 (docs/benchmarks.md, "The blocking-recv hazard"): with the pod's
/// *connecting* socket in the sockmap, a blocking `recv()` with `SO_RCVTIMEO` set returns
/// EAGAIN long before its timeout in most connections (89 of 100 short exchanges of
/// strait-peer), because `tcp_bpf_recvmsg` waits for data once and reports EAGAIN when it
/// wakes up without any, where `tcp_recvmsg` would wait again. Leg B (the agent's connecting
/// socket, the pod's *accepted* one) showed no error in the same runs nor in 10,000 blocking
/// Python requests. The agent's own sockets are non-blocking and retry on EAGAIN anyway. Turn
/// this on only for kernels where the same tests pass with it.
const LEG_A: bool = false;

#[map(name = "STRAIT_FASTPATH_SOCKS_V1")]
static SOCKS: SockHash<FastKey> = SockHash::pinned(MAX_FASTPATH_SOCKETS, 0);
#[map(name = "STRAIT_FASTPATH_PODS_V1")]
static PODS: HashMap<AddrKey, u64> = HashMap::pinned(MAX_FASTPATH_ADDRS, 0);
#[map(name = "STRAIT_FASTPATH_AGENT_V1")]
static AGENT: HashMap<AddrKey, u64> = HashMap::pinned(MAX_FASTPATH_ADDRS, 0);
#[map(name = "STRAIT_FASTPATH_TAINTED_V1")]
static TAINTED: LruHashMap<FastKey, u8> = LruHashMap::pinned(MAX_FASTPATH_SOCKETS, 0);
#[map(name = "STRAIT_FASTPATH_COUNTERS_V1")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(FASTPATH_COUNTERS_LEN, 0);

#[inline(always)]
fn count(reason: u32) {
    bump(&COUNTERS, reason);
}

/// Family and addresses of a context with the usual socket fields (`bpf_sock_ops`,
/// `sk_msg_md`): (family, local, remote), or None for a family other than IPv4/IPv6.
macro_rules! addresses {
    ($ptr:expr) => {{
        let p = $ptr;
        // SAFETY: context fields, 4-byte reads as the verifier requires.
        let family = unsafe { read_volatile(addr_of!((*p).family)) };
        if family == AF_INET {
            // SAFETY: as above.
            let (local, remote) = unsafe {
                (
                    read_volatile(addr_of!((*p).local_ip4)),
                    read_volatile(addr_of!((*p).remote_ip4)),
                )
            };
            Some((FAMILY_V4, [local, 0, 0, 0], [remote, 0, 0, 0]))
        } else if family == AF_INET6 {
            // SAFETY: as above.
            let (local, remote) = unsafe {
                (
                    [
                        read_volatile(addr_of!((*p).local_ip6[0])),
                        read_volatile(addr_of!((*p).local_ip6[1])),
                        read_volatile(addr_of!((*p).local_ip6[2])),
                        read_volatile(addr_of!((*p).local_ip6[3])),
                    ],
                    [
                        read_volatile(addr_of!((*p).remote_ip6[0])),
                        read_volatile(addr_of!((*p).remote_ip6[1])),
                        read_volatile(addr_of!((*p).remote_ip6[2])),
                        read_volatile(addr_of!((*p).remote_ip6[3])),
                    ],
                )
            };
            Some((FAMILY_V6, local, remote))
        } else {
            None
        }
    }};
}

/// Ports of a context: (local, host order; remote, the big-endian port shifted left by 16).
macro_rules! ports {
    ($ptr:expr) => {{
        let p = $ptr;
        // SAFETY: context fields, 4-byte reads as the verifier requires.
        let (local, remote) = unsafe {
            (
                read_volatile(addr_of!((*p).local_port)),
                read_volatile(addr_of!((*p).remote_port)),
            )
        };
        (local as u16, u16::from_be((remote >> 16) as u16))
    }};
}

#[sock_ops]
pub fn strait_sockops_fastpath(ctx: SockOpsContext) -> u32 {
    match try_sockops_fastpath(&ctx) {
        Ok(()) | Err(()) => 1,
    }
}

fn try_sockops_fastpath(ctx: &SockOpsContext) -> Result<(), ()> {
    let ops: *mut bpf_sock_ops = ctx.ops;
    // SAFETY: context field, 4-byte read.
    let op = unsafe { read_volatile(addr_of!((*ops).op)) };
    let passive = match op {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => false,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => true,
        _ => return Ok(()),
    };
    let (family, local, remote) = addresses!(ops).ok_or(())?;
    let (local_port, remote_port) = ports!(ops);
    // SAFETY: the context pointer is valid for the program's run.
    let own_netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let me = FastKey::new(own_netns, family, local, local_port, remote, remote_port);
    let peer_netns = if me.family == FAMILY_V4
        && (me.local[0] == AGENT_LOOPBACK_V4_RAW || me.remote[0] == AGENT_LOOPBACK_V4_RAW)
    {
        // Leg C: the agent delivering to a local pod through the pod's own loopback (it binds
        // to AGENT_LOOPBACK_V4 for that). Both ends live in the pod's netns; the pod's end is
        // the accepted socket, as in leg B, which the blocking tests showed to be safe.
        own_netns
    } else if me.remote_is_loopback() {
        if !LEG_A {
            return Ok(());
        }
        // Leg A: the outbound listener's port is ours (local) when we were accepted,
        // theirs (remote) when we connected.
        let port = if passive {
            me.local_port
        } else {
            me.remote_port
        };
        // SAFETY: plain u32 read.
        if unsafe { OUTBOUND_PORTS.get(port).is_none() } {
            return Ok(());
        }
        own_netns
    } else {
        let local_addr = AddrKey::of(me.family, me.local);
        let remote_addr = AddrKey::of(me.family, me.remote);
        if passive {
            // Leg B, the pod's end: accepted by a local pod from one of the agent's addresses.
            // SAFETY: Copy value read at once.
            let agent_netns = unsafe { AGENT.get(remote_addr).copied() }.ok_or(())?;
            // SAFETY: as above.
            unsafe { PODS.get(local_addr) }.ok_or(())?;
            agent_netns
        } else {
            // Leg B, the agent's end: from the agent's netns and address to a local pod.
            // SAFETY: Copy value read at once.
            let agent_netns = unsafe { AGENT.get(local_addr).copied() }.ok_or(())?;
            if agent_netns != own_netns {
                return Ok(());
            }
            // SAFETY: as above.
            unsafe { PODS.get(remote_addr).copied() }.ok_or(())?
        }
    };
    // A socket with this 4-tuple in the past may have been tainted; this one starts clean.
    let _ = TAINTED.remove(&me);
    let mut key = me.mirrored(peer_netns);
    // SAFETY: `ops` is the program context, valid for the helper call.
    match SOCKS.update(&mut key, unsafe { &mut *ops }, u64::from(BPF_ANY)) {
        Ok(()) => count(FASTPATH_COUNTER_INSERTED),
        Err(_) => count(FASTPATH_COUNTER_INSERT_FAILED),
    }
    Ok(())
}

#[sk_msg]
pub fn strait_sk_msg_fastpath(ctx: SkMsgContext) -> u32 {
    try_sk_msg_fastpath(&ctx);
    // Never drop: a miss goes to the normal stack.
    SK_PASS
}

#[inline(always)]
fn try_sk_msg_fastpath(ctx: &SkMsgContext) {
    let msg: *mut sk_msg_md = ctx.msg;
    let Some((family, local, remote)) = addresses!(msg) else {
        return;
    };
    let (local_port, remote_port) = ports!(msg);
    // SAFETY: the context pointer is valid for the program's run.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let mut key = FastKey::new(netns, family, local, local_port, remote, remote_port);
    // SAFETY: presence check only.
    if unsafe { TAINTED.get(&key).is_some() } {
        count(FASTPATH_COUNTER_TAINTED);
        return;
    }
    // The peer is stored under the key we compute for ourselves (see FastKey::mirrored).
    if SOCKS.redirect_msg(ctx, &mut key, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS) {
        count(FASTPATH_COUNTER_HIT);
    } else {
        let _ = TAINTED.insert(&key, &1, 0);
        count(FASTPATH_COUNTER_MISS);
    }
}
