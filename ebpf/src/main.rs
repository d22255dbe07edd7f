//! strait's eBPF programs, by hook (loading, attaching and pinning are the agent's
//! `redirect` module; the map layouts are the `strait_ebpf` library beside this file):
//!
//! - `src/capture.rs`: outbound capture (cgroup connect4/connect6 and sock_ops).
//! - `src/inpod.rs`: inbound capture (sk_lookup, one copy per pod) and the backend rules
//!   connect4/6 apply.
//! - `src/fastpath.rs`: the sockmap fast path (sock_ops and sk_msg).
//! - `src/common.rs`: the helpers they share.
//!
//! Hot paths count outcomes in per-CPU counter maps and never log. Every map is pinned by name
//! so a restarting agent adopts them.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
// The bpf target has no compare-and-swap, so core's atomic types offer no `fetch_add`; the
// intrinsic compiles to the BPF atomic add instruction the kernel has had since 3.18.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod capture;
#[cfg(target_arch = "bpf")]
mod common;
#[cfg(target_arch = "bpf")]
mod fastpath;
#[cfg(target_arch = "bpf")]
mod inpod;

#[cfg(target_arch = "bpf")]
mod object {
    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        // SAFETY: the verifier rejects any program that could reach a panic.
        unsafe { core::hint::unreachable_unchecked() }
    }
}
