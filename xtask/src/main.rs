//! `cargo xtask`: set-up, builds, tests and the demo for strait.
mod bench;
mod demo;
mod ebpf;
mod image;
mod metrics_plot;
mod setup;
mod test;

use std::process::Command;

use clap::{Parser, Subcommand};

pub use ebpf::workspace_root;

#[derive(Parser)]
#[command(about = "strait's development tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing strait needs (idempotent).
    Setup,
    /// Build the eBPF object and print its path.
    BuildEbpf,
    /// Set up, build, lint, run the unit tests and every end-to-end test (needs root).
    Test(test::TestArgs),
    /// Build everything, start a testbed, run the agent on examples/demo/mesh.yaml, show the traffic.
    Demo,
    /// Benchmark strait against no mesh and a sidecar pair on a testbed; writes docs/benchmarks.md.
    Bench(bench::BenchArgs),
    /// Run the demo's canary with load, scrape /metrics each second, promote the canary
    /// halfway; writes docs/metrics/canary.svg (the picture in docs/metrics.md).
    MetricsPlot,
    /// Build the agent's container image (deploy/Containerfile): a static binary FROM scratch,
    /// with buildah.
    Image(image::ImageArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Setup => setup::setup(),
        Task::BuildEbpf => {
            let object = ebpf::build_ebpf()?;
            println!("{}", object.display());
            Ok(())
        }
        Task::Test(args) => test::run(&args),
        Task::Demo => demo::run_demo(),
        Task::Bench(args) => bench::run_bench(&args),
        Task::MetricsPlot => metrics_plot::run_plot(),
        Task::Image(args) => image::run(&args),
    }
}

/// `cargo`, the one that runs this xtask, in the environment of a shell (see
/// [`shell_cargo_env`]).
fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    shell_cargo_env(&mut command);
    command
}

/// Removes from `command`'s environment what `cargo run` set for this xtask about its own
/// package (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, ...). A nested cargo would pass them on, and
/// build scripts that watch them (ring's watches `CARGO_MANIFEST_DIR`) would see an
/// environment different from a `cargo build` typed in a shell: every switch between the two
/// rebuilt them and everything above them, the agent's release build included.
fn shell_cargo_env(command: &mut Command) {
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_MANIFEST_")
            || matches!(
                name,
                "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE"
            )
        {
            command.env_remove(name);
        }
    }
}

/// Builds what runs on the testbed: the agent and the test tools (strait-peer, strait-http).
fn build_testbed_binaries() -> anyhow::Result<()> {
    use anyhow::Context as _;
    let status = cargo()
        .args([
            "build",
            "-p",
            "strait",
            "-p",
            "strait-cni",
            "-p",
            "strait-tests",
            "--bins",
        ])
        .current_dir(workspace_root())
        .status()
        .context("cannot run cargo build")?;
    if !status.success() {
        anyhow::bail!("the build failed");
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
