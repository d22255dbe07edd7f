//! What the program modules share: the socket constants the contexts carry and the counter
//! bump every hot path uses.

use aya_ebpf::maps::PerCpuArray;

/// `IPPROTO_TCP`, as in `bpf_sock_addr.protocol`.
pub const IPPROTO_TCP: u32 = 6;
/// `AF_INET`, as in the contexts' `family` fields.
pub const AF_INET: u32 = 2;
/// `AF_INET6`, as in the contexts' `family` fields.
pub const AF_INET6: u32 = 10;

/// Add one to slot `index` of a per-CPU counters map (indices are the `*COUNTER_*` constants
/// of the `strait_ebpf` library).
#[inline(always)]
pub fn bump(counters: &PerCpuArray<u64>, index: u32) {
    if let Some(p) = counters.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot, only this CPU writes it while we run.
        unsafe { *p += 1 }
    }
}
