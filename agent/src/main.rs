//! The `strait` binary: parse the command line, set up logging, hand over to the library.

use std::process::ExitCode;

use clap::Parser;

/// `--features jemalloc`: jemalloc instead of the system allocator (docs/benchmarks.md,
/// "Allocator", compares the two).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options (its `malloc_conf`, read once at start-up). jemalloc returns freed pages
/// to the kernel only as a side effect of later allocations unless a background thread does
/// it, so an idle agent would keep what start-up freed for good: one background thread
/// (whatever the node's CPU count) purges pages unused for a second, straight to the kernel
/// (no lazy `MADV_FREE` stage, whose pages still count as resident).
#[cfg(feature = "jemalloc")]
#[unsafe(export_name = "_rjem_malloc_conf")]
static JEMALLOC_OPTIONS: Option<&'static std::ffi::c_char> = Some(
    // SAFETY: a pointer to the first byte of a NUL-terminated static string, which is what
    // jemalloc reads `malloc_conf` as (`const char *`).
    unsafe {
        &*c"background_thread:true,max_background_threads:1,dirty_decay_ms:1000,muzzy_decay_ms:0"
            .as_ptr()
    },
);

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
