//! `cargo xtask`: set-up, builds, tests, demo and benchmarks for strait.
mod ebpf;
mod setup;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "strait's development tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what building and testing strait needs (idempotent).
    Setup,
    /// Build the eBPF object and print its path.
    BuildEbpf,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::setup(),
        Command::BuildEbpf => {
            let object = ebpf::build_ebpf()?;
            println!("{}", object.display());
            Ok(())
        }
    }
}
