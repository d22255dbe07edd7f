//! Finds the eBPF object built by `cargo xtask build-ebpf` and hands its path
//! to the crate as `STRAIT_EBPF_OBJECT` (embedded by `redirect.rs`).
//!
//! The object lives in `<target dir>/bpfel-unknown-none/release/strait-ebpf`.
//! The target dir is found from `OUT_DIR` (`<target>/[<triple>/]<profile>/
//! build/<pkg>-<hash>/out`), so `CARGO_TARGET_DIR` and `--target-dir` are
//! respected. Setting `STRAIT_EBPF_OBJECT` in the environment overrides the
//! search (for packaging).
//!
//! `STRAIT_EBPF_SKIP=1` builds without the eBPF toolchain (the way aya's own
//! integration tests skip their eBPF build): an empty stub is embedded, so the
//! mesh model, its tests, the fuzz harness and the benchmarks build and run
//! anywhere, and such an agent refuses to install its programs with an error
//! saying how it was built.

use std::{
    env,
    path::{Path, PathBuf},
};

const OVERRIDE: &str = "STRAIT_EBPF_OBJECT";
const SKIP: &str = "STRAIT_EBPF_SKIP";

fn main() {
    println!("cargo:rerun-if-env-changed={OVERRIDE}");
    println!("cargo:rerun-if-env-changed={SKIP}");
    if env::var_os(SKIP).is_some_and(|v| v == "1") {
        let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
        let stub = out_dir.join("strait-ebpf.stub");
        std::fs::write(&stub, []).expect("write the stub eBPF object into OUT_DIR");
        println!("cargo:rustc-env={OVERRIDE}={}", stub.display());
        return;
    }
    let object = match env::var_os(OVERRIDE) {
        Some(path) => PathBuf::from(path),
        None => default_object(),
    };
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.is_file() {
        // A plain message and exit(1): a panic would bury it under a backtrace.
        eprintln!(
            "error: eBPF object not found at {}: run `cargo xtask build-ebpf` first \
             (or set {SKIP}=1 to build and test everything but the data path without it)",
            object.display()
        );
        std::process::exit(1);
    }
    println!("cargo:rustc-env={OVERRIDE}={}", object.display());
}

fn default_object() -> PathBuf {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    target_dir(&out_dir)
        .join("bpfel-unknown-none")
        .join("release")
        .join("strait-ebpf")
}

fn target_dir(out_dir: &Path) -> PathBuf {
    // out_dir = <target>/[<triple>/]<profile>/build/<pkg>-<hash>/out
    let build = out_dir
        .ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "build"))
        .expect("OUT_DIR is inside <target>/<profile>/build");
    let above_profile = build
        .parent()
        .and_then(Path::parent)
        .expect("the build dir has a profile dir above it");
    let triple = env::var("TARGET").unwrap_or_default();
    if above_profile
        .file_name()
        .is_some_and(|n| n == triple.as_str())
    {
        above_profile
            .parent()
            .expect("a <triple> dir sits in the target dir")
            .to_path_buf()
    } else {
        above_profile.to_path_buf()
    }
}
