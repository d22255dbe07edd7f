//! Types shared between strait's eBPF programs (`src/main.rs`) and the agent
//! (`agent/src/redirect.rs`): map names and sizes, the `#[repr(C)]` keys and
//! values of every map, counter indices, and the small address helpers both
//! sides must agree on.
//!
//! Conventions (docs/architecture.md, "Platform facts"):
//! - IPv4 addresses are the kernel's raw network-order `u32` (the bytes in memory
//!   are the address octets, so on either side `u32::from_ne_bytes(octets)`).
//!   IPv6 addresses are four such words.
//! - Ports in every key and value here are in **host** order; the eBPF programs
//!   convert from the kernel's big-endian fields.
//! - A map's name carries a version suffix, bumped whenever its key or value
//!   layout changes, so an agent never adopts a pinned map of another layout.
//!
//! This crate knows nothing about loading or attaching; that is the agent's
//! `redirect` module.
#![cfg_attr(not(test), no_std)]

/// `cgroup id -> EnrolledPod`: the pod cgroups whose processes' connects are steered (a
/// process anywhere below an enrolled cgroup belongs to that pod).
pub const MAP_ENROLLED: &str = "STRAIT_ENROLLED_V1";
/// `ServiceKey4 -> ServiceValue`: IPv4 addresses of mesh services.
pub const MAP_SERVICES4: &str = "STRAIT_SERVICES4_V1";
/// `ServiceKey6 -> ServiceValue`: IPv6 addresses of mesh services.
pub const MAP_SERVICES6: &str = "STRAIT_SERVICES6_V1";
/// LRU `socket cookie (u64) -> OrigDst`: written by connect4/6, read by sock_ops.
pub const MAP_COOKIE_ORIG_DST: &str = "STRAIT_COOKIEDST_V2";
/// LRU `ConnKey -> OrigDst`: written by sock_ops, read (and deleted) by the agent.
pub const MAP_CONN_ORIG_DST: &str = "STRAIT_CONNDST_V2";
/// `port (u16, host order) -> u32` (number of enrolled pods using it): the
/// outbound listener ports, so sock_ops can tell a lookup miss from ordinary
/// loopback traffic.
pub const MAP_OUTBOUND_PORTS: &str = "STRAIT_OUTPORTS_V1";
/// Per-CPU `u64` counters indexed by the `COUNTER_*` constants.
pub const MAP_COUNTERS: &str = "STRAIT_COUNTERS_V2";
/// LRU `netns cookie (u64) -> i64`: captured outbound connections a pod network namespace has
/// open (counted at TCP connect, uncounted when the socket closes), so one pod cannot fill
/// the node-wide original-destination maps. Only eBPF writes it.
pub const MAP_POD_CONNECTIONS: &str = "STRAIT_PODCONNS_V1";
/// Array of `u64` indexed by the `LIMIT_*` constants, written by the agent at start.
pub const MAP_LIMITS: &str = "STRAIT_LIMITS_V1";

/// Every map, in the order the agent checks and pins them.
pub const ALL_MAPS: [&str; 9] = [
    MAP_ENROLLED,
    MAP_SERVICES4,
    MAP_SERVICES6,
    MAP_COOKIE_ORIG_DST,
    MAP_CONN_ORIG_DST,
    MAP_OUTBOUND_PORTS,
    MAP_COUNTERS,
    MAP_POD_CONNECTIONS,
    MAP_LIMITS,
];

/// Deepest cgroup level (below the hierarchy root, level 0) at which a pod's cgroup can be
/// enrolled: connect4/6 look for the caller's pod among its ancestors at levels 1 to this.
/// Kubernetes pod cgroups sit at level 3 (`kubepods.slice/kubepods-<qos>.slice/
/// kubepods-<qos>-pod<UID>.slice`); the agent refuses to enroll a deeper one.
pub const MAX_CGROUP_DEPTH: u32 = 16;
/// Most pods one node can enroll.
pub const MAX_ENROLLED: u32 = 16_384;
/// Most service addresses per family.
pub const MAX_SERVICES: u32 = 65_536;
/// Connections between connect() and the agent's accept() (per LRU map).
pub const MAX_PENDING_CONNECTIONS: u32 = 65_536;
/// Distinct outbound listener ports.
pub const MAX_OUTBOUND_PORTS: u32 = 1_024;
/// Pod network namespaces whose open connections are counted (more than a node's pods, so
/// only namespaces idle the longest, usually gone, are ever evicted).
pub const MAX_COUNTED_NETNS: u32 = 4 * MAX_ENROLLED;

