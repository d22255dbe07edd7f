//! The `strait` binary: parse the command line, set up logging, hand over to the library.

use std::process::ExitCode;

use clap::Parser;

/// `--features jemalloc`: jemalloc instead of the system allocator (docs/benchmarks.md,
/// "Allocator", compares the two).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = strait::cli::Cli::parse();
    strait::logging::init(&cli.log_format);
    match strait::cli::execute(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("strait: {error:#}");
            ExitCode::from(2)
        }
    }
}
