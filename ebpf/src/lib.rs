//! Types shared between strait's eBPF programs (`src/main.rs` and the program modules beside
//! it) and the agent (`agent/src/redirect.rs` and `redirect/*.rs`): map names and sizes, the
//! `#[repr(C)]` keys and values of every map, counter indices with their metric names, and the
//! small address helpers both sides must agree on. Grouped by hook, like the programs:
//! [`capture`] (connect4/6 and sock_ops), [`inpod`] (sk_lookup and the backend rules),
//! [`fastpath`] (sockmap redirection), and [`addr`]. Everything is re-exported at the root.
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

#[path = "abi/addr.rs"]
pub mod addr;
#[path = "abi/capture.rs"]
pub mod capture;
#[path = "abi/fastpath.rs"]
pub mod fastpath;
#[path = "abi/inpod.rs"]
pub mod inpod;

pub use addr::*;
pub use capture::*;
pub use fastpath::*;
pub use inpod::*;

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
