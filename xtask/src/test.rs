//! `cargo xtask test`: set-up if needed, build, lints, unit tests, then every end-to-end test.
//!
//! The end-to-end tests need root (they create network namespaces, cgroups and eBPF
//! attachments); without it this fails, saying so, instead of skipping them.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{cargo, ebpf, setup, workspace_root};

#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// Skip `cargo fmt --check` and clippy.
    #[arg(long)]
    pub no_lint: bool,
    /// Only run end-to-end tests whose name contains this.
    #[arg(long)]
    pub filter: Option<String>,
}

pub fn run(args: &TestArgs) -> Result<()> {
    if !crate::is_root() {
        bail!(
            "the end-to-end tests need root (network namespaces, cgroups, eBPF): run `sudo -E cargo xtask test`"
        );
    }
    setup::setup()?;
    ebpf::build_ebpf()?;
    let mut failed = Vec::new();
    let mut step = |name: &str, command: &mut Command| -> Result<()> {
        eprintln!("==> {name}");
        let status = command
            .current_dir(workspace_root())
            .status()
            .with_context(|| format!("cannot run {command:?}"))?;
        if !status.success() {
            eprintln!("==> {name}: FAILED ({status})");
            failed.push(name.to_string());
        }
        Ok(())
    };
    if !args.no_lint {
        step("rustfmt", cargo().args(["fmt", "--all", "--check"]))?;
        step(
            "clippy",
            cargo().args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]),
        )?;
    }
    // Build the binaries the end-to-end tests start (the agent and the peer tool).
    let build = cargo()
        .args(["build", "-p", "strait", "-p", "strait-tests", "--bins"])
        .current_dir(workspace_root())
        .status()
        .context("cannot run cargo build")?;
    if !build.success() {
        bail!("the build failed");
    }
    step(
        "unit and agent tests",
        cargo().args(["test", "-p", "strait", "-p", "xtask"]),
    )?;
    let mut e2e = cargo();
    e2e.args(["test", "-p", "strait-tests"]);
    if let Some(filter) = &args.filter {
        e2e.args(["--", filter]);
    }
    step("end-to-end tests", &mut e2e)?;
    if failed.is_empty() {
        eprintln!("==> all test steps passed");
        Ok(())
    } else {
        bail!("failed steps: {}", failed.join(", "))
    }
}
