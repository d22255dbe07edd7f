//! In-pod inbound capture and backend authorization (`src/inpod.rs`, agent
//! `redirect/inpod.rs`).

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
/// The `reason` label of each in-pod counter, by index (see `COUNTER_NAMES`).
pub const INPOD_COUNTER_NAMES: [&str; INPOD_COUNTERS_LEN as usize] = [
    "not_a_backend",
    "inbound_steered",
    "inbound_no_socket",
    "inbound_self",
];

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
