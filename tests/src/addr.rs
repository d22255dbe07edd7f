//! The testbed's addressing plan. Every address is private or documentation space and lives
//! only inside namespaces the testbed creates; nothing is linked to the host's interfaces.
//!
//! | what                 | IPv4                      | IPv6                          |
//! |----------------------|---------------------------|-------------------------------|
//! | pods, all nodes      | 10.244.0.0/16             | fd00:244::/32                 |
//! | node `n`'s pods      | 10.244.n.0/24             | fd00:244:n::/64               |
//! | node `n`'s bridge    | 10.244.n.1 (DNS here too) | fd00:244:n::1                 |
//! | pod `p` on node `n`  | 10.244.n.p (p = 2..=254)  | fd00:244:n::p (p in hex)      |
//! | underlay, node `n`   | 192.0.2.n/24 (TEST-NET-1) | fd00:ff::n/64                 |
//! | flat pod range       | 10.245.0.0/16, any node   |                               |
//! | the fabric's router  | 192.0.2.254               |                               |
//! | services (virtual)   | 10.96.0.0/16 unreachable  | fd00:96::/112 unreachable     |
//!
//! Node indexes start at 1 in the order nodes are added; pod indexes start at 2 on each node.

use std::net::{Ipv4Addr, Ipv6Addr};

/// The virtual-service range, routed `unreachable` in every pod and node namespace.
pub const SERVICE_CIDR_V4: &str = "10.96.0.0/16";
/// The IPv6 virtual-service range, routed `unreachable` in every pod and node namespace.
pub const SERVICE_CIDR_V6: &str = "fd00:96::/112";
/// All pods of all nodes; pods route it via their node's bridge (there is no default route).
pub const POD_CIDR_V4: &str = "10.244.0.0/16";
/// All pods of all nodes, IPv6.
pub const POD_CIDR_V6: &str = "fd00:244::/32";
/// The underlay prefix length.
pub const UNDERLAY_PREFIX_V4: u8 = 24;
/// Pods placed at an address of their own ([`crate::Node::add_pod_at`]), on any node, as
/// EKS's VPC CNI gives them: no per-node range; the fabric routes each address to its node.
pub const FLAT_POD_CIDR_V4: &str = "10.245.0.0/16";
/// The fabric's router on the underlay, which knows where each flat-range pod lives.
pub const FABRIC_ROUTER_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 254);
/// The underlay between nodes (TEST-NET-1 and a ULA), inside the testbed only.
pub const UNDERLAY_CIDR_V4: &str = "192.0.2.0/24";
pub const UNDERLAY_CIDR_V6: &str = "fd00:ff::/64";
/// The underlay prefix length, IPv6.
pub const UNDERLAY_PREFIX_V6: u8 = 64;
/// The most nodes one testbed holds (keeps netns names within 15 characters).
pub const MAX_NODES: u8 = 99;
/// The first pod index on a node (.1 is the bridge).
pub const FIRST_POD: u8 = 2;
/// The last pod index on a node.
pub const LAST_POD: u8 = 254;

/// The IPv4 subnet `10.244.n.0` (a /24) of node `n`'s pods.
pub fn pod_subnet_v4(node: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, node, 0)
}

/// The IPv6 subnet `fd00:244:n::` (a /64) of node `n`'s pods.
pub fn pod_subnet_v6(node: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x244, u16::from(node), 0, 0, 0, 0, 0)
}

/// Node `n`'s bridge address, the pods' gateway and DNS server.
pub fn bridge_v4(node: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, node, 1)
}

/// Node `n`'s bridge address, IPv6.
pub fn bridge_v6(node: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x244, u16::from(node), 0, 0, 0, 0, 1)
}

/// Pod `p`'s address on node `n`.
pub fn pod_v4(node: u8, pod: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, node, pod)
}

/// Pod `p`'s address on node `n`, IPv6.
pub fn pod_v6(node: u8, pod: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x244, u16::from(node), 0, 0, 0, 0, u16::from(pod))
}

/// Node `n`'s address on the underlay.
pub fn underlay_v4(node: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, node)
}

/// Node `n`'s address on the underlay, IPv6.
pub fn underlay_v6(node: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0xff, 0, 0, 0, 0, 0, u16::from(node))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan() {
        assert_eq!(pod_v4(1, 2).to_string(), "10.244.1.2");
        assert_eq!(pod_v6(1, 2).to_string(), "fd00:244:1::2");
        assert_eq!(pod_v6(12, 200).to_string(), "fd00:244:c::c8");
        assert_eq!(bridge_v6(2).to_string(), "fd00:244:2::1");
        assert_eq!(underlay_v4(3).to_string(), "192.0.2.3");
        assert_eq!(underlay_v6(3).to_string(), "fd00:ff::3");
        assert_eq!(pod_subnet_v6(1).to_string(), "fd00:244:1::");
    }
}
