//! The eBPF object embedded in the agent, read as the kernel would get it (no kernel needed):
//! its maps and programs must be exactly the ones the loader (`strait::redirect`) looks for by
//! name in `strait-ebpf`'s lists. Without this, a renamed or added map would only show up as a
//! failure when an agent loads on a node.
//!
//! Needs the real object (`cargo xtask build-ebpf`): in a build made with `STRAIT_EBPF_SKIP=1`
//! this test fails, saying so.

use std::collections::BTreeSet;

use strait_ebpf as abi;

#[test]
fn the_object_holds_exactly_the_maps_and_programs_the_loader_expects() {
    let object = strait::redirect::embedded_object();
    assert!(
        !object.is_empty(),
        "this build embeds no eBPF object (STRAIT_EBPF_SKIP=1): run `cargo xtask build-ebpf` \
         and build again to run this test"
    );
    let parsed = aya_obj::Object::parse(object).expect("the embedded eBPF object parses");

    let maps: BTreeSet<&str> = parsed
        .maps
        .keys()
        .map(String::as_str)
        // Sections the toolchain adds (.rodata, .bss, aya-log's ring buffer) are not ours.
        .filter(|name| name.starts_with("STRAIT_"))
        .collect();
    let expected: BTreeSet<&str> = abi::ALL_MAPS
        .iter()
        .chain(abi::INPOD_MAPS.iter())
        .chain(abi::FASTPATH_MAPS.iter())
        .copied()
        .collect();
    assert_eq!(maps, expected, "maps in the object vs the loader's lists");

    let programs: BTreeSet<&str> = parsed.programs.keys().map(String::as_str).collect();
    let expected: BTreeSet<&str> = [
        abi::PROG_CONNECT4,
        abi::PROG_CONNECT6,
        abi::PROG_SOCKOPS,
        abi::PROG_SK_LOOKUP,
        abi::PROG_SOCKOPS_FASTPATH,
        abi::PROG_SK_MSG_FASTPATH,
    ]
    .into_iter()
    .collect();
    assert_eq!(
        programs, expected,
        "programs in the object vs the loader's names"
    );
}
