//! Outbound capture (`src/capture.rs`, agent `redirect.rs`): the enrolled pods, the mesh
//! service addresses, the original destinations of captured connects on their way from
//! connect4/6 through sock_ops to the agent, the per-pod connection counts and limits, and the
//! capture counters.

use crate::addr::{FAMILY_V4, FAMILY_V6, ipv6_mapped_v4};

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

/// Program names (the function names in `src/capture.rs`).
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
/// The `reason` label of each counter in metrics and `/stats`, by index: the one table the
/// programs (indices), the loader and telemetry (names) share.
pub const COUNTER_NAMES: [&str; COUNTERS_LEN as usize] = [
    "captured",
    "passed",
    "denied",
    "not_enrolled",
    "rekeyed",
    "lookup_miss",
    "capture_failed",
    "rekey_failed",
    "pod_connection_limit",
];

/// `EnrolledPod::flags`: refuse connects to non-mesh, non-loopback destinations
/// (App Mesh `egressFilter.type: DROP_ALL`).
pub const FLAG_EGRESS_DROP_ALL: u16 = 1;

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
