//! `cargo xtask test`: set-up if needed, build, lints, unit tests, then every end-to-end test.
//!
//! The end-to-end tests need root (they create network namespaces, cgroups and eBPF
//! attachments); without it this fails, saying so, instead of skipping them.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

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
    // Build the binaries the end-to-end tests start (the agent, the CNI plugin, the peer tool).
    crate::build_testbed_binaries()?;
    let mut totals = Totals::default();
    let mut unit = cargo();
    unit.args([
        "test",
        "--no-fail-fast",
        "-p",
        "strait",
        "-p",
        "strait-cni",
        "-p",
        "strait-ebpf",
        "-p",
        "xtask",
    ]);
    if !cargo_test(&mut unit, &mut totals)? {
        failed.push("unit and agent tests".to_string());
    }
    let mut e2e = cargo();
    e2e.args(["test", "--no-fail-fast", "-p", "strait-tests"]);
    if let Some(filter) = &args.filter {
        e2e.args(["--", filter]);
    }
    if !cargo_test(&mut e2e, &mut totals)? {
        failed.push("end-to-end tests".to_string());
    }
    // One closing line for the whole run, whatever the last test binary printed.
    println!("tests: {} passed, {} failed", totals.passed, totals.failed);
    if failed.is_empty() && totals.passed > 0 {
        eprintln!("==> all test steps passed");
        Ok(())
    } else if failed.is_empty() {
        bail!("no test ran")
    } else {
        bail!("failed steps: {}", failed.join(", "))
    }
}

#[derive(Default)]
struct Totals {
    passed: u64,
    failed: u64,
}

/// Runs a `cargo test`, passing its output through and adding up its "test result" lines.
fn cargo_test(command: &mut Command, totals: &mut Totals) -> Result<bool> {
    eprintln!("==> {command:?}");
    let mut child = command
        .current_dir(workspace_root())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {command:?}"))?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        if let Some(result) = line.strip_prefix("test result: ") {
            totals.passed += count(result, " passed");
            totals.failed += count(result, " failed");
        }
    }
    Ok(child.wait()?.success())
}

/// The number before `word` in "ok. 10 passed; 0 failed; ...".
fn count(result: &str, word: &str) -> u64 {
    result
        .split(';')
        .find_map(|part| part.trim().strip_suffix(word))
        .and_then(|n| n.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_come_from_the_result_line() {
        let line = "ok. 10 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out";
        assert_eq!(super::count(line, " passed"), 10);
        assert_eq!(super::count(line, " failed"), 2);
        assert_eq!(super::count("FAILED. 3 passed; 1 failed", " passed"), 3);
    }
}
