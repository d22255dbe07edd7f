//! The fast path (`src/fastpath.rs`, agent `redirect/fastpath.rs`).
//!
//! Sockets of the agent's local legs (pod <-> in-pod outbound listener on
//! loopback, agent <-> local pod over the node bridge) are put in a SOCKHASH at
//! ACTIVE/PASSIVE_ESTABLISHED, and an sk_msg program redirects each send
//! straight into the peer socket's receive queue.
//!
//! Keying: every socket is stored under the key its *peer* computes for a send,
//! `(peer's netns cookie, peer's local = our remote, peer's remote = our local)`,
//! so that the sender only needs its own netns cookie and 4-tuple. For loopback
//! legs the peer's netns is our own; for the agent <-> pod leg it comes from
//! `STRAIT_FASTPATH_PODS_V1` / `STRAIT_FASTPATH_AGENT_V1`, which the agent fills.
//! Only the two ends of one TCP connection can ever match each other.

use crate::addr::{FAMILY_V4, FAMILY_V6, ipv4_is_loopback, ipv6_is_loopback, ipv6_mapped_v4};

/// SOCKHASH `FastKey -> socket`: the sockets the fast path can redirect into.
pub const MAP_FASTPATH_SOCKS: &str = "STRAIT_FASTPATH_SOCKS_V1";
/// `AddrKey -> u64`: addresses of the local pods the agent forwards to, with
/// each pod's netns cookie.
pub const MAP_FASTPATH_PODS: &str = "STRAIT_FASTPATH_PODS_V1";
/// `AddrKey -> u64`: the agent's own (non-loopback) addresses, with the
/// agent's netns cookie.
pub const MAP_FASTPATH_AGENT: &str = "STRAIT_FASTPATH_AGENT_V1";
/// LRU `FastKey -> u8`: senders whose peer was missing at some send. Their
/// later sends always take the normal stack, so that one direction of a
/// connection never mixes redirected and stack-delivered bytes (the receiver
/// would read them out of order).
pub const MAP_FASTPATH_TAINTED: &str = "STRAIT_FASTPATH_TAINTED_V1";
/// Per-CPU `u64` counters indexed by the `FASTPATH_COUNTER_*` constants.
pub const MAP_FASTPATH_COUNTERS: &str = "STRAIT_FASTPATH_COUNTERS_V1";

/// The fast path's maps (created with the others, used only when it is on).
pub const FASTPATH_MAPS: [&str; 5] = [
    MAP_FASTPATH_SOCKS,
    MAP_FASTPATH_PODS,
    MAP_FASTPATH_AGENT,
    MAP_FASTPATH_TAINTED,
    MAP_FASTPATH_COUNTERS,
];

/// Most sockets in the fast path at once (two per redirected leg).
pub const MAX_FASTPATH_SOCKETS: u32 = 65_536;
/// Most local pod addresses, and most agent addresses.
pub const MAX_FASTPATH_ADDRS: u32 = 16_384;

pub const PROG_SOCKOPS_FASTPATH: &str = "strait_sockops_fastpath";
pub const PROG_SK_MSG_FASTPATH: &str = "strait_sk_msg_fastpath";

/// A send went straight into the peer socket.
pub const FASTPATH_COUNTER_HIT: u32 = 0;
/// A send found no peer socket (the sender is tainted from here on).
pub const FASTPATH_COUNTER_MISS: u32 = 1;
/// A send of a tainted sender, passed to the normal stack.
pub const FASTPATH_COUNTER_TAINTED: u32 = 2;
/// A socket was put in the SOCKHASH.
pub const FASTPATH_COUNTER_INSERTED: u32 = 3;
/// A socket could not be put in the SOCKHASH (full map, or an unsupported socket).
pub const FASTPATH_COUNTER_INSERT_FAILED: u32 = 4;
/// Size of the fast path's counters array.
pub const FASTPATH_COUNTERS_LEN: u32 = 5;
/// The `reason` label of each fast-path counter, by index (see `COUNTER_NAMES`).
pub const FASTPATH_COUNTER_NAMES: [&str; FASTPATH_COUNTERS_LEN as usize] = [
    "fastpath_hit",
    "fastpath_miss",
    "fastpath_tainted",
    "fastpath_sockets",
    "fastpath_insert_failed",
];

