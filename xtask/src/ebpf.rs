//! `cargo xtask build-ebpf`: builds the `strait-ebpf` object for
//! `bpfel-unknown-none` in release mode into the workspace target dir, where
//! `agent/build.rs` picks it up.
//!
//! The build uses the nightly toolchain (`-Z build-std=core` needs it; `cargo
//! xtask setup` installs its `rust-src`) and `bpf-linker` as the linker (the
//! `bpfel-unknown-none` target selects it). Stable + `RUSTC_BOOTSTRAP=1` would
//! also work (docs/architecture.md, "Platform facts") but needs `rust-src` for stable as well; nightly
//! is what the toolchain set-up provides.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// The eBPF target triple.
pub const TARGET: &str = "bpfel-unknown-none";
/// The toolchain the eBPF object is built with.
pub const TOOLCHAIN: &str = "nightly";

/// The workspace root (the parent of the xtask crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// The workspace target dir, respecting `CARGO_TARGET_DIR` (which cargo
/// resolves against the current directory when relative).
pub fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => env::current_dir().unwrap_or_default().join(dir),
        None => workspace_root().join("target"),
    }
}

/// Where `build_ebpf` leaves the object.
pub fn object_path() -> PathBuf {
    target_dir()
        .join(TARGET)
        .join("release")
        .join("strait-ebpf")
}

/// Build the eBPF object and return its path.
pub fn build_ebpf() -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    let mut cmd = Command::new("cargo");
    crate::shell_cargo_env(&mut cmd);
    cmd.current_dir(&root)
        .arg(format!("+{TOOLCHAIN}"))
        .args(["build", "--package", "strait-ebpf", "--bin", "strait-ebpf"])
        .args(["-Z", "build-std=core", "--target", TARGET, "--release"])
        .arg("--target-dir")
        .arg(target_dir())
        // BTF for the object (aya loads it when present); RUSTFLAGS with
        // --target only reach the eBPF crates, not build scripts.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            ["-Cdebuginfo=2", "-Clink-arg=--btf"].join("\u{1f}"),
        )
        .env_remove("RUSTFLAGS")
        // `cargo xtask` runs under the stable proxy; these would pin the
        // nested cargo to stable's rustc.
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    let status = cmd
        .status()
        .with_context(|| format!("run `cargo +{TOOLCHAIN} build` for the eBPF object"))?;
    if !status.success() {
        bail!(
            "building the eBPF object failed ({status}); if the toolchain is missing, run `cargo xtask setup`"
        );
    }
    let object = object_path();
    if !object.is_file() {
        bail!(
            "the eBPF build succeeded but left no object at {}",
            object.display()
        );
    }
    Ok(object)
}