/// `MAP_LIMITS` index: most captured outbound connections one pod network namespace may have
/// open at once; a connect past it is refused (EPERM). Kept well below
/// `MAX_PENDING_CONNECTIONS` so one pod's flood cannot evict another pod's pending entries.
pub const LIMIT_POD_CONNECTIONS: u32 = 0;
/// Size of `MAP_LIMITS`.
pub const LIMITS_LEN: u32 = 1;

/// Program names (the function names in `src/main.rs`).
pub const PROG_CONNECT4: &str = "strait_connect4";
pub const PROG_CONNECT6: &str = "strait_connect6";
pub const PROG_SOCKOPS: &str = "strait_sockops";

/// connect4/6 rewrote the destination to the outbound listener.
pub const COUNTER_CAPTURED: u32 = 0;
/// Enrolled caller, not a service, egress allowed (or loopback): untouched.
pub const COUNTER_PASSED: u32 = 1;
/// Enrolled caller with egress DROP_ALL, not a service, or a connect to the address of a
/// virtual service without a provider: connect refused (EPERM).
pub const COUNTER_DENIED: u32 = 2;
/// Caller's cgroup is not enrolled: untouched.
pub const COUNTER_NOT_ENROLLED: u32 = 3;
/// sock_ops moved an original destination from the cookie to the connection key.
pub const COUNTER_REKEYED: u32 = 4;
/// sock_ops saw a connect to an outbound listener port with no original destination.
pub const COUNTER_LOOKUP_MISS: u32 = 5;
/// connect4/6 could not store the original destination: connect refused (EPERM).
pub const COUNTER_CAPTURE_FAILED: u32 = 6;
/// sock_ops could not store the connection key (the agent will miss it).
pub const COUNTER_REKEY_FAILED: u32 = 7;
/// connect4/6 refused a connect: the pod already has `LIMIT_POD_CONNECTIONS` captured
/// connections open (EPERM).
pub const COUNTER_POD_CONNECTION_LIMIT: u32 = 8;
/// Size of the counters array.
pub const COUNTERS_LEN: u32 = 9;

/// `EnrolledPod::flags`: refuse connects to non-mesh, non-loopback destinations
/// (App Mesh `egressFilter.type: DROP_ALL`).
pub const FLAG_EGRESS_DROP_ALL: u16 = 1;

/// `AF_INET`, as stored in `family` fields.
pub const FAMILY_V4: u16 = 2;
/// `AF_INET6`, as stored in `family` fields.
pub const FAMILY_V6: u16 = 10;

/// Value of `MAP_ENROLLED`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnrolledPod {
    /// Port of the pod's outbound listener on loopback, host order.
    pub outbound_port: u16,
    /// `FLAG_*` bits.
    pub flags: u16,
    /// The agent's id for the workload (opaque to eBPF).
    pub workload_id: u32,
}

/// Key of `MAP_SERVICES4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceKey4 {
    /// Raw network-order address.
    pub addr: u32,
    /// Host order.
    pub port: u16,
    pub _pad: u16,
}

/// Key of `MAP_SERVICES6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceKey6 {
    /// Raw network-order address words.
    pub addr: [u32; 4],
    /// Host order.
    pub port: u16,
    pub _pad: u16,
}

/// Value of `MAP_SERVICES4` / `MAP_SERVICES6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceValue {
    pub service_id: u32,
}

/// `ServiceKey4::port` / `ServiceKey6::port` of an entry for a whole address: a virtual
/// service that answers on no port (no provider). Looked up only when the exact port misses.
pub const SERVICE_ANY_PORT: u16 = 0;
/// `ServiceValue::service_id` of such an entry: connects to the address are refused (EPERM),
/// as the mesh file's validation warns, instead of leaving the mesh under ALLOW_ALL.
pub const SERVICE_ID_REFUSED: u32 = u32::MAX;

/// Value of `MAP_COOKIE_ORIG_DST` and `MAP_CONN_ORIG_DST`: where the client
/// meant to connect.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    /// For `FAMILY_V4` only `addr[0]` is used, the rest is zero.
    pub addr: [u32; 4],
    pub family: u16,
    /// Host order.
    pub port: u16,
    pub service_id: u32,
    /// The outbound listener port (host order) connect4/6 steered the connect to: the agent
    /// takes the entry only for a connection accepted on that port, so a workload sharing the
    /// network namespace cannot present another's key (same client port, reused with
    /// SO_REUSEADDR) at another workload's listener and be taken for it.
    pub listener_port: u16,
    pub _pad: u16,
}