/// Key of `MAP_FASTPATH_SOCKS` and `MAP_FASTPATH_TAINTED`: a netns cookie and
/// a 4-tuple seen from one end. An IPv4-mapped IPv6 socket is keyed as IPv4.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FastKey {
    pub netns_cookie: u64,
    /// For `FAMILY_V4` only `[0]` is used, the rest is zero.
    pub local: [u32; 4],
    pub remote: [u32; 4],
    /// Host order.
    pub local_port: u16,
    /// Host order.
    pub remote_port: u16,
    pub family: u16,
    pub _pad: u16,
}

impl FastKey {
    /// The key of one end; IPv4-mapped IPv6 addresses become `FAMILY_V4`.
    #[inline(always)]
    pub const fn new(
        netns_cookie: u64,
        family: u16,
        local: [u32; 4],
        local_port: u16,
        remote: [u32; 4],
        remote_port: u16,
    ) -> Self {
        let (family, local, remote) = if family == FAMILY_V6 {
            match (ipv6_mapped_v4(local), ipv6_mapped_v4(remote)) {
                (Some(l), Some(r)) => (FAMILY_V4, [l, 0, 0, 0], [r, 0, 0, 0]),
                _ => (FAMILY_V6, local, remote),
            }
        } else {
            (FAMILY_V4, [local[0], 0, 0, 0], [remote[0], 0, 0, 0])
        };
        Self {
            netns_cookie,
            local,
            remote,
            local_port,
            remote_port,
            family,
            _pad: 0,
        }
    }

    /// The key the other end of this connection computes, in netns `peer_netns`.
    #[inline(always)]
    pub const fn mirrored(&self, peer_netns: u64) -> Self {
        Self {
            netns_cookie: peer_netns,
            local: self.remote,
            remote: self.local,
            local_port: self.remote_port,
            remote_port: self.local_port,
            family: self.family,
            _pad: 0,
        }
    }

    /// Is the remote end on loopback (127.0.0.0/8 or ::1)?
    #[inline(always)]
    pub const fn remote_is_loopback(&self) -> bool {
        if self.family == FAMILY_V4 {
            ipv4_is_loopback(self.remote[0])
        } else {
            ipv6_is_loopback(self.remote)
        }
    }
}

/// Key of `MAP_FASTPATH_PODS` and `MAP_FASTPATH_AGENT`: one address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AddrKey {
    /// For `FAMILY_V4` only `[0]` is used, the rest is zero.
    pub addr: [u32; 4],
    pub family: u16,
    pub _pad: u16,
}

impl AddrKey {
    #[inline(always)]
    pub const fn v4(addr: u32) -> Self {
        Self {
            addr: [addr, 0, 0, 0],
            family: FAMILY_V4,
            _pad: 0,
        }
    }

    #[inline(always)]
    pub const fn v6(addr: [u32; 4]) -> Self {
        match ipv6_mapped_v4(addr) {
            Some(v4) => Self::v4(v4),
            None => Self {
                addr,
                family: FAMILY_V6,
                _pad: 0,
            },
        }
    }

    /// The address words of a `FastKey` end (already normalised).
    #[inline(always)]
    pub const fn of(family: u16, addr: [u32; 4]) -> Self {
        if family == FAMILY_V4 {
            Self::v4(addr[0])
        } else {
            Self::v6(addr)
        }
    }
}

#[cfg(feature = "user")]
mod fastpath_pod {
    // SAFETY: #[repr(C)], integers only, padding spelled out as fields.
    unsafe impl aya::Pod for super::FastKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AddrKey {}
}

const _: () = {
    assert!(core::mem::size_of::<FastKey>() == 48);
    assert!(core::mem::size_of::<AddrKey>() == 20);
};
