//! Encoding between the agent's socket addresses and the eBPF maps' keys and
//! values (`strait_ebpf`). Pure functions, tested here.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use strait_ebpf as abi;

use super::EnrolledPod;

/// A service address as the maps key it. IPv4-mapped IPv6 addresses are IPv4
/// (connect6 looks those up in the IPv4 map).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum ServiceKey {
    V4(abi::ServiceKey4),
    V6(abi::ServiceKey6),
}

pub(super) fn service_key(addr: SocketAddr) -> ServiceKey {
    let port = addr.port();
    match addr.ip().to_canonical() {
        IpAddr::V4(ip) => ServiceKey::V4(abi::ServiceKey4 {
            addr: abi::ipv4_raw(ip.octets()),
            port,
            _pad: 0,
        }),
        IpAddr::V6(ip) => ServiceKey::V6(abi::ServiceKey6 {
            addr: abi::ipv6_raw(ip.octets()),
            port,
            _pad: 0,
        }),
    }
}

/// The key sock_ops wrote for the client end `peer` of a captured connection.
pub(super) fn conn_key(netns_cookie: u64, peer: SocketAddr) -> abi::ConnKey {
    match peer.ip().to_canonical() {
        IpAddr::V4(ip) => abi::ConnKey::v4(netns_cookie, abi::ipv4_raw(ip.octets()), peer.port()),
        IpAddr::V6(ip) => abi::ConnKey::v6(netns_cookie, abi::ipv6_raw(ip.octets()), peer.port()),
    }
}

/// The address in an `OrigDst`, or None for an unknown family (a bug).
pub(super) fn orig_dst_addr(dst: &abi::OrigDst) -> Option<SocketAddr> {
    match dst.family {
        abi::FAMILY_V4 => Some(SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(abi::ipv4_octets(dst.addr[0])),
            dst.port,
        ))),
        abi::FAMILY_V6 => Some(SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(abi::ipv6_octets(dst.addr)),
            dst.port,
            0,
            0,
        ))),
        _ => None,
    }
}

pub(super) fn enrolled_value(pod: EnrolledPod) -> abi::EnrolledPod {
    abi::EnrolledPod {
        outbound_port: pod.outbound_port,
        flags: if pod.egress_drop_all {
            abi::FLAG_EGRESS_DROP_ALL
        } else {
            0
        },
        workload_id: pod.workload_id,
    }
}

pub(super) fn enrolled_pod(value: abi::EnrolledPod) -> EnrolledPod {
    EnrolledPod {
        outbound_port: value.outbound_port,
        egress_drop_all: value.flags & abi::FLAG_EGRESS_DROP_ALL != 0,
        workload_id: value.workload_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_service_key_is_raw_address_and_host_port() {
        let ServiceKey::V4(k) = service_key("10.255.0.1:8080".parse().unwrap()) else {
            panic!("expected v4");
        };
        assert_eq!(k.addr.to_ne_bytes(), [10, 255, 0, 1]);
        assert_eq!(k.port, 8080);
    }

    #[test]
    fn mapped_service_is_keyed_as_v4() {
        let mapped = service_key("[::ffff:10.255.0.1]:8080".parse().unwrap());
        assert_eq!(mapped, service_key("10.255.0.1:8080".parse().unwrap()));
        assert!(matches!(
            service_key("[fd00::1]:80".parse().unwrap()),
            ServiceKey::V6(_)
        ));
    }

    #[test]
    fn conn_key_matches_what_sockops_writes() {
        // sock_ops sees local_ip4 as a raw word and local_port in host order.
        let k = conn_key(42, "127.0.0.1:40000".parse().unwrap());
        assert_eq!(k, abi::ConnKey::v4(42, abi::IPV4_LOOPBACK_RAW, 40000));
        let k6 = conn_key(42, "[::1]:40000".parse().unwrap());
        assert_eq!(k6, abi::ConnKey::v6(42, abi::IPV6_LOOPBACK_RAW, 40000));
        // An accepted socket on a dual-stack listener reports a mapped peer.
        let mapped = conn_key(42, "[::ffff:127.0.0.1]:40000".parse().unwrap());
        assert_eq!(mapped, k);
    }

    #[test]
    fn orig_dst_round_trips() {
        for addr in ["10.255.0.1:8080", "[fd00:255::1]:443"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let dst = match service_key(addr) {
                ServiceKey::V4(k) => abi::OrigDst {
                    addr: [k.addr, 0, 0, 0],
                    family: abi::FAMILY_V4,
                    port: k.port,
                    service_id: 1,
                    listener_port: 15001,
                    _pad: 0,
                },
                ServiceKey::V6(k) => abi::OrigDst {
                    addr: k.addr,
                    family: abi::FAMILY_V6,
                    port: k.port,
                    service_id: 1,
                    listener_port: 15001,
                    _pad: 0,
                },
            };
            assert_eq!(orig_dst_addr(&dst), Some(addr));
        }
        let bad = abi::OrigDst {
            addr: [0; 4],
            family: 99,
            port: 0,
            service_id: 0,
            listener_port: 0,
            _pad: 0,
        };
        assert_eq!(orig_dst_addr(&bad), None);
    }

    #[test]
    fn enrollment_flags_round_trip() {
        let pod = EnrolledPod {
            outbound_port: 15001,
            egress_drop_all: true,
            workload_id: 9,
        };
        assert_eq!(enrolled_value(pod).flags, abi::FLAG_EGRESS_DROP_ALL);
        assert_eq!(enrolled_pod(enrolled_value(pod)), pod);
    }
}