/// Key of `MAP_CONN_ORIG_DST`: the client end of a captured connection, as the
/// agent sees it from the accepted socket (peer address + SO_NETNS_COOKIE).
/// A client in an IPv4-mapped IPv6 connection is stored as `FAMILY_V4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub netns_cookie: u64,
    /// For `FAMILY_V4` only `addr[0]` is used, the rest is zero.
    pub addr: [u32; 4],
    pub family: u16,
    /// Host order.
    pub port: u16,
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], contain only integers, and spell out
    // their padding as fields, so every byte pattern is valid and none is
    // uninitialised.
    unsafe impl aya::Pod for super::EnrolledPod {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ServiceKey4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ServiceKey6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ServiceValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnKey {}
}

// Layouts are part of the map ABI: a change here needs a new map version suffix.
const _: () = {
    assert!(core::mem::size_of::<EnrolledPod>() == 8);
    assert!(core::mem::size_of::<ServiceKey4>() == 8);
    assert!(core::mem::size_of::<ServiceKey6>() == 20);
    assert!(core::mem::size_of::<ServiceValue>() == 4);
    assert!(core::mem::size_of::<OrigDst>() == 28);
    assert!(core::mem::size_of::<ConnKey>() == 32);
};

/// Raw network-order word of an IPv4 address.
#[inline(always)]
pub const fn ipv4_raw(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}

/// Octets of a raw network-order IPv4 word.
#[inline(always)]
pub const fn ipv4_octets(raw: u32) -> [u8; 4] {
    raw.to_ne_bytes()
}

