//! `cargo xtask image`: the agent's container image, `deploy/Containerfile`. Builds `strait`
//! as a static binary for the musl target, checks it has no program interpreter (so it runs
//! in an image `FROM scratch`), and builds the image with buildah. Stops with what to install
//! when the musl target, the musl C compiler or buildah is missing.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{cargo, ebpf, workspace_root};

const TARGET: &str = "x86_64-unknown-linux-musl";

#[derive(Debug, clap::Args)]
pub struct ImageArgs {
    /// The image's name and tag.
    #[arg(long, default_value = "localhost/strait:0.1.0")]
    pub tag: String,
    /// Also write the image as an OCI archive to this file (to load it elsewhere).
    #[arg(long)]
    pub archive: Option<PathBuf>,
}

pub fn run(args: &ImageArgs) -> Result<()> {
    let sysroot = output(Command::new("rustc").args(["--print", "sysroot"]))?;
    if !Path::new(sysroot.trim())
        .join("lib/rustlib")
        .join(TARGET)
        .is_dir()
    {
        bail!(
            "the Rust target {TARGET} is not installed, and the image needs a static binary: \
             run `rustup target add {TARGET}`"
        );
    }
    // ring (rustls' crypto) compiles C for the target: it needs the musl C compiler wrapper.
    if Command::new("x86_64-linux-musl-gcc")
        .arg("--version")
        .output()
        .is_err()
    {
        bail!(
            "x86_64-linux-musl-gcc is not installed, and the static build compiles C for musl: \
             install it (Debian: `apt-get install musl-tools`)"
        );
    }
    if Command::new("buildah").arg("--version").output().is_err() {
        bail!(
            "buildah is not installed, and it builds the image: install it (Debian: `apt-get \
             install buildah`), or build deploy/Containerfile with another OCI builder"
        );
    }

    ebpf::build_ebpf()?;
    eprintln!("==> cargo build --release --target {TARGET} -p strait -p strait-cni");
    let status = cargo()
        .args([
            "build",
            "--release",
            "--target",
            TARGET,
            "-p",
            "strait",
            "--bin",
            "strait",
            "-p",
            "strait-cni",
            "--bin",
            "strait-cni",
        ])
        // The image carries no debugger; line tables for backtraces are enough.
        .env("CARGO_PROFILE_RELEASE_STRIP", "debuginfo")
        .current_dir(workspace_root())
        .status()
        .context("cannot run cargo build")?;
    if !status.success() {
        bail!("building the static agent binaries failed");
    }
    // The build context holds the binaries only: nothing else of the tree goes into the image.
    let context = workspace_root().join("target/image");
    std::fs::create_dir_all(&context)?;
    // The agent, and the CNI plugin the DaemonSet's init container copies to the node.
    for name in ["strait", "strait-cni"] {
        let binary = workspace_root()
            .join("target")
            .join(TARGET)
            .join("release")
            .join(name);
        let elf =
            std::fs::read(&binary).with_context(|| format!("reading {}", binary.display()))?;
        if has_interpreter(&elf).with_context(|| format!("{} is not ELF64", binary.display()))? {
            bail!(
                "{} asks for a dynamic loader (PT_INTERP), so it would not run FROM scratch",
                binary.display()
            );
        }
        std::fs::copy(&binary, context.join(name))?;
    }
    let containerfile = workspace_root().join("deploy/Containerfile");
    eprintln!("==> buildah build {}", args.tag);
    let status = Command::new("buildah")
        .args(["build", "--isolation", "chroot", "-f"])
        .arg(&containerfile)
        .args(["-t", &args.tag])
        .arg(&context)
        .status()
        .context("cannot run buildah")?;
    if !status.success() {
        bail!("buildah could not build {}", args.tag);
    }
    if let Some(archive) = &args.archive {
        let status = Command::new("buildah")
            .args(["push", &args.tag])
            .arg(format!("oci-archive:{}", archive.display()))
            .status()
            .context("cannot run buildah push")?;
        if !status.success() {
            bail!("buildah could not write {}", archive.display());
        }
    }
    println!("{}", args.tag);
    Ok(())
}

fn output(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether a little-endian ELF64 file has a PT_INTERP program header (a dynamic loader).
/// None when it is not such a file.
fn has_interpreter(elf: &[u8]) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let phoff = usize::try_from(u64::from_le_bytes(elf.get(0x20..0x28)?.try_into().ok()?)).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    for i in 0..phnum {
        let at = phoff.checked_add(i.checked_mul(phentsize)?)?;
        let p_type = u32::from_le_bytes(elf.get(at..at + 4)?.try_into().ok()?);
        if p_type == PT_INTERP {
            return Some(true);
        }
    }
    Some(false)
}

#[cfg(test)]
mod tests {
    use super::has_interpreter;

    #[test]
    fn a_dynamic_executable_has_an_interpreter() {
        // This test binary is linked for the host's glibc, dynamically.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(has_interpreter(&me), Some(true));
        assert_eq!(has_interpreter(b"#!/bin/sh\n"), None);
    }
}
