//! Addresses as the kernel's eBPF contexts carry them, and the loopback addresses both sides
//! agree on.

/// `AF_INET`, as stored in `family` fields.
pub const FAMILY_V4: u16 = 2;
/// `AF_INET6`, as stored in `family` fields.
pub const FAMILY_V6: u16 = 10;

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