/// Raw network-order words of an IPv6 address.
#[inline(always)]
pub const fn ipv6_raw(o: [u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// Octets of raw network-order IPv6 words.
#[inline(always)]
pub const fn ipv6_octets(w: [u32; 4]) -> [u8; 16] {
    let a = w[0].to_ne_bytes();
    let b = w[1].to_ne_bytes();
    let c = w[2].to_ne_bytes();
    let d = w[3].to_ne_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

/// 127.0.0.1 as a raw word.
pub const IPV4_LOOPBACK_RAW: u32 = ipv4_raw([127, 0, 0, 1]);
/// The loopback address the agent binds its sockets to when it delivers to a local pod
/// through the pod's own loopback, so the fast path can tell that leg apart from a pod's own
/// loopback traffic.
pub const AGENT_LOOPBACK_V4: [u8; 4] = [127, 0, 0, 254];
pub const AGENT_LOOPBACK_V4_RAW: u32 = ipv4_raw(AGENT_LOOPBACK_V4);
/// ::1 as raw words.
pub const IPV6_LOOPBACK_RAW: [u32; 4] = ipv6_raw([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
/// The third word of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`).
pub const IPV4_MAPPED_WORD2: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// Is this raw IPv4 word in 127.0.0.0/8?
#[inline(always)]
pub const fn ipv4_is_loopback(raw: u32) -> bool {
    ipv4_octets(raw)[0] == 127
}

/// The raw IPv4 word inside an IPv4-mapped IPv6 address, if it is one.
#[inline(always)]
pub const fn ipv6_mapped_v4(w: [u32; 4]) -> Option<u32> {
    if w[0] == 0 && w[1] == 0 && w[2] == IPV4_MAPPED_WORD2 {
        Some(w[3])
    } else {
        None
    }
}

/// Is this IPv6 address ::1 (or an IPv4-mapped 127.0.0.0/8 address)?
#[inline(always)]
pub const fn ipv6_is_loopback(w: [u32; 4]) -> bool {
    match ipv6_mapped_v4(w) {
        Some(v4) => ipv4_is_loopback(v4),
        None => {
            w[0] == IPV6_LOOPBACK_RAW[0]
                && w[1] == IPV6_LOOPBACK_RAW[1]
                && w[2] == IPV6_LOOPBACK_RAW[2]
                && w[3] == IPV6_LOOPBACK_RAW[3]
        }
    }
}

impl ConnKey {
    /// The key of an IPv4 client end.
    pub const fn v4(netns_cookie: u64, addr: u32, port: u16) -> Self {
        Self {
            netns_cookie,
            addr: [addr, 0, 0, 0],
            family: FAMILY_V4,
            port,
            _pad: 0,
        }
    }

    /// The key of an IPv6 client end; IPv4-mapped addresses become `FAMILY_V4`.
    pub const fn v6(netns_cookie: u64, addr: [u32; 4], port: u16) -> Self {
        match ipv6_mapped_v4(addr) {
            Some(v4) => Self::v4(netns_cookie, v4, port),
            None => Self {
                netns_cookie,
                addr,
                family: FAMILY_V6,
                port,
                _pad: 0,
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// In-pod inbound capture and backend authorization (`src/inpod.rs`, agent `redirect/inpod.rs`).

/// `InboundKey -> u32` (1): the pods and listener ports whose incoming TCP connections are
/// steered to the agent's in-pod inbound socket (listeners with tls STRICT or PERMISSIVE),
/// whatever local address of the pod they target. Written for both families whatever sockets
/// the agent has: a family without a socket is dropped, never let through.
pub const MAP_INBOUND_PORTS: &str = "STRAIT_INPORTS_V2";
/// SOCKHASH `InboundKey -> socket`: the agent's listening inbound socket for that key.
pub const MAP_INBOUND_SOCKS: &str = "STRAIT_INSOCKS_V2";
/// The sk_lookup program's global (a `.rodata` value set at load) naming the pod whose
/// network namespace that copy of the program is attached to: sk_lookup runs per netns but
/// has no helper that tells which, so the agent loads one copy per pod.
pub const GLOBAL_INBOUND_POD: &str = "STRAIT_INBOUND_POD";
/// `cgroup id (u64) -> u32` (1): enrolled pods whose connects to mesh services are checked
/// against their virtual node's backends.
pub const MAP_AUTHZ_PODS: &str = "STRAIT_AUTHZPODS_V1";
/// `BackendKey -> u32` (1): (pod cgroup, service id) pairs a pod may connect to.
pub const MAP_BACKENDS: &str = "STRAIT_BACKENDS_V1";
/// Per-CPU `u64` counters indexed by the `INPOD_COUNTER_*` constants.
pub const MAP_INPOD_COUNTERS: &str = "STRAIT_INPODCOUNT_V1";

/// The in-pod maps, in the order the agent checks and pins them.
pub const INPOD_MAPS: [&str; 5] = [
    MAP_INBOUND_PORTS,
    MAP_INBOUND_SOCKS,
    MAP_AUTHZ_PODS,
    MAP_BACKENDS,
    MAP_INPOD_COUNTERS,
];

/// Captured (pod address, port) pairs per node.
pub const MAX_INBOUND_PORTS: u32 = 65_536;
/// (pod, service) pairs per node.
pub const MAX_BACKENDS: u32 = 262_144;

/// The sk_lookup program, attached to each enrolled pod's network namespace.
pub const PROG_SK_LOOKUP: &str = "strait_sk_lookup";

/// connect4/6: the service is not a backend of the caller's virtual node: refused (EPERM).
pub const INPOD_COUNTER_NOT_A_BACKEND: u32 = 0;
/// sk_lookup steered an incoming connection to the agent's inbound socket.
pub const INPOD_COUNTER_INBOUND_STEERED: u32 = 1;
/// sk_lookup found a captured port but no agent socket (agent down): dropped, never bypassed.
pub const INPOD_COUNTER_INBOUND_NO_SOCKET: u32 = 2;
/// sk_lookup let a pod's connection to its own address through untouched.
pub const INPOD_COUNTER_INBOUND_SELF: u32 = 3;
/// Size of the in-pod counters array.
pub const INPOD_COUNTERS_LEN: u32 = 4;

/// Key of `MAP_INBOUND_PORTS` and `MAP_INBOUND_SOCKS`: a pod, a family and a listener port.
/// Not the pod's address: a connection to any local address of the pod (a secondary IP, the
/// IPv6 link-local one) must be captured all the same.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InboundKey {
    /// The pod's id (its cgroup id), as in `GLOBAL_INBOUND_POD`.
    pub pod: u64,
    pub family: u16,
    /// Host order.
    pub port: u16,
    pub _pad: u32,
}

/// Key of `MAP_BACKENDS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    pub cgroup_id: u64,
    pub service_id: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod inpod_pod {
    // SAFETY: #[repr(C)], only integers, no implicit padding (sizes asserted below).
    unsafe impl aya::Pod for super::InboundKey {}
    // SAFETY: as above; the padding is a field.
    unsafe impl aya::Pod for super::BackendKey {}
}

const _: () = {
    assert!(core::mem::size_of::<InboundKey>() == 16);
    assert!(core::mem::size_of::<BackendKey>() == 16);
};

// ---------------------------------------------------------------------------
// Fast path (ebpf/src/fastpath.rs, agent/src/redirect/fastpath.rs).
//
// Sockets of the agent's local legs (pod <-> in-pod outbound listener on
// loopback, agent <-> local pod over the node bridge) are put in a SOCKHASH at
// ACTIVE/PASSIVE_ESTABLISHED, and an sk_msg program redirects each send
// straight into the peer socket's receive queue.
//
// Keying: every socket is stored under the key its *peer* computes for a send,
// `(peer's netns cookie, peer's local = our remote, peer's remote = our local)`,
// so that the sender only needs its own netns cookie and 4-tuple. For loopback
// legs the peer's netns is our own; for the agent <-> pod leg it comes from
// `STRAIT_FASTPATH_PODS_V1` / `STRAIT_FASTPATH_AGENT_V1`, which the agent fills.
// Only the two ends of one TCP connection can ever match each other.
// ---------------------------------------------------------------------------

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_words_keep_network_order_in_memory() {
        let raw = ipv4_raw([10, 255, 0, 1]);
        // The kernel stores user_ip4 as the address bytes in order.
        assert_eq!(raw.to_ne_bytes(), [10, 255, 0, 1]);
        assert_eq!(ipv4_octets(raw), [10, 255, 0, 1]);
        let v6 = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x12, 0x34];
        assert_eq!(ipv6_octets(ipv6_raw(v6)), v6);
    }

    #[test]
    fn loopback() {
        assert!(ipv4_is_loopback(ipv4_raw([127, 0, 0, 1])));
        assert!(ipv4_is_loopback(ipv4_raw([127, 9, 8, 7])));
        assert!(!ipv4_is_loopback(ipv4_raw([10, 0, 0, 127])));
        assert!(ipv6_is_loopback(IPV6_LOOPBACK_RAW));
        let mapped = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 2];
        assert!(ipv6_is_loopback(ipv6_raw(mapped)));
        let other = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        assert!(!ipv6_is_loopback(ipv6_raw(other)));
    }

    #[test]
    fn mapped_client_is_keyed_as_v4() {
        let mapped = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1];
        let k = ConnKey::v6(7, ipv6_raw(mapped), 40000);
        assert_eq!(k, ConnKey::v4(7, IPV4_LOOPBACK_RAW, 40000));
        let k6 = ConnKey::v6(7, IPV6_LOOPBACK_RAW, 40000);
        assert_eq!(k6.family, FAMILY_V6);
    }

    #[test]
    fn fast_keys_of_both_ends_mirror_each_other() {
        let lo = IPV4_LOOPBACK_RAW;
        let client = FastKey::new(9, FAMILY_V4, [lo, 0, 0, 0], 40000, [lo, 0, 0, 0], 15001);
        let agent = FastKey::new(9, FAMILY_V4, [lo, 0, 0, 0], 15001, [lo, 0, 0, 0], 40000);
        assert_eq!(client.mirrored(9), agent);
        assert_eq!(agent.mirrored(9), client);
        assert!(client.remote_is_loopback());
        // A dual-stack client connecting to ::ffff:127.0.0.1 meets an IPv4 agent socket.
        let mapped = ipv6_raw([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1]);
        let dual = FastKey::new(9, FAMILY_V6, mapped, 40000, mapped, 15001);
        assert_eq!(dual, client);
        let pod = ipv4_raw([10, 244, 1, 3]);
        let node = ipv4_raw([10, 244, 1, 1]);
        let agent_up = FastKey::new(1, FAMILY_V4, [node, 0, 0, 0], 50000, [pod, 0, 0, 0], 80);
        let server = FastKey::new(2, FAMILY_V4, [pod, 0, 0, 0], 80, [node, 0, 0, 0], 50000);
        assert_eq!(agent_up.mirrored(2), server);
        assert!(!server.remote_is_loopback());
        assert_eq!(AddrKey::of(FAMILY_V4, server.local), AddrKey::v4(pod));
    }
}
