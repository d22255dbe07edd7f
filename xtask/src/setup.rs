//! `cargo xtask setup`: installs what building and testing strait needs, and
//! only what is missing; says what it does. Idempotent.
//!
//! - `rust-src` for the nightly toolchain (the eBPF build uses
//!   `-Z build-std=core`; see `ebpf.rs`);
//! - LLVM 22 development files (`llvm-22-dev libpolly-22-dev libzstd-dev`),
//!   which `bpf-linker` links against (Debian, as root);
//! - the testbed's packages (`dnsmasq-base iproute2 curl`, and for the bench and the fast
//!   path tests `python3 wrk iperf3 nginx-light haproxy openssl`, and
//!   `containernetworking-plugins` for the CNI tests, `libcap2-bin` for the check tests,
//!   `prometheus` for the dashboard tests, `chromium chromium-driver` for the admin page's;
//!   Debian, as root);
//! - `bpf-linker` built against LLVM 22 (rustc here uses LLVM 22; a linker built
//!   on another LLVM cannot read its bitcode);
//! - Python's `grpcio` (the gRPC end-to-end test's real client and server): with
//!   pip from PyPI, else Debian's `python3-grpcio`.

use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::ebpf::TOOLCHAIN;

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const LLVM_PACKAGES: [&str; 3] = ["llvm-22-dev", "libpolly-22-dev", "libzstd-dev"];
/// The testbed's; tcpdump and tshark check what crosses the wire between nodes (mTLS tests);
/// python3 serves HTTP in the e2e tests; then `cargo xtask bench`'s load generators, servers
/// and sidecar stand-ins (h2load comes in nghttp2-client); the reference CNI plugins (bridge,
/// host-local, loopback, portmap) the CNI tests chain strait-cni after; capsh (libcap2-bin)
/// runs `strait check` without a capability; a real Prometheus (and promtool) evaluates the
/// shipped dashboard and rules, and headless Chromium loads the admin page (`/ui`).
const TESTBED_PACKAGES: [&str; 17] = [
    "dnsmasq-base",
    "iproute2",
    "curl",
    "tcpdump",
    "tshark",
    "python3",
    "wrk",
    "iperf3",
    "nginx-light",
    "haproxy",
    "openssl",
    "nghttp2-client",
    "containernetworking-plugins",
    "libcap2-bin",
    "prometheus",
    "chromium",
    "chromium-driver",
];

pub fn setup() -> anyhow::Result<()> {
    ensure_rust_src()?;
    let mut packages: Vec<&str> = Vec::new();
    if !Path::new(LLVM_PREFIX).join("bin/llvm-config").exists() {
        println!("setup: LLVM 22 not found at {LLVM_PREFIX}");
        packages.extend(LLVM_PACKAGES);
    }
    for package in TESTBED_PACKAGES {
        if !dpkg_installed(package) {
            println!("setup: testbed package {package} is missing");
            packages.push(package);
        }
    }
    if !packages.is_empty() {
        apt_install(&packages)?;
    }
    ensure_bpf_linker()?;
    ensure_grpcio()?;
    println!("setup: done");
    Ok(())
}

fn ensure_rust_src() -> anyhow::Result<()> {
    let sysroot = output("rustc", &[&format!("+{TOOLCHAIN}"), "--print", "sysroot"]);
    let Some(sysroot) = sysroot else {
        println!("setup: installing the {TOOLCHAIN} toolchain with rust-src");
        return run(Command::new("rustup").args([
            "toolchain",
            "install",
            TOOLCHAIN,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))
        .context("install the nightly toolchain with rustup (is rustup installed, and is the network up?)");
    };
    let src = Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library/core");
    if src.is_dir() {
        println!("setup: rust-src for {TOOLCHAIN}: present");
        return Ok(());
    }
    println!("setup: adding rust-src to the {TOOLCHAIN} toolchain");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", TOOLCHAIN]))
        .context("rustup component add rust-src (is the network up?)")
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    match bpf_linker_llvm22() {
        Some(true) => {
            println!("setup: bpf-linker (LLVM 22): present");
            return Ok(());
        }
        Some(false) => println!("setup: bpf-linker is not built against LLVM 22: rebuilding it"),
        None => println!("setup: bpf-linker is missing: installing it (about 3 minutes)"),
    }
    if !Path::new(LLVM_PREFIX).join("bin/llvm-config").exists() {
        bail!("bpf-linker needs LLVM 22 at {LLVM_PREFIX}; install {LLVM_PACKAGES:?} first");
    }
    run(Command::new("cargo")
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .args(["install", "--force", "bpf-linker", "--no-default-features"])
        .args(["--features", "llvm-22"]))
    .context("cargo install bpf-linker (needs network access to crates.io)")
}

fn ensure_grpcio() -> anyhow::Result<()> {
    if output("python3", &["-c", "import grpc"]).is_some() {
        println!("setup: Python grpcio: present");
        return Ok(());
    }
    if output("python3", &["--version"]).is_some() {
        println!("setup: installing Python grpcio with pip (PyPI)");
        let pip = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "grpcio"])
            .status();
        if pip.is_ok_and(|s| s.success()) && output("python3", &["-c", "import grpc"]).is_some() {
            return Ok(());
        }
        println!("setup: pip could not install grpcio; trying Debian's python3-grpcio");
    }
    apt_install(&["python3", "python3-grpcio"])
}

/// Some(true) if bpf-linker is installed and linked against LLVM 22,
/// Some(false) if installed against another LLVM, None if missing.
fn bpf_linker_llvm22() -> Option<bool> {
    let path = output("sh", &["-c", "command -v bpf-linker"])?;
    let path = path.trim();
    if path.is_empty() {
        return None;
    }
    // A dynamically linked bpf-linker names its libLLVM; a static one is
    // recorded with its features in cargo's install metadata.
    if output("ldd", &[path]).is_some_and(|ldd| ldd.contains("libLLVM.so.22")) {
        return Some(true);
    }
    let crates2 = Path::new(path).with_file_name("../.crates2.json");
    let installed = std::fs::read_to_string(crates2).unwrap_or_default();
    let entry = installed
        .split("\"bpf-linker ")
        .nth(1)
        .and_then(|rest| rest.split("\"rustc\"").next());
    Some(entry.is_some_and(|e| e.contains("\"llvm-22\"")))
}

fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    if !Path::new("/etc/debian_version").exists() {
        bail!(
            "missing packages {packages:?} and this is not Debian: install them with your package manager"
        );
    }
    if output("id", &["-u"]).as_deref().map(str::trim) != Some("0") {
        bail!(
            "missing packages {packages:?}: run `cargo xtask setup` as root to apt-get install them"
        );
    }
    println!("setup: apt-get update");
    run(Command::new("apt-get").arg("update"))
        .context("apt-get update failed (is the network up?)")?;
    println!("setup: apt-get install -y {}", packages.join(" "));
    run(Command::new("apt-get")
        .args(["install", "-y"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .with_context(|| {
        format!(
            "apt-get install {packages:?} failed (no network? for llvm-22 the apt.llvm.org repository may be needed)"
        )
    })
}

fn dpkg_installed(package: &str) -> bool {
    output("dpkg-query", &["-W", "-f=${Status}", package])
        .is_some_and(|s| s.contains("install ok installed"))
}

/// stdout of a command that succeeded, or None.
fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("start {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{:?} exited with {status}", cmd.get_program());
    }
    Ok(())
}
