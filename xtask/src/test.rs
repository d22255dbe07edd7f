//! `cargo xtask test`: set-up if needed, build, lints, unit tests, then every end-to-end test,
//! one module of the end-to-end binary at a time.
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
    end_to_end(args.filter.as_deref(), &mut totals, &mut failed)?;
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

/// The testbed library's own unit tests, then the end-to-end binary (tests/e2e/main.rs) once per
/// module, in the binary's order, each run with the default number of test threads.
///
/// One module at a time, as when every file was its own binary: tests of one module were
/// written to run beside each other, not beside another module's. Some push the 2-core machine
/// hard and serialise only among themselves (tunnel's `HEAVY`), and others measure time
/// (resilience, drain, fast path) or load (prometheus, ui); run together they would meet load
/// they were not written for.
fn end_to_end(filter: Option<&str>, totals: &mut Totals, failed: &mut Vec<String>) -> Result<()> {
    let mut library = cargo();
    library.args([
        "test",
        "--no-fail-fast",
        "-p",
        "strait-tests",
        "--lib",
        "--bins",
    ]);
    if let Some(filter) = filter {
        library.args(["--", filter]);
    }
    if !cargo_test(&mut library, totals)? {
        failed.push("testbed unit tests".to_string());
    }
    let mut list = cargo();
    list.args([
        "test",
        "-p",
        "strait-tests",
        "--test",
        "e2e",
        "--",
        "--list",
        "--format",
        "terse",
    ]);
    eprintln!("==> {list:?}");
    let output = list
        .current_dir(workspace_root())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {list:?}"))?;
    if !output.status.success() {
        failed.push("end-to-end tests (build)".to_string());
        return Ok(());
    }
    let names = test_names(&String::from_utf8_lossy(&output.stdout));
    for (module, tests) in by_module(&names, filter) {
        let mut e2e = cargo();
        e2e.args([
            "test",
            "--no-fail-fast",
            "-p",
            "strait-tests",
            "--test",
            "e2e",
            "--",
        ]);
        let prefix = format!("{module}::");
        // `<module>::` selects the module when no other test's name contains it; otherwise
        // (and when a filter picked some of its tests) the names themselves.
        if filter.is_none() && names.iter().filter(|n| n.contains(&prefix)).count() == tests.len() {
            e2e.arg(&prefix);
        } else {
            e2e.arg("--exact").args(&tests);
        }
        if !cargo_test(&mut e2e, totals)? {
            failed.push(format!("end-to-end tests {module}"));
        }
    }
    Ok(())
}

/// The test names in libtest's `--list --format terse` output (`name: test` lines).
fn test_names(list: &str) -> Vec<String> {
    list.lines()
        .filter_map(|line| line.strip_suffix(": test"))
        .map(str::to_owned)
        .collect()
}

/// The tests whose name contains `filter` (all without one), grouped by their module (the
/// name's first segment), modules in the order they first appear.
fn by_module<'a>(names: &'a [String], filter: Option<&str>) -> Vec<(&'a str, Vec<&'a str>)> {
    let mut modules: Vec<(&str, Vec<&str>)> = Vec::new();
    for name in names {
        if filter.is_some_and(|f| !name.contains(f)) {
            continue;
        }
        let module = name.split_once("::").map_or(name.as_str(), |(m, _)| m);
        match modules.iter_mut().find(|(m, _)| *m == module) {
            Some((_, tests)) => tests.push(name),
            None => modules.push((module, vec![name])),
        }
    }
    modules
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

    #[test]
    fn end_to_end_tests_are_grouped_by_module_in_order() {
        let list = "attacks::a: test\nattacks::b: test\ncheck::c: test\n\
                    identity::d: test\nidentity_service::e: test\n\n3 tests, 0 benchmarks\n";
        let names = super::test_names(list);
        assert_eq!(names.len(), 5);
        let all = super::by_module(&names, None);
        let modules: Vec<_> = all.iter().map(|(m, t)| (*m, t.len())).collect();
        assert_eq!(
            modules,
            [
                ("attacks", 2),
                ("check", 1),
                ("identity", 1),
                ("identity_service", 1)
            ]
        );
        let some = super::by_module(&names, Some("::b"));
        assert_eq!(some, [("attacks", vec!["attacks::b"])]);
        let module = super::by_module(&names, Some("identity::"));
        assert_eq!(module, [("identity", vec!["identity::d"])]);
    }
}
